"""The sm100 backend: Blackwell NVFP4 and FP8 block-scaled kernels (CuTe DSL) behind one object for the harness.

verify/backends/sm100.py adapts this plain class to the suite's Backend protocol; the op
names here are this class's own method names (OPS), and nothing here imports references/
or verify/. cutlass is imported only when a kernel compiles.

CUDA graphs with a changing token count: every forward op takes an optional
`num_valid_rows_i32` / `num_valid_tokens_i32`, an int32 [1] tensor on the device that
the caller mutates in place before replay. Buffers keep the captured (maximum) number
of rows; the kernels read the count at run time and write zeros for rows past it;
the MoE path drops the routing of tokens past it (moe_routing). Nothing reads it on
the host, so eager, capture and replay launch the same kernels with the same shapes.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from kernels.sm100 import gemm_fp8_blockscaled as gemm_fp8
from kernels.sm100 import gemm_nvfp4_blockscaled as gemm
from kernels.sm100 import host_bridge, host_bridge_fp8, moe_routing
from kernels.sm100 import quantize_fp8_1x128 as quant_fp8
from kernels.sm100 import quantize_nvfp4_1x16 as quant

__all__ = ["Sm100Kernels", "OPS", "HOST_OPS", "TORCH_OPS", "KERNEL_OPS"]

# The methods below, by what they need: host code (torch only, any device), torch ops on a
# CUDA device (routing, permutation, combine), and CuTe DSL kernels (cutlass and a B200).
HOST_OPS = ("prepare_nvfp4_weight", "prepare_gate_up_weight", "prepare_fp8_block_weight")
TORCH_OPS = ("router", "permute", "combine")
KERNEL_OPS = (
    "quantize_nvfp4", "quantize_nvfp4_dynamic", "quantize_nvfp4_static", "gemm_nvfp4",
    "grouped_gemm_nvfp4", "grouped_gemm_swiglu", "grouped_gemm_swiglu_nvfp4", "linear_nvfp4", "moe_experts",
    "quantize_fp8_1x128", "gemm_fp8", "linear_fp8",
)
OPS = HOST_OPS + TORCH_OPS + KERNEL_OPS


@functools.lru_cache(maxsize=8)
def _ones_f32(device_str: str) -> Tensor:
    """A [1] float32 1.0 per device, allocated once (the B decode scale when alpha is passed whole)."""
    return torch.ones(1, dtype=torch.float32, device=device_str)


def _act_dec_scale(input_dec_scale_f32: Tensor | None, global_enc_scale_f32: Tensor) -> Tensor:
    """The activation decode multiplier for alpha: a static input_scale as given (alpha =
    input_scale * weight_scale_2, as checkpoint loaders form it; 1/(1/D) can differ by an ulp),
    else 1/S of the dynamic encode scale."""
    if input_dec_scale_f32 is not None:
        return input_dec_scale_f32.reshape(1).to(torch.float32)
    return torch.reciprocal(global_enc_scale_f32)


class Sm100Kernels:
    """NVFP4 and FP8 block-128 linears on Blackwell (B200/GB200, sm_100a) with tcgen05 block-scaled MMA.

    recipe_name: the activation quantizer's recipe ("te", references.recipes.TE).
    u_acc: unit roundoff declared for the GEMM accumulator: tcgen05.mma kind::mxf4nvf4
        accumulates in fp32 in tensor memory; declared 2**-24 and to be confirmed on a
        B200 by the exact-arithmetic and bound tests (verify/tests/test_sm100_kernels.py).
        If a measurement shows fewer bits this number changes, never a test tolerance.
    gate_up_granularity: the w1|w3 interleave the SwiGLU GEMM needs (rows of N).
    fp8_u_acc, fp8_promotion_interval: the FP8 block-scaled GEMM's accumulator (gemm_fp8_blockscaled):
        tcgen05.mma kind::mxf8f6f4 applies the UE8M0 scales inside the MMA and accumulates into the fp32
        tensor-memory accumulator from the first K block to the last, so the design implies u = 2**-24 and
        no separate promotion step (None: all of K in one accumulator). NOT MEASURED: what the MMA keeps
        inside one instruction has not been read on a B200; `python -m verify accumulator --backend sm100`
        there measures it and refuses this declaration if the hardware keeps less (Hopper's FP8 MMA keeps
        about 14 bits). fp8_accumulator_measured stays False until that run is recorded.
    fp8_act_recipe: the FP8 1x128 activation quantizer's recipe (quantize_fp8_1x128: UE8M0 scales rounded
        up, the only one tcgen05's UE8M0 scale operand can take exactly).
    """

    name = "sm100"
    recipe_name = "te"
    u_acc = 2.0**-24
    accumulator = "fp32 (tcgen05.mma kind::mxf4nvf4 block_scale, tensor memory)"
    fp8_u_acc = gemm_fp8.ACCUMULATOR_U
    fp8_promotion_interval = None
    fp8_accumulator = ("fp32 tensor memory over all K (tcgen05.mma kind::mxf8f6f4 block_scale; declared from the "
                       "design, unmeasured: `python -m verify accumulator --backend sm100` on a B200)")
    fp8_accumulator_measured = False
    fp8_act_recipe = "fp8_ue8m0"
    gate_up_granularity = host_bridge.GATE_UP_GRANULARITY

    def unsupported_reason(self, op: str, device: torch.device | str | None = None) -> str | None:
        """None when `op` (one of OPS, the method names of this class) can run on `device`, else a
        sentence saying why not. Host preparation runs anywhere; the routing ops need a CUDA device;
        the kernels need nvidia-cutlass-dsl and compute capability 10.x."""
        if op not in OPS:
            return f"sm100: op {op!r} is not provided (has {', '.join(OPS)})"
        if op in HOST_OPS:
            return None
        if op in TORCH_OPS:
            return None if torch.cuda.is_available() else "sm100: no CUDA device"
        if importlib.util.find_spec("cutlass") is None:
            return "sm100: nvidia-cutlass-dsl is not installed"
        if not torch.cuda.is_available():
            return "sm100: no CUDA device"
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda":
            return f"sm100: needs a CUDA device, got {dev}"
        major, minor = torch.cuda.get_device_capability(dev)
        if major != 10:
            return f"sm100: needs compute capability 10.x (B200/GB200), this is sm_{major}{minor}"
        return None

    # ---------------------------------------------------------------- prepare (host, any device)

    def prepare_nvfp4_weight(self, weight_u8: Tensor, weight_scale_e4m3: Tensor,
                             weight_scale_2_f32: Tensor) -> host_bridge.Sm100Nvfp4Weight:
        """Checkpoint bytes of one linear [N, K/2] or of stacked experts [E, N, K/2] -> kernel operands
        (host_bridge.prepare_nvfp4_weight: K-major packed, 128x4 swizzled scales, [L] decode scales)."""
        return host_bridge.prepare_nvfp4_weight(weight_u8, weight_scale_e4m3, weight_scale_2_f32)

    def prepare_gate_up_weight(self, w1_u8: Tensor, w1_scale_e4m3: Tensor, w1_scale_2_f32: Tensor,
                               w3_u8: Tensor, w3_scale_e4m3: Tensor,
                               w3_scale_2_f32: Tensor) -> host_bridge.Sm100Nvfp4Weight:
        """w1 (gate) and w3 (up) stacks [E, I, K/2] -> the w1|w3 operand of the SwiGLU GEMM, interleaved
        along N with gate_up_granularity (host_bridge.prepare_gate_up_weight)."""
        return host_bridge.prepare_gate_up_weight(w1_u8, w1_scale_e4m3, w1_scale_2_f32, w3_u8, w3_scale_e4m3,
                                                  w3_scale_2_f32, granularity=self.gate_up_granularity)

    def prepare_fp8_block_weight(self, weight_e4m3: Tensor, scale_e8m0: Tensor) -> host_bridge_fp8.Sm100Fp8BlockWeight:
        """One FP8 block-128 linear's checkpoint bytes (E4M3 [N, K], UE8M0 [ceil(N/128), ceil(K/128)]) -> the
        GEMM's operands (host_bridge_fp8.prepare_fp8_block_weight: E4M3 bytes K-major, per-32 128x4 swizzled
        scales). Load time: refuses NaN bytes naming the tensor."""
        return host_bridge_fp8.prepare_fp8_block_weight(weight_e4m3, scale_e8m0)

    # ---------------------------------------------------------------- quantize

    def quantize_nvfp4(self, x_bf16: Tensor, global_enc_scale_f32: Tensor, *,
                       num_valid_rows_i32: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """bf16 [M, K] -> (packed_u8 [M, K/2], sf_swizzled_u8 [Mp, Cp]), recipe te, given S.

        Rows >= num_valid_rows_i32 (int32 [1] on the device) come out as zero bytes.
        """
        packed, sf, _ = quant.launch(x_bf16, global_enc_scale_f32=global_enc_scale_f32.reshape(1),
                                     num_valid_rows_i32=num_valid_rows_i32)
        return packed, sf

    def quantize_nvfp4_dynamic(self, x_bf16: Tensor, *,
                               num_valid_rows_i32: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """S = 2688/amax(x) on the device (over the valid rows), then quantize: (packed_u8, sf_swizzled_u8, S [1])."""
        return quant.launch(x_bf16, num_valid_rows_i32=num_valid_rows_i32)

    def quantize_nvfp4_static(self, x_bf16: Tensor, input_dec_scale_f32: Tensor, *,
                              num_valid_rows_i32: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Checkpoint input_scale D (amax/2688): S = 1/D on the device, then quantize."""
        return quant.launch(x_bf16, input_dec_scale_f32=input_dec_scale_f32, num_valid_rows_i32=num_valid_rows_i32)

    # ---------------------------------------------------------------- GEMMs

    def gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, b_packed_u8: Tensor,
                   b_sf_swizzled_u8: Tensor, alpha_f32: Tensor, *,
                   num_valid_rows_i32: Tensor | None = None) -> Tensor:
        """bf16 [M, N] = alpha * A @ B^T (A [M, K], B [N, K] NVFP4, 128x4 swizzled scales).

        Rows >= num_valid_rows_i32 (int32 [1] on the device) are zero; their tiles do no MMA.
        """
        if b_packed_u8.dim() != 2 or b_sf_swizzled_u8.dim() != 2:
            raise ValueError(f"b_packed_u8 {tuple(b_packed_u8.shape)} / b_sf_swizzled_u8 "
                             f"{tuple(b_sf_swizzled_u8.shape)}: expected [N, K/2] and [Np, Cp]")
        ones = _ones_f32(str(a_packed_u8.device))
        weight = host_bridge.Sm100Nvfp4Weight(b_packed_u8.unsqueeze(0), b_sf_swizzled_u8.unsqueeze(0), ones)
        return gemm.launch_dense(a_packed_u8, a_sf_swizzled_u8, alpha_f32.reshape(1), weight,
                                 num_valid_rows_i32=num_valid_rows_i32)

    def linear_nvfp4(self, x_bf16: Tensor, weight: host_bridge.Sm100Nvfp4Weight, *,
                     input_dec_scale_f32: Tensor | None = None,
                     num_valid_rows_i32: Tensor | None = None) -> Tensor:
        """The dense path of one NVFP4 linear: quantize x (static scale if given, else dynamic
        over the valid rows), then the dense GEMM -> bf16 [M, N]; rows >= n are zero."""
        a, a_sf, s = quant.launch(x_bf16, input_dec_scale_f32=input_dec_scale_f32,
                                  num_valid_rows_i32=num_valid_rows_i32)
        return gemm.launch_dense(a, a_sf, _act_dec_scale(input_dec_scale_f32, s), weight,
                                 num_valid_rows_i32=num_valid_rows_i32)

    def grouped_gemm_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, a_dec_scale_f32: Tensor,
                           weight: host_bridge.Sm100Nvfp4Weight, tile_expert_i32: Tensor, *,
                           num_valid_rows_i32: Tensor | None = None) -> Tensor:
        """Padded-per-expert rows [R, K/2] x experts [E, N, K/2] -> bf16 [R, N]."""
        return gemm.launch_grouped(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32.reshape(1), weight, tile_expert_i32,
                                   num_valid_rows_i32=num_valid_rows_i32)

    def grouped_gemm_swiglu(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, a_dec_scale_f32: Tensor,
                            weight: host_bridge.Sm100Nvfp4Weight, tile_expert_i32: Tensor,
                            swiglu_limit: float, *, num_valid_rows_i32: Tensor | None = None) -> Tensor:
        """L1 with the clamped SwiGLU epilogue -> bf16 [R, N/2] (weight from prepare_gate_up_weight)."""
        return gemm.launch_grouped(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32.reshape(1), weight,
                                   tile_expert_i32, swiglu_limit=swiglu_limit, num_valid_rows_i32=num_valid_rows_i32)

    def grouped_gemm_swiglu_nvfp4(self, a_packed_u8: Tensor, a_sf_swizzled_u8: Tensor, a_dec_scale_f32: Tensor,
                                  weight: host_bridge.Sm100Nvfp4Weight, tile_expert_i32: Tensor,
                                  swiglu_limit: float, h_global_enc_scale_f32: Tensor, *,
                                  num_valid_rows_i32: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """L1 + SwiGLU with h written as NVFP4 for L2 (recipe te, global encode scale S [1] on the
        device, static): (packed_u8 [R, N/4], sf_swizzled_u8 [R, round_up(N/32, 4)]), the bytes
        quantize_nvfp4 gives for the bf16 h and S; rows past the valid count and tiles marked -1 are zero."""
        return gemm.launch_grouped(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32.reshape(1), weight,
                                   tile_expert_i32, swiglu_limit=swiglu_limit, num_valid_rows_i32=num_valid_rows_i32,
                                   h_global_enc_scale_f32=h_global_enc_scale_f32)

    # ---------------------------------------------------------------- FP8 block-scaled linears

    def quantize_fp8_1x128(self, x_bf16: Tensor, *,
                           num_valid_rows_i32: Tensor | None = None) -> host_bridge_fp8.Fp8ActSm100:
        """bf16 [M, K] -> E4M3 [M, K], UE8M0 scale bytes [M, ceil(K/128)] and the same bytes in the MMA's
        per-32 swizzle (quantize_fp8_1x128, recipe fp8_ue8m0); rows >= n are zero. Graph-safe."""
        return quant_fp8.launch(x_bf16, recipe=self.fp8_act_recipe, num_valid_rows_i32=num_valid_rows_i32)

    def gemm_fp8(self, act: host_bridge_fp8.Fp8ActSm100, weight: host_bridge_fp8.Sm100Fp8BlockWeight, *,
                 num_valid_rows_i32: Tensor | None = None) -> Tensor:
        """bf16 [M, N] = (A * SFA) @ (W * SFW)^T (gemm_fp8_blockscaled, the key select_config(N) picks)."""
        return gemm_fp8.launch(act.e4m3_u8, act.sf_swizzled_u8, weight, num_valid_rows_i32=num_valid_rows_i32)

    def linear_fp8(self, x_bf16: Tensor, weight: host_bridge_fp8.Sm100Fp8BlockWeight, *,
                   num_valid_rows_i32: Tensor | None = None) -> Tensor:
        """One FP8 block-128 linear: dynamic per-token 1x128 quantization of x, then the block-scaled GEMM
        -> bf16 [M, N]. No host sync, no host->device copy; compiles on a key's first call (warm up eagerly
        before any graph capture)."""
        act = self.quantize_fp8_1x128(x_bf16, num_valid_rows_i32=num_valid_rows_i32)
        return self.gemm_fp8(act, weight, num_valid_rows_i32=num_valid_rows_i32)

    # ---------------------------------------------------------------- routing

    def router(self, x_bf16: Tensor, gate_weight_bf16: Tensor, *, top_k: int, routed_scaling_factor: float,
               bias_f32: Tensor | None = None, tid2eid_i64: Tensor | None = None,
               token_ids_i64: Tensor | None = None,
               num_valid_tokens_i32: Tensor | None = None) -> moe_routing.Routing:
        logits = moe_routing.router_logits_f32(x_bf16, gate_weight_bf16)
        return moe_routing.route(logits, top_k=top_k, routed_scaling_factor=routed_scaling_factor,
                                 bias_f32=bias_f32, tid2eid_i64=tid2eid_i64, token_ids_i64=token_ids_i64,
                                 num_valid_tokens_i32=num_valid_tokens_i32)

    def permute(self, ids_i64: Tensor, num_experts: int, *,
                num_valid_tokens_i32: Tensor | None = None) -> moe_routing.Permutation:
        """[T, k] expert ids -> the padded-per-expert row of every (token, slot) pair, stable (moe_routing.permute)."""
        return moe_routing.permute(ids_i64, num_experts, num_valid_tokens_i32)

    def combine(self, expert_out_bf16: Tensor, perm: moe_routing.Permutation, weights_f32: Tensor) -> Tensor:
        return moe_routing.combine_bf16(expert_out_bf16, perm, weights_f32)

    def moe_experts(self, x_bf16: Tensor, routing: moe_routing.Routing, w13: host_bridge.Sm100Nvfp4Weight,
                    w2: host_bridge.Sm100Nvfp4Weight, *, swiglu_limit: float,
                    l1_input_dec_scale_f32: Tensor | None = None,
                    l2_input_dec_scale_f32: Tensor | None = None,
                    num_valid_tokens_i32: Tensor | None = None,
                    fuse_l2_quant: bool = False) -> Tensor:
        """Routed experts of one MoE layer: permute, quantize, L1+SwiGLU, requantize, L2, combine.

        Static activation scales when the checkpoint's input_scale tensors are given,
        dynamic (amax on the device) otherwise. No host sync anywhere.
        num_valid_tokens_i32: optional int32 [1] on the device, n <= T: tokens t >= n reach
        no expert and their output rows are zero; the valid tokens' bytes equal those of
        a call on the first n tokens alone. The quantizers and GEMMs stop at the padded
        row total of the real experts (perm.valid_rows_i32), read on the device.
        fuse_l2_quant (needs the static l2_input_dec_scale_f32): the L1 SwiGLU epilogue writes
        h as NVFP4 directly (grouped_swiglu_nvfp4), skipping the bf16 h and its requantization;
        the same bytes by construction. Opt-in until confirmed on a B200.
        """
        num_experts = w13.num_batches
        perm = moe_routing.permute(routing.ids_i64, num_experts, num_valid_tokens_i32)
        rows = perm.valid_rows_i32
        xp = moe_routing.gather_rows_bf16(x_bf16, perm, routing.ids_i64.shape[1])
        a, a_sf, s1 = quant.launch(xp, input_dec_scale_f32=l1_input_dec_scale_f32, num_valid_rows_i32=rows)
        if fuse_l2_quant:
            if l2_input_dec_scale_f32 is None:
                raise ValueError("fuse_l2_quant: needs the static l2_input_dec_scale_f32 (a dynamic amax of h "
                                 "cannot be known inside the L1 epilogue)")
            s2 = torch.reciprocal(l2_input_dec_scale_f32.reshape(1))  # as quant.launch forms S from input_scale
            a2, a2_sf = self.grouped_gemm_swiglu_nvfp4(a, a_sf, _act_dec_scale(l1_input_dec_scale_f32, s1), w13,
                                                       perm.tile_expert_i32, swiglu_limit, s2,
                                                       num_valid_rows_i32=rows)
        else:
            h = self.grouped_gemm_swiglu(a, a_sf, _act_dec_scale(l1_input_dec_scale_f32, s1), w13,
                                         perm.tile_expert_i32, swiglu_limit,
                                         num_valid_rows_i32=rows)
            a2, a2_sf, s2 = quant.launch(h, input_dec_scale_f32=l2_input_dec_scale_f32, num_valid_rows_i32=rows)
        y = self.grouped_gemm_nvfp4(a2, a2_sf, _act_dec_scale(l2_input_dec_scale_f32, s2), w2, perm.tile_expert_i32,
                                    num_valid_rows_i32=rows)
        return self.combine(y, perm, routing.weights_f32)

    def recording_launches(self):
        """Provenance: a context manager yielding a list of (kernel name, compile arch) of every CuTe DSL kernel
        launched inside it (kernels.sm100._launch.recording_launches)."""
        from kernels.sm100._launch import recording_launches

        return recording_launches()

    def cache_clear(self) -> None:
        """Forget compiled kernels (tests' fresh-cache fixture)."""
        gemm._compile.cache_clear()
        quant._compile.cache_clear()
        gemm_fp8._compile.cache_clear()
        quant_fp8._compile.cache_clear()
