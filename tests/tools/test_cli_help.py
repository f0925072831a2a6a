"""A newcomer's command lines: ``--help`` of bench and plan works after a plain ``pip install`` (without the
``examples`` extra), using what needs the extra says which package is missing and how to install it, and
every option's help shows its default."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_dpkfac.tools import bench, linalg_timings, plan
from lightning_dpkfac.tools.bench_report import write_plots
from lightning_dpkfac.tools.data import DigitsDataModule, MNIST1DDataModule

INSTALL = "install the 'examples' extra (pip install -e '.[examples]' in the repository)"

# Run before the module: the packages of the examples extra (setup.cfg) become unimportable, and their
# distributions unknown (libraries such as torchmetrics ask importlib.metadata before importing one).
WITHOUT_EXTRAS = """
import importlib.metadata, runpy, sys
EXTRAS = {"sklearn": "scikit-learn", "mnist1d": "mnist1d", "matplotlib": "matplotlib", "tensorboardX": "tensorboardx"}
for module in EXTRAS:
    sys.modules[module] = None
from_name = importlib.metadata.Distribution.from_name.__func__
def from_name_without_extras(cls, name):
    if name.lower() in EXTRAS.values():
        raise importlib.metadata.PackageNotFoundError(name)
    return from_name(cls, name)
importlib.metadata.Distribution.from_name = classmethod(from_name_without_extras)
module = sys.argv[1]
sys.argv = [module, "--help"]
runpy.run_module(module, run_name="__main__")
"""


def _hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` and its submodules unimportable in this process, as if it were not installed."""
    for name in [package] + [m for m in sys.modules if m.startswith(f"{package}.")]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["lightning_dpkfac.bench", "lightning_dpkfac.plan"])
def test_help_works_without_the_examples_extra(module: str) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, module], capture_output=True, text=True,
                            timeout=100)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith(f"usage: python -m {module}")


@pytest.mark.parametrize(
    ("package", "use", "message"),
    [
        ("sklearn", lambda tmp_path: DigitsDataModule().setup(),
         f"digits needs scikit-learn: {INSTALL}, or pip install scikit-learn"),
        ("mnist1d", lambda tmp_path: MNIST1DDataModule().setup(), f"MNIST-1D needs mnist1d: {INSTALL}, or pip install mnist1d"),
        ("matplotlib", lambda tmp_path: write_plots({"step_time": {}, "convergence": {}}, tmp_path),
         f"plotting the benchmark needs matplotlib: {INSTALL}, or pip install matplotlib"),
    ],
    ids=["digits", "mnist1d", "bench-plots"],
)
def test_what_needs_a_missing_extra_package_names_it_and_the_extra(
    package: str, use: Callable[[Path], None], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _hide(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError) as error:
        use(tmp_path)
    assert str(error.value) == message


@pytest.mark.parametrize("build_parser", [bench.build_parser, plan.build_parser, linalg_timings.build_parser],
                         ids=["bench", "plan", "linalg_timings"])
def test_every_option_has_a_help_text_that_shows_its_default(build_parser: Callable[[], argparse.ArgumentParser]
                                                              ) -> None:
    parser = build_parser()
    shown = "".join(parser.format_help().split())  # --help wraps lines anywhere
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        expected = f"{action.help} (default: {action.default})".replace("%%", "%")
        assert "".join(expected.split()) in shown, f"--help does not show the default of {action.dest}"
