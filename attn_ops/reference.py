"""The plain PyTorch math: the fallback implementation off CUDA and the tests' ground truth.

Scores, mask, softmax, dropout, weighted sum, in float32 (float64 for float64 inputs), a chunk of
queries at a time so memory stays bounded; under autograd each chunk is checkpointed, so the
backward also holds one chunk of probabilities at a time. It does only the work a call needs: no
mask pass without a mask or a band, no LSE pass unless it is returned or a row may see no key,
no checkpointing without autograd or with a single chunk.
"""

import torch
from torch.utils.checkpoint import checkpoint

from .band import band_leaves_rows_empty, diagonal_band
from .checks import check_causal, check_scale, check_window
from .problem import describe

NAME = "reference"
# Scores held per chunk: B * Hq * rows * Lk elements at most (128 MiB in float32).
CHUNK_ELEMENTS = 2**25


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, seed=None,
              return_lse=False):
    """`attn_ops.attention` computed by the plain math (any device; float64 too).

    Dropout uses torch's generator: the pattern is reproducible by ``seed`` but differs, bit for bit,
    from the Triton kernels' Philox pattern (as flash-attn's and SDPA's backends differ from each other).
    """
    problem = describe(q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p,
                       seed=seed, return_lse=return_lse)
    out, lse = run(q, k, v, problem)
    return (out, lse) if return_lse else out


def not_supported_reasons(problem):
    return []  # the reference computes every call that passes the checks


def masked_scores(q, k, *, mask=None, causal=False, window=None, scale=None, q_offset=0, len_q=None):
    """Scaled scores with the mask applied (-inf where a key is not visible), [B, Hq, rows, Lk].

    ``q`` may be a slice of rows ``[q_offset, q_offset + rows)`` of a sequence of ``len_q`` queries
    (the causal and window rules depend on the absolute position); ``mask`` is the whole sequence's
    mask (broadcastable to [B, Hq, len_q, Lk]) and is sliced here.
    """
    len_q = q.shape[2] if len_q is None else len_q
    band = diagonal_band(len_q, k.shape[2], check_causal(causal), check_window(window))
    return _masked_scores(q, k, mask, band, check_scale(scale, q.shape[-1]), q_offset, len_q)


def run(q, k, v, problem):
    """(out laid out like q, natural-log lse [B, Hq, Lq] in the compute dtype)."""
    dtype = _compute_dtype(q.dtype)
    batch, heads, len_q, len_k = problem.batch, problem.heads_q, problem.len_q, problem.len_k
    out = _like_q(q, problem.head_dim_v)
    if len_q == 0 or len_k == 0:  # nothing to compute; with no key every row is fully masked
        out.zero_()
        if problem.requires_grad:  # zero gradients, not None
            out = out + 0 * (q.sum() + k.sum() + v.sum())
        return out, torch.full((batch, heads, len_q), float("-inf"), dtype=dtype, device=q.device)
    k, v = (_repeat_kv(t, heads).to(dtype) for t in (k, v))
    seed = int(problem.seed.item()) if problem.dropout_p > 0 else None
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * len_k))
    checkpointed = problem.requires_grad and len_q > rows
    outs, lses = [], []
    for start in range(0, len_q, rows):
        args = (q[:, :, start : start + rows], k, v, problem.mask, problem, seed, start)
        chunk_out, lse = checkpoint(_chunk, *args, use_reentrant=False) if checkpointed else _chunk(*args)
        outs.append(chunk_out)
        lses.append(lse)
    # The output is laid out like q (a [B, L, H, D] view in gives a [B, L, H, D] view out).
    out = out.copy_(torch.cat(outs, dim=2))
    lse = torch.cat(lses, dim=2) if problem.return_lse else None
    return out, lse


def _chunk(q, k, v, mask, problem, seed, q_offset):
    """(out, lse or None) of queries [q_offset, q_offset + rows), in the compute dtype."""
    scores = _masked_scores(q, k, mask, (problem.band_lo, problem.band_hi), problem.scale, q_offset, problem.len_q)
    may_be_empty = mask is not None or band_leaves_rows_empty(problem.len_q, problem.len_k, problem.band_lo,
                                                             problem.band_hi)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True) if problem.return_lse or may_be_empty else None
    if may_be_empty:
        # A row with no visible key gets zeros: softmax over a finite stand-in row keeps the forward
        # and the backward free of NaN, and the stand-in's weights are then zeroed.
        empty = lse == float("-inf")
        p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        p = torch.softmax(scores, dim=-1)
    if problem.dropout_p > 0:
        gen = torch.Generator(device=q.device)
        gen.manual_seed((seed * 0x9E3779B1 + q_offset) % 2**63)  # one stream per chunk, replayable
        keep = torch.rand(p.shape, generator=gen, device=q.device) >= problem.dropout_p
        # dropout_p = 1 keeps nothing: scale 0, not 1 / 0 (whose gradient would be NaN).
        p = p * keep * (1.0 / (1.0 - problem.dropout_p) if problem.dropout_p < 1 else 0.0)
    return torch.matmul(p, v), None if lse is None else lse.squeeze(-1)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_q(q, head_dim_v):
    """An empty [B, Hq, Lq, Dv] tensor in q's dtype, its dimensions ordered in memory as q's are."""
    order = sorted(range(4), key=lambda d: q.stride(d), reverse=True)  # outermost first
    shape = (*q.shape[:3], head_dim_v)
    return q.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(4)])


def _repeat_kv(x, num_heads_q):
    """[B, Hkv, L, D] -> [B, Hq, L, D]: query head h reads kv head h // (Hq // Hkv)."""
    group = num_heads_q // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _masked_scores(q, k, mask, band, scale, q_offset, len_q):
    dtype = _compute_dtype(q.dtype)
    rows, len_k = q.shape[2], k.shape[2]
    k = _repeat_kv(k, q.shape[1])
    # Scaling q (rows x D) costs less than scaling the scores (rows x Lk).
    scores = torch.matmul(q.to(dtype) * scale, k.to(dtype).transpose(-1, -2))
    hidden = None  # True where a key is not visible
    if mask is not None:
        if mask.dim() >= 2 and mask.shape[-2] == len_q != rows:
            mask = mask[..., q_offset : q_offset + rows, :]
        if mask.dtype == torch.bool:
            hidden = ~mask
        else:
            scores = scores + mask.to(dtype)
    lo, hi = band
    if lo is not None or hi is not None:
        i = torch.arange(q_offset, q_offset + rows, device=q.device)[:, None]
        j = torch.arange(len_k, device=q.device)[None, :]
        outside = torch.zeros(rows, len_k, dtype=torch.bool, device=q.device)
        if lo is not None:
            outside |= j < i + lo
        if hi is not None:
            outside |= j > i + hi
        hidden = outside if hidden is None else hidden | outside
    # One pass over the scores for the bool mask and the band together.
    return scores if hidden is None else scores.masked_fill(hidden, float("-inf"))
