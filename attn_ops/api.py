"""`attn_ops.attention`: the public op. Describes the call once, then runs the implementation
dispatch picks for it (the fused kernels, or the reference)."""

from .checks import OP_NAMES
from .dispatch import choose, use_backend
from .problem import describe, describe_varlen

__all__ = ["attention", "use_backend", "varlen_attention"]


def attention(q, k, v, *, mask=None, causal=False, window=None, align=None, scale=None, softcap=None,
              alibi_slopes=None, sinks=None, dropout_p=0.0, seed=None, return_lse=False, backend="auto"):
    """Masked softmax attention ``softmax(q k^T * scale + mask) v``, fused: no [Lq, Lk] tensor is stored.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``; any strides, one dtype
            of float16 / bfloat16 / float32 (float64: the reference path only); ``Hq % Hkv == 0``
            (query head h reads kv head ``h // (Hq // Hkv)``). The kernels take D and Dv up to 256;
            the reference any.
        mask: None, a bool tensor (True = may attend) or a float tensor added to the scaled scores
            (-inf = masked), broadcastable to ``[B, Hq, Lq, Lk]`` (read through stride 0, never expanded).
            A float mask that requires grad (a learned position bias) gets its gradient in its own
            shape, summed over its broadcast dimensions, deterministically.
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
        scale: default ``1 / sqrt(D)``.
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
            back to the reference for what the kernels cannot run (D > 256, say), naming the reason.

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout, or ``(out, lse)``. A row that sees no key
        gives zeros, ``lse = -inf`` (the sink's logit with `sinks`) and zero gradients, never NaN.
    """
    return attention_as(q, k, v, mask=mask, causal=causal, window=window, align=align, scale=scale,
                        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, seed=seed, return_lse=return_lse, backend=backend, names=OP_NAMES)


def attention_as(q, k, v, *, names, backend="auto", **rules):
    """`attention` for the drop-ins: errors name each argument as `names` spells it (``attn_mask``
    for ``mask``, say)."""
    problem = describe(q, k, v, names=names, **rules)
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
            (non-decreasing; the last entry is total_q / total_k). Checked in eager mode (one
            device-to-host copy of both), trusted under torch.compile.
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
