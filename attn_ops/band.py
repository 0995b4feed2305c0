"""The causal and sliding-window rules as one diagonal band of visible keys.

Query i sees key j iff ``i + lo <= j <= i + hi`` (a side that is None is unbounded). With
``shift = Lk - Lq`` for ``causal="bottom_right"`` and 0 otherwise::

    causal="top_left", Lq=3, Lk=5      causal="bottom_right", Lq=3, Lk=5    window=(1, 0), top_left
        k: 0 1 2 3 4                       k: 0 1 2 3 4                        k: 0 1 2 3 4
    q0     x . . . .                   q0     x x x . .                    q0     x . . . .
    q1     x x . . .                   q1     x x x x .                    q1     x x . . .
    q2     x x x . .                   q2     x x x x x                    q2     . x x . .

``causal`` gives ``hi = shift``; ``window=(left, right)`` gives ``lo = shift - left`` and
``hi = shift + right`` (the tighter ``hi`` wins when both are set).
"""


def diagonal_band(len_q, len_k, causal, window):
    """(lo, hi) offsets of the visible keys relative to each query; None where unbounded."""
    shift = len_k - len_q if causal == "bottom_right" else 0
    lo = hi = None
    if causal is not None:
        hi = shift
    if window is not None:
        left, right = window
        lo = shift - left
        hi = shift + right if hi is None else min(hi, shift + right)
    return lo, hi
