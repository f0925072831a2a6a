"""``nn.MultiheadAttention`` as K-FAC layers: its projections become modules whose forward runs, so hooks see
their inputs and output gradients.

``nn.MultiheadAttention`` computes its q/k/v projection from ``in_proj_weight`` and its output projection from
``out_proj.weight`` inside ``F.multi_head_attention_forward``: no module forward runs for either. The engine
replaces a covered module's ``forward`` (:class:`AttentionForward`) by the same computation written with
projection modules (:class:`Projection`) whose weight and bias *are* ``in_proj_weight`` and ``in_proj_bias``:

- self-attention (query, key and value the same tensor): one ``Linear(E, 3E)`` on the input, ``<name>.in_proj``
  (cut by ``max_factor_dim`` like any Linear);
- cross-attention (``nn.TransformerDecoderLayer.multihead_attn``: query from the target, key and value from the
  memory): three ``Linear(E, E)``, ``<name>.q_proj``, ``<name>.k_proj``, ``<name>.v_proj``, rows 0:E, E:2E and
  2E:3E of the packed weight, each on its own input;
- separate weights (``kdim``/``vdim``): the same three layers on ``q_proj_weight``, ``k_proj_weight`` and
  ``v_proj_weight`` (``Linear(E, E)``, ``Linear(kdim, E)``, ``Linear(vdim, E)``), with their rows of the packed
  ``in_proj_bias``;

then ``out_proj`` called as the ``nn.Linear`` it is, on the attention output, with scaled dot-product attention
in between (the module's masks, dropout and attention weights). The parameters, the state dict and the outputs
stay the module's own (equal up to float round-off); removing the engine's hooks restores the original
``forward``. Modules with ``add_bias_kv`` or ``add_zero_attn`` keep their plain gradient, with the reason in
``describe()`` (:func:`unsupported_reason`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpkfac.core.errors import UnsupportedLayerError


class Projection(nn.Module):
    """Rows ``rows`` of one of an attention module's q/k/v weights as a module: ``x (..., d) -> (..., rows)``
    (all 3E rows of the packed weight for self-attention), with the bias rows ``bias_offset`` further on in
    the packed ``in_proj_bias``. Not registered in the model: its parameters are the module's (``weight_name``)."""

    def __init__(self, module_name: str, attention: nn.MultiheadAttention, weight: str, rows: tuple[int, int],
                 bias_offset: int = 0) -> None:
        super().__init__()
        self.weight = getattr(attention, weight)
        self.bias = attention.in_proj_bias
        self.weight_name = f"{module_name}.{weight}" if module_name else weight
        self.rows, self.bias_offset = rows, bias_offset

    def forward(self, x: Tensor) -> Tensor:
        (r0, r1), o = self.rows, self.bias_offset
        return F.linear(x, self.weight[r0:r1], None if self.bias is None else self.bias[r0 + o:r1 + o])


def unsupported_reason(attention: nn.MultiheadAttention) -> str | None:
    """Why K-FAC leaves ``attention`` to its plain gradient, or ``None`` if
    :class:`AttentionForward` can run it."""
    if attention.bias_k is not None or attention.add_zero_attn:
        return "add_bias_kv and add_zero_attn are not covered"
    return None


class AttentionForward:
    """The forward of a covered ``nn.MultiheadAttention`` through :class:`Projection` modules and ``out_proj``;
    set as the module's ``forward`` by :meth:`install`, with the same signature and results as
    ``nn.MultiheadAttention.forward``. ``cross``: three projections, one per input (else one packed)."""

    def __init__(self, name: str, attention: nn.MultiheadAttention, cross: bool) -> None:
        self.name = name
        self.attention = attention
        separate = not attention._qkv_same_embed_dim  # q_proj_weight, k_proj_weight, v_proj_weight
        self.cross = cross or separate
        e = attention.embed_dim
        if separate:
            parts = {p: Projection(name, attention, f"{p}_proj_weight", (0, e), i * e) for i, p in enumerate("qkv")}
        elif self.cross:
            parts = {p: Projection(name, attention, "in_proj_weight", (i * e, (i + 1) * e))
                     for i, p in enumerate("qkv")}
        else:
            parts = {"in": Projection(name, attention, "in_proj_weight", (0, 3 * e))}
        #: the projections by the names of their K-FAC layers
        self.projections = {(f"{name}." if name else "") + f"{p}_proj": proj for p, proj in parts.items()}

    def install(self) -> None:
        self.attention.forward = self  # an instance attribute: nn.Module.__call__ reads self.forward

    def remove(self) -> None:
        if self.attention.__dict__.get("forward") is self:
            del self.attention.forward

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                 need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                 is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        m = self.attention
        if not self.cross and not (query is key and key is value):
            raise UnsupportedLayerError(
                f"nn.MultiheadAttention '{self.name}' is preconditioned by K-FAC as self-attention (query, key and "
                "value the same tensor), but was called with different ones; only the cross-attention of "
                f"nn.TransformerDecoderLayer is known to be one. Fix: add '{self.name}' to skip_layers (its "
                "projections then keep their plain gradient).")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        batched = query.dim() == 3

        def batch_major(t: Tensor) -> Tensor:  # K-FAC counts examples along the first dimension: (B, L, E)
            t = t if batched else t.unsqueeze(0)  # unbatched (L, E) as (1, L, E)
            return t.transpose(0, 1) if batched and not m.batch_first else t

        def split_heads(t: Tensor) -> Tensor:  # (B, L, E) -> (B, H, L, head_dim)
            return t.reshape(t.shape[0], t.shape[1], m.num_heads, m.head_dim).transpose(1, 2)

        if self.cross:
            q, k, v = (split_heads(p(batch_major(t))) for p, t in zip(self.projections.values(), (query, key, value)))
        else:
            q, k, v = (split_heads(t) for t in next(iter(self.projections.values()))(batch_major(query)).chunk(3, -1))
        batch, heads, length, head_dim = q.shape
        mask = _merged_mask(attn_mask, key_padding_mask, batch, heads, length, k.shape[2], q.dtype)
        dropout = m.dropout if m.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p=dropout) @ v if dropout > 0 else weights @ v
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        out = m.out_proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))  # a module call: hooks run
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
                 length: int, source: int, dtype: torch.dtype) -> Tensor | None:
    """``attn_mask`` ((L, S) or (B*H, L, S)) plus ``key_padding_mask`` ((B, S), True: padding), additive,
    broadcastable to (B, H, L, S)."""
    mask = _as_additive(attn_mask, dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(batch, heads, length, source)
    padding = _as_additive(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def attention_forwards(model: nn.Module, skip: list[str]) -> tuple[dict[str, AttentionForward], dict[str, str]]:
    """The :class:`AttentionForward` of every covered ``nn.MultiheadAttention`` in ``model`` by module name (not
    installed yet), and the reason each other one is left plain. ``skip`` as in ``skip_layers``."""
    cross = {id(m.multihead_attn) for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)}
    forwards: dict[str, AttentionForward] = {}
    plain: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        reason = unsupported_reason(module)
        if name in skip or type(module).__name__ in skip:
            plain[name] = "in skip_layers"
        elif reason is not None:
            plain[name] = reason
        elif not all(p.requires_grad for p in (module.in_proj_weight, module.q_proj_weight) if p is not None):
            plain[name] = "frozen (its q/k/v weights do not require grad)"
        else:
            forwards[name] = AttentionForward(name, module, cross=id(module) in cross)
    return forwards, plain
