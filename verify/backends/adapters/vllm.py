"""The `vllm` backend: vLLM's public kernels behind the backend protocol: the NVFP4 dense W4A4 path vLLM's
ModelOpt NVFP4 linear runs on Blackwell, and the FP8 block-128 dense path its block-quantized linears run on
Hopper and Blackwell (DeepSeek's attention and shared-expert linears).

NVFP4 (adapters._engine has the loader logic; declared mode W4A4, recipe `vllm`: its quantizer computes the block
scale as S * (amax / 6) with a reciprocal approximation, NVFP4_FACTS 2); Blackwell (sm100 / sm120) only:
- quantize: `vllm._custom_ops.scaled_fp4_quant(x, input_global_scale)` -> packed E2M1 [M, K/2] and E4M3 scales
  already in the 128x4 layout (viewed as float8_e4m3fn), the encode scale S as its global scale;
- dense_gemm / dense_linear: `vllm._custom_ops.cutlass_scaled_fp4_mm(a, b, block_scale_a, block_scale_b, alpha,
  out_dtype)`, b the checkpoint's [N, K/2] bytes, its scales swizzled at prepare, alpha = D_act x weight_scale_2.
FP8 block-128 (declared mode FP8_BLOCK); Hopper and Blackwell (sm90 / sm100 / sm120):
- prepare: the E4M3 weight [N, K] as stored, its block scales as float32 [ceil(N/128), ceil(K/128)] (the loader's
  exact decode of V4's E8M0 `.scale` or V3's weight_scale_inv) and the activation scale rule they imply (power-of-two
  scales, V4: UE8M0 rounded up; else float32), decided once at prepare;
- quantize_fp8: `vllm.model_executor.layers.quantization.utils.fp8_utils.per_token_group_quant_fp8(x, 128,
  use_ue8m0=...)` (per token, 1x128 groups, amax clamped to eps = 1e-10 as vLLM does), its float32 scales turned
  into the boundary's UE8M0 bytes exactly (a scale that is not a power of two becomes the NaN byte 0xFF, so the
  bytes verdict shows it) or kept float32;
- dense_linear: that quantizer, then `fp8_utils.w8a8_triton_block_scaled_mm(A, B, As, Bs, [128, 128], bf16)`.
  Its accumulator, read from the kernel: one tl.dot per 128-K group (FP8 wgmma, about 14 bits on Hopper), scaled
  and added to a float32 accumulator: fp8_u_acc 2^-13, fp8_promotion_interval 128 (the accumulator probe measures
  it and refuses a declaration looser than what it sees).
Not served, with the reason: vLLM's NVFP4 MoE (cutlass_fp4_moe_mm), its routing ops, a static per-tensor FP8
input_scale, dense_gemm on FP8 weights (their activations are no NVFP4 boundary tensor). Skips with the reason
without vllm or a suitable device.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from verify.backends.protocol import VLLM as VLLM_RECIPE
from verify.backends.protocol import Op
from verify.backends.adapters._common import Package, f32_pow2_to_ue8m0_u8
from verify.backends.adapters._engine import EngineNvfp4Weight, Nvfp4EngineBackend
from verify.backends.protocol import FP8_SCALE_RULES, Fp8QuantizedAct, QuantizedAct
from verify.checkpoint import Fp8BlockLinear, Linear, fp8_act_scale_fmt

__all__ = ["VLLM", "VllmBackend", "VllmFp8Linear"]

VLLM = Package("vllm", "vllm", extra="vllm")
_FP8_OPS = (Op.QUANTIZE_FP8, Op.DENSE_LINEAR, Op.PREPARE)  # also run on Hopper (the FP8 block-128 path)
_FP8_GROUP = 128
_MOE = "not served: vllm's NVFP4 MoE (cutlass_fp4_moe_mm with its own expert offsets and blockscale offsets) is " \
       "not adapted here; this adapter covers its dense linears"
_ROUTING = "not served: vllm's routing ops (fused top-k, moe_align) are not adapted here"
_NOT_SERVED = MappingProxyType({
    Op.GROUPED_QUANTIZE: _MOE, Op.GROUPED_GEMM: _MOE, Op.SWIGLU_REQUANT: _MOE, Op.L1_FUSED: _MOE, Op.MOE_BLOCK: _MOE,
    Op.ROUTER: _ROUTING, Op.DISPATCH: _ROUTING, Op.COMBINE: _ROUTING,
})
_RULE_OF_FMT = {"ue8m0": "ue8m0_ceil", "f32": "f32"}


@dataclass(frozen=True)
class VllmFp8Linear:
    """An FP8 block-128 linear as vLLM's block GEMM takes it: E4M3 weight [N, K], float32 block decode scales
    [ceil(N/128), ceil(K/128)], and the activation scale rule ("ue8m0_ceil" or "f32") its scales imply."""

    module: str
    weight_e4m3: Tensor
    block_dec_f32: Tensor
    scale_rule: str


class VllmBackend(Nvfp4EngineBackend):
    """vLLM's NVFP4 and FP8 block-128 dense kernels as a verify.backends.Backend (module docstring)."""

    name = "vllm"
    recipe = VLLM_RECIPE
    package = VLLM
    not_served = _NOT_SERVED
    fp8_u_acc = 2.0**-13
    fp8_promotion_interval = _FP8_GROUP

    def _devices_for(self, op: Op) -> tuple[tuple[int, ...], str]:
        """The FP8 block-128 ops (and prepare, dense_linear, which serve both formats) run on Hopper too."""
        if op in _FP8_OPS:
            return (9, 10, 12), "Hopper or Blackwell (FP8 block-128; its NVFP4 path needs Blackwell)"
        return self.majors, self.arch_words

    # ---------------------------------------------------------------- prepare
    def prepare_linear(self, lin: Linear) -> EngineNvfp4Weight | VllmFp8Linear:
        """NVFP4 (Blackwell) -> EngineNvfp4Weight; FP8 block-128 -> VllmFp8Linear (module docstring)."""
        if isinstance(lin, Fp8BlockLinear):
            if lin.weight_e4m3.dim() != 2:
                raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K] dense weight, got "
                                 f"{tuple(lin.weight_e4m3.shape)}")
            scales = lin.block_dec_scale_f32().to(torch.float32).contiguous()
            rule = _RULE_OF_FMT[fp8_act_scale_fmt(_Scales(scales))]
            return VllmFp8Linear(lin.module, lin.weight_e4m3.view(torch.float8_e4m3fn).contiguous(), scales, rule)
        w = lin.weight_u8 if hasattr(lin, "weight_u8") else None
        if w is not None and w.is_cuda and torch.cuda.get_device_capability(w.device)[0] not in self.majors:
            raise NotImplementedError(f"{self.name}: {lin.module} is NVFP4: cutlass_scaled_fp4_mm needs "
                                      f"{self.arch_words}")
        return super().prepare_linear(lin)

    def dequantize_prepared(self, prepared: object) -> Tensor:
        """NVFP4: adapters._engine's decode; FP8 block-128: the E4M3 weight times its float32 block scale,
        float32 [N, K]."""
        if not isinstance(prepared, VllmFp8Linear):
            return super().dequantize_prepared(prepared)
        n, k = prepared.weight_e4m3.shape
        scale = prepared.block_dec_f32.repeat_interleave(_FP8_GROUP, 0)[:n].repeat_interleave(_FP8_GROUP, 1)[:, :k]
        return prepared.weight_e4m3.to(torch.float32) * scale

    # ---------------------------------------------------------------- NVFP4 (adapters._engine)
    def _quantize_nvfp4(self, x_bf16: Tensor, global_enc_f32: Tensor) -> tuple[Tensor, Tensor]:
        from vllm import _custom_ops as ops  # noqa: PLC0415 (the optional package, lazily)

        packed, sf = ops.scaled_fp4_quant(x_bf16, global_enc_f32)
        return packed, sf

    def _gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_u8: Tensor, w: EngineNvfp4Weight, alpha_f32: Tensor) -> Tensor:
        from vllm import _custom_ops as ops  # noqa: PLC0415

        return ops.cutlass_scaled_fp4_mm(a_packed_u8, w.packed_u8, a_sf_u8.view(torch.float8_e4m3fn),
                                         w.sf_swizzled_u8.view(torch.float8_e4m3fn), alpha_f32, torch.bfloat16)

    # ---------------------------------------------------------------- FP8 block-128
    def _quantize_fp8_raw(self, x_bf16: Tensor, scale_rule: str) -> tuple[Tensor, Tensor]:
        from vllm.model_executor.layers.quantization.utils.fp8_utils import (  # noqa: PLC0415
            per_token_group_quant_fp8)

        if scale_rule not in FP8_SCALE_RULES:
            raise ValueError(f"scale_rule={scale_rule!r}: expected one of {FP8_SCALE_RULES}")
        if x_bf16.dtype != torch.bfloat16 or x_bf16.dim() != 2:
            raise ValueError(f"x_bf16: expected bf16 [M, K], got {x_bf16.dtype} {tuple(x_bf16.shape)}")
        return per_token_group_quant_fp8(x_bf16.contiguous(), _FP8_GROUP, use_ue8m0=scale_rule == "ue8m0_ceil")

    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct:
        """per_token_group_quant_fp8 (module docstring): E4M3 bytes [M, K], scales as UE8M0 bytes or float32."""
        q, s = self._quantize_fp8_raw(x_bf16, scale_rule)
        s = s.to(torch.float32)
        scale = f32_pow2_to_ue8m0_u8(s) if scale_rule == "ue8m0_ceil" else s
        return Fp8QuantizedAct(q.view(torch.uint8), scale, scale_rule)

    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        if isinstance(w, VllmFp8Linear):
            raise NotImplementedError(f"{self.name}: {w.module} is FP8 block-128: dense_gemm takes NVFP4 "
                                      "activations; its FP8 activations and GEMM run through dense_linear")
        return super().dense_gemm(a, w)

    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        if not isinstance(w, VllmFp8Linear):
            return super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        from vllm.model_executor.layers.quantization.utils.fp8_utils import (  # noqa: PLC0415
            w8a8_triton_block_scaled_mm)

        if input_dec_scale_f32 is not None:
            raise NotImplementedError(f"{self.name}: {w.module} is FP8 block-128 with dynamic per-token 1x128 "
                                      "activation scales; a static per-tensor FP8 input_scale is not served")
        q, s = self._quantize_fp8_raw(x_bf16, w.scale_rule)
        return w8a8_triton_block_scaled_mm(q, w.weight_e4m3, s, w.block_dec_f32, [_FP8_GROUP, _FP8_GROUP],
                                           torch.bfloat16)


@dataclass(frozen=True)
class _Scales:
    """What verify.checkpoint.fp8_act_scale_fmt reads: the float32 block decode scales."""

    block_dec_f32: Tensor
