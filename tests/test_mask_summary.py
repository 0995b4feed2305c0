"""A dense bool ``mask=`` summarized into a block mask inside the call (`attn_ops.mask_summary`): the
same lists and bits as `BlockMask.from_mask`, made without a host read; through the kernels the
same results as the dense mask's float64 math; made once per mask object."""

import pytest
import torch

import attn_ops
from attn_ops import BlockMask, fused, mask_summary, problem
from attn_ops.kernels.config import INTERPRETED
from test_host_path import kernel_path, no_host_reads
from truth import DEVICES, check_against_float64, make_qkv

KERNEL_DEVICES = [device for device in DEVICES if device == "cuda" or INTERPRETED]


@pytest.fixture
def summarize_all(monkeypatch):
    """Every bool mask with rows and columns of its own is summarized (not only those of at least
    `MIN_SUMMARIZED` elements: the interpreter takes small shapes), and each summary is counted."""
    monkeypatch.setattr(mask_summary, "MIN_SUMMARIZED", 0)
    monkeypatch.setattr(mask_summary, "_KEPT", [])
    monkeypatch.setattr(problem, "_DESCRIBED", {})  # calls planned before with the bool-mask path: forgotten
    made = []
    summarized = mask_summary.summarized

    def counted(mask, *args, **kwargs):
        made.append(mask.shape)
        return summarized(mask, *args, **kwargs)

    monkeypatch.setattr(mask_summary, "summarized", counted)
    return made


def _blocky_mask(batch, heads, len_q, len_k, device, seed=0):
    """Random bits with whole 128-blocks kept and dropped: full, partial and empty blocks."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, heads, len_q, len_k, generator=gen) > 0.4
    mask[..., :128, 128:256] = False
    mask[..., 128:256, :128] = True
    return mask.to(device)


def _same_lists(block_mask, summary):
    """The summary's lists, up to each line's last entry, and the bits they point at are the block mask's."""
    summarized = BlockMask(block_mask.shape, block_mask.block_size, summary["block_lists"], summary["block_bits"])
    for side in ("rows", "cols"):
        built, made = getattr(block_mask, side), getattr(summarized, side)
        for kind in ("full", "partial"):
            assert torch.equal(getattr(made, f"{kind}_offsets"), getattr(built, f"{kind}_offsets")), (side, kind)
            entries = int(getattr(built, f"{kind}_offsets")[-1])
            assert torch.equal(getattr(made, f"{kind}_blocks")[:entries], getattr(built, f"{kind}_blocks")), (side, kind)
        entries = int(built.partial_offsets[-1])
        assert torch.equal(summarized.bits[made.partial_bits[:entries].long()],
                           block_mask.bits[built.partial_bits.long()]), side


@pytest.mark.parametrize("shape", [(1, 1, 300, 260), (2, 3, 256, 384), (1, 2, 128, 128), (2, 1, 129, 1000)])
def test_the_summary_holds_the_lists_and_bits_of_from_mask(shape):
    mask = _blocky_mask(*shape, "cpu")
    summary = mask_summary.summarized(mask)
    assert (summary["block_size"], summary["block_batch"], summary["block_heads"]) == (128, *shape[:2])
    _same_lists(BlockMask.from_mask(mask), summary)


def test_a_batch_read_through_stride_0_is_summarized_once():
    mask = _blocky_mask(1, 2, 300, 260, "cpu").expand(3, 2, 300, 260)
    summary = mask_summary.summary(mask)
    assert (summary["block_batch"], summary["block_heads"]) == (1, 2)
    _same_lists(BlockMask.from_mask(mask[:1]), summary)


def test_which_masks_are_summarized():
    big = mask_summary.MIN_SUMMARIZED
    assert mask_summary.summarizable(torch.ones(1, 1, 1024, big // 1024, dtype=torch.bool))
    assert mask_summary.summarizable(torch.ones(1024, big // 1024, dtype=torch.bool))
    assert not mask_summary.summarizable(torch.ones(1, 1, 1024, big // 1024 - 1, dtype=torch.bool))  # too small
    assert not mask_summary.summarizable(torch.ones(1, 1, 1024, big // 1024))  # float: added, not a rule
    assert not mask_summary.summarizable(torch.ones(4, 1, 1, big, dtype=torch.bool))  # a key mask
    assert not mask_summary.summarizable(torch.ones(4, 1, 1, big, dtype=torch.bool).expand(4, 1, 8, big))


def test_a_call_gets_the_summary_in_place_of_the_mask(summarize_all):
    q, k, v = make_qkv(2, 4, 2, 300, 260, 32, torch.float32, "cpu")
    mask = _blocky_mask(2, 1, 300, 260, "cpu")
    args = fused.op_args(problem.describe(q, k, v, mask=mask))
    assert args.mask is None and args.block_size == 128 and (args.block_batch, args.block_heads) == (2, 1)
    assert fused.op_args(problem.describe(q, k, v, mask=mask[:, :, :1])).mask is not None  # a key mask stays one


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("rules", [{}, {"causal": True}, {"window": (60, 10), "align": "bottom_right"},
                                   {"softcap": 5.0, "alibi": True}],
                         ids=["alone", "causal", "window", "softcap_alibi"])
def test_summarized_masks_through_the_kernels_match_float64(device, rules, summarize_all):
    q, k, v = make_qkv(2, 4, 2, 300, 260, 32, torch.float32, device)
    mask = _blocky_mask(2, 1, 300, 260, device)
    mask[1, :, 40:70] = False  # rows that see nothing: zeros, no NaN
    rules = dict(rules)
    if rules.pop("alibi", False):
        rules["alibi_slopes"] = torch.rand(4, device=device)
    out = attn_ops.attention(q, k, v, mask=mask, backend="triton", **rules)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert summarize_all == [(2, 1, 300, 260)]
    assert torch.all(out[1, :, 40:70] == 0) and all(torch.isfinite(g).all() for g in grads)
    check_against_float64(q, k, v, out, grads, dout, mask=mask, **rules)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dropout_with_a_summarized_mask_is_dropout_with_the_mask(device, summarize_all, monkeypatch):
    q, k, v = make_qkv(2, 4, 2, 300, 260, 32, torch.float32, device)
    mask = _blocky_mask(1, 4, 300, 260, device)
    out = attn_ops.attention(q, k, v, mask=mask, dropout_p=0.3, seed=5, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    monkeypatch.setattr(mask_summary, "MIN_SUMMARIZED", float("inf"))
    monkeypatch.setattr(problem, "_DESCRIBED", {})  # the same static parts planned anew: no summary
    again = attn_ops.attention(q, k, v, mask=mask, dropout_p=0.3, seed=5, backend="triton")
    grads_again = torch.autograd.grad(again, (q, k, v), dout)
    assert summarize_all == [(1, 4, 300, 260)]
    # The pattern is keyed by each element's coordinates: the same through the bits as through the mask.
    assert torch.allclose(out, again, atol=1e-5)
    assert all(torch.allclose(g, h, atol=1e-4) for g, h in zip(grads, grads_again))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_half_precision_gqa_and_a_two_dim_mask(device, summarize_all):
    q, k, v = make_qkv(1, 4, 1, 260, 300, 64, torch.bfloat16, device)
    mask = _blocky_mask(1, 1, 260, 300, device)[0, 0]
    out = attn_ops.attention(q, k, v, mask=mask, causal="bottom_right", backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert summarize_all == [(1, 1, 260, 300)]
    check_against_float64(q, k, v, out, grads, dout, mask=mask, causal="bottom_right")


def test_one_summary_per_mask_object_until_it_changes(summarize_all):
    q, k, v = make_qkv(1, 2, 2, 300, 260, 16, torch.float32, "cpu")
    mask = _blocky_mask(1, 1, 300, 260, "cpu")
    with kernel_path():
        for _ in range(3):  # the layers of a model: one mask object
            attn_ops.attention(q, k, v, mask=mask)
        assert len(summarize_all) == 1
        mask[:, :, :, :50] = False  # in place: its version moves
        attn_ops.attention(q, k, v, mask=mask)
        attn_ops.attention(q, k, v, mask=mask.clone())  # another object with the same values
    assert len(summarize_all) == 3
    del mask
    assert not mask_summary._KEPT  # a summary goes with its mask


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_summarizing_reads_no_values(backward, summarize_all):
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(2, 4, 2, 300, 260, 32, torch.float32, "cpu"))
    mask = _blocky_mask(2, 1, 300, 260, "cpu")
    with kernel_path(), torch.set_grad_enabled(backward), no_host_reads():
        out = attn_ops.attention(q, k, v, mask=mask, causal=True)
        if backward:
            out.sum().backward()
    assert summarize_all
