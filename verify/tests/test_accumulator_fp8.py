"""The measured FP8 accumulator (verify.accumulator, FP8 block-scaled paths): the probe reads a narrow
accumulator's width and rounding inside one 128-K block and where it promotes to float32, through the
backend's own dense_linear; a backend declaring another accumulator than it has is refused.

The fakes run references.fp8_gemm.fp8_block_gemm_narrow_acc_model (a p-bit accumulator, promoted
to float32 every `interval` of K or never) on the backend's own FP8 activation quantization."""

from __future__ import annotations

import pytest
import torch

from references.fp8_act import FP8_ACT_UE8M0, quantize_act_fp8_1x128
from references.fp8_gemm import fp8_block_gemm_narrow_acc_model
from references.fp8_weight import Fp8BlockScaledWeight, fp8_weight_from_v4_e8m0_scale
from verify.accumulator import (
    FP8_GAPS,
    FP8_PROBE_PATHS,
    AccumulatorRefused,
    check_declared_fp8_accumulator,
    probe_accumulator,
    probe_fp8_accumulator,
)
from verify.backends import EmulatorBackend

SMALL = {"M=1, K=1024": (1, 128, 1024)}
FOUR = {"M=4, K=1024": (4, 128, 1024)}


class NarrowFp8Accumulator(EmulatorBackend):
    """The emulator, except that its FP8 dense_linear runs the narrow-accumulator model: `bits` kept
    (rounding "nearest" or "truncate"), promoted every `interval` of K (None: never). `declared_u` /
    `declared_interval` are what it tells the bound."""

    def __init__(self, bits: int, rounding: str, interval: int | None, *, declared_u: float,
                 declared_interval: int | None) -> None:
        super().__init__()
        self.bits, self.rounding, self.interval = bits, rounding, interval
        self.fp8_u_acc, self.fp8_promotion_interval = declared_u, declared_interval
        self.name = f"narrow-{bits}-{rounding}-every-{interval}"

    def prepare_linear(self, lin):
        if lin.format != "fp8_block128":
            return super().prepare_linear(lin)  # the NVFP4 probe: the emulator's exact GEMM
        return fp8_weight_from_v4_e8m0_scale(lin.weight_e4m3, lin.scale_ue8m0, module=lin.module)

    def dense_linear(self, x_bf16, w, *, input_dec_scale_f32=None):
        if not isinstance(w, Fp8BlockScaledWeight):
            return super().dense_linear(x_bf16, w, input_dec_scale_f32=input_dec_scale_f32)
        act = quantize_act_fp8_1x128(x_bf16, recipe=FP8_ACT_UE8M0)
        y = fp8_block_gemm_narrow_acc_model(act, w, acc_bits=self.bits, rounding=self.rounding,
                                            promotion_interval=self.interval)
        return y.to(torch.bfloat16)


def _hopper_like(**kw) -> NarrowFp8Accumulator:
    args = dict(bits=14, rounding="truncate", interval=128, declared_u=2.0**-13, declared_interval=128)
    args.update(kw)
    return NarrowFp8Accumulator(**args)


def test_the_emulator_is_exact_at_every_probed_gap_and_promotion_is_not_observable():
    b = EmulatorBackend()
    readings = probe_fp8_accumulator(b, "cpu", paths=SMALL | FOUR)
    assert [r.path for r in readings] == list(SMALL | FOUR)
    for r in readings:
        assert (r.effective_bits, r.exact_up_to, r.rounding, r.promotion_observable) == \
            (FP8_GAPS[-1] + 1, True, "n/a", False), r
        assert r.promotion_kept == (125.0,) * 6, r  # float64 keeps every small product
    check_declared_fp8_accumulator(b, readings)  # declares 2^-53 and no promotion: nothing refutes it


def test_the_default_paths_cover_m1_and_a_large_batch():
    ms = [m for m, _, _ in FP8_PROBE_PATHS.values()]
    assert 1 in ms and max(ms) >= 4096


def test_on_a_gpu_the_probe_adds_the_shapes_the_sm90_table_sends_to_gluon_kernels():
    """The GPU-only paths are shapes whose committed sm90 config is a Gluon kernel (the split tile, the producer
    warp, its 128 x 192 tile, that tile with its warpgroups as partitions), so the accumulator table lists those
    kernels too; the CPU probes only FP8_PROBE_PATHS."""
    from kernels.sm90.gemm_fp8_block import CompileKey
    from verify.accumulator import FP8_PROBE_PATHS_GPU, fp8_probe_paths

    assert fp8_probe_paths("cpu") == FP8_PROBE_PATHS
    assert fp8_probe_paths("cuda") == FP8_PROBE_PATHS | FP8_PROBE_PATHS_GPU
    keys = {path: CompileKey.for_shape(m, n, k, act_scale_ue8m0=True) for path, (m, n, k) in FP8_PROBE_PATHS_GPU.items()}
    assert all(key.gluon for key in keys.values()), keys
    assert any(key.producer for key in keys.values()) and any(not key.producer for key in keys.values()), keys
    assert sorted(key.block_n for key in keys.values()) == [128, 128, 192, 192], keys  # the 128 x 192 producer tile
    assert sorted(key.dual for key in keys.values()) == [False, False, False, True], keys  # and its dual form


@pytest.mark.parametrize("rounding", ["truncate", "nearest"])
def test_a_14_bit_accumulator_promoted_every_128_measures_14_bits_its_rounding_and_128(rounding):
    b = _hopper_like(rounding=rounding, declared_u=2.0**-13 if rounding == "truncate" else 2.0**-14)
    (r,) = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    want = "truncation" if rounding == "truncate" else "nearest"
    assert (r.effective_bits, r.exact_up_to, r.rounding) == (14, False, want), r
    assert r.u_measured == (2.0**-13 if rounding == "truncate" else 2.0**-14)
    assert r.promotion_observable and r.promotion_interval == 128, r
    assert r.promotion_kept == (125.0,) * 6
    check_declared_fp8_accumulator(b, [r])


def test_promotion_skipped_is_detected_and_a_backend_declaring_128_is_refused():
    b = _hopper_like(interval=None)
    (r,) = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    assert (r.effective_bits, r.rounding) == (14, "truncation"), r  # inside one block nothing changes
    assert r.promotion_kept == (0.0,) * 6 and r.promotion_interval is None, r
    with pytest.raises(AccumulatorRefused, match=r"declares float32 promotion every 128 of K but its FP8 M=1, K=1024 "
                                                 r"path measures none within K=1024"):
        check_declared_fp8_accumulator(b, [r])
    b.fp8_promotion_interval = None  # declared as it is: accepted
    check_declared_fp8_accumulator(b, [r])


def test_a_longer_promotion_interval_is_measured():
    b = _hopper_like(interval=256, declared_interval=256)
    (r,) = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    # chunks {0,1} {2,3} {4,5} {6,7}: group 1 shares the +big's chunk, group 6 the -big's
    assert r.promotion_kept == (0.0, 125.0, 125.0, 125.0, 125.0, 256.0), r  # truncation: -big + S -> -(big - ulp)
    assert r.promotion_interval == 256
    check_declared_fp8_accumulator(b, [r])
    b.fp8_promotion_interval = 128
    with pytest.raises(AccumulatorRefused, match=r"declares float32 promotion every 128 of K but .* measures "
                                                 r"float32 every 256 of K"):
        check_declared_fp8_accumulator(b, [r])


def test_a_backend_declaring_fp32_but_keeping_14_bits_is_refused():
    b = _hopper_like(declared_u=2.0**-24)
    readings = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    with pytest.raises(AccumulatorRefused, match=r"narrow-14-truncate-every-128: declares fp8_u_acc = 2\^-24 but "
                                                 r"its FP8 M=1, K=1024 accumulator keeps 14 bits "
                                                 r"\(truncation, u = 2\^-13\)"):
        check_declared_fp8_accumulator(b, readings)


def test_a_backend_declaring_a_looser_fp8_u_acc_than_measured_is_refused():
    b = _hopper_like(declared_u=2.0**-8)
    readings = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    with pytest.raises(AccumulatorRefused, match=r"declares fp8_u_acc = 2\^-8 .* looser than the measurement"):
        check_declared_fp8_accumulator(b, readings)


def test_nearest_at_14_bits_refuses_the_truncation_reading_as_looser():
    """2^-13 is the truncation reading of 14 bits; a path that rounds to nearest has 2^-14, and the
    bound must be told so (as for NVFP4: a declaration looser than the measurement is refused)."""
    b = _hopper_like(rounding="nearest", declared_u=2.0**-13)
    readings = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    with pytest.raises(AccumulatorRefused, match=r"keeps 14 bits \(nearest, u = 2\^-14\); a declaration looser"):
        check_declared_fp8_accumulator(b, readings)


def test_an_fp32_block_accumulator_measures_24_bits_and_its_promotion_is_not_observable():
    b = _hopper_like(bits=24, rounding="nearest", interval=None, declared_u=2.0**-24, declared_interval=None)
    (r,) = probe_fp8_accumulator(b, "cpu", paths=SMALL)
    assert (r.effective_bits, r.rounding, r.promotion_observable) == (24, "nearest", False), r
    check_declared_fp8_accumulator(b, [r])


def test_several_rows_are_probed_and_must_agree():
    b = _hopper_like()
    (r,) = probe_fp8_accumulator(b, "cpu", paths=FOUR)
    assert (r.effective_bits, r.rounding, r.promotion_interval) == (14, "truncation", 128), r


def test_a_backend_without_fp8_dense_linear_gets_no_fp8_readings():
    class Nvfp4Only(EmulatorBackend):
        def prepare_linear(self, lin):
            if lin.format != "nvfp4":
                raise NotImplementedError(f"{lin.module} is {lin.format}")
            return super().prepare_linear(lin)

    assert probe_fp8_accumulator(Nvfp4Only(), "cpu", paths=SMALL) == []
    assert probe_accumulator(Nvfp4Only(), "cpu", paths={"M=1": 1})  # the NVFP4 probe still reads it


def test_a_path_shape_the_probe_cannot_build_is_refused_by_name():
    with pytest.raises(ValueError, match=r"FP8 probe path 'short': K=256 must be a multiple of 128, at least 3"):
        probe_fp8_accumulator(EmulatorBackend(), "cpu", paths={"short": (1, 128, 256)})
    with pytest.raises(ValueError, match=r"N=16: the FP8 probe needs at least"):
        probe_fp8_accumulator(EmulatorBackend(), "cpu", paths={"narrow": (1, 16, 1024)})


# ----------------------------------------------------------------------------- the CLI


def _cli(monkeypatch, capsys, backend) -> tuple[int, str]:
    import argparse

    import verify.accumulator as acc
    import verify.backends as backends

    nvfp4_probe, fp8_probe = acc.probe_accumulator, acc.probe_fp8_accumulator
    monkeypatch.setattr(backends, "get_backend", lambda name, device=None: backend)
    monkeypatch.setattr(acc, "probe_accumulator", lambda b, d: nvfp4_probe(b, d, paths={"M=1": 1}))
    monkeypatch.setattr(acc, "probe_fp8_accumulator",  # the CLI passes its paths: replaced by the small one
                        lambda b, d, paths=None, **kw: fp8_probe(b, d, paths=SMALL, **kw))
    monkeypatch.setenv("COLUMNS", "200")
    rc = acc.cli_accumulator(argparse.Namespace(backend="emulator", device="cpu"))
    return rc, capsys.readouterr().out


def test_the_cli_prints_the_fp8_table_after_the_nvfp4_one(monkeypatch, capsys):
    rc, out = _cli(monkeypatch, capsys, _hopper_like())
    assert rc == 0, out
    nvfp4, fp8 = out.index("measured GEMM accumulator"), out.index("measured FP8 block-scaled GEMM accumulator")
    assert nvfp4 < out.index("the declared u_acc is what every measured path keeps") < fp8, out
    assert "declared fp8_u_acc = 2^-13, float32 promotion every 128 of K" in " ".join(out.split()), out
    row = next(ln for ln in out.splitlines() if "1 x 128 x 1024" in ln)
    assert all(w in row for w in ("M=1, K=1024", "14", "truncation", "2^-13", "float32 every 128 of K")), row
    assert out.rstrip().endswith("is what every path measures"), out


@pytest.mark.parametrize("backend,message", [
    (_hopper_like(declared_u=2.0**-24),
     "declares fp8_u_acc = 2^-24 but its FP8 M=1, K=1024 accumulator keeps 14 bits"),
    (_hopper_like(interval=None),
     "declares float32 promotion every 128 of K but its FP8 M=1, K=1024 path measures none"),
], ids=["fp32-claimed", "promotion-skipped"])
def test_the_cli_refuses_a_wrong_fp8_declaration_with_exit_1_and_one_line(monkeypatch, capsys, backend, message):
    rc, out = _cli(monkeypatch, capsys, backend)
    last = out.rstrip().splitlines()[-1]
    assert rc == 1 and message in last and last.startswith(backend.name), out
