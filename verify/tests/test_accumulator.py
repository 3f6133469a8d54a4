"""The measured accumulator (verify.accumulator): the probe tells an exact, an fp32-nearest and an
fp32-truncating accumulator apart, and a backend declaring a looser u_acc than measured is refused."""

from __future__ import annotations

import pytest
import torch

from references import layouts as ref_layouts
from references.nvfp4 import decode_nvfp4_block_scaled
from verify.accumulator import GAPS, PROBE_PATHS, AccumulatorRefused, check_declared_u_acc, probe_accumulator
from verify.backends import EmulatorBackend


def _truncate(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 -> `bits`-bit mantissa, rounded toward zero."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.trunc(m * 2.0**bits) / 2.0**bits, e)


class SequentialAccumulator(EmulatorBackend):
    """The emulator's operands, accumulated one product at a time in a p-bit register."""

    def __init__(self, bits: int, rounding: str, declared: float) -> None:
        super().__init__()
        self.bits, self.rounding, self.u_acc = bits, rounding, declared
        self.name = f"sequential-{bits}-{rounding}"

    def dense_gemm(self, a, w):
        m = a.packed_u8.shape[0]
        a_sf = ref_layouts.sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=m, cols=a.k // 16)
        x = decode_nvfp4_block_scaled(a.packed_u8, a_sf, dtype=torch.float64)
        b = decode_nvfp4_block_scaled(w.packed_u8, w.sf_u8, dtype=torch.float64)
        acc = torch.zeros(m, b.shape[0], dtype=torch.float64)
        for k in range(x.shape[1]):
            s = acc + x[:, k:k + 1] * b[:, k][None, :]
            acc = s.float().double() if self.rounding == "nearest" else _truncate(s, self.bits)
        return acc.to(torch.bfloat16)


def test_the_emulator_is_exact_at_every_probed_gap_and_declares_so():
    b = EmulatorBackend()
    readings = probe_accumulator(b, "cpu")
    assert [r.path for r in readings] == list(PROBE_PATHS)
    assert all(r.exact_up_to and r.effective_bits == GAPS[-1] + 1 for r in readings), readings
    check_declared_u_acc(b, readings)  # 2^-53 is not looser than 2^-39


@pytest.mark.parametrize("rounding", ["nearest", "truncation"])
def test_an_fp32_accumulator_measures_24_bits_and_its_rounding(rounding):
    b = SequentialAccumulator(24, rounding, declared=2.0**-24)
    (r,) = probe_accumulator(b, "cpu", paths={"M=1": 1})
    assert (r.effective_bits, r.rounding, r.exact_up_to) == (24, rounding, False), r
    check_declared_u_acc(b, [r])


def test_a_backend_declaring_a_looser_u_acc_than_measured_is_refused():
    b = SequentialAccumulator(24, "nearest", declared=2.0**-16)  # claims a bf16-ish accumulator
    readings = probe_accumulator(b, "cpu", paths={"M=1": 1})
    with pytest.raises(AccumulatorRefused, match=r"declares u_acc = 2\^-16 but its M=1 accumulator keeps 24 bits"):
        check_declared_u_acc(b, readings)


def test_the_cli_refuses_such_a_backend_with_one_line(monkeypatch):
    import verify.layer_report as lr
    from verify.errors import BackendRefusedError

    monkeypatch.setattr(lr, "get_backend", lambda name, device=None: SequentialAccumulator(24, "nearest", 2.0**-16))
    with pytest.raises(BackendRefusedError, match=r"--backend emulator: refused \(sequential-24-nearest: declares"):
        lr.backend_for_verdicts("emulator", torch.device("cpu"))


def test_declaring_fp32_is_allowed_when_a_path_keeps_more_bits():
    """A tile that sums products exactly before adding measures more than 24 bits; an fp32 declaration
    still bounds it rigorously and is not refused (the emulator measures 39+ bits)."""
    readings = probe_accumulator(EmulatorBackend(), "cpu", paths={"M=1": 1})
    b = SequentialAccumulator(24, "nearest", declared=2.0**-24)
    check_declared_u_acc(b, readings)
    b.u_acc = 2.0**-23
    with pytest.raises(AccumulatorRefused):
        check_declared_u_acc(b, readings)


def test_a_backend_declaring_a_tighter_u_acc_than_measured_is_refused():
    """Claiming fp32 (2^-24) for a path that keeps 16 bits lies to the bound: refused, naming the path."""
    from verify.accumulator import accumulator_claims_more_than_kept

    b = SequentialAccumulator(16, "truncation", declared=2.0**-24)
    readings = probe_accumulator(b, "cpu", paths={"M=1": 1})
    with pytest.raises(AccumulatorRefused, match=r"declares u_acc = 2\^-24 but its M=1 accumulator keeps 16 bits "
                                                 r"\(truncation, u = 2\^-16\); a declaration tighter"):
        check_declared_u_acc(b, readings)
    check_declared_u_acc(b, readings, refuse_tighter=False)  # left to the caller, who reports it
    assert len(accumulator_claims_more_than_kept(b, readings)) == 1
    b.u_acc = 2.0**-16  # the truth: accepted
    check_declared_u_acc(b, readings)
    assert accumulator_claims_more_than_kept(b, readings) == []


def test_verify_layer_fails_a_run_whose_backend_claims_more_bits_than_kept(monkeypatch, tmp_path, capsys):
    """`verify layer` reports each such path as a FAIL line, still runs the verdicts (a too-tight bound can only
    fail) and exits 1; the JSON carries the finding. Without a findings list (selftest) the backend is refused."""
    import json

    import verify.layer_report as lr
    from verify.__main__ import main
    from verify.errors import BackendRefusedError

    monkeypatch.setattr(lr, "get_backend", lambda name, device=None: SequentialAccumulator(16, "truncation", 2.0**-24))
    with pytest.raises(BackendRefusedError, match=r"refused \(sequential-16-truncation: declares u_acc = 2\^-24"):
        lr.backend_for_verdicts("emulator", torch.device("cpu"))
    findings: list[str] = []
    lr.backend_for_verdicts("emulator", torch.device("cpu"), findings=findings)
    assert len(findings) == len(PROBE_PATHS) and all("tighter than the measurement" in f for f in findings)
    out = tmp_path / "r.json"
    rc = main(["layer", "--backend", "emulator", "--layers", "0", "--tokens", "4", "--device", "cpu",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "FAIL accumulator: sequential-16-truncation: declares u_acc = 2^-24 but its M=1 (wgmma, a chunk a CTA) accumulator" in \
        " ".join(text.split()), text
    assert len(json.loads(out.read_text())["accumulator_findings"]) == len(PROBE_PATHS)


class GroupedSequentialAccumulator(SequentialAccumulator):
    """The emulator's dense GEMM (exact) but a grouped L2 GEMM accumulating one product at a time in a p-bit
    register: a backend whose MoE path keeps fewer bits than its dense one."""

    def prepare_experts(self, experts):
        return experts

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        assert layer == "l2", layer
        off = offsets_i32.long().tolist()
        r = a.packed_u8.shape[0]
        out = torch.zeros(r, experts.w2.n, dtype=torch.bfloat16)
        sf = ref_layouts.sf_grouped_swizzled_128x4_to_linear(a.sf_swizzled_u8, offsets_i32.long(), cols=a.k // 16)
        x = decode_nvfp4_block_scaled(a.packed_u8, sf, dtype=torch.float64)
        for e in range(len(off) - 1):
            b = decode_nvfp4_block_scaled(experts.w2.weight_u8[e], experts.w2.weight_scale_e4m3[e].view(torch.uint8),
                                          dtype=torch.float64)
            acc = torch.zeros(off[e + 1] - off[e], b.shape[0], dtype=torch.float64)
            for k in range(x.shape[1]):
                acc = _truncate(acc + x[off[e]:off[e + 1], k:k + 1] * b[:, k][None, :], self.bits)
            out[off[e]:off[e + 1]] = acc.to(torch.bfloat16)
        return out

    def dense_gemm(self, a, w):
        return EmulatorBackend.dense_gemm(self, a, w)


def test_the_grouped_paths_are_probed_exact_on_the_emulator():
    from verify.accumulator import GROUPED_PROBE_PATHS, probe_grouped_accumulator

    readings = probe_grouped_accumulator(EmulatorBackend(), "cpu")
    assert [r.path for r in readings] == list(GROUPED_PROBE_PATHS)
    assert all(r.exact_up_to and r.effective_bits == GAPS[-1] + 1 for r in readings), readings


def test_a_grouped_path_that_keeps_fewer_bits_than_declared_is_measured_and_refused():
    """Dense exact, grouped 12-bit truncation, declared fp32: the grouped probe reads 12 bits (truncation) on every
    grouped path and the declaration is refused naming the grouped path (the dense probe alone would pass it)."""
    from verify.accumulator import probe_grouped_accumulator

    b = GroupedSequentialAccumulator(12, "truncation", declared=2.0**-24)
    check_declared_u_acc(b, probe_accumulator(b, "cpu", paths={"M=1": 1}))  # the dense path hides it
    readings = probe_grouped_accumulator(b, "cpu", paths={"grouped L2, 2 rows per expert": (3, 2)})
    assert [(r.effective_bits, r.rounding, r.exact_up_to) for r in readings] == [(12, "truncation", False)], readings
    with pytest.raises(AccumulatorRefused, match=r"grouped L2, 2 rows per expert accumulator keeps 12 bits"):
        check_declared_u_acc(b, readings)


def test_the_accumulator_cli_lists_the_grouped_paths(capsys, monkeypatch):
    from verify.__main__ import main
    from verify.accumulator import GROUPED_PROBE_PATHS

    monkeypatch.setenv("COLUMNS", "250")  # one table row a line
    assert main(["accumulator", "--backend", "emulator", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert all(path in out for path in GROUPED_PROBE_PATHS), out
