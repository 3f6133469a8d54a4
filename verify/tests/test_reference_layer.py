"""The reference DeepSeek-V4 layer (references.layer) on the mini-v4 fixture: invariants,
routing-weight placement, zero-token experts, and the golden quantization-loss report.

Per-stage checks against separately written torch code are in test_reference_stages.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from references.layer import MoeWeights, RunOptions, moe_block
from references.linear import Nvfp4Weight
from references.moe import ExpertStack
from verify.assertions import assert_bits_equal
from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.golden import check_or_update_golden_run
from verify.layer_report import GOLDEN_CONFIGS, GOLDEN_PATH, GOLDEN_TOKENS, layer_inputs, layer_report, run_id
from verify.metrics import stage_metrics
from verify.reference_layer import moe_spec_from, moe_weights_from

LAYERS = [pytest.param(i, id=f"layer{i}", marks=getattr(pytest.mark, f"layer{i}")) for i in range(4)]
OPTIONS = [pytest.param(o, id=n) for n, o in GOLDEN_CONFIGS.items()]


@pytest.fixture(scope="module")
def ckpt():
    return Checkpoint.open(GOLDEN_DIR / "mini-v4")


@pytest.fixture(scope="module")
def layers(ckpt):
    return {i: ckpt.load_layer(i) for i in range(ckpt.config.num_layers)}


def _moe(ckpt, layers, i, tokens=GOLDEN_TOKENS, seed=0):
    layer = layers[i]
    inputs = layer_inputs(ckpt, layer, tokens=tokens, seed=seed, device="cpu")
    ids = inputs.token_ids_i64 if layer.router.tid2eid_i64 is not None else None
    return moe_weights_from(layer), moe_spec_from(ckpt.config), inputs.x_ffn_bf16, ids


def _permute_stack(w: Nvfp4Weight, perm: torch.Tensor) -> Nvfp4Weight:
    return Nvfp4Weight(w.packed_u8[perm], w.sf_u8[perm], w.global_dec_f32[perm], w.input_scale_f32[perm])


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("i", LAYERS)
def test_permuting_experts_leaves_the_output_unchanged(ckpt, layers, i, options):
    """Relabel experts e -> inv[e]: stacks, gate rows, bias and tid2eid all permuted together."""
    w, spec, x, ids = _moe(ckpt, layers, i)
    e_n = w.experts.num_experts
    perm = torch.randperm(e_n, generator=torch.Generator().manual_seed(i + 1))  # new expert j is old perm[j]
    inv = torch.argsort(perm)
    wp = MoeWeights(
        w.gate_weight[perm], None if w.gate_bias_f32 is None else w.gate_bias_f32[perm],
        None if w.tid2eid is None else inv[w.tid2eid],
        ExpertStack(*(_permute_stack(s, perm) for s in (w.experts.w1, w.experts.w3, w.experts.w2))), w.shared)
    ref = moe_block(x, w, spec, mode="emulated", options=options, token_ids_i64=ids)
    got = moe_block(x, wp, spec, mode="emulated", options=options, token_ids_i64=ids)
    assert torch.equal(perm[got["router.ids"]], ref["router.ids"]), "routing did not follow the relabelling"
    assert_bits_equal(got["moe.out"], ref["moe.out"], label=f"layer{i} moe.out with permuted experts")


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("i", LAYERS)
def test_permuting_tokens_permutes_the_output(ckpt, layers, i, options):
    w, spec, x, ids = _moe(ckpt, layers, i)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(7))
    ref = moe_block(x, w, spec, mode="emulated", options=options, token_ids_i64=ids)
    got = moe_block(x[perm], w, spec, mode="emulated", options=options,
                    token_ids_i64=None if ids is None else ids[perm])
    for stage in ("router.ids", "router.weights", "moe.combine", "moe.out"):
        assert_bits_equal(got[stage], ref[stage][perm], label=f"layer{i} {stage} with permuted tokens")


@pytest.mark.parametrize("i", [p for p in LAYERS if p.values[0] < 3])
def test_hash_layers_route_by_tid2eid(ckpt, layers, i):
    w, spec, x, ids = _moe(ckpt, layers, i)
    assert ids is not None and w.tid2eid is not None and w.gate_bias_f32 is None
    out = moe_block(x, w, spec, mode="emulated", token_ids_i64=ids)
    assert_bits_equal(out["router.ids"], w.tid2eid[ids], label=f"layer{i} router.ids vs tid2eid[token_ids]")
    # the weights come from the unbiased scores at those ids, renormalised, times the scale
    s = out["router.scores"].double().gather(1, w.tid2eid[ids])
    expected = (s / s.sum(1, keepdim=True) * spec.routed_scaling_factor).float()
    assert_bits_equal(out["router.weights"], expected, label=f"layer{i} router.weights")


def test_score_layer_routes_by_biased_top_k(ckpt, layers):
    w, spec, x, ids = _moe(ckpt, layers, 3)
    assert ids is None and w.tid2eid is None and w.gate_bias_f32 is not None
    out = moe_block(x, w, spec, mode="emulated")
    biased = out["router.scores"] + w.gate_bias_f32
    chosen = biased.gather(1, out["router.ids"])
    kth = biased.topk(spec.top_k, 1).values[:, -1]
    bad = (chosen.min(1).values < kth).nonzero().flatten()
    assert bad.numel() == 0, (f"token {int(bad[0])}: chose an expert with biased score "
                              f"{float(chosen[bad[0]].min())} below the k-th largest {float(kth[bad[0]])}")


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("mode", ["emulated", "high"])
def test_zero_token_experts_contribute_nothing(ckpt, layers, mode, options):
    """4 tokens x top-6 reach at most 24 of 16 experts' slots; the unrouted experts' weights are
    replaced by NaN scale bytes (0x7F) and NaN global scales: the output must not change."""
    w, spec, x, _ = _moe(ckpt, layers, 3, tokens=4)
    ref = moe_block(x, w, spec, mode=mode, options=options)
    unused = torch.ones(w.experts.num_experts, dtype=torch.bool)
    unused[ref["router.ids"].unique()] = False
    assert unused.any(), "the test needs at least one zero-token expert"

    def poison(s: Nvfp4Weight) -> Nvfp4Weight:
        sf, g = s.sf_u8.clone(), s.global_dec_f32.clone()
        sf[unused], g[unused] = 0x7F, float("nan")
        return dataclasses.replace(s, sf_u8=sf, global_dec_f32=g)

    wp = dataclasses.replace(w, experts=ExpertStack(*(poison(s) for s in (w.experts.w1, w.experts.w3, w.experts.w2))))
    got = moe_block(x, wp, spec, mode=mode, options=options)
    assert_bits_equal(got["moe.out"], ref["moe.out"], label=f"moe.out with {int(unused.sum())} poisoned idle experts")


@pytest.mark.parametrize("i", LAYERS)
def test_weight_placement_differs_only_by_the_requant_of_h(ckpt, layers, i):
    """Before vs after w2 agree in exact arithmetic (high mode: to float64 rounding) and up to
    l1 bit for bit; emulated, h * w and h are requantized differently, so the outputs differ:
    non-zero on the fixture, and smaller than the routed output's own quantization loss."""
    w, spec, x, ids = _moe(ckpt, layers, i)
    run = {(mode, p): moe_block(x, w, spec, mode=mode, options=RunOptions(weight_placement=p), token_ids_i64=ids)
           for mode in ("emulated", "high") for p in ("after_w2", "before_w2")}
    hi_a, hi_b = run["high", "after_w2"]["moe.combine"], run["high", "before_w2"]["moe.combine"]
    assert stage_metrics(hi_b, hi_a)["rel_l2"] < 1e-13
    em_a, em_b = run["emulated", "after_w2"], run["emulated", "before_w2"]
    for stage in ("moe.act_quant.packed_u8", "moe.act_quant.sf_u8", "moe.l1.gate", "moe.l1.up"):
        assert_bits_equal(em_b[stage], em_a[stage], label=f"layer{i} {stage} (placement must not matter yet)")
    diff = stage_metrics(em_b["moe.combine"], em_a["moe.combine"])["rel_l2"]
    loss = stage_metrics(em_a["moe.combine"], hi_a)["rel_l2"]
    assert diff > 0, f"layer{i}: before/after w2 gave identical bytes; the requant of h*w should differ"
    assert diff < loss, f"layer{i}: placement difference rel-L2 {diff:.3e} >= quantization loss {loss:.3e}"


@pytest.mark.golden
@pytest.mark.parametrize("config", list(GOLDEN_CONFIGS))
@pytest.mark.parametrize("i", LAYERS)
def test_golden_quantization_loss(ckpt, run_cfg, i, config):
    """Every stage's emulated-vs-high metrics and every emulated tensor's bytes of one mini-v4 layer
    and configuration equal its entry in golden/mini-v4/emulator.json (tolerances in verify.golden)."""
    doc = layer_report(ckpt, [i], configs={config: GOLDEN_CONFIGS[config]})
    rid = run_id(i, config)
    for stage, m in doc["runs"][rid]["metrics"].items():  # shown with -s, and on failure
        print(f"{rid:24s} {stage:16s} cosine {m['cosine']:.6f}  SQNR {m['sqnr_db']:6.2f} dB  "
              f"calc_diff {m['calc_diff']:.3e}")
    if run_cfg.report_dir:
        run_cfg.report_dir.mkdir(parents=True, exist_ok=True)
        (run_cfg.report_dir / f"mini-v4-emulator-{rid.replace('/', '-')}.json").write_text(json.dumps(doc, indent=1))
    diffs = check_or_update_golden_run(GOLDEN_PATH, rid, doc["runs"][rid], update=run_cfg.update_golden)
    assert not diffs, "golden report differs:\n  " + "\n  ".join(diffs[:40])


def test_activations_from_a_safetensors_file(ckpt, layers, tmp_path):
    """Captured activations (x_ffn, x_attn, token_ids in a safetensors file) drive the same
    runner and give the same stages as the embedding path on the same tensors."""
    from safetensors.torch import save_file

    from verify.reference_layer import inputs_from_safetensors, run_reference_layer

    inputs = layer_inputs(ckpt, layers[0], tokens=16, seed=3, device="cpu")
    path = tmp_path / "acts.safetensors"
    save_file({"x_ffn": inputs.x_ffn_bf16, "x_attn": inputs.x_attn_bf16, "token_ids": inputs.token_ids_i64}, str(path))
    loaded = inputs_from_safetensors(path)
    ref = run_reference_layer(ckpt, layers[0], inputs, mode="emulated")
    got = run_reference_layer(ckpt, layers[0], loaded, mode="emulated")
    assert ref.keys() == got.keys()
    for k in ref:
        assert_bits_equal(got[k], ref[k], label=f"layer0 {k} from safetensors inputs")


def test_safetensors_inputs_without_x_ffn_name_the_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    from verify.reference_layer import inputs_from_safetensors

    path = tmp_path / "acts.safetensors"
    save_file({"hidden": torch.zeros(2, 4)}, str(path))
    with pytest.raises(KeyError, match="x_ffn"):
        inputs_from_safetensors(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(act_scale="sometimes"), "act_scale"),
    (dict(weight_placement="inside"), "weight_placement"),
], ids=["bad-act_scale", "bad-placement"])
def test_run_options_reject_unknown_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunOptions(**kwargs)


def test_hash_layer_without_token_ids_is_a_clear_error(ckpt, layers):
    w, spec, x, _ = _moe(ckpt, layers, 0)
    with pytest.raises(ValueError, match="token_ids_i64"):
        moe_block(x, w, spec, mode="emulated")


@pytest.mark.parametrize("mode", ["emulated", "high"])
def test_zero_tokens_run_through_every_stage(ckpt, layers, mode):
    """T = 0 (an empty batch) on the score-routed FP8-attention layer: every stage has 0 rows."""
    from verify.reference_layer import run_reference_layer

    inputs = layer_inputs(ckpt, layers[3], tokens=0, seed=0, device="cpu")
    out = run_reference_layer(ckpt, layers[3], inputs, mode=mode)
    nonempty = [k for k, v in out.items() if v.dim() and v.shape[0] != 0 and not k.endswith("global_dec_f32")]
    assert not nonempty, f"stages with rows for T=0: {nonempty}"


def test_hash_layer_with_captured_activations_but_no_token_ids_is_refused(ckpt, layers, tmp_path):
    from safetensors.torch import save_file

    from verify.reference_layer import inputs_from_safetensors, run_reference_layer

    path = tmp_path / "acts.safetensors"
    save_file({"x_ffn": torch.zeros(3, ckpt.config.hidden_size, dtype=torch.bfloat16)}, str(path))
    inputs = inputs_from_safetensors(path)
    with pytest.raises(ValueError, match="token_ids"):
        run_reference_layer(ckpt, layers[0], inputs, mode="emulated")
    run_reference_layer(ckpt, layers[3], inputs, mode="emulated")  # a score-routed layer needs no ids


def test_layer_inputs_reject_mismatched_token_counts():
    from verify.reference_layer import LayerInputs

    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x_attn_bf16"):
        LayerInputs(None, torch.zeros(2, 8, dtype=torch.bfloat16), x)
    with pytest.raises(ValueError, match="token_ids_i64"):
        LayerInputs(torch.zeros(5, dtype=torch.int64), x, x)


def test_cli_layer_prints_loss_and_backend_verdicts_and_writes_json(tmp_path, capsys):
    from verify.__main__ import main

    out = tmp_path / "layer0.json"
    rc = main(["layer", "--layers", "0", "--tokens", "8", "--backend", "emulator", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "emulated NVFP4 vs high precision" in text and "emulator verdicts per stage" in text
    doc = json.loads(out.read_text())
    run = doc["runs"]["layer0/dynamic-after_w2-te"]
    status = {(v["stage"], v["check"]): v["status"] for v in run["verdicts"]}
    assert status[("attn.wq_a", "bound")] == "pass" and status[("moe.l1", "bound")] == "pass"
    assert status[("router", "ids")] == "pass" and status[("moe.act_quant", "bytes")] == "pass"
    assert run["metrics"]["moe.out"]["sqnr_db"] > 0


def test_cli_model_runs_every_layer(capsys):
    from verify.__main__ import main

    assert main(["model", "--tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert all(f"layer {i}: emulated NVFP4" in text for i in range(4)), text[-2000:]
