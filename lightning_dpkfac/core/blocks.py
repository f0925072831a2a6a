"""Where layers are cut into blocks (``KFACConfig.max_factor_dim``): the one place for the engine, the planner
and the shape tables.

A layer's gradient ``[W | b]`` is a (d_g x d_a) matrix. A :class:`Block` is rows ``r0:r1`` (outputs, G) by
columns ``c0:c1`` (inputs, A; the bias is the last column). Each block is preconditioned with the diagonal
blocks ``G_rr`` and ``A_cc`` of the layer's factors and has an owner of its own: block-diagonal K-FAC, the
approximation Distributed Shampoo makes for large dimensions, which lets the ranks share one wide layer's
memory and decomposition work.

An integer ``max_factor_dim`` bounds both sides of every layer. ``"auto"`` cuts only the layers whose
:func:`~lightning_dpkfac.distributed.assignment.layer_cost` exceeds the fair share (the total over the world
size): no owner map can balance those. Such a layer's larger side is cut into one more part at a time (parts
of at least :data:`MIN_AUTO_PART`) until its largest block's cost is within the fair share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_dpkfac.core.config import check_max_factor_dim
from lightning_dpkfac.distributed.assignment import LayerShape, layer_cost

#: ``max_factor_dim="auto"`` never cuts a factor into parts smaller than this: below it a block's
#: decomposition costs less than the per-block overhead, so cutting buys no balance.
MIN_AUTO_PART = 64


@dataclass(frozen=True)
class Block:
    """Rows ``r0:r1`` (outputs, G) by columns ``c0:c1`` (inputs, A; the bias is the last column) of a
    layer's (d_g x d_a) gradient matrix ``[W | b]``."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def d_g(self) -> int:
        return self.r1 - self.r0

    @property
    def d_a(self) -> int:
        return self.c1 - self.c0


def block_name(name: str, block: Block) -> str:
    """How a block of layer ``name`` is named: ``"name[r0:r1,c0:c1]"``."""
    return f"{name}[{block.r0}:{block.r1},{block.c0}:{block.c1}]"


def cut_layers(shapes: Sequence[LayerShape], max_factor_dim: int | str | None, world_size: int = 1,
               inv_update_steps: int = 10) -> list[list[Block]]:
    """Per layer of ``shapes``, its blocks in row-major order (one block, the whole layer, when it stays
    whole), as ``max_factor_dim`` cuts it for ``world_size`` ranks."""
    return [block_grid(s.d_g, s.d_a, rows, cols)
            for s, (rows, cols) in zip(shapes, block_limits(shapes, max_factor_dim, world_size, inv_update_steps))]


def block_grid(d_g: int, d_a: int, max_rows: int | None, max_cols: int | None) -> list[Block]:
    """The blocks of a (d_g x d_a) layer with G at most ``max_rows`` and A at most ``max_cols`` (row-major
    order); one block, the whole layer, when both factors fit (``None``: that side stays whole)."""
    return [Block(r0, r1, c0, c1) for r0, r1 in split_range(d_g, max_rows) for c0, c1 in split_range(d_a, max_cols)]


def split_range(size: int, max_size: int | None) -> list[tuple[int, int]]:
    """``[0, size)`` cut into the fewest consecutive parts of at most ``max_size`` (all: ``None``), their
    sizes differing by at most one (the larger ones first)."""
    parts = 1 if max_size is None else max(1, math.ceil(size / max_size))
    small, extra = divmod(size, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + small + int(k < extra)
        bounds.append((start, end))
        start = end
    return bounds


def block_limits(shapes: Sequence[LayerShape], max_factor_dim: int | str | None, world_size: int = 1,
                 inv_update_steps: int = 10) -> list[tuple[int | None, int | None]]:
    """Per layer, the largest block ``(rows, columns)`` (``d_g``, ``d_a``) ``max_factor_dim`` cuts it into;
    ``None`` leaves that side whole (see the module docstring for ``"auto"``)."""
    check_max_factor_dim(max_factor_dim)
    # A diagonal A (an embedding's) costs d_a, not d_a^3: such a layer stays whole, out of "auto"'s fair share.
    if max_factor_dim is None or isinstance(max_factor_dim, int):
        return [(None, None) if s.diagonal_a else (max_factor_dim, max_factor_dim) for s in shapes]
    fair = sum(layer_cost(s, inv_update_steps) for s in shapes if not s.diagonal_a) / world_size
    return [(None, None) if s.diagonal_a else _fair_share_block(s, fair, inv_update_steps) for s in shapes]


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
