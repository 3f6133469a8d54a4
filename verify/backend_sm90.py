"""The sm90 backend (kernels/sm90, Triton on Hopper) behind the backend protocol (verify.backend).

Served: prepare (its own host code: kernels.sm90.host_prepare), dense activation quantization
(static / dynamic, recipe te), the dense NVFP4 GEMM and the dense linear. The MoE ops (grouped
quantize and GEMM, SwiGLU + requant, router, dispatch, combine, the MoE block) are not in
kernels/sm90 yet: unsupported_reason says so, and the harness reports those stages as not
served by sm90.
"""

from __future__ import annotations

import torch
from torch import Tensor

from references.recipes import recipe_by_name
from references.stages import Op
from verify.backend import QuantizedAct
from verify.checkpoint import Linear, Nvfp4Linear

__all__ = ["Sm90Adapter"]

# the protocol's op -> the kernels/sm90 method whose availability decides it
_SERVED = {Op.PREPARE: "prepare_nvfp4_weight", Op.QUANTIZE: "quantize_act", Op.DENSE_GEMM: "gemm_act",
           Op.DENSE_LINEAR: "linear_nvfp4"}


class Sm90Adapter:
    def __init__(self) -> None:
        from kernels.sm90.backend import Sm90Backend  # noqa: PLC0415 (imports triton lazily itself)

        self._impl = Sm90Backend()
        self.name = self._impl.name
        self.recipe = recipe_by_name(self._impl.recipe_name)
        self.u_acc = float(self._impl.u_acc)

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        if op not in _SERVED:
            return f"sm90: {op.value} is not provided by kernels/sm90 (it has quantize, dense GEMM, dense linear)"
        return self._impl.unsupported_reason(_SERVED[op], device)

    def _refuse(self, op: Op):
        raise NotImplementedError(self.unsupported_reason(op, torch.device("cuda")) or f"sm90: {op.value}")

    # ---------------------------------------------------------------- served
    def prepare_linear(self, lin: Linear) -> object:
        if not isinstance(lin, Nvfp4Linear):
            raise NotImplementedError(f"sm90: {lin.module} is {lin.format}; the sm90 GEMM takes NVFP4 weights only")
        return self._impl.prepare_nvfp4_weight(lin.weight_u8, lin.weight_scale_e4m3, lin.weight_scale_2_f32)

    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        return QuantizedAct(*self._impl.quantize_act(x_bf16, input_dec_scale_f32))

    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        return self._impl.gemm_act(a.packed_u8, a.sf_swizzled_u8, a.global_dec_f32, w)

    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        return self._impl.linear_nvfp4(x_bf16, w, input_dec_scale_f32)

    def cache_clear(self) -> None:
        self._impl.cache_clear()

    # ---------------------------------------------------------------- not served (issue: Hopper MoE)
    def prepare_experts(self, experts):
        self._refuse(Op.GROUPED_GEMM)

    def prepare_router(self, router, spec):
        self._refuse(Op.ROUTER)

    def grouped_quantize(self, rows_bf16, offsets_i32, *, input_dec_scale_f32=None):
        self._refuse(Op.GROUPED_QUANTIZE)

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        self._refuse(Op.GROUPED_GEMM)

    def swiglu_requant(self, gate, up, offsets_i32, *, swiglu_limit, row_weight_f32=None, input_dec_scale_f32=None):
        self._refuse(Op.SWIGLU_REQUANT)

    def l1_fused(self, a, offsets_i32, experts, *, swiglu_limit, input_dec_scale_f32=None):
        self._refuse(Op.L1_FUSED)

    def router(self, x_bf16, router, *, token_ids_i64=None):
        self._refuse(Op.ROUTER)

    def dispatch(self, ids_i64, num_experts):
        self._refuse(Op.DISPATCH)

    def combine(self, y_rows_bf16, d, weights_f32):
        self._refuse(Op.COMBINE)

    def moe_block(self, x_bf16, router, experts, *, swiglu_limit, weight_placement, act_scale, token_ids_i64=None,
                  num_valid_tokens_i32=None):
        self._refuse(Op.MOE_BLOCK)
