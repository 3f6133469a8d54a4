"""`python -m verify selftest`: the suite catches each bug class that has shipped elsewhere, on YOUR backend.

Each injector wraps the chosen backend (any backend: it only transforms what crosses the protocol,
the checkpoint tensors going into `prepare_*` or the boundary tensors coming out of an op) with one
bug from NVFP4_FACTS.md section 6, runs every stage's verdicts on the checkpoint's layers (the
same run_layer as `verify layer`), and checks two things:
  caught   at least one verdict fails;
  blamed   every failing verdict belongs to a stage that uses the corrupted op (the stage table's
           ops), so the report points at the right place.
A bug whose stages the backend does not serve on this device is "not applicable" (reported).
Prints a table (bug -> stage/check that caught it -> first line of the message); exit 1 when an
injected bug passes or is blamed on another stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from references import layouts as ref_layouts
from references.codecs import e4m3_bytes_to_f32, f32_to_e4m3_bytes, f32_to_ue8m0_bytes, ue8m0_bytes_to_f32
from references.fp8_act import (FP8_ACT_GROUP, FP8_ACT_UE8M0, f32_to_e4m3_bytes_group_scaled, group_amax_f32_1x128,
                                quantize_act_fp8_1x128)
from references.fp8_gemm import fp8_block_gemm_narrow_acc_model
from references.fp8_weight import fp8_weight_from_v3_weight_scale_inv, fp8_weight_from_v4_e8m0_scale
from references.layer import RunOptions
from references.linear import Nvfp4Weight, nvfp4_global_scale_for
from references.modes import W4A16, linear_in_mode
from references.nvfp4 import (
    amax_by_recipe, block_scale_f32, e2m1_codes_with_scale, e2m1_grid_values, pack_e2m1x2_low_first,
    unpack_e2m1x2_low_first,
)
from references.stages import STAGES, Check, Op, Stage
from verify.backends import Backend, Fp8QuantizedAct, NumericsMode, QuantizedAct, RoutingOut
from verify.backends.emulator import fp8_act_recipe_for_rule, fp8_act_scale_fmt
from verify.backends.registry import BACKEND_HELP, backend_arg
from verify.checkpoint import Checkpoint, Fp8BlockLinear, GatedMlp, Nvfp4Linear
from verify.config import GOLDEN_DIR, positive_int
from verify.reference_layer import LayerInputs, to_reference_weight
from verify.run import run_layer

__all__ = ["INJECTORS", "Injector", "Bugged", "SelftestRow", "selftest", "with_tie_rows", "add_selftest_arguments",
           "cli_selftest"]


# ============================================================================= corrupting checkpoint tensors


def _transpose_scales(lin):
    """The block-scale matrix laid out transposed ([K/16, N] bytes read back as [N, K/16])."""
    if not isinstance(lin, Nvfp4Linear):
        return lin
    sf = lin.weight_scale_e4m3
    return dataclasses.replace(lin, weight_scale_e4m3=sf.transpose(-1, -2).contiguous().reshape(sf.shape))


def _n_major(lin):
    """An N-major weight passed as K-major: the [N, K] codes stored transposed, read back row-major."""
    if not isinstance(lin, Nvfp4Linear):
        return lin
    codes = unpack_e2m1x2_low_first(lin.weight_u8)
    n, k = codes.shape[-2:]
    bad = codes.transpose(-1, -2).contiguous().reshape(codes.shape)
    return dataclasses.replace(lin, weight_u8=pack_e2m1x2_low_first(bad).reshape(lin.weight_u8.shape))


def _global_scale(fn: Callable):
    def apply(lin):
        if not isinstance(lin, Nvfp4Linear):
            return lin
        return dataclasses.replace(lin, weight_scale_2_f32=fn(lin.weight_scale_2_f32))
    return apply


def _mlp(experts: GatedMlp, fn) -> GatedMlp:
    return GatedMlp(fn(experts.w1), fn(experts.w3), fn(experts.w2))


def _gate_up_halved(experts: GatedMlp) -> GatedMlp:
    """w1 | w3 interleaved per expert in groups of G/2 rows and split again in groups of G."""
    w1, w3 = experts.w1, experts.w3
    if not isinstance(w1, Nvfp4Linear):
        return experts
    n = w1.weight_u8.shape[-2]
    g = max(2, n // 4)

    def split(a, b):
        out = [ref_layouts.deinterleave_gate_up(ref_layouts.interleave_gate_up(a[e], b[e], granularity=g // 2),
                                                granularity=g) for e in range(a.shape[0])]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    p1, p3 = split(w1.weight_u8, w3.weight_u8)
    s1, s3 = split(w1.weight_scale_e4m3.view(torch.uint8), w3.weight_scale_e4m3.view(torch.uint8))
    e4 = w1.weight_scale_e4m3.dtype
    return GatedMlp(dataclasses.replace(w1, weight_u8=p1, weight_scale_e4m3=s1.view(e4)),
                    dataclasses.replace(w3, weight_u8=p3, weight_scale_e4m3=s3.view(e4)), experts.w2)


def _fill_padding(a: QuantizedAct, offsets_i32: torch.Tensor, byte: int) -> QuantizedAct:
    off = offsets_i32.to(torch.int64)
    real, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(
        torch.ones(int(off[-1]), a.k // 16, dtype=torch.uint8, device=off.device), off)
    sf = a.sf_swizzled_u8.clone()
    pad = torch.ones_like(sf, dtype=torch.bool)
    pad[:real.shape[0]] = real == 0
    sf[pad] = byte
    return QuantizedAct(a.packed_u8, sf, a.global_dec_f32)


def _k_vs_n_packing(lin):
    """The codes packed two per byte along N instead of K ([N, K] -> pairs of rows), stored as [N, K/2]."""
    if not isinstance(lin, Nvfp4Linear):
        return lin
    codes = unpack_e2m1x2_low_first(lin.weight_u8)
    along_n = pack_e2m1x2_low_first(codes.transpose(-1, -2).contiguous())  # [..., K, N/2]
    return dataclasses.replace(lin, weight_u8=along_n.reshape(lin.weight_u8.shape))


def _one_weight_scale_2(experts: GatedMlp) -> GatedMlp:
    """Gate and up with different weight_scale_2, the gate's used for both (vLLM/SGLang did this)."""
    w1, w3 = experts.w1, experts.w3
    if not isinstance(w1, Nvfp4Linear) or not isinstance(w3, Nvfp4Linear):
        return experts
    return GatedMlp(w1, dataclasses.replace(w3, weight_scale_2_f32=w1.weight_scale_2_f32.clone()), experts.w2)


_E2M1_TIES_BELOW_EVEN = (0.25, 1.25, 2.5, 5.0)  # ties whose even neighbour is the smaller magnitude


def _global_for(x_bf16: torch.Tensor, recipe, scale) -> torch.Tensor:
    return next(iter(nvfp4_global_scale_for(x_bf16, recipe=recipe, input_scale_f32=scale).values()))


def _ties_away(a: QuantizedAct, x_bf16: torch.Tensor, recipe, scale, *, e4m3: bool) -> QuantizedAct:
    """a with its ties rounded away from zero: E2M1 codes (e4m3=False: |x * enc| exactly 0.25, 1.25, 2.5
    or 5 goes up one code instead of to the even one below) or E4M3 block scales (e4m3=True: a float32
    block scale exactly between two E4M3 values whose even one is below takes the byte above, and the
    block's codes follow that scale). Ties are found on x with the backend's own scale bytes and the
    references' global scale (the one the bytes verdict requires)."""
    m, k = x_bf16.shape
    g = _global_for(x_bf16, recipe, scale)
    xb = x_bf16.float().reshape(m, k // 16, 16)
    sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=k // 16)
    codes = unpack_e2m1x2_low_first(a.packed_u8).reshape(m, k // 16, 16)
    if not e4m3:
        y = e2m1_grid_values(xb, sf, recipe=recipe, global_scale_f32=g).abs()
        tie = torch.zeros_like(y, dtype=torch.bool)
        for t in _E2M1_TIES_BELOW_EVEN:
            tie |= y == t
        codes = torch.where(tie, codes + 1, codes)  # magnitude + 1, sign bit kept (no carry: mag <= 6)
        return QuantizedAct(pack_e2m1x2_low_first(codes.reshape(m, k)), a.sf_swizzled_u8, a.global_dec_f32)
    s32 = block_scale_f32(amax_by_recipe(xb, recipe, dim=-1), recipe=recipe, global_scale_f32=g).double()
    up = torch.clamp(sf.to(torch.int16) + 1, max=0x7E).to(torch.uint8)
    mid = (e4m3_bytes_to_f32(sf).double() + e4m3_bytes_to_f32(up).double()) / 2
    tie = (s32 == mid) & (up != sf) & (sf & 1 == 0)
    sf_new = torch.where(tie, up, sf)
    new_codes = e2m1_codes_with_scale(xb, sf_new, recipe=recipe, global_scale_f32=g)
    codes = torch.where(tie[..., None], new_codes, codes)
    return QuantizedAct(pack_e2m1x2_low_first(codes.reshape(m, k)), ref_layouts.sf_linear_to_swizzled_128x4(sf_new),
                        a.global_dec_f32)


def with_tie_rows(inputs: LayerInputs) -> LayerInputs:
    """The layer inputs with the last token's x_attn and x_ffn rows replaced by a row of exact ties that
    also holds the tensor's amax (so a dynamic global scale S = 2688/amax is a power of two): block 0 holds
    amax = 21 * 2^j; blocks 1..4 have a block scale of exactly 1.0 and elements x * enc exactly +-0.25,
    1.25, 2.5, 5 (E2M1 ties whose even code is the smaller); blocks 5..8 have block scales v * S / 6
    exactly 1.0625 and 1.3125 (E4M3 midpoints whose even byte is the smaller). Random data almost never
    holds an exact tie, so a tie-rounding bug needs these to be seen."""
    def tied(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        j = math.ceil(math.log2(max(float(x.float().abs().max()), 1e-30) / 21.0))
        unit = 2.0 ** (j - 7)  # = 1 / S: x * enc = x / unit where the block scale is 1.0
        row = torch.zeros(k, dtype=torch.float64)
        row[0] = 21.0 * 2.0**j
        ties = torch.tensor([6.0, 0.25, -1.25, 2.5, -5.0, 1.25, -0.25, 5.0, -2.5, 0.75, 3.0, -6.0, 1.0, 0.5, 2.0, 4.0])
        for b in range(1, 5):
            if 16 * b + 16 <= k:
                row[16 * b:16 * b + 16] = ties.roll(b).double() * unit
        for b, v in zip(range(5, 9), (6.375, 7.875, -6.375, 7.875)):  # block scales 1.0625, 1.3125
            if 16 * b + 16 <= k:
                row[16 * b] = v * unit
                row[16 * b + 1:16 * b + 16] = ties[1:].double() * (abs(v) / 6.0) * unit
        out = x.clone()
        out[-1] = row.to(torch.bfloat16).to(x.device)
        return out

    return LayerInputs(inputs.token_ids_i64, tied(inputs.x_attn_bf16), tied(inputs.x_ffn_bf16))


# ============================================================================= FP8 block-128 bugs (NVFP4_FACTS 5b)


def _e8m0_read_as_numbers(lin):
    """A V4 `.scale` (F8_E8M0 bytes) copied into float32 as numbers: byte b becomes the scale b, not 2^(b-127)."""
    if not isinstance(lin, Fp8BlockLinear) or lin.scale_ue8m0 is None:
        return lin
    return dataclasses.replace(lin, scale_ue8m0=None, scale_inv_f32=lin.scale_ue8m0.view(torch.uint8).to(torch.float32))


def _fp8_scale_grid_transposed(lin):
    """The [ceil(N/128), ceil(K/128)] block-scale grid laid out transposed (read back row-major): invisible
    where the grid is one row or one column (the same bytes in the same order)."""
    if not isinstance(lin, Fp8BlockLinear):
        return lin
    field = "scale_ue8m0" if lin.scale_ue8m0 is not None else "scale_inv_f32"
    s = getattr(lin, field)
    return dataclasses.replace(lin, **{field: s.transpose(-1, -2).contiguous().reshape(s.shape)})


def _ue8m0_rounded_down(a: Fp8QuantizedAct, x_bf16: torch.Tensor) -> Fp8QuantizedAct:
    """a (UE8M0 rule) with every group scale rounded DOWN to a power of two (2^floor(log2(amax/448))) instead
    of up, and its codes encoded with that scale (saturating at 448): other bytes wherever amax/448 is not a
    power of two."""
    if a.scale_rule != "ue8m0_ceil":
        return a
    m, k = x_bf16.shape
    pad = (-k) % FP8_ACT_GROUP
    xg = torch.nn.functional.pad(x_bf16.to(torch.float32), (0, pad)).view(m, (k + pad) // FP8_ACT_GROUP, FP8_ACT_GROUP)
    amax = group_amax_f32_1x128(xg, amax_nan=FP8_ACT_UE8M0.amax_nan)
    s = torch.clamp(amax, min=FP8_ACT_UE8M0.amax_floor_f32) / torch.tensor(448.0, device=amax.device)
    down = f32_to_ue8m0_bytes(s, rounding="floor")
    codes = f32_to_e4m3_bytes_group_scaled(xg, ue8m0_bytes_to_f32(down), encode_rule="divide").flatten(1)[:, :k]
    return Fp8QuantizedAct(codes.contiguous(), down, a.scale_rule)


@dataclass(frozen=True)
class _UnpromotedFp8:
    """An FP8 block-128 linear for the promotion-skipped bug: the checkpoint linear (its references' weight and
    the activation scale rule its scales imply) and the wrapped backend's own operand."""

    weight: object
    scale_rule: str
    inner: object


_NARROW_ACC_BITS = 14           # Hopper's FP8 wgmma accumulator (NVFP4_FACTS 5b), truncating
_NARROW_DECLARED = (2.0**-13, 128)  # what the bugged backend declares: (fp8_u_acc, fp8_promotion_interval)


def _unpromoted(lin, inner_prepared) -> _UnpromotedFp8:
    w = (fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
         if lin.scale_ue8m0 is not None else
         fp8_weight_from_v3_weight_scale_inv(lin.weight_e4m3, lin.scale_inv_f32, module=lin.module))
    rule = {"ue8m0": "ue8m0_ceil", "f32": "f32"}[fp8_act_scale_fmt(to_reference_weight(lin))]
    return _UnpromotedFp8(w, rule, inner_prepared)


def _fp8_swallowing(layer, inputs: LayerInputs) -> tuple[object, LayerInputs]:
    """Data on which a skipped float32 promotion shows (the layer's first FP8 attention projection, wq_a or
    q_a_proj, K = 256 or more): its weight row 0 is 64 at k = 0 and 1.875 elsewhere (codes; every block scale
    set to block [0, 0]'s), the last token's x_attn is 256 at k = 0 and 1 elsewhere. Output (last token, 0):
    the first product is 2^14 block-scale units, every later one 1.875 (below the 14-bit accumulator's ulp of
    2 there), so a truncating accumulator drops them all when it never promotes (error 255 x 1.875 against a
    bound of about 330), and only group 0's 127 when it promotes every 128 (within the bound)."""
    name = next((n for n in ("wq_a", "q_a_proj") if isinstance(layer.attention.get(n), Fp8BlockLinear)), None)
    if name is None or layer.attention[name].weight_e4m3.shape[-1] < 2 * FP8_ACT_GROUP:
        return layer, inputs
    lin = layer.attention[name]
    w = e4m3_bytes_to_f32(lin.weight_e4m3.view(torch.uint8))
    w[0] = 1.875
    w[0, 0] = 64.0
    codes = f32_to_e4m3_bytes(w, saturate=True).view(torch.float8_e4m3fn)
    field = "scale_ue8m0" if lin.scale_ue8m0 is not None else "scale_inv_f32"
    s = getattr(lin, field)
    flat = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s
    same = flat.reshape(-1)[:1].expand(flat.shape).clone()
    new = dataclasses.replace(lin, weight_e4m3=codes, **{field: same.view(s.dtype)})
    layer = dataclasses.replace(layer, attention={**layer.attention, name: new})
    x = inputs.x_attn_bf16.clone()
    x[-1] = 1.0
    x[-1, 0] = 256.0
    return layer, LayerInputs(inputs.token_ids_i64, x, inputs.x_ffn_bf16)


@dataclass(frozen=True)
class _W4A16Linear:
    """declares-w4a4-computes-w4a16: the NVFP4 weight a dense_linear multiplies in W4A16 (bf16 activations)."""

    weight: Nvfp4Weight
    inner: object  # the wrapped backend's own prepared weight (its dense_gemm on the NVFP4 boundary stays honest)


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


# ============================================================================= the wrapper


class Bugged:
    """A backend with one injected bug; every other op is the wrapped backend's, called explicitly."""

    def __init__(self, inner: Backend, bug: str) -> None:
        self.inner, self.bug = inner, bug
        self.name = f"{inner.name}+{bug}"
        self.recipe, self.u_acc = inner.recipe, inner.u_acc
        self.fp8_u_acc = getattr(inner, "fp8_u_acc", None)  # its FP8 GEMMs' accumulator (Backend docstring)
        self.fp8_promotion_interval = getattr(inner, "fp8_promotion_interval", None)
        if bug == "fp8-promotion-skipped":  # declares what a promoting Hopper FP8 GEMM has, computes without it
            self.fp8_u_acc, self.fp8_promotion_interval = _NARROW_DECLARED
        self.graph_safe = getattr(inner, "graph_safe", True)
        self.supports_valid_tokens = getattr(inner, "supports_valid_tokens", False)

    def unsupported_reason(self, op, device):
        return self.inner.unsupported_reason(op, device)

    # ---- prepare: corrupt the checkpoint tensors on their way in
    _LINEAR_BUGS = {"untransposed-scale-matrix": _transpose_scales, "n-major-weight-as-k-major": _n_major,
                    "k-vs-n-packing": _k_vs_n_packing,
                    "global-scale-inverted": _global_scale(torch.reciprocal),
                    "global-scale-dropped": _global_scale(torch.ones_like),
                    "e8m0-scale-read-as-a-number": _e8m0_read_as_numbers,
                    # a load-time repack folding weight_scale_2 in twice (issue 24): blamed on prepare when the
                    # backend decodes its prepared weights (dequantize_prepared), else on the GEMMs' bound
                    "prepare-scale-applied-twice": _global_scale(lambda s: s * s),
                    "fp8-scale-grid-transposed": _fp8_scale_grid_transposed}

    def numerics_mode(self, op, weight_format):
        """The inner backend's declaration (w4a4 by default); declares-w4a4-computes-w4a16 says w4a4 for NVFP4."""
        if self.bug == "declares-w4a4-computes-w4a16" and weight_format == "nvfp4":
            return NumericsMode.W4A4
        fn = getattr(self.inner, "numerics_mode", None)
        if fn is not None:
            return fn(op, weight_format)
        return NumericsMode.FP8_BLOCK if weight_format == "fp8_block" else NumericsMode.W4A4  # Backend's defaults

    def dequantize_prepared(self, prepared):
        if self.bug != "prepare-scale-applied-twice":  # the other weight bugs stay the GEMM verdicts' to catch
            raise NotImplementedError("not served: the selftest wrapper decodes prepared weights for "
                                      "prepare-scale-applied-twice only")
        return self.inner.dequantize_prepared(prepared)

    def prepare_linear(self, lin):
        if self.bug == "declares-w4a4-computes-w4a16" and isinstance(lin, Nvfp4Linear):
            # dense_linear computes W4A16 with references.modes; dense_gemm keeps the inner backend's operand
            return _W4A16Linear(to_reference_weight(lin), self.inner.prepare_linear(lin))
        w = self.inner.prepare_linear(self._LINEAR_BUGS.get(self.bug, lambda x: x)(lin))
        if self.bug == "fp8-promotion-skipped" and isinstance(lin, Fp8BlockLinear):
            return _unpromoted(lin, w)
        return w

    def prepare_experts(self, experts):
        if self.bug in self._LINEAR_BUGS:
            experts = _mlp(experts, self._LINEAR_BUGS[self.bug])
        if self.bug == "gate-up-interleave-halved":
            experts = _gate_up_halved(experts)
        if self.bug == "one-weight-scale-2-for-gate-and-up":
            experts = _one_weight_scale_2(experts)
        return self.inner.prepare_experts(experts)

    def prepare_router(self, router, spec):
        if self.bug == "router-ties-to-higher-id" and router.tid2eid_i64 is None:
            router = dataclasses.replace(router, gate_weight_bf16=router.gate_weight_bf16.flip(0),
                                         gate_bias_f32=None if router.gate_bias_f32 is None else router.gate_bias_f32.flip(0))
        return self.inner.prepare_router(router, spec)

    # ---- forward ops
    def quantize(self, x_bf16, *, input_dec_scale_f32=None):
        if self.bug == "static-scale-used-as-dynamic":
            input_dec_scale_f32 = None
        if self.bug == "global-amax-of-part-of-the-tensor" and input_dec_scale_f32 is None and x_bf16.shape[0] > 1:
            # a cross-CTA amax reduction that lost a race: the global scale from the first row only
            input_dec_scale_f32 = (amax_by_recipe(x_bf16[:1], self.recipe).float() / 2688.0).reshape(1)
        a = self.inner.quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)
        if self.bug in ("e2m1-ties-away-from-zero", "e4m3-scale-ties-away-from-zero"):
            a = _ties_away(a, x_bf16, self.recipe, input_dec_scale_f32, e4m3=self.bug.startswith("e4m3"))
        if self.bug == "activation-global-scale-dropped":
            a = QuantizedAct(a.packed_u8, a.sf_swizzled_u8, torch.ones_like(a.global_dec_f32))
        if self.bug == "swapped-nibbles":
            a = QuantizedAct((a.packed_u8 >> 4) | ((a.packed_u8 & 0xF) << 4), a.sf_swizzled_u8, a.global_dec_f32)
        if self.bug == "every-code-sign-flipped":  # the bound passes it (the GEMM's own operands), the bytes not
            a = QuantizedAct(a.packed_u8 ^ 0x88, a.sf_swizzled_u8, a.global_dec_f32)
        return a

    def quantize_fp8(self, x_bf16, *, scale_rule):
        a = self.inner.quantize_fp8(x_bf16, scale_rule=scale_rule)
        if self.bug == "fp8-ue8m0-scale-rounded-down":
            a = _ue8m0_rounded_down(a, x_bf16)
        return a

    def grouped_quantize(self, rows_bf16, offsets_i32, *, input_dec_scale_f32=None):
        a = self.inner.grouped_quantize(rows_bf16, offsets_i32, input_dec_scale_f32=input_dec_scale_f32)
        return self._padding(a, offsets_i32)

    def _padding(self, a: QuantizedAct, offsets_i32) -> QuantizedAct:
        """The padding bugs: a grouped quantizer (act_quant or requant) writing 0xFF / 0x7F into padding."""
        if self.bug in ("garbage-in-scale-padding", "nan-in-scale-padding"):
            a = _fill_padding(a, offsets_i32, 0xFF if self.bug.startswith("garbage") else 0x7F)
        return a

    def dense_gemm(self, a, w):
        return self._row_off(self.inner.dense_gemm(a, w.inner if isinstance(w, _W4A16Linear) else w))

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        y = self.inner.grouped_gemm(a, offsets_i32, experts, layer=layer)
        return tuple(self._row_off(t) for t in y) if isinstance(y, tuple) else self._row_off(y)

    def _row_off(self, y):
        """A small local error: one output row 3 % off (a tile edge, a stale accumulator)."""
        if self.bug != "one-output-row-3-percent-off" or y.shape[0] == 0:
            return y
        y = y.clone()
        y[0] = (y[0].float() * 1.03).to(y.dtype)
        return y

    def swiglu_requant(self, gate, up, offsets_i32, *, swiglu_limit, row_weight_f32=None, input_dec_scale_f32=None):
        if self.bug == "swiglu-clamp-dropped":
            swiglu_limit = None
        h, a = self.inner.swiglu_requant(gate, up, offsets_i32, swiglu_limit=swiglu_limit,
                                         row_weight_f32=row_weight_f32, input_dec_scale_f32=input_dec_scale_f32)
        return h, self._padding(a, offsets_i32)

    def l1_fused(self, a, offsets_i32, experts, *, swiglu_limit, input_dec_scale_f32=None):
        if self.bug == "swiglu-clamp-dropped":
            swiglu_limit = None
        return self.inner.l1_fused(a, offsets_i32, experts, swiglu_limit=swiglu_limit,
                                   input_dec_scale_f32=input_dec_scale_f32)

    def router(self, x_bf16, router, *, token_ids_i64=None):
        r = self.inner.router(x_bf16, router, token_ids_i64=token_ids_i64)
        if self.bug == "router-ties-to-higher-id" and token_ids_i64 is None:
            e = getattr(router, "gate_weight_bf16", None)
            n = e.shape[0] if e is not None else int(r.ids_i64.max()) + 1
            r = RoutingOut(n - 1 - r.ids_i64, r.weights_f32)
        if self.bug == "one-clear-winner-swapped" and r.ids_i64.shape[0]:
            ids = r.ids_i64.clone()  # token 0's top expert replaced by the lowest id it did not choose
            cand = torch.arange(ids.shape[1] + 1, device=ids.device)  # k + 1 ids: one is not chosen
            free = (cand[:, None] != ids[0][None, :]).all(dim=1)
            ids[0, 0] = cand[free.to(torch.int32).argmax()]  # on the device: no host sync, graph-safe
            r = RoutingOut(ids, r.weights_f32)
        return r

    def dispatch(self, ids_i64, num_experts):
        return self.inner.dispatch(ids_i64, num_experts)

    def combine(self, y_rows_bf16, d, weights_f32):
        if self.bug == "routing-weight-at-the-wrong-place":
            weights_f32 = None  # as if applied before w2 although the run declares after
        return self.inner.combine(y_rows_bf16, d, weights_f32)

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        """The CUDA-graph killers live here (dense_linear is the call the dense stages' sync and graph
        probes capture); on a CPU tensor they are no-ops, and the probes report 'needs a CUDA device'.
        fp8-promotion-skipped: an FP8 linear computed by references.fp8_gemm's model of a 14-bit truncating
        accumulator that never promotes to float32 (on the references' 1x128 activations)."""
        if isinstance(w, _W4A16Linear):
            return linear_in_mode(x_bf16, w.weight, W4A16, recipe=self.recipe)
        if isinstance(w, _UnpromotedFp8):
            act = quantize_act_fp8_1x128(x_bf16, recipe=fp8_act_recipe_for_rule(w.scale_rule))
            y = fp8_block_gemm_narrow_acc_model(act, w.weight,
                                                acc_bits=_NARROW_ACC_BITS, rounding="truncate", promotion_interval=None)
            return y.to(torch.float32).to(torch.bfloat16)
        if self.bug == "stream-cached-at-first-call" and _on_cuda(x_bf16):
            if not hasattr(self, "_stream"):
                self._stream = torch.cuda.current_stream(x_bf16.device)
            with torch.cuda.stream(self._stream):  # the capture runs on another stream: this escapes it
                return self.inner.dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        y = self._row_off(self.inner.dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32))
        if self.bug == "host-sync-in-a-stage" and _on_cuda(y):
            y.reshape(-1)[0].item()  # a device -> host read: the host waits for the stream
        if self.bug == "buffer-allocated-inside-capture" and _on_cuda(y):
            ones = torch.tensor([1.0], device=y.device)  # a new buffer filled from host memory on every call
            y = (y.float() * ones).to(y.dtype)
        return y

    def moe_block(self, x_bf16, router, experts, **kw):
        if self.bug == "replay-breaks-when-token-count-changes" and _on_cuda(x_bf16) \
                and torch.cuda.is_current_stream_capturing():
            kw = {**kw, "num_valid_tokens_i32": None}  # the count read at capture: replays keep every token
        return self.inner.moe_block(x_bf16, router, experts, **kw)


# ============================================================================= the injectors


def _ops(*ops: Op) -> Callable[[Stage], bool]:
    return lambda s: s.op in ops


_WEIGHTS = _ops(Op.DENSE_LINEAR, Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK)
# a bug in the weights or a GEMM's output: a stage's activation bytes cannot see it (a backend that
# quantizes without a GEMM passes them, and the bug is then not applicable, not MISSED)
_BYTES = (Check.BYTES.value,)
_NOT_BYTES = tuple(c.value for c in Check if c is not Check.BYTES)  # a bug only the quantizer's bytes can see
_FP8 = ("fp8_block128",)
_NVFP4 = ("nvfp4",)  # bugs in NVFP4 weights or the NVFP4 quantizer: an FP8 or BF16 stage cannot show them


@dataclass(frozen=True)
class Injector:
    """bug: name; facts: the NVFP4_FACTS.md section 6 class; blame: stages allowed to fail (the ones
    using the corrupted op); act: the run configuration it needs (static for scale bugs); checks: the
    checks that can see it (None: any; ("sync", "graph") for CUDA-graph killers, which are 'not
    applicable' with the checks' own reason where those checks cannot run); data: what the layer or
    its inputs need for the bug to show ("ties": rows of exact ties, "w13-scales": gate and up with
    different weight_scale_2, "router-ties": two experts with identical gate rows, "fp8-swallowing": the FP8
    wq_a row and token of _fp8_swallowing, "fp8-2d-scale-grid": a layer with an FP8 block-scale grid of more than
    one row and column, else not applicable)."""

    bug: str
    facts: str
    blame: Callable[[Stage], bool]
    act: str = "static"
    checks: tuple[str, ...] | None = None
    data: str | None = None
    blind: tuple[str, ...] = ()  # checks that cannot see it: their passing verdicts do not make it served
    formats: tuple[str, ...] | None = None  # weight formats of the stages that can see it (None: any); a layer
    # whose stages have other formats (an NVFP4 layer for an FP8 bug) neither serves nor misses it


INJECTORS: tuple[Injector, ...] = (
    Injector("swapped-nibbles", "nibble order (element 2i in the low nibble)", _ops(Op.DENSE_LINEAR),
             formats=_NVFP4),
    Injector("untransposed-scale-matrix", "scale matrix layout", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("n-major-weight-as-k-major", "N-major B passed as K-major", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("k-vs-n-packing", "K vs N packing (codes paired along N)", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("global-scale-inverted", "global-scale direction (encode vs decode)", _WEIGHTS, blind=_BYTES,
             formats=_NVFP4),
    Injector("global-scale-dropped", "weight_scale_2 dropped from alpha", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("activation-global-scale-dropped", "activation global scale dropped (output x2400)",
             _ops(Op.DENSE_LINEAR), act="dynamic", formats=_NVFP4),
    Injector("one-weight-scale-2-for-gate-and-up", "gate/up with different weight_scale_2, one used",
             _ops(Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK), data="w13-scales"),
    Injector("static-scale-used-as-dynamic", "static input_scale vs dynamic amax", _ops(Op.DENSE_LINEAR),
             formats=_NVFP4),
    Injector("global-amax-of-part-of-the-tensor", "cross-CTA amax reduction race (garbage global scale)",
             _ops(Op.DENSE_LINEAR), act="dynamic", formats=_NVFP4),
    Injector("e2m1-ties-away-from-zero", "ties rounded away from zero (E2M1 codes)", _ops(Op.DENSE_LINEAR),
             act="dynamic", data="ties", formats=_NVFP4),
    Injector("e4m3-scale-ties-away-from-zero", "ties in the E4M3 block scale rounded away", _ops(Op.DENSE_LINEAR),
             act="dynamic", data="ties", formats=_NVFP4),
    Injector("gate-up-interleave-halved", "gate/up interleave granularity",
             _ops(Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK)),
    Injector("garbage-in-scale-padding", "swizzle padding read or written", _ops(Op.GROUPED_QUANTIZE, Op.SWIGLU_REQUANT)),
    Injector("nan-in-scale-padding", "swizzle padding read or written", _ops(Op.GROUPED_QUANTIZE, Op.SWIGLU_REQUANT)),
    Injector("swiglu-clamp-dropped", "SwiGLU clamp (swiglu_limit)", _ops(Op.SWIGLU_REQUANT, Op.L1_FUSED)),
    Injector("routing-weight-at-the-wrong-place", "routing weight before vs after w2", _ops(Op.COMBINE)),
    Injector("router-ties-to-higher-id", "router tie rule", _ops(Op.ROUTER, Op.MOE_BLOCK), data="router-ties"),
    # CUDA-graph killers (NVFP4_FACTS 6): only the sync / graph probes can see them, on a CUDA device
    Injector("host-sync-in-a-stage", "a host sync (.item()) in the forward path", _ops(Op.DENSE_LINEAR),
             checks=("sync", "graph")),
    Injector("buffer-allocated-inside-capture", "CPU->GPU tensor created in the forward (inside capture)",
             _ops(Op.DENSE_LINEAR), checks=("sync", "graph")),
    Injector("stream-cached-at-first-call", "a stream cached at the first call", _ops(Op.DENSE_LINEAR),
             checks=("graph",)),
    Injector("replay-breaks-when-token-count-changes", "graph replay that fails only when the token count "
             "changes", _ops(Op.MOE_BLOCK), checks=("graph",)),
    # small, local errors: a verdict that passes any of these is too loose
    Injector("one-output-row-3-percent-off", "a local GEMM error (one row)", _ops(Op.DENSE_LINEAR, Op.GROUPED_GEMM),
             blind=_BYTES),
    Injector("every-code-sign-flipped", "E2M1 sign bit", _ops(Op.DENSE_LINEAR), formats=_NVFP4),
    Injector("one-clear-winner-swapped", "router: one token, one expert", _ops(Op.ROUTER)),
    # FP8 block-128 linears (NVFP4_FACTS 5b): the activation quantizer's bytes, the weight's scales, the accumulator
    # numerics mode and load-time prepare (issue 24): a dense linear that says W4A4 and computes W4A16, and a
    # repack that applies weight_scale_2 twice (prepare fails; without dequantize_prepared, the bound)
    Injector("declares-w4a4-computes-w4a16", "numerics mode: W4A16 computed where W4A4 is declared",
             _ops(Op.DENSE_LINEAR), blind=_BYTES, formats=("nvfp4",)),
    Injector("prepare-scale-applied-twice", "load-time repack applying weight_scale_2 twice", _WEIGHTS,
             blind=_BYTES, formats=("nvfp4",)),
    Injector("fp8-ue8m0-scale-rounded-down", "FP8 1x128 activation UE8M0 scale rounded down, not up",
             _ops(Op.DENSE_LINEAR), act="dynamic", blind=_NOT_BYTES, formats=_FP8),
    Injector("e8m0-scale-read-as-a-number", "FP8 weight E8M0 scale bytes read as numbers (b, not 2^(b-127))",
             _ops(Op.DENSE_LINEAR), act="dynamic", blind=_BYTES, formats=_FP8),
    Injector("fp8-scale-grid-transposed", "FP8 weight block-scale grid transposed", _ops(Op.DENSE_LINEAR),
             act="dynamic", blind=_BYTES, data="fp8-2d-scale-grid", formats=_FP8),
    Injector("fp8-promotion-skipped", "FP8 GEMM: 14-bit accumulator never promoted, promotion every 128 declared",
             _ops(Op.DENSE_LINEAR), act="dynamic", blind=_BYTES, data="fp8-swallowing", formats=_FP8),
)


@dataclass
class SelftestRow:
    bug: str
    facts: str
    status: str          # caught / MISSED / MISBLAMED / not applicable
    caught_by: list[str]
    misblamed: list[str]
    message: str


def _tied(layer):
    """Two experts with identical gate rows and biases: exact ties decide some tokens' k-th slot."""
    r = layer.router
    if r is None or r.tid2eid_i64 is not None or r.gate_bias_f32 is None:
        return layer
    g, b = r.gate_weight_bf16.clone(), r.gate_bias_f32.clone()
    e = g.shape[0] // 2
    g[e + 1], b[e + 1] = g[e], b[e]
    return dataclasses.replace(layer, router=dataclasses.replace(r, gate_weight_bf16=g, gate_bias_f32=b))


def selftest(ckpt: Checkpoint, backend: Backend, layers: list[int], *, tokens: int, device: str,
             injectors: tuple[Injector, ...] = INJECTORS, progress=None, on_phase=None) -> list[SelftestRow]:
    """One SelftestRow per injector. progress(row) is called as each injector finishes, on_phase(bug,
    text) as each of its layer runs goes through a phase (for a progress bar)."""
    from verify.layer_report import layer_inputs  # noqa: PLC0415 (layer_report imports the CLI machinery)

    loaded = {i: ckpt.load_layer(i, device=device) for i in layers}
    rows = []
    for inj in injectors:
        why = _cannot_express(inj, backend, device, ckpt.config) or _cannot_see(inj, loaded)
        if why:
            rows.append(SelftestRow(inj.bug, inj.facts, "not applicable", [], [], f"not applicable on {backend.name}: "
                                    f"{why}"))
            if progress is not None:
                progress(rows[-1])
            continue
        bugged = Bugged(backend, inj.bug)
        failed, served, reasons = [], False, []
        for i, layer in loaded.items():
            if inj.data == "router-ties":
                layer = _tied(layer)
            if inj.data == "w13-scales":
                layer = _distinct_gate_up_scales(layer)
            inputs = layer_inputs(ckpt, layer, tokens=tokens, seed=11, device=device)
            if inj.data == "ties":
                inputs = with_tie_rows(inputs)
            if inj.data == "fp8-swallowing":
                layer, inputs = _fp8_swallowing(layer, inputs)
            run = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=inj.act), backend=bugged,
                            on_phase=None if on_phase is None else lambda ph, b=inj.bug, i=i: on_phase(b, f"layer{i} {ph}"))
            seen = [v for v in run.verdicts if _visible(inj, v) and _of_formats(inj, layer, v.stage)]
            served |= any(v.status in ("pass", "fail") for v in seen)
            reasons += [f"layer{i} {v.stage} {v.check}: {v.message}" for v in seen if v.status not in ("pass", "fail")]
            failed += [(i, v) for v in run.failed]
        caught = sorted({f"{v.stage} {v.check}" for _, v in failed if inj.blame(_stage(v.stage))})
        wrong = sorted({f"layer{i} {v.stage} {v.check}" for i, v in failed if not inj.blame(_stage(v.stage))})
        status = "MISBLAMED" if wrong else "caught" if caught else "MISSED" if served else "not applicable"
        if failed:
            first = next((v.message for _, v in failed if inj.blame(_stage(v.stage))), failed[0][1].message)
        elif served:
            first = "every verdict of the corrupted stages passed"
        else:  # say why: the checks' own skip / not-served reason
            first = (f"not applicable on {backend.name} here: {reasons[0]}" if reasons else
                     f"{backend.name} serves none of the stages this bug corrupts here")
        rows.append(SelftestRow(inj.bug, inj.facts, status, caught, wrong, first.splitlines()[0] if first else ""))
        if progress is not None:
            progress(rows[-1])
    return rows


def _cannot_express(inj: Injector, backend: Backend, device: str, config=None) -> str | None:
    """Why this bug cannot be seen here at all: checks that cannot run on this device or backend (the same
    reasons the stage verdicts give), or a backend that cannot carry the bug."""
    if inj.checks is not None and set(inj.checks) <= {"sync", "graph"}:
        if torch.device(device).type != "cuda":
            return f"the {'/'.join(inj.checks)} checks need a CUDA device (running on {device})"
        if not getattr(backend, "graph_safe", True):
            return f"the {backend.name} backend is a reference with host syncs by design (never captured)"
    if inj.bug == "swiglu-clamp-dropped" and config is not None and config.swiglu_limit is None:
        return "the checkpoint has no swiglu_limit (DeepSeek-V3 naming): there is no clamp to drop"
    if inj.bug == "replay-breaks-when-token-count-changes" and not getattr(backend, "supports_valid_tokens", False):
        return ("its moe_block takes no valid-token count, so a graph is never replayed with fewer tokens than "
                "captured (the moe.block graph probe says so in its message)")
    return None


def _judged_fp8_linears(layer) -> list[tuple[str, object]]:
    """(weight role, linear) of every FP8 block-128 linear that a dense stage of the table judges in this layer
    (V3's FP8 attention projections have no stage: a bug there changes no verdict)."""
    out = []
    for s in STAGES:
        if s.op is Op.DENSE_LINEAR and s.kernel and layer.schema in s.schemas and s.unit == "decoder":
            out += [(role, lin) for role in s.weights if isinstance(lin := _weight_of(layer, role), Fp8BlockLinear)]
    return out


def _cannot_see(inj: Injector, loaded: dict) -> str | None:
    """Why the layers themselves cannot show this bug (it changes no byte of what the judged stages compute)."""
    judged = [lin for layer in loaded.values() for _, lin in _judged_fp8_linears(layer)]
    if inj.bug == "e8m0-scale-read-as-a-number" and not any(lin.scale_ue8m0 is not None for lin in judged):
        return ("no judged FP8 linear of these layers stores E8M0 scale bytes (float32 weight_scale_inv or none): "
                "there is no byte to read as a number")
    if inj.data == "fp8-2d-scale-grid" and not any(min(lin.block_dec_scale_f32().shape[-2:]) > 1 for lin in judged):
        return ("every judged FP8 block-scale grid of these layers is one row or one column: transposed, it holds the "
                "same scales in the same order (no byte changes; shown failing bound on a 2-D grid in "
                "verify/tests/test_fp8_bytes.py)")
    if inj.data == "fp8-swallowing" and not any(
            role == "attn.wq_a" and lin.weight_e4m3.shape[-1] >= 2 * FP8_ACT_GROUP
            for layer in loaded.values() for role, lin in _judged_fp8_linears(layer)):
        return ("no judged FP8 attn.wq_a with K >= 256 in these layers to carry the data that exposes a skipped "
                "promotion (a 14-bit accumulator passes the bound on ordinary data)")
    return None


def _of_formats(inj: Injector, layer, stage_name: str) -> bool:
    """The stage's weights in this layer have one of the injector's formats (always true without formats)."""
    if inj.formats is None:
        return True
    return bool(_stage(stage_name).weights) and all(
        getattr(_weight_of(layer, role), "format", None) in inj.formats for role in _stage(stage_name).weights)


def _weight_of(layer, role: str):
    """A stage table weight role ("attn.wq_a", "shared.w1", ...) in a loaded layer, or None."""
    group, name = role.split(".", 1)
    if group == "attn":
        return getattr(layer, "attention", {}).get(name)
    holder = {"shared": "shared_experts", "dense": "dense_mlp", "experts": "experts"}.get(group)
    return getattr(getattr(layer, holder, None), name, None) if holder else None


def _visible(inj: Injector, v) -> bool:
    """A verdict that could see the bug: a stage using the corrupted op and, for injectors with checks, one
    of those checks."""
    return inj.blame(_stage(v.stage)) and (inj.checks is None or v.check in inj.checks) and v.check not in inj.blind


def _distinct_gate_up_scales(layer):
    """w3's weight_scale_2 doubled (its block scales unchanged), so gate and up differ in weight_scale_2 as
    in exports that do not force them equal (the fixture does, like DeepSeek-V4's official export)."""
    ex = layer.experts
    if ex is None or not isinstance(ex.w3, Nvfp4Linear):
        return layer
    w3 = dataclasses.replace(ex.w3, weight_scale_2_f32=ex.w3.weight_scale_2_f32 * 2.0)
    return dataclasses.replace(layer, experts=GatedMlp(ex.w1, w3, ex.w2))


def _stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


# ============================================================================= CLI


def add_selftest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", type=backend_arg,
                   help=f"Backend to wrap with the bug injectors: {BACKEND_HELP}. Default: %(default)r.")
    p.add_argument("--checkpoint", default=str(GOLDEN_DIR / "mini-v4"),
                   help="Checkpoint whose layers the injected runs verify (env NVFP4V_CHECKPOINT). Default: "
                        "%(default)r.")
    p.add_argument("--layers", default=None, help="Layers, e.g. '0,3'. Default: every layer the checkpoint holds.")
    p.add_argument("--tokens", type=positive_int, default=32, help="Tokens per layer. Default: %(default)r.")
    p.add_argument("--device", default="auto", help="Where to run: auto (cuda when present, else cpu), cpu, cuda. "
                                                     "Default: %(default)r.")


def cli_selftest(args: argparse.Namespace) -> int:
    """The first line names the checkpoint, backend and device; a progress bar (a line per injected bug
    in a log) shows the bug and the layer phase now running; then the table."""
    from rich.table import Table

    from verify.config import check_env_backend, target_line  # noqa: PLC0415
    from verify.errors import UsageError  # noqa: PLC0415
    from verify.layer_report import backend_for_verdicts, console_for_run, display_path, select_layers  # noqa: PLC0415
    from verify.preflight import check_memory  # noqa: PLC0415
    from verify.progress import StepProgress  # noqa: PLC0415

    check_env_backend(args.backend)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    console = console_for_run()
    backend = backend_for_verdicts(args.backend, device)
    console.print(target_line("selftest", checkpoint=args.checkpoint, backend=backend.name, device=device,
                              threads_note=getattr(args, "threads_note", None)), highlight=False, soft_wrap=True)
    ckpt = Checkpoint.open(args.checkpoint)
    layers, line = select_layers(ckpt, args.layers, label=display_path(args.checkpoint))
    check_memory(ckpt.config, tokens=args.tokens, layer_nbytes=sum(ckpt.plan_layer(i).nbytes for i in layers),
                 device=device, what=f"--tokens {args.tokens}")
    console.print(f"{line}; {len(INJECTORS)} injected bugs")
    t0 = time.perf_counter()
    with StepProgress(console, len(INJECTORS), what="injected bugs", log_steps=True) as bar:
        rows = selftest(ckpt, backend, list(layers), tokens=args.tokens, device=str(device), injectors=INJECTORS,
                        progress=lambda row: bar.advance(row.bug, row.status),
                        on_phase=bar.phase)
    table = Table(title=f"selftest: {backend.name}, {len(INJECTORS)} injected bugs ({time.perf_counter() - t0:.1f} s)")
    table.add_column("bug", no_wrap=True)
    for col in ("class (NVFP4_FACTS 6)", "verdict", "caught by (stage check)", "first line of the verdict"):
        table.add_column(col, overflow="fold")
    style = {"caught": "[green]caught[/]", "MISSED": "[bold red]MISSED[/]", "MISBLAMED": "[bold red]MISBLAMED[/]",
             "not applicable": "[yellow]not applicable[/]"}
    for r in rows:
        table.add_row(r.bug, r.facts, style[r.status], ", ".join(r.caught_by + [f"WRONG: {w}" for w in r.misblamed]),
                      r.message[:140])
    console.print(table)
    bad = [r for r in rows if r.status in ("MISSED", "MISBLAMED")]
    console.print(f"[{'bold red' if bad else 'bold green'}]{len(bad)} of {len(rows)} injected bugs missed or "
                  f"misblamed[/]")
    return 1 if bad else 0
