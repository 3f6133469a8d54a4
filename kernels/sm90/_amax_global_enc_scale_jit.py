"""Triton bodies of kernels.sm90.amax_global_enc_scale (imported lazily by its _compile)."""

import triton
import triton.language as tl


@triton.jit
def _enc_from_amax(amax, FMAX: tl.constexpr, NUM: tl.constexpr):
    s = tl.minimum(tl.div_rn(NUM, amax), FMAX)
    return tl.where((amax == 0.0) | (s == 0.0), 1.0, s)

@triton.jit
def amax_partial_kernel(
    x_ptr, stride_xm, out_ptr, M, K, n_tiles_k, n_tiles, n_progs, n_iters,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr,
    FMAX: tl.constexpr, NUM: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i in range(0, n_iters):
        t = pid + i * n_progs
        t = tl.where(t < n_tiles, t, n_tiles)  # past the end: a tile of rows >= M, fully masked
        tm = t // n_tiles_k
        tk = t % n_tiles_k
        rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tk * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                    mask=(rows < M)[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        ax = tl.abs(x)
        acc = tl.maximum(acc, tl.where(ax == ax, ax, 0.0))
    amax = tl.max(tl.max(acc, axis=1), axis=0)
    if SINGLE:
        tl.store(out_ptr, _enc_from_amax(amax, FMAX, NUM))
    else:
        tl.store(out_ptr + pid, amax)

@triton.jit
def amax_final_kernel(part_ptr, out_ptr, n_parts, BLOCK: tl.constexpr,
                      FMAX: tl.constexpr, NUM: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    p = tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0)
    tl.store(out_ptr, _enc_from_amax(tl.max(p, axis=0), FMAX, NUM))
