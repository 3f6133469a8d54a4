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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90.host_prepare import swizzle_128x4

__all__ = ["Sm90GroupedWeight", "prepare_experts", "prepare_gate_up", "swizzle_128x4_stack"]

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
    gate, up); gate_up: rows interleaved gate/up (N = 2I, row 2i gate i, row 2i+1 up i)."""

    packed_u8: Tensor
    sf_swizzled_u8: Tensor
    dec_scale_f32: Tensor
    gate_up: bool = False

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


def prepare_experts(w_u8: Tensor, w_scale_e4m3: Tensor, w_scale_2_f32: Tensor) -> Sm90GroupedWeight:
    """One expert stack's checkpoint tensors ([E, N, K/2] u8, [E, N, K/16] E4M3 linear, [E] or [E, 1]
    float32) -> the grouped GEMM's weight operand (on the device of w_u8)."""
    _check_stack("experts", w_u8, w_scale_e4m3, w_scale_2_f32)
    dev = w_u8.device
    return Sm90GroupedWeight(w_u8.contiguous(), swizzle_128x4_stack(w_scale_e4m3.to(dev)),
                             w_scale_2_f32.to(device=dev, dtype=torch.float32).reshape(-1).contiguous())


def prepare_gate_up(w1_u8: Tensor, w1_scale_e4m3: Tensor, w1_scale_2_f32: Tensor,
                    w3_u8: Tensor, w3_scale_e4m3: Tensor, w3_scale_2_f32: Tensor) -> Sm90GroupedWeight:
    """The L1 stack from the checkpoint's separate w1 (gate) and w3 (up) stacks ([E, I, K/2] each):
    rows interleaved (2i gate i, 2i+1 up i), scales interleaved the same way then swizzled per expert,
    dec_scale_f32 [E, 2] = (w1 weight_scale_2, w3 weight_scale_2)."""
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
    return Sm90GroupedWeight(packed, swizzle_128x4_stack(sf), dec, gate_up=True)
