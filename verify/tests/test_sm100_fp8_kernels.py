"""sm100 FP8 block-scaled linear against the references, on a B200 (markers gpu + sm100; skipped
elsewhere with the reason). Issue 23 item 6. Nothing here has run yet: it waits for a B200.

- activation quantization (kernels.sm100.quantize_fp8_1x128, recipe fp8_ue8m0): E4M3 bytes and
  UE8M0 scale bytes equal references.fp8_act.quantize_act_fp8_1x128(FP8_ACT_UE8M0) byte for byte
  (ordinary data with per-row magnitudes over many binades, and zero groups, -0.0, NaN, Inf,
  bf16 subnormals, values near the bf16 maximum, K not a multiple of 128); the swizzled scale
  bytes equal the host bridge's replication of the reference scales;
- GEMM (kernels.sm100.gemm_fp8_blockscaled): every element within
  references.fp8_gemm.fp8_block_gemm_error_bound of the float64 result, with the accumulator the
  kernel declares: float32, u_acc = 2^-24, promotion interval = all of K (the partial sums stay in
  the fp32 TMEM accumulator from the first K block to the last; the UE8M0 scales are applied
  inside the MMA, so there is no separate promotion step). If the B200's MMA keeps fewer bits,
  these tests fail and the declaration must change (the accumulator probe decides, item 4);
- exact-arithmetic data: bit-equal to bf16(y64);
- batch invariance, garbage in scale padding, valid rows, CUDA-graph replay == eager,
  no host sync, determinism (new buffers over garbage, after other work, on another stream).
"""

import pytest
import torch

from kernels.sm100 import gemm_fp8_blockscaled as gemm
from kernels.sm100 import host_bridge_fp8 as hb
from kernels.sm100 import quantize_fp8_1x128 as quant
from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_error_bound, fp8_block_gemm_f64
from references.fp8_weight import fp8_weight_from_v4_e8m0_scale
from verify.assertions import assert_bits_equal, assert_bytes_equal, assert_within_gemm_bound, describe_e4m3

pytestmark = [pytest.mark.gpu, pytest.mark.sm100]

DEV = "cuda"


def _ceil(a, b):
    return -(-a // b)


def _act_bf16(m, k, *, seed):
    """Rows of very different magnitude (2^-20 .. 2^20) so the UE8M0 scales cover many binades."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp2(torch.randint(-20, 21, (m, 1), generator=g).float())
    return (torch.randn(m, k, generator=g) * row_scale).to(torch.bfloat16)


def _special_bf16(m, k, *, seed):
    """Ordinary data with planted special groups: all zero, all -0.0, one NaN, one +Inf, one -Inf,
    bf16 subnormals only, values near the bf16 maximum, and exact powers of two (scale boundaries)."""
    x = _act_bf16(m, k, seed=seed).float()
    groups = _ceil(k, 128)
    kinds = ["zero", "negzero", "nan", "pinf", "ninf", "subnormal", "huge", "pow2"]
    for i, kind in enumerate(kinds):
        r, gi = i % m, (i // m) % groups
        sl = (r, slice(gi * 128, min(k, (gi + 1) * 128)))
        width = x[sl].numel()
        if kind == "zero":
            x[sl] = 0.0
        elif kind == "negzero":
            x[sl] = -0.0
        elif kind == "nan":
            x[sl][width // 2] = float("nan")
        elif kind == "pinf":
            x[sl][0] = float("inf")
        elif kind == "ninf":
            x[sl][width - 1] = float("-inf")
        elif kind == "subnormal":
            x[sl] = torch.linspace(-1, 1, width) * 2.0**-130
        elif kind == "huge":
            x[sl] = torch.linspace(-3.0e38, 3.0e38, width)
        elif kind == "pow2":
            x[sl] = torch.exp2(torch.randint(-10, 10, (width,)).float()) * 448
    return x.to(torch.bfloat16)


def _ref_act(x_bf16):
    return quantize_act_fp8_1x128(x_bf16, recipe=FP8_ACT_UE8M0)


def _device_act_from_ref(ref, k):
    """The reference's bytes as the GEMM's operands (to test the GEMM apart from the quantizer)."""
    return (ref.e4m3_u8.to(DEV), hb.ue8m0_1x128_to_swizzled_128x4_per32(ref.block_dec_scale, k=k).to(DEV))


def _weight(n, k, *, seed):
    """Random finite E4M3 weight bytes and UE8M0 128x128 block scales around 2^-9 .. 2^-3: the
    checkpoint form (reference weight) and the kernel operands built from the same bytes."""
    g = torch.Generator().manual_seed(seed)
    w_u8 = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    w_u8[(w_u8 & 0x7F) == 0x7F] = 0x38  # no NaN codes
    scale_u8 = torch.randint(127 - 9, 127 - 2, (_ceil(n, 128), _ceil(k, 128)), generator=g, dtype=torch.uint8)
    ref = fp8_weight_from_v4_e8m0_scale(w_u8.view(torch.float8_e4m3fn), scale_u8.view(torch.float8_e8m0fnu),
                                        module="test")
    dev = hb.prepare_fp8_block_weight(w_u8.to(DEV), scale_u8.to(DEV))
    return ref, dev


# ----------------------------------------------------------------------------- activation quantization

ACT_SHAPES = [(1, 128), (3, 272), (129, 1024), (300, 7168), (64, 1536), (17, 2048)]


@pytest.mark.parametrize("data", ["ordinary", "special"])
@pytest.mark.parametrize("m,k", ACT_SHAPES, ids=lambda v: str(v))
def test_act_quant_bytes_equal_reference(m, k, data):
    make = _act_bf16 if data == "ordinary" else _special_bf16
    x = make(m, k, seed=m * 31 + k)
    ref = _ref_act(x)
    got = quant.launch(x.to(DEV))
    assert_bytes_equal(got.e4m3_u8, ref.e4m3_u8, label=f"fp8 codes [sm100 vs reference:{FP8_ACT_UE8M0}]",
                       describe=describe_e4m3)
    assert_bytes_equal(got.sf_ue8m0_u8, ref.block_dec_scale, label="UE8M0 group scales")
    assert_bytes_equal(got.sf_swizzled_u8, hb.ue8m0_1x128_to_swizzled_128x4_per32(ref.block_dec_scale, k=k),
                       label="per-32 swizzled scales (four copies per group, zero padding)")


def test_act_quant_rows_past_the_valid_count_are_zero():
    m, k, n = 64, 1024, 5
    x = _act_bf16(m, k, seed=9)
    x[n:] = float("nan")  # stale rows must not be read
    got = quant.launch(x.to(DEV), num_valid_rows_i32=torch.tensor([n], dtype=torch.int32, device=DEV))
    ref = _ref_act(x[:n])
    assert_bytes_equal(got.e4m3_u8[:n], ref.e4m3_u8, label="valid rows: codes", describe=describe_e4m3)
    assert_bytes_equal(got.sf_ue8m0_u8[:n], ref.block_dec_scale, label="valid rows: scales")
    assert int(got.e4m3_u8[n:].count_nonzero()) == 0 and int(got.sf_ue8m0_u8[n:].count_nonzero()) == 0
    assert_bytes_equal(got.sf_swizzled_u8, hb.ue8m0_1x128_to_swizzled_128x4_per32(
        torch.cat([ref.block_dec_scale, torch.zeros(m - n, k // 128, dtype=torch.uint8)]), k=k),
        label="valid rows: swizzled scales")


# ----------------------------------------------------------------------------- GEMM

# (M, N, K): V4-Pro / V4-Flash FP8 linear shapes at decode and prefill sizes, plus N and K that
# are not multiples of 128 (TP-sharded blocks: 192 rows; K tail of 16).
GEMM_SHAPES = [
    (1, 1536, 7168),    # wq_a (Pro)
    (64, 576, 7168),
    (7, 7168, 1024),    # wo_b (Pro), o_lora_rank 1024
    (300, 3072, 7168),  # shared w1 / w3 (Pro)
    (128, 7168, 3072),  # shared w2 (Pro)
    (33, 4096, 2048),   # Flash hidden 4096, shared I 2048
    (4, 32768, 1536),   # wq_b (Flash heads)
    (5, 192, 7168),     # TP16 shard of I = 3072: N not a multiple of 128
    (130, 200, 1040),   # N and K not multiples of 128
]


def _gemm_case(m, n, k, seed):
    x = _act_bf16(m, k, seed=seed)
    act = _ref_act(x)
    w_ref, w_dev = _weight(n, k, seed=seed + 1)
    return act, w_ref, w_dev


@pytest.mark.parametrize("key", [pytest.param(k, id=f"n{k.tile_n}") for k in gemm.SHIPPED_KEYS])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES, ids=lambda v: str(v))
def test_gemm_within_declared_float32_accumulator_bound(m, n, k, key):
    act, w_ref, w_dev = _gemm_case(m, n, k, seed=m + n + k)
    y = gemm.launch(*_device_act_from_ref(act, k), w_dev, key=key)
    y64 = fp8_block_gemm_f64(act, w_ref)
    bound = fp8_block_gemm_error_bound(act, w_ref, y64, u_acc=gemm.ACCUMULATOR_U, promotion_interval=k)
    assert_within_gemm_bound(y.cpu(), y64, bound, label=f"fp8 gemm [sm100 {key.tile_n}] M={m} N={n} K={k}")


def test_gemm_exact_arithmetic_data_is_exact():
    """Codes +-1 / +-0.5 with power-of-two scales: every product and partial sum is exact in float32,
    so the only rounding is the bf16 store: the kernel must equal bf16(y64) bit for bit."""
    m, n, k = 256, 384, 2048
    g = torch.Generator().manual_seed(5)
    codes = torch.tensor([0x38, 0xB8, 0x30, 0xB0], dtype=torch.uint8)  # E4M3 +1, -1, +0.5, -0.5
    a_u8 = codes[torch.randint(0, 4, (m, k), generator=g)]
    w_u8 = codes[torch.randint(0, 4, (n, k), generator=g)]
    a_sf = torch.randint(125, 130, (m, k // 128), generator=g, dtype=torch.uint8)
    w_sf = torch.randint(125, 130, (n // 128, k // 128), generator=g, dtype=torch.uint8)
    from references.fp8_act import Fp8Act1x128

    act = Fp8Act1x128(a_u8, a_sf, "ue8m0")
    w_ref = fp8_weight_from_v4_e8m0_scale(w_u8.view(torch.float8_e4m3fn), w_sf.view(torch.float8_e8m0fnu),
                                          module="test")
    y = gemm.launch(*_device_act_from_ref(act, k), hb.prepare_fp8_block_weight(w_u8.to(DEV), w_sf.to(DEV)))
    assert_bits_equal(y.cpu(), fp8_block_gemm_f64(act, w_ref).to(torch.bfloat16), label="exact data")


def test_gemm_quantizer_and_gemm_compose():
    """The sm100 quantizer's output feeds the GEMM directly (its swizzled scales) and gives the same
    bits as the reference bytes do."""
    m, n, k = 48, 1536, 7168
    x = _act_bf16(m, k, seed=77)
    act = _ref_act(x)
    _, w_dev = _weight(n, k, seed=78)
    q = quant.launch(x.to(DEV))
    assert_bits_equal(gemm.launch(q.e4m3_u8, q.sf_swizzled_u8, w_dev),
                      gemm.launch(*_device_act_from_ref(act, k), w_dev), label="quantizer -> gemm")


def test_gemm_is_batch_invariant():
    """A token's output row does not depend on how many tokens share the call (M = 1 .. 300)."""
    n, k = 1536, 7168
    act, _, w_dev = _gemm_case(300, n, k, seed=21)
    a_u8, _ = _device_act_from_ref(act, k)
    full = gemm.launch(a_u8, hb.ue8m0_1x128_to_swizzled_128x4_per32(act.block_dec_scale, k=k).to(DEV), w_dev)
    for m in (1, 2, 37, 129, 300):
        sub = gemm.launch(a_u8[:m].contiguous(),
                          hb.ue8m0_1x128_to_swizzled_128x4_per32(act.block_dec_scale[:m], k=k).to(DEV), w_dev)
        assert_bits_equal(sub, full[:m], label=f"rows of M={m} vs the same rows of M=300")


def test_gemm_ignores_garbage_in_scale_padding():
    """NaN bytes (0xFF) in the padding rows of both swizzled scale buffers change nothing stored."""
    m, n, k = 70, 200, 1040
    act, _, w_dev = _gemm_case(m, n, k, seed=31)
    a_u8, a_sf = _device_act_from_ref(act, k)
    clean = gemm.launch(a_u8, a_sf, w_dev)
    pad_rows_a = torch.arange(a_sf.shape[0], device=DEV) >= m
    pad_rows_w = torch.arange(w_dev.sf_swizzled_u8.shape[0], device=DEV) >= n

    def poison(sf, pad_rows):
        # Un-swizzle the row index of every byte: rows >= the real count get 0xFF.
        rp, cp = sf.shape
        r = torch.arange(rp, device=DEV).view(rp // 128, 1, 4, 32, 1).expand(rp // 128, cp // 4, 4, 32, 4)
        row_of_byte = r.permute(0, 1, 3, 2, 4).reshape(rp, cp)
        return torch.where(pad_rows[row_of_byte], torch.full_like(sf, 0xFF), sf)

    w_bad = hb.Sm100Fp8BlockWeight(w_dev.e4m3_u8, poison(w_dev.sf_swizzled_u8, pad_rows_w))
    assert_bits_equal(gemm.launch(a_u8, poison(a_sf, pad_rows_a), w_bad), clean, label="poisoned padding")


def test_gemm_rows_past_the_valid_count_are_zero():
    m, n, k = 200, 576, 2048
    act, _, w_dev = _gemm_case(m, n, k, seed=41)
    a_u8, a_sf = _device_act_from_ref(act, k)
    full = gemm.launch(a_u8, a_sf, w_dev)
    for valid in (0, 1, 128, 150):
        y = gemm.launch(a_u8, a_sf, w_dev, num_valid_rows_i32=torch.tensor([valid], dtype=torch.int32, device=DEV))
        assert_bits_equal(y[:valid], full[:valid], label=f"valid={valid}: rows below")
        assert int(y[valid:].view(torch.int16).count_nonzero()) == 0, f"valid={valid}: rows past the count not zero"


# ----------------------------------------------------------------------------- the linear: graphs, sync, determinism


def _linear(x_dev, w_dev, valid=None):
    q = quant.launch(x_dev, num_valid_rows_i32=valid)
    return gemm.launch(q.e4m3_u8, q.sf_swizzled_u8, w_dev, num_valid_rows_i32=valid)


def test_linear_graph_replay_equals_eager():
    m, n, k = 64, 1536, 7168
    x = _act_bf16(m, k, seed=51).to(DEV)
    _, w_dev = _weight(n, k, seed=52)
    valid = torch.tensor([m], dtype=torch.int32, device=DEV)
    _linear(x, w_dev, valid)  # warm-up: both kernels compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = _linear(x, w_dev, valid)
    for step, n_valid in enumerate((m, 17, 1)):
        x.copy_(_act_bf16(m, k, seed=60 + step).to(DEV))
        valid.fill_(n_valid)
        graph.replay()
        assert_bits_equal(y_graph, _linear(x, w_dev, valid), label=f"replay {step} (valid {n_valid}) != eager")


def test_linear_has_no_host_sync():
    x = _act_bf16(32, 4096, seed=61).to(DEV)
    _, w_dev = _weight(2048, 4096, seed=62)
    _linear(x, w_dev)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _linear(x, w_dev)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_linear_is_deterministic():
    """The same bytes (codes, both scale layouts, y) in new buffers over garbage, after other work in
    between, and on another stream: main's verify/tests/_determinism.py (issue 24 item 1; lands with
    the merge of this branch, hence the import here)."""
    from verify.tests._determinism import assert_deterministic

    x_cpu = _act_bf16(300, 7168, seed=71)
    _, w_dev = _weight(3072, 7168, seed=72)
    x_other = _act_bf16(7, 1040, seed=73).to(DEV)
    _, w_other = _weight(200, 1040, seed=74)

    def launch(x_dev):
        q = quant.launch(x_dev)
        return q.e4m3_u8, q.sf_ue8m0_u8, q.sf_swizzled_u8, gemm.launch(q.e4m3_u8, q.sf_swizzled_u8, w_dev)

    assert_deterministic(launch, lambda: (x_cpu.to(DEV),), other_work=lambda: _linear(x_other, w_other),
                         label="sm100 fp8 linear M=300 N=3072 K=7168", device=DEV)
