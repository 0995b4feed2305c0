"""One attention call, described once where it enters: `describe` checks every argument and returns
the normalized `Problem` that dispatch, the implementations and the launchers read by name.

A new argument is a field here, its check in `checks.py`, and its use in the implementations that
take it; implementations that cannot take it say so in their `not_supported_reasons`.
"""

import numbers
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .band import band_rules
from .block_mask import BlockMask
from .checks import (KVCACHE_NAMES, OP_NAMES, VARLEN_NAMES, check_alibi_slopes, check_block_mask, check_cache_inputs,
                     check_cache_lengths, check_cu_seqlens, check_cu_seqlens_values, check_dropout, check_key_mask,
                     check_mask, check_qkv, check_return_lse, check_scale, check_sinks, check_softcap)
from .kernels.layout import on_16_bytes
from .kernels.precision import tf32_allowed


@dataclass(frozen=True)
class Problem:
    """One call, whichever entry point it came through: a dense one (q [B, Hq, Lq, D]), a packed one
    (`cu_seqlens_q` set; q [total_q, Hq, D]: then batch counts sequences, len_q and len_k are the
    totals, and the band is relative to each sequence's own diagonal, where `align` puts it), or a
    decoding step against a KV cache (`cache_seqlens` set: sequence b sees its first
    ``cache_seqlens[b] + len_new`` keys, query i at position ``cache_seqlens[b] + len_new - Lq + i``,
    bottom-right, where its band is measured from; len_k is the cache's capacity per sequence)."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool  # q, k, v, the mask or the sinks need a gradient (and grad mode is on)
    # The rules, normalized: causal and window as one diagonal band of visible keys (band.py).
    mask: Optional[torch.Tensor]  # bool (True = may attend) or float (added), broadcastable to [B, Hq, Lq, Lk]
    block_mask: Optional[BlockMask]  # bool [B | 1, Hq | 1, Lq, Lk] held block-sparsely (dense calls only)
    causal: Optional[str]  # None or the alignment of the causal rule ("top_left" or "bottom_right")
    window: Optional[tuple]  # None or (left, right), a side None where unbounded
    align: str  # "top_left" or "bottom_right": where each query's diagonal sits (causal and window)
    band_lo: Optional[int]  # query i sees key j iff i + band_lo <= j <= i + band_hi (None: unbounded)
    band_hi: Optional[int]
    scale: float
    softcap: Optional[float]  # scores become softcap * tanh(scores / softcap), before mask and ALiBi
    alibi_slopes: Optional[torch.Tensor]  # float32 [Hq] or [B, Hq]: adds -slope * |i' - j|
    sinks: Optional[torch.Tensor]  # [Hq] logits in every row's normalizer
    dropout_p: float
    seed: Optional[torch.Tensor]  # int64 [1] on q's device when dropout_p > 0, drawn once here
    return_lse: bool
    names: Mapping[str, str]  # each argument as the caller spelled it, for error messages
    cu_seqlens_q: Optional[torch.Tensor] = None  # packed: int32 [B + 1], sequence b's rows cu[b]:cu[b + 1]
    cu_seqlens_k: Optional[torch.Tensor] = None
    # Decoding against a KV cache (`describe_cache`):
    cache_seqlens: Optional[torch.Tensor] = None  # int32 [B] on q's device (an int argument becomes one)
    len_new: int = 0  # rows of k_new / v_new, written at cache_seqlens[b] ... before attending
    block_table: Optional[torch.Tensor] = None  # None: a dense cache [B, Hkv, L_max, D]; else int32 [B, blocks]
    key_mask: Optional[torch.Tensor] = None  # bool [B, capacity]: True = may attend, by position in the sequence
    num_splits: Optional[int] = None  # None: chosen from the GPU, the batch, the heads and the capacity
    # What implementations derive from the call's static parts (tiles, grids, launch arguments), made
    # by the first call with those parts and shared by every later one (`describe`); a Problem made
    # any other way (dataclasses.replace too) starts with its own, empty.
    plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def diagonal_shift(self):
        """i' - i: where each query's diagonal sits (0 top-left, Lk - Lq bottom-right), for ALiBi.
        Packed or decoding: 0, each sequence's own shift is added by the kernels (`bottom_right`, the
        cache's lengths)."""
        per_sequence = self.cu_seqlens_q is not None or self.cache_seqlens is not None
        return self.len_k - self.len_q if self.align == "bottom_right" and not per_sequence else 0

    @property
    def bottom_right(self):
        """Packed and aligned bottom-right: the band and ALiBi move by each sequence's Lk - Lq."""
        return self.cu_seqlens_q is not None and self.align == "bottom_right"


def describe(q, k, v, *, mask=None, block_mask=None, causal=False, window=None, align=None, scale=None,
             softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0, seed=None, return_lse=False, names=OP_NAMES):
    """Checks every argument (errors name them as `names` spells them) and returns the `Problem`.

    The checks read only the arguments' static parts (types, shapes, strides, dtypes, devices, the
    rules' values), so a call whose static parts equal an earlier call's reuses its checks and gets
    its Problem with this call's tensors (`_described`): the host time of a repeated call is a few
    microseconds, not the tens the checks take.
    """
    # A block mask by its static parts: the key must not keep one alive.
    blocks = block_mask.static_key if isinstance(block_mask, BlockMask) else block_mask
    key = _static_key("dense", (q, k, v, mask, alibi_slopes, sinks),
                      (causal, window, align, scale, softcap, dropout_p, seed is None, return_lse, id(names), blocks),
                      q, k, v)
    return _described(key, dict(mask=mask, block_mask=block_mask, alibi_slopes=alibi_slopes, sinks=sinks), seed,
                      lambda: _describe(q, k, v, mask=mask, block_mask=block_mask, causal=causal, window=window,
                                        align=align, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                        sinks=sinks, dropout_p=dropout_p, seed=seed, return_lse=return_lse,
                                        names=names))


_DESCRIBED = {}  # a call's static key -> the Problem of the first call with it
MAX_DESCRIBED = 1024


def _static_key(entry, tensors, values, *operands):
    """The static parts of a call of `entry` (which describe it is) as a dict key: `tensors` (tensor
    arguments, or None) by shape, strides, dtype, device and whether they require grad, never their
    values; `values` by type and value, within tuples too (True and 1.0 are not 1 to the checks);
    grad mode; and what the plans depend on besides: whether the `operands` all sit on 16-byte
    boundaries (TMA), and torch's TF32 switch for float32. None under torch.compile, which traces the
    checks once. Lists, not generators: this runs on every call."""
    if torch.compiler.is_compiling():
        return None
    try:
        metas = tuple([t if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                       if isinstance(t, torch.Tensor) else (type(t), t) for t in tensors])
        types = tuple([(tuple, *map(type, x)) if type(x) is tuple else type(x) for x in values])
        return (entry, metas, values, types, torch.is_grad_enabled(), on_16_bytes(*operands),
                operands[0].dtype == torch.float32 and tf32_allowed())
    except (AttributeError, RuntimeError):  # not a tensor, a fake or a sparse one: the checks take it
        return None


def _described(key, tensors, seed, describe_now):
    """The Problem of a call with static parts `key` and these `tensors` (fields by name), its dropout
    seed made from `seed` for this call (None for a decoding step, which has no dropout);
    `describe_now()` checks and describes a call seen first. A call that brings no tensors besides
    its operands (no mask, no dropout seed to draw...) gets the first call's Problem itself: frozen,
    it holds nothing of any one call."""
    try:
        template = None if key is None else _DESCRIBED.get(key)
    except TypeError:  # an unhashable argument (a list, say): such calls take the checks every time
        template = key = None
    if template is None:
        problem = describe_now()
        if key is not None:
            if len(_DESCRIBED) >= MAX_DESCRIBED:
                _DESCRIBED.clear()
            # Without this call's tensors, which it must not keep alive; it keeps `names`, whose id
            # the key holds.
            template = _DESCRIBED[key] = object.__new__(type(problem))
            vars(template).update(vars(problem), **dict.fromkeys(tensors))
            vars(template)["seed"] = None
        return problem
    if seed is not None:  # the key holds only that a seed was given
        check_dropout(template.dropout_p, seed, template.names)
    dropout = template.dropout_p > 0
    if not dropout and not any([t is not None for t in tensors.values()]):
        return template
    # A frozen dataclass copied field by field, without __init__'s per-field setattr.
    problem = object.__new__(type(template))
    vars(problem).update(vars(template), **tensors)
    if dropout:
        vars(problem)["seed"] = dropout_seed(seed, template.device)
    return problem


def _describe(q, k, v, *, mask, block_mask, causal, window, align, scale, softcap, alibi_slopes, sinks, dropout_p,
              seed, return_lse, names):
    check_qkv(q, k, v, names)
    check_mask(mask, q, k, names)
    check_block_mask(block_mask, q, k, names)
    (batch, _, len_q, _), len_k = q.shape, k.shape[2]
    return _problem(q, k, v, batch, len_q, len_k, band_rules(len_q, len_k, causal, window, align, names),
                    mask=mask, block_mask=block_mask, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                    sinks=sinks, dropout_p=dropout_p, seed=seed, return_lse=return_lse, names=names)


def describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                    window=None, align=None, scale=None, softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0,
                    seed=None, return_lse=False, names=VARLEN_NAMES):
    """`describe` for packed sequences (`attn_ops.varlen_attention`), the cu_seqlens' values checked
    only under `checked_values`."""
    key = _static_key("packed", (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks),
                      (max_seqlen_q, max_seqlen_k, causal, window, align, scale, softcap, dropout_p, seed is None,
                       return_lse, id(names)), q, k, v)
    problem = _described(key, dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
                                   sinks=sinks), seed, lambda: _describe_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
        window=window, align=align, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        dropout_p=dropout_p, seed=seed, return_lse=return_lse, names=names))
    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k, names)
    return problem


def _describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k, causal, window, align, scale,
                     softcap, alibi_slopes, sinks, dropout_p, seed, return_lse, names):
    check_qkv(q, k, v, names, packed=True)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k, names)
    # Lq = Lk = 0: the band relative to each sequence's own diagonal, wherever `align` puts it.
    return _problem(q, k, v, cu_seqlens_q.shape[0] - 1, q.shape[0], k.shape[0],
                    band_rules(0, 0, causal, window, align, names), scale=scale, softcap=softcap,
                    alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p, seed=seed, return_lse=return_lse,
                    names=names, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def _problem(q, k, v, batch, len_q, len_k, band, *, scale, softcap, alibi_slopes, sinks, dropout_p, seed, return_lse,
             names, mask=None, block_mask=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """The checks and fields a dense and a packed call share; `band` is `band_rules`'s result."""
    check_alibi_slopes(alibi_slopes, q, batch, names)
    check_sinks(sinks, q, names)
    check_dropout(dropout_p, seed, names)
    check_return_lse(return_lse, names)
    causal, window, align, band_lo, band_hi = band
    return Problem(
        batch=batch, heads_q=q.shape[1], heads_kv=k.shape[1], len_q=len_q, len_k=len_k, head_dim=q.shape[-1],
        head_dim_v=v.shape[-1], dtype=q.dtype, device=q.device,
        requires_grad=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask, sinks)),
        mask=mask, block_mask=block_mask, causal=causal, window=window, align=align, band_lo=band_lo, band_hi=band_hi,
        scale=check_scale(scale, q.shape[-1], names), softcap=check_softcap(softcap, names), alibi_slopes=alibi_slopes,
        sinks=sinks, dropout_p=float(dropout_p),
        seed=dropout_seed(seed, q.device) if dropout_p > 0 else None, return_lse=return_lse, names=names,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
    )


def dropout_seed(seed, device):
    """The one place a dropout seed is made: `seed` as an int64 tensor [1] on `device`, or one drawn
    from torch's default generator there (so torch.manual_seed replays it, with no host sync)."""
    if seed is None:
        return torch.randint(2**62, (1,), device=device)
    # Filled on the device: torch.tensor([seed]) would be a synchronous host-to-device copy.
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def describe_cache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None, key_mask=None,
                   causal=False, window=None, scale=None, softcap=None, alibi_slopes=None, sinks=None,
                   return_lse=False, num_splits=None, names=KVCACHE_NAMES):
    """Checks every argument of `attn_ops.attention_with_kvcache` and returns its `Problem`, as
    `describe` does (an int `cache_seqlens` becomes its int32 [B] tensor on each call, filled on the
    device); the values of a tensor `cache_seqlens` and of the block table only under
    `checked_values`."""
    given = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    key = _static_key("cache", (q, k_cache, v_cache, given, k_new, v_new, block_table, key_mask, alibi_slopes, sinks),
                      (type(cache_seqlens), causal, window, scale, softcap, return_lse, num_splits, id(names)), q,
                      k_cache, v_cache)
    tensors = dict(block_table=block_table, key_mask=key_mask, alibi_slopes=alibi_slopes, sinks=sinks,
                   cache_seqlens=given if given is not None else _lengths_tensor(cache_seqlens, q))
    problem = _described(key, tensors, None, lambda: _describe_cache(
        q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, block_table=block_table, key_mask=key_mask,
        causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        return_lse=return_lse, num_splits=num_splits, names=names))
    check_cache_lengths(cache_seqlens, problem.len_new, block_table, k_cache, names)
    return problem


def _lengths_tensor(cache_seqlens, q):
    """An int `cache_seqlens` as the int32 [B] tensor the kernels read, made for each call (filled on the
    device, no host copy): a tensor kept across calls would be freed under a CUDA graph that reads it."""
    if not isinstance(cache_seqlens, numbers.Integral) or not isinstance(q, torch.Tensor) or q.dim() < 1:
        return None  # the checks refuse it
    return torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)


def _describe_cache(q, k_cache, v_cache, cache_seqlens, *, k_new, v_new, block_table, key_mask, causal, window,
                    scale, softcap, alibi_slopes, sinks, return_lse, num_splits, names):
    len_new = check_cache_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, sinks, causal,
                                 num_splits, names)
    check_key_mask(key_mask, q, k_cache, block_table, names)
    check_alibi_slopes(alibi_slopes, q, q.shape[0], names)
    check_sinks(sinks, q, names)
    check_return_lse(return_lse, names)
    causal, window, align, band_lo, band_hi = band_rules(0, 0, bool(causal), window, "bottom_right", names)
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = _lengths_tensor(cache_seqlens, q)
    capacity = k_cache.shape[2] * (block_table.shape[1] if block_table is not None else 1)
    return Problem(
        batch=q.shape[0], heads_q=q.shape[1], heads_kv=k_cache.shape[1], len_q=q.shape[2], len_k=capacity,
        head_dim=q.shape[-1], head_dim_v=v_cache.shape[-1], dtype=q.dtype, device=q.device, requires_grad=False,
        mask=None, block_mask=None, causal=causal, window=window, align=align, band_lo=band_lo, band_hi=band_hi,
        scale=check_scale(scale, q.shape[-1], names), softcap=check_softcap(softcap, names),
        alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=0.0, seed=None, return_lse=return_lse, names=names,
        cache_seqlens=cache_seqlens, len_new=len_new, block_table=block_table, key_mask=key_mask,
        num_splits=num_splits,
    )
