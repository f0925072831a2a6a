"""Per layer type: which tensors K-FAC needs, how they become Kronecker factors, and the gradient view.

Conventions (Martens & Grosse; factors estimate the *per-example* Fisher, so damping means the same at
any batch size). For a layer with weight ``W`` (d_g x ...) and optional bias, ``[W | b]`` is one
(d_g x d_a) matrix.

- ``a`` rows: the layer input, one row per (example, location), with a column of ones when there is a bias.
  ``A = a^T a / rows``: the mean outer product over all rows.
- ``g`` rows: the gradient of the loss w.r.t. the layer output, one row per (example, location), times the
  batch size ``B`` (the loss is a mean over the batch). ``G = g^T g / B``: per example the sum over its
  locations, averaged over examples (KFC, Grosse & Martens 2016).
- A layer called several times in one forward pass (shared weights) is treated like more locations: the
  engine averages ``A`` over the calls and sums ``G`` (see ``preconditioner._update_factors``).
- "Locations" are the spatial positions of a convolution, and for a Linear every leading dimension after the
  first: a Linear on a (B, T, d_in) input treats its T positions like a convolution's locations. ``B`` is
  always ``input.shape[0]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class UnsupportedLayerError(ValueError):
    """A layer that K-FAC cannot precondition exactly; the message names the layer and the fix."""


class KFACLayer(ABC):
    """One K-FAC-covered module: builds its factors and reads/writes its gradient as a matrix."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def weight(self) -> Tensor:
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        return weight

    @property
    def d_g(self) -> int:
        """Size of the output-gradient factor G (output features / channels)."""
        return self.weight.shape[0]

    @property
    def d_a(self) -> int:
        """Size of the input factor A (input features x kernel size, +1 with a bias)."""
        return self.weight[0].numel() + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """Number of parameters preconditioned: d_g * d_a."""
        return self.d_g * self.d_a

    @abstractmethod
    def input_rows(self, x: Tensor) -> Tensor:
        """The input as rows (examples x locations, d_in_total), without the bias column."""

    @abstractmethod
    def output_grad_rows(self, gy: Tensor) -> Tensor:
        """The output gradient as rows (examples x locations, d_g), unscaled."""

    def a_factor(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``A`` (d_a x d_a, ``dtype``) from one batch of layer inputs ``x``."""
        rows = self.input_rows(x).to(dtype)
        n = rows.shape[0]
        if n <= rows.shape[1]:  # few rows (a Linear on a small batch): pad and scale the rows
            if self.has_bias:
                rows = torch.cat([rows, rows.new_ones(n, 1)], dim=1)
            return rows.T @ (rows / n)
        # many rows (convolutions): scale the small result, border it with the column sums for the bias
        A = rows.T @ rows
        if self.has_bias:
            sums = rows.sum(0)
            A = torch.cat([torch.cat([A, sums[:, None]], 1), torch.cat([sums, sums.new_full((1,), n)])[None]], 0)
        return A.div_(n)

    def g_factor(self, gy: Tensor, dtype: torch.dtype) -> Tensor:
        """``G`` (d_g x d_g, ``dtype``) from one batch of output gradients ``gy`` of a batch-mean loss."""
        batch = gy.shape[0]
        rows = self.output_grad_rows(gy).to(dtype)
        if rows.shape[0] <= rows.shape[1]:
            return rows.T @ (rows * batch)  # (B g)^T (B g) / B
        return (rows.T @ rows).mul_(batch)

    def grad_matrix(self) -> Tensor | None:
        """The gradient as a (d_g x d_a) matrix ``[dW | db]``, or ``None`` when the weight has no grad."""
        grad = self.weight.grad
        if grad is None:
            return None
        matrix = grad.reshape(self.d_g, -1)
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            matrix = torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)
        return matrix

    def set_grad_matrix(self, matrix: Tensor, scale: Tensor | float = 1.0) -> None:
        """Write ``scale *`` a (d_g x d_a) matrix back into ``weight.grad`` (and ``bias.grad``)."""
        weight = self.weight
        assert weight.grad is not None
        n_w = weight[0].numel()
        if weight.grad.is_contiguous():
            torch.mul(matrix[:, :n_w], scale, out=weight.grad.view(self.d_g, n_w))
        else:
            weight.grad.copy_((matrix[:, :n_w] * scale).reshape(weight.shape))
        if self.has_bias:
            bias = self.module.bias
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            torch.mul(matrix[:, n_w], scale, out=bias.grad)


class LinearLayer(KFACLayer):
    """``nn.Linear`` on inputs of shape (B, ..., d_in)."""

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])


class ConvLayer(KFACLayer):
    """``nn.Conv1d`` and ``nn.Conv2d`` with any stride, dilation, kernel shape, padding (int, tuple,
    'same', 'valid') and padding mode; ``groups`` must be 1. A Conv1d is handled as a Conv2d of height 1."""

    def __init__(self, name: str, module: nn.Conv1d | nn.Conv2d) -> None:
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"Layer '{name}' is a {type(module).__name__} with groups={module.groups}; K-FAC here supports "
                f"groups=1 only. Fix: add '{name}' to skip_layers (it then keeps its plain gradient)."
            )
        super().__init__(name, module)
        self._is_1d = isinstance(module, nn.Conv1d)

        def as_2d(value: tuple[int, ...]) -> tuple[int, int]:
            return (1, value[0]) if self._is_1d else (value[0], value[1])

        self._kernel = as_2d(module.kernel_size)
        self._stride = as_2d(module.stride)
        self._dilation = as_2d(module.dilation)
        self._pad = self._padding_per_side(module.padding, self._kernel, self._dilation, self._is_1d)
        self._mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    @staticmethod
    def _padding_per_side(
        padding: str | tuple[int, ...], kernel: tuple[int, int], dilation: tuple[int, int], is_1d: bool
    ) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) padding, as ``F.pad`` takes it, matching the module's own forward."""
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            sides = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                sides += [total // 2, total - total // 2]  # PyTorch puts the odd pixel on the right/bottom
            return (sides[0], sides[1], sides[2], sides[3])
        assert not isinstance(padding, str)
        ph, pw = (0, padding[0]) if is_1d else (padding[0], padding[1])
        return (pw, pw, ph, ph)

    def _patches(self, x: Tensor) -> Tensor:
        """im2col patches (B, C*kh*kw, L) of input ``x`` (B, C, H, W), or (B, C, W) for a Conv1d."""
        if self._is_1d:
            x = x.unsqueeze(2)
        left, right, top, bottom = self._pad
        if self._mode == "constant" and left == right and top == bottom:  # unfold pads zeros itself, faster
            return F.unfold(x, self._kernel, dilation=self._dilation, padding=(top, left), stride=self._stride)
        x = F.pad(x, self._pad, mode=self._mode)
        return F.unfold(x, self._kernel, dilation=self._dilation, stride=self._stride)

    def input_rows(self, x: Tensor) -> Tensor:
        # Rows as the transpose of contiguous columns: the copy moves whole L-runs, and the products
        # rows^T @ rows read contiguous memory.
        patches = self._patches(x)
        return patches.permute(1, 0, 2).reshape(patches.shape[1], -1).T

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.transpose(0, 1).reshape(gy.shape[1], -1).T


def grad_hook_target(output: Tensor) -> Tensor:
    """The tensor whose gradient hook sees d loss / d output, even if ``output`` is modified in place.

    A Linear on N-D input returns a reshaped *view* of a 2-D result; an in-place op on that view (e.g.
    ``ReLU(inplace=True)``) rebases the view's history and silently drops hooks registered on it. Hooks
    on the view's base survive and receive the same gradient, flattened.
    """
    base = output._base
    if base is not None and base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous():
        return base
    return output


SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def make_layer(name: str, module: nn.Module) -> KFACLayer:
    """The K-FAC helper for a module of a ``SUPPORTED`` type."""
    if isinstance(module, nn.Linear):
        return LinearLayer(name, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ConvLayer(name, module)
    raise TypeError(f"no K-FAC helper for {type(module).__name__}")


def discover_layers(model: nn.Module, skip: list[str]) -> tuple[list[KFACLayer], dict[str, str]]:
    """The covered layers of ``model`` in registration order, and the skipped ones with the reason.

    ``skip`` holds module names or class names; a name that matches nothing is an error (a typo would
    otherwise silently precondition the layer the user meant to skip).
    """
    layers: list[KFACLayer] = []
    skipped: dict[str, str] = {}
    # nn.MultiheadAttention computes its output projection from out_proj.weight directly: the Linear's
    # forward (and so any hook on it) never runs.
    bypassed = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
                if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED):
            continue
        if name in bypassed:
            skipped[name] = "forward bypassed by nn.MultiheadAttention (it reads the weight directly)"
        elif name in skip or type(module).__name__ in skip:
            skipped[name] = "in skip_layers"
        elif not module.weight.requires_grad:
            skipped[name] = "frozen (weight.requires_grad is False)"
        else:
            layers.append(make_layer(name, module))
    known = {name for name, _ in model.named_modules()} | {type(m).__name__ for m in model.modules()}
    unknown = sorted(set(skip) - known)
    if unknown:
        names = [n for n, _ in model.named_modules()][1:6]
        raise ValueError(f"skip_layers names {unknown}, which match no module name or class name in the model. "
                         f"Module names look like {names}.")
    return layers, skipped
