"""The one typed configuration of K-FAC, shared by the engine, the Lightning strategy and Hydra.

Every field is validated when the dataclass is built, so a bad value fails before any rank starts work.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

METHODS = ("eigen", "inverse")
MODES = ("dpkfac", "dkfac")

#: Fields that may also be given as a callable ``step -> value`` (a schedule). Hydra only ever passes
#: numbers: the annotations below stay plain ``float`` so that OmegaConf can type-check them.
SCHEDULABLE = ("damping", "factor_decay", "kl_clip", "lr")


@dataclass
class KFACConfig:
    """Hyper-parameters of (DP-)K-FAC. The defaults were chosen by a study across tasks, world sizes and batch
    sizes (docs/defaults.md): damped inverses, factors every 5 steps, decompositions every 20, factors wider
    than 1024 cut into blocks.

    Attributes:
        damping: Tikhonov damping added to the factors (inverse method) or to the eigenvalue products
            (eigen method); > 0. Factors estimate the per-example Fisher, so it does not depend on the
            batch size. The inverse method damps each factor, so where both factors are small the Kronecker
            product gets about ``damping^2``: use about the square root of an eigen damping. (default: 0.1)
        factor_decay: running-average weight of the *old* factors, in [0, 1):
            ``F <- decay * F + (1 - decay) * F_new``, at every factor update; 0 keeps only the newest.
            (default: 0.8)
        kl_clip: KL-clip bound (> 0) on ``peak_lr^2 * sum(P * grad)``, ``peak_lr`` the largest lr so far: the
            preconditioned gradient is scaled by ``min(1, sqrt(kl_clip / (peak_lr^2 sum(P * grad))))``, so
            the step is bounded as at the peak lr and follows the lr schedule below it; ``None`` disables
            clipping. (default: 1e-3)
        lr: learning rate used by KL-clip; ``None`` means "read it from the optimizer" (the Lightning
            strategy does) or pass it to ``KFACPreconditioner.step(lr=...)``. (default: None)
        factor_update_steps: build new factors every this many optimizer steps; >= 1. (default: 5)
        inv_update_steps: decompose (eigendecompose or invert) each layer's factors once every this many
            steps, the layers spread over the interval so that no step carries all decompositions (every
            layer at step 0; ``distributed.assignment.decomposition_slots``); >= 1. Slots fall on factor
            updates where they can; a decomposition between factor updates uses the latest running
            factors. (default: 20)
        method: ``"eigen"`` (eigendecomposition, damping on the Kronecker eigenvalues) or ``"inverse"``
            (damped inverse of each factor: about a third of eigen's cost per step). (default: "inverse")
        mode: ``"dpkfac"`` (each layer's factors built and kept by its owner only, from its local batch)
            or ``"dkfac"`` (every rank builds every factor, factors all-reduced: the D-KFAC baseline).
            (default: "dpkfac")
        skip_layers: module names (as in ``model.named_modules()``) or class names whose layers keep
            their plain gradient. (default: [])
        kfac_bucket_cap_mb: size cap in MiB of one bucket of K-FAC's own collectives (preconditioned gradients,
            factors, decompositions); > 0. DDP's gradient buckets are ``DistributedDataParallel``'s own
            ``bucket_cap_mb``, which the strategy passes on. (default: 25.0)
        gather_rows: dpkfac with the engine's DDP hook only: for a Linear layer whose input and output rows
            of all ranks are fewer numbers than its gradient (small batches, wide layers), the owner
            gathers the rows and computes the averaged gradient ``g^T a`` and its preconditioning in
            factored form (fewer bytes and flops; decided per layer at the first step, see
            ``lightning_dpkfac.distributed.rows``). (default: True)
        max_factor_dim: split a layer whose A or G is larger than this into a grid of blocks with factors of
            at most this size, each preconditioned with the diagonal blocks of the layer's factors and owned
            on its own (:mod:`lightning_dpkfac.core.blocks`): block-diagonal K-FAC, an approximation that lets
            the ranks share one wide layer's memory and decomposition work; ``None`` never splits; >= 2. ``"auto"`` splits
            only the layers too costly for any owner map to balance over the ranks (cost above the total
            over the world size), each into as few blocks as it takes: whole
            layers on one rank, and a split that depends on the world size (a checkpoint resumes where
            each new block lies inside a saved layer or block). The default bounds the cost of any one
            decomposition and of preconditioning a very wide layer. (default: 1024)
        overlap_decompositions: run the decompositions of steps after the first on a worker thread (on
            CUDA, on a side stream) while the next forward and backward pass run, and use them from the
            next step on (:mod:`lightning_dpkfac.core.overlap`); dpkfac only. ``"auto"``: on CUDA; ``True``:
            on any device (on CPU it takes a core that training does not use); ``False``: never.
            (default: "auto")
        flush_denormal: on CPU, flush denormal floats (|x| < 1.2e-38 in float32) to zero in this process
            (``torch.set_flush_denormal(True)``) when the engine is built. K-FAC squares gradients: once a
            batch is well fitted its factors and products underflow into denormals, which CPUs compute many
            times slower (docs/defaults.md: the digits CNN's epochs took 2x as long after 40 epochs). It is
            process-wide, as TensorFlow sets it by default; ``False`` leaves the process's setting alone.
            No effect on a model on a GPU. (default: True)
        max_consecutive_faults: a layer whose factors, decomposition or preconditioned gradient is
            non-finite on this many optimizer steps in a row stops training with an error; on fewer, it
            just keeps its plain gradient (or last good decomposition) for that step; >= 1. (default: 5)

    ``damping``, ``factor_decay``, ``kl_clip`` and ``lr`` also accept a callable of the optimizer step
    (an ``int`` starting at 0) returning the value, in the Python API.
    """

    damping: float = 0.1
    factor_decay: float = 0.8
    kl_clip: float | None = 1e-3
    lr: float | None = None
    factor_update_steps: int = 5
    inv_update_steps: int = 20
    method: str = "inverse"
    mode: str = "dpkfac"
    skip_layers: list[str] = field(default_factory=list)
    kfac_bucket_cap_mb: float = 25.0
    gather_rows: bool = True
    max_factor_dim: int | str | None = 1024
    overlap_decompositions: bool | str = "auto"
    flush_denormal: bool = True
    max_consecutive_faults: int = 5

    def __post_init__(self) -> None:
        for name in ("factor_update_steps", "inv_update_steps", "max_consecutive_faults"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1.")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid: it must be one of {METHODS}.")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: it must be one of {MODES}.")
        if not isinstance(self.kfac_bucket_cap_mb, (int, float)) or not self.kfac_bucket_cap_mb > 0:
            raise ValueError(f"kfac_bucket_cap_mb={self.kfac_bucket_cap_mb!r} is invalid: it must be > 0.")
        for name in ("gather_rows", "flush_denormal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False.")
        check_max_factor_dim(self.max_factor_dim)
        overlap = self.overlap_decompositions
        if not (isinstance(overlap, bool) or overlap == "auto"):
            raise ValueError(f"overlap_decompositions={overlap!r} is invalid: it must be True, False or 'auto'.")
        if overlap is True and self.mode != "dpkfac":
            raise ValueError(f"overlap_decompositions=True needs mode='dpkfac': mode={self.mode!r} broadcasts every "
                             "decomposition, which all ranks wait for. Fix: overlap_decompositions='auto' or False.")
        if isinstance(self.skip_layers, str) or not all(isinstance(s, str) for s in self.skip_layers):
            raise ValueError(f"skip_layers={self.skip_layers!r} is invalid: it must be a list of strings.")
        self.skip_layers = list(self.skip_layers)
        for name in SCHEDULABLE:
            value = getattr(self, name)
            if not callable(value):
                check_value(name, value)

    def value(self, name: str, step: int) -> Any:
        """The value of hyper-parameter ``name`` at optimizer step ``step``, schedules evaluated and checked."""
        value = getattr(self, name)
        if callable(value):
            value = value(step)
            check_value(name, value, f" (returned by its schedule at step {step})")
        return value

    def replace(self, **changes: Any) -> KFACConfig:
        """A validated copy with ``changes`` applied; an unknown name raises ``ValueError``."""
        for name in changes:
            if name not in FIELDS:
                raise ValueError(unknown_key_message(name, FIELDS, "KFACConfig"))
        return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(KFACConfig))


def unknown_key_message(name: str, known: tuple[str, ...], where: str) -> str:
    """'unknown key' message naming the closest known key, if any."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Known: {', '.join(known)}."
    return f"'{name}' is not a parameter of {where}.{hint}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_max_factor_dim(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a valid ``max_factor_dim``: None, "auto" or an integer >= 2."""
    if value not in (None, "auto") and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"max_factor_dim={value!r} is invalid: it must be None, 'auto' or an integer >= 2.")


def check_value(name: str, value: Any, where: str = "") -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the allowed range if ``value`` is out of it."""
    if name == "damping":
        ok, allowed = _is_number(value) and value > 0, "a number > 0"
    elif name == "factor_decay":
        ok, allowed = _is_number(value) and 0 <= value < 1, "a number in [0, 1)"
    elif name == "kl_clip":
        ok, allowed = value is None or (_is_number(value) and value > 0), "None or a number > 0"
    elif name == "lr":
        ok, allowed = value is None or (_is_number(value) and value >= 0), "None or a number >= 0"
    else:  # pragma: no cover - guarded by SCHEDULABLE
        raise KeyError(name)
    if not ok:
        raise ValueError(f"{name}={value!r}{where} is invalid: it must be {allowed}.")
