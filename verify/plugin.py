"""pytest hooks of nvfp4-verify: markers, options, device gating, hypothesis profiles.

Only hooks live here; configuration is verify.config.RunConfig, reporting is elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from verify.config import RunConfig, env_default, parse_layers
from verify.oracles import OracleVersionError, require_oracle

MAX_LAYERS = 64  # DeepSeek-V4-Pro has 61 decoder layers plus MTP

MARKERS = {
    "gpu": "needs a CUDA device; skipped with the reason when none is present",
    "sm90": "needs a Hopper (compute capability 9.x) GPU",
    "sm100": "needs a Blackwell datacenter (compute capability 10.x) GPU",
    "fuzz": "hypothesis property test; profile HYPOTHESIS_PROFILE (dev, ci, nightly), default ci under -m fuzz, dev otherwise",
    "golden": "compares against golden/<fixture>/<backend>.json",
    "lint": "checkpoint lint findings",
    "slow": "long-running; not run by default (select with -m slow or --run-slow)",
    "bench": "benchmark; not run by default (select with -m bench or --run-bench)",
    "cpu_compile": "compiles production kernels on the CPU (no GPU needed)",
    "browser": "loads an HTML report in headless Chromium (NVFP4V_CHROMIUM or /usr/bin/chromium); runs by default "
               "where it is installed, skipped with the reason elsewhere",
    "distributed": "launches torchrun (torch.distributed, gloo on the CPU) in a subprocess",
    "oracle": "oracle(*names): compares with these third-party oracles; fails unless each installed version is "
              "the one verify/oracles.py documents",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("nvfp4-verify")
    g.addoption("--checkpoint", default=env_default("CHECKPOINT", None),
                help="Checkpoint directory to verify (env NVFP4V_CHECKPOINT). "
                     "Default: %(default)r (the committed fixture).")
    g.addoption("--backend", default=env_default("BACKEND", "auto"), type=_backend_arg,
                help="Backend under test (env NVFP4V_BACKEND): a registered name (`python -m verify backends` "
                     "lists them), 'auto', or module:attr. Default: %(default)r.")
    g.addoption("--layers", default=None,
                help="Layers to verify, e.g. '0,3,5-7'; each test also carries a "
                     "marker layerN, so -m layer0 works too. Default: %(default)r (all).")
    g.addoption("--update-golden", action="store_true", default=False,
                help="Rewrite golden files, then fail with the diff. Default: %(default)r.")
    g.addoption("--report-dir", default=env_default("REPORT_DIR", None),
                help="Directory for JSON reports (env NVFP4V_REPORT_DIR). Default: %(default)r.")
    g.addoption("--run-bench", action="store_true", default=False,
                help="Run `bench` tests even without -m bench. Default: %(default)r.")
    g.addoption("--run-slow", action="store_true", default=False,
                help="Run `slow` tests even without -m slow. Default: %(default)r.")


def _backend_arg(text: str) -> str:
    """--backend's type: verify.backends.registry.backend_arg, imported when the option is parsed (the
    registry imports torch; loading the plugin does not)."""
    from verify.backends.registry import backend_arg  # noqa: PLC0415

    return backend_arg(text)


def pytest_configure(config: pytest.Config) -> None:
    # CuTe DSL reads its target at import: SM100 kernels then compile on any machine.
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_100a")
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    for i in range(MAX_LAYERS):
        config.addinivalue_line("markers", f"layer{i}: verifies decoder layer {i}")
    # The full fuzz budget runs when fuzz tests are selected (-m fuzz); the default run
    # keeps them as quick smoke tests. HYPOTHESIS_PROFILE always wins.
    default_profile = "ci" if "fuzz" in (config.getoption("-m") or "") else "dev"
    _load_hypothesis_profiles(os.environ.get("HYPOTHESIS_PROFILE", default_profile))


def _load_hypothesis_profiles(profile: str) -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # hypothesis is a dependency; tolerate its absence for collection only
        return
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("dev", max_examples=100, **common)
    settings.register_profile("ci", max_examples=800, **common)
    settings.register_profile("nightly", max_examples=20_000, **common)
    settings.load_profile(profile)


def run_config(config: pytest.Config) -> RunConfig:
    """The RunConfig built from pytest's options."""
    checkpoint = config.getoption("--checkpoint")
    report_dir = config.getoption("--report-dir")
    return RunConfig(
        checkpoint=Path(checkpoint) if checkpoint else None,
        backend=config.getoption("--backend"),
        layers=parse_layers(config.getoption("--layers")),
        update_golden=config.getoption("--update-golden"),
        report_dir=Path(report_dir) if report_dir else None,
    )


@pytest.fixture(scope="session")
def run_cfg(pytestconfig: pytest.Config) -> RunConfig:
    return run_config(pytestconfig)


def _device_skip_reason(marker: str) -> str | None:
    """Why a test carrying `marker` cannot run on this machine, or None."""
    import torch

    if not torch.cuda.is_available():
        return f"{marker}: no CUDA device (torch {torch.__version__}, cuda={torch.version.cuda})"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if marker == "sm90" and major != 9:
        return f"sm90: needs compute capability 9.x, this is {name} (sm_{major}{minor})"
    if marker == "sm100" and major != 10:
        return f"sm100: needs compute capability 10.x (B200/GB200), this is {name} (sm_{major}{minor})"
    return None


def chromium_path() -> str:
    """The Chromium the `browser` tests drive: NVFP4V_CHROMIUM, else Debian's /usr/bin/chromium."""
    return env_default("CHROMIUM", "/usr/bin/chromium")


def _browser_skip_reason() -> str | None:
    path = chromium_path()
    if not os.access(path, os.X_OK):
        return (f"browser: no Chromium at {path} (install Debian's: apt-get install -y chromium; "
                "or set NVFP4V_CHROMIUM)")
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.oracle("ml_dtypes", "torch")`: the test compares with those libraries, so each
    must be a documented version (verify.oracles); a mismatch fails the test naming both versions."""
    for mark in item.iter_markers("oracle"):
        for name in mark.args:
            try:
                require_oracle(name)
            except OracleVersionError as e:
                pytest.fail(str(e), pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("-m") or ""
    layers = set(parse_layers(config.getoption("--layers")))
    opt_in = {
        "bench": config.getoption("--run-bench") or "bench" in markexpr,
        "slow": config.getoption("--run-slow") or "slow" in markexpr,
    }
    reasons: dict[str, str | None] = {}
    deselected = []
    kept = []
    for item in items:
        layer_marks = [m.name for m in item.iter_markers() if m.name.startswith("layer")]
        if layers and layer_marks and not any(int(m[5:]) in layers for m in layer_marks):
            deselected.append(item)
            continue
        kept.append(item)
        for name, enabled in opt_in.items():
            if not enabled and item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=f"{name}: not run by default; use -m {name} or --run-{name}"))
        if item.get_closest_marker("browser"):
            if "browser" not in reasons:
                reasons["browser"] = _browser_skip_reason()
            if reasons["browser"]:
                item.add_marker(pytest.mark.skip(reason=reasons["browser"]))
        for hw in ("gpu", "sm90", "sm100"):
            if item.get_closest_marker(hw):
                if hw not in reasons:
                    reasons[hw] = _device_skip_reason(hw)
                if reasons[hw]:
                    item.add_marker(pytest.mark.skip(reason=reasons[hw]))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
