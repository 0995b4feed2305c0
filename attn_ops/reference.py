"""The naive attention math: the CPU fallback and the tests' ground truth.

Scores, mask, softmax, dropout, weighted sum, in float32 (float64 for float64 inputs), a chunk of
queries at a time so memory stays bounded: with autograd on, each chunk is checkpointed, so the
backward also holds one chunk of probabilities at a time.
"""

import torch
from torch.utils.checkpoint import checkpoint

from .band import diagonal_band
from .checks import FLOAT_DTYPES, check_causal, check_inputs, check_scale, check_window

# Scores held per chunk: B * Hq * rows * Lk elements at most (128 MiB in float32).
CHUNK_ELEMENTS = 2**25


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, seed=None, return_lse=False):
    """`attn_ops.attention` computed by the plain math; also accepts float64 (the tests' ground truth).

    Dropout uses torch's generator: the pattern is reproducible by ``seed`` but differs, bit for bit,
    from the Triton kernels' Philox pattern (as flash-attn's and SDPA's backends differ from each other).
    """
    causal, window, scale = check_inputs(q, k, v, mask, causal, window, scale, dropout_p, seed, return_lse,
                                         dtypes=FLOAT_DTYPES + (torch.float64,))
    if dropout_p > 0 and seed is None:
        seed = draw_seed(q.device)
    return _attention(q, k, v, mask, causal, window, scale, dropout_p, seed, return_lse)


def draw_seed(device):
    """A dropout seed from torch's default generator on `device`, so torch.manual_seed replays it."""
    return int(torch.randint(2**62, (), device=device).item())


def masked_scores(q, k, *, mask=None, causal=False, window=None, scale=None, q_offset=0, len_q=None):
    """Scaled scores with the mask applied (-inf where a key is not visible), [B, Hq, rows, Lk].

    ``q`` may be a slice of rows ``[q_offset, q_offset + rows)`` of a sequence of ``len_q`` queries
    (the causal and window rules depend on the absolute position); ``mask`` is the whole sequence's
    mask (broadcastable to [B, Hq, len_q, Lk]) and is sliced here.
    """
    causal = check_causal(causal)
    window = check_window(window)
    scale = check_scale(scale, q.shape[-1])
    len_q = q.shape[2] if len_q is None else len_q
    return _masked_scores(q, k, mask, causal, window, scale, q_offset, len_q)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _repeat_kv(x, num_heads_q):
    """[B, Hkv, L, D] -> [B, Hq, L, D]: query head h reads kv head h // (Hq // Hkv)."""
    group = num_heads_q // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _masked_scores(q, k, mask, causal, window, scale, q_offset, len_q):
    dtype = _compute_dtype(q.dtype)
    rows, len_k = q.shape[2], k.shape[2]
    k = _repeat_kv(k, q.shape[1])
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dim() >= 2 and mask.shape[-2] == len_q != rows:
            mask = mask[..., q_offset : q_offset + rows, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(dtype)
    lo, hi = diagonal_band(len_q, len_k, causal, window)
    if lo is not None or hi is not None:
        i = torch.arange(q_offset, q_offset + rows, device=q.device)[:, None]
        j = torch.arange(len_k, device=q.device)[None, :]
        visible = torch.ones(rows, len_k, dtype=torch.bool, device=q.device)
        if lo is not None:
            visible &= j >= i + lo
        if hi is not None:
            visible &= j <= i + hi
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _attention_chunk(q, k, v, mask, causal, window, scale, dropout_p, seed, q_offset, len_q):
    scores = _masked_scores(q, k, mask, causal, window, scale, q_offset, len_q)
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; subtracting 0 instead keeps exp(-inf) = 0 rather than NaN.
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    p = torch.exp(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    empty = row_sum == 0  # no visible key: output 0, lse -inf, and (dividing by 1) zero gradients
    safe_sum = row_sum.masked_fill(empty, 1.0)
    lse = (row_max + torch.log(safe_sum)).masked_fill(empty, float("-inf")).squeeze(-1)
    p = p / safe_sum
    if dropout_p > 0:
        gen = torch.Generator(device=q.device)
        gen.manual_seed((seed * 0x9E3779B1 + q_offset) % 2**63)  # one stream per chunk, replayable
        keep = torch.rand(p.shape, generator=gen, device=q.device) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, _repeat_kv(v, q.shape[1]).to(p.dtype))
    return out, lse


def _attention(q, k, v, mask, causal, window, scale, dropout_p, seed, return_lse):
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * len_k))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if len_q == 0 or len_k == 0:  # nothing to compute; with no key every row is fully masked
        out = torch.zeros_like(q) + 0 * (q.sum() + k.sum() + v.sum())  # zero gradients, not None
        lse = torch.full((batch, heads, len_q), float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device)
        return (out, lse) if return_lse else out
    outs, lses = [], []
    for start in range(0, len_q, rows):
        args = (q[:, :, start : start + rows], k, v, mask, causal, window, scale, dropout_p, seed, start, len_q)
        if needs_grad and len_q > rows:
            out, lse = checkpoint(_attention_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attention_chunk(*args)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    # The output is laid out like q (a [B, L, H, D] view in gives a [B, L, H, D] view out).
    out = torch.empty_like(q).copy_(out)
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=2)
    return out, lse
