"""matplotlib figures of a model report, each returned as SVG text.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, no global backend state) and
read only the report document, so `python -m verify report` redraws them from JSON.
"""

from __future__ import annotations

import io
import math

from verify.report.document import HIST_EDGES_LOG10, as_float, stage_bound_ratios
from verify.report.tables import format_ratio

__all__ = ["STATUS_COLORS", "LINE_COLORS", "stage_family", "figures", "loss_figure", "bound_ratio_figure",
           "verdict_heatmap", "probe_grid", "error_histograms"]

STATUS_COLORS = {"pass": "#2e7d32", "fail": "#c62828", "not served": "#f9a825", "skipped": "#cfd8dc", "": "#ffffff"}
STATUS_ORDER = ("", "skipped", "pass", "not served", "fail")  # a cell shows its worst status
PROBE_CHECKS = ("sync", "graph")


def _svg(fig) -> str:
    """SVG text of `fig`, reproducible: fixed id salt, no creation date."""
    from matplotlib import rc_context  # noqa: PLC0415

    buf = io.StringIO()
    with rc_context({"svg.hashsalt": "nvfp4-verify"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buf.getvalue()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _verified(doc: dict) -> list[dict]:
    return [u for u in doc["units"] if u["verified"]]


def _ordered(names) -> list[str]:
    return list(dict.fromkeys(names))


def _x(units: list[dict]) -> tuple[list[int], list[str]]:
    return list(range(len(units))), [u["unit"]["name"] for u in units]


# line colours of passing lines: no red, so the fail colour means only "fails"
LINE_COLORS = ("#1565c0", "#00897b", "#6a1b9a", "#ef6c00", "#5d4037", "#546e7a", "#7cb342", "#00acc1", "#8e24aa")
BOUND_LINE_COLOR = "#37474f"  # the bound (ratio 1) itself: a dark dashed line, not the fail colour


def stage_family(stage: str) -> str:
    """The panel a stage is drawn in: its name up to the first dot (attn, moe, shared, dense, router)."""
    return stage.split(".", 1)[0]


def _families(stages: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in stages:
        out.setdefault(stage_family(s), []).append(s)
    return out


def _loss_failed(m: dict) -> bool:
    """A loss row that fails: marked so by its metrics (`status` fail or a `problem`), or holding a
    NaN / Inf count or a non-finite cosine."""
    cos = as_float(m.get("cosine"))
    return m.get("status") == "fail" or bool(m.get("problem")) or bool(m.get("nan_count")) or \
        bool(m.get("inf_count")) or (cos is not None and not math.isfinite(cos))


def _draw_lines(ax, xs, series: dict[str, list[float]], failed: set[str], family: str):
    """One line per stage of a family, labelled with the stage's name less the family prefix; a failing
    stage in the fail colour, thicker, with cross markers, drawn on top."""
    for k, (stage, ys) in enumerate(series.items()):
        bad = stage in failed
        short = stage[len(family) + 1:] if stage.startswith(family + ".") else stage
        ax.plot(xs, ys, marker="X" if bad else "o", markersize=5 if bad else 3, linewidth=2.2 if bad else 1,
                color=STATUS_COLORS["fail"] if bad else LINE_COLORS[k % len(LINE_COLORS)],
                label=short + (" (FAIL)" if bad else ""), zorder=3 if bad else 2)


def _panels(n_rows: int, families: dict[str, list[str]], row_height: float):
    fig = _figure(max(6.0, 3.0 * len(families)), row_height * n_rows + 0.6)
    axes = fig.subplots(n_rows, len(families), squeeze=False)
    return fig, axes


def _x_axis(ax, xs, labels):
    ax.set_xticks(xs, labels, rotation=90 if len(xs) > 6 else 0, fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3)


def loss_figure(doc: dict) -> str | None:
    """Quantization loss across layers, one column of panels per stage family (attn, moe, shared,
    dense): SQNR dB on top, 1 - cosine (log) below, each line labelled by its stage; a failing stage
    (see `_loss_failed`) in the fail colour."""
    units = _verified(doc)
    if not units:
        return None
    families = _families(_ordered(s for u in units for s in u["metrics"]))
    xs, labels = _x(units)
    fig, axes = _panels(2, families, 2.6)
    for col, (family, stages) in enumerate(families.items()):
        failed = {s for s in stages for u in units if _loss_failed(u["metrics"].get(s, {}))}
        sq, one_minus = {}, {}
        for stage in stages:
            ms = [u["metrics"].get(stage, {}) for u in units]
            sq[stage] = [_finite(as_float(m.get("sqnr_db"))) for m in ms]
            cos = [as_float(m.get("cosine")) for m in ms]
            one_minus[stage] = [math.nan if c is None or not math.isfinite(c) else max(1.0 - c, 1e-16) for c in cos]
        _draw_lines(axes[0][col], xs, sq, failed, family)
        _draw_lines(axes[1][col], xs, one_minus, failed, family)
        axes[0][col].set_title(f"{family}: SQNR dB", fontsize=9)
        axes[1][col].set_title(f"{family}: 1 - cosine (log)", fontsize=9)
        axes[1][col].set_yscale("log")
        axes[0][col].legend(fontsize=6, loc="best")
        for row in (0, 1):
            _x_axis(axes[row][col], xs, labels)
    return _svg(fig)


def _finite(x: float | None) -> float:
    return math.nan if x is None or not math.isfinite(x) else x


def bound_ratio_figure(doc: dict) -> str | None:
    """Largest accumulation-bound ratio per kernel stage across layers (a pass is <= 1), one panel per
    stage family; a stage whose ratio exceeds 1 or whose verdict failed in some layer is drawn in the
    fail colour."""
    units = _verified(doc)
    ratios = [stage_bound_ratios(u) for u in units]
    stages = _ordered(s for r in ratios for s in r)
    if not stages:
        return None
    families = _families(stages)
    xs, labels = _x(units)
    failed = {s for r in ratios for s, x in r.items() if not x <= 1} | \
        {v["stage"] for u in units for v in u["verdicts"] if v["status"] == "fail" and v["stage"] in stages}
    values = [v for r in ratios for v in r.values() if v > 0 and math.isfinite(v)]
    log = bool(values) and max(values) / min(values) > 100  # orders of magnitude apart (a misplaced scale)
    fig, axes = _panels(1, families, 3.0)
    for col, (family, fam_stages) in enumerate(families.items()):
        ax = axes[0][col]
        _draw_lines(ax, xs, {s: [r.get(s, math.nan) for r in ratios] for s in fam_stages}, failed, family)
        ax.axhline(1.0, color=BOUND_LINE_COLOR, linestyle="--", linewidth=1, label="bound (1)")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{family}: max |y - y64| / bound", fontsize=9)
        ax.legend(fontsize=6, loc="best")
        _x_axis(ax, xs, labels)
    return _svg(fig)


def _status_grid(units: list[dict], checks: tuple[str, ...] | None) -> tuple[list[str], list[list[str]]]:
    """(stages, worst status per unit x stage) over the verdicts whose check is in `checks` (all: None)."""
    stages = _ordered(v["stage"] for u in units for v in u["verdicts"] if checks is None or v["check"] in checks)
    grid = []
    for u in units:
        row = {}
        for v in u["verdicts"]:
            if checks is not None and v["check"] not in checks:
                continue
            cur = row.get(v["stage"], "")
            row[v["stage"]] = max(cur, v["status"], key=STATUS_ORDER.index)
        grid.append([row.get(s, "") for s in stages])
    return stages, grid


def _draw_grid(ax, units, stages, grid, annotations=None, title=""):
    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    codes = [[STATUS_ORDER.index(c) for c in row] for row in grid]
    ax.imshow(codes, cmap=ListedColormap([STATUS_COLORS[s] for s in STATUS_ORDER]), vmin=0,
              vmax=len(STATUS_ORDER) - 1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(stages)), stages, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(units)), [u["unit"]["name"] for u in units], fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, len(stages))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(units))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=9)
    if annotations:
        for i, row in enumerate(annotations):
            for j, text in enumerate(row):
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=6,
                            color="white" if grid[i][j] in ("pass", "fail") else "black")


def _legend(fig, statuses):
    from matplotlib.patches import Patch  # noqa: PLC0415

    names = {"skipped": "n/a", "pass": "pass", "not served": "not served", "fail": "fail"}
    fig.legend(handles=[Patch(color=STATUS_COLORS[s], label=names[s]) for s in statuses], loc="outside lower center",
               ncol=len(statuses), fontsize=7)


def verdict_heatmap(doc: dict) -> str | None:
    """Units x stages: the worst verdict status of each cell, annotated with its max bound ratio."""
    units = _verified(doc)
    stages, grid = _status_grid(units, None)
    if not stages:
        return None
    ratios = [stage_bound_ratios(u) for u in units]
    notes = [[format_ratio(r[s]) if s in r else "" for s in stages] for r in ratios]
    fig = _figure(max(6.0, 0.55 * len(stages) + 2), max(2.4, 0.32 * len(units) + 1.8))
    _draw_grid(fig.subplots(), units, stages, grid, notes, "verdicts per layer and stage (cell: worst status; "
                                                             "number: max bound ratio)")
    _legend(fig, ("pass", "fail", "not served", "skipped"))
    return _svg(fig)


def probe_grid(doc: dict) -> str | None:
    """The CUDA-graph and host-sync verdicts: one grid per check, units x stages."""
    units = _verified(doc)
    panels = [(c, *_status_grid(units, (c,))) for c in PROBE_CHECKS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    width = max(len(p[1]) for p in panels)
    fig = _figure(max(6.0, 0.55 * width * len(panels) + 2), max(2.4, 0.32 * len(units) + 1.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (check, stages, grid) in zip(axes, panels):
        na = all(c in ("", "skipped") for row in grid for c in row)
        _draw_grid(ax, units, stages, grid, None, f"{check} probe" + (" (n/a: runs on CUDA only)" if na else ""))
    _legend(fig, ("pass", "fail", "not served", "skipped"))
    return _svg(fig)


def error_histograms(doc: dict, worst: int = 4) -> str | None:
    """Histograms of log10(|emulated - high| / rms(high)) of the `worst` stages (lowest SQNR over the
    units), counts summed over units."""
    units = _verified(doc)
    by_stage: dict[str, list[int]] = {}
    exact: dict[str, int] = {}
    for u in units:
        for stage, h in u.get("histograms", {}).items():
            acc = by_stage.setdefault(stage, [0] * len(h["counts"]))
            by_stage[stage] = [a + c for a, c in zip(acc, h["counts"])]
            exact[stage] = exact.get(stage, 0) + h["exact"]
    sqnr = {s: min((as_float(u["metrics"].get(s, {}).get("sqnr_db")) for u in units
                    if as_float(u["metrics"].get(s, {}).get("sqnr_db")) is not None), default=math.inf)
            for s in by_stage}
    chosen = sorted((s for s in by_stage if sum(by_stage[s])), key=lambda s: sqnr[s])[:worst]
    if not chosen:
        return None
    fig = _figure(11, 3.2)
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    edges = HIST_EDGES_LOG10
    for ax, stage in zip(axes, chosen):
        ax.stairs(by_stage[stage], edges, fill=True, color="#1565c0", alpha=0.8)
        ax.set_title(f"{stage}\nworst SQNR {sqnr[stage]:.1f} dB; {exact[stage]} exact", fontsize=8)
        ax.set_xlabel("log10(|err| / rms)", fontsize=7)
        ax.tick_params(labelsize=7)
    return _svg(fig)


def figures(doc: dict) -> list[tuple[str, str, str]]:
    """(id, caption, svg) of every figure the report has data for."""
    out = []
    for fid, caption, fn in (
            ("loss", "Quantization loss per stage across layers (emulated NVFP4 vs float64)", loss_figure),
            ("bound", "Accumulation-bound ratio per kernel stage across layers", bound_ratio_figure),
            ("heatmap", "Layer x stage: verdicts and bound ratios", verdict_heatmap),
            ("probes", "CUDA-graph and host-sync verdicts", probe_grid),
            ("histograms", "Error histograms of the worst stages", error_histograms)):
        svg = fn(doc)
        if svg is not None:
            out.append((fid, caption, svg))
    return out
