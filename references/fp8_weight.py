"""FP8 block-scaled linear weights: every scale encoding that ships, mapped to ONE typed weight.

W[n, k] = e4m3(weight[n, k]) * decode_scale[n // block_n, k // block_k]   (NVFP4_FACTS.md 5b)

| encoding            | checkpoint scale tensor (weight: F8_E4M3 [N, K])     | stored as   | shape             |
|---------------------|------------------------------------------------------|-------------|-------------------|
| v4_e8m0_scale       | `scale` F8_E8M0 (DeepSeek-V4)                        | UE8M0 bytes | [ceil(N/128),     |
| v3_weight_scale_inv | `weight_scale_inv` F32 (DeepSeek-V3)                 | float32     |  ceil(K/128)]     |
| ct_fp8_block        | `weight_scale` BF16 or F32 (compressed-tensors)      | bf16 / f32  |  for these three  |
| modelopt_fp8_pb_wo  | `weight_scale` F32 (ModelOpt FP8_PB_WO)              | float32     | [ob, 1, ib, 1]    |
| per_tensor          | `weight_scale` F32 [] + `input_scale` F32 []         | float32     | [] -> [1, 1]      |

Every encoding is the same Fp8BlockScaledWeight: E4M3 bytes [N, K] plus the decode scales kept in
their storage dtype (uint8 UE8M0 bytes, float32 or bfloat16), 2-D [ceil(N/block_n), ceil(K/block_k)],
and the block shape (128 x 128; N x K for per-tensor). Despite its name, V3's weight_scale_inv
multiplies (W = fp8 * s), as do all the others. Decoding is exact: a UE8M0 byte b is built into the
float32 bits of 2^(b-127) (never a float32 copy of the byte as a number: that shipped bug turns
2^-7 into 120.0); bf16 -> float32 is exact. Partial edge blocks (N or K not a multiple of 128) use
the first rows / columns of their block's scale.

The constructors refuse, with a one-line ValueError naming the tensor, the known mistakes:
- E8M0 bytes read as numbers (a float scale whose values are all integers 0..255, not powers of
  two; or a float tensor where F8_E8M0 bytes are expected);
- a scale shape other than ceil-div of the weight's (named "transposed" or "floor division"
  when it is that);
- NaN scales (UE8M0 0xFF; NaN / Inf / negative float scales); NaN weight bytes (0x7F / 0xFF).
A zero float scale is allowed here (the block decodes to 0); checkpoint lint reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from references.codecs import E4M3_NAN_BYTE, UE8M0_NAN_BYTE, e4m3_bytes_to_f32, ue8m0_bytes_to_f32
from references.linear import Fp8Block128Weight

__all__ = [
    "FP8_WEIGHT_BLOCK",
    "FP8_WEIGHT_ENCODINGS",
    "Fp8BlockScaledWeight",
    "ceil_div",
    "expand_block_scale_f32",
    "bf16_bits_to_f32",
    "e4m3_weight_bytes",
    "check_block_scale_shape",
    "check_ue8m0_scale_has_no_nan",
    "check_float_scale_is_finite_nonnegative",
    "check_float_scale_is_not_e8m0_bytes",
    "fp8_weight_from_v4_e8m0_scale",
    "fp8_weight_from_v3_weight_scale_inv",
    "fp8_weight_from_ct_fp8_block",
    "fp8_weight_from_modelopt_fp8_pb_wo",
    "fp8_weight_from_per_tensor",
]

FP8_WEIGHT_BLOCK = 128
FP8_WEIGHT_ENCODINGS = ("v4_e8m0_scale", "v3_weight_scale_inv", "ct_fp8_block", "modelopt_fp8_pb_wo", "per_tensor")
_SCALE_STORAGE_DTYPE = {"ue8m0": torch.uint8, "f32": torch.float32, "bf16": torch.bfloat16}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Fp8BlockScaledWeight:
    """E4M3 weight bytes e4m3_u8 [N, K] with decode scales block_dec_scale [ceil(N/block_n),
    ceil(K/block_k)] in storage form (scale_storage "ue8m0": uint8 bytes 2^(b-127); "f32"; "bf16").

    encoding: which checkpoint encoding it came from (FP8_WEIGHT_ENCODINGS), for reports and lint.
    input_dec_scale_f32: per-tensor FP8's static activation decode scale (`input_scale`, 0-d), else None.
    Build it with the fp8_weight_from_* constructors, which validate; this class checks only that
    the fields agree with each other.
    """

    e4m3_u8: Tensor
    block_dec_scale: Tensor
    scale_storage: Literal["ue8m0", "f32", "bf16"]
    block_n: int
    block_k: int
    encoding: str
    input_dec_scale_f32: Tensor | None = None

    def __post_init__(self) -> None:
        if self.scale_storage not in _SCALE_STORAGE_DTYPE:
            raise ValueError(f"scale_storage={self.scale_storage!r}: expected one of {sorted(_SCALE_STORAGE_DTYPE)}")
        if self.block_dec_scale.dtype != _SCALE_STORAGE_DTYPE[self.scale_storage]:
            raise ValueError(f"block_dec_scale: {self.block_dec_scale.dtype} does not match scale_storage "
                             f"{self.scale_storage!r}")
        if self.encoding not in FP8_WEIGHT_ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r}: expected one of {FP8_WEIGHT_ENCODINGS}")
        if self.e4m3_u8.dtype != torch.uint8 or self.e4m3_u8.dim() != 2:
            raise ValueError(f"e4m3_u8: expected uint8 [N, K], got {self.e4m3_u8.dtype} {tuple(self.e4m3_u8.shape)}")
        expected = (ceil_div(self.n, self.block_n), ceil_div(self.k, self.block_k))
        if tuple(self.block_dec_scale.shape) != expected:
            raise ValueError(f"block_dec_scale: shape {tuple(self.block_dec_scale.shape)}, expected {expected}")

    @property
    def n(self) -> int:
        return self.e4m3_u8.shape[0]

    @property
    def k(self) -> int:
        return self.e4m3_u8.shape[1]

    def block_dec_scale_f32(self) -> Tensor:
        """The decode scales as float32 [ceil(N/block_n), ceil(K/block_k)], exact for every storage."""
        if self.scale_storage == "ue8m0":
            return ue8m0_bytes_to_f32(self.block_dec_scale)
        if self.scale_storage == "bf16":
            return bf16_bits_to_f32(self.block_dec_scale)
        return self.block_dec_scale

    def decode_f64(self) -> Tensor:
        """W = e4m3 * block scale, float64 [N, K] (exact: 4-bit x 8- or 24-bit significands)."""
        scale = expand_block_scale_f32(self.block_dec_scale_f32(), self.n, self.k,
                                       block_n=self.block_n, block_k=self.block_k)
        return e4m3_bytes_to_f32(self.e4m3_u8).double() * scale.double()

    def to_fp8_block128_weight(self) -> Fp8Block128Weight:
        """The same weight as references.linear.Fp8Block128Weight (float32 128x128 scales; exact:
        a per-tensor scale is repeated into every 128 x 128 block)."""
        s = self.block_dec_scale_f32()
        if (self.block_n, self.block_k) != (FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK):
            s = s.expand(ceil_div(self.n, FP8_WEIGHT_BLOCK), ceil_div(self.k, FP8_WEIGHT_BLOCK)).contiguous()
        return Fp8Block128Weight(self.e4m3_u8, s)


# ----------------------------------------------------------------------------- decoding helpers


def bf16_bits_to_f32(x_bf16: Tensor) -> Tensor:
    """bfloat16 -> float32 by bits: the 16 bits become the high half of the f32 pattern (exact)."""
    if x_bf16.dtype != torch.bfloat16:
        raise TypeError(f"x_bf16: expected torch.bfloat16, got {x_bf16.dtype}")
    bits = x_bf16.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32)


def expand_block_scale_f32(scale_f32: Tensor, n: int, k: int, *, block_n: int, block_k: int) -> Tensor:
    """[ceil(N/bn), ceil(K/bk)] -> [N, K]: element (i, j) gets scale[i // bn, j // bk]; edge blocks cut."""
    return scale_f32.repeat_interleave(block_n, dim=0)[:n].repeat_interleave(block_k, dim=1)[:, :k]


# ----------------------------------------------------------------------------- validation


def e4m3_weight_bytes(weight: Tensor, *, name: str) -> Tensor:
    """An F8_E4M3 weight [N, K] (float8_e4m3fn, or its uint8 bytes) -> uint8 bytes; refuses other
    dtypes and ranks, and NaN bytes (0x7F / 0xFF: E4M3 has no Inf, a NaN weight is a broken file)."""
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"{name}: expected F8_E4M3 (float8_e4m3fn) bytes, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    b = weight.view(torch.uint8)
    nan = int(((b & 0x7F) == E4M3_NAN_BYTE).sum())
    if nan:
        raise ValueError(f"{name}: {nan} NaN E4M3 bytes (0x7F/0xFF) of {b.numel()}")
    return b


def check_block_scale_shape(scale_shape: tuple[int, ...], n: int, k: int, *, name: str,
                            block_n: int = FP8_WEIGHT_BLOCK, block_k: int = FP8_WEIGHT_BLOCK) -> None:
    """The scale grid must be [ceil(N/bn), ceil(K/bk)]; a transposed grid or one built by floor
    division (partial edge blocks dropped) is named as such."""
    expected = (ceil_div(n, block_n), ceil_div(k, block_k))
    got = tuple(scale_shape)
    if got == expected:
        return
    why = ""
    if got == expected[::-1]:
        why = " (transposed: [K/128, N/128])"
    elif got == (n // block_n, k // block_k):
        why = " (floor division: the partial edge block has no scale)"
    raise ValueError(f"{name}: shape {list(got)}, expected [ceil(N/{block_n}), ceil(K/{block_k})] = "
                     f"{list(expected)} for the weight [{n}, {k}]{why}")


def check_ue8m0_scale_has_no_nan(scale_u8: Tensor, *, name: str) -> None:
    """UE8M0 byte 0xFF is NaN: a block scale must never be it."""
    nan = int((scale_u8 == UE8M0_NAN_BYTE).sum())
    if nan:
        raise ValueError(f"{name}: {nan} NaN E8M0 scale bytes (0xFF) of {scale_u8.numel()}")


def check_float_scale_is_finite_nonnegative(scale: Tensor, *, name: str) -> None:
    """A float block decode scale must be finite and >= 0 (NaN, Inf and negatives refused)."""
    s = scale.to(torch.float32)
    bad = int((~torch.isfinite(s) | (s < 0)).sum())
    if bad:
        raise ValueError(f"{name}: {bad} of {s.numel()} block scales are NaN, Inf or negative")


def check_float_scale_is_not_e8m0_bytes(scale: Tensor, *, name: str) -> None:
    """Refuse E8M0 bytes read as numbers: every value an integer in 0..255 and at least one that is
    not a power of two (E8M0 bytes of ordinary weights are ~110..127 = 2^-17..2^0; a block scale
    amax/448 of a real weight is far below 1, and a power-of-two scale is never 120.0)."""
    s = scale.to(torch.float32)
    if s.numel() == 0 or not bool(torch.isfinite(s).all()):
        return
    integral = bool(((s == torch.round(s)) & (s >= 0) & (s <= 255)).all())
    mant, _ = torch.frexp(s)
    not_pow2 = int(((mant != 0.5) & (s != 0)).sum())
    if integral and not_pow2:
        raise ValueError(f"{name}: all {s.numel()} values are integers 0..255 and {not_pow2} are not powers "
                         f"of two (E8M0 bytes read as numbers? a scale 2^(b-127) was expected)")


def _float_block_scale_2d(scale: Tensor, n: int, k: int, *, name: str) -> Tensor:
    check_block_scale_shape(tuple(scale.shape), n, k, name=name)
    check_float_scale_is_finite_nonnegative(scale, name=name)
    check_float_scale_is_not_e8m0_bytes(scale, name=name)
    return scale


# ----------------------------------------------------------------------------- one constructor per encoding


def fp8_weight_from_v4_e8m0_scale(weight: Tensor, scale: Tensor, *, module: str) -> Fp8BlockScaledWeight:
    """DeepSeek-V4: `{module}.weight` F8_E4M3 [N, K], `{module}.scale` F8_E8M0 [ceil(N/128), ceil(K/128)]
    (float8_e8m0fnu or its uint8 bytes; a float copy is refused: it has lost the encoding)."""
    w = e4m3_weight_bytes(weight, name=f"{module}.weight")
    name = f"{module}.scale"
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"{name}: expected F8_E8M0 bytes (float8_e8m0fnu), got {scale.dtype} "
                         f"(a float copy of E8M0 bytes reads each byte as a number)")
    s = scale.view(torch.uint8)
    check_block_scale_shape(tuple(s.shape), *w.shape, name=name)
    check_ue8m0_scale_has_no_nan(s, name=name)
    return Fp8BlockScaledWeight(w, s, "ue8m0", FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, "v4_e8m0_scale")


def fp8_weight_from_v3_weight_scale_inv(weight: Tensor, weight_scale_inv: Tensor, *,
                                        module: str) -> Fp8BlockScaledWeight:
    """DeepSeek-V3: `{module}.weight_scale_inv` F32 [ceil(N/128), ceil(K/128)], W = fp8 * s."""
    w = e4m3_weight_bytes(weight, name=f"{module}.weight")
    name = f"{module}.weight_scale_inv"
    if weight_scale_inv.dtype != torch.float32:
        raise ValueError(f"{name}: expected F32, got {weight_scale_inv.dtype}")
    s = _float_block_scale_2d(weight_scale_inv, *w.shape, name=name)
    return Fp8BlockScaledWeight(w, s, "f32", FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, "v3_weight_scale_inv")


def fp8_weight_from_ct_fp8_block(weight: Tensor, weight_scale: Tensor, *, module: str) -> Fp8BlockScaledWeight:
    """compressed-tensors FP8_BLOCK: `{module}.weight_scale` BF16 or F32 [ceil(N/128), ceil(K/128)]."""
    w = e4m3_weight_bytes(weight, name=f"{module}.weight")
    name = f"{module}.weight_scale"
    storage = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(weight_scale.dtype)
    if storage is None:
        raise ValueError(f"{name}: expected BF16 or F32, got {weight_scale.dtype}")
    s = _float_block_scale_2d(weight_scale, *w.shape, name=name)
    return Fp8BlockScaledWeight(w, s, storage, FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, "ct_fp8_block")


def fp8_weight_from_modelopt_fp8_pb_wo(weight: Tensor, weight_scale: Tensor, *,
                                       module: str) -> Fp8BlockScaledWeight:
    """ModelOpt FP8_PB_WO: `{module}.weight_scale` F32 4-D [out_blk, 1, in_blk, 1] (the 128x128 grid
    with broadcast axes); kept as its 2-D view [out_blk, in_blk]."""
    w = e4m3_weight_bytes(weight, name=f"{module}.weight")
    name = f"{module}.weight_scale"
    if weight_scale.dtype != torch.float32:
        raise ValueError(f"{name}: expected F32, got {weight_scale.dtype}")
    if weight_scale.dim() != 4 or weight_scale.shape[1] != 1 or weight_scale.shape[3] != 1:
        raise ValueError(f"{name}: expected 4-D [out_blk, 1, in_blk, 1], got shape {list(weight_scale.shape)}")
    s = _float_block_scale_2d(weight_scale[:, 0, :, 0], *w.shape, name=name)
    return Fp8BlockScaledWeight(w, s.contiguous(), "f32", FP8_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, "modelopt_fp8_pb_wo")


def fp8_weight_from_per_tensor(weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None, *,
                               module: str) -> Fp8BlockScaledWeight:
    """Per-tensor FP8: `{module}.weight_scale` F32 (one value, [] or [1]) and `{module}.input_scale`
    F32 (the static activation decode scale) or None; the weight is one N x K block."""
    w = e4m3_weight_bytes(weight, name=f"{module}.weight")
    scales = {"weight_scale": weight_scale} if input_scale is None else \
        {"weight_scale": weight_scale, "input_scale": input_scale}
    for suffix, t in scales.items():
        if t.dtype != torch.float32 or t.numel() != 1:
            raise ValueError(f"{module}.{suffix}: expected one F32 value, got {t.dtype} {list(t.shape)}")
        check_float_scale_is_finite_nonnegative(t, name=f"{module}.{suffix}")
    n, k = w.shape
    return Fp8BlockScaledWeight(w, weight_scale.reshape(1, 1), "f32", max(n, 1), max(k, 1), "per_tensor",
                                None if input_scale is None else input_scale.reshape(()))
