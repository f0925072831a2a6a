"""Train the digits CNN from the command line with Lightning's ``LightningCLI`` (no Hydra), K-FAC settings
included:

    python examples/cli.py fit --trainer.strategy=lightning_dpkfac.DPKFACStrategy \\
        --trainer.strategy.damping=0.05 --trainer.devices=2 --trainer.max_epochs=3
    python examples/cli.py fit --config examples/cli_dpkfac.yaml
    python examples/cli.py fit --trainer.strategy=dpkfac          # every K-FAC setting at its default
    python examples/cli.py fit --trainer.strategy.help lightning_dpkfac.DPKFACStrategy   # the settings

Every ``KFACConfig`` field is a keyword of ``DPKFACStrategy``; any other ``DDPStrategy`` keyword can be given
too (``--trainer.strategy.init_args.timeout``, ...). Lightning's launcher re-runs this command line for
ranks 1..N-1.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lightning_dpkfac  # registers strategy="dpkfac" before the Trainer is built
from lightning_dpkfac.tools.data import DigitsDataModule
from lightning_dpkfac.tools.models import ClassifierModule, cnn


class DigitsCNN(ClassifierModule):
    """The digits CNN (``lightning_dpkfac.tools.models.cnn``); ``optimizer`` is "sgd" or "adam"."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, optimizer: str = "sgd") -> None:
        super().__init__(cnn(), lr=lr, momentum=momentum, weight_decay=weight_decay, optimizer=optimizer)


if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsDataModule, trainer_defaults={"accelerator": "cpu", "devices": 2})
    lightning_dpkfac.exit_process(0)  # see exit_process: gloo ranks sometimes abort at interpreter exit
