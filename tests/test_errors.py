"""Every bad input raises ValueError / TypeError naming the argument; nothing is silently fixed up.
What the kernels cannot run is refused by dispatch, naming the reason and the way out."""

import contextlib
import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F

import attn_ops
from attn_ops import dispatch
from attn_ops.kernels import config
from attn_ops.problem import describe
from truth import DEVICES



def qkv(b=2, hq=4, hkv=2, lq=8, lk=10, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, lq, d, dtype=dtype), torch.randn(b, hkv, lk, d, dtype=dtype),
            torch.randn(b, hkv, lk, d, dtype=dtype))


def replace(i, tensor):
    t = list(qkv())
    t[i] = tensor
    return t


BAD_QKV = {
    "q_not_a_tensor": (TypeError, "q must be a torch.Tensor", replace(0, [[1.0]])),
    "q_rank_3": (ValueError, "q must be 4-D", replace(0, torch.randn(2, 8, 16))),
    "k_rank_5": (ValueError, "k must be 4-D", replace(1, torch.randn(2, 2, 10, 16, 1))),
    "int_q": (TypeError, "q has dtype torch.int32", replace(0, torch.ones(2, 4, 8, 16, dtype=torch.int32))),
    "int_v": (TypeError, "v has dtype torch.int64", replace(2, torch.ones(2, 2, 10, 16, dtype=torch.long))),
    "dtype_mix": (TypeError, "share one dtype", replace(1, torch.randn(2, 2, 10, 16, dtype=torch.float16))),
    "batch_mismatch": (ValueError, "batch sizes differ", replace(1, torch.randn(3, 2, 10, 16))),
    "heads_not_multiple": (ValueError, "multiple of k/v heads", replace(0, torch.randn(2, 3, 8, 16))),
    "kv_heads_differ": (ValueError, "k and v must have the same number of heads", replace(2, torch.randn(2, 1, 10, 16))),
    "kv_lengths_differ": (ValueError, "k and v must have the same length", replace(2, torch.randn(2, 2, 11, 16))),
    "qk_head_dim_differ": (ValueError, "k's head dim must equal q's", replace(1, torch.randn(2, 2, 10, 8))),
    "head_dim_zero": (ValueError, "head dims must be at least 1", [torch.randn(1, 1, 4, 0)] * 3),
    "no_query_heads": (ValueError, r"q heads \(0\) must be a multiple", replace(0, torch.randn(2, 0, 8, 16))),
    "sparse_q": (TypeError, "q must be a dense", replace(0, torch.randn(2, 4, 8, 16).to_sparse())),
}


@pytest.mark.parametrize("case", BAD_QKV)
def test_bad_qkv_raise_naming_the_argument(case):
    error, message, tensors = BAD_QKV[case]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        attn_ops.attention(*tensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        attn_ops.attention(q.cuda(), k, v)


BAD_KWARGS = {
    "mask_list": (TypeError, "mask must be a torch.Tensor", {"mask": [[True]]}),
    "mask_int": (TypeError, "mask has dtype torch.int64", {"mask": torch.ones(8, 10, dtype=torch.long)}),
    "mask_float16_for_fp32_q": (TypeError, "mask has dtype torch.float16", {"mask": torch.zeros(8, 10).half()}),
    "mask_wrong_len_k": (ValueError, r"mask shape \(2, 1, 1, 9\) does not broadcast", {"mask": torch.ones(2, 1, 1, 9, dtype=torch.bool)}),
    "mask_rank_5": (ValueError, "does not broadcast", {"mask": torch.ones(1, 2, 1, 1, 10, dtype=torch.bool)}),
    "causal_word": (ValueError, "causal must be False, True, 'top_left' or 'bottom_right'", {"causal": "lower"}),
    "causal_int": (ValueError, "causal must be", {"causal": 1}),
    "window_negative": (ValueError, "window must be None or", {"window": (-2, 0)}),
    "window_none_side_string": (ValueError, "window must be None or", {"window": ("left", 0)}),
    "align_word": (ValueError, "align must be None, 'top_left' or 'bottom_right'", {"align": "center"}),
    "align_contradicts_causal": (ValueError, "causal='top_left' contradicts align='bottom_right'",
                                 {"causal": "top_left", "align": "bottom_right"}),
    "window_three": (ValueError, "window must be None or", {"window": (1, 2, 3)}),
    "window_float": (ValueError, "window must be None or", {"window": (1.5, 0)}),
    "scale_tensor": (TypeError, "scale must be a float", {"scale": torch.tensor(0.5)}),
    "scale_nan": (ValueError, "scale must be finite", {"scale": float("nan")}),
    "dropout_above_one": (ValueError, r"dropout_p must be in \[0, 1\]", {"dropout_p": 1.5}),
    "dropout_negative": (ValueError, r"dropout_p must be in \[0, 1\]", {"dropout_p": -0.1}),
    "seed_negative": (ValueError, "seed must be None or an int", {"seed": -3, "dropout_p": 0.1}),
    "backend_word": (ValueError, "backend must be one of", {"backend": "cuda"}),
    "return_lse_word": (TypeError, "return_lse must be a bool", {"return_lse": "no"}),
    "softcap_zero": (ValueError, "softcap must be a finite float > 0", {"softcap": 0.0}),
    "softcap_negative": (ValueError, "softcap must be a finite float > 0", {"softcap": -30.0}),
    "softcap_inf": (ValueError, "softcap must be a finite float > 0", {"softcap": math.inf}),
    "softcap_tensor": (TypeError, "softcap must be a float > 0 or None", {"softcap": torch.tensor(30.0)}),
    "softcap_bool": (TypeError, "softcap must be a float > 0 or None", {"softcap": True}),
    "alibi_list": (TypeError, "alibi_slopes must be a torch.Tensor", {"alibi_slopes": [0.5] * 4}),
    "alibi_float16": (TypeError, "alibi_slopes has dtype torch.float16; expected torch.float32",
                      {"alibi_slopes": torch.ones(4).half()}),
    "alibi_kv_heads": (ValueError, r"alibi_slopes must be \[Hq\] = \[4\] or \[B, Hq\] = \[2, 4\], got \(2,\)",
                       {"alibi_slopes": torch.ones(2)}),
    "alibi_rank_3": (ValueError, "alibi_slopes must be", {"alibi_slopes": torch.ones(2, 4, 1)}),
    "alibi_requires_grad": (ValueError, "alibi_slopes requires grad", {"alibi_slopes": torch.ones(4, requires_grad=True)}),
    "sinks_list": (TypeError, "sinks must be a torch.Tensor", {"sinks": [0.0] * 4}),
    "sinks_int": (TypeError, "sinks has dtype torch.int64", {"sinks": torch.zeros(4, dtype=torch.long)}),
    "sinks_kv_heads": (ValueError, r"sinks must be \[Hq\] = \[4\]", {"sinks": torch.zeros(2)}),
    "sinks_per_batch": (ValueError, r"sinks must be \[Hq\] = \[4\]", {"sinks": torch.zeros(2, 4)}),
}


@pytest.mark.parametrize("case", BAD_KWARGS)
def test_bad_keyword_arguments_raise_naming_the_argument(case):
    error, message, kwargs = BAD_KWARGS[case]
    with pytest.raises(error, match=message):
        attn_ops.attention(*qkv(), **kwargs)


def packed(lengths=(3, 5), hq=4, hkv=2, d=16):
    """Packed q, k, v for `lengths` (the same for queries and keys) and their int32 cu_seqlens."""
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [torch.randn(total, hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d), cu, cu.clone()]


def packed_with(i, value):
    args = packed()
    args[i] = value
    return args


BAD_VARLEN = {
    "q_rank_4": (ValueError, r"q must be 3-D \[total, H, D\]", packed_with(0, torch.randn(1, 8, 4, 16)), {}),
    "v_length": (ValueError, "k and v must have the same length", packed_with(2, torch.randn(7, 2, 16)), {}),
    "cu_int64": (TypeError, r"cu_seqlens_q has dtype torch.int64; expected torch.int32 \(torch.cumsum gives int64",
                 packed_with(3, torch.tensor([0, 3, 8])), {}),
    "cu_list": (TypeError, "cu_seqlens_k must be a torch.Tensor", packed_with(4, [0, 3, 8]), {}),
    "cu_rank_2": (ValueError, r"cu_seqlens_q must be 1-D \[B \+ 1\]",
                  packed_with(3, torch.tensor([[0, 3, 8]], dtype=torch.int32)), {}),
    "cu_not_from_0": (ValueError, "cu_seqlens_q must start at 0, got 1",
                      packed_with(3, torch.tensor([1, 3, 8], dtype=torch.int32)), {}),
    "cu_decreasing": (ValueError, r"cu_seqlens_k must be non-decreasing, but entry 2 \(8\) < entry 1 \(9\)",
                      packed_with(4, torch.tensor([0, 9, 8], dtype=torch.int32)), {}),
    "cu_short_total": (ValueError, r"cu_seqlens_q must end at the number of packed rows of q \(8\), got 7",
                       packed_with(3, torch.tensor([0, 3, 7], dtype=torch.int32)), {}),
    "cu_sequence_counts_differ": (ValueError, "cu_seqlens_q and cu_seqlens_k must describe the same number of "
                                  "sequences, got 2 and 3", packed_with(4, torch.tensor([0, 3, 5, 8], dtype=torch.int32)),
                                  {}),
    "max_seqlen_too_small": (ValueError, "max_seqlen_k=4, but cu_seqlens_k has a sequence of 5 rows", packed(),
                             {"max_seqlen_k": 4}),
    "max_seqlen_float": (ValueError, "max_seqlen_q must be None or an int >= 0", packed(), {"max_seqlen_q": 5.0}),
    "alibi_per_token": (ValueError, r"alibi_slopes must be \[Hq\] = \[4\] or \[B, Hq\] = \[2, 4\]", packed(),
                        {"alibi_slopes": torch.ones(8, 4)}),
    "window_word": (ValueError, "window must be None or", packed(), {"window": "local"}),
}


# Errors in the values of index tensors: raised under attn_ops.checked_values(), where they are read.
VALUE_CASES = {"cu_not_from_0", "cu_decreasing", "cu_short_total", "max_seqlen_too_small", "seqlens_past_capacity",
               "paged_past_capacity", "table_block_out_of_pool"}


def checks_for(case):
    return attn_ops.checked_values() if case in VALUE_CASES else contextlib.nullcontext()


@pytest.mark.parametrize("case", BAD_VARLEN)
def test_bad_varlen_inputs_raise_naming_the_argument(case):
    error, message, args, kwargs = BAD_VARLEN[case]
    with checks_for(case), pytest.raises(error, match=message):
        attn_ops.varlen_attention(*args, **kwargs)


def cache_call(**changes):
    """The arguments of a valid attention_with_kvcache call (paged with `table=True`), with `changes`."""
    paged = changes.pop("table", False)
    args = dict(q=torch.randn(2, 4, 1, 16), k_cache=torch.randn(2, 2, 32, 16), v_cache=torch.randn(2, 2, 32, 16),
                cache_seqlens=torch.tensor([3, 30], dtype=torch.int32))
    if paged:  # two sequences of up to 2 blocks of 16 in a pool of 5
        args.update(k_cache=torch.randn(5, 2, 16, 16), v_cache=torch.randn(5, 2, 16, 16),
                    block_table=torch.tensor([[4, 0], [1, 2]], dtype=torch.int32))
    return {**args, **changes}


NEW = dict(k_new=torch.randn(2, 2, 3, 16), v_new=torch.randn(2, 2, 3, 16))
BAD_KVCACHE = {
    "q_rank_3": (ValueError, "q must be 4-D", cache_call(q=torch.randn(2, 4, 16))),
    "cache_dtype": (TypeError, "q, k_cache, v_cache must share one dtype",
                    cache_call(k_cache=torch.randn(2, 2, 32, 16, dtype=torch.float16))),
    "cache_batch": (ValueError, "batch sizes differ", cache_call(k_cache=torch.randn(3, 2, 32, 16))),
    "pool_blocks_differ": (ValueError, "k_cache and v_cache must have the same number of blocks",
                           cache_call(table=True, v_cache=torch.randn(4, 2, 16, 16))),
    "seqlens_int64": (TypeError, r"cache_seqlens has dtype torch.int64; expected torch.int32 \(pass .int\(\)\)",
                      cache_call(cache_seqlens=torch.tensor([3, 30]))),
    "seqlens_shape": (ValueError, r"cache_seqlens must be \[B\] = \[2\] \(or an int\)",
                      cache_call(cache_seqlens=torch.tensor([3], dtype=torch.int32))),
    "seqlens_negative_int": (ValueError, "cache_seqlens must be an int32 tensor \\[B\\] or an int >= 0",
                             cache_call(cache_seqlens=-1)),
    "seqlens_past_capacity": (ValueError, r"cache_seqlens\[1\] = 30: with 3 new tokens it must lie in \[0, 29\]",
                              cache_call(**NEW)),
    "int_seqlens_past_capacity": (ValueError, "cache_seqlens = 33 plus 0 new tokens exceeds the cache's capacity of 32",
                                  cache_call(cache_seqlens=33)),
    "paged_past_capacity": (ValueError, r"cache_seqlens\[1\] = 33: .* capacity of 32 \(block_table \(2, 2\) of blocks",
                            cache_call(table=True, cache_seqlens=torch.tensor([3, 33], dtype=torch.int32))),
    "table_int64": (TypeError, "block_table has dtype torch.int64",
                    cache_call(table=True, block_table=torch.zeros(2, 2, dtype=torch.long))),
    "table_shape": (ValueError, r"block_table must be \[B, max_blocks\] = \[2, max_blocks\]",
                    cache_call(table=True, block_table=torch.zeros(2, dtype=torch.int32))),
    "table_block_out_of_pool": (ValueError, r"block_table\[1\] names a block outside the pool of 5 blocks",
                                cache_call(table=True, block_table=torch.tensor([[4, 0], [1, 5]], dtype=torch.int32))),
    "k_new_alone": (ValueError, "k_new and v_new go together: got only k_new", cache_call(k_new=NEW["k_new"])),
    "k_new_heads": (ValueError, r"k_new must be \[B, Hkv, L_new, D\] = \[2, 2, 3, 16\]",
                    cache_call(k_new=torch.randn(2, 4, 3, 16), v_new=NEW["v_new"])),
    "v_new_length": (ValueError, r"v_new must be \[B, Hkv, L_new, D\] = \[2, 2, 3, 16\]",
                     cache_call(k_new=NEW["k_new"], v_new=torch.randn(2, 2, 2, 16))),
    "k_new_dtype": (TypeError, "k_new has dtype torch.float16; expected torch.float32 \\(the cache's",
                    cache_call(k_new=NEW["k_new"].half(), v_new=NEW["v_new"])),
    "causal_top_left": (ValueError, "causal must be False, True or 'bottom_right'", cache_call(causal="top_left")),
    "num_splits_zero": (ValueError, "num_splits must be None .* or an int >= 1, got 0", cache_call(num_splits=0)),
    "num_splits_float": (ValueError, "num_splits must be None .* or an int >= 1, got 2.0", cache_call(num_splits=2.0)),
    "q_requires_grad": (ValueError, "q requires grad, but attention_with_kvcache is inference only",
                        cache_call(q=torch.randn(2, 4, 1, 16, requires_grad=True))),
    "sinks_require_grad": (ValueError, "sinks requires grad, but attention_with_kvcache is inference only",
                           cache_call(sinks=torch.zeros(4, requires_grad=True))),
    "alibi_shape": (ValueError, r"alibi_slopes must be \[Hq\] = \[4\] or \[B, Hq\] = \[2, 4\]",
                    cache_call(alibi_slopes=torch.ones(2))),
}


@pytest.mark.parametrize("case", BAD_KVCACHE)
def test_bad_kvcache_inputs_raise_naming_the_argument(case):
    error, message, kwargs = BAD_KVCACHE[case]
    kwargs = dict(kwargs)
    with checks_for(case), pytest.raises(error, match=message):
        attn_ops.attention_with_kvcache(kwargs.pop("q"), kwargs.pop("k_cache"), kwargs.pop("v_cache"),
                                        kwargs.pop("cache_seqlens"), **kwargs)


def test_kvcache_takes_parameters_that_require_grad_under_no_grad():
    """Generation runs under torch.no_grad with parameters (the sinks, say) that require grad."""
    with torch.no_grad():
        attn_ops.attention_with_kvcache(**cache_call(sinks=torch.zeros(4, requires_grad=True)))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=DEVICES[0].marks), "reference"])
@pytest.mark.parametrize("mask_shape", [(10,), (8, 10), (4, 8, 10), (2, 1, 1, 10), (1, 4, 1, 10), (2, 4, 8, 10)])
def test_every_broadcastable_mask_shape_is_accepted(mask_shape, backend):
    q, k, v = qkv()
    mask = torch.rand(mask_shape) > 0.2
    expected = attn_ops.reference.attention(q, k, v, mask=mask.expand(2, 4, 8, 10).clone())
    torch.testing.assert_close(attn_ops.attention(q, k, v, mask=mask, backend=backend), expected)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="use_backend's name must be one of"):
        with attn_ops.use_backend("fast"):
            pass


def test_mask_dtype_error_lists_each_allowed_dtype_once():
    with pytest.raises(TypeError) as caught:
        attn_ops.attention(*qkv(), mask=torch.zeros(8, 10, dtype=torch.float16))
    assert str(caught.value).count("torch.float32") == 1  # q's dtype is float32 too: said once


def on_cuda(**kwargs):
    """The Problem of a CUDA call, built on CPU tensors: dispatch reads only the description."""
    problem = describe(*kwargs.pop("tensors", qkv()), **kwargs)
    return dataclasses.replace(problem, device=torch.device("cuda", 0))


@pytest.mark.parametrize("case", ["head_dim_600", "v_head_dim_600"])
def test_auto_on_cuda_refuses_what_the_kernels_cannot_run_naming_the_reference(case):
    if case == "head_dim_600":
        problem = on_cuda(tensors=[torch.randn(1, 2, 4, 600)] * 3)
    else:
        problem = on_cuda(tensors=replace(2, torch.randn(2, 2, 10, 600)))
    with pytest.raises(ValueError, match=r"backend='auto' on CUDA.*head dim 600 > 512.*backend='reference'"):
        dispatch.choose(problem, "auto")
    assert dispatch.choose(problem, "reference") is attn_ops.reference


@pytest.mark.parametrize("gpu, refused", [((8, 9, None), True), ((8, 6, 101376), True), ((8, 0, None), False),
                                          ((9, 0, 232448), False)], ids=["sm89", "sm86", "sm80", "sm90"])
def test_float32_past_256_is_refused_where_shared_memory_is_short(gpu, refused, monkeypatch):
    """float32's backward at D = 512 takes ~132 KB of shared memory per block: more than sm_86/sm_89
    give; half precision at 512 and float32 up to 256 fit everywhere."""
    major, minor, optin = gpu
    properties = types.SimpleNamespace(major=major, minor=minor, shared_memory_per_block_optin=optin)
    monkeypatch.setattr(config, "device_properties", lambda device: properties)
    wide = on_cuda(tensors=[torch.randn(1, 2, 4, 512)] * 3)
    if refused:
        with pytest.raises(ValueError, match=r"float32 at head dim 512 needs 133120 bytes of shared memory.*"
                                             r"backend='reference'"):
            dispatch.choose(wide, "auto")
    else:
        assert dispatch.choose(wide, "auto") is not attn_ops.reference
    for tensors in ([torch.randn(1, 2, 4, 512, dtype=torch.bfloat16)] * 3, [torch.randn(1, 2, 4, 256)] * 3):
        assert dispatch.choose(on_cuda(tensors=tensors), "auto") is not attn_ops.reference


def test_float64_runs_on_the_reference_under_auto_even_on_cuda():
    assert dispatch.choose(on_cuda(tensors=[t.double() for t in qkv()]), "auto") is attn_ops.reference


@pytest.mark.parametrize("kwargs", [{}, {"backend": "reference"}], ids=["auto", "reference"])
def test_float64_and_head_dims_past_512_run_on_the_reference(kwargs):
    q, k, v = (torch.randn(1, 2, 6, 600, dtype=torch.float64) for _ in range(3))
    out = attn_ops.attention(q, k, v, causal=True, **kwargs)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(600)).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)


def test_value_head_dim_may_differ_on_the_reference():
    q, k, _ = qkv(hkv=4)
    v = torch.randn(2, 4, 10, 24)
    out = attn_ops.attention(q, k, v, causal="bottom_right")
    assert out.shape == (2, 4, 8, 24)
    lower_right = torch.nn.attention.bias.causal_lower_right(8, 10)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right))


@pytest.mark.parametrize("case", ["float64", "head_dim_600"])
def test_triton_backend_refuses_what_the_kernels_cannot_run(case):
    tensors = [t.double() for t in qkv()] if case == "float64" else [torch.randn(1, 1, 4, 600)] * 3
    reason = "dtype torch.float64" if case == "float64" else "head dim 600"
    with pytest.raises(ValueError, match=rf"backend='triton'.*{reason}.*backend='reference'"):
        attn_ops.attention(*tensors, backend="triton")


def test_float_mask_gradient_on_the_reference_matches_sdpa_math():
    q, k, v = qkv(hkv=4)
    bias = torch.randn(1, 4, 8, 10, requires_grad=True)  # shared by the batch: its gradient sums over it
    ours = torch.autograd.grad(attn_ops.attention(q, k, v, mask=bias).square().sum(), bias)[0]
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).square().sum(), bias)[0]
    assert ours.shape == bias.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


DROP_IN_ERRORS = {
    "sdpa_int_mask": (TypeError, "^attn_mask has dtype torch.int32",
                      lambda: attn_ops.scaled_dot_product_attention(
                          *qkv(hkv=4), attn_mask=torch.ones(8, 10, dtype=torch.int32))),
    "sdpa_dtype_mix": (TypeError, "^query, key, value must share one dtype",
                       lambda: attn_ops.scaled_dot_product_attention(*replace(1, torch.randn(2, 4, 10, 16).half()))),
    "sdpa_causal_bias_lengths": (ValueError, "^attn_mask is a CausalBias for",
                                 lambda: attn_ops.scaled_dot_product_attention(
                                     *qkv(hkv=4), attn_mask=torch.nn.attention.bias.causal_lower_right(7, 10))),
    "mha_key_padding_dtype": (TypeError, "^key_padding_mask has dtype torch.float16",
                              lambda: attn_ops.MultiheadAttention(16, 2)(
                                  *[torch.randn(5, 2, 16)] * 3, key_padding_mask=torch.zeros(2, 5).half())),
    "mha_int_attn_mask": (TypeError, "^attn_mask must be bool or floating point",
                          lambda: attn_ops.MultiheadAttention(16, 2)(
                              *[torch.randn(5, 2, 16)] * 3, attn_mask=torch.zeros(5, 5, dtype=torch.int64))),
}


@pytest.mark.parametrize("case", DROP_IN_ERRORS)
def test_drop_in_errors_name_the_callers_arguments(case):
    error, message, call = DROP_IN_ERRORS[case]
    with pytest.raises(error, match=message):
        call()
