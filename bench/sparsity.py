"""`python -m bench.sparsity`: what a block mask saves. Forward+backward time of `attn_ops.attention`
with block masks of falling density, each against the same call with every block full, and a
dense bool mask of the same pattern against an all-True one, in the same run. On a CPU the kernels
run in Triton's interpreter (`TRITON_INTERPRET=1`, set here), whose time counts the tiles they
visit; on a GPU, the kernels themselves (`triton.testing.do_bench`).

A pattern at density d keeps each query block's own diagonal block and, at random, other blocks
up to d of all; "full" keeps whole blocks, "partial" hides 10% of the elements of each kept block
(so every kept block reads its bits). A dense mask as large as these is summarized into blocks by
the call (`attn_ops.mask_summary`).
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import attn_ops  # noqa: E402
from attn_ops import mask_summary  # noqa: E402
from bench.measure import time_cpu, time_gpu  # noqa: E402
from bench.report import file_stem, meta  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.125)
# 1k x 1k: a dense mask as large as `attn_ops.mask_summary.MIN_SUMMARIZED`, so that it is summarized.
CPU_SHAPE = dict(batch=1, heads=1, length=1024, head_dim=32, block=128, dtype=torch.float32)
GPU_SHAPE = dict(batch=1, heads=16, length=8192, head_dim=128, block=128, dtype=torch.bfloat16)


def pattern(blocks, density, partial, block, length, gen):
    """A bool [1, 1, L, L] mask of `blocks` x `blocks` blocks, `density` of them kept."""
    keep = torch.eye(blocks, dtype=torch.bool)
    extra = round(density * blocks * blocks) - blocks
    if extra > 0:
        off_diagonal = (~keep).flatten().nonzero()[:, 0]
        keep.view(-1)[off_diagonal[torch.randperm(off_diagonal.numel(), generator=gen)[:extra]]] = True
    dense = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length]
    if partial:
        dense &= torch.rand(length, length, generator=gen) > 0.1
        dense |= torch.eye(length, dtype=torch.bool)  # no query left without a key
    return dense[None, None]


def timed(step, device):
    """Median seconds of `step()`, by the sweep's timers (`bench.measure`): do_bench on a GPU, a
    perf_counter median of 3 to 6 calls after a warm-up on a CPU."""
    return (time_gpu if device == "cuda" else time_cpu)(step)[0] / 1e3


def measure(device):
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    batch, heads, length, block = shape["batch"], shape["heads"], shape["length"], shape["block"]
    q, k, v = (torch.randn(batch, heads, length, shape["head_dim"], device=device, dtype=shape["dtype"],
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def fwd_bwd(**rules):
        def step():
            out = attn_ops.attention(q, k, v, backend="triton", **rules)
            torch.autograd.grad(out, (q, k, v), dout)
        return step

    gen = torch.Generator().manual_seed(0)
    blocks = -(-length // block)
    rows = []
    everything = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    base = {"block_mask": timed(fwd_bwd(block_mask=attn_ops.BlockMask.from_mask(everything, block_size=block)),
                                device),
            "dense mask": timed(fwd_bwd(mask=everything), device)}
    for partial in (False, True):
        for density in DENSITIES:
            dense = pattern(blocks, density, partial, block, length, gen).to(device)
            block_mask = attn_ops.BlockMask.from_mask(dense, block_size=block)
            for how, rules in (("block_mask", dict(block_mask=block_mask)), ("dense mask", dict(mask=dense))):
                seconds = timed(fwd_bwd(**rules), device)
                rows.append(dict(passed_as=how, blocks="partial" if partial else "full",
                                 density=round(block_mask.density, 4), seconds=seconds,
                                 over_all_blocks=seconds / base[how]))
                print(f"{how:10} {rows[-1]['blocks']:7} density {rows[-1]['density']:.3f}: "
                      f"{seconds:.3f} s, {rows[-1]['over_all_blocks']:.2f}x of all blocks", file=sys.stderr)
    return shape, base, rows


def markdown(meta_, shape, base, rows, device):
    what = "Triton's interpreter on a CPU (time counts the tiles visited)" if device == "cpu" else "the GPU"
    lines = [
        f"# Block masks: forward+backward time against density, on {meta_['device']}",
        "",
        f"torch {meta_['torch']}, triton {meta_['triton']}, git {meta_['git']}, {meta_['date']}. Kernels run by {what}.",
        f"Shape: B={shape['batch']}, H={shape['heads']}, L={shape['length']}, D={shape['head_dim']}, "
        f"{str(shape['dtype']).replace('torch.', '')}, blocks of {shape['block']}. Every block full: block_mask "
        f"{base['block_mask']:.3f} s, dense all-True mask {base['dense mask']:.3f} s.",
        "",
        "| passed as | kept blocks | density | seconds | over every block kept |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['passed_as']} | {r['blocks']} | {r['density']:.3f} | {r['seconds']:.3f} | "
              f"{r['over_all_blocks']:.2f}x |" for r in rows]
    summarized = shape["length"] ** 2 >= mask_summary.MIN_SUMMARIZED
    lines += ["", f"The dense `mask=` rows: {'summarized' if summarized else 'not summarized'} into blocks of "
              f"{mask_summary.BLOCK_SIZE} by the call (`attn_ops.mask_summary`: masks of at least "
              f"{mask_summary.MIN_SUMMARIZED} elements per head)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out", help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    now = datetime.datetime.now()
    shape, base, rows = measure(device)
    meta_ = meta(device, "bench.measure.time_gpu (do_bench, median)" if device == "cuda"
                 else "bench.measure.time_cpu (time.perf_counter, median of 3 to 6 calls after a warm-up)", now)
    stem = Path(args.out) / file_stem(device, "sparsity", now)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta_, shape={**shape, "dtype": str(shape["dtype"])},
                                                         every_block=base, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(markdown(meta_, shape, base, rows, device))
    print(stem.with_suffix(".md"))


if __name__ == "__main__":
    main()
