"""The third-party oracles the tests compare the emulators with, and the versions they document.

An oracle's numerics can change between releases (ml_dtypes 0.7.0 changed 33 of the 65546
UE8M0 cast bytes the codec tests enumerate). A test that compares with an oracle asks
`require_oracle(name)` first: an installed version other than the documented ones fails the
test with a message naming both, so a new release is adopted on purpose, never by whatever
pip resolved that day.

Moving a pin (README "Test oracles are pinned"): install the new version, run the oracle tests
with NVFP4V_ORACLE_UNPINNED=1 (a mismatch is then a warning), re-derive every documented
difference the failures show, then change ORACLE_VERSIONS here and the `==` pin in
pyproject.toml's test extra in one commit (test_oracle_pins checks they agree).

torch is an oracle too (its float8 / bf16 casts), but it is never pinned by this project (an
installed CPU or CUDA build is never replaced); its documented versions are the ones the
suite's CI (CPU) and the H200 image run.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

__all__ = ["ORACLE_VERSIONS", "OracleVersionError", "installed_version", "require_oracle"]

# name -> the release prefixes the oracle tests document ("2.11" matches 2.11.0+cu130).
ORACLE_VERSIONS: dict[str, tuple[str, ...]] = {
    "ml_dtypes": ("0.6.0",),  # the H200 image's version; 0.7.0 changed UE8M0 casts
    "torch": ("2.11", "2.13"),  # the H200 image (2.11.0+cu130) and CI's CPU wheel (2.13.0+cpu)
}
UNPINNED_ENV = "NVFP4V_ORACLE_UNPINNED"


class OracleVersionError(RuntimeError):
    """The installed oracle is not a version the tests document."""


def installed_version(name: str) -> str | None:
    """The installed distribution's version, or None when it is not installed."""
    if name == "torch":
        import torch  # noqa: PLC0415

        return torch.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def matches(version: str, documented: str) -> bool:
    """'2.11.0+cu130' matches '2.11' and '2.11.0'; '2.1.0' does not match '2.11'; '0.6.0' matches
    '0.6.0' only (and its local builds, '0.6.0+x')."""
    public = version.split("+", 1)[0]
    return public == documented or public.startswith(documented + ".")


def require_oracle(name: str) -> str:
    """The installed version of oracle `name` when the tests document it; otherwise raise
    OracleVersionError naming both versions (a warning instead with NVFP4V_ORACLE_UNPINNED=1)."""
    documented = ORACLE_VERSIONS[name]
    got = installed_version(name)
    if got is not None and any(matches(got, d) for d in documented):
        return got
    message = (f"oracle {name} {got or '(not installed)'} is not the documented version "
               f"{' or '.join(documented)}: its numerics may differ; re-derive the documented differences and "
               f"move the pin (README 'Test oracles are pinned'), or set {UNPINNED_ENV}=1 to compare anyway")
    if os.environ.get(UNPINNED_ENV) == "1":
        warnings.warn(message, stacklevel=2)
        return got or ""
    raise OracleVersionError(message)
