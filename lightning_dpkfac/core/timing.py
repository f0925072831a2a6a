"""Host time per phase of the K-FAC step (the logged ``kfac/time_<phase>`` metrics), and the one-time report
of a slow decomposition step."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("lightning_dpkfac")

PHASES = ("factor", "inverse", "precondition", "comm")

#: A first decomposition step slower than this (seconds, on one rank) is reported once, naming its largest
#: layers; factors of at least ``LARGE_FACTOR`` rows are announced before it starts.
SLOW_DECOMPOSITION_S = 1.0
LARGE_FACTOR = 2048


class PhaseTimer:
    """Cumulative seconds per phase (:data:`PHASES`) of this rank: ``with timer("factor"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] += time.perf_counter() - start


class DecompositionReport:
    """Says once, on each rank, when decompositions may stall training: before the first one, if a factor
    has :data:`LARGE_FACTOR` rows or more; after it, if it took :data:`SLOW_DECOMPOSITION_S` or longer,
    naming the layers that dominate it, their factor sizes and the settings that help."""

    def __init__(self, rank: int, method: str, inv_update_steps: int) -> None:
        self.rank, self.method, self.inv_update_steps = rank, method, inv_update_steps
        self.pending = True  # the first decomposition step is still to come

    def announce(self, largest: str, sizes: str, largest_dim: int) -> None:
        if largest_dim >= LARGE_FACTOR:
            log.warning("K-FAC rank %d: decomposing factors of up to %s (%s) now and every inv_update_steps=%d "
                        "steps; this can take minutes on a CPU", self.rank, sizes, largest, self.inv_update_steps)

    def report(self, step: int, seconds: dict[str, tuple[str, float]]) -> None:
        """``seconds``: per layer, its factor sizes and its decomposition time."""
        self.pending = False
        total = sum(s for _, s in seconds.values())
        if total < SLOW_DECOMPOSITION_S:
            return
        top = sorted(seconds, key=lambda name: seconds[name][1], reverse=True)[:3]
        log.warning(
            "K-FAC rank %d: the %s decompositions took %.1f s at step %d, and recur every inv_update_steps=%d "
            "steps. Largest: %s. Their cost grows with the cube of the factor size: max_factor_dim='auto' (or "
            "a number such as 1024) splits wide layers into blocks, method='inverse' costs a fraction of "
            "'eigen', and a larger inv_update_steps decomposes less often.",
            self.rank, self.method, total, step, self.inv_update_steps,
            "; ".join(f"{name} ({seconds[name][0]}) {seconds[name][1]:.1f} s" for name in top))
