"""Gluon fp16 GEMM of the dense NVFP4 predecode path (imported lazily by kernels.sm90.gemm_nvfp4):
out_bf16[M, N] = bf16((acc * 2^14) * alpha), acc = A16[M, K] @ B16[N, K]^T in float32, A16 / B16 the operands
decode_nvfp4_to_f16_kernel / decode_nvfp4_pair_to_f16_kernel wrote (e2m1 * e4m3 * 2^-7 each, exact).

Per element: the K blocks of BK = 64 in increasing order, each 4 fp16 wgmma k16 steps in increasing k, zeros past M,
N and K (TMA zero fill: zero products). One float32 chain from +0 over all of K, or (CHUNKED) a chain from +0 per
chunk of chunk_iters K blocks, the chunk sums added to the total in chunk order. On operands decoded in the wgmma
order (MMA_ORDER) with kernels.sm90.gemm_nvfp4.chunk_plan's chunks this is, step for step, what the register-fed
wgmma kernel (_gemm_nvfp4_wgmma) computes, so the two give the same bits (batch invariance across the M at which
gemm_nvfp4 switches kernels). Epilogue: acc * 2^14 (exact), times alpha, one rounding to bf16 (round to nearest
even), rows and columns past M and N not stored.

Structure: persistent (one program per SM at most; program p takes output tiles p, p + P, ... in a grouped raster:
GROUP_M row tiles of A per group, down the group's column first), warp-specialized (gl.warp_specialize): one
producer warp issues the TMA loads of both operands' [BM, 64] / [BN, 64] blocks into an NS-stage shared ring (ready
barriers: expect + copies; empty barriers: the consumers' release), running ahead across tile boundaries; the
kernel's warps (two warpgroups: BM = 128 gives each 64 rows x BN, BM = 256 each 128 rows) run the wgmma chain, one
asynchronous wgmma group in flight (wait(1) before a stage is released; a full wait at each chunk's end before its
sum is read), and the epilogue (bf16 stores from the accumulator registers) while the producer already fills the
ring with the next tile's first K blocks. A chunked tile keeps two accumulators (128 x 128 tiles: 64 + 64 registers
a math thread).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from kernels.sm90._consts import DECODE_UNSCALE

_DECODE_UNSCALE = gl.constexpr(DECODE_UNSCALE)  # the decode scale undone in the epilogue (exact)
BK = gl.constexpr(64)  # K elements per ring stage: 4 wgmma k16 steps


@gluon.constexpr_function
def acc_layout(bm, bn, num_warps):
    """The wgmma accumulator layout of a [bm, bn] tile on num_warps warps (16 rows a warp, rows repeated past
    16 * num_warps; instruction m64 x bn x k16 a warpgroup)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bn, 16])


@gluon.jit
def _tile_origin(tile, num_m, num_n, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """(first row of A, first row of B) of output tile number `tile`: the grouped raster (GROUP_M row tiles of A
    per group, down the group's column first)."""
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size_m = gl.minimum(num_m - first_m, GROUP_M)
    return (first_m + (tile % width) % size_m) * BM, ((tile % width) // size_m) * BN


@gluon.jit
def _producer(a_desc, b_desc, a_ring, b_ring, ready, empty, num_m, num_n, k_iters, BM: gl.constexpr,
              BN: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr):
    """The producer partition (one warp): this program's (tile, K block) pairs in order, pair c into stage c % NS
    once the consumers released the stage's previous use (a fresh barrier passes parity 1: the first NS do not
    wait)."""
    c = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        m0, n0 = _tile_origin(tile, num_m, num_n, BM, BN, GROUP_M)
        for kk in range(k_iters):
            s = c % NS
            mbarrier.wait(empty.index(s), ((c // NS) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [m0, kk * BK], ready.index(s), a_ring.index(s))
            tma.async_copy_global_to_shared(b_desc, [n0, kk * BK], ready.index(s), b_ring.index(s))
            c += 1


@gluon.jit
def _release(empty, c, pred, NS: gl.constexpr):
    """Stage c % NS back to the producer (pred: there is such a use): every consumer warp is past its wgmma (a
    barrier of the consumer partition), then one arrival."""
    gl.thread_barrier()
    mbarrier.arrive(empty.index(c % NS), count=1, pred=pred)


@gluon.jit
def _store_tile(acc, alpha, out_ptr, m0, n0, M, N, BM: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):
    """bf16((acc * 2^14) * alpha) into out[m0:, n0:] (row-major, N columns), rows / columns past M / N not stored."""
    rows = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    y = ((acc * _DECODE_UNSCALE) * alpha).to(gl.bfloat16)
    ptrs = out_ptr + gl.expand_dims(rows.to(gl.int64) * N, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, y, mask=gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0))


@gluon.jit
def _k_block(a_ring, b_ring, ready, empty, acc, c, kk, NS: gl.constexpr):
    """K block kk of a tile (ring use c): its async wgmma into acc, one group left in flight, then the previous K
    block's stage released (its wgmma is done; none at the tile's first block)."""
    s = c % NS
    mbarrier.wait(ready.index(s), (c // NS) & 1)
    acc = warpgroup_mma(a_ring.index(s), b_ring.index(s).permute((1, 0)), acc, is_async=True)
    acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_ring.index(s), b_ring.index(s)))
    _release(empty, c + NS - 1, kk > 0, NS)
    return acc


@gluon.jit
def _consumer(a_ring, b_ring, ready, empty, alpha_ptr, out_ptr, M, N, num_m, num_n, k_iters, chunk_iters,
              BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr, CHUNKED: gl.constexpr):
    """The math partition (the kernel's warps): per tile one accumulator chain over the K blocks in order (async
    wgmma, one group left in flight; the stage of the previous group released once it is done), then the
    epilogue. CHUNKED: the chain restarts from +0 every chunk_iters K blocks (a loop over chunks, each ending in a
    full wgmma wait, so the fp32 add reads a finished accumulator); the chunk sums are added to the tile's total in
    chunk order (the first chunk's sum is the total), the total is what the epilogue scales."""
    layout: gl.constexpr = acc_layout(BM, BN, gl.num_warps())
    alpha = gl.load(alpha_ptr)
    c = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        m0, n0 = _tile_origin(tile, num_m, num_n, BM, BN, GROUP_M)
        if CHUNKED:
            total = gl.zeros([BM, BN], gl.float32, layout=layout)
            for k0 in range(0, k_iters, chunk_iters):
                acc = gl.zeros([BM, BN], gl.float32, layout=layout)
                for kk in range(k0, gl.minimum(k0 + chunk_iters, k_iters)):
                    acc = _k_block(a_ring, b_ring, ready, empty, acc, c, kk, NS)
                    c += 1
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                if k0 == 0:
                    total = acc
                else:
                    total = total + acc
            acc = total
        else:
            acc = gl.zeros([BM, BN], gl.float32, layout=layout)
            for kk in range(k_iters):
                acc = _k_block(a_ring, b_ring, ready, empty, acc, c, kk, NS)
                c += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        _release(empty, c + NS - 1, True, NS)  # the tile's last stage
        _store_tile(acc, alpha, out_ptr, m0, n0, M, N, BM, BN, layout)


@gluon.jit(do_not_specialize=["M"])  # in masks and the raster only: one compiled variant for every M
def gemm_f16_alpha_gluon_kernel(a_desc, b_desc, alpha_ptr, out_ptr, M, N, K, chunk_iters, BM: gl.constexpr,
                                BN: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr, CHUNKED: gl.constexpr):
    """out_bf16 = bf16((A16 @ B16^T * 2^14) * alpha): a_desc / b_desc tensor descriptors of A16 [M, K] / B16 [N, K]
    fp16 (blocks [BM, 64] / [BN, 64], zero fill past the edges), alpha_ptr one float32, out_ptr [M, N] bf16.
    CHUNKED: K cut into chunks of chunk_iters 64-wide blocks (the chain restarts at each, the chunk sums added in
    order; kernels.sm90.gemm_nvfp4.chunk_plan), else one chain (chunk_iters unused).
    Grid: at most one program per SM (any count gives the same bits)."""
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [NS, BM, BK], a_desc.layout)
    b_ring = gl.allocate_shared_memory(b_desc.dtype, [NS, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NS):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    fence_async_shared()
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    k_iters = gl.cdiv(K, BK)
    gl.warp_specialize([
        (_consumer, (a_ring, b_ring, ready, empty, alpha_ptr, out_ptr, M, N, num_m, num_n, k_iters, chunk_iters,
                     BM, BN, NS, GROUP_M, CHUNKED)),
        (_producer, (a_desc, b_desc, a_ring, b_ring, ready, empty, num_m, num_n, k_iters, BM, BN, NS, GROUP_M)),
    ], [1], [40])


def gluon_operand_layouts(block_m: int, block_n: int):
    """The shared layouts of the kernel's TMA blocks, (A [block_m, 64], B [block_n, 64]) fp16 (128-byte swizzle):
    the launcher's descriptors and the compile test's signature."""
    return tuple(gl.NVMMASharedLayout.get_default_for([rows, 64], gl.float16) for rows in (block_m, block_n))
