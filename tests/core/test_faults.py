"""Numerical faults: a bad batch or a failed decomposition costs one layer one step of K-FAC, never
diverges the ranks, and stops training with a clear error only when it keeps happening."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import identical_on_all_ranks
from lightning_dpkfac import KFACPreconditioner
from lightning_dpkfac.core.faults import DivergenceWatch
from lightning_dpkfac.core.preconditioner import KFACNumericalError

HP = dict(damping=1e-2, lr=0.1, kl_clip=1e-3, factor_update_steps=1, inv_update_steps=1, method="eigen")


def batch(step: int, overflow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A (8, 6) batch; ``overflow`` puts 1e25 in one input, so A = a^T a / n overflows float32 to inf
    while the forward pass and the gradient stay finite."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    if overflow:
        x[0, 0] = 1e25
    return x, y


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(model: nn.Module, pre: KFACPreconditioner, steps: int, bad_step: int | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step, overflow=step == bad_step)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


def test_overflowing_batch_skips_one_factor_update_and_training_goes_on() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    pre = KFACPreconditioner(layer, **HP)
    train(layer, pre, steps=3)
    A_before = pre.factors("")[0].clone()
    train(layer, pre, steps=1, bad_step=0)
    assert pre.faults.faults_total == 1 and pre.faults.last_step_faults == 1
    assert torch.equal(pre.factors("")[0], A_before), "the bad batch must not reach the running average"
    train(layer, pre, steps=2)
    assert pre.faults.faults_total == 1 and all_finite(layer)


def test_failed_float32_eigh_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh, calls = torch.linalg.eigh, []

    def eigh_failing_in_float32(m: torch.Tensor):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced failure")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    pre = KFACPreconditioner(layer, **HP)
    train(layer, pre, steps=2)
    assert calls[:3] == [torch.float32, torch.float64, torch.float64]  # A fails, then A and G in float64
    assert pre.faults.faults_total == 0 and pre.layer_state("").decomposition["qa"].dtype == torch.float32


def test_failed_decomposition_keeps_the_last_good_one_then_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    pre = KFACPreconditioner(layer, max_consecutive_faults=3, **HP)
    train(layer, pre, steps=2)
    good = pre.layer_state("").decomposition["qa"]

    def broken_eigh(m: torch.Tensor):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    train(layer, pre, steps=2)
    assert pre.faults.faults_total == 2 and torch.equal(pre.layer_state("").decomposition["qa"], good)
    with pytest.raises(KFACNumericalError, match=r"layer\(s\) \[''\] was non-finite on 3 consecutive steps"):
        train(layer, pre, steps=1)


def test_a_failed_overlapped_decomposition_counts_at_the_step_that_installs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapped, a decomposition is installed at the next step, or between steps by an inspection: its
    failure counts at the first step after the install, and three in a row still stop training."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    pre = KFACPreconditioner(layer, max_consecutive_faults=3, overlap_decompositions=True, **HP)
    train(layer, pre, steps=2)
    good = pre.layer_state("").decomposition["qa"]  # installs step 1's

    def broken_eigh(m: torch.Tensor):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    train(layer, pre, steps=2)  # step 2's failure is installed and counted at step 3; step 3's is on the worker
    assert pre.faults.faults_total == 1
    assert torch.equal(pre.layer_state("").decomposition["qa"], good)  # installs step 3's failure
    train(layer, pre, steps=1)  # and step 4 counts it
    assert pre.faults.faults_total == 2
    with pytest.raises(KFACNumericalError, match=r"layer\(s\) \[''\] was non-finite on 3 consecutive steps"):
        train(layer, pre, steps=1)


def _owner_only_fault(rank: int, world: int, break_from_step: int) -> dict:
    """Two layers; the owner of layer '0' loses its eigh from ``break_from_step`` on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, max_consecutive_faults=2, **HP)
    pre.register_ddp_comm_hook(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real_eigh = torch.linalg.eigh
    raised_at = None
    for step in range(5):
        if step == break_from_step and pre.owner_of("0") == rank:
            torch.linalg.eigh = lambda m: (_ for _ in ()).throw(torch.linalg.LinAlgError("forced"))
        opt.zero_grad()
        x, y = batch(10 * step + rank)
        F.cross_entropy(ddp(x), y).backward()
        try:
            pre.step()
        except KFACNumericalError:
            raised_at = step
            break
        opt.step()
    torch.linalg.eigh = real_eigh
    return {"raised_at": raised_at, "faults": pre.faults.faults_total, "same_params": identical_on_all_ranks(model)}


def test_a_fault_on_the_owner_is_acted_on_identically_by_every_rank(ranks) -> None:
    results = ranks(_owner_only_fault, 2, 2)
    assert results[0] == results[1] == {"raised_at": 3, "faults": 2, "same_params": True}


def _backward_twice_without_step(rank: int, world: int) -> str:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, **HP)
    pre.register_ddp_comm_hook(ddp)
    for step in range(2):
        x, y = batch(step)
        try:
            F.cross_entropy(ddp(x), y).backward()
        except RuntimeError as error:
            return str(error)
    return "no error"


def test_a_backward_without_the_kfac_step_in_between_is_an_error(ranks) -> None:
    for message in ranks(_backward_twice_without_step, 2):
        assert "KFACPreconditioner.step() was not called before the next backward" in message


def _overflow_batch_on_two_ranks(rank: int, world: int) -> dict:
    """One Linear layer; at step 2 every rank's batch overflows its factor (the owner's is what counts)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    ddp = DistributedDataParallel(layer)
    pre = KFACPreconditioner(layer, **HP)
    pre.register_ddp_comm_hook(ddp)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(5):
        opt.zero_grad()
        x, y = batch(10 * step + rank, overflow=step == 2)
        F.cross_entropy(ddp(x), y).backward()
        pre.step()
        opt.step()
    return {"faults": pre.faults.faults_total, "same_params": identical_on_all_ranks(layer), "finite": all_finite(layer)}


def test_overflowing_batch_on_two_ranks_counts_one_fault_everywhere_and_training_goes_on(ranks) -> None:
    assert ranks(_overflow_batch_on_two_ranks, 2) == [{"faults": 1, "same_params": True, "finite": True}] * 2


def _non_finite_batch_on_one_rank(rank: int, world: int, gather_rows: bool) -> dict:
    """A 6-64-64-3 MLP under SGD with momentum; at step 3 rank 1's inputs are multiplied by inf. With 8
    examples per rank the 64 -> 64 layer gathers its rows (``gather_rows``), so both paths are checked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, gather_rows=gather_rows, **HP)
    pre.register_ddp_comm_hook(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    unchanged = None
    for step in range(6):
        opt.zero_grad()
        x, y = batch(10 * step + rank)
        if step == 3 and rank == 1:
            x = x * float("inf")
        F.cross_entropy(ddp(x), y).backward()
        pre.step()
        before = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in model.parameters()] \
            if step == 3 else None
        opt.step()
        if before is not None:
            unchanged = all(torch.equal(p, p0) and torch.equal(opt.state[p]["momentum_buffer"], m0)
                            for p, (p0, m0) in zip(model.parameters(), before))
    return {"rows": bool(pre.row_layers), "skipped": pre.faults.skipped_steps, "faults": pre.faults.faults_total,
            "unchanged": unchanged, "same_params": identical_on_all_ranks(model), "finite": all_finite(model)}


@pytest.mark.parametrize("gather_rows", [False, True])
def test_a_non_finite_gradient_is_never_applied_and_every_rank_skips_the_update(ranks, gather_rows: bool) -> None:
    """No parameter and no momentum buffer changes at the bad step; training then goes on, identically."""
    expected = {"rows": gather_rows, "skipped": 1, "faults": 0, "unchanged": True, "same_params": True,
                "finite": True}
    assert ranks(_non_finite_batch_on_one_rank, 2, gather_rows) == [expected] * 2


def test_non_finite_gradients_in_a_row_stop_training_with_an_error_naming_the_data() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    pre = KFACPreconditioner(layer, max_consecutive_faults=2, **HP)
    train(layer, pre, steps=2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(KFACNumericalError, match=r"non-finite \(inf/NaN\) on 2 consecutive steps \(2 to 3\)") as error:
        for step in range(2):
            opt.zero_grad()
            x, y = batch(step)
            F.cross_entropy(layer(x * float("inf")), y).backward()
            pre.step()
            opt.step()
    assert "the data" in str(error.value) and pre.faults.skipped_steps == 2
    assert all_finite(layer)


def test_a_loss_that_doubles_after_its_lowest_point_is_named_once_as_divergence() -> None:
    watch = DivergenceWatch(factor=2.0, patience=3, decay=0.0)  # decay 0: the average is the last loss
    said = [watch.observe(k, loss, damping=1e-3, kl_clip=1e-3)
            for k, loss in enumerate([2.3, 1.5, 1.0, 2.2, 1.9, 1.8, 2.5, 5.0])]
    assert said[:6] == [None] * 6  # too soon after the lowest (1.0 at step 2), or below twice it
    assert "rose from 1 at step 2 to 2.5 at step 6" in said[6] and "raise damping (now 0.001)" in said[6]
    assert said[7] is None  # once


def test_a_falling_or_noisy_loss_is_not_divergence() -> None:
    watch = DivergenceWatch()
    losses = [2.3 * 0.97**k + (0.3 if k % 2 else 0.0) for k in range(200)]
    assert all(watch.observe(k, loss, 1e-3, None) is None for k, loss in enumerate(losses))


def test_an_explosive_loss_is_named_at_once() -> None:
    watch = DivergenceWatch(decay=0.0)
    said = [watch.observe(k, loss, 1e-3, None) for k, loss in enumerate([2.3, 177.0, 2.8e5])]
    assert said[:2] == [None, None] and "rose from 2.3 at step 0 to 2.8e+05 at step 2" in said[2]
