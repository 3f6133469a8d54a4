"""Fixture generation: deterministic bytes (digests), size budget, CLI, the v4-pro-layer code path."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from verify.checkpoint import Checkpoint, Nvfp4Linear
from verify.config import GOLDEN_DIR
from verify.fixtures import PRESETS, add_fixture_arguments, checkpoint_digests, cli_fixture, make_checkpoint


def _sums(path: Path) -> dict[str, str]:
    return {name: h for h, name in (line.split("  ", 1) for line in path.read_text().splitlines())}


@pytest.mark.parametrize("preset", ["mini-v4", "mini-v3"])
def test_fixture_regenerates_to_committed_digests(tmp_path, preset):
    out = make_checkpoint(tmp_path / preset, preset)["out"]
    assert checkpoint_digests(out) == _sums(GOLDEN_DIR / preset / "SHA256SUMS")


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


def test_full_size_preset_matches_deepseek_v4_pro():
    c = PRESETS["v4-pro-layer"].config
    assert (c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"], c["num_experts_per_tok"]) == \
        (7168, 384, 3072, 6)
