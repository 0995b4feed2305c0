"""Attention weights recomputed on request from the op's log-sum-exp, one chunk of queries at a time.

softmax(s)_j = exp(s_j - logsumexp(s)): with the LSE the fused op already returns, each row of
weights is one pass over its scores, and the mask rules are those of `reference.masked_scores`,
the same function the reference attention uses, so they cannot drift from the op's.
"""

import torch

from .reference import CHUNK_ELEMENTS, masked_scores


def attention_weights(q, k, lse, *, mask=None, causal=False, scale=None, average_heads=False):
    """Softmax weights ``[B, Hq, Lq, Lk]`` (``[B, Lq, Lk]`` averaged over heads), in q's dtype.

    ``lse`` is ``[B, Hq, Lq]`` from ``attention(..., return_lse=True)`` with the same q, k, mask,
    causal and scale. Rows whose every key is masked (lse = -inf) get zeros. Differentiable in q
    and k, through the scores and through the op's (differentiable) LSE.
    """
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * len_k))
    chunks = []
    for start in range(0, max(len_q, 1), rows):  # one (empty) chunk when len_q == 0
        scores = masked_scores(
            q[:, :, start : start + rows], k, mask=mask, causal=causal, scale=scale, q_offset=start, len_q=len_q
        )
        row_lse = lse[:, :, start : start + rows, None]
        # exp(-inf - (-inf)) is NaN: a fully masked row's weights are zeros instead.
        weights = torch.exp(scores - row_lse.masked_fill(row_lse == float("-inf"), 0.0))
        chunks.append(weights.mean(dim=1) if average_heads else weights)
    return torch.cat(chunks, dim=-2).to(q.dtype)
