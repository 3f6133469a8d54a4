"""The sm100 adapter (verify/backends/sm100.py): protocol plumbing on the CPU, numerics on a B200.

CPU (no marker): every protocol op is served by a named kernels/sm100 method or refused with a
sentence; unsupported_reason says why nothing runs here; the prepare methods run on the committed
fixture (golden/mini-v4, layer 0) and produce the layouts the kernels read (compared here with
references.layouts, which the adapter itself never uses); the grouped boundary conversions
round-trip; the torch-only routing ops match the emulator; and, with the two CuTe DSL launches
replaced by CPU stand-ins built from references/ that honour the kernels' documented contracts,
the adapter's grouped quantization, grouped GEMM and fused L1 give the emulator's bytes (what is
tested there is the adapter's padding, per-expert tile selection and alpha folding, not a kernel).

B200 (markers gpu + sm100): every served op on the fixture layer, bytes of quantize and
grouped_quantize equal to the emulator's; the GEMM verdicts are the harness's (verify.verdicts.judge_layer).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.sm100 import api as sm100_backend
from kernels.sm100 import gemm_nvfp4_blockscaled as gemm
from kernels.sm100 import host_bridge as hb
from kernels.sm100 import quantize_nvfp4_1x16 as quant
from references import layouts as ref_layouts
from references import moe as ref_moe
from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4, te_global_enc_scale
from references.recipes import TE
from references.stages import Op
from verify.assertions import assert_all_zero, assert_bits_equal, assert_bytes_equal, describe_e4m3
from verify.backends import EmulatorBackend, QuantizedAct, get_backend
from verify.backends.sm100 import NOT_SERVED, SERVED, Sm100Adapter, padded_to_rows, rows_to_padded
from verify.checkpoint import Bf16Linear, Checkpoint, Nvfp4Linear, Router
from verify.config import GOLDEN_DIR
from verify.reference_layer import moe_spec_from

OPS = list(Op)


@pytest.fixture(scope="module")
def fixture_layer():
    ck = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    return ck, ck.load_layer(0)


@pytest.fixture(scope="module")
def adapter():
    return Sm100Adapter()


def _sf_bytes(lin: Nvfp4Linear) -> torch.Tensor:
    return lin.weight_scale_e4m3.view(torch.uint8)


# ============================================================================= ops and reasons


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.value)
def test_every_op_is_served_by_a_named_method_or_refused_with_a_reason(op):
    assert (op in SERVED) != (op in NOT_SERVED), f"{op}: must be in exactly one of SERVED / NOT_SERVED"
    if op in SERVED:
        name = SERVED[op]
        assert name in sm100_backend.OPS, f"{op.value} -> {name!r}: not an op of kernels.sm100.api"
        assert callable(getattr(sm100_backend.Sm100Kernels, name, None)), f"Sm100Kernels has no method {name}"
    else:
        assert NOT_SERVED[op].startswith("sm100: ") and len(NOT_SERVED[op]) > 30


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.value)
def test_unsupported_reason_on_the_cpu_says_why(adapter, op):
    reason = adapter.unsupported_reason(op, torch.device("cpu"))
    if op is Op.PREPARE:
        assert reason is None, "host preparation is torch only and runs on any device"
    elif op in NOT_SERVED:
        assert reason == NOT_SERVED[op]
    elif SERVED[op] in sm100_backend.TORCH_OPS and torch.cuda.is_available():
        assert reason is None, "moe_routing's torch ops run wherever CUDA is"
    else:  # no cutlass, no CUDA device, or (on a GPU, asked for the CPU) needs a CUDA device
        assert reason in ("sm100: no CUDA device", "sm100: nvidia-cutlass-dsl is not installed",
                          "sm100: needs a CUDA device, got cpu"), reason


def test_unsupported_reason_names_a_missing_cutlass(adapter, monkeypatch):
    monkeypatch.setattr(sm100_backend.importlib.util, "find_spec", lambda name: None)
    reason = adapter.unsupported_reason(Op.DENSE_GEMM, torch.device("cpu"))
    assert reason == "sm100: nvidia-cutlass-dsl is not installed"


def test_kernels_backend_takes_only_its_own_op_names():
    b = sm100_backend.Sm100Kernels()
    assert not hasattr(sm100_backend, "OP_ALIASES"), "kernels/ must not spell the harness's op names"
    for harness_name in ("quantize", "dense_gemm", "grouped_gemm", "swiglu_requant", "grouped_quantize"):
        assert "not provided" in b.unsupported_reason(harness_name)
    assert b.unsupported_reason("prepare_gate_up_weight") is None


def test_get_backend_returns_the_adapter():
    b = get_backend("sm100")
    assert isinstance(b, Sm100Adapter) and b.name == "sm100" and b.recipe.name == "te" and b.u_acc == 2.0**-24
    assert not hasattr(Sm100Adapter, "__getattr__")


# ============================================================================= prepare on the fixture


def test_prepare_linear_gives_the_kernels_layouts(adapter, fixture_layer):
    _, layer = fixture_layer
    for role, lin in layer.attention.items():
        w = adapter.prepare_linear(lin)
        assert_bytes_equal(w.packed_u8, lin.weight_u8.unsqueeze(0), label=f"{lin.module} packed (K-major, as stored)")
        assert_bytes_equal(w.sf_swizzled_u8, ref_layouts.sf_linear_to_swizzled_128x4(_sf_bytes(lin)).unsqueeze(0),
                           label=f"{lin.module} scales 128x4", describe=describe_e4m3)
        assert_bits_equal(w.dec_scale_f32, lin.weight_scale_2_f32.reshape(1), label=f"{lin.module} weight_scale_2")
        assert w.packed_u8.is_contiguous() and w.sf_swizzled_u8.is_contiguous()


def test_prepare_linear_refuses_bf16_naming_module_and_format(adapter):
    # FP8 block-128 linears are served (test_sm100_fp8_adapter)
    bf16 = Bf16Linear("layers.0.ffn.shared.w1", torch.zeros(128, 64, dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match=r"sm100: layers.0.ffn.shared.w1 is bf16"):
        adapter.prepare_linear(bf16)


def test_prepare_experts_gives_the_kernels_layouts(adapter, fixture_layer):
    _, layer = fixture_layer
    ex = layer.experts
    p = adapter.prepare_experts(ex)
    e = ex.w1.weight_u8.shape[0]
    assert p.num_experts == e == 16
    for name in ("w1", "w3", "w2"):
        lin, w = getattr(ex, name), getattr(p, name)
        assert_bytes_equal(w.packed_u8, lin.weight_u8, label=f"experts.{name} packed")
        assert_bytes_equal(w.sf_swizzled_u8, ref_layouts.sf_linear_to_swizzled_128x4(_sf_bytes(lin)),
                           label=f"experts.{name} scales (per expert 128x4)", describe=describe_e4m3)
        assert_bits_equal(w.dec_scale_f32, lin.weight_scale_2_f32, label=f"experts.{name} weight_scale_2")
    gran = p.w13.interleave_granularity
    assert gran == 128
    for x in range(e):
        packed = ref_layouts.interleave_gate_up(ex.w1.weight_u8[x], ex.w3.weight_u8[x], granularity=gran)
        sf = ref_layouts.interleave_gate_up(_sf_bytes(ex.w1)[x], _sf_bytes(ex.w3)[x], granularity=gran)
        assert_bytes_equal(p.w13.packed_u8[x], packed, label=f"w13 packed, expert {x}")
        assert_bytes_equal(p.w13.sf_swizzled_u8[x], ref_layouts.sf_linear_to_swizzled_128x4(sf),
                           label=f"w13 scales, expert {x}", describe=describe_e4m3)
    assert_bits_equal(p.w13.dec_scale_f32, ex.w1.weight_scale_2_f32, label="w13 gate decode scales (w1's)")
    assert_bits_equal(p.w13.up_dec_scale_f32, ex.w3.weight_scale_2_f32, label="w13 up decode scales (w3's)")
    assert_bits_equal(p.l1_input_dec_scale_f32, torch.maximum(ex.w1.input_scale_f32, ex.w3.input_scale_f32),
                      label="l1 static scales = max(w1, w3) per expert")
    assert_bits_equal(p.l2_input_dec_scale_f32, ex.w2.input_scale_f32, label="l2 static scales")
    # the fixture's experts have different input scales: moe_experts (one scale) cannot take them
    assert p.l1_shared_dec_f32 is None and "differs across the 16 experts" in p.static_reason


def test_prepare_experts_shares_a_uniform_static_scale(adapter, fixture_layer):
    _, layer = fixture_layer
    ex = layer.experts
    same = {n: dataclasses.replace(getattr(ex, n), input_scale_f32=torch.full((16,), 2.0**-6))
            for n in ("w1", "w3", "w2")}
    p = adapter.prepare_experts(dataclasses.replace(ex, **same))
    assert p.static_reason is None and p.l1_shared_dec_f32.shape == (1,) and float(p.l2_shared_dec_f32) == 2.0**-6


def test_prepare_router_keeps_what_moe_routing_takes(adapter, fixture_layer):
    ck, layer = fixture_layer
    spec = moe_spec_from(ck.config)
    r = adapter.prepare_router(layer.router, spec)
    assert r.top_k == 6 and r.routed_scaling_factor == 2.5 and r.tid2eid_i64 is layer.router.tid2eid_i64
    assert r.gate_weight_bf16.dtype == torch.bfloat16 and r.gate_weight_bf16.shape == (16, 256)


@pytest.mark.parametrize("change,match", [
    (dict(scoring="sigmoid"), r"router scoring 'sigmoid' is not in kernels.sm100.moe_routing"),
    (dict(scoring="softmax"), r"router scoring 'softmax'"),
    (dict(n_group=4, topk_group=2), r"group-limited top-k \(n_group=4, topk_group=2\)"),
    (dict(renormalize=False), r"renormalize=False is not in kernels.sm100.moe_routing"),
], ids=["sigmoid", "softmax", "group_limited", "no_renormalize"])
def test_prepare_router_refuses_what_moe_routing_lacks(adapter, fixture_layer, change, match):
    ck, layer = fixture_layer
    spec = dataclasses.replace(moe_spec_from(ck.config), **change)
    with pytest.raises(NotImplementedError, match=match):
        adapter.prepare_router(layer.router, spec)


# ============================================================================= boundary conversions (pure torch)


GROUPED_COUNTS = {"ragged": [5, 130, 0, 1, 256, 77], "zero_first_last": [0, 3, 200, 0], "one_expert": [300],
                  "all_empty_but_one": [0, 0, 1, 0]}


def _offsets_i32(counts):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("counts", list(GROUPED_COUNTS.values()), ids=list(GROUPED_COUNTS))
def test_grouped_rows_round_trip_through_the_padded_layout(counts):
    off = _offsets_i32(counts)
    r, e = int(off[-1]), len(counts)
    cap = hb.grouped_capacity_rows(r, e)
    rows = torch.randint(0, 256, (r, 24), generator=torch.Generator().manual_seed(r), dtype=torch.uint8)
    padded = rows_to_padded(rows, off, cap)
    assert padded.shape == (cap, 24)
    assert_bytes_equal(padded_to_rows(padded, off, r), rows, label="rows -> padded -> rows")
    assert_bytes_equal(rows_to_padded(padded_to_rows(padded, off, r), off, cap), padded,
                       label="padded -> rows -> padded (padding rows zero)")
    p_off = ref_layouts.grouped_padded_offsets(off.to(torch.int64))
    for x in range(e):  # expert x starts at its padded offset; its padding rows are zero
        lo, n = int(p_off[x]), counts[x]
        assert_bytes_equal(padded[lo:lo + n], rows[int(off[x]):int(off[x + 1])], label=f"expert {x} rows")
        assert_all_zero(padded[lo + n:int(p_off[x + 1])], label=f"expert {x} padding rows")
    assert_all_zero(padded[int(p_off[-1]):], label="rows past the padded total")


@pytest.mark.parametrize("counts", list(GROUPED_COUNTS.values()), ids=list(GROUPED_COUNTS))
def test_swizzled_scales_of_the_padded_rows_are_the_boundary_layout(counts):
    """sm100 quantizes padded-per-expert rows and swizzles them: its scale buffer's first (padded
    total) rows are references.layouts' grouped 128x4 bytes, the rest whole zero tiles."""
    off = _offsets_i32(counts)
    r, e = int(off[-1]), len(counts)
    cap = hb.grouped_capacity_rows(r, e)
    sf = torch.randint(0, 0x7F, (r, 7), generator=torch.Generator().manual_seed(e), dtype=torch.uint8)
    got = hb.sf_linear_to_swizzled_128x4(rows_to_padded(sf, off, cap))
    want, p_off = ref_layouts.sf_grouped_linear_to_swizzled_128x4(sf, off.to(torch.int64))
    p = int(p_off[-1])
    assert_bytes_equal(got[:p], want, label="grouped 128x4 scales", describe=describe_e4m3)
    assert_all_zero(got[p:], label="scale rows past the padded total must be zero")


# ============================================================================= stand-in kernels (CPU)


class _StandInKernels:
    """quant.launch, gemm.launch_dense and gemm.launch_grouped on the CPU, built from references/, honouring
    the kernels' documented contracts (padding and rows past the valid count zero, tiles marked -1 zero, alpha =
    a_dec[0] * b_dec[e] in float32, h rounded to bf16 before its quantization)."""

    def __init__(self):
        self.launches = []

    @staticmethod
    def _valid(m, n_i32):
        return torch.ones(m, dtype=torch.bool) if n_i32 is None else torch.arange(m) < n_i32.reshape(())

    @staticmethod
    def _quantize(x_bf16, s_f32, keep_rows):
        m, k = x_bf16.shape
        q = quantize_nvfp4(x_bf16, recipe=TE, global_enc_scale_f32=s_f32.reshape(()))
        packed = torch.where(keep_rows[:, None], q.packed_u8, torch.zeros_like(q.packed_u8))
        sf = torch.where(keep_rows[:, None], q.sf_u8, torch.zeros_like(q.sf_u8))
        out = torch.zeros(hb.round_up(max(m, 1), 128), hb.round_up(k // 16, 4), dtype=torch.uint8)
        if m:
            out[:hb.round_up(m, 128)] = ref_layouts.sf_linear_to_swizzled_128x4(sf)
        return packed, out

    def quant_launch(self, x_bf16, *, global_enc_scale_f32=None, input_dec_scale_f32=None, recipe="te", key=None,
                     num_valid_rows_i32=None):
        self.launches.append("quant")
        s = global_enc_scale_f32
        if s is None:
            s = (torch.reciprocal(input_dec_scale_f32.reshape(1)) if input_dec_scale_f32 is not None else
                 quant.te_global_enc_scale_device(quant.amax_of_valid_rows(x_bf16, num_valid_rows_i32)))
        packed, sf = self._quantize(x_bf16, s, self._valid(x_bf16.shape[0], num_valid_rows_i32))
        return packed, sf, s.reshape(1)

    def launch_dense(self, a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, *, key=None,
                     num_valid_rows_i32=None):
        """bf16 [M, N] = (a_dec[0] * b_dec[0], a float32 product) * A @ B^T; rows past the valid count zero."""
        self.launches.append("dense")
        m, k, n = a_packed_u8.shape[0], 2 * a_packed_u8.shape[1], weight.n
        assert tuple(a_sf_swizzled_u8.shape) == (hb.round_up(max(m, 1), 128), hb.round_up(k // 16, 4))
        assert a_dec_scale_f32.numel() == 1 and weight.num_batches == 1
        x = decode_nvfp4_block_scaled(a_packed_u8, ref_layouts.sf_swizzled_128x4_to_linear(
            a_sf_swizzled_u8, rows=m, cols=k // 16), dtype=torch.float64)
        w = decode_nvfp4_block_scaled(weight.packed_u8[0], ref_layouts.sf_swizzled_128x4_to_linear(
            weight.sf_swizzled_u8[0], rows=n, cols=k // 16), dtype=torch.float64)
        alpha = (a_dec_scale_f32.reshape(()) * weight.dec_scale_f32[0]).double()
        out = ((x @ w.T) * alpha).float().to(torch.bfloat16)
        return torch.where(self._valid(m, num_valid_rows_i32)[:, None], out, torch.zeros_like(out))

    def launch_grouped(self, a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, tile_expert_i32, *,
                       swiglu_limit=None, key=None, num_valid_rows_i32=None, h_global_enc_scale_f32=None):
        self.launches.append("grouped" if swiglu_limit is None else "swiglu")
        m, k, n = a_packed_u8.shape[0], 2 * a_packed_u8.shape[1], weight.n
        assert m % 128 == 0 and tile_expert_i32.dtype == torch.int32 and tile_expert_i32.numel() == m // 128
        assert tuple(a_sf_swizzled_u8.shape) == (m, hb.round_up(k // 16, 4)) and a_dec_scale_f32.numel() == 1
        x = decode_nvfp4_block_scaled(a_packed_u8, ref_layouts.sf_swizzled_128x4_to_linear(
            a_sf_swizzled_u8, rows=m, cols=k // 16), dtype=torch.float64)
        w_sf = ref_layouts.sf_swizzled_128x4_to_linear(weight.sf_swizzled_u8, rows=n, cols=k // 16)
        w = decode_nvfp4_block_scaled(weight.packed_u8, w_sf, dtype=torch.float64)
        a_dec = a_dec_scale_f32.reshape(())
        out = torch.zeros(m, n // 2 if swiglu_limit is not None else n, dtype=torch.bfloat16)
        for tile, ex in enumerate(tile_expert_i32.tolist()):
            if ex < 0:
                continue
            rows = slice(tile * 128, (tile + 1) * 128)
            y = x[rows] @ w[ex].T
            alpha = (a_dec * weight.dec_scale_f32[ex]).double()  # float32 product, as the epilogue forms it
            if swiglu_limit is None:
                out[rows] = (y * alpha).float().to(torch.bfloat16)
                continue
            g64, u64 = ref_layouts.deinterleave_gate_up(y.T, granularity=weight.interleave_granularity)
            gate = (g64.T * alpha).float()
            up = (u64.T * (a_dec * weight.up_dec_scale_f32[ex]).double()).float()
            out[rows] = ref_moe.swiglu(gate, up, limit=swiglu_limit, row_weight_f32=None, mode="emulated")
        valid = self._valid(m, num_valid_rows_i32)
        out = torch.where(valid[:, None], out, torch.zeros_like(out))
        if h_global_enc_scale_f32 is None:
            return out
        keep = valid & (tile_expert_i32 >= 0).repeat_interleave(128)
        return self._quantize(out, h_global_enc_scale_f32, keep)


@pytest.fixture
def stand_in(monkeypatch):
    k = _StandInKernels()
    monkeypatch.setattr(quant, "launch", k.quant_launch)
    monkeypatch.setattr(gemm, "launch_grouped", k.launch_grouped)
    monkeypatch.setattr(gemm, "launch_dense", k.launch_dense)
    return k


@pytest.fixture(scope="module")
def moe_case(fixture_layer):
    """Layer 0's experts, 40 tokens routed to experts 0..11 (12..15 get no rows), emulator dispatch."""
    ck, layer = fixture_layer
    g = torch.Generator().manual_seed(5)
    t, k = 40, 6
    x = (torch.randn(t, 256, generator=g) * torch.exp(torch.randn(t, 1, generator=g))).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(12, generator=g)[:k] for _ in range(t)])
    d = EmulatorBackend().dispatch(ids, 16)
    ex = layer.experts
    s1 = torch.maximum(ex.w1.input_scale_f32, ex.w3.input_scale_f32).to(torch.float32)
    return dict(layer=layer, x=x, ids=ids, d=d, rows=x[d.row_token_i64], s1=s1,
                s2=ex.w2.input_scale_f32.to(torch.float32), spec=moe_spec_from(ck.config))


def _grouped_padded_total(off_i32):
    return int(ref_layouts.grouped_padded_offsets(off_i32.to(torch.int64))[-1])


def _assert_same_quantized(got: QuantizedAct, want: QuantizedAct, label: str, *, grouped_offsets=None):
    """Bytes equal; for grouped acts the adapter's capacity-sized scale buffer is the emulator's plus zero tiles."""
    __tracebackhide__ = True
    assert_bytes_equal(got.packed_u8, want.packed_u8, label=f"{label} codes")
    sf = got.sf_swizzled_u8
    if grouped_offsets is not None:
        p = _grouped_padded_total(grouped_offsets)
        assert sf.shape[0] >= p, f"{label}: {sf.shape[0]} scale rows, fewer than the padded total {p}"
        assert_all_zero(sf[p:], label=f"{label}: scale rows past the padded total")
        sf = sf[:p]
    assert_bytes_equal(sf, want.sf_swizzled_u8, label=f"{label} swizzled scales", describe=describe_e4m3)
    assert_bits_equal(got.global_dec_f32, want.global_dec_f32, label=f"{label} global decode scale")


@pytest.mark.parametrize("act_scale", ["dynamic", "static"])
def test_quantize_with_stand_in_kernels_gives_the_emulators_bytes(adapter, stand_in, moe_case, act_scale):
    x = moe_case["x"]
    d = torch.tensor([0.004], dtype=torch.float32) if act_scale == "static" else None
    _assert_same_quantized(adapter.quantize(x, input_dec_scale_f32=d),
                           EmulatorBackend().quantize(x, input_dec_scale_f32=d), f"quantize ({act_scale})")


@pytest.mark.parametrize("act_scale", ["dynamic", "static"])
def test_grouped_quantize_with_stand_in_kernels_gives_the_emulators_bytes(adapter, stand_in, moe_case, act_scale):
    d, rows = moe_case["d"], moe_case["rows"]
    s1 = moe_case["s1"] if act_scale == "static" else None
    got = adapter.grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=s1)
    want = EmulatorBackend().grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=s1)
    _assert_same_quantized(got, want, f"grouped_quantize ({act_scale})", grouped_offsets=d.offsets_i32)
    assert got.sf_swizzled_u8.shape[0] == hb.grouped_capacity_rows(rows.shape[0], 16)
    assert stand_in.launches == ["quant"] * (16 if act_scale == "static" else 1), "static: one launch per expert"


@pytest.mark.parametrize("act_scale", ["dynamic", "static"])
def test_grouped_gemm_with_stand_in_kernels_folds_alpha_and_unpads_rows(adapter, stand_in, moe_case, act_scale):
    layer, d, rows = moe_case["layer"], moe_case["d"], moe_case["rows"]
    emu = EmulatorBackend()
    s1 = moe_case["s1"] if act_scale == "static" else None
    a = emu.grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=s1)  # the reference's boundary act
    ex_emu, ex = emu.prepare_experts(layer.experts), adapter.prepare_experts(layer.experts)
    gate, up = adapter.grouped_gemm(a, d.offsets_i32, ex, layer="l1")
    want_gate, want_up = emu.grouped_gemm(a, d.offsets_i32, ex_emu, layer="l1")
    assert_bits_equal(gate, want_gate.to(torch.bfloat16), label="l1 gate (bf16 of the float32 result)")
    assert_bits_equal(up, want_up.to(torch.bfloat16), label="l1 up")
    h = ref_moe.swiglu(want_gate, want_up, limit=10.0, row_weight_f32=None, mode="emulated")
    a2 = emu.grouped_quantize(h, d.offsets_i32, input_dec_scale_f32=moe_case["s2"] if s1 is not None else None)
    assert_bits_equal(adapter.grouped_gemm(a2, d.offsets_i32, ex, layer="l2"),
                      emu.grouped_gemm(a2, d.offsets_i32, ex_emu, layer="l2"), label="l2 y")


def test_l1_fused_with_stand_in_kernels_gives_the_emulators_bytes(adapter, stand_in, moe_case):
    layer, d, rows = moe_case["layer"], moe_case["d"], moe_case["rows"]
    emu = EmulatorBackend()
    a = emu.grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=moe_case["s1"])
    got = adapter.l1_fused(a, d.offsets_i32, adapter.prepare_experts(layer.experts), swiglu_limit=10.0,
                           input_dec_scale_f32=moe_case["s2"])
    want = emu.l1_fused(a, d.offsets_i32, emu.prepare_experts(layer.experts), swiglu_limit=10.0,
                        input_dec_scale_f32=moe_case["s2"])
    _assert_same_quantized(got, want, "l1_fused h")
    assert stand_in.launches == ["swiglu"] * 16, "one fused launch per expert (its own S), other tiles skipped"


def test_moe_block_with_stand_in_kernels_is_sm100s_moe_experts(adapter, stand_in, moe_case, fixture_layer):
    ck, layer = fixture_layer
    spec, x = moe_case["spec"], moe_case["x"]
    emu = EmulatorBackend()
    tokens = torch.arange(x.shape[0]) * 5 % 256
    kw = dict(swiglu_limit=spec.swiglu_limit, weight_placement="after_w2", act_scale="dynamic", token_ids_i64=tokens)
    got = adapter.moe_block(x, adapter.prepare_router(layer.router, spec), adapter.prepare_experts(layer.experts), **kw)
    want = emu.moe_block(x, emu.prepare_router(layer.router, spec), emu.prepare_experts(layer.experts), **kw)
    assert stand_in.launches == ["quant", "swiglu", "quant", "grouped"]
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # hash routing: the same experts; weights and combine in float32 instead of exactly: a few bf16 ulps
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-6 * float(want.abs().max()))


# ============================================================================= torch-only ops on the CPU


def test_dispatch_equals_the_emulators(adapter, moe_case):
    got, want = adapter.dispatch(moe_case["ids"], 16), moe_case["d"]
    assert_bits_equal(got.offsets_i32, want.offsets_i32, label='adapter dispatch vs emulator: offsets_i32')
    assert got.offsets_i32.dtype == torch.int32
    assert_bits_equal(got.row_token_i64, want.row_token_i64, label='adapter dispatch vs emulator: row_token_i64')
    assert_bits_equal(got.row_slot_i64, want.row_slot_i64, label='adapter dispatch vs emulator: row_slot_i64')


@pytest.mark.parametrize("hashed", [True, False], ids=["hash", "topk_bias"])
def test_router_matches_the_emulator(adapter, fixture_layer, moe_case, hashed):
    _, layer = fixture_layer
    router = layer.router if hashed else Router(layer.router.gate_weight_bf16, torch.linspace(-0.1, 0.1, 16), None)
    spec, x, tokens = moe_case["spec"], moe_case["x"], torch.arange(40) * 7 % 256
    got = adapter.router(x, adapter.prepare_router(router, spec), token_ids_i64=tokens)
    emu = EmulatorBackend()
    want = emu.router(x, emu.prepare_router(router, spec), token_ids_i64=tokens)
    assert_bits_equal(got.ids_i64, want.ids_i64, label="expert ids (no near-ties in this data)")
    torch.testing.assert_close(got.weights_f32, want.weights_f32, rtol=2**-20, atol=0)  # fp32 formula vs exact


def test_combine_matches_the_emulator(adapter, moe_case):
    d, t = moe_case["d"], 40
    g = torch.Generator().manual_seed(9)
    y = torch.randn(t * 6, 256, generator=g).to(torch.bfloat16)
    w = torch.rand(t, 6, generator=g)
    got = adapter.combine(y, d, w)
    want = EmulatorBackend().combine(y, d, w)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


# ============================================================================= refusals


def test_refusals_raise_the_sentence(adapter, moe_case, fixture_layer):
    _, layer = fixture_layer
    d, rows = moe_case["d"], moe_case["rows"]
    ex = adapter.prepare_experts(layer.experts)
    router = adapter.prepare_router(layer.router, moe_case["spec"])
    with pytest.raises(NotImplementedError) as err:
        adapter.swiglu_requant(rows, rows, d.offsets_i32, swiglu_limit=10.0)
    assert str(err.value) == NOT_SERVED[Op.SWIGLU_REQUANT]
    a = QuantizedAct(torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8), torch.ones(1))
    with pytest.raises(NotImplementedError, match="l1_fused needs a static h scale"):
        adapter.l1_fused(a, d.offsets_i32, ex, swiglu_limit=10.0)
    kw = dict(swiglu_limit=10.0, token_ids_i64=torch.arange(40))
    with pytest.raises(NotImplementedError, match="weight_placement='before_w2' is not in kernels/sm100"):
        adapter.moe_block(moe_case["x"], router, ex, weight_placement="before_w2", act_scale="dynamic", **kw)
    with pytest.raises(NotImplementedError, match="needs one input_scale for all experts"):
        adapter.moe_block(moe_case["x"], router, ex, weight_placement="after_w2", act_scale="static", **kw)
    with pytest.raises(NotImplementedError, match="combine with weights_f32=None"):
        adapter.combine(rows, d, None)
    with pytest.raises(ValueError, match="act_scale='amax'"):
        adapter.moe_block(moe_case["x"], router, ex, weight_placement="after_w2", act_scale="amax", **kw)


def test_argument_errors_name_the_argument(adapter, moe_case):
    d, rows = moe_case["d"], moe_case["rows"]
    with pytest.raises(ValueError, match=r"offsets_i32: expected int32 \[E\+1\]"):
        adapter.grouped_quantize(rows, d.offsets_i32.to(torch.int64))
    with pytest.raises(ValueError, match=r"input_dec_scale_f32: expected float32 \[16\]"):
        adapter.grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=torch.ones(1))
    with pytest.raises(ValueError, match=r"ids_i64: expected int64 \[T, k\]"):
        adapter.dispatch(moe_case["ids"].to(torch.int32), 16)
    with pytest.raises(ValueError, match="layer='l3'"):
        adapter.grouped_gemm(QuantizedAct(rows, rows, rows), d.offsets_i32, None, layer="l3")


# ============================================================================= the dynamic global scale


def test_dynamic_global_enc_scale_equals_te_for_every_bf16_amax():
    """quant.launch's dynamic S (on the device, from a bf16 amax) is the reference's, bit for bit, for all
    positive finite bf16 amax values. `2688.0 / t` (reciprocal, then multiply) was one ulp off at amax 26."""
    amax = torch.arange(0x0001, 0x7F80, dtype=torch.int16).view(torch.bfloat16)
    got = torch.cat([quant.te_global_enc_scale_device(v) for v in amax])
    assert_bits_equal(got, te_global_enc_scale(amax.float()), label="S = 2688/amax (sm100 vs references)")


# ============================================================================= no host sync (any CUDA GPU)


class _ZeroKernels:
    """Sync-free stand-ins of the three launches: outputs of the documented shapes, zero bytes."""

    @staticmethod
    def quant_launch(x_bf16, *, global_enc_scale_f32=None, input_dec_scale_f32=None, recipe="te", key=None,
                     num_valid_rows_i32=None):
        m, k = x_bf16.shape
        s = global_enc_scale_f32
        if s is None:
            s = (torch.reciprocal(input_dec_scale_f32.reshape(1)) if input_dec_scale_f32 is not None else
                 quant.te_global_enc_scale_device(quant.amax_of_valid_rows(x_bf16, num_valid_rows_i32)))
        sf = x_bf16.new_zeros(hb.round_up(max(m, 1), 128), hb.round_up(k // 16, 4), dtype=torch.uint8)
        return x_bf16.new_zeros(m, k // 2, dtype=torch.uint8), sf, s.reshape(1)

    @staticmethod
    def launch_grouped(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, tile_expert_i32, *,
                       swiglu_limit=None, key=None, num_valid_rows_i32=None, h_global_enc_scale_f32=None):
        m, n = a_packed_u8.shape[0], weight.n // (2 if swiglu_limit is not None else 1)
        if h_global_enc_scale_f32 is None:
            return a_packed_u8.new_zeros(m, n, dtype=torch.bfloat16)
        return a_packed_u8.new_zeros(m, n // 2), a_packed_u8.new_zeros(m, hb.round_up(n // 16, 4))

    @staticmethod
    def launch_dense(a_packed_u8, a_sf_swizzled_u8, a_dec_scale_f32, weight, *, key=None, num_valid_rows_i32=None):
        return a_packed_u8.new_zeros(a_packed_u8.shape[0], weight.n, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_forward_ops_do_not_sync_the_host(monkeypatch, fixture_layer, moe_case):
    """The adapter's torch glue (padding, tile selection, alpha folding, dispatch/combine, routing) reads
    no device value on the host: every forward op under torch.cuda.set_sync_debug_mode('error')."""
    monkeypatch.setattr(quant, "launch", _ZeroKernels.quant_launch)
    monkeypatch.setattr(gemm, "launch_grouped", _ZeroKernels.launch_grouped)
    monkeypatch.setattr(gemm, "launch_dense", _ZeroKernels.launch_dense)
    ck, layer = fixture_layer
    dev = torch.device("cuda")
    b = Sm100Adapter()
    ex = b.prepare_experts(dataclasses.replace(layer.experts, **{n: _linear_on(getattr(layer.experts, n), dev)
                                                                 for n in ("w1", "w3", "w2")}))
    spec = moe_spec_from(ck.config)
    hashed = dataclasses.replace(layer.router, gate_weight_bf16=layer.router.gate_weight_bf16.to(dev),
                                 tid2eid_i64=layer.router.tid2eid_i64.to(dev))
    routers = [b.prepare_router(hashed, spec), b.prepare_router(
        Router(hashed.gate_weight_bf16, torch.linspace(-0.1, 0.1, 16, device=dev), None), spec)]
    w = b.prepare_linear(_linear_on(layer.attention["wq_a"], dev))
    x, ids, tokens = moe_case["x"].to(dev), moe_case["ids"].to(dev), torch.arange(40, device=dev)
    s1, s2 = moe_case["s1"].to(dev), moe_case["s2"].to(dev)
    d1 = torch.full((1,), 0.004, device=dev)

    def forward():
        for s in (None, d1):
            b.dense_gemm(b.quantize(x, input_dec_scale_f32=s), w)
            b.dense_linear(x, w, input_dec_scale_f32=s)
        d = b.dispatch(ids, 16)
        rows = x[d.row_token_i64]
        for s in (None, s1):
            a = b.grouped_quantize(rows, d.offsets_i32, input_dec_scale_f32=s)
            gate, up = b.grouped_gemm(a, d.offsets_i32, ex, layer="l1")
            a2 = b.grouped_quantize(gate * up, d.offsets_i32, input_dec_scale_f32=None if s is None else s2)
            b.grouped_gemm(a2, d.offsets_i32, ex, layer="l2")
            b.l1_fused(a, d.offsets_i32, ex, swiglu_limit=10.0, input_dec_scale_f32=s2)
        for r in routers:
            out = b.router(x, r, token_ids_i64=tokens)
            b.combine(rows, d, out.weights_f32)
            b.moe_block(x, r, ex, swiglu_limit=10.0, weight_placement="after_w2", act_scale="dynamic",
                        token_ids_i64=tokens)

    forward()  # warm-up: allocator, lazy inits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ============================================================================= B200


def _linear_on(lin, dev):
    tensors = {f.name: getattr(lin, f.name).to(dev) for f in dataclasses.fields(lin)
               if f.init and isinstance(getattr(lin, f.name), torch.Tensor)}
    return dataclasses.replace(lin, **tensors)


@pytest.mark.gpu
@pytest.mark.sm100
@pytest.mark.parametrize("act_scale", ["dynamic", "static"])
def test_served_ops_on_the_fixture_layer_against_the_emulator(fixture_layer, act_scale):
    """Every served op runs on the fixture layer; quantized bytes equal the emulator's (the GEMM, router and
    combine verdicts are the harness's, verify/verdicts/)."""
    ck, layer = fixture_layer
    dev = torch.device("cuda")
    b, emu = Sm100Adapter(), EmulatorBackend()
    static = act_scale == "static"
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 256, generator=g) * 3).to(torch.bfloat16).to(dev)
    # ---- dense: quantize bytes, GEMM and linear run
    lin = _linear_on(layer.attention["wq_a"], dev)
    d_in = lin.input_scale_f32.reshape(1).to(torch.float32) if static else None
    a = b.quantize(x, input_dec_scale_f32=d_in)
    _assert_same_quantized(a, emu.quantize(x, input_dec_scale_f32=d_in), f"quantize ({act_scale})")
    w = b.prepare_linear(lin)
    y, y_lin = b.dense_gemm(a, w), b.dense_linear(x, w, input_dec_scale_f32=d_in)
    assert y.shape == (40, lin.n) and y.dtype == torch.bfloat16 and torch.equal(y, y_lin)
    # ---- MoE: dispatch exact, grouped quantize bytes, GEMMs / fused L1 / router / combine / block run
    ex_dev = dataclasses.replace(layer.experts, **{n: _linear_on(getattr(layer.experts, n), dev)
                                                   for n in ("w1", "w3", "w2")})
    ex = b.prepare_experts(ex_dev)
    ids = torch.stack([torch.randperm(12, generator=g)[:6] for _ in range(40)]).to(dev)
    disp, disp_emu = b.dispatch(ids, 16), emu.dispatch(ids, 16)
    assert_bits_equal(disp.row_token_i64, disp_emu.row_token_i64, label='sm100 dispatch vs emulator: row_token_i64')
    assert_bits_equal(disp.row_slot_i64, disp_emu.row_slot_i64, label='sm100 dispatch vs emulator: row_slot_i64')
    assert_bits_equal(disp.offsets_i32, disp_emu.offsets_i32, label='sm100 dispatch vs emulator: offsets_i32')
    off, rows = disp.offsets_i32, x[disp.row_token_i64]
    s1 = torch.maximum(ex_dev.w1.input_scale_f32, ex_dev.w3.input_scale_f32).float() if static else None
    s2 = ex_dev.w2.input_scale_f32.float()
    a1 = b.grouped_quantize(rows, off, input_dec_scale_f32=s1)
    _assert_same_quantized(a1, emu.grouped_quantize(rows, off, input_dec_scale_f32=s1),
                           f"grouped_quantize ({act_scale})", grouped_offsets=off.cpu())
    gate, up = b.grouped_gemm(a1, off, ex, layer="l1")
    assert gate.shape == up.shape == (240, 128) and bool(gate.isfinite().all()) and bool(up.isfinite().all())
    h = ref_moe.swiglu(gate.float(), up.float(), limit=10.0, row_weight_f32=None, mode="emulated")
    a2 = b.grouped_quantize(h, off, input_dec_scale_f32=s2 if static else None)
    _assert_same_quantized(a2, emu.grouped_quantize(h, off, input_dec_scale_f32=s2 if static else None),
                           f"requant ({act_scale})", grouped_offsets=off.cpu())
    assert b.grouped_gemm(a2, off, ex, layer="l2").shape == (240, 256)
    fused = b.l1_fused(a1, off, ex, swiglu_limit=10.0, input_dec_scale_f32=s2)
    assert fused.packed_u8.shape == (240, 64) and fused.global_dec_f32.shape == (16,)
    spec = moe_spec_from(ck.config)
    router = b.prepare_router(dataclasses.replace(layer.router, gate_weight_bf16=layer.router.gate_weight_bf16.to(dev),
                                                  tid2eid_i64=layer.router.tid2eid_i64.to(dev)), spec)
    tokens = torch.arange(40, device=dev)
    r = b.router(x, router, token_ids_i64=tokens)
    y_rows = torch.randn(240, 256, generator=g).to(torch.bfloat16).to(dev)
    assert b.combine(y_rows, disp, r.weights_f32).shape == (40, 256)
    if not static:  # the fixture's experts have per-expert static scales, which moe_experts cannot take
        out = b.moe_block(x, router, ex, swiglu_limit=10.0, weight_placement="after_w2", act_scale="dynamic",
                          token_ids_i64=tokens)
        assert out.shape == (40, 256) and bool(out.isfinite().all())
