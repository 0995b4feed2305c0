"""The plain PyTorch math: the fallback implementation off CUDA and the tests' ground truth.

Scores, mask, softmax, dropout, weighted sum, in float32 (float64 for float64 inputs), a chunk of
queries at a time so memory stays bounded; under autograd each chunk is checkpointed, so the
backward also holds one chunk of probabilities at a time. It does only the work a call needs: no
mask pass without a mask or a band, no LSE pass unless it is returned or a row may see no key,
no checkpointing without autograd or with a single chunk.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

from .band import band_rules
from .cache import append, sequence_rows
from .checks import check_scale
from .kernels.layout import empty_like_q, memory_order
from .problem import describe

NAME = "reference"
# Scores held per chunk: B * Hq * rows * Lk elements at most (128 MiB in float32).
CHUNK_ELEMENTS = 2**25
# Under a causal or window band, queries go in at least this many chunks, each against only the
# keys its band can reach: causal then computes 5/8 of the scores instead of all of them.
BAND_CHUNKS = 4


def attention(q, k, v, *, mask=None, block_mask=None, causal=False, window=None, align=None, scale=None,
              softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0, seed=None, return_lse=False):
    """`attn_ops.attention` computed by the plain math (any device; float64 too).

    Dropout uses torch's generator: the pattern is reproducible by ``seed`` but differs, bit for bit,
    from the Triton kernels' Philox pattern (as flash-attn's and SDPA's backends differ from each other).
    """
    problem = describe(q, k, v, mask=mask, block_mask=block_mask, causal=causal, window=window, align=align,
                       scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                       seed=seed, return_lse=return_lse)
    out, lse = run(q, k, v, problem)
    return (out, lse) if return_lse else out


def not_supported_reasons(problem):
    return []  # the reference computes every call that passes the checks


def masked_scores(q, k, *, mask=None, block_mask=None, causal=False, window=None, align=None, scale=None, q_offset=0,
                  len_q=None):
    """Scaled scores with the mask applied (-inf where a key is not visible), [B, Hq, rows, Lk].

    ``q`` may be a slice of rows ``[q_offset, q_offset + rows)`` of a sequence of ``len_q`` queries
    (the causal and window rules depend on the absolute position); ``mask`` and ``block_mask`` are
    the whole sequence's and are sliced here.
    """
    len_q, len_k = q.shape[2] if len_q is None else len_q, k.shape[2]
    band = band_rules(len_q, len_k, causal, window, align)[3:]
    bias = _bias(mask, band, q_offset, 0, q.shape[2], len_k, len_q, len_k, _compute_dtype(q.dtype), q.device,
                 block_mask=block_mask)
    return _scores(q, k, check_scale(scale, q.shape[-1]), bias)


def run(q, k, v, problem):
    """(out laid out like q, natural-log lse [B, Hq, Lq] in the compute dtype); packed: (out
    [total_q, Hq, Dv], lse [Hq, total_q])."""
    if problem.cu_seqlens_q is not None:
        return _run_packed(q, k, v, problem)
    dtype = _compute_dtype(q.dtype)
    batch, heads, len_q, len_k = problem.batch, problem.heads_q, problem.len_q, problem.len_k
    if len_q == 0 or len_k == 0:  # nothing to compute; with no key every row is fully masked
        out = empty_like_q(q, problem.head_dim_v).zero_()
        if problem.requires_grad:  # zero gradients, not None
            out = out + 0 * sum(t.sum() for t in (q, k, v, problem.mask, problem.sinks) if t is not None)
        if problem.sinks is not None:  # the sink alone is in each row's normalizer
            return out, problem.sinks.to(dtype)[None, :, None].expand(batch, heads, len_q)
        return out, torch.full((batch, heads, len_q), float("-inf"), dtype=dtype, device=q.device)
    k, v = (_repeat_kv(t, heads).to(dtype) for t in (k, v))
    seed = int(problem.seed.item()) if problem.dropout_p > 0 else None
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * len_k))
    checkpointed = problem.requires_grad and len_q > rows  # chunked for memory: recompute in the backward
    if problem.band_lo is not None or problem.band_hi is not None:
        rows = min(rows, -(-len_q // BAND_CHUNKS))
    outs, lses = [], []
    for start in range(0, len_q, rows):
        stop = min(start + rows, len_q)
        # The keys rows [start, stop) can see: i + band_lo <= j <= i + band_hi.
        k_lo = 0 if problem.band_lo is None else min(max(start + problem.band_lo, 0), len_k)
        k_hi = len_k if problem.band_hi is None else min(max(stop + problem.band_hi, k_lo), len_k)
        args = (q[:, :, start:stop], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], problem.mask, problem, seed, start, k_lo)
        chunk_out, lse = checkpoint(_chunk, *args, use_reentrant=False) if checkpointed else _chunk(*args)
        outs.append(chunk_out)
        lses.append(lse)
    result = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    # The output is laid out like q (a [B, L, H, D] view in gives a [B, L, H, D] view out) in q's
    # dtype: a copy only where the (contiguous) result is not that already.
    if result.dtype != q.dtype or memory_order(q) != [0, 1, 2, 3]:
        result = empty_like_q(q, problem.head_dim_v).copy_(result)
    lse = None if not problem.return_lse else lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return result, lse


def _run_packed(q, k, v, problem):
    """Packed sequences one at a time, each a dense call of batch 1 with its own lengths."""
    cu_q, cu_k = torch.stack((problem.cu_seqlens_q, problem.cu_seqlens_k)).tolist()
    seed = int(problem.seed.item()) if problem.dropout_p > 0 else None
    outs = [q.new_zeros(0, problem.heads_q, problem.head_dim_v)]
    lses = [torch.zeros(problem.heads_q, 0, dtype=_compute_dtype(q.dtype), device=q.device)]
    for b in range(problem.batch):
        q_b, k_b, v_b = (t[cu[b]:cu[b + 1]].transpose(0, 1)[None] for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        slopes = problem.alibi_slopes
        sequence = describe(
            q_b, k_b, v_b, causal=problem.causal or False, window=problem.window, align=problem.align,
            scale=problem.scale, softcap=problem.softcap, sinks=problem.sinks, return_lse=problem.return_lse,
            alibi_slopes=slopes[b] if slopes is not None and slopes.dim() == 2 else slopes,
            # Each sequence's stream keyed by the packed position of its first query, as the kernels key theirs.
            dropout_p=problem.dropout_p, seed=None if seed is None else (seed + cu_q[b]) % 2**63,
        )
        out, lse = run(q_b, k_b, v_b, sequence)
        outs.append(out[0].transpose(0, 1))
        lses.append(None if lse is None else lse[0])
    out = torch.cat(outs)
    if problem.batch == 0 and problem.requires_grad:  # zero gradients, not None
        out = out + 0 * sum(t.sum() for t in (q, k, v, problem.sinks) if t is not None)
    return out, torch.cat(lses, dim=1) if problem.return_lse else None


def run_cache(q, k_cache, v_cache, k_new, v_new, problem):
    """A decoding `Problem` (`cache_seqlens` set): the new tokens appended (`cache.append`), then one sequence at a time: its keys
    read out of the cache (`cache.sequence_rows`), then a dense call of batch 1 aligned bottom-right.
    (out, natural-log lse). Reads the lengths on the host: the reference is the tests' truth and the
    CPU path, not a GPU's."""
    if problem.len_new:
        append(k_cache, v_cache, k_new, v_new, problem)
    lengths = (problem.cache_seqlens + problem.len_new).tolist()
    outs, lses = [], []
    for b, length in enumerate(lengths):
        k_b, v_b = (sequence_rows(cache, b, length, problem.block_table) for cache in (k_cache, v_cache))
        slopes = problem.alibi_slopes
        sequence = describe(
            q[b : b + 1], k_b, v_b, causal="bottom_right" if problem.causal else False, window=problem.window,
            align="bottom_right", scale=problem.scale, softcap=problem.softcap, sinks=problem.sinks,
            alibi_slopes=slopes[b] if slopes is not None and slopes.dim() == 2 else slopes, return_lse=True,
            mask=None if problem.key_mask is None else problem.key_mask[b, :length],
        )
        out, lse = run(q[b : b + 1], k_b, v_b, sequence)
        outs.append(out)
        lses.append(lse)
    out = empty_like_q(q, problem.head_dim_v)
    if not outs:  # an empty batch
        return out, q.new_empty(q.shape[:3], dtype=_compute_dtype(q.dtype))
    return out.copy_(torch.cat(outs)), torch.cat(lses)


# One block of keys at a time, for ring attention (`attn_ops.ring`): partial results in the compute
# dtype, natural-log LSE.
LSE_BASE = math.e


def run_block(q, k, v, problem):
    """(out, lse) of the queries against this block of keys, in the compute dtype; no autograd."""
    dtype = _compute_dtype(q.dtype)
    return run(q.to(dtype), k.to(dtype), v.to(dtype), problem)


def block_grads(dout, dlse, q, k, v, out, lse, problem):
    """(dq, dk, dv) in the compute dtype: the gradient of the rows' final `out` and `lse` (over every
    block of keys, merged) with respect to q and this block's k and v.

    With the final LSE, p = exp(s - lse) is this block's share of each row's final probabilities, so
    the usual backward applies block by block: dv = p^T dout, ds = p * (dout v^T - delta) with
    delta = rowsum(dout * out) - dlse, dq = scale * ds k, dk = scale * ds^T q.
    """
    dtype = _compute_dtype(q.dtype)
    batch, heads, len_q, len_k = problem.batch, problem.heads_q, problem.len_q, problem.len_k
    q, dout = q.to(dtype), dout.to(dtype)
    k, v = (_repeat_kv(t, heads).to(dtype) for t in (k, v))
    delta = (dout * out.to(dtype)).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    # A row that sees no key anywhere has lse = -inf and p = 0 (its scores are all -inf here too).
    lse = lse.masked_fill(lse == float("-inf"), 0.0)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * len_k))
    for start in range(0, len_q, rows):
        part = slice(start, min(start + rows, len_q))
        bias = _bias(problem.mask, (problem.band_lo, problem.band_hi), start, 0, part.stop - start, len_k, len_q,
                     len_k, dtype, q.device)
        p = torch.exp(_scores(q[:, :, part], k, problem.scale, bias) - lse[:, :, part, None])
        dv += p.transpose(-1, -2) @ dout[:, :, part]
        ds = p * (dout[:, :, part] @ v.transpose(-1, -2) - delta[:, :, part, None])
        dq[:, :, part] = problem.scale * (ds @ k)
        dk += problem.scale * (ds.transpose(-1, -2) @ q[:, :, part])
    return dq, _sum_groups(dk, problem.heads_kv), _sum_groups(dv, problem.heads_kv)


def _chunk(q, k, v, mask, problem, seed, q_offset, k_offset):
    """(out, lse or None) of queries [q_offset, q_offset + rows) against keys [k_offset, k_offset + Lk'),
    in the compute dtype."""
    dtype = _compute_dtype(q.dtype)
    alibi = None if problem.alibi_slopes is None else (problem.alibi_slopes, problem.diagonal_shift)
    bias = _bias(mask, (problem.band_lo, problem.band_hi), q_offset, k_offset, q.shape[2], k.shape[2],
                 problem.len_q, problem.len_k, dtype, q.device, alibi, problem.block_mask)
    scores = _scores(q, k, problem.scale, bias, problem.softcap)
    # A row with no visible key gets zeros: softmax over a finite stand-in row keeps the forward and
    # the backward free of NaN, and the stand-in's weights are then zeroed. Found at the bias's own
    # (broadcast) size, not the scores'; in eager mode the two extra passes run only where such a
    # row exists (a data-dependent branch that torch.compile could not trace without a break).
    empty = None if bias is None else (bias == float("-inf")).all(dim=-1, keepdim=True)
    if problem.sinks is not None:
        # The sink is one more logit in each row's softmax, with no value: a last column, dropped
        # after the softmax. A row is empty only if its sink is -inf too.
        sinks = problem.sinks.to(dtype).view(1, -1, 1, 1)
        scores = torch.cat([scores, sinks.expand(*scores.shape[:3], 1)], dim=-1)
        empty = None if empty is None else empty & (sinks == float("-inf"))
    if empty is not None and (torch.compiler.is_compiling() or empty.any()):
        scores = scores.masked_fill_(empty, 0.0)  # before anything saves it for the backward
        lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf")) if problem.return_lse else None
        p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    else:
        lse = torch.logsumexp(scores, dim=-1) if problem.return_lse else None
        p = torch.softmax(scores, dim=-1)
    if problem.sinks is not None:
        p = p[..., :-1]
    if problem.dropout_p > 0:
        gen = torch.Generator(device=q.device)
        gen.manual_seed((seed * 0x9E3779B1 + q_offset) % 2**63)  # one stream per chunk, replayable
        keep = torch.rand(p.shape, generator=gen, device=q.device) >= problem.dropout_p
        # dropout_p = 1 keeps nothing: scale 0, not 1 / 0 (whose gradient would be NaN).
        p = p * keep * (1.0 / (1.0 - problem.dropout_p) if problem.dropout_p < 1 else 0.0)
    return torch.matmul(p, v), lse


def _bias(mask, band, q_offset, k_offset, rows, keys, len_q, len_k, dtype, device, alibi=None, block_mask=None):
    """Everything the mask, the block mask, the band and ALiBi add to the scores of queries [q_offset,
    q_offset + rows) and keys [k_offset, k_offset + keys), as one float tensor of their broadcast shape
    (-inf where a key is not visible), or None: added to the scores in one pass, and differentiable in
    a float mask.

    ``alibi``: None or (slopes [Hq] or [B, Hq], shift): adds ``-slope * |i + shift - j|``.
    """
    terms = []
    if block_mask is not None:  # only these rows' blocks made dense
        allowed = block_mask.dense_rows(q_offset, q_offset + rows)[..., k_offset:k_offset + keys]
        terms.append(_additive(~allowed, dtype))
    if alibi is not None:
        slopes, shift = alibi
        distance = (torch.arange(q_offset + shift, q_offset + shift + rows, device=device)[:, None]
                    - torch.arange(k_offset, k_offset + keys, device=device)[None, :]).abs().to(dtype)
        terms.append(-slopes.to(dtype).view(-1 if slopes.dim() == 2 else 1, slopes.shape[-1], 1, 1) * distance)
    if mask is not None:
        if mask.dim() >= 2 and mask.shape[-2] == len_q != rows:
            mask = mask[..., q_offset : q_offset + rows, :]
        if mask.shape[-1] == len_k != keys:
            mask = mask[..., k_offset : k_offset + keys]
        terms.append(_additive(~mask, dtype) if mask.dtype == torch.bool else mask.to(dtype))
    lo, hi = band
    if lo is not None or hi is not None:
        rows_at = torch.arange(q_offset, q_offset + rows, device=device)[:, None]
        offset = torch.arange(k_offset, k_offset + keys, device=device)[None, :] - rows_at  # key minus query
        outside = torch.zeros(rows, keys, dtype=torch.bool, device=device)
        if lo is not None:
            outside |= offset < lo
        if hi is not None:
            outside |= offset > hi
        terms.append(_additive(outside, dtype))
    if not terms:
        return None
    return sum(terms[1:], terms[0])


def _additive(hidden, dtype):
    """-inf where `hidden`, 0 elsewhere."""
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))


def _scores(q, k, scale, bias, softcap=None):
    """Scaled (and capped) scores plus the bias, [B, Hq, rows, Lk], in float32 (float64 for float64)."""
    dtype = _compute_dtype(q.dtype)
    k = _repeat_kv(k, q.shape[1])
    # Scaling q (rows x D) costs less than scaling the scores (rows x Lk); in place, the bias costs one pass.
    scores = torch.matmul(q.to(dtype) * scale, k.to(dtype).transpose(-1, -2))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores if bias is None else scores.add_(bias)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sum_groups(x, num_heads_kv):
    """[B, Hq, L, D] -> [B, Hkv, L, D]: the gradient of `_repeat_kv`, each group's heads summed."""
    batch, heads, length, dim = x.shape
    return x if heads == num_heads_kv else x.view(batch, num_heads_kv, heads // num_heads_kv, length, dim).sum(2)


def _repeat_kv(x, num_heads_q):
    """[B, Hkv, L, D] -> [B, Hq, L, D]: query head h reads kv head h // (Hq // Hkv)."""
    group = num_heads_q // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)
