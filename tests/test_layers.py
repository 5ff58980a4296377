"""Layers stay layers: overlay/ never imports storage/ or p2pfs/; storage/ never
imports p2pfs/ (DESIGN.md; STYLE.md section 1). Parsed with ast, so imports
inside functions are caught too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "overlay": {"storage", "p2pfs", "tools", "bench"},
    "storage": {"p2pfs", "tools", "bench"},
    "p2pfs": {"tools", "bench"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add((alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in files
        for mod, line in imported_packages(f)
        if mod in FORBIDDEN[package]
    ]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_checker_sees_violations(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from storage import blocks\n    import p2pfs.cli\n")
    assert imported_packages(bad) == {("storage", 2), ("p2pfs", 3)}
