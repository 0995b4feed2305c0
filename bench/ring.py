"""`python -m bench.ring`: ring attention across W processes against attention on the full sequence
in one process: per rank, time (forward + backward), bytes sent and peak memory.

Runs on what is present: NCCL with one GPU per rank when there are at least two GPUs, otherwise gloo
on the CPU (W processes sharing this machine's cores: the timings then show the overheads, not a
speed-up). The bytes are counted at the ring's transfers as they happen.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import attn_ops
from attn_ops import ring
from bench import report
from bench.measure import peak_rss_growth

REPS = 5
TIMER = (f"median of {REPS} forward+backward calls after one warm-up call, each rank starting together "
         "(a barrier before each call), ms; peak_mem_mb: how far the timed calls raised memory above what "
         "was held before them (the inputs: this rank's shards, or the full tensors in the single process): "
         "CUDA max_memory_allocated, or the process's peak RSS on the CPU")
TIMEOUT_S = 1200


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, help="ranks (default: the GPUs when there are two or more, else 2)")
    p.add_argument("--length", type=int, help="full sequence length (default 32768 on GPUs, 2048 on the CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPUs, float32 on the CPU")
    p.add_argument("--layout", choices=ring.LAYOUTS, default="zigzag")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    gpus = torch.cuda.device_count()
    on_gpus = gpus >= 2
    args.world = args.world or (gpus if on_gpus else 2)
    args.length = args.length or (32768 if on_gpus else 2048)
    args.dtype = args.dtype or ("bfloat16" if on_gpus else "float32")
    if on_gpus and args.world > gpus:
        raise SystemExit(f"--world {args.world} needs as many GPUs; {gpus} present")
    backend = "nccl" if on_gpus else "gloo"
    print(f"ring attention on {args.world} {backend} ranks ({'one GPU each' if on_gpus else 'CPU processes'}), "
          f"L = {args.length}, {args.layout}, {'full' if args.no_causal else 'causal'}")
    with tempfile.TemporaryDirectory() as folder:
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=_rank, args=(rank, args, backend, folder)) for rank in range(args.world)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + TIMEOUT_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        if any(worker.exitcode for worker in workers):
            raise SystemExit(f"a rank failed or timed out: exit codes {[w.exitcode for w in workers]}")
        rows = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(args.world)]
    single = rows[0].pop("single_process")
    device = "cuda" if on_gpus else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {**report.meta(device, TIMER, now), "backend": backend, "world": args.world,
            "shape": dict(batch=args.batch, heads_q=args.heads, heads_kv=args.kv_heads, length=args.length,
                          head_dim=args.head_dim, dtype=args.dtype, layout=args.layout, causal=not args.no_causal)}
    table = markdown(meta, rows, single)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / report.file_stem(device, f"ring{args.world}", now)
    report.write_json(Path(f"{stem}.json"), meta, [*rows, {"rank": "single process", **single}])
    Path(f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {stem}.json, {stem}.md")


def _rank(rank, args, backend, folder):
    """One rank: time ring attention on its shard; rank 0 then times the full sequence alone."""
    dist.init_process_group(backend, init_method=f"file://{folder}/init", rank=rank, world_size=args.world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    causal = not args.no_causal
    # Each rank keeps only its shards (copies), so its memory is what a rank of a real run holds.
    shards = [attn_ops.shard_sequence(t, layout=args.layout).clone().requires_grad_() for t in _full(args, device)]
    torch.set_num_threads(max(1, os.cpu_count() // args.world))  # the ranks share this machine's cores

    def step():
        out = attn_ops.ring_attention(*shards, causal=causal, layout=args.layout)
        torch.autograd.grad(out, shards, torch.ones_like(out))

    ms, peak_mb = _measure(step, device, barrier=dist.barrier)
    row = {"rank": rank, "shard_length": shards[0].shape[2], "ms": ms, "sent_mb": _sent_mb(step),
           "peak_mem_mb": peak_mb}
    dist.barrier()
    if rank == 0:  # alone, with the machine to itself
        torch.set_num_threads(os.cpu_count())
        whole = [t.requires_grad_() for t in _full(args, device)]

        def single():
            out = attn_ops.attention(*whole, causal=causal)
            torch.autograd.grad(out, whole, torch.ones_like(out))

        ms, peak_mb = _measure(single, device)
        row["single_process"] = {"shard_length": args.length, "ms": ms, "sent_mb": 0.0, "peak_mem_mb": peak_mb}
    dist.barrier()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def _full(args, device):
    """The full q, k, v: the same on every rank (one seed)."""
    torch.manual_seed(0)
    return [torch.randn(args.batch, h, args.length, args.head_dim, device=device, dtype=getattr(torch, args.dtype))
            for h in (args.heads, args.kv_heads, args.kv_heads)]


def _sent_mb(step):
    """MB this rank sends in one call of `step`, counted at the ring's transfers."""
    sent, pass_on = [], ring._Ring.pass_on

    def counted(self, tensor):
        sent.append(tensor.nbytes)
        return pass_on(self, tensor)

    ring._Ring.pass_on = counted
    try:
        step()
    finally:
        ring._Ring.pass_on = pass_on
    return round(sum(sent) / 2**20, 3)


def _measure(step, device, barrier=lambda: None):
    """(median ms, peak MB) of `step`, every call started after `barrier`."""
    barrier()
    step()  # compilation, allocator warm-up
    times = []
    with peak_rss_growth() as peak:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for _ in range(REPS):
            barrier()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else peak["mb"]
    return round(statistics.median(times) * 1e3, 3), None if peak_mb is None else round(peak_mb, 1)


def markdown(meta, rows, single):
    lines = [f"# Ring attention, {meta['world']} {meta['backend']} ranks: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, git {meta['git']}, {meta['date']}", "",
             f"Shape: {json.dumps(meta['shape'])}", "", f"Timer: {meta['timer']}", "",
             "| rank | shard length | fwd+bwd ms | vs single process | sent MB per call | peak MB |",
             "|---|---|---|---|---|---|"]
    for row in [*rows, {"rank": "single process", **single}]:
        ratio = f"{row['ms'] / single['ms']:.2f}x"
        lines.append(f"| {row['rank']} | {row['shard_length']} | {row['ms']} | {ratio} | "
                     f"{row['sent_mb']} | {row['peak_mem_mb']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
