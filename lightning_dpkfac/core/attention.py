"""``nn.MultiheadAttention`` as K-FAC layers: its projections become modules whose forward runs, so hooks see
their inputs and output gradients.

``nn.MultiheadAttention`` computes its q/k/v projection from ``in_proj_weight`` and its output projection from
``out_proj.weight`` inside ``F.multi_head_attention_forward``: no module forward runs for either. For a
self-attention module (query, key and value the same tensor, one packed ``in_proj_weight``) the engine
replaces the module's ``forward`` (:class:`SelfAttentionForward`) by the same computation written with

- :class:`InProjection`: ``Linear(E, 3E)`` on the input, whose weight and bias *are* ``in_proj_weight`` and
  ``in_proj_bias`` (a K-FAC layer like any Linear, cut by ``max_factor_dim`` like one);
- ``out_proj`` called as the ``nn.Linear`` it is, on the attention output;

and scaled dot-product attention between them, with the module's masks, dropout and attention weights.
The parameters, the state dict and the outputs stay the module's own (equal up to float round-off); removing
the engine's hooks restores the original ``forward``. Modules that are not packed self-attention
(cross-attention, ``kdim``/``vdim``, ``add_bias_kv``, ``add_zero_attn``) keep their plain gradient, with the
reason in ``describe()`` (:func:`unsupported_reason`).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpkfac.core.errors import UnsupportedLayerError


class InProjection(nn.Module):
    """The packed q/k/v projection of a self-attention module as a module: ``x (..., E) -> (..., 3E)``. It is
    not registered in the model (its parameters are the attention module's)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.weight = attention.in_proj_weight
        self.bias = attention.in_proj_bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def unsupported_reason(name: str, attention: nn.MultiheadAttention, parent: nn.Module | None) -> str | None:
    """Why K-FAC leaves ``attention`` (named ``name``, a child of ``parent``) to its plain gradient, or ``None``
    if it is packed self-attention that :class:`SelfAttentionForward` can run."""
    if isinstance(parent, nn.TransformerDecoderLayer) and attention is parent.multihead_attn:
        return "cross-attention (query from the target, key and value from the memory) is not covered yet"
    if not attention._qkv_same_embed_dim:
        return "separate q/k/v weights (kdim or vdim differs from embed_dim) are not covered yet"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "add_bias_kv and add_zero_attn are not covered"
    return None


class SelfAttentionForward:
    """The forward of a packed self-attention ``nn.MultiheadAttention``, through :class:`InProjection` and
    ``out_proj`` calls; set as the module's ``forward`` by :meth:`install`, with the same signature and
    results as ``nn.MultiheadAttention.forward``."""

    def __init__(self, name: str, attention: nn.MultiheadAttention) -> None:
        self.name = name
        self.attention = attention
        self.in_proj = InProjection(attention)

    def install(self) -> None:
        self.attention.forward = self  # an instance attribute: nn.Module.__call__ reads self.forward

    def remove(self) -> None:
        if self.attention.__dict__.get("forward") is self:
            del self.attention.forward

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                 need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                 is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        m = self.attention
        if not (query is key and key is value):
            raise UnsupportedLayerError(
                f"nn.MultiheadAttention '{self.name}' is preconditioned by K-FAC as self-attention (query, key and "
                "value the same tensor), but was called with different ones. Cross-attention is not covered yet. "
                f"Fix: add '{self.name}' to skip_layers (its projections then keep their plain gradient).")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        batched = query.dim() == 3
        x = query if batched else query.unsqueeze(0)  # unbatched (L, E) as (1, L, E)
        if not m.batch_first and batched:
            x = x.transpose(0, 1)  # (L, B, E) -> (B, L, E): K-FAC counts examples along the first dimension
        batch, length, embed = x.shape
        heads, head_dim = m.num_heads, embed // m.num_heads

        def split_heads(t: Tensor) -> Tensor:  # (B, L, E) -> (B, H, L, head_dim)
            return t.reshape(batch, length, heads, head_dim).transpose(1, 2)

        q, k, v = (split_heads(t) for t in self.in_proj(x).chunk(3, dim=-1))
        mask = _merged_mask(attn_mask, key_padding_mask, batch, heads, length, x.dtype)
        dropout = m.dropout if m.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p=dropout) @ v if dropout > 0 else weights @ v
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        out = m.out_proj(out.transpose(1, 2).reshape(batch, length, embed))  # a module call: hooks run
        if not m.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        return out, weights


def _as_additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True: not attended) as 0 / -inf in ``dtype``; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _merged_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int,
                 length: int, dtype: torch.dtype) -> Tensor | None:
    """``attn_mask`` ((L, L) or (B*H, L, L)) plus ``key_padding_mask`` ((B, L), True: padding), additive,
    broadcastable to (B, H, L, L)."""
    mask = _as_additive(attn_mask, dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(batch, heads, length, length)
    padding = _as_additive(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, length)
        mask = padding if mask is None else mask + padding
    return mask


def self_attention_forwards(model: nn.Module, skip: list[str]) -> tuple[dict[str, SelfAttentionForward],
                                                                        dict[str, str]]:
    """The :class:`SelfAttentionForward` of every covered ``nn.MultiheadAttention`` in ``model`` by module
    name (not installed yet), and the reason each other one is left plain. ``skip`` as in ``skip_layers``."""
    parents: dict[int, nn.Module] = {id(child): module for module in model.modules() for child in module.children()}
    forwards: dict[str, SelfAttentionForward] = {}
    plain: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        reason = unsupported_reason(name, module, parents.get(id(module)))
        if name in skip or type(module).__name__ in skip:
            plain[name] = "in skip_layers"
        elif reason is not None:
            plain[name] = reason
        elif not module.in_proj_weight.requires_grad:
            plain[name] = "frozen (in_proj_weight.requires_grad is False)"
        else:
            forwards[name] = SelfAttentionForward(name, module)
    return forwards, plain
