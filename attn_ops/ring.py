"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed
group (ring attention), and the helpers that shard and gather such a sequence.

Each rank holds a shard of q, k and v along the sequence. The K/V shards travel around the ring
(rank r sends to r + 1 and receives from r - 1) with point-to-point calls, the next shard's
transfer running while the current one is attended; each block's partial output merges into the
running result through its LSE. The backward sends K/V around again, with their float32 gradient
accumulators travelling beside them and arriving home after the last step.

Layouts of a sequence of 8 positions on W = 2 ranks (the sequence cut into 2W chunks of 2)::

    contiguous   rank 0: 0 1 2 3    rank 1: 4 5 6 7        (rank r: chunk r of W)
    zigzag       rank 0: 0 1 6 7    rank 1: 2 3 4 5        (rank r: chunks r and 2W-1-r of 2W)

Under causal, a query chunk sees the key chunks before it in full, its own chunk on the diagonal,
and none after it (those blocks are skipped, not computed). Contiguous leaves rank 0 one block of
work and rank W-1 W blocks; zigzag gives every rank the same work.
"""

import dataclasses
import math

import torch
import torch.distributed as dist

from .checks import check_causal, values_checked
from .dispatch import choose
from .problem import describe

__all__ = ["gather_sequence", "ring_attention", "shard_sequence"]

LAYOUTS = ("zigzag", "contiguous")
# Options of `attention` that ring attention refuses, and why.
NOT_SUPPORTED = {
    "mask": "a tensor mask would have to be sharded along both sequence axes; use causal",
    "window": "sliding windows are not built into ring attention",
    "dropout_p": "dropout is not built into ring attention",
    "seed": "dropout is not built into ring attention",
}


def ring_attention(q, k, v, *, group=None, causal=False, layout="zigzag", scale=None, return_lse=False,
                   **options):
    """`attention` on a sequence sharded across the ranks of `group`, equal to `attention` on the
    gathered tensors (forward and backward, within the dtype's tolerance).

    Args:
        q, k, v: this rank's shards ``[B, Hq, L / W, D]``, ``[B, Hkv, L / W, D]``, ``[B, Hkv, L / W, Dv]``
            (as `shard_sequence` makes them), each rank's of the same shape. GQA: only the kv heads
            travel.
        group: the process group (default: the default group); any backend (NCCL, gloo).
        causal: False or True (``"top_left"`` and ``"bottom_right"`` mean the same for a sequence
            attending to itself).
        layout: ``"zigzag"`` (rank r holds chunks r and 2W-1-r of 2W: equal causal work on every rank)
            or ``"contiguous"`` (rank r holds chunk r of W). The same on every rank, and the one the
            shards were made with.
        scale: default ``1 / sqrt(D)``.
        return_lse: also return this rank's rows of the LSE ``[B, Hq, L / W]`` float32 (natural log).

    Returns:
        this rank's shard of the output ``[B, Hq, L / W, Dv]`` in q's dtype, or ``(out, lse)``.

    Runs the fused kernels on CUDA and the reference elsewhere (the kernels through the interpreter
    inside ``attn_ops.use_backend("triton")``). Inside ``attn_ops.checked_values()`` each call first
    checks, with one small all-gather read on the host, that all ranks hold shards of one shape and
    ask for the same layout and causal rule (a mismatch would hang the ring or mix unrelated data);
    outside, that is trusted, so a call never waits for the GPU.
    """
    for name in options:
        if name not in NOT_SUPPORTED:
            raise TypeError(f"ring_attention() got an unexpected keyword argument {name!r}")
        raise ValueError(f"ring_attention does not take {name}: {NOT_SUPPORTED[name]}")
    ring = _Ring(group, layout)
    problem = describe(q, k, v, scale=scale, return_lse=return_lse)
    causal = check_causal(causal) is not None
    if causal and problem.len_q != problem.len_k:
        raise ValueError(f"causal ring attention needs q and k shards of one length (a sequence attending to "
                         f"itself), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and layout == "zigzag" and problem.len_q % 2:
        raise ValueError(f"a zigzag shard is two equal chunks, so its length must be even; q has {problem.len_q} "
                         f"positions (shard the sequence with shard_sequence)")
    if values_checked():  # an all-gather and a host read: on request only (attn_ops.checked_values)
        ring.check_same_everywhere("q, k, v", [*q.shape, *k.shape, v.shape[-1], causal, LAYOUTS.index(layout)],
                                   "shapes, layout and causal", q.device)
    engine = choose(problem, "auto")
    out, lse = RingAttention.apply(q, k, v, ring, engine, causal, problem.scale)
    return (out, lse) if return_lse else out


def shard_sequence(x, *, group=None, layout="zigzag", dim=2):
    """This rank's shard of the full tensor `x` (the same on every rank) along `dim` (zigzag: chunks
    r and 2W-1-r of 2W, concatenated; contiguous: chunk r of W, a view)."""
    ring = _Ring(group, layout)
    dim = _check_sequence_dim(x, dim)
    length, pieces = x.shape[dim], ring.chunks_per_rank * ring.world
    if length % pieces:
        raise ValueError(f"x has {length} positions along dim {dim}, which layout={layout!r} on {ring.world} ranks "
                         f"cannot split into {pieces} equal chunks")
    return ring.shard(x, dim)


def gather_sequence(x, *, group=None, layout="zigzag", dim=2):
    """The full tensor from every rank's shard `x` along `dim`, on every rank (the inverse of
    `shard_sequence`).

    Differentiable as if every rank computed the same function of the gathered tensor: the gradient
    of this rank's shard is its part of the gathered tensor's gradient here (no communication; where
    ranks compute different functions of it, all-reduce those gradients first).
    """
    ring = _Ring(group, layout)
    dim = _check_sequence_dim(x, dim)
    if ring.chunks_per_rank == 2 and x.shape[dim] % 2:
        raise ValueError(f"x has {x.shape[dim]} positions along dim {dim}: a zigzag shard is two equal chunks")
    if values_checked():
        ring.check_same_everywhere("x", list(x.shape), "shape", x.device)
    return _GatherSequence.apply(x, ring, dim)


class _Ring:
    """A process group seen as a ring, with the sequence layout of its shards."""

    def __init__(self, group, layout):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"group={group!r}: torch.distributed has no initialised process group; call "
                             "torch.distributed.init_process_group first")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # Point-to-point calls address peers by their rank in the default group.
        self.next, self.prev = ((self.rank + 1) % self.world, (self.rank - 1) % self.world)
        if group is not None:
            self.next, self.prev = dist.get_global_rank(group, self.next), dist.get_global_rank(group, self.prev)
        self.chunks_per_rank = 2 if layout == "zigzag" else 1

    def chunks(self, rank):
        """The sequence chunks `rank` holds, in shard order."""
        return (rank, 2 * self.world - 1 - rank) if self.chunks_per_rank == 2 else (rank,)

    def shard(self, x, dim):
        """This rank's shard of the full `x` along `dim` (a view for the contiguous layout)."""
        size = x.shape[dim] // (self.chunks_per_rank * self.world)
        mine = [x.narrow(dim, chunk * size, size) for chunk in self.chunks(self.rank)]
        return mine[0] if len(mine) == 1 else torch.cat(mine, dim)

    def blocks(self, src, causal, len_q, len_k):
        """What this rank's queries compute against rank `src`'s keys: (query rows, number of leading
        keys, band_hi) per piece, band_hi None for a piece that sees its keys in full. Under causal,
        each query chunk sees the key chunks before it in full and its own on the diagonal (query i
        sees local key j <= i + that chunk's offset in the shard): always a prefix of the keys."""
        if not causal:
            return [(slice(0, len_q), len_k, None)]
        size, pieces = len_q // self.chunks_per_rank, []
        key_chunks = self.chunks(src)
        for i, chunk in enumerate(self.chunks(self.rank)):
            before = sum(c < chunk for c in key_chunks)
            rows = slice(i * size, (i + 1) * size)
            if chunk in key_chunks:
                pieces.append((rows, (before + 1) * size, before * size))
            elif before:
                pieces.append((rows, before * size, None))
        return pieces

    def pass_on(self, tensor):
        """Sends `tensor` to the next rank and receives the previous rank's into a new buffer; returns
        a wait() that gives the received tensor once both transfers are done."""
        if self.world == 1:
            return lambda: tensor
        received = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, tensor, self.next, self.group),
                                        dist.P2POp(dist.irecv, received, self.prev, self.group)])

        def wait():
            for work in works:
                work.wait()
            return received

        return wait

    def check_same_everywhere(self, what, values, described, device):
        """Raises on every rank unless all ranks passed the same `values` (one small all-gather, on the
        data's device: the one the group's backend serves)."""
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        for rank, theirs in enumerate(every):
            if not torch.equal(theirs, mine):
                raise ValueError(f"{what}: every rank must pass the same {described}; rank {rank} passed "
                                 f"{theirs.tolist()}, rank {self.rank} {values} (shard_sequence makes equal shards)")


def _check_sequence_dim(x, dim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim!r}")
    return dim % x.dim()


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring, dim):
        ctx.ring, ctx.dim = ring, dim
        shards = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(ring.world)]
        dist.all_gather(shards, x.contiguous(), group=ring.group)
        pieces = [None] * (ring.world * ring.chunks_per_rank)
        for rank, shard in enumerate(shards):
            for chunk, piece in zip(ring.chunks(rank), shard.chunk(ring.chunks_per_rank, dim)):
                pieces[chunk] = piece
        return torch.cat(pieces, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ring.shard(grad, ctx.dim), None, None


class RingAttention(torch.autograd.Function):
    """Saves this rank's q, k, v, out and lse (in the implementation's units): no [Lq, Lk] tensor and
    nothing from other ranks."""

    @staticmethod
    def forward(ctx, q, k, v, ring, engine, causal, scale):
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=wide)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=wide)
        kv = _pack(k, v)
        for step in range(ring.world):
            received = ring.pass_on(kv) if step < ring.world - 1 else None
            k_src, v_src = _unpack(kv, k, v)
            for rows, keys, band_hi in ring.blocks((ring.rank - step) % ring.world, causal, q.shape[2], k.shape[2]):
                q_rows, k_keys, v_keys = q[:, :, rows], k_src[:, :, :keys], v_src[:, :, :keys]
                block = _block(q_rows, k_keys, v_keys, scale, band_hi)
                _merge(out[:, :, rows], lse[:, :, rows], *engine.run_block(q_rows, k_keys, v_keys, block),
                       engine.LSE_BASE)
            if received:
                kv = received()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.engine, ctx.causal, ctx.scale = ring, engine, causal, scale
        ctx.set_materialize_grads(False)
        return out, lse * math.log(engine.LSE_BASE)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, engine = ctx.ring, ctx.engine
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        if dlse is not None:  # the gradient of the LSE in the implementation's units
            dlse = dlse * math.log(engine.LSE_BASE)
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=wide, device=q.device)
        kv = _pack(k, v)
        mine = torch.zeros(kv.shape, dtype=wide, device=kv.device)  # this rank's share for the keys it holds
        dkv = received_dkv = None
        for step in range(ring.world):
            received_kv = ring.pass_on(kv) if step < ring.world - 1 else None
            k_src, v_src = _unpack(kv, k, v)
            dk_src, dv_src = _unpack(mine.zero_(), k, v)
            for rows, keys, band_hi in ring.blocks((ring.rank - step) % ring.world, ctx.causal, q.shape[2],
                                                   k.shape[2]):
                q_rows, k_keys, v_keys = q[:, :, rows], k_src[:, :, :keys], v_src[:, :, :keys]
                block = _block(q_rows, k_keys, v_keys, ctx.scale, band_hi)
                dq_rows, dk_keys, dv_keys = engine.block_grads(
                    dout[:, :, rows], None if dlse is None else dlse[:, :, rows], q_rows, k_keys, v_keys,
                    out[:, :, rows], lse[:, :, rows], block)
                dq[:, :, rows] += dq_rows
                dk_src[:, :, :keys] += dk_keys
                dv_src[:, :, :keys] += dv_keys
            # The accumulator of these keys arrives from the previous rank (which added its share
            # one step ago); after the last step it goes to the keys' owner, the next rank.
            dkv = mine.clone() if received_dkv is None else received_dkv().add_(mine)
            received_dkv = ring.pass_on(dkv)
            if received_kv:
                kv = received_kv()
        dk, dv = _unpack(received_dkv(), k, v)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _block(q, k, v, scale, band_hi):
    """The `Problem` of queries q against one block of keys: causal within it through band_hi."""
    problem = describe(q, k, v, scale=scale, return_lse=True)
    return dataclasses.replace(problem, band_hi=band_hi, requires_grad=False)


def _pack(k, v):
    """k and v in one contiguous buffer: one message per transfer."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buffer, k, v):
    """Views of `buffer` shaped as k and v (contiguous)."""
    return buffer[: k.numel()].view(k.shape), buffer[k.numel() :].view(v.shape)


def _merge(out, lse, block_out, block_lse, base):
    """out, lse <- the result over the union of the keys seen so far and one more block of keys, in
    place. The LSEs are in log-base `base` units; a row that has seen no key on either side keeps
    lse = -inf and weight 0 (not the NaN of -inf - -inf)."""
    exp, logaddexp = (torch.exp2, torch.logaddexp2) if base == 2 else (torch.exp, torch.logaddexp)
    merged = logaddexp(lse, block_lse)
    out.mul_(exp(lse - merged).nan_to_num_(0.0)[..., None])
    out.add_(block_out * exp(block_lse - merged).nan_to_num_(0.0)[..., None])
    lse.copy_(merged)
