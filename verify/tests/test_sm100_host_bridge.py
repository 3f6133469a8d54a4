"""CPU checks of the sm100 host bridge (kernels/sm100/host_bridge.py) against the
independent references: scale swizzle bytes, per-expert padding with ragged and
zero-token experts, gate/up interleave, tile->expert table, and clear errors.
"""

import pytest
import torch

from kernels.sm100 import gemm_nvfp4_blockscaled as gemm
from kernels.sm100 import host_bridge as hb
from references import layouts as ref_layouts
from verify.assertions import assert_all_zero


def _rand_bytes(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 0x7F, shape, generator=g, dtype=torch.uint8)  # no NaN bytes


def _assert_bytes_equal(got, want, label):
    __tracebackhide__ = True
    assert got.dtype == torch.uint8 and want.dtype == torch.uint8, f"{label}: dtypes {got.dtype} {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got != want).nonzero()
    if diff.numel():
        idx = tuple(int(i) for i in diff[0])
        raise AssertionError(f"{label}: {diff.shape[0]}/{got.numel()} bytes differ, first at {idx}: "
                             f"bridge 0x{int(got[idx]):02x} reference 0x{int(want[idx]):02x}")


@pytest.mark.parametrize("rows", [1, 31, 128, 129, 300], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("cols", [1, 3, 4, 7, 448 // 8], ids=lambda c: f"C{c}")
def test_sf_swizzle_bytes_equal_reference(rows, cols):
    sf = _rand_bytes(rows, cols, seed=rows * 1000 + cols)
    _assert_bytes_equal(hb.sf_linear_to_swizzled_128x4(sf), ref_layouts.sf_linear_to_swizzled_128x4(sf),
                        f"swizzle R={rows} C={cols}")


def test_sf_swizzle_reinterprets_e4m3_bytes():
    sf = _rand_bytes(130, 6, seed=7)
    got = hb.sf_linear_to_swizzled_128x4(sf.view(torch.float8_e4m3fn))
    _assert_bytes_equal(got, ref_layouts.sf_linear_to_swizzled_128x4(sf), "swizzle of float8_e4m3fn view")


def test_sf_swizzle_batched_is_per_batch_reference():
    sf = _rand_bytes(3, 200, 9, seed=3)
    got = hb.sf_linear_to_swizzled_128x4(sf)
    for e in range(3):
        _assert_bytes_equal(got[e], ref_layouts.sf_linear_to_swizzled_128x4(sf[e]), f"batched swizzle expert {e}")


def test_sf_swizzle_padding_is_zero():
    sf = torch.full((5, 3), 0x38, dtype=torch.uint8)
    out = hb.sf_linear_to_swizzled_128x4(sf)
    assert out.shape == (128, 4)
    assert int((out != 0).sum()) == 15, "padding bytes must be zero"


GROUPED_COUNTS = {
    "ragged": [5, 130, 0, 1, 256, 77],
    "zero_first_last": [0, 3, 200, 0],
    "all_zero_but_one": [0, 0, 129, 0],
    "exact_tiles": [128, 256, 128],
    "single_token": [1],
}


@pytest.mark.parametrize("counts", list(GROUPED_COUNTS.values()), ids=list(GROUPED_COUNTS))
@pytest.mark.parametrize("cols", [4, 9], ids=lambda c: f"C{c}")
def test_grouped_sf_bytes_equal_reference(counts, cols):
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    sf = _rand_bytes(int(offsets[-1]), cols, seed=sum(counts) + cols)
    want, want_padded = ref_layouts.sf_grouped_linear_to_swizzled_128x4(sf, offsets)
    got, got_padded = hb.sf_grouped_linear_to_swizzled_128x4(sf, offsets)
    assert got_padded.tolist() == want_padded.tolist(), "padded offsets"
    _assert_bytes_equal(got, want, "grouped swizzle (exact size)")


@pytest.mark.parametrize("counts", list(GROUPED_COUNTS.values()), ids=list(GROUPED_COUNTS))
def test_grouped_sf_with_capacity_is_reference_then_zero(counts):
    """The graph-safe form (fixed capacity, no host read) holds the same bytes, then zeros."""
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    sf = _rand_bytes(int(offsets[-1]), 5, seed=11)
    want, _ = ref_layouts.sf_grouped_linear_to_swizzled_128x4(sf, offsets)
    cap = hb.grouped_capacity_rows(int(offsets[-1]), len(counts))
    assert cap >= want.shape[0], f"capacity {cap} below the padded total {want.shape[0]}"
    got, _ = hb.sf_grouped_linear_to_swizzled_128x4(sf, offsets, capacity_rows=cap)
    assert got.shape == (cap, 8)
    _assert_bytes_equal(got[: want.shape[0]], want, "grouped swizzle (capacity) head")
    assert_all_zero(got[want.shape[0]:], label="capacity tail must be zero")


@pytest.mark.parametrize("counts", list(GROUPED_COUNTS.values()), ids=list(GROUPED_COUNTS))
def test_tile_expert_table_names_each_tiles_expert(counts):
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    padded = hb.grouped_padded_offsets(offsets)
    assert padded.tolist() == ref_layouts.grouped_padded_offsets(offsets).tolist()
    num_tiles = hb.grouped_capacity_rows(int(offsets[-1]), len(counts)) // 128
    table = hb.tile_expert_table(padded, num_tiles)
    assert table.dtype == torch.int32 and table.shape == (num_tiles,)
    want = []
    for t in range(num_tiles):
        row = t * 128
        owner = [e for e in range(len(counts)) if padded[e] <= row < padded[e + 1]]
        want.append(owner[0] if owner else -1)
    assert table.tolist() == want


def test_grouped_row_map_places_rows_in_their_experts_tiles():
    counts = [3, 0, 130, 1]
    offsets = torch.tensor([0, 3, 3, 133, 134], dtype=torch.int64)
    dest = hb.grouped_row_map(offsets, 134)
    padded = hb.grouped_padded_offsets(offsets).tolist()
    expert_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    for r, e in enumerate(expert_of_row):
        assert padded[e] <= int(dest[r]) < padded[e] + counts[e], f"row {r} of expert {e} -> {int(dest[r])}"
    assert len(set(dest.tolist())) == 134


@pytest.mark.parametrize("granularity", [8, 128], ids=lambda g: f"G{g}")
def test_gate_up_interleave_equals_reference(granularity):
    gate, up = _rand_bytes(256, 12, seed=1), _rand_bytes(256, 12, seed=2)
    _assert_bytes_equal(hb.interleave_gate_up_rows(gate, up, granularity=granularity),
                        ref_layouts.interleave_gate_up(gate, up, granularity=granularity), "interleave")


def test_prepare_gate_up_weight_bytes():
    e, n, k = 2, 256, 128
    w1, w3 = _rand_bytes(e, n, k // 2, seed=4), _rand_bytes(e, n, k // 2, seed=5)
    s1, s3 = _rand_bytes(e, n, k // 16, seed=6), _rand_bytes(e, n, k // 16, seed=7)
    d1, d3 = torch.tensor([0.5, 0.25]), torch.tensor([2.0, 4.0])
    w = hb.prepare_gate_up_weight(w1, s1.view(torch.float8_e4m3fn), d1, w3, s3.view(torch.float8_e4m3fn), d3)
    g = gemm.SHIPPED_KEYS[2].interleave_granularity
    assert w.interleave_granularity == g == hb.GATE_UP_GRANULARITY
    for i in range(e):
        _assert_bytes_equal(w.packed_u8[i], ref_layouts.interleave_gate_up(w1[i], w3[i], granularity=g), "packed")
        want_sf = ref_layouts.sf_linear_to_swizzled_128x4(ref_layouts.interleave_gate_up(s1[i], s3[i], granularity=g))
        _assert_bytes_equal(w.sf_swizzled_u8[i], want_sf, f"gate/up scales expert {i}")
    assert w.dec_scale_f32.tolist() == [0.5, 0.25] and w.up_dec_scale_f32.tolist() == [2.0, 4.0]


def test_prepare_weight_keeps_bytes_and_k_major():
    w = _rand_bytes(384, 64, seed=8)
    sf = _rand_bytes(384, 8, seed=9)
    out = hb.prepare_nvfp4_weight(w, sf, torch.tensor(0.125))
    _assert_bytes_equal(out.packed_u8[0], w, "weight bytes unchanged")
    _assert_bytes_equal(out.sf_swizzled_u8[0], ref_layouts.sf_linear_to_swizzled_128x4(sf), "weight scales")
    assert out.n == 384 and out.k == 128 and out.num_batches == 1


# ----------------------------------------------------------------------------- bad arguments


def test_nan_scale_byte_is_rejected_naming_the_tensor():
    sf = _rand_bytes(128, 8, seed=1)
    sf[5, 3] = 0x7F
    with pytest.raises(ValueError, match=r"weight_scale_e4m3: 1 NaN scale bytes .* first at \(5, 3\)"):
        hb.prepare_nvfp4_weight(_rand_bytes(128, 64), sf, torch.tensor(1.0))


def test_k_not_multiple_of_64_is_rejected():
    with pytest.raises(ValueError, match=r"weight_u8: K=48 must be a multiple of 64"):
        hb.prepare_nvfp4_weight(_rand_bytes(128, 24), _rand_bytes(128, 3), torch.tensor(1.0))


def test_n_major_weight_is_rejected():
    w = _rand_bytes(64, 128).t()  # [128, 64] with stride(-1) != 1
    with pytest.raises(ValueError, match=r"weight_u8: must be K-major"):
        hb.prepare_nvfp4_weight(w, _rand_bytes(128, 8), torch.tensor(1.0))


def test_wrong_dtypes_are_rejected():
    with pytest.raises(TypeError, match=r"weight_u8: expected uint8"):
        hb.prepare_nvfp4_weight(torch.zeros(128, 64, dtype=torch.int8), _rand_bytes(128, 8), torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"weight_scale_e4m3: expected uint8 or float8_e4m3fn"):
        hb.prepare_nvfp4_weight(_rand_bytes(128, 64), torch.zeros(128, 8), torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"weight_scale_2_f32: expected float32"):
        hb.prepare_nvfp4_weight(_rand_bytes(128, 64), _rand_bytes(128, 8), torch.tensor(1.0, dtype=torch.float64))


def test_transposed_scales_are_rejected():
    with pytest.raises(ValueError, match=r"weight_scale_e4m3: expected linear scales of shape \(128, 8\)"):
        hb.prepare_nvfp4_weight(_rand_bytes(128, 64), _rand_bytes(8, 128), torch.tensor(1.0))


def test_gate_up_wrong_granularity_is_rejected():
    args = (_rand_bytes(1, 256, 64), _rand_bytes(1, 256, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"granularity=64: the SwiGLU kernel needs 128"):
        hb.prepare_gate_up_weight(*args, *args, granularity=64)


def test_bad_offsets_are_rejected():
    with pytest.raises(ValueError, match=r"offsets_i64: expected int64"):
        hb.grouped_padded_offsets(torch.tensor([0, 3], dtype=torch.int32))


def test_launch_on_cpu_tensors_raises_before_compiling():
    w = hb.prepare_nvfp4_weight(_rand_bytes(128, 64), _rand_bytes(128, 8), torch.tensor(1.0))
    a = _rand_bytes(4, 64)
    a_sf = hb.sf_linear_to_swizzled_128x4(_rand_bytes(4, 8))
    with pytest.raises(ValueError, match=r"a_packed_u8: the sm100 kernels run on a CUDA device"):
        gemm.launch_dense(a, a_sf, torch.tensor([1.0]), w)


def test_launch_grouped_checks_variant_and_weight():
    w = hb.prepare_nvfp4_weight(_rand_bytes(2, 128, 64), _rand_bytes(2, 128, 8), torch.tensor([1.0, 1.0]))
    a = _rand_bytes(128, 64)
    a_sf = hb.sf_linear_to_swizzled_128x4(_rand_bytes(128, 8))
    with pytest.raises(ValueError, match=r"weight: the SwiGLU GEMM needs w1\|w3 interleaved"):
        gemm.launch_grouped(a, a_sf, torch.tensor([1.0]), w, torch.zeros(1, dtype=torch.int32), swiglu_limit=10.0)


def test_compile_key_rejects_bad_configurations():
    with pytest.raises(ValueError, match="CompileKey.variant"):
        gemm.CompileKey(variant="sparse")
    with pytest.raises(ValueError, match="grouped_swiglu needs tile_n=256"):
        gemm.CompileKey(variant="grouped_swiglu", tile_n=128)
    with pytest.raises(ValueError, match="shared memory"):
        gemm.CompileKey(variant="dense", tile_n=256, num_stages=8)
