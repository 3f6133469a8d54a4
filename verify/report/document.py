"""The JSON documents of a model sweep: one per unit (a decoder layer or an MTP block), merged into
one model report whose layout is `model_report.schema.json` (SCHEMA_VERSION).

A unit document is written by the rank that verified the unit, as
`<report-dir>/units/<unit>.json`; rank 0 merges them into `<report-dir>/report.json`. Everything a
report shows (HTML, terminal summary) is rendered from these documents, so `python -m verify
report RUN_DIR` re-renders without re-running anything.

JSON has no Infinity or NaN: a non-finite float (an SQNR of +inf for bit-exact stages, a NaN
metric) is stored as the string "inf", "-inf" or "nan" (see `finite_json`); `as_float` reads
either form back.

Fields that differ between two runs of the same sweep (timings, ranks, hosts, creation time,
environment) are listed in VOLATILE_KEYS; `normalized(doc)` drops them, so an interrupted and
resumed sweep, a 2-rank and a 1-rank sweep compare equal with `normalized(a) == normalized(b)`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SCHEMA_VERSION", "SCHEMA_PATH", "REPORT_KIND", "UNIT_KIND", "VOLATILE_KEYS", "PROJECTION_LAYERS",
    "PROJECTION_GPUS", "HIST_EDGES_LOG10", "finite_json", "as_float", "error_histogram", "unit_document",
    "merge_report", "normalized", "validate", "load_json", "write_json", "projection", "phase_totals",
    "bound_ratio", "stage_bound_ratios", "summary_status",
]

SCHEMA_VERSION = "1.2"  # model_report.schema.json: 1.2 readers accept 1.1 and 1.0 documents (1.2: controls)
SCHEMA_PATH = Path(__file__).with_name("model_report.schema.json")
REPORT_KIND = "nvfp4-verify.model-report"
UNIT_KIND = "nvfp4-verify.unit"
# keys whose values legitimately change between runs of the same sweep (dropped by `normalized`)
VOLATILE_KEYS = frozenset({"timings", "timings_s", "seconds", "created", "environment", "distributed", "rank",
                           "host", "pid", "command", "report_dir", "resumed"})
PROJECTION_LAYERS = 61     # DeepSeek-V4-Pro's decoder layers
PROJECTION_GPUS = (1, 8)
# error histograms: log10(|emulated - high| / rms(high)), quarter-decade bins from 1e-7 to 10
HIST_EDGES_LOG10 = tuple(-7.0 + 0.25 * i for i in range(33))


# ----------------------------------------------------------------------------- JSON values


def finite_json(value):
    """`value` with every non-finite float replaced by "inf" / "-inf" / "nan" (recursively)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def as_float(value) -> float | None:
    """A metric as a float: numbers as they are, "inf" / "-inf" / "nan" decoded, anything else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def _plain(value):
    """JSON for what a verdict's metrics may hold beyond plain types: numpy / torch scalars by value
    (non-finite ones as strings), anything else as its str()."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return finite_json(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def load_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | os.PathLike, doc: dict) -> None:
    """Write atomically (a temporary file renamed over the target): a sweep killed while writing
    leaves either the old file or the new one, never half a document that resume would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(finite_json(doc), indent=1, sort_keys=True, allow_nan=False, default=_plain) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- unit documents


def error_histogram(emulated: Tensor, high: Tensor) -> dict:
    """Histogram of log10(|emulated - high| / rms(high)) over the finite elements, with the bins of
    HIST_EDGES_LOG10 (values below the first edge count in the first bin, above the last in the
    last); `exact` counts elements with no error, `nonfinite` the elements left out."""
    e, h = emulated.detach().double().cpu().flatten(), high.detach().double().cpu().flatten()
    finite = torch.isfinite(e) & torch.isfinite(h)
    e, h = e[finite], h[finite]
    rms = float(h.square().mean().sqrt()) if h.numel() else 0.0
    err = (e - h).abs() / (rms if rms > 0 else 1.0)
    exact = int((err == 0).sum())
    logs = err[err > 0].log10()
    edges = torch.tensor(HIST_EDGES_LOG10, dtype=torch.float64)
    idx = (torch.bucketize(logs, edges, right=True) - 1).clamp(0, len(HIST_EDGES_LOG10) - 2)
    counts = torch.bincount(idx, minlength=len(HIST_EDGES_LOG10) - 1)
    return {"counts": [int(c) for c in counts], "exact": exact, "nonfinite": int((~finite).sum())}


def unit_document(*, unit: dict, fingerprint: str, run=None, timings_s: dict, rank: int, host: str,
                  device: str, note: str = "") -> dict:
    """The document of one verified unit. `unit` is the sweep's unit record (name, kind, index,
    nbytes); `run` a verify.run.LayerRun (None for a unit that was only loaded, e.g. an MTP block,
    whose `note` says why)."""
    from verify.run import verdict_counts  # noqa: PLC0415

    doc = {"kind": UNIT_KIND, "schema_version": SCHEMA_VERSION, "unit": dict(unit), "fingerprint": fingerprint,
           "verified": run is not None, "note": note, "rank": rank, "host": host, "device": device,
           "timings_s": dict(timings_s), "metrics": {}, "digests": {}, "saturated_block_fraction": {},
           "histograms": {}, "verdicts": [], "counts": verdict_counts([])}
    if run is not None:
        doc.update(metrics=run.loss, digests=run.digests, saturated_block_fraction=run.saturated,
                   histograms={s: error_histogram(run.emulated[s], run.high[s]) for s in run.loss},
                   verdicts=[v.as_dict() for v in run.verdicts + run.loss_failures],  # a garbage loss row fails
                   counts=verdict_counts(run.verdicts + run.loss_failures))
        if getattr(run, "provenance", None) is not None:  # kernels per stage and their arch (verify.provenance)
            doc["provenance"] = run.provenance
        if run.controls:  # negative controls (verify.verdicts.controls): kept apart from the verdicts
            from verify.verdicts.controls import control_counts  # noqa: PLC0415

            doc.update(controls=[{k: v for k, v in c.as_dict().items() if k != "metrics"} for c in run.controls],
                       control_counts=control_counts(run.controls))
    return finite_json(doc)


def bound_ratio(verdict: dict) -> float | None:
    """The largest `bound_ratio*` metric of one verdict (a GEMM stage has one per output), or None."""
    values = [as_float(v) for k, v in verdict.get("metrics", {}).items() if k.startswith("bound_ratio")]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def stage_bound_ratios(unit_doc: dict) -> dict[str, float]:
    """Per stage of one unit: its largest bound ratio over all its verdicts."""
    out: dict[str, float] = {}
    for v in unit_doc.get("verdicts", []):
        r = bound_ratio(v)
        if r is not None:
            out[v["stage"]] = max(out.get(v["stage"], -math.inf), r)
    return out


# ----------------------------------------------------------------------------- the merged report


def phase_totals(units: list[dict]) -> dict[str, float]:
    """Seconds per phase summed over the units (load, emulated, high, verdicts, graph_probe, total)."""
    out: dict[str, float] = {}
    for u in units:
        for k, v in u.get("timings_s", {}).items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0.0) + float(v)
    return out


def projection(units: list[dict], startup_s: float, *, layers: int = PROJECTION_LAYERS,
               gpus: tuple[int, ...] = PROJECTION_GPUS) -> dict | None:
    """Projected wall time of a `layers`-layer sweep on each GPU count: the median measured decoder-layer
    time (load + every phase) times the layers the busiest rank gets (ceil(layers / gpus)), plus the
    one-time start-up (backend set-up and accumulator probe) each rank pays. None without a decoder
    layer to measure."""
    per_layer = [float(u["timings_s"]["total"]) for u in units
                 if u["unit"]["kind"] == "decoder" and u["verified"] and "total" in u.get("timings_s", {})]
    if not per_layer:
        return None
    t = statistics.median(per_layer)
    return {"layers": layers, "per_layer_s": t, "startup_s": startup_s, "measured_layers": len(per_layer),
            "basis": f"median wall time of {len(per_layer)} measured decoder layer(s) x ceil({layers} / GPUs) "
                     "+ start-up; layers assumed alike in size (DeepSeek-V4-Pro's are within a few %)",
            "gpus": {str(n): startup_s + math.ceil(layers / n) * t for n in gpus}}


def summary_status(failures: list, counts: dict[str, int]) -> str:
    """The report's status, the worst that holds: fail (any failed verdict or blind control) over pass (at
    least one verdict passed) over no verdicts."""
    return "fail" if failures else ("pass" if counts["pass"] else "no verdicts")


def merge_report(units: list[dict], *, run: dict, backend: dict | None, environment: dict, distributed: dict,
                 timings: dict, command: str, created: str) -> dict:
    """The model report: units in model order (decoder layers by index, then MTP blocks), a summary
    (verdict counts, failures, the worst stage of each metric) and timings with projections."""
    units = sorted(units, key=lambda u: (u["unit"]["kind"] != "decoder", u["unit"]["index"]))
    counts = {"pass": 0, "fail": 0, "not served": 0, "skipped": 0}
    failures = []
    for u in units:
        for k, v in u["counts"].items():
            counts[k] = counts.get(k, 0) + v
        failures += [{"unit": u["unit"]["name"], "stage": v["stage"], "check": v["check"],
                      "message": v["message"].split("\n")[0]} for v in u["verdicts"] if v["status"] == "fail"]
    worst = {}
    for u in units:
        for stage, m in u["metrics"].items():
            sqnr = as_float(m.get("sqnr_db"))
            w = worst.setdefault(stage, {})
            if sqnr is not None and sqnr < w.get("sqnr_db", math.inf):
                w.update(sqnr_db=sqnr, cosine=m.get("cosine"), unit=u["unit"]["name"])
        for stage, r in stage_bound_ratios(u).items():
            w = worst.setdefault(stage, {})
            if r > w.get("bound_ratio", -math.inf):
                w.update(bound_ratio=r, bound_ratio_unit=u["unit"]["name"])
    controls: dict[str, int] = {}
    control_failures = []
    for u in units:
        for k, v in u.get("control_counts", {}).items():
            controls[k] = controls.get(k, 0) + v
        control_failures += [{"unit": u["unit"]["name"], "stage": c["stage"], "check": c["check"],
                              "message": c["message"].split("\n")[0]}
                             for c in u.get("controls", []) if c["status"] == "fail"]
    status = summary_status(failures + control_failures, counts)
    timings = dict(timings)
    timings["phases_s"] = {**phase_totals(units), **timings.get("phases_s", {})}
    timings["per_unit_s"] = {u["unit"]["name"]: u["timings_s"].get("total") for u in units}
    timings["projection"] = projection(units, timings.get("phases_s", {}).get("startup", 0.0))
    doc = {"kind": REPORT_KIND, "schema_version": SCHEMA_VERSION, "created": created, "command": command,
           "run": run, "backend": backend, "environment": environment, "distributed": distributed,
           "summary": {"status": status, "verdicts": counts, "failures": failures, "worst": worst,
                       **({"controls": controls, "control_failures": control_failures} if controls else {}),
                       "units": [u["unit"]["name"] for u in units],
                       "not_verified": {u["unit"]["name"]: u["note"] for u in units if not u["verified"]}},
           "units": units, "timings": timings}
    return finite_json(doc)


def normalized(doc):
    """`doc` without VOLATILE_KEYS (recursively): what two runs of the same sweep must agree on."""
    if isinstance(doc, dict):
        return {k: normalized(v) for k, v in doc.items() if k not in VOLATILE_KEYS}
    if isinstance(doc, list):
        return [normalized(v) for v in doc]
    return doc


def validate(doc: dict) -> None:
    """Validate a model report against model_report.schema.json (needs `jsonschema`, in the test
    extra). Raises jsonschema.ValidationError naming the path of the first bad field."""
    import jsonschema  # noqa: PLC0415

    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
