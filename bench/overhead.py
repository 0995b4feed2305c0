"""`python -m bench.overhead`: the host CPU's microseconds per call of each entry point, the kernel
launches stubbed out, beside a tiny `torch.nn.functional.scaled_dot_product_attention` call timed in
the same run. That call is the unit of the targets: a forward within 5x of it, a decoding step (with
its append) within 5x, a forward+backward within 15x. Wall-clock times are reported beside them.

What is timed is everything the host does per call (argument checks, dispatch, autograd, the custom
ops where a call goes through them, allocations, the launchers' own work) up to each
``kernel[grid](...)``, which returns at
once (`stubbed_launches`). Without a GPU the tensors are on the CPU and the kernels are Triton
InterpretedFunctions (TRITON_INTERPRET=1, set here before triton is imported); on CUDA they are
JITFunctions. What the stub leaves out:

- on CUDA, `JITFunction.run`: binding the arguments and computing their specialisation key, the
  compiled-kernel cache lookup and the driver's launch. That is Triton's own cost per launch, which
  the launchers can only reduce by launching less (the ``launches`` column counts them);
- under the interpreter, the kernel's execution (numpy on CPU tensors), which is no host overhead.

What a CPU run cannot show: the torch ops on the path (allocations, small element-wise ops, the
append's indexed write) do their work on the CPU where CUDA would only queue it, and a host read of
tensor values (``.item()``, ``.tolist()``) costs a copy here where on CUDA it also waits for the GPU
(tests/test_host_path.py makes those reads fail). So that the CPU's share stays small, a CPU run uses
one intra-op thread and keeps freed memory for reuse, as CUDA's caching allocator does (`main`).
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import gc
import os
import platform
import statistics
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple

import torch

# Without a GPU the kernels run in Triton's interpreter, which must be chosen before triton is first
# imported (as tests/conftest.py does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import attn_ops  # noqa: E402
import attn_ops.hf  # noqa: E402
from bench import report  # noqa: E402

WARMUP_CALLS = 5
BATCH_S = 0.01  # each timed interval runs calls back to back for about this long...
MAX_BATCH = 200  # ...but no more calls than this: on CUDA a longer run of tiny calls could fill the launch queue
ROUNDS = 101
TIMER = (f"per row, the median over {ROUNDS} rounds of the time around a batch of back-to-back calls (as many as "
         f"fit in about {BATCH_S * 1e3:.0f} ms, at most {MAX_BATCH}) divided by the batch's size, us: host CPU, "
         "time.thread_time_ns (the calling thread's CPU time, which the ratios and verdicts use: it leaves out what "
         "other processes take from this one on a shared machine), and wall, time.perf_counter_ns; every row timed "
         f"in turn each round, after {WARMUP_CALLS} warm-up calls; garbage collection off inside a batch (as "
         "timeit), the device synchronized between batches; on the CPU one intra-op thread and freed memory kept "
         "for reuse (mallopt); kernel launches stubbed out (bench/overhead.py's docstring says what that leaves out)")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
# Target ratios to the tiny SDPA call, from the issue; rows without one are reported only.
TARGETS = {"attention_fwd": 5, "attention_fwd_grad": 5, "attention_fwd_bwd": 15, "kvcache_decode": 5}


@contextlib.contextmanager
def stubbed_launches():
    """Inside, every ``kernel[grid](...)`` of a @triton.jit kernel returns without running it (nor,
    on CUDA, binding, compiling or launching it): the launchers do all their own host work and the
    kernels none. Yields the list of the kernels' names in launch order."""
    from attn_ops.kernels.config import INTERPRETED  # imports triton: after TRITON_INTERPRET is settled
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernel_class = InterpretedFunction if INTERPRETED else JITFunction
    launched = []

    def launch(kernel, *args, grid, warmup, **kwargs):
        launched.append(kernel.fn.__name__)

    real_run = kernel_class.run
    kernel_class.run = launch
    try:
        yield launched
    finally:
        kernel_class.run = real_run


class Step(NamedTuple):
    what: str
    call: Callable
    grad: bool  # grad mode on; else torch.no_grad(), entered around a batch (not paid per call)


def keep_freed_memory():
    """Makes glibc's malloc, torch's CPU allocator, keep freed blocks for reuse as CUDA's caching
    allocator does: by default it returns large ones to the OS, and every call then faults fresh
    pages in (hundreds of microseconds per call here, varying with what the other rows freed). No-op
    without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(M_MMAP_MAX, 0)  # no block of its own mapping, unmapped when freed
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the heap's free top is never given back
    except (OSError, AttributeError):
        pass


class BareFunction(torch.autograd.Function):
    """What any differentiable op written in Python pays before doing anything (the floor of the
    autograd rows): allocates the output and its LSE and saves them with q, k, v; the backward
    allocates the three gradients. No checks, no launches. An unused LSE gets no gradient of zeros
    (`set_materialize_grads(False)`, as attn_ops's Function): with them the floor would rise by a fill
    of the LSE's size per backward (15 to 27 us here, a kernel launch on CUDA)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def steps(device):
    """{name: Step}: the tiny SDPA unit, then each entry point through the kernels. The inputs'
    values are never read (the kernels do not run), so they are left uninitialised, except the
    sequence lengths, which the host checks and the append indexes with."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    tiny = [torch.randn(1, 1, 1, 8, device=device) for _ in range(3)]

    q, k, v = (torch.empty(2, 16, 2048, 128, **bf16) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.empty_like(q)

    def forward_backward():
        out = attn_ops.attention(*leaves, causal=True, backend="triton")
        torch.autograd.grad(out, leaves, grad)  # not .backward: nothing accumulates into .grad

    def bare_forward_backward():
        out, _ = BareFunction.apply(*leaves)
        torch.autograd.grad(out, leaves, grad)

    lengths = torch.tensor([1024, 512, 384, 128], dtype=torch.int32, device=device)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    packed = [torch.empty(2048, 16, 128, **bf16) for _ in range(3)]

    k_cache, v_cache = (torch.empty(4, 8, 16384, 128, **bf16) for _ in range(2))
    query, k_new, v_new = torch.empty(4, 32, 1, 128, **bf16), *(torch.empty(4, 8, 1, 128, **bf16) for _ in range(2))
    cache_seqlens = torch.tensor([16000, 9000, 3, 12345], dtype=torch.int32, device=device)

    # A decoding step of a Llama-shaped layer as transformers calls its attention function with a
    # dynamic cache and no padding: the layer's keys so far, no mask, the step's position ids. The
    # function has no backend argument: `main` runs every row inside use_backend("triton").
    layer = types.SimpleNamespace(is_causal=True)
    keys, values = (torch.empty(4, 8, 4096, 128, **bf16) for _ in range(2))
    position_ids = torch.full((4, 1), 4095, device=device)

    return {
        "sdpa_tiny": Step("torch SDPA (the unit), q/k/v [1, 1, 1, 8] fp32",
                          lambda: F.scaled_dot_product_attention(*tiny), grad=False),
        "attention_fwd": Step("attention fwd, bf16 B2 H16 L2048 D128 causal",
                              lambda: attn_ops.attention(q, k, v, causal=True, backend="triton"), grad=False),
        "attention_fwd_grad": Step("attention fwd, the same with q/k/v requiring grad (forward only)",
                                   lambda: attn_ops.attention(*leaves, causal=True, backend="triton"), grad=True),
        "attention_fwd_bwd": Step("attention fwd+bwd, the same, autograd.grad with a preallocated grad",
                                  forward_backward, grad=True),
        "bare_function_fwd_grad": Step("a bare autograd.Function's forward (BareFunction: torch's floor for the "
                                       "two rows above), the same q/k/v",
                                       lambda: BareFunction.apply(*leaves), grad=True),
        "bare_function_fwd_bwd": Step("a bare autograd.Function's forward+backward, the same, autograd.grad",
                                      bare_forward_backward, grad=True),
        "varlen_fwd": Step("varlen_attention fwd, bf16 4 sequences (1024, 512, 384, 128) H16 D128 causal",
                           lambda: attn_ops.varlen_attention(*packed, cu_seqlens, cu_seqlens, causal=True,
                                                             backend="triton"), grad=False),
        "kvcache_decode": Step("attention_with_kvcache decoding step with append, bf16 B4 Hq32 Hkv8 D128, cache "
                               "16384, Lq 1, int32 tensor cache_seqlens",
                               lambda: attn_ops.attention_with_kvcache(query, k_cache, v_cache, cache_seqlens,
                                                                       k_new=k_new, v_new=v_new, causal=True,
                                                                       backend="triton"), grad=False),
        "hf_decode_layer": Step("Hugging Face attention function, decoding step: bf16 query [4, 32, 1, 128], "
                                "key/value [4, 8, 4096, 128], no mask",
                                lambda: attn_ops.hf.attention_forward(layer, query, keys, values, None, dropout=0.0,
                                                                      scaling=128**-0.5, position_ids=position_ids),
                                grad=False),
    }


def time_rows(named_steps, device):
    """{name: (host CPU us, wall us) per call}: the rows timed in turn each round, so that drift hits all
    of them alike."""
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    batches = {}
    for name, step in named_steps.items():
        with torch.set_grad_enabled(step.grad):
            start = time.perf_counter()
            for _ in range(WARMUP_CALLS):
                step.call()
            synchronize()
            per_call = (time.perf_counter() - start) / WARMUP_CALLS
        batches[name] = max(1, min(MAX_BATCH, round(BATCH_S / per_call)))
    samples = {name: ([], []) for name in named_steps}
    for _ in range(ROUNDS):
        for name, step in named_steps.items():
            calls = range(batches[name])
            with torch.set_grad_enabled(step.grad):
                gc.disable()
                cpu_start, wall_start = time.thread_time_ns(), time.perf_counter_ns()
                for _ in calls:
                    step.call()
                wall, cpu = time.perf_counter_ns() - wall_start, time.thread_time_ns() - cpu_start
                gc.enable()
            synchronize()
            for times, elapsed in zip(samples[name], (cpu, wall)):
                times.append(elapsed / len(calls) / 1e3)
    return {name: tuple(statistics.median(times) for times in both) for name, both in samples.items()}


def rows(named_steps, micros, launches):
    unit = micros["sdpa_tiny"][0]
    result = []
    for name, step in named_steps.items():
        (cpu_us, wall_us), target = micros[name], TARGETS.get(name)
        ratio = cpu_us / unit
        what = step.what if step.grad else f"{step.what}, no_grad"
        result.append({"name": name, "what": what, "cpu_us": round(cpu_us, 2), "ratio": round(ratio, 2),
                       "target": target, "passed": None if target is None else ratio <= target,
                       "wall_us": round(wall_us, 2), "launches": launches[name]})
    return result


def markdown(meta, table_rows):
    lines = [f"# Host overhead per call, kernel launches stubbed: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, git {meta['git']}, "
             f"{meta['date']}", "", f"Timer: {meta['timer']}", "",
             "| row | what | host CPU us | x tiny SDPA | target | | wall us | launches |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table_rows:
        target = "" if row["target"] is None else f"<= {row['target']}x"
        verdict = {None: "", True: "pass", False: "FAIL"}[row["passed"]]
        lines.append(f"| {row['name']} | {row['what']} | {row['cpu_us']:.1f} | {row['ratio']:.2f}x | {target} | "
                     f"{verdict} | {row['wall_us']:.1f} | {row['launches']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out",
                   help="where the Markdown (and, without --json, the JSON) goes (default: bench/out/)")
    p.add_argument("--json", type=Path, help="write the JSON here instead of into --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The path's small tensor ops (an LSE rescale, the append's indexed write) run here instead of
        # on a GPU; spread over OpenMP threads they wait for each other, for milliseconds on a shared
        # machine: no host overhead of a GPU call.
        torch.set_num_threads(1)
        keep_freed_memory()
    named_steps = steps(device)
    launches = {}
    with stubbed_launches() as launched, attn_ops.use_backend("triton"):
        for name, step in named_steps.items():
            before = len(launched)
            with torch.set_grad_enabled(step.grad):
                step.call()
            launches[name] = len(launched) - before
        micros = time_rows(named_steps, device)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {key: value for key, value in report.meta(device, TIMER, now).items()
            if key not in ("flop_rule", "copy_gbps")}  # the sweep's: no FLOPs or bandwidth here
    meta["python"] = platform.python_version()
    table_rows = rows(named_steps, micros, launches)
    table = markdown(meta, table_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / report.file_stem(device, "overhead", now)
    json_path = args.json or Path(f"{stem}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(json_path, meta, table_rows)
    Path(f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {json_path}, {stem}.md")


if __name__ == "__main__":
    main()
