"""Lint findings on the fixtures and on defective copies of them (one defect per test)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from verify.checkpoint import INDEX_FILE, STRUCTURE_DEFECT_CODES, structure_defects
from verify.config import GOLDEN_DIR
from verify.checkpoint.writer import make_checkpoint, make_edited_checkpoint
from verify.checkpoint.lint import Z_DECIDE, add_lint_arguments, cli_lint, lint_checkpoint

pytestmark = pytest.mark.lint
MINI_V4 = GOLDEN_DIR / "mini-v4"


def _swap_nibbles(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith(".weight") and t.dtype == torch.uint8:
        return (t << 4) | (t >> 4)
    return t


@pytest.fixture(scope="module")
def mini_v3(tmp_path_factory) -> Path:
    return Path(make_checkpoint(tmp_path_factory.mktemp("mini-v3"), "mini-v3")["out"])


@pytest.fixture(scope="module")
def swapped_v4(tmp_path_factory) -> Path:
    return make_edited_checkpoint(MINI_V4, tmp_path_factory.mktemp("sw") / "ck", _swap_nibbles)


def _run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    add_lint_arguments(p)
    return cli_lint(p.parse_args(argv))


def test_checkpoint_under_test_lints_clean(run_cfg):
    """`pytest -m lint --checkpoint DIR` lints DIR (default: the committed fixture)."""
    report = lint_checkpoint(run_cfg.checkpoint or MINI_V4)
    assert not report.errors, "\n".join(f"{f.code} {f.tensor}: {f.message}" for f in report.errors)


def test_mini_v3_lints_clean(mini_v3):
    report = lint_checkpoint(mini_v3)
    assert not report.errors and "nibble_order_ok" in report.codes("info")


def test_cli_exit_status_and_json(tmp_path, swapped_v4):
    out = tmp_path / "clean.json"
    assert _run_cli(["--checkpoint", str(MINI_V4), "--json", str(out)]) == 0
    j = json.loads(out.read_text())
    assert j["counts"]["error"] == 0 and j["schema"] == "deepseek_v4"
    assert _run_cli(["--checkpoint", str(swapped_v4), "--json", str(tmp_path / "bad.json")]) == 1


def test_nibble_order_separates_real_from_swapped(swapped_v4):
    good = {f.tensor: f.numbers for f in lint_checkpoint(MINI_V4).findings if f.code == "nibble_order_ok"}
    bad = {f.tensor: f.numbers for f in lint_checkpoint(swapped_v4).findings if f.code == "nibble_order_swapped"}
    experts = [t for t in good if ".experts.*." in t]
    assert len(experts) == 4 and set(experts) <= set(bad)
    for t in experts:
        assert good[t]["score"] > 0.5 and good[t]["z"] >= Z_DECIDE
        assert bad[t]["score"] < -0.5 and bad[t]["z"] <= -Z_DECIDE
        assert good[t]["score"] == pytest.approx(-bad[t]["score"], abs=1e-9)  # exact mirror: pair swap is an involution


def test_nan_scale_bytes_finding(tmp_path):
    def poison(n, t):
        if n == "layers.2.ffn.experts.4.w3.weight_scale":
            b = t.view(torch.uint8).clone()
            b[0, :3] = torch.tensor([0x7F, 0xFF, 0x7F], dtype=torch.uint8)
            return b.view(torch.float8_e4m3fn)
        return t

    f = [f for f in lint_checkpoint(make_edited_checkpoint(MINI_V4, tmp_path / "ck", poison)).errors]
    assert [(x.code, x.tensor) for x in f] == [("nan_scale_bytes", "layers.2.ffn.experts.4.w3.weight_scale")]
    assert "3 NaN" in f[0].message


@pytest.mark.parametrize("value", [0.0, -1e-3, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_bad_global_scale_finding(tmp_path, value):
    name = "layers.3.ffn.experts.1.w2.weight_scale_2"
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: torch.tensor(value) if n == name else t)
    assert [(x.code, x.tensor) for x in lint_checkpoint(d).errors] == [("bad_global_scale", name)]


@pytest.mark.parametrize("role", ["weight_scale_2", "input_scale"])
def test_w1_w3_scale_mismatch_finding(tmp_path, role):
    name = f"layers.3.ffn.experts.7.w3.{role}"
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t * 1.25 if n == name else t)
    f = [x for x in lint_checkpoint(d).findings if x.code == f"w1_w3_{role}_mismatch"]
    assert len(f) == 1 and f[0].severity == "warning"
    assert f[0].numbers["count"] == 1 and f[0].numbers["max_rel_diff"] == pytest.approx(0.2, rel=1e-6)
    assert "index 7" in f[0].message


def test_block_scale_saturation_finding(tmp_path):
    name = "layers.3.ffn.experts.0.w1.weight_scale"
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck",
                               lambda n, t: torch.full_like(t.view(torch.uint8), 0x7E).view(torch.float8_e4m3fn)
                               if n == name else t)
    f = [x for x in lint_checkpoint(d).findings if x.code == "block_scale_saturation" and x.severity == "warning"]
    assert [x.tensor for x in f] == ["layers.3.ffn.experts.*.w1.weight_scale"]
    assert f[0].numbers["frac_448"] == pytest.approx(1 / 16, abs=2e-3)  # plus the fixture's own few


def test_clean_fixture_has_few_saturated_or_zero_block_scales():
    for f in lint_checkpoint(MINI_V4).findings:
        if f.code == "block_scale_saturation":
            assert f.severity == "info" and f.numbers["frac_448"] < 0.01 and f.numbers["frac_0"] < 0.01, f


def test_exclude_modules_consistency(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: t)
    q = json.loads((d / "hf_quant_config.json").read_text())
    q["quantization"]["exclude_modules"].remove("layers.1.attn*")
    q["quantization"]["exclude_modules"].append("layers.0.attn.wq_a")
    (d / "hf_quant_config.json").write_text(json.dumps(q))
    errs = {(f.code, f.tensor) for f in lint_checkpoint(d).errors}
    assert ("excluded_but_nvfp4", "layers.0.attn.wq_a") in errs
    assert ("not_excluded_but_fp8_block128", "layers.1.attn.wkv") in errs


def test_schema_defects_are_findings_one_each(tmp_path):
    a, b = "layers.1.ffn.experts.3.w2.weight_scale", "layers.1.attn.wq_b.weight"

    def edit(n, t):
        if n == a:
            return t.view(torch.uint8)  # wrong dtype
        if n == b:
            return t[:-1].contiguous()  # wrong shape
        return t

    errs = {(f.code, f.tensor) for f in lint_checkpoint(make_edited_checkpoint(MINI_V4, tmp_path / "ck", edit)).errors}
    assert errs == {("DtypeMismatchError", a), ("ShapeMismatchError", b)}


def test_not_a_checkpoint_is_one_error(tmp_path):
    r = lint_checkpoint(tmp_path)
    assert [f.code for f in r.findings] == ["NotACheckpointError"]


# ============================================================================= structure (headers and file sizes)

GLOBALS_SHARD = "model-00001-of-00010.safetensors"  # embed.weight, head.weight, norm.weight: no decoder layer
T_SCALE = "layers.3.ffn.experts.2.w1.weight_scale"


def _read_shard(path: Path) -> tuple[dict, bytearray]:
    """(header as an ordered dict, the data section's bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def _write_shard(path: Path, header: dict, data: bytes) -> None:
    """Write a header exactly as given (offsets are not recomputed), then the data section."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data))


def _shard_of(d: Path, name: str) -> str:
    return json.loads((d / INDEX_FILE).read_text())["weight_map"][name]


def _in_data_order(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def _shift_from(header: dict, data: bytearray, name: str, delta: int) -> bytearray:
    """Move the offsets of `name` and of every tensor after it (data order) by `delta` bytes and
    resize the data section to match: delta > 0 inserts zero bytes where `name` started, delta < 0
    cuts |delta| bytes off the end. Only the header's layout changes, every byte count stays."""
    names = _in_data_order(header)
    start = header[name]["data_offsets"][0]
    for n in names[names.index(name):]:
        header[n]["data_offsets"] = [o + delta for o in header[n]["data_offsets"]]
    return data[:start] + bytearray(delta) + data[start:] if delta > 0 else data[:len(data) + delta]


def _rewrite_shard_of(d: Path, name: str, edit: Callable[[dict, bytearray], bytearray]) -> str:
    """Rewrite the shard holding `name` with edit(header, data) -> data (the header edited in place)."""
    shard = _shard_of(d, name)
    header, data = _read_shard(d / shard)
    _write_shard(d / shard, header, edit(header, data))
    return shard


def _set_header_field(d: Path, name: str, key: str, value) -> str:
    def edit(h: dict, data: bytearray) -> bytearray:
        h[name][key] = value
        return data

    return _rewrite_shard_of(d, name, edit)


# Each builder damages the copy `d` of mini-v4 and returns (file name, tensor) the finding must name.

def _truncate_globals(d: Path) -> tuple[str, str]:
    with open(d / GLOBALS_SHARD, "r+b") as f:
        f.truncate((d / GLOBALS_SHARD).stat().st_size - 100)
    return GLOBALS_SHARD, "norm.weight"


def _truncate_inside_expert_weight(d: Path) -> tuple[str, str]:
    name = "layers.0.ffn.experts.7.w3.weight"
    shard = _shard_of(d, name)
    header, data = _read_shard(d / shard)
    lo, hi = header[name]["data_offsets"]
    with open(d / shard, "r+b") as f:  # cut the file in the middle of that tensor's bytes
        f.truncate((d / shard).stat().st_size - len(data) + (lo + hi) // 2)
    return shard, name


def _pad(d: Path) -> tuple[str, str]:
    shard = _shard_of(d, "layers.2.ffn.experts.0.w1.weight")
    with open(d / shard, "ab") as f:
        f.write(bytes(64))
    return shard, _in_data_order(_read_shard(d / shard)[0])[-1]


def _overlap(d: Path) -> tuple[str, str]:
    return _rewrite_shard_of(d, T_SCALE, lambda h, data: _shift_from(h, data, T_SCALE, -8)), T_SCALE


def _gap(d: Path) -> tuple[str, str]:
    return _rewrite_shard_of(d, T_SCALE, lambda h, data: _shift_from(h, data, T_SCALE, 16)), T_SCALE


def _not_from_zero(d: Path) -> tuple[str, str]:
    first = _in_data_order(_read_shard(d / _shard_of(d, T_SCALE))[0])[0]
    return _rewrite_shard_of(d, T_SCALE, lambda h, data: _shift_from(h, data, first, 16)), first


def _out_of_order(d: Path) -> tuple[str, str]:
    a, b = "layers.3.ffn.experts.2.w1.weight_scale_2", "layers.3.ffn.experts.2.w1.input_scale"  # 4 bytes each

    def swap(h: dict, data: bytearray) -> bytearray:
        assert list(h).index(b) == list(h).index(a) + 1
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        return data

    return _rewrite_shard_of(d, a, swap), b  # b is listed after a, its bytes now come first


def _shape_vs_bytes(d: Path) -> tuple[str, str]:
    return _set_header_field(d, T_SCALE, "shape", [128, 17]), T_SCALE


def _dtype_vs_bytes(d: Path) -> tuple[str, str]:
    return _set_header_field(d, T_SCALE, "dtype", "BF16"), T_SCALE


def _unknown_dtype(d: Path) -> tuple[str, str]:
    return _set_header_field(d, T_SCALE, "dtype", "F4_E2M1"), T_SCALE


def _header_not_json(d: Path) -> tuple[str, str]:
    shard = _shard_of(d, T_SCALE)
    data = bytearray((d / shard).read_bytes())
    data[8] = ord("x")  # the header's opening brace
    (d / shard).write_bytes(bytes(data))
    return shard, ""


def _delete_shard(d: Path) -> tuple[str, str]:
    shard = "model-00004-of-00010.safetensors"
    first = min(n for n, s in json.loads((d / INDEX_FILE).read_text())["weight_map"].items() if s == shard)
    (d / shard).unlink()
    return shard, first


def _shard_is_a_directory(d: Path) -> tuple[str, str]:
    (d / GLOBALS_SHARD).unlink()
    (d / GLOBALS_SHARD).mkdir()
    return GLOBALS_SHARD, "embed.weight"  # the first tensor the index maps to it


def _drop_tensor_from_shard(d: Path) -> tuple[str, str]:
    def drop(h: dict, data: bytearray) -> bytearray:
        lo, hi = h.pop(T_SCALE)["data_offsets"]
        for n in h:
            if n != "__metadata__" and h[n]["data_offsets"][0] >= hi:
                h[n]["data_offsets"] = [o - (hi - lo) for o in h[n]["data_offsets"]]
        return data[:lo] + data[hi:]

    return _rewrite_shard_of(d, T_SCALE, drop), T_SCALE


def _drop_tensor_from_index(d: Path) -> tuple[str, str]:
    shard = _shard_of(d, T_SCALE)
    index = json.loads((d / INDEX_FILE).read_text())
    del index["weight_map"][T_SCALE]
    (d / INDEX_FILE).write_text(json.dumps(index))
    return shard, T_SCALE


def _unindexed_shard(d: Path) -> tuple[str, str]:
    shutil.copy(d / GLOBALS_SHARD, d / "extra.safetensors")
    return "extra.safetensors", "embed.weight"


def _index_entry_not_a_file_name(d: Path) -> tuple[str, str]:
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"]["norm.weight"] = 7
    (d / INDEX_FILE).write_text(json.dumps(index))
    return INDEX_FILE, "norm.weight"


STRUCTURE_DEFECTS = [
    pytest.param("shard_truncated", _truncate_globals, id="truncated-last-100-bytes-of-globals-shard"),
    pytest.param("shard_truncated", _truncate_inside_expert_weight, id="truncated-mid-decoder-layer-shard"),
    pytest.param("shard_padded", _pad, id="padded-file"),
    pytest.param("offsets_overlap", _overlap, id="overlapping-offsets"),
    pytest.param("offsets_gap", _gap, id="gap-between-tensors"),
    pytest.param("offsets_not_from_zero", _not_from_zero, id="offsets-not-from-zero"),
    pytest.param("offsets_out_of_order", _out_of_order, id="out-of-order-offsets"),
    pytest.param("byte_count_mismatch", _shape_vs_bytes, id="shape-vs-bytes-mismatch"),
    pytest.param("byte_count_mismatch", _dtype_vs_bytes, id="dtype-vs-bytes-mismatch"),
    pytest.param("dtype_unknown", _unknown_dtype, id="unknown-dtype"),
    pytest.param("header_malformed", _header_not_json, id="header-not-json"),
    pytest.param("shard_missing", _delete_shard, id="index-names-missing-shard"),
    pytest.param("shard_unreadable", _shard_is_a_directory, id="shard-is-a-directory"),
    pytest.param("index_tensor_not_in_shard", _drop_tensor_from_shard, id="index-tensor-missing-from-shard"),
    pytest.param("tensor_not_in_index", _drop_tensor_from_index, id="shard-tensor-missing-from-index"),
    pytest.param("shard_not_in_index", _unindexed_shard, id="shard-not-in-index"),
    pytest.param("index_malformed", _index_entry_not_a_file_name, id="index-entry-not-a-file-name"),
]
# Checkpoint.open refuses that index as well, and lint reports its error too (by class name).
ALSO_FROM_OPEN = {"index_malformed": {"MissingIndexError"}}


@pytest.mark.parametrize("code,damage", STRUCTURE_DEFECTS)
def test_structure_defect_is_one_error_naming_file_and_tensor(tmp_path, code, damage):
    d = tmp_path / "ck"
    shutil.copytree(MINI_V4, d)
    file, tensor = damage(d)
    report = lint_checkpoint(d)
    structural = [(f.code, Path(f.file).name, f.tensor) for f in report.errors if f.code in STRUCTURE_DEFECT_CODES]
    assert structural == [(code, file, tensor)], "\n".join(f"{f.code} {f.file} {f.tensor}: {f.message}"
                                                           for f in report.errors)
    # the layers in a damaged file are skipped, not reported a second time
    assert {f.code for f in report.errors} - set(STRUCTURE_DEFECT_CODES) == ALSO_FROM_OPEN.get(code, set())
    assert _run_cli(["--checkpoint", str(d), "--json", str(tmp_path / "lint.json")]) == 1
    j = json.loads((tmp_path / "lint.json").read_text())
    assert (code, file, tensor) in {(f["code"], Path(f["file"] or "").name, f["tensor"]) for f in j["findings"]}


def test_structure_defect_cases_cover_every_code():
    assert {p.values[0] for p in STRUCTURE_DEFECTS} == set(STRUCTURE_DEFECT_CODES)


@pytest.mark.parametrize("fixture", ["mini-v4", "mini-v3"])
def test_clean_fixture_has_no_structure_defects(request, fixture):
    d = MINI_V4 if fixture == "mini-v4" else request.getfixturevalue("mini_v3")
    assert structure_defects(d) == []


def test_clean_mini_v4_lints_with_zero_errors():
    assert lint_checkpoint(MINI_V4).errors == []


def test_a_damaged_file_skips_exactly_the_layers_it_holds(tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(MINI_V4, d)
    shard, _ = _pad(d)
    skipped = {f.tensor for f in lint_checkpoint(d).findings if f.code == "layer_not_checked"}
    held = {".".join(n.split(".")[:2]) for n, s in json.loads((d / INDEX_FILE).read_text())["weight_map"].items()
            if s == shard and n.startswith("layers.")}
    assert skipped == held and skipped
