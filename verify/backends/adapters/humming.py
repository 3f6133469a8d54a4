"""The `humming` backend: Humming's NVFP4 W4A16 dense and grouped-MoE GEMMs on Hopper (humming-kernels, JIT
compiled on first use through NVRTC), behind the backend protocol.

Written against humming-kernels 0.1.20 (HUMMING.pinned; another installed version is refused with that sentence:
its API is young). The public API used, read from that wheel:
- prepare (host, once per layer, on the GPU): humming's own ModelOpt NVFP4 conversion and repack, the calls its
  HummingLayer.transform makes: humming.schema.modelopt.ModeloptNvfp4WeightSchema().convert_humming (checkpoint
  bytes: packed E2M1 [.., N, K/2] viewed as int32, E4M3 scales [.., N, K/16] linear, weight_scale_2 per tensor;
  stacked shards as `shape_n_stacks`), humming.transform.prepare_layer_config (bf16 activations and output,
  N padded to a multiple of 128), prepare_fp16_e8m0_scale and transform_humming_tensors (the weight repack and
  the scale permutation). Shapes: humming's kernels need that N padding to be a multiple of 8 (its check_shape
  asserts pad_shape_n % 8 == 0 when it compiles), so this adapter first appends zero rows (codes 0, scale
  bytes 0) up to a multiple of 8 and cuts its outputs back to N: any N works (the accumulator probe's 35
  columns included) and real layers (N a multiple of 128) are untouched. K must be a multiple of 32 (humming's
  bf16 repack): another K is refused (NotImplementedError, "not served" with that reason). w1 and w3 are
  stacked into one [E, 2I, K] L1 weight, as engines fuse them: when the two weight_scale_2 of an expert are equal
  humming keeps one float32 scale per expert; when they differ it keeps a bf16 scale per channel (its choice;
  the prepare check sees what that rounding costs);
- forward: humming.forward.humming_forward (bf16 activations: no quantization; group scales applied to the
  decoded weight before the MMA, weight_scale_2 in the epilogue), dense, or grouped over expert-sorted rows with
  compute_config gemm_type "grouped_contiguous" and the offsets int32 [E+1] as its expert_layout. The kernels
  for every M range are compiled on the first call of a shape (heuristic tuning configs, cached per layer
  config); later calls only pick a kernel by M on the host, so a warmed-up call is graph-capturable.
  An exception inside humming (an assert of its kernel's shape checks, an NVRTC failure) is re-raised as
  HummingError, one line naming the op, the shape and humming's failing line (a bare `assert` has no message).

Determinism (read from humming 0.1.20's tuner and epilogue; measured by test_humming_gpu.py): by default humming
runs stream-K when K > 1024 and the output tiles do not fill the GPU (tune/base.py get_config: use_stream_k).
Each K slice accumulates in float32, but its partial tile is written in the OUTPUT dtype (bf16) and the slices
are reduced in bf16 in global memory (epilogue/gmem_writer.cuh: __hadd2, atomicAdd on bf162, or TMA
reduce-add). Slice 0 stores first; with the TMA output path or more than 3 slices the other slices then add in
whatever order they finish (epilogue/pipeline.cuh barrier_acquire2), so a bf16 sum of the same partials can
round differently from run to run: the default mode is NOT bit-deterministic for such shapes (eager twice
may differ; so a graph replay "differs from eager" without any capture bug), and its error is fp32
accumulation within a slice plus one bf16 rounding per slice. humming's use_batch_invariant compute option
(HummingBatchInvariantBackend, `--backend verify.backends.adapters.humming:HummingBatchInvariantBackend`)
turns stream-K off: one float32 accumulation per output and one bf16 rounding, deterministic (and, humming's
promise, the same bits for a row alone or in a batch: the batch check judges it). `humming` is the default mode
because that is what engines run; the graph and batch checks then fail with "nondeterministic: ..." (the harness
runs eager twice before it blames a replay or a batch) wherever eager differs from itself.

Ops and their declared numerics mode (Backend.modes):
- prepare_linear (NVFP4 dense linears), prepare_experts (NVFP4 expert stacks);
- dense_linear: W4A16 (bf16 x, Humming's kernel as a Hopper engine runs it; a static input_scale has no role in
  W4A16 and is ignored); moe_block: W4A16 (its routing, dispatch and combine are plain torch ops of this adapter,
  the engine's part; the experts' L1, the clamped SwiGLU in float32 and L2 are Humming's GEMMs with bf16 h);
- dense_gemm, grouped_gemm: the protocol's NVFP4 boundary activations are decoded exactly to bf16 here
  (adapters._common: e2m1 x E4M3 is exact in bf16) and their global decode scale folded into the weight_scale_2
  the kernel multiplies in (float32; bf16 where humming keeps channel scales); the kernel then sums products of
  NVFP4 values, so these ops compute W4A4 math and are declared W4A4: the accumulation bound judges Humming's
  weight decode, repack and accumulator on exactly the operands the emulator uses;
- dequantize_prepared: Humming's own GEMM on an identity (weight_scale_2 = 1) decodes its prepared weights back
  to float32 [N, K] ([E, N, K] for a stack; {"w1", "w3", "w2"} for HummingExperts), then its weight_scale_2
  (channel scales read back through its own permutation) multiplies in. Exact (each output is one product,
  e2m1 x E4M3 fits bf16) except the sign of zero: a GEMM's accumulator starts at +0, so a -0 weight comes out
  +0 and no GEMM can show it; compare with adapters._common.zero_sign_blind_diff (bit-exact otherwise).
Accumulator: declared fp32 (bf16 wgmma, fp32 accumulate; u_acc 2^-24), what humming's kernels advertise. Measured
by `python -m verify accumulator` on an H100 (humming 0.1.20, 2026-12-06): 26 bits (nearest) at M = 1 and M = 16,
but **12 bits** (nearest) at M = 64, 128, 256 (K = 1024), and at M = 1 with K = 8192 12 bits in one run and 5 in
another (stream-K, above: the K slices' partial sums are added in bf16 in the order they finish, which one u_acc
cannot model). Those paths keep fewer bits than declared. HummingBatchInvariantBackend (no stream-K) measures 26
bits (truncation) on every path, which its fp32 declaration honours.
The probe says so: `verify accumulator` exits 1 naming each path, and `verify layer` fails the run with one
"FAIL accumulator" line per path while its verdicts still run (a bound that is too tight can only fail: on the
full-size layer moe.l1's bound fails at ratio 1.02). HummingBatchInvariantBackend turns stream-K off.
Not served (with the reason): quantize, grouped_quantize, quantize_fp8, swiglu_requant, l1_fused, router,
dispatch, combine. Anywhere without the package, a CUDA device or Hopper, every op says why.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor

from verify.backends.protocol import MoeSpec, Op
from verify.backends.adapters._common import (Package, cuda_device_problem, grouped_nvfp4_act_to_bf16,
                                              nvfp4_act_to_bf16, package_problem, package_version)
from verify.backends.base import Backend
from verify.backends.protocol import NumericsMode, QuantizedAct
from verify.checkpoint import GatedMlp, Linear, Nvfp4Linear, Router

__all__ = ["HUMMING", "HummingBackend", "HummingBatchInvariantBackend", "HummingWeight", "HummingExperts",
           "HummingRouter", "HummingError", "experts_w4a16"]

HUMMING = Package("humming-kernels", "humming", extra="humming", pinned="0.1.20")
_NAME = "humming"
_PARAM_DTYPE = torch.bfloat16
_PAD_N = 128          # N padded for humming's repack (multiple of 64) and four WGMMA warp tiles of 32
_N_MULTIPLE = 8       # humming's check_shape: that padding (round_up(N, 128) - N) must be a multiple of 8
_K_MULTIPLE = 32      # humming's bf16 weight repack
_LOCKS = 2048         # stream-K locks per prepared weight (HummingLayer's size)
_GROUPED = "grouped_contiguous"
_PLACEMENTS = ("after_w2", "before_w2")
_SCORINGS = ("sqrtsoftplus", "sigmoid", "softmax")

_W4A16 = "W4A16: humming keeps activations bf16"
_NOT_SERVED = MappingProxyType({
    Op.QUANTIZE: f"not served: {_W4A16} and has no NVFP4 activation quantizer on Hopper (FP4 activations need sm100+)",
    Op.GROUPED_QUANTIZE: f"not served: {_W4A16} (the expert rows go to its grouped GEMM as bf16)",
    Op.QUANTIZE_FP8: "not served: this adapter serves humming's NVFP4 W4A16 GEMMs only (its FP8 paths are not adapted)",
    Op.SWIGLU_REQUANT: f"not served: {_W4A16}, so h stays bf16 between its grouped GEMMs (no NVFP4 requantization)",
    Op.L1_FUSED: f"not served: {_W4A16}; its L1 has no SwiGLU + NVFP4 requant epilogue",
    Op.ROUTER: "not served: humming is GEMMs only; routing is the engine's (moe_block routes with plain torch)",
    Op.DISPATCH: "not served: humming is GEMMs only; dispatch is the engine's (moe_block sorts with plain torch)",
    Op.COMBINE: "not served: humming is GEMMs only; combine is the engine's (moe_block combines with plain torch)",
})


class HummingError(RuntimeError):
    """humming raised inside its own code (a kernel shape assert, an NVRTC or launch failure); the message is one
    line naming the op, the shape and humming's failing line."""


@dataclass(frozen=True)
class HummingWeight:
    """One NVFP4 linear (num_experts 0) or expert stack prepared by humming: its LayerConfig and tensors (weight
    repacked, weight_scale permuted, weight_scale_2: float32 [1] / [E] for scale_2_kind "tensor", bf16 [N] /
    [E, N] in humming's channel order for "channel"), `channel_of` (the checkpoint column of each prepared
    channel scale, "channel" only), its stream-K locks and compute config (JSON; None: dense). n is the
    checkpoint's N; humming holds N rounded up to a multiple of 8 (zero rows), outputs are cut back to n."""

    module: str
    n: int
    k: int
    num_experts: int
    config: object
    weight: Tensor
    weight_scale: Tensor
    weight_scale_2: Tensor | None
    scale_2_kind: str
    channel_of: Tensor | None
    locks: Tensor
    compute_config: str | None


@dataclass(frozen=True)
class HummingExperts:
    """Routed experts prepared by humming: w13 (w1 rows then w3 rows, [E, 2I, H]) and w2 ([E, H, I])."""

    w13: HummingWeight
    w2: HummingWeight
    intermediate: int


@dataclass(frozen=True)
class HummingRouter:
    """The router as moe_block's torch routing reads it (prepare_router)."""

    gate_bf16: Tensor
    bias_f32: Tensor | None
    tid2eid_i64: Tensor | None
    spec: MoeSpec
    renormalize: bool


class HummingBackend(Backend):
    """Humming's NVFP4 W4A16 kernels as a verify.backends.Backend (module docstring)."""

    name = _NAME
    u_acc = 2.0**-24
    accumulator = "fp32 (bf16 wgmma, fp32 accumulate; E4M3 group scales on the decoded weight, weight_scale_2 in " \
                  "the epilogue; stream-K when K > 1024: slices' partial sums added in bf16, in arbitrary order " \
                  "past 3 slices or with TMA output: not run-to-run deterministic)"
    modes = MappingProxyType({"nvfp4": NumericsMode.W4A16, (Op.DENSE_GEMM, "nvfp4"): NumericsMode.W4A4,
                              (Op.GROUPED_GEMM, "nvfp4"): NumericsMode.W4A4})
    not_served = _NOT_SERVED
    batch_invariant = False  # humming's use_batch_invariant compute option (HummingBatchInvariantBackend)

    def __init__(self) -> None:
        self.version = package_version(HUMMING)

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        why = super().unsupported_reason(op, device)
        if why:
            return why
        problem = package_problem(HUMMING)
        if problem:
            return f"{self.name}: {problem}"
        return cuda_device_problem(self.name, device, majors=(9,), arch_words="Hopper (sm90)")

    # ---------------------------------------------------------------- prepare (host, once per layer)
    def prepare_linear(self, lin: Linear) -> HummingWeight:
        """An NVFP4 dense linear -> HummingWeight (humming's conversion and repack; module docstring)."""
        if not isinstance(lin, Nvfp4Linear):
            raise NotImplementedError(f"{self.name}: {lin.module} is {lin.format}; this adapter serves NVFP4 "
                                      "weights only")
        if lin.weight_u8.dim() != 2:
            raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K/2] dense weight, got "
                             f"{tuple(lin.weight_u8.shape)}")
        return self._prepare(lin.module, lin.weight_u8, lin.weight_scale_e4m3, lin.weight_scale_2_f32.reshape(1, 1),
                             n_stacks=[lin.weight_u8.shape[0]], num_experts=0)

    def prepare_experts(self, experts: GatedMlp) -> HummingExperts:
        """Stacked NVFP4 experts -> HummingExperts: w1|w3 stacked along N (one L1 weight, two shards), w2."""
        lins = (experts.w1, experts.w3, experts.w2)
        for lin in lins:
            if not isinstance(lin, Nvfp4Linear):
                raise NotImplementedError(f"{self.name}: {getattr(lin, 'module', '?')} is "
                                          f"{getattr(lin, 'format', '?')}; this adapter serves NVFP4 experts only")
            if lin.weight_u8.dim() != 3:
                raise ValueError(f"experts: {lin.module} has shape {tuple(lin.weight_u8.shape)}, expected a stack "
                                 "[E, N, K/2]")
        w1, w3, w2 = lins
        e, i = w1.weight_u8.shape[0], w1.weight_u8.shape[1]
        if w3.weight_u8.shape != w1.weight_u8.shape:
            raise ValueError(f"experts: {w1.module} {tuple(w1.weight_u8.shape)} and {w3.module} "
                             f"{tuple(w3.weight_u8.shape)} differ")
        w13 = self._prepare(
            f"{w1.module}|w3", torch.cat((w1.weight_u8, w3.weight_u8), dim=1),
            torch.cat((w1.weight_scale_e4m3.view(torch.uint8), w3.weight_scale_e4m3.view(torch.uint8)), dim=1),
            torch.stack((w1.weight_scale_2_f32.reshape(e), w3.weight_scale_2_f32.reshape(e)), dim=1),
            n_stacks=[i, i], num_experts=e)
        w2p = self._prepare(w2.module, w2.weight_u8, w2.weight_scale_e4m3, w2.weight_scale_2_f32.reshape(e, 1),
                            n_stacks=[w2.weight_u8.shape[1]], num_experts=e)
        return HummingExperts(w13, w2p, i)

    def prepare_router(self, router: Router, spec: MoeSpec) -> HummingRouter:
        """The gate (and bias or hash table) for moe_block's torch routing; V3's group-limited top-k is refused."""
        if spec.n_group not in (None, 0, 1):
            raise NotImplementedError(f"{self.name}: moe_block's torch routing has no group-limited top-k "
                                      f"(n_group={spec.n_group})")
        if spec.scoring not in _SCORINGS:
            raise NotImplementedError(f"{self.name}: scoring {spec.scoring!r} is not one of {_SCORINGS}")
        renormalize = spec.renormalize if spec.renormalize is not None else spec.scoring != "softmax"
        return HummingRouter(router.gate_weight_bf16, router.gate_bias_f32, router.tid2eid_i64, spec, renormalize)

    def _prepare(self, module: str, weight_u8: Tensor, scale_e4m3: Tensor, scale_2_f32: Tensor, *,
                 n_stacks: list[int], num_experts: int) -> HummingWeight:
        from humming.config.enum import WeightScale2Type  # noqa: PLC0415 (the optional package, lazily)
        from humming.schema.modelopt import ModeloptNvfp4WeightSchema  # noqa: PLC0415
        from humming.transform import (prepare_fp16_e8m0_scale, prepare_layer_config,  # noqa: PLC0415
                                       transform_humming_bias, transform_humming_tensors)

        dev = weight_u8.device if weight_u8.is_cuda else _cuda_device()
        n, k = weight_u8.shape[-2], 2 * weight_u8.shape[-1]
        if k % _K_MULTIPLE:
            raise NotImplementedError(f"not served: {self.name} takes K a multiple of {_K_MULTIPLE} (its bf16 weight "
                                      f"repack); {module}.weight has K = {k}")
        weight_u8, scale_u8 = _zero_rows_to_multiple(weight_u8.to(dev), scale_e4m3.to(dev).view(torch.uint8))
        n_stacks = [*n_stacks[:-1], n_stacks[-1] + weight_u8.shape[-2] - n]  # the zero rows join the last shard
        tensors = {"weight": weight_u8.contiguous(),
                   "weight_scale": scale_u8.view(torch.float8_e4m3fn).contiguous(),
                   "weight_scale_2": scale_2_f32.to(dev, torch.float32).contiguous()}
        experts = num_experts or None
        try:
            schema, tensors = ModeloptNvfp4WeightSchema().convert_humming(
                tensors, shape_n_stacks=n_stacks, shape_k_stacks=[k], param_dtype=_PARAM_DTYPE,
                num_experts=experts, device=dev)
            config = prepare_layer_config(shape_n=weight_u8.shape[-2], shape_k=k, weight_schema=schema,
                                          input_schema=None, num_experts=experts, pad_n_to_multiple=_PAD_N,
                                          torch_dtype=_PARAM_DTYPE, device=dev, tensors=tensors)
            config, tensors = prepare_fp16_e8m0_scale(config, tensors)
            out = transform_humming_tensors(config, tensors)
            kind = WeightScale2Type(config.weight_scale_2_type).value
            channel_of = None
            if kind == "channel":  # where each checkpoint column's scale went: humming's own permutation
                channel_of = transform_humming_bias(torch.arange(config.shape_n, dtype=torch.float32, device=dev))
                channel_of = channel_of.to(torch.int64)
        except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the op (HummingError)
            raise _failure("prepare", f"{module} {n}x{k}" + (f" x{num_experts}" if num_experts else ""), exc) \
                from exc
        compute = {"use_batch_invariant": True} if self.batch_invariant else {}
        if num_experts:
            compute["gemm_type"] = _GROUPED
        return HummingWeight(module, n, k, num_experts, config, out["weight"], out["weight_scale"],
                             out.get("weight_scale_2"), kind, channel_of,
                             torch.zeros(_LOCKS, dtype=torch.int32, device=dev),
                             json.dumps(compute, sort_keys=True) if compute else None)

    # ---------------------------------------------------------------- the GEMM
    def _gemm(self, w: HummingWeight, x_bf16: Tensor, scale_2: Tensor | None,
              offsets_i32: Tensor | None = None, *, op: str = "gemm") -> Tensor:
        """humming_forward on w -> bf16 [M, w.n] (its zero rows cut off); `op` names the caller in errors."""
        from humming.forward import humming_forward  # noqa: PLC0415

        if x_bf16.dtype != _PARAM_DTYPE or x_bf16.dim() != 2 or x_bf16.shape[1] != w.k:
            raise ValueError(f"x: expected bf16 [M, {w.k}] for {w.module}, got {x_bf16.dtype} {tuple(x_bf16.shape)}")
        if (offsets_i32 is None) != (w.num_experts == 0):
            raise ValueError(f"{w.module}: a stack of {w.num_experts} experts needs offsets_i32 [E+1], a dense "
                             "linear none")
        try:
            y = humming_forward(w.config, inputs=x_bf16.contiguous(), weight=w.weight, weight_scale=w.weight_scale,
                                weight_scale_2=scale_2, locks=w.locks, expert_layout=offsets_i32,
                                compute_config=w.compute_config)
        except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the op (HummingError)
            shape = f"{w.module} M={x_bf16.shape[0]} N={w.n} K={w.k}" + (f" x{w.num_experts}" if w.num_experts else "")
            raise _failure(op, shape, exc) from exc
        return y if y.shape[-1] == w.n else y[:, :w.n]

    def _scale_2_times(self, w: HummingWeight, global_dec_f32: Tensor) -> Tensor:
        """w's weight_scale_2 with the activations' global decode scale folded in ([1] dense, [E] grouped)."""
        g = global_dec_f32.to(torch.float32).reshape(-1)
        if w.scale_2_kind == "tensor":
            return w.weight_scale_2 * g
        if w.scale_2_kind == "channel":
            col = g.reshape(-1, 1) if w.num_experts else g
            return (w.weight_scale_2.to(torch.float32) * col).to(w.weight_scale_2.dtype)
        raise NotImplementedError(f"{self.name}: {w.module} has no weight_scale_2 (humming folded it into bf16 group "
                                  "scales), so the NVFP4 boundary's global scale has nowhere exact to go")

    # ---------------------------------------------------------------- ops
    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        """NVFP4 boundary activations decoded exactly to bf16, x the prepared weight (module docstring: W4A4 math)."""
        w = _as_weight(w, dense=True)
        return self._gemm(w, nvfp4_act_to_bf16(a.packed_u8, a.sf_swizzled_u8), self._scale_2_times(w, a.global_dec_f32),
                          op="dense_gemm")

    def grouped_gemm(self, a: QuantizedAct, offsets_i32: Tensor, experts: object, *,
                     layer: str) -> Tensor | tuple[Tensor, Tensor]:
        """Grouped NVFP4 rows decoded exactly to bf16, x the prepared stack: l1 -> (gate, up) bf16 [R, I] (one
        GEMM over w1|w3), l2 -> y bf16 [R, H]."""
        if not isinstance(experts, HummingExperts):
            raise TypeError(f"experts: expected what {self.name}.prepare_experts returns, got {type(experts).__name__}")
        if layer not in ("l1", "l2"):
            raise ValueError(f"layer={layer!r}: expected 'l1' or 'l2'")
        w = experts.w13 if layer == "l1" else experts.w2
        x = grouped_nvfp4_act_to_bf16(a.packed_u8, a.sf_swizzled_u8, offsets_i32)
        y = self._gemm(w, x, self._scale_2_times(w, a.global_dec_f32), offsets_i32, op=f"grouped_gemm {layer}")
        if layer == "l2":
            return y
        return y[:, :experts.intermediate], y[:, experts.intermediate:]

    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """x [M, K] bf16 -> bf16 [M, N], W4A16 (input_dec_scale_f32 has no role: activations are not quantized)."""
        w = _as_weight(w, dense=True)
        return self._gemm(w, x_bf16, w.weight_scale_2, op="dense_linear")

    def moe_block(self, x_bf16: Tensor, router: object, experts: object, *, swiglu_limit: float | None,
                  weight_placement: str, act_scale: str, token_ids_i64: Tensor | None = None,
                  num_valid_tokens_i32: Tensor | None = None) -> Tensor:
        """The routed MoE block, W4A16: torch routing (fp32 logits, the spec's scoring, bias or hash table, top-k,
        renormalised weights x routed_scaling_factor), a stable sort by expert, experts_w4a16 (humming's L1, the
        clamped SwiGLU, humming's L2) and a combine in slot order in float32. act_scale has no role (W4A16)."""
        if not isinstance(router, HummingRouter) or not isinstance(experts, HummingExperts):
            raise TypeError(f"{self.name}.moe_block: expected what prepare_router / prepare_experts return")
        if weight_placement not in _PLACEMENTS:
            raise ValueError(f"weight_placement={weight_placement!r}: expected one of {_PLACEMENTS}")
        if num_valid_tokens_i32 is not None:
            raise NotImplementedError(f"{self.name}: moe_block takes no valid-token count")
        ids, weights = _route(x_bf16, router, token_ids_i64)
        t, k = ids.shape
        num_experts = experts.w13.num_experts
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True).indices                      # expert-sorted rows, token-major inside
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0, dtype=torch.int32)))
        row_weight = weights.reshape(-1)[order] if weight_placement == "before_w2" else None
        y_rows = experts_w4a16(self, x_bf16[order // k], offsets, experts, swiglu_limit=swiglu_limit,
                               row_weight_f32=row_weight)
        y_pairs = torch.empty_like(y_rows)
        y_pairs[order] = y_rows
        y = y_pairs.reshape(t, k, -1).to(torch.float32)
        if weight_placement == "after_w2":
            y = y * weights.unsqueeze(-1)
        return y.sum(dim=1).to(torch.bfloat16)

    # ---------------------------------------------------------------- decode back (the prepare check)
    def dequantize_prepared(self, prepared: object, *, experts: range | None = None) -> Tensor | dict[str, Tensor]:
        """Prepared weights -> float32 in checkpoint layout: a HummingWeight -> [N, K] ([E, N, K] for a stack);
        HummingExperts -> {"w1", "w3", "w2": [E, N, K]} (w13's first I rows are w1, the next I w3). Humming's GEMM
        on the identity with weight_scale_2 = 1 (each output one exact product: the decoded weight, bf16 holds
        e2m1 x E4M3 exactly), times its weight_scale_2 in float32 (channel scales back in checkpoint order): the
        checkpoint's one rounding. The sign of a zero weight is not observable through a GEMM (its accumulator
        starts at +0): -0 weights come back +0 (module docstring; compare with _common.zero_sign_blind_diff).
        experts: only that range of a stack ([len(experts), N, K]; the chunked prepare check)."""
        if isinstance(prepared, HummingExperts):
            w13 = self.dequantize_prepared(prepared.w13, experts=experts)
            i = prepared.intermediate
            return {"w1": w13[:, :i], "w3": w13[:, i:], "w2": self.dequantize_prepared(prepared.w2, experts=experts)}
        w = _as_weight(prepared, dense=None)
        if experts is not None and not w.num_experts:
            raise ValueError(f"experts={experts}: {w.module} is a dense weight, not an expert stack")
        eye = torch.eye(w.k, dtype=_PARAM_DTYPE, device=w.weight.device)
        ones = None if w.weight_scale_2 is None else torch.ones_like(w.weight_scale_2)
        if not w.num_experts:
            return self._gemm(w, eye, ones, op="dequantize_prepared").to(torch.float32).t() * \
                self._scale_2_checkpoint(w, 0)
        out = []
        for e in range(w.num_experts) if experts is None else experts:  # all rows to e: [0]*(e+1) + [K]*(E-e)
            offsets = torch.full((w.num_experts + 1,), w.k, dtype=torch.int32, device=w.weight.device)
            offsets[:e + 1] = 0
            y = self._gemm(w, eye, ones, offsets, op="dequantize_prepared")
            out.append(y.to(torch.float32).t() * self._scale_2_checkpoint(w, e))
        return torch.stack(out)

    def _scale_2_checkpoint(self, w: HummingWeight, e: int) -> Tensor:
        """Expert e's weight_scale_2 as a float32 column multiplier [N, 1] (or a scalar), checkpoint order."""
        if w.scale_2_kind == "tensor":
            return w.weight_scale_2.reshape(-1)[e if w.num_experts else 0].to(torch.float32)
        if w.scale_2_kind == "channel":
            prepared = w.weight_scale_2[e] if w.num_experts else w.weight_scale_2
            by_column = torch.empty(prepared.shape[-1], dtype=torch.float32, device=prepared.device)
            by_column[w.channel_of] = prepared.to(torch.float32)
            return by_column[:w.n].reshape(-1, 1)
        return torch.ones((), dtype=torch.float32, device=w.weight.device)


class HummingBatchInvariantBackend(HummingBackend):
    """humming with its use_batch_invariant compute option (`--backend
    verify.backends.adapters.humming:HummingBatchInvariantBackend`); the default is what engines run."""

    batch_invariant = True
    accumulator = "fp32 (bf16 wgmma, fp32 accumulate; E4M3 group scales on the decoded weight, weight_scale_2 in " \
                  "the epilogue; use_batch_invariant: no stream-K, one fp32 sum per output, deterministic)"


def experts_w4a16(backend: HummingBackend, rows_bf16: Tensor, offsets_i32: Tensor, experts: HummingExperts, *,
                  swiglu_limit: float | None, row_weight_f32: Tensor | None = None) -> Tensor:
    """The routed experts on expert-sorted bf16 rows [R, H] with offsets int32 [E+1], W4A16: humming's grouped L1
    (gate|up bf16), h = silu(clamp(gate, max=L)) * clamp(up, -L, L) in float32 (times row_weight_f32 [R] when
    given: the before-w2 placement), rounded to bf16, humming's grouped L2 -> bf16 [R, H]."""
    w13, w2 = experts.w13, experts.w2
    gate_up = backend._gemm(w13, rows_bf16, w13.weight_scale_2, offsets_i32, op="moe_block l1")
    gate = gate_up[:, :experts.intermediate].to(torch.float32)
    up = gate_up[:, experts.intermediate:].to(torch.float32)
    if swiglu_limit is not None:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(-swiglu_limit, swiglu_limit)
    h = torch.nn.functional.silu(gate) * up
    if row_weight_f32 is not None:
        h = h * row_weight_f32.to(torch.float32).unsqueeze(-1)
    return backend._gemm(w2, h.to(torch.bfloat16), w2.weight_scale_2, offsets_i32, op="moe_block l2")


def _cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _zero_rows_to_multiple(weight_u8: Tensor, scale_u8: Tensor) -> tuple[Tensor, Tensor]:
    """Packed weight [..., N, K/2] and its scale bytes [..., N, K/16] with zero rows appended (codes 0, scale 0)
    up to N a multiple of _N_MULTIPLE (module docstring: humming's N padding must be a multiple of 8)."""
    n = weight_u8.shape[-2]
    extra = -n % _N_MULTIPLE
    if not extra:
        return weight_u8, scale_u8
    pad = (0, 0, 0, extra)
    return torch.nn.functional.pad(weight_u8, pad), torch.nn.functional.pad(scale_u8, pad)


def _failure(op: str, shape: str, exc: BaseException) -> HummingError:
    """humming's exception as one line: the op and shape, its type and message, and its innermost frame (a bare
    assert has no message; its source line says what failed)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else ""
    text = " ".join(str(exc).split())[:300]
    return HummingError(f"{_NAME}: {op} on {shape} failed inside humming ({type(exc).__name__}"
                        f"{': ' + text if text else ''}{where})")


def _as_weight(w: object, *, dense: bool | None) -> HummingWeight:
    if not isinstance(w, HummingWeight):
        raise TypeError(f"w: expected what {_NAME}.prepare_linear returns, got {type(w).__name__}")
    if dense is not None and dense != (w.num_experts == 0):
        raise ValueError(f"{w.module}: a {'stack' if w.num_experts else 'dense linear'} given where a "
                         f"{'dense linear' if dense else 'stack'} is expected")
    return w


def _route(x_bf16: Tensor, r: HummingRouter, token_ids_i64: Tensor | None) -> tuple[Tensor, Tensor]:
    """ids int64 [T, k], weights float32 [T, k] (module docstring of moe_block): plain torch, no host sync."""
    logits = x_bf16.to(torch.float32) @ r.gate_bf16.to(torch.float32).t()
    if r.spec.scoring == "sqrtsoftplus":
        scores = torch.sqrt(torch.nn.functional.softplus(logits))
    elif r.spec.scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        scores = torch.softmax(logits, dim=-1)
    if r.tid2eid_i64 is not None:
        if token_ids_i64 is None:
            raise ValueError("token_ids_i64: a hash-routed layer needs the token ids")
        ids = r.tid2eid_i64[token_ids_i64]
    else:
        sel = scores if r.bias_f32 is None else scores + r.bias_f32.to(torch.float32)
        ids = sel.topk(r.spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if r.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * r.spec.routed_scaling_factor
