"""Ground truth and tolerances for the kernel tests.

The rule (from FlagAttention): the kernel's error against float64 math may be at most twice the
error that plain PyTorch makes computing the same thing at the inputs' precision, plus a floor of a
few units in the last place of that dtype for cases where PyTorch happens to be exact.
"""

import pytest
import torch

from attn_ops import reference
from attn_ops.band import band_rules
from attn_ops.kernels.config import INTERPRETED

# Where the kernels run: CPU tensors through the interpreter in CI, CUDA when present.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One unit in the last place at O(1) magnitudes (fp16 2**-10, bf16 2**-7); fp32 errors also grow
# with the reduction length, so its floor is a few hundred ulps of 1.
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_qkv(batch, heads_q, heads_kv, len_q, len_k, head_dim, dtype, device, scale=1.0, head_dim_v=None):
    q = torch.randn(batch, heads_q, len_q, head_dim, device=device) * scale
    k = torch.randn(batch, heads_kv, len_k, head_dim, device=device)
    v = torch.randn(batch, heads_kv, len_k, head_dim_v or head_dim, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def plain_torch(q, k, v, mask=None, scale=None, softcap=None, alibi_slopes=None, sinks=None, **rules):
    """softmax(cap(q k^T * scale) + mask + alibi, sinks) v computed by plain PyTorch ops at the
    inputs' precision."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        shift = k.shape[2] - q.shape[2] if band_rules(q.shape[2], k.shape[2], rules.get("causal", False),
                                                      rules.get("window"), rules.get("align"))[2] == "bottom_right" else 0
        distance = (torch.arange(q.shape[2])[:, None] + shift - torch.arange(k.shape[2])[None, :]).abs().to(q.device)
        slopes = alibi_slopes.view(-1 if alibi_slopes.dim() == 2 else 1, alibi_slopes.shape[-1], 1, 1)
        s = s - (slopes * distance).to(s.dtype)
    # Which keys are visible comes from the float64 reference (masking itself is exact).
    visible = reference.masked_scores(q.detach().double(), k.detach().double(), mask=_wide(mask), scale=1.0,
                                      **rules) > float("-inf")
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0), v)
    s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    return torch.matmul(torch.softmax(s, dim=-1)[..., :-1], v)


def _wide(mask):
    return mask if mask is None or mask.dtype == torch.bool else mask.double()


def _learned(kw):
    """The names of the differentiable score terms among the keyword arguments (a float mask, sinks)."""
    return [name for name in ("mask", "sinks") if kw.get(name) is not None and kw[name].requires_grad]


def check_against_float64(q, k, v, out, grads=None, dout=None, score_gain=1.0, floor=True, keep=None, slack=None,
                          **kw):
    """Asserts out (and grads of q, k, v, then of a float mask and sinks that require grad, for the
    upstream gradient dout) obey the 2x rule.

    ``score_gain`` scales the floor of dq and dk: they are ``scale * ds @ k``, so a rounding-level
    error in ``dp - delta`` comes out multiplied by about ``scale * |k| * sqrt(D)``. ``floor=False``
    holds the kernel to twice plain PyTorch's error alone. ``slack``: {gradient name: an error the
    bound allows besides} (`delta_slack`). ``keep``: the kernels' dropout pattern
    [B, Hq, Lq, Lk] for ``kw``'s dropout_p and seed (float64 math and plain PyTorch apply it to
    their own dropout-free probabilities: `_dropped`).
    """
    learned = _learned(kw)
    rules = {name: x for name, x in kw.items() if keep is None or name not in ("dropout_p", "seed")}
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, *(kw[name] for name in learned))]
    truth = _dropped(reference.attention, keep, kw.get("dropout_p"), *wide[:3],
                     **{**rules, "mask": _wide(kw.get("mask")), **dict(zip(learned, wide[3:]))})
    low = [t.detach().clone().requires_grad_() for t in (q, k, v, *(kw[name] for name in learned))]
    plain = _dropped(plain_torch, keep, kw.get("dropout_p"), *low[:3], **{**rules, **dict(zip(learned, low[3:]))})
    _assert_rule("out", out, truth, plain, q.dtype, floor=floor)
    if grads is None:
        return
    truth_grads = torch.autograd.grad(truth, wide, dout.double())
    plain_grads = torch.autograd.grad(plain, low, dout)
    names = ("dq", "dk", "dv", *(f"d{name}" for name in learned))
    gains = (score_gain, score_gain, 1, *(1 for _ in learned))
    assert len(grads) == len(names), f"{len(grads)} gradients for {names}"
    for name, g, tg, pg, gain in zip(names, grads, truth_grads, plain_grads, gains):
        _assert_rule(name, g, tg, pg, q.dtype, gain, floor, (slack or {}).get(name, 0.0))


def _dropped(attention, keep, dropout_p, q, k, v, **kw):
    """``attention(q, k, v, **kw)``, or with ``keep`` (a dropout pattern [B, Hq, Lq, Lk]) its
    dropout-free probabilities (the output for v = I) with the pattern applied, kept ones scaled by
    1 / (1 - dropout_p), times v."""
    if keep is None:
        return attention(q, k, v, **kw)
    dropped = probabilities(attention, q, k, **kw) * keep.to(v.dtype) * (1.0 / (1.0 - dropout_p))
    return torch.matmul(dropped, v.repeat_interleave(q.shape[1] // k.shape[1], 1))


def probabilities(attention, q, k, **kw):
    """``attention``'s probabilities [B, Hq, Lq, Lk] for q and k under ``kw``'s rules: its output for
    v = I (with ``return_lse=True``, and its LSE, which does not depend on v)."""
    batch, heads_kv, len_k = k.shape[:3]
    identity = torch.eye(len_k, dtype=q.dtype, device=q.device).expand(batch, heads_kv, len_k, len_k)
    return attention(q, k, identity, **kw)


def reference_argument(x):
    """A tensor argument as the float64 reference takes it beside float64 q, k and v: half-precision
    floats widened; bool masks and float32 tensors (ALiBi's slopes must be float32) as they are."""
    return x.detach().double() if isinstance(x, torch.Tensor) and x.dtype not in (torch.bool, torch.float32) else x


# The unit roundoff of each dtype: half an ulp of 1.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def delta_slack(probabilities, q, k, out, dout, scale, learned=()):
    """{gradient name: the error that the kernels' delta = rowsum(dO * O) adds}, over what plain
    PyTorch makes: the kernels (as FlashAttention's) read O rounded to the inputs' dtype, which moves
    delta_i by up to ``u * sum_d |dO_id O_id|`` (u: the unit roundoff), and ``dS = P * (dP - delta)``
    carries that into dQ, dK and the learned terms. Plain PyTorch's softmax backward has no such term
    and is exact where a row sees one key, so the 2x rule alone cannot cover it there.
    `probabilities`: float64 [B, Hq, Lq, Lk] (dropout-free); `learned`: (name, tensor) of a float
    mask and sinks that require grad."""
    u = UNIT_ROUNDOFF[q.dtype]
    delta_err = u * (dout.double().abs() * out.double().abs()).sum(-1)  # [B, Hq, Lq]
    ds_err = probabilities * delta_err[..., None]
    group = q.shape[1] // k.shape[1]
    slack = {
        "dq": abs(scale) * delta_err.max().item() * k.double().abs().amax().item(),
        "dk": abs(scale) * ds_err.sum(2).unflatten(1, (k.shape[1], group)).sum(2).max().item()
        * q.double().abs().amax().item(),
    }
    for name, tensor in learned:
        if name == "mask":  # summed over the dimensions the mask broadcasts, as its gradient is
            shape = (1,) * (4 - tensor.dim()) + tuple(tensor.shape)
            summed = ds_err.sum([d for d in range(4) if shape[d] == 1], keepdim=True)
            slack["dmask"] = summed.max().item()
        else:  # a sink's probability is what the keys leave
            slack["dsinks"] = ((1 - probabilities.sum(-1)).clamp(min=0) * delta_err).sum((0, 2)).max().item()
    return {name: 2 * value for name, value in slack.items()}


def check_lse_against_float64(q, k, v, lse, **kw):
    """Asserts the ``[Hq, Lq]`` LSE of a batch-1 call equals float64 math's: -inf exactly where a row
    sees no key, elsewhere within 1e-5 relative to the LSE's magnitude."""
    truth = reference.attention(*(t.detach().double() for t in (q, k, v)), return_lse=True, **kw)[1][0]
    seen = truth > float("-inf")
    assert torch.equal(seen, lse > float("-inf"))
    assert (lse[seen].double() - truth[seen]).abs().max() <= 1e-5 * (1 + truth[seen].abs().max())


def _assert_rule(name, actual, truth, plain, dtype, gain=1.0, floor=True, slack=0.0):
    assert not torch.isnan(actual).any(), f"{name} has NaN"
    err = (actual.double() - truth).abs().max().item()
    plain_err = (plain.double() - truth).abs().max().item()
    bound = 2 * plain_err + (FLOOR[dtype] * max(gain, truth.abs().max().item()) if floor else 0.0) + slack
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (plain PyTorch's error {plain_err:.3g})"


def check_finite_differences(loss, inputs, eps=1e-2):
    """Asserts the gradients of the scalar ``loss(*inputs)`` (float32) agree with central differences
    along a random direction per input."""
    grads = torch.autograd.grad(loss(*inputs), inputs)
    for i, g in enumerate(grads):
        direction = torch.randn_like(g)
        plus = [t.detach().clone() for t in inputs]
        minus = [t.detach().clone() for t in inputs]
        plus[i] += eps * direction
        minus[i] -= eps * direction
        numeric = (loss(*plus) - loss(*minus)).item() / (2 * eps)
        analytic = (g * direction).sum().item()
        # Central differences in fp32: O(eps^2) truncation plus rounding of the loss (~1e-5 / eps).
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (i, numeric, analytic)
