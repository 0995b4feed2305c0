"""Each mask kind spelled in every provider's own terms, built once per case so all see one mask.

A provider gets the cheapest form it understands: attn_ops a causal flag or window rather than a
dense tensor, SDPA `is_causal` where it can and a bool tensor otherwise, FlexAttention a
`mask_mod` (turned into a block mask outside the timed region), flash_attn its flags or nothing.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

WINDOW = 512  # sliding window: each query sees itself and the 512 keys before it
BLOCK = 128  # block_sparse: the mask is made of BLOCK x BLOCK tiles
BLOCK_KEEP = 0.25  # fraction of off-diagonal tiles kept (diagonal tiles always are: no empty rows)


@dataclass
class Masking:
    attn_ops: dict  # keywords for attn_ops.attention and attn_ops.reference.attention
    sdpa: dict  # keywords for torch.nn.functional.scaled_dot_product_attention
    mask_mod: Optional[Callable] = None  # FlexAttention's rule; None: no mask
    mask_mod_batched: bool = False  # mask_mod reads the batch index
    flash_attn: Optional[dict] = None  # flash_attn_func's flags; None: it cannot express the mask


def make_masking(case, device):
    kind, batch, lq, lk = case.mask, case.batch, case.len_q, case.len_k
    if kind == "none":
        return Masking({}, {}, flash_attn={"causal": False})

    if kind == "causal":
        # flash_attn aligns causal bottom-right, the others top-left: the same rule only if Lq = Lk.
        return Masking(
            {"causal": True}, {"is_causal": True},
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
            flash_attn={"causal": True} if lq == lk else None,
        )

    if kind == "padding":
        lengths = torch.randint(max(lk // 2, 1), lk + 1, (batch,), device=device)  # 50 to 100% kept
        mask = (torch.arange(lk, device=device) < lengths[:, None])[:, None, None, :]  # [B, 1, 1, Lk]
        return Masking(
            {"mask": mask}, {"attn_mask": mask},
            lambda b, h, q_idx, kv_idx: kv_idx < lengths[b],
            mask_mod_batched=True,
        )

    if kind == "random_bool":
        mask = torch.rand(batch, 1, lq, lk, device=device) < 0.5
        return Masking(
            {"mask": mask}, {"attn_mask": mask},
            lambda b, h, q_idx, kv_idx: mask[b, 0, q_idx, kv_idx],
            mask_mod_batched=True,
        )

    if kind == "window":
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        dense = ((j <= i) & (j >= i - WINDOW))[None, None]  # [1, 1, Lq, Lk], for SDPA alone
        return Masking(
            {"causal": True, "window": (WINDOW, 0)}, {"attn_mask": dense},
            lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW),
            flash_attn={"causal": True, "window_size": (WINDOW, 0)} if lq == lk else None,
        )

    if kind == "block_sparse":
        tiles = torch.rand(-(-lq // BLOCK), -(-lk // BLOCK), device=device) < BLOCK_KEEP
        tiles |= torch.eye(*tiles.shape, dtype=torch.bool, device=device)
        dense = tiles.repeat_interleave(BLOCK, 0)[:lq].repeat_interleave(BLOCK, 1)[:, :lk]
        return Masking(
            {"mask": dense[None, None]}, {"attn_mask": dense[None, None]},
            lambda b, h, q_idx, kv_idx: tiles[q_idx // BLOCK, kv_idx // BLOCK],
        )

    raise ValueError(f"unknown mask kind {kind!r}; expected one of none, causal, padding, "
                     "random_bool, window, block_sparse")
