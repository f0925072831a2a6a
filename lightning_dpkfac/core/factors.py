"""One Kronecker factor's captures between two factor updates, and their fold into the running average.

A capture is either a formed (d x d) matrix, or, for a batch with fewer rows than columns (a Linear on a
small batch), its rows ``r`` (n x d) and a weight ``w`` meaning ``w r^T r``: n x d numbers instead of d^2,
folded later with one fused product ``F <- beta F + alpha r^T r`` (no d x d temporary, no separate pass
for the running average). dpkfac keeps rows (only the owner folds its own captures); dkfac forms the
matrices, which it all-reduces.

A capture whose rows are larger than the layer input (a convolution's im2col patches) can also be
*deferred*: a :class:`DeferredFactor` holds the layer input, which autograd keeps until the layer's
backward anyway, and forms the matrix when it is first needed. dpkfac's owners then build their factors
inside ``step()`` while the other owners' preconditioned gradients are on the wire
(``KFACPreconditioner``), instead of in the forward pass, where every other rank would wait for them at
the next gradient reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def keeps_as_rows(rows: int, columns: int) -> bool:
    """Whether ``rows`` captured rows of a factor of size ``columns`` are kept as rows (fewer numbers than
    the formed matrix) rather than formed."""
    return rows < columns


@dataclass
class DeferredFactor:
    """A (d x d) factor that ``build()`` forms from ``source`` (a layer input) when it is needed.

    ``build`` must read nothing but ``source``, and what it forms must satisfy ``|F_ij| <= c sum(source^2)``
    for a small constant ``c``, so that :meth:`BatchFactor.all_finite` can check ``source`` instead of the
    matrix. A mean of input outer products does: each input element appears at most once per column of
    a convolution's patches with zero padding, and a few times with reflect, replicate or circular padding.
    """

    source: Tensor
    build: Callable[[], Tensor]
    what: str  # the layer, for the error message
    version: int = field(init=False)

    def __post_init__(self) -> None:
        self.version = self.source._version

    def formed(self) -> Tensor:
        if self.source._version != self.version:
            raise RuntimeError(
                f"The input of K-FAC layer '{self.what}' was modified in place after its forward pass, before "
                "KFACPreconditioner.step() built its factor from it. Fix: do not modify layer inputs in place "
                "between forward and the optimizer step (e.g. clone a reused input buffer), or add the layer to "
                "skip_layers."
            )
        return self.build()


class BatchFactor:
    """The sum of one factor's captures since the last update: ``dense + sum_k w_k r_k^T r_k``.

    Kept rows never hold more numbers than the formed matrix would: once their row count reaches the
    number of columns they are formed into ``dense``.
    """

    def __init__(self) -> None:
        self.dense: Tensor | None = None
        self.rows: list[tuple[Tensor, float]] = []
        self.deferred: DeferredFactor | None = None  # at most one: a later capture forms it first

    @classmethod
    def of(cls, matrix: Tensor) -> BatchFactor:
        """A sum holding the formed ``matrix``."""
        out = cls()
        out.dense = matrix
        return out

    def add(self, capture: Tensor | DeferredFactor, weight: float | None, keep_rows: bool) -> None:
        """Add a formed matrix or a :class:`DeferredFactor` (``weight`` None), or rows ``capture`` with
        ``weight`` (formed now unless ``keep_rows`` and the kept rows stay fewer than the columns). A
        deferred capture already held is formed first, so at most one layer input is held (gradient
        accumulation, shared layers)."""
        self._form_deferred()
        if isinstance(capture, DeferredFactor):
            self.deferred = capture
            return
        if weight is None:
            self.dense = capture if self.dense is None else self.dense.add_(capture)
            return
        self.rows.append((capture, weight))
        if not keep_rows or not keeps_as_rows(sum(r.shape[0] for r, _ in self.rows), capture.shape[1]):
            self.dense = self.formed()
            self.rows = []

    def _form_deferred(self) -> None:
        if self.deferred is not None:
            matrix = self.deferred.formed()
            self.dense = matrix if self.dense is None else self.dense.add_(matrix)
            self.deferred = None

    @property
    def empty(self) -> bool:
        return self.dense is None and not self.rows and self.deferred is None

    def held(self) -> list[Tensor]:
        """The tensors this sum keeps alive: the formed matrix, kept rows and a deferred layer input."""
        deferred = [self.deferred.source] if self.deferred is not None else []
        return ([self.dense] if self.dense is not None else []) + [r for r, _ in self.rows] + deferred

    def all_finite(self) -> Tensor:
        """0-d bool: the sum is finite. A Gram matrix is finite iff its diagonal is (|F_ij| <= sqrt(F_ii F_jj)),
        and the diagonal of ``r^T r`` sums to ``sum(r^2)``: d or n d numbers checked, not d^2. A sum beyond
        the dtype's range reads as non-finite, which errs on the safe side."""
        dense = self.dense
        checks = [torch.isfinite((dense if dense.dim() == 1 else dense.diagonal()).sum())] if dense is not None else []
        checks += [torch.isfinite(r.square().sum()) for r, _ in self.rows]
        if self.deferred is not None:  # the bound of DeferredFactor; no pass at the matrix's size
            source = self.deferred.source
            norm = torch.linalg.vector_norm(source, dtype=torch.promote_types(source.dtype, torch.float32))
            checks.append(torch.isfinite(norm.square()))
        return torch.stack(checks).all()

    def formed(self) -> Tensor:
        """The sum as one (d x d) matrix (reusing ``dense``)."""
        self._form_deferred()
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
        self._form_deferred()
        beta = decay
        if self.dense is not None:
            running.lerp_(self.dense if scale == 1 else self.dense.mul_(scale), 1 - decay)  # one pass
            beta = 1.0
        for r, w in self.rows:
            running.addmm_(r.T, r, beta=beta, alpha=(1 - decay) * scale * w)
            beta = 1.0
        return running
