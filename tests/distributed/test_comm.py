"""Bucketed collectives on real gloo ranks move the right values and count the right bytes."""

from __future__ import annotations

import torch

from lightning_dpkfac.distributed.comm import Communicator


def test_single_process_collectives_are_no_ops_that_count_nothing() -> None:
    comm = Communicator()
    t = torch.ones(3)
    comm.all_reduce_sum([t], "factors")
    comm.broadcast_from_owners([t], [0], "preconditioned")
    assert torch.equal(t, torch.ones(3)) and sum(comm.bytes_sent.values()) == 0


def test_buckets_respect_the_cap_and_split_on_dtype() -> None:
    comm = Communicator(bucket_cap_bytes=40)
    tensors = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(20)]
    sizes = [[t.numel() for t in b] for b in comm.buckets(tensors)]
    assert sizes == [[4, 4], [4], [2], [20]]  # 32 B fit, a 3rd would exceed 40 B; dtype change; oversize alone


def _all_reduce_and_broadcast(rank: int, world: int) -> dict:
    comm = Communicator(bucket_cap_bytes=16)  # forces several buckets
    summed = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1))]
    comm.all_reduce_sum(summed, "factors")
    owned = [torch.full((5,), float(rank)), torch.full((2,), float(rank)), torch.full((1,), float(rank))]
    comm.broadcast_from_owners(owned, owners=[1, 0, 1], kind="preconditioned")
    return {"summed": [t.tolist() for t in summed], "owned": [t.tolist() for t in owned],
            "bytes": dict(comm.bytes_sent)}


def test_all_reduce_and_owner_broadcast_on_two_ranks(ranks) -> None:
    for res in ranks(_all_reduce_and_broadcast, 2):
        assert res["summed"] == [[3.0] * 3, [[30.0, 30.0], [30.0, 30.0]]]
        assert res["owned"] == [[1.0] * 5, [0.0] * 2, [1.0]]
        # all-reduce of 7 floats: 2 (P-1)/P * 28 B = 28 B; broadcasts of 8 floats: (P-1)/P * 32 B = 16 B
        assert res["bytes"] == {"factors": 28.0, "preconditioned": 16.0}


def _gather_and_max(rank: int, world: int) -> dict:
    comm = Communicator(bucket_cap_bytes=32)  # owner 2's two tensors share a bucket, owner 0's is alone
    tensors = [torch.full((2, 3), 10.0 * rank), torch.full((4,), float(rank)), torch.full((1,), -float(rank))]
    gathered = comm.gather_to_owners(tensors, owners=[0, 2, 2], kind="gradients")
    largest = torch.tensor([float(rank), 5.0 - rank])
    comm.all_reduce_max([largest], "gradients")
    return {"gathered": {i: t.tolist() for i, t in gathered.items()}, "max": largest.tolist(),
            "bytes": dict(comm.bytes_sent)}


def test_gather_to_owners_stacks_every_ranks_tensor_on_its_owner(ranks) -> None:
    results = ranks(_gather_and_max, 3)
    assert results[0]["gathered"] == {0: [[[0.0] * 3] * 2, [[10.0] * 3] * 2, [[20.0] * 3] * 2]}
    assert results[1]["gathered"] == {}
    assert results[2]["gathered"] == {1: [[0.0] * 4, [1.0] * 4, [2.0] * 4], 2: [[0.0], [-1.0], [-2.0]]}
    for res in results:
        assert res["max"] == [2.0, 5.0]
        # gathers of 6 + 5 floats: (P-1)/P * 44 B; all-reduce of 2 floats: 2 (P-1)/P * 8 B
        assert res["bytes"] == {"gradients": 2 / 3 * 44 + 4 / 3 * 8}


def _reduce_to_owners(rank: int, world: int, owners: list[int]) -> dict:
    comm = Communicator()
    parts: dict[int, list[torch.Tensor]] = {}
    for i, owner in enumerate(owners):  # tensor i holds (rank + 1) * (i + 1) on every rank
        parts.setdefault(owner, []).append(torch.full((i + 2,), float((rank + 1) * (i + 1))))
    comm.start_reduce_to_owners(parts, "gradients").wait()
    return {"parts": {o: [t.tolist() for t in ts] for o, ts in parts.items()}, "bytes": dict(comm.bytes_sent)}


def _expected_reduce(owners: list[int], world: int, rank: int) -> dict[int, list[list[float]]]:
    """Sums on the owner; other ranks keep their own values."""
    out: dict[int, list[list[float]]] = {}
    for i, owner in enumerate(owners):
        total = sum((r + 1) * (i + 1) for r in range(world)) if owner == rank else (rank + 1) * (i + 1)
        out.setdefault(owner, []).append([float(total)] * (i + 2))
    return out


def test_reduce_to_owners_by_one_all_to_all_sums_each_part_on_its_owner(ranks) -> None:
    owners = [1, 0, 1]  # balanced enough: receive buffers 2 x 5 and 2 x 3 floats <= 2 x 9
    for rank, res in enumerate(ranks(_reduce_to_owners, 2, owners)):
        assert res["parts"] == _expected_reduce(owners, 2, rank)
        assert res["bytes"] == {"gradients": 1 / 2 * 9 * 4}  # one reduce per owner: (P-1)/P * 36 B


def test_reduce_to_owners_falls_back_to_reduces_when_one_owner_holds_most(ranks) -> None:
    owners = [2, 2, 0]  # owner 2 would receive 3 x 5 floats > 2 x 9: one reduce per owner instead
    for rank, res in enumerate(ranks(_reduce_to_owners, 3, owners)):
        assert res["parts"] == _expected_reduce(owners, 3, rank)
        assert res["bytes"] == {"gradients": 2 / 3 * 9 * 4}
