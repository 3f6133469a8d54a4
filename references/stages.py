"""The stage table: every stage of a DeepSeek-V4 (and V3) decoder layer, in one place.

The stage is the unit of the suite (DESIGN.md "Stages"). Each row names a stage, the backend
op that computes it, the stage whose output feeds it (teacher forcing: a kernel gets the
reference's input to its stage), the checkpoint weight roles it reads, the checks that judge
it, and the reference tensors it produces. The reference layer (references.layer), the backend
adapters and verdicts (verify.backends, verify.verdicts), reports, golden files and pytest
ids all take stage names from here; nothing else spells them.

Reference tensors: a stage without `parts` produces the tensor named like the stage; with parts,
one tensor per part, `f"{stage}.{part}"` (moe.l1 -> moe.l1.gate, moe.l1.up). Emulated mode adds
the quantized bytes of a quantization stage under `f"{stage}.{field}"` (QUANT_FIELDS).

Inputs named `input.*` are the layer's inputs: the attn_norm / ffn_norm outputs (decoder layers); the
MTP block's enorm(embedding) and hnorm(hidden) (MTP units).

Units: a row's `unit` says which kind of unit has it: "decoder" (a decoder layer) or "mtp" (DeepSeek-V4's
MTP block `mtp.{j}.*`, references.mtp). verify.verdicts.model.applicable_stages keeps the rows of the
unit it judges, so decoder layers never get MTP rows and MTP blocks only get theirs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Op", "Check", "Stage", "STAGES", "stage", "stage_names", "QUANT_FIELDS", "INPUT_ATTN", "INPUT_FFN",
    "LOSS_STAGES", "MOE_STAGES", "DENSE_LINEAR_STAGES", "ATTN_STAGES", "SHARED_STAGES", "DENSE_MLP_STAGES",
    "ROUTER", "DISPATCH", "MOE_ACT_QUANT", "MOE_L1", "MOE_SWIGLU", "MOE_REQUANT", "MOE_L1_FUSED", "MOE_L2",
    "MOE_COMBINE", "MOE_OUT", "MOE_BLOCK", "SHARED_EXPERT", "DENSE_MLP", "ATTN_WQ_A", "ATTN_WKV", "ATTN_Q_NORM",
    "ATTN_KV_NORM", "ATTN_WQ_B", "ATTN_WO_A", "ATTN_WO_B", "INDEXER_WQ_B", "MOE_BLOCK_STAGES", "FUSED_INPUT_ROLES",
    "UNITS", "INPUT_MTP_E", "INPUT_MTP_H", "MTP_STAGES", "MTP_E_PROJ", "MTP_H_PROJ", "MTP_X_FFN", "MTP_EXPERTS_L1",
    "MTP_EXPERTS_SWIGLU", "MTP_EXPERTS_L2",
]


class Op(enum.Enum):
    """The backend protocol's ops (verify.backends), one name per computation."""

    PREPARE = "prepare"                    # checkpoint bytes -> the backend's operands (host, once per layer)
    QUANTIZE = "quantize"                  # dense activation quantization (static or dynamic global scale)
    QUANTIZE_FP8 = "quantize_fp8"          # FP8 E4M3 per-token 1x128 activation quantization (FP8 block-128 linears)
    GROUPED_QUANTIZE = "grouped_quantize"  # expert-sorted rows, one global scale per expert
    DENSE_GEMM = "dense_gemm"              # NVFP4 x NVFP4 -> bf16
    GROUPED_GEMM = "grouped_gemm"          # expert-sorted NVFP4 rows x expert stack
    SWIGLU_REQUANT = "swiglu_requant"      # clamped SwiGLU -> bf16 h, then NVFP4 requantization of h
    L1_FUSED = "l1_fused"                  # grouped L1 GEMM + SwiGLU + requant in one kernel
    ROUTER = "router"                      # logits, score, top-k / hash, renormalised weights
    DISPATCH = "dispatch"                  # token-expert pairs -> expert-sorted rows + offsets
    COMBINE = "combine"                    # routing-weighted sum of L2 rows per token
    DENSE_LINEAR = "dense_linear"          # quantize + dense GEMM, one capturable call
    # DeepSeek-V4's attention output projection wo_a: x [T, g*d] quantized once as a whole, group gi's columns x
    # row block gi of the one checkpoint linear [g*r, d] -> [T, g*r] (einsum "tgd,grd->tgr"); one capturable call
    GROUPED_DENSE_LINEAR = "grouped_dense_linear"
    # MXFP4 experts (DeepSeek-V4's MTP block), W4A8: expert-sorted bf16 rows quantized FP8 1x128 (UE8M0, rounded
    # up) in the call, x the MXFP4 stack (E2M1, E8M0 per 32 along K) -> bf16; one capturable call
    GROUPED_LINEAR_MXFP4 = "grouped_linear_mxfp4"
    MOE_BLOCK = "moe_block"                # router -> ... -> combine, one capturable call
    REFERENCE = "reference"                # computed by the reference layer only (norms, sums)


class Check(enum.Enum):
    """What a verdict compares (DESIGN "Verdicts")."""

    BYTES = "bytes"            # quantized bytes equal the emulator's (codes, scales, global scale)
    PREPARE = "prepare"        # the backend's prepared weights decoded back equal the checkpoint's dequantized ones
    BOUND = "bound"            # every element within the rigorous accumulation bound (ratio <= 1)
    MODE = "mode"              # GEMM: the numerics mode the output matches (references.modes) is the declared one
    ROUNDING = "rounding"      # elementwise: within the output dtype's rounding of the exact result
    IDS = "ids"                # router expert ids equal, near-ties reported
    WEIGHTS = "weights"        # router weights within the fp32 bound
    EXACT = "exact"            # integer outputs identical (dispatch)
    INTERVAL = "interval"      # fused stage: each code from some value the upstream bound allows
    BATCH = "batch"            # a token's bits do not depend on the other tokens or on M
    PADDING = "padding"        # the GEMM never reads scale padding: 0xFF / 0x7F there change no output bit
    VALID = "valid"            # a valid-token count below capacity: valid rows bit-equal to a call on them alone,
    #                            nothing (scales, amax) taken from the garbage rows past the count
    SYNC = "sync"              # no host synchronization in the stage
    GRAPH = "graph"            # captured once, replayed on mutated inputs: bit-equal to eager


SHARED_EXPERT, DENSE_MLP = "shared", "dense"  # name prefixes of the gated-MLP stages (same stages, two places)
INPUT_ATTN = "input.x_attn"
INPUT_FFN = "input.x_ffn"
INPUT_MTP_E = "input.mtp_e"  # the MTP block's enorm(embedding of token t+1)
INPUT_MTP_H = "input.mtp_h"  # the MTP block's hnorm(hidden state of token t)
UNITS = ("decoder", "mtp")
QUANT_FIELDS = ("packed_u8", "sf_u8", "global_dec_f32")


@dataclass(frozen=True)
class Stage:
    """One row of the table. `weights`: checkpoint roles relative to the layer (attn.wq_a,
    experts.w1, shared.w2, router.gate ...). `loss`: emulated-vs-high metrics are reported for
    its reference tensors. `kernel`: a backend verdict judges it (else the reference only)."""

    name: str
    op: Op
    input: str
    weights: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    parts: tuple[str, ...] = ()
    loss: bool = True
    kernel: bool = True
    schemas: tuple[str, ...] = ("deepseek_v4", "deepseek_v3")
    unit: str = "decoder"

    def tensor(self, part: str | None = None) -> str:
        """The reference tensor name of this stage (or of one of its parts / quantized fields)."""
        return self.name if part is None else f"{self.name}.{part}"

    def act_quant(self, field: str) -> str:
        """The emulated quantized activations a dense linear stage feeds its GEMM (QUANT_FIELDS)."""
        return f"{self.name}.act_quant.{field}"

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(self.tensor(p) for p in self.parts) if self.parts else (self.name,)


_B, _R, _Q = (Check.BOUND,), (Check.ROUNDING,), (Check.BYTES,)
_V4 = ("deepseek_v4",)
# a dense linear: its activation quantization's bytes, its prepared weights, the GEMM's bound and numerics mode,
# batch invariance, graph safety
_GEMM = (Check.BYTES, Check.PREPARE, Check.BOUND, Check.MODE, Check.BATCH, Check.PADDING, Check.SYNC, Check.GRAPH)
_PROBES = (Check.SYNC, Check.GRAPH)  # on CUDA: host-sync probe and CUDA-graph replay of the stage's op
# the grouped linear wo_a: a dense linear's checks but padding (the op takes bf16 and quantizes inside the call, so
# no NVFP4 boundary activation exists whose scale padding the check could fill)
_GROUPED_LINEAR = tuple(c for c in _GEMM if c is not Check.PADDING)
_GROUPED = (Check.PREPARE, Check.BOUND, Check.MODE, Check.BATCH, Check.PADDING, *_PROBES)


def _linear(name: str, input_: str, role: str, *, schemas=_V4, unit: str = "decoder") -> Stage:
    return Stage(name, Op.DENSE_LINEAR, input_, (role,), _GEMM, schemas=schemas, unit=unit)


# the MTP block's MXFP4 experts: the bytes of their FP8 1x128 activations (W4A8), the bound, batch invariance and
# graph safety; no padding check: MXFP4 scales are linear [N, K/32] and the FP8 activation scales [M, K/128],
# neither has padding
_MXFP4_GROUPED = (Check.BYTES, Check.BOUND, Check.BATCH, *_PROBES)


STAGES: tuple[Stage, ...] = (
    # ---- attention projections (DeepSeek-V4)
    _linear("attn.wq_a", INPUT_ATTN, "attn.wq_a"),
    _linear("attn.wkv", INPUT_ATTN, "attn.wkv"),
    Stage("attn.q_norm", Op.REFERENCE, "attn.wq_a", ("attn.q_norm",), kernel=False, schemas=_V4),
    Stage("attn.kv_norm", Op.REFERENCE, "attn.wkv", ("attn.kv_norm",), kernel=False, schemas=_V4),
    _linear("attn.wq_b", "attn.q_norm", "attn.wq_b"),
    # the indexer's query projection reads the same q_norm output (layers whose checkpoint stores
    # attn.indexer.wq_b only: verify.verdicts.model.applicable_stages skips it elsewhere)
    _linear("indexer.wq_b", "attn.q_norm", "indexer.wq_b"),
    # wo_a per output group on the wq_b output, the stand-in for the attention core's (references.layer)
    Stage("attn.wo_a", Op.GROUPED_DENSE_LINEAR, "attn.wq_b", ("attn.wo_a",), _GROUPED_LINEAR, schemas=_V4),
    _linear("attn.wo_b", "attn.wo_a", "attn.wo_b"),
    # ---- routed experts
    Stage("router", Op.ROUTER, INPUT_FFN, ("router.gate",), (Check.IDS, Check.WEIGHTS, *_PROBES),
          parts=("logits", "scores", "ids", "weights"), loss=False),
    Stage("moe.dispatch", Op.DISPATCH, "router", (), (Check.EXACT, *_PROBES), loss=False),
    Stage("moe.act_quant", Op.GROUPED_QUANTIZE, INPUT_FFN, ("experts.w1", "experts.w3"), (*_Q, *_PROBES)),
    Stage("moe.l1", Op.GROUPED_GEMM, "moe.act_quant", ("experts.w1", "experts.w3"), _GROUPED,
          parts=("gate", "up")),
    Stage("moe.swiglu", Op.SWIGLU_REQUANT, "moe.l1", (), _R),  # one op with moe.requant: probed there
    Stage("moe.requant", Op.SWIGLU_REQUANT, "moe.swiglu", ("experts.w2",), (*_Q, *_PROBES)),
    Stage("moe.l1_fused", Op.L1_FUSED, "moe.act_quant", ("experts.w1", "experts.w3", "experts.w2"),
          (Check.INTERVAL, *_PROBES), loss=False),
    Stage("moe.l2", Op.GROUPED_GEMM, "moe.requant", ("experts.w2",), _GROUPED),
    Stage("moe.combine", Op.COMBINE, "moe.l2", (), (*_B, *_PROBES)),
    # ---- shared expert (a dense gated MLP on x_ffn)
    Stage(f"{SHARED_EXPERT}.l1", Op.DENSE_LINEAR, INPUT_FFN, ("shared.w1", "shared.w3"), _GEMM, parts=("gate", "up")),
    Stage(f"{SHARED_EXPERT}.swiglu", Op.REFERENCE, f"{SHARED_EXPERT}.l1", (), kernel=False),
    Stage(f"{SHARED_EXPERT}.l2", Op.DENSE_LINEAR, f"{SHARED_EXPERT}.swiglu", ("shared.w2",), _GEMM),
    Stage("moe.out", Op.REFERENCE, "moe.combine", (), kernel=False),
    # ---- the whole MoE block as one call
    Stage("moe.block", Op.MOE_BLOCK, INPUT_FFN, ("router.gate", "experts.w1", "experts.w3", "experts.w2"),
          (Check.BATCH, Check.BOUND, Check.VALID, Check.SYNC, Check.GRAPH), loss=False),
    # ---- DeepSeek-V3 first_k_dense_replace layers: a plain gated MLP
    Stage(f"{DENSE_MLP}.l1", Op.DENSE_LINEAR, INPUT_FFN, ("dense.w1", "dense.w3"), _GEMM, parts=("gate", "up"),
          schemas=("deepseek_v3",)),
    Stage(f"{DENSE_MLP}.swiglu", Op.REFERENCE, f"{DENSE_MLP}.l1", (), kernel=False, schemas=("deepseek_v3",)),
    Stage(f"{DENSE_MLP}.l2", Op.DENSE_LINEAR, f"{DENSE_MLP}.swiglu", ("dense.w2",), _GEMM, schemas=("deepseek_v3",)),
    # ---- DeepSeek-V4's MTP block (unit "mtp"; references.mtp): FP8 block-128 projections e_proj / h_proj (the
    # checks of every FP8 linear; padding: FP8 activations have none, the verdict says so), their normalized sum
    # (the experts' input, the MTP attention not emulated), then the MXFP4 routed experts, W4A8 (every token
    # through every stored expert: routing is not part of these rows)
    _linear("mtp.e_proj", INPUT_MTP_E, "mtp.e_proj", unit="mtp"),
    _linear("mtp.h_proj", INPUT_MTP_H, "mtp.h_proj", unit="mtp"),
    Stage("mtp.x_ffn", Op.REFERENCE, "mtp.h_proj", ("mtp.ffn_norm",), kernel=False, schemas=_V4, unit="mtp"),
    Stage("mtp.experts.l1", Op.GROUPED_LINEAR_MXFP4, "mtp.x_ffn", ("mtp.experts.w1", "mtp.experts.w3"),
          _MXFP4_GROUPED, parts=("gate", "up"), schemas=_V4, unit="mtp"),
    Stage("mtp.experts.swiglu", Op.REFERENCE, "mtp.experts.l1", (), kernel=False, schemas=_V4, unit="mtp"),
    Stage("mtp.experts.l2", Op.GROUPED_LINEAR_MXFP4, "mtp.experts.swiglu", ("mtp.experts.w2",), _MXFP4_GROUPED,
          schemas=_V4, unit="mtp"),
)

_BY_NAME = {s.name: s for s in STAGES}
if len(_BY_NAME) != len(STAGES):
    raise RuntimeError("references.stages: duplicate stage names")
if any(s.unit not in UNITS for s in STAGES):
    raise RuntimeError(f"references.stages: a row's unit is not one of {UNITS}")


def stage(name: str) -> Stage:
    """The table row of `name`; KeyError naming the known stages otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"stage {name!r}: not in the stage table ({', '.join(_BY_NAME)})") from None


def stage_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


ROUTER, DISPATCH = stage("router"), stage("moe.dispatch")
MOE_ACT_QUANT, MOE_L1, MOE_SWIGLU, MOE_REQUANT = (stage(n) for n in ("moe.act_quant", "moe.l1", "moe.swiglu",
                                                                      "moe.requant"))
MOE_L1_FUSED, MOE_L2, MOE_COMBINE, MOE_OUT, MOE_BLOCK = (stage(n) for n in ("moe.l1_fused", "moe.l2", "moe.combine",
                                                                           "moe.out", "moe.block"))
ATTN_STAGES = tuple(s for s in STAGES if s.name.startswith("attn."))
INDEXER_WQ_B = stage("indexer.wq_b")
SHARED_STAGES = tuple(s for s in STAGES if s.name.startswith(f"{SHARED_EXPERT}."))
DENSE_MLP_STAGES = tuple(s for s in STAGES if s.name.startswith(f"{DENSE_MLP}."))
ATTN_WQ_A, ATTN_WKV, ATTN_Q_NORM, ATTN_KV_NORM, ATTN_WQ_B, ATTN_WO_A, ATTN_WO_B = (
    stage(f"attn.{n}") for n in ("wq_a", "wkv", "q_norm", "kv_norm", "wq_b", "wo_a", "wo_b"))
MOE_STAGES = (ROUTER, DISPATCH, MOE_ACT_QUANT, MOE_L1, MOE_SWIGLU, MOE_REQUANT, MOE_L1_FUSED, MOE_L2, MOE_COMBINE)
DENSE_LINEAR_STAGES = tuple(s for s in STAGES if s.op is Op.DENSE_LINEAR)
MTP_STAGES = tuple(s for s in STAGES if s.unit == "mtp")
MTP_E_PROJ, MTP_H_PROJ, MTP_X_FFN, MTP_EXPERTS_L1, MTP_EXPERTS_SWIGLU, MTP_EXPERTS_L2 = MTP_STAGES
MOE_BLOCK_STAGES = (*MOE_STAGES, MOE_BLOCK)
# weight roles whose linears share one activation quantization (a fused GEMM: one static scale, the max)
FUSED_INPUT_ROLES: tuple[tuple[str, ...], ...] = (
    ATTN_WQ_A.weights + ATTN_WKV.weights,
    *(s.weights for s in DENSE_LINEAR_STAGES if len(s.weights) > 1),
)
# reference tensors whose emulated-vs-high loss is reported, in table order
LOSS_STAGES = tuple(t for s in STAGES if s.loss for t in s.tensors)
