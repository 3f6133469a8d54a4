"""The humming adapter's own code on the CPU, over a fake of humming's entry points (verify/tests/humming_cpu_fake.py):
shapes humming's kernels cannot take are padded (the accumulator probe's 35 columns), humming's exceptions reach
the CLI as one line, prepared weights decode back exactly up to the sign of zero (the decode-back comparison
helper, adapters._common.zero_sign_blind_diff, and a check that it can fail), and `python -m verify layer
--backend <humming>` runs end to end: verdict rows for what humming serves, "not served" for the rest, exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from references.nvfp4 import decode_nvfp4_block_scaled, quantize_nvfp4_weight_checkpoint
from references.recipes import MODELOPT
from verify.backends.adapters._common import zero_sign_blind_diff
from verify.checkpoint import GatedMlp, Nvfp4Linear
from verify.rng import CounterRng
from verify.tests.humming_cpu_fake import BACKEND_MODULE, install_cpu_humming

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake humming package and the cpu_humming backend module importable here (and by PYTHONPATH)."""
    install_cpu_humming(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "humming" or m.startswith("humming.") or m == BACKEND_MODULE]:
        monkeypatch.delitem(sys.modules, mod)
    from verify.backends.adapters import humming as hm
    monkeypatch.setattr(hm, "_N_MULTIPLE", hm._N_MULTIPLE)   # CpuHummingUnpadded changes it: undone after
    monkeypatch.setattr(hm, "_cuda_device", hm._cuda_device)  # cpu_humming changes it: undone after
    import importlib
    yield importlib.import_module(BACKEND_MODULE), tmp_path
    # the fake package imported during the test leaves with it (monkeypatch restores only what it deleted): a later
    # test must find humming not installed, as on this machine
    for mod in [m for m in sys.modules if m == "humming" or m.startswith("humming.") or m == BACKEND_MODULE]:
        sys.modules.pop(mod, None)


def _linear(n: int, k: int, seed: int, experts: int | None = None, gain: float = 1.0) -> Nvfp4Linear:
    g = CounterRng(seed)
    parts = []
    for e in range(experts or 1):
        w = (g.normal((n, k)) * g.lognormal((n, k), sigma=0.5) * gain ** e).to(torch.bfloat16).float()
        parts.append(quantize_nvfp4_weight_checkpoint(w, recipe=MODELOPT))
    t = {key: torch.stack([p[key] for p in parts]) if experts else parts[0][key] for key in parts[0]}
    return Nvfp4Linear(f"synthetic{seed}", t["weight"].view(torch.uint8), t["weight_scale"],
                       t["weight_scale_2"].float(), torch.full((experts,) if experts else (), 0.01))


def _dequant(lin: Nvfp4Linear) -> torch.Tensor:
    ws2 = lin.weight_scale_2_f32.float()
    return decode_nvfp4_block_scaled(lin.weight_u8, lin.weight_scale_e4m3) * ws2.reshape(*ws2.shape, 1, 1)


# ----------------------------------------------------------------------------- the decode-back comparison helper


def test_zero_sign_blind_diff_counts_signed_zeros_apart_and_nothing_else_passes():
    want = torch.tensor([0.0, -0.0, 1.5, -2.0, 0.0, float("nan"), 3.0, -0.0])
    got = torch.tensor([-0.0, 0.0, 1.5, -2.0, 0.0, float("nan"), 3.0000002, 1e-45])
    d = zero_sign_blind_diff(got, want)
    assert (d.total, d.bits_differ, d.zero_sign_only) == (8, 5, 2)
    assert d.other == 3 and d.first_other == 5  # NaN == NaN never; one float32 ulp; -0 vs the smallest subnormal


def test_zero_sign_blind_diff_refuses_shapes_that_differ():
    with pytest.raises(ValueError, match=r"got: shape \(2,\) differs from want \(3,\)"):
        zero_sign_blind_diff(torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------------------- the adapter over the fake


@pytest.mark.parametrize("n,k,experts", [(128, 256, None), (35, 1024, None), (44, 64, 3)], ids=str)
def test_prepared_weights_decode_back_exactly_up_to_the_sign_of_zero(fake, n, k, experts):
    """Through the identity GEMM every value comes back bit-exact except -0 -> +0 (the only mismatches; there are
    some: the ModelOpt quantizer writes code 0x8), for N that humming cannot take unpadded too (35, 44)."""
    mod, _ = fake
    b = mod.CpuHumming()
    lin = _linear(n, k, seed=n + k, experts=experts)
    prepared = b.prepare_linear(lin) if not experts else b.prepare_experts(GatedMlp(lin, lin, lin)).w2
    got, want = b.dequantize_prepared(prepared), _dequant(lin)
    d = zero_sign_blind_diff(got, want)
    negative_zeros = int(((want == 0) & torch.signbit(want)).sum())
    print(f"\nfake humming prepare {n}x{k} x{experts or 1}: {d.bits_differ}/{d.total} differ in bits, "
          f"{d.zero_sign_only} of them signed zeros, {d.other} other")
    assert d.other == 0, f"first at flat {d.first_other}: got {got.reshape(-1)[d.first_other]}, " \
                         f"want {want.reshape(-1)[d.first_other]}"
    assert negative_zeros > 0 and d.zero_sign_only == negative_zeros


def test_the_decode_back_comparison_sees_a_scale_applied_twice(fake):
    mod, _ = fake
    b = mod.CpuHumming()
    lin = _linear(64, 256, seed=9)
    want = _dequant(lin)
    got = b.dequantize_prepared(b.prepare_linear(lin)) * lin.weight_scale_2_f32
    d = zero_sign_blind_diff(got, want)
    assert d.other == int((want != 0).sum()) > 0  # every nonzero weight (zeros stay zeros of either sign)


def test_dequantize_prepared_of_experts_gives_w1_w3_w2_in_checkpoint_layout(fake):
    mod, _ = fake
    b = mod.CpuHumming()
    w1, other, w2 = _linear(64, 96, 1, experts=2), _linear(64, 96, 2, experts=2), _linear(96, 64, 3, experts=2)
    # w3: other codes and block scales under w1's weight_scale_2 (shared gate/up global scales: humming keeps one
    # float32 scale per expert; different ones become bf16 channel scales, test_humming_gpu's w13 case)
    w3 = Nvfp4Linear("w3", other.weight_u8, other.weight_scale_e4m3, w1.weight_scale_2_f32, w1.input_scale_f32)
    got = b.dequantize_prepared(b.prepare_experts(GatedMlp(w1, w3, w2)))
    assert sorted(got) == ["w1", "w2", "w3"]
    for role, lin in (("w1", w1), ("w3", w3), ("w2", w2)):
        d = zero_sign_blind_diff(got[role], _dequant(lin))
        assert got[role].shape == (2, *_dequant(lin).shape[1:]) and d.other == 0, (role, d)


def test_dense_gemm_on_35_columns_is_padded_for_humming_and_cut_back(fake):
    """The accumulator probe's shape (N = 35): humming's `assert pad_shape[1] % 8 == 0` would fire unpadded."""
    from verify.accumulator import PROBE_PATHS, probe_accumulator

    mod, _ = fake
    readings = probe_accumulator(mod.CpuHumming(), "cpu")
    assert [r.path for r in readings] == list(PROBE_PATHS) and all(r.effective_bits >= 24 for r in readings), readings


def test_the_probe_skips_the_paths_a_backend_does_not_serve(fake, monkeypatch):
    """A path whose shape the backend refuses (NotImplementedError, its reason) is not probed; the others are."""
    from verify.accumulator import probe_accumulator
    from verify.backends.adapters import humming as hm

    mod, _ = fake
    monkeypatch.setattr(hm, "_K_MULTIPLE", 2048)  # as if humming took K a multiple of 2048 only: K = 1024 refused
    readings = probe_accumulator(mod.CpuHumming(), "cpu")
    assert [r.path for r in readings] == ["M=1, K=8192 (wgmma, 32 chunks)"]


def test_humming_refuses_k_it_cannot_repack_as_not_served(fake):
    mod, _ = fake
    with pytest.raises(NotImplementedError, match=r"not served: humming takes K a multiple of 32 .* K = 48"):
        mod.CpuHumming().prepare_linear(_linear(64, 48, seed=4))


# ----------------------------------------------------------------------------- through the CLI


def _verify(args: list[str], path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "verify", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_accumulator_cli_measures_every_path_through_the_fake(fake):
    _, path = fake
    proc = _verify(["accumulator", "--backend", f"{BACKEND_MODULE}:CpuHumming", "--device", "cpu"], path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "M=1, K=8192 (wgmma, 32 chunks)" in proc.stdout and "Traceback" not in proc.stderr


def test_a_crash_inside_humming_is_one_line_naming_the_backend_and_op(fake):
    """Unpadded, humming's bare shape assert fires inside its code: the CLI prints one line (exit 2) naming the
    backend, the op, the shape and humming's failing line; no traceback."""
    _, path = fake
    proc = _verify(["accumulator", "--backend", f"{BACKEND_MODULE}:CpuHummingUnpadded", "--device", "cpu"], path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("verify accumulator: error: --backend humming: refused (its dense_gemm crashed"), lines
    assert "humming: dense_gemm on accumulator-probe M=1 N=35 K=1024 failed inside humming (AssertionError at " \
           "forward.py:" in lines[0] and "`assert config.pad_shape_n % 8 == 0`" in lines[0], lines


def _verdicts(doc) -> list[dict]:
    if isinstance(doc, dict):
        found = [doc] if {"stage", "check", "status"} <= doc.keys() else []
        return found + [v for x in doc.values() for v in _verdicts(x)]
    if isinstance(doc, list):
        return [v for x in doc for v in _verdicts(x)]
    return []


def test_layer_runs_end_to_end_through_the_fake_humming(fake, tmp_path):
    """`verify layer --backend cpu_humming:CpuHumming` on mini-v4 layer 0 (its accumulator probe included):
    verdict rows for what humming serves (the dense W4A16 linears, the NVFP4-boundary GEMMs, the MoE block),
    "not served" with humming's reasons for the rest (quantize, router, ...), nothing failing, exit 0."""
    _, path = fake
    out = tmp_path / "layer.json"
    proc = _verify(["layer", "--backend", f"{BACKEND_MODULE}:CpuHumming", "--layers", "0", "--tokens", "4",
                    "--device", "cpu", "--json", str(out)], path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    verdicts = _verdicts(json.loads(out.read_text()))
    by_status: dict[str, list] = {}
    for v in verdicts:
        by_status.setdefault(v["status"], []).append(v)
    print("\n" + ", ".join(f"{s}: {len(v)}" for s, v in sorted(by_status.items())))
    assert not by_status.get("fail"), [(v["stage"], v["check"], v["message"][:200]) for v in by_status["fail"]]
    passed = {(v["stage"], v["check"]) for v in by_status.get("pass", [])}
    assert passed, "no verdict passed: humming served nothing"
    not_served = by_status.get("not served", [])
    assert any("humming" in v["message"] for v in not_served), {v["message"] for v in not_served}
    print(sorted(passed))


# ----------------------------------------------------------------------------- the batch check names nondeterminism


class _Out:
    def __init__(self, full, alone):
        from verify.verdicts.checks import Batch, Subset
        self._batch = Batch(full, (Subset("rows 0..1 alone", alone, lambda y: y[:2]),), "ok")

    def batch(self, metrics):
        return self._batch


def test_the_batch_check_names_run_to_run_nondeterminism_and_still_fails_plain_batch_variance():
    """An op whose whole-batch output changes from call to call (humming's default stream-K) fails batch with
    "nondeterministic: the whole batch twice differs", not as a batch-variance bug; a deterministic op whose rows
    differ alone still fails as before (assert_bits_equal's message)."""
    from verify.verdicts.checks import batch_invariance

    calls = iter(range(100))
    noisy = _Out(lambda: torch.full((4, 8), 1.0 + (1 + next(calls)) * 2**-7), lambda: torch.ones(2, 8))
    with pytest.raises(AssertionError, match=r"^nondeterministic: the whole batch twice differs in \d+ output bytes"):
        batch_invariance(None, None, noisy, {})
    variant = _Out(lambda: torch.ones(4, 8), lambda: torch.full((2, 8), 2.0))
    with pytest.raises(AssertionError) as exc:
        batch_invariance(None, None, variant, {})
    assert not str(exc.value).startswith("nondeterministic") and "rows 0..1 alone" in str(exc.value)
    assert batch_invariance(None, None, _Out(lambda: torch.ones(4, 8), lambda: torch.ones(2, 8)), {}) == "ok"


def test_a_crash_inside_humming_during_the_layer_fails_its_stages_in_one_line_and_the_run_goes_on(fake, tmp_path):
    """humming's grouped kernels fail (planted NVRTC error): moe.l1 / moe.l2 fail with one line naming humming,
    the op and the shape; exit 1 (a verdict failed), no traceback on the console."""
    _, path = fake
    out = tmp_path / "layer.json"
    proc = _verify(["layer", "--backend", f"{BACKEND_MODULE}:CpuHummingGroupedCrash", "--layers", "0", "--tokens",
                    "4", "--device", "cpu", "--json", str(out)], path)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    failed = [v for v in _verdicts(json.loads(out.read_text())) if v["status"] == "fail"]
    assert failed and {v["stage"] for v in failed} <= {"moe.l1", "moe.l2", "moe.block"}, failed
    assert all("humming crashed while its outputs were collected: HummingError: humming: " in
               v["message"] and "NVRTC_ERROR_COMPILATION" in v["message"] for v in failed), failed[0]["message"]
