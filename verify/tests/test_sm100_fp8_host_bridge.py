"""CPU checks of the sm100 FP8 linear's host side (kernels.sm100.host_bridge_fp8 and the launch
argument checks of gemm_fp8_blockscaled / quantize_fp8_1x128):

- the per-32 UE8M0 scale layout the tcgen05 mxf8f6f4 MMA reads, built by replication from the
  checkpoint's [ceil(N/128), ceil(K/128)] grid (weights) and from [M, ceil(K/128)] (activations),
  equals an independent construction: every byte placed by the 128x4 byte-offset formula of
  NVFP4_FACTS.md section 3, one (row, scale column) at a time;
- replication is exact: decoding the per-32 layout gives the checkpoint weight bit for bit
  (references.fp8_weight, V4 encoding);
- the comparison can fail: planted layout bugs (rows within an atom swapped, block grid
  transposed, scales not replicated) are told apart from the right layout;
- bad arguments get one-line errors naming the argument.
"""

import pytest
import torch

from kernels.sm100 import gemm_fp8_blockscaled as gemm
from kernels.sm100 import host_bridge_fp8 as hb
from kernels.sm100 import quantize_fp8_1x128 as quant
from references.codecs import e4m3_bytes_to_f32, ue8m0_bytes_to_f32
from references.fp8_weight import fp8_weight_from_v4_e8m0_scale
from verify.assertions import assert_bits_equal, assert_bytes_equal


def _ceil(a, b):
    return -(-a // b)


def _offset_128x4(r: torch.Tensor, c: torch.Tensor, cp: int) -> torch.Tensor:
    """Byte offset of per-32 scale (r, c) in the 128x4 swizzle with cp scale columns (the formula)."""
    return ((r // 128) * (cp // 4) + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4


def _place_by_formula(value_of_rc, rows: int, k: int) -> torch.Tensor:
    """[round_up(rows,128), 4*ceil(K/128)] bytes: byte (r, c) = value_of_rc(r, c) at its formula offset;
    everything else (rows >= `rows`) zero."""
    cp = 4 * _ceil(k, 128)
    rp = _ceil(max(rows, 1), 128) * 128
    r = torch.arange(rows).repeat_interleave(cp)
    c = torch.arange(cp).repeat(rows)
    flat = torch.zeros(rp * cp, dtype=torch.uint8)
    flat[_offset_128x4(r, c, cp)] = value_of_rc(r, c)
    return flat.view(rp, cp)


def _random_scales(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 140, shape, generator=g, dtype=torch.uint8)


WEIGHT_SHAPES = [(128, 128), (200, 272), (576, 1040), (1536, 7168), (7168, 1024), (4096, 3072), (32768, 1536)]
ACT_SHAPES = [(1, 128), (3, 272), (129, 1024), (300, 7168), (64, 16)]


@pytest.mark.parametrize("n,k", WEIGHT_SHAPES, ids=lambda v: str(v))
def test_weight_scales_replicated_into_the_per32_swizzle_match_the_formula(n, k):
    scale = _random_scales((_ceil(n, 128), _ceil(k, 128)), seed=n + k)
    got = hb.ue8m0_block128x128_to_swizzled_128x4_per32(scale, n=n, k=k)
    want = _place_by_formula(lambda r, c: scale[r // 128, c // 4], n, k)
    assert_bytes_equal(got, want, label=f"weight per-32 scales N={n} K={k}")


@pytest.mark.parametrize("m,k", ACT_SHAPES, ids=lambda v: str(v))
def test_act_scales_replicated_into_the_per32_swizzle_match_the_formula(m, k):
    sf = _random_scales((m, _ceil(k, 128)), seed=m * 7 + k)
    got = hb.ue8m0_1x128_to_swizzled_128x4_per32(sf, k=k)
    want = _place_by_formula(lambda r, c: sf[r, c // 4], m, k)
    assert_bytes_equal(got, want, label=f"act per-32 scales M={m} K={k}")
    assert_bytes_equal(hb.swizzled_128x4_per32_to_ue8m0_1x128(got, m=m, k=k), sf, label="round trip")


def test_weight_padding_rows_are_zero():
    n, k = 200, 256
    scale = torch.full((2, 2), 0x7F, dtype=torch.uint8)
    got = hb.ue8m0_block128x128_to_swizzled_128x4_per32(scale, n=n, k=k)
    rows = torch.arange(256).repeat_interleave(8)
    cols = torch.arange(8).repeat(256)
    by_row = got.flatten()[_offset_128x4(rows, cols, 8)].view(256, 8)
    assert (by_row[n:] == 0).all() and (by_row[:n] == 0x7F).all()


@pytest.mark.parametrize("n,k", [(200, 272), (1536, 7168)], ids=lambda v: str(v))
def test_per32_layout_decodes_to_the_checkpoint_weight_exactly(n, k):
    """W[n, k] = e4m3 * 2^(sf[n, k // 32] - 127) from the kernel layout equals the V4 checkpoint
    decode (128x128 blocks) bit for bit: the replication is exact."""
    g = torch.Generator().manual_seed(11)
    w_u8 = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    w_u8[(w_u8 & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    scale = _random_scales((_ceil(n, 128), _ceil(k, 128)), seed=5)
    weight = hb.prepare_fp8_block_weight(w_u8.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    cp = 4 * _ceil(k, 128)
    r = torch.arange(n).repeat_interleave(k)
    c = torch.arange(k).repeat(n) // 32
    sf_rc = weight.sf_swizzled_u8.flatten()[_offset_128x4(r, c, cp)].view(n, k)
    ours = e4m3_bytes_to_f32(weight.e4m3_u8).double() * ue8m0_bytes_to_f32(sf_rc).double()
    ref = fp8_weight_from_v4_e8m0_scale(w_u8.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu),
                                        module="test").decode_f64()
    assert_bits_equal(ours, ref, label=f"decoded weight N={n} K={k}")


# ----------------------------------------------------------------------------- the comparison can fail


def _swizzle_rows_swapped(lin: torch.Tensor) -> torch.Tensor:
    """A planted bug: (r // 32) % 4 and r % 32 exchanged inside the atom (r2 and r1 not swapped)."""
    rp, cp = lin.shape
    return lin.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 1, 2, 4).reshape(rp, cp).contiguous()


def test_act_layout_check_tells_a_row_order_bug_apart():
    m, k = 256, 512
    sf = _random_scales((m, 4), seed=3)
    want = _place_by_formula(lambda r, c: sf[r, c // 4], m, k)
    lin = sf.repeat_interleave(4, 1)
    assert not torch.equal(_swizzle_rows_swapped(lin), want)
    assert torch.equal(hb._swizzle_128x4(lin), want)


def test_weight_layout_check_tells_a_transposed_grid_and_unreplicated_scales_apart():
    n = k = 512
    scale = _random_scales((4, 4), seed=4)
    want = _place_by_formula(lambda r, c: scale[r // 128, c // 4], n, k)
    transposed = hb.ue8m0_block128x128_to_swizzled_128x4_per32(scale.T.contiguous(), n=n, k=k)
    assert not torch.equal(transposed, want)
    # One scale per 128 of K placed as if it were per 32 (no replication): columns 0..3 only.
    unreplicated = torch.zeros(512, 16, dtype=torch.uint8)
    unreplicated[:, :4] = scale.repeat_interleave(128, 0)
    assert not torch.equal(hb._swizzle_128x4(unreplicated), want)


# ----------------------------------------------------------------------------- argument errors


def _one_line(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg, f"multi-line error: {msg!r}"
    for name in names:
        assert name in msg, f"error does not name {name!r}: {msg!r}"


def _weight(n=256, k=256):
    return hb.prepare_fp8_block_weight(torch.zeros(n, k, dtype=torch.uint8),
                                       torch.full((_ceil(n, 128), _ceil(k, 128)), 127, dtype=torch.uint8))


@pytest.mark.parametrize("case", ["transposed", "floor_div", "nan_byte", "float_scale", "k_not_16", "n_not_8", "3d",
                                  "nan_weight"])
def test_prepare_weight_refuses_with_one_line_naming_the_tensor(case):
    w = torch.zeros(256, 384, dtype=torch.uint8)
    s = torch.full((2, 3), 127, dtype=torch.uint8)
    name = "scale_e8m0"
    if case == "transposed":
        s = s.T.contiguous()
    elif case == "floor_div":
        w = torch.zeros(200, 384, dtype=torch.uint8)
        s = torch.full((1, 3), 127, dtype=torch.uint8)
    elif case == "nan_byte":
        s[1, 2] = 0xFF
    elif case == "float_scale":
        s = s.float()
    elif case == "k_not_16":
        w, name = torch.zeros(256, 200, dtype=torch.uint8), "weight_e4m3"
    elif case == "n_not_8":
        w, name = torch.zeros(252, 384, dtype=torch.uint8), "weight_e4m3"
        s = torch.full((2, 3), 127, dtype=torch.uint8)
    elif case == "3d":
        w, name = torch.zeros(1, 256, 384, dtype=torch.uint8), "weight_e4m3"
    elif case == "nan_weight":
        w[3, 5], name = 0xFF, "weight_e4m3"
    with pytest.raises((ValueError, TypeError)) as e:
        hb.prepare_fp8_block_weight(w, s)
    _one_line(e, name)


def test_prepare_weight_keeps_bytes_and_accepts_fp8_dtypes():
    w = torch.randint(0, 0x7E, (256, 256), dtype=torch.uint8)
    s = torch.full((2, 2), 120, dtype=torch.uint8)
    weight = hb.prepare_fp8_block_weight(w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu))
    assert weight.e4m3_u8.dtype == torch.uint8 and torch.equal(weight.e4m3_u8, w)
    assert (weight.n, weight.k) == (256, 256) and weight.sf_swizzled_u8.shape == (256, 8)


@pytest.mark.parametrize("case", ["k_mismatch", "act_sf_shape", "act_3d", "weight_type", "cpu"])
def test_gemm_launch_refuses_with_one_line_naming_the_argument(case):
    weight = _weight(256, 256)
    a = torch.zeros(5, 256, dtype=torch.uint8)
    a_sf = torch.zeros(128, 8, dtype=torch.uint8)
    name = "act_e4m3_u8"
    if case == "k_mismatch":
        a = torch.zeros(5, 384, dtype=torch.uint8)
    elif case == "act_sf_shape":
        a_sf, name = torch.zeros(5, 2, dtype=torch.uint8), "act_sf_swizzled_u8"
    elif case == "act_3d":
        a = torch.zeros(1, 5, 256, dtype=torch.uint8)
    elif case == "weight_type":
        weight, name = (torch.zeros(256, 256, dtype=torch.uint8), None), "weight"
    with pytest.raises((ValueError, TypeError)) as e:
        gemm.launch(a, a_sf, weight)
    _one_line(e, name)


@pytest.mark.parametrize("case", ["dtype", "k_not_16", "3d", "cpu", "valid_rows"])
def test_quantizer_launch_refuses_with_one_line_naming_the_argument(case):
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    kw = {}
    name = "x_bf16"
    if case == "dtype":
        x = x.float()
    elif case == "k_not_16":
        x = torch.zeros(4, 136, dtype=torch.bfloat16)
    elif case == "3d":
        x = torch.zeros(1, 4, 256, dtype=torch.bfloat16)
    elif case == "valid_rows":
        # Checked only on a CUDA device; on the CPU the device error comes first and names x_bf16.
        kw["num_valid_rows_i32"] = torch.zeros(2, dtype=torch.int64)
    with pytest.raises((ValueError, TypeError)) as e:
        quant.launch(x, **kw)
    _one_line(e, name)


def test_quantizer_refuses_a_recipe_it_does_not_implement():
    with pytest.raises(ValueError) as e:
        quant.CompileKey(recipe="fp8_f32")
    _one_line(e, "recipe")


# ----------------------------------------------------------------------------- configuration


def test_select_config_depends_on_n_only():
    """Batch invariance by construction: the MMA shape a token sees never depends on M."""
    assert gemm.select_config(1536) == gemm.select_config(1536)
    assert gemm.select_config(1536).tile_n == 128
    assert gemm.select_config(65536).tile_n == 256
    assert gemm.select_config(148 * 256 - 256).tile_n == 128
    assert set(gemm.select_config(n) for n in (8, 576, 7168, 32768, 65536)) <= set(gemm.SHIPPED_KEYS)


@pytest.mark.parametrize("kwargs,name", [({"tile_n": 64}, "tile_n"), ({"num_stages": 1}, "num_stages"),
                                         ({"tile_n": 256, "num_stages": 10}, "shared memory")])
def test_gemm_compile_key_is_validated(kwargs, name):
    with pytest.raises(ValueError) as e:
        gemm.CompileKey(**kwargs)
    _one_line(e, name)


def test_warm_up_compiles_the_key_launch_picks():
    """warm_up(n) compiles select_config(n) (CPU: compiles for sm_100a without a GPU), so a later
    launch inside graph capture finds it cached."""
    pytest.importorskip("cutlass")
    assert gemm.warm_up(1536) == gemm.select_config(1536)
    assert gemm._compile.cache_info().currsize >= 1
    assert quant.warm_up() == quant.SHIPPED_KEYS[0]


def test_shipped_keys_fit_shared_memory():
    for key in gemm.SHIPPED_KEYS:
        assert key.smem_bytes() <= 227 * 1024


# ----------------------------------------------------------------------------- the declared accumulator


@pytest.mark.parametrize("acc_bits,admitted", [(24, True), (14, False)], ids=["fp32", "hopper-14-bit"])
def test_declared_float32_accumulator_bound_admits_fp32_and_rejects_14_bits(acc_bits, admitted):
    """The bound the sm100 numerics tests apply (u_acc = 2^-24, one promotion chunk of all K) admits
    a model kernel that sums every product in float32 (truncating: the worst rounding) and refuses
    one that keeps Hopper's ~14 bits over all of K: the declaration is a claim the B200 test can
    refute, not a tolerance."""
    from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128
    from references.fp8_gemm import fp8_block_gemm_error_bound, fp8_block_gemm_f64, fp8_block_gemm_narrow_acc_model

    m, n, k = 16, 256, 1040
    g = torch.Generator().manual_seed(4)
    act = quantize_act_fp8_1x128((torch.randn(m, k, generator=g) * 3).to(torch.bfloat16), recipe=FP8_ACT_UE8M0)
    w_u8 = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    w_u8[(w_u8 & 0x7F) == 0x7F] = 0x38
    scale = torch.randint(118, 125, (_ceil(n, 128), _ceil(k, 128)), generator=g, dtype=torch.uint8)
    w = fp8_weight_from_v4_e8m0_scale(w_u8.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu), module="t")
    y64 = fp8_block_gemm_f64(act, w)
    bound = fp8_block_gemm_error_bound(act, w, y64, u_acc=gemm.ACCUMULATOR_U, promotion_interval=k)
    y = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=acc_bits, rounding="truncate",
                                        promotion_interval=None).to(torch.bfloat16)
    within = bool(((y.double() - y64).abs() <= bound).all())
    assert within == admitted
