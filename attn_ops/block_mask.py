"""`attn_ops.BlockMask`: a bool mask ``[B, H, Lq, Lk]`` (True = may attend) held block-sparsely, built
once on the device and reused by every layer and step.

For each (batch, head, query block) it lists the key blocks that are *full* (every (query, key) of
the block may attend) and *partial* (some may: their bits, one per element, are kept), in
increasing order; empty blocks are in neither list. The same lists from the key side (each key
block's query blocks) point at the same bits: the dK/dV pass walks those. The lists are a
sparse-row format (offsets plus the indices of the non-empty blocks), so memory grows with the
number of non-empty blocks, never with ``(Lq / bs) * (Lk / bs)``, let alone ``Lq * Lk``.

A block that reaches past Lq or Lk is never full: its elements out of bounds are 0 bits, so a full
block needs no bounds check either. B and H may be 1 (one mask for every batch / head).
"""

import math
from typing import NamedTuple

import torch

BLOCK_SIZES = (64, 128)  # the kernels' tiles iterate inside a block of either
# Mask elements evaluated at once while building (bools; 16 MiB), a chunk of blocks at a time.
BUILD_ELEMENTS = 2**24


class BlockLists(NamedTuple):
    """One direction's lists: for line ``r = (b * H + h) * blocks + i`` (query block i, or key block i
    for the transposed lists), its full blocks are ``full_blocks[full_offsets[r]:full_offsets[r + 1]]``
    and its partial ones ``partial_blocks[partial_offsets[r]:...]``, whose bits are
    ``BlockMask.bits[partial_bits[...]]``. All int32, on the mask's device."""

    full_offsets: torch.Tensor
    full_blocks: torch.Tensor
    partial_offsets: torch.Tensor
    partial_blocks: torch.Tensor
    partial_bits: torch.Tensor


class BlockMask:
    """A bool mask ``[B, H, Lq, Lk]`` held block-sparsely (see the module). Build one with
    `from_mask_mod`, `from_mask`, `from_blocks` or `from_flex`; pass it as ``block_mask=``.

    ``rows``: the `BlockLists` by query block; ``cols``: by key block; both are views of ``lists``,
    one int32 tensor that the kernels take whole: its first ten ints are where each of the ten lists
    starts in it (rows' five fields, then cols'). ``bits``: uint8 ``[partial blocks, bs, bs / 8]``,
    bit ``j % 8`` of byte ``[p, i, j // 8]`` for (query i, key j) of partial block p, relative to
    the block's corner.
    """

    def __init__(self, shape, block_size, lists, bits):
        self.shape = tuple(shape)
        self.block_size = block_size
        self.lists = lists
        self.bits = bits
        starts = lists[:len(BlockLists._fields) * 2].tolist() + [lists.numel()]
        views = [lists[start:stop] for start, stop in zip(starts[:-1], starts[1:])]
        self.rows = BlockLists(*views[:len(BlockLists._fields)])
        self.cols = BlockLists(*views[len(BlockLists._fields):])

    def __repr__(self):
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, density={self.density:.3g}, "
                f"full={self.rows.full_blocks.numel()}, partial={self.rows.partial_blocks.numel()})")

    def to(self, device, non_blocking=False):
        """The same mask on `device`, as `torch.Tensor.to` moves a tensor (itself where it is there
        already): a model split across devices moves each layer's inputs so."""
        lists, bits = (t.to(device, non_blocking=non_blocking) for t in (self.lists, self.bits))
        return self if lists is self.lists and bits is self.bits else BlockMask(self.shape, self.block_size, lists, bits)

    @property
    def static_key(self):
        """What a call's checks read of it: its shape, block size and device."""
        return BlockMask, self.shape, self.block_size, self.device

    @property
    def device(self):
        return self.bits.device

    @property
    def num_blocks(self):
        """(query blocks, key blocks)."""
        return tuple(-(-n // self.block_size) for n in self.shape[2:])

    @property
    def density(self):
        """The fraction of (query block, key block) pairs that are not empty."""
        pairs = math.prod(self.shape[:2]) * math.prod(self.num_blocks)
        return (self.rows.full_blocks.numel() + self.rows.partial_blocks.numel()) / max(pairs, 1)

    @property
    def memory_bytes(self):
        """Bytes held: the lists of both directions and the partial blocks' bits."""
        return self.lists.numel() * self.lists.element_size() + self.bits.numel()

    @property
    def kernel_args(self):
        """The `OpArgs` fields the kernels read it through."""
        return dict(block_lists=self.lists, block_bits=self.bits, block_size=self.block_size,
                    block_batch=self.shape[0], block_heads=self.shape[1])

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_mask_mod(cls, mask_mod, B, H, Lq, Lk, *, device, block_size=128):
        """From FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, called with int64 index
        tensors that broadcast against each other (shapes [B, 1, 1, 1], [1, H, 1, 1], [1, 1, rows, 1],
        [1, 1, 1, cols]), a chunk of blocks at a time: it must be plain torch of them (no Python
        ``if`` on their values). ``B``/``H`` None mean 1 (shared by every batch / head)."""
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool tensor, got "
                            f"{type(mask_mod).__name__}")
        B, H = 1 if B is None else B, 1 if H is None else H
        shape = _checked_shape((B, H, Lq, Lk), "B, H, Lq, Lk")
        device = torch.device(device)
        _check_block_size(block_size)

        def piece(q0, q1, k0, k1):
            return _mask_mod_piece(mask_mod, shape, q0, q1, k0, k1, device)

        return _built(shape, block_size, device, piece)

    @classmethod
    def from_mask(cls, mask, *, block_size=128):
        """From a dense bool mask broadcastable to ``[B, H, Lq, Lk]`` (2 to 4 dims; B and H 1 or full)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if not 2 <= mask.dim() <= 4:
            raise ValueError(f"mask must have 2 to 4 dims ([B, H, Lq, Lk], leading ones optional), got shape "
                             f"{tuple(mask.shape)}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        _checked_shape(tuple(mask.shape), "mask's B, H, Lq, Lk")
        _check_block_size(block_size)
        return _built(tuple(mask.shape), block_size, mask.device, lambda q0, q1, k0, k1: mask[:, :, q0:q1, k0:k1])

    @classmethod
    def from_blocks(cls, block_map, Lq, Lk, *, block_size=128):
        """From a bool ``[B | 1, H | 1, ceil(Lq / bs), ceil(Lk / bs)]`` map: True = every (query, key) of
        that block may attend (the call's other rules still apply element-wise)."""
        _check_block_size(block_size)
        if not isinstance(block_map, torch.Tensor) or block_map.dtype != torch.bool:
            raise TypeError(f"block_map must be a bool tensor, got "
                            f"{block_map.dtype if isinstance(block_map, torch.Tensor) else type(block_map).__name__}")
        _checked_shape((1, 1, Lq, Lk), "Lq and Lk")
        blocks = (-(-Lq // block_size), -(-Lk // block_size))
        if block_map.dim() != 4 or tuple(block_map.shape[2:]) != blocks:
            raise ValueError(f"block_map must be [B | 1, H | 1, ceil(Lq / {block_size}), ceil(Lk / {block_size})] "
                             f"= [B | 1, H | 1, {blocks[0]}, {blocks[1]}], got shape {tuple(block_map.shape)}")
        _checked_shape((*block_map.shape[:2], Lq, Lk), "block_map's B and H, Lq, Lk")

        def piece(q0, q1, k0, k1):
            return _blocks_piece(block_map, block_size, q0, q1, k0, k1)

        return _built((*block_map.shape[:2], Lq, Lk), block_size, block_map.device, piece)

    @classmethod
    def from_flex(cls, flex_block_mask):
        """From torch's FlexAttention ``BlockMask`` (``create_block_mask``), with its meaning: its full
        blocks attend in full, its partial blocks where its ``mask_mod`` says, the rest not at all."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        if not isinstance(flex_block_mask, FlexBlockMask):
            raise TypeError(f"from_flex takes a torch.nn.attention.flex_attention.BlockMask, got "
                            f"{type(flex_block_mask).__name__}")
        q_block, kv_block = flex_block_mask.BLOCK_SIZE
        if q_block != kv_block:
            raise ValueError(f"the FlexAttention BlockMask's BLOCK_SIZE must be square, got {(q_block, kv_block)}")
        _check_block_size(q_block)
        B, H = flex_block_mask.kv_num_blocks.shape[:2]
        Lq, Lk = flex_block_mask.seq_lengths
        kinds = _flex_block_kinds(flex_block_mask, -(-Lk // kv_block))
        device = kinds.device

        def piece(q0, q1, k0, k1):
            kind = _blocks_piece(kinds, q_block, q0, q1, k0, k1, dtype=torch.uint8)
            partial = _mask_mod_piece(flex_block_mask.mask_mod, (B, H, Lq, Lk), q0, q1, k0, k1, device)
            return (kind == _FULL) | ((kind == _PARTIAL) & partial)

        return _built((B, H, Lq, Lk), q_block, device, piece)

    # -- reading ---------------------------------------------------------------------------------

    def to_dense(self):
        """The bool ``[B, H, Lq, Lk]`` tensor this stands for (for tests and small sizes)."""
        return self.dense_rows(0, self.shape[2])

    def dense_rows(self, start, stop):
        """Rows ``[start, stop)`` of `to_dense`, made from the lists of the blocks they are in only (the
        reference path takes a chunk of queries at a time)."""
        B, H, Lq, Lk = self.shape
        bs = self.block_size
        first, last = start // bs, -(-stop // bs)
        n_rows, n_cols = self.num_blocks
        dense = torch.zeros(B, H, last - first, bs, n_cols, bs, dtype=torch.bool, device=self.device)
        full_lines, full_blocks = _entries(self.rows.full_offsets, self.rows.full_blocks)
        part_lines, part_blocks = _entries(self.rows.partial_offsets, self.rows.partial_blocks)
        for lines, blocks, bit_ids in ((full_lines, full_blocks, None),
                                       (part_lines, part_blocks, self.rows.partial_bits)):
            block_row = lines % n_rows
            chosen = (block_row >= first) & (block_row < last)
            head_line = lines[chosen] // n_rows
            # [B, H, row block, key block, bs, bs]: the chosen blocks' elements.
            at = (head_line // H, head_line % H, block_row[chosen] - first, blocks[chosen].long())
            if bit_ids is None:
                dense.permute(0, 1, 2, 4, 3, 5)[at] = True
            else:
                dense.permute(0, 1, 2, 4, 3, 5)[at] = _unpacked(self.bits[bit_ids[chosen].long()], bs)
        dense = dense.view(B, H, (last - first) * bs, n_cols * bs)
        return dense[:, :, start - first * bs:stop - first * bs, :Lk]


_EMPTY, _PARTIAL, _FULL = 0, 1, 2


def _check_block_size(block_size):
    if type(block_size) is not int or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (the kernels' tiles iterate inside a block), "
                         f"got {block_size!r}")


def _checked_shape(shape, names):
    if not all(type(n) is int and n >= 0 for n in shape) or min(shape[:2]) < 1:
        raise ValueError(f"{names} must be ints (B and H >= 1, the lengths >= 0), got {shape}")
    return shape


def _mask_mod_piece(mask_mod, shape, q0, q1, k0, k1, device):
    B, H = shape[:2]
    index = dict(dtype=torch.int64, device=device)
    result = mask_mod(torch.arange(B, **index).view(B, 1, 1, 1), torch.arange(H, **index).view(1, H, 1, 1),
                      torch.arange(q0, q1, **index).view(1, 1, -1, 1), torch.arange(k0, k1, **index).view(1, 1, 1, -1))
    if not isinstance(result, torch.Tensor) or result.dtype != torch.bool:
        raise TypeError(f"mask_mod must return a bool tensor, got "
                        f"{result.dtype if isinstance(result, torch.Tensor) else type(result).__name__}")
    return result


def _blocks_piece(block_map, bs, q0, q1, k0, k1, dtype=None):
    """Elements [q0, q1) x [k0, k1) (q0 and k0 on block boundaries) of a per-block map."""
    blocks = block_map[:, :, q0 // bs:-(-q1 // bs), k0 // bs:-(-k1 // bs)]
    if dtype is not None:
        blocks = blocks.to(dtype)
    return blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :q1 - q0, :k1 - k0]


def _flex_block_kinds(flex_block_mask, n_cols):
    """[B, H, query blocks, key blocks] uint8 of a FlexAttention BlockMask: _EMPTY, _PARTIAL, _FULL (its
    own tables are this size already)."""
    kinds = torch.zeros(*flex_block_mask.kv_num_blocks.shape, n_cols + 1, dtype=torch.uint8,
                        device=flex_block_mask.kv_num_blocks.device)
    for counts, indices, kind in ((flex_block_mask.kv_num_blocks, flex_block_mask.kv_indices, _PARTIAL),
                                  (flex_block_mask.full_kv_num_blocks, flex_block_mask.full_kv_indices, _FULL)):
        if counts is None:
            continue
        listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
        # Unlisted slots go to the spare last column, cut below.
        kinds.scatter_(-1, torch.where(listed, indices.long(), n_cols), kind)
    return kinds[..., :n_cols]


def _built(shape, block_size, device, piece):
    """The BlockMask of the bool elements ``piece(q0, q1, k0, k1)`` (broadcastable to [B, H, q1 - q0,
    k1 - k0]), asked a chunk of whole blocks at a time (`BUILD_ELEMENTS`)."""
    B, H, Lq, Lk = shape
    bs = block_size
    n_rows, n_cols = -(-Lq // bs), -(-Lk // bs)
    per_block = B * H * bs * bs
    cols_per_chunk = max(1, min(n_cols, BUILD_ELEMENTS // per_block))
    rows_per_chunk = max(1, BUILD_ELEMENTS // (per_block * cols_per_chunk))
    full, partial, bits = [], [], []
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        for c0 in range(0, n_cols, cols_per_chunk):
            c1 = min(n_cols, c0 + cols_per_chunk)
            q0, q1, k0, k1 = r0 * bs, min(Lq, r1 * bs), c0 * bs, min(Lk, c1 * bs)
            elements = torch.zeros(B, H, (r1 - r0) * bs, (c1 - c0) * bs, dtype=torch.bool, device=device)
            elements[:, :, :q1 - q0, :k1 - k0] = piece(q0, q1, k0, k1)  # broadcasts B and H; out of bounds: False
            blocks = elements.view(B, H, r1 - r0, bs, c1 - c0, bs).transpose(3, 4)
            counts = blocks.sum((4, 5))
            for found, into in ((counts == bs * bs, full), ((counts > 0) & (counts < bs * bs), partial)):
                b, h, r, c = found.nonzero(as_tuple=True)
                into.append(torch.stack([(b * H + h) * n_rows + r + r0, c + c0]))
                if into is partial:
                    bits.append(packed_bits(blocks[b, h, r, c]))
    full = torch.cat(full, 1) if full else torch.zeros(2, 0, dtype=torch.int64, device=device)
    partial = torch.cat(partial, 1) if partial else torch.zeros(2, 0, dtype=torch.int64, device=device)
    bits = torch.cat(bits) if bits else torch.zeros(0, bs, bs // 8, dtype=torch.uint8, device=device)
    # Each line's blocks in increasing order; the bits follow their block.
    order = _ordered(partial[0] * n_cols + partial[1])
    partial, bits = partial[:, order], bits[order]
    full = full[:, _ordered(full[0] * n_cols + full[1])]
    rows = _lists(full, partial, torch.arange(partial.shape[1], device=device), B * H * n_rows)
    # The transposed lists: line (b * H + h) * n_cols + key block, entries the query blocks.
    full_t, partial_t = (_transposed(x, n_rows, n_cols) for x in (full, partial))
    order_t = _ordered(partial_t[0] * n_rows + partial_t[1])
    cols = _lists(full_t[:, _ordered(full_t[0] * n_rows + full_t[1])], partial_t[:, order_t], order_t,
                  B * H * n_cols)
    return BlockMask(shape, bs, joined_lists((*rows, *cols), device), bits)


def _ordered(keys):
    return torch.argsort(keys, stable=True)


def _transposed(entries, n_rows, n_cols):
    line, block = entries
    head_line, block_row = line // n_rows, line % n_rows
    return torch.stack([head_line * n_cols + block, block_row])


def _lists(full, partial, partial_bits, n_lines):
    return BlockLists(_offsets(full[0], n_lines), full[1].to(torch.int32), _offsets(partial[0], n_lines),
                      partial[1].to(torch.int32), partial_bits.to(torch.int32))


def _offsets(lines, n_lines):
    counts = torch.bincount(lines, minlength=n_lines)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def _entries(offsets, blocks):
    """(line, block) int64 of every entry of a sparse-row list."""
    counts = (offsets[1:] - offsets[:-1]).long()
    lines = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)
    return lines, blocks.long()


def joined_lists(sections, device):
    """The ten lists (rows' five `BlockLists` fields, then cols') as one int32 tensor after a header of
    where each starts in it (`BlockMask.lists`)."""
    starts = [len(sections)]
    for section in sections[:-1]:
        starts.append(starts[-1] + section.numel())
    return torch.cat([_header(tuple(starts), device), *sections])


_HEADERS = {}  # (section starts, device) -> the lists' header, made once: no copy to the device per call


def _header(starts, device):
    if torch.compiler.is_compiling():
        return torch.tensor(starts, dtype=torch.int32, device=device)
    header = _HEADERS.get((starts, device))
    if header is None:
        if len(_HEADERS) >= 64:
            _HEADERS.clear()
        header = _HEADERS[(starts, device)] = torch.tensor(starts, dtype=torch.int32, device=device)
    return header


def packed_bits(elements):
    """bool (or 0/1 uint8) [..., n] -> uint8 [..., n / 8]: bit j % 8 of byte j // 8 is element j
    (a block's [bs, bs] bits are its rows of bs / 8 bytes)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=elements.device)
    return (elements.unflatten(-1, (-1, 8)).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def _unpacked(bits, bs):
    """uint8 [n, bs, bs / 8] -> bool [n, bs, bs]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).view(bits.shape[0], bs, bs).bool()
