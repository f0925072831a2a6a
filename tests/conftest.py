"""Shared fixtures: spawning real gloo process groups for multi-rank tests."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lightning_dpkfac.tools.ranks import run_ranks


@pytest.fixture
def ranks() -> Callable[..., list[Any]]:
    """``ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on real gloo ranks (forked,
    results ordered by rank; ``lightning_dpkfac.tools.ranks.run_ranks``)."""
    return partial(run_ranks, backend="gloo")


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
