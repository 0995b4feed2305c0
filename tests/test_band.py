"""The causal, window and align rules against their definition in the API contract, written out
element by element: query i sees key j iff (not causal or j <= i') and (no window or
i' - left <= j <= i' + right, a side None unbounded), with i' = i + (Lk - Lq if bottom-right else 0).
The kernels and the reference share `band.py`; this is the independent check of it."""

import itertools

import pytest
import torch

from attn_ops import reference


def visible_by_definition(len_q, len_k, causal, window, align):
    align = align or (causal if isinstance(causal, str) else "top_left")
    shift = len_k - len_q if align == "bottom_right" else 0
    allowed = torch.ones(len_q, len_k, dtype=torch.bool)
    for i, j in itertools.product(range(len_q), range(len_k)):
        diagonal = i + shift
        if causal and j > diagonal:
            allowed[i, j] = False
        if window is not None:
            left, right = (None if w in (None, -1) else w for w in window)
            if (left is not None and j < diagonal - left) or (right is not None and j > diagonal + right):
                allowed[i, j] = False
    return allowed


RULES = [
    dict(causal=causal, window=window, align=align)
    for causal in (False, True, "top_left", "bottom_right")
    for window in (None, (2, 1), (0, 0), (None, 3), (4, -1), (-1, -1))
    for align in (None, "top_left", "bottom_right")
    if not (isinstance(causal, str) and align is not None and causal != align)
]


@pytest.mark.parametrize("len_q, len_k", [(6, 6), (4, 9), (9, 4)])
@pytest.mark.parametrize("rules", RULES, ids=str)
def test_visible_keys_follow_the_definition(len_q, len_k, rules):
    q, k = torch.randn(1, 1, len_q, 4), torch.randn(1, 1, len_k, 4)
    visible = reference.masked_scores(q, k, **rules)[0, 0] > float("-inf")
    assert torch.equal(visible, visible_by_definition(len_q, len_k, **rules))
