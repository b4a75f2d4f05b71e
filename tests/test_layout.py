"""The package's layers import only downwards: cli -> lab -> core; testbeds use the core, never the lab."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "mixkv"

# layer -> the top-level subpackages of mixkv it must never import
FORBIDDEN = {
    "core": {"lab", "cli", "testbeds"},
    "testbeds": {"lab", "cli"},
    "lab": {"cli"},
    "serving": {"lab", "cli", "testbeds"},
    "integrations": {"lab", "cli"},
}


def _imported_subpackages(path: Path) -> set[str]:
    """Top-level mixkv subpackages a module imports (absolute or relative, also inside functions)."""
    rel = path.relative_to(PKG).with_suffix("")
    here = ["mixkv", *rel.parts[:-1]] if rel.name != "__init__" else ["mixkv", *rel.parts[:-1]]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mixkv" and len(parts) > 1:
                found.add(parts[1])
    return found


def _modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    modules = _modules(layer)
    assert modules, f"no modules found under {layer}"
    bad = {str(p.relative_to(PKG)): sorted(_imported_subpackages(p) & FORBIDDEN[layer]) for p in modules}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{layer} imports from layers above it: {bad}"


def test_the_rule_detects_a_wrong_import(tmp_path):
    """Guard against a vacuous check: the parser sees relative and function-level imports."""
    probe = PKG / "core" / "_probe_for_test.py"
    probe.write_text("def f():\n    from ..lab import run\n    from mixkv.cli import main\n")
    try:
        assert _imported_subpackages(probe) >= {"lab", "cli"}
    finally:
        probe.unlink()


def test_the_package_root_has_no_stray_modules():
    """New code goes into a layer; the root holds only the public API and the marker file."""
    stray = sorted(p.name for p in PKG.iterdir() if p.is_file() and p.suffix == ".py" and p.name != "__init__.py")
    assert stray == []
