"""Benchmark: DDP-SGD, D-KFAC (``dkfac``) and DP-KFAC (``dpkfac``) side by side, in one invocation.

    python -m lightning_dpkfac.bench                 # full run, into bench_results/
    python -m lightning_dpkfac.bench --quick         # a smoke run for CI

Every trial runs on ``--world-size`` fresh ranks (forked gloo processes on CPU, one thread each; spawned
NCCL processes, one GPU each, on CUDA), with the engine driven directly through ``torch.distributed``
and DDP-wrapped models. Each rank holds one model per strategy (same seed, same data, same
hyper-parameters) and steps them in turn, ABCABC..., rotating who goes first: machine drift (the CPU
is shared) hits every strategy alike. Peak memory needs a process per strategy: short single-strategy
trials measure it.

K-FAC runs with the library defaults, ``KFACConfig()``, in every trial (step time and convergence), with
``--kfac KEY=VALUE ...`` applied; the benchmark sets only ``mode`` (per strategy) and ``lr``.

Step time (``--models``): every step counted, over whole K-FAC cycles of ``lcm(factor_update_steps,
inv_update_steps)`` steps (:func:`cycle_steps`): ``--warmup-cycles`` untimed cycles, then ``--cycles``
timed cycles (forward, backward, K-FAC step, SGD step) per repetition, so every timed window starts where
a decomposition interval does and holds each layer's decompositions in proportion; each model's own
number of repetitions (``--reps``), in fresh processes. A fresh batch every step: synthetic tensors, or
digits for the CNN. Every rank flushes denormal floats and keeps freed memory (``_tune_cpu_process``),
whatever the strategy.
Convergence (``--tasks``): each task's DDP baselines and dkfac and dpkfac trained side by side, step by step,
for each of its seeds (``--seeds``), the held-out metric every ``--eval-every`` steps and at the end of every
epoch; training time is the sum of the strategy's own step times (evaluation and data loading excluded):

- digits (CNN) to 97% and MNIST-1D (1-D CNN) to 90% test accuracy (``--eval-split val`` for choosing
  hyper-parameters): DDP-SGD, DDP-Adam, and K-FAC under the faster baseline's optimizer (digits: Adam;
  MNIST-1D: SGD with momentum);
- ``charlm``, the character Transformer LM on standard-library source (``CharLMDataModule``) to 2.1 bits per
  character on its validation text (it has no test text): DDP-SGD, DDP-AdamW, and K-FAC under AdamW.

Outputs in ``--out``: ``results.json``, ``results.md`` (tables and the performance goals), and the plots
``step_time.png`` (breakdown bars), ``bytes.png`` (bytes per step by kind), ``convergence.png`` (each task's
metric vs training wall time).

``results.json`` schema (``"schema": "lightning_dpkfac.tools.bench/3"``; times in seconds, sizes in bytes):

- ``machine``: ``platform``, ``cpu_count``, ``torch``, ``backend`` ("gloo"/"nccl"), ``device``,
  ``world_size``, ``loadavg_start`` and ``loadavg_end`` (the 1, 5 and 15-minute load averages: other
  work on the machine inflates every time alike).
- ``config``: the command-line arguments (``kfac_overrides``: ``--kfac`` as a dict), and ``kfac``: the
  K-FAC settings in force, every ``KFACConfig`` field but ``mode`` and ``lr`` (set per strategy);
  ``kfac_settings``: "library defaults", or "library defaults with --kfac KEY=VALUE ..."; ``cycle_steps``:
  the steps of one cycle.
- ``step_time[model]``: ``batch_size`` (per rank) and ``reps``; ``shapes`` (``layers``, ``covered_params``
  N, ``other_params`` N_o); and ``strategies[s]`` for s in ddp, dkfac, dpkfac:
  ``per_step``: per repetition, per timed step {``step`` (wall time), and the phases below}, averaged
  over ranks (which wait for each other in the collectives); the window's first step starts a cycle;
  ``step_s`` {``mean``, ``median``, ``p95``, ``max``, ``p10``, ``p90``} of those per-step wall times, all
  repetitions pooled; ``ratio_to_ddp``: mean over DDP-SGD's mean (the headline: decomposition steps
  included); ``median_ratio_to_ddp``; ``max_over_median``: the largest step over the strategy's own
  median (a stall: a decomposition step that holds up training);
  ``phases_s``: mean seconds per step, averaged over ranks, that add up to the mean step time:
  ``forward_backward`` (including DDP's gradient communication, excluding factor capture),
  ``factor`` (capture hooks and running averages), ``inverse`` (decompositions: 0 on a step without),
  ``precondition``, ``comm`` (waiting for K-FAC collectives), ``optimizer``, ``other`` (the rest of
  ``KFACPreconditioner.step``);
  ``bytes_per_step`` {kind: bytes} measured by the engine's counters (rank 0; every rank counts the
  same) and ``bytes_per_step_predicted`` by :mod:`lightning_dpkfac.tools.plan` for the same steps;
  ``state_bytes``: per rank {``factors``, ``decompositions``, ``capture``} (``capture``: the batch-factor
  accumulators held between backward and ``step()``; K-FAC captures no activations beyond them);
  ``peak_rss_bytes`` and ``rss_growth_bytes`` per rank (peak resident memory of the single-strategy
  trial of one cycle and one step, and its growth during that trial); ``load_imbalance`` (max/mean owner
  cost, null for ddp); ``owners``;
  ``blocks`` (with ``--block-dim``): ``max_factor_dim``, ``layers`` (blocks), and ``strategies[s]`` for s in
  dkfac, dpkfac: ``state_bytes`` per rank and ``load_imbalance`` with layers split by
  ``max_factor_dim=--block-dim`` (default ``auto``).
- ``convergence[task]``: ``metric`` ("accuracy" or "bpc") and ``lower_is_better``, its ``target``, ``split``
  ("test" or "val") and ``tuning`` (true under ``--eval-split val``: no goal is judged), ``eval_every`` and
  ``batch_size`` (per rank), ``baselines`` (optimizers of the DDP strategies), ``kfac_optimizer``, ``lrs`` (per
  strategy); ``runs[s]``: per seed {``seed``, ``curve`` [[epochs done (fractional), train_s, metric], ...],
  ``time_to_target_s``, ``epochs_to_target`` (fractional; null if never reached), ``final`` (the last metric),
  ``mean_step_s`` (training seconds per step)}; ``summary[s]``: {``time_to_target_s``, ``epochs_to_target``,
  ``final``, ``mean_step_s``} each {``median``, ``min``, ``max``} over the seeds (a seed that never reached the
  target counts as infinite: null), and ``reached`` ("k/n").
- ``paper_ratios[model]``: dkfac over dpkfac per rank and step, the paper's three figures:
  ``computation`` (factor + inverse + precondition seconds), ``communication`` (bytes), ``kfac_memory``
  (largest per-rank K-FAC state) and ``peak_rss`` (``bench_report.paper_ratios``).
- ``goals``: [{``goal``, ``value``, ``limit``, ``met``}] (see :mod:`lightning_dpkfac.tools.bench_report`).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dpkfac.tools import models
from lightning_dpkfac.tools.bench_report import PHASES, evaluate_goals, paper_ratios, write_markdown, write_plots
from lightning_dpkfac.distributed.comm import KINDS, Communicator
from lightning_dpkfac.distributed.router import counting_all_reduce_hook
from lightning_dpkfac.core.config import FIELDS, KFACConfig, unknown_key_message
from lightning_dpkfac.tools.data import CharLMDataModule, DigitsDataModule, MNIST1DDataModule
from lightning_dpkfac.tools.plan import max_factor_dim_arg, predict_bytes, shapes_of
from lightning_dpkfac.core.preconditioner import KFACPreconditioner
from lightning_dpkfac.tools.ranks import run_ranks

SCHEMA = "lightning_dpkfac.tools.bench/3"
STEP_STRATEGIES = ("ddp", "dkfac", "dpkfac")
#: KFACConfig fields the benchmark sets itself: ``mode`` per strategy, ``lr`` from ``--lr`` or ``--kfac-lr``.
PER_STRATEGY = ("mode", "lr")
#: SGD learning rate of the step-time trials unless ``--lr`` is given.
STEP_LR = 0.1
#: Seconds a trial may take before its ranks count as hung (a ResNet-18 step-time trial takes minutes on CPU).
TRIAL_TIMEOUT_S = 1800.0


# ---------------------------------------------------------------------------------- models and data
def _transformer() -> nn.Module:
    """4 pre-norm encoder blocks, d_model 128, 4 heads, feed-forward 512, over 16 tokens of 32 features."""
    return models.transformer_classifier(seq_len=16, token_dim=32, d_model=128, nhead=4, num_layers=4,
                                         dim_feedforward=512)


@dataclass(frozen=True)
class StepModel:
    """A step-time model: its network, one example's input (the shape of synthetic normal values, or
    "digits"), and its own batch size per rank and repetitions (``--batch-size`` and ``--reps`` override them)."""

    make: Callable[[], nn.Module]
    example: tuple[int, ...] | str
    batch_size: int = 64
    reps: int = 3


STEP_MODELS: dict[str, StepModel] = {
    "mlp": StepModel(lambda: models.mlp(784, (512, 512), 10), (784,)),
    "cnn": StepModel(models.cnn, "digits"),
    "transformer": StepModel(_transformer, (16 * 32,)),
    "cifar_cnn": StepModel(models.cifar_cnn, (3, 32, 32)),
    # Its decomposition steps take many seconds on a CPU: one repetition keeps the default run short.
    "resnet18": StepModel(models.resnet18, (3, 32, 32), batch_size=32, reps=1),
}


def _step_batches(model: str, batch_size: int, rank: int, seed: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches of ``batch_size`` examples for ``rank`` (different on every rank)."""
    source = STEP_MODELS[model].example
    if source == "digits":
        data = DigitsDataModule(batch_size=batch_size, seed=seed)
        data.setup()
        assert data.train_set is not None
        x, y = data.train_set.tensors
        start = rank * batch_size * count
        idx = torch.arange(start, start + batch_size * count) % len(y)
        return [(x[i], y[i]) for i in idx.split(batch_size)]
    g = torch.Generator().manual_seed(1000 * seed + rank)
    assert isinstance(source, tuple)
    return [(torch.randn(batch_size, *source, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(count)]


#: AdamW's decoupled weight decay, as in conf/optimizer/adamw.yaml.
ADAMW_WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Task:
    """A convergence task: its data module (built from the batch size per rank and the seed), network, the
    metric on the held-out split and its target ("accuracy": fraction correct, higher is better; "bpc": bits
    per character, lower is better), epochs and seeds unless the command line sets them, the DDP baselines
    (their optimizers: "sgd", "adam" or "adamw"), the optimizer that dkfac and dpkfac step with, and the learning
    rate of each optimizer ("kfac": under dkfac and dpkfac); ``splits``: the held-out splits of its data."""

    make_data: Callable[[int, int], Any]
    make_net: Callable[[], nn.Module]
    metric: str
    target: float
    epochs: int
    seeds: int
    baselines: tuple[str, ...]
    kfac_optimizer: str
    lrs: dict[str, float]
    splits: tuple[str, ...] = ("test", "val")

    @property
    def strategies(self) -> tuple[str, ...]:
        return (*self.baselines, "dkfac", "dpkfac")

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "bpc"

    def optimizers(self, kfac_optimizer: str | None = None) -> dict[str, str]:
        """Each strategy's optimizer: a baseline's own, and ``kfac_optimizer`` (default: the task's) under
        dkfac and dpkfac."""
        return {s: s if s in self.baselines else kfac_optimizer or self.kfac_optimizer for s in self.strategies}

    def kfac_lr(self, kfac_optimizer: str | None = None) -> float | None:
        """The learning rate under K-FAC with ``kfac_optimizer``: the task's K-FAC lr for its own optimizer,
        the baseline's lr for another the task has as a baseline, else ``None`` (``--kfac-lr`` must say)."""
        if kfac_optimizer in (None, self.kfac_optimizer):
            return self.lrs["kfac"]
        return self.lrs.get(kfac_optimizer)


TASKS: dict[str, Task] = {
    # K-FAC steps with the optimizer of the task's faster baseline, at its lr (docs/benchmarks.md): a user
    # changes the strategy, not the optimizer.
    "digits": Task(lambda batch_size, seed: DigitsDataModule(batch_size=batch_size), models.cnn, "accuracy", 0.97,
                   epochs=20, seeds=10, baselines=("sgd", "adam"), kfac_optimizer="adam",
                   lrs={"sgd": 0.1, "adam": 1e-2, "kfac": 1e-2}),
    "mnist1d": Task(lambda batch_size, seed: MNIST1DDataModule(batch_size=batch_size), models.cnn1d, "accuracy",
                    0.90, epochs=30, seeds=10, baselines=("sgd", "adam"), kfac_optimizer="sgd",
                    lrs={"sgd": 0.1, "adam": 1e-2, "kfac": 0.1}),
    # CharTransformer's defaults are conf/model/char_transformer.yaml's. AdamW is the usual LM baseline, and K-FAC
    # steps with it too (docs/benchmarks.md). 89 steps per epoch and rank on 2 ranks.
    "charlm": Task(lambda batch_size, seed: CharLMDataModule(batch_size=batch_size, seq_len=64, seed=seed),
                   models.CharTransformer, "bpc", 2.1, epochs=6, seeds=5, baselines=("sgd", "adamw"),
                   kfac_optimizer="adamw", lrs={"sgd": 0.1, "adamw": 3e-3, "kfac": 3e-3}, splits=("val",)),
}
#: Examples per rank and step of the convergence tasks, unless ``--batch-size`` is given.
TASK_BATCH_SIZE = 64


def _train_loader(data: Any, batch_size: int, world_size: int, rank: int, seed: int) -> DataLoader:
    """This rank's share of every epoch's training batches (the loader's sampler takes ``set_epoch``)."""
    if isinstance(data, CharLMDataModule):  # its own seeded sampler of random windows, dealt out as Lightning does
        loader = data.train_dataloader()
        sampler: DistributedSampler = DistributedSamplerWrapper(loader.sampler, num_replicas=world_size, rank=rank,
                                                                shuffle=False)
        return DataLoader(loader.dataset, batch_size=batch_size, sampler=sampler)
    sampler = DistributedSampler(data.train_set, world_size, rank, shuffle=True, seed=seed)
    return DataLoader(data.train_set, batch_size=batch_size, sampler=sampler)


def _eval_batches(data: Any, split: str) -> list[tuple[Tensor, Tensor]]:
    """Every example of the held-out ``split`` ("test" or "val"), in batches; the character LM has only "val"."""
    if isinstance(data, CharLMDataModule):
        return list(data.val_dataloader())
    x, y = getattr(data, f"{split}_set").tensors
    return list(zip(x.split(512), y.split(512)))


# ---------------------------------------------------------------------------------- trials
def cycle_steps(config: KFACConfig) -> int:
    """Steps of one K-FAC cycle, ``lcm(factor_update_steps, inv_update_steps)``: the schedule of factor
    updates and decompositions repeats after it, so a window of whole cycles that starts on a multiple
    of it holds every layer's decompositions in proportion."""
    return math.lcm(config.factor_update_steps, config.inv_update_steps)


@dataclass(frozen=True)
class StepTrial:
    """Step-time measurement of ``strategies`` (in ``STEP_STRATEGIES``) on model ``model``, their steps
    interleaved in one process per rank (a single strategy: a memory measurement): ``warmup`` untimed
    steps, then ``steps`` timed ones."""

    model: str
    strategies: tuple[str, ...]
    batch_size: int
    warmup: int
    steps: int
    seed: int
    lr: float
    kfac: KFACConfig


@dataclass(frozen=True)
class TrainTrial:
    """Training of the strategies of task ``task`` (``Task.strategies``) side by side, step by step, from the
    same initial weights and data order, each with its optimizer and learning rate in ``optimizers`` and ``lrs``;
    the task's metric on
    ``split`` ("test" or "val") every ``eval_every`` steps, at the end of every epoch and after the last step
    (``max_steps`` at most, when given)."""

    task: str
    seed: int
    epochs: int
    batch_size: int
    lrs: dict[str, float]
    optimizers: dict[str, str]
    kfac: KFACConfig
    eval_every: int
    split: str
    max_steps: int | None = None


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """One strategy on this rank: its own model (seeded), DDP wrapper with counted gradient traffic,
    engine (dkfac, dpkfac: ``kfac`` with ``mode`` the strategy; any other name: none) and ``optimizer`` with
    ``lr``: "sgd" (momentum 0.9), "adam" or "adamw" (weight decay ``ADAMW_WEIGHT_DECAY``); K-FAC's KL-clip
    reads the same ``lr``."""

    def __init__(self, strategy: str, optimizer: str, make_net: Callable[[], nn.Module], kfac: KFACConfig,
                 lr: float, seed: int, device: torch.device) -> None:
        self.strategy, self.device = strategy, device
        torch.manual_seed(seed)
        self.model = make_net().to(device)
        self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.pre: KFACPreconditioner | None = None
        if strategy in ("dkfac", "dpkfac"):
            overlap = kfac.overlap_decompositions
            if strategy == "dkfac" and overlap is True:  # dpkfac's alone: dkfac keeps its default
                overlap = "auto"
            config = kfac.replace(mode=strategy, lr=lr, overlap_decompositions=overlap)
            self.pre = KFACPreconditioner(self.model, config)
            self.pre.register_ddp_comm_hook(self.ddp)
            self.comm = self.pre.comm
        else:
            self.comm = Communicator()
            self.ddp.register_comm_hook(self.comm, counting_all_reduce_hook)
        params = self.model.parameters()
        self.opt = {"sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
                    "adam": lambda: torch.optim.Adam(params, lr=lr),
                    "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)}[optimizer]()
        self.capture = 0  # largest batch-factor accumulators seen between backward and step(), bytes

    def step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One optimizer step on ``(x, y)``; its wall time and phases (seconds, see ``PHASES``)."""
        def timings() -> dict[str, float]:
            return self.pre.timings if self.pre is not None else {}

        t = timings()
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        # (B, C) class logits, or (B, T, V) next-character logits against (B, T) targets
        F.cross_entropy(self.ddp(x).flatten(0, -2), y.flatten()).backward()
        _sync(self.device)
        t1 = time.perf_counter()
        hooks = timings()
        if self.pre is not None:
            before = self.pre.state_bytes()["factors"]
            held = self.pre.steps > 0  # running factors exist: the difference is the accumulators alone
            self.pre.step()
            if held:
                self.capture = max(self.capture, before - self.pre.state_bytes()["factors"])
        _sync(self.device)
        t2 = time.perf_counter()
        self.opt.step()
        _sync(self.device)
        t3 = time.perf_counter()
        after = timings()
        d = {k: after.get(k, 0.0) - t.get(k, 0.0) for k in ("factor", "inverse", "precondition", "comm")}
        hook_factor = hooks.get("factor", 0.0) - t.get("factor", 0.0)
        return {
            "step": t3 - t0,
            "forward_backward": (t1 - t0) - hook_factor,
            **d,
            "optimizer": t3 - t2,
            "other": (t2 - t1) - (d["factor"] - hook_factor) - d["inverse"] - d["precondition"] - d["comm"],
        }


def _rotated(items: list[Contender], k: int) -> list[Contender]:
    """``items`` starting at position ``k``: no strategy always runs first (or right after another)."""
    k %= len(items)
    return items[k:] + items[:k]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def step_worker(rank: int, world_size: int, trial: StepTrial) -> dict[str, Any]:
    """Time ``trial.steps`` steps after ``trial.warmup``, strategies interleaved step by step; return this
    rank's raw measurements per strategy."""
    _tune_cpu_process()
    rss_start = _rss_bytes()
    device = _device(rank)
    make_net = STEP_MODELS[trial.model].make
    contenders = [Contender(s, "sgd", make_net, trial.kfac, trial.lr, trial.seed, device) for s in trial.strategies]
    # A fresh batch every step: a few batches repeated would be memorised, and the vanishing gradients
    # (denormal floats) would slow every matrix product of the fastest learner many times over on CPU (docs/benchmarks.md).
    count = trial.warmup + trial.steps
    batches = [(x.to(device), y.to(device)) for x, y in _step_batches(trial.model, trial.batch_size, rank, trial.seed, count)]
    per_step: dict[str, list[dict[str, float]]] = {s: [] for s in trial.strategies}
    bytes_start: dict[str, dict[str, float]] = {}
    for step in range(trial.warmup + trial.steps):
        x, y = batches[step % len(batches)]
        for c in _rotated(contenders, step):
            if step == trial.warmup:
                bytes_start[c.strategy] = dict(c.comm.bytes_sent)
            per_step[c.strategy].append(c.step(x, y))
    return {
        "rss_start": rss_start,
        "rss_peak": _peak_rss_bytes(),
        "strategies": {
            c.strategy: {
                "per_step": per_step[c.strategy][trial.warmup:],
                "bytes": {k: (c.comm.bytes_sent.get(k, 0.0) - bytes_start[c.strategy].get(k, 0.0)) / trial.steps
                          for k in KINDS},
                "state": {**(c.pre.state_bytes() if c.pre else {"factors": 0, "decompositions": 0}),
                          "capture": c.capture},
                "load_imbalance": c.pre.load_imbalance() if c.pre else None,
                "owners": c.pre.owners if c.pre else None,
            }
            for c in contenders
        },
    }


def train_worker(rank: int, world_size: int, trial: TrainTrial) -> dict[str, Any]:
    """Train every strategy of the task, step by step in turn; per strategy, the curve [[epochs done (steps /
    steps per epoch), cumulative training seconds, the task's metric on trial.split], ...]."""
    _tune_cpu_process()
    device = _device(rank)
    task = TASKS[trial.task]
    data = task.make_data(trial.batch_size, trial.seed)
    data.setup()
    loader = _train_loader(data, trial.batch_size, world_size, rank, trial.seed)
    held_out = [(x.to(device), y.to(device)) for x, y in _eval_batches(data, trial.split)]
    contenders = [Contender(s, trial.optimizers[s], task.make_net, trial.kfac, trial.lrs[s], trial.seed, device)
                  for s in task.strategies]
    train_s = dict.fromkeys(task.strategies, 0.0)
    curves: dict[str, list[list[float]]] = {s: [] for s in task.strategies}
    step = 0
    for step, (i, x, y) in enumerate(itertools.islice(_epochs(loader, trial.epochs), trial.max_steps), 1):
        x, y = x.to(device), y.to(device)
        for c in _rotated(contenders, i):
            train_s[c.strategy] += c.step(x, y)["step"]
        if step % trial.eval_every == 0 or i == len(loader) - 1 or step == trial.max_steps:
            for c in contenders:
                value = _evaluate(c.model, held_out, task.metric)
                curves[c.strategy].append([step / len(loader), train_s[c.strategy], value])
    return {"curves": curves, "steps": step}


def _epochs(loader: DataLoader, epochs: int) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(index in its epoch, x, y)`` for every batch of ``epochs`` epochs (numbered from 1, as the sampler's seed)."""
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for i, (x, y) in enumerate(loader):
            yield i, x, y


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], metric: str) -> float:
    """``metric`` of ``model`` over ``batches`` (the same on every rank: parameters are identical), in eval mode:
    "accuracy", the fraction of examples whose largest logit is the label; "bpc", the mean cross-entropy per
    character in bits. The model is left in training mode."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x)
        if metric == "accuracy":
            total += int((logits.argmax(-1) == y).sum())
        else:
            total += float(F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")) / math.log(2)
        count += y.numel()
    model.train()
    return total / count


# ---------------------------------------------------------------------------------- rank set-up
def _tune_cpu_process() -> None:
    """What one does for training on CPU, for every strategy alike: flush denormal floats to zero
    (|x| < 1.2e-38, e.g. the gradients of a well-fitted batch, make matrix products and convolutions
    many times slower; the K-FAC engine does it by itself, ``flush_denormal``: here the DDP baselines get it
    too), and keep freed memory in the process (glibc returns large blocks to the OS, whose
    page faults on re-allocation would cost every step: the same effect as running under tcmalloc or
    jemalloc). docs/benchmarks.md has the measurements."""
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


# ---------------------------------------------------------------------------------- aggregation
def _step_spread(values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``median``, ``p95``, ``max``, ``p10`` and ``p90`` of per-step times (percentiles
    interpolated between the measured values, never beyond them)."""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=20, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 19
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p95": q[18],
            "max": ordered[-1], "p10": q[1], "p90": q[17]}


def summarize_step_trials(
    timing: Sequence[tuple[StepTrial, list[dict[str, Any]]]],
    memory: Sequence[tuple[StepTrial, list[dict[str, Any]]]],
    world_size: int,
    blocks: Sequence[tuple[StepTrial, list[dict[str, Any]]]] = (),
) -> dict[str, Any]:
    """The ``step_time`` section of the schema: repetitions pooled per (model, strategy); peak memory
    from the single-strategy ``memory`` trials; K-FAC state with layers split from the ``blocks`` trials."""
    pooled: dict[str, dict[str, dict[str, Any]]] = {}
    for trial, ranks in timing:
        for strategy in trial.strategies:
            entry = pooled.setdefault(trial.model, {}).setdefault(strategy, {"reps": []})
            per_rank = [r["strategies"][strategy] for r in ranks]
            entry["reps"].append([{k: statistics.fmean(r["per_step"][i][k] for r in per_rank)
                                   for k in ("step", *PHASES)} for i in range(trial.steps)])
            entry.update(trial=trial, last=per_rank)
    rss = {(t.model, t.strategies[0]): ranks for t, ranks in memory}
    split_state = {(t.model, t.strategies[0]): (t.kfac.max_factor_dim, ranks) for t, ranks in blocks}
    out: dict[str, Any] = {}
    for model, strategies in pooled.items():
        example = _step_batches(model, 2, 0, 0, count=1)[0][0]
        first = next(iter(strategies.values()))
        kfac = first["trial"].kfac
        shapes = shapes_of(STEP_MODELS[model].make(), kfac.skip_layers, example_input=example,
                           max_factor_dim=kfac.max_factor_dim, world_size=world_size,
                           inv_update_steps=kfac.inv_update_steps)
        steps = {s: [step["step"] for rep in entry["reps"] for step in rep] for s, entry in strategies.items()}
        ddp_mean = statistics.fmean(steps["ddp"]) if "ddp" in steps else None
        ddp_median = statistics.median(steps["ddp"]) if "ddp" in steps else None
        section: dict[str, Any] = {}
        for strategy, entry in strategies.items():
            trial, last = entry["trial"], entry["last"]
            kw = dict(factor_update_steps=kfac.factor_update_steps, inv_update_steps=kfac.inv_update_steps,
                      method=kfac.method, batch_size=trial.batch_size, gather_rows=kfac.gather_rows)
            end = predict_bytes(shapes, world_size, strategy, steps=trial.warmup + trial.steps, **kw)
            begin = predict_bytes(shapes, world_size, strategy, steps=trial.warmup, **kw)
            step = _step_spread(steps[strategy])
            mem = rss.get((model, strategy))
            section[strategy] = {
                "per_step": entry["reps"],
                "step_s": step,
                "ratio_to_ddp": step["mean"] / ddp_mean if ddp_mean else None,
                "median_ratio_to_ddp": step["median"] / ddp_median if ddp_median else None,
                "max_over_median": step["max"] / step["median"],
                "phases_s": {p: statistics.fmean(s[p] for rep in entry["reps"] for s in rep) for p in PHASES},
                "bytes_per_step": last[0]["bytes"],
                "bytes_per_step_predicted": {k: (end[k] - begin[k]) / trial.steps for k in KINDS},
                "state_bytes": [r["state"] for r in last],
                "peak_rss_bytes": [r["rss_peak"] for r in mem] if mem else None,
                "rss_growth_bytes": [r["rss_peak"] - r["rss_start"] for r in mem] if mem else None,
                "load_imbalance": last[0]["load_imbalance"],
                "owners": last[0]["owners"],
            }
        out[model] = {
            "batch_size": first["trial"].batch_size,
            "reps": len(first["reps"]),
            "shapes": {"layers": len(shapes.layers), "covered_params": shapes.covered_params,
                       "other_params": shapes.other_params},
            "strategies": section,
        }
        split = {s: v for (m, s), v in split_state.items() if m == model}
        if split:
            block_dim = next(iter(split.values()))[0]
            out[model]["blocks"] = {
                "max_factor_dim": block_dim,
                "layers": len(shapes.split(block_dim, world_size, kfac.inv_update_steps).layers),
                "strategies": {s: {"state_bytes": [r["strategies"][s]["state"] for r in ranks],
                                   "load_imbalance": ranks[0]["strategies"][s]["load_imbalance"]}
                               for s, (_, ranks) in split.items()},
            }
    return out


def _first_reaching(curve: list[list[float]], target: float, lower_is_better: bool) -> list[float] | None:
    """The first point of ``curve`` whose metric is at or beyond ``target``."""
    return next((point for point in curve if (point[2] <= target if lower_is_better else point[2] >= target)), None)


def _median_spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max where ``None`` (target never reached) counts as infinite (reported as null)."""
    finite = [math.inf if v is None else v for v in values]

    def clean(v: float) -> float | None:
        return None if math.isinf(v) else v

    return {"median": clean(statistics.median(finite)), "min": clean(min(finite)), "max": clean(max(finite))}


def summarize_train_trials(trials: Sequence[tuple[TrainTrial, list[dict[str, Any]]]],
                           tuning: bool = False) -> dict[str, Any]:
    """The ``convergence`` section of the schema (``tuning``: the split is the one for choosing settings)."""
    out: dict[str, Any] = {}
    for trial, ranks in trials:
        task = TASKS[trial.task]
        section = out.setdefault(trial.task, {
            "metric": task.metric, "lower_is_better": task.lower_is_better, "target": task.target,
            "split": trial.split, "tuning": tuning, "eval_every": trial.eval_every, "batch_size": trial.batch_size,
            "baselines": list(task.baselines), "kfac_optimizer": trial.optimizers["dpkfac"], "lrs": trial.lrs,
            "runs": {}, "summary": {}})
        for strategy, curve in ranks[0]["curves"].items():
            hit = _first_reaching(curve, task.target, task.lower_is_better)
            section["runs"].setdefault(strategy, []).append({
                "seed": trial.seed,
                "curve": curve,
                "time_to_target_s": hit[1] if hit else None,
                "epochs_to_target": hit[0] if hit else None,
                "final": curve[-1][2],
                "mean_step_s": curve[-1][1] / ranks[0]["steps"],
            })
    for section in out.values():
        for strategy, runs in section["runs"].items():
            section["summary"][strategy] = {
                "time_to_target_s": _median_spread([r["time_to_target_s"] for r in runs]),
                "epochs_to_target": _median_spread([r["epochs_to_target"] for r in runs]),
                "final": _median_spread([r["final"] for r in runs]),
                "mean_step_s": _median_spread([r["mean_step_s"] for r in runs]),
                "reached": f"{sum(r['time_to_target_s'] is not None for r in runs)}/{len(runs)}",
            }
    return out


# ---------------------------------------------------------------------------------- the CLI
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lightning_dpkfac.bench``."""
    p = argparse.ArgumentParser(prog="python -m lightning_dpkfac.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="output directory")
    p.add_argument("--world-size", type=int, default=2, help="ranks per trial (one GPU each on CUDA)")
    p.add_argument("--models", nargs="*", default=None, choices=list(STEP_MODELS),
                   help="step time: the models timed; None: all (--quick: mlp)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per rank and step of every trial; None: each step-time model's own (" +
                        ", ".join(f"{m} {s.batch_size}" for m, s in STEP_MODELS.items()) +
                        f"), {TASK_BATCH_SIZE} for the convergence tasks")
    p.add_argument("--kfac", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="kfac_overrides",
                   help="K-FAC settings of every trial where they differ from the library defaults, KFACConfig(): "
                        "any field but mode and lr; VALUE an int, a float, None, True, False or a string "
                        "(overlap_decompositions=True is dpkfac's: dkfac keeps 'auto')")
    p.add_argument("--warmup-cycles", type=int, default=1,
                   help="step time: untimed K-FAC cycles (lcm(factor_update_steps, inv_update_steps) steps each) "
                        "before the timed ones; >= 1, since step 0 decomposes every layer")
    p.add_argument("--cycles", type=int, default=2, help="step time: timed K-FAC cycles per repetition")
    p.add_argument("--reps", type=int, default=None,
                   help="step time: repetitions, each in fresh processes; None: each model's own (" +
                        ", ".join(f"{m} {s.reps}" for m, s in STEP_MODELS.items()) + ")")
    p.add_argument("--block-dim", type=block_dim_arg, default="auto",
                   help="also measure dkfac's and dpkfac's K-FAC state with max_factor_dim=BLOCK_DIM ('auto': split "
                        "only the layers above the ranks' fair share; 0: not; skipped under --kfac max_factor_dim=...)")
    p.add_argument("--tasks", nargs="*", default=None, choices=list(TASKS),
                   help="convergence: the tasks; None: all (--quick: digits)")
    p.add_argument("--seeds", nargs="*", type=int, default=None,
                   help="convergence: one run per seed (its weights and data order); None: seeds 0, 1, ... as many as "
                        "the task's own (" + ", ".join(f"{t} {task.seeds}" for t, task in TASKS.items()) + "); 97%% on "
                        "360 test digits sits on every method's plateau, so a median needs many")
    p.add_argument("--epochs", type=int, default=None,
                   help="convergence: epochs per task; None: "
                        + ", ".join(f"{t} {task.epochs}" for t, task in TASKS.items()))
    p.add_argument("--max-steps", type=int, default=None,
                   help="convergence: stop every run after this many steps (a smoke run); None: all epochs")
    p.add_argument("--lr", type=float, default=None,
                   help=f"SGD learning rate of the step-time trials (default {STEP_LR}) and of DDP-SGD; None: each "
                        "task's own (" +
                        ", ".join(f"{t} {task.lrs['sgd']:g}" for t, task in TASKS.items()) + ")")
    p.add_argument("--adam-lr", type=float, default=None,
                   help="learning rate of DDP-Adam and DDP-AdamW (convergence); None: each task's own (" +
                        ", ".join(f"{t} {task.lrs[task.baselines[-1]]:g}" for t, task in TASKS.items()) + ")")
    p.add_argument("--kfac-lr", type=float, default=None,
                   help="learning rate of dkfac and dpkfac (convergence; the optimizer is each task's own, "
                        "SGD with momentum or AdamW); None: each task's own (" +
                        ", ".join(f"{t} {task.lrs['kfac']:g}" for t, task in TASKS.items()) + ")")
    p.add_argument("--kfac-optimizer", choices=["sgd", "adam", "adamw"], default=None,
                   help="the optimizer under dkfac and dpkfac (convergence); None: each task's own (" +
                        ", ".join(f"{t} {task.kfac_optimizer}" for t, task in TASKS.items()) + "); its lr: "
                        "--kfac-lr, else the task's for that optimizer")
    p.add_argument("--eval-every", type=int, default=5, help="convergence: evaluate every this many steps (and at "
                   "the end of every epoch)")
    p.add_argument("--eval-split", choices=["test", "val"], default="test",
                   help="convergence: the split whose accuracy is reported (val: for choosing hyper-parameters)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run for CI: one warm-up and one timed cycle, one repetition, one seed, 3 epochs, "
                        "mlp unless --models is given, digits unless --tasks is given, --kfac inv_update_steps=2 unless "
                        "given")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked as the engine would check it, before any trial starts."""
    p = build_parser()
    args = p.parse_args(argv)
    if torch.cuda.is_available() and args.world_size > torch.cuda.device_count():
        p.error(f"--world-size={args.world_size} needs one GPU per rank; found {torch.cuda.device_count()}.")
    for name in ("eval_every", "warmup_cycles", "cycles", "batch_size", "reps", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}={value} is invalid: it must be >= 1.")
    try:
        args.kfac_overrides = parse_kfac_overrides(args.kfac_overrides)
        if args.quick:
            args.kfac_overrides.setdefault("inv_update_steps", 2)
        kfac_config(args)  # the engine's own checks
    except ValueError as error:
        p.error(f"argument --kfac: {error}")
    if args.models is None:
        args.models = ["mlp"] if args.quick else list(STEP_MODELS)
    if args.tasks is None:
        args.tasks = ["digits"] if args.quick else list(TASKS)
    if args.kfac_lr is None:
        for t in args.tasks:
            if TASKS[t].kfac_lr(args.kfac_optimizer) is None:
                p.error(f"--kfac-optimizer={args.kfac_optimizer}: task {t} has no learning rate for it; give --kfac-lr.")
    if args.quick:
        args.warmup_cycles, args.cycles, args.reps, args.seeds = 1, 1, 1, (args.seeds or [0])[:1]
        args.epochs = args.epochs or 3
    return args


def block_dim_arg(text: str) -> int | str:
    """``--block-dim``: 0 (no block trials), or a ``KFACConfig.max_factor_dim`` value."""
    return 0 if text == "0" else max_factor_dim_arg(text)


def parse_kfac_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["inv_update_steps=2", "method=inverse", ...]`` (``--kfac``) as ``{"inv_update_steps": 2, "method":
    "inverse", ...}``: keys are :class:`KFACConfig` fields but ``mode`` and ``lr``; a value is read as an int,
    a float, ``None``, ``True``, ``False``, or else kept as a string. Raises ``ValueError`` naming an unknown
    or per-strategy key, or an item without ``=`` (the values are the engine's to check)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"'{item}' is not KEY=VALUE")
        if key in PER_STRATEGY:
            raise ValueError(f"'{key}' is set by the benchmark for each strategy")
        if key not in FIELDS:
            raise ValueError(unknown_key_message(key, FIELDS, "KFACConfig"))
        out[key] = _value(text)
    return out


def _value(text: str) -> Any:
    """``text`` as an int, a float, None, True or False where it reads as one; else ``text`` itself."""
    constants = {"None": None, "True": True, "False": False}
    if text in constants:
        return constants[text]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def task_seeds(task: str, seeds: list[int] | None) -> Sequence[int]:
    """``--seeds``, or seeds 0, 1, ... as many as the task's own."""
    return seeds if seeds is not None else range(TASKS[task].seeds)


def train_lrs(task: Task, args: argparse.Namespace) -> dict[str, float]:
    """Each strategy's learning rate on ``task``: the task's own unless ``--lr`` (DDP-SGD), ``--adam-lr``
    (DDP-Adam, DDP-AdamW) or ``--kfac-lr`` (dkfac, dpkfac) sets it."""
    own = {**task.lrs, "dkfac": task.kfac_lr(args.kfac_optimizer), "dpkfac": task.kfac_lr(args.kfac_optimizer)}
    given = {"sgd": args.lr, "adam": args.adam_lr, "adamw": args.adam_lr, "dkfac": args.kfac_lr, "dpkfac": args.kfac_lr}
    return {s: own[s] if given[s] is None else given[s] for s in task.strategies}


def held_out_split(task: str, eval_split: str) -> str:
    """The split a task reports: ``--eval-split``, but "val" for the character LM, which has no test text."""
    return eval_split if eval_split in TASKS[task].splits else "val"


def kfac_config(args: argparse.Namespace) -> KFACConfig:
    """The K-FAC settings of every trial: the library defaults with ``--kfac`` applied."""
    return KFACConfig().replace(**args.kfac_overrides)


def kfac_settings(overrides: dict[str, Any]) -> str:
    """How ``results.json`` and ``results.md`` name the K-FAC settings in force."""
    given = " ".join(f"{k}={v}" for k, v in overrides.items())
    return f"library defaults with --kfac {given}" if given else "library defaults"


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every trial and write the outputs; return the results."""
    kfac = kfac_config(args)
    cycle = cycle_steps(kfac)
    # Unless --kfac sets max_factor_dim for every trial, K-FAC state is also measured with blocks.
    splits = args.block_dim and "max_factor_dim" not in args.kfac_overrides
    kfac_blocks = kfac.replace(max_factor_dim=args.block_dim) if splits else None
    load_start = os.getloadavg()

    def trials(items: list[Any], worker: Callable[..., Any], what: Callable[[Any], str]) -> list[tuple[Any, Any]]:
        done = []
        for i, trial in enumerate(items):
            log(f"[{i + 1}/{len(items)}] {what(trial)}")
            done.append((trial, run_ranks(worker, args.world_size, trial, timeout=TRIAL_TIMEOUT_S)))
        return done

    def batch_size(model: str) -> int:
        return args.batch_size or STEP_MODELS[model].batch_size

    step_lr = STEP_LR if args.lr is None else args.lr
    timing = trials([StepTrial(m, STEP_STRATEGIES, batch_size(m), args.warmup_cycles * cycle, args.cycles * cycle,
                               rep, step_lr, kfac)
                     for m in args.models for rep in range(args.reps or STEP_MODELS[m].reps)],
                    step_worker, lambda t: f"step time: {t.model}, repetition {t.seed}")
    # Peak memory needs a process per strategy; one cycle and one step hold every decomposition and the
    # factor updates around them.
    memory = trials([StepTrial(m, (s,), batch_size(m), 0, cycle + 1, 0, step_lr, kfac)
                     for m in args.models for s in STEP_STRATEGIES],
                    step_worker, lambda t: f"peak memory: {t.model}, {t.strategies[0]}")
    # K-FAC state with layers split by max_factor_dim=--block-dim: how far blocks balance memory.
    blocks = trials([StepTrial(m, (s,), batch_size(m), 0, cycle + 1, 0, step_lr, kfac_blocks)
                     for m in args.models for s in ("dkfac", "dpkfac")] if kfac_blocks is not None else [],
                    step_worker, lambda t: f"K-FAC state with max_factor_dim={t.kfac.max_factor_dim}: "
                                           f"{t.model}, {t.strategies[0]}")
    training = trials([TrainTrial(t, seed, args.epochs or TASKS[t].epochs, args.batch_size or TASK_BATCH_SIZE,
                                  train_lrs(TASKS[t], args), TASKS[t].optimizers(args.kfac_optimizer), kfac,
                                  args.eval_every, held_out_split(t, args.eval_split),
                                  args.max_steps)
                       for t in args.tasks for seed in task_seeds(t, args.seeds)],
                      train_worker, lambda t: f"convergence: {t.task}, seed {t.seed}")
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "backend": "nccl" if torch.cuda.is_available() else "gloo",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "world_size": args.world_size,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "kfac": {k: v for k, v in asdict(kfac).items() if k not in PER_STRATEGY},
            "kfac_settings": kfac_settings(args.kfac_overrides),
            "cycle_steps": cycle,
        },
        "step_time": summarize_step_trials(timing, memory, args.world_size, blocks),
        "convergence": summarize_train_trials(training, tuning=args.eval_split == "val"),
    }
    results["paper_ratios"] = {name: r for name, model in results["step_time"].items()
                               if (r := paper_ratios(model)) is not None}
    results["goals"] = evaluate_goals(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, args.out / "results.md")
    write_plots(results, args.out)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md and plots in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
