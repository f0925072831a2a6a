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
:class:`RowGatherer` decides per layer at the engine's first step, from the largest row count of any rank
and a check on every rank that the layer's gradient really is ``g^T a`` (a weight also used outside the
module's forward, or a hook that edits the parameter's gradient, would make it differ), and then gathers
the chosen layers' rows to their owners every step. The decision is a small state machine kept in
checkpoints (:class:`RowPhase`); the math is the decomposition's (``Decomposition.factored_rows``).

Traffic, per rank and step (declared here, replayed by the planner): the deciding step all-reduces a vote
of :data:`VOTE_NUMBERS` float64 per candidate; then each step all-reduces one float64 row count per chosen
layer and gathers its padded rows, ``R (d_a + d_g)`` numbers per rank, to the owner.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_dpkfac.core.capture import CaptureManager, OnGrad
from lightning_dpkfac.core.layers import KFACLayer, LinearLayer, layers_of_params
from lightning_dpkfac.distributed.assignment import LayerShape
from lightning_dpkfac.distributed.comm import Communicator, Message

log = logging.getLogger("lightning_dpkfac")

#: Relative (Frobenius) difference above which a gradient is not ``g^T a``. Loose enough for a gradient
#: computed in bfloat16 under autocast, tight enough for any real second source of gradient.
MATCH_TOLERANCE = 5e-2
#: float64 numbers per candidate layer in the deciding step's vote: its row count, and "gradient != g^T a".
VOTE_NUMBERS = 2


def rows_pay_off(world_size: int, rows_per_rank: int, d_a: int, d_g: int) -> bool:
    """Whether gathering ``rows_per_rank`` rows from each of ``world_size`` ranks beats sending the
    d_g x d_a gradient (fewer bytes and fewer preconditioning flops)."""
    return 0 < world_size * rows_per_rank * (d_a + d_g) < d_g * d_a



def vote_messages(candidates: int) -> list[Message]:
    """The deciding step's traffic: one vote for ``candidates`` layers."""
    return [Message("gradients", "all_reduce", VOTE_NUMBERS * candidates, "float64")]


def gathered_messages(shape: LayerShape, rows: int) -> list[Message]:
    """A chosen layer's traffic each step after the decision, with ``rows`` rows on the busiest rank: its row
    count, then its padded rows (instead of its gradient)."""
    return [Message("gradients", "all_reduce", 1, "float64"),
            Message("gradients", "gather", rows * (shape.d_a + shape.d_g), "factor")]


class RowCapture:
    """The rows ``a`` and ``g`` of one Linear layer (block) over the forward/backward passes since
    :meth:`clear`.

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

    def on_forward(self, x: Tensor) -> OnGrad | None:
        if self.candidate:
            rows = self._counted + sum(t.numel() // t.shape[-1] for t in (*self._inputs, x))
            if self._counted or not rows_pay_off(self.world_size, rows, self.layer.d_a, self.layer.d_g):
                self._counted, self._inputs, self._grads = rows, [], {}
                return None
        self._inputs.append(x.detach())
        return partial(self._on_output_grad, len(self._inputs) - 1)

    def _on_output_grad(self, call: int, grad: Tensor) -> None:
        if call < len(self._inputs):  # else dropped by a candidate with too many rows
            self._grads[call] = self.layer.output_grad_rows(grad.detach())

    @property
    def holds_rows(self) -> bool:
        """Whether any input or output-gradient rows are kept."""
        return bool(self._inputs or self._grads)

    def num_rows(self) -> int:
        """Rows that have both an input and an output gradient (a candidate that stopped keeping them:
        the rows it saw)."""
        return self._counted or sum(g.shape[0] for g in self._grads.values())

    def rows(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(a, g)``, (R x d_a) and (R x d_g) in ``dtype``, over every call that got a gradient (R may be 0)."""
        out = torch.empty(self.num_rows(), self.layer.d_a + self.layer.d_g, dtype=dtype, device=self.layer.weight.device)
        self.write_rows(out)
        return out[:, : self.layer.d_a], out[:, self.layer.d_a :]

    def write_rows(self, out: Tensor) -> None:
        """Write ``[a | g]`` into ``out`` (at least R rows, d_a + d_g columns); rows past R become zeros."""
        d_in, start = self.layer.n_w, 0
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
        """Whether ``grad`` (this rank's gradient of the layer's weight or bias: its block's piece of it)
        equals ``g^T a`` (within :data:`MATCH_TOLERANCE`)."""
        if self._counted:  # a candidate that stopped keeping its rows: it will not gather them anyway
            return False
        a, g = self.rows(torch.promote_types(grad.dtype, torch.float32))
        full = g.T @ a
        n_w = self.layer.n_w
        expected = (full[:, n_w] if param is not self.layer.weight else full[:, :n_w]).reshape(grad.shape)
        scale = expected.norm() + grad.to(expected.dtype).norm()
        return bool((expected - grad.to(expected.dtype)).norm() <= MATCH_TOLERANCE * scale + 1e-30)

    def clear(self) -> None:
        self._inputs, self._grads, self._counted = [], {}, 0


class RowPhase(str, Enum):
    """Where the row decision stands."""

    OFF = "off"  # not started: no DDP hook of the engine's, one rank, or gather_rows=False
    DECIDING = "deciding"  # the first step: candidates keep their rows, the DDP hook checks the gradients
    DECIDED = "decided"  # the chosen layers' rows are gathered every step


class RowGatherer:
    """Which layers' rows go to their owners, and the collectives that take them there.

    :meth:`start` (when the engine's DDP hook is installed) puts a :class:`RowCapture` on every Linear
    layer (OFF -> DECIDING); during that step the hook calls :meth:`check` for each gradient; the engine's
    :meth:`end_step` (collective) keeps the layers that pay off everywhere (-> DECIDED); from then on
    :meth:`gather` (collective) brings their rows to the owners every step. A checkpoint's decision
    (:meth:`load_state_dict`) is adopted instead of deciding, whenever the gatherer starts.
    """

    def __init__(self, layers: Sequence[KFACLayer], owners: Sequence[int], comm: Communicator,
                 captures: CaptureManager) -> None:
        self.layers, self.owners, self.comm, self._manager = layers, owners, comm, captures
        self.phase = RowPhase.OFF
        self.captures: dict[int, RowCapture] = {}
        self.chosen: list[int] = []  # indices of the layers whose owner gathers rows, not the gradient
        self._restored: list[str] | None = None
        self._checks: dict[tuple[int, int], bool] = {}  # (layer, id(param)) -> its gradient was g^T a here
        self._layers_of = layers_of_params(layers)

    def start(self) -> None:
        """Capture the rows of every Linear layer during the next step (or adopt a loaded decision)."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LinearLayer):
                self.captures[i] = RowCapture(layer, self.comm.world_size)
                self._manager.add_rows(self.captures[i])
        if not self.captures:
            return
        self.phase = RowPhase.DECIDING
        if self._restored is not None:
            self._adopt(self._restored)

    def gathers(self, index: int) -> bool:
        """Whether layer ``index``'s gradient stays local because its owner gathers its rows instead."""
        return self.phase is RowPhase.DECIDED and index in self.captures

    def check(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """While deciding, record for each of this rank's gradients ``grads`` of ``params`` (a DDP bucket's)
        whether it equals ``g^T a`` (per block); otherwise nothing."""
        if self.phase is not RowPhase.DECIDING:
            return
        for param, grad in zip(params, grads):
            for i in self._layers_of.get(id(param), []):
                if i in self.captures:
                    piece = self.layers[i].grad_piece(param, grad)
                    self._checks[(i, id(param))] = self.captures[i].gradient_matches(param, piece)

    def end_step(self) -> None:
        """After a K-FAC step; the first one decides (collective): keep the layers where
        :func:`rows_pay_off` at the largest row count of any rank and every rank saw its gradient equal
        ``g^T a``."""
        if self.phase is not RowPhase.DECIDING:
            return
        candidates = sorted(self.captures)
        failed = [float(not all(self._checks.get((i, id(p)), False) for p in self.layers[i].params())) for i in candidates]
        counts = [float(self.captures[i].num_rows()) for i in candidates]
        votes = torch.tensor(counts + failed, dtype=torch.float64, device=self.layers[0].weight.device)
        self.comm.all_reduce_max([votes], "gradients")
        most_rows, any_failed = votes[: len(candidates)].tolist(), votes[len(candidates) :].tolist()
        world = self.comm.world_size
        self._adopt([self.layers[i].name for i, rows, bad in zip(candidates, most_rows, any_failed)
                     if not bad and rows_pay_off(world, int(rows), self.layers[i].d_a, self.layers[i].d_g)])
        if self.chosen:
            log.info("dpkfac gathers the rows of %s instead of their gradients", [self.layers[i].name for i in self.chosen])

    def _adopt(self, names: list[str]) -> None:
        chosen = {i for i, layer in enumerate(self.layers) if layer.name in set(names)}
        for i in list(self.captures):
            if i in chosen:
                self.captures[i].clear()
                self.captures[i].candidate = False
            else:
                self._manager.remove_rows(self.captures.pop(i))
        self.chosen = sorted(chosen)
        self.phase = RowPhase.DECIDED
        self._checks.clear()

    def gather(self) -> tuple[dict[int, tuple[Tensor, Tensor]], list[int]]:
        """Collective: each chosen layer's rows ``(a, g)`` of all ranks, stacked, on its owner, with ``g``
        divided by P so that ``g^T a`` is the averaged gradient (a rank's rows padded with zeros to the
        largest count, which adds nothing to ``g^T a``); and the layers gathered (the same on every rank:
        not those no rank called)."""
        if self.phase is not RowPhase.DECIDED or not self.chosen:
            return {}, []
        captures = [self.captures[i] for i in self.chosen]
        device = self.layers[0].weight.device
        counts = torch.tensor([float(c.num_rows()) for c in captures], dtype=torch.float64, device=device)
        self.comm.all_reduce_max([counts], "gradients")
        sent, owners, indices = [], [], []
        for i, capture, most in zip(self.chosen, captures, counts.tolist()):
            if most > 0:  # else no rank called the layer: its gradient stays as it is
                layer = self.layers[i]
                dtype = torch.promote_types(layer.weight.dtype, torch.float32)  # the factor dtype
                padded = torch.empty(int(most), layer.d_a + layer.d_g, dtype=dtype, device=device)
                capture.write_rows(padded)
                sent.append(padded)
                owners.append(self.owners[i])
                indices.append(i)
            capture.clear()
        out = {}
        for j, stacked in self.comm.gather_to_owners(sent, owners, "gradients").items():  # (P, rows, d_a + d_g)
            i, d_a = indices[j], self.layers[indices[j]].d_a
            stacked = stacked.reshape(-1, stacked.shape[-1])
            out[i] = (stacked[:, :d_a], stacked[:, d_a:].div_(self.comm.world_size))
        return out, indices

    def state_dict(self) -> dict[str, Any]:
        """The decision, for checkpoints: it holds only for the same world size."""
        names = [self.layers[i].name for i in self.chosen] if self.phase is RowPhase.DECIDED else []
        return {"phase": self.phase.value, "layers": names, "world_size": self.comm.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's decision (of the same world size) instead of deciding anew: re-deciding would
        run the first resumed step on the gradient path, which rounds differently from the rows path."""
        if state["phase"] != RowPhase.DECIDED.value or state["world_size"] != self.comm.world_size:
            return
        self._restored = list(state["layers"])
        if self.phase is RowPhase.DECIDING:
            self._adopt(self._restored)

    def remove(self) -> None:
        """Stop capturing anything."""
        for capture in self.captures.values():
            self._manager.remove_rows(capture)
        self.captures.clear()
        self.chosen, self.phase = [], RowPhase.OFF
