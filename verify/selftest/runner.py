"""selftest(): judge every injected bug with the same verdicts as `verify layer` (verify.run.run_layer's
judge_layer, on the references' tensors computed once per layer, activation scaling and data: they do not
depend on the bug) and score it.

  caught      at least one verdict fails, each on a stage that uses the corrupted op;
  MISBLAMED   some failing verdict belongs to a stage that does not use the corrupted op;
  MISSED      the stages that could see it were judged (a verdict passed or failed) and none failed;
  not applicable  the backend does not serve, or the device / layers cannot show, what the bug corrupts
              (with the reason: the checks' own skip / not-served message, or _cannot_express/_cannot_see).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from references.fp8_act import FP8_ACT_GROUP
from references.layer import RunOptions
from references.stages import STAGES, Op, Stage
from verify.backends import Backend
from verify.checkpoint import Checkpoint, Fp8BlockLinear
from verify.reference_layer import moe_spec_from
from verify.run import run_layer
from verify.selftest.activations import with_tie_rows
from verify.selftest.bugged import Bugged
from verify.selftest.fp8 import fp8_swallowing
from verify.selftest.injectors import INJECTORS, Injector
from verify.selftest.weights import distinct_gate_up_scales, tied_router
from verify.verdicts import LayerCase, judge_layer

__all__ = ["SelftestRow", "selftest", "score", "judged_fp8_linears", "weight_of"]


@dataclass
class SelftestRow:
    bug: str
    facts: str
    status: str          # caught / MISSED / MISBLAMED / not applicable
    caught_by: list[str]
    misblamed: list[str]
    message: str


def selftest(ckpt: Checkpoint, backend: Backend, layers: list[int], *, tokens: int, device: str,
             injectors: tuple[Injector, ...] = INJECTORS, progress=None, on_phase=None) -> list[SelftestRow]:
    """One SelftestRow per injector. progress(row) is called as each injector finishes, on_phase(bug,
    text) as each of its layer runs goes through a phase (for a progress bar)."""
    loaded = {i: ckpt.load_layer(i, device=device) for i in layers}
    cases: dict = {}  # (layer, act, data) -> its _LayerData: the references' side does not depend on the bug
    rows = []
    for inj in injectors:
        why = _cannot_express(inj, backend, device, ckpt.config) or _cannot_see(inj, loaded)
        if why:
            rows.append(SelftestRow(inj.bug, inj.facts, "not applicable", [], [], f"not applicable on {backend.name}: "
                                    f"{why}"))
            if progress is not None:
                progress(rows[-1])
            continue
        bugged = Bugged(backend, inj.bug)
        failed, served, reasons = [], False, []
        for i in loaded:
            key = (i, inj.act, inj.data)
            if key not in cases:
                cases[key] = _layer_data(ckpt, loaded[i], inj, tokens=tokens, device=device)
            layer, case, loss_failures = cases[key]
            verdicts = judge_layer(bugged, case, on_phase=None if on_phase is None else
                                   lambda ph, b=inj.bug, i=i: on_phase(b, f"layer{i} {ph}"))
            seen = [v for v in verdicts if _visible(inj, v) and _of_formats(inj, layer, v.stage)]
            served |= any(v.status in ("pass", "fail") for v in seen)
            reasons += [f"layer{i} {v.stage} {v.check}: {v.message}" for v in seen if v.status not in ("pass", "fail")]
            failed += [(i, v) for v in verdicts + loss_failures if v.status == "fail"]
        status, caught, wrong = score(inj, failed, served)
        if failed:
            first = next((v.message for _, v in failed if inj.blame(_stage(v.stage))), failed[0][1].message)
        elif served:
            first = "every verdict of the corrupted stages passed"
        else:  # say why: the checks' own skip / not-served reason
            first = (f"not applicable on {backend.name} here: {reasons[0]}" if reasons else
                     f"{backend.name} serves none of the stages this bug corrupts here")
        rows.append(SelftestRow(inj.bug, inj.facts, status, caught, wrong, first.splitlines()[0] if first else ""))
        if progress is not None:
            progress(rows[-1])
    return rows


def _layer_data(ckpt: Checkpoint, layer, inj: Injector, *, tokens: int, device: str) -> tuple:
    """(the layer with the data the injector needs, its LayerCase, its failed loss rows): what verify.run.run_layer
    computes before judging, computed once per (layer, act, data) and shared by every injector that needs it."""
    from verify.layer_report import layer_inputs  # noqa: PLC0415 (layer_report imports the CLI machinery)

    if inj.data == "router-ties":
        layer = tied_router(layer)
    if inj.data == "w13-scales":
        layer = distinct_gate_up_scales(layer)
    inputs = layer_inputs(ckpt, layer, tokens=tokens, seed=11, device=device)
    if inj.data == "ties":
        inputs = with_tie_rows(inputs)
    if inj.data == "fp8-swallowing":
        layer, inputs = fp8_swallowing(layer, inputs)
    reference = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=inj.act))  # references only
    case = LayerCase(layer, ckpt.config.schema, inputs.x_attn_bf16, inputs.x_ffn_bf16, inputs.token_ids_i64,
                     reference.emulated, reference.high, RunOptions(act_scale=inj.act),
                     moe_spec_from(ckpt.config) if layer.experts is not None else None)
    return layer, case, reference.loss_failures


def score(inj: Injector, failed: list, served: bool) -> tuple[str, list[str], list[str]]:
    """(status, caught by, misblamed) of one injected bug from its failed verdicts [(layer, Verdict)] and
    whether any verdict that could see it was judged: a failure on a stage outside its blame is MISBLAMED
    even when another stage caught it."""
    caught = sorted({f"{v.stage} {v.check}" for _, v in failed if inj.blame(_stage(v.stage))})
    wrong = sorted({f"layer{i} {v.stage} {v.check}" for i, v in failed if not inj.blame(_stage(v.stage))})
    status = "MISBLAMED" if wrong else "caught" if caught else "MISSED" if served else "not applicable"
    return status, caught, wrong


def _cannot_express(inj: Injector, backend: Backend, device: str, config=None) -> str | None:
    """Why this bug cannot be seen here at all: checks that cannot run on this device or backend (the same
    reasons the stage verdicts give), or a backend that cannot carry the bug."""
    if inj.checks is not None and not inj.checks:  # valid-count-ignored in a build without a valid-count check
        return ("no check of the stage table replays a stage with a valid-token count below capacity (issue 26 "
                "item 4 adds one)")
    if inj.checks is not None and set(inj.checks) <= {"sync", "graph"}:
        if torch.device(device).type != "cuda":
            return f"the {'/'.join(inj.checks)} checks need a CUDA device (running on {device})"
        if not getattr(backend, "graph_safe", True):
            return f"the {backend.name} backend is a reference with host syncs by design (never captured)"
    if inj.bug == "swiglu-clamp-dropped" and config is not None and config.swiglu_limit is None:
        return "the checkpoint has no swiglu_limit (DeepSeek-V3 naming): there is no clamp to drop"
    if inj.bug in ("replay-breaks-when-token-count-changes", "valid-count-ignored") \
            and not getattr(backend, "supports_valid_tokens", False):
        return ("its moe_block takes no valid-token count, so it is never run with fewer tokens than captured "
                "(the moe.block graph probe says so in its message)")
    return None


def judged_fp8_linears(layer) -> list[tuple[str, object]]:
    """(weight role, linear) of every FP8 block-128 linear that a dense (or grouped: wo_a) stage judges in this layer
    (V3's FP8 attention projections have no stage: a bug there changes no verdict)."""
    out = []
    for s in STAGES:
        if s.op in (Op.DENSE_LINEAR, Op.GROUPED_DENSE_LINEAR) and s.kernel and layer.schema in s.schemas \
                and s.unit == "decoder":
            out += [(role, lin) for role in s.weights if isinstance(lin := weight_of(layer, role), Fp8BlockLinear)]
    return out


def _cannot_see(inj: Injector, loaded: dict) -> str | None:
    """Why the layers themselves cannot show this bug (it changes no byte of what the judged stages compute)."""
    judged = [lin for layer in loaded.values() for _, lin in judged_fp8_linears(layer)]
    if inj.bug == "e8m0-scale-read-as-a-number" and not any(lin.scale_ue8m0 is not None for lin in judged):
        return ("no judged FP8 linear of these layers stores E8M0 scale bytes (float32 weight_scale_inv or none): "
                "there is no byte to read as a number")
    if inj.data == "fp8-2d-scale-grid" and not any(min(lin.block_dec_scale_f32().shape[-2:]) > 1 for lin in judged):
        return ("every judged FP8 block-scale grid of these layers is one row or one column: transposed, it holds the "
                "same scales in the same order (no byte changes; shown failing bound on a 2-D grid in "
                "verify/tests/test_fp8_bytes.py)")
    if inj.data == "fp8-swallowing" and not any(
            role == "attn.wq_a" and lin.weight_e4m3.shape[-1] >= 2 * FP8_ACT_GROUP
            for layer in loaded.values() for role, lin in judged_fp8_linears(layer)):
        return ("no judged FP8 attn.wq_a with K >= 256 in these layers to carry the data that exposes a skipped "
                "promotion (a 14-bit accumulator passes the bound on ordinary data)")
    return None


def _of_formats(inj: Injector, layer, stage_name: str) -> bool:
    """The stage's weights in this layer have one of the injector's formats (always true without formats)."""
    if inj.formats is None:
        return True
    return bool(_stage(stage_name).weights) and all(
        getattr(weight_of(layer, role), "format", None) in inj.formats for role in _stage(stage_name).weights)


def weight_of(layer, role: str):
    """A stage table weight role ("attn.wq_a", "shared.w1", ...) in a loaded layer, or None."""
    group, name = role.split(".", 1)
    if group == "attn":
        return getattr(layer, "attention", {}).get(name)
    holder = {"shared": "shared_experts", "dense": "dense_mlp", "experts": "experts"}.get(group)
    return getattr(getattr(layer, holder, None), name, None) if holder else None


def _visible(inj: Injector, v) -> bool:
    """A verdict that could see the bug: a stage using the corrupted op and, for injectors with checks, one
    of those checks."""
    return inj.blame(_stage(v.stage)) and (inj.checks is None or v.check in inj.checks) and v.check not in inj.blind


def _stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)
