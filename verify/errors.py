"""The command-line errors `python -m verify` reports as one line on stderr, with exit status 2.

A defective checkpoint raises verify.checkpoint.CheckpointError (and its subclasses); the
classes here are the other user errors: a bad argument value, a layer the checkpoint does
not have, a device or backend this machine cannot run. Each message starts with the
argument and its value, then says what is wrong, e.g.
    --layers 7: layer out of range (checkpoint golden/mini-v4 has layers 0-3)
    --device cuda: device unavailable (torch 2.5.0+cpu is built without CUDA)
A bug is none of these: it keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CliError", "UsageError", "LayerRangeError", "InputsError", "DeviceUnavailableError", "BackendRefusedError",
           "ResourceError", "UnreadableReportError", "NonFiniteTensorError", "one_line"]


class CliError(Exception):
    """A user error of the command line. `argument` is the option at fault (e.g. "--layers"), or
    None; `command` the subcommand, where known before dispatch (argparse errors)."""

    def __init__(self, message: str, *, argument: str | None = None, command: str | None = None):
        super().__init__(message)
        self.argument = argument
        self.command = command


class UsageError(CliError, ValueError):
    """An argument value that cannot be used: unparsable, empty range, a missing input file,
    or anything argparse rejects. A ValueError too, so parse_layers keeps its contract."""


class LayerRangeError(UsageError):
    """--layers names a layer past config.json's num_hidden_layers, or one the checkpoint does
    not hold (a single-layer checkpoint); or the checkpoint holds no decoder layer at all."""


class InputsError(UsageError):
    """An --inputs file that cannot drive the layer: not a safetensors file, x_ffn missing, a tensor
    of the wrong shape or dtype, NaN / Inf values, token ids outside the vocabulary or missing for a
    hash-routed layer. The message names the file and the tensor."""


class ResourceError(UsageError):
    """An argument whose run cannot fit this machine (e.g. --tokens 10000000): the message gives the
    estimated memory, the free memory and what would fit. Raised before any layer is loaded."""


class UnreadableReportError(UsageError):
    """`python -m verify report` on a file that is not a complete report or unit document (truncated
    by a kill, not JSON, another kind of document): the message names the file."""


class DeviceUnavailableError(CliError):
    """--device names a device this machine lacks, or --backend cannot run here (the message
    carries the backend's own unsupported_reason)."""


class BackendRefusedError(CliError):
    """--backend declares a looser accumulator (u_acc) than verify.accumulator measures on it: its
    bound verdicts would pass bugs, so the harness refuses to judge with it."""


class NonFiniteTensorError(CliError):
    """A tensor or config value the reference layer reads holds NaN or Inf (a norm or router weight, a
    config scalar, the layer's inputs): the reference itself would be garbage, so the run refuses to
    start. The message names the tensor (or the --inputs file and tensor, or config.json's key).
    Scales have their own checkpoint error (verify.checkpoint.NanScaleError)."""


def one_line(exc: BaseException, command: str | None) -> str:
    """`verify <command>: error: <message>` on one line; checkpoint errors (whose messages name
    the file and tensor, not their kind) are prefixed with their class name."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, CliError):
        text = f"{type(exc).__name__}: {text}"
    return f"verify {command}: error: {text}" if command else f"verify: error: {text}"
