"""The Hydra configuration (``conf/``) and the Hydra app ``examples/train.py``.

Composition and instantiation run in this process through Hydra's compose API (nothing is trained).
Runs that train launch 2 ranks, so they are subprocesses of the real command line, kept tiny.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from conftest import ROOT
import lightning_dpkfac
from lightning_dpkfac.hydra.schemas import DDP_KEYWORDS, DPKFACStrategySchema
from lightning_dpkfac.tools.models import ClassifierModule, LanguageModelModule

CONF = ROOT / "conf"
TRAIN = ROOT / "examples" / "train.py"
COMPARE = ROOT / "examples" / "compare_runs.py"
GROUPS = ("data", "model", "optimizer", "strategy", "trainer", "logger", "experiment", "hparams_search")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
TINY = ("trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_app() -> ModuleType:
    """``examples/train.py`` as a module (its ``build`` instantiates a composed config)."""
    return _load(TRAIN)


@pytest.fixture
def compose_config(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``compose_config(*overrides)``: ``conf/config.yaml`` composed with ``overrides``, output in tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def _on_this_machine(group: str, option: str) -> tuple[str, ...]:
    """Overrides that let ``group=option`` build here: GPU trainers fall back to CPU without a GPU."""
    if group == "trainer" and option in ("gpu", "multinode") and not torch.cuda.is_available():
        return ("trainer.accelerator=cpu",)
    return ()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_and_builds_its_objects(
    group: str, option: str, compose_config: Callable[..., DictConfig], train_app: ModuleType
) -> None:
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install '.[optuna]'")
    cfg = compose_config(f"{group}={option}", *_on_this_machine(group, option))
    trainer, module, data, _ = train_app.build(cfg)
    expected = LanguageModelModule if option == "charlm_transformer" else ClassifierModule
    assert type(module) is expected and isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(module.configure_optimizers(), torch.optim.Optimizer)
    assert data is not None


@pytest.mark.parametrize("experiment", [None] + [o for g, o in OPTIONS if g == "experiment"])
def test_every_experiment_model_reads_its_data(
    experiment: str | None, compose_config: Callable[..., DictConfig], train_app: ModuleType
) -> None:
    cfg = compose_config(*([f"experiment={experiment}"] if experiment else []))
    _, module, data, _ = train_app.build(cfg)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    # A class per example, or (language models) a character per position.
    assert module(x).shape == (*y.shape, getattr(data, "vocab_size", 10))


def test_the_charlm_experiment_resolves_to_a_language_model_of_its_data(
    compose_config: Callable[..., DictConfig]
) -> None:
    cfg = compose_config("experiment=charlm_transformer", "data.seq_len=32")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["_target_"] == "lightning_dpkfac.tools.data.CharLMDataModule"
    assert resolved["model"]["_target_"] == "lightning_dpkfac.tools.models.char_transformer"
    assert resolved["model"]["seq_len"] == resolved["data"]["seq_len"] == 32
    assert instantiate(cfg.data).vocab_size == resolved["model"]["vocab_size"]
    assert resolved["module"]["_target_"] == "lightning_dpkfac.tools.models.LanguageModelModule"
    assert resolved["optimized_metric"] == "val_loss"
    assert resolved["optimizer"]["_target_"] == "torch.optim.AdamW" and resolved["optimizer"]["lr"] == 3e-3


def test_strategy_options_build_dpkfac_dkfac_and_plain_ddp(
    compose_config: Callable[..., DictConfig], train_app: ModuleType
) -> None:
    dpkfac = instantiate(compose_config("strategy=dpkfac").strategy)
    dkfac = instantiate(compose_config("strategy=dkfac").strategy)
    ddp = instantiate(compose_config("strategy=ddp").strategy)
    assert isinstance(dpkfac, lightning_dpkfac.DPKFACStrategy) and dpkfac.kfac_config.mode == "dpkfac"
    assert isinstance(dkfac, lightning_dpkfac.DPKFACStrategy) and dkfac.kfac_config.mode == "dkfac"
    assert dkfac.kfac_config.damping == dpkfac.kfac_config.damping
    assert type(ddp) is DDPStrategy
    assert [train_app.strategy_name(s) for s in (dpkfac, dkfac, ddp)] == ["dpkfac", "dkfac", "ddp"]


def test_the_dpkfac_schema_is_kfac_config_plus_ddp_keywords() -> None:
    schema = OmegaConf.to_container(OmegaConf.structured(DPKFACStrategySchema))
    assert schema == {
        "_target_": "lightning_dpkfac.DPKFACStrategy",
        **dataclasses.asdict(lightning_dpkfac.KFACConfig()),
        **{name: default for name, _, default in DDP_KEYWORDS},
    }


def test_a_kfac_override_reaches_the_strategy(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config("strategy.damping=3e-3", "strategy.inv_update_steps=50", "strategy.skip_layers=[net.0]",
                         "strategy.max_factor_dim=256")
    config = instantiate(cfg.strategy).kfac_config
    assert (config.damping, config.inv_update_steps, config.skip_layers) == (3e-3, 50, ["net.0"])
    assert config.max_factor_dim == 256
    assert instantiate(compose_config("strategy.max_factor_dim=null").strategy).kfac_config.max_factor_dim is None
    assert instantiate(compose_config("strategy.max_factor_dim=auto").strategy).kfac_config.max_factor_dim == "auto"


def test_ddps_bucket_cap_reaches_ddp_and_kfacs_its_own_collectives(compose_config: Callable[..., DictConfig]) -> None:
    strategy = instantiate(compose_config("strategy.bucket_cap_mb=50", "strategy.kfac_bucket_cap_mb=8").strategy)
    assert strategy._ddp_kwargs["bucket_cap_mb"] == 50 and strategy.kfac_config.kfac_bucket_cap_mb == 8


def test_a_typo_in_a_kfac_key_fails_with_hydras_error_naming_the_key(
    compose_config: Callable[..., DictConfig]
) -> None:
    with pytest.raises(ConfigCompositionException, match="strategy.dampng") as error:
        compose_config("strategy.dampng=1e-3")
    assert "Key 'dampng' not in" in str(error.value.__cause__)


def test_a_kfac_value_of_the_wrong_type_fails_with_hydras_error_naming_the_key(
    compose_config: Callable[..., DictConfig]
) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("strategy.damping=abc")
    assert "strategy.damping" in str(error.value.__cause__) and "'abc'" in str(error.value.__cause__)


def test_an_appended_unknown_key_fails_when_the_strategy_is_built(
    compose_config: Callable[..., DictConfig], train_app: ModuleType
) -> None:
    cfg = compose_config("+strategy.dampng=1e-3")  # '+' opens the schema; the strategy still refuses it
    with pytest.raises(InstantiationException, match="'dampng' is not a parameter of DPKFACStrategy. Did you mean"):
        train_app.build(cfg)


def test_an_out_of_range_kfac_value_fails_when_the_strategy_is_built(
    compose_config: Callable[..., DictConfig], train_app: ModuleType
) -> None:
    with pytest.raises(InstantiationException, match="damping=-1.0 is invalid"):
        train_app.build(compose_config("strategy.damping=-1"))


@pytest.mark.timeout(120)
def test_the_app_stops_at_start_up_on_a_typo(
    clean_env: dict[str, str], tmp_path: Path, run_script: Callable[..., Any]
) -> None:
    result = run_script([sys.executable, str(TRAIN), "strategy.dampng=1e-3", f"hydra.run.dir={tmp_path}"],
                        clean_env, ROOT, 90)
    assert result.returncode != 0
    assert "Key 'dampng' not in 'DPKFACStrategySchema'" in result.stdout, result.stdout[-4000:]
    assert "Initializing distributed" not in result.stdout


_MULTIRUN: dict[str, Any] = {}  # one multirun shared by the tests below


@pytest.fixture
def multirun(
    clean_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, run_script: Callable[..., Any]
) -> dict[str, Any]:
    """A 2-job multirun of 2-rank jobs (4 steps each), started with ``MASTER_PORT`` naming a busy port:
    ``{"cwd", "sweep_dir", "output"}``."""
    if not _MULTIRUN:
        cwd = tmp_path_factory.mktemp("cwd")
        sweep_dir = tmp_path_factory.mktemp("sweep")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            env = {**clean_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
            cmd = [sys.executable, str(TRAIN), "-m", f"hydra.sweep.dir={sweep_dir}", "strategy.damping=1e-2,3e-3",
                   *TINY]
            result = run_script(cmd, env, cwd, 240)
        assert result.returncode == 0, f"{' '.join(cmd)} exited with {result.returncode}:\n{result.stdout[-4000:]}"
        _MULTIRUN.update(cwd=cwd, sweep_dir=sweep_dir, output=result.stdout)
    return _MULTIRUN


@pytest.mark.timeout(300)
def test_a_multirun_writes_one_summary_per_job_into_its_output_dir(multirun: dict[str, Any]) -> None:
    summaries = {p.parent.name: json.loads(p.read_text()) for p in multirun["sweep_dir"].glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"]
    assert [summaries[job]["config"]["strategy"]["damping"] for job in ("0", "1")] == [1e-2, 3e-3]
    for job, summary in summaries.items():
        assert summary["world_size"] == 2 and summary["train_steps"] == 4
        assert Path(summary["metrics_csv"]).parent == multirun["sweep_dir"] / job / "csv"
    # Jobs ran as single runs in their own dirs: nothing re-ran the sweep or wrote elsewhere.
    assert sorted(p.name for p in multirun["cwd"].iterdir()) == []


@pytest.mark.timeout(300)
def test_a_multirun_job_does_not_use_an_inherited_busy_master_port(multirun: dict[str, Any]) -> None:
    assert multirun["output"].count("test accuracy") == 2


@pytest.mark.timeout(300)
def test_a_job_logs_into_a_directory_of_its_own_without_an_overwrite_warning(multirun: dict[str, Any]) -> None:
    assert "exists and is not empty" not in multirun["output"]


@pytest.mark.timeout(300)
def test_each_job_prints_its_owner_table_once(multirun: dict[str, Any]) -> None:
    """Once per job (rank 0), though Hydra's logging shows every rank's records of the package's logger."""
    assert multirun["output"].count("K-FAC (dpkfac, inverse) on ") == 2


@pytest.mark.timeout(300)
def test_compare_runs_reads_a_multirun_into_a_table_and_a_plot(
    multirun: dict[str, Any], clean_env: dict[str, str], tmp_path: Path, run_script: Callable[..., Any]
) -> None:
    out = tmp_path / "cmp"
    result = run_script([sys.executable, str(COMPARE), str(multirun["sweep_dir"]), "--out", str(out)],
                        clean_env, ROOT, 60)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "strategy.damping=0.01" in result.stdout and "strategy.damping=0.003" in result.stdout
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["strategy.damping=0.01", "strategy.damping=0.003"]
    assert all(0 <= float(row["test_acc"]) <= 1 for row in rows)
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_the_charlm_experiment_trains_on_two_ranks_and_reports_bits_per_character(
    clean_env: dict[str, str], tmp_path: Path, run_script: Callable[..., Any]
) -> None:
    result = run_script([sys.executable, str(TRAIN), f"hydra.run.dir={tmp_path}", "experiment=charlm_transformer",
                         "trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=4",
                         "trainer.enable_progress_bar=false"], clean_env, ROOT, 240)
    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["strategy"], summary["model"], summary["world_size"]) == ("dpkfac", "char_transformer", 2)
    assert summary["test_acc"] is None and summary["val_acc"] is None
    # 98 characters: an untrained model is near log2(98) = 6.6 bits; 8 steps already beat the uniform guess.
    assert 0 < summary["val_bpc"] < 6.6 and summary["val_bpc"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert "val bits per character" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_default_example_reaches_95_percent_test_accuracy_on_digits(
    clean_env: dict[str, str], tmp_path: Path, run_script: Callable[..., Any]
) -> None:
    result = run_script([sys.executable, str(TRAIN), f"hydra.run.dir={tmp_path}", "trainer.enable_progress_bar=false"],
                        clean_env, ROOT, 240)
    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["strategy"], summary["model"], summary["world_size"]) == ("dpkfac", "cnn", 2)
    assert summary["test_acc"] >= 0.95, summary["test_acc"]
