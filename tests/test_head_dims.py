"""Head dims up to 512 in the kernels (API.md; Gemma 4's global layers): every path against float64
math (the 2x rule) at D and Dv of 320 to 512, mixed; above 512 the reference only."""

import pytest
import torch

import attn_ops
from test_kvcache import check_each_sequence, make_cache, paged
from test_varlen import check_each_sequence as check_each_packed_sequence
from test_varlen import pack
from truth import DEVICES, check_against_float64, check_lse_against_float64, make_qkv

# D, Dv: equal, and K's wider or narrower than V's, padded to 512 (320, 384, 448, 500) or not.
DIMS = [(512, 512), (320, 512), (384, 256), (448, 128), (500, 512), (512, 128)]
RULES = {
    "causal_top_left": {"causal": True},
    "causal_bottom_right": {"causal": "bottom_right"},
    "window": {"window": (12, 3), "align": "bottom_right"},
    "softcap_sinks": {"softcap": 4.0, "sinks": "sinks"},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
def test_large_head_dims_with_gqa_match_float64(device, dims):
    q, k, v = make_qkv(2, 4, 2, 40, 56, dims[0], torch.float32, device, head_dim_v=dims[1])
    out, lse = attn_ops.attention(q, k, v, causal="bottom_right", return_lse=True, backend="triton")
    assert out.shape == (2, 4, 40, dims[1])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    check_against_float64(q, k, v, out, grads, dout, causal="bottom_right")
    for b in range(2):
        check_lse_against_float64(q[b:b + 1], k[b:b + 1], v[b:b + 1], lse[b], causal="bottom_right")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_at_512(device, rule):
    q, k, v = make_qkv(1, 2, 1, 48, 40, 512, torch.float32, device)
    rules = dict(RULES[rule])
    if rules.get("sinks") == "sinks":
        rules["sinks"] = torch.randn(2, device=device, requires_grad=True)
    out = attn_ops.attention(q, k, v, backend="triton", **rules)
    dout = torch.randn_like(out)
    learned = [rules["sinks"]] if "sinks" in rules else []
    grads = torch.autograd.grad(out, (q, k, v, *learned), dout)
    check_against_float64(q, k, v, out, grads, dout, **rules)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_key_padding_and_rows_that_see_nothing_at_512(device, dtype):
    q, k, v = make_qkv(2, 2, 2, 33, 45, 512, dtype, device)
    keys = torch.rand(2, 1, 1, 45, device=device) > 0.3
    keys[1] = False  # batch 1 sees no key: zeros and zero gradients, never NaN
    out = attn_ops.attention(q, k, v, mask=keys, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.all(out[1] == 0) and all(torch.isfinite(g).all() for g in grads)
    check_against_float64(q, k, v, out, grads, dout, mask=keys)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_at_512_keeps_the_pattern_of_any_head_dim(device):
    """With q = 0 every probability is 1/Lk, and with V's first Lk columns the identity the output
    is the kept, rescaled pattern: at D = Dv = 512 the same as at D = Dv = Lk (keyed by coordinates)."""
    len_q, len_k, p = 40, 48, 0.25
    patterns = []
    for dim in (len_k, 512):
        q = torch.zeros(1, 2, len_q, dim, device=device)
        k = torch.randn(1, 2, len_k, dim, device=device)
        v = torch.eye(len_k, dim, device=device).expand(1, 2, len_k, dim)
        out = attn_ops.attention(q, k, v, dropout_p=p, seed=7, backend="triton")
        patterns.append((out[..., :len_k] * len_k * (1 - p)).round())
    assert torch.equal(patterns[0], patterns[1]) and 0 < patterns[1].mean() < 1


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_at_512(device):
    (q, k, v), cu_q, cu_k = pack((5, 0, 30), (9, 4, 30), 2, 1, 512, torch.float32, device, head_dim_v=384)
    out, lse = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, causal="bottom_right", return_lse=True,
                                         backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    check_each_packed_sequence(q, k, v, cu_q, cu_k, out, lse, grads, dout, causal="bottom_right")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decoding_at_512(device, layout, num_splits):
    lengths = (0, 17, 100)
    k_cache, v_cache = make_cache(lengths, 128, 2, 512, torch.float32, device)
    q = torch.randn(len(lengths), 8, 1, 512, device=device)
    k_in, v_in, table = paged(k_cache, v_cache, 16) if layout == "paged" else (k_cache, v_cache, None)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out, lse = attn_ops.attention_with_kvcache(q, k_in, v_in, seqlens, block_table=table, num_splits=num_splits,
                                               return_lse=True, backend="triton")
    check_each_sequence(q, k_cache, v_cache, lengths, out, lse)


@pytest.mark.parametrize("dims", [(513, 513), (576, 576), (512, 576)], ids=lambda d: f"{d[0]}x{d[1]}")
def test_past_512_the_kernels_refuse_naming_the_reference_which_computes_it(dims):
    q, k, v = make_qkv(1, 2, 2, 6, 7, dims[0], torch.float32, "cpu", head_dim_v=dims[1])
    with pytest.raises(ValueError, match=rf"backend='triton'.*head dim {max(dims)} > 512.*backend='reference'"):
        attn_ops.attention(q, k, v, backend="triton")
    out = attn_ops.attention(q, k, v, causal=True, backend="reference")
    check_against_float64(q, k, v, out, causal=True)
