"""The K-FAC engine: ``KFACPreconditioner(model, ...)``, usable from plain PyTorch and from Lightning.

One optimizer step, after ``loss.backward()`` and the gradient sync (DDP's all-reduce, or, after
:meth:`KFACPreconditioner.register_ddp_comm_hook` in dpkfac, a reduce of each layer's gradient to its owner):

1. factors   ``dpkfac``: each layer's owner turns the A and G it captured from its *local* batch into
             the running average; no factor crosses the network.
             ``dkfac``: every rank captured every layer; the batch factors are all-reduced first.
2. decompose every ``inv_update_steps``: the owner eigendecomposes (or inverts) its layers' factors;
             ``dkfac`` broadcasts them, so that every rank holds every decomposition (D-KFAC as in
             KAISA's COMM_OPT and MPD-KFAC, the paper's baseline).
3. precondition  ``dpkfac``: the owner turns the averaged gradient of its layers into
             ``P = G^-1 grad A^-1``; ``dkfac``: every rank does, for every layer.
4. share     ``dpkfac``: owners broadcast ``P`` (bucketed, per owner) with ``sum(P * grad)`` and a
             "preconditioned" flag; every rank then applies the same KL-clip scale and writes ``P``
             into ``.grad``.

Numerical faults never make ranks disagree: the owner decides, per layer and step, between "preconditioned",
"preconditioned with the last good decomposition" and "plain gradient", and that decision travels in the
broadcast flag (dkfac: the decomposition's flag travels with it, and every rank takes the same decision
from the same values). Non-finite batch factors are not folded into the running average; a failed
decomposition is retried in float64 and then with 10x damping before the last good one is kept.

Captures happen in module hooks during forward/backward of a step whose index is a multiple of
``factor_update_steps``: ``A`` in a forward hook, ``G`` in a hook on the layer's output tensor (full
backward hooks break with ``ReLU(inplace=True)``). Only modules in training mode with grad enabled are
captured, so validation passes never touch the factors. The ``A`` of a convolution whose input is an
activation is formed later, in ``step()``, from that input (``factors.DeferredFactor``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from lightning_dpkfac.distributed.assignment import LayerShape, assign_owners, layer_cost, load_imbalance, rank_loads
from lightning_dpkfac.distributed.comm import Communicator, counting_all_reduce_hook, owner_reduce_hook
from lightning_dpkfac.core.config import KFACConfig
from lightning_dpkfac.core.factors import BatchFactor, DeferredFactor
from lightning_dpkfac.core.layers import (
    KFACLayer,
    discover_layers,
    grad_hook_target,
    layers_of_params,
    plain_parameters,
    tied_names,
)
from lightning_dpkfac.distributed.rows import RowGatherer

log = logging.getLogger("lightning_dpkfac")

# The per-layer flag that rides with each broadcast result (all ranks act on it identically).
PLAIN = 0.0  # not preconditioned (no decomposition yet, or no gradient)
PRECONDITIONED = 1.0
PRECONDITIONED_AFTER_FAULT = 2.0  # preconditioned with the last good state after a failed update
PLAIN_AFTER_FAULT = 3.0  # a fault left no usable preconditioner: plain gradient
NONFINITE_GRADIENT = 4.0  # the averaged gradient itself is inf/NaN: no rank applies this step's update

#: A first decomposition step slower than this (seconds, on one rank) is reported once, naming its largest
#: layers; factors of at least ``LARGE_FACTOR`` rows are announced before it starts.
SLOW_DECOMPOSITION_S = 1.0
LARGE_FACTOR = 2048


STATE_FORMAT = 1
_STATE_TENSORS = ("A", "G", "qa", "qg", "dgda", "a_inv", "g_inv")


class KFACNumericalError(RuntimeError):
    """A layer's K-FAC state, or the averaged gradient, was non-finite on ``max_consecutive_faults`` steps
    in a row."""


@dataclass
class _LayerState:
    """What a rank holds for one layer. Factors are ``dtype`` (float32, or float64 for float64 models)."""

    dtype: torch.dtype
    a_batch: BatchFactor = field(default_factory=BatchFactor)  # A's captures since the last factor update
    g_batch: BatchFactor = field(default_factory=BatchFactor)  # G's captures
    a_count: int = 0  # forward captures (uses x micro-batches)
    g_passes: int = 0  # distinct backward passes that reached the layer (micro-batches)
    g_task: int = -1  # id of the backward pass of the last G capture
    A: Tensor | None = None  # running averages
    G: Tensor | None = None
    # eigen method: eigenvectors and the outer product of eigenvalues (d_g x d_a)
    qa: Tensor | None = None
    qg: Tensor | None = None
    dgda: Tensor | None = None
    # inverse method: damped inverses
    a_inv: Tensor | None = None
    g_inv: Tensor | None = None
    fault: bool = False  # a factor update or decomposition of this step failed (owner only)

    def decomposed(self) -> bool:
        return self.qa is not None or self.a_inv is not None


@dataclass(frozen=True)
class LayerStateView:
    """A copy of one layer's K-FAC state on this rank (:meth:`KFACPreconditioner.layer_state`)."""

    name: str
    owner: int
    dtype: torch.dtype  # of the factors and decompositions
    A: Tensor | None
    G: Tensor | None
    decomposition: dict[str, Tensor]


class KFACPreconditioner:
    """Preconditions the gradients of a model's Linear, Conv1d and Conv2d layers in place with (DP-)K-FAC.

    Args:
        model: the module whose layers to precondition (the inner module when wrapped in DDP: hooks
            registered on it fire through the wrapper).
        config: a :class:`KFACConfig`; keyword arguments override its fields (``damping=3e-3``, ...).
        process_group: the group that shares the work (default: the default group when
            ``torch.distributed`` is initialized, else a single process).

    Call :meth:`step` after the gradients are averaged over ranks and before ``optimizer.step()``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **overrides: Any,
    ) -> None:
        self.config = (config or KFACConfig()).replace(**overrides)
        self.model = model
        self.comm = Communicator(process_group, int(self.config.kfac_bucket_cap_mb * 2**20))
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.layers, self.skipped = discover_layers(model, self.config.skip_layers, self.config.max_factor_dim,
                                                    self.world_size, self.config.inv_update_steps)
        #: trainable parameters left to their plain gradient, with the reason (``describe()`` lists them)
        self.plain = plain_parameters(model, self.layers, self.skipped)
        self.costs = [layer_cost(LayerShape(l.d_a, l.d_g), self.config.inv_update_steps) for l in self.layers]
        self.owners = assign_owners(self.costs, self.world_size)
        self._layers_of = {r: [i for i, o in enumerate(self.owners) if o == r] for r in range(self.world_size)}
        loads = rank_loads(self.costs, self.owners, self.world_size)
        self._broadcast_order = sorted((r for r in range(self.world_size) if self._layers_of[r]), key=lambda r: (loads[r], r))
        self.steps = 0
        self.timings: dict[str, float] = defaultdict(float)  # seconds, cumulative, per phase
        self.faults_total = 0  # layer-steps with a numerical fault, the same count on every rank
        self.last_step_faults = 0
        self._consecutive_faults = [0] * len(self.layers)
        self.skipped_steps = 0  # steps whose averaged gradient was non-finite: no update applied
        self.last_step_skipped = False
        self._consecutive_skips = 0
        self._decompositions_reported = False  # the first decomposition step's cost is logged once
        self._awaiting_step = False  # the owner-reduce hook finished a backward that step() has not followed
        self._loss_scale_fn: Callable[[], float] | None = None  # AMP GradScaler's current scale, if any
        self._loss_scale: float | None = None  # read once per step
        self._states: dict[int, _LayerState] = {
            i: _LayerState(dtype=torch.promote_types(layer.weight.dtype, torch.float32))
            for i, layer in enumerate(self.layers)
            if self._builds_factors(i)
        }
        self._layers_of_param = layers_of_params(self.layers)
        # Row gathering: started by register_ddp_comm_hook in dpkfac (see lightning_dpkfac.distributed.rows).
        self._rows = RowGatherer(self.layers, self.owners, self.comm)
        self._handles: list[RemovableHandle] = []
        for i in self._states:
            # Under torch.compile the hook runs eagerly (a graph break) rather than being traced.
            hook = torch.compiler.disable(partial(self._on_forward, i))
            self._handles.append(self.layers[i].module.register_forward_hook(hook))

    # ------------------------------------------------------------------ who does what
    def _builds_factors(self, index: int) -> bool:
        return self.config.mode == "dkfac" or self.owners[index] == self.rank

    @property
    def _keeps_rows(self) -> bool:
        """dpkfac: a capture with fewer rows than columns is kept as rows until the fold (factors.BatchFactor);
        dkfac forms every factor, which it all-reduces."""
        return self.config.mode == "dpkfac"

    @property
    def _shares_decompositions(self) -> bool:
        """dkfac: owners broadcast decompositions and every rank preconditions every layer."""
        return self.config.mode == "dkfac" and self.world_size > 1

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

    def layer_state(self, name: str) -> LayerStateView | None:
        """A copy of what this rank holds for layer ``name`` (``None`` if nothing): running factors and the
        decomposition's tensors by their checkpoint names (eigen: ``qa``, ``qg``, ``dgda``; inverse:
        ``a_inv``, ``g_inv``)."""
        index = self._index(name)
        state = self._states.get(index)
        if state is None:
            return None

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        decomposition = {key: copy(getattr(state, key)) for key in _STATE_TENSORS[2:] if getattr(state, key) is not None}
        return LayerStateView(name, self.owners[index], state.dtype, copy(state.A), copy(state.G), decomposition)

    def captures(self, name: str) -> frozenset[str]:
        """What this rank captures for layer ``name`` in forward and backward: ``"factors"`` (its A and G)
        and/or ``"rows"`` (its input and output-gradient rows, for row gathering)."""
        index = self._index(name)
        kinds = {"factors"} if index in self._states and self._handles else set()
        if index in self._rows.captures:
            kinds.add("rows")
        return frozenset(kinds)

    def describe(self) -> str:
        """A table of the covered layers (factor sizes, owner, weight tying) and of every trainable
        parameter left to its plain gradient, with the reason."""
        if self.layers:
            lines = [f"K-FAC ({self.config.mode}, {self.config.method}) on {len(self.layers)} layers, "
                     f"{self.world_size} rank(s), load max/mean {self.load_imbalance():.3f}:"]
        else:
            lines = [f"K-FAC ({self.config.mode}) covers no layer of this model: it trains exactly like DDP "
                     "(every gradient all-reduced, none preconditioned)."]
        for layer, owner in zip(self.layers, self.owners):
            tied = tied_names(self.model, layer)
            note = f"  weight tied with {', '.join(tied)} (its gradient sums every use)" if tied else ""
            lines.append(f"  {layer.name:<40} {type(layer.module).__name__:<8} A {layer.d_a:>5}  "
                         f"G {layer.d_g:>5}  owner {owner}{note}")
        if self.plain:
            lines.append("Plain gradient (not preconditioned):")
            groups: dict[tuple[str, str], list[str]] = defaultdict(list)  # (module, reason) -> parameters
            for name, reason in self.plain.items():
                module, _, param = name.rpartition(".")
                groups[(module, reason)].append(param)
            lines += [f"  {module or '(model)':<40} {', '.join(params)}: {reason}"
                      for (module, reason), params in groups.items()]
        return "\n".join(lines)

    def load_imbalance(self) -> float:
        """max/mean of the owners' cost: 1.0 is perfect balance."""
        return load_imbalance(self.costs, self.owners, self.world_size)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of K-FAC state this rank holds: running factors and decompositions; ``factors`` includes the
        captures not yet folded (a layer input held for a deferred factor counts once, however many blocks
        of its layer hold it)."""
        out = {"factors": 0, "decompositions": 0}
        held = {(t.data_ptr(), t.numel()): t for s in self._states.values() for t in s.a_batch.held() + s.g_batch.held()}
        out["factors"] = sum(t.numel() * t.element_size() for t in held.values())
        for state in self._states.values():
            for key, names in (("factors", ("A", "G")), ("decompositions", ("qa", "qg", "dgda", "a_inv", "g_inv"))):
                for attr in names:
                    tensor = getattr(state, attr)
                    if tensor is not None:
                        out[key] += tensor.numel() * tensor.element_size()
        return out

    @property
    def bytes_sent(self) -> dict[str, float]:
        """Cumulative per-rank traffic by kind (see :mod:`lightning_dpkfac.distributed.comm` for the convention)."""
        return dict(self.comm.bytes_sent)

    def register_ddp_comm_hook(self, ddp: DistributedDataParallel) -> None:
        """Install this engine's gradient communication on ``ddp`` (call before the first backward).

        ``dpkfac``: the gradients of each K-FAC layer are *reduced to its owner only* (the owner is the
        only rank that reads them), the other parameters all-reduced as usual; :meth:`step` then
        broadcasts every layer's result, so the total traffic equals one DDP all-reduce. Until
        :meth:`step` has run, a rank's gradients of layers it does not own are not averaged: call
        :meth:`step` on every optimizer step. ``dkfac``, a model with no K-FAC layer, or any mode under a
        loss scaler (:meth:`set_loss_scale`): DDP's all-reduce, counted as "gradients" -- a scaler skips a
        step from its own rank's gradients, and only complete gradients make that decision the same everywhere.
        """
        if self.config.mode == "dpkfac" and self._loss_scale_fn is None and self.layers:
            ddp.register_comm_hook(self, owner_reduce_hook)
            if self.config.gather_rows and self.world_size > 1:
                self._rows.start()
        else:
            ddp.register_comm_hook(self.comm, counting_all_reduce_hook)

    def set_loss_scale(self, scale_fn: Callable[[], float] | None) -> None:
        """Tell the engine that backward runs on a loss scaled by ``scale_fn()`` (e.g.
        ``GradScaler.get_scale``): captured output gradients are unscaled before G is built, and
        non-finite factors or results then count as overflow steps (skipped by the scaler too), not faults.
        Call it before :meth:`register_ddp_comm_hook`.
        """
        self._loss_scale_fn = scale_fn
        self._loss_scale = None

    def on_gradient_bucket(self, is_last: bool) -> None:
        """Called by the owner-reduce hook for each gradient bucket. A bucket arriving after a complete
        backward that no :meth:`step` followed means the reduced gradients were never completed."""
        if self._awaiting_step:
            raise RuntimeError(
                "dpkfac reduced the gradients of each K-FAC layer to its owner, but KFACPreconditioner.step() "
                "was not called before the next backward, so the other ranks never received them. In Lightning "
                "with manual optimization, call step() on the optimizer from self.optimizers() (a "
                "LightningOptimizer, which runs K-FAC), not on the raw torch optimizer; in plain PyTorch call "
                "pre.step() after every backward that synchronises gradients."
            )
        self._awaiting_step = is_last

    def gradient_pieces(self, param: Tensor, grad: Tensor) -> list[tuple[int | None, Tensor]]:
        """Where the owner-reduce hook sends ``grad`` (``param``'s gradient): ``[(None, grad)]`` (all-reduce)
        for a parameter outside the K-FAC layers, else ``(owner, piece)`` for each layer (block) that reads
        it, except the layers whose owner gathers their rows instead (their piece stays local)."""
        layers = self._layers_of_param.get(id(param))
        if layers is None:
            return [(None, grad)]
        return [(self.owners[i], self.layers[i].grad_piece(param, grad)) for i in layers if not self._rows.gathers(i)]

    def check_row_gradient(self, param: Tensor, grad: Tensor) -> None:
        """During the first step, record whether this rank's gradient of ``param`` equals ``g^T a``."""
        self._rows.check(param, grad)

    @property
    def row_layers(self) -> list[str]:
        """The layers whose owner gathers their rows instead of their gradient."""
        return [self.layers[i].name for i in self._rows.chosen]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The state of the layers this rank *owns*: factors and decompositions as CPU tensors, plus
        counters. Only tensors, numbers and strings, so ``torch.load(weights_only=True)`` reads it."""
        layers: dict[str, dict[str, Any]] = {}
        for i, s in self._states.items():
            if self.owners[i] != self.rank or s.A is None or s.G is None:
                continue
            layer = self.layers[i]
            entry: dict[str, Any] = {"d_a": layer.d_a, "d_g": layer.d_g, "module": layer.module_name,
                                     "module_dims": list(layer.module_dims), "block": list(astuple(layer.block))}
            for key in _STATE_TENSORS:
                tensor = getattr(s, key)
                if tensor is not None:
                    entry[key] = tensor.detach().cpu().clone()
            layers[layer.name] = entry
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "world_size": self.world_size,
            "row_layers": [self.layers[i].name for i in self._rows.chosen],
            "method": self.config.method,
            "faults_total": self.faults_total,
            "consecutive_faults": {l.name: n for l, n in zip(self.layers, self._consecutive_faults)},
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "layers": layers,
        }

    def gather_state_dict(self, dst: int = 0) -> dict[str, Any] | None:
        """Collective: every layer's state, each from its owner, on rank ``dst`` (``None`` elsewhere).
        Rank ``dst`` holds all factors only while the caller keeps the result (e.g. during a save)."""
        local = self.state_dict()
        if self.world_size == 1:
            return local
        gathered: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(local, gathered, dst=self.comm.global_rank(dst), group=self.comm.group)
        if gathered is None:
            return None
        for part in gathered[1:]:
            local["layers"].update(part["layers"])
        return local

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a full state (:meth:`gather_state_dict` of any world size): every rank keeps the
        layers it holds under *this* run's owner map. Raises ``ValueError`` naming any mismatch."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a K-FAC state of format {STATE_FORMAT}: got keys {sorted(state)[:8]}")
        saved, recut, sources = self._recut(state["layers"])
        problems = [f"missing layer '{l.name}'" for l in self.layers if l.name not in saved]
        known = {l.name for l in self.layers} | sources
        problems += [f"unexpected layer '{n}'" for n in state["layers"] if n not in known]
        for layer in self.layers:
            entry = saved.get(layer.name)
            if entry is not None and (entry["d_a"], entry["d_g"]) != (layer.d_a, layer.d_g):
                problems.append(f"layer '{layer.name}' has factors A {entry['d_a']}x{entry['d_a']}, "
                                f"G {entry['d_g']}x{entry['d_g']} in the checkpoint but "
                                f"A {layer.d_a}x{layer.d_a}, G {layer.d_g}x{layer.d_g} in the model")
        if problems:
            hint = ". Was it saved from another model or with other skip_layers or max_factor_dim?"
            if self.config.max_factor_dim == "auto" and state["world_size"] != self.world_size:
                hint = (f". max_factor_dim='auto' splits layers for the world size: the checkpoint was saved on "
                        f"{state['world_size']} rank(s), this run has {self.world_size}, and a block resumes only "
                        f"inside a saved layer or block. Fix: resume on {state['world_size']} rank(s), or train "
                        "with a fixed max_factor_dim (an integer or None).")
            raise ValueError("The K-FAC state in the checkpoint does not match this model: " + "; ".join(problems) + hint)
        same_method = state["method"] == self.config.method
        for i, s in self._states.items():
            entry, device = saved[self.layers[i].name], self.layers[i].weight.device
            for key in _STATE_TENSORS:
                held = self.owners[i] == self.rank or self._shares_decompositions
                owned_decomposition = key not in ("A", "G") and held and same_method
                value = entry.get(key) if key in ("A", "G") or owned_decomposition else None
                setattr(s, key, None if value is None else value.to(device=device, dtype=s.dtype))
            s.a_batch, s.g_batch = BatchFactor(), BatchFactor()
            s.a_count = s.g_passes = 0
        self.steps = int(state["steps"])
        # The same world size keeps the row-gathering decision (a resume must not re-decide: the first
        # step's gradient path would round differently from the uninterrupted run's rows path).
        if state.get("world_size") == self.world_size and "row_layers" in state and self.config.gather_rows:
            self._rows.restore(list(state["row_layers"]))
        self.faults_total = int(state["faults_total"])
        self._consecutive_faults = [int(state["consecutive_faults"].get(l.name, 0)) for l in self.layers]
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        # Decompositions of the other method, or of another cut, are useless: make new ones now.
        damping = self.config.value("damping", self.steps)
        for i, state_ in self._states.items():  # dkfac: every rank, from the same factors
            held = self.owners[i] == self.rank or self._shares_decompositions
            stale = not same_method or self.layers[i].name in recut
            if stale and held and state_.A is not None and state_.G is not None:
                self._store_decomposition(state_, self._decompose(state_, damping))

    def _recut(self, saved: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], set[str], set[str]]:
        """``saved`` (a state's layers) plus, for each of this run's blocks that it lacks, the diagonal blocks
        of its factors sliced from a saved layer or block of the same module that contains it (exact: a
        block's factors are those diagonal blocks). Returns the entries, the names of the re-cut layers,
        and the saved names they were cut from."""
        out, recut, sources = dict(saved), set(), set()
        for layer in self.layers:
            if layer.name in saved:
                continue
            b = layer.block
            for name, entry in saved.items():
                s0, s1, t0, t1 = entry.get("block", (0, entry["d_g"], 0, entry["d_a"]))
                if (entry.get("module", name) == layer.module_name
                        and tuple(entry.get("module_dims", (entry["d_g"], entry["d_a"]))) == layer.module_dims
                        and s0 <= b.r0 and b.r1 <= s1 and t0 <= b.c0 and b.c1 <= t1):
                    out[layer.name] = {"d_a": layer.d_a, "d_g": layer.d_g,
                                       "A": entry["A"][b.c0 - t0 : b.c1 - t0, b.c0 - t0 : b.c1 - t0].clone(),
                                       "G": entry["G"][b.r0 - s0 : b.r1 - s0, b.r0 - s0 : b.r1 - s0].clone()}
                    recut.add(layer.name)
                    sources.add(name)
                    break
        return out, recut, sources

    def remove_hooks(self) -> None:
        """Detach from the model; the preconditioner stops capturing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._rows.remove()

    # ------------------------------------------------------------------ capture (hooks)
    def _capturing(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.steps % self.config.factor_update_steps == 0

    def _on_forward(self, index: int, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not self._capturing(module) or not isinstance(output, Tensor):
            return
        state, layer, x = self._states[index], self.layers[index], inputs[0].detach()
        with self._timed("factor"), torch.no_grad(), _autocast_off(output.device):
            rows = layer.a_row_count(output)
            if rows <= layer.n_w:  # few rows (a Linear on a small batch): a copy of them
                state.a_batch.add(layer.a_rows(x, state.dtype), 1 / rows, self._keeps_rows)
            elif rows * layer.n_w > x.numel() and inputs[0].grad_fn is not None:
                # Patches larger than the input (a convolution's im2col), of an activation (autograd keeps it
                # until this layer's backward, and no data loader reuses it): A is formed in step(), where
                # dpkfac's owners build it while other owners' results are on the wire, rather than here,
                # where the other ranks would wait for it at the gradient reduce and the patches would add
                # to the forward pass's peak memory. Holding the input costs less than those patches.
                state.a_batch.add(DeferredFactor(x, partial(self._a_factor, index, x), layer.name), None, self._keeps_rows)
            else:  # the rows are the input itself (a Linear), or the model's input, which a loader may reuse
                state.a_batch.add(layer.a_factor(x, state.dtype), None, self._keeps_rows)
            state.a_count += 1
        if output.requires_grad:
            grad_hook_target(output).register_hook(torch.compiler.disable(partial(self._on_output_grad, index, output.shape)))

    def _a_factor(self, index: int, x: Tensor) -> Tensor:
        """Layer ``index``'s A of input ``x``, formed now (a deferred capture), outside any autocast."""
        with _autocast_off(x.device):
            return self.layers[index].a_factor(x, self._states[index].dtype)

    def _on_output_grad(self, index: int, shape: torch.Size, grad_output: Tensor) -> None:
        state = self._states[index]
        with self._timed("factor"), torch.no_grad(), _autocast_off(grad_output.device):
            grad_output = grad_output.reshape(shape)
            if self._loss_scale_fn is not None:
                if self._loss_scale is None:
                    self._loss_scale = float(self._loss_scale_fn())
                grad_output = grad_output.to(state.dtype) / self._loss_scale
            state.g_batch.add(*self.layers[index].g_capture(grad_output, state.dtype), self._keeps_rows)
            task = torch._C._current_graph_task_id()
            if task != state.g_task or task == -1:
                state.g_passes += 1
                state.g_task = task

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
        self._awaiting_step = False
        self._loss_scale = None
        for state in self._states.values():
            state.fault = False
        fold = self._update_factors(cfg.value("factor_decay", k)) if k % cfg.factor_update_steps == 0 else None
        if k % cfg.inv_update_steps == 0:
            if fold is not None:  # the decomposition needs the new factors now
                fold()
                fold = None
                if k == 0:
                    self._warn_uncaptured()
            with self._timed("inverse"):
                results = self._decompose_owned(damping)
            if self._shares_decompositions:
                with self._timed("comm"):
                    results = self._broadcast_decompositions(results)
            for i, result in results.items():
                self._store_decomposition(self._states[i], result)
        others_finite = self._uncovered_gradients_finite()
        flags, others_ok = self._precondition_and_share(damping, kl_clip, lr, others_finite, while_sending=fold)
        if self._rows.deciding:
            self._rows.decide()
        nonfinite = [self.layers[i].name for i, flag in enumerate(flags) if flag == NONFINITE_GRADIENT]
        if nonfinite or not others_ok:
            self._skip_update(nonfinite if others_ok else [*nonfinite, "parameters outside the K-FAC layers"])
        else:
            self.last_step_skipped, self._consecutive_skips = False, 0
            self._count_faults(flags)
        self.steps += 1

    def _uncovered_gradients_finite(self) -> Tensor:
        """0-d bool: the gradients of the parameters outside the K-FAC layers (all-reduced by DDP, so the
        same on every rank) hold no inf/NaN. No host sync: it rides on the step's one sync of the flags."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in self._layers_of_param]
        if not grads:
            return torch.ones((), dtype=torch.bool)
        device = grads[0].device
        return torch.isfinite(torch.stack([g.sum().to(device=device, dtype=torch.float64) for g in grads]).sum())

    def _skip_update(self, where: list[str]) -> None:
        """The averaged gradient of ``where`` is non-finite (the same verdict on every rank): drop every
        gradient of the model, so that ``optimizer.step()`` changes no parameter and no optimizer state
        (SGD, Adam and the other torch optimizers skip a parameter without ``.grad``), and stop with an
        error once it happened on ``max_consecutive_faults`` steps in a row."""
        for param in self.model.parameters():
            param.grad = None
        self.last_step_skipped = True
        self.skipped_steps += 1
        self._consecutive_skips += 1
        limit = self.config.max_consecutive_faults
        if self.rank == 0:
            log.warning("K-FAC step %d: the averaged gradient is non-finite (inf/NaN) in %s; the update is skipped "
                        "on every rank (%d in a row; training stops at max_consecutive_faults=%d)",
                        self.steps, ", ".join(where), self._consecutive_skips, limit)
        if self._consecutive_skips >= limit:
            first = self.steps - self._consecutive_skips + 1
            raise KFACNumericalError(
                f"The averaged gradient was non-finite (inf/NaN) on {limit} consecutive steps ({first} to "
                f"{self.steps}), in {', '.join(where)} at the last one. No rank applied those updates, so the "
                "weights are still finite. The likely cause is the data: an inf/NaN in the inputs or targets of "
                "those batches (check them with torch.isfinite), or a loss that overflows (lower the learning "
                "rate). Raise max_consecutive_faults to tolerate longer runs of bad batches."
            )

    def _decompose_owned(self, damping: float) -> dict[int, tuple[Tensor, ...] | None]:
        """The new decompositions of the layers this rank owns (that have factors); the first time, a
        slow one is reported, naming the layers that dominate it and the settings that help."""
        owned = [i for i, s in self._states.items() if self.owners[i] == self.rank and s.A is not None and s.G is not None]
        if self._decompositions_reported or not owned:
            return {i: self._decompose(self._states[i], damping) for i in owned}
        self._decompositions_reported = True
        largest = max(owned, key=lambda i: max(self.layers[i].d_a, self.layers[i].d_g))
        if max(self.layers[largest].d_a, self.layers[largest].d_g) >= LARGE_FACTOR:
            log.warning("K-FAC rank %d: decomposing factors of up to %s (%s) now and every inv_update_steps=%d "
                        "steps; this can take minutes on a CPU", self.rank, _factor_sizes(self.layers[largest]),
                        self.layers[largest].name, self.config.inv_update_steps)
        results, seconds = {}, {}
        for i in owned:
            start = time.perf_counter()
            results[i] = self._decompose(self._states[i], damping)
            seconds[i] = time.perf_counter() - start
        total = sum(seconds.values())
        if total >= SLOW_DECOMPOSITION_S:
            top = sorted(seconds, key=seconds.__getitem__, reverse=True)[:3]
            log.warning(
                "K-FAC rank %d: the %s decompositions took %.1f s at step %d, and recur every inv_update_steps=%d "
                "steps. Largest: %s. Their cost grows with the cube of the factor size: max_factor_dim='auto' (or "
                "a number such as 1024) splits wide layers into blocks, method='inverse' costs a fraction of "
                "'eigen', and a larger inv_update_steps decomposes less often.",
                self.rank, self.config.method, total, self.steps, self.config.inv_update_steps,
                "; ".join(f"{self.layers[i].name} ({_factor_sizes(self.layers[i])}) {seconds[i]:.1f} s" for i in top))
        return results

    def _warn_uncaptured(self) -> None:
        """After the first step: name the owned layers whose forward never ran (bypassed or unused);
        they keep their plain gradient until they are called."""
        idle = [self.layers[i].name for i, s in self._states.items() if self.owners[i] == self.rank and s.A is None]
        if idle:
            log.warning("K-FAC layers %s were not called in the first training step; they keep their plain "
                        "gradient until they are (add them to skip_layers if that is intended)", idle)

    def _update_factors(self, decay: float) -> Callable[[], None]:
        """Check the captured batch factors (in dkfac, all-reduced first) and flag the non-finite ones;
        returns the fold of the others into the running averages, which the caller may run later (it is
        local work: dpkfac runs it while its preconditioned gradients are on the wire)."""
        batch: dict[int, tuple[_Scaled | None, _Scaled | None]] = {}
        with self._timed("factor"):
            for i, s in self._states.items():
                a = (s.a_batch, 1 / s.a_count) if not s.a_batch.empty and s.a_count else None
                # Uses of a layer within one backward pass add up (like a convolution's locations);
                # M accumulated passes, each of a loss scaled by 1/M (as Lightning does), average:
                # sum_passes (M g)(M g)^T / M = M * sum_passes G_pass.
                g = (s.g_batch, float(s.g_passes)) if not s.g_batch.empty else None
                batch[i] = (a, g)
                s.a_batch, s.g_batch = BatchFactor(), BatchFactor()
                s.a_count = s.g_passes = 0
        if self.config.mode == "dkfac" and self.world_size > 1:
            batch = self._all_reduce_factors(batch)
        good: dict[int, tuple[_Scaled, _Scaled]] = {}
        with self._timed("factor"):
            captured = {i: (a, g) for i, (a, g) in batch.items() if a is not None and g is not None}
            # One host sync for all layers: a non-finite batch (inf/NaN input, overflow) must not
            # poison the running average, which would outlive the bad batch.
            finite = _to_host([a[0].all_finite() & g[0].all_finite() for a, g in captured.values()])
            for (i, (a, g)), ok in zip(captured.items(), finite):
                if ok:
                    good[i] = (a, g)
                else:
                    self._states[i].fault = self._loss_scale_fn is None  # under a loss scaler: an overflow step

        def fold() -> None:
            with self._timed("factor"):
                for i, ((a, a_scale), (g, g_scale)) in good.items():
                    s = self._states[i]
                    s.A = a.fold_into(s.A, a_scale, decay)  # decay A + (1 - decay) a_scale a
                    s.G = g.fold_into(s.G, g_scale, decay)

        return fold

    def _all_reduce_factors(
        self, batch: dict[int, tuple[_Scaled | None, _Scaled | None]]
    ) -> dict[int, tuple[_Scaled | None, _Scaled | None]]:
        """Average each layer's batch factors over the ranks that captured it (a weight rides along)."""
        tensors: list[Tensor] = []
        with self._timed("factor"):
            for i, (a, g) in batch.items():
                layer, dtype = self.layers[i], self._states[i].dtype
                device = layer.weight.device
                if a is not None and g is not None:
                    tensors += [a[0].formed().mul_(a[1]), g[0].formed().mul_(g[1]), torch.ones(1, dtype=dtype, device=device)]
                else:
                    tensors += [torch.zeros(layer.d_a, layer.d_a, dtype=dtype, device=device),
                                torch.zeros(layer.d_g, layer.d_g, dtype=dtype, device=device),
                                torch.zeros(1, dtype=dtype, device=device)]
        with self._timed("comm"):
            self.comm.all_reduce_sum(tensors, "factors")
        counts = _to_host(tensors[2::3])  # one host sync for all layers
        out: dict[int, tuple[_Scaled | None, _Scaled | None]] = {}
        for j, (i, n) in enumerate(zip(batch, counts)):
            a, g = tensors[3 * j : 3 * j + 2]
            out[i] = ((BatchFactor.of(a), 1 / n), (BatchFactor.of(g), 1 / n)) if n > 0 else (None, None)
        return out

    def _decompose(self, state: _LayerState, damping: float) -> tuple[Tensor, ...] | None:
        """The decomposition of the running factors (see :meth:`_decomposition`), in the factor dtype; on
        failure (an exception or a non-finite result) retried in float64, then with 10x damping, and
        otherwise ``None`` (the last good decomposition is kept)."""
        assert state.A is not None and state.G is not None
        attempts = [(state.dtype, 0.0), (torch.float64, 0.0), (torch.float64, 10 * damping)]
        for dtype, jitter in attempts:
            try:
                result = self._decomposition(state.A.to(dtype), state.G.to(dtype), damping, jitter)
            except (RuntimeError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
                continue
            if all(bool(_all_finite(t)) for t in result):
                # Contiguous like a broadcast copy: in dkfac every rank must multiply with the same memory
                # layout (eigh returns column-major), or their results differ in the last bits.
                return tuple(t.to(state.dtype).contiguous() for t in result)
        log.warning("K-FAC decomposition failed (%s); keeping the last good one", self.config.method)
        return None

    def _store_decomposition(self, state: _LayerState, result: tuple[Tensor, ...] | None) -> None:
        """Keep a new decomposition (eigen: with the eigenvalue products precomputed), or flag the fault."""
        if result is None:
            state.fault = True
        elif self.config.method == "eigen":
            state.qa, state.qg, dg, da = result
            state.dgda = torch.outer(dg, da)
        else:
            state.a_inv, state.g_inv = result

    def _decomposition(self, A: Tensor, G: Tensor, damping: float, jitter: float) -> tuple[Tensor, ...]:
        """eigen: ``(Qa, Qg, dg, da)`` of ``A + jitter I`` and ``G + jitter I``; inverse:
        ``((A + (damping + jitter) I)^-1, (G + (damping + jitter) I)^-1)``."""
        eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        if self.config.method == "eigen":
            da, qa = torch.linalg.eigh(A + jitter * eye_a)
            dg, qg = torch.linalg.eigh(G + jitter * eye_g)
            # Round-off can make eigenvalues of these PSD matrices slightly negative: clip at zero.
            return qa, qg, dg.clamp_(min=0), da.clamp_(min=0)
        return _spd_inverse(A + (damping + jitter) * eye_a), _spd_inverse(G + (damping + jitter) * eye_g)

    def _decomposition_shapes(self, layer: KFACLayer) -> list[tuple[int, ...]]:
        d_a, d_g = layer.d_a, layer.d_g
        return [(d_a, d_a), (d_g, d_g), (d_g,), (d_a,)] if self.config.method == "eigen" else [(d_a, d_a), (d_g, d_g)]

    def _broadcast_decompositions(
        self, owned: dict[int, tuple[Tensor, ...] | None]
    ) -> dict[int, tuple[Tensor, ...] | None]:
        """Collective (dkfac): every layer's new decomposition from its owner, with a flag (0: none, the
        owner had no factors yet; 1: new; 2: failed), to every rank. Returns them for all layers that
        have one or failed."""
        parts: dict[int, list[Tensor]] = {}
        flags: list[Tensor] = []
        tensors: list[Tensor] = []
        owners: list[int] = []
        for i, state in self._states.items():
            layer, result = self.layers[i], owned.get(i)
            if result is not None:  # only the owner has one
                parts[i] = list(result)
            else:
                parts[i] = [torch.zeros(shape, dtype=state.dtype, device=layer.weight.device)
                            for shape in self._decomposition_shapes(layer)]
            flag = (1.0 if result is not None else 2.0) if i in owned else 0.0
            flags.append(torch.full((1,), flag, dtype=state.dtype, device=layer.weight.device))
            tensors += parts[i] + [flags[-1]]
            owners += [self.owners[i]] * (len(parts[i]) + 1)
        self.comm.broadcast_from_owners(tensors, owners, "inverses")
        out: dict[int, tuple[Tensor, ...] | None] = {}
        for i, flag in zip(self._states, _to_host(flags)):
            if flag == 1.0:
                out[i] = tuple(parts[i])
            elif flag == 2.0:
                out[i] = None
        return out

    def _precondition(self, state: _LayerState, grad: Tensor, damping: float) -> Tensor:
        """``P`` (d_g x d_a) for the gradient matrix ``grad``, in the factor dtype."""
        grad = grad.to(state.dtype)
        if state.qa is not None:
            assert state.qg is not None and state.dgda is not None
            v = state.qg.T @ grad @ state.qa
            return state.qg @ (v / (state.dgda + damping)) @ state.qa.T
        assert state.g_inv is not None and state.a_inv is not None
        return state.g_inv @ grad @ state.a_inv

    def _precondition_rows(self, state: _LayerState, a: Tensor, g: Tensor, damping: float,
                           out: Tensor) -> tuple[Tensor, Tensor]:
        """``(P, sum(P * grad))`` for ``grad = g^T a`` without forming ``grad`` (see :mod:`lightning_dpkfac.distributed.rows`):
        inverse: ``P = U V`` with ``U = G^-1 g^T``, ``V = a A^-1``, and ``sum(P * grad) = sum((g U) * (a V^T))``
        (N x N products); eigen: in the eigenbasis ``sum(P * grad) = sum(v^2 / (dg da + damping))``.
        ``P`` is written into ``out`` (d_g x d_a) when the dtypes agree."""
        if state.qa is not None:
            assert state.qg is not None and state.dgda is not None
            v = (g @ state.qg).T @ (a @ state.qa)
            scaled = v / (state.dgda + damping)
            left, right, vg = state.qg @ scaled, state.qa.T, torch.dot(scaled.reshape(-1), v.reshape(-1))
        else:
            assert state.g_inv is not None and state.a_inv is not None
            left, right = state.g_inv @ g.T, a @ state.a_inv
            vg = torch.dot((g @ left).reshape(-1), (a @ right.T).reshape(-1))
        if out.dtype == left.dtype:
            return torch.mm(left, right, out=out), vg
        return out.copy_(left @ right), vg

    def _rows_payload(self, index: int, damping: float, rows: tuple[Tensor, Tensor]) -> Tensor:
        """``[P, sum(P * grad), flag]`` of an owned layer from the gathered rows; a layer left plain (no
        decomposition yet, or a non-finite ``P``) sends no gradient: every rank then averages its own."""
        layer, state = self.layers[index], self._states[index]
        w = layer.weight
        payload = torch.empty(layer.num_params + 2, dtype=w.dtype, device=w.device)
        rows_ok = _all_finite(rows[0]) & _all_finite(rows[1])  # the averaged gradient g^T a is finite
        if not state.decomposed():
            payload.zero_()[-1] = self._unless_nonfinite(rows_ok, PLAIN_AFTER_FAULT if state.fault else PLAIN)
            return payload
        _, vg = self._precondition_rows(state, *rows, damping, out=payload[:-2].view(layer.d_g, layer.d_a))
        ok = torch.isfinite(vg)  # finite iff P is (for finite rows)
        good = PRECONDITIONED_AFTER_FAULT if state.fault else PRECONDITIONED
        payload[-2] = torch.where(ok, vg, 0.0)
        payload[-1] = self._unless_nonfinite(rows_ok, torch.where(
            ok, good, PLAIN if self._loss_scale_fn is not None else PLAIN_AFTER_FAULT))
        return payload

    def _unless_nonfinite(self, grad_ok: Tensor, flag: Tensor | float) -> Tensor | float:
        """``flag``, or ``NONFINITE_GRADIENT`` where the averaged gradient is not finite (0-d ``grad_ok``
        false), without a host sync. Not under a loss scaler: there that is an overflow step, which the
        scaler skips by itself."""
        if self._loss_scale_fn is not None:
            return flag
        return torch.where(grad_ok, flag, NONFINITE_GRADIENT)

    def _precondition_and_share(self, damping: float, kl_clip: float | None, lr: float | None, others_finite: Tensor,
                                while_sending: Callable[[], None] | None = None) -> tuple[list[float], bool]:
        """Owners precondition, broadcast ``[P, sum(P*grad), flag]`` per layer (dkfac: every rank
        preconditions every layer), run ``while_sending`` (local work) while the broadcasts are in flight;
        all ranks KL-clip and write. Returns the flags of all layers and the value of ``others_finite``
        (a 0-d bool read in the same host sync), both the same on every rank."""
        with self._timed("comm"):
            rows, gathered = self._rows.gather()
        payloads: list[Tensor] = [torch.empty(0)] * len(self.layers)
        broadcasts = []
        # Owners broadcast in order of increasing load, and a rank posts its receives from lighter owners
        # before it computes its own payloads: their data arrives while it computes.
        for owner in self._broadcast_order:
            layers = self._layers_of[owner]
            if owner == self.rank or self._shares_decompositions:
                with self._timed("precondition"):
                    for i in layers:
                        payloads[i] = self._payload(i, damping, rows.get(i))
            else:
                for i in layers:
                    w = self.layers[i].weight
                    payloads[i] = torch.empty(self.layers[i].num_params + 2, dtype=w.dtype, device=w.device)
            if not self._shares_decompositions:
                broadcasts.append(self.comm.start_broadcast([payloads[i] for i in layers], owner, "preconditioned"))
        if while_sending is not None:
            while_sending()
        with self._timed("comm"):
            for pending in broadcasts:
                pending.wait()
        # Every layer's [sum(P * grad), flag] in one host sync: the same numbers on every rank, from which
        # every rank takes the same decisions and computes the same KL-clip scale.
        *tails, others_ok = _to_host([p[-2:] for p in payloads] + [others_finite])
        vgs, flags = tails[0::2], tails[1::2]
        # A gathered layer left plain carries no gradient in its payload: every rank averages its own.
        plain = [i for i in gathered if flags[i] in (PLAIN, PLAIN_AFTER_FAULT)]
        averaged = self._average_local_gradients(plain)
        with self._timed("precondition"):
            scale = _kl_scale(vgs, flags, kl_clip, lr)
            for i, (layer, payload) in enumerate(zip(self.layers, payloads)):
                if layer.weight.grad is None:
                    continue
                if i in averaged:
                    layer.set_grad_matrix(averaged[i])
                    continue
                factor = scale if _is_preconditioned(flags[i]) else 1.0
                layer.set_grad_matrix(payload[:-2].view(layer.d_g, layer.d_a), factor)
        return flags, bool(others_ok)

    def _average_local_gradients(self, indices: list[int]) -> dict[int, Tensor]:
        """Collective: the averaged gradient matrices of gathered layers ``indices`` from every rank's own
        (which the owner-reduce hook has already divided by P, with the rest of its bucket)."""
        grads = {}
        for i in indices:
            layer, w = self.layers[i], self.layers[i].weight
            local = layer.grad_matrix()
            grads[i] = local.clone() if local is not None else w.new_zeros(layer.d_g, layer.d_a)
        with self._timed("comm"):
            self.comm.all_reduce_sum(list(grads.values()), "gradients")
        return grads

    def _payload(self, index: int, damping: float, rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``[P or plain grad (flattened), sum(P * grad), flag]`` of a layer, in the grad's dtype,
        from the averaged gradient or from the gathered ``rows`` (a, g) of all ranks.
        A non-finite ``P`` falls back to the plain gradient without a host sync."""
        layer, state = self.layers[index], self._states[index]
        w = layer.weight
        if rows is not None:
            return self._rows_payload(index, damping, rows)
        grad = layer.grad_matrix()
        if grad is None or not state.decomposed():
            plain = grad if grad is not None else torch.zeros(layer.d_g, layer.d_a, dtype=w.dtype, device=w.device)
            payload = torch.cat([plain.reshape(-1), plain.new_tensor([0.0, 0.0])])
            payload[-1] = self._unless_nonfinite(_all_finite(plain), PLAIN_AFTER_FAULT if state.fault else PLAIN)
            return payload
        p = self._precondition(state, grad, damping)
        grad = grad.to(p.dtype)
        vg = torch.dot(p.reshape(-1), grad.reshape(-1))
        ok = torch.isfinite(vg)  # sum(P * grad) is finite iff P is (for a finite grad): one cheap check
        good = PRECONDITIONED_AFTER_FAULT if state.fault else PRECONDITIONED
        flag = torch.where(ok, good, PLAIN if self._loss_scale_fn is not None else PLAIN_AFTER_FAULT)
        flag = self._unless_nonfinite(_all_finite(grad), flag)
        payload = torch.empty(layer.num_params + 2, dtype=w.dtype, device=w.device)
        if p.dtype == w.dtype:
            torch.where(ok, p, grad, out=payload[:-2].view(p.shape))
        else:
            payload[:-2].view(p.shape).copy_(torch.where(ok, p, grad))
        payload[-2] = torch.where(ok, vg, 0.0)
        payload[-1] = flag
        return payload

    def _count_faults(self, flags: list[float]) -> None:
        """Update the fault counters from the shared flags; raise once a layer failed too often in a row
        (on every rank at the same step, since the flags are the same everywhere)."""
        faulty = [flag in (PRECONDITIONED_AFTER_FAULT, PLAIN_AFTER_FAULT) for flag in flags]
        self.last_step_faults = sum(faulty)
        self.faults_total += self.last_step_faults
        for i, bad in enumerate(faulty):
            self._consecutive_faults[i] = self._consecutive_faults[i] + 1 if bad else 0
        limit = self.config.max_consecutive_faults
        failing = [self.layers[i].name for i, n in enumerate(self._consecutive_faults) if n >= limit]
        if failing:
            raise KFACNumericalError(
                f"K-FAC state of layer(s) {failing} was non-finite on {limit} consecutive steps (step "
                f"{self.steps}). The inputs or gradients likely contain inf/NaN, or the factors are too "
                f"ill-conditioned: check the data, lower the learning rate, raise damping (now "
                f"{self.config.value('damping', self.steps)}), or raise max_consecutive_faults."
            )

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - start


#: A layer's captured batch factor and the scale that makes it the batch's factor.
_Scaled = tuple[BatchFactor, float]


def _factor_sizes(layer: KFACLayer) -> str:
    return f"A {layer.d_a}x{layer.d_a}, G {layer.d_g}x{layer.d_g}"


def _to_host(tensors: list[Tensor]) -> list[float]:
    """The values of small tensors (possibly on several devices), flattened and concatenated, with one
    device-to-host copy."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]).tolist()


def _kl_scale(vgs: list[float], flags: list[float], kl_clip: float | None, lr: float | None) -> float:
    """``nu = min(1, sqrt(kl_clip / |lr^2 sum_l sum(P_l * grad_l)|))`` over the preconditioned layers, in
    float64 from broadcast values summed in a fixed order: the same on every rank."""
    if kl_clip is None:
        return 1.0
    assert lr is not None
    step = lr**2 * abs(sum(v for v, flag in zip(vgs, flags) if _is_preconditioned(flag)))
    return 1.0 if step == 0.0 else min(1.0, math.sqrt(kl_clip / step))


def _spd_inverse(m: Tensor) -> Tensor:
    """The inverse of a symmetric positive-definite matrix: through Cholesky (half the work of LU), or LU
    if round-off made ``m`` numerically indefinite."""
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        return torch.linalg.inv(m)
    return torch.cholesky_inverse(factor)


def _all_finite(t: Tensor) -> Tensor:
    """0-d bool: no inf/NaN in ``t`` (they propagate into the sum). One fast pass with no bool tensor;
    a sum beyond the dtype's range also reads as non-finite, which errs on the safe side."""
    return torch.isfinite(t.sum())


def _is_preconditioned(flag: float) -> bool:
    return flag in (PRECONDITIONED, PRECONDITIONED_AFTER_FAULT)


@contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Factor math runs in the factor dtype even inside ``torch.autocast``."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
