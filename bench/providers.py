"""Who is measured: each provider turns (q, k, v, masking) into a zero-argument call returning out.

Work that is not attention (FlexAttention's block mask, say) happens here, outside the timed
call. A provider that cannot express a case raises `Unsupported`; the row keeps the reason.
"""

import importlib.util

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn_ops
import attn_ops.reference
from attn_ops.dispatch import choose, fused_cache
from attn_ops.problem import describe_cache


MAX_SDPA_BIAS_BYTES = 4 * 2**30  # a materialised modifier beyond this is SDPA's "unsupported", not an OOM


class Unsupported(Exception):
    pass


# Providers that take a VARLEN case's packed rows (`Masking.packed`) instead of the padded batch.
PACKED = ("attn_ops", "attn_ops (reference)", "flash_attn")


def _backend(q):
    return "triton" if q.is_cuda else "reference"  # the CPU has no fused path to measure


def _cache_step(q, m, backend, num_splits=None):
    """A decoding step through attention_with_kvcache's implementation for `backend`, its argument
    checks (and their device-to-host copy of the lengths) done once here, outside the timed call,
    as torch.compile leaves them out of a compiled decoding loop."""
    k_cache, v_cache, seqlens, table = m.kvcache
    problem = describe_cache(q, k_cache, v_cache, seqlens, block_table=table, num_splits=num_splits)
    implementation = choose(problem, backend, fused=fused_cache)
    return lambda: implementation.run_cache(q, k_cache, v_cache, problem)


def _attn_ops(q, k, v, m):
    if m.kvcache is not None:
        return _cache_step(q, m, _backend(q))
    if m.packed is not None:
        cu_seqlens, longest = m.packed[3:]
        return lambda: attn_ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=longest,
                                                 max_seqlen_k=longest, causal=True, backend=_backend(q))
    return lambda: attn_ops.attention(q, k, v, backend=_backend(q), **m.attn_ops)


def _attn_ops_padded(q, k, v, m):
    if m.packed is None:
        raise Unsupported("the padded form of a packed (varlen) case; elsewhere see attn_ops")
    return lambda: attn_ops.attention(q, k, v, backend=_backend(q), **m.attn_ops)


def _attn_ops_dense_mask(q, k, v, m):
    if m.attn_ops_dense is None:
        raise Unsupported("the dense-mask form of a sparse pattern (block_sparse, document, ...); elsewhere see "
                          "attn_ops")
    return lambda: attn_ops.attention(q, k, v, backend=_backend(q), **m.attn_ops_dense)


def _attn_ops_unsplit(q, k, v, m):
    if m.kvcache is None:
        raise Unsupported("the one-split form of a decoding (KV-cache) case; elsewhere see attn_ops")
    return _cache_step(q, m, _backend(q), num_splits=1)


def _no_paged_cache(m, who):
    if m.paged:
        raise Unsupported(f"{who} reads no paged KV cache (see the dense cache's row)")


def _naive(q, k, v, m):
    if m.kvcache is not None:  # the op's own reference path, through the same (paged) cache
        return _cache_step(q, m, "reference")
    return lambda: attn_ops.reference.attention(q, k, v, **m.attn_ops)


def _sdpa(backend_name):
    backend = getattr(SDPBackend, backend_name, None)  # CUDNN_ATTENTION is missing from older torch

    def prepare(q, k, v, m):
        if backend is None:
            raise Unsupported(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
        if m.sdpa is None:
            raise Unsupported("scaled_dot_product_attention has no form of this score modifier")
        _no_paged_cache(m, "scaled_dot_product_attention")
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        kwargs = m.sdpa
        if m.sdpa_bias is not None:
            size = q.shape[1] * q.shape[2] * k.shape[2] * q.element_size()
            if size > MAX_SDPA_BIAS_BYTES:
                raise Unsupported(f"the materialised bias would take {size / 2**30:.0f} GiB "
                                  f"(limit {MAX_SDPA_BIAS_BYTES / 2**30:.0f} GiB)")
            kwargs = {**kwargs, "attn_mask": m.sdpa_bias()}

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **gqa, **kwargs)

        return run

    return prepare


def _flex(q, k, v, m):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unsupported(f"no flex_attention in torch {torch.__version__}: {e}") from None
    _no_paged_cache(m, "flex_attention (as benchmarked here)")
    # Each case compiles anew (static shapes, its own mask_mod); starting from a clean slate keeps
    # dynamo's recompile limits, past which it would quietly run flex_attention eagerly, out of play.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if m.mask_mod is not None:
        batch = q.shape[0] if m.mask_mod_batched else None
        block_mask = create_block_mask(m.mask_mod, batch, None, q.shape[2], k.shape[2], device=q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, score_mod=m.score_mod, block_mask=block_mask, enable_gqa=gqa)


def _flash_attn(q, k, v, m):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    _no_paged_cache(m, "flash_attn_func")
    if m.packed is not None:
        cu_seqlens, longest = m.packed[3:]
        return lambda: flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True)
    if m.flash_attn is None:
        raise Unsupported("flash_attn_func takes no mask tensor")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported("flash_attn needs float16 or bfloat16")
    # flash_attn's layout is [B, L, H, D]: transposed views, no copies.
    return lambda: flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **m.flash_attn
    ).transpose(1, 2)


GPU_PROVIDERS = {
    "attn_ops": _attn_ops,
    "attn_ops_padded": _attn_ops_padded,
    "attn_ops_dense_mask": _attn_ops_dense_mask,
    "attn_ops_unsplit": _attn_ops_unsplit,
    "naive": _naive,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_math": _sdpa("MATH"),
    "flex": _flex,
}
if importlib.util.find_spec("flash_attn") is not None:
    GPU_PROVIDERS["flash_attn"] = _flash_attn

# On the CPU attn_ops runs its reference (labelled so), and `naive` would repeat it; SDPA's CPU
# kernels are FLASH_ATTENTION (a tiled C++ kernel) and MATH, the plain math as ours is.
CPU_PROVIDERS = {
    "attn_ops (reference)": _attn_ops,
    "attn_ops_padded": _attn_ops_padded,
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_math": _sdpa("MATH"),
}
