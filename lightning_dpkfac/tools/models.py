"""Networks for 8x8 digits, MNIST-1D and CIFAR-shaped (3x32x32) inputs, a character-level Transformer
language model, and the LightningModules that train a classifier or a language model.

K-FAC covers the networks' Linear, Conv1d and Conv2d (groups=1) layers, embeddings and attention's
projections; every other parameter (BatchNorm, LayerNorm, a bare position ``nn.Parameter``) keeps its plain
gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
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


def _pre_norm_encoder(d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                      dropout: float) -> nn.TransformerEncoder:
    """``num_layers`` pre-norm ``nn.TransformerEncoderLayer`` on (B, T, d_model) inputs (batch_first)."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


class TransformerClassifier(nn.Module):
    """A Transformer encoder over a sequence of tokens cut from the input: (B, ...) -> (B, num_classes).

    The input is reshaped to (B, seq_len, token_dim) (8x8 digits: 8 rows of 8 pixels; MNIST-1D: 10 tokens
    of 4 samples), embedded by a Linear, given a learned position embedding, encoded by ``num_layers``
    ``nn.TransformerEncoderLayer`` (batch_first, pre-norm), mean-pooled over tokens and classified.

    K-FAC preconditions the embedding Linear, attention's q/k/v and output projections
    (:mod:`lightning_dpkfac.core.attention`), the feed-forward Linears and the head.
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
        self.encoder = _pre_norm_encoder(d_model, nhead, num_layers, dim_feedforward, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(x.shape[0], self.seq_len, self.token_dim)
        h = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(h.mean(dim=1)))


#: The factory name, like ``mlp``, ``cnn``: defaults read 8x8 digits as 8 rows of 8 pixels; MNIST-1D needs
#: ``seq_len=10, token_dim=4``.
transformer_classifier = TransformerClassifier


class CharTransformer(nn.Module):
    """A causal Transformer language model over characters: (B, T) int64 ids, T <= ``seq_len`` -> (B, T,
    ``vocab_size``) logits, where position t sees the ids at positions <= t only.

    Token and learned position ``nn.Embedding``s, ``num_layers`` ``nn.TransformerEncoderLayer`` (batch_first,
    pre-norm) under a causal mask, a final ``nn.LayerNorm`` and a Linear head, whose weight is the token
    embedding's when ``tie_weights``. Only PyTorch's own modules: K-FAC preconditions both embeddings,
    attention's projections, the feed-forward Linears and the head; the LayerNorms keep their plain gradient. A
    tied weight is preconditioned as the head, with the head's factors, its gradient from the embedding included.
    """

    def __init__(
        self,
        vocab_size: int = 98,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        seq_len: int = 64,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        # N(0, 1), the nn.Embedding default, would make tied logits ~sqrt(d_model) large at the start.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        self.encoder = _pre_norm_encoder(d_model, nhead, num_layers, dim_feedforward, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight
        # True above the diagonal: position t may not attend to t' > t. A bool mask (rather than a float one) is
        # made into the activations' dtype by the encoder, so it also works under mixed precision.
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        if length > self.seq_len:
            raise ValueError(f"a sequence of {length} ids is longer than seq_len={self.seq_len}.")
        # Positions as a (B, T) batch like the tokens, so K-FAC sees the position table's per-example gradients.
        positions = torch.arange(length, device=ids.device).expand(ids.shape[0], length)
        h = self.embed(ids) + self.position(positions)
        h = self.encoder(h, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(self.norm(h))


#: The factory name, like ``mlp``, ``cnn``: defaults for ``CharLMDataModule``'s 98 ids and 64-character windows.
char_transformer = CharTransformer


class _NetModule(pl.LightningModule):
    """Holds ``net`` and builds its optimizer: a named one ("sgd", "adam") from the hyper-parameters, or the
    given callable. Saves the hyper-parameters of the subclass's ``__init__`` too (all but ``net``)."""

    def __init__(self, net: nn.Module, lr: float, momentum: float, weight_decay: float,
                 optimizer: str | OptimizerFactory) -> None:
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

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        if callable(self._optimizer):
            return self._optimizer(self.parameters())
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


class ClassifierModule(_NetModule):
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
        super().__init__(net, lr, momentum, weight_decay, optimizer)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

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


class LanguageModelModule(_NetModule):
    """Trains ``net`` ((B, T) int64 ids -> (B, T, vocab) logits) to predict the next character at every position,
    with cross-entropy; batches are ``(x, y)``, both (B, T), ``y`` the next characters (``CharLMDataModule``).

    Logs ``train/loss`` per step (nats per character), and per epoch ``val/loss`` (nats per character) and
    ``val/bpc`` (bits per character: ``val/loss`` / ln 2), each averaged over every validation character of
    every rank.

    Args:
        net: the network.
        lr: learning rate of a named optimizer (default: 0.1).
        momentum: SGD momentum (default: 0.9; unused by Adam).
        weight_decay: L2 weight decay of a named optimizer (default: 0.0).
        optimizer: "sgd", "adam", or a callable that builds the optimizer from the parameters, as for
            ``ClassifierModule`` (default: "sgd").
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str | OptimizerFactory = "sgd",
    ) -> None:
        super().__init__(net, lr, momentum, weight_decay, optimizer)
        self.val_nats = MeanMetric()  # per character; syncs its sum and count over ranks when computed

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_nats.update(F.cross_entropy(self(x).flatten(0, 1), y.flatten(), reduction="none"))

    def on_validation_epoch_end(self) -> None:
        nats = self.val_nats.compute()
        self.val_nats.reset()
        # Already the mean over ranks: sync_dist only averages equal values (and keeps Lightning from warning).
        self.log("val/loss", nats, sync_dist=True)
        self.log("val/bpc", nats / math.log(2), prog_bar=True, sync_dist=True)
