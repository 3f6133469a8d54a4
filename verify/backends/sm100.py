"""The sm100 backend (kernels/sm100: CuTe DSL kernels on Blackwell, torch routing ops) behind
the backend protocol (verify.backends).

Served, each by the kernels/sm100 method named in _SERVED (its availability is the op's):
- prepare: kernels.sm100's own host code (host_bridge through Sm100Kernels.prepare_*), any device;
- quantize, grouped_quantize: the te quantizer (static or dynamic global scale);
- dense_gemm, dense_linear, grouped_gemm (l1: w1 and w3 as two plain grouped GEMMs; l2: w2);
- l1_fused: the L1 GEMM whose SwiGLU epilogue writes h as NVFP4 (sm100's fuse_l2_quant path),
  static h scale only;
- router, dispatch (permute), combine: moe_routing's torch ops;
- moe_block: Sm100Kernels.moe_experts on the routing of Sm100Kernels.router;
- FP8 block-128 dense linears (prepare_linear of a verify.checkpoint.Fp8BlockLinear): kernels.sm100's own
  host code (host_bridge_fp8 through Sm100Kernels.prepare_fp8_block_weight) turns the checkpoint's E4M3
  bytes and UE8M0 block scales into the GEMM's per-32 swizzled operands (float32 block scales, V3
  `weight_scale_inv` and kin, only when every one is a power of two: their UE8M0 bytes, exactly);
  quantize_fp8 is the 1x128 UE8M0 quantizer (quantize_fp8_1x128) that dense_linear (linear_fp8: quantize,
  then gemm_fp8_blockscaled) runs. The FP8 accumulator is declared from the design (fp8_u_acc 2^-24, no
  separate promotion: fp32 tensor memory over all of K) and is unmeasured until
  `python -m verify accumulator --backend sm100` runs on a B200.

Refused with a sentence (unsupported_reason, or NotImplementedError where the refusal depends
on the arguments rather than on the op):
- swiglu_requant: the SwiGLU exists only inside the L1 GEMM epilogue; no kernel takes gate/up;
- quantize_fp8 with the "f32" scale rule, FP8 weights whose block scales are not all powers of two, a
  static per-tensor FP8 input_scale, an FP8 weight given to dense_gemm (tcgen05 kind::mxf8f6f4 takes UE8M0
  scales per 32 of K; the quantizer writes UE8M0 only);
- l1_fused with a dynamic h scale; the before_w2 routing-weight placement (moe_block, combine
  without weights); router scoring other than sqrtsoftplus, group-limited top-k, renormalize
  off (prepare_router); moe_block with static scales that differ across experts.

Boundary conversions (device-side torch, no host sync, graph-capturable). sm100's grouped
kernels work on "padded-per-expert" rows: each expert's rows padded to 128 with zero rows, in
a buffer of capacity hb.grouped_capacity_rows(R, E) rows (a bound computed from shapes, since
the padded total lives on the device). The boundary holds the R rows unpadded:
- packed rows: rows_to_padded / padded_to_rows (index_copy_ / gather with hb.grouped_row_map);
- scales: the swizzled scales of the padded rows ARE the boundary's grouped 128x4 layout
  (per-expert padding to 128, then swizzle), so they pass through unchanged. The boundary's
  exact row count is the padded total, a device value; without a host sync grouped_quantize
  and l1_fused return the capacity-sized buffer: the boundary rows followed by whole zero
  128-row tiles. grouped_gemm takes either (any multiple of 128 rows that holds the padded total).
- global scales: grouped kernels take one activation decode scale [1]; a per-expert one [E]
  is folded into each expert's weight decode scale (alpha = a_dec[e] * w_dec[e], one float32
  product either way, as the epilogue forms it), with 1.0 passed as the activation's.
- per-expert static quantization (grouped_quantize, l1_fused): the kernels take one encode
  scale S [1], so they run once per expert with that expert's S and each 128-row tile keeps
  the launch of its own expert (exact; E launches).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm100 import host_bridge as hb
from kernels.sm100 import host_bridge_fp8 as hb_fp8
from kernels.sm100 import moe_routing
from kernels.sm100.api import Sm100Kernels
from references.layer import MoeSpec
from references.recipes import recipe_by_name
from references.stages import Op
from verify.backends.base import Backend
from verify.backends.protocol import FP8_SCALE_RULES, Dispatched, Fp8QuantizedAct, QuantizedAct, RoutingOut
from verify.checkpoint import Fp8BlockLinear, GatedMlp, Linear, Nvfp4Linear, Router
from verify.provenance import KernelBuild, torch_build

__all__ = ["Sm100Adapter", "Sm100Experts", "Sm100Router", "Sm100Fp8Linear", "rows_to_padded", "padded_to_rows",
           "SERVED", "NOT_SERVED"]

# The protocol's op -> the kernels/sm100 method (Sm100Kernels.OPS) whose availability decides it.
SERVED: dict[Op, str] = {
    Op.PREPARE: "prepare_nvfp4_weight",
    Op.QUANTIZE: "quantize_nvfp4",
    Op.QUANTIZE_FP8: "quantize_fp8_1x128",
    Op.GROUPED_QUANTIZE: "quantize_nvfp4",
    Op.DENSE_GEMM: "gemm_nvfp4",
    Op.GROUPED_GEMM: "grouped_gemm_nvfp4",
    Op.L1_FUSED: "grouped_gemm_swiglu_nvfp4",
    Op.ROUTER: "router",
    Op.DISPATCH: "permute",
    Op.COMBINE: "combine",
    Op.DENSE_LINEAR: "linear_nvfp4",
    Op.MOE_BLOCK: "moe_experts",
}

# The protocol's ops kernels/sm100 does not have, and why.
NOT_SERVED: dict[Op, str] = {
    Op.SWIGLU_REQUANT: (
        "sm100: swiglu_requant is not provided: the SwiGLU exists only in the L1 GEMM epilogue "
        "(grouped_gemm_swiglu), which takes the NVFP4 activations and w1|w3, never gate/up tensors "
        "(sm100's SwiGLU is exercised by l1_fused and moe_block)"),
    Op.REFERENCE: "sm100: reference-only stages have no backend op",
    Op.GROUPED_DENSE_LINEAR: (
        "sm100: DeepSeek-V4's grouped wo_a linear (grouped_dense_linear) is not wired: its per-group row blocks of "
        "the prepared weights are untested on sm100 and cannot be run here (no Blackwell device); the emulator and "
        "sm90 serve it"),
    Op.GROUPED_LINEAR_MXFP4: (
        "sm100: no MXFP4 GEMM (E2M1 weights with an E8M0 scale per 32 of K, W4A8) is wired yet; DeepSeek-V4 keeps "
        "only the MTP block's routed experts in MXFP4 (mtp.*.ffn.experts), the emulator serves them"),
}

_DYNAMIC_L1_FUSED = (
    "sm100: l1_fused needs a static h scale (input_dec_scale_f32): the fused SwiGLU epilogue quantizes h "
    "as it computes it, so a dynamic amax of h cannot exist yet")
_BEFORE_W2 = (
    "sm100: weight_placement='before_w2' is not in kernels/sm100: its SwiGLU epilogue never multiplies h by "
    "the routing weight; combine applies the weights after w2 (moe_routing.combine_bf16)")
_COMBINE_NO_WEIGHTS = (
    "sm100: combine with weights_f32=None (the before_w2 placement) is not in kernels/sm100: "
    "moe_routing's combine always multiplies by the routing weights")
_FP8_SCALE_RULE = "ue8m0_ceil"  # the one rule quantize_fp8_1x128 implements (protocol.FP8_SCALE_RULES)
_FP8_F32_RULE = (
    "sm100: quantize_fp8 with scale_rule 'f32' is not in kernels/sm100: its 1x128 quantizer writes UE8M0 scales "
    "(rounded up to a power of two) only, the one form tcgen05.mma kind::mxf8f6f4 takes per 32 of K")
_ROUTER_SCORING = "sqrtsoftplus"
_PLACEMENTS = ("after_w2", "before_w2")
_ACT_SCALES = ("dynamic", "static")


# ============================================================================= prepared operands


@dataclass(frozen=True)
class Sm100Experts:
    """The routed experts as the sm100 kernels take them (prepare_experts).

    w1, w3: host_bridge.Sm100Nvfp4Weight [E, I, K/2] each (the plain grouped GEMM of l1);
    w2: [E, H, I/2]; w13: w1|w3 interleaved along N in groups of 128 rows (the SwiGLU GEMM),
    None when I is not a multiple of 128 (w13_reason says so);
    l1_input_dec_scale_f32 / l2_input_dec_scale_f32: float32 [E] static activation decode scales
    (max of w1/w3 input_scale per expert; w2's), None when the checkpoint lacks them;
    l1_shared_dec_f32 / l2_shared_dec_f32: float32 [1], the one scale moe_experts takes, set when
    every expert has the same (bit-equal) scale, else None (static_reason says why).
    """

    w1: hb.Sm100Nvfp4Weight
    w3: hb.Sm100Nvfp4Weight
    w2: hb.Sm100Nvfp4Weight
    w13: hb.Sm100Nvfp4Weight | None
    l1_input_dec_scale_f32: Tensor | None
    l2_input_dec_scale_f32: Tensor | None
    l1_shared_dec_f32: Tensor | None
    l2_shared_dec_f32: Tensor | None
    num_experts: int
    w13_reason: str | None = None
    static_reason: str | None = None


@dataclass(frozen=True)
class Sm100Router:
    """What Sm100Kernels.router takes: gate_weight_bf16 [E, H]; bias_f32 [E] or None; tid2eid_i64
    [vocab, top_k] or None (hash layer); top_k; routed_scaling_factor."""

    gate_weight_bf16: Tensor
    bias_f32: Tensor | None
    tid2eid_i64: Tensor | None
    top_k: int
    routed_scaling_factor: float


@dataclass(frozen=True)
class Sm100Fp8Linear:
    """An FP8 block-128 checkpoint linear prepared for kernels.sm100 (prepare_linear): `weight` is
    host_bridge_fp8.Sm100Fp8BlockWeight (E4M3 bytes [N, K], per-32 UE8M0 128x4 swizzled scales); the
    activations are quantized with the UE8M0 rule (the only one the kernels have)."""

    module: str
    weight: hb_fp8.Sm100Fp8BlockWeight


# ============================================================================= boundary conversions


@dataclass(frozen=True)
class _GroupedRows:
    """Where the boundary's R expert-sorted rows live in sm100's padded-per-expert rows (device tensors,
    no sync). row_map_i64 [R]; padded_offsets_i64 [E+1]; tile_expert_i32 [rows/128] (-1: no expert);
    valid_rows_i32 [1] (the padded total); rows: the padded buffer's row count (a Python int)."""

    row_map_i64: Tensor
    padded_offsets_i64: Tensor
    tile_expert_i32: Tensor
    valid_rows_i32: Tensor
    rows: int


def _num_experts(offsets_i32: Tensor) -> int:
    """E of a boundary offsets tensor (int32 [E+1], E >= 1), from its shape."""
    if not isinstance(offsets_i32, Tensor) or offsets_i32.dtype != torch.int32 or offsets_i32.dim() != 1 \
            or offsets_i32.numel() < 2:
        raise ValueError(f"offsets_i32: expected int32 [E+1] with E >= 1, got "
                         f"{getattr(offsets_i32, 'dtype', type(offsets_i32).__name__)} "
                         f"{tuple(getattr(offsets_i32, 'shape', ()))}")
    return offsets_i32.numel() - 1


def _grouped_rows(offsets_i32: Tensor, num_rows: int, padded_rows: int) -> _GroupedRows:
    _num_experts(offsets_i32)
    if padded_rows % hb.SF_ROW_ALIGN:
        raise ValueError(f"padded rows {padded_rows}: must be a multiple of {hb.SF_ROW_ALIGN} (grouped 128x4 scales)")
    off = offsets_i32.to(torch.int64)
    padded = hb.grouped_padded_offsets(off)
    return _GroupedRows(hb.grouped_row_map(off, num_rows), padded,
                        hb.tile_expert_table(padded, padded_rows // hb.SF_ROW_ALIGN),
                        padded[-1:].to(torch.int32), padded_rows)


def rows_to_padded(rows: Tensor, offsets_i32: Tensor, padded_rows: int) -> Tensor:
    """Boundary rows [R, X] (expert-sorted, unpadded; any dtype) -> sm100's padded-per-expert rows
    [padded_rows, X]: expert e's rows start at its padded offset, every other row is zero.
    padded_rows: a multiple of 128 >= the padded total (e.g. hb.grouped_capacity_rows(R, E))."""
    g = _grouped_rows(offsets_i32, rows.shape[0], padded_rows)
    return _scatter_rows(rows, g)


def padded_to_rows(padded: Tensor, offsets_i32: Tensor, num_rows: int) -> Tensor:
    """Inverse of rows_to_padded: padded-per-expert rows [P, X] -> the R = num_rows boundary rows [R, X]."""
    return padded[_grouped_rows(offsets_i32, num_rows, padded.shape[0]).row_map_i64]


def _scatter_rows(rows: Tensor, g: _GroupedRows) -> Tensor:
    out = rows.new_zeros(g.rows, *rows.shape[1:])
    out.index_copy_(0, g.row_map_i64, rows)
    return out


def _keep_tiles_of(expert: int, g: _GroupedRows, launch_out: Tensor, acc: Tensor) -> Tensor:
    """acc with the 128-row tiles of `expert` (rows of one padded-per-expert buffer) taken from launch_out."""
    mask = (g.tile_expert_i32 == expert).unsqueeze(1).expand(-1, hb.SF_ROW_ALIGN).reshape(-1, 1)
    return torch.where(mask, launch_out, acc)


def _with_act_dec(w: hb.Sm100Nvfp4Weight, a_dec_f32: Tensor, name: str) -> hb.Sm100Nvfp4Weight:
    """w whose per-expert decode scales carry the activation's too: dec[e] = a_dec[e] * w_dec[e] (float32,
    the product the epilogue forms), so the kernel runs with an activation decode scale of 1.0."""
    a = a_dec_f32.to(torch.float32).reshape(-1)
    if a.numel() not in (1, w.num_batches):
        raise ValueError(f"{name}: expected [1] or one decode scale per expert [{w.num_batches}], "
                         f"got shape {tuple(a_dec_f32.shape)}")
    up = None if w.up_dec_scale_f32 is None else (a * w.up_dec_scale_f32).contiguous()
    return dataclasses.replace(w, dec_scale_f32=(a * w.dec_scale_f32).contiguous(), up_dec_scale_f32=up)


def _per_expert_scale(s: Tensor, num_experts: int, name: str) -> Tensor:
    if not isinstance(s, Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (num_experts,):
        raise ValueError(f"{name}: expected float32 [{num_experts}] (one decode scale per expert), got "
                         f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
    return s


def _swiglu_limit(limit: float | None) -> float:
    """The kernels always clamp; no limit (None or 0, as references.moe.swiglu reads it) is +inf,
    for which min(g, inf) = g and clamp(u, -inf, inf) = u on every finite value."""
    return float(limit) if limit else float("inf")


def _ones_f32(device: torch.device) -> Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


# ============================================================================= the adapter


class Sm100Adapter(Backend):
    """kernels.sm100.api.Sm100Kernels (plus its host_bridge and moe_routing) as a verify.backends.Backend.
    The ops in NOT_SERVED are left to the base class, which refuses them with NOT_SERVED's sentence."""

    not_served = NOT_SERVED
    supports_valid_tokens = True  # moe_block takes num_valid_tokens_i32 (int32 [1] on the device)

    def __init__(self) -> None:
        self._impl = Sm100Kernels()
        self._torch_device = None  # set by the routing ops (torch's kernels), read by launch_recorder
        self.name = self._impl.name
        self.recipe = recipe_by_name(self._impl.recipe_name)
        self.u_acc = float(self._impl.u_acc)
        self.accumulator = f"{self._impl.accumulator}; FP8: {self._impl.fp8_accumulator}"
        # declared from the design, not measured (Sm100Kernels docstring); the accumulator probe decides
        self.fp8_u_acc = float(self._impl.fp8_u_acc)
        self.fp8_promotion_interval = self._impl.fp8_promotion_interval

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        return super().unsupported_reason(op, device) or self._impl.unsupported_reason(SERVED[op], device)

    def cache_clear(self) -> None:
        self._impl.cache_clear()

    def launch_recorder(self):
        """Provenance: the CuTe DSL kernels launched inside the block (their compile arch, "cute-dsl") and, when
        a routing op ran, torch's kernels (moe_routing) with the arch torch's build has for the device."""
        return _sm100_recorder(self)

    # ---------------------------------------------------------------- prepare (host, may sync)

    def prepare_linear(self, lin: Linear) -> hb.Sm100Nvfp4Weight | Sm100Fp8Linear:
        """One NVFP4 linear -> host_bridge.Sm100Nvfp4Weight (L = 1): packed [1, N, K/2] K-major, scales
        [1, Np, Cp] 128x4 swizzled, weight_scale_2 [1]. One FP8 block-128 linear -> Sm100Fp8Linear
        (_prepare_fp8). On the device of lin's tensors."""
        if isinstance(lin, Fp8BlockLinear):
            return self._prepare_fp8(lin)
        w = _nvfp4(lin)
        if w.weight_u8.dim() != 2:
            raise ValueError(f"lin: {w.module} is a stack {tuple(w.weight_u8.shape)}; prepare_linear takes one "
                             "[N, K/2] linear (expert stacks go to prepare_experts)")
        return self._impl.prepare_nvfp4_weight(w.weight_u8, w.weight_scale_e4m3, w.weight_scale_2_f32)

    def _prepare_fp8(self, lin: Fp8BlockLinear) -> Sm100Fp8Linear:
        """E4M3 [N, K] + UE8M0 block scales -> Sm100Kernels.prepare_fp8_block_weight. float32 block scales
        (V3 `weight_scale_inv`, compressed-tensors, ModelOpt, per-tensor) go as their UE8M0 bytes when every
        one is a power of two (host_bridge_fp8.pow2_f32_to_ue8m0_bytes, exact); otherwise NotImplementedError:
        the MMA's scales are powers of two."""
        if lin.weight_e4m3.dim() != 2:
            raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K] dense weight, got shape "
                             f"{tuple(lin.weight_e4m3.shape)}")
        scale = lin.scale_ue8m0
        if scale is None:
            scale = hb_fp8.pow2_f32_to_ue8m0_bytes(lin.scale_inv_f32)
            if scale is None:
                raise NotImplementedError(
                    f"sm100: {lin.module} ({lin.encoding}) has float32 block scales that are not all powers of "
                    "two; tcgen05.mma kind::mxf8f6f4 takes UE8M0 (power-of-two) scales only")
        return Sm100Fp8Linear(lin.module, self._impl.prepare_fp8_block_weight(lin.weight_e4m3, scale))

    def prepare_experts(self, experts: GatedMlp) -> Sm100Experts:
        """Stacked routed experts (w1, w3 [E, I, H/2]; w2 [E, H, I/2], NVFP4) -> Sm100Experts."""
        w1, w3, w2 = (_nvfp4(w) for w in (experts.w1, experts.w3, experts.w2))
        for w in (w1, w3, w2):
            if w.weight_u8.dim() != 3:
                raise ValueError(f"experts: {w.module} has shape {tuple(w.weight_u8.shape)}, "
                                 "expected a stack [E, N, K/2]")
        e = w1.weight_u8.shape[0]
        p1, p3, p2 = (self._impl.prepare_nvfp4_weight(w.weight_u8, w.weight_scale_e4m3, w.weight_scale_2_f32)
                      for w in (w1, w3, w2))
        w13, w13_reason = None, None
        if w1.n % self._impl.gate_up_granularity == 0:
            w13 = self._impl.prepare_gate_up_weight(w1.weight_u8, w1.weight_scale_e4m3, w1.weight_scale_2_f32,
                                                    w3.weight_u8, w3.weight_scale_e4m3, w3.weight_scale_2_f32)
        else:
            w13_reason = (f"sm100: the SwiGLU GEMM interleaves w1|w3 in groups of {self._impl.gate_up_granularity} "
                          f"rows; {w1.module} has I={w1.n}")
        s1 = s2 = None
        if w1.input_scale_f32 is not None and w3.input_scale_f32 is not None:
            s1 = torch.maximum(w1.input_scale_f32.to(torch.float32), w3.input_scale_f32.to(torch.float32)).reshape(e)
        if w2.input_scale_f32 is not None:
            s2 = w2.input_scale_f32.to(torch.float32).reshape(e).contiguous()
        shared1, why1 = _shared_scale(s1, f"{w1.module}/{w3.module}")
        shared2, why2 = _shared_scale(s2, w2.module)
        return Sm100Experts(p1, p3, p2, w13, s1, s2, shared1, shared2, e, w13_reason, why1 or why2)

    def prepare_router(self, router: Router, spec: MoeSpec) -> Sm100Router:
        """The router's gate [E, H] bf16, bias [E] f32 or hash table [vocab, k], and the spec's top_k and
        scaling. NotImplementedError for what moe_routing lacks (it never computes something else)."""
        if spec.scoring != _ROUTER_SCORING:
            raise NotImplementedError(f"sm100: router scoring {spec.scoring!r} is not in kernels.sm100.moe_routing "
                                      f"(it scores sqrt(softplus(logits)) only)")
        if spec.n_group and spec.n_group > 1:
            raise NotImplementedError(f"sm100: group-limited top-k (n_group={spec.n_group}, "
                                      f"topk_group={spec.topk_group}) is not in kernels.sm100.moe_routing "
                                      "(plain top-k of scores + bias only)")
        renormalize = spec.renormalize if spec.renormalize is not None else spec.scoring != "softmax"
        if not renormalize:
            raise NotImplementedError("sm100: renormalize=False is not in kernels.sm100.moe_routing (its weights "
                                      "are always s[ids] / sum(s[ids]) * routed_scaling_factor)")
        return Sm100Router(router.gate_weight_bf16, router.gate_bias_f32, router.tid2eid_i64, spec.top_k,
                           float(spec.routed_scaling_factor))

    # ---------------------------------------------------------------- quantization

    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """x [M, K] bf16 -> packed [M, K/2], scales [round_up(M,128), round_up(K/16,4)] 128x4 swizzled,
        global_dec_f32 [1]: the input_scale itself (static) or 1/S (dynamic, S = 2688/amax on the device)."""
        if input_dec_scale_f32 is None:
            packed, sf, s = self._impl.quantize_nvfp4_dynamic(x_bf16)
            return QuantizedAct(packed, sf, torch.reciprocal(s))
        packed, sf, _ = self._impl.quantize_nvfp4_static(x_bf16, input_dec_scale_f32)
        return QuantizedAct(packed, sf, input_dec_scale_f32.to(torch.float32).reshape(1).clone())

    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct:
        """x [M, K] bf16 -> E4M3 bytes [M, K] and UE8M0 scale bytes [M, ceil(K/128)] (quantize_fp8_1x128, the
        quantizer dense_linear runs on FP8 weights), scale_rule "ue8m0_ceil" only. No host sync."""
        if scale_rule not in FP8_SCALE_RULES:
            raise ValueError(f"scale_rule={scale_rule!r}: expected one of {FP8_SCALE_RULES}")
        if scale_rule != _FP8_SCALE_RULE:
            raise NotImplementedError(_FP8_F32_RULE)
        act = self._impl.quantize_fp8_1x128(x_bf16)
        return Fp8QuantizedAct(act.e4m3_u8, act.sf_ue8m0_u8, _FP8_SCALE_RULE)

    def grouped_quantize(self, rows_bf16: Tensor, offsets_i32: Tensor, *,
                         input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """Expert-sorted rows [R, K] bf16 with offsets_i32 [E+1] -> packed [R, K/2] (unpadded, the rows'
        order); scales [C, round_up(K/16,4)], C = hb.grouped_capacity_rows(R, E): each expert's rows padded
        to 128 then swizzled, followed by zero tiles; global_dec_f32 [E].

        input_dec_scale_f32: float32 [E] static decode scales (expert e's rows quantized with S = 1/D[e],
        one launch per expert), or None: one dynamic S over all rows, global_dec_f32 = 1/S for every expert.
        """
        if not isinstance(rows_bf16, Tensor) or rows_bf16.dim() != 2:
            raise ValueError(f"rows_bf16: expected [R, K] bf16, got {tuple(getattr(rows_bf16, 'shape', ()))}")
        e = _num_experts(offsets_i32)
        g = _grouped_rows(offsets_i32, rows_bf16.shape[0], hb.grouped_capacity_rows(rows_bf16.shape[0], e))
        xp = _scatter_rows(rows_bf16, g)
        if input_dec_scale_f32 is None:
            packed, sf, s = self._impl.quantize_nvfp4_dynamic(xp, num_valid_rows_i32=g.valid_rows_i32)
            return QuantizedAct(packed[g.row_map_i64], sf[:g.rows], torch.reciprocal(s).expand(e).contiguous())
        d = _per_expert_scale(input_dec_scale_f32, e, "input_dec_scale_f32")
        packed = xp.new_zeros(g.rows, xp.shape[1] // 2, dtype=torch.uint8)
        sf = None
        for ex in range(e):
            p_e, sf_e, _ = self._impl.quantize_nvfp4_static(xp, d[ex:ex + 1], num_valid_rows_i32=g.valid_rows_i32)
            sf_e = sf_e[:g.rows]
            packed = _keep_tiles_of(ex, g, p_e, packed)
            sf = _keep_tiles_of(ex, g, sf_e, torch.zeros_like(sf_e) if sf is None else sf)
        return QuantizedAct(packed[g.row_map_i64], sf, d.clone())

    # ---------------------------------------------------------------- GEMMs

    def dense_gemm(self, a: QuantizedAct, w: hb.Sm100Nvfp4Weight) -> Tensor:
        """a (packed [M, K/2], 128x4 scales, global_dec_f32 [1]) x w (prepare_linear) -> bf16 [M, N],
        alpha = a.global_dec_f32 * w's weight_scale_2 (one float32 product)."""
        if isinstance(w, Sm100Fp8Linear):
            raise NotImplementedError(f"sm100: {w.module} is FP8 block-128: dense_gemm takes NVFP4 activations; its "
                                      "FP8 activations and GEMM run through dense_linear")
        if not isinstance(w, hb.Sm100Nvfp4Weight) or w.num_batches != 1:
            raise TypeError(f"w: expected prepare_linear's Sm100Nvfp4Weight of one linear, got {type(w).__name__}")
        alpha = a.global_dec_f32.to(torch.float32).reshape(1) * w.dec_scale_f32.reshape(1)
        return self._impl.gemm_nvfp4(a.packed_u8, a.sf_swizzled_u8, w.packed_u8[0], w.sf_swizzled_u8[0], alpha)

    def grouped_gemm(self, a: QuantizedAct, offsets_i32: Tensor, experts: Sm100Experts, *,
                     layer: str) -> Tensor | tuple[Tensor, Tensor]:
        """Grouped boundary activations (packed [R, K/2], scales [P, Cp] with P a multiple of 128 holding the
        padded total, global_dec_f32 [E] or [1]) x expert stack -> l1: (gate, up) bf16 [R, I] each (w1 and w3
        as two plain grouped GEMMs); l2: y bf16 [R, H]. Rows in the boundary's order."""
        if layer not in ("l1", "l2"):
            raise ValueError(f"layer={layer!r}: expected 'l1' or 'l2'")
        g = _grouped_rows(offsets_i32, a.packed_u8.shape[0], a.sf_swizzled_u8.shape[0])
        a_pad = _scatter_rows(a.packed_u8, g)
        ones = _ones_f32(a_pad.device)

        def run(w: hb.Sm100Nvfp4Weight) -> Tensor:
            w_a = _with_act_dec(w, a.global_dec_f32, "a.global_dec_f32")
            y = self._impl.grouped_gemm_nvfp4(a_pad, a.sf_swizzled_u8, ones, w_a, g.tile_expert_i32,
                                              num_valid_rows_i32=g.valid_rows_i32)
            return y[g.row_map_i64]

        if layer == "l1":
            return run(experts.w1), run(experts.w3)
        return run(experts.w2)

    def l1_fused(self, a: QuantizedAct, offsets_i32: Tensor, experts: Sm100Experts, *, swiglu_limit: float | None,
                 input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """Grouped L1 GEMM + clamped SwiGLU + NVFP4 quantization of h in one kernel (static only).

        a: grouped boundary activations (as grouped_gemm); input_dec_scale_f32: float32 [E], w2's static
        input_scale per expert (S = 1/D[e]; one launch per expert, the other experts' tiles skipped).
        -> packed h [R, I/2] (boundary order), scales [P, round_up(I/16,4)] (a's padded rows), global_dec [E] = D.
        """
        if input_dec_scale_f32 is None:
            raise NotImplementedError(_DYNAMIC_L1_FUSED)
        if experts.w13 is None:
            raise NotImplementedError(experts.w13_reason)
        e = _num_experts(offsets_i32)
        d = _per_expert_scale(input_dec_scale_f32, e, "input_dec_scale_f32")
        s = torch.reciprocal(d)  # S = 1/D, as the quantizer forms it from an input_scale
        g = _grouped_rows(offsets_i32, a.packed_u8.shape[0], a.sf_swizzled_u8.shape[0])
        a_pad = _scatter_rows(a.packed_u8, g)
        w13 = _with_act_dec(experts.w13, a.global_dec_f32, "a.global_dec_f32")
        ones, limit = _ones_f32(a_pad.device), _swiglu_limit(swiglu_limit)
        packed = sf = None
        for ex in range(e):
            only_ex = torch.where(g.tile_expert_i32 == ex, g.tile_expert_i32, torch.full_like(g.tile_expert_i32, -1))
            p_e, sf_e = self._impl.grouped_gemm_swiglu_nvfp4(a_pad, a.sf_swizzled_u8, ones, w13, only_ex, limit,
                                                             s[ex:ex + 1], num_valid_rows_i32=g.valid_rows_i32)
            packed = _keep_tiles_of(ex, g, p_e, torch.zeros_like(p_e) if packed is None else packed)
            sf = _keep_tiles_of(ex, g, sf_e, torch.zeros_like(sf_e) if sf is None else sf)
        return QuantizedAct(packed[g.row_map_i64], sf, d.clone())

    # ---------------------------------------------------------------- routing

    def router(self, x_bf16: Tensor, router: Sm100Router, *, token_ids_i64: Tensor | None = None) -> RoutingOut:
        """x [T, H] bf16 -> ids [T, k] int64, weights [T, k] float32 (moe_routing: fp32 logits,
        sqrt(softplus), top-k of s + bias or tid2eid[token_ids], renormalised x routed_scaling_factor)."""
        r = self._route(x_bf16, router, token_ids_i64)
        return RoutingOut(r.ids_i64, r.weights_f32)

    def _route(self, x_bf16: Tensor, router: Sm100Router, token_ids_i64: Tensor | None,
               num_valid_tokens_i32: Tensor | None = None) -> moe_routing.Routing:
        self._torch_device = x_bf16.device
        if not isinstance(router, Sm100Router):
            raise TypeError(f"router: expected prepare_router's Sm100Router, got {type(router).__name__}")
        return self._impl.router(x_bf16, router.gate_weight_bf16, top_k=router.top_k,
                                 routed_scaling_factor=router.routed_scaling_factor, bias_f32=router.bias_f32,
                                 tid2eid_i64=router.tid2eid_i64,
                                 token_ids_i64=token_ids_i64 if router.tid2eid_i64 is not None else None,
                                 num_valid_tokens_i32=num_valid_tokens_i32)

    def dispatch(self, ids_i64: Tensor, num_experts: int) -> Dispatched:
        """ids [T, k] int64 -> expert-sorted rows (stable: token-major within an expert): row_token [T*k],
        row_slot [T*k] int64, offsets [E+1] int32 (from moe_routing.permute, padding removed)."""
        if not isinstance(ids_i64, Tensor) or ids_i64.dtype != torch.int64 or ids_i64.dim() != 2:
            raise ValueError(f"ids_i64: expected int64 [T, k], got {getattr(ids_i64, 'dtype', type(ids_i64).__name__)} "
                             f"{tuple(getattr(ids_i64, 'shape', ()))}")
        t, k = ids_i64.shape
        self._torch_device = ids_i64.device
        perm = self._impl.permute(ids_i64, num_experts)
        flat = ids_i64.reshape(-1)
        row_of_pair = perm.row_of_pair_i64 - perm.padded_offsets_i64[flat] + perm.offsets_i64[flat]
        pair = torch.arange(t * k, device=ids_i64.device)
        row_token = torch.empty_like(pair)
        row_slot = torch.empty_like(pair)
        row_token[row_of_pair] = pair // k
        row_slot[row_of_pair] = pair % k
        return Dispatched(row_token, row_slot, perm.offsets_i64.to(torch.int32), k)

    def combine(self, y_rows_bf16: Tensor, d: Dispatched, weights_f32: Tensor | None) -> Tensor:
        """y rows [R, H] bf16 (the boundary's expert-sorted order) -> bf16 [T, H]: per token the float32 sum,
        in slot order, of weight[t, slot] * y[row of (t, slot)] (moe_routing's combine)."""
        if weights_f32 is None:
            raise NotImplementedError(_COMBINE_NO_WEIGHTS)
        t, k = weights_f32.shape
        if d.row_token_i64.numel() != t * k:
            raise ValueError(f"d: {d.row_token_i64.numel()} rows, but weights_f32 {tuple(weights_f32.shape)} "
                             f"has T*k = {t * k} pairs")
        self._torch_device = y_rows_bf16.device
        row_of_pair = torch.empty_like(d.row_token_i64)
        row_of_pair[d.row_token_i64 * k + d.row_slot_i64] = torch.arange(t * k, device=d.row_token_i64.device)
        return moe_routing.combine_rows_bf16(y_rows_bf16, row_of_pair, weights_f32)

    # ---------------------------------------------------------------- whole calls

    def dense_linear(self, x_bf16: Tensor, w: hb.Sm100Nvfp4Weight | Sm100Fp8Linear, *,
                     input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """x [M, K] bf16 -> bf16 [M, N]. NVFP4: quantize (static input_scale, else dynamic) + dense GEMM.
        FP8 block-128: linear_fp8 (dynamic per-token 1x128 UE8M0 activations, then the block-scaled GEMM);
        a static per-tensor FP8 input_scale is refused."""
        if isinstance(w, Sm100Fp8Linear):
            if input_dec_scale_f32 is not None:
                raise NotImplementedError(f"sm100: {w.module} is FP8 block-128 with dynamic per-token 1x128 "
                                          "activation scales; a static per-tensor FP8 input_scale is not served")
            return self._impl.linear_fp8(x_bf16, w.weight)
        return self._impl.linear_nvfp4(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)

    def moe_block(self, x_bf16: Tensor, router: Sm100Router, experts: Sm100Experts, *,
                  swiglu_limit: float | None, weight_placement: str, act_scale: str,
                  token_ids_i64: Tensor | None = None, num_valid_tokens_i32: Tensor | None = None) -> Tensor:
        """x [T, H] bf16 -> routed experts' output bf16 [T, H]: Sm100Kernels.router, then moe_experts
        (permute, quantize, L1 + SwiGLU, requantize, L2, combine after w2). Static: the one input_scale
        all experts share (moe_experts takes one)."""
        if weight_placement not in _PLACEMENTS:
            raise ValueError(f"weight_placement={weight_placement!r}: expected one of {_PLACEMENTS}")
        if act_scale not in _ACT_SCALES:
            raise ValueError(f"act_scale={act_scale!r}: expected one of {_ACT_SCALES}")
        if weight_placement == "before_w2":
            raise NotImplementedError(_BEFORE_W2)
        if experts.w13 is None:
            raise NotImplementedError(experts.w13_reason)
        s1 = s2 = None
        if act_scale == "static":
            if experts.l1_shared_dec_f32 is None or experts.l2_shared_dec_f32 is None:
                raise NotImplementedError(experts.static_reason)
            s1, s2 = experts.l1_shared_dec_f32, experts.l2_shared_dec_f32
        routing = self._route(x_bf16, router, token_ids_i64, num_valid_tokens_i32)
        return self._impl.moe_experts(x_bf16, routing, experts.w13, experts.w2,
                                      swiglu_limit=_swiglu_limit(swiglu_limit),
                                      l1_input_dec_scale_f32=s1, l2_input_dec_scale_f32=s2,
                                      num_valid_tokens_i32=num_valid_tokens_i32)


@contextlib.contextmanager
def _sm100_recorder(adapter: Sm100Adapter):
    builds: list[KernelBuild] = []
    adapter._torch_device = None
    with adapter._impl.recording_launches() as launched:
        yield builds
    builds.extend(KernelBuild(f"cute:{name}", arch, "cute-dsl") for name, arch in dict.fromkeys(launched))
    if adapter._torch_device is not None:
        builds.append(torch_build("torch (kernels.sm100.moe_routing)", adapter._torch_device))


def _nvfp4(lin: Linear) -> Nvfp4Linear:
    if not isinstance(lin, Nvfp4Linear):
        fmt = getattr(lin, "format", type(lin).__name__)
        raise NotImplementedError(f"sm100: {getattr(lin, 'module', '?')} is {fmt}; the sm100 GEMMs take NVFP4 "
                                  "weights only")
    return lin


def _shared_scale(s: Tensor | None, module: str) -> tuple[Tensor | None, str | None]:
    """(s[:1], None) when every expert's static scale is bit-equal (moe_experts takes one), else (None, why).
    Preparation time: reads the scales on the host."""
    if s is None:
        return None, f"sm100: act_scale='static' needs {module}.input_scale, which the checkpoint lacks"
    bits = s.view(torch.int32)
    if bool((bits == bits[:1]).all()):
        return s[:1].clone(), None
    return None, (f"sm100: moe_block with act_scale='static' needs one input_scale for all experts (moe_experts "
                  f"quantizes every expert's rows with one global scale); {module}.input_scale differs across "
                  f"the {s.numel()} experts")
