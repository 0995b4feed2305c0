"""Every bad input raises ValueError / TypeError naming the argument; nothing is silently fixed up."""

import pytest
import torch

import attn_ops
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
    "float64": (TypeError, "q has dtype torch.float64", [t.double() for t in qkv()]),
    "int_v": (TypeError, "v has dtype torch.int64", replace(2, torch.ones(2, 2, 10, 16, dtype=torch.long))),
    "dtype_mix": (TypeError, "share one dtype", replace(1, torch.randn(2, 2, 10, 16, dtype=torch.float16))),
    "batch_mismatch": (ValueError, "batch sizes differ", replace(1, torch.randn(3, 2, 10, 16))),
    "heads_not_multiple": (ValueError, "multiple of k/v heads", replace(0, torch.randn(2, 3, 8, 16))),
    "kv_heads_differ": (ValueError, "k and v must have the same number of heads", replace(2, torch.randn(2, 1, 10, 16))),
    "kv_lengths_differ": (ValueError, "k and v must have the same length", replace(2, torch.randn(2, 2, 11, 16))),
    "qk_head_dim_differ": (ValueError, "k's head dim must equal q's", replace(1, torch.randn(2, 2, 10, 8))),
    "v_head_dim_differs": (ValueError, "v's head dim", replace(2, torch.randn(2, 2, 10, 8))),
    "head_dim_too_big": (ValueError, "head dim must be in [1, 256]", [torch.randn(1, 1, 4, 257)] * 3),
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
    "mask_needs_grad": (ValueError, "mask requires grad", {"mask": torch.zeros(8, 10, requires_grad=True)}),
    "causal_word": (ValueError, "causal must be False, True, 'top_left' or 'bottom_right'", {"causal": "lower"}),
    "causal_int": (ValueError, "causal must be", {"causal": 1}),
    "window_negative": (ValueError, "window must be None or", {"window": (-1, 0)}),
    "window_three": (ValueError, "window must be None or", {"window": (1, 2, 3)}),
    "window_float": (ValueError, "window must be None or", {"window": (1.5, 0)}),
    "scale_tensor": (TypeError, "scale must be a float", {"scale": torch.tensor(0.5)}),
    "scale_nan": (ValueError, "scale must be finite", {"scale": float("nan")}),
    "dropout_one": (ValueError, r"dropout_p must be in \[0, 1\)", {"dropout_p": 1.0}),
    "dropout_negative": (ValueError, r"dropout_p must be in \[0, 1\)", {"dropout_p": -0.1}),
    "seed_negative": (ValueError, "seed must be None or an int", {"seed": -3, "dropout_p": 0.1}),
    "backend_word": (ValueError, "backend must be one of", {"backend": "cuda"}),
    "return_lse_word": (TypeError, "return_lse must be a bool", {"return_lse": "no"}),
}


@pytest.mark.parametrize("case", BAD_KWARGS)
def test_bad_keyword_arguments_raise_naming_the_argument(case):
    error, message, kwargs = BAD_KWARGS[case]
    with pytest.raises(error, match=message):
        attn_ops.attention(*qkv(), **kwargs)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=DEVICES[0].marks), "reference"])
@pytest.mark.parametrize("mask_shape", [(10,), (8, 10), (4, 8, 10), (2, 1, 1, 10), (1, 4, 1, 10), (2, 4, 8, 10)])
def test_every_broadcastable_mask_shape_is_accepted(mask_shape, backend):
    q, k, v = qkv()
    mask = torch.rand(mask_shape) > 0.2
    expected = attn_ops.reference.attention(q, k, v, mask=mask.expand(2, 4, 8, 10).clone())
    torch.testing.assert_close(attn_ops.attention(q, k, v, mask=mask, backend=backend), expected)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        with attn_ops.use_backend("fast"):
            pass
