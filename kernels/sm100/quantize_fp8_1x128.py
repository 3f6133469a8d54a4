"""Activation quantization bf16 -> FP8 E4M3, per token 1x128 groups, UE8M0 scales, for sm100 (CuTe DSL).

Recipe fp8_ue8m0 (DeepSeek's reference act_quant with scale_fmt "ue8m0"; DeepGEMM on
Blackwell), per group of 128 consecutive elements of a row (the last group may be shorter:
its missing elements count as zeros, which raises no amax):
  v    = max |x| over the group                  (max.NaN: a NaN element makes v NaN)
  s    = max(v, float32(1e-4)) / 448             (div.rn.f32: correctly rounded)
  e    = exponent field of s + (mantissa != 0)   (2^ceil(log2 s) on the f32 bits; 0xFF when s
                                                  is NaN or Inf) -> the UE8M0 scale byte
  code = E4M3_rne_satfinite(x / 2^(e-127))       (div.rn.f32; a NaN quotient -> 0x7F)
So a zero group gets byte 105 (2^-22) and +-0 codes (the sign of -0.0 kept), a group with a
NaN gets 0xFF and all codes 0x7F, a group with an Inf gets 0xFF and codes 0x7F (x / NaN).
Every |x / s| <= 448 by construction (s >= v / 448), so the saturation never changes a finite
code. The E4M3 rounding is the hardware conversion (cvt.rn.satfinite.e4m3x2.f32).

Outputs (host_bridge_fp8.Fp8ActSm100):
- e4m3_u8 [M, K] E4M3 bytes;
- sf_ue8m0_u8 [M, ceil(K/128)] the group scale bytes (the bytes the verdict compares);
- sf_swizzled_u8 [round_up(M,128), 4*ceil(K/128)] the same bytes, each written to its four
  32-columns of the 128x4 swizzle the GEMM's tcgen05 MMA reads (gemm_fp8_blockscaled);
  padding (rows past M) zero: the buffer is zero-filled on the device before the kernel.

Constraints (launch()): x bf16 [M, K] contiguous, K a positive multiple of 16 (the GEMM's TMA
needs it; K need not be a multiple of 128). M, K are runtime values: one compiled kernel.

Valid rows: an optional int32 device buffer n (tokens). Rows >= n are not read; their codes
and scale bytes are zero. Graph-safe: no host sync, no host->device copy.
"""

import functools
from dataclasses import dataclass

GROUP = 128
WARPS_PER_CTA = 4
THREADS = 32 * WARPS_PER_CTA
K_ALIGN = 16
RECIPES = ("fp8_ue8m0",)


@dataclass(frozen=True)
class CompileKey:
    """Everything code generation reads.

    Deliberately not in the key: M, K (runtime), the valid-row buffer and the stream.
    """

    recipe: str = "fp8_ue8m0"
    arch: str = "sm_100a"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"CompileKey.recipe={self.recipe!r}: the sm100 FP8 quantizer implements {RECIPES}")


SHIPPED_KEYS = (CompileKey(recipe="fp8_ue8m0"),)


# --------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------


def _kernel(key: CompileKey):
    from kernels.sm100._cute.quantize_fp8_1x128 import QuantizeFp8_1x128

    return QuantizeFp8_1x128(key)


def _compile_args():
    import cutlass

    from kernels.sm100._launch import fake_ptr, fake_stream

    return (fake_ptr("BFloat16", 16), fake_ptr("Int32", 16), fake_ptr("Uint8", 4), fake_ptr("Int32", 16),
            fake_ptr("Int32", 4), cutlass.Int32(128), cutlass.Int32(256), fake_stream())


@functools.lru_cache(maxsize=4)
def _compile(key: CompileKey):
    """The compiled quantizer for `key` (M, K and the valid row count are runtime arguments)."""
    from kernels.sm100._launch import compile_for_arch

    return compile_for_arch(_kernel(key), _compile_args(), arch=key.arch)


def warm_up(recipe: str = "fp8_ue8m0", device=None) -> CompileKey:
    """Compile the quantizer for `recipe` (before any CUDA-graph capture); returns its key. With `device`
    (a CUDA device), also allocate the default valid-row count launch() reads when none is given (lazily,
    at a first launch inside a capture, it would come from the graph's pool)."""
    key = CompileKey(recipe=recipe)
    _compile(key)
    if device is not None:
        from kernels.sm100._launch import INT32_MAX, device_i32_constant

        device_i32_constant(INT32_MAX, str(device))
    return key


def compile_with_ptx(key: CompileKey, dump_dir: str):
    """Compile `key` (uncached) keeping the PTX; returns (compiled, ptx_text)."""
    from kernels.sm100._launch import compile_keeping_ptx

    return compile_keeping_ptx(_kernel(key), _compile_args(), arch=key.arch, dump_dir=dump_dir)


# --------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------


def check_input(x_bf16, num_valid_rows_i32=None) -> tuple[int, int]:
    """Validate the quantizer's input; (M, K). One-line errors naming the argument."""
    import torch

    if not isinstance(x_bf16, torch.Tensor):
        raise TypeError(f"x_bf16: expected a torch.Tensor, got {type(x_bf16).__name__}")
    if x_bf16.dtype != torch.bfloat16:
        raise TypeError(f"x_bf16: expected bfloat16, got {x_bf16.dtype}")
    if x_bf16.dim() != 2:
        raise ValueError(f"x_bf16: expected [M, K], got shape {list(x_bf16.shape)}")
    m, k = x_bf16.shape
    if k <= 0 or k % K_ALIGN:
        raise ValueError(f"x_bf16: K={k} must be a positive multiple of {K_ALIGN} (the GEMM's TMA rows); "
                         f"K need not be a multiple of {GROUP}")
    if x_bf16.device.type != "cuda":
        raise ValueError(f"x_bf16: the sm100 quantizer runs on a CUDA device, got {x_bf16.device}")
    if not x_bf16.is_contiguous() or x_bf16.data_ptr() % 16:
        raise ValueError(f"x_bf16: must be contiguous and 16-byte aligned, got strides {tuple(x_bf16.stride())}")
    if num_valid_rows_i32 is not None:
        if not isinstance(num_valid_rows_i32, torch.Tensor) or num_valid_rows_i32.dtype != torch.int32 \
                or num_valid_rows_i32.numel() != 1 or num_valid_rows_i32.device != x_bf16.device:
            raise ValueError(f"num_valid_rows_i32: expected one int32 element on {x_bf16.device}")
    return m, k


def launch(x_bf16, *, recipe: str = "fp8_ue8m0", key: CompileKey | None = None, num_valid_rows_i32=None):
    """bf16 [M, K] -> host_bridge_fp8.Fp8ActSm100 (e4m3_u8 [M, K], sf_ue8m0_u8 [M, ceil(K/128)],
    sf_swizzled_u8 [round_up(M,128), 4*ceil(K/128)]) on the current stream (graph-safe).

    num_valid_rows_i32: optional int32 [1] on the device, n: rows >= n are not read and give zero
    codes and zero scale bytes (a graph captured for M rows replays for any n <= M).
    """
    import torch

    from kernels.sm100._launch import INT32_MAX, device_i32_constant, device_ptr, launch_on_current_stream
    from kernels.sm100.host_bridge_fp8 import SF_PER_BLOCK, Fp8ActSm100, ceil_div, round_up

    key = key or CompileKey(recipe=recipe)
    if key.recipe != recipe:
        raise ValueError(f"recipe={recipe!r} does not match key.recipe={key.recipe!r}")
    m, k = check_input(x_bf16, num_valid_rows_i32)
    groups = ceil_div(k, GROUP)
    dev = x_bf16.device
    e4m3_u8 = torch.empty(m, k, dtype=torch.uint8, device=dev)
    sf_ue8m0_u8 = torch.empty(m, groups, dtype=torch.uint8, device=dev)
    sf_swizzled_u8 = torch.zeros(round_up(max(m, 1), 128), SF_PER_BLOCK * groups, dtype=torch.uint8, device=dev)
    if num_valid_rows_i32 is None:
        num_valid_rows_i32 = device_i32_constant(INT32_MAX, str(dev))
    if m > 0:
        import cutlass

        launch_on_current_stream(
            _compile(key), device_ptr(x_bf16, "BFloat16"), device_ptr(e4m3_u8, "Int32", 16),
            device_ptr(sf_ue8m0_u8, "Uint8", 4), device_ptr(sf_swizzled_u8, "Int32", 16),
            device_ptr(num_valid_rows_i32, "Int32", 4), cutlass.Int32(m), cutlass.Int32(k))
    return Fp8ActSm100(e4m3_u8, sf_ue8m0_u8, sf_swizzled_u8)
