"""Score modifiers through the Triton kernels against float64 math: softcap, ALiBi, sinks and the
gradient of a float mask (a learned bias), alone and combined with the band rules, GQA, odd head
dims and dropout."""

import pytest
import torch

import attn_ops
from attn_ops.band import band_rules
from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs
from test_attention import RULES, run_kernel
from truth import DEVICES, DTYPES, check_against_float64, check_finite_differences, make_qkv, reference_argument

# Rules that move each query's diagonal (and so ALiBi's distances) or cut the key range.
MODIFIER_RULES = ["none", "causal_aligned_bottom_right", "window_bottom_right", "window_unbounded_left"]


def check(q, k, v, score_gain=1.0, **kw):
    """Forward, the gradients of q, k, v (and of a mask and sinks that require grad) and the LSE's
    gradient, against float64."""
    learned = [kw[name] for name in ("mask", "sinks") if kw.get(name) is not None and kw[name].requires_grad]
    out, lse = attn_ops.attention(q, k, v, backend="triton", return_lse=True, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, *learned), dout, retain_graph=True)
    check_against_float64(q, k, v, out, grads, dout, score_gain, **kw)
    truth_lse = attn_ops.attention(*(t.detach().double() for t in (q, k, v)), return_lse=True, backend="reference",
                                   **{name: reference_argument(x) for name, x in kw.items()})[1]
    torch.testing.assert_close(lse.double(), truth_lse, atol=1e-4 if q.dtype == torch.float32 else 2e-2, rtol=0)
    return out, lse, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", MODIFIER_RULES)
def test_softcap(device, dtype, rule):
    # Scores up to ~+-12 against a cap of 5: into tanh's saturation, where the backward's 1 - tanh^2 matters.
    q, k, v = make_qkv(2, 2, 2, 70, 90, 32, dtype, device, scale=3.0)
    check(q, k, v, softcap=5.0, **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", MODIFIER_RULES)
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes_Hq", "slopes_B_Hq"])
def test_alibi(device, dtype, rule, per_batch):
    q, k, v = make_qkv(2, 4, 2, 70, 90, 32, dtype, device)
    slopes = torch.rand(2, 4, device=device) if per_batch else 2.0 ** -torch.arange(1, 5, device=device).float()
    check(q, k, v, alibi_slopes=slopes, **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("len_q, len_k", [(50, 120), (120, 50)])
def test_alibi_distances_follow_align_when_lengths_differ(device, len_q, len_k):
    q, k, v = make_qkv(1, 2, 1, len_q, len_k, 16, torch.float32, device)
    slopes = torch.tensor([0.5, 0.125], device=device)
    for align in ("top_left", "bottom_right"):
        check(q, k, v, alibi_slopes=slopes, align=align)
        check(q, k, v, alibi_slopes=slopes, causal=True, window=(20, None), align=align)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", ["none", "causal_top_left", "window_bottom_right"])
@pytest.mark.parametrize("sink_dtype", ["float32", "q_dtype"])
def test_sinks(device, dtype, rule, sink_dtype):
    q, k, v = make_qkv(2, 4, 2, 70, 90, 32, dtype, device)
    sinks = (torch.randn(4, device=device) * 3).to(torch.float32 if sink_dtype == "float32" else dtype)
    out, lse, grads = check(q, k, v, sinks=sinks.requires_grad_(), **RULES[rule])
    assert grads[-1].dtype == sinks.dtype and grads[-1].shape == (4,)


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_gradient_through_the_lse_alone(device):
    q, k, v = make_qkv(1, 2, 2, 40, 50, 16, torch.float32, device)
    sinks = torch.randn(2, device=device, requires_grad=True)
    weight = torch.randn(1, 2, 40, device=device)
    results = []
    for backend, cast in (("triton", lambda t: t), ("reference", lambda t: t.double())):
        lse = attn_ops.attention(*(cast(t) for t in (q, k, v)), sinks=cast(sinks), causal=True, return_lse=True,
                                 backend=backend)[1]
        results.append(torch.autograd.grad((lse * cast(weight)).sum(), (q, sinks)))
    for kernel, truth in zip(*results):
        torch.testing.assert_close(kernel, truth, atol=1e-5, rtol=1e-5)  # both float32: grads of float32 leaves


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_with_sinks_give_zeros_and_lse_equal_to_the_sink(device):
    q, k, v = make_qkv(1, 2, 2, 40, 30, 16, torch.float32, device)
    sinks = torch.tensor([0.5, -2.0], device=device, requires_grad=True)
    kw = dict(causal="bottom_right", sinks=sinks)  # query i sees j <= i - 10: the first 10 see nothing
    out, lse = attn_ops.attention(q, k, v, backend="triton", return_lse=True, **kw)
    assert (out[:, :, :10] == 0).all()
    torch.testing.assert_close(lse[:, :, :10], sinks.detach()[None, :, None].expand(1, 2, 10))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    assert all(not g.isnan().any() for g in grads) and (grads[0][:, :, :10] == 0).all()
    check_against_float64(q, k, v, out, grads, dout, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_sinks_are_read_per_head(device):
    q, k, v = make_qkv(1, 4, 2, 30, 40, 16, torch.float32, device)
    for sinks in (torch.randn(4, 2, device=device)[:, 0], torch.tensor([2.0], device=device).expand(4)):
        check(q, k, v, sinks=sinks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_sinks", [False, True])
def test_lse_gradient_with_fully_masked_rows_is_finite_in_both_implementations(device, with_sinks):
    q, k, v = make_qkv(1, 2, 2, 40, 30, 16, torch.float32, device)
    mask = torch.randn(40, 30, device=device).masked_fill(torch.arange(40, device=device)[:, None] % 4 == 0,
                                                          float("-inf")).requires_grad_()
    sinks = torch.tensor([0.5, float("-inf")], device=device, requires_grad=True) if with_sinks else None
    inputs = (q, k, v, mask) + ((sinks,) if with_sinks else ())
    grads = {}
    for backend in ("triton", "reference"):
        out, lse = attn_ops.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True, backend=backend)
        finite = torch.isfinite(lse)
        grads[backend] = torch.autograd.grad(out.sum() + lse[finite].sum(), inputs)
        assert all(not g.isnan().any() for g in grads[backend]), backend
    for kernel, truth in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(kernel, truth, atol=1e-5, rtol=1e-5)


# Every broadcast the mask may have: per element, shared by the batch (T5's bias), by everything
# (Swin's relative bias), key padding, per query row, one value per head.
MASK_SHAPES = {
    "B_H_Lq_Lk": (2, 4, 70, 90),
    "1_H_Lq_Lk": (1, 4, 70, 90),
    "Lq_Lk": (70, 90),
    "B_1_1_Lk": (2, 1, 1, 90),
    "B_H_Lq_1": (2, 4, 70, 1),
    "H_1_1": (4, 1, 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("rule", ["none", "causal_top_left", "window_bottom_right"])
def test_mask_gradient_in_the_masks_own_shape(device, shape, rule):
    q, k, v = make_qkv(2, 4, 2, 70, 90, 32, torch.float32, device)
    mask = torch.randn(MASK_SHAPES[shape], device=device, requires_grad=True)
    _, _, grads = check(q, k, v, mask=mask, **RULES[rule])
    assert grads[-1].shape == mask.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_dtype", ["float32", "q_dtype"])
def test_mask_gradient_in_half_precision(device, dtype, mask_dtype):
    q, k, v = make_qkv(2, 2, 2, 70, 90, 32, dtype, device)
    mask = torch.randn(1, 2, 70, 90, device=device).to(torch.float32 if mask_dtype == "float32" else dtype)
    mask[..., ::7] = float("-inf")  # masked keys get a zero gradient
    _, _, grads = check(q, k, v, mask=mask.requires_grad_(), causal=True)
    assert grads[-1].dtype == mask.dtype and (grads[-1][..., ::7] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_and_sinks_gradients_are_bitwise_deterministic(device):
    q, k, v = make_qkv(2, 4, 2, 100, 130, 32, torch.float32, device)
    mask = torch.randn(130, device=device, requires_grad=True)  # shared by every batch, head and query
    sinks = torch.randn(4, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        out = attn_ops.attention(q, k, v, mask=mask, sinks=sinks, backend="triton")
        runs.append(torch.autograd.grad(out.square().sum(), (q, k, v, mask, sinks)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim, head_dim_v", [(48, 32), (16, 64), (192, 128)])
def test_every_modifier_at_once_with_gqa_and_odd_head_dims(device, dtype, head_dim, head_dim_v):
    q, k, v = make_qkv(2, 4, 2, 70, 90, head_dim, dtype, device, head_dim_v=head_dim_v, scale=2.0)
    mask = (torch.randn(1, 4, 70, 90, device=device) * 0.5).to(dtype).requires_grad_()
    sinks = torch.randn(4, device=device, requires_grad=True)
    check(q, k, v, mask=mask, sinks=sinks, softcap=8.0, alibi_slopes=torch.rand(4, device=device),
          window=(30, 10), align="bottom_right")


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_with_dropout_match_finite_differences(device):
    # Dropout's pattern is the kernels' own (Philox), so the float64 reference cannot replay it: for
    # a fixed seed the op is a smooth function, and its gradients must be that function's.
    q, k, v = (torch.randn(1, 2, 24, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 24, 24, device=device, requires_grad=True)
    sinks = torch.randn(2, device=device, requires_grad=True)
    slopes = torch.tensor([0.3, 0.1], device=device)
    weight = torch.randn(1, 2, 24, 16, device=device)

    def loss(q, k, v, mask, sinks):
        out = attn_ops.attention(q, k, v, mask=mask, sinks=sinks, softcap=4.0, alibi_slopes=slopes, causal=True,
                                 dropout_p=0.3, seed=5, backend="triton")
        return (out * weight).sum()

    check_finite_differences(loss, (q, k, v, mask, sinks))


@pytest.mark.parametrize("device", DEVICES)
def test_small_tiles_with_modifiers_reach_interior_and_boundary_tiles(device):
    # Interior tiles skip the band mask but must keep ALiBi, the cap and the mask; 16x16 tiles give
    # every pass (the mask gradient's included) interior tiles at this size.
    q, k, v = make_qkv(1, 2, 1, 90, 110, 16, torch.float32, device)
    kw = dict(scale=0.25, mask=torch.randn(90, 110, device=device, requires_grad=True), softcap=6.0,
              alibi_slopes=torch.tensor([0.2, 0.05], device=device),
              sinks=torch.randn(2, device=device, requires_grad=True), window=(40, 3))
    *_, band_lo, band_hi = band_rules(90, 110, False, kw["window"], None)
    args = OpArgs(band_lo=band_lo, band_hi=band_hi, **{name: kw[name] for name in
                                                           ("scale", "mask", "softcap", "alibi_slopes", "sinks")})
    config = (16, 16, 4, 1)
    out, lse_log2 = attn_fwd(q, k, v, args, config=config)
    dout = torch.randn_like(out)
    grads = attn_bwd(dout, None, q, k, v, out, lse_log2, args, mask_grad=True, config=config)
    check_against_float64(q, k, v, out, grads, dout, **kw)
