"""The table of injected bugs: each Injector names a bug class (NVFP4_FACTS 5b / 6, issue 26), the stages
allowed to fail when it is planted (blame), and what its run needs (act scaling, data, checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from references.stages import Check, Op, Stage

__all__ = ["Injector", "INJECTORS", "VALID_COUNT_CHECKS"]


def _ops(*ops: Op) -> Callable[[Stage], bool]:
    return lambda s: s.op in ops


# the dense linears and V4's grouped wo_a linear: the same prepare_linear and activation quantizers
_DENSE = (Op.DENSE_LINEAR, Op.GROUPED_DENSE_LINEAR)
_WEIGHTS = _ops(*_DENSE, Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK)
# a bug in the weights or a GEMM's output: a stage's activation bytes cannot see it (a backend that
# quantizes without a GEMM passes them, and the bug is then not applicable, not MISSED)
_BYTES = (Check.BYTES.value,)
_NOT_BYTES = tuple(c.value for c in Check if c is not Check.BYTES)  # a bug only the quantizer's bytes can see
_FP8 = ("fp8_block128",)
_NVFP4 = ("nvfp4",)  # bugs in NVFP4 weights or the NVFP4 quantizer: an FP8 or BF16 stage cannot show them
# the checks that replay a stage with a valid-token count below capacity (issue 26 item 4): any check whose
# name says so; none in a build without one (valid-count-ignored is then not applicable, with that reason)
VALID_COUNT_CHECKS = tuple(c.value for c in Check if "valid" in c.value)


@dataclass(frozen=True)
class Injector:
    """bug: name; facts: the NVFP4_FACTS.md section 6 class; blame: stages allowed to fail (the ones
    using the corrupted op); act: the run configuration it needs (static for scale bugs); checks: the
    checks that can see it (None: any; ("sync", "graph") for CUDA-graph killers, which are 'not
    applicable' with the checks' own reason where those checks cannot run); data: what the layer or
    its inputs need for the bug to show ("ties": rows of exact ties, "w13-scales": gate and up with
    different weight_scale_2, "router-ties": two experts with identical gate rows, "fp8-swallowing": the FP8
    wq_a row and token of fp8_swallowing, "fp8-2d-scale-grid": a layer with an FP8 block-scale grid of more than
    one row and column, else not applicable)."""

    bug: str
    facts: str
    blame: Callable[[Stage], bool]
    act: str = "static"
    checks: tuple[str, ...] | None = None
    data: str | None = None
    blind: tuple[str, ...] = ()  # checks that cannot see it: their passing verdicts do not make it served
    formats: tuple[str, ...] | None = None  # weight formats of the stages that can see it (None: any); a layer
    # whose stages have other formats (an NVFP4 layer for an FP8 bug) neither serves nor misses it


INJECTORS: tuple[Injector, ...] = (
    Injector("swapped-nibbles", "nibble order (element 2i in the low nibble)", _ops(*_DENSE),
             formats=_NVFP4),
    Injector("untransposed-scale-matrix", "scale matrix layout", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("n-major-weight-as-k-major", "N-major B passed as K-major", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("k-vs-n-packing", "K vs N packing (codes paired along N)", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("global-scale-inverted", "global-scale direction (encode vs decode)", _WEIGHTS, blind=_BYTES,
             formats=_NVFP4),
    Injector("global-scale-dropped", "weight_scale_2 dropped from alpha", _WEIGHTS, blind=_BYTES, formats=_NVFP4),
    Injector("activation-global-scale-dropped", "activation global scale dropped (output x2400)",
             _ops(*_DENSE), act="dynamic", formats=_NVFP4),
    Injector("one-weight-scale-2-for-gate-and-up", "gate/up with different weight_scale_2, one used",
             _ops(Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK), data="w13-scales"),
    Injector("static-scale-used-as-dynamic", "static input_scale vs dynamic amax", _ops(*_DENSE),
             formats=_NVFP4),
    Injector("global-amax-of-part-of-the-tensor", "cross-CTA amax reduction race (garbage global scale)",
             _ops(*_DENSE), act="dynamic", formats=_NVFP4),
    Injector("e2m1-ties-away-from-zero", "ties rounded away from zero (E2M1 codes)", _ops(*_DENSE),
             act="dynamic", data="ties", formats=_NVFP4),
    Injector("e4m3-scale-ties-away-from-zero", "ties in the E4M3 block scale rounded away", _ops(*_DENSE),
             act="dynamic", data="ties", formats=_NVFP4),
    Injector("gate-up-interleave-halved", "gate/up interleave granularity",
             _ops(Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK)),
    Injector("garbage-in-scale-padding", "swizzle padding read or written", _ops(Op.GROUPED_QUANTIZE, Op.SWIGLU_REQUANT)),
    Injector("nan-in-scale-padding", "swizzle padding read or written", _ops(Op.GROUPED_QUANTIZE, Op.SWIGLU_REQUANT)),
    Injector("swiglu-clamp-dropped", "SwiGLU clamp (swiglu_limit)", _ops(Op.SWIGLU_REQUANT, Op.L1_FUSED)),
    Injector("routing-weight-at-the-wrong-place", "routing weight before vs after w2", _ops(Op.COMBINE)),
    Injector("router-ties-to-higher-id", "router tie rule", _ops(Op.ROUTER, Op.MOE_BLOCK), data="router-ties"),
    # CUDA-graph killers (NVFP4_FACTS 6): only the sync / graph probes can see them, on a CUDA device
    Injector("host-sync-in-a-stage", "a host sync (.item()) in the forward path", _ops(*_DENSE),
             checks=("sync", "graph")),
    Injector("buffer-allocated-inside-capture", "CPU->GPU tensor created in the forward (inside capture)",
             _ops(*_DENSE), checks=("sync", "graph")),
    Injector("stream-cached-at-first-call", "a stream cached at the first call", _ops(*_DENSE),
             checks=("graph",)),
    Injector("replay-breaks-when-token-count-changes", "graph replay that fails only when the token count "
             "changes", _ops(Op.MOE_BLOCK), checks=("graph",)),
    # small, local errors: a verdict that passes any of these is too loose
    Injector("one-output-row-3-percent-off", "a local GEMM error (one row)", _ops(*_DENSE, Op.GROUPED_GEMM),
             blind=_BYTES),
    Injector("every-code-sign-flipped", "E2M1 sign bit", _ops(*_DENSE), formats=_NVFP4),
    Injector("one-clear-winner-swapped", "router: one token, one expert", _ops(Op.ROUTER)),
    # numerics mode and load-time prepare (issue 24): a dense linear that says W4A4 and computes W4A16, and a
    # repack that applies weight_scale_2 twice (prepare fails; without dequantize_prepared, the bound)
    Injector("declares-w4a4-computes-w4a16", "numerics mode: W4A16 computed where W4A4 is declared",
             _ops(*_DENSE), blind=_BYTES, formats=_NVFP4),
    Injector("prepare-scale-applied-twice", "load-time repack applying weight_scale_2 twice", _WEIGHTS,
             blind=_BYTES, formats=_NVFP4),
    # FP8 block-128 linears (NVFP4_FACTS 5b): the activation quantizer's bytes, the weight's scales, the accumulator
    Injector("fp8-ue8m0-scale-rounded-down", "FP8 1x128 activation UE8M0 scale rounded down, not up",
             _ops(*_DENSE), act="dynamic", blind=_NOT_BYTES, formats=_FP8),
    Injector("e8m0-scale-read-as-a-number", "FP8 weight E8M0 scale bytes read as numbers (b, not 2^(b-127))",
             _ops(*_DENSE), act="dynamic", blind=_BYTES, formats=_FP8),
    Injector("fp8-scale-grid-transposed", "FP8 weight block-scale grid transposed", _ops(*_DENSE),
             act="dynamic", blind=_BYTES, data="fp8-2d-scale-grid", formats=_FP8),
    Injector("fp8-promotion-skipped", "FP8 GEMM: 14-bit accumulator never promoted, promotion every 128 declared",
             _ops(*_DENSE), act="dynamic", blind=_BYTES, data="fp8-swallowing", formats=_FP8),
    # GPU-kernel bug classes (issue 26 item 8), as the effect each has on an op's output
    Injector("barrier-dropped", "GPU kernel: a barrier dropped (a tile's rows 8..15 stale: rows 0..7 again)",
             _ops(Op.GROUPED_GEMM)),
    Injector("tile-mask-off-by-one", "GPU kernel: K-tail mask off by one (the last K element never read)",
             _ops(*_DENSE, Op.GROUPED_GEMM), blind=_BYTES),
    Injector("wrong-experts-scale", "GPU kernel: expert e reads expert e+1's block scales and weight_scale_2",
             _ops(Op.GROUPED_GEMM, Op.L1_FUSED, Op.MOE_BLOCK), blind=_BYTES),
    Injector("scale-padding-not-zero-filled", "GPU kernel: scale padding left as an earlier launch wrote it "
             "(0x38, a plausible scale)", _ops(*_DENSE, Op.GROUPED_QUANTIZE, Op.SWIGLU_REQUANT)),
    Injector("alpha-applied-twice", "GPU kernel: alpha (global dec x weight_scale_2) applied in the epilogue and "
             "again (a pure factor)", _ops(*_DENSE), blind=_BYTES),
    Injector("cast-before-scale", "GPU kernel: fp16 epilogue cast before alpha (overflow past 65504)",
             _ops(*_DENSE), blind=_BYTES),
    Injector("valid-count-ignored", "GPU kernel: the MoE block's valid-token count ignored (padding rows routed)",
             _ops(Op.MOE_BLOCK), checks=VALID_COUNT_CHECKS),
    Injector("gate-scale-applied-twice", "gate weight_scale_2 applied twice (a per-expert factor on moe.l1's gate)",
             _ops(Op.GROUPED_GEMM)),
    Injector("row-depends-on-the-batch", "GPU kernel: a split chosen by M (row 0's bits depend on the batch)",
             _ops(*_DENSE), act="dynamic", blind=_BYTES),
    Injector("path-of-a-middle-batch-size", "GPU kernel: another path (K split) for 3 <= M <= 8, one bf16 ulp off "
             "there; a row alone and the whole batch are right (the sm90 dense NVFP4 GEMM's defect class)",
             _ops(*_DENSE), checks=("batch",)),
    Injector("stage-output-scaled-x2", "a scale factor x2 on one stage (cosine 1: the bound / norm ratio sees it)",
             _ops(Op.COMBINE)),
)
