"""CI (CPU) checks of the sm100 FP8 block-scaled linear (issue 23 item 6): every shipped
configuration of the GEMM and the 1x128 activation quantizer compiles for sm_100a without a GPU,
within the time budget, and its PTX holds what the design promises:

- GEMM: block-scaled tcgen05 MMA of kind mxf8f6f4 with 32-element UE8M0 scale blocks (MXFP8),
  four per 128 of K, scales copied smem -> tmem, TMA loads, TMEM loads waited before stores,
  vector stores for full 32-column sub-tiles and element stores for a partial last N tile;
- quantizer: max.NaN amax (NaN propagates), the 1e-4 floor and a correctly rounded / 448, the
  power-of-two ceiling on the bits, a correctly rounded x / s, the hardware E4M3 conversion and the
  canonical NaN code, and no approximate math.
"""

import importlib
import importlib.util
import os
import re
import shutil
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
        pytest.fail(f"cutlass was imported before CUTE_DSL_ARCH={ARCH} was set (it is {current!r})")
    os.environ["CUTE_DSL_ARCH"] = ARCH


def _compile_shipped(module_name: str, tmp_path_factory) -> dict:
    """Compile every SHIPPED_KEYS configuration of a kernels.sm100 module once: key -> (seconds, ptx)."""
    _ensure_arch()
    if importlib.util.find_spec("cutlass") is None:
        pytest.skip("nvidia-cutlass-dsl is not installed")
    module = importlib.import_module(module_name)
    out = {}
    for key in module.SHIPPED_KEYS:
        t0 = time.perf_counter()
        _, ptx = module.compile_with_ptx(key, str(tmp_path_factory.mktemp("fp8")))
        out[key] = (time.perf_counter() - t0, ptx)
    return out


def _ptxas() -> str | None:
    for cand in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if cand and os.path.isfile(cand):
            return cand
    return None


def _assemble(ptx: str, tmp_path) -> str:
    """ptxas -v output for the PTX (sm_100a); fails the test when ptxas rejects it."""
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found; the DSL's own compile already produced a cubin")
    src = tmp_path / "k.ptx"
    src.write_text(ptx)
    r = subprocess.run([ptxas, f"-arch={ARCH}", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ptxas rejected the PTX:\n{r.stderr[-4000:]}"
    return r.stderr + r.stdout


# ----------------------------------------------------------------------------- GEMM


@pytest.fixture(scope="module")
def compiled_gemms(tmp_path_factory):
    return _compile_shipped("kernels.sm100.gemm_fp8_blockscaled", tmp_path_factory)


def _gemm_keys():
    from kernels.sm100.gemm_fp8_blockscaled import SHIPPED_KEYS

    return [pytest.param(k, id=f"n{k.tile_n}-s{k.num_stages}") for k in SHIPPED_KEYS]


@pytest.mark.parametrize("key", _gemm_keys())
def test_fp8_gemm_compiles_for_sm100a_within_budget(compiled_gemms, key, record_property):
    _assert_compiled_for_sm100a_within_budget(key, *compiled_gemms[key], record_property)


def _assert_compiled_for_sm100a_within_budget(key, seconds: float, ptx: str, record_property) -> None:
    record_property("compile_seconds", round(seconds, 2))
    assert ptx, f"{key}: no PTX came back from the compile"
    assert re.search(r"^\.target\s+sm_100a\b", ptx, re.M), f"{key}: PTX is not for sm_100a"
    assert seconds <= COMPILE_BUDGET_S, f"{key}: compile took {seconds:.1f} s > {COMPILE_BUDGET_S} s"


@pytest.mark.parametrize("key", _gemm_keys())
def test_fp8_gemm_ptx_has_blockscaled_mxf8f6f4_mma_with_32_element_scales(compiled_gemms, key):
    from kernels.sm100.gemm_fp8_blockscaled import K_PER_STAGE, MMA_K

    _, ptx = compiled_gemms[key]
    mma = re.findall(r"^\s*(tcgen05\.mma\.[^\s]+)", ptx, re.M)
    assert mma, f"{key}: no tcgen05.mma in the PTX"
    for op in mma:
        assert ".cta_group::1." in op, f"{key}: unexpected MMA {op}"
        assert ".kind::mxf8f6f4.block_scale" in op, f"{key}: MMA is not block-scaled mxf8f6f4: {op}"
        # One UE8M0 scale per 32 elements: PTX spells it block32 (alias of scale_vec::1X).
        assert ".block32" in op or ".scale_vec::1X" in op, f"{key}: MMA scale vector is not 32-element: {op}"
    assert len(mma) == K_PER_STAGE // MMA_K, f"{key}: expected {K_PER_STAGE // MMA_K} MMAs per stage, found {len(mma)}"


@pytest.mark.parametrize("key", _gemm_keys())
def test_fp8_gemm_ptx_moves_scales_to_tmem_and_loads_with_tma(compiled_gemms, key):
    _, ptx = compiled_gemms[key]
    assert "tcgen05.cp.cta_group::1.32x128b.warpx4" in ptx, f"{key}: scales are not copied smem->tmem"
    assert "cp.async.bulk.tensor" in ptx, f"{key}: no TMA loads"
    assert "tcgen05.alloc" in ptx and "tcgen05.dealloc" in ptx, f"{key}: TMEM not allocated/freed"


@pytest.mark.parametrize("key", _gemm_keys())
def test_fp8_gemm_ptx_waits_for_tmem_loads_before_storing(compiled_gemms, key):
    """tcgen05.ld is asynchronous: every load must be followed by wait::ld before the next global store."""
    _, ptx = compiled_gemms[key]
    events = re.findall(r"^\s*(tcgen05\.ld|tcgen05\.wait::ld|st\.global)", ptx, re.M)
    assert "tcgen05.ld" in events, f"{key}: no TMEM loads in the epilogue"
    pending = False
    for i, ev in enumerate(events):
        if ev == "tcgen05.ld":
            pending = True
        elif ev == "tcgen05.wait::ld":
            pending = False
        else:
            assert not pending, f"{key}: a global store (event {i}) uses TMEM-loaded registers before wait::ld"


@pytest.mark.parametrize("key", _gemm_keys())
def test_fp8_gemm_ptx_stores_full_subtiles_as_vectors_and_the_n_edge_by_element(compiled_gemms, key):
    """Out is exactly [M, N]: full 32-column sub-tiles go out as 16-byte vectors, the partial last N
    tile element by element (bf16 = st.global.b16), and nothing else is stored."""
    from kernels.sm100.gemm_fp8_blockscaled import EPI_N

    _, ptx = compiled_gemms[key]
    stores = re.findall(r"^\s*(st\.global\.[\w.]+)", ptx, re.M)
    assert set(stores) == {"st.global.v4.b32", "st.global.b16"}, f"{key}: unexpected stores {set(stores)}"
    subtiles = key.tile_n // EPI_N
    # Two epilogue paths (computed tile, tile past the valid rows), 4 x 16 bytes per 32 bf16 columns.
    vectors = stores.count("st.global.v4.b32")
    assert vectors == 2 * subtiles * 4, f"{key}: {vectors} vector stores, expected {2 * subtiles * 4}"
    assert stores.count("st.global.b16") >= subtiles, f"{key}: no element-wise stores for the N edge"


@pytest.mark.parametrize("key", _gemm_keys())
def test_fp8_gemm_ptx_assembles_with_ptxas_without_spills(compiled_gemms, key, tmp_path, record_property):
    _, ptx = compiled_gemms[key]
    info = _assemble(ptx, tmp_path)
    regs = re.search(r"Used (\d+) registers", info)
    record_property("registers", int(regs.group(1)) if regs else None)
    assert "0 bytes spill stores" in info, f"{key}: register spills:\n{info}"


def test_fp8_gemm_declares_a_float32_accumulator_over_all_k():
    """The declaration the GEMM bound uses (module docstring): u_acc = 2^-24, one promotion chunk."""
    from kernels.sm100 import gemm_fp8_blockscaled as gemm

    assert gemm.ACCUMULATOR_U == 2.0**-24 and gemm.ACCUMULATOR_BITS == 24
    assert gemm.SF_VEC_SIZE == 32 and gemm.K_PER_STAGE == 128, "one 128-block scale = four 32-element MMA scales"


# ----------------------------------------------------------------------------- activation quantizer


@pytest.fixture(scope="module")
def compiled_quant(tmp_path_factory):
    return _compile_shipped("kernels.sm100.quantize_fp8_1x128", tmp_path_factory)


def _quant_keys():
    from kernels.sm100.quantize_fp8_1x128 import SHIPPED_KEYS

    return [pytest.param(k, id=f"quant-{k.recipe}") for k in SHIPPED_KEYS]


@pytest.mark.parametrize("key", _quant_keys())
def test_fp8_quantizer_compiles_for_sm100a_within_budget(compiled_quant, key, record_property):
    _assert_compiled_for_sm100a_within_budget(key, *compiled_quant[key], record_property)


@pytest.mark.parametrize("key", _quant_keys())
def test_fp8_quantizer_ptx_computes_the_ue8m0_ceil_scale_exactly(compiled_quant, key):
    _, ptx = compiled_quant[key]
    # amax: |x| with max.NaN (a NaN element makes the group's scale NaN), reduced over the warp.
    assert len(re.findall(r"max\.NaN\.f32", ptx)) >= 4 + 5 + 1, "amax must use max.NaN (4 elements, 5 shuffles, floor)"
    assert len(re.findall(r"shfl\.sync\.bfly\.b32", ptx)) == 5, "one butterfly reduction over 32 lanes"
    assert re.search(r"max\.NaN\.f32\s+\w+,\s*[%\w]+,\s*0f38D1B717;", ptx), "amax floor float32(1e-4) = 0x38D1B717"
    assert re.search(r"div\.rn\.f32\s+\w+,\s*\w+,\s*0f43E00000;", ptx), "s = amax / 448, correctly rounded"
    assert "and.b32 f, b, 8388607;" in ptx and "@p add.u32 e, e, 1;" in ptx, \
        "2^ceil(log2 s): exponent field + (mantissa != 0)"
    assert "min.u32" in ptx, "the scale byte is capped at 0xFF (NaN) for NaN/Inf groups"


@pytest.mark.parametrize("key", _quant_keys())
def test_fp8_quantizer_ptx_encodes_with_division_and_hardware_e4m3(compiled_quant, key):
    _, ptx = compiled_quant[key]
    assert len(re.findall(r"div\.rn\.f32\s+y,", ptx)) == 4, "x / s correctly rounded for each of 4 elements"
    assert len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)) == 4, "hardware E4M3 RNE conversion"
    assert len(re.findall(r"selp\.b32\s+c,\s*127,", ptx)) == 4, "NaN quotients give the canonical 0x7F"
    assert not re.search(r"\.ftz\b", ptx), "flush-to-zero would change bytes of subnormal inputs"
    for approx in ("rcp.approx", "div.approx", "div.full", "ex2.approx", "lg2.approx"):
        assert approx not in ptx, f"approximate math ({approx}) changes bytes"


@pytest.mark.parametrize("key", _quant_keys())
def test_fp8_quantizer_ptx_stores_codes_and_both_scale_layouts(compiled_quant, key):
    _, ptx = compiled_quant[key]
    stores = re.findall(r"^\s*(st\.global\.[\w.]+)", ptx, re.M)
    # codes (4 E4M3 bytes per lane) and the swizzled scale word are b32, the linear scale byte b8.
    assert sorted(stores) == ["st.global.b32", "st.global.b32", "st.global.b8"], f"unexpected stores {stores}"
    assert "16843009" in ptx or "0x01010101" in ptx.lower(), "the scale byte is replicated to its four 32-columns"
    first_x_load = ptx.index("ld.global.v2.b32")
    assert re.search(r"ld\.global\.b32[^\n]*\n\s*setp\.ge\.s32", ptx[:first_x_load]), \
        "the valid-row count is loaded and compared before x is read"


@pytest.mark.parametrize("key", _quant_keys())
def test_fp8_quantizer_ptx_assembles_with_ptxas(compiled_quant, key, tmp_path):
    _, ptx = compiled_quant[key]
    assert "0 bytes spill stores" in _assemble(ptx, tmp_path)
