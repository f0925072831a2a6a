"""The benchmark: one tiny run end to end (2 real gloo ranks), and the rules of its summaries."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest

from lightning_dpkfac.core.config import KFACConfig
from lightning_dpkfac.tools.bench import (PER_STRATEGY, TASKS, _first_reaching, _median_spread, main, parse_args,
                                          train_lrs)
from lightning_dpkfac.distributed.assignment import LayerShape, layer_cost
from lightning_dpkfac.distributed.comm import KINDS
from lightning_dpkfac.tools.bench_report import evaluate_goals

#: The tiny run's K-FAC cycle: a decomposition interval of 3 steps, factors every step.
CYCLE = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    main(["--out", str(out), "--models", "mlp", "--tasks", "digits", "--batch-size", "16", "--warmup-cycles", "1",
          "--cycles", "2", "--reps", "2", "--seeds", "0", "--epochs", "1",
          "--kfac", f"inv_update_steps={CYCLE}", "factor_update_steps=1"])
    return out, json.loads((out / "results.json").read_text())


def test_writes_results_json_markdown_and_plots(tiny_run) -> None:
    out, results = tiny_run
    assert results["schema"] == "lightning_dpkfac.tools.bench/3"
    for name in ("results.md", "step_time.png", "bytes.png", "convergence.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "## Step time: mlp" in md and "## Convergence: digits" in md and "## Performance goals" in md


def test_the_trials_use_the_library_defaults_with_the_kfac_overrides_applied(tiny_run) -> None:
    out, results = tiny_run
    expected = asdict(KFACConfig(inv_update_steps=CYCLE, factor_update_steps=1))
    assert results["config"]["kfac"] == {k: v for k, v in expected.items() if k not in PER_STRATEGY}
    assert results["config"]["cycle_steps"] == CYCLE
    settings = "library defaults with --kfac inv_update_steps=3 factor_update_steps=1"
    assert results["config"]["kfac_settings"] == settings and settings in (out / "results.md").read_text()


def test_without_kfac_overrides_the_trials_use_the_library_defaults(tmp_path: Path) -> None:
    results = main(["--out", str(tmp_path), "--models", "--tasks"])  # no trials: the config alone
    expected = {k: v for k, v in asdict(KFACConfig()).items() if k not in PER_STRATEGY}
    assert results["config"]["kfac"] == expected and results["config"]["kfac_settings"] == "library defaults"
    assert "K-FAC, in every trial: library defaults:" in (tmp_path / "results.md").read_text()


def test_every_repetition_times_whole_cycles_that_start_where_a_decomposition_interval_does(tiny_run) -> None:
    """2 timed cycles of 3 steps after one warm-up cycle: a layer's decompositions (the ``inverse`` phase)
    fall on the same steps of every cycle, one of them on the window's first step."""
    _, results = tiny_run
    for name in ("dkfac", "dpkfac"):
        for rep in results["step_time"]["mlp"]["strategies"][name]["per_step"]:
            assert len(rep) == 2 * CYCLE, name
            decomposing = {i for i, step in enumerate(rep) if step["inverse"] > 0}
            first_cycle = {i for i in decomposing if i < CYCLE}
            assert 0 in first_cycle and {i - CYCLE for i in decomposing - first_cycle} == first_cycle, (name, rep)
    assert all(step["inverse"] == 0 for rep in results["step_time"]["mlp"]["strategies"]["ddp"]["per_step"]
               for step in rep)


def test_reports_every_strategy_with_its_step_time_and_memory(tiny_run) -> None:
    _, results = tiny_run
    strategies = results["step_time"]["mlp"]["strategies"]
    assert list(strategies) == ["ddp", "dkfac", "dpkfac"]
    for name, s in strategies.items():
        assert s["step_s"]["median"] > 0 and len(s["peak_rss_bytes"]) == 2, name


def test_timed_phases_do_not_overlap_and_leave_little_untimed(tiny_run) -> None:
    """``other`` is the part of ``KFACPreconditioner.step`` outside the engine's timers: negative if two
    timers overlapped (time counted twice), the largest part if a phase went untimed."""
    _, results = tiny_run
    for name, s in results["step_time"]["mlp"]["strategies"].items():
        phases = s["phases_s"]
        assert all(seconds >= 0 for phase, seconds in phases.items() if phase != "other"), (name, phases)
        assert phases["other"] >= -1e-9, (name, phases)
        assert max(phases, key=phases.get) != "other", (name, phases)


def test_step_time_counts_every_step_its_ratio_to_ddp_is_of_means_and_stalls_are_max_over_median(tiny_run) -> None:
    _, results = tiny_run
    strategies = results["step_time"]["mlp"]["strategies"]
    steps = {name: [step["step"] for rep in s["per_step"] for step in rep] for name, s in strategies.items()}
    for name, s in strategies.items():
        assert len(steps[name]) == 2 * 2 * CYCLE, name  # 2 repetitions pooled
        assert s["step_s"]["mean"] == pytest.approx(statistics.fmean(steps[name])), name
        assert s["step_s"]["max"] == max(steps[name]) and s["step_s"]["p95"] <= s["step_s"]["max"], name
        assert s["ratio_to_ddp"] == pytest.approx(statistics.fmean(steps[name]) / statistics.fmean(steps["ddp"]))
        assert s["median_ratio_to_ddp"] == pytest.approx(statistics.median(steps[name])
                                                         / statistics.median(steps["ddp"]))
        assert s["max_over_median"] == pytest.approx(max(steps[name]) / statistics.median(steps[name])), name


def test_load_imbalance_is_the_owners_largest_load_over_the_mean(tiny_run) -> None:
    """The MLP 784-512-512-10 on 2 ranks, decomposing every 3 steps: layer 0 alone on rank 0."""
    _, results = tiny_run
    costs = [layer_cost(LayerShape(d_a, d_g), inv_update_steps=CYCLE)
             for d_a, d_g in ((785, 512), (513, 512), (513, 10))]
    loads = [costs[0], costs[1] + costs[2]]
    strategies = results["step_time"]["mlp"]["strategies"]
    assert strategies["ddp"]["load_imbalance"] is None
    for name in ("dkfac", "dpkfac"):
        assert strategies[name]["owners"] == [0, 1, 1], name
        assert strategies[name]["load_imbalance"] == pytest.approx(max(loads) / (sum(loads) / 2)), name


def test_measured_bytes_per_step_equal_the_planners_prediction(tiny_run) -> None:
    _, results = tiny_run
    for name, s in results["step_time"]["mlp"]["strategies"].items():
        assert {k: s["bytes_per_step"][k] for k in KINDS} == pytest.approx(s["bytes_per_step_predicted"]), name
    assert results["step_time"]["mlp"]["strategies"]["dpkfac"]["bytes_per_step"]["factors"] == 0.0


def test_memory_is_also_measured_with_the_layers_above_the_fair_share_split(tiny_run) -> None:
    _, results = tiny_run
    model = results["step_time"]["mlp"]
    blocks = model["blocks"]
    assert blocks["max_factor_dim"] == "auto" and blocks["layers"] == model["shapes"]["layers"] + 1
    assert set(blocks["strategies"]) == {"dkfac", "dpkfac"}
    largest = {name: max(sum(r.values()) for r in s["dpkfac"]["state_bytes"])
               for name, s in (("whole", model["strategies"]), ("blocks", blocks["strategies"]))}
    assert largest["blocks"] < largest["whole"]
    assert any("max_factor_dim=auto" in g["goal"] for g in results["goals"])


def test_the_papers_three_ratios_are_reported_per_model(tiny_run) -> None:
    out, results = tiny_run
    ratios = results["paper_ratios"]["mlp"]
    assert set(ratios) == {"computation", "communication", "kfac_memory", "peak_rss"}
    assert ratios["communication"] > 1 and ratios["kfac_memory"] > 1  # dkfac all-reduces and copies factors
    assert "## The paper's three ratios, measured" in (out / "results.md").read_text()


def test_convergence_curves_and_summary_for_all_four_strategies(tiny_run) -> None:
    _, results = tiny_run
    digits = results["convergence"]["digits"]
    assert set(digits["runs"]) == set(digits["summary"]) == {"sgd", "adam", "dkfac", "dpkfac"}
    curve = digits["runs"]["dpkfac"][0]["curve"]
    assert [round(epoch, 6) for epoch, _, _ in curve] == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    assert all(train_s > 0 and 0 <= acc <= 1 for _, train_s, acc in curve)
    assert digits["split"] == "test" and digits["eval_every"] == 5
    assert digits["metric"] == "accuracy" and not digits["lower_is_better"] and digits["kfac_optimizer"] == "adam"


@pytest.fixture(scope="module")
def tiny_language_model_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench_lm")
    main(["--out", str(out), "--models", "--tasks", "charlm", "--seeds", "0", "--batch-size", "8", "--max-steps", "4",
          "--eval-every", "2"])
    return out, json.loads((out / "results.json").read_text())


def test_the_language_model_task_trains_ddp_sgd_ddp_adamw_and_kfac_under_adamw(tiny_language_model_run) -> None:
    out, results = tiny_language_model_run
    lm = results["convergence"]["charlm"]
    assert set(lm["runs"]) == {"sgd", "adamw", "dkfac", "dpkfac"} and lm["kfac_optimizer"] == "adamw"
    assert lm["lrs"] == {"sgd": 0.1, "adamw": 3e-3, "dkfac": 3e-3, "dpkfac": 3e-3}
    assert "## Convergence: charlm, target 2.1 bpc (val bits per character)" in (out / "results.md").read_text()


def test_the_language_model_reports_validation_bits_per_character_lower_is_better(tiny_language_model_run) -> None:
    """4 steps of 8 windows per rank (709 steps per epoch on 2 ranks), evaluated every 2: bits per character
    start near log2(98) = 6.6 for an untrained model, and its validation text is the split (no test text)."""
    _, results = tiny_language_model_run
    lm = results["convergence"]["charlm"]
    assert lm["metric"] == "bpc" and lm["lower_is_better"] and lm["split"] == "val" and lm["target"] == 2.1
    for strategy, runs in lm["runs"].items():
        curve = runs[0]["curve"]
        assert [round(epoch * 709) for epoch, _, _ in curve] == [2, 4], strategy
        assert all(2.1 < bpc < 8 for _, _, bpc in curve) and runs[0]["time_to_target_s"] is None, strategy
        assert runs[0]["mean_step_s"] == pytest.approx(curve[-1][1] / 4), strategy


def test_the_language_model_goals_are_time_to_target_against_the_best_baseline_and_step_cost_against_adamw(
        tiny_language_model_run) -> None:
    _, results = tiny_language_model_run
    goals = {g["goal"]: g for g in results["goals"]}
    step = goals["charlm: dpkfac mean step / DDP-AdamW mean step <= 2"]
    summary = results["convergence"]["charlm"]["summary"]
    assert step["value"] == pytest.approx(summary["dpkfac"]["mean_step_s"]["median"]
                                          / summary["adamw"]["mean_step_s"]["median"])
    assert not goals["charlm: dpkfac median time to 2.1 bpc / best of DDP-SGD, DDP-AdamW <= 0.7"]["met"]


def test_a_target_is_reached_from_below_for_accuracy_and_from_above_for_bits_per_character() -> None:
    curve = [[0.5, 1.0, 3.0], [1.0, 2.0, 2.0], [1.5, 3.0, 1.0]]
    assert _first_reaching(curve, 2.0, lower_is_better=True) == [1.0, 2.0, 2.0]
    assert _first_reaching(curve, 2.5, lower_is_better=False) == [0.5, 1.0, 3.0]
    assert _first_reaching(curve, 0.5, lower_is_better=True) is None


def test_each_task_trains_with_its_own_learning_rates_unless_the_command_line_sets_them() -> None:
    assert train_lrs(TASKS["mnist1d"], parse_args([])) == {"sgd": 0.1, "adam": 1e-2, "dkfac": 0.1, "dpkfac": 0.1}
    assert train_lrs(TASKS["charlm"], parse_args(["--adam-lr", "1e-3", "--kfac-lr", "2e-3"])) == {
        "sgd": 0.1, "adamw": 1e-3, "dkfac": 2e-3, "dpkfac": 2e-3}


def test_kfac_steps_with_the_faster_baselines_optimizer_unless_the_command_line_names_another() -> None:
    assert {t: task.optimizers()["dpkfac"] for t, task in TASKS.items()} == {
        "digits": "adam", "mnist1d": "sgd", "charlm": "adamw"}
    args = parse_args(["--kfac-optimizer", "sgd"])  # the lr is then the task's DDP-SGD lr
    assert TASKS["digits"].optimizers(args.kfac_optimizer) == {"sgd": "sgd", "adam": "adam", "dkfac": "sgd",
                                                               "dpkfac": "sgd"}
    assert train_lrs(TASKS["digits"], args)["dpkfac"] == 0.1


def test_an_optimizer_under_kfac_without_a_learning_rate_for_the_task_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tasks", "charlm", "--kfac-optimizer", "adam"])
    assert "task charlm has no learning rate for it; give --kfac-lr" in capsys.readouterr().err
    assert parse_args(["--tasks", "charlm", "--kfac-optimizer", "adam", "--kfac-lr", "1e-3"]).kfac_lr == 1e-3


def test_goals_are_listed_with_their_measured_value(tiny_run) -> None:
    _, results = tiny_run
    goals = {g["goal"]: g for g in results["goals"]}
    factor_goal = goals["mlp: dpkfac factor bytes per step = 0"]
    assert factor_goal["value"] == 0.0 and factor_goal["met"]
    dpkfac = results["step_time"]["mlp"]["strategies"]["dpkfac"]
    assert goals["mlp: dpkfac mean step / DDP-SGD mean <= 2.0"]["value"] == dpkfac["ratio_to_ddp"]
    assert goals["mlp: dpkfac max step / median step <= 4"]["value"] == dpkfac["max_over_median"]
    reached = goals["digits: every dpkfac seed reaches 97%"]
    assert reached["met"] == (reached["value"] == 1.0)
    assert "digits: dpkfac median time to 97% / best of DDP-SGD, DDP-Adam <= 0.7" in goals


def _goals_of_one_task(dpkfac_s: float | None, baselines_s: list[float | None]) -> dict[str, dict]:
    """The goals of a digits run whose seeds' median times to 97% were these (one seed each)."""
    times = {"dpkfac": dpkfac_s, **{b: t for b, t in zip(("sgd", "adam"), baselines_s)}}
    task = {"metric": "accuracy", "target": 0.97, "tuning": False, "baselines": ["sgd", "adam"],
            "summary": {s: {"time_to_target_s": {"median": t}} for s, t in times.items()},
            "runs": {"dpkfac": [{"time_to_target_s": dpkfac_s}]}}
    goals = evaluate_goals({"step_time": {}, "convergence": {"digits": task}})
    return {g["goal"]: g for g in goals}


def test_time_to_target_is_judged_against_the_fastest_baseline_that_reached_it() -> None:
    goal = "digits: dpkfac median time to 97% / best of DDP-SGD, DDP-Adam <= 0.7"
    assert _goals_of_one_task(1.0, [4.0, 2.0])[goal] == {
        "goal": goal, "value": 0.5, "limit": 0.7, "met": True, "note": None}
    assert not _goals_of_one_task(1.0, [None, 1.2])[goal]["met"]
    never = _goals_of_one_task(1.0, [None, None])[goal]
    assert never["met"] and never["value"] is None and never["note"] == "dpkfac reached it, no baseline did"
    missed = _goals_of_one_task(None, [None, 2.0])[goal]
    assert not missed["met"] and missed["value"] is None and missed["note"] is None


def test_a_seed_that_never_reaches_the_target_counts_as_infinitely_slow() -> None:
    assert _median_spread([1.0, None, 3.0]) == {"median": 3.0, "min": 1.0, "max": None}
    assert _median_spread([None, None, 2.0])["median"] is None


def test_one_rank_reports_no_communication_ratio() -> None:
    from lightning_dpkfac.tools.bench_report import paper_ratios

    side = {"phases_s": {"factor": 1.0, "inverse": 0.0, "precondition": 1.0}, "bytes_per_step": {},
            "state_bytes": [{"factors": 4, "decompositions": 4, "capture": 4}], "peak_rss_bytes": None}
    ratios = paper_ratios({"strategies": {"dkfac": side, "dpkfac": side}})
    assert ratios == {"computation": 1.0, "communication": None, "kfac_memory": 1.0, "peak_rss": None}


def test_one_rank_is_not_judged_on_communication_goals() -> None:
    def strategy(gradient_bytes: float) -> dict:
        return {"bytes_per_step": {"gradients": gradient_bytes, "factors": 0.0}, "max_over_median": 1.5}

    def goals(gradient_bytes: float) -> list[str]:
        model = {"strategies": {"ddp": strategy(gradient_bytes), "dpkfac": strategy(gradient_bytes)}}
        return [g["goal"] for g in evaluate_goals({"step_time": {"cnn": model}, "convergence": {}})]

    assert goals(0.0) == ["cnn: dpkfac max step / median step <= 4"]
    assert "cnn: dpkfac total bytes / DDP-SGD gradient bytes <= 1.05" in goals(1024.0)
    assert "cnn: dpkfac factor bytes per step = 0" in goals(1024.0)


@pytest.mark.parametrize("flags", [["--block-dim", "1"], ["--block-dim", "automatic"], ["--cycles", "0"],
                                   ["--warmup-cycles", "0"]])
def test_invalid_windows_and_block_sizes_are_refused_before_any_trial(flags: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(flags)


def test_block_sizes_take_auto_or_an_integer() -> None:
    assert parse_args([]).block_dim == "auto" and parse_args(["--block-dim", "0"]).block_dim == 0
    assert parse_args(["--block-dim", "256"]).block_dim == 256


def test_kfac_overrides_are_read_as_typed_values() -> None:
    args = parse_args(["--kfac", "factor_update_steps=5", "inv_update_steps=10", "factor_decay=0.5",
                       "method=inverse", "max_factor_dim=auto", "kl_clip=None", "gather_rows=False"])
    assert args.kfac_overrides == {"factor_update_steps": 5, "inv_update_steps": 10, "factor_decay": 0.5,
                                   "method": "inverse", "max_factor_dim": "auto", "kl_clip": None, "gather_rows": False}
    assert parse_args([]).kfac_overrides == {}


@pytest.mark.parametrize(("item", "message"), [
    ("damping=-1", "damping=-1 is invalid: it must be a number > 0."),
    ("inv_update_steps=0", "inv_update_steps=0 is invalid: it must be an integer >= 1."),
    ("dampin=0.1", "'dampin' is not a parameter of KFACConfig. Did you mean 'damping'?"),
    ("mode=dkfac", "'mode' is set by the benchmark for each strategy"),
])
def test_a_bad_kfac_override_fails_before_any_trial_naming_the_option_and_the_key(
        item: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--kfac", "factor_update_steps=2", item])
    assert f"argument --kfac: {message}" in capsys.readouterr().err


def test_quick_mode_shrinks_the_run() -> None:
    args = parse_args(["--quick"])
    assert (args.warmup_cycles, args.cycles, args.reps, args.seeds, args.epochs) == (1, 1, 1, [0], 3)
    assert parse_args([]).seeds is None  # each task's own number of seeds
    assert args.models == ["mlp"] and args.tasks == ["digits"] and args.kfac_overrides == {"inv_update_steps": 2}
    assert parse_args([]).tasks == ["digits", "mnist1d", "charlm"]
    assert parse_args(["--quick", "--kfac", "inv_update_steps=4"]).kfac_overrides == {"inv_update_steps": 4}
