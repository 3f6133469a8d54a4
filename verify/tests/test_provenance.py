"""Provenance (issue 26 item 6), on the CPU with fakes: which kernels ran per stage and the architecture each
was built for, in the run, the unit document (schema), the terminal and the HTML; a stage whose kernel was
not built for the device's architecture fails a "provenance" verdict naming both architectures.

The device architecture is faked (verify.provenance.device_arch) and the kernels are fakes: a backend that
records a build per dense stage, the sm100 launch path with a stand-in compiled kernel, the Triton launch
hook called as Triton calls it. The real sm90 provenance on an H100: /work/notes/gpu/provenance.sh.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import verify.provenance as prov
from references.layer import RunOptions
from verify.backends import EmulatorBackend
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.provenance import KernelBuild, arch_mismatch, provenance_lines, torch_build
from verify.report.document import SCHEMA_PATH, unit_document
from verify.report.html import _provenance
from verify.run import run_layer

MINI_V4 = GOLDEN_DIR / "mini-v4"


# ============================================================================= the arch rule


@pytest.mark.parametrize("arch, how, device, ok", [
    ("sm_90a", "triton", "sm_90", True),
    ("sm_90a", "cubin", "sm_100", False),       # an sm_90a cubin on a B200
    ("sm_100a", "cute-dsl", "sm_90", False),    # an sm_100a kernel on an H100
    ("sm_100a", "cute-dsl", "sm_100", True),
    ("sm_100a", "cute-dsl", "sm_103", False),   # arch-specific: this exact major.minor only
    ("sm_100f", "cubin", "sm_103", True),       # family-specific: same major, minor <=
    ("sm_80", "cubin", "sm_86", True),          # plain cubin: binary compatible within a major
    ("sm_86", "cubin", "sm_80", False),
    ("sm_80", "cubin", "sm_90", False),
    ("compute_90", "ptx-jit", "sm_100", False),  # JIT-compiled from PTX
    ("compute_90", "ptx-jit", "sm_90", False),
    ("reference", "reference", "sm_90", True),
    (None, "torch", "sm_90", True),             # unknown: reported, never failed
    ("sm_90a", "cubin", None, True),            # a CPU device: nothing to check
], ids=lambda x: str(x))
def test_a_build_matches_a_device_by_the_documented_rule(arch, how, device, ok):
    why = arch_mismatch(KernelBuild("k", arch, how), device)
    assert (why is None) == ok, why
    if not ok:
        assert "k " in why + " " and (arch in why) and (device in why), why


def test_torch_kernels_without_the_devices_sm_in_torchs_build_are_ptx_jit(monkeypatch):
    monkeypatch.setattr(prov, "device_arch", lambda device: "sm_100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "compute_90"])
    b = torch_build("torch ops", "cuda")
    assert (b.arch, b.how) == ("compute_90", "ptx-jit") and "JIT-compiled from PTX" in arch_mismatch(b, "sm_100")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90", "sm_100", "compute_100"])
    assert torch_build("torch ops", "cuda") == KernelBuild("torch ops", "sm_100", "torch")


# ============================================================================= recorders


def test_the_sm100_launch_path_records_each_kernel_with_its_compile_arch(monkeypatch):
    from kernels.sm100 import _launch

    ran = []

    def compiled(*args):
        ran.append(args)

    monkeypatch.setattr(_launch, "current_stream", lambda: "stream")
    monkeypatch.setitem(_launch._BUILDS, id(compiled), ("BlockScaledGemmFp8", "sm_100a"))
    with _launch.recording_launches() as launched:
        _launch.launch_on_current_stream(compiled, 1, 2)
    _launch.launch_on_current_stream(compiled, 3)  # not recorded: no recorder open
    assert launched == [("BlockScaledGemmFp8", "sm_100a")] and len(ran) == 2 and ran[0] == (1, 2, "stream")
    assert not _launch._RECORDERS, "the recorder must be removed when its block ends"


def test_the_sm100_adapter_turns_its_launches_and_torch_ops_into_builds(monkeypatch):
    from kernels.sm100 import _launch
    from verify.backends.sm100 import Sm100Adapter

    a = Sm100Adapter()

    def compiled(*args):
        pass

    monkeypatch.setattr(_launch, "current_stream", lambda: None)
    monkeypatch.setitem(_launch._BUILDS, id(compiled), ("QuantizeFp8_1x128", "sm_100a"))
    with a.launch_recorder() as builds:
        _launch.launch_on_current_stream(compiled)
        _launch.launch_on_current_stream(compiled)
        a.dispatch(torch.tensor([[0, 1]]), 2)  # a torch routing op
    assert builds[0] == KernelBuild("cute:QuantizeFp8_1x128", "sm_100a", "cute-dsl") and len(builds) == 2
    assert builds[1].how == "torch" and "moe_routing" in builds[1].kernel


def test_the_triton_recorder_names_each_launched_kernel_and_its_target(monkeypatch):
    triton = pytest.importorskip("triton")
    knobs = triton.knobs.runtime
    monkeypatch.setattr(knobs, "interpret", False)
    monkeypatch.setattr(knobs, "override_arch", "sm_90a")  # the target Triton compiles for (no GPU here)

    class Meta:  # what Triton passes its launch hooks (a LazyDict)
        def __init__(self, name):
            self.name = name

        def get(self):
            return {"name": self.name}

    with prov.triton_launch_recorder() as builds:
        for name in ("_fp8_gemm_kernel", "_quant_kernel", "_fp8_gemm_kernel"):
            knobs.launch_enter_hook(Meta(name))
    knobs.launch_enter_hook(Meta("after"))  # the hook is gone after the block
    assert builds == [KernelBuild("triton:_fp8_gemm_kernel", "sm_90a", "triton"),
                      KernelBuild("triton:_quant_kernel", "sm_90a", "triton")]


def test_the_triton_interpreter_is_reported_as_no_cubin(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    with prov.triton_launch_recorder() as builds:
        pass
    assert [(b.arch, b.how) for b in builds] == [(None, "interpreter")]


# ============================================================================= through a layer run


class _FakeKernelBackend(EmulatorBackend):
    """The emulator's numerics, but it says it launched an sm_90a cubin for every stage (a fake kernel)."""

    name = "fake-sm90a"

    def launch_recorder(self):
        return prov.static_recorder(KernelBuild("fake_gemm", "sm_90a", "cubin"))


class _SilentBackend(EmulatorBackend):
    name = "silent"

    def launch_recorder(self):
        return None


@pytest.fixture(scope="module")
def layer1():
    ck = Checkpoint.open(MINI_V4)
    layer = ck.load_layer(1)
    return ck, layer, layer_inputs(ck, layer, tokens=8, seed=3, device="cpu")


def _run(layer1, backend):
    ck, layer, inputs = layer1
    return run_layer(ck, layer, inputs, options=RunOptions(act_scale="dynamic"), backend=backend)


def test_a_kernel_built_for_another_arch_fails_every_stage_it_ran_in_naming_both(layer1, monkeypatch):
    monkeypatch.setattr(prov, "device_arch", lambda device: "sm_100")
    run = _run(layer1, _FakeKernelBackend())
    bad = [v for v in run.verdicts if v.check == "provenance"]
    stages = {v.stage for v in run.verdicts if v.check != "provenance"}
    assert {v.stage for v in bad} == stages and all(v.status == "fail" for v in bad)
    assert "fake_gemm was built for sm_90a (cubin) but runs on a sm_100 device" in bad[0].message
    assert bad[0] in run.failed
    doc = unit_document(unit={"name": "layer1", "kind": "decoder", "index": 1, "nbytes": 1, "prefix": "layers.1."},
                        fingerprint="f", run=run, timings_s={}, rank=0, host="h", device="cuda")
    assert doc["provenance"]["device_arch"] == "sm_100"
    assert doc["provenance"]["stages"]["attn.wq_a"] == [{"kernel": "fake_gemm", "arch": "sm_90a", "how": "cubin"}]


def test_a_kernel_built_for_this_arch_passes_and_the_document_follows_the_schema(layer1, monkeypatch):
    monkeypatch.setattr(prov, "device_arch", lambda device: "sm_90")
    run = _run(layer1, _FakeKernelBackend())
    assert not [v for v in run.verdicts if v.check == "provenance"]
    unit = unit_document(unit={"name": "layer1", "kind": "decoder", "index": 1, "nbytes": 1, "prefix": "layers.1."},
                         fingerprint="f", run=run, timings_s={}, rank=0, host="h", device="cuda")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(unit, {"$ref": "#/$defs/unit", "$defs": schema["$defs"]})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**unit, "provenance": {"stages": {}}}, {"$ref": "#/$defs/unit", "$defs": schema["$defs"]})
    lines = provenance_lines([unit["provenance"]])
    assert len(lines) == 1 and lines[0].startswith("kernels on sm_90: attn.wq_a") and "fake_gemm (sm_90a, cubin)" in lines[0]
    html = _provenance({"units": [unit]})
    assert "fake_gemm (sm_90a, cubin)" in html and "sm_90" in html


def test_a_backend_that_does_not_say_reads_unknown_and_never_fails(layer1, monkeypatch):
    monkeypatch.setattr(prov, "device_arch", lambda device: "sm_100")
    run = _run(layer1, _SilentBackend())
    assert not [v for v in run.verdicts if v.check == "provenance"]
    assert set(run.provenance["stages"].values()) == {"unknown"}
    assert "unknown" in provenance_lines([run.provenance])[0]


def test_the_emulator_reports_reference_everywhere(layer1):
    run = _run(layer1, EmulatorBackend())
    assert run.provenance["device_arch"] is None
    assert all(b == [prov.REFERENCE_BUILD.as_dict()] for b in run.provenance["stages"].values())


def test_the_layer_cli_prints_the_kernels_and_fails_on_a_foreign_build(monkeypatch, capsys):
    """`python -m verify layer` through a backend whose kernel was built for sm_90a, on a faked sm_100: the
    kernels line, a FAIL line naming both archs, exit 1."""
    import verify.layer_report as lr
    from verify.__main__ import main

    monkeypatch.setattr(prov, "device_arch", lambda device: "sm_100")
    monkeypatch.setattr(lr, "backend_for_verdicts", lambda name, device, **kw: _FakeKernelBackend())
    rc = main(["layer", "--backend", "emulator", "--layers", "1", "--tokens", "8"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "kernels on sm_100:" in out and "fake_gemm (sm_90a, cubin)" in out
    assert "FAIL attn.wq_a provenance: fake_gemm was built for sm_90a (cubin) but runs on a sm_100 device" in \
        " ".join(out.split())


@pytest.mark.parametrize("abi, flags, arch", [(7, 0x5A0D5A, "sm_90a"), (8, 0x600640A, "sm_100a"),
                                              (8, 0x6006402, "sm_100"), (7, 0x50050, "sm_80")])
def test_the_sass_arch_is_read_from_the_cubins_elf_header(abi, flags, arch):
    from kernels.sm100._launch import cubin_sm_arch

    header = bytearray(64)
    header[:4], header[4], header[7], header[8] = b"\x7fELF", 2, 0x41, abi
    header[0x30:0x34] = flags.to_bytes(4, "little")
    assert cubin_sm_arch(bytes(header)) == arch
    assert cubin_sm_arch(b"not an elf" + bytes(60)) is None


@pytest.mark.cpu_compile
def test_a_compiled_cute_kernel_records_the_arch_of_its_cubin():
    """Compiles the sm100 FP8 quantizer for sm_100a (no GPU needed) and reads its cubin's SASS arch."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("cutlass") is None:
        pytest.skip("nvidia-cutlass-dsl is not installed")
    if "cutlass" in sys.modules and os.environ.get("CUTE_DSL_ARCH") != "sm_100a":
        pytest.skip("cutlass was imported before CUTE_DSL_ARCH=sm_100a was set (the DSL reads it once)")
    os.environ["CUTE_DSL_ARCH"] = "sm_100a"  # as test_sm100_fp8_compile: set before cutlass is imported
    from kernels.sm100 import _launch
    from kernels.sm100 import quantize_fp8_1x128 as q

    cwd = Path.cwd()
    before = set(cwd.iterdir())
    compiled = _launch.compile_for_arch(q._kernel(q.CompileKey()), q._compile_args(), arch="sm_100a")
    assert _launch._BUILDS[id(compiled)] == ("QuantizeFp8_1x128", "sm_100a")
    assert _launch.cubin_sm_arch(compiled.artifacts.CUBIN) == "sm_100a"
    assert set(cwd.iterdir()) == before, "compiling must leave no cubin file in the working directory"
