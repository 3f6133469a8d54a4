"""Kernel body of kernels.sm100.quantize_fp8_1x128 (CuTe DSL; imports cutlass, so it is imported
only by that module's compile step). Math and layouts: that module's docstring.

One warp per 1x128 group: lane l holds elements 4l..4l+3 of the group (one 8-byte load),
the group amax is a butterfly reduction over the warp with max.NaN (a NaN anywhere makes it
NaN), every lane derives the same scale byte and encodes its four elements; lane 0 writes the
scale byte (linear, and four times into the MMA's swizzled layout with one 32-bit store).
"""

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from kernels.sm100.quantize_fp8_1x128 import GROUP, THREADS, WARPS_PER_CTA, CompileKey

LANE_ELEMS = GROUP // 32  # 4


def _asm(ret, operands, text, constraints):
    return llvm.inline_asm(ret, operands, text, constraints, has_side_effects=False, is_align_stack=False,
                           asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def abs_max_nan_f32(acc, x, *, loc=None, ip=None):
    """max.NaN(acc, |x|): NaN if either is NaN (torch.amax semantics, recipe amax_nan "propagate")."""
    text = "{\n\t.reg .f32 a;\n\tabs.f32 a, $2;\n\tmax.NaN.f32 $0, $1, a;\n\t}"
    return Float32(_asm(T.f32(), [Float32(acc).ir_value(loc=loc, ip=ip), Float32(x).ir_value(loc=loc, ip=ip)],
                        text, "=f,f,f"))


@dsl_user_op
def max_nan_f32(a, b, *, loc=None, ip=None):
    return Float32(_asm(T.f32(), [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)],
                        "max.NaN.f32 $0, $1, $2;", "=f,f,f"))


@dsl_user_op
def ue8m0_ceil_scale_byte(amax, *, loc=None, ip=None):
    """UE8M0 byte of s = 2^ceil(log2(max(amax, 1e-4) / 448)) on the f32 bits of the correctly rounded
    quotient: exponent field + (mantissa != 0), capped at 0xFF (NaN and Inf amax give 0xFF).
    0f38D1B717 is float32(1e-4), 0f43E00000 is 448."""
    text = (
        "{\n\t.reg .f32 t, s;\n\t.reg .b32 b, e, f;\n\t.reg .pred p;\n\t"
        "max.NaN.f32 t, $1, 0f38D1B717;\n\t"
        "div.rn.f32 s, t, 0f43E00000;\n\t"
        "mov.b32 b, s;\n\t"
        "and.b32 f, b, 8388607;\n\t"
        "shr.u32 e, b, 23;\n\t"
        "and.b32 e, e, 255;\n\t"
        "setp.ne.u32 p, f, 0;\n\t"
        "@p add.u32 e, e, 1;\n\t"
        "min.u32 $0, e, 255;\n\t}"
    )
    return Int32(_asm(T.i32(), [Float32(amax).ir_value(loc=loc, ip=ip)], text, "=r,f"))


@dsl_user_op
def ue8m0_byte_to_f32(byte, *, loc=None, ip=None):
    """2^(byte - 127) built on the bits (byte >= 1 here: >= 105 from the floor), NaN for 0xFF."""
    text = (
        "{\n\t.reg .b32 v;\n\t.reg .pred p;\n\t"
        "shl.b32 v, $1, 23;\n\t"
        "setp.eq.u32 p, $1, 255;\n\t"
        "selp.b32 v, 2147483647, v, p;\n\t"
        "mov.b32 $0, v;\n\t}"
    )
    return Float32(_asm(T.f32(), [Int32(byte).ir_value(loc=loc, ip=ip)], text, "=f,r"))


@dsl_user_op
def e4m3x4_div_u32(x0, x1, x2, x3, s, *, loc=None, ip=None):
    """Four E4M3 bytes of RNE_satfinite(x_i / s) (div.rn: recipe encode_rule "divide"), element 0 in
    the lowest byte; a NaN quotient gives the canonical 0x7F whatever the conversion does with it.
    `cvt.rn.satfinite.e4m3x2.f32 d, a, b` puts b in the low byte: each element converts alone (a = 0)."""
    lines = ["{", ".reg .f32 y;", ".reg .b16 h;", ".reg .b32 c, w;", ".reg .pred p;", "mov.b32 w, 0;"]
    for i in range(4):
        lines += [
            f"div.rn.f32 y, ${i + 1}, $5;",
            "cvt.rn.satfinite.e4m3x2.f32 h, 0f00000000, y;",
            "cvt.u32.u16 c, h;",
            "and.b32 c, c, 255;",
            "setp.nan.f32 p, y, y;",
            "selp.b32 c, 127, c, p;",
            f"shl.b32 c, c, {8 * i};",
            "or.b32 w, w, c;",
        ]
    lines += ["mov.b32 $0, w;", "}"]
    vals = [Float32(v).ir_value(loc=loc, ip=ip) for v in (x0, x1, x2, x3, s)]
    return Int32(_asm(T.i32(), vals, "\n\t".join(lines), "=r,f,f,f,f,f"))


class QuantizeFp8_1x128:
    """bf16 [M, K] -> E4M3 bytes [M, K] + UE8M0 group scales (linear and MMA-swizzled)."""

    def __init__(self, key: CompileKey):
        self.key = key

    @cute.jit
    def __call__(
        self,
        x_ptr: cute.Pointer,
        codes_ptr: cute.Pointer,
        sf_linear_ptr: cute.Pointer,
        sf_swizzled_ptr: cute.Pointer,
        valid_rows_ptr: cute.Pointer,
        m: cutlass.Int32,
        k: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        groups = (k + GROUP - 1) // GROUP
        chunks = m * (k // LANE_ELEMS)
        rows_padded = (m + 127) // 128 * 128
        x = cute.make_tensor(x_ptr, cute.make_layout((chunks, LANE_ELEMS), stride=(LANE_ELEMS, 1)))
        codes = cute.make_tensor(codes_ptr, cute.make_layout(chunks))
        sf_linear = cute.make_tensor(sf_linear_ptr, cute.make_layout(m * groups))
        sf_swizzled = cute.make_tensor(sf_swizzled_ptr, cute.make_layout(rows_padded * groups))
        valid_rows = cute.make_tensor(valid_rows_ptr, cute.make_layout(1))
        num_groups = m * groups
        grid = ((num_groups + WARPS_PER_CTA - 1) // WARPS_PER_CTA, 1, 1)
        self.kernel(x, codes, sf_linear, sf_swizzled, valid_rows, k, groups, num_groups).launch(
            grid=grid, block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(
        self,
        x: cute.Tensor,
        codes: cute.Tensor,
        sf_linear: cute.Tensor,
        sf_swizzled: cute.Tensor,
        valid_rows: cute.Tensor,
        k: cutlass.Int32,
        groups: cutlass.Int32,
        num_groups: cutlass.Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        warp = tidx // 32
        lane = tidx % 32
        gi = bidx * WARPS_PER_CTA + warp
        # Warp-uniform: a whole warp takes the same branch, so the shuffles below are full-warp.
        if gi < num_groups:
            row = gi // groups
            g = gi - row * groups
            col = g * GROUP + lane * LANE_ELEMS
            chunk = (row * k + col) // LANE_ELEMS
            in_k = col < k  # the last group may be shorter: its missing elements count as zeros
            # Rows at or past the device-side valid count (read at run time: a captured graph
            # replays with fewer tokens) are not read; codes and scale bytes come out zero.
            row_valid = row < valid_rows[0]
            r_x = cute.make_rmem_tensor((LANE_ELEMS,), x.element_type)
            r_x.fill(0.0)
            if row_valid & in_k:
                cute.autovec_copy(x[(chunk, None)], r_x)
            r_y = cute.make_rmem_tensor((LANE_ELEMS,), Float32)
            amax = Float32(0.0)
            for i in cutlass.range_constexpr(LANE_ELEMS):
                r_y[i] = r_x[i].to(Float32)
                amax = abs_max_nan_f32(amax, r_y[i])
            for step in cutlass.range_constexpr(5):
                amax = max_nan_f32(amax, cute.arch.shuffle_sync_bfly(amax, offset=16 >> step))
            sf_byte = ue8m0_ceil_scale_byte(amax)
            word = e4m3x4_div_u32(r_y[0], r_y[1], r_y[2], r_y[3], ue8m0_byte_to_f32(sf_byte))
            if not row_valid:
                sf_byte = Int32(0)
                word = Int32(0)
            if in_k:
                codes[chunk] = word
            if lane == 0:
                sf_linear[gi] = sf_byte.to(cutlass.Uint8)
                # 128x4 swizzle, columns 4g..4g+3 (one per 32 of K, all this group's byte):
                # byte offset ((row//128)*groups + g)*512 + (row%32)*16 + ((row//32)%4)*4, in u32 words.
                word_off = ((row // 128) * groups + g) * 128 + (row % 32) * 4 + (row // 32) % 4
                sf_swizzled[word_off] = sf_byte * Int32(0x01010101)
