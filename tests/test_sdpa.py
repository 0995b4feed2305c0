"""attn_ops.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention."""

import pytest
import torch
import torch.nn.functional as F

import attn_ops
import attn_ops.sdpa
from truth import DEVICES

# float32 on CPU: both sides compute in float32 and differ only in summation order, which moves a
# result of magnitude ~1 by a few ulp (~1e-7 each) over at most a few hundred terms.
TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(batch=2, heads_q=4, heads_kv=4, len_q=7, len_k=9, dim=16, requires_grad=False):
    q = torch.randn(batch, heads_q, len_q, dim, requires_grad=requires_grad)
    k = torch.randn(batch, heads_kv, len_k, dim, requires_grad=requires_grad)
    v = torch.randn(batch, heads_kv, len_k, dim, requires_grad=requires_grad)
    return q, k, v


def _masks(batch, heads, len_q, len_k):
    """Masks of each kind SDPA accepts, every query row keeping key 0 (torch and we agree there)."""
    keep = torch.rand(batch, heads, len_q, len_k) > 0.4
    keep[..., 0] = True
    padding = torch.ones(batch, 1, 1, len_k, dtype=torch.bool)
    padding[0, ..., len_k // 2 :] = False
    bias = torch.randn(1, heads, len_q, len_k)
    return {
        "bool_full": keep,
        "bool_2d": keep[0, 0],
        "bool_key_padding": padding,
        "float_full": torch.randn(batch, heads, len_q, len_k).masked_fill(~keep, float("-inf")),
        "float_head_bias": bias,
    }


MASK_KINDS = ["bool_full", "bool_2d", "bool_key_padding", "float_full", "float_head_bias"]


@pytest.mark.parametrize("mask_kind", [None] + MASK_KINDS)
def test_output_and_gradients_match_sdpa_for_each_mask_kind(mask_kind):
    q, k, v = _qkv(requires_grad=True)
    mask = None if mask_kind is None else _masks(2, 4, 7, 9)[mask_kind]
    ours = attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, theirs, **TOL)
    grad = torch.randn_like(theirs)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("len_q, len_k", [(7, 7), (5, 9), (9, 5)])
def test_is_causal_is_top_left_like_sdpa(len_q, len_k):
    q, k, v = _qkv(len_q=len_q, len_k=len_k)
    ours = attn_ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL)


def test_scale_overrides_the_default_like_sdpa():
    q, k, v = _qkv()
    ours = attn_ops.scaled_dot_product_attention(q, k, v, scale=0.37)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=0.37), **TOL)


@pytest.mark.parametrize("heads_kv", [1, 2])
def test_grouped_query_attention_matches_sdpa_with_enable_gqa(heads_kv):
    q, k, v = _qkv(heads_q=4, heads_kv=heads_kv)
    mask = _masks(2, 4, 7, 9)["bool_key_padding"]
    ours = attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("rank", [2, 3])
def test_lower_rank_inputs_match_sdpa(rank):
    q, k, v = (t[(0,) * (4 - rank)] for t in _qkv())
    mask = _masks(2, 4, 7, 9)["float_full"][(0,) * (4 - rank)]
    ours = attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **TOL)


def test_mask_reaches_the_op_unexpanded(op_calls):
    seen = op_calls(attn_ops.sdpa)
    q, k, v = _qkv()
    padding = _masks(2, 4, 7, 9)["bool_key_padding"]
    attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=padding)
    assert seen["mask"].shape == padding.shape and seen["mask"].data_ptr() == padding.data_ptr()


def test_fully_masked_rows_give_zeros_like_sdpa():
    q, k, v = _qkv()
    mask = _masks(2, 4, 7, 9)["bool_full"].clone()
    mask[:, :, 3] = False
    ours = attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(ours[:, :, 3], torch.zeros_like(ours[:, :, 3]))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)


def test_dropout_is_applied_and_repeatable_under_manual_seed():
    q, k, v = _qkv()
    torch.manual_seed(1)
    first = attn_ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    again = attn_ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.allclose(first, attn_ops.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("is_causal", ["False", "no", "0", 1, None])
def test_is_causal_must_be_a_bool_like_sdpa(is_causal):
    # torch's SDPA raises TypeError; a truthy string must not turn on a causal mask.
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="is_causal"):
        attn_ops.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def test_is_causal_with_attn_mask_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="is_causal"):
        attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(7, 9, dtype=torch.bool), is_causal=True)


def test_fewer_kv_heads_without_enable_gqa_raises_like_sdpa():
    q, k, v = _qkv(heads_q=4, heads_kv=2)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        attn_ops.scaled_dot_product_attention(q, k, v)


def test_kv_heads_not_dividing_query_heads_raise_like_sdpa():
    q, k, v = _qkv(heads_q=4, heads_kv=3)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="multiple"):
        attn_ops.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_five_dimensional_inputs_raise_value_error():
    q, k, v = (t[None] for t in _qkv())
    with pytest.raises(ValueError, match="4-D"):
        attn_ops.scaled_dot_product_attention(q, k, v)


def test_mask_with_more_dimensions_than_query_raises():
    q, k, v = (t[0] for t in _qkv())
    with pytest.raises(ValueError, match="attn_mask"):
        attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 4, 7, 9, dtype=torch.bool))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["gqa_key_padding", "causal", "float_mask_3d"])
def test_kernel_path_matches_sdpa(case, device):
    # Tiny shapes: the Triton interpreter runs each program block step in Python.
    q, k, v = _qkv(batch=1, heads_q=2, heads_kv=1 if case == "gqa_key_padding" else 2, len_q=5, len_k=6, dim=8)
    kwargs = {}
    if case == "gqa_key_padding":
        kwargs = dict(attn_mask=torch.tensor([True] * 4 + [False] * 2).view(1, 1, 1, 6), enable_gqa=True)
    elif case == "causal":
        kwargs = dict(is_causal=True)
    else:
        q, k, v = q[0], k[0], v[0]
        kwargs = dict(attn_mask=torch.randn(2, 5, 6))
    q, k, v = (t.to(device) for t in (q, k, v))
    kwargs = {key: x.to(device) if isinstance(x, torch.Tensor) else x for key, x in kwargs.items()}
    with attn_ops.use_backend("triton"):
        ours = attn_ops.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **kwargs), **TOL)


@pytest.mark.parametrize("variant", ["causal_upper_left", "causal_lower_right"])
@pytest.mark.parametrize("len_q, len_k", [(5, 9), (9, 5), (7, 7)])
def test_causal_bias_is_read_as_the_causal_rule_it_stands_for(variant, len_q, len_k):
    q, k, v = _qkv(len_q=len_q, len_k=len_k, requires_grad=True)
    bias = getattr(torch.nn.attention.bias, variant)(len_q, len_k)
    ours = attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert type(ours) is torch.Tensor  # a plain result, not a CausalBias
    torch.testing.assert_close(ours, theirs, **TOL)
    grad = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(theirs, (q, k, v), grad)):
        torch.testing.assert_close(a, b, **TOL)


def test_causal_bias_with_is_causal_raises_like_sdpa():
    q, k, v = _qkv()
    bias = torch.nn.attention.bias.causal_upper_left(7, 9)
    with pytest.raises(ValueError, match="is_causal"):
        attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=DEVICES[0].marks), "reference"])
def test_float_mask_that_requires_grad_gets_sdpa_maths_gradient(backend):
    q, k, v = _qkv(requires_grad=True)
    bias = torch.randn(4, 7, 9, requires_grad=True)  # per head, shared by the batch
    inputs = (q, k, v, bias)
    with attn_ops.use_backend(backend):
        ours = attn_ops.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    grad = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, b, **TOL)


def test_float64_inputs_match_sdpa():
    q, k, v = (t.double() for t in _qkv())
    ours = attn_ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))
