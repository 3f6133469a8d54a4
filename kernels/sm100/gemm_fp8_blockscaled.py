"""FP8 block-scaled linear for Blackwell (sm100a): y_bf16[M, N] = act @ W^T, CuTe DSL.

    out_bf16[m, n] = sum_k (A_e4m3[m, k] * SFA[m, k // 32]) * (B_e4m3[n, k] * SFB[n, k // 32])

Operands (kernels.sm100.host_bridge_fp8 builds the weight's; quantize_fp8_1x128 the act's):
- A: E4M3 bytes [M, K] K-major (the per-token 1x128 quantized activation);
- B: E4M3 bytes [N, K] K-major (the checkpoint weight, as stored);
- SFA, SFB: UE8M0 bytes in the 128x4 swizzle, one per 32 of K: SFA [round_up(M,128),
  4*ceil(K/128)] (each 1x128 group scale written four times), SFB [round_up(N,128),
  4*ceil(K/128)] (each 128x128 block scale over its 128 rows and four 32-columns). Exact:
  the MMA multiplies each 32-block by the same power of two the 128-block carries.

Math: tcgen05.mma.cta_group::1.kind::mxf8f6f4.block_scale.scale_vec::1X (the PTX this DSL
version emits spells it `.block_scale.block32`; E4M3 operands, UE8M0 scales per 32 of K,
fp32 accumulation in tensor memory over all of K; no separate promotion step: the scales are
applied inside the MMA). Tiles 128 x tile_n x 128 per
pipeline stage (four K=32 MMAs = one checkpoint scale block).

Accumulator declared to the verdicts: float32 (u_acc = 2^-24) with a promotion interval of
all K (one chunk), because the partial sums live in the fp32 TMEM accumulator from the first
K block to the last. This is a declaration for references.fp8_gemm.fp8_block_gemm_error_bound;
the accumulator probe on a B200 must confirm it (Hopper's FP8 MMA keeps ~14 bits; Blackwell's
has not been measured here).

Shapes: M, N, K are runtime values (one compiled kernel per CompileKey serves all).
- M >= 1: A rows past M are TMA zero fill; output rows >= M are never stored, so out is
  exactly [M, N]. Grid ceil(M/128) x ceil(N/tile_n).
- N: any multiple of 8 (bf16 rows 16-byte aligned for the vector store); a partial last
  N tile is computed on TMA zero fill and stored element by element up to N.
- K: any multiple of 16 (a TMA row is a multiple of 16 bytes); a partial last K block is
  zero fill for A and B (its scale, replicated in full, multiplies zeros).
Refused with one-line errors naming the argument otherwise (launch()).

Batch invariance: the CompileKey (hence the MMA shape) is picked from N alone (select_config),
and every output element is one CTA's full-K accumulation in the same K order whatever M is.

Performance: not measured (no B200 here). Small M with small N launches few CTAs (M = 1,
N = 1536: 12 CTAs of 148 SMs); a split-K decode variant is not written.

Valid rows (CUDA-graph replay with fewer tokens): the kernel reads an int32 row count n from
a device buffer at run time; output rows in [n, M) are written as zero and M tiles at or past
n do no TMA and no MMA. Graph-safe: no host sync, no host->device copy in launch().
"""

import functools
from dataclasses import dataclass

TILE_M = 128
MMA_K = 32  # K consumed by one tcgen05 mxf8f6f4 MMA
K_PER_STAGE = 128  # four MMAs per pipeline stage = one 128-block of scales
SF_VEC_SIZE = 32
K_ALIGN = 16
EPI_N = 32  # columns per epilogue sub-tile (one tcgen05.ld 32x32b.x32 per thread)
NUM_THREADS = 192  # 4 epilogue warps, 1 MMA warp, 1 TMA warp
EPILOGUE_WARPS = (0, 1, 2, 3)
MMA_WARP = 4
TMA_WARP = 5
TMEM_COLS = 512

# What this kernel declares to the GEMM bound (references.fp8_gemm): float32 accumulation over
# all of K in tensor memory (promotion interval = K).
ACCUMULATOR_U = 2.0**-24
ACCUMULATOR_BITS = 24


@dataclass(frozen=True)
class CompileKey:
    """Everything code generation reads.

    Deliberately not in the key: M, N, K (runtime), the pointers, the valid-row buffer and the
    CUDA stream, so one compiled kernel serves every shape and every call.
    """

    tile_n: int = 128
    num_stages: int = 6
    arch: str = "sm_100a"

    def __post_init__(self) -> None:
        if self.tile_n not in (128, 256):
            raise ValueError(f"CompileKey.tile_n={self.tile_n} must be 128 or 256")
        if not 2 <= self.num_stages <= 10:
            raise ValueError(f"CompileKey.num_stages={self.num_stages} must be in [2, 10]")
        if self.smem_bytes() > 227 * 1024:
            raise ValueError(f"CompileKey {self}: {self.smem_bytes()} bytes of shared memory exceed 227 KiB")

    def smem_bytes(self) -> int:
        per_stage = (TILE_M + self.tile_n) * K_PER_STAGE + (TILE_M + self.tile_n) * K_PER_STAGE // SF_VEC_SIZE
        return per_stage * self.num_stages + 1024


# The shipped configurations: what CI compiles and what select_config picks from.
SHIPPED_KEYS = (
    CompileKey(tile_n=128, num_stages=6),
    CompileKey(tile_n=256, num_stages=4),
)


def select_config(n: int) -> CompileKey:
    """The shipped key for a weight of N rows. By N only, never by M: the key decides the MMA
    shape, so a token's output must not depend on how many tokens share the call (batch
    invariance). tile_n 256 when even 256-wide tiles give every SM of a B200 (148) a column of
    tiles; otherwise 128, twice the CTAs over N (decode: M <= 128 is one M tile)."""
    if (n + 255) // 256 >= 148:
        return SHIPPED_KEYS[1]
    return SHIPPED_KEYS[0]


# --------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------


def _kernel(key: CompileKey):
    from kernels.sm100._cute.gemm_fp8_blockscaled import BlockScaledGemmFp8

    return BlockScaledGemmFp8(key)


def _compile_args(key: CompileKey):
    """Placeholder arguments with the types (and alignment assumptions) the kernel is compiled for."""
    import cutlass

    from kernels.sm100._launch import fake_ptr, fake_stream

    return (
        fake_ptr("Float8E4M3FN", 16),  # a
        fake_ptr("Float8E4M3FN", 16),  # b
        fake_ptr("Float8E8M0FNU", 16),  # sfa
        fake_ptr("Float8E8M0FNU", 16),  # sfb
        fake_ptr("BFloat16", 16),  # out
        fake_ptr("Int32", 4),  # valid_rows
        cutlass.Int32(128),
        cutlass.Int32(key.tile_n),
        cutlass.Int32(256),
        fake_stream(),
    )


@functools.lru_cache(maxsize=8)
def _compile(key: CompileKey):
    """Compile the kernel for `key` (no GPU needed; the target is key.arch)."""
    from kernels.sm100._launch import compile_for_arch

    return compile_for_arch(_kernel(key), _compile_args(key), arch=key.arch)


def warm_up(n: int, device=None) -> CompileKey:
    """Compile the key launch() will pick for a weight of N rows (call it when the weight is prepared,
    before any CUDA-graph capture); returns that key. With `device` (a CUDA device), also allocate the
    default valid-row count launch() reads when none is given: allocated lazily at a first launch inside
    a capture, it would come from the graph's pool and be filled only on replay."""
    key = select_config(n)
    _compile(key)
    if device is not None:
        from kernels.sm100._launch import INT32_MAX, device_i32_constant

        device_i32_constant(INT32_MAX, str(device))
    return key


def compile_with_ptx(key: CompileKey, dump_dir: str):
    """Compile `key` (uncached), keeping the PTX in `dump_dir`; returns (compiled, ptx_text)."""
    from kernels.sm100._launch import compile_keeping_ptx

    return compile_keeping_ptx(_kernel(key), _compile_args(key), arch=key.arch, dump_dir=dump_dir)


# --------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------


def _check_device_tensor(t, name: str, dtype, device, align: int = 16) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (same device as the activations)")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {tuple(t.stride())}")
    if t.data_ptr() % align:
        raise ValueError(f"{name}: data pointer must be {align}-byte aligned")


def check_operands(act_e4m3_u8, act_sf_swizzled_u8, weight, num_valid_rows_i32=None) -> tuple[int, int, int]:
    """Validate the launch operands; (M, N, K). One-line errors naming the argument."""
    import torch

    from kernels.sm100.host_bridge_fp8 import (N_ALIGN, SF_PER_BLOCK, SF_ROW_ALIGN, Sm100Fp8BlockWeight,
                                               ceil_div, check_fp8_shape, e4m3_bytes, round_up)

    if not isinstance(weight, Sm100Fp8BlockWeight):
        raise TypeError(f"weight: expected host_bridge_fp8.Sm100Fp8BlockWeight, got {type(weight).__name__}")
    a = e4m3_bytes(act_e4m3_u8, "act_e4m3_u8")
    if a.dim() != 2:
        raise ValueError(f"act_e4m3_u8: expected [M, K], got shape {list(a.shape)}")
    m, k = a.shape
    if k != weight.k:
        raise ValueError(f"act_e4m3_u8: K={k} does not match the weight's K={weight.k}")
    check_fp8_shape(weight.n, k, "weight", row_align=N_ALIGN)
    # Shapes first (checkable anywhere), then device, dtype, contiguity and alignment.
    want_sf = (round_up(max(m, 1), SF_ROW_ALIGN), SF_PER_BLOCK * ceil_div(k, 128))
    if tuple(act_sf_swizzled_u8.shape) != want_sf:
        raise ValueError(f"act_sf_swizzled_u8: expected 128x4 swizzled per-32 scales {list(want_sf)} for act "
                         f"[{m}, {k}], got {list(act_sf_swizzled_u8.shape)}")
    want_w_sf = (round_up(weight.n, SF_ROW_ALIGN), SF_PER_BLOCK * ceil_div(k, 128))
    if tuple(weight.sf_swizzled_u8.shape) != want_w_sf:
        raise ValueError(f"weight.sf_swizzled_u8: expected {list(want_w_sf)}, got "
                         f"{list(weight.sf_swizzled_u8.shape)}")
    dev = a.device
    if dev.type != "cuda":
        raise ValueError(f"act_e4m3_u8: the sm100 kernels run on a CUDA device, got {dev}")
    _check_device_tensor(a, "act_e4m3_u8", torch.uint8, dev)
    _check_device_tensor(act_sf_swizzled_u8, "act_sf_swizzled_u8", torch.uint8, dev)
    _check_device_tensor(weight.e4m3_u8, "weight.e4m3_u8", torch.uint8, dev)
    _check_device_tensor(weight.sf_swizzled_u8, "weight.sf_swizzled_u8", torch.uint8, dev)
    if num_valid_rows_i32 is not None:
        _check_device_tensor(num_valid_rows_i32, "num_valid_rows_i32", torch.int32, dev, align=4)
        if num_valid_rows_i32.numel() != 1:
            raise ValueError(f"num_valid_rows_i32: expected one int32 element, got shape "
                             f"{list(num_valid_rows_i32.shape)}")
    return m, weight.n, k


def launch(act_e4m3_u8, act_sf_swizzled_u8, weight, *, num_valid_rows_i32=None, key: CompileKey | None = None):
    """out_bf16 [M, N] = (A * SFA) @ (W * SFW)^T on the current CUDA stream (graph-safe).

    act_e4m3_u8 [M, K] (uint8 or float8_e4m3fn) and act_sf_swizzled_u8 [round_up(M,128),
    4*ceil(K/128)] from quantize_fp8_1x128.launch (or host_bridge_fp8.ue8m0_1x128_to_swizzled_
    128x4_per32 of [M, ceil(K/128)] scales); weight: host_bridge_fp8.prepare_fp8_block_weight.
    num_valid_rows_i32: optional int32 [1] on the device, n: rows >= n of the output are zero.
    key: None picks select_config(N); compile happens on the first call for a key (do it
    at warm-up, outside graph capture).
    """
    import cutlass
    import torch

    from kernels.sm100._launch import INT32_MAX, device_i32_constant, device_ptr, launch_on_current_stream

    m, n, k = check_operands(act_e4m3_u8, act_sf_swizzled_u8, weight, num_valid_rows_i32)
    key = key or select_config(n)
    a = act_e4m3_u8.view(torch.uint8)
    out_bf16 = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if num_valid_rows_i32 is None:
        num_valid_rows_i32 = device_i32_constant(INT32_MAX, str(a.device))
    if m > 0 and n > 0:
        launch_on_current_stream(
            _compile(key),
            device_ptr(a, "Float8E4M3FN"), device_ptr(weight.e4m3_u8, "Float8E4M3FN"),
            device_ptr(act_sf_swizzled_u8, "Float8E8M0FNU"), device_ptr(weight.sf_swizzled_u8, "Float8E8M0FNU"),
            device_ptr(out_bf16, "BFloat16"), device_ptr(num_valid_rows_i32, "Int32", 4),
            cutlass.Int32(m), cutlass.Int32(n), cutlass.Int32(k),
        )
    return out_bf16
