"""The layers import one way: lofi <- pipelines <- tuning (STYLE.md). An AST scan of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "lofi": {"ray", "mlflow", "pipelines", "tuning"},
    "pipelines": {"tuning"},
}


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


def test_scan_detects_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray import data\nimport mlflow.tracking as t\nfrom . import sibling\n")
    assert imported_roots(bad) == {"os", "ray", "mlflow"}
