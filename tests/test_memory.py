"""The fused path never materialises an [Lq, Lk] tensor; the reference holds one chunk at a time."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attn_ops
from attn_ops import reference
from truth import DEVICES


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op creates while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def saved_numels(fn):
    numels = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: numels.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, numels


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_allocates_and_saves_nothing_of_size_lq_by_lk(device):
    b, h, l, d = 1, 2, 256, 16
    q, k, v = (torch.randn(b, h, l, d, device=device, requires_grad=True) for _ in range(3))
    mask = torch.rand(b, 1, 1, l, device=device) > 0.2  # broadcast, so it must not be expanded either
    with LargestTensor() as largest:
        out, numels = saved_numels(lambda: attn_ops.attention(q, k, v, mask=mask, causal=True, backend="triton",
                                                              dropout_p=0.1, seed=0))
        out.backward(torch.randn_like(out))
    assert max(numels) <= q.numel()  # q, k, v, out, lse, mask, seed
    assert largest.numel <= q.numel() < b * h * l * l


def test_reference_holds_one_chunk_of_scores_at_a_time(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2**12)
    b, h, l, d = 1, 2, 256, 16
    q, k, v = (torch.randn(b, h, l, d, requires_grad=True) for _ in range(3))
    full = b * h * l * l
    with LargestTensor() as largest:
        out = reference.attention(q, k, v, causal=True)
        out.backward(torch.randn_like(out))
    assert largest.numel <= max(2**12, q.numel()) < full
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
