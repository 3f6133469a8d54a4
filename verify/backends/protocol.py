"""The backend protocol: the boundary types every backend speaks, and `BackendProtocol`, the
typing Protocol of a backend (verify.backends.base.Backend is the base class that implements it
with every op "not served"; the registry, verify.backends.registry, finds backends by name).

A backend serves the ops of the stage table (references.stages.Op). Its own host code turns
checkpoint bytes into its operands (`prepare_*`, once per layer, outside any graph); the
harness never prepares a kernel's operands with references/ code, so a wrong prepare shows up
as a failed verdict of the stage that uses it (DESIGN "Backend protocol").

Boundary tensors have one representation in every backend, so verdicts can read them:
- `QuantizedAct`: packed E2M1 [R, K/2] (low nibble first) + E4M3 block scales in the 128x4
  swizzled layout ([Rp, Cp]; grouped: each expert's rows padded to 128 with zero bytes, then
  swizzled; a backend whose buffers are sized for capacity may append rows, which must be zero) +
  the float32 decode multiplier of each global scale (`global_dec_f32`, [1] dense,
  [E] grouped) that the GEMM folds into its alpha;
- `Fp8QuantizedAct`: FP8 activations of an FP8 block-128 linear: E4M3 bytes [M, K] + one decode
  scale per token and 128 consecutive K ([M, ceil(K/128)], the last group may be shorter) in its
  storage form, which the scale rule decides: "ue8m0_ceil" (amax/448 rounded UP to a power of two,
  stored as UE8M0 bytes, value 2^(b-127)) or "f32" (amax/448 as float32) (NVFP4_FACTS 5b;
  references/fp8_act.py is the recipe);
- `Dispatched`: expert-sorted rows (stable: within an expert, token-major order) with int32
  offsets [E+1];
- outputs: bf16 (L1 halves float32 or bf16, as the backend computes them).

One argument name means one scale direction everywhere: `input_dec_scale_f32` is a checkpoint
`input_scale` (amax/2688, a decode scale: static activation scaling); None means dynamic (the
backend computes amax and S = 2688/amax on the device).

`emulator` (references/, any device) serves every op; `sm90` and `sm100` serve what they have
and say why not for the rest (`unsupported_reason(op, device)`); an outside backend subclasses
verify.backends.Backend and overrides what it has.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from references.layer import MoeSpec
from references.recipes import MODELOPT, TE, TORCHAO, VLLM, Recipe  # the recipes a backend declares
from references.stages import Op
from verify.checkpoint import GatedMlp, Linear, Router

__all__ = ["Op", "MoeSpec", "Recipe", "TE", "VLLM", "MODELOPT", "TORCHAO", "NumericsMode", "WEIGHT_FORMATS", "QuantizedAct", "Fp8QuantizedAct", "FP8_SCALE_RULES", "Dispatched", "RoutingOut", "BackendProtocol",
           "FORWARD_OPS"]

FORWARD_OPS = tuple(op for op in Op if op not in (Op.PREPARE, Op.REFERENCE))

# The checkpoint weight formats a GEMM op can meet (verify.checkpoint: NVFP4 Linear / GatedMlp stacks,
# FP8 block-128 linears, MXFP4 E8M0-block-32 experts).
WEIGHT_FORMATS = ("nvfp4", "fp8_block", "mxfp4")


class NumericsMode(str, enum.Enum):
    """What a backend's GEMM op computes (its declared numerics mode; the `mode` check compares it with
    the emulator mode its output actually matches)."""

    W4A4 = "w4a4"            # NVFP4 weights x NVFP4 activations (the backend's activation recipe)
    W4A16 = "w4a16"          # NVFP4 (or MXFP4) weights dequantized x bf16/fp16 activations
    W4A8 = "w4a8"            # 4-bit weights x FP8 E4M3 activations
    FP8_BLOCK = "fp8_block"  # FP8 E4M3 weights (block-128 scales) x FP8 1x128 activations
    BF16 = "bf16"            # bf16 x bf16 (weights dequantized to bf16 first)


@dataclass(frozen=True)
class QuantizedAct:
    """NVFP4 activations at a stage boundary (see the module docstring)."""

    packed_u8: Tensor
    sf_swizzled_u8: Tensor
    global_dec_f32: Tensor

    @property
    def k(self) -> int:
        return 2 * self.packed_u8.shape[-1]


FP8_SCALE_RULES = ("ue8m0_ceil", "f32")  # Fp8QuantizedAct.scale_rule: its scales as UE8M0 bytes / float32


@dataclass(frozen=True)
class Fp8QuantizedAct:
    """FP8 E4M3 activations at a stage boundary: e4m3_u8 uint8 [M, K]; block_dec_scale [M, ceil(K/128)],
    uint8 UE8M0 bytes under scale_rule "ue8m0_ceil", float32 under "f32" (see the module docstring)."""

    e4m3_u8: Tensor
    block_dec_scale: Tensor
    scale_rule: str

    @property
    def scale_dtype(self) -> torch.dtype:
        """The storage dtype the scale rule implies: uint8 (UE8M0 bytes) or float32."""
        return torch.uint8 if self.scale_rule == "ue8m0_ceil" else torch.float32


@dataclass(frozen=True)
class Dispatched:
    """row_token_i64 [R] (token of each expert-sorted row), row_slot_i64 [R] (its top-k slot),
    offsets_i32 [E+1]. R = T * top_k. top_k: the routing's k as a host int (known from the ids' shape, so
    a combine without routing weights needs no device read to size its output); None = not given."""

    row_token_i64: Tensor
    row_slot_i64: Tensor
    offsets_i32: Tensor
    top_k: int | None = None


@dataclass(frozen=True)
class RoutingOut:
    """ids_i64 [T, k] expert ids; weights_f32 [T, k] routing weights (renormalised x scaling)."""

    ids_i64: Tensor
    weights_f32: Tensor


@runtime_checkable
class BackendProtocol(Protocol):
    """What the harness calls on a backend (verify.backends.base.Backend documents each op; its
    subclasses and any object with these members qualify). Ops it cannot run raise
    NotImplementedError with the same sentence unsupported_reason returns."""

    name: str
    recipe: Recipe
    u_acc: float  # unit roundoff of the GEMM accumulator (the bound's u_acc)

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None: ...

    # ---- prepare (host, once per layer)
    def prepare_linear(self, lin: Linear) -> object: ...
    def prepare_experts(self, experts: GatedMlp) -> object: ...
    def prepare_router(self, router: Router, spec: MoeSpec) -> object: ...

    # ---- forward ops (graph-capturable in production backends)
    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct: ...
    def grouped_quantize(self, rows_bf16: Tensor, offsets_i32: Tensor, *,
                         input_dec_scale_f32: Tensor | None = None) -> QuantizedAct: ...
    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct: ...
    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor: ...
    def grouped_gemm(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *,
                     layer: str) -> Tensor | tuple[Tensor, Tensor]: ...
    def swiglu_requant(self, gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
                       row_weight_f32: Tensor | None = None,
                       input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, QuantizedAct]: ...
    def l1_fused(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *, swiglu_limit: float | None,
                 input_dec_scale_f32: Tensor | None = None) -> QuantizedAct: ...
    def router(self, x_bf16: Tensor, router: object, *, token_ids_i64: Tensor | None = None) -> RoutingOut: ...
    def dispatch(self, ids_i64: Tensor, num_experts: int) -> Dispatched: ...
    def combine(self, y_rows_bf16: Tensor, d: Dispatched, weights_f32: Tensor | None) -> Tensor: ...
    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor: ...
    def grouped_dense_linear(self, x_bf16: Tensor, w: object, *, groups: int,
                             input_dec_scale_f32: Tensor | None = None) -> Tensor: ...
    def grouped_linear_mxfp4(self, rows_bf16: Tensor, offsets_i32: Tensor, experts: object, *,
                             layer: str) -> Tensor | tuple[Tensor, Tensor]: ...
    def moe_block(self, x_bf16: Tensor, router: object, experts: object, *, swiglu_limit: float | None,
                  weight_placement: str, act_scale: str, token_ids_i64: Tensor | None = None,
                  num_valid_tokens_i32: Tensor | None = None) -> Tensor:
        """The routed MoE block. num_valid_tokens_i32 (int32 [1] on the device, backends with
        `supports_valid_tokens`): tokens t >= n reach no expert and their rows are zero, so a graph
        captured at capacity replays any smaller token count."""
        ...
