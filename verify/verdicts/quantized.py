"""Quantized activations at a stage boundary: the bytes comparison, the references' expected grouped
quantization, and the float64 grouped GEMM with its accumulation bound that the grouped stages (and
verify.bad_inputs) judge against."""

from __future__ import annotations

import torch
from torch import Tensor

from references import layouts as ref_layouts
from references import moe as ref_moe
from references.gemm import grouped_gemm_error_bound, nvfp4_grouped_gemm_f64
from references.stages import Stage
from verify.assertions import assert_bits_equal, assert_bytes_equal, assert_codes_equal_as_values, \
    assert_within_gemm_bound, describe_e4m3
from verify.backends.base import Backend
from verify.backends.protocol import Fp8QuantizedAct, QuantizedAct

__all__ = ["check_quantized", "check_fp8_quantized", "describe_ue8m0", "expected_grouped_quant", "grouped_f64", "grouped_bound", "nan_inf",
           "quant_act_from_reference", "clone_act"]


def check_quantized(stage: str, got: QuantizedAct, exp: QuantizedAct) -> str:
    """Codes equal as values (+0 == -0), swizzled scale bytes equal (padding included: zero; rows of a
    capacity-sized buffer past the last expert's tiles zero), global decode scale bit-equal."""
    __tracebackhide__ = True
    assert_codes_equal_as_values(got.packed_u8, exp.packed_u8, label=f"{stage} codes")
    sf = got.sf_swizzled_u8
    rows = exp.sf_swizzled_u8.shape[0]
    if sf.dim() == 2 and sf.shape[0] > rows and sf.shape[1:] == exp.sf_swizzled_u8.shape[1:]:
        # a capacity-sized buffer (its row count fixed at capture): the rows past the experts' padded
        # tiles must be zero like all padding, then the rest compares byte for byte
        assert_bytes_equal(sf[rows:], torch.zeros_like(sf[rows:]), label=f"{stage} swizzled scales past the last "
                           f"expert's tiles (rows {rows}..{sf.shape[0] - 1})", describe=describe_e4m3)
        sf = sf[:rows]
    assert_bytes_equal(sf, exp.sf_swizzled_u8, label=f"{stage} swizzled scales (padding included)",
                       describe=describe_e4m3)
    assert_bits_equal(got.global_dec_f32.reshape(-1).to(torch.float32).cpu(),
                      exp.global_dec_f32.reshape(-1).to(torch.float32).cpu(), label=f"{stage} global decode scale")
    return "codes, scale bytes and global scale equal the emulator's"


def describe_ue8m0(byte: int) -> str:
    """'0x7f (2^0)': a UE8M0 scale byte and its value (0xFF is NaN)."""
    return f"0x{byte:02x} (nan)" if byte == 0xFF else f"0x{byte:02x} (2^{byte - 127})"


def check_fp8_quantized(stage: str, got: Fp8QuantizedAct, exp: Fp8QuantizedAct) -> str:
    """FP8 1x128 activations byte for byte: the same scale rule, the per-token 1x128 scales (UE8M0 bytes, or
    float32 bits; in the dtype the rule stores) and the E4M3 codes (bytewise: -0 is 0x80 in both). One
    AssertionError naming the first mismatching index and both bytes."""
    __tracebackhide__ = True
    if got.scale_rule != exp.scale_rule:
        raise AssertionError(f"{stage} FP8 activations: scale rule {got.scale_rule!r} != expected {exp.scale_rule!r} "
                             "(the rule the weight's block scales imply)")
    scale = got.block_dec_scale
    if scale.dtype != exp.scale_dtype:
        raise AssertionError(f"{stage} FP8 activation scales: dtype {scale.dtype} != {exp.scale_dtype} (scale rule "
                             f"{exp.scale_rule!r} stores {'UE8M0 bytes' if exp.scale_dtype == torch.uint8 else 'float32'})")
    label = f"{stage} FP8 1x128 activation scales ({exp.scale_rule})"
    if exp.scale_rule == "ue8m0_ceil":
        assert_bytes_equal(scale, exp.block_dec_scale, label=label, describe=describe_ue8m0)
    else:
        assert_bits_equal(scale.cpu(), exp.block_dec_scale.cpu(), label=label)
    assert_bytes_equal(got.e4m3_u8, exp.e4m3_u8, label=f"{stage} FP8 E4M3 activation codes", describe=describe_e4m3)
    words = "UE8M0 scale bytes" if exp.scale_rule == "ue8m0_ceil" else "float32 scale bits"
    return f"E4M3 codes and {words} equal references.fp8_act ({exp.scale_rule})"


def expected_grouped_quant(backend: Backend, rows: Tensor, offsets_i64: Tensor, scale: Tensor | None) -> QuantizedAct:
    """references' grouped quantization (the backend's recipe) in the boundary representation."""
    a = ref_moe.act_quant(rows, offsets_i64, recipe=backend.recipe, act_scale="static" if scale is not None else "dynamic",
                          input_scale_f32=scale)
    sf, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(a.sf_u8, offsets_i64)
    return QuantizedAct(a.packed_u8, sf, a.global_dec_f32)


def grouped_f64(backend: Backend, a: QuantizedAct, offsets_i64: Tensor, w, out_dtype) -> tuple[Tensor, Tensor]:
    """(y64, bound) of one grouped GEMM on the boundary activations a and the checkpoint weight w."""
    k = a.k
    a_sf = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, offsets_i64, cols=k // 16)
    alpha = (a.global_dec_f32.to(torch.float32).reshape(-1) * w.weight_scale_2_f32.to(torch.float32).reshape(-1))
    y64, abs_dot = nvfp4_grouped_gemm_f64(a.packed_u8, a_sf, w.weight_u8, w.weight_scale_e4m3.view(torch.uint8),
                                          offsets_i64, alpha)
    return y64, grouped_gemm_error_bound(abs_dot, y64, alpha, offsets_i64, k=k, u_acc=backend.u_acc, out_dtype=out_dtype)


def grouped_bound(stage: str, backend: Backend, a: QuantizedAct, offsets_i64: Tensor, w, y: Tensor,
                  label: str, metrics: dict) -> str:
    """y (one grouped GEMM's output) against the float64 product of the same quantized operands; its NaN /
    Inf counts go into `metrics` before the bound is asserted (a failing verdict keeps them), then its ratio."""
    __tracebackhide__ = True
    y64, bound = grouped_f64(backend, a, offsets_i64, w, y.dtype)
    metrics.update(nan_inf(y, label))
    ratio = assert_within_gemm_bound(y, y64, bound, label=f"{stage} {label}")
    metrics[f"bound_ratio_{label}"] = ratio
    return f"{label}: max |y - y64| / bound = {ratio:.3g}"


def nan_inf(y: Tensor, label: str) -> dict[str, int]:
    """NaN / Inf counts of a stage output (a NaN also fails the bound; both are reported)."""
    return {f"nan_count_{label}": int(torch.isnan(y).sum()), f"inf_count_{label}": int(torch.isinf(y).sum())}


def quant_act_from_reference(emulated: dict[str, Tensor], stage: Stage, offsets_i64: Tensor) -> QuantizedAct:
    """The reference's quantized activations of a grouped quantization `stage` in the boundary representation."""
    sf, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(emulated[stage.tensor("sf_u8")], offsets_i64)
    return QuantizedAct(emulated[stage.tensor("packed_u8")], sf,
                        emulated[stage.tensor("global_dec_f32")].to(torch.float32))


def clone_act(a: QuantizedAct) -> QuantizedAct:
    """Fresh buffers holding a's values (a probe's inputs, rewritten in place by its mutations)."""
    return QuantizedAct(a.packed_u8.clone(), a.sf_swizzled_u8.clone(), a.global_dec_f32.clone())
