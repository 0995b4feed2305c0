"""attn_ops.attention under torch.compile(fullgraph=True), and its torch.library ops under opcheck."""

import pytest
import torch
from torch.library import opcheck

import attn_ops
import attn_ops.fused  # noqa: F401  (registers the custom ops, which dispatch imports on first use)
from attn_ops.kernels.attn_launch import OpArgs
from truth import DEVICES


def fwd_args(device, permuted, masked, dropout):
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    if permuted:  # a [B, L, H, D] tensor seen as [B, H, L, D]
        q = torch.randn(1, 24, 2, 16, device=device).transpose(1, 2)
    mask = torch.rand(24, 24, device=device) > 0.3 if masked else None
    seed = torch.tensor([3], device=device) if dropout else None
    args = OpArgs(scale=0.25, mask=mask, band_hi=0, dropout_p=0.2 if dropout else 0.0, seed=seed)
    return q, k, v, *args.flat()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("masked,dropout", [(False, False), (True, True)])
def test_opcheck_forward_and_backward_ops(device, permuted, masked, dropout):
    args = fwd_args(device, permuted, masked, dropout)
    opcheck(torch.ops.attn_ops.attention_fwd.default, args)
    out, lse_log2 = torch.ops.attn_ops.attention_fwd(*args)
    q, k, v = args[:3]
    dout = torch.randn(1, 24, 2, 16, device=device).transpose(1, 2) if permuted else torch.randn_like(out)
    opcheck(torch.ops.attn_ops.attention_bwd.default, (dout, None, q, k, v, out, lse_log2, False, *args[3:]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_score_modifiers_and_the_mask_gradient(device):
    q, k, v = (torch.randn(1, 2, 24, 16, device=device) for _ in range(3))
    mask = torch.randn(24, 2, 24, device=device).transpose(0, 1)  # [H, Lq, Lk], its strides permuted
    args = OpArgs(scale=0.25, mask=mask, band_lo=-10, diagonal_shift=0,
                      softcap=5.0, alibi_slopes=torch.rand(2, device=device), sinks=torch.randn(2, device=device))
    opcheck(torch.ops.attn_ops.attention_fwd.default, (q, k, v, *args.flat()))
    out, lse_log2 = torch.ops.attn_ops.attention_fwd(q, k, v, *args.flat())
    opcheck(torch.ops.attn_ops.attention_bwd.default,
            (torch.randn_like(out), torch.randn_like(lse_log2), q, k, v, out, lse_log2, True, *args.flat()))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_score_modifiers_and_their_gradients_equal_eager(device):
    q, k, v = (torch.randn(2, 4, 40, 16, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 40, 40, device=device, requires_grad=True)
    sinks = torch.randn(4, device=device, requires_grad=True)
    slopes = torch.rand(4, device=device)

    def step(q, k, v, bias, sinks):
        return attn_ops.attention(q, k, v, mask=bias, sinks=sinks, softcap=10.0, alibi_slopes=slopes, causal=True,
                                  backend="triton")

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        out = fn(q, k, v, bias, sinks)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, bias, sinks))))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_forward_and_backward_equal_eager_without_graph_breaks(device, compiler):
    q, k, v = (torch.randn(2, 4, 40, 16, device=device, requires_grad=True) for _ in range(3))
    k2, v2 = (t[:, :2].detach().clone().requires_grad_() for t in (k, v))  # GQA
    mask = torch.rand(2, 1, 1, 40, device=device) > 0.2

    def step(q, k, v):
        out, lse = attn_ops.attention(q, k, v, mask=mask, causal=True, dropout_p=0.1, seed=1,
                                      backend="triton", return_lse=True)
        return out, lse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)  # fullgraph: a graph break raises
    results = []
    for fn in (step, compiled):
        out, lse = fn(q, k2, v2)
        grads = torch.autograd.grad((out.square().sum(), lse.sum()), (q, k2, v2))
        results.append((out, lse, *grads))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_dropins_compile_without_graph_breaks(device):
    mha = attn_ops.MultiheadAttention(32, 4, batch_first=True).to(device)
    x = torch.randn(2, 20, 32, device=device, requires_grad=True)
    ignored = torch.rand(2, 20, device=device) < 0.2  # nn.MultiheadAttention's convention: True = ignore
    q, k, v = (torch.randn(2, 4, 20, 8, device=device, requires_grad=True) for _ in range(3))

    def step(x, q, k, v):
        out = mha(x, x, x, key_padding_mask=ignored, need_weights=False)[0]
        return out, attn_ops.scaled_dot_product_attention(q, k, v, is_causal=True)

    with attn_ops.use_backend("triton"):
        torch._dynamo.reset()
        results = []
        for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
            outs = fn(x, q, k, v)
            results.append((*outs, *torch.autograd.grad(sum(o.square().sum() for o in outs), (x, q, k, v))))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)


def packed_args(device):
    """Packed q, k, v with cu_seqlens of lengths (5, 0, 30) / (9, 4, 20), and the op's flat arguments."""
    q, k, v = torch.randn(35, 4, 16, device=device), torch.randn(33, 2, 16, device=device), torch.randn(33, 2, 8, device=device)
    cu_q = torch.tensor([0, 5, 5, 35], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 13, 33], dtype=torch.int32, device=device)
    args = OpArgs(scale=0.25, band_hi=0, softcap=5.0, alibi_slopes=torch.rand(3, 4, device=device),
                      sinks=torch.randn(4, device=device), dropout_p=0.2, seed=torch.tensor([3], device=device),
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, bottom_right=True)
    return q, k, v, args


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_packed_sequences(device):
    q, k, v, args = packed_args(device)
    opcheck(torch.ops.attn_ops.attention_fwd.default, (q, k, v, *args.flat()))
    out, lse_log2 = torch.ops.attn_ops.attention_fwd(q, k, v, *args.flat())
    assert out.shape == (35, 4, 8) and lse_log2.shape == (4, 35)
    opcheck(torch.ops.attn_ops.attention_bwd.default,
            (torch.randn_like(out), torch.randn_like(lse_log2), q, k, v, out, lse_log2, False, *args.flat()))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_varlen_and_its_gradients_equal_eager(device):
    q, k, v, args = packed_args(device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sinks = args.sinks.requires_grad_()

    def step(q, k, v, sinks):
        return attn_ops.varlen_attention(q, k, v, args.cu_seqlens_q, args.cu_seqlens_k, causal="bottom_right",
                                         softcap=5.0, alibi_slopes=args.alibi_slopes, sinks=sinks, dropout_p=0.2,
                                         seed=3, return_lse=True, backend="triton")

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        out, lse = fn(q, k, v, sinks)
        results.append((out, lse, *torch.autograd.grad((out.square().sum(), lse.sum()), (q, k, v, sinks))))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)


def cache_args(device, paged):
    """A decoding call's tensors: GQA 4:2, two queries, caches of 3 and 40 tokens (dense capacity 48,
    or a shuffled pool of pages of 16), two new tokens each."""
    q = torch.randn(2, 4, 2, 16, device=device)
    if paged:
        k_cache, v_cache = (torch.randn(7, 2, 16, 16, device=device) for _ in range(2))
        table = torch.tensor([[5, 0, 2], [1, 6, 3]], dtype=torch.int32, device=device)
    else:
        k_cache, v_cache = (torch.randn(2, 2, 48, 16, device=device) for _ in range(2))
        table = None
    k_new, v_new = (torch.randn(2, 2, 2, 16, device=device) for _ in range(2))
    return q, k_cache, v_cache, torch.tensor([3, 40], dtype=torch.int32, device=device), table, k_new, v_new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_decoding(device, paged):
    import attn_ops.decode  # noqa: F401  (registers the op)

    q, k_cache, v_cache, seqlens, table, _, _ = cache_args(device, paged)
    args = OpArgs(scale=0.25, band_hi=0, softcap=4.0, alibi_slopes=torch.rand(4, device=device),
                      sinks=torch.randn(4, device=device))
    for num_splits in (None, 3):
        opcheck(torch.ops.attn_ops.attention_decode.default,
                (q, k_cache, v_cache, seqlens, table, 0, num_splits, *args.flat()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
def test_compiled_decoding_step_equals_eager_and_appends_alike(device, paged):
    q, k_cache, v_cache, seqlens, table, k_new, v_new = cache_args(device, paged)
    sinks = torch.randn(4, device=device)

    def step(q, k_cache, v_cache, seqlens, k_new, v_new):
        return attn_ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               block_table=table, causal=True, softcap=5.0, sinks=sinks,
                                               num_splits=2, return_lse=True, backend="triton")

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        caches = (k_cache.clone(), v_cache.clone())
        results.append((*fn(q, *caches, seqlens, k_new, v_new), *caches))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decoding_takes_a_symbolic_cache_length(device):
    """A cache length read off a tensor's shape (as the HF path passes a dynamic cache's) is a SymInt
    under dynamic shapes: taken as the int it stands for, without a graph break."""
    def step(q, k, v):
        return attn_ops.attention_with_kvcache(q, k, v, k.shape[2], causal=True, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for length in (5, 9):
        q = torch.randn(2, 4, 1, 16, device=device)
        k, v = (torch.randn(2, 2, length, 16, device=device) for _ in range(2))
        torch.testing.assert_close(compiled(q, k, v), step(q, k, v), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_block_masks_pass_opcheck_and_compile_without_graph_breaks(device):
    """A block mask's tensors are custom-op arguments: opcheck passes, and a compiled step equals eager."""
    q, k, v = (torch.randn(1, 2, 100, 16, device=device, requires_grad=True) for _ in range(3))
    block_mask = attn_ops.BlockMask.from_mask(torch.rand(1, 2, 100, 100, device=device) > 0.4, block_size=64)
    args = OpArgs(scale=0.25, band_hi=0, **block_mask.kernel_args)
    operands = [t.detach() for t in (q, k, v)]
    opcheck(torch.ops.attn_ops.attention_fwd.default, (*operands, *args.flat()))
    out, lse_log2 = torch.ops.attn_ops.attention_fwd(*operands, *args.flat())
    opcheck(torch.ops.attn_ops.attention_bwd.default,
            (torch.randn_like(out), None, *operands, out, lse_log2, False, *args.flat()))

    def step(q, k, v):
        return attn_ops.attention(q, k, v, block_mask=block_mask, causal=True, backend="triton")

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_summarized_dense_mask_compiles_without_graph_breaks(device, monkeypatch):
    """A dense bool mask's summary (`attn_ops.mask_summary`) is traced into the graph: no host read,
    sizes from the mask's shape only."""
    from attn_ops import mask_summary, problem

    monkeypatch.setattr(mask_summary, "MIN_SUMMARIZED", 0)
    monkeypatch.setattr(problem, "_DESCRIBED", {})  # no plan of an earlier call with the bool-mask path
    q, k, v = (torch.randn(1, 2, 200, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 1, 200, 200, device=device) > 0.4
    mask[:, :, :128, 128:] = False

    def step(q, k, v, mask):
        return attn_ops.attention(q, k, v, mask=mask, backend="triton")

    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        out = fn(q, k, v, mask)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-6, rtol=0)
