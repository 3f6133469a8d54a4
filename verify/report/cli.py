"""`python -m verify report RUN_DIR [--html OUT.html]`: re-render a sweep's report from its JSON.

RUN_DIR is a `python -m verify model --report-dir` directory (its report.json; without one, the
unit documents in RUN_DIR/units are merged anew) or a report.json file. Prints the rich summary,
validates the document against the schema where `jsonschema` is installed, and writes the HTML
(default RUN_DIR/report.html). Exit 1 when the report holds a failed verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from verify.errors import UsageError

__all__ = ["add_report_arguments", "cli_report", "load_run"]


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="A --report-dir of `python -m verify model`, or its report.json.")
    p.add_argument("--html", default=None, help="Where to write the HTML report. Default: RUN_DIR/report.html.")


def load_run(run_dir: Path) -> dict:
    """The report of a run directory: report.json, or (a sweep killed before its merge) the unit
    documents merged without run-level information."""
    from verify.report.document import load_json, merge_report  # noqa: PLC0415

    if run_dir.is_file():
        return load_json(run_dir)
    if (run_dir / "report.json").exists():
        return load_json(run_dir / "report.json")
    units = sorted((run_dir / "units").glob("*.json")) if (run_dir / "units").is_dir() else []
    if not units:
        raise UsageError(f"RUN_DIR {run_dir}: invalid value (no report.json and no units/*.json: not a "
                         "`python -m verify model --report-dir` directory)", argument="RUN_DIR")
    docs = [load_json(p) for p in units]
    run = {"checkpoint": "(partial sweep: no report.json)", "checkpoint_schema": "-", "num_layers": None,
           "layers": ",".join(d["unit"]["name"] for d in docs), "units": [d["unit"] for d in docs],
           "fingerprint": docs[0]["fingerprint"], "options": {"tokens": "-", "act_scale": "-"}, "device": docs[0]["device"]}
    return merge_report(docs, run=run, backend=None, environment={}, distributed={"world_size": None},
                        timings={"phases_s": {}, "wall_s": None}, command="python -m verify report", created="")


def cli_report(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415

    from verify.report.html import write_html  # noqa: PLC0415
    from verify.report.terminal import print_summary  # noqa: PLC0415

    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise UsageError(f"RUN_DIR {run_dir}: invalid value (no such file or directory)", argument="RUN_DIR")
    if args.html and not Path(args.html).resolve().parent.is_dir():
        raise UsageError(f"--html {args.html}: invalid value (directory {Path(args.html).parent} does not exist)",
                         argument="--html")
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
    out = Path(args.html) if args.html else (run_dir.parent if run_dir.is_file() else run_dir) / "report.html"
    write_html(doc, out)
    console.print(f"HTML report: {out}")
    return 1 if doc["summary"]["status"] == "fail" else 0
