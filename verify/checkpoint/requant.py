"""The checkpoint's re-quantization contract (lint, issue 26 item 5): do the stored NVFP4 codes come back?

Each 16-element block of an NVFP4 weight is decoded with its stored E4M3 block scale s and the tensor's
weight_scale_2 g (x = e2m1(code) * s * g), and re-quantized by the checkpoint's recipe with references'
bit-accurate codec (references.nvfp4.quantize_nvfp4: block amax, block scale rounded to E4M3 RNE, codes
rounded to E2M1 RNE). A block "comes back" when its scale byte and its codes (as values: +0 == -0) are
what it was stored with.

What the recipe guarantees, and so what a block that does not come back means. The recipe stores
s = E4M3(t) with t = v / (6 g), v the block amax, and the codes RTNE(x / (s g)); the block's largest
element gets the code RTNE(6 t / s). Call T(s) the set of t the recipe rounds to the byte of s (its E4M3
rounding cell; down to 0 for the recipe's lower clamp, up to infinity for 448, where it saturates).
The stored block is the recipe's output for SOME input exactly when its largest code magnitude c_max is
an E2M1 rounding of some 6 t / s with t in T(s): every smaller code is reached by an element of that
value. Decoding and re-quantizing reproduces exactly the blocks with c_max = 6 (then v = 6 s g and the
scale comes back); so:
- normal scale bytes (exponent field 1..15): T(s) is within half an E4M3 step of s, so 6 t / s lies in
  [5.65, 6.4] and c_max must be 6: a block with a smaller largest code cannot come from the recipe with
  this scale. FLAGGED (codes quantized with a larger scale than the one stored: the tensor's scale or
  another block's, a scale stored rounded down by a binade or more, codes of another row or expert).
- subnormal scale bytes (0x01..0x07): E4M3's step there (2^-9) is coarse, 6 t / s spans e.g. [3, 9] for
  0x01, so c_max may be 3 or 4: class `subnormal_scale` (by design) when c_max is reachable, else flagged.
- the recipe's lower clamp (modelopt 2^-9, torchao 2^-6): blocks whose t was clamped up have any c_max:
  class `lower_clamp`.
- c_max reachable only at a rounding midpoint of E2M1 (5 -> 4, 3.5 -> 4, ...) or at the edge of T(s):
  class `tie` (RTNE decided it; decoded values cannot show which way).
- zero scale byte (0x00 / 0x80): the block decodes to zero whatever its codes; te and vllm write it for
  blocks whose t underflows E4M3, with codes saturated at +-6 (te) or 0 (vllm): class `zero_scale` when
  every code is 0 or +-6, flagged otherwise (codes of a scale other than the one stored).
- a NaN scale byte (0x7F / 0xFF) is the loader's error already (value_defects): class `nan_scale`;
  a negative scale byte (sign bit set) is flagged.

What it cannot see, by construction: codes quantized with the UNROUNDED scale t next to the stored
E4M3(t). Their largest element maps to exactly 6, and the block is byte for byte the recipe's output for
the input x * s / t (a per-block gain error of at most half an E4M3 step, 6.25%): no test of the bytes
alone can tell it from a correct export, in the normal range. It shows only where the stored scale
contradicts the codes: a scale that underflowed to zero next to codes other than 0 / +-6 (te, vllm), or
(any recipe) where the exporter's scale and the stored one differ by more than E4M3's rounding.
(verify/tests/test_lint_requant.py plants both.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from references.codecs import e4m3_bytes_to_f32, f32_to_e4m3_bytes
from references.nvfp4 import (decode_nvfp4_block_scaled, global_enc_scale_from_dec, quantize_nvfp4,
                              unpack_e2m1x2_low_first)
from references.recipes import Recipe

__all__ = ["RequantResult", "requant_contract", "BY_DESIGN_CLASSES", "feasible_max_codes"]

BLOCK = 16
BY_DESIGN_CLASSES = ("subnormal_scale", "lower_clamp", "tie", "zero_scale", "nan_scale")
# E2M1 magnitudes by code 0..7 and each code's rounding cell [lo, hi] (RTNE: a midpoint goes to the even code)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MID = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E4M3_MAX_BYTE = 0x7E
_EXP_MASK = 0x78


@dataclass
class RequantResult:
    """One NVFP4 tensor's contract: blocks checked, how many came back, the by-design classes of those
    that did not (counts), and the flagged ones: count and the first, as (expert or None, row, block).
    skipped: blocks not checked because their weight_scale_2 is not a finite positive number (lint's
    bad_global_scale names it)."""

    tensor: str
    blocks: int
    returned: int
    by_design: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    first_flagged: tuple[int | None, int, int] | None = None
    first_reason: str = ""
    skipped: int = 0


def _cell(c: int) -> tuple[float, float]:
    lo = 0.0 if c == 0 else _MID[c - 1]
    hi = float("inf") if c == 7 else _MID[c]
    return lo, hi


def _e4m3_values() -> list[float]:
    return e4m3_bytes_to_f32(torch.arange(256, dtype=torch.int32).to(torch.uint8)).tolist()


def _scale_cell(byte: int, recipe: Recipe, vals: list[float]) -> tuple[float, float]:
    """[lo, hi] of the float32 scales t the recipe stores as E4M3 byte `byte` (0 < byte <= 0x7E): its RNE
    cell, from 0 for the byte of the recipe's lower clamp, to infinity for 448 (saturation)."""
    s = vals[byte]
    lo = (vals[byte - 1] + s) / 2
    hi = float("inf") if byte == _E4M3_MAX_BYTE else (s + vals[byte + 1]) / 2
    clamp = recipe.block_scale_lower_clamp
    if clamp is not None and int(f32_to_e4m3_bytes(torch.tensor([clamp]), saturate=True)[0]) == byte:
        lo = 0.0
    return lo, hi


def feasible_max_codes(byte: int, recipe: Recipe, vals: list[float] | None = None) -> dict[int, str]:
    """Largest code magnitude (0..7) -> how the recipe reaches it under the positive E4M3 scale byte `byte`:
    "exact" (inside the rounding cells), "tie" (only at a midpoint or the cell's edge), "lower_clamp"
    (only because t was clamped up). Unreachable magnitudes are absent. See the module docstring."""
    vals = vals or _e4m3_values()
    s = vals[byte]
    lo, hi = _scale_cell(byte, recipe, vals)
    r_lo, r_hi = 6 * lo / s, 6 * hi / s
    clamp = recipe.block_scale_lower_clamp
    clamped_from = 6 * float(clamp) / s if clamp is not None and lo == 0.0 else None
    out: dict[int, str] = {}
    for c in range(8):
        c_lo, c_hi = _cell(c)
        a, b = max(r_lo, c_lo), min(r_hi, c_hi)
        if a > b:
            continue
        if clamped_from is not None and b < clamped_from * (1 - 2**-20):
            out[c] = "lower_clamp"
        else:
            out[c] = "tie" if a == b else "exact"
    return out


_HOW = {"exact": 1, "tie": 2, "lower_clamp": 3}  # codes of the feasibility table (0: unreachable)
_TABLES: dict[str, Tensor] = {}


def _feasibility_table(recipe: Recipe) -> Tensor:
    """int8 [128, 8]: positive scale byte x largest code magnitude -> 0 unreachable, else _HOW's code."""
    if recipe.name not in _TABLES:
        t = torch.zeros(128, 8, dtype=torch.int8)
        vals = _e4m3_values()
        for b in range(1, _E4M3_MAX_BYTE + 1):
            for c, how in feasible_max_codes(b, recipe, vals).items():
                t[b, c] = _HOW[how]
        _TABLES[recipe.name] = t
    return _TABLES[recipe.name]


def requant_contract(tensor: str, packed_u8: Tensor, sf_e4m3: Tensor, g_f32: Tensor, *,
                     recipe: Recipe, exhaustive: bool = False) -> RequantResult:
    """The contract of one NVFP4 weight: packed [..., N, K/2] uint8, block scales [..., N, K/16] (E4M3 bytes),
    weight_scale_2 [...] (0-d, or one per expert of a stack). Re-quantizes blocks with `recipe` (the
    checkpoint's: ModelOpt exports use references.recipes.MODELOPT) and classes what does not come back.

    exhaustive=False: a block whose largest code is 6 under a normal, positive scale byte comes back by the
    module docstring's argument (v = 6 s g, E4M3(v / (6 g)) = s, every code an exact grid point), so it is
    counted as returned without the codec; every other block goes through the codec. That is what keeps a
    full-size layer (25e9 codes in DeepSeek-V4-Pro's experts) to integer work for almost every block.
    exhaustive=True: every block through the codec (the tests compare both)."""
    table = _feasibility_table(recipe)
    stacked = packed_u8.dim() == 3
    packed = packed_u8 if stacked else packed_u8.unsqueeze(0)
    sf = sf_e4m3.view(torch.uint8)
    sf = sf if stacked else sf.unsqueeze(0)
    g = g_f32.to(torch.float32).reshape(-1)
    if g.numel() == 1:
        g = g.expand(packed.shape[0])
    res = RequantResult(tensor, blocks=sf.numel(), returned=0)
    for e in range(packed.shape[0]):
        if not (torch.isfinite(g[e]) and g[e] > 0):  # a defect of its own (value_defects: bad_global_scale)
            res.blocks -= sf[e].numel()
            res.skipped += sf[e].numel()
            continue
        _one(res, e if stacked else None, packed[e], sf[e], g[e], recipe, table, exhaustive)
    return res


def _one(res: RequantResult, expert: int | None, packed: Tensor, sf: Tensor, g: Tensor, recipe: Recipe,
         table: Tensor, exhaustive: bool) -> None:
    n = packed.shape[0]
    blocks = packed.reshape(n, -1, BLOCK // 2)
    mag = torch.maximum(blocks & 0x7, (blocks >> 4) & 0x7)  # per byte: the larger magnitude of its 2 codes
    cmax = mag.amax(-1).long()
    pos = sf & 0x7F
    settled = torch.zeros_like(pos, dtype=torch.bool) if exhaustive else \
        (cmax == 7) & ((pos & _EXP_MASK) != 0) & (pos != 0x7F) & ((sf & 0x80) == 0)
    res.returned += int(settled.sum())
    rows, cols = (~settled).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    sub_packed, sub_sf = blocks[rows, cols], sf[rows, cols]  # [B, 8] codes, [B] scale bytes: the codec's blocks
    codes = unpack_e2m1x2_low_first(sub_packed)
    mags = codes & 0x7
    nan = (sub_sf & 0x7F) == 0x7F
    x = decode_nvfp4_block_scaled(sub_packed, torch.where(nan, torch.zeros_like(sub_sf), sub_sf).unsqueeze(-1)) * g
    q = quantize_nvfp4(x, recipe=recipe, **_global_arg(recipe, g.reshape(())))
    got = unpack_e2m1x2_low_first(q.packed_u8)
    same_codes = (torch.where(mags == 0, 0, codes) == torch.where((got & 0x7) == 0, 0, got)).all(-1)
    back = same_codes & (q.sf_u8.reshape(-1) == sub_sf) & ~nan
    res.returned += int(back.sum())
    sub_pos, sub_cmax = sub_sf & 0x7F, cmax[rows, cols]
    how = table[sub_pos.long().clamp(max=127), sub_cmax]
    negative = ((sub_sf & 0x80) != 0) & (sub_pos != 0) & ~nan
    zero = sub_pos == 0
    zero_ok = zero & ((mags == 0) | (mags == 7)).all(-1)
    subnormal = (sub_pos & _EXP_MASK) == 0
    classes = {
        "nan_scale": nan,
        "zero_scale": zero_ok & ~negative,
        "subnormal_scale": ~zero & ~nan & ~negative & subnormal & (how == _HOW["exact"]),
        "tie": ~zero & ~nan & ~negative & (how == _HOW["tie"]),
        "lower_clamp": ~zero & ~nan & ~negative & (how == _HOW["lower_clamp"]),
    }
    classed = torch.zeros_like(back)
    for name, m in classes.items():
        m = m & ~back
        k = int(m.sum())
        if k:
            res.by_design[name] = res.by_design.get(name, 0) + k
        classed |= m
    flagged = ~back & ~classed
    k = int(flagged.sum())
    if k:
        res.flagged += k
        if res.first_flagged is None:
            j = int(flagged.nonzero()[0])  # rows, cols come in (row, block) order: the first flagged block
            res.first_flagged = (expert, int(rows[j]), int(cols[j]))
            res.first_reason = _why(int(sub_sf[j]), int(sub_cmax[j]), mags[j], table, q.sf_u8.reshape(-1)[j])


def _global_arg(recipe: Recipe, dec_f32: Tensor) -> dict[str, Tensor]:
    """The stored weight_scale_2 (a decode scale) in the recipe's convention, as quantize_nvfp4 takes it."""
    if recipe.global_convention == "dec":
        return {"global_dec_scale_f32": dec_f32}
    return {"global_enc_scale_f32": global_enc_scale_from_dec(dec_f32)}


def _why(byte: int, c_max: int, mags: Tensor, table: Tensor, requant_byte: Tensor) -> str:
    """Why a flagged block cannot come from the recipe (its first finding's words)."""
    value = float(e4m3_bytes_to_f32(torch.tensor([byte], dtype=torch.uint8))[0])
    if byte & 0x80 and byte & 0x7F:
        return f"negative block scale byte 0x{byte:02x} ({value:g})"
    if byte & 0x7F == 0:
        return (f"zero block scale (0x{byte:02x}) next to codes other than 0 and +-6 (largest {_E2M1[c_max]:g}): "
                "codes of a scale other than the one stored")
    reach = [k for k in range(8) if int(table[byte, k])]
    if c_max not in reach:
        return (f"largest code {_E2M1[c_max]:g} under block scale 0x{byte:02x} ({value:g}); this recipe gives that "
                f"scale a largest code of {', '.join(f'{_E2M1[k]:g}' for k in reach)}: codes quantized with a "
                "scale other than the one stored")
    return (f"block scale 0x{byte:02x} ({value:g}) with largest code {_E2M1[c_max]:g} re-quantizes to scale "
            f"0x{int(requant_byte):02x} or other codes (float32 decode lost precision: an implausible "
            "weight_scale_2?)")
