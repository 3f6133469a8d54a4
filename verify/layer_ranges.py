"""Layer index sets as users write them ('0-3,7'): the formatter shared by config and preflight."""

from __future__ import annotations

__all__ = ["format_layers"]


def format_layers(layers) -> str:
    """(0, 1, 2, 3, 7) -> '0-3,7': the inverse of parse_layers, for messages."""
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
