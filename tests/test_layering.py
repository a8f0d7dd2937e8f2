"""The layers import one way: lofi <- pipelines <- tuning <- lofi_cli (STYLE.md). An AST scan of every module,
lazy imports inside functions included, and of the `lofi` command table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "lofi": {"ray", "mlflow", "pipelines", "tuning", "lofi_cli", "argparse"},  # the method: no services, no CLI
    "pipelines": {"tuning", "lofi_cli", "argparse"},
    "tuning": {"lofi_cli", "argparse"},
}
PACKAGES = (*FORBIDDEN, "lofi_cli")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_a_layer_above(package):
    assert modules(package), f"{package}/ has no modules"
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in modules(package)
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"layering violated (see STYLE.md): {offenders}"


def dynamic_imports(path: Path) -> list[int]:
    """Lines that import a module named by a string: an arrow the scan above could not see."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
        or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))]


def test_no_module_is_imported_by_a_string():
    found = {str(p.relative_to(REPO)): dynamic_imports(p) for pkg in PACKAGES for p in modules(pkg)}
    assert not {k: v for k, v in found.items() if v}, "import modules by name, not by string (STYLE.md)"


def test_every_command_is_a_front_end_in_lofi_cli():
    from lofi_cli.commands import COMMANDS

    for name, (main, _summary) in COMMANDS.items():
        assert main.__module__.startswith("lofi_cli."), f"lofi {name}: {main.__module__}.main is not in lofi_cli/"
    assert not list((REPO / "lofi").rglob("*_cli.py")), "command front ends live in lofi_cli/, not in lofi/"


def test_scan_detects_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray import data\nimport mlflow.tracking as t\nfrom . import sibling\n")
    assert imported_roots(bad) == {"os", "ray", "mlflow"}


def test_scan_sees_a_lazy_import_and_an_import_by_string(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("import importlib\ndef f():\n    from tuning import sweep\n    return importlib.import_module('x')\n")
    assert imported_roots(lazy) == {"importlib", "tuning"}
    assert dynamic_imports(lazy) == [4]



def _modules_imported(path: Path) -> set[str]:
    """Every module an import names, and each `from M import x` as M.x too (x may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_stages_never_import_each_other():
    """What two stages share lives in lofi/ or pipelines/data/; only the orchestrator (and the demo
    that runs it) composes stages."""
    from pipelines.config import STAGES

    stages = {f"pipelines.stages.{name}" for name in (*STAGES, "export")}
    offenders = {}
    for path in sorted((REPO / "pipelines" / "stages").glob("*.py")):
        if path.name in ("pipeline.py", "demo.py"):
            continue
        hit = (_modules_imported(path) & stages) - {f"pipelines.stages.{path.stem}"}
        if hit:
            offenders[path.name] = sorted(hit)
    assert not offenders, f"a stage imports another stage: {offenders}"


def test_data_path_never_imports_a_stage():
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "pipelines" / "data").glob("*.py"))
                 if any(m.startswith("pipelines.stages") for m in _modules_imported(p))]
    assert not offenders, f"pipelines/data/ imports pipelines/stages/: {offenders}"
