"""The checkpoint errors and warnings: one `CheckpointError` subclass per kind of defect, each
naming where it is (file, tensor, config key: any may be None), and `CheckpointWarning` for a
value that is legal but implausible (printed, never fatal)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import IO, Iterator

__all__ = [
    "CheckpointError", "NotACheckpointError", "UnreadableFileError", "MalformedConfigError", "ConfigValueError",
    "ConfigMismatchError", "MissingIndexError", "UnsupportedSchemaError", "MalformedShardError",
    "TruncatedShardError", "MissingTensorError", "DtypeMismatchError", "ShapeMismatchError", "NanScaleError",
    "ZeroScaleError", "ScaleEncodingError", "TensorValueError", "CheckpointWarning", "open_checkpoint_file",
    "os_error_text",
    "checkpoint_warnings_as_lines",
]


class CheckpointError(ValueError):
    """A checkpoint defect. `file`, `tensor` and `key` (a config.json / quantization config key)
    name where; any may be None."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, tensor: str | None = None,
                 key: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.key = key
        super().__init__(message + _where(self.file, tensor, key))


def _where(file: str | None, tensor: str | None, key: str | None) -> str:
    parts = [f"file {file}"] if file else []
    parts += [f"tensor {tensor!r}"] if tensor else []
    parts += [f"key {key!r}"] if key else []
    return f" [{', '.join(parts)}]" if parts else ""


class NotACheckpointError(CheckpointError):
    """The directory is missing, or has no config.json, or no safetensors files."""


class UnreadableFileError(CheckpointError):
    """A checkpoint file or directory exists but cannot be read: permission denied, a directory
    where a file should be, a symlink loop, an I/O error."""


class MalformedConfigError(CheckpointError):
    """config.json / hf_quant_config.json is not valid JSON or lacks a required key."""


class ConfigValueError(MalformedConfigError):
    """A config key holds a value of the wrong type or out of its range: a non-integer, NaN,
    negative or zero size, an unknown scoring_func, a negative swiglu_limit, exclude_modules that
    is not a list, an NVFP4 group_size other than 16."""


class ConfigMismatchError(CheckpointError):
    """The config disagrees with the tensors on disk or with the other config file: layers past
    num_hidden_layers, experts past n_routed_experts, NVFP4 weights under a non-NVFP4 quant_algo,
    config.json's quantization_config against hf_quant_config.json."""


class MissingIndexError(CheckpointError):
    """Several shards but no model.safetensors.index.json, or the index lacks weight_map."""


class UnsupportedSchemaError(CheckpointError):
    """config.json describes a model this loader has no schema for."""


class MalformedShardError(CheckpointError):
    """A safetensors header is not valid (bad length, JSON, dtype, or inconsistent offsets)."""


class TruncatedShardError(MalformedShardError):
    """The file is shorter than its header says: a tensor's bytes run past the end."""


class MissingTensorError(CheckpointError):
    """A tensor the schema needs is not in the index, or the index names a shard that lacks it."""


class DtypeMismatchError(CheckpointError):
    """A tensor's stored dtype is not one the schema allows for it."""


class ShapeMismatchError(CheckpointError):
    """A tensor's stored shape is not the one the schema and config.json give."""


class NanScaleError(CheckpointError):
    """A scale holds NaN bytes (E4M3 0x7F/0xFF, E8M0 0xFF) or a NaN/Inf/<=0 float32 scale."""


class ScaleEncodingError(CheckpointError):
    """A scale stored in another encoding than its tensor's name and dtype say: E8M0 exponent bytes
    stored as float numbers (121.0 where 2^(121-127) is meant) in an FP8 weight_scale_inv /
    weight_scale."""


class ZeroScaleError(CheckpointError):
    """Every block scale of an NVFP4 weight (of one expert, in a stack) is zero: it decodes to all
    zeros, and any comparison of its output is 0 against 0."""


class TensorValueError(CheckpointError):
    """A tensor's values cannot be used: NaN/Inf in a norm, router, unquantized or FP8 weight;
    hash-routing expert ids (tid2eid) negative or not below n_routed_experts."""


class CheckpointWarning(UserWarning):
    """A legal but implausible value (e.g. weight_scale_2 that looks inverted, input_scale 1e30):
    printed, not fatal. `code` is lint's finding code, `value` the value."""

    def __init__(self, message: str, *, code: str, file: str | os.PathLike | None = None,
                 tensor: str | None = None, value: float | None = None):
        self.code = code
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.value = value
        self.text = message + _where(self.file, tensor, None)
        super().__init__(self.text)


_ERRNO_TEXT = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EISDIR: "is a directory, not a file", errno.ENOTDIR: "a path component is not a directory",
               errno.ELOOP: "symlink loop"}


def os_error_text(e: OSError) -> str:
    """Why the OS refused a path, in the words the one-line errors use ("permission denied", "symlink loop")."""
    return _ERRNO_TEXT.get(e.errno, e.strerror or str(e))


@contextlib.contextmanager
def open_checkpoint_file(path: Path, what: str, missing: type[CheckpointError] | None = None) -> Iterator[IO[bytes]]:
    """open(path, "rb"), with the OS's refusals as one CheckpointError naming the file: permission
    denied, a directory where the file should be, a symlink loop (UnreadableFileError). A missing
    file raises `missing` when given (else FileNotFoundError propagates). `what` names the file's
    role in the message ("config.json", "shard named by the index")."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if missing is None:
            raise
        raise missing(f"{what} does not exist", file=path) from None
    except OSError as e:
        raise UnreadableFileError(f"cannot read the {what}: {os_error_text(e)}", file=path) from None
    with f:
        yield f


@contextlib.contextmanager
def checkpoint_warnings_as_lines(command: str | None, stream: IO[str] | None = None) -> Iterator[None]:
    """While active, each CheckpointWarning prints as one line `verify <command>: warning: <text>`
    (other warnings as Python prints them); restores the previous behaviour on exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if isinstance(message, CheckpointWarning):
                prefix = f"verify {command}: warning: " if command else "verify: warning: "
                print(prefix + " ".join(message.text.split()), file=stream or sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
