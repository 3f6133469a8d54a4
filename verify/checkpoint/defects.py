"""Structural defects of a whole checkpoint (the checks of tensor values are in values.py).

`structure_defects(dir)`: the whole checkpoint's file structure, from the index, every shard's
header and every file's size (no tensor data read): each shard's layout (SHARD_DEFECT_CODES) and
the index against the shards (INDEX_DEFECT_CODES).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from verify.checkpoint.errors import CheckpointError, UnreadableFileError
from verify.checkpoint.safetensors import INDEX_FILE, SHARD_DEFECT_CODES, ShardDefect, scan_safetensors_header

__all__ = ["structure_defects", "INDEX_DEFECT_CODES", "STRUCTURE_DEFECT_CODES"]

INDEX_DEFECT_CODES: dict[str, str] = {
    "index_malformed": "the index is not a JSON object with a non-empty weight_map of tensor -> file name",
    "shard_missing": "the index maps tensors to a file that does not exist",
    "shard_unreadable": "a checkpoint file exists but cannot be read: permission denied, a directory where the "
                        "file should be, a symlink loop",
    "index_tensor_not_in_shard": "the index maps a tensor to a file whose header does not list it",
    "tensor_not_in_index": "a file's header lists a tensor that the index does not map to that file",
    "shard_not_in_index": "a *.safetensors file that no entry of the index names",
}
STRUCTURE_DEFECT_CODES: dict[str, str] = {**SHARD_DEFECT_CODES, **INDEX_DEFECT_CODES}


def structure_defects(directory: str | os.PathLike) -> list[ShardDefect]:
    """Every structural defect of a checkpoint directory: the index's first, then file by file
    (in name order).

    Checks every file that model.safetensors.index.json names and every *.safetensors file in the
    directory: each file's header against its size (scan_safetensors_header), then, when there is
    an index, the index's entries against the headers. Reads headers and file sizes only. A
    directory that does not exist has no defects here (the loader says what it lacks)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out: list[ShardDefect] = []
    weight_map, unreadable = _index_weight_map(d / INDEX_FILE, out) if (d / INDEX_FILE).exists() else (None, set())
    by_shard: dict[str, list[str]] = {}
    for name, shard in sorted((weight_map or {}).items()):
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(set(by_shard) | {p.name for p in d.glob("*.safetensors")}):
        path = d / shard
        mapped = by_shard.get(shard, [])
        if not (path.exists() or path.is_symlink()):
            if mapped:
                out.append(ShardDefect("shard_missing", path, mapped[0], f"the index maps {len(mapped)} tensor(s) "
                                                                         "to this file, which does not exist"))
            continue
        if path.is_dir() and not mapped:  # a directory named *.safetensors that nothing maps to is no file of ours
            continue
        try:
            scan = scan_safetensors_header(path)
        except (UnreadableFileError, FileNotFoundError) as e:
            out.append(ShardDefect("shard_unreadable", path, mapped[0] if mapped else None,
                                   str(e).split(" [file ")[0] if isinstance(e, CheckpointError) else str(e)))
            continue
        out.extend(scan.defects)
        if weight_map is None or not scan.header_read:
            continue
        listed = set(scan.names)
        for name in mapped:
            if name not in listed:
                out.append(ShardDefect("index_tensor_not_in_shard", path, name,
                                       "the index maps it to this file, whose header does not list it"))
        if not mapped:
            out.append(ShardDefect("shard_not_in_index", path, scan.names[0] if scan.names else None,
                                   f"no entry of {INDEX_FILE} names this file: its {len(scan.names)} tensor(s) "
                                   "are unreachable"))
            continue
        for name in scan.names:
            if weight_map.get(name) != shard and name not in unreadable:
                where = f"the index maps it to {weight_map[name]}" if name in weight_map else "the index lacks it"
                out.append(ShardDefect("tensor_not_in_index", path, name, f"listed in this file's header, but {where}"))
    return out


def _index_weight_map(path: Path, out: list[ShardDefect]) -> tuple[dict[str, str] | None, set[str]]:
    """The index's weight_map entries whose file is a file name, and the names of the other entries
    (already reported: no shard is blamed for them); defects go to `out`. None for no weight_map."""
    try:
        index = json.loads(path.read_bytes())
    except OSError as e:
        out.append(ShardDefect("index_malformed", path, None, f"cannot be read ({e.strerror or e})"))
        return None, set()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        out.append(ShardDefect("index_malformed", path, None, f"not valid JSON ({e})"))
        return None, set()
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        out.append(ShardDefect("index_malformed", path, None, "no (or an empty) weight_map object"))
        return None, set()
    good, bad = {}, set()
    for name, shard in wm.items():
        if isinstance(shard, str) and shard:
            good[name] = shard
        else:
            bad.add(name)
            out.append(ShardDefect("index_malformed", path, name, f"maps the tensor to {shard!r}, not a file name"))
    return good, bad
