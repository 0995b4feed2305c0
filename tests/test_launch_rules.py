"""What the launchers decide around the kernels: the dtype and layouts that take TMA descriptors, the
upstream gradient's layout, torch's TF32 switch, and the device a launch runs on."""

import pytest
import torch

import attn_ops
from attn_ops.kernels import attn_bwd as bwd_module
from attn_ops.kernels import attn_fwd as fwd_module
from attn_ops.kernels.attn_launch import descriptor_layouts, descriptors, tma_allowed, uses_tma
from attn_ops.kernels.precision import tf32_allowed
from attn_ops.kernels.config import INTERPRETED
from truth import make_qkv

interpreted = pytest.mark.skipif(not INTERPRETED, reason="the interpreter runs descriptors on CPU tensors")


@pytest.fixture
def tma_launches(monkeypatch):
    """For every launch of the forward and backward: whether its tensors go through descriptors."""
    seen = []

    def spy(layouts, *tensors):
        seen.append(all(fields is not None for fields in layouts))
        return descriptors(layouts, *tensors)

    monkeypatch.setattr(fwd_module, "descriptors", spy)
    monkeypatch.setattr(bwd_module, "descriptors", spy)
    return seen


@interpreted
def test_float32_takes_the_pointer_path(tma_launches):
    # Through descriptors float32's tiles spill up to 3.7 KB per thread on sm_90; pointers none.
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, torch.float32, "cpu")
    assert tma_allowed(q, k, v) and not uses_tma("fwd", 16, q, k, v)
    attn_ops.attention(q, k, v, backend="triton").sum().backward()
    assert tma_launches and not any(tma_launches)


@interpreted
def test_a_stride_0_upstream_gradient_keeps_the_backward_on_descriptors(tma_launches):
    # out.sum().backward() sends an expanded gradient of stride 0, which the copy engine cannot read.
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, torch.bfloat16, "cpu")
    out = attn_ops.attention(q, k, v, backend="triton")
    dout = torch.ones((), dtype=out.dtype).expand(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    assert tma_launches and all(tma_launches)  # the forward, dK/dV and dQ all read through descriptors
    expected = torch.autograd.grad(out, (q, k, v), dout.contiguous())
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


@interpreted
def test_a_contiguous_upstream_gradient_off_a_16_byte_boundary_is_copied(tma_launches):
    # torch.cat([x, out.flatten()]).backward(g) hands the op a contiguous slice 2 bytes in: a copy,
    # not .contiguous() (which returns the same misaligned tensor), keeps the descriptors valid.
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, torch.bfloat16, "cpu")
    out = attn_ops.attention(q, k, v, backend="triton")
    storage = torch.randn(out.numel() + 1, dtype=out.dtype)
    dout = storage[1:].view(out.shape)
    assert dout.is_contiguous() and dout.data_ptr() % 16
    grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    assert tma_launches and all(tma_launches)
    for g, e in zip(grads, torch.autograd.grad(out, (q, k, v), dout.clone())):
        assert torch.equal(g, e)


@interpreted
@pytest.mark.parametrize("head_dim", [12, 20, 36])
def test_a_single_row_whose_size_is_no_multiple_of_16_bytes_builds_descriptors(head_dim):
    # [1, 1, 1, D]: every dimension but the last has size 1, so their strides are free; the copy
    # engine still wants multiples of 16 bytes there, and D * 2 bytes is not one.
    q, k, v = make_qkv(1, 1, 1, 1, 1, head_dim, torch.bfloat16, "cpu")
    assert tma_allowed(q, k, v)
    descriptors(descriptor_layouts(True, (q, 16), (k, 16), (v, 16)), q, k, v)
    out = attn_ops.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, v.detach())  # one key: its value


def test_tf32_follows_torchs_new_precision_switch():
    # torch >= 2.9: once the new API is used, reading the legacy allow_tf32 raises.
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has only allow_tf32")
    before = matmul.fp32_precision
    try:
        for precision, expected in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = precision
            assert tf32_allowed() is expected
    finally:
        matmul.fp32_precision = before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_run_on_the_inputs_device_not_the_current_one():
    pytest.importorskip("triton")
    q, k, v = make_qkv(1, 2, 2, 64, 64, 32, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        out = attn_ops.attention(q, k, v)
        out.float().sum().backward()
    torch.testing.assert_close(out, attn_ops.attention(q, k, v, backend="reference").to(out.dtype), atol=2e-2, rtol=0)
