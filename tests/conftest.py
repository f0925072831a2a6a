"""Shared fixtures and helpers: spawning real gloo process groups for multi-rank tests, comparing ranks,
and launching the Lightning scripts of ``tests/scripts`` as subprocesses.

The test files sit in folders that mirror the package (``tests/core``, ``tests/distributed``, ...) and import
this module (``from conftest import ...``) and the dense reference (``import kfac_reference as ref``) by
name: pytest puts ``tests/`` on ``sys.path`` when it loads this file (its default "prepend" import mode),
so test file names must be unique across the folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_dpkfac.tools.ranks import run_ranks

#: The repository root (where subprocesses run) and the scripts that the Lightning tests launch.
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


@pytest.fixture
def ranks() -> Callable[..., list[Any]]:
    """``ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on real gloo ranks (forked,
    results ordered by rank; ``lightning_dpkfac.tools.ranks.run_ranks``)."""
    return partial(run_ranks, backend="gloo")


def identical_on_all_ranks(values: nn.Module | torch.Tensor, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``values`` (a module's parameters, or one tensor) are bit-for-bit the same on every rank of
    ``group`` (default: all ranks). Collective: call it on every rank of ``group``, inside a rank function."""
    tensors = list(values.parameters()) if isinstance(values, nn.Module) else [values]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


# Variables from which Lightning, torch.distributed or a cluster environment (SLURM, torchrun) would
# infer a rank or a rendezvous. A 2-rank example run as a subprocess must start without any of them.
_LAUNCH_VARS = ("LOCAL_RANK", "RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_PREFIXES = ("SLURM_", "TORCHELASTIC_")


def launch_env() -> dict[str, str]:
    """A copy of ``os.environ`` without stray launcher variables (``SLURM_*``, ``RANK``, ``MASTER_PORT``...)."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCH_VARS and not key.startswith(_LAUNCH_PREFIXES)
    }


@pytest.fixture
def clean_env() -> dict[str, str]:
    """:func:`launch_env` as a fixture."""
    return launch_env()


def run_command(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (which may launch ranks) in a new session; its exit code and output (stdout and stderr
    together). Past ``timeout`` seconds the whole session, ranks included, is killed and the test fails."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


@pytest.fixture
def run_script() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_command` as a fixture: ``run_script(cmd, env, cwd, timeout)``."""
    return run_command


# ------------------------------------------------------------------ tests/scripts/fit_digits.py
FIT_DIGITS = SCRIPTS / "fit_digits.py"
#: Optimizer steps per epoch of fit_digits.py by device count: 1257 training digits, 32 per rank and step.
STEPS_PER_EPOCH = {1: 40, 2: 20, 3: 14}


def run_fit_digits(*args: str, timeout: float = 120) -> tuple[int, str, float]:
    """Run ``tests/scripts/fit_digits.py`` with ``args`` from a clean environment (Lightning's launcher starts
    the other ranks); its exit code, its output (every rank's) and the seconds it took."""
    start = time.perf_counter()
    result = run_command([sys.executable, str(FIT_DIGITS), *args], launch_env(), ROOT, timeout)
    return result.returncode, result.stdout, time.perf_counter() - start


def fit_digits(out_dir: Path, name: str, *args: str) -> dict[str, Any]:
    """A run of ``fit_digits.py`` that must succeed, checkpointing into ``out_dir/name``: what rank 0 wrote."""
    code, output, _ = run_fit_digits("--ckpt-dir", str(out_dir / name), "--out", str(out_dir / f"{name}.pt"), *args)
    assert code == 0, output[-3000:]
    return torch.load(out_dir / f"{name}.pt", weights_only=False)


def digits_checkpoint(out_dir: Path, name: str, epoch: int, devices: int) -> Path:
    """The checkpoint that run ``name`` of ``fit_digits.py`` on ``devices`` ranks wrote after ``epoch``."""
    return out_dir / name / f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH[devices]}.ckpt"


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted 3-epoch dpkfac fit of the digits MLP on 2 ranks, checkpointing every epoch (run
    ``full`` in the returned folder): the checkpoint tests resume from it, the feature tests compare other
    layouts with it, the strategy tests read what it left behind. Shared by the whole session: each
    Lightning run costs seconds of process start-up."""
    out_dir = tmp_path_factory.mktemp("two_rank_run")
    return out_dir, fit_digits(out_dir, "full", "--devices", "2", "--epochs", "3")


#: A 256-wide hidden layer on 8 examples per rank (its rows are far smaller than its gradient: dpkfac gathers
#: them), in float64, for 2 epochs of 20 steps on 2 ranks.
WIDE_ROWS = ("--devices", "2", "--precision", "64-true", "--hidden", "256", "--batch-size", "8", "--epochs", "2",
             "--limit-batches", "20")


@pytest.fixture(scope="session")
def wide_rows_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A :data:`WIDE_ROWS` run (``full`` in the returned folder, checkpointing every epoch), shared by the
    row-gathering tests of the checkpoint and feature files."""
    out_dir = tmp_path_factory.mktemp("wide_rows_run")
    return out_dir, fit_digits(out_dir, "full", *WIDE_ROWS)
