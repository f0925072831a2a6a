"""One Kronecker factor's captures between two factor updates, and their fold into the running average.

A capture is either a formed (d x d) matrix, or, for a batch with fewer rows than columns (a Linear on a
small batch), its rows ``r`` (n x d) and a weight ``w`` meaning ``w r^T r``: n x d numbers instead of d^2,
folded later with one fused product ``F <- beta F + alpha r^T r`` (no d x d temporary, no separate pass
for the running average). dpkfac keeps rows (only the owner folds its own captures); dkfac forms the
matrices, which it all-reduces.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchFactor:
    """The sum of one factor's captures since the last update: ``dense + sum_k w_k r_k^T r_k``.

    Kept rows never hold more numbers than the formed matrix would: once their row count reaches the
    number of columns they are formed into ``dense``.
    """

    def __init__(self) -> None:
        self.dense: Tensor | None = None
        self.rows: list[tuple[Tensor, float]] = []

    @classmethod
    def of(cls, matrix: Tensor) -> BatchFactor:
        """A sum holding the formed ``matrix``."""
        out = cls()
        out.dense = matrix
        return out

    def add(self, capture: Tensor, weight: float | None, keep_rows: bool) -> None:
        """Add a formed matrix (``weight`` None) or rows ``capture`` with ``weight`` (formed now unless
        ``keep_rows`` and the kept rows stay fewer than the columns)."""
        if weight is None:
            self.dense = capture if self.dense is None else self.dense.add_(capture)
            return
        self.rows.append((capture, weight))
        if not keep_rows or sum(r.shape[0] for r, _ in self.rows) >= capture.shape[1]:
            self.dense = self.formed()
            self.rows = []

    @property
    def empty(self) -> bool:
        return self.dense is None and not self.rows

    def nbytes(self) -> int:
        tensors = ([self.dense] if self.dense is not None else []) + [r for r, _ in self.rows]
        return sum(t.numel() * t.element_size() for t in tensors)

    def all_finite(self) -> Tensor:
        """0-d bool: the sum is finite. A Gram matrix is finite iff its diagonal is (|F_ij| <= sqrt(F_ii F_jj)),
        and the diagonal of ``r^T r`` sums to ``sum(r^2)``: d or n d numbers checked, not d^2. A sum beyond
        the dtype's range reads as non-finite, which errs on the safe side."""
        checks = [torch.isfinite(self.dense.diagonal().sum())] if self.dense is not None else []
        checks += [torch.isfinite(r.square().sum()) for r, _ in self.rows]
        return torch.stack(checks).all()

    def formed(self) -> Tensor:
        """The sum as one (d x d) matrix (reusing ``dense``)."""
        out = self.dense
        for r, w in self.rows:
            out = r.T @ (r * w) if out is None else out.addmm_(r.T, r, alpha=w)
        assert out is not None, "an empty BatchFactor has no matrix"
        return out

    def fold_into(self, running: Tensor | None, scale: float, decay: float) -> Tensor:
        """``decay * running + (1 - decay) * scale * sum`` (``running`` updated in place), or
        ``scale * sum`` when there is no running average yet."""
        if running is None:
            out = self.formed()
            return out if scale == 1 else out.mul_(scale)
        beta = decay
        if self.dense is not None:
            running.lerp_(self.dense if scale == 1 else self.dense.mul_(scale), 1 - decay)  # one pass
            beta = 1.0
        for r, w in self.rows:
            running.addmm_(r.T, r, beta=beta, alpha=(1 - decay) * scale * w)
            beta = 1.0
        return running
