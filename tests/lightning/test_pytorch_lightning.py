"""Code written against the separate ``pytorch_lightning`` package gets the same strategy: by name after
``import lightning_dpkfac``, or as ``lightning_dpkfac.pytorch_lightning.DPKFACStrategy``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning
import torch

from conftest import ROOT, SCRIPTS, launch_env, run_command



def test_a_strategy_instance_is_accepted_by_the_pytorch_lightning_trainer() -> None:
    from lightning_dpkfac.pytorch_lightning import DPKFACStrategy

    trainer = pytorch_lightning.Trainer(strategy=DPKFACStrategy(damping=1e-2, mode="dkfac"), accelerator="cpu",
                                        devices=2, logger=False)
    assert trainer.strategy.kfac_config.damping == 1e-2 and trainer.strategy.kfac_config.mode == "dkfac"


def test_dkfac_is_registered_by_name_too() -> None:
    import lightning_dpkfac.pytorch_lightning  # noqa: F401

    trainer = pytorch_lightning.Trainer(strategy="dkfac", accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy.kfac_config.mode == "dkfac"


def test_pytorch_lightning_trains_by_name_exactly_like_lightning(tmp_path: Path) -> None:
    results = {}
    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        out = tmp_path / f"{namespace}.pt"
        cmd = [sys.executable, str(SCRIPTS / "fit_namespace.py"), "--namespace", namespace,
               "--out", str(out)]
        result = run_command(cmd, launch_env(), ROOT, 120)
        assert result.returncode == 0, result.stdout[-3000:]
        results[namespace] = torch.load(out, weights_only=False)
    ours, theirs = results["pytorch_lightning"], results["lightning.pytorch"]
    assert ours["strategy"] == "lightning_dpkfac.pytorch_lightning.DPKFACStrategy"
    assert theirs["strategy"] == "lightning_dpkfac.lightning.strategy.DPKFACStrategy"
    assert ours["kfac_steps"] == theirs["kfac_steps"] == 8
    assert all(torch.equal(ours["params"][k], theirs["params"][k]) for k in theirs["params"])
