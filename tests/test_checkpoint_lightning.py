"""Lightning checkpoints carry the K-FAC state: bit-identical resume, resume on another world size,
weights_only loading, clear errors for bad files, and a killed rank that neither hangs nor loses the run.

Each case runs ``tests/scripts/fit_digits.py`` (digits MLP, dpkfac, inv_update_steps=7 so that resumes
fall between decompositions) as subprocesses on real gloo ranks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import launch_env, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fit_digits.py"
STEPS_PER_EPOCH = {1: 40, 2: 20, 3: 14}  # 1257 train digits, batch 32 per rank


def fit(env: dict[str, str], out_dir: Path, *args: str, timeout: float = 120) -> tuple[int, str, float]:
    """Run the script; returns (exit code, output, seconds)."""
    start = time.perf_counter()
    result = run_command([sys.executable, str(SCRIPT), *args], env, ROOT, timeout)
    return result.returncode, result.stdout, time.perf_counter() - start


def fit_ok(env: dict[str, str], out_dir: Path, name: str, *args: str) -> dict[str, Any]:
    code, output, _ = fit(env, out_dir, "--ckpt-dir", str(out_dir / name), "--out", str(out_dir / f"{name}.pt"), *args)
    assert code == 0, output[-3000:]
    return torch.load(out_dir / f"{name}.pt", weights_only=False)


def checkpoint(out_dir: Path, name: str, epoch: int, devices: int) -> Path:
    return out_dir / name / f"epoch={epoch}-step={(epoch + 1) * STEPS_PER_EPOCH[devices]}.ckpt"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """An uninterrupted 3-epoch run on 2 ranks, checkpointing every epoch."""
    env, out_dir = launch_env(), tmp_path_factory.mktemp("ckpt")
    return out_dir, fit_ok(env, out_dir, "full", "--devices", "2", "--epochs", "3"), env


def test_resume_on_the_same_world_size_is_bit_identical(two_rank_run) -> None:
    out_dir, full, env = two_rank_run
    resumed = fit_ok(env, out_dir, "resumed", "--devices", "2", "--epochs", "3",
                     "--resume", str(checkpoint(out_dir, "full", 0, 2)))
    assert resumed["steps"] == full["steps"] == 60
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])


def test_resume_with_gathered_rows_is_bit_identical(tmp_path: Path) -> None:
    """A wide layer on 8 examples per rank gathers rows; the resumed run keeps that decision."""
    env, wide = launch_env(), ("--devices", "2", "--epochs", "2", "--hidden", "256", "--batch-size", "8")
    full = fit_ok(env, tmp_path, "full", *wide)
    (first_epoch,) = (tmp_path / "full").glob("epoch=0-*.ckpt")
    resumed = fit_ok(env, tmp_path, "resumed", *wide, "--resume", str(first_epoch))
    assert full["row_layers"] == resumed["row_layers"] == ["net.1"]
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


@pytest.mark.parametrize("devices", [1, 3])
def test_resume_on_another_world_size_loads_each_factor_on_its_new_owner(two_rank_run, devices: int) -> None:
    out_dir, _, env = two_rank_run
    ckpt = checkpoint(out_dir, "full", 1, 2)
    saved = torch.load(ckpt, weights_only=True)["lightning_dpkfac"]["layers"]
    resumed = fit_ok(env, out_dir, f"on{devices}", "--devices", str(devices), "--epochs", "3", "--resume", str(ckpt))
    assert resumed["steps"] == 2 * STEPS_PER_EPOCH[2] + STEPS_PER_EPOCH[devices]  # training went on
    for rank, held in enumerate(resumed["factors_at_start"]):
        assert set(held) == {name for name, owner in resumed["owners"].items() if owner == rank}
        for name, (A, G) in held.items():
            assert torch.equal(A, saved[name]["A"]) and torch.equal(G, saved[name]["G"])


def test_one_rank_checkpoint_resumes_on_two_ranks(two_rank_run) -> None:
    out_dir, _, env = two_rank_run
    fit_ok(env, out_dir, "single", "--devices", "1", "--epochs", "1")
    ckpt = checkpoint(out_dir, "single", 0, 1)
    saved = torch.load(ckpt, weights_only=True)["lightning_dpkfac"]["layers"]
    resumed = fit_ok(env, out_dir, "single_on2", "--devices", "2", "--epochs", "2", "--resume", str(ckpt))
    held = {name: f for per_rank in resumed["factors_at_start"] for name, f in per_rank.items()}
    assert sorted(held) == sorted(saved) and all(torch.equal(held[n][0], saved[n]["A"]) for n in held)


def test_checkpoint_holds_every_layers_factors_and_loads_with_weights_only(two_rank_run) -> None:
    out_dir, full, _ = two_rank_run
    state = torch.load(checkpoint(out_dir, "full", 2, 2), weights_only=True)["lightning_dpkfac"]
    assert sorted(state["layers"]) == sorted(full["owners"])
    assert state["steps"] == 60


def test_corrupted_checkpoint_is_named_in_a_clear_error(two_rank_run) -> None:
    out_dir, _, env = two_rank_run
    good = checkpoint(out_dir, "full", 0, 2)
    bad = out_dir / "truncated.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, output, _ = fit(env, out_dir, "--devices", "1", "--ckpt-dir", str(out_dir / "bad"), "--resume", str(bad))
    assert code != 0
    assert f"Could not read checkpoint '{bad}': it is truncated, corrupted or not a checkpoint" in output


def test_killed_rank_ends_the_run_within_the_timeout_and_a_resume_completes(two_rank_run) -> None:
    out_dir, full, env = two_rank_run
    code, output, seconds = fit(env, out_dir, "--devices", "2", "--epochs", "3", "--ckpt-dir", str(out_dir / "killed"),
                                "--kill-rank", "1", "--kill-at-step", "25", "--timeout-s", "20")
    assert code != 0 and seconds < 90, (code, seconds, output[-2000:])
    last = checkpoint(out_dir, "killed", 0, 2)
    assert last.exists() and not checkpoint(out_dir, "killed", 1, 2).exists()
    resumed = fit_ok(env, out_dir, "after_kill", "--devices", "2", "--epochs", "3", "--resume", str(last))
    assert resumed["steps"] == 60
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


def test_resuming_a_dpkfac_checkpoint_with_plain_ddp_asks_for_no_callback(two_rank_run) -> None:
    """The K-FAC state sits under its own top-level key, which other strategies ignore, rather than as a
    callback state, which made Lightning ask for a 'KFACCallback' nobody can add to a DDP run."""
    out_dir, _, env = two_rank_run
    code, output, _ = fit(env, out_dir, "--devices", "2", "--epochs", "2", "--strategy", "ddp",
                          "--ckpt-dir", str(out_dir / "as_ddp"), "--resume", str(checkpoint(out_dir, "full", 0, 2)))
    assert code == 0, output[-3000:]
    assert "Please add the following callbacks" not in output


def test_resuming_a_ddp_checkpoint_with_dpkfac_says_kfac_starts_fresh(tmp_path: Path) -> None:
    env = launch_env()
    fit_ok(env, tmp_path, "ddp", "--devices", "2", "--epochs", "1", "--strategy", "ddp")
    code, output, _ = fit(env, tmp_path, "--devices", "2", "--epochs", "2", "--ckpt-dir", str(tmp_path / "kfac"),
                          "--resume", str(checkpoint(tmp_path, "ddp", 0, 2)))
    assert code == 0, output[-3000:]
    assert output.count("The checkpoint holds no K-FAC state (it was saved with another strategy): K-FAC starts "
                        "fresh") == 1
