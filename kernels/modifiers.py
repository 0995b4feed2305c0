"""Score modifiers: `@triton.jit` functions of a tile of scores and its coordinates, which the kernels
call through `Switches.MODIFIER` (a compile-time argument, like FlexAttention's ``score_mod``).

A modifier takes ``(s, rows, cols, slope, sc)``: a [M, N] tile of scaled scores in log2 units
(float32), each row's position on the keys' axis (``i + diagonal_shift``; in the dK/dV pass's
transposed tiles the rows are keys and this is ``j - diagonal_shift``, the same distances), the key
(column) positions, the row's ALiBi slope in log2 units (0 without ALiBi; a [M, 1] column in
decoding, one head per row) and the `Scores` bundle. It returns the modified scores and their
derivative by the scores it was given, which the backward multiplies into dS. It runs before the
mask is added and the band is applied.

`modifier_of` picks the one a call needs; a new modifier is a function here and its choice there.
"""

import triton
import triton.language as tl

from .attn_common import LOG2E


@triton.jit
def _tanh(x):
    # From one exp2 (libdevice's tanh does not run in the interpreter); saturates cleanly to +-1.
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def no_modifier(s, rows, cols, slope, sc):
    return s, 1.0


@triton.jit
def softcap(s, rows, cols, slope, sc):
    """Gemma 2's cap: s is s_nat / softcap here (see launch_args), so softcap * tanh(s) * log2(e)."""
    t = _tanh(s)
    return t * sc.softcap_log2, 1.0 - t * t


@triton.jit
def alibi(s, rows, cols, slope, sc):
    """-slope * |i' - j|; the distance is an exact float below 2**24."""
    return s - slope * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32), 1.0


@triton.jit
def softcap_alibi(s, rows, cols, slope, sc):
    """The cap first, then ALiBi (flash-attn's order)."""
    s, slope_of_cap = softcap(s, rows, cols, slope, sc)
    s, _ = alibi(s, rows, cols, slope, sc)
    return s, slope_of_cap


def modifier_of(softcap_given, alibi_given):
    """The modifier of a call with a softcap and / or ALiBi slopes."""
    return {(False, False): no_modifier, (True, False): softcap, (False, True): alibi,
            (True, True): softcap_alibi}[bool(softcap_given), bool(alibi_given)]
