"""`python -m bench.tiles --out DIR`: times tile candidates per pass of the dense kernels (forward,
dK/dV, dQ) at bf16, D = 128, B = 4, H = 16, L = 4096 (a FlashAttention-paper shape), no mask:
`kernels/config.py`'s picks (the launchers with no `config=`) first, then each candidate through the
launchers' `config=`. Writes `tiles.json` and `tiles.md` after every run, within `--budget-s`.

The backward launcher gives one `config=` to both its passes, so each candidate times dK/dV and dQ
at once: the whole backward by the sweep's timer, each pass by its kernel's device time in the
profiler (CUDA only: on the CPU, the interpreter's kernels leave no profiler events). `--dry-run`:
one candidate at a toy shape, through Triton's interpreter on the CPU (TRITON_INTERPRET=1)."""

import argparse
import datetime
import statistics
from pathlib import Path

import torch

from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs, uses_tma
from attn_ops.kernels.config import TileConfig, tile_config
from bench import report
from bench.budget import run_within
from bench.cases import Case
from bench.measure import CPU_TIMER, GPU_TIMER, flops, time_cpu, time_gpu

# (batch, heads, length, head dim)
SHAPE, DRY_SHAPE = (4, 16, 4096, 128), (1, 2, 64, 128)
# The tables' tiles (TILES, and TMA_TILES for plain scores on Hopper), then other tile sizes, warps and
# pipeline depths. The forward's first is also the launcher's pick on Hopper: its two rows show the
# timer's spread. The backward's candidates serve dK/dV (block_n keys per program) and dQ (block_m
# queries per program) at once.
FWD_CANDIDATES = ((128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                  (64, 64, 4, 3))
BWD_CANDIDATES = ((32, 128, 8, 2), (128, 64, 8, 2), (16, 128, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2),
                  (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3))
DRY_CANDIDATE = (32, 64, 4, 1)
KERNELS = {"dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
PROFILED_CALLS = 10


def kernel_ms(step):
    """{pass: median device ms of its kernel over PROFILED_CALLS calls of `step`} from the profiler;
    None where it saw no such kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            step()
        torch.cuda.synchronize()
    times = {name: [] for name in KERNELS}
    for event in prof.events():
        for name, kernel in KERNELS.items():
            if event.device_type == DeviceType.CUDA and event.name.startswith(kernel):
                times[name].append(event.time_range.elapsed_us() / 1e3)
    return {name: statistics.median(ms) if ms else None for name, ms in times.items()}


def inputs(shape, device):
    batch, heads, length, head_dim = shape
    q, k, v, do = (torch.randn(batch, heads, length, head_dim, device=device, dtype=torch.bfloat16) for _ in range(4))
    return q, k, v, do, OpArgs(scale=head_dim**-0.5)


def picks(q, k, v):
    """The tiles the launchers take without `config=`, per pass."""
    head_dim = q.shape[-1]
    return {name: list(tile_config(q, name, head_dim, tma=uses_tma(name, head_dim, q, k, v), plain=True))
            for name in ("fwd", "dkdv", "dq")}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for tiles.json and tiles.md")
    p.add_argument("--budget-s", type=float, default=120.0, help="start no run after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="one candidate, a toy shape, the interpreter on the CPU")
    args = p.parse_args(argv)
    if args.dry_run:
        device, shape, timer, text = "cpu", DRY_SHAPE, time_cpu, CPU_TIMER
        fwd_candidates = bwd_candidates = (DRY_CANDIDATE,)
    elif torch.cuda.is_available():
        device, shape, timer, text = "cuda", SHAPE, time_gpu, GPU_TIMER
        fwd_candidates, bwd_candidates = FWD_CANDIDATES, BWD_CANDIDATES
    else:
        p.error("needs a CUDA GPU (--dry-run: the interpreter on the CPU)")
    now = datetime.datetime.now(datetime.timezone.utc)
    q, k, v, do, op_args = inputs(shape, device)
    out, lse = attn_fwd(q, k, v, op_args)
    batch, heads, length, head_dim = shape
    work = {mode: flops(Case(mode, "bfloat16", batch, heads, heads, length, length, head_dim, "none"))
            for mode in ("fwd", "bwd")}
    # None: the tables' picks. Passes alternate, so a run cut short has both.
    runs = [("fwd", None), ("bwd", None)]
    for i in range(max(len(fwd_candidates), len(bwd_candidates))):
        runs += [(name, c[i]) for name, c in (("fwd", fwd_candidates), ("bwd", bwd_candidates)) if i < len(c)]
    rows = []

    def run(job):
        name, config = job
        if name == "fwd":
            step = lambda: attn_fwd(q, k, v, op_args, config=config)  # noqa: E731
        else:
            step = lambda: attn_bwd(do, None, q, k, v, out, lse, op_args, config=config)  # noqa: E731
        row = {"pass": name, "config": None if config is None else list(TileConfig(*config)), "ms": None,
               "tflops": None, "error": None}
        try:
            ms = timer(step)[0]
            row.update(ms=_sig(ms), tflops=_sig(work[name] / ms / 1e9))
            if name == "bwd":
                per_pass = kernel_ms(step) if device == "cuda" else dict.fromkeys(KERNELS)
                row.update({f"{kernel}_ms": _sig(t) for kernel, t in per_pass.items()})
        except Exception as e:  # a candidate that fails to compile or launch is this row's result
            row["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        rows.append(row)

    def save(pending):
        meta = {**report.meta(device, text, now), "shape": dict(zip(("batch", "heads", "length", "head_dim"), shape)),
                "dtype": "bfloat16", "mask": "none", "picks": picks(q, k, v),
                "per_pass": f"dkdv_ms, dq_ms: median device time of the pass's kernel over {PROFILED_CALLS} "
                            "calls in torch.profiler (no L2 flush); CUDA only",
                "not_run": [f"{name} {config}" for name, config in pending]}
        report.write_json(args.out / "tiles.json", meta, rows)
        (args.out / "tiles.md").write_text(markdown(meta, rows))

    args.out.mkdir(parents=True, exist_ok=True)
    run_within(runs, args.budget_s, run, save)
    print("\n".join(best_lines(rows)))


def _sig(x):
    return None if x is None else float(f"{x:.4g}")


def _tile(row):
    return "config.py" if row["config"] is None else "(" + ", ".join(map(str, row["config"])) + ")"


def _ms(x):
    return "-" if x is None else f"{x:.4g}"


def markdown(meta, rows):
    picks_ = ", ".join(f"{name} {tuple(tile)}" for name, tile in meta["picks"].items())
    shape = ", ".join(f"{key} {value}" for key, value in meta["shape"].items())
    lines = [f"# Tile candidates per pass on {meta['device']}", "",
             f"bf16, {shape}, no mask; torch {meta['torch']}, triton {meta['triton']}, git {meta['git']}, "
             f"{meta['date']}. Tiles: (block_m, block_n, num_warps, num_stages); config.py's picks here: {picks_}.",
             f"Timer: {meta['timer']}. Per pass: {meta['per_pass']}.", "",
             "| pass | tile | ms | TFLOP/s | dkdv ms | dq ms | error |", "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["pass"] != "fwd", r["ms"] is None, r["ms"] or 0)):
        lines.append(f"| {row['pass']} | {_tile(row)} | {_ms(row['ms'])} | {_ms(row['tflops'])} | "
                     f"{_ms(row.get('dkdv_ms'))} | {_ms(row.get('dq_ms'))} | {row['error'] or ''} |")
    if meta["not_run"]:
        lines += ["", "Not run (out of time): " + "; ".join(meta["not_run"]) + "."]
    return "\n".join(lines) + "\n" + "\n".join(["", *best_lines(rows)]) + "\n"


def best_lines(rows):
    """Per pass (and the whole backward): the fastest tile, and config.py's picks beside it."""
    lines = []
    for name, field, kind in (("fwd", "ms", "fwd"), ("bwd", "ms", "bwd"), ("dkdv", "dkdv_ms", "bwd"),
                              ("dq", "dq_ms", "bwd")):
        timed = [r for r in rows if r["pass"] == kind and r.get(field) is not None]
        if not timed:
            lines.append(f"tiles {name}: not timed")
            continue
        best = min(timed, key=lambda r: r[field])
        table = next((r[field] for r in timed if r["config"] is None), None)
        lines.append(f"tiles {name}: fastest {_tile(best)} {best[field]:.4g} ms; config.py's {_ms(table)} ms")
    return lines


if __name__ == "__main__":
    main()
