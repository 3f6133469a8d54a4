"""Checks of a loaded layer's tensor values (the structural checks of files are in defects.py).

`value_defects(layer, config, prefix)`: values no layer can be verified with (NaN scale bytes,
bad global scales, FP8 float block scales that are E8M0 bytes stored as numbers, all-zero block
scales, NaN/Inf in norm, router, unquantized or FP8 weights,
hash-routing expert ids out of range); `plausibility_warnings(layer)`: legal but implausible NVFP4
global scales (an inverted weight_scale_2, input_scale 1e30 or 1e-42). They read tensor values, so
they run after a layer is loaded: the loader raises the first defect as its `error` class and
warns about each implausible value; lint reports each as a finding (code = ValueDefect.code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.fp8_weight import check_float_scale_is_not_e8m0_bytes
from verify.checkpoint.config import ModelConfig
from verify.checkpoint.errors import (
    CheckpointError, NanScaleError, ScaleEncodingError, TensorValueError, ZeroScaleError,
)
from verify.checkpoint.weights import (
    Bf16Linear, Fp8BlockLinear, LayerWeights, Linear, Mxfp4Linear, Nvfp4Linear, iter_linears,
)

__all__ = ["ValueDefect", "scale_defects", "value_defects", "plausibility_warnings", "VALUE_DEFECT_ERRORS",
           "PLAUSIBILITY_CODES", "WEIGHT_AMAX_PLAUSIBLE", "ACT_AMAX_PLAUSIBLE", "GLOBAL_SCALE_DIVISOR"]

# NVFP4 global decode scales are amax / (6 * 448) (NVFP4_FACTS.md section 4). The amax a scale
# implies is checked against what trained weights and calibrated activations hold; outside these
# ranges the value is legal but implausible (printed as a warning, never fatal). An inverted
# weight_scale_2 (2688 / amax) implies an amax of 2688^2 / amax: above 1e3 for any weight whose
# true amax is below 7225, so inversions show.
GLOBAL_SCALE_DIVISOR = 6.0 * 448.0
WEIGHT_AMAX_PLAUSIBLE = (1e-4, 1e3)
ACT_AMAX_PLAUSIBLE = (1e-3, 1e5)
PLAUSIBILITY_CODES = ("implausible_weight_scale_2", "implausible_input_scale")


@dataclass(frozen=True)
class ValueDefect:
    """One value defect (or plausibility warning) of a loaded layer. code: lint's finding code;
    tensor: the tensor (an expert stack's `*` replaced by the first bad expert); value: the first
    bad value, where one number says it."""

    code: str
    tensor: str
    message: str
    value: float | None = None

    @property
    def error(self) -> type[CheckpointError]:
        return VALUE_DEFECT_ERRORS[self.code]


VALUE_DEFECT_ERRORS: dict[str, type[CheckpointError]] = {
    "nan_scale_bytes": NanScaleError,
    "bad_global_scale": NanScaleError,
    "zero_block_scales": ZeroScaleError,
    "non_finite_weight": TensorValueError,
    "expert_id_out_of_range": TensorValueError,
    "e8m0_bytes_as_numbers": ScaleEncodingError,
}


def _named(module: str, role: str, bad: Tensor) -> str:
    """The tensor name of the first bad element: an expert stack's `*` becomes that expert's index."""
    if ".*." in module and bad.dim() >= 1:
        e = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])
        module = module.replace(".*.", f".{e}.")
    return f"{module}.{role}"


def _first(t: Tensor, bad: Tensor) -> float:
    return float(t[bad].flatten()[0])


def scale_defects(lin: Linear) -> list[ValueDefect]:
    """NaN scale bytes, bad global scales and all-zero NVFP4 block scales of one linear (or stack);
    for a stack the tensor names the first defective expert and the message counts all."""
    out: list[ValueDefect] = []
    m = lin.module
    if isinstance(lin, Nvfp4Linear):
        b = lin.weight_scale_e4m3.view(torch.uint8)
        bad = (b & 0x7F) == 0x7F
        if bool(bad.any()):
            out.append(ValueDefect("nan_scale_bytes", _named(m, "weight_scale", bad),
                                   f"{int(bad.sum())} NaN E4M3 scale bytes (0x7F/0xFF) of {b.numel()}"))
        zero = ((b & 0x7F) == 0).reshape(*b.shape[:-2], -1).all(-1)  # per weight (per expert in a stack)
        if bool(zero.any()):
            which = f"{int(zero.sum())} of {zero.numel()} experts have" if zero.dim() else "the weight has"
            out.append(ValueDefect("zero_block_scales", _named(m, "weight_scale", zero),
                                   f"{which} every block scale zero ({b[0].numel() if zero.dim() else b.numel()} "
                                   "bytes each): the weight decodes to all zeros", 0.0))
        for role, t in (("weight_scale_2", lin.weight_scale_2_f32), ("input_scale", lin.input_scale_f32)):
            bad = ~(torch.isfinite(t) & (t > 0))
            if bool(bad.any()):
                v = _first(t, bad)
                out.append(ValueDefect("bad_global_scale", _named(m, role, bad),
                                       f"{int(bad.sum())} of {t.numel()} values are zero, negative, NaN or Inf "
                                       f"(first {v})", v))
    elif isinstance(lin, (Mxfp4Linear, Fp8BlockLinear)) and getattr(lin, "scale_ue8m0", None) is not None:
        b = lin.scale_ue8m0.view(torch.uint8)
        bad = b == 0xFF
        if bool(bad.any()):
            out.append(ValueDefect("nan_scale_bytes", _named(m, "scale", bad),
                                   f"{int(bad.sum())} NaN E8M0 scale bytes (0xFF) of {b.numel()}"))
    elif isinstance(lin, Fp8BlockLinear):
        role, t = lin.scale_tensor_role, lin.scale_inv_f32
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            v = _first(t, bad)
            out.append(ValueDefect("bad_global_scale", _named(m, role, bad),
                                   f"{int(bad.sum())} of {t.numel()} block scales are zero, negative, NaN or Inf "
                                   f"(first {v})", v))
        else:
            try:
                check_float_scale_is_not_e8m0_bytes(t, name=f"{lin.encoding} {role}")
            except ValueError as e:
                every = torch.ones_like(t, dtype=torch.bool)  # the check is of the whole grid
                out.append(ValueDefect("e8m0_bytes_as_numbers", _named(m, role, every), str(e), _first(t, every)))
        x = lin.input_scale_f32
        if x is not None and not bool((torch.isfinite(x) & (x > 0)).all()):
            bad = ~(torch.isfinite(x) & (x > 0))
            out.append(ValueDefect("bad_global_scale", _named(m, "input_scale", bad),
                                   f"per-tensor FP8 input_scale {_first(x, bad)} is zero, negative, NaN or Inf",
                                   _first(x, bad)))
    return out


def _non_finite(name: str, t: Tensor, what: str) -> list[ValueDefect]:
    """NaN/Inf in a float tensor (E4M3 by its NaN bytes: it has no Inf)."""
    if t.dtype == torch.float8_e4m3fn:
        bad = (t.view(torch.uint8) & 0x7F) == 0x7F
    elif t.is_floating_point():
        bad = ~torch.isfinite(t)
    else:
        return []
    if not bool(bad.any()):
        return []
    n_nan = int(t.float().isnan().sum()) if t.dtype != torch.float8_e4m3fn else int(bad.sum())
    first = tuple(int(i) for i in bad.nonzero()[0])
    v = _first(t.float(), bad)
    return [ValueDefect("non_finite_weight", name,
                        f"{what}: {int(bad.sum())} of {t.numel()} values are NaN or Inf ({n_nan} NaN; first at "
                        f"{list(first)}: {v})", v)]


def value_defects(layer: LayerWeights, config: ModelConfig, prefix: str) -> list[ValueDefect]:
    """Every value defect of a loaded layer (see the module docstring), in a fixed order: scales of
    each linear, NaN/Inf in unquantized and FP8 weights, in norms, router and other stored tensors,
    then hash-routing ids. `prefix` is the layer's tensor-name prefix (e.g. "layers.3")."""
    out: list[ValueDefect] = []
    for module, lin in iter_linears(layer):
        out.extend(scale_defects(lin))
        if isinstance(lin, Bf16Linear):
            out.extend(_non_finite(f"{module}.weight", lin.weight_bf16, "unquantized weight"))
        elif isinstance(lin, Fp8BlockLinear):
            out.extend(_non_finite(f"{module}.weight", lin.weight_e4m3, "FP8 weight (E4M3 NaN bytes 0x7F/0xFF)"))
    names = _plain_names(config, prefix)
    for role, t in layer.norms.items():
        out.extend(_non_finite(names.get(role, f"{prefix}.{role}"), t, "norm weight"))
    r = layer.router
    if r is not None:
        out.extend(_non_finite(names["gate_weight"], r.gate_weight_bf16, "router gate weight"))
        if r.gate_bias_f32 is not None:
            out.extend(_non_finite(names["gate_bias"], r.gate_bias_f32, "router bias"))
        if r.tid2eid_i64 is not None:
            ids, e_n = r.tid2eid_i64, config.n_routed_experts
            bad = (ids < 0) | (ids >= e_n)
            if bool(bad.any()):
                tok, slot = (int(i) for i in bad.nonzero()[0])
                out.append(ValueDefect(
                    "expert_id_out_of_range", names["tid2eid"],
                    f"{int(bad.sum())} of {ids.numel()} hash-routing expert ids are outside [0, n_routed_experts="
                    f"{e_n}) (first: token {tok}, slot {slot} -> {int(ids[tok, slot])})", float(ids[tok, slot])))
    for name, t in layer.extras.items():
        out.extend(_non_finite(f"{prefix}.{name}", t, "stored tensor"))
    return out


def _plain_names(config: ModelConfig, prefix: str) -> dict[str, str]:
    """role -> tensor name of a layer's norms and router tensors (the schema's names)."""
    if config.schema == "deepseek_v4":
        return {"attn_norm": f"{prefix}.attn_norm.weight", "ffn_norm": f"{prefix}.ffn_norm.weight",
                "q_norm": f"{prefix}.attn.q_norm.weight", "kv_norm": f"{prefix}.attn.kv_norm.weight",
                "attn_sink": f"{prefix}.attn.attn_sink", "gate_weight": f"{prefix}.ffn.gate.weight",
                "gate_bias": f"{prefix}.ffn.gate.bias", "tid2eid": f"{prefix}.ffn.gate.tid2eid"}
    return {"attn_norm": f"{prefix}.input_layernorm.weight", "ffn_norm": f"{prefix}.post_attention_layernorm.weight",
            "q_norm": f"{prefix}.self_attn.q_a_layernorm.weight", "kv_norm": f"{prefix}.self_attn.kv_a_layernorm.weight",
            "gate_weight": f"{prefix}.mlp.gate.weight", "gate_bias": f"{prefix}.mlp.gate.e_score_correction_bias"}


def plausibility_warnings(layer: LayerWeights) -> list[ValueDefect]:
    """NVFP4 global decode scales whose implied amax (scale * 2688) is outside WEIGHT_AMAX_PLAUSIBLE
    (weight_scale_2) or ACT_AMAX_PLAUSIBLE (input_scale): one per tensor (stack), naming the first
    expert and the value. Zero, negative and non-finite scales are value_defects, not warnings."""
    out: list[ValueDefect] = []
    for module, lin in iter_linears(layer):
        if not isinstance(lin, Nvfp4Linear):
            continue
        for role, t, (lo, hi), code, amax_name in (
                ("weight_scale_2", lin.weight_scale_2_f32, WEIGHT_AMAX_PLAUSIBLE, PLAUSIBILITY_CODES[0], "amax_w"),
                ("input_scale", lin.input_scale_f32, ACT_AMAX_PLAUSIBLE, PLAUSIBILITY_CODES[1], "amax_x")):
            amax = t.double() * GLOBAL_SCALE_DIVISOR
            bad = torch.isfinite(t) & (t > 0) & ((amax < lo) | (amax > hi))
            if not bool(bad.any()):
                continue
            v = _first(t, bad)
            hint = (f"; inverted (2688/amax)? 1/value would give amax {GLOBAL_SCALE_DIVISOR / v:.4g}"
                    if role == "weight_scale_2" and v * GLOBAL_SCALE_DIVISOR > hi else "")
            if v < 1.1754943508222875e-38:
                hint += "; a float32 subnormal: 1/value overflows to Inf"
            count = f"{int(bad.sum())} of {t.numel()} values; " if t.numel() > 1 else ""
            out.append(ValueDefect(
                code, _named(module, role, bad),
                f"implausible {role} {v:.6g}: {count}implies {amax_name} = {v * GLOBAL_SCALE_DIVISOR:.4g} "
                f"(value x 2688), outside the plausible [{lo:g}, {hi:g}]{hint}", v))
    return out
