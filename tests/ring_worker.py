"""What each rank of the ring-attention tests runs (`test_ring.py` starts the processes).

Every rank builds the same full tensors from one seed, runs its shard through `ring_attention`,
gathers the results and judges them against float64 attention on the full tensors, then writes
{case: "passed", "skipped: why" or the traceback} to a JSON file. A case does all its collective work before it
asserts anything, so one rank's failure cannot leave the others waiting in a collective.
"""

import contextlib
import json
import os
import traceback

import torch
import torch.distributed as dist

import attn_ops
from attn_ops.kernels.config import INTERPRETED
from test_memory import largest_allocation
from truth import check_against_float64

LENGTH = 48  # splits into 2W chunks for W = 2 and 3
KERNEL_LENGTH = 24  # through the interpreter: fewer program blocks


def attention_cases():
    """name -> keyword arguments of `attention_case`."""
    cases = {}
    for layout in ("zigzag", "contiguous"):
        for causal in (False, True):
            for heads in ((4, 2), (2, 2)):
                for dtype in (torch.float32, torch.float16):
                    name = f"{layout}-{'causal' if causal else 'full'}-hq{heads[0]}hkv{heads[1]}-{str(dtype)[6:]}"
                    cases[name] = dict(layout=layout, causal=causal, heads=heads, dtype=dtype)
    cases["kernels-zigzag-causal-gqa-fp16"] = dict(layout="zigzag", causal=True, heads=(4, 2), dtype=torch.float16,
                                                   kernels=True)
    cases["kernels-contiguous-full-fp32-lse-gradient"] = dict(layout="contiguous", causal=False, heads=(2, 2),
                                                              dtype=torch.float32, kernels=True, lse_weight=1.0)
    cases["lse-gradient-zigzag-causal-fp32"] = dict(layout="zigzag", causal=True, heads=(4, 2), dtype=torch.float32,
                                                    lse_weight=1.0)
    return cases


def attention_case(layout, causal, heads, dtype, kernels=False, lse_weight=0.0):
    """Ring attention on this rank's shards equals float64 attention on the full tensors: output,
    LSE and the gradients of q, k, v (of out · dout + lse · lse_weight · dlse)."""
    torch.manual_seed(1234)  # the same full tensors on every rank
    length = KERNEL_LENGTH if kernels else LENGTH
    (heads_q, heads_kv), batch, dim = heads, 2, 16
    full = [torch.randn(batch, h, length, dim).to(dtype) for h in (heads_q, heads_kv, heads_kv)]
    dout, dlse = torch.randn(batch, heads_q, length, dim).to(dtype), torch.randn(batch, heads_q, length)
    shards = [attn_ops.shard_sequence(t, layout=layout).requires_grad_() for t in full]
    with attn_ops.use_backend("triton") if kernels else contextlib.nullcontext():
        out, lse = attn_ops.ring_attention(*shards, causal=causal, layout=layout, return_lse=True)
    loss = (out.float() * attn_ops.shard_sequence(dout, layout=layout)).sum()
    (loss + lse_weight * (lse * attn_ops.shard_sequence(dlse, layout=layout)).sum()).backward()
    gathered = [attn_ops.gather_sequence(t, layout=layout) for t in (out.detach(), lse.detach(),
                                                                    *(s.grad for s in shards))]
    out_full, lse_full, *grads = gathered
    assert out.dtype == dtype and lse.dtype == torch.float32, (out.dtype, lse.dtype)
    wide = [t.double().requires_grad_() for t in full]
    truth, truth_lse = attn_ops.attention(*wide, causal=causal, return_lse=True)
    lse_error = (lse_full.double() - truth_lse).abs().max().item()
    assert lse_error < 1e-5 * truth_lse.abs().max().item() + 1e-6, f"lse error {lse_error:.3g}"
    if lse_weight:
        truth_grads = torch.autograd.grad((truth * dout.double()).sum() + lse_weight * (truth_lse * dlse.double()).sum(),
                                          wide)
        for name, g, tg in zip("qkv", grads, truth_grads):
            error = (g.double() - tg).abs().max().item()
            assert error < 1e-4 * tg.abs().max().item(), f"d{name} error {error:.3g}"
    else:
        check_against_float64(*full, out_full, grads, dout, causal=causal)


def work_case(layout):
    """Causal blocks a query cannot see are skipped: the scores each rank computes, counted at the
    implementation, are the visible chunk pairs' (zigzag: the same on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = 4
    shard_length = chunk * (2 if layout == "zigzag" else 1)
    computed = []
    run_block = attn_ops.reference.run_block

    def counting(q, k, v, problem):
        computed.append(q.shape[2] * k.shape[2])
        return run_block(q, k, v, problem)

    attn_ops.reference.run_block = counting
    try:
        attn_ops.ring_attention(*(torch.randn(1, 1, shard_length, 8) for _ in range(3)), causal=True, layout=layout)
    finally:
        attn_ops.reference.run_block = run_block
    if layout == "zigzag":  # step 0: chunk r x 1 chunk + chunk 2W-1-r x 2 chunks; later steps 2 chunk pairs each
        expected = (3 + 2 * (world - 1)) * chunk**2
    else:  # the ranks at and before this one, a chunk pair each
        expected = (rank + 1) * chunk**2
    assert sum(computed) == expected, f"computed {computed} scores, expected {expected} in all"


def memory_case():
    """Through the kernels, the largest allocation of a forward + backward is a float32 copy of this
    rank's shards (an output or gradient accumulator), so memory per rank grows with L / W, linearly."""
    largest = []
    for shard_length in (16, 32):
        shards = [torch.randn(1, h, shard_length, 16, requires_grad=True) for h in (4, 2, 2)]

        def step():
            with attn_ops.use_backend("triton"):
                out = attn_ops.ring_attention(*shards, causal=True)
            out.backward(torch.ones_like(out))

        step()  # warm the interpreter
        largest.append(largest_allocation(step))
        kv_bytes = 4 * (shards[1].numel() + shards[2].numel())
        assert largest[-1] <= max(4 * shards[0].numel(), kv_bytes), (largest, kv_bytes)
    assert largest[1] == 2 * largest[0], largest


def round_trip_case():
    """gather(shard(x)) == x for each layout and dim; gather_sequence's gradient is the rank's part."""
    torch.manual_seed(1)
    world = dist.get_world_size()
    x = torch.randn(3, 2 * world * 2, 5, 2 * world * 3)
    for layout in ("zigzag", "contiguous"):
        for dim in (1, -1):
            shard = attn_ops.shard_sequence(x, layout=layout, dim=dim)
            assert shard.shape[dim] == x.shape[dim] // world
            assert torch.equal(attn_ops.gather_sequence(shard, layout=layout, dim=dim), x)
        shard = attn_ops.shard_sequence(x, layout=layout, dim=1).clone().requires_grad_()
        (attn_ops.gather_sequence(shard, layout=layout, dim=1) * x).sum().backward()
        assert torch.equal(shard.grad, attn_ops.shard_sequence(x, layout=layout, dim=1))


def error_cases(rank, world):
    """name -> (call, expected exception type, words the message must contain) on `rank` of `world`."""

    def qkv(length, heads=2):
        return [torch.randn(1, heads, length, 8) for _ in range(3)]

    def checked(call):  # ranks that disagree are found by an all-gather, run on request only
        def run():
            with attn_ops.checked_values():
                call()
        return run

    return {
        "unequal-shards": (checked(lambda: attn_ops.ring_attention(*qkv(8 + 2 * rank))), ValueError,
                           ("q, k, v", "every rank", "shard_sequence")),
        "layouts-differ": (checked(lambda: attn_ops.ring_attention(*qkv(8), causal=True,
                                                                   layout=("zigzag", "contiguous")[rank % 2])),
                           ValueError, ("every rank", "layout")),
        "odd-zigzag-shard": (lambda: attn_ops.ring_attention(*qkv(7), causal=True), ValueError, ("zigzag", "even")),
        "unsplittable-length": (lambda: attn_ops.shard_sequence(torch.zeros(1, 1, 2 * world + 1, 4)),
                                ValueError, ("x", "layout='zigzag'", "equal chunks")),
        "unknown-layout": (lambda: attn_ops.ring_attention(*qkv(8), layout="striped"), ValueError,
                           ("layout", "striped")),
        "mask": (lambda: attn_ops.ring_attention(*qkv(8), mask=torch.ones(8, 8, dtype=torch.bool)), ValueError,
                 ("mask", "causal")),
        "dropout": (lambda: attn_ops.ring_attention(*qkv(8), dropout_p=0.1), ValueError, ("dropout_p",)),
        "bad-group": (lambda: attn_ops.ring_attention(*qkv(8), group=0), TypeError, ("group", "ProcessGroup")),
        "bad-dim": (lambda: attn_ops.gather_sequence(torch.zeros(2, 4), dim=2), ValueError, ("dim", "(2, 4)")),
    }


def error_case(call, kind, words):
    try:
        call()
    except kind as error:
        missing = [w for w in words if w not in str(error)]
        assert not missing, f"{kind.__name__} message lacks {missing}: {error}"
    else:
        raise AssertionError(f"no {kind.__name__} raised")


def cases(rank, world):
    """name -> the call `rank` of `world` makes; a name starting with "kernels-" needs the kernels."""
    calls = {name: (lambda kw=kw: attention_case(**kw)) for name, kw in attention_cases().items()}
    calls["round-trip"] = round_trip_case
    calls["kernels-memory"] = memory_case
    calls["work-zigzag"] = lambda: work_case("zigzag")
    calls["work-contiguous"] = lambda: work_case("contiguous")
    calls.update({f"error-{name}": (lambda c=c: error_case(*c)) for name, c in error_cases(rank, world).items()})
    return calls


def case_names(world):
    return list(cases(0, world))


def run(rank, world, init_file, out_dir):
    """One rank: every case in order; out_dir/rank{rank}.json gets "passed", "skipped: why" or the
    traceback of each."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, call in cases(rank, world).items():
        if name.startswith("kernels-") and not INTERPRETED:
            # gloo moves CPU tensors, and one GPU cannot host two NCCL ranks: the kernels run here
            # only through the interpreter.
            results[name] = "skipped: the ring workers' kernels need TRITON_INTERPRET=1 (gloo on CPU tensors)"
            continue
        try:
            call()
            results[name] = "passed"
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
