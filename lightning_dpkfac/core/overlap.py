"""Decompositions off the critical path (``KFACConfig.overlap_decompositions``).

A slot's decompositions start at the end of step k on one worker thread, on CUDA on a side stream that
first waits for the step's factors, and are installed at the start of step k+1: the next forward and
backward pass run meanwhile, and step k preconditions with the layers' previous decompositions (one step
older; every decomposition is already reused for ``inv_update_steps`` steps). Step 0 decomposes at once:
there is no older decomposition to use.

Only dpkfac overlaps: its owners never communicate a decomposition, so the work is local to the rank.
dkfac broadcasts each decomposition, a collective that every rank would wait on anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

#: Per layer index, its new decomposition's tensors, or ``None`` where it failed.
Results = dict[int, tuple[Tensor, ...] | None]


def overlaps(setting: bool | str, mode: str, device: torch.device) -> bool:
    """Whether decompositions run on the worker (``KFACConfig.overlap_decompositions``): in dpkfac, on CUDA
    under ``"auto"`` and on any device under ``True``."""
    return mode == "dpkfac" and (setting is True or (setting == "auto" and device.type == "cuda"))


class PendingDecompositions:
    """Decompositions being computed on the worker; :meth:`wait` hands them to the caller's stream."""

    def __init__(self, future: Future[tuple[Results, torch.cuda.Event | None]], device: torch.device) -> None:
        self._future, self._device = future, device

    def wait(self) -> Results:
        """Block until the worker is done; on CUDA, order the current stream after its kernels."""
        results, done = self._future.result()
        if done is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(done)
            for result in results.values():
                for t in result or ():
                    t.record_stream(stream)  # the caching allocator must not reuse it while this stream reads it
        return results


class DecompositionWorker:
    """One background thread (on CUDA, with one side stream of ``device``) that runs decomposition work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfac-decompose")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, work: Callable[[], Results]) -> PendingDecompositions:
        """Run ``work`` on the worker, after everything queued so far on the current stream (the factors)."""
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))

        def run() -> tuple[Results, torch.cuda.Event | None]:
            with torch.no_grad(), self._side_stream(ready):  # grad mode and the current stream are per thread
                results = work()
                if self.stream is None:
                    return results, None
                done = torch.cuda.Event()
                done.record(self.stream)
                return results, done

        return PendingDecompositions(self._executor.submit(run), self.device)

    @contextmanager
    def _side_stream(self, ready: torch.cuda.Event | None) -> Iterator[None]:
        with ExitStack() as stack:
            if self.stream is not None:
                assert ready is not None
                stack.enter_context(torch.cuda.device(self.device))
                stack.enter_context(torch.cuda.stream(self.stream))
                self.stream.wait_event(ready)
            yield

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
