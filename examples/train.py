"""Train a classifier or a language model with DP-KFAC, D-KFAC or plain DDP, configured by Hydra (``conf/``).

    python examples/train.py                              # digits CNN, dpkfac, 2 CPU ranks, 10 epochs
    python examples/train.py strategy=ddp model=mlp trainer.max_epochs=2
    python examples/train.py experiment=mnist1d_cnn
    python examples/train.py experiment=charlm_transformer  # character LM under AdamW, bits per character
    python examples/train.py -m strategy.damping=0.03,0.1,0.3 strategy.inv_update_steps=10,40

Each job writes ``csv/metrics.csv`` (CSV logger) and ``summary.json`` into its Hydra output dir;
``examples/compare_runs.py`` collects a multirun into one table and one plot.

Lightning's default launcher re-runs this command line for ranks 1..N-1 (with the same output dir), so
every rank composes the same config; only global rank 0 prints and writes the summary. In a multirun,
each job is run as a fresh single run of this script (see ``lightning_dpkfac.hydra.jobs``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

import lightning_dpkfac  # noqa: F401  (registers the strategies and the Hydra schemas: before any Trainer)
from lightning_dpkfac import DPKFACStrategy
from lightning_dpkfac.hydra.jobs import in_multirun, run_job_in_fresh_process

SUMMARY = "summary.json"


class StepTimer(pl.Callback):
    """Records, per training batch on this rank, the time from ``on_train_batch_start`` to
    ``on_train_batch_end`` (forward, backward, K-FAC, optimizer step) and the ``kfac/*`` metrics logged,
    and logs ``time/elapsed_s``: seconds since training started, for plots against wall time."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.kfac: dict[str, list[float]] = {}
        self._train_start = 0.0
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._start)
        pl_module.log("time/elapsed_s", now - self._train_start, on_step=True, on_epoch=False)
        for key, value in trainer.callback_metrics.items():
            if key.startswith("kfac/"):
                self.kfac.setdefault(key, []).append(float(value))


def build(cfg: DictConfig) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule, StepTimer]:
    """The Trainer, module (``cfg.module``: a classifier's or a language model's) and data module that ``cfg``
    describes (nothing runs yet). The strategy is built first, so that a bad K-FAC value fails here, naming
    the parameter."""
    strategy = instantiate(cfg.strategy)
    data = instantiate(cfg.data)
    module = instantiate(cfg.module)(instantiate(cfg.model), optimizer=instantiate(cfg.optimizer))
    timer = StepTimer()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=logger, callbacks=[timer])
    return trainer, module, data, timer


def strategy_name(strategy: Any) -> str:
    """"dpkfac" or "dkfac" (the K-FAC mode), else the strategy's class name without "Strategy" ("ddp")."""
    if isinstance(strategy, DPKFACStrategy):
        return strategy.kfac_config.mode
    return type(strategy).__name__.removesuffix("Strategy").lower()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test (where the data has a test split), and return (on every rank) the summary that rank 0 prints
    and writes to ``<paths.output_dir>/summary.json``."""
    start = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    trainer, module, data, timer = build(cfg)
    trainer.fit(module, datamodule=data)
    val = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    has_test = is_overridden("test_dataloader", data)
    (test,) = trainer.test(module, datamodule=data, verbose=False) if has_test else ({},)
    wall = time.perf_counter() - start

    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv" if trainer.logger and trainer.logger.log_dir else None
    summary: dict[str, Any] = {
        "strategy": strategy_name(trainer.strategy),
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": type(data).__name__,
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "seed": cfg.seed,
        "world_size": trainer.world_size,
        "epochs": trainer.current_epoch,
        "train_steps": trainer.global_step,
        "test_acc": test.get("test/acc"),
        "test_loss": test.get("test/loss"),
        "val_acc": val.get("val/acc"),
        "val_loss": val.get("val/loss"),
        "val_bpc": val.get("val/bpc"),
        "wall_time_s": wall,  # seeding, building, fit and test; not Python start-up and imports
        "median_step_time_s": statistics.median(timer.step_times) if timer.step_times else None,
        "kfac_mean_per_step": {k: statistics.fmean(v) for k, v in sorted(timer.kfac.items())},
        "metrics_csv": str(metrics_csv.resolve()) if metrics_csv else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        print_summary(summary)
        out = Path(cfg.paths.output_dir) / SUMMARY
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


_REPORTED = (("test_acc", "test accuracy"), ("test_loss", "test loss"), ("val_acc", "val accuracy"),
             ("val_loss", "val loss"), ("val_bpc", "val bits per character"))


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run report: accuracies, budget, timings and the mean K-FAC metrics per step."""
    lines = [
        f"[{summary['strategy']}/{summary['model']} on {summary['data']}, {summary['world_size']} ranks]",
        "  " + "   ".join(f"{label} {summary[key]:.4f}" for key, label in _REPORTED if summary[key] is not None),
        f"  {summary['train_steps']} steps in {summary['epochs']} epochs, {summary['wall_time_s']:.1f} s "
        f"for fit + test, median step {1e3 * (summary['median_step_time_s'] or 0):.1f} ms",
    ]
    if summary["kfac_mean_per_step"]:
        lines.append("  K-FAC per step: " + ", ".join(
            f"{key.removeprefix('kfac/')} {value:.3g}" for key, value in summary["kfac_mean_per_step"].items()
        ))
    print("\n".join(lines), flush=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The Hydra app. Returns ``summary[cfg.optimized_metric]``, the value a sweeper optimises."""
    if in_multirun():
        summary = json.loads(run_job_in_fresh_process(SUMMARY).read_text())
    else:
        summary = train(cfg)
    return summary.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
    # Leave without interpreter finalization, which sometimes aborts gloo processes after all work is
    # done (exit 134, Lightning's own DDP too): see lightning_dpkfac.exit_process.
    lightning_dpkfac.exit_process(0)
