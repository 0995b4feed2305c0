"""Dropout inside the fused kernels: replayable by seed, tiling-independent, exact gradients."""

import pytest
import torch

import attn_ops
from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs
from truth import DEVICES, check_finite_differences

BACKENDS = [pytest.param(d.values[0], id=f"triton-{d.values[0]}", marks=d.marks) for d in DEVICES] + ["reference"]


def device_of(backend):
    return "cpu" if backend == "reference" else backend


def run(backend, q, k, v, **kw):
    return attn_ops.attention(q, k, v, backend="triton" if backend != "reference" else "reference", **kw)


def keep_pattern(backend, dropout_p, seed, batch=2, heads=2, len_q=256, len_k=64):
    """The kept/dropped matrix, read back through the op: with q = 0 every probability is 1/Lk,
    and with v = I the output row is that row of the (rescaled) dropped probabilities."""
    device = device_of(backend)
    q = torch.zeros(batch, heads, len_q, len_k, device=device)
    k = torch.randn(batch, heads, len_k, len_k, device=device)
    v = torch.eye(len_k, device=device).expand(batch, heads, len_k, len_k)
    out = run(backend, q, k, v, dropout_p=dropout_p, seed=seed)
    return (out * len_k * (1 - dropout_p)).round()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_gives_bitwise_equal_output_and_gradients(backend):
    q, k, v = (torch.randn(1, 2, 40, 16, device=device_of(backend), requires_grad=True) for _ in range(3))
    first, second = (run(backend, q, k, v, dropout_p=0.3, seed=7) for _ in range(2))
    assert torch.equal(first, second)
    dout = torch.randn_like(first)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(first, (q, k, v), dout),
                                                 torch.autograd.grad(second, (q, k, v), dout)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seeds_give_different_patterns(backend):
    assert not torch.equal(keep_pattern(backend, 0.5, seed=1), keep_pattern(backend, 0.5, seed=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_none_follows_torch_manual_seed(backend):
    torch.manual_seed(123)
    first = keep_pattern(backend, 0.5, seed=None)
    torch.manual_seed(123)
    assert torch.equal(first, keep_pattern(backend, 0.5, seed=None))
    assert not torch.equal(first, keep_pattern(backend, 0.5, seed=None))  # the generator moved on


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(backend, dropout_p):
    pattern = keep_pattern(backend, dropout_p, seed=11)
    assert set(pattern.unique().tolist()) <= {0.0, 1.0}  # every entry is dropped or kept, and rescaled
    n = pattern.numel()
    std = (dropout_p * (1 - dropout_p) / n) ** 0.5
    assert abs(pattern.mean().item() - (1 - dropout_p)) < 4 * std


@pytest.mark.parametrize("backend", BACKENDS)
def test_pattern_rows_do_not_repeat_across_queries_heads_and_batches(backend):
    rows = keep_pattern(backend, 0.5, seed=4).flatten(0, 2)  # 1024 rows of 64 fair coin flips
    assert len({tuple(r) for r in rows.tolist()}) == rows.shape[0]  # a repeat has chance ~2**-44


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_over_seeds_approaches_the_dropout_free_output(backend):
    q, k, v = (torch.randn(1, 1, 32, 16, device=device_of(backend)) for _ in range(3))
    exact = run(backend, q, k, v)
    mean = torch.stack([run(backend, q, k, v, dropout_p=0.2, seed=s) for s in range(300)]).mean(0)
    # Each output averages ~32 terms of variance p/(1-p) * P^2 * v^2; over 300 seeds the mean's
    # error is well under 0.1 (about 4 standard deviations).
    assert (mean - exact).abs().max() < 0.1
    assert (mean - exact).abs().mean() < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_matches_finite_differences_for_a_fixed_seed(device):
    q, k, v = (torch.randn(1, 2, 24, 16, device=device, requires_grad=True) for _ in range(3))
    weight = torch.randn(1, 2, 24, 16, device=device)

    def loss(q, k, v):
        return (attn_ops.attention(q, k, v, dropout_p=0.3, seed=5, backend="triton", causal=True) * weight).sum()

    check_finite_differences(loss, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_pattern_does_not_depend_on_block_sizes(device):
    q, k, v = (torch.randn(1, 2, 100, 32, device=device) for _ in range(3))
    seed = torch.tensor([99], device=device)
    args = OpArgs(scale=0.2, band_hi=0, dropout_p=0.4, seed=seed)  # causal
    out_a, lse_a = attn_fwd(q, k, v, args, config=(64, 64, 4, 1))
    out_b, lse_b = attn_fwd(q, k, v, args, config=(16, 32, 4, 1))
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=0)  # equal up to summation order
    dout = torch.randn_like(out_a)
    grads_a = attn_bwd(dout, None, q, k, v, out_a, lse_a, args, config=(64, 64, 4, 1))[:3]
    grads_b = attn_bwd(dout, None, q, k, v, out_a, lse_a, args, config=(16, 32, 4, 1))[:3]
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The kept entries themselves, read through v = I (as in keep_pattern) with two tilings.
    eye = torch.eye(64, device=device).expand(1, 2, 64, 64)
    zeros = torch.zeros(1, 2, 100, 64, device=device)
    keys = torch.randn(1, 2, 64, 64, device=device)
    args = OpArgs(scale=1.0, dropout_p=0.5, seed=seed)
    pattern = [attn_fwd(zeros, keys, eye, args, config=c)[0] != 0
               for c in ((64, 64, 4, 1), (16, 16, 4, 1))]
    assert torch.equal(pattern[0], pattern[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_stay_zero_with_dropout(backend):
    device = device_of(backend)
    q = torch.randn(1, 2, 30, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, 20, 16, device=device) for _ in range(2))
    out = run(backend, q, k, v, dropout_p=0.5, seed=3, causal="bottom_right")  # the first 10 rows see nothing
    dq, = torch.autograd.grad(out.sum(), q)
    assert (out[:, :, :10] == 0).all() and not torch.isnan(out).any()
    assert (dq[:, :, :10] == 0).all() and not torch.isnan(dq).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_the_dropout_free_one(backend):
    q, k, v = (torch.randn(1, 2, 40, 16, device=device_of(backend)) for _ in range(3))
    _, lse = run(backend, q, k, v, return_lse=True)
    _, lse_dropped = run(backend, q, k, v, dropout_p=0.5, seed=1, return_lse=True)
    assert torch.equal(lse, lse_dropped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_drops_nothing_and_the_dropout_path_agrees_when_it_drops_nothing(backend):
    q, k, v = (torch.randn(1, 2, 40, 16, device=device_of(backend)) for _ in range(3))
    exact = attn_ops.reference.attention(q.double(), k.double(), v.double())
    out_p0 = run(backend, q, k, v, dropout_p=0.0, seed=1)
    torch.testing.assert_close(out_p0.double(), exact, atol=1e-5, rtol=0)
    # p = 1e-7 takes the dropout code path (keep test, rescaling by 1 / (1 - p)) yet, for this seed,
    # drops none of the 3200 probabilities (each is dropped with probability ~1e-7).
    tiny = run(backend, q, k, v, dropout_p=1e-7, seed=1)
    torch.testing.assert_close(tiny, out_p0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_one_gives_zeros_and_zero_gradients(backend):
    q, k, v = (torch.randn(1, 2, 40, 16, device=device_of(backend), requires_grad=True) for _ in range(3))
    out = run(backend, q, k, v, dropout_p=1.0, seed=3, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (out == 0).all()
    assert all((g == 0).all() for g in grads)
