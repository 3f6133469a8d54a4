"""Gluon body of kernels.sm90.gemm_fp8_block for CompileKey.gluon (token-major tiles at M >= 128; imported lazily
by its _compile). The same operations per output element, in the same order, as _gemm_fp8_block_jit's token-major
TMA path, so the same bits (kernels/sm90/NOTES_FP8.md, "Gluon kernel").

Structure (DeepGEMM's on sm90, written here from the idea): tokens on the wgmma's M side (64 rows per warpgroup:
BM 64 on 4 warps, 128 on 8), BN 64 / 128 weight rows (inside one 128-row weight-scale block, so the weight scale is
one scalar per tile and group); both operands by TMA into an NS-stage shared ring, one mbarrier per stage (zero fill
past M, N and K); per 128-K group one asynchronous wgmma (E4M3 x E4M3 -> fp32, both operands from shared) started
from zero, two groups per loop iteration into two accumulators of fixed roles (even / odd groups): both wgmmas
issued, the even group waited for and promoted while the odd group's runs, then the odd group (no wgmma in flight
across the loop's back edge or a branch: ptxas would copy the accumulator there and serialize every wgmma, C7514 /
C7517); a stage is refilled once both warpgroups are past its wgmma (a CTA barrier).
The promotion is the Triton kernel's: sigma = f32(sa[t, g] * sw[n // 128, g]) (mul.f32), then fma(dot, sigma, sum),
the chunk sum from +0 added to the running total at the chunk's end (add.f32). With more than one chunk the
running total lives in shared memory (swizzled: no bank conflicts; each thread reads back only what it wrote, but
Triton's membar pass still puts a CTA barrier (BAR.SYNC) between the store and the next load), so the registers
hold two group accumulators and the chunk sum.
The producer-warp kernel also takes 192 weight rows a tile (gemm_fp8_block_gluon_wide_kernel, CompileKey.block_n 192):
a 128-row and a 64-row piece, each inside one weight-scale block, one accumulator each (NOTES_FP8.md, "Wide tile").
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from kernels.sm90._gemm_fp8_block_jit import round_f32_to_bf16_bits as _tl_round_f32_to_bf16_bits
from kernels.sm90._gemm_fp8_block_jit import ue8m0_u8_to_f32 as _tl_ue8m0_u8_to_f32


# the Triton kernel's elementwise helpers, compiled as Gluon functions (the same integer / float32 expressions)
_round_f32_to_bf16_bits = gluon.jit(_tl_round_f32_to_bf16_bits.fn)
_ue8m0_u8_to_f32 = gluon.jit(_tl_ue8m0_u8_to_f32.fn)


@gluon.jit
def _sigma(sa_ptrs, t_ok, sw_ptr, g, AS_UE8M0: gl.constexpr):
    """f32(sa[t, g] * sw[tile's block, g]) as a [BM, 1] column (rows past M: scale 0, their codes are zero)."""
    sa = gl.load(sa_ptrs + g, mask=t_ok, other=0)
    if AS_UE8M0:
        sa = _ue8m0_u8_to_f32(sa)
    sw = gl.load(sw_ptr + g)
    return gl.expand_dims(sa * sw, 1)


@gluon.jit
def _promote(d, sigma, total, part, total_smem, g, G, CHUNK_BLOCKS: gl.constexpr, CHUNKED: gl.constexpr,
             layout: gl.constexpr):
    """Group g's dot scaled into the float32 sums, as _gemm_fp8_block_jit._promote: the chunk sum `part` from
    zero in group order, added to the running total (shared memory) at the chunk's end (CHUNKED), else straight
    into `total` (registers)."""
    if CHUNKED:
        part = part + d * sigma
        if ((g + 1) % CHUNK_BLOCKS == 0) | (g + 1 == G):
            total_smem.store(total_smem.load(layout) + part)
            part = gl.zeros_like(part)
    else:
        total = total + d * sigma
    return total, part


# the running total's shared layout: a warp's store / load of its accumulator fragment (two float32 at rows lane / 4
# of its 16, column 2 (lane % 4) + 8 j) touches 8 rows at one column group; rows BN * 4 bytes apart would put them on
# the same banks (8-way conflicts). Swizzled by 8-float vectors (vector index XOR row % 8), the 8 rows land on 8
# different vectors: 64 words twice on each of the 32 banks, two wavefronts (the least for 64 words); no padding
# (128 x 128 chunked at 5 stages already uses 229 KB of the 232448 bytes a block may have).
_TOTAL_LAYOUT = gl.constexpr(gl.SwizzledSharedLayout(8, 1, 8, order=[1, 0]))


@gluon.constexpr_function
def _mma_layout(bm, bn):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[bm // 16, 1], instr_shape=[16, bn, 32])


@gluon.jit
def _ring(a_desc, w_desc, BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr):
    """The NS-stage shared ring of both operands' [rows, 128] blocks and its mbarriers (one a stage), initialised."""
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [NS, BM, 128], a_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [NS, BN, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NS):
        mbarrier.init(ready.index(j), count=1)
    fence_async_shared()
    return a_ring, w_ring, ready


@gluon.jit
def _load_stage(s, t0, n0, k0, ok, a_desc, w_desc, a_ring, w_ring, ready):
    """Stage s <- the activation block at (t0, k0) and the weight block at (n0, k0) by TMA, if ok."""
    mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(a_desc, [t0, k0], ready.index(s), a_ring.index(s), pred=ok)
    tma.async_copy_global_to_shared(w_desc, [n0, k0], ready.index(s), w_ring.index(s), pred=ok)


@gluon.jit
def _issue_mma(i, a_ring, w_ring, ready, acc, NS: gl.constexpr):
    """Wait for iteration i's stage and start its wgmma from zero (asynchronous) into acc's registers (use_acc off:
    their values are not read; passing them ties the loop's accumulator to its registers, no copy of a wgmma's
    registers while it runs)."""
    s = i % NS
    mbarrier.wait(ready.index(s), (i // NS) & 1)
    return warpgroup_mma(a_ring.index(s), w_ring.index(s).permute((1, 0)), acc, use_acc=False, is_async=True)


@gluon.jit
def _retire(d, i, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs, t_ok, sw_ptr, total, part,
            total_smem, G, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, CHUNKED: gl.constexpr,
            AS_UE8M0: gl.constexpr, layout: gl.constexpr):
    """Iteration i's wgmma is done (d): once both warpgroups are past it (a CTA barrier) its stage takes iteration
    i + NS, then group g_lo + i is promoted."""
    gl.thread_barrier()
    _load_stage(i % NS, t0, n0, (g_lo + i + NS) * 128, i + NS < n_iter, a_desc, w_desc, a_ring, w_ring, ready)
    sigma = _sigma(sa_ptrs, t_ok, sw_ptr, g_lo + i, AS_UE8M0)
    return _promote(d, sigma, total, part, total_smem, g_lo + i, G, CHUNK_BLOCKS, CHUNKED, layout)


@gluon.jit
def _tile_start(M, N, G, as_ptr, ws_ptr, stride_as, BM: gl.constexpr, BN: gl.constexpr, CHUNK_BLOCKS: gl.constexpr,
                SPLIT: gl.constexpr, GROUP_T: gl.constexpr, layout: gl.constexpr):
    """This program's output tile (grouped raster of GROUP_T token tiles, as the Triton kernel's) and its groups:
    (t0, n0, token rows t, weight rows n, t < M, the token scales' row pointers, the weight scales' row pointer,
    first group g_lo, group count n_iter: chunk program_id(2) alone when SPLIT, else all G)."""
    pid_t, pid_n = _raster(M, N, BM, BN, GROUP_T)
    t0 = pid_t * BM
    n0 = pid_n * BN
    t = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    t_ok = t < M
    sa_ptrs = as_ptr + t.to(gl.int64) * stride_as
    sw_ptr = ws_ptr + (n0 // 128) * G
    g_lo, n_iter = _groups(G, CHUNK_BLOCKS, SPLIT)
    return t0, n0, t, n, t_ok, sa_ptrs, sw_ptr, g_lo, n_iter


@gluon.jit
def _raster(M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_T: gl.constexpr):
    """(token tile, weight tile) of this program: the grouped raster of GROUP_T token tiles (the Triton kernel's)."""
    num_n = gl.cdiv(N, BN)
    pid = gl.program_id(1) * num_n + gl.program_id(0)
    width = GROUP_T * num_n
    first_t = (pid // width) * GROUP_T
    rows_t = gl.minimum(gl.cdiv(M, BM) - first_t, GROUP_T)
    return first_t + (pid % width) % rows_t, (pid % width) // rows_t


@gluon.jit
def _groups(G, CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr):
    """(first group, group count) of this program: chunk program_id(2) alone when SPLIT, else all G."""
    if SPLIT:
        g_lo = gl.program_id(2) * CHUNK_BLOCKS
        n_iter = gl.minimum(G - g_lo, CHUNK_BLOCKS)
    else:
        g_lo = 0
        n_iter = G
    return g_lo, n_iter


@gluon.jit
def _prefetch(t0, n0, g_lo, n_iter, a_desc, w_desc, a_ring, w_ring, ready, NS: gl.constexpr):
    """The ring's first fill: groups g_lo .. g_lo + NS - 1 into stages 0 .. NS - 1 (none past n_iter)."""
    for j in gl.static_range(NS):
        _load_stage(j, t0, n0, (g_lo + j) * 128, j < n_iter, a_desc, w_desc, a_ring, w_ring, ready)


@gluon.jit
def _sums(a_ring, BM: gl.constexpr, BN: gl.constexpr, CHUNKED: gl.constexpr, layout: gl.constexpr):
    """Zeros for the running sums and, when CHUNKED, the running total's shared buffer, zero-filled (else a_ring
    stands in, unused)."""
    zero = gl.zeros([BM, BN], gl.float32, layout=layout)
    if CHUNKED:
        total_smem = gl.allocate_shared_memory(gl.float32, [BM, BN], _TOTAL_LAYOUT, zero)
    else:
        total_smem = a_ring  # unused
    return zero, total_smem


@gluon.jit
def _store_out(total, total_smem, out_ptr, t, n, t_ok, N, stride_om, stride_oc, SPLIT: gl.constexpr,
               CHUNKED: gl.constexpr, layout: gl.constexpr):
    """The tile's sum (in total_smem when CHUNKED): float32 at chunk program_id(2)'s slice when SPLIT (the reduce
    kernel adds the chunks in order), else rounded to bf16 as the Triton kernel does."""
    if CHUNKED:
        total = total_smem.load(layout)
    o = out_ptr + gl.expand_dims(t.to(gl.int64) * stride_om, 1) + gl.expand_dims(n, 0)
    o_ok = gl.expand_dims(t_ok, 1) & gl.expand_dims(n < N, 0)
    if SPLIT:
        gl.store(o + gl.program_id(2).to(gl.int64) * stride_oc, total, mask=o_ok)
    else:
        gl.store(o, _round_f32_to_bf16_bits(total).to(gl.bfloat16), mask=o_ok)


@gluon.jit
def gemm_fp8_block_gluon_kernel(
    w_desc, a_desc, ws_ptr, as_ptr, out_ptr,
    M, N, G, stride_as, stride_om, stride_oc,
    BN: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr,
    CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, GROUP_T: gl.constexpr,
):
    """out tile [BM tokens, BN weight rows] = sum over the 128-K groups g of dot(A[t, g], W[n, g]) *
    (sa[t, g] * sw[n // 128, g]) in float32, in chunk_plan's order (gemm_fp8_block_kernel's docstring): w_desc /
    a_desc are tensor descriptors of the E4M3 codes W [N, K] / A [M, K] (blocks [BN, 128] / [BM, 128]).
    SPLIT: this program sums chunk program_id(2) alone (one accumulator from zero: the unsplit chunk sum's bits)
    and stores it float32 at out_ptr + chunk * stride_oc (the reduce kernel adds the chunks in order); else the
    program walks every chunk and stores bf16. Grouped raster as the Triton kernel's (GROUP_T token tiles)."""
    layout: gl.constexpr = _mma_layout(BM, BN)
    t0, n0, t, n, t_ok, sa_ptrs, sw_ptr, g_lo, n_iter = _tile_start(M, N, G, as_ptr, ws_ptr, stride_as, BM, BN,
                                                                    CHUNK_BLOCKS, SPLIT, GROUP_T, layout)

    a_ring, w_ring, ready = _ring(a_desc, w_desc, BM, BN, NS)
    _prefetch(t0, n0, g_lo, n_iter, a_desc, w_desc, a_ring, w_ring, ready, NS)

    zero, total_smem = _sums(a_ring, BM, BN, CHUNKED, layout)
    total = zero
    part = zero

    # two groups per iteration, fixed roles (acc0 the even groups, acc1 the odd ones, each wgmma writing over its own
    # accumulator's registers): the even group is promoted while the odd group's wgmma runs; no wgmma is in flight
    # across the loop's back edge or a branch, else ptxas copies the accumulator there and serializes every wgmma
    acc0 = zero
    acc1 = zero
    for p in range(0, n_iter // 2):
        i = 2 * p
        acc0 = _issue_mma(i, a_ring, w_ring, ready, acc0, NS)
        acc1 = _issue_mma(i + 1, a_ring, w_ring, ready, acc1, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
        total, part = _retire(acc0, i, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs, t_ok,
                              sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc1, ))
        total, part = _retire(acc1, i + 1, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs,
                              t_ok, sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
    if n_iter % 2 == 1:  # the last group of an odd count (its load issued: no refill)
        i = n_iter - 1
        acc0 = _issue_mma(i, a_ring, w_ring, ready, acc0, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, ))
        total, part = _promote(acc0, _sigma(sa_ptrs, t_ok, sw_ptr, g_lo + i, AS_UE8M0), total, part, total_smem,
                               g_lo + i, G, CHUNK_BLOCKS, CHUNKED, layout)
    for j in gl.static_range(NS):
        mbarrier.invalidate(ready.index(j))
    _store_out(total, total_smem, out_ptr, t, n, t_ok, N, stride_om, stride_oc, SPLIT, CHUNKED, layout)


@gluon.jit
def _tile_origin(tile, num_n, M, BM: gl.constexpr, BN: gl.constexpr, GROUP_T: gl.constexpr):
    """(first token row, first weight row) of output tile number `tile`: the grouped raster of the tile kernel. A
    tile past the last (a predicated-off load's) gets some origin, never a division by zero."""
    width = GROUP_T * num_n
    first_t = (tile // width) * GROUP_T
    rows_t = gl.maximum(gl.minimum(gl.cdiv(M, BM) - first_t, GROUP_T), 1)
    return (first_t + (tile % width) % rows_t) * BM, ((tile % width) // rows_t) * BN


@gluon.jit
def _issue_load(j, w_desc, a_desc, a_ring, w_ring, ready, pid, nprog, num_n, M, G, n_all, BM: gl.constexpr,
                BN: gl.constexpr, NS: gl.constexpr, GROUP_T: gl.constexpr):
    """The TMA loads of this program's flat iteration j (its tile j // G, group j % G) into stage j % NS (none past
    the program's last iteration n_all)."""
    t0, n0 = _tile_origin(pid + (j // G) * nprog, num_n, M, BM, BN, GROUP_T)
    _load_stage(j % NS, t0, n0, (j % G) * 128, j < n_all, a_desc, w_desc, a_ring, w_ring, ready)


@gluon.jit
def _store_tile(total, out_ptr, t0, n0, M, N, stride_om, layout: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    t = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    o = out_ptr + gl.expand_dims(t.to(gl.int64) * stride_om, 1) + gl.expand_dims(n, 0)
    o_ok = gl.expand_dims(t < M, 1) & gl.expand_dims(n < N, 0)
    gl.store(o, _round_f32_to_bf16_bits(total).to(gl.bfloat16), mask=o_ok)


@gluon.jit
def _retire_flat(d, j, w_desc, a_desc, a_ring, w_ring, ready, ws_ptr, as_ptr, out_ptr, pid, nprog, num_n, M, N, G,
                 n_all, stride_as, stride_om, total, part, total_smem, BM: gl.constexpr, BN: gl.constexpr,
                 NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr,
                 GROUP_T: gl.constexpr, layout: gl.constexpr):
    """The persistent kernel's _retire: flat iteration j's wgmma is done (d); once both warpgroups are past it its
    stage takes iteration j + NS; its group promoted; at a tile's last group the tile is stored and the sums go
    back to zero."""
    gl.thread_barrier()
    _issue_load(j + NS, w_desc, a_desc, a_ring, w_ring, ready, pid, nprog, num_n, M, G, n_all, BM, BN, NS, GROUP_T)
    g = j % G
    t0, n0 = _tile_origin(pid + (j // G) * nprog, num_n, M, BM, BN, GROUP_T)
    t = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    sigma = _sigma(as_ptr + t.to(gl.int64) * stride_as, t < M, ws_ptr + (n0 // 128) * G, g, AS_UE8M0)
    total, part = _promote(d, sigma, total, part, total_smem, g, G, CHUNK_BLOCKS, CHUNKED, layout)
    if g == G - 1:  # the tile's last group: store it, the sums back to zero for the next tile
        if CHUNKED:
            _store_tile(total_smem.load(layout), out_ptr, t0, n0, M, N, stride_om, layout, BM, BN)
            total_smem.store(gl.zeros_like(part))
        else:
            _store_tile(total, out_ptr, t0, n0, M, N, stride_om, layout, BM, BN)
            total = gl.zeros_like(total)
    return total, part


@gluon.jit
def gemm_fp8_block_gluon_persistent_kernel(
    w_desc, a_desc, ws_ptr, as_ptr, out_ptr,
    M, N, G, stride_as, stride_om,
    BN: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, CHUNKED: gl.constexpr,
    AS_UE8M0: gl.constexpr, GROUP_T: gl.constexpr,
):
    """gemm_fp8_block_gluon_kernel unsplit, persistent (CompileKey.persistent): program p of the grid's P (at most one
    per SM) computes the output tiles p, p + P, ... in the tile kernel's raster order, its (tile, group) pairs one flat
    sequence, so the ring already holds the next tile's first groups (and, where the tile's last group is an even
    iteration, the next tile's first wgmma runs) while a tile's last group is promoted and stored. Per tile the same
    operations in the same order as the tile kernel (same bits)."""
    layout: gl.constexpr = _mma_layout(BM, BN)

    num_n = gl.cdiv(N, BN)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n_tiles = gl.cdiv(M, BM) * num_n
    n_all = ((n_tiles - pid + nprog - 1) // nprog) * G  # this program's (tile, group) iterations

    a_ring, w_ring, ready = _ring(a_desc, w_desc, BM, BN, NS)
    for j in gl.static_range(NS):
        _issue_load(j, w_desc, a_desc, a_ring, w_ring, ready, pid, nprog, num_n, M, G, n_all, BM, BN, NS, GROUP_T)

    zero, total_smem = _sums(a_ring, BM, BN, CHUNKED, layout)
    total = zero
    part = zero

    # two (tile, group) iterations per loop iteration, fixed roles, no wgmma in flight across the back edge: as the
    # tile kernel's loop
    acc0 = zero
    acc1 = zero
    for p in range(0, n_all // 2):
        q = 2 * p
        acc0 = _issue_mma(q, a_ring, w_ring, ready, acc0, NS)
        acc1 = _issue_mma(q + 1, a_ring, w_ring, ready, acc1, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
        total, part = _retire_flat(acc0, q, w_desc, a_desc, a_ring, w_ring, ready, ws_ptr, as_ptr, out_ptr, pid,
                                   nprog, num_n, M, N, G, n_all, stride_as, stride_om, total, part, total_smem, BM, BN,
                                   NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, GROUP_T, layout)
        acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc1, ))
        total, part = _retire_flat(acc1, q + 1, w_desc, a_desc, a_ring, w_ring, ready, ws_ptr, as_ptr, out_ptr, pid,
                                   nprog, num_n, M, N, G, n_all, stride_as, stride_om, total, part, total_smem, BM, BN,
                                   NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, GROUP_T, layout)
    if n_all % 2 == 1:
        q = n_all - 1
        acc0 = _issue_mma(q, a_ring, w_ring, ready, acc0, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, ))
        total, part = _retire_flat(acc0, q, w_desc, a_desc, a_ring, w_ring, ready, ws_ptr, as_ptr, out_ptr, pid,
                                   nprog, num_n, M, N, G, n_all, stride_as, stride_om, total, part, total_smem, BM, BN,
                                   NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, GROUP_T, layout)
    for s in gl.static_range(NS):
        mbarrier.invalidate(ready.index(s))


@gluon.jit
def gemm_fp8_block_gluon_acc3_kernel(
    w_desc, a_desc, ws_ptr, as_ptr, out_ptr,
    M, N, G, stride_as, stride_om, stride_oc,
    BN: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr,
    CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, GROUP_T: gl.constexpr,
):
    """gemm_fp8_block_gluon_kernel with every promotion under a wgmma (CompileKey.acc3): three accumulators of fixed
    roles, three groups an iteration. Group 0 is issued and waited for before the loop (nothing to overlap with yet);
    its result, done, waits in acc2 for its promotion. An iteration takes groups j, j + 1, j + 2 (j = 1 + 3 p):
    wgmma j into acc0, then the waiting group j - 1 (acc2, done) promoted while it runs; wgmma j + 1 into acc1, wait
    for j (one left in flight), j promoted while j + 1 runs; wgmma j + 2 into acc2, wait for j + 1, j + 1 promoted
    while j + 2 runs; wait for j + 2 (none in flight), whose promotion goes to the next iteration's first wgmma. So
    nothing is in flight across the back edge or a branch (a done accumulator crosses it: no copy of a running
    wgmma's registers, no ptxas serialization), and every group but the last is promoted while a later group's
    wgmma runs. The same promotions in group order (same bits as the tile kernel and the Triton kernel)."""
    layout: gl.constexpr = _mma_layout(BM, BN)
    t0, n0, t, n, t_ok, sa_ptrs, sw_ptr, g_lo, n_iter = _tile_start(M, N, G, as_ptr, ws_ptr, stride_as, BM, BN,
                                                                    CHUNK_BLOCKS, SPLIT, GROUP_T, layout)

    a_ring, w_ring, ready = _ring(a_desc, w_desc, BM, BN, NS)
    _prefetch(t0, n0, g_lo, n_iter, a_desc, w_desc, a_ring, w_ring, ready, NS)

    zero, total_smem = _sums(a_ring, BM, BN, CHUNKED, layout)
    total = zero
    part = zero

    acc0 = zero
    acc1 = zero
    acc2 = _issue_mma(0, a_ring, w_ring, ready, zero, NS)  # group 0 (n_iter >= 1): done, promoted in the loop
    acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc2, ))
    for p in range(0, (n_iter - 1) // 3):
        q = 1 + 3 * p
        acc0 = _issue_mma(q, a_ring, w_ring, ready, acc0, NS)
        total, part = _retire(acc2, q - 1, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs,
                              t_ok, sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc1 = _issue_mma(q + 1, a_ring, w_ring, ready, acc1, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
        total, part = _retire(acc0, q, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs, t_ok,
                              sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc2 = _issue_mma(q + 2, a_ring, w_ring, ready, acc2, NS)
        acc1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc1, ))
        total, part = _retire(acc1, q + 1, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs,
                              t_ok, sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc2, ))
    # the (n_iter - 1) % 3 groups left, the waiting group promoted under the first (refills predicated as in the
    # loop: with 2 stages the waiting group's stage still takes the last group)
    q = n_iter - (n_iter - 1) % 3
    if (n_iter - 1) % 3 == 2:
        acc0 = _issue_mma(q, a_ring, w_ring, ready, acc0, NS)
        total, part = _retire(acc2, q - 1, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs,
                              t_ok, sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc1 = _issue_mma(q + 1, a_ring, w_ring, ready, acc1, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
        total, part = _retire(acc0, q, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs, t_ok,
                              sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc1, ))
        acc2 = acc1
    elif (n_iter - 1) % 3 == 1:
        acc0 = _issue_mma(q, a_ring, w_ring, ready, acc0, NS)
        total, part = _retire(acc2, q - 1, g_lo, n_iter, t0, n0, a_desc, w_desc, a_ring, w_ring, ready, sa_ptrs,
                              t_ok, sw_ptr, total, part, total_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, ))
        acc2 = acc0
    # the last group (n_iter - 1), done, in acc2
    total, part = _promote(acc2, _sigma(sa_ptrs, t_ok, sw_ptr, g_lo + n_iter - 1, AS_UE8M0), total, part, total_smem,
                           g_lo + n_iter - 1, G, CHUNK_BLOCKS, CHUNKED, layout)
    for s in gl.static_range(NS):
        mbarrier.invalidate(ready.index(s))
    _store_out(total, total_smem, out_ptr, t, n, t_ok, N, stride_om, stride_oc, SPLIT, CHUNKED, layout)


@gluon.jit
def _producer(a_desc, w_desc, a_ring, w_ring, ready, empty, t0, n0, g_lo, n_iter, NS: gl.constexpr):
    """The producer partition (one warp): group i's operands into stage i % NS once the consumers released the
    stage's previous use (empty; a fresh barrier passes parity 1, so the first NS loads do not wait)."""
    for i in range(n_iter):
        s = i % NS
        mbarrier.wait(empty.index(s), ((i // NS) & 1) ^ 1)
        _load_stage(s, t0, n0, (g_lo + i) * 128, True, a_desc, w_desc, a_ring, w_ring, ready)


@gluon.jit
def _release(i, empty, NS: gl.constexpr):
    """Group i's stage back to the producer once every math warp is past its wgmmas (a barrier of the consumer
    partition, then one arrival)."""
    gl.thread_barrier()
    mbarrier.arrive(empty.index(i % NS), count=1)


@gluon.jit
def _consume(d, i, empty, sa_ptrs, t_ok, sw_ptr, g_lo, total, part, total_smem, G, NS: gl.constexpr,
             CHUNK_BLOCKS: gl.constexpr, CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, layout: gl.constexpr):
    """Group g_lo + i's wgmma is done (d): its stage goes back to the producer (_release), then the group is
    promoted."""
    _release(i, empty, NS)
    sigma = _sigma(sa_ptrs, t_ok, sw_ptr, g_lo + i, AS_UE8M0)
    return _promote(d, sigma, total, part, total_smem, g_lo + i, G, CHUNK_BLOCKS, CHUNKED, layout)


@gluon.jit
def _consumer(a_ring, w_ring, ready, empty, total_smem, out_ptr, t, n, sa_ptrs, t_ok, sw_ptr, g_lo, n_iter, N, G,
              stride_om, stride_oc, BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr,
              CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr, CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr):
    """The math partition (the kernel's warps): the two-accumulator loop of gemm_fp8_block_gluon_kernel (no refill:
    a stage is released to the producer instead) and the store."""
    layout: gl.constexpr = _mma_layout(BM, BN)
    zero = gl.zeros([BM, BN], gl.float32, layout=layout)
    total = zero
    part = zero
    acc0 = zero
    acc1 = zero
    for p in range(0, n_iter // 2):
        i = 2 * p
        acc0 = _issue_mma(i, a_ring, w_ring, ready, acc0, NS)
        acc1 = _issue_mma(i + 1, a_ring, w_ring, ready, acc1, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
        total, part = _consume(acc0, i, empty, sa_ptrs, t_ok, sw_ptr, g_lo, total, part, total_smem, G, NS,
                               CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
        acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc1, ))
        total, part = _consume(acc1, i + 1, empty, sa_ptrs, t_ok, sw_ptr, g_lo, total, part, total_smem, G, NS,
                               CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
    if n_iter % 2 == 1:
        i = n_iter - 1
        acc0 = _issue_mma(i, a_ring, w_ring, ready, acc0, NS)
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, ))
        total, part = _consume(acc0, i, empty, sa_ptrs, t_ok, sw_ptr, g_lo, total, part, total_smem, G, NS,
                               CHUNK_BLOCKS, CHUNKED, AS_UE8M0, layout)
    _store_out(total, total_smem, out_ptr, t, n, t_ok, N, stride_om, stride_oc, SPLIT, CHUNKED, layout)


@gluon.jit
def gemm_fp8_block_gluon_producer_kernel(
    w_desc, a_desc, ws_ptr, as_ptr, out_ptr,
    M, N, G, stride_as, stride_om, stride_oc,
    BN: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr,
    CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, GROUP_T: gl.constexpr,
):
    """gemm_fp8_block_gluon_kernel with a producer warp (CompileKey.producer, gl.warp_specialize): one extra warp
    issues every TMA load of the tile into the ring (ready barriers: expect + copies; empty barriers: the consumers'
    release), the kernel's warps run the two-accumulator wgmma loop and the promotions without any load issue.
    Both partitions walk the same n_iter groups (every wait has its arrival: the producer waits for the release of
    group i - NS, which the consumers give for every group; n_iter >= 1). Same operations per element in the same
    order (same bits)."""
    layout: gl.constexpr = _mma_layout(BM, BN)
    t0, n0, t, n, t_ok, sa_ptrs, sw_ptr, g_lo, n_iter = _tile_start(M, N, G, as_ptr, ws_ptr, stride_as, BM, BN,
                                                                    CHUNK_BLOCKS, SPLIT, GROUP_T, layout)

    a_ring = gl.allocate_shared_memory(a_desc.dtype, [NS, BM, 128], a_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [NS, BN, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NS):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    if CHUNKED:
        total_smem = gl.allocate_shared_memory(gl.float32, [BM, BN], _TOTAL_LAYOUT,
                                               gl.zeros([BM, BN], gl.float32, layout=layout))
    else:
        total_smem = a_ring  # unused
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (a_ring, w_ring, ready, empty, total_smem, out_ptr, t, n, sa_ptrs, t_ok, sw_ptr, g_lo, n_iter, N,
                     G, stride_om, stride_oc, BM, BN, NS, CHUNK_BLOCKS, SPLIT, CHUNKED, AS_UE8M0)),
        (_producer, (a_desc, w_desc, a_ring, w_ring, ready, empty, t0, n0, g_lo, n_iter, NS)),
    ], [1], [40])


# CompileKey.block_n == 192 (with producer): 192 weight rows a tile as two pieces that each lie in one 128-row
# weight-scale block (so each piece's weight scale is one scalar per group, as in the 128-wide tile): tile p covers
# rows [192 p, 192 p + 192); for even p the 128-row piece is its first 128 rows and the 64-row piece the rest, for
# odd p (192 p = 64 mod 128) the 64-row piece comes first. Both pieces are power-of-two register tiles (Gluon's
# shapes), each its own wgmma (64 x 128 and 64 x 64 per warpgroup) reading the same token tile from shared memory.
WIDE_BN = gl.constexpr(192)


@gluon.jit
def _wide_rows(pid_n):
    """(first row of the 128-row piece, first row of the 64-row piece) of weight tile pid_n."""
    odd = pid_n % 2
    return pid_n * WIDE_BN + 64 * odd, pid_n * WIDE_BN + 128 - 128 * odd


@gluon.jit
def _scale_row(ws_ptr, r, N, G):
    """The weight-scale row of the piece starting at row r. A piece past N (its rows zero-filled by TMA, none
    stored) reads the last row instead of one past the end."""
    return ws_ptr + gl.minimum(r // 128, gl.cdiv(N, 128) - 1) * G


@gluon.jit
def _wide_producer(a_desc, w_desc, v_desc, a_ring, a_ring1, w_ring, v_ring, ready, empty, t0, r128, r64, N, g_lo,
                   n_iter, NS: gl.constexpr, TWO_A: gl.constexpr = False):
    """The producer partition (one warp) of the 192-row tile: group i's token block and both weight pieces into
    stage i % NS once the consumers released the stage's previous use (as _producer). A piece that starts past N
    (an edge tile) is loaded from row N - 1 instead (a box that overlaps the tensor; its columns are not stored).
    TWO_A (the dual kernel): the token tile as two 64-row blocks, rows t0 .. into a_ring, t0 + 64 .. into a_ring1
    (else a_ring1 is unused)."""
    r128 = gl.minimum(r128, N - 1)
    r64 = gl.minimum(r64, N - 1)
    for i in range(n_iter):
        s = i % NS
        mbarrier.wait(empty.index(s), ((i // NS) & 1) ^ 1)
        k0 = (g_lo + i) * 128
        mbarrier.expect(ready.index(s), (2 if TWO_A else 1) * a_desc.block_type.nbytes + w_desc.block_type.nbytes +
                        v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [t0, k0], ready.index(s), a_ring.index(s))
        if TWO_A:
            tma.async_copy_global_to_shared(a_desc, [t0 + 64, k0], ready.index(s), a_ring1.index(s))
        tma.async_copy_global_to_shared(w_desc, [r128, k0], ready.index(s), w_ring.index(s))
        tma.async_copy_global_to_shared(v_desc, [r64, k0], ready.index(s), v_ring.index(s))


@gluon.jit
def _issue_v(i, a_ring, v_ring, acc, NS: gl.constexpr):
    """The 64-row piece's wgmma of group i into acc's registers (asynchronous, from zero), issued after the 128-row
    piece's of the same group: its stage's ready wait already passed."""
    s = i % NS
    return warpgroup_mma(a_ring.index(s), v_ring.index(s).permute((1, 0)), acc, use_acc=False, is_async=True)


@gluon.jit
def _wide_sigma(as_ptr, sa_rows, sw_ptr, g, AS_UE8M0: gl.constexpr, layout: gl.constexpr):
    """_sigma for one piece of the 192-row tile: the token scales loaded in the 128-row piece's accumulator layout
    (one set of row offsets for both pieces, rows past M clamped to M - 1: those rows' operands are zero-filled
    and never stored, so no mask) and moved to the piece's `layout`, whose rows lie in the same threads (the same
    wgmma M side: a free move), then f32(sa[t, g] * sw[piece's block, g]) as a [BM, 1] column."""
    sa = gl.load(as_ptr + sa_rows + g)
    if AS_UE8M0:
        sa = _ue8m0_u8_to_f32(sa)
    return gl.expand_dims(gl.convert_layout(sa, gl.SliceLayout(1, layout)) * gl.load(sw_ptr + g), 1)


@gluon.jit
def _wide_group(i, g_lo, a_ring, w_ring, v_ring, ready, empty, acc_w, acc_v, as_ptr, sa_rows, sw_w, sw_v, total_w,
                part_w, total_w_smem, total_v, part_v, total_v_smem, G, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr,
                CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, lw: gl.constexpr, lv: gl.constexpr):
    """Group i alone: both pieces' wgmmas issued, the 128-row piece promoted while the 64-row one's runs, then the
    64-row piece waited for, its stage released, promoted (nothing left in flight)."""
    acc_w = _issue_mma(i, a_ring, w_ring, ready, acc_w, NS)
    acc_v = _issue_v(i, a_ring, v_ring, acc_v, NS)
    acc_w = warpgroup_mma_wait(num_outstanding=1, deps=(acc_w, ))
    total_w, part_w = _promote(acc_w, _wide_sigma(as_ptr, sa_rows, sw_w, g_lo + i, AS_UE8M0, lw), total_w, part_w,
                               total_w_smem, g_lo + i, G, CHUNK_BLOCKS, CHUNKED, lw)
    acc_v = warpgroup_mma_wait(num_outstanding=0, deps=(acc_v, ))
    _release(i, empty, NS)
    total_v, part_v = _promote(acc_v, _wide_sigma(as_ptr, sa_rows, sw_v, g_lo + i, AS_UE8M0, lv), total_v, part_v,
                               total_v_smem, g_lo + i, G, CHUNK_BLOCKS, CHUNKED, lv)
    return acc_w, acc_v, total_w, part_w, total_v, part_v


@gluon.jit
def _wide_consumer(a_ring, w_ring, v_ring, ready, empty, total_w_smem, total_v_smem, out_ptr, as_ptr, ws_ptr, M, N,
                   G, stride_as, stride_om, stride_oc, t0, pid_n, g_lo, n_iter, BM: gl.constexpr, NS: gl.constexpr,
                   CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr, CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr,
                   TWO_GROUPS: gl.constexpr = True):
    """The math partition of the 192-row tile. One accumulator per piece (96 registers a thread at 128 tokens) and the
    sums (96): two accumulator sets would not fit. CHUNKED with UE8M0 token scales (the running totals in shared
    memory, the chunk sums in registers): two groups i, i + 1 per loop iteration, each piece's wgmma issued as soon
    as its accumulator is free, so every promotion but the iteration's last runs under a wgmma: W(i) and V(i) issued
    (the 128-row piece W, the 64-row piece V; TWO_GROUPS off: the dual kernel's consumers, where the other
    warpgroup's wgmmas cover the promotions); W(i) waited for and promoted under V(i); W(i + 1) issued; V(i) waited
    for, its stage released, promoted under W(i + 1); V(i + 1) issued; W(i + 1) promoted under V(i + 1); V(i + 1)
    waited for, released, promoted (the one promotion not under a wgmma); an odd count's last group alone after the
    loop (as a loop instead, 4 bytes spill at wo_b). Otherwise one group an iteration (_wide_group: W promoted under
    V, V's promotion not under a wgmma), where the two-group loop spills on the sm_90a compile: split or one chunk
    (the totals in registers: 360-432 bytes of stack), float32 token scales (8 bytes at wq_a, idx_wq_b, shared_l1:
    one register around the next wgmma's issue). Nothing in flight across a back edge or a branch. Each element is
    promoted as in the 128-wide tile, groups in order: f32(sa * sw) of its piece's block, one fma, the chunk sum
    added at a chunk's end (same bits). Deadlock freedom: before waiting for group i + 1's stage the consumers have
    released every group up to i - 1, and the load of i + 1 needs only the release of i + 1 - NS <= i - 1 (NS >= 2)."""
    lw: gl.constexpr = _mma_layout(BM, 128)
    lv: gl.constexpr = _mma_layout(BM, 64)
    r128, r64 = _wide_rows(pid_n)
    sw_w = _scale_row(ws_ptr, r128, N, G)
    sw_v = _scale_row(ws_ptr, r64, N, G)
    tw = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, lw))
    sa_rows = gl.minimum(tw, M - 1).to(gl.int64) * stride_as
    zw = gl.zeros([BM, 128], gl.float32, layout=lw)
    zv = gl.zeros([BM, 64], gl.float32, layout=lv)
    total_w = zw
    part_w = zw
    total_v = zv
    part_v = zv
    acc_w = zw
    acc_v = zv
    PAIRS: gl.constexpr = CHUNKED and AS_UE8M0 and TWO_GROUPS
    for p in range(0, n_iter // 2 if PAIRS else 0):
        i = 2 * p
        acc_w = _issue_mma(i, a_ring, w_ring, ready, acc_w, NS)
        acc_v = _issue_v(i, a_ring, v_ring, acc_v, NS)
        acc_w = warpgroup_mma_wait(num_outstanding=1, deps=(acc_w, ))
        sigma = _wide_sigma(as_ptr, sa_rows, sw_w, g_lo + i, AS_UE8M0, lw)
        total_w, part_w = _promote(acc_w, sigma, total_w, part_w, total_w_smem, g_lo + i, G, CHUNK_BLOCKS, CHUNKED,
                                   lw)
        acc_w = _issue_mma(i + 1, a_ring, w_ring, ready, acc_w, NS)
        acc_v = warpgroup_mma_wait(num_outstanding=1, deps=(acc_v, ))
        _release(i, empty, NS)
        sigma = _wide_sigma(as_ptr, sa_rows, sw_v, g_lo + i, AS_UE8M0, lv)
        total_v, part_v = _promote(acc_v, sigma, total_v, part_v, total_v_smem, g_lo + i, G, CHUNK_BLOCKS, CHUNKED,
                                   lv)
        acc_v = _issue_v(i + 1, a_ring, v_ring, acc_v, NS)
        acc_w = warpgroup_mma_wait(num_outstanding=1, deps=(acc_w, ))
        sigma = _wide_sigma(as_ptr, sa_rows, sw_w, g_lo + i + 1, AS_UE8M0, lw)
        total_w, part_w = _promote(acc_w, sigma, total_w, part_w, total_w_smem, g_lo + i + 1, G, CHUNK_BLOCKS,
                                   CHUNKED, lw)
        acc_v = warpgroup_mma_wait(num_outstanding=0, deps=(acc_v, ))
        _release(i + 1, empty, NS)
        sigma = _wide_sigma(as_ptr, sa_rows, sw_v, g_lo + i + 1, AS_UE8M0, lv)
        total_v, part_v = _promote(acc_v, sigma, total_v, part_v, total_v_smem, g_lo + i + 1, G, CHUNK_BLOCKS,
                                   CHUNKED, lv)
    if PAIRS:  # an odd count's last group
        if n_iter % 2 == 1:
            acc_w, acc_v, total_w, part_w, total_v, part_v = _wide_group(
                n_iter - 1, g_lo, a_ring, w_ring, v_ring, ready, empty, acc_w, acc_v, as_ptr, sa_rows, sw_w, sw_v,
                total_w, part_w, total_w_smem, total_v, part_v, total_v_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0,
                lw, lv)
    else:  # one group an iteration (the running totals in registers: the two-group loop spills them)
        for i in range(0, n_iter):
            acc_w, acc_v, total_w, part_w, total_v, part_v = _wide_group(
                i, g_lo, a_ring, w_ring, v_ring, ready, empty, acc_w, acc_v, as_ptr, sa_rows, sw_w, sw_v, total_w,
                part_w, total_w_smem, total_v, part_v, total_v_smem, G, NS, CHUNK_BLOCKS, CHUNKED, AS_UE8M0, lw, lv)
    _store_out(total_w, total_w_smem, out_ptr, tw, r128 + gl.arange(0, 128, layout=gl.SliceLayout(0, lw)), tw < M,
               N, stride_om, stride_oc, SPLIT, CHUNKED, lw)
    tv = t0 + gl.arange(0, BM, layout=gl.SliceLayout(1, lv))
    _store_out(total_v, total_v_smem, out_ptr, tv, r64 + gl.arange(0, 64, layout=gl.SliceLayout(0, lv)), tv < M, N,
               stride_om, stride_oc, SPLIT, CHUNKED, lv)


@gluon.jit
def _wide_tile(M, N, G, BM: gl.constexpr, BN: gl.constexpr, GROUP_T: gl.constexpr, CHUNK_BLOCKS: gl.constexpr,
               SPLIT: gl.constexpr):
    """The 192-row tile's program: (first token row t0, weight tile pid_n, first rows of its 128-row and 64-row
    pieces, first group g_lo, group count n_iter), in the other Gluon kernels' raster order."""
    pid_t, pid_n = _raster(M, N, BM, BN, GROUP_T)
    r128, r64 = _wide_rows(pid_n)
    g_lo, n_iter = _groups(G, CHUNK_BLOCKS, SPLIT)
    return pid_t * BM, pid_n, r128, r64, g_lo, n_iter


@gluon.jit
def _wide_ring(w_desc, v_desc, NS: gl.constexpr, RELEASES: gl.constexpr):
    """The 192-row tile's weight rings (the 128-row and the 64-row piece) and a stage's ready / empty mbarriers (the
    empty one takes RELEASES arrivals a use: one per consumer partition), initialised."""
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [NS, 128, 128], w_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [NS, 64, 128], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NS):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=RELEASES)
    return w_ring, v_ring, ready, empty


@gluon.jit
def _wide_totals(BM: gl.constexpr, CHUNKED: gl.constexpr, unused):
    """The running totals of both pieces for BM token rows in shared memory, zero-filled, when CHUNKED (the chunk
    sums stay in registers); else `unused` stands in for both."""
    if CHUNKED:
        total_w = gl.allocate_shared_memory(gl.float32, [BM, 128], _TOTAL_LAYOUT,
                                            gl.zeros([BM, 128], gl.float32, layout=_mma_layout(BM, 128)))
        total_v = gl.allocate_shared_memory(gl.float32, [BM, 64], _TOTAL_LAYOUT,
                                            gl.zeros([BM, 64], gl.float32, layout=_mma_layout(BM, 64)))
    else:
        total_w = unused
        total_v = unused
    return total_w, total_v


@gluon.jit
def gemm_fp8_block_gluon_wide_kernel(
    w_desc, v_desc, a_desc, ws_ptr, as_ptr, out_ptr,
    M, N, G, stride_as, stride_om, stride_oc,
    BN: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr,
    CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, GROUP_T: gl.constexpr,
):
    """gemm_fp8_block_gluon_producer_kernel on BM tokens x 192 weight rows (CompileKey.block_n 192 with producer): a
    token tile loaded once feeds 1.5x the MMA of the 128-wide tile. w_desc / v_desc: descriptors of the same weight
    codes W [N, K] with blocks [128, 128] / [64, 128] (the two pieces, _wide_rows); a_desc as the tile kernel's.
    The grid's axis 0 is cdiv(N, 192) (BN, kept for the launcher's signature, is 192). Same raster, same chunk
    handling (SPLIT / CHUNKED) and the same operations per element in the same order as the other Gluon kernels
    (same bits). Deadlock freedom: both partitions walk the same n_iter >= 1 groups and the consumers release every
    group once its wgmmas are done; the two-group loop waits for group i + 1 before it releases i, which needs only
    i + 1 - NS <= i - 1 released (NS >= 2, the key's rule): the argument in full is _wide_consumer's docstring."""
    gl.static_assert(BN == WIDE_BN)
    t0, pid_n, r128, r64, g_lo, n_iter = _wide_tile(M, N, G, BM, BN, GROUP_T, CHUNK_BLOCKS, SPLIT)

    a_ring = gl.allocate_shared_memory(a_desc.dtype, [NS, BM, 128], a_desc.layout)
    w_ring, v_ring, ready, empty = _wide_ring(w_desc, v_desc, NS, 1)
    total_w_smem, total_v_smem = _wide_totals(BM, CHUNKED, a_ring)
    fence_async_shared()

    gl.warp_specialize([
        (_wide_consumer, (a_ring, w_ring, v_ring, ready, empty, total_w_smem, total_v_smem, out_ptr, as_ptr, ws_ptr,
                          M, N, G, stride_as, stride_om, stride_oc, t0, pid_n, g_lo, n_iter, BM, NS, CHUNK_BLOCKS,
                          SPLIT, CHUNKED, AS_UE8M0)),
        (_wide_producer, (a_desc, w_desc, v_desc, a_ring, a_ring, w_ring, v_ring, ready, empty, t0, r128, r64, N, g_lo,
                          n_iter, NS)),
    ], [1], [40])


# CompileKey.dual (with block_n 192): the 192-row tile's two math warpgroups as two partitions of their own, each
# running _wide_consumer on its 64 tokens (its own token block in the ring, its own running totals) and releasing a
# stage on its own (empty barriers of count 2). In the one-partition kernel both warpgroups meet at a barrier before
# every release, so they promote at the same time and the tensor cores wait for the slower; apart, one warpgroup's
# wgmmas run while the other promotes (DeepGEMM's and CUTLASS's cooperative consumers), so each consumer runs the
# one-group loop (TWO_GROUPS off: the two-group loop kept one register across the K loop in local memory at N 7168 on
# the sm_90a compile) with 240 registers, the producer warp 24. Each element's operations are _wide_consumer's in the
# same order (same bits).
@gluon.jit
def gemm_fp8_block_gluon_dual_kernel(
    w_desc, v_desc, a_desc, ws_ptr, as_ptr, out_ptr,
    M, N, G, stride_as, stride_om, stride_oc,
    BN: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr, CHUNK_BLOCKS: gl.constexpr, SPLIT: gl.constexpr,
    CHUNKED: gl.constexpr, AS_UE8M0: gl.constexpr, GROUP_T: gl.constexpr,
):
    """gemm_fp8_block_gluon_wide_kernel (BM = 128 tokens x 192 weight rows) with its two math warpgroups as two
    partitions (launched with num_warps=4: the default partition is token rows t0 .. t0 + 63, a worker partition of 4
    warps rows t0 + 64 .. t0 + 127, a third of 1 warp the producer). a_desc: the activation codes with [64, 128]
    blocks. Same raster, chunk handling and per-element operations as the wide kernel (same bits). Deadlock freedom:
    as the wide kernel's, per consumer: each releases every group it waited for, the producer waits for both
    releases of group i - NS, and a consumer waiting for group i + 1 has released every group up to i - 1; the other
    consumer's wait for group j needs only releases of groups <= j - NS, which it does not hold back (each consumer's
    progress depends on the producer alone)."""
    gl.static_assert(BN == WIDE_BN)
    gl.static_assert(BM == 128)
    t0, pid_n, r128, r64, g_lo, n_iter = _wide_tile(M, N, G, BM, BN, GROUP_T, CHUNK_BLOCKS, SPLIT)

    a_ring0 = gl.allocate_shared_memory(a_desc.dtype, [NS, 64, 128], a_desc.layout)
    a_ring1 = gl.allocate_shared_memory(a_desc.dtype, [NS, 64, 128], a_desc.layout)
    w_ring, v_ring, ready, empty = _wide_ring(w_desc, v_desc, NS, 2)  # a stage is free once both consumers released it
    tw0, tv0 = _wide_totals(64, CHUNKED, a_ring0)  # each consumer's own running totals
    tw1, tv1 = _wide_totals(64, CHUNKED, a_ring0)
    fence_async_shared()

    gl.warp_specialize([
        (_wide_consumer, (a_ring0, w_ring, v_ring, ready, empty, tw0, tv0, out_ptr, as_ptr, ws_ptr, M, N, G, stride_as,
                          stride_om, stride_oc, t0, pid_n, g_lo, n_iter, 64, NS, CHUNK_BLOCKS, SPLIT, CHUNKED,
                          AS_UE8M0, False)),
        (_wide_consumer, (a_ring1, w_ring, v_ring, ready, empty, tw1, tv1, out_ptr, as_ptr, ws_ptr, M, N, G, stride_as,
                          stride_om, stride_oc, t0 + 64, pid_n, g_lo, n_iter, 64, NS, CHUNK_BLOCKS, SPLIT, CHUNKED,
                          AS_UE8M0, False)),
        (_wide_producer, (a_desc, w_desc, v_desc, a_ring0, a_ring1, w_ring, v_ring, ready, empty, t0, r128, r64, N,
                          g_lo, n_iter, NS, True)),
    ], [4, 1], [240, 24])
