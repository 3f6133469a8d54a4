"""CI (CPU) checks of the sm100 kernels: every shipped configuration compiles for
sm_100a without a GPU, within the time budget, and its PTX holds the instructions
the design promises (block-scaled tcgen05 MMA of kind mxf4nvf4 with 16-element
E4M3 scale blocks, scales copied to tensor memory, TMA loads, waited TMEM loads).
"""

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

ARCH = "sm_100a"
COMPILE_BUDGET_S = 20.0

pytestmark = pytest.mark.cpu_compile


def _ensure_arch() -> None:
    """CUTE_DSL_ARCH must be set before cutlass is imported (the DSL reads it once)."""
    current = os.environ.get("CUTE_DSL_ARCH")
    if "cutlass" in sys.modules and current != ARCH:
        pytest.fail(f"cutlass was imported before CUTE_DSL_ARCH={ARCH} was set (it is {current!r}); "
                    "set it in the environment or in conftest before anything imports cutlass")
    os.environ["CUTE_DSL_ARCH"] = ARCH


def _gemm_keys():
    from kernels.sm100.gemm_nvfp4_blockscaled import SHIPPED_KEYS

    return [pytest.param(k, id=f"{k.variant}-n{k.tile_n}-s{k.num_stages}") for k in SHIPPED_KEYS]


def _compile_shipped(module_name: str, tmp_path_factory, dir_of) -> dict:
    """Compile every SHIPPED_KEYS configuration of a kernels.sm100 module once: key -> (seconds, ptx)."""
    _ensure_arch()
    if importlib.util.find_spec("cutlass") is None:
        pytest.skip("nvidia-cutlass-dsl is not installed")
    module = importlib.import_module(module_name)
    out = {}
    for key in module.SHIPPED_KEYS:
        t0 = time.perf_counter()
        _, ptx = module.compile_with_ptx(key, str(tmp_path_factory.mktemp(dir_of(key))))
        out[key] = (time.perf_counter() - t0, ptx)
    return out


@pytest.fixture(scope="module")
def compiled_gemms(tmp_path_factory):
    """Compile each shipped GEMM configuration once per session: key -> (seconds, ptx)."""
    return _compile_shipped("kernels.sm100.gemm_nvfp4_blockscaled", tmp_path_factory, lambda k: k.variant)


@pytest.mark.parametrize("key", _gemm_keys())
def test_gemm_compiles_for_sm100a_within_budget(compiled_gemms, key, record_property):
    seconds, ptx = compiled_gemms[key]
    record_property("compile_seconds", round(seconds, 2))
    assert ptx, f"{key}: no PTX came back from the compile"
    assert re.search(r"^\.target\s+sm_100a\b", ptx, re.M), f"{key}: PTX is not for sm_100a"
    assert seconds <= COMPILE_BUDGET_S, f"{key}: compile took {seconds:.1f} s > {COMPILE_BUDGET_S} s"


@pytest.mark.parametrize("key", _gemm_keys())
def test_gemm_ptx_has_blockscaled_mxf4nvf4_mma(compiled_gemms, key):
    _, ptx = compiled_gemms[key]
    mma = re.findall(r"^\s*(tcgen05\.mma\.[^\s]+)", ptx, re.M)
    assert mma, f"{key}: no tcgen05.mma in the PTX"
    for op in mma:
        assert ".cta_group::1." in op, f"{key}: unexpected MMA {op}"
        assert ".kind::mxf4nvf4.block_scale" in op, f"{key}: MMA is not block-scaled mxf4nvf4: {op}"
        # One E4M3 scale per 16 elements: PTX spells it block16 (alias of scale_vec::4X).
        assert ".block16" in op or ".scale_vec::4X" in op, f"{key}: MMA scale vector is not 16-element: {op}"
    assert len(mma) == 4, f"{key}: expected 4 MMAs (K=256 per stage / K=64 per MMA), found {len(mma)}"


@pytest.mark.parametrize("key", _gemm_keys())
def test_gemm_ptx_moves_scales_to_tmem_and_loads_with_tma(compiled_gemms, key):
    _, ptx = compiled_gemms[key]
    assert "tcgen05.cp.cta_group::1.32x128b.warpx4" in ptx, f"{key}: scales are not copied smem->tmem"
    assert "cp.async.bulk.tensor" in ptx, f"{key}: no TMA loads"
    assert "tcgen05.alloc" in ptx and "tcgen05.dealloc" in ptx, f"{key}: TMEM not allocated/freed"


@pytest.mark.parametrize("key", _gemm_keys())
def test_gemm_ptx_waits_for_tmem_loads_before_storing(compiled_gemms, key):
    """tcgen05.ld is asynchronous: every load must be followed by wait::ld before the next global store."""
    _, ptx = compiled_gemms[key]
    events = re.findall(r"^\s*(tcgen05\.ld|tcgen05\.wait::ld|st\.global)", ptx, re.M)
    pending = False
    for i, ev in enumerate(events):
        if ev == "tcgen05.ld":
            pending = True
        elif ev == "tcgen05.wait::ld":
            pending = False
        else:
            assert not pending, f"{key}: a global store (event {i}) uses TMEM-loaded registers before wait::ld"
    assert "tcgen05.ld" in events, f"{key}: no TMEM loads in the epilogue"


@pytest.mark.parametrize("key", _gemm_keys())
def test_gemm_ptx_zeroes_rows_past_the_device_valid_count(compiled_gemms, key):
    """CUDA-graph token count: the epilogue selects zero for rows at or past the valid-row count
    read from a device buffer, so every store after a TMEM load is preceded by a selp."""
    _, ptx = compiled_gemms[key]
    events = re.findall(r"^\s*(tcgen05\.wait::ld|st\.global|selp\.b32)", ptx, re.M)
    waits = [i for i, ev in enumerate(events) if ev == "tcgen05.wait::ld"]
    assert waits, f"{key}: no TMEM loads"
    for i in waits:
        j = next((j for j in range(i + 1, len(events)) if events[j] == "st.global"), len(events))
        assert "selp.b32" in events[i + 1:j], f"{key}: the store after TMEM load #{waits.index(i)} is not row-masked"


def _epilogue_math(ptx: str) -> dict[str, int]:
    """How many exp2, f32 min, f32 max and f32 division instructions the PTX holds."""
    return {name: len(re.findall(pattern, ptx, re.M)) for name, pattern in (
        ("ex2", r"^\s*ex2\.approx"), ("min", r"^\s*min\.(?:ftz\.)?f32"), ("max", r"^\s*max\.(?:ftz\.)?f32"),
        ("div", r"^\s*div\.[\w.]*f32"))}


def test_gemm_swiglu_epilogue_has_activation(compiled_gemms):
    """h = silu(min(g, L)) * clamp(u, -L, L), silu(g) = g / (1 + exp(-g)): each epilogue thread holds
    one row of the out_tile_n-column h tile, and each of its h elements takes one exp, one division,
    two mins (the gate's and the up clamp's upper side) and one max (the up clamp's lower side). The
    plain grouped GEMM has none of these, so the counts are the SwiGLU's (a dropped clamp side, a
    sigmoid gone, or an activation applied twice changes them)."""
    key = next(k for k in compiled_gemms if k.variant == "grouped_swiglu")
    plain = next(k for k in compiled_gemms if k.variant == "grouped")
    n = key.out_tile_n
    assert _epilogue_math(compiled_gemms[plain][1]) == {"ex2": 0, "min": 0, "max": 0, "div": 0}, \
        f"{plain}: the plain grouped GEMM's epilogue computes an activation"
    assert _epilogue_math(compiled_gemms[key][1]) == {"ex2": n, "min": 2 * n, "max": n, "div": n}, \
        f"{key}: SwiGLU epilogue math per thread (expected per h element: 1 exp, 2 min, 1 max, 1 div, x {n})"


def test_gemm_swiglu_nvfp4_epilogue_quantizes_h_for_l2_with_te_math(compiled_gemms):
    """grouped_swiglu_nvfp4: h is rounded to bf16, then quantized in the epilogue (recipe te) with
    the hardware conversions; only packed codes (b32) and scale bytes (b8) are stored, no bf16 h."""
    key = next(k for k in compiled_gemms if k.variant == "grouped_swiglu_nvfp4")
    _, ptx = compiled_gemms[key]
    per_thread_blocks = (key.out_tile_n // 32) * 2  # 4 sub-tiles of 32 columns, 2 blocks of 16 each
    assert len(re.findall(r"cvt\.rn\.satfinite\.e2m1x2\.f32", ptx)) == 8 * per_thread_blocks, \
        "16 elements per block = 8 e2m1x2 conversions"
    assert len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)) == per_thread_blocks, "one E4M3 scale per block"
    assert len(re.findall(r"cvt\.rn\.f16x2\.e4m3x2", ptx)) == per_thread_blocks, \
        "the encode multiplier must use the decoded (rounded) block scale"
    assert len(re.findall(r"cvt\.rn\.bf16x2\.f32", ptx)) == key.out_tile_n // 2, "h must be rounded to bf16 first"
    assert "0f3E2AAAAB" in ptx and "0f7F7FFFFF" in ptx, "te: v * (S * (1/6)), clamp at FLT_MAX"
    assert len(re.findall(r"mul\.rn\.f32", ptx)) == 16 * per_thread_blocks, "x*enc as an explicit mul.rn (no FMA)"
    stores = set(re.findall(r"^\s*(st\.global\.[\w.]+)", ptx, re.M))
    assert stores == {"st.global.b32", "st.global.b8"}, f"unexpected stores {stores}: h must not be stored as bf16"
    assert "rcp.approx" not in ptx, "approximate reciprocal changes bytes"


def test_kernels_sm100_import_without_cutlass():
    """`import kernels.sm100.<module>` needs torch alone: cutlass is imported lazily by the compile."""
    code = (
        "import sys, importlib, pkgutil, kernels.sm100 as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('kernels.sm100.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'cutlass' or m.startswith('cutlass.')]\n"
        "print('IMPORTED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"importing kernels.sm100 pulled in cutlass or failed:\n{r.stdout}\n{r.stderr}"


def _ptxas() -> str | None:
    import shutil

    for cand in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if cand and os.path.isfile(cand):
            return cand
    return None


@pytest.mark.parametrize("key", _gemm_keys())
def test_gemm_ptx_assembles_with_ptxas_without_spills(compiled_gemms, key, tmp_path, record_property):
    """An independent assembler (the CUDA toolkit's ptxas) accepts the PTX for sm_100a, with no spills."""
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found; the DSL's own compile above already produced a cubin")
    _, ptx = compiled_gemms[key]
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    r = subprocess.run([ptxas, f"-arch={ARCH}", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{key}: ptxas rejected the PTX:\n{r.stderr[-4000:]}"
    info = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", info)
    record_property("registers", int(regs.group(1)) if regs else None)
    assert "0 bytes spill stores" in info, f"{key}: register spills:\n{info}"


# ----------------------------------------------------------------------------- activation quantizer


@pytest.fixture(scope="module")
def compiled_quant(tmp_path_factory):
    return _compile_shipped("kernels.sm100.quantize_nvfp4_1x16", tmp_path_factory, lambda k: f"quant_{k.recipe}")


def _quant_keys():
    from kernels.sm100.quantize_nvfp4_1x16 import SHIPPED_KEYS

    return [pytest.param(k, id=f"quant-{k.recipe}") for k in SHIPPED_KEYS]


@pytest.mark.parametrize("key", _quant_keys())
def test_quantizer_compiles_for_sm100a_within_budget(compiled_quant, key, record_property):
    seconds, ptx = compiled_quant[key]
    record_property("compile_seconds", round(seconds, 2))
    assert re.search(r"^\.target\s+sm_100a\b", ptx, re.M), f"{key}: PTX is not for sm_100a"
    assert seconds <= COMPILE_BUDGET_S, f"{key}: compile took {seconds:.1f} s > {COMPILE_BUDGET_S} s"


@pytest.mark.parametrize("key", _quant_keys())
def test_quantizer_ptx_uses_hardware_conversions_in_te_order(compiled_quant, key):
    _, ptx = compiled_quant[key]
    assert len(re.findall(r"cvt\.rn\.satfinite\.e2m1x2\.f32", ptx)) == 8, "16 elements = 8 e2m1x2 conversions"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "block scale is not rounded by the hardware E4M3 conversion"
    assert "cvt.rn.f16x2.e4m3x2" in ptx, "the encode multiplier must use the decoded (rounded) block scale"
    assert "0f3E2AAAAB" in ptx, "te: v * (S * (1/6)) with 1/6 rounded to float32 0x3E2AAAAB"
    assert "0f7F7FFFFF" in ptx, "te: clamps at FLT_MAX"
    assert re.search(r"\brcp\.rn\.f32|\bdiv\.rn\.f32", ptx), "te: 1/S and 1/(s/S) must be correctly rounded"
    assert not re.search(r"\bfma\.", ptx), "x*enc must not be contracted into an FMA (sign of zero)"
    assert "ex2.approx" not in ptx and "rcp.approx" not in ptx, "approximate math changes bytes"


@pytest.mark.parametrize("key", _quant_keys())
def test_quantizer_ptx_writes_zeros_past_the_device_valid_count(compiled_quant, key):
    """Rows at or past the valid-row count (a device buffer) are not read: zero codes, zero scale byte."""
    _, ptx = compiled_quant[key]
    assert re.search(r"st\.global\.v2\.b32\s+\[[^\]]+\],\s*\{0, 0\}", ptx), "no zero-code store for invalid rows"
    assert re.search(r"st\.global\.b8\s+\[[^\]]+\],\s*0;", ptx), "no zero scale byte for invalid rows"
    first_x_load = ptx.index("ld.global.v4.b32")
    assert re.search(r"ld\.global\.b32[^\n]*\n\s*setp\.ge\.s32[^\n]*\n\s*@%p\d+ bra", ptx[:first_x_load]), \
        "the valid-row count is not loaded and compared before x is read"


@pytest.mark.parametrize("key", _quant_keys())
def test_quantizer_ptx_assembles_with_ptxas(compiled_quant, key, tmp_path):
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found")
    _, ptx = compiled_quant[key]
    src = tmp_path / "q.ptx"
    src.write_text(ptx)
    r = subprocess.run([ptxas, f"-arch={ARCH}", "-v", str(src), "-o", str(tmp_path / "q.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{key}: ptxas rejected the PTX:\n{r.stderr[-4000:]}"
    assert "0 bytes spill stores" in r.stderr + r.stdout
