"""The engine's checkpoint state: complete, world-size independent, plain tensors, and checked on load."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kfac_reference as ref
from lightning_dpkfac import KFACPreconditioner

HP = dict(damping=1e-2, lr=0.1, kl_clip=1e-3, factor_update_steps=1, inv_update_steps=3, factor_decay=0.9,
          method="eigen")


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def train(model: nn.Module, pre: KFACPreconditioner, steps: range, ddp: nn.Module | None = None) -> list[torch.Tensor]:
    """SGD steps on per-step batches; returns the preconditioned gradients of the last step."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        model.zero_grad()
        F.cross_entropy((ddp or model)(x), y).backward()
        pre.step()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("max_factor_dim", [None, 4])
def test_resumed_engine_continues_bit_identically(max_factor_dim: int | None) -> None:
    model_a = make_model()
    pre_a = KFACPreconditioner(model_a, max_factor_dim=max_factor_dim, **HP)
    train(model_a, pre_a, range(4))  # step 4 is not a decomposition step: the saved one must be used
    model_b = make_model()
    model_b.load_state_dict(model_a.state_dict())
    pre_b = KFACPreconditioner(model_b, max_factor_dim=max_factor_dim, **HP)
    pre_b.load_state_dict(pre_a.state_dict())
    grads_a, grads_b = train(model_a, pre_a, range(4, 8)), train(model_b, pre_b, range(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert pre_b.steps == pre_a.steps == 8


def test_the_kl_clips_peak_lr_is_restored() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, **HP)
    train(model, pre, range(2))
    pre.step(lr=0.3)
    restored = KFACPreconditioner(make_model(), **HP)
    restored.load_state_dict(pre.state_dict())
    assert restored.kl_peak_lr == pre.kl_peak_lr == 0.3


def test_state_loads_with_weights_only() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, **HP)
    train(model, pre, range(2))
    buffer = io.BytesIO()
    torch.save(pre.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert torch.equal(state["layers"]["2"]["A"], pre.factors("2")[0])


def test_state_of_another_model_is_refused_naming_the_mismatch() -> None:
    model = make_model()
    pre = KFACPreconditioner(model, **HP)
    train(model, pre, range(1))
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"layer '2' has factors A 9x9, G 8x8 in the checkpoint but A 9x9, G 5x5"):
        KFACPreconditioner(other, **HP).load_state_dict(pre.state_dict())
    with pytest.raises(ValueError, match=r"unexpected layer '4'.*other skip_layers"):
        KFACPreconditioner(model, skip_layers=["4"], **HP).load_state_dict(pre.state_dict())
    blocks = KFACPreconditioner(model, max_factor_dim=4, **HP)
    train(model, blocks, range(1))
    with pytest.raises(ValueError, match=r"missing layer '0'.*unexpected layer '0\[0:4,0:4\]'.*or max_factor_dim"):
        KFACPreconditioner(model, **HP).load_state_dict(blocks.state_dict())  # a coarser cut: not in the state


def test_a_state_resumes_with_a_finer_cut_from_the_diagonal_blocks_of_its_factors() -> None:
    # Factors and decompositions every 2 steps, all in one slot: resumed at step 3, the first step neither
    # builds factors nor decomposes, so it preconditions with the decompositions rebuilt on load.
    hp = {**HP, "factor_update_steps": 2, "inv_update_steps": 2}
    model = make_model()
    pre = KFACPreconditioner(model, **hp)
    train(model, pre, range(3))
    blocks = KFACPreconditioner(model, max_factor_dim=4, **hp)
    blocks.load_state_dict(pre.state_dict())
    modules = dict(model.named_modules())

    def block_of(layer, matrix: torch.Tensor) -> torch.Tensor:
        return matrix[layer.block.r0 : layer.block.r1, layer.block.c0 : layer.block.c1]

    sliced = {}
    for layer in blocks.layers:
        A, G = pre.factors(layer.module_name)
        b = layer.block
        sliced[layer.name] = (A[b.c0 : b.c1, b.c0 : b.c1], G[b.r0 : b.r1, b.r0 : b.r1])
        assert all(torch.equal(x, y) for x, y in zip(blocks.factors(layer.name), sliced[layer.name])), layer.name
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = {l.name: block_of(l, ref.grad_matrix(modules[l.module_name])).clone() for l in blocks.layers}
    blocks.step()
    expected, _ = ref.precondition_layers({n: (A.double(), G.double()) for n, (A, G) in sliced.items()},
                                          {n: v.double() for n, v in plain.items()},
                                          HP["damping"], "eigen", HP["kl_clip"], HP["lr"])
    for layer in blocks.layers:
        got = block_of(layer, ref.grad_matrix(modules[layer.module_name])).double()
        err = (got - expected[layer.name]).norm() / expected[layer.name].norm()
        assert err < 1e-4, f"{layer.name}: relative error {err:.1e}"


def test_changing_method_on_resume_rebuilds_the_decompositions() -> None:
    model = make_model()
    hp = {k: v for k, v in HP.items() if k != "method"}
    pre = KFACPreconditioner(model, method="eigen", **hp)
    train(model, pre, range(2))
    resumed = KFACPreconditioner(model, method="inverse", **hp)
    resumed.load_state_dict(pre.state_dict())
    assert set(resumed.layer_state("0").decomposition) == {"a_inv", "g_inv"}


def test_a_decomposition_that_fails_while_a_state_loads_counts_as_a_fault_at_the_next_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    hp = {k: v for k, v in HP.items() if k not in ("method", "inv_update_steps")}
    pre = KFACPreconditioner(model, method="eigen", inv_update_steps=10, **hp)
    train(model, pre, range(3))  # slots 0, 1 and 2 of 10: step 3 decomposes nothing

    def broken_cholesky(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise torch.linalg.LinAlgError("forced failure")

    resumed = KFACPreconditioner(model, method="inverse", inv_update_steps=10, **hp)
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "cholesky_ex", broken_cholesky)
        patch.setattr(torch.linalg, "inv", broken_cholesky)
        resumed.load_state_dict(pre.state_dict())
    assert resumed.layer_state("0").decomposition == {}
    train(model, resumed, range(3, 4))  # the layers stay plain, and count as faulty
    assert resumed.faults.faults_total == len(resumed.layers)


def _gather_on_two_ranks(rank: int, world: int) -> dict:
    model = make_model()
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, **HP)
    pre.register_ddp_comm_hook(ddp)
    train(model, pre, range(2 * rank, 2 * rank + 4), ddp)  # different batches per rank
    full = pre.gather_state_dict(dst=0)
    mine = {n: pre.factors(n) for n in ("0", "2", "4") if pre.factors(n) is not None}
    return {"full": full, "mine": mine}


def test_gather_collects_every_layer_from_its_owner_on_rank_zero_only(ranks) -> None:
    results = ranks(_gather_on_two_ranks, 2)
    full = results[0]["full"]
    assert results[1]["full"] is None
    assert sorted(full["layers"]) == ["0", "2", "4"]
    for res in results:
        for name, (A, G) in res["mine"].items():
            assert torch.equal(full["layers"][name]["A"], A) and torch.equal(full["layers"][name]["G"], G)


def _load_into_two_ranks(rank: int, world: int, state: dict) -> dict:
    model = make_model()
    pre = KFACPreconditioner(model, **HP)
    pre.load_state_dict(state)
    return {n: (pre.owner_of(n), pre.factors(n)) for n in ("0", "2", "4")}


def test_one_rank_state_reshards_onto_two_ranks_by_the_new_owner_map(ranks) -> None:
    model = make_model()
    pre = KFACPreconditioner(model, **HP)
    train(model, pre, range(3))
    state = pre.state_dict()
    for rank, held in enumerate(ranks(_load_into_two_ranks, 2, state)):
        for name, (owner, factors) in held.items():
            if owner == rank:
                assert torch.equal(factors[0], state["layers"][name]["A"])
                assert torch.equal(factors[1], state["layers"][name]["G"])
            else:
                assert factors is None


def make_dominant_model() -> nn.Sequential:
    """A Linear that ``max_factor_dim="auto"`` keeps whole on one rank and cuts in two on two ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(150, 8), nn.ReLU(), nn.Linear(8, 3))


def _load_auto_state(rank: int, world: int, state: dict) -> str:
    pre = KFACPreconditioner(make_dominant_model(), max_factor_dim="auto", **HP)
    try:
        pre.load_state_dict(state)
    except ValueError as error:
        return str(error)
    return "loaded"


def _auto_state_of_two_ranks(rank: int, world: int) -> dict | None:
    model = make_dominant_model()
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, max_factor_dim="auto", **HP)
    pre.register_ddp_comm_hook(ddp)
    F.cross_entropy(ddp(torch.randn(8, 150)), torch.randint(0, 3, (8,))).backward()
    pre.step()
    return pre.gather_state_dict(dst=0)


def test_an_auto_state_resumes_where_its_cut_contains_the_new_one(ranks) -> None:
    """One rank keeps the 150-input Linear whole, two cut it in two: whole -> halves resumes (the halves'
    factors are diagonal blocks of the whole ones), halves -> whole cannot."""
    model = make_dominant_model()
    pre = KFACPreconditioner(model, max_factor_dim="auto", **HP)
    F.cross_entropy(model(torch.randn(8, 150)), torch.randint(0, 3, (8,))).backward()
    pre.step()
    assert ranks(_load_auto_state, 2, pre.state_dict()) == ["loaded", "loaded"]
    message = _load_auto_state(0, 1, ranks(_auto_state_of_two_ranks, 2)[0])
    assert "missing layer '0'" in message
    assert "saved on 2 rank(s), this run has 1, and a block resumes only inside a saved layer or block" in message
