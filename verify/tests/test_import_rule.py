"""references/ and kernels/ never import each other (DESIGN.md "Layout"), the emulator imports
nothing heavier than torch and numpy, verify/ has no import cycle, in verify/ only the kernel
adapters (verify/backends/sm90.py, sm100.py) import kernels/ (DESIGN "Backend protocol"), and the
adapters of other people's kernels (verify/backends/adapters/) import neither references/ nor kernels/
nor the verify modules that wrap the references (their operands come from their own prepare)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"references": {"kernels", "verify"}, "kernels": {"references", "verify"}}
REFERENCES_ALLOWED_THIRD_PARTY = {"torch", "numpy"}
# the only modules of verify/ (tests aside: kernel tests drive kernels/ directly) that import kernels/
KERNEL_ADAPTERS = {"verify/backends/sm90.py", "verify/backends/sm100.py"}


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


# ----------------------------------------------------------------------------- verify/: no import cycle


def verify_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file of every module of verify/ except its tests."""
    out = {}
    for path in sorted((root / "verify").rglob("*.py")):
        rel = path.relative_to(root)
        if "tests" in rel.parts:
            continue
        parts = rel.with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports anywhere in its file (function-level imports too:
    a lazy import is still a dependency). `from pkg import sub` counts as the submodule sub; relative
    imports are resolved; importing a.b.c also runs the packages a.b and a, so those count too, except
    the packages `name` itself is inside (Python has them in sys.modules already)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a.b.func -> a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
            parent = target.rpartition(".")[0]
            while parent and not name.startswith(parent + "."):  # the packages it runs on the way
                out.add(parent)
                parent = parent.rpartition(".")[0]
    return out & set(modules) - {name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (each is an import circle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_verify_has_no_import_cycle():
    modules = verify_modules(ROOT)
    graph = {name: module_imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 20 and graph["verify.layer_report"], "the import graph of verify/ was not read"
    cycles = import_cycles(graph)
    assert not cycles, "verify/ modules in an import cycle:\n  " + "\n  ".join(
        " <-> ".join(c) + ": " + "; ".join(f"{a} imports {sorted(graph[a] & set(c))}" for a in c) for c in cycles)


def test_only_the_kernel_adapters_import_kernels():
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
                 for p in verify_modules(ROOT).values() for line, mod in imported_top_level_names(p)
                 if mod == "kernels" and str(p.relative_to(ROOT)) not in KERNEL_ADAPTERS]
    assert not offenders, ("only the kernel adapters (" + ", ".join(sorted(KERNEL_ADAPTERS)) + ") may import "
                           "kernels/; go through verify.backends instead:\n  " + "\n  ".join(offenders))
    importers = {str(p.relative_to(ROOT)) for p in verify_modules(ROOT).values()
                 if any(mod == "kernels" for _, mod in imported_top_level_names(p))}
    assert importers == KERNEL_ADAPTERS, f"the adapters that import kernels/ are {sorted(importers)}"


def _broken_copy(tmp_path: Path, monkeypatch, rel: str, planted: str) -> None:
    """A copy of verify/ under tmp_path with `planted` appended to `rel`, made the checked ROOT."""
    shutil.copytree(ROOT / "verify", tmp_path / "verify", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / rel
    target.write_text(target.read_text() + planted)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)


def test_the_cycle_checker_sees_a_planted_cycle(tmp_path, monkeypatch):
    """A lazy `from verify.layer_report import ...` in the registry closes a circle (layer_report imports
    verify.backends, whose package imports the registry): the test names it."""
    _broken_copy(tmp_path, monkeypatch, "verify/backends/registry.py",
                 "\n\ndef _planted():\n    from verify.layer_report import backend_for_verdicts\n")
    with pytest.raises(AssertionError, match=r"import cycle:[\s\S]*verify\.backends\.registry[\s\S]*"
                                             r"verify\.layer_report"):
        test_verify_has_no_import_cycle()


def test_the_kernels_rule_sees_a_planted_import(tmp_path, monkeypatch):
    _broken_copy(tmp_path, monkeypatch, "verify/backends/registry.py",
                 "\n\ndef _planted():\n    from kernels.sm90.api import Sm90Kernels\n")
    with pytest.raises(AssertionError, match=r"verify/backends/registry.py:\d+ imports kernels"):
        test_only_the_kernel_adapters_import_kernels()


# ----------------------------------------------------------------------------- verify/backends/adapters/

# what an adapter of someone else's kernels may not import: the references and our kernels (top-level), and
# the verify modules that run reference code on a backend's behalf (the emulator backend, the reference layer)
ADAPTERS_DIR = "verify/backends/adapters"
ADAPTER_FORBIDDEN_TOP = {"references", "kernels"}
ADAPTER_FORBIDDEN_MODULES = ("verify.backends.emulator", "verify.reference_layer")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in a file (`from a.b import c` gives a.b and a.b.c)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_adapters_import_no_reference_code():
    files = sorted((ROOT / ADAPTERS_DIR).rglob("*.py"))
    assert files, f"no adapter modules under {ADAPTERS_DIR}"
    offenders = sorted({f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in files
                        for line, mod in _imported_modules(p)
                        if mod.split(".")[0] in ADAPTER_FORBIDDEN_TOP
                        or any(mod == f or mod.startswith(f + ".") for f in ADAPTER_FORBIDDEN_MODULES)})
    assert not offenders, ("an adapter prepares its operands with its own code, never with references/ (nor "
                           "kernels/):\n  " + "\n  ".join(offenders))


@pytest.mark.parametrize("planted", ["from references.fp8_act import quantize_act_fp8_1x128",
                                     "from verify.backends.emulator import fp8_act_scale_fmt",
                                     "import kernels.sm90.api"], ids=["references", "emulator", "kernels"])
def test_the_adapter_rule_sees_a_planted_import(tmp_path, monkeypatch, planted):
    _broken_copy(tmp_path, monkeypatch, f"{ADAPTERS_DIR}/torch_ops.py", f"\n\ndef _planted():\n    {planted}\n")
    with pytest.raises(AssertionError, match=rf"{ADAPTERS_DIR}/torch_ops.py:\d+ imports {planted.split()[1]}"):
        test_adapters_import_no_reference_code()
