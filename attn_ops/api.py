"""`attn_ops.attention`: the public op. Checks the inputs, then runs the fused kernels or the reference."""

import contextlib

import torch

from . import reference
from .band import diagonal_band
from .checks import check_backend, check_inputs
from .fused import fused_attention
from kernels.attn_launch import INTERPRETED

_auto_backend = "auto"  # what backend="auto" means; set by use_backend (a plain global: torch.compile reads it)


@contextlib.contextmanager
def use_backend(name):
    """Inside ``with use_backend("triton")``, ``backend="auto"`` (and every drop-in) uses `name`."""
    global _auto_backend
    check_backend(name)
    previous, _auto_backend = _auto_backend, name
    try:
        yield
    finally:
        _auto_backend = previous


def _resolve_backend(backend, q):
    check_backend(backend)
    if backend == "auto":
        backend = _auto_backend if _auto_backend != "auto" else ("triton" if q.is_cuda else "reference")
    if backend == "triton" and not q.is_cuda and not INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors (q is on {q.device}); to run the kernels on CPU, set "
            "TRITON_INTERPRET=1 before triton is first imported, or use backend='reference'"
        )
    return backend


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, seed=None,
              return_lse=False, backend="auto"):
    """Masked softmax attention ``softmax(q k^T * scale + mask) v``, fused: no [Lq, Lk] tensor is stored.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, D]``; any strides, one dtype
            of float16 / bfloat16 / float32; ``Hq % Hkv == 0`` (query head h reads kv head
            ``h // (Hq // Hkv)``); D from 1 to 256.
        mask: None, a bool tensor (True = may attend) or a float tensor added to the scaled scores
            (-inf = masked), broadcastable to ``[B, Hq, Lq, Lk]`` (read through stride 0, never expanded).
        causal: False, True / ``"top_left"`` (query i sees keys j <= i) or ``"bottom_right"``
            (j <= i + Lk - Lq)::

                top_left, Lq=3, Lk=5      bottom_right, Lq=3, Lk=5
                    x . . . .                 x x x . .
                    x x . . .                 x x x x .
                    x x x . .                 x x x x x

        window: None or ``(left, right)``: query i sees keys in ``[i' - left, i' + right]``, i' = i
            shifted by the causal alignment (``Lk - Lq`` for bottom_right, else 0). Combines with
            ``causal`` and ``mask``: a key must be allowed by all of them.
        scale: default ``1 / sqrt(D)``.
        dropout_p, seed: dropout on the probabilities (kept entries scaled by ``1 / (1 - p)``), keyed
            by ``seed`` and each element's (batch, head, query, key), so the backward regenerates it.
            ``seed=None`` draws one from torch's default generator on q's device.
        return_lse: also return the row log-sum-exp ``[B, Hq, Lq]`` float32 (natural log, of the
            scaled and masked scores, before dropout). It is differentiable.
        backend: ``"auto"`` (the kernels on CUDA, the reference elsewhere; see `use_backend`),
            ``"triton"`` or ``"reference"``.

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in q's dtype and layout, or ``(out, lse)``. A row that sees no key
        gives zeros, ``lse = -inf`` and zero gradients, never NaN.
    """
    causal, window, scale = check_inputs(q, k, v, mask, causal, window, scale, dropout_p, seed, return_lse)
    if _resolve_backend(backend, q) == "reference":
        if dropout_p > 0 and seed is None:
            seed = reference.draw_seed(q.device)
        return reference._attention(q, k, v, mask, causal, window, scale, dropout_p, seed, return_lse)
    seed_tensor = None
    if dropout_p > 0:
        seed_tensor = (torch.randint(2**62, (1,), device=q.device) if seed is None
                       else torch.tensor([seed], dtype=torch.int64, device=q.device))
    band_lo, band_hi = diagonal_band(q.shape[2], k.shape[2], causal, window)
    out, lse = fused_attention(q, k, v, mask, band_lo, band_hi, scale, float(dropout_p), seed_tensor)
    return (out, lse) if return_lse else out
