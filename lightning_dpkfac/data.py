"""The scikit-learn digits (1,797 real 8x8 grey-scale images, shipped with scikit-learn: no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
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

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} are invalid: each must be in "
                "(0, 1) and their sum < 1."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.flatten = flatten
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data (every rank does the same, deterministic work: no download)."""
        if self.train_set is not None:
            return
        x, y = load_digits(return_X_y=True)
        x = x.astype(np.float32) / 16.0
        idx = np.arange(len(y))
        idx_rest, idx_test = train_test_split(idx, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        val_size = self.val_fraction / (1.0 - self.test_fraction)
        idx_train, idx_val = train_test_split(
            idx_rest, test_size=val_size, stratify=y[idx_rest], random_state=self.seed
        )
        mean, std = float(x[idx_train].mean()), float(x[idx_train].std())
        x = (x - mean) / std
        inputs = torch.from_numpy(x).reshape((-1, 64) if self.flatten else (-1, 1, 8, 8))
        targets = torch.from_numpy(y).long()

        def subset(indices: np.ndarray) -> TensorDataset:
            index = torch.from_numpy(indices)
            return TensorDataset(inputs[index], targets[index])

        self.train_set, self.val_set, self.test_set = subset(idx_train), subset(idx_val), subset(idx_test)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("DigitsDataModule.setup() has not run yet.")
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
