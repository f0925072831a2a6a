"""Real, small data that needs no download: scikit-learn's 8x8 digits, MNIST-1D and Python source text.

- ``DigitsDataModule``: the 1,797 8x8 grey-scale digits shipped inside scikit-learn.
- ``MNIST1DDataModule``: MNIST-1D (Greydanus 2020), 1-D signals of length 40 generated procedurally by the
  ``mnist1d`` package's own generator (``mnist1d.data.make_dataset``: no file is read or written).
- ``CharLMDataModule``: character-level language modelling on the source files of the running interpreter's
  standard library (needs nothing beyond Python itself).

scikit-learn and ``mnist1d`` (like matplotlib for plots) come with the ``examples`` extra, not with a plain
``pip install``: they are imported when data is built, under :func:`~lightning_dpkfac.tools.extras.needs_extra`.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

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


#: The standard-library modules (paths under ``sysconfig.get_paths()["stdlib"]``, without ".py") whose source
#: files, in this order, are the text of ``CharLMDataModule``. Each is a pure-Python file in every CPython >= 3.10;
#: modules that became packages (``pathlib``, ``re``, ``string``, ``zipfile``) or thin wrappers of a C module
#: (``datetime``, ``decimal``, ``warnings``) in a later version are left out.
DEFAULT_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "bisect", "calendar", "collections/__init__", "contextlib", "copy", "csv",
    "dataclasses", "enum", "fnmatch", "functools", "graphlib", "heapq", "inspect", "json/decoder", "json/encoder",
    "textwrap", "typing",
)

#: The vocabulary: tab, newline and the 95 printable ASCII characters (space to "~") have ids 0 to 96.
CHARS = "\t\n" + "".join(map(chr, range(32, 127)))
#: The id of every other character.
UNKNOWN_ID = len(CHARS)
VOCAB_SIZE = len(CHARS) + 1

_ASCII_TO_ID = torch.full((128,), UNKNOWN_ID, dtype=torch.int64)
_ASCII_TO_ID[[ord(c) for c in CHARS]] = torch.arange(len(CHARS))


def stdlib_sources(modules: Sequence[str] = DEFAULT_MODULES) -> list[str]:
    """The source text of each of ``modules`` (e.g. "json/decoder"), read from the running interpreter's
    standard library. Raises ``FileNotFoundError`` naming a module whose file is missing."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for module in modules:
        path = stdlib / f"{module}.py"
        if not path.is_file():
            raise FileNotFoundError(f"module {module!r}: its standard-library source file {path} is missing.")
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def encode(text: str) -> Tensor:
    """``text`` as ids in ``range(VOCAB_SIZE)`` (see ``CHARS``; any other character is ``UNKNOWN_ID``):
    (len(text),) int64."""
    codes = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
    return _ASCII_TO_ID[codes.clamp(max=127)]  # 127 (DEL) and beyond are unknown


class _Windows(Dataset):
    """The windows of ``seq_len + 1`` ids of ``ids`` that start every ``stride`` ids: item ``i`` is
    ``(input, target)``, both (seq_len,) int64, from ``ids[i * stride:][:seq_len + 1]``, the target being the
    input shifted by one character."""

    def __init__(self, ids: Tensor, seq_len: int, stride: int) -> None:
        if len(ids) <= seq_len:
            raise ValueError(f"{len(ids)} characters are too few for one window of seq_len={seq_len} + 1.")
        self.ids, self.seq_len, self.stride = ids, seq_len, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        window = self.ids[index * self.stride:index * self.stride + self.seq_len + 1]
        return window[:-1], window[1:]


class _RandomWindows(Sampler[int]):
    """``num_samples`` indices drawn uniformly, with replacement, from ``range(num_windows)`` by a generator seeded
    with ``seed + epoch``: the same on every rank, different each epoch. Lightning calls ``set_epoch`` (under DDP
    through its ``DistributedSamplerWrapper``, which then deals the indices out to the ranks)."""

    def __init__(self, num_windows: int, num_samples: int, seed: int) -> None:
        self.num_windows, self.num_samples, self.seed = num_windows, num_samples, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randint(self.num_windows, (self.num_samples,), generator=generator).tolist())


class CharLMDataModule(pl.LightningDataModule):
    """Character-level language modelling on Python source: the files of ``modules`` from the running interpreter's
    standard library (``stdlib_sources``), so the text is the same on every machine with the same Python minor
    version, and needs no download. With ``DEFAULT_MODULES`` on CPython 3.11.7 it has 806,610 characters
    (725,948 train, 80,662 val); 2 are outside the vocabulary.

    Characters become ids (``encode``): tab, newline and the 95 printable ASCII characters, and one unknown id for
    anything else (``vocab_size`` = 98). The last ``round(val_fraction * n)`` characters of each file (of ``n``)
    are validation text, the rest training text; each split is its files' parts concatenated in order.

    Batches are ``(x, y)``, both int64 of shape (B, seq_len), with ``y[:, t] = x[:, t + 1]`` within the window:
    ``y`` is the next character of each position. An epoch of training draws ``len(train_ids) // seq_len``
    windows at uniformly random starts (with replacement, seeded by ``seed + epoch``); validation reads the
    consecutive windows that start every ``seq_len`` characters, so every validation character but the first
    is predicted exactly once.

    Args:
        batch_size: windows per batch, per rank (default: 64).
        seq_len: characters per example (default: 64).
        val_fraction: fraction of each file's characters, at its end, held out for validation (default: 0.1).
        modules: standard-library modules, as paths without ".py" (default: ``DEFAULT_MODULES``).
        seed: seed of the training windows (default: 0).
        num_workers: data-loader worker processes (default: 0).
    """

    def __init__(self, batch_size: int = 64, seq_len: int = 64, val_fraction: float = 0.1,
                 modules: Sequence[str] = DEFAULT_MODULES, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} is invalid: it must be in (0, 1).")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} is invalid: it must be >= 1.")
        if not modules:
            raise ValueError("modules is empty: name at least one standard-library module.")
        self.save_hyperparameters()  # the settings, read back from self.hparams
        self.vocab_size = VOCAB_SIZE
        self.train_ids: Tensor | None = None
        self.val_ids: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and split the text (every rank does the same, deterministic work)."""
        if self.train_ids is not None:
            return
        train, val = [], []
        for text in stdlib_sources(list(self.hparams.modules)):
            ids = encode(text)
            cut = len(ids) - round(self.hparams.val_fraction * len(ids))
            train.append(ids[:cut])
            val.append(ids[cut:])
        self.train_ids, self.val_ids = torch.cat(train), torch.cat(val)

    def _loader(self, dataset: Dataset, sampler: Sampler[int] | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def _ids(self, ids: Tensor | None) -> Tensor:
        if ids is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet.")
        return ids

    def train_dataloader(self) -> DataLoader:
        """Windows at random starts, ``len(train_ids) // seq_len`` per epoch (shared out among ranks under DDP)."""
        seq_len = self.hparams.seq_len
        windows = _Windows(self._ids(self.train_ids), seq_len, stride=1)
        num_samples = len(self.train_ids) // seq_len
        return self._loader(windows, _RandomWindows(len(windows), num_samples, self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        """Consecutive windows, in order."""
        return self._loader(_Windows(self._ids(self.val_ids), self.hparams.seq_len, stride=self.hparams.seq_len))
