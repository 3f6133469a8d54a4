"""Fixture generation: deterministic bytes (digests), size budget, CLI, the v4-pro-layer code path."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verify.checkpoint import Checkpoint, Nvfp4Linear
from verify.config import GOLDEN_DIR, REPO_ROOT
from verify.checkpoint.writer import PRESETS, add_fixture_arguments, checkpoint_digests, cli_fixture, make_checkpoint
from verify.rng import CounterRng


def _sums(path: Path) -> dict[str, str]:
    return {name: h for h, name in (line.split("  ", 1) for line in path.read_text().splitlines())}


# Regenerates both presets in a fresh interpreter and prints the CPU vector path torch used and
# the digests. ATEN_CPU_CAPABILITY only takes effect at torch's import, hence the subprocess.
_REGENERATE = """
import json, sys, tempfile, torch
from pathlib import Path
from verify.checkpoint.writer import checkpoint_digests, make_checkpoint
out = {"capability": torch.backends.cpu.get_cpu_capability()}
with tempfile.TemporaryDirectory() as d:
    for preset in sys.argv[1:]:
        out[preset] = checkpoint_digests(make_checkpoint(Path(d) / preset, preset)["out"])
print(json.dumps(out))
"""


def _native_capability() -> str:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("capability", ["default", "native"], ids=lambda c: f"ATEN_CPU_CAPABILITY={c}")
def test_fixture_regenerates_to_committed_digests_on_every_cpu_vector_path(capability):
    """Fixture bytes do not depend on the CPU's vector path: the generator draws integers
    (verify.rng.CounterRng) and uses only correctly rounded float operations."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    expected_capability = "DEFAULT" if capability == "default" else _native_capability()
    if capability == "default":
        env["ATEN_CPU_CAPABILITY"] = "default"
    proc = subprocess.run([sys.executable, "-c", _REGENERATE, "mini-v4", "mini-v3"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["capability"] == expected_capability, f"torch ran {got['capability']}, not {expected_capability}"
    for preset in ("mini-v4", "mini-v3"):
        want = _sums(GOLDEN_DIR / preset / "SHA256SUMS")
        diff = {f: (got[preset].get(f), h) for f, h in want.items() if got[preset].get(f) != h}
        assert got[preset] == want, (f"{preset} under {got['capability']}: {len(diff)} files differ from "
                                     f"golden/{preset}/SHA256SUMS (got, committed): {diff}")


def test_counter_rng_bits_do_not_depend_on_the_sizes_drawn_before():
    """Element i of a draw depends on (seed, call number, i) only: the same call sequence with
    different earlier sizes gives the same later values."""
    a, b = CounterRng(7), CounterRng(7)
    a.u32(3), b.u32((5, 11))
    assert torch.equal(a.normal(64), b.normal(64))
    assert torch.equal(CounterRng(7).u32(10), CounterRng(7).u32(20)[:10])
    assert not torch.equal(CounterRng(7).u32(10), CounterRng(8).u32(10))


def test_counter_rng_normal_and_lognormal_moments():
    g = CounterRng(1)
    z = g.normal(200_000).double()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01, (z.mean(), z.std())
    ln = g.lognormal(200_000, sigma=0.5).double().log()
    assert abs(ln.mean()) < 0.01 and abs(ln.std() - 0.5) < 0.01, (ln.mean(), ln.std())
    p = g.permutation(1000)
    assert torch.equal(p.sort().values, torch.arange(1000))


def test_committed_mini_v4_matches_its_digests():
    assert checkpoint_digests(GOLDEN_DIR / "mini-v4") == _sums(GOLDEN_DIR / "mini-v4" / "SHA256SUMS")


def test_committed_golden_fixtures_fit_in_8_mb():
    total = sum(p.stat().st_size for d in ("mini-v4", "mini-v3") for p in (GOLDEN_DIR / d).glob("*") if p.is_file())
    assert total <= 8 * 2**20, total


def test_cli_fixture_writes_a_loadable_checkpoint(tmp_path):
    p = argparse.ArgumentParser()
    add_fixture_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "ck"), "--preset", "mini-v3", "--json", str(tmp_path / "s.json")])
    assert cli_fixture(args) == 0
    assert Checkpoint.open(tmp_path / "ck").load_layer(1).experts is not None
    assert (tmp_path / "s.json").exists()


def test_v4_pro_layer_code_path_on_cpu_at_reduced_size(tmp_path):
    """The v4-pro-layer preset's path (one layer, experts split over shards, no globals) at a small size;
    the full size runs on a GPU (python -m verify fixture --preset v4-pro-layer --time-load)."""
    p = PRESETS["v4-pro-layer"]
    small = dataclasses.replace(p, config=dict(p.config, hidden_size=256, n_routed_experts=6, moe_intermediate_size=128,
                                               vocab_size=512, num_attention_heads=4, head_dim=64, q_lora_rank=128,
                                               o_groups=2, o_lora_rank=64), experts_per_shard=2)
    summary = make_checkpoint(tmp_path / "pro", small)
    assert len(summary["files"]) == 4  # attention+shared, then 3 expert shards
    ck = Checkpoint.open(tmp_path / "pro")
    lw = ck.load_layer(3)
    assert isinstance(lw.experts.w1, Nvfp4Linear) and lw.experts.w1.weight_u8.shape == (6, 128, 128)
    assert ck.config.num_layers == 61 and ck.config.n_routed_experts == 6


def test_v4_pro_layer_nvfp4_preset_has_nvfp4_dense_linears_at_reduced_size(tmp_path):
    """v4-pro-layer-nvfp4: the v4-pro-layer bytes path with attention, the indexer's wq_b and the shared expert in
    NVFP4 (every other setting of the FP8 preset), checked at a small size."""
    p = PRESETS["v4-pro-layer-nvfp4"]
    assert dataclasses.replace(p, name="v4-pro-layer", formats={3: "fp8"}) == PRESETS["v4-pro-layer"]
    small = dataclasses.replace(p, config=dict(p.config, hidden_size=256, n_routed_experts=6, moe_intermediate_size=128,
                                               vocab_size=512, num_attention_heads=4, head_dim=64, q_lora_rank=128,
                                               o_groups=2, o_lora_rank=64, index_n_heads=2), experts_per_shard=2)
    make_checkpoint(tmp_path / "pro", small)
    lw = Checkpoint.open(tmp_path / "pro").load_layer(3)
    dense = dict(lw.attention) | {f"shared.{r}": getattr(lw.shared_experts, r) for r in ("w1", "w2", "w3")}
    assert len(dense) >= 8 and all(isinstance(lin, Nvfp4Linear) for lin in dense.values()), \
        {n: type(lin).__name__ for n, lin in dense.items()}
    assert isinstance(lw.experts.w1, Nvfp4Linear)


def test_full_size_preset_matches_deepseek_v4_pro():
    c = PRESETS["v4-pro-layer"].config
    assert (c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"], c["num_experts_per_tok"]) == \
        (7168, 384, 3072, 6)
