"""How a layer's factors become its preconditioner: ``Eigen`` (eigendecompositions, damping on the Kronecker
eigenvalues) or ``Inverse`` (damped inverses of each factor), behind one interface.

Both precondition a gradient matrix ``grad`` (d_g x d_a) as ``P = left @ right``:

- eigen:   ``P = Q_G ((Q_G^T grad Q_A) / (dg da^T + damping)) Q_A^T``;
- inverse: ``P = (G + damping I)^-1 grad (A + damping I)^-1``;

and, for row gathering (``grad = g^T a`` never formed, ``a`` R x d_a and ``g`` R x d_g), in factored form
with ``sum(P * grad)`` from N x N products (see :mod:`lightning_dpkfac.distributed.rows`).

A diagonal ``A`` (an ``nn.Embedding``'s token frequencies) is a vector of d_a numbers, and so is every A-side
tensor derived from it (``qa``: the identity's diagonal, ones; ``a_inv``): multiplying by it scales columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

Shape = tuple[int, ...]


class Decomposition(ABC):
    """One method: what it computes from the factors, what it keeps, and how it preconditions."""

    name: ClassVar[str]
    #: the tensors a layer keeps (its checkpoint names)
    keys: ClassVar[tuple[str, ...]]

    @abstractmethod
    def compute(self, A: Tensor, G: Tensor, damping: float, jitter: float) -> tuple[Tensor, ...]:
        """The decomposition of ``A + jitter I`` and ``G + jitter I`` (what dkfac broadcasts), shaped
        :meth:`wire_shapes`."""

    @abstractmethod
    def wire_shapes(self, d_a: int, d_g: int, diagonal_a: bool = False) -> list[Shape]:
        """Shapes of :meth:`compute`'s result."""

    @abstractmethod
    def keep(self, result: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """The tensors kept from a :meth:`compute` result, shaped :meth:`kept_shapes`."""

    @abstractmethod
    def kept_shapes(self, d_a: int, d_g: int, diagonal_a: bool = False) -> dict[str, Shape]:
        """Shapes of :meth:`keep`'s tensors, by key."""

    @abstractmethod
    def factored(self, kept: dict[str, Tensor], grad: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ``P = left @ right`` for the gradient matrix ``grad``."""

    @abstractmethod
    def factored_rows(self, kept: dict[str, Tensor], a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(left, right, sum(P * grad))`` for ``grad = g^T a``, without forming ``grad``."""


class Eigen(Decomposition):
    name = "eigen"
    keys = ("qa", "qg", "dgda")

    def compute(self, A: Tensor, G: Tensor, damping: float, jitter: float) -> tuple[Tensor, ...]:
        da, qa = (A + jitter, torch.ones_like(A)) if A.dim() == 1 else torch.linalg.eigh(A + jitter * _eye(A))
        dg, qg = torch.linalg.eigh(G + jitter * _eye(G))
        # Round-off can make eigenvalues of these PSD matrices slightly negative: clip at zero.
        return qa, qg, dg.clamp_(min=0), da.clamp_(min=0)

    def wire_shapes(self, d_a: int, d_g: int, diagonal_a: bool = False) -> list[Shape]:
        qa = (d_a,) if diagonal_a else (d_a, d_a)
        return [qa, (d_g, d_g), (d_g,), (d_a,)]  # eigenvalue vectors, not their d_g x d_a product

    def keep(self, result: tuple[Tensor, ...]) -> dict[str, Tensor]:
        qa, qg, dg, da = result
        return {"qa": qa, "qg": qg, "dgda": torch.outer(dg, da)}

    def kept_shapes(self, d_a: int, d_g: int, diagonal_a: bool = False) -> dict[str, Shape]:
        return {"qa": (d_a,) if diagonal_a else (d_a, d_a), "qg": (d_g, d_g), "dgda": (d_g, d_a)}

    def factored(self, kept: dict[str, Tensor], grad: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        qa = kept["qa"]
        v = times_a(kept["qg"].T @ grad, qa)
        return kept["qg"] @ (v / (kept["dgda"] + damping)), qa if qa.dim() == 1 else qa.T

    def factored_rows(self, kept: dict[str, Tensor], a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        # In the eigenbasis sum(P * grad) = sum(v^2 / (dg da + damping)).
        v = (g @ kept["qg"]).T @ (a @ kept["qa"])
        scaled = v / (kept["dgda"] + damping)
        return kept["qg"] @ scaled, kept["qa"].T, torch.dot(scaled.reshape(-1), v.reshape(-1))


class Inverse(Decomposition):
    name = "inverse"
    keys = ("a_inv", "g_inv")

    def compute(self, A: Tensor, G: Tensor, damping: float, jitter: float) -> tuple[Tensor, ...]:
        a_inv = 1 / (A + damping + jitter) if A.dim() == 1 else _spd_inverse(A + (damping + jitter) * _eye(A))
        return a_inv, _spd_inverse(G + (damping + jitter) * _eye(G))

    def wire_shapes(self, d_a: int, d_g: int, diagonal_a: bool = False) -> list[Shape]:
        return [(d_a,) if diagonal_a else (d_a, d_a), (d_g, d_g)]

    def keep(self, result: tuple[Tensor, ...]) -> dict[str, Tensor]:
        a_inv, g_inv = result
        return {"a_inv": a_inv, "g_inv": g_inv}

    def kept_shapes(self, d_a: int, d_g: int, diagonal_a: bool = False) -> dict[str, Shape]:
        return {"a_inv": (d_a,) if diagonal_a else (d_a, d_a), "g_inv": (d_g, d_g)}

    def factored(self, kept: dict[str, Tensor], grad: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        return kept["g_inv"] @ grad, kept["a_inv"]

    def factored_rows(self, kept: dict[str, Tensor], a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        # P = U V with U = G^-1 g^T, V = a A^-1, and sum(P * grad) = sum((g U) * (a V^T)).
        left, right = kept["g_inv"] @ g.T, a @ kept["a_inv"]
        return left, right, torch.dot((g @ left).reshape(-1), (a @ right.T).reshape(-1))


def decomposition_for(method: str) -> Decomposition:
    """The :class:`Decomposition` of ``KFACConfig.method`` (one of ``core.config.METHODS``)."""
    return {cls.name: cls for cls in (Eigen, Inverse)}[method]()


def times_a(m: Tensor, a_side: Tensor) -> Tensor:
    """``m @ a_side``, where a vector ``a_side`` is a diagonal matrix (its columns scaled)."""
    return m * a_side if a_side.dim() == 1 else m @ a_side


def _eye(m: Tensor) -> Tensor:
    return torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def _spd_inverse(m: Tensor) -> Tensor:
    """The inverse of a symmetric positive-definite matrix: through Cholesky (half the work of LU), or LU
    if round-off made ``m`` numerically indefinite."""
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        return torch.linalg.inv(m)
    return torch.cholesky_inverse(factor)
