"""Who owns which layer: a cost model, the blocks ``max_factor_dim`` cuts layers into, and a deterministic
greedy owner map.

Every rank computes the same map from the same layer shapes, with no communication::

    layers (sorted by cost, largest first)   L3  L0  L1  L2 ...
    rank 0  ████████ L3            ██ L2
    rank 1  █████ L0   ████ L1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_dpkfac.core.config import check_max_factor_dim

#: ``max_factor_dim="auto"`` never cuts a factor into parts smaller than this: below it a block's
#: decomposition costs less than the per-block overhead, so cutting buys no balance.
MIN_AUTO_PART = 64


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


def block_limits(shapes: Sequence[LayerShape], max_factor_dim: int | str | None, world_size: int = 1,
                 inv_update_steps: int = 10) -> list[tuple[int | None, int | None]]:
    """Per layer, the largest block ``(rows, columns)`` (``d_g``, ``d_a``) ``KFACConfig.max_factor_dim``
    cuts it into; ``None`` leaves that side whole.

    An integer bounds both sides of every layer. ``"auto"`` cuts only the layers whose :func:`layer_cost`
    exceeds the fair share, the total over ``world_size`` ranks, since no owner map can balance those: it
    cuts the larger side of such a layer into one more part at a time (parts of at least
    :data:`MIN_AUTO_PART`) until its largest block's cost is within the fair share.
    """
    check_max_factor_dim(max_factor_dim)
    if max_factor_dim is None or isinstance(max_factor_dim, int):
        return [(max_factor_dim, max_factor_dim)] * len(shapes)
    fair = sum(layer_cost(s, inv_update_steps) for s in shapes) / world_size
    return [_fair_share_block(s, fair, inv_update_steps) for s in shapes]


def _fair_share_block(shape: LayerShape, fair: float, inv_update_steps: int) -> tuple[int, int]:
    parts_g = parts_a = 1
    rows, cols = shape.d_g, shape.d_a
    while layer_cost(LayerShape(cols, rows), inv_update_steps) > fair:
        cut_a = math.ceil(shape.d_a / (parts_a + 1)) >= MIN_AUTO_PART
        cut_g = math.ceil(shape.d_g / (parts_g + 1)) >= MIN_AUTO_PART
        if cut_a and (cols >= rows or not cut_g):
            parts_a += 1
        elif cut_g:
            parts_g += 1
        else:
            break
        rows, cols = math.ceil(shape.d_g / parts_g), math.ceil(shape.d_a / parts_a)
    return rows, cols


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
