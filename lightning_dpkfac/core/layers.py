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

Blocks (:mod:`lightning_dpkfac.core.blocks`): each block of a layer cut by ``max_factor_dim`` is a K-FAC
"layer" of its own (:meth:`KFACLayer.split`), with factors ``G_rr`` and ``A_cc`` and its own owner.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpkfac.core.attention import AttentionForward, attention_forwards
from lightning_dpkfac.core.blocks import Block, block_name, cut_layers
from lightning_dpkfac.core.errors import UnsupportedLayerError
from lightning_dpkfac.distributed.assignment import LayerShape


class KFACLayer(ABC):
    """One K-FAC-covered module, or one :class:`Block` of it: builds its factors and reads/writes its
    gradient as a matrix. ``d_a``, ``d_g``, the rows and the gradient matrix are the block's."""

    _channel_dim: int  # the dimension of the output that holds its features (channels)
    #: ``A`` is diagonal and kept as its diagonal, a vector of d_a numbers (an embedding's token frequencies)
    diagonal_a = False

    def __init__(self, name: str, module: nn.Module, weight_name: str | None = None,
                 output_rows: tuple[int, int] | None = None, bias_offset: int = 0) -> None:
        """``output_rows``: the rows of the weight (and bias) whose outputs the module returns, when it returns
        only those (one of attention's q/k/v projections of a packed weight); default all. ``bias_offset``:
        where the weight's rows start in the bias (attention's separate q/k/v weights share one packed bias)."""
        self.name = name
        self.module_name = name
        #: the weight's parameter name in the model (``describe()`` tells other names of it as tied)
        self.weight_name = weight_name or f"{name}.weight"
        self.module = module
        d_g, d_a = self.module_dims
        r0, r1 = output_rows or (0, d_g)
        self.block = Block(r0, r1, 0, d_a)
        self._output_offset = r0  # the weight row of the module's first output feature
        self._bias_offset = bias_offset

    def split(self, blocks: list[Block]) -> list[KFACLayer]:
        """This layer as ``blocks`` (itself when it is one block), named by :func:`block_name`."""
        if len(blocks) == 1:
            return [self]
        if not self.weight.is_contiguous():
            raise UnsupportedLayerError(
                f"Layer '{self.name}' would be split into {len(blocks)} blocks (max_factor_dim), but its weight is "
                "not contiguous (e.g. channels_last), and blocks are reduced as views of its gradient. Fix: set "
                f"max_factor_dim to None or at least {max(self.d_a, self.d_g)}, keep the weight contiguous, or add "
                f"'{self.name}' to skip_layers."
            )
        parts = []
        r0, c0 = self.block.r0, self.block.c0
        for block in blocks:  # blocks of this layer's rows and columns, as rows and columns of the module
            part = copy.copy(self)
            part.block = Block(block.r0 + r0, block.r1 + r0, block.c0 + c0, block.c1 + c0)
            part.name = block_name(self.module_name, part.block)
            parts.append(part)
        return parts

    @property
    def module_dims(self) -> tuple[int, int]:
        """``(d_g, d_a)`` of the whole module, whichever block this is."""
        return self.weight.shape[0], self._n_w + int(self._module_has_bias)

    @property
    def _bias_rows(self) -> slice:
        """This layer's (block's) entries of the module's bias."""
        return slice(self.block.r0 + self._bias_offset, self.block.r1 + self._bias_offset)

    @property
    def shape(self) -> LayerShape:
        """Its factor sizes, for owner costs, blocks and message sizes."""
        return LayerShape(self.d_a, self.d_g, diagonal_a=self.diagonal_a)

    @property
    def is_block(self) -> bool:
        """Whether this is part of its module's weight rather than all of it."""
        d_g, d_a = self.module_dims
        return self.block != Block(0, d_g, 0, d_a)

    @property
    def _module_has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def _n_w(self) -> int:
        """Columns of the whole weight as a matrix (input features x kernel size)."""
        return self.weight[0].numel()

    @property
    def has_bias(self) -> bool:
        """Whether this layer (block) holds the bias column."""
        return self._module_has_bias and self.block.c1 == self._n_w + 1

    @property
    def n_w(self) -> int:
        """Weight columns of this layer (block): ``d_a`` without the bias column."""
        return self.d_a - int(self.has_bias)

    @property
    def weight(self) -> Tensor:
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        return weight

    @property
    def d_g(self) -> int:
        """Size of the output-gradient factor G (output features / channels)."""
        return self.block.r1 - self.block.r0

    @property
    def d_a(self) -> int:
        """Size of the input factor A (input features x kernel size, +1 with a bias)."""
        return self.block.c1 - self.block.c0

    @property
    def num_params(self) -> int:
        """Number of parameters preconditioned: d_g * d_a."""
        return self.d_g * self.d_a

    def params(self) -> list[Tensor]:
        """The module's parameters of which this layer (block) reads a part: the weight unless the block
        holds the bias column alone, and the bias if it holds it."""
        return [self.weight] * (self.n_w > 0) + ([self.module.bias] if self.has_bias else [])

    def grad_piece(self, param: Tensor, grad: Tensor) -> Tensor:
        """The part of ``grad`` (a gradient of ``param``, one of :meth:`params`, same shape) that this layer
        (block) covers, as a view."""
        if not self.is_block:
            return grad
        b = self.block
        if param is self.weight:
            return grad.view(grad.shape[0], -1)[b.r0 : b.r1, b.c0 : b.c0 + self.n_w]
        return grad[self._bias_rows]

    def input_rows(self, x: Tensor) -> Tensor:
        """The input as rows (examples x locations, ``n_w``): this block's input columns, no bias column."""
        return self._input_rows(x, self.block.c0, self.block.c0 + self.n_w)

    def output_grad_rows(self, gy: Tensor) -> Tensor:
        """The output gradient as rows (examples x locations, d_g), unscaled."""
        rows = self._output_grad_rows(gy)
        r0, r1 = self.block.r0 - self._output_offset, self.block.r1 - self._output_offset
        return rows[:, r0:r1] if r1 - r0 < rows.shape[1] else rows

    @abstractmethod
    def _input_rows(self, x: Tensor, c0: int, c1: int) -> Tensor:
        """Columns ``c0:c1`` of the input as rows (examples x locations, d_in_total)."""

    @abstractmethod
    def _output_grad_rows(self, gy: Tensor) -> Tensor:
        """The whole output gradient as rows (examples x locations, outputs)."""

    def a_row_count(self, output: Tensor) -> int:
        """Rows of the input (examples x locations), read off the layer's ``output``."""
        return output.numel() // output.shape[self._channel_dim]

    def a_rows(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The input rows ``r`` (n x d_a, with the ones column for the bias) as a copy in ``dtype``:
        ``A = r^T r / n``. For few rows (a Linear on a small batch): n x d_a numbers instead of d_a^2."""
        rows = self.input_rows(x)
        out = rows.new_empty(rows.shape[0], self.d_a, dtype=dtype)
        out[:, : self.n_w] = rows
        if self.has_bias:
            out[:, self.n_w] = 1.0
        return out

    def a_factor(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``A`` (d_a x d_a) of one batch of inputs ``x``: the mean outer product of the rows, in ``dtype``."""
        rows = self.input_rows(x).to(dtype)
        n = rows.shape[0]
        # scale the small result, and border it with the column sums for the bias
        A = rows.T @ rows
        if self.has_bias:
            sums = rows.sum(0)
            A = torch.cat([torch.cat([A, sums[:, None]], 1), torch.cat([sums, sums.new_full((1,), n)])[None]], 0)
        return A.div_(n)

    def g_capture(self, gy: Tensor, dtype: torch.dtype) -> tuple[Tensor, float | None]:
        """One batch of output gradients ``gy`` of a batch-mean loss as ``(rows, w)`` with
        ``G = w rows^T rows`` (few rows; a copy), else ``(G, None)``, formed (d_g x d_g)."""
        batch = gy.shape[0]
        rows = self.output_grad_rows(gy)
        if rows.shape[0] <= rows.shape[1]:
            return rows.to(dtype, copy=True), float(batch)  # (B g)^T (B g) / B
        rows = rows.to(dtype)
        return (rows.T @ rows).mul_(batch), None

    def grad_matrix(self) -> Tensor | None:
        """The gradient as a (d_g x d_a) matrix ``[dW | db]``, or ``None`` when the weight has no grad."""
        grad = self.weight.grad
        if grad is None:
            return None
        b = self.block
        matrix = grad.reshape(grad.shape[0], -1)[b.r0 : b.r1, b.c0 : b.c0 + self.n_w]
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            matrix = torch.cat([matrix, bias_grad[self._bias_rows].reshape(-1, 1)], dim=1)
        return matrix

    def set_grad_matrix(self, matrix: Tensor, scale: float = 1.0) -> None:
        """Write ``scale *`` a (d_g x d_a) matrix back into this layer's (block's) part of ``weight.grad``
        (and ``bias.grad``)."""
        weight, b, n_w = self.weight, self.block, self.n_w
        assert weight.grad is not None
        if weight.grad.is_contiguous():
            target = weight.grad.view(weight.shape[0], -1)[b.r0 : b.r1, b.c0 : b.c0 + n_w]
            torch.mul(matrix[:, :n_w], scale, out=target)
        else:  # e.g. channels_last: write through a contiguous copy of the whole gradient
            whole = weight.grad.reshape(weight.shape[0], -1).clone()
            whole[b.r0 : b.r1, b.c0 : b.c0 + n_w] = matrix[:, :n_w] * scale
            weight.grad.copy_(whole.view(weight.shape))
        if self.has_bias:
            bias = self.module.bias
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            torch.mul(matrix[:, n_w], scale, out=bias.grad[self._bias_rows])


class LinearLayer(KFACLayer):
    """``nn.Linear`` on inputs of shape (B, ..., d_in)."""

    _channel_dim = -1

    def _input_rows(self, x: Tensor, c0: int, c1: int) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return rows[:, c0:c1] if c1 - c0 < rows.shape[1] else rows

    def _output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])


class ConvLayer(KFACLayer):
    """``nn.Conv1d`` and ``nn.Conv2d`` with any stride, dilation, kernel shape, padding (int, tuple,
    'same', 'valid') and padding mode; ``groups`` must be 1. A Conv1d is handled as a Conv2d of height 1."""

    _channel_dim = 1

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

    def _patch_columns(self, x: Tensor) -> Tensor:
        """im2col in one copy: the (C*kh*kw, B*L) patches of input ``x`` (B, C, H, W), or (B, C, W) for a
        Conv1d, features ordered like the weight's (C, kh, kw), examples x locations along the columns.

        Gathered from a strided view of the padded input (``Tensor.unfold``), so the only pass at the size
        of the patches is the copy into this layout (padding copies the input first, kh*kw times smaller);
        ``F.unfold`` would materialise (B, C*kh*kw, L) and need a second copy (docs/benchmarks.md).
        """
        if self._is_1d:
            x = x.unsqueeze(2)
        if any(self._pad):
            x = F.pad(x, self._pad, mode=self._mode)
        (kh, kw), (sh, sw), (dh, dw) = self._kernel, self._stride, self._dilation
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        return windows.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * kh * kw, -1)

    def _input_rows(self, x: Tensor, c0: int, c1: int) -> Tensor:
        # Rows as the transpose of contiguous columns: the products rows^T @ rows read contiguous memory.
        # A block's columns come from the input channels that hold them: its im2col costs its width.
        per_channel = self._kernel[0] * self._kernel[1]
        ch0 = min(c0 // per_channel, x.shape[1] - 1)
        ch1 = max(-(-c1 // per_channel), ch0 + 1)
        if (ch0, ch1) != (0, x.shape[1]):
            x = x[:, ch0:ch1]
        start = c0 - ch0 * per_channel
        return self._patch_columns(x)[start : start + c1 - c0].T

    def _output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.transpose(0, 1).reshape(gy.shape[1], -1).T


class EmbeddingLayer(KFACLayer):
    """``nn.Embedding`` (V x E) as the ``nn.Linear(V, E, bias=False)`` on one-hot tokens that it equals: d_a = V,
    d_g = E, the gradient matrix is the weight's gradient transposed (E x V). A (B, T) batch is B examples with T
    locations, as for a Linear on (B, T, d). One-hot rows make ``A`` diagonal, the tokens' frequencies among
    the rows, kept as a vector (never V x V); the ``padding_idx`` row has a zero gradient, and keeps it
    preconditioned. Never cut into blocks: a diagonal ``A`` costs V to invert."""

    _channel_dim = -1
    diagonal_a = True

    def __init__(self, name: str, module: nn.Embedding) -> None:
        if module.sparse:
            raise UnsupportedLayerError(
                f"Layer '{name}' is an nn.Embedding with sparse=True; K-FAC needs dense gradients. Fix: "
                f"sparse=False, or add '{name}' to skip_layers (it then keeps its plain gradient).")
        super().__init__(name, module)

    @property
    def module_dims(self) -> tuple[int, int]:
        return self.weight.shape[1], self.weight.shape[0]

    @property
    def _n_w(self) -> int:
        return self.weight.shape[0]

    def _input_rows(self, x: Tensor, c0: int, c1: int) -> Tensor:
        return F.one_hot(x.reshape(-1), self.weight.shape[0])[:, c0:c1].to(self.weight.dtype)

    def _output_grad_rows(self, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])

    def a_factor(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The diagonal of ``A`` (V,): each token's count among the batch's rows over the rows."""
        return torch.bincount(x.reshape(-1), minlength=self.d_a).to(dtype).div_(x.numel())

    def g_capture(self, gy: Tensor, dtype: torch.dtype) -> tuple[Tensor, float | None]:
        """``G`` formed (E x E): an embedding's rows are examples x tokens, almost always more than E."""
        rows = self.output_grad_rows(gy).to(dtype)
        return (rows.T @ rows).mul_(gy.shape[0]), None

    def grad_matrix(self) -> Tensor | None:
        grad = self.weight.grad
        return None if grad is None else grad.T

    def set_grad_matrix(self, matrix: Tensor, scale: float = 1.0) -> None:
        assert self.weight.grad is not None
        torch.mul(matrix.T, scale, out=self.weight.grad)


def layers_of_params(layers: Sequence[KFACLayer]) -> dict[int, list[int]]:
    """``id(param)`` -> indices of the layers (blocks) in ``layers`` that read part of ``param``."""
    out: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        for p in layer.params():
            out.setdefault(id(p), []).append(i)
    return out


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


SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
#: Normalisation layers (BatchNorm*, SyncBatchNorm and InstanceNorm* share ``_NormBase``): their scale and shift
#: keep the plain gradient by design, see ``NORM_REASON``.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NORM_REASON = ("a normalisation layer: its scale and shift keep the plain gradient (a K-FAC scale-and-shift block "
               "did not pay off, docs/decisions.md)")


def make_layer(name: str, module: nn.Module) -> KFACLayer:
    """The K-FAC helper for a module of a ``SUPPORTED`` type."""
    if isinstance(module, nn.Linear):
        return LinearLayer(name, module)
    if isinstance(module, nn.Embedding):
        return EmbeddingLayer(name, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ConvLayer(name, module)
    raise TypeError(f"no K-FAC helper for {type(module).__name__}")


@dataclass
class Discovery:
    """What :func:`discover_layers` finds: the covered layers (blocks), the skipped modules with the reason,
    and the self-attention forwards that make attention's projections visible (installed by the engine)."""

    layers: list[KFACLayer]
    skipped: dict[str, str]
    attention: dict[str, AttentionForward]


def discover_layers(model: nn.Module, skip: list[str], max_factor_dim: int | str | None = None,
                    world_size: int = 1, inv_update_steps: int = 10) -> Discovery:
    """The covered layers of ``model`` in registration order, each split into blocks as ``max_factor_dim``
    (``KFACConfig``) says for ``world_size`` ranks (:func:`~lightning_dpkfac.core.blocks.cut_layers`), and the skipped ones with
    the reason. A self-attention ``nn.MultiheadAttention`` gives two layers, ``<name>.in_proj`` (``Linear(E, 3E)``)
    and its ``out_proj``; a cross-attention one four: ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``
    (:mod:`lightning_dpkfac.core.attention`).

    ``skip`` holds module names or class names; a name that matches nothing is an error (a typo would
    otherwise silently precondition the layer the user meant to skip).
    """
    layers: list[KFACLayer] = []
    attention, skipped = attention_forwards(model, skip)
    # nn.MultiheadAttention computes its output projection from out_proj.weight directly: unless the engine
    # runs the module's forward (attention), the Linear's forward (and so any hook on it) never runs.
    bypassed = {f"{name}.out_proj" if name else "out_proj": reason for name, reason in skipped.items()}
    # An embedding whose weight a Linear also uses (an LM head tied to it) is preconditioned as that Linear.
    linear_weights = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, module in model.named_modules():
        if name in attention:
            layers += [LinearLayer(layer_name, p, p.weight_name, p.rows, p.bias_offset)
                       for layer_name, p in attention[name].projections.items()]
        if not isinstance(module, SUPPORTED):
            continue
        if name in bypassed:
            skipped[name] = f"forward bypassed by nn.MultiheadAttention, which is left plain: {bypassed[name]}"
        elif name in skip or type(module).__name__ in skip:
            skipped[name] = "in skip_layers"
        elif isinstance(module, nn.Embedding) and id(module.weight) in linear_weights:
            skipped[name] = (f"weight tied with the Linear '{linear_weights[id(module.weight)]}', which preconditions "
                             "the sum of both uses' gradients with its own factors")
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
    grids = cut_layers([l.shape for l in layers], max_factor_dim, world_size, inv_update_steps)
    return Discovery([part for layer, blocks in zip(layers, grids) for part in layer.split(blocks)], skipped,
                     attention)


def plain_parameters(model: nn.Module, layers: Sequence[KFACLayer], skipped: dict[str, str]) -> dict[str, str]:
    """Every trainable parameter of ``model`` that K-FAC does not precondition (``name -> reason``), so that
    a user sees what keeps its plain gradient: norm layers, RNNs, bare ``nn.Parameter`` s, and
    the layers in ``skipped`` (``discover_layers``). A parameter shared with a covered layer is covered."""
    covered = {id(p) for layer in layers for p in layer.params()}
    supported = ", ".join([t.__name__ for t in SUPPORTED] + ["MultiheadAttention"])
    plain: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in covered:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if module_name in skipped:
                plain[name] = skipped[module_name]
            elif type(module) is nn.Module or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) \
                    or module is model:
                plain[name] = "a bare nn.Parameter (no layer to take factors from)"
            elif isinstance(module, NORM_LAYERS):
                plain[name] = f"{type(module).__name__} is {NORM_REASON}"
            else:
                plain[name] = f"{type(module).__name__} is not a K-FAC layer type (supported: {supported})"
    return plain


def tied_names(model: nn.Module, layer: KFACLayer) -> list[str]:
    """The other names under which ``model`` holds ``layer``'s weight (weight tying, e.g. an LM head that
    shares an embedding's matrix): its gradient sums every use, preconditioned with this layer's factors."""
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if p is layer.weight and name != layer.weight_name]
