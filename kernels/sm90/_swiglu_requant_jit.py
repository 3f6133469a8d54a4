"""Triton body of kernels.sm90.swiglu_requant (imported lazily by its _compile)."""

import triton
import triton.language as tl


@triton.jit
def f32_to_bf16_rne(x):
    """float32 -> bf16, round to nearest even, on the bit pattern (bf16 is the upper half of float32,
    so this is exact for normals, subnormals and overflow to Inf); NaN -> the quiet NaN 0x7FC0 with
    x's sign. The same bits as the hardware cvt.rn.bf16.f32, and correct in the Triton interpreter
    too (whose float32 -> bf16 cast truncates)."""
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    r = tl.where(x != x, ((bits >> 16) & 0x8000) | 0x7FC0, r)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def swiglu_amax_kernel(
    gate_ptr, up_ptr, stride_g, stride_u, w_ptr, off_ptr, h_ptr, part_ptr, limit,
    R_CAP, N, E, n_progs,
    N_ITERS: tl.constexpr, N_TILES: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h = silu(min(g, L)) * clamp(u, -L, L) [* w_row], float32, rounded once to bf16, for rows
    r < offsets[E]; rows r >= offsets[E] (up to R_CAP) are written as zeros. Program pid handles
    the row tiles pid, pid + n_progs, ... and writes max |h| (NaN ignored) of its rows to part[pid]."""
    pid = tl.program_id(0)
    n = tl.minimum(tl.load(off_ptr + E), R_CAP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(N_ITERS):
        rows = (pid + i * n_progs) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < n
        for nt in range(N_TILES):
            cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            m = live[:, None] & col_ok[None, :]
            r64 = rows.to(tl.int64)[:, None]
            g = tl.load(gate_ptr + r64 * stride_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + r64 * stride_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_LIMIT:
                g = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
                u = tl.minimum(tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                               propagate_nan=tl.PropagateNan.ALL)
            gu = g * u
            # silu(g) * u = g u / (1 + e^-g); deep in the negative tail (e^-g overflows float32) the
            # product is g u e^g, evaluated with a shifted exponent so it does not flush to zero early
            tail = (gu * tl.exp(g + 64.0)) * 1.6038108905486378e-28  # e^-64
            h = tl.where(g < -64.0, tail, tl.div_rn(gu, 1.0 + tl.exp(-g)))
            if HAS_W:
                wr = tl.load(w_ptr + rows, mask=live, other=0.0)
                h = h * wr[:, None]
            hb = f32_to_bf16_rne(tl.where(m, h, 0.0))
            tl.store(h_ptr + r64 * N + cols[None, :], hb, mask=(rows < R_CAP)[:, None] & col_ok[None, :])
            ah = tl.abs(hb.to(tl.float32))
            acc = tl.maximum(acc, tl.where(ah == ah, ah, 0.0))
    tl.store(part_ptr + pid, tl.max(tl.max(acc, axis=1), axis=0))
