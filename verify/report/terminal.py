"""The rich summary of a model report (end of a sweep, and `python -m verify report`)."""

from __future__ import annotations

from pathlib import Path

from verify.provenance import provenance_lines
from verify.report.document import as_float
from verify.report.tables import Adaptive, control_summary, escape, first_line, format_ratio, new_table

__all__ = ["print_summary", "timing_line", "projection_line", "controls_line"]


def controls_line(doc: dict) -> str | None:
    """Per check column: how many negative controls failed their planted known-bad input as they must (and
    how many the check passed: blind), over every unit; None for a report without controls (before 1.2)."""
    per = control_summary([c for u in doc["units"] for c in u.get("controls", [])])
    if not per:
        return None
    cells = [f"{check} [bold red]BLIND {blind}[/]/{caught + blind}" if blind else f"{check} {caught}/{caught}"
             for check, (caught, blind) in per.items() if caught or blind]
    blind = sum(b for _, b in per.values())
    head = "[bold red]negative controls: a check PASSED a known-bad input[/]" if blind else \
        "[green]negative controls (each check failing a known-bad input of its stage, as it must)[/]"
    return f"{head}: " + ", ".join(cells)


def timing_line(doc: dict) -> str:
    """One line: wall time and the seconds of each phase, summed over units (and ranks)."""
    t = doc["timings"]
    phases = t.get("phases_s", {})
    order = ("startup", "load", "emulated", "high", "verdicts", "graph_probe", "controls", "report")
    parts = [f"{k} {phases[k]:.2f} s" for k in order if isinstance(phases.get(k), (int, float))]
    wall = t.get("wall_s")
    return (f"time: wall {wall:.2f} s; " if isinstance(wall, (int, float)) else "time: ") + ", ".join(parts) + \
        " (per phase, summed over units; graph_probe and controls are part of verdicts)"


def projection_line(doc: dict) -> str | None:
    p = doc["timings"].get("projection")
    if not p:
        return None
    gpus = ", ".join(f"{n} GPU{'s' if n != '1' else ''} {s / 60:.1f} min" for n, s in p["gpus"].items())
    return (f"projected {p['layers']}-layer sweep: {gpus} (median {p['per_layer_s']:.2f} s per layer over "
            f"{p['measured_layers']} layer(s), start-up {p['startup_s']:.2f} s)")


def _units_table(doc: dict, narrow: bool):
    """Units x verdict counts, the worst SQNR and the largest bound ratio with their stages; narrow:
    shorter headers, no vertical rules, cells that fold instead of losing characters."""
    from verify.report.document import stage_bound_ratios  # noqa: PLC0415

    backend = doc.get("backend")
    table = new_table(f"model sweep: {doc['run']['checkpoint']} "
                      f"({backend['name'] if backend else 'reference only'}, {doc['run']['options']['tokens']} tokens)",
                      narrow)
    for col, short in (("unit", "unit"), ("pass", "pass"), ("fail", "fail"), ("not served", "n/s"), ("n/a", "n/a"),
                       ("worst SQNR dB (stage)", "worst SQNR dB"), ("max bound ratio (stage)", "max bound ratio"),
                       ("time s", "s"), ("rank", "rank")):
        table.add_column(short if narrow else col, justify="left" if col == "unit" or "(" in col else "right",
                         overflow="fold")
    for u in doc["units"]:
        c = u["counts"]
        worst = min(((as_float(m.get("sqnr_db")), st) for st, m in u["metrics"].items()
                     if as_float(m.get("sqnr_db")) is not None), default=None)
        ratios = stage_bound_ratios(u)
        top = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
        fail = f"[bold red]{c['fail']}[/]" if c["fail"] else "0"
        table.add_row(u["unit"]["name"], str(c["pass"]), fail, str(c["not served"]), str(c["skipped"]),
                      f"{worst[0]:.2f} ({worst[1]})" if worst else ("-" if u["verified"] else "not verified"),
                      (f"[bold red]{format_ratio(top[1])}[/]" if not top[1] <= 1 else format_ratio(top[1])) +
                      f" ({top[0]})" if top else "-",
                      f"{u['timings_s'].get('total', 0):.2f}", str(u.get("rank", "")))
    return table


def print_summary(console, doc: dict, *, report_dir: Path | None = None, html: bool = True) -> None:
    """Units x verdict counts table, the worst stages, failures, timings and projections."""
    s = doc["summary"]
    console.print(Adaptive(lambda narrow: _units_table(doc, narrow)))
    for f in s["failures"][:20]:
        console.print(f"[bold red]FAIL[/] {f['unit']} {f['stage']} {f['check']}: {escape(first_line(f['message']))}")
    if len(s["failures"]) > 20:
        console.print(f"... and {len(s['failures']) - 20} more failures (report.json)")
    for f in s.get("control_failures", [])[:20]:
        console.print(f"[bold red]BLIND[/] {f['unit']} {f['stage']} {f['check']}: {escape(first_line(f['message']))}")
    for name, note in s.get("not_verified", {}).items():
        console.print(f"[yellow]{name}[/]: {note}")
    v = s["verdicts"]
    style = {"pass": "bold green", "fail": "bold red"}.get(s["status"], "yellow")
    console.print(f"[{style}]{s['status'].upper()}[/]: {v['pass']} pass, {v['fail']} fail, {v['not served']} not served, "
                  f"{v['skipped']} n/a over {len(doc['units'])} unit(s)")
    for line in provenance_lines([u.get("provenance") for u in doc["units"]]):  # kernels per stage, build arch
        console.print(escape(line), highlight=False)
    line = controls_line(doc)
    if line:
        console.print(line)
    console.print(timing_line(doc))
    line = projection_line(doc)
    if line:
        console.print(line)
    if report_dir is not None:
        console.print(f"report: {report_dir / 'report.json'}" + (f", {report_dir / 'report.html'}" if html else ""))
