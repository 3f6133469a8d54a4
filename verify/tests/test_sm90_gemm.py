"""sm90 dense NVFP4 GEMM (Triton) vs the float64 reference on the same quantized operands.

Verdict (DESIGN "Verdicts"): every element within gamma(K+1, u_acc) * |alpha| * sum|a_k b_k|
plus half an ulp of bf16 of the float64 result, u_acc the backend's declared accumulator
unit roundoff. On exact-arithmetic data the result equals the float64 result rounded once
to bf16. Operands are quantized by the emulator (te) on the GPU, scales swizzled by
references.layouts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from references.gemm import gemm_error_bound, nvfp4_gemm_f64
from references.layouts import sf_linear_to_swizzled_128x4
from references.nvfp4 import quantize_nvfp4, te_global_enc_scale
from references.recipes import TE
from verify.assertions import assert_bits_equal, assert_within_gemm_bound

GPU = [pytest.mark.gpu, pytest.mark.sm90]


def _backend():
    from kernels.sm90.api import Sm90Kernels

    return Sm90Kernels()


def _operand(rows: int, k: int, seed: int, *, heavy: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, generator=g, device="cuda")
    if heavy:
        x = x * torch.exp(2 * torch.randn(rows, k, generator=g, device="cuda"))
    x = x.to(torch.bfloat16)
    s = te_global_enc_scale(x.float().abs().amax())
    q = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=s)
    return q.packed_u8, q.sf_u8, sf_linear_to_swizzled_128x4(q.sf_u8), q.global_dec_scale()


def _run_and_bound(m, n, k, seed=0, heavy=False, **launch_kwargs):
    a_p, a_sf, a_sw, a_dec = _operand(m, k, seed, heavy=heavy)
    b_p, b_sf, b_sw, b_dec = _operand(n, k, seed + 1, heavy=heavy)
    alpha = (a_dec * b_dec).reshape(()).float()
    from kernels.sm90 import gemm_nvfp4

    y = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, **launch_kwargs)
    y64, abs_dot = nvfp4_gemm_f64(a_p, a_sf, b_p, b_sf, alpha)
    bound = gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=_backend().u_acc)
    return y, y64, bound


# The shape sweep of the bound (every GEMM path at DeepSeek-V4-Pro sizes) runs for every backend in
# test_backend_ops.py through the protocol; the path-specific checks stay here.


@pytest.mark.parametrize("use_asm", [True, False], ids=["prmt_decode", "arith_decode"])
@pytest.mark.parametrize("m,n,k", [(1, 2048, 7168), (16, 384, 1024), (300, 256, 512)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_decode_paths_agree(m, n, k, use_asm):
    y, y64, bound = _run_and_bound(m, n, k, seed=7, heavy=True, use_asm=use_asm)
    assert_within_gemm_bound(y, y64, bound, label=f"gemm sm90 use_asm={use_asm} {m}x{n}x{k}")


@pytest.mark.parametrize("m,n,k", [(3, 7168, 3072), (4, 2048, 7168), (4, 130, 1040), (3, 200, 48), (2, 16, 16)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemv_path_up_to_4_tokens_within_bound(m, n, k):
    """The CUDA-core path with an explicit key (for_shape picks it for M <= 2 only)."""
    from kernels.sm90.gemm_nvfp4 import CompileKey

    key = CompileKey._gemv(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count, None)
    y, y64, bound = _run_and_bound(m, n, k, seed=11, heavy=True, key=key)
    assert_within_gemm_bound(y, y64, bound, label=f"gemv sm90 {m}x{n}x{k}")


@pytest.mark.parametrize("use_asm", [True, False], ids=["prmt_decode", "arith_decode"])
@pytest.mark.parametrize("m,n,k,bx,by,split", [(5, 200, 48, 64, 16, 1), (16, 7168, 16384, 64, 16, 8),
                                               (33, 130, 1040, 128, 64, 3), (64, 6144, 7168, 128, 64, 6),
                                               (64, 129, 2064, 64, 64, 1), (3, 7168, 3072, 64, 16, 4)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_f16_activation_planes_within_bound_and_equal_to_fused(m, n, k, bx, by, split, use_asm):
    """The decode-size path with activations decoded once into fp16 planes (explicit key,
    row / K tails, split-K) is within the bound and bit-equal to the per-CTA-decode kernel
    with the same tiles (same products, same accumulation order)."""
    from kernels.sm90.gemm_nvfp4 import CompileKey

    warps = 8 if bx == 128 else 4
    key = CompileKey(swap_ab=True, block_x=bx, block_y=by, block_k=128, num_warps=warps, num_stages=3,
                     split=split, use_asm=use_asm, act_f16=True)
    y, y64, bound = _run_and_bound(m, n, k, seed=13, heavy=True, key=key)
    assert_within_gemm_bound(y, y64, bound, label=f"f16-planes gemm sm90 {m}x{n}x{k}")
    y_fused, _, _ = _run_and_bound(m, n, k, seed=13, heavy=True,
                                   key=CompileKey(**{**key.__dict__, "act_f16": False}))
    assert_bits_equal(y, y_fused, label=f"f16 planes vs per-CTA decode {m}x{n}x{k}")


def _exact_operand(rows, k, seed):
    """Codes with small magnitudes and block scales in {0.5, 1, 2}: every partial sum is a
    multiple of 2^-4 below 2^20, so fp32 accumulation is exact in any order."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (rows, k), generator=g, device="cuda", dtype=torch.uint8)
    codes = torch.where((codes & 7) > 5, codes & 0xB, codes)  # magnitudes <= 3
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    sf = torch.tensor([0x30, 0x38, 0x40], dtype=torch.uint8, device="cuda")[
        torch.randint(0, 3, (rows, k // 16), generator=g, device="cuda")]
    return packed, sf, sf_linear_to_swizzled_128x4(sf)


@pytest.mark.parametrize("m,n,k", [(1, 2048, 7168), (3, 7168, 3072), (16, 7168, 3072), (128, 1024, 7168),
                                   (4096, 512, 4096)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_exact_data_has_zero_error(m, n, k):
    a_p, a_sf, a_sw = _exact_operand(m, k, 1)
    b_p, b_sf, b_sw = _exact_operand(n, k, 2)
    alpha = torch.tensor(0.5, device="cuda")
    y = _backend().gemm_nvfp4(a_p, a_sw, b_p, b_sw, alpha)
    y64, _ = nvfp4_gemm_f64(a_p, a_sf, b_p, b_sf, alpha)
    assert_bits_equal(y, y64.to(torch.bfloat16), label=f"exact-data gemm {m}x{n}x{k} (one rounding to bf16)")


@pytest.mark.parametrize("m,n,k", [(1, 2048, 7168), (4, 7168, 16384), (64, 6144, 7168), (4096, 2048, 7168)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_is_deterministic_and_graph_replay_bit_identical(m, n, k):
    be = _backend()
    a_p, _, a_sw, _ = _operand(m, k, 3)
    b_p, _, b_sw, _ = _operand(n, k, 4)
    alpha = torch.tensor(1.25e-3, device="cuda")
    y1 = be.gemm_nvfp4(a_p, a_sw, b_p, b_sw, alpha)
    y2 = be.gemm_nvfp4(a_p, a_sw, b_p, b_sw, alpha)
    assert_bits_equal(y1, y2, label=f"two runs {m}x{n}x{k}")
    # capture quantize(dynamic) -> gemm, then replay on new activations and a new alpha
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xp, xsf, _s = be.quantize_nvfp4_dynamic(x)
        y_graph = be.gemm_nvfp4(xp, xsf, b_p, b_sw, alpha)
    x.copy_(torch.randn(m, k, device="cuda").to(torch.bfloat16) * 3)
    alpha.fill_(7.0e-4)
    graph.replay()
    torch.cuda.synchronize()
    xp2, xsf2, _ = be.quantize_nvfp4_dynamic(x)
    y_eager = be.gemm_nvfp4(xp2, xsf2, b_p, b_sw, alpha)
    assert_bits_equal(y_graph, y_eager, label=f"graph replay vs eager {m}x{n}x{k}")


def test_sm90_gemm_rejects_bad_shapes_without_gpu():
    from kernels.sm90 import gemm_nvfp4

    a = torch.zeros(4, 12, dtype=torch.uint8)  # K = 24, not a multiple of 16
    with pytest.raises(ValueError, match="a_packed_u8.*multiple of 16"):
        gemm_nvfp4.launch(a, torch.zeros(128, 4, dtype=torch.uint8), a, torch.zeros(128, 4, dtype=torch.uint8),
                          torch.ones(()))
    a = torch.zeros(4, 16, dtype=torch.uint8)
    b = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="b_packed_u8.*does not match"):
        gemm_nvfp4.launch(a, torch.zeros(128, 4, dtype=torch.uint8), b, torch.zeros(128, 4, dtype=torch.uint8),
                          torch.ones(()))
    with pytest.raises(ValueError, match="a_sf_swizzled_u8"):
        gemm_nvfp4.launch(a, torch.zeros(4, 2, dtype=torch.uint8), a, torch.zeros(128, 4, dtype=torch.uint8),
                          torch.ones(()))


_SANITIZER_SCRIPT = """
import torch
from kernels.sm90.api import Sm90Kernels
be = Sm90Kernels()
x = torch.randn(70, 272, device="cuda").to(torch.bfloat16)
w = torch.randn(200, 272, device="cuda").to(torch.bfloat16)
xp, xsf, s = be.quantize_nvfp4_dynamic(x)
wp, wsf, t = be.quantize_nvfp4_dynamic(w)
be.quantize_nvfp4_static(x, torch.reciprocal(s))
alpha = (1 / s) * (1 / t)
y = be.gemm_nvfp4(xp, xsf, wp, wsf, alpha)
y1 = be.gemm_nvfp4(xp[:3], xsf[:128], wp, wsf, alpha)
# the Gluon wgmma path (K % 128 == 0): in-kernel activation decode with split-K tickets (16 tokens,
# N = 2048) and the act_f16 ring (32 tokens), row tails
for m, n, k in ((16, 2048, 1024), (32, 7168, 3072), (16, 200, 384)):
    xq, xqs, s2 = be.quantize_nvfp4_dynamic(torch.randn(m, k, device="cuda").to(torch.bfloat16))
    wq, wqs, t2 = be.quantize_nvfp4_dynamic(torch.randn(n, k, device="cuda").to(torch.bfloat16))
    be.gemm_nvfp4(xq, xqs, wq, wqs, (1 / s2) * (1 / t2))
torch.cuda.synchronize()
print("sanitizer case ran", tuple(y.shape), tuple(y1.shape))
"""


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_compute_sanitizer_clean(tool):
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        pytest.skip("compute-sanitizer not found on this machine")
    from verify.config import REPO_ROOT

    r = subprocess.run([exe, "--tool", tool, "--error-exitcode", "99", sys.executable, "-c", _SANITIZER_SCRIPT],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=500)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, f"compute-sanitizer {tool} exit {r.returncode}:\n{tail}"
    assert "ERROR SUMMARY: 0 errors" in tail or "RACECHECK SUMMARY: 0 hazards" in tail, tail


# (m, n, k, warps, reps, stages, per_sm, act_f16): the wgmma path (BT = 8..64 tokens per CTA, split-K
# tickets in-kernel; activations decoded in-kernel, or once per GEMM when act_f16): token / row / K tails,
# M > 64 (two token tiles), split 1 and large splits, one and two 64-row tiles per warpgroup, two warpgroups
_WGMMA = [(3, 7168, 3072, 4, 1, 3, 4, False), (16, 2048, 7168, 4, 1, 3, 4, False), (16, 7168, 16384, 4, 2, 3, 4, False),
          (64, 6144, 7168, 4, 1, 3, 4, False), (33, 130, 1024, 4, 1, 3, 4, False), (9, 200, 384, 4, 2, 4, 4, False),
          (64, 7168, 3072, 8, 1, 3, 2, False), (40, 129, 2048, 4, 1, 2, 6, False), (1, 300, 256, 4, 1, 3, 4, False),
          (70, 2048, 1024, 4, 1, 3, 4, False), (5, 1536, 7168, 4, 1, 3, 1, False), (16, 7168, 128, 4, 1, 3, 4, False),
          (24, 7168, 7168, 4, 2, 4, 8, False),
          (16, 2048, 7168, 4, 1, 3, 4, True), (64, 6144, 7168, 4, 1, 3, 2, True), (33, 130, 1024, 4, 1, 3, 4, True),
          (70, 2048, 1024, 4, 1, 3, 4, True), (3, 7168, 3072, 4, 2, 4, 4, True), (64, 7168, 16384, 8, 1, 4, 2, True)]


def _wgmma_key(m, n, k, warps=4, reps=1, stages=3, per_sm=4, act_f16=False):
    from kernels.sm90.gemm_nvfp4 import CompileKey

    return CompileKey._wgmma(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count,
                             warps=warps, reps=reps, stages=stages, per_sm=per_sm, act_f16=act_f16)


@pytest.mark.parametrize("m,n,k,warps,reps,stages,per_sm,act_f16", _WGMMA, ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_wgmma_path_within_bound(m, n, k, warps, reps, stages, per_sm, act_f16):
    """The wgmma path, explicit key: within the fp32 accumulation bound, and the split-K tickets it
    used are back to zero afterwards."""
    from kernels.sm90 import gemm_nvfp4

    key = _wgmma_key(m, n, k, warps, reps, stages, per_sm, act_f16)
    y, y64, bound = _run_and_bound(m, n, k, seed=23, heavy=True, key=key)
    assert_within_gemm_bound(y, y64, bound, label=f"wgmma gemm sm90 {m}x{n}x{k} split {key.split}")
    if key.split > 1:
        left = gemm_nvfp4._tickets[y.device].nonzero()
        assert left == 0, f"{left} split-K tickets left non-zero after the launch (split {key.split})"


@pytest.mark.parametrize("m,n,k", [(16, 7168, 3072), (64, 2048, 1024), (5, 200, 384)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_wgmma_act_f16_matches_in_kernel_decode(m, n, k):
    """Activations decoded once per GEMM (act_f16) or in every CTA: the same B tiles reach the same
    wgmma in the same order, so the bits are identical."""
    from kernels.sm90 import gemm_nvfp4

    a_p, _, a_sw, _ = _operand(m, k, 31)
    b_p, _, b_sw, _ = _operand(n, k, 32)
    alpha = torch.tensor(1.0e-3, device="cuda")
    y0 = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=_wgmma_key(m, n, k))
    y1 = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=_wgmma_key(m, n, k, act_f16=True))
    assert_bits_equal(y1, y0, label=f"wgmma act_f16 vs in-kernel decode {m}x{n}x{k}")


@pytest.mark.parametrize("m,n,k,per_sm,act_f16", [(3, 7168, 3072, 4, False), (16, 2048, 7168, 4, False),
                                                  (64, 6144, 7168, 4, False), (16, 2048, 7168, 1000, False),
                                                  (64, 6144, 7168, 2, True), (8, 2048, 7168, 1000, True)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_wgmma_exact_data_deterministic_and_graph_replay(m, n, k, per_sm, act_f16):
    """Exact-arithmetic data gives the float64 result rounded once; two runs and CUDA-graph replays
    with new inputs and alpha are bit-identical to eager runs, replayed twice (the in-kernel split-K
    tickets reset themselves); per_sm 1000 forces the largest split."""
    from kernels.sm90 import gemm_nvfp4

    key = _wgmma_key(m, n, k, per_sm=per_sm, act_f16=act_f16)
    a_p, a_sf, a_sw = _exact_operand(m, k, 1)
    b_p, b_sf, b_sw = _exact_operand(n, k, 2)
    alpha = torch.tensor(0.5, device="cuda")
    y = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=key)
    y64, _ = nvfp4_gemm_f64(a_p, a_sf, b_p, b_sf, alpha)
    assert_bits_equal(y, y64.to(torch.bfloat16), label=f"wgmma exact-data gemm {m}x{n}x{k} split {key.split}")
    a_p, _, a_sw, _ = _operand(m, k, 3)
    y1 = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=key)
    y2 = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=key)
    assert_bits_equal(y1, y2, label=f"wgmma two runs {m}x{n}x{k}")
    src_p, src_sw = a_p.clone(), a_sw.clone()
    torch.cuda.synchronize()
    tickets = gemm_nvfp4._tickets[a_p.device]
    captured_before = tickets.captured_next
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = gemm_nvfp4.launch(src_p, src_sw, b_p, b_sw, alpha, key=key)
    if key.split > 1:  # the graph got counters of its own, never handed to another launch
        assert tickets.captured_next > captured_before, (captured_before, tickets.captured_next)
    for seed, a in ((5, 7.0e-4), (6, 3.0)):
        a2_p, _, a2_sw, _ = _operand(m, k, seed)
        src_p.copy_(a2_p)
        src_sw.copy_(a2_sw)
        alpha.fill_(a)
        graph.replay()
        torch.cuda.synchronize()
        y_eager = gemm_nvfp4.launch(a2_p, a2_sw, b_p, b_sw, alpha, key=key)
        assert_bits_equal(y_graph, y_eager, label=f"wgmma graph replay (seed {seed}) vs eager {m}x{n}x{k}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_wgmma_tickets_created_outside_capture_only():
    """The split-K ticket buffer is made by a device's first wgmma launch; a first launch inside
    CUDA-graph capture (where a zero-filled buffer would live in the graph's pool) is refused with a
    message saying what to do, and the same launch outside capture then works."""
    from kernels.sm90 import gemm_nvfp4

    m, n, k = 16, 2048, 1024
    key = _wgmma_key(m, n, k)
    assert key.split > 1, key
    a_p, a_sf, a_sw, a_dec = _operand(m, k, 41)
    b_p, b_sf, b_sw, b_dec = _operand(n, k, 42)
    alpha = (a_dec * b_dec).reshape(()).float()
    saved = gemm_nvfp4._tickets.pop(a_p.device, None)
    try:
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="outside CUDA-graph capture"):
            with torch.cuda.graph(graph):
                gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=key)
        torch.cuda.synchronize()
        y = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=key)
        assert a_p.device in gemm_nvfp4._tickets
        y64, abs_dot = nvfp4_gemm_f64(a_p, a_sf, b_p, b_sf, alpha)
        bound = gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=_backend().u_acc)
        assert_within_gemm_bound(y, y64, bound, label=f"wgmma first launch after a refused capture {m}x{n}x{k}")
    finally:
        if saved is not None:
            gemm_nvfp4._tickets[a_p.device] = saved


@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_wgmma_key_refuses_k_not_multiple_of_128():
    from kernels.sm90 import gemm_nvfp4

    a_p, _, a_sw, _ = _operand(16, 1040, 43)
    b_p, _, b_sw, _ = _operand(256, 1040, 44)
    alpha = torch.tensor(1.0, device="cuda")
    with pytest.raises(ValueError, match="K % 128 == 0, got K = 1040"):
        gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha, key=_wgmma_key(16, 256, 1024))


# ---- the predecode path's Gluon fp16 GEMM (CompileKey.f16_gemm = "gluon") against the Triton one -----------------
# (m, n, k): the bench's four shapes at M = 4096, then tails: M, N not multiples of the tiles (300 rows, 2050 and
# 130 weight rows), K not a multiple of 64 (7184 = 112.25 x 64, 1040, 80), a single K stage (48), M below 256 (the
# key explicit: every M gives the Triton kernel's bytes), more tiles than SMs with a ragged last wave
_F16_GEMM_SHAPES = [(4096, 2048, 7168), (4096, 6144, 7168), (4096, 7168, 3072), (4096, 7168, 16384),
                    (300, 2050, 7184), (257, 130, 1040), (1, 200, 80), (33, 384, 48), (2000, 4100, 1024)]
# both wgmma widths (64x256x16 and the Triton kernel's 64x128x16 twice), both decode launches
_F16_GEMM_KEYS = [dict(block_m=128, block_n=256, stages=4), dict(block_m=256, block_n=128, stages=4),
                  dict(block_m=128, block_n=256, stages=3, decode_pair=False)]


def _random_nvfp4(rows: int, k: int, seed: int):
    """Random packed codes (every E2M1 code) and finite E4M3 scales 2^-4 .. 2^2 (no NaN byte 0x7F), swizzled
    buffer sized for `rows` (what gemm_nvfp4.launch takes)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, (rows, k // 2), generator=g, device="cuda", dtype=torch.uint8)
    sf = torch.randint(0x18, 0x48, ((rows + 127) // 128 * 128, (k // 16 + 3) // 4 * 4), generator=g,
                       device="cuda", dtype=torch.uint8)
    return packed, sf


@pytest.mark.parametrize("kw", _F16_GEMM_KEYS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("m,n,k", _F16_GEMM_SHAPES, ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_gluon_f16_gemm_same_bytes_as_triton(m, n, k, kw):
    """A Gluon fp16 GEMM key gives the Triton predecode kernel's output bytes (one fp32 chain per element, the
    same k16 wgmma steps in the same order, the same epilogue), on random codes (non-zero output checked)."""
    from kernels.sm90 import gemm_nvfp4
    from kernels.sm90.gemm_nvfp4 import CompileKey

    a_p, a_sf = _random_nvfp4(m, k, 51)
    b_p, b_sf = _random_nvfp4(n, k, 52)
    alpha = torch.tensor(1.0e-3, device="cuda")
    old = CompileKey.predecode_triton()
    y_old = gemm_nvfp4.launch(a_p, a_sf, b_p, b_sf, alpha, key=old)
    assert torch.isfinite(y_old.float()).all() and (y_old != 0).float().mean() > 0.9, f"degenerate output {m}x{n}x{k}"
    y = gemm_nvfp4.launch(a_p, a_sf, b_p, b_sf, alpha, key=CompileKey.predecode_gluon(**kw))
    assert_bits_equal(y, y_old, label=f"gluon f16 GEMM {kw} vs triton {m}x{n}x{k}")


@pytest.mark.parametrize("m,n,k", [(4096, 2048, 7168), (300, 2050, 7184)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_sm90_gemm_gluon_f16_gemm_graph_replay_equals_eager(m, n, k):
    """The Gluon key captured into a CUDA graph (descriptors and decoded operands from the graph's pool), replayed
    on new activation bytes and a new alpha: the bytes of an eager launch on the same inputs."""
    from kernels.sm90 import gemm_nvfp4
    from kernels.sm90.gemm_nvfp4 import CompileKey

    key = CompileKey.predecode_gluon()
    a_p, a_sf = _random_nvfp4(m, k, 61)
    b_p, b_sf = _random_nvfp4(n, k, 62)
    alpha = torch.tensor(1.0e-3, device="cuda")
    gemm_nvfp4.launch(a_p, a_sf, b_p, b_sf, alpha, key=key)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = gemm_nvfp4.launch(a_p, a_sf, b_p, b_sf, alpha, key=key)
    a2_p, a2_sf = _random_nvfp4(m, k, 63)
    a_p.copy_(a2_p)
    a_sf.copy_(a2_sf)
    alpha.fill_(7.0e-4)
    graph.replay()
    torch.cuda.synchronize()
    y_eager = gemm_nvfp4.launch(a2_p, a2_sf, b_p, b_sf, alpha, key=key)
    assert (y_eager != 0).float().mean() > 0.9, f"degenerate output {m}x{n}x{k}"
    assert_bits_equal(y_graph, y_eager, label=f"gluon f16 GEMM graph replay vs eager {m}x{n}x{k}")
    y_old = gemm_nvfp4.launch(a2_p, a2_sf, b_p, b_sf, alpha, key=CompileKey.predecode_triton())
    assert_bits_equal(y_graph, y_old, label=f"gluon f16 GEMM graph replay vs triton {m}x{n}x{k}")


def test_sm90_gemm_f16_gemm_key_rules_without_gpu():
    """The routing: the Triton fp16 GEMM at M 256 .. 511, the Gluon one (128 x 256, 4 stages, one decode launch)
    from M 512 (Triton again without the inline-asm decode); a Gluon key needs the predecode path's shape of key."""
    import dataclasses

    from kernels.sm90 import gemm_nvfp4
    from kernels.sm90.gemm_nvfp4 import CompileKey

    for n, k in [(2048, 7168), (6144, 7168), (7168, 3072), (7168, 16384)]:
        for m in (256, 511):
            key = CompileKey.for_shape(m, n, k)
            assert key == CompileKey.predecode_triton() and key.f16_gemm == "triton" and not key.decode_pair, key
        for m in (512, 4096, 65536):
            key = CompileKey.for_shape(m, n, k)
            assert key == CompileKey.predecode_gluon() and key.decode_pair, key
        key = CompileKey.for_shape(4096, n, k, use_asm=False)
        assert key.predecode and key.f16_gemm == "triton" and not key.use_asm, key
    key = CompileKey.predecode_gluon()
    assert (key.predecode, key.f16_gemm, key.block_x, key.block_y, key.block_k, key.num_stages) == (
        True, "gluon", 128, 256, 64, 4)
    # each refusal names the field (one line), before anything compiles
    for field, bad in (("f16_gemm", dict(f16_gemm="cublas")), ("predecode", dict(predecode=False)),
                       ("block_k", dict(block_k=128)), ("num_warps", dict(num_warps=4)), ("split", dict(split=2)),
                       ("block_x", dict(block_x=64)), ("block_y", dict(block_y=64)),
                       ("block_x", dict(block_x=256, block_y=256)),
                       ("num_stages", dict(num_stages=5)), ("num_stages", dict(num_stages=1))):
        with pytest.raises(ValueError, match=rf"^CompileKey\.{field}: [^\n]*$"):
            gemm_nvfp4._check_f16_gemm(dataclasses.replace(key, **bad))
    # rings of 147456, 196608 and 163840 B of tiles (plus 16 B of barriers a stage)
    for ok in (dict(num_stages=3), dict(block_x=256, block_y=128), dict(block_y=128, num_stages=5)):
        gemm_nvfp4._check_f16_gemm(dataclasses.replace(key, **ok))


def test_sm90_gemm_f16_gemm_key_refused_before_compiling():
    """_compile (every launch's first step) applies those rules before it builds anything."""
    import dataclasses

    pytest.importorskip("triton", reason="the launcher imports triton (the README's CPU venv has none)")
    from kernels.sm90 import gemm_nvfp4

    with pytest.raises(ValueError, match=r"^CompileKey\.num_stages: "):
        gemm_nvfp4._compile(dataclasses.replace(gemm_nvfp4.CompileKey.predecode_gluon(), num_stages=5))


# ---------------------------------------------------------------------------------------------------------------
# Batch invariance of the dense NVFP4 GEMM (DESIGN: a token's bits do not depend on the other tokens or on M). The
# paths CompileKey.for_shape picks by M sum K in different orders: the CUDA-core GEMV (M <= 2) per-column
# accumulators, the wgmma paths a K split that depends on M (14 at M 16, 8 at M 32, ...), the fp16 GEMM (M >= 256)
# one chain. Measured on an H100 (2026-12-07, session 10; heavy-tailed activations, static scale): against the M = 512
# batch, 1 of 2048 outputs of a lone row differs at N x K 2048 x 7168, 190 of 114688 at M 16 for 7168 x 16384, none
# at M 256 / 511 (the same fp16-GEMM path). Strict xfail: the test documents the defect and fails once it is fixed
# (then drop the mark). The layer verdict's batch check runs the same comparison on a fixture's rows
# (verify.verdicts.checks.row_batch).

@pytest.mark.xfail(strict=True, reason="sm90 dense NVFP4: the path and its K split depend on M (session 10, H100)")
@pytest.mark.parametrize("n,k", [(2048, 7168), (7168, 3072)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_dense_row_bits_do_not_depend_on_m(n, k):
    from kernels.sm90 import gemm_nvfp4

    a_p, a_sf, a_sw, a_dec = _operand(512, k, 11, heavy=True)
    b_p, _, b_sw, b_dec = _operand(n, k, 12, heavy=True)
    alpha = (a_dec * b_dec).reshape(()).float()
    full = gemm_nvfp4.launch(a_p, a_sw, b_p, b_sw, alpha)
    for m in (1, 2, 3, 16, 64, 128, 256):
        y = gemm_nvfp4.launch(a_p[:m].contiguous(), sf_linear_to_swizzled_128x4(a_sf[:m].contiguous()), b_p, b_sw,
                              alpha)
        assert_bits_equal(y.cpu(), full[:m].cpu(), label=f"rows 0..{m - 1} as a batch of {m} vs in a batch of 512, "
                                                         f"N x K {n} x {k}")
