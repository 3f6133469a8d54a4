"""Every kernel stage of every layer, judged through the backend chosen by --backend (verify.run.run_layer).

`pytest -m layer0 --backend sm90 --checkpoint DIR` on an H200 runs layer 0's stages through the sm90
kernels; on the CPU (--backend auto) the emulator backend runs the same verdicts. Test ids name the
layer, stage, check and activation scaling: `layer3-moe.l1-bound-static`. A stage the backend does not
serve, or a check that needs a CUDA device, is a skip whose reason says so.

The second half proves the verdicts can fail: the emulator with one planted bug per class must fail
exactly the expected (stage, check) verdicts and no other.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from references.layer import RunOptions
from references.router import router_logits_f32, routing_weights_f32, select_experts_topk
from references.stages import STAGES, Check
from verify.backends import FORWARD_OPS, EmulatorBackend, RoutingOut, get_backend, registered_backend_names
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.layer_report import held_layers, layer_inputs
from verify.run import run_layer
from verify.selftest import Bugged
from verify.verdicts import LayerCase, applicable_stages
from verify.accumulator import check_declared_u_acc, probe_accumulator
from verify.assertions import assert_all_zero, assert_bits_equal

ACT = ("dynamic", "static")
TOKENS = 48
SEED = 11


def _checkpoint_dir(config) -> str:
    return config.getoption("--checkpoint") or str(GOLDEN_DIR / "mini-v4")


def _backend_names(config) -> tuple[str, ...]:
    """--backend NAME: that backend; auto (the default): every registered backend, each skipping with
    its own reason where it cannot run (correctness is parametrised over backends, STYLE 5)."""
    name = config.getoption("--backend")
    return registered_backend_names() if name == "auto" else (name,)


def pytest_generate_tests(metafunc):
    if "control_check" in metafunc.fixturenames:
        _generate_controls(metafunc)
    if "stage_check" not in metafunc.fixturenames:
        return
    ckpt = Checkpoint.open(_checkpoint_dir(metafunc.config))
    params = []
    for backend in _backend_names(metafunc.config):
        for i in held_layers(ckpt):
            for stage in STAGES:
                if not stage.kernel or ckpt.config.schema not in stage.schemas or stage.unit != "decoder":
                    continue  # MTP rows: verify/tests/test_mtp_stages.py
                for check in stage.checks:
                    for act in ACT:
                        params.append(pytest.param((backend, i, stage.name, check.value, act),
                                                   id=f"layer{i}-{stage.name}-{check.value}-{act}-{backend}",
                                                   marks=getattr(pytest.mark, f"layer{i}")))
    metafunc.parametrize("stage_check", params)


def _generate_controls(metafunc):
    """One item per (backend, layer, check column, act): `layer3-control-bound-static-emulator`."""
    ckpt = Checkpoint.open(_checkpoint_dir(metafunc.config))
    checks = [c.value for c in Check if any(c in s.checks for s in STAGES
                                            if s.kernel and ckpt.config.schema in s.schemas)]
    metafunc.parametrize("control_check", [
        pytest.param((backend, i, check, act), id=f"layer{i}-control-{check}-{act}-{backend}",
                     marks=getattr(pytest.mark, f"layer{i}"))
        for backend in _backend_names(metafunc.config) for i in held_layers(ckpt) for check in checks for act in ACT])


@pytest.fixture(scope="module")
def ckpt(run_cfg):
    return Checkpoint.open(run_cfg.checkpoint or GOLDEN_DIR / "mini-v4")


_BACKENDS: dict = {}


def _backend_here(name: str):
    """(backend, device) or pytest.skip with the backend's reason when it serves nothing here."""
    if name not in _BACKENDS:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            b = get_backend(name, device if device.type == "cuda" else None)
            reasons = [b.unsupported_reason(op, device) for op in FORWARD_OPS]
            _BACKENDS[name] = (b, str(device), reasons[0] if all(reasons) else None)
            if not all(reasons):  # a looser declared u_acc than measured fails here, loudly
                check_declared_u_acc(b, probe_accumulator(b, device))
        except ImportError as e:
            _BACKENDS[name] = (None, str(device), f"{name}: {e}")
    b, device, reason = _BACKENDS[name]
    if reason:
        pytest.skip(f"not served here: {reason}")
    return b, device


_RUNS: dict = {}


def _run(ckpt, backend, i: int, act: str, device: str):
    return _layer_run(ckpt, backend, i, act, device)[1]


def _layer_run(ckpt, backend, i: int, act: str, device: str):
    """(the names of the layer's kernel stages, its run), once per (backend, layer, act, device)."""
    key = (id(ckpt), backend.name, i, act, device)
    if key not in _RUNS:
        layer = ckpt.load_layer(i, device=device)
        inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device=device)
        case = LayerCase(layer, ckpt.config.schema, *([None] * 3), {}, {}, RunOptions(), None)
        _RUNS[key] = ({s.name for s in applicable_stages(case)},
                      run_layer(ckpt, layer, inputs, options=RunOptions(act_scale=act), backend=backend,
                                controls=True))
    return _RUNS[key]


def test_stage_verdict(ckpt, stage_check):
    name, i, stage, check, act = stage_check
    backend, device = _backend_here(name)
    stages, run = _layer_run(ckpt, backend, i, act, device)
    v = run.verdict(stage, check)
    if v is None and stage not in stages:
        pytest.skip(f"layer{i} has no {stage} (not in this layer: dense MLP, no shared expert, ...)")
    whole = [x for x in run.verdicts if x.stage == stage]
    if v is None and len(whole) == 1 and whole[0].status == "skipped":  # the stage skipped as a whole (SkipStage)
        pytest.skip(f"{stage} does not apply in this run: {whole[0].message}")
    assert v is not None, f"layer{i} has {stage}, but no {stage} {check} verdict was produced (dropped silently)"
    built_elsewhere = run.verdict(stage, "provenance")  # a kernel not built for this device fails every check
    assert built_elsewhere is None, built_elsewhere.message
    if v.status in ("not served", "skipped"):
        pytest.skip(f"{v.status}: {v.message}")
    assert v.status == "pass", v.message


def test_check_fails_its_negative_control(ckpt, control_check):
    """The check column, on this backend's real outputs of this layer, fails each stage's planted known-bad
    input (verify.verdicts.controls): a check that passes one is blind there, and this item fails."""
    name, i, check, act = control_check
    backend, device = _backend_here(name)
    _, run = _layer_run(ckpt, backend, i, act, device)
    controls = [c for c in run.controls if c.check == check]
    blind = [c for c in controls if c.status == "fail"]
    assert not blind, "\n".join(c.message for c in blind)
    shown = [c for c in controls if c.status == "pass"]
    if not shown:
        reasons = sorted({c.message for c in controls}) or [f"no stage of layer{i} has the {check} check here"]
        pytest.skip(f"no {check} verdict passed in this run, so no control ran: {reasons[0]}")


def test_every_applicable_stage_has_a_verdict_per_check(ckpt):
    """No stage is dropped silently: each (stage, check) of the layer's table rows has a verdict."""
    run = _run(ckpt, EmulatorBackend(), 0, "static", "cpu")
    layer = ckpt.load_layer(0)
    case = LayerCase(layer, ckpt.config.schema, *([None] * 3), {}, {}, RunOptions(), None)
    expected = {(s.name, c.value) for s in applicable_stages(case) for c in s.checks}
    assert {(v.stage, v.check) for v in run.verdicts} == expected


def test_verdict_stage_names_come_from_the_table(ckpt):
    run = _run(ckpt, EmulatorBackend(), 3, "dynamic", "cpu")
    names = {s.name for s in STAGES}
    judged = {v.stage for v in run.verdicts}
    assert judged, "layer 3 produced no verdict at all: nothing was judged"
    assert judged <= names, f"verdicts for stages the table does not name: {sorted(judged - names)}"


# ============================================================================= planted bugs


class Planted(EmulatorBackend):
    """The emulator with a bug verify.selftest's generic injectors cannot express at the protocol
    boundary (they need the emulator's internals); every other class comes from selftest.Bugged."""

    def __init__(self, bug: str) -> None:
        super().__init__("te")
        self.bug = bug
        self.name = f"planted-{bug}"

    def _reads_padding(self, a, y):
        """A kernel that folds a tile-wide max of the scale buffer (padding included) into its output."""
        from references.codecs import e4m3_bytes_to_f32

        tile_max = e4m3_bytes_to_f32(a.sf_swizzled_u8).amax()  # NaN once 0x7F / 0xFF sit in the padding
        fix = lambda t: (t.float() + 0.0 * tile_max).to(t.dtype)  # noqa: E731
        return tuple(fix(t) for t in y) if isinstance(y, tuple) else fix(y)

    def dense_gemm(self, a, w):
        y = super().dense_gemm(a, w)
        return self._reads_padding(a, y) if self.bug == "reads-scale-padding" else y

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        y = super().grouped_gemm(a, offsets_i32, experts, layer=layer)
        return self._reads_padding(a, y) if self.bug == "reads-scale-padding" else y

    def router(self, x_bf16, router, *, token_ids_i64=None):
        if self.bug == "sqrt-dropped-from-sqrtsoftplus" and router.tid2eid_i64 is None:
            s = router.spec
            logits = router_logits_f32(x_bf16, router.gate_weight_bf16)
            scores = torch.nn.functional.softplus(logits.double()).float()  # sqrt(softplus) without the sqrt
            ids = select_experts_topk(scores, top_k=s.top_k, bias_f32=router.gate_bias_f32)
            return RoutingOut(ids, routing_weights_f32(scores, ids, routed_scaling_factor=s.routed_scaling_factor,
                                                       renormalize=True))
        return super().router(x_bf16, router, token_ids_i64=token_ids_i64)


def _planted(bug: str):
    return Planted(bug) if bug in ("reads-scale-padding", "sqrt-dropped-from-sqrtsoftplus") \
        else Bugged(EmulatorBackend(), bug)


def _tied_layer(layer):
    """Experts 4 and 5 get identical gate rows and biases: their scores tie exactly on every token."""
    r = layer.router
    g = r.gate_weight_bf16.clone()
    g[5] = g[4]
    b = r.gate_bias_f32.clone()
    b[5] = b[4]
    return dataclasses.replace(layer, router=dataclasses.replace(r, gate_weight_bf16=g, gate_bias_f32=b))


# layer 0's NVFP4 linears: the dense ones and the grouped attn.wo_a (the same prepare_linear and quantize)
_NVFP4_LINEARS = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_a", "attn.wo_b", "shared.l1", "shared.l2")
PLANTED = {
    # bug: (layer, failing (stage, check) verdicts; nothing else may fail). A bug in an op the MoE block
    # runs (router, grouped GEMM weights) also fails the block's bound (moe.block runs the backend's own
    # block, so a bug planted only in a stage-level op the block does not call leaves it passing)
    "swapped-nibbles": (0, {(s, "bytes") for s in _NVFP4_LINEARS}),
    # a wrong weight operand fails every GEMM that reads it, the fused L1 included
    "untransposed-scale-matrix": (0, {(s, "bound") for s in (*_NVFP4_LINEARS, "moe.l1", "moe.l2")}
                                  | {("moe.l1_fused", "interval"), ("moe.block", "bound")}),
    "global-scale-inverted": (0, {(s, "bound") for s in (*_NVFP4_LINEARS, "moe.l1", "moe.l2")}
                              | {("moe.l1_fused", "interval"), ("moe.block", "bound")}),
    "gate-up-interleave-halved": (0, {("moe.l1", "bound"), ("moe.l1_fused", "interval"), ("moe.block", "bound")}),
    "garbage-in-scale-padding": (0, {("moe.act_quant", "bytes"), ("moe.requant", "bytes")}),
    # the emulator's fused L1 uses the same SwiGLU: both stages must see the dropped clamp
    "swiglu-clamp-dropped": (0, {("moe.swiglu", "rounding"), ("moe.l1_fused", "interval")}),
    "routing-weight-at-the-wrong-place": (0, {("moe.combine", "bound")}),
    "reads-scale-padding": (0, {(s, "padding") for s in ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_b", "shared.l1",
                                                         "shared.l2", "moe.l1", "moe.l2")}),
    "router-ties-to-higher-id": ("tied", {("router", "ids"), ("moe.block", "bound")}),  # weights are judged where the ids agree
    "sqrt-dropped-from-sqrtsoftplus": (3, {("router", "ids"), ("router", "weights"), ("moe.block", "bound")}),
}


@pytest.mark.layer0
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_fails_exactly_its_stage_and_check(ckpt, bug):
    which, expected = PLANTED[bug]
    layer = ckpt.load_layer(3 if which == "tied" else which)
    if which == "tied":
        layer = _tied_layer(layer)
    inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device="cpu")
    run = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale="static"), backend=_planted(bug))
    failed = {(v.stage, v.check) for v in run.failed}
    assert failed == expected, (f"{bug}: failed {sorted(failed)}, expected exactly {sorted(expected)}\n" +
                                "\n".join(f"  {v.stage} {v.check}: {v.message[:300]}" for v in run.failed))
    for v in run.failed:
        assert v.message.startswith(f"{v.stage} {v.check}:"), v.message  # the message names stage and check


def _layer0_run(ckpt, bug: str):
    layer = ckpt.load_layer(0)
    inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device="cpu")
    return run_layer(ckpt, layer, inputs, options=RunOptions(act_scale="static"), backend=_planted(bug))


def test_a_bound_failure_names_the_element_both_values_and_the_bound(ckpt):
    msg = _layer0_run(ckpt, "global-scale-inverted").verdict("moe.l1", "bound").message
    for word in ("moe.l1 bound:", "first at", "got", "expected", "bound"):
        assert word in msg, msg


def test_a_bytes_failure_names_the_index_and_both_bytes(ckpt):
    msg = _layer0_run(ckpt, "garbage-in-scale-padding").verdict("moe.act_quant", "bytes").message
    assert "first at" in msg and "got 0xff" in msg and "expected 0x00" in msg, msg


def test_the_tie_fixture_really_ties(ckpt):
    """The router tie bug is only caught on exact ties: the tied layer must put both experts at the
    k-th / (k+1)-th boundary on some tokens."""
    layer = _tied_layer(ckpt.load_layer(3))
    inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device="cpu")
    run = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale="static"))
    ids = run.emulated["router.ids"]
    has4, has5 = (ids == 4).any(1), (ids == 5).any(1)
    assert bool((has4 & ~has5).any()), "no token where the tie between experts 4 and 5 decides the k-th slot"


def test_emulator_moe_block_valid_token_count_zeroes_the_rest(ckpt):
    """The valid-token count's contract, on the reference: rows < n as a call on the first n tokens
    alone, rows >= n zero (what a graph captured at capacity must replay)."""
    layer = ckpt.load_layer(3)
    inputs = layer_inputs(ckpt, layer, tokens=8, seed=SEED, device="cpu")
    b = EmulatorBackend()
    from verify.reference_layer import moe_spec_from

    spec = moe_spec_from(ckpt.config)
    router, experts = b.prepare_router(layer.router, spec), b.prepare_experts(layer.experts)
    kw = dict(swiglu_limit=spec.swiglu_limit, weight_placement="after_w2", act_scale="static")
    y3 = b.moe_block(inputs.x_ffn_bf16, router, experts, num_valid_tokens_i32=torch.tensor([3], dtype=torch.int32), **kw)
    alone = b.moe_block(inputs.x_ffn_bf16[:3], router, experts, **kw)
    assert_bits_equal(y3[:3], alone, label="three tokens of a 5-token call with 3 valid vs the 3-token call")
    assert_all_zero(y3[3:], label="rows of the 2 tokens past the valid count")


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.layer0
def test_planted_host_sync_fails_only_the_sync_and_graph_checks(ckpt):
    """A `.item()` inside a stage (sm90's dense linear reads the activation amax on the host): the
    sync probe names the stage, the graph probe fails its capture; the numbers stay right."""
    from verify.backends.sm90 import Sm90Adapter

    class HostSync(Sm90Adapter):
        def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
            if float(x_bf16.abs().amax().item()) < 0:  # the host read is the bug; the branch never runs
                raise AssertionError("unreachable")
            return super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)

    layer = ckpt.load_layer(0, device="cuda")
    inputs = layer_inputs(ckpt, layer, tokens=TOKENS, seed=SEED, device="cuda")
    run = run_layer(ckpt, layer, inputs, options=RunOptions(act_scale="static"), backend=HostSync())
    dense = ("attn.wq_a", "attn.wkv", "attn.wq_b", "attn.wo_b", "shared.l1", "shared.l2")
    expected = {(s, c) for s in dense for c in ("sync", "graph")}
    failed = {(v.stage, v.check) for v in run.failed}
    assert failed == expected, "\n".join(f"{v.stage} {v.check}: {v.message[:200]}" for v in run.failed)
    assert all("synchronizes with the host" in run.verdict(s, "sync").message for s in dense)


def test_the_readme_main_command_passes_on_the_fixture(capsys):
    """`python -m verify layer --backend auto` (the README's main job) on a CPU: every emulator verdict
    passes. It once failed on attn.wo_b: the emulator's GEMM cast float64 -> bf16 with torch's double
    rounding (through float32), caught once the emulator declared its true accumulator (2^-53)."""
    from verify.__main__ import main

    assert main(["layer", "--backend", "auto", "--device", "cpu"]) == 0, capsys.readouterr().out[-3000:]


def test_graph_probe_bytes_cover_every_tensor_of_a_boundary_dataclass():
    """The graph probe compares op outputs as bytes: a Dispatched (three tensors and the host int top_k)
    gives every tensor's bytes and skips the host field (an int once made every moe.dispatch graph probe
    fail on the H200 with 'cannot compare op output of type int')."""
    from verify.backends import Dispatched
    from verify.verdicts.probes import bits

    d = Dispatched(torch.arange(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64),
                   torch.tensor([0, 2, 4], dtype=torch.int32), top_k=2)
    b = bits(d)
    assert b.numel() == 4 * 8 + 4 * 8 + 3 * 4, f"Dispatched bytes: {b.numel()}, expected 76 (row_token, row_slot, offsets)"
    d2 = dataclasses.replace(d, offsets_i32=torch.tensor([0, 3, 4], dtype=torch.int32))
    assert int((bits(d2) != b).sum()) == 1, "a changed offset must change exactly one compared byte"
