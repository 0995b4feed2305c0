"""The fused decoding implementation of `attn_ops.attention_with_kvcache`: the split-KV kernels
(`kernels.attn_decode`), with no host sync. Inference only: no backward.

In eager mode the new tokens go into the caches through one kernel (`kernels.attn_append`) and the
launchers run directly, with the Problem's plans. While torch.compile traces, the append is
torch's (`cache.append`, which the graph functionalizes) and the kernels run as a torch.library
custom op with a fake implementation, so decoding steps trace into graphs (and CUDA graphs).
"""

import torch

from .cache import append
from .fused import (kernel_operands, launchers_run_directly, op_args, op_args_schema,
                    not_supported_reasons)  # the generic kernels' limits hold here too
from .kernels.attn_append import append_rows
from .kernels.attn_decode import decode_fwd
from .kernels.attn_launch import OpArgs
from .kernels.layout import empty_like_q

NAME = "triton-decode"


def _decode(q, k_cache, v_cache, cache_seqlens, block_table, len_new, num_splits, *flat):
    return decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, len_new, num_splits, OpArgs(*flat))


def _decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, len_new, num_splits, *flat):
    return empty_like_q(q, v_cache.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


attention_decode = torch.library.custom_op(
    "attn_ops::attention_decode", _decode, mutates_args=(),
    schema=op_args_schema("Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
                              "SymInt len_new, SymInt? num_splits", "(Tensor, Tensor)"),
)
attention_decode.register_fake(_decode_fake)


def run_cache(q, k_cache, v_cache, k_new, v_new, problem):
    """(out, natural-log lse) of a decoding `Problem` through the kernels, after appending k_new and v_new."""
    q, args = kernel_operands(q, op_args(problem))
    if not launchers_run_directly():
        if problem.len_new:
            append(k_cache, v_cache, k_new, v_new, problem)
        return torch.ops.attn_ops.attention_decode(q, k_cache, v_cache, problem.cache_seqlens, problem.block_table,
                                                   problem.len_new, problem.num_splits, *args)
    if problem.len_new:
        append_rows(k_new, v_new, k_cache, v_cache, problem.cache_seqlens, problem.block_table, plans=problem.plans)
    return decode_fwd(q, k_cache, v_cache, problem.cache_seqlens, problem.block_table, problem.len_new,
                      problem.num_splits, args, plans=problem.plans)

