"""Grouped (MoE) NVFP4 GEMM on Hopper (Triton), with the L1 variants: gate/up halves, and the fused
clamped SwiGLU + NVFP4 requantization epilogue.

API (A2's MoE block calls these; shapes are static, everything else is read on the device):

  prepare_experts(w_u8 [E, N, K/2] u8, w_scale_e4m3 [E, N, K/16] (linear), w_scale_2_f32 [E] | [E, 1], *,
                  fragment_order=None)
      -> Sm90GroupedWeight                                         (host, once per layer; L2)
  prepare_gate_up(w1_u8, w1_scale_e4m3, w1_scale_2_f32, w3_u8, w3_scale_e4m3, w3_scale_2_f32, *, fragment_order=None)
      -> Sm90GroupedWeight (gate_up)                               (host, once per layer; L1)
  (fragment_order None: the packed bits permuted into the register-fed kernels' decode order wherever K % 32 == 0;
  every kernel here reads either order with the same bits: host_prepare_experts)
  grouped_gemm(a_packed_u8 [Rcap, K/2], a_sf_u8 [Rs, Cp], a_dec_f32 [E] | [1], offsets_i32 [E+1], w, *, out=None)
      -> bf16 [Rcap, N]
  grouped_gemm_l1(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13) -> (gate, up) float32 [Rcap, I] each
  grouped_l1_swiglu_requant(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13, *, swiglu_limit,
                            h_input_dec_scale_f32 [E] | [1])
      -> (h_packed_u8 [Rcap, I/2], h_sf_u8 [grouped_sf_rows(Rcap, E), round_up(I/16, 4)], h_dec_f32 [E])
  grouped_sf_rows(rcap, num_experts) -> the row count of a grouped scale buffer that holds any routing
      of rcap rows over num_experts experts (what grouped_l1_swiglu_requant allocates).

Semantics: rows off[e] .. off[e+1] of A belong to expert e (offsets int32 on the device, non-decreasing,
off[0] = 0, off[E] <= Rcap; zero-token experts are legal): y[r] = a_dec[e] * w_dec[e] * sum_k a[r, k]
w_e[:, k], alpha a float32 product, fp32 accumulation, one rounding to the output dtype. Rows >= off[E]
(capacity rows) get zeros. a_sf_u8 is the grouped 128x4-swizzled scale buffer: expert e's scale rows
start at row sum_{j<e} ceil(cnt_j/128)*128 of [Rs, round_up(K/16, 4)] (Rs a multiple of 128 and at least
that total); padding is never read. K need only be a multiple of 16 (the last 128-wide K tile is masked).

The L1 halves are float32 (the accumulator times alpha, rounded once to float32, as the reference's l1
emulation holds them). The fused epilogue computes per element, in float32: u = clamp(up, -L, L), g =
min(gate, L) (L = swiglu_limit; None or 0: no clamp), h = g / (1 + exp(-g)) * u, rounds h to bf16 (the
stage-boundary dtype of the unfused path), then quantizes it with recipe te and the static global scale
S_e = 1 / h_input_dec_scale_f32[e] (float32 division; the w2 input_scale): block max over 16 columns
(NaN ignored), s = e4m3(min(v * (S * f32(1/6)), FLT_MAX)), enc = min(1 / (f32(s) * (1/S)), FLT_MAX),
codes e2m1_rne(h * enc). h_dec_f32 is the input scale itself ([E], expanded from [1]), the decode
multiplier L2's alpha uses. h_sf_u8 comes from torch.zeros: padding and extra rows are zero.

No host sync, no .item(), no CPU->GPU copy: a call is CUDA-graph capturable once its key has been
compiled (make one eager call first); the grid depends only on Rcap, E, N (see CompileKey) and a
device-side tile schedule maps programs to (expert, row tile) (_grouped_gemm_nvfp4_jit). Deterministic
(no atomics). With TRITON_INTERPRET=1 the kernels run on CPU tensors (use_asm=False: portable decode).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._consts import BLOCK, FLT_MAX, ONE_SIXTH_F32
from kernels.sm90.host_prepare_experts import Sm90GroupedWeight, prepare_experts, prepare_gate_up
from kernels.sm90._env import triton_interpreting as _interpreting

__all__ = ["CompileKey", "Sm90GroupedWeight", "prepare_experts", "prepare_gate_up", "grouped_gemm",
           "grouped_gemm_l1", "grouped_l1_swiglu_requant", "grouped_sf_rows", "WgmmaKey", "wgmma_serves",
           "BigWgmmaKey"]

EPI_PLAIN, EPI_GATE_UP, EPI_SWIGLU_REQUANT = 0, 1, 2


def grouped_sf_rows(rcap: int, num_experts: int) -> int:
    """Rows of a grouped 128x4 scale buffer that fits any routing of rcap rows over num_experts experts:
    each expert with rows pads at most 127, at most min(E, rcap) experts have rows, and the total is a
    multiple of 128 (the same count as kernels.sm90.quantize_grouped.sf_capacity_rows)."""
    return (rcap + 127 * min(num_experts, rcap) + 127) // 128 * 128



def _grid(rcap: int, num_experts: int, n: int, bt: int, bn: int) -> int:
    """Programs of every grouped kernel (CompileKey, WgmmaKey, BigWgmmaKey: .grid with the key's tile): (row-tile
    bound) x (column tiles). Row tiles: expert tiles sum_e ceil(cnt_e/BT) <= R/BT + (experts with rows), zero tiles
    ceil((Rcap - R)/BT); together <= Rcap//BT + min(E, Rcap) + 1. Static shapes only (graph safe)."""
    tiles = rcap // bt + min(num_experts, rcap) + 1
    return tiles * -(-n // bn)


@dataclass(frozen=True)
class CompileKey:
    """Everything codegen reads: epilogue, tile (BN weight rows x BT tokens x 128 K), warps, stages,
    decode path, the expert-count padding E_P and whether the SwiGLU clamps."""

    epi: int
    block_n: int
    block_t: int
    num_warps: int
    num_stages: int
    e_pad: int
    use_asm: bool = True
    clamp: bool = False
    act_f16: bool = False  # decode the activations once per GEMM into fp16 planes (same values, same bits;
    # slower on the H200 at every size measured, so for_shape leaves it off)
    big: bool = False  # the large-token path (_grouped_gemm_nvfp4_big_jit): activations decoded once into fp16
    # planes, read by TMA; only the weights decoded per tile; same bits (see _large_token_key)
    k128: bool = False  # (with big) one K = 128 MMA per K tile over the tile-interleaved activations (the same
    # per-element MMA sequence as the two K = 64 MMAs: _grouped_gemm_nvfp4_big_jit.grouped_gemm_nvfp4_big_kernel, K128)

    @staticmethod
    def for_shape(epi: int, rcap: int, num_experts: int, n: int, k: int, *, use_asm: bool = True,
                  clamp: bool = False, large_token: bool = True) -> "CompileKey":
        # Token tile from the mean rows per expert (swap AB: BT tokens are the MMA's narrow side): decode
        # sizes (<= 16 rows per expert) read every active expert's weights once with 16-token tiles.
        # Every (BN, BT, act_f16) gives the same bits (the per-element MMA sequence is fixed by BLOCK_K = 128;
        # a GPU test checks it), so the choice follows the H200 sweeps in NOTES.md only:
        # - BN 64 when only a few experts are active (rcap <= 16: T = 1 at top-6, 288 -> 576 CTAs; fused
        #   L1 130 -> 117 us), else 128 (T = 16: 1264 us against 1292 with BN 64);
        # - BT from the mean rows per expert (4 warps up to 32 tokens, 8 warps for 64 / 128);
        # - act_f16 (activations decoded once into fp16 planes) off: it was slower at every size measured
        #   (T = 4096 fused L1 20.6 ms against 12.0 ms, T = 32768 111.7 against 69.2 ms).
        mean = rcap / max(num_experts, 1)
        if large_token and mean >= LARGE_TOKEN_MIN_ROWS_PER_EXPERT:  # large_token=False: the present path (benches)
            return _large_token_key(epi, rcap, num_experts, use_asm=use_asm, clamp=clamp)
        bt = 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 64 else 128
        warps = 4 if bt <= 32 else 8
        stages = 4 if bt <= 32 else 3
        e_pad = max(16, 1 << (num_experts - 1).bit_length())
        return CompileKey(epi=epi, block_n=64 if rcap <= 16 else 128, block_t=bt, num_warps=warps, num_stages=stages,
                          e_pad=e_pad, use_asm=use_asm, clamp=clamp, act_f16=False)

    def __post_init__(self):
        if self.k128 and not self.big:
            raise ValueError("CompileKey: k128 = True needs big = True (a variant of the large-token path)")

    def grid(self, rcap: int, num_experts: int, n: int) -> int:
        return _grid(rcap, num_experts, n, self.block_t, self.block_n)


# ---- large-token path (issue 25 item 2) -------------------------------------------------------------------
# Routed from static shapes only (Rcap / E, never a device value: graph safe, no host sync). The bits equal the
# present path's (same fp16 operand values, k permutation and per-element MMA sequence; tests compare the two
# bit for bit), so a row gives the same bytes whichever path its batch takes. The threshold and the tiles are
# first guesses from the CPU compile (registers, shared memory), to be tuned on the GPU bench.
LARGE_TOKEN_MIN_ROWS_PER_EXPERT = 64   # mean rows per expert (Rcap / E) from which the large-token path serves
LARGE_TOKEN_BT256_MIN_ROWS_PER_EXPERT = 1 << 30  # BT 256 (2 stages) from this mean; off until measured
# The kernel the routed large-token keys run (all three give the same bits; the GPU bench's rows compare their times):
#   "two_mma": _grouped_gemm_nvfp4_big_jit.grouped_gemm_nvfp4_big_kernel (Triton, two K = 64 MMAs a K tile; measured),
#   "k128":    the same kernel with K128 (Triton, one K = 128 MMA a K tile: CompileKey.k128),
#   "wgmma":   _grouped_gemm_nvfp4_big_wgmma (Gluon, weights decoded into the wgmma A registers: BigWgmmaKey).
# Routed: "wgmma", from the H100 run of 2026-12-07 (NOTES.md): every output byte equal to the present path (GPU tests
# and the bench), fused L1 + L2 at T = 4096 14961 us (two_mma 16574, k128 17761), T = 32768 68550 (75953, 80758).
LARGE_TOKEN_VARIANT = "wgmma"


def _large_token_variant_name() -> str:
    """LARGE_TOKEN_VARIANT, checked where it is read (a typo would otherwise route two_mma silently)."""
    if LARGE_TOKEN_VARIANT not in ("two_mma", "k128", "wgmma"):
        raise ValueError(f"LARGE_TOKEN_VARIANT: {LARGE_TOKEN_VARIANT!r}, expected two_mma | k128 | wgmma")
    return LARGE_TOKEN_VARIANT


def _large_token_key(epi: int, rcap: int, num_experts: int, *, use_asm: bool, clamp: bool) -> CompileKey:
    """BN 128 weight rows x BT 128 tokens, 8 warps, 4 stages (BT 256: 2 stages: a [256, 64] fp16 tile of each
    plane is 64 KB a stage)."""
    wide = rcap / max(num_experts, 1) >= LARGE_TOKEN_BT256_MIN_ROWS_PER_EXPERT
    e_pad = max(16, 1 << (num_experts - 1).bit_length())
    return CompileKey(epi=epi, block_n=128, block_t=256 if wide else 128, num_warps=8, num_stages=2 if wide else 4,
                      e_pad=e_pad, use_asm=use_asm, clamp=clamp, big=True, k128=_large_token_variant_name() == "k128")


# K tiles a program of grouped_act_decode_planes_kernel decodes (its rows' expert lookup done once for them)
ACT_DECODE_KT_PER = 8


def _launch_act_decode(a_packed_u8: Tensor, a_sf_u8: Tensor, offsets_i32: Tensor, planes: Tensor, num_experts: int,
                       k: int, cp4: int, plane: int, e_pad: int, use_asm: bool, tile128: bool) -> None:
    """grouped_act_decode_planes_kernel over the activations: 16 rows x ACT_DECODE_KT_PER K tiles a program."""
    import triton

    from kernels.sm90._grouped_gemm_nvfp4_jit import grouped_act_decode_planes_kernel

    k_iters = -(-k // 128)
    grid = (triton.cdiv(a_packed_u8.shape[0], 16), triton.cdiv(k_iters, ACT_DECODE_KT_PER))
    grouped_act_decode_planes_kernel[grid](
        a_packed_u8, a_sf_u8.view(torch.int32), offsets_i32, planes, num_experts, k // 2, cp4, plane,
        K_ITERS=k_iters, BLOCK_R=16, E_P=e_pad, USE_ASM=use_asm, TILE128=tile128, KT_PER=ACT_DECODE_KT_PER,
        num_warps=4)


def _decode_planes(key: CompileKey, a_packed_u8: Tensor, a_sf_u8: Tensor, offsets_i32: Tensor, num_experts: int,
                   k: int, cp4: int) -> tuple[Tensor, ...]:
    """The activations decoded once (RP = Rcap rounded up to 16 rows, zeros past off[E]; from the graph pool under
    capture): even-k and odd-k fp16 planes [RP, K_ITERS * 64], or with key.k128 one tensor [RP, K_ITERS * 128]
    (K tile i at columns 128 i.., its 64 even k then its 64 odd k), returned as a 1-tuple. Same size either way."""
    rcap, k_iters = a_packed_u8.shape[0], -(-k // 128)
    rp = -(-rcap // 16) * 16
    plane = rp * k_iters * 64
    planes = torch.empty((2 * plane,), dtype=torch.float16, device=a_packed_u8.device)
    _launch_act_decode(a_packed_u8, a_sf_u8, offsets_i32, planes, num_experts, k, cp4, plane, key.e_pad, key.use_asm,
                       key.k128)
    if key.k128:
        return (planes.view(rp, k_iters * 128),)
    return planes[:plane].view(rp, k_iters * 64), planes[plane:].view(rp, k_iters * 64)


def _check_e_pad(key, num_experts: int) -> None:
    """An explicit key's expert padding must hold every expert (the schedule reads E_P lanes of the offsets)."""
    if key.e_pad < num_experts:
        raise ValueError(f"key: e_pad = {key.e_pad} is below the {num_experts} experts of w")


def _run_large_token(key: CompileKey, a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w: Sm90GroupedWeight, out, out2,
                     hsf, hdec, limit: float) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels.sm90 import _grouped_gemm_nvfp4_big_jit as big

    rcap = a_packed_u8.shape[0]
    e, n = w.num_experts, w.n
    _check_e_pad(key, e)
    grid = (key.grid(rcap, e, n),)
    if grid[0] == 0 or rcap == 0:  # no rows: nothing to write (and no planes to describe)
        return
    cp4 = w.sf_swizzled_u8.shape[2] // 4
    planes = _decode_planes(key, a_packed_u8, a_sf_u8, offsets_i32, e, w.k, cp4)
    # host descriptors: kernel parameters, so a captured graph replays them as they are (the planes come
    # from the graph pool, the same addresses at every replay)
    width = 128 if key.k128 else 64
    descs = [TensorDescriptor.from_tensor(p, [key.block_t, width]) for p in planes]
    x_desc, xhi_desc = descs if len(descs) == 2 else (descs[0], None)  # k128: one descriptor (xhi_desc constexpr)
    big.grouped_gemm_nvfp4_big_kernel[grid](
        w.packed_u8, w.sf_swizzled_u8.view(torch.int32), x_desc, xhi_desc, a_dec_f32, w.dec_scale_f32, offsets_i32,
        out, out2, hsf, hdec, e, n, w.k // 2, cp4, rcap, w.sf_swizzled_u8.shape[1],
        0 if a_dec_f32.numel() == 1 else 1, 0 if hdec.numel() == 1 else 1, float(limit),
        hsf.shape[1] if hsf.dim() == 2 else 4,
        K_ITERS=-(-w.k // 128), EPI=key.epi, BN=key.block_n, BT=key.block_t, E_P=key.e_pad, USE_ASM=key.use_asm,
        CLAMP=key.clamp, ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, K128=key.k128, W_FRAG=w.fragment_order,
        num_warps=key.num_warps, num_stages=key.num_stages)


@dataclass(frozen=True)
class BigWgmmaKey:
    """Codegen of the large-token path's register-fed variant (_grouped_gemm_nvfp4_big_wgmma, Gluon): epilogue, BT
    tokens (the wgmma N: 64 or 128), warps, the expert-count padding E_P (a power of two >= 32 and >= E), clamp, and
    rows_per_wg: the 64-row wgmma tiles (row blocks) each warpgroup owns, 1 or 2 (2: two wgmmas a K tile on the same
    token tile, so each token tile brought in feeds twice the weight rows). BN = 16 * warps * rows_per_wg weight rows.
    BT 128 with rows_per_wg 2 (8 warps: BN 256; 4 warps: BN 128) compiles to 255 registers with at most 8 B of stack,
    stored before the K loop and reloaded after it (the compile test checks that no local memory is touched inside a
    loop); with a K tail (K % 128 != 0) it reloads inside the loop: correct, not a key to time. Its activations are the
    k128 layout's (the PTX decode)."""

    epi: int
    block_t: int = 128
    e_pad: int = 512
    num_warps: int = 8
    clamp: bool = False
    rows_per_wg: int = 1

    k128 = True     # (what _decode_planes reads: the tile-interleaved layout, PTX decode)
    use_asm = True

    def __post_init__(self):
        if self.epi not in (EPI_PLAIN, EPI_GATE_UP, EPI_SWIGLU_REQUANT):
            raise ValueError(f"BigWgmmaKey: epi = {self.epi!r}, expected 0 (bf16), 1 (gate/up) or 2 (fused SwiGLU)")
        if self.block_t not in (64, 128):
            raise ValueError(f"BigWgmmaKey: block_t = {self.block_t!r}, expected 64 or 128 tokens")
        if self.num_warps not in (4, 8):
            raise ValueError(f"BigWgmmaKey: num_warps = {self.num_warps!r}, expected 4 or 8 (whole warpgroups)")
        if not isinstance(self.e_pad, int) or self.e_pad < 32 or self.e_pad & (self.e_pad - 1):
            raise ValueError(f"BigWgmmaKey: e_pad = {self.e_pad!r}, expected a power of two >= 32")
        if self.rows_per_wg not in (1, 2):
            raise ValueError(f"BigWgmmaKey: rows_per_wg = {self.rows_per_wg!r}, expected 1 or 2 (64-row wgmma tiles "
                             "a warpgroup)")

    @property
    def block_n(self) -> int:
        return 16 * self.num_warps * self.rows_per_wg

    @staticmethod
    def for_shape(epi: int, rcap: int, num_experts: int, *, clamp: bool = False, k_tail: bool = False) -> "BigWgmmaKey":
        # Fewer than 128 rows an expert on average (Rcap < 128 E; V4-Pro T = 4096: 64): BT 64, 4 warps, two row blocks
        # a warpgroup (BN 128, 2 CTAs an SM): a BT 128 tile would be about half empty, and each fp16 token tile
        # feeds 128 weight rows with a quarter of the routed key's token bytes a weight row. H100 (NOTES.md, "Two row
        # blocks a warpgroup"), V4-Pro T = 4096 fused L1 + L2: 12089 us against 14916 (BT 128, 8 warps, R 1) and
        # 13623 (BT 64, 8 warps, R 2); H200 (session 8): 12767 against 13414 (BT 128, R 2). At 128 or more (T = 32768:
        # 512) BT 128, 8 warps, R 2 (BN 256): H200 (NOTES.md, "Measured on an H200 (2026-12-07, session 8)") 62353 us
        # against 69494 (BT 128, R 1), 72712 (BT 64, R 2, 4 warps), 80875 (8 warps). With a K tail (K % 128 != 0) R 1:
        # that key reloads spilled registers inside its K loop (test_sm90_wgmma_compile.py, an expected failure).
        # Every variant has the present path's bits (the GPU bit tests), so the switch keeps batch invariance.
        e_pad = max(32, 1 << (num_experts - 1).bit_length())
        if rcap < 128 * num_experts:
            return BigWgmmaKey(epi=epi, block_t=64, e_pad=e_pad, num_warps=4, clamp=clamp, rows_per_wg=2)
        return BigWgmmaKey(epi=epi, block_t=128, e_pad=e_pad, num_warps=8, clamp=clamp, rows_per_wg=1 if k_tail else 2)

    def grid(self, rcap: int, num_experts: int, n: int) -> int:
        return _grid(rcap, num_experts, n, self.block_t, self.block_n)


@functools.lru_cache(maxsize=16)
def _big_wgmma_layouts(num_warps: int, block_t: int, wvec: int, e_pad: int) -> dict:
    from kernels.sm90._grouped_gemm_nvfp4_big_wgmma import big_wgmma_layouts

    return big_wgmma_layouts(num_warps, block_t, wvec, e_pad)


@functools.lru_cache(maxsize=64)
def _compile_big_wgmma(key: BigWgmmaKey):
    """The launcher for `key` (Gluon compiles on the first launch: warm up before graph capture)."""
    if _interpreting():
        raise ValueError(f"key: {key} is a Gluon kernel's (sm_90a GPU only); under TRITON_INTERPRET=1 pass a "
                         "CompileKey")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kernels.sm90._grouped_gemm_nvfp4_big_wgmma import grouped_gemm_nvfp4_big_wgmma_kernel

    def run(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w: Sm90GroupedWeight, out, out2, hsf, hdec,
            limit: float) -> None:
        rcap = a_packed_u8.shape[0]
        e, n = w.num_experts, w.n
        _check_e_pad(key, e)
        grid = (key.grid(rcap, e, n),)
        if grid[0] == 0 or rcap == 0:
            return
        wvec = 16 if w.k % 32 == 0 else 8  # weight rows 16-byte aligned only when K % 32 == 0
        if key.block_t == 128 and key.rows_per_wg == 2 and max(n * w.k // 4, w.sf_swizzled_u8[0].numel()) >= 2**31:
            raise ValueError(f"w: {n} x {w.k} weights an expert: over the int32 copy offsets of {key}")
        lay = _big_wgmma_layouts(key.num_warps, key.block_t, wvec, key.e_pad)
        (x,) = _decode_planes(key, a_packed_u8, a_sf_u8, offsets_i32, e, w.k, w.sf_swizzled_u8.shape[2] // 4)
        # a host descriptor (a kernel parameter: a captured graph replays it; x from the graph pool)
        x_desc = TensorDescriptor.from_tensor(x, [key.block_t, 128], lay["X_SH"])
        grouped_gemm_nvfp4_big_wgmma_kernel[grid](
            w.packed_u8.view(torch.int16), w.sf_swizzled_u8, x_desc, a_dec_f32, w.dec_scale_f32, offsets_i32,
            out, out2, hsf, hdec, e, n, w.k // 4, w.sf_swizzled_u8.shape[2] // 4, rcap, w.sf_swizzled_u8.shape[1],
            0 if a_dec_f32.numel() == 1 else 1, 0 if hdec.numel() == 1 else 1, float(limit),
            hsf.shape[1] if hsf.dim() == 2 else 4, **lay,
            K_ITERS=-(-w.k // 128), K_TAIL=w.k % 128 != 0, WVEC=wvec, EPI=key.epi, BN=key.block_n, BT=key.block_t,
            E_P=key.e_pad, CLAMP=key.clamp, ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, R_WG=key.rows_per_wg,
            W_FRAG=w.fragment_order, num_warps=key.num_warps)

    return run


def _large_token_variant(key: CompileKey, epi: int, rcap: int, num_experts: int, clamp: bool, asm: bool, *,
                         k_tail: bool = False):
    """A routed large-token CompileKey -> the kernel LARGE_TOKEN_VARIANT names (the Gluon one needs the PTX decode
    and a GPU; elsewhere the Triton key stays). A LARGE_TOKEN_VARIANT outside two_mma | k128 | wgmma: ValueError."""
    if _large_token_variant_name() == "wgmma" and key.big and asm and not _interpreting():
        return BigWgmmaKey.for_shape(epi, rcap, num_experts, clamp=clamp, k_tail=k_tail)
    return key
# ------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _compile(key: CompileKey):
    """The launcher for `key` (Triton compiles on the first launch: warm up before graph capture)."""
    from kernels.sm90._grouped_gemm_nvfp4_jit import grouped_gemm_nvfp4_kernel

    if key.big:
        return functools.partial(_run_large_token, key)

    def run(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w: Sm90GroupedWeight, out, out2, hsf, hdec,
            limit: float) -> None:
        rcap = a_packed_u8.shape[0]
        e, n = w.num_experts, w.n
        _check_e_pad(key, e)
        grid = (key.grid(rcap, e, n),)
        if grid[0] == 0:
            return
        k_iters = -(-w.k // 128)
        cp4 = w.sf_swizzled_u8.shape[2] // 4
        planes, plane = a_packed_u8, 0
        if key.act_f16:  # fp16 planes [2, Rcap, k_iters * 64] (from the graph pool under capture)
            plane = -(-rcap // 16) * 16 * k_iters * 64  # rows padded to the decode tile: every store in bounds
            planes = torch.empty((2 * plane,), dtype=torch.float16, device=a_packed_u8.device)
            _launch_act_decode(a_packed_u8, a_sf_u8, offsets_i32, planes, e, w.k, cp4, plane, key.e_pad, key.use_asm,
                               False)
        grouped_gemm_nvfp4_kernel[grid](
            w.packed_u8, w.sf_swizzled_u8.view(torch.int32), a_packed_u8, a_sf_u8.view(torch.int32),
            a_dec_f32, w.dec_scale_f32, offsets_i32, out, out2, hsf, hdec, planes,
            e, n, w.k // 2, cp4, rcap, w.sf_swizzled_u8.shape[1],
            0 if a_dec_f32.numel() == 1 else 1, 0 if hdec.numel() == 1 else 1, float(limit),
            hsf.shape[1] if hsf.dim() == 2 else 4, plane,
            K_ITERS=k_iters, X_F16=key.act_f16, EPI=key.epi, BN=key.block_n, BT=key.block_t, BLOCK_K=128, E_P=key.e_pad, USE_ASM=key.use_asm,
            CLAMP=key.clamp, ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, W_FRAG=w.fragment_order,
            num_warps=key.num_warps, num_stages=key.num_stages)

    return run


def _check(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor, w: Sm90GroupedWeight,
           *, gate_up: bool) -> None:
    if not isinstance(w, Sm90GroupedWeight):
        raise ValueError(f"w: expected an Sm90GroupedWeight (prepare_experts / prepare_gate_up), got {type(w).__name__}")
    if w.gate_up != gate_up:
        raise ValueError("w: " + ("the L1 ops need the interleaved gate/up stack of prepare_gate_up" if gate_up
                                  else "grouped_gemm takes a plain stack (prepare_experts), got a gate/up stack"))
    if not isinstance(a_packed_u8, Tensor) or a_packed_u8.dtype != torch.uint8 or a_packed_u8.dim() != 2:
        raise ValueError(f"a_packed_u8: expected a 2-d torch.uint8 tensor [Rcap, K/2], got "
                         f"{getattr(a_packed_u8, 'dtype', type(a_packed_u8))} {tuple(getattr(a_packed_u8, 'shape', ()))}")
    k = 2 * a_packed_u8.shape[1]
    if k != w.k:
        raise ValueError(f"a_packed_u8: K = {k} does not match the experts' K = {w.k}")
    if k % BLOCK:
        raise ValueError(f"a_packed_u8: K = {k} must be a multiple of {BLOCK}")
    if not a_packed_u8.is_contiguous():
        raise ValueError(f"a_packed_u8: must be contiguous (K-major), got strides {a_packed_u8.stride()}")
    if isinstance(a_sf_u8, Tensor) and a_sf_u8.dtype == torch.float8_e4m3fn:
        a_sf_u8 = a_sf_u8.view(torch.uint8)
    cp = -(-(k // BLOCK) // 4) * 4
    if (not isinstance(a_sf_u8, Tensor) or a_sf_u8.dtype != torch.uint8 or a_sf_u8.dim() != 2
            or a_sf_u8.shape[1] != cp or a_sf_u8.shape[0] % 128 or not a_sf_u8.is_contiguous()):
        raise ValueError(f"a_sf_u8: expected a contiguous grouped 128x4-swizzled uint8 buffer [Rs, {cp}] (Rs a "
                         f"multiple of 128) for K = {k}, got {getattr(a_sf_u8, 'dtype', type(a_sf_u8))} "
                         f"{tuple(getattr(a_sf_u8, 'shape', ()))}")
    e = w.num_experts
    if (not isinstance(offsets_i32, Tensor) or offsets_i32.dtype != torch.int32 or offsets_i32.numel() != e + 1
            or not offsets_i32.is_contiguous()):
        raise ValueError(f"offsets_i32: expected a contiguous torch.int32 tensor of E+1 = {e + 1} offsets, got "
                         f"{getattr(offsets_i32, 'dtype', type(offsets_i32))} {tuple(getattr(offsets_i32, 'shape', ()))}")
    if (not isinstance(a_dec_f32, Tensor) or a_dec_f32.dtype != torch.float32 or a_dec_f32.numel() not in (1, e)
            or not a_dec_f32.is_contiguous()):
        raise ValueError(f"a_dec_f32: expected float32 [{e}] or [1] (activation global decode scale per expert), "
                         f"got {getattr(a_dec_f32, 'dtype', type(a_dec_f32))} {tuple(getattr(a_dec_f32, 'shape', ()))}")
    dev = w.packed_u8.device
    for name, t in (("a_packed_u8", a_packed_u8), ("a_sf_u8", a_sf_u8), ("a_dec_f32", a_dec_f32),
                    ("offsets_i32", offsets_i32)):
        if t.device != dev:
            raise ValueError(f"{name}: on {t.device}, the experts on {dev}")
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"a_packed_u8: expected CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def _key(epi: int, a_packed_u8: Tensor, w: Sm90GroupedWeight, use_asm: bool | None, clamp: bool = False,
         key: "CompileKey | WgmmaKey | None" = None, pdl: bool = False) -> "CompileKey | WgmmaKey":
    if key is not None:
        return key
    asm = (not _interpreting()) if use_asm is None else use_asm
    if (USE_WGMMA and asm and not _interpreting() and wgmma_serves(a_packed_u8.shape[0], w.num_experts)
            and a_packed_u8.data_ptr() % 2 == 0):  # (the register-fed kernel reads the activations as int16 halves)
        return WgmmaKey.for_shape(epi, a_packed_u8.shape[0], w.num_experts, clamp=clamp, pdl=pdl)
    return _large_token_variant(CompileKey.for_shape(epi, a_packed_u8.shape[0], w.num_experts, w.n, w.k, use_asm=asm,
                                                     clamp=clamp), epi, a_packed_u8.shape[0], w.num_experts, clamp, asm,
                               k_tail=w.k % 128 != 0)


def grouped_gemm(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor,
                 w: Sm90GroupedWeight, *, out: Tensor | None = None, use_asm: bool | None = None,
                 key: CompileKey | None = None, pdl: bool = False) -> Tensor:
    """bf16 [Rcap, N]: expert e's rows times alpha_e * W_e^T; capacity rows zero (see the module docstring).

    pdl: where the register-fed kernel serves the shape, launch it as a programmatic dependent of the kernel
    before it in the stream (WgmmaKey.pdl): its tile schedule and weight prologue overlap that kernel's tail. Only
    for a caller whose previous launch is the grouped L1 (or the unfused SwiGLU requant) and whose offsets were
    complete before that launch: the MoE block's order (kernels.sm90.moe_block). The same bits either way."""
    _check(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w, gate_up=False)
    rcap = a_packed_u8.shape[0]
    if out is None:
        out = torch.empty((rcap, w.n), dtype=torch.bfloat16, device=a_packed_u8.device)
    elif (not isinstance(out, Tensor) or out.dtype != torch.bfloat16 or tuple(out.shape) != (rcap, w.n)
          or not out.is_contiguous() or out.device != a_packed_u8.device):
        raise ValueError(f"out: expected a contiguous bfloat16 [{rcap}, {w.n}] on {a_packed_u8.device}, got "
                         f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if isinstance(a_sf_u8, Tensor) and a_sf_u8.dtype == torch.float8_e4m3fn:
        a_sf_u8 = a_sf_u8.view(torch.uint8)
    _launcher(_key(EPI_PLAIN, a_packed_u8, w, use_asm, key=key, pdl=pdl))(
        a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w, out, out, out, a_dec_f32, 0.0)
    return out


def grouped_gemm_l1(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor,
                    w13: Sm90GroupedWeight, *, use_asm: bool | None = None,
                    key: CompileKey | None = None) -> tuple[Tensor, Tensor]:
    """(gate, up) float32 [Rcap, I] each from the interleaved gate/up stack (alpha per half)."""
    _check(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13, gate_up=True)
    rcap, i = a_packed_u8.shape[0], w13.n // 2
    gate = torch.empty((rcap, i), dtype=torch.float32, device=a_packed_u8.device)
    up = torch.empty((rcap, i), dtype=torch.float32, device=a_packed_u8.device)
    if isinstance(a_sf_u8, Tensor) and a_sf_u8.dtype == torch.float8_e4m3fn:
        a_sf_u8 = a_sf_u8.view(torch.uint8)
    _launcher(_key(EPI_GATE_UP, a_packed_u8, w13, use_asm, key=key))(
        a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13, gate, up, gate, a_dec_f32, 0.0)
    return gate, up


def grouped_l1_swiglu_requant(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor,
                              w13: Sm90GroupedWeight, *, swiglu_limit: float | None, h_input_dec_scale_f32: Tensor,
                              use_asm: bool | None = None,
                              key: CompileKey | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """L1 + clamped SwiGLU + NVFP4 (te, static S = 1/h_input_dec_scale) in one kernel ->
    (h_packed_u8 [Rcap, I/2], h_sf_u8 grouped swizzled [grouped_sf_rows(Rcap, E), Cp], h_dec_f32 [E])."""
    _check(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13, gate_up=True)
    e = w13.num_experts
    s = h_input_dec_scale_f32
    if (not isinstance(s, Tensor) or s.dtype != torch.float32 or s.numel() not in (1, e) or not s.is_contiguous()
            or s.device != a_packed_u8.device):
        raise ValueError(f"h_input_dec_scale_f32: expected a contiguous float32 [{e}] or [1] on {a_packed_u8.device} "
                         f"(the w2 input_scale: a static decode scale), got {getattr(s, 'dtype', type(s))} "
                         f"{tuple(getattr(s, 'shape', ()))}")
    if swiglu_limit is not None and not (float(swiglu_limit) >= 0.0):
        raise ValueError(f"swiglu_limit: expected None or a float >= 0, got {swiglu_limit!r}")
    rcap, i = a_packed_u8.shape[0], w13.n // 2
    if i % BLOCK:
        raise ValueError(f"w13: the intermediate size I = {i} must be a multiple of {BLOCK} to requantize h")
    dev = a_packed_u8.device
    h_packed = torch.empty((rcap, i // 2), dtype=torch.uint8, device=dev)
    h_sf = torch.zeros((grouped_sf_rows(rcap, e), -(-(i // BLOCK) // 4) * 4), dtype=torch.uint8, device=dev)
    h_dec = s.reshape(-1).expand(e).clone() if s.numel() == 1 else s.reshape(-1).clone()
    limit = float(swiglu_limit or 0.0)
    if isinstance(a_sf_u8, Tensor) and a_sf_u8.dtype == torch.float8_e4m3fn:
        a_sf_u8 = a_sf_u8.view(torch.uint8)
    _launcher(_key(EPI_SWIGLU_REQUANT, a_packed_u8, w13, use_asm, clamp=limit > 0.0, key=key))(
        a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13, h_packed, h_packed, h_sf, s, limit)
    return h_packed, h_sf, h_dec


# --------------------------------------------------------------------------------------------------------------
# Register-fed path (issue 25 item 1): kernels/sm90/_grouped_gemm_nvfp4_wgmma.py, the Gluon kernel with the dense
# wgmma path's structure (weights decoded straight into the wgmma A operand). Same schedule, epilogues and
# per-element MMA sequence as the Triton kernel above, so the same bits (a GPU test compares them byte for byte);
# no split K (partial sums would change the accumulation order). Any of the three ops takes a WgmmaKey as `key`.

USE_WGMMA = True  # routes wgmma_serves shapes to it: every routed key bit-equal to the Triton kernel on an H200 (98 GPU tests)


def wgmma_serves(rcap: int, num_experts: int) -> bool:
    """The static shapes the register-fed kernel is routed for: decode sizes, at most 16 rows per expert on
    average (the Triton kernel's BT = 16 range: T <= 256 at E = 384, top-6)."""
    return 0 < rcap <= 16 * num_experts


@dataclass(frozen=True)
class WgmmaKey:
    """Codegen of the register-fed kernel: epilogue, BT tokens (the wgmma N: 8 or 16), warps (BN = 16 * warps weight
    rows, one 64-row wgmma tile per warpgroup; the cp.async ring has 4 stages), the expert-count padding E_P (a power
    of two >= 32 and >= E), clamp, and a register cap `max_registers` (0: the compiler's choice; else ptxas's
    maxrregcount: register allocation only, the same instructions and arithmetic, so the same bits: a cap of 96 on
    the BT 8 / 4-warp keys lets 5 CTAs share an SM instead of 4, what the T = 1 grid of 576 weight strips of the
    fused L1 needs to run in one wave). `pdl`: launched as a programmatic dependent of the previous kernel
    (griddepcontrol: the schedule and the weight ring's prologue run during that kernel's tail, the activations are
    read after its completion; launch control only, the same instructions on the data, so the same bits). Every key
    lets its own dependents launch from its start."""

    epi: int
    block_t: int
    e_pad: int
    num_warps: int = 4
    clamp: bool = False
    max_registers: int = 0
    pdl: bool = False

    def __post_init__(self):
        if self.epi not in (EPI_PLAIN, EPI_GATE_UP, EPI_SWIGLU_REQUANT):
            raise ValueError(f"WgmmaKey: epi = {self.epi!r}, expected 0 (bf16), 1 (gate/up) or 2 (fused SwiGLU)")
        if self.block_t not in (8, 16, 32, 64):
            raise ValueError(f"WgmmaKey: block_t = {self.block_t!r}, expected 8, 16, 32 or 64 tokens")
        if self.num_warps not in (4, 8, 16):
            raise ValueError(f"WgmmaKey: num_warps = {self.num_warps!r}, expected 4, 8 or 16 (whole warpgroups)")
        if not isinstance(self.e_pad, int) or self.e_pad < 32 or self.e_pad & (self.e_pad - 1):
            raise ValueError(f"WgmmaKey: e_pad = {self.e_pad!r}, expected a power of two >= 32")
        if not isinstance(self.max_registers, int) or self.max_registers and (
                self.max_registers % 8 or not 64 <= self.max_registers <= 248):
            raise ValueError(f"WgmmaKey: max_registers = {self.max_registers!r}, expected 0 (no cap) or a multiple "
                             "of 8 in 64..248")

    @property
    def block_n(self) -> int:
        return 16 * self.num_warps

    @staticmethod
    def for_shape(epi: int, rcap: int, num_experts: int, *, clamp: bool = False, pdl: bool = False) -> "WgmmaKey":
        # BT 8 / 4 warps at every routed T: on an H100 (NOTES.md, "Session of 2026-12-07") BT 8 beat BT 16 / 8 warps
        # at T = 256 too (fused L1 4695 against 5422 us, L2 2387 against 2836: 4 rows per active expert, so the
        # 16-token tile was mostly empty); the bits do not depend on BT (the per-element MMA sequence is fixed by the
        # K order). The L1 keys (gate/up, fused) capped at 96 registers while Rcap <= E (115 uncapped; no spills, the
        # same arithmetic in the SASS: test_sm90_wgmma_compile.py): 5 CTAs an SM instead of 4, so the 576 weight
        # strips of the T = 1 fused L1 (6 experts x 6144 / 64) fit one wave of 660 (fused L1 114.1 -> 93.7 us; T = 16
        # 1022 -> 1006). Not the L2 (T = 1: 672 strips, one wave short of 660 either way: 51.7 uncapped, 56.6 at 96)
        # and not at T = 256 (4695 uncapped, 4742 at 96). BT 16 spills under such a cap (64 bytes at 96).
        cap = 96 if epi != EPI_PLAIN and rcap <= num_experts else 0
        return WgmmaKey(epi=epi, block_t=8, e_pad=max(32, 1 << (num_experts - 1).bit_length()), num_warps=4,
                        clamp=clamp, max_registers=cap, pdl=pdl)

    def grid(self, rcap: int, num_experts: int, n: int) -> int:
        return _grid(rcap, num_experts, n, self.block_t, self.block_n)


@functools.lru_cache(maxsize=16)
def _wgmma_layouts(num_warps: int, block_t: int, wvec: int, e_pad: int) -> dict:
    from kernels.sm90._grouped_gemm_nvfp4_wgmma import grouped_wgmma_layouts

    return grouped_wgmma_layouts(num_warps, block_t, wvec, e_pad)


@functools.lru_cache(maxsize=64)
def _compile_wgmma(key: WgmmaKey):
    """The launcher for `key` (Gluon compiles on the first launch, cached by the constexprs: warm up before
    graph capture). Weights and activations go in as int16 views (two packed bytes a half)."""
    from kernels.sm90._grouped_gemm_nvfp4_wgmma import grouped_gemm_nvfp4_wgmma_kernel

    def run(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w: Sm90GroupedWeight, out, out2, hsf, hdec,
            limit: float) -> None:
        rcap = a_packed_u8.shape[0]
        e, n = w.num_experts, w.n
        _check_e_pad(key, e)
        if a_packed_u8.data_ptr() % 2:
            raise ValueError("a_packed_u8: the register-fed kernel reads it as int16 halves: its data must start at "
                             f"an even address (got {a_packed_u8.data_ptr():#x}); pass a Triton CompileKey instead")
        grid = (key.grid(rcap, e, n),)
        if grid[0] == 0:
            return
        wvec = 16 if w.k % 32 == 0 else 8  # weight rows 16-byte aligned only when K % 32 == 0
        grouped_gemm_nvfp4_wgmma_kernel[grid](
            w.packed_u8.view(torch.int16), w.sf_swizzled_u8, a_packed_u8.view(torch.int16), a_sf_u8, a_dec_f32,
            w.dec_scale_f32, offsets_i32, out, out2, hsf, hdec,
            e, n, w.k // 4, w.sf_swizzled_u8.shape[2] // 4, rcap, w.sf_swizzled_u8.shape[1],
            0 if a_dec_f32.numel() == 1 else 1, 0 if hdec.numel() == 1 else 1, float(limit),
            hsf.shape[1] if hsf.dim() == 2 else 4,
            **_wgmma_layouts(key.num_warps, key.block_t, wvec, key.e_pad),
            K_ITERS=-(-w.k // 128), K_TAIL=w.k % 128 != 0, WVEC=wvec, EPI=key.epi, BN=key.block_n, BT=key.block_t,
            E_P=key.e_pad, CLAMP=key.clamp, ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, PDL=key.pdl,
            W_FRAG=w.fragment_order, num_warps=key.num_warps, launch_pdl=key.pdl,
            **({"maxnreg": key.max_registers} if key.max_registers else {}))

    return run


def _launcher(key: "CompileKey | WgmmaKey | BigWgmmaKey"):
    if isinstance(key, BigWgmmaKey):
        return _compile_big_wgmma(key)
    return _compile_wgmma(key) if isinstance(key, WgmmaKey) else _compile(key)
