"""Loading the fixture checkpoints: schemas, typed objects, byte-exact reads, lazy shard access."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from verify.checkpoint import (
    Bf16Linear, Checkpoint, Fp8BlockLinear, Mxfp4Linear, Nvfp4Linear, read_safetensors_header,
)
from verify.config import GOLDEN_DIR
from verify.checkpoint.writer import make_checkpoint

MINI_V4 = GOLDEN_DIR / "mini-v4"

V4_ATTN_FORMAT = {0: Nvfp4Linear, 1: Fp8BlockLinear, 2: Fp8BlockLinear, 3: Fp8BlockLinear}
V3_ATTN_FORMAT = {0: Bf16Linear, 1: Nvfp4Linear, 2: Fp8BlockLinear, 3: Bf16Linear}


@pytest.fixture(scope="module")
def mini_v3(tmp_path_factory) -> Path:
    return Path(make_checkpoint(tmp_path_factory.mktemp("mini-v3"), "mini-v3")["out"])


def test_v4_config_hyperparameters():
    c = Checkpoint.open(MINI_V4).config
    assert (c.schema, c.hidden_size, c.n_routed_experts, c.top_k, c.num_hash_layers) == ("deepseek_v4", 256, 16, 6, 3)
    assert (c.scoring_func, c.routed_scaling_factor, c.swiglu_limit, c.o_groups) == ("sqrtsoftplus", 2.5, 10.0, 2)


def test_v3_config_hyperparameters(mini_v3):
    ck = Checkpoint.open(mini_v3)
    c = ck.config
    assert (c.schema, c.top_k, c.n_group, c.topk_group, c.first_k_dense_replace) == ("deepseek_v3", 8, 4, 2, 1)
    assert ck.quant.source.endswith("config.json:quantization_config")
    assert "lm_head" in ck.quant.exclude_modules


@pytest.mark.parametrize("i", range(4), ids=lambda i: f"layer{i}")
def test_v4_layer_typed_objects(i):
    lw = Checkpoint.open(MINI_V4).load_layer(i)
    for lin in lw.attention.values():
        assert isinstance(lin, V4_ATTN_FORMAT[i])
    assert isinstance(lw.shared_experts.w1, V4_ATTN_FORMAT[i])
    ex = lw.experts
    assert isinstance(ex.w1, Nvfp4Linear)
    assert ex.w1.weight_u8.dtype == torch.uint8 and ex.w1.weight_u8.shape == (16, 128, 128)
    assert ex.w1.weight_scale_e4m3.dtype == torch.float8_e4m3fn and ex.w1.weight_scale_e4m3.shape == (16, 128, 16)
    assert ex.w2.weight_u8.shape == (16, 256, 64) and ex.w2.k == 128
    assert ex.w1.weight_scale_2_f32.shape == (16,) and ex.w1.input_scale_f32.dtype == torch.float32
    # the official V4 export shares w1/w3 weight_scale_2; the fixture does too
    assert torch.equal(ex.w1.weight_scale_2_f32, ex.w3.weight_scale_2_f32)
    if i < 3:
        assert lw.router.tid2eid_i64.shape == (256, 6) and lw.router.gate_bias_f32 is None
    else:
        assert lw.router.tid2eid_i64 is None and lw.router.gate_bias_f32.shape == (16,)
    assert lw.router.gate_weight_bf16.dtype == torch.bfloat16
    if isinstance(lw.attention["wq_a"], Fp8BlockLinear) and i != 2:  # V4's E8M0 `.scale`
        assert lw.attention["wq_a"].scale_ue8m0.dtype == torch.float8_e8m0fnu
        assert lw.attention["wkv"].scale_ue8m0.shape == (1, 2)  # [ceil(64/128), ceil(256/128)]
    elif i == 2:  # the fixture writes layer 2's FP8 linears in V3's encoding (float32 `.weight_scale_inv`)
        assert lw.attention["wq_a"].scale_ue8m0 is None and lw.attention["wq_a"].encoding == "v3_weight_scale_inv"
        s = lw.attention["wkv"].scale_inv_f32
        assert s.dtype == torch.float32 and s.shape == (1, 2)
    assert lw.norms["attn_sink"].dtype == torch.float32


@pytest.mark.parametrize("i", range(4), ids=lambda i: f"layer{i}")
def test_v3_layer_typed_objects(mini_v3, i):
    lw = Checkpoint.open(mini_v3).load_layer(i)
    assert set(lw.attention) == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    for lin in lw.attention.values():
        assert isinstance(lin, V3_ATTN_FORMAT[i])
    if i == 0:
        assert lw.experts is None and lw.router is None and isinstance(lw.dense_mlp.w1, Nvfp4Linear)
        return
    assert lw.experts.w1.module == f"model.layers.{i}.mlp.experts.*.gate_proj"
    assert lw.router.gate_bias_f32.shape == (16,)
    if i == 2:
        a = lw.attention["kv_a_proj_with_mqa"]
        assert a.scale_inv_f32.dtype == torch.float32 and a.scale_inv_f32.shape == (2, 2)  # N=160 -> 2 blocks


def test_mtp_experts_are_mxfp4_not_nvfp4():
    lins = Checkpoint.open(MINI_V4).load_prefix_linears("mtp.0.")
    experts = {m: v for m, v in lins.items() if ".ffn.experts." in m}
    assert experts and all(isinstance(v, Mxfp4Linear) for v in experts.values())
    # the MTP projections are FP8 block-128 with E8M0 `.scale`, as DeepSeek-V4 ships them
    assert {m for m in lins if m not in experts} == {"mtp.0.e_proj", "mtp.0.h_proj"}
    assert all(isinstance(lins[m], Fp8BlockLinear) and lins[m].encoding == "v4_e8m0_scale"
               for m in ("mtp.0.e_proj", "mtp.0.h_proj"))
    w1 = lins["mtp.0.ffn.experts.0.w1"]
    assert (w1.n, w1.k, w1.scale_ue8m0.shape) == (128, 256, (128, 8))


def _expected_io(ck_dir: Path, prefix: str) -> tuple[set[str], int, int]:
    wm = json.loads((ck_dir / "model.safetensors.index.json").read_text())["weight_map"]
    names = [n for n in wm if n.startswith(prefix)]
    shards = {wm[n] for n in names}
    data = header = 0
    for s in shards:
        infos = read_safetensors_header(ck_dir / s)
        data += sum(infos[n].nbytes for n in names if wm[n] == s)
        header += min(i.start for i in infos.values())
    return shards, data, header


@pytest.mark.parametrize("i", range(4), ids=lambda i: f"layer{i}")
def test_load_layer_reads_only_its_shards_and_bytes(i):
    ck = Checkpoint.open(MINI_V4)
    assert ck.io.files_opened == [] and ck.io.tensor_bytes == 0  # open reads JSON only
    ck.load_layer(i)
    shards, data, header = _expected_io(MINI_V4, f"layers.{i}.")
    assert set(ck.io.files_opened) == shards and len(ck.io.files_opened) == len(shards)
    assert ck.io.tensor_bytes == data
    assert ck.io.header_bytes == header
    all_shards = set(json.loads((MINI_V4 / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) < len(all_shards)


def test_layer_one_straddles_two_shards():
    """The fixture puts layer 1's attention into layer 2's shard; loading layer 1 reads none of layer 2's bytes."""
    shards, _, _ = _expected_io(MINI_V4, "layers.1.")
    assert len(shards) >= 2


@pytest.mark.parametrize("shard", sorted(p.name for p in MINI_V4.glob("*.safetensors")))
def test_reader_matches_safetensors_oracle(shard):
    ck = Checkpoint.open(MINI_V4)
    with safe_open(MINI_V4 / shard, "pt") as f:
        for name in f.keys():
            ours = ck.get_tensor(name)
            theirs = f.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
            assert torch.equal(ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)), name


def test_scales_are_bytes_not_value_cast():
    lw = Checkpoint.open(MINI_V4).load_layer(3)
    with safe_open(MINI_V4 / json.loads((MINI_V4 / "model.safetensors.index.json").read_text())["weight_map"][
            "layers.3.ffn.experts.5.w1.weight_scale"], "pt") as f:
        raw = f.get_tensor("layers.3.ffn.experts.5.w1.weight_scale").view(torch.uint8)
    assert torch.equal(lw.experts.w1.weight_scale_e4m3[5].view(torch.uint8), raw)


_FIELD_SUFFIX = {  # the loader's typed-linear field -> the checkpoint tensor suffix it must hold byte for byte
    "weight_u8": "weight", "weight_e4m3": "weight", "weight_bf16": "weight", "weight_scale_e4m3": "weight_scale",
    "weight_scale_2_f32": "weight_scale_2", "input_scale_f32": "input_scale", "scale_ue8m0": "scale",
    "scale_inv_f32": "weight_scale_inv",
}


@pytest.mark.parametrize("fixture", ["mini-v4", "mini-v3"])
def test_loader_bytes_equal_the_raw_safetensors_bytes_for_every_linear(request, fixture):
    """Every tensor of every typed linear the loader returns (NVFP4 weight / block scales / global and
    input scales, FP8 weight and E8M0 or float32 scales, BF16 weights; each expert of a stack) has the
    stored bytes: a loader that swapped nibbles or transposed scales would be blamed on the checkpoint."""
    from verify.checkpoint import iter_linears

    d = MINI_V4 if fixture == "mini-v4" else request.getfixturevalue("mini_v3")
    ck = Checkpoint.open(d)
    weight_map = json.loads((Path(d) / "model.safetensors.index.json").read_text())["weight_map"]
    handles: dict = {}

    def raw(name: str) -> torch.Tensor:
        shard = weight_map[name]
        if shard not in handles:
            handles[shard] = safe_open(Path(d) / shard, "pt")
        return handles[shard].get_tensor(name)

    checked = set()
    for i in range(ck.config.num_layers):
        for _, lin in iter_linears(ck.load_layer(i)):
            for field, suffix in _FIELD_SUFFIX.items():
                got = getattr(lin, field, None)
                if got is None:
                    continue
                stacked = "*" in lin.module
                for e in range(got.shape[0] if stacked else 1):
                    name = f"{lin.module.replace('*', str(e))}.{suffix}"
                    want = raw(name)
                    mine = got[e] if stacked else got
                    assert mine.shape == want.shape, f"{name}: loader shape {tuple(mine.shape)} != stored {tuple(want.shape)}"
                    a = mine.contiguous().reshape(-1).view(torch.uint8)
                    b = want.contiguous().reshape(-1).view(torch.uint8)
                    bad = torch.nonzero(a != b)
                    assert bad.numel() == 0, (f"{name}: loader byte {int(bad[0, 0])} is 0x{int(a[bad[0, 0]]):02x}, "
                                              f"stored 0x{int(b[bad[0, 0]]):02x}")
                    checked.add(lin.format)
    assert {"nvfp4", "fp8_block128"} <= checked, checked


def test_describe_names_what_was_opened():
    """The one line a run can print first: which checkpoint, schema, layers, quantization, files."""
    line = Checkpoint.open(MINI_V4).describe()
    assert line == (f"checkpoint {MINI_V4}: deepseek_v4, 4 layers, 16 experts, NVFP4 (hf_quant_config.json), "
                    "899 tensors in 10 files")  # 891 + mtp.0's e_proj / h_proj (weight, scale) and 4 norms
