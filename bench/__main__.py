"""`python -m bench`: the demo, then attn_ops against every peer, as a table, JSON and plots."""

import argparse
import datetime
from pathlib import Path

import torch

from bench import demo, report
from bench.cases import CACHES, CPU_CASES, GPU_QUICK, GPU_SWEEP, MASKS, MODES, MODIFIERS, SPARSE, VARLEN
from bench.measure import CPU_ROUNDS, CPU_TIMER, GPU_TIMER, sweep
from bench.providers import CPU_PROVIDERS, GPU_PROVIDERS


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run a short demo, then time attn_ops against PyTorch SDPA (each backend), "
        "FlexAttention, the naive reference and any other installed peer. Without a CUDA GPU it "
        "runs a short CPU sweep instead.",
    )
    p.add_argument("--quick", action="store_true", help="a short GPU sweep (the CPU sweep is always short)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out",
                   help="where the JSON, Markdown and PNG files go (default: bench/out/)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo")
    p.add_argument("--providers", type=comma_list({**GPU_PROVIDERS, **CPU_PROVIDERS}),
                   help="comma-separated: only these providers")
    p.add_argument("--masks", type=comma_list(MASKS + SPARSE + MODIFIERS + (VARLEN, *CACHES)),
                   help="comma-separated: only these mask kinds, score modifiers, varlen and KV-cache layouts")
    p.add_argument("--modes", type=comma_list(MODES), help="comma-separated: only these modes")
    return p.parse_args(argv)


def comma_list(known):
    def parse(text):
        items = text.split(",")
        unknown = [x for x in items if x not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
        return items

    return parse


def keep(value, allowed):
    return allowed is None or value in allowed


def main(argv=None):
    args = parse_args(argv)
    if not args.no_demo:
        demo.run()
        print()
    gpu = torch.cuda.is_available()
    if gpu:
        device, providers, timer = "cuda", GPU_PROVIDERS, GPU_TIMER
        what, cases = ("quick", GPU_QUICK) if args.quick else ("sweep", GPU_SWEEP)
    else:
        print("No CUDA GPU: a short CPU sweep (attn_ops's reference path vs SDPA on the CPU). "
              "GPU numbers need a GPU.")
        device, what, cases, providers, timer = "cpu", "cpu", CPU_CASES, CPU_PROVIDERS, CPU_TIMER
    cases = [c for c in cases if keep(c.mask, args.masks) and keep(c.mode, args.modes)]
    providers = {name: p for name, p in providers.items() if keep(name, args.providers)}
    now = datetime.datetime.now(datetime.timezone.utc)

    rounds = 1 if gpu else CPU_ROUNDS
    rows, copy_gbps = sweep(cases, providers, device, report.Progress(len(cases) * len(providers) * rounds))

    meta = report.meta(device, timer, now, copy_gbps)
    table = report.markdown(meta, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / report.file_stem(device, what, now)
    report.write_json(Path(f"{stem}.json"), meta, rows)
    Path(f"{stem}.md").write_text(table)
    print(table)
    plots = report.plot(rows, stem)
    if plots is None:
        print("matplotlib is not installed: no plots (pip install matplotlib).")
    print(f"wrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in plots or []))


if __name__ == "__main__":
    main()
