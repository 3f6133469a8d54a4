"""`python -m verify report RUN_DIR [--html OUT.html]`: re-render a sweep's report from its JSON.

RUN_DIR is a `python -m verify model --report-dir` directory (its report.json; without one, the
sweep did not finish: its unit documents in RUN_DIR/units are merged anew, with the plan in
RUN_DIR/sweep.json) or a report.json file. Prints the rich summary, validates the document against
the schema where `jsonschema` is installed, and writes the HTML (default RUN_DIR/report.html).

A sweep without report.json is reported "incomplete", never PASS: the summary lists the units of its
plan that have no document (a sweep killed before them), or says the plan is unknown (a run directory
of a version before sweep.json). Exit status (verify.sweep.EXIT_POLICY): 1 when a verdict failed or
the sweep is incomplete, 0 otherwise; 2 when RUN_DIR or a file in it cannot be read (a truncated unit
document is named).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from verify.errors import UnreadableReportError, UsageError

__all__ = ["add_report_arguments", "cli_report", "load_run", "read_document", "missing_units"]


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="A --report-dir of `python -m verify model`, or its report.json.")
    p.add_argument("--html", default=None, help="Where to write the HTML report. Default: RUN_DIR/report.html.")


def read_document(path: Path, kind: str, required: tuple[str, ...] = ()) -> dict:
    """The JSON document at `path` of `kind` (verify.report.document's REPORT_KIND, UNIT_KIND, ...) with
    the keys `required`; else UnreadableReportError naming the file and what is wrong with it."""
    from verify.report.document import load_json  # noqa: PLC0415

    try:
        doc = load_json(path)
    except OSError as e:
        raise UnreadableReportError(f"RUN_DIR {path}: cannot read it ({e.strerror or e})", argument="RUN_DIR") from None
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        size = path.stat().st_size
        raise UnreadableReportError(f"RUN_DIR {path}: not a complete JSON document ({size} bytes; "
                                    f"{' '.join(str(e).split())[:120]}): truncated by a kill? delete it and "
                                    "resume the sweep to redo that unit", argument="RUN_DIR") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        got = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise UnreadableReportError(f"RUN_DIR {path}: not a {kind} document (kind {got!r})", argument="RUN_DIR")
    missing = [k for k in required if k not in doc]
    if missing:
        raise UnreadableReportError(f"RUN_DIR {path}: {kind} document without {', '.join(missing)}",
                                    argument="RUN_DIR")
    return doc


def load_run(run_dir: Path) -> dict:
    """The report of a run directory: report.json, or (a sweep killed before its merge) the unit
    documents merged, status "incomplete" and summary.missing the units of the plan without one."""
    from verify.report.document import REPORT_KIND, UNIT_KIND, merge_report  # noqa: PLC0415
    from verify.sweep import PLAN_JSON, PLAN_KIND, REPORT_JSON, UNITS_DIR  # noqa: PLC0415

    if run_dir.is_file():
        return read_document(run_dir, REPORT_KIND, ("summary", "units", "run"))
    if (run_dir / REPORT_JSON).exists():
        return read_document(run_dir / REPORT_JSON, REPORT_KIND, ("summary", "units", "run"))
    paths = sorted((run_dir / UNITS_DIR).glob("*.json")) if (run_dir / UNITS_DIR).is_dir() else []
    plan = read_document(run_dir / PLAN_JSON, PLAN_KIND, ("run",)) if (run_dir / PLAN_JSON).exists() else None
    if not paths and plan is None:
        raise UsageError(f"RUN_DIR {run_dir}: invalid value (no report.json, no sweep.json and no units/*.json: not "
                         "a `python -m verify model --report-dir` directory)", argument="RUN_DIR")
    unit_keys = ("unit", "fingerprint", "verified", "note", "counts", "metrics", "verdicts", "timings_s", "device")
    docs = [read_document(p, UNIT_KIND, unit_keys) for p in paths]
    if plan is not None:
        run = plan["run"]
        planned = [u["name"] for u in run["units"]]
        docs = [d for d in docs if d["unit"]["name"] in planned and d["fingerprint"] == run["fingerprint"]]
        missing = missing_units(planned, docs)
        backend, command, created = plan.get("backend"), plan.get("command", ""), plan.get("created", "")
    else:
        run = {"checkpoint": "(unknown: no report.json and no sweep.json)", "checkpoint_schema": "-", "num_layers": None,
               "layers": ",".join(d["unit"]["name"] for d in docs), "units": [d["unit"] for d in docs],
               "fingerprint": docs[0]["fingerprint"], "options": {"tokens": "-", "act_scale": "-"},
               "device": docs[0]["device"]}
        missing, backend, command, created = None, None, "python -m verify model", ""
    doc = merge_report(docs, run=run, backend=backend, environment={}, distributed={"world_size": None},
                       timings={"phases_s": {}, "wall_s": None}, command=command, created=created)
    doc["summary"]["status"] = "incomplete"
    doc["summary"]["missing"] = missing
    return doc


def missing_units(planned: list[str], docs: list[dict]) -> list[str]:
    """The planned units, in plan order, without a unit document among docs."""
    have = {d["unit"]["name"] for d in docs}
    return [n for n in planned if n not in have]


def incomplete_line(doc: dict) -> str | None:
    """The summary line of a sweep that did not finish (None for a finished one)."""
    s = doc["summary"]
    if s["status"] != "incomplete":
        return None
    missing = s.get("missing")
    if missing is None:
        what = ("which units are missing is unknown (no sweep.json: a run directory of a version before schema 1.1); "
                f"{len(s['units'])} unit document(s) found")
    else:
        what = (f"{len(missing)} of {len(missing) + len(s['units'])} planned units missing: {', '.join(missing)}"
                if missing else "every planned unit is there but the report was never merged")
    return (f"[bold red]INCOMPLETE[/]: the sweep did not finish (no report.json); {what}. Its verdicts cover only "
            f"the units found; resume with: {doc.get('command') or 'the sweep command'}")


def cli_report(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415

    from verify.preflight import writable_file  # noqa: PLC0415
    from verify.report.html import write_html  # noqa: PLC0415
    from verify.report.terminal import print_summary  # noqa: PLC0415
    from verify.sweep import NO_BACKEND_LINE, exit_status  # noqa: PLC0415

    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise UsageError(f"RUN_DIR {run_dir}: invalid value (no such file or directory)", argument="RUN_DIR")
    out = Path(args.html) if args.html else (run_dir.parent if run_dir.is_file() else run_dir) / "report.html"
    writable_file(out, "--html" if args.html else "RUN_DIR")
    doc = load_run(run_dir)
    try:
        from verify.report.document import validate  # noqa: PLC0415

        validate(doc)
    except ImportError:
        pass
    except Exception as exc:  # jsonschema.ValidationError: the document is not a report of this schema
        raise UsageError(f"RUN_DIR {run_dir}: invalid value (not a valid model report: "
                         f"{' '.join(str(exc).split())[:300]})", argument="RUN_DIR") from None
    console = Console(width=140) if not Console().is_terminal else Console()
    print_summary(console, doc)
    line = incomplete_line(doc)
    if line:
        console.print(line, highlight=False)
    if doc.get("backend") is None and doc["summary"].get("missing", []) is not None:  # (unknown: no plan)
        console.print(NO_BACKEND_LINE, highlight=False)
    write_html(doc, out)
    console.print(f"HTML report: {out}")
    return exit_status(doc)
