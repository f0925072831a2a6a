"""Numerical faults: the retry ladder of a decomposition, the per-layer fault counters, steps whose averaged
gradient is non-finite, and the error that ends training when either keeps happening.

Every decision here is taken from values that are the same on every rank (the flags the owners send with
their payloads, and gradients DDP all-reduced), so all ranks count alike and raise at the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_dpkfac.core.decomposition import Decomposition
from lightning_dpkfac.core.payload import Flag

log = logging.getLogger("lightning_dpkfac")


class KFACNumericalError(RuntimeError):
    """A layer's K-FAC state, or the averaged gradient, was non-finite on ``max_consecutive_faults`` steps
    in a row."""


def decompose_with_retries(method: Decomposition, A: Tensor, G: Tensor, dtype: torch.dtype,
                           damping: float) -> tuple[Tensor, ...] | None:
    """``method.compute`` of the running factors, in ``dtype``; on failure (an exception or a non-finite
    result) retried in float64, then with 10x damping added, and otherwise ``None`` (the caller keeps the
    last good decomposition). Results are contiguous like a broadcast copy: in dkfac every rank must
    multiply with the same memory layout (eigh returns column-major), or their results differ in the last
    bits."""
    for attempt_dtype, jitter in ((dtype, 0.0), (torch.float64, 0.0), (torch.float64, 10 * damping)):
        try:
            result = method.compute(A.to(attempt_dtype), G.to(attempt_dtype), damping, jitter)
        except (RuntimeError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if all(bool(torch.isfinite(t.sum())) for t in result):
            return tuple(t.to(dtype).contiguous() for t in result)
    log.warning("K-FAC decomposition failed (%s); keeping the last good one", method.name)
    return None


class DivergenceWatch:
    """Notices, from the training loss, that training diverges under K-FAC: once the loss's running average
    (weight ``1 - decay`` on the newest loss) has risen to ``factor`` times its lowest value, at least
    ``patience`` steps after that lowest value (at once if it rose ``explosion`` times), :meth:`observe`
    returns a message (once) naming the rise and the settings that help. A non-finite loss is left to the
    non-finite-gradient path."""

    def __init__(self, factor: float = 2.0, patience: int = 10, decay: float = 0.9, explosion: float = 100.0) -> None:
        self.factor, self.patience, self.decay, self.explosion = factor, patience, decay, explosion
        self._average: float | None = None
        self._best: tuple[float, int] | None = None  # the lowest running average, and its step
        self._said = False

    def observe(self, step: int, loss: float, damping: float, kl_clip: float | None) -> str | None:
        """Take step ``step``'s training loss; a message the first time the loss has diverged, else ``None``."""
        if self._said or not math.isfinite(loss):
            return None
        self._average = loss if self._average is None else self.decay * self._average + (1 - self.decay) * loss
        if self._best is None or self._average < self._best[0]:
            self._best = (self._average, step)
            return None
        best, at = self._best
        risen = self._average >= self.factor * best and step - at >= self.patience
        if best <= 0 or not (risen or self._average >= self.explosion * best):
            return None
        self._said = True
        return (f"K-FAC: the training loss (running average) rose from {best:.4g} at step {at} to "
                f"{self._average:.4g} at step {step}: training is diverging, the preconditioned updates are too "
                f"large for this model. Fix: raise damping (now {damping:g}), lower the learning rate, or lower "
                f"kl_clip (now {kl_clip}); strategy='ddp' trains without K-FAC.")


class FaultCounter:
    """Counts, from the shared flags of each step, the layers with a fault and the steps whose update was
    skipped, and raises :class:`KFACNumericalError` once a layer, or the gradient, stays faulty for
    ``limit`` steps in a row.

    Args:
        names: the layers' names, in the engine's order.
        limit: ``KFACConfig.max_consecutive_faults``.
        rank: this process's rank in the group (rank 0 logs).
    """

    def __init__(self, names: Sequence[str], limit: int, rank: int) -> None:
        self.names, self.limit, self.rank = list(names), limit, rank
        self.faults_total = 0  # layer-steps with a numerical fault
        self.last_step_faults = 0
        self.skipped_steps = 0  # steps whose averaged gradient was non-finite: no update applied
        self.last_step_skipped = False
        self._consecutive = [0] * len(self.names)
        self._consecutive_skips = 0
        self._nonfinite: list[str] = []  # where the last skipped step's gradient was non-finite

    def record(self, step: int, flags: Sequence[Flag], others_finite: bool) -> bool:
        """Count step ``step``; returns whether its update must be skipped: its averaged gradient is
        non-finite, in a layer or, where ``others_finite`` is false, among the gradients outside the K-FAC
        layers. The data is at fault then, not the layers, whose counters stay as they are."""
        self._nonfinite = [name for name, flag in zip(self.names, flags) if flag is Flag.NONFINITE_GRADIENT]
        if not others_finite:
            self._nonfinite.append("parameters outside the K-FAC layers")
        self.last_step_skipped = bool(self._nonfinite)
        if self.last_step_skipped:
            self.last_step_faults = 0
            self.skipped_steps += 1
            self._consecutive_skips += 1
            if self.rank == 0:
                log.warning("K-FAC step %d: the averaged gradient is non-finite (inf/NaN) in %s; the update is "
                            "skipped on every rank (%d in a row; training stops at max_consecutive_faults=%d)",
                            step, ", ".join(self._nonfinite), self._consecutive_skips, self.limit)
            return True
        self._consecutive_skips = 0
        faulty = [flag.faulty for flag in flags]
        self.last_step_faults = sum(faulty)
        self.faults_total += self.last_step_faults
        self._consecutive = [n + 1 if bad else 0 for n, bad in zip(self._consecutive, faulty)]
        return False

    def raise_if_failing(self, step: int, damping: float) -> None:
        """Raise :class:`KFACNumericalError` once the gradient, or a layer, has been faulty on ``limit``
        steps in a row (call after :meth:`record`)."""
        if self._consecutive_skips >= self.limit:
            raise KFACNumericalError(
                f"The averaged gradient was non-finite (inf/NaN) on {self.limit} consecutive steps "
                f"({step - self._consecutive_skips + 1} to {step}), in {', '.join(self._nonfinite)} at the last "
                "one. No rank applied those updates, so the weights are still finite. The likely cause is the "
                "data: an inf/NaN in the inputs or targets of those batches (check them with torch.isfinite), or "
                "a loss that overflows (lower the learning rate). Raise max_consecutive_faults to tolerate longer "
                "runs of bad batches."
            )
        failing = [name for name, n in zip(self.names, self._consecutive) if n >= self.limit]
        if failing:
            raise KFACNumericalError(
                f"K-FAC state of layer(s) {failing} was non-finite on {self.limit} consecutive steps (step "
                f"{step}). The inputs or gradients likely contain inf/NaN, or the factors are too "
                f"ill-conditioned: check the data, lower the learning rate, raise damping (now {damping}), or "
                "raise max_consecutive_faults."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"faults_total": self.faults_total,
                "consecutive_faults": dict(zip(self.names, self._consecutive)),
                "skipped_steps": self.skipped_steps, "consecutive_skips": self._consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters (layers missing from ``state`` start at 0)."""
        self.faults_total = int(state["faults_total"])
        self._consecutive = [int(state["consecutive_faults"].get(name, 0)) for name in self.names]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
