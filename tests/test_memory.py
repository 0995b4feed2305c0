"""The fused path never allocates an [Lq, Lk] tensor; the reference holds one chunk at a time.

Allocations are read from torch's profiler, which records the bytes of every storage an aten op
allocates, inside the custom ops and their launchers too (a dispatch mode would not see inside a
custom op). Storage bytes, not element counts: the stride-0 view of a [B, 1, 1, Lk] mask has
B * Hq * Lq * Lk elements but allocates nothing.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import attn_ops
from attn_ops import reference
from truth import DEVICES


def largest_allocation(fn):
    """The most bytes one aten op allocated (CPU or GPU) while `fn` ran."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    return max(max(e.self_cpu_memory_usage, e.self_device_memory_usage) for e in prof.events())


def fused_forward_backward(length, device):
    b, h, d = 1, 2, 16
    q, k, v = (torch.randn(b, h, length, d, device=device, requires_grad=True) for _ in range(3))
    mask = torch.rand(b, 1, 1, length, device=device) > 0.2  # broadcast: it must not be expanded either

    def step():
        out = attn_ops.attention(q, k, v, mask=mask, causal=True, backend="triton", dropout_p=0.1, seed=0)
        out.backward(torch.randn_like(out))

    step()  # compile (or warm the interpreter) outside the measurement
    return step, q


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_allocates_nothing_of_size_lq_by_lk(device):
    step, q = fused_forward_backward(256, device)
    q_bytes = q.numel() * q.element_size()
    # q, k, v, out, their gradients and [B, H, L] row statistics: nothing larger than q.
    assert largest_allocation(step) <= q_bytes < 256 * 256 * 2 * 4


@pytest.mark.parametrize("device", DEVICES)
def test_fused_allocations_grow_linearly_with_length(device):
    sizes = [largest_allocation(fused_forward_backward(length, device)[0]) for length in (128, 256)]
    assert sizes[1] == 2 * sizes[0]  # [L, D] tensors; an [L, L] one would quadruple


@pytest.mark.parametrize("device", DEVICES)
def test_saved_tensors_are_q_k_v_out_and_row_statistics(device):
    q, k, v = (torch.randn(1, 2, 64, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 1, 1, 64, device=device) > 0.2
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn_ops.attention(q, k, v, mask=mask, backend="triton", dropout_p=0.1, seed=0)
    # q, k, v, out, lse, the caller's mask (as given, not expanded) and the one-element seed.
    assert sorted(t.numel() for t in saved) == sorted([q.numel()] * 4 + [2 * 64, mask.numel(), 1])


def test_reference_holds_one_chunk_of_scores_at_a_time(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2**12)
    b, h, l, d = 1, 2, 256, 16
    q, k, v = (torch.randn(b, h, l, d, requires_grad=True) for _ in range(3))

    def step():
        out = reference.attention(q, k, v, causal=True)
        out.backward(torch.randn_like(out))
        return out

    # One chunk of float32 scores (2**12 elements), never the [B, H, L, L] matrix (2**17).
    assert largest_allocation(step) <= max(2**12, q.numel()) * 4 < b * h * l * l * 4
    out = step()
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2**25)  # one chunk: the chunk seams must not show
    torch.testing.assert_close(out, reference.attention(*(t.detach() for t in (q, k, v)), causal=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_grows_linearly_with_length():
    peaks = []
    for length in (2048, 4096, 8192):
        q, k, v = (torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = attn_ops.attention(q, k, v, causal=True)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        del q, k, v, out
    # O(L): doubling the length about doubles the extra memory (an [L, L] tensor would quadruple it).
    assert peaks[1] / peaks[0] < 2.5 and peaks[2] / peaks[1] < 2.5
