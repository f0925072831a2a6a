"""The K-FAC engine: ``KFACPreconditioner(model, ...)``, usable from plain PyTorch and from Lightning.

One optimizer step, after ``loss.backward()`` and the gradient all-reduce (DDP):

1. factors   ``dpkfac``: each layer's owner turns the A and G it captured from its *local* batch into
             the running average; no factor crosses the network.
             ``dkfac``: every rank captured every layer; the batch factors are all-reduced first.
2. decompose every ``inv_update_steps``: the owner eigendecomposes (or inverts) its layers' factors.
3. precondition  the owner turns the averaged gradient of its layers into ``P = G^-1 grad A^-1``.
4. share     owners broadcast ``P`` (bucketed, per owner) with ``sum(P * grad)`` and a "preconditioned"
             flag; every rank then applies the same KL-clip scale and writes ``P`` into ``.grad``.

Captures happen in module hooks during forward/backward of a step whose index is a multiple of
``factor_update_steps``: ``A`` in a forward hook, ``G`` in a hook on the layer's output tensor (full
backward hooks break with ``ReLU(inplace=True)``). Only modules in training mode with grad enabled are
captured, so validation passes never touch the factors.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from lightning_dpkfac.assignment import LayerShape, assign_owners, layer_cost, load_imbalance
from lightning_dpkfac.comm import Communicator, counting_all_reduce_hook, owner_reduce_hook
from lightning_dpkfac.config import KFACConfig
from lightning_dpkfac.layers import KFACLayer, discover_layers

log = logging.getLogger("lightning_dpkfac")


@dataclass
class _LayerState:
    """What a rank holds for one layer. Factors are ``dtype`` (float32, or float64 for float64 models)."""

    dtype: torch.dtype
    a_batch: Tensor | None = None  # sum of A over the captures since the last factor update
    g_batch: Tensor | None = None
    a_count: int = 0
    g_count: int = 0
    A: Tensor | None = None  # running averages
    G: Tensor | None = None
    # eigen method: eigenvectors and the outer product of eigenvalues (d_g x d_a)
    qa: Tensor | None = None
    qg: Tensor | None = None
    dgda: Tensor | None = None
    # inverse method: damped inverses
    a_inv: Tensor | None = None
    g_inv: Tensor | None = None

    def decomposed(self) -> bool:
        return self.qa is not None or self.a_inv is not None


class KFACPreconditioner:
    """Preconditions the gradients of a model's Linear, Conv1d and Conv2d layers in place with (DP-)K-FAC.

    Args:
        model: the module whose layers to precondition (the inner module when wrapped in DDP: hooks
            registered on it fire through the wrapper).
        config: a :class:`KFACConfig`; keyword arguments override its fields (``damping=3e-3``, ...).
        process_group: the group that shares the work (default: the default group when
            ``torch.distributed`` is initialized, else a single process).
        comm: a :class:`Communicator` to use instead of one on ``process_group`` (the Lightning strategy
            shares its own, so that DDP's gradient traffic and K-FAC's are counted together).

    Call :meth:`step` after the gradients are averaged over ranks and before ``optimizer.step()``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        comm: Communicator | None = None,
        **overrides: Any,
    ) -> None:
        self.config = (config or KFACConfig()).replace(**overrides) if overrides else (config or KFACConfig())
        self.model = model
        self.comm = comm or Communicator(process_group, int(self.config.bucket_cap_mb * 2**20))
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.layers, self.skipped = discover_layers(model, self.config.skip_layers)
        self.costs = [layer_cost(LayerShape(l.d_a, l.d_g), self.config.inv_update_steps) for l in self.layers]
        self.owners = assign_owners(self.costs, self.world_size)
        self.steps = 0
        self.timings: dict[str, float] = defaultdict(float)  # seconds, cumulative, per phase
        self._states: dict[int, _LayerState] = {
            i: _LayerState(dtype=torch.promote_types(layer.weight.dtype, torch.float32))
            for i, layer in enumerate(self.layers)
            if self._builds_factors(i)
        }
        self._param_owner = {
            id(p): owner for layer, owner in zip(self.layers, self.owners) for p in layer.module.parameters(recurse=False)
        }
        self._handles: list[RemovableHandle] = []
        for i in self._states:
            self._handles.append(self.layers[i].module.register_forward_hook(partial(self._on_forward, i)))
        log.info(self.describe())

    # ------------------------------------------------------------------ who does what
    def _builds_factors(self, index: int) -> bool:
        return self.config.mode == "dkfac" or self.owners[index] == self.rank

    def owner_of(self, name: str) -> int:
        """The rank that owns layer ``name``."""
        return self.owners[self._index(name)]

    def _index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"'{name}' is not a K-FAC layer; covered layers: {[l.name for l in self.layers]}")

    def factors(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The running-average factors ``(A, G)`` this rank holds for layer ``name``, or ``None``."""
        state = self._states.get(self._index(name))
        if state is None or state.A is None or state.G is None:
            return None
        return state.A, state.G

    def holds_state(self, name: str) -> bool:
        """Whether this rank keeps any factor or decomposition tensor for layer ``name``."""
        return self._index(name) in self._states

    def describe(self) -> str:
        """A table of covered layers with their factor sizes and owners, and the skipped layers."""
        lines = [f"K-FAC ({self.config.mode}, {self.config.method}) on {len(self.layers)} layers, "
                 f"{self.world_size} rank(s), load max/mean {self.load_imbalance():.3f}:"]
        for layer, owner in zip(self.layers, self.owners):
            lines.append(f"  {layer.name:<32} {type(layer.module).__name__:<8} A {layer.d_a:>5}  "
                         f"G {layer.d_g:>5}  owner {owner}")
        for name, reason in self.skipped.items():
            lines.append(f"  {name:<32} plain gradient: {reason}")
        return "\n".join(lines)

    def load_imbalance(self) -> float:
        """max/mean of the owners' cost: 1.0 is perfect balance."""
        return load_imbalance(self.costs, self.owners, self.world_size)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of K-FAC state this rank holds: running factors and decompositions."""
        out = {"factors": 0, "decompositions": 0}
        for state in self._states.values():
            for key, names in (("factors", ("A", "G", "a_batch", "g_batch")),
                               ("decompositions", ("qa", "qg", "dgda", "a_inv", "g_inv"))):
                for attr in names:
                    tensor = getattr(state, attr)
                    if tensor is not None:
                        out[key] += tensor.numel() * tensor.element_size()
        return out

    @property
    def bytes_sent(self) -> dict[str, float]:
        """Cumulative per-rank traffic by kind (see :mod:`lightning_dpkfac.comm` for the convention)."""
        return dict(self.comm.bytes_sent)

    def register_ddp_comm_hook(self, ddp: DistributedDataParallel) -> None:
        """Install this engine's gradient communication on ``ddp`` (call before the first backward).

        ``dpkfac``: the gradients of each K-FAC layer are *reduced to its owner only* (the owner is the
        only rank that reads them), the other parameters all-reduced as usual; :meth:`step` then
        broadcasts every layer's result, so the total traffic equals one DDP all-reduce. Until
        :meth:`step` has run, a rank's gradients of layers it does not own are not averaged: call
        :meth:`step` on every optimizer step. ``dkfac``: DDP's all-reduce, counted as "gradients".
        """
        if self.config.mode == "dpkfac":
            ddp.register_comm_hook(self, owner_reduce_hook)
        else:
            ddp.register_comm_hook(self.comm, counting_all_reduce_hook)

    def gradient_owner(self, param: Tensor) -> int | None:
        """The rank that owns ``param``'s gradient (a K-FAC layer's weight or bias), or None."""
        return self._param_owner.get(id(param))

    def remove_hooks(self) -> None:
        """Detach from the model; the preconditioner stops capturing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ capture (hooks)
    def _capturing(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.steps % self.config.factor_update_steps == 0

    def _on_forward(self, index: int, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self._capturing(module) or not isinstance(output, Tensor):
            return
        state = self._states[index]
        with self._timed("factor"), torch.no_grad(), _autocast_off(output.device):
            A = self.layers[index].a_factor(inputs[0].detach(), state.dtype)
            state.a_batch = A if state.a_batch is None else state.a_batch.add_(A)
            state.a_count += 1
        if output.requires_grad:
            _grad_target(output).register_hook(partial(self._on_output_grad, index, output.shape))

    def _on_output_grad(self, index: int, shape: torch.Size, grad_output: Tensor) -> None:
        state = self._states[index]
        with self._timed("factor"), torch.no_grad(), _autocast_off(grad_output.device):
            G = self.layers[index].g_factor(grad_output.reshape(shape), state.dtype)
            state.g_batch = G if state.g_batch is None else state.g_batch.add_(G)
            state.g_count += 1

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """Precondition every covered layer's ``.grad`` in place (identically on every rank).

        Args:
            lr: learning rate for KL-clip this step (default: the config's ``lr``).
        """
        cfg, k = self.config, self.steps
        damping = cfg.value("damping", k)
        kl_clip = cfg.value("kl_clip", k)
        if lr is None:
            lr = cfg.value("lr", k)
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs a learning rate: pass lr=... to KFACPreconditioner or to step(), "
                             "or set kl_clip=None.")
        if k % cfg.factor_update_steps == 0:
            self._update_factors(cfg.value("factor_decay", k))
        if k % cfg.inv_update_steps == 0:
            with self._timed("inverse"):
                for state in self._owned_states():
                    self._decompose(state, damping)
        self._precondition_and_share(damping, kl_clip, lr)
        self.steps += 1

    def _owned_states(self) -> Iterator[_LayerState]:
        for i, state in self._states.items():
            if self.owners[i] == self.rank:
                yield state

    def _update_factors(self, decay: float) -> None:
        """Fold the captured batch factors into the running averages; in dkfac, all-reduce them first."""
        batch: dict[int, tuple[Tensor | None, Tensor | None]] = {}
        with self._timed("factor"):
            for i, s in self._states.items():
                a = s.a_batch / s.a_count if s.a_batch is not None and s.a_count else None
                g = s.g_batch / s.g_count if s.g_batch is not None and s.g_count else None
                batch[i] = (a, g)
                s.a_batch = s.g_batch = None
                s.a_count = s.g_count = 0
        if self.config.mode == "dkfac" and self.world_size > 1:
            batch = self._all_reduce_factors(batch)
        with self._timed("factor"):
            for i, (a, g) in batch.items():
                s = self._states[i]
                if a is not None and g is not None:
                    s.A = a if s.A is None else s.A.mul_(decay).add_(a, alpha=1 - decay)
                    s.G = g if s.G is None else s.G.mul_(decay).add_(g, alpha=1 - decay)

    def _all_reduce_factors(
        self, batch: dict[int, tuple[Tensor | None, Tensor | None]]
    ) -> dict[int, tuple[Tensor | None, Tensor | None]]:
        """Average each layer's batch factors over the ranks that captured it (a weight rides along)."""
        tensors: list[Tensor] = []
        for i, (a, g) in batch.items():
            layer, dtype = self.layers[i], self._states[i].dtype
            device = layer.weight.device
            captured = a is not None and g is not None
            tensors += [
                a if captured else torch.zeros(layer.d_a, layer.d_a, dtype=dtype, device=device),
                g if captured else torch.zeros(layer.d_g, layer.d_g, dtype=dtype, device=device),
                torch.full((1,), float(captured), dtype=dtype, device=device),
            ]
        with self._timed("comm"):
            self.comm.all_reduce_sum(tensors, "factors")
        out: dict[int, tuple[Tensor | None, Tensor | None]] = {}
        for j, i in enumerate(batch):
            a, g, weight = tensors[3 * j : 3 * j + 3]
            n = float(weight.item())
            out[i] = (a / n, g / n) if n > 0 else (None, None)
        return out

    def _decompose(self, state: _LayerState, damping: float) -> None:
        if state.A is None or state.G is None:
            return
        if self.config.method == "eigen":
            da, state.qa = torch.linalg.eigh(state.A)
            dg, state.qg = torch.linalg.eigh(state.G)
            # Round-off can make eigenvalues of these PSD matrices slightly negative: clip at zero.
            state.dgda = torch.outer(dg.clamp_(min=0), da.clamp_(min=0))
        else:
            eye_a = torch.eye(state.A.shape[0], dtype=state.A.dtype, device=state.A.device)
            eye_g = torch.eye(state.G.shape[0], dtype=state.G.dtype, device=state.G.device)
            state.a_inv = torch.linalg.inv(state.A + damping * eye_a)
            state.g_inv = torch.linalg.inv(state.G + damping * eye_g)

    def _precondition(self, state: _LayerState, grad: Tensor, damping: float) -> Tensor:
        """``P`` (d_g x d_a) for the gradient matrix ``grad``, in the factor dtype."""
        grad = grad.to(state.dtype)
        if state.qa is not None:
            assert state.qg is not None and state.dgda is not None
            v = state.qg.T @ grad @ state.qa
            return state.qg @ (v / (state.dgda + damping)) @ state.qa.T
        assert state.g_inv is not None and state.a_inv is not None
        return state.g_inv @ grad @ state.a_inv

    def _precondition_and_share(self, damping: float, kl_clip: float | None, lr: float | None) -> None:
        """Owners precondition, broadcast ``[P, sum(P*grad), flag]`` per layer; all ranks KL-clip and write."""
        payloads: list[Tensor] = []
        with self._timed("precondition"):
            for i, layer in enumerate(self.layers):
                dtype, device = layer.weight.dtype, layer.weight.device
                if self.owners[i] != self.rank:
                    payloads.append(torch.empty(layer.num_params + 2, dtype=dtype, device=device))
                    continue
                grad = layer.grad_matrix()
                state = self._states[i]
                if grad is None or not state.decomposed():
                    plain = grad if grad is not None else torch.zeros(layer.d_g, layer.d_a, dtype=dtype, device=device)
                    payloads.append(torch.cat([plain.reshape(-1), plain.new_zeros(2)]))
                    continue
                p = self._precondition(state, grad, damping)
                vg = (p * grad.to(p.dtype)).sum().reshape(1)
                payloads.append(torch.cat([p.reshape(-1), vg, vg.new_ones(1)]).to(dtype))
        with self._timed("comm"):
            self.comm.broadcast_from_owners(payloads, self.owners, "preconditioned")
        with self._timed("precondition"):
            scale = self._kl_scale(payloads, kl_clip, lr)
            for layer, payload in zip(self.layers, payloads):
                if layer.weight.grad is None:
                    continue
                flag = payload[-1]
                factor = torch.where(flag > 0, scale.to(payload.dtype), torch.ones_like(flag))
                layer.set_grad_matrix((payload[:-2] * factor).view(layer.d_g, layer.d_a))

    def _kl_scale(self, payloads: list[Tensor], kl_clip: float | None, lr: float | None) -> Tensor:
        """``nu = min(1, sqrt(kl_clip / |lr^2 sum_l sum(P_l * grad_l)|))`` as a 0-d float64 tensor, computed
        from broadcast values in a fixed order, so it is bitwise the same on every rank (no host sync)."""
        device = payloads[0].device if payloads else torch.device("cpu")
        if kl_clip is None or not payloads:
            return torch.ones((), dtype=torch.float64, device=device)
        assert lr is not None
        vg = torch.stack([(p[-2] * p[-1]).to(torch.float64).to(device) for p in payloads]).sum()
        ratio = kl_clip / (lr**2 * vg.abs())
        return torch.clamp(torch.sqrt(ratio), max=1.0)

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - start


def _grad_target(output: Tensor) -> Tensor:
    """The tensor whose gradient hook sees d loss / d output, even if ``output`` is modified in place.

    A Linear on N-D input returns a reshaped *view* of a 2-D result; an in-place op on that view (e.g.
    ``ReLU(inplace=True)``) rebases the view's history and silently drops hooks registered on it. Hooks
    on the view's base survive and receive the same gradient, flattened.
    """
    base = output._base
    if base is not None and base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous():
        return base
    return output


@contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Factor math runs in the factor dtype even inside ``torch.autocast``."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
