"""What every launcher takes besides its tensors (`OpArgs`), and the kernel arguments each pass
derives from it the same way (`launch_args`)."""

import functools
from typing import NamedTuple, Optional

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from .attn_common import LOG2E
from .bundles import Scores, Switches
from .modifiers import modifier_of
from .precision import tf32_allowed
from .config import (ADD_MASK, BOOL_MASK, INTERPRETED, NO_MASK, TMA_MAX_HEAD_DIM, device_properties,
                     head_dim_pad)
from .layout import on_16_bytes


class OpArgs(NamedTuple):
    """The rules of one attention call as the op takes them: what the launchers take besides the
    tensors, and the custom ops' flat, typed arguments (their schemas are derived from this class:
    `attn_ops.fused`). The kernels take what `launch_args` derives from them (the bundles of
    `kernels.bundles`). A new argument is one field here, its use in `launch_args` and the kernels,
    and nothing else: `fused.op_args` takes it from the Problem's field of the same name (a block
    mask's, `BLOCK_MASK_ARG_NAMES`, from `BlockMask.kernel_args`). A named tuple, passed on as the
    ops' flat arguments as it is; kept in a Problem's plans where it holds no tensor.

    ``band_lo``/``band_hi``: query i sees key j iff ``i + band_lo <= j <= i + band_hi`` (None:
    unbounded). ``mask``: bool (True = may attend) or float (added), broadcastable to
    [B, Hq, Lq, Lk]. ``diagonal_shift``: i' - i, where ALiBi measures distances from.
    ``softcap``: None or the cap of the scaled scores. ``alibi_slopes``: None or float32 [Hq] or
    [B, Hq]. ``sinks``: None or [Hq] logits. ``seed``: an int64 tensor [1] on q's device when
    ``dropout_p > 0``.

    Packed sequences (`kernels.attn_varlen`): ``cu_seqlens_q``/``cu_seqlens_k`` int32 [B + 1], no
    mask, ``band_lo``/``band_hi`` and ALiBi relative to each sequence's own diagonal: with
    ``bottom_right`` the kernels add that sequence's Lk - Lq (a dense call folds its shift into the
    band and ``diagonal_shift`` on the host, and leaves ``bottom_right`` False).
    """

    scale: float
    mask: Optional[torch.Tensor] = None
    band_lo: Optional[int] = None
    band_hi: Optional[int] = None
    diagonal_shift: int = 0
    softcap: Optional[float] = None
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    seed: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    bottom_right: bool = False
    # A block mask (`attn_ops.BlockMask.kernel_args`): its lists (int32) and bits (uint8), its block
    # size (0: none) and its batch and head counts (1 where it broadcasts).
    block_lists: Optional[torch.Tensor] = None
    block_bits: Optional[torch.Tensor] = None
    block_size: int = 0
    block_batch: int = 1
    block_heads: int = 1

    def flat(self):
        """The fields in order, as the custom ops take them."""
        return tuple(self)

    def static_key(self):
        """The fields as a launcher's static work depends on them: the tensors by shape, strides and
        dtype, never their values (see `launch_key`); a block mask's lists and bits by dtype alone
        (their lengths count its non-empty blocks: values)."""
        return tuple((x.dtype if name in BLOCK_MASK_TENSORS else (x.shape, x.stride(), x.dtype))
                     if isinstance(x, torch.Tensor) else x for name, x in zip(self._fields, self))


OP_ARG_NAMES = OpArgs._fields
BLOCK_MASK_ARG_NAMES = ("block_lists", "block_bits", "block_size", "block_batch", "block_heads")
BLOCK_MASK_TENSORS = BLOCK_MASK_ARG_NAMES[:2]


class LaunchArgs(NamedTuple):
    """The kernel arguments of one call that depend only on its static parts (shapes, strides,
    dtypes, rules): a launcher computes them once per `launch_key` (see `remembered`)."""

    mask_strides: tuple
    mask_kind: int
    alibi_strides: tuple
    block_strides: tuple  # a block mask's lines per batch and per head (0 where it broadcasts)
    scores: Scores  # with the lengths of q's and k's rows (every sequence's, packed)
    plain: bool  # no mask, dropout, cap or ALiBi: the scores are the scaled dot products (bigger tiles fit)
    # The `Switches` every pass takes alike: head dims (and their tile padding), which score
    # modifiers and dropout run, and how the dot runs (fp32's TF32 switch, the interpreter's bf16).
    constexprs: dict

    def switches(self, **per_pass):
        """The `Switches` of a pass: these with its own (tile, TMA, ...); the mask kind unless given,
        no sinks and no paged cache unless given."""
        return Switches.of(**{"MASK_KIND": self.mask_kind, "SINKS": False, "PAGED": False, **self.constexprs,
                              **per_pass})


class LaunchTensors(NamedTuple):
    """The tensors every pass reads beside q, k, v; q stands in for an absent one (a pointer the
    kernel never reads)."""

    mask: torch.Tensor  # a bool mask as its uint8 view (nonzero = may attend)
    blocks: tuple  # a block mask's (lists, bits)
    alibi: torch.Tensor
    sinks: torch.Tensor  # read as sinks[h]: [Hq], unit stride
    seed: torch.Tensor


def launch_args(q, k, v_head_dim, args):
    """Kernel arguments that every pass derives the same way from the call's `OpArgs`."""
    head_dim = q.shape[-1]
    interpreted_bf16 = INTERPRETED and q.dtype == torch.bfloat16
    # Rows of q and k: one sequence's ([B, H, L, D]), or every sequence's when packed ([total, H, D]).
    len_q, len_k = (q.shape[0], k.shape[0]) if args.cu_seqlens_q is not None else (q.shape[2], k.shape[2])
    mask = args.mask
    if mask is None:
        mask_strides, mask_kind = (0, 0, 0, 0), NO_MASK.value
    else:
        # The strides of a broadcast view: size-1 dimensions get stride 0, nothing is copied.
        mask_strides = mask.expand(*q.shape[:2], len_q, len_k).stride()
        mask_kind = BOOL_MASK.value if mask.dtype == torch.bool else ADD_MASK.value
    # [Hq] slopes are shared by the batch: stride 0 over it.
    alibi = args.alibi_slopes
    alibi_strides = (0, 0) if alibi is None else (0, *alibi.stride()) if alibi.dim() == 1 else alibi.stride()
    # An unbounded side of the band becomes an offset no index pair can reach.
    reach = len_q + len_k
    fp32 = q.dtype == torch.float32
    tf32 = fp32 and q.is_cuda and tf32_allowed()
    return LaunchArgs(
        mask_strides=mask_strides,
        mask_kind=mask_kind,
        alibi_strides=alibi_strides,
        block_strides=(args.block_heads if args.block_batch > 1 else 0, 1 if args.block_heads > 1 else 0),
        scores=Scores(
            len_q=len_q,
            len_k=len_k,
            band_lo=-reach if args.band_lo is None else args.band_lo,
            band_hi=reach if args.band_hi is None else args.band_hi,
            diagonal_shift=args.diagonal_shift,
            # With a cap, the dot times qk_scale is the argument of tanh, and softcap_log2 scales tanh
            # back into log2-domain scores: softcap * tanh(s / softcap) * log2(e).
            qk_scale=args.scale * LOG2E.value if args.softcap is None else args.scale / args.softcap,
            softcap_log2=0.0 if args.softcap is None else args.softcap * LOG2E.value,
            dropout_p=args.dropout_p,
            # dropout_p = 1 keeps nothing: a scale of 0, not 1 / 0.
            dropout_scale=1.0 / (1.0 - args.dropout_p) if args.dropout_p < 1 else 0.0,
            scale=args.scale,
        ),
        plain=mask_kind == NO_MASK.value and args.dropout_p == 0 and args.softcap is None and alibi is None,
        constexprs=dict(
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), HEAD_DIM_V=v_head_dim,
            HEAD_DIM_V_PAD=head_dim_pad(v_head_dim), SOFTCAP=args.softcap is not None,
            ALIBI=args.alibi_slopes is not None, DROPOUT=args.dropout_p > 0, INTERPRETED_BF16=interpreted_bf16,
            INPUT_PRECISION="tf32" if tf32 else "ieee",
            MODIFIER=modifier_of(args.softcap is not None, args.alibi_slopes is not None),
            # BANDED is read with a block mask only: without one it would split compiled kernels for nothing.
            BLOCK_SIZE=args.block_size,
            BANDED=bool(args.block_size) and (args.band_lo is not None or args.band_hi is not None),
        ),
    )


def launch_tensors(q, args):
    """This call's `LaunchTensors`."""
    mask = q if args.mask is None else args.mask.view(torch.uint8) if args.mask.dtype == torch.bool else args.mask
    return LaunchTensors(
        mask=mask,
        blocks=(q, q) if args.block_lists is None else (args.block_lists, args.block_bits),
        alibi=q if args.alibi_slopes is None else args.alibi_slopes,
        sinks=q if args.sinks is None else args.sinks.contiguous(),
        seed=args.seed if args.dropout_p > 0 else q,
    )


def launch_key(args, *tensors):
    """What a launcher's static work depends on: the tensors' shapes, strides, dtypes and 16-byte
    alignment (TMA), their device, torch's TF32 switch for float32, and the rules with their tensors
    by shape, strides and dtype (never their values)."""
    first = tensors[0]
    return (tuple((t.shape, t.stride(), t.dtype, on_16_bytes(t)) for t in tensors), first.device,
            first.dtype == torch.float32 and first.is_cuda and tf32_allowed(),
            args.static_key())


class PassPlan(NamedTuple):
    """What one kernel launch derives from the call's static parts (`launch_key`)."""

    grid: tuple
    block_m: int
    block_n: int
    layouts: tuple  # `descriptor_layouts` of its tensors that may go through TMA, in argument order
    scalars: tuple  # the kernel's strides and scalar arguments, in order
    options: dict  # its compile-time arguments (TMA among them), warps and stages


MAX_REMEMBERED = 1024


def remembered(plans, key, make):
    """``plans[key]``, made by ``make()`` the first time: a launcher's static work, done once per
    `launch_key`. Bounded: a stream of new shapes (growing caches, varying lengths) starts over."""
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= MAX_REMEMBERED:
            plans.clear()
        plan = plans[key] = make()
    return plan


def planned(plans, name, remembered_plans, key, make):
    """A launch plan: `plans`' entry `name` (a Problem's plans, shared by every call with its static
    parts; None: there are none), else the launcher's `remembered_plans` entry for ``key()``, made by
    `make` the first time (`remembered`) and kept in `plans` too. The launch key is built only on a
    miss."""
    plan = None if plans is None else plans.get(name)
    if plan is None:
        plan = remembered(remembered_plans, key(), make)
        if plans is not None:
            plans[name] = plan
    return plan


def uses_tma(kernel, head_dim, *tensors):
    """Whether pass `kernel` ("fwd", "dkdv", "dq") at head dim `head_dim` reads and writes these
    tensors through TMA descriptors: where `tma_allowed`, for 2-byte dtypes, and its padded head
    dim up to `TMA_MAX_HEAD_DIM`. float32 keeps pointers: its tiles fed from descriptor-loaded
    shared memory spill up to 3.7 KB per thread on sm_90, through pointers at most 72 bytes (compile
    check)."""
    return (tensors[0].element_size() == 2 and head_dim_pad(head_dim) <= TMA_MAX_HEAD_DIM[kernel]
            and tma_allowed(*tensors))


def tma_allowed(*tensors):
    """Whether the kernels may read and write these [B, H, L, D] tensors through TMA descriptors: on
    Hopper or later (or in Triton's interpreter, which runs descriptors too), each tensor 16-byte
    aligned, not empty, its last dimension contiguous and its other strides multiples of 16 bytes (the
    copy engine's rules). Otherwise the kernels take the pointer path."""
    if not INTERPRETED and not (tensors[0].is_cuda and device_properties(tensors[0].device).major >= 9):
        return False
    for t in tensors:
        if not on_16_bytes(t) or t.stride(-1) != 1 or t.numel() == 0:
            return False
        element_size = t.element_size()
        for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
            if size > 1 and (stride <= 0 or stride * element_size % 16):
                return False
    return True


def descriptor_layouts(tma, *tiles):
    """For each (tensor [B, H, L, D], rows per tile) of `tiles`: with `tma`, the fields of its tensor
    descriptor but the tensor itself, whose box is one tile of rows (the head dim padded as the
    kernels pad it; the copy engine fills the padding and rows past L with zeros); else None (the
    pointer path). Made once per plan: Triton's constructor validates every field, microseconds per
    descriptor, and `tma_allowed` has checked the same rules."""
    if not tma:
        return (None,) * len(tiles)
    return tuple(dict(vars(TensorDescriptor(t, list(t.shape), [_box_stride(t, d) for d in range(4)],
                                            [1, 1, rows, head_dim_pad(t.shape[-1])])), base=None)
                 for t, rows in tiles)  # base None: a plan keeps no tensor alive


def descriptors(layouts, *tensors):
    """The launch arguments of `tensors`, laid out as planned (`descriptor_layouts`): a tensor
    descriptor of each, or on the pointer path the tensors themselves."""
    if layouts[0] is None:
        return tensors
    return [_described(fields, t) for fields, t in zip(layouts, tensors)]


def _described(fields, t):
    descriptor = object.__new__(TensorDescriptor)  # no validation: `descriptor_layouts` made the fields
    attributes = descriptor.__dict__
    attributes.update(fields)
    attributes["base"] = t
    return descriptor


def _box_stride(t, dim):
    # A size-1 dimension is only ever read at 0, so its stride is free; the copy engine still wants a
    # multiple of 16 bytes there (a [B, 1, L, D] view may carry stride 1, a [1, 1, 1, 40] bf16 row
    # spans 80 bytes): the tensor's span, rounded up to 16 bytes.
    if t.shape[dim] > 1 or dim == 3:
        return t.stride(dim)
    per_16_bytes = 16 // t.element_size()
    return -(-max(t.stride(d) * t.shape[d] for d in range(4)) // per_16_bytes) * per_16_bytes


def on_inputs_device(launcher):
    """`launcher` run with its first argument's CUDA device current: Triton launches on the current
    device and its current stream, not on its arguments' device."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return launch
