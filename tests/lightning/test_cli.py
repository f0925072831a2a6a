"""LightningCLI (jsonargparse) sets every K-FAC setting from the command line or a YAML file, DDP's own
``bucket_cap_mb`` goes to ``DistributedDataParallel``, and ``examples/cli.py`` trains on 2 ranks."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from conftest import ROOT, launch_env, run_command
from lightning_dpkfac import DPKFACStrategy, KFACConfig
from lightning_dpkfac.tools.data import DigitsDataModule

sys.path.insert(0, str(ROOT / "examples"))
from cli import DigitsCNN  # noqa: E402


@pytest.fixture(autouse=True)
def no_pytest_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI reads sys.argv too: leave it only ``args``."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def parsed_strategy(*args: str) -> DPKFACStrategy:
    cli = LightningCLI(DigitsCNN, DigitsDataModule, run=False,
                       args=["--seed_everything=0", "--trainer.accelerator=cpu", *args])
    assert isinstance(cli.trainer.strategy, DPKFACStrategy)
    return cli.trainer.strategy


def test_every_kfac_field_is_a_typed_keyword_of_the_strategy_with_its_default() -> None:
    params = inspect.signature(DPKFACStrategy.__init__).parameters
    for field in dataclasses.fields(KFACConfig):
        assert field.name in params and params[field.name].kind is inspect.Parameter.KEYWORD_ONLY
        default = KFACConfig().__getattribute__(field.name)
        assert params[field.name].default == (tuple(default) if isinstance(default, list) else default), field.name
        expected = "Sequence[str]" if field.name == "skip_layers" else field.type  # any sequence, stored as a list
        assert params[field.name].annotation == expected, field.name


def test_command_line_sets_kfac_and_ddp_keywords() -> None:
    strategy = parsed_strategy("--trainer.strategy=lightning_dpkfac.DPKFACStrategy", "--trainer.strategy.damping=0.01",
                               "--trainer.strategy.inv_update_steps=20", "--trainer.strategy.bucket_cap_mb=50")
    assert strategy.kfac_config.damping == 0.01 and strategy.kfac_config.inv_update_steps == 20
    assert strategy._ddp_kwargs["bucket_cap_mb"] == 50  # DistributedDataParallel's, not K-FAC's
    assert strategy.kfac_config.kfac_bucket_cap_mb == KFACConfig().kfac_bucket_cap_mb


@pytest.mark.parametrize("init_args", [{"damping": 0.01, "skip_layers": ["net.0"]},
                                       {"kfac_config": {"damping": 0.01, "skip_layers": ["net.0"]}}])
def test_yaml_class_path_with_init_args_or_a_kfac_config(tmp_path: Path, init_args: dict) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"strategy": {"class_path": "lightning_dpkfac.DPKFACStrategy",
                                                               "init_args": init_args}}}))
    strategy = parsed_strategy(f"--config={config}")
    assert strategy.kfac_config.damping == 0.01 and strategy.kfac_config.skip_layers == ["net.0"]


def test_a_kfac_config_and_kfac_keywords_together_are_refused() -> None:
    with pytest.raises(ValueError, match=r"got both kfac_config and the K-FAC keywords damping=0.3\. Give one"):
        DPKFACStrategy(kfac_config=KFACConfig(damping=0.01), damping=0.3)


def test_the_cli_example_trains_on_two_ranks(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "cli.py"), "fit", "--config", str(ROOT / "examples" / "cli_dpkfac.yaml"),
           "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={tmp_path}"]
    result = run_command(cmd, launch_env(), ROOT, 120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "K-FAC (dpkfac, inverse) on 4 layers, 2 rank(s)" in result.stdout
