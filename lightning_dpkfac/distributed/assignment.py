"""Who owns which layer: a cost model and a deterministic greedy owner map.

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
    """Factor sizes of one layer: ``A`` is d_a x d_a, ``G`` is d_g x d_g, the gradient is d_g x d_a.
    ``rows_per_example``: for a Linear layer, the input rows per example (1 on 2-D inputs, T on (B, T, d)
    inputs), which decide whether dpkfac gathers its rows (:mod:`lightning_dpkfac.distributed.rows`); 0 for other layers
    and where it is not known."""

    d_a: int
    d_g: int
    rows_per_example: int = 0


def layer_cost(shape: LayerShape, inv_update_steps: int = 1) -> float:
    """Owner work per optimizer step, in floating-point operations (up to constant factors).

    Decomposition ~ d^3 per factor, amortised over ``inv_update_steps``; preconditioning two matrix
    products ~ d_g * d_a * (d_a + d_g) every step. Factor building scales with the batch, which every
    layer shares, so it is folded into a d^2 term that breaks ties between equally priced layers.
    """
    d_a, d_g = shape.d_a, shape.d_g
    decomposition = (d_a**3 + d_g**3) / inv_update_steps
    precondition = d_g * d_a * (d_a + d_g)
    return decomposition + precondition + d_a**2 + d_g**2


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
