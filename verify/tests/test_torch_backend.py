"""The torch backend (verify/backends/adapters/torch_ops.py): torch's own ops through the protocol.

On the CPU: its FP8 1x128 activation quantizer byte for byte against references/fp8_act.py; the per-group
rowwise and tensorwise FP8 GEMMs (torch's CPU scaled_mm) within the FP8 block bound of their declared
accumulator, and a planted scale-grid bug failing it; its own prepare (E8M0 decode, cuBLASLt's blockwise
scale operand, the 128x4 NVFP4 swizzle) against the references; the layer's verdicts through it; the
accumulator probe measuring its CPU accumulator and refusing another declaration, and reporting a path it
leaves out (M = 1) as not served. On a GPU the same tests run on cuda where it serves them; torch's
blockwise GEMM on an H100 and its NVFP4 GEMM on a B200 are judged where they run, skipped with the
backend's reason elsewhere. The M each FP8 scaling refuses (blockwise: M not a multiple of 4; rowwise: M = 1
on compute capability 9.x) is what an H100 with torch 2.11.0+cu130 measured: a refused M must raise the
backend's "not served" sentence, never torch's error, and the layer's batch check and the probe show it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from references.codecs import ue8m0_bytes_to_f32
from references.fp8_act import FP8_ACT_F32, FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_error_bound, fp8_block_gemm_f64
from references.fp8_weight import fp8_weight_from_v3_weight_scale_inv, fp8_weight_from_v4_e8m0_scale
from references.gemm import gemm_error_bound, nvfp4_gemm_f64
from references.layouts import sf_linear_to_swizzled_128x4
from references.layer import RunOptions
from references.nvfp4 import quantize_nvfp4, quantize_nvfp4_weight_checkpoint
from references.linear import nvfp4_global_scale_for, act_global_dec_f32
from references.stages import Op
from verify.accumulator import AccumulatorRefused, check_declared_fp8_accumulator, probe_fp8_accumulator
from verify.assertions import assert_bytes_equal, assert_within_gemm_bound
from verify.backends import QuantizedAct, get_backend
from verify.backends.adapters.torch_ops import BLOCKWISE_M, ROWWISE_M1, TorchBackend, e8m0_bytes_to_f32, \
    nvfp4_sf_to_swizzled_128x4
from verify.checkpoint import Checkpoint, Fp8BlockLinear, Nvfp4Linear
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.rng import CounterRng
from verify.run import run_layer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RULES = {"ue8m0_ceil": FP8_ACT_UE8M0, "f32": FP8_ACT_F32}
ROWWISE = "verify.backends.adapters.torch_ops:rowwise"
TENSORWISE = "verify.backends.adapters.torch_ops:tensorwise"
CC = torch.cuda.get_device_capability(DEVICE) if DEVICE.type == "cuda" else None


def _backend(scaling: str, *ops: Op) -> TorchBackend:
    b = TorchBackend(scaling, DEVICE)
    for op in ops:
        reason = b.unsupported_reason(op, DEVICE)
        if reason:
            pytest.skip(f"not served here: {reason}")
    return b


def _x(kind: str, m: int, k: int, seed: int = 3) -> torch.Tensor:
    g = CounterRng(seed)
    x = g.normal((m, k))
    if kind == "heavy_tailed":
        x = x * g.lognormal((m, k), sigma=2.0)
    elif kind == "zero_groups":  # whole 128-groups of +0 and -0: the amax floor decides the scale
        x[:, :128] = 0.0
        if k > 128:
            x[:, 128:256] = -0.0
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "special":
        flat = x.view(-1)
        flat[::97] = float("nan")
        flat[5::131] = float("inf")
        flat[9::151] = float("-inf")
    return x.to(torch.bfloat16).to(DEVICE)


# ----------------------------------------------------------------------------- FP8 activations


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "zero_groups", "tiny", "special"])
@pytest.mark.parametrize("m,k", [(1, 128), (3, 208), (17, 1024)], ids=lambda v: str(v))
def test_quantize_fp8_bytes_equal_the_references(rule, kind, m, k):
    b = _backend("rowwise", Op.QUANTIZE_FP8)
    x = _x(kind, m, k)
    got = b.quantize_fp8(x, scale_rule=rule)
    want = quantize_act_fp8_1x128(x, recipe=RULES[rule])
    assert got.scale_rule == rule and got.block_dec_scale.dtype == got.scale_dtype
    assert_bytes_equal(got.e4m3_u8, want.e4m3_u8, label=f"torch quantize_fp8 codes [{rule}, {kind}]")
    assert_bytes_equal(got.block_dec_scale.contiguous().view(torch.uint8), want.block_dec_scale.contiguous().view(
        torch.uint8), label=f"torch quantize_fp8 scales [{rule}, {kind}]")


# ----------------------------------------------------------------------------- FP8 block-128 GEMMs


def _fp8_linear(n: int, k: int, encoding: str, seed: int = 5) -> Fp8BlockLinear:
    g = CounterRng(seed)
    w = torch.clamp(g.normal((n, k)) * 64, -448, 448).to(torch.float8_e4m3fn)
    grid = (-(-n // 128), -(-k // 128))
    if encoding == "v4":
        e8m0 = (120 + g.u32(grid) % 12).to(torch.uint8).view(torch.float8_e8m0fnu)
        return Fp8BlockLinear("probe.fp8", w.to(DEVICE), e8m0.to(DEVICE), None)
    scale = (g.lognormal(grid, sigma=0.5) * 1e-3).to(torch.float32)
    return Fp8BlockLinear("probe.fp8", w.to(DEVICE), None, scale.to(DEVICE))


def _fp8_expected(x: torch.Tensor, lin: Fp8BlockLinear, b: TorchBackend):
    """(y64, bound) of the references for x and lin, under the backend's declared FP8 accumulator."""
    if lin.scale_ue8m0 is not None:
        ref_w = fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)
        recipe = FP8_ACT_UE8M0
    else:
        ref_w = fp8_weight_from_v3_weight_scale_inv(lin.weight_e4m3, lin.scale_inv_f32, module=lin.module)
        recipe = FP8_ACT_F32
    act = quantize_act_fp8_1x128(x, recipe=recipe)
    y64 = fp8_block_gemm_f64(act, ref_w)
    return y64, fp8_block_gemm_error_bound(act, ref_w, y64, u_acc=b.fp8_u_acc,
                                           promotion_interval=b.fp8_promotion_interval)


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise", "blockwise"])
@pytest.mark.parametrize("encoding", ["v4", "v3"])
@pytest.mark.parametrize("m,n,k", [(1, 256, 1024), (5, 384, 640), (12, 256, 384), (48, 128, 208)],
                         ids=lambda v: str(v))
def test_fp8_dense_linear_within_the_block_bound(scaling, encoding, m, n, k):
    """Within the bound of its declared accumulator; an M its GEMM does not take (its own sentence, tested
    against the measurement below) raises that sentence, not torch's error."""
    b = _backend(scaling, Op.PREPARE, Op.DENSE_LINEAR)
    lin = _fp8_linear(n, k, encoding)
    x = _x("heavy_tailed", m, k)
    w = b.prepare_linear(lin)
    assert w.scale_rule == ("ue8m0_ceil" if encoding == "v4" else "f32")
    refused = b.fp8_gemm_m_reason(m, CC)
    if refused:
        with pytest.raises(NotImplementedError) as e:
            b.dense_linear(x, w)
        assert str(e.value) == refused
        return
    y = b.dense_linear(x, w)
    y64, bound = _fp8_expected(x, lin, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert_within_gemm_bound(y, y64, bound, label=f"torch {scaling} FP8 linear [{encoding}]")


class _TransposedGrid(TorchBackend):
    """A planted prepare bug: each K group reads the scale of the N block with its own index."""

    def _prepare_fp8(self, lin):
        w = super()._prepare_fp8(lin)
        dec = w.block_dec_f32.t().contiguous()  # [G, Nb] read as [Nb, G]
        rows = dec.t().repeat_interleave(128, dim=1)[:, :w.weight_e4m3.shape[0]].contiguous()
        return dataclasses.replace(w, row_dec_f32=rows)


def test_a_transposed_weight_scale_grid_fails_the_bound():
    b = _TransposedGrid("rowwise", DEVICE)
    if b.unsupported_reason(Op.DENSE_LINEAR, DEVICE):
        pytest.skip(b.unsupported_reason(Op.DENSE_LINEAR, DEVICE))
    lin = _fp8_linear(384, 384, "v4")
    x = _x("normal", 8, 384)
    y64, bound = _fp8_expected(x, lin, b)
    with pytest.raises(AssertionError, match="exceed the accumulation bound"):
        assert_within_gemm_bound(b.dense_linear(x, b.prepare_linear(lin)), y64, bound, label="transposed grid")


H100 = (9, 0)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 9, 13], ids=lambda m: f"M{m}")
def test_blockwise_refuses_m_not_a_multiple_of_4_with_the_measurement(m):
    """On an H100 (torch 2.11.0+cu130) M = 1, 2, 3, 5, 6, 7 failed and 4, 8, 16 ran: every M not a multiple
    of 4 is "not served" with the measured sentence, before any GEMM (so on the CPU too)."""
    b = TorchBackend("blockwise", "cpu")
    assert b.fp8_gemm_m_reason(m, H100) == BLOCKWISE_M.format(m=m)
    w = b.prepare_linear(_fp8_linear(128, 256, "v4"))
    with pytest.raises(NotImplementedError) as e:
        b.dense_linear(torch.zeros(m, 256, dtype=torch.bfloat16), w)
    assert str(e.value) == BLOCKWISE_M.format(m=m)
    assert f"this is M = {m} " in str(e.value) and "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130" in str(e.value)


def test_the_m_each_scaling_takes_is_what_the_h100_measured():
    """blockwise: M a multiple of 4 (4, 8, 16, 32, 48, 64, 128, 4096 ran); rowwise: all but M = 1 on 9.x (5, 8,
    16, 48 ran; M = 1 failed there only: the CPU runs it); tensorwise: every M (1, 5, 48 ran)."""
    block, row, tensor = (TorchBackend(s, "cpu") for s in ("blockwise", "rowwise", "tensorwise"))
    assert all(block.fp8_gemm_m_reason(m, H100) is None for m in (4, 8, 12, 16, 32, 48, 64, 128, 4096))
    assert row.fp8_gemm_m_reason(1, H100) == ROWWISE_M1 and "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130" in ROWWISE_M1
    assert all(row.fp8_gemm_m_reason(m, H100) is None for m in (2, 4, 5, 8, 16, 48))
    assert all(row.fp8_gemm_m_reason(m, cc) is None for m in (1, 5) for cc in (None, (8, 9), (10, 0)))
    assert all(tensor.fp8_gemm_m_reason(m, cc) is None for m in (1, 2, 5, 48) for cc in (None, H100))


def test_blockwise_states_where_it_runs_and_refuses_a_static_scale():
    b = TorchBackend("blockwise", "cpu")
    reason = b.unsupported_reason(Op.DENSE_LINEAR, torch.device("cpu"))
    assert "compute capability 9.x only" in reason and "rowwise" in reason
    w = b.prepare_linear(_fp8_linear(128, 256, "v4"))
    with pytest.raises(NotImplementedError, match="static per-tensor FP8 input_scale is not served"):
        b.dense_linear(torch.zeros(4, 256, dtype=torch.bfloat16), w, input_dec_scale_f32=torch.ones(1))


# ----------------------------------------------------------------------------- its own prepare


def test_e8m0_decode_of_every_byte_and_the_nan_byte_is_refused():
    b = torch.arange(255, dtype=torch.uint8)
    assert torch.equal(e8m0_bytes_to_f32(b, name="s").view(torch.int32), ue8m0_bytes_to_f32(b).view(torch.int32))
    with pytest.raises(ValueError, match=r"^layer.scale: 1 NaN E8M0 scale bytes \(0xFF\) of 2$"):
        e8m0_bytes_to_f32(torch.tensor([127, 255], dtype=torch.uint8), name="layer.scale")


def test_blockwise_weight_scale_operand_is_cublaslt_layout():
    """[round_up(G, 4), ceil(N/128)] with strides (1, round_up(G, 4)), K blocks padded with zeros."""
    lin = _fp8_linear(384, 640, "v3")
    w = TorchBackend("rowwise", DEVICE).prepare_linear(lin)
    dec = lin.scale_inv_f32
    sb = w.scale_b_blockwise
    assert tuple(sb.shape) == (8, 3) and sb.stride() == (1, 8)
    assert torch.equal(sb[:5], dec.t()) and not sb[5:].any()
    assert torch.equal(w.row_dec_f32, dec.t().repeat_interleave(128, dim=1)[:, :384])
    assert len(w.groups) == 5 and all(g.is_contiguous() and g.shape == (384, 128) for g in w.groups)


@pytest.mark.parametrize("r,c", [(1, 1), (130, 5), (256, 12), (7, 448)], ids=lambda v: str(v))
def test_nvfp4_weight_scale_swizzle_is_the_128x4_layout(r, c):
    sf = (CounterRng(r * c).u32((r, c)) % 255).to(torch.uint8)
    assert_bytes_equal(nvfp4_sf_to_swizzled_128x4(sf), sf_linear_to_swizzled_128x4(sf).reshape(-1),
                       label=f"torch NVFP4 weight scales 128x4 {r}x{c}")


@pytest.mark.parametrize("m,n,k", [(1, 256, 1024), (130, 384, 512)], ids=lambda v: str(v))
def test_nvfp4_dense_gemm_within_the_bound_on_blackwell(m, n, k):
    """torch's NVFP4 scaled_mm on the references' quantized activations (it has no quantizer of its own)."""
    b = _backend("blockwise", Op.PREPARE, Op.DENSE_GEMM)
    g = CounterRng(11)
    x = g.normal((m, k)).to(torch.bfloat16).to(DEVICE)
    wq = quantize_nvfp4_weight_checkpoint(g.normal((n, k)).to(torch.bfloat16).to(DEVICE), recipe=b.recipe)
    lin = Nvfp4Linear("probe.nvfp4", wq["weight"], wq["weight_scale"], wq["weight_scale_2"],
                      torch.ones((), device=DEVICE))
    q = quantize_nvfp4(x, recipe=b.recipe, **nvfp4_global_scale_for(x, recipe=b.recipe, input_scale_f32=None))
    a = QuantizedAct(q.packed_u8, sf_linear_to_swizzled_128x4(q.sf_u8), act_global_dec_f32(q, None).reshape(1))
    y = b.dense_gemm(a, b.prepare_linear(lin))
    alpha = a.global_dec_f32.reshape(()) * lin.weight_scale_2_f32.to(torch.float32).reshape(())
    y64, abs_dot = nvfp4_gemm_f64(q.packed_u8, q.sf_u8, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8), alpha)
    assert_within_gemm_bound(y, y64, gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=b.u_acc, out_dtype=y.dtype),
                             label="torch NVFP4 scaled_mm")


# ----------------------------------------------------------------------------- the layer through it


@pytest.fixture(scope="module")
def mini_v4():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


@pytest.mark.parametrize("spec", ["torch", ROWWISE, TENSORWISE])
@pytest.mark.parametrize("layer", [0, 3], ids=lambda i: f"layer{i}")
def test_layer_verdicts_through_torch_pass_what_it_serves(mini_v4, spec, layer):
    """Router (hash layer 0, biased top-k layer 3), dispatch, combine and the FP8 stages' bytes pass (bound and
    batch too where its FP8 GEMM runs here: the batch check's rows alone (M = 1) are "not served" with the
    measured sentence where the GEMM does not take one row); everything else is "not served" with the torch
    sentences."""
    b = get_backend(spec, DEVICE)
    lw = mini_v4.load_layer(layer, device=str(DEVICE))
    inputs = layer_inputs(mini_v4, lw, tokens=16, seed=2, device=str(DEVICE))
    run = run_layer(mini_v4, lw, inputs, options=RunOptions(act_scale="dynamic"), backend=b)
    assert not run.failed, [v.message for v in run.failed]
    status = {(v.stage, v.check): v for v in run.verdicts}
    for key in (("router", "ids"), ("router", "weights"), ("moe.dispatch", "exact"), ("moe.combine", "bound")):
        assert status[key].status == "pass", status[key]
    fp8_stages = [s for s, lin in (("attn.wq_a", lw.attention["wq_a"]), ("attn.wo_b", lw.attention["wo_b"]),
                                   ("shared.l2", lw.shared_experts.w2)) if lin.format == "fp8_block128"]
    assert fp8_stages or layer == 0, "mini-v4 layer 3 holds FP8 block-128 attention and shared-expert linears"
    fp8 = b.unsupported_reason(Op.DENSE_LINEAR, DEVICE)
    for stage in fp8_stages:
        assert status[(stage, "bytes")].status == "pass", status[(stage, "bytes")]
        v = status[(stage, "bound")]
        assert (v.status, v.message) == ("not served", fp8) if fp8 else v.status == "pass", v
        v, alone = status[(stage, "batch")], fp8 or b.fp8_gemm_m_reason(1, CC)
        assert (v.status, v.message) == ("not served", alone) if alone else v.status == "pass", v
    moe_l1 = status[("moe.l1", "bound")]  # the first op the bound needs that torch lacks: its MoE prepare or GEMM
    assert moe_l1.status == "not served" and ("torch ships no NVFP4 MoE op" in moe_l1.message
                                              or "has no prepare" in moe_l1.message), moe_l1


# ----------------------------------------------------------------------------- the accumulator probe

PATHS = {"M=1": (1, 128, 1024), "M=8": (8, 128, 1024)}


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise", "blockwise"])
def test_the_probe_measures_its_declared_fp8_accumulator(scaling):
    """Every path it takes is read and is its declaration; a path with an M it does not take is "not served"
    with its sentence (on an H100: blockwise and rowwise M = 1)."""
    b = _backend(scaling, Op.PREPARE, Op.DENSE_LINEAR)
    not_served: dict = {}
    readings = probe_fp8_accumulator(b, DEVICE, paths=PATHS, not_served=not_served)
    refused = {p: why for p, (m, _, _) in PATHS.items() if (why := b.fp8_gemm_m_reason(m, CC))}
    assert not_served == refused and [r.path for r in readings] == [p for p in PATHS if p not in refused]
    assert readings, "the M = 8 path is taken by every scaling"
    if DEVICE.type == "cpu":  # torch's CPU scaled_mm: float32, round to nearest
        assert {(r.effective_bits, r.rounding) for r in readings} == {(24, "nearest")}, readings
    check_declared_fp8_accumulator(b, readings)
    loose = _backend(scaling)
    loose.fp8_u_acc = 2.0**-8
    with pytest.raises(AccumulatorRefused, match=f"{b.name}: declares fp8_u_acc = 2\\^-8 .* looser"):
        check_declared_fp8_accumulator(loose, readings)


class _NoSingleRow(TorchBackend):
    """rowwise, refusing M = 1 with the blockwise variant's sentence (its GEMM runs on the CPU)."""

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        if x_bf16.shape[0] == 1:
            raise NotImplementedError(BLOCKWISE_M.format(m=1))
        return super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)


def test_the_probe_reports_a_path_it_leaves_out_and_reads_the_others(monkeypatch, capsys):
    import verify.accumulator as acc
    import verify.backends as backends

    b = _NoSingleRow("rowwise", DEVICE)
    if b.unsupported_reason(Op.DENSE_LINEAR, DEVICE):
        pytest.skip(b.unsupported_reason(Op.DENSE_LINEAR, DEVICE))
    not_served: dict = {}
    readings = probe_fp8_accumulator(b, DEVICE, paths=PATHS, not_served=not_served)
    assert [r.path for r in readings] == ["M=8"] and not_served == {"M=1": BLOCKWISE_M.format(m=1)}

    fp8_probe = acc.probe_fp8_accumulator
    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: b)
    monkeypatch.setattr(acc, "probe_fp8_accumulator",  # the CLI passes its paths: replaced by PATHS
                        lambda bb, d, paths=None, **kw: fp8_probe(bb, d, paths=PATHS, **kw))
    monkeypatch.setenv("COLUMNS", "250")
    rc = acc.cli_accumulator(argparse.Namespace(backend="torch", device=str(DEVICE)))
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 0, out
    if DEVICE.type == "cpu":
        assert "serves no NVFP4 dense_gemm on cpu" in out, out
    assert "not served" in out and "takes only M a multiple of 4, and this is M = 1" in out, out
    assert "is what every path measures" in out, out


def test_the_registry_makes_it_for_the_device_asked_for():
    cpu = get_backend("torch", "cpu")
    assert cpu.device.type == "cpu" and cpu.fp8_u_acc == 2.0**-24 and cpu.name == "torch"
    assert get_backend(ROWWISE, "cpu").name == "torch-rowwise"
    if torch.cuda.is_available():
        gpu = get_backend("torch", "cuda")
        assert gpu.fp8_u_acc == 2.0**-13 and gpu.fp8_promotion_interval == 128
        assert "made for cuda" in gpu.unsupported_reason(Op.ROUTER, torch.device("cpu"))


def test_the_listing_shows_its_numerics_mode_and_accumulator():
    from verify.backends.cli import describe_backend

    row = describe_backend(ROWWISE, torch.device("cpu"))
    assert row["name"] == "torch-rowwise" and row["modes"]["dense_linear"]["fp8_block"] == "fp8_block"
    assert "CPU scaled_mm" in row["accumulator"]
    assert {op for op, why in row["ops"].items() if why is None} == {"quantize_fp8", "dense_linear", "router",
                                                                     "dispatch", "combine"}


def test_selftest_through_torch_catches_what_it_serves_and_skips_nvfp4_bugs(mini_v4):
    """On an FP8-only backend the NVFP4 bug classes are not applicable (they cannot reach an FP8 stage), the FP8
    ones and a one-row GEMM error are caught by the FP8 linears' verdicts."""
    from verify.selftest import INJECTORS, selftest

    b = _backend("rowwise", Op.DENSE_LINEAR)
    want = {"swapped-nibbles": "not applicable", "global-scale-inverted": "not applicable",
            "one-output-row-3-percent-off": "caught", "fp8-ue8m0-scale-rounded-down": "caught",
            "e8m0-scale-read-as-a-number": "caught", "routing-weight-at-the-wrong-place": "caught"}
    rows = selftest(mini_v4, b, [3], tokens=8, device=str(DEVICE),
                    injectors=tuple(i for i in INJECTORS if i.bug in want))
    assert {r.bug: r.status for r in rows} == want, [(r.bug, r.status, r.message) for r in rows]
