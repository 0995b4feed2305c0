"""Input validation for `attn_ops.attention`: every bad argument raises, naming itself and what was expected.

Nothing is broadcast, truncated or cast on the user's behalf: a mismatch is an error.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
CAUSAL_MODES = ("top_left", "bottom_right")
BACKENDS = ("auto", "triton", "reference")


def _shape(t):
    return tuple(t.shape)


def check_qkv(q, k, v, dtypes=FLOAT_DTYPES):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {_shape(t)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {names}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, hq, _, d), (bk, hkv, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if hkv != hv:
        raise ValueError(f"k and v must have the same number of heads, got k {_shape(k)}, v {_shape(v)}")
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}); q {_shape(q)}, k {_shape(k)}")
    if lk != lv:
        raise ValueError(f"k and v must have the same length, got k {_shape(k)}, v {_shape(v)}")
    if dk != d:
        raise ValueError(f"k's head dim must equal q's: q {_shape(q)}, k {_shape(k)}")
    if dv != d:
        raise ValueError(f"v's head dim ({dv}) differing from q's ({d}) is not supported yet; v {_shape(v)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got q {_shape(q)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_mask(mask, q, k):
    """The mask must broadcast to [B, Hq, Lq, Lk] with no dimension other than 1 or the full size."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"mask has dtype {mask.dtype}; expected torch.bool, {q.dtype} (q's) or torch.float32")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    if mask.requires_grad:
        raise ValueError("mask requires grad, but no gradient flows to the mask; pass mask.detach()")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(reversed(mask.shape), reversed(full))):
        raise ValueError(
            f"mask shape {_shape(mask)} does not broadcast to [B, Hq, Lq, Lk] = {list(full)}: "
            "each dimension must be 1 or the full size (e.g. [B, 1, 1, Lk] for key padding)"
        )


def check_causal(causal):
    """Returns None (no causal rule) or one of CAUSAL_MODES."""
    if causal is False:
        return None
    if causal is True:
        return "top_left"
    if isinstance(causal, str) and causal in CAUSAL_MODES:
        return causal
    raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def check_window(window):
    if window is None:
        return None
    ok = (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0 for w in window)
    )
    if not ok:
        raise ValueError(f"window must be None or (left, right) with ints >= 0, got {window!r}")
    return int(window[0]), int(window[1])


def check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_dropout(dropout_p, seed):
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")


def check_return_lse(return_lse):
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_inputs(q, k, v, mask, causal, window, scale, dropout_p, seed, return_lse, dtypes=FLOAT_DTYPES):
    """Every check of `attention`'s arguments; returns the normalized (causal, window, scale)."""
    check_qkv(q, k, v, dtypes)
    check_mask(mask, q, k)
    check_dropout(dropout_p, seed)
    check_return_lse(return_lse)
    return check_causal(causal), check_window(window), check_scale(scale, q.shape[-1])
