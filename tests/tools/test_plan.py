"""The planner: the traffic and memory model of DDP-SGD, dkfac and dpkfac, and its match with the engine.

Per rank per step (P ranks, f = (P-1)/P, e bytes per element, N covered and N_o other parameters):
ddp 2f(N+N_o)e; dkfac adds 2f sum(d_a^2+d_g^2+1) e_F of factors on factor-update steps and
f sum(d_g d_a+2) e of preconditioned gradients; dpkfac sends fNe + 2fN_o e of gradients (reduced to the
owner) and the same preconditioned gradients, no factors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_dpkfac import KFACPreconditioner
from lightning_dpkfac.distributed.assignment import LayerShape, assign_owners, layer_cost
from lightning_dpkfac.distributed.comm import KINDS, Communicator
from lightning_dpkfac.distributed.router import counting_all_reduce_hook
from lightning_dpkfac.tools.plan import (
    bytes_per_step,
    main,
    owner_imbalance,
    owner_map,
    paper_comparison,
    predict_bytes,
    predict_state_bytes,
    row_layers,
    shapes_of,
)
from lightning_dpkfac.tools.shape_tables import ModelShapes, bert_base, resnet50

ONE_LAYER = ModelShapes("one layer", (("fc", LayerShape(d_a=3, d_g=2)),), other_params=4)


# ------------------------------------------------------------------ the formulas, by hand
def test_ddp_sends_one_gradient_all_reduce() -> None:
    # P=4: 2 * 3/4 * (6 + 4) params * 4 bytes
    assert predict_bytes(ONE_LAYER, 4, "ddp") == {"gradients": 60.0, "factors": 0.0, "inverses": 0.0,
                                                  "preconditioned": 0.0}


def test_dkfac_all_reduces_factors_and_broadcasts_decompositions() -> None:
    got = predict_bytes(ONE_LAYER, 4, "dkfac", method="eigen", factor_update_steps=1)
    assert got["gradients"] == 60.0
    assert got["factors"] == 2 * 0.75 * (9 + 4 + 1) * 4  # A 3x3, G 2x2, one count, float32
    assert got["inverses"] == 0.75 * (9 + 4 + 3 + 2 + 1) * 4  # Q_A, Q_G, eigenvalues, a flag
    assert got["preconditioned"] == 0.0  # every rank preconditions every layer itself
    inverse = predict_bytes(ONE_LAYER, 4, "dkfac", method="inverse", inv_update_steps=2, steps=3)["inverses"]
    assert inverse == 2 * 0.75 * (9 + 4 + 1) * 4  # two decomposition steps (0 and 2) of A^-1, G^-1, a flag


def test_dpkfac_reduces_covered_gradients_to_owners_and_sends_no_factors() -> None:
    got = predict_bytes(ONE_LAYER, 4, "dpkfac")
    assert got["gradients"] == 0.75 * 6 * 4 + 2 * 0.75 * 4 * 4
    assert got["factors"] == 0.0
    assert got["preconditioned"] == 0.75 * (6 + 2) * 4


@pytest.mark.parametrize("world_size", [2, 8, 64, 1024])
def test_dpkfac_moves_one_ddp_all_reduce_plus_two_scalars_per_layer(world_size: int) -> None:
    shapes = resnet50()
    f = (world_size - 1) / world_size
    dp = sum(bytes_per_step(shapes, world_size, "dpkfac").values())
    ddp = sum(bytes_per_step(shapes, world_size, "ddp").values())
    assert dp - ddp == pytest.approx(2 * f * len(shapes.layers) * 4)


def test_one_rank_sends_nothing() -> None:
    for mode in ("ddp", "dkfac", "dpkfac"):
        assert set(predict_bytes(resnet50(), 1, mode, steps=7).values()) == {0.0}


def test_dkfac_factor_traffic_comes_only_on_factor_update_steps() -> None:
    every_step = predict_bytes(ONE_LAYER, 2, "dkfac", factor_update_steps=1, steps=1)["factors"]
    assert predict_bytes(ONE_LAYER, 2, "dkfac", factor_update_steps=3, steps=10)["factors"] == 4 * every_step  # 0,3,6,9
    assert bytes_per_step(ONE_LAYER, 2, "dkfac", factor_update_steps=4)["factors"] == every_step / 4


def test_float64_models_keep_float64_factors() -> None:
    shapes = ModelShapes("f64", ONE_LAYER.layers, other_params=4, element_size=8)
    assert predict_bytes(shapes, 2, "dkfac")["factors"] == 2 * 0.5 * 14 * 8


# ------------------------------------------------------------------ memory and owners
def test_dpkfac_splits_the_factors_and_decompositions_that_dkfac_copies_to_every_rank() -> None:
    shapes, p = resnet50(), 8
    dk = predict_state_bytes(shapes, p, "dkfac")
    dp = predict_state_bytes(shapes, p, "dpkfac")
    assert all(r["factors"] == shapes.factor_elements * 4 for r in dk)
    assert sum(r["factors"] for r in dp) == shapes.factor_elements * 4
    assert all(r["decompositions"] == sum(r["decompositions"] for r in dp) for r in dk)
    assert all(r["capture"] == r["factors"] for r in dk + dp)  # capture buffers mirror the factors held


def test_eigen_keeps_eigenvectors_and_eigenvalue_products_inverse_keeps_two_inverses() -> None:
    (eigen,) = predict_state_bytes(ONE_LAYER, 1, "dpkfac", method="eigen")
    (inverse,) = predict_state_bytes(ONE_LAYER, 1, "dpkfac", method="inverse")
    assert eigen["decompositions"] == (9 + 4 + 6) * 4
    assert inverse["decompositions"] == (9 + 4) * 4


def test_owner_map_is_the_engines_cost_model() -> None:
    shapes = resnet50()
    costs = [layer_cost(s, 10) for s in shapes.shapes]
    assert owner_map(shapes, 64, inv_update_steps=10) == assign_owners(costs, 64)


# ------------------------------------------------------------------ shape tables and the paper
def test_resnet50_table_matches_the_design_notes() -> None:
    shapes = resnet50()
    assert len(shapes.layers) == 54
    assert shapes.covered_params + shapes.other_params == 25_557_032  # torchvision's ResNet-50
    assert shapes.covered_params == pytest.approx(25.5e6, rel=0.01)
    assert shapes.factor_elements == pytest.approx(153.9e6, rel=0.001)


def test_bert_base_table_has_bert_base_parameter_count() -> None:
    shapes = bert_base()
    assert len(shapes.layers) == 73
    assert shapes.covered_params + shapes.other_params == 109_482_240


def test_papers_communication_ratio_on_resnet50_at_64_gpus_is_reproduced() -> None:
    assert 2.79 <= paper_comparison(resnet50(), 64).comm_paper_model <= 3.15


# ------------------------------------------------------------------ the CLI
def test_cli_prints_owner_map_bytes_and_memory_for_1024_ranks(capsys) -> None:
    report = main(["bert-base", "-P", "1024", "--max-factor-dim", "none"])
    assert "Owner map" in report and "951 of 1024 ranks own nothing" in report
    assert "Predicted bytes sent per rank" in report and "Per-rank K-FAC memory" in report
    assert capsys.readouterr().out.strip() == report


def test_cli_takes_an_importable_model_factory() -> None:
    report = main(["lightning_dpkfac.tools.models:cnn", "-P", "2"])
    assert report.startswith("lightning_dpkfac.tools.models:cnn: 4 K-FAC layers")


def test_a_split_table_equals_the_engines_own_blocks() -> None:
    assert shapes_of(make_model()).split(40) == shapes_of(make_model(), max_factor_dim=40)
    assert shapes_of(make_model()).split(None) == shapes_of(make_model())
    for world_size in (1, 2):
        auto = shapes_of(make_dominant_model(), max_factor_dim="auto", world_size=world_size)
        assert shapes_of(make_dominant_model()).split("auto", world_size) == auto
        assert len(auto.layers) == world_size + 1  # the 150-input Linear is cut on 2 ranks only


def test_blocks_balance_resnet50_owners_and_memory_on_64_ranks() -> None:
    whole, split = resnet50(), resnet50().split(512)
    assert split.covered_params == whole.covered_params and len(split.layers) > len(whole.layers)
    assert owner_imbalance(split, 64) < 0.5 * owner_imbalance(whole, 64)
    largest = {name: max(sum(r.values()) for r in predict_state_bytes(shapes, 64, "dpkfac"))
               for name, shapes in (("whole", whole), ("split", split))}
    assert largest["split"] < 0.5 * largest["whole"]


def test_cli_splits_layers_into_blocks(capsys) -> None:
    report = main(["lightning_dpkfac.tools.models:cnn", "-P", "2", "--max-factor-dim", "256"])
    assert report.startswith("lightning_dpkfac.tools.models:cnn: 6 K-FAC layers")  # the 512 -> 64 Linear: 3 blocks
    assert all(f"6[0:64,{c0}:{c1}]" in report for c0, c1 in ((0, 171), (171, 342), (342, 513)))


def test_paper_report_shows_how_blocks_balance_the_64_rank_owner_map() -> None:
    report = main(["--paper"])
    assert "| ResNet-50 | whole layers | 54 | 11.35 | 10 |" in report
    assert "| ResNet-50 | 512 | 157 | 1.04 | 0 |" in report
    assert "| ResNet-50 | auto | 79 | 1.77 | 0 |" in report  # 25 more blocks instead of 103


def test_cli_splits_only_the_layers_above_the_fair_share_with_auto() -> None:
    report = main(["lightning_dpkfac.tools.models:cnn", "-P", "2", "--max-factor-dim", "auto"])
    assert report.startswith("lightning_dpkfac.tools.models:cnn: 5 K-FAC layers")  # the 512 -> 64 Linear: 2 blocks
    assert "6[0:64,0:257]" in report and "6[0:64,257:513]" in report


@pytest.mark.parametrize("value", ["0", "1", "-5", "Auto", "x"])
def test_cli_refuses_a_max_factor_dim_below_two_or_not_auto(value: str) -> None:
    with pytest.raises(SystemExit):
        main(["resnet50", "--max-factor-dim", value])


def test_cli_refuses_more_than_1024_ranks() -> None:
    with pytest.raises(SystemExit):
        main(["resnet50", "-P", "1025"])


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("resnet5", "is neither a built-in table (resnet50, bert-base, transformer) nor 'package.module:factory' "
                    "(e.g. lightning_dpkfac.tools.models:cnn)"),
        ("no_such_package.models:cnn", "no module named 'no_such_package' on the Python path"),
        ("lightning_dpkfac.tools.models:cnm", "module 'lightning_dpkfac.tools.models' has no attribute 'cnm'"),
    ],
    ids=["unknown-table", "unknown-module", "unknown-factory"],
)
def test_cli_refuses_an_unknown_model_with_a_usage_error(model: str, reason: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([model])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"error: argument model: '{model}'" in error and reason in error, error


# ------------------------------------------------------------------ the engine's counters, exactly
HP = dict(damping=1e-2, lr=0.1, factor_update_steps=2, inv_update_steps=4, kl_clip=1e-3)
STEPS = 5


def make_model() -> nn.Sequential:
    """Three K-FAC layers (one without bias) and a LayerNorm, whose parameters are N_o."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 8),
                         nn.LayerNorm(8), nn.Linear(8, 3, bias=False))


def make_wide_model() -> nn.Sequential:
    """A wide Linear whose rows (3 per rank) are fewer numbers than its gradient, so dpkfac gathers them,
    and a narrow one whose rows are not."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 30), nn.LayerNorm(30), nn.Linear(30, 3))


def make_dominant_model() -> nn.Sequential:
    """A Linear that costs more than half the K-FAC work, so ``max_factor_dim="auto"`` cuts it on 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(150, 8), nn.ReLU(), nn.Linear(8, 3))


class SelfAttentionBlock(nn.Module):
    """``nn.MultiheadAttention`` on one (B, T, 8) input: K-FAC layers ``in_proj`` (8 -> 24) and ``out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def make_attention_model() -> nn.Sequential:
    """Self-attention between two Linears on (B, 4, 5) inputs: every K-FAC layer sees 4 rows per example."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), SelfAttentionBlock(), nn.Flatten(), nn.Linear(32, 3))


def make_embedding_model() -> nn.Sequential:
    """An embedding (A diagonal: 20 numbers) on (B, 4) token ids, then a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(24, 3))


#: name -> (model factory, shape of one rank's batch, max_factor_dim)
MODELS = {
    "conv": (make_model, (6, 2, 5, 5), None),
    "wide": (make_wide_model, (3, 40), None),
    "conv_blocks": (make_model, (6, 2, 5, 5), 40),  # the Linear's A (101) in three blocks
    "wide_blocks": (make_wide_model, (3, 40), 16),  # six blocks, each gathering its rows
    "dominant_auto": (make_dominant_model, (6, 150), "auto"),  # the first Linear in two blocks on 2 ranks
    "attention": (make_attention_model, (3, 4, 5), None),
    "embedding": (make_embedding_model, (3, 4), None),
}


def _batch(model_name: str, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """One rank's inputs: token ids for the embedding model, else Gaussian features."""
    if model_name == "embedding":
        return torch.randint(0, 20, shape, generator=generator)
    return torch.randn(*shape, generator=generator)


def _measure(rank: int, world: int, mode: str, model_name: str) -> dict:
    make, batch_shape, max_factor_dim = MODELS[model_name]
    model = make()
    ddp = DistributedDataParallel(model)
    if mode == "ddp":
        comm = Communicator()
        ddp.register_comm_hook(comm, counting_all_reduce_hook)
        pre = None
    else:
        pre = KFACPreconditioner(model, mode=mode, max_factor_dim=max_factor_dim, **HP)
        pre.register_ddp_comm_hook(ddp)
    capture = None
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = _batch(model_name, batch_shape, g), torch.randint(0, 3, (batch_shape[0],), generator=g)
        model.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        if pre is not None:
            before = pre.state_bytes()["factors"]
            pre.step()
            if step == 2:  # a factor-update step with running factors already held
                capture = before - pre.state_bytes()["factors"]
    return {
        "bytes": dict(comm.bytes_sent) if pre is None else pre.bytes_sent,
        "state": None if pre is None else {**pre.state_bytes(), "capture": capture},
        "owners": None if pre is None else pre.owners,
        "row_layers": [] if pre is None else pre.row_layers,
    }


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mode", ["ddp", "dkfac", "dpkfac"])
def test_engine_counters_equal_the_prediction_exactly(ranks, world_size: int, mode: str, model_name: str) -> None:
    make, batch_shape, max_factor_dim = MODELS[model_name]
    shapes = shapes_of(make(), example_input=_batch(model_name, batch_shape), max_factor_dim=max_factor_dim,
                       world_size=world_size, inv_update_steps=HP["inv_update_steps"])
    if model_name == "attention":
        assert [name for name, _ in shapes.layers] == ["0", "1.attn.in_proj", "1.attn.out_proj", "3"]
    predicted = predict_bytes(shapes, world_size, mode, factor_update_steps=HP["factor_update_steps"], steps=STEPS,
                              inv_update_steps=HP["inv_update_steps"],
                              batch_size=batch_shape[0])
    for rank, measured in enumerate(ranks(_measure, world_size, mode, model_name)):
        assert {k: measured["bytes"].get(k, 0.0) for k in KINDS} == predicted, f"rank {rank}"
        if mode != "ddp":
            assert measured["owners"] == owner_map(shapes, world_size, HP["inv_update_steps"])
            state = predict_state_bytes(shapes, world_size, mode, inv_update_steps=HP["inv_update_steps"],
                                        batch_size=batch_shape[0])
            assert measured["state"] == state[rank], f"rank {rank}"
        assert measured["row_layers"] == row_layers(shapes, world_size, mode, batch_size=batch_shape[0])
        if mode == "dpkfac" and model_name.startswith("wide"):  # 3 examples of 40 features: the first layer gathers
            first_layer = [name for name, _ in shapes.layers if name == "0" or name.startswith("0[")]
            assert first_layer and measured["row_layers"] == first_layer


def test_shapes_count_token_rows_from_an_example_batch() -> None:
    """A Linear on (B, T, d) inputs has T rows per example; on (B, d) inputs one; convolutions none."""
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.Flatten(1, 1), nn.Linear(5, 6), nn.Flatten(), nn.Linear(24, 2))
    shapes = shapes_of(model, example_input=torch.randn(2, 3, 5)).shapes
    assert [s.rows_per_example for s in shapes] == [0, 4, 1]


def test_cli_predicts_row_gathering_from_a_batch_size(capsys) -> None:
    """The digits MLP's 64 -> 128 layer on 8 examples per rank: its rows are smaller than its gradient."""
    main(["lightning_dpkfac.tools.models:mlp", "-P", "2", "--input-shape", "64"])
    without = capsys.readouterr().out
    main(["lightning_dpkfac.tools.models:mlp", "-P", "2", "--input-shape", "64", "--batch-size", "8"])
    with_rows = capsys.readouterr().out
    gradients = [line for line in (without, with_rows) for line in line.splitlines() if line.strip().startswith("gradients")]
    assert len(gradients) == 2 and gradients[0] != gradients[1]

