"""Golden files: per-stage metrics and byte digests, compared with explicit per-metric tolerances.

A golden file is `golden/<fixture>/<backend>.json`: {"environment": {...} (informational, never
compared), "runs": {run_id: {"metrics": {stage: {metric: value}}, "digests": {tensor: sha256},
"verdicts": {"<stage> <check>": status} (backend runs only)}}}.
Digests and verdict statuses must match exactly (deterministic bytes, pass/fail); metrics within
METRIC_TOLERANCES (absolute, relative), looked up by the metric's own name (a backend run's
`bound.vs_high_y.cosine` uses "cosine", `bound.bound_ratio_gate` uses "bound_ratio"); a metric
with no entry must be equal. `--update-golden` rewrites the file and the
test then fails showing the diff, so a change is always reviewed; a mismatch leaves
`<name>.obtained.json` beside the golden, a missing golden is written and fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["METRIC_TOLERANCES", "tolerance_for", "tensor_digest", "environment", "compare_golden", "load_golden", "write_golden",
           "check_or_update_golden", "check_or_update_golden_run", "obtained_path", "backend_golden_run"]

# (abs, rel): the emulated tensors are pinned bit-exactly by their digests, so metrics can move
# only through the float64 high-precision path and float64 metric arithmetic (~1e-15 relative).
METRIC_TOLERANCES: dict[str, tuple[float, float]] = {
    "cosine": (1e-12, 1e-9),
    "calc_diff": (1e-15, 1e-9),
    "sqnr_db": (1e-9, 1e-9),
    "rel_l2": (1e-15, 1e-9),
    "max_abs": (1e-12, 1e-9),
    # max |y - y_high| / |y_high|: y_high near 0 comes out of a float64 BLAS dot whose summation order
    # is MKL's per CPU (measured: 1.15e-12 relative between an AVX-512 and an AVX2 host, 2.6e-12 with
    # MKL_ENABLE_INSTRUCTIONS=SSE4_2), so it is not bit-stable across machines
    "max_rel": (1e-15, 1e-9),
    "frac_bit_exact": (0.0, 0.0),
    "nan_count": (0.0, 0.0),
    "inf_count": (0.0, 0.0),
    # backend verdict metrics computed in float64 from bit-exact operands (verify.verdicts)
    "bound_ratio": (1e-12, 1e-9),
    "bound_ratio_linear": (1e-12, 1e-9),
    "max_weight_ratio": (1e-12, 1e-9),
    # the mode check's bound ratio of each candidate mode (mode_ratio_<mode>_<part>, verify.verdicts.judges.mode)
    **{f"mode_ratio_{m}": (1e-12, 1e-9) for m in ("w4a4", "w4a16", "w4a8", "fp8_block", "bf16")},
}


def tolerance_for(metric: str) -> tuple[float, float]:
    """(abs, rel) of a metric: its name, else its last dotted component, else that component without a
    trailing _<output> (bound_ratio_gate -> bound_ratio); (0, 0) when none has an entry."""
    last = metric.rsplit(".", 1)[-1]
    for key in (metric, last, last.rsplit("_", 1)[0]):
        if key in METRIC_TOLERANCES:
            return METRIC_TOLERANCES[key]
    return (0.0, 0.0)


def tensor_digest(t: Tensor) -> str:
    """sha256 of the tensor's bytes (contiguous, on the CPU), prefixed by dtype and shape."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _version(dist: str) -> str | None:
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    import subprocess  # noqa: PLC0415

    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, str | None]:
    """Informational block of a golden/report file (never compared): versions, device, commit."""
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "triton": _version("triton"), "nvidia-cutlass-dsl": _version("nvidia-cutlass-dsl"),
            "commit": _git_commit()}


def _close(metric: str, golden: float, got: float) -> bool:
    if golden is None or got is None:
        return golden is got
    if math.isinf(golden) or math.isinf(got) or math.isnan(golden) or math.isnan(got):
        return (golden == got) or (math.isnan(golden) and math.isnan(got))
    if isinstance(golden, str) or isinstance(got, str):
        return golden == got
    abs_tol, rel_tol = tolerance_for(metric)
    return abs(got - golden) <= abs_tol + rel_tol * abs(golden)


def _relative_change(golden, got) -> float:
    """|got - golden| / |golden| (inf for a change from 0, from a missing value or to/from NaN)."""
    try:
        g, n = float(golden), float(got)
    except (TypeError, ValueError):
        return math.inf
    if math.isnan(g) or math.isnan(n):
        return 0.0 if math.isnan(g) and math.isnan(n) else math.inf
    if g == n:
        return 0.0
    return abs(n - g) / abs(g) if g else math.inf


def compare_golden(golden: dict, got: dict) -> list[str]:
    """Human-readable differences between two golden documents' runs (empty: equal). Missing runs and
    stages come first, then changed verdict statuses, then metric changes with the LARGEST relative change first (a stage that moved
    by a factor 2 is the first line, not the hundredth after 8th-digit drifts), then byte digests."""
    missing, verdicts, metrics, digests = [], [], [], []
    g_runs, n_runs = golden.get("runs", {}), got.get("runs", {})
    for run_id in sorted(set(g_runs) | set(n_runs)):
        if run_id not in n_runs or run_id not in g_runs:
            missing.append(f"{run_id}: {'missing from this run' if run_id not in n_runs else 'not in the golden file'}")
            continue
        g, n = g_runs[run_id], n_runs[run_id]
        gv, nv = g.get("verdicts", {}), n.get("verdicts", {})
        for key in sorted(set(gv) | set(nv)):
            if gv.get(key) != nv.get(key):
                verdicts.append(f"{run_id} {key}: verdict golden {gv.get(key)!r}, got {nv.get(key)!r}")
        for stage in sorted(set(g["metrics"]) | set(n["metrics"])):
            gm, nm = g["metrics"].get(stage), n["metrics"].get(stage)
            if gm is None or nm is None:
                missing.append(f"{run_id} {stage}: {'missing from this run' if nm is None else 'not in the golden file'}")
                continue
            for metric in sorted(set(gm) | set(nm)):
                if not _close(metric, gm.get(metric), nm.get(metric)):
                    rel = _relative_change(gm.get(metric), nm.get(metric))
                    metrics.append((rel, f"{run_id} {stage} {metric}: golden {gm.get(metric)!r}, got {nm.get(metric)!r} "
                                         f"(relative change {rel:.3g}; tolerance abs, rel = "
                                         f"{tolerance_for(metric)})"))
        for name in sorted(set(g["digests"]) | set(n["digests"])):
            if g["digests"].get(name) != n["digests"].get(name):
                digests.append(f"{run_id} {name}: bytes differ (sha256 golden {str(g['digests'].get(name))[:16]}..., "
                               f"got {str(n['digests'].get(name))[:16]}...)")
    return missing + verdicts + [m for _, m in sorted(metrics, key=lambda t: -t[0])] + digests


def load_golden(path: Path) -> dict:
    return json.loads(path.read_text())


def write_golden(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def obtained_path(path: Path) -> Path:
    return path.with_suffix(".obtained.json")


def check_or_update_golden(path: Path, got: dict, *, update: bool) -> list[str]:
    """Compare `got` with the golden file at `path` (STYLE section 8). Returns the problems (empty:
    equal). A missing golden is written and reported (review and commit it); a mismatch writes
    `<name>.obtained.json` beside it; with update the golden is rewritten and the differences from
    the old content are returned, so the caller still fails and shows them."""
    if not path.exists():
        write_golden(path, got)
        return [f"missing golden {path}: written to {path} (created); review and commit it"]
    diffs = compare_golden(load_golden(path), got)
    if not diffs:
        obtained_path(path).unlink(missing_ok=True)
        return []
    if update:
        write_golden(path, got)
        return [f"{path}: rewritten; differences from the old file:"] + diffs
    write_golden(obtained_path(path), got)
    return [f"{path}: differs; this run's document is in {obtained_path(path)}"] + diffs


# stage_metrics keys a verdict's nested metrics carry that golden files do not pin: the reference side's
# NaN / Inf counts and the norm ratio came after golden/mini-v4/{emulator,sm90}.json were written (and
# are functions of tensors those pin: the digests, cosine, rel-L2); status / problem are strings
UNPINNED_METRICS = frozenset({"norm_ratio", "ref_nan_count", "ref_inf_count"})
# checks added after those golden files were written: their verdicts (status, metrics) are judged by the run
# and by their own tests, not pinned in golden/mini-v4/{emulator,sm90}.json
UNPINNED_CHECKS = frozenset({"valid"})


def backend_golden_run(digests: dict[str, str], verdicts: list) -> dict:
    """One backend run of a golden file from a layer run's emulated-tensor digests (the inputs the
    teacher-forced verdicts judged) and its verdicts: every numeric verdict metric per stage as
    "<check>.<metric>" (nested dicts flattened one level, e.g. "bound.vs_high_y.sqnr_db"; timings and
    tracebacks left out; UNPINNED_METRICS too), any verdict metric named "sha256_*" as a digest of the backend's output
    bytes, and every verdict's status as "<stage> <check>" (verdicts of UNPINNED_CHECKS left out)."""
    metrics: dict[str, dict] = {}
    out_digests = dict(digests)
    statuses = {}
    for v in verdicts:
        if v.check in UNPINNED_CHECKS:
            continue
        statuses[f"{v.stage} {v.check}"] = v.status
        for key, value in v.metrics.items():
            if key == "seconds":
                continue
            if key.startswith("sha256_") and isinstance(value, str):
                out_digests[f"{v.stage}.{v.check}.{key}"] = value
            elif isinstance(value, dict):
                for sub, x in value.items():
                    if isinstance(x, (int, float)) and not isinstance(x, bool) and sub not in UNPINNED_METRICS:
                        metrics.setdefault(v.stage, {})[f"{v.check}.{key}.{sub}"] = x
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(v.stage, {})[f"{v.check}.{key}"] = value
    return {"metrics": metrics, "digests": out_digests, "verdicts": statuses}


def check_or_update_golden_run(path: Path, run_id: str, got_run: dict, *, update: bool,
                               env: dict | None = None) -> list[str]:
    """check_or_update_golden for ONE run of a golden file, so each test item (one layer, one
    configuration) checks and updates only its own entry. A run missing from the file is added
    and reported; a mismatch records this run in `<name>.obtained.json`. `env` adds to the
    environment block (e.g. the backend's declarations)."""
    existed = path.exists()
    doc = load_golden(path) if existed else {"environment": environment(), "runs": {}}
    golden_run = doc["runs"].get(run_id)
    updated = {**doc, "environment": {**environment(), **(env or {})}, "runs": {**doc["runs"], run_id: got_run}}
    if golden_run is None:
        write_golden(path, updated)
        if not existed:
            return [f"missing golden {path}: written to {path} with {run_id} (created); review and commit it"]
        return [f"missing golden entry {run_id}: written to {path} (created); review and commit it"]
    diffs = compare_golden({"runs": {run_id: golden_run}}, {"runs": {run_id: got_run}})
    if not diffs:
        return []
    if update:
        write_golden(path, updated)
        return [f"{path} {run_id}: rewritten; differences from the old entry:"] + diffs
    obtained = obtained_path(path)
    base = load_golden(obtained) if obtained.exists() else doc
    write_golden(obtained, {**base, "runs": {**base["runs"], run_id: got_run}})
    return [f"{path} {run_id}: differs; this run is recorded in {obtained}"] + diffs
