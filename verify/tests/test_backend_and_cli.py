"""The emulator backend through the backend interface, backend selection, and the CLI."""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys

import pytest
import torch

from references.gemm import gemm_error_bound, nvfp4_gemm_f64
from references.layouts import sf_swizzled_128x4_to_linear
from references.nvfp4 import quantize_nvfp4, te_global_enc_scale
from references.recipes import TE
from verify.assertions import assert_bytes_equal, assert_within_gemm_bound, describe_e4m3
from verify.backends import Backend, BackendProtocol, EmulatorBackend, Op, get_backend, registered_backend_names, \
    registered_backends
from verify.backends.base import OPS_OF_METHOD
from verify.backends.registry import BUILTINS
from verify.config import RunConfig, check_device, format_layers, parse_layers, positive_int
from verify.errors import DeviceUnavailableError, UsageError
from verify.metrics import stage_metrics


def test_auto_backend_on_this_machine_is_named_and_declares_recipe_and_accumulator():
    b = get_backend("auto")
    if not torch.cuda.is_available():
        assert b.name == "emulator"
    assert b.recipe.name == "te" and 0 < b.u_acc < 2**-10
    assert b.unsupported_reason(Op.QUANTIZE, torch.device("cpu")) is None or b.name != "emulator"


def test_unknown_backend_is_a_usage_error_listing_the_registered_ones():
    with pytest.raises(UsageError, match=r"^--backend sm80: invalid choice: 'sm80' \(known backends: auto, emulator, "
                                         r"sm90, sm100[,;]") as e:
        get_backend("sm80")
    assert e.value.argument == "--backend"


def test_auto_on_a_cpu_device_is_the_emulator_even_where_a_gpu_is():
    assert get_backend("auto", torch.device("cpu")).name == "emulator"
    assert get_backend("auto", "cpu").name == "emulator"


def test_emulator_backend_quantize_returns_swizzled_scales_of_the_reference():
    x = torch.randn(130, 64).to(torch.bfloat16)
    enc = te_global_enc_scale(x.float().abs().max())
    a = EmulatorBackend().quantize(x)  # dynamic: S = 2688 / amax, computed by the backend
    ref = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=enc)
    assert a.sf_swizzled_u8.shape == (256, 4)
    assert_bytes_equal(a.packed_u8, ref.packed_u8, label="emulator backend codes")
    assert_bytes_equal(sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=130, cols=4), ref.sf_u8,
                       label="emulator backend scales", describe=describe_e4m3)
    assert torch.equal(a.global_dec_f32.reshape(()), torch.reciprocal(enc))


def test_emulator_backend_static_quantize_keeps_the_input_scale_as_the_decode_multiplier():
    x = torch.randn(7, 32).to(torch.bfloat16)
    d = torch.tensor([0.0123], dtype=torch.float32)
    a = EmulatorBackend().quantize(x, input_dec_scale_f32=d)
    ref = quantize_nvfp4(x, recipe=TE, global_enc_scale_f32=torch.reciprocal(d))
    assert_bytes_equal(a.packed_u8, ref.packed_u8, label="static codes")
    assert torch.equal(a.global_dec_f32, d)  # alpha = input_scale x weight_scale_2, never 1/(1/D)


def test_emulator_backend_gemm_within_bound():
    from references.linear import Nvfp4Weight

    b = EmulatorBackend()
    x, w = torch.randn(5, 128).to(torch.bfloat16), torch.randn(40, 128).to(torch.bfloat16)
    ew = te_global_enc_scale(w.float().abs().max())
    qw = quantize_nvfp4(w, recipe=TE, global_enc_scale_f32=ew)
    weight = Nvfp4Weight(qw.packed_u8, qw.sf_u8, torch.reciprocal(ew), None)
    a = b.quantize(x)
    y = b.dense_gemm(a, weight)
    alpha = a.global_dec_f32.reshape(()) * torch.reciprocal(ew)
    a_sf = sf_swizzled_128x4_to_linear(a.sf_swizzled_u8, rows=5, cols=8)
    y64, absdot = nvfp4_gemm_f64(a.packed_u8, a_sf, qw.packed_u8, qw.sf_u8, alpha)
    assert_within_gemm_bound(y, y64, gemm_error_bound(absdot, y64, alpha, k=128, u_acc=b.u_acc), label="emulator gemm")


def test_metrics_of_identical_tensors_and_of_noise():
    x = torch.randn(1000, dtype=torch.float64)
    m = stage_metrics(x, x)
    assert m["cosine"] == pytest.approx(1.0) and m["calc_diff"] == pytest.approx(0.0, abs=1e-15) and m["sqnr_db"] == float("inf")
    m = stage_metrics(x + 0.1 * torch.randn(1000, dtype=torch.float64), x)
    assert 15 < m["sqnr_db"] < 25 and m["frac_bit_exact"] == 0.0


def test_run_config_and_layer_parsing():
    assert parse_layers("0,3,5-7") == (0, 3, 5, 6, 7)
    assert format_layers(parse_layers("7,0-3,5")) == "0-3,5,7"
    with pytest.raises(ValueError, match="cannot parse 'x'"):
        parse_layers("1,x")
    with pytest.raises(UsageError, match="--backend nope: invalid choice: 'nope'"):
        RunConfig(backend="nope")
    assert RunConfig(backend="mypkg.kernels:MyBackend").backend == "mypkg.kernels:MyBackend"  # imported when used


@pytest.mark.parametrize("text,problem", [("3-1", "runs backwards"), ("-1", "cannot parse '-1'"),
                                          ("0,,2", "cannot parse ''")], ids=["backwards", "negative", "empty-token"])
def test_bad_layers_are_usage_errors_naming_the_argument(text, problem):
    with pytest.raises(UsageError, match=problem) as e:
        parse_layers(text)
    assert str(e.value).startswith(f"--layers {text}: invalid value") and e.value.argument == "--layers"


@pytest.mark.parametrize("text", ["0", "-3", "x", "1.5"])
def test_counts_must_be_positive_integers(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"invalid value '{text}'"):
        positive_int(text)


def test_device_check_names_the_device_this_machine_lacks():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="--device nodevice: invalid value"):
        check_device("nodevice")
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceUnavailableError, match=f"--device {absent}: device unavailable"):
        check_device(absent)


def test_cli_demo_passes_and_writes_json(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "verify", "demo", "--rows", "64", "--k", "256", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "emulator self-check" in proc.stdout and "FAIL" not in proc.stdout
    assert out.exists() and '"ok": true' in out.read_text()


@pytest.mark.parametrize("name", [name for name, (_, needs) in BUILTINS.items() if needs])  # the kernel adapters
def test_kernel_backends_adapt_and_state_why_they_cannot_run_here(name):
    b = get_backend(name)
    assert b.name == name and b.recipe.name == "te" and b.u_acc > 0
    reason = b.unsupported_reason(Op.DENSE_GEMM, torch.device("cpu"))
    assert isinstance(reason, str) and reason, f"{name} must say why it cannot run a GEMM on the CPU"


def assert_conforms_to_the_base_class(cls: type) -> None:
    """cls is a Backend, forwards no unknown attribute to its kernels, and every op it overrides (and
    unsupported_reason) keeps the base class's parameters: names, kinds (positional / keyword-only) and
    defaults. The typing Protocol (BackendProtocol) states the same signatures."""
    __tracebackhide__ = True
    assert issubclass(cls, Backend), f"{cls.__qualname__} does not subclass verify.backends.Backend"
    for klass in cls.__mro__[:-1]:
        assert "__getattr__" not in vars(klass), f"{klass.__qualname__} forwards unknown attributes (__getattr__)"
    for method in (*OPS_OF_METHOD, "unsupported_reason"):
        got, want = _parameters(getattr(cls, method)), _parameters(getattr(Backend, method))
        assert got == want, f"{cls.__qualname__}.{method}{got} differs from Backend.{method}{want}"


def _parameters(fn) -> str:
    """The signature without annotations, e.g. "(self, x_bf16, *, input_dec_scale_f32=None)": the part
    callers depend on (names, positional / keyword-only, defaults)."""
    sig = inspect.signature(fn)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def _registered_class(name: str) -> type:
    """The class a registered entry names, or the class of what its factory returns."""
    module, _, attr = registered_backends()[name].target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj if inspect.isclass(obj) else type(get_backend(name))


@pytest.mark.parametrize("name", registered_backend_names())
def test_every_registered_backend_conforms_to_the_base_class(name):
    """Every adapter the registry lists (sm100's too), op by op, against the base class's signatures."""
    assert_conforms_to_the_base_class(_registered_class(name))


def test_the_protocol_states_the_base_class_signatures():
    for method in (*OPS_OF_METHOD, "unsupported_reason"):
        assert _parameters(getattr(BackendProtocol, method)) == _parameters(getattr(Backend, method)), method


def test_the_conformance_check_sees_a_changed_signature():
    """A deliberately broken sm100 adapter (moe_block's valid-token count renamed) fails the check."""
    from verify.backends.sm100 import Sm100Adapter

    class Renamed(Sm100Adapter):
        def moe_block(self, x_bf16, router, experts, *, swiglu_limit, weight_placement, act_scale,
                      token_ids_i64=None, num_valid_tokens=None):
            raise AssertionError("never called")

    with pytest.raises(AssertionError,
                       match=r"Renamed\.moe_block\(.*num_valid_tokens=None\) differs from Backend\.moe_block"):
        assert_conforms_to_the_base_class(Renamed)

    class Positional(Sm100Adapter):
        def quantize(self, x_bf16, input_dec_scale_f32=None):  # no longer keyword-only
            raise AssertionError("never called")

    with pytest.raises(AssertionError, match=r"Positional\.quantize"):
        assert_conforms_to_the_base_class(Positional)


def test_emulator_serves_every_forward_op_and_sm90_names_why_not_here():
    """The emulator serves every forward op anywhere; sm90 provides every forward op too (the dense
    path and the MoE block), and on a machine without a Hopper GPU (or triton) each op's reason says
    which of the two is missing, never that the op is absent."""
    from verify.backends import FORWARD_OPS

    cpu = torch.device("cpu")
    assert all(EmulatorBackend().unsupported_reason(op, cpu) is None for op in FORWARD_OPS)
    sm90 = get_backend("sm90")
    # the MXFP4 experts of DeepSeek-V4's MTP block: sm90 has no such kernel, and says so on any machine
    assert "MXFP4" in sm90.unsupported_reason(Op.GROUPED_LINEAR_MXFP4, cpu)
    for op in FORWARD_OPS:
        if op is Op.GROUPED_LINEAR_MXFP4:
            continue
        why = sm90.unsupported_reason(op, cpu)
        assert why is not None and "not provided" not in why, f"sm90 {op.value}: {why!r}"
        assert "CUDA" in why or "triton" in why or "Hopper" in why, f"sm90 {op.value}: {why!r}"


def test_te_dynamic_global_scale_ignores_nan_like_its_block_max():
    """Recipe te takes fmaxf semantics for the tensor amax too (the sm90 kernel does): a NaN element
    does not make the global scale NaN. An all-NaN tensor has amax 0, hence S = 1."""
    x = torch.tensor([[float("nan")] + [0.5] * 15, [2.0] + [float("nan")] * 15], dtype=torch.bfloat16)
    a = EmulatorBackend().quantize(x)
    assert torch.equal(a.global_dec_f32.reshape(()), torch.reciprocal(te_global_enc_scale(torch.tensor(2.0))))
    all_nan = EmulatorBackend().quantize(torch.full((1, 16), float("nan"), dtype=torch.bfloat16))
    assert float(all_nan.global_dec_f32) == 1.0
