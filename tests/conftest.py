"""Shared fixtures: spawning real gloo process groups for multi-rank tests."""

from __future__ import annotations

import io
import os
import queue as queue_module
import signal
import socket
import subprocess
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # 2 cores; also avoids OpenMP stalls in forked ranks
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        dist.barrier()
        # Bytes, not objects: a tensor put on a multiprocessing queue is shared through a handle that
        # dies with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, whatever it is
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes joined by a gloo group.

    Returns each rank's return value (picklable), ordered by rank. Raises with the failing rank's
    traceback, or names the ranks that hung past ``timeout`` seconds (and kills them).
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                hung = [r for r in range(world_size) if r not in results]
                raise TimeoutError(f"ranks {hung} gave no result within {timeout} s") from None
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


@pytest.fixture
def ranks() -> Callable[..., list[Any]]:
    """``ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on real gloo ranks."""
    return run_ranks


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
