"""End-to-end Lightning runs of ``examples/train.py`` (the Hydra app) on 2 CPU ranks (gloo), as subprocesses.

Lightning's default launcher re-runs the command line for rank 1, which under pytest would re-run the
whole session; running the example script as a subprocess avoids that. Each run costs ~7 s on 2 cores
(mostly imports and process-group start-up), so budgets are tiny (2 epochs = 20 steps) and runs with
the same Hydra overrides are shared between tests.

Accuracies measured at this budget (seed 0/1/2, lr 0.1, SGD, damping 1e-2, kl_clip 1e-3):
MLP ddp 0.84/0.85/0.85 vs dpkfac 0.92/0.94/0.94; CNN ddp 0.67/0.51/0.52 vs dpkfac 0.93/0.89/0.87.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT
from lightning_dpkfac import KFACConfig

SCRIPT = ROOT / "examples" / "train.py"
BUDGET = ("trainer.max_epochs=2", "seed=0", "optimizer=sgd", "optimizer.lr=0.1", "data.batch_size=64",
          "trainer.devices=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false")
RUN_TIMEOUT_S = 120
KFAC_METRICS = ("kfac/bytes_preconditioned", "kfac/bytes_gradients", "kfac/time_factor", "kfac/time_inverse",
                "kfac/time_precondition", "kfac/kl_scale", "kfac/kl_lr")

_RUNS: dict[tuple[str, ...], dict[str, Any]] = {}  # shared between tests: one run per set of arguments


def _run_example(args: tuple[str, ...], out_dir: Path, env: dict[str, str], run_script: Callable[..., Any]
                 ) -> dict[str, Any]:
    out = out_dir / "summary.json"
    cmd = [sys.executable, str(SCRIPT), *BUDGET, *args, f"hydra.run.dir={out_dir}"]
    result = run_script(cmd, env, ROOT, RUN_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(cmd)} exited with {result.returncode}:\n{result.stdout[-4000:]}"
    assert out.is_file(), f"rank 0 wrote no {out}:\n{result.stdout[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture
def train(clean_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, run_script: Callable[..., Any]
          ) -> Callable[..., dict[str, Any]]:
    """``train("strategy=ddp", ...)`` runs the example at the test budget and returns its JSON summary."""

    def run(*args: str) -> dict[str, Any]:
        if args not in _RUNS:
            _RUNS[args] = _run_example(args, tmp_path_factory.mktemp("run"), clean_env, run_script)
        return _RUNS[args]

    return run


@pytest.mark.timeout(300)
def test_dpkfac_beats_ddp_sgd_on_digits_mlp(train: Callable[..., dict[str, Any]]) -> None:
    ddp = train("strategy=ddp", "model=mlp")
    dpkfac = train("strategy=dpkfac", "model=mlp")
    assert dpkfac["world_size"] == ddp["world_size"] == 2
    assert dpkfac["test_acc"] > ddp["test_acc"] + 0.02, (dpkfac["test_acc"], ddp["test_acc"])


@pytest.mark.timeout(300)
def test_dpkfac_beats_ddp_sgd_on_digits_cnn(train: Callable[..., dict[str, Any]]) -> None:
    ddp = train("strategy=ddp", "model=cnn")
    dpkfac = train("strategy=dpkfac", "model=cnn")
    assert dpkfac["test_acc"] > ddp["test_acc"] + 0.02, (dpkfac["test_acc"], ddp["test_acc"])


@pytest.mark.timeout(200)
def test_dkfac_trains_on_digits(train: Callable[..., dict[str, Any]]) -> None:
    dkfac = train("strategy=dkfac", "model=mlp")
    assert dkfac["strategy"] == "dkfac" and dkfac["world_size"] == 2
    assert dkfac["test_acc"] >= 0.85, dkfac["test_acc"]


@pytest.mark.timeout(300)
def test_kfac_metrics_are_logged(train: Callable[..., dict[str, Any]]) -> None:
    for mode in ("dpkfac", "dkfac"):
        summary = train(f"strategy={mode}", "model=mlp")
        with open(summary["metrics_csv"], newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("kfac/bytes_factors")]
        assert rows, f"no row of {summary['metrics_csv']} has kfac metrics"
        for name in KFAC_METRICS:
            assert name in rows[0], f"{name} missing from {summary['metrics_csv']}: {sorted(rows[0])}"
            assert name in summary["kfac_mean_per_step"]
        means = summary["kfac_mean_per_step"]
        assert means["kfac/bytes_gradients"] > 0
        assert means["kfac/kl_lr"] == pytest.approx(0.1) and 0 < means["kfac/kl_scale"] <= 1
        factor_bytes = [float(row["kfac/bytes_factors"]) for row in rows]
        if mode == "dpkfac":
            assert all(b == 0 for b in factor_bytes), "dpkfac must never send factors"
            assert means["kfac/bytes_preconditioned"] > 0 and means["kfac/bytes_inverses"] == 0
        else:
            every = KFACConfig().factor_update_steps  # the example runs the defaults
            assert [b > 0 for b in factor_bytes] == [i % every == 0 for i in range(len(factor_bytes))], \
                "dkfac all-reduces factors on every factor update, and only then"
            assert means["kfac/bytes_inverses"] > 0 and means["kfac/bytes_preconditioned"] == 0
