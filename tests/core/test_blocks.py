"""``max_factor_dim``: a wide layer is split into a grid of blocks, each preconditioned with the diagonal
blocks of the layer's factors (``G_rr^-1 grad_rc A_cc^-1``) and owned on its own. Checked against a dense
reference that slices the explicit full factors, in float64, on one and two real ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kfac_reference as ref
from lightning_dpkfac import KFACConfig, KFACPreconditioner
from lightning_dpkfac.core.blocks import MIN_AUTO_PART, Block, block_grid, block_limits, split_range
from lightning_dpkfac.core.layers import make_layer
from lightning_dpkfac.distributed.assignment import LayerShape, assign_owners, layer_cost, load_imbalance
from lightning_dpkfac.tools.shape_tables import BUILTIN

HP = dict(damping=1e-2, factor_decay=0.8, lr=0.1, factor_update_steps=1, inv_update_steps=2, kl_clip=1e-3)
STEPS = 4


# ------------------------------------------------------------------ the grid
@pytest.mark.parametrize(("size", "max_size"), [(1, 2), (7, 2), (8, 4), (19, 4), (100, 33), (5, None)])
def test_split_range_cuts_the_fewest_near_equal_parts_of_at_most_max_size(size: int, max_size: int | None) -> None:
    parts = split_range(size, max_size)
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [end - start for start, end in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    limit = size if max_size is None else max_size
    assert max(sizes) <= limit and len(parts) == -(-size // limit)


def test_block_grid_is_one_block_when_both_factors_fit() -> None:
    assert block_grid(5, 8, 8, 8) == [Block(0, 5, 0, 8)]
    assert block_grid(5, 8, None, None) == [Block(0, 5, 0, 8)]


def test_block_grid_bounds_rows_and_columns_separately() -> None:
    assert block_grid(5, 8, None, 4) == [Block(0, 5, 0, 4), Block(0, 5, 4, 8)]


def test_a_wide_layer_becomes_named_blocks_with_the_bias_in_the_last_column() -> None:
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    pre = KFACPreconditioner(model, max_factor_dim=4)
    assert [layer.name for layer in pre.layers] == [
        "0[0:3,0:4]", "0[0:3,4:8]", "0[3:5,0:4]", "0[3:5,4:8]", "2[0:3,0:3]", "2[0:3,3:6]"
    ]
    assert [layer.has_bias for layer in pre.layers] == [False, True] * 3
    assert sum(layer.num_params for layer in pre.layers) == sum(p.numel() for p in model.parameters())


def test_a_non_contiguous_weight_that_needs_splitting_is_refused_naming_the_layer_and_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"Layer '0' would be split into 3 blocks .* None or at least 73"):
        KFACPreconditioner(model, max_factor_dim=32)
    KFACPreconditioner(model, max_factor_dim=73)  # one block: no view of the gradient needed


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 2, (2, 3), padding="same", dilation=2),
    nn.Conv1d(3, 2, 4, padding="same", padding_mode="circular"),
], ids=["conv2d_reflect_stride", "conv2d_same_dilated", "conv1d_same_circular"])
def test_a_conv_blocks_input_rows_are_its_columns_of_the_whole_im2col(conv: nn.Module) -> None:
    """Each block unfolds only the input channels that hold its columns (partial channels included)."""
    x = torch.randn(2, 3, 7) if isinstance(conv, nn.Conv1d) else torch.randn(2, 3, 6, 7)
    whole = make_layer("c", conv)
    rows = whole.input_rows(x)
    for block in whole.split(block_grid(whole.d_g, whole.d_a, 4, 4)):
        assert torch.equal(block.input_rows(x), rows[:, block.block.c0 : block.block.c0 + block.n_w]), block.name


@pytest.mark.parametrize("value", [1, 0, 2.5, True, "64", "Auto"])
def test_max_factor_dim_must_be_none_auto_or_an_integer_of_at_least_two(value: object) -> None:
    with pytest.raises(ValueError, match="max_factor_dim"):
        KFACConfig(max_factor_dim=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------ where "auto" cuts
#: The MLP 784-512-512-10 of the benchmark: its first layer costs 65% of the K-FAC work.
MLP = [LayerShape(785, 512), LayerShape(513, 512), LayerShape(513, 10)]


def test_a_fixed_max_factor_dim_bounds_both_sides_of_every_layer() -> None:
    assert block_limits(MLP, 256) == [(256, 256)] * 3
    assert block_limits(MLP, None, world_size=8) == [(None, None)] * 3


def test_auto_leaves_every_layer_whole_on_one_rank() -> None:
    assert block_limits(MLP, "auto", world_size=1) == [(512, 785), (512, 513), (10, 513)]


def test_auto_cuts_only_a_layer_above_the_fair_share_and_its_larger_side_first() -> None:
    # 785 columns -> 2 x 393 brings the first layer under half the total; G (512) stays whole
    assert block_limits(MLP, "auto", world_size=2) == [(512, 393), (512, 513), (10, 513)]


@pytest.mark.parametrize("world_size", [2, 8, 64, 1024])
@pytest.mark.parametrize("table", list(BUILTIN))
def test_every_auto_block_fits_the_fair_share_unless_its_sides_reach_the_floor(table: str, world_size: int) -> None:
    shapes = BUILTIN[table]().shapes
    fair = sum(layer_cost(s, 10) for s in shapes) / world_size
    for shape, (rows, cols) in zip(shapes, block_limits(shapes, "auto", world_size)):
        if layer_cost(shape, 10) <= fair:
            assert (rows, cols) == (shape.d_g, shape.d_a)
        else:
            floor = rows < 2 * MIN_AUTO_PART and cols < 2 * MIN_AUTO_PART
            assert layer_cost(LayerShape(cols, rows), 10) <= fair or floor, (shape, rows, cols)
            assert min(rows, cols) >= min(MIN_AUTO_PART, shape.d_g, shape.d_a)


def test_auto_balances_resnet50_on_64_ranks_with_few_blocks() -> None:
    shapes = BUILTIN["resnet50"]()
    whole, auto = shapes.shapes, shapes.split("auto", 64).shapes
    imbalance = {name: load_imbalance(costs, assign_owners(costs, 64), 64)
                 for name, costs in (("whole", [layer_cost(s, 10) for s in whole]),
                                     ("auto", [layer_cost(s, 10) for s in auto]))}
    assert imbalance["auto"] < 2.0 < 10 < imbalance["whole"]
    assert len(auto) < 1.5 * len(whole)


# ------------------------------------------------------------------ the math
def make_model() -> nn.Sequential:
    """A conv whose A (2 x 3 x 3 + 1 = 19) and a Linear whose A (4 x 5 x 5 + 1 = 101) and G (6) are split
    at max_factor_dim 4 or 40, and a narrow head; float64."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3),
    ).double()


def make_wide_model() -> nn.Sequential:
    """A Linear whose rows (3 per rank) are fewer numbers than each of its blocks: dpkfac gathers them."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)).double()


def make_bias_block_model() -> nn.Sequential:
    """At max_factor_dim 2 the first Linear's A (4 inputs + bias) is cut 2 + 2 + 1: a block of the bias alone."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()


def make_dominant_model() -> nn.Sequential:
    """A Linear (A 151, G 8) that costs nearly all the K-FAC work: ``max_factor_dim="auto"`` cuts its columns
    in two on 2 ranks and keeps the head whole."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(150, 8), nn.Tanh(), nn.Linear(8, 3)).double()


MODELS = {"conv": (make_model, (5, 2, 5, 5)), "wide": (make_wide_model, (3, 40)),
          "bias_block": (make_bias_block_model, (6, 4)), "dominant": (make_dominant_model, (6, 150))}


def local_batch(model_name: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    shape = MODELS[model_name][1]
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=g)


def block_factors(pre: KFACPreconditioner, full: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Each block's (A_cc, G_rr), sliced from its module's explicit full factors."""
    out = {}
    for layer in pre.layers:
        A, G = full[layer.module_name]
        b = layer.block
        out[layer.name] = (A[b.c0 : b.c1, b.c0 : b.c1], G[b.r0 : b.r1, b.r0 : b.r1])
    return out


def block_grads(pre: KFACPreconditioner, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Each block's slice of its module's [dW | db] as the model holds it now."""
    out = {}
    for layer in pre.layers:
        b = layer.block
        out[layer.name] = ref.grad_matrix(modules[layer.module_name])[b.r0 : b.r1, b.c0 : b.c1]
    return out


def _train_and_check(rank: int, world: int, model_name: str, mode: str, method: str,
                     max_factor_dim: int | str) -> dict:
    """STEPS steps on ``world`` ranks; every block's gradient must equal the dense block reference (dpkfac:
    from its owner's local factors; dkfac: from the global batch's) and parameters must agree across ranks."""
    make = MODELS[model_name][0]
    model = make()
    ddp = DistributedDataParallel(model) if world > 1 else None
    pre = KFACPreconditioner(model, mode=mode, method=method, max_factor_dim=max_factor_dim, **HP)
    if ddp is not None:
        pre.register_ddp_comm_hook(ddp)
    modules = dict(model.named_modules())
    module_names = sorted({layer.module_name for layer in pre.layers})
    streams = {r: ref.ReferenceKFAC(method=method, slots=pre.schedule(), **HP) for r in range(world)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        batches = [local_batch(model_name, step, r) for r in range(world)]
        if mode == "dpkfac":
            for r, (x, y) in enumerate(batches):
                captured = ref.capture(make, model, module_names, x, y, F.cross_entropy)
                full = {n: ref.batch_factors(modules[n], *captured[n]) for n in module_names}
                streams[r].update(block_factors(pre, full))
            frozen = {layer.name: streams[pre.owners[i]].frozen[layer.name] for i, layer in enumerate(pre.layers)}
        else:
            x_all, y_all = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            captured = ref.capture(make, model, module_names, x_all, y_all, F.cross_entropy)
            streams[0].update(block_factors(pre, {n: ref.batch_factors(modules[n], *captured[n]) for n in module_names}))
            frozen = streams[0].frozen
        reference_model = make()
        reference_model.load_state_dict(model.state_dict())
        (sum(F.cross_entropy(reference_model(x), y) for x, y in batches) / world).backward()
        grads = block_grads(pre, dict(reference_model.named_modules()))
        expected, _ = ref.precondition_layers(frozen, grads, HP["damping"], method, HP["kl_clip"], HP["lr"])
        opt.zero_grad()
        x, y = batches[rank]
        F.cross_entropy(ddp(x) if ddp is not None else model(x), y).backward()
        pre.step()
        got = block_grads(pre, modules)
        for name, value in expected.items():
            err = (got[name] - value).norm() / value.norm()
            assert err < 1e-6, f"rank {rank}, step {step}, block {name}: relative error {err:.2e}"
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "params": flat,
        "owners": {layer.name: owner for layer, owner in zip(pre.layers, pre.owners)},
        "modules": {layer.name: layer.module_name for layer in pre.layers},
        "row_layers": pre.row_layers,
        "bytes": pre.bytes_sent,
        "state": pre.state_bytes(),
        "block_params": sum(layer.num_params for layer in pre.layers),
        "all_params": sum(p.numel() for p in model.parameters()),
        "blocks": len(pre.layers),
    }


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_each_block_is_preconditioned_with_the_diagonal_blocks_of_its_factors(method: str) -> None:
    res = _train_and_check(0, 1, "conv", "dpkfac", method, 4)
    assert res["blocks"] == 5 + 2 * 26 + 2 and res["block_params"] == res["all_params"]


def test_auto_keeps_whole_layers_on_one_rank() -> None:
    assert _train_and_check(0, 1, "dominant", "dpkfac", "eigen", "auto")["blocks"] == 2


def test_auto_cuts_only_the_layer_no_owner_map_can_balance_and_matches_the_reference(ranks) -> None:
    results = ranks(_train_and_check, 2, "dominant", "dpkfac", "inverse", "auto")
    assert torch.equal(results[0]["params"], results[1]["params"])
    assert results[0]["owners"] == results[1]["owners"] == {"0[0:8,0:76]": 0, "0[0:8,76:151]": 1, "2": 1}


@pytest.mark.parametrize("mode", ["dpkfac", "dkfac"])
def test_blocks_of_one_layer_are_owned_by_different_ranks_and_match_the_reference(ranks, mode: str) -> None:
    results = ranks(_train_and_check, 2, "conv", mode, "eigen", 40)
    assert torch.equal(results[0]["params"], results[1]["params"])
    owners, modules = results[0]["owners"], results[0]["modules"]
    linear_owners = {owner for name, owner in owners.items() if modules[name] == "3"}
    assert linear_owners == {0, 1}, f"the Linear's blocks should be shared by both ranks: {owners}"


def test_dpkfac_with_blocks_moves_one_gradient_all_reduce_plus_two_scalars_per_block(ranks) -> None:
    res = ranks(_train_and_check, 2, "conv", "dpkfac", "eigen", 40)[0]
    n, blocks, e, f = res["all_params"], res["blocks"], 8, 1 / 2  # float64 parameters, (P - 1) / P
    vote = 2 * f * 16 * sum(1 for m in res["modules"].values() if m in ("3", "5"))  # first step, per Linear block
    total = res["bytes"]["gradients"] - vote + res["bytes"]["preconditioned"]
    assert total == STEPS * (2 * f * n + f * 2 * blocks) * e
    assert res["bytes"].get("factors", 0.0) == 0.0


def test_gathered_rows_of_blocks_match_the_reference(ranks) -> None:
    results = ranks(_train_and_check, 2, "wide", "dpkfac", "inverse", 16)
    assert results[0]["row_layers"] == [n for n, m in results[0]["modules"].items() if m == "0"]
    assert torch.equal(results[0]["params"], results[1]["params"])


@pytest.mark.parametrize("world", [1, 2])
def test_a_block_holding_only_the_bias_column_matches_the_reference(ranks, world: int) -> None:
    results = ranks(_train_and_check, world, "bias_block", "dpkfac", "inverse", 2)
    assert "0[0:2,4:5]" in results[0]["owners"]
    assert all(torch.equal(results[0]["params"], r["params"]) for r in results)


def test_blocks_share_one_wide_layers_state_between_ranks(ranks) -> None:
    whole = ranks(_train_and_check, 2, "conv", "dpkfac", "eigen", 1000)
    split = ranks(_train_and_check, 2, "conv", "dpkfac", "eigen", 40)
    largest = {name: max(sum(r["state"].values()) for r in res) for name, res in (("whole", whole), ("split", split))}
    assert largest["split"] < 0.5 * largest["whole"], largest
