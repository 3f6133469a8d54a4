"""sm90 FP8 block-scaled linears (issue 23 item 5): the 1x128 activation quantizer
(kernels.sm90.quantize_fp8_1x128) and the block-scaled GEMM (kernels.sm90.gemm_fp8_block).

Expected values come from references/: the activation bytes and scales from
references.fp8_act.quantize_act_fp8_1x128 (both scale rules, the reciprocal encode, NaN ignored or
propagated); the GEMM from references.fp8_gemm (float64 product and fp8_block_gemm_error_bound with
the kernel module's declared U_ACC and PROMOTION_INTERVAL); weights from the checkpoint encodings of
references.fp8_weight (V4 UE8M0 `scale`, V3 `weight_scale_inv`), decoded to float32 block scales as
the sm90 adapter does.

CPU: every kernel runs under the Triton interpreter (TRITON_INTERPRET=1) in child processes (the
interpreter must be chosen before triton decorates the kernels; two side by side,
verify/tests/_interpreter_children.py); each case is one test item reading that run's JSON. GPU
(markers gpu, sm90): the same checks at DeepSeek-V4-Pro / V4-Flash FP8 shapes, batch invariance (a
row alone, in a batch of 64 and of 4096: bit-equal), CUDA-graph replay bit-equal to eager,
determinism. Bench (marker bench, never in the default run): ours vs torch bf16
matmul vs torch._scaled_mm blockwise (1x128 x 128x128) at M = 1, 16, 64, 128, 4096.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import pytest
import torch

from references.fp8_act import (
    FP8_ACT_F32,
    FP8_ACT_F32_RECIP,
    FP8_ACT_UE8M0,
    Fp8Act1x128,
    Fp8ActRecipe,
    quantize_act_fp8_1x128,
)
from references.fp8_gemm import fp8_block_gemm_error_bound, fp8_block_gemm_f64
from references.fp8_weight import fp8_weight_from_v3_weight_scale_inv, fp8_weight_from_v4_e8m0_scale
from verify.assertions import assert_bits_equal, assert_bytes_equal, assert_within_gemm_bound
from verify.tests._interpreter_children import child_main, run_cases

CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.sm90]

# every recipe the kernel can express: the three shipped ones, NaN ignored (fmaxf kernels), vLLM's floor
RECIPES = {r.name: r for r in (
    FP8_ACT_UE8M0, FP8_ACT_F32, FP8_ACT_F32_RECIP,
    Fp8ActRecipe(name="fp8_ue8m0_nan_ignore", scale_rule="ue8m0_ceil", amax_floor_f32=1e-4, encode_rule="divide",
                 amax_nan="ignore"),
    Fp8ActRecipe(name="fp8_f32_floor1e-10", scale_rule="f32", amax_floor_f32=1e-10, encode_rule="divide",
                 amax_nan="ignore"),
)}

# (name, N, K) of every FP8 linear of a DeepSeek-V4 layer (verify/checkpoint/writer.py _v4_layer: wq_a
# [q_lora, H], wq_b [heads * head_dim, q_lora], wkv [head_dim, H], wo_a [o_groups * o_lora, heads *
# head_dim / o_groups] (a grouped linear; here the dense GEMM of that shape), wo_b [H, o_groups * o_lora],
# shared experts w1 = w3 [I, H], w2 [H, I]), V4-Pro (H 7168, q_lora 1536, 128 heads x 512, 16 x 1024,
# I 3072) and V4-Flash (H 4096, q_lora 1024, 64 heads x 512, 8 x 1024, I 2048), plus K or N = 576
# (512 + 64: partial blocks at real size).
V4_PRO_SHAPES = [("wq_a", 1536, 7168), ("wq_b", 65536, 1536), ("wkv", 512, 7168), ("wo_a", 16384, 4096),
                 ("wo_b", 7168, 16384), ("w1_w3", 3072, 7168), ("w2", 7168, 3072)]
V4_FLASH_SHAPES = [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_a", 8192, 4096),
                   ("wo_b", 4096, 8192), ("w1_w3", 2048, 4096), ("w2", 4096, 2048)]
PARTIAL_SHAPES = [("n576", 576, 7168), ("k576", 7168, 576)]


# ============================================================================= shared helpers


def _quantize_kernel(x, recipe: Fp8ActRecipe):
    from kernels.sm90 import quantize_fp8_1x128

    return quantize_fp8_1x128.launch(x, scale_rule=recipe.scale_rule, encode_rule=recipe.encode_rule,
                                     amax_nan=recipe.amax_nan, amax_floor_f32=recipe.amax_floor_f32)


def _assert_scales_equal(got, expected, *, label: str) -> None:
    """UE8M0 bytes equal, or float32 scales bit-equal where finite and NaN exactly where expected NaN
    (the NaN payload is the GPU's canonical one, not torch's)."""
    if expected.dtype == torch.uint8:
        assert_bytes_equal(got, expected, label=label)
        return
    got, expected = got.cpu(), expected.cpu()
    assert got.dtype == torch.float32 and got.shape == expected.shape, f"{label}: {got.dtype} {tuple(got.shape)}"
    nan_g, nan_e = torch.isnan(got), torch.isnan(expected)
    assert torch.equal(nan_g, nan_e), f"{label}: NaN scales at {(nan_g != nan_e).nonzero()[:4].tolist()}"
    keep = ~nan_e
    assert_bits_equal(got[keep], expected[keep], label=label)


def _special_input(m: int, k: int, seed: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Heavy-tailed rows plus, where the shape has room: an all-zero group, an all -0.0 group, a group
    below the amax floor, values in E4M3's subnormal range, a NaN, +Inf, -Inf, and a huge value."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(2 * torch.randn(m, k, generator=g))
    groups = [(r, c) for r in range(m) for c in range(0, k, 128)]
    specials = ["zero", "negzero", "below_floor", "subnormal", "nan", "inf", "neginf", "huge"]
    for (r, c), kind in zip(groups[1:], specials):  # the first group stays ordinary
        end = min(c + 128, k)
        if kind == "zero":
            x[r, c:end] = 0.0
        elif kind == "negzero":
            x[r, c:end] = -0.0
        elif kind == "below_floor":
            x[r, c:end] = torch.randn(end - c, generator=g) * 1e-7
        elif kind == "subnormal":
            x[r, c:end] = torch.randn(end - c, generator=g) * 1e-3
            x[r, c] = 1.0  # amax 1: everything else lands in E4M3's subnormal range
        elif kind == "nan":
            x[r, c + (end - c) // 2] = float("nan")
        elif kind == "inf":
            x[r, c] = float("inf")
        elif kind == "neginf":
            x[r, end - 1] = float("-inf")
        elif kind == "huge":
            x[r, c + 1] = 3.0e38
    return x.to(dtype).to(device)


def _weight(n: int, k: int, seed: int, encoding: str, device: str = "cpu"):
    """An FP8 block-scaled weight in a checkpoint encoding (references.fp8_weight) and its float32
    block decode scales as the adapter hands them to the kernel."""
    return _weight_cached(n, k, seed, encoding, device)


@functools.lru_cache(maxsize=8)
def _weight_cached(n: int, k: int, seed: int, encoding: str, device: str):
    from verify.checkpoint.writer import make_fp8_block128_tensors

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * torch.exp(0.5 * torch.randn(n, k, generator=g, device=device))
    w[:, torch.randperm(k, generator=g, device=device)[: max(1, k // 64)]] *= 12.0  # outlier input channels
    t = make_fp8_block128_tensors(w / k**0.5, scale_storage="e8m0" if encoding == "v4" else "f32")
    if encoding == "v4":
        wt = fp8_weight_from_v4_e8m0_scale(t["weight"], t["scale"], module="t")
    else:
        wt = fp8_weight_from_v3_weight_scale_inv(t["weight"], t["weight_scale_inv"], module="t")
    return wt, wt.to_fp8_block128_weight().block_dec_f32.contiguous()


def _activation(m: int, k: int, seed: int, recipe: Fp8ActRecipe, device: str = "cpu") -> Fp8Act1x128:
    """Heavy-tailed bf16 activations with outlier channels, quantized by the KERNEL (its bytes are
    checked against the reference elsewhere; here they are the GEMM's operand)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, k, generator=g))
    x[:, torch.randperm(k, generator=g)[: max(1, k // 64)]] *= 20.0
    codes, scale = _quantize_kernel(x.to(torch.bfloat16).to(device), recipe)
    return Fp8Act1x128(codes, scale, recipe.scale_storage)


def _gemm(act: Fp8Act1x128, w_u8, w_dec_f32, key=None):
    from kernels.sm90 import gemm_fp8_block

    return gemm_fp8_block.launch(act.e4m3_u8, act.block_dec_scale, w_u8, w_dec_f32, key=key)


def _bound_check(m: int, n: int, k: int, seed: int, encoding: str, recipe: Fp8ActRecipe, device: str) -> str:
    from kernels.sm90 import gemm_fp8_block

    wt, w_dec = _weight(n, k, seed, encoding, device)
    act = _activation(m, k, seed + 1, recipe, device)
    y = _gemm(act, wt.e4m3_u8, w_dec)
    y64 = fp8_block_gemm_f64(act, wt)
    bound = fp8_block_gemm_error_bound(act, wt, y64, u_acc=gemm_fp8_block.U_ACC,
                                       promotion_interval=gemm_fp8_block.PROMOTION_INTERVAL)
    assert torch.isfinite(y64).all() and y64.abs().max() > 0, "degenerate reference (all zero or not finite)"
    worst = assert_within_gemm_bound(y, y64, bound, label=f"fp8 gemm sm90 {m}x{n}x{k} {encoding} {recipe.name}")
    return f"max |err| / bound = {worst:.3g}"


def _exact_operands(m: int, n: int, k: int, seed: int, device: str):
    """Codes in {0, +-0.5, +-1, +-1.5, +-2} and power-of-two scales in 2^-2..2^1: every partial sum of a
    128-group is a multiple of 2^-2 below 2^9 (exact in 12 bits, so in the ~14-bit tensor-core
    accumulator), every promoted term a multiple of 2^-6 below 2^11 and every float32 sum of at most
    128 of them exact, so the kernel must return the float64 result rounded once to bf16."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, -0.5, -1.0, -1.5, -2.0])
    a = vals[torch.randint(0, len(vals), (m, k), generator=g)].to(torch.float8_e4m3fn).view(torch.uint8)
    b = vals[torch.randint(0, len(vals), (n, k), generator=g)].to(torch.float8_e4m3fn).view(torch.uint8)
    sa = torch.randint(125, 129, (m, -(-k // 128)), generator=g, dtype=torch.uint8)   # 2^-2 .. 2^1
    sb = torch.randint(125, 129, (-(-n // 128), -(-k // 128)), generator=g, dtype=torch.uint8)
    act = Fp8Act1x128(a.to(device), sa.to(device), "ue8m0")
    wt = fp8_weight_from_v4_e8m0_scale(b.to(device), sb.to(device), module="exact")
    return act, wt, wt.to_fp8_block128_weight().block_dec_f32.contiguous()


# ============================================================================= interpreter cases


def _case_quant(recipe_name: str, m: int, k: int, dtype_name: str) -> str:
    recipe = RECIPES[recipe_name]
    x = _special_input(m, k, seed=m * 1000 + k, dtype=getattr(torch, dtype_name))
    codes, scale = _quantize_kernel(x, recipe)
    ref = quantize_act_fp8_1x128(x, recipe=recipe)
    assert_bytes_equal(codes, ref.e4m3_u8, label=f"fp8 act codes {recipe_name} {m}x{k} {dtype_name}")
    _assert_scales_equal(scale, ref.block_dec_scale, label=f"fp8 act scales {recipe_name} {m}x{k} {dtype_name}")
    sat = int(((codes & 0x7F) == 0x7E).sum())
    if recipe.scale_rule == "f32":  # every finite group's max lands on 448 (clamped when x / s rounds above it)
        assert sat > 0, "no code reached 448: the case does not exercise saturation"
    return f"{codes.numel()} codes, {scale.numel()} scales equal; {sat} codes at +-448"


def _case_quant_empty() -> str:
    codes, scale = _quantize_kernel(torch.zeros(0, 576, dtype=torch.bfloat16), FP8_ACT_UE8M0)
    assert codes.shape == (0, 576) and scale.shape == (0, 5) and scale.dtype == torch.uint8
    return "M = 0: empty outputs"


def _case_gemm_bound(m, n, k, encoding, recipe_name) -> str:
    return _bound_check(m, n, k, seed=m + n + k, encoding=encoding, recipe=RECIPES[recipe_name], device="cpu")


def _case_gemm_exact(m, n, k) -> str:
    act, wt, w_dec = _exact_operands(m, n, k, seed=3, device="cpu")
    y = _gemm(act, wt.e4m3_u8, w_dec)
    assert_bits_equal(y, fp8_block_gemm_f64(act, wt).to(torch.bfloat16), label=f"exact fp8 gemm {m}x{n}x{k}")
    return "bit-equal to the float64 result rounded once"


# (BT, BN, split, swap, pipe, group_t, tma): every tunable field of the sweep's candidates, the software-pipelined
# loop (pipe), tensor-descriptor loads (tma) and tiles wider than one 128-row weight-scale block (BN 256) included
_INVARIANCE_KEYS = (
    (16, 64, True, True, False, 8, False), (16, 64, False, True, False, 8, False),
    (64, 128, True, True, False, 8, False), (128, 128, False, True, False, 8, False),
    (64, 64, True, False, False, 8, False), (128, 128, False, False, False, 8, False),
    (16, 64, True, True, True, 8, False), (64, 128, False, True, True, 1, False),
    (128, 128, True, False, True, 16, False), (64, 256, False, False, False, 8, False),
    (64, 256, True, False, True, 2, False), (16, 64, True, True, False, 8, True),
    (128, 128, False, False, False, 8, True), (128, 128, True, False, True, 8, True),
    (64, 128, False, True, True, 8, True))
_INVARIANCE_PARTS = ("rows", "keys0", "keys1", "ws")  # one interpreter case each (they balance over the children)


def _case_gemm_batch_invariance(n, k, part) -> str:
    """Rows alone (M = 1: 16-token tiles, split into chunks) equal the same rows in a batch of 70
    (128 x 64 tiles) and of 20 (part "rows"); explicit keys (split or not, other token tiles) give the routed
    key's bits on those 20 rows (parts "keys0" / "keys1": the two halves of _INVARIANCE_KEYS; "ws")."""
    from kernels.sm90.gemm_fp8_block import CompileKey

    wt, w_dec = _weight(n, k, 5, "v4", "cpu")
    act = _activation(70, k, 6, FP8_ACT_F32, "cpu")
    part20 = Fp8Act1x128(act.e4m3_u8[:20], act.block_dec_scale[:20], "f32")
    base = CompileKey.for_shape(3, n, k, act_scale_ue8m0=False)
    if part == "rows":
        y = _gemm(act, wt.e4m3_u8, w_dec)
        for r in (0, 33, 69):
            one = Fp8Act1x128(act.e4m3_u8[r:r + 1], act.block_dec_scale[r:r + 1], "f32")
            assert_bits_equal(_gemm(one, wt.e4m3_u8, w_dec)[0], y[r], label=f"row {r} alone vs in M=70 ({n}x{k})")
        assert_bits_equal(_gemm(part20, wt.e4m3_u8, w_dec), y[:20], label=f"rows 0..19 in M=20 vs M=70 ({n}x{k})")
        return f"chunk plan {base.chunk_blocks} x {base.n_chunks}: rows alone, in 20 and in 70 bit-equal"
    y20 = _gemm(part20, wt.e4m3_u8, w_dec)  # the routed key at M = 20 ("rows": equal to the same rows in M = 70)
    keys = []
    if part in ("keys0", "keys1"):
        half = (len(_INVARIANCE_KEYS) + 1) // 2
        for bt, bn, split, swap, pipe, gt, tma in (_INVARIANCE_KEYS[:half] if part == "keys0"
                                                   else _INVARIANCE_KEYS[half:]):
            warps = max(4, 4 * ((bn if swap else bt) // 64))
            keys.append(CompileKey(**{**base.__dict__, "block_t": bt, "block_n": bn, "split": split and base.chunked,
                                      "num_warps": warps, "swap": swap, "pipe": pipe, "group_t": gt, "tma": tma}))
    elif part == "ws":
        # ws (the warp-specialized loop of the sweep's M > 64 candidates): the interpreter ignores
        # tl.range(warp_specialize=...) and runs the plain loop, so this checks the key's plumbing (num_warps 4 with
        # 128-token tiles, TMA), not the specialized code; the GPU test test_gpu_ws_tiles_bit_equal does that
        for bn, split in ((128, False), (128, True), (64, True)):
            keys.append(CompileKey(**{**base.__dict__, "block_t": 128, "block_n": bn, "split": split and base.chunked,
                                      "num_warps": 4, "swap": False, "pipe": False, "tma": True, "ws": True}))
    else:
        raise ValueError(f"part: {part!r}, expected one of {_INVARIANCE_PARTS}")
    for key in keys:
        assert_bits_equal(_gemm(part20, wt.e4m3_u8, w_dec, key=key), y20, label=f"key {key}")
    return f"chunk plan {base.chunk_blocks} x {base.n_chunks}: {len(keys)} keys bit-equal to the routed key"


def _case_fused_quant_gemm(m, n, k, recipe_name, cfg_json) -> str:
    """launch_fused (the quantizer in the GEMM's prologue) gives the separate quantizer's bytes and scales and
    the separate GEMM's output bits, on inputs with a zero group, NaN (as the recipe treats it) and 3e4."""
    import dataclasses

    from kernels.sm90 import gemm_fp8_block
    from kernels.sm90.gemm_fp8_block import CompileKey

    recipe = RECIPES[recipe_name]
    x = _special_input(m, k, seed=m * 7 + k, dtype=torch.bfloat16)
    wt, w_dec = _weight(n, k, 9, "v4", "cpu")
    codes, scale = _quantize_kernel(x, recipe)
    y = gemm_fp8_block.launch(codes, scale, wt.e4m3_u8, w_dec)
    key = dataclasses.replace(CompileKey.heuristic(m, n, k, act_scale_ue8m0=recipe.scale_rule == "ue8m0_ceil"),
                              **json.loads(cfg_json))
    yf, cf, sf = gemm_fp8_block.launch_fused(x, wt.e4m3_u8, w_dec, scale_rule=recipe.scale_rule,
                                             encode_rule=recipe.encode_rule, amax_nan=recipe.amax_nan,
                                             amax_floor_f32=recipe.amax_floor_f32, key=key)
    assert_bytes_equal(cf, codes, label=f"fused codes {m}x{k} {recipe_name}")
    _assert_scales_equal(sf, scale, label=f"fused scales {m}x{k} {recipe_name}")
    assert_bits_equal(yf, y, label=f"fused y {m}x{n}x{k} {recipe_name} {cfg_json}")
    return f"bytes, scales and output bit-equal ({cfg_json})"


def _ticket_launch(key, act: Fp8Act1x128, w_u8, w_dec):
    """One launch of `key` into an output pre-filled with NaN (0x7FC0): a reduce that never ran cannot pass."""
    import dataclasses

    from kernels.sm90 import gemm_fp8_block

    out = torch.full((act.e4m3_u8.shape[0], w_u8.shape[0]), float("nan"), dtype=torch.bfloat16)
    if key.tma and not gemm_fp8_block._tma_ok(act.e4m3_u8, w_u8):  # as launch() does (16-byte row strides)
        key = dataclasses.replace(key, tma=False)
    gemm_fp8_block._compile(key)(act.e4m3_u8, act.block_dec_scale, w_u8, w_dec, out)
    return out


def _cancelling_chunks(m: int, n: int, k: int, chunk_blocks: int):
    """(act, weight codes u8, weight block scales f32) whose chunk-1 partials are exactly minus the chunk-0
    ones and 2^12 times larger than the rest: chunk 1's activation codes and scales copy chunk 0's, its weight
    codes are chunk 0's with the sign bit flipped, same block scales, both chunks' scales times 2^12. Summed in
    chunk order the two cancel exactly ((0 + p0) + p1 = 0) and the small chunks survive; in most other orders
    p0 swallows the low bits of a small chunk first, so a reduce that reorders the chunks changes the bf16
    output (a reduce with chunks 1 and 2 swapped, or reversed, fails the ticket case: tried)."""
    act = _activation(m, k, 72, FP8_ACT_UE8M0, "cpu")
    wt, w_dec = _weight(n, k, 71, "v4", "cpu")
    a, sa, w, sw = act.e4m3_u8.clone(), act.block_dec_scale.clone(), wt.e4m3_u8.clone(), w_dec.clone()
    cb, width = chunk_blocks, chunk_blocks * 128
    assert 2 * width <= k
    a[:, width:2 * width] = a[:, :width]
    sa[:, cb:2 * cb] = sa[:, :cb]
    w[:, width:2 * width] = w[:, :width] ^ 0x80
    sw[:, cb:2 * cb] = sw[:, :cb]
    sw[:, :2 * cb] *= 2.0**12
    return Fp8Act1x128(a, sa, "ue8m0"), w, sw.contiguous()


@contextlib.contextmanager
def _split_arrival_rotated():
    """Interpreter only: the split programs of output tile (x, y) run in the order z = r, r + 1, ... (mod the
    split count), r = (7x + 3y + 1) mod it, instead of 0, 1, ...: the last program to arrive, the one that
    reduces, is a different chunk from tile to tile (often not the last chunk), as on a GPU."""
    from triton.runtime import interpreter

    cls = interpreter.InterpreterBuilder
    original = cls.set_grid_idx

    def rotated(self, x, y, z):
        nz = self.grid_dim[2]
        return original(self, x, y, (z + 7 * x + 3 * y + 1) % nz)

    cls.set_grid_idx = rotated
    try:
        yield
    finally:
        cls.set_grid_idx = original


def _case_ticket_split(n, k, runs_json) -> str:
    """reduce="ticket" (the tile's last program adds the chunk partials, one launch) gives the bits of the
    split with the reduce launch and of the unsplit kernel, for each (M, tile) of runs_json (M = 1..70: partial
    token tiles and several token tiles under the raster; weight- / token-major, TMA, pipe; the 4-chunk
    unrolled reduce of small tiles and the plain one), on operands where a reordered reduce fails
    (_cancelling_chunks); each launched twice on the SAME counters (a 64-counter eager buffer: every launch
    takes slice 0), the second time with the split programs' arrival order rotated per output tile
    (_split_arrival_rotated: the reducing program is then mostly not the last chunk's), every counter back at
    zero after each launch."""
    import dataclasses

    from kernels.sm90 import gemm_fp8_block
    from kernels.sm90._tickets import Tickets
    from kernels.sm90.gemm_fp8_block import CompileKey

    cpu = torch.device("cpu")
    tickets = gemm_fp8_block._tickets[cpu] = Tickets(cpu, eager=64, captured=64, owner="gemm_fp8_block")
    base = CompileKey.heuristic(70, n, k, act_scale_ue8m0=True)
    assert base.n_chunks > 2, "the case needs three chunks or more"
    act, w_u8, w_dec = _cancelling_chunks(70, n, k, base.chunk_blocks)
    launches = 0
    for m, tile in json.loads(runs_json):
        sub = Fp8Act1x128(act.e4m3_u8[:m], act.block_dec_scale[:m], "ue8m0")
        key = dataclasses.replace(base, split=True, reduce="ticket", **tile)
        unsplit = _gemm(sub, w_u8, w_dec, key=dataclasses.replace(key, split=False, reduce="kernel"))
        split = _gemm(sub, w_u8, w_dec, key=dataclasses.replace(key, reduce="kernel"))
        assert_bits_equal(split, unsplit, label=f"split + reduce launch vs unsplit M={m} {tile} ({n}x{k})")
        for rep in range(2):  # the second launch with the arrival order rotated per tile
            with _split_arrival_rotated() if rep else contextlib.nullcontext():
                got = _ticket_launch(key, sub, w_u8, w_dec)
            assert_bits_equal(got, split, label=f"ticket launch {rep} vs split + reduce launch M={m} {tile} ({n}x{k})")
            launches += 1
            assert tickets.eager_next == 64, "the launch did not take counter slice 0"
            assert tickets.nonzero() == 0, f"counters not reset after ticket launch M={m} {tile}"
    return f"{base.n_chunks} chunks of {base.chunk_blocks} groups: {launches} ticket launches bit-equal, counters reset"


CASES = {
    **{f"quant-{r}-{m}x{k}-{d}": (_case_quant, (r, m, k, d))
       for r in RECIPES for (m, k, d) in ((3, 576, "bfloat16"), (9, 1024, "bfloat16"))},
    **{f"quant-{r}-{m}x{k}-{d}": (_case_quant, (r, m, k, d))
       for r in ("fp8_ue8m0", "fp8_f32") for (m, k, d) in ((1, 7168, "bfloat16"), (4, 200, "float16"),
                                                           (2, 1100, "float32"))},
    "quant-empty": (_case_quant_empty, ()),
    **{f"gemm-bound-{m}x{n}x{k}-{e}-{r}": (_case_gemm_bound, (m, n, k, e, r))
       for (m, n, k, e, r) in ((1, 192, 576, "v4", "fp8_ue8m0"), (1, 130, 1024, "v3", "fp8_f32"),
                               (5, 130, 1024, "v3", "fp8_f32"), (70, 256, 384, "v4", "fp8_f32"),
                               (3, 64, 200, "v3", "fp8_ue8m0"), (17, 576, 576, "v4", "fp8_ue8m0"))},
    **{f"gemm-exact-{m}x{n}x{k}": (_case_gemm_exact, (m, n, k)) for (m, n, k) in ((1, 200, 576), (40, 130, 1024))},
    **{f"gemm-batch-invariance-{n}x{k}-{part}": (_case_gemm_batch_invariance, (n, k, part))
       for (n, k) in ((4224, 1024), (192, 576)) for part in _INVARIANCE_PARTS},
    **{f"gemm-fused-quant-{m}x{n}x{k}-{r}-{i}": (_case_fused_quant_gemm, (m, n, k, r, c))
       for i, (m, n, k, r, c) in enumerate((
           (3, 200, 576, "fp8_ue8m0", "{}"), (5, 130, 1100, "fp8_f32", '{"split": false}'),
           (2, 192, 576, "fp8_f32_recip", '{"pipe": true}'), (9, 256, 384, "fp8_ue8m0_nan_ignore", '{"split": true}'),
           (20, 256, 384, "fp8_f32_floor1e-10", '{"swap": false, "block_t": 64, "block_n": 128}'),
           (3, 192, 576, "fp8_ue8m0", '{"split": true, "reduce": "ticket"}'),
           (17, 130, 1100, "fp8_f32", '{"split": true, "reduce": "ticket", "pipe": true}')))},
    # N 192 / K 576: 5 chunks of 1 group, partial K; N 130 / K 1100: 9 chunks, partial N and K tiles; N 2112 /
    # K 1100: 5 chunks of 2 groups (the last one group), 33 weight tiles
    **{f"gemm-ticket-split-{n}x{k}-{i}": (_case_ticket_split, (n, k, json.dumps(runs)))
       for i, (n, k, runs) in enumerate((
           (192, 576, [(m, dict(block_n=64, block_t=16, num_warps=4)) for m in (1, 5, 20)]
            + [(20, dict(block_n=64, block_t=32, num_warps=4, tma=True)),
               (70, dict(block_n=128, block_t=64, num_warps=4, swap=False, tma=True)),
               (70, dict(block_n=64, block_t=64, num_warps=4, swap=False, pipe=True))]),
           (130, 1100, [(1, dict(block_n=64, block_t=16, num_warps=4, tma=True)),
                        (20, dict(block_n=64, block_t=16, num_warps=4)),
                        (70, dict(block_n=128, block_t=64, num_warps=8, pipe=True))]),
           (2112, 1100, [(1, dict(block_n=64, block_t=16, num_warps=4)),
                         (5, dict(block_n=64, block_t=16, num_warps=4)),
                         (20, dict(block_n=64, block_t=32, num_warps=4))])))},
}


# CPU seconds of the interpreter's longest cases (measured on a CI-like 2-core host; the others take about 1 s):
# only how the cases are dealt to the children (verify/tests/_interpreter_children.py) depends on them
_CPU_SECONDS = {"gemm-batch-invariance-4224x1024-rows": 30.4, "gemm-batch-invariance-4224x1024-keys0": 56.8,
                "gemm-batch-invariance-4224x1024-keys1": 26.9, "gemm-batch-invariance-4224x1024-ws": 21.4,
                "gemm-ticket-split-2112x1100-2": 61.1, "gemm-ticket-split-192x576-0": 11.2,
                "gemm-ticket-split-130x1100-1": 9.6}



@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_cases(__file__, list(CASES), tmp_path_factory.mktemp("sm90_fp8"), cpu_seconds=_CPU_SECONDS)


@pytest.mark.skipif(CUDA, reason="CPU interpreter cases (on a GPU the kernels run natively in the GPU tests)")
@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_case(interpreter_results, case):
    r = interpreter_results[case]
    assert r["ok"], r["message"]


# ============================================================================= bad input (no kernel runs)


@pytest.mark.parametrize("bad", ["x_int", "x_3d", "scale_rule", "floor"])
def test_quantize_refuses_bad_input_naming_it(bad):
    from kernels.sm90 import quantize_fp8_1x128

    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    kw = {"scale_rule": "f32"}
    name = {"x_int": "x", "x_3d": "x", "scale_rule": "scale_rule", "floor": "amax_floor_f32"}[bad]
    if bad == "x_int":
        x = torch.zeros(2, 256, dtype=torch.int32)
    elif bad == "x_3d":
        x = torch.zeros(2, 2, 128, dtype=torch.bfloat16)
    elif bad == "scale_rule":
        kw = {"scale_rule": "ue8m0_floor"}
    else:
        kw["amax_floor_f32"] = 0.0
    with pytest.raises(ValueError, match=name):
        quantize_fp8_1x128.launch(x, **kw)


@pytest.mark.parametrize("bad", ["k_mismatch", "a_scale_shape", "w_scale_dtype", "w_scale_transposed"])
def test_gemm_refuses_bad_input_naming_it(bad):
    from kernels.sm90 import gemm_fp8_block

    a, sa = torch.zeros(2, 576, dtype=torch.uint8), torch.ones(2, 5)
    w, sw = torch.zeros(256, 576, dtype=torch.uint8), torch.ones(2, 5)
    name = {"k_mismatch": "w_u8", "a_scale_shape": "a_scale", "w_scale_dtype": "w_block_dec_f32",
            "w_scale_transposed": "w_block_dec_f32"}[bad]
    if bad == "k_mismatch":
        w = torch.zeros(256, 512, dtype=torch.uint8)
    elif bad == "a_scale_shape":
        sa = torch.ones(2, 4)
    elif bad == "w_scale_dtype":
        sw = torch.ones(2, 5, dtype=torch.bfloat16)
    else:
        sw = torch.ones(5, 2)
    with pytest.raises(ValueError, match=name):
        gemm_fp8_block.launch(a, sa, w, sw)


def test_chunk_plan_depends_on_n_and_k_only_and_covers_k():
    """The summation order's only parameters: every group in exactly one chunk, for every V4 shape."""
    from kernels.sm90.gemm_fp8_block import CompileKey, chunk_plan

    for _, n, k in V4_PRO_SHAPES + V4_FLASH_SHAPES + PARTIAL_SHAPES:
        cb, nc = chunk_plan(n, k)
        groups = -(-k // 128)
        assert (nc - 1) * cb < groups <= nc * cb, (n, k, cb, nc)
        keys = {CompileKey.for_shape(m, n, k, act_scale_ue8m0=True, num_sms=s) for m in (1, 16, 64, 128, 4096)
                for s in (78, 114, 132)}
        assert {(key.groups, key.chunk_blocks, key.n_chunks) for key in keys} == {(groups, cb, nc)}


# ============================================================================= GPU


def _cuda_act(m, k, seed, recipe):
    return _activation(m, k, seed, recipe, "cuda")


@pytest.mark.parametrize("recipe", ["fp8_ue8m0", "fp8_f32", "fp8_f32_recip", "fp8_ue8m0_nan_ignore"])
@pytest.mark.parametrize("m,k", [(1, 7168), (4096, 7168), (64, 576), (33, 1536)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_quantize_bytes_equal_reference(m, k, recipe):
    r = RECIPES[recipe]
    x = _special_input(m, k, seed=m + k, dtype=torch.bfloat16, device="cuda")
    codes, scale = _quantize_kernel(x, r)
    ref = quantize_act_fp8_1x128(x, recipe=r)
    assert_bytes_equal(codes, ref.e4m3_u8, label=f"fp8 act codes sm90 {recipe} {m}x{k}")
    _assert_scales_equal(scale, ref.block_dec_scale, label=f"fp8 act scales sm90 {recipe} {m}x{k}")


_GPU_BOUND = ([(1, n, k, f"pro-{s}") for s, n, k in V4_PRO_SHAPES]
              + [(64, n, k, f"pro-{s}") for s, n, k in V4_PRO_SHAPES]
              + [(1, n, k, f"flash-{s}") for s, n, k in V4_FLASH_SHAPES]
              + [(m, n, k, s) for s, n, k in PARTIAL_SHAPES for m in (1, 300)]
              + [(300, 3072, 7168, "pro-w1_w3"), (200, 7168, 3072, "pro-w2")])


@pytest.mark.parametrize("m,n,k,name", _GPU_BOUND, ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gemm_within_bound_at_v4_shapes(m, n, k, name):
    recipe = FP8_ACT_F32 if name.startswith(("n576", "k576")) else FP8_ACT_UE8M0  # f32 act scales: partial shapes
    enc = "v4" if name.startswith("pro") else "v3"
    print(f"{name} M={m}: {_bound_check(m, n, k, seed=n + k, encoding=enc, recipe=recipe, device='cuda')}")


@pytest.mark.parametrize("m,n,k", [(1, 1536, 7168), (64, 7168, 3072), (4096, 512, 7168)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gemm_exact_data(m, n, k):
    act, wt, w_dec = _exact_operands(m, n, k, seed=9, device="cuda")
    y = _gemm(act, wt.e4m3_u8, w_dec)
    assert_bits_equal(y, fp8_block_gemm_f64(act, wt).to(torch.bfloat16), label=f"exact fp8 gemm sm90 {m}x{n}x{k}")


@pytest.mark.parametrize("n,k", [(1536, 7168), (512, 7168), (7168, 16384), (65536, 1536), (7168, 576)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gemm_batch_invariant(n, k):
    """Rows alone (M = 1), in M = 16, 64, 128 and 4096: the same bits (tiles and splits differ by M)."""
    wt, w_dec = _weight(n, k, 21, "v4", "cuda")
    big = _cuda_act(4096, k, 22, FP8_ACT_UE8M0)
    y = _gemm(big, wt.e4m3_u8, w_dec)
    for m in (1, 16, 64, 128):
        sub = Fp8Act1x128(big.e4m3_u8[:m].clone(), big.block_dec_scale[:m].clone(), "ue8m0")
        assert_bits_equal(_gemm(sub, wt.e4m3_u8, w_dec), y[:m], label=f"rows 0..{m - 1} in M={m} vs M=4096 ({n}x{k})")
    last = Fp8Act1x128(big.e4m3_u8[-1:].clone(), big.block_dec_scale[-1:].clone(), "ue8m0")
    assert_bits_equal(_gemm(last, wt.e4m3_u8, w_dec)[0], y[-1], label=f"row 4095 alone vs in M=4096 ({n}x{k})")


def _token_major_key(m: int, n: int, k: int, *, split: bool | None = None):
    """The token-major layout (swap=False: 128 tokens on two warpgroups x 128 weight rows) for M = m."""
    import dataclasses

    from kernels.sm90.gemm_fp8_block import CompileKey

    key = CompileKey.heuristic(m, n, k, act_scale_ue8m0=True)
    split = key.split if split is None else split
    return dataclasses.replace(key, block_n=128, block_t=128, num_warps=8, num_stages=4, swap=False,
                               split=split and key.chunked)


@pytest.mark.parametrize("n,k", [(1536, 7168), (512, 7168), (7168, 16384), (65536, 1536), (7168, 576)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gemm_token_major_tiles_bit_equal_to_weight_major(n, k):
    """Tokens on the wgmma's M side (the layout for large M) give the same bits as the weight-major
    (swap AB) layout of decode sizes, unsplit at M = 4096 and split at M = 128."""
    wt, w_dec = _weight(n, k, 21, "v4", "cuda")
    big = _cuda_act(4096, k, 22, FP8_ACT_UE8M0)
    from kernels.sm90.gemm_fp8_block import CompileKey

    swap_key = CompileKey.heuristic(4096, n, k, act_scale_ue8m0=True)  # weight-major whatever the table routes
    assert swap_key.swap
    y = _gemm(big, wt.e4m3_u8, w_dec, key=swap_key)
    assert_bits_equal(_gemm(big, wt.e4m3_u8, w_dec, key=_token_major_key(4096, n, k, split=False)), y,
                      label=f"token-major vs weight-major M=4096 ({n}x{k})")
    sub = Fp8Act1x128(big.e4m3_u8[:128].clone(), big.block_dec_scale[:128].clone(), "ue8m0")
    assert_bits_equal(_gemm(sub, wt.e4m3_u8, w_dec, key=_token_major_key(128, n, k, split=True)), y[:128],
                      label=f"token-major split M=128 vs M=4096 ({n}x{k})")


@pytest.mark.parametrize("n,k", [(7168, 16384), (65536, 1536), (7168, 576), (576, 7168)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.skipif(os.environ.get("NVFP4V_FP8_WS_EXPERIMENT") != "1",
                    reason="ws experiment only (NVFP4V_FP8_WS_EXPERIMENT=1): on an H200 this test gave no result "
                           "in 60 s twice (2026-12-06), so ws launches are refused and the sweep has no ws candidates")
def test_gpu_ws_tiles_bit_equal(n, k):
    """The warp-specialized group loop (CompileKey.ws: 12 warps from num_warps 4, a TMA producer and two math
    warpgroups) gives the weight-major heuristic's bits: unsplit and split at M = 4096, split at M = 128 and
    at M = 200 (a partial 128-token tile), partial N / K (576); and the launched kernel is specialized."""
    import dataclasses

    from kernels.sm90 import gemm_fp8_block
    from kernels.sm90.gemm_fp8_block import CompileKey

    wt, w_dec = _weight(n, k, 23, "v4", "cuda")
    big = _cuda_act(4096, k, 24, FP8_ACT_UE8M0)
    y = _gemm(big, wt.e4m3_u8, w_dec, key=CompileKey.heuristic(4096, n, k, act_scale_ue8m0=True))
    base = CompileKey.heuristic(4096, n, k, act_scale_ue8m0=True)
    for m, bn, split in ((4096, 128, False), (4096, 128, True), (128, 128, True), (200, 64, True), (128, 128, False)):
        key = dataclasses.replace(base, block_n=bn, block_t=128, num_warps=4, num_stages=4, swap=False, tma=True,
                                  ws=True, split=split and base.chunked)
        sub = Fp8Act1x128(big.e4m3_u8[:m].clone(), big.block_dec_scale[:m].clone(), "ue8m0")
        assert_bits_equal(_gemm(sub, wt.e4m3_u8, w_dec, key=key), y[:m], label=f"ws M={m} {key.config()} ({n}x{k})")
        compiled = gemm_fp8_block._LAST_COMPILED.get(key)
        assert compiled is not None and compiled.metadata.num_warps == 12, (key, getattr(compiled, "metadata", None))


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("n,k", [(1536, 7168), (512, 7168), (7168, 16384), (65536, 1536), (7168, 576)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_fused_quant_gemm_bit_equal_and_capturable(n, k, m):
    """launch_fused (quantizer in the GEMM's prologue, what a committed fused_q config routes linear_fp8 to):
    the separate quantizer's bytes and scales, the separate GEMM's output bits, and graph replay equal."""
    from kernels.sm90 import gemm_fp8_block, quantize_fp8_1x128

    wt, w_dec = _weight(n, k, 61, "v4", "cuda")
    g = torch.Generator(device="cuda").manual_seed(62)
    x = (torch.randn(m, k, generator=g, device="cuda") * 3).to(torch.bfloat16)
    codes, scale = quantize_fp8_1x128.launch(x, scale_rule="ue8m0_ceil")
    y = gemm_fp8_block.launch(codes, scale, wt.e4m3_u8, w_dec)
    yf, cf, sf = gemm_fp8_block.launch_fused(x, wt.e4m3_u8, w_dec, scale_rule="ue8m0_ceil")
    assert_bytes_equal(cf, codes, label="fused codes")
    assert_bytes_equal(sf, scale, label="fused scales")
    assert_bits_equal(yf, y, label=f"fused y {m}x{n}x{k}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm_fp8_block.launch_fused(x, wt.e4m3_u8, w_dec, scale_rule="ue8m0_ceil")[0]
    x.mul_(-2)
    graph.replay()
    torch.cuda.synchronize()
    assert_bits_equal(out, gemm_fp8_block.launch(*quantize_fp8_1x128.launch(x, scale_rule="ue8m0_ceil"), wt.e4m3_u8,
                                                 w_dec), label="fused graph replay")


@pytest.mark.parametrize("n,k", [(576, 7168), (7168, 576)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_every_sweep_candidate_bit_equal_to_heuristic(n, k):
    """Every config the sweep may commit (kernels.sm90.gemm_fp8_block_configs.candidates, at its own M
    bucket: split or not, token- or weight-major, pipelined, raster group) gives the bits of the heuristic
    key at M = 4096 on rows 0..M-1: the table can hold any of them without breaking batch invariance.
    Partial N tiles (576) and partial K (576), chunked and not."""
    from kernels.sm90.gemm_fp8_block import CompileKey
    from kernels.sm90.gemm_fp8_block_configs import candidates

    wt, w_dec = _weight(n, k, 51, "v4", "cuda")
    big = _cuda_act(4096, k, 52, FP8_ACT_UE8M0)
    y = _gemm(big, wt.e4m3_u8, w_dec, key=CompileKey.heuristic(4096, n, k, act_scale_ue8m0=True))
    seen = set()
    for m in (1, 16, 32, 64, 128, 4096):
        sub = Fp8Act1x128(big.e4m3_u8[:m], big.block_dec_scale[:m], "ue8m0")
        for cfg in candidates(m):
            key = CompileKey.from_config(n, k, cfg, act_scale_ue8m0=True)
            if key in seen:
                continue
            seen.add(key)
            assert_bits_equal(_gemm(sub, wt.e4m3_u8, w_dec, key=key), y[:m], label=f"M={m} {cfg} ({n}x{k})")


def _check_graph_replay(x: torch.Tensor, weight, g: torch.Generator, label: str) -> None:
    """linear_fp8(x, weight) (UE8M0 activation scales, compiled by an eager call before) captured once in a CUDA
    graph, then x refilled with new activations 3 times: each replay bit-equal to an eager call on the same x."""
    from kernels.sm90.fp8_linear import linear_fp8

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0]
    for i in range(3):
        x.copy_(torch.randn(*x.shape, generator=g, device="cuda") * (i + 1))
        graph.replay()
        torch.cuda.synchronize()
        assert_bits_equal(out, linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0], label=f"{label} {i}")


@pytest.mark.parametrize("m,n,k", [(1, 1536, 7168), (16, 512, 7168), (128, 7168, 3072), (4096, 3072, 7168)],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_linear_graph_replay_bit_equal_and_deterministic(m, n, k):
    """quantize + GEMM captured once, replayed on new activations: bit-equal to eager; eager twice equal."""
    from kernels.sm90.fp8_linear import linear_fp8, prepare_fp8_weight

    wt, w_dec = _weight(n, k, 31, "v4", "cuda")
    weight = prepare_fp8_weight(wt.e4m3_u8, w_dec)
    g = torch.Generator(device="cuda").manual_seed(32)
    x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    x.copy_(torch.randn(m, k, generator=g, device="cuda"))
    eager = linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0]           # compiles (warm-up)
    assert_bits_equal(linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0], eager, label="eager twice")
    _check_graph_replay(x, weight, g, "graph replay")


def _ticket_tables(n: int, k: int) -> dict:
    """A table routing (N, K) at every M bucket to a split config with reduce="ticket" (decode tiles with the
    fused quantizer at M <= 16, token-major 128 x 64 with TMA above), for the tests of linear_fp8's path."""
    from kernels.sm90.gemm_fp8_block_configs import FIELDS

    def cfg(**kw):
        base = dict(block_n=64, block_t=16, num_warps=4, num_stages=4, split=True, swap=True, group_t=8, pipe=False,
                    tma=False, fused_q=False, ws=False, reduce="ticket")
        return {f: {**base, **kw}[f] for f in FIELDS}

    return {(n, k): ((16, cfg(fused_q=True)), (4096, cfg(block_n=128, block_t=64, swap=False, tma=True)))}


@pytest.mark.parametrize("m", [1, 16, 64, 200])
@pytest.mark.parametrize("n,k", [(512, 7168), (1536, 7168), (576, 7168), (7168, 576)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_ticket_split_bit_equal_graph_replay_counters_reset(n, k, m):
    """reduce="ticket" (one launch: each output tile's last program adds the chunk partials in chunk order)
    gives the bits of the split with the reduce launch, of the unsplit kernel and of the M = 4096 reference
    rows, for every ticket candidate of M's bucket; captured in a CUDA graph and replayed 3 times on new
    activations it equals eager, and every ticket counter is back at zero after each launch and replay."""
    import dataclasses

    from kernels.sm90 import gemm_fp8_block
    from kernels.sm90.gemm_fp8_block import CompileKey
    from kernels.sm90.gemm_fp8_block_configs import candidates

    wt, w_dec = _weight(n, k, 81, "v4", "cuda")
    big = _cuda_act(4096, k, 82, FP8_ACT_UE8M0)
    y = _gemm(big, wt.e4m3_u8, w_dec, key=CompileKey.heuristic(4096, n, k, act_scale_ue8m0=True))
    a, sa = big.e4m3_u8[:m].clone(), big.block_dec_scale[:m].clone()
    sub = Fp8Act1x128(a, sa, "ue8m0")
    keys = [CompileKey.from_config(n, k, c, act_scale_ue8m0=True) for c in candidates(m) if c["reduce"] == "ticket"]
    assert keys and all(key.reduce == "ticket" and key.split for key in keys), keys
    dev = torch.device("cuda", torch.cuda.current_device())
    for key in keys:
        got = _gemm(sub, wt.e4m3_u8, w_dec, key=key)
        torch.cuda.synchronize()
        assert gemm_fp8_block._tickets[dev].nonzero() == 0, f"counters left after {key.config()}"
        assert_bits_equal(got, y[:m], label=f"ticket M={m} {key.config()} vs M=4096 rows ({n}x{k})")
        for ref in (dataclasses.replace(key, reduce="kernel"), dataclasses.replace(key, split=False, reduce="kernel")):
            assert_bits_equal(got, _gemm(sub, wt.e4m3_u8, w_dec, key=ref), label=f"ticket vs {ref.config()}")
    key = keys[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm_fp8_block.launch(a, sa, wt.e4m3_u8, w_dec, key=key)
    for i in range(3):
        rows = torch.randint(0, 4096, (m,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(i))
        a.copy_(big.e4m3_u8[rows])
        sa.copy_(big.block_dec_scale[rows])
        graph.replay()
        torch.cuda.synchronize()
        assert gemm_fp8_block._tickets[dev].nonzero() == 0, f"counters left after replay {i}"
        assert_bits_equal(out, y[rows], label=f"ticket graph replay {i} M={m} {key.config()} ({n}x{k})")


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("n,k", [(512, 7168), (1536, 7168), (7168, 576)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_linear_fp8_ticket_one_launch_graph_replay(n, k, m, monkeypatch):
    """linear_fp8 through a table of reduce="ticket" configs (the fused quantizer at M <= 16): bytes, scales
    and output bit-equal to quantize + GEMM with the reduce launch; ONE kernel per call at M <= 16 (quantize,
    GEMM and reduce; two at M = 64: quantize, GEMM + reduce), counted by the profiler; graph replay 3 times
    bit-equal with the counters back at zero."""
    from kernels.sm90 import gemm_fp8_block, gemm_fp8_block_configs, quantize_fp8_1x128
    from kernels.sm90.fp8_linear import linear_fp8, prepare_fp8_weight

    wt, w_dec = _weight(n, k, 91, "v4", "cuda")
    weight = prepare_fp8_weight(wt.e4m3_u8, w_dec)
    g = torch.Generator(device="cuda").manual_seed(92)
    x = (torch.randn(m, k, generator=g, device="cuda") * 3).to(torch.bfloat16)

    def separate():
        codes, scale = quantize_fp8_1x128.launch(x, scale_rule="ue8m0_ceil")
        return gemm_fp8_block.launch(codes, scale, wt.e4m3_u8, w_dec), codes, scale

    y, codes, scale = separate()  # the committed / heuristic route (reduce launch or unsplit)
    monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", _ticket_tables(n, k))
    key = gemm_fp8_block.CompileKey.for_shape(m, n, k, act_scale_ue8m0=True)
    assert key.split and key.reduce == "ticket" and key.fused_q is (m <= 16), key
    yt, ct, st = linear_fp8(x, weight, scale_rule="ue8m0_ceil")
    assert_bytes_equal(ct, codes, label="codes")
    assert_bytes_equal(st, scale, label="scales")
    assert_bits_equal(yt, y, label=f"linear_fp8 ticket M={m} ({n}x{k})")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        linear_fp8(x, weight, scale_rule="ue8m0_ceil")
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == (1 if m <= 16 else 2) and not any("reduce" in name for name in kernels), kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0]
    dev = torch.device("cuda", torch.cuda.current_device())
    for i in range(3):
        x.copy_((torch.randn(m, k, generator=g, device="cuda") * (i + 2)).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert gemm_fp8_block._tickets[dev].nonzero() == 0, f"counters left after replay {i}"
        monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", {})
        ref = separate()[0]
        monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", _ticket_tables(n, k))
        assert_bits_equal(out, ref, label=f"linear_fp8 ticket graph replay {i} M={m} ({n}x{k})")


# ============================================================================= bench

_BENCH_M = [1, 16, 64, 128, 4096]
_BENCH_ROWS: list[dict] = []
_L2_BYTES = 60 * 2**20


def _scaled_mm_blockwise(a_fp8, a_dec_f32, w_fp8, w_dec_f32):
    """torch._scaled_mm with DeepSeek blockwise scales (1x128 activations, 128x128 weights; cuBLASLt),
    or the one-line reason it is not available."""
    if not hasattr(torch, "_scaled_mm"):
        return None, "torch._scaled_mm missing"
    try:
        return (lambda: torch._scaled_mm(a_fp8, w_fp8.t(), scale_a=a_dec_f32.t().contiguous().t(),
                                         scale_b=w_dec_f32.t(), out_dtype=torch.bfloat16)), None
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def _dump_bench():
    d = os.environ.get("NVFP4V_REPORT_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "sm90_fp8_bench.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": _BENCH_ROWS}, f, indent=1)


@pytest.mark.bench
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("name,n,k", V4_PRO_SHAPES, ids=[s for s, _, _ in V4_PRO_SHAPES])
def test_bench_fp8_gemm_v4_pro(name, n, k):
    from kernels.sm90 import gemm_fp8_block
    from verify.tests._cuda_timing import copy_bandwidth, time_graph

    if not _BENCH_ROWS:  # the device's copy bandwidth, once per run (the same run as the ratios)
        bw = copy_bandwidth(warmup=20)[0]
        _BENCH_ROWS.append({"copy_GBps": bw / 1e9, "device": torch.cuda.get_device_name()})
        print(f"\n[{torch.cuda.get_device_name()}] copy bandwidth (read+write): {bw / 1e9:.0f} GB/s")

    wt, w_dec = _weight(n, k, 41, "v4", "cuda")
    w_fp8 = wt.e4m3_u8.view(torch.float8_e4m3fn)
    w_bf16 = (wt.decode_f64().to(torch.bfloat16))
    copies = max(1, min(8, -(-2 * _L2_BYTES // (n * k))))
    ws = [wt.e4m3_u8.clone() for _ in range(copies)]
    wbs = [w_bf16.clone() for _ in range(max(1, min(4, -(-2 * _L2_BYTES // (2 * n * k)))))]
    lines = []
    for m in _BENCH_M:
        act = _cuda_act(m, k, 42, FP8_ACT_UE8M0)
        x_bf16 = act.decode_f64().to(torch.bfloat16)
        calls = max(copies, 10 if m <= 128 else 3)
        ours = time_graph([(lambda w=ws[i % copies]: gemm_fp8_block.launch(act.e4m3_u8, act.block_dec_scale, w, w_dec))
                           for i in range(calls)])
        bf16 = time_graph([(lambda w=wbs[i % len(wbs)]: x_bf16 @ w.t()) for i in range(calls)])
        fn, why = _scaled_mm_blockwise(act.e4m3_u8.view(torch.float8_e4m3fn), act.block_dec_scale_f32(), w_fp8, w_dec)
        blk = None
        if fn is not None:
            try:
                fn()
                torch.cuda.synchronize()
                blk = time_graph([fn] * calls)
            except Exception as exc:  # noqa: BLE001 - M = 1 is not supported by cuBLASLt: reported
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
                torch.cuda.synchronize()
        tm = None
        if m >= 128:  # the token-major layout (swap=False), timed beside the routed one
            tkey = _token_major_key(m, n, k)
            tm = time_graph([(lambda w=ws[i % copies]: gemm_fp8_block.launch(act.e4m3_u8, act.block_dec_scale, w, w_dec,
                                                                             key=tkey)) for i in range(calls)])
        key = gemm_fp8_block.CompileKey.for_shape(m, n, k, act_scale_ue8m0=True,
                                                  num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
        row = {"name": name, "M": m, "N": n, "K": k, "ours_us": ours * 1e6, "bf16_us": bf16 * 1e6,
               "blockwise_us": None if blk is None else blk * 1e6, "blockwise_error": why,
               "token_major_us": None if tm is None else tm * 1e6, "x_bf16": bf16 / ours,
               "x_blockwise": None if blk is None else blk / ours,
               "TFLOPs": 2 * m * n * k / ours / 1e12, "weight_GBps": n * k / ours / 1e9,
               "path": f"{'swap' if key.swap else 'tok'} BN{key.block_n} BT{key.block_t} w{key.num_warps} "
                       f"s{key.num_stages} {'split ' + str(key.n_chunks) if key.split else 'one pass'}"
                       f"{' ticket' if key.reduce == 'ticket' else ''}"
                       f"{' pipe' if key.pipe else ''}{' tma' if key.tma else ''}"}
        _BENCH_ROWS.append(row)
        blk_s = f"{row['blockwise_us']:9.2f} {row['x_blockwise']:6.2f}" if blk is not None else f"   n/a ({why})"
        tm_s = f"{tm * 1e6:9.2f} {bf16 / tm:6.2f} {'-' if blk is None else f'{blk / tm:6.2f}'}" if tm else " " * 21
        lines.append(f"{name:6} {m:5} {n:6} {k:6} {row['ours_us']:9.2f} {row['bf16_us']:9.2f} {row['x_bf16']:6.2f} "
                     f"{blk_s}  {row['TFLOPs']:7.1f} {row['weight_GBps']:7.0f}  {row['path']} | token-major: {tm_s}")
    print(f"\n[{torch.cuda.get_device_name()}] name       M      N      K   ours_us   bf16_us x_bf16  blkw_us x_blkw"
          f"   TFLOP/s  wGB/s  path | token-major: us x_bf16 x_blkw")
    print("\n".join(lines))
    _dump_bench()


if __name__ == "__main__":
    child_main(sys.argv[1:], CASES)


# ============================================================================= the Gluon kernel (CompileKey.gluon)
# the 9 V4-Pro FP8 linears of the sweep (verify/tests/_fp8_sweep.V4_PRO_FP8) and the partial N / K shapes
GLUON_SHAPES = [("wq_a", 1536, 7168), ("wkv", 512, 7168), ("wq_b", 65536, 1536), ("wo_a", 16384, 4096),
                ("wo_b", 7168, 16384), ("idx_wq_b", 8192, 1536), ("shared_l1", 3072, 7168),
                ("shared_l2", 7168, 3072), ("mtp_e_h_proj", 7168, 7168), *PARTIAL_SHAPES]


def _gluon_keys(m: int, n: int, k: int, ue8m0: bool) -> list:
    """Every Gluon config the sweep times at M's bucket (verify/tests/_fp8_sweep.candidates), as keys of (N, K)."""
    from kernels.sm90.gemm_fp8_block import CompileKey
    from verify.tests._fp8_sweep import shape_candidates

    keys = {CompileKey.from_config(n, k, c, act_scale_ue8m0=ue8m0) for c in shape_candidates(m, n, k)
            if c.get("gluon")}
    assert keys, m
    return sorted(keys, key=str)


def _ran_gluon(key, call):
    """call()'s result, asserting that it launched the Gluon kernel for `key` (launch records the key it really
    compiled: a fallback to the Triton kernel records another key, so `key` is dropped first)."""
    from kernels.sm90 import gemm_fp8_block

    gemm_fp8_block._LAST_COMPILED.pop(key, None)
    out = call()
    assert gemm_fp8_block._LAST_COMPILED.get(key) is not None, f"{key.config()}: the Gluon kernel did not run"
    return out


# (M, its bucket): the 128 bucket at a full and a partial token tile; every 4096-bucket key (M = 257..4096 routes
# there) at M = 200, 1000, 4000 (partial last tiles, persistent programs with unequal tile counts) and 4096
GLUON_MS = ((128, 128), (200, 128), (200, 4096), (1000, 4096), (4000, 4096), (4096, 4096))


def _check_gluon_keys(n: int, k: int, recipe: str, keys_of_bucket, seed: int) -> None:
    """Each Gluon key of keys_of_bucket(bucket) at the Ms of GLUON_MS gives the bits of the Triton kernel with the
    same chunk plan (the weight-major heuristic at M = 4096, rows 0..M-1), and really ran."""
    from kernels.sm90.gemm_fp8_block import CompileKey

    r = RECIPES[recipe]
    ue8m0 = r.scale_storage == "ue8m0"
    wt, w_dec = _weight(n, k, seed, "v4", "cuda")
    big = _cuda_act(4096, k, seed + 1, r)
    y = _gemm(big, wt.e4m3_u8, w_dec, key=CompileKey.heuristic(4096, n, k, act_scale_ue8m0=ue8m0))
    assert bool(torch.isfinite(y.float()).all()) and bool((y != 0).any()), "reference output: non-finite or all zero"
    for m, bucket in GLUON_MS:
        sub = Fp8Act1x128(big.e4m3_u8[:m].clone(), big.block_dec_scale[:m].clone(), big.scale_storage)
        keys = keys_of_bucket(bucket, ue8m0)
        assert keys and all(key.gluon for key in keys), keys
        for key in keys:
            got = _ran_gluon(key, lambda: _gemm(sub, wt.e4m3_u8, w_dec, key=key))
            assert_bits_equal(got, y[:m], label=f"gluon M={m} {key.config()} ({n}x{k}) {recipe} vs the Triton "
                                                f"heuristic's M=4096 rows")


@pytest.mark.parametrize("recipe", ["fp8_ue8m0", "fp8_f32"])
@pytest.mark.parametrize("name,n,k", GLUON_SHAPES, ids=[s[0] for s in GLUON_SHAPES])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gluon_bit_equal_to_triton(name, n, k, recipe):
    """The Gluon kernel's 128 x 128 tile (split-K at M's 128 bucket; one pass and persistent at 4096) and the
    three-accumulator loop's 128 x 64 tile (CompileKey.acc3; split at 128, one pass at 4096) and the producer-warp
    kernel's 128 x 128 tile (CompileKey.producer; split at 128, one pass at 4096) give the Triton kernel's
    bits at the 9 V4-Pro FP8 shapes and partial N / K (576), the Ms of GLUON_MS, UE8M0 and float32 activation scales
    (chunked and one-chunk plans; the acc3 loop's tails of 0, 1 and 2 groups: unsplit G = 56 / 128 / 32 / 5 leave
    1, G = 12 / 24 leave 2, split chunks of 10 / 16 / 19 groups leave 0)."""
    from kernels.sm90.gemm_fp8_block import CompileKey
    from verify.tests._fp8_sweep import _gl, _gl3, _glp, _glw

    def keys(bucket, ue8m0):
        cfgs = ([_gl(128, 128, 4, True), _gl3(128, 4, True), _glw(128, 128, 4, True)] if bucket <= 256
                else [_gl(128, 128, 4, False), _glp(128, 128, 4), _gl3(128, 4, False), _glw(128, 128, 4, False)])
        return [CompileKey.from_config(n, k, c, act_scale_ue8m0=ue8m0) for c in cfgs]

    _check_gluon_keys(n, k, recipe, keys, 91)


@pytest.mark.parametrize("recipe", ["fp8_ue8m0", "fp8_f32"])
@pytest.mark.parametrize("name,n,k", GLUON_SHAPES, ids=[s[0] for s in GLUON_SHAPES])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gluon_wide_bit_equal_to_triton(name, n, k, recipe):
    """The producer-warp kernel's 128 x 192 tile (CompileKey.block_n 192: a 128-row and a 64-row weight piece a
    tile, in either order) gives the Triton kernel's bits at the 9 V4-Pro FP8 shapes and partial N / K (576), the Ms
    of GLUON_MS (M tails 200 / 1000 / 4000), UE8M0 and float32 activation scales: split at M's 128 bucket, one pass
    (running totals in shared memory where chunked) at 4096, 3 ring stages (every shape) and 5 where the plan has one
    chunk; each also with its two math warpgroups as two partitions (CompileKey.dual). Edge tiles: N 7168 / 65536 end
    on a tile whose 128-row piece lies wholly past N (loaded from row N - 1, not stored), N 512 on one whose 64-row
    piece does; N 576 / 1536 / 3072 end on whole tiles."""
    from kernels.sm90.gemm_fp8_block import WIDE_BN, CompileKey, chunk_plan
    from verify.tests._fp8_sweep import _glw

    def keys(bucket, ue8m0):
        cfgs = ([_glw(WIDE_BN, 128, 3, True)] if bucket <= 256 else
                [_glw(WIDE_BN, 128, 3, False)] + ([_glw(WIDE_BN, 128, 5, False)] if chunk_plan(n, k)[1] == 1 else []))
        cfgs += [{**c, "dual": True} for c in cfgs]  # the same tiles with the warpgroups as two partitions
        keys = [CompileKey.from_config(n, k, c, act_scale_ue8m0=ue8m0) for c in cfgs]
        assert all(key.block_n == WIDE_BN and key.producer for key in keys), keys
        return keys

    _check_gluon_keys(n, k, recipe, keys, 97)


@pytest.mark.parametrize("n,k", [(7168, 16384), (65536, 1536), (576, 7168), (7168, 576)], ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_every_gluon_sweep_candidate_bit_equal_to_triton(n, k):
    """Every Gluon config the sweep may commit (verify/tests/_fp8_sweep.candidates at M's bucket: 128 x 128 / 128 x 64
    / 64 x 128, split or not, ring depth 3-6, raster group 8 / 16, persistent, the three-accumulator loop, the producer
    warp at 128 and 192 weight rows; shape_candidates: those the shape's key takes) gives the Triton kernel's bits:
    chunked (wo_b)
    and one-chunk (wq_b) plans, partial N and partial K."""
    _check_gluon_keys(n, k, "fp8_ue8m0", lambda bucket, ue8m0: _gluon_keys(bucket, n, k, ue8m0), 95)


@pytest.mark.parametrize("m,n,k,big", [(128, 1536, 7168, "persistent"), (200, 7168, 576, "persistent"),
                                       (4096, 65536, 1536, "persistent"), (4096, 7168, 16384, "persistent"),
                                       (4096, 1536, 7168, "producer"), (1000, 3072, 7168, "producer"),
                                       (4096, 16384, 4096, "wide"), (1000, 7168, 16384, "wide"),
                                       (4096, 65536, 1536, "dual"), (1000, 7168, 16384, "dual")],
                         ids=lambda v: str(v))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_gluon_graph_replay_bit_equal(m, n, k, big, monkeypatch):
    """linear_fp8 routed to a Gluon config by the table (split at M <= 256; above it persistent or the producer-warp
    kernel): captured once and replayed on new activations, bit-equal to eager (host tensor descriptors are kernel
    parameters: the captured launch reads the same buffers); the routed launch is the Gluon kernel."""
    from kernels.sm90 import gemm_fp8_block_configs
    from kernels.sm90.fp8_linear import linear_fp8, prepare_fp8_weight
    from kernels.sm90.gemm_fp8_block import CompileKey
    from verify.tests._fp8_sweep import _gl, _glp, _glw

    # above M 256: the persistent tile, the producer-warp kernel, or its 128 x 192 tile (block_n 192: the committed
    # table's M = 4096 pick on wo_a, wo_b, shared l1, MTP e/h_proj)
    above = {"persistent": _glp(128, 128, 4), "producer": _glw(128, 128, 4, False), "wide": _glw(192, 128, 3, False),
             "dual": {**_glw(192, 128, 3, False), "dual": True}}
    table = {(n, k): ((256, _gl(128, 128, 4, True)), (8192, above[big]))}
    monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", table)
    key = CompileKey.for_shape(m, n, k, act_scale_ue8m0=True)
    assert key.gluon, key
    wt, w_dec = _weight(n, k, 93, "v4", "cuda")
    weight = prepare_fp8_weight(wt.e4m3_u8, w_dec)
    g = torch.Generator(device="cuda").manual_seed(94)
    x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    x.copy_(torch.randn(m, k, generator=g, device="cuda"))
    eager = _ran_gluon(key, lambda: linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0])
    monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", {})
    assert_bits_equal(eager, linear_fp8(x, weight, scale_rule="ue8m0_ceil")[0], label="gluon vs the heuristic")
    monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", table)
    _check_graph_replay(x, weight, g, "gluon graph replay")
