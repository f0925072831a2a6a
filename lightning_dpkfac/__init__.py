"""lightning-dpkfac: K-FAC with distributed preconditioning (DP-KFAC) as a PyTorch Lightning strategy.

Importing the package registers the strategies "dpkfac" and "dkfac" with
``lightning.pytorch.strategies.StrategyRegistry``, and the typed Hydra schemas ``strategy/dpkfac_schema``
and ``strategy/ddp_schema`` with Hydra's ConfigStore. Code that uses the separate ``pytorch_lightning``
package gets the strategy from :mod:`lightning_dpkfac.pytorch_lightning`, which this import loads (and so
registers) when ``pytorch_lightning`` is already imported; importing it is otherwise left to the user, since
``pytorch_lightning`` takes seconds to import.
"""

import sys

from lightning_dpkfac.hydra import schemas  # noqa: F401  (registers the Hydra schemas)
from lightning_dpkfac.core.config import KFACConfig
from lightning_dpkfac.core.errors import UnsupportedLayerError
from lightning_dpkfac.core.preconditioner import KFACNumericalError, KFACPreconditioner
from lightning_dpkfac.lightning.strategy import DPKFACStrategy, exit_process

__all__ = [
    "DPKFACStrategy",
    "KFACConfig",
    "KFACNumericalError",
    "KFACPreconditioner",
    "UnsupportedLayerError",
    "exit_process",
]
__version__ = "0.1.0"

if "pytorch_lightning" in sys.modules:
    from lightning_dpkfac import pytorch_lightning  # noqa: F401  (registers the strategies there too)
