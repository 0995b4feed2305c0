"""The benchmark tables (`bench.report`): a column for every provider that ran something, and packed
batches apart with their speedup over the padded batch."""

from bench import report
from bench.cases import VARLEN, Case

META = dict(device="cpu", torch="t", triton="t", cuda=None, git="g", date="d", timer="timer", flop_rule="rule")


def _row(provider, case, tflops):
    error = None if tflops else "unsupported: only packed batches"
    return {"provider": provider, **vars(case), "ms": tflops and 1.0 / tflops, "tflops": tflops,
            "peak_mem_mb": 1.0, "error": error}


def test_packed_batches_get_their_own_table_and_no_column_is_only_n_a():
    dense, packed = (Case("fwd", "float32", 2, 2, 2, 256, 256, 64, mask) for mask in ("none", VARLEN))
    rows = [_row("attn_ops", dense, 2.0), _row("attn_ops_padded", dense, None), _row("sdpa_math", dense, 4.0),
            _row("attn_ops", packed, 3.0), _row("attn_ops_padded", packed, 1.5), _row("sdpa_math", packed, 1.0)]
    main, packed_part = report.markdown(META, rows).split("## Packed variable-length batches")
    assert "attn_ops_padded" not in main and "n/a" not in main.split("\n\n")[2]
    assert "| none | 2 | 4 | 0.5x | 0.5x |" in main
    assert "attn_ops speedup over attn_ops_padded" in packed_part
    assert f"| {VARLEN} | 3 | 1.5 | 1 | 3x | 3x | 2x |" in packed_part


def test_every_case_of_the_gpu_runs_is_one_the_drivers_can_prepare():
    """A decoding row needs a cache layout as its mask and one query; any other row a mask or pattern
    the drivers build (a decoding mode on a self-attention case raised KeyError mid-sweep)."""
    from bench.cases import CACHES, DECODE, GPU_QUICK, GPU_SWEEP, HEADLINE, MASKS, MODIFIERS, SPARSE

    attention_masks = set(MASKS) | set(MODIFIERS) | set(SPARSE) | {VARLEN}
    for case in GPU_SWEEP + GPU_QUICK + HEADLINE:
        if case.mode == DECODE:
            assert case.mask in CACHES and case.len_q == 1, case
        else:
            assert case.mask in attention_masks, case
