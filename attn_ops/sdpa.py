"""`torch.nn.functional.scaled_dot_product_attention`'s signature and semantics on the fused op.

Supported layouts: 4-D ``(N, H, L, E)``, and 3-D ``(N, L, E)`` or 2-D ``(L, E)`` inputs, which are
read as ``(1, N, L, E)`` / ``(1, 1, L, E)`` (leading singleton dimensions added as views, so the
mask broadcasts exactly as SDPA broadcasts it). q, k and v must agree on their leading dimensions:
unlike SDPA, a batch of 1 in k/v is not broadcast against q's batch.
"""

import torch

from .api import attention


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``F.scaled_dot_product_attention``.

    ``attn_mask``: bool (True = may attend) or float (added to the scores), broadcastable to
    ``(..., L, S)``; passed to the op as is, never expanded. ``is_causal`` is SDPA's top-left
    causal mask and may not be combined with ``attn_mask``. Heads of k/v may differ from q's only
    with ``enable_gqa=True``. A query row with every key masked gives zeros. Dropout draws its seed
    from torch's default generator, so ``torch.manual_seed`` makes it repeatable.
    """
    _check_rank(query, key, value, attn_mask)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (SDPA's rule); fold causality into attn_mask")
    if not enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        raise ValueError(
            f"query has {query.shape[-3]} heads but key has {key.shape[-3]} "
            f"(query {tuple(query.shape)}, key {tuple(key.shape)}); pass enable_gqa=True for grouped-query attention"
        )
    rank = query.dim()
    lead = (None,) * (4 - rank)
    out = attention(
        query[lead], key[lead], value[lead], mask=attn_mask, causal=bool(is_causal), scale=scale, dropout_p=dropout_p
    )
    return out[(0,) * (4 - rank)]


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
    if attn_mask is not None and attn_mask.dim() > rank:
        raise ValueError(
            f"attn_mask has more dimensions than query: attn_mask {tuple(attn_mask.shape)}, query {tuple(query.shape)}"
        )
