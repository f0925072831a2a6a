"""Run a function on N fresh local ranks joined by a process group: the benchmark's and the tests' spawner.

Ranks are forked (gloo) or spawned (NCCL: CUDA cannot be forked), use one thread each, and return their
results through ``torch.save`` bytes: a tensor put on a multiprocessing queue is shared through a
handle that dies with its process.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, timeout: float, fn: Callable[..., Any],
               args: tuple, queue: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # one core per rank; also avoids OpenMP stalls in forked ranks
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        result = fn(rank, world_size, *args)
        dist.barrier()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure to the parent, whatever it is
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              backend: str | None = None) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` fresh ranks; their results, ordered by rank.

    ``backend``: "gloo" or "nccl" (one GPU per rank); default NCCL when CUDA is available. Raises
    ``RuntimeError`` with the failing rank's traceback, or ``TimeoutError`` naming the ranks that gave no
    result within ``timeout`` seconds (and kills them).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, backend, timeout, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                hung = [r for r in range(world_size) if r not in results]
                raise TimeoutError(f"ranks {hung} of {fn.__name__}{args} gave no result within {timeout} s") from None
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {fn.__name__}{args} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
