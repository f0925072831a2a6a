"""The two ways the ranks share K-FAC's work, as objects behind one interface (``KFACConfig.mode``).

Each answers: who captures a layer, whether the batch factors are all-reduced, what is broadcast and when,
who preconditions a layer, and which DDP communication hook to install. Each also declares the messages of
its collectives per layer (``comm.Message``): the engine sizes what it sends from them, and the planner
(``lightning_dpkfac.tools.plan``) replays them on layer shapes.

::

    dpkfac (DP-KFAC)                          dkfac (D-KFAC, the paper's baseline)
    grads: reduce each layer to its owner     grads: all-reduce (DDP)
    owner: factors from its local batch       every rank: factors of every layer, all-reduced
    owner: decompose, precondition            owner: decompose, broadcast the decomposition
    owner: broadcast [P, sum(P*grad), flag]   every rank: precondition every layer
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from math import prod
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_dpkfac.core import payload
from lightning_dpkfac.core.decomposition import Decomposition
from lightning_dpkfac.core.factors import BatchFactor
from lightning_dpkfac.core.layers import KFACLayer
from lightning_dpkfac.core.timing import PhaseTimer
from lightning_dpkfac.distributed.assignment import LayerShape
from lightning_dpkfac.distributed.comm import Communicator, Message
from lightning_dpkfac.distributed.router import GradientRouter, counting_all_reduce_hook, owner_reduce_hook

#: A layer's captured batch factor and the scale that makes it the batch's factor.
Scaled = tuple[BatchFactor, float]


class Distribution(ABC):
    """Who does what for each layer, on ``comm``'s ranks, given the owner map ``owners``."""

    name: ClassVar[str]
    #: captures with fewer rows than columns are kept as rows until the fold (no d x d temporary)
    keeps_rows: ClassVar[bool]
    #: owners broadcast every layer's payload (else every rank computes every payload)
    broadcasts_payloads: ClassVar[bool]
    #: DDP's hook reduces each K-FAC layer's gradient to its owner (else it all-reduces every gradient)
    reduces_to_owners: ClassVar[bool] = False

    def __init__(self, layers: Sequence[KFACLayer], owners: Sequence[int], comm: Communicator,
                 timer: PhaseTimer) -> None:
        self.layers, self.owners, self.comm, self.timer = layers, owners, comm, timer

    @abstractmethod
    def builds_factors(self, index: int) -> bool:
        """Whether this rank captures layer ``index`` and keeps its factors."""

    def holds_decomposition(self, index: int) -> bool:
        """Whether this rank keeps layer ``index``'s decomposition (and computes its payload)."""
        return self.owners[index] == self.comm.rank

    def combine_batch_factors(self, batch: dict[int, tuple[Scaled | None, Scaled | None]],
                              dtypes: dict[int, torch.dtype]) -> dict[int, tuple[Scaled | None, Scaled | None]]:
        """The batch factors the running averages take: this rank's own (dpkfac)."""
        return batch

    def share_decompositions(self, due: list[int], results: dict[int, tuple[Tensor, ...] | None],
                             method: Decomposition,
                             dtypes: dict[int, torch.dtype]) -> dict[int, tuple[Tensor, ...] | None]:
        """The new decompositions this rank stores, from the ones it computed (``None``: failed) of the
        layers ``due`` this step."""
        return results

    def install(self, ddp: DistributedDataParallel, router: GradientRouter, under_scaler: bool) -> bool:
        """Register the DDP comm hook; returns whether it is the owner-reduce hook (rows may be gathered)."""
        ddp.register_comm_hook(self.comm, counting_all_reduce_hook)
        return False

    # ------------------------------------------------------------------ declared traffic
    @classmethod
    def factor_messages(cls, shape: LayerShape) -> list[Message]:
        """A layer's traffic on factor-update steps."""
        return []

    @classmethod
    def decomposition_messages(cls, shape: LayerShape, method: Decomposition) -> list[Message]:
        """A layer's traffic on decomposition steps."""
        return []

    @classmethod
    def result_messages(cls, shape: LayerShape) -> list[Message]:
        """A layer's traffic after preconditioning, every step."""
        return []


class DPKFAC(Distribution):
    """Distributed preconditioning: a layer's owner alone builds its factors from its local batch, keeps
    and decomposes them, preconditions the averaged gradient reduced to it, and broadcasts the result."""

    name = "dpkfac"
    keeps_rows = True
    broadcasts_payloads = True
    reduces_to_owners = True

    def builds_factors(self, index: int) -> bool:
        return self.owners[index] == self.comm.rank

    def install(self, ddp: DistributedDataParallel, router: GradientRouter, under_scaler: bool) -> bool:
        # A loss scaler skips a step from its own rank's gradients: only complete gradients make that
        # decision the same everywhere. Without K-FAC layers no step would complete the reduced gradients.
        if under_scaler or not self.layers:
            return super().install(ddp, router, under_scaler)
        ddp.register_comm_hook(router, owner_reduce_hook)
        return True

    @classmethod
    def result_messages(cls, shape: LayerShape) -> list[Message]:
        return [Message("preconditioned", "broadcast", payload.size(shape.d_a, shape.d_g))]


class DKFAC(Distribution):
    """D-KFAC (KAISA's COMM_OPT, MPD-KFAC): every rank builds every layer's factors, which are all-reduced;
    owners decompose and broadcast the decompositions; every rank preconditions every layer from DDP's
    all-reduced gradient, so nothing else is broadcast. Ranks stay bitwise identical because all their
    inputs are."""

    name = "dkfac"
    keeps_rows = False
    broadcasts_payloads = False

    def builds_factors(self, index: int) -> bool:
        return True

    def holds_decomposition(self, index: int) -> bool:
        return True

    @staticmethod
    def factor_shapes(shape: LayerShape) -> list[tuple[int, ...]]:
        """A layer's all-reduced batch factors: A, G and the weight of this rank's capture (1, or 0 if it
        captured nothing)."""
        return [(shape.d_a,) if shape.diagonal_a else (shape.d_a, shape.d_a), (shape.d_g, shape.d_g), (1,)]

    def combine_batch_factors(self, batch: dict[int, tuple[Scaled | None, Scaled | None]],
                              dtypes: dict[int, torch.dtype]) -> dict[int, tuple[Scaled | None, Scaled | None]]:
        """Average each layer's batch factors over the ranks that captured it."""
        if self.comm.world_size == 1:
            return batch
        tensors: list[Tensor] = []
        with self.timer("factor"):
            for i, (a, g) in batch.items():
                device = self.layers[i].weight.device
                if a is not None and g is not None:
                    tensors += [a[0].formed().mul_(a[1]), g[0].formed().mul_(g[1]),
                                torch.ones(1, dtype=dtypes[i], device=device)]
                else:
                    tensors += [torch.zeros(s, dtype=dtypes[i], device=device)
                                for s in self.factor_shapes(self.layers[i].shape)]
        with self.timer("comm"):
            self.comm.all_reduce_sum(tensors, "factors")
        counts = payload.to_host(tensors[2::3])  # one host sync for all layers
        out: dict[int, tuple[Scaled | None, Scaled | None]] = {}
        for j, (i, n) in enumerate(zip(batch, counts)):
            A, G = tensors[3 * j : 3 * j + 2]
            out[i] = ((BatchFactor.of(A), 1 / n), (BatchFactor.of(G), 1 / n)) if n > 0 else (None, None)
        return out

    def share_decompositions(self, due: list[int], results: dict[int, tuple[Tensor, ...] | None],
                             method: Decomposition,
                             dtypes: dict[int, torch.dtype]) -> dict[int, tuple[Tensor, ...] | None]:
        """Collective: the new decomposition of every layer ``due`` this step from its owner, with a flag
        (0: none, the owner had no factors yet; 1: new; 2: failed), to every rank."""
        if self.comm.world_size == 1:
            return results
        parts: dict[int, list[Tensor]] = {}
        flags: list[Tensor] = []
        tensors: list[Tensor] = []
        owners: list[int] = []
        for i in due:
            layer = self.layers[i]
            result, device = results.get(i), layer.weight.device
            parts[i] = list(result) if result is not None else [
                torch.zeros(s, dtype=dtypes[i], device=device)
                for s in method.wire_shapes(layer.d_a, layer.d_g, layer.diagonal_a)]
            flag = (1.0 if result is not None else 2.0) if i in results else 0.0
            flags.append(torch.full((1,), flag, dtype=dtypes[i], device=device))
            tensors += parts[i] + [flags[-1]]
            owners += [self.owners[i]] * (len(parts[i]) + 1)
        with self.timer("comm"):
            self.comm.broadcast_from_owners(tensors, owners, "inverses")
        shared: dict[int, tuple[Tensor, ...] | None] = {}
        for i, flag in zip(due, payload.to_host(flags)):
            if flag == 1.0:
                shared[i] = tuple(parts[i])
            elif flag == 2.0:
                shared[i] = None
        return shared

    @classmethod
    def factor_messages(cls, shape: LayerShape) -> list[Message]:
        return [Message("factors", "all_reduce", sum(prod(s) for s in cls.factor_shapes(shape)), "factor")]

    @classmethod
    def decomposition_messages(cls, shape: LayerShape, method: Decomposition) -> list[Message]:
        wire = sum(prod(s) for s in method.wire_shapes(shape.d_a, shape.d_g, shape.diagonal_a))
        return [Message("inverses", "broadcast", wire + 1, "factor")]  # + its flag


def distribution_for(mode: str) -> type[Distribution]:
    """The :class:`Distribution` class of ``KFACConfig.mode`` (one of ``core.config.MODES``)."""
    return {cls.name: cls for cls in (DPKFAC, DKFAC)}[mode]
