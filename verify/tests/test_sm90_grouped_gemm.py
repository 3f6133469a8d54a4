"""sm90 grouped (MoE) NVFP4 GEMM (kernels.sm90.grouped_gemm_nvfp4) against float64 on the same bytes.

Verdicts (DESIGN "Verdicts"):
- grouped GEMM and the L1 gate/up halves: every element within gamma(K+1, 2^-24) * |alpha_e| * sum|a_k w_k|
  plus half an ulp of the output dtype of the float64 product of the checkpoint-format bytes
  (references.gemm.nvfp4_grouped_gemm_f64, independent of the kernel's decode and swizzle);
- the fused L1 + SwiGLU + requant epilogue: h is not visible, so each 16-element block (scale byte and
  codes) must equal the emulator's quantization (te, static S = 1 / input_scale) of bf16(h) for h the
  exact clamped SwiGLU of the kernel's own (bound-checked) gate/up, or of h moved by 2^-18 relative
  either way (the kernel evaluates h in float32: a bf16 rounding boundary within that distance may go
  either way). Padding and capacity rows zero.

CPU: the cases run under the Triton interpreter (TRITON_INTERPRET=1, portable decode) in child
processes (the interpreter is chosen when Triton kernels are defined, so it cannot share a process
with compiled kernels; two side by side, verify/tests/_interpreter_children.py). GPU (markers gpu, sm90): the same checks with the PTX decode at larger shapes,
every token-tile config bit-identical, an expert's rows alone vs among all, two runs identical, CUDA
graph captured at capacity and replayed with a new routing and new values bit-identical to eager,
garbage in the scale padding changing nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys

import pytest
import torch

from references.codecs import round_f64_to
from references.gemm import grouped_gemm_error_bound, nvfp4_grouped_gemm_f64
from references.layouts import grouped_padded_offsets, sf_grouped_linear_to_swizzled_128x4, sf_grouped_swizzled_128x4_to_linear
from references.moe import requant as ref_requant, swiglu as ref_swiglu
from references.nvfp4 import quantize_nvfp4, te_global_enc_scale, unpack_e2m1x2_low_first
from references.recipes import TE
from verify.assertions import assert_bits_equal, assert_within_gemm_bound
from verify.tests._interpreter_children import child_main, run_cases
from verify.tests._sass import _cuobjdump, registers_without_spills

GPU = [pytest.mark.gpu, pytest.mark.sm90]
U_ACC = 2.0**-24  # the sm90 backend's declared accumulator (fp16 MMA, fp32 accumulation)


# ----------------------------------------------------------------------------------------- cases


def _offsets(counts: list[int], device) -> torch.Tensor:
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return off.to(device)


def _acts(counts: list[int], rcap: int, k: int, seed: int, device, *, extra_sf_rows: int = 128, spread: float = 1.0):
    """NVFP4 activations of sum(counts) rows (te, one global scale), packed [rcap, K/2] with random bytes
    in the capacity rows (never read), grouped swizzled scales with extra_sf_rows zero rows appended.
    spread widens the magnitudes (exp(spread * randn)): fp32 sums that round, so the MMA order shows."""
    g = torch.Generator().manual_seed(seed)
    r = sum(counts)
    x = torch.randn(r, k, generator=g) * torch.exp(spread * torch.randn(r, k, generator=g))
    x = x.to(torch.bfloat16).to(device)
    q = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=te_global_enc_scale(x.float().abs().amax()))
    off = _offsets(counts, device)
    sw, _ = sf_grouped_linear_to_swizzled_128x4(q.sf_u8, off)
    sw = torch.cat([sw, torch.zeros(extra_sf_rows, sw.shape[1], dtype=torch.uint8, device=device)])
    packed = torch.randint(0, 256, (rcap, k // 2), generator=g, dtype=torch.uint8).to(device)
    packed[:r] = q.packed_u8
    a_dec = (0.5 + torch.rand(len(counts), generator=g)).float().to(device) * 0.01
    return dict(packed=packed, sf_sw=sw.contiguous(), sf_lin=q.sf_u8, dec=a_dec, off=off, r=r, rcap=rcap, k=k)


def _refill(counts, rcap, k, dev, packed, sf, dec, off):
    """New routing and activations (_acts of `counts`, decode scales x 3) copied into a captured graph's input
    buffers in place; returns the _acts dict."""
    b = _acts(counts, rcap, k, sum(counts), dev)
    packed.copy_(b["packed"])
    sf.zero_()
    sf[:b["sf_sw"].shape[0]].copy_(b["sf_sw"])
    dec.copy_(b["dec"] * 3)
    off.copy_(b["off"].to(torch.int32))
    return b


def _stack(e: int, n: int, k: int, seed: int, device):
    """Random checkpoint-format NVFP4 expert stack: packed [E, N, K/2], E4M3 scales [E, N, K/16] (finite,
    2^-4 .. 2^1), weight_scale_2 [E]."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    sf = torch.randint(0x18, 0x40, (e, n, k // 16), generator=g, dtype=torch.uint8)
    s2 = (0.5 + torch.rand(e, generator=g)).float() * 0.02
    return packed.to(device), sf.to(device), s2.to(device)


def _bound_check(label: str, y: torch.Tensor, a: dict, w: tuple, alpha_f32: torch.Tensor) -> float:
    r = a["r"]
    y64, abs_dot = nvfp4_grouped_gemm_f64(a["packed"][:r], a["sf_lin"], w[0], w[1], a["off"], alpha_f32)
    bound = grouped_gemm_error_bound(abs_dot, y64, alpha_f32, a["off"], k=a["k"], u_acc=U_ACC, out_dtype=y.dtype)
    ratio = assert_within_gemm_bound(y[:r], y64, bound, label=label)
    assert not y[r:].any(), f"{label}: capacity rows {r}..{y.shape[0]} are not zero"
    return ratio


def _gg():
    from kernels.sm90 import grouped_gemm_nvfp4

    return grouped_gemm_nvfp4


def check_plain(device, *, counts, rcap, n, k, seed=0, use_asm=None, key=None) -> str:
    gg = _gg()
    a = _acts(counts, rcap, k, seed, device)
    w = _stack(len(counts), n, k, seed + 1, device)
    y = gg.grouped_gemm(a["packed"], a["sf_sw"], a["dec"], a["off"].to(torch.int32), gg.prepare_experts(*w),
                        use_asm=use_asm, key=key)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (rcap, n)
    ratio = _bound_check(f"grouped_gemm {counts} N={n} K={k}", y, a, w, a["dec"] * w[2])
    return f"ok (max |y - y64| / bound = {ratio:.3g})"


def _l1_case(device, counts, rcap, i, k, seed):
    gg = _gg()
    a = _acts(counts, rcap, k, seed, device)
    w1 = _stack(len(counts), i, k, seed + 1, device)
    w3 = _stack(len(counts), i, k, seed + 2, device)
    return gg, a, w1, w3, gg.prepare_gate_up(*w1, *w3)


def check_l1(device, *, counts, rcap, i, k, seed=0, use_asm=None, key=None) -> str:
    gg, a, w1, w3, w13 = _l1_case(device, counts, rcap, i, k, seed)
    gate, up = gg.grouped_gemm_l1(a["packed"], a["sf_sw"], a["dec"], a["off"].to(torch.int32), w13,
                                  use_asm=use_asm, key=key)
    assert gate.dtype == up.dtype == torch.float32 and tuple(gate.shape) == tuple(up.shape) == (rcap, i)
    rg = _bound_check("l1 gate", gate, a, w1, a["dec"] * w1[2])
    ru = _bound_check("l1 up", up, a, w3, a["dec"] * w3[2])
    return f"ok (gate {rg:.3g}, up {ru:.3g})"


def check_fused(device, *, counts, rcap, i, k, seed=0, clamp=True, use_asm=None, key=None) -> str:
    gg, a, w1, w3, w13 = _l1_case(device, counts, rcap, i, k, seed)
    off32 = a["off"].to(torch.int32)
    gate, up = gg.grouped_gemm_l1(a["packed"], a["sf_sw"], a["dec"], off32, w13, use_asm=use_asm)
    r = a["r"]
    _bound_check("l1 gate", gate, a, w1, a["dec"] * w1[2])
    _bound_check("l1 up", up, a, w3, a["dec"] * w3[2])
    g, u = gate[:r], up[:r]
    limit = float(torch.quantile(u.abs().double().cpu(), 0.7)) if clamp else None
    h64 = ref_swiglu(g, u, limit=limit, row_weight_f32=None, mode="high")
    e = len(counts)
    s2 = torch.zeros(e, dtype=torch.float32, device=device)
    for j in range(e):  # the w2 input_scale: about the amax of the expert's h / 2688 (some blocks saturate)
        lo, hi = int(a["off"][j]), int(a["off"][j + 1])
        s2[j] = float(h64[lo:hi].abs().max()) * 0.9 / 2688 if hi > lo else 1.0
    hp, hsf, hdec = gg.grouped_l1_swiglu_requant(a["packed"], a["sf_sw"], a["dec"], off32, w13, swiglu_limit=limit,
                                                 h_input_dec_scale_f32=s2, use_asm=use_asm, key=key)
    assert_bits_equal(hdec.cpu(), s2.cpu(), label="h_dec_f32 (the w2 input_scale)")
    assert tuple(hp.shape) == (rcap, i // 2) and hp.dtype == torch.uint8
    assert not hp[r:].any(), "fused: capacity rows of h_packed_u8 are not zero"
    rs = hsf.shape[0]
    assert rs == gg.grouped_sf_rows(rcap, e) and hsf.shape[1] == -(-(i // 16) // 4) * 4
    used = int(grouped_padded_offsets(a["off"])[-1])
    sf_got = sf_grouped_swizzled_128x4_to_linear(hsf[:used], a["off"], cols=i // 16)
    rebuilt, _ = sf_grouped_linear_to_swizzled_128x4(sf_got, a["off"])
    assert_bits_equal(hsf[:used].cpu(), rebuilt.cpu(), label="h_sf_u8 (expert padding rows must be zero)")
    assert not hsf[used:].any(), "h_sf_u8: rows past the experts' padded total must be zero"
    codes_got = unpack_e2m1x2_low_first(hp[:r]).view(r, i // 16, 16)
    ok = torch.zeros(r, i // 16, dtype=torch.bool, device=device)
    moved = 0
    for rel in (0.0, -(2.0**-18), 2.0**-18):
        hb = round_f64_to(h64 * (1.0 + rel), torch.bfloat16)
        q = ref_requant(hb, a["off"], recipe=TE, act_scale="static", input_scale_f32=s2)
        cq = unpack_e2m1x2_low_first(q.packed_u8).view(r, i // 16, 16)
        match = (q.sf_u8 == sf_got) & (cq == codes_got).all(-1)
        if rel != 0.0:
            moved += int((match & ~ok).sum())
        ok |= match
    if not ok.all():
        bad = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"fused: {int((~ok).sum())} of {ok.numel()} blocks match no quantization of bf16(h) "
                             f"near the exact SwiGLU; first (row, block) {bad}: scale byte {int(sf_got[bad[0], bad[1]])}, "
                             f"codes {codes_got[bad[0], bad[1]].tolist()}")
    return f"ok ({ok.numel()} blocks, {moved} matched only with h moved by 2^-18)"


# ------------------------------------------------------------------------------ interpreter (CPU)

_INTERP_CASES = {
    "plain_zero_token_experts_capacity_rows_k_tail": (check_plain, dict(counts=[3, 0, 20, 1, 0], rcap=30, n=48, k=160)),
    "plain_one_hot_expert_two_column_tiles": (check_plain, dict(counts=[0, 0, 37, 0], rcap=40, n=130, k=96, seed=3)),
    "plain_tokens_tile_32": (check_plain, dict(counts=[40, 0, 30], rcap=80, n=64, k=64, seed=5)),
    "plain_tokens_tile_64_act_f16": (check_plain, dict(counts=[70, 0, 60], rcap=140, n=64, k=160, seed=6)),
    "l1_gate_up_own_scales": (check_l1, dict(counts=[5, 0, 17], rcap=25, i=32, k=64, seed=7)),
    "fused_swiglu_requant_clamped": (check_fused, dict(counts=[5, 0, 17, 2], rcap=26, i=64, k=64, seed=9)),
    "fused_swiglu_requant_tile_64_act_f16": (check_fused, dict(counts=[60, 0, 55], rcap=120, i=32, k=64, seed=10)),
    "fused_swiglu_requant_no_limit": (check_fused, dict(counts=[0, 12, 3], rcap=16, i=32, k=48, seed=11, clamp=False)),
}


def _interp_case(fn, kw: dict) -> str:
    """One interpreter case on the CPU (TRITON_INTERPRET=1 set by the parent): its "ok ..." line, or raises."""
    msg = fn(torch.device("cpu"), use_asm=False, **kw)
    if not msg.startswith("ok"):
        raise AssertionError(msg)
    return msg


# CPU seconds of the longest cases (a CI-like 2-core host; the others take under 1 s): how the cases are dealt to the
# interpreter children depends on them, nothing else
_INTERP_CPU_SECONDS = {"big_path_bits_zero_token_experts_capacity_rows_k_tail": 4.9,
                       "big_path_bits_rows_of_next_expert_in_tile": 4.5,
                       "big_k128_exact_data_equals_the_two_mma_variant": 4.3,
                       "big_k128_exact_data_rows_of_next_expert_in_tile": 6.1,
                       "big_k128_exact_data_equals_the_present_path": 6.1,
                       "fragment_order_bits_routed_triton_keys": 5.9,
                       "fragment_order_bits_large_token_triton_keys": 5.4}


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_cases(__file__, list(_INTERP_CASES), tmp_path_factory.mktemp("sm90_grouped"),
                     cpu_seconds=_INTERP_CPU_SECONDS)


@pytest.mark.parametrize("case", list(_INTERP_CASES))
def test_grouped_gemm_interpreter(interpreter_results, case):
    r = interpreter_results[case]
    assert r["ok"], r["message"]


def test_bad_inputs_are_refused_with_the_argument_named():
    gg = _gg()
    w = gg.prepare_experts(*_stack(2, 32, 64, 0, "cpu"))
    a = _acts([3, 1], 4, 64, 0, "cpu")
    off = a["off"].to(torch.int32)
    with pytest.raises(ValueError, match="a_packed_u8: K = 32 does not match"):
        gg.grouped_gemm(a["packed"][:, :16].contiguous(), a["sf_sw"], a["dec"], off, w)
    with pytest.raises(ValueError, match="offsets_i32"):
        gg.grouped_gemm(a["packed"], a["sf_sw"], a["dec"], a["off"], w)
    with pytest.raises(ValueError, match="a_sf_u8"):
        gg.grouped_gemm(a["packed"], a["sf_sw"][:100], a["dec"], off, w)
    with pytest.raises(ValueError, match="a_dec_f32"):
        gg.grouped_gemm(a["packed"], a["sf_sw"], a["dec"].double(), off, w)
    with pytest.raises(ValueError, match="gate/up"):
        gg.grouped_gemm_l1(a["packed"], a["sf_sw"], a["dec"], off, w)
    with pytest.raises(ValueError, match="w1.weight: K = 24 must be a multiple of 16"):
        gg.prepare_gate_up(torch.zeros(2, 8, 12, dtype=torch.uint8), torch.zeros(2, 8, 1, dtype=torch.uint8),
                           torch.ones(2), *_stack(2, 8, 64, 0, "cpu"))
    with pytest.raises(ValueError, match="weight_scale: expected E4M3 bytes"):
        gg.prepare_experts(torch.zeros(2, 8, 32, dtype=torch.uint8), torch.zeros(2, 8, 3, dtype=torch.uint8),
                           torch.ones(2))


def test_grouped_sf_rows_bounds_every_routing():
    gg = _gg()
    g = torch.Generator().manual_seed(0)
    for rcap, e in ((1, 384), (96, 384), (300, 7), (4096, 16)):
        for _ in range(20):
            ids = torch.randint(0, e, (int(torch.randint(0, rcap + 1, (1,), generator=g)),), generator=g)
            counts = torch.bincount(ids, minlength=e)
            need = int(((counts + 127) // 128 * 128).sum())
            assert need <= gg.grouped_sf_rows(rcap, e)


def test_gate_up_interleave_is_by_row():
    gg = _gg()
    w1, w3 = _stack(2, 8, 32, 1, "cpu"), _stack(2, 8, 32, 2, "cpu")
    from kernels.sm90.host_prepare_experts import from_fragment_order

    for frag in (False, True):  # the interleave acts on rows; the fragment order permutes bits inside each row
        w13 = gg.prepare_gate_up(*w1, *w3, fragment_order=frag)
        packed = from_fragment_order(w13.packed_u8) if frag else w13.packed_u8
        assert torch.equal(packed[:, 0::2], w1[0]) and torch.equal(packed[:, 1::2], w3[0]), frag
        assert torch.equal(w13.dec_scale_f32, torch.stack([w1[2], w3[2]], 1))


# ----------------------------------------------------------------------------------------- GPU


def _cuda():
    return torch.device("cuda")


@pytest.mark.parametrize("use_asm", [True, False], ids=["prmt_decode", "arith_decode"])
@pytest.mark.parametrize("counts,rcap", [([0, 1, 0, 2, 1, 0, 0, 1], 8), ([9, 0, 300, 17, 0, 1, 128, 60], 600),
                                         ([0, 0, 0, 700, 0, 0, 0, 0], 710)], ids=["decode", "mixed", "hot"])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_grouped_gemm_bound(counts, rcap, use_asm):
    assert check_plain(_cuda(), counts=counts, rcap=rcap, n=1024, k=1536, seed=21, use_asm=use_asm).startswith("ok")
    assert check_l1(_cuda(), counts=counts, rcap=rcap, i=384, k=1040, seed=22, use_asm=use_asm).startswith("ok")
    assert check_fused(_cuda(), counts=counts, rcap=rcap, i=384, k=1024, seed=23, use_asm=use_asm).startswith("ok")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_token_tiles_bit_identical_and_deterministic():
    """Every token-tile config (BT 16..128) gives the same bits (the per-element MMA sequence does not depend on
    the tile), so an expert's rows do not depend on the routing of the others; two runs give the same bytes."""
    gg = _gg()
    counts = [3, 0, 150, 1, 64, 0, 17, 33]
    a = _acts(counts, 300, 2048, 31, _cuda())
    w = gg.prepare_experts(*_stack(8, 768, 2048, 32, _cuda()))
    off = a["off"].to(torch.int32)
    args = (a["packed"], a["sf_sw"], a["dec"], off, w)
    outs = {}
    for bn, bt, act_f16 in ((128, 16, False), (128, 32, False), (128, 64, False), (128, 128, False), (128, 64, True),
                            (128, 128, True), (64, 16, False), (64, 64, True), (64, 32, False)):
        key = gg.CompileKey(epi=0, block_n=bn, block_t=bt, num_warps=4 if bt <= 32 else 8, num_stages=3, e_pad=16,
                            act_f16=act_f16)
        outs[bn, bt, act_f16] = gg.grouped_gemm(*args, key=key)
    for cfg, y in outs.items():
        assert_bits_equal(y.cpu(), outs[128, 16, False].cpu(), label=f"tile (BN, BT, act_f16) {cfg} vs (128, 16, False)")
    outs[16] = outs[128, 16, False]
    assert_bits_equal(gg.grouped_gemm(*args).cpu(), gg.grouped_gemm(*args).cpu(), label="two runs")
    # expert 2 alone (its own buffers, other experts empty) vs among all
    lo, hi = int(a["off"][2]), int(a["off"][3])
    sub_off = torch.zeros_like(a["off"])
    sub_off[3:] = hi - lo
    sw, _ = sf_grouped_linear_to_swizzled_128x4(a["sf_lin"][lo:hi], sub_off)
    alone = gg.grouped_gemm(a["packed"][lo:hi].contiguous(), sw, a["dec"], sub_off.to(torch.int32), w)
    assert_bits_equal(alone.cpu(), outs[16][lo:hi].cpu(), label="expert 2 alone vs among all")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_scale_padding_is_never_read():
    gg = _gg()
    counts = [5, 0, 130, 2]
    a = _acts(counts, 140, 1040, 41, _cuda())  # K/16 = 65: 3 padding columns per row
    w = gg.prepare_experts(*_stack(4, 256, 1040, 42, _cuda()))
    off = a["off"].to(torch.int32)
    ref = gg.grouped_gemm(a["packed"], a["sf_sw"], a["dec"], off, w)
    real, _ = sf_grouped_linear_to_swizzled_128x4(torch.ones_like(a["sf_lin"]), a["off"])
    pad = torch.ones_like(a["sf_sw"], dtype=torch.bool)
    pad[:real.shape[0]] = real == 0
    for fill in (0xFF, 0x7F):
        sf = torch.where(pad, torch.full_like(a["sf_sw"], fill), a["sf_sw"])
        assert_bits_equal(gg.grouped_gemm(a["packed"], sf, a["dec"], off, w).cpu(), ref.cpu(),
                          label=f"scale padding filled with {fill:#x}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_cuda_graph_replay_new_routing_equals_eager():
    """Captured at capacity with one routing, replayed with another (zero-token experts, one hot expert, fewer
    rows) and new values: every output byte equals an eager call on the new inputs."""
    gg = _gg()
    dev = _cuda()
    e, k, i, rcap = 8, 1024, 256, 256
    a = _acts([40, 0, 60, 10, 0, 90, 30, 26], rcap, k, 51, dev)
    w13 = gg.prepare_gate_up(*_stack(e, i, k, 52, dev), *_stack(e, i, k, 53, dev))
    w2 = gg.prepare_experts(*_stack(e, 512, i, 54, dev))
    packed, dec, off = a["packed"].clone(), a["dec"].clone(), a["off"].to(torch.int32)
    sf = torch.zeros(gg.grouped_sf_rows(rcap, e), a["sf_sw"].shape[1], dtype=torch.uint8, device=dev)
    sf[:a["sf_sw"].shape[0]].copy_(a["sf_sw"])
    s2 = torch.full((e,), 0.01, dtype=torch.float32, device=dev)
    h_packed = torch.zeros(rcap, i // 2, dtype=torch.uint8, device=dev)
    h_sf_static = torch.zeros(gg.grouped_sf_rows(rcap, e), -(-(i // 16) // 4) * 4, dtype=torch.uint8, device=dev)

    def step():
        gate, up = gg.grouped_gemm_l1(packed, sf, dec, off, w13)
        hp, hsf, hdec = gg.grouped_l1_swiglu_requant(packed, sf, dec, off, w13, swiglu_limit=10.0,
                                                     h_input_dec_scale_f32=s2)
        y = gg.grouped_gemm(h_packed, h_sf_static, hdec, off, w2)
        return gate, up, hp, hsf, y

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for counts in ([0, 0, 0, 200, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 2, 0], [30, 30, 30, 30, 30, 30, 30, 46]):
        b = _refill(counts, rcap, k, dev, packed, sf, dec, off)
        hb = b["packed"][:, : i // 2].flip(0).contiguous()
        h_packed.copy_(hb)
        h_sf_static.zero_()
        hs, _ = sf_grouped_linear_to_swizzled_128x4(torch.full((b["r"], i // 16), 0x38, dtype=torch.uint8, device=dev),
                                                    b["off"])
        h_sf_static[:hs.shape[0]].copy_(hs)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, got, want in zip(("gate", "up", "h_packed", "h_sf", "l2"), outs, eager):
            assert_bits_equal(got.cpu(), want.cpu(), label=f"graph replay vs eager, {name}, counts {counts}")


@pytest.mark.parametrize("e,r,c", [(3, 130, 7), (2, 64, 4), (1, 256, 9)], ids=lambda v: str(v))
def test_host_swizzle_of_dense_and_stack_equals_the_references_layout(e, r, c):
    """kernels/sm90's one 128x4 swizzle (host_prepare.swizzle_128x4: [R, C] or a stack [E, R, C]) against
    the references' independent layout code, padding rows/columns included."""
    from kernels.sm90.host_prepare import swizzle_128x4
    from kernels.sm90.host_prepare_experts import swizzle_128x4_stack
    from references.layouts import sf_linear_to_swizzled_128x4
    from verify.assertions import assert_bytes_equal

    x = torch.randint(0, 256, (e, r, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(e * r + c))
    stack = swizzle_128x4_stack(x)
    for i in range(e):
        expected = sf_linear_to_swizzled_128x4(x[i])
        assert_bytes_equal(stack[i], expected, label=f"swizzle_128x4_stack expert {i}")
        assert_bytes_equal(swizzle_128x4(x[i]), expected, label=f"swizzle_128x4 expert {i}")


# ------------------------------------------------------- large-token path (issue 25 item 2): bits = present path
# CompileKey.big: the activations decoded once into fp16 planes (read by TMA), only the weights decoded per tile,
# larger token tiles. It must give the present path's bytes on every output (a row's bits may not depend on
# which path its batch size picks: DESIGN's batch invariance). The interpreter proves the data flow on the CPU
# (same fp16 operand values and k order into the same two MMAs per K tile; tl.dot there is numpy's); the GPU
# tests below prove it for the tensor cores.


def _e_pad(num_experts: int) -> int:
    return max(16, 1 << (num_experts - 1).bit_length())  # as CompileKey.for_shape pads the expert count


def _present_key(epi: int, bt: int, e: int, *, use_asm, clamp=False, bn=128):
    gg = _gg()
    return gg.CompileKey(epi=epi, block_n=bn, block_t=bt, num_warps=4 if bt <= 32 else 8, num_stages=3,
                         e_pad=_e_pad(e), use_asm=use_asm, clamp=clamp)


def _big_key(epi: int, bt: int, e: int, *, use_asm, clamp=False, bn=128, k128=False):
    gg = _gg()
    return gg.CompileKey(epi=epi, block_n=bn, block_t=bt, num_warps=8, num_stages=4 if bt <= 128 else 2,
                         e_pad=_e_pad(e), use_asm=use_asm, clamp=clamp, big=True, k128=k128)


def _exact_acts(counts, rcap: int, k: int, seed: int, device) -> dict:
    """_acts' layout with random codes and every scale byte 0x38 (1.0): all products are multiples of 2^-16 (in the
    kernels' 2^-14 decode units, e2m1 x e2m1 = multiples of 1/4) far below 2^24 of them, so every fp32 sum is exact
    in any order and any split of K: two paths agree bit for bit exactly when they pair the same weight and token
    values (the k map), whatever the MMA order (the interpreter's tl.dot is numpy's matmul)."""
    g = torch.Generator().manual_seed(seed)
    r = sum(counts)
    off = _offsets(counts, device)
    sf_lin = torch.full((r, k // 16), 0x38, dtype=torch.uint8, device=device)
    sw, _ = sf_grouped_linear_to_swizzled_128x4(sf_lin, off)
    sw = torch.cat([sw, torch.zeros(128, sw.shape[1], dtype=torch.uint8, device=device)])
    packed = torch.randint(0, 256, (rcap, k // 2), generator=g, dtype=torch.uint8).to(device)
    a_dec = (0.5 + torch.rand(len(counts), generator=g)).float().to(device) * 0.01
    return dict(packed=packed, sf_sw=sw.contiguous(), sf_lin=sf_lin, dec=a_dec, off=off, r=r, rcap=rcap, k=k)


def _exact_stack(e: int, n: int, k: int, seed: int, device):
    """Random codes, every scale byte 0x38 (1.0): see _exact_acts."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    s2 = (0.5 + torch.rand(e, generator=g)).float() * 0.02
    return packed.to(device), torch.full((e, n, k // 16), 0x38, dtype=torch.uint8, device=device), s2.to(device)


def _wide_stack(e: int, n: int, k: int, seed: int, device):
    """_stack with E4M3 scales over the whole finite range (subnormals .. 448): products far apart in magnitude,
    so the fp32 sums round and a change of the per-element MMA order changes bits."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    sf = torch.randint(0x01, 0x7F, (e, n, k // 16), generator=g, dtype=torch.uint8)
    s2 = (0.5 + torch.rand(e, generator=g)).float() * 0.02
    return packed.to(device), sf.to(device), s2.to(device)


def check_big_path_bits(device, *, counts, rcap, n, k, seed=0, use_asm=None, present_bt=None, big_bts=(16, 128),
                        epis=(0, 1, 2), big_bn=128, k128=False, versus="present", exact=False, wgmma=False,
                        rows_per_wg=1, present_bn=None) -> str:
    """Every output of the large-token path (each BT in big_bts, BN big_bn; k128: its one-MMA-per-tile variant)
    equals the present path's bit for bit: plain bf16 [Rcap, N], gate/up float32 [Rcap, N/2 each], fused h packed
    + grouped scales + h_dec. The present path runs with token tile present_bt, or (None) with the same (BN, BT)
    as each big tile: under the interpreter tl.dot is numpy's matmul, whose sums depend on the tile shape, so
    only equal tiles compare there; on the GPU the tile does not change an element's MMA sequence and any BT
    compares. versus="big": the reference is the large-token path's two-MMA variant instead (same tile). exact:
    operands whose every sum is exact (_exact_acts), which is what the interpreter can prove for k128 (one K = 128
    numpy matmul is not the sum of two K = 64 ones on rounding data). The plain output also meets the float64
    bound (two identical wrong answers cannot pass). wgmma: the large-token path's register-fed Gluon variant
    (BigWgmmaKey, BN = big_bn = 16 x warps x rows_per_wg; GPU only) instead of the Triton kernel. present_bn: the
    present path's BN when not big_bn (its Triton kernel has no 256-row tile; on the GPU BN does not change an
    element's MMA sequence)."""
    gg = _gg()
    a = (_exact_acts(counts, rcap, k, seed, device) if exact else _acts(counts, rcap, k, seed, device, spread=3.0))
    stack = _exact_stack if exact else _wide_stack
    off = a["off"].to(torch.int32)
    args = (a["packed"], a["sf_sw"], a["dec"], off)
    asm = (device.type == "cuda") if use_asm is None else use_asm
    e = len(counts)

    def present(epi, bt, clamp=False):
        if versus == "big":
            return _big_key(epi, bt, e, use_asm=asm, clamp=clamp, bn=big_bn)
        return _present_key(epi, present_bt or bt, e, use_asm=asm, clamp=clamp, bn=present_bn or big_bn)

    def big(epi, bt, clamp=False):
        if wgmma:
            return gg.BigWgmmaKey(epi=epi, block_t=bt, e_pad=max(32, _e_pad(e)), num_warps=big_bn // (16 * rows_per_wg),
                                  clamp=clamp, rows_per_wg=rows_per_wg)
        return _big_key(epi, bt, e, use_asm=asm, clamp=clamp, bn=big_bn, k128=k128)

    done = []
    if 0 in epis:
        w = stack(len(counts), n, k, seed + 1, device)
        ws = gg.prepare_experts(*w)
        for bt in big_bts:
            ref = gg.grouped_gemm(*args, ws, key=present(0, bt))
            y = gg.grouped_gemm(*args, ws, key=big(0, bt))
            assert_bits_equal(y, ref, label=f"plain, big BT {bt} vs present BT {present_bt or bt}")
        _bound_check(f"big path plain {counts}", y, a, w, a["dec"] * w[2])
        done.append("plain")
    if 1 in epis or 2 in epis:
        i = n // 2
        w13 = gg.prepare_gate_up(*stack(e, i, k, seed + 2, device), *stack(e, i, k, seed + 3, device))
        present_l1 = {bt: gg.grouped_gemm_l1(*args, w13, key=present(1, bt))
                      for bt in big_bts}
        g0, u0 = present_l1[big_bts[0]]
    if 1 in epis:
        for bt in big_bts:
            g1, u1 = gg.grouped_gemm_l1(*args, w13, key=big(1, bt))
            assert_bits_equal(g1, present_l1[bt][0], label=f"gate, big BT {bt} vs present BT {present_bt or bt}")
            assert_bits_equal(u1, present_l1[bt][1], label=f"up, big BT {bt} vs present BT {present_bt or bt}")
        done.append("gate/up")
    if 2 in epis:
        r = a["r"]
        limit = float(torch.quantile(u0[:r].abs().double().cpu(), 0.7))  # clamps some of up and gate
        h = torch.nn.functional.silu(g0[:r].clamp(max=limit)) * u0[:r].clamp(-limit, limit)
        s2 = torch.ones(e, dtype=torch.float32, device=device)
        for j in range(e):  # the w2 input_scale: about the amax of the expert's h / 2688 (some blocks saturate)
            lo, hi = int(a["off"][j]), int(a["off"][j + 1])
            if hi > lo:
                s2[j] = float(h[lo:hi].abs().max()) * 0.9 / 2688
        kw = dict(swiglu_limit=limit, h_input_dec_scale_f32=s2)
        for bt in big_bts:
            want = gg.grouped_l1_swiglu_requant(*args, w13, key=present(2, bt, clamp=True), **kw)
            assert want[0][:r].any(), "fused: the present path's h is all zero (the comparison would prove nothing)"
            got = gg.grouped_l1_swiglu_requant(*args, w13, key=big(2, bt, clamp=True), **kw)
            for name, x, y in zip(("h_packed", "h_sf", "h_dec"), got, want):
                assert_bits_equal(x, y, label=f"fused {name}, big BT {bt} vs present BT {present_bt or bt}")
        done.append("fused")
    name = f"big wgmma (rows_per_wg {rows_per_wg}, BN {big_bn})" if wgmma else "big k128" if k128 else "big"
    return (f"ok (bit-identical: {', '.join(done)}; {name} BT {list(big_bts)} vs {versus} BT "
            f"{present_bt or 'same'}{', exact data' if exact else ''})")


def check_big_planes_are_the_decoded_values(device, *, counts, rcap, k, seed=0, use_asm=None, k128=False) -> str:
    """The workspace of the large-token path holds, for row r of the activations, plane 0 [r, 64 i + j] =
    fp16(a[r, 128 i + 2 j] * 2^-7) and plane 1 [r, 64 i + j] = fp16(a[r, 128 i + 2 j + 1] * 2^-7) (a the
    references' e2m1 x e4m3 decode of the checkpoint bytes; the present kernel's per-tile fp16 operands), zeros
    past off[E] (capacity rows hold random bytes) and past K. k128: one tensor [RP, K_ITERS * 128] whose columns
    128 i + j hold plane 0's 64 i + j and 128 i + 64 + j plane 1's (each K tile: 64 even k, then 64 odd k)."""
    from references.nvfp4 import decode_nvfp4_block_scaled

    gg = _gg()
    a = _acts(counts, rcap, k, seed, device)
    e = len(counts)
    key = _big_key(0, 128, e, use_asm=(device.type == "cuda") if use_asm is None else use_asm, k128=k128)
    planes = gg._decode_planes(key, a["packed"], a["sf_sw"], a["off"].to(torch.int32), e, k, -(-(k // 16) // 4))
    r, kp = a["r"], -(-k // 128) * 128
    if k128:
        (x,) = planes
        assert tuple(x.shape) == (-(-rcap // 16) * 16, kp) and x.is_contiguous(), tuple(x.shape)
        tiles = x.view(x.shape[0], kp // 128, 2, 64)
        lo, hi = tiles[:, :, 0].reshape(x.shape[0], kp // 2), tiles[:, :, 1].reshape(x.shape[0], kp // 2)
    else:
        lo, hi = planes
    dec = torch.zeros(lo.shape[0], kp, dtype=torch.float64)
    dec[:r, :k] = decode_nvfp4_block_scaled(a["packed"][:r].cpu(), a["sf_lin"].cpu()).double() * 2.0**-7
    dec = dec.view(-1, kp // 128, 64, 2)
    want_lo = dec[..., 0].reshape(lo.shape).to(torch.float16)
    want_hi = dec[..., 1].reshape(hi.shape).to(torch.float16)
    assert torch.equal(want_lo.double().view(-1, kp // 128, 64), dec[..., 0]), "fp16 would round: not exact data"
    assert_bits_equal(lo, want_lo, label="plane 0 (even k)")
    assert_bits_equal(hi, want_hi, label="plane 1 (odd k)")
    return f"ok ({r} rows, {lo.shape[0] - r} zero rows, K {k} -> {kp}{', k128 layout' if k128 else ''})"


_INTERP_CASES.update({
    "big_path_bits_zero_token_experts_capacity_rows_k_tail": (check_big_path_bits, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, n=64, k=160, seed=61)),
    "big_path_bits_rows_of_next_expert_in_tile": (check_big_path_bits, dict(
        counts=[0, 37, 5, 0, 9], rcap=56, n=32, k=96, seed=62, big_bts=(16, 32), big_bn=64)),
    "big_path_planes_are_the_decoded_values": (check_big_planes_are_the_decoded_values, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, k=160, seed=63)),
    # the k128 variant (one K = 128 MMA per tile): its tile-interleaved activations hold the decoded values; on exact
    # data it equals the two-MMA variant (same tile) on every output, so it pairs each weight k with the same token k
    # (the column -> k map of both operands); on rounding data it meets the float64 bound (check_big_path_bits' plain)
    "big_k128_planes_are_the_decoded_values": (check_big_planes_are_the_decoded_values, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, k=160, seed=63, k128=True)),
    # K 1184: 10 K tiles (the last one 32 wide), more than a decode program's ACT_DECODE_KT_PER = 8, so two programs
    # share each row block's tiles and the second stops at K_ITERS
    "big_path_planes_span_two_decode_programs": (check_big_planes_are_the_decoded_values, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, k=1184, seed=68)),
    "big_k128_planes_span_two_decode_programs": (check_big_planes_are_the_decoded_values, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, k=1184, seed=69, k128=True)),
    "big_k128_exact_data_equals_the_two_mma_variant": (check_big_path_bits, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, n=64, k=160, seed=64, k128=True, versus="big", exact=True)),
    "big_k128_exact_data_rows_of_next_expert_in_tile": (check_big_path_bits, dict(
        counts=[0, 37, 5, 0, 9], rcap=56, n=32, k=96, seed=65, big_bts=(16, 32), big_bn=64, k128=True, versus="big",
        exact=True)),
    "big_k128_rounding_data_within_the_bound": (lambda device, use_asm, **kw: check_plain(
        device, use_asm=use_asm, key=_big_key(0, 32, 5, use_asm=use_asm, k128=True), **kw), dict(
        counts=[3, 0, 40, 1, 0], rcap=50, n=64, k=160, seed=67)),
    "big_k128_exact_data_equals_the_present_path": (check_big_path_bits, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, n=64, k=160, seed=66, k128=True, exact=True)),
})
_BIG_INTERP = [name for name in _INTERP_CASES if name.startswith("big_")]


@pytest.mark.parametrize("case", _BIG_INTERP)
def test_grouped_gemm_large_token_path_interpreter(interpreter_results, case):
    r = interpreter_results[case]
    assert r["ok"], r["message"]


def test_large_token_path_routing_from_static_shapes():
    """The path follows Rcap / E only (never a device value); V4-Pro: T = 4096 and 32768 (top-6, E 384) take the
    large-token path, T <= 256 the present one."""
    gg = _gg()
    lim = gg.LARGE_TOKEN_MIN_ROWS_PER_EXPERT
    for epi in (0, 1, 2):
        for t in (1, 16, 256, 4096, 32768):
            key = gg.CompileKey.for_shape(epi, 6 * t, 384, 6144, 7168)
            assert key.big == (6 * t / 384 >= lim), (t, key)
            if key.big:
                assert key.block_t >= 128 and key.block_n == 128 and key.epi == epi, key
        assert not gg.CompileKey.for_shape(epi, lim * 8 - 1, 8, 512, 256).big
        assert gg.CompileKey.for_shape(epi, lim * 8, 8, 512, 256).big


def test_large_token_variant_is_one_module_constant(monkeypatch):
    """LARGE_TOKEN_VARIANT picks the kernel of every routed large-token key (a one-line switch): "two_mma" (the
    measured Triton kernel, the default until the GPU bench decides), "k128" (CompileKey.k128), "wgmma"
    (BigWgmmaKey, only with the PTX decode outside the interpreter); shapes below the threshold never change."""
    gg = _gg()
    assert gg.LARGE_TOKEN_VARIANT in ("two_mma", "k128", "wgmma"), gg.LARGE_TOKEN_VARIANT
    rcap, e = 6 * 4096, 384
    for variant, want in (("two_mma", "two_mma"), ("k128", "k128"), ("wgmma", "wgmma")):
        monkeypatch.setattr(gg, "LARGE_TOKEN_VARIANT", variant)
        for epi in (0, 1, 2):
            key = gg.CompileKey.for_shape(epi, rcap, e, 6144, 7168, clamp=epi == 2)
            got = gg._large_token_variant(key, epi, rcap, e, epi == 2, True)
            kind = "wgmma" if isinstance(got, gg.BigWgmmaKey) else "k128" if got.k128 else "two_mma"
            assert kind == want and got.epi == epi and got.clamp == (epi == 2), (variant, got)
            if variant == "wgmma":  # the portable decode (use_asm=False) keeps the Triton key
                assert gg._large_token_variant(key, epi, rcap, e, epi == 2, False) == key
            small = gg.CompileKey.for_shape(epi, 6 * 256, e, 6144, 7168, clamp=epi == 2)
            assert gg._large_token_variant(small, epi, 6 * 256, e, epi == 2, True) == small


def test_large_token_variant_typo_raises_instead_of_routing_two_mma(monkeypatch):
    """A LARGE_TOKEN_VARIANT outside the three kernels is a one-line ValueError wherever it is read (the routing of a
    large-token shape and of a small one, and the large-token key itself), never a silent two_mma."""
    gg = _gg()
    rcap, e = 6 * 4096, 384
    key = gg.CompileKey.for_shape(0, rcap, e, 6144, 7168)
    small = gg.CompileKey.for_shape(0, 6 * 16, e, 6144, 7168)
    monkeypatch.setattr(gg, "LARGE_TOKEN_VARIANT", "wgmm")
    msg = "LARGE_TOKEN_VARIANT: 'wgmm', expected two_mma | k128 | wgmma"
    for got in (lambda: gg._large_token_variant(key, 0, rcap, e, False, True),
                lambda: gg._large_token_variant(small, 0, 6 * 16, e, False, True),
                lambda: gg.CompileKey.for_shape(0, rcap, e, 6144, 7168)):
        with pytest.raises(ValueError, match=re.escape(msg)) as err:
            got()
        assert "\n" not in str(err.value), err.value


def test_big_wgmma_key_under_the_interpreter_raises_naming_the_key(monkeypatch):
    """An explicit BigWgmmaKey under TRITON_INTERPRET=1: a one-line ValueError naming `key` (the Gluon kernel cannot
    run in the interpreter), before any Gluon import or launch."""
    gg = _gg()
    monkeypatch.setattr(gg, "_interpreting", lambda: True)
    key = gg.BigWgmmaKey(epi=1, block_t=64, e_pad=1024, num_warps=4)  # a key no GPU test compiles (lru cache)
    with pytest.raises(ValueError, match=r"^key: BigWgmmaKey\(epi=1, .*TRITON_INTERPRET=1") as err:
        gg._launcher(key)
    assert "\n" not in str(err.value), err.value


def test_big_wgmma_key_refuses_what_its_kernel_cannot_build_naming_the_field():
    gg = _gg()
    for kw, field in ((dict(epi=3), "epi"), (dict(epi=0, block_t=32), "block_t"), (dict(epi=0, num_warps=16),
                                                                                    "num_warps"),
                      (dict(epi=0, e_pad=48), "e_pad"), (dict(epi=0, e_pad=16), "e_pad"),
                      (dict(epi=0, rows_per_wg=0), "rows_per_wg"), (dict(epi=0, rows_per_wg=4), "rows_per_wg")):
        with pytest.raises(ValueError, match=f"BigWgmmaKey: {field}"):
            gg.BigWgmmaKey(**kw)
    r2 = gg.BigWgmmaKey(epi=2, block_t=64, num_warps=8, clamp=True, rows_per_wg=2)  # two 64-row blocks a warpgroup
    assert (r2.block_n, dataclasses.replace(r2, num_warps=4).block_n) == (256, 128)
    assert r2.grid(6 * 4096, 384, 6144) == (6 * 4096 // 64 + 384 + 1) * 6144 // 256
    assert gg.BigWgmmaKey(epi=0).rows_per_wg == 1  # the default: the kernel as measured
    r2 = gg.BigWgmmaKey(epi=0, block_t=128, rows_per_wg=2)  # BT 128, two row blocks (compile test: no loop spills)
    assert (r2.block_n, dataclasses.replace(r2, num_warps=4).block_n) == (256, 128)
    with pytest.raises(ValueError, match="k128"):
        gg.CompileKey(epi=0, block_n=128, block_t=128, num_warps=8, num_stages=4, e_pad=16, k128=True)
    key = gg.BigWgmmaKey.for_shape(2, 6 * 32768, 384, clamp=True)  # >= 128 rows an expert: BT 128, 8 warps, R 2
    assert (key.block_t, key.num_warps, key.rows_per_wg, key.block_n, key.e_pad, key.k128) == (128, 8, 2, 256, 512, True)
    tail = gg.BigWgmmaKey.for_shape(2, 6 * 32768, 384, clamp=True, k_tail=True)  # a K tail: R 1 (no loop spills)
    assert (tail.block_t, tail.num_warps, tail.rows_per_wg, tail.block_n) == (128, 8, 1, 128)
    present_grid = gg.CompileKey.for_shape(2, 6 * 32768, 384, 6144, 7168).grid(6 * 32768, 384, 6144)  # BN 128
    assert (tail.grid(6 * 32768, 384, 6144), key.grid(6 * 32768, 384, 6144)) == (present_grid, present_grid // 2)
    for rcap in (6 * 4096, 128 * 384 - 1):  # fewer than 128 rows an expert (V4-Pro T = 4096: 64): BT 64, 4 warps, R 2
        key = gg.BigWgmmaKey.for_shape(0, rcap, 384)
        assert (key.block_t, key.num_warps, key.rows_per_wg, key.block_n) == (64, 4, 2, 128), (rcap, key)
    assert gg.BigWgmmaKey.for_shape(0, 128 * 384, 384).block_t == 128


def test_routed_large_token_key_keeps_one_row_block_with_a_k_tail(monkeypatch):
    """The production router (_key, what every launch without an explicit key takes) passes the weights' K: at 128
    or more rows an expert BT 128 / R 2, except with a K tail (K % 128 != 0), where the R 2 key reloads spills inside
    its K loop (test_sm90_wgmma_compile.py's expected failure): R 1 there. Both have the present path's bits, so only
    this test sees a dropped k_tail."""
    import types

    gg = _gg()
    monkeypatch.setattr(gg, "_interpreting", lambda: False)  # the GPU routing, decided on the CPU from shapes only
    e, rcap = 8, 8 * 128
    for k, rows_per_wg in ((1024, 2), (1040, 1)):
        for epi, n in ((0, 512), (1, 512), (2, 512)):
            w = types.SimpleNamespace(num_experts=e, n=n, k=k)
            a = torch.empty(rcap, k // 2, dtype=torch.uint8)
            key = gg._key(epi, a, w, True, clamp=epi == 2)
            assert isinstance(key, gg.BigWgmmaKey) and (key.block_t, key.rows_per_wg) == (128, rows_per_wg), (k, key)


def _v4_like_counts(rcap: int, e: int, seed: int) -> list[int]:
    """rcap - 37 rows routed over e experts (uniform; experts 0, 5 and the last get none; one hot expert with
    700 rows): mean rows per expert near V4-Pro's T = 4096 (64)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (rcap - 37 - 700,), generator=g)
    counts = torch.bincount(ids, minlength=e)
    counts[[0, 5, e - 1]] = 0
    counts[7] += 700
    return counts.tolist()


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("variant", ["two_mma", "k128", "wgmma", "wgmma_r2", "wgmma_r2_bt128"])
def test_gpu_large_token_path_bits_equal_the_present_path_v4_like(variant):
    """Rcap 24576 over E 384 (V4-Pro T = 4096 rows per expert, small K / N): every output of the large-token path
    (two_mma: the Triton kernel's two K = 64 MMAs per tile, BT 128 and 256; k128: its one K = 128 MMA, BT 64, 128,
    256; wgmma: the register-fed Gluon kernel, BT 64 and 128, BN 128 and 64; wgmma_r2: the same with two 64-row
    blocks a warpgroup (rows_per_wg 2), BT 64, BN 256 (8 warps; N 384: the second column tile's block 1 past N) and
    128 (4 warps); wgmma_r2_bt128: the same at BT 128 (255 registers, a stack of prologue values outside the loop))
    equals the present path's (BT 64, the present key at this shape; and BT 16) bit for bit: plain, gate/up, fused;
    zero-token experts, a hot expert, K = 1040 (not a multiple of 128: the weight K tail, a K_ITERS % 4 tail; and
    K = 1024 for wgmma_r2_bt128), capacity rows."""
    counts = _v4_like_counts(24576, 384, 71)
    bts = {"two_mma": (128, 256), "k128": (64, 128, 256), "wgmma": (64, 128), "wgmma_r2": (64,),
           "wgmma_r2_bt128": (128,)}[variant]
    r2 = variant.startswith("wgmma_r2")
    tiles = {"wgmma": ((64, 128), (16, 128), (64, 64))} | dict.fromkeys(("wgmma_r2", "wgmma_r2_bt128"),
                                                                         ((64, 256), (16, 256), (64, 128)))
    n = 384 if r2 else 256
    # BT 128 R 2 also at K 1024: without a K tail its copies take the int32 offsets from each expert's base pointers
    ks = (1040, 1024) if variant == "wgmma_r2_bt128" else (1040,)
    for (present_bt, bn), k in itertools.product(tiles.get(variant, ((64, 128), (16, 128))), ks):
        msg = check_big_path_bits(_cuda(), counts=counts, rcap=24576, n=n, k=k, seed=72, present_bt=present_bt,
                                  big_bts=bts, big_bn=bn, k128=variant == "k128", wgmma=variant.startswith("wgmma"),
                                  rows_per_wg=2 if r2 else 1, present_bn=min(bn, 128))
        assert msg.startswith("ok"), msg
    gg = _gg()
    assert gg.CompileKey.for_shape(2, 24576, 384, 256, 1040).big  # the routing serves this shape on the new path


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("variant", ["two_mma", "k128", "wgmma", "wgmma_r2", "wgmma_r2_bt128"])
def test_gpu_large_token_path_planes_and_small_shapes(variant):
    """The decoded planes on the GPU (PTX decode) hold the references' values; the bits equal the present path's
    at small E (a token tile wider than the planes: rows past them come zero-filled by TMA; wgmma: K_ITERS 2, only
    tail tiles, and a column tile past N; K = 1664: 13 tiles, the unrolled loop and a tail; wgmma_r2: rows_per_wg 2 at
    BN 128 (4 warps) and 256 (8 warps: N 192 and 128, so row block 1 partly or wholly past N); wgmma_r2_bt128: the
    same at BT 128."""
    k128 = variant != "two_mma"
    assert check_big_planes_are_the_decoded_values(_cuda(), counts=[3, 0, 200, 1, 0, 90], rcap=300, k=1040,
                                                   seed=73, k128=k128).startswith("ok")
    bts = {"wgmma": (64, 128), "wgmma_r2": (64,), "wgmma_r2_bt128": (128,)}.get(variant, (128, 256))
    wg = dict(k128=variant == "k128", wgmma=variant.startswith("wgmma"))
    r2 = variant.startswith("wgmma_r2")
    for bn in (128, 256) if r2 else (128,):
        if r2:
            wg.update(rows_per_wg=2, big_bn=bn, present_bn=128)
        assert check_big_path_bits(_cuda(), counts=[0, 50, 3, 0], rcap=60, n=192, k=256, seed=74, present_bt=16,
                                   big_bts=bts, **wg).startswith("ok")
        assert check_big_path_bits(_cuda(), counts=[0, 150, 3, 0, 77], rcap=240, n=128, k=1664, seed=75,
                                   present_bt=16, big_bts=bts, **wg).startswith("ok")


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("variant", ["routed", "k128", "wgmma", "wgmma_r2", "wgmma_r2_w4", "wgmma_r2_bt128",
                                     "wgmma_r2_bt128_w4"])
def test_gpu_large_token_path_graph_replay_equals_eager_and_the_present_path(variant):
    """The large-token path (routed by for_shape: 8 experts, Rcap 1024; or the routed keys with k128 on; or the
    register-fed kernel at BT 128 with one row block a warpgroup; or its rows_per_wg 2 keys, BT 64 or (_bt128) 128,
    8 / 4 warps: BN 256 / 128) captured at capacity with one routing and replayed with others and new values: every output equals an eager
    call, and the present path's bytes."""
    gg = _gg()
    dev = _cuda()
    e, k, i, rcap = 8, 1024, 256, 1024
    assert gg.CompileKey.for_shape(2, rcap, e, 2 * i, k).big and gg.CompileKey.for_shape(0, rcap, e, 512, i).big
    a = _acts([140, 0, 260, 40, 0, 360, 120, 100], rcap, k, 81, dev)
    w13 = gg.prepare_gate_up(*_stack(e, i, k, 82, dev), *_stack(e, i, k, 83, dev))
    w2 = gg.prepare_experts(*_stack(e, 512, i, 84, dev))
    packed, dec, off = a["packed"].clone(), a["dec"].clone(), a["off"].to(torch.int32)
    sf = torch.zeros(gg.grouped_sf_rows(rcap, e), a["sf_sw"].shape[1], dtype=torch.uint8, device=dev)
    sf[:a["sf_sw"].shape[0]].copy_(a["sf_sw"])
    s2 = torch.full((e,), 0.01, dtype=torch.float32, device=dev)
    present = {epi: gg.CompileKey.for_shape(epi, rcap, e, 2 * i if epi else 512, k if epi else i, clamp=epi == 2,
                                            large_token=False) for epi in (0, 1, 2)}
    ours = None
    if variant == "k128":
        ours = {epi: dataclasses.replace(gg.CompileKey.for_shape(epi, rcap, e, 2 * i if epi else 512,
                                                                 k if epi else i, clamp=epi == 2), k128=True)
                for epi in (0, 1, 2)}
    elif variant == "wgmma":  # one row block a warpgroup (what for_shape routes at >= 128 rows an expert with a K tail)
        ours = {epi: dataclasses.replace(gg.BigWgmmaKey.for_shape(epi, rcap, e, clamp=epi == 2), block_t=128,
                                         num_warps=8, rows_per_wg=1) for epi in (0, 1, 2)}
    elif variant.startswith("wgmma_r2"):  # 8 warps (BN 256) or 4 (BN 128: what for_shape routes below 128 rows an expert)
        ours = {epi: gg.BigWgmmaKey(epi=epi, block_t=128 if "bt128" in variant else 64, e_pad=32,
                                    num_warps=4 if variant.endswith("w4") else 8, clamp=epi == 2, rows_per_wg=2)
                for epi in (0, 1, 2)}

    def step(keys=None):
        keys = keys or {}
        gate, up = gg.grouped_gemm_l1(packed, sf, dec, off, w13, key=keys.get(1))
        hp, hsf, hdec = gg.grouped_l1_swiglu_requant(packed, sf, dec, off, w13, swiglu_limit=10.0,
                                                     h_input_dec_scale_f32=s2, key=keys.get(2))
        y = gg.grouped_gemm(hp, hsf, hdec, off, w2, key=keys.get(0))
        return gate, up, hp, hsf, y

    step(ours)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(ours)
    for counts in ([0, 0, 0, 1000, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 2, 0], [120, 120, 120, 120, 120, 120, 120, 150]):
        b = _refill(counts, rcap, k, dev, packed, sf, dec, off)
        graph.replay()
        torch.cuda.synchronize()
        eager, old = step(ours), step(present)
        for name, got, want, want_old in zip(("gate", "up", "h_packed", "h_sf", "l2"), outs, eager, old):
            assert_bits_equal(got, want, label=f"large-token path, graph replay vs eager, {name}, counts {counts}")
            assert_bits_equal(got, want_old, label=f"large-token path (graph) vs present path, {name}, counts {counts}")
        assert outs[0][: b["r"]].any(), "gate all zero: the comparison would prove nothing"


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_large_token_path_through_the_sm90_backend():
    """The sm90 backend's MoE ops (grouped_quantize, grouped_gemm l1 / l2, l1_fused) at a shape that routes to the
    large-token path (16 experts, 1600 rows): each output equals the present path's on the same operands."""
    from references.nvfp4 import quantize_nvfp4_weight_checkpoint
    from references.recipes import MODELOPT
    from verify.backends import get_backend
    from verify.checkpoint import GatedMlp, Nvfp4Linear

    gg = _gg()
    dev = _cuda()
    b = get_backend("sm90", dev)
    e, h, i = 16, 1024, 512
    g = torch.Generator().manual_seed(91)

    def linear(n, k):
        parts = [quantize_nvfp4_weight_checkpoint((torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16).float()
                                                  .to(dev), recipe=MODELOPT) for _ in range(e)]
        t = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
        return Nvfp4Linear("synthetic", t["weight"].view(torch.uint8), t["weight_scale"], t["weight_scale_2"].float(),
                           torch.full((e,), 0.01, dtype=torch.float32, device=dev))

    ex = b.prepare_experts(GatedMlp(linear(i, h), linear(i, h), linear(h, i)))
    counts = torch.bincount(torch.randint(0, e, (1600,), generator=g), minlength=e)
    counts[3] = 0
    off = torch.zeros(e + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(counts, 0).to(torch.int32)
    off = off.to(dev)
    r = int(off[-1])
    rows = (torch.randn(r, h, generator=g) * torch.exp(torch.randn(r, h, generator=g))).to(torch.bfloat16).to(dev)
    d = torch.linspace(0.005, 0.02, e, dtype=torch.float32, device=dev)
    a = b.grouped_quantize(rows, off, input_dec_scale_f32=d)
    assert gg.CompileKey.for_shape(1, r, e, 2 * i, h).big and gg.CompileKey.for_shape(0, r, e, h, i).big
    present = {epi: gg.CompileKey.for_shape(epi, r, e, 2 * i if epi else h, h if epi else i, clamp=epi == 2,
                                            large_token=False) for epi in (0, 1, 2)}
    args = (a.packed_u8, a.sf_swizzled_u8, a.global_dec_f32, off)
    gate, up = b.grouped_gemm(a, off, ex, layer="l1")
    g0, u0 = gg.grouped_gemm_l1(*args, ex.w13, key=present[1])
    assert_bits_equal(gate, g0, label="backend l1 gate (large-token path) vs present path")
    assert_bits_equal(up, u0, label="backend l1 up (large-token path) vs present path")
    s2 = torch.full((e,), float(up.abs().max()) * 0.3 / 2688, dtype=torch.float32, device=dev)
    hq = b.l1_fused(a, off, ex, swiglu_limit=7.0, input_dec_scale_f32=s2)
    hp, hsf, hdec = gg.grouped_l1_swiglu_requant(*args, ex.w13, swiglu_limit=7.0, h_input_dec_scale_f32=s2,
                                                 key=present[2])
    assert_bits_equal(hq.packed_u8, hp, label="backend l1_fused h codes vs present path")
    assert_bits_equal(hq.sf_swizzled_u8, hsf[:hq.sf_swizzled_u8.shape[0]], label="backend l1_fused h scales vs present")
    y = b.grouped_gemm(hq, off, ex, layer="l2")
    y0 = gg.grouped_gemm(hp, hsf, hdec, off, ex.w2, key=present[0])
    assert_bits_equal(y, y0, label="backend l2 (large-token path) vs present path")
    assert y.abs().amax() > 0 and gate.abs().amax() > 0, "all-zero outputs: the comparison would prove nothing"


# ------------------------------------------------- large-token path: sm_90a compile on the CPU (no GPU needed)

def _compile_big(key, k: int):
    """triton.compile of grouped_gemm_nvfp4_big_kernel for sm_90 (Triton's bundled ptxas), as _run_large_token
    launches it: host tensor descriptors [BT, 64] fp16 for the planes, torch allocations 16-byte aligned, N, K/2
    and the scale rows multiples of 16 (V4-Pro)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.sm90._consts import FLT_MAX, ONE_SIXTH_F32
    from kernels.sm90 import _grouped_gemm_nvfp4_big_jit as big

    out = {0: "*bf16", 1: "*fp32", 2: "*u8"}[key.epi]
    if key.k128:  # one descriptor [BT, 128] over the tile-interleaved activations; xhi_desc None (a constexpr)
        descs = {"x_desc": f"tensordesc<fp16[{key.block_t}, 128]>", "xhi_desc": "constexpr"}
    else:
        descs = {"x_desc": f"tensordesc<fp16[{key.block_t}, 64]>", "xhi_desc": f"tensordesc<fp16[{key.block_t}, 64]>"}
    sig = {"w_ptr": "*u8", "wsf_ptr": "*i32", **descs, "adec_ptr": "*fp32",
           "wdec_ptr": "*fp32", "off_ptr": "*i32", "out_ptr": out, "out2_ptr": out, "hsf_ptr": "*u8",
           "hdec_ptr": "*fp32", "E": "i32", "N": "i32", "HALF_K": "i32", "CP4": "i32", "RCAP": "i32", "NP": "i32",
           "adec_stride": "i32", "hdec_stride": "i32", "limit": "fp32", "OUT_CP": "i32"}
    const = dict(K_ITERS=-(-k // 128), EPI=key.epi, BN=key.block_n, BT=key.block_t, E_P=key.e_pad,
                 USE_ASM=key.use_asm, CLAMP=key.clamp, ONE_SIXTH=ONE_SIXTH_F32, FMAX=FLT_MAX, K128=key.k128,
                 W_FRAG=k % 32 == 0)  # prepare's default order
    names = list(sig) + list(const)
    sig.update({name: "constexpr" for name in const})
    aligned = ("w_ptr", "wsf_ptr", "adec_ptr", "wdec_ptr", "off_ptr", "out_ptr", "out2_ptr", "hsf_ptr", "hdec_ptr",
               "N", "HALF_K", "NP")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    const.update({"xhi_desc": None} if key.k128 else {})
    src = ASTSource(big.grouped_gemm_nvfp4_big_kernel, sig, {(names.index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": key.num_warps, "num_stages": key.num_stages})


def _big_compile_keys():
    """(key, K) of every large-token key for_shape routes at V4-Pro (T = 4096, 32768: fused L1, gate/up L1, L2)
    and the BT 256 / BT 64 / BN 64 alternatives of the bench sweep (fused L1, the largest epilogue)."""
    from kernels.sm90 import grouped_gemm_nvfp4 as gg

    keys = {}
    for t in (4096, 32768):
        for epi, n, k in ((2, 6144, 7168), (1, 6144, 7168), (0, 7168, 3072)):
            key = gg.CompileKey.for_shape(epi, 6 * t, 384, n, k, clamp=epi == 2)
            keys[key, k] = None
    base = gg.CompileKey.for_shape(2, 6 * 4096, 384, 6144, 7168, clamp=True)
    for bn, bt, warps, stages in ((128, 256, 8, 2), (128, 64, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4),
                                  (128, 128, 8, 3)):
        keys[gg.CompileKey(**{**base.__dict__, "block_n": bn, "block_t": bt, "num_warps": warps,
                              "num_stages": stages}), 7168] = None
    # the k128 variant (one K = 128 MMA per tile) of every key above: the bench's candidates
    for key, k in list(keys):
        keys[dataclasses.replace(key, k128=True), k] = None
    return list(keys)


def _wgmma_waits_per_tile(sass: str, hgmma: int) -> list[int]:
    """The WARPGROUP.DEPBAR.LE gsb0 counts from the K loop's first HGMMA to its last (one K tile of `hgmma`: the
    loop is not unrolled): 0 is a blocking wait for every MMA in flight."""
    lines = sass.splitlines()
    at = [i for i, line in enumerate(lines) if "HGMMA" in line][:hgmma]
    return [int(m, 16) for line in lines[at[0]:at[-1] + 3]
            for m in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", line)]


@pytest.mark.parametrize("key,k", _big_compile_keys(), ids=lambda v: v if isinstance(v, int) else
                         f"epi{v.epi}-bn{v.block_n}-bt{v.block_t}-w{v.num_warps}s{v.num_stages}{'-k128' * v.k128}")
def test_large_token_kernel_compiles_for_sm90_without_spills(key, k, tmp_path):
    """SASS of the large-token kernel (CPU compile, sm_90a): no spills, the MMA is the fp16 wgmma HGMMA 64xBTx16
    with fp32 accumulation (the present path's instruction; tokens on its N side), the planes arrive by TMA
    (UTMALDG), no mma.sync, and the kernel fits the 227 KB of shared memory of an SM. Registers are printed.
    Per K tile 8 HGMMA; the two-MMA variant waits for every MMA in flight (DEPBAR gsb0 0) between its halves, the
    k128 variant never inside the tile (its waits leave the previous steps in flight: the MMA of one tile overlaps
    the decode of the next)."""
    assert key.big
    ck = _compile_big(key, k)
    regs = registers_without_spills(ck.asm["cubin"], tmp_path, str(key))
    print(f"{key}: {regs} registers, dynamic shared {ck.metadata.shared} bytes")
    assert ck.metadata.shared <= 227 * 1024, f"{key}: {ck.metadata.shared} bytes of shared memory"
    sass = _cuobjdump(ck.asm["cubin"], tmp_path, "-sass")
    shapes = set(re.findall(r"HGMMA\.64x(\d+)x16\.F32\b", sass))
    assert shapes == {str(key.block_t)}, f"{key}: HGMMA shapes {sorted(shapes)} (expected 64x{key.block_t}x16 F32)"
    assert "UTMALDG" in sass, f"{key}: the planes are not loaded by TMA"
    assert not re.search(r"\bHMMA\b", sass), f"{key}: an mma.sync (HMMA) in the SASS"
    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    want = 8 * key.block_n // (16 * key.num_warps)  # 8 k16 steps x the 64-row wgmma tiles of one warpgroup
    waits = _wgmma_waits_per_tile(sass, want)
    print(f"{key}: {hgmma} HGMMA (K loop not unrolled: one K tile), wgmma waits in the tile {waits}")
    assert hgmma == want, f"{key}: {hgmma} HGMMA in the kernel (expected {want}: one K tile of 8 k16 steps)"
    if key.k128:
        assert waits and 0 not in waits, f"{key}: a blocking wgmma wait inside the K tile ({waits})"
    else:
        assert 0 in waits, f"{key}: no wait between the two MMAs ({waits}): the SASS reading is off"


@pytest.mark.parametrize("tile128", [False, True], ids=["planes", "k128"])
@pytest.mark.parametrize("k", [7168, 3072])
def test_large_token_planes_decode_compiles_for_sm90_without_spills(k, tile128, tmp_path):
    """Step 1 of the large-token path (grouped_act_decode_planes_kernel as _decode_planes launches it: 16 rows x
    ACT_DECODE_KT_PER K tiles, 4 warps, E 384 padded to 512, PTX decode; the two planes or the k128 variant's
    tile-interleaved tensor) compiles for sm_90 without spills; registers printed."""

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.sm90._grouped_gemm_nvfp4_jit import grouped_act_decode_planes_kernel

    sig = {"x_ptr": "*u8", "xsf_ptr": "*i32", "off_ptr": "*i32", "planes_ptr": "*fp16", "E": "i32", "HALF_K": "i32",
           "CP4": "i32", "PLANE": "i32"}
    from kernels.sm90.grouped_gemm_nvfp4 import ACT_DECODE_KT_PER

    const = dict(K_ITERS=-(-k // 128), BLOCK_R=16, E_P=512, USE_ASM=True, TILE128=tile128, KT_PER=ACT_DECODE_KT_PER)
    names = list(sig) + list(const)
    sig.update({name: "constexpr" for name in const})
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in ("x_ptr", "xsf_ptr", "off_ptr", "planes_ptr",
                                                                          "HALF_K")}
    src = ASTSource(grouped_act_decode_planes_kernel, sig, {(names.index(n),): v for n, v in const.items()}, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    what = f"grouped_act_decode_planes_kernel K={k} TILE128={tile128}"
    print(f"{what}: {registers_without_spills(ck.asm['cubin'], tmp_path, what)} registers")


# ---------------------------------------------------------------------------------------------------------------
# The register-fed wgmma kernel (issue 25 item 1: kernels/sm90/_grouped_gemm_nvfp4_wgmma.py, key WgmmaKey). It must
# give the Triton kernel's bits on every stage it serves (batch invariance compares a token alone with the batch,
# and the path switches with T), so the GPU tests compare the two byte for byte; grouped_gemm_nvfp4.USE_WGMMA was
# switched on after they passed on an H200 (98 passed, 2026-12-06). CPU: the routing predicate, the schedule's grid bound, the A-operand k order.


def _schedule_model(counts: list[int], rcap: int, bt: int, grid_rows: int) -> list[tuple]:
    """The kernels' _schedule replayed on the host: for each row tile t < grid_rows, ('expert', e, first row, rows)
    or ('zero', first row, rows) or None (the program exits)."""
    tiles = [-(-c // bt) for c in counts]
    cum = [sum(tiles[: i + 1]) for i in range(len(tiles))]
    total, off_end = cum[-1], sum(counts)
    out = []
    for t in range(grid_rows):
        if t < total:
            e = min(sum(1 for c in cum if c <= t), len(counts) - 1)
            row0 = (t - (cum[e] - tiles[e])) * bt
            out.append(("expert", e, sum(counts[:e]) + row0, min(bt, counts[e] - row0)))
        else:
            z = t - total
            first = off_end + z * bt
            out.append(("zero", first, max(0, min(bt, rcap - first))) if first < rcap else None)
    return out


@pytest.mark.parametrize("bt", [8, 16])
def test_wgmma_grid_covers_every_row_of_every_routing(bt):
    """WgmmaKey.grid has enough row tiles for any routing: every expert row is computed exactly once, every
    capacity row zeroed exactly once (decode, mixed, one-hot, all-empty and full routings)."""
    from kernels.sm90.grouped_gemm_nvfp4 import WgmmaKey

    g = torch.Generator().manual_seed(bt)
    cases = [([0, 1, 0, 2, 1, 0, 0, 1], 8), ([9, 0, 300, 17, 0, 1, 128, 60], 600), ([0, 0, 0, 700, 0, 0, 0, 0], 710),
             ([0] * 8, 5), ([1] * 384, 384), ([16] * 6 + [0] * 378, 96)]
    for _ in range(40):
        e = int(torch.randint(1, 40, (1,), generator=g))
        rcap = int(torch.randint(1, 300, (1,), generator=g))
        cuts = torch.sort(torch.randint(0, rcap + 1, (e - 1,), generator=g)).values.tolist()
        used = int(torch.randint(0, rcap + 1, (1,), generator=g))
        edges = [0] + [min(c, used) for c in cuts] + [used]
        cases.append(([edges[i + 1] - edges[i] for i in range(e)], rcap))
    for counts, rcap in cases:
        key = WgmmaKey(epi=0, block_t=bt, e_pad=32)
        rows_tiles = key.grid(rcap, len(counts), key.block_n)  # one column tile: the row-tile count
        covered = [0] * rcap
        for entry in _schedule_model(counts, rcap, bt, rows_tiles):
            if entry is None:
                continue
            first, n = (entry[2], entry[3]) if entry[0] == "expert" else (entry[1], entry[2])
            for r in range(first, first + n):
                covered[r] += 1
        assert covered == [1] * rcap, f"counts {counts}, Rcap {rcap}, BT {bt}: rows covered {covered}"


def test_wgmma_routing_is_on_and_serves_the_decode_sizes(monkeypatch):
    """USE_WGMMA is on (switched on after an H200 run showed every routed key bit-equal to the Triton kernel);
    wgmma_serves takes the V4-Pro decode sizes (E 384, top-6: T = 1, 16, 256) and not prefill; with it on, _key picks
    WgmmaKey there (BT 8, 4 warps: measured fastest at T = 1, 16 and 256) and never under the interpreter or with
    use_asm=False; with it off, the Triton kernel at decode sizes. Prefill (T = 4096) takes the large-token path's
    routed variant (LARGE_TOKEN_VARIANT "wgmma": BigWgmmaKey) either way."""
    from kernels.sm90 import grouped_gemm_nvfp4 as gg

    assert gg.USE_WGMMA is True
    monkeypatch.setattr(gg, "USE_WGMMA", False)
    assert all(gg.wgmma_serves(6 * t, 384) for t in (1, 16, 256))
    assert not any(gg.wgmma_serves(6 * t, 384) for t in (4096, 32768)) and not gg.wgmma_serves(0, 384)
    w = gg.Sm90GroupedWeight(torch.empty(384, 64, 64, dtype=torch.uint8, device="meta"),
                             torch.empty(384, 128, 8, dtype=torch.uint8, device="meta"),
                             torch.empty(384, dtype=torch.float32, device="meta"))
    a = {t: torch.empty(6 * t, 64, dtype=torch.uint8, device="meta") for t in (1, 16, 256, 4096)}
    assert all(isinstance(gg._key(0, a[t], w, True), gg.CompileKey) for t in (1, 16, 256))
    assert gg.LARGE_TOKEN_VARIANT == "wgmma" and isinstance(gg._key(0, a[4096], w, True), gg.BigWgmmaKey)
    monkeypatch.setattr(gg, "USE_WGMMA", True)
    monkeypatch.setattr(gg, "_interpreting", lambda: False)
    keys = {t: gg._key(2, a[t], w, None, clamp=True) for t in a}
    assert [type(keys[t]).__name__ for t in a] == ["WgmmaKey", "WgmmaKey", "WgmmaKey", "BigWgmmaKey"], keys
    assert (keys[1].block_t, keys[16].block_t, keys[256].block_t) == (8, 8, 8), keys
    assert (keys[1].max_registers, keys[16].max_registers, keys[256].max_registers) == (96, 96, 0), keys
    assert keys[256].epi == 2 and keys[256].clamp and keys[256].e_pad == 512
    assert isinstance(gg._key(0, a[16], w, False), gg.CompileKey)
    monkeypatch.setattr(gg, "_interpreting", lambda: True)
    assert isinstance(gg._key(0, a[16], w, None), gg.CompileKey)


def test_wgmma_a_operand_columns_are_the_triton_kernels_k_order():
    """The register-fed kernel's A / B column L holds k = 2 (L % 64) + L // 64 of the 128-K tile: the Triton
    kernel's tl.dot(lo) then tl.dot(hi) order (lo = even k), so each of the 8 wgmma k16 steps gets the same 16
    products at the same positions."""
    pytest.importorskip("triton")
    from kernels.sm90._grouped_gemm_nvfp4_wgmma import a_column_k_order

    assert a_column_k_order() == [2 * (col % 64) + col // 64 for col in range(128)]


WGMMA_STAGES = ("l2", "l1_gate_up", "l1_fused", "l1_fused_noclamp")


def _wgmma_stage(gg, stage: str, a: dict, e: int, k: int, key_of, *, frag: bool | None = None, n2: int = 512,
                 i: int = 256, use_asm: bool | None = None):
    """One stage's outputs (a tuple) on the activations `a`: key_of(epi, clamp) gives the key to launch with; frag:
    the weights' byte order (None: prepare's default), n2 / i: L2's N and L1's I."""
    dev = a["packed"].device
    args = (a["packed"], a["sf_sw"], a["dec"], a["off"].to(torch.int32))
    if stage == "l2":
        w2 = gg.prepare_experts(*_stack(e, n2, k, 62, dev), fragment_order=frag)
        return (gg.grouped_gemm(*args, w2, key=key_of(0, False), use_asm=use_asm),)
    w13 = gg.prepare_gate_up(*_stack(e, i, k, 63, dev), *_stack(e, i, k, 64, dev), fragment_order=frag)
    if stage == "l1_gate_up":
        return gg.grouped_gemm_l1(*args, w13, key=key_of(1, False), use_asm=use_asm)
    s2 = (0.002 + 0.001 * torch.arange(e, dtype=torch.float32, device=dev)).contiguous()
    if stage == "l1_fused":
        return gg.grouped_l1_swiglu_requant(*args, w13, swiglu_limit=0.05, h_input_dec_scale_f32=s2,
                                            key=key_of(2, True), use_asm=use_asm)
    return gg.grouped_l1_swiglu_requant(*args, w13, swiglu_limit=None, h_input_dec_scale_f32=s2[:1].contiguous(),
                                        key=key_of(2, False), use_asm=use_asm)


def check_fragment_order_bits(device, *, counts, rcap, k, seed=0, use_asm=None, key_of=None, n2=512, i=256,
                              label="routed") -> str:
    """Weights in the fragment order (prepare's default where K % 32 == 0) give every output byte of the
    checkpoint-order weights: L2 (bf16), L1 gate/up (float32), fused SwiGLU + requant with and without the clamp,
    through the keys key_of(epi, clamp) gives (None: the routed ones)."""
    gg = _gg()
    e, r = len(counts), sum(counts)
    a = _acts(counts, rcap, k, seed, device)
    key_of = key_of or (lambda epi, clamp: None)
    for stage in WGMMA_STAGES:
        base = _wgmma_stage(gg, stage, a, e, k, key_of, frag=False, n2=n2, i=i, use_asm=use_asm)
        got = _wgmma_stage(gg, stage, a, e, k, key_of, frag=True, n2=n2, i=i, use_asm=use_asm)
        assert base[0][:r].any(), f"{stage}: all-zero output (nothing compared)"
        for j, (x, y) in enumerate(zip(got, base)):
            assert_bits_equal(x.cpu(), y.cpu(), label=f"{stage} output {j} ({label} keys), fragment order vs "
                                                      f"checkpoint order, counts {counts}, K {k}")
    return f"ok ({len(WGMMA_STAGES)} stages, {label} keys, K {k})"


def test_prepare_puts_the_fragment_order_where_k_allows_it():
    """prepare's default: the fragment order for K % 32 == 0 (every V4 stack), the checkpoint's otherwise; asking for
    it where K % 32 != 0 is refused naming the argument; the stored bytes are the checkpoint's permuted (not equal,
    same multiset of bits), and the prepare check's decode sees the same weights either way."""
    from kernels.sm90.host_decode import grouped_weight_to_f32

    gg = _gg()
    w = _stack(3, 40, 96, 5, torch.device("cpu"))
    frag, ckpt = gg.prepare_experts(*w), gg.prepare_experts(*w, fragment_order=False)
    assert frag.fragment_order and not ckpt.fragment_order
    assert torch.equal(ckpt.packed_u8, w[0]) and not torch.equal(frag.packed_u8, w[0])
    assert_bits_equal(grouped_weight_to_f32(frag), grouped_weight_to_f32(ckpt), label="decoded plain stack")
    w1, w3 = _stack(3, 24, 96, 6, torch.device("cpu")), _stack(3, 24, 96, 7, torch.device("cpu"))
    g_frag, g_ckpt = gg.prepare_gate_up(*w1, *w3), gg.prepare_gate_up(*w1, *w3, fragment_order=False)
    assert g_frag.fragment_order and not g_ckpt.fragment_order
    for x, y, name in zip(grouped_weight_to_f32(g_frag, range(1, 3)), grouped_weight_to_f32(g_ckpt, range(1, 3)),
                          ("gate", "up")):
        assert_bits_equal(x, y, label=f"decoded {name} half, experts 1..2")
    odd = _stack(2, 16, 48, 8, torch.device("cpu"))
    assert not gg.prepare_experts(*odd).fragment_order
    with pytest.raises(ValueError, match="fragment_order"):
        gg.prepare_experts(*odd, fragment_order=True)


_FRAG_INTERP = {
    "fragment_order_bits_routed_triton_keys": (check_fragment_order_bits, dict(
        counts=[3, 0, 20, 1, 0], rcap=30, k=256, seed=81, n2=64, i=32)),
    "fragment_order_bits_large_token_triton_keys": (lambda device, use_asm, **kw: check_fragment_order_bits(
        device, use_asm=use_asm, key_of=lambda epi, clamp: _big_key(epi, 16, 5, use_asm=use_asm, clamp=clamp),
        label="large-token Triton", **kw), dict(counts=[3, 0, 20, 1, 0], rcap=30, k=160, seed=82, n2=64, i=32)),
}
_INTERP_CASES.update(_FRAG_INTERP)


@pytest.mark.parametrize("case", list(_FRAG_INTERP))
def test_grouped_gemm_fragment_order_interpreter(interpreter_results, case):
    r = interpreter_results[case]
    assert r["ok"], r["message"]


@pytest.mark.parametrize("bt,warps,cap", [(8, 4, 0), (8, 4, 96), (16, 4, 0), (16, 8, 0)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("stage", WGMMA_STAGES)
@pytest.mark.parametrize("k", [1040, 7168], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("counts,rcap", [([0, 1, 0, 2, 1, 0, 0, 1], 8), ([9, 0, 300, 17, 0, 1, 128, 60], 600),
                                         ([0, 0, 0, 700, 0, 0, 0, 0], 710), ([1, 3, 0, 0, 2, 0, 0, 0], 40)],
                         ids=["decode", "mixed", "hot", "capacity"])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_wgmma_bits_equal_the_triton_kernel(counts, rcap, k, stage, bt, warps, cap):
    """Every output byte of the register-fed kernel equals the Triton kernel's: L2 (bf16), L1 gate/up (float32),
    fused SwiGLU + requant with and without the clamp (h codes, grouped scales, h_dec); zero-token experts and
    zeroed capacity rows included (K = 1040: the masked K tail and scale padding; K = 7168: V4-Pro's H)."""
    gg = _gg()
    e, r = len(counts), sum(counts)
    a = _acts(counts, rcap, k, 61, _cuda())
    base = _wgmma_stage(gg, stage, a, e, k, lambda epi, clamp: gg.CompileKey.for_shape(
        epi, rcap, e, 512, k, clamp=clamp, large_token=False))  # the per-tile Triton kernel, whatever rows/expert
    got = _wgmma_stage(gg, stage, a, e, k, lambda epi, clamp: gg.WgmmaKey(
        epi=epi, block_t=bt, e_pad=32, num_warps=warps, clamp=clamp, max_registers=cap))
    assert base[0][:r].any(), f"{stage}: all-zero output (nothing compared)"
    assert not base[0][r:].any(), f"{stage}: the Triton kernel's capacity rows are not zero"
    for i, (x, y) in enumerate(zip(got, base)):
        assert_bits_equal(x.cpu(), y.cpu(), label=f"{stage} output {i}, wgmma BT {bt} warps {warps} cap {cap} vs "
                                                  f"Triton, counts {counts}, K {k}")


_FRAG_GPU_KEYS = {  # key families that read the weights, each with the fragment-order decode of its own kind
    "wgmma": lambda rcap, e: lambda epi, clamp: _gg().WgmmaKey(epi=epi, block_t=8, e_pad=32, clamp=clamp),
    "wgmma_cap96": lambda rcap, e: lambda epi, clamp: _gg().WgmmaKey(epi=epi, block_t=8, e_pad=32, clamp=clamp,
                                                                     max_registers=96),
    "triton": lambda rcap, e: lambda epi, clamp: _gg().CompileKey.for_shape(epi, rcap, e, 512, 7168, clamp=clamp,
                                                                            large_token=False),
    "big_wgmma": lambda rcap, e: lambda epi, clamp: _gg().BigWgmmaKey(epi=epi, block_t=64, e_pad=32, clamp=clamp),
    "big_wgmma_r2_bt128": lambda rcap, e: lambda epi, clamp: _gg().BigWgmmaKey(
        epi=epi, block_t=128, e_pad=32, clamp=clamp, rows_per_wg=2),
    "big_triton": lambda rcap, e: lambda epi, clamp: _big_key(epi, 128, e, use_asm=True, clamp=clamp),
}


@pytest.mark.parametrize("family", list(_FRAG_GPU_KEYS))
@pytest.mark.parametrize("k", [7168, 1056], ids=lambda k: f"K{k}")
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_fragment_order_bits_equal_checkpoint_order(family, k):
    """On the GPU, every key family that reads the weights (the register-fed kernel with and without its register
    cap, the Triton kernel, the large-token Gluon kernel with one and two row blocks, the large-token Triton kernel)
    gives the same output bytes for fragment-order weights (12-instruction decode, or the Triton un-permute) as for
    the checkpoint's: L2, L1 gate/up, fused with and without the clamp; K 7168 (V4-Pro) and 1056 (a K tail)."""
    counts, rcap = [9, 0, 300, 17, 0, 1, 128, 60], 600
    msg = check_fragment_order_bits(_cuda(), counts=counts, rcap=rcap, k=k, seed=83,
                                    key_of=_FRAG_GPU_KEYS[family](rcap, len(counts)), label=family)
    assert msg.startswith("ok"), msg


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_wgmma_expert_alone_equals_among_all():
    """An expert's rows alone (its own buffers, the other experts empty) give the bytes they give among all."""
    gg = _gg()
    counts, k = [9, 0, 300, 17, 0, 1, 128, 60], 7168
    a = _acts(counts, 600, k, 65, _cuda())
    w = gg.prepare_experts(*_stack(len(counts), 512, k, 66, _cuda()))
    key = gg.WgmmaKey(epi=0, block_t=16, e_pad=32)
    among = gg.grouped_gemm(a["packed"], a["sf_sw"], a["dec"], a["off"].to(torch.int32), w, key=key)
    lo, hi = int(a["off"][3]), int(a["off"][4])
    sub_off = torch.zeros_like(a["off"])
    sub_off[4:] = hi - lo
    sw, _ = sf_grouped_linear_to_swizzled_128x4(a["sf_lin"][lo:hi], sub_off)
    alone = gg.grouped_gemm(a["packed"][lo:hi].contiguous(), sw, a["dec"], sub_off.to(torch.int32), w, key=key)
    assert_bits_equal(alone.cpu(), among[lo:hi].cpu(), label="expert 3 alone vs among all (wgmma)")


@pytest.mark.parametrize("pdl", [False, True], ids=["l2-normal", "l2-pdl"])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_wgmma_cuda_graph_replay_equals_eager_and_the_triton_kernel(pdl):
    """The register-fed kernel captured at capacity with one routing, replayed with others (zero-token experts, a
    hot expert, fewer rows) and new values: every output byte equals an eager call, and the Triton kernel's.
    l2-pdl: L2 launched as a programmatic dependent of the fused L1 right before it (WgmmaKey.pdl, as the MoE
    block launches it): it reads the h_dec that L1 writes, so a read before L1 completed would show here."""
    gg = _gg()
    dev = _cuda()
    e, k, i, rcap = 8, 1024, 256, 64
    a = _acts([4, 0, 6, 10, 0, 9, 3, 2], rcap, k, 71, dev)
    w13 = gg.prepare_gate_up(*_stack(e, i, k, 72, dev), *_stack(e, i, k, 73, dev))
    w2 = gg.prepare_experts(*_stack(e, 512, i, 74, dev))
    packed, dec, off = a["packed"].clone(), a["dec"].clone(), a["off"].to(torch.int32)
    sf = torch.zeros(gg.grouped_sf_rows(rcap, e), a["sf_sw"].shape[1], dtype=torch.uint8, device=dev)
    sf[:a["sf_sw"].shape[0]].copy_(a["sf_sw"])
    s2 = torch.full((e,), 0.01, dtype=torch.float32, device=dev)
    h_packed = torch.zeros(rcap, i // 2, dtype=torch.uint8, device=dev)
    h_sf_static = torch.zeros(gg.grouped_sf_rows(rcap, e), -(-(i // 16) // 4) * 4, dtype=torch.uint8, device=dev)

    def step(wgmma: bool):
        if wgmma:
            keys = (gg.WgmmaKey(epi=1, block_t=8, e_pad=32), gg.WgmmaKey(epi=2, block_t=8, e_pad=32, clamp=True),
                    gg.WgmmaKey(epi=0, block_t=16, e_pad=32, num_warps=8, pdl=pdl))
        else:
            keys = (gg.CompileKey.for_shape(1, rcap, e, 2 * i, k),
                    gg.CompileKey.for_shape(2, rcap, e, 2 * i, k, clamp=True),
                    gg.CompileKey.for_shape(0, rcap, e, 512, i))
        gate, up = gg.grouped_gemm_l1(packed, sf, dec, off, w13, key=keys[0])
        y = gg.grouped_gemm(h_packed, h_sf_static, s2, off, w2, key=keys[2])
        hp, hsf, hdec = gg.grouped_l1_swiglu_requant(packed, sf, dec, off, w13, swiglu_limit=10.0,
                                                     h_input_dec_scale_f32=s2, key=keys[1])
        y_h = gg.grouped_gemm(hp, hsf, hdec, off, w2, key=keys[2])  # right after the L1 that writes its input
        return gate, up, hp, hsf, y, y_h

    step(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(True)
    for counts in ([0, 0, 0, 60, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 2, 0], [8, 8, 8, 8, 8, 8, 8, 8]):
        b = _refill(counts, rcap, k, dev, packed, sf, dec, off)
        h_packed.copy_(b["packed"][:, : i // 2].flip(0).contiguous())
        h_sf_static.zero_()
        hs, _ = sf_grouped_linear_to_swizzled_128x4(torch.full((b["r"], i // 16), 0x38, dtype=torch.uint8, device=dev),
                                                    b["off"])
        h_sf_static[:hs.shape[0]].copy_(hs)
        graph.replay()
        torch.cuda.synchronize()
        eager, triton_eager = step(True), step(False)
        for name, got, want, ref in zip(("gate", "up", "h_packed", "h_sf", "l2", "l2 of the fused L1's h"), outs,
                                        eager, triton_eager):
            assert_bits_equal(got.cpu(), want.cpu(), label=f"wgmma graph replay vs eager, {name}, counts {counts}")
            assert_bits_equal(got.cpu(), ref.cpu(),
                              label=f"wgmma graph replay vs Triton kernel, {name}, counts {counts}")


def test_wgmma_key_refuses_what_its_kernel_cannot_build_naming_the_field():
    """A WgmmaKey the register-fed kernel cannot build is refused when made, naming the field (not a bare assert
    deep in the layout code); an explicit key whose expert padding is below the experts is refused at launch by
    every grouped path."""
    gg = _gg()
    for bad, field in ((dict(epi=3), "epi"), (dict(block_t=12), "block_t"), (dict(num_warps=6), "num_warps"),
                       (dict(e_pad=16), "e_pad"), (dict(e_pad=48), "e_pad")):
        with pytest.raises(ValueError, match=f"WgmmaKey: {field} = "):
            gg.WgmmaKey(**{**dict(epi=0, block_t=8, e_pad=32), **bad})
    assert gg.WgmmaKey(epi=2, block_t=16, e_pad=512, num_warps=8, clamp=True).block_n == 128
    with pytest.raises(ValueError, match="key: e_pad = 16 is below the 40 experts of w"):
        gg._check_e_pad(gg.CompileKey.for_shape(0, 6, 16, 512, 512), 40)


@pytest.mark.parametrize("stage", WGMMA_STAGES)
@pytest.mark.parametrize("tokens", [1, 16], ids=lambda t: f"T{t}")
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_wgmma_routed_keys_at_384_experts_bits_equal_the_triton_kernel(tokens, stage):
    """The keys the routing really takes at V4-Pro's 384 experts (WgmmaKey.for_shape: E_P 512, the 16-per-lane
    schedule layout) against the per-tile Triton kernel, byte for byte; small N and K keep it quick."""
    gg = _gg()
    e, k = 384, 256
    g = torch.Generator().manual_seed(90 + tokens)
    experts = torch.randperm(e, generator=g)[:6 * tokens]
    counts = torch.bincount(experts, minlength=e).tolist()
    rcap = 6 * tokens
    a = _acts(counts, rcap, k, 91, _cuda())
    keys = {epi: gg.WgmmaKey.for_shape(epi, rcap, e, clamp=clamp) for epi, clamp in ((0, False), (1, False),
                                                                                     (2, False), (2, True))}
    assert all(key.e_pad == 512 for key in keys.values()), keys
    base = _wgmma_stage(gg, stage, a, e, k, lambda epi, clamp: gg.CompileKey.for_shape(
        epi, rcap, e, 512, k, clamp=clamp, large_token=False))
    got = _wgmma_stage(gg, stage, a, e, k, lambda epi, clamp: gg.WgmmaKey.for_shape(epi, rcap, e, clamp=clamp))
    assert base[0][:rcap].any(), f"{stage}: all-zero output (nothing compared)"
    for i, (x, y) in enumerate(zip(got, base)):
        assert_bits_equal(x.cpu(), y.cpu(), label=f"{stage} output {i}, routed wgmma key vs Triton at E = 384, "
                                                  f"T = {tokens}")


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("k", [512, 592], ids=lambda k: f"K{k}")
def test_gpu_register_fed_kernels_at_four_and_five_k_tiles(k):
    """K = 512 (4 K tiles) and 592 (5, a K tail): the K loop of both register-fed kernels, which had one constant
    trip there and failed Triton's lowering to LLVM, is unrolled instead. Every output byte equals the Triton
    kernel's: the decode-size kernel (WgmmaKey, every stage) and the large-token one (BigWgmmaKey, one and two row
    blocks a warpgroup)."""
    gg = _gg()
    counts, rcap = [9, 0, 300, 17, 0, 1, 128, 60], 600
    a = _acts(counts, rcap, k, 91, _cuda())
    for stage in WGMMA_STAGES:
        base = _wgmma_stage(gg, stage, a, len(counts), k, lambda epi, clamp: gg.CompileKey.for_shape(
            epi, rcap, len(counts), 512, k, clamp=clamp, large_token=False))
        got = _wgmma_stage(gg, stage, a, len(counts), k, lambda epi, clamp: gg.WgmmaKey(
            epi=epi, block_t=8, e_pad=32, clamp=clamp))
        assert base[0][:sum(counts)].any(), f"{stage}: all-zero output (nothing compared)"
        for i, (x, y) in enumerate(zip(got, base)):
            assert_bits_equal(x.cpu(), y.cpu(), label=f"{stage} output {i}, wgmma K {k} vs Triton")
    for r2, bn in ((1, 128), (2, 128), (2, 256)):
        wg = dict(rows_per_wg=2, big_bn=bn, present_bn=128) if r2 == 2 else {}
        msg = check_big_path_bits(_cuda(), counts=[0, 150, 3, 0, 77], rcap=240, n=192, k=k, seed=92, present_bt=16,
                                  big_bts=(64, 128), wgmma=True, **wg)
        assert msg.startswith("ok"), f"large-token wgmma K {k} rows_per_wg {r2} BN {bn}: {msg}"


if __name__ == "__main__":  # an interpreter child of interpreter_results (verify/tests/_interpreter_children.py)
    child_main(sys.argv[1:], {name: (_interp_case, case) for name, case in _INTERP_CASES.items()})
