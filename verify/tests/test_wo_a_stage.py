"""attn.wo_a, DeepSeek-V4's attention output projection, is a kernel stage (issue 23): the grouped dense linear
(Op.GROUPED_DENSE_LINEAR, Backend.grouped_dense_linear, verify.verdicts.judges.grouped_dense).

CPU: the stage row (its op and checks; its reference tensors keep their names), the emulator's grouped linear is
the reference layer's tensor bit for bit and passes every check on the fixture's NVFP4 layer 0 (dynamic, static)
and FP8 layer 1, a backend whose groups use each other's weight row blocks fails the bound of attn.wo_a and
nothing else, backends that do not serve it say why, and sm90's grouped path under the Triton interpreter (a
subprocess): FP8 per group bit-equal to its dense_linear on the row block and within the bound (sm90's NVFP4
kernels take CUDA tensors only, so its NVFP4 grouped path is a GPU test).
GPU (markers gpu, sm90): the fixture's FP8 layers through --backend sm90 pass every attn.wo_a check; NVFP4 (x
quantized once) passes the grouped w4a4 bound, static and dynamic, while per-group dynamic global scales (the
wrong quantization) fail it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from references.codecs import f32_to_e4m3_bytes
from references.layer import RunOptions
from references.stages import ATTN_WO_A, Op, stage
from verify.assertions import assert_within_gemm_bound
from verify.backends import EmulatorBackend, get_backend
from verify.checkpoint import Checkpoint, Nvfp4Linear
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.run import run_layer
from verify.verdicts.judges.grouped_dense import grouped_candidates, row_block

CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[2]
TOKENS, SEED = 24, 5
CHECKS = ("bytes", "prepare", "bound", "mode", "batch", "sync", "graph")


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


def _run(ckpt, i: int, backend, act: str = "dynamic", device: str = "cpu"):
    layer = ckpt.load_layer(i, device=device)
    inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device=device)
    return run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=act), backend=backend)


def test_wo_a_is_a_kernel_stage_whose_tensors_keep_their_names():
    s = stage("attn.wo_a")
    assert s.kernel and s.op is Op.GROUPED_DENSE_LINEAR and s.input == "attn.wq_b" and s.weights == ("attn.wo_a",)
    assert [c.value for c in s.checks] == list(CHECKS)  # no padding: no NVFP4 boundary activation in the op
    assert s.tensors == ("attn.wo_a",) and s.act_quant("e4m3_u8") == "attn.wo_a.act_quant.e4m3_u8"
    assert s is ATTN_WO_A


@pytest.mark.parametrize("i, act", [(0, "dynamic"), (0, "static"), (1, "dynamic")])
def test_the_emulator_passes_every_wo_a_check_and_is_the_reference_tensor(ckpt, i, act):
    b = EmulatorBackend()
    run = _run(ckpt, i, b, act)
    got = {c: run.verdict("attn.wo_a", c) for c in CHECKS}
    for c in ("bytes", "prepare", "bound", "mode", "batch"):
        assert got[c].status == "pass", (c, got[c].message)
    for c in ("sync", "graph"):
        assert got[c].status == "skipped", (c, got[c].message)
    assert "2 groups of K=128" in got["bound"].message, got["bound"].message
    layer = ckpt.load_layer(i)
    lin = layer.attention["wo_a"]
    scale = lin.input_scale_f32.reshape(1) if act == "static" and isinstance(lin, Nvfp4Linear) else None
    y = b.grouped_dense_linear(run.emulated["attn.wq_b"].to(torch.bfloat16), b.prepare_linear(lin), groups=2,
                               input_dec_scale_f32=scale)
    assert torch.equal(y.view(torch.int16), run.emulated["attn.wo_a"].view(torch.int16))


class GroupsSwapped(EmulatorBackend):
    """A grouped linear whose groups read each other's weight row blocks (its prepared weight's halves swapped)."""

    name = "groups-swapped"

    def grouped_dense_linear(self, x_bf16, w, *, groups, input_dec_scale_f32=None):
        y = super().grouped_dense_linear(x_bf16.view(x_bf16.shape[0], groups, -1).flip(1).reshape(x_bf16.shape),
                                         w, groups=groups, input_dec_scale_f32=input_dec_scale_f32)
        return y.view(y.shape[0], groups, -1).flip(1).reshape(y.shape)


@pytest.mark.parametrize("i", [0, 1], ids=["nvfp4", "fp8"])
def test_groups_reading_each_others_weights_fail_the_wo_a_bound_and_nothing_else(ckpt, i):
    run = _run(ckpt, i, GroupsSwapped())
    failed = {(v.stage, v.check) for v in run.failed}
    assert failed == {("attn.wo_a", "bound")}, [(v.stage, v.check, v.message[:200]) for v in run.failed]
    assert run.verdict("attn.wo_a", "mode").status == "skipped"  # wrong in every mode: the bound's failure


def test_backends_that_do_not_serve_it_say_why():
    cpu = torch.device("cpu")
    assert EmulatorBackend().unsupported_reason(Op.GROUPED_DENSE_LINEAR, cpu) is None
    torch_b = get_backend("torch")
    assert "grouped wo_a linear is not adapted" in torch_b.unsupported_reason(Op.GROUPED_DENSE_LINEAR, cpu)
    from verify.backends.sm100 import NOT_SERVED  # noqa: PLC0415

    assert NOT_SERVED[Op.GROUPED_DENSE_LINEAR].startswith("sm100: DeepSeek-V4's grouped wo_a linear")
    why = get_backend("sm90").unsupported_reason(Op.GROUPED_DENSE_LINEAR, cpu)
    assert why is None or "CUDA" in why or "triton" in why, why


@pytest.mark.skipif(CUDA, reason="the CPU machine's answer (a CUDA device is present here)")
def test_sm90_on_a_cpu_machine_is_not_served_for_the_device(ckpt):
    b = get_backend("sm90")
    reason = b.unsupported_reason(Op.GROUPED_DENSE_LINEAR, torch.device("cpu"))
    run = _run(ckpt, 1, b)
    for c in CHECKS:
        assert (run.verdict("attn.wo_a", c).status, run.verdict("attn.wo_a", c).message) == ("not served", reason)


# ============================================================================= sm90 under the Triton interpreter


def _nvfp4_linear(n: int, k: int, seed: int, device: str = "cpu") -> Nvfp4Linear:
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    sf = f32_to_e4m3_bytes(torch.rand(n, k // 16, generator=g) * 3 + 0.25, saturate=True).view(torch.float8_e4m3fn)
    return Nvfp4Linear("layers.0.attn.wo_a", packed.to(device), sf.to(device), torch.tensor(0.01, device=device),
                       torch.tensor(0.004, device=device))


def _case_fp8_fixture() -> str:
    """The fixture's FP8 wo_a (r = 64: each group inside one 128-row scale block): sm90's grouped call per group
    bit-equal to its dense_linear on that group's columns and the row block prepared on its own; within the bound."""
    from verify.backends.sm90 import Sm90Adapter  # noqa: PLC0415

    b = Sm90Adapter()
    lin = Checkpoint.open(GOLDEN_DIR / "mini-v4").load_layer(1).attention["wo_a"]
    x = (torch.randn(5, 2 * lin.k, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    y = b.grouped_dense_linear(x, b.prepare_linear(lin), groups=2)
    r = lin.n // 2
    for gi in range(2):
        alone = b.dense_linear(x[:, gi * lin.k:(gi + 1) * lin.k].contiguous(), b.prepare_linear(row_block(lin, gi, 2)))
        assert torch.equal(y[:, gi * r:(gi + 1) * r].view(torch.int16), alone.view(torch.int16)), gi
    ratio = assert_within_gemm_bound(y, *grouped_candidates(b, x, lin, 2, None, y.dtype)["fp8_block"], label="wo_a")
    return f"bit-equal per group, bound ratio {ratio:.3g}"


def _case_nvfp4(static: bool, device: str) -> str:
    """NVFP4 [2*128, 128] with group 1's columns 64x smaller than group 0's: x quantized once (one global scale)
    passes the grouped w4a4 bound; per-group dynamic quantization (each group its own global scale) fails it."""
    from verify.backends.sm90 import Sm90Adapter  # noqa: PLC0415

    b = Sm90Adapter()
    lin = _nvfp4_linear(256, 128, seed=3, device=device)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2))
    x[:, 128:] /= 64
    x = x.to(torch.bfloat16).to(device)
    scale = (x.float().abs().amax() / 2688).reshape(1) if static else None
    w = b.prepare_linear(lin)
    y = b.grouped_dense_linear(x, w, groups=2, input_dec_scale_f32=scale)
    y64, bnd = grouped_candidates(b, x, lin, 2, scale, y.dtype)["w4a4"]
    ratio = assert_within_gemm_bound(y, y64, bnd, label="wo_a")
    if not static:
        wrong = torch.cat([b.dense_linear(x[:, gi * 128:(gi + 1) * 128].contiguous(),
                                          b.prepare_linear(row_block(lin, gi, 2))) for gi in range(2)], dim=1)
        try:
            assert_within_gemm_bound(wrong, y64, bnd, label="per-group scales")
        except AssertionError:
            return f"bound ratio {ratio:.3g}; per-group global scales fail the bound"
        raise AssertionError("per-group global scales passed the grouped bound: the bound cannot tell")
    return f"bound ratio {ratio:.3g}"


CASES = {"fp8-fixture": (_case_fp8_fixture, ())}


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton", reason="the CPU cases run sm90's kernels under the Triton interpreter")
    path = tmp_path_factory.mktemp("wo_a") / "results.json"
    path_env = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path_env)
    proc = subprocess.run([sys.executable, __file__, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())


@pytest.mark.skipif(CUDA, reason="CPU interpreter cases (on a GPU the GPU test runs the kernels natively)")
@pytest.mark.parametrize("case", list(CASES))
def test_sm90_grouped_path_under_the_interpreter(interpreter_results, case):
    r = interpreter_results[case]
    assert r["ok"], r["message"]


def test_sm90_refuses_nvfp4_groups_of_partial_scale_tiles():
    from verify.backends.sm90 import Sm90Adapter  # noqa: PLC0415

    b = Sm90Adapter()
    lin = _nvfp4_linear(128, 128, seed=0)  # 2 groups of 64 rows: half a 128-row scale tile each
    w = b.prepare_linear(lin)
    with pytest.raises(NotImplementedError, match=r"group's rows \(64\) of 128"):
        b.grouped_dense_linear(torch.zeros(2, 256, dtype=torch.bfloat16), w, groups=2)
    with pytest.raises(ValueError, match=r"grouped_dense_linear: x \(2, 200\)"):
        b.grouped_dense_linear(torch.zeros(2, 200, dtype=torch.bfloat16), w, groups=2)


# ============================================================================= GPU


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("i", (1, 2, 3), ids=["layer1", "layer2", "layer3"])
def test_gpu_sm90_passes_every_wo_a_check_on_the_fixture_fp8_layers(ckpt, i):
    if not CUDA or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU (sm_90)")
    run = _run(ckpt, i, get_backend("sm90"), device="cuda")
    for c in CHECKS:
        v = run.verdict("attn.wo_a", c)
        assert v.status == "pass", (c, v.status, v.message)
    assert "promoted to fp32 every 128 of K" in run.verdict("attn.wo_a", "bound").message


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_gpu_sm90_nvfp4_grouped_linear_quantizes_x_once(static):
    if not CUDA or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU (sm_90)")
    assert "bound ratio" in _case_nvfp4(static, "cuda")


def _main(path: str) -> None:
    out = {}
    for name, (fn, args) in CASES.items():
        try:
            out[name] = {"ok": True, "message": fn(*args)}
        except Exception as exc:  # noqa: BLE001 - reported per case to the parent test
            out[name] = {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
    Path(path).write_text(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1])
