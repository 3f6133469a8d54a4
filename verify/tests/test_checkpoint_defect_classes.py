"""Every checkpoint defect class of issue 22 item 2, refused the same way by `lint` and `layer`.

Each case damages a copy of golden/mini-v4 in one way (verify.checkpoint.writer.make_edited_checkpoint)
and runs the CLI in-process (verify.__main__.main):
  lint   exit 1, with an error finding whose code and tensor/key name the defect;
  layer  exit 2, one line `verify layer: error: <CheckpointError subclass>: ...` naming the file,
         the tensor or the config key: the loader refuses the checkpoint before any stage runs.
A plausibility case (an inverted weight_scale_2, input_scale 1e30 or 1e-42) is a lint warning with
the value (lint exit 0) and one `verify layer: warning: ...` line, after which `layer` runs (exit 0).
A few cases also run through `python -m verify` in a subprocess, and through the other entry
points' loader calls (Checkpoint.open + load_layer: model, selftest, pytest -m layerN).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from verify.__main__ import main
from verify.checkpoint import Checkpoint, CheckpointError, CheckpointWarning
from verify.checkpoint.lint import lint_checkpoint
from verify.checkpoint.writer import make_edited_checkpoint, write_safetensors
from verify.config import GOLDEN_DIR, REPO_ROOT

MINI_V4 = GOLDEN_DIR / "mini-v4"
INDEX = "model.safetensors.index.json"
HF_QUANT = "hf_quant_config.json"


@dataclass(frozen=True)
class Defect:
    """One defect class. make(tmp) -> the damaged checkpoint; layer: the --layers that meets it.
    lint: (severity, code) of the finding; names: strings the finding and the layer line must hold.
    error: the CheckpointError subclass `layer` prints (None: a plausibility warning)."""

    make: Callable[[Path], Path]
    layer: int
    lint: tuple[str, str]
    error: str | None
    names: tuple[str, ...]


# ----------------------------------------------------------------------------- builders


def _config(**changes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        return make_edited_checkpoint(MINI_V4, tmp / "ck", edit_json={"config.json": lambda c: dict(c, **changes)})
    return make


def _quant(hf: dict | None = None, config_json: dict | None = None) -> Callable[[Path], Path]:
    """Change keys of hf_quant_config.json's `quantization` block and/or config.json's quantization_config."""
    def make(tmp: Path) -> Path:
        edits = {}
        if hf is not None:
            edits[HF_QUANT] = lambda q: dict(q, quantization=dict(q["quantization"], **hf))
        if config_json is not None:
            edits["config.json"] = lambda c: dict(c, quantization_config=dict(c["quantization_config"], **config_json))
        return make_edited_checkpoint(MINI_V4, tmp / "ck", edit_json=edits)
    return make


def _drop_exclude(pattern: str) -> Callable[[Path], Path]:
    """config.json's quantization_config no longer excludes `pattern` (hf_quant_config.json still does)."""
    def make(tmp: Path) -> Path:
        def edit(c):
            q = dict(c["quantization_config"])
            q["exclude_modules"] = [p for p in q["exclude_modules"] if p != pattern]
            return dict(c, quantization_config=q)
        return make_edited_checkpoint(MINI_V4, tmp / "ck", edit_json={"config.json": edit})
    return make


def _tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        return make_edited_checkpoint(MINI_V4, tmp / "ck", lambda n, t: fn(t.clone()) if n == name else t)
    return make


def _set(index, value) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t
    return fn


def _scalar(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.tensor(value, dtype=torch.float32)


def _inverted(t: torch.Tensor) -> torch.Tensor:
    return (1.0 / t.double()).to(torch.float32)


def _e4m3_bytes(index, byte: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        b = t.view(torch.uint8).clone()
        b[index] = byte
        return b.view(t.dtype)
    return fn


def _e8m0_bytes_as_numbers(tmp: Path) -> Path:
    """layers.1.attn.wq_a's V4 E8M0 `.scale` written as a V3 weight_scale_inv holding the bytes as numbers."""
    name = "layers.1.attn.wq_a.scale"
    return make_edited_checkpoint(MINI_V4, tmp / "ck", lambda n, t: {
        "layers.1.attn.wq_a.weight_scale_inv": t.view(torch.uint8).float()} if n == name else t)


def _zero_scales(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t.view(torch.uint8)).view(t.dtype)


def _extra_expert(tmp: Path) -> Path:
    """Expert 16 of layer 3 in a shard of its own (the config says n_routed_experts 16: ids 0-15)."""
    d = make_edited_checkpoint(MINI_V4, tmp / "ck")
    ck = Checkpoint.open(MINI_V4)
    extra = {n.replace(".experts.15.", ".experts.16."): ck.get_tensor(n)
             for n in ck.names_with_prefix("layers.3.ffn.experts.15.")}
    write_safetensors(d / "model-extra.safetensors", extra)
    index = json.loads((d / INDEX).read_text())
    index["weight_map"].update({n: "model-extra.safetensors" for n in extra})
    (d / INDEX).write_text(json.dumps(index))
    return d


def _swap_offsets(tmp: Path) -> Path:
    """Swap the data_offsets of two 4-byte tensors in a shard's header: each reads the other's bytes."""
    d = make_edited_checkpoint(MINI_V4, tmp / "ck")
    a, b = "layers.3.ffn.experts.2.w1.weight_scale_2", "layers.3.ffn.experts.2.w1.input_scale"
    shard = d / json.loads((d / INDEX).read_text())["weight_map"][a]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # same header length: the data section does not move
    shard.write_bytes(raw[:8] + text + raw[8 + n:])
    return d


W2_SCALE_2 = "layers.3.ffn.experts.5.w2.weight_scale_2"
W2_INPUT = "layers.3.ffn.experts.5.w2.input_scale"
CONFIG = "config.json"

DEFECTS = {
    # config values: one line at open, nothing else checked
    "hidden_size-non-integer": Defect(_config(hidden_size=256.7), 0, ("error", "ConfigValueError"), "ConfigValueError",
                                      ("'hidden_size'", "256.7", CONFIG)),
    "hidden_size-nan": Defect(_config(hidden_size=math.nan), 0, ("error", "ConfigValueError"), "ConfigValueError",
                              ("'hidden_size'", "nan", CONFIG)),
    "vocab_size-negative": Defect(_config(vocab_size=-256), 0, ("error", "ConfigValueError"), "ConfigValueError",
                                  ("'vocab_size'", "-256", CONFIG)),
    "n_routed_experts-string": Defect(_config(n_routed_experts="16"), 0, ("error", "ConfigValueError"),
                                      "ConfigValueError", ("'n_routed_experts'", "'16'", CONFIG)),
    "num_experts_per_tok-above-n_routed_experts": Defect(
        _config(num_experts_per_tok=17), 0, ("error", "ConfigValueError"), "ConfigValueError",
        ("'num_experts_per_tok'", "17", "n_routed_experts=16")),
    "num_hash_layers-above-num_hidden_layers": Defect(
        _config(num_hash_layers=5), 0, ("error", "ConfigValueError"), "ConfigValueError",
        ("'num_hash_layers'", "5", "num_hidden_layers=4")),
    "routed_scaling_factor-nan": Defect(_config(routed_scaling_factor=math.nan), 0, ("error", "ConfigValueError"),
                                        "ConfigValueError", ("'routed_scaling_factor'", "nan", CONFIG)),
    "routed_scaling_factor-negative": Defect(_config(routed_scaling_factor=-2.5), 0, ("error", "ConfigValueError"),
                                             "ConfigValueError", ("'routed_scaling_factor'", "-2.5")),
    "scoring_func-unknown": Defect(_config(scoring_func="relu"), 0, ("error", "ConfigValueError"), "ConfigValueError",
                                   ("'scoring_func'", "'relu'", "sqrtsoftplus")),
    "swiglu_limit-negative": Defect(_config(swiglu_limit=-10.0), 0, ("error", "ConfigValueError"), "ConfigValueError",
                                    ("'swiglu_limit'", "-10.0", CONFIG)),
    "swiglu_limit-inf": Defect(_config(swiglu_limit=math.inf), 0, ("error", "ConfigValueError"), "ConfigValueError",
                               ("'swiglu_limit'", "inf")),
    # config against the names on disk and against the other config file
    "num_hidden_layers-below-layers-on-disk": Defect(
        _config(num_hidden_layers=3), 0, ("error", "ConfigMismatchError"), "ConfigMismatchError",
        ("'num_hidden_layers'", "holds layer 3", "layers.3.")),
    "expert-beyond-n_routed_experts": Defect(
        _extra_expert, 3, ("error", "ConfigMismatchError"), "ConfigMismatchError",
        ("'n_routed_experts'", "layers.3.ffn.experts.16.", "model-extra.safetensors")),
    "quant_algo-FP8-on-nvfp4-weights": Defect(
        _quant(hf={"quant_algo": "FP8"}, config_json={"quant_algo": "FP8"}), 0, ("error", "ConfigMismatchError"),
        "ConfigMismatchError", ("'quant_algo'", "FP8", "layers.0.", HF_QUANT)),
    "quant_algo-config-json-disagrees-with-hf_quant_config": Defect(
        _quant(config_json={"quant_algo": "FP8"}), 0, ("error", "ConfigMismatchError"), "ConfigMismatchError",
        ("'quant_algo'", "NVFP4", "FP8", HF_QUANT)),
    "exclude_modules-config-json-disagrees-with-hf_quant_config": Defect(
        _drop_exclude("layers.1.attn*"), 1, ("error", "ConfigMismatchError"), "ConfigMismatchError",
        ("'exclude_modules'", "layers.1.attn.", HF_QUANT)),
    "group_size-32-with-16-element-scales": Defect(
        _quant(hf={"group_size": 32}, config_json={"group_size": 32}), 0, ("error", "ConfigValueError"),
        "ConfigValueError", ("'group_size'", "32", "16", HF_QUANT)),
    "exclude_modules-a-string": Defect(
        _quant(hf={"exclude_modules": "layers.*.ffn.gate"}), 0, ("error", "ConfigValueError"), "ConfigValueError",
        ("'exclude_modules'", "'layers.*.ffn.gate'", HF_QUANT)),
    # tensor values (read when the layer loads)
    "tid2eid-negative": Defect(_tensor("layers.0.ffn.gate.tid2eid", _set((5, 2), -1)), 0,
                               ("error", "expert_id_out_of_range"), "TensorValueError",
                               ("layers.0.ffn.gate.tid2eid", "-1", "token 5, slot 2", "n_routed_experts=16")),
    "tid2eid-out-of-range": Defect(_tensor("layers.1.ffn.gate.tid2eid", _set((7, 0), 16)), 1,
                                   ("error", "expert_id_out_of_range"), "TensorValueError",
                                   ("layers.1.ffn.gate.tid2eid", "-> 16", "n_routed_experts=16")),
    "norm-weight-nan": Defect(_tensor("layers.0.attn_norm.weight", _set(7, math.nan)), 0,
                              ("error", "non_finite_weight"), "TensorValueError",
                              ("layers.0.attn_norm.weight", "NaN", "[7]")),
    "kv_norm-weight-inf": Defect(_tensor("layers.2.attn.kv_norm.weight", _set(3, math.inf)), 2,
                                 ("error", "non_finite_weight"), "TensorValueError",
                                 ("layers.2.attn.kv_norm.weight", "inf")),
    "router-gate-weight-inf": Defect(_tensor("layers.3.ffn.gate.weight", _set((2, 5), -math.inf)), 3,
                                     ("error", "non_finite_weight"), "TensorValueError",
                                     ("layers.3.ffn.gate.weight", "[2, 5]", "-inf")),
    "router-gate-bias-nan": Defect(_tensor("layers.3.ffn.gate.bias", _set(4, math.nan)), 3,
                                   ("error", "non_finite_weight"), "TensorValueError",
                                   ("layers.3.ffn.gate.bias", "nan")),
    "fp8-weight-nan-byte": Defect(_tensor("layers.1.attn.wq_a.weight", _e4m3_bytes((0, 9), 0x7F)), 1,
                                  ("error", "non_finite_weight"), "TensorValueError",
                                  ("layers.1.attn.wq_a.weight", "[0, 9]")),
    "fp8-e8m0-bytes-as-numbers": Defect(_e8m0_bytes_as_numbers, 1, ("error", "e8m0_bytes_as_numbers"),
                                        "ScaleEncodingError",
                                        ("layers.1.attn.wq_a.weight_scale_inv", "E8M0 bytes read as numbers")),
    "block-scales-all-zero-expert": Defect(_tensor("layers.3.ffn.experts.4.w1.weight_scale", _zero_scales), 3,
                                           ("error", "zero_block_scales"), "ZeroScaleError",
                                           ("layers.3.ffn.experts.4.w1.weight_scale", "1 of 16 experts")),
    "block-scales-all-zero-weight": Defect(_tensor("layers.0.attn.wq_a.weight_scale", _zero_scales), 0,
                                           ("error", "zero_block_scales"), "ZeroScaleError",
                                           ("layers.0.attn.wq_a.weight_scale", "decodes to all zeros")),
    # the layout of a shard
    "swapped-offsets": Defect(_swap_offsets, 3, ("error", "offsets_out_of_order"), "MalformedShardError",
                              ("layers.3.ffn.experts.2.w1.input_scale", "not in header order")),
    # plausibility: warnings with the value, never fatal
    "weight_scale_2-inverted": Defect(_tensor(W2_SCALE_2, _inverted), 3, ("warning", "implausible_weight_scale_2"),
                                      None, (W2_SCALE_2, "inverted")),
    "input_scale-1e30": Defect(_tensor(W2_INPUT, _scalar(1e30)), 3, ("warning", "implausible_input_scale"), None,
                               (W2_INPUT, "1e+30")),
    "input_scale-1e-42": Defect(_tensor(W2_INPUT, _scalar(1e-42)), 3, ("warning", "implausible_input_scale"), None,
                                (W2_INPUT, "e-42", "subnormal")),
}
CASES = [pytest.param(name, id=name) for name in DEFECTS]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Callable[[str], Path]:
    """name -> the damaged copy (built once per module)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = DEFECTS[name].make(tmp_path_factory.mktemp(name))
        return made[name]
    return get


def _missing(text: str, names) -> list[str]:
    return [s for s in names if s not in text]


@pytest.mark.parametrize("name", CASES)
def test_lint_names_the_defect(name, damaged, tmp_path, capsys):
    """`lint` reports the defect as a finding of its code naming the tensor or key; exit 1 on an
    error, 0 on a plausibility warning."""
    defect = DEFECTS[name]
    out = tmp_path / "lint.json"
    rc = main(["lint", "--checkpoint", str(damaged(name)), "--layers", str(defect.layer), "--json", str(out)])
    capsys.readouterr()
    findings = json.loads(out.read_text())["findings"]
    severity, code = defect.lint
    hits = [f for f in findings if (f["severity"], f["code"]) == (severity, code)]
    assert hits, f"no {severity} {code} finding; got:\n" + "\n".join(
        f"{f['severity']} {f['code']} {f['tensor']}: {f['message']}" for f in findings if f["severity"] != "info")
    text = " ".join(f"{f['tensor']} {f['message']} {f['file']}" for f in hits)
    assert not _missing(text, defect.names), f"the finding does not name {_missing(text, defect.names)}:\n{text}"
    if severity == "warning":
        assert rc == 0 and all("value" in f["numbers"] for f in hits)
    else:
        assert rc == 1


@pytest.mark.parametrize("name", CASES)
def test_layer_refuses_the_defect(name, damaged, capsys):
    """`layer` on the layer that holds the defect: one line naming the CheckpointError subclass and
    the file / tensor / key, exit 2 (no stage runs); a plausibility defect: one warning line naming
    the tensor and its value, then the run goes on (exit 0)."""
    defect = DEFECTS[name]
    argv = ["layer", "--checkpoint", str(damaged(name)), "--layers", str(defect.layer), "--tokens", "4"]
    rc = main(argv)
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert "Traceback" not in captured.err, captured.err
    if defect.error is None:
        warned = [ln for ln in err if ln.startswith("verify layer: warning: ")]
        assert rc == 0, f"exit {rc}:\n{captured.err}"
        assert len(warned) == 1, f"expected one warning line:\n{captured.err}"
        assert not _missing(warned[0], defect.names), f"the warning does not name {_missing(warned[0], defect.names)}"
        return
    assert rc == 2, f"exit {rc}, stderr:\n{captured.err}"
    assert len(err) == 1, f"{len(err)} stderr lines, expected 1:\n{captured.err}"
    assert err[0].startswith(f"verify layer: error: {defect.error}: "), err[0]
    assert not _missing(err[0], defect.names), f"the line does not name {_missing(err[0], defect.names)}:\n{err[0]}"


@pytest.mark.parametrize("name", [n for n, d in DEFECTS.items() if d.error is not None])
def test_every_loader_entry_point_refuses_the_defect(name, damaged):
    """model, selftest and the pytest layer tests open the checkpoint and load layers through
    Checkpoint.open + load_layer, exactly as `layer` does: the same error, the same message."""
    defect = DEFECTS[name]
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(damaged(name)).load_layer(defect.layer)
    assert type(e.value).__name__ == defect.error
    assert not _missing(str(e.value), defect.names)


@pytest.mark.parametrize("name", ["hidden_size-non-integer", "norm-weight-nan"])
def test_model_sweep_refuses_the_defect(name, damaged, tmp_path, capsys):
    argv = ["model", "--checkpoint", str(damaged(name)), "--layers", str(DEFECTS[name].layer), "--tokens", "4",
            "--json", str(tmp_path / "r.json")]
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"verify model: error: {DEFECTS[name].error}: "), err


@pytest.mark.parametrize("name", ["hidden_size-non-integer", "router-gate-bias-nan", "input_scale-1e30"])
@pytest.mark.parametrize("command", ["lint", "layer"])
def test_through_python_dash_m(name, command, damaged):
    defect = DEFECTS[name]
    argv = [command, "--checkpoint", str(damaged(name)), "--layers", str(defect.layer)]
    if command == "layer":
        argv += ["--tokens", "4"]
    proc = subprocess.run([sys.executable, "-m", "verify", *argv], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)
    assert "Traceback" not in proc.stderr, proc.stderr
    if command == "lint":
        assert proc.returncode == (0 if defect.error is None else 1), proc.stdout + proc.stderr
        return
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if defect.error is None:
        assert proc.returncode == 0 and len(lines) == 1 and lines[0].startswith("verify layer: warning: "), lines
    else:
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"verify layer: error: {defect.error}: ") and defect.names[0] in lines[0]


def test_plausibility_warning_is_recorded_and_warned(damaged):
    """The loader keeps each CheckpointWarning (tensor, value) and emits it through warnings.warn."""
    ck = Checkpoint.open(damaged("weight_scale_2-inverted"))
    with pytest.warns(CheckpointWarning, match="inverted") as rec:
        ck.load_layer(3)
    w = [r.message for r in rec if isinstance(r.message, CheckpointWarning)]
    assert [x.tensor for x in w] == [W2_SCALE_2] == [x.tensor for x in ck.warnings]
    assert w[0].code == "implausible_weight_scale_2" and w[0].value > 1.0


@pytest.mark.parametrize("preset", ["mini-v4", "mini-v3"])
def test_fixtures_have_no_errors_and_no_plausibility_warnings(preset, tmp_path):
    """The clean fixtures stay clean under the new checks: no error finding, no plausibility warning."""
    from verify.checkpoint.writer import make_checkpoint

    d = MINI_V4 if preset == "mini-v4" else Path(make_checkpoint(tmp_path / preset, preset)["out"])
    report = lint_checkpoint(d)
    bad = [f for f in report.findings if f.severity == "error" or f.code.startswith("implausible_")]
    assert not bad, "\n".join(f"{f.code} {f.tensor}: {f.message}" for f in bad)
    ck = Checkpoint.open(d)
    for i in range(ck.config.num_layers):
        ck.load_layer(i)
    assert ck.warnings == []


def test_defect_cases_cover_every_value_defect_code():
    from verify.checkpoint import PLAUSIBILITY_CODES, VALUE_DEFECT_ERRORS

    covered = {d.lint[1] for d in DEFECTS.values()}
    missing = (set(VALUE_DEFECT_ERRORS) | set(PLAUSIBILITY_CODES)) - covered - {"nan_scale_bytes", "bad_global_scale"}
    assert not missing, f"no defect case for {sorted(missing)} (nan_scale_bytes / bad_global_scale: " \
                        "test_lint_findings and test_checkpoint_defects)"


@pytest.mark.parametrize("quantization_config", [
    pytest.param({"quant_method": "modelopt"}, id="config-json-stub-without-algo-or-list"),
    pytest.param(lambda q: dict(q, exclude_modules=None, ignore=[p.replace("attn*", "attn.*") for p in
                                                                 q["exclude_modules"]]),
                 id="ignore-list-spelled-differently-same-modules"),
])
def test_agreeing_quantization_configs_are_not_a_mismatch(quantization_config, tmp_path):
    """Only a real disagreement is refused: a stub block that defers to hf_quant_config.json, or a
    list spelled differently that excludes the same stored modules, opens and loads."""
    def edit(c):
        q = quantization_config(c["quantization_config"]) if callable(quantization_config) else quantization_config
        return dict(c, quantization_config={k: v for k, v in q.items() if v is not None})

    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", edit_json={"config.json": edit})
    ck = Checkpoint.open(d)
    assert ck.consistency_errors() == [] and ck.quant_in_config_json is not None
    assert not lint_checkpoint(d, layers=[1]).errors
