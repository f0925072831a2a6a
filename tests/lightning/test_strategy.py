"""``DPKFACStrategy``'s own duties around Lightning's DDP: it refuses ranks configured differently, leaves
nothing attached to the model once ``fit`` is over, and hands DDP's communication to a user's
``ddp_comm_hook``. Each case runs ``tests/scripts/fit_digits.py`` (digits MLP) on 2 real gloo ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import STEPS_PER_EPOCH, fit_digits, run_fit_digits


def test_ranks_given_different_kfac_settings_all_stop_with_an_error_naming_them(tmp_path: Path) -> None:
    """Rank 1 gets damping 0.05, rank 0 0.01 (an unseeded sweep under Lightning's popen launcher). Both ranks
    stop before training, each with the error; neither waits for the other (the collective timeout is
    300 s, the run may take 90)."""
    code, output, _ = run_fit_digits("--devices", "2", "--epochs", "1", "--ckpt-dir", str(tmp_path),
                                     "--damping-on-rank-1", "0.05", "--timeout-s", "300", timeout=90)
    assert code != 0
    for rank in (0, 1):
        assert f"[rank {rank}] ValueError: Ranks were given different K-FAC settings" in output, output[-3000:]
    assert "rank 0: {'damping': 0.01," in output and "rank 1: {'damping': 0.05," in output


def test_fit_leaves_no_forward_hook_on_any_module(two_rank_run: tuple[Path, dict[str, Any]]) -> None:
    """``teardown`` removes the engine's capture hooks: here the property is the hook dictionaries
    themselves, read in the script after ``trainer.fit`` returned."""
    _, full = two_rank_run
    for rank, left in enumerate(full["after_fit"]):
        assert left["hooked_modules"] == [], f"rank {rank}: forward hooks left on {left['hooked_modules']}"


def test_a_forward_and_backward_after_fit_capture_nothing_and_raise_nothing(
        two_rank_run: tuple[Path, dict[str, Any]]) -> None:
    """The engine stays readable after fit, but one more training-mode pass adds no capture to its state."""
    _, full = two_rank_run
    for rank, left in enumerate(full["after_fit"]):
        before, after = left["state_bytes"]
        assert left["error"] is None, f"rank {rank}: {left['error']}"
        assert after == before, f"rank {rank}: K-FAC state grew from {before} to {after} bytes"
        assert all(kinds == [] for kinds in left["captures"].values()), (rank, left["captures"])


@pytest.fixture(scope="module")
def user_hook_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch on 2 ranks with ``DPKFACStrategy(ddp_comm_hook=<an all-reduce that counts its calls>)``."""
    return fit_digits(tmp_path_factory.mktemp("user_hook"), "run", "--devices", "2", "--epochs", "1",
                      "--ddp-comm-hook")


def test_with_a_user_ddp_comm_hook_the_ranks_still_train_identically(user_hook_run: dict[str, Any]) -> None:
    assert user_hook_run["steps"] == user_hook_run["kfac_steps"] == STEPS_PER_EPOCH[2]
    assert user_hook_run["params_identical_on_all_ranks"]


def test_a_user_ddp_comm_hook_runs_on_every_backward_on_cpu_too(user_hook_run: dict[str, Any]) -> None:
    """Lightning's own DDPStrategy registers a ddp_comm_hook only on CUDA, though DDP's comm hooks work on
    gloo too: left to it, the hook was silently dropped on CPU (DDP's built-in all-reduce ran instead)."""
    steps = user_hook_run["steps"]
    assert all(calls >= steps for calls in user_hook_run["ddp_hook_calls"]), user_hook_run["ddp_hook_calls"]
