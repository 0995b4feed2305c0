"""bench.compile_check's reading of SASS (the compiler's verdict, without a GPU): loops, matmul kinds,
TMA and the interior loop's instructions per unit of matmul work, on a hand-written listing."""

from bench.compile_check import SASS_LINE, loops, matmul_report

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


def parsed():
    return [(int(a, 16), op, rest) for a, op, rest in SASS_LINE.findall(LISTING)]


def test_loops_are_the_spans_of_backward_branches():
    spans = [[a for a, _ in body] for body in loops(parsed())]
    assert spans == [[0x20, 0x30, 0x40, 0x50], [0x60, 0x70, 0x80, 0x90, 0xa0], [0xb0]]


def test_matmul_kinds_tma_and_the_shortest_matmul_loop_per_million_multiply_adds():
    wgmma, mma_sync, tma, per_mflop = matmul_report(parsed(), "fwd", dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM_PAD=64))
    assert (wgmma, mma_sync, tma) == (2, 1, True)
    # The 4-instruction loop over 2 * 64 * 64 * 64 multiply-adds (0.524288 million).
    assert per_mflop == round(4 / 0.524288, 1)
    assert matmul_report(parsed(), "dkdv", dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM_PAD=64))[3] is None
