"""DDP's gradient communication under K-FAC: the communication hooks and the state they route by.

In dpkfac only a layer's owner reads its averaged gradient, so each K-FAC layer's (block's) gradient is
*reduced to its owner* (about half an all-reduce), the other gradients all-reduced; the owner's broadcast of
the preconditioned result in ``step()`` then gives every rank the final value: together one all-reduce's
worth of bytes. The gradients of layers whose owner gathers their rows instead
(:mod:`lightning_dpkfac.distributed.rows`) stay where they are. dkfac, a model without K-FAC layers, and runs
under a loss scaler keep DDP's all-reduce (:func:`counting_all_reduce_hook`).

Hooks carry no annotations on purpose: DDP compares a hook's annotations with the real ``dist.GradBucket``
and ``Future`` classes, and ``from __future__ import annotations`` turns them into strings it rejects.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_dpkfac.core.layers import KFACLayer, layers_of_params
from lightning_dpkfac.distributed.comm import Communicator, Message
from lightning_dpkfac.distributed.rows import RowGatherer


def hook_messages(elements: int, to_owner: bool) -> list[Message]:
    """The traffic of ``elements`` gradient numbers in a DDP hook, every step: reduced to an owner (dpkfac's
    K-FAC layers) or all-reduced (everything else)."""
    return [Message("gradients", "reduce" if to_owner else "all_reduce", elements)]


class GradientRouter:
    """Where each gradient goes in dpkfac's DDP hook: to the owners of the layers (blocks) that read it,
    to every rank (a parameter outside the K-FAC layers), or nowhere (a layer whose rows are gathered).
    Also watches that the engine's step follows every synchronising backward.
    """

    def __init__(self, layers: Sequence[KFACLayer], owners: Sequence[int], rows: RowGatherer,
                 comm: Communicator) -> None:
        self.layers, self.owners, self.rows, self.comm = layers, owners, rows, comm
        self._layers_of = layers_of_params(layers)
        self._awaiting_step = False  # a complete backward was reduced, and no step() followed yet

    def destinations(self, param: Tensor, grad: Tensor) -> list[tuple[int | None, Tensor]]:
        """``[(None, grad)]`` (all-reduce) for a parameter outside the K-FAC layers, else ``(owner, piece)``
        for each layer (block) that reads it, but those whose owner gathers their rows."""
        layers = self._layers_of.get(id(param))
        if layers is None:
            return [(None, grad)]
        return [(self.owners[i], self.layers[i].grad_piece(param, grad)) for i in layers if not self.rows.gathers(i)]

    def on_bucket(self, is_last: bool) -> None:
        """A gradient bucket arrives. After a complete backward that no step followed, the reduced gradients
        were never completed: an error naming the likely cause."""
        if self._awaiting_step:
            raise RuntimeError(
                "dpkfac reduced the gradients of each K-FAC layer to its owner, but KFACPreconditioner.step() "
                "was not called before the next backward, so the other ranks never received them. In Lightning "
                "with manual optimization, call step() on the optimizer from self.optimizers() (a "
                "LightningOptimizer, which runs K-FAC), not on the raw torch optimizer; in plain PyTorch call "
                "pre.step() after every backward that synchronises gradients."
            )
        self._awaiting_step = is_last

    def step_done(self) -> None:
        self._awaiting_step = False


def owner_reduce_hook(router, bucket):  # type: ignore[no-untyped-def]
    """dpkfac's DDP comm hook (state: a :class:`GradientRouter`): every gradient of the bucket averaged onto
    the ranks that read it."""
    comm: Communicator = router.comm
    buffer = bucket.buffer()
    router.on_bucket(is_last=bucket.is_last())
    router.rows.check(bucket.parameters(), bucket.gradients())  # before the division below: grads view the buffer
    if comm.world_size == 1:
        return _completed(buffer)
    by_owner: dict[int | None, list[Tensor]] = defaultdict(list)
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        for owner, piece in router.destinations(param, grad):  # a layer split into blocks: several owners
            by_owner[owner].append(piece)
    buffer.div_(comm.world_size)  # all of it, the gradients left local too (they are averaged in step())
    futures = []
    uncovered = by_owner.pop(None, None)
    if uncovered is not None:
        futures.append(comm.start_all_reduce_sum(uncovered, "gradients"))
    if by_owner:
        futures.append(comm.start_reduce_to_owners(by_owner, "gradients"))
    if not futures:  # every gradient of the bucket belongs to a layer whose rows are gathered
        return _completed(buffer)
    return torch.futures.collect_all(futures).then(lambda _: buffer)


def counting_all_reduce_hook(comm, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce (average) of one gradient bucket, counted as "gradients" traffic (state: a
    :class:`~lightning_dpkfac.distributed.comm.Communicator`)."""
    buffer = bucket.buffer()
    buffer.div_(comm.world_size)
    return comm.start_all_reduce_sum([buffer], "gradients").then(lambda _: buffer)


def _completed(value: Tensor) -> torch.futures.Future:
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(value)
    return done
