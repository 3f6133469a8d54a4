"""The `prepare` check of the GEMM stages: the backend's prepared weights, decoded back by the backend itself,
equal the checkpoint's dequantized values.

A backend may serve the optional op `dequantize_prepared(prepared)` (verify.backends.base.Backend): it decodes
its own prepared operand (after its repack, interleave, swizzle, scale folding) back to float32 in checkpoint
layout: a prepare_linear result -> [N, K]; a prepare_experts result -> {"w1", "w3", "w2": [E, N, K]}. The
check compares that with the checkpoint weight dequantized by references/ (references.linear.
dequantize_weight_f64: exact in float64), so a repack bug is blamed on prepare, not on the GEMM that reads it.

Exactness: e2m1 x E4M3 block scale is exact in float32 (<= 6 significant bits); times weight_scale_2 (a
float32) it rounds once, and a backend that folds weight_scale_2 into the block scale first rounds once more,
so an element passes when it is within one float32 ulp of the exact value (two roundings of any association)
and is bit-equal wherever the exact value is itself a float32 (zero codes; weight_scale_2 a power of two; FP8
block-128 weights with E8M0 power-of-two scales; BF16 weights): there a 1-ulp difference fails. The metrics
count the bit-equal elements; a failure names the first element, both values, and when every wrong element
is the checkpoint value times one constant, that constant (weight_scale_2 again: "a scale applied twice").
A backend without dequantize_prepared is "not served" with that reason.

Memory: a full-size expert stack decoded whole does not fit a GPU (DeepSeek-V4-Pro: 384 experts x 6144 x 7168
float32 for w13 alone is 67 GB, the checkpoint's float64 values twice that). The expert stacks are therefore
checked a chunk of experts at a time (scan_prepared_experts, plan_expert_chunks: the planned peak of a chunk,
expert_chunk_peak_bytes, within PREPARE_CHUNK_BUDGET_BYTES), on the device where the weights live, through
dequantize_prepared(prepared, experts=range); only each role's StackTally is kept (counts, the first mismatch,
the one-factor detection), so the verdicts and metrics equal the whole-stack comparison's. A backend whose
dequantize_prepared takes no expert range is decoded whole, once (not bounded).

Blame: when a stage's prepared weight differs from the checkpoint (own_weight_if_it_differs), the stage's
bound and mode checks judge the GEMM on the backend's OWN decoded weight (the dense judge): a repack bug then
fails prepare and only prepare, and a GEMM that is also wrong still fails its bound. The grouped stages read
the backend's own stack through an OwnStack (decoded a chunk at a time, only for the experts the routed rows
reach). (The fused L1 and the MoE block keep judging on the checkpoint weights: not done yet.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from references.gemm import half_ulp
from references.linear import Bf16Weight, Fp8Block128Weight, Nvfp4Weight, Weight, dequantize_weight_f64, \
    weight_experts
from references.stages import Stage
from verify.assertions import first_mismatch
from verify.reference_layer import to_reference_weight

__all__ = ["dequantized_by_backend", "check_prepared_weight", "own_weight_if_it_differs", "prepare",
           "ROLES", "PREPARE_CHUNK_BUDGET_BYTES", "StackTally", "OwnStack", "expert_chunk_peak_bytes",
           "plan_expert_chunks", "takes_expert_range", "scan_prepared_experts", "check_prepared_stack",
           "own_stack_if_it_differs", "weight_experts"]

ROLES = ("w1", "w3", "w2")
PREPARE_CHUNK_BUDGET_BYTES = 4 * 2**30  # the planned peak of one chunk of the expert stacks' prepare check
_DECODED_BYTES = 4        # per element: the chunk's decoded float32 values, every role held at once
_DECODE_BYTES = 24        # per element: a backend's transients while it decodes (sm90: int64 nibble indices,
                          # float32 halves, the repeated block scales; humming: its bf16 GEMM output)
_COMPARE_BYTES = 96       # per element of ONE expert's role: the checkpoint's float64 values and the comparison's
                          # float64 / bool temporaries (_mismatches with half_ulp, the bit-equal count)


def dequantized_by_backend(backend: object, prepared: object,
                           experts: range | None = None) -> Tensor | Mapping[str, Tensor]:
    """backend.dequantize_prepared(prepared) (experts: only that range of an expert stack:
    {"w1", "w3", "w2": [len(experts), N, K]}), or NotImplementedError (not served) naming why. A backend whose
    dequantize_prepared takes no expert range decodes the whole stack, then sliced (backward compatible)."""
    fn = getattr(backend, "dequantize_prepared", None)
    if fn is None:
        raise NotImplementedError(f"not served: {getattr(backend, 'name', type(backend).__name__)} has no "
                                  "dequantize_prepared (it cannot decode its prepared weights back)")
    if experts is None:
        return fn(prepared)
    if takes_expert_range(backend):
        return fn(prepared, experts=experts)
    return {role: t[experts.start:experts.stop] for role, t in fn(prepared).items()}


def takes_expert_range(backend: object) -> bool:
    """Whether backend.dequantize_prepared takes `experts=` (a range of an expert stack; the chunked check)."""
    fn = getattr(backend, "dequantize_prepared", None)
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "experts" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------- the comparison, per chunk of experts


@dataclass
class StackTally:
    """What the check keeps of one weight (a dense [N, K] or an expert stack [E, N, K] compared chunk by chunk):
    counts, the first mismatch (global coordinate, both values) and the one-constant-factor detection."""

    shape: tuple[int, ...]
    numel: int = 0
    equal: int = 0
    bad: int = 0
    first: tuple[tuple[int, ...], float, float] | None = None   # (coordinate, prepared, checkpoint)
    ratio: float | None = None      # got / checkpoint of the first mismatch
    one_factor: bool = True         # every mismatch so far is the checkpoint's nonzero value times `ratio`

    def add(self, got: Tensor, exp64: Tensor, offset: int = 0) -> None:
        """Fold in one piece: got float32 and exp64 float64 (same shape, same device); offset: the piece's first
        index along dim 0 in the whole weight (an expert of a stack, a row of a dense weight)."""
        g64 = got.double()
        bad = _mismatches(g64, exp64)
        self.numel += got.numel()
        self.equal += int((got == exp64.float()).sum())  # bit-equal to the float32 nearest the exact value
        n_bad = int(bad.sum())
        if n_bad == 0:
            return
        self.bad += n_bad
        if self.first is None:
            _, coord = first_mismatch(bad)
            glob = (coord[0] + offset, *coord[1:])
            self.first = (glob, float(g64[coord]), float(exp64[coord]))
        self._fold_factor(g64, exp64, bad, n_bad)

    def _fold_factor(self, g64: Tensor, exp64: Tensor, bad: Tensor, n_bad: int) -> None:
        if not self.one_factor:
            return
        sel = bad & (exp64 != 0) & torch.isfinite(g64)
        if int(sel.sum()) != n_bad:
            self.one_factor = False
            return
        r = g64[sel] / exp64[sel]
        if self.ratio is None:
            self.ratio = float(r.reshape(-1)[0])
        self.one_factor = bool(((r - self.ratio).abs() <= 1e-6 * abs(self.ratio)).all())


def _mismatches(g64: Tensor, exp64: Tensor) -> Tensor:
    """Where the backend's value is not the exact one: bit-equal required where the exact value is a float32,
    else within one float32 ulp (module docstring); NaN is a mismatch."""
    exact_f32 = exp64.float().double() == exp64
    allowed = torch.where(exact_f32, torch.zeros_like(exp64), 2 * half_ulp(exp64, torch.float32))
    return ~((g64 - exp64).abs() <= allowed)


def _checked_piece(label: str, got: Tensor, want_shape: tuple[int, ...], where: str = "") -> None:
    __tracebackhide__ = True
    if tuple(got.shape) != want_shape:
        raise AssertionError(f"{label}: dequantize_prepared{where} gave shape {tuple(got.shape)}, the checkpoint layout "
                             f"is {want_shape} ([N, K], experts [E, N, K])")
    if got.dtype != torch.float32:
        raise AssertionError(f"{label}: dequantize_prepared gave {got.dtype}, expected float32")


def _verdict(label: str, tally: StackTally, lin, metrics: dict, key: str) -> str:
    """The tally as metrics and a message (pass) or an AssertionError (fail)."""
    __tracebackhide__ = True
    if tally.numel == 0:
        raise AssertionError(f"{label}: empty weight: nothing compared")
    metrics[f"prepare_bit_equal_{key}"] = tally.equal / tally.numel
    metrics[f"prepare_mismatches_{key}"] = tally.bad
    if tally.first is None:
        rest = tally.numel - tally.equal
        return (f"{label}: {tally.numel} values equal the checkpoint's dequantized ones (" +
                ("all bit-equal)" if rest == 0 else
                 f"{tally.equal} bit-equal, {rest} within the float32 rounding of weight_scale_2)"))
    coord, g, e = tally.first
    raise AssertionError(f"{label} {tally.shape}: {tally.bad}/{tally.numel} prepared values differ from the "
                         f"checkpoint's dequantized ones; first at {coord}: prepared {g:.9g}, "
                         f"checkpoint {e:.9g}" + _factor_note(tally, lin) +
                         " (the backend's prepare, not its GEMM)")


def check_prepared_weight(label: str, got: Tensor, lin, metrics: dict, key: str) -> str:
    """got (float32, checkpoint layout) against the checkpoint linear `lin` dequantized (module docstring), on
    got's device. An expert stack is compared expert by expert (the whole-stack form of check_prepared_stack)."""
    __tracebackhide__ = True
    w = to_reference_weight(lin)
    num = _num_experts(w)
    want = (w.n, w.k) if num is None else (num, w.n, w.k)
    _checked_piece(label, got, tuple(want))
    if got.numel() == 0:
        raise AssertionError(f"{label}: empty weight: nothing compared")
    tally = StackTally(tuple(got.shape))
    if got.dim() == 3:
        for e in range(got.shape[0]):
            exp64 = dequantize_weight_f64(weight_experts(w, range(e, e + 1))).to(got.device)
            tally.add(got[e:e + 1].detach(), exp64, offset=e)
    else:  # row blocks: the float64 comparison of a large dense weight bounded as one expert's is
        exp64 = dequantize_weight_f64(w).to(got.device)
        rows = max(1, PREPARE_CHUNK_BUDGET_BYTES // (2 * w.k * _COMPARE_BYTES))
        for lo in range(0, w.n, rows):
            tally.add(got[lo:lo + rows].detach(), exp64[lo:lo + rows], offset=lo)
    return _verdict(label, tally, lin, metrics, key)


def _num_experts(w: Weight) -> int | None:
    """E of an expert stack [E, N, ...], None for a dense weight."""
    t = w.packed_u8 if isinstance(w, Nvfp4Weight) else w.e4m3_u8 if isinstance(w, Fp8Block128Weight) else w.w
    return t.shape[0] if t.dim() == 3 else None


def _factor_note(tally: StackTally, lin) -> str:
    """'; every differing value is the checkpoint's x 0.00123 (= weight_scale_2: applied twice)' when one constant
    explains all of them."""
    if not tally.one_factor or tally.ratio is None:
        return ""
    r0 = tally.ratio
    note = f"; every differing value is the checkpoint's x {r0:.6g}"
    ws2 = getattr(lin, "weight_scale_2_f32", None)
    if ws2 is not None and ws2.numel() >= 1:
        for w in ws2.reshape(-1).double().unique().tolist():
            if w and abs(r0 - w) <= 1e-6 * abs(w):
                return note + " (= weight_scale_2: the global scale applied twice)"
            if w and abs(r0 * w - 1) <= 1e-6:
                return note + " (= 1 / weight_scale_2: the global scale missing)"
    return note


# ----------------------------------------------------------------------------- expert stacks, bounded in memory


def expert_chunk_peak_bytes(shapes: Mapping[str, tuple[int, int]], experts: int) -> int:
    """The planned peak bytes of one chunk of `experts` experts of the stacks' prepare check (shapes: role ->
    (N, K)): the larger of the decode phase (every role decoded to float32, plus the backend's transients) and
    the compare phase (the decoded chunk held, one expert's role compared at a time in float64)."""
    elems = [n * k for n, k in shapes.values()]
    decode = experts * sum(elems) * (_DECODED_BYTES + _DECODE_BYTES)
    compare = experts * sum(elems) * _DECODED_BYTES + max(elems) * _COMPARE_BYTES
    return max(decode, compare)


def plan_expert_chunks(num_experts: int, shapes: Mapping[str, tuple[int, int]],
                       budget_bytes: int | None = None) -> list[range]:
    """The expert ranges the chunked check decodes one at a time: as many experts per chunk as the budget
    (None: PREPARE_CHUNK_BUDGET_BYTES) holds by expert_chunk_peak_bytes, at least one."""
    budget_bytes = PREPARE_CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    per = 1
    while per < num_experts and expert_chunk_peak_bytes(shapes, per + 1) <= budget_bytes:
        per += 1
    return [range(lo, min(lo + per, num_experts)) for lo in range(0, num_experts, per)]


def scan_prepared_experts(backend: object, prepared: object, lins: Mapping[str, object], *,
                          chunks: list[range] | None = None) -> dict[str, StackTally]:
    """Decode the backend's prepared expert stacks chunk by chunk (plan_expert_chunks; a backend whose
    dequantize_prepared takes no expert range: one chunk, the whole stack) and fold each role's comparison with
    the checkpoint (lins: role -> stack) into its StackTally; each chunk freed before the next. Raises
    NotImplementedError (not served) without dequantize_prepared, AssertionError on a wrong shape / dtype."""
    __tracebackhide__ = True
    refs = {role: to_reference_weight(lin) for role, lin in lins.items()}
    num = _num_experts(next(iter(refs.values())))
    shapes = {role: (w.n, w.k) for role, w in refs.items()}
    if chunks is None:
        chunks = plan_expert_chunks(num, shapes) if takes_expert_range(backend) else [range(num)]
    tallies = {role: StackTally((num, *shapes[role])) for role in lins}
    for r in chunks:
        decoded = dequantized_by_backend(backend, prepared, r)
        for role in lins:
            got = decoded[role]
            _checked_piece(f"experts.{role}", got, (len(r), *shapes[role]), f" (experts {r.start}..{r.stop - 1})")
            for i, e in enumerate(r):  # one expert's float64 comparison at a time
                exp64 = dequantize_weight_f64(weight_experts(refs[role], range(e, e + 1))).to(got.device)
                tallies[role].add(got[i:i + 1].detach(), exp64, offset=e)
        del decoded
    return tallies


def check_prepared_stack(label: str, tally: StackTally, lin, metrics: dict, key: str) -> str:
    """The verdict of one role's scanned stack (scan_prepared_experts): as check_prepared_weight's."""
    __tracebackhide__ = True
    return _verdict(label, tally, lin, metrics, key)


class OwnStack:
    """The backend's own decoded stack of one role, decoded lazily a chunk at a time: own[e] -> float32 [N, K]
    (the chunk holding e decoded on first use, the previous chunk dropped; experts are read in increasing order
    by the grouped GEMM judges, so each chunk is decoded once). shape: (E, N, K)."""

    def __init__(self, backend: object, prepared: object, role: str, shape: tuple[int, int, int],
                 chunks: list[range]) -> None:
        self.backend, self.prepared, self.role, self.shape, self.chunks = backend, prepared, role, shape, chunks
        self._range: range | None = None
        self._values: Tensor | None = None

    def __getitem__(self, e: int) -> Tensor:
        if self._range is None or e not in self._range:
            self._values = None
            self._range = next(r for r in self.chunks if e in r)
            self._values = dequantized_by_backend(self.backend, self.prepared, self._range)[self.role]
        return self._values[e - self._range.start]


def own_stack_if_it_differs(backend: object, prepared: object, tallies: Mapping[str, StackTally] | None,
                            role: str) -> OwnStack | None:
    """The backend's own stack of `role` (an OwnStack, decoded chunk by chunk as the judge reads it) when the
    scan found it differs from the checkpoint's (the prepare check fails it), else None (also when the backend
    has no dequantize_prepared: tallies None)."""
    if tallies is None or tallies[role].bad == 0:
        return None
    num, n, k = tallies[role].shape
    shapes = {r: t.shape[1:] for r, t in tallies.items()}
    chunks = plan_expert_chunks(num, shapes) if takes_expert_range(backend) else [range(num)]
    return OwnStack(backend, prepared, role, (num, n, k), chunks)


def own_weight_if_it_differs(backend: object, prepared: object, lin, role: str | None = None) -> Tensor | None:
    """The backend's decoded prepared weight (float32, checkpoint layout; role: "w1" / "w3" / "w2" of an expert
    stack, decoded whole: the grouped judges use scan_prepared_experts and own_stack_if_it_differs instead)
    when it serves dequantize_prepared and the decoded weight differs from the checkpoint's (the prepare
    check fails it), else None. The GEMM checks of that stage then judge the GEMM on the backend's own weight,
    so a repack bug fails prepare alone (module docstring)."""
    try:
        got = dequantized_by_backend(backend, prepared)
    except NotImplementedError:
        return None
    got = got[role] if role is not None else got
    exp64 = dequantize_weight_f64(to_reference_weight(lin)).to(got.device)
    if tuple(got.shape) != tuple(exp64.shape) or not bool(_mismatches(got.detach().double(), exp64).any()):
        return None
    return got


def prepare(ctx, stage: Stage, out, metrics: dict) -> str:
    """prepare: each weight the stage reads, as the backend decodes its prepared form, equals the checkpoint's.
    out.prepared_weights(ctx) yields (label, key, decoded, lin): decoded a Tensor, or a StackTally of an
    expert stack already compared chunk by chunk (scan_prepared_experts)."""
    __tracebackhide__ = True
    msgs, fails = [], []
    weights = out.prepared_weights(ctx)
    if not weights:  # nothing decoded is nothing compared: never a pass
        raise NotImplementedError(f"not served: {getattr(ctx.backend, 'name', 'the backend')} prepared no weight of "
                                  f"{stage.name} (it has no prepare for it), so there is nothing to decode back")
    for label, key, got, lin in weights:
        try:
            msgs.append(check_prepared_stack(label, got, lin, metrics, key) if isinstance(got, StackTally) else
                        check_prepared_weight(label, got, lin, metrics, key))
        except AssertionError as exc:
            fails.append(str(exc))
    if fails:
        raise AssertionError("; ".join(fails))
    return "; ".join(msgs)
