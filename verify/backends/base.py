"""The `Backend` base class: every op "not served" until a subclass overrides it.

A backend (ours or anyone's) subclasses `Backend` and overrides only the ops it has; the others
raise NotImplementedError("not served: <backend> has no <op>") and `unsupported_reason(op, device)`
answers the same sentence for them, so the harness reports them as "not served" verdicts instead
of failing. A subclass refines `unsupported_reason` with its device reasons (no CUDA device, wrong
compute capability, a package missing) and calls `super().unsupported_reason(op, device)` first.

Which methods serve which op (OP_METHODS): each forward op of references.stages.Op is the method of
the same name; Op.PREPARE is served when any of prepare_linear / prepare_experts / prepare_router is
overridden (a backend that has dense GEMMs only needs prepare_linear); Op.REFERENCE never has a
backend op (norms and residual sums are the reference layer's).

What a backend declares (shown by `python -m verify backends`):
- name: how reports and verdicts name it;
- recipe: the activation quantizer's references.recipes.Recipe (its bytes are compared with the
  emulator's of the same recipe);
- u_acc: the unit roundoff of its GEMM accumulator (the bound's u_acc; 2^-24 for fp32). It is
  measured too (verify.accumulator), and a declaration looser than the measurement is refused;
- accumulator: that accumulator in words, e.g. "fp32 (fp16 wgmma, fp32 accumulate)";
- fp8_u_acc, fp8_promotion_interval: the accumulator of its FP8 block-scaled GEMMs, which need not
  be the NVFP4 one (Hopper's FP8 tensor cores keep about 14 bits inside a K block, NVFP4_FACTS 5b):
  products are summed with unit roundoff fp8_u_acc over `fp8_promotion_interval` consecutive k, then
  promoted to a float32 accumulator (e.g. 2^-13 and 128: DeepGEMM's promotion every scale group).
  Defaults: fp8_u_acc None = u_acc; fp8_promotion_interval None = one chunk: all of K summed in that
  accumulator, no float32 promotion (declared_fp8_accumulator reads both, for any backend);
- graph_safe: its forward ops are CUDA-graph capturable (no host sync, no CPU->GPU copy), so the
  sync and graph probes run on it (True by default: only a reference that syncs by design, like the
  emulator, declares False, and its probes are then skipped with that reason);
- supports_valid_tokens: moe_block takes num_valid_tokens_i32 (int32 [1] on the device);
- modes: the numerics mode of its GEMM ops (protocol.NumericsMode) per weight format, optionally per
  op: keys (op, weight_format) or weight_format; numerics_mode(op, weight_format) reads it, defaulting to
  W4A4 for NVFP4 weights, FP8_BLOCK for FP8 block-128 weights, W4A4 for MXFP4;
- version: a version string of its own, or None (the registry then reports the version of the
  distribution that provides it);
- dequantize_prepared (optional method, not an op): its prepared weights decoded back, for the prepare
  check; not overridden = that check is "not served";
- not_served: op -> the sentence saying why this backend leaves the op out (instead of the generic
  "not served: <name> has no <op>");
- launch_recorder(): provenance (verify.provenance): a context manager recording the kernels it launches
  inside it, each with the architecture it was built for; None by default (provenance "unknown").

The method signatures here are the protocol (verify.backends.protocol.BackendProtocol repeats them
as a typing Protocol; a test compares every registered backend's signatures with these).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from references.layer import MoeSpec
from references.recipes import TE, Recipe
from references.stages import Op
from verify.backends.protocol import (WEIGHT_FORMATS, Dispatched, Fp8QuantizedAct, NumericsMode, QuantizedAct,
                                      RoutingOut)
from verify.checkpoint import GatedMlp, Linear, Router

__all__ = ["Backend", "OP_METHODS", "OPS_OF_METHOD", "declared_fp8_accumulator"]

# The protocol's op -> the Backend methods that serve it (any one overridden serves the op).
OP_METHODS: dict[Op, tuple[str, ...]] = {
    Op.PREPARE: ("prepare_linear", "prepare_experts", "prepare_router"),
    **{op: (op.value,) for op in Op if op not in (Op.PREPARE, Op.REFERENCE)},
    Op.REFERENCE: (),
}
# Each method -> its op (prepare_linear -> Op.PREPARE, quantize -> Op.QUANTIZE, ...).
OPS_OF_METHOD: dict[str, Op] = {m: op for op, methods in OP_METHODS.items() for m in methods}


def declared_fp8_accumulator(backend: object) -> tuple[float, int | None]:
    """(unit roundoff, promotion interval or None) of a backend's FP8 GEMMs: its fp8_u_acc (None or
    absent: its u_acc) and fp8_promotion_interval (None or absent: one chunk). Read with getattr, so a
    backend that only satisfies BackendProtocol gets the defaults."""
    u = getattr(backend, "fp8_u_acc", None)
    interval = getattr(backend, "fp8_promotion_interval", None)
    u = float(backend.u_acc if u is None else u)
    if not 0 < u < 1:
        raise ValueError(f"{getattr(backend, 'name', type(backend).__name__)}: fp8_u_acc={u!r} must be in (0, 1)")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise ValueError(f"{getattr(backend, 'name', type(backend).__name__)}: fp8_promotion_interval={interval!r} "
                         "must be a positive int or None")
    return u, interval


_DEFAULT_MODES = {"nvfp4": NumericsMode.W4A4, "fp8_block": NumericsMode.FP8_BLOCK, "mxfp4": NumericsMode.W4A4}


class Backend:
    """The base class of every backend; see the module docstring."""

    name: str = "unnamed"
    recipe: Recipe = TE
    u_acc: float = 2.0**-24
    accumulator: str = "undeclared"
    fp8_u_acc: float | None = None            # None: u_acc (module docstring)
    fp8_promotion_interval: int | None = None  # None: one chunk, all of K, no float32 promotion
    graph_safe: bool = True
    supports_valid_tokens: bool = False
    version: str | None = None
    # (op, weight_format) or weight_format -> NumericsMode; unlisted: _DEFAULT_MODES
    modes: Mapping[object, NumericsMode] = MappingProxyType({})
    not_served: Mapping[Op, str] = MappingProxyType({})  # op -> why not, for ops a subclass leaves out

    # ---------------------------------------------------------------- what it serves

    def numerics_mode(self, op: Op, weight_format: str) -> NumericsMode:
        """The declared numerics mode of `op` on weights of `weight_format` (protocol.WEIGHT_FORMATS):
        modes[(op, weight_format)], else modes[weight_format], else the default of the format."""
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format={weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
        mode = self.modes.get((op, weight_format)) or self.modes.get(weight_format) or _DEFAULT_MODES[weight_format]
        return NumericsMode(mode)

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        """None when this backend has `op`, else why not (not_served_reason). Subclasses call this
        first, then add their device reasons (no CUDA device, wrong compute capability, ...)."""
        return None if self.serves(op) else self.not_served_reason(op)

    def serves(self, op: Op) -> bool:
        """Whether this backend has `op`: a subclass overrides (one of) its method(s) (OP_METHODS) and
        does not list it in not_served."""
        return op not in self.not_served and any(
            getattr(type(self), m) is not getattr(Backend, m) for m in OP_METHODS[op])

    def not_served_reason(self, op: Op) -> str:
        """The subclass's own sentence (not_served[op]) or "not served: <name> has no <op>"."""
        return self.not_served.get(op) or f"not served: {self.name} has no {op.value}"

    def launch_recorder(self):
        """Provenance (verify.provenance): a context manager yielding a list to which every kernel this backend
        launches inside the block is appended as a verify.provenance.KernelBuild (name, build arch, how), or
        None: this backend does not say (its stages' provenance reads "unknown")."""
        return None

    def _refuse(self, method: str):
        """The NotImplementedError of a method nobody overrode: the op's not_served_reason."""
        raise NotImplementedError(self.not_served_reason(OPS_OF_METHOD[method]))

    # ---------------------------------------------------------------- prepare (host, once per layer)

    def prepare_linear(self, lin: Linear) -> object:
        """One checkpoint linear (verify.checkpoint.Linear) -> the backend's operand for dense_gemm /
        dense_linear."""
        self._refuse("prepare_linear")

    def prepare_experts(self, experts: GatedMlp) -> object:
        """The routed experts' stacks (w1, w3, w2) -> the backend's operand for the grouped ops."""
        self._refuse("prepare_experts")

    def prepare_router(self, router: Router, spec: MoeSpec) -> object:
        """The router's gate (and bias or hash table) with the layer's MoeSpec -> the backend's router."""
        self._refuse("prepare_router")

    def dequantize_prepared(self, prepared: object, *, experts: range | None = None) -> Tensor | Mapping[str, Tensor]:
        """Optional (no op of its own; the `prepare` check, verify.verdicts.judges.prepare): the backend's own
        prepared operand decoded back to float32 in checkpoint layout, after its repack, interleave and scale
        folding: a prepare_linear result -> [N, K]; a prepare_experts result -> {"w1", "w3", "w2": [E, N, K]}.
        experts (a range; prepare_experts results only): decode only those experts, [len(experts), N, K]: the
        check then holds one bounded chunk at a time (a full-size stack decoded whole to float32 is tens of GB).
        An override that takes only `prepared` still works: its stacks are decoded whole, once."""
        raise NotImplementedError(f"not served: {self.name} has no dequantize_prepared (it cannot decode its "
                                  "prepared weights back)")

    # ---------------------------------------------------------------- forward ops (graph-capturable where graph_safe)

    def quantize(self, x_bf16: Tensor, *, input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """x [M, K] bf16 -> NVFP4 (protocol.QuantizedAct); input_dec_scale_f32: a checkpoint input_scale
        (static), None: dynamic (amax on the device)."""
        self._refuse("quantize")

    def grouped_quantize(self, rows_bf16: Tensor, offsets_i32: Tensor, *,
                         input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """Expert-sorted rows [R, K] bf16 with offsets int32 [E+1] -> grouped NVFP4 (per-expert 128-row
        padded 128x4 scales); input_dec_scale_f32: float32 [E] static, None: dynamic."""
        self._refuse("grouped_quantize")

    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct:
        """x [M, K] bf16 -> FP8 E4M3 per token in 1x128 groups (protocol.Fp8QuantizedAct), dynamic scales under
        scale_rule "ue8m0_ceil" (power of two rounded up, UE8M0 bytes) or "f32" (float32): the activations of
        the backend's FP8 block-128 dense_linear, which the dense stages' bytes verdict compares with
        references/fp8_act.py under the rule the weight's block scales imply."""
        self._refuse("quantize_fp8")

    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        """a x prepare_linear(w)^T -> bf16 [M, N]."""
        self._refuse("dense_gemm")

    def grouped_gemm(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *,
                     layer: str) -> Tensor | tuple[Tensor, Tensor]:
        """Grouped NVFP4 rows x expert stack: layer "l1" -> (gate, up) [R, I]; "l2" -> y bf16 [R, H]."""
        self._refuse("grouped_gemm")

    def swiglu_requant(self, gate: Tensor, up: Tensor, offsets_i32: Tensor, *, swiglu_limit: float | None,
                       row_weight_f32: Tensor | None = None,
                       input_dec_scale_f32: Tensor | None = None) -> tuple[Tensor, QuantizedAct]:
        """Clamped SwiGLU -> bf16 h [R, I] (times row_weight_f32 when given), and h requantized to NVFP4."""
        self._refuse("swiglu_requant")

    def l1_fused(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *, swiglu_limit: float | None,
                 input_dec_scale_f32: Tensor | None = None) -> QuantizedAct:
        """Grouped L1 GEMM + SwiGLU + requantization of h in one call -> h as grouped NVFP4."""
        self._refuse("l1_fused")

    def router(self, x_bf16: Tensor, router: object, *, token_ids_i64: Tensor | None = None) -> RoutingOut:
        """x [T, H] bf16 -> expert ids int64 [T, k] and routing weights float32 [T, k]."""
        self._refuse("router")

    def dispatch(self, ids_i64: Tensor, num_experts: int) -> Dispatched:
        """ids [T, k] -> expert-sorted rows (stable, token-major within an expert) with offsets int32 [E+1]."""
        self._refuse("dispatch")

    def combine(self, y_rows_bf16: Tensor, d: Dispatched, weights_f32: Tensor | None) -> Tensor:
        """Expert-sorted rows [R, H] -> bf16 [T, H]: per token the sum over its slots (weighted when given)."""
        self._refuse("combine")

    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """x [M, K] bf16 -> bf16 [M, N]: quantize + dense GEMM as one call."""
        self._refuse("dense_linear")

    def grouped_dense_linear(self, x_bf16: Tensor, w: object, *, groups: int,
                             input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """DeepSeek-V4's wo_a, one call: x [M, groups*d] bf16 and w = prepare_linear of the WHOLE checkpoint
        linear [groups*r, d] -> bf16 [M, groups*r], y[:, g*r:(g+1)*r] = x[:, g*d:(g+1)*d] @ W[g*r:(g+1)*r]^T
        (einsum "tgd,grd->tgr"). x is quantized as a whole, as dense_linear quantizes its input (FP8: 1x128
        per token; NVFP4: one global scale over all of x, static from input_dec_scale_f32 or dynamic); d is a
        multiple of the activation block, so no block straddles two groups."""
        self._refuse("grouped_dense_linear")

    def grouped_linear_mxfp4(self, rows_bf16: Tensor, offsets_i32: Tensor, experts: object, *,
                             layer: str) -> Tensor | tuple[Tensor, Tensor]:
        """MXFP4 experts (DeepSeek-V4's MTP block), W4A8, one call: expert-sorted rows [R, K] bf16 with offsets
        int32 [E+1], quantized inside to FP8 E4M3 per token in 1x128 groups (scale rule "ue8m0_ceil", as
        quantize_fp8), x prepare_experts(an MXFP4 GatedMlp) -> layer "l1": (gate, up) bf16 [R, I]; "l2": bf16 [R, H]."""
        self._refuse("grouped_linear_mxfp4")

    def moe_block(self, x_bf16: Tensor, router: object, experts: object, *, swiglu_limit: float | None,
                  weight_placement: str, act_scale: str, token_ids_i64: Tensor | None = None,
                  num_valid_tokens_i32: Tensor | None = None) -> Tensor:
        """The routed MoE block as one call: x [T, H] bf16 -> bf16 [T, H]. num_valid_tokens_i32 (int32 [1]
        on the device, backends with supports_valid_tokens): tokens t >= n reach no expert and their rows
        are zero, so a graph captured at capacity replays any smaller token count."""
        self._refuse("moe_block")
