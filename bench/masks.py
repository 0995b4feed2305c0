"""Each mask kind (and score modifier) spelled in every provider's own terms, built once per case so
all see one mask.

A provider gets the cheapest form it understands: attn_ops a causal flag or window rather than a
dense tensor, SDPA `is_causal` where it can and a bool tensor otherwise, FlexAttention a
`mask_mod` (turned into a block mask outside the timed region), flash_attn its flags or nothing.
A modifier goes to attn_ops and flash_attn as their own arguments, to FlexAttention as a
`score_mod`, and to SDPA as a materialised float bias where one expresses it.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import attn_ops
from bench.cases import CACHES, MASKS, MODIFIERS, SPARSE, VARLEN, varlen_lengths

WINDOW = 512  # sliding window: each query sees itself and the 512 keys before it
BLOCK = 128  # block_sparse: the mask is made of BLOCK x BLOCK tiles
BLOCK_KEEP = {"block_sparse": 0.25, "block_sparse_eighth": 0.125}  # fraction of off-diagonal tiles kept
# (diagonal tiles always are: no empty rows)
SPARSE_WINDOW = 4096  # sliding_window: each query sees itself and the 4095 keys before it
SOFTCAP = 50.0  # Gemma 2's attention logit cap


@dataclass
class Masking:
    attn_ops: dict  # keywords for attn_ops.attention and attn_ops.reference.attention
    sdpa: Optional[dict]  # keywords for torch.nn.functional.scaled_dot_product_attention; None: no form
    mask_mod: Optional[Callable] = None  # FlexAttention's rule; None: no mask
    mask_mod_batched: bool = False  # mask_mod reads the batch index
    flash_attn: Optional[dict] = None  # flash_attn_func's flags; None: it cannot express the mask
    score_mod: Optional[Callable] = None  # FlexAttention's score modifier
    # SDPA's attn_mask [1, Hq, Lq, Lk], built only in SDPA's rows (so no other row's memory holds
    # it), for a modifier the others compute on the fly.
    sdpa_bias: Optional[Callable] = None
    learned: tuple = ()  # tensors beyond q, k, v whose gradient the backward computes
    # VARLEN: the padded batch's real rows packed end to end ([total, H, D] leaves), and the
    # sequences' int32 cu_seqlens and longest length, for the providers that take packed input.
    packed: Optional[tuple] = None
    # CACHES: (k_cache, v_cache, cache_seqlens, block_table or None) holding k and v (the dense
    # inputs, every row of them) for attn_ops.attention_with_kvcache.
    kvcache: Optional[tuple] = None
    # A sparse pattern's keywords for attn_ops with its dense mask (`attn_ops_dense_mask`).
    attn_ops_dense: Optional[dict] = None

    @property
    def paged(self):
        return self.kvcache is not None and self.kvcache[3] is not None


def make_masking(case, device, q=None, k=None, v=None):
    """The case's masking; VARLEN packs the real rows of q, k, v (the padded inputs)."""
    kind, batch, heads, lq, lk = case.mask, case.batch, case.heads_q, case.len_q, case.len_k
    if kind == VARLEN:
        lengths = varlen_lengths(case).to(device)
        real = torch.arange(lq, device=device) < lengths[:, None]  # [B, L]
        # [B, H, L, D] -> [B, L, H, D] -> the real rows, in batch order: [total, H, D] leaves.
        packed = [t.detach().transpose(1, 2)[real].requires_grad_(t.requires_grad) for t in (q, k, v)]
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return Masking(
            {"mask": real[:, None, None, :], "causal": True}, {"attn_mask": real[:, None, None, :] & _tril(lq, device)},
            lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (kv_idx < lengths[b]),
            mask_mod_batched=True, packed=(*packed, cu_seqlens, int(lengths.max())),
        )
    if kind == "none":
        return Masking({}, {}, flash_attn={"causal": False})

    if kind in CACHES:
        seqlens = torch.full((batch,), lk, dtype=torch.int32, device=device)
        k_cache, v_cache, table = (k, v, None) if CACHES[kind] == 0 else paged_cache(k, v, CACHES[kind])
        return Masking({}, {}, flash_attn={"causal": False}, kvcache=(k_cache, v_cache, seqlens, table))

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

    if kind in ("block_sparse",) + SPARSE:
        mask_mod = sparse_rule(kind, lq, lk, device)
        block_mask = attn_ops.BlockMask.from_mask_mod(mask_mod, None, None, lq, lk, device=device, block_size=BLOCK)
        dense = block_mask.to_dense()
        return Masking({"block_mask": block_mask}, {"attn_mask": dense}, mask_mod, attn_ops_dense={"mask": dense})

    if kind == "alibi":
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)  # ALiBi's, float32 [Hq]

        def dense():
            distance = (torch.arange(lq, device=device)[:, None] - torch.arange(lk, device=device)).abs()
            return (-slopes[:, None, None] * distance).to(getattr(torch, case.dtype))[None]

        return Masking(
            {"alibi_slopes": slopes}, {},
            score_mod=lambda score, b, h, q_idx, kv_idx: score - slopes[h] * (q_idx - kv_idx).abs(),
            sdpa_bias=dense,
            flash_attn={"alibi_slopes": slopes},
        )

    if kind == "softcap":
        return Masking(
            {"softcap": SOFTCAP}, None,
            score_mod=lambda score, b, h, q_idx, kv_idx: SOFTCAP * torch.tanh(score / SOFTCAP),
            flash_attn={"softcap": SOFTCAP},
        )

    if kind in ("bias", "bias_grad"):
        bias = torch.randn(1, heads, lq, lk, device=device, dtype=getattr(torch, case.dtype))
        learned = (bias.requires_grad_(),) if kind == "bias_grad" else ()
        return Masking(
            {"mask": bias}, {"attn_mask": bias},
            score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[0, h, q_idx, kv_idx],
            learned=learned,
        )

    raise ValueError(f"unknown mask kind {kind!r}; expected one of "
                     f"{', '.join(MASKS + SPARSE + MODIFIERS + (VARLEN, *CACHES))}")


def sparse_rule(kind, lq, lk, device):
    """The mask_mod of a sparse pattern (`bench.cases.SPARSE`, `block_sparse`), its random parts drawn
    once here."""
    blocks = (-(-lq // BLOCK), -(-lk // BLOCK))
    if kind in BLOCK_KEEP:
        tiles = torch.rand(*blocks, device=device) < BLOCK_KEEP[kind]
        tiles |= torch.eye(*blocks, dtype=torch.bool, device=device)
        return lambda b, h, q_idx, kv_idx: tiles[q_idx // BLOCK, kv_idx // BLOCK]
    if kind == "document":
        sizes = torch.randint(1, max(2, lk // 4), (lk,), device=device)  # mean L / 8: some shorter than a block
        documents = torch.repeat_interleave(torch.arange(lk, device=device), sizes)[:lk]
        return lambda b, h, q_idx, kv_idx: (documents[q_idx] == documents[kv_idx]) & (q_idx >= kv_idx)
    if kind == "sliding_window":
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < SPARSE_WINDOW)
    if kind == "prefix_lm":
        return lambda b, h, q_idx, kv_idx: (kv_idx < lq // 4) | (q_idx >= kv_idx)
    if kind == "bigbird":
        picked = torch.rand(*blocks, device=device).argsort(dim=1)[:, :3]
        chosen = torch.zeros(*blocks, dtype=torch.bool, device=device).scatter_(1, picked, True)
        return lambda b, h, q_idx, kv_idx: ((kv_idx < BLOCK) | (q_idx < BLOCK)
                                            | ((q_idx // BLOCK - kv_idx // BLOCK).abs() <= 1)
                                            | chosen[q_idx // BLOCK, kv_idx // BLOCK])
    raise ValueError(f"no sparse rule for {kind!r}")


def paged_cache(k, v, page):
    """k and v ([B, Hkv, L, D], L a multiple of `page`) in pools of blocks of `page` rows stored
    [num_blocks, page, Hkv, D] (vLLM's layout) and seen as [num_blocks, Hkv, page, D], each
    sequence's blocks in shuffled places; and the int32 block table."""
    batch, heads, length, _ = k.shape
    per_sequence = length // page
    table = torch.randperm(batch * per_sequence, device=k.device).view(batch, per_sequence)
    pools = []
    for t in (k, v):
        pool = t.new_empty(batch * per_sequence, page, heads, t.shape[-1])
        pool[table] = t.detach().view(batch, heads, per_sequence, page, t.shape[-1]).permute(0, 2, 3, 1, 4)
        pools.append(pool.transpose(1, 2))
    return *pools, table.int()


def _tril(length, device):
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()
