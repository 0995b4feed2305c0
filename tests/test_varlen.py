"""attn_ops.varlen_attention through the kernels: each packed sequence against float64 math on its own."""

import itertools

import pytest
import torch

import attn_ops
from attn_ops.kernels.attn_varlen import tile_grid, tile_schedule
from truth import DEVICES, DTYPES, check_against_float64, check_finite_differences, check_lse_against_float64


def pack(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, device, head_dim_v=None):
    """Random packed q, k, v (leaves that require grad) and their int32 cu_seqlens."""
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), heads_q, head_dim, device=device)
    k = torch.randn(sum(lengths_k), heads_kv, head_dim, device=device)
    v = torch.randn(sum(lengths_k), heads_kv, head_dim_v or head_dim, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], cu_q, cu_k


def sequence(t, cu, b):
    """Sequence b of a packed [total, H, ...] tensor as a dense [1, H, L, ...] view."""
    return t[int(cu[b]):int(cu[b + 1])].transpose(0, 1)[None]


def run_packed(q, k, v, cu_q, cu_k, backend="triton", **kw):
    out, lse = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, backend=backend, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, grads, dout


def check_each_sequence(q, k, v, cu_q, cu_k, out, lse, grads, dout, alibi_slopes=None, **kw):
    """Every sequence's out, LSE and gradients against float64 math on that sequence alone (2x rule);
    a sequence with no keys gives zeros and lse -inf."""
    for b in range(len(cu_q) - 1):
        part = [sequence(t, cu, b) for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k))]
        got = [sequence(t, cu, b) for t, cu in ((out, cu_q), *zip(grads, (cu_q, cu_k, cu_k)), (dout, cu_q))]
        lse_b = lse[:, int(cu_q[b]):int(cu_q[b + 1])]
        if part[0].shape[2] == 0:
            continue
        if part[1].shape[2] == 0:  # no key: zeros, never NaN
            assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[1], torch.zeros_like(got[1]))
            assert torch.all(lse_b == float("-inf"))
            continue
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        check_against_float64(*part, got[0], got[1:4], got[4], alibi_slopes=slopes, **kw)
        check_lse_against_float64(*part, lse_b, alibi_slopes=slopes, **kw)


LENGTHS = {
    "5,0,70": ((5, 0, 70), (5, 0, 70)),
    "1,33,64": ((1, 33, 64), (1, 33, 64)),
    "cross": ((5, 40, 17, 0), (12, 3, 60, 9)),  # Lq_b != Lk_b, differently per sequence; one empty query side
}
RULES = {
    "none": {},
    "causal_top_left": {"causal": True},
    "causal_bottom_right": {"causal": "bottom_right"},
    "window_bottom_right": {"window": (8, 3), "align": "bottom_right"},
    "window_unbounded_left": {"window": (None, 4)},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("rule", RULES)
def test_each_sequence_matches_float64(device, lengths, rule):
    (q, k, v), cu_q, cu_k = pack(*LENGTHS[lengths], 4, 2, 32, torch.float32, device, head_dim_v=16)
    out, lse, grads, dout = run_packed(q, k, v, cu_q, cu_k, **RULES[rule])
    assert out.shape == (q.shape[0], 4, 16) and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    check_each_sequence(q, k, v, cu_q, cu_k, out, lse, grads, dout, **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("rule", ["causal_bottom_right", "window_bottom_right"])
def test_half_precisions_match_float64(device, dtype, rule):
    (q, k, v), cu_q, cu_k = pack(*LENGTHS["cross"], 8, 2, 64, dtype, device)
    check_each_sequence(q, k, v, cu_q, cu_k, *run_packed(q, k, v, cu_q, cu_k, **RULES[rule]), **RULES[rule])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slopes_per_sequence", [False, True])
def test_softcap_alibi_and_sinks_within_each_sequence(device, slopes_per_sequence):
    lengths = ((30, 0, 70), (45, 6, 20))
    (q, k, v), cu_q, cu_k = pack(*lengths, 4, 1, 16, torch.float32, device)
    slopes = torch.rand(3, 4, device=device) if slopes_per_sequence else torch.rand(4, device=device)
    sinks = torch.randn(4, device=device, requires_grad=True)
    rules = dict(causal="bottom_right", softcap=4.0, alibi_slopes=slopes)
    out, lse = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, sinks=sinks, return_lse=True, backend="triton", **rules)
    dout = torch.randn_like(out)
    *grads, dsinks = torch.autograd.grad(out, (q, k, v, sinks), dout)
    check_each_sequence(q, k, v, cu_q, cu_k, out, lse, grads, dout, sinks=sinks.detach(), **rules)
    # dsinks sums over every sequence's rows: against the float64 reference of the whole batch.
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    truth = attn_ops.varlen_attention(*wide[:3], cu_q, cu_k, sinks=wide[3], backend="reference", **rules)
    (truth_dsinks,) = torch.autograd.grad(truth, wide[3], dout.double())
    assert (dsinks.double() - truth_dsinks).abs().max() <= 1e-4 * (1 + truth_dsinks.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_the_lse_of_each_sequence(device):
    """The LSE's own gradient reaches q and k of every sequence (the dQ pass reads each sequence's
    rows of it), against the float64 reference."""
    (q, k, v), cu_q, cu_k = pack(*LENGTHS["cross"], 4, 2, 32, torch.float32, device)
    out, lse = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, causal="bottom_right", return_lse=True,
                                         backend="triton")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad(((out * dout).sum(), (lse * dlse).sum()), (q, k, v))
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attn_ops.varlen_attention(*wide, cu_q, cu_k, causal="bottom_right", return_lse=True,
                                             backend="reference")
    # Rows with no key have lse -inf: their dlse reaches nothing.
    loss64 = (out64 * dout.double()).sum() + (lse64.nan_to_num(0.0, 0.0, 0.0) * dlse.double()).sum()
    for g, g64 in zip(grads, torch.autograd.grad(loss64, wide)):
        torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [-0.7, 0.0], ids=str)
def test_any_finite_scale_as_sdpa_takes_it(device, scale):
    (q, k, v), cu_q, cu_k = pack((5, 40, 17), (12, 30, 9), 4, 2, 16, torch.float32, device)
    out, lse, grads, dout = run_packed(q, k, v, cu_q, cu_k, causal="bottom_right", scale=scale)
    check_each_sequence(q, k, v, cu_q, cu_k, out, lse, grads, dout, causal="bottom_right", scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_a_sequence_does_not_depend_on_its_neighbours(device):
    (q, k, v), cu_q, cu_k = pack((20, 37, 9), (25, 37, 50), 2, 2, 16, torch.float32, device)
    middle = [t[20:57] for t in (q, k, v)]
    reference_out = None
    for before, after in ((20, 9), (3, 70), (0, 0), (64, 1)):
        kv = [torch.randn(before, 2, 16, device=device), torch.randn(after, 2, 16, device=device)]
        packed = [torch.cat([kv[0], t.detach(), kv[1]]) for t in middle]
        cu = torch.tensor([0, before, before + 37, before + 37 + after], dtype=torch.int32, device=device)
        out = attn_ops.varlen_attention(*packed, cu, cu, causal=True, backend="triton")[before:before + 37]
        if reference_out is None:
            reference_out = out
        assert torch.equal(out, reference_out), (before, after)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_cu_seqlens_and_transposed_inputs(device):
    # cu_seqlens as every other entry of a longer tensor; q, k, v as [total, H, D] views of [H, total, D].
    (q, k, v), cu_q, cu_k = pack((9, 40, 2), (30, 7, 25), 2, 1, 16, torch.float32, device)
    expected = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="triton")
    strided = [torch.stack([cu, torch.full_like(cu, -7)], 1).view(-1)[::2] for cu in (cu_q, cu_k)]
    views = [t.detach().transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v)]
    assert not strided[0].is_contiguous() and not views[0].is_contiguous()
    torch.testing.assert_close(attn_ops.varlen_attention(*views, *strided, causal=True, backend="triton"), expected,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_one_sequence_is_the_dense_op_dropout_pattern_included(device):
    (q, k, v), cu_q, cu_k = pack((50,), (70,), 4, 2, 16, torch.float32, device)
    dense = [t.detach().transpose(0, 1)[None] for t in (q, k, v)]
    for kw in ({"causal": "bottom_right"}, {"dropout_p": 0.3, "seed": 7, "window": (9, 2)}):
        packed = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, backend="triton", **kw)
        torch.testing.assert_close(packed.transpose(0, 1)[None], attn_ops.attention(*dense, backend="triton", **kw),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_keyed_by_packed_position(device):
    # The dense op over every packed row, with a block-diagonal mask, draws the same pattern.
    lengths_q, lengths_k = (20, 0, 45), (30, 8, 26)
    (q, k, v), cu_q, cu_k = pack(lengths_q, lengths_k, 2, 2, 16, torch.float32, device)
    rows = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(lengths_q, device=device))
    cols = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(lengths_k, device=device))
    block_diagonal = rows[:, None] == cols[None, :]
    dense = attn_ops.attention(*(t.detach().transpose(0, 1)[None] for t in (q, k, v)), mask=block_diagonal,
                               dropout_p=0.4, seed=11, backend="triton")
    packed = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.4, seed=11, backend="triton")
    torch.testing.assert_close(packed, dense[0].transpose(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_gradients_against_finite_differences(device):
    (q, k, v), cu_q, cu_k = pack((7, 40), (20, 33), 2, 1, 16, torch.float32, device)
    weights = torch.randn(q.shape[0], 2, 16, device=device)

    def loss(q, k, v):
        return (attn_ops.varlen_attention(q, k, v, cu_q, cu_k, causal=True, dropout_p=0.25, seed=3,
                                          backend="triton") * weights).sum()

    check_finite_differences(loss, [t.detach().clone().requires_grad_() for t in (q, k, v)])
    # With value rows of ones, each output is the kept share of the row's probability over 1 - p.
    ones = torch.ones_like(v)
    out = attn_ops.varlen_attention(q, k, ones, cu_q, cu_k, dropout_p=0.25, seed=3, backend="triton")
    assert torch.equal(out, attn_ops.varlen_attention(q, k, ones, cu_q, cu_k, dropout_p=0.25, seed=3,
                                                      backend="triton"))
    assert 0.85 < out.mean().item() < 1.15


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    (q, k, v), cu_q, cu_k = pack((33, 70, 5), (60, 12, 41), 4, 1, 32, torch.float16, device)
    first = run_packed(q, k, v, cu_q, cu_k, causal=True)
    torch.manual_seed(0)
    again = torch.autograd.grad(attn_ops.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="triton"),
                                (q, k, v), first[3])
    assert all(torch.equal(a, b) for a, b in zip(first[2], again))


def test_tile_schedule_covers_only_real_tiles():
    cu = torch.tensor([0, 5, 5, 135, 136], dtype=torch.int32)  # 5, 0, 130, 1 rows: 1 + 0 + 3 + 1 tiles of 64
    grid = tile_grid(136, 64, 4)
    assert grid == 136 // 64 + 4  # the bound, known without reading cu on the host
    tile_seq, first = tile_schedule(cu, 64, torch.arange(grid, dtype=torch.int32))
    assert tile_seq.tolist() == [0, 2, 2, 2, 3, 4]  # 4 = past the last tile: those programs return at once
    assert first.tolist() == [0, 1, 1, 4, 5]


def test_reference_backend_and_empty_batch():
    for lengths_q, lengths_k in (((0, 0), (3, 0)), ((), ())):  # two empty query sides; no sequence at all
        (q, k, v), cu_q, cu_k = pack(lengths_q, lengths_k, 2, 2, 8, torch.float64, "cpu")
        out, lse = attn_ops.varlen_attention(q, k, v, cu_q, cu_k, return_lse=True)
        assert out.shape == (0, 2, 8) and lse.shape == (2, 0) and lse.dtype == torch.float64
        assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out.sum(), (q, k, v)))
    (q, k, v), cu_q, cu_k = pack((6,), (0,), 2, 2, 8, torch.float64, "cpu")
    out = attn_ops.varlen_attention(q, k, v, cu_q, cu_k)
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(out.sum(), (q, k, v)))
