"""Block masks (`attn_ops.BlockMask`): each constructor against the dense mask it stands for, the
block lists (both directions) against the dense mask, memory linear in the length, attention with a
block mask against float64 math with its dense equivalent, and bad inputs naming `block_mask`."""

import pytest
import torch

import attn_ops
from attn_ops import BlockMask
from attn_ops.block_mask import _entries, _unpacked
from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs
from attn_ops.kernels.config import INTERPRETED
from truth import DEVICES, check_against_float64, make_qkv, reference_argument

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")


def _documents(length, seed=0):
    """Document ids of `length` packed tokens: random lengths, some shorter than a block."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max(2, length // 3), (length,), generator=gen)
    return torch.repeat_interleave(torch.arange(length), sizes)[:length]


def _from_lists(block_mask, lists, transposed):
    """The dense mask one direction's lists stand for, built independently of `BlockMask.dense_rows`."""
    B, H, Lq, Lk = block_mask.shape
    bs = block_mask.block_size
    n_rows, n_cols = block_mask.num_blocks
    lines_per_head = n_cols if transposed else n_rows
    dense = torch.zeros(B, H, n_rows * bs, n_cols * bs, dtype=torch.bool)
    seen = set()
    for kind, (offsets, blocks) in (("full", lists[:2]), ("partial", lists[2:4])):
        lines, others = _entries(offsets, blocks)
        for n, (line, other) in enumerate(zip(lines.tolist(), others.tolist())):
            head_line, block = divmod(line, lines_per_head)
            b, h = divmod(head_line, H)
            r, c = (other, block) if transposed else (block, other)
            assert (b, h, r, c) not in seen, "a block listed twice"
            seen.add((b, h, r, c))
            if kind == "full":
                dense[b, h, r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = True
            else:
                bits = block_mask.bits[lists.partial_bits[n].item()]
                dense[b, h, r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = _unpacked(bits[None], bs)[0]
        line_blocks = [others[lines == line].tolist() for line in range(offsets.numel() - 1)]
        assert all(blocks_ == sorted(blocks_) for blocks_ in line_blocks), "a line's blocks out of order"
    return dense[:, :, :Lq, :Lk]


def _check_stands_for(block_mask, dense):
    dense = dense.expand(*block_mask.shape[:2], *dense.shape[2:])
    assert torch.equal(block_mask.to_dense(), dense)
    assert torch.equal(_from_lists(block_mask, block_mask.rows, False), dense)
    assert torch.equal(_from_lists(block_mask, block_mask.cols, True), dense)
    bs = block_mask.block_size
    blocks = torch.nn.functional.pad(dense, (0, -dense.shape[-1] % bs, 0, -dense.shape[-2] % bs))
    counts = blocks.unflatten(2, (-1, bs)).unflatten(4, (-1, bs)).sum((3, 5))
    assert block_mask.density == pytest.approx((counts > 0).double().mean().item())
    # Full means every element in bounds may attend: a block past Lq or Lk is never full.
    assert block_mask.rows.full_blocks.numel() == int((counts == bs * bs).sum())


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("shape", [(2, 3, 300, 200), (1, 2, 128, 256), (2, 1, 77, 390)])
def test_from_mask_stands_for_its_mask(block_size, shape):
    gen = torch.Generator().manual_seed(sum(shape) + block_size)
    dense = torch.rand(shape, generator=gen) > 0.4
    dense[..., :block_size, :block_size] = True  # a full block, where the shape has one
    dense[..., block_size:2 * block_size, :] = False  # a row of empty blocks
    _check_stands_for(BlockMask.from_mask(dense, block_size=block_size), dense)


def test_from_mask_takes_broadcast_dims_and_two_dim_masks():
    dense = torch.rand(1, 1, 150, 130) > 0.5
    assert BlockMask.from_mask(dense[0, 0], block_size=64).shape == (1, 1, 150, 130)
    _check_stands_for(BlockMask.from_mask(dense[0, 0], block_size=64), dense)


def test_from_mask_mod_reads_a_captured_tensor_of_document_ids():
    docs = _documents(333)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

    block_mask = BlockMask.from_mask_mod(same_document_causal, None, None, 333, 333, device="cpu", block_size=64)
    dense = (docs[:, None] == docs[None, :]) & torch.ones(333, 333, dtype=torch.bool).tril()
    assert block_mask.shape == (1, 1, 333, 333)
    _check_stands_for(block_mask, dense[None, None])


def test_from_mask_mod_per_batch_and_head_built_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr("attn_ops.block_mask.BUILD_ELEMENTS", 64 * 64 * 6)  # chunks of one or a few blocks
    asked = []

    def rule(b, h, q_idx, kv_idx):
        asked.append(q_idx.numel() * kv_idx.numel())
        return (kv_idx - q_idx).abs() <= 40 * (b + 1) + 30 * h

    block_mask = BlockMask.from_mask_mod(rule, 2, 3, 260, 300, device="cpu", block_size=64)
    b, h, i, j = torch.meshgrid(*(torch.arange(n) for n in (2, 3, 260, 300)), indexing="ij")
    _check_stands_for(block_mask, rule(b, h, i, j))
    assert max(asked[:-1]) <= 64 * 64  # never the whole [Lq, Lk] at once


def test_from_blocks_marks_whole_blocks():
    gen = torch.Generator().manual_seed(5)
    block_map = torch.rand(2, 1, 3, 4, generator=gen) > 0.5
    block_mask = BlockMask.from_blocks(block_map, 300, 400, block_size=128)
    dense = block_map.repeat_interleave(128, 2).repeat_interleave(128, 3)[:, :, :300, :400]
    _check_stands_for(block_mask, dense)


def test_from_flex_has_the_meaning_of_torchs_block_mask():
    docs = _documents(300, seed=3)

    def same_document(b, h, q_idx, kv_idx):
        return docs[q_idx] == docs[kv_idx]

    flex = flex_attention.create_block_mask(same_document, 2, None, 300, 300, device="cpu")
    block_mask = BlockMask.from_flex(flex)
    assert block_mask.shape == (2, 1, 300, 300) and block_mask.block_size == 128
    _check_stands_for(block_mask, (docs[:, None] == docs[None, :]).expand(2, 1, 300, 300))


def test_dense_rows_is_a_slice_of_the_dense_mask():
    dense = torch.rand(2, 2, 300, 170) > 0.5
    block_mask = BlockMask.from_mask(dense, block_size=64)
    for start, stop in ((0, 300), (70, 250), (128, 129), (299, 300)):
        assert torch.equal(block_mask.dense_rows(start, stop), dense[:, :, start:stop])


def test_memory_is_linear_in_the_length():
    """A causal sliding window's lists and bits grow with the length, never with its square. (Over
    128k tokens with a 4k window: 4.2 MiB, against the issue's 64 MB; building it on a 2-core CPU
    takes minutes, so this checks the trend at 8k and 16k.)"""

    def window(length):
        rule = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < length // 8)  # noqa: E731
        return BlockMask.from_mask_mod(rule, None, None, length, length, device="cpu")

    small, large = window(8192), window(16384)
    assert large.memory_bytes <= 2.1 * small.memory_bytes
    assert large.memory_bytes <= 64 * 2**20 * 16384 / 131072
    assert large.density < 0.2


# Where attention with a block mask runs: the reference, and the kernels (the interpreter on CPU).
RUNS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", "cpu", id="kernels-cpu", marks=pytest.mark.skipif(not INTERPRETED,
                                                                           reason="needs TRITON_INTERPRET=1")),
    pytest.param("triton", "cuda", id="kernels-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")),
]


def _inputs(device, dtype=torch.float32, batch=2, heads_q=4, heads_kv=2, len_q=200, len_k=260, head_dim=32,
            head_dim_v=None):
    return make_qkv(batch, heads_q, heads_kv, len_q, len_k, head_dim, dtype, device, head_dim_v=head_dim_v)


RULES = {
    "alone": {},
    "causal": {"causal": True},
    "window": {"window": (50, 20), "align": "bottom_right"},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "softcap_alibi": {"softcap": 5.0, "alibi_slopes": "alibi"},
    "sinks": {"sinks": "sinks"},
}


def _rule(name, q, k):
    gen = torch.Generator().manual_seed(11)
    rules = dict(RULES[name])
    if rules.get("mask") == "bool":
        rules["mask"] = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=gen) > 0.3
    if rules.get("mask") == "float":
        rules["mask"] = torch.randn(1, q.shape[1], q.shape[2], k.shape[2], generator=gen).to(q.dtype)
    if rules.get("alibi_slopes") == "alibi":
        rules["alibi_slopes"] = torch.rand(q.shape[1], generator=gen)
    if rules.get("sinks") == "sinks":
        rules["sinks"] = torch.randn(q.shape[1], generator=gen).to(q.dtype)
    return {name: x.to(q.device) if torch.is_tensor(x) else x for name, x in rules.items()}


def _with_blocks(rules, dense):
    """`rules` with the block mask's dense equivalent folded into their mask."""
    mask = rules.get("mask")
    if mask is None:
        mask = dense
    elif mask.dtype == torch.bool:
        mask = mask & dense
    else:
        mask = mask.masked_fill(~dense, float("-inf"))
    return {**rules, "mask": mask}


def _documents_and_globals(device):
    """A block mask of 4 heads over 200 queries and 260 keys: per-document attention with the first
    16 keys global, head 1 unmasked (full blocks), blocks of 64 (some partial, some empty)."""
    docs = _documents(260, seed=7).to(device)
    return BlockMask.from_mask_mod(
        lambda b, h, q_idx, kv_idx: (docs[q_idx + 60] == docs[kv_idx]) | (kv_idx < 16) | (h == 1),
        None, 4, 200, 260, device=device, block_size=64)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("backend, device", RUNS)
def test_attention_with_a_block_mask_matches_float64_with_its_dense_mask(backend, device, rule):
    q, k, v = _inputs(device, head_dim_v=48 if rule == "alone" else None)
    block_mask = _documents_and_globals(device)
    rules = _rule(rule, q, k)
    out, lse = attn_ops.attention(q, k, v, block_mask=block_mask, return_lse=True, backend=backend, **rules)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw = _with_blocks(rules, block_mask.to_dense())
    check_against_float64(q, k, v, out, grads, dout, **kw)
    _, lse_dense = attn_ops.reference.attention(*(t.detach().double() for t in (q, k, v)), return_lse=True,
                                                 **{name: reference_argument(x) for name, x in kw.items()})
    assert torch.allclose(lse.double(), lse_dense, atol=1e-4)


# A learned float mask in its own shapes: whole, one per head and row ([B, 1, Lq, Lk] and [1, Hq,
# Lq, 1]: the gradient pass sums heads / keys), keys only (sums rows too); with and without a band.
@pytest.mark.parametrize("shape, rule", [
    ((1, 4, 200, 260), {}),
    ((200, 260), {"causal": True}),
    ((2, 1, 200, 260), {"window": (50, 20), "align": "bottom_right"}),
    ((1, 4, 200, 1), {}),
    ((2, 1, 1, 260), {"causal": True}),
], ids=["per_head", "shared_causal", "per_batch_window", "per_row", "per_key_causal"])
@pytest.mark.parametrize("backend, device", RUNS)
def test_a_learned_mask_with_a_block_mask_gets_its_gradient(backend, device, shape, rule):
    """The mask's gradient pass visits the block mask's listed tiles only, partial ones reading their
    bits: every gradient, the mask's in its own shape, against float64 with the same block mask."""
    q, k, v = _inputs(device)
    block_mask = _documents_and_globals(device)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
    out = attn_ops.attention(q, k, v, mask=bias, block_mask=block_mask, backend=backend, **rule)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    check_against_float64(q, k, v, out, grads, dout, mask=bias, block_mask=block_mask, **rule)


@pytest.mark.parametrize("backend, device", RUNS)
def test_half_precision_with_gqa_and_a_shared_block_mask(backend, device):
    q, k, v = _inputs(device, dtype=torch.bfloat16, batch=1, heads_q=4, heads_kv=1, len_q=130, len_k=190)
    block_map = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool, device=device)[None, None]
    block_mask = BlockMask.from_blocks(block_map, 130, 190, block_size=64)
    out = attn_ops.attention(q, k, v, block_mask=block_mask, causal="bottom_right", backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    check_against_float64(q, k, v, out, grads, dout, mask=block_mask.to_dense(), causal="bottom_right")


@pytest.mark.parametrize("backend, device", RUNS)
def test_rows_the_block_mask_hides_entirely_give_zeros_and_no_nan(backend, device):
    q, k, v = _inputs(device)
    block_map = torch.ones(1, 1, 4, 5, dtype=torch.bool, device=device)
    block_map[:, :, 1] = False  # queries 64..127 see nothing
    block_mask = BlockMask.from_blocks(block_map, 200, 260, block_size=64)
    out, lse = attn_ops.attention(q, k, v, block_mask=block_mask, return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.all(out[:, :, 64:128] == 0) and torch.all(lse[:, :, 64:128] == float("-inf"))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, :, 64:128] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernels_never_touch_an_empty_block(device):
    """Keys 128..191 are in no block any query sees, and the queries of block 0 see no key of block
    1: NaN there would reach the output and every gradient if the kernels read them (a dense mask
    hides NaN scores, not NaN values: 0 * NaN is NaN)."""
    q, k, v = _inputs(device)
    block_map = torch.ones(2, 4, 4, 5, dtype=torch.bool, device=device)
    block_map[:, :, :, 2] = False
    block_map[:, :, 0, 1] = False
    block_mask = BlockMask.from_blocks(block_map, 200, 260, block_size=64)
    with torch.no_grad():
        k[:, :, 128:192] = float("nan")
        v[:, :, 128:192] = float("nan")
    poisoned_v = v.detach().clone()
    poisoned_v[:, :, 64:128] = float("nan")  # seen by query blocks 1..3 only...
    out = attn_ops.attention(q, k, v, block_mask=block_mask, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g[:, :, :128]).all() for g in grads[1:])
    assert torch.isfinite(grads[0]).all()
    assert torch.all(grads[1][:, :, 128:192] == 0) and torch.all(grads[2][:, :, 128:192] == 0)
    # ... so query block 0's output stays finite with them.
    with torch.no_grad():
        first = attn_ops.attention(q, k, poisoned_v, block_mask=block_mask, backend="triton")
    assert torch.isfinite(first[:, :, :64]).all() and torch.isnan(first[:, :, 64:]).any()


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 64, 4, 1)])
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_tiles_smaller_than_a_block_or_a_word_of_bits(device, config):
    """Tiles iterate inside the mask's blocks; a 16-key tile reads half of a 32-bit word of bits."""
    q, k, v = _inputs(device, batch=1, heads_q=2, heads_kv=1, len_q=100, len_k=120)
    block_mask = BlockMask.from_mask(torch.rand(1, 2, 100, 120, device=device) > 0.4, block_size=64)
    args = OpArgs(scale=q.shape[-1] ** -0.5, **block_mask.kernel_args)
    out, lse_log2 = attn_fwd(q.detach(), k.detach(), v.detach(), args, config=config)
    dout = torch.randn_like(out)
    grads = attn_bwd(dout, None, q.detach(), k.detach(), v.detach(), out, lse_log2, args, config=config)[:3]
    check_against_float64(q, k, v, out, grads, dout, mask=block_mask.to_dense())


@pytest.mark.parametrize("band", [(None, None), (-30, 10)], ids=["no_band", "band"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_mask_gradient_with_tiles_smaller_than_a_block(device, band):
    """The mask's gradient pass: each program owns one 16 x 16 tile of the gradient, inside a block
    of 64 whose other tiles are other programs'."""
    q, k, v = _inputs(device, batch=1, heads_q=2, heads_kv=1, len_q=100, len_k=120)
    block_mask = BlockMask.from_mask(torch.rand(1, 2, 100, 120, device=device) > 0.4, block_size=64)
    bias = torch.randn(1, 2, 100, 120, device=device, requires_grad=True)
    args = OpArgs(scale=q.shape[-1] ** -0.5, mask=bias.detach(), band_lo=band[0], band_hi=band[1],
                  **block_mask.kernel_args)
    out, lse_log2 = attn_fwd(q.detach(), k.detach(), v.detach(), args, config=(16, 16, 4, 1))
    dout = torch.randn_like(out)
    grads = attn_bwd(dout, None, q.detach(), k.detach(), v.detach(), out, lse_log2, args, mask_grad=True,
                     config=(16, 16, 4, 1))[:4]
    window = None if band[0] is None else (-band[0], band[1])
    check_against_float64(q, k, v, out, grads, dout, mask=bias, block_mask=block_mask, window=window)


def test_launch_plans_do_not_depend_on_how_many_blocks_a_mask_keeps():
    """A launcher's plan key reads a block mask's lists and bits by dtype: their lengths are values."""
    one_block = torch.zeros(1, 1, 4, 5, dtype=torch.bool)
    one_block[0, 0, 0, 0] = True
    sparse, dense = (BlockMask.from_blocks(blocks, 200, 260, block_size=64)
                     for blocks in (one_block, torch.ones_like(one_block)))
    assert sparse.lists.numel() != dense.lists.numel() and sparse.bits.shape != dense.bits.shape
    keys = [OpArgs(scale=1.0, **mask.kernel_args).static_key() for mask in (sparse, dense)]
    assert keys[0] == keys[1]


@pytest.mark.parametrize("backend, device", RUNS)
def test_dropout_with_a_block_mask_is_dropout_with_its_dense_mask(backend, device):
    q, k, v = _inputs(device)
    block_mask = BlockMask.from_mask(torch.rand(1, 1, 200, 260, device=device) > 0.5, block_size=64)
    out = attn_ops.attention(q, k, v, block_mask=block_mask, dropout_p=0.3, seed=5, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    again = attn_ops.attention(q, k, v, mask=block_mask.to_dense(), dropout_p=0.3, seed=5, backend=backend)
    grads_again = torch.autograd.grad(again, (q, k, v), dout)
    # The pattern is keyed by each element's coordinates: the same with either mask.
    assert torch.allclose(out, again, atol=1e-5)
    assert all(torch.allclose(g, h, atol=1e-4) for g, h in zip(grads, grads_again))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_to_moves_a_block_mask_as_tensor_to_moves_a_tensor(device):
    """A model split across devices moves each layer's inputs with `.to` (accelerate's hooks)."""
    block_mask = _documents_and_globals("cpu")
    moved = block_mask.to(device, non_blocking=True)
    assert (moved is block_mask) == (device == "cpu")
    assert moved.device.type == device and moved.shape == block_mask.shape
    assert torch.equal(moved.to_dense().cpu(), block_mask.to_dense())


def test_bad_block_masks_name_block_mask():
    q, k, v = _inputs("cpu")
    with pytest.raises(TypeError, match="block_mask must be an attn_ops.BlockMask"):
        attn_ops.attention(q, k, v, block_mask=torch.ones(200, 260, dtype=torch.bool))
    wrong = BlockMask.from_mask(torch.ones(1, 1, 200, 200, dtype=torch.bool), block_size=64)
    with pytest.raises(ValueError, match=r"block_mask shape \[1, 1, 200, 200\] does not match"):
        attn_ops.attention(q, k, v, block_mask=wrong)
    three_heads = BlockMask.from_mask(torch.ones(1, 3, 200, 260, dtype=torch.bool), block_size=64)
    with pytest.raises(ValueError, match="block_mask shape"):
        attn_ops.attention(q, k, v, block_mask=three_heads)


def test_bad_constructor_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="mask's B, H, Lq, Lk must be ints"):
        BlockMask.from_mask(torch.ones(0, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_map's B and H, Lq, Lk must be ints"):
        BlockMask.from_blocks(torch.ones(1, 0, 1, 1, dtype=torch.bool), 8, 8, block_size=64)
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlockMask.from_mask(torch.ones(8, 8, dtype=torch.bool), block_size=32)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        BlockMask.from_mask(torch.ones(8, 8))
    with pytest.raises(TypeError, match="mask_mod must return a bool tensor"):
        BlockMask.from_mask_mod(lambda b, h, q_idx, kv_idx: q_idx - kv_idx, None, None, 8, 8, device="cpu")
    with pytest.raises(ValueError, match=r"block_map must be \[B \| 1, H \| 1, ceil"):
        BlockMask.from_blocks(torch.ones(1, 1, 2, 2, dtype=torch.bool), 300, 100, block_size=128)
    with pytest.raises(ValueError, match="BLOCK_SIZE must be square"):
        BlockMask.from_flex(flex_attention.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                                             256, 256, device="cpu", BLOCK_SIZE=(128, 64)))
