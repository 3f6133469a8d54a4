"""The `vllm` backend: vLLM's public NVFP4 custom ops (vllm._custom_ops) behind the backend protocol, the dense
W4A4 path vLLM's ModelOpt NVFP4 linear runs on Blackwell.

Served (adapters._engine has the loader logic; declared mode W4A4, recipe `vllm`: its quantizer computes the block
scale as S * (amax / 6) with a reciprocal approximation, NVFP4_FACTS 2):
- quantize: `scaled_fp4_quant(x, input_global_scale)` -> packed E2M1 [M, K/2] and E4M3 scales already in the 128x4
  layout ([round_up(M, 128), round_up(K/16, 4)] viewed as float8_e4m3fn), the encode scale S as its global scale;
- dense_gemm / dense_linear: `cutlass_scaled_fp4_mm(a, b, block_scale_a, block_scale_b, alpha, out_dtype)` with b
  the checkpoint's [N, K/2] bytes and its scales swizzled at prepare, alpha = D_act x weight_scale_2;
- prepare (prepare_linear, NVFP4 dense linears).
Not served, with the reason: vLLM's NVFP4 MoE (cutlass_fp4_moe_mm, FlashInfer's fused MoE through vLLM), its FP8
block GEMMs, its routing ops (not adapted here). Skips with the reason without vllm or without Blackwell.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from references.recipes import VLLM as VLLM_RECIPE
from references.stages import Op
from verify.backends.adapters._common import Package
from verify.backends.adapters._engine import EngineNvfp4Weight, Nvfp4EngineBackend

__all__ = ["VLLM", "VllmBackend"]

VLLM = Package("vllm", "vllm", extra="vllm")
_MOE = "not served: vllm's NVFP4 MoE (cutlass_fp4_moe_mm with its own expert offsets and blockscale offsets) is " \
       "not adapted here; this adapter covers its dense NVFP4 linear"
_ROUTING = "not served: vllm's routing ops (fused top-k, moe_align) are not adapted here"
_NOT_SERVED = MappingProxyType({
    Op.QUANTIZE_FP8: "not served: vllm's FP8 block-128 path (per_token_group_quant_fp8, cutlass_scaled_mm with "
                     "block scales) is not adapted here",
    Op.GROUPED_QUANTIZE: _MOE, Op.GROUPED_GEMM: _MOE, Op.SWIGLU_REQUANT: _MOE, Op.L1_FUSED: _MOE, Op.MOE_BLOCK: _MOE,
    Op.ROUTER: _ROUTING, Op.DISPATCH: _ROUTING, Op.COMBINE: _ROUTING,
})


class VllmBackend(Nvfp4EngineBackend):
    """vLLM's scaled_fp4_quant + cutlass_scaled_fp4_mm as a verify.backends.Backend (module docstring)."""

    name = "vllm"
    recipe = VLLM_RECIPE
    package = VLLM
    not_served = _NOT_SERVED

    def _quantize_nvfp4(self, x_bf16: Tensor, global_enc_f32: Tensor) -> tuple[Tensor, Tensor]:
        from vllm import _custom_ops as ops  # noqa: PLC0415 (the optional package, lazily)

        packed, sf = ops.scaled_fp4_quant(x_bf16, global_enc_f32)
        return packed, sf

    def _gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_u8: Tensor, w: EngineNvfp4Weight, alpha_f32: Tensor) -> Tensor:
        from vllm import _custom_ops as ops  # noqa: PLC0415

        return ops.cutlass_scaled_fp4_mm(a_packed_u8, w.packed_u8, a_sf_u8.view(torch.float8_e4m3fn),
                                         w.sf_swizzled_u8.view(torch.float8_e4m3fn), alpha_f32, torch.bfloat16)
