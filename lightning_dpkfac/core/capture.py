"""Every module hook of the engine: what K-FAC reads from the forward and backward passes.

One forward hook per module feeds, in training mode with grad enabled, the captures registered for it:

- :class:`FactorCapture`, per layer (block) whose factors this rank builds, on factor-update steps: the
  layer input becomes a batch ``A`` (or its rows, or a deferred factor), and the output gradient a batch
  ``G`` (per-example scaling: ``B * dL/dy``);
- a row capture, per Linear layer (block) that row gathering considers or chose: its input rows and
  output-gradient rows (:class:`lightning_dpkfac.distributed.rows.RowCapture`).

Output gradients are read by one hook on the module's output tensor (on the view's base for an N-D Linear,
:func:`~lightning_dpkfac.core.layers.grad_hook_target`): full backward hooks break with ``ReLU(inplace=True)``.
Under ``torch.compile`` the hooks run eagerly (a graph break) rather than being traced.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dpkfac.core.factors import DeferredFactor
from lightning_dpkfac.core.layers import KFACLayer, grad_hook_target
from lightning_dpkfac.core.state import LayerState
from lightning_dpkfac.core.timing import PhaseTimer

#: Called with the output gradient of the forward call that returned it.
OnGrad = Callable[[Tensor], None]


class FactorCapture:
    """Adds one layer's (block's) batch factors to its :class:`LayerState` during a factor-update step.

    ``keep_rows``: a capture with fewer rows than columns is kept as its rows until the fold
    (:class:`~lightning_dpkfac.core.factors.BatchFactor`; dpkfac), else formed at once (dkfac, which
    all-reduces formed factors). ``loss_scale``: the current loss scale of a ``GradScaler``, or ``None``.
    """

    def __init__(self, layer: KFACLayer, state: LayerState, keep_rows: bool,
                 loss_scale: Callable[[], float | None], timer: PhaseTimer) -> None:
        self.layer, self.state, self.keep_rows = layer, state, keep_rows
        self._loss_scale, self._timer = loss_scale, timer

    def on_forward(self, x: Tensor, output: Tensor) -> OnGrad:
        layer, state, raw = self.layer, self.state, x
        x = x.detach()
        with self._timer("factor"), torch.no_grad(), _autocast_off(output.device):
            rows = layer.a_row_count(output)
            if layer.diagonal_a:  # an embedding's token frequencies: d_a numbers, whatever the batch
                state.a_batch.add(layer.a_factor(x, state.dtype), None, self.keep_rows)
            elif rows <= layer.n_w:  # few rows (a Linear on a small batch): a copy of them
                state.a_batch.add(layer.a_rows(x, state.dtype), 1 / rows, self.keep_rows)
            elif rows * layer.n_w > x.numel() and raw.grad_fn is not None:
                # Patches larger than the input (a convolution's im2col), of an activation (autograd keeps it
                # until this layer's backward, and no data loader reuses it): A is formed in step(), where
                # dpkfac's owners build it while other owners' results are on the wire, rather than here,
                # where the other ranks would wait for it at the gradient reduce and the patches would add
                # to the forward pass's peak memory. Holding the input costs less than those patches.
                state.a_batch.add(DeferredFactor(x, partial(self._a_factor, x), layer.name), None, self.keep_rows)
            else:  # the rows are the input itself (a Linear), or the model's input, which a loader may reuse
                state.a_batch.add(layer.a_factor(x, state.dtype), None, self.keep_rows)
            state.a_count += 1
        return partial(self._on_output_grad, output.shape)

    def _a_factor(self, x: Tensor) -> Tensor:
        """A of input ``x``, formed now (a deferred capture), outside any autocast."""
        with _autocast_off(x.device):
            return self.layer.a_factor(x, self.state.dtype)

    def _on_output_grad(self, shape: torch.Size, grad_output: Tensor) -> None:
        state = self.state
        with self._timer("factor"), torch.no_grad(), _autocast_off(grad_output.device):
            grad_output = grad_output.reshape(shape)
            scale = self._loss_scale()
            if scale is not None:
                grad_output = grad_output.to(state.dtype) / scale
            state.g_batch.add(*self.layer.g_capture(grad_output, state.dtype), self.keep_rows)
            task = torch._C._current_graph_task_id()  # tells backward passes apart (private, since torch 2.0)
            if task != state.g_task or task == -1:
                state.g_passes += 1
                state.g_task = task


class RowSource(Protocol):
    """A capture of a layer's rows (:class:`lightning_dpkfac.distributed.rows.RowCapture`)."""

    layer: KFACLayer

    def on_forward(self, x: Tensor) -> OnGrad | None: ...

    def clear(self) -> None: ...


class CaptureManager:
    """Owns the engine's module hooks: at most one forward hook per module, feeding that module's
    :class:`FactorCapture` s (on factor-update steps) and row captures (:class:`RowSource`).

    Args:
        timer: where factor-building time is counted (phase "factor").
    """

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer
        self.factor_step = True  # whether this step builds factors (set by the engine before forward)
        self.loss_scale_fn: Callable[[], float] | None = None  # AMP GradScaler's current scale, if any
        self._loss_scale: float | None = None  # read once per step
        self._factors: dict[nn.Module, list[FactorCapture]] = defaultdict(list)
        self._rows: dict[nn.Module, list[RowSource]] = defaultdict(list)
        self._handles: dict[nn.Module, RemovableHandle] = {}

    def add_factors(self, layer: KFACLayer, state: LayerState, keep_rows: bool) -> None:
        """Build ``layer``'s batch factors into ``state`` on factor-update steps."""
        self._factors[layer.module].append(FactorCapture(layer, state, keep_rows, self.loss_scale, self.timer))
        self._hook(layer.module)

    def add_rows(self, capture: RowSource) -> None:
        self._rows[capture.layer.module].append(capture)
        self._hook(capture.layer.module)

    def remove_rows(self, capture: RowSource) -> None:
        module = capture.layer.module
        self._rows[module].remove(capture)
        capture.clear()
        if not self._rows[module] and not self._factors.get(module):
            self._unhook(module)

    def captures(self, layer: KFACLayer) -> frozenset[str]:
        """What is captured for ``layer``: "factors" and/or "rows"."""
        if layer.module not in self._handles:
            return frozenset()
        kinds = {"factors"} if any(c.layer is layer for c in self._factors.get(layer.module, ())) else set()
        return frozenset(kinds | ({"rows"} if any(c.layer is layer for c in self._rows.get(layer.module, ())) else set()))

    def new_step(self, factor_step: bool) -> None:
        """Called after each K-FAC step, for the next one's passes."""
        self.factor_step = factor_step
        self._loss_scale = None

    def loss_scale(self) -> float | None:
        if self.loss_scale_fn is None:
            return None
        if self._loss_scale is None:
            self._loss_scale = float(self.loss_scale_fn())
        return self._loss_scale

    def remove(self) -> None:
        """Remove every hook; nothing is captured any more."""
        for module in list(self._handles):
            self._unhook(module)
        for captures in self._rows.values():
            for capture in captures:
                capture.clear()
        self._factors.clear()
        self._rows.clear()

    def _hook(self, module: nn.Module) -> None:
        if module not in self._handles:
            self._handles[module] = module.register_forward_hook(torch.compiler.disable(self._on_forward))

    def _unhook(self, module: nn.Module) -> None:
        self._handles.pop(module).remove()

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Tensor)):
            return
        x = inputs[0]
        on_grad = [c.on_forward(x, output) for c in self._factors.get(module, ())] if self.factor_step else []
        if output.requires_grad:
            on_grad += [cb for c in self._rows.get(module, ()) if (cb := c.on_forward(x)) is not None]
            if on_grad:
                grad_hook_target(output).register_hook(torch.compiler.disable(partial(_call_each, on_grad)))


def _call_each(callbacks: list[OnGrad], grad: Tensor) -> None:
    for callback in callbacks:
        callback(grad)


@contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Factor math runs in the factor dtype even inside ``torch.autocast``."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
