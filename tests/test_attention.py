"""attn_ops.attention through the Triton kernels, forward and every gradient, against float64 math."""

import pytest
import torch

import attn_ops
from attn_ops.band import band_rules
from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs
from truth import DEVICES, DTYPES, check_against_float64, make_qkv


def run_kernel(q, k, v, **kw):
    out = attn_ops.attention(q, k, v, backend="triton", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, grads, dout


def check(q, k, v, score_gain=1.0, **kw):
    out, grads, dout = run_kernel(q, k, v, **kw)
    check_against_float64(q, k, v, out, grads, dout, score_gain, **kw)
    return out, grads


def masks(batch, heads, len_q, len_k, device):
    """Each mask kind the op takes, as a user would build it."""
    keep_len = torch.randint(len_k // 2, len_k + 1, (batch,), device=device)
    padding = torch.arange(len_k, device=device)[None, :] < keep_len[:, None]
    return {
        "key_padding_bool": padding[:, None, None, :],
        "dense_bool": torch.rand(batch, heads, len_q, len_k, device=device) > 0.3,
        "shared_additive": torch.randn(len_q, len_k, device=device),
        "additive_with_-inf": torch.zeros(batch, 1, len_q, len_k, device=device).masked_fill(
            torch.rand(batch, 1, len_q, len_k, device=device) < 0.3, float("-inf")),
    }


RULES = {
    "none": {},
    "causal_top_left": {"causal": True},
    "causal_bottom_right": {"causal": "bottom_right"},
    "window": {"window": (20, 7)},
    "window_causal_bottom_right": {"window": (30, 0), "causal": "bottom_right"},
    "causal_aligned_bottom_right": {"causal": True, "align": "bottom_right"},
    "window_bottom_right": {"window": (12, 5), "align": "bottom_right"},
    "window_unbounded_left": {"window": (None, 9)},
    "window_unbounded_right_bottom_right": {"window": (25, -1), "align": "bottom_right"},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_band_rules_match_float64(device, dtype, rule):
    q, k, v = make_qkv(2, 2, 2, 90, 130, 32, dtype, device)
    check(q, k, v, **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, head_dim_v", [(48, 32), (16, 64), (192, 128)])
def test_value_head_dim_differs_from_the_keys(device, dtype, head_dim, head_dim_v):
    # DeepSeek's MLA shape (192, 128) among them; with GQA, a causal window and a key-padding mask.
    q, k, v = make_qkv(2, 4, 2, 70, 90, head_dim, dtype, device, head_dim_v=head_dim_v)
    padding = torch.arange(90, device=device) < torch.tensor([[80], [90]], device=device)
    out, _ = check(q, k, v, causal="bottom_right", window=(40, None), mask=padding[:, None, None, :])
    assert out.shape == (2, 4, 70, head_dim_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("len_q, len_k", [(50, 120), (120, 50)])
def test_windows_aligned_bottom_right_when_queries_outnumber_keys_or_not(device, len_q, len_k):
    # With Lq > Lk the bottom-right diagonal starts left of key 0: the first rows see no key at all.
    q, k, v = make_qkv(1, 2, 1, len_q, len_k, 16, torch.float32, device)
    for rules in ({"window": (7, 3), "align": "bottom_right"}, {"window": (-1, 0), "align": "bottom_right"},
                  {"causal": "bottom_right", "window": (4, None)}):
        check(q, k, v, **rules)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", ["none", "causal_top_left", "window"])
def test_half_precision_error_is_within_twice_plain_pytorchs_without_a_floor(device, dtype, rule):
    # The floor covers cases where plain PyTorch happens to be exact; on generic inputs the kernels'
    # rounding (bf16 included, whose interpreted casts must round to nearest as the GPU's do) must
    # stand on its own.
    q, k, v = make_qkv(2, 2, 2, 90, 130, 32, dtype, device)
    out, grads, dout = run_kernel(q, k, v, **RULES[rule])
    check_against_float64(q, k, v, out, grads, dout, floor=False, **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_results_round_to_nearest_even(device):
    # Four equal scores average v = 1, 1, 1 + 2**-7, 1 + 2**-6 to 1 + 2**-8 + 2**-9 (exact in fp32),
    # which bf16 rounds to 1 + 2**-7; a truncating cast gives 1 + 2**-8.
    q = torch.zeros(1, 1, 1, 16, device=device, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 4, 16, device=device, dtype=torch.bfloat16)
    v = torch.tensor([1.0, 1.0, 1 + 2**-7, 1 + 2**-6], device=device).to(torch.bfloat16)
    out = attn_ops.attention(q, k, v[:, None].expand(4, 16)[None, None], backend="triton")
    assert (out == 1 + 2**-7).all(), out[0, 0, 0, 0].item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["key_padding_bool", "dense_bool", "shared_additive", "additive_with_-inf"])
def test_tensor_masks_match_float64(device, dtype, kind):
    q, k, v = make_qkv(2, 2, 2, 70, 100, 32, dtype, device)
    mask = masks(2, 2, 70, 100, device)[kind]
    check(q, k, v, mask=mask if mask.dtype == torch.bool else mask.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_causal_and_window_combine_by_and(device):
    q, k, v = make_qkv(1, 2, 2, 100, 100, 16, torch.float32, device)
    mask = masks(1, 2, 100, 100, device)["dense_bool"]
    check(q, k, v, mask=mask, causal=True, window=(40, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("len_q,len_k", [(1, 1), (1, 100), (17, 17), (17, 100), (100, 17), (1000, 1000)])
def test_lengths_not_multiple_of_block(device, len_q, len_k):
    q, k, v = make_qkv(1, 1, 1, len_q, len_k, 16, torch.float32, device)
    check(q, k, v, causal="bottom_right" if len_q == 1000 else False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [1, 8, 40, 64, 80, 96, 112, 128, 256])
def test_head_dims(device, head_dim):
    q, k, v = make_qkv(1, 2, 2, 40, 50, head_dim, torch.float16, device)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (4, 1), (6, 3)])
def test_grouped_query_heads(device, heads_q, heads_kv):
    q, k, v = make_qkv(2, heads_q, heads_kv, 50, 70, 32, torch.float32, device)
    mask = masks(2, heads_q, 50, 70, device)["key_padding_bool"]
    check(q, k, v, mask=mask, causal="bottom_right")


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_with_padding(device):
    q, k, v = make_qkv(2, 2, 2, 33, 150, 64, torch.bfloat16, device)
    check(q, k, v, mask=masks(2, 2, 33, 150, device)["key_padding_bool"])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_blhd_inputs_give_output_in_the_same_layout(device):
    b, l, h, d = 2, 60, 3, 32
    q, k, v = [torch.randn(b, l, h, d, device=device).transpose(1, 2).requires_grad_() for _ in range(3)]
    out, grads = check(q, k, v, causal=True)
    assert out.stride() == q.stride()
    assert [g.stride() for g in grads] == [t.stride() for t in (q, k, v)]


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_upstream_gradient(device):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, torch.float32, device)
    out = attn_ops.attention(q, k, v, backend="triton")
    dout = torch.randn(1, 40, 2, 16, device=device).transpose(1, 2)  # strided like a BLHD model's grad
    grads = torch.autograd.grad(out, (q, k, v), dout)
    check_against_float64(q, k, v, out, grads, dout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["bool_rows", "additive_rows", "bottom_right_lq_gt_lk", "window_outside"])
def test_fully_masked_rows_give_zeros_and_zero_gradients(device, case):
    q, k, v = make_qkv(1, 2, 2, 40, 30, 16, torch.float32, device)
    kw, dead = {}, torch.zeros(40, dtype=torch.bool, device=device)
    if case in ("bool_rows", "additive_rows"):
        dead[::3] = True
        allowed = ~dead[:, None].expand(40, 30)
        kw["mask"] = allowed if case == "bool_rows" else torch.zeros(40, 30, device=device).masked_fill(
            ~allowed, float("-inf"))
    elif case == "bottom_right_lq_gt_lk":
        kw["causal"] = "bottom_right"  # query i sees j <= i - 10: the first 10 queries see nothing
        dead[:10] = True
    else:
        kw["window"] = (0, 5)  # top-left, so queries past Lk + 0 see nothing: j in [i, i + 5]
        dead[30:] = True
    out, lse = attn_ops.attention(q, k, v, backend="triton", return_lse=True, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (out[:, :, dead] == 0).all()
    assert (lse[:, :, dead] == float("-inf")).all() and torch.isfinite(lse[:, :, ~dead]).all()
    assert (dq[:, :, dead] == 0).all()
    check_against_float64(q, k, v, out, (dq, dk, dv), dout, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_no_visible_key_at_all(device):
    q, k, v = make_qkv(1, 1, 1, 20, 0, 16, torch.float32, device)
    out, lse = attn_ops.attention(q, k, v, backend="triton", return_lse=True)
    dq, = torch.autograd.grad(out.sum(), q)
    assert (out == 0).all() and (lse == float("-inf")).all() and (dq == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_do_not_overflow(device, dtype):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, dtype, device)
    # Scores of about +-1e4: exp would overflow without the running max.
    check(q, k, v, scale=2000.0, score_gain=2000.0 * 32**0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_near_1e4_with_order_one_differences(device, dtype):
    # A shared direction lifts every score to about 1.1e4 while their differences stay O(1), so the
    # softmax is far from one-hot and every gradient is non-trivial: only the running max saves it.
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 64, 64, 32, torch.float32, device))
    q[..., 0], k[..., 0] = 250.0, 250.0
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = check(q, k, v)
    assert out.abs().amax() > 0.1  # not a collapsed output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=str)
def test_small_tiles_reach_interior_and_boundary_tiles(device, rule, tiles):
    # The interpreter's default 64x64 tiles leave few interior tiles at test sizes; small tiles give
    # every pass leading-boundary, interior and trailing-boundary tiles for each band rule.
    q, k, v = make_qkv(1, 2, 1, 90, 110, 16, torch.float32, device)
    rules = RULES[rule]
    *_, band_lo, band_hi = band_rules(90, 110, rules.get("causal", False), rules.get("window"), rules.get("align"))
    args = OpArgs(scale=0.25, band_lo=band_lo, band_hi=band_hi)
    config = (*tiles, 4, 1)
    out, lse_log2 = attn_fwd(q, k, v, args, config=config)
    dout = torch.randn_like(out)
    grads = attn_bwd(dout, None, q, k, v, out, lse_log2, args, config=config)[:3]
    check_against_float64(q, k, v, out, grads, dout, scale=0.25, **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
def test_large_finite_negative_mask_equals_minus_inf_mask(device):
    q, k, v = make_qkv(1, 2, 2, 50, 60, 16, torch.float32, device)
    allowed = torch.rand(50, 60, device=device) > 0.4
    allowed[:, 0] = True  # every row sees a key, so finfo.min behaves as -inf
    outs = [attn_ops.attention(q, k, v, backend="triton",
                               mask=torch.zeros(50, 60, device=device).masked_fill(~allowed, fill))
            for fill in (float("-inf"), torch.finfo(torch.float32).min, -1e9)]
    expected = attn_ops.attention(q, k, v, backend="triton", mask=allowed)
    for out in outs:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_masked_only_by_finfo_min_matches_plain_addition(device):
    q, k, v = make_qkv(1, 1, 1, 20, 30, 16, torch.float32, device)
    mask = torch.zeros(20, 30, device=device)
    mask[5] = torch.finfo(torch.float32).min  # plain addition: a uniform average of v, not a masked row
    out = attn_ops.attention(q, k, v, backend="triton", mask=mask)
    check_against_float64(q, k, v, out, mask=mask)
    torch.testing.assert_close(out[0, 0, 5], v[0, 0].mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_matches_float64_and_its_gradient_flows(device):
    q, k, v = make_qkv(1, 2, 2, 40, 50, 16, torch.float32, device)
    out, lse = attn_ops.attention(q, k, v, backend="triton", causal=True, return_lse=True)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attn_ops.reference.attention(*wide, causal=True, return_lse=True)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=0)
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad((out.sum(), (lse * dlse).sum()), (q, k, v))
    grads64 = torch.autograd.grad((out64.sum(), (lse64 * dlse.double()).sum()), wide)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_the_lse_alone(device):
    q, k, v = make_qkv(1, 2, 1, 30, 40, 16, torch.float32, device)
    _, lse = attn_ops.attention(q, k, v, backend="triton", window=(8, 8), return_lse=True)
    grads = torch.autograd.grad(lse.sum(), (q, k, v))
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, lse64 = attn_ops.reference.attention(*wide, window=(8, 8), return_lse=True)
    for g, g64 in zip(grads, torch.autograd.grad(lse64.sum(), wide, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale_is_inverse_sqrt_head_dim(device):
    q, k, v = make_qkv(1, 1, 1, 20, 20, 25, torch.float32, device)
    out = attn_ops.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, attn_ops.attention(q, k, v, backend="triton", scale=0.2))


SCALE_RULES = {
    "plain": lambda q, k: {},
    "causal, bool mask": lambda q, k: dict(causal=True, mask=torch.rand(q.shape[2], k.shape[2], device=q.device) > 0.3),
    "window, float mask, cap, ALiBi": lambda q, k: dict(
        window=(9, 3), mask=torch.randn(q.shape[2], k.shape[2], device=q.device), softcap=5.0,
        alibi_slopes=torch.rand(q.shape[1], device=q.device)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [-0.5, -4.0, 0.0], ids=str)
@pytest.mark.parametrize("rules", SCALE_RULES)
def test_any_finite_scale_as_sdpa_takes_it(device, scale, rules):
    # A negative scale flips the scores: the row max must be of the scaled scores (the max of the
    # unscaled ones is then the min, and exp2 overflows). 0 is the plain average of the visible values.
    q, k, v = make_qkv(1, 2, 1, 40, 50, 16, torch.float32, device)
    check(q, k, v, scale=scale, **SCALE_RULES[rules](q, k))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_scale_averages_the_visible_values(device):
    q, k, v = make_qkv(1, 1, 1, 30, 30, 16, torch.float32, device, scale=100.0)
    out = attn_ops.attention(q, k, v, causal=True, scale=0.0, backend="triton")
    counts = torch.arange(1, 31, device=device, dtype=torch.float32)[:, None]
    torch.testing.assert_close(out[0, 0], v[0, 0].cumsum(0) / counts)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bitwise_deterministic(device):
    q, k, v = make_qkv(2, 4, 1, 100, 100, 32, torch.bfloat16, device)
    mask = masks(2, 4, 100, 100, device)["key_padding_bool"]
    torch.manual_seed(1)  # the same upstream gradient for both runs
    a = run_kernel(q, k, v, mask=mask, causal=True)
    torch.manual_seed(1)
    b = run_kernel(q, k, v, mask=mask, causal=True)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the interpreter has no grid limits")
def test_batch_times_heads_beyond_grid_axis_limit():
    q, k, v = make_qkv(1100, 64, 64, 16, 16, 16, torch.float16, "cuda")  # B * H = 70400 > 65535
    out = attn_ops.attention(q, k, v)
    torch.testing.assert_close(out, attn_ops.attention(q, k, v, backend="reference"), atol=2e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_rows_beyond_int32_offsets(device):
    """A mask row starting 2**31 elements in (a dense 48k x 48k mask has such rows) is addressed in int64."""
    q, k, v = make_qkv(1, 1, 1, 3, 16, 16, torch.float32, device)
    row_stride = 2**30  # rows 0, 1, 2 at 0, 2**30, 2**31: only the last needs 64-bit offsets
    storage = torch.zeros(2 * row_stride + 16, dtype=torch.bool, device=device)  # virtual: pages stay untouched
    mask = storage.as_strided((3, 16), (row_stride, 1))
    for row, first_visible in enumerate((0, 4, 8)):
        mask[row, first_visible:] = True
    out, grads, dout = run_kernel(q, k, v, mask=mask)
    check_against_float64(q, k, v, out, grads, dout, mask=mask.clone())
