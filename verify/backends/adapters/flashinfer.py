"""The `flashinfer` backend: FlashInfer's public NVFP4 ops behind the backend protocol, the dense W4A4 path an
engine's NVFP4 linear runs through FlashInfer on Blackwell.

Served (adapters._engine has the loader logic; declared mode W4A4, recipe `te`: FlashInfer's quantizer is TE's
exact math, NVFP4_FACTS 2):
- quantize: `flashinfer.fp4_quantize(x, global_scale, sf_vec_size=16, sf_use_ue8m0=False,
  is_sf_swizzled_layout=True)` -> packed E2M1 [M, K/2] and E4M3 scales in the 128x4 layout (reshaped to
  [round_up(M, 128), round_up(K/16, 4)]), the encode scale S as its global scale;
- dense_gemm / dense_linear: `flashinfer.mm_fp4(a, b, a_descale, b_descale, alpha, out_dtype, block_size=16,
  backend=...)` with b the checkpoint's [N, K/2] bytes as the column-major (K/2, N) operand and its swizzled scales
  transposed likewise, alpha = D_act x weight_scale_2; FlashinferBackend.mm_backend picks its GEMM backend
  ("cutlass"; FlashinferCudnnBackend: "cudnn");
- prepare (prepare_linear, NVFP4 dense linears).
Not served, with the reason: FlashInfer's fused MoE (cutlass_fused_moe / trtllm_fp4_block_scale_moe take their
own routing and weight layouts), grouped_mm_fp4 (one alpha for all experts, where each expert has its own global
scales), its W4A16 mm_bf16_fp4 (another mode, another adapter), its FP8 block GEMMs. Skips with the reason without
flashinfer-python or without Blackwell.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from verify.backends.protocol import TE, Op
from verify.backends.adapters._common import Package
from verify.backends.adapters._engine import EngineNvfp4Weight, Nvfp4EngineBackend

__all__ = ["FLASHINFER", "FlashinferBackend", "FlashinferCudnnBackend"]

FLASHINFER = Package("flashinfer-python", "flashinfer", extra="flashinfer")
_MOE = "not served: flashinfer's fused MoE (cutlass_fused_moe, trtllm_fp4_block_scale_moe) takes its own routing " \
       "and weight layouts, and grouped_mm_fp4 one alpha for all experts; not adapted here"
_ROUTING = "not served: flashinfer's routing is fused into its MoE kernels; not adapted here"
_NOT_SERVED = MappingProxyType({
    Op.QUANTIZE_FP8: "not served: flashinfer's FP8 block-128 GEMMs (gemm_fp8_nt_groupwise) are not adapted here",
    Op.GROUPED_QUANTIZE: _MOE, Op.GROUPED_GEMM: _MOE, Op.SWIGLU_REQUANT: _MOE, Op.L1_FUSED: _MOE, Op.MOE_BLOCK: _MOE,
    Op.ROUTER: _ROUTING, Op.DISPATCH: _ROUTING, Op.COMBINE: _ROUTING,
})
_SF_BLOCK = 16


class FlashinferBackend(Nvfp4EngineBackend):
    """flashinfer.fp4_quantize + flashinfer.mm_fp4 as a verify.backends.Backend (module docstring)."""

    name = "flashinfer"
    recipe = TE
    package = FLASHINFER
    not_served = _NOT_SERVED
    mm_backend = "cutlass"

    def _quantize_nvfp4(self, x_bf16: Tensor, global_enc_f32: Tensor) -> tuple[Tensor, Tensor]:
        import flashinfer  # noqa: PLC0415 (the optional package, lazily)

        packed, sf = flashinfer.fp4_quantize(x_bf16, global_enc_f32, sf_vec_size=_SF_BLOCK, sf_use_ue8m0=False,
                                             is_sf_swizzled_layout=True)
        m, k = x_bf16.shape
        rows, cols = -(-m // 128) * 128, -(-(k // _SF_BLOCK) // 4) * 4
        return packed, sf.view(torch.uint8).reshape(rows, cols)

    def _gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_u8: Tensor, w: EngineNvfp4Weight, alpha_f32: Tensor) -> Tensor:
        import flashinfer  # noqa: PLC0415

        return flashinfer.mm_fp4(a_packed_u8, w.packed_u8.t(), a_sf_u8.view(torch.float8_e4m3fn),
                                 w.sf_swizzled_u8.view(torch.float8_e4m3fn).t(), alpha_f32, torch.bfloat16,
                                 block_size=_SF_BLOCK, backend=self.mm_backend)


class FlashinferCudnnBackend(FlashinferBackend):
    """flashinfer with mm_fp4's cuDNN backend (`--backend verify.backends.adapters.flashinfer:FlashinferCudnnBackend`)."""

    mm_backend = "cudnn"
