"""The K-FAC engine: ``KFACPreconditioner(model, ...)``, usable from plain PyTorch and from Lightning.

One optimizer step, after ``loss.backward()`` and the gradient sync (DDP's all-reduce, or, after
:meth:`KFACPreconditioner.register_ddp_comm_hook` in dpkfac, a reduce of each layer's gradient to its owner):

1. factors       the captured batch factors (``core.capture``) join the running averages; dkfac
                 all-reduces them first (``distributed.modes``).
2. decompose     once every ``inv_update_steps``, each layer in its own slot of the interval (all of them at
                 step 0; ``distributed.assignment.decomposition_slots``): owners decompose (``core.decomposition``,
                 with the retry ladder of ``core.faults``); dkfac broadcasts the decompositions. Overlapped
                 (``core.overlap``, dpkfac), they run on a worker during the next forward and backward pass
                 and are installed at the start of the next step.
3. precondition  whoever holds a layer's decomposition packs its payload ``[P, sum(P * grad), flag]``
                 (``core.payload``); dpkfac's owners broadcast theirs.
4. apply         every rank reads all flags in one host sync, applies the same KL-clip scale, writes ``P``
                 into ``.grad``, and counts faults; a non-finite averaged gradient skips the update
                 everywhere (``core.faults``).

This class wires the parts together; each mechanism lives in the module named above.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_dpkfac.core import checkpoint, payload
from lightning_dpkfac.core.capture import CaptureManager
from lightning_dpkfac.core.config import KFACConfig
from lightning_dpkfac.core.decomposition import decomposition_for
from lightning_dpkfac.core.faults import FaultCounter, KFACNumericalError, decompose_with_retries
from lightning_dpkfac.core.layers import KFACLayer, discover_layers, layers_of_params, plain_parameters, tied_names
from lightning_dpkfac.core.overlap import DecompositionWorker, PendingDecompositions, Results, overlaps
from lightning_dpkfac.core.payload import Flag
from lightning_dpkfac.core.state import LayerState, LayerStateView
from lightning_dpkfac.core.timing import DecompositionReport, PhaseTimer
from lightning_dpkfac.distributed.assignment import (
    assign_owners,
    decomposes_at,
    decomposition_slots,
    layer_cost,
    load_imbalance,
    rank_loads,
)
from lightning_dpkfac.distributed.comm import Communicator
from lightning_dpkfac.distributed.modes import distribution_for
from lightning_dpkfac.distributed.router import GradientRouter
from lightning_dpkfac.distributed.rows import RowGatherer

__all__ = ["KFACNumericalError", "KFACPreconditioner", "LayerStateView"]

log = logging.getLogger("lightning_dpkfac")


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

    def __init__(self, model: nn.Module, config: KFACConfig | None = None, *,
                 process_group: dist.ProcessGroup | None = None, **overrides: Any) -> None:
        self.config = cfg = (config or KFACConfig()).replace(**overrides)
        self.model = model
        self.comm = Communicator(process_group, int(cfg.kfac_bucket_cap_mb * 2**20))
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        found = discover_layers(model, cfg.skip_layers, cfg.max_factor_dim, self.world_size, cfg.inv_update_steps)
        self.layers, self.skipped, self._attention = found.layers, found.skipped, found.attention
        #: whether building this engine flushed denormal floats in the process (``KFACConfig.flush_denormal``)
        self.flushed_denormals = (cfg.flush_denormal and any(l.weight.device.type == "cpu" for l in self.layers)
                                  and torch.set_flush_denormal(True))  # False where the CPU cannot
        #: trainable parameters left to their plain gradient, with the reason (``describe()`` lists them)
        self.plain = plain_parameters(model, self.layers, self.skipped)
        shapes = [l.shape for l in self.layers]
        self.costs = [layer_cost(s, cfg.inv_update_steps) for s in shapes]
        self.owners = assign_owners(self.costs, self.world_size)
        #: per layer, the step of each decomposition interval at which it is decomposed
        self.slots = decomposition_slots(shapes, self.owners, self.world_size, cfg.inv_update_steps,
                                         cfg.factor_update_steps)
        self.steps = 0
        self.kl_scale = 1.0  # the last step's KL-clip factor nu (1.0: not clipped)
        self.kl_peak_lr = 0.0  # the largest lr passed so far: the clip bounds the step at it (docs/defaults.md)
        self.timer = PhaseTimer()
        self.method = decomposition_for(cfg.method)
        self.distribution = distribution_for(cfg.mode)(self.layers, self.owners, self.comm, self.timer)
        self.faults = FaultCounter([l.name for l in self.layers], cfg.max_consecutive_faults, self.rank)
        self._states = {i: LayerState(dtype=torch.promote_types(layer.weight.dtype, torch.float32))
                        for i, layer in enumerate(self.layers) if self.distribution.builds_factors(i)}
        self._dtypes = {i: s.dtype for i, s in self._states.items()}
        self._capture = CaptureManager(self.timer)
        for forward in self._attention.values():  # attention's projections run as modules from now on
            forward.install()
        for i, state in self._states.items():
            self._capture.add_factors(self.layers[i], state, self.distribution.keeps_rows)
        self._rows = RowGatherer(self.layers, self.owners, self.comm, self._capture)
        self._router = GradientRouter(self.layers, self.owners, self._rows, self.comm)
        self._covered = layers_of_params(self.layers)
        self._report = DecompositionReport(self.rank, cfg.method, cfg.inv_update_steps)
        # Owners broadcast in order of increasing load, and a rank posts its receives from lighter owners
        # before it computes its own payloads: their data arrives while it computes.
        loads = rank_loads(self.costs, self.owners, self.world_size)
        self._layers_of = {r: [i for i, o in enumerate(self.owners) if o == r] for r in range(self.world_size)}
        self._broadcast_order = sorted((r for r in self._layers_of if self._layers_of[r]), key=lambda r: (loads[r], r))
        self._worker: DecompositionWorker | None = None  # started at the first overlapped decomposition
        self._pending: tuple[list[int], PendingDecompositions] | None = None  # due layers, their decompositions

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """Precondition every covered layer's ``.grad`` in place (identically on every rank); after a step
        whose averaged gradient is non-finite, every ``.grad`` of the model is ``None`` instead.

        Args:
            lr: this step's learning rate (default: the config's ``lr``); KL-clip bounds the step as at the
                largest lr so far (``kl_peak_lr``), so a clipped step still follows a decaying schedule.
        """
        cfg, k = self.config, self.steps
        damping, kl_clip, lr = cfg.value("damping", k), cfg.value("kl_clip", k), lr if lr is not None else cfg.value("lr", k)
        if kl_clip is not None and lr is None:
            raise ValueError("kl_clip needs a learning rate: pass lr=... to KFACPreconditioner or to step(), "
                             "or set kl_clip=None.")
        if lr is not None:
            self.kl_peak_lr = max(self.kl_peak_lr, float(lr))
        self._router.step_done()
        self._finish_decompositions()
        fold = self._update_factors(cfg.value("factor_decay", k)) if k % cfg.factor_update_steps == 0 else None
        due = [i for i, slot in enumerate(self.slots) if decomposes_at(k, slot, cfg.inv_update_steps)]
        if due:
            if fold is not None:  # these decompositions need their new factors now; the rest folds later
                fold(due)
                if k == 0:
                    self._warn_uncaptured()
            self._decompose(damping, due)
        flags, others_finite = self._precondition_and_share(
            damping, kl_clip, while_sending=None if fold is None else lambda: fold(None))
        self._rows.end_step()
        skip = self.faults.record(k, flags, others_finite)
        # Counted. A fault flagged from now on (a decomposition installed or loaded between steps) counts next step.
        for state in self._states.values():
            state.fault = False
        if skip:
            for param in self.model.parameters():  # torch optimizers skip a parameter without a gradient
                param.grad = None
        self.faults.raise_if_failing(k, damping)
        self.steps += 1
        self._capture.new_step(self.steps % cfg.factor_update_steps == 0)

    def _update_factors(self, decay: float) -> Callable[[list[int] | None], None]:
        """Take the step's batch factors (dkfac: all-reduced) and flag the non-finite ones; returns the fold
        of the others into the running averages, of the given layers (``None``: all not yet folded), which
        the caller may run later (local work: dpkfac runs it while its payloads are on the wire)."""
        with self.timer("factor"):
            batch = {i: state.take_captures() for i, state in self._states.items()}
        batch = self.distribution.combine_batch_factors(batch, self._dtypes)
        with self.timer("factor"):
            captured = {i: (a, g) for i, (a, g) in batch.items() if a is not None and g is not None}
            # One host sync for all layers: a non-finite batch (inf/NaN input, overflow) must not poison the
            # running average, which would outlive the bad batch. Under a loss scaler it is an overflow step.
            finite = payload.to_host([a[0].all_finite() & g[0].all_finite() for a, g in captured.values()])
            good = {i: ag for (i, ag), ok in zip(captured.items(), finite) if ok}
            for i in captured.keys() - good.keys():
                self._states[i].fault = self._capture.loss_scale_fn is None

        def fold(layers: list[int] | None) -> None:
            with self.timer("factor"):
                for i in list(good) if layers is None else [i for i in layers if i in good]:
                    (a, a_scale), (g, g_scale) = good.pop(i)
                    state = self._states[i]
                    state.A = a.fold_into(state.A, a_scale, decay)  # decay A + (1 - decay) a_scale a
                    state.G = g.fold_into(state.G, g_scale, decay)

        return fold

    def _decompose(self, damping: float, due: list[int]) -> None:
        """Owners decompose the factors of layers ``due`` (dkfac: and broadcast them); a failure flags the
        fault and keeps the last good decomposition. Overlapped (``core.overlap``), the owners' work runs on
        the worker and is installed at the start of the next step."""
        owned = [i for i in due if self.owners[i] == self.rank and i in self._states
                 and self._states[i].A is not None and self._states[i].G is not None]
        if self.steps > 0 and owned and overlaps(self.config.overlap_decompositions, self.config.mode,
                                                 self.layers[owned[0]].weight.device):
            if self._worker is None:
                self._worker = DecompositionWorker(self.layers[owned[0]].weight.device)
            method = self.method
            factors = {i: (self._states[i].A, self._states[i].G, self._states[i].dtype) for i in owned}

            def work() -> Results:
                return {i: decompose_with_retries(method, A, G, dtype, damping) for i, (A, G, dtype) in factors.items()}

            self._pending = (due, self._worker.submit(work))
            return
        with self.timer("inverse"):
            if self._report.pending and owned:
                largest = max(owned, key=lambda i: max(self.layers[i].d_a, self.layers[i].d_g))
                self._report.announce(self.layers[largest].name, _sizes(self.layers[largest]),
                                      max(self.layers[largest].d_a, self.layers[largest].d_g))
            results, seconds = {}, {}
            for i in owned:
                start, state = time.perf_counter(), self._states[i]
                results[i] = decompose_with_retries(self.method, state.A, state.G, state.dtype, damping)
                seconds[self.layers[i].name] = (_sizes(self.layers[i]), time.perf_counter() - start)
            if self._report.pending and owned:
                self._report.report(self.steps, seconds)
        self._install(due, results)

    def _install(self, due: list[int], results: Results) -> None:
        """Keep the new decompositions of layers ``due`` (dkfac: after their broadcast); flag the failed ones."""
        for i, result in self.distribution.share_decompositions(due, results, self.method, self._dtypes).items():
            state = self._states[i]
            if result is None:
                state.fault = True
            else:
                state.decomposition = self.method.keep(result)

    def _finish_decompositions(self) -> None:
        """Install the overlapped decompositions, once the worker has them (local: dpkfac only overlaps)."""
        if self._pending is None:
            return
        due, pending = self._pending
        self._pending = None
        with self.timer("inverse"):  # the time this rank waits for the worker
            results = pending.wait()
        self._install(due, results)

    def _precondition_and_share(self, damping: float, kl_clip: float | None,
                                while_sending: Callable[[], None] | None) -> tuple[list[Flag], bool]:
        """Pack every payload this rank holds (dpkfac: broadcast them), run ``while_sending`` meanwhile, then
        apply the same KL-clip scale and write every layer's result into ``.grad``. Returns the flags of all
        layers and whether the gradients outside the K-FAC layers are finite (the same on every rank)."""
        others_finite = self._uncovered_gradients_finite()
        with self.timer("comm"):
            rows, gathered = self._rows.gather()
        payloads: list[Tensor] = [torch.empty(0)] * len(self.layers)
        pending = []
        under_scaler = self._capture.loss_scale_fn is not None
        for owner in self._broadcast_order:
            for i in self._layers_of[owner]:
                if self.distribution.holds_decomposition(i):
                    with self.timer("precondition"):
                        payloads[i] = payload.pack(self.layers[i], self._states[i], self.method, damping,
                                                   under_scaler=under_scaler, rows=rows.get(i))
                else:
                    payloads[i] = payload.empty(self.layers[i])
            if self.distribution.broadcasts_payloads:
                pending.append(self.comm.start_broadcast([payloads[i] for i in self._layers_of[owner]], owner,
                                                         "preconditioned"))
        if while_sending is not None:
            while_sending()
        with self.timer("comm"):
            for broadcast in pending:
                broadcast.wait()
        vgs, flags, (others_ok,) = payload.read_tails(payloads, others_finite)
        # A gathered layer left plain carries no gradient in its payload: every rank averages its own.
        averaged = self._average_local_gradients([i for i in gathered if flags[i] in (Flag.PLAIN, Flag.PLAIN_AFTER_FAULT)])
        with self.timer("precondition"):
            self.kl_scale = scale = payload.kl_scale(vgs, flags, kl_clip, self.kl_peak_lr)
            for i, (layer, result) in enumerate(zip(self.layers, payloads)):
                if layer.weight.grad is not None:
                    layer.set_grad_matrix(averaged[i] if i in averaged else payload.matrix(layer, result),
                                          scale if flags[i].preconditioned else 1.0)
        return flags, bool(others_ok)

    def _uncovered_gradients_finite(self) -> Tensor:
        """0-d bool: the gradients outside the K-FAC layers (all-reduced by DDP: the same on every rank) hold
        no inf/NaN. No host sync: it is read with the payloads' flags."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in self._covered]
        if not grads:
            return torch.ones((), dtype=torch.bool)
        device = grads[0].device
        return torch.isfinite(torch.stack([g.sum().to(device=device, dtype=torch.float64) for g in grads]).sum())

    def _average_local_gradients(self, indices: list[int]) -> dict[int, Tensor]:
        """Collective: the averaged gradient matrices of gathered layers ``indices`` from every rank's own
        (which the DDP hook has already divided by P, with the rest of its bucket)."""
        grads = {}
        for i in indices:
            layer = self.layers[i]
            local = layer.grad_matrix()
            grads[i] = local.clone() if local is not None else layer.weight.new_zeros(layer.d_g, layer.d_a)
        with self.timer("comm"):
            self.comm.all_reduce_sum(list(grads.values()), "gradients")
        return grads

    def _warn_uncaptured(self) -> None:
        """After the first step: name the owned layers whose forward never ran (bypassed or unused)."""
        idle = [self.layers[i].name for i, s in self._states.items() if self.owners[i] == self.rank and s.A is None]
        if idle:
            log.warning("K-FAC layers %s were not called in the first training step; they keep their plain gradient "
                        "until they are (add them to skip_layers if that is intended)", idle)

    # ------------------------------------------------------------------ wiring to DDP
    def register_ddp_comm_hook(self, ddp: DistributedDataParallel) -> None:
        """Install this engine's gradient communication on ``ddp`` (call before the first backward).

        ``dpkfac``: the gradients of each K-FAC layer are *reduced to its owner only* (the owner is the
        only rank that reads them), the other parameters all-reduced as usual; :meth:`step` then
        broadcasts every layer's result, so the total traffic equals one DDP all-reduce. Until
        :meth:`step` has run, a rank's gradients of layers it does not own are not averaged: call
        :meth:`step` on every optimizer step. ``dkfac``, a model with no K-FAC layer, or any mode under a
        loss scaler (:meth:`set_loss_scale`): DDP's all-reduce, counted as "gradients".
        """
        owner_reduce = self.distribution.install(ddp, self._router, self._capture.loss_scale_fn is not None)
        if owner_reduce and self.config.gather_rows:
            self._rows.start()

    def set_loss_scale(self, scale_fn: Callable[[], float] | None) -> None:
        """Tell the engine that backward runs on a loss scaled by ``scale_fn()`` (e.g.
        ``GradScaler.get_scale``): captured output gradients are unscaled before G is built, and
        non-finite factors or results then count as overflow steps (skipped by the scaler too), not faults.
        Call it before :meth:`register_ddp_comm_hook`.
        """
        self._capture.loss_scale_fn = scale_fn

    def remove_hooks(self) -> None:
        """Detach from the model; the preconditioner stops capturing, and attention modules run their own
        forward again."""
        self._finish_decompositions()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        self._rows.remove()
        self._capture.remove()
        for forward in self._attention.values():
            forward.remove()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The state of the layers this rank *owns*, with the counters (``core.checkpoint``'s schema)."""
        self._finish_decompositions()
        return {"format": checkpoint.FORMAT, "steps": self.steps, "world_size": self.world_size,
                "kl_peak_lr": self.kl_peak_lr, "method": self.config.method, "rows": self._rows.state_dict(),
                "faults": self.faults.state_dict(),
                "layers": checkpoint.layer_entries(self.layers, self.owners, self.rank, self._states)}

    def gather_state_dict(self, dst: int = 0) -> dict[str, Any] | None:
        """Collective: every layer's state, each from its owner, on rank ``dst`` (``None`` elsewhere).
        Rank ``dst`` holds all factors only while the caller keeps the result (e.g. during a save)."""
        return checkpoint.gather(self.state_dict(), self.comm, dst)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a full state (:meth:`gather_state_dict` of any world size): every rank keeps the
        layers it holds under *this* run's owner map; decompositions of another method or of a re-cut block
        are made anew. Raises ``ValueError`` naming any mismatch."""
        self._finish_decompositions()  # the loaded state replaces what the worker computed
        state = checkpoint.migrate(state)
        saved, recut = checkpoint.match_layers(self.layers, state, self.world_size, self.config.max_factor_dim == "auto")
        self.steps = int(state["steps"])
        self.kl_peak_lr = float(state.get("kl_peak_lr", 0.0))
        damping = self.config.value("damping", self.steps)
        for i, s in self._states.items():
            layer, entry = self.layers[i], saved[self.layers[i].name]
            device = layer.weight.device
            s.take_captures()
            s.A, s.G = (entry[key].to(device=device, dtype=s.dtype) for key in ("A", "G"))
            s.decomposition = None
            if not self.distribution.holds_decomposition(i):
                continue
            if state["method"] == self.config.method and layer.name not in recut:
                if all(key in entry for key in self.method.keys):
                    s.decomposition = {key: entry[key].to(device=device, dtype=s.dtype) for key in self.method.keys}
            else:  # another method's or another cut's decomposition is of no use: make a new one now
                result = decompose_with_retries(self.method, s.A, s.G, s.dtype, damping)
                s.decomposition, s.fault = (None, True) if result is None else (self.method.keep(result), False)
        self.faults.load_state_dict(state["faults"])
        if self.config.gather_rows:
            self._rows.load_state_dict(state["rows"])
        self._capture.new_step(self.steps % self.config.factor_update_steps == 0)

    # ------------------------------------------------------------------ inspection
    def describe(self) -> str:
        """A table of the covered layers (factor sizes, owner, weight tying) and of every trainable
        parameter left to its plain gradient, with the reason."""
        if self.layers:
            device = self.layers[0].weight.device
            timing = ("overlapped with the next forward and backward pass"
                      + (" (a CUDA side stream)" if device.type == "cuda" else " (a worker thread)")
                      if overlaps(self.config.overlap_decompositions, self.config.mode, device) else "inline")
            lines = [f"K-FAC ({self.config.mode}, {self.config.method}) on {len(self.layers)} layers, "
                     f"{self.world_size} rank(s), load max/mean {self.load_imbalance():.3f}; decompositions "
                     f"{timing}; denormal floats {'flushed to zero' if self.flushed_denormals else 'kept'}:"]
        else:
            lines = [f"K-FAC ({self.config.mode}) covers no layer of this model: it trains exactly like DDP "
                     "(every gradient all-reduced, none preconditioned)."]
        for layer, owner in zip(self.layers, self.owners):
            tied = tied_names(self.model, layer)
            note = f"  weight tied with {', '.join(tied)} (its gradient sums every use)" if tied else ""
            diagonal = " (diagonal)" if layer.diagonal_a else ""
            lines.append(f"  {layer.name:<40} {type(layer.module).__name__:<8} A {layer.d_a:>5}{diagonal}  "
                         f"G {layer.d_g:>5}  owner {owner}{note}")
        if self.plain:
            lines.append("Plain gradient (not preconditioned):")
            groups: dict[tuple[str, str], list[str]] = {}  # (module, reason) -> parameters
            for name, reason in self.plain.items():
                module, _, param = name.rpartition(".")
                groups.setdefault((module, reason), []).append(param)
            lines += [f"  {module or '(model)':<40} {', '.join(params)}: {reason}"
                      for (module, reason), params in groups.items()]
        return "\n".join(lines)

    def schedule(self) -> dict[str, int]:
        """Per layer, the step of every interval of ``inv_update_steps`` at which it is decomposed (its slot;
        every layer is also decomposed at step 0)."""
        return {layer.name: slot for layer, slot in zip(self.layers, self.slots)}

    def owner_of(self, name: str) -> int:
        """The rank that owns layer ``name``."""
        return self.owners[self._index(name)]

    def factors(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The running-average factors ``(A, G)`` this rank holds for layer ``name``, or ``None``."""
        self._finish_decompositions()
        state = self._states.get(self._index(name))
        return None if state is None or state.A is None or state.G is None else (state.A, state.G)

    def holds_state(self, name: str) -> bool:
        """Whether this rank keeps any factor or decomposition tensor for layer ``name``."""
        return self._index(name) in self._states

    def layer_state(self, name: str) -> LayerStateView | None:
        """A copy of what this rank holds for layer ``name`` (``None`` if nothing), overlapped decompositions
        installed."""
        self._finish_decompositions()
        index = self._index(name)
        state = self._states.get(index)
        return None if state is None else LayerStateView.of(name, self.owners[index], state)

    def captures(self, name: str) -> frozenset[str]:
        """What this rank captures for layer ``name`` in forward and backward: ``"factors"`` (its A and G)
        and/or ``"rows"`` (its input and output-gradient rows, for row gathering)."""
        return self._capture.captures(self.layers[self._index(name)])

    @property
    def row_layers(self) -> list[str]:
        """The layers whose owner gathers their rows instead of their gradient."""
        return [self.layers[i].name for i in self._rows.chosen]

    def load_imbalance(self) -> float:
        """max/mean of the owners' cost: 1.0 is perfect balance."""
        return load_imbalance(self.costs, self.owners, self.world_size)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of K-FAC state this rank holds: ``factors`` (running factors and the captures not yet
        folded; a layer input held for a deferred factor counts once, however many blocks of its layer hold
        it) and ``decompositions``."""
        held = {(t.data_ptr(), t.numel()): t for s in self._states.values() for t in s.a_batch.held() + s.g_batch.held()}
        running = [t for s in self._states.values() for t in (s.A, s.G) if t is not None]
        kept = [t for s in self._states.values() for t in (s.decomposition or {}).values()]
        return {"factors": sum(_nbytes(t) for t in [*held.values(), *running]),
                "decompositions": sum(_nbytes(t) for t in kept)}

    @property
    def bytes_sent(self) -> dict[str, float]:
        """Cumulative per-rank traffic by kind (see :mod:`lightning_dpkfac.distributed.comm`)."""
        return dict(self.comm.bytes_sent)

    @property
    def timings(self) -> dict[str, float]:
        """Cumulative host seconds per phase (``core.timing.PHASES``) on this rank."""
        return dict(self.timer.totals)

    def _index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"'{name}' is not a K-FAC layer; covered layers: {[l.name for l in self.layers]}")


def _sizes(layer: KFACLayer) -> str:
    return f"A {layer.d_a}x{layer.d_a}, G {layer.d_g}x{layer.d_g}"


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
