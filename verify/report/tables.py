"""The rich tables `python -m verify layer` (and the sweep) print per layer: the quantization loss
per stage and the backend's verdicts per stage, readable at 80 columns and in CI logs.

Both tables are renderables that pick their layout from the width they are given (a terminal's
COLUMNS, or the fixed width of a log): the full layout when it fits, else a narrow one that keeps
every cell whole (abbreviated check names and statuses, with a legend). Nothing is cut: messages go
under the table as lines that wrap at word boundaries, never into a column that truncates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["format_ratio", "loss_table", "verdict_table", "render_text", "new_table", "Adaptive", "first_line",
           "CHECK_ABBREVIATIONS", "STATUS_TEXT", "control_summary", "CONTROL_ROW"]

# check -> header of the narrow layout (at most 4 characters, the width of "FAIL")
CHECK_ABBREVIATIONS = {"bytes": "byte", "bound": "bnd", "rounding": "rnd", "ids": "ids", "weights": "wts",
                       "exact": "exct", "interval": "ivl", "batch": "btch", "padding": "pad", "valid": "vld", "sync": "sync",
                       "graph": "grph", "mode": "mode", "prepare": "prep"}
# status -> (wide text, narrow text, rich style)
STATUS_TEXT = {"pass": ("pass", "ok", "green"), "fail": ("FAIL", "FAIL", "bold red"),
               "not served": ("not served", "n/s", "yellow"), "skipped": ("n/a", "n/a", "dim")}
CONTROL_ROW = "control (known-bad)"  # the row under the stages: each check shown failing a planted defect
_NOTE_LIMIT = 300  # characters of a verdict message shown under the table (the JSON report has it all)


def format_ratio(x: float | None) -> str:
    """A bound ratio (pass <= 1) with enough digits that a failing value never reads as a passing one:
    4 decimals in [0.001, 10) (0.9999 vs 1.0001), more when rounding would put it on the other side of
    1 (1 + 2^-23 -> "1.0000001", never "1.0000"), 2 significant digits in exponent form below, 4
    significant digits above."""
    if x is None or math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.1e}"
    if abs(x) >= 10:
        return f"{x:.4g}"
    for digits in range(4, 18):
        text = f"{x:.{digits}f}"
        if (float(text) > 1) == (x > 1):
            return text
    return repr(x)


def _ratio_cell(x: float | None) -> str:
    text = format_ratio(x)
    return f"[bold red]{text}[/]" if x is not None and not x <= 1 else text


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape  # noqa: PLC0415

    return rich_escape(text)


def render_text(renderable, width: int) -> str:
    """`renderable` as plain text at `width` columns (what a log or a terminal of that width shows)."""
    import io  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buf.getvalue()


def new_table(title: str, narrow: bool):
    """The wide layout: boxed, one space of padding. The narrow one: no vertical rules, one space
    between columns, cells that fold (wrap inside the cell) rather than lose characters when even
    this does not fit."""
    from rich import box  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    if narrow:
        return Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, show_edge=False,
                     title_justify="left")
    return Table(title=title, box=box.HEAVY_HEAD, padding=(0, 1))


class Adaptive:
    """A table drawn by `build(narrow)`: the wide layout where it fits the width given, else the narrow."""

    def __init__(self, build):
        self.build = build

    def __rich_console__(self, console, options):
        wide = self.build(False)
        yield wide if _fits(console, options, wide) else self.build(True)


def _fits(console, options, table) -> bool:
    from rich.measure import Measurement  # noqa: PLC0415

    # measured without the width limit: a table always measures within the width it is given
    return Measurement.get(console, options.update(max_width=1 << 16), table).maximum <= options.max_width


# ============================================================================= loss table


_LOSS_COLUMNS = (("stage", "stage"), ("shape", "shape"), ("cosine", "cosine"), ("SQNR dB", "SQNR"),
                 ("calc_diff", "calc_diff"), ("rel-L2", "rel-L2"), ("max abs", "max abs"), ("NaN/Inf", "NaN/Inf"))


@dataclass
class _LossTable:
    title: str
    rows: list[list[str]]
    statuses: list[tuple[str, str]] | None  # (status, problem) per row when the loss rows carry one

    def _table(self, narrow: bool):
        table = new_table(self.title, narrow)
        for wide, short in _LOSS_COLUMNS:
            table.add_column(short if narrow else wide, justify="left" if wide in ("stage", "shape") else "right",
                             no_wrap=not narrow, overflow="fold")
        if self.statuses is not None:
            table.add_column("status", no_wrap=not narrow, overflow="fold")
        for k, row in enumerate(self.rows):
            extra = []
            if self.statuses is not None:
                status, _ = self.statuses[k]
                wide, short, style = STATUS_TEXT.get(status, (status, status, ""))
                extra = [f"[{style}]{short if narrow else wide}[/]" if style else (short if narrow else wide)]
            table.add_row(*row, *extra)
        return table

    def __rich_console__(self, console, options):
        wide = self._table(narrow=False)
        yield wide if _fits(console, options, wide) else self._table(narrow=True)
        for k, (status, problem) in enumerate(self.statuses or []):
            if status == "fail" and problem:
                yield f"[bold red]FAIL[/] {self.rows[k][0]}: {escape(problem)}"


def _unit_words(layer: int | str) -> str:
    """A decoder layer's index -> "layer 3"; an MTP block's unit name ("mtp.0") as it is."""
    return f"layer {layer}" if isinstance(layer, int) else layer


def loss_table(layer: int | str, name: str, tokens: int, run):
    """One row per reference stage: emulated-vs-high cosine, SQNR, calc_diff, rel-L2, max abs and the
    NaN/Inf counts; a status column (and each failing row's problem under the table) when the loss
    metrics carry `status` / `problem`."""
    rows, statuses = [], []
    for stage, m in run.loss.items():
        rows.append([stage, "x".join(map(str, run.emulated[stage].shape)), _num(m.get("cosine"), ".6f"),
                     _num(m.get("sqnr_db"), ".2f"), _num(m.get("calc_diff"), ".2e"), _num(m.get("rel_l2"), ".2e"),
                     _num(m.get("max_abs"), ".2e"), f"{m.get('nan_count', '-')}/{m.get('inf_count', '-')}"])
        statuses.append((str(m.get("status", "pass" if not m.get("problem") else "fail")), str(m.get("problem") or "")))
    has_status = any("status" in m or "problem" in m for m in run.loss.values())
    return _LossTable(f"{_unit_words(layer)}: emulated NVFP4 vs high precision ({name}, {tokens} tokens)", rows,
                      statuses if has_status else None)


def _num(x, spec: str) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    return format(x, spec)


# ============================================================================= verdict table


@dataclass
class _VerdictTable:
    title: str
    checks: list[str]
    stages: list[str]
    cells: dict[tuple[str, str], str]   # (stage, check) -> status
    ratios: dict[str, float]            # stage -> worst bound ratio
    notes: list[tuple[str, str, str]]   # (stage, status, message)
    controls: dict[str, tuple[int, int]] | None = None  # check -> (controls failing as they must, blind ones)

    def _table(self, narrow: bool, checks: list[str] | None = None, title: str | None = None, ratio: bool = True):
        checks = self.checks if checks is None else checks
        table = new_table(self.title if title is None else title, narrow)
        fold = dict(no_wrap=not narrow, overflow="fold")
        table.add_column("stage", no_wrap=True)  # a stage name is never folded: it is what a reader looks for
        for c in checks:
            table.add_column(CHECK_ABBREVIATIONS.get(c, c[:4]) if narrow else c, justify="center", **fold)
        if ratio:
            table.add_column("ratio" if narrow else "bound ratio", justify="right", **fold)
        for stage in self.stages:
            row = []
            for c in checks:
                status = self.cells.get((stage, c))
                if status is None:
                    row.append("")
                    continue
                wide, short, style = STATUS_TEXT[status]
                row.append(f"[{style}]{short if narrow else wide}[/]")
            tail = [_ratio_cell(self.ratios[stage]) if stage in self.ratios else "-"] if ratio else []
            table.add_row(stage, *row, *tail)
        if self.controls is not None:
            table.add_row(f"[dim]{CONTROL_ROW}[/]", *(_control_cell(self.controls.get(c), narrow) for c in checks),
                          *([""] if ratio else []))
        return table

    def _narrow_tables(self, console, options) -> list:
        """The narrow layout; where even it does not fit (14 check columns next to the stage names need about
        90 columns), the checks split over two tables with the same rows, the ratio in the second."""
        one = self._table(narrow=True)
        if _fits(console, options, one) or len(self.checks) < 2:
            return [one]
        half = (len(self.checks) + 1) // 2
        first, second = self.checks[:half], self.checks[half:]
        return [self._table(True, first, f"{self.title} [1/2]", ratio=False),
                self._table(True, second, f"{self.title} [2/2]")]

    def __rich_console__(self, console, options):
        wide = self._table(narrow=False)
        narrow = not _fits(console, options, wide)
        yield from self._narrow_tables(console, options) if narrow else [wide]
        if narrow:
            yield "[dim]" + ", ".join(f"{CHECK_ABBREVIATIONS.get(c, c[:4])} {c}" for c in self.checks
                                      if CHECK_ABBREVIATIONS.get(c, c[:4]) != c) + \
                "; ok pass, n/s not served, n/a not applicable; ratio: max |error| / bound (pass <= 1)[/]"
        for stage, status, message in self.notes:
            style = STATUS_TEXT[status][2]
            text = escape(message)  # messages quote tensors and labels in brackets: never markup
            yield f"[{style}]{STATUS_TEXT[status][0]}[/] {stage}: " + (f"[dim]{text}[/]" if status == "skipped" else text)


def verdict_table(layer: int | str, backend_name: str, run):
    """One row per kernel stage of the layer (table order), one column per check present and the worst
    bound ratio, then (a run with negative controls) the control row: per check, how many of its controls
    failed their planted defect as they must, or BLIND and how many passed one; under the table, per stage,
    the first line of each failure and not-served reason and
    the distinct n/a reasons (but "needs a CUDA device", which the sync / graph cells already say)."""
    from references.stages import Check  # noqa: PLC0415

    present = [c.value for c in Check if any(v.check == c.value for v in run.verdicts)]
    counts = {s: sum(v.status == s for v in run.verdicts) for s in STATUS_TEXT}
    stages = list(dict.fromkeys(v.stage for v in run.verdicts))
    cells = {(v.stage, v.check): v.status for v in run.verdicts}
    ratios, notes = {}, []
    for stage in stages:
        per = [v for v in run.verdicts if v.stage == stage]
        found = [x for v in per for k, x in v.metrics.items()
                 if k.startswith("bound_ratio") and isinstance(x, (int, float)) and not isinstance(x, bool)]
        if found:
            ratios[stage] = math.nan if any(map(math.isnan, found)) else max(found)  # NaN never hides
        for status in ("fail", "not served"):
            notes += [(stage, status, first_line(v.message if v.message.startswith(f"{v.check}:")
                                                  else f"{v.check}: {v.message}")) for v in per if v.status == status]
        skipped = dict.fromkeys(first_line(v.message) for v in per
                                if v.status == "skipped" and v.message and "CUDA device" not in v.message)
        notes += [(stage, "skipped", m) for m in skipped]
    controls = getattr(run, "controls", None) or None
    if controls is not None:
        notes += [(v.stage, "fail", f"control {v.check}: {first_line(v.message)}")
                  for v in controls if v.status == "fail"]
    title = (f"{_unit_words(layer)}: {backend_name} verdicts per stage (teacher-forced; {counts['pass']} pass, "
             f"{counts['fail']} fail, {counts['not served']} not served, {counts['skipped']} n/a)")
    return _VerdictTable(title, present, stages, cells, ratios, notes,
                         None if controls is None else control_summary(controls))


def control_summary(controls) -> dict[str, tuple[int, int]]:
    """Per check: (controls that failed as they must, controls the check passed: blind), from verdicts or
    their JSON dicts (verify.verdicts.controls); skipped controls count in neither."""
    out: dict[str, tuple[int, int]] = {}
    for v in controls:
        check, status = (v["check"], v["status"]) if isinstance(v, dict) else (v.check, v.status)
        caught, blind = out.get(check, (0, 0))
        out[check] = (caught + (status == "pass"), blind + (status == "fail"))
    return out


def _control_cell(counts: tuple[int, int] | None, narrow: bool) -> str:
    if counts is None or counts == (0, 0):
        return "[dim]-[/]"
    caught, blind = counts
    if blind:
        return f"[bold red]{'BLND' if narrow else f'BLIND {blind}'}[/]"
    return f"[green]{'ok' if narrow else f'fails {caught}/{caught}'}[/]"


def first_line(message: str) -> str:
    """The first line of a message, at most _NOTE_LIMIT characters (then " ...")."""
    line = message.split("\n")[0]
    return line if len(line) <= _NOTE_LIMIT else line[:_NOTE_LIMIT] + " ..."
