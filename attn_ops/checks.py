"""Input validation: every bad argument raises, naming itself (as the caller spelled it), what it got
and what was expected.

Nothing is broadcast, truncated or cast on the user's behalf: a mismatch is an error. What one
implementation cannot run (float64 or D > 512 in the kernels, say) is not checked here: each
implementation lists it in its `not_supported_reasons`, and dispatch reports it.
"""

import contextlib
import math
import numbers

import torch

from .block_mask import BlockMask

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAUSAL_MODES = ("top_left", "bottom_right")
BACKENDS = ("auto", "triton", "reference")
# How `attn_ops.attention` names its arguments; the drop-ins pass their own spellings.
OP_NAMES = {name: name for name in ("q", "k", "v", "mask", "block_mask", "causal", "window", "align", "scale", "softcap",
                                    "alibi_slopes", "sinks", "dropout_p", "seed", "return_lse", "backend")}
# An int, or one torch.compile traces symbolically (a cache length taken from a tensor's shape).
INTS = (numbers.Integral, torch.SymInt)
VARLEN_NAMES = {**OP_NAMES, **{name: name for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")}}
KVCACHE_NAMES = {**OP_NAMES, "k": "k_cache", "v": "v_cache",
                 **{name: name for name in ("cache_seqlens", "k_new", "v_new", "block_table", "key_mask", "num_splits")}}


_values_checked = False  # set by checked_values (a plain global: torch.compile reads it)


@contextlib.contextmanager
def checked_values():
    """Inside ``with attn_ops.checked_values():``, calls also check the values of their index tensors
    (``cu_seqlens`` monotone and ending at the packed length, cache lengths within the capacity,
    block tables inside the pool) and raise a ValueError naming the argument. Outside, the values are
    trusted and never read on the host: a read would wait for the GPU (and break CUDA graphs). For
    debugging; torch.compile traces without them."""
    global _values_checked
    previous, _values_checked = _values_checked, True
    try:
        yield
    finally:
        _values_checked = previous


def values_checked():
    return _values_checked and not torch.compiler.is_compiling()


def _shape(t):
    return tuple(t.shape)


def check_qkv(q, k, v, names=OP_NAMES, packed=False, paged=False):
    """q, k, v: ``[B, H, L, D]`` each, or with `packed` ``[total, H, D]`` (sequences end to end);
    with `paged`, k and v are ``[num_blocks, H, block_size, D]`` pools (their first dimension is
    not q's batch)."""
    nq, nk, nv = names["q"], names["k"], names["v"]
    rank, layout = (3, "[total, H, D] (sequences packed end to end)") if packed else (4, "[B, H, L, D]")
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {_shape(t)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in DTYPES)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk}, {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    if paged and k.shape[0] != v.shape[0]:
        raise ValueError(f"{nk} and {nv} must have the same number of blocks, got {nk} {_shape(k)}, {nv} {_shape(v)}")
    if not (packed or paged) and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: {nq} {_shape(q)}, {nk} {_shape(k)}, {nv} {_shape(v)}")
    length = 0 if packed else 2
    hq, hkv, hv = q.shape[1], k.shape[1], v.shape[1]
    if hkv != hv:
        raise ValueError(f"{nk} and {nv} must have the same number of heads, got {nk} {_shape(k)}, {nv} {_shape(v)}")
    if hq == 0 or hkv == 0 or hq % hkv:
        raise ValueError(f"{nq} heads ({hq}) must be a multiple of {nk}/{nv} heads ({hkv}); {nq} {_shape(q)}, "
                         f"{nk} {_shape(k)}")
    if k.shape[length] != v.shape[length]:
        raise ValueError(f"{nk} and {nv} must have the same length, got {nk} {_shape(k)}, {nv} {_shape(v)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{nk}'s head dim must equal {nq}'s: {nq} {_shape(q)}, {nk} {_shape(k)}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head dims must be at least 1, got {nq} {_shape(q)}, {nv} {_shape(v)}")


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k, names=VARLEN_NAMES):
    """int32 [B + 1] each (the same B), on q's device, and the `max_seqlen` hints None or an int;
    their values: `check_cu_seqlens_values`."""
    given = ((names["cu_seqlens_q"], cu_seqlens_q, q, names["q"], names["max_seqlen_q"], max_seqlen_q),
             (names["cu_seqlens_k"], cu_seqlens_k, k, names["k"], names["max_seqlen_k"], max_seqlen_k))
    for name, cu, _, _, hint_name, hint in given:
        _check_tensor(cu, name, (torch.int32,), q, names, " (torch.cumsum gives int64: pass .int())")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D [B + 1] (each sequence's first row, then the total), got shape "
                             f"{_shape(cu)}")
        if hint is not None and (not isinstance(hint, numbers.Integral) or isinstance(hint, bool) or hint < 0):
            raise ValueError(f"{hint_name} must be None or an int >= 0, got {hint!r}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"{given[0][0]} and {given[1][0]} must describe the same number of sequences, got "
                         f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1} (shapes "
                         f"{_shape(cu_seqlens_q)}, {_shape(cu_seqlens_k)})")


def check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k, names=VARLEN_NAMES):
    """Under `checked_values`: the cu_seqlens start at 0, are non-decreasing and end at the number of
    packed rows, and the `max_seqlen` hints are no shorter than the longest sequence (one
    device-to-host copy of both)."""
    if not values_checked():
        return
    given = ((names["cu_seqlens_q"], q, names["q"], names["max_seqlen_q"], max_seqlen_q),
             (names["cu_seqlens_k"], k, names["k"], names["max_seqlen_k"], max_seqlen_k))
    for (name, t, tensor_name, hint_name, hint), cu in zip(given, torch.stack((cu_seqlens_q, cu_seqlens_k)).tolist()):
        if cu[0] != 0:
            raise ValueError(f"{name} must start at 0, got {cu[0]} ({name} = {cu})")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        i = next((i for i, n in enumerate(lengths) if n < 0), None)
        if i is not None:
            raise ValueError(f"{name} must be non-decreasing, but entry {i + 1} ({cu[i + 1]}) < entry {i} ({cu[i]})")
        if cu[-1] != t.shape[0]:
            raise ValueError(f"{name} must end at the number of packed rows of {tensor_name} ({t.shape[0]}), got "
                             f"{cu[-1]}")
        if hint is not None and hint < max(lengths, default=0):
            raise ValueError(f"{hint_name}={hint}, but {name} has a sequence of {max(lengths)} rows")


def check_cache_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, causal, num_splits,
                       names=KVCACHE_NAMES):
    """The shapes, dtypes and devices of `attention_with_kvcache`'s cache arguments (their values:
    `check_cache_lengths`). Returns the number of new tokens."""
    check_qkv(q, k_cache, v_cache, names, paged=block_table is not None)
    if block_table is not None:
        name = names["block_table"]
        _check_tensor(block_table, name, (torch.int32,), q, names, " (pass .int())")
        if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must be [B, max_blocks] = [{q.shape[0]}, max_blocks] (sequence b's token t in "
                             f"block {name}[b, t // block_size]), got shape {_shape(block_table)}")
    if isinstance(cache_seqlens, torch.Tensor):
        name = names["cache_seqlens"]
        _check_tensor(cache_seqlens, name, (torch.int32,), q, names, " (pass .int())")
        if tuple(cache_seqlens.shape) != (q.shape[0],):
            raise ValueError(f"{name} must be [B] = [{q.shape[0]}] (or an int), got shape {_shape(cache_seqlens)}")
    elif not isinstance(cache_seqlens, INTS) or isinstance(cache_seqlens, bool) or cache_seqlens < 0:
        raise ValueError(f"{names['cache_seqlens']} must be an int32 tensor [B] or an int >= 0, got {cache_seqlens!r}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{names['k_new']} and {names['v_new']} go together: got only "
                         f"{names['k_new'] if v_new is None else names['v_new']}")
    if k_new is not None:
        for name, new, cache in ((names["k_new"], k_new, k_cache), (names["v_new"], v_new, v_cache)):
            _check_tensor(new, name, (cache.dtype,), q, names, " (the cache's: nothing is cast)")
            expected = (q.shape[0], cache.shape[1], k_new.shape[2] if k_new.dim() == 4 else "L_new", cache.shape[3])
            if new.dim() != 4 or tuple(new.shape) != expected:
                raise ValueError(f"{name} must be [B, Hkv, L_new, D] = {list(expected)} (B of {names['q']}, Hkv and "
                                 f"D of the cache, one L_new for both), got {_shape(new)}")
    if causal not in (False, True, "bottom_right"):
        raise ValueError(f"{names['causal']} must be False, True or 'bottom_right' (a cache aligns each query at the "
                         f"end of its sequence), got {causal!r}")
    if num_splits is not None and (not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool)
                                   or num_splits < 1):
        raise ValueError(f"{names['num_splits']} must be None (chosen from the GPU and the shapes) or an int >= 1, "
                         f"got {num_splits!r}")
    for name, t in (("q", q), ("k", k_cache), ("v", v_cache), ("k_new", k_new), ("v_new", v_new), ("sinks", sinks)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{names[name]} requires grad, but attention_with_kvcache is inference only (no "
                             f"backward): pass {names[name]}.detach() or call it under torch.no_grad()")
    return 0 if k_new is None else k_new.shape[2]


def check_cache_lengths(cache_seqlens, len_new, block_table, k_cache, names=KVCACHE_NAMES):
    """Each sequence's ``cache_seqlens[b] + len_new`` keys fit in its cache (an int: always checked,
    on the host where it is), and, under `checked_values`, the values of a tensor `cache_seqlens`
    and the blocks they occupy are valid indices of the pool (one device-to-host copy)."""
    checked = values_checked()
    if not checked and isinstance(cache_seqlens, torch.Tensor):  # every decoding step's case: nothing to do
        return
    page = k_cache.shape[2]
    capacity = page * block_table.shape[1] if block_table is not None else page
    if isinstance(cache_seqlens, INTS):
        if cache_seqlens < 0:  # checked with the type, and here for each call of an already checked type
            raise ValueError(f"{names['cache_seqlens']} must be an int32 tensor [B] or an int >= 0, got "
                             f"{cache_seqlens!r}")
        if cache_seqlens + len_new > capacity:
            raise ValueError(f"{names['cache_seqlens']} = {cache_seqlens} plus {len_new} new tokens exceeds the "
                             f"cache's capacity of {capacity} ({_cache_where(block_table, k_cache, names)})")
        if block_table is None:
            return
    if not checked:
        return
    lengths = cache_seqlens + len_new if isinstance(cache_seqlens, torch.Tensor) else None
    bad_blocks = None
    if block_table is not None:
        if lengths is None:
            lengths = torch.full(block_table.shape[:1], cache_seqlens + len_new, device=block_table.device)
        starts = torch.arange(block_table.shape[1], device=block_table.device) * page
        used = starts[None, :] < lengths[:, None]
        bad_blocks = (used & ((block_table < 0) | (block_table >= k_cache.shape[0]))).any(1)
    rows = [t.int() for t in (cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None, bad_blocks)
            if t is not None]
    values = torch.stack(rows).tolist()
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens = values.pop(0)
        for b, n in enumerate(seqlens):
            if n < 0 or n + len_new > capacity:
                raise ValueError(f"{names['cache_seqlens']}[{b}] = {n}: with {len_new} new tokens it must lie in "
                                 f"[0, {capacity - len_new}], the cache's capacity of {capacity} ({_cache_where(block_table, k_cache, names)})")
    if block_table is not None:
        b = next((b for b, bad in enumerate(values[0]) if bad), None)
        if b is not None:
            raise ValueError(f"{names['block_table']}[{b}] names a block outside the pool of {k_cache.shape[0]} blocks "
                             f"({names['k']} {_shape(k_cache)}) among the blocks sequence {b} uses")


def _cache_where(block_table, k_cache, names):
    """Where the capacity of the caches comes from, for the errors."""
    if block_table is not None:
        return f"{names['block_table']} {_shape(block_table)} of blocks of {k_cache.shape[2]}"
    return f"{names['k']} {_shape(k_cache)}"


def check_key_mask(key_mask, q, k_cache, block_table, names=KVCACHE_NAMES):
    """None, or a bool [B, capacity] on q's device (True = may attend, by position in the sequence)."""
    if key_mask is None:
        return
    name = names["key_mask"]
    _check_tensor(key_mask, name, (torch.bool,), q, names)
    capacity = k_cache.shape[2] * (block_table.shape[1] if block_table is not None else 1)
    if tuple(key_mask.shape) != (q.shape[0], capacity):
        raise ValueError(f"{name} must be [B, capacity] = [{q.shape[0]}, {capacity}] (True = may attend, by position "
                         f"in the sequence), got shape {_shape(key_mask)}")


def _check_tensor(t, name, dtypes, q, names, hint=""):
    """A tensor argument: one of `dtypes` (each listed once in the error), on q's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    allowed = list(dict.fromkeys(dtypes))
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {', '.join(str(d) for d in allowed)}{hint}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but {names['q']} is on {q.device}")


def check_mask(mask, q, k, names=OP_NAMES):
    """The mask must broadcast to [B, Hq, Lq, Lk] with no dimension other than 1 or the full size."""
    name = names["mask"]
    if mask is None:
        return
    _check_tensor(mask, name, (torch.bool, q.dtype, torch.float32), q, names,
                  f" (bool, {names['q']}'s dtype or float32)")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(reversed(mask.shape), reversed(full))):
        raise ValueError(
            f"{name} shape {_shape(mask)} does not broadcast to [B, Hq, Lq, Lk] = {list(full)}: "
            "each dimension must be 1 or the full size (e.g. [B, 1, 1, Lk] for key padding)"
        )


def check_block_mask(block_mask, q, k, names=OP_NAMES):
    """A `BlockMask` of shape (B or 1, Hq or 1, Lq, Lk) on q's device."""
    name = names["block_mask"]
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"{name} must be an attn_ops.BlockMask (BlockMask.from_mask_mod, from_mask, from_blocks or "
                        f"from_flex), got {type(block_mask).__name__}")
    batch, heads, len_q, len_k = block_mask.shape
    if batch not in (1, q.shape[0]) or heads not in (1, q.shape[1]) or (len_q, len_k) != (q.shape[2], k.shape[2]):
        raise ValueError(f"{name} shape {list(block_mask.shape)} does not match (B or 1, Hq or 1, Lq, Lk) = "
                         f"({q.shape[0]} or 1, {q.shape[1]} or 1, {q.shape[2]}, {k.shape[2]})")
    if block_mask.device != q.device:
        raise ValueError(f"{name} is on {block_mask.device}, {names['q']} on {q.device}: build it on q's device")


def check_causal(causal, names=OP_NAMES):
    """Returns None (no causal rule) or one of CAUSAL_MODES."""
    if causal is False:
        return None
    if causal is True:
        return "top_left"
    if isinstance(causal, str) and causal in CAUSAL_MODES:
        return causal
    raise ValueError(f"{names['causal']} must be False, True, 'top_left' or 'bottom_right', got {causal!r}")


def check_align(align, causal, names=OP_NAMES):
    """Returns "top_left" or "bottom_right": `align`, or by default the causal rule's alignment."""
    if align is None:
        return "bottom_right" if causal == "bottom_right" else "top_left"
    if not (isinstance(align, str) and align in CAUSAL_MODES):
        raise ValueError(f"{names['align']} must be None, 'top_left' or 'bottom_right', got {align!r}")
    if isinstance(causal, str) and causal != align:
        raise ValueError(f"{names['causal']}={causal!r} contradicts {names['align']}={align!r}: pass "
                         f"{names['causal']}=True to follow {names['align']}")
    return align


def check_window(window, names=OP_NAMES):
    """Returns None or (left, right), a side None where unbounded (given as None or -1)."""
    if window is None:
        return None
    ok = (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(w is None or isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window)
    )
    if not ok:
        raise ValueError(f"{names['window']} must be None or (left, right), each side an int >= 0, or None or -1 "
                         f"for unbounded; got {window!r}")
    return tuple(None if w is None or w == -1 else int(w) for w in window)


def check_scale(scale, head_dim, names=OP_NAMES):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"{names['scale']} must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{names['scale']} must be finite, got {scale}")
    return float(scale)


def check_softcap(softcap, names=OP_NAMES):
    """Returns None or the cap as a float > 0."""
    if softcap is None:
        return None
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"{names['softcap']} must be a float > 0 or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{names['softcap']} must be a finite float > 0 or None, got {softcap}")
    return float(softcap)


def check_alibi_slopes(slopes, q, batch, names=OP_NAMES):
    """float32 [Hq] or [B, Hq] on q's device, not requiring grad (ALiBi's slopes are fixed)."""
    name = names["alibi_slopes"]
    if slopes is None:
        return
    _check_tensor(slopes, name, (torch.float32,), q, names)
    heads = q.shape[1]
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"{name} must be [Hq] = [{heads}] or [B, Hq] = [{batch}, {heads}], got {_shape(slopes)}")
    if slopes.requires_grad:
        raise ValueError(f"{name} requires grad, but ALiBi's slopes are not differentiable here; pass "
                         f"{name}.detach()")


def check_sinks(sinks, q, names=OP_NAMES):
    """[Hq], float32 or q's dtype, on q's device."""
    name = names["sinks"]
    if sinks is None:
        return
    _check_tensor(sinks, name, (torch.float32, q.dtype), q, names, f" (float32 or {names['q']}'s dtype)")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"{name} must be [Hq] = [{q.shape[1]}] (one logit per query head), got {_shape(sinks)}")


def check_dropout(dropout_p, seed, names=OP_NAMES):
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"{names['dropout_p']} must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{names['dropout_p']} must be in [0, 1], got {dropout_p}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"{names['seed']} must be None or an int in [0, 2**63), got {seed!r}")


def check_return_lse(return_lse, names=OP_NAMES):
    if not isinstance(return_lse, bool):
        raise TypeError(f"{names['return_lse']} must be a bool, got {return_lse!r}")


def check_backend(backend, names=OP_NAMES):
    if backend not in BACKENDS:
        raise ValueError(f"{names['backend']} must be one of {BACKENDS}, got {backend!r}")
