"""Row gathering (``lightning_dpkfac.distributed.rows``): for a wide Linear layer and a small batch the owner gathers
every rank's rows ``a``, ``g`` instead of the reduced gradient and preconditions ``g^T a`` in factored form.
It must change nothing but the traffic: every run below is compared with the same run with
``gather_rows=False`` (whose gradient path ``test_distributed`` checks against the dense reference), in
float64 on two real gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import identical_on_all_ranks
from lightning_dpkfac import KFACPreconditioner
from lightning_dpkfac.distributed.rows import rows_pay_off

HP = dict(damping=1e-2, factor_decay=0.8, lr=0.1, factor_update_steps=1, inv_update_steps=2, kl_clip=1e-3)
STEPS = 4
BATCH = 3


class Wide(nn.Module):
    """Two wide Linear layers (3 rows per rank: their rows are far smaller than their gradients) and a
    narrow head (rows larger than its gradient), optionally calling ``fc1`` twice or using its weight a
    second time outside its forward (tied)."""

    def __init__(self, variant: str = "plain") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 30, bias=False)
        self.head = nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        if self.variant == "shared":
            h = torch.tanh(self.fc1(h))
        if self.variant == "tied":
            h = h + 0.5 * F.linear(x, self.fc1.weight)  # fc1.weight gets gradient the hooks never see
        return self.head(torch.tanh(self.fc2(h)))


def batch(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(BATCH, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _train(rank: int, world: int, variant: str, gather_rows: bool, method: str, micro_batches: int = 1,
           break_owner_of: str | None = None) -> dict:
    """Train STEPS steps; ``break_owner_of``: the owner of that layer can never decompose (eigh fails)."""
    model = Wide(variant).double()
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, method=method, gather_rows=gather_rows, max_consecutive_faults=STEPS + 1, **HP)
    pre.register_ddp_comm_hook(ddp)
    if break_owner_of is not None and pre.owner_of(break_owner_of) == rank:
        torch.linalg.eigh = lambda m: (_ for _ in ()).throw(torch.linalg.LinAlgError("forced"))  # forked rank
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(micro_batches):
            x, y = batch(step, rank, micro)
            context = ddp.no_sync() if micro < micro_batches - 1 else torch.enable_grad()
            with context:
                (F.cross_entropy(ddp(x), y) / micro_batches).backward()
        pre.step()
        opt.step()
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "ranks_identical": identical_on_all_ranks(model),
        "row_layers": pre.row_layers,
        "bytes": pre.bytes_sent,
        "captures": {layer.name: pre.captures(layer.name) for layer in pre.layers},
        "owners": {layer.name: pre.owner_of(layer.name) for layer in pre.layers},
    }


def _compare(ranks, variant: str, method: str = "inverse", micro_batches: int = 1,
             break_owner_of: str | None = None, world: int = 2) -> dict:
    rows = ranks(_train, world, variant, True, method, micro_batches, break_owner_of)
    grads = ranks(_train, world, variant, False, method, micro_batches, break_owner_of)
    for res in rows + grads:
        assert res["ranks_identical"], "parameters differ between ranks"
    err = (rows[0]["params"] - grads[0]["params"]).norm() / grads[0]["params"].norm()
    assert err < 1e-10, f"row gathering changed the parameters: relative difference {err:.2e}"
    assert grads[0]["row_layers"] == []
    return rows[0]


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_gathering_rows_gives_the_same_training_as_reducing_gradients(ranks, method: str) -> None:
    res = _compare(ranks, "plain", method)
    assert res["row_layers"] == ["fc1", "fc2"], "the narrow head's rows are bigger than its gradient"


def test_three_ranks_each_owning_a_layer_train_alike(ranks) -> None:
    """Rows gathered to two different owners; the three owners broadcast in order of their load."""
    res = _compare(ranks, "plain", world=3)
    assert sorted(res["owners"].values()) == [0, 1, 2]
    assert res["row_layers"] == ["fc1", "fc2"]


def test_one_rank_preconditions_wide_layers_from_their_rows_alike(ranks) -> None:
    """No bytes to save on one rank, but fewer flops: (G^-1 g^T)(a A^-1) instead of G^-1 (g^T a) A^-1."""
    res = _compare(ranks, "plain", world=1)
    assert res["row_layers"] == ["fc1", "fc2"]
    assert sum(res["bytes"].values()) == 0


def test_gathering_rows_sends_fewer_gradient_bytes(ranks) -> None:
    rows, grads = ranks(_train, 2, "plain", True, "inverse"), ranks(_train, 2, "plain", False, "inverse")
    assert rows[0]["bytes"]["gradients"] < grads[0]["bytes"]["gradients"]
    assert rows[0]["bytes"]["preconditioned"] == grads[0]["bytes"]["preconditioned"]


def test_non_owners_capture_only_the_rows_of_gathered_layers(ranks) -> None:
    """An owner captures its layer's factors; every rank captures the rows of the gathered layers (fc1,
    fc2), and nothing else once the first step has decided."""
    for rank, res in enumerate(ranks(_train, 2, "plain", True, "inverse")):
        for name, owner in res["owners"].items():
            expected = {kind for kind, yes in (("factors", owner == rank), ("rows", name in res["row_layers"])) if yes}
            assert res["captures"][name] == expected, (rank, name)


def test_a_layer_called_twice_gathers_the_rows_of_both_calls(ranks) -> None:
    assert "fc1" in _compare(ranks, "shared")["row_layers"]


def test_accumulated_micro_batches_gather_the_rows_of_all_of_them(ranks) -> None:
    assert _compare(ranks, "plain", micro_batches=2)["row_layers"] == ["fc1", "fc2"]


def test_a_weight_with_gradient_from_outside_its_forward_keeps_the_gradient_path(ranks) -> None:
    """A tied use of fc1.weight adds gradient that is not g^T a: the first step's check catches it."""
    assert _compare(ranks, "tied")["row_layers"] == ["fc2"]


def test_a_gathered_layer_left_plain_gets_every_ranks_averaged_gradient(ranks) -> None:
    """No decomposition on fc1's owner: its payload carries no gradient, so every rank averages its own."""
    assert "fc1" in _compare(ranks, "plain", "eigen", break_owner_of="fc1")["row_layers"]


def test_rows_pay_off_only_when_all_ranks_rows_are_smaller_than_the_gradient() -> None:
    assert rows_pay_off(world_size=2, rows_per_rank=64, d_a=785, d_g=512)  # 2*64*1297 < 401,920
    assert not rows_pay_off(world_size=2, rows_per_rank=64, d_a=513, d_g=10)  # 66,944 > 5,130
    assert not rows_pay_off(world_size=2, rows_per_rank=0, d_a=785, d_g=512)  # layer never called


class Tokens(nn.Module):
    """A Linear on 60 tokens per example (its rows can never pay off) and a wide one on pooled features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens, self.wide = nn.Linear(8, 8), nn.Linear(8, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(self.tokens(x).mean(1))


def _first_backward_on_tokens(rank: int, world: int) -> dict:
    model = Tokens()
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, **HP)
    pre.register_ddp_comm_hook(ddp)
    ddp(torch.randn(BATCH, 60, 8)).square().mean().backward()
    # Rows held before the step: the engine has no public view of them (captures() says what a rank
    # captures, not what a first-step candidate still keeps), so this reads the row gatherer's captures.
    kept = {pre.layers[i].name: c.holds_rows for i, c in pre._rows.captures.items()}
    pre.step()
    return {"kept": kept, "row_layers": pre.row_layers}


def test_a_layer_whose_rows_cannot_pay_off_keeps_none_during_the_first_step(ranks) -> None:
    """Token rows (3 x 60 per rank) pile up otherwise: a BERT layer's would be hundreds of MB."""
    for res in ranks(_first_backward_on_tokens, 2):
        assert res["kept"] == {"tokens": False, "wide": True}
        assert res["row_layers"] == ["wide"]


def _autocast_bf16(rank: int, world: int) -> dict:
    model = Wide()
    ddp = DistributedDataParallel(model)
    pre = KFACPreconditioner(model, **HP)
    pre.register_ddp_comm_hook(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = batch(step, rank)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ddp(x.float()), y)
        loss.backward()
        pre.step()
        opt.step()
    return {"row_layers": pre.row_layers, "same": identical_on_all_ranks(model),
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


def test_bf16_autocast_gradients_pass_the_check_and_gather_rows(ranks) -> None:
    """Under autocast the weight gradient is computed in bfloat16: within the check's 5% of g^T a."""
    for res in ranks(_autocast_bf16, 2):
        assert res == {"row_layers": ["fc1", "fc2"], "same": True, "finite": True}

