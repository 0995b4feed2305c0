"""`torch.nn.MultiheadAttention` with its attention computed by the fused op.

A subclass: the constructor, parameters, initialisation and state_dict are torch's own, so a
`torch.nn.MultiheadAttention` checkpoint loads as is. Only `forward` is replaced; it follows
`torch.nn.functional.multi_head_attention_forward` step by step (projections, bias_k/bias_v,
zero attention, mask merging, the `is_causal` hint) and differs where documented in `forward`.
"""

import torch
import torch.nn.functional as F

from .api import attention_as
from .checks import OP_NAMES
from .weights import attention_weights


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention` (same constructor, parameters and state_dict)."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        """Same arguments, shapes and mask conventions as ``torch.nn.MultiheadAttention.forward``.

        In ``key_padding_mask`` and a bool ``attn_mask`` True means "may NOT attend"; float masks are
        added to the scores. ``attn_mask`` is ``(L, S)`` or ``(N * num_heads, L, S)``.
        ``is_causal=True`` is torch's hint that ``attn_mask`` is the causal mask: as in torch, the
        op then uses its causal rule in place of ``attn_mask`` only when there is no
        ``key_padding_mask`` and ``need_weights=False``.

        Differences from torch: a query whose every key is masked gets zeros (torch gives NaN);
        the weights returned with ``need_weights=True`` are recomputed from the op's log-sum-exp and
        are those before dropout (torch returns them after dropout in training mode).
        """
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 3-D (batched) or 2-D (unbatched); got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not isinstance(is_causal, bool):  # a truthy "False" must not turn on a causal mask
            raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
        for name, x, size in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != size:
                raise ValueError(f"{name}'s last dimension must be {size} (this module's "
                                 f"{'embed_dim' if name == 'query' else name[0] + 'dim'}), got shape {tuple(x.shape)}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask; attn_mask must be given")
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None  # as in torch: the op's own causal rule replaces the hinted mask
        self_attention = query is key and key is value
        is_batched = query.dim() == 3
        seq_first = is_batched and not self.batch_first
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif seq_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, len_q, _ = query.shape

        q, k, v = self._project(query, key, value, self_attention)
        mask = _merge_masks(attn_mask, key_padding_mask, batch, self.num_heads, len_q, k.shape[1])
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            mask = _allow_one_more_key(mask)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[2])], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[2])], dim=1)
            mask = _allow_one_more_key(mask)
        q, k, v = (self._split_heads(t) for t in (q, k, v))

        dropout_p = self.dropout if self.training else 0.0
        result = attention_as(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, return_lse=need_weights,
                              names=_names(attn_mask, key_padding_mask))
        out, lse = result if need_weights else (result, None)
        # [N, H, L, D] -> [L, N, E] or [N, L, E], the caller's layout.
        out = self.out_proj((out.permute(2, 0, 1, 3) if seq_first else out.transpose(1, 2)).flatten(2))
        weights = None
        if need_weights:
            weights = attention_weights(q, k, lse, mask=mask, causal=causal, average_heads=average_attn_weights)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return out, weights

    def _project(self, query, key, value, self_attention):
        """The input projections, [N, L, E] each; one matmul for self-attention with packed weights."""
        if self._qkv_same_embed_dim and self_attention:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _split_heads(self, x):
        """[N, L, E] -> [N, H, L, E / H] as a view (the op takes any strides)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


def _merge_masks(attn_mask, key_padding_mask, batch, num_heads, len_q, len_k):
    """torch's two masks as one mask in the op's convention (bool True = may attend, float added).

    ``attn_mask`` (L, S) becomes [1, 1, L, S] and (N * H, L, S) becomes [N, H, L, S];
    ``key_padding_mask`` (N, S) becomes [N, 1, 1, S]: views (reshape copies only masks whose
    strides cannot be viewed so). A bool mask is inverted once at its own size; only when both
    masks are given is a merged one allocated, of their broadcast shape.
    """
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape == (len_q, len_k):
            masks.append(_to_op_convention(attn_mask.reshape(1, 1, len_q, len_k), "attn_mask"))
        elif attn_mask.dim() == 3 and attn_mask.shape == (batch * num_heads, len_q, len_k):
            masks.append(_to_op_convention(attn_mask.reshape(batch, num_heads, len_q, len_k), "attn_mask"))
        else:
            raise ValueError(
                f"attn_mask must be (L, S) = {(len_q, len_k)} or (N * num_heads, L, S) = "
                f"{(batch * num_heads, len_q, len_k)}, got {tuple(attn_mask.shape)}"
            )
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, len_k):
            raise ValueError(f"key_padding_mask must be (N, S) = {(batch, len_k)}, got {tuple(key_padding_mask.shape)}")
        masks.append(_to_op_convention(key_padding_mask.reshape(batch, 1, 1, len_k), "key_padding_mask"))
    if len(masks) < 2:
        return masks[0] if masks else None
    first, second = masks
    if first.dtype == torch.bool and second.dtype == torch.bool:
        return first & second
    return _additive(first) + _additive(second)


def _to_op_convention(mask, name):
    """torch.nn.MultiheadAttention's bool masks mark keys to ignore; the op's mark keys to keep."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask


def _names(attn_mask, key_padding_mask):
    """How the op's errors name things: the module's inputs, and the mask as the caller gave it."""
    return _NAMES[attn_mask is not None, key_padding_mask is not None]


# One dict per pair of given masks, made once: the op reuses a call's checks by the names' identity.
_NAMES = {(has_attn_mask, has_padding): {
    **OP_NAMES, "q": "query", "k": "key", "v": "value",
    "mask": " merged with ".join(name for name, given in (("attn_mask", has_attn_mask),
                                                          ("key_padding_mask", has_padding)) if given) or "attn_mask"}
    for has_attn_mask in (False, True) for has_padding in (False, True)}


def _additive(mask):
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def _allow_one_more_key(mask):
    """Extend the mask over one appended key (bias_k/bias_v or the zero key), which every query may see."""
    if mask is None:
        return None
    allowed = torch.ones if mask.dtype == torch.bool else torch.zeros
    extra = allowed((*mask.shape[:-1], 1), dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, extra], dim=-1)
