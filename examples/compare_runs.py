"""Collect runs of ``examples/train.py`` (e.g. the jobs of one Hydra multirun) into a table and a plot.

    python examples/compare_runs.py multirun/2026-11-25/10-44-55
    python examples/compare_runs.py outputs/2026-11-25/09-00-00 outputs/2026-11-25/09-10-00 --out cmp

Reads every ``summary.json`` under the given directories and the ``metrics.csv`` it names (CSV logger),
prints one row per run, and writes ``<out>.csv`` (the table) and ``<out>.png``: train loss and validation
accuracy against the optimizer step and against wall time since training started, one line per run.
``<out>`` defaults to ``<first directory>/comparison``. Runs are labelled by the overrides that differ
between them (``strategy.damping=0.001 strategy.inv_update_steps=10``).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

SUMMARY = "summary.json"
COLUMNS = ("run", "strategy", "model", "test_acc", "test_loss", "val_acc", "train_steps", "wall_time_s",
           "median_step_time_s")
#: (metric in metrics.csv, y-axis label, log scale)
CURVES = (("train/loss", "train loss", True), ("val/acc", "validation accuracy", False))


@dataclass
class Run:
    """One run: its output dir, its summary, and curves ``metric -> (steps, seconds, values)``."""

    path: Path
    summary: dict[str, Any]
    label: str = ""
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


def load_runs(dirs: list[Path]) -> list[Run]:
    """Every run under ``dirs`` (a directory with a ``summary.json``), ordered by path, labelled."""
    paths = sorted({p.parent for d in dirs for p in d.rglob(SUMMARY)}, key=_natural_key)
    runs = [Run(p, json.loads((p / SUMMARY).read_text())) for p in paths]
    varying = _varying_overrides(runs)
    for run in runs:
        run.label = " ".join(o for o in run.summary.get("overrides", []) if o in varying) or run.path.name
        csv_path = run.summary.get("metrics_csv")
        if csv_path and Path(csv_path).is_file():
            run.curves = read_curves(Path(csv_path))
    return runs


def _natural_key(path: Path) -> list[Any]:
    """Sort multirun job dirs 0, 1, ..., 10 numerically."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def _varying_overrides(runs: list[Run]) -> set[str]:
    """The overrides not shared by every run."""
    sets = [set(run.summary.get("overrides", [])) for run in runs]
    return set.union(*sets) - set.intersection(*sets) if sets else set()


def read_curves(metrics_csv: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``metric -> (steps, seconds since training started, values)`` for each metric of ``CURVES`` in a
    Lightning CSV log. Rows without ``time/elapsed_s`` (validation) get it interpolated from their step."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    timed = [(float(r["step"]), float(r["time/elapsed_s"])) for r in rows if r.get("time/elapsed_s")]
    t_steps, t_secs = (np.array(v) for v in zip(*timed)) if timed else (np.zeros(1), np.zeros(1))
    curves = {}
    for metric, _, _ in CURVES:
        points = [(float(r["step"]), float(r[metric])) for r in rows if r.get(metric)]
        if points:
            steps, values = (np.array(v) for v in zip(*points))
            curves[metric] = (steps, np.interp(steps, t_steps, t_secs), values)
    return curves


def table(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run with the ``COLUMNS``."""
    return [{"run": run.label, **{c: run.summary.get(c) for c in COLUMNS[1:]}} for run in runs]


def format_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as aligned text columns."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)

    cells = [list(COLUMNS)] + [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells)


def figure(runs: list[Run]) -> Figure:
    """A 2x2 figure: each metric of ``CURVES`` against step (left) and wall time (right); a run has one
    colour in every panel, named in one legend below them all. Log axes are labelled in plain decimals."""
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(len(CURVES), 2, squeeze=False)
    for row, (metric, ylabel, log) in enumerate(CURVES):
        for col, xlabel in enumerate(("optimizer step", "wall time since training started (s)")):
            ax = axes[row][col]
            for i, run in enumerate(runs):
                if metric in run.curves:
                    steps, seconds, values = run.curves[metric]
                    ax.plot(steps if col == 0 else seconds, values, color=f"C{i % 10}",
                            marker="." if metric.startswith("val") else None, label=run.label)
            ax.set(xlabel=xlabel, ylabel=ylabel)
            if log:
                ax.set_yscale("log", nonpositive="mask")  # a batch loss can round to exactly 0
                ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
                ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
            ax.grid(alpha=0.3)
    handles = {line.get_label(): line for ax in axes.flat for line in ax.get_lines()}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 3),
                   fontsize="small")
    return fig


class PlainLogFormatter(LogFormatter):
    """Labels the ticks that ``LogFormatter`` labels (minor ones too where the axis spans few decades), as
    plain decimals: 0.02 and 2.5 rather than 2x10^-2 and 2.5x10^0."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        if not super().__call__(x, pos):
            return ""
        return np.format_float_positional(x, precision=6, fractional=False, trim="-")  # not 0.30000000000000004


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    p.add_argument("--out", type=Path, default=None, help="output prefix (default: <first dir>/comparison)")
    args = p.parse_args(argv)
    runs = load_runs(args.dirs)
    if not runs:
        p.error(f"no {SUMMARY} under {', '.join(map(str, args.dirs))}")
    out = args.out or args.dirs[0] / "comparison"
    rows = table(runs)
    print(format_table(rows))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    figure(runs).savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
