"""The layout conventions of docs/developing.md that import-linter cannot check."""

from __future__ import annotations

import ast
from pathlib import Path

import safehold

SRC = Path(safehold.__file__).parent


def _exception_classes(tree: ast.Module) -> list[str]:
    """Top-level classes whose bases' names end in Error or Exception (the project's naming
    rule makes that a reliable sign of an exception class)."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                     for b in node.bases]
            if any(n.endswith(("Error", "Exception")) for n in names):
                out.append(node.name)
    return out


def test_public_exceptions_live_in_errors_modules():
    misplaced = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "errors.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        misplaced += [f"{path.relative_to(SRC)}: {c}" for c in _exception_classes(tree)
                      if not c.startswith("_")]
    assert misplaced == [], "public exceptions outside an errors.py module (docs/developing.md)"


def test_exception_names_end_in_error():
    bad = []
    for path in sorted(SRC.rglob("errors.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bad += [f"{path.relative_to(SRC)}: {c}" for c in _exception_classes(tree)
                if not c.endswith(("Error", "Warning"))]
    assert bad == []
