"""Triton helpers shared by the forward and backward passes, so both see the same scores.

Scores live in the log2 domain: ``s = q.k * scale * log2(e) (+ mask * log2(e))`` and ``exp2(s)``
replaces ``exp`` (exp2 is the hardware instruction; exp costs an extra multiply).
"""

import triton
import triton.language as tl

from .bundles import Scores
from .config import ADD_MASK, BOOL_MASK, INTERPRETED, NO_MASK

# Globals a kernel reads must be tl.constexpr instances (compiled Triton rejects plain globals).
LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln(2)
FLOAT_MIN = tl.constexpr(-3.4028234663852886e38)
RUN_BY_INTERPRETER = tl.constexpr(INTERPRETED)


@triton.jit
def _program_block(length, num_heads, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr = False):
    """This program's (batch * heads + head, batch, head, first row) on a flat grid, blocks fastest
    (``LAST_FIRST``: each head's last block first).

    One flat axis keeps batch * heads clear of the 65535 limit of grid axes 1 and 2. Query blocks go
    last first: under a causal band the last ones see the most keys, and the GPU starts programs
    roughly in order, so the heaviest start first and the last wave holds the lightest.
    """
    num_blocks = tl.cdiv(length, BLOCK)
    pid = tl.program_id(0)
    head_index = pid // num_blocks
    b = (head_index // num_heads).to(tl.int64)
    h = (head_index % num_heads).to(tl.int64)
    block = pid % num_blocks
    if LAST_FIRST:
        block = num_blocks - 1 - block
    return head_index, b, h, block * BLOCK


@triton.jit
def _head_rows(X, b, h, strides):
    """Where the rows of (batch b, head h) of a [B, H, L, D] tensor start, from its `Strides` entry
    (`_load_rows` reads a tile of them, or of a packed sequence, or of a paged cache)."""
    return X + b * strides[0] + h * strides[1]


@triton.jit
def _row_stats(Stats, head_index, len_q):
    """Where the per-row statistics (LSE, delta) of one (batch, query head) start: [B * Hq, Lq] rows."""
    return Stats + head_index.to(tl.int64) * len_q


@triton.jit
def _shifted_scores(sc, len_q, len_k, shift):
    """The `Scores` of one sequence of a packed batch or a KV cache: its own lengths, and the band and
    ALiBi's diagonal moved by its shift (the launch's band is relative to each sequence's diagonal)."""
    return Scores(len_q, len_k, sc.band_lo + shift, sc.band_hi + shift, shift, sc.qk_scale, sc.softcap_log2,
                  sc.dropout_p, sc.dropout_scale, sc.scale)


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr):
    """a @ b, accumulated in float32.

    The interpreter runs tl.dot as numpy's matmul, whose summation order depends on the CPU's BLAS
    kernel and on which operand is which: the dK/dV pass's transposed scores ``k @ q^T`` then
    differ from the forward's ``q @ k^T`` in the last bits, and at scores of ~1e4 (log2 units) that
    moves ``exp2(s - lse)`` by percents (AVX2 vs AVX-512 BLAS gave different gradients). The GPU's
    matmuls sum the same exact products in an order fixed by the reduction index, whichever operand
    is A. So the interpreter sums in float64 (every product of two fp32, fp16 or bf16 values is
    exact there) and rounds once to float32: the orders' differences stay far below float32's
    rounding, so every pass gets the same scores on every CPU (but for ties of ~1e-9 odds). It also
    spares its bf16 dot, which multiplies the raw bits.
    """
    if RUN_BY_INTERPRETER:
        return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _rounded(x, INTERPRETED_BF16: tl.constexpr):
    """x, ready for a cast to bf16 that rounds to nearest even, as the GPU's does.

    The interpreter truncates fp32 -> bf16 casts; rounding the fp32 bits first makes its truncation
    exact. Ties go to the even 16-bit result: add 0x7FFF plus the lowest kept bit, then cut.
    """
    if INTERPRETED_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _alibi_log2(Alibi, b, h, strides, ALIBI: tl.constexpr):
    """ALiBi's slope of (batch b, query head h) in log2-domain units (0 without ALiBi); `strides`:
    the slopes' (batch, head)."""
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * strides[0] + h * strides[1]) * LOG2E
    return slope


@triton.jit
def _masked_scores(q, k_t, offs_m, offs_n, mask_ptrs, alibi_log2, sc, EDGE: tl.constexpr, SW: tl.constexpr,
                   TRANSPOSED: tl.constexpr = False, seen=None):
    """(s, the derivative of the modified score by the scaled one (``SW.MODIFIER``'s: ``1 - tanh**2``
    under a cap, 1.0 without), unit) of one [BLOCK_M, BLOCK_N] tile of the `Scores` `sc`: ``s * unit``
    are its log2-domain scores, -inf where a key is not visible. ``EDGE``: the tile may hold keys
    outside the band (the element-wise band mask runs). ``TRANSPOSED``: `q` holds keys and `k_t`
    queries (the dK/dV pass's [keys, queries] tiles, `offs_m` the keys): the band and ALiBi are seen
    from the key side (query - key in [-hi, -lo], the same distances). The score modifier
    (`kernels.modifiers`) runs on the scaled scores, before the mask and the band. ``seen``: None,
    or a partial block's bits for the tile (`_block_bits`: int32, not 0 where a key is seen).

    Plain scores (no cap, ALiBi or float mask) stay unscaled, ``unit = qk_scale``: the caller folds
    the scale into its exp2's argument, one FMA per score (``s * unit - max``) instead of a multiply
    and a subtract. The others need them scaled first: ``unit = 1``. The scale is positive (callers
    run any other on -q or on zeros: attn_ops's `kernel_operands`), so the running max of
    ``s * unit`` is ``max(s) * unit``.
    """
    len_r, len_c, band_lo, band_hi, shift = sc.len_q, sc.len_k, sc.band_lo, sc.band_hi, sc.diagonal_shift
    if TRANSPOSED:
        len_r, len_c, band_lo, band_hi, shift = sc.len_k, sc.len_q, -sc.band_hi, -sc.band_lo, -sc.diagonal_shift
    s = _dot(q, k_t, SW.INPUT_PRECISION)
    unit = sc.qk_scale
    if SW.SOFTCAP or SW.ALIBI or SW.MASK_KIND == ADD_MASK:
        s *= sc.qk_scale
        unit = 1.0
    s, cap_slope = SW.MODIFIER(s, offs_m + shift, offs_n, alibi_log2, sc)
    if SW.MASK_KIND != NO_MASK:
        in_bounds = offs_m[:, None] < len_r
        if EDGE or TRANSPOSED or seen is not None:
            in_bounds = in_bounds & (offs_n[None, :] < len_c)
        # Else every key of the tile is below len_k (an interior tile, or a full block): a bound that
        # is the same along the keys lets a row's contiguous mask bytes load together, not one by one.
        m = tl.load(mask_ptrs, mask=in_bounds, other=0)
        if SW.MASK_KIND == BOOL_MASK:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            m = m.to(tl.float32)
            # A finite mask (e.g. finfo.min) must stay finite after * log2(e), as plain addition
            # would; only -inf masks.
            s = tl.where(m == float("-inf"), float("-inf"), tl.maximum(s + m * LOG2E, FLOAT_MIN))
    if seen is not None:
        s = _seen_only(s, seen)
    if EDGE:
        rel = offs_n[None, :] - offs_m[:, None]
        visible = (rel >= band_lo) & (rel <= band_hi) & (offs_n[None, :] < len_c)
        s = tl.where(visible, s, float("-inf"))
    return s, cap_slope, unit


@triton.jit
def _seen_only(s, seen):
    """`s` where `seen` (a partial block's bits, `_block_bits`) is not 0, -inf elsewhere. Compiled, a
    select on a predicate per score, which ptxas fuses with the bit test into a LOP3 that writes the
    predicate, then an FSEL: two instructions per score. The same written as ``tl.where(seen != 0,
    ...)`` makes LLVM pack the bool tile into bitfields and unpack it (sm_90, bf16 D = 128: the
    forward's partial-block loop 205.5 SASS per MFLOP, against 158.1), so the select is inline PTX,
    which LLVM does not look into; the interpreter, which runs no PTX, takes `tl.where`."""
    if RUN_BY_INTERPRETER:
        return tl.where(seen != 0, s, float("-inf"))
    return tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; selp.f32 $0, $1, 0fFF800000, p; }",
                                     "=f,f,r", [s, seen], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _block_bits(span, i, offs_q, k0, BLOCK_K: tl.constexpr, SW: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The bits of queries `offs_q` and keys [k0, k0 + BLOCK_K) in the partial block of tile `i` of a
    listed `span` (`schedule.listed_tiles`; its tiles are the keys', the queries' when
    ``TRANSPOSED``), as `_masked_scores` takes them: an int32 [queries, keys] tile ([keys,
    queries] when ``TRANSPOSED``), not 0 where the key is seen.

    A block's bits are rows of ``BLOCK_SIZE / 8`` bytes, bit ``j % 8`` of byte ``j // 8`` for key j
    of the block, that is (little-endian) bit ``j % 32`` of 32-bit word ``j // 32``. The tile's words
    are read as one [queries, BLOCK_K / 32] tile (a few loads per thread, not one per score),
    spread over their keys, and each key's word is ANDed with its own bit, a per-column constant
    (`_seen_only` tests the result). Integers, not a bool tile: the compiler packs a bool tile into
    bitfields and unpacks it again.
    """
    BLOCK_Q: tl.constexpr = offs_q.shape[0]
    WORDS: tl.constexpr = BLOCK_K // 32 if BLOCK_K >= 32 else 1
    per_block: tl.constexpr = SW.BLOCK_SIZE // (BLOCK_Q if TRANSPOSED else BLOCK_K)
    bits = span[4] + tl.load(span[3] + i // per_block).to(tl.int64) * (SW.BLOCK_SIZE * SW.BLOCK_SIZE // 8)
    rows = offs_q % SW.BLOCK_SIZE
    word_cols = k0 % SW.BLOCK_SIZE // 32 + tl.arange(0, WORDS)
    words = tl.load(bits.to(tl.pointer_type(tl.int32)) + rows[:, None] * (SW.BLOCK_SIZE // 32) + word_cols[None, :])
    spread = tl.reshape(tl.broadcast_to(words[:, :, None], [BLOCK_Q, WORDS, BLOCK_K // WORDS]), [BLOCK_Q, BLOCK_K])
    if BLOCK_K >= 32:  # tiles of whole words: the shifts are the same every tile
        bit = tl.arange(0, BLOCK_K) % 32
    else:
        bit = k0 % 32 + tl.arange(0, BLOCK_K)
    seen = spread & (1 << bit)[None, :]
    if TRANSPOSED:
        seen = tl.trans(seen)
    return seen


@triton.jit
def _dropout_keep(seed, offs_m, offs_n, head_index, dropout_p, TRANSPOSED: tl.constexpr = False):
    """Keep decisions of one [queries, keys] tile (``TRANSPOSED``: [keys, queries], `offs_n` then
    the rows), from Philox keyed by (seed, batch * Hq + head, query, key).

    The key is the element's coordinates, so the pattern does not depend on the tiling or the pass.
    """
    if TRANSPOSED:
        zero = tl.zeros((offs_n.shape[0], offs_m.shape[0]), dtype=tl.uint32)
        keys, queries = zero + offs_n[:, None].to(tl.uint32), zero + offs_m[None, :].to(tl.uint32)
    else:
        zero = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.uint32)
        keys, queries = zero + offs_n[None, :].to(tl.uint32), zero + offs_m[:, None].to(tl.uint32)
    r, _, _, _ = tl.philox(seed, keys, queries, zero + head_index.to(tl.uint32), zero)
    # 24 random bits compare exactly in fp32: P(keep) = 1 - p to within 2**-24.
    return (r >> 8).to(tl.float32) >= dropout_p * 16777216.0


@triton.jit
def _wide(offs):
    """int64 offsets: a row index times a stride passes 2**31 for long rows (e.g. a dense 48k x 48k mask)."""
    return offs.to(tl.int64)


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, len_r, len_c):
    """A [rows, cols] tile, zero outside ``len_r`` x ``len_c``."""
    mask = (offs_r[:, None] < len_r) & (offs_c[None, :] < len_c)
    return tl.load(ptr + _wide(offs_r)[:, None] * stride_r + _wide(offs_c)[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _load_rows(src, b, h, start, offs_r, offs_c, strides, len_r, len_c, TRANSPOSED: tl.constexpr, SW: tl.constexpr):
    """Rows [start, start + BLOCK) of (batch b, head h) as a [rows, cols] tile ([cols, rows] when
    ``TRANSPOSED``), zero outside ``len_r`` x ``len_c``: the one place that knows where a tile lives.

    - ``SW.TMA``: `src` is a [B, H, L, D] tensor descriptor whose box is one tile: the copy engine
      fetches it into shared memory and fills what lies out of bounds with zeros (no per-element
      addresses or masks).
    - ``SW.PAGED`` (a paged KV cache): `src` is (the pool at head h, the sequence's row of the block
      table, the page size); row t is row ``t % page_size`` of block ``table[t // page_size]``.
    - else `src` points at the first row: (b, h)'s of a dense [B, H, L, D] tensor (`_head_rows`), or a
      packed sequence's (its strides (0, head, row, column)); `offs_r`/`offs_c` address the tile
      through the `Strides` entry's row and column.
    """
    if SW.TMA:
        tile = src.load([b.to(tl.int32), h.to(tl.int32), start, 0])
        tile = tile.reshape(tile.shape[2], tile.shape[3])
        if TRANSPOSED:
            tile = tl.trans(tile)
    elif SW.PAGED:
        pool, table, page_size = src
        in_rows = offs_r < len_r
        block = tl.load(table + offs_r // page_size, mask=in_rows, other=0).to(tl.int64)
        rows = block * strides[0] + _wide(offs_r % page_size) * strides[2]
        cols = _wide(offs_c) * strides[3]
        if TRANSPOSED:
            tile = tl.load(pool + rows[None, :] + cols[:, None], mask=(offs_c[:, None] < len_c) & in_rows[None, :],
                           other=0.0)
        else:
            tile = tl.load(pool + rows[:, None] + cols[None, :], mask=in_rows[:, None] & (offs_c[None, :] < len_c),
                           other=0.0)
    elif TRANSPOSED:
        tile = _load_tile(src, offs_c, offs_r, strides[3], strides[2], len_c, len_r)
    else:
        tile = _load_tile(src, offs_r, offs_c, strides[2], strides[3], len_r, len_c)
    return tile


@triton.jit
def _store_rows(dst, b, h, start, value, offs_r, offs_c, strides, len_r, len_c, INTERPRETED_BF16: tl.constexpr,
                TMA: tl.constexpr):
    """Stores a [rows, cols] tile at rows [start, start + BLOCK) of (batch b, head h), as `_load_rows`
    reads one; the copy engine drops what lies out of bounds."""
    if TMA:
        value = _narrowed(value, dst.dtype, INTERPRETED_BF16)
        dst.store([b.to(tl.int32), h.to(tl.int32), start, 0], value.reshape(1, 1, value.shape[0], value.shape[1]))
    else:
        _store_tile(dst, value, offs_r, offs_c, strides[2], strides[3], len_r, len_c, INTERPRETED_BF16)


@triton.jit
def _store_tile(ptr, value, offs_r, offs_c, stride_r, stride_c, len_r, len_c, INTERPRETED_BF16: tl.constexpr):
    """Stores the part of a [rows, cols] tile inside ``len_r`` x ``len_c``, in ptr's dtype (which
    may be wider than the inputs': float32 partial results for ring attention)."""
    mask = (offs_r[:, None] < len_r) & (offs_c[None, :] < len_c)
    tl.store(ptr + _wide(offs_r)[:, None] * stride_r + _wide(offs_c)[None, :] * stride_c,
             _narrowed(value, ptr.dtype.element_ty, INTERPRETED_BF16), mask=mask)


@triton.jit
def _narrowed(value, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """`value` cast to `dtype` for a store, rounding to nearest even into bf16 (`_rounded`)."""
    if dtype == tl.bfloat16:
        value = _rounded(value, INTERPRETED_BF16)
    return value.to(dtype)
