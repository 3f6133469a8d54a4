"""Kernel verdicts on the layers' dense NVFP4 stages (verify.layer_verdicts), through the backend
chosen by --backend (default auto: sm100 on a B200, sm90 on a Hopper, the emulator elsewhere).

`pytest -m layer0 --backend sm90` on an H200 runs layer 0's NVFP4 attention projections and
shared expert through the Triton kernels. On the CPU the emulator backend exercises the same
plumbing; known-wrong backends (swapped nibbles, a mis-laid scale, a wrong alpha) must fail.
"""

from __future__ import annotations

import pytest
import torch

from references.layer import RunOptions
from verify.backend import EmulatorBackend, get_backend
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.layer_verdicts import CHECKS, DENSE_STAGES, layer_dense_stages, run_check

LAYERS = range(4)
ACT = ("dynamic", "static")
TOKENS = 48


def _params():
    for i in LAYERS:
        for act in ACT:
            for stage in DENSE_STAGES:
                for check in CHECKS:
                    yield pytest.param(i, act, stage, check, id=f"layer{i}-{act}-{stage}-{check}",
                                       marks=getattr(pytest.mark, f"layer{i}"))


@pytest.fixture(scope="module")
def ckpt(run_cfg):
    return Checkpoint.open(run_cfg.checkpoint or GOLDEN_DIR / "mini-v4")


@pytest.fixture(scope="module")
def backend(run_cfg):
    return get_backend(run_cfg.backend)


@pytest.fixture(scope="module")
def device(backend):
    return "cuda" if backend.name != "emulator" or torch.cuda.is_available() else "cpu"


_STAGES: dict = {}


def _stages(ckpt, i, act, device):
    key = (i, act, device)
    if key not in _STAGES:
        layer = ckpt.load_layer(i, device=device)
        inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=11, device=device)
        _STAGES[key] = layer_dense_stages(ckpt, layer, inputs, RunOptions(act_scale=act))
    return _STAGES[key]


@pytest.mark.parametrize("i, act, stage, check", list(_params()))
def test_dense_stage_verdict(ckpt, backend, device, i, act, stage, check):
    if i >= ckpt.config.num_layers:
        pytest.skip(f"layer{i}: the checkpoint has {ckpt.config.num_layers} layers")
    stages = _stages(ckpt, i, act, device)
    if stage not in stages:
        pytest.skip(f"layer{i} {stage}: not an NVFP4 dense stage in this checkpoint (FP8/BF16 weight or absent)")
    from verify.backend import Op

    reason = backend.unsupported_reason(Op.DENSE_GEMM if check != "quantize" else Op.QUANTIZE, torch.device(device))
    if reason:
        pytest.skip(reason)
    if check in ("graph", "sync") and device != "cuda":
        pytest.skip(f"{check}: needs a CUDA device")
    v = run_check(backend, stages[stage], check)
    print(f"layer{i} {act} {stage} {check}: {'PASS' if v.passed else 'FAIL'} {v.message}")
    assert v.passed, v.message


# ----------------------------------------------------------------------------- the checks can fail


class _Broken(EmulatorBackend):
    """The emulator with one planted bug."""

    def __init__(self, bug: str) -> None:
        super().__init__("te")
        self.bug = bug
        self.name = f"broken-{bug}"

    def quantize_nvfp4(self, x_bf16, global_enc_scale_f32):
        packed, sf = super().quantize_nvfp4(x_bf16, global_enc_scale_f32)
        if self.bug == "swapped-nibbles":
            packed = (packed >> 4) | ((packed & 0xF) << 4)
        if self.bug == "host-sync":  # reads the scale on the host: a sync, and not capturable
            global_enc_scale_f32 = torch.full_like(global_enc_scale_f32, float(global_enc_scale_f32.reshape(-1)[0]))
        if self.bug == "scale-layout":
            sf = sf.reshape(-1, 4).flip(1).reshape(sf.shape)  # the 4 scales of a 128x4 atom column reversed
        return packed, sf

    def gemm_nvfp4(self, a_packed_u8, a_sf_swizzled_u8, b_packed_u8, b_sf_swizzled_u8, alpha_f32):
        if self.bug == "alpha-twice":
            alpha_f32 = alpha_f32 * alpha_f32
        if self.bug == "gemm-swapped-b-nibbles":
            b_packed_u8 = (b_packed_u8 >> 4) | ((b_packed_u8 & 0xF) << 4)
        return super().gemm_nvfp4(a_packed_u8, a_sf_swizzled_u8, b_packed_u8, b_sf_swizzled_u8, alpha_f32)


@pytest.mark.layer0
@pytest.mark.parametrize("bug, check", [("swapped-nibbles", "quantize"), ("scale-layout", "quantize"),
                                        ("alpha-twice", "gemm"), ("gemm-swapped-b-nibbles", "gemm")],
                         ids=lambda v: v)
def test_planted_bugs_fail_their_verdict(ckpt, bug, check):
    stages = _stages(ckpt, 0, "dynamic", "cpu")
    assert stages, "mini-v4 layer 0 must have NVFP4 dense stages"
    for name, st in stages.items():
        v = run_check(_Broken(bug), st, check)
        assert not v.passed, f"{bug}: {name} {check} passed: {v.message}"
        assert name in v.message or check == "quantize", v.message


def test_emulator_backend_passes_every_dense_stage_of_layer0_on_the_cpu(ckpt):
    stages = _stages(ckpt, 0, "static", "cpu")
    assert set(stages) == set(DENSE_STAGES), f"mini-v4 layer 0 stages: {sorted(stages)}"
    for st in stages.values():
        for check in ("quantize", "gemm"):
            v = run_check(EmulatorBackend(), st, check)
            assert v.passed, v.message


def test_unsupported_backend_gives_a_failed_verdict_with_the_reason(ckpt):
    st = next(iter(_stages(ckpt, 0, "dynamic", "cpu").values()))
    b = EmulatorBackend()
    b.unsupported_reason = lambda op, device: f"{op.value}: not here"
    v = run_check(b, st, "gemm")
    assert not v.passed and "not here" in v.message


@pytest.mark.gpu
@pytest.mark.layer0
@pytest.mark.parametrize("check", ["sync", "graph"])
def test_a_host_sync_fails_the_sync_and_graph_verdicts(ckpt, check):
    stages = _stages(ckpt, 0, "dynamic", "cuda")
    st = stages["attn.wq_a"]
    v = run_check(_Broken("host-sync"), st, check)
    assert not v.passed, f"host-sync backend passed {check}: {v.message}"
