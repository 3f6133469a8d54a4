"""One frozen run configuration, built by the pytest options and by `python -m verify`.

Environment variables (all optional, prefix NVFP4V_):
  NVFP4V_CHECKPOINT   default for --checkpoint
  NVFP4V_BACKEND      default for --backend
  NVFP4V_REPORT_DIR   default for --report-dir
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from verify.errors import DeviceUnavailableError, UsageError

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
    backend: a backend spec (verify.backends.registry: a registered name, 'auto', or module:attr).
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
        from verify.backends.registry import backend_spec  # noqa: PLC0415 (the registry imports torch)

        backend_spec(self.backend)  # UsageError naming it and the registered names
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers={self.layers!r}: layer indices must be >= 0")


def parse_layers(text: str | None) -> tuple[int, ...]:
    """'0,3,5-7' -> (0, 3, 5, 6, 7); None or '' -> (). Raises UsageError (a ValueError) naming the
    bad token: not an integer, negative, or a range whose first index is above its last."""
    if not text:
        return ()
    out: list[int] = []
    for token in text.split(","):
        token = token.strip()
        try:
            if "-" in token:
                lo, hi = (int(t) for t in token.split("-", 1))
                if lo > hi:
                    raise UsageError(f"--layers {text}: invalid value (range {token!r} runs backwards; "
                                     f"write '{hi}-{lo}')", argument="--layers")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(token))
        except ValueError as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"--layers {text}: invalid value (cannot parse {token!r}; layer indices are >= 0, "
                             "e.g. '0,3,5-7')", argument="--layers") from None
    return tuple(sorted(set(out)))


def format_layers(layers) -> str:
    """(0, 1, 2, 3, 7) -> '0-3,7': the inverse of parse_layers, for messages."""
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def positive_int(text: str) -> int:
    """argparse type of counts such as --tokens: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (must be an integer >= 1)")
    return value


def check_device(text: str, *, argument: str = "--device"):
    """torch.device(text) when this machine has it; else UsageError (not a device name) or
    DeviceUnavailableError saying why (torch built without CUDA, no GPU visible, index too high)."""
    import torch  # noqa: PLC0415 (nothing heavy at import time)

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"{argument} {text}: invalid value (not a torch device; e.g. cpu, cuda, cuda:1)",
                         argument=argument) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise DeviceUnavailableError(f"{argument} {text}: device unavailable ({why})", argument=argument)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(f"{argument} {text}: device unavailable (this machine has {count} CUDA "
                                         f"device(s): cuda:0-{count - 1})", argument=argument)
        return dev
    try:  # mps, xpu, ...: ask torch
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeviceUnavailableError(f"{argument} {text}: device unavailable ({reason})", argument=argument) from None
    return dev
