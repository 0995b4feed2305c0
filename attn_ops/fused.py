"""The fused path: the Triton kernels as torch.library custom ops (with fake implementations, so
torch.compile traces through them) behind a torch.autograd.Function."""

import math
from typing import Optional

import torch
from torch import Tensor

from kernels.attn_bwd import attn_bwd
from kernels.attn_fwd import attn_fwd

LN2 = math.log(2.0)


@torch.library.custom_op("attn_ops::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], band_lo: Optional[int],
                  band_hi: Optional[int], scale: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return attn_fwd(q, k, v, mask, band_lo, band_hi, scale, dropout_p, seed)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask, band_lo, band_hi, scale, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attn_ops::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  mask: Optional[Tensor], band_lo: Optional[int], band_hi: Optional[int], scale: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return attn_bwd(dout, dlse, q, k, v, out, lse, mask, band_lo, band_hi, scale, dropout_p, seed)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, mask, band_lo, band_hi, scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttention(torch.autograd.Function):
    """Saves q, k, v, out and lse (plus the caller's mask and seed): no [Lq, Lk] tensor."""

    @staticmethod
    def forward(ctx, q, k, v, mask, band_lo, band_hi, scale, dropout_p, seed):
        out, lse2 = torch.ops.attn_ops.attention_fwd(q, k, v, mask, band_lo, band_hi, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse2, mask, seed)
        ctx.band, ctx.scale, ctx.dropout_p = (band_lo, band_hi), scale, dropout_p
        ctx.set_materialize_grads(False)  # an unused lse passes None, not a tensor of zeros
        return out, lse2 * LN2  # the kernels keep log2 units; users get the natural log

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse2, mask, seed = ctx.saved_tensors
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.ops.attn_ops.attention_bwd(dout, dlse, q, k, v, out, lse2, mask, *ctx.band, ctx.scale,
                                                      ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None, None


def fused_attention(q, k, v, mask, band_lo, band_hi, scale, dropout_p, seed):
    """(out, lse) through the kernels; `seed` is an int64 tensor on q's device when dropout_p > 0."""
    return FusedAttention.apply(q, k, v, mask, band_lo, band_hi, scale, dropout_p, seed)
