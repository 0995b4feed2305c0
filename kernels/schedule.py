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
`Scores`.

A block mask (`attn_ops.BlockMask`) lists, for each block of rows, the blocks of the other axis
that are full and those that are partial: a pass walks the full ones, then the partial ones
(`listed_tiles`), each a loop of the same tile body (``KIND`` FULL_BLOCKS or PARTIAL_BLOCKS instead
of CONTIGUOUS; `tile_start` maps the loop's index to a tile), a block's tiles one after another.
Full blocks need no element-wise masking but the band's, partial ones read their bits
(`attn_common._block_bits`). Blocks the band cannot see are cut from the ends of each list. A
program that owns one tile of the other axis (the mask's gradient) finds its one block by
bisection (`listed_block`).
"""

import triton
import triton.language as tl

# How a tile loop's index maps to tiles (`tile_start`).
CONTIGUOUS = tl.constexpr(0)  # the index is the tile's first row
FULL_BLOCKS = tl.constexpr(1)  # the index counts the tiles of a block mask's full blocks
PARTIAL_BLOCKS = tl.constexpr(2)  # ... of its partial blocks, which read their bits
# A block mask's packed lists (`BlockMask.lists`) start with where each list starts in them: the
# lists by query block (ROWS), then by key block (COLS), five each in `BlockLists`' order.
ROWS = tl.constexpr(0)
COLS = tl.constexpr(5)


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


@triton.jit
def block_line(b, h, start, length, st, SW: tl.constexpr):
    """The line of a block mask's lists for batch b, head h and the block of rows (of `length`) that
    holds row `start`: its (batch, head) strides are 0 where it broadcasts (``st.blocks``)."""
    return (b * st.blocks[0] + h * st.blocks[1]) * tl.cdiv(length, SW.BLOCK_SIZE) + start // SW.BLOCK_SIZE


@triton.jit
def listed_tiles(Blocks, line, SIDE: tl.constexpr, KIND: tl.constexpr, band, BLOCK: tl.constexpr, SW: tl.constexpr):
    """The span of line `line`'s full or partial blocks (``KIND``) of a block mask's lists (`Blocks` =
    (lists, bits)) by query block (``SIDE`` ROWS) or key block (COLS): (first tile, stop tile, the
    blocks, their bits' indices, the bits), ``BLOCK_SIZE // BLOCK`` tiles of BLOCK rows per block.
    With ``SW.BANDED`` only the blocks that meet `band` = (lo, hi), the range of the other axis the
    band lets this line's rows see: a line's blocks are in increasing order, so the others are at
    its two ends."""
    first, stop, blocks, bit_ids, Bits = _line_entries(Blocks, line, SIDE, KIND)
    if SW.BANDED:
        lo, hi = band
        while (first < stop) & ((tl.load(blocks + first, mask=first < stop, other=0) + 1) * SW.BLOCK_SIZE <= lo):
            first += 1
        while (first < stop) & (tl.load(blocks + stop - 1, mask=first < stop, other=0) * SW.BLOCK_SIZE >= hi):
            stop -= 1
    per_block: tl.constexpr = SW.BLOCK_SIZE // BLOCK
    return first * per_block, stop * per_block, blocks, bit_ids, Bits


@triton.jit
def listed_block(Blocks, line, SIDE: tl.constexpr, KIND: tl.constexpr, block, BLOCK: tl.constexpr,
                 SW: tl.constexpr):
    """`listed_tiles`' span for one block of the other axis, `block`: its ``BLOCK_SIZE // BLOCK``
    tiles where line `line` lists it as ``KIND``, else none. Found by bisection (a line's blocks are
    in increasing order): a program that owns one tile of the other axis (the mask's gradient)
    reads a few entries, not the line."""
    first, stop, blocks, bit_ids, Bits = _line_entries(Blocks, line, SIDE, KIND)
    end = stop
    while first < stop:
        middle = (first + stop) // 2
        if tl.load(blocks + middle) < block:
            first = middle + 1
        else:
            stop = middle
    found = (first < end) & (tl.load(blocks + first, mask=first < end, other=-1) == block)
    per_block: tl.constexpr = SW.BLOCK_SIZE // BLOCK
    return first * per_block, (first + found.to(tl.int32)) * per_block, blocks, bit_ids, Bits


@triton.jit
def _line_entries(Blocks, line, SIDE: tl.constexpr, KIND: tl.constexpr):
    """(first, stop, the blocks, their bits' indices, the bits) of line `line`'s full or partial blocks
    (``KIND``) of a block mask's lists by query block (``SIDE`` ROWS) or key block (COLS)."""
    Lists, Bits = Blocks
    at = SIDE + 2 * (KIND - FULL_BLOCKS)
    offsets = Lists + tl.load(Lists + at)
    return (tl.load(offsets + line), tl.load(offsets + line + 1), Lists + tl.load(Lists + at + 1),
            Lists + tl.load(Lists + SIDE + 4), Bits)


@triton.jit
def tile_start(i, span, KIND: tl.constexpr, BLOCK: tl.constexpr, SW: tl.constexpr):
    """The first row of tile `i` of a tile loop over `span`: i itself (CONTIGUOUS), or tile ``i % per
    block`` of the listed block ``i // per block`` (`listed_tiles`)."""
    start = i
    if KIND != CONTIGUOUS:
        per_block: tl.constexpr = SW.BLOCK_SIZE // BLOCK
        block = i // per_block  # (and no `%`: the interpreter's int has none for a constexpr)
        start = tl.load(span[2] + block) * SW.BLOCK_SIZE + (i - block * per_block) * BLOCK
    return start
