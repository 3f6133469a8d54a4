"""The E2M1 -> fp16x2 PTX text of the sm90 kernels (kernels/sm90/_e2m1_ptx.py), run on the CPU by a
tiny interpreter of the few b32 instructions it uses, against the references' E2M1 decode:
every output half must be e2m1(code) * 2^-14 (or * 1 for the activation variant) for the code the
layout puts there. The kernels' own numerics are tested on the H200 (test_sm90_gemm.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kernels.sm90._e2m1_ptx import (bytes_to_f16x2_ptx, fragment_halves_to_f16x2_ptx, halves_to_f16x2_ptx,
                                     word_pair_to_f16x2_ptx)
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


# ---- the fragment order of the grouped GEMM's prepared weights (kernels/sm90/host_prepare_experts) -----------------

def _half(b: torch.Tensor, i: int) -> int:
    return int(b[2 * i]) | int(b[2 * i + 1]) << 8


def _unit_pairs_agree(unit: torch.Tensor) -> None:
    """For each lane c of a 16-byte unit: halves_to_f16x2_ptx on checkpoint halves (c, 4 + c) and
    fragment_halves_to_f16x2_ptx on the same positions of the prepared unit give the same four registers, bit for
    bit (junk in bits 16-31 of the inputs, which both must ignore)."""
    from kernels.sm90.host_prepare_experts import to_fragment_order

    prep = to_fragment_order(unit.reshape(1, 16)).reshape(16)
    for c in range(4):
        want = run_ptx(halves_to_f16x2_ptx(), {"$4": _half(unit, c) | 0xABCD0000, "$5": _half(unit, 4 + c)})
        got = run_ptx(fragment_halves_to_f16x2_ptx(), {"$4": _half(prep, c) | 0x12340000,
                                                      "$5": _half(prep, 4 + c) | 0xFFFF0000})
        for j in range(4):
            assert got[f"${j}"] == want[f"${j}"], (
                f"lane {c} output ${j}: fragment order {got[f'${j}']:#010x}, checkpoint order {want[f'${j}']:#010x} "
                f"(unit {unit.tolist()}, prepared {prep.tolist()})")


@pytest.mark.parametrize("seed", SEEDS)
def test_fragment_decode_equals_the_checkpoint_decode(seed):
    unit = torch.randint(0, 256, (16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    _unit_pairs_agree(unit)


def test_fragment_decode_every_code_in_every_nibble():
    """Each of the 16 codes alone in each of the unit's 32 nibbles (the rest a second code), so a field that a shift
    moves into the wrong place, or a bit from the other half that a mask lets through, shows."""
    for code in range(16):
        for pos in range(32):
            nib = [code ^ 0x9] * 32
            nib[pos] = code
            unit = torch.tensor([nib[2 * b] | nib[2 * b + 1] << 4 for b in range(16)], dtype=torch.uint8)
            _unit_pairs_agree(unit)


def test_halves_decode_puts_low_then_high_nibbles_of_each_halfs_bytes():
    """halves_to_f16x2_ptx itself against the E2M1 table: $0 / $1 low nibbles of the bytes of h_a / h_b, $2 / $3
    their high nibbles (the contract the fragment decode is compared with above)."""
    for seed in SEEDS[:16]:
        a, b = (int(v) for v in np.random.default_rng(seed).integers(0, 2**16, size=2))
        r = run_ptx(halves_to_f16x2_ptx(), {"$4": a, "$5": b})
        _expect(r["$0"], (a & 15, (a >> 8) & 15), 2.0**-14, "$0 low nibbles of h_a's bytes")
        _expect(r["$1"], (b & 15, (b >> 8) & 15), 2.0**-14, "$1 low nibbles of h_b's bytes")
        _expect(r["$2"], ((a >> 4) & 15, a >> 12), 2.0**-14, "$2 high nibbles of h_a's bytes")
        _expect(r["$3"], ((b >> 4) & 15, b >> 12), 2.0**-14, "$3 high nibbles of h_b's bytes")


def test_fragment_decode_is_shorter():
    """What the order is for: fewer instructions a pair of halves (PTX: 14 against 20)."""
    count = lambda ptx: sum(1 for s in ptx.strip()[1:-1].split(";") if s.strip() and not s.strip().startswith(".reg"))  # noqa: E731
    assert (count(fragment_halves_to_f16x2_ptx()), count(halves_to_f16x2_ptx())) == (14, 20)


def test_fragment_order_round_trips_in_place_and_refuses_a_partial_unit():
    from kernels.sm90.host_prepare_experts import from_fragment_order, to_fragment_order

    x = torch.randint(0, 256, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = to_fragment_order(x, chunk=2)
    assert not torch.equal(x, y) and torch.equal(from_fragment_order(y), x)
    z = x.clone()
    assert to_fragment_order(z, out=z) is z and torch.equal(z, y)
    ones = lambda t: sum(int(((t >> b) & 1).sum()) for b in range(8))  # noqa: E731
    assert ones(x) == ones(y), "the order only moves bits: the count of set bits is kept"
    with pytest.raises(ValueError, match="packed_u8"):
        to_fragment_order(torch.zeros(4, 24, dtype=torch.uint8))
