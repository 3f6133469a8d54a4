"""The sm90 backend (kernels/sm90, Triton on Hopper) behind the backend protocol (verify.backends).

Served, each by the kernels.sm90.api.Sm90Kernels method named in _SERVED (its availability is
the op's): prepare (its own host code: kernels.sm90.host_prepare for NVFP4 dense linears,
kernels.sm90.fp8_linear for FP8 block-128 ones, the grouped GEMM's prepare_gate_up / prepare_experts
for expert stacks), dense quantize / GEMM / linear, the grouped dense linear of V4's wo_a (per group its
dense FP8 / NVFP4 path on the group's columns and the group's row block of its own prepared weight), the FP8
1x128 activation quantizer (quantize_fp8: the kernel dense_linear runs on FP8 weights,
kernels.sm90.quantize_fp8_1x128), and the MoE block:
grouped quantize (static per expert / dynamic, te), grouped GEMM (l1: gate and up float32 from one
interleaved w1|w3 stack; l2: bf16), unfused SwiGLU + requant, the fused L1 + SwiGLU + requant (static
h scale only), router (sqrtsoftplus / sigmoid, bias, hash, V3 group-limited top-k), dispatch, combine
and the whole MoE block as one capturable call with a device valid-token count.

FP8 block-128 dense linears (DeepSeek's attention and shared-expert linears; prepare_linear of a
verify.checkpoint.Fp8BlockLinear): the block scales are decoded here to float32 exactly (a V4 `.scale`
E8M0 byte b is built into the float32 bits of 2^(b-127), never converted as a number; V3
weight_scale_inv is float32 already) and placed by the kernels' own prepare_fp8_weight; dense_linear
runs linear_fp8 (dynamic per-token 1x128 E4M3 activations, then the block-scaled GEMM) with the
activation scale rule the weight's scales imply (verify.checkpoint.fp8_act_scale_fmt: UE8M0
rounded up when every block scale is a power of two, as V4's are; float32 otherwise), decided once at
prepare (no host read in the forward). The FP8 GEMM's own accumulator is declared as fp8_u_acc /
fp8_promotion_interval (about 14 bits per 128-K group, promoted to float32 every 128 of K).

Boundary representation: sm90's grouped kernels use the protocol's layout as it is (unpadded
expert-sorted rows, per-expert 128-row padded 128x4 scales), so nothing is converted; grouped
quantizations return a scale buffer sized for any routing of their rows (extra rows zero).

Refused (NotImplementedError with a sentence): l1_fused with a dynamic h scale (the fused epilogue
quantizes h as it computes it); softmax scoring and group-limited top-k over a non-power-of-two expert
count (prepare_router); expert weights that are not NVFP4 and dense weights that are neither NVFP4 nor
FP8 block-128 (prepare_*); a static per-tensor FP8 input_scale (dense_linear of an FP8 weight); an FP8
weight given to dense_gemm (its activations are no NVFP4 boundary tensor: dense_linear is the path).

One host read by design: combine with weights_f32=None (the before-w2 placement) reads top_k from
the boundary Dispatched on the host (it carries no top_k, and the output's row count T = R / top_k is a
shape), so that boundary op is not graph-capturable; moe_block knows top_k and never syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from references.layer import MoeSpec
from references.recipes import recipe_by_name
from references.stages import Op
from verify.backends.base import Backend
from verify.backends.protocol import FP8_SCALE_RULES, Dispatched, Fp8QuantizedAct, QuantizedAct, RoutingOut
from verify.checkpoint import Fp8BlockLinear, GatedMlp, Linear, Nvfp4Linear, Router, fp8_act_scale_fmt
from verify.provenance import triton_launch_recorder

__all__ = ["Sm90Adapter", "Sm90Fp8Linear", "fp8_block_dec_f32"]

# the protocol's op -> the kernels/sm90 method whose availability decides it
_SERVED = {Op.PREPARE: "prepare_nvfp4_weight", Op.QUANTIZE: "quantize_act", Op.QUANTIZE_FP8: "quantize_act_fp8",
           Op.DENSE_GEMM: "gemm_act",
           Op.DENSE_LINEAR: "linear_nvfp4", Op.GROUPED_DENSE_LINEAR: "linear_nvfp4",
           Op.GROUPED_QUANTIZE: "grouped_quantize", Op.GROUPED_GEMM: "grouped_gemm",
           Op.SWIGLU_REQUANT: "swiglu_requant", Op.L1_FUSED: "l1_swiglu_requant", Op.ROUTER: "router",
           Op.DISPATCH: "dispatch", Op.COMBINE: "combine", Op.MOE_BLOCK: "moe_block"}
_DYNAMIC_L1_FUSED = ("sm90: l1_fused needs a static h scale (input_dec_scale_f32, w2's input_scale per expert): the "
                     "fused epilogue quantizes h as it computes it, so a dynamic amax of h cannot exist yet")
_PLACEMENTS = ("after_w2", "before_w2")
_FP8_SCALE_RULES = {"ue8m0": "ue8m0_ceil", "f32": "f32"}  # fp8_act_scale_fmt -> the quantizer's scale_rule
_F32_MANT_BITS = 23
_E8M0_NAN = 0xFF


@dataclass(frozen=True)
class Sm90Fp8Linear:
    """An FP8 block-128 checkpoint linear prepared for kernels.sm90: `weight` (kernels.sm90.fp8_linear.
    Sm90Fp8Weight: E4M3 bytes [N, K], float32 block decode scales [ceil(N/128), ceil(K/128)]) and
    `scale_rule`, the activation quantizer's scale rule ("ue8m0_ceil" or "f32") its scales imply."""

    module: str
    weight: object
    scale_rule: str


def fp8_block_dec_f32(lin: Fp8BlockLinear) -> Tensor:
    """The block decode scales of an FP8 block-128 linear as float32, exactly: V4 `.scale` E8M0 bytes b
    built into the float32 bits of 2^(b-127) (byte 0 is the subnormal 2^-127; 0xFF is NaN: refused),
    V3 `.weight_scale_inv` as stored (float32; NaN, Inf and negative scales refused). ValueError naming
    the tensor for a float copy of E8M0 bytes, a wrong dtype, or both / neither scale present."""
    if (lin.scale_ue8m0 is None) == (lin.scale_inv_f32 is None):
        raise ValueError(f"{lin.module}: expected exactly one of .scale (F8_E8M0) and .weight_scale_inv (F32)")
    if lin.scale_inv_f32 is not None:
        s = lin.scale_inv_f32
        if s.dtype != torch.float32:
            raise ValueError(f"{lin.module}.weight_scale_inv: expected F32, got {s.dtype}")
        bad = int((~torch.isfinite(s) | (s < 0)).sum())
        if bad:
            raise ValueError(f"{lin.module}.weight_scale_inv: {bad} of {s.numel()} block scales are NaN, Inf or "
                             "negative")
        return s
    b = lin.scale_ue8m0
    if b.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"{lin.module}.scale: expected F8_E8M0 bytes (float8_e8m0fnu), got {b.dtype} (a float "
                         "copy of E8M0 bytes reads each byte as a number)")
    e = b.view(torch.uint8).to(torch.int32)
    nan = int((e == _E8M0_NAN).sum())
    if nan:
        raise ValueError(f"{lin.module}.scale: {nan} NaN E8M0 scale bytes (0xFF) of {e.numel()}")
    bits = torch.where(e > 0, e << _F32_MANT_BITS, torch.full_like(e, 1 << (_F32_MANT_BITS - 1)))
    return bits.view(torch.float32)

_ACT_SCALES = ("dynamic", "static")


class Sm90Adapter(Backend):
    """kernels.sm90.api.Sm90Kernels as a verify.backends.Backend."""

    supports_valid_tokens = True  # moe_block takes num_valid_tokens_i32 (int32 [1] on the device)
    not_served = MappingProxyType({Op.GROUPED_LINEAR_MXFP4: (
        "not served: sm90 has no MXFP4 GEMM (E2M1 weights with an E8M0 scale per 32 of K, W4A8); DeepSeek-V4 "
        "keeps only the MTP block's routed experts in MXFP4 (mtp.*.ffn.experts), the emulator serves them")})

    def __init__(self) -> None:
        from kernels.sm90.api import Sm90Kernels  # noqa: PLC0415 (imports triton lazily itself)

        self._impl = Sm90Kernels()
        self.name = self._impl.name
        self.recipe = recipe_by_name(self._impl.recipe_name)
        self.u_acc = float(self._impl.u_acc)
        self.accumulator = self._impl.accumulator
        self.fp8_u_acc = float(self._impl.fp8_u_acc)
        self.fp8_promotion_interval = int(self._impl.fp8_promotion_interval)

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        return super().unsupported_reason(op, device) or self._impl.unsupported_reason(_SERVED[op], device)

    def cache_clear(self) -> None:
        self._impl.cache_clear()

    def launch_recorder(self):
        """Provenance: the Triton kernels launched inside the block, with their cubin target (verify.provenance)."""
        return triton_launch_recorder()

    # ---------------------------------------------------------------- prepare (host, once per layer)
    def prepare_linear(self, lin: Linear) -> object:
        """NVFP4 -> kernels.sm90.host_prepare.Sm90Nvfp4Weight; FP8 block-128 -> Sm90Fp8Linear (module docstring)."""
        if isinstance(lin, Fp8BlockLinear):
            return self._prepare_fp8(lin)
        if not isinstance(lin, Nvfp4Linear):
            raise NotImplementedError(f"sm90: {lin.module} is {lin.format}; the sm90 dense GEMMs take NVFP4 and FP8 "
                                      "block-128 weights only")
        return self._impl.prepare_nvfp4_weight(lin.weight_u8, lin.weight_scale_e4m3, lin.weight_scale_2_f32)

    def _prepare_fp8(self, lin: Fp8BlockLinear) -> Sm90Fp8Linear:
        if lin.weight_e4m3.dim() != 2:
            raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K] dense weight, got shape "
                             f"{tuple(lin.weight_e4m3.shape)}")
        w = self._impl.prepare_fp8_weight(lin.weight_e4m3, fp8_block_dec_f32(lin))
        return Sm90Fp8Linear(lin.module, w, _FP8_SCALE_RULES[fp8_act_scale_fmt(w)])

    def prepare_experts(self, experts: GatedMlp) -> object:
        """Stacked routed experts (w1, w3 [E, I, H/2]; w2 [E, H, I/2], NVFP4) -> kernels.sm90.moe_block.MoeExperts:
        w1|w3 interleaved by row for the L1 kernels, w2 as a plain stack, per-expert static scales."""
        parts = []
        for lin in (experts.w1, experts.w3, experts.w2):
            if not isinstance(lin, Nvfp4Linear):
                raise NotImplementedError(f"sm90: {getattr(lin, 'module', '?')} is {getattr(lin, 'format', '?')}; the "
                                          "sm90 grouped GEMM takes NVFP4 expert stacks only")
            if lin.weight_u8.dim() != 3:
                raise ValueError(f"experts: {lin.module} has shape {tuple(lin.weight_u8.shape)}, expected a stack "
                                 "[E, N, K/2]")
            parts.append((lin.weight_u8, lin.weight_scale_e4m3, lin.weight_scale_2_f32, lin.input_scale_f32))
        return self._impl.prepare_moe_experts(*parts)

    def prepare_router(self, router: Router, spec: MoeSpec) -> object:
        """-> kernels.sm90.moe_block.MoeRouter (NotImplementedError naming what moe_router lacks)."""
        renormalize = spec.renormalize if spec.renormalize is not None else spec.scoring != "softmax"
        return self._impl.prepare_moe_router(router.gate_weight_bf16, router.gate_bias_f32, router.tid2eid_i64,
                                             top_k=spec.top_k, routed_scaling_factor=spec.routed_scaling_factor,
                                             scoring=spec.scoring, renormalize=renormalize, n_group=spec.n_group,
                                             topk_group=spec.topk_group)

    def dequantize_prepared(self, prepared: object, *, experts: range | None = None) -> Tensor | dict[str, Tensor]:
        """Its prepared weights decoded back with kernels.sm90.host_decode (float32, checkpoint layout): dense
        NVFP4 / FP8 -> [N, K]; experts (MoeExperts: the interleaved w13 stack split back) -> {"w1", "w3", "w2"};
        experts: only that range of the stacks (the chunked prepare check)."""
        from kernels.sm90 import host_decode  # noqa: PLC0415

        if hasattr(prepared, "w13"):
            gate, up = host_decode.grouped_weight_to_f32(prepared.w13, experts)
            return {"w1": gate, "w3": up, "w2": host_decode.grouped_weight_to_f32(prepared.w2, experts)}
        if experts is not None:
            raise ValueError(f"experts={experts}: {type(prepared).__name__} is a dense weight, not an expert stack")
        if isinstance(prepared, Sm90Fp8Linear):
            return host_decode.fp8_weight_to_f32(prepared.weight)
        return host_decode.nvfp4_weight_to_f32(prepared)

    # ---------------------------------------------------------------- quantize and GEMMs
    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        return QuantizedAct(*self._impl.quantize_act(x_bf16, input_dec_scale_f32))

    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct:
        """kernels.sm90.quantize_fp8_1x128 (the quantizer linear_fp8 runs): E4M3 codes [M, K] and per-token 1x128
        decode scales (UE8M0 bytes for "ue8m0_ceil", float32 for "f32"), x / s, NaN propagated. No host sync."""
        if scale_rule not in FP8_SCALE_RULES:
            raise ValueError(f"scale_rule={scale_rule!r}: expected one of {FP8_SCALE_RULES}")
        codes, scale = self._impl.quantize_act_fp8(x_bf16, scale_rule=scale_rule)
        return Fp8QuantizedAct(codes, scale, scale_rule)

    def grouped_quantize(self, rows_bf16: Tensor, offsets_i32: Tensor, *,
                         input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """Expert-sorted rows [R, K] -> packed [R, K/2], scales [sf_capacity_rows(R, E), Cp] (each expert padded
        to 128 rows, swizzled, extra rows zero), global_dec [E]: D (static) or 1/S for every expert (dynamic)."""
        return QuantizedAct(*self._impl.grouped_quantize(rows_bf16, offsets_i32, input_dec_scale_f32))

    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        if isinstance(w, Sm90Fp8Linear):
            raise NotImplementedError(f"sm90: {w.module} is FP8 block-128: dense_gemm takes NVFP4 activations; its "
                                      "FP8 activations and GEMM run through dense_linear")
        return self._impl.gemm_act(a.packed_u8, a.sf_swizzled_u8, a.global_dec_f32, w)

    def grouped_gemm(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *,
                     layer: str) -> Tensor | tuple[Tensor, Tensor]:
        """l1: (gate, up) float32 [R, I] (one kernel over the interleaved w1|w3 stack, each half with its own
        alpha); l2: y bf16 [R, H]. Rows in the boundary's order."""
        if layer == "l1":
            return self._impl.grouped_gemm_l1(a.packed_u8, a.sf_swizzled_u8, a.global_dec_f32, offsets_i32,
                                              experts.w13)
        if layer == "l2":
            return self._impl.grouped_gemm(a.packed_u8, a.sf_swizzled_u8, a.global_dec_f32, offsets_i32, experts.w2)
        raise ValueError(f"layer={layer!r}: expected 'l1' or 'l2'")

    def swiglu_requant(self, gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
                       row_weight_f32: Tensor | None = None,
                       input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, QuantizedAct]:
        h, q = self._impl.swiglu_requant(gate, up, offsets_i32, swiglu_limit=swiglu_limit,
                                         row_weight_f32=row_weight_f32, input_dec_scale_f32=input_dec_scale_f32)
        return h, QuantizedAct(*q)

    def l1_fused(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *, swiglu_limit: float | None,
                 input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """The grouped L1 GEMM with the clamped SwiGLU + te requant epilogue (static h scale only)."""
        if input_dec_scale_f32 is None:
            raise NotImplementedError(_DYNAMIC_L1_FUSED)
        packed, sf, dec = self._impl.l1_swiglu_requant(a.packed_u8, a.sf_swizzled_u8, a.global_dec_f32, offsets_i32,
                                                       experts.w13, swiglu_limit=swiglu_limit,
                                                       h_input_dec_scale_f32=input_dec_scale_f32)
        # h's experts pad exactly as a's (same offsets): a's scale rows hold h's padded total, so a buffer
        # sized for capacity is cut to a's row count (exact when a is exact, as the stage verdict needs)
        return QuantizedAct(packed, sf[:min(sf.shape[0], a.sf_swizzled_u8.shape[0])], dec)

    # ---------------------------------------------------------------- routing
    def router(self, x_bf16: Tensor, router: object, *, token_ids_i64: Tensor | None = None) -> RoutingOut:
        return RoutingOut(*self._impl.router(x_bf16, router, token_ids_i64))

    def dispatch(self, ids_i64: Tensor, num_experts: int) -> Dispatched:
        """ids [T, k] int64 -> row_token, row_slot int64 [T*k] (stable: token-major within an expert), offsets
        int32 [E+1] (moe_dispatch's counting sort)."""
        if not isinstance(ids_i64, Tensor) or ids_i64.dtype != torch.int64 or ids_i64.dim() != 2:
            raise ValueError(f"ids_i64: expected int64 [T, k], got {getattr(ids_i64, 'dtype', type(ids_i64).__name__)} "
                             f"{tuple(getattr(ids_i64, 'shape', ()))}")
        d = self._impl.dispatch(ids_i64, int(num_experts))
        return Dispatched(d.row_token_i64, d.row_slot_i64, d.offsets_i32, ids_i64.shape[1])

    def combine(self, y_rows_bf16: Tensor, d: Dispatched, weights_f32: Tensor | None) -> Tensor:
        """y rows [R, H] bf16 (expert order) -> bf16 [T, H]: per token the float32 sum in slot order of
        weight * row (weights None: the plain sum; top_k from d.top_k, or, when a caller left it None, read
        from d's slots on the host)."""
        r = d.row_token_i64.numel()
        if weights_f32 is not None:
            t, k = weights_f32.shape
            if t * k != r:
                raise ValueError(f"d: {r} rows, but weights_f32 {tuple(weights_f32.shape)} has T*k = {t * k} pairs")
            weights_f32 = weights_f32.to(torch.float32).contiguous()
        elif d.top_k is not None:
            k = d.top_k
            t = r // k
        else:
            k = int(d.row_slot_i64.max()) + 1 if r else 1  # a host read: only when the caller gave no top_k
            t = r // k
        return self._impl.combine(y_rows_bf16.contiguous(), d.row_token_i64, d.row_slot_i64, weights_f32,
                                  num_tokens=t, top_k=k)

    # ---------------------------------------------------------------- whole calls
    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """NVFP4: linear_nvfp4 (static or dynamic). FP8 block-128: linear_fp8 with dynamic per-token 1x128
        activation scales under the weight's scale rule; a static FP8 input_scale is refused."""
        if isinstance(w, Sm90Fp8Linear):
            if input_dec_scale_f32 is not None:
                raise NotImplementedError(f"sm90: {w.module} is FP8 block-128 with dynamic per-token 1x128 activation "
                                          "scales; a static per-tensor FP8 input_scale is not served")
            return self._impl.linear_fp8(x_bf16, w.weight, scale_rule=w.scale_rule)
        return self._impl.linear_nvfp4(x_bf16, w, input_dec_scale_f32)

    def grouped_dense_linear(self, x_bf16: Tensor, w: object, *, groups: int,
                             input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """DeepSeek-V4's wo_a, one capturable call: per group the dense path on x's group columns (a device copy)
        and the group's row block of its own prepared weight (views). FP8: linear_fp8 per group (its per-token
        1x128 activations are the whole x's: no block straddles a group). NVFP4: x quantized ONCE (one global
        scale over all of x, as the stage requires), then gemm_act per group on the group's code columns and
        scale column tiles; needs d a multiple of 64 (whole 128x4 scale tiles) and r of 128 (whole weight
        row tiles)."""
        d, r = _group_dims(x_bf16, w, groups)
        if isinstance(w, Sm90Fp8Linear):
            if input_dec_scale_f32 is not None:
                raise NotImplementedError(f"sm90: {w.module} is FP8 block-128 with dynamic per-token 1x128 activation "
                                          "scales; a static per-tensor FP8 input_scale is not served")
            return torch.cat([self._impl.linear_fp8(x_bf16[:, g * d:(g + 1) * d].contiguous(), _fp8_rows(w, g, r),
                                                    scale_rule=w.scale_rule) for g in range(groups)], dim=1)
        if d % _SF_TILE_K or r % _SF_TILE_ROWS:
            raise NotImplementedError(f"sm90: an NVFP4 grouped linear needs the group width ({d}) a multiple of "
                                      f"{_SF_TILE_K} and the group's rows ({r}) of {_SF_TILE_ROWS}: whole 128x4 scale "
                                      "tiles per group")
        packed, sf, dec = self._impl.quantize_act(x_bf16, input_dec_scale_f32)
        return torch.cat([self._impl.gemm_act(packed[:, g * d // 2:(g + 1) * d // 2].contiguous(),
                                              _sf_col_tiles(sf, x_bf16.shape[0], g, d), dec, _nvfp4_rows(w, g, r))
                          for g in range(groups)], dim=1)

    def moe_block(self, x_bf16: Tensor, router: object, experts: object, *, swiglu_limit: float | None,
                  weight_placement: str, act_scale: str, token_ids_i64: Tensor | None = None,
                  num_valid_tokens_i32: Tensor | None = None) -> Tensor:
        """x [T, H] bf16 -> routed experts' output bf16 [T, H], one capturable call (kernels.sm90.moe_block):
        static scales per expert (the fused L1 epilogue for after_w2), dynamic on the device."""
        if weight_placement not in _PLACEMENTS:
            raise ValueError(f"weight_placement={weight_placement!r}: expected one of {_PLACEMENTS}")
        if act_scale not in _ACT_SCALES:
            raise ValueError(f"act_scale={act_scale!r}: expected one of {_ACT_SCALES}")
        return self._impl.moe_block(x_bf16, router, experts, swiglu_limit=swiglu_limit,
                                    weight_placement=weight_placement, act_scale=act_scale,
                                    token_ids_i64=token_ids_i64, num_valid_tokens_i32=num_valid_tokens_i32)


_SF_TILE_ROWS, _SF_TILE_K = 128, 64  # a 128x4 scale tile: 128 rows x 4 scales of 16 elements
_SF_TILE_BYTES = _SF_TILE_ROWS * 4
_FP8_BLOCK_ROWS = 128


def _group_dims(x: Tensor, w: object, groups: int) -> tuple[int, int]:
    """(d, r) of a grouped linear: x [M, groups*d], the prepared weight [groups*r, d]; ValueError otherwise."""
    n, k = (w.weight.n, w.weight.k) if isinstance(w, Sm90Fp8Linear) else (w.n, w.k)
    if groups < 1 or n % groups or x.dim() != 2 or x.shape[1] != groups * k:
        raise ValueError(f"grouped_dense_linear: x {tuple(x.shape)} and weight [{n}, {k}] are not [M, groups*d] and "
                         f"[groups*r, d] for groups={groups}")
    return k, n // groups


def _fp8_rows(w: Sm90Fp8Linear, g: int, r: int):
    """Rows g*r:(g+1)*r of a prepared FP8 weight (views): its codes and the block-scale rows that cover them,
    which needs each group's rows inside whole 128-row blocks (r a multiple of 128 or a divisor of it)."""
    from kernels.sm90.fp8_linear import Sm90Fp8Weight  # noqa: PLC0415

    if r % _FP8_BLOCK_ROWS and _FP8_BLOCK_ROWS % r:
        raise NotImplementedError(f"sm90: {w.module}: a group's {r} rows straddle the 128-row weight blocks")
    lo = g * r // _FP8_BLOCK_ROWS
    return Sm90Fp8Weight(w.weight.e4m3_u8[g * r:(g + 1) * r],
                         w.weight.block_dec_f32[lo:lo + -(-r // _FP8_BLOCK_ROWS)])


def _nvfp4_rows(w, g: int, r: int):
    """Rows g*r:(g+1)*r of a prepared NVFP4 weight (views): r a multiple of 128, so its swizzled scales are whole
    row tiles, contiguous in memory (tile order: row tile, then column tile)."""
    from kernels.sm90.host_prepare import Sm90Nvfp4Weight  # noqa: PLC0415

    return Sm90Nvfp4Weight(w.packed_u8[g * r:(g + 1) * r], w.sf_swizzled_u8[g * r:(g + 1) * r], w.dec_scale_f32)


def _sf_col_tiles(sf: Tensor, m: int, g: int, d: int) -> Tensor:
    """Group g's activation scales: its column tiles of every row tile of the swizzled buffer of m rows (memory
    order row tile, column tile, 512 bytes each), copied on the device into a [Mp, d/16] buffer of the same layout."""
    mp = -(-m // _SF_TILE_ROWS) * _SF_TILE_ROWS
    t = d // _SF_TILE_K
    tiles = sf.reshape(mp // _SF_TILE_ROWS, -1, _SF_TILE_BYTES)
    return tiles[:, g * t:(g + 1) * t].contiguous().view(mp, t * 4)
