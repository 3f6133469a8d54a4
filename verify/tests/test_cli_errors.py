"""`python -m verify`: every documented user error is one line on stderr and exit status 2.

Each case builds its bad input (a copied and damaged golden/mini-v4, a bad argument, a device
or backend this machine lacks), runs the CLI in-process through verify.__main__.main, and
checks the line names the command, the error class or kind, and the argument, file or tensor
at fault; then that --debug adds the traceback. A few cases also run as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from verify.__main__ import main
from verify.backends import get_backend
from verify.config import GOLDEN_DIR
from verify.checkpoint.writer import PRESETS, make_checkpoint, make_edited_checkpoint
from verify.layer_report import VERDICT_OPS, held_layers, select_layers

MINI_V4 = GOLDEN_DIR / "mini-v4"
INDEX = "model.safetensors.index.json"
WQ_A = "layers.0.attn.wq_a.weight"
WQ_A_SCALE = "layers.0.attn.wq_a.weight_scale"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _weight_map(d: Path) -> dict[str, str]:
    return json.loads((d / INDEX).read_text())["weight_map"]


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(MINI_V4, tmp_path / "ck"))


def _layer0_expert_shard(d: Path) -> str:
    """The shard that holds most of layer 0's tensors (its routed experts): `layer --layers 0` reads it."""
    shards = [s for n, s in _weight_map(d).items() if n.startswith("layers.0.")]
    return max(set(shards), key=shards.count)


def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _edit_tensor(tmp_path: Path, name: str, fn) -> Path:
    return make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: fn(t) if n == name else t)


def _nan_scale(t: torch.Tensor) -> torch.Tensor:
    u8 = t.view(torch.uint8).clone()
    u8[0, 0] = 0x7F  # E4M3 NaN
    return u8.view(t.dtype)


def not_a_checkpoint(tmp_path, request):
    return ["layer", "--checkpoint", str(tmp_path / "nonexistent")], ["NotACheckpointError", "nonexistent"]


def malformed_config(tmp_path, request):
    d = _copy(tmp_path)
    (d / "config.json").write_text("{")
    return ["layer", "--checkpoint", str(d)], ["MalformedConfigError", "config.json"]


def missing_index(tmp_path, request):
    d = _copy(tmp_path)
    (d / INDEX).unlink()
    return ["layer", "--checkpoint", str(d)], ["MissingIndexError", INDEX]


def unsupported_schema(tmp_path, request):
    d = _copy(tmp_path)

    def llama(cfg):
        for k in ("num_hash_layers", "o_groups"):
            cfg.pop(k, None)
        return dict(cfg, model_type="llama", architectures=["LlamaForCausalLM"])

    _edit_json(d / "config.json", llama)
    return ["layer", "--checkpoint", str(d)], ["UnsupportedSchemaError", "config.json", "llama"]


def malformed_shard(tmp_path, request):
    d = _copy(tmp_path)
    shard = d / _weight_map(d)[WQ_A]
    data = bytearray(shard.read_bytes())
    data[8] = ord("x")  # the header's opening brace: not JSON any more
    shard.write_bytes(bytes(data))
    return ["layer", "--checkpoint", str(d), "--layers", "0"], ["MalformedShardError", shard.name]


def truncated_shard(tmp_path, request):
    d = _copy(tmp_path)
    shard = d / _layer0_expert_shard(d)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return ["layer", "--checkpoint", str(d), "--layers", "0"], ["TruncatedShardError", shard.name]


def missing_tensor(tmp_path, request):
    d = _copy(tmp_path)
    _edit_json(d / INDEX, lambda idx: dict(idx, weight_map={n: s for n, s in idx["weight_map"].items() if n != WQ_A}))
    return ["layer", "--checkpoint", str(d), "--layers", "0"], ["MissingTensorError", WQ_A]


def dtype_mismatch(tmp_path, request):
    d = _edit_tensor(tmp_path, WQ_A_SCALE, lambda t: t.view(torch.uint8))  # E4M3 scales stored as U8
    return ["layer", "--checkpoint", str(d), "--layers", "0"], ["DtypeMismatchError", WQ_A_SCALE, "F8_E4M3"]


def shape_mismatch(tmp_path, request):
    d = _edit_tensor(tmp_path, WQ_A_SCALE, lambda t: t[:, :8].contiguous())
    return ["layer", "--checkpoint", str(d), "--layers", "0"], ["ShapeMismatchError", WQ_A_SCALE]


def nan_scale(tmp_path, request):
    d = _edit_tensor(tmp_path, WQ_A_SCALE, _nan_scale)
    return ["layer", "--checkpoint", str(d), "--layers", "0"], ["NanScaleError", WQ_A_SCALE]


def layers_backwards(tmp_path, request):
    return ["layer", "--layers", "3-1"], ["--layers 3-1", "invalid value", "'1-3'"]


def layers_unparsable(tmp_path, request):
    return ["layer", "--layers", "x"], ["--layers x", "invalid value", "cannot parse 'x'"]


def tokens_zero(tmp_path, request):
    return ["layer", "--tokens", "0"], ["argument --tokens", "invalid value '0'"]


def backend_unknown(tmp_path, request):
    return ["layer", "--backend", "sm80"], ["argument --backend", "invalid choice", "sm80"]


def option_unknown(tmp_path, request):
    return ["layer", "--no-such-option", "0"], ["unrecognized arguments", "--no-such-option"]


def inputs_missing(tmp_path, request):
    return ["layer", "--inputs", str(tmp_path / "x.safetensors")], ["--inputs", "x.safetensors", "no such file"]


def _inputs_file(tmp_path, **tensors) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "acts.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _x(tokens=4, hidden=256, dtype=torch.bfloat16):
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)


def inputs_is_a_directory(tmp_path, request):
    return ["layer", "--inputs", str(tmp_path)], ["--inputs", str(tmp_path), "a directory"]


def inputs_not_safetensors(tmp_path, request):
    path = tmp_path / "acts.safetensors"
    path.write_bytes(b"\x00not a safetensors header at all")
    return ["layer", "--inputs", str(path)], ["--inputs", "acts.safetensors", "not a safetensors file"]


def inputs_without_x_ffn(tmp_path, request):
    path = _inputs_file(tmp_path, hidden=_x())
    return ["layer", "--inputs", str(path)], ["acts.safetensors", "no tensor x_ffn", "hidden"]


def inputs_wrong_hidden_size(tmp_path, request):
    path = _inputs_file(tmp_path, x_ffn=_x(hidden=100), token_ids=torch.arange(4))
    return ["layer", "--inputs", str(path)], ["acts.safetensors", "x_ffn", "[4, 100]", "[T, 256]"]


def inputs_integer_dtype(tmp_path, request):
    path = _inputs_file(tmp_path, x_ffn=torch.ones(4, 256, dtype=torch.int32), token_ids=torch.arange(4))
    return ["layer", "--inputs", str(path)], ["x_ffn", "dtype torch.int32"]


def inputs_x_attn_other_shape(tmp_path, request):
    path = _inputs_file(tmp_path, x_ffn=_x(), x_attn=_x(tokens=3), token_ids=torch.arange(4))
    return ["layer", "--inputs", str(path)], ["x_attn", "[3, 256]", "x_ffn [4, 256]"]


def inputs_nan_in_x_ffn(tmp_path, request):
    x = _x()
    x[1, 7] = float("nan")
    path = _inputs_file(tmp_path, x_ffn=x, token_ids=torch.arange(4))
    return ["layer", "--inputs", str(path)], ["acts.safetensors", "tensor x_ffn", "1 NaN", "[1, 7]"]


def inputs_inf_in_x_attn(tmp_path, request):
    x = _x()
    x[2, 0] = float("-inf")
    path = _inputs_file(tmp_path, x_ffn=_x(), x_attn=x, token_ids=torch.arange(4))
    return ["layer", "--inputs", str(path)], ["tensor x_attn", "1 Inf", "[2, 0]"]


def inputs_token_id_outside_vocab(tmp_path, request):
    path = _inputs_file(tmp_path, x_ffn=_x(), token_ids=torch.tensor([0, 1, 256, 3]))
    return ["layer", "--inputs", str(path)], ["token_ids", "256 at [2]", "[0, 256)"]


def inputs_without_token_ids_for_hash_layers(tmp_path, request):
    path = _inputs_file(tmp_path, x_ffn=_x())
    return ["layer", "--inputs", str(path)], ["no tensor token_ids", "0-2", "hash routing"]


def json_is_a_directory(tmp_path, request):
    return ["layer", "--json", str(tmp_path)], ["--json", str(tmp_path), "a directory"]


def json_parent_is_a_file(tmp_path, request):
    (tmp_path / "f").write_text("x")
    return ["layer", "--json", str(tmp_path / "f" / "r.json")], ["--json", "is a file, not a directory"]


def report_dir_is_a_file(tmp_path, request):
    (tmp_path / "f").write_text("x")
    return ["model", "--report-dir", str(tmp_path / "f")], ["--report-dir", str(tmp_path / "f"), "a file, not a directory"]


def report_on_a_truncated_unit(tmp_path, request):
    units = tmp_path / "run" / "units"
    units.mkdir(parents=True)
    (units / "layer0.json").write_text('{"kind": "nvfp4-verify.unit", "schema_version": "1.0", "unit": {"na')
    return ["report", str(tmp_path / "run")], ["layer0.json", "not a complete JSON document"]


def report_on_a_foreign_json(tmp_path, request):
    (tmp_path / "report.json").write_text('{"kind": "something else"}')
    return ["report", str(tmp_path / "report.json")], ["report.json", "'something else'"]


def tokens_beyond_memory(tmp_path, request):
    return ["layer", "--tokens", "10000000"], ["--tokens 10000000", "needs about", "free", "tokens fit"]


def layers_beyond_any_model(tmp_path, request):
    return ["layer", "--layers", "0-999999999"], ["--layers 0-999999999", "out of range"]


def device_meta(tmp_path, request):
    return ["layer", "--device", "meta"], ["--device meta", "invalid value", "no data"]


def demo_k_not_a_block_multiple(tmp_path, request):
    return ["demo", "--k", "17"], ["argument --k", "invalid value '17'", "multiple of 16"]


def backend_from_environment_unknown(tmp_path, request):
    request.getfixturevalue("monkeypatch").setenv("NVFP4V_BACKEND", "sm80")
    return ["layer"], ["--backend sm80", "NVFP4V_BACKEND"]


def checkpoint_from_environment_absent(tmp_path, request):
    request.getfixturevalue("monkeypatch").setenv("NVFP4V_CHECKPOINT", str(tmp_path / "elsewhere"))
    return ["layer"], ["NotACheckpointError", "elsewhere"]


def lint_layers_unparsable(tmp_path, request):
    return ["lint", "--checkpoint", str(MINI_V4), "--layers", "1-x"], ["verify lint:", "--layers 1-x"]


def layer_out_of_range(tmp_path, request):
    return ["layer", "--layers", "7"], ["--layers 7", "layer out of range", "golden/mini-v4", "layers 0-3"]


def layer_not_held(tmp_path, request):
    pro_layer3 = request.getfixturevalue("pro_layer3")
    return (["model", "--checkpoint", str(pro_layer3), "--layers", "0"],
            ["verify model:", "--layers 0", "not in the checkpoint", "holds layer 3 of 0-60"])


def device_absent(tmp_path, request):
    dev = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU; cuda:0 where there is none
    return ["layer", "--device", dev], [f"--device {dev}", "device unavailable"]


def backend_cannot_run_here(tmp_path, request):
    cpu = torch.device("cpu")  # the references' default --device: no kernel backend runs there
    backend = get_backend("sm90")
    reason = next(r for op in VERDICT_OPS if (r := backend.unsupported_reason(op, cpu)))
    return ["layer", "--backend", "sm90"], ["--backend sm90", "backend unavailable", reason]


CASES = [
    pytest.param(not_a_checkpoint, id="NotACheckpointError-nonexistent-dir"),
    pytest.param(malformed_config, id="MalformedConfigError-config-not-json"),
    pytest.param(missing_index, id="MissingIndexError-index-deleted"),
    pytest.param(unsupported_schema, id="UnsupportedSchemaError-llama-config"),
    pytest.param(malformed_shard, id="MalformedShardError-header-not-json"),
    pytest.param(truncated_shard, id="TruncatedShardError-last-100-bytes-cut"),
    pytest.param(missing_tensor, id="MissingTensorError-wq_a-not-in-index"),
    pytest.param(dtype_mismatch, id="DtypeMismatchError-scale-stored-u8"),
    pytest.param(shape_mismatch, id="ShapeMismatchError-scale-half-width"),
    pytest.param(nan_scale, id="NanScaleError-e4m3-0x7f"),
    pytest.param(layers_backwards, id="UsageError-layers-3-1"),
    pytest.param(layers_unparsable, id="UsageError-layers-x"),
    pytest.param(tokens_zero, id="UsageError-tokens-0"),
    pytest.param(backend_unknown, id="UsageError-backend-sm80"),
    pytest.param(option_unknown, id="UsageError-unknown-option"),
    pytest.param(inputs_missing, id="UsageError-inputs-missing"),
    pytest.param(inputs_is_a_directory, id="UsageError-inputs-is-a-directory"),
    pytest.param(inputs_not_safetensors, id="InputsError-inputs-not-safetensors"),
    pytest.param(inputs_without_x_ffn, id="InputsError-inputs-without-x_ffn"),
    pytest.param(inputs_wrong_hidden_size, id="InputsError-inputs-x_ffn-wrong-hidden-size"),
    pytest.param(inputs_integer_dtype, id="InputsError-inputs-x_ffn-int32"),
    pytest.param(inputs_x_attn_other_shape, id="InputsError-inputs-x_attn-shape-differs"),
    pytest.param(inputs_nan_in_x_ffn, id="InputsError-inputs-nan-in-x_ffn"),
    pytest.param(inputs_inf_in_x_attn, id="InputsError-inputs-inf-in-x_attn"),
    pytest.param(inputs_token_id_outside_vocab, id="InputsError-inputs-token-id-outside-vocab"),
    pytest.param(inputs_without_token_ids_for_hash_layers, id="InputsError-inputs-no-token_ids-for-hash-layers"),
    pytest.param(json_is_a_directory, id="UsageError-json-is-a-directory"),
    pytest.param(json_parent_is_a_file, id="UsageError-json-parent-is-a-file"),
    pytest.param(report_dir_is_a_file, id="UsageError-report-dir-is-a-file"),
    pytest.param(report_on_a_truncated_unit, id="UnreadableReportError-report-truncated-unit"),
    pytest.param(report_on_a_foreign_json, id="UnreadableReportError-report-foreign-json"),
    pytest.param(tokens_beyond_memory, id="ResourceError-tokens-10000000"),
    pytest.param(layers_beyond_any_model, id="LayerRangeError-layers-0-999999999"),
    pytest.param(device_meta, id="UsageError-device-meta"),
    pytest.param(demo_k_not_a_block_multiple, id="UsageError-demo-k-17"),
    pytest.param(backend_from_environment_unknown, id="UsageError-NVFP4V_BACKEND-sm80"),
    pytest.param(checkpoint_from_environment_absent, id="NotACheckpointError-NVFP4V_CHECKPOINT-absent"),
    pytest.param(lint_layers_unparsable, id="UsageError-lint-layers-1-x"),
    pytest.param(layer_out_of_range, id="LayerRangeError-layers-7-of-4"),
    pytest.param(layer_not_held, id="LayerRangeError-layer-0-of-single-layer-ckpt"),
    pytest.param(device_absent, id="DeviceUnavailableError-device-cuda"),
    pytest.param(backend_cannot_run_here, id="DeviceUnavailableError-backend-sm90"),
]


@pytest.fixture(scope="module")
def pro_layer3(tmp_path_factory) -> Path:
    """The v4-pro-layer preset (only layer 3 of a 61-layer model) at a reduced size, as
    test_fixture_generation's CPU test makes it."""
    p = PRESETS["v4-pro-layer"]
    small = dataclasses.replace(p, config=dict(p.config, hidden_size=256, n_routed_experts=6, moe_intermediate_size=128,
                                               vocab_size=512, num_attention_heads=4, head_dim=64, q_lora_rank=128,
                                               o_groups=2, o_lora_rank=64), experts_per_shard=2)
    out = tmp_path_factory.mktemp("pro") / "pro"
    make_checkpoint(out, small)
    return out


def _assert_one_line(rc: int, err: str, argv: list[str], expected: list[str]) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"{argv}: exit status {rc}, stderr:\n{err}"
    assert "Traceback" not in err, f"{argv}: traceback on a user error:\n{err}"
    assert len(lines) == 1, f"{argv}: {len(lines)} stderr lines, expected 1:\n{err}"
    command = next(a for a in argv if not a.startswith("-"))
    assert lines[0].startswith(f"verify {command}: error: "), lines[0]
    missing = [s for s in expected if s not in lines[0]]
    assert not missing, f"{argv}: the line does not name {missing}:\n{lines[0]}"
    return lines[0]


@pytest.mark.parametrize("make", CASES)
def test_user_error_is_one_line_and_exit_2_and_debug_adds_the_traceback(make, tmp_path, request, capsys):
    argv, expected = make(tmp_path, request)
    rc = main(argv)
    _assert_one_line(rc, capsys.readouterr().err, argv, expected)

    rc = main([*argv, "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err, f"--debug: exit status {rc}, stderr:\n{err}"
    assert err.rstrip().splitlines()[-1].startswith("verify "), err  # the line still comes last


def test_truncated_shard_through_python_dash_m(tmp_path, request):
    argv, expected = truncated_shard(tmp_path, request)
    proc = subprocess.run([sys.executable, "-m", "verify", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    _assert_one_line(proc.returncode, proc.stderr, argv, expected)


def test_debug_before_the_command_shows_the_traceback_through_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "verify", "--debug", "layer", "--layers", "7"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "LayerRangeError" in proc.stderr, proc.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An exception that is not a documented user error propagates (python exits 1 with the traceback)."""
    import verify.layer_report

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(verify.layer_report, "cli_layer", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["layer"])


# ----------------------------------------------------------------------------- default layers


def test_layer_without_layers_runs_every_layer_of_the_full_model(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["layer", "--tokens", "1", "--json", str(out)]) == 0
    assert "layers: 0-3 (the layers this checkpoint holds)" in capsys.readouterr().out
    assert sorted(json.loads(out.read_text())["runs"]) == [f"layer{i}/dynamic-after_w2-te" for i in range(4)]


@pytest.mark.parametrize("command", ["layer", "model"])
def test_without_layers_a_single_layer_checkpoint_runs_the_layer_it_holds(command, pro_layer3, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([command, "--checkpoint", str(pro_layer3), "--tokens", "1", "--json", str(out)]) == 0
    assert "layers: 3 (the layers this checkpoint holds)" in capsys.readouterr().out
    assert list(json.loads(out.read_text())["runs"]) == ["layer3/dynamic-after_w2-te"]


def _fake_checkpoint(schema: str, num_layers: int, names: list[str]) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(schema=schema, num_layers=num_layers),
                           weight_map={n: "model.safetensors" for n in names})


@pytest.mark.parametrize("schema,num_layers,names,held", [
    pytest.param("deepseek_v4", 4, ["embed.weight", "layers.0.attn_norm.weight", "layers.2.ffn.gate.weight",
                                    "layers.10.ffn.gate.weight", "mtp.0.layers.1.x", "mtp.0.enorm.weight"], (0, 2),
                 id="v4-naming-mtp-and-past-config-ignored"),
    pytest.param("deepseek_v3", 61, ["model.embed_tokens.weight", "model.layers.3.mlp.gate.weight",
                                     "model.layers.61.eh_proj.weight", "layers.5.x"], (3,),
                 id="v3-naming-mtp-layer-61-ignored"),
    pytest.param("deepseek_v4", 61, ["layers.3.attn_norm.weight"], (3,), id="v4-single-layer"),
    pytest.param("deepseek_v4", 4, ["embed.weight", "head.weight"], (), id="v4-no-decoder-layer"),
])
def test_held_layers_reads_the_weight_map(schema, num_layers, names, held):
    assert held_layers(_fake_checkpoint(schema, num_layers, names)) == held


def test_a_checkpoint_without_decoder_layers_is_a_layer_range_error():
    from verify.errors import LayerRangeError

    with pytest.raises(LayerRangeError, match="no decoder layer"):
        select_layers(_fake_checkpoint("deepseek_v4", 4, ["embed.weight"]), None, label="x")
