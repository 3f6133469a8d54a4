"""Gluon body of the register-fed path of kernels.sm90.grouped_gemm_nvfp4 (issue 25 item 1).

The same GEMMs, schedule and epilogues as _grouped_gemm_nvfp4_jit.grouped_gemm_nvfp4_kernel, with the
structure of the dense wgmma path (_gemm_nvfp4_wgmma): the BN weight rows of an expert are the wgmma A
operand, decoded from a cp.async ring straight into the A-fragment registers (no shared-memory round
trip of the decoded tile), the BT tokens of one (expert, row tile) the B operand, an NVMMA-swizzled
[BT, 128] fp16 tile that each CTA decodes one K tile ahead into a double buffer.

Bits: the Triton kernel runs, per 128-K tile, tl.dot(w_lo, x_lo) then tl.dot(w_hi, x_hi) (lo = even k,
hi = odd k, 64 each), which its compile lowers to 8 wgmma k16 steps: step j < 4 over k = 2(16j + q),
step 4 + j over k = 2(16j + q) + 1, q = 0..15 the position inside the step. This kernel puts the same
element at the same place: A column L = 64n + b holds nibble n of byte b (k = 2b + n), so one
wgmma over K = 128 issues the same 8 steps with the same 16 products each, in the same order, on the
same fp16 values (e2m1 * 2^-14 times e4m3 * 2^7: exact, the same bits however they are formed); the
accumulation runs over K tiles 0..K_ITERS-1 in one chain (no split K: a split would add partial sums
in another order) and the epilogues are the Triton kernel's float32 expressions. So every output
element gets the same sequence of roundings: the same bits (GPU test: test_sm90_grouped_gemm.py).

Register fetch of the A operand: lane c (= lane % 4) of a quad owns A columns {2c, 2c+1, 2c+8, 2c+9}
of every k16 step, i.e. bytes b with (b >> 1) & 3 == c: the 16-bit half at byte 8ch + 2c of each 8-byte
chunk ch of its rows r and r + 8. Each thread reads those halves from the ring (16 two-byte loads a
tile; the ring is XOR-swizzled by 16-byte unit so the loads of a warp hit 16 distinct banks), the
decode turns each (byte, byte + 1) pair into the fp16x2 registers (low nibbles, high nibbles) that the
wgmma reads, and the converts into the A layout are register renamings (asserted trivial). The cost of
that order is that every thread needs all 8 block scales of its two rows (the dense path's lanes need 2):
the CTA converts each K tile's scale bytes once (4 a thread) into fp16 (s, s) pairs in shared memory,
one tile ahead, and each thread reads its 16 pairs back with 4 vector loads.

Pipeline, per K tile it (one CTA barrier): wait for ring tiles it, it + 1; barrier; read ring stage it % 4,
the converted scales of tile it and the scale bytes of tile it + 1; cp.async tile it + 3 into the stage
tile it - 1 used; convert tile it + 1's scales; decode B tile it + 1 from the activation halves loaded a
tile earlier; fence; wgmma on B tile it. The 4 ring stages and both double buffers are separate
allocations and the loop is unrolled by 4, so every index is static and Triton adds no barrier of its
own (with one dynamically indexed allocation it added two more a tile).

Rows of a tile past the expert's rows (or past N) are clamped to valid rows: each output element
depends only on its own token and weight row, so their columns are computed and masked at the store.
"""

import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from kernels.sm90._consts import DECODE_UNSCALE as _DECODE_UNSCALE
from kernels.sm90._e2m1_ptx import fragment_halves_to_f16x2_ptx, halves_to_f16x2_ptx
from kernels.sm90._grouped_gemm_nvfp4_jit import _round_to_bf16_f32 as _tl_round_to_bf16_f32
from kernels.sm90._te_math import e2m1_code_lt_zero_bits as _tl_e2m1_code, e4m3_rne_satfinite_u8 as _tl_e4m3_rne
from kernels.sm90._te_math import e4m3_u8_to_f32 as _tl_e4m3_to_f32

DECODE_UNSCALE = gl.constexpr(_DECODE_UNSCALE)


_HALVES_ASM = gl.constexpr(halves_to_f16x2_ptx())
_FRAGMENT_HALVES_ASM = gl.constexpr(fragment_halves_to_f16x2_ptx())  # weights in the fragment order

# _decode_halves: (row, chh, y, c, ch0, n) -> (row, n, chh, ch0, c, y), so A column L = 64 n + b (b = 16 chh + 8 ch0 +
# 2 c + y); a_column_k_order() replays it on the host (a CPU test compares it with the Triton kernel's order)
_A_PERM = gl.constexpr((0, 5, 1, 4, 3, 2))

# the Triton kernel's elementwise helpers, compiled as Gluon functions (the same float32 / integer expressions)
_round_to_bf16_f32 = gluon.jit(_tl_round_to_bf16_f32.fn)
_e2m1_code = gluon.jit(_tl_e2m1_code.fn)
_e4m3_rne_u8 = gluon.jit(_tl_e4m3_rne.fn)
_e4m3_to_f32 = gluon.jit(_tl_e4m3_to_f32.fn)


def a_column_k_order() -> list[int]:
    """k (within the 128-K tile) of each A / B column, as _decode_halves builds it: the asm outputs O0..O3 over
    (chh, y, c) hold nibble n of byte y of half 8 chh + 4 ch0 + c (O0: ch0 0, n 0; O1: 1, 0; O2: 0, 1; O3: 1, 1),
    joined as join(join(O0, O1), join(O2, O3)), permuted by _A_PERM and flattened (row dimension dropped)."""
    import itertools

    perm = [d - 1 for d in _A_PERM.value[1:]]  # the same permutation without the row dimension
    shape = (4, 2, 4, 2, 2)  # (chh, y, c, ch0, n)
    src = {idx: 2 * (2 * (8 * idx[0] + 4 * idx[3] + idx[2]) + idx[1]) + idx[4]
           for idx in itertools.product(*(range(d) for d in shape))}
    out_shape = [shape[d] for d in perm]
    order = []
    for out_idx in itertools.product(*(range(d) for d in out_shape)):  # row-major flatten of the permuted tensor
        idx = [0] * 5
        for pos, d in enumerate(perm):
            idx[d] = out_idx[pos]
        order.append(src[tuple(idx)])
    return order


def grouped_wgmma_layouts(num_warps: int, bt: int, wvec: int, e_pad: int) -> dict:
    """Layouts of grouped_gemm_nvfp4_wgmma_kernel: BN = 16 * num_warps weight rows (one 64-row wgmma tile per
    warpgroup), BT tokens, weight rows copied in wvec-byte pieces (16, or 8 when K % 32 != 0).

    The packed bytes are handled as 16-bit halves: half hx = 8 chh + 4 ch0 + c of a 64-byte tile row holds
    bytes 2 hx, 2 hx + 1 (k = 4 hx .. 4 hx + 3); its block scale is block ch = 2 chh + ch0."""
    lw = num_warps.bit_length() - 1
    assert 1 << lw == num_warps and num_warps % 4 == 0, num_warps
    assert bt in (8, 16, 32, 64), bt
    assert wvec in (8, 16), wvec
    bn = 16 * num_warps
    warps = [[16 << i, 0] for i in range(lw)]
    h_rd = gl.DistributedLinearLayout(  # weight halves (row, hx): lane c of a quad, rows r and r + 8
        reg_bases=[[0, 4], [0, 8], [0, 16], [8, 0]],
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=warps, block_bases=[], shape=[bn, 32])
    h4 = gl.DistributedLinearLayout(  # the same as (row, chh, ch0, c); ch0 first: the asm's register pair
        reg_bases=[[0, 0, 1, 0], [0, 1, 0, 0], [0, 2, 0, 0], [8, 0, 0, 0]],
        lane_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=[[16 << i, 0, 0, 0] for i in range(lw)], block_bases=[], shape=[bn, 4, 2, 4])
    # weight scales: converted once per tile by the CTA (4 bytes a thread, ring -> fp16 value * 2^7, each stored
    # twice), read back as the (s, s) pairs of rows r, r + 8 (16 fp16 a row: (ch, y); every lane of the quad)
    s_cv = gl.BlockedLayout([1, 4], [16, 2], [num_warps, 1], [1, 0])
    sd_rd = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0]],
        lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
        warp_bases=warps, block_bases=[], shape=[bn, 16])
    # activation halves (tok, chh, ch0, c): the ch0 pair of one (tok, chh, c) a thread
    x4 = gl.BlockedLayout([1, 1, 2, 1], [2, 4, 1, 4], [num_warps, 1, 1, 1], [2, 3, 1, 0])
    w_cp = gl.BlockedLayout([1, wvec // 2], [32 // (64 // wvec), 64 // wvec], [num_warps, 1], [1, 0])  # halves
    s_cp = gl.BlockedLayout([1, 4], [32, 1], [num_warps, 1], [1, 0])  # 4-byte scale words, 2 a row
    # ring: 16-byte units of a 64-byte row XOR (row // 2) % 4, so rows g = 0..7 of a warp spread over 16 banks
    ring_sh = gl.SwizzledSharedLayout(8, 2, 4, [1, 0])
    s_sh = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_sh = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, bt, 16])
    epi = gl.BlockedLayout([1, 1], [32, 1], [1, num_warps], [0, 1])  # [BN, BT]: weight rows along lanes
    # L1 epilogues: 32 rows (16 gate/up pairs, one requant block) of one token a thread
    epi_gu = gl.BlockedLayout([32, 1], [bn // 32, 32 // (bn // 32)], [1, num_warps], [0, 1])
    # schedule over the E_P experts: every warp holds all of them (E_P / 32 consecutive ones a lane), so its scans
    # and sums stay inside the warp (shuffles; no shared memory, no CTA barrier before the first weight copy)
    assert e_pad >= 32 and e_pad & (e_pad - 1) == 0, e_pad
    sched = gl.BlockedLayout([e_pad // 32], [32], [num_warps], [0])  # tile num_warps * e_pad: each warp a copy
    return dict(H_RD=h_rd, H4=h4, S_CV=s_cv, SD_RD=sd_rd, X4=x4, W_CP=w_cp, S_CP=s_cp, RING_SH=ring_sh, S_SH=s_sh,
                X_SH=x_sh,
                MMA=mma, EPI_L=epi, EPI_GU=epi_gu, SCHED=sched)


@gluon.jit
def _halves_to_f16(h_i16, FRAG: gl.constexpr):
    """int16 halves, paired by register (h_a, h_b) -> four fp16 tensors of e2m1 * 2^-14: O0 / O1 the low nibbles
    of (bytes of h_a) / (bytes of h_b), O2 / O3 the high nibbles; in each, element a holds the half's byte 0 and
    element b its byte 1 (so the pair index reads as the byte y, and O0 / O1 as ch0 = 0 / 1). FRAG: the halves are
    in the fragment order (host_prepare_experts.to_fragment_order: h_a holds byte 0 and h_b byte 1 of the two
    checkpoint halves, field j = nibble j // 2 of checkpoint half j % 2), decoded by the 12-instruction asm into the
    same four outputs."""
    return gl.inline_asm_elementwise(asm=_FRAGMENT_HALVES_ASM if FRAG else _HALVES_ASM, constraints="=r,=r,=r,=r,r,r",
                                     args=[h_i16.to(gl.int32)], dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                                     is_pure=True, pack=2)


@gluon.jit
def _e4m3_to_f16_x128(s):
    """E4M3 byte (int32) -> fp16 value * 2^7 (exact); 0x7F / 0xFF -> NaN (the Triton kernel's helper)."""
    h = ((s & 0x80) << 8) | ((s & 0x7F) << 7)
    f = h.to(gl.int16).to(gl.float16, bitcast=True) * 32768.0
    return gl.where((s & 0x7F) == 0x7F, float("nan"), f)


@gluon.jit
def _apply_scales(h4, se, so, R: gl.constexpr, FRAG: gl.constexpr):
    """Halves [R, 4, 2, 4] (row, chh, ch0, c) + fp16 block scales * 2^7 of blocks 2 chh (se) and 2 chh + 1 (so),
    broadcastable to [R, 4, 2, 4] -> fp16 [R, 128], column L = 64 n + b = nibble n of tile byte b = 16 chh + 8 ch0 +
    2 c + y (k = 2b + n), values e2m1 * e4m3 * 2^-7 (exact). FRAG: the halves in the fragment order (weights
    prepared so; the same columns, values and bits)."""
    o0, o1, o2, o3 = _halves_to_f16(h4, FRAG)  # dims now (row, chh, y, c)
    v = gl.join(gl.join(o0 * se, o1 * so), gl.join(o2 * se, o3 * so))  # (row, chh, y, c, ch0, n)
    return gl.reshape(gl.permute(v, _A_PERM.value), [R, 128])


@gluon.jit
def _decode_halves(h4, s_e, s_o, R: gl.constexpr):
    """_apply_scales with the scale bytes (int32 [R, 4]: blocks 2 chh, 2 chh + 1) converted here."""
    se = gl.expand_dims(gl.expand_dims(_e4m3_to_f16_x128(s_e), 2), 3)
    so = gl.expand_dims(gl.expand_dims(_e4m3_to_f16_x128(s_o), 2), 3)
    return _apply_scales(h4, se, so, R, False)


@gluon.jit
def _store_scales(sb, s16_dst, kt, HW, S_CV: gl.constexpr, K_TAIL: gl.constexpr):
    """Weight scale bytes sb [BN, 8] of K tile kt (read from its ring stage) -> fp16 value * 2^7, each twice ((s, s):
    the fp16x2 multiplier of a decoded pair), into s16_dst [BN, 16]. Blocks past K: 0, as the Triton kernel masks."""
    sb = sb.to(gl.int32)
    if K_TAIL:
        blk = gl.arange(0, 8, layout=gl.SliceLayout(0, S_CV))
        sb = gl.where((kt * 8 + blk < HW // 4)[None, :], sb, 0)
    v = _e4m3_to_f16_x128(sb)
    s16_dst.store(gl.reshape(gl.join(v, v), [v.shape[0], 16]))


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _pick(vec, idx, e):
    return gl.sum(gl.where(idx == e, vec, 0), axis=0)


@gluon.jit
def _launch_dependents():
    """griddepcontrol.launch_dependents: the next kernel of the stream, when it was launched as a programmatic
    dependent (PDL), may start once every program of this one has passed here. A no-op otherwise."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _wait_for_previous_kernel():
    """griddepcontrol.wait: blocks until the previous kernel of the stream has completed and its writes are
    visible (a no-op when this kernel was launched normally)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _schedule(off_ptr, t, E, BT: gl.constexpr, E_P: gl.constexpr, SCHED: gl.constexpr):
    """Tile t -> (is_expert_tile, e, row0, cnt_e, off_e, pad_e, off_E, z): the Triton kernel's _schedule (the same
    integers), with two arrays kept (the inclusive tile and padded-row cumsums) and expert e's offsets reloaded."""
    idx = gl.arange(0, E_P, layout=SCHED)
    lo = gl.load(off_ptr + idx, mask=idx < E, other=0)
    hi = gl.load(off_ptr + idx + 1, mask=idx < E, other=0)
    cnt = gl.maximum(hi - lo, 0)
    cum = gl.associative_scan((cnt + BT - 1) // BT, 0, _add)  # inclusive
    pcum = gl.associative_scan((cnt + 127) // 128 * 128, 0, _add)
    total = gl.max(cum, axis=0)
    off_end = gl.load(off_ptr + E)
    e = gl.minimum(gl.sum((cum <= t).to(gl.int32), axis=0), E - 1)  # first expert whose cumsum exceeds t
    cum_e = _pick(cum, idx, e)
    pcum_e = _pick(pcum, idx, e)
    off_e = gl.load(off_ptr + e)
    cnt_e = gl.maximum(gl.load(off_ptr + e + 1) - off_e, 0)
    row0 = (t - (cum_e - (cnt_e + BT - 1) // BT)) * BT
    pad_e = pcum_e - (cnt_e + 127) // 128 * 128
    return t < total, e, row0, cnt_e, off_e, pad_e, off_end, t - total


@gluon.jit
def _idx4(L4: gl.constexpr, N0: gl.constexpr, N1: gl.constexpr, N2: gl.constexpr, N3: gl.constexpr):
    """Index tensors of the 4 dims of a [N0, N1, N2, N3] tensor in layout L4, each broadcastable to it."""
    i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    i1 = gl.arange(0, N1, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    i2 = gl.arange(0, N2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    i3 = gl.arange(0, N3, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    return i0[:, None, None, None], i1[None, :, None, None], i2[None, None, :, None], i3[None, None, None, :]


@gluon.jit
def _issue(w_dst, s_dst, w_base, s_base, wvec0, scol, kt, K_ITERS: gl.constexpr, HW, CP4, K_TAIL: gl.constexpr):
    """cp.async of K tile kt's weight halves and scale words into one ring stage (nothing past the last tile; the
    group is committed anyway so the wait counts stay uniform). K_TAIL: halves past K / scale words past the
    buffer's columns are zero-filled."""
    if kt < K_ITERS:
        if K_TAIL:
            async_copy.async_copy_global_to_shared(w_dst, w_base + kt * 32, mask=(kt * 32 + wvec0 < HW)[None, :])
            async_copy.async_copy_global_to_shared(s_dst, s_base + kt * 2 * 512, mask=(kt * 2 + scol < CP4)[None, :])
        else:
            async_copy.async_copy_global_to_shared(w_dst, w_base + kt * 32)
            async_copy.async_copy_global_to_shared(s_dst, s_base + kt * 2 * 512)
    async_copy.commit_group()


@gluon.jit
def _load_x(x_ptr, xsf_ptr, xoff, xhx, xsoff, xchh, kt, HW, K_TAIL: gl.constexpr):
    """Activation halves [BT, 4, 2, 4] and the scale bytes (int32) [BT, 4] of blocks 2 chh, 2 chh + 1 of K tile
    kt (masked past K: 0, as the Triton kernel's loads)."""
    if K_TAIL:
        h = gl.load(x_ptr + xoff + kt * 32, mask=kt * 32 + xhx < HW, other=0)
        s_e = gl.load(xsf_ptr + xsoff + kt * 2 * 512, mask=(kt * 8 + 2 * xchh < HW // 4)[None, :], other=0)
        s_o = gl.load(xsf_ptr + xsoff + kt * 2 * 512 + 1, mask=(kt * 8 + 2 * xchh + 1 < HW // 4)[None, :], other=0)
    else:
        h = gl.load(x_ptr + xoff + kt * 32)
        s_e = gl.load(xsf_ptr + xsoff + kt * 2 * 512)
        s_o = gl.load(xsf_ptr + xsoff + kt * 2 * 512 + 1)
    return h, s_e.to(gl.int32), s_o.to(gl.int32)


@gluon.jit
def _weight_index(pid_n, N, CP4, W_CP: gl.constexpr, S_CP: gl.constexpr, WVEC: gl.constexpr, BN: gl.constexpr):
    """The copy index math of column tile pid_n (K tile 0): weight rows wr [BN] (past N clamped) and half columns
    wcol [32] (WVEC bytes a copy), scale-word offsets soff [BN, 8] in the expert's 128x4 layout; and wvec0 / scol,
    _issue's K-tail masks. _weight_bases makes 64-bit pointers of it, the big kernel's _weight_offsets int32 offsets."""
    wr = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, W_CP)), N - 1)
    wcol = gl.arange(0, 32, layout=gl.SliceLayout(0, W_CP))
    wvec0 = wcol // (WVEC // 2) * (WVEC // 2)  # first half of each copy: the K-tail mask per copy (HW % 4 == 0)
    sr = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, S_CP)), N - 1)
    sb = gl.arange(0, 8, layout=gl.SliceLayout(0, S_CP))
    scol = sb // 4  # scale word (4 blocks) of the tile: 0 or 1
    soff = (((sr // 128) * CP4 * 512 + (sr % 32) * 16 + ((sr // 32) % 4) * 4)[:, None]
            + (scol * 512 + sb % 4)[None, :])
    return wr, wcol, soff, wvec0, scol


@gluon.jit
def _weight_bases(w_ptr, wsf_ptr, e64, pid_n, N, HW, CP4, NP, W_CP: gl.constexpr, S_CP: gl.constexpr,
                  WVEC: gl.constexpr, BN: gl.constexpr):
    """Copy addresses of column tile pid_n of expert e (K tile 0; _issue adds the tile): weight halves [BN, 32]
    (rows past N clamped, WVEC bytes a copy), scale words [BN, 8]; and wvec0 / scol, _issue's K-tail masks."""
    wr, wcol, soff, wvec0, scol = _weight_index(pid_n, N, CP4, W_CP, S_CP, WVEC, BN)
    w_base = w_ptr + e64 * N * HW + gl.max_contiguous(
        gl.multiple_of((wr.to(gl.int64) * HW)[:, None] + wcol[None, :], [1, WVEC // 2]), [1, WVEC // 2])
    s_base = wsf_ptr + e64 * NP * CP4 * 4 + gl.max_contiguous(gl.multiple_of(soff, [1, 4]), [1, 4])
    return w_base, s_base, wvec0, scol


@gluon.jit
def _decode_a(wh, sd, H4: gl.constexpr, A_OP: gl.constexpr, BN: gl.constexpr, FRAG: gl.constexpr):
    """Weight halves wh [BN, 32] (H_RD) and converted scale pairs sd [BN, 16] (SD_RD) of one K tile -> the wgmma A
    operand [BN, 128] (A_OP; column L = 64 n + b <-> k = 2 b + n), every convert a register renaming. FRAG: the
    weights are in the fragment order (the same operand)."""
    wh = gl.convert_layout(gl.reshape(wh, [BN, 4, 2, 4]), H4, assert_trivial=True)
    se, so = gl.split(gl.permute(gl.reshape(sd, [BN, 4, 2, 2]), [0, 1, 3, 2]))  # (row, chh, y) each
    LWS: gl.constexpr = gl.SliceLayout(3, H4)
    se = gl.expand_dims(gl.convert_layout(se, LWS, assert_trivial=True), 3)
    so = gl.expand_dims(gl.convert_layout(so, LWS, assert_trivial=True), 3)
    return gl.convert_layout(_apply_scales(wh, se, so, BN, FRAG), A_OP, assert_trivial=True)


@gluon.jit
def _alloc_weight_ring(BN: gl.constexpr, RING_SH: gl.constexpr, S_SH: gl.constexpr):
    """The 4-stage cp.async weight ring, one allocation per stage: rings = (weights [BN, 32] i16, scale bytes [BN, 8]
    u8) x 4 stages, flat; and s16, the converted scales [BN, 16] f16 of even / odd K tiles (a double buffer). Separate
    allocations, picked statically, so Triton's barrier analysis sees which stage a write touches (_k_step)."""
    rings = (gl.allocate_shared_memory(gl.int16, [BN, 32], RING_SH),
             gl.allocate_shared_memory(gl.uint8, [BN, 8], S_SH),
             gl.allocate_shared_memory(gl.int16, [BN, 32], RING_SH),
             gl.allocate_shared_memory(gl.uint8, [BN, 8], S_SH),
             gl.allocate_shared_memory(gl.int16, [BN, 32], RING_SH),
             gl.allocate_shared_memory(gl.uint8, [BN, 8], S_SH),
             gl.allocate_shared_memory(gl.int16, [BN, 32], RING_SH),
             gl.allocate_shared_memory(gl.uint8, [BN, 8], S_SH))
    s16 = (gl.allocate_shared_memory(gl.float16, [BN, 16], S_SH), gl.allocate_shared_memory(gl.float16, [BN, 16], S_SH))
    return rings, s16


@gluon.jit
def _k_step(it, acc, xh, xse, xso, rings, s16_cur, s16_nxt, x_cur, x_nxt, w_base, s_base, wvec0, scol,
            x_ptr, xsf_ptr, xoff, xhx, xsoff, xchh2, HW, CP4, H_RD: gl.constexpr, H4: gl.constexpr,
            S_CV: gl.constexpr, SD_RD: gl.constexpr, A_OP: gl.constexpr, K_ITERS: gl.constexpr,
            K_TAIL: gl.constexpr, BN: gl.constexpr, BT: gl.constexpr, J: gl.constexpr, W_FRAG: gl.constexpr):
    """K tile it (it % 4 == J): one barrier, then every shared read of this tile (ring stage J, the converted scales
    s16_cur, the scale bytes of tile it + 1 in stage J + 1), then every write for later tiles (the cp.async of tile
    it + 3 into stage J + 3, the scales of tile it + 1 into s16_nxt, B tile it + 1 into x_nxt), the proxy fence,
    and the wgmma on x_cur. Ring stages and double buffers are separate allocations picked statically (the loop is
    unrolled by 4), so Triton's barrier analysis sees that no write touches what this tile reads and adds none."""
    w_cur, s_cur = rings[2 * J], rings[2 * J + 1]
    s_nxt = rings[2 * ((J + 1) % 4) + 1]
    w_iss, s_iss = rings[2 * ((J + 3) % 4)], rings[2 * ((J + 3) % 4) + 1]
    async_copy.wait_group(1)  # tiles it and it + 1 landed (this thread's copies)
    gl.thread_barrier()  # ... every thread's; B tile it and scales of tile it stored and fenced; last wgmma done
    wh = w_cur.load(H_RD)
    sd = s16_cur.load(SD_RD)
    sb = s_nxt.load(S_CV)
    # cp.async of tile it + 3 into the stage read in tile it - 1 (before this barrier)
    _issue(w_iss, s_iss, w_base, s_base, wvec0, scol, it + 3, K_ITERS, HW, CP4, K_TAIL)
    # scales of tile it + 1 (past the last: unused) converted once for the CTA
    _store_scales(sb, s16_nxt, it + 1, HW, S_CV, K_TAIL)
    # B tile it + 1 (past the last: unused), from the halves loaded one tile ahead
    x_nxt.store(_decode_halves(xh, xse, xso, BT))
    fence_async_shared()  # this thread's B-tile stores before the next tile's wgmma (async proxy)
    xh, xse, xso = _load_x(x_ptr, xsf_ptr, xoff, xhx, xsoff, xchh2, gl.minimum(it + 2, K_ITERS - 1), HW, K_TAIL)
    acc = warpgroup_mma(_decode_a(wh, sd, H4, A_OP, BN, W_FRAG), x_cur.permute([1, 0]), acc)
    return acc, xh, xse, xso


@gluon.jit
def _epilogue(acc, e64, pid_n, row0, cnt_e, off_e, pad_e, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr, hdec_ptr, N,
              I, adec_stride, hdec_stride, limit, OUT_CP, EPI_L: gl.constexpr, EPI_GU: gl.constexpr, EPI: gl.constexpr,
              BN: gl.constexpr, BT: gl.constexpr, CLAMP: gl.constexpr, ONE_SIXTH: gl.constexpr, FMAX: gl.constexpr):
    """acc [BN, BT] (MMA layout, decode scale not yet undone) of expert e's local rows row0.. (I = N // 2) -> the EPI
    output (the Triton kernel's float32 expressions); the large-token wgmma kernel ends here too."""
    adec = gl.load(adec_ptr + e64 * adec_stride)
    if EPI == 0:
        acc = gl.convert_layout(acc, EPI_L) * DECODE_UNSCALE  # exact
        loc = row0 + gl.arange(0, BT, layout=gl.SliceLayout(0, EPI_L))  # local rows of expert e
        rows = off_e + loc
        row_ok = loc < cnt_e
        wn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, EPI_L))
        alpha = adec * gl.load(wdec_ptr + e64)
        o = rows.to(gl.int64)[None, :] * N + wn[:, None]
        gl.store(out_ptr + o, _round_to_bf16_f32(acc * alpha).to(gl.bfloat16),
                 mask=(wn < N)[:, None] & row_ok[None, :])
    else:
        acc = gl.convert_layout(acc, EPI_GU) * DECODE_UNSCALE  # exact
        g, u = gl.split(gl.permute(gl.reshape(acc, [BN // 2, 2, BT]), [0, 2, 1]))
        g = g * (adec * gl.load(wdec_ptr + e64 * 2))
        u = u * (adec * gl.load(wdec_ptr + e64 * 2 + 1))
        if EPI == 1:
            GL: gl.constexpr = g.type.layout
            ic = pid_n * (BN // 2) + gl.arange(0, BN // 2, layout=gl.SliceLayout(1, GL))
            rows1 = off_e + row0 + gl.arange(0, BT, layout=gl.SliceLayout(0, GL))
            ok1 = rows1 - off_e < cnt_e
            o = rows1.to(gl.int64)[None, :] * I + ic[:, None]
            m = (ic < I)[:, None] & ok1[None, :]
            gl.store(out_ptr + o, g, mask=m)
            gl.store(out2_ptr + o, u, mask=m)
        else:
            if CLAMP:
                u = gl.minimum(gl.maximum(u, -limit), limit)
                g = gl.minimum(g, limit)
            h = (g / (1.0 + gl.exp(-g))) * u
            h = _round_to_bf16_f32(h)  # h is bf16 at the stage boundary (as the unfused path)
            s_enc = gl.div_rn(1.0, gl.load(hdec_ptr + e64 * hdec_stride))
            NB: gl.constexpr = BN // 32
            hb = gl.reshape(h, [NB, 16, BT])
            v = gl.max(gl.abs(hb), axis=1)  # maxnum: NaN elements ignored
            v = gl.where(v == v, v, 0.0)
            scale_f32 = gl.minimum(v * (s_enc * ONE_SIXTH), FMAX, propagate_nan=tl.PropagateNan.ALL)
            sf_u8 = _e4m3_rne_u8(scale_f32)  # [NB, BT]
            inv_s = gl.div_rn(1.0, s_enc)
            enc = gl.div_rn(1.0, _e4m3_to_f32(sf_u8) * inv_s)
            enc = gl.minimum(enc, FMAX, propagate_nan=tl.PropagateNan.ALL)
            codes = _e2m1_code(hb * gl.expand_dims(enc, 1))  # [NB, 16, BT]
            lo, hi = gl.split(gl.permute(gl.reshape(codes, [NB, 8, 2, BT]), [0, 1, 3, 2]))
            byte = (lo | (hi << 4)).to(gl.uint8)  # [NB, 8, BT]
            BL: gl.constexpr = byte.type.layout
            blk = pid_n * NB + gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, BL)))
            col = blk[:, None] * 8 + gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, BL)))[None, :]
            locb = row0 + gl.arange(0, BT, layout=gl.SliceLayout(0, gl.SliceLayout(1, BL)))
            po = (off_e + locb).to(gl.int64)[None, None, :] * (I // 2) + col[:, :, None]
            gl.store(out_ptr + po, byte, mask=(col < I // 2)[:, :, None] & (locb < cnt_e)[None, None, :])
            SL: gl.constexpr = sf_u8.type.layout
            blk2 = pid_n * NB + gl.arange(0, NB, layout=gl.SliceLayout(1, SL))
            srow = pad_e + row0 + gl.arange(0, BT, layout=gl.SliceLayout(0, SL))
            so = ((((srow // 128) * (OUT_CP // 4))[None, :] + (blk2 // 4)[:, None]) * 512
                  + ((srow % 32) * 16 + ((srow // 32) % 4) * 4)[None, :] + (blk2 % 4)[:, None])
            gl.store(hsf_ptr + so.to(gl.int64), sf_u8.to(gl.uint8),
                     mask=(blk2 < I // 16)[:, None] & (srow - pad_e < cnt_e)[None, :])


@gluon.jit
def _zero_tile(z, off_end, pid_n, out_ptr, out2_ptr, N, RCAP, EPI_L: gl.constexpr, EPI: gl.constexpr, BN: gl.constexpr,
               BT: gl.constexpr):
    """Capacity rows past off[E]: zeros (BT rows of this column tile per zero tile z)."""
    ZL: gl.constexpr = EPI_L
    zr = off_end + z * BT + gl.arange(0, BT, layout=gl.SliceLayout(0, ZL))
    zok = (zr < RCAP) & (z * BT < RCAP - off_end)
    if EPI == 0:
        wz = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, ZL))
        zo = zr.to(gl.int64)[None, :] * N + wz[:, None]
        gl.store(out_ptr + zo, gl.zeros([BN, BT], gl.bfloat16, ZL), mask=(wz < N)[:, None] & zok[None, :])
    elif EPI == 1:
        zic = pid_n * (BN // 2) + gl.arange(0, BN // 2, layout=gl.SliceLayout(1, ZL))
        zo = zr.to(gl.int64)[None, :] * (N // 2) + zic[:, None]
        zm = (zic < N // 2)[:, None] & zok[None, :]
        gl.store(out_ptr + zo, gl.zeros([BN // 2, BT], gl.float32, ZL), mask=zm)
        gl.store(out2_ptr + zo, gl.zeros([BN // 2, BT], gl.float32, ZL), mask=zm)
    else:
        zcol = pid_n * (BN // 4) + gl.arange(0, BN // 4, layout=gl.SliceLayout(1, ZL))
        zo = zr.to(gl.int64)[None, :] * (N // 4) + zcol[:, None]
        gl.store(out_ptr + zo, gl.zeros([BN // 4, BT], gl.uint8, ZL), mask=(zcol < N // 4)[:, None] & zok[None, :])


@gluon.jit(do_not_specialize=["RCAP", "adec_stride", "hdec_stride", "limit"])
def grouped_gemm_nvfp4_wgmma_kernel(
    w_ptr, wsf_ptr, x_ptr, xsf_ptr, adec_ptr, wdec_ptr, off_ptr, out_ptr, out2_ptr, hsf_ptr, hdec_ptr,
    E, N, HW, CP4, RCAP, NP, adec_stride, hdec_stride, limit, OUT_CP,
    H_RD: gl.constexpr, H4: gl.constexpr, S_CV: gl.constexpr, SD_RD: gl.constexpr, X4: gl.constexpr, W_CP: gl.constexpr,
    S_CP: gl.constexpr, RING_SH: gl.constexpr, S_SH: gl.constexpr, X_SH: gl.constexpr, MMA: gl.constexpr,
    EPI_L: gl.constexpr, EPI_GU: gl.constexpr, SCHED: gl.constexpr,
    K_ITERS: gl.constexpr, K_TAIL: gl.constexpr, WVEC: gl.constexpr, EPI: gl.constexpr, BN: gl.constexpr,
    BT: gl.constexpr, E_P: gl.constexpr, CLAMP: gl.constexpr, ONE_SIXTH: gl.constexpr,
    FMAX: gl.constexpr, PDL: gl.constexpr, W_FRAG: gl.constexpr,
):
    """The Triton kernel's contract (see its docstring and kernels.sm90.grouped_gemm_nvfp4), with the packed
    operands viewed as int16 halves: w_ptr [E, N, K/4] i16, x_ptr [Rcap, K/4] i16 (HW = K / 4 halves a row);
    wsf_ptr [E, NP, 4 * CP4] u8 (128x4 per expert), xsf_ptr the grouped 128x4 u8 buffer. Grid =
    CompileKey.grid programs, N tile fastest.

    PDL (WgmmaKey.pdl, launched as a programmatic dependent): the tile schedule (the offsets), the weight ring's
    first three tiles and their scales run before griddepcontrol.wait, i.e. during the previous kernel's tail;
    the activations, their scales and decode scales are read and every output is written after it. So the offsets
    must have been complete when the previous kernel started: true for the MoE order (dispatch, quantize, L1, L2:
    L2 is the dependent of L1, which was launched normally). Every program lets its own dependents launch at its
    start (launch_dependents): they take only SM slots this grid leaves free, as all its programs are resident by
    then.

    W_FRAG: w_ptr holds the weights in the fragment order (Sm90GroupedWeight.fragment_order; the same operand, bits
    and outputs, fewer decode instructions); the activations are always in the checkpoint order."""
    _launch_dependents()
    NT = gl.cdiv(N, BN)
    pid = gl.program_id(0)
    pid_n = pid % NT
    t = pid // NT
    is_tile, e, row0, cnt_e, off_e, pad_e, off_end, z = _schedule(off_ptr, t, E, BT, E_P, SCHED)
    e64 = e.to(gl.int64)
    I = N // 2
    if is_tile:
        w_base, s_base, wvec0, scol = _weight_bases(w_ptr, wsf_ptr, e64, pid_n, N, HW, CP4, NP, W_CP, S_CP, WVEC, BN)
        rings, s16 = _alloc_weight_ring(BN, RING_SH, S_SH)
        # activations of (expert e, row tile): rows past the expert's clamped to its last row
        xt, xchh, xch0, xc = _idx4(X4, BT, 4, 2, 4)
        xhx = xchh * 8 + xch0 * 4 + xc  # [1, 4, 2, 4]
        xoff = (off_e + gl.minimum(row0 + xt, cnt_e - 1)).to(gl.int64) * HW + xhx
        LXS: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, X4))
        xsr = pad_e + gl.minimum(row0 + gl.arange(0, BT, layout=gl.SliceLayout(1, LXS)), cnt_e - 1)
        xchh2 = gl.arange(0, 4, layout=gl.SliceLayout(0, LXS))
        xsoff = ((xsr // 128) * CP4 * 512 + (xsr % 32) * 16 + ((xsr // 32) % 4) * 4).to(gl.int64)[:, None] \
            + ((xchh2 // 2) * 512 + (xchh2 % 2) * 2)[None, :]  # block 2 chh of the tile (2 chh + 1: one byte on)
        xb = (gl.allocate_shared_memory(gl.float16, [BT, 128], X_SH),  # B tiles of even / odd K tiles
              gl.allocate_shared_memory(gl.float16, [BT, 128], X_SH))
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        acc = gl.zeros([BN, BT], gl.float32, layout=MMA)
        for j in gl.static_range(3):  # prologue: tiles 0, 1, 2 into stages 0, 1, 2
            _issue(rings[2 * j], rings[2 * j + 1], w_base, s_base, wvec0, scol, j, K_ITERS, HW, CP4, K_TAIL)
        async_copy.wait_group(2)
        gl.thread_barrier()  # ring tile 0 in for every thread
        _store_scales(rings[1].load(S_CV), s16[0], 0, HW, S_CV, K_TAIL)
        if PDL:  # the previous kernel's outputs (the activations) from here on
            _wait_for_previous_kernel()
        xh, xse, xso = _load_x(x_ptr, xsf_ptr, xoff, xhx, xsoff, xchh2, 0, HW, K_TAIL)
        xb[0].store(_decode_halves(xh, xse, xso, BT))
        fence_async_shared()
        K1: gl.constexpr = 1 if K_ITERS > 1 else 0
        xh, xse, xso = _load_x(x_ptr, xsf_ptr, xoff, xhx, xsoff, xchh2, K1, HW, K_TAIL)
        # the loop runs from two trips on: a loop of one constant trip (K 512 .. 639) made Triton 3.6's TritonGPU ->
        # LLVM lowering fail (an LLVM assertion); those 4 tiles go to the unrolled rest instead
        LOOP: gl.constexpr = K_ITERS // 4 if K_ITERS >= 8 else 0
        for it4 in range(0, LOOP):  # unrolled by 4: static ring stages and double-buffer roles (_k_step)
            for j in gl.static_range(4):
                acc, xh, xse, xso = _k_step(4 * it4 + j, acc, xh, xse, xso, rings, s16[j % 2], s16[(j + 1) % 2],
                                            xb[j % 2], xb[(j + 1) % 2], w_base, s_base, wvec0, scol, x_ptr, xsf_ptr,
                                            xoff, xhx, xsoff, xchh2, HW, CP4, H_RD, H4, S_CV, SD_RD, A_OP, K_ITERS,
                                            K_TAIL, BN, BT, j, W_FRAG)
        for j in gl.static_range(K_ITERS - 4 * LOOP):  # the last tiles, unrolled (tile index % 4 == j % 4)
            acc, xh, xse, xso = _k_step(4 * LOOP + j, acc, xh, xse, xso, rings, s16[j % 2], s16[(j + 1) % 2],
                                        xb[j % 2], xb[(j + 1) % 2], w_base, s_base, wvec0, scol, x_ptr, xsf_ptr, xoff,
                                        xhx, xsoff, xchh2, HW, CP4, H_RD, H4, S_CV, SD_RD, A_OP, K_ITERS, K_TAIL, BN,
                                        BT, j % 4, W_FRAG)
        async_copy.wait_group(0)
        _epilogue(acc, e64, pid_n, row0, cnt_e, off_e, pad_e, adec_ptr, wdec_ptr, out_ptr, out2_ptr, hsf_ptr, hdec_ptr,
                  N, I, adec_stride, hdec_stride, limit, OUT_CP, EPI_L, EPI_GU, EPI, BN, BT, CLAMP, ONE_SIXTH, FMAX)
    else:
        if PDL:
            _wait_for_previous_kernel()
        _zero_tile(z, off_end, pid_n, out_ptr, out2_ptr, N, RCAP, EPI_L, EPI, BN, BT)
