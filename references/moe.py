"""DeepSeek MoE block reference, one function per stage, explicit tensors in and out.

Stages (DESIGN.md "Stages"): dispatch -> act_quant -> l1 (w1, w3) -> swiglu -> requant
-> l2 (w2) -> combine, plus the shared expert. NVFP4_FACTS.md section 5:

    g = w1(x), u = w3(x);  u = clamp(u, -L, L);  g = clamp(g, max=L);  h = silu(g) * u
    y = sum over the token's experts of w_k * w2(h_k)       (routing weight AFTER w2: kernels)
      = sum over the token's experts of w2(w_k * h_k)       (BEFORE w2: DeepSeek's reference)

The two placements agree exactly in real arithmetic; with NVFP4 they differ by the
requantization (and bf16 rounding) of w_k * h_k versus h_k. `weight_placement` makes the
choice explicit.

Token-expert pairs are laid out "grouped": rows sorted by expert (stable, so within an
expert by token then slot), offsets_i64 [E+1] delimiting each expert's rows. Experts
with zero rows are legal and contribute nothing.

Emulated dtypes (what a fused production kernel holds): l1 outputs float32 (the exact
result rounded once: the SwiGLU epilogue reads the fp32 accumulator), swiglu and l2
output bf16, combine accumulates exactly and rounds once to bf16. High-precision mode
keeps float64 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from references.codecs import round_f64_to
from references.linear import (
    ACT_SCALE_MODES,
    act_global_dec_f32,
    Nvfp4Weight,
    Weight,
    decode_weight_f64,
    dequantize_weight_f64,
    linear,
    quantize_act_nvfp4,
)
from references.nvfp4 import decode_nvfp4_block_scaled
from references.recipes import Recipe

__all__ = [
    "PLACEMENTS",
    "Dispatch",
    "ExpertStack",
    "ActQuant",
    "dispatch",
    "act_quant",
    "l1",
    "swiglu",
    "requant",
    "l2",
    "combine",
    "shared_expert",
    "max_input_dec_scale_f32",
]

PLACEMENTS = ("after_w2", "before_w2")


@dataclass(frozen=True)
class Dispatch:
    """Grouped layout of the T*k token-expert pairs.

    token_of_row_i64 [R]; slot_of_row_i64 [R]; expert_of_row_i64 [R]; offsets_i64 [E+1];
    row_of_pair_i64 [T, k] (where pair (t, slot) lives). R = T * k.
    """

    token_of_row_i64: Tensor
    slot_of_row_i64: Tensor
    expert_of_row_i64: Tensor
    offsets_i64: Tensor
    row_of_pair_i64: Tensor

    @property
    def num_experts(self) -> int:
        return self.offsets_i64.numel() - 1


@dataclass(frozen=True)
class ExpertStack:
    """The routed experts: w1, w3 [E, I, H]; w2 [E, H, I] (stacks of one weight type)."""

    w1: Weight
    w3: Weight
    w2: Weight

    @property
    def num_experts(self) -> int:
        return _stack_size(self.w1)


def _stack_size(w: Weight) -> int:
    t = w.packed_u8 if isinstance(w, Nvfp4Weight) else getattr(w, "e4m3_u8", getattr(w, "w", None))
    return t.shape[0]


def dispatch(ids_i64: Tensor, num_experts: int) -> Dispatch:
    """[T, k] expert ids -> grouped rows (stable sort by expert)."""
    t, k = ids_i64.shape
    if ids_i64.numel() and (int(ids_i64.min()) < 0 or int(ids_i64.max()) >= num_experts):
        raise ValueError(f"ids_i64: expert ids must be in [0, {num_experts})")
    flat = ids_i64.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_i64.device)
    offsets[1:] = torch.cumsum(counts, 0)
    row_of_pair = torch.empty_like(flat)
    row_of_pair[order] = torch.arange(flat.numel(), device=flat.device)
    return Dispatch(order // k, order % k, flat[order], offsets, row_of_pair.view(t, k))


@dataclass(frozen=True)
class ActQuant:
    """NVFP4 activations of the grouped rows.

    packed_u8 [R, K/2]; sf_u8 [R, K/16] (linear); global_dec_f32 [E] (the decode multiplier
    each expert's GEMM uses: static, the input_scale itself; dynamic, D or 1/S for enc recipes).
    value(): the dequantized rows, float64.
    """

    packed_u8: Tensor
    sf_u8: Tensor
    global_dec_f32: Tensor
    offsets_i64: Tensor

    def decoded_f64(self) -> Tensor:
        """e2m1 * block scale, without the global scale (exact)."""
        return decode_nvfp4_block_scaled(self.packed_u8, self.sf_u8, dtype=torch.float64)

    def value(self) -> Tensor:
        counts = self.offsets_i64[1:] - self.offsets_i64[:-1]
        g = torch.repeat_interleave(self.global_dec_f32.double(), counts, output_size=self.packed_u8.shape[0])
        return self.decoded_f64() * g[:, None]


def max_input_dec_scale_f32(ws: list[Weight], name: str) -> Tensor:
    """The static activation decode scale of linears sharing one quantization of their input (a fused
    GEMM: w1|w3, wq_a|wkv): the elementwise max of their input_scales ([E] for stacks), as vLLM does."""
    scales = [w.input_scale_f32 if isinstance(w, Nvfp4Weight) else None for w in ws]
    if any(s is None for s in scales):
        raise ValueError(f"act_scale='static' needs {name}.input_scale, which the checkpoint lacks")
    return torch.stack(scales).amax(0).to(torch.float32)


def act_quant(rows: Tensor, offsets_i64: Tensor, *, recipe: Recipe, act_scale: str,
              input_scale_f32: Tensor | None = None) -> ActQuant:
    """Quantize grouped activation rows [R, K] (bf16) to NVFP4.

    dynamic: one global scale from amax over all rows (on the device, no input_scale).
    static: per expert, its input_scale_f32[e] (a decode scale amax/2688; the harness
    passes max(w1, w3) for l1, as vLLM does), each expert's rows quantized with it.
    """
    if act_scale not in ACT_SCALE_MODES:
        raise ValueError(f"act_scale={act_scale!r}: expected one of {ACT_SCALE_MODES}")
    e_n = offsets_i64.numel() - 1
    if act_scale == "dynamic":
        q = quantize_act_nvfp4(rows, recipe=recipe, input_scale_f32=None)
        g = q.global_dec_scale().to(torch.float32).reshape(1).expand(e_n).contiguous()
        return ActQuant(q.packed_u8, q.sf_u8, g, offsets_i64)
    if input_scale_f32 is None or input_scale_f32.shape != (e_n,):
        raise ValueError(f"input_scale_f32: static act_scale needs one decode scale per expert [{e_n}], "
                         f"got {None if input_scale_f32 is None else tuple(input_scale_f32.shape)}")
    packed = torch.empty(rows.shape[0], rows.shape[1] // 2, dtype=torch.uint8, device=rows.device)
    sf = torch.empty(rows.shape[0], rows.shape[1] // 16, dtype=torch.uint8, device=rows.device)
    g = torch.empty(e_n, dtype=torch.float32, device=rows.device)
    bounds = offsets_i64.tolist()
    for e in range(e_n):
        q = quantize_act_nvfp4(rows[bounds[e]:bounds[e + 1]], recipe=recipe, input_scale_f32=input_scale_f32[e])
        packed[bounds[e]:bounds[e + 1]], sf[bounds[e]:bounds[e + 1]] = q.packed_u8, q.sf_u8
        g[e] = act_global_dec_f32(q, input_scale_f32[e])
    return ActQuant(packed, sf, g, offsets_i64)


def _grouped_gemm(a_f64_rows: Tensor, offsets_i64: Tensor, w: Weight, *, alpha_f32: Tensor | None,
                  dequantize: bool) -> Tensor:
    """Per expert e: rows[e] @ W_e^T (float64), times alpha_f32[e] if given."""
    e_n = offsets_i64.numel() - 1
    out = torch.zeros(a_f64_rows.shape[0], w.n, dtype=torch.float64, device=a_f64_rows.device)
    bounds = offsets_i64.tolist()
    for e in range(e_n):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue  # zero-token expert: never decoded, contributes nothing
        we = w.expert(e)
        b = dequantize_weight_f64(we) if dequantize else decode_weight_f64(we)
        y = a_f64_rows[lo:hi] @ b.T
        out[lo:hi] = y if alpha_f32 is None else y * alpha_f32[e].double()
    return out


def _alpha(a_dec_f32: Tensor, w: Weight) -> Tensor:
    if not isinstance(w, Nvfp4Weight):
        raise TypeError(f"routed experts must be NVFP4 for the grouped stages, got {type(w).__name__}")
    return a_dec_f32.to(torch.float32) * w.global_dec_f32.to(torch.float32)  # float32 product, as kernels form it


def l1(a: ActQuant | Tensor, offsets_i64: Tensor, experts: ExpertStack, *, mode: str) -> tuple[Tensor, Tensor]:
    """gate = w1(x), up = w3(x) per expert on the grouped rows -> ([R, I], [R, I]).

    emulated: `a` is the ActQuant; each half has its own alpha = a_dec[e] * weight_scale_2[e]
    (float32); results float32 (exact dot, one rounding). high: `a` is the unquantized rows
    and the weights are dequantized; float64.
    """
    if mode == "high":
        x = a.double()
        return (_grouped_gemm(x, offsets_i64, experts.w1, alpha_f32=None, dequantize=True),
                _grouped_gemm(x, offsets_i64, experts.w3, alpha_f32=None, dequantize=True))
    x = a.decoded_f64()
    gate = _grouped_gemm(x, offsets_i64, experts.w1, alpha_f32=_alpha(a.global_dec_f32, experts.w1), dequantize=False)
    up = _grouped_gemm(x, offsets_i64, experts.w3, alpha_f32=_alpha(a.global_dec_f32, experts.w3), dequantize=False)
    return gate.float(), up.float()


def swiglu(gate: Tensor, up: Tensor, *, limit: float | None, row_weight_f32: Tensor | None, mode: str) -> Tensor:
    """h = silu(min(gate, L)) * clamp(up, -L, L) [* row_weight], exact in float64.

    row_weight_f32 [R]: the routing weight of each row for the before-w2 placement, else None.
    emulated: rounded once to bf16 (the kernel's h); high: float64. limit None/0: no clamp.
    """
    g, u = gate.double(), up.double()
    if limit:
        u = torch.clamp(u, -limit, limit)
        g = torch.clamp(g, max=limit)
    h = g * torch.sigmoid(g) * u
    if row_weight_f32 is not None:
        h = h * row_weight_f32.double()[:, None]
    return h if mode == "high" else round_f64_to(h, torch.bfloat16)


def requant(h_bf16: Tensor, offsets_i64: Tensor, *, recipe: Recipe, act_scale: str,
            input_scale_f32: Tensor | None = None) -> ActQuant:
    """Quantize h for w2: the same rules as act_quant (static: w2's input_scale per expert)."""
    return act_quant(h_bf16, offsets_i64, recipe=recipe, act_scale=act_scale, input_scale_f32=input_scale_f32)


def l2(a: ActQuant | Tensor, offsets_i64: Tensor, experts: ExpertStack, *, mode: str) -> Tensor:
    """y_rows = w2(h) per expert -> [R, H]; emulated bf16 (one rounding), high float64."""
    if mode == "high":
        return _grouped_gemm(a.double(), offsets_i64, experts.w2, alpha_f32=None, dequantize=True)
    y = _grouped_gemm(a.decoded_f64(), offsets_i64, experts.w2, alpha_f32=_alpha(a.global_dec_f32, experts.w2),
                      dequantize=False)
    return round_f64_to(y, torch.bfloat16)


def combine(y_rows: Tensor, d: Dispatch, weights_f32: Tensor | None, *, mode: str) -> Tensor:
    """out[t] = sum over slots of weights[t, slot] * y_rows[row_of_pair[t, slot]] (weights None:
    already applied before w2). Exact in float64; emulated rounds once to bf16."""
    y = y_rows.double()[d.row_of_pair_i64]  # [T, k, H]
    if weights_f32 is not None:
        y = y * weights_f32.double()[..., None]
    out = y.sum(1)
    return out if mode == "high" else round_f64_to(out, torch.bfloat16)


def shared_expert(x: Tensor, w1: Weight, w3: Weight, w2: Weight, *, mode: str, recipe: Recipe,
                  act_scale: str, swiglu_limit: float | None, fp8_scale_fmt: str = "ue8m0") -> dict[str, Tensor]:
    """The shared expert (NVFP4, FP8 block-128 or BF16 weights), stage by stage, on x [T, H].

    l1 quantizes x once for both halves (static NVFP4: max of the w1/w3 input_scales, as a
    fused w1|w3 GEMM needs one); l1 outputs float32 (emulated), h bf16, l2 bf16.
    Returns {"l1.gate", "l1.up", "swiglu", "l2"} (parts of the gated-MLP stages, relative to their
    prefix) and, emulated, the quantized activations under "l1.act_quant.*" and "l2.act_quant.*".
    """
    scale = None
    if isinstance(w1, Nvfp4Weight) and act_scale == "static":
        scale = max_input_dec_scale_f32([w1, w3], "shared_experts.w1/w3")
    kw = dict(mode=mode, recipe=recipe, act_scale=act_scale, fp8_scale_fmt=fp8_scale_fmt)
    gate, qa = linear(x, w1, input_scale_f32=scale, out_dtype=torch.float32, **kw)
    up, _ = linear(x, w3, input_scale_f32=scale, out_dtype=torch.float32, **kw)
    h = swiglu(gate, up, limit=swiglu_limit, row_weight_f32=None, mode=mode)
    y, qh = linear(h, w2, **kw)
    out = {"l1.gate": gate, "l1.up": up, "swiglu": h, "l2": y}
    out.update({f"l1.act_quant.{k}": v for k, v in qa.items()})
    out.update({f"l2.act_quant.{k}": v for k, v in qh.items()})
    return out
