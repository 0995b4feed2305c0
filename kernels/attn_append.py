"""Appending a decoding step's new keys and values to a KV cache (`attn_ops.attention_with_kvcache`),
dense or paged, in one launch: in torch, the same write is an index computation and two indexed
copies, several times a decoding step's host budget.

Token t of sequence b goes to position ``seqlens[b] + t``: row ``seqlens[b] + t`` of the dense cache
``[B, Hkv, L_max, D]``, or row ``p % page_size`` of block ``table[b, p // page_size]`` of a paged pool
``[num_blocks, Hkv, page_size, D]`` (any strides).
"""

import triton
import triton.language as tl

from .attn_common import _wide
from .attn_launch import on_inputs_device
from .config import head_dim_pad


@triton.jit
def _append_row(New, Cache, b, h, t, block, row, strides_new, strides_cache, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr):
    """Row t of (b, h) of `New` into row `row` of block `block` (the batch, for a dense cache) of
    `Cache`; each tensor's strides (batch or block, head, row, dim)."""
    offs = tl.arange(0, HEAD_DIM_PAD)
    values = tl.load(New + b * strides_new[0] + h * strides_new[1] + t * strides_new[2] + _wide(offs) * strides_new[3],
                     mask=offs < HEAD_DIM)
    tl.store(Cache + block * strides_cache[0] + h * strides_cache[1] + row * strides_cache[2]
             + _wide(offs) * strides_cache[3], values, mask=offs < HEAD_DIM)


@triton.jit
def _append(KNew, VNew, KCache, VCache, Seqlens, Table, strides_kn, strides_vn, strides_kc, strides_vc, stride_tb,
            num_heads_kv, len_new, page_size, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
            HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, PAGED: tl.constexpr):
    """One program per (sequence, new token, kv head): its key row and value row. The strides come as
    (batch, head, row, dim) tuples; a paged cache's batch stride steps a block."""
    pid = tl.program_id(0)
    h = (pid % num_heads_kv).to(tl.int64)
    t = pid // num_heads_kv % len_new
    b = (pid // (num_heads_kv * len_new)).to(tl.int64)
    position = tl.load(Seqlens + b) + t
    if PAGED:
        block = tl.load(Table + b * stride_tb + position // page_size).to(tl.int64)
        row = (position % page_size).to(tl.int64)
    else:
        block, row = b, position.to(tl.int64)
    _append_row(KNew, KCache, b, h, t, block, row, strides_kn, strides_kc, HEAD_DIM, HEAD_DIM_PAD)
    _append_row(VNew, VCache, b, h, t, block, row, strides_vn, strides_vc, HEAD_DIM_V, HEAD_DIM_V_PAD)


@on_inputs_device
def append_rows(k_new, v_new, k_cache, v_cache, seqlens, table, plans=None):
    """Writes ``k_new``/``v_new`` (``[B, Hkv, L_new, D]``) into the caches in place at positions
    ``seqlens[b] ...`` (int32 [B]) of sequence b, through the int32 block `table` when it is not None.
    ``plans``: None, or a dict shared by every call with these shapes and strides (a decoding Problem's),
    where the launch's grid and arguments are kept."""
    if k_new.numel() == 0 and v_new.numel() == 0:
        return
    # Read as seqlens[b] and table[b, j]: unit strides.
    seqlens, table = seqlens.contiguous(), None if table is None else table.contiguous()
    plan = None if plans is None else plans.get("append")
    if plan is None:
        plan = _plan(k_new, v_new, k_cache, v_cache, table)
        if plans is not None:
            plans["append"] = plan
    grid, scalars, options = plan
    _append[grid](k_new, v_new, k_cache, v_cache, seqlens, k_new if table is None else table, *scalars, **options)


def _plan(k_new, v_new, k_cache, v_cache, table):
    batch, num_heads_kv, len_new, head_dim = k_new.shape
    head_dim_v = v_new.shape[-1]
    return ((batch * len_new * num_heads_kv,),
            (k_new.stride(), v_new.stride(), k_cache.stride(), v_cache.stride(), 0 if table is None else table.stride(0),
             num_heads_kv, len_new, k_cache.shape[2]),
            dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), HEAD_DIM_V=head_dim_v,
                 HEAD_DIM_V_PAD=head_dim_pad(head_dim_v), PAGED=table is not None,
                 num_warps=1 if max(head_dim, head_dim_v) <= 128 else 2))
