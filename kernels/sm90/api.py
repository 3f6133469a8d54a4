"""The sm90 backend: Hopper NVFP4 and FP8 block-scaled kernels (Triton) behind one object for the harness.

verify/backends/ adapts this plain class to the suite's Backend protocol; nothing here
imports references/ or verify/. Triton is imported only when a kernel is compiled.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from kernels.sm90 import (amax_global_enc_scale, fp8_linear, gemm_fp8_block, gemm_nvfp4, quantize_fp8_1x128,
                          quantize_nvfp4_1x16)
from kernels.sm90.host_prepare import Sm90Nvfp4Weight, prepare_nvfp4_weight

__all__ = ["Sm90Kernels", "OPS"]

OPS = ("quantize_nvfp4", "quantize_nvfp4_static", "quantize_nvfp4_dynamic", "amax_global_enc_scale", "gemm_nvfp4",
       "quantize_act", "gemm_act", "linear_nvfp4", "prepare_nvfp4_weight",
       # the MoE block (kernels.sm90.moe_*, quantize_grouped, swiglu_requant, grouped_gemm_nvfp4)
       "prepare_moe_experts", "prepare_moe_router", "grouped_quantize", "grouped_gemm", "grouped_gemm_l1",
       "swiglu_requant", "l1_swiglu_requant", "router", "dispatch", "combine", "moe_block",
       # FP8 block-scaled linears (kernels.sm90.fp8_linear, quantize_fp8_1x128, gemm_fp8_block)
       "prepare_fp8_weight", "quantize_act_fp8", "gemm_fp8", "linear_fp8")


class Sm90Kernels:
    """NVFP4 on Hopper: `te` activation quantizer (byte-exact), dense W4A4 GEMM, and the MoE block
    (router, dispatch, grouped quantize, grouped GEMM + L1 epilogues, SwiGLU + requant, combine, the
    whole block as one capturable call: kernels.sm90.moe_block). FP8 block-scaled linears (DeepSeek's
    attention and shared-expert linears): per-token 1x128 E4M3 activation quantization and the
    128x128 block-scaled GEMM (kernels.sm90.fp8_linear; NOTES_FP8.md).

    recipe_name: the quantizer's recipe ("te", references.recipes.TE).
    u_acc: unit roundoff of the GEMM accumulator: fp16 wgmma with fp32 accumulation,
        declared 2**-24 (true fp32) and checked on the H200 by the bound tests
        (verify/tests/test_sm90_gemm.py); if a future measurement shows fewer bits, this
        is the number to change, never a test tolerance.
    fp8_u_acc, fp8_promotion_interval: the FP8 GEMM's accumulator (kernels.sm90.gemm_fp8_block): the
        FP8 wgmma keeps about 14 bits inside one 128-K group (truncation assumed: U_ACC = 2**-13), and
        each group's sum is promoted to float32 at once (PROMOTION_INTERVAL = 128 of K). The FP8 bound
        (references.fp8_gemm.fp8_block_gemm_error_bound) must be told these, not u_acc.
    """

    name = "sm90"
    recipe_name = "te"
    u_acc = 2.0**-24
    accumulator = "fp32 (fp16 wgmma, fp32 accumulate)"
    fp8_u_acc = gemm_fp8_block.U_ACC
    fp8_promotion_interval = gemm_fp8_block.PROMOTION_INTERVAL
    fp8_accumulator = gemm_fp8_block.ACCUMULATOR

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

    # ---------------------------------------------------------------- FP8 block-scaled linears (issue 23)

    prepare_fp8_weight = staticmethod(fp8_linear.prepare_fp8_weight)

    @staticmethod
    def quantize_act_fp8(x_bf16: Tensor, *, scale_rule: str, encode_rule: str = "divide", amax_nan: str = "propagate",
                         amax_floor_f32: float = 1e-4) -> tuple[Tensor, Tensor]:
        """x [M, K] -> (E4M3 codes u8 [M, K], decode scales [M, ceil(K/128)]: UE8M0 bytes for scale_rule
        "ue8m0_ceil", float32 for "f32"), per token in 1x128 groups (quantize_fp8_1x128). No host sync."""
        return quantize_fp8_1x128.launch(x_bf16, scale_rule=scale_rule, encode_rule=encode_rule, amax_nan=amax_nan,
                                         amax_floor_f32=amax_floor_f32)

    @staticmethod
    def gemm_fp8(a_u8: Tensor, a_scale: Tensor, weight: fp8_linear.Sm90Fp8Weight) -> Tensor:
        """bf16 [M, N] = (codes x 1x128 scales) @ (weight codes x 128x128 float32 scales)^T (gemm_fp8_block)."""
        return gemm_fp8_block.launch(a_u8, a_scale, weight.e4m3_u8, weight.block_dec_f32)

    @staticmethod
    def linear_fp8(x_bf16: Tensor, weight: fp8_linear.Sm90Fp8Weight, *, scale_rule: str, encode_rule: str = "divide",
                   amax_nan: str = "propagate", amax_floor_f32: float = 1e-4) -> Tensor:
        """quantize_act_fp8 + gemm_fp8: one FP8 block-scaled linear -> bf16 [M, N], graph-capturable."""
        y, _, _ = fp8_linear.linear_fp8(x_bf16, weight, scale_rule=scale_rule, encode_rule=encode_rule,
                                        amax_nan=amax_nan, amax_floor_f32=amax_floor_f32)
        return y

    # ---------------------------------------------------------------- the MoE block (issue 13)

    @staticmethod
    def prepare_moe_experts(w1: tuple, w3: tuple, w2: tuple):
        """Checkpoint expert stacks (weight_u8, weight_scale_e4m3, weight_scale_2_f32, input_scale_f32 | None)
        -> moe_block.MoeExperts (host, once per layer)."""
        from kernels.sm90 import moe_block  # noqa: PLC0415

        return moe_block.prepare_moe_experts(w1, w3, w2)

    @staticmethod
    def prepare_moe_router(gate_weight_bf16: Tensor, bias_f32: Tensor | None, tid2eid: Tensor | None, **spec):
        """-> moe_block.MoeRouter; NotImplementedError naming what moe_router lacks."""
        from kernels.sm90 import moe_block  # noqa: PLC0415

        return moe_block.prepare_router(gate_weight_bf16, bias_f32, tid2eid, **spec)

    @staticmethod
    def grouped_quantize(rows_bf16: Tensor, offsets_i32: Tensor,
                         input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Expert-sorted rows -> (packed [R, K/2], grouped swizzled scales, global_dec [E]) (quantize_grouped)."""
        from kernels.sm90 import quantize_grouped  # noqa: PLC0415

        return quantize_grouped.launch(rows_bf16, offsets_i32, input_dec_scale_f32=input_dec_scale_f32)

    @staticmethod
    def grouped_gemm(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor, w) -> Tensor:
        from kernels.sm90 import grouped_gemm_nvfp4  # noqa: PLC0415

        return grouped_gemm_nvfp4.grouped_gemm(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w)

    @staticmethod
    def grouped_gemm_l1(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor,
                        w13) -> tuple[Tensor, Tensor]:
        from kernels.sm90 import grouped_gemm_nvfp4  # noqa: PLC0415

        return grouped_gemm_nvfp4.grouped_gemm_l1(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13)

    @staticmethod
    def l1_swiglu_requant(a_packed_u8: Tensor, a_sf_u8: Tensor, a_dec_f32: Tensor, offsets_i32: Tensor, w13, *,
                          swiglu_limit: float | None, h_input_dec_scale_f32: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from kernels.sm90 import grouped_gemm_nvfp4  # noqa: PLC0415

        return grouped_gemm_nvfp4.grouped_l1_swiglu_requant(a_packed_u8, a_sf_u8, a_dec_f32, offsets_i32, w13,
                                                            swiglu_limit=swiglu_limit,
                                                            h_input_dec_scale_f32=h_input_dec_scale_f32)

    @staticmethod
    def swiglu_requant(gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
                       row_weight_f32: Tensor | None = None, input_dec_scale_f32: Tensor | None = None):
        """-> (h bf16, (packed, grouped swizzled scales, global_dec [E])) (swiglu_requant)."""
        from kernels.sm90 import swiglu_requant  # noqa: PLC0415

        return swiglu_requant.launch(gate, up, offsets_i32, swiglu_limit=swiglu_limit, row_weight_f32=row_weight_f32,
                                     input_dec_scale_f32=input_dec_scale_f32)

    @staticmethod
    def router(x_bf16: Tensor, router, token_ids_i64: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (ids int64 [T, k], weights float32 [T, k]) (moe_router)."""
        from kernels.sm90 import moe_block  # noqa: PLC0415

        return moe_block.route(x_bf16, router, token_ids_i64)

    @staticmethod
    def dispatch(ids: Tensor, num_experts: int, num_valid_tokens_i32: Tensor | None = None):
        """-> moe_dispatch.Dispatch (stable expert-sorted rows, device offsets)."""
        from kernels.sm90 import moe_dispatch  # noqa: PLC0415

        return moe_dispatch.dispatch(ids, num_experts, num_valid_tokens_i32=num_valid_tokens_i32)

    @staticmethod
    def combine(y_rows_bf16: Tensor, row_token_i64: Tensor, row_slot_i64: Tensor, weights_f32: Tensor | None, *,
                num_tokens: int, top_k: int) -> Tensor:
        """Expert-sorted rows -> bf16 [T, H], weighted sum per token in slot order (moe_dispatch.combine)."""
        from kernels.sm90 import moe_dispatch  # noqa: PLC0415

        rop = moe_dispatch.row_of_pair_from_rows(row_token_i64, row_slot_i64, top_k)
        return moe_dispatch.combine(y_rows_bf16, rop, weights_f32, num_tokens=num_tokens, top_k=top_k)

    @staticmethod
    def moe_block(x_bf16: Tensor, router, experts, **kw) -> Tensor:
        """The whole routed MoE block, one capturable call (moe_block.launch)."""
        from kernels.sm90 import moe_block  # noqa: PLC0415

        return moe_block.launch(x_bf16, router, experts, **kw)

    def cache_clear(self) -> None:
        """Forget compiled launchers (tests' fresh-cache fixture)."""
        quantize_nvfp4_1x16._compile.cache_clear()
        amax_global_enc_scale._compile.cache_clear()
        gemm_nvfp4._compile.cache_clear()
        quantize_fp8_1x128._compile.cache_clear()
        gemm_fp8_block._compile.cache_clear()
        gemm_fp8_block._LAST_COMPILED.clear()
        import sys  # noqa: PLC0415 (only the MoE modules already imported)

        for mod, fns in (("kernels.sm90.quantize_grouped", ("_compile", "_compile_amax")),
                         ("kernels.sm90.swiglu_requant", ("_compile",)), ("kernels.sm90.moe_router", ("_compile",)),
                         ("kernels.sm90.moe_dispatch", ("_compile_dispatch", "_compile_combine")),
                         ("kernels.sm90.grouped_gemm_nvfp4", ("_compile", "_compile_wgmma"))):
            m = sys.modules.get(mod)
            for fn in fns if m is not None else ():
                getattr(m, fn).cache_clear()
