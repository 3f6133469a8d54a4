"""The humming adapter on a Hopper GPU (markers gpu, sm90; skipped with the adapter's reason elsewhere): its own
prepare decoded back, its W4A16 dense linear, its GEMMs on the NVFP4 boundary, graph replay, and the first-use
NVRTC compile (timed and printed: the lead reports whether it works on the H100 / H200 and how long it takes).

Decode back: exact up to the sign of zero (a GEMM cannot show it: adapters._common.zero_sign_blind_diff); the
test prints how many mismatches are signed zeros and requires every other one to be absent. Determinism: eager
runs are compared with each other BEFORE any graph replay is judged, so "humming's default (stream-K, bf16
partials reduced in arbitrary order) is nondeterministic" and "capture breaks something" are told apart; the
batch-invariant mode (HummingBatchInvariantBackend) must be deterministic and replay bit-equal.

References (float64, independent of humming): checkpoint-format weights made with the references' ModelOpt
quantizer; W4A16: y64 = x (bf16 values) @ (e2m1 x E4M3)^T x weight_scale_2, bound gamma(K+1, u_acc) x
weight_scale_2 x sum |x_k w_k| + half an ulp of bf16; the NVFP4 boundary ops: the same products of the references'
te quantization of x (references.gemm).
"""

from __future__ import annotations

import time

import pytest
import torch

from references import layouts as ref_layouts
from references.gemm import gemm_error_bound, grouped_gemm_error_bound, nvfp4_gemm_f64, nvfp4_grouped_gemm_f64
from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4, quantize_nvfp4_weight_checkpoint, \
    te_global_enc_scale
from references.recipes import MODELOPT, TE
from references.stages import Op
from verify.assertions import assert_within_gemm_bound
from verify.backends.adapters._common import zero_sign_blind_diff
from verify.backends.protocol import QuantizedAct
from verify.checkpoint import GatedMlp, Nvfp4Linear
from verify.rng import CounterRng

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]
DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
_B = {}


def _humming(batch_invariant: bool = False):
    key = "bi" if batch_invariant else "b"
    if key not in _B:
        from verify.backends.adapters.humming import HummingBatchInvariantBackend
        from verify.backends.registry import get_backend
        _B[key] = HummingBatchInvariantBackend() if batch_invariant else get_backend("humming")
    b = _B[key]
    for op in (Op.PREPARE, Op.DENSE_LINEAR, Op.DENSE_GEMM, Op.GROUPED_GEMM):
        why = b.unsupported_reason(op, DEV)
        if why:
            pytest.skip(why)
    return b


def _linear(n: int, k: int, seed: int, *, experts: int | None = None, amax_gain: float = 1.0) -> Nvfp4Linear:
    g = CounterRng(seed, device=DEV)
    parts = []
    for e in range(experts or 1):
        w = (g.normal((n, k)) * g.lognormal((n, k), sigma=0.5) * (amax_gain ** e)).to(torch.bfloat16).float()
        parts.append(quantize_nvfp4_weight_checkpoint(w, recipe=MODELOPT))
    t = {key: torch.stack([p[key] for p in parts]) if experts else parts[0][key] for key in parts[0]}
    inp = torch.full((experts,) if experts else (), 0.01, dtype=torch.float32, device=DEV)
    return Nvfp4Linear(f"synthetic{seed}", t["weight"].view(torch.uint8), t["weight_scale"],
                       t["weight_scale_2"].float(), inp)


def _dequant(lin: Nvfp4Linear) -> torch.Tensor:
    """The checkpoint's dequantized weight, float32: e2m1 x E4M3 (exact) x weight_scale_2 (one rounding)."""
    ws2 = lin.weight_scale_2_f32.to(torch.float32)
    return decode_nvfp4_block_scaled(lin.weight_u8, lin.weight_scale_e4m3) * ws2.reshape(*ws2.shape, 1, 1)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    g = CounterRng(seed, device=DEV)
    return (g.normal((m, k)) * g.lognormal((m, k), sigma=1.0)).to(torch.bfloat16)


def test_first_use_compile_then_cached():
    """The first dense_linear of a shape compiles humming's kernels through NVRTC (timed); the second only launches."""
    b = _humming()
    lin = _linear(2048, 7168, seed=1)
    w = b.prepare_linear(lin)
    x = _x(16, 7168, seed=2)
    t0 = time.perf_counter()
    y = b.dense_linear(x, w)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    b.dense_linear(x, w)
    torch.cuda.synchronize()
    second = time.perf_counter() - t0
    print(f"\nhumming first call (prepare done; NVRTC compile of every M range) {first:.2f} s, second {second * 1e3:.2f} ms "
          f"on {torch.cuda.get_device_name()}")
    assert y.shape == (16, 2048) and y.dtype == torch.bfloat16 and second < first


@pytest.mark.parametrize("n,k,experts", [(128, 256, None), (2048, 7168, None), (256, 128, 4), (7168, 3072, 2)],
                         ids=lambda v: str(v))
def test_prepared_weights_decode_back_to_the_checkpoint(n, k, experts):
    """Bit-exact but for the sign of zero: -0 weights come back +0 through the identity GEMM (its accumulator
    starts at +0). Every bit mismatch must be one of those (run 1 on the H100: 1688/32768, 787422/14680064,
    6874/131072, 2362140/44040192 mismatches, exactly the -0 counts of these weights)."""
    b = _humming()
    lin = _linear(n, k, seed=n + k, experts=experts)
    got = b.dequantize_prepared(b.prepare_linear(lin) if not experts else _stack(b, lin)).cpu()
    want = _dequant(lin).cpu()
    d = zero_sign_blind_diff(got, want)
    negative_zeros = int(((want == 0) & torch.signbit(want)).sum())
    print(f"\nhumming prepare {n}x{k} x{experts or 1}: {d.bits_differ}/{d.total} differ in bits, {d.zero_sign_only} "
          f"of them signed zeros (the checkpoint holds {negative_zeros} -0), {d.other} other")
    assert got.shape == want.shape and got.dtype == torch.float32
    if d.other:
        i = d.first_other
        raise AssertionError(f"{d.other} mismatches that are not signed zeros; first at flat {i}: got "
                             f"{float(got.reshape(-1)[i])!r}, expected {float(want.reshape(-1)[i])!r}")
    assert d.zero_sign_only <= negative_zeros


def test_prepared_experts_decode_back_to_w1_w3_w2():
    b = _humming()
    w1, w2 = _linear(256, 128, seed=31, experts=2), _linear(128, 256, seed=32, experts=2)
    other = _linear(256, 128, seed=33, experts=2)  # w3: its codes and block scales under w1's weight_scale_2
    w3 = Nvfp4Linear("w3", other.weight_u8, other.weight_scale_e4m3, w1.weight_scale_2_f32, w1.input_scale_f32)
    ex = b.prepare_experts(GatedMlp(w1, w3, w2))
    got = b.dequantize_prepared(ex)
    assert ex.w13.scale_2_kind == "tensor" and sorted(got) == ["w1", "w2", "w3"]
    for role, lin in (("w1", w1), ("w3", w3), ("w2", w2)):
        d = zero_sign_blind_diff(got[role].cpu(), _dequant(lin).cpu())
        assert d.other == 0, (role, d)


def _stack(b, lin: Nvfp4Linear):
    """A stack prepared as w2 would be (one shard): prepare_experts' w2 with w1 = w3 = lin of the same shape."""
    return b.prepare_experts(GatedMlp(lin, lin, lin)).w2


def test_w13_with_different_gate_and_up_scales_decodes_to_what_humming_keeps():
    """w1 and w3 with different weight_scale_2: humming keeps one bf16 scale per channel; decoding it back shows
    exactly that rounding (reported, the prepare check's finding), never a swap of gate and up."""
    b = _humming()
    w1, w3 = _linear(256, 128, seed=5, experts=3), _linear(256, 128, seed=6, experts=3, amax_gain=3.0)
    ex = b.prepare_experts(GatedMlp(w1, w3, _linear(128, 256, seed=7, experts=3)))
    got = b.dequantize_prepared(ex.w13).cpu()
    want = torch.cat((_dequant(w1), _dequant(w3)), dim=1).cpu()
    rel = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
    print(f"\nhumming w13 scale kind {ex.w13.scale_2_kind}; max relative difference to the checkpoint {rel:.3g}")
    assert rel <= 2.0**-8, "more than bf16 rounding of weight_scale_2: a wrong scale or a gate/up swap"


M_VALUES = (1, 7, 16, 128, 1024)


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n,k", [(128, 256), (2048, 7168), (7168, 3072), (6144, 7168)], ids=lambda v: str(v))
def test_dense_linear_w4a16_within_the_bound(m, n, k):
    b = _humming()
    lin = _linear(n, k, seed=n * 3 + k)
    x = _x(m, k, seed=m + n)
    y = b.dense_linear(x, b.prepare_linear(lin), input_dec_scale_f32=lin.input_scale_f32)
    w = decode_nvfp4_block_scaled(lin.weight_u8, lin.weight_scale_e4m3).double()
    y64 = (x.double() @ w.T) * lin.weight_scale_2_f32.double()
    abs_dot = x.double().abs() @ w.abs().T
    bound = gemm_error_bound(abs_dot, y64, lin.weight_scale_2_f32, k=k, u_acc=b.u_acc, out_dtype=torch.bfloat16)
    assert_within_gemm_bound(y, y64, bound, label=f"humming W4A16 dense_linear {m}x{n}x{k}")


def _act(m: int, k: int, seed: int) -> tuple[QuantizedAct, torch.Tensor, torch.Tensor]:
    x = _x(m, k, seed)
    q = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=te_global_enc_scale(x.float().abs().amax()))
    dec = q.global_dec_scale().to(torch.float32).reshape(1)
    return QuantizedAct(q.packed_u8, ref_layouts.sf_linear_to_swizzled_128x4(q.sf_u8), dec), q.sf_u8, dec


@pytest.mark.parametrize("m", (1, 16, 300))
@pytest.mark.parametrize("n,k", [(128, 256), (2048, 7168)], ids=lambda v: str(v))
def test_dense_gemm_on_the_nvfp4_boundary_within_the_bound(m, n, k):
    b = _humming()
    lin = _linear(n, k, seed=n + 2 * k)
    a, sf, dec = _act(m, k, seed=n + m)
    y = b.dense_gemm(a, b.prepare_linear(lin))
    alpha = dec.reshape(()) * lin.weight_scale_2_f32.reshape(())
    y64, abs_dot = nvfp4_gemm_f64(a.packed_u8, sf, lin.weight_u8, lin.weight_scale_e4m3.view(torch.uint8), alpha)
    assert_within_gemm_bound(y, y64, gemm_error_bound(abs_dot, y64, alpha, k=k, u_acc=b.u_acc),
                             label=f"humming dense_gemm {m}x{n}x{k}")


@pytest.mark.parametrize("counts", [[3, 0, 130, 1], [0, 0, 5, 0], [17] * 4], ids=str)
def test_grouped_gemm_on_the_nvfp4_boundary_within_the_bound(counts):
    b = _humming()
    e, h, i = len(counts), 256, 128
    w1, w3, w2 = (_linear(i, h, seed=11, experts=e), _linear(i, h, seed=12, experts=e),
                  _linear(h, i, seed=13, experts=e))
    ex = b.prepare_experts(GatedMlp(w1, w3, w2))
    off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64, device=DEV)
    for layer, k, lins in (("l1", h, (w1, w3)), ("l2", i, (w2,))):
        x = _x(int(off[-1]), k, seed=len(counts) + k)
        amax = x.float().abs().amax()
        q = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=te_global_enc_scale(amax))
        dec = q.global_dec_scale().to(torch.float32).reshape(1).expand(e).contiguous()
        a = QuantizedAct(q.packed_u8, ref_layouts.sf_grouped_linear_to_swizzled_128x4(q.sf_u8, off)[0], dec)
        ys = b.grouped_gemm(a, off.to(torch.int32), ex, layer=layer)
        for y, lin, part in zip(ys if isinstance(ys, tuple) else (ys,), lins, ("gate", "up") if layer == "l1" else ("y",)):
            alpha = dec * lin.weight_scale_2_f32
            y64, abs_dot = nvfp4_grouped_gemm_f64(q.packed_u8, q.sf_u8, lin.weight_u8,
                                                  lin.weight_scale_e4m3.view(torch.uint8), off, alpha)
            bound = grouped_gemm_error_bound(abs_dot, y64, alpha, off, k=k, u_acc=b.u_acc)
            assert_within_gemm_bound(y, y64, bound, label=f"humming grouped {layer} {part} {counts}")


@pytest.mark.parametrize("n,k", [(35, 1024), (44, 256)], ids=str)
def test_n_that_humming_cannot_take_is_padded_and_within_the_bound(n, k):
    """humming asserts its N padding is a multiple of 8 (the accumulator probe's 35 columns crashed run 1): the
    adapter pads N to a multiple of 8 with zero rows and cuts the output back."""
    b = _humming()
    lin = _linear(n, k, seed=n + 5 * k)
    x = _x(16, k, seed=n)
    y = b.dense_linear(x, b.prepare_linear(lin))
    w = decode_nvfp4_block_scaled(lin.weight_u8, lin.weight_scale_e4m3).double()
    y64 = (x.double() @ w.T) * lin.weight_scale_2_f32.double()
    bound = gemm_error_bound(x.double().abs() @ w.abs().T, y64, lin.weight_scale_2_f32, k=k, u_acc=b.u_acc,
                             out_dtype=torch.bfloat16)
    assert y.shape == (16, n)
    assert_within_gemm_bound(y, y64, bound, label=f"humming W4A16 dense_linear 16x{n}x{k}")


def _eager_differences(b, w, x, runs: int = 8) -> int:
    """How many output elements of `runs` eager calls on the same inputs differ from the first call's."""
    first = b.dense_linear(x, w).view(torch.int16).clone()
    differ = torch.zeros_like(first, dtype=torch.bool)
    for _ in range(runs - 1):
        differ |= b.dense_linear(x, w).view(torch.int16) != first
    torch.cuda.synchronize()
    return int(differ.sum())


def _tuning(b, w, m: int) -> str:
    """humming's heuristic kernel config for M (stream-K, TMA output): what decides determinism (printed)."""
    try:
        from humming.tune import get_heuristics_config
        cfg = get_heuristics_config(w.config, shape_m=m, gemm_type="dense", use_batch_invariant=b.batch_invariant)
        return ", ".join(f"{key} {cfg.get(key)}" for key in ("block_shape", "use_stream_k", "use_tma_c", "num_sms"))
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return f"(humming's heuristics not readable: {type(e).__name__}: {e})"


def _graph_differences(b, w, x, x_new) -> int:
    b.dense_linear(x, w)  # warm-up: every compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = b.dense_linear(x, w)
    x.copy_(x_new)
    graph.replay()
    torch.cuda.synchronize()
    return int((y_graph.view(torch.int16) != b.dense_linear(x, w).view(torch.int16)).sum())


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["default", "batch_invariant"])
def test_dense_linear_eager_determinism_then_graph_replay(batch_invariant):
    """Eager against eager first (8 calls, same inputs), then graph replay against eager. humming's default mode
    reduces stream-K slices in bf16 in arbitrary order (adapter docstring): when eager itself differs the test
    is an xfail saying so ("nondeterministic: eager twice differs"), never a misleading graph failure; when eager
    is deterministic a replay difference is a capture bug and fails. The batch-invariant mode must be both
    deterministic and bit-equal under replay."""
    b = _humming(batch_invariant)
    lin = _linear(2048, 7168, seed=21)
    w = b.prepare_linear(lin)
    x = _x(16, 7168, seed=22)
    eager = _eager_differences(b, w, x)
    graph = _graph_differences(b, w, x, _x(16, 7168, seed=23))
    mode = "batch-invariant" if batch_invariant else "default"
    print(f"\nhumming {mode} 16x2048x7168 [{_tuning(b, w, 16)}]: eager vs eager {eager} of {16 * 2048} elements "
          f"differ; graph replay vs eager {graph}")
    if eager and not batch_invariant:
        pytest.xfail(f"nondeterministic: eager twice differs in {eager} of {16 * 2048} elements (humming's stream-K "
                     f"bf16 reduction); the replay differed in {graph}")
    assert eager == 0, f"humming {mode}: nondeterministic: eager twice differs in {eager} elements"
    assert graph == 0, f"humming {mode}: eager is deterministic but the graph replay differs in {graph} elements " \
                       "(a capture bug: stale workspace / locks / tensor maps)"


def test_graph_probe_names_nondeterminism_of_the_default_mode():
    """The harness's graph probe (verify.verdicts.probes.graph_probe) on humming's default dense_linear: where eager
    is deterministic it must pass; where eager differs from itself it passes or fails saying "nondeterministic:
    eager twice differs", never blaming the graph."""
    from verify.verdicts.probes import graph_probe

    b = _humming()
    lin = _linear(2048, 7168, seed=21)
    w = b.prepare_linear(lin)
    x = _x(16, 7168, seed=22)
    eager = _eager_differences(b, w, x)
    metrics: dict = {}
    try:
        msg = graph_probe(lambda: b.dense_linear(x, w), [("new values", lambda: x.copy_(_x(16, 7168, seed=23)))],
                          metrics)
    except AssertionError as e:
        msg = f"FAIL {e}"
    print(f"\nhumming default graph probe (eager vs eager {eager}): {msg}")
    if eager == 0:
        assert not msg.startswith("FAIL"), f"eager is deterministic here, yet the graph probe failed: {msg}"
    else:
        assert not msg.startswith("FAIL") or msg.startswith("FAIL nondeterministic"), \
            f"eager differs from itself ({eager} elements) but the probe blamed the graph: {msg}"
