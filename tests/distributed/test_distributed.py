"""Two real gloo ranks: dpkfac preconditions each layer with its owner's local factors; dkfac equals
one-process K-FAC over the concatenated global batch. Models run in float64, so a wrong formula shows
as an O(1) error while the two orders of float64 arithmetic agree to better than 1e-6."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kfac_reference as ref
from conftest import identical_on_all_ranks
from lightning_dpkfac import KFACPreconditioner

HP = dict(damping=1e-2, factor_decay=0.8, lr=0.1, factor_update_steps=1, inv_update_steps=2)
STEPS = 4
LOCAL_BATCH = 5


def make_model() -> nn.Sequential:
    """Three covered layers of different cost, so that both ranks own at least one, and a LayerNorm
    whose parameters K-FAC does not cover."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 8), nn.LayerNorm(8), nn.ReLU(inplace=True), nn.Linear(8, 3),
    ).double()


def make_deep_model() -> nn.Sequential:
    """:func:`make_model` with a second convolution, whose input is an activation: its A is deferred to
    ``step()`` (``factors.DeferredFactor``)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.LayerNorm(8), nn.ReLU(inplace=True), nn.Linear(8, 3),
    ).double()


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: any rank can rebuild any other rank's batch."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(LOCAL_BATCH, 2, 5, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (LOCAL_BATCH,), generator=g)


def _train_and_check(
    rank: int, world: int, mode: str, method: str, kl_clip: float | None, engine_grad_comm: bool = True,
    make_model: Callable[[], nn.Module] = make_model, group: dist.ProcessGroup | None = None, overlap: bool = False,
) -> dict:
    """Train STEPS steps on ``world`` ranks (``rank``, ``world``: of ``group``, default all ranks), checking
    every layer's preconditioned gradient against the dense reference and the parameters against the other
    ranks'. ``engine_grad_comm``: the engine's DDP hook moves the gradients (dpkfac: reduce to owners), else
    DDP's own all-reduce does."""
    model = make_model()
    ddp = DistributedDataParallel(model, process_group=group)
    pre = KFACPreconditioner(model, mode=mode, method=method, kl_clip=kl_clip, process_group=group,
                             overlap_decompositions=overlap, **HP)
    if engine_grad_comm:
        pre.register_ddp_comm_hook(ddp)
    names = [layer.name for layer in pre.layers]
    modules = dict(model.named_modules())
    owner = {n: pre.owner_of(n) for n in names}
    # dpkfac: one reference stream per rank (its local batches); dkfac: one stream of global batches.
    streams = {r: ref.ReferenceKFAC(kl_clip=kl_clip, method=method, slots=pre.schedule(), lag=int(overlap), **HP)
               for r in range(world)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        batches = [local_batch(step, r) for r in range(world)]
        if mode == "dpkfac":
            for r, (x, y) in enumerate(batches):
                captured = ref.capture(make_model, model, names, x, y, F.cross_entropy)
                streams[r].update({n: ref.batch_factors(modules[n], *captured[n]) for n in names})
            frozen = {n: streams[owner[n]].frozen[n] for n in names}
        else:
            x_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            captured = ref.capture(make_model, model, names, x_all, y_all, F.cross_entropy)
            streams[0].update({n: ref.batch_factors(modules[n], *captured[n]) for n in names})
            frozen = streams[0].frozen
        grads = ref.mean_gradients(make_model, model, names, batches, F.cross_entropy)
        opt.zero_grad()
        F.cross_entropy(ddp(batches[rank][0]), batches[rank][1]).backward()
        expected, _ = ref.precondition_layers(frozen, grads, HP["damping"], method, kl_clip, HP["lr"])
        pre.step()
        for n in names:
            err = (ref.grad_matrix(modules[n]) - expected[n]).norm() / expected[n].norm()
            assert err < 1e-6, f"rank {rank}, step {step}, layer {n}: relative error {err:.2e}"
        opt.step()
        assert identical_on_all_ranks(model, group), f"parameters differ between ranks after step {step}"
    return {
        "owners": owner,
        "holds_state": {n: pre.holds_state(n) for n in names},
        "has_factors": {n: pre.factors(n) is not None for n in names},
        "captures": {n: pre.captures(n) for n in names},
        "bytes": pre.bytes_sent,
        "state_bytes": pre.state_bytes(),
        "shapes": {layer.name: (layer.d_a, layer.d_g) for layer in pre.layers},
        "uncovered_params": sum(p.numel() for p in model.parameters()) - sum(l.num_params for l in pre.layers),
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
    }


@pytest.mark.parametrize(
    ("method", "kl_clip", "engine_grad_comm"),
    [("eigen", 1e-3, True), ("inverse", None, True), ("eigen", 1e-7, True), ("eigen", 1e-3, False)],
)
def test_dpkfac_preconditions_each_layer_with_its_owners_local_factors(ranks, method, kl_clip, engine_grad_comm):
    results = ranks(_train_and_check, 2, "dpkfac", method, kl_clip, engine_grad_comm)
    assert results[0]["owners"] == results[1]["owners"]
    assert set(results[0]["owners"].values()) == {0, 1}, "both ranks should own a layer"


@pytest.mark.parametrize("mode", ["dpkfac", "dkfac"])
def test_a_deferred_convolution_factor_matches_the_reference(ranks, mode: str) -> None:
    results = ranks(_train_and_check, 2, mode, "inverse", 1e-3, True, make_deep_model)
    assert set(results[0]["owners"].values()) == {0, 1}


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_overlapped_decompositions_take_effect_one_step_later_on_two_ranks(ranks, method: str) -> None:
    """overlap_decompositions=True: each owner decomposes on its worker thread; the reference uses every
    decomposition after step 0 from the step after it (lag 1), the deferred convolution factor included."""
    results = ranks(_train_and_check, 2, "dpkfac", method, 1e-3, True, make_deep_model, None, True)
    assert set(results[0]["owners"].values()) == {0, 1}


def test_dpkfac_non_owner_holds_no_factor_and_captures_nothing(ranks) -> None:
    results = ranks(_train_and_check, 2, "dpkfac", "eigen", 1e-3)
    for rank, res in enumerate(results):
        for name, owner in res["owners"].items():
            mine = owner == rank
            assert res["holds_state"][name] == mine and res["has_factors"][name] == mine, (rank, name)
            assert res["captures"][name] == ({"factors"} if mine else set()), (rank, name)


def test_dpkfac_sends_no_factor_bytes(ranks) -> None:
    results = ranks(_train_and_check, 2, "dpkfac", "eigen", 1e-3)
    for res in results:
        assert res["bytes"].get("factors", 0.0) == 0.0
        assert res["bytes"]["preconditioned"] > 0


def test_dpkfac_moves_exactly_one_gradient_all_reduce_worth_of_bytes(ranks) -> None:
    """Reduce to owners ((P-1)/P N) + broadcast of results ((P-1)/P (N + 2 per layer)) + all-reduce of the
    uncovered parameters (2 (P-1)/P N_o): DDP-SGD's 2 (P-1)/P (N + N_o), plus two scalars per layer, and
    once the first step's row-gathering vote (2 float64 per Linear layer; these layers keep the gradient)."""
    res = ranks(_train_and_check, 2, "dpkfac", "eigen", 1e-3)[0]
    n_kfac = sum(d_a * d_g for d_a, d_g in res["shapes"].values())
    n_layers, n_other, e, f = len(res["shapes"]), res["uncovered_params"], 8, 1 / 2  # float64; (P-1)/P
    vote = 2 * f * 16 * 2  # two Linear layers
    assert res["bytes"]["gradients"] - vote == STEPS * (f * n_kfac + 2 * f * n_other) * e
    assert res["bytes"]["preconditioned"] == STEPS * f * (n_kfac + 2 * n_layers) * e
    ddp_sgd = STEPS * 2 * f * (n_kfac + n_other) * e
    total = res["bytes"]["gradients"] - vote + res["bytes"]["preconditioned"]
    assert total == ddp_sgd + STEPS * f * 2 * n_layers * e


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_dkfac_equals_one_process_kfac_on_the_global_batch(ranks, method: str) -> None:
    results = ranks(_train_and_check, 2, "dkfac", method, 1e-3)
    for res in results:
        assert all(res["has_factors"].values()), "dkfac keeps every factor on every rank"
        assert res["bytes"]["factors"] > 0


def test_dkfac_shares_decompositions_instead_of_preconditioned_gradients(ranks) -> None:
    """The paper's D-KFAC (KAISA COMM_OPT, MPD-KFAC): every rank holds every decomposition."""
    results = ranks(_train_and_check, 2, "dkfac", "eigen", 1e-3)
    assert results[0]["state_bytes"] == results[1]["state_bytes"]
    for res in results:
        assert res["bytes"]["inverses"] > 0
        assert res["bytes"].get("preconditioned", 0.0) == 0.0


def test_dpkfac_keeps_about_half_the_factor_state_of_dkfac_on_two_ranks(ranks) -> None:
    dp = ranks(_train_and_check, 2, "dpkfac", "eigen", None)
    dk = ranks(_train_and_check, 2, "dkfac", "eigen", None)
    dp_total = sum(r["state_bytes"]["factors"] for r in dp)
    dk_per_rank = dk[0]["state_bytes"]["factors"]
    assert dp_total == dk_per_rank  # the factors are split between owners, not copied


def _train_in_group_of_ranks_1_and_2(rank: int, world: int, mode: str) -> dict | None:
    """Global ranks 1 and 2 (group ranks 0 and 1) train in their own group; rank 0 stays out of it and
    waits in the spawner's final barrier on the default group, so an engine collective on the default
    group would fail or hang until the timeout."""
    members = [1, 2]
    group = dist.new_group(members)  # collective: every rank creates it
    if rank not in members:
        return None
    return _train_and_check(members.index(rank), len(members), mode, "eigen", 1e-3, group=group)


@pytest.mark.parametrize("mode", ["dpkfac", "dkfac"])
def test_a_process_group_of_two_of_three_ranks_trains_like_two_ranks_alone(ranks, mode: str) -> None:
    """In a group whose ranks are not the global ones (owner ranks and broadcast sources must be mapped),
    every step matches the dense reference over the group's batches (dkfac: one-process K-FAC on their
    concatenation), and the parameters equal a 2-rank run's bit for bit."""
    outside, *in_group = ranks(_train_in_group_of_ranks_1_and_2, 3, mode, timeout=60)
    alone = ranks(_train_and_check, 2, mode, "eigen", 1e-3)
    assert outside is None
    assert set(in_group[0]["owners"].values()) == {0, 1}, "both group ranks should own a layer"
    for grouped, default in zip(in_group, alone):
        assert grouped["owners"] == default["owners"]
        assert torch.equal(grouped["params"], default["params"])


class ScaleShift(nn.Module):
    """Bare trainable parameters: nothing K-FAC can precondition."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _nothing_to_precondition(rank: int, world: int, case: str) -> list[torch.Tensor]:
    """Trains a model K-FAC covers no layer of (``case``: "bare" parameters, a "frozen" backbone with a
    trainable scale/shift, or "skipped" layers), with the engine's DDP hook (``kfac``) or plain DDP."""
    results = []
    for kfac in (True, False):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(50, 3)).double()
        if case == "frozen":
            backbone.requires_grad_(False)
        model = nn.Sequential(ScaleShift()) if case == "bare" else nn.Sequential(backbone, ScaleShift())
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        if kfac:
            pre = KFACPreconditioner(model, skip_layers=["Linear"] if case == "skipped" else [], **HP)
            assert pre.layers == [] and "covers no layer" in pre.describe()
            pre.register_ddp_comm_hook(ddp)
        for step in range(3):
            opt.zero_grad()
            x, y = local_batch(step, rank)
            inputs = x.flatten(1)[:, :3] if case == "bare" else x
            F.cross_entropy(ddp(inputs), y).backward()
            if kfac:
                pre.step()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return results


@pytest.mark.parametrize("case", ["bare", "frozen", "skipped"])
def test_a_model_with_nothing_to_precondition_trains_exactly_like_ddp(ranks, case: str) -> None:
    for with_kfac, plain_ddp in ranks(_nothing_to_precondition, 2, case):
        assert torch.equal(with_kfac, plain_ddp)
