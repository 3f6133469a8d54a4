"""The torch backend: torch's own ops behind the backend protocol, for the ops an engine would run
with them (issue 24 item 4). Registered as "torch"; its variants are module:attr factories.

FP8 block-128 dense linears (DeepSeek's attention, indexer and shared-expert linears), dense_linear:
activations quantized per token in 1x128 groups with torch ops (quantize_fp8; the scale rule the
weight's block scales imply, decided once at prepare: UE8M0 rounded up when every block scale is a
power of two, as V4's E8M0 `.scale`, float32 amax/448 otherwise), then torch's FP8 GEMM under one of
three scalings (`fp8_scaling`):
- "blockwise" ("torch"): one torch.nn.functional.scaled_mm with BlockWise1x128 activation scales and
  BlockWise128x128 weight scales (cuBLASLt's block-scaled FP8 GEMM; torch runs it on compute
  capability 9.x only, cuBLASLt >= 12.9). It takes only M a multiple of 4 (BLOCKWISE_M): measured on an
  NVIDIA H100 80GB HBM3 with torch 2.11.0+cu130 (issue 24), M = 4, 8, 16 ran (N 4096, K 7168; M = 32, 48,
  64, 128, 4096 ran in the tests, the accumulator probe and the V4-Pro layer) and M = 1, 2, 3, 5, 6, 7
  failed (M = 1: torch's ValueError on scale_a's strides; the others CUBLAS_STATUS_NOT_SUPPORTED from
  cuBLASLt's heuristic). M = 9..15 (12 included) were not measured: refused by the same rule until the
  next sweep (M = 1..16) says otherwise. Any other M raises "not served" with that sentence, never padded
  out of sight, so a row alone (the batch check, the probe's M = 1 paths) reads "not served".
  torch 2.13's CPU scaled_mm refuses the block-wise recipes ("Invalid scaling configuration"); it runs
  TensorWise and RowWise, with bfloat16 or float32 output, accumulating in float32 (measured: 24 bits,
  round to nearest).
- "rowwise" (`rowwise`): one scaled_mm per 128-K group with RowWise scales (the group's activation
  scale per token, its weight block scale per output row), float32 out, the groups summed in
  float32: the DeepSeek block math from per-row GEMMs. CUDA compute capability >= 8.9, and the CPU
  (torch's CPU scaled_mm, any M). On compute capability 9.x M = 1 is not served (ROWWISE_M1): on the
  same H100 / torch 2.11.0+cu130, cublasLtMatmul returned CUBLAS_STATUS_NOT_SUPPORTED at M = 1 (N 128
  and 256, K 128 per group) while M = 5, 8, 16, 48 ran; M = 2, 3, 4, 6, 7 were not measured there (served
  here until the next sweep), nor was any other CUDA device.
- "tensorwise" (`tensorwise`): one scaled_mm per 128-K group with TensorWise scales of 1, float32
  out, times the float32 product of the two group scales, summed in float32. CUDA >= 8.9 and CPU. On the
  H100 above it ran M = 1, 5 and 48 (nothing it was given failed): the variant to take for a single token.
Each declares its FP8 accumulator for the device it is made for (the `device` argument the registry
passes; verify accumulator measures it and refuses another declaration): on CUDA the FP8 tensor
cores' narrow accumulator inside a 128-K block (about 14 bits, truncating: fp8_u_acc 2^-13,
NVFP4_FACTS 5b) with float32 promotion every 128 of K (what `verify accumulator --backend torch` measured
on the blockwise paths of the H100 above, M = 32, 64, 128, 4096: 14 bits, truncating, float32 every 128;
`verify layer --backend torch` on the full-size V4-Pro layer 3, 128 tokens: 38 pass, 0 fail, 31 not served,
7 skipped); on the CPU float32 (2^-24) inside the block, float32 across blocks. A static per-tensor FP8
input_scale is not served.

NVFP4 dense_gemm: torch.nn.functional.scaled_mm on float4_e2m1fn_x2 operands with BlockWise1x16
E4M3 scales in the 128x4 swizzled layout and the two global decode scales as TensorWise scales
(alpha = activation global x weight_scale_2, applied by cuBLASLt): Blackwell (compute capability
10.x) only. torch has no NVFP4 activation quantizer, so quantize (and the dense NVFP4 stages that
need it) is not served; the op tests and the accumulator probe judge the GEMM on given activations.

Router, dispatch and combine, where an engine writes them in torch: float32 logits (x.float() @ W^T),
sqrt(softplus) / sigmoid / softmax scores, torch.topk over score + bias (or the hash table; V3
group-limited top-k), renormalised weights x routed_scaling_factor (torch.topk leaves the order of exact
ties unspecified: on the CPU it can keep the higher id where the references keep the lower, so an exact
tie fails the router's ids verdict, and selftest's router-ties bug, which flips the tie rule, reads MISSED
on it); dispatch by a stable argsort of the
flattened ids (token-major inside an expert) with counts by scatter_add and a cumsum; combine by the
inverse permutation (a scatter), the k rows of a token summed in slot order in float32 (deterministic:
no atomics).

Its own host code prepares every operand from checkpoint bytes (E8M0 block scales built into float32
bits, E4M3 bytes viewed, NVFP4 weight scales swizzled here); it imports nothing of references/ or
kernels/. Graph-safe: no host read and no host-to-device copy in a forward op (combine without top_k
and without weights reads top_k from the rows' slots on the host, as sm90's does; the harness always
passes top_k). Not served: quantize, grouped ops, swiglu_requant, l1_fused, moe_block.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from verify.backends.base import Backend
from verify.backends.protocol import FP8_SCALE_RULES, Dispatched, Fp8QuantizedAct, NumericsMode, Op, QuantizedAct, \
    RoutingOut
from verify.checkpoint import Fp8BlockLinear, Linear, Nvfp4Linear, Router

__all__ = ["TorchBackend", "TorchFp8Linear", "TorchNvfp4Linear", "TorchRouter", "FP8_SCALINGS", "BLOCKWISE_M",
           "ROWWISE_M1", "MEASURED_ON", "rowwise", "tensorwise", "e8m0_bytes_to_f32", "nvfp4_sf_to_swizzled_128x4"]

FP8_SCALINGS = ("blockwise", "rowwise", "tensorwise")
GROUP = 128                     # the FP8 scale group / block along K (and along N for weights)
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4               # DeepSeek's act_quant clamps the group amax at 1e-4 (zero groups)
_F32_EXP_SHIFT = 23
_E8M0_NAN = 0xFF
_E4M3_NAN = 0x7F
U_FP32 = 2.0**-24
U_FP8_TENSOR_CORE = 2.0**-13    # ~14 bits kept inside a 128-K block, truncating (Hopper FP8 MMA, NVFP4_FACTS 5b)

MEASURED_ON = "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130"  # where the M limits below were measured (issue 24)
BLOCKWISE_M = ("not served: torch's block-scaled FP8 GEMM (scaled_mm BlockWise1x128 x BlockWise128x128, cuBLASLt) "
               "takes only M a multiple of 4, and this is M = {m} (measured on an " + MEASURED_ON + ": M = 4, 8, 16 "
               "ran, M = 1, 2, 3, 5, 6, 7 failed: M = 1 with torch's ValueError on scale_a's strides, the others with "
               "CUBLAS_STATUS_NOT_SUPPORTED from cuBLASLt's heuristic; not padded here); the tensorwise variant "
               "(verify.backends.adapters.torch_ops:tensorwise) ran M = 1 and 5 there")
ROWWISE_M1 = ("not served: torch's RowWise FP8 scaled_mm (cuBLASLt, one per 128-K group) fails at M = 1 on compute "
              "capability 9.x (measured on an " + MEASURED_ON + ": cublasLtMatmul returned CUBLAS_STATUS_NOT_SUPPORTED "
              "at M = 1, while M = 5, 8, 16, 48 ran); the tensorwise variant "
              "(verify.backends.adapters.torch_ops:tensorwise) ran M = 1 there")
_NO_NVFP4_QUANTIZER = ("not served: torch has no NVFP4 activation quantizer op (torch's NVFP4 scaled_mm takes "
                       "quantized operands; an engine brings its own quantizer)")
_NOT_SERVED = {op: f"not served: torch ships no NVFP4 MoE op for {op.value} (the torch backend adapts torch's own "
                   "ops only)" for op in
               (Op.GROUPED_QUANTIZE, Op.GROUPED_GEMM, Op.SWIGLU_REQUANT, Op.L1_FUSED, Op.MOE_BLOCK)}
_NOT_SERVED[Op.QUANTIZE] = _NO_NVFP4_QUANTIZER
_NOT_SERVED[Op.GROUPED_DENSE_LINEAR] = (
    "not served: torch: DeepSeek-V4's grouped wo_a linear is not adapted (its prepared FP8 operand holds whole-N "
    "copies per 128-K group and cuBLASLt's padded scale layout, no row-block view per output group)")


def _cc(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


@dataclass(frozen=True)
class TorchFp8Linear:
    """An FP8 block-128 checkpoint linear prepared for torch's scaled_mm.

    weight_e4m3 [N, K] float8_e4m3fn, K-major (the checkpoint's bytes); groups: its 128-K column
    groups, each [N, <=128] contiguous (the per-group variants); block_dec_f32 [ceil(N/128), ceil(K/128)]
    float32 (exact); row_dec_f32 [G, N] float32: each group's block scale repeated over its 128 rows;
    scale_b_blockwise [round_up(G, 4), ceil(N/128)] with strides (1, round_up(G, 4)) (cuBLASLt's
    128x128 operand, K blocks padded to a multiple of 4 with zeros); scale_rule: the activations'."""

    module: str
    weight_e4m3: Tensor
    groups: tuple[Tensor, ...]
    block_dec_f32: Tensor
    row_dec_f32: Tensor
    scale_b_blockwise: Tensor
    scale_rule: str


@dataclass(frozen=True)
class TorchNvfp4Linear:
    """An NVFP4 checkpoint linear for torch's NVFP4 scaled_mm: packed_u8 [N, K/2] (as stored),
    sf_swizzled_e4m3 [round_up(N, 128) * round_up(K/16, 4)] float8_e4m3fn in the 128x4 layout (zero
    padding), global_dec_f32 [1] (weight_scale_2)."""

    module: str
    packed_u8: Tensor
    sf_swizzled_e4m3: Tensor
    global_dec_f32: Tensor


@dataclass(frozen=True)
class TorchRouter:
    """gate_f32 [E, H] (the bf16 gate widened once); bias_f32 [E] or None; tid2eid_i64 [vocab, k] or None;
    the MoeSpec fields the routing reads."""

    gate_f32: Tensor
    bias_f32: Tensor | None
    tid2eid_i64: Tensor | None
    top_k: int
    scoring: str
    routed_scaling_factor: float
    renormalize: bool
    n_group: int | None
    topk_group: int | None


def e8m0_bytes_to_f32(b: Tensor, *, name: str) -> Tensor:
    """UE8M0 bytes (float8_e8m0fnu or uint8) -> float32 2^(b-127), built on the float32 bits (byte 0 is the
    subnormal 2^-127); ValueError naming the tensor for NaN bytes (0xFF) or another dtype."""
    if b.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"{name}: expected F8_E8M0 bytes (float8_e8m0fnu), got {b.dtype}")
    e = b.view(torch.uint8).to(torch.int32)
    nan = int((e == _E8M0_NAN).sum())
    if nan:
        raise ValueError(f"{name}: {nan} NaN E8M0 scale bytes (0xFF) of {e.numel()}")
    bits = torch.where(e > 0, e << _F32_EXP_SHIFT, torch.full_like(e, 1 << (_F32_EXP_SHIFT - 1)))
    return bits.view(torch.float32)


def _powers_of_two(s_f32: Tensor) -> bool:
    """Every value a power of two (or zero): a zero mantissa, or a subnormal with one mantissa bit."""
    bits = s_f32.view(torch.int32)
    mant, subnormal = bits & 0x7FFFFF, (bits & 0x7F800000) == 0
    return bool(((mant == 0) | (subnormal & ((mant & (mant - 1)) == 0))).all())


def nvfp4_sf_to_swizzled_128x4(sf_u8: Tensor) -> Tensor:
    """E4M3 block scales [R, C] (linear) -> the cuBLAS 128x4 layout, flat [round_up(R, 128) * round_up(C, 4)],
    zero padding: byte of (r, c) at ((r//128)*(Cp//4) + c//4)*512 + (r%32)*16 + ((r//32)%4)*4 + c%4."""
    r, c = sf_u8.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    padded = torch.zeros(rp, cp, dtype=torch.uint8, device=sf_u8.device)
    padded[:r, :c] = sf_u8
    # [rp/128, 4 (r//32 % 4), 32 (r%32), cp/4, 4 (c%4)] -> [rp/128, cp/4, 32, 4, 4]
    return padded.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4).reshape(-1)


class TorchBackend(Backend):
    """torch's ops as a backend (module docstring). fp8_scaling: "blockwise", "rowwise" or "tensorwise";
    device: the device it is made for (its accumulator declarations are that device's; None: cuda when
    present, else cpu)."""

    graph_safe = True
    u_acc = U_FP32  # NVFP4 scaled_mm (cuBLASLt, Blackwell) and the float32 combine
    modes = MappingProxyType({"fp8_block": NumericsMode.FP8_BLOCK, "nvfp4": NumericsMode.W4A4})
    not_served = MappingProxyType(_NOT_SERVED)

    def __init__(self, fp8_scaling: str = "blockwise", device: torch.device | str | None = None) -> None:
        if fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"fp8_scaling={fp8_scaling!r}: expected one of {FP8_SCALINGS}")
        self.fp8_scaling = fp8_scaling
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.name = "torch" if fp8_scaling == "blockwise" else f"torch-{fp8_scaling}"
        self.fp8_promotion_interval = GROUP
        if self.device.type == "cuda":
            self.fp8_u_acc = U_FP8_TENSOR_CORE
            fp8 = "FP8 tensor cores, ~14 bits inside a 128-K block (2^-13), float32 every 128"
        else:
            self.fp8_u_acc = U_FP32
            fp8 = "CPU scaled_mm: float32 inside a 128-K block, float32 across blocks"
        self.accumulator = f"float32 (NVFP4 scaled_mm, combine); FP8 {fp8_scaling}: {fp8}"

    # ---------------------------------------------------------------- what it serves here

    def unsupported_reason(self, op: Op, device: torch.device) -> str | None:
        device = torch.device(device)
        why = super().unsupported_reason(op, device)
        if why:
            return why
        if device.type != self.device.type:
            return (f"not served: this {self.name} backend was made for {self.device.type} (its accumulator "
                    f"declaration is that device's); ask for it with the device {device.type}")
        if op is Op.DENSE_LINEAR:
            return self._fp8_gemm_reason(device)
        if op is Op.DENSE_GEMM:
            cc = _cc(device)
            if cc is None or cc[0] != 10:
                here = "a CPU" if cc is None else f"{torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"
                return (f"not served: torch's NVFP4 scaled_mm (float4_e2m1fn_x2, BlockWise1x16) runs on Blackwell "
                        f"(compute capability 10.x) only; this is {here}")
        return None

    def _fp8_gemm_reason(self, device: torch.device) -> str | None:
        if not hasattr(F, "scaled_mm"):
            return f"not served: torch {torch.__version__} has no torch.nn.functional.scaled_mm (torch >= 2.10)"
        cc = _cc(device)
        if self.fp8_scaling == "blockwise":
            if cc is None or cc[0] != 9:
                here = "a CPU" if cc is None else f"{torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"
                return (f"not served: torch's block-scaled FP8 GEMM (BlockWise1x128 x BlockWise128x128, cuBLASLt "
                        f">= 12.9) runs on compute capability 9.x only; this is {here} (the rowwise variant, "
                        "verify.backends.adapters.torch_ops:rowwise, runs here)")
            return None
        if cc is not None and cc < (8, 9):
            return f"not served: torch's FP8 scaled_mm needs compute capability >= 8.9 (this is sm_{cc[0]}{cc[1]})"
        return None

    def fp8_gemm_m_reason(self, m: int, cc: tuple[int, int] | None) -> str | None:
        """Why this scaling's FP8 GEMM does not take M = m rows on a device of compute capability cc (None: the
        CPU), or None. The limits are the ones measured on an H100 (module docstring), refused, never padded:
        blockwise M not a multiple of 4 (it runs on 9.x only); rowwise M = 1 on 9.x."""
        if self.fp8_scaling == "blockwise" and m % 4:
            return BLOCKWISE_M.format(m=m)
        if self.fp8_scaling == "rowwise" and m == 1 and cc is not None and cc[0] == 9:
            return ROWWISE_M1
        return None

    # ---------------------------------------------------------------- prepare (host, once per layer)

    def prepare_linear(self, lin: Linear) -> TorchFp8Linear | TorchNvfp4Linear:
        """FP8 block-128 -> TorchFp8Linear; NVFP4 -> TorchNvfp4Linear; other formats are not served."""
        if isinstance(lin, Fp8BlockLinear):
            return self._prepare_fp8(lin)
        if isinstance(lin, Nvfp4Linear):
            return self._prepare_nvfp4(lin)
        raise NotImplementedError(f"not served: {self.name}: {lin.module} is {lin.format}; its dense ops take FP8 "
                                  "block-128 and NVFP4 weights")

    def _prepare_fp8(self, lin: Fp8BlockLinear) -> TorchFp8Linear:
        w = lin.weight_e4m3
        if w.dim() != 2:
            raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K] dense weight, got shape {tuple(w.shape)}")
        n, k = w.shape
        if n % 16 or k % 16:
            raise NotImplementedError(f"not served: {self.name}: {lin.module} is [{n}, {k}]; torch's scaled_mm needs "
                                      "N and K multiples of 16")
        if (lin.scale_ue8m0 is None) == (lin.scale_inv_f32 is None):
            raise ValueError(f"{lin.module}: expected exactly one of .scale (F8_E8M0) and .weight_scale_inv (F32)")
        if lin.scale_ue8m0 is not None:
            dec = e8m0_bytes_to_f32(lin.scale_ue8m0, name=f"{lin.module}.scale")
        else:
            dec = lin.scale_inv_f32
            if dec.dtype != torch.float32 or not bool((torch.isfinite(dec) & (dec >= 0)).all()):
                raise ValueError(f"{lin.module}.weight_scale_inv: expected finite non-negative float32 block scales")
        g = -(-k // GROUP)
        if tuple(dec.shape) != (-(-n // GROUP), g):
            raise ValueError(f"{lin.module}: block scales {tuple(dec.shape)}, expected {(-(-n // GROUP), g)}")
        w = w.view(torch.float8_e4m3fn).contiguous()
        groups = tuple(w[:, i * GROUP:(i + 1) * GROUP].contiguous() for i in range(g))
        rows = dec.t().repeat_interleave(GROUP, dim=1)[:, :n].contiguous()  # [G, N]
        g4 = -(-g // 4) * 4
        padded = torch.zeros(dec.shape[0], g4, dtype=torch.float32, device=dec.device)
        padded[:, :g] = dec
        return TorchFp8Linear(lin.module, w, groups, dec.contiguous(), rows, padded.t(),
                              "ue8m0_ceil" if _powers_of_two(dec) else "f32")

    def _prepare_nvfp4(self, lin: Nvfp4Linear) -> TorchNvfp4Linear:
        if lin.weight_u8.dim() != 2:
            raise ValueError(f"{lin.module}.weight: expected a 2-D [N, K/2] dense weight, got shape "
                             f"{tuple(lin.weight_u8.shape)}")
        sf = nvfp4_sf_to_swizzled_128x4(lin.weight_scale_e4m3.view(torch.uint8))
        return TorchNvfp4Linear(lin.module, lin.weight_u8.contiguous(), sf.view(torch.float8_e4m3fn),
                                lin.weight_scale_2_f32.to(torch.float32).reshape(1))

    def prepare_router(self, router: Router, spec: object) -> TorchRouter:
        renormalize = spec.renormalize if spec.renormalize is not None else spec.scoring != "softmax"
        bias = None if router.gate_bias_f32 is None else router.gate_bias_f32.to(torch.float32)
        return TorchRouter(router.gate_weight_bf16.to(torch.float32), bias, router.tid2eid_i64, int(spec.top_k),
                           spec.scoring, float(spec.routed_scaling_factor), bool(renormalize), spec.n_group,
                           spec.topk_group)

    # ---------------------------------------------------------------- FP8 activations and GEMMs

    def quantize_fp8(self, x_bf16: Tensor, *, scale_rule: str) -> Fp8QuantizedAct:
        """x [M, K] -> E4M3 bytes [M, K] and per-token 1x128 decode scales (UE8M0 bytes for "ue8m0_ceil",
        float32 for "f32"): s = max(amax, 1e-4) / 448 (rounded up to a power of two on its float32 bits under
        ue8m0_ceil), codes = E4M3(clamp(x / s, +-448)); a NaN in a group makes its scale NaN and its codes
        0x7F; an Inf makes the scale 0xFF / +inf. No host read."""
        codes, s_f32, stored = self._quantize_fp8(x_bf16, scale_rule)
        return Fp8QuantizedAct(codes.view(torch.uint8), stored, scale_rule)

    def _quantize_fp8(self, x: Tensor, scale_rule: str) -> tuple[Tensor, Tensor, Tensor]:
        """(codes float8_e4m3fn [M, K], decode scales float32 [M, G], their stored form)."""
        if scale_rule not in FP8_SCALE_RULES:
            raise ValueError(f"scale_rule={scale_rule!r}: expected one of {FP8_SCALE_RULES}")
        if x.dim() != 2 or x.dtype != torch.bfloat16:
            raise ValueError(f"x_bf16: expected bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}")
        m, k = x.shape
        g = -(-k // GROUP)
        xg = F.pad(x.float(), (0, g * GROUP - k)).view(m, g, GROUP)
        # a 0-d tensor on the device, not a Python scalar: CUDA turns division by a host scalar into a
        # multiplication by its rounded reciprocal, which is not amax / 448 correctly rounded
        e4m3_max = torch.full((), E4M3_MAX, dtype=torch.float32, device=x.device)
        s = torch.clamp(xg.abs().amax(-1), min=AMAX_FLOOR) / e4m3_max      # NaN stays NaN
        stored = s
        if scale_rule == "ue8m0_ceil":
            bits = s.view(torch.int32)
            e = ((bits >> _F32_EXP_SHIFT) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
            e = torch.where(torch.isfinite(s), e, torch.full_like(e, _E8M0_NAN))
            stored = e.to(torch.uint8)
            s = torch.where(e == _E8M0_NAN, torch.full_like(s, float("nan")), (e << _F32_EXP_SHIFT).view(torch.float32))
        y = torch.clamp(xg / s.unsqueeze(-1), min=-E4M3_MAX, max=E4M3_MAX)
        codes = y.to(torch.float8_e4m3fn).view(torch.uint8)
        codes = torch.where(torch.isnan(y), torch.full_like(codes, _E4M3_NAN), codes)
        return codes.view(m, g * GROUP)[:, :k].contiguous().view(torch.float8_e4m3fn), s, stored

    def dense_linear(self, x_bf16: Tensor, w: object, *, input_dec_scale_f32: Tensor | None = None) -> Tensor:
        """FP8 block-128: quantize_fp8 under the weight's scale rule, then the FP8 GEMM of fp8_scaling -> bf16
        [M, N] (module docstring). NVFP4 weights: not served (no NVFP4 quantizer)."""
        if isinstance(w, TorchNvfp4Linear):
            raise NotImplementedError(_NO_NVFP4_QUANTIZER)
        if not isinstance(w, TorchFp8Linear):
            raise TypeError(f"w: expected a prepared TorchFp8Linear, got {type(w).__name__}")
        if input_dec_scale_f32 is not None:
            raise NotImplementedError(f"not served: {self.name}: {w.module} is FP8 block-128 with dynamic per-token "
                                      "1x128 activation scales; a static per-tensor FP8 input_scale is not served")
        m = x_bf16.shape[0]
        why = self.fp8_gemm_m_reason(m, _cc(x_bf16.device))
        if why:
            raise NotImplementedError(why)
        a, s, _ = self._quantize_fp8(x_bf16, w.scale_rule)
        if self.fp8_scaling == "blockwise":
            return F.scaled_mm(a, w.weight_e4m3.t(), s.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                               w.scale_b_blockwise, F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
        y = torch.zeros(m, w.weight_e4m3.shape[0], dtype=torch.float32, device=x_bf16.device)
        one = torch.ones((), dtype=torch.float32, device=x_bf16.device)
        for i, w_g in enumerate(w.groups):  # one GEMM per 128-K group, promoted to float32 in order
            a_g = a[:, i * GROUP:(i + 1) * GROUP].contiguous()
            sa, sb = s[:, i:i + 1].contiguous(), w.row_dec_f32[i:i + 1]
            if self.fp8_scaling == "rowwise":
                y += F.scaled_mm(a_g, w_g.t(), sa, F.ScalingType.RowWise, sb, F.ScalingType.RowWise,
                                 output_dtype=torch.float32)
            else:
                part = F.scaled_mm(a_g, w_g.t(), one, F.ScalingType.TensorWise, one, F.ScalingType.TensorWise,
                                   output_dtype=torch.float32)
                y += part * (sa * sb)
        return y.to(torch.bfloat16)

    def dense_gemm(self, a: QuantizedAct, w: object) -> Tensor:
        """NVFP4 activations x prepare_linear(w)^T -> bf16 [M, N] through torch's NVFP4 scaled_mm (Blackwell)."""
        if not isinstance(w, TorchNvfp4Linear):
            raise NotImplementedError(f"not served: {self.name}: dense_gemm takes NVFP4 weights; FP8 block-128 "
                                      "linears run through dense_linear")
        m, k = a.packed_u8.shape[0], a.k
        rows = -(-m // 128) * 128
        sf_a = a.sf_swizzled_u8[:rows].contiguous().view(torch.float8_e4m3fn).reshape(-1)
        fp4 = torch.float4_e2m1fn_x2
        swz = [F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE]
        recipe = [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise]
        if k != 2 * w.packed_u8.shape[1]:
            raise ValueError(f"a: K={k}, but {w.module} has K={2 * w.packed_u8.shape[1]}")
        return F.scaled_mm(a.packed_u8.view(fp4), w.packed_u8.view(fp4).t(),
                           [sf_a, a.global_dec_f32.to(torch.float32).reshape(())], recipe,
                           [w.sf_swizzled_e4m3, w.global_dec_f32.reshape(())], recipe,
                           swizzle_a=swz, swizzle_b=swz, output_dtype=torch.bfloat16)

    # ---------------------------------------------------------------- routing

    def router(self, x_bf16: Tensor, router: TorchRouter, *, token_ids_i64: Tensor | None = None) -> RoutingOut:
        """x [T, H] -> ids [T, k], weights [T, k] float32 (module docstring)."""
        r = router
        logits = x_bf16.float() @ r.gate_f32.t()
        if r.scoring == "sqrtsoftplus":
            s = torch.sqrt(F.softplus(logits))
        elif r.scoring == "sigmoid":
            s = torch.sigmoid(logits)
        elif r.scoring == "softmax":
            s = torch.softmax(logits, dim=-1)
        else:
            raise NotImplementedError(f"not served: {self.name}: router scoring {r.scoring!r}")
        if r.tid2eid_i64 is not None:
            if token_ids_i64 is None:
                raise ValueError("token_ids_i64: required by a hash-routed layer (tid2eid)")
            ids = r.tid2eid_i64[token_ids_i64].to(torch.int64)
        else:
            biased = s if r.bias_f32 is None else s + r.bias_f32
            if r.n_group and r.n_group > 1:
                biased = self._group_limited(biased, r)
            ids = torch.topk(biased, r.top_k, dim=-1).indices
        w = torch.gather(s, 1, ids)
        if r.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return RoutingOut(ids, w * r.routed_scaling_factor)

    @staticmethod
    def _group_limited(biased: Tensor, r: TorchRouter) -> Tensor:
        """V3: only the topk_group groups with the best group scores (two largest biased scores summed; the
        max without a bias) compete; the others are set to -inf."""
        t, e = biased.shape
        grouped = biased.view(t, r.n_group, e // r.n_group)
        score = grouped.amax(-1) if r.bias_f32 is None else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.topk(score, r.topk_group, dim=-1).indices,
                                                                    True)
        return biased.masked_fill(~keep.repeat_interleave(e // r.n_group, dim=1), float("-inf"))

    def dispatch(self, ids_i64: Tensor, num_experts: int) -> Dispatched:
        """ids [T, k] -> rows sorted by expert (stable argsort: token-major inside an expert), offsets int32
        [E+1] from scatter_add counts. No host read."""
        if not isinstance(ids_i64, Tensor) or ids_i64.dtype != torch.int64 or ids_i64.dim() != 2:
            raise ValueError(f"ids_i64: expected int64 [T, k], got {getattr(ids_i64, 'dtype', type(ids_i64).__name__)} "
                             f"{tuple(getattr(ids_i64, 'shape', ()))}")
        k = ids_i64.shape[1]
        flat = ids_i64.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return Dispatched(order // k, order % k, offsets, k)

    def combine(self, y_rows_bf16: Tensor, d: Dispatched, weights_f32: Tensor | None) -> Tensor:
        """Expert-sorted rows [R, H] -> bf16 [T, H]: rows put back in (token, slot) order by the inverse
        permutation, times the routing weight (float32), summed over the k slots in order, rounded once."""
        r, h = y_rows_bf16.shape
        if weights_f32 is not None:
            k = weights_f32.shape[1]
        elif d.top_k is not None:
            k = d.top_k
        else:
            k = int(d.row_slot_i64.max()) + 1 if r else 1  # a host read: only when the caller gave no top_k
        pair = d.row_token_i64 * k + d.row_slot_i64
        by_pair = torch.empty_like(y_rows_bf16, dtype=torch.float32).index_copy_(0, pair, y_rows_bf16.float())
        terms = by_pair.view(r // k, k, h)
        if weights_f32 is not None:
            terms = terms * weights_f32.to(torch.float32).unsqueeze(-1)
        return terms.sum(1).to(torch.bfloat16)


def rowwise(device: torch.device | str | None = None) -> TorchBackend:
    """The torch backend with per-group RowWise FP8 GEMMs (CPU and CUDA >= 8.9; M = 1 not served on 9.x)."""
    return TorchBackend("rowwise", device)


def tensorwise(device: torch.device | str | None = None) -> TorchBackend:
    """The torch backend with per-group TensorWise FP8 GEMMs, scales applied in float32 (CPU and CUDA >= 8.9;
    any M: M = 1, 5, 48 ran on the H100)."""
    return TorchBackend("tensorwise", device)
