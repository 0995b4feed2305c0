"""The kernels' configuration, read by the launchers, the compile check and (next) the autotuner:
mask kinds, head-dim padding, tile tables, and whether the kernels run in Triton's interpreter."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# How a mask reaches the kernels. Globals a kernel reads must be tl.constexpr instances (compiled
# Triton rejects annotated plain globals).
NO_MASK = tl.constexpr(0)
BOOL_MASK = tl.constexpr(1)  # a uint8 view of a bool tensor: nonzero = may attend
ADD_MASK = tl.constexpr(2)  # a float tensor added to the scores
MASK_KIND_NAMES = {NO_MASK.value: "none", BOOL_MASK.value: "bool", ADD_MASK.value: "add"}


@triton.jit
def _probe():
    pass


# Under Triton's interpreter (TRITON_INTERPRET=1 when triton was first imported) every @triton.jit
# function is an InterpretedFunction that runs with numpy on CPU tensors.
INTERPRETED = isinstance(_probe, InterpretedFunction)


MAX_HEAD_DIM = 512  # head dims the tile tables cover


# Host arithmetic in plain ints: triton.cdiv and triton.next_power_of_2 are constexpr functions,
# microseconds per call from the host, several times per launch.
def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def head_dim_pad(head_dim):
    """Tiles span a power of two of at least 16 (tl.dot's smallest K); loads mask the padding."""
    return max(16, next_power_of_2(head_dim))


_DEVICE_PROPERTIES = {}


def device_properties(device):
    """torch's properties of a CUDA device (compute capability, multiprocessors), asked once per
    device: each query costs microseconds of every call's host time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = _DEVICE_PROPERTIES.get(index)
    if properties is None:
        properties = _DEVICE_PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return properties


def shared_memory_per_block(device):
    """The most shared memory (bytes) one block may opt into on a CUDA device: torch's property where
    it has it, else by compute capability (sm_80 and sm_87 163 KB, sm_86 and sm_89 99 KB, Hopper and
    later 227 KB)."""
    properties = device_properties(device)
    optin = getattr(properties, "shared_memory_per_block_optin", None)
    if optin:
        return optin
    if properties.major >= 9:
        return 232448
    return 166912 if (properties.major, properties.minor) in ((8, 0), (8, 7)) else 101376


# float32's dK/dV and dQ at head dims past 256 (16-row tiles, one stage) take about 132 KB.
FLOAT32_WIDE_SHARED = 133120


class TileConfig(NamedTuple):
    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# By element size, pass and padded head dim: the largest tiles that compile for sm_90 without
# register spills in the mask-free kernels (`python -m bench.compile_check`, which also lists the
# small spills masks and dropout add). Untimed: tuning them on a GPU is still to do. float32 with
# IEEE products runs on FMA units, not tensor cores, and needs the smallest tiles: a slow path.
# dK/dV computes transposed tiles, keys as the matmuls' M: 64 or more keys make them wgmma on
# Hopper; at D = 128 only 16 queries x 128 keys (8 warps) fit without spills, at D = 256 no wgmma
# tile does (32 x 32 stays mma.sync). At D = 512 (Gemma 4's global layers) an accumulator row is 2 KB
# of float32: the smallest tiles, mma.sync, one or two stages. The mask-free passes compile without
# spills in 2-byte dtypes; masks and dropout spill 8 to 144 bytes in dK/dV and dQ, and float32's dQ
# about 1.9 KB (its [16, 512] q, dO and dQ rows do not fit one thread's registers).
TILES = {
    2: {
        "fwd": {64: TileConfig(128, 64, 8, 3), 128: TileConfig(128, 64, 8, 3), 256: TileConfig(64, 32, 8, 2),
                512: TileConfig(32, 32, 8, 2)},
        "dkdv": {64: TileConfig(32, 64, 8, 2), 128: TileConfig(16, 128, 8, 2), 256: TileConfig(32, 32, 8, 1),
                 512: TileConfig(16, 16, 8, 1)},
        "dq": {64: TileConfig(128, 32, 8, 2), 128: TileConfig(128, 32, 8, 2), 256: TileConfig(32, 32, 4, 2),
               512: TileConfig(16, 16, 8, 1)},
    },
    4: {
        "fwd": {64: TileConfig(32, 32, 4, 2), 128: TileConfig(16, 16, 4, 2), 256: TileConfig(16, 16, 4, 2),
                512: TileConfig(16, 16, 8, 1)},
        "dkdv": {64: TileConfig(16, 16, 8, 2), 128: TileConfig(16, 16, 8, 2), 256: TileConfig(16, 16, 8, 2),
                 512: TileConfig(16, 16, 8, 1)},
        "dq": {64: TileConfig(16, 16, 4, 2), 128: TileConfig(16, 16, 4, 2), 256: TileConfig(16, 16, 4, 2),
               512: TileConfig(16, 16, 8, 1)},
    },
}
# Through TMA descriptors (Hopper) a tile costs no registers for addresses: with plain scores (no
# mask, dropout, cap or ALiBi, whose element-wise work takes registers) bigger tiles fit without
# spills. The forward's 128 x 128 is the tile of Triton's own tutorial.
TMA_TILES = {
    2: {"fwd": {64: TileConfig(128, 128, 8, 2), 128: TileConfig(128, 128, 8, 2)},
        "dq": {64: TileConfig(128, 64, 8, 2), 128: TileConfig(128, 64, 8, 2)},
        "dkdv": {64: TileConfig(64, 64, 8, 2), 128: TileConfig(32, 128, 8, 2)}},
}
# The passes read through TMA descriptors up to these padded head dims. Above 128 no wgmma tile of
# the backward fits in registers, and its mma.sync tiles, fed from descriptor-loaded shared memory,
# spill 350 to 950 bytes on sm_90 where the pointer path spills none (compile check).
TMA_MAX_HEAD_DIM = {"fwd": 256, "dkdv": 128, "dq": 128}
# Decoding (`attn_decode`), by element size and padded head dim: the most rows (query, head-of-the-
# group pairs) one program takes, and the key tiles, streamed as many stages ahead as shared memory
# allows (a decoding step is bound by reading the cache). The warps follow the rows a call has
# (`decode_tile`). With them every variant compiles for sm_90 (Triton 3.6) without spills: bf16 D=128
# at 16 rows 145 registers (paged 162), at 64 rows and 8 warps 183 (161); fp32 takes 16-row tiles.
# D=256 streams two stages: with three, 64 rows took 255 registers and spilled 56 to 64 bytes (two
# stages: 255, none; loop SASS per MFLOP 263 instead of 265, paged 419 instead of 487). D=512 takes
# 32 rows at most (180 registers, paged 188; float32 16 rows, dense 40 spill bytes).
DECODE_TILES = {
    2: {64: TileConfig(64, 64, 4, 3), 128: TileConfig(64, 64, 8, 3), 256: TileConfig(64, 64, 8, 2),
        512: TileConfig(32, 32, 8, 2)},
    4: {64: TileConfig(16, 32, 4, 3), 128: TileConfig(16, 64, 4, 3), 256: TileConfig(16, 16, 4, 2),
        512: TileConfig(16, 16, 8, 2)},
}
INTERPRETER_TILE = TileConfig(64, 64, 4, 1)  # the interpreter's cost is per tile step: big tiles, few steps


def tile_config(q, kernel, head_dim, config=None, tma=False, plain=False, block_size=0):
    """The tile config of one pass ("fwd", "dkdv" or "dq") by head dim (the larger of K's and V's),
    dtype, whether it reads through TMA descriptors and whether its scores are `plain`, unless
    `config` is given; with a block mask's `block_size`, its tile rows and columns no more than
    that (a pass's tiles iterate inside the mask's blocks: both are powers of two)."""
    if config is not None:
        tile = TileConfig(*config)
    elif INTERPRETED:
        tile = INTERPRETER_TILE
    else:
        major = device_properties(q.device).major if q.is_cuda else 9
        tile = tile_for(q.element_size(), kernel, head_dim, major, tma, plain)
    if block_size:
        tile = tile._replace(block_m=min(tile.block_m, block_size), block_n=min(tile.block_n, block_size))
    return tile


def decode_tile(q, head_dim, rows, config=None):
    """The decoding kernel's tile for `rows` (query, query head) pairs per kv head, by head dim and
    dtype, unless `config` is given (`decode_tile_for`)."""
    if config is not None:
        return TileConfig(*config)
    if INTERPRETED:
        return _decode_rows(INTERPRETER_TILE, head_dim, rows)
    major = device_properties(q.device).major if q.is_cuda else 9
    return decode_tile_for(q.element_size(), head_dim, rows, major)


def decode_tile_for(element_size, head_dim, rows, major):
    """`DECODE_TILES`'s tile for `rows` on a GPU of compute capability `major`.x."""
    tile = _decode_rows(DECODE_TILES[element_size][max(64, head_dim_pad(head_dim))], head_dim, rows)
    if major < 9:  # pre-Hopper: 99 to 163 KB of shared memory per block instead of 227
        tile = tile._replace(num_stages=min(tile.num_stages, 2))
        if head_dim > 128:
            tile = tile._replace(block_n=min(tile.block_n, 32))
    return tile


def _decode_rows(tile, head_dim, rows):
    """`tile` fitted to `rows`: block_m as many rows as there are, padded to a power of two of at
    least 16 (tl.dot's smallest M), up to the tile's; 4 warps up to 16 x 256 (or 32 x 128, 64 x 64)
    elements of rows, 8 beyond."""
    block_m = min(tile.block_m, max(16, next_power_of_2(rows)))
    return tile._replace(block_m=block_m, num_warps=4 if block_m * head_dim_pad(head_dim) <= 4096 else 8)


def tile_for(element_size, kernel, head_dim, major, tma=False, plain=False):
    """The table's tile for a GPU of compute capability `major`.x (`TMA_TILES`' through TMA with
    `plain` scores)."""
    tile = TILES[element_size][kernel][max(64, head_dim_pad(head_dim))]
    if tma and plain:
        tile = TMA_TILES.get(element_size, {}).get(kernel, {}).get(max(64, head_dim_pad(head_dim)), tile)
    if major < 9:  # pre-Hopper: 99 to 163 KB of shared memory per block instead of 227
        tile = tile._replace(num_stages=min(tile.num_stages, 2 if head_dim <= 256 else 1))
        if kernel == "dq" and head_dim > 64:
            tile = tile._replace(block_m=min(tile.block_m, 64))
        if kernel == "dkdv" and element_size == 2 and tile.block_m < 32 and head_dim <= 128:
            # Hopper's 16 x 128 spills on mma.sync
            tile = tile._replace(block_m=32, block_n=64)
    return tile
