"""verify.golden: exact digests, metric tolerances, the missing / mismatch / update paths (STYLE section 8),
and the golden files per backend (golden/mini-v4/<backend>.json: emulator in CI, sm90 / sm100 on their GPUs)."""

from __future__ import annotations

import json

import pytest
import torch

from verify.checkpoint import Checkpoint
from verify.config import GOLDEN_DIR
from verify.golden import (
    backend_golden_run, check_or_update_golden, check_or_update_golden_run, compare_golden, obtained_path,
    tolerance_for, write_golden,
)
from verify.layer_report import GOLDEN_CONFIGS, backend_for_verdicts, layer_inputs
from verify.run import run_layer


def _doc(sqnr=20.0, digest="ab"):
    return {"environment": {"torch": "x"}, "runs": {"layer0/a": {"metrics": {"moe.l1.gate": {"sqnr_db": sqnr}},
                                                                 "digests": {"moe.l1.gate": digest}}}}


def test_identical_documents_have_no_differences():
    assert compare_golden(_doc(), _doc()) == []


def test_a_metric_inside_its_tolerance_passes_and_outside_fails():
    assert compare_golden(_doc(20.0), _doc(20.0 + 1e-12)) == []
    diffs = compare_golden(_doc(20.0), _doc(20.001))
    assert len(diffs) == 1 and "sqnr_db" in diffs[0] and "layer0/a" in diffs[0]


def test_a_changed_digest_is_reported_even_when_metrics_agree():
    diffs = compare_golden(_doc(digest="ab"), _doc(digest="cd"))
    assert len(diffs) == 1 and "bytes differ" in diffs[0]


def test_a_missing_golden_is_written_and_reported(tmp_path):
    path = tmp_path / "g.json"
    problems = check_or_update_golden(path, _doc(), update=False)
    assert problems and "created" in problems[0] and path.exists()
    assert check_or_update_golden(path, _doc(), update=False) == []


def test_a_mismatch_leaves_an_obtained_file_and_update_rewrites(tmp_path):
    path = tmp_path / "g.json"
    write_golden(path, _doc(20.0))
    problems = check_or_update_golden(path, _doc(25.0), update=False)
    assert len(problems) == 2 and obtained_path(path).exists()
    assert json.loads(obtained_path(path).read_text())["runs"]["layer0/a"]["metrics"]["moe.l1.gate"]["sqnr_db"] == 25.0
    problems = check_or_update_golden(path, _doc(25.0), update=True)
    assert "rewritten" in problems[0] and check_or_update_golden(path, _doc(25.0), update=False) == []
    assert not obtained_path(path).exists()


def test_one_run_is_checked_and_updated_without_touching_the_others(tmp_path):
    from verify.golden import check_or_update_golden_run, load_golden

    path = tmp_path / "g.json"
    doc = _doc(20.0)
    doc["runs"]["layer1/a"] = _doc(30.0)["runs"]["layer0/a"]
    write_golden(path, doc)
    assert check_or_update_golden_run(path, "layer1/a", doc["runs"]["layer1/a"], update=False) == []
    changed = _doc(21.0)["runs"]["layer0/a"]
    problems = check_or_update_golden_run(path, "layer0/a", changed, update=False)
    assert problems and "layer0/a" in problems[0] and obtained_path(path).exists()
    check_or_update_golden_run(path, "layer0/a", changed, update=True)
    after = load_golden(path)["runs"]
    assert after["layer0/a"]["metrics"]["moe.l1.gate"]["sqnr_db"] == 21.0
    assert after["layer1/a"]["metrics"]["moe.l1.gate"]["sqnr_db"] == 30.0
    problems = check_or_update_golden_run(path, "layer2/a", changed, update=False)
    assert "created" in problems[0] and "layer2/a" in load_golden(path)["runs"]


def test_golden_diff_lists_the_largest_relative_change_first():
    from verify.golden import compare_golden

    golden = {"runs": {"r": {"metrics": {"a": {"sqnr_db": 20.0}, "b": {"sqnr_db": 30.0}, "c": {"cosine": 0.99}},
                             "digests": {"x": "00"}}}}
    got = {"runs": {"r": {"metrics": {"a": {"sqnr_db": 20.001}, "b": {"sqnr_db": 15.0}, "c": {"cosine": 0.98}},
                          "digests": {"x": "11"}}}}
    diffs = compare_golden(golden, got)
    assert diffs[0].startswith("r b sqnr_db: golden 30.0, got 15.0 (relative change 0.5"), diffs
    assert any(d.startswith("r a sqnr_db") for d in diffs[1:]), diffs  # the 8th-digit drift comes later
    assert diffs[-1].startswith("r x: bytes differ"), diffs


# ----------------------------------------------------------------------------- backend goldens

BACKEND_GOLDEN_TOKENS = 16
BACKENDS = [
    pytest.param("emulator", "cpu", id="emulator"),
    pytest.param("sm90", "cuda", id="sm90", marks=[pytest.mark.gpu, pytest.mark.sm90]),
    pytest.param("sm100", "cuda", id="sm100", marks=[pytest.mark.gpu, pytest.mark.sm100]),
]
LAYERS = [pytest.param(i, id=f"layer{i}", marks=getattr(pytest.mark, f"layer{i}")) for i in range(4)]


def backend_run_id(layer: int, config: str) -> str:
    return f"layer{layer}/{config}/verdicts"


@pytest.fixture(scope="module")
def backends():
    cache = {}

    def get(name: str, device: str):
        if name not in cache:  # the accumulator probe runs once per backend
            cache[name] = backend_for_verdicts(name, torch.device(device))
        return cache[name]
    return get


@pytest.mark.golden
@pytest.mark.parametrize("config", list(GOLDEN_CONFIGS))
@pytest.mark.parametrize("i", LAYERS)
@pytest.mark.parametrize("backend_name, device", BACKENDS)
def test_backend_golden(backend_name, device, i, config, backends, run_cfg):
    """golden/mini-v4/<backend>.json: every verdict's status and metrics (bound ratios, vs-high loss
    of the backend's outputs, router statistics) and the digests of the teacher-forcing tensors of one
    layer and configuration. A backend without a golden file gets it written and the test fails
    ('missing golden ..., written to ...'): run once on the hardware, review, commit."""
    backend = backends(backend_name, device)
    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    layer = ckpt.load_layer(i, device=device)
    inputs = layer_inputs(ckpt, layer, tokens=BACKEND_GOLDEN_TOKENS, seed=0, device=device)
    run = run_layer(ckpt, layer, inputs, options=GOLDEN_CONFIGS[config], backend=backend)
    got = backend_golden_run(run.digests, run.verdicts)
    declared = {"backend": {"name": backend.name, "recipe": backend.recipe.name, "u_acc": backend.u_acc},
                "tokens": BACKEND_GOLDEN_TOKENS}
    path = GOLDEN_DIR / "mini-v4" / f"{backend_name}.json"
    diffs = check_or_update_golden_run(path, backend_run_id(i, config), got, update=run_cfg.update_golden, env=declared)
    assert not diffs, "backend golden differs:\n  " + "\n  ".join(diffs[:40])


MTP_GOLDEN_CONFIG = "dynamic-after_w2"  # the MTP rows read no act_scale / placement option: one configuration


@pytest.mark.golden
@pytest.mark.parametrize("backend_name, device", BACKENDS)
def test_backend_golden_mtp(backend_name, device, backends, run_cfg):
    """golden/mini-v4/<backend>.json, run mtp.0/<config>/verdicts: the MTP block's verdicts (references.stages rows
    of unit "mtp": e_proj / h_proj FP8, the MXFP4 experts), metrics and the digests of its reference tensors."""
    from verify.mtp import mtp_inputs, run_mtp

    backend = backends(backend_name, device)
    ckpt = Checkpoint.open(GOLDEN_DIR / "mini-v4")
    mtp = ckpt.load_mtp(0, device=device)
    inputs = mtp_inputs(ckpt, mtp, tokens=BACKEND_GOLDEN_TOKENS, seed=0, device=device)
    run = run_mtp(ckpt, mtp, inputs, options=GOLDEN_CONFIGS[MTP_GOLDEN_CONFIG], backend=backend)
    got = backend_golden_run(run.digests, run.verdicts)
    declared = {"backend": {"name": backend.name, "recipe": backend.recipe.name, "u_acc": backend.u_acc},
                "tokens": BACKEND_GOLDEN_TOKENS}
    path = GOLDEN_DIR / "mini-v4" / f"{backend_name}.json"
    diffs = check_or_update_golden_run(path, f"mtp.0/{MTP_GOLDEN_CONFIG}/verdicts", got, update=run_cfg.update_golden,
                                       env=declared)
    assert not diffs, "backend golden differs:\n  " + "\n  ".join(diffs[:40])


def test_backend_golden_runs_hold_statuses_metrics_and_output_digests():
    from verify.verdicts import Verdict

    verdicts = [Verdict("moe.l1", "bound", "pass", "ok", {"bound_ratio_gate": 0.5, "seconds": 3.0,
                                                         "vs_high_gate": {"cosine": 0.99, "note": "x"}}),
                Verdict("moe.l1", "graph", "fail", "replay differs", {"mutations": ["new values"],
                                                                       "sha256_y": "ab" * 32})]
    run = backend_golden_run({"moe.l1.gate": "cd" * 32}, verdicts)
    assert run == {"metrics": {"moe.l1": {"bound.bound_ratio_gate": 0.5, "bound.vs_high_gate.cosine": 0.99}},
                   "digests": {"moe.l1.gate": "cd" * 32, "moe.l1.graph.sha256_y": "ab" * 32},
                   "verdicts": {"moe.l1 bound": "pass", "moe.l1 graph": "fail"}}


def test_a_changed_verdict_status_is_a_golden_difference_listed_before_metrics():
    g = {"runs": {"r": {"metrics": {"s": {"bound.bound_ratio_y": 0.5}}, "digests": {}, "verdicts": {"s bound": "pass"}}}}
    n = {"runs": {"r": {"metrics": {"s": {"bound.bound_ratio_y": 0.7}}, "digests": {}, "verdicts": {"s bound": "fail"}}}}
    diffs = compare_golden(g, n)
    assert diffs[0] == "r s bound: verdict golden 'pass', got 'fail'" and "bound_ratio_y" in diffs[1], diffs


def test_metric_tolerances_are_found_by_the_metrics_own_name():
    assert tolerance_for("cosine") == tolerance_for("bound.vs_high_y.cosine") == (1e-12, 1e-9)
    assert tolerance_for("bound.bound_ratio_gate") == tolerance_for("bound_ratio")
    assert tolerance_for("ids.near_ties") == (0.0, 0.0)  # counts: exact
    assert compare_golden(*({"runs": {"r": {"metrics": {"s": {"bound.bound_ratio_y": x}}, "digests": {}}}}
                            for x in (0.5, 0.5 * (1 + 1e-12)))) == []


def test_a_missing_backend_golden_file_fails_saying_where_it_was_written(tmp_path):
    path = tmp_path / "sm100.json"
    problems = check_or_update_golden_run(path, "layer0/a/verdicts", {"metrics": {}, "digests": {}}, update=False)
    assert problems == [f"missing golden {path}: written to {path} with layer0/a/verdicts (created); "
                        "review and commit it"] and path.exists()


def test_max_rel_tolerates_the_cross_cpu_blas_drift_and_nothing_larger():
    """vs_high max_rel on an AVX-512 host vs an AVX2 host (MKL picks the float64 dot's summation order per
    CPU): 3070.1429585070373 vs 3070.1429585035066. That drift passes; a 1e-6 relative change does not."""
    def doc(x):
        return {"runs": {"r": {"metrics": {"attn.wo_b": {"bound.vs_high_y.max_rel": x}}, "digests": {}}}}

    assert compare_golden(doc(3070.1429585070373), doc(3070.1429585035066)) == []
    moved = compare_golden(doc(3070.1429585070373), doc(3070.1429585070373 * (1 + 1e-6)))
    assert moved and "max_rel" in moved[0], moved
