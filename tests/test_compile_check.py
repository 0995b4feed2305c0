"""bench.compile_check without compiling: its reading of SASS (loops, matmul kinds, TMA and the
interior loop's instructions per unit of matmul work) and of ptxas's log on hand-written text, and
its signatures, bound from a recorded launch as `JITFunction.run` binds them."""

import pytest
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from attn_ops.kernels import attn_launch, config, modifiers
from attn_ops.kernels.attn_fwd import attn_fwd
from attn_ops.kernels.bundles import Scores
from bench.compile_check import (Launch, bind, compile_time, constants, loops, matmul_report, parse_sass,
                                 performance_warnings, recorded_launches, variants)

# cuobjdump -sass's format: /*address*/ [predicate] OPCODE operands ; /* encoding */
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;               /* 0x0000000804087b0b */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR4], RZ, !UPT ;  /* 0x00e00000045879f0 */
        /*0030*/                   FMUL R2, R2, R3 ;                       /* 0x0000000302027220 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR4], R88 ;  /* 0x00e00000045879f0 */
        /*0050*/              @!P0 BRA 0x20 ;                              /* 0xffffffd000108947 */
        /*0060*/                   IADD3 R4, R4, 0x1, RZ ;                 /* 0x0000000104047810 */
        /*0070*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;  /* 0x0000001010087823 */
        /*0080*/                   FADD R5, R5, R6 ;                       /* 0x0000000605057221 */
        /*0090*/                   FADD R5, R5, R6 ;                       /* 0x0000000605057221 */
        /*00a0*/               @P1 BRA 0x60 ;                              /* 0xffffffd000108947 */
        /*00b0*/                   BRA 0xb0 ;                              /* 0xfffffffc00fc7947 */
        /*00c0*/                   EXIT ;                                  /* 0x000000000000794d */
"""

# A matmul loop (0x10 to 0x90) whose barrier wait retries out of line, as ptxas places it: the wait's
# branch (0x70) enters a stub after the kernel's end that spins on the barrier and returns (0xd0) to
# the instruction after the wait, a backward branch whose span (0x80 to 0xd0, 6 instructions with a
# matmul) is shorter than the loop's; then the padding's unreachable self-branch.
STUB_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   FADD R5, R5, R6 ;
        /*0030*/                   FADD R5, R5, R6 ;
        /*0040*/                   FADD R5, R5, R6 ;
        /*0050*/                   FADD R5, R5, R6 ;
        /*0060*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6+0x8000], RZ ;
        /*0070*/              @!P0 BRA 0xb0 ;
        /*0080*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR4], R88 ;
        /*0090*/               @P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6+0x8000], RZ ;
        /*00c0*/              @!P0 BRA 0xb0 ;
        /*00d0*/                   BRA 0x80 ;
        /*00e0*/                   BRA 0xe0 ;
"""


def spans(listing):
    return [[instruction.address for instruction in body] for body in loops(parse_sass(listing))]


def test_loops_are_the_spans_of_backward_branches():
    assert spans(LISTING) == [[0x20, 0x30, 0x40, 0x50], [0x60, 0x70, 0x80, 0x90, 0xa0], [0xb0]]


def test_a_barrier_wait_stub_is_no_loop():
    # The stub's own spin (0xb0 to 0xc0) is a loop; its return (0xd0 to 0x80) is not, nor is the
    # unreachable padding.
    assert spans(STUB_LISTING) == [list(range(0x10, 0xa0, 0x10)), [0xb0, 0xc0]]
    # The interior loop is the 9-instruction one over 2 * 64 * 64 * 64 multiply-adds.
    per_mflop = matmul_report(parse_sass(STUB_LISTING), "fwd", dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM_PAD=64))[3]
    assert per_mflop == round(9 / 0.524288, 1)


def test_matmul_kinds_tma_and_the_shortest_matmul_loop_per_million_multiply_adds():
    wgmma, mma_sync, tma, per_mflop = matmul_report(parse_sass(LISTING), "fwd",
                                                    dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM_PAD=64))
    assert (wgmma, mma_sync, tma) == (2, 1, True)
    # The 4-instruction loop over 2 * 64 * 64 * 64 multiply-adds (0.524288 million).
    assert per_mflop == round(4 / 0.524288, 1)
    tile = dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM_PAD=64)
    # dK/dV's loop runs four matmuls per tile; a block mask's partial blocks take the longer loop.
    assert matmul_report(parse_sass(LISTING), "dkdv GQA", tile)[3] == round(4 / 1.048576, 1)
    assert matmul_report(parse_sass(LISTING), "fwd partial blocks", tile)[3] == round(5 / 0.524288, 1)
    assert matmul_report(parse_sass(LISTING), "dmask+softcap+alibi", tile)[3] is None


# dK/dV's loop over a GQA group's heads (0x10 to 0x60) holds its loop over query tiles (0x20 to 0x40).
NESTED_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR4], R88 ;
        /*0030*/                   FADD R5, R5, R6 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FADD R5, R5, R6 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
"""


def test_the_interior_loop_is_an_innermost_one():
    assert len(loops(parse_sass(NESTED_LISTING))) == 2
    tile = dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM_PAD=64)
    assert matmul_report(parse_sass(NESTED_LISTING), "dkdv partial blocks", tile)[3] == round(3 / 1.048576, 1)


def test_ptxas_performance_warnings():
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
           "to non wgmma instructions defining accumulator registers of a wgmma between start and end of the "
           "pipeline stage in the function '_attn_fwd'\n"
           "ptxas info    : Compiling entry function '_attn_fwd' for 'sm_90a'\n"
           "ptxas info    : Used 203 registers, used 1 barriers\n")
    assert performance_warnings(log) == [
        "C7515: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator "
        "registers of a wgmma between start and end of the pipeline stage"]
    # CUDA 12.9's ptxas (Triton 3.9's) adds the line.
    assert performance_warnings("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions "
                                "are serialized due to the presence of Extern calls in the function "
                                "'_attn_fwd' in line 0\n") == [
        "C7515: wgmma.mma_async instructions are serialized due to the presence of Extern calls"]
    assert performance_warnings("ptxas info    : Used 128 registers\n") == []


def _kernel(X, length, group_size, scale, stride_d, BLOCK: tl.constexpr):
    pass


HOPPER = GPUTarget("cuda", 90, 32)


def test_binding_specializes_ones_and_multiples_of_16_as_a_launch_does():
    x = torch.empty(4, 1024)
    binding = bind(JITFunction(_kernel), Launch(None, (x, 1024, 1, 0.5, 1), dict(BLOCK=64, num_warps=8)), HOPPER)
    assert binding.signature == dict(X="*fp32", length="i32", group_size="constexpr", scale="fp32",
                                     stride_d="constexpr", BLOCK="constexpr")
    assert binding.constexprs == {(2,): 1, (4,): 1, (5,): 64}
    divisible = {path for path, attrs in binding.attrs.items() if ["tt.divisibility", 16] in attrs}
    assert divisible == {(0,), (1,)}  # the pointer and the length, not the float
    assert binding.options["num_warps"] == 8
    # A length off the multiples of 16, a group of 2: plain ints.
    binding = bind(JITFunction(_kernel), Launch(None, (x, 1000, 2, 0.5, 1), dict(BLOCK=64)), HOPPER)
    assert (binding.signature["length"], binding.signature["group_size"]) == ("i32", "i32")
    assert (1,) not in {path for path, attrs in binding.attrs.items() if attrs}
    # do_not_specialize keeps a 1 an argument.
    binding = bind(JITFunction(_kernel, do_not_specialize=["group_size"]),
                   Launch(None, (x, 1024, 1, 0.5, 1), dict(BLOCK=64)), HOPPER)
    assert binding.signature["group_size"] == "i32"


@pytest.fixture
def compiled_launchers(monkeypatch):
    """The launchers pick tiles and paths as for compiled kernels, also under the interpreter."""
    monkeypatch.setattr(config, "INTERPRETED", False)
    monkeypatch.setattr(attn_launch, "INTERPRETED", False)


def jit_function(kernel):
    """`kernel` as compiled Triton has it (under the interpreter a JITFunction of its function)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def test_a_recorded_forward_binds_as_it_launches_on_hopper(compiled_launchers):
    q, k, v = (torch.empty(2, 16, 1024, 128, dtype=torch.bfloat16) for _ in range(3))
    with recorded_launches(90) as launches:
        attn_fwd(q, k, v, attn_launch.OpArgs(scale=0.1))
    (launch,) = launches
    switches = compile_time(launch.kwargs)
    assert (switches["TMA"], switches["BLOCK_M"], switches["BLOCK_N"]) == (True, 128, 128)
    binding = bind(jit_function(launch.kernel), launch, HOPPER)
    # Descriptors typed by their box; the unit head-dim strides constants (inside the Strides bundle);
    # the lengths divisible by 16 (inside the Scores bundle).
    assert binding.signature["Q"] == "tensordesc<bf16[1, 1, 128, 128]>"
    assert binding.signature["st"].q[3] == "constexpr"
    assert {"st.q[3]", "st.k[3]", "st.v[3]", "st.out[3]"} <= set(constants(jit_function(launch.kernel),
                                                                           binding.signature))
    scores = list(binding.signature).index("sc")
    assert ["tt.divisibility", 16] in binding.attrs[(scores, Scores._fields.index("len_q"))]
    # The pretend GPU ends with the recording, and the launcher's plan for these shapes with it: on
    # Ampere the same call takes pointers and Ampere's tiles.
    assert not torch.empty(1).is_cuda
    with recorded_launches(80) as launches:
        attn_fwd(q, k, v, attn_launch.OpArgs(scale=0.1))
    switches = compile_time(launches[0].kwargs)
    assert (switches["TMA"], switches["BLOCK_N"]) == (False, 64)


def test_a_score_modifier_keys_the_caches_by_its_source():
    # Triton keys its on-disk cache by a constant's cache_key, else its str: a modifier named but not
    # hashed would keep serving a kernel compiled from an edited modifier.
    modifier = jit_function(modifiers.alibi)  # one that calls no other jit function, hashed under the interpreter too
    q = torch.empty(1, 2, 64, 32, dtype=torch.bfloat16)
    args = attn_launch.OpArgs(scale=0.1, alibi_slopes=torch.ones(2))
    switches = attn_launch.launch_args(q, q, 32, args).switches(BLOCK_M=64, BLOCK_N=64, TMA=False)
    assert switches.MODIFIER is modifiers.alibi
    assert modifier.cache_key in switches.replaced(MODIFIER=modifier).cache_key


def test_every_variant_binds(compiled_launchers):
    selected = list(variants(90))
    assert {variant.name for variant in selected} >= {"fwd", "fwd pointers", "fwd GQA", "dkdv", "dq",
                                                      "dmask+softcap+alibi", "varlen dkdv", "decode paged",
                                                      "decode combine"}
    for variant in selected:
        bind(jit_function(variant.launch.kernel), variant.launch, HOPPER)
