"""The generic fused implementation: the Triton kernels as torch.library custom ops (with fake
implementations, so torch.compile traces through them) behind a torch.autograd.Function; in eager
mode the same Function calls the launchers directly (`run`). Dense and packed (varlen) calls share
the ops: `OpArgs.cu_seqlens_q` picks the launchers.

The ops' schemas are derived from `OpArgs`: a field added there reaches the ops, the fakes and
the autograd.Function without another signature to edit. Every LSE at the op boundary is in log2
units and named so: the forward op returns ``lse_log2``, the backward op takes it and
``dlse_log2``, the gradient of that same output; only `run` converts to the natural-log LSE users
see, when they ask for it (log2 units keep the backward's probabilities exact: see attn_fwd).
"""

import math
from typing import Optional, get_type_hints

import torch
from torch import Tensor

from . import mask_summary
from .kernels.attn_bwd import attn_bwd
from .kernels.attn_fwd import attn_fwd
from .kernels.attn_launch import BLOCK_MASK_ARG_NAMES, OP_ARG_NAMES, OpArgs
from .kernels.attn_varlen import varlen_bwd, varlen_fwd
from .kernels.config import FLOAT32_WIDE_SHARED, INTERPRETED, MAX_HEAD_DIM, shared_memory_per_block
from .kernels.layout import empty_like_q

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LN2 = math.log(2.0)

# The OpArgs fields that are the Problem's of the same names (the block mask's come from it: `op_args`).
PROBLEM_ARG_NAMES = tuple(name for name in OP_ARG_NAMES if name not in BLOCK_MASK_ARG_NAMES)
_SCHEMA_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", int: "SymInt", Optional[int]: "SymInt?",
                 float: "float", Optional[float]: "float?", bool: "bool"}


# The positions of the `OpArgs` fields that may hold a tensor.
_TENSOR_FIELDS = tuple(i for i, name in enumerate(OP_ARG_NAMES)
                       if get_type_hints(OpArgs)[name] in (Tensor, Optional[Tensor]))


def op_args_schema(leading, returns):
    """A custom op schema: the `leading` arguments, then every `OpArgs` field, typed."""
    hints = get_type_hints(OpArgs)
    rest = ", ".join(f"{_SCHEMA_TYPES[hints[name]]} {name}" for name in OP_ARG_NAMES)
    return f"({leading}, {rest}) -> {returns}"


def _fwd(q, k, v, *flat):
    return _forward(q, k, v, OpArgs._make(flat))


def _forward(q, k, v, args, plans=None):
    """The forward launchers for `args` (an `OpArgs`); `plans`: see `run`."""
    if args.cu_seqlens_q is not None:
        return varlen_fwd(q, k, v, args, plans=plans)
    return attn_fwd(q, k, v, args, plans=plans)


def _fwd_fake(q, k, v, *flat):
    if OpArgs(*flat).cu_seqlens_q is not None:  # packed: out [total_q, Hq, Dv], lse [Hq, total_q]
        return q.new_empty(*q.shape[:2], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return empty_like_q(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd(dout, dlse_log2, q, k, v, out, lse_log2, mask_grad, *flat):
    return _backward(dout, dlse_log2, q, k, v, out, lse_log2, mask_grad, OpArgs._make(flat))


def _backward(dout, dlse_log2, q, k, v, out, lse_log2, mask_grad, args, plans=None):
    """The backward launchers for `args` (an `OpArgs`); `plans`: see `run`."""
    if args.cu_seqlens_q is not None:
        return varlen_bwd(dout, dlse_log2, q, k, v, out, lse_log2, args, plans=plans)
    return attn_bwd(dout, dlse_log2, q, k, v, out, lse_log2, args, mask_grad=mask_grad, plans=plans)


def _bwd_fake(dout, dlse_log2, q, k, v, out, lse_log2, mask_grad, *flat):
    args = OpArgs(*flat)
    # dmask and dsinks are new contiguous tensors of the mask's and the sinks' shapes, whatever their strides.
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            args.mask.new_empty(args.mask.shape) if mask_grad else None,
            None if args.sinks is None else args.sinks.new_empty(args.sinks.shape))


attention_fwd = torch.library.custom_op(
    "attn_ops::attention_fwd", _fwd, mutates_args=(),
    schema=op_args_schema("Tensor q, Tensor k, Tensor v", "(Tensor, Tensor)"),
)
attention_fwd.register_fake(_fwd_fake)
attention_bwd = torch.library.custom_op(
    "attn_ops::attention_bwd", _bwd, mutates_args=(),
    schema=op_args_schema("Tensor dout, Tensor? dlse_log2, Tensor q, Tensor k, Tensor v, Tensor out, "
                              "Tensor lse_log2, bool mask_grad", "(Tensor, Tensor, Tensor, Tensor?, Tensor?)"),
)
attention_bwd.register_fake(_bwd_fake)


def launchers_run_directly():
    """Whether a call may run the launchers itself: not while torch.compile traces (Dynamo, compiled
    autograd) nor under a dispatch mode (FakeTensorMode, make_fx), which must see the custom ops."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


class FusedAttention(torch.autograd.Function):
    """Saves q, k, v, out and lse_log2, and the tensors among the `OpArgs` `args` (the caller's
    mask, slopes, sinks and the seed): no [Lq, Lk] tensor. Returns the log2 LSE (`run` converts it).
    The mask and the sinks, the arguments with a gradient, come first on their own; `args` after them
    as one argument (each argument of `apply` costs host time). `plans`: see `run`; None while
    torch.compile traces, which then records the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, mask, sinks, plans, args):
        if plans is None:
            out, lse_log2 = torch.ops.attn_ops.attention_fwd(q, k, v, *args)
        else:
            out, lse_log2 = _forward(q, k, v, args, plans)
        tensors = [args[i] for i in _TENSOR_FIELDS if args[i] is not None]
        ctx.save_for_backward(q, k, v, out, lse_log2, *tensors)
        ctx.args = args
        if tensors:  # saved_tensors gives them back (version-checked); ctx keeps the rest
            ctx.is_tensor = [isinstance(x, Tensor) for x in args]
            ctx.args = [None if t else x for x, t in zip(args, ctx.is_tensor)]
        ctx.plans = plans
        ctx.set_materialize_grads(False)  # an unused lse passes None, not a tensor of zeros
        return out, lse_log2

    @staticmethod
    def backward(ctx, dout, dlse_log2):
        q, k, v, out, lse_log2, *tensors = ctx.saved_tensors
        args = ctx.args
        if tensors:
            tensors = iter(tensors)
            args = OpArgs._make([next(tensors) if t else x for x, t in zip(args, ctx.is_tensor)])
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        mask_grad = ctx.needs_input_grad[3]
        if ctx.plans is None or not launchers_run_directly():
            grads = torch.ops.attn_ops.attention_bwd(dout, dlse_log2, q, k, v, out, lse_log2, mask_grad, *args)
        else:
            grads = _backward(dout, dlse_log2, q, k, v, out, lse_log2, mask_grad, args, ctx.plans)
        dq, dk, dv, dmask, dsinks = grads
        return dq, dk, dv, dmask, dsinks, None, None


def not_supported_reasons(problem):
    """Why the generic kernels cannot run `problem` (empty when they can)."""
    names, why = problem.names, []
    if problem.device.type != "cuda" and not INTERPRETED:
        why.append(f"{names['q']} is on {problem.device}: the kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                   "set before triton is first imported, to run them on CPU)")
    if problem.dtype not in DTYPES:
        why.append(f"dtype {problem.dtype}: the kernels compute float16, bfloat16 and float32")
    head_dim = max(problem.head_dim, problem.head_dim_v)
    if head_dim > MAX_HEAD_DIM:
        why.append(f"head dim {head_dim} > {MAX_HEAD_DIM}")
    elif problem.dtype == torch.float32 and head_dim > 256 and problem.device.type == "cuda" and \
            shared_memory_per_block(problem.device) < FLOAT32_WIDE_SHARED:
        why.append(f"float32 at head dim {head_dim} needs {FLOAT32_WIDE_SHARED} bytes of shared memory per block, "
                   f"this GPU has {shared_memory_per_block(problem.device)} (half precision fits)")
    return why


def run(q, k, v, problem):
    """(out, lse) through the kernels; the `OpArgs` fields are the `Problem`'s of the same names.
    The natural-log lse only where the caller asked for it (None otherwise: no conversion), and no
    autograd node where nothing needs a gradient.

    In eager mode the launchers run directly, with the Problem's `plans` (tiles, grids and launch
    arguments made by the first call with the same static parts): the custom-op layer alone would
    cost more host time than the rest of the call. While torch.compile traces, or under a dispatch
    mode, the custom ops run, so that graphs and modes see them (with their fakes).
    """
    q, args = kernel_operands(q, op_args(problem))
    plans = problem.plans if launchers_run_directly() else None
    if problem.requires_grad:
        out, lse_log2 = FusedAttention.apply(q, k, v, args.mask, args.sinks, plans, args)
    elif plans is None:
        out, lse_log2 = torch.ops.attn_ops.attention_fwd(q, k, v, *args)
    else:
        out, lse_log2 = _forward(q, k, v, args, plans)
    return out, lse_log2 * LN2 if problem.return_lse else None


# One block of keys at a time, for ring attention (`attn_ops.ring`): float32 partial results whose
# LSE is in log2 units, the kernels' own (see the module docstring).
LSE_BASE = 2.0


def run_block(q, k, v, problem):
    """(out float32, lse_log2) of the queries against this block of keys; no autograd."""
    q, args = kernel_operands(q, op_args(problem))
    return attn_fwd(q, k, v, args, out_dtype=torch.float32)


def block_grads(dout, dlse_log2, q, k, v, out, lse_log2, problem):
    """float32 (dq, dk, dv) of the rows' final `out` and `lse_log2` (over every block of keys, merged)
    with respect to q and this block's k and v: each block's share of the full backward. The kernels
    read the LSE as [B * Hq, Lq] rows: a slice of rows is made contiguous first."""
    q_operand, args = kernel_operands(q, op_args(problem))
    dq, dk, dv = attn_bwd(dout, dlse_log2, q_operand, k, v, out, lse_log2.contiguous(), args,
                          grad_dtype=torch.float32)[:3]
    # d q_operand / d q: -1 for a negative scale, 0 for a zero one (kernel_operands).
    return dq if problem.scale > 0 else dq * (-1.0 if problem.scale < 0 else 0.0), dk, dv


def kernel_operands(q, args):
    """(q, args) as the kernels take them: with a positive scale, their online softmax keeping the max
    of the unscaled scores times it. Any other finite scale (SDPA takes them) runs on another q, one
    elementwise op only then, through which autograd carries dq back: a negative scale as its
    magnitude on -q, a zero one (the plain average of the visible values) as 1 on q * 0."""
    if args.scale > 0:
        return q, args
    if args.scale < 0:
        return -q, args._replace(scale=-args.scale)
    return q * 0.0, args._replace(scale=1.0)


def _summarized_mask(problem):
    """Whether `problem`'s dense mask runs summarized (`mask_summary.summarizable`): decided once per
    static key, in its plans, which the launches are planned by."""
    summarized = problem.plans.get(mask_summary)
    if summarized is None:
        summarized = problem.plans[mask_summary] = mask_summary.summarizable(problem.mask)
    return summarized


def op_args(problem):
    """The `OpArgs` of `problem`, of every entry point (a decoding step's key mask is the mask its
    kernels read; a block mask's fields are its `kernel_args`, and so are those of a dense bool mask's
    `mask_summary` where it is `summarizable`, in its place): kept in its plans where they hold no
    tensor, as then for every call with its static parts (those with a mask, say, hold this call's)."""
    args = problem.plans.get(OpArgs)
    if args is None:
        args = OpArgs(**{name: getattr(problem, name) for name in PROBLEM_ARG_NAMES})
        if problem.cache_seqlens is not None:
            args = args._replace(mask=problem.key_mask)
        if problem.block_mask is not None:
            args = args._replace(**problem.block_mask.kernel_args)
        elif problem.mask is not None and _summarized_mask(problem):
            args = args._replace(mask=None, **mask_summary.summary(problem.mask))
        if not any([isinstance(x, Tensor) for x in args]):
            problem.plans[OpArgs] = args
    return args
