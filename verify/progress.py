"""One progress display for every long command (`layer`, `model`, `selftest`).

On a terminal: a rich progress bar with the current step (a layer, a unit, an injected bug), its
phase (load, emulated, high, verdicts, a probe), elapsed time and ETA. Elsewhere (a CI log, a pipe),
where a bar would not render: one plain line per finished step when `log_steps`, so a long run is
never silent. The bar's refresh thread is joined when the `with` block ends, also on Ctrl-C.
"""

from __future__ import annotations

import time

__all__ = ["StepProgress"]


class StepProgress:
    """Progress over `total` steps (weights: e.g. bytes per unit, for the ETA; default 1 each)."""

    def __init__(self, console, total: int, *, what: str, enabled: bool = True, log_steps: bool = False,
                 total_weight: float | None = None):
        self.console, self.total, self.what = console, total, what
        self.enabled = enabled and total > 0
        self.bar = self.enabled and console.is_terminal
        self.log_steps = self.enabled and log_steps and not self.bar
        self.done, self.progress, self.task = 0, None, None
        self.total_weight = total_weight if total_weight else total
        self.t_step = time.perf_counter()

    def __enter__(self) -> "StepProgress":
        if self.bar:
            from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,  # noqa: PLC0415
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("{task.fields[done]}/{task.fields[count]} " + self.what),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("starting", total=self.total_weight or 1, done=0, count=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def phase(self, step: str, text: str) -> None:
        """The step now running and its phase (shown in the bar)."""
        if self.progress is not None:
            self.progress.update(self.task, description=f"{step} · {text}")

    def advance(self, step: str, summary: str = "", weight: float = 1) -> None:
        """`step` finished; in a log, one line `[k/N] step: summary (s)`."""
        self.done += 1
        seconds = time.perf_counter() - self.t_step
        self.t_step = time.perf_counter()
        if self.progress is not None:
            self.progress.update(self.task, advance=weight, done=self.done)
        elif self.log_steps:
            self.console.print(f"[{self.done}/{self.total}] {step}: {summary + ' ' if summary else ''}"
                               f"({seconds:.1f} s)", highlight=False)
