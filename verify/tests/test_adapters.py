"""The shipped adapters of other people's kernels (verify/backends/adapters/: humming, vllm, flashinfer, sgl-kernel)
on a machine without their packages (CI): they are registered and listed, every op says why it is not served here,
a missing / wrong-version / broken package is a reason and never a crash, and the boundary conversions they make
with their own code (adapters._common, pure torch) equal the references' layouts and decoded values."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from references import layouts as ref_layouts
from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4, te_global_enc_scale
from references.recipes import TE
from references.stages import Op
from verify.backends.adapters import _common
from verify.backends.adapters._common import (Package, e2m1_codes_to_f32, grouped_nvfp4_act_to_bf16,
                                              grouped_padded_row_of, nvfp4_act_to_bf16, package_problem,
                                              sf_linear_to_swizzled_128x4_u8)
from verify.backends.adapters._engine import global_enc_from_amax
from verify.backends.adapters.humming import HUMMING, HummingBackend
from verify.backends.cli import describe_backend
from verify.backends.protocol import FORWARD_OPS, NumericsMode
from verify.backends.registry import ADAPTERS, BUILTINS, get_backend, registered_backends

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
NAMES = tuple(ADAPTERS)


def _installed(name: str) -> bool:
    dist = ADAPTERS[name][1]
    try:
        import importlib.metadata as md
        md.version(dist)
        return True
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------- registry and listing


def test_the_adapters_are_registered_after_ours_and_not_auto():
    reg = registered_backends()
    assert set(NAMES) == {"humming", "vllm", "flashinfer", "sgl-kernel"}
    assert list(reg)[:len(BUILTINS)] == list(BUILTINS), "ours come first"
    for name in NAMES:
        assert reg[name].origin == "shipped adapter"
        assert ADAPTERS[name][1] in reg[name].version, reg[name].version
        assert not set(NAMES) & set(BUILTINS)


@pytest.mark.parametrize("name", NAMES)
def test_each_adapter_loads_without_its_package_and_lists_every_op_with_a_reason(name):
    """On the CPU every forward op is "not served" with a sentence; the listing loads the adapter (no import of
    its package happens to list it)."""
    row = describe_backend(name, CPU)
    assert "error" not in row, row
    assert row["name"] == name and row["origin"] == "shipped adapter"
    assert set(row["ops"]) == {op.value for op in FORWARD_OPS}
    for op, reason in row["ops"].items():
        assert isinstance(reason, str) and reason.strip(), f"{name}.{op}: no reason on the CPU"
        assert reason.startswith(("not served:", f"{name}:")), f"{name}.{op}: {reason}"
    if not _installed(name):
        served = [op for op in FORWARD_OPS if get_backend(name).serves(op)]
        assert served, f"{name} serves nothing at all"
        for op in served:
            assert "is not installed" in row["ops"][op.value], row["ops"][op.value]


def test_python_m_verify_backends_lists_the_adapters_with_their_reasons():
    proc = subprocess.run([sys.executable, "-m", "verify", "backends", "--device", "cpu", "--backend", "humming",
                           "--backend", "vllm", "--backend", "flashinfer", "--backend", "sgl-kernel"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flat = " ".join(proc.stdout.split())
    for name in NAMES:
        assert f"{name}: forward ops on cpu" in flat, name
    cells = " ".join(proc.stdout.replace("│", " ").split())  # 80-column cells wrap: their words, in order
    assert "shipped" in cells and "adapter" in cells
    assert "W4A16: humming keeps activations bf16" in cells
    if not _installed("humming"):
        assert "humming-kernels is not installed (nvfp4-verify's extra 'humming' installs it)" in cells


# ----------------------------------------------------------------------------- what each one declares


def test_humming_declares_w4a16_for_its_bf16_ops_and_w4a4_for_the_nvfp4_boundary_ops():
    b = HummingBackend()
    assert b.numerics_mode(Op.DENSE_LINEAR, "nvfp4") is NumericsMode.W4A16
    assert b.numerics_mode(Op.MOE_BLOCK, "nvfp4") is NumericsMode.W4A16
    assert b.numerics_mode(Op.DENSE_GEMM, "nvfp4") is NumericsMode.W4A4
    assert b.numerics_mode(Op.GROUPED_GEMM, "nvfp4") is NumericsMode.W4A4
    assert b.u_acc == 2.0**-24 and "fp32" in b.accumulator
    for op in (Op.QUANTIZE, Op.GROUPED_QUANTIZE, Op.SWIGLU_REQUANT, Op.L1_FUSED, Op.ROUTER, Op.DISPATCH, Op.COMBINE,
               Op.QUANTIZE_FP8):
        assert b.unsupported_reason(op, torch.device("cuda")).startswith("not served:"), op
    assert "W4A16" in b.unsupported_reason(Op.QUANTIZE, CPU)


@pytest.mark.parametrize("name,recipe", [("vllm", "vllm"), ("flashinfer", "te"), ("sgl-kernel", "vllm")])
def test_the_engine_adapters_declare_their_quantizer_recipe_and_w4a4(name, recipe):
    b = get_backend(name)
    assert b.recipe.name == recipe
    assert b.numerics_mode(Op.DENSE_LINEAR, "nvfp4") is NumericsMode.W4A4
    assert b.numerics_mode(Op.DENSE_LINEAR, "fp8_block") is NumericsMode.FP8_BLOCK
    served = {op for op in FORWARD_OPS if b.serves(op)}
    fp8 = {Op.QUANTIZE_FP8} if name == "vllm" else set()
    assert served == {Op.QUANTIZE, Op.DENSE_GEMM, Op.DENSE_LINEAR} | fp8, served


def test_vllm_declares_its_fp8_block_accumulator():
    from verify.backends.base import declared_fp8_accumulator

    assert declared_fp8_accumulator(get_backend("vllm")) == (2.0**-13, 128)


def test_ue8m0_bytes_of_power_of_two_scales_are_exact_and_anything_else_is_the_nan_byte():
    e = torch.arange(-127, 128)
    pow2 = torch.ldexp(torch.ones(e.numel()), e)
    assert torch.equal(_common.f32_pow2_to_ue8m0_u8(pow2), (e + 127).to(torch.uint8))
    bad = torch.tensor([3.0, 0.0, -2.0, float("inf"), float("nan"), 2.0**-128, 1.5 * 2.0**-127])
    assert torch.equal(_common.f32_pow2_to_ue8m0_u8(bad), torch.full((7,), 0xFF, dtype=torch.uint8))


def test_humming_pin_is_the_one_the_extra_installs():
    """The adapter refuses any other version; the `humming` extra must install exactly that one."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["humming"] == [f"{HUMMING.dist}=={HUMMING.pinned}"]
    for name, (_, dist) in ADAPTERS.items():
        assert any(req.split("=")[0] == dist for req in extras[name]), (name, extras.get(name))


# ----------------------------------------------------------------------------- a package that is absent, wrong or broken


@pytest.fixture
def fresh_problems():
    package_problem.cache_clear()
    yield
    package_problem.cache_clear()


def test_a_missing_package_is_a_reason(fresh_problems):
    why = package_problem(Package("no-such-dist-nvfp4v", "no_such_module_nvfp4v", extra="x"))
    assert why == "no-such-dist-nvfp4v is not installed (nvfp4-verify's extra 'x' installs it)"


def test_another_version_than_the_pin_is_refused_with_both_versions(fresh_problems):
    import importlib.metadata as md

    why = package_problem(Package("rich", "rich", extra="x", pinned="0.0.1"))
    assert why.startswith(f"rich {md.version('rich')} is installed, but this adapter is written against 0.0.1"), why


def test_a_package_that_fails_to_import_is_a_reason_not_a_crash(tmp_path, monkeypatch, fresh_problems):
    (tmp_path / "nvfp4v_broken_pkg").mkdir()
    (tmp_path / "nvfp4v_broken_pkg" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    why = package_problem(Package("nvfp4v-broken", "nvfp4v_broken_pkg", extra="x"))
    assert why == "nvfp4v-broken (no metadata) does not import here (ImportError: libcuda.so.1: cannot open)", why


def test_humming_with_an_importable_package_still_says_why_not_on_the_cpu(tmp_path, monkeypatch, fresh_problems):
    """A (fake) importable humming without distribution metadata passes the package check; the device check then
    names what is missing: a CUDA device, Hopper."""
    (tmp_path / "humming").mkdir()
    (tmp_path / "humming" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "humming", raising=False)
    if _installed("humming"):
        pytest.skip("humming-kernels is installed here")
    b = HummingBackend()
    assert b.unsupported_reason(Op.DENSE_LINEAR, CPU) == "humming: needs a CUDA device, Hopper (sm90); got cpu"
    assert b.unsupported_reason(Op.ROUTER, CPU).startswith("not served: humming is GEMMs only")


def test_humming_broken_import_reaches_every_served_op(tmp_path, monkeypatch, fresh_problems):
    (tmp_path / "humming").mkdir()
    (tmp_path / "humming" / "__init__.py").write_text("raise RuntimeError('NVRTC not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "humming", raising=False)
    if _installed("humming"):
        pytest.skip("humming-kernels is installed here")
    b = HummingBackend()
    for op in (Op.DENSE_LINEAR, Op.DENSE_GEMM, Op.GROUPED_GEMM, Op.MOE_BLOCK):
        assert b.unsupported_reason(op, torch.device("cuda")) == \
            "humming: humming-kernels (no metadata) does not import here (RuntimeError: NVRTC not found)", op


def test_listing_an_adapter_imports_none_of_the_engines():
    code = ("import sys, torch; from verify.backends.cli import describe_backend; "
            "[describe_backend(n, torch.device('cpu')) for n in ('humming', 'vllm', 'flashinfer', 'sgl-kernel')]; "
            "print(sorted(m for m in ('humming', 'vllm', 'flashinfer', 'sgl_kernel') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    imported = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 (our own printed list)
    assert imported == [n for n in ("flashinfer", "humming", "sgl_kernel", "vllm")
                        if _installed({"sgl_kernel": "sgl-kernel"}.get(n, n))], imported


# ----------------------------------------------------------------------------- boundary conversions (pure torch)


def test_e2m1_decode_of_all_16_codes():
    got = e2m1_codes_to_f32(torch.arange(16, dtype=torch.uint8))
    want = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    assert torch.equal(got, want) and bool(got[8].signbit()) and not bool(got[0].signbit())


@pytest.mark.parametrize("lead", [(), (3,)], ids=["dense", "stack3"])
@pytest.mark.parametrize("rows,cols", [(1, 1), (130, 7), (256, 448 // 16), (7, 4)])
def test_weight_scale_swizzle_equals_the_references(lead, rows, cols):
    g = torch.Generator().manual_seed(rows * 31 + cols)
    sf = torch.randint(0, 255, (*lead, rows, cols), dtype=torch.uint8, generator=g)
    got = sf_linear_to_swizzled_128x4_u8(sf)
    want = torch.stack([ref_layouts.sf_linear_to_swizzled_128x4(s) for s in sf.reshape(-1, rows, cols)])
    assert torch.equal(got.reshape(want.shape), want)


def _quantized(rows: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))).to(torch.bfloat16)
    x[0, :16] = 0  # a zero block
    return quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=te_global_enc_scale(x.abs().amax().float()))


@pytest.mark.parametrize("rows,k", [(1, 16), (5, 48), (129, 256), (300, 1040)])
def test_dense_boundary_decode_equals_the_references_decoded_values(rows, k):
    q = _quantized(rows, k, seed=rows + k)
    buf = ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8)
    pad = torch.ones_like(buf, dtype=torch.bool)
    pad.view(-1)[_common.swizzled_128x4_offsets(torch.arange(rows), k // 16).reshape(-1)] = False
    buf = torch.where(pad, torch.full_like(buf, 0xFF), buf)  # NaN bytes in the padding: never read
    got = nvfp4_act_to_bf16(q.packed_u8, buf)
    want = decode_nvfp4_block_scaled(q.packed_u8, q.sf_u8)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float(), want), "the decode is exact in bf16 and reads no padding"


@pytest.mark.parametrize("counts", [[3, 0, 130, 1], [0, 0, 5], [256], [1, 127, 128, 129]], ids=str)
def test_grouped_boundary_decode_equals_the_references_decoded_values(counts):
    off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    rows, k = int(off[-1]), 64
    q = _quantized(rows, k, seed=rows)
    buf, padded = ref_layouts.sf_grouped_linear_to_swizzled_128x4(q.sf_u8, off)
    assert torch.equal(grouped_padded_row_of(off.to(torch.int32), rows),
                       torch.cat([torch.arange(int(padded[e]), int(padded[e]) + c) for e, c in enumerate(counts)]))
    real = ref_layouts.sf_grouped_linear_to_swizzled_128x4(torch.ones_like(q.sf_u8), off)[0] != 0
    buf = torch.where(real, buf, torch.full_like(buf, 0x7F))  # garbage padding: never read
    got = grouped_nvfp4_act_to_bf16(q.packed_u8, buf, off.to(torch.int32))
    assert torch.equal(got.float(), decode_nvfp4_block_scaled(q.packed_u8, q.sf_u8))


def test_boundary_decode_refuses_bad_input_naming_the_tensor():
    with pytest.raises(ValueError, match=r"a\.packed_u8: expected uint8"):
        nvfp4_act_to_bf16(torch.zeros(2, 8), torch.zeros(128, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"a\.sf_swizzled_u8: .* expected at least 128 x 4"):
        nvfp4_act_to_bf16(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"offsets_i32: expected int32"):
        grouped_nvfp4_act_to_bf16(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(128, 4, dtype=torch.uint8),
                                  torch.tensor([0, 2]))


@pytest.mark.parametrize("amax", [0.0, 1e-45, 1e-38, 3.0e-3, 1.0, 2688.0, 3.4e38, float("inf"), float("nan")])
def test_engine_dynamic_encode_scale_equals_te_guarded(amax):
    a = torch.tensor([amax], dtype=torch.float32)
    got, want = global_enc_from_amax(a), te_global_enc_scale(a)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)) or (got.isnan().all() and want.isnan().all())


def test_the_decode_check_can_fail():
    """A decode that swaps the nibbles (the shipped bug) differs from the references: the comparison above is
    not vacuous."""
    q = _quantized(4, 32, seed=7)
    swapped = ((q.packed_u8 & 0xF) << 4) | (q.packed_u8 >> 4)
    got = nvfp4_act_to_bf16(swapped, ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8))
    assert not torch.equal(got.float(), decode_nvfp4_block_scaled(q.packed_u8, q.sf_u8))


# ----------------------------------------------------------------------------- humming's moe_block glue (pure torch)


def _fake_humming(monkeypatch, e: int, h: int, i: int):
    """A HummingBackend whose GEMM is a float32 matmul per expert (the routing, sort, gather, SwiGLU, combine and
    placement around it are the adapter's own code under test), with random bf16-valued expert weights."""
    from verify.backends.adapters import humming as hm

    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(e, 2 * i, h, generator=g).to(torch.bfloat16).float()
    w2 = torch.randn(e, h, i, generator=g).to(torch.bfloat16).float() / 8

    def weight(name, w):
        return hm.HummingWeight(name, w.shape[1], w.shape[2], e, None, w, None, torch.ones(e), "tensor", None,
                                torch.zeros(1), "{}")

    def gemm(self, w, x_bf16, scale_2, offsets_i32=None, *, op="gemm"):
        out = torch.zeros(x_bf16.shape[0], w.n)
        off = offsets_i32.tolist()
        for ex in range(len(off) - 1):
            out[off[ex]:off[ex + 1]] = x_bf16[off[ex]:off[ex + 1]].float() @ w.weight[ex].T
        return out.to(torch.bfloat16)

    monkeypatch.setattr(hm.HummingBackend, "_gemm", gemm)
    return hm.HummingBackend(), hm.HummingExperts(weight("w13", w13), weight("w2", w2), i), w13, w2


def _moe_case(monkeypatch, placement: str, hashed: bool):
    """(humming moe_block's output, a per-token loop over the references' routing with the same fake GEMM)."""
    from references.layer import MoeSpec
    from references.router import route
    from verify.checkpoint import Router

    e, h, i, t, k = 8, 32, 16, 13, 3
    b, experts, w13, w2 = _fake_humming(monkeypatch, e, h, i)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    gate = torch.randn(e, h, generator=g).to(torch.bfloat16)
    bias = None if hashed else torch.randn(e, generator=g) * 0.1
    tid2eid = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(50)]) if hashed else None
    tokens = torch.randint(0, 50, (t,), generator=g) if hashed else None
    spec = MoeSpec(top_k=k, scoring="sqrtsoftplus", routed_scaling_factor=2.5, swiglu_limit=4.0)
    r = b.prepare_router(Router(gate, bias, tid2eid), spec)
    y = b.moe_block(x, r, experts, swiglu_limit=4.0, weight_placement=placement, act_scale="dynamic",
                    token_ids_i64=tokens)
    ref = route(x, gate, scoring="sqrtsoftplus", top_k=k, routed_scaling_factor=2.5, bias_f32=bias, tid2eid=tid2eid,
                token_ids_i64=tokens)
    want = torch.zeros(t, h)
    for tok in range(t):
        for slot in range(k):
            ex, wt = int(ref.ids_i64[tok, slot]), float(ref.weights_f32[tok, slot])
            gu = (x[tok].float() @ w13[ex].T).to(torch.bfloat16).float()
            hh = torch.nn.functional.silu(gu[:i].clamp(max=4.0)) * gu[i:].clamp(-4.0, 4.0)
            if placement == "before_w2":
                hh = hh * wt
            yy = (hh.to(torch.bfloat16).float() @ w2[ex].T).to(torch.bfloat16).float()
            want[tok] += yy * (wt if placement == "after_w2" else 1.0)
    assert y.dtype == torch.bfloat16 and y.shape == (t, h)
    return y.float(), want


@pytest.mark.parametrize("placement", ["after_w2", "before_w2"])
@pytest.mark.parametrize("hashed", [False, True], ids=["scored", "hashed"])
def test_humming_moe_block_routes_sorts_and_combines_like_a_per_token_loop(monkeypatch, placement, hashed):
    y, want = _moe_case(monkeypatch, placement, hashed)
    # the routing weights differ from the references' float64-once rounding by float32 ulps only
    torch.testing.assert_close(y, want, rtol=2**-7, atol=1e-3)


def test_humming_moe_block_glue_check_can_fail(monkeypatch):
    """The same comparison sees routing weights applied to the wrong slots (rolled by one along k)."""
    from verify.backends.adapters import humming as hm

    route = hm._route
    monkeypatch.setattr(hm, "_route", lambda *a: (lambda ids, w: (ids, w.roll(1, dims=1)))(*route(*a)))
    y, want = _moe_case(monkeypatch, "after_w2", False)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(y, want, rtol=2**-7, atol=1e-3)


def test_vllm_gates_its_fp8_path_on_hopper_and_its_nvfp4_path_on_blackwell(tmp_path, monkeypatch, fresh_problems):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    if _installed("vllm"):
        pytest.skip("vllm is installed here")
    b = get_backend("vllm")
    assert b.unsupported_reason(Op.QUANTIZE_FP8, CPU) == \
        "vllm: needs a CUDA device, Hopper or Blackwell (FP8 block-128; its NVFP4 path needs Blackwell); got cpu"
    assert b.unsupported_reason(Op.QUANTIZE, CPU).startswith("vllm: needs a CUDA device, Blackwell")


@pytest.mark.parametrize("name", ["vllm", "flashinfer", "sgl-kernel"])
@pytest.mark.parametrize("n,k", [(1, 16), (130, 272), (256, 1040)], ids=str)
def test_engine_prepare_decodes_back_to_the_checkpoint(name, n, k):
    """Their prepare (the checkpoint bytes as they are, the scales swizzled by our code) decoded back equals the
    checkpoint's dequantized weight bit for bit (pure torch: runs without the engine)."""
    from references.nvfp4 import quantize_nvfp4_weight_checkpoint
    from references.recipes import MODELOPT
    from verify.checkpoint import Nvfp4Linear

    g = torch.Generator().manual_seed(n + k)
    t = quantize_nvfp4_weight_checkpoint(torch.randn(n, k, generator=g), recipe=MODELOPT)
    lin = Nvfp4Linear("w", t["weight"].view(torch.uint8), t["weight_scale"], t["weight_scale_2"].float(),
                      torch.tensor(0.01))
    b = get_backend(name)
    got = b.dequantize_prepared(b.prepare_linear(lin))
    want = decode_nvfp4_block_scaled(lin.weight_u8, lin.weight_scale_e4m3) * lin.weight_scale_2_f32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_vllm_fp8_prepare_decodes_back_and_picks_the_scale_rule():
    from verify.checkpoint import Fp8BlockLinear

    g = torch.Generator().manual_seed(9)
    n, k = 200, 300
    w = (torch.randn(n, k, generator=g) * 8).to(torch.float8_e4m3fn)
    e8m0 = torch.randint(120, 130, (2, 3), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)
    b = get_backend("vllm")
    p = b.prepare_linear(Fp8BlockLinear("wq_a", w, e8m0, None))
    assert p.scale_rule == "ue8m0_ceil"
    scale = torch.ldexp(torch.ones(2, 3), e8m0.view(torch.uint8).to(torch.int32) - 127)
    want = w.float() * scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    assert torch.equal(b.dequantize_prepared(p), want)
    v3 = b.prepare_linear(Fp8BlockLinear("wq_a", w, None, torch.full((2, 3), 0.3)))
    assert v3.scale_rule == "f32"
