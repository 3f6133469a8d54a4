"""FP8 activations as a boundary tensor (issue 23 item 2): the protocol's Fp8QuantizedAct and quantize_fp8 op,
the dense judge's bytes verdict on the FP8 block-128 stages (byte for byte with references/fp8_act.py under
the scale rule the weight implies), and the planted FP8 bugs, each failing exactly its stage and check:
UE8M0 activation scale rounded down (bytes), E8M0 weight scale bytes read as numbers (bound), weight
scale grid transposed (bound, on a 2-D grid), float32 promotion skipped by a 14-bit truncating
accumulator that declares it (bound, on the data that shows it)."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace

import pytest
import torch

import verify.selftest as st
from references.codecs import f32_to_e4m3_bytes
from references.fp8_act import FP8_ACT_F32, FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_f64, fp8_block_gemm_narrow_acc_model
from references.fp8_weight import fp8_weight_from_v4_e8m0_scale
from references.layer import RunOptions
from references.stages import ATTN_WQ_A, Check, Op, stage
from verify.backends import Backend, EmulatorBackend, Fp8QuantizedAct, get_backend
from verify.checkpoint import Checkpoint, Fp8BlockLinear
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.run import run_layer
from verify.selftest import INJECTORS, Bugged, selftest
from verify.selftest.fp8 import UnpromotedFp8, fp8_swallowing
from verify.verdicts import LayerCase
from verify.verdicts.context import JudgeContext
from verify.verdicts.layer import judge_stage
from verify.verdicts.quantized import check_fp8_quantized

FP8_STAGES = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b", "shared.l1", "shared.l2")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


def _failed(run) -> set[tuple[str, str]]:
    return {(v.stage, v.check) for v in run.failed}


def _run(ckpt, layer_index: int, backend, *, data=None):
    layer = ckpt.load_layer(layer_index)
    inputs = layer_inputs(ckpt, layer, tokens=16, seed=11, device="cpu")
    if data == "fp8-swallowing":
        layer, inputs = fp8_swallowing(layer, inputs)
    return run_layer(ckpt, layer, inputs, options=RunOptions(act_scale="dynamic"), backend=backend)


# ============================================================================= the op


@pytest.mark.parametrize("rule,recipe", [("ue8m0_ceil", FP8_ACT_UE8M0), ("f32", FP8_ACT_F32)])
def test_the_emulator_quantize_fp8_is_references_fp8_act(rule, recipe):
    x = (torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    x[1, 128:256] = 0.0  # a zero group
    a = EmulatorBackend().quantize_fp8(x, scale_rule=rule)
    q = quantize_act_fp8_1x128(x, recipe=recipe)
    assert isinstance(a, Fp8QuantizedAct) and a.scale_rule == rule
    assert a.e4m3_u8.dtype == torch.uint8 and a.e4m3_u8.shape == (5, 300)
    assert a.block_dec_scale.dtype == a.scale_dtype and a.block_dec_scale.shape == (5, 3)
    assert torch.equal(a.e4m3_u8, q.e4m3_u8)
    assert torch.equal(a.block_dec_scale.view(torch.uint8), q.block_dec_scale.view(torch.uint8))


def test_quantize_fp8_is_not_served_by_default_and_says_why_where_it_cannot_run():
    class Plain(Backend):
        name = "plain"

    assert Plain().unsupported_reason(Op.QUANTIZE_FP8, CPU) == "not served: plain has no quantize_fp8"
    with pytest.raises(NotImplementedError, match=r"^not served: plain has no quantize_fp8$"):
        Plain().quantize_fp8(torch.zeros(1, 128, dtype=torch.bfloat16), scale_rule="f32")
    assert EmulatorBackend().unsupported_reason(Op.QUANTIZE_FP8, CPU) is None
    with pytest.raises(ValueError, match=r"scale_rule='e8m0'"):
        EmulatorBackend().quantize_fp8(torch.zeros(1, 128, dtype=torch.bfloat16), scale_rule="e8m0")
    if not torch.cuda.is_available():
        why = get_backend("sm90").unsupported_reason(Op.QUANTIZE_FP8, CPU)
        assert why in ("sm90: no CUDA device", "sm90: triton is not installed"), why


# ============================================================================= the bytes verdict


def test_the_fp8_stages_have_a_passing_bytes_verdict_on_the_emulator(ckpt):
    run = _run(ckpt, 1, EmulatorBackend())
    for name in FP8_STAGES:
        v = run.verdict(name, "bytes")
        assert v.status == "pass" and v.message == "E4M3 codes and UE8M0 scale bytes equal references.fp8_act " \
                                                   "(ue8m0_ceil)", (name, v)
    assert not run.failed


def _acts(rule: str) -> tuple[Fp8QuantizedAct, Fp8QuantizedAct]:
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    exp = EmulatorBackend().quantize_fp8(x, scale_rule=rule)
    return Fp8QuantizedAct(exp.e4m3_u8.clone(), exp.block_dec_scale.clone(), rule), exp


def test_one_flipped_code_names_its_index_and_both_bytes():
    got, exp = _acts("ue8m0_ceil")
    got.e4m3_u8[1, 130] ^= 0x80
    with pytest.raises(AssertionError) as e:
        check_fp8_quantized("attn.wq_a", got, exp)
    b = int(exp.e4m3_u8[1, 130])
    msg = str(e.value)
    assert msg.startswith("attn.wq_a FP8 E4M3 activation codes (3, 256) uint8: 1/768 bytes differ"), msg
    assert f"first at flat 386 = (1, 130): got 0x{b ^ 0x80:02x}" in msg and f"expected 0x{b:02x}" in msg, msg


def test_one_scale_byte_off_names_its_index_and_both_values():
    got, exp = _acts("ue8m0_ceil")
    got.block_dec_scale[2, 1] -= 1
    b = int(exp.block_dec_scale[2, 1])
    with pytest.raises(AssertionError, match=rf"activation scales \(ue8m0_ceil\) \(3, 2\) uint8: 1/6 bytes differ\n"
                                             rf"  first at flat 5 = \(2, 1\): got 0x{b - 1:02x} \(2\^{b - 128}\)  "
                                             rf"expected 0x{b:02x} \(2\^{b - 127}\)"):
        check_fp8_quantized("attn.wq_a", got, exp)


def test_float32_scales_compare_bits_and_the_rule_and_dtype_must_match():
    got, exp = _acts("f32")
    assert check_fp8_quantized("x", got, exp) == "E4M3 codes and float32 scale bits equal references.fp8_act (f32)"
    got.block_dec_scale[0, 0] = torch.nextafter(got.block_dec_scale[0, 0], torch.tensor(1.0))
    with pytest.raises(AssertionError, match=r"x FP8 1x128 activation scales \(f32\) \(3, 2\) torch.float32: 1/6 "
                                             r"elements differ in bits"):
        check_fp8_quantized("x", got, exp)
    with pytest.raises(AssertionError, match=r"scale rule 'ue8m0_ceil' != expected 'f32'"):
        check_fp8_quantized("x", _acts("ue8m0_ceil")[0], exp)
    wrong_dtype = Fp8QuantizedAct(exp.e4m3_u8, exp.block_dec_scale.to(torch.bfloat16), "f32")
    with pytest.raises(AssertionError, match=r"dtype torch.bfloat16 != torch.float32"):
        check_fp8_quantized("x", wrong_dtype, exp)


class _LinearOnly(Backend):
    """Serves prepare, dense_linear and grouped_dense_linear (the emulator's), not quantize_fp8."""

    name = "linear-only"
    _e = EmulatorBackend()
    fp8_u_acc = _e.fp8_u_acc
    u_acc = _e.u_acc
    graph_safe = False

    def prepare_linear(self, lin):
        return self._e.prepare_linear(lin)

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        return self._e.dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)

    def grouped_dense_linear(self, x_bf16, w, *, groups, input_dec_scale_f32=None):
        return self._e.grouped_dense_linear(x_bf16, w, groups=groups, input_dec_scale_f32=input_dec_scale_f32)


def test_a_backend_without_quantize_fp8_is_not_served_on_fp8_bytes_only(ckpt):
    """A backend serving the FP8 linear but not quantize_fp8: bytes is "not served" with its sentence; the
    other checks are judged, and the selftest's quantizer bug is not applicable there (its passing bounds
    cannot see it), never MISSED."""
    run = _run(ckpt, 1, _LinearOnly())
    for name in FP8_STAGES:
        assert (run.verdict(name, "bytes").status, run.verdict(name, "bytes").message) == \
            ("not served", "not served: linear-only has no quantize_fp8")
        assert run.verdict(name, "bound").status == "pass"
    inj = next(i for i in INJECTORS if i.bug == "fp8-ue8m0-scale-rounded-down")
    (row,) = selftest(ckpt, _LinearOnly(), [1], tokens=16, device="cpu", injectors=(inj,))
    assert row.status == "not applicable" and "has no quantize_fp8" in row.message, row


# ============================================================================= the planted bugs


def test_ue8m0_rounded_down_fails_the_fp8_stages_bytes_only(ckpt):
    run = _run(ckpt, 1, Bugged(EmulatorBackend(), "fp8-ue8m0-scale-rounded-down"))
    assert _failed(run) == {(s, "bytes") for s in FP8_STAGES}
    assert "activation scales (ue8m0_ceil)" in run.verdict("attn.wq_a", "bytes").message


def test_e8m0_read_as_a_number_fails_the_fp8_stages_bound_only(ckpt):
    run = _run(ckpt, 1, Bugged(EmulatorBackend(), "e8m0-scale-read-as-a-number"))
    assert _failed(run) == {(s, "bound") for s in FP8_STAGES}


def test_promotion_skipped_fails_the_bound_of_the_stage_its_data_exposes(ckpt):
    run = _run(ckpt, 1, Bugged(EmulatorBackend(), "fp8-promotion-skipped"), data="fp8-swallowing")
    assert _failed(run) == {("attn.wq_a", "bound")}
    assert "1/2048 elements exceed the accumulation bound" in run.verdict("attn.wq_a", "bound").message


class _Promoting(Bugged):
    """The control of the promotion-skipped bug: the same 14-bit truncating accumulator and declaration, but
    promoted to float32 every 128 of K as declared."""

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        if isinstance(w, UnpromotedFp8):
            act = quantize_act_fp8_1x128(x_bf16, recipe=FP8_ACT_UE8M0 if w.scale_rule == "ue8m0_ceil" else FP8_ACT_F32)
            y = fp8_block_gemm_narrow_acc_model(act, w.weight, acc_bits=14, rounding="truncate", promotion_interval=128)
            return y.to(torch.float32).to(torch.bfloat16)
        return super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)


def test_the_swallowing_data_passes_when_the_declared_promotion_is_done(ckpt):
    """The data is legal and the bound not too tight: the clean emulator passes it, and so does the 14-bit
    accumulator that promotes every 128 as it declares (so the failure above is the skipped promotion)."""
    assert not _run(ckpt, 1, EmulatorBackend(), data="fp8-swallowing").failed
    run = _run(ckpt, 1, _Promoting(EmulatorBackend(), "fp8-promotion-skipped"), data="fp8-swallowing")
    assert not run.failed, [v.message for v in run.failed]
    assert "promoted to fp32 every 128 of K" in run.verdict("attn.wq_a", "bound").message


def _grid_case() -> LayerCase:
    """attn.wq_a with N = 256, K = 384: a 2 x 3 block-scale grid of distinct E8M0 bytes (2^-8 .. 2^-3)."""
    g = torch.Generator().manual_seed(5)
    n, k = 256, 384
    w = f32_to_e4m3_bytes(torch.randn(n, k, generator=g) * 64, saturate=True).view(torch.float8_e4m3fn)
    scale = torch.tensor([[119, 120, 121], [122, 123, 124]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    lin = Fp8BlockLinear("layers.1.attn.wq_a", w, scale, None)
    x = torch.randn(4, k, generator=g).to(torch.bfloat16)
    ref = fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
    high = {ATTN_WQ_A.tensor(): fp8_block_gemm_f64(quantize_act_fp8_1x128(x, recipe=FP8_ACT_UE8M0), ref)}
    layer = SimpleNamespace(attention=MappingProxyType({"wq_a": lin}))
    return LayerCase(layer, "deepseek_v4", x, x, None, {}, high, RunOptions(), None)


def test_a_transposed_scale_grid_fails_the_bound_only_on_a_2d_grid():
    verdicts = {v.check: v for v in judge_stage(JudgeContext(Bugged(EmulatorBackend(), "fp8-scale-grid-transposed"),
                                                             _grid_case()), ATTN_WQ_A)}
    assert set(verdicts) == {c.value for c in stage("attn.wq_a").checks}
    assert {c for c, v in verdicts.items() if v.status == "fail"} == {"bound"}, verdicts
    assert verdicts["bytes"].status == "pass" and verdicts["batch"].status == "pass"
    clean = {v.check: v.status for v in judge_stage(JudgeContext(EmulatorBackend(), _grid_case()), ATTN_WQ_A)}
    assert "fail" not in clean.values(), clean


def test_the_selftest_counts_the_fp8_bugs(ckpt):
    """On an FP8 fixture layer: three are caught where they were put; the transposed grid is not applicable
    (every grid of mini-v4 is one row or one column, so it changes no byte), with that reason."""
    injs = tuple(i for i in INJECTORS if i.bug in ("fp8-ue8m0-scale-rounded-down", "e8m0-scale-read-as-a-number",
                                                   "fp8-scale-grid-transposed", "fp8-promotion-skipped"))
    assert len(injs) == 4
    rows = {r.bug: r for r in selftest(ckpt, EmulatorBackend(), [1], tokens=16, device="cpu", injectors=injs)}
    expect = {"fp8-ue8m0-scale-rounded-down": {f"{s} bytes" for s in FP8_STAGES},
              "e8m0-scale-read-as-a-number": {f"{s} bound" for s in FP8_STAGES},
              "fp8-promotion-skipped": {"attn.wq_a bound"}}
    for bug, caught in expect.items():
        assert rows[bug].status == "caught" and set(rows[bug].caught_by) == caught and not rows[bug].misblamed, rows[bug]
    grid = rows["fp8-scale-grid-transposed"]
    assert grid.status == "not applicable" and "one row or one column" in grid.message, grid
    # an NVFP4 layer has no FP8 stage: its passing NVFP4 bytes / bound verdicts do not make these MISSED
    for row in selftest(ckpt, EmulatorBackend(), [0], tokens=16, device="cpu", injectors=injs):
        assert row.status == "not applicable", row


def test_bytes_check_of_fp8_stages_needs_quantize_fp8_only():
    from verify.verdicts.judges import dense

    case = _grid_case()
    assert dense._ops(JudgeContext(EmulatorBackend(), case), ATTN_WQ_A, Check.BYTES) == (Op.QUANTIZE_FP8,)
