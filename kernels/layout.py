"""Where tensors live in memory (outputs laid out like q; 16-byte alignment): torch only, so the
reference and the call descriptions use it without loading Triton."""

import torch


def on_16_bytes(*tensors):
    """Whether every one of `tensors` starts on a 16-byte boundary, as TMA descriptors need: the one
    alignment test of the call descriptions' keys, the launch plans' keys and `tma_allowed`."""
    return not sum([t.data_ptr() % 16 for t in tensors])


def memory_order(t):
    """t's dimensions, outermost in memory first."""
    return sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)


def empty_like_q(q, last_dim, dtype=None):
    """An empty [B, Hq, Lq, last_dim] tensor whose dimensions are ordered in memory as q's are (a
    [B, L, H, D] view in gives a [B, L, H, Dv] view out); q's dtype unless `dtype` is given."""
    if q.is_contiguous():  # the common case, without sorting strides
        if last_dim == q.shape[-1]:
            return torch.empty_like(q, dtype=dtype)  # the cheapest allocation torch has
        return q.new_empty((*q.shape[:3], last_dim), dtype=dtype)
    shape = (*q.shape[:3], last_dim)
    order = memory_order(q)
    return q.new_empty([shape[d] for d in order], dtype=dtype).permute([order.index(d) for d in range(4)])
