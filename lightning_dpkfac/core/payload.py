"""A layer's result of one step, as it travels: ``[P (d_g d_a numbers), sum(P * grad), flag]``.

The owner packs it (from the averaged gradient, or from the gathered rows); in dpkfac it is broadcast as
is. Every rank then reads all layers' ``sum(P * grad)`` and flags in one host sync and takes the same
decisions from the same numbers: which layers are preconditioned, the KL-clip scale, whether the step's
update is skipped. The flag carries the owner's decision, so a numerical fault never makes ranks disagree.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import Tensor

from lightning_dpkfac.core.decomposition import Decomposition
from lightning_dpkfac.core.layers import KFACLayer
from lightning_dpkfac.core.state import LayerState

#: Numbers after ``P`` in a payload: ``sum(P * grad)`` and the flag.
TAIL = 2


class Flag(IntEnum):
    """What a payload holds, decided by the layer's owner (dkfac: by every rank, from the same values)."""

    PLAIN = 0  # the averaged gradient (no decomposition yet)
    PRECONDITIONED = 1
    PRECONDITIONED_AFTER_FAULT = 2  # preconditioned with the last good decomposition after a failed update
    PLAIN_AFTER_FAULT = 3  # a fault left no usable preconditioner: the averaged gradient
    NONFINITE_GRADIENT = 4  # the averaged gradient itself is inf/NaN: no rank applies this step's update

    @property
    def preconditioned(self) -> bool:
        return self in (Flag.PRECONDITIONED, Flag.PRECONDITIONED_AFTER_FAULT)

    @property
    def faulty(self) -> bool:
        return self in (Flag.PRECONDITIONED_AFTER_FAULT, Flag.PLAIN_AFTER_FAULT)


def size(d_a: int, d_g: int) -> int:
    """Numbers in the payload of a (d_g x d_a) layer."""
    return d_g * d_a + TAIL


def empty(layer: KFACLayer) -> Tensor:
    """An uninitialised payload of ``layer``, in its weight's dtype (a receive buffer)."""
    w = layer.weight
    return torch.empty(size(layer.d_a, layer.d_g), dtype=w.dtype, device=w.device)


def pack(layer: KFACLayer, state: LayerState, method: Decomposition, damping: float, *, under_scaler: bool,
         rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The payload of ``layer``: from its averaged gradient (``.grad``), or from ``rows`` ``(a, g)`` of all
    ranks with ``g^T a`` the averaged gradient. A layer without a decomposition sends its plain gradient; so
    does one whose ``P`` is not finite (the owner's fault), unless ``under_scaler``: then it is an overflow
    step, which the loss scaler skips by itself. Gathered rows have no plain gradient to send: such a
    payload carries zeros, and every rank averages its own gradient instead. Decided without a host sync.
    """
    out = empty(layer)
    body = out[:-TAIL].view(layer.d_g, layer.d_a)
    if rows is not None:
        grad_ok = _all_finite(rows[0]) & _all_finite(rows[1])
        plain = None
    else:
        grad = layer.grad_matrix()
        plain = grad if grad is not None else body.new_zeros(body.shape)
        grad_ok = _all_finite(plain)
    if state.decomposition is None:
        flag: Tensor | float = float(Flag.PLAIN_AFTER_FAULT if state.fault else Flag.PLAIN)
        body.copy_(plain) if plain is not None else body.zero_()
        out[-2] = 0.0
    else:
        if rows is not None:
            left, right, vg = method.factored_rows(state.decomposition, *rows, damping)
            _product_into(body, left, right)
        else:
            assert plain is not None
            grad = plain.to(state.dtype)
            p = _product_into(body, *method.factored(state.decomposition, grad, damping))
            vg = torch.dot(p.reshape(-1), grad.reshape(-1))
        ok = torch.isfinite(vg)  # sum(P * grad) is finite iff P is (for a finite gradient): one cheap check
        if plain is not None:
            torch.where(ok, body, plain, out=body)
        good = Flag.PRECONDITIONED_AFTER_FAULT if state.fault else Flag.PRECONDITIONED
        flag = torch.where(ok, float(good), float(Flag.PLAIN if under_scaler else Flag.PLAIN_AFTER_FAULT))
        out[-2] = torch.where(ok, vg, 0.0)
    out[-1] = flag if under_scaler else torch.where(grad_ok, flag, float(Flag.NONFINITE_GRADIENT))
    return out


def matrix(layer: KFACLayer, payload: Tensor) -> Tensor:
    """The (d_g x d_a) matrix of ``payload``: ``P`` or the plain gradient."""
    return payload[:-TAIL].view(layer.d_g, layer.d_a)


def read_tails(payloads: list[Tensor], *extra: Tensor) -> tuple[list[float], list[Flag], list[float]]:
    """Every payload's ``sum(P * grad)`` and flag, and the values of the small tensors ``extra``, with one
    device-to-host copy."""
    values = to_host([p[-TAIL:] for p in payloads] + list(extra))
    tails, rest = values[: TAIL * len(payloads)], values[TAIL * len(payloads) :]
    return tails[0::2], [Flag(int(f)) for f in tails[1::2]], rest


def kl_scale(vgs: list[float], flags: list[Flag], kl_clip: float | None, peak_lr: float) -> float:
    """``nu = min(1, sqrt(kl_clip / |peak_lr^2 sum_l sum(P_l * grad_l)|))`` over the preconditioned layers,
    in float64 from shared values summed in a fixed order: the same on every rank. ``peak_lr`` is the
    largest lr so far, so the step ``lr * nu * P`` is bounded as at that lr and still follows a decaying
    lr schedule (with the current lr instead, a clipped step would not depend on the lr at all)."""
    if kl_clip is None:
        return 1.0
    step = peak_lr**2 * abs(sum(v for v, flag in zip(vgs, flags) if flag.preconditioned))
    return 1.0 if step == 0.0 else min(1.0, math.sqrt(kl_clip / step))


def to_host(tensors: list[Tensor]) -> list[float]:
    """The values of small tensors (possibly on several devices), flattened and concatenated, with one
    device-to-host copy."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]).tolist()


def _product_into(out: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` written into ``out`` (the payload, in the weight's dtype); returns the product in
    the factors' dtype (``out`` itself where the dtypes agree)."""
    if right.dim() == 1:  # a diagonal A side (decomposition.times_a)
        return torch.mul(left, right, out=out) if out.dtype == left.dtype else out.copy_(left * right)
    if out.dtype == left.dtype:
        return torch.mm(left, right, out=out)
    p = left @ right
    out.copy_(p)
    return p


def _all_finite(t: Tensor) -> Tensor:
    """0-d bool: no inf/NaN in ``t`` (they propagate into the sum). One fast pass with no bool tensor;
    a sum beyond the dtype's range also reads as non-finite, which errs on the safe side."""
    return torch.isfinite(t.sum())
