"""Lightning checkpoints carry the K-FAC state: bit-identical resume, resume on another world size,
weights_only loading, clear errors for bad files, and a killed rank that neither hangs nor loses the run.

Each case runs ``tests/scripts/fit_digits.py`` (digits MLP, dpkfac unless said otherwise, inv_update_steps=7
so that resumes fall between decompositions) as subprocesses on real gloo ranks; ``two_rank_run`` (conftest)
is the uninterrupted 3-epoch run on 2 ranks that most of them resume from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import STEPS_PER_EPOCH, WIDE_ROWS, digits_checkpoint as checkpoint, fit_digits, run_fit_digits


def test_resume_on_the_same_world_size_is_bit_identical(two_rank_run) -> None:
    out_dir, full = two_rank_run
    resumed = fit_digits(out_dir, "resumed", "--devices", "2", "--epochs", "3",
                         "--resume", str(checkpoint(out_dir, "full", 0, 2)))
    assert resumed["steps"] == full["steps"] == 60
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])


def test_resume_with_gathered_rows_is_bit_identical(wide_rows_run) -> None:
    """A wide layer on 8 examples per rank gathers rows; the resumed run keeps that decision."""
    out_dir, full = wide_rows_run
    resumed = fit_digits(out_dir, "resumed", *WIDE_ROWS, "--resume", str(out_dir / "full" / "epoch=0-step=20.ckpt"))
    assert full["row_layers"] == resumed["row_layers"] == ["net.1"]
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


def test_resume_with_overlapped_decompositions_is_bit_identical(tmp_path: Path) -> None:
    """Epochs of 15 steps: the checkpoint after step 14 is taken while the decomposition of that step (slot 0
    of 7) is still on the worker; the checkpoint holds it, and the resumed run uses it at step 15, as the
    uninterrupted run does."""
    overlapped = ("--devices", "2", "--epochs", "2", "--limit-batches", "15", "--overlap")
    full = fit_digits(tmp_path, "full", *overlapped)
    resumed = fit_digits(tmp_path, "resumed", *overlapped, "--resume", str(tmp_path / "full" / "epoch=0-step=15.ckpt"))
    assert resumed["steps"] == full["steps"] == 30
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])


def test_dkfac_resume_on_the_same_world_size_is_bit_identical(tmp_path: Path) -> None:
    """dkfac: every rank holds every factor and decomposition, the checkpoint only the owners' copies. Resumed
    at step 20, between the decompositions of steps 14 and 21, the run goes on with the saved ones."""
    dkfac = ("--devices", "2", "--epochs", "2", "--mode", "dkfac")
    full = fit_digits(tmp_path, "full", *dkfac)
    resumed = fit_digits(tmp_path, "resumed", *dkfac, "--resume", str(checkpoint(tmp_path, "full", 0, 2)))
    assert resumed["steps"] == full["steps"] == 2 * STEPS_PER_EPOCH[2]
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])


_RESUMED: dict[int, dict[str, Any]] = {}  # shared between tests: one resume per device count


def resumed_from_epoch_1_on(two_rank_run: tuple[Path, dict[str, Any]], devices: int) -> dict[str, Any]:
    """``two_rank_run``'s checkpoint after epoch 1 resumed on ``devices`` ranks for the last epoch (run
    ``on{devices}``, whose own checkpoint after epoch 2 was thus saved on ``devices`` ranks)."""
    if devices not in _RESUMED:
        out_dir, _ = two_rank_run
        _RESUMED[devices] = fit_digits(out_dir, f"on{devices}", "--devices", str(devices), "--epochs", "3",
                                       "--resume", str(checkpoint(out_dir, "full", 1, 2)))
    return _RESUMED[devices]


@pytest.mark.parametrize("devices", [1, 3])
def test_resume_on_another_world_size_loads_each_factor_on_its_new_owner(two_rank_run, devices: int) -> None:
    out_dir, _ = two_rank_run
    saved = torch.load(checkpoint(out_dir, "full", 1, 2), weights_only=True)["lightning_dpkfac"]["layers"]
    resumed = resumed_from_epoch_1_on(two_rank_run, devices)
    assert resumed["steps"] == 2 * STEPS_PER_EPOCH[2] + STEPS_PER_EPOCH[devices]  # training went on
    for rank, held in enumerate(resumed["factors_at_start"]):
        assert set(held) == {name for name, owner in resumed["owners"].items() if owner == rank}
        for name, (A, G) in held.items():
            assert torch.equal(A, saved[name]["A"]) and torch.equal(G, saved[name]["G"])


def test_one_rank_checkpoint_resumes_on_two_ranks(two_rank_run) -> None:
    out_dir, _ = two_rank_run
    resumed_from_epoch_1_on(two_rank_run, 1)
    ckpt = out_dir / "on1" / f"epoch=2-step={2 * STEPS_PER_EPOCH[2] + STEPS_PER_EPOCH[1]}.ckpt"
    saved = torch.load(ckpt, weights_only=True)["lightning_dpkfac"]["layers"]
    resumed = fit_digits(out_dir, "on1_on2", "--devices", "2", "--epochs", "4", "--resume", str(ckpt))
    held = {name: f for per_rank in resumed["factors_at_start"] for name, f in per_rank.items()}
    assert sorted(held) == sorted(saved) and all(torch.equal(held[n][0], saved[n]["A"]) for n in held)


def test_checkpoint_holds_every_layers_factors_and_loads_with_weights_only(two_rank_run) -> None:
    out_dir, full = two_rank_run
    state = torch.load(checkpoint(out_dir, "full", 2, 2), weights_only=True)["lightning_dpkfac"]
    assert sorted(state["layers"]) == sorted(full["owners"])
    assert state["steps"] == 60


def test_corrupted_checkpoint_is_named_in_a_clear_error(two_rank_run) -> None:
    out_dir, _ = two_rank_run
    good = checkpoint(out_dir, "full", 0, 2)
    bad = out_dir / "truncated.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, output, _ = run_fit_digits("--devices", "1", "--ckpt-dir", str(out_dir / "bad"), "--resume", str(bad))
    assert code != 0
    assert f"Could not read checkpoint '{bad}': it is truncated, corrupted or not a checkpoint" in output


def test_killed_rank_ends_the_run_within_the_timeout_and_a_resume_completes(two_rank_run) -> None:
    out_dir, full = two_rank_run
    code, output, seconds = run_fit_digits("--devices", "2", "--epochs", "3", "--ckpt-dir", str(out_dir / "killed"),
                                           "--kill-rank", "1", "--kill-at-step", "25", "--timeout-s", "20")
    assert code != 0 and seconds < 90, (code, seconds, output[-2000:])
    last = checkpoint(out_dir, "killed", 0, 2)
    assert last.exists() and not checkpoint(out_dir, "killed", 1, 2).exists()
    resumed = fit_digits(out_dir, "after_kill", "--devices", "2", "--epochs", "3", "--resume", str(last))
    assert resumed["steps"] == 60
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


@pytest.fixture(scope="module")
def ddp_resumed_from_dpkfac(two_rank_run) -> tuple[int, str, Path]:
    """``two_rank_run``'s checkpoint after epoch 0 resumed with Lightning's plain DDP strategy for one epoch:
    its exit code, its output, and its checkpoint after epoch 1 (a DDP checkpoint, with no K-FAC state)."""
    out_dir, _ = two_rank_run
    code, output, _ = run_fit_digits("--devices", "2", "--epochs", "2", "--strategy", "ddp",
                                     "--ckpt-dir", str(out_dir / "as_ddp"), "--resume", str(checkpoint(out_dir, "full", 0, 2)))
    return code, output, checkpoint(out_dir, "as_ddp", 1, 2)


def test_resuming_a_dpkfac_checkpoint_with_plain_ddp_asks_for_no_callback(ddp_resumed_from_dpkfac) -> None:
    """The K-FAC state sits under its own top-level key, which other strategies ignore, rather than as a
    callback state, which made Lightning ask for a 'KFACCallback' nobody can add to a DDP run."""
    code, output, _ = ddp_resumed_from_dpkfac
    assert code == 0, output[-3000:]
    assert "Please add the following callbacks" not in output


def test_resuming_a_ddp_checkpoint_with_dpkfac_says_kfac_starts_fresh(ddp_resumed_from_dpkfac, tmp_path: Path) -> None:
    _, _, ddp_checkpoint = ddp_resumed_from_dpkfac
    assert "lightning_dpkfac" not in torch.load(ddp_checkpoint, weights_only=True)
    code, output, _ = run_fit_digits("--devices", "2", "--epochs", "3", "--ckpt-dir", str(tmp_path / "kfac"),
                                     "--resume", str(ddp_checkpoint))
    assert code == 0, output[-3000:]
    assert output.count("The checkpoint holds no K-FAC state (it was saved with another strategy): K-FAC starts "
                        "fresh") == 1
