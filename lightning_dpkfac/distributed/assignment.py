"""Who owns which layer, and when it is decomposed: a cost model, a deterministic greedy owner map, and the
slots that spread every owner's decompositions over the decomposition interval.

Every rank computes the same map from the same layer shapes, with no communication::

    layers (sorted by cost, largest first)   L3  L0  L1  L2 ...
    rank 0  ████████ L3            ██ L2
    rank 1  █████ L0   ████ L1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    """Factor sizes of one layer: ``A`` is d_a x d_a (``diagonal_a``: its diagonal, d_a numbers, as for an
    ``nn.Embedding``), ``G`` is d_g x d_g, the gradient is d_g x d_a.
    ``rows_per_example``: for a Linear layer, the input rows per example (1 on 2-D inputs, T on (B, T, d)
    inputs), which decide whether dpkfac gathers its rows (:mod:`lightning_dpkfac.distributed.rows`); 0 for other layers
    and where it is not known."""

    d_a: int
    d_g: int
    rows_per_example: int = 0
    diagonal_a: bool = False

    @property
    def a_numbers(self) -> int:
        """Numbers in ``A`` (and in each A-side tensor of a decomposition)."""
        return self.d_a if self.diagonal_a else self.d_a**2


def layer_cost(shape: LayerShape, inv_update_steps: int = 1) -> float:
    """Owner work per optimizer step, in floating-point operations (up to constant factors).

    Decomposition ~ d^3 per factor, amortised over ``inv_update_steps``; preconditioning two matrix
    products ~ d_g * d_a * (d_a + d_g) every step. Factor building scales with the batch, which every
    layer shares, so it is folded into a d^2 term that breaks ties between equally priced layers.
    """
    d_a, d_g = shape.d_a, shape.d_g
    a_side = shape.a_numbers  # a diagonal A costs d_a to invert and to apply per row
    decomposition = (d_a * a_side + d_g**3) / inv_update_steps
    precondition = d_g * (a_side + d_a * d_g)
    return decomposition + precondition + a_side + d_g**2


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time owner map: the costliest layer first, each to the least-loaded rank.

    Ties go to the earlier layer and to the lower rank, so the result depends only on ``costs``.
    Returns ``owners`` with ``owners[i]`` the rank that owns layer ``i``.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: it must be >= 1.")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost owned by each rank."""
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return loads


def load_imbalance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> float:
    """max/mean of the per-rank loads: 1.0 is perfect balance."""
    loads = rank_loads(costs, owners, world_size)
    mean = sum(loads) / world_size
    return max(loads) / mean if mean > 0 else 1.0


def decomposition_cost(shape: LayerShape) -> float:
    """One decomposition of a layer's two factors, in floating-point operations (up to a constant)."""
    return float(shape.d_a**3 + shape.d_g**3)


def decomposition_slots(shapes: Sequence[LayerShape], owners: Sequence[int], world_size: int,
                        inv_update_steps: int, factor_update_steps: int = 1) -> list[int]:
    """Per layer, its slot: the step within every interval of ``inv_update_steps`` at which its owner
    decomposes it; a multiple of ``factor_update_steps`` (there its factors were just updated), unless the
    interval is shorter than that.

    Greedy, costliest first: each layer goes to the slot where its owner has decomposed the least so far
    (ties: where the busiest rank has the least, then the earlier slot), so that no step carries every
    decomposition of the interval. Depends only on the shapes and the owner map: every rank computes the
    same slots. All layers are also decomposed at step 0, so that preconditioning starts at once.
    """
    slots = range(0, inv_update_steps, factor_update_steps)
    loads = [[0.0] * len(slots) for _ in range(world_size)]
    costs = [decomposition_cost(s) for s in shapes]
    out = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-costs[i], i)):
        mine = loads[owners[i]]
        j = min(range(len(slots)), key=lambda j: (mine[j], max(rank[j] for rank in loads), j))
        mine[j] += costs[i]
        out[i] = slots[j]
    return out


def decomposes_at(step: int, slot: int, inv_update_steps: int) -> bool:
    """Whether a layer of slot ``slot`` is decomposed at optimizer step ``step`` (every layer at step 0)."""
    return step == 0 or step % inv_update_steps == slot
