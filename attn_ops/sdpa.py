"""`torch.nn.functional.scaled_dot_product_attention`'s signature and semantics on the fused op.

Supported layouts: 4-D ``(N, H, L, E)``, and 3-D ``(N, L, E)`` or 2-D ``(L, E)`` inputs, which are
read as ``(1, N, L, E)`` / ``(1, 1, L, E)`` (leading singleton dimensions added as views, so the
mask broadcasts exactly as SDPA broadcasts it). q, k and v must agree on their leading dimensions:
unlike SDPA, a batch of 1 in k/v is not broadcast against q's batch.
"""

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from .api import attention_as
from .checks import OP_NAMES

# Errors name the arguments as this function's callers spell them.
NAMES = {**OP_NAMES, "q": "query", "k": "key", "v": "value", "mask": "attn_mask", "causal": "is_causal"}


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``F.scaled_dot_product_attention``.

    ``attn_mask``: bool (True = may attend) or float (added to the scores), broadcastable to
    ``(..., L, S)``, passed to the op as is, never expanded (a float mask that requires grad gets
    its gradient, in its own shape, from the kernels too); or a ``torch.nn.attention.bias.CausalBias``
    (``causal_upper_left`` / ``causal_lower_right``), read as the causal rule it stands for.
    ``is_causal`` is SDPA's top-left causal mask and may not be combined with ``attn_mask``. Heads
    of k/v may differ from q's only with ``enable_gqa=True``. A query row with every key masked
    gives zeros. Dropout draws its seed from torch's default generator, so ``torch.manual_seed``
    makes it repeatable.
    """
    if not isinstance(is_causal, bool):  # a truthy "False" must not turn on a causal mask
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    causal = is_causal
    if isinstance(attn_mask, CausalBias):
        causal, attn_mask = _causal_rule(attn_mask, query, key, is_causal), None
    _check_rank(query, key, value, attn_mask)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (SDPA's rule); fold causality into attn_mask")
    if not enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        raise ValueError(
            f"query has {query.shape[-3]} heads but key has {key.shape[-3]} "
            f"(query {tuple(query.shape)}, key {tuple(key.shape)}); pass enable_gqa=True for grouped-query attention"
        )
    lead = (None,) * (4 - query.dim())
    out = attention_as(query[lead], key[lead], value[lead], mask=attn_mask, causal=causal, scale=scale,
                       dropout_p=dropout_p, names=NAMES)
    return out[(0,) * (4 - query.dim())]


def _causal_rule(bias, query, key, is_causal):
    """The op's causal rule for a CausalBias, which must describe these query and key lengths."""
    if is_causal:
        raise ValueError("attn_mask is a CausalBias: it must not be combined with is_causal=True (SDPA's rule)")
    lengths = (query.shape[-2], key.shape[-2])
    if (bias.seq_len_q, bias.seq_len_kv) != lengths:
        raise ValueError(f"attn_mask is a CausalBias for (L, S) = {(bias.seq_len_q, bias.seq_len_kv)}, but query and "
                         f"key give (L, S) = {lengths}")
    return "top_left" if bias.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _check_rank(query, key, value, attn_mask):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    rank = query.dim()
    if rank not in (2, 3, 4) or key.dim() != rank or value.dim() != rank:
        raise ValueError(
            "query, key and value must all be 2-D (L, E), 3-D (N, L, E) or 4-D (N, H, L, E); got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > rank:
        raise ValueError(
            f"attn_mask has more dimensions than query: attn_mask {tuple(attn_mask.shape)}, query {tuple(query.shape)}"
        )
