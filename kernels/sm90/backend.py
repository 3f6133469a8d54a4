"""The sm90 backend: Hopper NVFP4 kernels (Triton) behind one object for the harness.

verify/backend.py adapts this plain class to the suite's Backend protocol; nothing here
imports references/ or verify/. Triton is imported only when a kernel is compiled.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from kernels.sm90 import amax_global_enc_scale, gemm_nvfp4, quantize_nvfp4_1x16
from kernels.sm90.host_prepare import Sm90Nvfp4Weight, prepare_nvfp4_weight

__all__ = ["Sm90Backend", "OPS"]

OPS = ("quantize_nvfp4", "quantize_nvfp4_static", "quantize_nvfp4_dynamic", "amax_global_enc_scale", "gemm_nvfp4",
       "quantize_act", "gemm_act", "linear_nvfp4", "prepare_nvfp4_weight")


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

    def quantize_nvfp4_static(self, x_bf16: Tensor, input_dec_scale_f32: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Static mode from a checkpoint input_scale D (a decode scale, amax/2688): S = 1/D (float32,
        on the device), then quantize_nvfp4; returns (packed_u8, sf_swizzled_u8, a 0-d int32 GPU count
        of blocks whose scale saturated at 448, v * S / 6 > 448)."""
        s = torch.reciprocal(input_dec_scale_f32.to(torch.float32).reshape(()))
        return quantize_nvfp4_1x16.launch(x_bf16, s, count_saturated=True)

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

    # ---------------------------------------------------------------- typed ops (the harness's protocol)

    prepare_nvfp4_weight = staticmethod(prepare_nvfp4_weight)

    def quantize_act(self, x_bf16: Tensor, input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(packed_u8, sf_swizzled_u8, a_dec_f32 [1]): static from input_scale D (a_dec = D itself, as
        loaders form alpha), or dynamic (S = 2688/amax on the device, a_dec = 1/S). No host sync."""
        if input_dec_scale_f32 is None:
            packed, sf, s = self.quantize_nvfp4_dynamic(x_bf16)
            return packed, sf, torch.reciprocal(s.reshape(1))
        d = input_dec_scale_f32.to(torch.float32).reshape(1)
        packed, sf = quantize_nvfp4_1x16.launch(x_bf16, torch.reciprocal(d).reshape(()))
        return packed, sf, d

    def gemm_act(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, a_dec_f32: Tensor,
                 weight: Sm90Nvfp4Weight) -> Tensor:
        """bf16 [M, N]: alpha = a_dec x weight_scale_2 (one float32 product on the device)."""
        alpha = (a_dec_f32.reshape(1) * weight.dec_scale_f32).reshape(1)
        return gemm_nvfp4.launch(a_packed_u8, a_sf_swizzled_u8, weight.packed_u8, weight.sf_swizzled_u8, alpha)

    def linear_nvfp4(self, x_bf16: Tensor, weight: Sm90Nvfp4Weight, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """quantize_act + gemm_act: one NVFP4 linear, graph-capturable."""
        packed, sf, dec = self.quantize_act(x_bf16, input_dec_scale_f32)
        return self.gemm_act(packed, sf, dec, weight)

    def cache_clear(self) -> None:
        """Forget compiled launchers (tests' fresh-cache fixture)."""
        quantize_nvfp4_1x16._compile.cache_clear()
        amax_global_enc_scale._compile.cache_clear()
        gemm_nvfp4._compile.cache_clear()
