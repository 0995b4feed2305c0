"""`python -m bench.headline --out DIR`: the benchmark a GPU session runs first (`.ci/gpu.sh`):
`HEADLINE`'s cases, attn_ops against every SDPA backend, then against compiled FlexAttention, whose
compilation (each case anew, tens of seconds) makes it the slow part, so it comes last. Writes
`headline.json` (the sweep's format) and `headline.md` after every case, within `--budget-s`:
cases not reached are listed as `not_run` in the JSON's meta and under the table. `--dry-run`:
`HEADLINE_DRY`'s toy cases on the CPU (attn_ops's reference path against SDPA's CPU kernels)."""

import argparse
import datetime
from pathlib import Path

import torch

from bench import report
from bench.budget import run_within
from bench.cases import DECODE, HEADLINE, HEADLINE_DRY, Case
from bench.measure import CPU_ROUNDS, CPU_TIMER, GPU_TIMER, label, sweep
from bench.providers import CPU_PROVIDERS, GPU_PROVIDERS

FIRST = ("attn_ops", "attn_ops (reference)", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math",
         "flash_attn")
DECODING = ("attn_ops_unsplit",)  # with FIRST where a case decodes
LAST = ("flex",)


def jobs(cases, providers):
    """(cases, providers) to sweep in turn: each case alone, the decoding cases together (one copy
    bandwidth for all their rows); every job with FIRST's providers, then every job with LAST's."""
    decoding = [c for c in cases if c.mode == DECODE]
    groups = [[c] for c in cases if c.mode != DECODE] + ([decoding] if decoding else [])

    def among(names):
        return {name: p for name, p in providers.items() if name in names}

    first = [(g, among(FIRST + (DECODING if g[0].mode == DECODE else ()))) for g in groups]
    last = [(g, among(LAST)) for g in groups]
    return first + [job for job in last if job[1]]


def brief(rows):
    """One line per case: attn_ops's speed, the best SDPA backend's, flex's, and attn_ops over the best."""
    _, ours_name, cases = report._by_case(rows)
    lines = []
    for key, by_provider in cases.items():
        case = Case(*key)
        metric, unit = ("gbps", "GB/s") if case.mode == DECODE else ("tflops", "TFLOP/s")
        ours = by_provider.get(ours_name, {}).get(metric)
        sdpa = {p: r.get(metric) for p, r in by_provider.items() if p.startswith("sdpa_") and r.get(metric)}
        best = max(sdpa, key=sdpa.get, default=None)
        flex = by_provider.get("flex", {}).get(metric)
        text = f"{label(case)}: {ours_name} {ours or '-'} {unit}"
        text += f", best SDPA {sdpa[best]} ({best})" if best else ", no SDPA backend ran"
        text += f", flex {flex}" if flex else ""
        text += f": {ours / sdpa[best]:.2f}x SDPA" if ours and best else ""
        lines.append(text)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for headline.json and headline.md")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no case after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="toy cases on the CPU")
    args = p.parse_args(argv)
    if args.dry_run:
        device, cases, providers, timer, rounds = "cpu", HEADLINE_DRY, CPU_PROVIDERS, CPU_TIMER, CPU_ROUNDS
    elif torch.cuda.is_available():
        device, cases, providers, timer, rounds = "cuda", HEADLINE, GPU_PROVIDERS, GPU_TIMER, 1
    else:
        p.error("needs a CUDA GPU (--dry-run: toy cases on the CPU)")
    now = datetime.datetime.now(datetime.timezone.utc)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, copy_gbps = [], None

    def run_job(job):
        nonlocal copy_gbps
        group, chosen = job
        measured, gbps = sweep(group, chosen, device, report.Progress(len(group) * len(chosen) * rounds))
        rows.extend(measured)
        copy_gbps = gbps or copy_gbps

    def save(pending):
        meta = report.meta(device, timer, now, copy_gbps)
        meta["not_run"] = [f"{label(case)}: {', '.join(chosen)}" for group, chosen in pending for case in group]
        report.write_json(args.out / "headline.json", meta, rows)
        table = report.markdown(meta, rows)
        if meta["not_run"]:
            table += "\nNot run (out of time): " + "; ".join(meta["not_run"]) + ".\n"
        (args.out / "headline.md").write_text(table)

    pending = run_within(jobs(cases, providers), args.budget_s, run_job, save)
    print("\n".join(brief(rows)))
    if pending:
        print(f"not run (out of time): {sum(len(g) * len(c) for g, c in pending)} rows")


if __name__ == "__main__":
    main()
