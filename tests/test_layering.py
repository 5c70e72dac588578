"""Dependencies point one way: cli -> cluster -> pipeline -> analyses -> engine, with report and zoo leaves that
only the pipeline and the CLI import. Read from the source (every import, function-level ones included), and
checked in a fresh interpreter for the engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mechdiff"

# package -> the mechdiff packages it may import (besides itself and the top-level helpers)
ALLOWED: dict[str, set[str]] = {
    "engine": set(),
    "analyses": {"engine"},
    "studies": {"analyses", "engine"},
    "pipeline": {"analyses", "engine", "report", "zoo"},
    "report": {"analyses", "engine"},
    "zoo": {"analyses", "engine"},
    "cluster": {"pipeline", "analyses", "engine", "report", "zoo"},
    "cli": {"cluster", "pipeline", "analyses", "studies", "engine", "report", "zoo"},
}
TOP = {"errors", "__init__"}  # mechdiff/errors.py and mechdiff/__init__.py: importable from anywhere
# Imports against the layering that are known and not yet removed: file -> the package it may still import.
KNOWN: dict[str, str] = {}


def _is_cli(path: Path) -> bool:
    """The command line: the package mechdiff/cli/ (and mechdiff/__main__.py, which only calls it)."""
    rel = path.relative_to(PKG)
    return rel.parts[0] == "cli" or rel.as_posix() == "__main__.py"


def _package(path: Path) -> str:
    if _is_cli(path):
        return "cli"
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem not in TOP else rel.stem


def _mechdiff_imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "mechdiff" else [node.module]
        for n in names:
            parts = n.split(".")
            if parts[0] == "mechdiff" and len(parts) > 1:
                out.append((parts[1], node.lineno))
    return out


def test_no_package_imports_one_above_it():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        pkg = _package(f)
        if pkg in TOP:
            continue
        for target, line in _mechdiff_imports(f):
            target = target.removesuffix(".py")
            if target == pkg or target in TOP or target == "__version__":
                continue
            if KNOWN.get(str(f.relative_to(ROOT))) == target:
                continue
            if target not in ALLOWED.get(pkg, set()):
                bad.append(f"{f.relative_to(ROOT)}:{line}: {pkg} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_only_the_cli_imports_typer():
    """The command line is the package mechdiff/cli/: no other module imports typer (or click)."""
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        if _is_cli(f):
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{f.relative_to(ROOT)}:{node.lineno}: imports {n}" for n in names
                    if n.split(".")[0] in ("typer", "click")]
    assert not bad, "typer outside mechdiff/cli/:\n" + "\n".join(bad)
    assert not list(PKG.rglob("*_cli.py")) and not (PKG / "cli_common.py").exists()


def test_importing_the_engine_loads_nothing_above_it():
    code = ("import sys, mechdiff.engine, mechdiff.engine.extract, mechdiff.engine.store, mechdiff.engine.models; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('mechdiff.') and "
            "m.split('.')[1] not in ('engine', 'errors')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
