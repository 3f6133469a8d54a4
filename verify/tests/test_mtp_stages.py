"""DeepSeek-V4's MTP block (mtp.0 of golden/mini-v4) through its rows of the stage table (issue 23, items 3 and 7).

The rows (references.stages, unit "mtp"): mtp.e_proj / mtp.h_proj (FP8 block-128 dense linears: bytes, bound,
batch, padding, sync, graph) and mtp.experts.l1 / mtp.experts.l2 (MXFP4 experts, W4A8: bytes, bound, batch,
sync, graph). They apply to MTP units only; decoder layers keep exactly their rows. Test ids name the unit,
stage and check (`mtp.0-mtp.experts.l1-bound`). The second half plants one bug per class in the emulator and
requires exactly the expected (stage, check) verdicts to fail.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from references.layer import RunOptions
from references.mtp import Mxfp4ExpertStack
from references.mxfp4 import Mxfp4Weight
from references.stages import MTP_STAGES, STAGES, Check, Op
from verify.backends import EmulatorBackend
from verify.backends.base import Backend
from verify.checkpoint import (Checkpoint, Fp8BlockLinear, MissingTensorError, Mxfp4Linear, NanScaleError,
                               iter_linears)
from verify.checkpoint.writer import make_edited_checkpoint
from verify.config import GOLDEN_DIR
from verify.mtp import mtp_inputs, run_mtp
from verify.verdicts import LayerCase, applicable_stages

MINI_V4 = GOLDEN_DIR / "mini-v4"
TOKENS = 24
KERNEL_MTP_ROWS = [s for s in MTP_STAGES if s.kernel]


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(MINI_V4)


@pytest.fixture(scope="module")
def mtp(ckpt):
    return ckpt.load_mtp(0)


def _run(ckpt, mtp, backend):
    return run_mtp(ckpt, mtp, mtp_inputs(ckpt, mtp, tokens=TOKENS, seed=5, device="cpu"), options=RunOptions(),
                   backend=backend)


@pytest.fixture(scope="module")
def emulator_run(ckpt, mtp):
    return _run(ckpt, mtp, EmulatorBackend())


# ============================================================================= table and applicability


def test_the_mtp_rows_name_their_ops_weights_and_checks():
    rows = {s.name: s for s in MTP_STAGES}
    assert list(rows) == ["mtp.e_proj", "mtp.h_proj", "mtp.x_ffn", "mtp.experts.l1", "mtp.experts.swiglu",
                          "mtp.experts.l2"]
    assert all(s.unit == "mtp" and s.schemas == ("deepseek_v4",) for s in MTP_STAGES)
    fp8_checks = (Check.BYTES, Check.PREPARE, Check.BOUND, Check.MODE, Check.BATCH, Check.PADDING, Check.SYNC,
                  Check.GRAPH)
    assert rows["mtp.e_proj"].op is rows["mtp.h_proj"].op is Op.DENSE_LINEAR
    # the same checks as every FP8 linear of the decoder layers
    assert rows["mtp.e_proj"].checks == rows["mtp.h_proj"].checks == fp8_checks
    assert next(s for s in STAGES if s.name == "attn.wq_a").checks == fp8_checks
    assert rows["mtp.experts.l1"].op is rows["mtp.experts.l2"].op is Op.GROUPED_LINEAR_MXFP4
    assert rows["mtp.experts.l1"].parts == ("gate", "up")
    assert rows["mtp.experts.l1"].weights == ("mtp.experts.w1", "mtp.experts.w3")
    assert rows["mtp.experts.l2"].checks == (Check.BYTES, Check.BOUND, Check.BATCH, Check.SYNC, Check.GRAPH)
    assert not rows["mtp.x_ffn"].kernel and not rows["mtp.experts.swiglu"].kernel


@pytest.mark.parametrize("i", range(4), ids=lambda i: f"layer{i}")
def test_decoder_layers_get_no_mtp_row_and_keep_their_own(ckpt, i):
    layer = ckpt.load_layer(i)
    got = [s.name for s in applicable_stages(LayerCase(layer, "deepseek_v4", *([None] * 3), {}, {}, RunOptions(),
                                                       None))]
    decoder = [s.name for s in STAGES if s.kernel and "deepseek_v4" in s.schemas and s.unit == "decoder"]
    assert not any(n.startswith("mtp.") for n in got), got
    expected = [n for n in decoder if n != "indexer.wq_b"]  # the mini fixture stores no indexer
    assert got == expected


def test_an_mtp_block_gets_only_its_rows_and_no_expert_rows_without_experts(mtp):
    case = LayerCase(mtp, "deepseek_v4", *([None] * 3), {}, {}, RunOptions(), None, unit="mtp")
    assert [s.name for s in applicable_stages(case)] == ["mtp.e_proj", "mtp.h_proj", "mtp.experts.l1",
                                                          "mtp.experts.l2"]
    bare = dataclasses.replace(mtp, experts=None)
    case = LayerCase(bare, "deepseek_v4", *([None] * 3), {}, {}, RunOptions(), None, unit="mtp")
    assert [s.name for s in applicable_stages(case)] == ["mtp.e_proj", "mtp.h_proj"]


def test_a_case_of_an_unknown_unit_is_refused(mtp):
    with pytest.raises(ValueError, match="unit='nextn'"):
        LayerCase(mtp, "deepseek_v4", *([None] * 3), {}, {}, RunOptions(), None, unit="nextn")


# ============================================================================= loader and fixture


def test_the_mtp_block_loads_as_deepseek_v4_ships_it(mtp):
    e, h = mtp.projections["e_proj"], mtp.projections["h_proj"]
    assert isinstance(e, Fp8BlockLinear) and isinstance(h, Fp8BlockLinear)
    assert e.encoding == h.encoding == "v4_e8m0_scale" and e.scale_ue8m0.dtype == torch.float8_e8m0fnu
    assert (e.n, e.k) == (h.n, h.k) == (256, 256) and tuple(e.scale_ue8m0.shape) == (2, 2)
    ex = mtp.experts
    assert all(isinstance(w, Mxfp4Linear) for w in (ex.w1, ex.w3, ex.w2))
    assert tuple(ex.w1.weight_u8.shape) == (2, 128, 128) and tuple(ex.w1.scale_ue8m0.shape) == (2, 128, 8)
    assert tuple(ex.w2.weight_u8.shape) == (2, 256, 64) and ex.w1.module == "mtp.0.ffn.experts.*.w1"
    assert set(mtp.norms) == {"enorm", "hnorm", "norm", "ffn_norm"} and not mtp.extras and not mtp.linears
    assert [m for m, _ in iter_linears(mtp)] == ["mtp.0.e_proj", "mtp.0.h_proj", "mtp.0.ffn.experts.*.w1",
                                                 "mtp.0.ffn.experts.*.w3", "mtp.0.ffn.experts.*.w2"]


def test_the_fixture_writes_fp8_linears_in_both_the_v4_and_the_v3_encoding(ckpt):
    enc = {i: {lin.encoding for _, lin in iter_linears(ckpt.load_layer(i)) if isinstance(lin, Fp8BlockLinear)}
           for i in (1, 2, 3)}
    assert enc == {1: {"v4_e8m0_scale"}, 2: {"v3_weight_scale_inv"}, 3: {"v4_e8m0_scale"}}
    names = set(ckpt.weight_map)
    assert "layers.2.attn.wq_a.weight_scale_inv" in names and "layers.2.attn.wq_a.scale" not in names
    assert {"mtp.0.e_proj.scale", "mtp.0.h_proj.scale", "mtp.0.ffn.experts.1.w2.scale"} <= names


def test_a_missing_mtp_projection_is_refused_naming_it(tmp_path):
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", lambda n, t: None if n.startswith("mtp.0.h_proj.") else t)
    with pytest.raises(MissingTensorError, match=r"mtp\.0\.h_proj\.weight"):
        Checkpoint.open(d).load_mtp(0)


def test_a_nan_e8m0_byte_in_an_mtp_expert_scale_is_refused_naming_it(tmp_path):
    def edit(name, t):
        if name == "mtp.0.ffn.experts.1.w2.scale":
            t = t.view(torch.uint8).clone()
            t[3, 1] = 0xFF
            return t.view(torch.float8_e8m0fnu)
        return t
    d = make_edited_checkpoint(MINI_V4, tmp_path / "ck", edit)
    with pytest.raises(NanScaleError, match=r"mtp\.0\.ffn\.experts\.1\.w2\.scale"):
        Checkpoint.open(d).load_mtp(0)


def test_lint_names_the_mtp_encodings_and_expert_format():
    from verify.checkpoint.lint import lint_checkpoint

    found = {(f.code, f.tensor): f.message for f in lint_checkpoint(MINI_V4).findings if f.tensor.startswith("mtp.")}
    assert found[("fp8_encoding", "mtp.0.e_proj")].startswith("v4_e8m0_scale")
    assert found[("fp8_encoding", "mtp.0.h_proj")].startswith("v4_e8m0_scale")
    for w in ("w1", "w3", "w2"):
        assert found[("mtp_mxfp4_experts", f"mtp.0.ffn.experts.*.{w}")].startswith("mxfp4: 2 experts")


# ============================================================================= verdicts through the emulator

EXPECTED_ON_CPU = {"bytes": "pass", "prepare": "pass", "bound": "pass", "mode": "pass", "batch": "pass",
                   "padding": "skipped", "sync": "skipped", "graph": "skipped"}


@pytest.mark.parametrize("stage_check", [(s.name, c.value) for s in KERNEL_MTP_ROWS for c in s.checks],
                         ids=lambda sc: f"mtp.0-{sc[0]}-{sc[1]}-emulator")
def test_each_mtp_stage_and_check_on_the_emulator(emulator_run, stage_check):
    stage, check = stage_check
    v = emulator_run.verdict(stage, check)
    assert v is not None, f"no {stage} {check} verdict"
    assert v.status == EXPECTED_ON_CPU[check], v.message
    if check == "bound":
        assert all(r <= 1 for k, r in v.metrics.items() if k.startswith("bound_ratio")), v.metrics
    if check in ("sync", "graph"):
        assert "needs a CUDA device" in v.message
    if check == "padding":
        assert "no NVFP4 scale padding" in v.message


def test_the_mtp_loss_rows_are_finite_and_reported(emulator_run):
    assert set(emulator_run.loss) == {"mtp.e_proj", "mtp.h_proj", "mtp.x_ffn", "mtp.experts.l1.gate",
                                      "mtp.experts.l1.up", "mtp.experts.swiglu", "mtp.experts.l2"}
    assert all(m["status"] == "pass" and m["sqnr_db"] > 15 for m in emulator_run.loss.values()), emulator_run.loss


@pytest.mark.parametrize("name", ["sm90", "sm100"])
def test_production_backends_say_why_they_do_not_serve_the_mxfp4_experts(name):
    if name == "sm90":
        from verify.backends.sm90 import Sm90Adapter as cls
        reason = cls.not_served[Op.GROUPED_LINEAR_MXFP4]
    else:
        from verify.backends.sm100 import NOT_SERVED
        reason = NOT_SERVED[Op.GROUPED_LINEAR_MXFP4]
    assert "MXFP4" in reason and "MTP" in reason and "E8M0" in reason


def test_a_backend_without_the_mxfp4_op_gets_not_served_expert_verdicts_and_fp8_ones(ckpt, mtp):
    class FP8Only(Backend):  # an outside backend with the FP8 path only
        name = "fp8-only"
        fp8_u_acc = 2.0**-53
        _emu = EmulatorBackend()

        def prepare_linear(self, lin):
            return self._emu.prepare_linear(lin)

        def quantize_fp8(self, x_bf16, *, scale_rule):
            return self._emu.quantize_fp8(x_bf16, scale_rule=scale_rule)

        def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
            return self._emu.dense_linear(x_bf16, w)

    run = _run(ckpt, mtp, FP8Only())
    status = {(v.stage, v.check): v.status for v in run.verdicts}
    for stage in ("mtp.experts.l1", "mtp.experts.l2"):
        assert status[(stage, "bytes")] == "pass"  # its FP8 quantizer is judged on the experts' rows too
        for check in ("bound", "batch", "sync", "graph"):
            assert status[(stage, check)] == "not served", run.verdict(stage, check).message
    assert status[("mtp.e_proj", "bound")] == status[("mtp.h_proj", "bytes")] == "pass"


# ============================================================================= planted bugs


class _Planted(EmulatorBackend):
    bug = ""

    def prepare_experts(self, experts):
        st = super().prepare_experts(experts)
        if self.bug == "mxfp4-nibbles-swapped":  # element 2i read from the HIGH nibble
            return Mxfp4ExpertStack(*(Mxfp4Weight(((w.packed_u8 & 0xF) << 4) | (w.packed_u8 >> 4), w.scale_u8, w.name)
                                      for w in (st.w1, st.w3, st.w2)))
        if self.bug == "e8m0-bias-126":  # 2^(b-126): every scale doubled
            return Mxfp4ExpertStack(*(Mxfp4Weight(w.packed_u8, w.scale_u8 + 1, w.name) for w in (st.w1, st.w3, st.w2)))
        if self.bug == "expert-stride-zero":  # every expert's rows through expert 0
            return Mxfp4ExpertStack(*(Mxfp4Weight(w.packed_u8[:1].expand_as(w.packed_u8),
                                                  w.scale_u8[:1].expand_as(w.scale_u8), w.name)
                                      for w in (st.w1, st.w3, st.w2)))
        return st

    def quantize_fp8(self, x_bf16, *, scale_rule):
        a = super().quantize_fp8(x_bf16, scale_rule=scale_rule)
        if self.bug == "fp8-act-scale-halved" and scale_rule == "ue8m0_ceil":  # UE8M0 rounded down, not up
            return dataclasses.replace(a, block_dec_scale=a.block_dec_scale - 1)
        return a


_EXPERT_BOUNDS = {("mtp.experts.l1", "bound"), ("mtp.experts.l2", "bound")}
PLANTED = {
    "mxfp4-nibbles-swapped": _EXPERT_BOUNDS,
    "e8m0-bias-126": _EXPERT_BOUNDS,
    "expert-stride-zero": _EXPERT_BOUNDS,
    "fp8-act-scale-halved": {(s, "bytes") for s in ("mtp.e_proj", "mtp.h_proj", "mtp.experts.l1", "mtp.experts.l2")},
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_each_planted_bug_fails_exactly_its_stage_and_check(ckpt, mtp, bug):
    b = _Planted()
    b.bug = bug
    run = _run(ckpt, mtp, b)
    failed = {(v.stage, v.check) for v in run.verdicts if v.status == "fail"}
    assert failed == PLANTED[bug], {(v.stage, v.check): v.message[:200] for v in run.verdicts if v.status == "fail"}


# ============================================================================= CLI


def test_layer_cli_verifies_the_mtp_block(tmp_path, capsys):
    from verify.__main__ import main

    out = tmp_path / "mtp.json"
    assert main(["layer", "--backend", "emulator", "--layers", "mtp.0", "--tokens", "8", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (run_id, unit), = doc["runs"].items()
    assert run_id.startswith("mtp.0/") and unit["unit"]["kind"] == "mtp"
    status = {(v["stage"], v["check"]): v["status"] for v in unit["verdicts"]}
    assert {s for (s, c), st in status.items() if c == "bytes" and st == "pass"} == {
        "mtp.e_proj", "mtp.h_proj", "mtp.experts.l1", "mtp.experts.l2"}
    assert "fail" not in status.values()
    # 16 = bytes, bound, batch of the 4 rows + prepare and mode of the 2 FP8 projections (issue 24)
    assert "emulator on mtp.0: 16 pass, 0 fail" in capsys.readouterr().out


def test_layer_cli_refuses_an_mtp_block_the_checkpoint_lacks(capsys):
    from verify.__main__ import main

    assert main(["layer", "--backend", "emulator", "--layers", "mtp.3"]) == 2
    err = capsys.readouterr().err
    assert "--layers mtp.3: not in the checkpoint" in err and "mtp.0" in err


def test_the_emulator_declares_its_mxfp4_experts_w4a8():
    """The MTP experts' activations are FP8 1x128 (references.mtp), so the emulator's numerics mode for MXFP4
    weights is W4A8 (the base class's default for MXFP4 is W4A4)."""
    from verify.backends.protocol import NumericsMode

    assert EmulatorBackend().numerics_mode(Op.GROUPED_LINEAR_MXFP4, "mxfp4") is NumericsMode.W4A8
    assert EmulatorBackend().numerics_mode(Op.DENSE_LINEAR, "nvfp4") is NumericsMode.W4A4


def test_layer_cli_refuses_decoder_inputs_for_an_mtp_block(tmp_path, capsys):
    from safetensors.torch import save_file

    from verify.__main__ import main

    inputs = tmp_path / "x.safetensors"
    save_file({"x_ffn": torch.zeros(4, 256, dtype=torch.bfloat16)}, str(inputs))
    assert main(["layer", "--layers", "mtp.0", "--inputs", str(inputs)]) == 2
    assert "an MTP block (mtp.0 in --layers) takes enorm / hnorm" in capsys.readouterr().err
