"""The `sgl-kernel` backend: sgl-kernel's public NVFP4 ops (SGLang's kernel package) behind the backend protocol,
the dense W4A4 path SGLang's ModelOpt NVFP4 linear runs on Blackwell.

Served (adapters._engine has the loader logic; declared mode W4A4, recipe `vllm`: sgl-kernel's quantizer is the
same kernel family as vLLM's; the bytes verdict says whether that declaration holds):
- quantize: `sgl_kernel.scaled_fp4_quant(x, input_global_scale)` -> packed E2M1 [M, K/2] and E4M3 scales in the
  128x4 layout, the encode scale S as its global scale;
- dense_gemm / dense_linear: `sgl_kernel.cutlass_scaled_fp4_mm(a, b, block_scale_a, block_scale_b, alpha,
  out_dtype)`, b the checkpoint's [N, K/2] bytes, its scales swizzled at prepare, alpha = D_act x weight_scale_2;
- prepare (prepare_linear, NVFP4 dense linears).
Not served, with the reason: sgl-kernel's NVFP4 MoE (cutlass_fp4_group_mm, scaled_fp4_experts_quant), its FP8
block GEMMs, its routing ops (not adapted here). Skips with the reason without sgl-kernel or without Blackwell.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from verify.backends.protocol import VLLM as VLLM_RECIPE
from verify.backends.protocol import Op
from verify.backends.adapters._common import Package
from verify.backends.adapters._engine import EngineNvfp4Weight, Nvfp4EngineBackend

__all__ = ["SGL_KERNEL", "SglKernelBackend"]

SGL_KERNEL = Package("sgl-kernel", "sgl_kernel", extra="sgl-kernel")
_MOE = "not served: sgl-kernel's NVFP4 MoE (scaled_fp4_experts_quant, cutlass_fp4_group_mm with its own problem " \
       "sizes and blockscale offsets) is not adapted here; this adapter covers its dense NVFP4 linear"
_ROUTING = "not served: sgl-kernel's routing ops (topk_softmax, moe_align_block_size) are not adapted here"
_NOT_SERVED = MappingProxyType({
    Op.QUANTIZE_FP8: "not served: sgl-kernel's FP8 block-128 path (sgl_per_token_group_quant_fp8, "
                     "fp8_blockwise_scaled_mm) is not adapted here",
    Op.GROUPED_QUANTIZE: _MOE, Op.GROUPED_GEMM: _MOE, Op.SWIGLU_REQUANT: _MOE, Op.L1_FUSED: _MOE, Op.MOE_BLOCK: _MOE,
    Op.ROUTER: _ROUTING, Op.DISPATCH: _ROUTING, Op.COMBINE: _ROUTING,
})


class SglKernelBackend(Nvfp4EngineBackend):
    """sgl-kernel's scaled_fp4_quant + cutlass_scaled_fp4_mm as a verify.backends.Backend (module docstring)."""

    name = "sgl-kernel"
    recipe = VLLM_RECIPE
    package = SGL_KERNEL
    not_served = _NOT_SERVED

    def _quantize_nvfp4(self, x_bf16: Tensor, global_enc_f32: Tensor) -> tuple[Tensor, Tensor]:
        import sgl_kernel  # noqa: PLC0415 (the optional package, lazily)

        packed, sf = sgl_kernel.scaled_fp4_quant(x_bf16, global_enc_f32)
        return packed, sf

    def _gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_u8: Tensor, w: EngineNvfp4Weight, alpha_f32: Tensor) -> Tensor:
        import sgl_kernel  # noqa: PLC0415

        return sgl_kernel.cutlass_scaled_fp4_mm(a_packed_u8, w.packed_u8, a_sf_u8.view(torch.float8_e4m3fn),
                                                w.sf_swizzled_u8.view(torch.float8_e4m3fn), alpha_f32, torch.bfloat16)
