"""Dense NVFP4 GEMM on Hopper (Triton): y_bf16[M, N] = alpha * A[M, K] @ B[N, K]^T.

A and B are NVFP4 in checkpoint layout: packed E2M1 [rows, K/2] uint8 (element 2i in
the low nibble) and E4M3 block scales (one per 16 elements along K) in the 128x4
swizzled layout ([Rp, Cp] uint8, Rp = rows rounded up to 128, Cp = K/16 rounded up to
4). alpha_f32 is a 1-element float32 GPU tensor (the product of the two global decode
scales); it is read on the device, never on the host.

Hopper has no FP4 tensor cores: E2M1 codes are decoded in registers and multiplied by
their E4M3 block scale (exact in fp16), then fp16 wgmma with fp32 accumulation; alpha
is applied to the fp32 accumulator in the epilogue, then one rounding to bf16. This is
the W4A4 math of a Blackwell block-scaled MMA up to the accumulation order.

Configs (see CompileKey.for_shape):
- M <= 2: a CUDA-core GEMV (fp16x2 block dot products, fp32 accumulation).
- 3 <= M <= 64, K % 128 == 0 (M <= 32, or N > 2048): the Gluon wgmma kernel
  (_gemm_nvfp4_wgmma): "swap AB", the weights decoded in registers straight into the
  wgmma's A operand (64 rows of N per warpgroup), the tokens the B operand (8..64 wide);
  split K over CTAs until the GPU is full, the partials reduced in the same kernel in a
  fixed order (tickets). The activations are decoded once per GEMM into fp16 by a small
  Triton kernel first (act_f16), except at M <= 16, N <= 2048, where each CTA decodes its own.
- Other M <= 64 (K % 128 != 0, or 33 <= M <= 64 at N <= 2048): the Triton swap-AB kernel
  (the weights' decoded tile reaches wgmma through shared memory), a fixed-order split-K
  reduce kernel; for large K the activations are decoded once into two fp16 planes.
- M >= 256: both operands decoded once to fp16, then a pipelined fp16 GEMM (CompileKey.f16_gemm: the Triton
  pointer-load kernel at M 256 .. 511, the Gluon TMA / producer-warp persistent kernel from M 512, the same bits;
  decode_pair: both operands decoded in one launch).
Per-call buffers (split-K partials, decoded activations) come from torch.empty, so under
CUDA-graph capture they come from the graph's pool; nothing syncs with the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import BLOCK, SMEM_BLOCK_MAX
from kernels.sm90._tickets import Tickets, tile_tickets

__all__ = ["CompileKey", "launch"]

_NUM_SMS_H200 = 132
_REDUCE_BLOCK = 1024
_PREDECODE_MIN_M = 256
_GLUON_F16_MIN_M = 512  # the Gluon fp16 GEMM measured faster at M 512 .. 4096 (H100, NOTES.md); 256 .. 511 unmeasured
_GEMV_MAX_M = 2  # H200: M = 4 ran 2.2-2.4x the M = 1 time, slower than the MMA path from M = 3
_DECODE_TILE = (64, 256)
_WGMMA_MAX_M = 64


def _split_k(tiles: int, k_iters: int, ctas: int, max_split: int | None = None) -> int:
    """How many K splits bring `tiles` output tiles to about `ctas` CTAs (at most k_iters, and
    max_split): 1 when the tiles alone fill the GPU. Every split gets at least one K tile."""
    if tiles >= ctas:
        return 1
    want = min(-(-ctas // tiles), k_iters, max_split or k_iters)
    per = -(-k_iters // want)
    return -(-k_iters // per)


@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads. M, N, K, strides and the per-split iteration count are
    runtime arguments; `split` is in the key because the reduce kernel unrolls over it."""

    swap_ab: bool
    block_x: int
    block_y: int
    block_k: int
    num_warps: int
    num_stages: int
    split: int
    use_asm: bool
    predecode: bool = False
    gemv_tokens: int = 0  # 1..4: the CUDA-core path for M <= gemv_tokens (block_k = K elements per trip)
    act_f16: bool = False  # decode the activations once per GEMM into fp16 (Triton path: two planes; wgmma: mma order)
    wgmma: int = 0  # 1..: the Gluon wgmma path, K % 128 == 0 (value = 64-row wgmma tiles per warpgroup;
    # block_y = BT tokens per CTA, split-K reduced in-kernel; act_f16: activations decoded once per GEMM)
    # predecode's fp16 GEMM: "triton" (gemm_f16_alpha_kernel, pointer loads) or "gluon" (_gemm_f16_gluon: TMA ring,
    # producer warp, persistent; block_x x block_y = BM x BN on 8 warps, num_stages ring stages); the same bits
    f16_gemm: str = "triton"
    decode_pair: bool = False  # predecode: both operands decoded in one launch (the same bytes)

    @staticmethod
    def for_shape(m: int, n: int, k: int, *, num_sms: int = _NUM_SMS_H200, use_asm: bool = True,
                  ctas_per_sm: int | None = None) -> "CompileKey":
        # Tiles from ptxas reports (no spills; 80-110 registers, 38-76 KB of shared memory
        # for the cp.async stages, so 3-5 CTAs per SM) and an H200 sweep (NOTES.md).
        if m <= _GEMV_MAX_M and use_asm:
            if m == 1 and n > 2048 and k <= 8192 and ctas_per_sm is None:
                # one-warp CTAs of 4 rows (H200 sweep, NOTES.md: N = 7168, K = 3072 8.7 -> 7.1 us,
                # N = 6144, K = 7168 12.2 -> 11.4; N = 2048 and K = 16384 keep the 4-warp CTAs)
                return CompileKey._gemv(m, n, k, num_sms, 4, block_n=4, block_kb=64)
            return CompileKey._gemv(m, n, k, num_sms, ctas_per_sm)
        if m >= _PREDECODE_MIN_M:
            # H100, one run (NOTES.md, session 9), x torch bf16 on the four projection shapes, the same bytes: the
            # Gluon 128 x 256 persistent kernel with one decode launch 0.34-0.57 (M 512) .. 0.76-0.86 (M 4096), the
            # Triton 256 x 128 kernel 0.25-0.45 .. 0.60-0.66
            if m >= _GLUON_F16_MIN_M and use_asm:
                return CompileKey.predecode_gluon()
            return CompileKey.predecode_triton(use_asm=use_asm)
        if 3 <= m <= _WGMMA_MAX_M and k % 128 == 0 and use_asm and ctas_per_sm is None and (m <= 32 or n > 2048):
            # Gluon wgmma path: weights decoded into the register A operand, split-K reduced in-kernel.
            # Split-K target (CTAs per SM) from the H200 sweeps in NOTES.md (current status): M <= 16 best at 4
            # (N <= 2048) / 6; M = 32 at 2 (N <= 2048 or K <= 4096) / 4; M = 64 at 1 (2 for K >= 8192),
            # where the Triton path below still wins at N = 2048.
            # Activations decoded once per GEMM (act_f16) except at M <= 16, N <= 2048 (in-kernel decode
            # 10.5 against 11.0 us at M = 16, tied at M = 3).
            if m <= 16:
                per_sm = 4 if n <= 2048 else 6
            elif m <= 32:
                per_sm = 2 if n <= 2048 or k <= 4096 else 4
            else:
                per_sm = 2 if k >= 8192 else 1
            return CompileKey._wgmma(m, n, k, num_sms, per_sm=per_sm, act_f16=m > 16 or n > 2048)
        act_f16 = False
        if m <= 64:
            block_x, block_y, block_k, warps, stages, per_sm = {
                16: (64, 16, 128, 4, 3, 6), 32: (64, 32, 128, 4, 3, 6), 64: (64, 64, 128, 4, 4, 2),
            }[16 if m <= 16 else (32 if m <= 32 else 64)]
            # Activations decoded once per GEMM (fp16 planes) instead of in every CTA: the
            # extra launch costs ~1 us, the saved per-CTA decode grows with K (H200 sweep,
            # NOTES.md: M = 16, K = 16384 52 -> 46 us; M = 64, N = 6144 44 -> 33 us with
            # 128-row weight tiles on 8 warps; M = 64, K = 3072 was slower, 22 -> 24 us)
            if m <= 16 and k >= 8192:
                act_f16 = True
            elif 32 < m and k >= 4096:
                act_f16 = True
                block_x, warps, stages = 128, 8, 3
            tiles = -(-n // block_x)
        else:
            block_x, block_y, block_k, warps, stages, per_sm = 128, 128, 64, 8, 3, 2
            tiles = -(-m // block_x) * -(-n // block_y)
        per_sm = ctas_per_sm or per_sm
        # Decode-sized GEMMs read each weight byte once: the GPU is kept busy (and enough
        # bytes in flight) by splitting K until about per_sm CTAs per SM exist.
        split = _split_k(tiles, -(-k // block_k), per_sm * num_sms)
        return CompileKey(swap_ab=m <= 64, block_x=block_x, block_y=block_y, block_k=block_k,
                          num_warps=warps, num_stages=stages, split=split, use_asm=use_asm,
                          act_f16=m <= 64 and act_f16)


    @staticmethod
    def predecode_triton(*, use_asm: bool = True) -> "CompileKey":
        """The predecode path with the Triton fp16 GEMM (256 x 128 x 64 tiles, 4 stages; H200 sweep at M = 4096 in
        NOTES.md: 0.63-0.67 x torch bf16, 128 x 256 0.56-0.62, 128 x 128 0.58-0.60): for_shape's key at M 256 .. 511,
        and the bytes the Gluon keys are held to."""
        return CompileKey(swap_ab=False, block_x=256, block_y=128, block_k=64, num_warps=8, num_stages=4,
                          split=1, use_asm=use_asm, predecode=True)

    @staticmethod
    def predecode_gluon(*, block_m: int = 128, block_n: int = 256, stages: int = 4,
                        decode_pair: bool = True) -> "CompileKey":
        """The predecode path with the Gluon fp16 GEMM (block_m x block_n tiles, 64-wide K stages, 8 warps and a
        producer warp): the same output bytes as predecode_triton's key; for_shape's key from M 512."""
        return CompileKey(swap_ab=False, block_x=block_m, block_y=block_n, block_k=64, num_warps=8,
                          num_stages=stages, split=1, use_asm=True, predecode=True, f16_gemm="gluon",
                          decode_pair=decode_pair)

    @staticmethod
    def _wgmma(m: int, n: int, k: int, num_sms: int = _NUM_SMS_H200, *, warps: int = 4, reps: int = 1,
               per_sm: int = 4, stages: int = 3, max_split: int = 32, act_f16: bool = False) -> "CompileKey":
        # weights decoded in registers into the wgmma A operand (64 rows per warpgroup, reps tiles), the
        # BT tokens the B tile (decoded in every CTA, or once per GEMM when act_f16), split-K reduced
        # in-kernel; split K until ~per_sm CTAs per SM (at most max_split)
        if stages < 2:
            raise ValueError(f"CompileKey._wgmma: stages = {stages}, the cp.async ring needs >= 2")
        bt = next(b for b in (8, 16, 32, 64) if b >= min(m, 64))
        bn = 16 * warps * reps
        tiles = -(-n // bn) * -(-m // bt)
        split = _split_k(tiles, k // 128, per_sm * num_sms, max_split)
        return CompileKey(swap_ab=True, block_x=bn, block_y=bt, block_k=128, num_warps=warps, num_stages=stages,
                          split=split, use_asm=True, act_f16=act_f16, wgmma=reps)

    @staticmethod
    def _gemv(m: int, n: int, k: int, num_sms: int, ctas_per_sm: int | None,
              block_n: int | None = None, block_kb: int = 256) -> "CompileKey":
        # one int64 word (16 elements) per column; 2 words (16 bytes) per thread and 32
        # threads along K per warp, warps along K too, so each thread holds all BLOCK_N
        # rows of its columns and decodes each activation block once per BLOCK_N weights
        kb = k // BLOCK
        if block_n is None:  # 3-4 tokens: 4 rows per thread keep it under 255 registers
            block_n = 8 if m <= 2 and n > 2048 else 4
        while block_kb > 64 and block_kb // 2 >= kb:
            block_kb //= 2
        warps = max(1, block_kb // 64)
        # H200 sweep (NOTES.md): 2-4 CTAs of 4 warps per SM are enough (more splits only
        # add partials); a split also costs the reduce kernel, so split only small grids
        per_sm = ctas_per_sm or max(1, 8 // warps)
        tiles = -(-n // block_n)
        split = _split_k(tiles, -(-kb // block_kb), per_sm * num_sms)
        return CompileKey(swap_ab=True, block_x=block_n, block_y=1, block_k=block_kb * BLOCK, num_warps=warps,
                          num_stages=1, split=split, use_asm=True, gemv_tokens=m if m <= 2 else 4)


def _check_f16_gemm(key: CompileKey) -> None:
    """The predecode fp16 GEMM fields of `key`: one ValueError naming the first field the kernels cannot build."""
    if key.f16_gemm not in ("triton", "gluon"):
        raise ValueError(f"CompileKey.f16_gemm: {key.f16_gemm!r}, expected 'triton' or 'gluon'")
    if key.f16_gemm == "triton":
        return
    for field, got, ok in (("predecode", key.predecode, (True,)), ("block_k", key.block_k, (64,)),
                           ("num_warps", key.num_warps, (8,)), ("split", key.split, (1,)),
                           ("block_x", key.block_x, (128, 256)), ("block_y", key.block_y, (128, 256))):
        if got not in ok:
            raise ValueError(f"CompileKey.{field}: {got} with f16_gemm 'gluon', expected one of {ok}")
    if key.block_x == key.block_y == 256:
        raise ValueError("CompileKey.block_x: 256 x 256 tiles need 256 accumulator registers a math thread; "
                         "f16_gemm 'gluon' takes 128 x 128, 128 x 256 or 256 x 128")
    ring = key.num_stages * ((key.block_x + key.block_y) * key.block_k * 2 + 16)  # fp16 tiles, ready / empty barriers
    if key.num_stages < 2 or ring > SMEM_BLOCK_MAX:
        raise ValueError(f"CompileKey.num_stages: {key.num_stages} stages of {key.block_x} x {key.block_y} fp16 tiles "
                         f"need {ring} B of shared memory (at least 2 stages, at most {SMEM_BLOCK_MAX} B)")


@functools.lru_cache(maxsize=64)
def _compile(key: CompileKey):
    """The launcher for `key` (Triton compiles each kernel on its first launch: warm up
    before CUDA-graph capture)."""
    import triton

    from kernels.sm90._gemm_nvfp4_jit import (
        decode_nvfp4_to_f16_kernel,
        decode_nvfp4_to_f16_planes_kernel,
        gemm_f16_alpha_kernel,
        gemm_nvfp4_f16act_kernel,
        gemm_nvfp4_kernel,
        gemv_nvfp4_kernel,
        splitk_reduce_kernel,
    )

    def decode_f16(p, sf, rows, k, cp4):
        out = torch.empty((rows, k), dtype=torch.float16, device=p.device)
        br, bk = _DECODE_TILE
        decode_nvfp4_to_f16_kernel[(triton.cdiv(rows, br), triton.cdiv(k, bk))](
            p, sf.view(torch.int32), out, rows, k // 2, cp4, BLOCK_R=br, BLOCK_K=bk, USE_ASM=key.use_asm,
            num_warps=4)
        return out

    def splitk_workspace(m: int, n: int, out_bf16: Tensor) -> Tensor:
        """fp32 partials [split, M, N] when K is split (allocated per call, so a CUDA graph takes them
        from its pool), else the output itself."""
        if key.split > 1:
            return torch.empty((key.split, m, n), dtype=torch.float32, device=out_bf16.device)
        return out_bf16

    def splitk_finish(ws: Tensor, alpha_f32: Tensor, out_bf16: Tensor) -> None:
        """Sum the split-K partials in a fixed order (deterministic), times alpha, into out."""
        if key.split > 1:
            numel = out_bf16.numel()
            splitk_reduce_kernel[(triton.cdiv(numel, _REDUCE_BLOCK),)](
                ws, alpha_f32, out_bf16, numel, SPLIT=key.split, BLOCK=_REDUCE_BLOCK, num_warps=4)

    _check_f16_gemm(key)
    if key.f16_gemm == "gluon":
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        from kernels.sm90._gemm_f16_gluon import gemm_f16_alpha_gluon_kernel, gluon_operand_layouts

        f16_layouts = gluon_operand_layouts(key.block_x, key.block_y)

    def decode_pair(a_p, a_sf, m, b_p, b_sf, n, k, cp4):
        """decode_f16 of both operands in one launch (decode_nvfp4_pair_to_f16_kernel: the same bytes)."""
        from kernels.sm90._gemm_nvfp4_jit import decode_nvfp4_pair_to_f16_kernel

        a16 = torch.empty((m, k), dtype=torch.float16, device=a_p.device)
        b16 = torch.empty((n, k), dtype=torch.float16, device=a_p.device)
        br, bk = _DECODE_TILE
        decode_nvfp4_pair_to_f16_kernel[(triton.cdiv(m, br) + triton.cdiv(n, br), triton.cdiv(k, bk))](
            a_p, a_sf.view(torch.int32), a16, m, b_p, b_sf.view(torch.int32), b16, n, k // 2, cp4,
            BLOCK_R=br, BLOCK_K=bk, USE_ASM=key.use_asm, num_warps=4)
        return a16, b16

    def f16_gemm(a16, b16, alpha_f32, out_bf16):
        """out_bf16 = bf16((a16 @ b16^T * 2^14) * alpha) by the key's fp16 GEMM."""
        m, n = out_bf16.shape
        k = b16.shape[1]
        tiles = triton.cdiv(m, key.block_x) * triton.cdiv(n, key.block_y)
        if key.f16_gemm == "gluon":  # host descriptors: kernel parameters, so a captured graph replays them
            a_desc = TensorDescriptor.from_tensor(a16, [key.block_x, 64], f16_layouts[0])
            b_desc = TensorDescriptor.from_tensor(b16, [key.block_y, 64], f16_layouts[1])
            gemm_f16_alpha_gluon_kernel[(min(tiles, _num_sms(out_bf16.device)),)](
                a_desc, b_desc, alpha_f32, out_bf16, m, n, k, BM=key.block_x, BN=key.block_y, NS=key.num_stages,
                GROUP_M=8, num_warps=8)
            return
        gemm_f16_alpha_kernel[(tiles,)](a16, b16, alpha_f32, out_bf16, m, n, k,
                                        BLOCK_M=key.block_x, BLOCK_N=key.block_y, BLOCK_K=key.block_k,
                                        GROUP_M=8, num_warps=key.num_warps, num_stages=key.num_stages)

    def decode_operands(a_p, a_sf, b_p, b_sf):
        """The predecode path's step 1: (A16 [M, K], B16 [N, K]) fp16, one launch or two (key.decode_pair)."""
        m, n, k, cp4 = a_p.shape[0], b_p.shape[0], a_p.shape[1] * 2, a_sf.shape[1] // 4
        if key.decode_pair:
            return decode_pair(a_p, a_sf, m, b_p, b_sf, n, k, cp4)
        return decode_f16(a_p, a_sf, m, k, cp4), decode_f16(b_p, b_sf, n, k, cp4)

    if key.wgmma:
        from kernels.sm90._gemm_nvfp4_jit import decode_nvfp4_to_f16_mma_order_kernel
        from kernels.sm90._gemm_nvfp4_wgmma import gemm_nvfp4_wgmma_kernel, wgmma_layouts

        wg_layouts = wgmma_layouts(key.num_warps, key.wgmma, key.block_y)

    def run(a_packed_u8, a_sf_u8, b_packed_u8, b_sf_u8, alpha_f32, out_bf16) -> None:
        m, n = out_bf16.shape
        k = a_packed_u8.shape[1] * 2
        cp4 = a_sf_u8.shape[1] // 4
        if key.wgmma:
            # weight decode + wgmma + split-K reduce (in-kernel tickets) in one kernel, after the
            # activation decode kernel when act_f16
            if k % 128:
                raise ValueError(f"gemm_nvfp4: the wgmma key {key} needs K % 128 == 0, got K = {k}")
            k_iters = k // 128
            per = triton.cdiv(k_iters, key.split)
            grid = (triton.cdiv(n, key.block_x), triton.cdiv(m, key.block_y), key.split)
            ws = splitk_workspace(m, n, out_bf16)
            ctr = _tile_tickets(out_bf16.device, grid[0] * grid[1]) if key.split > 1 else ws
            x = a_packed_u8.view(torch.int32)
            if key.act_f16:  # activations decoded once (fp16, logical mma order), copied into the ring
                x = torch.empty((m, k), dtype=torch.float16, device=out_bf16.device)
                decode_nvfp4_to_f16_mma_order_kernel[(triton.cdiv(m, 16), k // 128)](
                    a_packed_u8, a_sf_u8.view(torch.int32), x, m, k // 2, cp4, BLOCK_R=16, USE_ASM=True,
                    num_warps=4)
            gemm_nvfp4_wgmma_kernel[grid](
                b_packed_u8.view(torch.int32), b_sf_u8, x, a_sf_u8, alpha_f32, out_bf16,
                ws, ctr, n, m, k // 8, cp4, k_iters, per, **wg_layouts,
                BN=key.block_x, BT=key.block_y, NS=key.num_stages, SPLIT=key.split, X_F16=key.act_f16,
                num_warps=key.num_warps)
            return
        if key.gemv_tokens:
            # CUDA-core path (M <= 4): fp16x2 block dot products, fp32 accumulation
            block_kb = key.block_k // BLOCK
            k_iters = triton.cdiv(k // BLOCK, block_kb)
            per = triton.cdiv(k_iters, key.split)
            ws = splitk_workspace(m, n, out_bf16)
            gemv_nvfp4_kernel[(triton.cdiv(n, key.block_x), key.split)](
                b_packed_u8.view(torch.int64), b_sf_u8, a_packed_u8.view(torch.int64), a_sf_u8, alpha_f32,
                out_bf16, ws, n, m, k // BLOCK, cp4, per,
                T=key.gemv_tokens, BLOCK_N=key.block_x, BLOCK_KB=block_kb, USE_WS=key.split > 1,
                num_warps=key.num_warps, num_stages=key.num_stages)
            splitk_finish(ws, alpha_f32, out_bf16)
            return
        if key.predecode:
            # Large M is MMA-bound: decode each operand once (exact fp16, 4 bytes per
            # element of traffic, small next to the 2*M*N*K MMA work), then a pipelined
            # fp16 GEMM whose loads feed wgmma directly.
            a16, b16 = decode_operands(a_packed_u8, a_sf_u8, b_packed_u8, b_sf_u8)
            f16_gemm(a16, b16, alpha_f32, out_bf16)
            return
        if key.act_f16:
            # decode the M activation rows once (fp16 planes, zero-padded to the tiles),
            # then the weights-decoding MMA kernel reads them as plain fp16 tiles
            mp = triton.cdiv(m, key.block_y) * key.block_y
            kp = triton.cdiv(k, key.block_k) * key.block_k
            planes = torch.empty((2, mp, kp // 2), dtype=torch.float16, device=out_bf16.device)
            decode_nvfp4_to_f16_planes_kernel[(mp // 16, kp // key.block_k)](
                a_packed_u8, a_sf_u8.view(torch.int32), planes, m, k // 2, cp4, mp * kp // 2, kp // 2,
                BLOCK_R=16, BLOCK_K=key.block_k, USE_ASM=key.use_asm, num_warps=4)
            k_iters = triton.cdiv(k, key.block_k)
            per = triton.cdiv(k_iters, key.split)
            ws = splitk_workspace(m, n, out_bf16)
            grid = (triton.cdiv(n, key.block_x), mp // key.block_y, key.split)
            gemm_nvfp4_f16act_kernel[grid](
                b_packed_u8, b_sf_u8.view(torch.int32), planes, alpha_f32, out_bf16, ws,
                n, m, k // 2, cp4, mp * kp // 2, kp // 2, 1, n, per,
                BLOCK_X=key.block_x, BLOCK_Y=key.block_y, BLOCK_K=key.block_k,
                USE_WS=key.split > 1, USE_ASM=key.use_asm,
                num_warps=key.num_warps, num_stages=key.num_stages)
            splitk_finish(ws, alpha_f32, out_bf16)
            return
        if key.swap_ab:
            x, xsf, y, ysf, rx, ry, sox, soy = b_packed_u8, b_sf_u8, a_packed_u8, a_sf_u8, n, m, 1, n
        else:
            x, xsf, y, ysf, rx, ry, sox, soy = a_packed_u8, a_sf_u8, b_packed_u8, b_sf_u8, m, n, n, 1
        k_iters = triton.cdiv(k, key.block_k)
        per = triton.cdiv(k_iters, key.split)
        ws = splitk_workspace(m, n, out_bf16)
        grid = (triton.cdiv(rx, key.block_x), triton.cdiv(ry, key.block_y), key.split)
        gemm_nvfp4_kernel[grid](
            x, xsf.view(torch.int32), y, ysf.view(torch.int32), alpha_f32, out_bf16, ws,
            rx, ry, k // 2, cp4, sox, soy, per,
            BLOCK_X=key.block_x, BLOCK_Y=key.block_y, BLOCK_K=key.block_k,
            USE_WS=key.split > 1, USE_ASM=key.use_asm,
            num_warps=key.num_warps, num_stages=key.num_stages,
        )
        splitk_finish(ws, alpha_f32, out_bf16)

    if key.predecode:  # the two steps apart, for the bench's split of the time (scales as launch reshapes them)
        run.decode_operands = decode_operands
        run.f16_gemm = f16_gemm
    return run


_tickets: dict[torch.device, Tickets] = {}


def _tile_tickets(device: torch.device, tiles: int) -> Tensor:
    """`tiles` zeroed split-K ticket counters for one launch of the wgmma path (see kernels.sm90._tickets)."""
    return tile_tickets(_tickets, "gemm_nvfp4", device, tiles)


def _check_operand(name: str, packed: Tensor, sf: Tensor, k: int | None) -> int:
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{name}_packed_u8: expected a 2-d torch.uint8 tensor [rows, K/2], got "
                         f"{getattr(packed, 'dtype', type(packed))} {tuple(getattr(packed, 'shape', ()))}")
    if not packed.is_contiguous():
        raise ValueError(f"{name}_packed_u8: must be contiguous (K-major), got strides {packed.stride()}")
    rows, kk = packed.shape[0], packed.shape[1] * 2
    if kk == 0 or kk % BLOCK:
        raise ValueError(f"{name}_packed_u8: K = 2 * {packed.shape[1]} = {kk} must be a positive multiple of {BLOCK}")
    if k is not None and kk != k:
        raise ValueError(f"{name}_packed_u8: K = {kk} does not match A's K = {k}")
    if isinstance(sf, Tensor) and sf.dtype == torch.float8_e4m3fn:
        sf = sf.view(torch.uint8)
    rp, cp = (rows + 127) // 128 * 128, (kk // BLOCK + 3) // 4 * 4
    if not isinstance(sf, Tensor) or sf.dtype != torch.uint8 or sf.numel() != rp * cp or not sf.is_contiguous():
        raise ValueError(f"{name}_sf_swizzled_u8: expected a contiguous uint8 128x4-swizzled buffer of "
                         f"{rp}x{cp} bytes for {rows} rows and K={kk}, got "
                         f"{getattr(sf, 'dtype', type(sf))} {tuple(getattr(sf, 'shape', ()))}")
    return kk


def _check_device(name: str, packed: Tensor, sf: Tensor) -> None:
    if packed.device != sf.device or not packed.is_cuda:
        raise ValueError(f"{name}: packed on {packed.device}, scales on {sf.device}; both must be on one CUDA device")


def launch(a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor, b_sf_swizzled_u8: Tensor,
           alpha_f32: Tensor, *, use_asm: bool = True, check: bool = True,
           key: CompileKey | None = None) -> Tensor:
    """y_bf16 [M, N] = alpha * dec(A) @ dec(B)^T. Any M >= 0; K a multiple of 16 (ValueError otherwise)."""
    if check:
        k = _check_operand("a", a_packed_u8, a_sf_swizzled_u8, None)
        _check_operand("b", b_packed_u8, b_sf_swizzled_u8, k)
        _check_device("a", a_packed_u8, a_sf_swizzled_u8)
        _check_device("b", b_packed_u8, b_sf_swizzled_u8)
        if (not isinstance(alpha_f32, Tensor) or alpha_f32.dtype != torch.float32 or alpha_f32.numel() != 1
                or alpha_f32.device != a_packed_u8.device):
            raise ValueError("alpha_f32: expected a 1-element torch.float32 tensor on the operands' device")
        if b_packed_u8.device != a_packed_u8.device:
            raise ValueError(f"b_packed_u8: on {b_packed_u8.device}, A on {a_packed_u8.device}")
    m, n, k = a_packed_u8.shape[0], b_packed_u8.shape[0], a_packed_u8.shape[1] * 2
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a_packed_u8.device)
    if m == 0 or n == 0:
        return out
    a_sf = a_sf_swizzled_u8.view(torch.uint8).reshape((m + 127) // 128 * 128, -1)
    b_sf = b_sf_swizzled_u8.view(torch.uint8).reshape((n + 127) // 128 * 128, -1)
    if key is None:  # an explicit key is for benchmarks exploring configs
        key = CompileKey.for_shape(m, n, k, num_sms=_num_sms(a_packed_u8.device), use_asm=use_asm)
    _compile(key)(
        a_packed_u8, a_sf, b_packed_u8, b_sf, alpha_f32.reshape(()), out)
    return out


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _NUM_SMS_H200
    return torch.cuda.get_device_properties(device).multi_processor_count
