"""Decompositions overlapped with the next forward and backward pass (``overlap_decompositions``): they run on
a worker thread, the step does not wait for them, and they take effect at the next step."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dpkfac import KFACConfig, KFACPreconditioner
from lightning_dpkfac.core import preconditioner as engine_module
from lightning_dpkfac.core.overlap import overlaps

DAMPING = 0.1


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _train_step(model: nn.Module, pre: KFACPreconditioner, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()


def _damped_inverse(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(m.double() + DAMPING * torch.eye(m.shape[0], dtype=torch.float64))


def test_overlap_is_on_for_cuda_in_dpkfac_by_default_and_on_cpu_only_when_asked() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert KFACConfig().overlap_decompositions == "auto"
    assert overlaps("auto", "dpkfac", cuda) and not overlaps("auto", "dpkfac", cpu)
    assert overlaps(True, "dpkfac", cpu) and not overlaps(False, "dpkfac", cuda)
    assert not overlaps("auto", "dkfac", cuda)


def test_describe_says_where_decompositions_run() -> None:
    assert "decompositions inline;" in KFACPreconditioner(_model(), lr=0.1).describe()  # "auto" on CPU
    overlapped = KFACPreconditioner(_model(), lr=0.1, overlap_decompositions=True).describe()
    assert "decompositions overlapped with the next forward and backward pass (a worker thread);" in overlapped


@pytest.mark.parametrize("value", ["yes", 1, None, "true"])
def test_an_invalid_overlap_setting_is_named(value: object) -> None:
    with pytest.raises(ValueError, match=f"overlap_decompositions={value!r} is invalid"):
        KFACConfig(overlap_decompositions=value)  # type: ignore[arg-type]


def test_overlap_in_dkfac_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="needs mode='dpkfac'.*Fix: overlap_decompositions='auto' or False"):
        KFACConfig(mode="dkfac", overlap_decompositions=True)


def test_the_step_returns_while_its_decomposition_runs_on_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot's decomposition blocks on an event that is set only after step() returned: a step that waited
    for it would time out instead."""
    model = _model()
    pre = KFACPreconditioner(model, lr=0.1, kl_clip=None, damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=2, overlap_decompositions=True)
    _train_step(model, pre, 0)  # step 0 decomposes every layer at once
    release, threads, timed_out = threading.Event(), [], []
    decompose = engine_module.decompose_with_retries

    def blocking(*args: object) -> object:
        threads.append(threading.current_thread().name)
        timed_out.append(not release.wait(timeout=30))
        return decompose(*args)

    monkeypatch.setattr(engine_module, "decompose_with_retries", blocking)
    _train_step(model, pre, 1)  # the layer of slot 1 is due
    release.set()
    pre.layer_state(pre.layers[0].name)  # installs it
    assert threads and all(name.startswith("kfac-decompose") for name in threads)
    assert timed_out == [False] * len(threads)
    pre.remove_hooks()


def test_an_overlapped_decomposition_is_used_from_the_next_step_on() -> None:
    """Against the damped inverses of the factors, computed here: at its slot step a layer still
    preconditions with the decomposition of step 0, and from the next step with the new one."""
    model = _model()
    pre = KFACPreconditioner(model, lr=0.1, kl_clip=None, damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=2, overlap_decompositions=True)
    name, layer = "2", pre.layers[1]
    assert pre.schedule()[name] == 1
    seen = []  # per step: (A, G) after the step's factor update, the averaged gradient, the preconditioned one
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grad = layer.grad_matrix().double()
        pre.step()
        A, G = (f.double().clone() for f in pre.factors(name))
        seen.append((A, G, grad, layer.grad_matrix().double()))

    def preconditioned_with(factors_of: int, step: int) -> torch.Tensor:
        A, G = seen[factors_of][:2]
        return _damped_inverse(G) @ seen[step][2] @ _damped_inverse(A)

    for step, factors_of in ((0, 0), (1, 0), (2, 1)):
        torch.testing.assert_close(seen[step][3], preconditioned_with(factors_of, step), rtol=1e-4, atol=1e-6)
    assert (seen[1][0] - seen[0][0]).abs().max() > 1e-3, "the factors must change for the lag to show"
    pre.remove_hooks()


def test_a_checkpoint_taken_while_a_decomposition_is_pending_holds_it() -> None:
    model = _model()
    pre = KFACPreconditioner(model, lr=0.1, kl_clip=None, damping=DAMPING, factor_update_steps=1,
                             inv_update_steps=2, overlap_decompositions=True)
    for step in range(2):
        _train_step(model, pre, step)
    entry = pre.state_dict()["layers"]["2"]
    torch.testing.assert_close(entry["a_inv"].double(), _damped_inverse(entry["A"]), rtol=1e-4, atol=1e-6)
    pre.remove_hooks()
