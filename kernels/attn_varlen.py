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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attn_bwd import _attn_bwd_dkdv_cols, _attn_bwd_dq_rows, sink_grads
from .attn_common import _alibi_log2, _shifted_scores
from .attn_fwd import _attn_fwd_rows
from .attn_launch import PassPlan, launch_args, launch_key, launch_tensors, on_inputs_device, planned
from .bundles import Strides
from .config import NO_MASK, tile_config


@triton.jit
def _sequence(CuQ, CuK, TileFirst, b, bottom_right, BLOCK: tl.constexpr):
    """For this program's sequence b: the first row of its tile, the sequence's first query and key
    rows (int64), its lengths, and the shift of its diagonal (Lk - Lq when aligned bottom-right)."""
    start = (tl.program_id(0) - tl.load(TileFirst + b)) * BLOCK
    q0, k0 = tl.load(CuQ + b), tl.load(CuK + b)
    len_q, len_k = tl.load(CuQ + b + 1) - q0, tl.load(CuK + b + 1) - k0
    return start, q0.to(tl.int64), k0.to(tl.int64), len_q, len_k, (len_k - len_q) * bottom_right


# Triton 3.6 builds a named tuple in a kernel only from values for every field (no defaults, no
# literal ()): the kernels pass on the fields they do not change.
@triton.jit
def _rows(strides):
    """A packed tensor's (token, head, column) strides as the dense row bodies index them: (batch 0,
    head, row, column), its pointer at the sequence's first row."""
    return 0, strides[1], strides[0], strides[2]


@triton.jit
def _varlen_fwd(Q, K, V, Alibi, Sinks, Seed, Out, Lse, schedule, st, num_seqs, group_size, bottom_right, sc,
                SW: tl.constexpr):
    """A program per (tile of BLOCK_M queries of one sequence, query head); `schedule`: (cu_seqlens_q,
    cu_seqlens_k, each program's sequence, each sequence's first tile); `sc`: the launch's `Scores`
    (lengths: the totals; the band relative to each sequence's diagonal)."""
    CuQ, CuK, TileSeq, TileFirst = schedule
    b = tl.load(TileSeq + tl.program_id(0))
    if b >= num_seqs:  # past the last real tile
        return
    start_m, q0, k0, len_q, len_k, shift = _sequence(CuQ, CuK, TileFirst, b, bottom_right, SW.BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    h_kv = h // group_size
    rows = Strides(q=_rows(st.q), k=_rows(st.k), v=_rows(st.v), mask=(0, 0, 0, 0), alibi=st.alibi, do=st.do,
                   o=st.o, out=_rows(st.out), out_v=st.out_v, table=st.table, blocks=st.blocks)
    # Q stands in for the mask's and the block mask's pointers, which NO_MASK and BLOCK_SIZE 0 never read.
    _attn_fwd_rows(Q + q0 * st.q[0] + h * st.q[1], K + k0 * st.k[0] + h_kv * st.k[1], V + k0 * st.v[0] + h_kv * st.v[1],
                   Out + q0 * st.out[0] + h * st.out[1], Lse + h * sc.len_q + q0, (Q, (Q, Q)),
                   _alibi_log2(Alibi, b, h, st.alibi, SW.ALIBI), Sinks + h, Seed, (start_m, 0, h, h_kv), (h, q0, k0),
                   rows, _shifted_scores(sc, len_q, len_k, shift), SW)


@triton.jit(do_not_specialize=["group_size"])  # as _attn_bwd_dkdv's: no wgmma serialization for MHA
def _varlen_bwd_dkdv(Q, K, V, Alibi, Seed, dO, Lse, Delta, dK, dV, schedule, st, num_seqs, group_size, bottom_right,
                     sc, SW: tl.constexpr):
    """A program per (tile of BLOCK_N keys of one sequence, kv head); as `_varlen_fwd`."""
    CuQ, CuK, TileSeq, TileFirst = schedule
    b = tl.load(TileSeq + tl.program_id(0))
    if b >= num_seqs:
        return
    start_n, q0, k0, len_q, len_k, shift = _sequence(CuQ, CuK, TileFirst, b, bottom_right, SW.BLOCK_N)
    h_kv = tl.program_id(1).to(tl.int64)
    rows = Strides(q=_rows(st.q), k=_rows(st.k), v=_rows(st.v), mask=(0, 0, 0, 0), alibi=st.alibi, do=_rows(st.do),
                   o=st.o, out=_rows(st.out), out_v=_rows(st.out_v), table=st.table, blocks=st.blocks)
    # The LSE and delta are [Hq, total_q] rows: head h's statistics are total_q apart.
    _attn_bwd_dkdv_cols(Q + q0 * st.q[0], K + k0 * st.k[0] + h_kv * st.k[1], V + k0 * st.v[0] + h_kv * st.v[1],
                        dO + q0 * st.do[0], dK + k0 * st.out[0] + h_kv * st.out[1],
                        dV + k0 * st.out_v[0] + h_kv * st.out_v[1], (Q, (Q, Q)), Alibi + b * st.alibi[0], Seed,
                        (Lse + q0, Delta + q0, sc.len_q), (start_n, 0, h_kv), group_size, (0, q0, k0), rows,
                        _shifted_scores(sc, len_q, len_k, shift), SW)


@triton.jit
def _varlen_bwd_dq(Q, K, V, Alibi, Seed, Out, dO, Lse, dLse, Delta, dQ, schedule, st, num_seqs, group_size,
                   bottom_right, sc, SW: tl.constexpr):
    """A program per (tile of BLOCK_M queries of one sequence, query head); as `_varlen_fwd`."""
    CuQ, CuK, TileSeq, TileFirst = schedule
    b = tl.load(TileSeq + tl.program_id(0))
    if b >= num_seqs:
        return
    start_m, q0, k0, len_q, len_k, shift = _sequence(CuQ, CuK, TileFirst, b, bottom_right, SW.BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    h_kv = h // group_size
    stats = h * sc.len_q + q0
    if dLse is not None:
        dLse += stats
    rows = Strides(q=_rows(st.q), k=_rows(st.k), v=_rows(st.v), mask=(0, 0, 0, 0), alibi=st.alibi, do=_rows(st.do),
                   o=_rows(st.o), out=_rows(st.out), out_v=st.out_v, table=st.table, blocks=st.blocks)
    _attn_bwd_dq_rows(Q + q0 * st.q[0] + h * st.q[1], K + k0 * st.k[0] + h_kv * st.k[1],
                      V + k0 * st.v[0] + h_kv * st.v[1],
                      (Out + q0 * st.o[0] + h * st.o[1], dO + q0 * st.do[0] + h * st.do[1]),
                      dQ + q0 * st.out[0] + h * st.out[1], (Q, (Q, Q)), _alibi_log2(Alibi, b, h, st.alibi, SW.ALIBI),
                      Seed, (Lse + stats, dLse, Delta + stats), (start_m, 0, h, h_kv), (h, q0, k0), rows,
                      _shifted_scores(sc, len_q, len_k, shift), SW)


def tile_schedule(cu_seqlens, block, programs):
    """(the sequence of each program's tile, int32 [grid]; each sequence's first tile, int32 [B + 1])
    for `programs`, int32 ``arange(grid)``: sequence b has ``cdiv(L_b, block)`` tiles, numbered after
    the earlier sequences'. The grid (`tile_grid`) bounds the tile count without reading the lengths
    on the host; programs past the last tile get sequence B (none). Six small device ops: a
    call's only work that depends on its lengths' values."""
    tiles = (cu_seqlens[1:] - cu_seqlens[:-1] + (block - 1)) // block
    first = torch.nn.functional.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0))
    return torch.searchsorted(first[1:], programs, right=True, out_int32=True), first


def tile_grid(total, block, num_seqs):
    """``total // block + B``: at least ``sum_b cdiv(L_b, block)`` for any B lengths adding up to `total`."""
    return total // block + num_seqs


def _switches(launch, tile, **per_pass):
    """A packed pass's `Switches`: pointers, no mask."""
    return launch.switches(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, MASK_KIND=NO_MASK.value, TMA=False,
                           **per_pass)


def _cu_seqlens(args):
    """Both cu_seqlens at unit stride, as the kernels read them (cu[b], cu[b + 1])."""
    return args.cu_seqlens_q.contiguous(), args.cu_seqlens_k.contiguous()


_PLANS = {}


class PackedPlan(NamedTuple):
    """A packed pass's launch plan and its programs' numbers, int32 ``arange(grid)`` (`tile_schedule`
    maps them to tiles on every call: the sequences' lengths are values)."""

    launch: PassPlan
    programs: torch.Tensor


def _pass_plan(q, tile, rows, heads, strides, launch, args, **per_pass):
    """A packed pass's `PackedPlan`: programs over `rows` packed rows in tiles of ``tile.block_m`` (or
    ``block_n``: ``per_pass["rows_block"]``) per head."""
    block = per_pass.pop("rows_block")
    num_seqs = len(args.cu_seqlens_q) - 1
    grid = tile_grid(rows, block, num_seqs)
    return PackedPlan(PassPlan(
        grid=(grid, heads),
        block_m=tile.block_m,
        block_n=tile.block_n,
        layouts=(),
        scalars=(strides, num_seqs, q.shape[1] // per_pass.pop("heads_kv"), int(args.bottom_right), launch.scores),
        options=dict(SW=_switches(launch, tile, **per_pass), num_warps=tile.num_warps, num_stages=tile.num_stages),
    ), torch.arange(grid, device=q.device, dtype=torch.int32))


@on_inputs_device
def varlen_fwd(q, k, v, args, *, config=None, plans=None):
    """Launches the packed forward for `args` (an `OpArgs` with cu_seqlens); returns (out
    ``[total_q, Hq, Dv]`` contiguous in q's dtype, lse_log2 ``[Hq, total_q]`` float32 in log2 units).
    ``plans``: as `attn_fwd`'s."""
    total_q, num_heads_q, head_dim = q.shape
    head_dim_v = v.shape[-1]
    out = q.new_empty(total_q, num_heads_q, head_dim_v)
    lse_log2 = torch.empty(num_heads_q, total_q, device=q.device, dtype=torch.float32)
    plan, programs = planned(plans, "varlen fwd", _PLANS, lambda: ("fwd", launch_key(args, q, k, v), config),
                              lambda: _fwd_plan(q, k, v, out, args, config))
    cu_seqlens = _cu_seqlens(args)
    if plan.grid[0]:
        tensors = launch_tensors(q, args)
        schedule = (*cu_seqlens, *tile_schedule(cu_seqlens[0], plan.block_m, programs))
        _varlen_fwd[plan.grid](q, k, v, tensors.alibi, tensors.sinks, tensors.seed, out, lse_log2, schedule,
                               *plan.scalars, **plan.options)
    return out, lse_log2


def _fwd_plan(q, k, v, out, args, config):
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    launch = launch_args(q, k, head_dim_v, args)
    tile = tile_config(q, "fwd", max(head_dim, head_dim_v), config)
    strides = Strides(q=q.stride(), k=k.stride(), v=v.stride(), alibi=launch.alibi_strides, out=out.stride())
    return _pass_plan(q, tile, q.shape[0], q.shape[1], strides, launch, args, rows_block=tile.block_m,
                      heads_kv=k.shape[1], SINKS=args.sinks is not None)


@on_inputs_device
def varlen_bwd(do, dlse_log2, q, k, v, out, lse_log2, args, *, config=None, plans=None):
    """Launches the packed backward; returns (dq, dk, dv, None, dsinks or None), as `attn_bwd` does
    (a packed call has no mask). ``plans``: as `attn_bwd`'s."""
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    (dkdv, dkdv_programs), (dq_pass, dq_programs) = planned(
        plans, ("varlen bwd", do.stride()), _PLANS, lambda: ("bwd", launch_key(args, q, k, v, out, do), config),
        lambda: _bwd_plans(do, q, k, v, out, dq, dk, dv, args, config))
    if dlse_log2 is not None:  # read as [Hq, total_q] rows, as the LSE
        dlse_log2 = dlse_log2.contiguous()
    delta = torch.empty_like(lse_log2)  # [Hq, total_q]: the dQ pass writes it, the dK/dV pass reads it
    tensors = launch_tensors(q, args)
    cu_seqlens = _cu_seqlens(args)
    if dq_pass.grid[0]:  # tiles of queries
        schedule = (*cu_seqlens, *tile_schedule(cu_seqlens[0], dq_pass.block_m, dq_programs))
        _varlen_bwd_dq[dq_pass.grid](q, k, v, tensors.alibi, tensors.seed, out, do, lse_log2, dlse_log2, delta, dq,
                                     schedule, *dq_pass.scalars, **dq_pass.options)
    if dkdv.grid[0]:  # tiles of keys
        schedule = (*cu_seqlens, *tile_schedule(cu_seqlens[1], dkdv.block_n, dkdv_programs))
        _varlen_bwd_dkdv[dkdv.grid](q, k, v, tensors.alibi, tensors.seed, do, lse_log2, delta, dk, dv, schedule,
                                    *dkdv.scalars, **dkdv.options)
    dsinks = None if args.sinks is None else sink_grads(args.sinks, lse_log2[None], delta[None])
    return dq, dk, dv, None, dsinks


def _bwd_plans(do, q, k, v, out, dq, dk, dv, args, config):
    """(the dK/dV pass's plan, the dQ pass's)."""
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    launch = launch_args(q, k, head_dim_v, args)
    dkdv = tile_config(q, "dkdv", max(head_dim, head_dim_v), config)
    dq_tile = tile_config(q, "dq", max(head_dim, head_dim_v), config)
    strides = dict(q=q.stride(), k=k.stride(), v=v.stride(), alibi=launch.alibi_strides, do=do.stride())
    return (_pass_plan(q, dkdv, k.shape[0], k.shape[1], Strides(**strides, out=dk.stride(), out_v=dv.stride()), launch,
                       args, rows_block=dkdv.block_n, heads_kv=k.shape[1]),
            _pass_plan(q, dq_tile, q.shape[0], q.shape[1], Strides(**strides, o=out.stride(), out=dq.stride()), launch,
                       args, rows_block=dq_tile.block_m, heads_kv=k.shape[1]))
