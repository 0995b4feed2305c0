"""What a sweep leaves behind: a progress line while it runs, then JSON (BENCH.md's format), a
Markdown table and PNG plots."""

import json
import platform
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import torch

from bench.cases import DECODE, PLAIN, VARLEN, Case
from bench.measure import FLOP_RULE

CASE_KEYS = tuple(f.name for f in fields(Case))
MASK_AT = CASE_KEYS.index("mask")
HEADER = ("mode", "dtype", "B", "Hq", "Hkv", "Lq", "Lk", "D", "mask")


class Progress:
    """tqdm when it is installed, else a one-line counter on stderr."""

    def __init__(self, total):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="row") if tqdm else None
        self.total, self.done = total, 0

    def step(self, text):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update()
        else:
            print(f"\r[{self.done}/{self.total}] {text:<70}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def file_stem(device, what, now):
    """`h100-2026-11-25-sweep`: a GPU by its model number ('NVIDIA H100 80GB HBM3' -> h100), a CPU
    by its architecture (x86-64)."""
    slug = re.sub(r"[^a-z0-9]+", "-", platform.machine().lower())
    if device == "cuda":
        name = torch.cuda.get_device_name().lower().replace("nvidia", "")
        found = re.search(r"[a-z]*\d+[a-z0-9]*", name)
        slug = found.group(0) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{slug}-{now:%Y-%m-%d}-{what}"


def _git_commit():
    """HEAD's hash, '-dirty' when the tree has changes; None outside a repository or before a commit."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def meta(device, timer, now, copy_gbps=None):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__.split("+")[0],
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git": _git_commit(),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timer": timer,
        "flop_rule": FLOP_RULE,
        "copy_gbps": None if copy_gbps is None else float(f"{copy_gbps:.4g}"),
    }


def write_json(path, meta_, rows):
    """BENCH.md's format, one row per line so that diffs stay readable."""
    body = ",\n  ".join(json.dumps(row) for row in rows)
    meta_text = json.dumps(meta_, indent=2).replace("\n", "\n ")
    path.write_text(f'{{\n "meta": {meta_text},\n "rows": [\n  {body}\n ]\n}}\n')


def _cell(row):
    if row["tflops"] is not None:
        return f"{row['tflops']:.1f}" if row["tflops"] >= 10 else f"{row['tflops']:.3g}"
    if row["error"] == "out of memory":
        return "OOM"
    return "n/a" if _unsupported(row) else "err"


def markdown(meta_, rows):
    """One line per case, one TFLOP/s column per provider, then attn_ops over the best SDPA backend
    (and over SDPA's math backend, the plain-math peer of the CPU reference, where it ran; and, on a
    score modifier's row, attn_ops's time over its time without the modifier). Decoding rows get
    their own table, in GB/s (`decode_markdown`), and so do packed batches (`attn_ops_padded`'s only
    rows)."""
    decoding = [r for r in rows if r["mode"] == DECODE]
    packed = [r for r in rows if r["mode"] != DECODE and r["mask"] == VARLEN]
    rows = [r for r in rows if r["mode"] != DECODE and r["mask"] != VARLEN]
    text = _flops_markdown(meta_, rows) if rows else f"# attn_ops vs peers on {meta_['device']}\n"
    if packed:
        text += "\n## Packed variable-length batches\n\n" + _flops_table(packed)
    return text + (decode_markdown(meta_, decoding) if decoding else "")


def _by_case(rows):
    """(the providers in order of appearance, attn_ops's name among them, {case key: {provider: row}}).
    A provider that could run none of `rows` (n/a in each: `attn_ops_padded` outside packed batches)
    gets no column."""
    providers = list(dict.fromkeys(r["provider"] for r in rows if not _unsupported(r)))
    ours_name = next((p for p in providers if p.startswith("attn_ops")), "attn_ops")
    cases = {}
    for r in rows:
        cases.setdefault(tuple(r[key] for key in CASE_KEYS), {})[r["provider"]] = r
    return providers, ours_name, cases


def _unsupported(row):
    return row["ms"] is None and (row.get("error") or "").startswith("unsupported")


def _cells(key, by_provider, providers, value):
    return [str(x) for x in key] + [value(by_provider[p]) if p in by_provider else "-" for p in providers]


def decode_markdown(meta_, rows):
    """Decoding steps: GB/s of K/V read per provider, attn_ops's fraction of the copy bandwidth, and
    its speed over the unsplit path and the best SDPA backend."""
    providers, ours_name, cases = _by_case(rows)
    lines = [
        "",
        f"## Decoding against a KV cache: GB/s of K/V read on {meta_['device']}",
        "",
        f"Copy bandwidth measured in the same run: {meta_['copy_gbps']} GB/s (read + written). "
        "mask: the cache's layout (kvcache: dense; kvcache_pagedN: blocks of N rows, shuffled).",
        "",
        "| " + " | ".join(HEADER + tuple(providers) + ("attn_ops / copy bw", "attn_ops / unsplit",
                                                       "attn_ops / best SDPA")) + " |",
        "|" + "---|" * (len(HEADER) + len(providers) + 3),
    ]
    for key, by_provider in cases.items():
        ours = by_provider.get(ours_name, {})
        unsplit = by_provider.get("attn_ops_unsplit", {}).get("ms")
        sdpa = [r["ms"] for p, r in by_provider.items() if p.startswith("sdpa_") and r["ms"]]
        ratios = [f"{ours['bw_fraction']:.2f}" if ours.get("bw_fraction") else "-",
                  f"{unsplit / ours['ms']:.3g}x" if unsplit and ours.get("ms") else "-",
                  f"{min(sdpa) / ours['ms']:.3g}x" if sdpa and ours.get("ms") else "-"]
        lines.append("| " + " | ".join(_cells(key, by_provider, providers, _gbps_cell) + ratios) + " |")
    lines += ["", "Ratios of speed (time over attn_ops's time). n/a: the provider cannot run this case (a paged "
              "cache, say); the JSON says why. GPU targets: >= 0.8 of the copy bandwidth for Lk >= 16k at "
              "B = 8; >= 3x the unsplit path at B = 1."]
    return "\n".join(lines) + "\n"


def _gbps_cell(row):
    return f"{row['gbps']:.3g}" if row.get("gbps") is not None else _cell(row)


def _flops_markdown(meta_, rows):
    return "\n".join([
        f"# attn_ops vs peers: TFLOP/s on {meta_['device']}",
        "",
        f"torch {meta_['torch']}, triton {meta_['triton']}, CUDA {meta_['cuda'] or '-'}, "
        f"git {meta_['git']}, {meta_['date']}.",
        f"Timer: {meta_['timer']}.",
        f"FLOPs: {meta_['flop_rule']}.",
        "",
        "",
    ]) + _flops_table(rows)


def _flops_table(rows):
    providers, ours_name, cases = _by_case(rows)
    versus_math = "sdpa_math" in providers
    versus_padded = "attn_ops_padded" in providers
    versus_plain = any(key[MASK_AT] in PLAIN for key in cases)
    lines = [
        "| " + " | ".join(HEADER + tuple(providers) + ("attn_ops speedup over best SDPA",)
                          + (("attn_ops speedup over sdpa_math",) if versus_math else ())
                          + (("attn_ops speedup over attn_ops_padded",) if versus_padded else ())
                          + (("attn_ops ms / plain",) if versus_plain else ())) + " |",
        "|" + "---|" * (len(HEADER) + len(providers) + 1 + versus_math + versus_padded + versus_plain),
    ]
    for key, by_provider in cases.items():
        sdpa = [r["tflops"] for p, r in by_provider.items() if p.startswith("sdpa_") and r["tflops"]]
        ours = by_provider.get(ours_name, {}).get("tflops")
        ratios = [f"{ours / max(sdpa):.3g}x" if ours and sdpa else "-"]
        if versus_math:
            math_tflops = by_provider.get("sdpa_math", {}).get("tflops")
            ratios.append(f"{ours / math_tflops:.3g}x" if ours and math_tflops else "-")
        if versus_padded:
            padded_tflops = by_provider.get("attn_ops_padded", {}).get("tflops")
            ratios.append(f"{ours / padded_tflops:.3g}x" if ours and padded_tflops else "-")
        if versus_plain:
            ratios.append(_over_plain(key, cases, ours_name))
        lines.append("| " + " | ".join(_cells(key, by_provider, providers, _cell) + ratios) + " |")
    lines += ["", "Speedups are TFLOP/s ratios: above 1x attn_ops is faster. OOM: out of memory; n/a: the "
              "provider cannot run this case; err: it failed. The JSON beside this table says why."]
    if versus_plain:
        lines += ["", "attn_ops ms / plain: attn_ops's time on a score modifier's row over its time on the "
                  "same case with the kind named (no modifier; for bias_grad, the same bias without its "
                  "gradient). GPU targets: alibi and softcap at most 1.1x none, bias_grad's bwd at most "
                  "1.5x bias's."]
    return "\n".join(lines) + "\n"


def _over_plain(key, cases, ours_name):
    plain = PLAIN.get(key[MASK_AT])
    base = cases.get(key[:MASK_AT] + (plain,) + key[MASK_AT + 1:], {}).get(ours_name, {}).get("ms")
    ours = cases[key].get(ours_name, {}).get("ms")
    return f"{ours / base:.3g}x {plain}" if plain and ours and base else "-"


def plot(rows, stem):
    """One PNG per mask kind: TFLOP/s and peak memory against length, one line per provider.

    A panel holds one series of cases that differ only in length (and batch, which keeps
    batch * length fixed). Returns the files written, or None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    files = []
    for mask in dict.fromkeys(r["mask"] for r in rows):
        series = {}
        for r in rows:
            if r["mask"] == mask:
                lq = "Lq=Lk" if r["len_q"] == r["len_k"] else f"Lq={r['len_q']}"
                heads = f"Hq={r['heads_q']} Hkv={r['heads_kv']}"
                series.setdefault(f"{r['mode']} {r['dtype']} {heads} D={r['head_dim']} {lq}", []).append(r)
        size = (11, 3.2 * len(series) + 0.6)
        fig, axes = plt.subplots(len(series), 2, figsize=size, squeeze=False)
        fig.suptitle(f"mask '{mask}': speed and peak memory against length")
        for (title, group), (ax_t, ax_m) in zip(series.items(), axes):
            # Decoding is bound by reading the cache: its speed is in GB/s.
            metric, label = ("gbps", "GB/s of K/V read") if group[0]["mode"] == DECODE else ("tflops", "TFLOP/s")
            for provider in dict.fromkeys(r["provider"] for r in group):
                ok = [r for r in group if r["provider"] == provider and r["ms"] is not None]
                xs = [r["len_k"] for r in ok]
                mem = [float("nan") if r["peak_mem_mb"] is None else r["peak_mem_mb"] for r in ok]
                ax_t.plot(xs, [r[metric] for r in ok], marker="o", label=provider)
                ax_m.plot(xs, mem, marker="o", label=provider)
            lengths = sorted({r["len_k"] for r in group})
            for ax, ylabel in ((ax_t, label), (ax_m, "peak memory (MB)")):
                ax.set_xscale("log", base=2)
                ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
                ax.minorticks_off()
                ax.set_xlabel("Lk")
                ax.set_ylabel(ylabel)
                ax.set_title(title, fontsize=9)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = Path(f"{stem}-{mask}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files

