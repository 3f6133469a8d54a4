"""Host-side preparation of a routed-expert stack for the sm90 grouped GEMM (once per layer).

The checkpoint stores each expert's NVFP4 linear as packed E2M1 [N, K/2] uint8 (K-major, element
2i in the low nibble), E4M3 block scales [N, K/16] (linear) and a float32 weight_scale_2; a stack is
[E, N, K/2], [E, N, K/16], [E]. The grouped kernel wants:
- packed bytes as they are ([E, N, K/2], contiguous; never re-quantized);
- each expert's scales in the 128x4 swizzled layout, experts back to back ([E, Np, Cp], Np = N
  rounded up to 128, Cp = K/16 rounded up to 4, zero padding), swizzled here with this module's own
  index math (kernels/ never imports references/);
- the decode scales weight_scale_2 as float32 [E] (alpha = a_dec[e] * w_dec[e] on the device).

For L1 (`prepare_gate_up`), w1 (gate) and w3 (up) become one stack of 2I rows interleaved by row:
row 2i is gate column i, row 2i + 1 is up column i (granularity 1: the interleave acts on N, one
row per output column; packing is along K and untouched), so every column tile of the kernel holds
the gate and up halves of the same intermediate columns (what the fused SwiGLU epilogue needs).
gate and up keep their own weight_scale_2 (dec_scale_f32 [E, 2]: gate, up); checkpoints whose
w1 and w3 scales differ are served exactly.

Fragment order (`fragment_order`, the default wherever K % 32 == 0): the packed bits are permuted inside
each row's 16-byte units (no byte leaves its unit, no extra memory) so that the register-fed kernels
turn two 16-bit halves into their four fp16x2 A-operand registers in 12 instructions instead of 16
(kernels/sm90/_e2m1_ptx.fragment_halves_to_f16x2_ptx; measured on the H100 in NOTES.md). Checkpoint
half hx = 4 ch0 + c of a unit holds bytes y = 0, 1, each two nibbles n = 0, 1 (element 2i low); the
fragment-order half 4 y + c holds nibble n of byte y of checkpoint half 4 ch0 + c as field j = ch0 + 2n,
its sign at bit FRAGMENT_SIGN_BITS[j] and its magnitude at FRAGMENT_MAG_SHIFTS[j] .. + 2. Every grouped
kernel reads both orders (the Triton ones undo it after the load); the values, the MMA operands and the
output bits are the same (tests compare).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90._e2m1_ptx import FRAGMENT_MAG_SHIFTS, FRAGMENT_SIGN_BITS
from kernels.sm90.host_prepare import swizzle_128x4

__all__ = ["Sm90GroupedWeight", "prepare_experts", "prepare_gate_up", "swizzle_128x4_stack", "to_fragment_order",
           "from_fragment_order"]

_BLOCK = 16


def swizzle_128x4_stack(sf_u8: Tensor) -> Tensor:
    """Linear block scales [E, R, C] (uint8 or float8_e4m3fn bytes) -> [E, Rp, Cp] uint8, each expert's
    [R, C] in the 128x4 swizzled layout (the dense weights' swizzle, host_prepare.swizzle_128x4)."""
    if sf_u8.dim() != 3:
        raise ValueError(f"weight_scale: expected an expert stack [E, N, K/16], got {tuple(sf_u8.shape)}")
    return swizzle_128x4(sf_u8)


@dataclass(frozen=True)
class Sm90GroupedWeight:
    """packed_u8 [E, N, K/2]; sf_swizzled_u8 [E, Np, Cp]; dec_scale_f32 [E] (plain) or [E, 2] (gate_up:
    gate, up); gate_up: rows interleaved gate/up (N = 2I, row 2i gate i, row 2i+1 up i); fragment_order:
    packed_u8 is in the fragment order (module docstring), else the checkpoint's."""

    packed_u8: Tensor
    sf_swizzled_u8: Tensor
    dec_scale_f32: Tensor
    gate_up: bool = False
    fragment_order: bool = False

    def __post_init__(self):
        if self.fragment_order and self.packed_u8.shape[-1] % 16:
            raise ValueError(f"packed_u8: the fragment order needs K % 32 == 0, got K = {2 * self.packed_u8.shape[-1]}")

    @property
    def num_experts(self) -> int:
        return self.packed_u8.shape[0]

    @property
    def n(self) -> int:
        """Weight rows per expert (2I for a gate_up stack)."""
        return self.packed_u8.shape[1]

    @property
    def k(self) -> int:
        return 2 * self.packed_u8.shape[2]


def _check_stack(name: str, w_u8: Tensor, w_scale_e4m3: Tensor, w_scale_2_f32: Tensor) -> tuple[int, int, int]:
    if not isinstance(w_u8, Tensor) or w_u8.dtype != torch.uint8 or w_u8.dim() != 3:
        raise ValueError(f"{name}.weight: expected packed E2M1 [E, N, K/2] uint8, got "
                         f"{getattr(w_u8, 'dtype', type(w_u8))} {tuple(getattr(w_u8, 'shape', ()))}")
    e, n, k = w_u8.shape[0], w_u8.shape[1], 2 * w_u8.shape[2]
    if e == 0 or n == 0 or k == 0:
        raise ValueError(f"{name}.weight: empty stack {tuple(w_u8.shape)}")
    if k % _BLOCK:
        raise ValueError(f"{name}.weight: K = {k} must be a multiple of {_BLOCK}")
    if (not isinstance(w_scale_e4m3, Tensor) or w_scale_e4m3.dtype not in (torch.uint8, torch.float8_e4m3fn)
            or tuple(w_scale_e4m3.shape) != (e, n, k // _BLOCK)):
        raise ValueError(f"{name}.weight_scale: expected E4M3 bytes [{e}, {n}, {k // _BLOCK}] (linear) for weight "
                         f"{tuple(w_u8.shape)}, got {getattr(w_scale_e4m3, 'dtype', type(w_scale_e4m3))} "
                         f"{tuple(getattr(w_scale_e4m3, 'shape', ()))}")
    if w_scale_e4m3.device != w_u8.device:
        raise ValueError(f"{name}.weight_scale: on {w_scale_e4m3.device}, weight on {w_u8.device}")
    if not isinstance(w_scale_2_f32, Tensor) or w_scale_2_f32.numel() != e or not w_scale_2_f32.is_floating_point():
        raise ValueError(f"{name}.weight_scale_2: expected {e} float32 values ([E] or [E, 1]), got "
                         f"{getattr(w_scale_2_f32, 'dtype', type(w_scale_2_f32))} "
                         f"{tuple(getattr(w_scale_2_f32, 'shape', ()))}")
    return e, n, k


_UNIT = 16  # bytes of a fragment-order unit: two checkpoint halves of each of 4 lanes, both bytes


def _check_units(packed_u8: Tensor) -> None:
    if packed_u8.dtype != torch.uint8 or packed_u8.shape[-1] % _UNIT:
        raise ValueError(f"packed_u8: expected uint8 [..., K/2] with K % 32 == 0, got {packed_u8.dtype} "
                         f"{tuple(packed_u8.shape)}")


def _units(packed_u8: Tensor) -> Tensor:
    """uint8 [..., K/2] (K % 32 == 0) -> int32 [..., K/32, 2, 4, 2]: each row's 16-byte units as (half pair, lane,
    byte); a one-line ValueError naming packed_u8 otherwise."""
    _check_units(packed_u8)
    return packed_u8.reshape(*packed_u8.shape[:-1], packed_u8.shape[-1] // _UNIT, 2, 4, 2).to(torch.int32)


def _fragment_fields(packed: Tensor) -> list[Tensor]:
    """[..., K/2] bytes -> the four fields (int32 codes [..., K/32, 2 (y), 4 (c)]) of the fragment-order halves."""
    p = _units(packed)  # (unit, ch0, c, y)
    lo, hi = p & 0xF, p >> 4
    return [f.transpose(-1, -2) for f in (lo[..., 0, :, :], lo[..., 1, :, :], hi[..., 0, :, :], hi[..., 1, :, :])]


def to_fragment_order(packed_u8: Tensor, *, out: Tensor | None = None, chunk: int = 8) -> Tensor:
    """Checkpoint packed bytes [..., K/2] (K % 32 == 0; element 2i in the low nibble) -> the same bits in the
    fragment order (module docstring), into `out` (a new tensor if None; `out` may be packed_u8 itself when it is
    contiguous: each chunk is read whole before it is written). Integer ops on the bit fields; the leading dimension
    is processed `chunk` entries at a time (a V4-Pro stack is 8.5 GB: its int32 fields would not fit at once)."""
    _check_units(packed_u8)
    if out is None:
        out = torch.empty(packed_u8.shape, dtype=torch.uint8, device=packed_u8.device)
    elif out.shape != packed_u8.shape or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous uint8 {tuple(packed_u8.shape)}, got {out.dtype} {tuple(out.shape)}")
    lead = (-1, *packed_u8.shape[-2:]) if packed_u8.dim() >= 2 else (1, -1)
    flat_in, flat_out = packed_u8.reshape(lead), out.view(lead)
    for i in range(0, flat_in.shape[0], chunk):
        fields = _fragment_fields(flat_in[i:i + chunk])
        h = torch.zeros_like(fields[0])
        for f, sign, mag in zip(fields, FRAGMENT_SIGN_BITS, FRAGMENT_MAG_SHIFTS):
            h |= ((f >> 3) << sign) | ((f & 7) << mag)
        flat_out[i:i + chunk] = torch.stack((h & 0xFF, h >> 8), dim=-1).to(torch.uint8).reshape(
            flat_in[i:i + chunk].shape)
    return out


def from_fragment_order(packed_u8: Tensor) -> Tensor:
    """The inverse of to_fragment_order: fragment-order bytes [..., K/2] -> the checkpoint's bytes."""
    p = _units(packed_u8)
    h = p[..., 0] | (p[..., 1] << 8)  # (unit, y, c)
    f = [(((h >> sign) & 1) << 3) | ((h >> mag) & 7) for sign, mag in zip(FRAGMENT_SIGN_BITS, FRAGMENT_MAG_SHIFTS)]
    byte = torch.stack((f[0] | (f[2] << 4), f[1] | (f[3] << 4)), dim=-3)  # (unit, ch0, y, c)
    return byte.transpose(-1, -2).to(torch.uint8).reshape(packed_u8.shape)


def _fragment(packed: Tensor, fragment_order: bool | None, *, owned: bool) -> tuple[Tensor, bool]:
    """fragment_order None: the fragment order wherever K % 32 == 0 (every DeepSeek-V4 stack), else the checkpoint's.
    owned: packed is this module's own new tensor (permuted in place; a caller's tensor never is)."""
    if fragment_order is None:
        fragment_order = packed.shape[-1] % _UNIT == 0
    if fragment_order and packed.shape[-1] % _UNIT:
        raise ValueError(f"fragment_order: needs K % 32 == 0, got K = {2 * packed.shape[-1]}")
    if not fragment_order:
        return packed.contiguous(), False
    return to_fragment_order(packed, out=packed if owned else None), True


def prepare_experts(w_u8: Tensor, w_scale_e4m3: Tensor, w_scale_2_f32: Tensor, *,
                    fragment_order: bool | None = None) -> Sm90GroupedWeight:
    """One expert stack's checkpoint tensors ([E, N, K/2] u8, [E, N, K/16] E4M3 linear, [E] or [E, 1]
    float32) -> the grouped GEMM's weight operand (on the device of w_u8); fragment_order: see _fragment."""
    _check_stack("experts", w_u8, w_scale_e4m3, w_scale_2_f32)
    dev = w_u8.device
    packed, frag = _fragment(w_u8, fragment_order, owned=False)
    return Sm90GroupedWeight(packed, swizzle_128x4_stack(w_scale_e4m3.to(dev)),
                             w_scale_2_f32.to(device=dev, dtype=torch.float32).reshape(-1).contiguous(),
                             fragment_order=frag)


def prepare_gate_up(w1_u8: Tensor, w1_scale_e4m3: Tensor, w1_scale_2_f32: Tensor,
                    w3_u8: Tensor, w3_scale_e4m3: Tensor, w3_scale_2_f32: Tensor, *,
                    fragment_order: bool | None = None) -> Sm90GroupedWeight:
    """The L1 stack from the checkpoint's separate w1 (gate) and w3 (up) stacks ([E, I, K/2] each):
    rows interleaved (2i gate i, 2i+1 up i), scales interleaved the same way then swizzled per expert,
    dec_scale_f32 [E, 2] = (w1 weight_scale_2, w3 weight_scale_2); fragment_order: see _fragment."""
    e, i, k = _check_stack("w1", w1_u8, w1_scale_e4m3, w1_scale_2_f32)
    e3, i3, k3 = _check_stack("w3", w3_u8, w3_scale_e4m3, w3_scale_2_f32)
    if (e3, i3, k3) != (e, i, k) or w3_u8.device != w1_u8.device:
        raise ValueError(f"w3.weight: {tuple(w3_u8.shape)} on {w3_u8.device} does not match w1.weight "
                         f"{tuple(w1_u8.shape)} on {w1_u8.device}")
    dev = w1_u8.device
    packed = torch.stack([w1_u8, w3_u8], dim=2).reshape(e, 2 * i, k // 2).contiguous()
    s1 = w1_scale_e4m3.view(torch.uint8) if w1_scale_e4m3.dtype == torch.float8_e4m3fn else w1_scale_e4m3
    s3 = w3_scale_e4m3.view(torch.uint8) if w3_scale_e4m3.dtype == torch.float8_e4m3fn else w3_scale_e4m3
    sf = torch.stack([s1.to(dev), s3.to(dev)], dim=2).reshape(e, 2 * i, k // _BLOCK)
    dec = torch.stack([w1_scale_2_f32.to(device=dev, dtype=torch.float32).reshape(-1),
                       w3_scale_2_f32.to(device=dev, dtype=torch.float32).reshape(-1)], dim=1).contiguous()
    packed, frag = _fragment(packed, fragment_order, owned=True)
    return Sm90GroupedWeight(packed, swizzle_128x4_stack(sf), dec, gate_up=True, fragment_order=frag)
