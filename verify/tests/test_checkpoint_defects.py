"""Bad input: each defect gives one documented CheckpointError naming the file and the tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from verify.checkpoint import (
    Checkpoint, CheckpointError, DtypeMismatchError, MalformedShardError, MissingIndexError, MissingTensorError,
    NanScaleError, NotACheckpointError, ShapeMismatchError, TruncatedShardError, read_safetensors_header,
)
from verify.config import GOLDEN_DIR
from verify.checkpoint.writer import make_edited_checkpoint

MINI_V4 = GOLDEN_DIR / "mini-v4"
T = "layers.3.ffn.experts.2.w1.weight_scale"


def _shard_of(d: Path, name: str) -> str:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def _edit_one(tmp_path, name, fn):
    return make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: fn(t) if n == name else t)


def test_truncated_shard(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    shard = d / _shard_of(d, T)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(TruncatedShardError) as e:
        Checkpoint.open(d).load_layer(3)
    assert shard.name in str(e.value) and e.value.tensor and e.value.tensor.startswith("layers.3.")


def test_truncated_globals_shard_names_norm_weight(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    shard = d / _shard_of(d, "norm.weight")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(TruncatedShardError) as e:
        Checkpoint.open(d).get_tensor("norm.weight")
    assert e.value.tensor == "norm.weight" and shard.name in str(e.value)


def test_padded_shard_is_refused(tmp_path):
    """Bytes after the last tensor: safetensors itself refuses such a file, and so does the loader."""
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    shard = d / _shard_of(d, T)
    last = max(read_safetensors_header(shard).values(), key=lambda i: i.end).name
    with open(shard, "ab") as f:
        f.write(bytes(64))
    with pytest.raises(MalformedShardError) as e:
        Checkpoint.open(d).load_layer(3)
    assert not isinstance(e.value, TruncatedShardError)
    assert e.value.tensor == last and shard.name in str(e.value) and "64 bytes after the last tensor" in str(e.value)


@pytest.mark.parametrize("name,where", [(T, ".safetensors"), ("layers.3.ffn.gate.bias", "model.safetensors.index.json"),
                                        ("layers.3.ffn.experts.9.w2.weight", "model.safetensors.index.json")])
def test_missing_tensor(tmp_path, name, where):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: None if n == name else t)
    with pytest.raises(MissingTensorError) as e:
        Checkpoint.open(d).load_layer(3)
    assert e.value.tensor == name and where in str(e.value)


def test_index_names_a_shard_that_lacks_the_tensor(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    idx = d / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    j["weight_map"][T] = "model-00001-of-00010.safetensors"
    idx.write_text(json.dumps(j))
    with pytest.raises(MissingTensorError) as e:
        Checkpoint.open(d).load_layer(3)
    assert e.value.tensor == T and "model-00001-of-00010.safetensors" in str(e.value)


def test_wrong_dtype(tmp_path):
    d = _edit_one(tmp_path, T, lambda t: t.view(torch.uint8))  # E4M3 scales stored as U8
    with pytest.raises(DtypeMismatchError) as e:
        Checkpoint.open(d).load_layer(3)
    assert e.value.tensor == T and _shard_of(d, T) in str(e.value) and "F8_E4M3" in str(e.value)


def test_shape_mismatch(tmp_path):
    d = _edit_one(tmp_path, T, lambda t: t[:, :8].contiguous())
    with pytest.raises(ShapeMismatchError) as e:
        Checkpoint.open(d).load_layer(3)
    assert e.value.tensor == T and "[128, 8]" in str(e.value) and "[128, 16]" in str(e.value)


def test_transposed_scale_is_a_shape_mismatch(tmp_path):
    name = "layers.0.attn.wq_a.weight_scale"
    d = _edit_one(tmp_path, name, lambda t: t.t().contiguous())
    with pytest.raises(ShapeMismatchError) as e:
        Checkpoint.open(d).load_layer(0)
    assert e.value.tensor == name


def test_missing_index(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    os.remove(d / "model.safetensors.index.json")
    with pytest.raises(MissingIndexError) as e:
        Checkpoint.open(d)
    assert "model.safetensors.index.json" in str(e.value)


def test_nan_scale_bytes(tmp_path):
    def poison(t):
        b = t.view(torch.uint8).clone()
        b[7, 3] = 0x7F
        return b.view(torch.float8_e4m3fn)

    d = _edit_one(tmp_path, "layers.3.ffn.experts.2.w1.weight_scale", poison)
    with pytest.raises(NanScaleError) as e:
        Checkpoint.open(d).load_layer(3)
    assert e.value.tensor == "layers.3.ffn.experts.2.w1.weight_scale" and "1 NaN" in str(e.value)
    assert _shard_of(d, e.value.tensor) in str(e.value)
    assert Checkpoint.open(d).load_layer(3, check_values=False).experts is not None  # lint's path


def test_zero_global_scale(tmp_path):
    d = _edit_one(tmp_path, "layers.0.attn.wkv.weight_scale_2", lambda t: torch.zeros_like(t))
    with pytest.raises(NanScaleError) as e:
        Checkpoint.open(d).load_layer(0)
    assert e.value.tensor == "layers.0.attn.wkv.weight_scale_2"


@pytest.mark.parametrize("kind", ["empty_dir", "no_such_dir", "file", "config_without_weights", "bad_json"])
def test_not_a_checkpoint(tmp_path, kind):
    d = tmp_path / "x"
    if kind == "empty_dir":
        d.mkdir()
    elif kind == "file":
        d.write_text("hello")
    elif kind == "config_without_weights":
        d.mkdir()
        (d / "config.json").write_text((MINI_V4 / "config.json").read_text())
    elif kind == "bad_json":
        d.mkdir()
        (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(d)
    assert str(d) in str(e.value)
    if kind != "bad_json":
        assert isinstance(e.value, NotACheckpointError)


def test_errors_are_value_errors():
    assert issubclass(TruncatedShardError, CheckpointError) and issubclass(CheckpointError, ValueError)
