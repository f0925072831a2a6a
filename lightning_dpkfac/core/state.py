"""What a rank holds for one K-FAC layer: the captures of the current step, the running factors, the
decomposition, and the public read-only copy of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_dpkfac.core.factors import BatchFactor


@dataclass
class LayerState:
    """One layer's (block's) state on a rank that builds its factors. Tensors are ``dtype``: float32, or
    float64 for float64 models, whatever the autocast dtype."""

    dtype: torch.dtype
    a_batch: BatchFactor = field(default_factory=BatchFactor)  # A's captures since the last factor update
    g_batch: BatchFactor = field(default_factory=BatchFactor)  # G's captures
    a_count: int = 0  # forward captures (uses x micro-batches)
    g_passes: int = 0  # distinct backward passes that reached the layer (micro-batches)
    g_task: int = -1  # id of the backward pass of the last G capture
    A: Tensor | None = None  # running averages, d_a x d_a and d_g x d_g
    G: Tensor | None = None
    decomposition: dict[str, Tensor] | None = None  # the tensors the method keeps (Decomposition.keys)
    fault: bool = False  # a factor update or decomposition of this step failed (owner only)

    def take_captures(self) -> tuple[tuple[BatchFactor, float] | None, tuple[BatchFactor, float] | None]:
        """The step's captures of A and G, each with the scale that makes it the batch's factor (``None``
        where nothing was captured), leaving the state empty for the next step.

        Uses of a layer within one backward pass add up (like a convolution's locations); M accumulated
        passes, each of a loss scaled by 1/M (as Lightning does), average: sum_passes (M g)(M g)^T / M =
        M * sum_passes G_pass.
        """
        a = (self.a_batch, 1 / self.a_count) if not self.a_batch.empty and self.a_count else None
        g = (self.g_batch, float(self.g_passes)) if not self.g_batch.empty else None
        self.a_batch, self.g_batch = BatchFactor(), BatchFactor()
        self.a_count = self.g_passes = 0
        return a, g

    def tensors(self) -> dict[str, Tensor]:
        """The running factors and the decomposition, by their checkpoint names."""
        out = {key: t for key, t in (("A", self.A), ("G", self.G)) if t is not None}
        return out | (self.decomposition or {})


@dataclass(frozen=True)
class LayerStateView:
    """A copy of one layer's K-FAC state on this rank (``KFACPreconditioner.layer_state``)."""

    name: str
    owner: int
    dtype: torch.dtype  # of the factors and decompositions
    A: Tensor | None
    G: Tensor | None
    decomposition: dict[str, Tensor]  # eigen: qa, qg, dgda; inverse: a_inv, g_inv

    @classmethod
    def of(cls, name: str, owner: int, state: LayerState) -> LayerStateView:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        return cls(name, owner, state.dtype, copy(state.A), copy(state.G),
                   {key: t.detach().clone() for key, t in (state.decomposition or {}).items()})
