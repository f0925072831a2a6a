"""Small networks for 8x8 digits and a LightningModule that trains any classifier with cross-entropy.

The networks use only Linear and Conv2d (groups=1) layers, which K-FAC covers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS = ("sgd", "adam")


def mlp(in_features: int = 64, hidden: Sequence[int] = (128, 128), num_classes: int = 10) -> nn.Sequential:
    """A ReLU MLP: (B, in_features) or (B, 1, 8, 8) -> (B, num_classes) logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(num_classes: int = 10) -> nn.Sequential:
    """A small CNN: (B, 1, 8, 8) -> (B, num_classes) logits (two 3x3 convolutions, one 2x2 max-pool)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(inplace=True),
        nn.Linear(64, num_classes),
    )


class ClassifierModule(pl.LightningModule):
    """Trains ``net`` (inputs -> logits over 10 classes) with cross-entropy.

    Logs ``train/loss`` and ``train/acc`` per step, ``val/loss``, ``val/acc``, ``test/loss`` and
    ``test/acc`` per epoch (averaged over ranks).

    Args:
        net: the network.
        lr: learning rate (default: 0.1).
        momentum: SGD momentum (default: 0.9; unused by Adam).
        weight_decay: L2 weight decay (default: 0.0).
        optimizer: "sgd" or "adam" (default: "sgd").
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is invalid: it must be one of {OPTIMIZERS}.")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric(logits, y)
        # Epoch-level values averaged over ranks; the torchmetrics object syncs its own state when computed.
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, sync_dist=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
