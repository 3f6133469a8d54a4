"""The reference layer on DeepSeek-V3/R1 naming (mini-v3, regenerated from its SHA256SUMS preset):
a dense first layer, sigmoid scoring with group-limited top-k, FP8 weight_scale_inv linears."""

from __future__ import annotations

import pytest
import torch

from verify.checkpoint import Checkpoint
from verify.checkpoint.writer import make_checkpoint
from verify.layer_report import layer_inputs
from verify.reference_layer import run_reference_layer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = make_checkpoint(tmp_path_factory.mktemp("fixtures") / "mini-v3", "mini-v3")["out"]
    return Checkpoint.open(out)


def _run(ckpt, i, mode):
    layer = ckpt.load_layer(i)
    inputs = layer_inputs(ckpt, layer, tokens=24, seed=2, device="cpu")
    return run_reference_layer(ckpt, layer, inputs, mode=mode)


@pytest.mark.parametrize("mode", ["emulated", "high"])
def test_dense_first_layer_runs_the_gated_mlp_stages(ckpt, mode):
    out = _run(ckpt, 0, mode)
    assert {"dense.l1.gate", "dense.l1.up", "dense.swiglu", "dense.l2"} <= set(out), sorted(out)
    assert not any(k.startswith(("moe.", "router.")) for k in out), sorted(out)
    bad = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v.double()).all()]
    assert not bad, f"non-finite stages: {bad}"


@pytest.mark.parametrize("i", [1, 2, 3], ids=lambda i: f"layer{i}")
def test_moe_layers_route_within_the_top_groups(ckpt, i):
    """sigmoid + bias, n_group groups, only the topk_group best groups (sum of their top-2 biased
    scores) may supply experts."""
    cfg = ckpt.config
    out = _run(ckpt, i, "emulated")
    layer = ckpt.load_layer(i)
    biased = out["router.scores"] + layer.router.gate_bias_f32
    groups = biased.view(biased.shape[0], cfg.n_group, -1)
    group_score = groups.topk(2, dim=-1).values.double().sum(-1)
    allowed = torch.sort(group_score, dim=1, descending=True, stable=True).indices[:, :cfg.topk_group]
    chosen_groups = out["router.ids"] // (cfg.n_routed_experts // cfg.n_group)
    for t in range(chosen_groups.shape[0]):
        extra = set(chosen_groups[t].tolist()) - set(allowed[t].tolist())
        assert not extra, f"layer{i} token {t}: experts from groups {sorted(extra)} outside the top {allowed[t].tolist()}"
    assert torch.isfinite(out["moe.out"].float()).all()


@pytest.mark.parametrize("i", [0, 1, 2, 3], ids=lambda i: f"layer{i}")
def test_every_emulator_verdict_passes_on_mini_v3(ckpt, i):
    """`python -m verify layer --backend auto` on the V3 fixture: the router is judged (group-limited
    top-k, issue 22 item 7), and nothing fails."""
    from references.layer import RunOptions
    from verify.layer_report import backend_for_verdicts
    from verify.run import run_layer

    layer = ckpt.load_layer(i)
    inputs = layer_inputs(ckpt, layer, tokens=24, seed=2, device="cpu")
    run = run_layer(ckpt, layer, inputs, options=RunOptions(fp8_scale_fmt="f32"),
                    backend=backend_for_verdicts("auto", torch.device("cpu")))
    assert not run.failed, [f"{v.stage} {v.check}: {v.message}" for v in run.failed]
    router = {v.check: v.status for v in run.verdicts if v.stage == "router"}
    expected = {} if i == 0 else {"ids": "pass", "weights": "pass", "sync": "skipped", "graph": "skipped"}
    assert router == expected, router
