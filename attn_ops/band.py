"""The causal and sliding-window rules as one diagonal band of visible keys.

Query i sees key j iff ``i + lo <= j <= i + hi`` (a side that is None is unbounded). With
``shift = Lk - Lq`` for ``align="bottom_right"`` and 0 for ``"top_left"`` (each query's diagonal
sits at ``i' = i + shift``)::

    causal, top_left, Lq=3, Lk=5       causal, bottom_right, Lq=3, Lk=5     window=(1, 0), top_left
        k: 0 1 2 3 4                       k: 0 1 2 3 4                        k: 0 1 2 3 4
    q0     x . . . .                   q0     x x x . .                    q0     x . . . .
    q1     x x . . .                   q1     x x x x .                    q1     x x . . .
    q2     x x x . .                   q2     x x x x x                    q2     . x x . .

``causal`` gives ``hi = shift``; ``window=(left, right)`` gives ``lo = shift - left`` and
``hi = shift + right`` (the tighter ``hi`` wins when both are set; a side that is None stays
unbounded).
"""

from .checks import OP_NAMES, check_align, check_causal, check_window


def band_rules(len_q, len_k, causal, window, align, names=OP_NAMES):
    """Checks the caller's causal, window and align and returns them normalized with their band:
    (causal: None or its alignment, window: None or (left, right), align, lo, hi)."""
    causal_rule = check_causal(causal, names)
    align = check_align(align, causal, names)
    causal = align if causal_rule else None
    window = check_window(window, names)
    return (causal, window, align, *diagonal_band(len_q, len_k, causal, window, align))


def diagonal_band(len_q, len_k, causal, window, align=None):
    """(lo, hi) offsets of the visible keys relative to each query; None where unbounded.

    ``causal``: None, "top_left" or "bottom_right"; ``window``: None or (left, right), a side None
    when unbounded; ``align``: where the diagonal sits, by default the causal rule's (else top_left).
    """
    align = align or causal or "top_left"
    shift = len_k - len_q if align == "bottom_right" else 0
    lo = hi = None
    if causal is not None:
        hi = shift
    if window is not None:
        left, right = window
        lo = None if left is None else shift - left
        if right is not None:
            hi = shift + right if hi is None else min(hi, shift + right)
    return lo, hi
