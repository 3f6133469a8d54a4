"""The E2M1 -> fp16x2 PTX text of the sm90 kernels (kernels/sm90/_e2m1_ptx.py), run on the CPU by a
tiny interpreter of the few b32 instructions it uses, against the references' E2M1 decode:
every output half must be e2m1(code) * 2^-14 (or * 1 for the activation variant) for the code the
layout puts there. The kernels' own numerics are tested on the H200 (test_sm90_gemm.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kernels.sm90._e2m1_ptx import bytes_to_f16x2_ptx, word_pair_to_f16x2_ptx
from references.codecs import e2m1_codes_to_f32

M32 = 0xFFFFFFFF
E2M1 = e2m1_codes_to_f32(torch.arange(16, dtype=torch.uint8)).tolist()


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> 8 * i) & 255 for i in range(4)] + [(b >> 8 * i) & 255 for i in range(4)]
    return sum(src[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def _f16x2_mul(a: int, b: int) -> int:
    h = np.array([a & 0xFFFF, a >> 16], dtype=np.uint16).view(np.float16) * \
        np.array([b & 0xFFFF, b >> 16], dtype=np.uint16).view(np.float16)
    v = h.astype(np.float16).view(np.uint16)
    return int(v[0]) | int(v[1]) << 16


def run_ptx(ptx: str, args: dict[str, int]) -> dict[str, int]:
    """Interpret a { ... } block of prmt/shl/shr/and/or/mov/mul.rn.f16x2 (the decode's instruction set)."""
    regs: dict[str, int] = dict(args)
    val = lambda x: int(x, 0) if x[0].isdigit() else regs[x]  # noqa: E731
    body = ptx.strip()
    assert body[0] == "{" and body[-1] == "}", "one PTX block expected"
    for ins in filter(None, (s.strip() for s in body[1:-1].split(";"))):
        if ins.startswith(".reg"):
            continue
        m = re.fullmatch(r"mov\.b64 \{(\w+), (\w+)\}, (\$\d+)", ins)
        if m:
            v = val(m.group(3))
            regs[m.group(1)], regs[m.group(2)] = v & M32, v >> 32
            continue
        op, rest = ins.split(None, 1)
        d, *ops = (o.strip() for o in rest.split(","))
        fn = {"prmt.b32": lambda a, b, s: _prmt(a, b, s), "shl.b32": lambda a, s: (a << s) & M32,
              "shr.b32": lambda a, s: a >> s, "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
              "mov.b32": lambda a: a, "mul.rn.f16x2": _f16x2_mul}.get(op)
        if fn is None:
            raise ValueError(f"unexpected instruction {op!r} in the decode PTX")
        regs[d] = fn(*(val(o) for o in ops))
    return regs


def _halves(reg: int) -> tuple[float, float]:
    v = np.array([reg & 0xFFFF, reg >> 16], dtype=np.uint16).view(np.float16)
    return float(v[0]), float(v[1])


def _expect(reg: int, codes: tuple[int, int], scale: float, label: str) -> None:
    got = _halves(reg)
    want = tuple(E2M1[c] * scale for c in codes)
    assert got == want, f"{label}: fp16 halves {got} (bits {reg:#010x}), expected codes {codes} -> {want}"


def _nib(x: int, i: int) -> int:
    return (x >> 4 * i) & 0xF


SEEDS = range(64)


@pytest.mark.parametrize("seed", SEEDS[:16])
def test_bytes_variant_puts_low_then_high_nibbles_of_byte_pairs(seed):
    x = int(np.random.default_rng(seed).integers(0, 2**32, dtype=np.uint64))
    r = run_ptx(bytes_to_f16x2_ptx(), {"$4": x})
    byte = [(x >> 8 * i) & 255 for i in range(4)]
    _expect(r["$0"], (byte[0] & 15, byte[1] & 15), 2.0**-14, "$0 low nibbles of bytes 0, 1")
    _expect(r["$1"], (byte[2] & 15, byte[3] & 15), 2.0**-14, "$1 low nibbles of bytes 2, 3")
    _expect(r["$2"], (byte[0] >> 4, byte[1] >> 4), 2.0**-14, "$2 high nibbles of bytes 0, 1")
    _expect(r["$3"], (byte[2] >> 4, byte[3] >> 4), 2.0**-14, "$3 high nibbles of bytes 2, 3")


@pytest.mark.parametrize("seed", SEEDS[:16])
def test_word_pair_variant_pairs_nibble_r_of_two_words(seed):
    w0, w1 = (int(v) for v in np.random.default_rng(seed).integers(0, 2**32, size=2, dtype=np.uint64))
    r = run_ptx(word_pair_to_f16x2_ptx(), {"$8": w0, "$9": w1})
    for n in range(8):
        _expect(r[f"${n}"], (_nib(w0, n), _nib(w1, n)), 2.0**-14, f"${n} nibble {n} of (word 0, word 1)")


def test_every_code_in_every_position():
    """All 16 codes in all 8 nibble positions of both words (the random cases may miss some)."""
    for code in range(16):
        w = int("".join([f"{code:x}"] * 8), 16)
        r = run_ptx(word_pair_to_f16x2_ptx(), {"$8": w, "$9": w ^ 0x88888888})
        for n in range(8):
            _expect(r[f"${n}"], (code, code ^ 8), 2.0**-14, f"code {code} nibble {n}")
