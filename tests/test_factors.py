"""A factor's captures between updates (``factors.BatchFactor``): rows kept while they are fewer than the
columns, and folded into the running average exactly as the formed matrices would be."""

from __future__ import annotations

import pytest
import torch

from lightning_dpkfac.factors import BatchFactor

D = 6


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rows_are_kept_while_fewer_than_the_columns_then_formed() -> None:
    batch = BatchFactor()
    batch.add(rows(2, 0), 0.5, keep_rows=True)
    batch.add(rows(3, 1), 0.5, keep_rows=True)
    assert batch.dense is None and batch.nbytes() == 5 * D * 8
    batch.add(rows(1, 2), 0.5, keep_rows=True)  # 6 rows: no smaller than the formed 6 x 6 matrix
    assert batch.rows == [] and batch.dense is not None and batch.nbytes() == D * D * 8


def test_without_keep_rows_every_capture_is_formed_at_once() -> None:
    batch = BatchFactor()
    batch.add(rows(2, 0), 0.5, keep_rows=False)
    assert batch.rows == [] and batch.dense.shape == (D, D)


@pytest.mark.parametrize("running", [False, True])
def test_fold_equals_the_running_average_of_the_formed_sum(running: bool) -> None:
    captures = [(rows(2, 0), 0.5, None), (rows(3, 1), 2.0, None)]
    dense = rows(9, 2).T @ rows(9, 2)
    batch = BatchFactor()
    batch.add(dense.clone(), None, keep_rows=True)
    for r, w, _ in captures:
        batch.add(r, w, keep_rows=True)
    explicit = dense + sum(w * r.T @ r for r, w, _ in captures)
    previous = rows(8, 3).T @ rows(8, 3)
    scale, decay = 0.25, 0.9
    folded = batch.fold_into(previous.clone() if running else None, scale, decay)
    expected = decay * previous + (1 - decay) * scale * explicit if running else scale * explicit
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-12)


def test_rows_only_fold_starts_from_the_decayed_running_average() -> None:
    batch = BatchFactor()
    r = rows(2, 0)
    batch.add(r, 3.0, keep_rows=True)
    previous = torch.eye(D, dtype=torch.float64)
    folded = batch.fold_into(previous.clone(), 1.0, 0.8)
    torch.testing.assert_close(folded, 0.8 * previous + 0.2 * 3.0 * r.T @ r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e200])
def test_a_non_finite_or_overflowing_capture_is_reported(bad: float) -> None:
    batch = BatchFactor()
    r = rows(2, 0)
    r[1, 3] = bad
    batch.add(r, 1.0, keep_rows=True)
    assert not bool(batch.all_finite())
    ok = BatchFactor()
    ok.add(rows(2, 0), 1.0, keep_rows=True)
    assert bool(ok.all_finite())
