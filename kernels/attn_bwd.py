"""Backward pass: a dQ pass over query blocks, which also stores each row's delta = rowsum(dO * O),
then a dK/dV pass over key blocks, which reads them. Both recompute the probabilities from the saved
LSE (and the dropout pattern from the seed); no [Lq, Lk] tensor is stored and no atomics are used, so
results are deterministic."""

import torch
import triton
import triton.language as tl

from .attn_common import (LOG2E, _alibi_log2, _block_bits, _dot, _dropout_keep, _head_rows, _load_rows, _load_tile,
                          _masked_scores, _program_block, _rounded, _row_stats, _store_rows, _store_tile, _wide)
from .attn_launch import (PassPlan, descriptor_layouts, descriptors, launch_args, launch_key, launch_tensors,
                          on_inputs_device, planned, tma_allowed, uses_tma)
from .bundles import Strides
from .layout import on_16_bytes
from .schedule import (COLS, CONTIGUOUS, FULL_BLOCKS, PARTIAL_BLOCKS, ROWS, block_line, key_tiles, listed_block,
                       listed_tiles, query_tiles, segment, tile_start)
from .config import cdiv, tile_config
from .precision import tf32_allowed


@triton.jit
def _load_row_stats(Lse, Delta, offs_m, len_q):
    """Per-row log2-domain LSE and delta; a fully masked row gets LSE +inf so exp2(s - lse) = 0."""
    lse2 = tl.load(Lse + offs_m, mask=offs_m < len_q, other=float("-inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(Delta + offs_m, mask=offs_m < len_q, other=0.0)
    return lse2, delta


@triton.jit
def _score_grads(s, unit, row_stats, do, v_t, seed, offs_m, offs_n, head_index, sc, SW: tl.constexpr):
    """dL/d(final natural-log scores) of one tile (log2-domain scores ``s * unit``, as `_masked_scores`
    gives them), ``p * (dp - delta)``, dP seen through the dropout pattern; `row_stats`: the rows'
    (lse2, delta)."""
    lse2, delta = row_stats
    p = tl.math.exp2(s * unit - lse2[:, None])
    dp = _dot(do, v_t, SW.INPUT_PRECISION)
    if SW.DROPOUT:
        keep = _dropout_keep(seed, offs_m, offs_n, head_index, sc.dropout_p)
        dp = tl.where(keep, dp * sc.dropout_scale, 0.0)
    return p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_tiles(grads, kv, Q, dO, stats, extra, offs, at, drop, span, st, sc, EDGE: tl.constexpr,
                         SW: tl.constexpr, KIND: tl.constexpr = CONTIGUOUS):
    """(dK, dV) `grads` of the key rows `offs` = (keys, head dims of K, of V), whose tiles are `kv`,
    summed over the query tiles of `span` (as `_attn_fwd_tiles`' key tiles, by ``KIND``) of (b, h) =
    `at`; `stats`: the head's (LSE, delta) rows; `extra`: the keys' mask pointers, ALiBi slope and
    dropout seed; `drop`: the dropout key's (head, query, key) offsets."""
    dk, dv = grads
    k, v = kv
    Lse, Delta = stats
    mask_row_ptrs, alibi_log2, seed = extra
    offs_n, offs_d, offs_dv = offs
    b, h = at
    drop_head, drop_q0, drop_k0 = drop
    # Transposed tiles, [keys, queries]: every matmul has the BLOCK_N keys as its M (Hopper's wgmma
    # needs 64 or more; the BLOCK_M queries are 16 or 32). The scores see the band from the key side
    # (query - key in [-hi, -lo]) and ALiBi's |key - shift - query|, which is the same distance.
    for i in range(span[0], span[1], SW.BLOCK_M if KIND == CONTIGUOUS else 1):
        start_m = tile_start(i, span, KIND, SW.BLOCK_M, SW)
        offs_m = start_m + tl.arange(0, SW.BLOCK_M)
        seen = None
        if KIND == PARTIAL_BLOCKS:
            seen = _block_bits(span, i, offs_m, tl.min(offs_n, 0), SW.BLOCK_N, SW, True)
        q_t = _load_rows(Q, b, h, start_m, offs_m, offs_d, st.q, sc.len_q, SW.HEAD_DIM, True, SW)
        do = _load_rows(dO, b, h, start_m, offs_m, offs_dv, st.do, sc.len_q, SW.HEAD_DIM_V, False, SW)
        lse2, delta = _load_row_stats(Lse, Delta, offs_m, sc.len_q)
        mask_ptrs = mask_row_ptrs + _wide(offs_m)[None, :] * st.mask[2]
        s_t, cap_slope, unit = _masked_scores(k, q_t, offs_n, offs_m, mask_ptrs, alibi_log2, sc, EDGE, SW, True,
                                              seen)
        p_t = tl.math.exp2(s_t * unit - lse2[None, :])
        dp_t = _dot(v, tl.trans(do), SW.INPUT_PRECISION)
        p_out = p_t
        if SW.DROPOUT:  # O used the kept, rescaled probabilities: dV and dP see the same pattern
            keep = _dropout_keep(seed, offs_m + drop_q0, offs_n + drop_k0, drop_head, sc.dropout_p, True)
            p_out = tl.where(keep, p_t * sc.dropout_scale, 0.0)
            dp_t = tl.where(keep, dp_t * sc.dropout_scale, 0.0)
        dv += _dot(_rounded(p_out, SW.INTERPRETED_BF16).to(do.dtype), do, SW.INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :]) * cap_slope  # cap_slope: through the softcap's tanh
        dk += _dot(_rounded(ds_t, SW.INTERPRETED_BF16).to(q_t.dtype), tl.trans(q_t), SW.INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_cols(Q, K, V, dO, dK, dV, masks, Alibi, Seed, stats, at, group_size, drop, st, sc,
                        SW: tl.constexpr):
    """dK, dV of keys [start_n, start_n + BLOCK_N) of one (sequence, kv head h_kv), `at` = (start_n, b,
    h_kv): K, V, dK, dV point at its first key row; Q, dO, Alibi and `masks`' Mask (of (Mask,
    Blocks)) at the sequence's first row of query head 0 (head h is its `Strides` entry's head
    stride further on); `stats` = (Lse, Delta, head stride) the same for the row statistics. With
    ``TMA``, Q, K, V, dO, dK and dV are tensor descriptors and (b, head) pick the rows
    (`_load_rows`). Blocks: a block mask's (lists, bits), walked by key block. `drop` = (head 0's
    dropout key, q0, k0): head h's is ``drop[0] + h``."""
    start_n, b, h_kv = at
    Mask, Blocks = masks
    Lse, Delta, stride_stats_h = stats
    drop_head0, drop_q0, drop_k0 = drop
    offs_n = start_n + tl.arange(0, SW.BLOCK_N)
    offs_d = tl.arange(0, SW.HEAD_DIM_PAD)
    offs_dv = tl.arange(0, SW.HEAD_DIM_V_PAD)
    k = _load_rows(K, b, h_kv, start_n, offs_n, offs_d, st.k, sc.len_k, SW.HEAD_DIM, False, SW)
    v = _load_rows(V, b, h_kv, start_n, offs_n, offs_dv, st.v, sc.len_k, SW.HEAD_DIM_V, False, SW)
    seed = tl.load(Seed) if SW.DROPOUT else 0
    dk = tl.zeros([SW.BLOCK_N, SW.HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([SW.BLOCK_N, SW.HEAD_DIM_V_PAD], dtype=tl.float32)
    # Query j - hi <= i <= j - lo sees key j: the same band, seen from the key side.
    tiles = query_tiles(start_n, sc, SW)
    # GQA: the query heads sharing this kv head are summed here, in order, instead of with atomics.
    for g in range(group_size):
        h = h_kv * group_size + g
        mask_row_ptrs = Mask + h * st.mask[1] + _wide(offs_n)[:, None] * st.mask[3]  # the transposed tile's rows
        alibi_log2 = _alibi_log2(Alibi, 0, h, st.alibi, SW.ALIBI)
        Q_h, dO_h = Q, dO
        if not SW.TMA:
            Q_h, dO_h = Q + h * st.q[1], dO + h * st.do[1]
        stats_h = (Lse + h * stride_stats_h, Delta + h * stride_stats_h)
        extra = (mask_row_ptrs, alibi_log2, seed)
        drop_h = (drop_head0 + h, drop_q0, drop_k0)
        if SW.BLOCK_SIZE:  # the block mask's full query blocks, then its partial ones, within the band
            line = block_line(b, h, start_n, sc.len_k, st, SW)
            for KIND in tl.static_range(FULL_BLOCKS, PARTIAL_BLOCKS + 1):
                span = listed_tiles(Blocks, line, COLS, KIND, (tiles[0], tiles[3]), SW.BLOCK_M, SW)
                dk, dv = _attn_bwd_dkdv_tiles((dk, dv), (k, v), Q_h, dO_h, stats_h, extra, (offs_n, offs_d, offs_dv),
                                              (b, h), drop_h, span, st, sc, SW.BANDED, SW, KIND)
        else:
            for SEGMENT in tl.static_range(3):
                dk, dv = _attn_bwd_dkdv_tiles((dk, dv), (k, v), Q_h, dO_h, stats_h, extra, (offs_n, offs_d, offs_dv),
                                              (b, h), drop_h, segment(SEGMENT, tiles), st, sc, SEGMENT != 1, SW)
    dk *= sc.scale  # ds is the gradient of the natural-log scores s = scale * q.k
    _store_rows(dK, b, h_kv, start_n, dk, offs_n, offs_d, st.out, sc.len_k, SW.HEAD_DIM, SW.INTERPRETED_BF16, SW.TMA)
    _store_rows(dV, b, h_kv, start_n, dv, offs_n, offs_dv, st.out_v, sc.len_k, SW.HEAD_DIM_V, SW.INTERPRETED_BF16,
                SW.TMA)


# group_size must not become a constant when it is 1 (MHA): ptxas then serializes every wgmma of the
# loop over the group (warning C7515), 40 fences per iteration instead of 6.
@triton.jit(do_not_specialize=["group_size"])
def _attn_bwd_dkdv(Q, K, V, Mask, Blocks, Alibi, Seed, dO, Lse, Delta, dK, dV, st, num_heads_q, group_size, sc,
                   SW: tl.constexpr):
    """A program per block of BLOCK_N keys of one (batch, kv head). `st.out` and `st.out_v`: dK's and
    dV's strides."""
    _, b, h_kv, start_n = _program_block(sc.len_k, num_heads_q // group_size, SW.BLOCK_N)
    if not SW.TMA:  # pointers at the rows of batch b (and kv head h_kv); descriptors take them as coordinates
        K = _head_rows(K, b, h_kv, st.k)
        V = _head_rows(V, b, h_kv, st.v)
        dK = _head_rows(dK, b, h_kv, st.out)
        dV = _head_rows(dV, b, h_kv, st.out_v)
        Q += b * st.q[0]
        dO += b * st.do[0]
    # The LSE and delta are [B * Hq, Lq] rows: batch b's heads start at row b * Hq, len_q apart.
    stats = b * num_heads_q * sc.len_q
    _attn_bwd_dkdv_cols(Q, K, V, dO, dK, dV, (Mask + b * st.mask[0], Blocks), Alibi + b * st.alibi[0], Seed,
                        (Lse + stats, Delta + stats, sc.len_q), (start_n, b, h_kv), group_size, (b * num_heads_q, 0, 0),
                        st, sc, SW)


@triton.jit
def _attn_bwd_dq_tiles(dq, q, do, row_stats, K, V, extra, offs, at, drop, span, st, sc, EDGE: tl.constexpr,
                       SW: tl.constexpr, KIND: tl.constexpr = CONTIGUOUS):
    """dQ of the query rows `offs` = (queries, head dims of K, of V), whose q and dO tiles are given,
    summed over the key tiles of `span` (by ``KIND``) of (b, h_kv) = `at`; `row_stats`: their (lse2,
    delta); `extra`, `drop` and `span` as `_attn_fwd_tiles`'s."""
    mask_row_ptrs, alibi_log2, seed = extra
    offs_m, offs_d, offs_dv = offs
    b, h_kv = at
    drop_head, drop_q0, drop_k0 = drop
    for i in range(span[0], span[1], SW.BLOCK_N if KIND == CONTIGUOUS else 1):
        start_n = tile_start(i, span, KIND, SW.BLOCK_N, SW)
        offs_n = start_n + tl.arange(0, SW.BLOCK_N)
        seen = None
        if KIND == PARTIAL_BLOCKS:
            seen = _block_bits(span, i, offs_m, start_n, SW.BLOCK_N, SW)
        k_t = _load_rows(K, b, h_kv, start_n, offs_n, offs_d, st.k, sc.len_k, SW.HEAD_DIM, True, SW)
        v_t = _load_rows(V, b, h_kv, start_n, offs_n, offs_dv, st.v, sc.len_k, SW.HEAD_DIM_V, True, SW)
        s, cap_slope, unit = _masked_scores(q, k_t, offs_m, offs_n, mask_row_ptrs + _wide(offs_n)[None, :] * st.mask[3],
                                            alibi_log2, sc, EDGE, SW, False, seen)
        ds = _score_grads(s, unit, row_stats, do, v_t, seed, offs_m + drop_q0, offs_n + drop_k0, drop_head, sc,
                          SW) * cap_slope
        dq += _dot(_rounded(ds, SW.INTERPRETED_BF16).to(k_t.dtype), tl.trans(k_t), SW.INPUT_PRECISION)
    return dq


@triton.jit
def _row_deltas(o, do, dLse, offs_m, len_q):
    """delta = rowsum(dO * O) - dlse_log2 * log2(e) of the rows `offs_m` (the LSE's gradient folded in,
    see `attn_bwd`); `dLse`: None where the LSE had no gradient."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if dLse is not None:
        delta -= tl.load(dLse + offs_m, mask=offs_m < len_q, other=0.0) * LOG2E
    return delta


@triton.jit
def _attn_bwd_dq_rows(Q, K, V, outputs, dQ, masks, alibi_log2, Seed, stats, at, drop, st, sc, SW: tl.constexpr):
    """dQ of queries [start_m, start_m + BLOCK_M) of one (sequence, head), `at` = (start_m, b, h,
    h_kv), every pointer at its first row: `outputs` = (Out, dO), `stats` = (Lse, dLse or None, Delta)
    too (with ``TMA`` Q, K, V, Out, dO and dQ descriptors; `masks` as `_attn_fwd_rows`'). Stores the
    rows' deltas, which the dK/dV pass launched after this one reads: no pass of their own."""
    start_m, b, h, h_kv = at
    Mask, Blocks = masks
    Out, dO = outputs
    Lse, dLse, Delta = stats
    offs_m = start_m + tl.arange(0, SW.BLOCK_M)
    offs_d = tl.arange(0, SW.HEAD_DIM_PAD)
    offs_dv = tl.arange(0, SW.HEAD_DIM_V_PAD)
    q = _load_rows(Q, b, h, start_m, offs_m, offs_d, st.q, sc.len_q, SW.HEAD_DIM, False, SW)
    do = _load_rows(dO, b, h, start_m, offs_m, offs_dv, st.do, sc.len_q, SW.HEAD_DIM_V, False, SW)
    o = _load_rows(Out, b, h, start_m, offs_m, offs_dv, st.o, sc.len_q, SW.HEAD_DIM_V, False, SW)
    delta = _row_deltas(o, do, dLse, offs_m, sc.len_q)
    tl.store(Delta + offs_m, delta, mask=offs_m < sc.len_q)
    lse2 = tl.load(Lse + offs_m, mask=offs_m < sc.len_q, other=float("-inf"))
    row_stats = (tl.where(lse2 == float("-inf"), float("inf"), lse2), delta)  # as `_load_row_stats`
    mask_row_ptrs = Mask + _wide(offs_m)[:, None] * st.mask[2]
    seed = tl.load(Seed) if SW.DROPOUT else 0
    dq = tl.zeros([SW.BLOCK_M, SW.HEAD_DIM_PAD], dtype=tl.float32)
    tiles = key_tiles(start_m, sc.len_q, sc, SW)
    extra = (mask_row_ptrs, alibi_log2, seed)
    if SW.BLOCK_SIZE:  # as the forward's
        line = block_line(b, h, start_m, sc.len_q, st, SW)
        for KIND in tl.static_range(FULL_BLOCKS, PARTIAL_BLOCKS + 1):
            span = listed_tiles(Blocks, line, ROWS, KIND, (tiles[0], tiles[3]), SW.BLOCK_N, SW)
            dq = _attn_bwd_dq_tiles(dq, q, do, row_stats, K, V, extra, (offs_m, offs_d, offs_dv), (b, h_kv), drop,
                                    span, st, sc, SW.BANDED, SW, KIND)
    else:
        for SEGMENT in tl.static_range(3):
            dq = _attn_bwd_dq_tiles(dq, q, do, row_stats, K, V, extra, (offs_m, offs_d, offs_dv), (b, h_kv), drop,
                                    segment(SEGMENT, tiles), st, sc, SEGMENT != 1, SW)
    dq *= sc.scale
    _store_rows(dQ, b, h, start_m, dq, offs_m, offs_d, st.out, sc.len_q, SW.HEAD_DIM, SW.INTERPRETED_BF16, SW.TMA)


@triton.jit
def _attn_bwd_dq(Q, K, V, Mask, Blocks, Alibi, Seed, Out, dO, Lse, dLse, Delta, dQ, st, num_heads_q, group_size, sc,
                 SW: tl.constexpr):
    """A program per block of BLOCK_M queries of one (batch, query head), the heaviest first; `st.out`:
    dQ's strides, `st.o` Out's; `dLse`: None, or the LSE's gradient as [B * Hq, Lq] rows."""
    head_index, b, h, start_m = _program_block(sc.len_q, num_heads_q, SW.BLOCK_M, True)
    h_kv = h // group_size
    if not SW.TMA:  # pointers at (b, h)'s first rows; descriptors take (b, h) as coordinates
        K = _head_rows(K, b, h_kv, st.k)
        V = _head_rows(V, b, h_kv, st.v)
        Q = _head_rows(Q, b, h, st.q)
        Out = _head_rows(Out, b, h, st.o)
        dO = _head_rows(dO, b, h, st.do)
        dQ = _head_rows(dQ, b, h, st.out)
    if dLse is not None:
        dLse = _row_stats(dLse, head_index, sc.len_q)
    _attn_bwd_dq_rows(Q, K, V, (Out, dO), dQ, (_head_rows(Mask, b, h, st.mask), Blocks),
                      _alibi_log2(Alibi, b, h, st.alibi, SW.ALIBI), Seed,
                      (_row_stats(Lse, head_index, sc.len_q), dLse, _row_stats(Delta, head_index, sc.len_q)),
                      (start_m, b, h, h_kv), (head_index, 0, 0), st, sc, SW)


@triton.jit
def _dmask_tile(acc, rows, keys, start_n, alibi_log2, seed, head_index, seen, st, sc, SW: tl.constexpr):
    """`acc` plus dS of one tile: the queries of `rows` = (q, do, row_stats, offs_m, their mask row
    pointers) against keys [start_n, start_n + BLOCK_N) of `keys` = (K, V at the head's first row,
    offs_d, offs_dv); `seen`: a partial block's bits (`_block_bits`) or None."""
    q, do, row_stats, offs_m, mask_row_ptrs = rows
    K_h, V_h, offs_d, offs_dv = keys
    offs_n = start_n + tl.arange(0, SW.BLOCK_N)
    k_t = _load_tile(K_h, offs_d, offs_n, st.k[3], st.k[2], SW.HEAD_DIM, sc.len_k)
    v_t = _load_tile(V_h, offs_dv, offs_n, st.v[3], st.v[2], SW.HEAD_DIM_V, sc.len_k)
    mask_ptrs = mask_row_ptrs + _wide(offs_n)[None, :] * st.mask[3]
    s, _, unit = _masked_scores(q, k_t, offs_m, offs_n, mask_ptrs, alibi_log2, sc, True, SW, False, seen)
    return acc + _score_grads(s, unit, row_stats, do, v_t, seed, offs_m, offs_n, head_index, sc, SW)


@triton.jit
def _attn_bwd_dmask(Q, K, V, Mask, Blocks, Alibi, Seed, dO, Lse, Delta, dMask, st, mask_shape, batch, num_heads_q,
                    group_size, sc, SW: tl.constexpr, ROWS_SUMMED: tl.constexpr, COLS_SUMMED: tl.constexpr):
    """The gradient of a float mask in its own shape [mask_batch, mask_heads, 1 or Lq, 1 or Lk]
    (`mask_shape` = (mask_batch, mask_heads); `st.out`: its strides): each program owns one tile of
    it and sums dS over the dimensions the mask broadcasts (batches, heads, rows or columns) in a
    fixed order, so the result is deterministic without atomics and without a scratch tensor. dS is
    the gradient of the final scores, to which the mask is added after the cap: no cap factor.
    With a block mask (`Blocks`, as the dQ pass's) only its listed tiles are visited, partial ones
    reading their bits: elsewhere dS is 0. Pointers only (SW.TMA is not read)."""
    mask_batch, mask_heads = mask_shape
    len_q, len_k = sc.len_q, sc.len_k
    row_tiles = 1 if ROWS_SUMMED else tl.cdiv(len_q, SW.BLOCK_M)
    col_tiles = 1 if COLS_SUMMED else tl.cdiv(len_k, SW.BLOCK_N)
    pid = tl.program_id(0)
    col0 = (pid % col_tiles) * SW.BLOCK_N
    row0 = (pid // col_tiles % row_tiles) * SW.BLOCK_M
    h_m = (pid // (col_tiles * row_tiles) % mask_heads).to(tl.int64)
    b_m = (pid // (col_tiles * row_tiles * mask_heads)).to(tl.int64)
    m_first, m_stop = row0, row0 + SW.BLOCK_M
    if ROWS_SUMMED:
        m_first, m_stop = 0, len_q
    offs_d = tl.arange(0, SW.HEAD_DIM_PAD)
    offs_dv = tl.arange(0, SW.HEAD_DIM_V_PAD)
    seed = tl.load(Seed) if SW.DROPOUT else 0
    acc = tl.zeros([SW.BLOCK_M, SW.BLOCK_N], dtype=tl.float32)
    # A mask dimension of size 1 is shared by every batch (head): b_m (h_m) is then 0 and all are summed.
    for b_step in range(batch // mask_batch):
        b = (b_m + b_step).to(tl.int64)
        for h_step in range(num_heads_q // mask_heads):
            h = (h_m + h_step).to(tl.int64)
            head_index = b * num_heads_q + h
            K_h, V_h = _head_rows(K, b, h // group_size, st.k), _head_rows(V, b, h // group_size, st.v)
            alibi_log2 = _alibi_log2(Alibi, b, h, st.alibi, SW.ALIBI)
            for start_m in range(m_first, m_stop, SW.BLOCK_M):
                offs_m = start_m + tl.arange(0, SW.BLOCK_M)
                q = _load_tile(_head_rows(Q, b, h, st.q), offs_m, offs_d, st.q[2], st.q[3], len_q, SW.HEAD_DIM)
                do = _load_tile(_head_rows(dO, b, h, st.do), offs_m, offs_dv, st.do[2], st.do[3], len_q,
                                SW.HEAD_DIM_V)
                row_stats = _load_row_stats(_row_stats(Lse, head_index, len_q), _row_stats(Delta, head_index, len_q),
                                            offs_m, len_q)
                rows = (q, do, row_stats, offs_m, _head_rows(Mask, b, h, st.mask) + _wide(offs_m)[:, None] * st.mask[2])
                keys = (K_h, V_h, offs_d, offs_dv)
                # Only the key tiles these rows can see: within this program's columns, at most one.
                tiles = key_tiles(start_m, len_q, sc, SW)
                lo, hi = tiles[0], tiles[3]
                if not COLS_SUMMED:
                    lo, hi = tl.maximum(lo, col0), tl.minimum(hi, col0 + SW.BLOCK_N)
                if SW.BLOCK_SIZE:  # a block mask: its listed blocks within [lo, hi) only
                    line = block_line(b, h, start_m, len_q, st, SW)
                    for KIND in tl.static_range(FULL_BLOCKS, PARTIAL_BLOCKS + 1):
                        if COLS_SUMMED:  # the band's blocks, as the dQ pass walks them
                            span = listed_tiles(Blocks, line, ROWS, KIND, (lo, hi), SW.BLOCK_N, SW)
                        else:  # the one block that holds this program's columns
                            span = listed_block(Blocks, line, ROWS, KIND, col0 // SW.BLOCK_SIZE, SW.BLOCK_N, SW)
                        for i in range(span[0], span[1]):
                            start_n = tile_start(i, span, KIND, SW.BLOCK_N, SW)
                            if (start_n >= lo) & (start_n < hi):  # a listed block's other tiles are not ours
                                seen = None
                                if KIND == PARTIAL_BLOCKS:
                                    seen = _block_bits(span, i, offs_m, start_n, SW.BLOCK_N, SW)
                                acc = _dmask_tile(acc, rows, keys, start_n, alibi_log2, seed, head_index, seen,
                                                  st, sc, SW)
                else:
                    for start_n in range(lo, hi, SW.BLOCK_N):
                        acc = _dmask_tile(acc, rows, keys, start_n, alibi_log2, seed, head_index, None, st, sc, SW)
    offs_r = row0 + tl.arange(0, SW.BLOCK_M)
    offs_c = col0 + tl.arange(0, SW.BLOCK_N)
    len_r, len_c = len_q, len_k
    if ROWS_SUMMED:
        acc = tl.sum(acc, 0, keep_dims=True)
        offs_r, len_r = tl.zeros([1], dtype=tl.int32), 1
    if COLS_SUMMED:
        acc = tl.sum(acc, 1, keep_dims=True)
        offs_c, len_c = tl.zeros([1], dtype=tl.int32), 1
    # Every program stores its whole tile, zeros where no key was visible.
    _store_tile(_head_rows(dMask, b_m, h_m, st.out), acc, offs_r, offs_c, st.out[2], st.out[3], len_r, len_c,
                SW.INTERPRETED_BF16)


@on_inputs_device
def attn_bwd(do, dlse_log2, q, k, v, out, lse_log2, args, *, mask_grad=False, config=None, grad_dtype=None,
             tma=None, plans=None):
    """Launches the backward passes for `args` (an `OpArgs`); returns (dq, dk, dv, dmask, dsinks):
    dq, dk, dv laid out like q, k, v, in ``grad_dtype`` (default the inputs'; float32 keeps partial
    gradients unrounded); dmask (with `mask_grad`, in the mask's shape and dtype) and dsinks (when
    there are sinks) or None.

    ``lse_log2`` is the forward's, and ``dlse_log2`` (or None) the gradient of that same output.
    With the natural-log LSE = ln 2 * lse_log2, its gradient is dlse = dlse_log2 * log2(e), and it
    folds into delta: d lse_i / d s_ij = p_ij, so ds = p * (dp - (delta - dlse)).

    Sinks: out_i = sum_j p_ij v_j with p_ij = exp(s_ij - lse_i) and lse_i = log(exp(sink) + sum_j
    exp(s_ij)), so d out_i / d sink = -p_sink_i * out_i and d lse_i / d sink = p_sink_i, where
    p_sink_i = exp(sink - lse_i). Summed over rows: dsink = -sum_i p_sink_i * (delta_i - dlse_i), the
    same folded delta; no kernel needed.

    ``tma``: None reads and writes through tensor descriptors where `uses_tma`; False forces the
    pointer path. ``plans``: as `attn_fwd`'s (the plan also depends on dO's layout).
    """
    dq, dk, dv = [torch.empty_like(x) if grad_dtype is None else torch.empty_like(x, dtype=grad_dtype)
                  for x in (q, k, v)]
    name = None if plans is None else ("bwd", do.stride(), on_16_bytes(do),
                                       q.dtype == torch.float32 and tf32_allowed())
    plan = planned(plans, name, _PLANS, lambda: (launch_key(args, q, k, v, out, do, dq), config, tma),
                   lambda: _plan(do, q, k, v, out, dq, dk, dv, args, config, tma))
    copy_do, dkdv, dq_pass = plan
    if copy_do:
        do = do.clone(memory_format=torch.contiguous_format)
    if dlse_log2 is not None:  # read as [B * Hq, Lq] rows, as the LSE
        dlse_log2 = dlse_log2.contiguous()
    delta = torch.empty_like(lse_log2)  # the dQ pass writes it, the dK/dV pass reads it
    tensors = launch_tensors(q, args)
    q_, k_, v_, out_, do_, dq_ = descriptors(dq_pass.layouts, q, k, v, out, do, dq)
    _attn_bwd_dq[dq_pass.grid](q_, k_, v_, tensors.mask, tensors.blocks, tensors.alibi, tensors.seed, out_, do_,
                               lse_log2, dlse_log2, delta, dq_, *dq_pass.scalars, **dq_pass.options)
    q_, k_, v_, do_, dk_, dv_ = descriptors(dkdv.layouts, q, k, v, do, dk, dv)
    _attn_bwd_dkdv[dkdv.grid](q_, k_, v_, tensors.mask, tensors.blocks, tensors.alibi, tensors.seed, do_, lse_log2,
                              delta, dk_, dv_, *dkdv.scalars, **dkdv.options)
    dmask = _mask_grad(q, k, v, do, lse_log2, delta, args, tensors, dq_pass) if mask_grad else None
    dsinks = None if args.sinks is None else sink_grads(args.sinks, lse_log2, delta)
    return dq, dk, dv, dmask, dsinks


_PLANS = {}


def _plan(do, q, k, v, out, dq, dk, dv, args, config, tma):
    """(whether dO is copied first, the dK/dV pass, the dQ pass)."""
    batch, num_heads_q, len_q, head_dim = q.shape
    num_heads_kv, len_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    launch = launch_args(q, k, head_dim_v, args)
    copy_do = False
    if tma is None:  # one path for both passes: dK/dV and dQ share the head-dim limit
        tma = uses_tma("dkdv", max(head_dim, head_dim_v), q, k, v, out, dq, dk, dv)
        # out.sum().backward() passes a stride-0 expand the copy engine cannot read (or a dO may sit
        # off a 16-byte boundary): one fresh copy the size of out keeps the whole backward on its
        # descriptors.
        copy_do = tma and not tma_allowed(do)
    if copy_do:
        do = do.clone(memory_format=torch.contiguous_format)  # once, for the plan's layouts
    strides = dict(q=q.stride(), k=k.stride(), v=v.stride(), mask=launch.mask_strides, alibi=launch.alibi_strides,
                   do=do.stride(), blocks=launch.block_strides)

    def pass_plan(kernel, grid_rows, block_rows, tiles, more_strides):
        """`tiles`: (tensor, whose rows it holds: "queries" or "keys") of the kernel's tensors that may
        go through descriptors, in argument order; `more_strides`: the `Strides` of those beyond q,
        k, v and dO (what the pass writes is ``out``, then ``out_v``)."""
        tile = tile_config(q, kernel, max(head_dim, head_dim_v), config, tma, launch.plain, args.block_size)
        rows = {"queries": tile.block_m, "keys": tile.block_n}
        return PassPlan(
            grid=(cdiv(grid_rows, rows[block_rows]) * batch * (num_heads_kv if kernel == "dkdv" else num_heads_q),),
            block_m=tile.block_m,
            block_n=tile.block_n,
            layouts=descriptor_layouts(tma, *((t, rows[r]) for t, r in tiles)),
            scalars=(Strides(**strides, **more_strides), num_heads_q, num_heads_q // num_heads_kv, launch.scores),
            options=dict(SW=launch.switches(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, TMA=tma),
                         num_warps=tile.num_warps, num_stages=tile.num_stages),
        )

    inputs = ((q, "queries"), (k, "keys"), (v, "keys"))
    # dQ (with the row deltas): a program per block of queries; dK/dV: per block of keys (of a kv head).
    dq_pass = pass_plan("dq", len_q, "queries", (*inputs, (out, "queries"), (do, "queries"), (dq, "queries")),
                        dict(o=out.stride(), out=dq.stride()))
    dkdv = pass_plan("dkdv", len_k, "keys", (*inputs, (do, "queries"), (dk, "keys"), (dv, "keys")),
                     dict(out=dk.stride(), out_v=dv.stride()))
    return copy_do, dkdv, dq_pass


def sink_grads(sinks, lse_log2, delta):
    """dsinks [Hq] from the forward's lse_log2 and the backward's delta, both [B, Hq, L] (see `attn_bwd`)."""
    p_sink = torch.exp2(sinks.float()[None, :, None] * LOG2E.value - lse_log2)
    # A row with no key and a -inf sink has lse -inf too: p_sink is 0 there, not NaN.
    return -(p_sink.nan_to_num(0.0) * delta).sum((0, 2)).to(sinks.dtype)


def _mask_grad(q, k, v, do, lse_log2, delta, args, tensors, dq_pass):
    """The float mask's gradient in its own shape and dtype (`_attn_bwd_dmask`), on the dQ pass's tiles
    with its score arguments."""
    batch, num_heads_q, len_q, _ = q.shape
    len_k = k.shape[2]
    shape = (1,) * (4 - args.mask.dim()) + tuple(args.mask.shape)
    dmask = torch.empty(shape, dtype=args.mask.dtype, device=q.device)
    rows_summed, cols_summed = shape[2] == 1, shape[3] == 1
    tiles = ((1 if rows_summed else cdiv(len_q, dq_pass.block_m))
             * (1 if cols_summed else cdiv(len_k, dq_pass.block_n)))
    scalars = dq_pass.scalars
    if dmask.numel():
        _attn_bwd_dmask[(shape[0] * shape[1] * tiles,)](
            q, k, v, tensors.mask, tensors.blocks, tensors.alibi, tensors.seed, do, lse_log2, delta, dmask,
            scalars[0]._replace(q=q.stride(), do=do.stride(), out=dmask.stride()), shape[:2], batch, num_heads_q,
            num_heads_q // k.shape[1], scalars[-1], SW=dq_pass.options["SW"].replaced(TMA=False),
            ROWS_SUMMED=rows_summed, COLS_SUMMED=cols_summed, num_warps=dq_pass.options["num_warps"],
            num_stages=dq_pass.options["num_stages"],
        )
    return dmask.view(args.mask.shape)
