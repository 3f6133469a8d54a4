"""sm90 activation quantizer (Triton) vs the emulator's `te` recipe: bytes equal.

The emulator runs on the CPU copy of the same bf16 input; the kernel's scales are
compared as the 128x4 swizzled buffer (padding included) against
references.layouts.sf_linear_to_swizzled_128x4 of the emulator's linear scales.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from references.layouts import sf_linear_to_swizzled_128x4
from references.nvfp4 import quantize_nvfp4
from references.recipes import TE
from verify.assertions import assert_bits_equal, assert_bytes_equal

GPU = [pytest.mark.gpu, pytest.mark.sm90]


def _backend():
    from kernels.sm90.api import Sm90Kernels

    return Sm90Kernels()


def _make(kind: str, m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(m, k, generator=g)
    elif kind == "heavy_tailed":
        x = torch.randn(m, k, generator=g) * torch.exp(3 * torch.randn(m, k, generator=g))
    elif kind == "tiny":
        x = torch.randn(m, k, generator=g) * 1e-30
    elif kind == "zero_blocks":
        x = torch.randn(m, k, generator=g)
        x.view(m, k // 16, 16)[:, ::3] = 0.0
        x.view(m, k // 16, 16)[:, 1::5] = -0.0
    elif kind == "midpoints":
        # each block: one element 6 (block max -> scale 1 at S = 448 * 6 / 6), rest on E2M1 midpoints
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0])
        x = mids[torch.randint(0, mids.numel(), (m, k), generator=g)]
        x.view(m, k // 16, 16)[:, :, 0] = 6.0
    elif kind == "saturating":
        x = torch.randn(m, k, generator=g) * 1e4
    elif kind == "special":
        x = torch.randn(m, k, generator=g)
        flat = x.view(-1)
        flat[::37] = float("nan")
        flat[5::101] = float("inf")
        flat[9::103] = float("-inf")
        flat[7::53] = -0.0
        x.view(m, k // 16, 16)[0, 0] = float("nan")  # an all-NaN block
    else:
        raise ValueError(kind)
    return x.to(torch.bfloat16)


def _reference(x_bf16: torch.Tensor, s_f32: torch.Tensor):
    q = quantize_nvfp4(x_bf16.cpu(), recipe=TE, global_enc_scale_f32=s_f32.cpu().reshape(()))
    return q.packed_u8, sf_linear_to_swizzled_128x4(q.sf_u8)


def _amax_nan_ignored(x_bf16: torch.Tensor) -> torch.Tensor:
    a = x_bf16.cpu().float().abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax()


def _te_enc_scale_ieee(amax_f32: torch.Tensor) -> torch.Tensor:
    """te_global_enc_scale with a correctly rounded 2688 / amax (float64 quotient of two
    float32 values rounded to float32 is correctly rounded). torch's `2688.0 / t` is
    computed as reciprocal(t) * 2688 (two roundings), 1 ulp off for some amax."""
    s = (torch.tensor(2688.0, dtype=torch.float64) / amax_f32.double()).clamp(max=torch.finfo(torch.float32).max)
    s = s.float()
    return torch.where((amax_f32 == 0) | (s == 0), torch.ones_like(s), s)


def _check(x_bf16: torch.Tensor, s_f32: torch.Tensor, label: str) -> None:
    be = _backend()
    packed, sf = be.quantize_nvfp4(x_bf16.cuda(), s_f32.cuda())
    ref_packed, ref_sf = _reference(x_bf16, s_f32)
    assert_bytes_equal(packed.cpu(), ref_packed, label=f"{label} codes [sm90 vs emulator:te]")
    assert_bytes_equal(sf.cpu(), ref_sf, label=f"{label} swizzled scales [sm90 vs emulator:te]")


# The kinds x shapes x scales byte comparison runs for every backend in test_backend_ops.py; the
# fuzzed search below stays here (it drives the Triton kernel's grid shapes directly).


@settings(max_examples=150, deadline=None)
@given(m=st.integers(1, 260), kb=st.integers(1, 80), log2s=st.floats(-60, 60), seed=st.integers(0, 2**31 - 1),
       tail=st.floats(0, 4))
@example(m=1, kb=1, log2s=0.0, seed=0, tail=0.0)
@example(m=129, kb=3, log2s=-40.0, seed=1, tail=4.0)
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_quantize_bytes_match_emulator_fuzzed(m, kb, log2s, seed, tail):
    k = 16 * kb
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.exp(tail * torch.randn(m, k, generator=g))).to(torch.bfloat16)
    s = torch.tensor(2.0 ** log2s, dtype=torch.float32) * (1 + torch.rand((), generator=g))
    _check(x, s, f"fuzz {m}x{k} S={float(s):.6g}")


@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "tiny", "special", "zeros"])
@pytest.mark.parametrize("m,k", [(1, 7168), (64, 7168), (1000, 4096), (4096, 7168)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_amax_global_enc_scale_matches_te(kind, m, k):
    x = torch.zeros(m, k, dtype=torch.bfloat16) if kind == "zeros" else _make(kind, m, k, seed=k + m)
    got = _backend().amax_global_enc_scale(x.cuda())
    expected = _te_enc_scale_ieee(_amax_nan_ignored(x))
    assert got.shape == () and got.dtype == torch.float32 and got.is_cuda
    assert_bits_equal(got.cpu(), expected, label=f"global enc scale {kind} {m}x{k}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_dynamic_quantize_matches_emulator():
    x = _make("heavy_tailed", 200, 7168, seed=3)
    packed, sf, s = _backend().quantize_nvfp4_dynamic(x.cuda())
    ref_packed, ref_sf = _reference(x, _te_enc_scale_ieee(_amax_nan_ignored(x)))
    assert_bytes_equal(packed.cpu(), ref_packed, label="dynamic codes")
    assert_bytes_equal(sf.cpu(), ref_sf, label="dynamic swizzled scales")


@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_static_quantize_counts_saturated_blocks():
    x = _make("normal", 256, 1024, seed=5)
    x[3, :16] *= 1000.0  # one block far above the calibrated range
    d = torch.tensor(4.0 / 2688.0)  # static input_scale (a decode scale) calibrated for amax 4
    s = torch.reciprocal(d)  # the encode scale the kernel forms from it
    packed, sf, count = _backend().quantize_nvfp4_static(x.cuda(), d.cuda())
    v = x.float().abs().view(256, 64, 16).amax(-1)
    expected = int((v * (s * torch.tensor(1 / 6, dtype=torch.float32)) > 448).sum())
    assert expected >= 1
    assert int(count) == expected
    ref_packed, ref_sf = _reference(x, s)
    assert_bytes_equal(packed.cpu(), ref_packed, label="static codes")
    assert_bytes_equal(sf.cpu(), ref_sf, label="static swizzled scales")


@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_quantize_is_deterministic_and_graph_capturable():
    be = _backend()
    x = _make("heavy_tailed", 300, 7168, seed=11).cuda()
    eager = be.quantize_nvfp4_dynamic(x)
    again = be.quantize_nvfp4_dynamic(x)
    for a, b, name in zip(eager, again, ("codes", "scales", "global")):
        assert_bits_equal(a, b, label=f"two runs: {name}")
    static_x = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.quantize_nvfp4_dynamic(static_x)
    new = _make("special", 300, 7168, seed=12).cuda()
    static_x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    ref = be.quantize_nvfp4_dynamic(new)
    for a, b, name in zip(out, ref, ("codes", "scales", "global")):
        assert_bits_equal(a, b, label=f"graph replay vs eager: {name}")


def test_sm90_quantize_rejects_bad_k_without_gpu():
    from kernels.sm90 import quantize_nvfp4_1x16

    with pytest.raises(ValueError, match="x_bf16"):
        quantize_nvfp4_1x16.launch(torch.zeros(2, 24, dtype=torch.bfloat16), torch.ones(()))
    with pytest.raises(ValueError, match="x_bf16"):
        quantize_nvfp4_1x16.launch(torch.zeros(2, 32, dtype=torch.float32), torch.ones(()))


def test_sm90_modules_import_without_triton_or_gpu():
    import subprocess
    import sys

    from verify.config import REPO_ROOT

    code = ("import sys\n"
            "import kernels.sm90.api, kernels.sm90.quantize_nvfp4_1x16, kernels.sm90.amax_global_enc_scale\n"
            "import kernels.sm90.gemm_nvfp4\n"
            "assert 'triton' not in sys.modules, 'a kernels.sm90 module imported triton at import time'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
    be = _backend()
    assert be.name == "sm90" and be.recipe_name == "te" and be.u_acc == 2.0**-24
    if not torch.cuda.is_available():
        assert be.unsupported_reason("gemm_nvfp4", "cpu") is not None
    assert "not provided" in be.unsupported_reason("no_such_op", None)
    assert "not provided" not in (be.unsupported_reason("grouped_gemm", "cpu") or "")
