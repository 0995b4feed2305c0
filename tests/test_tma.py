"""Both ways the dense kernels reach memory: TMA tensor descriptors (Hopper, and the interpreter, which
runs them) and the pointer path every other layout and GPU takes. With the same tiles they compute the
same arithmetic, so in the interpreter, where every path takes `INTERPRETER_TILE`, their results are
bitwise equal and the float64 checks of the rest of the suite hold for both. On a GPU the descriptor
path takes bigger tiles for plain scores (`TMA_TILES`): the sums run in another order, so there the
two agree to rounding."""

import pytest
import torch

from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs, descriptor_layouts, descriptors, tma_allowed
from attn_ops.kernels.config import INTERPRETED
from truth import DEVICES, make_qkv

CASES = {
    # (batch, heads_q, heads_kv, len_q, len_k, head_dim, head_dim_v, rules)
    "plain": (2, 2, 2, 64, 128, 32, 32, {}),
    # lengths that are no multiple of the tile: the copy engine's zero fill stands in for the masks
    "ragged lengths, GQA": (1, 4, 2, 37, 75, 32, 32, {}),
    "causal band, bool mask": (1, 2, 1, 70, 70, 16, 16, dict(band_lo=-30, band_hi=0, mask=True)),
    "padded head dims (40, 24)": (1, 2, 2, 33, 48, 40, 24, {}),
    "dropout, ALiBi, cap": (1, 2, 2, 48, 40, 16, 16, dict(dropout_p=0.25, softcap=20.0, alibi=True)),
}
# Relative to the tensor's norm. fp16 results of fp32 sums: tiles of another width change the order of
# the sums and the running max each tile's probabilities are rounded to fp16 against, so the results
# move by a fraction of fp16's unit, 2**-11 (the interpreter, given other tiles, moves them by 2.3e-4).
ROUNDING = 2e-3


def op_args(rules, q, k, device):
    mask = None
    if rules.get("mask"):
        mask = torch.rand(q.shape[2], k.shape[2], device=device) > 0.3
    alibi = torch.rand(q.shape[1], device=device) if rules.get("alibi") else None
    dropout_p = rules.get("dropout_p", 0.0)
    return OpArgs(scale=q.shape[-1] ** -0.5, mask=mask, band_lo=rules.get("band_lo"),
                      band_hi=rules.get("band_hi"), softcap=rules.get("softcap"), alibi_slopes=alibi,
                      dropout_p=dropout_p,
                      seed=torch.tensor([11], device=device) if dropout_p else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("case", CASES)
def test_pointer_path_equals_descriptor_path(device, layout, case):
    batch, heads_q, heads_kv, len_q, len_k, head_dim, head_dim_v, rules = CASES[case]
    q, k, v = make_qkv(batch, heads_q, heads_kv, len_q, len_k, head_dim, torch.float16, device,
                       head_dim_v=head_dim_v)
    if layout == "BLHD":  # [B, L, H, D] storage seen as [B, H, L, D]
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.detach() for t in (q, k, v))
    do = torch.randn(batch, heads_q, len_q, head_dim_v, device=device, dtype=q.dtype)
    assert tma_allowed(q, k, v, do) == (device == "cpu" or torch.cuda.get_device_capability()[0] >= 9)
    args = op_args(rules, q, k, device)
    out, lse = attn_fwd(q, k, v, args)
    out_ptr, lse_ptr = attn_fwd(q, k, v, args, tma=False)
    assert_same("out", out, out_ptr)
    assert_same("lse", lse, lse_ptr)
    grads = attn_bwd(do, None, q, k, v, out, lse, args)[:3]
    grads_ptr = attn_bwd(do, None, q, k, v, out, lse, args, tma=False)[:3]
    for name, a, b in zip("qkv", grads, grads_ptr):
        assert_same(f"d{name}", a, b)


def assert_same(name, descriptor_path, pointer_path):
    """Bitwise equal in the interpreter (the same tiles); on a GPU equal to rounding, with -inf (an
    LSE row that sees no key) in the same places."""
    if INTERPRETED:
        assert torch.equal(descriptor_path, pointer_path), name
        return
    finite = pointer_path.isfinite()
    assert torch.equal(descriptor_path.isfinite(), finite), name
    assert torch.equal(descriptor_path[~finite], pointer_path[~finite]), name
    a, b = descriptor_path[finite].double(), pointer_path[finite].double()
    gap, size = (a - b).norm().item(), b.norm().item()
    assert gap <= ROUNDING * size, f"{name}: |a - b| = {gap:.3g}, |b| = {size:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_the_copy_engine_cannot_read_take_the_pointer_path(device):
    q = torch.randn(1, 2, 8, 64, device=device, dtype=torch.float16)
    assert tma_allowed(q, q)
    assert not tma_allowed(torch.randn(1, 2, 8, 36, device=device, dtype=q.dtype), q)  # 72-byte rows
    assert not tma_allowed(q.transpose(-1, -2), q)  # head dim not contiguous
    shifted = torch.randn(q.numel() + 4, device=device, dtype=q.dtype)[4:].view(q.shape)
    assert not tma_allowed(shifted, q)  # its first element 8 bytes off a 16-byte boundary
    assert not tma_allowed(q[:, :, :0], q)  # empty
    # A size-1 dimension's stride is never used: any value is fine, and the descriptor gets a legal one.
    one_head = q[:, :1].as_strided((1, 1, 8, 64), (1024, 1, 64, 1))
    assert tma_allowed(one_head)
    assert all(s % 8 == 0 for s in descriptors(descriptor_layouts(True, (one_head, 16)), one_head)[0].strides[:-1])
