"""Bugged: a backend with one injected bug. It wraps any backend and transforms only what crosses the
protocol: the checkpoint tensors going into `prepare_*` (verify.selftest.weights, .fp8) or the boundary
tensors coming out of an op (verify.selftest.activations, and the output bugs below); every other op is
the wrapped backend's, called explicitly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from references.fp8_act import quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_narrow_acc_model
from references.linear import Nvfp4Weight
from references.modes import W4A16, linear_in_mode
from references.nvfp4 import amax_by_recipe
from verify.backends import Backend, NumericsMode, QuantizedAct, RoutingOut
from verify.backends.emulator import fp8_act_recipe_for_rule
from verify.checkpoint import Fp8BlockLinear, Nvfp4Linear
from verify.reference_layer import to_reference_weight
from verify.selftest.activations import dense_padding_filled, fill_padding, last_k_masked_off, ties_away
from verify.selftest.fp8 import (NARROW_ACC_BITS, NARROW_DECLARED, UnpromotedFp8, e8m0_read_as_numbers,
                                 fp8_scale_grid_transposed, ue8m0_rounded_down, unpromoted)
from verify.selftest.weights import (gate_up_halved, global_scale_by, k_vs_n_packing, mlp, n_major,
                                     one_weight_scale_2, transpose_scales, wrong_experts_scales)

__all__ = ["Bugged", "on_cuda"]

_STALE_SCALE_BYTE = 0x38  # E4M3 1.0: a plausible scale byte left in padding by an earlier launch


def on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


@dataclass(frozen=True)
class _W4A16Linear:
    """declares-w4a4-computes-w4a16: the NVFP4 weight a dense_linear multiplies in W4A16 (bf16 activations)."""

    weight: Nvfp4Weight
    inner: object  # the wrapped backend's own prepared weight (its dense_gemm on the NVFP4 boundary stays honest)


# ============================================================================= the wrapper


class Bugged:
    """A backend with one injected bug; every other op is the wrapped backend's, called explicitly."""

    def __init__(self, inner: Backend, bug: str) -> None:
        self.inner, self.bug = inner, bug
        self.name = f"{inner.name}+{bug}"
        self.recipe, self.u_acc = inner.recipe, inner.u_acc
        self.fp8_u_acc = getattr(inner, "fp8_u_acc", None)  # its FP8 GEMMs' accumulator (Backend docstring)
        self.fp8_promotion_interval = getattr(inner, "fp8_promotion_interval", None)
        if bug == "fp8-promotion-skipped":  # declares what a promoting Hopper FP8 GEMM has, computes without it
            self.fp8_u_acc, self.fp8_promotion_interval = NARROW_DECLARED
        self.graph_safe = getattr(inner, "graph_safe", True)
        self.supports_valid_tokens = getattr(inner, "supports_valid_tokens", False)
        self._weight_scale_2: dict[int, torch.Tensor] = {}  # id(prepared NVFP4 linear) -> its weight_scale_2
        self._gate_scale_2: torch.Tensor | None = None  # the routed experts' w1 weight_scale_2 [E]

    def unsupported_reason(self, op, device):
        return self.inner.unsupported_reason(op, device)

    # ---- prepare: corrupt the checkpoint tensors on their way in
    _LINEAR_BUGS = {"untransposed-scale-matrix": transpose_scales, "n-major-weight-as-k-major": n_major,
                    "k-vs-n-packing": k_vs_n_packing,
                    "global-scale-inverted": global_scale_by(torch.reciprocal),
                    "global-scale-dropped": global_scale_by(torch.ones_like),
                    "e8m0-scale-read-as-a-number": e8m0_read_as_numbers,
                    # a load-time repack folding weight_scale_2 in twice (issue 24): blamed on prepare when the
                    # backend decodes its prepared weights (dequantize_prepared), else on the GEMMs' bound
                    "prepare-scale-applied-twice": global_scale_by(lambda s: s * s),
                    "fp8-scale-grid-transposed": fp8_scale_grid_transposed}

    def numerics_mode(self, op, weight_format):
        """The inner backend's declaration (w4a4 by default); declares-w4a4-computes-w4a16 says w4a4 for NVFP4."""
        if self.bug == "declares-w4a4-computes-w4a16" and weight_format == "nvfp4":
            return NumericsMode.W4A4
        fn = getattr(self.inner, "numerics_mode", None)
        if fn is not None:
            return fn(op, weight_format)
        return NumericsMode.FP8_BLOCK if weight_format == "fp8_block" else NumericsMode.W4A4  # Backend's defaults

    def dequantize_prepared(self, prepared, *, experts=None):
        if self.bug != "prepare-scale-applied-twice":  # the other weight bugs stay the GEMM verdicts' to catch
            raise NotImplementedError("not served: the selftest wrapper decodes prepared weights for "
                                      "prepare-scale-applied-twice only")
        from verify.verdicts.judges.prepare import dequantized_by_backend  # noqa: PLC0415

        return dequantized_by_backend(self.inner, prepared, experts)

    def prepare_linear(self, lin):
        if self.bug == "declares-w4a4-computes-w4a16" and isinstance(lin, Nvfp4Linear):
            # dense_linear computes W4A16 with references.modes; dense_gemm keeps the inner backend's operand
            return _W4A16Linear(to_reference_weight(lin), self.inner.prepare_linear(lin))
        w = self.inner.prepare_linear(self._LINEAR_BUGS.get(self.bug, lambda x: x)(lin))
        if isinstance(lin, Nvfp4Linear):  # the epilogue bugs need the weight's half of alpha
            self._weight_scale_2[id(w)] = lin.weight_scale_2_f32
        if self.bug == "fp8-promotion-skipped" and isinstance(lin, Fp8BlockLinear):
            return unpromoted(lin, w)
        return w

    def prepare_experts(self, experts):
        if isinstance(experts.w1, Nvfp4Linear):
            self._gate_scale_2 = experts.w1.weight_scale_2_f32.reshape(-1).float()
        if self.bug in self._LINEAR_BUGS:
            experts = mlp(experts, self._LINEAR_BUGS[self.bug])
        if self.bug == "gate-up-interleave-halved":
            experts = gate_up_halved(experts)
        if self.bug == "one-weight-scale-2-for-gate-and-up":
            experts = one_weight_scale_2(experts)
        if self.bug == "wrong-experts-scale":
            experts = mlp(experts, wrong_experts_scales)
        return self.inner.prepare_experts(experts)

    def prepare_router(self, router, spec):
        if self.bug == "router-ties-to-higher-id" and router.tid2eid_i64 is None:
            router = dataclasses.replace(router, gate_weight_bf16=router.gate_weight_bf16.flip(0),
                                         gate_bias_f32=None if router.gate_bias_f32 is None else router.gate_bias_f32.flip(0))
        return self.inner.prepare_router(router, spec)

    # ---- forward ops
    def quantize(self, x_bf16, *, input_dec_scale_f32=None):
        if self.bug == "static-scale-used-as-dynamic":
            input_dec_scale_f32 = None
        if self.bug == "global-amax-of-part-of-the-tensor" and input_dec_scale_f32 is None and x_bf16.shape[0] > 1:
            # a cross-CTA amax reduction that lost a race: the global scale from the first row only
            input_dec_scale_f32 = (amax_by_recipe(x_bf16[:1], self.recipe).float() / 2688.0).reshape(1)
        a = self.inner.quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)
        if self.bug in ("e2m1-ties-away-from-zero", "e4m3-scale-ties-away-from-zero"):
            a = ties_away(a, x_bf16, self.recipe, input_dec_scale_f32, e4m3=self.bug.startswith("e4m3"))
        if self.bug == "activation-global-scale-dropped":
            a = QuantizedAct(a.packed_u8, a.sf_swizzled_u8, torch.ones_like(a.global_dec_f32))
        if self.bug == "swapped-nibbles":
            a = QuantizedAct((a.packed_u8 >> 4) | ((a.packed_u8 & 0xF) << 4), a.sf_swizzled_u8, a.global_dec_f32)
        if self.bug == "every-code-sign-flipped":  # the bound passes it (the GEMM's own operands), the bytes not
            a = QuantizedAct(a.packed_u8 ^ 0x88, a.sf_swizzled_u8, a.global_dec_f32)
        if self.bug == "scale-padding-not-zero-filled":
            a = dense_padding_filled(a, _STALE_SCALE_BYTE)
        return a

    def quantize_fp8(self, x_bf16, *, scale_rule):
        a = self.inner.quantize_fp8(x_bf16, scale_rule=scale_rule)
        if self.bug == "fp8-ue8m0-scale-rounded-down":
            a = ue8m0_rounded_down(a, x_bf16)
        return a

    def grouped_quantize(self, rows_bf16, offsets_i32, *, input_dec_scale_f32=None):
        a = self.inner.grouped_quantize(rows_bf16, offsets_i32, input_dec_scale_f32=input_dec_scale_f32)
        return self._padding(a, offsets_i32)

    def _padding(self, a: QuantizedAct, offsets_i32) -> QuantizedAct:
        """The padding bugs: a grouped quantizer (act_quant or requant) writing 0xFF / 0x7F into padding."""
        if self.bug in ("garbage-in-scale-padding", "nan-in-scale-padding"):
            a = fill_padding(a, offsets_i32, 0xFF if self.bug.startswith("garbage") else 0x7F)
        if self.bug == "scale-padding-not-zero-filled":
            a = fill_padding(a, offsets_i32, _STALE_SCALE_BYTE)
        return a

    def dense_gemm(self, a, w):
        if self.bug == "tile-mask-off-by-one":
            a = last_k_masked_off(a)
        y = self._row_off(self.inner.dense_gemm(a, w.inner if isinstance(w, _W4A16Linear) else w))
        if self.bug in ("alpha-applied-twice", "cast-before-scale") and id(w) in self._weight_scale_2:
            alpha = a.global_dec_f32.float().reshape(()) * self._weight_scale_2[id(w)].float().reshape(())
            if self.bug == "alpha-applied-twice":  # the epilogue multiplies by alpha, then the caller again
                y = (y.float() * alpha).to(y.dtype)
            else:  # the accumulator cast to fp16 before alpha is applied (overflows past 65504), then scaled
                y = ((y.float() / alpha).to(torch.float16).float() * alpha).to(y.dtype)
        return y

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        if self.bug == "tile-mask-off-by-one":
            a = last_k_masked_off(a)
        y = self.inner.grouped_gemm(a, offsets_i32, experts, layer=layer)
        y = tuple(self._row_off(t) for t in y) if isinstance(y, tuple) else self._row_off(y)
        if self.bug == "barrier-dropped":
            y = tuple(self._stale_rows(t) for t in y) if isinstance(y, tuple) else self._stale_rows(y)
        if self.bug == "gate-scale-applied-twice" and isinstance(y, tuple) and self._gate_scale_2 is not None:
            gate, up = y  # each row's expert (on the device: graph-safe), its w1 weight_scale_2 applied again
            rows = torch.arange(gate.shape[0], device=gate.device)
            expert = torch.searchsorted(offsets_i32[1:].to(torch.int64), rows, right=True)
            ws2 = self._gate_scale_2.to(gate.device)[expert.clamp(max=self._gate_scale_2.numel() - 1)]
            y = ((gate.float() * ws2[:, None]).to(gate.dtype), up)
        return y

    def _stale_rows(self, y):
        """A tile stored before the barrier that orders its shared-memory writes: rows 8..15 of the first
        16-row tile still hold rows 0..7 (the previous warp group's writes); graph-safe (no host read)."""
        if y.shape[0] < 16:
            return y
        y = y.clone()
        y[8:16] = y[0:8]
        return y

    def _row_off(self, y):
        """A small local error: one output row 3 % off (a tile edge, a stale accumulator)."""
        if self.bug != "one-output-row-3-percent-off" or y.shape[0] == 0:
            return y
        y = y.clone()
        y[0] = (y[0].float() * 1.03).to(y.dtype)
        return y

    def swiglu_requant(self, gate, up, offsets_i32, *, swiglu_limit, row_weight_f32=None, input_dec_scale_f32=None):
        if self.bug == "swiglu-clamp-dropped":
            swiglu_limit = None
        h, a = self.inner.swiglu_requant(gate, up, offsets_i32, swiglu_limit=swiglu_limit,
                                         row_weight_f32=row_weight_f32, input_dec_scale_f32=input_dec_scale_f32)
        return h, self._padding(a, offsets_i32)

    def l1_fused(self, a, offsets_i32, experts, *, swiglu_limit, input_dec_scale_f32=None):
        if self.bug == "swiglu-clamp-dropped":
            swiglu_limit = None
        return self.inner.l1_fused(a, offsets_i32, experts, swiglu_limit=swiglu_limit,
                                   input_dec_scale_f32=input_dec_scale_f32)

    def router(self, x_bf16, router, *, token_ids_i64=None):
        r = self.inner.router(x_bf16, router, token_ids_i64=token_ids_i64)
        if self.bug == "router-ties-to-higher-id" and token_ids_i64 is None:
            e = getattr(router, "gate_weight_bf16", None)
            n = e.shape[0] if e is not None else int(r.ids_i64.max()) + 1
            r = RoutingOut(n - 1 - r.ids_i64, r.weights_f32)
        if self.bug == "one-clear-winner-swapped" and r.ids_i64.shape[0]:
            ids = r.ids_i64.clone()  # token 0's top expert replaced by the lowest id it did not choose
            cand = torch.arange(ids.shape[1] + 1, device=ids.device)  # k + 1 ids: one is not chosen
            free = (cand[:, None] != ids[0][None, :]).all(dim=1)
            ids[0, 0] = cand[free.to(torch.int32).argmax()]  # on the device: no host sync, graph-safe
            r = RoutingOut(ids, r.weights_f32)
        return r

    def dispatch(self, ids_i64, num_experts):
        return self.inner.dispatch(ids_i64, num_experts)

    def combine(self, y_rows_bf16, d, weights_f32):
        if self.bug == "routing-weight-at-the-wrong-place":
            weights_f32 = None  # as if applied before w2 although the run declares after
        y = self.inner.combine(y_rows_bf16, d, weights_f32)
        if self.bug == "stage-output-scaled-x2":  # a pure factor: cosine 1, norm ratio 2
            y = y * 2
        return y

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        y = self._dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        if self.bug == "row-depends-on-the-batch" and x_bf16.shape[0] > 1:  # a split-K chosen by M: row 0 moves
            y = y.clone()
            y[0] = (y[0].float() * (1 + 2.0**-6)).to(y.dtype)
        if self.bug == "path-of-a-middle-batch-size" and 3 <= x_bf16.shape[0] <= 8:  # last bit of every output
            y = (y.view(torch.int16) ^ 1).view(y.dtype)
        return y

    def _dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        """The CUDA-graph killers live here (dense_linear is the call the dense stages' sync and graph
        probes capture); on a CPU tensor they are no-ops, and the probes report 'needs a CUDA device'.
        fp8-promotion-skipped: an FP8 linear computed by references.fp8_gemm's model of a 14-bit truncating
        accumulator that never promotes to float32 (on the references' 1x128 activations)."""
        if isinstance(w, _W4A16Linear):
            return linear_in_mode(x_bf16, w.weight, W4A16, recipe=self.recipe)
        if isinstance(w, UnpromotedFp8):
            act = quantize_act_fp8_1x128(x_bf16, recipe=fp8_act_recipe_for_rule(w.scale_rule))
            y = fp8_block_gemm_narrow_acc_model(act, w.weight,
                                                acc_bits=NARROW_ACC_BITS, rounding="truncate", promotion_interval=None)
            return y.to(torch.float32).to(torch.bfloat16)
        if self.bug == "stream-cached-at-first-call" and on_cuda(x_bf16):
            if not hasattr(self, "_stream"):
                self._stream = torch.cuda.current_stream(x_bf16.device)
            with torch.cuda.stream(self._stream):  # the capture runs on another stream: this escapes it
                return self.inner.dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        y = self._row_off(self.inner.dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32))
        if self.bug == "host-sync-in-a-stage" and on_cuda(y):
            y.reshape(-1)[0].item()  # a device -> host read: the host waits for the stream
        if self.bug == "buffer-allocated-inside-capture" and on_cuda(y):
            ones = torch.tensor([1.0], device=y.device)  # a new buffer filled from host memory on every call
            y = (y.float() * ones).to(y.dtype)
        return y

    def grouped_dense_linear(self, x_bf16, w, *, groups, input_dec_scale_f32=None):
        """The wrapped backend's grouped linear (V4's wo_a) on its own prepared weight: prepare's and the
        quantizers' bugs reach it (through prepare_linear and the bytes check), dense_linear's forward bugs do not
        (a prepared operand wrapped for one of those is unwrapped first)."""
        inner = w.inner if isinstance(w, (_W4A16Linear, UnpromotedFp8)) else w
        return self.inner.grouped_dense_linear(x_bf16, inner, groups=groups, input_dec_scale_f32=input_dec_scale_f32)

    def moe_block(self, x_bf16, router, experts, **kw):
        if self.bug == "replay-breaks-when-token-count-changes" and on_cuda(x_bf16) \
                and torch.cuda.is_current_stream_capturing():
            kw = {**kw, "num_valid_tokens_i32": None}  # the count read at capture: replays keep every token
        if self.bug == "valid-count-ignored":  # every row routed, padding included (its amax moves the scales)
            kw = {**kw, "num_valid_tokens_i32": None}
        return self.inner.moe_block(x_bf16, router, experts, **kw)
