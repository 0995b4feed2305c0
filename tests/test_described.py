"""A call's checks and plans are reused by later calls with the same static parts (`problem.describe`):
never for a call the checks would refuse, never holding a call's tensors, and never where a tracer
or a dispatch mode must see the custom ops."""

import gc
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attn_ops
from attn_ops import problem as problem_module
from truth import DEVICES, make_qkv


@pytest.mark.parametrize("window", [(True, 2), (1.0, 2), (1, 2.0)], ids=str)
def test_a_window_of_other_types_is_refused_after_a_valid_one(window):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    attn_ops.attention(q, k, v, window=(1, 2))  # checked and kept
    with pytest.raises(ValueError, match="window must be None or"):
        attn_ops.attention(q, k, v, window=window)  # equal as a key, but not to the checks


def test_no_tensor_of_a_call_is_kept_alive():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    mask, sinks = torch.rand(8, 8) > 0.3, torch.zeros(2)
    alive = [weakref.ref(t) for t in (mask, sinks)]
    attn_ops.attention(q, k, v, mask=mask, sinks=sinks, dropout_p=0.1)
    del mask, sinks
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_calls_without_tensors_of_their_own_share_one_problem():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, "cpu")
    mask = torch.rand(8, 8) > 0.3
    plain = [problem_module.describe(q, k, v, causal=True) for _ in range(3)]
    masked = [problem_module.describe(q, k, v, mask=mask) for _ in range(3)]
    assert plain[1] is plain[2] and plain[1].plans is plain[0].plans
    assert masked[1] is not masked[2] and all(p.mask is mask for p in masked)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_each_call_runs_with_its_own_tensors(backend):
    # Calls that share their static parts (and plans) but not their masks, slopes, sinks or lengths.
    q, k, v = make_qkv(2, 2, 2, 8, 8, 16, torch.float32, "cpu")
    for _ in range(2):
        mask, slopes, sinks = torch.rand(8, 8) > 0.3, torch.rand(2), torch.randn(2)
        out = attn_ops.attention(q, k, v, mask=mask, alibi_slopes=slopes, sinks=sinks, backend=backend)
        expected = attn_ops.attention(q, k, v, mask=mask, alibi_slopes=slopes, sinks=sinks, backend="reference")
        torch.testing.assert_close(out, expected)
    k_cache, v_cache = torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    for lengths in ([3, 9], [12, 1]):
        key_mask = torch.rand(2, 16) > 0.2
        out = attn_ops.attention_with_kvcache(q[:, :, :1].detach(), k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32),
                                              key_mask=key_mask, backend=backend)
        expected = attn_ops.attention_with_kvcache(q[:, :, :1].detach(), k_cache, v_cache,
                                                   torch.tensor(lengths, dtype=torch.int32), key_mask=key_mask,
                                                   backend="reference")
        torch.testing.assert_close(out, expected)
    packed = [t.detach()[0].transpose(0, 1).requires_grad_() for t in (q, k, v)]  # [8, H, D]: 8 packed rows
    for cuts in ([0, 3, 8], [0, 6, 8]):  # the same shapes, other sequences
        cu_seqlens = torch.tensor(cuts, dtype=torch.int32)
        results = [attn_ops.varlen_attention(*packed, cu_seqlens, cu_seqlens, causal=True, backend=name)
                   for name in (backend, "reference")]
        for out, expected in zip(*(( r, *torch.autograd.grad(r.sum(), packed)) for r in results)):
            torch.testing.assert_close(out, expected)


def test_repeated_multihead_attention_calls_share_one_description():
    module = attn_ops.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    module(x, x, x, key_padding_mask=padding)
    entries = len(problem_module._DESCRIBED)
    for _ in range(3):
        module(x, x, x, key_padding_mask=padding)
    assert len(problem_module._DESCRIBED) == entries


@pytest.mark.parametrize("device", DEVICES)
def test_under_fake_tensors_the_custom_ops_run(device):
    # A dispatch mode (FakeTensorMode, make_fx) must see the custom ops and their fakes, never the
    # launchers, which would read real memory.
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 2, 64, 16, device=device) for _ in range(3))
        out = attn_ops.attention(q, k, v, causal=True, backend="triton")
    assert out.shape == (1, 2, 64, 16)
