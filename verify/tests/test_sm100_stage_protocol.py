"""sm100's one-call paths (Sm100Kernels.linear_nvfp4 behind dense_linear, Sm100Kernels.moe_experts behind
moe_block) judged against the emulator through the stage protocol, on the CPU.

The CuTe DSL launches are replaced by the CPU stand-ins of test_sm100_adapter (built from references/,
applying alpha = a_dec * b_dec as the kernels document); everything else is kernels/sm100's own code:
host preparation, the quantizer's global scale, _act_dec_scale (which decode scale goes into each alpha:
the static input_scale, or 1/S of the dynamic scale, L1's and L2's each), permute, combine. run_layer
then judges every stage: dense stages by the bound of dense_linear against the references' operands,
the MoE block by the block interval (verify.verdicts.moe_block_bound). A deliberately wrong alpha
fails here; on a B200 the same verdicts run on the real kernels (test_layer_stages, --backend sm100).
"""

from __future__ import annotations

import pytest
import torch

import kernels.sm100.api as sm100_backend
from references.layer import RunOptions
from references.stages import ATTN_WQ_A, MOE_BLOCK, Check
from verify.backends.sm100 import Sm100Adapter
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import layer_inputs
from verify.reference_layer import moe_spec_from, run_reference_layer
from verify.run import run_layer
from verify.verdicts import LayerCase, judge_layer
from verify.tests.test_sm100_adapter import stand_in  # noqa: F401 (the stand-in kernels fixture)


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


@pytest.fixture
def sm100_on_cpu(monkeypatch, stand_in):  # noqa: F811
    """The sm100 adapter with every op served on the CPU (stand-in launches); moe.block is judged by its
    bound (the stage table's moe.block row lists Check.BOUND)."""
    monkeypatch.setattr(sm100_backend.Sm100Kernels, "unsupported_reason", lambda self, op, device=None: None)
    assert Check.BOUND in MOE_BLOCK.checks, "these tests judge moe.block by its bound: the table row must list it"
    return Sm100Adapter()


def _run(ckpt, backend, i: int, act: str):
    layer = ckpt.load_layer(i)
    inputs = layer_inputs(ckpt, layer, tokens=16, seed=11, device="cpu")
    return run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=act), backend=backend)


def _failures(run) -> str:
    return "\n".join(v.message.splitlines()[0] for v in run.failed)


class _Verdicts:
    """The verdicts of the two one-call stages only (attn.wq_a, moe.block) on a prebuilt layer case."""

    def __init__(self, verdicts):
        self.verdicts = verdicts
        self.failed = [v for v in verdicts if v.status == "fail"]

    def verdict(self, stage, check):
        return next(v for v in self.verdicts if v.stage == stage and v.check == check)


_CASES: dict = {}


@pytest.fixture(scope="module")
def case0():
    return _case0("dynamic")


def _case0(act: str) -> LayerCase:
    """Layer 0 of the fixture: the reference layer's tensors, once per activation scaling."""
    if act in _CASES:
        return _CASES[act]
    ck = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    layer = ck.load_layer(0)
    inputs = layer_inputs(ck, layer, tokens=16, seed=11, device="cpu")
    opt = RunOptions(act_scale=act)
    _CASES[act] = LayerCase(layer, ck.config.schema, inputs.x_attn_bf16, inputs.x_ffn_bf16, inputs.token_ids_i64,
                     run_reference_layer(ck, layer, inputs, mode="emulated", options=opt),
                     run_reference_layer(ck, layer, inputs, mode="high", options=opt), opt, moe_spec_from(ck.config))
    return _CASES[act]


def _one_call_stages(backend, case):
    return _Verdicts(judge_layer(backend, case, stages=(ATTN_WQ_A, MOE_BLOCK)))


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_sm100_paths_pass_their_stage_verdicts_on_the_cpu(ckpt, sm100_on_cpu, act):
    """dynamic: every stage of layer 0 through the protocol; static: the two one-call stages."""
    run = _run(ckpt, sm100_on_cpu, 0, act) if act == "dynamic" else _one_call_stages(sm100_on_cpu, _case0(act))
    assert not run.failed, _failures(run)
    linear = run.verdict("attn.wq_a", "bound")
    assert linear.status == "pass" and "(dense_linear)" in linear.message, linear
    block = run.verdict("moe.block", "bound")
    if act == "dynamic":
        assert block.status == "pass" and "block interval" in block.message, block
    else:  # moe_experts takes one input_scale for all experts; the fixture's differ per expert
        assert block.status == "not served" and "one input_scale for all experts" in block.message, block


def _inverted(real):
    def wrong(input_dec_scale_f32, global_enc_scale_f32):
        return torch.reciprocal(real(input_dec_scale_f32, global_enc_scale_f32))  # the encode scale as alpha
    return wrong


def test_a_wrong_alpha_in_kernels_sm100_fails_dense_linear_and_moe_block(case0, sm100_on_cpu, monkeypatch):
    monkeypatch.setattr(sm100_backend, "_act_dec_scale", _inverted(sm100_backend._act_dec_scale))
    run = _one_call_stages(sm100_on_cpu, case0)
    failed = {(v.stage, v.check) for v in run.failed}
    assert ("attn.wq_a", "bound") in failed and "(dense_linear)" in run.verdict("attn.wq_a", "bound").message, \
        _failures(run)
    assert ("moe.block", "bound") in failed, _failures(run)
    assert run.verdict("attn.wq_a", "bytes").status == "pass", "the quantizer's bytes did not move; only alpha"


def test_l2_alpha_from_the_l1_scale_fails_moe_block(case0, sm100_on_cpu, monkeypatch):
    """moe_experts's second _act_dec_scale call (L2) given L1's scale: only the block bound can see it."""
    real = sm100_backend._act_dec_scale
    calls = []

    def l2_gets_l1(input_dec_scale_f32, global_enc_scale_f32):
        calls.append(global_enc_scale_f32)
        return real(input_dec_scale_f32, calls[0] if len(calls) == 2 else global_enc_scale_f32)

    real_moe = sm100_backend.Sm100Kernels.moe_experts

    def moe_experts(self, *a, **k):
        calls.clear()
        return real_moe(self, *a, **k)

    monkeypatch.setattr(sm100_backend, "_act_dec_scale", l2_gets_l1)
    monkeypatch.setattr(sm100_backend.Sm100Kernels, "moe_experts", moe_experts)
    run = _one_call_stages(sm100_on_cpu, case0)
    failed = {(v.stage, v.check) for v in run.failed}
    assert ("moe.block", "bound") in failed, _failures(run)
