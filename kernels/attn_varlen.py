"""Packed variable-length sequences (`attn_ops.varlen_attention`): q ``[total_q, Hq, D]``, k and v
``[total_k, Hkv, D or Dv]``, sequence b's rows at ``cu_seqlens[b] : cu_seqlens[b + 1]``.

The per-block bodies are the dense passes' (`_attn_fwd_rows`, `_attn_bwd_dkdv_cols`,
`_attn_bwd_dq_rows`): only where a program's rows live differs. Each program owns one real tile of
one sequence. A tile schedule, built by torch on the device (no host sync), maps program p to the
sequence its tile is in; the grid is ``total // BLOCK + B``, an upper bound of ``sum_b cdiv(L_b, BLOCK)``,
so at most B programs per head find no tile and return at once, and the work is proportional to
``sum_b Lq_b * Lk_b``, not ``B * max_q * max_k``. Within a sequence everything is local: the band,
ALiBi's distances, the bounds; only the dropout key uses packed positions, so the pattern of a
sequence does not depend on how the batch was tiled.
"""

import torch
import triton
import triton.language as tl

from .attn_bwd import _attn_bwd_dkdv_cols, _attn_bwd_dq_rows, row_deltas, sink_grads
from .attn_common import _alibi_log2
from .attn_fwd import _attn_fwd_rows
from .attn_launch import launch_args, launch_tensors, on_inputs_device
from .config import NO_MASK, tile_config


@triton.jit
def _sequence(CuQ, CuK, TileFirst, b, bottom_right, BLOCK: tl.constexpr):
    """For this program's sequence b: the first row of its tile, the sequence's first query and key
    rows (int64), its lengths, and the shift of its diagonal (Lk - Lq when aligned bottom-right)."""
    start = (tl.program_id(0) - tl.load(TileFirst + b)) * BLOCK
    q0, k0 = tl.load(CuQ + b), tl.load(CuK + b)
    len_q, len_k = tl.load(CuQ + b + 1) - q0, tl.load(CuK + b + 1) - k0
    return start, q0.to(tl.int64), k0.to(tl.int64), len_q, len_k, (len_k - len_q) * bottom_right


@triton.jit
def _varlen_fwd(Q, K, V, Alibi, Sinks, Seed, Out, Lse, CuQ, CuK, TileSeq, TileFirst,
                stride_qt, stride_qh, stride_qd,
                stride_kt, stride_kh, stride_kd,
                stride_vt, stride_vh, stride_vd,
                stride_ab, stride_ah,
                stride_ot, stride_oh, stride_od,
                num_seqs, group_size, total_q, band_lo, band_hi, bottom_right, qk_scale, softcap_log2, dropout_p,
                dropout_scale,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, SINKS: tl.constexpr, DROPOUT: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    b = tl.load(TileSeq + tl.program_id(0))
    if b >= num_seqs:  # past the last real tile
        return
    start_m, q0, k0, len_q, len_k, shift = _sequence(CuQ, CuK, TileFirst, b, bottom_right, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    h_kv = h // group_size
    # Q stands in for the mask pointer, which NO_MASK never reads.
    _attn_fwd_rows(Q + q0 * stride_qt + h * stride_qh, K + k0 * stride_kt + h_kv * stride_kh,
                   V + k0 * stride_vt + h_kv * stride_vh, Q, _alibi_log2(Alibi, b, h, stride_ab, stride_ah, ALIBI),
                   Sinks + h, Seed, Out + q0 * stride_ot + h * stride_oh, Lse + h * total_q + q0, start_m, 0, h, h_kv,
                   h, q0, k0,
                   stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, 0, 0, stride_ot, stride_od,
                   len_q, len_k, band_lo + shift, band_hi + shift, shift, qk_scale, softcap_log2, dropout_p,
                   dropout_scale, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, NO_MASK,
                   SOFTCAP, ALIBI, SINKS, DROPOUT, INTERPRETED_BF16, INPUT_PRECISION, False)


@triton.jit(do_not_specialize=["group_size"])  # as _attn_bwd_dkdv's: no wgmma serialization for MHA
def _varlen_bwd_dkdv(Q, K, V, Alibi, Seed, dO, Lse, Delta, dK, dV, CuQ, CuK, TileSeq, TileFirst,
                     stride_qt, stride_qh, stride_qd,
                     stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd,
                     stride_ab, stride_ah,
                     stride_dot, stride_doh, stride_dod,
                     stride_dkt, stride_dkh, stride_dkd,
                     stride_dvt, stride_dvh, stride_dvd,
                     num_seqs, group_size, total_q, band_lo, band_hi, bottom_right, qk_scale, softcap_log2, scale,
                     dropout_p, dropout_scale,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                     HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                     INTERPRETED_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    b = tl.load(TileSeq + tl.program_id(0))
    if b >= num_seqs:
        return
    start_n, q0, k0, len_q, len_k, shift = _sequence(CuQ, CuK, TileFirst, b, bottom_right, BLOCK_N)
    h_kv = tl.program_id(1).to(tl.int64)
    # The LSE and delta are [Hq, total_q] rows: head h's statistics are total_q apart.
    _attn_bwd_dkdv_cols(Q + q0 * stride_qt, K + k0 * stride_kt + h_kv * stride_kh, V + k0 * stride_vt + h_kv * stride_vh,
                        Q, Alibi + b * stride_ab, Seed, dO + q0 * stride_dot, Lse + q0, Delta + q0,
                        dK + k0 * stride_dkt + h_kv * stride_dkh, dV + k0 * stride_dvt + h_kv * stride_dvh, start_n, 0,
                        h_kv, group_size, 0, q0, k0, stride_qh, stride_qt, stride_qd, stride_kt, stride_kd, stride_vt,
                        stride_vd, 0, 0, 0, stride_ah, stride_doh, stride_dot, stride_dod, total_q, stride_dkt,
                        stride_dkd, stride_dvt, stride_dvd, len_q, len_k, band_lo + shift, band_hi + shift, shift,
                        qk_scale, softcap_log2, scale, dropout_p, dropout_scale, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V,
                        HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, NO_MASK, SOFTCAP, ALIBI, DROPOUT, INTERPRETED_BF16,
                        INPUT_PRECISION, False)


@triton.jit
def _varlen_bwd_dq(Q, K, V, Alibi, Seed, dO, Lse, Delta, dQ, CuQ, CuK, TileSeq, TileFirst,
                   stride_qt, stride_qh, stride_qd,
                   stride_kt, stride_kh, stride_kd,
                   stride_vt, stride_vh, stride_vd,
                   stride_ab, stride_ah,
                   stride_dot, stride_doh, stride_dod,
                   stride_dqt, stride_dqh, stride_dqd,
                   num_seqs, group_size, total_q, band_lo, band_hi, bottom_right, qk_scale, softcap_log2, scale,
                   dropout_p, dropout_scale,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                   ALIBI: tl.constexpr, DROPOUT: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    b = tl.load(TileSeq + tl.program_id(0))
    if b >= num_seqs:
        return
    start_m, q0, k0, len_q, len_k, shift = _sequence(CuQ, CuK, TileFirst, b, bottom_right, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    h_kv = h // group_size
    stats = h * total_q + q0
    _attn_bwd_dq_rows(Q + q0 * stride_qt + h * stride_qh, K + k0 * stride_kt + h_kv * stride_kh,
                      V + k0 * stride_vt + h_kv * stride_vh, Q, _alibi_log2(Alibi, b, h, stride_ab, stride_ah, ALIBI),
                      Seed, dO + q0 * stride_dot + h * stride_doh, Lse + stats, Delta + stats,
                      dQ + q0 * stride_dqt + h * stride_dqh, start_m, 0, h, h_kv, h, q0, k0, stride_qt, stride_qd,
                      stride_kt,
                      stride_kd, stride_vt, stride_vd, 0, 0, stride_dot, stride_dod, stride_dqt, stride_dqd, len_q,
                      len_k, band_lo + shift, band_hi + shift, shift, qk_scale, softcap_log2, scale, dropout_p,
                      dropout_scale, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, NO_MASK,
                      SOFTCAP, ALIBI, DROPOUT, INTERPRETED_BF16, INPUT_PRECISION, False)


def tile_schedule(cu_seqlens, block, total):
    """(the sequence of each program's tile, int32 [grid]; each sequence's first tile, int32 [B + 1];
    grid): sequence b has ``cdiv(L_b, block)`` tiles, numbered after the earlier sequences'. The grid,
    ``total // block + B``, bounds the tile count without reading the lengths on the host; programs
    past the last tile get sequence B (none)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    first = torch.zeros_like(cu_seqlens)
    first[1:] = torch.cumsum((lengths + block - 1) // block, 0)
    grid = total // block + lengths.shape[0]
    programs = torch.arange(grid, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(first[1:], programs, right=True).to(torch.int32), first, grid


def _cu_seqlens(args):
    """Both cu_seqlens at unit stride, as the kernels read them (cu[b], cu[b + 1])."""
    return args.cu_seqlens_q.contiguous(), args.cu_seqlens_k.contiguous()


@on_inputs_device
def varlen_fwd(q, k, v, args, *, config=None):
    """Launches the packed forward for `args` (a `KernelArgs` with cu_seqlens); returns (out
    ``[total_q, Hq, Dv]`` contiguous in q's dtype, lse_log2 ``[Hq, total_q]`` float32 in log2 units)."""
    total_q, num_heads_q, head_dim = q.shape
    total_k, num_heads_kv, head_dim_v = v.shape
    out = q.new_empty(total_q, num_heads_q, head_dim_v)
    lse_log2 = torch.empty(num_heads_q, total_q, device=q.device, dtype=torch.float32)
    launch = launch_args(q, k, head_dim_v, args)
    tensors = launch_tensors(q, args)
    tile = tile_config(q, "fwd", max(head_dim, head_dim_v), config)
    cu_seqlens = _cu_seqlens(args)
    tile_seq, tile_first, grid = tile_schedule(cu_seqlens[0], tile.block_m, total_q)
    if grid:
        _varlen_fwd[(grid, num_heads_q)](
            q, k, v, tensors.alibi, tensors.sinks, tensors.seed, out, lse_log2, *cu_seqlens, tile_seq, tile_first,
            *q.stride(), *k.stride(), *v.stride(), *launch.alibi_strides, *out.stride(),
            len(args.cu_seqlens_q) - 1, num_heads_q // num_heads_kv, total_q, launch.band_lo, launch.band_hi,
            int(args.bottom_right), launch.qk_scale, launch.softcap_log2, args.dropout_p, launch.dropout_scale,
            **launch.constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SINKS=args.sinks is not None,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
    return out, lse_log2


@on_inputs_device
def varlen_bwd(do, dlse_log2, q, k, v, out, lse_log2, args, *, config=None):
    """Launches the packed backward; returns (dq, dk, dv, None, dsinks or None), as `attn_bwd` does
    (a packed call has no mask)."""
    total_q, num_heads_q, head_dim = q.shape
    total_k, num_heads_kv, head_dim_v = v.shape
    launch = launch_args(q, k, head_dim_v, args)
    tensors = launch_tensors(q, args)
    dkdv = tile_config(q, "dkdv", max(head_dim, head_dim_v), config)
    dq_tile = tile_config(q, "dq", max(head_dim, head_dim_v), config)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    # delta over [1, Hq, total_q] rows: the packed rows seen as one long sequence.
    delta = row_deltas(out.permute(1, 0, 2)[None], do.permute(1, 0, 2)[None],
                       None if dlse_log2 is None else dlse_log2[None], dq_tile.block_m)[0]
    scalars = (len(args.cu_seqlens_q) - 1, num_heads_q // num_heads_kv, total_q, launch.band_lo, launch.band_hi,
               int(args.bottom_right), launch.qk_scale, launch.softcap_log2, args.scale, args.dropout_p,
               launch.dropout_scale)
    cu_seqlens = _cu_seqlens(args)
    tile_seq, tile_first, grid = tile_schedule(cu_seqlens[1], dkdv.block_n, total_k)  # tiles of keys
    if grid:
        _varlen_bwd_dkdv[(grid, num_heads_kv)](
            q, k, v, tensors.alibi, tensors.seed, do, lse_log2, delta, dk, dv, *cu_seqlens, tile_seq, tile_first,
            *q.stride(), *k.stride(), *v.stride(), *launch.alibi_strides, *do.stride(), *dk.stride(), *dv.stride(),
            *scalars, **launch.constexprs, BLOCK_M=dkdv.block_m, BLOCK_N=dkdv.block_n, num_warps=dkdv.num_warps,
            num_stages=dkdv.num_stages,
        )
    tile_seq, tile_first, grid = tile_schedule(cu_seqlens[0], dq_tile.block_m, total_q)
    if grid:
        _varlen_bwd_dq[(grid, num_heads_q)](
            q, k, v, tensors.alibi, tensors.seed, do, lse_log2, delta, dq, *cu_seqlens, tile_seq, tile_first,
            *q.stride(), *k.stride(), *v.stride(), *launch.alibi_strides, *do.stride(), *dq.stride(),
            *scalars, **launch.constexprs, BLOCK_M=dq_tile.block_m, BLOCK_N=dq_tile.block_n, num_warps=dq_tile.num_warps,
            num_stages=dq_tile.num_stages,
        )
    dsinks = None if args.sinks is None else sink_grads(args.sinks, lse_log2[None], delta[None])
    return dq, dk, dv, None, dsinks
