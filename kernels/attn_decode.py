"""Decoding against a KV cache (`attn_ops.attention_with_kvcache`): split-KV ("flash-decoding"),
dense or paged caches, the query heads of a GQA group in one program.

A decoding step has few queries (Lq = 1, or a few for speculative decoding) and a long cache, so a
program per (batch, query head) leaves most of the GPU idle and reads each kv head's cache once per
query head of its group. Here one program owns a (batch, kv head) and a range of its keys:

- **GQA packing**: its rows are every (query, query head) pair of the group, queries outermost
  (row r is query ``r // G`` of head ``h_kv * G + r % G``), so each K/V tile is loaded once for
  the whole group and the row count fills the tensor cores' M >= 16.
- **Split-KV**: the keys a sequence's rows can see are cut into ``num_splits`` ranges of whole
  tiles (from the sequence's own length, read on the device: no host sync); each program writes
  its range's normalized partial output and log2-domain LSE, and `_decode_combine` merges them
  exactly: ``out = sum_s 2**(lse_s - lse) out_s``, ``lse = log2 sum_s 2**lse_s``, the sink joining
  that sum once. A range with no visible key has lse -inf and weighs 0. With one split the program
  finishes the rows itself (the unsplit path).
- **Paged caches**: key t of sequence b is row ``t % page_size`` of block ``table[b, t // page_size]``;
  a tile's rows are gathered through the table per key, so any page size and any strides work.

Query i of sequence b sits at position ``L_b - Lq + i`` (bottom-right, the KV-cache convention),
where L_b = cache_seqlens[b] + L_new keys are visible; the band, ALiBi's distances and the bounds
are those of `_masked_scores`, with that shift.
"""


from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attn_common import LOG2E, _alibi_log2, _head_rows, _shifted_scores, _store_tile, _wide
from .attn_fwd import _attn_fwd_tiles, _normalized, _with_sink
from .attn_launch import PassPlan, launch_args, launch_key, launch_tensors, on_inputs_device, planned
from .bundles import Strides
from .schedule import key_tiles, segment, split_range
from .config import BOOL_MASK, NO_MASK, cdiv, decode_tile, device_properties, head_dim_pad, next_power_of_2
from .layout import empty_like_q

LN2 = tl.constexpr(0.6931471805599453)
MAX_SPLITS = 128  # num_splits=None never picks more: each split adds a partial row to merge
MIN_KEYS_PER_SPLIT = 256  # ... nor splits shorter than this, whose few tiles would not pay for the merge


@triton.jit
def _decode_split(Q, K, V, Table, Seqlens, KeyMask, Alibi, Sinks, Out, Lse, st, num_heads_kv, group_size, cache, sc,
                  SW: tl.constexpr, SPLIT: tl.constexpr):
    """Grid (B * Hkv * splits, row blocks); `cache` = (len_new, num_splits, page_size). `st`: Q's
    strides b, h, m, d; K's and V's b, h, n, d of [B, Hkv, L_max, D], paged (``SW.PAGED``) of
    [num_blocks, Hkv, page_size, D] (their first steps a block); the table's (b,); the key mask's
    (b, 0, 0, n); Out's b, h, m, split, d. `sc`: the launch's `Scores`, the band relative to each query's position. With
    ``MASK_KIND`` BOOL_MASK, KeyMask is a uint8 key mask [B, capacity] (nonzero = may attend), by
    each sequence's positions. With SPLIT, Out is the float32 partial output [B, Hq, Lq, splits, Dv]
    and Lse [B, Hq, Lq, splits] in log2 units; without, Out is the output [B, Hq, Lq, Dv] and Lse
    [B, Hq, Lq] the natural-log LSE."""
    len_new, num_splits, page_size = cache
    len_q = sc.len_q
    # Splits on the flat first axis (2**31 programs), not a second one (65535).
    split = tl.program_id(0) % num_splits
    pid = tl.program_id(0) // num_splits
    b = (pid // num_heads_kv).to(tl.int64)
    h_kv = (pid % num_heads_kv).to(tl.int64)
    rows = tl.program_id(1) * SW.BLOCK_M + tl.arange(0, SW.BLOCK_M)
    live = rows < len_q * group_size
    offs_i = rows // group_size
    heads = h_kv * group_size + rows % group_size
    offs_d = tl.arange(0, SW.HEAD_DIM_PAD)
    offs_dv = tl.arange(0, SW.HEAD_DIM_V_PAD)

    len_k = tl.load(Seqlens + b) + len_new
    shift = len_k - len_q  # query i sits at position i + shift
    sequence = _shifted_scores(sc, len_q, len_k, shift)
    q = tl.load(Q + b * st.q[0] + _wide(heads)[:, None] * st.q[1] + _wide(offs_i)[:, None] * st.q[2]
                + _wide(offs_d)[None, :] * st.q[3], mask=live[:, None] & (offs_d[None, :] < SW.HEAD_DIM), other=0.0)
    alibi_log2 = _alibi_log2(Alibi, b, heads, st.alibi, SW.ALIBI)
    if SW.ALIBI:
        alibi_log2 = alibi_log2[:, None]  # one slope per row (its query head)
    if SW.PAGED:  # (the pool at the head, the sequence's row of the table, the page size): `_load_rows`
        K = (K + h_kv * st.k[1], Table + b * st.table[0], page_size)
        V = (V + h_kv * st.v[1], Table + b * st.table[0], page_size)
    else:
        K = _head_rows(K, b, h_kv, st.k)
        V = _head_rows(V, b, h_kv, st.v)

    # The keys this block's queries can see, cut into num_splits ranges of whole tiles.
    first_query = tl.program_id(1) * SW.BLOCK_M // group_size
    last_row = tl.minimum((tl.program_id(1) + 1) * SW.BLOCK_M, len_q * group_size) - 1
    tiles = key_tiles(first_query, last_row // group_size + 1, sequence, SW)
    split_lo, split_hi = split_range(tiles, split, num_splits, SW.BLOCK_N)

    m_i = tl.full([SW.BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([SW.BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([SW.BLOCK_M, SW.HEAD_DIM_V_PAD], dtype=tl.float32)
    state = (acc, l_i, m_i)
    # The key mask's row of sequence b, the same for every row of the tile.
    mask_row_ptrs = KeyMask + b * st.mask[0] + tl.zeros([SW.BLOCK_M, 1], dtype=tl.int64)
    # Boundary tiles get the element-wise band mask, interior tiles skip it (see _attn_fwd_rows); the
    # forward's tile loop, without dropout.
    for SEGMENT in tl.static_range(3):
        start, stop = segment(SEGMENT, tiles)
        state = _attn_fwd_tiles(state, q, K, V, (mask_row_ptrs, alibi_log2, 0), (offs_i, offs_d, offs_dv), (b, h_kv),
                                (0, 0, 0), (tl.maximum(start, split_lo), tl.minimum(stop, split_hi)), st, sequence,
                                SEGMENT != 1, SW)
    acc, l_i, m_i = state
    if SW.SINKS and not SPLIT:  # with splits the sink joins once, in the merge
        acc, l_i, m_i = _with_sink(acc, l_i, m_i, tl.load(Sinks + heads))
    out, lse = _normalized(acc, l_i, m_i)
    stat_rows = (b * num_heads_kv * group_size + heads) * len_q + offs_i
    if SPLIT:
        Out += split * st.out[3]
        lse_at = Lse + stat_rows * num_splits + split
    else:
        lse, lse_at = lse * LN2, Lse + stat_rows
    out_at = Out + b * st.out[0] + _wide(heads)[:, None] * st.out[1] + _wide(offs_i)[:, None] * st.out[2]
    _store_tile(out_at, out, rows, offs_dv, 0, st.out[4], len_q * group_size, SW.HEAD_DIM_V, SW.INTERPRETED_BF16)
    tl.store(lse_at, lse, mask=live)


@triton.jit
def _decode_combine(Partial, PartialLse, Sinks, Out, Lse,
                    stride_ob, stride_oh, stride_om, stride_od,
                    num_heads_q, len_q, num_splits,
                    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                    SINKS: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """One row (b, h, i) per program: its splits' partial outputs (contiguous float32
    [rows, splits, Dv]) and LSEs merged into the output and the natural-log LSE."""
    row = tl.program_id(0).to(tl.int64)
    i = row % len_q
    h = (row // len_q) % num_heads_q
    b = row // len_q // num_heads_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    m_s = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        lse_s = tl.load(PartialLse + row * num_splits + s0 + offs_s, mask=s0 + offs_s < num_splits,
                        other=float("-inf"))
        m_s = tl.maximum(m_s, lse_s)
    m = tl.max(m_s, 0)
    if SINKS:  # the sink is one more term of the normalizer, with no value
        sink = tl.load(Sinks + h).to(tl.float32) * LOG2E
        m = tl.maximum(m, sink)
    m_shift = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, not NaN
    acc = tl.zeros([BLOCK_S, HEAD_DIM_V_PAD], dtype=tl.float32)
    l_s = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + offs_s
        lse_s = tl.load(PartialLse + row * num_splits + splits, mask=splits < num_splits, other=float("-inf"))
        weight = tl.math.exp2(lse_s - m_shift)
        part = tl.load(Partial + (row * num_splits + splits)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                       mask=(splits[:, None] < num_splits) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc += weight[:, None] * part
        l_s += weight
    # The merged row as a one-row tile of a finished online softmax whose running max is m.
    l_i = tl.sum(l_s[None, :], 1)
    if SINKS:
        l_i += tl.math.exp2(sink - m_shift)
    out, lse = _normalized(tl.sum(acc, 0, keep_dims=True), l_i, m + tl.zeros_like(l_i))
    one = tl.arange(0, 1)
    _store_tile(Out + b * stride_ob + h * stride_oh + i * stride_om, out, one, offs_dv, 0, stride_od, 1, HEAD_DIM_V,
                INTERPRETED_BF16)
    tl.store(Lse + row + one, lse * LN2)


def split_count(programs, max_keys, multiprocessors):
    """flash-decoding's choice of splits for `num_splits=None`: enough programs for about two waves
    of the GPU's `multiprocessors`, but no split shorter than MIN_KEYS_PER_SPLIT of the cache's
    `max_keys` capacity (the lengths are on the device; reading them would cost a host sync)."""
    if programs >= multiprocessors:
        return 1
    return max(1, min(cdiv(2 * multiprocessors, programs), cdiv(max_keys, MIN_KEYS_PER_SPLIT),
                      MAX_SPLITS))


def _multiprocessors(device):
    if device.type == "cuda":
        return device_properties(device).multi_processor_count
    # The interpreter: a small stand-in GPU, so that num_splits=None splits there too.
    return 8


class DecodePlan(NamedTuple):
    """What a decoding launch derives from the call's static parts: the split kernel's grid, strides,
    scalars and options, and with splits the partial results' shapes and the merge's."""

    split: PassPlan
    num_splits: int
    partial_shape: tuple  # [B, Hq, Lq, splits, Dv] (its LSE's: all but the last)
    combine: PassPlan  # None without splits


_PLANS = {}


@on_inputs_device
def decode_fwd(q, k_cache, v_cache, seqlens, table, len_new, num_splits, args, *, config=None, plans=None):
    """Launches the decoding kernels; returns (out ``[B, Hq, Lq, Dv]`` laid out like q, natural-log
    lse ``[B, Hq, Lq]`` float32).

    `seqlens` int32 [B]: keys already in each cache (the new ones are at ``seqlens[b] ...``, `len_new`
    of them); `table`: None (dense cache) or the int32 block table; `num_splits`: None or >= 1;
    `args`: an `OpArgs` (scale, band relative to each query's bottom-right diagonal, softcap,
    ALiBi, sinks; ``mask``: None or a bool key mask [B, capacity], True = may attend, by position in
    the sequence). ``plans``: as `attn_fwd`'s (the decoding Problem's).
    """
    out = empty_like_q(q, v_cache.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    # The kernel reads them as cache_seqlens[b] and table[b, j] at unit stride.
    seqlens, table = seqlens.contiguous(), None if table is None else table.contiguous()
    plan = planned(plans, "decode", _PLANS,
                   lambda: (launch_key(args, q, k_cache, v_cache, out), None if table is None else table.shape,
                            len_new, num_splits, config),
                   lambda: _plan(q, k_cache, v_cache, out, table, len_new, num_splits, args, config))
    tensors = launch_tensors(q, args)
    if plan.combine is None:
        split_out, split_lse = out, lse
    else:
        split_out = q.new_empty(plan.partial_shape, dtype=torch.float32)
        split_lse = q.new_empty(plan.partial_shape[:-1], dtype=torch.float32)
    _decode_split[plan.split.grid](q, k_cache, v_cache, q if table is None else table, seqlens, tensors.mask,
                                   tensors.alibi, tensors.sinks, split_out, split_lse, *plan.split.scalars,
                                   **plan.split.options)
    if plan.combine is not None:
        _decode_combine[plan.combine.grid](split_out, split_lse, tensors.sinks, out, lse, *plan.combine.scalars,
                                           **plan.combine.options)
    return out, lse


def _plan(q, k_cache, v_cache, out, table, len_new, num_splits, args, config):
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, head_dim_v = k_cache.shape[1], v_cache.shape[-1]
    group = heads_q // heads_kv
    paged = table is not None
    capacity = table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    tile = decode_tile(q, max(head_dim, head_dim_v), group * len_q, config)
    row_blocks = cdiv(group * len_q, tile.block_m)
    if num_splits is None:
        num_splits = split_count(batch * heads_kv * row_blocks, capacity, _multiprocessors(q.device))
    launch = launch_args(q, k_cache, head_dim_v, args._replace(mask=None))  # the key mask is read as [B, capacity]
    # launch_args bounds an unbounded band by q's and k_cache's lengths; a paged k_cache's length is
    # one page, so bound it here by the capacity.
    reach = capacity + len_q
    band_lo = -reach if args.band_lo is None else args.band_lo
    band_hi = reach if args.band_hi is None else args.band_hi
    split = num_splits > 1
    partial_shape = (batch, heads_q, len_q, num_splits, head_dim_v)
    if split:  # contiguous float32 partial results
        partial_strides = torch.empty(partial_shape, device="meta").stride()
        out_strides = (*partial_strides[:3], partial_strides[3], partial_strides[4])
    else:
        out_strides = (*out.stride()[:3], 0, out.stride(3))
    split_plan = PassPlan(
        grid=(batch * heads_kv * num_splits, row_blocks),
        block_m=tile.block_m,
        block_n=tile.block_n,
        layouts=(),
        scalars=(Strides(q=q.stride(), k=k_cache.stride(), v=v_cache.stride(),
                         mask=(0, 0, 0, 0) if args.mask is None else (args.mask.stride(0), 0, 0, args.mask.stride(1)),
                         alibi=launch.alibi_strides,
                         out=out_strides, table=(0 if table is None else table.stride(0),)),
                 heads_kv, group, (len_new, num_splits, k_cache.shape[2] if paged else 1),
                 launch.scores._replace(band_lo=band_lo, band_hi=band_hi)),
        options=dict(SW=launch.switches(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, TMA=False,
                                        MASK_KIND=(NO_MASK if args.mask is None else BOOL_MASK).value,
                                        SINKS=args.sinks is not None, PAGED=paged),
                     SPLIT=split, num_warps=tile.num_warps, num_stages=tile.num_stages),
    )
    combine = None
    if split:
        combine = PassPlan(
            grid=(batch * heads_q * len_q,),
            block_m=1,
            block_n=1,
            layouts=(),
            scalars=(*out.stride(), heads_q, len_q, num_splits),
            options=dict(HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PAD=head_dim_pad(head_dim_v),
                         BLOCK_S=min(16, next_power_of_2(num_splits)), SINKS=args.sinks is not None,
                         INTERPRETED_BF16=launch.constexprs["INTERPRETED_BF16"], num_warps=4 if head_dim_v > 64 else 2),
        )
    return DecodePlan(split=split_plan, num_splits=num_splits, partial_shape=partial_shape, combine=combine)
