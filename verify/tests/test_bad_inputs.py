"""Bad inputs through every kernel stage (verify.bad_inputs), parametrised over backends: the emulator on
the CPU, sm90 / sm100 where present (each skips with its reason elsewhere). Test ids name op, input
class and backend: `dense_gemm-scale-padding-7f-sm90`.

Each case must give the defined result (bytes or the NaN-aware bound against the emulator's operands)
or be refused with a clear error naming the argument; a crash, a wrong result or a K = 40 result fails.
The second half shows the verdicts can fail (a quantizer that ignores NaN wrongly, a GEMM that reads
scale padding, an error that names nothing, a crash) and that the NaN-aware bound neither crashes nor
passes vacuously."""

from __future__ import annotations

import re

import pytest
import torch

from references.stages import Op
from verify.assertions import assert_within_gemm_bound
from verify.backends import EmulatorBackend, get_backend
from verify.backends.registry import backend_specs_for
from verify.bad_inputs import BAD_CASES, BadCase, run_bad_case

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_BACKENDS: dict = {}


def _backend(name: str):
    if name not in _BACKENDS:
        try:
            _BACKENDS[name] = (get_backend(name, _DEVICE if _DEVICE.type == "cuda" else None), None)
        except ImportError as e:
            _BACKENDS[name] = (None, f"{name}: {e}")
    b, why = _BACKENDS[name]
    if b is None:
        pytest.skip(f"not available here: {why}")
    return b


def pytest_generate_tests(metafunc):
    """case x backend_name (ids <op>-<class>-<backend>): the --backend under test (auto: every registered
    backend; else that one)."""
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("case", BAD_CASES, ids=lambda c: c.id)
        metafunc.parametrize("backend_name", backend_specs_for(metafunc.config.getoption("--backend")))


def test_bad_input_gives_the_defined_result_or_a_clear_refusal(case, backend_name):
    b = _backend(backend_name)
    v = run_bad_case(b, case, _DEVICE)
    if v.status == "not served":
        pytest.skip(f"not served here: {v.message}")
    assert v.status in ("defined", "refused"), v.message


def test_every_op_with_a_kernel_has_bad_input_cases():
    ops = {c.op for c in BAD_CASES}
    assert {Op.QUANTIZE, Op.GROUPED_QUANTIZE, Op.DENSE_GEMM, Op.GROUPED_GEMM, Op.SWIGLU_REQUANT, Op.COMBINE} <= ops
    assert len({c.id for c in BAD_CASES}) == len(BAD_CASES), "case ids must be unique"


def test_the_emulator_gives_the_defined_result_on_every_case_it_can():
    """On the emulator only K = 40 is refused; everything else is defined (the references define it)."""
    emu = EmulatorBackend()
    for case in BAD_CASES:
        v = run_bad_case(emu, case, torch.device("cpu"))
        expected = "refused" if case.input_class.startswith("k-not-multiple-of-16") else "defined"
        assert v.status == expected, f"{case.id}: {v.status}: {v.message}"


# ============================================================================= the verdicts can fail


def _case(op: Op, cls: str) -> BadCase:
    return next(c for c in BAD_CASES if c.op is op and c.input_class == cls)


class NanPropagatingQuantizer(EmulatorBackend):
    """A te quantizer whose amax takes NaN into the block max (torch.amax), unlike te's fmaxf."""

    name = "nan-propagating"

    def quantize(self, x_bf16, *, input_dec_scale_f32=None):
        from references.recipes import MODELOPT, TE
        import dataclasses
        te_nan = dataclasses.replace(TE, block_amax_nan=MODELOPT.block_amax_nan)
        return EmulatorBackend(te_nan).quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)


class ReadsPadding(EmulatorBackend):
    """A dense GEMM that decodes its scales from the padded buffer as if every byte were real: a 0x7F
    anywhere in it (padding included) turns the output NaN."""

    name = "reads-padding"

    def dense_gemm(self, a, w):
        y = super().dense_gemm(a, w)
        return torch.where((a.sf_swizzled_u8 == 0x7F).any(), torch.full_like(y, float("nan")), y)


class SilentK(EmulatorBackend):
    name = "silent-k"

    def quantize(self, x_bf16, *, input_dec_scale_f32=None):
        if x_bf16.shape[1] % 16:
            raise ValueError("bad shape")  # names no argument
        return super().quantize(x_bf16, input_dec_scale_f32=input_dec_scale_f32)


class Crashes(EmulatorBackend):
    name = "crashes"

    def grouped_gemm(self, a, offsets_i32, experts, *, layer):
        return a.packed_u8[int(offsets_i32[-1]) + 10 ** 6]  # an IndexError deep in the op


@pytest.mark.parametrize("backend,op,cls,why", [
    (NanPropagatingQuantizer(), Op.QUANTIZE, "nan-activations-dynamic", "bytes differ"),
    (ReadsPadding(), Op.DENSE_GEMM, "scale-padding-7f", "scale padding bytes"),
    (SilentK(), Op.QUANTIZE, "k-not-multiple-of-16-dynamic", "names no argument"),
    (Crashes(), Op.GROUPED_GEMM, "zero-token-experts", "crashed with IndexError"),
], ids=["nan-rule", "reads-padding", "unclear-refusal", "crash"])
def test_a_wrong_backend_fails_its_bad_input_verdict(backend, op, cls, why):
    v = run_bad_case(backend, _case(op, cls), torch.device("cpu"))
    assert v.status == "fail" and why in v.message, v


def test_the_nan_aware_bound_judges_special_positions_explicitly():
    y64 = torch.tensor([1.0, float("nan"), float("inf"), 2.0], dtype=torch.float64)
    bound = torch.tensor([0.01, float("nan"), float("nan"), 0.01], dtype=torch.float64)
    ok = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert assert_within_gemm_bound(ok, y64, bound, label="y", nonfinite="match") == 0.0
    for bad, at in ((torch.tensor([1.0, 5.0, float("inf"), 2.0]), "(1,)"),        # finite where NaN is exact
                    (torch.tensor([1.0, float("nan"), -float("inf"), 2.0]), "(2,)"),  # the wrong infinity
                    (torch.tensor([1.0, float("nan"), float("inf"), float("nan")]), "(3,)")):  # NaN where finite
        with pytest.raises(AssertionError, match=rf"first at flat \d = {re.escape(at)}: got"):
            assert_within_gemm_bound(bad, y64, bound, label="y", nonfinite="match")
    with pytest.raises(AssertionError, match="garbage never passes"):  # without the opt-in, NaN vs NaN fails
        assert_within_gemm_bound(ok, y64, bound, label="y")
    with pytest.raises(AssertionError, match="empty"):  # nothing compared passes nothing
        assert_within_gemm_bound(torch.zeros(0), y64[:0], bound[:0], label="empty", nonfinite="match")
