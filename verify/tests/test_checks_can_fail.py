"""Who checks the checker (issue 26 item 7): every check, probe, scorer and resume rule, weakened.

Each row names a piece of the harness's own logic, a weakening of it measured to pass the rest of the
default suite (a check that compares fewer fields or elements than the boundary carries, compares a thing
with itself, skips one step of its series, measures another path than the one it judges, counts a
misblamed bug as caught, ignores part of a run's configuration when deciding to resume, drops units it
cannot find when merging, returns success whatever it found, shows a later status over a worse one,
tolerates slack, trusts an index entry that names another file), and a known-bad input that the logic
must reject. Two tests per row:
  test_catches_known_bad[row]            the real logic rejects the known-bad input;
  test_weakened_logic_lets_it_through[row]  with the weakening planted (monkeypatch of the logic's own
                                         internals), the same known-bad input gets through.
So the first test is shown load-bearing: it fails exactly when that piece of logic is weakened that way.
Known-bad backends are the emulator with one planted bug (verify.selftest.Bugged, or a small subclass
here), judged stage by stage on the committed fixture through the real judges (judge_layer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import verify.assertions as assertions_mod
import verify.golden as golden_mod
import verify.report.cli as report_cli_mod
import verify.report.document as document_mod
import verify.selftest.runner as runner_mod
import verify.sweep as sweep_mod
import verify.units as units_mod
import verify.verdicts.checks as checks_mod
import verify.verdicts.judges.dense as dense_mod
import verify.verdicts.judges.dispatch as dispatch_mod
import verify.verdicts.judges.l1_fused as l1_fused_mod
import verify.verdicts.judges.mode as mode_mod
import verify.verdicts.judges.prepare as prepare_mod
import verify.verdicts.judges.swiglu_requant as swiglu_mod
import verify.verdicts.judges.valid_count as valid_mod
import verify.verdicts.quantized as quantized_mod
import verify.verdicts.routing as routing_mod
from references.gemm import half_ulp
from references.layer import RunOptions
from references.stages import Check, Op, stage
from verify.backends import EmulatorBackend
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR, RunConfig
from verify.errors import UsageError
from verify.layer_report import layer_inputs
from verify.reference_layer import moe_spec_from, run_reference_layer
from verify.selftest import Bugged, Injector, selftest, with_tie_rows
from verify.selftest.fp8 import fp8_swallowing
from verify.verdicts import LayerCase, judge_layer
from verify.verdicts.checks import Judge
from verify.verdicts.judges import JUDGES

TOKENS = 32


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


_CASES: dict = {}


def _case(ckpt, i: int, act: str, data: str | None = None, device: str = "cpu") -> LayerCase:
    """The teacher-forced case of layer i (the references' emulated and float64 tensors), once per key."""
    key = (i, act, data, device)
    if key not in _CASES:
        layer = ckpt.load_layer(i, device=device)
        inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=11, device=device)
        if data == "ties":
            inputs = with_tie_rows(inputs)
        if data == "fp8-swallowing":
            layer, inputs = fp8_swallowing(layer, inputs)
        options = RunOptions(act_scale=act)
        emulated = run_reference_layer(ckpt, layer, inputs, mode="emulated", options=options)
        high = run_reference_layer(ckpt, layer, inputs, mode="high", options=options)
        _CASES[key] = LayerCase(layer, ckpt.config.schema, inputs.x_attn_bf16, inputs.x_ffn_bf16, inputs.token_ids_i64,
                                emulated, high, options, moe_spec_from(ckpt.config) if layer.experts is not None else None)
    return _CASES[key]


def _fails(ckpt, backend, i: int, act: str, stage_name: str, check: str, data: str | None = None,
           device: str = "cpu") -> bool:
    """The (stage, check) verdict of `backend` on layer i is a failure (it must have been judged)."""
    verdicts = judge_layer(backend, _case(ckpt, i, act, data, device), stages=[stage(stage_name)])
    (v,) = [v for v in verdicts if v.check == check]
    assert v.status in ("pass", "fail"), f"{stage_name} {check} was not judged: {v.status}: {v.message}"
    return v.status == "fail"


# ============================================================================= known-bad backends


class BatchVariant(EmulatorBackend):
    """A dense linear whose row 0 depends on the batch (a split chosen by M): alone it is right."""

    name = "batch-variant"

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        y = super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        if x_bf16.shape[0] > 1:
            y = y.clone()
            y[0] = (y[0].float() * (1 + 2.0**-6)).to(y.dtype)
        return y


class MidBatchVariant(EmulatorBackend):
    """A dense linear with a third path for 3 <= M <= 16 (another K split), one bf16 ulp off there: a row alone and
    the whole batch are right, so only a batch of a middle size shows it (the sm90 dense NVFP4 GEMM's defect class,
    kernels/sm90/NOTES.md session 10)."""

    name = "mid-batch-variant"

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        y = super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        if 3 <= x_bf16.shape[0] <= 16:
            y = (y.view(torch.int16) ^ 1).view(y.dtype)
        return y


class GemmRowOff(EmulatorBackend):
    """A dense GEMM on the NVFP4 boundary with row 0 3 % off; its one-call dense_linear is right (the bound must
    judge the path it names, not the other one)."""

    name = "gemm-row-off"

    def dense_gemm(self, a, w):
        y = super().dense_gemm(a, w).clone()
        y[0] = (y[0].float() * 1.03).to(y.dtype)
        return y


class NanSentinelPadding(EmulatorBackend):
    """A grouped GEMM that reads its scale padding, visibly only where it holds 0x7F (E4M3 NaN)."""

    name = "nan-sentinel-padding"

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        y = super().grouped_gemm(a, offsets_i32, experts, layer=layer)
        if not bool((a.sf_swizzled_u8 == 0x7F).any()):
            return y
        off = lambda t: (t.float() * (1 + 2.0**-6)).to(t.dtype)  # noqa: E731
        return tuple(off(t) for t in y) if isinstance(y, tuple) else off(y)


class LastRowCodeOff(EmulatorBackend):
    """A dense quantizer whose last row's first code is one step off (a tail tile written wrong)."""

    name = "last-row-code-off"

    def quantize(self, x_bf16, *, input_dec_scale_f32=None):
        a = super().quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)
        packed = a.packed_u8.clone()
        packed[-1, 0] ^= 0x01
        return dataclasses.replace(a, packed_u8=packed)


class SwigluThreeSteps(EmulatorBackend):
    """A SwiGLU whose h has one element three representable steps off (1.5 to 3.5 ulps from the exact value)."""

    name = "swiglu-three-steps"

    def swiglu_requant(self, gate, up, offsets_i32, **kw):
        h, a = super().swiglu_requant(gate, up, offsets_i32, **kw)
        h = h.clone()
        bits = h.reshape(-1)[:1].view(torch.int16)
        bits += 3 if float(h.reshape(-1)[0]) >= 0 else -3  # away from zero: three steps up in magnitude
        return h, a


def _bugged(bug: str):
    return Bugged(EmulatorBackend(), bug)


def _sm90():
    from verify.backends import get_backend

    return get_backend("sm90", torch.device("cuda"))


# ============================================================================= documents for the sweep rows


def _unit_doc(name: str, index: int, fingerprint: str, *, failed: bool = False) -> dict:
    """A unit document as a sweep writes it (verify.report.document.unit_document), with verdicts."""
    doc = document_mod.unit_document(unit={"name": name, "kind": "decoder", "index": index, "nbytes": 1,
                                           "prefix": f"layers.{index}."}, fingerprint=fingerprint, run=None,
                                     timings_s={"total": 1.0}, rank=0, host="h", device="cpu")
    statuses = ["pass", "pass", "fail" if failed else "pass"]
    doc["verified"] = True
    doc["verdicts"] = [{"stage": "moe.l1", "check": c, "status": s, "message": f"moe.l1 {c}: {s}", "metrics": {}}
                       for c, s in zip(("bound", "batch", "padding"), statuses)]
    doc["counts"] = {"pass": statuses.count("pass"), "fail": statuses.count("fail"), "not served": 0, "skipped": 0}
    return doc


_RUN_INFO = {"checkpoint": "mini-v4", "checkpoint_schema": "deepseek_v4", "layers": "2,3", "num_layers": 4,
             "fingerprint": "f" * 16, "options": {"tokens": 8, "act_scale": "dynamic"}, "device": "cpu",
             "units": [{"name": n, "kind": "decoder", "index": i, "nbytes": 1, "prefix": f"layers.{i}."}
                       for n, i in (("layer2", 2), ("layer3", 3))]}


def _report(units: list[dict]) -> dict:
    return document_mod.merge_report(units, run=_RUN_INFO, backend=None, environment={},
                                     distributed={"world_size": 1}, timings={"phases_s": {}, "wall_s": 1.0},
                                     command="python -m verify model", created="now")


def _merged_status_is_fail() -> bool:
    return _report([_unit_doc("layer2", 2, "f" * 16), _unit_doc("layer3", 3, "f" * 16, failed=True)])[
        "summary"]["status"] == "fail"


def _missing_unit_is_named(tmp_path) -> bool:
    """A killed sweep: its plan holds layer2 and layer3, only layer2's document was written."""
    (tmp_path / sweep_mod.UNITS_DIR).mkdir()
    document_mod.write_json(tmp_path / sweep_mod.PLAN_JSON, {"kind": sweep_mod.PLAN_KIND, "run": _RUN_INFO})
    document_mod.write_json(tmp_path / sweep_mod.UNITS_DIR / "layer2.json", _unit_doc("layer2", 2, "f" * 16))
    return report_cli_mod.load_run(tmp_path)["summary"]["missing"] == ["layer3"]


def _failing_report_exits_1(tmp_path) -> bool:
    """`python -m verify report` on a finished sweep with a failed verdict exits 1 (its HTML page, which needs
    real metrics to plot, is left out of this synthetic report)."""
    from unittest import mock

    import verify.report.html as html_mod
    from verify.__main__ import main

    document_mod.write_json(tmp_path / sweep_mod.REPORT_JSON,
                            _report([_unit_doc("layer2", 2, "f" * 16), _unit_doc("layer3", 3, "f" * 16, failed=True)]))
    with mock.patch.object(html_mod, "write_html", lambda doc, out: None):
        return main(["report", str(tmp_path)]) == 1


_CONFIG_CHANGES = {"tokens": 65, "seed": 1, "act_scale": "static", "placement": "before_w2", "recipe": "vllm",
                   "fp8_scale_fmt": "f32"}


def _resume_refuses_another(ckpt, tmp_path, field: str) -> bool:
    """A unit written under one configuration is never reused by a sweep whose `field` differs: the resume
    rule (sweep._scan_done on verify.units.run_fingerprint) refuses the directory."""
    a = RunConfig(backend=None)
    b = dataclasses.replace(a, **{field: _CONFIG_CHANGES[field]})
    fp_a, _ = units_mod.run_fingerprint(ckpt, a, "emulator", "cpu")
    fp_b, _ = units_mod.run_fingerprint(ckpt, b, "emulator", "cpu")
    units_dir = tmp_path / sweep_mod.UNITS_DIR
    document_mod.write_json(units_dir / "layer3.json", _unit_doc("layer3", 3, fp_a))
    unit = units_mod.Unit("layer3", "decoder", 3, 1, "layers.3.")
    try:
        done = sweep_mod._scan_done(units_dir, [unit], fp_b, fresh=False)
    except UsageError:
        return True
    return "layer3" not in done


def _index_entry_of_another_unit_is_redone(tmp_path) -> bool:
    """units/layer3.json holding layer2's document (a copy, a rename) is not layer3's result."""
    units_dir = tmp_path / sweep_mod.UNITS_DIR
    document_mod.write_json(units_dir / "layer3.json", _unit_doc("layer2", 2, "f" * 16))
    unit = units_mod.Unit("layer3", "decoder", 3, 1, "layers.3.")
    return sweep_mod._scan_done(units_dir, [unit], "f" * 16, fresh=False) == []


def _golden_metric_moved(delta_in_tolerances: float) -> bool:
    """compare_golden reports a golden metric moved by `delta_in_tolerances` of its tolerance."""
    golden = golden_mod.load_golden(GOLDEN_DIR / "mini-v4" / "emulator.json")
    got = {"runs": {rid: {**r, "metrics": {s: dict(m) for s, m in r["metrics"].items()}}
                    for rid, r in golden["runs"].items()}}
    rid = next(iter(got["runs"]))
    stage_name = next(iter(got["runs"][rid]["metrics"]))
    m = got["runs"][rid]["metrics"][stage_name]
    abs_tol, rel_tol = golden_mod.METRIC_TOLERANCES["cosine"]
    m["cosine"] = m["cosine"] - delta_in_tolerances * (abs_tol + rel_tol * abs(m["cosine"]))
    return bool(golden_mod.compare_golden(golden, got))


def _control_fails_as_it_must(ckpt, i: int, act: str, stage_name: str, check: str, backend=None,
                              device: str = "cpu") -> bool:
    """The (stage, check) verdict passes on the real outputs and fails its negative control, the stage's
    output minimally planted (verify.verdicts.controls): one flipped byte, one step beyond the tolerance."""
    controls: list = []
    verdicts = judge_layer(backend or EmulatorBackend(), _case(ckpt, i, act, None, device), stages=[stage(stage_name)],
                           controls=controls)
    (v,) = [v for v in verdicts if v.check == check]
    (c,) = [c for c in controls if c.check == check]
    assert v.status == "pass", f"{stage_name} {check}: {v.status}: {v.message}"
    return c.status == "pass"


def _misblamed_bug_is_misblamed(ckpt) -> bool:
    wrong = Injector("routing-weight-at-the-wrong-place", "blamed on the router on purpose",
                     lambda s: s.op is Op.ROUTER)
    (row,) = selftest(ckpt, EmulatorBackend(), [3], tokens=16, device="cpu", injectors=(wrong,))
    return row.status == "MISBLAMED"


# ============================================================================= the weakenings


def _first_half(real: Callable) -> Callable:
    def weak(got, expected, *, label, **kw):
        return real(got[: got.shape[0] // 2], expected[: expected.shape[0] // 2], label=label, **kw)
    return weak


def _measures_linear_for_gemm(mp) -> None:
    real = JUDGES[Op.DENSE_LINEAR]

    def collect(ctx, st):
        out = real.collect(ctx, st)
        return dataclasses.replace(out, y_gemm=list(out.y_linear)) if out.y_gemm else out
    mp.setitem(JUDGES, Op.DENSE_LINEAR, Judge(collect, real.checks, real.ops))


def _misblamed_counted_as_caught(mp) -> None:
    def weak(inj, failed, served):
        caught = sorted({f"{v.stage} {v.check}" for _, v in failed})
        return ("caught" if caught else "MISSED" if served else "not applicable"), caught, []
    mp.setattr(runner_mod, "score", weak)


def _later_status_over_worse(mp) -> None:
    mp.setattr(document_mod, "summary_status",
               lambda failures, counts: "pass" if counts["pass"] else ("fail" if failures else "no verdicts"))


def _ignores_field(field: str) -> Callable:
    def plant(mp) -> None:
        real = units_mod.run_fingerprint
        default = getattr(RunConfig(backend=None), field)
        mp.setattr(units_mod, "run_fingerprint",
                   lambda ckpt, config, b, d: real(ckpt, dataclasses.replace(config, **{field: default}), b, d))
    return plant


def _slack_of_bytes(mp) -> None:
    real = assertions_mod.first_mismatch
    mp.setattr(assertions_mod, "first_mismatch", lambda mask: None if int(mask.sum()) <= 4 else real(mask))


def _ignores_the_declaration(mp) -> None:
    """The dense judge hands the mode check each part declared as the mode its output matches best."""
    real = dense_mod.DenseOutputs.modes

    def best_matching(self):
        cases = real(self)
        best = []
        for c in cases:
            ratios = {m: mode_mod.mode_ratio(c.y, y64, bnd) for m, (y64, bnd) in c.candidates().items()}
            best.append(dataclasses.replace(c, declared=min(ratios, key=ratios.get)))
        return best
    mp.setattr(dense_mod.DenseOutputs, "modes", best_matching)


def _prepare_slack(mp) -> None:
    """The prepare check allowing 8 float32 ulps where it allows one (or none)."""
    mp.setattr(prepare_mod, "_mismatches", lambda g64, exp64: ~((g64 - exp64).abs() <= 16 * half_ulp(exp64, torch.float32)))


def _valid_row_0_only(mp) -> None:
    """The valid check comparing only the first valid row with the block on the valid tokens alone."""
    real = assertions_mod.assert_bits_equal
    mp.setattr(valid_mod, "assert_bits_equal", lambda got, expected, *, label: real(got[:1], expected[:1], label=label))


@dataclass(frozen=True)
class Row:
    """logic: what is weakened (check / probe / scorer / rule, and where); plant(monkeypatch) weakens it;
    caught(ckpt, tmp_path) -> True when the logic rejects its known-bad input."""

    id: str
    plant: Callable
    caught: Callable
    marks: tuple = ()


def _row(id_: str, plant: Callable, caught: Callable, *marks) -> pytest.param:
    return pytest.param(Row(id_, plant, caught, marks), id=id_, marks=list(marks))


ROWS = [
    # verdict checks (verify/verdicts): the real judges on the emulator with one planted bug
    _row("bytes-compares-fewer-fields:global-scale-not-compared",
         lambda mp: mp.setattr(quantized_mod, "assert_bits_equal", lambda *a, **k: None),
         lambda ck, tmp: _fails(ck, _bugged("activation-global-scale-dropped"), 0, "dynamic", "attn.wq_a", "bytes")),
    _row("bytes-compares-fewer-elements:first-half-of-the-codes",
         lambda mp: mp.setattr(quantized_mod, "assert_codes_equal_as_values",
                               _first_half(assertions_mod.assert_codes_equal_as_values)),
         lambda ck, tmp: _fails(ck, LastRowCodeOff(), 0, "dynamic", "attn.wq_a", "bytes")),
    _row("batch-compares-a-thing-with-itself",
         lambda mp: mp.setattr(checks_mod, "assert_bits_equal",
                               lambda got, expected, *, label: assertions_mod.assert_bits_equal(got, got, label=label)),
         lambda ck, tmp: _fails(ck, BatchVariant(), 0, "static", "attn.wq_a", "batch")),
    _row("batch-compares-fewer-batch-sizes:end-rows-alone-only",
         lambda mp: mp.setattr(checks_mod, "ROW_BATCH_SIZES", ()),
         lambda ck, tmp: _fails(ck, MidBatchVariant(), 0, "static", "attn.wq_a", "batch")),
    _row("padding-skips-a-step-of-its-series:0x7F",
         lambda mp: mp.setattr(checks_mod, "PADDING_BYTES", (0xFF,)),
         lambda ck, tmp: _fails(ck, NanSentinelPadding(), 3, "static", "moe.l1", "padding")),
    _row("bound-measures-another-path:dense_linear-for-dense_gemm", _measures_linear_for_gemm,
         lambda ck, tmp: _fails(ck, GemmRowOff(), 0, "static", "attn.wq_a", "bound")),
    _row("bound-tolerates-slack:twice-the-bound",
         lambda mp: mp.setattr(dense_mod, "assert_within_gemm_bound",
                               lambda y, y64, bnd, **k: assertions_mod.assert_within_gemm_bound(y, y64, bnd * 2, **k)),
         lambda ck, tmp: _fails(ck, _bugged("fp8-promotion-skipped"), 3, "dynamic", "attn.wq_a", "bound",
                                "fp8-swallowing")),
    _row("ids-tolerates-slack:every-difference-a-near-tie",
         lambda mp: mp.setattr(routing_mod, "router_score_error_bound",
                               lambda x, w, ref, *, scoring: torch.full(ref.scores_f32.shape, float("inf"),
                                                                        dtype=torch.float64)),
         lambda ck, tmp: _fails(ck, _bugged("one-clear-winner-swapped"), 3, "static", "router", "ids")),
    _row("bytes-tolerates-a-few-bytes-of-slack:assertions.first_mismatch", _slack_of_bytes,
         lambda ck, tmp: _control_fails_as_it_must(ck, 3, "static", "moe.act_quant", "bytes")),
    _row("rounding-tolerates-slack:8-ulps",
         lambda mp: mp.setattr(swiglu_mod, "assert_within_ulps", lambda got, e, *, ulps, label, **k:
                               assertions_mod.assert_within_ulps(got, e, ulps=8 * ulps, label=label, **k)),
         lambda ck, tmp: _fails(ck, SwigluThreeSteps(), 3, "static", "moe.swiglu", "rounding")),
    _row("weights-tolerates-slack:unbounded-score-error",
         lambda mp: mp.setattr(routing_mod, "router_score_error_bound",
                               lambda x, w, ref, *, scoring: torch.full(ref.scores_f32.shape, float("inf"),
                                                                        dtype=torch.float64)),
         lambda ck, tmp: _control_fails_as_it_must(ck, 3, "static", "router", "weights")),
    _row("exact-compares-fewer-fields:offsets-not-compared",
         lambda mp: mp.setattr(dispatch_mod, "assert_bytes_equal", lambda *a, **k: None),
         lambda ck, tmp: _control_fails_as_it_must(ck, 3, "static", "moe.dispatch", "exact")),
    _row("interval-tolerates-slack:unbounded-interval",
         lambda mp: mp.setattr(l1_fused_mod, "widen_by_bf16_rounding",
                               lambda lo, hi: (torch.full_like(lo, -float("inf")), torch.full_like(hi, float("inf")))),
         lambda ck, tmp: _fails(ck, _bugged("swiglu-clamp-dropped"), 0, "static", "moe.l1_fused", "interval")),
    _row("mode-ignores-the-declaration:the-best-matching-mode-taken-as-declared", _ignores_the_declaration,
         lambda ck, tmp: _fails(ck, _bugged("declares-w4a4-computes-w4a16"), 0, "static", "attn.wq_a", "mode")),
    _row("prepare-returns-success-whatever-it-found",
         lambda mp: mp.setattr(prepare_mod, "_mismatches", lambda g64, exp64: torch.zeros_like(g64, dtype=torch.bool)),
         lambda ck, tmp: _fails(ck, _bugged("prepare-scale-applied-twice"), 0, "static", "attn.wq_a", "prepare")),
    _row("prepare-tolerates-slack:8-ulps", _prepare_slack,
         lambda ck, tmp: _control_fails_as_it_must(ck, 0, "static", "attn.wq_a", "prepare")),
    _row("valid-skips-the-rows-past-the-count",
         lambda mp: mp.setattr(valid_mod, "assert_all_zero", lambda *a, **k: None),
         lambda ck, tmp: _fails(ck, _bugged("valid-count-ignored"), 3, "static", "moe.block", "valid")),
    _row("valid-compares-fewer-rows:row-0-only", _valid_row_0_only,
         lambda ck, tmp: _control_fails_as_it_must(ck, 3, "static", "moe.block", "valid")),
    # the CUDA probes (sync, graph): on a GPU with the sm90 backend
    _row("sync-returns-success-whatever-it-found",
         lambda mp: mp.setattr(checks_mod, "sync_probe", lambda forward: "no host synchronization"),
         lambda ck, tmp: _fails(ck, Bugged(_sm90(), "host-sync-in-a-stage"), 0, "static", "attn.wq_a", "sync",
                                device="cuda"), pytest.mark.gpu, pytest.mark.sm90),
    _row("graph-skips-a-step-of-its-mutation-series:token-count",
         lambda mp: mp.setattr(checks_mod, "graph_probe", lambda forward, mutations, metrics, real=checks_mod.graph_probe:
                               real(forward, mutations[:-1], metrics)),
         lambda ck, tmp: _fails(ck, Bugged(_sm90(), "replay-breaks-when-token-count-changes"), 3, "static",
                                "moe.block", "graph", device="cuda"), pytest.mark.gpu, pytest.mark.sm90),
    # the selftest's scorer
    _row("selftest-counts-a-misblamed-bug-as-caught", _misblamed_counted_as_caught,
         lambda ck, tmp: _misblamed_bug_is_misblamed(ck)),
    # the sweep's resume rule, merge and exit status; the report's status order
    *[_row(f"resume-ignores-part-of-the-configuration:{f}", _ignores_field(f),
           lambda ck, tmp, f=f: _resume_refuses_another(ck, tmp, f)) for f in _CONFIG_CHANGES],
    _row("resume-trusts-an-index-entry-that-names-another-unit",
         lambda mp: mp.setattr(sweep_mod, "_holds_unit", lambda doc, unit: True),
         lambda ck, tmp: _index_entry_of_another_unit_is_redone(tmp)),
    _row("merge-drops-units-it-cannot-find",
         lambda mp: mp.setattr(report_cli_mod, "missing_units", lambda planned, docs: []),
         lambda ck, tmp: _missing_unit_is_named(tmp)),
    _row("report-returns-success-whatever-it-found",
         lambda mp: mp.setattr(sweep_mod, "exit_status", lambda doc: 0),
         lambda ck, tmp: _failing_report_exits_1(tmp)),
    _row("report-shows-a-later-status-over-a-worse-one", _later_status_over_worse,
         lambda ck, tmp: _merged_status_is_fail()),
    # golden comparisons
    _row("golden-tolerates-slack:100x-the-tolerance",
         lambda mp: mp.setattr(golden_mod, "tolerance_for", lambda m, real=golden_mod.tolerance_for:
                               tuple(100 * t for t in real(m))),
         lambda ck, tmp: _golden_metric_moved(3.0)),
]


@pytest.mark.parametrize("row", ROWS)
def test_catches_known_bad(ckpt, tmp_path, row):
    assert row.caught(ckpt, tmp_path), f"{row.id}: the real logic let its known-bad input through"


@pytest.mark.parametrize("row", ROWS)
def test_weakened_logic_lets_it_through(ckpt, tmp_path, row, monkeypatch):
    """With the weakening planted, the known-bad input gets through: test_catches_known_bad[row] is what
    fails when the logic is weakened that way."""
    row.plant(monkeypatch)
    assert not row.caught(ckpt, tmp_path), (f"{row.id}: still rejected with the weakening planted; the row does not "
                                            "show its logic load-bearing (the known-bad input must need it)")


def test_every_check_of_the_table_has_a_row():
    """Each check the stage table lists (references.stages.Check) is weakened by some row (sync and graph:
    rows that run on a CUDA device)."""
    covered = {r.values[0].id.split("-", 1)[0] for r in ROWS}
    missing = {c.value for c in Check} - covered
    assert not missing, f"checks without a weakened-logic row: {sorted(missing)}"
