"""The fused decoding implementation of `attn_ops.attention_with_kvcache`: the split-KV kernels
(`kernels.attn_decode`) as a torch.library custom op with a fake implementation, so decoding steps
trace into torch.compile graphs (and CUDA graphs) with no host sync. Inference only: no backward.

The op reads the caches; writing the new tokens in (`cache.append`) happens before it, in torch.
"""

import torch

from .fused import kernel_args_schema, not_supported_reasons  # the generic kernels' limits hold here too
from .kernels.attn_decode import decode_fwd
from .kernels.attn_launch import KernelArgs
from .kernels.layout import empty_like_q

NAME = "triton-decode"


def _decode(q, k_cache, v_cache, cache_seqlens, block_table, len_new, num_splits, *flat):
    return decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, len_new, num_splits, KernelArgs(*flat))


def _decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, len_new, num_splits, *flat):
    return empty_like_q(q, v_cache.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


attention_decode = torch.library.custom_op(
    "attn_ops::attention_decode", _decode, mutates_args=(),
    schema=kernel_args_schema("Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
                              "SymInt len_new, SymInt? num_splits", "(Tensor, Tensor)"),
)
attention_decode.register_fake(_decode_fake)


def run_cache(q, k_cache, v_cache, problem):
    """(out, natural-log lse) of a `CacheProblem` through the kernels; the caches already hold the new tokens."""
    flat = KernelArgs(scale=problem.scale, band_lo=problem.band_lo, band_hi=problem.band_hi, softcap=problem.softcap,
                      alibi_slopes=problem.alibi_slopes, sinks=problem.sinks).flat()
    return torch.ops.attn_ops.attention_decode(q, k_cache, v_cache, problem.cache_seqlens, problem.block_table,
                                               problem.len_new, problem.num_splits, *flat)
