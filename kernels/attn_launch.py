"""What every launcher takes besides its tensors (`KernelArgs`), and the kernel arguments each pass
derives from it the same way (`launch_args`)."""

from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from .attn_common import LOG2E
from .config import ADD_MASK, BOOL_MASK, INTERPRETED, NO_MASK, TMA_MAX_HEAD_DIM, head_dim_pad


@dataclass(frozen=True)
class KernelArgs:
    """The rules of one attention call as the kernels take them: flat, typed fields, so that the
    custom ops' schemas are derived from this class (`attn_ops.fused`) and a new argument is one
    field here, its use in `launch_args` and the kernels, and nothing else.

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

    def flat(self):
        """The fields in order, as the custom ops take them."""
        return tuple(getattr(self, name) for name in KERNEL_ARG_NAMES)


KERNEL_ARG_NAMES = tuple(f.name for f in fields(KernelArgs))


class LaunchArgs(NamedTuple):
    mask: torch.Tensor
    mask_strides: tuple
    mask_kind: int
    seed: torch.Tensor
    band_lo: int
    band_hi: int
    qk_scale: float
    softcap_log2: float
    alibi: torch.Tensor
    alibi_strides: tuple
    sinks: torch.Tensor
    dropout_scale: float
    plain: bool  # no mask, dropout, cap or ALiBi: the scores are the scaled dot products (bigger tiles fit)
    # The compile-time switches every pass takes: head dims (and their tile padding), which score
    # modifiers and dropout run, and how the dot runs (fp32's TF32 switch, the interpreter's bf16).
    constexprs: dict


def launch_args(q, k, v_head_dim, args):
    """Kernel arguments that every pass derives the same way from the call's `KernelArgs`."""
    head_dim = q.shape[-1]
    interpreted_bf16 = INTERPRETED and q.dtype == torch.bfloat16
    # Rows of q and k: one sequence's ([B, H, L, D]), or every sequence's when packed ([total, H, D]).
    len_q, len_k = (q.shape[0], k.shape[0]) if args.cu_seqlens_q is not None else (q.shape[2], k.shape[2])
    mask = args.mask
    if mask is None:
        mask, mask_strides, mask_kind = q, (0, 0, 0, 0), NO_MASK.value
    else:
        # A broadcast view: size-1 dimensions get stride 0, nothing is copied.
        mask = mask.expand(*q.shape[:2], len_q, len_k)
        mask_kind = BOOL_MASK.value if mask.dtype == torch.bool else ADD_MASK.value
        if mask_kind == BOOL_MASK.value:
            mask = mask.view(torch.uint8)
        mask_strides = mask.stride()
    # [Hq] slopes are shared by the batch: stride 0 over it.
    alibi = args.alibi_slopes
    alibi_strides = (0, 0) if alibi is None else (0, *alibi.stride()) if alibi.dim() == 1 else alibi.stride()
    # An unbounded side of the band becomes an offset no index pair can reach.
    reach = len_q + len_k
    fp32 = q.dtype == torch.float32
    tf32 = fp32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return LaunchArgs(
        mask=mask,
        mask_strides=mask_strides,
        mask_kind=mask_kind,
        seed=args.seed if args.dropout_p > 0 else q,  # a dummy pointer the kernel never reads
        band_lo=-reach if args.band_lo is None else args.band_lo,
        band_hi=reach if args.band_hi is None else args.band_hi,
        # With a cap, the dot times qk_scale is the argument of tanh, and softcap_log2 scales tanh
        # back into log2-domain scores: softcap * tanh(s / softcap) * log2(e).
        qk_scale=args.scale * LOG2E.value if args.softcap is None else args.scale / args.softcap,
        softcap_log2=0.0 if args.softcap is None else args.softcap * LOG2E.value,
        alibi=q if alibi is None else alibi,  # q: a dummy pointer the kernel never reads
        alibi_strides=alibi_strides,
        sinks=q if args.sinks is None else args.sinks.contiguous(),  # read as sinks[h]: [Hq], unit stride
        # dropout_p = 1 keeps nothing: a scale of 0, not 1 / 0.
        dropout_scale=1.0 / (1.0 - args.dropout_p) if args.dropout_p < 1 else 0.0,
        plain=mask_kind == NO_MASK.value and args.dropout_p == 0 and args.softcap is None and alibi is None,
        constexprs=dict(
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), HEAD_DIM_V=v_head_dim,
            HEAD_DIM_V_PAD=head_dim_pad(v_head_dim), SOFTCAP=args.softcap is not None,
            ALIBI=args.alibi_slopes is not None, DROPOUT=args.dropout_p > 0, INTERPRETED_BF16=interpreted_bf16,
            INPUT_PRECISION="tf32" if tf32 else "ieee",
        ),
    )



def uses_tma(kernel, head_dim, *tensors):
    """Whether pass `kernel` ("fwd", "dkdv", "dq") at head dim `head_dim` reads and writes these
    tensors through TMA descriptors: where `tma_allowed`, and its padded head dim up to
    `TMA_MAX_HEAD_DIM`."""
    return head_dim_pad(head_dim) <= TMA_MAX_HEAD_DIM[kernel] and tma_allowed(*tensors)


def tma_allowed(*tensors):
    """Whether the kernels may read and write these [B, H, L, D] tensors through TMA descriptors: on
    Hopper or later (or in Triton's interpreter, which runs descriptors too), each tensor 16-byte
    aligned, not empty, its last dimension contiguous and its other strides multiples of 16 bytes (the
    copy engine's rules). Otherwise the kernels take the pointer path."""
    if not INTERPRETED and not (tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9):
        return False
    return all(t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(stride * t.element_size() % 16 == 0 and stride > 0
                       for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)
               for t in tensors)


def descriptors(tma, *tiles):
    """For each (tensor [B, H, L, D], rows per tile) of `tiles`: with `tma`, a tensor descriptor whose
    box is one tile of rows (the head dim padded as the kernels pad it; the copy engine fills the
    padding and rows past L with zeros); else the tensor itself (the pointer path)."""
    if not tma:
        return tuple(t for t, _ in tiles)
    return tuple(TensorDescriptor(t, list(t.shape), [_box_stride(t, d) for d in range(4)],
                                  [1, 1, rows, head_dim_pad(t.shape[-1])]) for t, rows in tiles)


def _box_stride(t, dim):
    # A size-1 dimension is only ever read at 0, so its stride is free; the copy engine still wants a
    # multiple of 16 bytes there (a [B, 1, L, D] view may carry stride 1).
    if t.shape[dim] > 1 or dim == 3:
        return t.stride(dim)
    return max(t.stride(d) * t.shape[d] for d in range(4))
