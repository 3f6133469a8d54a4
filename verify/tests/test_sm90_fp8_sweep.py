"""The sm90 FP8 block-scaled GEMM config sweep (issue 23 item 8; marker bench, H100 / H200): every candidate
config of kernels.sm90.gemm_fp8_block_configs at the DeepSeek-V4-Pro FP8 shapes and M = 1, 16, 64, 128, 4096,
timed beside torch bf16 and torch._scaled_mm blockwise (cuBLASLt) in the same run; only configs bit-equal
to the reference (and so batch-invariant) and free of register spills can win. The table is printed and
written to NVFP4V_REPORT_DIR/sm90_fp8_sweep.json; commit the winners with
`python -m kernels.sm90.gemm_fp8_block_configs --from-json <that file>` (verify/tests/_fp8_sweep.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.mark.bench
@pytest.mark.gpu
@pytest.mark.sm90
def test_fp8_gemm_config_sweep():
    from verify.tests._fp8_sweep import run_sweep

    report = run_sweep(os.environ.get("NVFP4V_REPORT_DIR"))
    assert report["best"], "no (shape, M) was measured"
    differ = [(s["name"], s["M"], s["bits_differ"]) for s in report["best"] if s["bits_differ"]]
    # a config whose bits differ breaks the batch-invariance claim of gemm_fp8_block: never a silent pass
    assert not differ, f"configs whose output differs from the reference's bits: {differ}"
    fused_differ = [(s["name"], s["M"]) for s in report["best"] if s.get("fused_bits_equal") is False]
    assert not fused_differ, f"the fused quantize + GEMM differs from quantize then GEMM at {fused_differ}"
    assert all(s["best_us"] is not None for s in report["best"]), "a (shape, M) without a bit-equal candidate"
    assert torch.cuda.is_available()


def test_sweep_only_wide_times_the_192_tile_beside_the_committed_pick(monkeypatch):
    """NVFP4V_FP8_SWEEP_ONLY=wide: the 128 x 192 producer-warp candidates alone at M >= 128 (none below), each shape's
    committed pick and the reference key precompiled with them (sweep_shape times the pick beside them); a 4- or
    5-stage one-pass wide config only where the plan has one chunk (the running totals would not fit), each also as
    the dual tile; an unknown value is refused."""
    from kernels.sm90.gemm_fp8_block import WIDE_BN, CompileKey
    from verify.tests import _fp8_sweep as sw

    every = {m: sw.candidates(m) for m in (128, 4096)}
    monkeypatch.setenv("NVFP4V_FP8_SWEEP_ONLY", "wide")
    for m in (128, 4096):
        only = sw.candidates(m)
        assert only and all(c["block_n"] == WIDE_BN and c["producer"] for c in only), only
        assert all(c in every[m] for c in only), (m, only)  # a subset of the full sweep's candidates at that M
    assert sw.candidates(64) == []
    # the one-partition tile's candidates, then the same with the warpgroups as partitions (dual)
    assert [(c["num_stages"], c.get("dual", False)) for c in sw.shape_candidates(4096, 7168, 16384)] == [
        (3, False), (3, False), (3, True), (3, True)]
    assert [(c["num_stages"], c.get("dual", False)) for c in sw.shape_candidates(4096, 65536, 1536)] == [
        (3, False), (4, False), (5, False), (3, False), (3, True), (4, True), (5, True), (3, True)]
    from kernels.sm90 import gemm_fp8_block_configs

    wide = sw.shape_candidates(4096, 7168, 16384)
    ref = CompileKey.heuristic(4096, 7168, 16384, act_scale_ue8m0=True).config()
    # a committed pick that is not a wide candidate: timed first, then the reference, then the wide candidates
    monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", {(7168, 16384): ((8192, sw._glw(128, 128, 4, False)),)})
    pick = CompileKey.for_shape(4096, 7168, 16384, act_scale_ue8m0=True).config()
    assert pick not in wide and pick != ref
    jobs = [cfg for _, n, k, m, cfg in sw._jobs([("wo_b", 7168, 16384)], [4096])]
    assert jobs == [pick, ref] + wide, jobs
    # a committed pick that is one of them (the table after the H200 run): not timed twice
    monkeypatch.setattr(gemm_fp8_block_configs, "TABLE", {(7168, 16384): ((8192, wide[0]),)})
    jobs = [cfg for _, n, k, m, cfg in sw._jobs([("wo_b", 7168, 16384)], [4096])]
    assert jobs == [ref] + wide, jobs
    monkeypatch.setenv("NVFP4V_FP8_SWEEP_ONLY", "narrow")
    with pytest.raises(ValueError, match="NVFP4V_FP8_SWEEP_ONLY"):
        sw.candidates(4096)


_CPU_SCRIPT = """
import json, sys
import verify.tests._fp8_sweep as sw
sw._DEVICE = "cpu"
rows, best, winners = [], [], []
sw.sweep_shape("tiny", 192, 576, [1, 130], {}, rows, best, winners, m_max=130)
sw.M_MAX = 130
errors = sw._compile_worker(list(sw._jobs([("tiny", 192, 576)], [1])))
json.dump({"rows": rows, "best": best, "winners": winners, "worker_errors": errors}, open(sys.argv[1], "w"),
          default=str)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check of the sweep's logic")
def test_sweep_logic_on_the_cpu_interpreter(tmp_path):
    """The sweep's selection on a small shape under the Triton interpreter (N 192, K 576: partial weight tiles,
    5 chunks; M = 1 and 130): every candidate runs, is compared bit for bit with the reference and timed;
    one winner per M, bit-equal, in the table format the config writer reads."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    from kernels.sm90.gemm_fp8_block_configs import FIELDS, candidates, merged_table

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", _CPU_SCRIPT, str(out)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    for m in (1, 130):
        runs = [r for r in rep["rows"] if r["M"] == m]
        assert len(runs) >= len(candidates(m)), (m, len(runs))
        assert all("error" not in r and r["bits_equal"] is True and r["us"] > 0 for r in runs), runs
    assert [(w["N"], w["K"], w["M"]) for w in rep["winners"]] == [(192, 576, 1), (192, 576, 130)]
    assert all(set(w["config"]) == set(FIELDS) for w in rep["winners"])
    assert all(s["best_us"] is not None and not s["bits_differ"] for s in rep["best"])
    one = next(s for s in rep["best"] if s["M"] == 1)
    assert one.get("fused_bits_equal") is True and one["fused_us"] > 0, one  # the fused prologue at M <= 16
    assert set(merged_table({}, rep["winners"])) == {(192, 576)}
    assert rep["worker_errors"] == []  # the precompile worker ran every candidate and its fused variant
