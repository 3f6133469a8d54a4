"""matplotlib figures of a model report, each returned as SVG text.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, no global backend state) and
read only the report document, so `python -m verify report` redraws them from JSON.
"""

from __future__ import annotations

import io
import math

from verify.report.document import HIST_EDGES_LOG10, as_float, stage_bound_ratios

__all__ = ["STATUS_COLORS", "figures", "loss_figure", "bound_ratio_figure", "verdict_heatmap", "probe_grid",
           "error_histograms"]

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


def loss_figure(doc: dict) -> str | None:
    """Quantization loss per stage across layers: SQNR dB and 1 - cosine (log scale)."""
    units = _verified(doc)
    if not units:
        return None
    stages = _ordered(s for u in units for s in u["metrics"])
    xs, labels = _x(units)
    fig = _figure(11, 4.2)
    ax_s, ax_c = fig.subplots(1, 2)
    cmap = _cmap(len(stages))
    for k, stage in enumerate(stages):
        sq = [as_float(u["metrics"].get(stage, {}).get("sqnr_db")) for u in units]
        co = [as_float(u["metrics"].get(stage, {}).get("cosine")) for u in units]
        one_minus = [None if c is None else max(1.0 - c, 1e-16) for c in co]
        style = dict(marker="o", markersize=3, linewidth=1, color=cmap(k), label=stage)
        ax_s.plot(xs, [math.nan if v is None or math.isinf(v) else v for v in sq], **style)
        ax_c.plot(xs, [math.nan if v is None else v for v in one_minus], **style)
    ax_s.set_title("SQNR (emulated NVFP4 vs float64), dB")
    ax_c.set_title("1 - cosine (log)")
    ax_c.set_yscale("log")
    for ax in (ax_s, ax_c):
        ax.set_xticks(xs, labels, rotation=90 if len(xs) > 12 else 0, fontsize=7)
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _svg(fig)


def bound_ratio_figure(doc: dict) -> str | None:
    """Largest accumulation-bound ratio per kernel stage across layers (a pass is <= 1)."""
    units = _verified(doc)
    ratios = [stage_bound_ratios(u) for u in units]
    stages = _ordered(s for r in ratios for s in r)
    if not stages:
        return None
    xs, labels = _x(units)
    fig = _figure(11, 3.6)
    ax = fig.subplots()
    cmap = _cmap(len(stages))
    for k, stage in enumerate(stages):
        ax.plot(xs, [r.get(stage, math.nan) for r in ratios], marker="o", markersize=3, linewidth=1, color=cmap(k),
                label=stage)
    ax.axhline(1.0, color=STATUS_COLORS["fail"], linestyle="--", linewidth=1, label="bound (1)")
    values = [v for r in ratios for v in r.values() if v > 0]
    if values and max(values) / min(values) > 100:  # orders of magnitude apart (a misplaced scale): log
        ax.set_yscale("log")
    ax.set_title("max |y - y64| / bound per stage (<= 1 passes)")
    ax.set_xticks(xs, labels, rotation=90 if len(xs) > 12 else 0, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    notes = [[f"{r[s]:.2g}" if s in r else "" for s in stages] for r in ratios]
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


def _cmap(n: int):
    from matplotlib import colormaps  # noqa: PLC0415

    base = colormaps["tab20"]
    return lambda k: base(k % 20)


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
