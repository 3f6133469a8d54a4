"""The committed config table of the sm90 FP8 GEMM (kernels/sm90/gemm_fp8_block_configs.py) on the CPU: bucket
lookup, the merge of a sweep's winners, the --from-json writer (on a copy), and that every candidate and
every committed config is a valid key at every DeepSeek-V4-Pro FP8 shape with the summation order of
chunk_plan(N, K) (so any of them keeps the kernel's bits; the GPU test
test_gpu_every_sweep_candidate_bit_equal_to_heuristic checks the bits)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.sm90 import gemm_fp8_block_configs as cfgs
from kernels.sm90.gemm_fp8_block import CompileKey, chunk_plan

REPO = Path(__file__).resolve().parents[2]
V4_PRO_FP8 = [(1536, 7168), (512, 7168), (65536, 1536), (16384, 4096), (7168, 16384), (8192, 1536), (3072, 7168),
              (7168, 3072), (7168, 7168)]


def _c(bt: int, ws: bool = False, reduce: str = "kernel") -> dict:
    return dict(block_n=64, block_t=bt, num_warps=4, num_stages=4, split=True, swap=True, group_t=8, pipe=False,
                tma=False, fused_q=False, ws=ws, reduce=reduce, gluon=False, persistent=False, acc3=False,
                producer=False, dual=False)


def test_lookup_takes_the_first_bucket_holding_m_and_the_last_beyond():
    table = {(10, 20): ((1, _c(16)), (64, _c(64)), (4096, _c(32)))}
    assert cfgs.lookup(1, 10, 20, table)["block_t"] == 16
    assert cfgs.lookup(2, 10, 20, table)["block_t"] == 64
    assert cfgs.lookup(64, 10, 20, table)["block_t"] == 64
    assert cfgs.lookup(65, 10, 20, table)["block_t"] == 32
    assert cfgs.lookup(100000, 10, 20, table)["block_t"] == 32
    assert cfgs.lookup(1, 10, 21, table) is None


def test_merge_replaces_same_bucket_and_sorts():
    table = {(10, 20): ((64, _c(64)),)}
    new = cfgs.merged_table(table, [{"N": 10, "K": 20, "M": 1, "config": _c(16)},
                                    {"N": 10, "K": 20, "M": 64, "config": _c(32)}])
    assert new == {(10, 20): ((1, _c(16)), (64, _c(32)))}
    with pytest.raises(ValueError, match="winners\\[0\\]"):
        cfgs.merged_table({}, [{"N": 1, "K": 2, "M": 3, "config": {"block_n": 64}}])
    # an older sweep's winner (no "ws", no "reduce") is completed with the defaults; a new one keeps its value;
    # table entries already there are kept as they are
    old = {k: v for k, v in _c(16).items() if k not in ("ws", "reduce", "gluon", "persistent", "acc3", "producer",
                                                          "dual")}
    new = cfgs.merged_table({(10, 20): ((64, old),)}, [{"N": 10, "K": 20, "M": 1, "config": old},
                                                       {"N": 10, "K": 20, "M": 4096, "config": _c(64, ws=True)}])
    assert new == {(10, 20): ((1, _c(16)), (64, old), (4096, _c(64, ws=True)))}


@pytest.mark.parametrize("n,k", V4_PRO_FP8)
def test_every_candidate_and_committed_config_is_a_valid_key_with_the_shape_s_order(n, k):
    plan = chunk_plan(n, k)
    configs = [(m, c) for m in (1, 16, 32, 64, 128, 4096) for c in cfgs.candidates(m)]
    configs += [(m, c) for m, c in cfgs.TABLE.get((n, k), ())]
    assert configs
    for m, c in configs:
        # a committed entry may lack a field added later (DEFAULTS: the meaning it was committed with)
        assert set(cfgs.FIELDS) - set(cfgs.DEFAULTS) <= set(c) <= set(cfgs.FIELDS), c
        key = CompileKey.from_config(n, k, c, act_scale_ue8m0=True)
        assert (key.chunk_blocks, key.n_chunks, key.groups) == (*plan, -(-k // 128)), (m, c)
        split = c["split"] and key.chunked  # a one-chunk plan drops split, and reduce="ticket" with it
        assert key.config() == {**cfgs.DEFAULTS, **c, "split": split,
                                "reduce": c.get("reduce", "kernel") if split else "kernel"}


def test_candidates_carry_every_field_and_no_ws():
    """Candidates are written out whole (the --from-json writer commits them as they are); none is warp-specialized
    (ws gave no result on an H200: launches refuse it, test_a_ws_launch_on_a_device_is_refused)."""
    for m in (1, 16, 32, 64, 128, 4096):
        cands = cfgs.candidates(m)
        assert all(set(c) == set(cfgs.FIELDS) for c in cands), m
        assert not [c for c in cands if c["ws"]], m
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands), m
        assert all(not c["ws"] for c in cands[:1]), "the bucket's first entry is the heuristic's choice"
        ticket = [c for c in cands if c["reduce"] == "ticket"]
        assert all(c["split"] and not c["ws"] and not c["fused_q"] for c in ticket), (m, ticket)
        assert ticket or m > 64, f"M={m}: no single-launch split-K candidate at a launch-bound size"
        assert cands[0]["reduce"] == "kernel", "the bucket's first entry is the heuristic's choice"
    # at M <= 16 a ticket tile with pointer loads: the one the fused quantizer takes (quantize + GEMM + reduce in
    # one launch when the sweep commits fused_q on it)
    assert any(c["reduce"] == "ticket" and not c["tma"] and c["block_t"] == 16 for c in cfgs.candidates(1))


def test_committed_table_entries_without_ws_mean_ws_false():
    """The table committed before the field existed: its entries lack "ws" and keep their keys."""
    entries = [c for buckets in cfgs.TABLE.values() for _, c in buckets]
    assert entries
    for c in entries:
        key = CompileKey.from_config(7168, 16384, c, act_scale_ue8m0=True)
        assert key.ws is c.get("ws", False)
        assert key.reduce == (c.get("reduce", "kernel") if key.split else "kernel")


def test_for_shape_reads_the_table(monkeypatch):
    n, k = 7168, 16384
    monkeypatch.setattr(cfgs, "TABLE", {(n, k): ((16, _c(16)), (4096, {**_c(64), "swap": False, "block_n": 128,
                                                                       "num_warps": 4}))})
    assert CompileKey.for_shape(8, n, k, act_scale_ue8m0=True).block_t == 16
    big = CompileKey.for_shape(300, n, k, act_scale_ue8m0=True)
    assert (big.swap, big.block_n, big.block_t) == (False, 128, 64)
    assert CompileKey.for_shape(8, 7168, 3072, act_scale_ue8m0=True) == \
        CompileKey.heuristic(8, 7168, 3072, act_scale_ue8m0=True)


def test_from_json_rewrites_a_copy_of_the_table(tmp_path):
    copy = tmp_path / "gemm_fp8_block_configs.py"
    shutil.copy(cfgs.__file__, copy)
    sweep = tmp_path / "sweep.json"
    ws = {**_c(128, ws=True), "block_n": 128, "swap": False, "tma": True, "split": False}
    old_format = {k: v for k, v in _c(16).items() if k not in ("ws", "reduce")}  # written before those fields
    sweep.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "winners": [
        {"N": 7168, "K": 16384, "M": 1, "config": old_format, "us": 40.0},
        {"N": 7168, "K": 16384, "M": 4096, "config": ws, "us": 4000.0}]}))
    proc = subprocess.run([sys.executable, "-m", "kernels.sm90.gemm_fp8_block_configs", "--from-json", str(sweep),
                           "--table-file", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    spec = importlib.util.spec_from_file_location("written_configs", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # merged into the committed table: this shape's M buckets replaced where the sweep has a winner, kept elsewhere;
    # written compact (a DEFAULTS-valued field left out: it reads back as that default)
    buckets = {**dict(cfgs.TABLE.get((7168, 16384), ())), 1: cfgs.compact(_c(16)), 4096: cfgs.compact(ws)}
    assert mod.TABLE == {**cfgs.TABLE, (7168, 16384): tuple(sorted(buckets.items()))}
    assert "# device: NVIDIA H100 80GB HBM3" in copy.read_text()
    assert cfgs.lookup(3000, 7168, 16384, mod.TABLE) == cfgs.compact(ws)  # the 4096 bucket the sweep wrote, ws kept
    assert cfgs.lookup(3000, 7168, 16384, mod.TABLE)["ws"] and "gluon" not in cfgs.lookup(3000, 7168, 16384, mod.TABLE)
    for cfg in (_c(16), ws):  # the compact form is the same key
        assert CompileKey.from_config(7168, 16384, cfgs.compact(cfg), act_scale_ue8m0=True) == \
            CompileKey.from_config(7168, 16384, cfg, act_scale_ue8m0=True)
    assert CompileKey.from_config(7168, 16384, cfgs.lookup(3000, 7168, 16384, mod.TABLE), act_scale_ue8m0=True).ws


def test_the_committed_table_holds_no_default_valued_field():
    """The writer leaves out what DEFAULTS says (a field added later reads as its default), so an entry lists the
    fields that matter for it and nothing else."""
    entries = [cfg for buckets in cfgs.TABLE.values() for _, cfg in buckets]
    assert entries and all(cfgs.compact(cfg) == cfg for cfg in entries)
    assert cfgs.compact({**_c(16), "gluon": True}) == {k: v for k, v in {**_c(16), "gluon": True}.items()
                                                       if k not in ("ws", "reduce", "persistent", "acc3", "producer",
                                                                    "dual")}


def test_from_json_refuses_a_bad_file_naming_it(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"device": "x"}')
    proc = subprocess.run([sys.executable, "-m", "kernels.sm90.gemm_fp8_block_configs", "--from-json", str(bad),
                           "--table-file", str(tmp_path / "none.py")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and str(bad) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ws_key_rules_and_the_fallbacks_that_drop_it():
    """ws (the warp-specialized loop) only where the sm_90 pass specializes it as intended: token-major 128-token
    tiles on num_warps 4 with TMA loads, no pipe / fused prologue; the pointer-load fallback of launch (TMA
    alignment) and the fused key drop it for the same tile on 8 warps (bits do not depend on it)."""
    import dataclasses

    from kernels.sm90.gemm_fp8_block import fused_key, without_ws

    cfg = dict(block_n=128, block_t=128, num_warps=4, num_stages=4, split=True, swap=False, tma=True, ws=True)
    key = CompileKey.from_config(7168, 16384, cfg, act_scale_ue8m0=True)
    assert key.ws and key.config()["ws"] is True
    for bad in ({"tma": False}, {"block_t": 64}, {"num_warps": 8}, {"swap": True}, {"pipe": True},
                {"fused_q": True, "tma": False}):
        with pytest.raises(ValueError, match="ws needs"):
            dataclasses.replace(key, **bad)
    plain = without_ws(key)
    assert (plain.ws, plain.num_warps) == (False, 8) and dataclasses.replace(plain, ws=True, num_warps=4) == key
    fused = fused_key(key, scale_rule="ue8m0_ceil")
    assert (fused.ws, fused.tma, fused.fused_q, fused.num_warps) == (False, False, True, 8)
    assert without_ws(plain) is plain


def test_ticket_reduce_key_rules():
    """reduce="ticket" (the single-launch split-K) only on split keys without ws; from_config drops it with split
    where chunk_plan has one chunk; the fused key and the TMA fallback keep it (the same tile, one launch)."""
    import dataclasses

    from kernels.sm90.gemm_fp8_block import fused_key

    key = CompileKey.from_config(512, 7168, _c(16, reduce="ticket"), act_scale_ue8m0=True)
    assert (key.split, key.reduce, key.n_chunks) == (True, "ticket", 28) and key.config()["reduce"] == "ticket"
    for bad, match in (({"split": False}, "needs split"), ({"reduce": "atomic"}, "must be one of")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(key, **bad)
    ws = dict(block_n=128, block_t=128, num_warps=4, num_stages=4, split=True, swap=False, tma=True, ws=True,
              reduce="ticket")
    with pytest.raises(ValueError, match="needs split and no ws"):
        CompileKey.from_config(512, 7168, ws, act_scale_ue8m0=True)
    one_chunk = CompileKey.from_config(65536, 1536, _c(16, reduce="ticket"), act_scale_ue8m0=True)
    assert (one_chunk.split, one_chunk.reduce) == (False, "kernel")
    fused = fused_key(key, scale_rule="ue8m0_ceil")
    assert (fused.fused_q, fused.split, fused.reduce) == (True, True, "ticket")
    assert dataclasses.replace(key, tma=True, num_stages=6).reduce == "ticket"


def test_a_ws_launch_on_a_device_is_refused(monkeypatch):
    """A ws key (compiles for sm_90a, gave no result on an H200) is refused at its first launch on a device, with the
    switch named, unless NVFP4V_FP8_WS_EXPERIMENT=1; a key without ws is not refused."""
    import dataclasses

    from kernels.sm90 import gemm_fp8_block
    from kernels.sm90.gemm_fp8_block import CompileKey

    base = CompileKey.heuristic(4096, 7168, 16384, act_scale_ue8m0=True)
    key = dataclasses.replace(base, block_n=128, block_t=128, num_warps=4, num_stages=4, swap=False, tma=True,
                              ws=True, split=False)
    monkeypatch.setattr(gemm_fp8_block, "_interpreting", lambda: False)
    monkeypatch.delenv(gemm_fp8_block.WS_EXPERIMENT_ENV, raising=False)
    with pytest.raises(RuntimeError, match="NVFP4V_FP8_WS_EXPERIMENT=1"):
        gemm_fp8_block._refuse_ws_on_a_device(key)
    gemm_fp8_block._refuse_ws_on_a_device(base)
    monkeypatch.setenv(gemm_fp8_block.WS_EXPERIMENT_ENV, "1")
    gemm_fp8_block._refuse_ws_on_a_device(key)
