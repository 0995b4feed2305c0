"""A dense bool ``mask=`` as a block mask, made inside an attention call: the kernels then skip its
empty blocks, run its full ones as plain attention and read one bit per score of the others, never
its bytes.

`summarized` makes a `BlockMask`'s kernel arguments from it with a fixed set of torch ops whose sizes
depend only on the mask's shape: no host read, no sync (`BlockMask.from_mask` reads counts on the
host to size its lists; an attention call may not), and torch.compile traces it. `summary` keeps
the latest few per mask object, so the layers of a model that share one mask summarize it once.

Which masks (`summarizable`): bool, with rows and columns of their own (a key mask ``[B, 1, 1, Lk]``
already costs one row per tile) of at least `MIN_SUMMARIZED` elements per (batch, head). Below that
the summary's ~45 small ops (tens of microseconds of host time on a GPU, uncached) would cost more
than the kernel time they save, and the mask keeps the kernels' bool-mask path.

Memory while summarizing: the mask's bytes once more (its bits, spread before they are packed) and
an eighth of them kept (the bits); the counts are summed from a uint8 view, a row of a block at a
time, never widened whole.
"""

import weakref

import torch

from .block_mask import BlockLists, joined_lists, packed_bits

BLOCK_SIZE = 128
# Elements of one (batch, head)'s [Lq, Lk] (a 1k x 1k mask); read when a call's static parts are first
# seen (`attn_ops.fused.op_args` keeps the choice in the call's plans, as its launches are planned).
MIN_SUMMARIZED = 1024 * 1024
MAX_KEPT = 4  # summaries kept, of the masks last seen


def summarizable(mask):
    """Whether attention calls summarize `mask` (a tensor broadcastable to [B, Hq, Lq, Lk])."""
    return (mask.dtype == torch.bool and mask.dim() >= 2 and min(mask.shape[-2:]) > 1
            and 0 not in mask.stride()[-2:] and mask.shape[-2] * mask.shape[-1] >= MIN_SUMMARIZED)


_KEPT = []  # [(a weak reference to a mask, its version, its summary)], the latest last


def summary(mask):
    """`summarized(mask)` with its leading dimensions completed to [B | 1, H | 1, Lq, Lk] (a batch or
    head dimension read through stride 0 as one), the same object's again while it is unchanged (its
    version counter). A summary is dropped with its mask (or when four newer ones are kept)."""
    if torch.compiler.is_compiling() or mask.is_inference():  # no object identity, no version counter
        return summarized(_completed(mask))
    for ref, version, made in _KEPT:
        if ref() is mask and version == mask._version:
            return made
    made = summarized(_completed(mask))
    _KEPT.append((weakref.ref(mask, _forget), mask._version, made))
    del _KEPT[:-MAX_KEPT]
    return made


def _forget(dead):
    _KEPT[:] = [kept for kept in _KEPT if kept[0] is not dead]


def _completed(mask):
    mask = mask[(None,) * (4 - mask.dim())]
    return mask[:1 if mask.stride(0) == 0 else None, :1 if mask.stride(1) == 0 else None]


def summarized(mask, block_size=BLOCK_SIZE):
    """The `BlockMask.kernel_args` of a dense bool mask ``[B | 1, H | 1, Lq, Lk]``, made on its
    device by a fixed number of torch ops whose sizes depend only on the mask's shape: no host read,
    no sync (an attention call summarizes the dense mask it is given; torch.compile traces it).

    The lists are the same sparse-row format as `_built`'s, in buffers sized for every block being
    listed (``B * H * (Lq / bs) * (Lk / bs)`` entries each, a 1/bs**2 fraction of the mask's size):
    each line's entries are scattered to their place in it, so no count has to reach the host to
    size them, and what lies past the last line's entries is never read (so these are kernel
    arguments, not a `BlockMask`, whose readers take compact lists). The bits of every block are
    packed (an eighth of the mask's bytes); the partial blocks' entries point at their own."""
    B, H, Lq, Lk = mask.shape
    bs = block_size
    n_rows, n_cols = -(-Lq // bs), -(-Lk // bs)
    if (Lq, Lk) != (n_rows * bs, n_cols * bs):  # out of bounds: False, as `_built` has it
        padded = mask.new_zeros(B, H, n_rows * bs, n_cols * bs)
        padded[:, :, :Lq, :Lk] = mask
        mask = padded
    blocks = mask.reshape(B, H, n_rows, bs, n_cols, bs).view(torch.uint8)  # 0 or 1, no copy
    # A block row's count fits a byte (bs <= 128); only the [.., bs, ..] partial sums are widened.
    counts = blocks.sum(5, dtype=torch.uint8).sum(3, dtype=torch.int32).view(B * H, n_rows, n_cols)
    listed = torch.stack([counts == bs * bs, (counts > 0) & (counts < bs * bs)])  # full, partial
    # Packed before the blocks are gathered (an eighth of the bytes to move); block (b, h, i, j)'s
    # bits are then bits[((b * H + h) * n_rows + i) * n_cols + j].
    bits = packed_bits(blocks).permute(0, 1, 2, 4, 3, 5).reshape(-1, bs, bs // 8)
    block_ids = torch.arange(B * H * n_rows * n_cols, dtype=torch.int32, device=mask.device)
    rows = _scattered(listed, block_ids.view(B * H, n_rows, n_cols))
    cols = _scattered(listed.transpose(2, 3), block_ids.view(B * H, n_rows, n_cols).transpose(1, 2))
    return dict(block_lists=joined_lists((*rows, *cols), mask.device), block_bits=bits, block_size=bs,
                block_batch=B, block_heads=H)


def _scattered(listed, block_ids):
    """One direction's `BlockLists` from ``listed`` [full | partial, heads, lines, blocks] and the
    blocks' bit indices [heads, lines, blocks]: entry k of line r of a list goes to ``offsets[r] + k``
    of a buffer with room for every block (see `summarized`); unlisted blocks to a spare last slot,
    cut off."""
    _, heads, n_lines, n_blocks = listed.shape
    listed = listed.reshape(2, heads * n_lines, n_blocks)
    offsets = torch.nn.functional.pad(listed.sum(2, dtype=torch.int32).cumsum(1, dtype=torch.int32), (1, 0))
    places = torch.where(listed, offsets[:, :-1, None] + listed.cumsum(2, dtype=torch.int32) - 1, listed[0].numel())
    places = places.reshape(2, -1).long()
    columns = torch.arange(n_blocks, dtype=torch.int32, device=listed.device).expand(2, heads * n_lines, n_blocks)
    entries = block_ids.new_zeros(3, listed[0].numel() + 1)  # full blocks, partial blocks, partial bits
    entries[:2].scatter_(1, places, columns.reshape(2, -1))
    entries[2].scatter_(0, places[1], block_ids.reshape(-1))
    return BlockLists(offsets[0], entries[0, :-1], offsets[1], entries[1, :-1], entries[2, :-1])
