"""`python -m bench.compile_check`: compile every kernel for a GPU architecture, no GPU needed, and
report what the interpreter cannot show: tiles that do not compile, registers, spills, shared
memory, which matmul instructions and loads the compiler chose, whether ptxas serialized the wgmma,
and how many instructions the forward's interior loop spends per unit of matmul work.

What it compiles is what the launchers launch. Each variant (pass, dtype, head dim, mask kind,
dropout, score modifiers, packed sequences, decoding) calls its launcher (`attn_fwd`, `attn_bwd`,
`varlen_fwd`, `varlen_bwd`, `decode_fwd`) on CPU tensors shaped like a real call, as if on a GPU
of the target's compute capability, so that the launcher picks tiles and TMA as it would there;
each kernel launch is recorded instead of run (`recorded_launches`). The recorded arguments are
bound as `JITFunction.run` binds them (`bind`: ints equal to 1 become constants, ints and pointers
divisible by 16 are marked so, tensor descriptors are typed by their box) and compiled with
`triton.compile` for the target with the launch's warps and stages. The cubin is read with the
`cuobjdump` in Triton's wheel: registers and stack bytes (spills) from ``-res-usage``; from the
SASS, whether the matmuls are wgmma (``HGMMA``) or mma.sync (``HMMA``), whether loads use TMA
(``UTMALDG``), and the loops (`loops`). ptxas's log gives its performance warnings: `wgmma
serialized` when it fenced the wgmma one by one (C7513, C7515). Must run without TRITON_INTERPRET=1.
Exits 1 if any variant fails to compile. `--json PATH` also writes the rows as JSON.

The committed tables (Triton 3.6 in a side venv V36, 3.9 in V39; 5 to 9 minutes each on 2 shared cores):

    PYTHONPATH=. V36/bin/python -m bench.compile_check --arch 90 --jobs 2 \\
        --out bench/results/sm90-2026-12-02-triton3.6-launch.md \\
        --json bench/results/sm90-2026-12-02-triton3.6-launch.json
    PYTHONPATH=. V36/bin/python -m bench.compile_check --arch 80 --jobs 2 \\
        --out bench/results/sm80-2026-12-02-triton3.6-launch.md \\
        --json bench/results/sm80-2026-12-02-triton3.6-launch.json
    PYTHONPATH=. V39/bin/python -m bench.compile_check --arch 90 --jobs 2 \\
        --out bench/results/sm90-2026-12-02-triton3.9-launch.md \\
        --json bench/results/sm90-2026-12-02-triton3.9-launch.json
"""

import argparse
import contextlib
import datetime
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import KernelInterface, create_function_from_signature

from attn_ops.block_mask import BlockMask
from attn_ops.kernels import attn_bwd as bwd_module, attn_decode, attn_fwd as fwd_module, attn_varlen, config
from attn_ops.kernels.attn_bwd import attn_bwd
from attn_ops.kernels.attn_decode import decode_fwd
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.attn_launch import OpArgs
from attn_ops.kernels.attn_varlen import varlen_bwd, varlen_fwd
from attn_ops.kernels.config import ADD_MASK, BOOL_MASK, INTERPRETED, MASK_KIND_NAMES, NO_MASK

# The most shared memory one block may use (bytes), by compute capability: above it a launch fails.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# The calls' shapes. Dense: [B, H, L, D] with L a multiple of 16, as most are (that makes the lengths
# divisible by 16 in the signature); multi-head unless a row says GQA (4 query heads per kv head).
BATCH, HEADS, LENGTH, GQA_HEADS_KV = 2, 16, 1024, 4
# Packed sequences: lengths of any sum (here not a multiple of 16), as packed batches mostly have.
PACKED_LENGTHS = (512, 700, 333, 500)
# Decoding: a GQA group of 8 query heads per kv head, a cache of 4096 keys (3000 filled) and pages of
# 256; each step appends as many keys as it has queries. One query per head fills 8 rows (a 16-row
# tile); 8 queries (speculative decoding) 64 rows, the most a program takes.
DECODE_HEADS, DECODE_HEADS_KV, CACHE_CAPACITY, CACHED, PAGE_SIZE = 32, 4, 4096, 3000, 256
# The decoding launcher splits the cache by the GPU's multiprocessors: an H100's or H200's.
MULTIPROCESSORS = 132

# The kernels' names in the table.
KERNEL_NAMES = {"_attn_fwd": "fwd", "_attn_bwd_dkdv": "dkdv",
                "_attn_bwd_dq": "dq", "_attn_bwd_dmask": "dmask", "_varlen_fwd": "varlen fwd",
                "_varlen_bwd_dkdv": "varlen dkdv", "_varlen_bwd_dq": "varlen dq", "_decode_split": "decode",
                "_decode_combine": "decode combine"}


class Launch(NamedTuple):
    """One kernel launch as a launcher made it: the kernel, its positional arguments and its keyword
    arguments (constexprs and the options num_warps, num_stages)."""
    kernel: KernelInterface
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches(arch):
    """Within it the launchers run as on a GPU of compute capability `arch`, and each kernel launch is
    appended to the yielded list instead of running. Every tensor reports itself on CUDA, on the
    current device, and torch describes that device as one of that capability with
    `MULTIPROCESSORS` (`torch.cuda.get_device_properties`)."""
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, args, kwargs))
        return run

    properties = SimpleNamespace(name=f"sm_{arch}", major=arch // 10, minor=arch % 10,
                                 multi_processor_count=MULTIPROCESSORS)
    kernels = {id(obj): obj for module in (fwd_module, bwd_module, attn_varlen, attn_decode)
               for obj in vars(module).values() if isinstance(obj, KernelInterface)}
    with contextlib.ExitStack() as stack:
        for kernel in kernels.values():  # fn[grid](...) calls fn.run
            stack.enter_context(mock.patch.object(kernel, "run", recorder(kernel)))
        stack.enter_context(mock.patch.object(torch.Tensor, "is_cuda", property(lambda tensor: True)))
        # The tensors' device index (None: they are on the CPU) is the current device's.
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: None))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: properties))
        # The launchers' caches of the device's properties and of their plans per call shape (keyed by
        # the CPU device) hold the pretend device's only in here.
        for cache in (config._DEVICE_PROPERTIES, fwd_module._PLANS, bwd_module._PLANS):
            stack.enter_context(mock.patch.dict(cache, clear=True))
        # The decoding launcher asks for multiprocessors only of tensors whose device type is CUDA.
        stack.enter_context(mock.patch.object(attn_decode, "_multiprocessors", lambda device: MULTIPROCESSORS))
        yield launches


class Binding(NamedTuple):
    """What `JITFunction.run` compiles for a launch: the signature (types by parameter name), the
    constants and attributes by argument position, and the compile options."""
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def bind(kernel, launch, target):
    """`launch`'s arguments bound for `target` as the JITFunction `kernel` (the launch's own where
    compiled Triton runs) binds them, by the two steps `JITFunction.run` takes in Triton 3.6 to 3.9
    (`run` also passes its debug knobs, at their defaults here): the kernel's binder, whose
    `specialize_impl` makes ints equal to 1 constants and gives ints and pointers divisible by 16
    ``tt.divisibility`` (unless the kernel says ``do_not_specialize``), then `_pack_args`."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Binding(signature, constexprs, attrs, options.__dict__)


class Variant(NamedTuple):
    name: str
    dtype: torch.dtype
    head_dim: object  # an int, or "192/128" where K's and V's differ
    mask_kind: int
    dropout: bool
    launch: Launch


def dense_mask(mask_kind):
    """An [Lq, Lk] mask of that kind shared by the batch and heads (all visible, or zeros added), or
    None."""
    if mask_kind == BOOL_MASK.value:
        return torch.ones(LENGTH, LENGTH, dtype=torch.bool)
    return torch.zeros(LENGTH, LENGTH) if mask_kind == ADD_MASK.value else None


def op_args(heads, head_dim, mask=None, dropout=False, softcap_alibi=False, sinks=False, cu_seqlens=None):
    """A call's `OpArgs`: dropout 0.1; a softcap of 30 and ALiBi slopes; sink logits per head;
    packed sequences' offsets (the same for queries and keys)."""
    return OpArgs(scale=head_dim ** -0.5, mask=mask, dropout_p=0.1 if dropout else 0.0,
                      seed=torch.tensor([1234]) if dropout else None, softcap=30.0 if softcap_alibi else None,
                      alibi_slopes=torch.rand(heads) if softcap_alibi else None,
                      sinks=torch.zeros(heads) if sinks else None, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)


def compile_time(kwargs):
    """A launch's compile-time arguments by name: its `Switches` bundle's fields (``SW``) with the
    kernel's own constexprs (``SPLIT``, ``ROWS_SUMMED``...) and launch options."""
    switches = kwargs.get("SW")
    return {**kwargs, **(switches.values() if switches is not None else {})}


def constants(kernel, signature):
    """The arguments a launch made constants (ints equal to 1), named as the kernel's parameters and
    the bundles' fields spell them (``sc.len_q``, ``st.q[3]``), beside the declared constexprs."""
    found = []

    def walk(name, types):
        if types == "constexpr":
            found.append(name)
        elif isinstance(types, tuple):  # a bundle: a named tuple by field, a plain one by index
            fields = getattr(types, "_fields", None)
            for index, inner in enumerate(types):
                walk(f"{name}.{fields[index]}" if fields else f"{name}[{index}]", inner)

    for param in kernel.params:
        if not param.is_constexpr:
            walk(param.name, signature[param.name])
    return found


def named(launches):
    return {KERNEL_NAMES[launch.kernel.fn.__name__]: launch for launch in launches}


def dense_launches(arch, dtype, head_dim, head_dim_v, args, heads_kv=HEADS, tma=None, mask_grad=False,
                   lse_grad=False):
    """The launches of a forward and a backward (`attn_fwd`, `attn_bwd`) on contiguous [B, H, L, D]
    tensors, by table name; with `lse_grad` the LSE has a gradient (which the dQ pass reads)."""
    q = torch.empty(BATCH, HEADS, LENGTH, head_dim, dtype=dtype)
    k = torch.empty(BATCH, heads_kv, LENGTH, head_dim, dtype=dtype)
    v = torch.empty(BATCH, heads_kv, LENGTH, head_dim_v, dtype=dtype)
    with recorded_launches(arch) as launches:
        out, lse = attn_fwd(q, k, v, args, tma=tma)
        attn_bwd(torch.empty_like(out), torch.empty_like(lse) if lse_grad else None, q, k, v, out, lse, args,
                 mask_grad=mask_grad, tma=tma)
    return named(launches)


def packed_launches(arch, dtype, modified):
    """The launches of a packed forward and backward (`varlen_fwd`, `varlen_bwd`) at D = 128, with
    every modifier, dropout and a gradient of the LSE if `modified`."""
    cu_seqlens = torch.tensor((0, *PACKED_LENGTHS), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    args = op_args(HEADS, 128, dropout=modified, softcap_alibi=modified, sinks=modified, cu_seqlens=cu_seqlens)
    q, k, v = (torch.empty(sum(PACKED_LENGTHS), HEADS, 128, dtype=dtype) for _ in range(3))
    with recorded_launches(arch) as launches:
        out, lse = varlen_fwd(q, k, v, args)
        varlen_bwd(torch.empty_like(out), torch.empty_like(lse) if modified else None, q, k, v, out, lse, args)
    return named(launches)


def decode_launches(arch, dtype, head_dim, len_q, paged, args):
    """The launches of a decoding step (`decode_fwd`) of `len_q` queries against a dense or a paged
    cache, split as the launcher chooses."""
    q = torch.empty(BATCH, DECODE_HEADS, len_q, head_dim, dtype=dtype)
    if paged:
        pages = BATCH * CACHE_CAPACITY // PAGE_SIZE
        k, v = (torch.empty(pages, DECODE_HEADS_KV, PAGE_SIZE, head_dim, dtype=dtype) for _ in range(2))
        table = torch.arange(pages, dtype=torch.int32).view(BATCH, -1)
    else:
        k, v = (torch.empty(BATCH, DECODE_HEADS_KV, CACHE_CAPACITY, head_dim, dtype=dtype) for _ in range(2))
        table = None
    seqlens = torch.full((BATCH,), CACHED, dtype=torch.int32)
    with recorded_launches(arch) as launches:
        decode_fwd(q, k, v, seqlens, table, len_q, None, args)
    return named(launches)


def variants(arch):
    """Every variant's launch, in the table's order: by dtype, the dense passes by head dim and
    masking (the mask-free ones also through pointers where the launcher takes TMA, and with GQA at
    D = 128), the score modifiers, packed sequences, and decoding."""
    for dtype in TRITON_DTYPE:
        # 80, 320 and 384: head dims padded to their tiles (masked loads); 192/128 and 512/256: K's and
        # V's differ (DeepSeek's MLA); 512: Gemma 4's global layers
        for head_dim, head_dim_v in ((64, 64), (80, 80), (128, 128), (256, 256), (192, 128), (320, 320), (384, 384),
                                     (512, 512), (512, 256)):
            label = head_dim if head_dim == head_dim_v else f"{head_dim}/{head_dim_v}"
            for mask_kind, dropout in ((NO_MASK.value, False), (BOOL_MASK.value, False), (ADD_MASK.value, False),
                                       (BOOL_MASK.value, True)):
                plain = (mask_kind, dropout) == (NO_MASK.value, False)
                if head_dim != head_dim_v and not plain:
                    continue
                args = op_args(HEADS, head_dim, dense_mask(mask_kind), dropout)
                launches = dense_launches(arch, dtype, head_dim, head_dim_v, args)
                # The pointer path (odd strides) must compile too where a launch takes TMA.
                pointers = dense_launches(arch, dtype, head_dim, head_dim_v, args, tma=False) if plain else {}
                for name in ("fwd", "dkdv", "dq"):
                    yield Variant(name, dtype, label, mask_kind, dropout, launches[name])
                    if plain and compile_time(launches[name].kwargs)["TMA"]:
                        yield Variant(name + " pointers", dtype, label, mask_kind, dropout, pointers[name])
                if plain and head_dim == 128:
                    gqa = dense_launches(arch, dtype, head_dim, head_dim_v, args, heads_kv=GQA_HEADS_KV)
                    for name in ("fwd", "dkdv", "dq"):
                        yield Variant(name + " GQA", dtype, label, mask_kind, dropout, gqa[name])
        # Score modifiers with a float mask at D = 128: softcap and ALiBi in every pass, sinks in the
        # forward, and the pass that computes the mask's gradient; the LSE has a gradient (dQ reads it).
        args = op_args(HEADS, 128, dense_mask(ADD_MASK.value), softcap_alibi=True, sinks=True)
        launches = dense_launches(arch, dtype, 128, 128, args, mask_grad=True, lse_grad=True)
        for name in ("fwd", "dkdv", "dq", "dmask"):
            label = f"{name}+sinks+softcap+alibi" if name == "fwd" else f"{name}+softcap+alibi"
            yield Variant(label, dtype, 128, ADD_MASK.value, False, launches[name])
        # A block mask at D = 128 (blocks of 128; what it holds does not change the code): each pass's
        # loop over full blocks and its loop over partial ones (which read their bits).
        block_mask = BlockMask.from_mask(torch.rand(LENGTH, LENGTH) > 0.5, block_size=128)
        launches = dense_launches(arch, dtype, 128, 128, op_args(HEADS, 128)._replace(**block_mask.kernel_args))
        for name in ("fwd", "dkdv", "dq"):
            for kind in ("full", "partial"):
                yield Variant(f"{name} {kind} blocks", dtype, 128, NO_MASK.value, False, launches[name])
        # A learned float mask with a block mask: the mask's gradient pass over the listed blocks.
        args = op_args(HEADS, 128, dense_mask(ADD_MASK.value))._replace(**block_mask.kernel_args)
        launches = dense_launches(arch, dtype, 128, 128, args, mask_grad=True)
        yield Variant("dmask partial blocks", dtype, 128, ADD_MASK.value, False, launches["dmask"])
        # Packed sequences (varlen) at D = 128: plain, and with every modifier, dropout and an LSE gradient.
        for modified in (False, True):
            launches = packed_launches(arch, dtype, modified)
            for name in ("varlen fwd", "varlen dkdv", "varlen dq"):
                label = name + ("+softcap+alibi+dropout" if modified else "")
                yield Variant(label, dtype, 128, NO_MASK.value, modified, launches[name])
        # Decoding: the split kernel over a dense and a paged cache, and the merge of the splits.
        for head_dim in (64, 128, 256, 512):
            args = op_args(DECODE_HEADS, head_dim, sinks=True)  # the merge adds the sinks
            tiles = set()
            for len_q in (1, 8):
                for paged in (False, True):
                    launches = decode_launches(arch, dtype, head_dim, len_q, paged, args)
                    split = launches["decode"]
                    block_m = compile_time(split.kwargs)["BLOCK_M"]
                    if (paged, block_m) in tiles:  # fp32 takes 16-row tiles for 64 rows too
                        continue
                    tiles.add((paged, block_m))
                    yield Variant(f"decode {'paged' if paged else 'dense'}", dtype, head_dim, NO_MASK.value, False,
                                  split)
                    if len_q == 1 and not paged:
                        combine = launches["decode combine"]
            yield Variant("decode combine", dtype, head_dim, NO_MASK.value, False, combine)


TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# cuobjdump -sass's lines: /*address*/ [predicate] OPCODE operands ;
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


class Instruction(NamedTuple):
    address: int
    predicate: str  # "" or e.g. "@!P0"
    op: str
    operands: str


def parse_sass(text):
    return [Instruction(int(a, 16), p.strip(), op, rest) for a, p, op, rest in SASS_LINE.findall(text)]


def cubin_report(cubin):
    """(registers, stack bytes, SASS instructions) of the cubin Triton built."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = max(int(n) for n in re.findall(r"REG:(\d+)", usage))
    stack = max(int(n) for n in re.findall(r"STACK:(\d+)", usage))
    return regs, stack, parse_sass(sass)


def branch_target(instruction):
    """The address a branch goes to, or None."""
    target = re.match(r"\s*(0x[0-9a-f]+)", instruction.operands)
    return int(target.group(1), 16) if instruction.op.startswith(("BRA", "JMP")) and target else None


def successors(sass, index):
    """Each instruction's successors, as indices (`index`: by address): the next one unless it is an
    unpredicated branch or exit, and a branch's target."""
    following = []
    for i, instruction in enumerate(sass):
        target = branch_target(instruction)
        ends = instruction.predicate in ("", "@PT") and (target is not None or instruction.op in ("EXIT", "RET"))
        following.append(([] if ends or i + 1 == len(sass) else [i + 1]) + ([index[target]] if target in index else []))
    return following


def reachable(following, avoiding=None):
    """The instructions reachable from the first without passing through instruction `avoiding`."""
    seen, stack = {0}, [0]
    while stack:
        for j in following[stack.pop()]:
            if j not in seen and j != avoiding:
                seen.add(j)
                stack.append(j)
    return seen


def loops(sass):
    """Each loop's instructions: from a backward branch's target to the branch, where the target
    dominates the branch (every path to the branch passes through it).

    ptxas puts the retries of barrier waits out of line, after the kernel's end: a forward branch
    from inside the code enters a stub that waits and branches back to the instruction after the
    first branch. That backward branch closes no loop (the path through the stub skips its target),
    and its span, from somewhere in the code to the stub, is not a loop's body.
    """
    index = {instruction.address: i for i, instruction in enumerate(sass)}
    following = successors(sass, index)
    live = reachable(following)
    found = []
    for i, instruction in enumerate(sass):
        start = index.get(branch_target(instruction))
        if start is None or start > i or i not in live:
            continue
        if start == i or i not in reachable(following, avoiding=start):
            found.append(sass[start:i + 1])
    return found


# The matmuls each pass's loop runs per tile: the forward's two (scores, then probabilities times
# values), dQ's three (scores, dP, dS times K), dK/dV's four (scores, dP, dV, dK). A loop's work is
# that many times BLOCK_M * BLOCK_N * D multiply-adds, the unit the Hopper issue's figures count
# MFLOP in (the tutorial's 128 x 128 forward: 491 instructions, ~117 per MFLOP).
LOOP_MATMULS = {"fwd": 2, "varlen fwd": 2, "decode dense": 2, "decode paged": 2, "dq": 3, "varlen dq": 3, "dkdv": 4,
                "varlen dkdv": 4}


def loop_matmuls(name):
    """The matmuls per tile of the row `name`'s loop ("dq GQA", "fwd+sinks+softcap+alibi": its pass's),
    or None (the mask's gradient, the merge of decoding's splits)."""
    return next((count for prefix, count in LOOP_MATMULS.items()
                 if name == prefix or name.startswith((prefix + " ", prefix + "+"))), None)


def matmul_report(sass, name, constexprs):
    """wgmma and mma.sync instruction counts, TMA, and the interior loop's instructions per MFLOP.

    The interior loop is the shortest innermost loop that runs matmuls (the boundary segments'
    loops add mask arithmetic; dK/dV's loop over the heads of a GQA group holds them all); a block
    mask's "partial blocks" row reports its longest instead (the loop that reads the bits).
    """
    ops = [instruction.op for instruction in sass]
    wgmma = sum(op.startswith("HGMMA") for op in ops)
    mma_sync = sum(op.startswith("HMMA") for op in ops)
    tma = any(op.startswith(("UTMALDG", "UBLKCP")) for op in ops)
    per_mflop = None
    matmul_loops = [body for body in loops(sass) if any(i.op.startswith(("HGMMA", "HMMA")) for i in body)]
    spans = [(body[0].address, body[-1].address) for body in matmul_loops]
    innermost = [body for body, (first, last) in zip(matmul_loops, spans)
                 if not any(first <= a and b <= last and (a, b) != (first, last) for a, b in spans)]
    matmuls = loop_matmuls(name)
    if matmuls and innermost:
        body = (max if name.endswith("partial blocks") else min)(innermost, key=len)
        mflop = matmuls * constexprs["BLOCK_M"] * constexprs["BLOCK_N"] * constexprs["HEAD_DIM_PAD"] / 1e6
        per_mflop = round(len(body) / mflop, 1)
    return wgmma, mma_sync, tma, per_mflop


# ptxas -v's performance warnings, e.g. "ptxas info    : (C7515) Potential Performance Loss:
# wgmma.mma_async instructions are serialized due to ... in the function '_attn_fwd'" (CUDA 12.9's
# ptxas, Triton 3.9's, adds " in line 0"; it also says C7513 for input registers).
PERFORMANCE_WARNING = re.compile(r"\((C\d+)\) Potential Performance Loss: (.*?)(?: in the function '[^']*'.*)?$",
                                 re.MULTILINE)


def performance_warnings(log):
    """ptxas's performance warnings in its log, as "C7515: wgmma.mma_async instructions are ..."."""
    return [f"{code}: {text}" for code, text in PERFORMANCE_WARNING.findall(log)]


class JitReference(NamedTuple):
    """A @triton.jit function by module and name: how a constant that is one (a `Switches`' score
    modifier) reaches a worker process, which cannot unpickle the function object itself."""
    module: str
    name: str


def portable(value):
    """`value` with every jit function in it (in named tuples too) replaced by its `JitReference`."""
    if isinstance(value, KernelInterface):
        return JitReference(value.fn.__module__, value.fn.__name__)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*map(portable, value))
    return value


def resolved(value):
    """The inverse of `portable`, in the worker."""
    if isinstance(value, JitReference):
        return getattr(importlib.import_module(value.module), value.name)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*map(resolved, value))
    return value


def compile_variant(job):
    """Compiles one bound launch (a worker's task) and reads what the table reports. `job`: (the
    kernel's module and name, its `Binding` (its constants `portable`), the compute capability, the
    row's name)."""
    module, kernel_name, binding, arch, name = job
    binding = binding._replace(constexprs={path: resolved(value) for path, value in binding.constexprs.items()})
    kernel = getattr(importlib.import_module(module), kernel_name)
    source = ASTSource(kernel, binding.signature, binding.constexprs, binding.attrs)
    log = io.StringIO()
    # ptxas's log reaches stdout only when asked for, and only from a compile that runs ptxas.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=binding.options)
        except Exception as e:  # a tile shape that does not compile is what this tool is for
            return dict(error=str(e).splitlines()[0][:200])
    regs, spills, sass = cubin_report(compiled.asm["cubin"])
    constexprs = compile_time({kernel.arg_names[path[0]]: value for path, value in binding.constexprs.items()
                               if len(path) == 1})  # deeper paths: a bundle's ints equal to 1
    wgmma, mma_sync, tma, per_mflop = matmul_report(sass, name, constexprs)
    warnings = performance_warnings(log.getvalue())
    return dict(regs=regs, spills=spills, smem=compiled.metadata.shared, wgmma=wgmma, mma_sync=mma_sync, tma=tma,
                wgmma_serialized=any("wgmma" in warning and "serialized" in warning for warning in warnings),
                ptxas_warnings=warnings, loop_sass_per_mflop=per_mflop, error=None)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--dtypes", help="comma-separated: only these (fp16, bf16, fp32)")
    parser.add_argument("--head-dims", help="comma-separated: only these (e.g. 128,192/128)")
    parser.add_argument("--kernels", help="comma-separated: only the variants whose name starts so (e.g. decode)")
    parser.add_argument("--jobs", type=int, default=1, help="compile this many variants at once (processes)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    target = GPUTarget("cuda", args.arch, 32)
    selected = [variant for variant in variants(args.arch)
                if not (args.dtypes and TRITON_DTYPE[variant.dtype] not in args.dtypes.split(",")
                        or args.head_dims and str(variant.head_dim) not in args.head_dims.split(",")
                        or args.kernels and not variant.name.startswith(tuple(args.kernels.split(","))))]
    bindings = [bind(variant.launch.kernel, variant.launch, target) for variant in selected]
    jobs = [(variant.launch.kernel.fn.__module__, variant.launch.kernel.fn.__name__,
             binding._replace(constexprs={path: portable(value) for path, value in binding.constexprs.items()}),
             args.arch, variant.name)
            for variant, binding in zip(selected, bindings)]
    lines, rows = [], []
    failures = 0

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    meta = {"arch": f"sm_{args.arch}", "triton": triton.__version__, "date": str(datetime.date.today()),
            "git": git_commit()}
    emit(f"# Kernel resources for sm_{args.arch}: compiled with Triton {triton.__version__} on a CPU machine, "
         f"{meta['date']}, commit {meta['git']}\n")
    emit(f"Compiled, not run, as the launchers launch them: signatures bound from a recorded launch on "
         f"contiguous tensors (dense B = {BATCH}, H = {HEADS}, L = {LENGTH}; GQA: {HEADS} query heads on "
         f"{GQA_HEADS_KV} kv heads; packed lengths {', '.join(map(str, PACKED_LENGTHS))}; decoding "
         f"{DECODE_HEADS} query heads on {DECODE_HEADS_KV}, 1 or 8 queries). Read from the cubin Triton built "
         "(`cuobjdump`): registers, stack bytes (spills), shared memory (bytes, Triton's metadata), the matmul "
         "instructions (wgmma `HGMMA`, mma.sync `HMMA`), TMA loads, whether ptxas serialized the wgmma (its "
         "warning C7513 or C7515), and the SASS instructions of the shortest innermost matmul loop (a block "
         "mask's partial blocks: the longest) per million multiply-adds of its matmuls (the forward's two, "
         "dQ's three, dK/dV's four).\n")
    emit("| kernel | dtype | D | mask | dropout | BLOCK_M x BLOCK_N | warps | stages | regs | spill bytes | smem "
         "| wgmma | mma.sync | TMA | wgmma serialized | loop SASS / MFLOP |")
    emit("|" + "---|" * 16)
    # Spawned, not forked: the parent has run torch's threads.
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) if args.jobs > 1 else None
    reports = pool.map(compile_variant, jobs) if pool else map(compile_variant, jobs)
    for variant, binding, report in zip(selected, bindings, reports):
        options, kwargs = binding.options, compile_time(variant.launch.kwargs)
        constant_args = constants(variant.launch.kernel, binding.signature)
        record = dict(kernel=variant.name, arch=meta["arch"], dtype=TRITON_DTYPE[variant.dtype],
                      head_dim=variant.head_dim, mask=MASK_KIND_NAMES[variant.mask_kind], dropout=variant.dropout,
                      block_m=kwargs.get("BLOCK_M"), block_n=kwargs.get("BLOCK_N"), num_warps=options["num_warps"],
                      num_stages=options["num_stages"], constant_args=constant_args)
        row = (f"| {variant.name} | {record['dtype']} | {variant.head_dim} | {record['mask']} | {variant.dropout} "
               f"| {record['block_m'] or '-'} x {record['block_n'] or '-'} | {record['num_warps']} "
               f"| {record['num_stages']} |")
        if report["error"]:
            failures += 1
            emit(f"{row} FAILED: {report['error'][:120]} ||||||||")
            rows.append(dict(record, **report))
            continue
        record.update(report)
        shared = report["smem"]
        too_big = shared > MAX_SHARED.get(args.arch, shared)  # compiles, but the launch would be refused
        if too_big:
            failures += 1
            record["error"] = f"shared memory {shared} > {MAX_SHARED[args.arch]}"
        rows.append(record)
        smem = f"{shared} > {MAX_SHARED[args.arch]}: FAILED" if too_big else shared
        per_mflop = report["loop_sass_per_mflop"]
        emit(f"{row} {report['regs']} | {report['spills']} | {smem} | {report['wgmma']} | {report['mma_sync']} "
             f"| {'yes' if report['tma'] else 'no'} | {'yes' if report['wgmma_serialized'] else 'no'} "
             f"| {'-' if per_mflop is None else per_mflop} |")
    if pool:
        pool.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            body = ",\n  ".join(json.dumps(r) for r in rows)
            f.write(f'{{"meta": {json.dumps(meta)},\n "rows": [\n  {body}\n ]}}\n')
    sys.exit(1 if failures else 0)


def git_commit():
    """HEAD's short hash, '-dirty' when the tree has changes (the tables are often made before a commit)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + ("-dirty" if dirty else "")


if __name__ == "__main__":
    main()
