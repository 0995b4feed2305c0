"""GPU speed regression cases for attn_ops, for pytest-benchmark: `pytest bench/` (add
`--benchmark-autosave` to keep a run, `--benchmark-compare` to compare with the last kept one).

pytest-benchmark times whole rounds on the host clock, so each timed call runs ITERATIONS steps
and ends with a synchronize; the do_bench median of one step goes into extra_info beside it.
Without CUDA the whole module is skipped.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA GPU", allow_module_level=True)

# Imported after the skips, so a CPU-only run never even loads the kernels.
from bench.cases import MODIFIERS, self_attention  # noqa: E402
from bench.masks import make_masking  # noqa: E402
from bench.measure import flops, label, make_inputs, time_gpu, timed_step  # noqa: E402
from bench.providers import GPU_PROVIDERS  # noqa: E402

CASES = (
    self_attention((2048,), (64, 128), ("none", "causal"), ("fwd", "fwd_bwd"))
    + self_attention((2048,), (128,), MODIFIERS, ("fwd_bwd",))
)
ITERATIONS = 10


@pytest.mark.parametrize("case", CASES, ids=lambda c: label(c).replace(" ", "-"))
def test_attn_ops_speed(benchmark, case):
    q, k, v = make_inputs(case, "cuda")
    masking = make_masking(case, "cuda")
    step = timed_step(GPU_PROVIDERS["attn_ops"](q, k, v, masking), q, k, v, case.mode, masking.learned)
    ms, peak_mb = time_gpu(step)  # also the warm-up: compilation and autotuning happen here

    def steps():
        for _ in range(ITERATIONS):
            step()
        torch.cuda.synchronize()

    benchmark.pedantic(steps, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(
        do_bench_median_ms=ms, tflops=flops(case) / ms / 1e9, peak_mem_mb=peak_mb, steps_per_round=ITERATIONS,
    )
