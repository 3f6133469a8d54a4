"""One self-contained HTML file from a model report: inline CSS, the matplotlib figures as SVG data
URIs (each image isolated: no clashing element ids), a few lines of inline JS; nothing is fetched.

The page's script checks, once loaded, that every figure decoded: it sets
`<body data-rendered="ok" data-figures="N">` (N = figures drawn) or logs a console error naming
the figures that did not render, which the `browser` test reads.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from verify.provenance import provenance_rows
from verify.report.document import as_float, stage_bound_ratios
from verify.report.plots import STATUS_COLORS, figures
from verify.report.tables import control_summary, format_ratio
from verify.report.terminal import projection_line, timing_line

__all__ = ["render_html", "write_html"]

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2125;background:#f6f7f9}
header{background:#16202c;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:20px} header p{margin:2px 0;color:#c9d1d9;font-size:13px}
main{padding:18px 28px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:14px 18px;margin:0 0 16px}
h2{font-size:16px;margin:0 0 10px}
.badge{display:inline-block;padding:3px 10px;border-radius:12px;font-weight:600;color:#fff;margin-right:8px}
.pass{background:#2e7d32}.fail{background:#c62828}.none{background:#757575}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #dde1e6;padding:3px 7px;text-align:right} th{background:#eef1f4}
td.l,th.l{text-align:left} td.bad{color:#c62828;font-weight:600}
figure{margin:8px 0 18px} figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#444;margin-bottom:4px;font-weight:600}
code{background:#eef1f4;color:#16202c;padding:1px 4px;border-radius:3px}
.muted{color:#6a737d}
"""

_JS = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('figure img'));
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-figures', String(imgs.length - bad.length));
  document.body.setAttribute('data-rendered', bad.length ? 'error' : 'ok');
  if (bad.length) {
    console.error('figures failed to render: ' + bad.map(function (i) { return i.alt; }).join(', '));
  }
});
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if k < left else ""}">{_e(h)}</th>' for k, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for k, cell in enumerate(row):
            cls = ["l"] if k < left else []
            if isinstance(cell, tuple):  # (text, css class)
                cell, extra = cell
                cls.append(extra)
            cells.append(f'<td class="{" ".join(cls)}">{_e(cell)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt(x, spec: str) -> str:
    f = as_float(x)
    return "-" if f is None else format(f, spec)


def _units_table(doc: dict) -> str:
    rows = []
    for u in doc["units"]:
        c = u["counts"]
        ratios = stage_bound_ratios(u)
        top = max(ratios.items(), key=lambda kv: kv[1]) if ratios else None
        worst = min(((as_float(m.get("sqnr_db")), s) for s, m in u["metrics"].items()
                     if as_float(m.get("sqnr_db")) is not None), default=None)
        rows.append([u["unit"]["name"], f"{u['unit']['nbytes'] / 2**20:.1f}", c["pass"],
                     (c["fail"], "bad") if c["fail"] else 0, c["not served"], c["skipped"],
                     f"{worst[0]:.2f} ({worst[1]})" if worst else ("-" if u["verified"] else "not verified"),
                     ((f"{format_ratio(top[1])} ({top[0]})", "bad") if not top[1] <= 1
                      else f"{format_ratio(top[1])} ({top[0]})") if top else "-",
                     _fmt(u["timings_s"].get("total"), ".2f"), u.get("rank", ""), u.get("device", "")])
    return _table(["unit", "MiB", "pass", "fail", "not served", "n/a", "worst SQNR dB (stage)",
                   "max bound ratio (stage)", "time s", "rank", "device"], rows)


def _timings(doc: dict) -> str:
    t = doc["timings"]
    phases = t.get("phases_s", {})
    rows = [[k, _fmt(v, ".3f")] for k, v in phases.items()]
    per_unit = []
    for u in doc["units"]:
        ts = u["timings_s"]
        per_unit.append([u["unit"]["name"], *[_fmt(ts.get(k), ".3f") for k in
                                              ("load", "emulated", "high", "verdicts", "graph_probe", "total")]])
    stage_rows = {}
    for u in doc["units"]:
        for s, v in u["timings_s"].get("stages", {}).items():
            stage_rows[s] = stage_rows.get(s, 0.0) + (as_float(v) or 0.0)
    proj = projection_line(doc)
    return (f"<p>{_e(timing_line(doc))}</p>" + (f"<p><b>{_e(proj)}</b></p>" if proj else "") +
            "<h3>Phases (seconds, summed over units)</h3>" + _table(["phase", "seconds"], rows) +
            "<h3>Per unit (seconds)</h3>" +
            _table(["unit", "load", "emulated", "high", "verdicts", "graph probe", "total"], per_unit) +
            ("<h3>Verdict seconds per stage (summed over units)</h3>" +
             _table(["stage", "seconds"], [[s, f"{v:.3f}"] for s, v in stage_rows.items()]) if stage_rows else ""))


def _declarations(doc: dict) -> str:
    env = doc.get("environment", {})
    out = "<h3>Environment</h3>" + _table(["key", "value"], [[k, v if v is not None else "-"] for k, v in env.items()])
    b = doc.get("backend")
    if b:
        out += (f"<h3>Backend <code>{_e(b['name'])}</code></h3><p>recipe <code>{_e(b['recipe'])}</code>, declared "
                f"accumulator unit roundoff u_acc = <code>{_e(b['u_acc'])}</code></p>" +
                _table(["op", "served here"], [[op, "yes" if r is None else (f"no: {r}", "bad")]
                                               for op, r in b["ops"].items()]))
    else:
        out += "<p class='muted'>No backend: the reference layer's quantization loss only.</p>"
    run = doc["run"]
    out += "<h3>Run</h3>" + _table(["key", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                       for k, v in run["options"].items()] +
                                   [["checkpoint", run["checkpoint"]], ["schema", run["checkpoint_schema"]],
                                    ["layers", run["layers"]], ["fingerprint", run["fingerprint"]],
                                    ["world size", doc.get("distributed", {}).get("world_size", 1)],
                                    ["process group", doc.get("distributed", {}).get("backend") or "-"]])
    return out


def _provenance(doc: dict) -> str:
    """Which kernels each stage's verdicts launched and the architecture each was built for (verify.provenance)."""
    docs = [u["provenance"] for u in doc["units"] if u.get("provenance")]
    if not docs:
        return "<p class='muted'>No kernel provenance (no backend, or reports written before it existed).</p>"
    archs, rows = provenance_rows(docs)
    return (f"<p>device architecture <code>{_e('/'.join(archs))}</code>; a stage whose kernel was not built for it "
            "fails its provenance verdict</p>" + _table(["stages", "kernels (build arch, how)"],
                                                       [[s, k] for s, k in rows]))


def _controls(doc: dict) -> str:
    """The negative controls per check column (schema 1.2): controls failing their known-bad input as they
    must, and blind ones (the check passed it); empty for a report without controls."""
    per = control_summary([c for u in doc["units"] for c in u.get("controls", [])])
    if not per:
        return ""
    rows = [[check, caught, blind] for check, (caught, blind) in per.items()]
    blind = [f"<li><b>{_e(f['unit'])} {_e(f['stage'])} {_e(f['check'])}</b>: {_e(f['message'])}</li>"
             for f in doc["summary"].get("control_failures", [])[:200]]
    return ("<h3>Negative controls</h3><p class=\"muted\">Each check judged once more on its stage's real output with "
            "one planted known-bad change; it must fail.</p>" + _table(["check", "failed as they must", "blind (passed)"],
                                                                       rows)
            + (f"<ul>{''.join(blind)}</ul>" if blind else ""))


def render_html(doc: dict) -> str:
    """The report page (a string)."""
    s = doc["summary"]
    status = s["status"]
    badge = {"pass": "pass", "fail": "fail"}.get(status, "none")
    v = s["verdicts"]
    b = doc.get("backend")
    figs = figures(doc)
    fig_html = "".join(
        f'<figure id="fig-{fid}"><figcaption>{_e(caption)}</figcaption>'
        f'<img alt="{_e(fid)}" src="data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()}"></figure>'
        for fid, caption, svg in figs)
    failures = "".join(f"<li><b>{_e(f['unit'])} {_e(f['stage'])} {_e(f['check'])}</b>: {_e(f['message'])}</li>"
                       for f in s["failures"][:200])
    not_verified = "".join(f"<li><b>{_e(k)}</b>: {_e(n)}</li>" for k, n in s.get("not_verified", {}).items())
    legend = " ".join(f'<span class="badge" style="background:{STATUS_COLORS[k]};color:#000">{_e(n)}</span>'
                      for k, n in (("pass", "pass"), ("fail", "fail"), ("not served", "not served"), ("skipped", "n/a")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>nvfp4-verify model report: {_e(doc['run']['checkpoint'])}</title><style>{_CSS}</style></head>
<body data-expected-figures="{len(figs)}" data-rendered="pending">
<header><h1>nvfp4-verify model report</h1>
<p><span class="badge {badge}">{_e(status.upper())}</span>{v['pass']} pass, {v['fail']} fail, {v['not served']} not served,
{v['skipped']} n/a over {len(doc['units'])} unit(s)</p>
<p>checkpoint <code>{_e(doc['run']['checkpoint'])}</code> ({_e(doc['run']['checkpoint_schema'])}), layers
{_e(doc['run']['layers'])}, backend <b>{_e(b['name'] if b else 'none (reference only)')}</b>,
{_e(doc['run']['options']['tokens'])} tokens, {_e(doc['run']['options']['act_scale'])} activation scale,
created {_e(doc.get('created', ''))}, schema {_e(doc['schema_version'])}</p></header>
<main>
<section><h2>Units</h2>{_units_table(doc)}
{f'<h3>Failures</h3><ul>{failures}</ul>' if failures else ''}
{_controls(doc)}
{f'<h3>Not verified</h3><ul>{not_verified}</ul>' if not_verified else ''}</section>
<section><h2>Plots</h2><p class="muted">{legend}</p>{fig_html or '<p class="muted">No verified unit to plot.</p>'}</section>
<section><h2>Kernels</h2>{_provenance(doc)}</section>
<section><h2>Timings</h2>{_timings(doc)}</section>
<section><h2>Environment and declarations</h2>{_declarations(doc)}</section>
</main><script>{_JS}</script></body></html>
"""


def write_html(doc: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(doc), encoding="utf-8")
    return path
