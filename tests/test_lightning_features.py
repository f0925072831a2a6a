"""Lightning's feature matrix with the dpkfac strategy: multi-node launch, precisions, gradient
accumulation, gradient clipping, manual optimization. Each runs ``tests/scripts/fit_digits.py``
(digits MLP) as subprocesses on real gloo ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import free_port, launch_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fit_digits.py"
STEPS_PER_EPOCH = {1: 40, 2: 20}  # 1257 train digits, batch 32 per rank


def start(out_dir: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--epochs", "1", "--ckpt-dir", str(out_dir / name),
           "--out", str(out_dir / f"{name}.pt"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env or launch_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


def fit(out_dir: Path, name: str, *args: str) -> dict[str, Any]:
    finish(start(out_dir, name, *args))
    return torch.load(out_dir / f"{name}.pt", weights_only=False)


def test_two_nodes_of_one_device_train_like_one_node_of_two(tmp_path: Path) -> None:
    one_node = fit(tmp_path, "one_node", "--devices", "2")
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        env = {**launch_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node_rank)}
        procs.append(start(tmp_path, f"node{node_rank}", "--devices", "1", "--num-nodes", "2", env=env))
    for proc in procs:
        finish(proc)
    two_nodes = torch.load(tmp_path / "node0.pt", weights_only=False)
    assert two_nodes["owners"] == one_node["owners"]
    assert all(torch.equal(one_node["params"][k], two_nodes["params"][k]) for k in one_node["params"])


@pytest.mark.parametrize(
    ("precision", "devices", "factor_dtype"),
    [("bf16-mixed", 2, "torch.float32"), ("16-mixed", 1, "torch.float32"), ("32-true", 1, "torch.float32"),
     ("64-true", 1, "torch.float64")],
)
def test_precision_trains_with_float32_or_float64_factors(tmp_path: Path, precision: str, devices: int,
                                                          factor_dtype: str) -> None:
    # On CPU Lightning runs "16-mixed" as bf16 autocast (no GradScaler); the scaler path is covered by
    # tests/test_precision.py and tests/test_gpu.py.
    result = fit(tmp_path, "run", "--devices", str(devices), "--precision", precision)
    assert result["factor_dtype"] == factor_dtype
    assert result["kfac_steps"] == result["steps"] == STEPS_PER_EPOCH[devices]
    assert all(torch.isfinite(v).all() for v in result["params"].values())


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
