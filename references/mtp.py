"""The DeepSeek-V4 MTP block's verified stages, in the two reference modes (references.linear's "emulated" /
"high").

The block (DeepSeek-V4's `mtp.{j}.*`): e = enorm(embed(token t+1)), h = hnorm(hidden of token t),
x = e_proj(e) + h_proj(h), then a decoder block (attention, MoE) whose routed experts are MXFP4.
Stages here (references.stages, rows `mtp.*`):
- mtp.e_proj, mtp.h_proj: FP8 block-128 dense linears (E4M3 weight, E8M0 128x128 `.scale`), activations
  DeepSeek's act_quant (FP8 1x128), as every FP8 linear of V4 (references.linear.linear);
- mtp.x_ffn: rms_norm(e_proj + h_proj) with the block's ffn_norm (ones when not stored): the experts'
  input. The MTP attention is not emulated (as in decoder layers, whose MoE input is ffn_norm of the
  embedding), so the experts see the normalized projection sum;
- mtp.experts.l1 (gate, up), mtp.experts.swiglu, mtp.experts.l2: the MXFP4 routed experts, W4A8: rows
  quantized to FP8 E4M3 per token in 1x128 groups with power-of-two scales rounded up
  (references.fp8_act.FP8_ACT_UE8M0), the way DeepSeek's V4 FP8 path quantizes every activation (the
  MTP experts have no NVFP4 input_scale, and NVFP4_FACTS 5b gives the 1x128 E4M3 rule for V4's
  non-NVFP4 linears); weights references.mxfp4 (E2M1 x 2^(E8M0 - 127) per 32 along K). Routing is
  held out of these rows: every token goes through every stored expert (expert-major rows, offsets
  e * T), so a row's expert is known without a router and an expert-stride bug fails the bound.
  l1 halves and l2 are bf16 (one rounding of the exact-product float64 sum); swiglu is clamped at
  swiglu_limit and rounded once to bf16, as the routed experts' (references.moe.swiglu).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references import moe
from references.codecs import round_f64_to
from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.linear import Weight, linear, rms_norm
from references.mxfp4 import Mxfp4Weight
from references.recipes import Recipe
from references.stages import (INPUT_MTP_E, INPUT_MTP_H, MTP_E_PROJ, MTP_EXPERTS_L1, MTP_EXPERTS_L2,
                               MTP_EXPERTS_SWIGLU, MTP_H_PROJ, MTP_X_FFN)

__all__ = ["Mxfp4ExpertStack", "expert_major_rows", "mxfp4_grouped_linear", "mtp_stages"]


@dataclass(frozen=True)
class Mxfp4ExpertStack:
    """The MTP block's routed experts: w1, w3 [E, I, H]; w2 [E, H, I] MXFP4 stacks."""

    w1: Mxfp4Weight
    w3: Mxfp4Weight
    w2: Mxfp4Weight

    @property
    def num_experts(self) -> int:
        return self.w1.num_experts


def expert_major_rows(x: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """x [T, H] -> (rows [E*T, H]: every token through every expert, expert-major; offsets int64 [E+1] = e*T)."""
    t = x.shape[0]
    return x.repeat(num_experts, 1), torch.arange(num_experts + 1, dtype=torch.int64, device=x.device) * t


def _offsets_list(offsets_i64: Tensor, rows: int, num_experts: int) -> list[int]:
    off = [int(v) for v in offsets_i64.tolist()]
    if len(off) != num_experts + 1 or off[0] != 0 or off[-1] != rows or any(a > b for a, b in zip(off, off[1:])):
        raise ValueError(f"offsets {off}: expected {num_experts + 1} non-decreasing values from 0 to {rows}")
    return off


def mxfp4_grouped_linear(rows: Tensor, offsets_i64: Tensor, w: Mxfp4Weight, *, mode: str) -> Tensor:
    """Per expert e: rows[off[e]:off[e+1]] @ W_e^T. emulated: rows quantized FP8 1x128 (FP8_ACT_UE8M0), exact
    products summed in float64, rounded once to bf16; high: float64 rows x the decoded weight, float64."""
    if rows.shape[-1] != w.k:
        raise ValueError(f"rows {tuple(rows.shape)}: last dim must be the weight's K={w.k}")
    off = _offsets_list(offsets_i64, rows.shape[0], w.num_experts)
    a = rows.double() if mode == "high" else quantize_act_fp8_1x128(rows, recipe=FP8_ACT_UE8M0).decode_f64()
    out = torch.zeros(rows.shape[0], w.n, dtype=torch.float64, device=rows.device)
    for e in range(w.num_experts):
        lo, hi = off[e], off[e + 1]
        if lo < hi:
            out[lo:hi] = a[lo:hi] @ w.expert(e).decode_f64().T
    return out if mode == "high" else round_f64_to(out, torch.bfloat16)


def mtp_stages(x_e: Tensor, x_h: Tensor, e_proj: Weight, h_proj: Weight, ffn_norm: Tensor | None,
               experts: Mxfp4ExpertStack | None, *, mode: str, recipe: Recipe, swiglu_limit: float | None,
               eps: float, fp8_scale_fmt: str = "ue8m0") -> dict[str, Tensor]:
    """Every MTP stage tensor (module docstring) of the inputs x_e = enorm(embedding), x_h = hnorm(hidden),
    both bf16 [T, H]. Also the inputs themselves (INPUT_MTP_E / INPUT_MTP_H) and, emulated, the FP8
    activations of each projection (Stage.act_quant)."""
    kw = dict(mode=mode, recipe=recipe, fp8_scale_fmt=fp8_scale_fmt)
    ye, acts_e = linear(x_e, e_proj, **kw)
    yh, acts_h = linear(x_h, h_proj, **kw)
    out: dict[str, Tensor] = {INPUT_MTP_E: x_e, INPUT_MTP_H: x_h, MTP_E_PROJ.name: ye, MTP_H_PROJ.name: yh}
    out.update({MTP_E_PROJ.act_quant(k): v for k, v in acts_e.items()})
    out.update({MTP_H_PROJ.act_quant(k): v for k, v in acts_h.items()})
    s = ye.double() + yh.double()
    norm_w = torch.ones(s.shape[-1], dtype=torch.bfloat16, device=s.device) if ffn_norm is None else ffn_norm
    x = rms_norm(s, norm_w, eps=eps, mode=mode)
    out[MTP_X_FFN.name] = x
    if experts is None:
        return out
    rows, off = expert_major_rows(x if mode == "high" else x.to(torch.bfloat16), experts.num_experts)
    gate = mxfp4_grouped_linear(rows, off, experts.w1, mode=mode)
    up = mxfp4_grouped_linear(rows, off, experts.w3, mode=mode)
    h = moe.swiglu(gate, up, limit=swiglu_limit, row_weight_f32=None, mode=mode)
    y = mxfp4_grouped_linear(h, off, experts.w2, mode=mode)
    out.update({MTP_EXPERTS_L1.tensor("gate"): gate, MTP_EXPERTS_L1.tensor("up"): up, MTP_EXPERTS_SWIGLU.name: h,
                MTP_EXPERTS_L2.name: y})
    return out
