"""``nn.MultiheadAttention`` under K-FAC: a packed self-attention module's q/k/v projection is one
``Linear(E, 3E)`` on the input and its ``out_proj`` a ``Linear(E, E)`` on the attention output, each
preconditioned exactly as those explicit Linear layers; the module computes what it computed before."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kfac_reference as ref
from lightning_dpkfac import KFACPreconditioner, UnsupportedLayerError

E, HEADS, L, B = 8, 2, 5, 4


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` on one input, causal, as a layer of a Sequential."""

    def __init__(self, batch_first: bool, bias: bool, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.attn.batch_first else x.transpose(0, 1)
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        out = self.attn(x, x, x, attn_mask=mask, need_weights=self.need_weights)[0]
        return out if self.attn.batch_first else out.transpose(0, 1)


class ExplicitSelfAttention(nn.Module):
    """The same attention written from its formula, with the two projections as ``nn.Linear`` modules."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        bias = attention.in_proj_bias is not None
        self.in_proj = nn.Linear(E, 3 * E, bias=bias).to(attention.in_proj_weight.dtype)
        self.out_proj = nn.Linear(E, E, bias=bias).to(attention.in_proj_weight.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if bias:
                self.in_proj.bias.copy_(attention.in_proj_bias)
                self.out_proj.bias.copy_(attention.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:  # x (B, L, E)
        q, k, v = (t.reshape(B, L, HEADS, E // HEADS).transpose(1, 2) for t in self.in_proj(x).chunk(3, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // HEADS)
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, E)
        return self.out_proj(out)


def _model(batch_first: bool = True, bias: bool = True, need_weights: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(SelfAttention(batch_first, bias, need_weights), nn.Tanh(), nn.Flatten(),
                         nn.Linear(L * E, 3)).double()


def _explicit(model: nn.Sequential) -> nn.Sequential:
    explicit = nn.Sequential(ExplicitSelfAttention(model[0].attn), nn.Tanh(), nn.Flatten(),
                             nn.Linear(L * E, 3, dtype=torch.float64))
    explicit[3].load_state_dict(model[3].state_dict())
    return explicit


def _in_proj_grad(attn: nn.MultiheadAttention) -> Tensor:
    """``[dW | db]`` of the packed projection, (3E x E+1), or (3E x E) without a bias."""
    if attn.in_proj_bias is None:
        return attn.in_proj_weight.grad
    return torch.cat([attn.in_proj_weight.grad, attn.in_proj_bias.grad[:, None]], 1)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize(("batch_first", "bias", "need_weights"),
                         [(True, True, False), (False, True, True), (True, False, True), (False, False, False)])
def test_projections_are_preconditioned_exactly_as_their_explicit_linear_layers(
        method: str, batch_first: bool, bias: bool, need_weights: bool) -> None:
    model = _model(batch_first, bias, need_weights)
    hp = dict(damping=1e-2, factor_decay=0.8, kl_clip=1e-3, lr=0.1, factor_update_steps=1, inv_update_steps=2,
              method=method)
    pre = KFACPreconditioner(model, **hp)
    assert [l.name for l in pre.layers] == ["0.attn.in_proj", "0.attn.out_proj", "3"]
    names = {"0.attn.in_proj": "0.in_proj", "0.attn.out_proj": "0.out_proj", "3": "3"}  # engine -> explicit
    dense = ref.ReferenceKFAC(slots={names[n]: s for n, s in pre.schedule().items()}, **hp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(B, L, E, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)
        explicit = _explicit(model)
        captured = ref.capture(lambda: _explicit(model), explicit, list(names.values()), x, y, F.cross_entropy)
        modules = dict(explicit.named_modules())
        dense.update({n: ref.batch_factors(modules[n], *captured[n]) for n in names.values()})
        F.cross_entropy(explicit(x), y).backward()
        expected = dense.precondition_all({n: ref.grad_matrix(modules[n]) for n in names.values()})
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        attn = model[0].attn
        torch.testing.assert_close(_in_proj_grad(attn), ref.grad_matrix(modules["0.in_proj"]), rtol=1e-10, atol=1e-12)
        pre.step()
        got = {"0.in_proj": _in_proj_grad(attn), "0.out_proj": ref.grad_matrix(attn.out_proj), "3": ref.grad_matrix(model[3])}
        for n, value in got.items():
            err = float((value - expected[n]).norm() / expected[n].norm())
            assert err < 1e-6, f"step {step}, {n}: relative error {err:.2e}"
        opt.step()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "per_head", "causal_hint"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_the_module_computes_what_it_computed_before(batch_first: bool, mask: str, need_weights: bool) -> None:
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    original = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    original.load_state_dict(attn.state_dict())
    pre = KFACPreconditioner(attn, lr=0.1)
    x = torch.randn(B, L, E, dtype=torch.float64) if batch_first else torch.randn(L, B, E, dtype=torch.float64)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -2:] = True
    masks = {"none": {}, "bool": {"attn_mask": causal, "key_padding_mask": padding},
             "float": {"attn_mask": torch.randn(L, L, dtype=torch.float64)},
             "per_head": {"attn_mask": torch.randn(B * HEADS, L, L, dtype=torch.float64)},
             "causal_hint": {"attn_mask": causal, "is_causal": True}}[mask]
    for average in (True, False):
        out, weights = attn(x, x, x, need_weights=need_weights, average_attn_weights=average, **masks)
        out_ref, weights_ref = original(x, x, x, need_weights=need_weights, average_attn_weights=average, **masks)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(weights, weights_ref, rtol=1e-10, atol=1e-12)
        else:
            assert weights is None and weights_ref is None
    unbatched = x[0] if batch_first else x[:, 0]
    torch.testing.assert_close(attn(unbatched, unbatched, unbatched)[0],
                               original(unbatched, unbatched, unbatched)[0], rtol=1e-10, atol=1e-12)
    pre.remove_hooks()
    assert "forward" not in attn.__dict__, "remove_hooks restores nn.MultiheadAttention's own forward"
    assert list(attn.state_dict()) == list(original.state_dict())


def test_every_weight_of_a_transformer_encoder_but_the_norms_is_covered_by_default() -> None:
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(L * E, 3))
    pre = KFACPreconditioner(model, lr=0.1)
    covered = {id(p) for l in pre.layers for p in l.params()}
    left = [name for name, p in model.named_parameters() if id(p) not in covered]
    assert left and all(".norm" in name for name in left), left
    assert "0.layers.0.self_attn.in_proj" in pre.describe()
    x, y = torch.randn(B, L, E), torch.randint(0, 3, (B,))
    F.cross_entropy(model(x), y).backward()  # dropout on: the training path
    pre.step()
    assert all(pre.factors(l.name) is not None for l in pre.layers)


def test_cross_attention_is_left_plain_with_its_reason_and_a_misuse_is_named() -> None:
    decoder = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
    pre = KFACPreconditioner(decoder, lr=0.1)
    assert "self_attn.in_proj" in [l.name for l in pre.layers]
    assert "cross-attention" in pre.skipped["multihead_attn"]
    assert "cross-attention" in pre.plain["multihead_attn.in_proj_weight"]
    assert "multihead_attn.out_proj" in pre.skipped
    attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
    KFACPreconditioner(attn, lr=0.1)
    x = torch.randn(B, L, E)
    with pytest.raises(UnsupportedLayerError, match=r"'' is preconditioned by K-FAC as self-attention.*skip_layers"):
        attn(x, x.clone(), x.clone())


def test_attention_in_skip_layers_keeps_its_own_forward_and_plain_gradients() -> None:
    model = nn.Sequential(SelfAttention(True, True, False)).double()
    pre = KFACPreconditioner(model, lr=0.1, skip_layers=["MultiheadAttention"])
    assert pre.layers == [] and "forward" not in model[0].attn.__dict__
    assert pre.skipped["0.attn"] == "in skip_layers"
