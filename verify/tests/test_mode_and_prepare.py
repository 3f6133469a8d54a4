"""The numerics-mode and prepare checks (issue 24 items 2 and 3): references.modes, the emulator's modes, the
`mode` check telling W4A4 from W4A16 on the fixture, and two planted backends: one that declares W4A4 but
computes W4A16 (fails its mode check and only that), one whose prepare applies weight_scale_2 twice (fails
the prepare check and only that: its GEMMs are judged on its own decoded weights)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from references.layer import RunOptions
from references.linear import Nvfp4Weight, dequantize_weight_f64, linear as ref_linear
from references.modes import BF16, MODES_OF_FORMAT, W4A4, W4A8, W4A16, linear_in_mode, mode_gemm_f64
from references.recipes import TE
from references.stages import ATTN_WO_A, DENSE_LINEAR_STAGES, Op
from verify.backends import EmulatorBackend, NumericsMode
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.run import run_layer
from verify.verdicts.judges.mode import declared_mode

TOKENS, SEED = 48, 11


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


class DeclaresW4A4ComputesW4A16(EmulatorBackend):
    """Says W4A4 for NVFP4 dense linears (the default declaration), computes W4A16 there (bf16 activations,
    weights dequantized exactly): the field report of issue 24."""

    name = "planted-w4a4-declared-w4a16-computed"

    def computed_mode(self, op, weight_format):
        return NumericsMode.W4A16 if weight_format == "nvfp4" else super().computed_mode(op, weight_format)


class ScaleAppliedTwice(EmulatorBackend):
    """A load-time repack that folds weight_scale_2 into its NVFP4 dense weights twice (its GEMM is right for
    the weights it was given; its dequantize_prepared decodes what it really holds)."""

    name = "planted-prepare-scale-twice"

    def prepare_linear(self, lin):
        w = super().prepare_linear(lin)
        if isinstance(w, Nvfp4Weight):
            w = dataclasses.replace(w, global_dec_f32=(w.global_dec_f32 * w.global_dec_f32).to(torch.float32))
        return w


class Fp32Emulator(EmulatorBackend):
    """The emulator declaring a true fp32 accumulator (2^-24, as sm90 does): the bounds the mode check works
    with on a Hopper kernel."""

    name = "emulator-fp32-bounds"
    u_acc = 2.0**-24


_RUNS: dict = {}


def _run(ckpt, backend, layer_index: int = 0, act: str = "static"):
    key = (backend.name, tuple(sorted(map(str, getattr(backend, "modes", {}).items()))), layer_index, act)
    if key not in _RUNS:
        layer = ckpt.load_layer(layer_index)
        inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device="cpu")
        _RUNS[key] = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=act), backend=backend)
    return _RUNS[key]


def _nvfp4_dense_stages(run) -> list[str]:
    """The dense linear stages of the run (and the grouped attn.wo_a) whose weights are NVFP4 (their mode verdict
    lists w4a16)."""
    names = {s.name for s in (*DENSE_LINEAR_STAGES, ATTN_WO_A)}
    return sorted(v.stage for v in run.verdicts if v.check == "mode" and v.stage in names
                  and any(k.startswith("mode_ratio_w4a16_") for k in v.metrics))


# ----------------------------------------------------------------------------- references.modes


def test_each_nvfp4_mode_is_its_own_product_and_w4a4_is_the_emulated_linear():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 64, generator=g) * 3).to(torch.bfloat16)
    wq = torch.randint(0, 256, (16, 32), generator=g, dtype=torch.uint8)
    sf = torch.randint(0x30, 0x48, (16, 4), generator=g, dtype=torch.uint8)
    w = Nvfp4Weight(wq, sf, torch.tensor(0.0123, dtype=torch.float32), torch.tensor(0.004, dtype=torch.float32))
    ys = {m: linear_in_mode(x, w, m, recipe=TE) for m in MODES_OF_FORMAT["nvfp4"]}
    ref, _ = ref_linear(x, w, mode="emulated", recipe=TE)
    assert torch.equal(ys[W4A4].view(torch.int16), ref.view(torch.int16))
    y16 = x.double() @ dequantize_weight_f64(w).T  # W4A16: bf16 activations, exact weights
    assert torch.allclose(mode_gemm_f64(x, w, W4A16, recipe=TE)[0], y16, rtol=1e-12, atol=0)
    for a, b in [(W4A4, W4A16), (W4A4, W4A8), (W4A16, BF16), (W4A8, W4A16)]:
        assert not torch.equal(ys[a], ys[b]), f"{a} and {b} gave the same bits on random data"


def test_a_mode_outside_the_weights_format_is_refused():
    w = Nvfp4Weight(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8),
                    torch.ones((), dtype=torch.float32))
    with pytest.raises(ValueError, match="fp8_block"):
        mode_gemm_f64(torch.zeros(2, 16, dtype=torch.bfloat16), w, "fp8_block", recipe=TE)


def test_declared_mode_defaults_and_reads_a_backends_modes():
    assert declared_mode(EmulatorBackend(), Op.DENSE_LINEAR, "nvfp4") == "w4a4"
    assert declared_mode(EmulatorBackend(), Op.DENSE_LINEAR, "fp8_block") == "fp8_block"
    assert declared_mode(EmulatorBackend(modes={"nvfp4": "w4a16"}), Op.GROUPED_GEMM, "nvfp4") == "w4a16"
    assert declared_mode(object(), Op.DENSE_LINEAR, "nvfp4") == "w4a4"  # a protocol-only wrapper: the default


# ----------------------------------------------------------------------------- the mode check on the fixture


@pytest.mark.parametrize("computes", ["w4a4", "w4a16"])
def test_the_mode_check_tells_w4a4_from_w4a16_on_the_fixture_with_fp32_bounds(ckpt, computes):
    """With a true fp32 accumulator's bound (sm90's u_acc), every NVFP4 dense stage of layer 0 matches exactly
    the mode it computes; the other of the two is off by a ratio > 10 (the numbers are printed)."""
    backend = Fp32Emulator(modes={"nvfp4": computes})
    run = _run(ckpt, backend)
    stages = _nvfp4_dense_stages(run)
    assert stages, "layer 0 of mini-v4 has NVFP4 dense linears"
    other = {"w4a4": "w4a16", "w4a16": "w4a4"}[computes]
    for v in run.verdicts:
        if v.stage in stages and v.check == "mode":
            assert v.status == "pass", v.message
            for key, r in v.metrics.items():
                if key.startswith(f"mode_ratio_{computes}_"):
                    assert r <= 1, (key, r)
                if key.startswith(f"mode_ratio_{other}_"):
                    assert r > 10, (key, r)
            print(f"{computes}: {v.message}")


def test_the_grouped_gemm_mode_check_reports_every_candidate(ckpt):
    run = _run(ckpt, Fp32Emulator())
    for stage in ("moe.l1", "moe.l2"):
        v = next(v for v in run.verdicts if v.stage == stage and v.check == "mode")
        assert v.status == "pass", v.message
        ratios = {k: r for k, r in v.metrics.items() if k.startswith("mode_ratio_")}
        assert len(ratios) == 4 * len(stage_parts := [k for k in ratios if k.startswith("mode_ratio_w4a4_")]) and stage_parts
        assert all(r > 10 for k, r in ratios.items() if not k.startswith("mode_ratio_w4a4_")), ratios
        print(v.message)


def test_a_backend_declaring_w4a16_for_grouped_gemm_is_skipped_there_with_the_reason(ckpt):
    run = _run(ckpt, EmulatorBackend(modes={(Op.GROUPED_GEMM, "nvfp4"): "w4a16"}))
    v = next(v for v in run.verdicts if v.stage == "moe.l1" and v.check == "mode")
    assert v.status == "skipped" and "QuantizedAct" in v.message


# ----------------------------------------------------------------------------- planted backends


def test_declares_w4a4_but_computes_w4a16_fails_its_mode_check_and_only_that(ckpt):
    run = _run(ckpt, DeclaresW4A4ComputesW4A16())
    stages = _nvfp4_dense_stages(run)
    failed = {(v.stage, v.check) for v in run.failed}
    assert stages and failed == {(s, "mode") for s in stages}, \
        "\n".join(f"{v.stage} {v.check}: {v.message[:300]}" for v in run.failed)
    for v in run.failed:
        assert "declared w4a4, output matches w4a16 (max bound ratio" in v.message and "not w4a4 (ratio" in v.message, \
            v.message
    bound = next(v for v in run.verdicts if v.stage == stages[0] and v.check == "bound")
    assert bound.status == "pass" and "judged as w4a16" in bound.message, bound.message  # the bound says why


def test_a_prepare_that_applies_the_scale_twice_fails_prepare_and_not_the_gemm(ckpt):
    run = _run(ckpt, ScaleAppliedTwice())
    stages = _nvfp4_dense_stages(run)
    failed = {(v.stage, v.check) for v in run.failed}
    assert stages and failed == {(s, "prepare") for s in stages}, \
        "\n".join(f"{v.stage} {v.check}: {v.message[:300]}" for v in run.failed)
    v = next(v for v in run.failed)
    assert "weight_scale_2: the global scale applied twice" in v.message, v.message
    bound = next(b for b in run.verdicts if b.stage == v.stage and b.check == "bound")
    assert bound.status == "pass" and "own prepared weights" in bound.message, bound.message


def test_the_bound_still_fails_a_wrong_gemm_on_a_wrong_prepare(ckpt):
    """The own-weight judging is no free pass: the same repack with a GEMM that is also off fails the bound."""
    class AlsoWrongGemm(ScaleAppliedTwice):
        name = "planted-prepare-scale-twice-and-gemm-off"

        def dense_gemm(self, a, w):
            return (super().dense_gemm(a, w).float() * 1.03).to(torch.bfloat16)

        def grouped_dense_linear(self, x_bf16, w, **kw):  # attn.wo_a's one call, off the same way
            return (super().grouped_dense_linear(x_bf16, w, **kw).float() * 1.03).to(torch.bfloat16)

    run = _run(ckpt, AlsoWrongGemm())
    failed = {(v.stage, v.check) for v in run.failed}
    stages = _nvfp4_dense_stages(run)
    assert {(s, "bound") for s in stages} <= failed and {(s, "prepare") for s in stages} <= failed


def test_a_backend_without_dequantize_prepared_is_not_served_for_prepare(ckpt):
    from verify.backends import Backend  # noqa: PLC0415

    class NoDecode(EmulatorBackend):
        name = "emulator-without-dequantize-prepared"
        dequantize_prepared = Backend.dequantize_prepared  # the base class's: not served

    run = _run(ckpt, NoDecode())
    v = next(v for v in run.verdicts if v.check == "prepare")
    assert v.status == "not served" and "dequantize_prepared" in v.message


def test_the_emulator_decodes_its_prepared_weights_bit_equal(ckpt):
    run = _run(ckpt, EmulatorBackend())
    prep = [v for v in run.verdicts if v.check == "prepare"]
    assert prep and all(v.status == "pass" for v in prep), [v.message for v in prep if v.status != "pass"]
    assert all(math.isclose(r, 1.0) for v in prep for k, r in v.metrics.items() if k.startswith("prepare_bit_equal"))


# ----------------------------------------------------------------------------- sm90's prepared weights, decoded on the host


def _sm90():
    from verify.backends.sm90 import Sm90Adapter  # noqa: PLC0415 (its host prepare runs on a CPU)

    return Sm90Adapter()


@pytest.mark.parametrize("layer_index", [0, 1], ids=["layer0-nvfp4", "layer1-fp8"])
def test_sm90_prepared_weights_decode_bit_equal_to_the_checkpoint(ckpt, layer_index):
    """kernels.sm90.host_decode undoes the sm90 prepare (swizzled scales, the w1|w3 row interleave, FP8 block
    scales): every dense linear and expert stack of the layer, bit for bit."""
    from verify.verdicts.judges.prepare import check_prepared_weight  # noqa: PLC0415

    b, layer = _sm90(), ckpt.load_layer(layer_index)
    lins = list(layer.attention.values()) + [getattr(layer.shared_experts, r) for r in ("w1", "w3", "w2")]
    for lin in lins:
        metrics: dict = {}
        check_prepared_weight(lin.module, b.dequantize_prepared(b.prepare_linear(lin)), lin, metrics, "y")
        assert metrics["prepare_bit_equal_y"] == 1.0, lin.module
    decoded = b.dequantize_prepared(b.prepare_experts(layer.experts))
    for role in ("w1", "w3", "w2"):
        metrics = {}
        check_prepared_weight(role, decoded[role], getattr(layer.experts, role), metrics, role)
        assert metrics[f"prepare_bit_equal_{role}"] == 1.0, role


def test_sm90_decode_blames_a_swapped_gate_up_interleave_on_prepare(ckpt):
    """The decode reads the interleave from sm90's own layout: a prepare that put up where gate belongs fails."""
    from kernels.sm90.host_prepare_experts import prepare_gate_up  # noqa: PLC0415
    from kernels.sm90.host_decode import grouped_weight_to_f32  # noqa: PLC0415
    from verify.verdicts.judges.prepare import check_prepared_weight  # noqa: PLC0415

    ex = ckpt.load_layer(0).experts
    w1, w3 = ex.w1, ex.w3
    swapped = prepare_gate_up(w3.weight_u8, w3.weight_scale_e4m3, w3.weight_scale_2_f32,
                              w1.weight_u8, w1.weight_scale_e4m3, w1.weight_scale_2_f32)
    gate, _ = grouped_weight_to_f32(swapped)
    with pytest.raises(AssertionError, match="prepared values differ"):
        check_prepared_weight("moe.l1 experts.w1", gate, w1, {}, "gate")


def test_a_prepare_that_applies_the_scale_twice_to_the_experts_fails_prepare_and_not_the_grouped_gemms(ckpt):
    """The same repack on the expert stacks: moe.l1 / moe.l2 fail prepare only (their GEMMs judged on the
    backend's own stacks); the fused L1 and the whole block, judged on the checkpoint's weights, fail too."""
    class ExpertsScaledTwice(EmulatorBackend):
        name = "planted-prepare-experts-scale-twice"

        def prepare_experts(self, experts):
            st = super().prepare_experts(experts)
            sq = [dataclasses.replace(w, global_dec_f32=(w.global_dec_f32 * w.global_dec_f32).to(torch.float32))
                  for w in (st.w1, st.w3, st.w2)]
            return type(st)(*sq)

    run = _run(ckpt, ExpertsScaledTwice())
    failed = {(v.stage, v.check) for v in run.failed}
    assert failed == {("moe.l1", "prepare"), ("moe.l2", "prepare"), ("moe.l1_fused", "interval"),
                      ("moe.block", "bound")}, "\n".join(f"{v.stage} {v.check}: {v.message[:200]}" for v in run.failed)
    bound = next(v for v in run.verdicts if v.stage == "moe.l1" and v.check == "bound")
    assert "own prepared" in bound.message, bound.message


def test_an_output_wrong_in_every_mode_fails_the_bound_and_leaves_mode_to_it(ckpt):
    """3 % off in every output: no mode matches; the bound fails (once), the mode check says so without
    failing a second time (skipped, never a pass)."""
    class ThreePercentOff(EmulatorBackend):
        name = "planted-dense-linear-3-percent-off"

        def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
            y = super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
            return (y.float() * 1.03).to(torch.bfloat16)

        def grouped_dense_linear(self, x_bf16, w, **kw):  # attn.wo_a's one call, off the same way
            return (super().grouped_dense_linear(x_bf16, w, **kw).float() * 1.03).to(torch.bfloat16)

    run = _run(ckpt, ThreePercentOff())
    stages = _nvfp4_dense_stages(run) or sorted({v.stage for v in run.failed})
    for s in stages:
        got = {v.check: v for v in run.verdicts if v.stage == s}
        assert got["bound"].status == "fail", got["bound"].message
        assert got["mode"].status == "skipped" and "matches no mode" in got["mode"].message, got["mode"].message
