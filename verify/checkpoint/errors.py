"""The checkpoint errors: one `CheckpointError` subclass per kind of defect, each naming the
file and the tensor where it is (either may be None)."""

from __future__ import annotations

import os

__all__ = [
    "CheckpointError", "NotACheckpointError", "MalformedConfigError", "MissingIndexError",
    "UnsupportedSchemaError", "MalformedShardError", "TruncatedShardError", "MissingTensorError",
    "DtypeMismatchError", "ShapeMismatchError", "NanScaleError",
]


class CheckpointError(ValueError):
    """A checkpoint defect. `file` and `tensor` name where (either may be None)."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = []
        if self.file:
            where.append(f"file {self.file}")
        if tensor:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)


class NotACheckpointError(CheckpointError):
    """The directory is missing, or has no config.json, or no safetensors files."""


class MalformedConfigError(CheckpointError):
    """config.json / hf_quant_config.json is not valid JSON or lacks a required key."""


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
