"""The safetensors file format, read by hand: header entries (`TensorInfo`), what was read
(`IoStats`), the header parser and the raw byte reader.

Why not `safetensors.safe_open`: parsing the 8-byte-length + JSON header here lets the loader
(1) report truncation and header/offset defects with the file and tensor name before any byte of
data is read, (2) count opened files and bytes read exactly, and (3) read each tensor straight
into its slot of an expert stack (or through one reusable pinned buffer onto a GPU).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from verify.checkpoint.errors import MalformedShardError, MissingTensorError, TruncatedShardError

__all__ = ["SAFETENSORS_DTYPES", "TensorInfo", "IoStats", "read_safetensors_header", "read_tensor_bytes"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: dtype string, shape, absolute byte range in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class IoStats:
    """What the loader touched: files opened (in order) and bytes read (headers, tensor data)."""

    files_opened: list[str] = field(default_factory=list)
    header_bytes: int = 0
    tensor_bytes: int = 0

    def reset(self) -> None:
        self.files_opened.clear()
        self.header_bytes = 0
        self.tensor_bytes = 0


_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path, stats: IoStats | None = None) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; validate offsets against the file size."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise MissingTensorError("shard named by the index does not exist", file=path) from None
    with f:
        if stats is not None:
            stats.files_opened.append(path.name)
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedShardError(f"file is {size} bytes, shorter than the 8-byte header length", file=path)
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise MalformedShardError(f"header length {n} is implausible", file=path)
        if 8 + n > size:
            raise TruncatedShardError(f"header says {n} header bytes but the file has {size - 8}", file=path)
        raw = f.read(n)
        if stats is not None:
            stats.header_bytes += 8 + n
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedShardError(f"header is not valid JSON ({e})", file=path) from None
    data_start, data_size = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MalformedShardError(f"bad header entry {entry!r}", file=path, tensor=name) from None
        if dtype not in SAFETENSORS_DTYPES:
            raise MalformedShardError(f"unknown dtype {dtype!r}", file=path, tensor=name)
        want = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if hi - lo != want or lo < 0:
            raise MalformedShardError(f"data_offsets [{lo}, {hi}) hold {hi - lo} bytes, {dtype}{list(shape)} "
                                      f"needs {want}", file=path, tensor=name)
        if hi > data_size:
            raise TruncatedShardError(f"tensor bytes [{lo}, {hi}) run past the end of the data "
                                      f"({data_size} bytes): the file is truncated", file=path, tensor=name)
        out[name] = TensorInfo(name, path, dtype, shape, data_start + lo, data_start + hi)
    return out


def read_tensor_bytes(infos: list[TensorInfo], dst_u8: Tensor, stats: IoStats | None = None) -> None:
    """Read the bytes of `infos` (equal sizes) into rows of dst_u8 [len(infos), nbytes] on any device.

    Each file is opened once and read in offset order; a device destination goes through one
    pinned staging buffer. TruncatedShardError (naming the file and tensor) on a short read;
    stats.tensor_bytes counts the bytes read."""
    on_cpu = dst_u8.device.type == "cpu"
    staging = None
    if not on_cpu and infos:
        staging = torch.empty(infos[0].nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    by_file: dict[Path, list[tuple[int, TensorInfo]]] = {}
    for j, info in enumerate(infos):
        by_file.setdefault(info.file, []).append((j, info))
    for path, items in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for j, info in sorted(items, key=lambda t: t[1].start):
                buf = dst_u8[j] if on_cpu else staging
                f.seek(info.start)
                got = _readinto_full(f, buf)
                if got != info.nbytes:
                    raise TruncatedShardError(f"read {got} of {info.nbytes} bytes", file=path, tensor=info.name)
                if stats is not None:
                    stats.tensor_bytes += got
                if not on_cpu:
                    dst_u8[j].copy_(staging)


def _readinto_full(f, buf_u8: Tensor) -> int:
    """readinto until the buffer is full or EOF (a raw read may return fewer bytes)."""
    if buf_u8.numel() == 0:
        return 0
    view = memoryview(buf_u8.numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got
