"""A factor's captures between updates (``factors.BatchFactor``): rows kept while they are fewer than the
columns, deferred captures formed when first needed, and folded into the running average exactly as the
formed matrices would be."""

from __future__ import annotations

import pytest
import torch

from lightning_dpkfac.core.factors import BatchFactor, DeferredFactor

D = 6


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rows_are_kept_while_fewer_than_the_columns_then_formed() -> None:
    batch = BatchFactor()
    batch.add(rows(2, 0), 0.5, keep_rows=True)
    batch.add(rows(3, 1), 0.5, keep_rows=True)
    assert batch.dense is None and sum(t.numel() for t in batch.held()) == 5 * D
    batch.add(rows(1, 2), 0.5, keep_rows=True)  # 6 rows: no smaller than the formed 6 x 6 matrix
    assert batch.rows == [] and batch.dense is not None and sum(t.numel() for t in batch.held()) == D * D


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


def deferred(source: torch.Tensor, calls: list[int] | None = None) -> DeferredFactor:
    """A deferred mean outer product of the rows of ``source``, counting its builds in ``calls``."""

    def build() -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        return source.T @ source / source.shape[0]

    return DeferredFactor(source, build, "layer")


def test_a_deferred_capture_holds_its_input_until_the_fold_forms_it() -> None:
    x, calls = rows(20, 0), []
    batch = BatchFactor()
    batch.add(deferred(x, calls), None, keep_rows=True)
    assert calls == [] and batch.held() == [x] and not batch.empty
    previous = torch.eye(D, dtype=torch.float64)
    folded = batch.fold_into(previous.clone(), 1.0, 0.9)
    assert calls == [1]
    torch.testing.assert_close(folded, 0.9 * previous + 0.1 * x.T @ x / 20, rtol=1e-12, atol=1e-12)


def test_a_second_capture_forms_the_deferred_one_first() -> None:
    x, y, calls = rows(20, 0), rows(30, 1), []
    batch = BatchFactor()
    batch.add(deferred(x, calls), None, keep_rows=True)
    batch.add(deferred(y, calls), None, keep_rows=True)
    assert calls == [1] and batch.deferred is not None and batch.deferred.source is y  # one input held at most
    torch.testing.assert_close(batch.formed(), x.T @ x / 20 + y.T @ y / 30, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("bad", "dtype"), [(float("inf"), torch.float64), (float("nan"), torch.float64),
                                            (1e20, torch.float32)])  # 1e20 is finite, its square overflows
def test_a_deferred_capture_is_checked_for_finiteness_on_its_input_without_forming_it(bad: float,
                                                                                      dtype: torch.dtype) -> None:
    x, calls = rows(20, 0).to(dtype), []
    x[3, 2] = bad
    batch = BatchFactor()
    batch.add(deferred(x, calls), None, keep_rows=True)
    assert not bool(batch.all_finite()) and calls == []
    ok = BatchFactor()
    ok.add(deferred(rows(20, 0)), None, keep_rows=True)
    assert bool(ok.all_finite())


def test_an_input_modified_in_place_before_its_factor_is_formed_is_an_error() -> None:
    x = rows(20, 0)
    batch = BatchFactor()
    batch.add(deferred(x), None, keep_rows=True)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="K-FAC layer 'layer' was modified in place"):
        batch.formed()
