"""Op-level correctness of every backend through the protocol (verify.backends), on synthetic data.

One test per (op, data, shape), parametrised over the backends: the emulator everywhere, sm90 on a
Hopper, sm100 on a B200 (each skips with its own reason elsewhere). The expected bytes and the
float64 products come from references/ on the same inputs; weights reach the backend as checkpoint
tensors (verify.checkpoint.Nvfp4Linear) and go through ITS prepare. Family-specific tests (PTX,
split-K tickets, decode paths, sanitizer, valid-row masking) stay in test_sm90_* / test_sm100_*.
"""

from __future__ import annotations

import pytest
import torch

from references import layouts as ref_layouts
from references import moe as ref_moe
from references.gemm import gemm_error_bound, grouped_gemm_error_bound, nvfp4_gemm_f64, nvfp4_grouped_gemm_f64
from references.linear import act_global_dec_f32, nvfp4_global_scale_for
from references.nvfp4 import quantize_nvfp4, quantize_nvfp4_weight_checkpoint
from references.recipes import MODELOPT
from references.stages import Op
from verify.assertions import assert_all_zero, assert_bits_equal, assert_bytes_equal, assert_codes_equal_as_values, \
    assert_within_gemm_bound, describe_e4m3
from verify.backends import get_backend
from verify.backends.registry import backend_specs_for
from verify.checkpoint import GatedMlp, Nvfp4Linear
from verify.rng import CounterRng

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_BACKENDS: dict = {}


def _backend(name: str, *ops: Op):
    """The backend, or a skip with its reason when it cannot run `ops` here."""
    if name not in _BACKENDS:
        try:
            _BACKENDS[name] = get_backend(name, DEVICE if CUDA else None)
        except ImportError as e:
            _BACKENDS[name] = e
    b = _BACKENDS[name]
    if isinstance(b, ImportError):
        pytest.skip(f"{name}: {b}")
    for op in ops:
        reason = b.unsupported_reason(op, DEVICE)
        if reason:
            pytest.skip(f"not served here: {reason}")
    return b


def _data(kind: str, m: int, k: int, seed: int) -> torch.Tensor:
    g = CounterRng(seed)
    if kind == "normal":
        x = g.normal((m, k))
    elif kind == "heavy_tailed":
        x = g.normal((m, k)) * g.lognormal((m, k), sigma=2.0)
    elif kind == "tiny":
        x = g.normal((m, k)) * 1e-30
    elif kind == "zero_blocks":
        x = g.normal((m, k))
        x.view(m, k // 16, 16)[:, ::3] = 0.0
        x.view(m, k // 16, 16)[:, 1::5] = -0.0
    elif kind == "midpoints":
        # each block: one element 6 (the block max), the rest on E2M1 midpoints and zeros
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0])
        x = mids[(g.u32((m, k)) % mids.numel())]
        x.view(m, k // 16, 16)[:, :, 0] = 6.0
    elif kind == "saturating":
        x = g.normal((m, k)) * 1e4
    elif kind == "special":
        x = g.normal((m, k))
        flat = x.view(-1)
        flat[::37] = float("nan")
        flat[5::101] = float("inf")
        flat[9::103] = float("-inf")
        x.view(m, k // 16, 16)[0, 0] = float("nan")  # an all-NaN block
    else:
        raise ValueError(kind)
    return x.to(torch.bfloat16).to(DEVICE)


KINDS = ["normal", "heavy_tailed", "tiny", "zero_blocks", "midpoints", "saturating", "special"]
# small shapes everywhere; DeepSeek-V4-Pro sizes only where a GPU runs them
SHAPES = [(1, 16), (3, 48), (127, 272), (130, 1040)] + ([(1, 7168), (64, 7168), (300, 7168)] if CUDA else [])
# static decode scales: a plausible input_scale, 1/448 (S = 448: scale bytes near 1 for the midpoints),
# and one far too large (S = 3e-3: every block scale underflows)
STATIC = {"static": 0.0123, "static_1/448": 1 / 448, "static_S3e-3": 1 / 3.0e-3}


def pytest_generate_tests(metafunc):
    """backend_name: the --backend under test (auto: every registered backend, each skipping where it
    cannot run; a name or module:attr: that one)."""
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", backend_specs_for(metafunc.config.getoption("--backend")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("scale", ["dynamic", *STATIC])
def test_quantize_bytes_equal_the_emulator(backend_name, kind, m, k, scale):
    b = _backend(backend_name, Op.QUANTIZE)
    x = _data(kind, m, k, seed=m * 7919 + k)
    d = None if scale == "dynamic" else torch.tensor([STATIC[scale]], dtype=torch.float32, device=DEVICE)
    got = b.quantize(x, input_dec_scale_f32=d)
    q = quantize_nvfp4(x, recipe=b.recipe, **nvfp4_global_scale_for(x, recipe=b.recipe, input_scale_f32=d))
    label = f"{b.name} {kind} {m}x{k} {scale}"
    assert_codes_equal_as_values(got.packed_u8, q.packed_u8, label=f"{label} codes")
    assert_bytes_equal(got.sf_swizzled_u8, ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8),
                       label=f"{label} swizzled scales (padding included)", describe=describe_e4m3)
    assert_bits_equal(got.global_dec_f32.reshape(-1).cpu(), act_global_dec_f32(q, d).reshape(-1).cpu(),
                      label=f"{label} global decode scale")


def _linear(n: int, k: int, seed: int, *, experts: int | None = None) -> Nvfp4Linear:
    """A checkpoint-format NVFP4 linear (ModelOpt recipe, as exported), or a stack of `experts`."""
    g = CounterRng(seed, device=DEVICE)
    parts = []
    for _ in range(experts or 1):
        w = (g.normal((n, k)) * g.lognormal((n, k), sigma=0.5)).to(torch.bfloat16).float()
        parts.append(quantize_nvfp4_weight_checkpoint(w, recipe=MODELOPT))
    t = {key: torch.stack([p[key] for p in parts]) if experts else parts[0][key] for key in parts[0]}
    inp = torch.full((experts,) if experts else (), 0.01, dtype=torch.float32, device=DEVICE)
    return Nvfp4Linear("synthetic", t["weight"].view(torch.uint8), t["weight_scale"], t["weight_scale_2"].float(), inp)


GEMM_SHAPES = [(1, 16, 16), (5, 200, 48), (33, 130, 1040), (129, 257, 272)]
if CUDA:  # DeepSeek-V4-Pro projections (N, K): wq_a, fused wq_a|wkv, shared w1|w3, w2, wo_b; every GEMM path
    _PROJ = [(2048, 7168), (6144, 7168), (7168, 3072), (7168, 16384), (1536, 7168)]
    GEMM_SHAPES += [(m, n, k) for m in (1, 3, 16, 127, 128) for (n, k) in _PROJ]
    GEMM_SHAPES += [(4096, 2048, 7168), (4096, 7168, 3072), (40, 6144, 7168), (64, 7168, 3072), (70, 129, 2064),
                    (24, 2048, 7168), (32, 7168, 3072), (20, 1536, 7168), (2, 7168, 3072), (4, 2048, 7168),
                    (4, 130, 1040), (2, 129, 2064), (3, 200, 48), (4, 7168, 16384)]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES, ids=lambda v: str(v))
def test_dense_gemm_within_the_accumulation_bound(backend_name, m, n, k):
    b = _backend(backend_name, Op.PREPARE, Op.QUANTIZE, Op.DENSE_GEMM)
    lin = _linear(n, k, seed=m + n + k)
    a = b.quantize(_data("heavy_tailed", m, k, seed=n))
    y = b.dense_gemm(a, b.prepare_linear(lin))
    a_sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=k // 16)
    alpha = a.global_dec_f32.reshape(()) * lin.weight_scale_2_f32.reshape(())
    y64, abs_dot = nvfp4_gemm_f64(a.packed_u8, a_sf, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8), alpha)
    assert_within_gemm_bound(y, y64, gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=b.u_acc, out_dtype=y.dtype),
                             label=f"{b.name} dense gemm {m}x{n}x{k}")


# rows per expert; zero-token experts and one hot expert included
COUNTS = [(3, 0, 130, 1), (0, 0, 257, 0), (1, 1, 1, 1)]
INTER, HIDDEN = 128, 256


def _grouped(backend_name: str, counts: tuple[int, ...], scale: str, *, k: int = HIDDEN):
    """(backend, offsets [E+1] int64, expert-sorted rows [R, k] bf16, static decode scales [E] or None, the
    backend's grouped_quantize of the rows)."""
    b = _backend(backend_name, Op.PREPARE, Op.GROUPED_QUANTIZE, Op.GROUPED_GEMM)
    e = len(counts)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)
    rows = _data("heavy_tailed", int(offsets[-1]), k, seed=sum(counts))
    d = None if scale == "dynamic" else torch.linspace(0.005, 0.02, e, dtype=torch.float32, device=DEVICE)
    return b, offsets, rows, d, b.grouped_quantize(rows, offsets.to(torch.int32), input_dec_scale_f32=d)


def _tile_rows(offsets: torch.Tensor, k: int) -> int:
    """Rows of the grouped swizzled scales: every expert's rows padded to 128 (a capacity buffer may hold more)."""
    real, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(
        torch.ones(int(offsets[-1]), k // 16, dtype=torch.uint8, device=offsets.device), offsets)
    return real.shape[0]


def _experts(e: int) -> GatedMlp:
    return GatedMlp(_linear(INTER, HIDDEN, 1, experts=e), _linear(INTER, HIDDEN, 2, experts=e),
                    _linear(HIDDEN, INTER, 3, experts=e))


def _assert_grouped_within_bound(b, a, offsets, lin, y, label: str) -> None:
    """y (one grouped GEMM's output on the backend's own quantized rows a) within the accumulation bound of
    the float64 product of the same operands."""
    __tracebackhide__ = True
    k = a.k
    a_sf = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8[:_tile_rows(offsets, k)], offsets,
                                                           cols=k // 16)
    alpha = a.global_dec_f32.reshape(-1) * lin.weight_scale_2_f32.reshape(-1)
    y64, abs_dot = nvfp4_grouped_gemm_f64(a.packed_u8, a_sf, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8),
                                          offsets, alpha)
    bound = grouped_gemm_error_bound(abs_dot, y64, alpha, offsets, k=k, u_acc=b.u_acc, out_dtype=y.dtype)
    assert_within_gemm_bound(y, y64, bound, label=label)


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("scale", ["dynamic", "static"])
def test_grouped_quantize_bytes_equal_the_references(backend_name, counts, scale):
    """Codes, each expert's swizzled scales (its rows padded to 128, padding zero) and the global decode
    scale per expert equal references' grouped quantization of the same rows."""
    b, offsets, rows, d, a = _grouped(backend_name, counts, scale)
    ref = ref_moe.act_quant(rows, offsets, recipe=b.recipe, act_scale=scale, input_scale_f32=d)
    sf_ref, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(ref.sf_u8, offsets)
    label = f"{b.name} grouped_quantize {counts} {scale}"
    assert_codes_equal_as_values(a.packed_u8, ref.packed_u8, label=f"{label} codes")
    assert_bytes_equal(a.sf_swizzled_u8[:sf_ref.shape[0]], sf_ref, label=f"{label} swizzled scales (padding included)",
                       describe=describe_e4m3)
    assert_bits_equal(a.global_dec_f32.reshape(-1).float().cpu(), ref.global_dec_f32.reshape(-1).float().cpu(),
                      label=f"{label} global decode scale per expert")


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("scale", ["dynamic", "static"])
def test_grouped_quantize_scale_rows_past_the_experts_tiles_are_zero(backend_name, counts, scale):
    """A scale buffer sized for capacity (more rows than the experts' padded tiles) holds zeros past them."""
    b, offsets, rows, d, a = _grouped(backend_name, counts, scale)
    tiles = _tile_rows(offsets, HIDDEN)
    assert_all_zero(a.sf_swizzled_u8[tiles:], label=f"{b.name} grouped_quantize {counts} {scale}: scale rows past the "
                    f"experts' {tiles} padded rows")


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("scale", ["dynamic", "static"])
def test_grouped_gemm_l1_within_the_accumulation_bound(backend_name, counts, scale):
    """L1 through prepare_experts: gate (w1) and up (w3), each within its bound on the backend's own rows."""
    b, offsets, rows, d, a = _grouped(backend_name, counts, scale)
    mlp = _experts(len(counts))
    gate, up = b.grouped_gemm(a, offsets.to(torch.int32), b.prepare_experts(mlp), layer="l1")
    _assert_grouped_within_bound(b, a, offsets, mlp.w1, gate, f"{b.name} grouped l1 gate {counts} {scale}")
    _assert_grouped_within_bound(b, a, offsets, mlp.w3, up, f"{b.name} grouped l1 up {counts} {scale}")


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("scale", ["dynamic", "static"])
def test_grouped_gemm_l2_within_the_accumulation_bound(backend_name, counts, scale):
    """L2 through prepare_experts: rows of width I (the requantized h's shape) x w2, within its bound."""
    b, offsets, rows, d, a = _grouped(backend_name, counts, scale, k=INTER)
    mlp = _experts(len(counts))
    y = b.grouped_gemm(a, offsets.to(torch.int32), b.prepare_experts(mlp), layer="l2")
    _assert_grouped_within_bound(b, a, offsets, mlp.w2, y, f"{b.name} grouped l2 {counts} {scale}")
