"""The sm100 adapter's FP8 block-128 linears (issue 23 item 6): protocol plumbing on the CPU, numerics on a B200.

CPU (no marker): prepare_linear takes the loader's Fp8BlockLinear and builds the GEMM's operands with
kernels/sm100's own host code (compared here with an independent construction from references.layouts);
float32 block scales go through only when all are powers of two; the refusals carry a sentence; the FP8
accumulator is declared (from the design, unmeasured). With the two CuTe DSL launches (quantize_fp8_1x128,
gemm_fp8_blockscaled) replaced by CPU stand-ins built from references/ that honour the kernels' documented
contracts, the FP8 stages of the fixture's layer 1 pass their bytes and bound verdicts through the adapter,
and a planted defect in kernels/sm100's own FP8 host code (a scale layout, the quantizer's scale rounding)
fails exactly the check that should see it. What is tested is the adapter and the kernels' host code, not
a kernel.

B200 (markers gpu + sm100): the same FP8 stages through the real kernels (nothing here has run yet: it
waits for a B200; so does `python -m verify accumulator --backend sm100`, which measures the FP8
accumulator the adapter declares).
"""

from __future__ import annotations

import pytest
import torch

import kernels.sm100.api as sm100_api
from kernels.sm100 import gemm_fp8_blockscaled as gemm_fp8
from kernels.sm100 import host_bridge_fp8 as hb_fp8
from kernels.sm100 import quantize_fp8_1x128 as quant_fp8
from references import layouts as ref_layouts
from references.codecs import e4m3_bytes_to_f32, ue8m0_bytes_to_f32
from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128

from references.stages import ATTN_STAGES, SHARED_STAGES, Op
from verify.assertions import assert_bytes_equal
from verify.backends.base import declared_fp8_accumulator
from verify.backends.sm100 import Sm100Adapter, Sm100Fp8Linear
from verify.checkpoint import Checkpoint, Fp8BlockLinear
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.reference_layer import moe_spec_from, run_reference_layer
from verify.verdicts import LayerCase, judge_layer

FP8_LAYER = 1  # mini-v4 layer 1: attention and shared expert are FP8 block-128 (V4 `.scale` E8M0)


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


@pytest.fixture(scope="module")
def fp8_layer(ckpt):
    return ckpt.load_layer(FP8_LAYER)


@pytest.fixture(scope="module")
def adapter():
    return Sm100Adapter()


def _fp8_linears(layer) -> list[Fp8BlockLinear]:
    lins = list(layer.attention.values())
    if layer.shared_experts is not None:
        lins += [layer.shared_experts.w1, layer.shared_experts.w3, layer.shared_experts.w2]
    return [lin for lin in lins if isinstance(lin, Fp8BlockLinear)]


def _per32_swizzled(scale_u8: torch.Tensor, rows: int, row_block: int) -> torch.Tensor:
    """Independent construction (references.layouts): each scale byte repeated over its `row_block` rows
    and four 32-columns, rows past `rows` zero, then the 128x4 swizzle."""
    lin = scale_u8.view(torch.uint8).repeat_interleave(row_block, 0)[:rows].repeat_interleave(4, 1)
    return ref_layouts.sf_linear_to_swizzled_128x4(lin)


# ============================================================================= prepare and declarations


def test_prepare_linear_builds_the_fp8_gemm_operands_from_checkpoint_bytes(adapter, fp8_layer):
    lins = _fp8_linears(fp8_layer)
    assert len(lins) >= 5, "the fixture's layer 1 must hold FP8 block-128 linears"
    for lin in lins:
        p = adapter.prepare_linear(lin)
        assert isinstance(p, Sm100Fp8Linear) and p.module == lin.module
        assert_bytes_equal(p.weight.e4m3_u8, lin.weight_e4m3.view(torch.uint8), label=f"{lin.module} E4M3 (as stored)")
        n = lin.weight_e4m3.shape[0]
        assert_bytes_equal(p.weight.sf_swizzled_u8, _per32_swizzled(lin.scale_ue8m0, n, 128),
                           label=f"{lin.module} per-32 UE8M0 scales, 128x4 swizzle")


def test_power_of_two_float32_scales_give_the_same_operands_as_their_e8m0_bytes(adapter, fp8_layer):
    lin = fp8_layer.attention["wq_a"]
    v3 = Fp8BlockLinear(lin.module, lin.weight_e4m3, None, ue8m0_bytes_to_f32(lin.scale_ue8m0.view(torch.uint8)))
    assert v3.encoding == "v3_weight_scale_inv"
    a, b = adapter.prepare_linear(lin), adapter.prepare_linear(v3)
    assert_bytes_equal(b.weight.sf_swizzled_u8, a.weight.sf_swizzled_u8, label="V3 power-of-two scales as UE8M0")


@pytest.mark.parametrize("value", [3.0, 0.0, -1.0, float("nan"), float("inf"), 2.0**-130],
                         ids=["not_pow2", "zero", "negative", "nan", "inf", "below_ue8m0"])
def test_float32_scales_the_mma_cannot_carry_are_refused_naming_the_module(adapter, fp8_layer, value):
    lin = fp8_layer.attention["wq_a"]
    s = ue8m0_bytes_to_f32(lin.scale_ue8m0.view(torch.uint8)).clone()
    s.view(-1)[-1] = value
    with pytest.raises(NotImplementedError, match=rf"sm100: {lin.module} \(v3_weight_scale_inv\).*powers of two"):
        adapter.prepare_linear(Fp8BlockLinear(lin.module, lin.weight_e4m3, None, s))


def test_pow2_f32_to_ue8m0_bytes_covers_the_whole_ue8m0_range():
    b = torch.arange(0, 255, dtype=torch.uint8)  # every UE8M0 byte but NaN
    assert_bytes_equal(hb_fp8.pow2_f32_to_ue8m0_bytes(ue8m0_bytes_to_f32(b)), b, label="UE8M0 -> f32 -> UE8M0")


def test_fp8_refusals_say_why(adapter, fp8_layer):
    p = adapter.prepare_linear(fp8_layer.attention["wq_a"])
    x = torch.zeros(2, p.weight.k, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"sm100: quantize_fp8 with scale_rule 'f32'.*UE8M0"):
        adapter.quantize_fp8(x, scale_rule="f32")
    with pytest.raises(ValueError, match=r"scale_rule='e5m2'"):
        adapter.quantize_fp8(x, scale_rule="e5m2")
    with pytest.raises(NotImplementedError, match=r"static per-tensor FP8 input_scale"):
        adapter.dense_linear(x, p, input_dec_scale_f32=torch.ones(1))
    with pytest.raises(NotImplementedError, match=r"FP8 block-128: dense_gemm takes NVFP4"):
        adapter.dense_gemm(None, p)


def test_fp8_accumulator_is_declared_from_the_design_and_marked_unmeasured(adapter):
    assert declared_fp8_accumulator(adapter) == (2.0**-24, None), "fp32 tensor memory over all K, no promotion step"
    assert sm100_api.Sm100Kernels.fp8_accumulator_measured is False, "flip only with a recorded B200 measurement"
    assert "unmeasured" in adapter.accumulator and "python -m verify accumulator --backend sm100" in adapter.accumulator


def test_quantize_fp8_and_dense_linear_are_served_where_the_kernels_run(adapter, monkeypatch):
    cpu = torch.device("cpu")
    assert adapter.unsupported_reason(Op.QUANTIZE_FP8, cpu) is not None, "no cutlass kernel runs on a CPU"
    monkeypatch.setattr(sm100_api.Sm100Kernels, "unsupported_reason", lambda self, op, device=None: None)
    assert adapter.unsupported_reason(Op.QUANTIZE_FP8, cpu) is None
    assert adapter.unsupported_reason(Op.DENSE_LINEAR, cpu) is None


# ============================================================================= stand-in kernels (CPU)


class _StandInFp8Kernels:
    """quantize_fp8_1x128.launch and gemm_fp8_blockscaled.launch on the CPU, from references/, honouring the
    kernels' documented contracts: the quantizer writes the group scale bytes and their per-32 swizzled copy
    (padding zero); the GEMM decodes both operands from the per-32 swizzled scales it is given, accumulates
    (float64 here, within the declared fp32 bound) and rounds to bf16; rows past the valid count are zero."""

    def __init__(self):
        self.launches: list[str] = []
        self.scale_byte_offset = 0  # a planted quantizer defect: UE8M0 bytes moved by this many binades

    def quant_launch(self, x_bf16, *, recipe="fp8_ue8m0", key=None, num_valid_rows_i32=None):
        self.launches.append("quantize_fp8")
        assert recipe == "fp8_ue8m0" and x_bf16.dtype == torch.bfloat16 and x_bf16.dim() == 2
        q = quantize_act_fp8_1x128(x_bf16, recipe=FP8_ACT_UE8M0)
        sf = (q.block_dec_scale.to(torch.int16) + self.scale_byte_offset).clamp(0, 254).to(torch.uint8)
        return hb_fp8.Fp8ActSm100(q.e4m3_u8, sf, _per32_swizzled(sf, x_bf16.shape[0], 1))

    def gemm_launch(self, act_e4m3_u8, act_sf_swizzled_u8, weight, *, num_valid_rows_i32=None, key=None):
        self.launches.append("gemm_fp8")
        m, k = act_e4m3_u8.shape
        n, g = weight.n, -(-k // 128)
        a_sf = ref_layouts.sf_swizzled_128x4_to_linear(act_sf_swizzled_u8, rows=m, cols=4 * g)
        w_sf = ref_layouts.sf_swizzled_128x4_to_linear(weight.sf_swizzled_u8, rows=n, cols=4 * g)
        a = e4m3_bytes_to_f32(act_e4m3_u8).double() * _per32_f64(a_sf, k)
        w = e4m3_bytes_to_f32(weight.e4m3_u8).double() * _per32_f64(w_sf, k)
        out = (a @ w.T).float().to(torch.bfloat16)
        if num_valid_rows_i32 is not None:
            out[int(num_valid_rows_i32.reshape(())):] = 0
        return out


def _per32_f64(sf_u8: torch.Tensor, k: int) -> torch.Tensor:
    return ue8m0_bytes_to_f32(sf_u8).double().repeat_interleave(32, 1)[:, :k]


@pytest.fixture
def fp8_stand_in(monkeypatch):
    k = _StandInFp8Kernels()
    monkeypatch.setattr(quant_fp8, "launch", k.quant_launch)
    monkeypatch.setattr(gemm_fp8, "launch", k.gemm_launch)
    monkeypatch.setattr(sm100_api.Sm100Kernels, "unsupported_reason", lambda self, op, device=None: None)
    return k


_CASE: dict = {}


def _fp8_case(ckpt) -> LayerCase:
    if "case" not in _CASE:
        from references.layer import RunOptions

        layer = ckpt.load_layer(FP8_LAYER)
        inputs = layer_inputs(ckpt, layer, tokens=16, seed=11, device="cpu")
        opt = RunOptions(act_scale="dynamic")
        _CASE["case"] = LayerCase(layer, ckpt.config.schema, inputs.x_attn_bf16, inputs.x_ffn_bf16,
                                  inputs.token_ids_i64,
                                  run_reference_layer(ckpt, layer, inputs, mode="emulated", options=opt),
                                  run_reference_layer(ckpt, layer, inputs, mode="high", options=opt), opt,
                                  moe_spec_from(ckpt.config))
    return _CASE["case"]


FP8_STAGES = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_b", "shared.l1", "shared.l2")


def _fp8_stages(case):
    return [s for s in ATTN_STAGES + SHARED_STAGES if s.name in FP8_STAGES]


def _judge(ckpt):
    case = _fp8_case(ckpt)
    verdicts = judge_layer(Sm100Adapter(), case, stages=_fp8_stages(case))
    return {(v.stage, v.check): v for v in verdicts}


def test_fp8_stages_pass_bytes_and_bound_through_the_adapter_with_stand_in_kernels(ckpt, fp8_stand_in):
    got = _judge(ckpt)
    stages = {s for s, _ in got}
    assert stages == set(FP8_STAGES), stages
    for stage in stages:
        for check in ("bytes", "bound"):
            v = got[(stage, check)]
            assert v.status == "pass", f"{stage} {check}: {v.status}: {v.message}"
    assert "quantize_fp8" in fp8_stand_in.launches and "gemm_fp8" in fp8_stand_in.launches


def test_a_scale_layout_bug_in_kernels_sm100_fails_the_bound_of_every_fp8_stage(ckpt, fp8_stand_in, monkeypatch):
    real = hb_fp8.ue8m0_block128x128_to_swizzled_128x4_per32

    def one_binade_up(scale_u8, *, n, k):  # every weight block scale doubled: a pure x2 on each output
        return real((scale_u8.view(torch.uint8) + 1).clamp(max=254), n=n, k=k)

    monkeypatch.setattr(hb_fp8, "ue8m0_block128x128_to_swizzled_128x4_per32", one_binade_up)
    got = _judge(ckpt)
    for (stage, check), v in got.items():
        if check == "bound":
            assert v.status == "fail", f"{stage} bound must fail with doubled weight scales: {v.message}"
        if check == "bytes":
            assert v.status == "pass", f"{stage} bytes judge the activations, which the bug leaves alone"


def test_a_scale_byte_one_binade_low_in_the_quantizer_fails_bytes_and_bound_of_every_fp8_stage(ckpt, fp8_stand_in):
    fp8_stand_in.scale_byte_offset = -1  # every activation group scale halved (a floor where a ceil belongs)
    got = _judge(ckpt)
    for stage in FP8_STAGES:
        for check in ("bytes", "bound"):
            v = got[(stage, check)]
            assert v.status == "fail", f"{stage} {check} must fail with the activation scales halved: {v.message}"


# ============================================================================= B200


@pytest.mark.gpu
@pytest.mark.sm100
def test_fp8_stages_pass_through_the_real_kernels_on_a_b200(ckpt):
    """Every FP8 stage of layer 1 through quantize_fp8_1x128 and gemm_fp8_blockscaled (bytes, bound and, on
    the device, batch, sync and graph): none may fail or be not served."""
    from references.layer import RunOptions

    layer = ckpt.load_layer(FP8_LAYER, device="cuda")
    inputs = layer_inputs(ckpt, layer, tokens=16, seed=11, device="cuda")
    opt = RunOptions(act_scale="dynamic")
    case = LayerCase(layer, ckpt.config.schema, inputs.x_attn_bf16, inputs.x_ffn_bf16, inputs.token_ids_i64,
                     run_reference_layer(ckpt, layer, inputs, mode="emulated", options=opt),
                     run_reference_layer(ckpt, layer, inputs, mode="high", options=opt), opt,
                     moe_spec_from(ckpt.config))
    verdicts = judge_layer(Sm100Adapter(), case, stages=_fp8_stages(case))
    bad = [f"{v.stage} {v.check}: {v.status}: {v.message.splitlines()[0]}" for v in verdicts
           if v.status in ("fail", "not served")]
    assert not bad, "\n".join(bad)
    assert {v.check for v in verdicts if v.status == "pass"} >= {"bytes", "bound"}
