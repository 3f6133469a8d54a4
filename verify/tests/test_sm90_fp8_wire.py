"""The sm90 backend serves the FP8 block-128 dense linears (attention wq_a / wkv / wq_b / wo_b, shared
expert l1 / l2), and the dense judge bounds an FP8 result with the backend's declared FP8 accumulator.

CPU: the adapter's FP8 prepare (host code: exact scale decode, the activation scale rule it implies, the
refusals), its "not served" reason on a machine without CUDA, and the dense judge's FP8 bound against a
fake backend that computes with a 14-bit truncating accumulator (references.fp8_gemm's model): declared
as fp32 it fails, declared as (2^-13, promotion every 128) and computing with that promotion it passes,
declared so but skipping the promotion it fails. GPU (markers gpu, sm90): the fixture's FP8 layers
through the sm90 backend pass bound, batch, sync and graph on every FP8 stage.
"""

from __future__ import annotations

import re
from types import MappingProxyType, SimpleNamespace

import pytest
import torch

from references.codecs import f32_to_e4m3_bytes, ue8m0_bytes_to_f32
from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_f64, fp8_block_gemm_narrow_acc_model
from references.fp8_weight import fp8_weight_from_v4_e8m0_scale
from references.layer import RunOptions
from references.stages import ATTN_WQ_A, Check, Op, stage
from verify.backends import EmulatorBackend
from verify.backends.base import Backend, declared_fp8_accumulator
from verify.backends.emulator import fp8_act_scale_fmt
from verify.checkpoint import Bf16Linear, Checkpoint, Fp8BlockLinear
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.reference_layer import to_reference_weight
from verify.run import run_layer
from verify.verdicts import LayerCase
from verify.verdicts.context import JudgeContext
from verify.verdicts.layer import judge_stage

CUDA = torch.cuda.is_available()
FP8_STAGES = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_b", "shared.l1", "shared.l2")
FP8_LAYERS = (1, 2, 3)  # mini-v4: layer 0 is NVFP4, layers 1-3 FP8 (verify/checkpoint/writer.py)


def _sm90():
    from verify.backends.sm90 import Sm90Adapter  # noqa: PLC0415 (the adapter imports kernels/ lazily itself)

    return Sm90Adapter()


def _e4m3(values: torch.Tensor) -> torch.Tensor:
    return f32_to_e4m3_bytes(values.to(torch.float32), saturate=True).view(torch.float8_e4m3fn)


def _v4_linear(n: int, k: int, scale_bytes: torch.Tensor, *, seed: int = 0, module: str = "layers.1.attn.wq_a"):
    g = torch.Generator().manual_seed(seed)
    w = _e4m3(torch.randn(n, k, generator=g) * 8)
    return Fp8BlockLinear(module, w, scale_bytes.to(torch.uint8).view(torch.float8_e8m0fnu), None)


# ============================================================================= declarations


def test_the_backends_declare_their_fp8_accumulators():
    class Plain(Backend):
        name, u_acc = "plain", 2.0**-20

    assert declared_fp8_accumulator(_sm90()) == (2.0**-13, 128)
    assert declared_fp8_accumulator(EmulatorBackend()) == (2.0**-53, None)
    assert declared_fp8_accumulator(Plain()) == (2.0**-20, None)  # defaults: u_acc, one chunk
    assert declared_fp8_accumulator(SimpleNamespace(name="protocol-only", u_acc=2.0**-24)) == (2.0**-24, None)
    with pytest.raises(ValueError, match=r"bad: fp8_promotion_interval=0"):
        declared_fp8_accumulator(SimpleNamespace(name="bad", u_acc=2.0**-24, fp8_promotion_interval=0))


# ============================================================================= prepare on the CPU (host code)


@pytest.mark.parametrize("n,k", [(256, 384), (200, 300)], ids=["full-blocks", "partial-blocks"])
def test_sm90_prepares_a_v4_fp8_linear_on_the_cpu(n, k):
    """E8M0 bytes (0 = the subnormal 2^-127, 1, 120, 127, 254) decode bit for bit as references/ decodes
    them; E4M3 bytes unchanged; the activation scale rule is UE8M0 rounded up (V4's power-of-two scales)."""
    grid = (-(-n // 128), -(-k // 128))
    scale = torch.tensor([0, 1, 120, 127, 254, 133], dtype=torch.uint8).repeat(4)[:grid[0] * grid[1]].view(grid)
    lin = _v4_linear(n, k, scale)
    p = _sm90().prepare_linear(lin)
    assert p.scale_rule == "ue8m0_ceil" and p.module == lin.module
    assert torch.equal(p.weight.e4m3_u8, lin.weight_e4m3.view(torch.uint8))
    expected = ue8m0_bytes_to_f32(scale)
    assert p.weight.block_dec_f32.dtype == torch.float32
    assert torch.equal(p.weight.block_dec_f32.view(torch.int32), expected.view(torch.int32))
    assert float(p.weight.block_dec_f32.view(-1)[0]) == 2.0**-127


def test_sm90_prepares_v3_scales_with_the_rule_the_emulator_uses():
    """V3 weight_scale_inv float32 kept bit for bit; the activation scale rule matches the emulator's
    fp8_act_scale_fmt of the same weight (float32 scales -> "f32"; all powers of two -> UE8M0)."""
    g = torch.Generator().manual_seed(1)
    w = _e4m3(torch.randn(256, 256, generator=g) * 8)
    for scales, rule in ((torch.tensor([[0.0123, 0.5], [3.0e-4, 1.0]]), "f32"),
                         (torch.tensor([[2.0**-7, 0.5], [2.0**-12, 1.0]]), "ue8m0_ceil")):
        lin = Fp8BlockLinear("layers.2.attn.wkv", w, None, scales)
        p = _sm90().prepare_linear(lin)
        assert torch.equal(p.weight.block_dec_f32, scales) and p.scale_rule == rule
        assert {"ue8m0": "ue8m0_ceil", "f32": "f32"}[fp8_act_scale_fmt(to_reference_weight(lin))] == rule


@pytest.mark.parametrize("bad", ["nan_byte", "float_copy", "both_scales", "stack"])
def test_sm90_fp8_prepare_refuses_broken_scales_naming_the_tensor(bad):
    scale = torch.full((2, 2), 127, dtype=torch.uint8)
    lin = _v4_linear(256, 256, scale)
    if bad == "nan_byte":
        scale[1, 0] = 0xFF
        lin, match = _v4_linear(256, 256, scale), r"layers.1.attn.wq_a.scale: 1 NaN E8M0 scale bytes \(0xFF\)"
    elif bad == "float_copy":  # E8M0 bytes converted to float32 numbers: 127.0, not 2^0
        lin = Fp8BlockLinear(lin.module, lin.weight_e4m3, scale.to(torch.float32), None)
        match = r"layers.1.attn.wq_a.scale: expected F8_E8M0 bytes .* reads each byte as a number"
    elif bad == "both_scales":
        lin = Fp8BlockLinear(lin.module, lin.weight_e4m3, lin.scale_ue8m0, torch.ones(2, 2))
        match = r"layers.1.attn.wq_a: expected exactly one of .scale"
    else:
        lin = Fp8BlockLinear(lin.module, lin.weight_e4m3[None], lin.scale_ue8m0[None], None)
        match = r"layers.1.attn.wq_a.weight: expected a 2-D \[N, K\] dense weight"
    with pytest.raises(ValueError, match=match):
        _sm90().prepare_linear(lin)


def test_sm90_refuses_a_static_fp8_input_scale_and_fp8_in_dense_gemm():
    b = _sm90()
    p = b.prepare_linear(_v4_linear(128, 128, torch.full((1, 1), 127, dtype=torch.uint8)))
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"^sm90: layers.1.attn.wq_a is FP8 block-128 .* static per-tensor "
                                                  r"FP8 input_scale is not served$"):
        b.dense_linear(x, p, input_dec_scale_f32=torch.ones(1))
    with pytest.raises(NotImplementedError, match=r"dense_gemm takes NVFP4 activations"):
        b.dense_gemm(None, p)
    with pytest.raises(NotImplementedError, match=r"bf16; the sm90 dense GEMMs take NVFP4 and FP8 block-128"):
        b.prepare_linear(Bf16Linear("layers.0.attn.wq_a", torch.ones(4, 4, dtype=torch.bfloat16)))


# ============================================================================= not served on a CPU machine


@pytest.mark.skipif(CUDA, reason="the CPU machine's answer (a CUDA device is present here)")
def test_sm90_on_a_cpu_machine_says_why_it_does_not_serve_the_fp8_stages():
    """Every FP8 stage of an FP8 fixture layer: the checks that run the linear are "not served" for the
    device (no CUDA device / triton missing), never for the weight format (bytes too: its quantize_fp8)."""
    b = _sm90()
    reason = b.unsupported_reason(Op.DENSE_LINEAR, torch.device("cpu"))
    assert reason in ("sm90: no CUDA device", "sm90: triton is not installed"), reason
    assert b.unsupported_reason(Op.PREPARE, torch.device("cpu")) == reason
    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    layer = ckpt.load_layer(1)
    assert all(isinstance(lin, Fp8BlockLinear) for lin in (layer.attention["wq_a"], layer.shared_experts.w1))
    run = run_layer(ckpt, layer, layer_inputs(ckpt, layer, tokens=16, seed=0, device="cpu"), options=RunOptions(),
                    backend=b)
    for name in FP8_STAGES:
        for check in stage(name).checks:
            v = run.verdict(name, check.value)
            assert (v.status, v.message) == ("not served", reason), (name, v)  # bytes: its quantize_fp8


# ============================================================================= the dense judge's FP8 bound


class NarrowAccFp8(Backend):
    """A fake FP8 backend: the references' 1x128 UE8M0 activations and block-128 weight, multiplied by
    references.fp8_gemm's model of a 14-bit truncating accumulator, promoted to float32 every
    `computes_promotion` of K (None: never), rounded once to bf16. It declares `declares` =
    (fp8_u_acc, fp8_promotion_interval)."""

    name = "narrow14"
    accumulator = "14-bit truncating model"

    def __init__(self, *, declares: tuple[float, int | None], computes_promotion: int | None) -> None:
        self.fp8_u_acc, self.fp8_promotion_interval = declares
        self._promotion = computes_promotion

    def prepare_linear(self, lin):
        return fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        act = quantize_act_fp8_1x128(x_bf16, recipe=FP8_ACT_UE8M0)
        y = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="truncate",
                                            promotion_interval=self._promotion)
        return y.to(torch.float32).to(torch.bfloat16)


def _swallowing_case() -> LayerCase:
    """attn.wq_a with K = 1024, N = 128: in token 0 the first product is 2^14 and the 1023 after it are 1
    (codes 256 x 64, then 1 x 1; block scales 2^0); a 14-bit accumulator at 2^14 has ulp 2, so without
    promotion truncation drops every later product (error 1023 of y = 17407); promoted every 128 only
    group 0's 127 are dropped. Tokens 1-3 are random."""
    m, n, k = 4, 128, 1024
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    x[0] = 1.0
    x[0, 0] = 256.0
    w = torch.ones(n, k)
    w[:, 0] = 64.0
    lin = Fp8BlockLinear("layers.1.attn.wq_a", _e4m3(w), torch.full((1, k // 128), 127, dtype=torch.uint8)
                         .view(torch.float8_e8m0fnu), None)
    layer = SimpleNamespace(attention=MappingProxyType({"wq_a": lin}))
    ref = fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
    high = {ATTN_WQ_A.tensor(): fp8_block_gemm_f64(quantize_act_fp8_1x128(x, recipe=FP8_ACT_UE8M0), ref)}
    return LayerCase(layer, "deepseek_v4", x, x, None, {}, high, RunOptions(), None)


def _bound_verdict(backend: Backend) -> dict:
    """check -> verdict of attn.wq_a on the swallowing case, judged through `backend`."""
    return {v.check: v for v in judge_stage(JudgeContext(backend, _swallowing_case()), ATTN_WQ_A)}


def _failed_ratio(v) -> float:
    """The max |y - y64| / bound a failing bound verdict names, after checking that exactly token 0's 128
    outputs (the swallowing ones) exceed it: the random tokens pass under every declaration."""
    assert v.status == "fail" and "128/512 elements exceed the accumulation bound" in v.message, v
    return float(re.search(r"max \|y - y64\| / bound = ([0-9.]+)", v.message).group(1))


def test_the_swallowing_case_is_what_its_docstring_says():
    case = _swallowing_case()
    lin = case.layer.attention["wq_a"]
    w = fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
    act = quantize_act_fp8_1x128(case.x_attn[:1], recipe=FP8_ACT_UE8M0)
    y64 = fp8_block_gemm_f64(act, w)
    no_promo = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="truncate", promotion_interval=None)
    promo = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=14, rounding="truncate", promotion_interval=128)
    assert float(y64[0, 0]) == 17407.0 and float(no_promo[0, 0]) == 16384.0 and float(promo[0, 0]) == 17280.0


@pytest.mark.parametrize("declares", [(2.0**-24, None), (2.0**-24, 128)], ids=["fp32", "fp32-promoted"])
@pytest.mark.parametrize("promotion", [None, 128], ids=["computes-unpromoted", "computes-promoted"])
def test_a_14_bit_accumulator_declared_as_fp32_fails_the_bound(declares, promotion):
    v = _bound_verdict(NarrowAccFp8(declares=declares, computes_promotion=promotion))
    assert _failed_ratio(v["bound"]) > 1.5  # error 1023 (unpromoted) or 127 (promoted) vs a bound of ~65


def test_a_14_bit_accumulator_declared_with_its_promotion_passes_the_bound():
    v = _bound_verdict(NarrowAccFp8(declares=(2.0**-13, 128), computes_promotion=128))
    assert v["bound"].status == "pass", v["bound"]
    assert 0.2 < v["bound"].metrics["bound_ratio_y"] < 1, v["bound"].metrics  # 127 of ~340 in token 0
    assert "promoted to fp32 every 128 of K" in v["bound"].message
    assert v["batch"].status == "pass" and v["bytes"].status == "not served" and v["padding"].status == "skipped"


def test_promotion_declared_but_skipped_fails_the_bound():
    v = _bound_verdict(NarrowAccFp8(declares=(2.0**-13, 128), computes_promotion=None))
    assert _failed_ratio(v["bound"]) > 2.5  # error 1023 vs the promoted bound of ~340


def test_the_emulator_is_judged_on_its_float64_path():
    """The emulator declares (2^-53, no promotion): its FP8 results keep gemm_error_bound over K (the
    golden file's ratios); the fake's promoted declaration does not apply to it."""
    v = _bound_verdict(EmulatorBackend())
    assert v["bound"].status == "pass" and "promoted" not in v["bound"].message, v["bound"]


# ============================================================================= GPU expectation


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("i", FP8_LAYERS, ids=[f"layer{i}" for i in FP8_LAYERS])
def test_gpu_sm90_serves_and_passes_the_fixture_fp8_stages(i, act):
    """On an H100 / H200: every FP8 stage of the fixture's FP8 layers through --backend sm90 passes
    bytes (its quantize_fp8 kernel byte for byte with references/fp8_act.py), bound (the declared 2^-13 / 128
    accumulator), batch, sync and graph; padding is skipped (no NVFP4 scale padding). Static runs too: FP8
    stages stay dynamic."""
    if not CUDA or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU (sm_90)")
    b = _sm90()
    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    layer = ckpt.load_layer(i, device="cuda")
    run = run_layer(ckpt, layer, layer_inputs(ckpt, layer, tokens=48, seed=11, device="cuda"),
                    options=RunOptions(act_scale=act), backend=b)
    for name in FP8_STAGES:
        got = {c.value: run.verdict(name, c.value) for c in stage(name).checks}
        for check in ("bytes", "bound", "batch", "sync", "graph"):
            assert got[check].status == "pass", (name, check, got[check].status, got[check].message)
        assert "promoted to fp32 every 128 of K" in got["bound"].message
        assert "UE8M0 scale bytes equal references.fp8_act" in got["bytes"].message, got["bytes"].message
        assert got["padding"].status == "skipped", (name, got["padding"].message)
