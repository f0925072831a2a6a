"""Real, small classification data that needs no download: scikit-learn's 8x8 digits and MNIST-1D.

- ``DigitsDataModule``: the 1,797 8x8 grey-scale digits shipped inside scikit-learn.
- ``MNIST1DDataModule``: MNIST-1D (Greydanus 2020), 1-D signals of length 40 generated procedurally by the
  ``mnist1d`` package's own generator (``mnist1d.data.make_dataset``: no file is read or written).

scikit-learn and ``mnist1d`` (like matplotlib for plots) come with the ``examples`` extra, not with a plain
``pip install``: they are imported when data is built, under :func:`~lightning_dpkfac.tools.extras.needs_extra`.
"""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_dpkfac.tools.extras import needs_extra

class _TensorDataModule(pl.LightningDataModule):
    """Train/val/test ``TensorDataset``s built once by ``_build`` (on every rank, deterministically)."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the splits (every rank does the same, deterministic work: no download)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build()

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (Lightning adds a DistributedSampler under DDP)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _subset(inputs: Tensor, targets: Tensor, indices: np.ndarray) -> TensorDataset:
    index = torch.from_numpy(indices)
    return TensorDataset(inputs[index], targets[index])


class DigitsDataModule(_TensorDataModule):
    """Digits 0-9 split into train/val/test, stratified and deterministic for a given ``seed``.

    Pixels are scaled to [0, 1] (divided by 16), then standardised with the train split's mean and std
    (one scalar each). Batches are ``(x, y)`` with ``x`` float32 of shape (B, 1, 8, 8), or (B, 64) when
    ``flatten`` is True, and ``y`` int64 of shape (B,).

    Args:
        batch_size: examples per batch, per rank (default: 64).
        val_fraction: fraction of all examples held out for validation (default: 0.1).
        test_fraction: fraction of all examples held out for testing (default: 0.2).
        seed: seed of the split (default: 0).
        flatten: give (B, 64) inputs instead of (B, 1, 8, 8) (default: False).
        num_workers: data-loader worker processes (default: 0).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 flatten: bool = False, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} are invalid: each must be in "
                "(0, 1) and their sum < 1."
            )
        self.save_hyperparameters()  # the settings, read back from self.hparams

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        with needs_extra("digits"):
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32) / 16.0
        idx = np.arange(len(y))
        hp = self.hparams
        idx_rest, idx_test = train_test_split(idx, test_size=hp.test_fraction, stratify=y, random_state=hp.seed)
        val_size = hp.val_fraction / (1.0 - hp.test_fraction)
        idx_train, idx_val = train_test_split(idx_rest, test_size=val_size, stratify=y[idx_rest], random_state=hp.seed)
        mean, std = float(x[idx_train].mean()), float(x[idx_train].std())
        x = (x - mean) / std
        inputs = torch.from_numpy(x).reshape((-1, 64) if self.hparams.flatten else (-1, 1, 8, 8))
        targets = torch.from_numpy(y).long()
        train, val, test = (_subset(inputs, targets, idx) for idx in (idx_train, idx_val, idx_test))
        return train, val, test


class MNIST1DDataModule(_TensorDataModule):
    """MNIST-1D: 10 classes of 1-D signals of length 40, generated by ``mnist1d.data.make_dataset``.

    The generator's own train/test split is kept as train+val/test (with the defaults: 4,000/1,000
    examples, the published benchmark); ``val_fraction`` of its train part, stratified, becomes the
    validation split. Signals come standardised by the generator. Batches are ``(x, y)`` with ``x``
    float32 of shape (B, 1, 40) and ``y`` int64 of shape (B,).

    Args:
        batch_size: examples per batch, per rank (default: 64).
        val_fraction: fraction of the generator's train split held out for validation (default: 0.1).
        seed: seed of the train/val split (default: 0).
        num_samples: examples generated in all, train and test (default: 5000, the benchmark's).
        data_seed: seed of the generator (default: 42, the benchmark's).
        num_workers: data-loader worker processes (default: 0).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0, num_samples: int = 5000,
                 data_seed: int = 42, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} is invalid: it must be in (0, 1).")
        if num_samples < 100:
            raise ValueError(f"num_samples={num_samples} is invalid: it must be >= 100 (10 per class and split).")
        self.save_hyperparameters()  # the settings, read back from self.hparams

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        with needs_extra("MNIST-1D"):
            from sklearn.model_selection import train_test_split
        data = _generate_mnist1d(self.hparams.num_samples, self.hparams.data_seed)
        x = torch.from_numpy(np.concatenate([data["x"], data["x_test"]]).astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(np.concatenate([data["y"], data["y_test"]])).long()
        n_train = len(data["y"])
        idx_train, idx_val = train_test_split(np.arange(n_train), test_size=self.hparams.val_fraction,
                                              stratify=data["y"], random_state=self.hparams.seed)
        return _subset(x, y, idx_train), _subset(x, y, idx_val), _subset(x, y, np.arange(n_train, len(y)))


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset`` with the benchmark's arguments (``make_dataset`` never downloads;
    ``get_dataset`` would). It reseeds Python's and NumPy's global generators: restore them after."""
    with needs_extra("MNIST-1D"):
        from mnist1d.data import get_dataset_args, make_dataset  # imports matplotlib

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
