"""The sm90 backend: Hopper NVFP4 kernels (Triton) behind one object for the harness.

verify/backend.py adapts this plain class to the suite's Backend protocol; nothing here
imports references/ or verify/. Triton is imported only when a kernel is compiled.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from kernels.sm90 import amax_global_enc_scale, gemm_nvfp4, quantize_nvfp4_1x16

__all__ = ["Sm90Backend", "OPS"]

OPS = ("quantize_nvfp4", "amax_global_enc_scale", "gemm_nvfp4")


class Sm90Backend:
    """NVFP4 on Hopper: `te` activation quantizer (byte-exact), dense W4A4 GEMM.

    recipe_name: the quantizer's recipe ("te", references.recipes.TE).
    u_acc: unit roundoff of the GEMM accumulator: fp16 wgmma with fp32 accumulation,
        declared 2**-24 (true fp32) and checked on the H200 by the bound tests
        (verify/tests/test_sm90_gemm.py); if a future measurement shows fewer bits, this
        is the number to change, never a test tolerance.
    """

    name = "sm90"
    recipe_name = "te"
    u_acc = 2.0**-24
    accumulator = "fp32 (fp16 wgmma, fp32 accumulate)"

    def unsupported_reason(self, op: str, device: torch.device | str | None = None) -> str | None:
        """None when `op` can run on `device`, else a sentence saying why not."""
        if op not in OPS:
            return f"sm90: op {op!r} is not provided (has {', '.join(OPS)})"
        if importlib.util.find_spec("triton") is None:
            return "sm90: triton is not installed"
        if not torch.cuda.is_available():
            return "sm90: no CUDA device"
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda":
            return f"sm90: needs a CUDA device, got {dev}"
        major, minor = torch.cuda.get_device_capability(dev)
        if major != 9:
            return f"sm90: needs compute capability 9.x (Hopper), this is sm_{major}{minor}"
        return None

    def quantize_nvfp4(self, x_bf16: Tensor, global_enc_scale_f32: Tensor) -> tuple[Tensor, Tensor]:
        """bf16 [M, K] -> (packed_u8 [M, K/2], sf_swizzled_u8 [Rp, Cp]), recipe te."""
        return quantize_nvfp4_1x16.launch(x_bf16, global_enc_scale_f32)

    def quantize_nvfp4_static(self, x_bf16: Tensor, global_enc_scale_f32: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Static mode: as quantize_nvfp4, plus a 0-d int32 GPU count of blocks whose scale
        saturated at 448 (v * S / 6 > 448)."""
        return quantize_nvfp4_1x16.launch(x_bf16, global_enc_scale_f32, count_saturated=True)

    def amax_global_enc_scale(self, x_bf16: Tensor) -> Tensor:
        """0-d float32 GPU tensor S = te_global_enc_scale(max |x|) (NaN ignored), no host sync."""
        return amax_global_enc_scale.launch(x_bf16)

    def quantize_nvfp4_dynamic(self, x_bf16: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Dynamic mode: (packed_u8, sf_swizzled_u8, global_enc_scale_f32), all on the GPU."""
        s = amax_global_enc_scale.launch(x_bf16)
        packed, sf = quantize_nvfp4_1x16.launch(x_bf16, s)
        return packed, sf, s

    def gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor,
                   b_sf_swizzled_u8: Tensor, alpha_f32: Tensor) -> Tensor:
        """bf16 [M, N] = alpha * A @ B^T (A [M, K], B [N, K] NVFP4, swizzled scales)."""
        return gemm_nvfp4.launch(a_packed_u8, a_sf_swizzled_u8, b_packed_u8, b_sf_swizzled_u8, alpha_f32)

    def cache_clear(self) -> None:
        """Forget compiled launchers (tests' fresh-cache fixture)."""
        quantize_nvfp4_1x16._compile.cache_clear()
        amax_global_enc_scale._compile.cache_clear()
        gemm_nvfp4._compile.cache_clear()
