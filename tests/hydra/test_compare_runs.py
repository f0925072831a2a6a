"""``examples/compare_runs.py``'s figure, from a few small runs written here, and the logging it plots."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from matplotlib.figure import Figure

from conftest import ROOT

COMPARE = ROOT / "examples" / "compare_runs.py"
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def compare_runs() -> Iterator[ModuleType]:
    """``examples/compare_runs.py`` as a module."""
    spec = importlib.util.spec_from_file_location("compare_runs", COMPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_runs"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["compare_runs"]


def _write_run(path: Path, damping: float, losses: np.ndarray, val_acc: float | None) -> None:
    """A run's ``summary.json`` and ``metrics.csv``: one training loss per step, one validation accuracy at
    the end (none if ``val_acc`` is None)."""
    path.mkdir(parents=True)
    rows = [{"step": step, "train/loss": loss, "time/elapsed_s": 0.1 * step} for step, loss in enumerate(losses)]
    if val_acc is not None:
        rows.append({"step": len(losses) - 1, "val/acc": val_acc})
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss", "time/elapsed_s", "val/acc"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {"overrides": [f"strategy.damping={damping}", "trainer.max_epochs=1"],
               "metrics_csv": str(path / "metrics.csv")}
    (path / "summary.json").write_text(json.dumps(summary))


def _figure(compare_runs: ModuleType, tmp_path: Path, first_loss: float, last_loss: float) -> tuple[Figure, list]:
    """The figure of three runs whose losses fall from about ``first_loss`` to ``last_loss``; the first run
    has no validation accuracy."""
    for job, damping in enumerate((0.01, 0.003, 0.001)):
        losses = np.geomspace(first_loss, last_loss, 10) * (1 + 0.05 * job)
        _write_run(tmp_path / str(job), damping, losses, val_acc=None if job == 0 else 0.5 + 0.1 * job)
    runs = compare_runs.load_runs([tmp_path])
    fig = compare_runs.figure(runs)
    fig.draw_without_rendering()
    return fig, runs


def test_every_panel_tells_the_runs_apart_by_one_colour_per_run_named_in_a_figure_legend(
    compare_runs: ModuleType, tmp_path: Path
) -> None:
    fig, runs = _figure(compare_runs, tmp_path, 2.3, 0.5)
    labels = [run.label for run in runs]
    assert labels == ["strategy.damping=0.01", "strategy.damping=0.003", "strategy.damping=0.001"]
    (legend,) = fig.legends
    colours = {text.get_text(): handle.get_color() for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert list(colours) == labels and len(set(colours.values())) == len(labels)
    for ax in fig.axes:  # a run missing from a panel (no validation) shifts no other run's colour
        assert ax.get_lines()
        assert all(line.get_color() == colours[line.get_label()] for line in ax.get_lines())


@pytest.mark.parametrize(("first_loss", "last_loss"), [(2.5, 1.5), (2.3, 0.01)], ids=["one-decade", "many-decades"])
def test_log_axes_are_labelled_in_plain_decimals(
    compare_runs: ModuleType, tmp_path: Path, first_loss: float, last_loss: float
) -> None:
    fig, _ = _figure(compare_runs, tmp_path, first_loss, last_loss)
    log_axes = [ax for ax in fig.axes if ax.get_yscale() == "log"]
    assert len(log_axes) == 2
    for ax in log_axes:
        low, high = ax.get_ylim()
        shown = [label.get_text() for label in ax.get_yticklabels(which="both")
                 if low <= label.get_position()[1] <= high and label.get_text()]
        assert len(shown) >= 2, shown
        assert all(float(text) > 0 for text in shown), shown  # "2.5", "0.1": no "2.5x10^0" mathtext


def test_a_one_epoch_digits_run_logs_at_least_ten_training_losses() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    data = instantiate(cfg.data)
    data.setup("fit")
    per_rank = math.ceil(len(data.train_set) / cfg.trainer.devices)  # DistributedSampler's share
    steps_per_epoch = math.ceil(per_rank / cfg.data.batch_size)
    assert steps_per_epoch // cfg.trainer.log_every_n_steps >= 10
