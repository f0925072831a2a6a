"""The benchmark's report: the performance goals, ``results.md`` tables and PNG plots, from the
``results.json`` dictionary that :mod:`lightning_dpkfac.tools.bench` builds (its schema is documented there)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_dpkfac.distributed.comm import KINDS
from lightning_dpkfac.tools.extras import needs_extra
from lightning_dpkfac.tools.plan import STATE_KINDS

PHASES = ("forward_backward", "factor", "inverse", "precondition", "comm", "optimizer", "other")
COLORS = {"ddp": "tab:gray", "sgd": "tab:gray", "adam": "tab:green", "adamw": "tab:green", "dkfac": "tab:orange",
          "dpkfac": "tab:blue"}
#: How reports name the convergence strategies.
NAMES = {"sgd": "DDP-SGD", "adam": "DDP-Adam", "adamw": "DDP-AdamW", "dkfac": "dkfac", "dpkfac": "dpkfac"}


# ---------------------------------------------------------------------------------- derived figures
def split_phrase(max_factor_dim: int | str) -> str:
    """How a report names the split of the ``blocks`` trials."""
    if max_factor_dim == "auto":
        return "split by max_factor_dim=auto (only layers above the ranks' fair share of the work)"
    return f"split into blocks of at most {max_factor_dim} (max_factor_dim)"


def state_total(per_rank: list[dict[str, int]], kinds: tuple[str, ...] = STATE_KINDS) -> list[int]:
    """Per rank: the bytes of ``kinds`` (default: factors + decompositions + capture)."""
    return [sum(r[k] for k in kinds) for r in per_rank]


def state_ratio(strategies: dict[str, Any], kinds: tuple[str, ...] = STATE_KINDS) -> float | None:
    """dpkfac's largest per-rank K-FAC state x P over dkfac's largest per-rank state (``kinds`` only), from
    ``strategies`` (a model's ``strategies`` or ``blocks.strategies``)."""
    s = strategies
    if "dpkfac" not in s or "dkfac" not in s:
        return None
    dp, dk = state_total(s["dpkfac"]["state_bytes"], kinds), state_total(s["dkfac"]["state_bytes"], kinds)
    return max(dp) * len(dp) / max(dk) if max(dk) else None


def _total(bytes_by_kind: dict[str, float]) -> float:
    return sum(bytes_by_kind.get(k, 0.0) for k in KINDS)


#: The paper's measured ranges (64 GPUs, per second-order update), D-KFAC over DP-KFAC.
PAPER_RATIOS = {"computation": (1.55, 1.65), "communication": (2.79, 3.15), "memory": (1.14, 1.47)}


def paper_ratios(model: dict[str, Any]) -> dict[str, float | None] | None:
    """dkfac over dpkfac, per rank and step, for one model's ``step_time`` section: ``computation`` (mean
    seconds in factor + inverse + precondition, averaged over ranks), ``communication`` (bytes sent),
    ``kfac_memory`` (largest per-rank K-FAC state) and ``peak_rss`` (largest peak process memory, which
    includes the Python and torch every process holds); ``None`` without both modes, a ratio
    ``None`` where its denominator is 0 or unmeasured (one rank sends no bytes)."""
    s = model["strategies"]
    if "dpkfac" not in s or "dkfac" not in s:
        return None
    dk, dp = s["dkfac"], s["dpkfac"]

    def compute(v: dict[str, Any]) -> float:
        return sum(v["phases_s"][p] for p in ("factor", "inverse", "precondition"))

    def ratio(num: float | None, den: float | None) -> float | None:  # one rank sends nothing: no ratio
        return num / den if num is not None and den else None

    def peak(v: dict[str, Any]) -> float | None:
        return max(v["peak_rss_bytes"]) if v["peak_rss_bytes"] else None

    return {
        "computation": ratio(compute(dk), compute(dp)),
        "communication": ratio(_total(dk["bytes_per_step"]), _total(dp["bytes_per_step"])),
        "kfac_memory": ratio(max(state_total(dk["state_bytes"])), max(state_total(dp["state_bytes"]))),
        "peak_rss": ratio(peak(dk), peak(dp)),
    }


#: Step-time goals: dpkfac's mean step over DDP-SGD's mean, at most this, per model.
STEP_RATIO_LIMITS = {"mlp": 2.0, "cifar_cnn": 2.5, "resnet18": 3.0}
#: Stall goal: dpkfac's largest step over its median step, at most this, for every model.
MAX_OVER_MEDIAN_LIMIT = 4.0
#: Convergence goal: dpkfac's median time to the target over the fastest DDP baseline's, per task.
TIME_TO_TARGET_LIMIT = 0.7
#: Convergence step goal: task -> (baseline, limit): dpkfac's median mean step over the baseline's, at most limit.
TRAIN_STEP_LIMITS = {"charlm": ("adamw", 2.0)}


def target_phrase(task: dict[str, Any]) -> str:
    """A convergence task's target as reports name it: "97%" or "2.1 bpc"."""
    return f"{task['target']:g} bpc" if task["metric"] == "bpc" else f"{100 * task['target']:.0f}%"


def metric_name(task: dict[str, Any]) -> str:
    return "bits per character" if task["metric"] == "bpc" else "accuracy"


def metric_text(task: dict[str, Any], value: float) -> str:
    return f"{value:.3f}" if task["metric"] == "bpc" else f"{100 * value:.1f}%"


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's performance goals that this run measured: ``{goal, value, limit, met, note}`` each (``note``:
    what stands in for a value that has none, else ``None``). Step-time goals use mean steps (every step
    counted); convergence goals the held-out split reported, not the one for tuning (``--eval-split val``)."""
    goals: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, limit: float, met: bool, note: str | None = None) -> None:
        goals.append({"goal": goal, "value": value, "limit": limit, "met": met, "note": note})

    def at_most(goal: str, value: float | None, limit: float) -> None:
        add(goal, value, limit, value is not None and value <= limit)

    for name, model in results["step_time"].items():
        s = model["strategies"]
        # On one rank nothing is sent: the communication goals do not apply.
        communicates = "ddp" in s and s["ddp"]["bytes_per_step"]["gradients"] > 0
        if "dpkfac" in s and communicates:
            at_most(f"{name}: dpkfac factor bytes per step = 0", s["dpkfac"]["bytes_per_step"].get("factors", 0.0), 0.0)
            at_most(f"{name}: dpkfac total bytes / DDP-SGD gradient bytes <= 1.05",
                    _total(s["dpkfac"]["bytes_per_step"]) / s["ddp"]["bytes_per_step"]["gradients"], 1.05)
        if "dpkfac" in s and "dkfac" in s:
            at_most(f"{name}: dpkfac max per-rank K-FAC state x P / dkfac max per-rank state <= 1.10",
                    state_ratio(s), 1.10)
        if "blocks" in model:
            at_most(f"{name}: the same, both {split_phrase(model['blocks']['max_factor_dim'])}",
                    state_ratio(model["blocks"]["strategies"]), 1.10)
        if "dpkfac" in s and "ddp" in s and name in STEP_RATIO_LIMITS:
            limit = STEP_RATIO_LIMITS[name]
            at_most(f"{name}: dpkfac mean step / DDP-SGD mean <= {limit}", s["dpkfac"]["ratio_to_ddp"], limit)
        if "dpkfac" in s and "dkfac" in s and name == "mlp":
            at_most("mlp: dpkfac mean step / dkfac mean <= 0.75",
                    s["dpkfac"]["step_s"]["mean"] / s["dkfac"]["step_s"]["mean"], 0.75)
        if "dpkfac" in s:
            at_most(f"{name}: dpkfac max step / median step <= {MAX_OVER_MEDIAN_LIMIT:g}",
                    s["dpkfac"]["max_over_median"], MAX_OVER_MEDIAN_LIMIT)
    for name, task in results["convergence"].items():
        summary = task["summary"] if not task["tuning"] else {}
        if "dpkfac" not in summary:
            continue
        target = target_phrase(task)
        dp = summary["dpkfac"]["time_to_target_s"]["median"]
        rivals = [summary[s]["time_to_target_s"]["median"] for s in task["baselines"]]
        best = min((r for r in rivals if r is not None), default=None)
        goal = (f"{name}: dpkfac median time to {target} / best of "
                f"{', '.join(NAMES[s] for s in task['baselines'])} <= {TIME_TO_TARGET_LIMIT}")
        if dp is not None and best is None:  # no ratio, and none needed
            add(goal, None, TIME_TO_TARGET_LIMIT, True, "dpkfac reached it, no baseline did")
        else:
            at_most(goal, None if dp is None or best is None else dp / best, TIME_TO_TARGET_LIMIT)
        reached = [r["time_to_target_s"] is not None for r in task["runs"]["dpkfac"]]
        add(f"{name}: every dpkfac seed reaches {target}", sum(reached) / len(reached), 1.0, all(reached))
        if name in TRAIN_STEP_LIMITS and TRAIN_STEP_LIMITS[name][0] in summary:
            baseline, limit = TRAIN_STEP_LIMITS[name]
            at_most(f"{name}: dpkfac mean step / {NAMES[baseline]} mean step <= {limit:g}",
                    summary["dpkfac"]["mean_step_s"]["median"] / summary[baseline]["mean_step_s"]["median"], limit)
    return goals


# ---------------------------------------------------------------------------------- results.md
def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}"


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio else "-"


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:,.1f}"


def _spread(s: dict[str, float | None], fmt: Callable[[float], str]) -> str:
    if s["median"] is None:
        return "not reached"
    low, high = s["min"], s["max"]
    return f"{fmt(s['median'])} [{fmt(low) if low is not None else '-'}, {fmt(high) if high is not None else 'never'}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def format_markdown(results: dict[str, Any]) -> str:
    m, c = results["machine"], results["config"]
    out = [
        "# lightning-dpkfac benchmark",
        "",
        f"{m['world_size']} ranks, backend {m['backend']}, device {m['device']}, {m['cpu_count']} CPU cores, "
        f"torch {m['torch']}, {m['platform']}; load average {m['loadavg_start'][0]:.1f} at the start, "
        f"{m['loadavg_end'][0]:.1f} at the end.",
        "",
        f"K-FAC, in every trial: {c['kfac_settings']}: " + ", ".join(f"{k} {v}" for k, v in c["kfac"].items())
        + "; mode and lr per strategy. Step time: every step of "
        f"{c['warmup_cycles']} warm-up + {c['cycles']} timed cycles of {c['cycle_steps']} steps "
        "(lcm(factor_update_steps, inv_update_steps)) per repetition.",
    ]
    for name, model in results["step_time"].items():
        sh, s = model["shapes"], model["strategies"]
        out += ["", f"## Step time: {name} ({sh['layers']} K-FAC layers, N = {sh['covered_params']:,}, "
                    f"N_o = {sh['other_params']:,})", "",
                f"Batch {model['batch_size']} per rank, {model['reps']} repetition(s). Milliseconds per step, every "
                "step counted; phases are means per step (averaged over ranks) and add up to the mean.", ""]
        out += _table(["strategy", "mean", "ratio to DDP (mean)", "median", "p95", "max", "max/median", *PHASES],
                      [[k, _ms(v["step_s"]["mean"]), _times(v["ratio_to_ddp"]), _ms(v["step_s"]["median"]),
                        _ms(v["step_s"]["p95"]), _ms(v["step_s"]["max"]), f"{v['max_over_median']:.2f}",
                        *(_ms(v["phases_s"][p]) for p in PHASES)] for k, v in s.items()])
        ddp_grad = s["ddp"]["bytes_per_step"]["gradients"] if "ddp" in s else 0.0
        out += ["", "KiB sent per rank per step (engine counters; predicted: lightning_dpkfac.tools.plan):", ""]
        out += _table(["strategy", *KINDS, "total", "predicted total", "total / DDP"],
                      [[k, *(_kib(v["bytes_per_step"].get(kind, 0.0)) for kind in KINDS), _kib(_total(v["bytes_per_step"])),
                        _kib(_total(v["bytes_per_step_predicted"])),
                        f"{_total(v['bytes_per_step']) / ddp_grad:.3f}x" if ddp_grad else "-"] for k, v in s.items()])
        out += ["", "Per-rank memory, KiB (K-FAC state: largest rank; peak RSS of the largest rank, MiB):", ""]
        rows = []
        for k, v in s.items():
            totals = state_total(v["state_bytes"])
            rows.append([k, *(_kib(max(r[kind] for r in v["state_bytes"])) for kind in STATE_KINDS),
                         _kib(max(totals)), _kib(sum(totals)),
                         f"{max(v['peak_rss_bytes']) / 2**20:.0f}", f"{max(v['rss_growth_bytes']) / 2**20:.1f}",
                         f"{v['load_imbalance']:.3f}" if v["load_imbalance"] is not None else "-"])
        out += _table(["strategy", *STATE_KINDS, "total (max rank)", "total (all ranks)", "peak RSS",
                       "RSS growth", "owner load max/mean"], rows)
        ratio = state_ratio(s)
        if ratio is not None:
            out += ["", f"dpkfac max per-rank state x P / dkfac max per-rank state = {ratio:.3f}"]
        if "blocks" in model:
            b = model["blocks"]
            out += ["", f"With layers {split_phrase(b['max_factor_dim'])} ({b['layers']} K-FAC layers and blocks), "
                        "K-FAC state, KiB:", ""]
            out += _table(["strategy", *STATE_KINDS, "total (max rank)", "total (all ranks)", "owner load max/mean"],
                          [[k, *(_kib(max(r[kind] for r in v["state_bytes"])) for kind in STATE_KINDS),
                            _kib(max(state_total(v["state_bytes"]))), _kib(sum(state_total(v["state_bytes"]))),
                            f"{v['load_imbalance']:.3f}"] for k, v in b["strategies"].items()])
            blocked = state_ratio(b["strategies"])
            if blocked is not None:
                out += ["", f"dpkfac max per-rank state x P / dkfac max per-rank state = {blocked:.3f} (blocks)"]
    ratios = {name: r for name, model in results["step_time"].items() if (r := paper_ratios(model)) is not None}
    if ratios:
        out += ["", "## The paper's three ratios, measured: dkfac over dpkfac, per rank and step", "",
                "Computation: factor + inverse + precondition seconds; communication: bytes sent; memory: the "
                "largest rank's K-FAC state, and its peak process memory (RSS, which includes the Python and "
                "torch in every process).", ""]
        paper = {k: f"{lo:.2f}-{hi:.2f}x" for k, (lo, hi) in PAPER_RATIOS.items()}
        out += _table(["model", "computation", "communication", "K-FAC memory", "peak RSS"],
                      [[name, *(f"{r[k]:.2f}x" if r[k] is not None else "-"
                                for k in ("computation", "communication", "kfac_memory", "peak_rss"))]
                       for name, r in ratios.items()]
                      + [["paper (64 GPUs, measured)", paper["computation"], paper["communication"], paper["memory"],
                          paper["memory"]]])
    for task, conv in results["convergence"].items():
        metric = metric_name(conv)
        out += ["", f"## Convergence: {task}, target {target_phrase(conv)} ({conv['split']} {metric})", "",
                f"Batch {conv['batch_size']} per rank; dkfac and dpkfac step with "
                f"{NAMES[conv['kfac_optimizer']].removeprefix('DDP-')}; learning rates "
                + ", ".join(f"{NAMES[k]} {v:g}" for k, v in conv["lrs"].items())
                + f". Median [min, max] over seeds; {metric} every {conv['eval_every']} steps and at the end of "
                "every epoch; training wall time excludes evaluation.", ""]
        out += _table(["strategy", "reached", "time to target (s)", "epochs to target", f"final {metric}",
                       "mean step (ms)"],
                      [[NAMES[k], v["reached"], _spread(v["time_to_target_s"], lambda x: f"{x:.2f}"),
                        _spread(v["epochs_to_target"], lambda x: f"{x:.1f}"),
                        _spread(v["final"], lambda x: metric_text(conv, x)),
                        _spread(v["mean_step_s"], _ms)] for k, v in conv["summary"].items()])
    out += ["", "## Performance goals", ""]
    out += _table(["goal", "measured", "met"],
                  [[g["goal"], g.get("note") or ("-" if g["value"] is None else f"{g['value']:.3f}"),
                    "yes" if g["met"] else "no"]
                   for g in results["goals"]])
    return "\n".join(out) + "\n"


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.write_text(format_markdown(results))


# ---------------------------------------------------------------------------------- plots
def write_plots(results: dict[str, Any], out: Path) -> None:
    """``step_time.png``, ``bytes.png`` and (with convergence runs) ``convergence.png`` in ``out``."""
    with needs_extra("plotting the benchmark"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    step = results["step_time"]
    if step:
        for filename, title, stack, scale in (
            ("step_time.png", "step time breakdown (ms per step)", lambda v: [v["phases_s"][p] for p in PHASES], 1e3),
            ("bytes.png", "KiB sent per rank per step", lambda v: [v["bytes_per_step"].get(k, 0.0) for k in KINDS],
             1 / 1024),
        ):
            labels = PHASES if filename == "step_time.png" else KINDS
            fig, axes = plt.subplots(1, len(step), figsize=(4.5 * len(step), 4), squeeze=False)
            for ax, (name, model) in zip(axes[0], step.items()):
                strategies = list(model["strategies"])
                bottom = [0.0] * len(strategies)
                for j, label in enumerate(labels):
                    heights = [stack(model["strategies"][s])[j] * scale for s in strategies]
                    ax.bar(strategies, heights, bottom=bottom, label=label)
                    bottom = [b + h for b, h in zip(bottom, heights)]
                ax.set_title(f"{name}: {title}", fontsize=9)
            axes[0][-1].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / filename, dpi=100)
            plt.close(fig)
    conv = results["convergence"]
    if conv:
        fig, axes = plt.subplots(1, len(conv), figsize=(5 * len(conv), 4), squeeze=False)
        for ax, (task, data) in zip(axes[0], conv.items()):
            for strategy, runs in data["runs"].items():
                for i, run in enumerate(runs):
                    ax.plot([p[1] for p in run["curve"]], [p[2] for p in run["curve"]], color=COLORS[strategy],
                            alpha=0.8, label=NAMES[strategy] if i == 0 else None)
            ax.axhline(data["target"], color="black", linestyle=":", linewidth=1)
            # Zoom on the approach to the target: 2.5x the slowest median time to it, and a band on the far side.
            medians = [v["time_to_target_s"]["median"] for v in data["summary"].values()]
            if all(m is not None for m in medians):
                ax.set_xlim(0, 2.5 * max(medians))
                if data["lower_is_better"]:
                    ax.set_ylim(data["target"] - 0.3, data["target"] + 1.5)
                else:
                    ax.set_ylim(max(0.0, data["target"] - 0.15), 1.0)
            metric = metric_name(data)
            ax.set_xlabel("training wall time (s)")
            ax.set_ylabel(f"{data['split']} {metric}")
            ax.set_title(f"{task}: {data['split']} {metric} vs wall time", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=100)
        plt.close(fig)
