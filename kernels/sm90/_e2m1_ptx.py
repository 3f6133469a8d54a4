"""PTX text of the E2M1 -> fp16x2 decode shared by the sm90 kernels (Triton and Gluon).

One E2M1 code s e1 e0 m at the top of a 16-bit half (bits 12-15) is the fp16 value
e2m1 * 2^-14 once the sign stays at bit 15 and the three magnitude bits move to bits 9-11:
(x & 0x8000) | ((x >> 3) & 0x0E00). `nibble_to_f16x2` emits that for both halves of a
32-bit register at once, for the nibble a left shift by `shift` (0, 4, 8, 12) brings to the
top of each half; the masks keep the halves apart. Plain strings: no triton import here.
"""

from __future__ import annotations

__all__ = ["nibble_to_f16x2", "bytes_to_f16x2_ptx", "word_pair_to_f16x2_ptx"]

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
