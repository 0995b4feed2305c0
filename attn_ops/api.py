"""`attn_ops.attention`: the public op. Describes the call once, then runs the implementation
dispatch picks for it (the fused kernels, or the reference)."""

from .dispatch import choose, fused_cache, use_backend
from .problem import describe, describe_cache, describe_varlen

__all__ = ["attention", "attention_with_kvcache", "use_backend", "varlen_attention"]


def attention(q, k, v, *, mask=None, block_mask=None, causal=False, window=None, align=None, scale=None,
              softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0, seed=None, return_lse=False, backend="auto"):
    """Masked softmax attention ``softmax(q k^T * scale + mask) v``, fused: no [Lq, Lk] tensor is stored.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``; any strides, one dtype
            of float16 / bfloat16 / float32 (float64: the reference path only); ``Hq % Hkv == 0``
            (query head h reads kv head ``h // (Hq // Hkv)``). The kernels take D and Dv up to 512;
            the reference any.
        mask: None, a bool tensor (True = may attend) or a float tensor added to the scaled scores
            (-inf = masked), broadcastable to ``[B, Hq, Lq, Lk]`` (read through stride 0, never expanded).
            A float mask that requires grad (a learned position bias) gets its gradient in its own
            shape, summed over its broadcast dimensions, deterministically.
        block_mask: None or an `attn_ops.BlockMask` of shape ``(B or 1, Hq or 1, Lq, Lk)`` on q's device:
            a bool mask held block-sparsely (``BlockMask.from_mask_mod``, ``from_mask``, ``from_blocks``,
            ``from_flex``), built once and reused. A key must be allowed by it and by every other rule;
            the kernels visit its non-empty blocks only (docs/block-masks.md).
        causal: False, True (aligned by `align`), ``"top_left"`` (query i sees keys j <= i) or
            ``"bottom_right"`` (j <= i + Lk - Lq)::

                top_left, Lq=3, Lk=5      bottom_right, Lq=3, Lk=5
                    x . . . .                 x x x . .
                    x x . . .                 x x x x .
                    x x x . .                 x x x x x

        window: None or ``(left, right)``: query i sees keys in ``[i' - left, i' + right]``; a side
            that is None or -1 is unbounded. Combines with ``causal`` and ``mask``: a key must be
            allowed by all of them.
        align: None, ``"top_left"`` or ``"bottom_right"``: each query's diagonal ``i' = i`` or
            ``i' = i + Lk - Lq``, for ``causal`` and ``window`` alike. None follows ``causal``
            (bottom-right for ``"bottom_right"``, else top-left); a ``causal`` string that contradicts
            it is an error. flash-attn's local attention with Lq != Lk is
            ``window=(left, right), align="bottom_right"``.
        scale: default ``1 / sqrt(D)``; any finite float, as SDPA takes it (negative flips the scores, 0
            averages the visible values).
        softcap: None or a float > 0: the scaled scores ``s`` become ``softcap * tanh(s / softcap)``
            before the mask and ALiBi are added (Gemma 2).
        alibi_slopes: None or float32 ``[Hq]`` / ``[B, Hq]``: adds ``-slope * |i' - j|`` (i' per
            `align`), computed in the kernel. Not differentiable.
        sinks: None or ``[Hq]`` (float32 or q's dtype): a learned logit per head that joins every row's
            normalizer, ``p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))``, without a value
            (gpt-oss). Differentiable; the LSE includes it.
        dropout_p, seed: dropout on the probabilities (kept entries scaled by ``1 / (1 - p)``; p = 1
            gives zeros), keyed by ``seed`` and each element's (batch, head, query, key), so the
            backward regenerates it. ``seed=None`` draws one from torch's default generator on q's device.
        return_lse: also return the row log-sum-exp ``[B, Hq, Lq]`` float32 (natural log, of the
            final scores: scaled, capped, masked, biased, plus the sink; before dropout). It is
            differentiable.
        backend: ``"auto"`` (the kernels on CUDA, the reference elsewhere and for float64; see
            `use_backend`), ``"triton"`` or ``"reference"``. On CUDA, ``"auto"`` raises rather than fall
            back to the reference for what the kernels cannot run (D > 512, say), naming the reason.

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout, or ``(out, lse)``. A row that sees no key
        gives zeros, ``lse = -inf`` (the sink's logit with `sinks`) and zero gradients, never NaN.
    """
    problem = describe(q, k, v, mask=mask, block_mask=block_mask, causal=causal, window=window, align=align,
                       scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                       seed=seed, return_lse=return_lse)
    return _result(q, k, v, problem, backend)


def attention_as(q, k, v, *, names, backend="auto", **rules):
    """`attention` for the drop-ins: errors name each argument as `names` spells it (``attn_mask``
    for ``mask``, say)."""
    return _result(q, k, v, describe(q, k, v, names=names, **rules), backend)


def _result(q, k, v, problem, backend):
    out, lse = choose(problem, backend).run(q, k, v, problem)
    return (out, lse) if problem.return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     window=None, align=None, scale=None, softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0,
                     seed=None, return_lse=False, backend="auto"):
    """`attention` over B sequences of different lengths packed end to end (flash-attn's varlen layout)::

        q: [total_q, Hq, D]      k: [total_k, Hkv, D]      v: [total_k, Hkv, Dv]
        cu_seqlens_q = [0, 3, 3, 8]  ->  queries 0..2 are sequence 0, sequence 1 is empty, 3..7 sequence 2

    Sequence b's queries ``q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]`` attend to its keys
    ``k[cu_seqlens_k[b] : cu_seqlens_k[b + 1]]`` only. The kernels visit only tiles of real (query,
    key) pairs: the work is ``sum_b Lq_b * Lk_b``, nothing for padding.

    Args:
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on q's device: 0, then each sequence's end
            (non-decreasing; the last entry is total_q / total_k). Their values are never read on the
            host: checked only inside `attn_ops.checked_values()`.
        max_seqlen_q, max_seqlen_k: optional hints (the kernels do not need them); checked, when
            given, to be no shorter than the longest sequence.
        causal, window, align: as in `attention`, within each sequence and with its own lengths
            (``"bottom_right"`` puts sequence b's diagonal at ``i + Lk_b - Lq_b``).
        alibi_slopes: float32 ``[Hq]`` or ``[B, Hq]`` (B sequences). Distances are within the sequence.
        dropout_p, seed: as in `attention`, keyed by (seed, query head, packed query row, packed key
            row): a one-sequence batch draws `attention`'s pattern for batch 1.
        scale, softcap, sinks, return_lse, backend: as in `attention`.

    Returns:
        ``out`` ``[total_q, Hq, Dv]`` (contiguous, q's dtype), or ``(out, lse)`` with ``lse``
        ``[Hq, total_q]`` float32. Empty sequences and rows that see no key give zeros (lse -inf, or
        the sink), never NaN. Differentiable in q, k, v and sinks.
    """
    problem = describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                              max_seqlen_k=max_seqlen_k, causal=causal, window=window, align=align, scale=scale,
                              softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, seed=seed,
                              return_lse=return_lse)
    out, lse = choose(problem, backend).run(q, k, v, problem)
    return (out, lse) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None,
                           key_mask=None, causal=False, window=None, scale=None, softcap=None, alibi_slopes=None,
                           sinks=None, return_lse=False, num_splits=None, backend="auto"):
    """Decoding attention against a KV cache (flash-attn's ``flash_attn_with_kvcache``), inference only.

    Sequence b attends to its first ``n_b = cache_seqlens[b] + L_new`` cached keys. With ``causal`` its
    queries are the last Lq positions of those (bottom-right), e.g. n_b = 5, Lq = 2::

        keys:  0 1 2 3 4 | 5 ...  (unused capacity)
        q0     x x x x .
        q1     x x x x x

    Args:
        q: ``[B, Hq, Lq, D]`` (Lq = 1 for plain decoding, a few for speculative or chunked decoding).
        k_cache, v_cache: dense ``[B, Hkv, L_max, D]`` / ``[B, Hkv, L_max, Dv]``, or with `block_table`
            paged pools ``[num_blocks, Hkv, block_size, D]`` (any strides: a ``[num_blocks, block_size,
            Hkv, D]`` pool passed as ``.transpose(1, 2)`` is read in place). q's dtype.
        cache_seqlens: int32 ``[B]`` on q's device, or an int: tokens already in each sequence's cache.
            Not modified. A tensor's values are never read on the host: checked against the
            capacity only inside `attn_ops.checked_values()` (an int is checked always).
        k_new, v_new: None or ``[B, Hkv, L_new, D / Dv]``: written into the caches in place at positions
            ``cache_seqlens[b] ...`` (through the block table when paged), then attended.
        block_table: None (dense) or int32 ``[B, max_blocks]``: sequence b's token t is row
            ``t % block_size`` of block ``block_table[b, t // block_size]``. Any block size.
        key_mask: None or bool ``[B, capacity]`` (capacity: L_max, or max_blocks * block_size), True =
            may attend, by position in the sequence: the keys a generation's padding hides (left
            padding, say), combined with every other rule. Read in the kernels, never on the host.
        causal: False, or True / ``"bottom_right"``: query i sits at position ``n_b - Lq + i``.
        window: None or ``(left, right)`` around each query's position (a side None or -1: unbounded).
        scale, softcap, alibi_slopes (``[Hq]`` or ``[B, Hq]``, distances from each query's position),
        sinks, return_lse, backend: as in `attention`.
        num_splits: None (chosen from the GPU's multiprocessors, B * Hkv and the cache's capacity) or
            the number of ranges each sequence's keys are split into, merged through their LSEs
            (1: one program per (sequence, kv head) reads all its keys).

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout, or ``(out, lse)`` with ``lse``
        ``[B, Hq, Lq]`` float32 (natural log; -inf for a row that sees no key, the sink with `sinks`).
        A row that sees no key (an empty cache, say) gives zeros.

    Inference only: q, the caches, k_new, v_new or sinks requiring grad (with grad mode on) is an error.
    """
    problem = describe_cache(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, block_table=block_table,
                             key_mask=key_mask, causal=causal, window=window, scale=scale, softcap=softcap,
                             alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse, num_splits=num_splits)
    out, lse = choose(problem, backend, fused=fused_cache).run_cache(q, k_cache, v_cache, k_new, v_new, problem)
    return (out, lse) if return_lse else out
