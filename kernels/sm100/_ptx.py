"""Shared inline-PTX helpers for the sm100 CuTe DSL kernels (built lazily: cutlass is
imported on first use only).

- cvt_e2m1x8_u32(y0..y7): eight f32 -> eight E2M1 codes packed in a u32, element 0
  in the lowest nibble (the checkpoint packing: element 2i in the low nibble of
  byte i). `cvt.rn.satfinite.e2m1x2.f32 d, a, b` puts `a` in the HIGH nibble, so
  each pair is passed as (odd, even). RNE, saturating to +-6.
- cvt_e4m3_u32(s): f32 -> E4M3 byte (RNE, satfinite to 448) in the low byte of a u32.
- e4m3_u32_to_f32(b): the E4M3 byte's exact value as f32.
- mul_rn_plus_zero(x, m): RN(RN(x*m) + 0), never contracted into an FMA.
- te_quantize_block16_f32(y, global_enc): one 16-element block, recipe te (below);
  returns (scale byte as i32, codes 0..7 as u32, codes 8..15 as u32). Shared by the
  activation quantizer and the L1 SwiGLU epilogue's NVFP4 output.

Recipe te for a block y[0..15] (f32) and the global encode scale S (2688/amax):
  v      = max |y_i|                           (fmax: NaN elements ignored)
  s      = e4m3_rne_satfinite(min(v * (S * (1/6)), FLT_MAX))
  enc    = min(1 / (float(s) * (1/S)), FLT_MAX)
  code_i = e2m1_rne_satfinite(RN(y_i * enc) + 0)
"""

import functools
from types import SimpleNamespace

FLT_MAX = 3.4028234663852886e38


@functools.lru_cache(maxsize=1)
def ptx_ops() -> SimpleNamespace:
    from cutlass import Float32, Int32
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    def _asm(ret, operands, text, constraints):
        return llvm.inline_asm(ret, operands, text, constraints, has_side_effects=False,
                               is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)

    @dsl_user_op
    def cvt_e2m1x8_u32(y0, y1, y2, y3, y4, y5, y6, y7, *, loc=None, ip=None):
        vals = [Float32(v).ir_value(loc=loc, ip=ip) for v in (y0, y1, y2, y3, y4, y5, y6, y7)]
        text = (
            "{\n\t.reg .b8 q0, q1, q2, q3;\n\t"
            "cvt.rn.satfinite.e2m1x2.f32 q0, $2, $1;\n\t"
            "cvt.rn.satfinite.e2m1x2.f32 q1, $4, $3;\n\t"
            "cvt.rn.satfinite.e2m1x2.f32 q2, $6, $5;\n\t"
            "cvt.rn.satfinite.e2m1x2.f32 q3, $8, $7;\n\t"
            "mov.b32 $0, {q0, q1, q2, q3};\n\t}"
        )
        return Int32(_asm(T.i32(), vals, text, "=r,f,f,f,f,f,f,f,f"))

    @dsl_user_op
    def cvt_e4m3_u32(s, *, loc=None, ip=None):
        text = (
            "{\n\t.reg .b16 h;\n\t"
            "cvt.rn.satfinite.e4m3x2.f32 h, 0f00000000, $1;\n\t"
            "cvt.u32.u16 $0, h;\n\t}"
        )
        return Int32(_asm(T.i32(), [Float32(s).ir_value(loc=loc, ip=ip)], text, "=r,f"))

    @dsl_user_op
    def e4m3_u32_to_f32(b, *, loc=None, ip=None):
        text = (
            "{\n\t.reg .b16 h, lo, hi;\n\t.reg .b32 p;\n\t"
            "cvt.u16.u32 h, $1;\n\t"
            "cvt.rn.f16x2.e4m3x2 p, h;\n\t"
            "mov.b32 {lo, hi}, p;\n\t"
            "cvt.f32.f16 $0, lo;\n\t}"
        )
        return Float32(_asm(T.f32(), [Int32(b).ir_value(loc=loc, ip=ip)], text, "=f,r"))

    @dsl_user_op
    def mul_rn_plus_zero(x, m, *, loc=None, ip=None):
        # x*m rounded once, then + (+0): -0.0 becomes +0 while tiny negatives keep their
        # sign. Explicit .rn keeps ptxas from contracting the pair into one FMA (which
        # would keep the sign of an underflowed product).
        text = "{\n\t.reg .f32 t;\n\tmul.rn.f32 t, $1, $2;\n\tadd.rn.f32 $0, t, 0f00000000;\n\t}"
        return Float32(_asm(T.f32(), [Float32(x).ir_value(loc=loc, ip=ip), Float32(m).ir_value(loc=loc, ip=ip)],
                            text, "=f,f,f"))

    def te_quantize_block16_f32(y, global_enc):
        # Traced inside a kernel: the Python loops unroll at trace time.
        import cutlass.cute as cute

        v = Float32(0.0)
        for i in range(16):
            v = cute.arch.fmax(v, cute.arch.fmax(y[i], -y[i]))
        s_f32 = cute.arch.fmin(v * (global_enc * Float32(1.0 / 6.0)), Float32(FLT_MAX))
        sf_byte = cvt_e4m3_u32(s_f32)
        s_dec = e4m3_u32_to_f32(sf_byte)
        mult = cute.arch.fmin(Float32(1.0) / (s_dec * (Float32(1.0) / global_enc)), Float32(FLT_MAX))
        q = [mul_rn_plus_zero(y[i], mult) for i in range(16)]
        return sf_byte, cvt_e2m1x8_u32(*q[:8]), cvt_e2m1x8_u32(*q[8:])

    return SimpleNamespace(cvt_e2m1x8_u32=cvt_e2m1x8_u32, cvt_e4m3_u32=cvt_e4m3_u32, e4m3_u32_to_f32=e4m3_u32_to_f32,
                           mul_rn_plus_zero=mul_rn_plus_zero, te_quantize_block16_f32=te_quantize_block16_f32)
