"""``python -m lightning_dpkfac.tools.linalg_timings``: one row per factor size, every operation timed, and
the factor it decomposes is a damped (symmetric positive-definite) one."""

from __future__ import annotations

import pytest
import torch

from lightning_dpkfac.tools.linalg_timings import OPERATIONS, main, spd_matrix


def test_prints_one_row_per_size_with_a_time_for_every_operation(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--sizes", "8", "16", "--reps", "1", "--device", "cpu"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0] == "| d | " + " | ".join(OPERATIONS) + " | eigh / (2 qr + 2 matmul) |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    assert [row[0] for row in rows] == ["8", "16"]
    assert all(float(value) > 0 for row in rows for value in row[1:])


def test_the_factor_is_a_damped_symmetric_positive_definite_matrix() -> None:
    f = spd_matrix(12, torch.device("cpu"), torch.float64)
    assert torch.equal(f, f.T)
    assert torch.linalg.eigvalsh(f).min() >= 0.1 - 1e-12  # X^T X / n is PSD, plus 0.1 I


@pytest.mark.parametrize("flags", [["--reps", "0"], ["--sizes", "1"]])
def test_invalid_repetitions_or_sizes_are_refused(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(flags)
    assert "reps >= 1 and every size >= 2" in capsys.readouterr().err
