"""Forward pass: each program owns BLOCK_M queries of one (batch, head) and streams K/V tiles with
an online softmax (running max and sum), writing O and the row log-sum-exp; no [Lq, Lk] tensor."""

import torch
import triton
import triton.language as tl

from .attn_common import (LOG2E, _alibi_log2, _block_bits, _dot, _dropout_keep, _head_rows, _load_rows,
                          _masked_scores, _program_block, _rounded, _row_stats, _store_rows, _wide)
from .attn_launch import (PassPlan, descriptor_layouts, descriptors, launch_args, launch_key, launch_tensors,
                          on_inputs_device, planned, uses_tma)
from .bundles import Strides
from .schedule import (CONTIGUOUS, FULL_BLOCKS, PARTIAL_BLOCKS, ROWS, block_line, key_tiles, listed_tiles, segment,
                       tile_start)
from .config import NO_MASK, cdiv, tile_config
from .layout import empty_like_q


@triton.jit
def _online_softmax(s, unit, m_i, l_i, HIDDEN: tl.constexpr = True):
    """One tile of log2-domain scores ``s * unit`` (`_masked_scores`; unit > 0) into a row's running
    max `m_i` and sum `l_i`: returns the tile's unnormalized probabilities, the factor that rescales
    what was accumulated so far, and the new sum and max. ``HIDDEN``: whether a score may be -inf
    (masked); a tile without one gives every row a finite max."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * unit)
    m_shift = m_new
    if HIDDEN:  # a row that has seen no visible key has max -inf: shift by 0, so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * unit - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _with_sink(acc, l_i, m_i, sink):
    """The sink logit (natural log; a scalar or one per row) joins each row's normalizer with no
    value: rescaled as one more key."""
    sink_log2 = (sink.to(tl.float32) * LOG2E) + tl.zeros_like(m_i)
    _, alpha, l_i, m_i = _online_softmax(sink_log2[:, None], 1.0, m_i, l_i)
    return acc * alpha[:, None], l_i, m_i


@triton.jit
def _normalized(acc, l_i, m_i):
    """(output rows, log2-domain LSE) of a finished online softmax. A row with no visible key (and no
    sink) has l_i = 0: its output is 0 and its lse -inf, never NaN."""
    empty = l_i == 0.0
    # The LSE stays in log2 units (the scores' domain): the backward's exp2(s - lse) then gives p = 1
    # exactly for a row's max score, which a round trip through natural-log units would not at
    # scores of ~1e4 (its relative rounding error times the score).
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))


@triton.jit
def _attn_fwd_tiles(state, q, K, V, extra, offs, at, drop, span, st, sc, EDGE: tl.constexpr, SW: tl.constexpr,
                    KIND: tl.constexpr = CONTIGUOUS):
    """The online softmax `state` (acc, l_i, m_i) of the rows `offs` = (queries, head dims of K, of V)
    carried over the key tiles of `span` (``KIND`` CONTIGUOUS: [start, stop); else a block mask's
    listed blocks, `listed_tiles`) of (b, h_kv) = `at`; `extra`: the rows' mask pointers, ALiBi slope
    and dropout seed; `drop`: the dropout key's (head, query, key) offsets."""
    acc, l_i, m_i = state
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
        s, _, unit = _masked_scores(q, k_t, offs_m, offs_n, mask_row_ptrs + _wide(offs_n)[None, :] * st.mask[3],
                                    alibi_log2, sc, EDGE, SW, False, seen)
        p, alpha, l_i, m_new = _online_softmax(s, unit, m_i, l_i,
                                               EDGE or SW.MASK_KIND != NO_MASK or KIND == PARTIAL_BLOCKS)
        if SW.DROPOUT:
            # The normalizer sums every probability; dropout acts on the normalized ones.
            keep = _dropout_keep(seed, offs_m + drop_q0, offs_n + drop_k0, drop_head, sc.dropout_p)
            p = tl.where(keep, p * sc.dropout_scale, 0.0)
        v = _load_rows(V, b, h_kv, start_n, offs_n, offs_dv, st.v, sc.len_k, SW.HEAD_DIM_V, False, SW)
        acc = acc * alpha[:, None] + _dot(_rounded(p, SW.INTERPRETED_BF16).to(v.dtype), v, SW.INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_rows(Q, K, V, Out, Lse, masks, alibi_log2, Sinks, Seed, at, drop, st, sc, SW: tl.constexpr):
    """Queries [start_m, start_m + BLOCK_M) of one (sequence, head), `at` = (start_m, b, h, h_kv):
    `masks` = (Mask, Blocks), Mask pointing at its first row, Blocks a block mask's (lists, bits),
    read with ``SW.BLOCK_SIZE``; Lse points at its first row statistic, Sinks at its head's sink; Q,
    K, V and Out too, or with ``TMA`` they are tensor descriptors and (b, h) and (b, h_kv) pick the
    rows (`_load_rows`). The dropout
    pattern is keyed by (head, q0 + query, k0 + key), `drop` = (head, q0, k0). `st`: the `Strides`,
    `sc`: the sequence's `Scores`, `SW`: the `Switches`."""
    start_m, b, h, h_kv = at
    Mask, Blocks = masks
    offs_m = start_m + tl.arange(0, SW.BLOCK_M)
    offs_d = tl.arange(0, SW.HEAD_DIM_PAD)
    offs_dv = tl.arange(0, SW.HEAD_DIM_V_PAD)
    q = _load_rows(Q, b, h, start_m, offs_m, offs_d, st.q, sc.len_q, SW.HEAD_DIM, False, SW)
    mask_row_ptrs = Mask + _wide(offs_m)[:, None] * st.mask[2]
    seed = tl.load(Seed) if SW.DROPOUT else 0

    m_i = tl.full([SW.BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([SW.BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([SW.BLOCK_M, SW.HEAD_DIM_V_PAD], dtype=tl.float32)
    state = (acc, l_i, m_i)
    tiles = key_tiles(start_m, sc.len_q, sc, SW)
    extra = (mask_row_ptrs, alibi_log2, seed)
    if SW.BLOCK_SIZE:  # the block mask's full blocks, then its partial ones, within the band
        line = block_line(b, h, start_m, sc.len_q, st, SW)
        for KIND in tl.static_range(FULL_BLOCKS, PARTIAL_BLOCKS + 1):
            span = listed_tiles(Blocks, line, ROWS, KIND, (tiles[0], tiles[3]), SW.BLOCK_N, SW)
            state = _attn_fwd_tiles(state, q, K, V, extra, (offs_m, offs_d, offs_dv), (b, h_kv), drop, span, st, sc,
                                    SW.BANDED, SW, KIND)
    else:  # boundary tiles get the element-wise band mask, interior tiles skip it, dead tiles are not visited
        for SEGMENT in tl.static_range(3):
            state = _attn_fwd_tiles(state, q, K, V, extra, (offs_m, offs_d, offs_dv), (b, h_kv), drop,
                                    segment(SEGMENT, tiles), st, sc, SEGMENT != 1, SW)
    acc, l_i, m_i = state
    if SW.SINKS:
        acc, l_i, m_i = _with_sink(acc, l_i, m_i, tl.load(Sinks))
    out, lse = _normalized(acc, l_i, m_i)
    _store_rows(Out, b, h, start_m, out, offs_m, offs_dv, st.out, sc.len_q, SW.HEAD_DIM_V, SW.INTERPRETED_BF16,
                SW.TMA)
    tl.store(Lse + offs_m, lse, mask=offs_m < sc.len_q)


@triton.jit
def _attn_fwd(Q, K, V, Mask, Blocks, Alibi, Sinks, Seed, Out, Lse, st, num_heads_q, group_size, sc,
              SW: tl.constexpr):
    """A program per block of BLOCK_M queries of one (batch, query head), the heaviest blocks first.
    Q, K, V and Out are tensor descriptors with ``TMA``, else pointers; the rest pointers."""
    head_index, b, h, start_m = _program_block(sc.len_q, num_heads_q, SW.BLOCK_M, True)
    h_kv = h // group_size
    if not SW.TMA:  # pointers at (b, h)'s first rows; descriptors take (b, h) as coordinates
        Q = _head_rows(Q, b, h, st.q)
        Out = _head_rows(Out, b, h, st.out)
        K = _head_rows(K, b, h_kv, st.k)
        V = _head_rows(V, b, h_kv, st.v)
    _attn_fwd_rows(Q, K, V, Out, _row_stats(Lse, head_index, sc.len_q), (_head_rows(Mask, b, h, st.mask), Blocks),
                   _alibi_log2(Alibi, b, h, st.alibi, SW.ALIBI), Sinks + h, Seed, (start_m, b, h, h_kv),
                   (head_index, 0, 0), st, sc, SW)


_PLANS = {}


@on_inputs_device
def attn_fwd(q, k, v, args, *, config=None, out_dtype=None, tma=None, plans=None):
    """Launches the forward for `args` (an `OpArgs`); returns (out [B, Hq, Lq, Dv] laid out like q,
    lse_log2).

    ``out`` is in ``out_dtype`` (default q's; float32 keeps a partial result unrounded).
    ``lse_log2`` is ``[B, Hq, Lq]`` float32 in log2 units (times ln 2 it is the natural-log LSE);
    the backward takes it as is. ``tma``: None reads through tensor descriptors where
    `uses_tma`; False forces the pointer path.

    ``plans``: None, or a dict shared by every call whose static parts (shapes, strides, dtypes,
    alignment, rules) are this call's, with the default options (`attn_ops`' `Problem.plans`): the
    launch plan is kept there and found without computing its `launch_key`.
    """
    out = empty_like_q(q, v.shape[-1], out_dtype)
    plan, lse_like = planned(plans, "fwd", _PLANS, lambda: (launch_key(args, q, k, v, out), config, tma),
                             lambda: (_plan(q, k, v, out, args, config, tma), _lse_like(q)))
    lse_log2 = torch.empty_like(lse_like)
    tensors = launch_tensors(q, args)
    q_, k_, v_, out_ = descriptors(plan.layouts, q, k, v, out)
    _attn_fwd[plan.grid](q_, k_, v_, tensors.mask, tensors.blocks, tensors.alibi, tensors.sinks, tensors.seed, out_,
                         lse_log2, *plan.scalars, **plan.options)
    return out, lse_log2


def _lse_like(q):
    """A one-element float32 tensor on q's device seen as [B, Hq, Lq]: `torch.empty_like` of it is a
    new contiguous LSE, a third of `new_empty`'s host time (no arguments to parse)."""
    return q.new_empty(1, dtype=torch.float32).expand(q.shape[:3])


def _plan(q, k, v, out, args, config, tma):
    batch, num_heads_q, len_q, head_dim = q.shape
    head_dim_v = v.shape[-1]
    launch = launch_args(q, k, head_dim_v, args)
    if tma is None:
        tma = uses_tma("fwd", max(head_dim, head_dim_v), q, k, v, out)
    block_m, block_n, num_warps, num_stages = tile_config(q, "fwd", max(head_dim, head_dim_v), config, tma,
                                                              launch.plain, args.block_size)
    return PassPlan(
        grid=(cdiv(len_q, block_m) * batch * num_heads_q,),
        block_m=block_m,
        block_n=block_n,
        layouts=descriptor_layouts(tma, (q, block_m), (k, block_n), (v, block_n), (out, block_m)),
        scalars=(Strides(q=q.stride(), k=k.stride(), v=v.stride(), mask=launch.mask_strides, alibi=launch.alibi_strides,
                         out=out.stride(), blocks=launch.block_strides),
                 num_heads_q, num_heads_q // k.shape[1], launch.scores),
        options=dict(SW=launch.switches(BLOCK_M=block_m, BLOCK_N=block_n, SINKS=args.sinks is not None, TMA=tma),
                     num_warps=num_warps, num_stages=num_stages),
    )
