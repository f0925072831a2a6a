"""Lightning's feature matrix with the dpkfac strategy: multi-node launch, precisions, gradient
accumulation, gradient clipping, manual optimization. Each runs ``tests/scripts/fit_digits.py``
(digits MLP) as subprocesses on real gloo ranks."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FIT_DIGITS, ROOT, STEPS_PER_EPOCH, WIDE_ROWS, fit_digits, launch_env, run_command
from lightning_dpkfac.tools.ranks import free_port


def command(out_dir: Path, name: str, *args: str, epochs: int = 1) -> list[str]:
    return [sys.executable, str(FIT_DIGITS), "--epochs", str(epochs), "--ckpt-dir", str(out_dir / name),
            "--out", str(out_dir / f"{name}.pt"), *args]


def fit_logged(out_dir: Path, name: str, *args: str) -> tuple[dict[str, Any], str]:
    """The run's results and its output (every rank's)."""
    result = run_command(command(out_dir, name, *args), launch_env(), ROOT, 120)
    assert result.returncode == 0, result.stdout[-3000:]
    return torch.load(out_dir / f"{name}.pt", weights_only=False), result.stdout


def fit(out_dir: Path, name: str, *args: str) -> dict[str, Any]:
    return fit_logged(out_dir, name, *args)[0]


def test_two_nodes_of_one_device_train_like_one_node_of_two(two_rank_run, tmp_path: Path) -> None:
    _, one_node = two_rank_run  # 3 epochs on one node of 2 devices
    port = str(free_port())
    with ThreadPoolExecutor(2) as pool:  # the two "nodes" must run at the same time
        results = list(pool.map(
            lambda node_rank: run_command(
                command(tmp_path, f"node{node_rank}", "--devices", "1", "--num-nodes", "2", epochs=3),
                {**launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node_rank)},
                ROOT, 120),
            (0, 1)))
    assert all(r.returncode == 0 for r in results), [r.stdout[-2000:] for r in results]
    two_nodes = torch.load(tmp_path / "node0.pt", weights_only=False)
    # Bitwise equality needs the same float summation order: one thread per rank in both layouts, whatever
    # the shell's OMP_NUM_THREADS (Lightning would give a node's only rank all the cores).
    assert one_node["threads"] == two_nodes["threads"] == [1, 1]
    assert two_nodes["owners"] == one_node["owners"]
    assert all(torch.equal(one_node["params"][k], two_nodes["params"][k]) for k in one_node["params"])


@pytest.mark.parametrize(
    ("precision", "devices", "factor_dtype"),
    [("bf16-mixed", 2, "torch.float32"), ("16-mixed", 1, "torch.float32"), ("64-true", 1, "torch.float64")],
)
def test_precision_trains_with_float32_or_float64_factors(tmp_path: Path, precision: str, devices: int,
                                                          factor_dtype: str) -> None:
    # On CPU Lightning runs "16-mixed" as bf16 autocast (no GradScaler); the scaler path is covered by
    # tests/core/test_precision.py and tests/gpu/test_gpu.py.
    result = fit(tmp_path, "run", "--devices", str(devices), "--precision", precision)
    assert result["factor_dtype"] == factor_dtype
    assert result["kfac_steps"] == result["steps"] == STEPS_PER_EPOCH[devices]
    assert all(torch.isfinite(v).all() for v in result["params"].values())


def test_full_precision_trains_with_float32_factors(two_rank_run) -> None:
    _, result = two_rank_run  # "32-true", 3 epochs on 2 devices
    assert result["factor_dtype"] == "torch.float32"
    assert result["kfac_steps"] == result["steps"] == 3 * STEPS_PER_EPOCH[2]


def test_every_cpu_rank_flushes_denormal_floats_under_the_kfac_strategy(two_rank_run) -> None:
    _, result = two_rank_run  # the library default flush_denormal=True
    assert result["denormals_flushed"] == [True, True]


def test_accumulated_batches_run_kfac_once_per_optimizer_step(tmp_path: Path) -> None:
    result = fit(tmp_path, "run", "--devices", "2", "--accumulate", "2")
    assert result["kfac_steps"] == result["steps"] == STEPS_PER_EPOCH[2] // 2


def test_gradient_clipping_applies_to_the_preconditioned_gradient(tmp_path: Path) -> None:
    """With plain SGD at lr 1 an update *is* the clipped gradient: its norm never exceeds the clip value,
    which it would if Lightning clipped before K-FAC rescaled the gradient."""
    result = fit(tmp_path, "run", "--devices", "2", "--clip", "1e-3", "--lr", "1", "--momentum", "0")
    assert 0 < result["max_update_norm"] <= 1e-3 * (1 + 1e-4)


def test_manual_optimization_runs_kfac_through_the_lightning_optimizer(tmp_path: Path) -> None:
    result = fit(tmp_path, "run", "--devices", "2", "--manual")
    assert result["kfac_steps"] == result["steps"] == STEPS_PER_EPOCH[2]


def test_row_gathering_trains_like_reducing_gradients_under_lightning(wide_rows_run, tmp_path: Path) -> None:
    """A wide hidden layer and 8 examples per rank: dpkfac gathers its rows (lightning_dpkfac.distributed.rows)."""
    _, rows = wide_rows_run
    grads = fit_digits(tmp_path, "grads", *WIDE_ROWS, "--gather-rows", "0")
    assert rows["row_layers"] == ["net.1"] and grads["row_layers"] == []
    for name, value in grads["params"].items():
        assert torch.allclose(rows["params"][name], value, rtol=1e-9, atol=1e-12), name



def test_blocks_of_one_layer_train_on_both_ranks_under_lightning(tmp_path: Path) -> None:
    """max_factor_dim=24 cuts the 64 -> 32 layer (A 65, G 32) into 3 x 2 blocks and the head into 2."""
    result = fit(tmp_path, "blocks", "--devices", "2", "--max-factor-dim", "24")
    first = {name: owner for name, owner in result["owners"].items() if name.startswith("net.1[")}
    assert len(first) == 6 and set(first.values()) == {0, 1}, result["owners"]
    losses = [result["losses"][step] for step in sorted(result["losses"])]
    assert result["kfac_steps"] == STEPS_PER_EPOCH[2] and sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_a_model_with_nothing_to_precondition_trains_exactly_like_ddp(tmp_path: Path) -> None:
    """A frozen backbone with trainable scale/shift vectors (adapter tuning): bare parameters only."""
    dpkfac, output = fit_logged(tmp_path, "dpkfac", "--devices", "2", "--model", "frozen")
    ddp = fit(tmp_path, "ddp", "--devices", "2", "--model", "frozen", "--strategy", "ddp")
    assert dpkfac["owners"] == {} and dpkfac["steps"] == STEPS_PER_EPOCH[2]
    assert all(torch.equal(dpkfac["params"][k], ddp["params"][k]) for k in ddp["params"])
    assert output.count("covers no layer of this model: it trains exactly like DDP") == 1


def test_a_non_finite_batch_on_one_rank_is_skipped_by_every_rank(tmp_path: Path) -> None:
    result, output = fit_logged(tmp_path, "run", "--devices", "2", "--inf-rank", "1", "--inf-at-step", "5")
    assert result["error"] is None and result["skipped_steps"] == 1 and result["steps"] == STEPS_PER_EPOCH[2]
    assert all(result["finite_params"].values())
    assert "K-FAC step 5: the averaged gradient is non-finite" in output


def test_non_finite_batches_in_a_row_stop_training_with_finite_weights_and_an_error_naming_the_data(
        tmp_path: Path) -> None:
    result = fit(tmp_path, "run", "--devices", "2", "--inf-rank", "1", "--inf-at-step", "5", "--inf-steps", "3",
                 "--max-consecutive-faults", "3")
    assert "non-finite (inf/NaN) on 3 consecutive steps (5 to 7)" in result["error"]
    assert "the data" in result["error"] and "weights are still finite" in result["error"]
    assert all(result["finite_params"].values()) and all(torch.isfinite(v).all() for v in result["params"].values())


def test_a_diverging_run_is_named_with_the_settings_that_help(tmp_path: Path) -> None:
    """No KL-clip, damping 1e-4 and lr 0.5: the loss explodes within a dozen steps."""
    _, output = fit_logged(tmp_path, "run", "--devices", "1", "--limit-batches", "12", "--lr", "0.5",
                           "--damping", "1e-4", "--no-kl-clip", "--max-consecutive-faults", "20")
    assert output.count("training is diverging") == 1
    assert "raise damping (now 0.0001), lower the learning rate" in output
