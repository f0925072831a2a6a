"""Networks for 8x8 digits, MNIST-1D and CIFAR-shaped (3x32x32) inputs, and a LightningModule that trains
any classifier.

K-FAC covers the networks' Linear, Conv1d and Conv2d (groups=1) layers; every other parameter (BatchNorm,
LayerNorm, embeddings, attention's fused input projection) keeps its plain gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS = ("sgd", "adam")

#: Builds an optimizer from the parameters to train.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


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


def cnn1d(in_channels: int = 1, channels: int = 32, length: int = 40, num_classes: int = 10) -> nn.Sequential:
    """A 1-D CNN for MNIST-1D: (B, in_channels, length) -> (B, num_classes) logits.

    Three stride-2 convolutions (kernel 5, 3, 3) halve the length each time (40 -> 20 -> 10 -> 5),
    then a Linear head reads all ``channels x length / 8`` features.
    """
    if length % 8:
        raise ValueError(f"length={length} is invalid: it must be a multiple of 8 (three stride-2 convolutions).")
    return nn.Sequential(
        nn.Conv1d(in_channels, channels, 5, stride=2, padding=2),
        nn.ReLU(inplace=True),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(channels * (length // 8), num_classes),
    )


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, with a 1x1 convolution as the shortcut when
    the shape changes: (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet_small(in_channels: int = 1, width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """A small ResNet for 8x8 digits: (B, in_channels, H, W) -> (B, num_classes) logits.

    A 3x3 stem, two residual blocks at ``width`` channels, two at ``2 * width`` (the first with stride 2),
    global average pooling and a Linear head. Any H, W >= 2 works.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        ResidualBlock(width, width),
        ResidualBlock(width, width),
        ResidualBlock(width, 2 * width, stride=2),
        ResidualBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def cifar_cnn(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """A CIFAR-shaped CNN: (B, 3, 32, 32) -> (B, num_classes) logits. Convolutions 3 -> 32 -> 64 -> 64 (3x3)
    with two 2x2 max-pools, then Linear 4096 -> 256 -> ``num_classes``: its first Linear has a 4097 x 4097
    input factor, the kind of wide layer whose decomposition dominates a K-FAC step."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256), nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


def resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs (the CIFAR variant: a 3x3 stem, no stem pooling): (B, 3, 32, 32) ->
    (B, num_classes) logits. Four stages of two residual blocks at 64, 128, 256 and 512 channels, with
    BatchNorm; its 3x3 convolutions at 512 channels have 4608 x 4608 input factors."""
    widths = (64, 128, 256, 512)
    blocks: list[nn.Module] = []
    for stage, width in enumerate(widths):
        previous = widths[max(stage - 1, 0)]
        blocks += [ResidualBlock(previous, width, stride=1 if stage == 0 else 2), ResidualBlock(width, width)]
    return nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1], num_classes),
    )


class TransformerClassifier(nn.Module):
    """A Transformer encoder over a sequence of tokens cut from the input: (B, ...) -> (B, num_classes).

    The input is reshaped to (B, seq_len, token_dim) (8x8 digits: 8 rows of 8 pixels; MNIST-1D: 10 tokens
    of 4 samples), embedded by a Linear, given a learned position embedding, encoded by ``num_layers``
    ``nn.TransformerEncoderLayer`` (batch_first, pre-norm), mean-pooled over tokens and classified.

    ``nn.MultiheadAttention`` applies its projections functionally (``in_proj_weight``, and even its
    ``out_proj`` Linear is never called as a module), so attention keeps its plain gradient; K-FAC
    preconditions the embedding, the feed-forward Linears and the head.
    """

    def __init__(
        self,
        seq_len: int = 8,
        token_dim: int = 8,
        d_model: int = 32,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 64,
        dropout: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.seq_len, self.token_dim = seq_len, token_dim
        self.embed = nn.Linear(token_dim, d_model)
        self.position = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(x.shape[0], self.seq_len, self.token_dim)
        h = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(h.mean(dim=1)))


#: The factory name, like ``mlp``, ``cnn``: defaults read 8x8 digits as 8 rows of 8 pixels; MNIST-1D needs
#: ``seq_len=10, token_dim=4``.
transformer_classifier = TransformerClassifier


class ClassifierModule(pl.LightningModule):
    """Trains ``net`` (inputs -> logits over ``num_classes`` classes) with cross-entropy.

    Logs ``train/loss`` and ``train/acc`` per step, ``val/loss``, ``val/acc``, ``test/loss`` and
    ``test/acc`` per epoch (averaged over ranks).

    Args:
        net: the network.
        lr: learning rate of a named optimizer (default: 0.1).
        momentum: SGD momentum (default: 0.9; unused by Adam).
        weight_decay: L2 weight decay of a named optimizer (default: 0.0).
        optimizer: "sgd", "adam", or a callable that builds the optimizer from the parameters, e.g.
            ``functools.partial(torch.optim.AdamW, lr=1e-3)`` or a Hydra ``_partial_: true`` node; a
            callable ignores ``lr``, ``momentum`` and ``weight_decay`` (default: "sgd").
        num_classes: number of classes (default: 10).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str | OptimizerFactory = "sgd",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if not callable(optimizer) and optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer={optimizer!r} is invalid: it must be one of {OPTIMIZERS} or a callable "
                "params -> torch.optim.Optimizer."
            )
        # A callable (e.g. functools.partial) is not a hyper-parameter a logger can write as YAML, and it
        # carries its own lr: record only what is used.
        unused = ["optimizer", "lr", "momentum", "weight_decay"] if callable(optimizer) else []
        self.save_hyperparameters(ignore=["net", *unused])
        self.net = net
        self._optimizer = optimizer
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

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
        if callable(self._optimizer):
            return self._optimizer(self.parameters())
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
