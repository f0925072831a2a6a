"""Bucketed asynchronous collectives on a ``torch.distributed`` process group, with byte counters.

Byte counters record, per kind of traffic, the bytes one rank moves on average under a bandwidth-optimal
algorithm (the convention of the DP-KFAC paper and of ``lightning_dpkfac.tools.plan``), for a payload of
``m`` bytes on ``P`` ranks:

- all-reduce: ``2 (P - 1) / P * m`` (ring: reduce-scatter then all-gather);
- broadcast:  ``(P - 1) / P * m`` (the ``(P - 1) m`` bytes that must reach the receivers, over P ranks);
- reduce:     ``(P - 1) / P * m`` (the mirror image of a broadcast);
- gather:     ``(P - 1) / P * m`` for ``m`` bytes from each rank (the ``(P - 1) m`` bytes that reach the
  destination, over P ranks).

With one rank every collective is skipped and counts 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

KINDS = ("gradients", "factors", "inverses", "preconditioned")


@dataclass(frozen=True)
class Message:
    """A declared collective: ``elements`` numbers of ``dtype`` ("param": the parameters' dtype, "factor": the
    factors' dtype, "float64") sent as a ``collective`` ("all_reduce", "reduce", "broadcast", "gather") and
    counted as ``kind`` (:data:`KINDS`). The engine's parts declare their traffic this way; the planner
    (``lightning_dpkfac.tools.plan``) sums the declarations over layer shapes."""

    kind: str
    collective: str
    elements: int
    dtype: str = "param"


def per_rank_bytes(collective: str, nbytes: float, world_size: int) -> float:
    """Bytes one rank moves in one ``collective`` ("all_reduce", "reduce", "broadcast" or "gather": ``nbytes``
    from each rank) of ``nbytes`` on ``world_size`` ranks, by the convention above."""
    f = (world_size - 1) / world_size
    return {"all_reduce": 2 * f, "broadcast": f, "reduce": f, "gather": f}[collective] * nbytes


class Communicator:
    """Collectives of one process group, packed into buckets of at most ``bucket_cap_bytes``."""

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_cap_bytes: int = 25 * 2**20) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group if group is not None or not self.distributed else dist.group.WORLD
        self.rank = dist.get_rank(self.group) if self.distributed else 0
        self.world_size = dist.get_world_size(self.group) if self.distributed else 1
        self.bucket_cap_bytes = bucket_cap_bytes
        self.bytes_sent: dict[str, float] = defaultdict(float)

    def count(self, kind: str, collective: str, nbytes: int) -> None:
        """Add the per-rank traffic of one ``collective`` of ``nbytes`` (:func:`per_rank_bytes`)."""
        if kind not in KINDS:
            raise KeyError(f"unknown traffic kind {kind!r}; expected one of {KINDS}")
        self.bytes_sent[kind] += per_rank_bytes(collective, nbytes, self.world_size)

    def global_rank(self, group_rank: int) -> int:
        """The global rank of rank ``group_rank`` of this communicator's group."""
        if self.group is None or self.group == dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def all_reduce_sum(self, tensors: Sequence[Tensor], kind: str) -> None:
        """Sum each tensor over all ranks, in place."""
        self._all_reduce(tensors, kind, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensors: Sequence[Tensor], kind: str) -> None:
        """Elementwise maximum of each tensor over all ranks, in place."""
        self._all_reduce(tensors, kind, dist.ReduceOp.MAX)

    def start_all_reduce_sum(self, tensors: list[Tensor], kind: str) -> torch.futures.Future:
        """Start summing ``tensors`` (one dtype and device) over all ranks, in place, as one packed message;
        the future completes once they hold the sums."""
        flat = _pack(tensors)
        self.count(kind, "all_reduce", flat.numel() * flat.element_size())
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        return work.get_future().then(partial(_unpack_result, flat=flat, tensors=tensors))

    def _all_reduce(self, tensors: Sequence[Tensor], kind: str, op: dist.ReduceOp) -> None:
        if self.world_size == 1 or not tensors:
            return
        pending = []
        for bucket in self.buckets(tensors):
            flat = _pack(bucket)
            self.count(kind, "all_reduce", flat.numel() * flat.element_size())
            work = dist.all_reduce(flat, op=op, group=self.group, async_op=True)
            pending.append((work, flat, bucket))
        for work, flat, bucket in pending:
            work.wait()
            _unpack(flat, bucket)

    def broadcast_from_owners(self, tensors: Sequence[Tensor], owners: Sequence[int], kind: str) -> None:
        """Overwrite ``tensors[i]`` on every rank with its value on rank ``owners[i]``, in place.

        Tensors of one owner are packed together; all buckets are in flight at once.
        """
        by_owner: dict[int, list[Tensor]] = defaultdict(list)
        for tensor, owner in zip(tensors, owners):
            by_owner[owner].append(tensor)
        for pending in [self.start_broadcast(by_owner[owner], owner, kind) for owner in sorted(by_owner)]:
            pending.wait()

    def start_broadcast(self, tensors: Sequence[Tensor], owner: int, kind: str) -> PendingBroadcast:
        """Start overwriting ``tensors`` on every rank with their values on rank ``owner`` (bucketed);
        the returned handle's ``wait()`` completes it. Every rank must start the broadcasts of all owners
        in the same order, but a receiver may start one early, before the owner has its values."""
        if self.world_size == 1 or not tensors:
            return PendingBroadcast([], receiving=False)
        receiving = owner != self.rank
        pending = []
        for bucket in self.buckets(tensors):
            if receiving and len(bucket) > 1:
                flat = bucket[0].new_empty(sum(t.numel() for t in bucket))
            else:
                flat = _pack(bucket)
            self.count(kind, "broadcast", flat.numel() * flat.element_size())
            work = dist.broadcast(flat, src=self.global_rank(owner), group=self.group, async_op=True)
            pending.append((work, flat, bucket))
        return PendingBroadcast(pending, receiving)

    def start_reduce_to_owners(self, parts: dict[int, list[Tensor]], kind: str) -> torch.futures.Future:
        """Start summing ``parts[o]`` (the same shapes on every rank) over all ranks onto rank ``o``, for
        every owner ``o`` at once; the returned future completes once this rank's own parts hold their sums
        (the other parts are left as they are). Counted as one reduce per owner.

        One all-to-all with uneven splits (a reduce-scatter: each rank sends each owner its part, the owner
        adds the P parts in rank order) when the owners' receive buffers (P times their parts) stay within
        twice the parts' total: over gloo it takes a fraction of the time of one ``reduce`` per owner
        (docs/communication.md). Else one ``reduce`` per owner, which needs no
        such buffer.
        """
        sizes = [sum(t.numel() for t in parts.get(o, [])) for o in range(self.world_size)]
        for o, tensors in parts.items():
            self.count(kind, "reduce", sizes[o] * tensors[0].element_size())
        if self.world_size * max(sizes) > 2 * sum(sizes):
            futures = []
            for o, tensors in parts.items():
                flat = _pack(tensors)
                work = dist.reduce(flat, dst=self.global_rank(o), group=self.group, async_op=True)
                # elsewhere than on the owner the reduced value is undefined and unused
                futures.append(work.get_future().then(partial(_unpack_result, flat=flat, tensors=tensors))
                               if o == self.rank else work.get_future())
            return torch.futures.collect_all(futures)
        send = _pack([t for o in range(self.world_size) for t in parts.get(o, [])])
        own = self.world_size * sizes[self.rank]
        received = send.new_empty(own)
        work = dist.all_to_all_single(received, send, [sizes[self.rank]] * self.world_size, sizes, group=self.group,
                                      async_op=True)
        mine = parts.get(self.rank, [])

        def add_up(_: torch.futures.Future) -> None:
            if mine:
                _unpack(received.view(self.world_size, -1).sum(0), mine)

        return work.get_future().then(add_up)

    def gather_to_owners(self, tensors: Sequence[Tensor], owners: Sequence[int], kind: str) -> dict[int, Tensor]:
        """Collect ``tensors[i]`` (the same shapes on every rank) of all ranks on rank ``owners[i]``.

        Returns, on each rank, ``{i: stacked}`` for the ``i`` it owns, ``stacked[r]`` being rank r's
        ``tensors[i]`` (contiguous when the owner's bucket holds one tensor). Tensors of one owner are
        packed together; all buckets are in flight at once.
        """
        if self.world_size == 1:
            return {i: t.unsqueeze(0) for i, (t, owner) in enumerate(zip(tensors, owners)) if owner == self.rank}
        by_owner: dict[int, list[int]] = defaultdict(list)
        for i, owner in enumerate(owners):
            by_owner[owner].append(i)
        pending = []
        for owner in sorted(by_owner):
            for bucket in self.buckets([tensors[i] for i in by_owner[owner]]):
                flat = _pack(bucket)
                self.count(kind, "gather", flat.numel() * flat.element_size())
                # One (P, bucket) tensor on the owner: the ranks' parts land in its rows, no copy after.
                received = flat.new_empty(self.world_size, flat.numel()) if owner == self.rank else None
                parts = list(received.unbind(0)) if received is not None else None
                work = dist.gather(flat, parts, dst=self.global_rank(owner), group=self.group, async_op=True)
                pending.append((work, received, len(bucket)))
        out: dict[int, Tensor] = {}
        positions = iter(i for owner in sorted(by_owner) for i in by_owner[owner])
        for work, received, size in pending:
            work.wait()
            indices = [next(positions) for _ in range(size)]
            if received is None:
                continue
            offset = 0
            for i in indices:
                n = tensors[i].numel()
                out[i] = received[:, offset : offset + n].reshape(self.world_size, *tensors[i].shape)
                offset += n
        return out

    def buckets(self, tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
        """Consecutive runs of same-dtype, same-device tensors of at most ``bucket_cap_bytes`` each
        (a single larger tensor is a bucket of its own)."""
        bucket: list[Tensor] = []
        size = 0
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            same = not bucket or (tensor.dtype == bucket[0].dtype and tensor.device == bucket[0].device)
            if bucket and (not same or size + nbytes > self.bucket_cap_bytes):
                yield bucket
                bucket, size = [], 0
            bucket.append(tensor)
            size += nbytes
        if bucket:
            yield bucket


class PendingBroadcast:
    """One owner's broadcast buckets in flight (see :meth:`Communicator.start_broadcast`)."""

    def __init__(self, pending: list[tuple[dist.Work, Tensor, list[Tensor]]], receiving: bool) -> None:
        self._pending, self._receiving = pending, receiving

    def wait(self) -> None:
        for work, flat, bucket in self._pending:
            work.wait()
            if self._receiving:
                _unpack(flat, bucket)
        self._pending = []


def _unpack_result(_: torch.futures.Future, flat: Tensor, tensors: list[Tensor]) -> None:
    _unpack(flat, tensors)


def _pack(tensors: list[Tensor]) -> Tensor:
    # One contiguous tensor is sent as a view of itself: no copy.
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)


def _unpack(flat: Tensor, tensors: list[Tensor]) -> None:
    if len(tensors) == 1 and flat.data_ptr() == tensors[0].data_ptr():
        return
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(flat[offset : offset + n].view_as(tensor))
        offset += n
