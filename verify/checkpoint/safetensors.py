"""The safetensors file format, read by hand: header entries (`TensorInfo`), what was read
(`IoStats`), the header scan (`scan_safetensors_header`: every structural defect of one file,
from its header and size alone), the strict header parser and the raw byte reader.

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

from verify.checkpoint.errors import (
    MalformedShardError, MissingTensorError, TruncatedShardError, UnreadableFileError, open_checkpoint_file, os_error_text,
)

__all__ = ["SAFETENSORS_DTYPES", "INDEX_FILE", "TensorInfo", "IoStats", "ShardDefect", "ShardScan",
           "SHARD_DEFECT_CODES", "scan_safetensors_header", "read_safetensors_header", "read_tensor_bytes"]

INDEX_FILE = "model.safetensors.index.json"

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


# Structural defects of one safetensors file, by code; each is found from the header and the file
# size alone. The loader refuses every one (offsets_out_of_order too, which safetensors itself
# accepts: swapped offsets of two equal-sized tensors read each tensor's bytes as the other's).
SHARD_DEFECT_CODES: dict[str, str] = {
    "header_malformed": "the 8-byte header length is implausible, the header is not a JSON object, or an entry "
                        "lacks dtype / shape / data_offsets or holds non-integers or a descending offset pair",
    "dtype_unknown": "an entry's dtype is not a safetensors dtype",
    "byte_count_mismatch": "an entry's data_offsets span != prod(shape) * itemsize of its dtype",
    "offsets_not_from_zero": "the first tensor's bytes do not start at data offset 0",
    "offsets_gap": "bytes between two tensors belong to no tensor",
    "offsets_overlap": "two tensors share bytes",
    "offsets_out_of_order": "the data is not in header order (every writer lays it out in header order; an entry "
                            "listed later whose bytes come first has had its offsets edited or swapped)",
    "shard_truncated": "the file ends before its header, or before the last tensor's bytes",
    "shard_padded": "bytes after the last tensor's data",
}


@dataclass(frozen=True)
class ShardDefect:
    """One structural defect of a checkpoint file. code: a key of SHARD_DEFECT_CODES (or of
    verify.checkpoint.defects.INDEX_DEFECT_CODES); tensor: the entry it concerns, None for the file."""

    code: str
    file: Path
    tensor: str | None
    message: str


@dataclass(frozen=True)
class ShardScan:
    """A safetensors file read up to the end of its header.

    names: every entry of the header, in header order (empty when the header did not parse:
    header_read is False); infos: the entries that are usable (parsed, known dtype, matching
    byte count), in header order; defects: every structural defect found."""

    file: Path
    size: int
    header_read: bool
    names: tuple[str, ...]
    infos: dict[str, TensorInfo]
    defects: tuple[ShardDefect, ...]


def scan_safetensors_header(path: Path, stats: IoStats | None = None) -> ShardScan:
    """Parse one safetensors file's header and check it against the file size; never raises for a
    defect (FileNotFoundError for a missing file, UnreadableFileError for one that cannot be read:
    permission denied, a directory, a symlink loop). Reads 8 + header-length bytes, no tensor data.

    Layout rule (the safetensors format): the data section starts right after the header; the
    tensors' [begin, end) data_offsets tile it from 0 to its end, without gaps or overlaps, in
    header order."""
    defects: list[ShardDefect] = []

    def found(code: str, message: str, tensor: str | None = None) -> None:
        defects.append(ShardDefect(code, path, tensor, message))

    def scan(header_read: bool, names=(), infos=None) -> ShardScan:
        return ShardScan(path, size, header_read, tuple(names), infos or {}, tuple(defects))

    with open_checkpoint_file(path, "safetensors file") as f:
        if stats is not None:
            stats.files_opened.append(path.name)
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            found("shard_truncated", f"file is {size} bytes, shorter than the 8-byte header length")
            return scan(False)
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            found("header_malformed", f"header length {n} is implausible")
            return scan(False)
        if 8 + n > size:
            found("shard_truncated", f"header says {n} header bytes but the file has {size - 8}")
            return scan(False)
        raw = f.read(n)
        if stats is not None:
            stats.header_bytes += 8 + n
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        found("header_malformed", f"header is not valid JSON ({e})")
        return scan(False)
    if not isinstance(header, dict):
        found("header_malformed", f"header is a JSON {type(header).__name__}, not an object")
        return scan(False)
    data_start, data_size = 8 + n, size - 8 - n
    names: list[str] = []
    infos: dict[str, TensorInfo] = {}
    placed: list[tuple[int, int, str]] = []  # (begin, end, name) of entries with a valid offset pair, header order
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        names.append(name)
        parsed = _parse_entry(entry)
        if parsed is None:
            found("header_malformed", f"bad header entry {entry!r}", name)
            continue
        dtype, shape, lo, hi = parsed
        if not 0 <= lo <= hi:
            found("header_malformed", f"data_offsets [{lo}, {hi}) are not an ascending pair of non-negative "
                                      "offsets", name)
            continue
        placed.append((lo, hi, name))
        if dtype not in SAFETENSORS_DTYPES:
            found("dtype_unknown", f"unknown dtype {dtype!r}", name)
            continue
        want = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if hi - lo != want:
            found("byte_count_mismatch", f"data_offsets [{lo}, {hi}) hold {hi - lo} bytes, {dtype}{list(shape)} "
                                         f"needs {want}", name)
            continue
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + lo, data_start + hi)
    defects.extend(_layout_defects(path, placed, size, data_size))
    return scan(True, names, infos)


def _parse_entry(entry) -> tuple[str, tuple[int, ...], int, int] | None:
    """(dtype, shape, begin, end) of a header entry, or None when it is not
    {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [int, int]}."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(dtype, str) and isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        return None
    return dtype, tuple(shape), offsets[0], offsets[1]


def _layout_defects(path: Path, placed: list[tuple[int, int, str]], size: int, data_size: int) -> list[ShardDefect]:
    """Gaps, overlaps, a late start, truncation, padding and header-order violations of the data
    section, from the entries' [begin, end) pairs (header order) and the data section's size."""
    out: list[ShardDefect] = []
    cursor, last = 0, None  # end of the bytes covered so far, and the tensor that ends there
    for lo, hi, name in sorted(placed):
        if lo > cursor and last is None:
            out.append(ShardDefect("offsets_not_from_zero", path, name,
                                   f"the first tensor's bytes start at data offset {lo}, not 0: {lo} bytes after the "
                                   "header belong to no tensor"))
        elif lo > cursor:
            out.append(ShardDefect("offsets_gap", path, name, f"{lo - cursor} bytes [{cursor}, {lo}) between "
                                                              f"{last!r} and this tensor belong to no tensor"))
        elif lo < cursor and hi > lo:
            out.append(ShardDefect("offsets_overlap", path, name, f"its bytes [{lo}, {hi}) overlap "
                                                                  f"[{lo}, {min(hi, cursor)}) of {last!r}"))
        if hi >= cursor:
            cursor, last = hi, name
    past = sorted(p for p in placed if p[1] > data_size)
    if past:
        lo, hi, name = past[0]
        out.append(ShardDefect("shard_truncated", path, name,
                               f"tensor bytes [{lo}, {hi}) run past the end of the data ({data_size} bytes): the file "
                               f"is truncated ({size} bytes, {cursor - data_size} short; {len(past)} tensor(s) cut)"))
    elif cursor < data_size:
        out.append(ShardDefect("shard_padded", path, last,
                               f"{data_size - cursor} bytes after the last tensor's data (the tensors end at data "
                               f"offset {cursor}, the file holds {data_size} data bytes)"))
    late = [(prev, cur) for prev, cur in zip(placed, placed[1:]) if cur[0] < prev[0]]
    if late:
        (plo, phi, prev), (lo, hi, name) = late[0]
        out.append(ShardDefect("offsets_out_of_order", path, name,
                               f"listed after {prev!r} but its bytes [{lo}, {hi}) come before that tensor's "
                               f"[{plo}, {phi}): the data is not in header order ({len(late)} such pair(s))"))
    return out


def read_safetensors_header(path: Path, stats: IoStats | None = None) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; validate it against the file size (scan_safetensors_header).

    Raises the first structural defect: TruncatedShardError for shard_truncated, MalformedShardError
    for the others (both naming the file and the tensor); MissingTensorError when the file does not
    exist; UnreadableFileError when it cannot be read."""
    try:
        scan = scan_safetensors_header(path, stats)
    except FileNotFoundError:
        raise MissingTensorError("shard named by the index does not exist", file=path) from None
    for d in scan.defects:
        error = TruncatedShardError if d.code == "shard_truncated" else MalformedShardError
        raise error(d.message, file=path, tensor=d.tensor)
    return scan.infos


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
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            raise UnreadableFileError(f"cannot read the safetensors file: {os_error_text(e)}", file=path,
                                      tensor=items[0][1].name) from None
        with f:
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
