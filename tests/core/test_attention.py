"""``nn.MultiheadAttention`` under K-FAC: a packed self-attention module's q/k/v projection is one
``Linear(E, 3E)`` on the input and its ``out_proj`` a ``Linear(E, E)`` on the attention output, each
preconditioned exactly as those explicit Linear layers; the module computes what it computed before."""

from __future__ import annotations

import copy
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


class ExplicitAttention(nn.Module):
    """The attention of an ``nn.MultiheadAttention`` (batch_first) written from its formula, with its projections
    as ``nn.Linear`` modules: ``in_proj`` (E -> 3E) for self-attention, ``q_proj``, ``k_proj``, ``v_proj`` (E -> E,
    rows of the packed weight) for cross-attention, and ``out_proj``. Same call signature and result."""

    def __init__(self, attention: nn.MultiheadAttention, cross: bool) -> None:
        super().__init__()
        bias = attention.in_proj_bias is not None
        b = attention.in_proj_bias
        if attention._qkv_same_embed_dim:
            weight = attention.in_proj_weight.detach()
            weights = {"q_proj": weight[:E], "k_proj": weight[E:2 * E], "v_proj": weight[2 * E:]} if cross \
                else {"in_proj": weight}
        else:
            weights = {f"{p}_proj": getattr(attention, f"{p}_proj_weight").detach() for p in "qkv"}
        for i, (name, weight) in enumerate(weights.items()):
            rows = slice(i * E, i * E + weight.shape[0])
            setattr(self, name, _linear(weight, None if b is None else b.detach()[rows]))
        self.out_proj = _linear(attention.out_proj.weight.detach(),
                                attention.out_proj.bias.detach() if bias else None)
        self.cross = cross

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = False,
                is_causal: bool = False) -> tuple[Tensor, None]:
        def heads(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], t.shape[1], HEADS, E // HEADS).transpose(1, 2)

        if self.cross:
            q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        else:
            q, k, v = (heads(t) for t in self.in_proj(query).chunk(3, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // HEADS)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], E)
        return self.out_proj(out), None


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class _ExplicitWrapper(nn.Module):
    """``SelfAttention`` with its ``nn.MultiheadAttention`` written out (batch_first inputs)."""

    def __init__(self, wrapper: SelfAttention) -> None:
        super().__init__()
        self.attn = ExplicitAttention(wrapper.attn, cross=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))[0]


def _model(batch_first: bool = True, bias: bool = True, need_weights: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(SelfAttention(batch_first, bias, need_weights), nn.Tanh(), nn.Flatten(),
                         nn.Linear(L * E, 3)).double()


def _explicit(model: nn.Sequential) -> nn.Sequential:
    explicit = nn.Sequential(_ExplicitWrapper(model[0]), nn.Tanh(), nn.Flatten(),
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
    attn = model[0].attn

    def batches(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(step)
        return torch.randn(B, L, E, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)

    def got() -> dict[str, Tensor]:
        return {"0.attn.in_proj": _in_proj_grad(attn), "0.attn.out_proj": ref.grad_matrix(attn.out_proj),
                "3": ref.grad_matrix(model[3])}

    ref.train_against_explicit(model, pre, _explicit, {n: n for n in pre.schedule()}, batches, got, hp)


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


S = 3  # memory positions of the decoder tests


class Decoder(nn.Module):
    """An ``nn.TransformerDecoderLayer`` (batch_first, causal) on a (B, L + S, E) input: the first L positions are
    the target, the last S the memory; then a classifier head."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(L * E, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        target, memory = x[:, :L], x[:, L:]
        out = self.layer(target, memory, tgt_mask=torch.ones(L, L, dtype=torch.bool).triu(1))
        return self.head(out.flatten(1))


def _decoder() -> Decoder:
    torch.manual_seed(2)
    return Decoder(nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True, dtype=torch.float64))


def _explicit_decoder(model: Decoder) -> Decoder:
    explicit = copy.deepcopy(model)
    explicit.layer.self_attn = ExplicitAttention(model.layer.self_attn, cross=False)
    explicit.layer.multihead_attn = ExplicitAttention(model.layer.multihead_attn, cross=True)
    return explicit


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_cross_attention_is_three_linear_layers_each_preconditioned_exactly(method: str) -> None:
    model = _decoder()
    hp = dict(damping=1e-2, factor_decay=0.8, kl_clip=1e-3, lr=0.1, factor_update_steps=1, inv_update_steps=2,
              method=method)
    pre = KFACPreconditioner(model, **hp)
    names = [l.name for l in pre.layers]
    assert names == ["layer.self_attn.in_proj", "layer.self_attn.out_proj", "layer.multihead_attn.q_proj",
                     "layer.multihead_attn.k_proj", "layer.multihead_attn.v_proj", "layer.multihead_attn.out_proj",
                     "layer.linear1", "layer.linear2", "head"]
    assert [(l.d_g, l.d_a) for l in pre.layers[2:5]] == [(E, E + 1)] * 3
    modules = dict(model.named_modules())

    def batches(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(step)
        return torch.randn(B, L + S, E, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)

    def got() -> dict[str, Tensor]:
        cross = model.layer.multihead_attn
        packed = torch.cat([cross.in_proj_weight.grad, cross.in_proj_bias.grad[:, None]], 1)
        out = {f"layer.multihead_attn.{p}_proj": packed[i * E:(i + 1) * E] for i, p in enumerate("qkv")}
        out["layer.self_attn.in_proj"] = _in_proj_grad(model.layer.self_attn)
        return {n: out[n] if n in out else ref.grad_matrix(modules[n]) for n in names}

    ref.train_against_explicit(model, pre, _explicit_decoder, {n: n for n in names}, batches, got, hp)


def test_a_decoder_layer_computes_what_it_computed_before() -> None:
    model = _decoder()
    original = copy.deepcopy(model)
    pre = KFACPreconditioner(model, lr=0.1)
    x = torch.randn(B, L + S, E, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-10, atol=1e-12)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -1] = True
    target, memory = x[:, :L], x[:, L:]
    for need_weights in (True, False):
        out, weights = model.layer.multihead_attn(target, memory, memory, key_padding_mask=padding,
                                                  need_weights=need_weights)
        out_ref, weights_ref = original.layer.multihead_attn(target, memory, memory, key_padding_mask=padding,
                                                             need_weights=need_weights)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        assert (weights is None) == (weights_ref is None)
        if weights is not None:
            torch.testing.assert_close(weights, weights_ref, rtol=1e-10, atol=1e-12)
    pre.remove_hooks()
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.MultiheadAttention))


def test_self_attention_called_with_different_inputs_is_named_with_the_fix() -> None:
    attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
    KFACPreconditioner(attn, lr=0.1)
    x = torch.randn(B, L, E)
    with pytest.raises(UnsupportedLayerError, match=r"'' is preconditioned by K-FAC as self-attention.*skip_layers"):
        attn(x, x.clone(), x.clone())


KDIM = 4


class KeyValueAttention(nn.Module):
    """Attention whose key and value have ``KDIM`` features (separate q/k/v weights), on a (B, L, E + KDIM)
    input: query from the first E features, key and value from the rest."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn = attention

    def forward(self, x: Tensor) -> Tensor:
        key_value = x[..., E:]
        return self.attn(x[..., :E], key_value, key_value)[0]


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_separate_qkv_weights_are_three_linear_layers_each_preconditioned_exactly(method: str) -> None:
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(E, HEADS, kdim=KDIM, vdim=KDIM, batch_first=True, dtype=torch.float64)
    model = nn.Sequential(KeyValueAttention(attention), nn.Tanh(), nn.Flatten(),
                          nn.Linear(L * E, 3, dtype=torch.float64))
    hp = dict(damping=1e-2, factor_decay=0.8, kl_clip=1e-3, lr=0.1, factor_update_steps=1, inv_update_steps=2,
              method=method)
    pre = KFACPreconditioner(model, **hp)
    names = [l.name for l in pre.layers]
    assert names == ["0.attn.q_proj", "0.attn.k_proj", "0.attn.v_proj", "0.attn.out_proj", "3"]
    assert [(l.d_g, l.d_a) for l in pre.layers[:3]] == [(E, E + 1), (E, KDIM + 1), (E, KDIM + 1)]

    def explicit(net: nn.Sequential) -> nn.Sequential:
        out = copy.deepcopy(net)
        out[0].attn = ExplicitAttention(net[0].attn, cross=True)
        return out

    def batches(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(step)
        return torch.randn(B, L, E + KDIM, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)

    def got() -> dict[str, Tensor]:
        bias = attention.in_proj_bias.grad
        out = {f"0.attn.{p}_proj": torch.cat([getattr(attention, f"{p}_proj_weight").grad,
                                               bias[i * E:(i + 1) * E, None]], 1) for i, p in enumerate("qkv")}
        return {**out, "0.attn.out_proj": ref.grad_matrix(attention.out_proj), "3": ref.grad_matrix(model[3])}

    ref.train_against_explicit(model, pre, explicit, {n: n for n in names}, batches, got, hp)
    assert "0.attn.q_proj_weight" not in pre.plain and "in_proj_bias" not in " ".join(pre.plain)


def test_attention_with_add_bias_kv_is_left_plain_with_its_reason() -> None:
    attn = nn.MultiheadAttention(E, HEADS, add_bias_kv=True, batch_first=True)
    pre = KFACPreconditioner(nn.Sequential(attn), lr=0.1)
    assert pre.layers == [] and "add_bias_kv" in pre.skipped["0"]
    assert "add_bias_kv" in pre.plain["0.in_proj_weight"] and "0.out_proj" in pre.skipped


def test_attention_in_skip_layers_keeps_its_own_forward_and_plain_gradients() -> None:
    model = nn.Sequential(SelfAttention(True, True, False)).double()
    pre = KFACPreconditioner(model, lr=0.1, skip_layers=["MultiheadAttention"])
    assert pre.layers == [] and "forward" not in model[0].attn.__dict__
    assert pre.skipped["0.attn"] == "in skip_layers"
