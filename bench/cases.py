"""The benchmark cases, as plain data: one `Case` per table row (times one row per provider).

GPU shapes follow the FlashAttention papers: batch * length = 16k tokens and heads * head_dim =
2048, so every length does about the same work per token and the GPU stays full.
"""

from dataclasses import dataclass

import torch

MASKS = ("none", "causal", "padding", "random_bool", "window", "block_sparse")
# Sparse patterns for long sequences (issue 24; `block_sparse` too): attn_ops takes each as a
# `BlockMask` built from the mask_mod FlexAttention's create_block_mask reads (both outside the
# timed call), SDPA as the dense mask, and the provider `attn_ops_dense_mask` as a dense `mask=`.
# `document`: packed documents of random lengths, causal; `sliding_window`: causal, 4k keys;
# `prefix_lm`: a bidirectional prefix of L / 4, causal after it; `bigbird`: the first block global,
# a window of three blocks, three random blocks per row of blocks; `block_sparse_eighth`: as
# `block_sparse`, an eighth of the blocks kept.
SPARSE = ("document", "sliding_window", "prefix_lm", "bigbird", "block_sparse_eighth")
# Score modifiers over full attention (issue 13). They fill the `mask` column, a row key, like the
# masks: `bias` is a float [1, Hq, Lq, Lk] additive mask, `bias_grad` the same bias learned (it
# requires grad, and the backward computes its gradient).
MODIFIERS = ("alibi", "softcap", "bias", "bias_grad")
# What each modifier is timed against: the same shape without it. GPU targets for attn_ops: alibi
# and softcap within 1.1x of `none`; bias_grad's backward within 1.5x of `bias`'s.
PLAIN = {"alibi": "none", "softcap": "none", "bias": "none", "bias_grad": "bias"}
# Packed variable-length batches (issue 12): `batch` sequences whose lengths (`varlen_lengths`) are
# drawn from a long-tailed distribution of mean ~len_q / 3, causal within each sequence. attn_ops
# and flash_attn run them packed; the others (and "attn_ops_padded") padded to len_q with a key
# padding mask. FLOPs count real (query, key) pairs only.
VARLEN = "varlen"
# Decoding against a KV cache (issue 11), mode "decode": one new query per sequence (Lq = 1) against
# len_k cached tokens each, through attn_ops.attention_with_kvcache; the mask names the cache's
# layout: dense, or paged in blocks of 16 or 256 rows (shuffled). Timed as K/V bytes read per second.
DECODE = "decode"
CACHES = {"kvcache": 0, "kvcache_paged16": 16, "kvcache_paged256": 256}  # mask -> block size (0: dense)
ATTENTION_MODES = ("fwd", "bwd", "fwd_bwd")  # the modes of every case but decoding's
MODES = ATTENTION_MODES + (DECODE,)


@dataclass(frozen=True)
class Case:
    # Field names and order are BENCH.md's row keys.
    mode: str  # one of MODES
    dtype: str  # a torch dtype name: bfloat16, float16, float32
    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    mask: str  # one of MASKS, MODIFIERS, VARLEN or CACHES


def varlen_lengths(case):
    """The case's sequence lengths, the same in every run: exponential of mean len_q / 3, clipped to
    [1, len_q] (most sequences short, a few long: a padded batch is ~70% padding)."""
    gen = torch.Generator().manual_seed(case.batch * 100003 + case.len_q)
    lengths = torch.empty(case.batch).exponential_(3.0 / case.len_q, generator=gen)
    return lengths.ceil().clamp(1, case.len_q).to(torch.int64)


def varlen(max_lengths, modes, dtype="bfloat16", head_dim=128, tokens=16384, width=2048):
    """Packed-batch cases: ~`tokens` real tokens per batch (3 * tokens / max sequences)."""
    return [Case(mode, dtype, 3 * tokens // n, width // head_dim, width // head_dim, n, n, head_dim, VARLEN)
            for mode in modes for n in max_lengths]


def decode(batches, lengths, caches=tuple(CACHES), dtype="bfloat16", heads=(32, 8), head_dim=128):
    """Decoding steps: B sequences of one query (Hq / Hkv query / kv heads) against caches of each length."""
    return [Case(DECODE, dtype, b, *heads, 1, n, head_dim, cache) for cache in caches for b in batches for n in lengths]


def self_attention(lengths, head_dims, masks, modes, dtype="bfloat16", group=1, tokens=16384, width=2048):
    """Lq = Lk cases; `group` = Hq / Hkv (GQA)."""
    return [
        Case(mode, dtype, tokens // n, width // d, width // d // group, n, n, d, mask)
        for mask in masks
        for mode in modes
        for d in head_dims
        for n in lengths
    ]


LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# The learned bias is an input of every provider, [1, 16, L, L]: 2 GiB of bf16 at 8k (and its
# gradient as much again). ALiBi and softcap need no tensor but in SDPA's rows, so they go to 16k.
BIAS_LENGTHS = (1024, 4096, 8192)

GPU_SWEEP = (
    self_attention(LENGTHS, (64, 128), MASKS, ATTENTION_MODES)
    + self_attention(LENGTHS, (256,), ("none", "causal"), ATTENTION_MODES)
    # Gemma 4's global layers: D = 512 (FlashAttention and SDPA's flash backend stop at 256).
    + self_attention(LENGTHS[1:], (512,), ("causal",), ATTENTION_MODES)
    + self_attention(LENGTHS, (128,), ("none", "causal"), ATTENTION_MODES, dtype="float16")
    + self_attention((2048,), (64,), ("none",), ("fwd",), dtype="float32")
    + self_attention(LENGTHS, (128,), ("none", "causal"), ATTENTION_MODES, group=4)
    + self_attention((1024, 4096, 16384), (128,), ("alibi", "softcap"), ("fwd", "fwd_bwd"))
    # bwd too, for the backward's target; bias_grad's forward would be bias's.
    + self_attention(BIAS_LENGTHS, (128,), ("bias",), ATTENTION_MODES)
    + self_attention(BIAS_LENGTHS, (128,), ("bias_grad",), ("bwd", "fwd_bwd"))
    + varlen((2048, 4096, 8192), ATTENTION_MODES)
    # Cross attention: 1k queries against longer keys (e.g. an encoder's output).
    + [
        Case(mode, "bfloat16", 16384 // n, 16, 16, 1024, n, 128, mask)
        for mask in ("none", "padding")
        for mode in ("fwd", "fwd_bwd")
        for n in LENGTHS[2:]
    ]
    # Decoding: one new query per sequence against a long KV cache, GQA as in current LLMs.
    + decode((1, 8, 32), (1024, 4096, 16384, 65536, 131072))
    + decode((1, 8), (16384,), ("kvcache",), head_dim=512)
    # Sparse patterns at one sequence of 32k tokens in all (B = 8 at 4k ... 1 at 32k).
    + self_attention((4096, 8192, 16384, 32768), (128,), SPARSE + ("block_sparse",), ("fwd", "fwd_bwd"),
                     tokens=32768)
)

GPU_QUICK = (self_attention((1024, 4096), (128,), MASKS, ("fwd", "fwd_bwd")) + varlen((4096,), ("fwd", "fwd_bwd"))
             + decode((1, 8), (16384,), ("kvcache", "kvcache_paged16")))

# Sized to finish in about 2 minutes on 2 cores, demo included (2026-12-02: 2 min 7 s wall, 3.1 CPU-minutes
# of user time; a machine with more cores spends more CPU time on the same work).
CPU_CASES = (
    self_attention((256, 512, 1024, 2048), (64,), ("none", "causal", "padding"), ("fwd",),
                   dtype="float32", tokens=2048, width=512)
    + self_attention((256, 512, 1024, 2048), (64,), ("none", "causal", "padding"), ("fwd",),
                     dtype="bfloat16", tokens=2048, width=512)
    + self_attention((256, 1024), (64,), ("none", "causal"), ("fwd_bwd",),
                     dtype="float32", tokens=2048, width=512)
    + self_attention((256,), (64,), MODIFIERS, ("fwd_bwd",), dtype="float32", tokens=2048, width=512)
    + varlen((512,), ("fwd_bwd",), dtype="float32", head_dim=64, tokens=2048, width=512)
    + decode((4,), (1024, 8192), ("kvcache", "kvcache_paged16"), dtype="float32", heads=(8, 2), head_dim=64)
)

# The headline a GPU session measures first (`python -m bench.headline`, run by `.ci/gpu.sh`): forward
# and backward at bf16, D = 128, 4k to 16k, causal and not; decoding at 16k; one masked case; then
# causal at D = 256 and 512 (Gemma 4's global layers), 4k and 16k, and decoding at 512.
HEADLINE = (self_attention((4096, 8192, 16384), (128,), ("none", "causal"), ("fwd", "bwd"))
            + decode((1, 8), (16384,), ("kvcache", "kvcache_paged16"))
            + self_attention((4096,), (128,), ("padding",), ("fwd", "bwd"))
            + self_attention((4096, 16384), (256, 512), ("causal",), ("fwd", "bwd"))
            + decode((8,), (16384,), ("kvcache",), head_dim=512))
# The same kinds of rows at toy sizes, for the script's CPU dry run.
HEADLINE_DRY = (self_attention((128,), (64,), ("none", "causal", "padding"), ("fwd", "bwd"), dtype="float32",
                               tokens=256, width=128)
                + decode((2,), (256,), ("kvcache",), dtype="float32", heads=(4, 2), head_dim=64))
