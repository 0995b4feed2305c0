"""Which tiles a program visits, and which of them need element-wise masking: the one place every
pass asks (the forward, dQ, dK/dV, the mask's gradient and decoding).

Under the band (causal, window, the lengths) a block of rows sees one contiguous range of tiles of
the other axis, in three segments: the leading boundary tiles, the interior tiles that every row
sees in full (no element-wise band mask), the trailing boundary tiles; tiles outside the range are
dead and never touched. A pass asks for its block's `tiles` (`key_tiles` for a block of queries,
`query_tiles` for a block of keys), then loops over the segments (`segment`; ``EDGE`` is
``SEGMENT != 1``), each in its own tile loop. Decoding cuts the range into split-KV ranges of
whole tiles (`split_range`). Packed sequences first map each program to its sequence's rows
(`attn_varlen.tile_schedule`, on the device), then ask the same questions with that sequence's
`Scores`. A block-sparse mask's block lists are the next kind of schedule: they join here.
"""

import triton
import triton.language as tl


@triton.jit
def _visible_blocks(start, len_self, len_other, off_lo, off_hi, BLOCK_SELF: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """Blocks of the other axis that rows ``[start, start + BLOCK_SELF)`` of this axis can see.

    Row r sees other-axis index c iff ``r + off_lo <= c <= r + off_hi`` and ``c < len_other``.
    Returns ``lo <= full_lo <= full_hi <= hi``: tiles in ``[full_lo, full_hi)`` are visible to every
    row in full and need no element-wise band mask; ``[lo, full_lo)`` and ``[full_hi, hi)`` are
    boundary tiles; everything outside ``[lo, hi)`` is dead and never touched.
    """
    last = tl.minimum(start + BLOCK_SELF, len_self) - 1
    lo = tl.maximum(start + off_lo, 0) // BLOCK_OTHER * BLOCK_OTHER
    hi = tl.maximum(tl.minimum(last + off_hi + 1, len_other), lo)
    full_lo = tl.cdiv(tl.maximum(last + off_lo, 0), BLOCK_OTHER) * BLOCK_OTHER
    full_hi = tl.maximum(tl.minimum(start + off_hi + 1, len_other), 0) // BLOCK_OTHER * BLOCK_OTHER
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_tiles(start_m, len_rows, sc, SW: tl.constexpr):
    """The key tiles (lo, full_lo, full_hi, hi) the queries [start_m, start_m + BLOCK_M) see, the
    queries at or past `len_rows` left out (decoding's blocks hold fewer queries than rows)."""
    return _visible_blocks(start_m, len_rows, sc.len_k, sc.band_lo, sc.band_hi, SW.BLOCK_M, SW.BLOCK_N)


@triton.jit
def query_tiles(start_n, sc, SW: tl.constexpr):
    """The query tiles by which the keys [start_n, start_n + BLOCK_N) are seen: the same band, from
    the key side (query j - hi <= i <= j - lo sees key j)."""
    return _visible_blocks(start_n, sc.len_k, sc.len_q, -sc.band_hi, -sc.band_lo, SW.BLOCK_N, SW.BLOCK_M)


@triton.jit
def segment(SEGMENT: tl.constexpr, tiles):
    """The tile range of segment 0 (leading boundary tiles), 1 (interior tiles) or 2 (trailing
    boundary) of `tiles`."""
    lo, full_lo, full_hi, hi = tiles
    start, stop = lo, full_lo
    if SEGMENT == 1:
        start, stop = full_lo, full_hi
    if SEGMENT == 2:
        start, stop = full_hi, hi
    return start, stop


@triton.jit
def split_range(tiles, split, num_splits, BLOCK: tl.constexpr):
    """Split `split`'s part of the range of `tiles`: num_splits ranges of whole tiles of BLOCK."""
    lo, _, _, hi = tiles
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK) * BLOCK
    split_lo = lo + split * per_split
    return split_lo, tl.minimum(split_lo + per_split, hi)
