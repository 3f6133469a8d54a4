"""FP8 block-scaled linears on Hopper: the weight prepared once on the host, then one capturable
call per forward (activation quantization, kernels.sm90.quantize_fp8_1x128, then the block-scaled
GEMM, kernels.sm90.gemm_fp8_block).

The weight's block decode scales arrive as float32 [ceil(N/128), ceil(K/128)]: the caller decodes
the checkpoint's encoding (DeepSeek-V4 UE8M0 bytes, V3 weight_scale_inv, compressed-tensors bf16 or
float32, ModelOpt 4-D, per-tensor repeated into every block) exactly into float32 first; kernels/
never reads a checkpoint format itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.sm90 import gemm_fp8_block, quantize_fp8_1x128

__all__ = ["Sm90Fp8Weight", "prepare_fp8_weight", "linear_fp8"]


@dataclass(frozen=True)
class Sm90Fp8Weight:
    """e4m3_u8 [N, K] uint8 (contiguous) and block_dec_f32 [ceil(N/128), ceil(K/128)] float32, on one device."""

    e4m3_u8: Tensor
    block_dec_f32: Tensor

    @property
    def n(self) -> int:
        return self.e4m3_u8.shape[0]

    @property
    def k(self) -> int:
        return self.e4m3_u8.shape[1]


def prepare_fp8_weight(e4m3_u8: Tensor, block_dec_f32: Tensor,
                       device: torch.device | str | None = None) -> Sm90Fp8Weight:
    """Validate and place an FP8 block-scaled weight (host side, once per layer; may copy)."""
    if e4m3_u8.dtype not in (torch.uint8, torch.float8_e4m3fn) or e4m3_u8.dim() != 2:
        raise ValueError(f"e4m3_u8: expected 2-d E4M3 bytes [N, K], got {e4m3_u8.dtype} {tuple(e4m3_u8.shape)}")
    n, k = e4m3_u8.shape
    grid = (-(-n // 128), -(-k // 128))
    if block_dec_f32.dtype != torch.float32 or tuple(block_dec_f32.shape) != grid:
        raise ValueError(f"block_dec_f32: expected float32 {list(grid)} for the weight [{n}, {k}], got "
                         f"{block_dec_f32.dtype} {list(block_dec_f32.shape)}")
    dev = torch.device(device) if device is not None else e4m3_u8.device
    return Sm90Fp8Weight(e4m3_u8.view(torch.uint8).to(dev).contiguous(), block_dec_f32.to(dev).contiguous())


def linear_fp8(x: Tensor, weight: Sm90Fp8Weight, *, scale_rule: str, encode_rule: str = "divide",
               amax_nan: str = "propagate", amax_floor_f32: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] (bf16) -> (y bf16 [M, N], act codes u8 [M, K], act scales [M, ceil(K/128)]): dynamic
    per-token 1x128 quantization with the given recipe fields, then the block-scaled GEMM. No host sync.
    Where the committed config of (N, K) at M's bucket says fused_q (the sweep measured it faster), one
    launch quantizes in the GEMM's prologue: the same bytes, scales and output bits. Where it also says
    reduce="ticket" (a split config whose chunk partials each output tile's last program adds), the whole
    linear is that one launch; the ticket counters are made by the first such call (outside capture)."""
    if x.dim() == 2 and x.shape[0] > 0:
        key = gemm_fp8_block.CompileKey.for_shape(x.shape[0], weight.n, weight.k,
                                                  act_scale_ue8m0=scale_rule == "ue8m0_ceil")
        if key.fused_q:
            return gemm_fp8_block.launch_fused(x, weight.e4m3_u8, weight.block_dec_f32, scale_rule=scale_rule,
                                               encode_rule=encode_rule, amax_nan=amax_nan,
                                               amax_floor_f32=amax_floor_f32, key=key)
    codes, scale = quantize_fp8_1x128.launch(x, scale_rule=scale_rule, encode_rule=encode_rule, amax_nan=amax_nan,
                                             amax_floor_f32=amax_floor_f32)
    y = gemm_fp8_block.launch(codes, scale, weight.e4m3_u8, weight.block_dec_f32)
    return y, codes, scale
