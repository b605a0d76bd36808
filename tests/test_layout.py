"""The library's layout: its public names importable from the top, and its layers (no module
imports the trainers; only ``app/`` imports the app or Gradio)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import lesionstudio

ROOT = Path(__file__).resolve().parents[1] / "lesionstudio"


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    module = "lesionstudio." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = (
                importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else node.module
            )
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_the_public_names_import_from_the_top():
    for name in lesionstudio.__all__:
        assert getattr(lesionstudio, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lesionstudio.nope  # noqa: B018


def test_the_layers_import_downwards_only():
    for path in sorted(ROOT.rglob("*.py")):
        names = imports_of(path)
        where = path.relative_to(ROOT).parts[0]
        assert not any(n == "train" or n.startswith("train.") for n in names), path
        if where != "app":
            assert not any(n.startswith(("lesionstudio.app", "gradio")) for n in names), path
        if where == "models":
            assert not any(n.startswith(("lesionstudio.sampling", "lesionstudio.app")) for n in names), path
