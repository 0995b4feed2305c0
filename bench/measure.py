"""How a row is measured: inputs, the timed step per mode, the timers, FLOPs, and error rows."""

import contextlib
import statistics
import time
import warnings

import torch

from attn_ops.band import diagonal_band
from bench.cases import CACHES, DECODE, VARLEN, varlen_lengths
from bench.masks import WINDOW, make_masking
from bench.providers import PACKED, Unsupported

FLOP_RULE = (
    "4*B*Hq*Lq*Lk*D fwd over the live part of the causal/window rule: /2 for 'causal', the visible "
    "band's fraction of Lq*Lk for 'window', the real causal pairs sum_b L_b*(L_b+1)/2 for 'varlen'; "
    "the other masks and the score modifiers count dense FLOPs; x2.5 bwd, x3.5 fwd_bwd. decode rows: "
    "gbps = K and V bytes of the cache read (2*B*Hkv*Lk*D*bytes) / time, bw_fraction = gbps / meta.copy_gbps"
)
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5, DECODE: 1.0}
COPY_BYTES = 2**28  # the copy decoding rows are measured against: 256 MiB read and written, far beyond any cache

DO_BENCH = {"warmup": 25, "rep": 100}  # milliseconds, as triton.testing.do_bench counts them
GPU_TIMER = (
    "triton.testing.do_bench median (warmup=25 ms, rep=100 ms, L2 flushed) after one warm-up call "
    "that compiles and autotunes, ms; peak_mem_mb: torch.cuda.max_memory_allocated during one "
    "more call after reset_peak_memory_stats (inputs and, for bwd, the saved forward included)"
)
CPU_REPS, CPU_BUDGET_S = (3, 6), 0.15  # at least 3 calls, more up to 6 while under 0.15 s
CPU_ROUNDS = 5  # the sweep times each case's providers in turn, this many times: drift hits all alike
CPU_TIMER = (
    f"median over {CPU_ROUNDS} rounds, the providers of a case timed in turn each round, of the "
    "time.perf_counter median of 3 to 6 calls after one warm-up call, ms; peak_mem_mb: growth of "
    "the process's peak RSS over those calls (VmHWM, reset through /proc/self/clear_refs, minus "
    "RSS before them): memory the allocator already held from earlier calls is not counted"
)
MAX_ERROR_CHARS = 200


def flops(case):
    dense = 4 * case.batch * case.heads_q * case.len_q * case.len_k * case.head_dim
    return dense * live_fraction(case) * MODE_FACTOR[case.mode]


def live_fraction(case):
    """The anchors' rule: causal counts half; a sliding window counts the (query, key) pairs it shows."""
    if case.mask == "causal":
        return 0.5
    if case.mask == VARLEN:
        lengths = varlen_lengths(case)
        return (lengths * (lengths + 1) // 2).sum().item() / (case.batch * case.len_q * case.len_k)
    if case.mask != "window":
        return 1.0
    lo, hi = diagonal_band(case.len_q, case.len_k, "top_left", (WINDOW, 0))
    i = torch.arange(case.len_q)
    visible = (torch.clamp(i + hi, max=case.len_k - 1) - torch.clamp(i + lo, min=0) + 1).clamp(min=0)
    return visible.sum().item() / (case.len_q * case.len_k)


def cache_bytes(case):
    """The K and V bytes a decoding step reads: every cached row of every kv head."""
    return 2 * case.batch * case.heads_kv * case.len_k * case.head_dim * getattr(torch, case.dtype).itemsize


def copy_bandwidth(device, timer):
    """GB/s (1e9) of a device-to-device copy of COPY_BYTES (read plus written), timed as the rows are."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    ms, _ = timer(lambda: target.copy_(source))
    return 2 * COPY_BYTES / ms / 1e6


def make_inputs(case, device):
    """Fresh randn q, k, v (never zeros: they hide unwritten outputs and can run faster)."""
    dtype = getattr(torch, case.dtype)
    grad = case.mode in ("bwd", "fwd_bwd")

    def t(heads, length):
        shape = (case.batch, heads, length, case.head_dim)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)

    return t(case.heads_q, case.len_q), t(case.heads_kv, case.len_k), t(case.heads_kv, case.len_k)


def timed_step(run, q, k, v, mode, learned):
    """The call to time for `mode`; autograd.grad, not .backward, so no .grad accumulates. The
    backward differentiates q, k, v and `learned` (a learned bias)."""
    if mode in ("fwd", DECODE):
        return run
    dout = torch.randn_like(q)  # out has q's shape (Dv = D)
    inputs = (q, k, v, *learned)
    if mode == "fwd_bwd":
        return lambda: torch.autograd.grad(run(), inputs, dout)
    out = run()  # bwd: one forward, then its backward again and again
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def time_gpu(step):
    """(median ms, peak MB) on CUDA."""
    from triton.testing import do_bench

    step()  # compilation and autotuning stay out of the numbers
    torch.cuda.synchronize()
    ms = do_bench(step, return_mode="median", **DO_BENCH)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() / 2**20


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_rss_growth():
    """Yields a dict whose "mb" is, on exit, how far the process's peak RSS rose above its RSS on
    entry (None where /proc has no peak to reset)."""
    result = {"mb": None}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM, the peak RSS, to the current RSS
        # Read after the reset, which VmHWM then equals: read before, a RSS that fell in between (memory
        # freed) gave a negative growth.
        rss = _status_kb("VmRSS")
    except OSError:
        rss = None
    yield result
    if rss is not None:
        # The kernel updates both counters lazily (each thread's RSS changes in batches of up to 64
        # pages): a growth within that slack can read as a fraction of a MB below zero, which is 0.
        result["mb"] = max(0.0, (_status_kb("VmHWM") - rss) / 1024)


def time_cpu(step):
    """(median ms, peak RSS growth MB, or None where /proc has no peak to reset)."""
    step()
    times = []
    with peak_rss_growth() as peak:
        while len(times) < CPU_REPS[0] or (len(times) < CPU_REPS[1] and sum(times) < CPU_BUDGET_S):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, peak["mb"]


def _round(x):
    return None if x is None else float(f"{x:.4g}")


def _describe(error, caught):
    """A short reason; SDPA says why it refused a backend only in warnings, so add those."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reasons = [str(w.message).strip() for w in caught if not str(w.message).strip().endswith(":")]
    if isinstance(error, Unsupported):
        text = f"unsupported: {text}"
    elif "No available kernel" in text or "No viable backend" in text:
        text = "unsupported: " + ("; ".join(dict.fromkeys(reasons)) or text)
    return text[:MAX_ERROR_CHARS]


def run_row(case, provider, prepare, q, k, v, masking, timer, copy_gbps=None):
    """One BENCH.md row: the numbers, or `ms: null` and why; a decoding row adds its bandwidth and,
    in `extra`, the cache's length and block size (null: dense)."""
    if masking.packed is not None and provider in PACKED:
        q, k, v = masking.packed[:3]
    row = {"provider": provider, **vars(case), "ms": None, "tflops": None, "peak_mem_mb": None, "error": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ms, peak_mb = timer(timed_step(prepare(q, k, v, masking), q, k, v, case.mode, masking.learned))
            tflops = flops(case) / ms / 1e9
            row.update(ms=_round(ms), tflops=_round(tflops), peak_mem_mb=_round(peak_mb))
            if case.mode == DECODE:
                gbps = cache_bytes(case) / ms / 1e6
                row.update(gbps=_round(gbps), bw_fraction=_round(gbps / copy_gbps))
        except Exception as e:  # any failure is this row's result, not the sweep's end
            row["error"] = _describe(e, caught)
    if case.mode == DECODE:
        row["extra"] = {"cache_len": case.len_k, "block_size": CACHES[case.mask] or None}
    if q.is_cuda:
        torch.cuda.empty_cache()  # a failed row's leftovers must not crowd the next
    return row


def sweep(cases, providers, device, progress):
    """(rows, copy GB/s or None): one row per (case, provider), and with decoding cases the copy
    bandwidth they are measured against. On the CPU, whose timings drift with whatever else the two
    cores do, each case's providers are timed in turn for CPU_ROUNDS rounds and each keeps its
    median round, so a slow moment cannot decide a ratio."""
    timer, rounds = (time_gpu, 1) if device == "cuda" else (time_cpu, CPU_ROUNDS)
    copy_gbps = copy_bandwidth(device, timer) if any(case.mode == DECODE for case in cases) else None
    rows = []
    for case in cases:
        q, k, v = make_inputs(case, device)
        masking = make_masking(case, device, q, k, v)
        tries = {name: [] for name in providers}
        for _ in range(rounds):
            for name, prepare in providers.items():
                progress.step(f"{name} {label(case)}")
                tries[name].append(run_row(case, name, prepare, q, k, v, masking, timer, copy_gbps))
        rows.extend(_median_row(rows_of_one) for rows_of_one in tries.values())
    progress.close()
    return rows, copy_gbps


def _median_row(rows):
    """The row of the median time, or a failed row where any round failed."""
    failed = [r for r in rows if r["ms"] is None]
    return failed[0] if failed else sorted(rows, key=lambda r: r["ms"])[len(rows) // 2]


def label(case):
    heads = f"H{case.heads_q}" + (f"/{case.heads_kv}" if case.heads_kv != case.heads_q else "")
    length = f"L{case.len_q}" + (f"x{case.len_k}" if case.len_k != case.len_q else "")
    return f"{case.mode} {case.dtype} B{case.batch} {heads} {length} D{case.head_dim} {case.mask}"
