"""PTX text of the E2M1 -> fp16x2 decode shared by the sm90 kernels (Triton and Gluon).

One E2M1 code s e1 e0 m at the top of a 16-bit half (bits 12-15) is the fp16 value
e2m1 * 2^-14 once the sign stays at bit 15 and the three magnitude bits move to bits 9-11:
(x & 0x8000) | ((x >> 3) & 0x0E00). `nibble_to_f16x2` emits that for both halves of a
32-bit register at once, for the nibble a left shift by `shift` (0, 4, 8, 12) brings to the
top of each half; the masks keep the halves apart. Plain strings: no triton import here.
"""

from __future__ import annotations

__all__ = ["nibble_to_f16x2", "bytes_to_f16x2_ptx", "word_pair_to_f16x2_ptx", "halves_to_f16x2_ptx",
           "fragment_halves_to_f16x2_ptx", "FRAGMENT_SIGN_BITS", "FRAGMENT_MAG_SHIFTS"]

_SHIFTS = (0, 4, 8, 12)


def nibble_to_f16x2(src: str, shift: int, dst: str) -> str:
    """One fp16x2 of e2m1 * 2^-14 from the nibble at bits (12 - shift).. of each half of `src`. Uses q, t, u."""
    sign = f"and.b32 u, {src}, 0x80008000;" if shift == 0 else f"shl.b32 q, {src}, {shift}; and.b32 u, q, 0x80008000;"
    mag = f"shr.b32 t, {src}, 3;" if shift == 0 else f"shl.b32 t, {src}, {shift - 3};"
    return f"{sign} {mag} and.b32 t, t, 0x0E000E00; or.b32 {dst}, u, t;"


def _wrap(lines: list[str]) -> str:
    return "{\n" + "\n".join(lines) + "\n}\n"


def bytes_to_f16x2_ptx() -> str:
    """4 packed bytes ($4) -> low nibbles of bytes (0, 2) in $0, (1, 3) in $1, high nibbles in $2, $3
    (prmt puts byte 2j in bits 8-15 and byte 2j+1 in bits 24-31)."""
    return _wrap([".reg .b32 p, q, t, u;",
                  "prmt.b32 p, $4, 0, 0x1404;", nibble_to_f16x2("p", 4, "$0"), nibble_to_f16x2("p", 0, "$2"),
                  "prmt.b32 p, $4, 0, 0x3424;", nibble_to_f16x2("p", 4, "$1"), nibble_to_f16x2("p", 0, "$3")])


def word_pair_to_f16x2_ptx() -> str:
    """Two int32 words ($8, $9) -> 8 fp16x2 ($0..$7): nibble r of word 0 in the low half and of word 1
    in the high half (prmt pairs their 16-bit halves), nibbles in order r = 0..7."""
    lines = [".reg .b32 lo, hi, q, t, u;", "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for h, src in enumerate(("lo", "hi")):
        lines += [nibble_to_f16x2(src, s, f"${4 * h + j}") for j, s in enumerate(reversed(_SHIFTS))]
    return _wrap(lines)


def halves_to_f16x2_ptx() -> str:
    """Two registers holding a 16-bit half each in bits 0-15 ($4 = h_a, $5 = h_b; bits 16-31 ignored) -> four fp16x2
    of e2m1 * 2^-14: $0 = low nibbles of h_a's bytes (0, 1), $1 = the same of h_b, $2 / $3 their high nibbles. The
    nibble moves are the Triton kernel's (nibble_to_f16x2 after the same prmt), applied to the halves where they
    were loaded (no packing of the two halves into one register first): 16 instructions a pair of halves."""
    lines = [".reg .b32 p, q, t, u;"]
    for src, lo, hi in (("$4", "$0", "$2"), ("$5", "$1", "$3")):
        lines += [f"prmt.b32 p, {src}, 0, 0x1404;", nibble_to_f16x2("p", 4, lo), nibble_to_f16x2("p", 0, hi)]
    return _wrap(lines)


# The fragment order of the grouped GEMM's prepared weights (host_prepare_experts.to_fragment_order): each 16-bit
# half holds four E2M1 codes as fields j = 0..3, field j's sign at bit FRAGMENT_SIGN_BITS[j] and its three magnitude
# bits (e1 e0 m) at bits FRAGMENT_MAG_SHIFTS[j] .. + 2. Field 0 is already where an fp16 wants it (sign 15, e1 e0 m
# at 9-11: the value e2m1 * 2^-14); fields 1, 2, 3 are one or two shifts away.
FRAGMENT_SIGN_BITS = (15, 12, 14, 13)
FRAGMENT_MAG_SHIFTS = (9, 6, 3, 0)


def fragment_halves_to_f16x2_ptx() -> str:
    """halves_to_f16x2_ptx's four outputs from two halves in the fragment order: one prmt joins h_a (bits 0-15) and
    h_b (16-31), then output j = field j of both halves (h_a's in the low fp16, h_b's in the high): field 0 one mask,
    field 1 a shift and a mask, fields 2 and 3 two shifts, two masks and an or: 14 PTX instructions a pair of halves
    where halves_to_f16x2_ptx takes 20 (12 and 16 once ptxas folds an and into the or as one LOP3). A bit shifted
    in from the other half always lands outside the masks."""
    lines = [".reg .b32 w, q, t;", "prmt.b32 w, $4, $5, 0x5410;", "and.b32 $0, w, 0x8E008E00;",
             "shl.b32 t, w, 3;", "and.b32 $1, t, 0x8E008E00;"]
    for j, dst in ((2, "$2"), (3, "$3")):
        lines += [f"shl.b32 q, w, {15 - FRAGMENT_SIGN_BITS[j]};", "and.b32 q, q, 0x80008000;",
                  f"shl.b32 t, w, {9 - FRAGMENT_MAG_SHIFTS[j]};", "and.b32 t, t, 0x0E000E00;", f"or.b32 {dst}, q, t;"]
    return _wrap(lines)
