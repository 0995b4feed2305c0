"""Randomized differential test: `attn_ops.attention` through the kernels against float64 math, on
calls drawn by hypothesis (shapes, strides, dtypes, GQA, Dv != D, masks, causal / window / align,
scale, softcap, ALiBi, sinks, dropout), outputs, LSE and every gradient, by the 2x rule of
`truth.py`.

In CI the draw is fixed (derandomized) and bounded: ``ATTN_OPS_EXAMPLES`` examples (default 40, about
30 s in the interpreter on 2 cores). More on demand, e.g. ``ATTN_OPS_EXAMPLES=500 python -m pytest
tests/test_differential.py``, and ``ATTN_OPS_RANDOM=1`` draws new calls each run. A failure prints
the call it drew, shrunk to a small one.
"""

import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import attn_ops
from attn_ops import reference
from test_dropout import keep_pattern
from truth import DEVICES, DTYPES, check_against_float64, delta_slack, probabilities, reference_argument

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("ATTN_OPS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("ATTN_OPS_RANDOM"), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Call:
    """One drawn call: the shapes and layout of q, k, v, the rules and modifiers, and the seed of the
    tensors' values (so that a shrunk failure replays exactly)."""

    batch: int
    heads_kv: int
    group: int
    len_q: int
    len_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    layout: str  # "bhld" contiguous, "blhd" a transposed view, "padded" rows wider than D
    mask: Optional[tuple]  # None or (kind "bool" / "float" / "learned", the shape it is broadcast from)
    causal: object
    window: Optional[tuple]
    align: Optional[str]
    scale: Optional[float]
    softcap: Optional[float]
    alibi: Optional[str]  # None, "Hq" or "B_Hq"
    sinks: bool
    dropout_p: float
    seed: int

    @property
    def heads_q(self):
        return self.heads_kv * self.group


@st.composite
def calls(draw):
    batch, heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    len_q, len_k = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    head_dim = draw(st.sampled_from([16, 24, 32, 40, 64]))
    head_dim_v = draw(st.sampled_from([head_dim, 16, 48]))
    causal = draw(st.sampled_from([False, True, "top_left", "bottom_right"]))
    # A causal string fixes the alignment: an `align` that contradicts it is an error, not a case.
    align = draw(st.sampled_from([None, causal] if isinstance(causal, str) else [None, "top_left", "bottom_right"]))
    side = st.one_of(st.none(), st.just(-1), st.integers(0, 24))
    heads_q = heads_kv * group
    mask_shapes = [(len_q, len_k), (batch, 1, 1, len_k), (1, heads_q, len_q, len_k), (batch, heads_q, len_q, len_k),
                   (batch, 1, len_q, 1)]
    return Call(
        batch=batch, heads_kv=heads_kv, group=group, len_q=len_q, len_k=len_k, head_dim=head_dim,
        head_dim_v=head_dim_v, dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["bhld", "blhd", "padded"])),
        mask=draw(st.one_of(st.none(), st.tuples(st.sampled_from(["bool", "float", "learned"]),
                                                 st.sampled_from(mask_shapes)))),
        causal=causal, window=draw(st.one_of(st.none(), st.tuples(side, side))), align=align,
        scale=draw(st.sampled_from([None, None, 0.5, 1.0, -0.25, 0.0])),
        softcap=draw(st.one_of(st.none(), st.floats(2.0, 30.0))),
        alibi=draw(st.sampled_from([None, "Hq", "B_Hq"])), sinks=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def operands(call, device):
    """(q, k, v, keyword arguments) of `call`, its tensors drawn from its seed."""
    generator = torch.Generator().manual_seed(call.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    def laid_out(heads, length, dim):
        if call.layout == "blhd":
            return randn(call.batch, length, heads, dim).transpose(1, 2)
        if call.layout == "padded":
            return randn(call.batch, heads, length, dim + 8)[..., :dim]
        return randn(call.batch, heads, length, dim)

    q, k = laid_out(call.heads_q, call.len_q, call.head_dim), laid_out(call.heads_kv, call.len_k, call.head_dim)
    v = laid_out(call.heads_kv, call.len_k, call.head_dim_v)
    q, k, v = (t.to(call.dtype).requires_grad_() for t in (q, k, v))
    kw = dict(causal=call.causal, window=call.window, align=call.align, scale=call.scale, softcap=call.softcap)
    if call.mask is not None:
        kind, shape = call.mask
        if kind == "bool":
            kw["mask"] = torch.rand(*shape, generator=generator).to(device) > 0.3
        elif kind == "float":  # some keys hidden by -inf
            hidden = torch.rand(*shape, generator=generator).to(device) < 0.2
            kw["mask"] = randn(*shape).masked_fill(hidden, float("-inf"))
        else:  # a learned bias: finite, with a gradient
            kw["mask"] = randn(*shape).requires_grad_()
    if call.alibi is not None:
        kw["alibi_slopes"] = torch.rand(*((call.batch,) if call.alibi == "B_Hq" else ()), call.heads_q,
                                        generator=generator).to(device)
    if call.sinks:
        kw["sinks"] = (randn(call.heads_q) * 2).requires_grad_()
    if call.dropout_p:
        kw.update(dropout_p=call.dropout_p, seed=call.seed)
    return q, k, v, kw


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(call=calls())
def test_kernels_match_float64_math(device, call):
    q, k, v, kw = operands(call, device)
    learned = [(name, kw[name]) for name in ("mask", "sinks") if name in kw and kw[name].requires_grad]
    out, lse = attn_ops.attention(q, k, v, return_lse=True, backend="triton", **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(call.seed + 1)).to(device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v, *(t for _, t in learned)), dout)
    # Float64's dropout-free probabilities, and its LSE (dropout-free too).
    rules = {name: reference_argument(x) for name, x in kw.items() if name not in ("dropout_p", "seed")}
    p, truth = probabilities(reference.attention, q.detach().double(), k.detach().double(), return_lse=True, **rules)
    scale = call.head_dim ** -0.5 if call.scale is None else call.scale
    keep = (keep_pattern(device, call.dropout_p, call.seed, call.batch, call.heads_q, call.len_q, call.len_k)
            if call.dropout_p else None)  # the kernels' pattern: float64 math applies it to its probabilities
    check_against_float64(q, k, v, out, grads, dout, score_gain=max(1.0, 3 * abs(scale) * call.head_dim ** 0.5),
                          keep=keep, slack=delta_slack(p, q, k, out, dout, scale, learned), **kw)
    assert torch.equal(lse > float("-inf"), truth > float("-inf"))
    seen = truth > float("-inf")
    tolerance = 1e-4 if call.dtype == torch.float32 else 2e-2
    if seen.any():  # (rows that see no key: -inf in both, asserted above)
        error = (lse[seen].double() - truth[seen]).abs().max().item()
        assert error <= tolerance * (1 + truth[seen].abs().max().item())

