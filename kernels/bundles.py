"""The kernels' argument bundles: named tuples that Triton (3.4 and later) takes as kernel arguments
and passes through `@triton.jit` calls, so a kernel's signature is a few named groups instead of
fifty positional ints. A tuple's ints are specialized as flat ints are (a 1 becomes a constant, a
multiple of 16 is marked so); a `Switches` travels as one ``tl.constexpr``. Tensor descriptors stay
arguments of their own (inside tuples they need a Triton newer than 3.6).

A new runtime scalar of the scores is a field of `Scores`, its value in `launch_args` (or where a
kernel builds its per-sequence `Scores`) and its use: no signature changes.
"""

from typing import NamedTuple

import triton.language as tl


class Scores(NamedTuple):
    """The runtime scalars of one (sequence, head)'s scores, as `_masked_scores` and every pass read
    them. Query i sees key j iff ``i + band_lo <= j <= i + band_hi`` (and j < len_k); ALiBi
    measures from ``i + diagonal_shift``. ``qk_scale`` is the scale times log2(e) (over the cap
    with `softcap_log2`, the cap times log2(e)); ``scale`` is the plain scale, which the backward's
    dQ and dK carry."""

    len_q: int
    len_k: int
    band_lo: int
    band_hi: int
    diagonal_shift: int
    qk_scale: float
    softcap_log2: float
    dropout_p: float
    dropout_scale: float
    scale: float


class Switches(NamedTuple):
    """The compile-time switches every attention pass takes, as one constexpr: head dims and their
    padded tile widths, the tile, the mask kind, which score modifiers and dropout run, how the
    dots run (fp32's TF32 switch; the interpreter's bf16), and where tiles live: Q, K, V and the
    outputs as tensor descriptors (TMA) or pointers, K and V in a paged cache (`_load_rows`).

    Made by `of`, every field but the modifier a ``tl.constexpr``: a kernel reading ``SW.BLOCK_M``
    gets the field as it is, and Triton 3.6 passes a plain int or str on to a jit function
    (``tl.zeros([SW.BLOCK_M], ...)``, ``_dot(a, b, SW.INPUT_PRECISION)``) only wrapped so."""

    HEAD_DIM: int
    HEAD_DIM_PAD: int
    HEAD_DIM_V: int
    HEAD_DIM_V_PAD: int
    BLOCK_M: int
    BLOCK_N: int
    MASK_KIND: int
    SOFTCAP: bool
    ALIBI: bool
    SINKS: bool
    DROPOUT: bool
    INTERPRETED_BF16: bool
    INPUT_PRECISION: str
    TMA: bool
    PAGED: bool  # K and V are a paged cache, read through its block table (decoding)
    BLOCK_SIZE: int  # a block mask's block size (its lists pick the tiles: `schedule.listed_tiles`), or 0
    BANDED: bool  # a causal or window band: listed tiles get its element-wise mask
    MODIFIER: object  # the score modifier, a @triton.jit function (`kernels.modifiers`)

    @classmethod
    def of(cls, **fields):
        return cls(**{name: _constant(value) for name, value in fields.items()})

    def replaced(self, **fields):
        return self._replace(**{name: _constant(value) for name, value in fields.items()})

    def values(self):
        """{field: its plain value}."""
        return {name: getattr(value, "value", value) for name, value in self._asdict().items()}

    @property
    def cache_key(self):
        """How Triton's on-disk cache keys a kernel compiled with these switches (it asks a constant
        for ``cache_key``, else takes its str): the modifier by its source's hash, as a kernel's own
        helpers are, so that an edited modifier is compiled anew."""
        return repr(tuple(getattr(value, "cache_key", value) for value in self))


def _constant(value):
    # A jit function stays itself: Triton calls it, and keys its in-memory cache by its source.
    return value if callable(value) else tl.constexpr(value)


class Strides(NamedTuple):
    """Each tensor's strides, outermost first: [B, H, L, D] tensors' as (batch, head, row, column),
    packed [total, H, D] ones' as (0, head, row, column) with their pointers at the sequence's
    first row, so that the shared row bodies index both alike. A tensor a pass does not take is
    ``()``: no kernel argument (a kernel that builds a `Strides` gives every field, as Triton 3.6
    requires). ``alibi``: the slopes' (batch, head); ``mask``: a decoding key mask's (batch, key)."""

    q: tuple = ()
    k: tuple = ()
    v: tuple = ()
    mask: tuple = ()
    alibi: tuple = ()
    do: tuple = ()
    o: tuple = ()  # the forward's output, which the dQ pass reads with dO for the row deltas
    out: tuple = ()  # what the pass writes: O, dQ, dK, the mask's gradient
    out_v: tuple = ()  # dV, beside dK
    table: tuple = ()  # a paged cache's block table: (batch,)
    blocks: tuple = ()  # a block mask's lines: (batch, head) strides, 0 where it broadcasts
