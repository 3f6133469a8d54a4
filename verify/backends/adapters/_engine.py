"""The part the engine adapters (vllm, flashinfer, sgl-kernel) share: an NVFP4 W4A4 dense path built on an
engine's public quantizer and block-scaled GEMM, with the loader logic an engine's ModelOpt NVFP4 linear has.

A subclass names its package, the devices its kernels run on, its activation recipe, and two calls:
- `_quantize_nvfp4(x_bf16, global_enc_f32)` -> (packed E2M1 uint8 [M, K/2], E4M3 block scales in the 128x4 layout,
  uint8 [Mp, Cp]): the engine's quantizer with the encode scale S (2688/amax) it takes;
- `_gemm_nvfp4(a_packed_u8, a_sf_u8, w, alpha_f32)` -> bf16 [M, N]: the engine's NVFP4 x NVFP4 GEMM, alpha the
  product of the two global decode scales.
What this class adds, as an engine's loader does (NVFP4_FACTS 4): prepare keeps the checkpoint's packed weight
as it is and swizzles its linear E4M3 scales into the 128x4 layout (adapters._common, our own code); a static
activation scale is the checkpoint's input_scale D (the quantizer gets S = 1/D, float32; alpha = D x
weight_scale_2); a dynamic one is amax over x on the device (NaN ignored), S = 2688/amax guarded as TE does
(S = 1 when amax is 0 or S underflows; at most FLT_MAX), alpha = (1/S) x weight_scale_2. No host sync.
Everything else is "not served" with the reason each subclass gives (its MoE, FP8 and routing paths are not
adapted here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from verify.backends.protocol import Op
from verify.backends.adapters import _common
from verify.backends.adapters._common import (Package, cuda_device_problem, package_problem, package_version,
                                              sf_linear_to_swizzled_128x4_u8)
from verify.backends.base import Backend
from verify.backends.protocol import QuantizedAct
from verify.checkpoint import Linear, Nvfp4Linear

__all__ = ["EngineNvfp4Weight", "Nvfp4EngineBackend", "global_enc_from_amax"]

_FP4_X_FP8_MAX = 2688.0           # 6 x 448
_FLT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class EngineNvfp4Weight:
    """A dense NVFP4 linear as the engines' GEMMs take it: packed E2M1 [N, K/2] (the checkpoint's bytes), E4M3
    scales in the 128x4 layout [Np, Cp] (uint8), weight_scale_2 float32 [1]."""

    module: str
    packed_u8: Tensor
    sf_swizzled_u8: Tensor
    weight_scale_2_f32: Tensor

    @property
    def n(self) -> int:
        return self.packed_u8.shape[0]

    @property
    def k(self) -> int:
        return 2 * self.packed_u8.shape[1]


def global_enc_from_amax(amax_f32: Tensor) -> Tensor:
    """S = 2688/amax in float32, at most FLT_MAX, and 1.0 where amax is 0 or S is 0 (TransformerEngine's guard)."""
    amax_f32 = amax_f32.to(torch.float32)
    # tensor / tensor: a Python scalar divided by a tensor is computed as reciprocal x scalar (two roundings)
    s = torch.clamp(torch.full_like(amax_f32, _FP4_X_FP8_MAX) / amax_f32, max=_FLT_MAX)
    return torch.where((amax_f32 == 0) | (s == 0), torch.ones_like(s), s)


class Nvfp4EngineBackend(Backend):
    """The shared NVFP4 W4A4 dense path of the engine adapters (module docstring)."""

    package: Package
    majors: tuple[int, ...] = (10, 12)
    arch_words: str = "Blackwell (sm100 / sm120: NVFP4 x NVFP4 block-scaled MMA)"
    accumulator = "fp32 (block-scaled tensor-core MMA, fp32 accumulate: the engine's CUTLASS kernel)"

    def __init__(self) -> None:
        self.version = package_version(self.package)

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        why = super().unsupported_reason(op, device)
        if why:
            return why
        problem = package_problem(self.package)
        if problem:
            return f"{self.name}: {problem}"
        majors, arch_words = self._devices_for(op)
        return cuda_device_problem(self.name, device, majors=majors, arch_words=arch_words)

    def _devices_for(self, op: Op) -> tuple[tuple[int, ...], str]:
        """(compute capability majors, their description) on which `op` runs: self.majors for every op here."""
        return self.majors, self.arch_words

    # ---------------------------------------------------------------- what a subclass provides
    def _quantize_nvfp4(self, x_bf16: Tensor, global_enc_f32: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_u8: Tensor, w: EngineNvfp4Weight, alpha_f32: Tensor) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- ops
    def prepare_linear(self, lin: Linear) -> EngineNvfp4Weight:
        if not isinstance(lin, Nvfp4Linear):
            raise NotImplementedError(f"{self.name}: {lin.module} is {lin.format}; this adapter serves NVFP4 dense "
                                      "linears only")
        if lin.weight_u8.dim() != 2:
            raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K/2] dense weight, got "
                             f"{tuple(lin.weight_u8.shape)}")
        return EngineNvfp4Weight(lin.module, lin.weight_u8.contiguous(),
                                 sf_linear_to_swizzled_128x4_u8(lin.weight_scale_e4m3.view(torch.uint8)),
                                 lin.weight_scale_2_f32.to(torch.float32).reshape(1))

    def dequantize_prepared(self, prepared: object) -> Tensor:
        """An EngineNvfp4Weight -> float32 [N, K] in checkpoint layout: its packed codes decoded, times the E4M3
        scales read back from the 128x4 buffer prepare swizzled (adapters._common), times weight_scale_2."""
        w = _as_weight(prepared, self.name)
        values = _common.nvfp4_act_to_bf16(w.packed_u8, w.sf_swizzled_u8).to(torch.float32)
        return values * w.weight_scale_2_f32.reshape(())

    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """The engine's quantizer with S = 1/D (static) or 2688/amax (dynamic); global_dec_f32 = D or 1/S."""
        if x_bf16.dtype != torch.bfloat16 or x_bf16.dim() != 2:
            raise ValueError(f"x_bf16: expected bf16 [M, K], got {x_bf16.dtype} {tuple(x_bf16.shape)}")
        if input_dec_scale_f32 is not None:
            dec = input_dec_scale_f32.to(torch.float32).reshape(1)
            enc = torch.reciprocal(dec)
        else:
            amax = torch.nan_to_num(x_bf16.abs(), nan=0.0).amax().to(torch.float32).reshape(1)
            enc = global_enc_from_amax(amax)
            dec = torch.reciprocal(enc)
        packed, sf = self._quantize_nvfp4(x_bf16.contiguous(), enc)
        return QuantizedAct(packed.view(torch.uint8), sf.view(torch.uint8), dec)

    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        w = _as_weight(w, self.name)
        alpha = a.global_dec_f32.to(torch.float32).reshape(1) * w.weight_scale_2_f32
        return self._gemm_nvfp4(a.packed_u8, a.sf_swizzled_u8, w, alpha)

    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        return self.dense_gemm(self.quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32), w)


def _as_weight(w: object, name: str) -> EngineNvfp4Weight:
    if not isinstance(w, EngineNvfp4Weight):
        raise TypeError(f"w: expected what {name}.prepare_linear returns, got {type(w).__name__}")
    return w
