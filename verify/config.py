"""One frozen run configuration, built by the pytest options and by `python -m verify`.

Environment variables (all optional, prefix NVFP4V_):
  NVFP4V_CHECKPOINT   default for --checkpoint
  NVFP4V_BACKEND      default for --backend
  NVFP4V_REPORT_DIR   default for --report-dir
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BACKEND_NAMES = ("auto", "emulator", "sm90", "sm100")
REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT / "golden"


def env_default(name: str, fallback: str | None) -> str | None:
    """Value of NVFP4V_<name>, or `fallback` when unset or empty."""
    value = os.environ.get(f"NVFP4V_{name}", "")
    return value or fallback


@dataclass(frozen=True)
class RunConfig:
    """What to verify and where to put the results.

    checkpoint: a Hugging Face style checkpoint directory, or None for the committed fixture.
    backend: one of BACKEND_NAMES.
    layers: layer indices to verify; empty means every layer the entry point defaults to.
    update_golden: rewrite golden files (the run then fails with the diff, for review).
    report_dir: where JSON reports go; None disables them.
    """

    checkpoint: Path | None = None
    backend: str = "auto"
    layers: tuple[int, ...] = field(default_factory=tuple)
    update_golden: bool = False
    report_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend={self.backend!r} is not one of {BACKEND_NAMES}")
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers={self.layers!r}: layer indices must be >= 0")


def parse_layers(text: str | None) -> tuple[int, ...]:
    """'0,3,5-7' -> (0, 3, 5, 6, 7). Raises ValueError naming the bad token."""
    if not text:
        return ()
    out: list[int] = []
    for token in text.split(","):
        token = token.strip()
        try:
            if "-" in token:
                lo, hi = (int(t) for t in token.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(token))
        except ValueError:
            raise ValueError(f"--layers: cannot parse {token!r} (expected e.g. '0,3,5-7')") from None
    return tuple(sorted(set(out)))
