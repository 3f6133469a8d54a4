"""references/ and kernels/ never import each other (DESIGN.md "Layout"), and the
emulator imports nothing heavier than torch and numpy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"references": {"kernels", "verify"}, "kernels": {"references", "verify"}}
REFERENCES_ALLOWED_THIRD_PARTY = {"torch", "numpy"}


def imported_top_level_names(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, relative imports resolved to their package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the package it is in
                out.append((node.lineno, path.relative_to(ROOT).parts[0]))
            elif node.module:
                out.append((node.lineno, node.module.split(".")[0]))
    return out


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_the_other_side(package):
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
                 for p in python_files(package) for line, mod in imported_top_level_names(p)
                 if mod in FORBIDDEN[package]]
    assert not offenders, f"{package}/ must stay independent:\n  " + "\n  ".join(offenders)


def test_references_import_only_torch_numpy_and_stdlib():
    import sys
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
                 for p in python_files("references") for line, mod in imported_top_level_names(p)
                 if mod not in stdlib | REFERENCES_ALLOWED_THIRD_PARTY | {"references"}]
    assert not offenders, "references/ may import torch and numpy only:\n  " + "\n  ".join(offenders)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule can fail: a planted `from kernels import x` in a references file is reported."""
    (tmp_path / "references").mkdir()
    (tmp_path / "references" / "bad.py").write_text("import torch\nfrom kernels.sm90 import quantize\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"references/bad.py:2 imports kernels"):
        test_package_does_not_import_the_other_side("references")
