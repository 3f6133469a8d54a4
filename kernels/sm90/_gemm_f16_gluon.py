"""Gluon fp16 GEMM of the dense NVFP4 predecode path (CompileKey.f16_gemm == "gluon"; imported lazily by
kernels.sm90.gemm_nvfp4): out_bf16[M, N] = bf16((acc * 2^14) * alpha), acc = A16[M, K] @ B16[N, K]^T in float32,
A16 / B16 the operands decode_nvfp4_to_f16_kernel wrote (e2m1 * e4m3 * 2^-7 each, exact).

Same bits as gemm_f16_alpha_kernel (the Triton kernel it replaces, kept as f16_gemm == "triton"): per output element
one float32 accumulator from +0, the K tiles of BK = 64 in increasing order, each tile 4 fp16 wgmma k16 steps in
increasing k (both kernels hand a [rows, 64] x [64, cols] product to the same wgmma instructions), zeros past M, N and
K (TMA zero fill here, masked loads there: the same zero products), then the same epilogue: acc * 2^14 (exact),
times alpha, one rounding to bf16 (round to nearest even), rows and columns past M and N not stored.

Structure: persistent (one program per SM at most; program p takes output tiles p, p + P, ... in the Triton kernel's
grouped raster), warp-specialized (gl.warp_specialize): one producer warp issues the TMA loads of both operands'
[BM, 64] / [BN, 64] blocks into an NS-stage shared ring (ready barriers: expect + copies; empty barriers: the
consumers' release), running ahead across tile boundaries; the kernel's warps (two warpgroups: BM = 128 gives each
64 rows x BN, BM = 256 each 128 rows) run the wgmma chain, one asynchronous wgmma group in flight (wait(1) before
a stage is released), and the epilogue (bf16 stores from the accumulator registers) while the producer already
fills the ring with the next tile's first K blocks.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from kernels.sm90._consts import DECODE_UNSCALE
from kernels.sm90._gemm_nvfp4_jit import _e2m1_nibbles_to_f16_asm as _tl_e2m1_nibbles_to_f16_asm
from kernels.sm90._gemm_nvfp4_jit import _e4m3_u8_to_f16_x128 as _tl_e4m3_u8_to_f16_x128

_FUSED_PRODUCER_REGS = gl.constexpr(112)  # a FUSE_A producer thread (4 warps); the 8 math warps drop to 192
_DECODE_UNSCALE = gl.constexpr(DECODE_UNSCALE)  # the decode scale undone in the epilogue (exact)
BK = gl.constexpr(64)  # K elements per ring stage: 4 wgmma k16 steps, gemm_f16_alpha_kernel's BLOCK_K


@gluon.constexpr_function
def acc_layout(bm, bn, num_warps):
    """The wgmma accumulator layout of a [bm, bn] tile on num_warps warps (16 rows a warp, rows repeated past
    16 * num_warps; instruction m64 x bn x k16 a warpgroup)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bn, 16])


@gluon.jit
def _tile_origin(tile, num_m, num_n, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """(first row of A, first row of B) of output tile number `tile`: gemm_f16_alpha_kernel's grouped raster
    (GROUP_M row tiles of A per group, down the group's column first)."""
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
def _consumer(a_ring, b_ring, ready, empty, alpha_ptr, out_ptr, M, N, num_m, num_n, k_iters, BM: gl.constexpr,
              BN: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr):
    """The math partition (the kernel's warps): per tile one accumulator chain over the K blocks in order (async
    wgmma, one group left in flight; the stage of the previous group released once it is done), then the
    epilogue."""
    layout: gl.constexpr = acc_layout(BM, BN, gl.num_warps())
    alpha = gl.load(alpha_ptr)
    c = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        m0, n0 = _tile_origin(tile, num_m, num_n, BM, BN, GROUP_M)
        acc = gl.zeros([BM, BN], gl.float32, layout=layout)
        for kk in range(k_iters):
            s = c % NS
            mbarrier.wait(ready.index(s), (c // NS) & 1)
            acc = warpgroup_mma(a_ring.index(s), b_ring.index(s).permute((1, 0)), acc, is_async=True)
            acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_ring.index(s), b_ring.index(s)))
            _release(empty, c + NS - 1, kk > 0, NS)  # the previous K block's stage: its wgmma is done
            c += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        _release(empty, c + NS - 1, True, NS)  # the tile's last stage
        _store_tile(acc, alpha, out_ptr, m0, n0, M, N, BM, BN, layout)


# ---- FUSE_A: A decoded from NVFP4 by the producer partition (4 warps) straight into the ring ----------------------
# The packed bytes [BM, 32] of a K block (16 a thread: one 16-byte load, two rows a thread at BM 128) and the
# block-scale word of each row (one int32 = the 4 E4M3 scales of the 64 elements: the 128x4 swizzle keeps them
# together), decoded by _gemm_nvfp4_jit's helpers (the same integer / fp16 operations as decode_nvfp4_to_f16_kernel,
# so the same fp16 values, zeros past M and K as the TMA fill), interleaved to natural k and stored into the stage.
_A_BYTES_LAYOUT = gl.constexpr(gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0]))
_e2m1_nibbles_to_f16_asm = gluon.jit(_tl_e2m1_nibbles_to_f16_asm.fn)
_e4m3_u8_to_f16_x128 = gluon.jit(_tl_e4m3_u8_to_f16_x128.fn)


@gluon.constexpr_function
def _a_smem_layout(bm):
    return gl.NVMMASharedLayout.get_default_for([bm, 64], gl.float16)


@gluon.jit
def _load_a_block(ap_ptr, asf_ptr, m0, kk, M, HALF_K, CP4, BM: gl.constexpr):
    """A's packed bytes [BM, 32] (u8, zero past M and K) and the rows' scale words [BM] (int32, zero past M) of K
    block kk: decode_nvfp4_to_f16_kernel's _load_raw for a 64-wide block."""
    rows = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, _A_BYTES_LAYOUT))
    pcols = kk * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, _A_BYTES_LAYOUT))
    row_ok = rows < M
    b = gl.load(ap_ptr + gl.expand_dims(rows.to(gl.int64) * HALF_K, 1) + gl.expand_dims(pcols, 0),
                mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(pcols < HALF_K, 0), other=0)
    woff = ((rows // 128) * CP4 + kk) * 128 + (rows % 32) * 4 + (rows // 32) % 4
    w = gl.load(asf_ptr + woff, mask=row_ok & (kk < CP4), other=0)
    return b, w


@gluon.jit
def _decode_a_block(b, w, kk, HALF_K, BM: gl.constexpr):
    """[BM, 64] fp16 in natural k order: e2m1 * e4m3 block scale * 2^-7 (byte j: elements 2j (low nibble) and
    2j + 1, block j // 8, whose scale is byte (j // 8) % 4 of the row's word; blocks past K scale 0)."""
    pcols = kk * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, _A_BYTES_LAYOUT))
    sc = (gl.expand_dims(w, 1) >> gl.expand_dims(((pcols // 8) % 4) * 8, 0)) & 0xFF
    sc = gl.where(gl.expand_dims(pcols < HALF_K, 0), sc, 0)
    s16 = _e4m3_u8_to_f16_x128(sc)
    lo, hi = _e2m1_nibbles_to_f16_asm(b)
    return gl.reshape(gl.join(lo * s16, hi * s16), [BM, BK])


@gluon.jit
def _producer_fused_a(ap_ptr, asf_ptr, b_desc, a_ring, b_ring, ready, empty, M, HALF_K, CP4, num_m, num_n, k_iters,
                      BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr):
    """The FUSE_A producer partition (4 warps): per (tile, K block) pair c, A's raw bytes loaded first (in flight
    while the stage is still in use), then, once stage c % NS is released: B's TMA load (expect: one of the stage's
    two arrivals), A decoded and stored, made visible to the wgmma (async proxy) by every thread, a barrier of the
    partition, the second arrival."""
    c = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        m0, n0 = _tile_origin(tile, num_m, num_n, BM, BN, GROUP_M)
        for kk in range(k_iters):
            s = c % NS
            b, w = _load_a_block(ap_ptr, asf_ptr, m0, kk, M, HALF_K, CP4, BM)
            mbarrier.wait(empty.index(s), ((c // NS) & 1) ^ 1)
            mbarrier.expect(ready.index(s), b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(b_desc, [n0, kk * BK], ready.index(s), b_ring.index(s))
            a_ring.index(s).store(_decode_a_block(b, w, kk, HALF_K, BM))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(ready.index(s), count=1)
            c += 1


@gluon.jit(do_not_specialize=["M", "CP4"])  # used in masks / scale-word offsets only: fewer compiled variants
def gemm_f16_alpha_gluon_kernel(a_desc, b_desc, alpha_ptr, out_ptr, ap_ptr, asf_ptr, M, N, K, HALF_K, CP4,
                                BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, GROUP_M: gl.constexpr,
                                FUSE_A: gl.constexpr):
    """out_bf16 = bf16((A16 @ B16^T * 2^14) * alpha): a_desc / b_desc tensor descriptors of A16 [M, K] / B16 [N, K]
    fp16 (blocks [BM, 64] / [BN, 64], zero fill past the edges), alpha_ptr one float32, out_ptr [M, N] bf16.
    FUSE_A: A is not predecoded: ap_ptr / asf_ptr are its packed bytes [M, K/2] and 128x4-swizzled scales (int32
    words, CP4 a row block; HALF_K = K / 2 its row stride, an argument so that Triton sees its divisibility and
    loads 16 bytes a thread), decoded by the producer partition (4 warps) into the ring (a_desc unused); else those
    four are unused. Grid: at most one program per SM (any count gives the same bits)."""
    if FUSE_A:
        a_ring = gl.allocate_shared_memory(gl.float16, [NS, BM, BK], _a_smem_layout(BM))
    else:
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [NS, BM, BK], a_desc.layout)
    b_ring = gl.allocate_shared_memory(b_desc.dtype, [NS, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NS):
        mbarrier.init(ready.index(j), count=2 if FUSE_A else 1)
        mbarrier.init(empty.index(j), count=1)
    fence_async_shared()
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    k_iters = gl.cdiv(K, BK)
    if FUSE_A:
        gl.warp_specialize([
            (_consumer, (a_ring, b_ring, ready, empty, alpha_ptr, out_ptr, M, N, num_m, num_n, k_iters, BM, BN, NS,
                         GROUP_M)),
            (_producer_fused_a, (ap_ptr, asf_ptr, b_desc, a_ring, b_ring, ready, empty, M, HALF_K, CP4, num_m, num_n,
                                 k_iters, BM, BN, NS, GROUP_M)),
        ], [4], [_FUSED_PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (a_ring, b_ring, ready, empty, alpha_ptr, out_ptr, M, N, num_m, num_n, k_iters, BM, BN, NS,
                         GROUP_M)),
            (_producer, (a_desc, b_desc, a_ring, b_ring, ready, empty, num_m, num_n, k_iters, BM, BN, NS, GROUP_M)),
        ], [1], [40])


def gluon_operand_layouts(block_m: int, block_n: int):
    """The shared layouts of the kernel's TMA blocks, (A [block_m, 64], B [block_n, 64]) fp16 (128-byte swizzle):
    the launcher's descriptors and the compile test's signature."""
    return tuple(gl.NVMMASharedLayout.get_default_for([rows, 64], gl.float16) for rows in (block_m, block_n))
