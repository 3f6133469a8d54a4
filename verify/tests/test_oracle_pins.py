"""The oracle pins: pyproject's test extra and verify/oracles.py agree, and a version the tests do
not document fails with a message naming both versions."""

from __future__ import annotations

import re
import tomllib
from types import SimpleNamespace

import pytest

from verify import oracles
from verify.config import REPO_ROOT
from verify.oracles import ORACLE_VERSIONS, OracleVersionError, matches, require_oracle


def _test_extra() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]


def test_every_pip_installable_oracle_is_pinned_exactly_to_its_documented_version():
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+]*)", r).groups() for r in _test_extra()
                if "==" in r)
    for name, documented in ORACLE_VERSIONS.items():
        if name == "torch":  # never pinned here: an installed CPU/CUDA build is never replaced
            assert not any(r.startswith("torch") for r in _test_extra()), _test_extra()
            continue
        assert name in pins, f"pyproject test extra {_test_extra()} does not pin oracle {name} with =="
        assert (pins[name],) == documented, f"pyproject pins {name}=={pins[name]}, verify/oracles.py documents {documented}"


@pytest.mark.parametrize("name", sorted(ORACLE_VERSIONS))
def test_an_undocumented_version_fails_naming_both_versions(monkeypatch, name):
    monkeypatch.delenv(oracles.UNPINNED_ENV, raising=False)
    monkeypatch.setattr(oracles, "installed_version", lambda n: "99.0.0")
    with pytest.raises(OracleVersionError) as e:
        require_oracle(name)
    msg = str(e.value)
    assert f"{name} 99.0.0" in msg and all(d in msg for d in ORACLE_VERSIONS[name]), msg


def test_a_missing_oracle_fails_too(monkeypatch):
    monkeypatch.delenv(oracles.UNPINNED_ENV, raising=False)
    monkeypatch.setattr(oracles, "installed_version", lambda n: None)
    with pytest.raises(OracleVersionError, match=r"ml_dtypes \(not installed\)"):
        require_oracle("ml_dtypes")


def test_unpinned_env_turns_the_failure_into_a_warning(monkeypatch):
    monkeypatch.setenv(oracles.UNPINNED_ENV, "1")
    monkeypatch.setattr(oracles, "installed_version", lambda n: "0.7.0")
    with pytest.warns(UserWarning, match="ml_dtypes 0.7.0 is not the documented version 0.6.0"):
        assert require_oracle("ml_dtypes") == "0.7.0"


@pytest.mark.parametrize("version,documented,ok", [
    ("2.11.0+cu130", "2.11", True), ("2.13.0+cpu", "2.13", True), ("2.1.0", "2.11", False),
    ("2.110.0", "2.11", False), ("0.6.0", "0.6.0", True), ("0.6.0+local", "0.6.0", True), ("0.6.1", "0.6.0", False),
    ("0.7.0", "0.6.0", False),
])
def test_version_matching(version, documented, ok):
    assert matches(version, documented) is ok


def test_the_oracle_marker_fails_an_undocumented_version(monkeypatch, request):
    """verify.plugin's setup hook reads @pytest.mark.oracle(...) and fails the test (no traceback)."""
    from verify.plugin import pytest_runtest_setup

    monkeypatch.delenv(oracles.UNPINNED_ENV, raising=False)
    monkeypatch.setattr(oracles, "installed_version", lambda n: "0.0.1")
    item = SimpleNamespace(iter_markers=lambda name: iter([pytest.mark.oracle("ml_dtypes").mark]) if name == "oracle"
                           else iter([]))
    with pytest.raises(pytest.fail.Exception, match="oracle ml_dtypes 0.0.1 is not the documented version 0.6.0"):
        pytest_runtest_setup(item)
