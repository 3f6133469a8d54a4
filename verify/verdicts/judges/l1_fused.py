"""The fused L1 stage (moe.l1_fused): grouped L1 GEMM + SwiGLU + requantization of h in one kernel.

Its h is not visible, so it is judged by the interval rule (DESIGN "Verdicts"). The rule needs a static
h scale (a dynamic amax of h is not known inside the L1 epilogue): in dynamic runs the stage is skipped,
one verdict (interval). Collected: the backend's l1_fused on the reference's quantized activations.
Own check: interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from references import layouts as ref_layouts
from references.codecs import e2m1_codes_to_f32
from references.linear import nvfp4_global_scale_for
from references.nvfp4 import block_scale_bytes, e2m1_codes_with_scale, unpack_e2m1x2_low_first
from references.stages import MOE_ACT_QUANT, Check, Stage
from verify.assertions import assert_bits_equal, describe_e4m3, first_mismatch
from verify.backends.base import Backend
from verify.backends.protocol import QuantizedAct
from verify.verdicts.checks import Judge, Outputs, Replay, SkipStage
from verify.verdicts.context import JudgeContext, MoeOperands
from verify.verdicts.intervals import f32_down, f32_up, nonempty_experts, swiglu_interval, widen_by_bf16_rounding
from verify.verdicts.quantized import clone_act, grouped_f64

__all__ = ["JUDGE"]


@dataclass
class L1FusedOutputs(Outputs):
    backend: Backend
    moe: MoeOperands
    experts: object
    swiglu_limit: float | None
    a1: QuantizedAct       # the teacher-forced activations (the reference's moe.act_quant)
    got: QuantizedAct      # the backend's quantized h

    def replay(self) -> Replay:
        a1, m = self.a1, self.moe
        a1_buf = clone_act(a1)
        return Replay(lambda: self.backend.l1_fused(a1_buf, m.offsets_i32, self.experts, swiglu_limit=self.swiglu_limit,
                                                    input_dec_scale_f32=m.l2_input_dec_f32),
                      (("new values (every code negated)", lambda: a1_buf.packed_u8.copy_(a1.packed_u8 ^ 0x88)),))


def collect(ctx: JudgeContext, stage: Stage) -> L1FusedOutputs:
    if not ctx.case.static:
        raise SkipStage(Check.INTERVAL, "interval: a fused L1 quantizes h with the static w2 input_scale (a dynamic "
                        "amax of h is not known inside the L1 epilogue); judged in the static runs")
    m, limit = ctx.moe, ctx.case.moe_spec.swiglu_limit
    a1 = m.boundary(MOE_ACT_QUANT)
    got = ctx.backend.l1_fused(a1, m.offsets_i32, ctx.experts, swiglu_limit=limit, input_dec_scale_f32=m.l2_input_dec_f32)
    return L1FusedOutputs(ctx.backend, m, ctx.experts, limit, a1, got)


def interval(ctx: JudgeContext, stage: Stage, out: L1FusedOutputs, metrics: dict) -> str:
    """The fused kernel's h is not visible, so each scale byte must lie between the bytes of the smallest and
    largest block amax the L1 bound allows, and each code between the codes (under the kernel's own scale
    byte) of the interval's ends; codes whose interval straddles a rounding boundary are counted and reported."""
    __tracebackhide__ = True
    b, ex, got, a1 = ctx.backend, ctx.case.layer.experts, out.got, out.a1
    off_i64, s2 = out.moe.offsets_i64, out.moe.l2_input_dec_f32
    g64, bg = grouped_f64(b, a1, off_i64, ex.w1, torch.float32)
    u64, bu = grouped_f64(b, a1, off_i64, ex.w3, torch.float32)
    h_lo, h_hi = widen_by_bf16_rounding(*swiglu_interval(g64 - bg, g64 + bg, u64 - bu, u64 + bu, out.swiglu_limit))
    r, n = h_lo.shape
    blocks_lo, blocks_hi = h_lo.view(r, n // 16, 16), h_hi.view(r, n // 16, 16)
    straddles_zero = (blocks_lo <= 0) & (blocks_hi >= 0)
    amax_lo = torch.where(straddles_zero, 0.0, torch.minimum(blocks_lo.abs(), blocks_hi.abs())).amax(-1)
    amax_hi = torch.maximum(blocks_lo.abs(), blocks_hi.abs()).amax(-1)
    sf_got = ref_layouts.sf_grouped_swizzled_128x4_to_linear(got.sf_swizzled_u8, off_i64, cols=n // 16)
    codes_got = unpack_e2m1x2_low_first(got.packed_u8).view(r, n // 16, 16)
    byte_lo = torch.empty_like(sf_got)
    byte_hi = torch.empty_like(sf_got)
    val_lo = torch.empty(r, n // 16, 16, dtype=torch.float32, device=h_lo.device)
    val_hi = torch.empty_like(val_lo)
    for e, lo, hi in nonempty_experts(off_i64):
        g = nvfp4_global_scale_for(h_lo[lo:lo + 1].float(), recipe=b.recipe, input_scale_f32=s2[e])
        gs = next(iter(g.values()))
        kw = dict(recipe=b.recipe, global_scale_f32=gs)
        byte_lo[lo:hi] = block_scale_bytes(amax_lo[lo:hi].float(), **kw)
        byte_hi[lo:hi] = block_scale_bytes(amax_hi[lo:hi].float(), **kw)
        # codes of the interval's ends under the kernel's own scale bytes (round toward the end: the
        # float32 end may round; the exact interval is inside [lo rounded down, hi rounded up])
        val_lo[lo:hi] = e2m1_codes_to_f32(e2m1_codes_with_scale(f32_down(blocks_lo[lo:hi]), sf_got[lo:hi], **kw))
        val_hi[lo:hi] = e2m1_codes_to_f32(e2m1_codes_with_scale(f32_up(blocks_hi[lo:hi]), sf_got[lo:hi], **kw))
    val_got = e2m1_codes_to_f32(codes_got)
    metrics.update(codes_in_straddling_intervals=int((val_lo != val_hi).sum()),
                   scale_bytes_with_two_choices=int((byte_lo != byte_hi).sum()))
    bad_s = (sf_got < byte_lo) | (sf_got > byte_hi)
    if bad_s.any():
        i, idx = first_mismatch(bad_s)
        raise AssertionError(f"scale byte at (row, block) {idx}: got {describe_e4m3(int(sf_got[idx]))}, allowed "
                             f"{describe_e4m3(int(byte_lo[idx]))} .. {describe_e4m3(int(byte_hi[idx]))} "
                             f"({int(bad_s.sum())} of {bad_s.numel()} outside)")
    bad_c = (val_got < val_lo) | (val_got > val_hi)
    if bad_c.any():
        i, idx = first_mismatch(bad_c)
        raise AssertionError(f"code at (row, block, element) {idx}: got value {float(val_got[idx])}, allowed "
                             f"{float(val_lo[idx])} .. {float(val_hi[idx])} (h in [{float(blocks_lo[idx]):.6g}, "
                             f"{float(blocks_hi[idx]):.6g}]; {int(bad_c.sum())} of {bad_c.numel()} outside)")
    assert_bits_equal(got.global_dec_f32.reshape(-1).float().cpu(), s2.reshape(-1).float().cpu(),
                      label="global decode scale (the w2 input_scale)")
    return (f"every scale byte and code is one a value inside the L1 bound gives; "
            f"{metrics['codes_in_straddling_intervals']} codes and {metrics['scale_bytes_with_two_choices']} scale "
            "bytes had two choices")


JUDGE = Judge(collect, {Check.INTERVAL: interval})
