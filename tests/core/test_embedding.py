"""``nn.Embedding`` under K-FAC: preconditioned exactly as the ``nn.Linear(V, E, bias=False)`` on one-hot tokens
that it equals, with ``A`` kept as its diagonal (V numbers, never V x V)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac_reference as ref
from lightning_dpkfac import KFACPreconditioner, UnsupportedLayerError

V, E, T, B = 11, 6, 4, 5


class OneHot(nn.Module):
    def forward(self, ids: Tensor) -> Tensor:
        return F.one_hot(ids, V).to(torch.float64)


def _model(padding_idx: int | None = 0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, E, padding_idx=padding_idx, dtype=torch.float64), nn.Tanh(), nn.Flatten(),
                         nn.Linear(T * E, 3, dtype=torch.float64))


def _explicit(model: nn.Sequential) -> nn.Sequential:
    """The same network with the embedding as a Linear(V, E, bias=False) on one-hot tokens."""
    linear = nn.Linear(V, E, bias=False, dtype=torch.float64)
    head = nn.Linear(T * E, 3, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(model[0].weight.T)
        head.load_state_dict(model[3].state_dict())
    return nn.Sequential(nn.Sequential(OneHot(), linear), nn.Tanh(), nn.Flatten(), head)


@pytest.mark.parametrize("mode", ["dpkfac", "dkfac"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_an_embedding_is_preconditioned_exactly_as_its_linear_on_one_hot_tokens(method: str, mode: str) -> None:
    model = _model(padding_idx=None)  # a Linear knows no padding token
    hp = dict(damping=1e-2, factor_decay=0.8, kl_clip=1e-3, lr=0.1, factor_update_steps=1, inv_update_steps=2,
              method=method)
    pre = KFACPreconditioner(model, mode=mode, **hp)
    assert [(l.name, l.d_g, l.d_a) for l in pre.layers] == [("0", E, V), ("3", 3, T * E + 1)]

    def batches(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(step)
        return torch.randint(0, V, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)

    def got() -> dict[str, Tensor]:
        return {"0": model[0].weight.grad.T, "3": ref.grad_matrix(model[3])}

    ref.train_against_explicit(model, pre, _explicit, {"0": "0.1", "3": "3"}, batches, got, hp)


def test_a_is_the_token_frequencies_as_a_vector_and_padding_keeps_a_zero_gradient() -> None:
    model = _model(padding_idx=2)
    pre = KFACPreconditioner(model, lr=0.1, factor_update_steps=1)
    ids = torch.tensor([[1, 1, 2, 3]] * B)
    F.cross_entropy(model(ids), torch.zeros(B, dtype=torch.long)).backward()
    pre.step()
    A, G = pre.factors("0")
    assert A.shape == (V,) and G.shape == (E, E)
    expected = torch.zeros(V, dtype=A.dtype)
    expected[[1, 2, 3]] = torch.tensor([2.0, 1.0, 1.0], dtype=A.dtype) / T
    torch.testing.assert_close(A, expected)
    assert torch.equal(model[0].weight.grad[2], torch.zeros(E, dtype=torch.float64))
    assert model[0].weight.grad[1].abs().sum() > 0
    assert "0                                        Embedding A    11 (diagonal)" in pre.describe()


def test_an_embedding_tied_to_a_linear_head_is_preconditioned_as_the_head() -> None:
    embed, head = nn.Embedding(V, E), nn.Linear(E, V, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    pre = KFACPreconditioner(model, lr=0.1)
    assert [l.name for l in pre.layers] == ["1"]
    assert "weight tied with the Linear '1'" in pre.skipped["0"]
    assert "weight tied with 0.weight" in pre.describe()
    F.cross_entropy(model(torch.randint(0, V, (B, T))).flatten(0, 1), torch.randint(0, V, (B * T,))).backward()
    pre.step()


def test_a_sparse_embedding_is_refused_with_the_fix() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"'0' is an nn.Embedding with sparse=True.*skip_layers"):
        KFACPreconditioner(nn.Sequential(nn.Embedding(V, E, sparse=True)), lr=0.1)


def test_a_large_vocabulary_is_never_cut_into_blocks() -> None:
    model = nn.Sequential(nn.Embedding(5000, 8), nn.Linear(8, 2))
    pre = KFACPreconditioner(model, lr=0.1, max_factor_dim=64)
    assert [(l.name, l.d_a) for l in pre.layers] == [("0", 5000), ("1", 9)]
