"""Launch-side helpers shared by the forward and backward launchers: tile configs and kernel arguments."""

from typing import NamedTuple

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from kernels.attn_common import ADD_MASK, BOOL_MASK, LOG2E, NO_MASK, _dot

# Under Triton's interpreter (TRITON_INTERPRET=1 when the kernels were defined) every @triton.jit
# function is an InterpretedFunction that runs with numpy on CPU tensors.
INTERPRETED = isinstance(_dot, InterpretedFunction)


class LaunchArgs(NamedTuple):
    mask: torch.Tensor
    mask_strides: tuple
    mask_kind: int
    band_lo: int
    band_hi: int
    qk_scale: float
    head_dim_pad: int
    fp32_dot: bool
    input_precision: str


def launch_args(q, k, mask, band_lo, band_hi, scale):
    """Kernel arguments that every pass derives the same way from the op's inputs."""
    batch, num_heads_q, len_q, head_dim = q.shape
    len_k = k.shape[2]
    if mask is None:
        mask, mask_strides, mask_kind = q, (0, 0, 0, 0), NO_MASK.value
    else:
        # A broadcast view: size-1 dimensions get stride 0, nothing is copied.
        mask = mask.expand(batch, num_heads_q, len_q, len_k)
        mask_kind = BOOL_MASK.value if mask.dtype == torch.bool else ADD_MASK.value
        if mask_kind == BOOL_MASK.value:
            mask = mask.view(torch.uint8)
        mask_strides = mask.stride()
    # An unbounded side of the band becomes an offset no index pair can reach.
    reach = len_q + len_k
    fp32 = q.dtype == torch.float32
    tf32 = fp32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return LaunchArgs(
        mask=mask,
        mask_strides=mask_strides,
        mask_kind=mask_kind,
        band_lo=-reach if band_lo is None else band_lo,
        band_hi=reach if band_hi is None else band_hi,
        qk_scale=scale * LOG2E.value,
        head_dim_pad=max(16, triton.next_power_of_2(head_dim)),
        # The interpreter's bf16 dot multiplies raw bits; upcasting is exact, so results stay faithful.
        fp32_dot=INTERPRETED and q.dtype == torch.bfloat16,
        input_precision="tf32" if tf32 else "ieee",
    )


class TileConfig(NamedTuple):
    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# By element size, pass and padded head dim: the largest tiles that compile for sm_90 without
# register spills in the mask-free kernels (`python -m bench.compile_check`, which also lists the
# small spills masks and dropout add). Untimed: tuning them on a GPU is still to do. float32 with
# IEEE products runs on FMA units, not tensor cores, and needs the smallest tiles: a slow path.
TILES = {
    2: {
        "fwd": {64: TileConfig(128, 64, 8, 3), 128: TileConfig(128, 64, 8, 3), 256: TileConfig(64, 32, 8, 2)},
        "dkdv": {64: TileConfig(32, 64, 4, 2), 128: TileConfig(32, 64, 8, 2), 256: TileConfig(32, 32, 8, 1)},
        "dq": {64: TileConfig(128, 32, 8, 2), 128: TileConfig(128, 32, 8, 2), 256: TileConfig(32, 32, 4, 2)},
    },
    4: {
        "fwd": {64: TileConfig(32, 32, 4, 2), 128: TileConfig(16, 16, 4, 2), 256: TileConfig(16, 16, 4, 2)},
        "dkdv": {64: TileConfig(16, 16, 8, 2), 128: TileConfig(16, 16, 8, 2), 256: TileConfig(16, 16, 8, 2)},
        "dq": {64: TileConfig(16, 16, 4, 2), 128: TileConfig(16, 16, 4, 2), 256: TileConfig(16, 16, 4, 2)},
    },
}


def tile_config(q, kernel="fwd", config=None):
    """The tile config of one pass ("fwd", "dkdv" or "dq") by head dim and dtype, unless `config` is given."""
    if config is not None:
        return TileConfig(*config)
    if INTERPRETED:
        return TileConfig(64, 64, 4, 1)  # the interpreter's cost is per tile step: big tiles, few steps
    major = torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 9
    return tile_for(q.element_size(), kernel, q.shape[-1], major)


def tile_for(element_size, kernel, head_dim, major):
    """The table's tile for a GPU of compute capability `major`.x."""
    tile = TILES[element_size][kernel][max(64, triton.next_power_of_2(head_dim))]
    if major < 9:  # pre-Hopper: 99 to 163 KB of shared memory per block instead of 227
        tile = tile._replace(num_stages=min(tile.num_stages, 2))
        if kernel == "dq" and head_dim > 64:
            tile = tile._replace(block_m=min(tile.block_m, 64))
    return tile
