"""Linear layers' gradients sent as the rows they are made of (dpkfac's row gathering).

For a Linear layer the batch gradient of ``[W | b]`` is exactly ``g^T a``: ``a`` (R x d_a) holds the
input rows with a column of ones for the bias, ``g`` (R x d_g) the rows of the loss gradient w.r.t. the
output, R = examples x positions. When the rows of all P ranks are smaller than the gradient,

    P * R * (d_a + d_g) < d_g * d_a                                              (``rows_pay_off``)

the owner gathers every rank's rows instead of receiving the gradient reduced to it: fewer bytes, and
with ``a``, ``g`` the rows of all ranks stacked (each rank's gradient is its own ``g^T a``, averaged),

    grad = g^T a / P,   inverse: G^-1 grad A^-1 = (G^-1 g^T)(a A^-1) / P,
                        eigen:   Q_G^T grad Q_A = (g Q_G)^T (a Q_A) / P,

which for the inverse method costs about ``P R (d_a + d_g)^2`` flops instead of ``d_g d_a (d_a + d_g)``.
The engine decides per layer at its first step, from the largest row count of any rank and a check on
every rank that the layer's gradient really is ``g^T a`` (a weight also used outside the module's
forward, or a hook that edits the parameter's gradient, would make it differ).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dpkfac.layers import KFACLayer, grad_hook_target

#: Relative (Frobenius) difference above which a gradient is not ``g^T a``. Loose enough for a gradient
#: computed in bfloat16 under autocast, tight enough for any real second source of gradient.
MATCH_TOLERANCE = 5e-2


def rows_pay_off(world_size: int, rows_per_rank: int, d_a: int, d_g: int) -> bool:
    """Whether gathering ``rows_per_rank`` rows from each of ``world_size`` ranks beats sending the
    d_g x d_a gradient (fewer bytes and fewer preconditioning flops)."""
    return 0 < world_size * rows_per_rank * (d_a + d_g) < d_g * d_a


class RowCapture:
    """The rows ``a`` and ``g`` of one Linear layer over the forward/backward passes since :meth:`clear`.

    Inputs are kept by reference (autograd keeps them for the weight gradient anyway, and refuses an
    in-place change of them); output gradients by reference too (autograd does not modify a gradient it
    has passed to a tensor hook). While ``candidate`` (the first step, before the decision), a layer whose
    rows on this rank alone already cannot pay off on ``world_size`` ranks keeps nothing and only counts
    its rows: a token model's output gradients would otherwise pile up until the step.
    """

    def __init__(self, layer: KFACLayer, world_size: int) -> None:
        self.layer = layer
        self.world_size = world_size
        self.candidate = True
        self._inputs: list[Tensor] = []
        self._grads: dict[int, Tensor] = {}  # forward call index -> output-gradient rows
        self._counted = 0  # rows seen by a candidate that stopped keeping them
        # Under torch.compile the hook runs eagerly (a graph break) rather than being traced.
        self._handle = layer.module.register_forward_hook(torch.compiler.disable(self._on_forward))

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        if self.candidate:
            rows = self._counted + sum(t.numel() // t.shape[-1] for t in (*self._inputs, inputs[0]))
            if self._counted or not rows_pay_off(self.world_size, rows, self.layer.d_a, self.layer.d_g):
                self._counted, self._inputs, self._grads = rows, [], {}
                return
        call = len(self._inputs)
        self._inputs.append(inputs[0].detach())
        grad_hook_target(output).register_hook(torch.compiler.disable(partial(self._on_output_grad, call)))

    def _on_output_grad(self, call: int, grad: Tensor) -> None:
        if call < len(self._inputs):  # else dropped by a candidate with too many rows
            self._grads[call] = grad.detach().reshape(-1, grad.shape[-1])

    @property
    def holds_rows(self) -> bool:
        """Whether any input or output-gradient rows are kept."""
        return bool(self._inputs or self._grads)

    def num_rows(self) -> int:
        """Rows that have both an input and an output gradient (a candidate that stopped keeping them:
        the rows it saw)."""
        return self._counted or sum(g.shape[0] for g in self._grads.values())

    def rows(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(a, g)``, (R x d_a) and (R x d_g) in ``dtype``, over every call that got a gradient
        (R may be 0)."""
        out = torch.empty(self.num_rows(), self.layer.d_a + self.layer.d_g, dtype=dtype, device=self.layer.weight.device)
        self.write_rows(out)
        return out[:, : self.layer.d_a], out[:, self.layer.d_a :]

    def write_rows(self, out: Tensor) -> None:
        """Write ``[a | g]`` into ``out`` (at least R rows, d_a + d_g columns); rows past R become zeros."""
        d_in, start = self.layer.d_a - int(self.layer.has_bias), 0
        for call in sorted(self._grads):
            g = self._grads[call]
            block = out[start : start + g.shape[0]]
            block[:, :d_in].copy_(self.layer.input_rows(self._inputs[call]))
            if self.layer.has_bias:
                block[:, d_in].fill_(1.0)
            block[:, self.layer.d_a :].copy_(g)
            start += g.shape[0]
        out[start:].zero_()

    def gradient_matches(self, param: Tensor, grad: Tensor) -> bool:
        """Whether ``grad`` (this rank's gradient of the layer's weight or bias) equals ``g^T a``."""
        if self._counted:  # a candidate that stopped keeping its rows: it will not gather them anyway
            return False
        a, g = self.rows(torch.promote_types(grad.dtype, torch.float32))
        full = g.T @ a
        n_w = self.layer.weight[0].numel()
        expected = (full[:, n_w] if param is not self.layer.weight else full[:, :n_w]).reshape(grad.shape)
        scale = expected.norm() + grad.to(expected.dtype).norm()
        return bool((expected - grad.to(expected.dtype)).norm() <= MATCH_TOLERANCE * scale + 1e-30)

    def clear(self) -> None:
        self._inputs, self._grads, self._counted = [], {}, 0

    def remove(self) -> None:
        """Stop capturing."""
        self._handle.remove()
        self.clear()
