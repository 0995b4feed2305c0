"""`python -m bench.compile_check`: compile every kernel for a GPU architecture, no GPU needed, and
report what the interpreter cannot show: tiles that do not compile, registers, spills, shared
memory, which matmul instructions and loads the compiler chose, and how many instructions the
forward's interior loop spends per unit of matmul work.

Each kernel variant the launchers would pick (by head dim, dtype, mask kind, dropout) is compiled
for the target with `triton.compile`, and the cubin it builds (with the ptxas Triton itself runs
for that architecture) is read with the `cuobjdump` in Triton's wheel: registers and stack bytes
(spills) from ``-res-usage``; from the SASS, whether the matmuls are wgmma (``HGMMA``) or
mma.sync (``HMMA``), whether loads use TMA (``UTMALDG``), and each loop (a backward branch). Must
run without TRITON_INTERPRET=1. Exits 1 if any variant fails to compile. `--json PATH` also writes
the rows as JSON.
"""

import argparse
import datetime
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attn_ops.kernels.attn_decode import _decode_combine, _decode_split
from attn_ops.kernels.attn_bwd import _attn_bwd_dkdv, _attn_bwd_dmask, _attn_bwd_dq, _attn_bwd_preprocess
from attn_ops.kernels.attn_fwd import _attn_fwd
from attn_ops.kernels.attn_varlen import _varlen_bwd_dkdv, _varlen_bwd_dq, _varlen_fwd
from attn_ops.kernels.config import (ADD_MASK, BOOL_MASK, DECODE_TILES, INTERPRETED, MASK_KIND_NAMES, NO_MASK,
                                     TMA_MAX_HEAD_DIM, decode_tile_for, head_dim_pad, tile_for)

# The most shared memory one block may use (bytes), by compute capability: above it a launch fails.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# NO_MASK gets a dummy pointer (q), BOOL_MASK a uint8 view, ADD_MASK a float tensor.
MASK_POINTER = {NO_MASK.value: "*u8", BOOL_MASK.value: "*u8", ADD_MASK.value: "*fp32"}
FLOAT_ARGS = {"qk_scale", "softcap_log2", "scale", "dropout_p", "dropout_scale"}
INT_ARGS = {"num_heads_q", "group_size", "len_q", "len_k", "band_lo", "band_hi", "diagonal_shift", "batch", "mask_batch",
            "mask_heads", "num_seqs", "total_q", "bottom_right", "num_heads_kv", "len_new", "num_splits", "page_size"}
# The packed kernels' sequence tables; the decoding kernel's cache lengths and block table.
INT32_POINTERS = {"CuQ", "CuK", "TileSeq", "TileFirst", "Seqlens", "Table"}
UNIT_STRIDE = re.compile(r"stride_d?[qkvo]d|stride_mn")
FP32_POINTERS = {"Lse", "Delta", "Alibi", "Sinks", "Partial", "PartialLse"}
# With TMA these arguments are [B, H, L, D] tensor descriptors whose box is one tile: (rows, columns).
DESCRIPTOR_BOX = {"Q": ("BLOCK_M", "HEAD_DIM_PAD"), "K": ("BLOCK_N", "HEAD_DIM_PAD"),
                  "V": ("BLOCK_N", "HEAD_DIM_V_PAD"), "Out": ("BLOCK_M", "HEAD_DIM_V_PAD"),
                  "dO": ("BLOCK_M", "HEAD_DIM_V_PAD"), "dQ": ("BLOCK_M", "HEAD_DIM_PAD"),
                  "dK": ("BLOCK_N", "HEAD_DIM_PAD"), "dV": ("BLOCK_N", "HEAD_DIM_V_PAD")}


def signature(kernel, dtype, mask_kind, constexprs):
    """The kernel's signature as a launch on contiguous tensors specializes it: unit head-dim strides
    become constants, pointers and the other strides are known to be multiples of 16."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if UNIT_STRIDE.fullmatch(name):
            constexprs[name] = 1
        if name in constexprs:
            sig[name] = "constexpr"
        elif constexprs.get("TMA") and name in DESCRIPTOR_BOX:
            rows, cols = (constexprs[c] for c in DESCRIPTOR_BOX[name])
            sig[name] = f"tensordesc<{TRITON_DTYPE[dtype]}[1, 1, {rows}, {cols}]>"
        elif name == "Mask":
            sig[name] = MASK_POINTER[mask_kind]
        elif name == "Seed":
            sig[name] = "*i64"
        elif name in FP32_POINTERS or name == "Out" and constexprs.get("SPLIT"):  # split-KV partials
            sig[name] = "*fp32"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in INT_ARGS or name.startswith("stride_"):
            sig[name] = "i32"
        else:  # Q, K, V, Out, dO, dK, ...: tensors of the inputs' dtype
            sig[name] = "*" + TRITON_DTYPE[dtype]
    return sig


def divisibility(sig):
    """Pointers (torch allocations) and strides other than the unit ones are multiples of 16."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(sig.items())
            if kind.startswith("*") or (kind == "i32" and name.startswith("stride_"))}


TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# Passes whose loop runs two matmuls per key tile (scores, then probabilities times values): their
# work per iteration is 2 * BLOCK_M * BLOCK_N * D multiply-adds, the unit the Hopper issue's figures
# count MFLOP in (the tutorial's 128 x 128 forward: 491 instructions, ~117 per MFLOP).
TWO_MATMUL_LOOPS = ("fwd", "varlen fwd", "decode dense", "decode paged")


def cubin_report(cubin):
    """(registers, stack bytes, SASS as [(address, opcode, operands)]) of the cubin Triton built."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = max(int(n) for n in re.findall(r"REG:(\d+)", usage))
    stack = max(int(n) for n in re.findall(r"STACK:(\d+)", usage))
    return regs, stack, [(int(a, 16), op, rest) for a, op, rest in SASS_LINE.findall(sass)]


def loops(sass):
    """Each loop's instructions: from a backward branch's target to the branch."""
    found = []
    for address, op, rest in sass:
        target = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) <= address:
            start = int(target.group(1), 16)
            found.append([(a, o) for a, o, _ in sass if start <= a <= address])
    return found


def matmul_report(sass, name, constexprs):
    """wgmma and mma.sync instruction counts, TMA, and the interior loop's instructions per MFLOP.

    The interior loop is the shortest loop that runs matmuls (the boundary segments' loops add mask
    arithmetic); its matmul work per iteration is known for the two-matmul passes only (else None).
    """
    ops = [op for _, op, _ in sass]
    wgmma = sum(op.startswith("HGMMA") for op in ops)
    mma_sync = sum(op.startswith("HMMA") for op in ops)
    tma = any(op.startswith(("UTMALDG", "UBLKCP")) for op in ops)
    per_mflop = None
    matmul_loops = [body for body in loops(sass) if any(op.startswith(("HGMMA", "HMMA")) for _, op in body)]
    if name.startswith(TWO_MATMUL_LOOPS) and matmul_loops:
        body = min(matmul_loops, key=len)
        mflop = 2 * constexprs["BLOCK_M"] * constexprs["BLOCK_N"] * constexprs["HEAD_DIM_PAD"] / 1e6
        per_mflop = round(len(body) / mflop, 1)
    return wgmma, mma_sync, tma, per_mflop


def variants(major):
    """(name, kernel, dtype, head_dim, mask_kind, dropout, constexprs, options) the launchers can pick."""
    for dtype in TRITON_DTYPE:
        size = dtype.itemsize
        # 80: a head dim padded to its tile (masked loads); 192/128: K's and V's differ (DeepSeek's MLA)
        for head_dim, head_dim_v in ((64, 64), (80, 80), (128, 128), (256, 256), (192, 128)):
            for mask_kind, dropout in ((NO_MASK.value, False), (BOOL_MASK.value, False), (ADD_MASK.value, False),
                                       (BOOL_MASK.value, True)):
                if head_dim != head_dim_v and (mask_kind, dropout) != (NO_MASK.value, False):
                    continue
                common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad(head_dim), HEAD_DIM_V=head_dim_v,
                              HEAD_DIM_V_PAD=head_dim_pad(head_dim_v), MASK_KIND=mask_kind, DROPOUT=dropout,
                              SOFTCAP=False, ALIBI=False, INTERPRETED_BF16=False, INPUT_PRECISION="ieee")
                for name, kernel, extra in (("fwd", _attn_fwd, dict(SINKS=False)), ("dkdv", _attn_bwd_dkdv, {}),
                                            ("dq", _attn_bwd_dq, {})):
                    # Hopper reads through TMA descriptors; the pointer path (odd strides) must compile too.
                    paths = (True, False) if major >= 9 and takes_tma(kernel) and head_dim_pad(
                        max(head_dim, head_dim_v)) <= TMA_MAX_HEAD_DIM[name] else (False,)
                    plain = (mask_kind, dropout) == (NO_MASK.value, False)
                    for tma in paths if plain else paths[:1]:
                        block_m, block_n, num_warps, num_stages = tile_for(size, name, max(head_dim, head_dim_v),
                                                                           major, tma, plain)
                        label = head_dim if head_dim == head_dim_v else f"{head_dim}/{head_dim_v}"
                        yield (name + (" pointers" if len(paths) > 1 and not tma else ""), kernel, dtype, label,
                               mask_kind, dropout, dict(common, **extra, BLOCK_M=block_m, BLOCK_N=block_n,
                                                        **tma_switch(kernel, tma)),
                               dict(num_warps=num_warps, num_stages=num_stages))
        # Score modifiers with a float mask at D = 128: softcap and ALiBi in every pass, sinks in the
        # forward, and the pass that computes the mask's gradient (which takes the dq pass's tiles).
        common = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, HEAD_DIM_V=128, HEAD_DIM_V_PAD=128, MASK_KIND=ADD_MASK.value,
                      DROPOUT=False, SOFTCAP=True, ALIBI=True, INTERPRETED_BF16=False, INPUT_PRECISION="ieee")
        for name, kernel, tiles_of, extra in (
                ("fwd+sinks", _attn_fwd, "fwd", dict(SINKS=True)), ("dkdv", _attn_bwd_dkdv, "dkdv", {}),
                ("dq", _attn_bwd_dq, "dq", {}),
                ("dmask", _attn_bwd_dmask, "dq", dict(ROWS_SUMMED=False, COLS_SUMMED=False))):
            tma = major >= 9 and takes_tma(kernel)
            tile = tile_for(size, tiles_of, 128, major, tma)
            yield (f"{name}+softcap+alibi", kernel, dtype, 128, ADD_MASK.value, False,
                   dict(common, **extra, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **tma_switch(kernel, tma)),
                   dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
        # Packed sequences (varlen) at D = 128: plain, and with every modifier and dropout.
        for modified in (False, True):
            flags = dict(SOFTCAP=modified, ALIBI=modified, DROPOUT=modified, INTERPRETED_BF16=False,
                         INPUT_PRECISION="ieee", HEAD_DIM=128, HEAD_DIM_PAD=128, HEAD_DIM_V=128, HEAD_DIM_V_PAD=128)
            for name, kernel, extra in (("varlen fwd", _varlen_fwd, dict(SINKS=modified)),
                                        ("varlen dkdv", _varlen_bwd_dkdv, {}), ("varlen dq", _varlen_bwd_dq, {})):
                tile = tile_for(size, name.split()[1], 128, major)
                yield (name + ("+softcap+alibi+dropout" if modified else ""), kernel, dtype, 128, NO_MASK.value,
                       modified, dict(flags, **extra, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n),
                       dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
        # Decoding against a KV cache: split-KV over a dense and a paged cache, and the merge.
        # Rows: a GQA group of 4 to 8 heads decoding one token each (16), and the most a program takes.
        for head_dim in (64, 128, 256):
            for rows in dict.fromkeys((16, DECODE_TILES[size][max(64, head_dim)].block_m)):
                tile = decode_tile_for(size, head_dim, rows, major)
                for paged in (False, True):
                    yield (f"decode {'paged' if paged else 'dense'}", _decode_split, dtype, head_dim, NO_MASK.value,
                           False, dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, HEAD_DIM_V=head_dim,
                                       HEAD_DIM_V_PAD=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                                       SPLIT=True, PAGED=paged, SOFTCAP=False, ALIBI=False, SINKS=False,
                                       INTERPRETED_BF16=False, INPUT_PRECISION="ieee"),
                           dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
            yield ("decode combine", _decode_combine, dtype, head_dim, NO_MASK.value, False,
                   dict(HEAD_DIM_V=head_dim, HEAD_DIM_V_PAD=head_dim, BLOCK_S=16, SINKS=True, INTERPRETED_BF16=False),
                   dict(num_warps=4 if head_dim > 64 else 2))
        yield ("preprocess", _attn_bwd_preprocess, dtype, 128, NO_MASK.value, False,
               dict(HEAD_DIM=128, HEAD_DIM_PAD=head_dim_pad(128), BLOCK_M=tile_for(size, "dq", 128, major).block_m),
               dict(num_warps=4))


def takes_tma(kernel):
    return "TMA" in inspect.signature(kernel.fn).parameters


def tma_switch(kernel, tma):
    """The TMA constexpr for the kernels that take one."""
    return dict(TMA=tma) if takes_tma(kernel) else {}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--dtypes", help="comma-separated: only these (fp16, bf16, fp32)")
    parser.add_argument("--head-dims", help="comma-separated: only these (e.g. 128,192/128)")
    parser.add_argument("--kernels", help="comma-separated: only the variants whose name starts so (e.g. decode)")
    args = parser.parse_args(argv)
    if INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    lines, rows = [], []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    meta = {"arch": f"sm_{args.arch}", "triton": triton.__version__, "date": str(datetime.date.today()),
            "git": git_commit()}
    emit(f"# Kernel resources for sm_{args.arch}: compiled with Triton {triton.__version__} on a CPU machine, "
         f"{meta['date']}, commit {meta['git']}\n")
    emit("Compiled, not run; read from the cubin Triton built (`cuobjdump`): registers, stack bytes (spills), "
         "shared memory (bytes, Triton's metadata), the matmul instructions (wgmma `HGMMA`, mma.sync `HMMA`), "
         "TMA loads, and the SASS instructions of the shortest matmul loop per million multiply-adds of its two "
         "matmuls (the forward-type passes' interior loop).\n")
    emit("| kernel | dtype | D | mask | dropout | BLOCK_M x BLOCK_N | warps | stages | regs | spill bytes | smem "
         "| wgmma | mma.sync | TMA | loop SASS / MFLOP |")
    emit("|" + "---|" * 15)
    for name, kernel, dtype, head_dim, mask_kind, dropout, constexprs, options in variants(args.arch // 10):
        if (args.dtypes and TRITON_DTYPE[dtype] not in args.dtypes.split(",")
                or args.head_dims and str(head_dim) not in args.head_dims.split(",")
                or args.kernels and not name.startswith(tuple(args.kernels.split(",")))):
            continue
        sig = signature(kernel, dtype, mask_kind, constexprs)
        index = list(sig)
        src = ASTSource(fn=kernel, signature=sig, constexprs={(index.index(k),): v for k, v in constexprs.items()},
                        attrs=divisibility(sig))
        record = dict(kernel=name, arch=meta["arch"], dtype=TRITON_DTYPE[dtype], head_dim=head_dim,
                      mask=MASK_KIND_NAMES[mask_kind], dropout=dropout, block_m=constexprs.get("BLOCK_M"),
                      block_n=constexprs.get("BLOCK_N"), num_warps=options["num_warps"],
                      num_stages=options.get("num_stages"))
        row = (f"| {name} | {record['dtype']} | {head_dim} | {record['mask']} | {dropout} "
               f"| {record['block_m'] or '-'} x {record['block_n'] or '-'} | {options['num_warps']} "
               f"| {record['num_stages'] or '-'} |")
        try:
            compiled = triton.compile(src, target=target, options=options)
        except Exception as e:  # a tile shape that does not compile is what this tool is for
            failures += 1
            emit(f"{row} FAILED: {str(e).splitlines()[0][:120]} |||||||")
            rows.append(dict(record, error=str(e).splitlines()[0][:200]))
            continue
        regs, spills, sass = cubin_report(compiled.asm["cubin"])
        wgmma, mma_sync, tma, per_mflop = matmul_report(sass, name, constexprs)
        shared = compiled.metadata.shared
        record.update(regs=regs, spills=spills, smem=shared, wgmma=wgmma, mma_sync=mma_sync, tma=tma,
                      loop_sass_per_mflop=per_mflop, error=None)
        too_big = shared > MAX_SHARED.get(args.arch, shared)  # compiles, but the launch would be refused
        if too_big:
            failures += 1
            record["error"] = f"shared memory {shared} > {MAX_SHARED[args.arch]}"
        rows.append(record)
        smem = f"{shared} > {MAX_SHARED[args.arch]}: FAILED" if too_big else shared
        emit(f"{row} {regs} | {spills} | {smem} | {wgmma} | {mma_sync} | {'yes' if tma else 'no'} "
             f"| {'-' if per_mflop is None else per_mflop} |")
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
