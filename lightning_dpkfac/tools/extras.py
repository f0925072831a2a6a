"""Optional dependencies: the packages of the ``examples`` extra (setup.cfg), imported only where used, and a
clear error naming the extra where one is missing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: Import name -> package, of the ``examples`` extra (setup.cfg) that this package imports.
_EXTRA_PACKAGES = {"sklearn": "scikit-learn", "mnist1d": "mnist1d", "matplotlib": "matplotlib"}
_INSTALL_EXTRA = "install the 'examples' extra (pip install -e '.[examples]' in the repository)"


@contextmanager
def needs_extra(what: str) -> Iterator[None]:
    """Imports in this block that fail for want of a package of the ``examples`` extra raise a
    ``ModuleNotFoundError`` saying that ``what`` needs it and how to install it ("digits needs scikit-learn:
    install the 'examples' extra ..."); any other missing module is raised unchanged."""
    try:
        yield
    except ModuleNotFoundError as error:
        package = _EXTRA_PACKAGES.get((error.name or "").partition(".")[0])
        if package is None:
            raise
        raise ModuleNotFoundError(f"{what} needs {package}: {_INSTALL_EXTRA}, or pip install {package}",
                                  name=error.name) from error
