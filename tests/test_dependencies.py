"""Every third-party module that mechdiff imports is declared in pyproject.toml.

A package installed by hand on a developer's machine hides a missing declaration until CI runs on a new
machine; this test reads the imports themselves (function-level ones included) so the mistake fails here.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.split(r"[<>=!~;\[ ]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta.get("dependencies", []))
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += extra
    return {_norm(r) for r in reqs} | {_norm(meta["name"])}


def _imports() -> dict[str, str]:
    """Top-level module -> first place it is imported, for every module under mechdiff/."""
    found: dict[str, str] = {}
    for f in sorted((ROOT / "mechdiff").rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], f"{f.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_imported_module_is_declared():
    declared = _declared()
    dists = packages_distributions()
    undeclared = []
    for mod, where in sorted(_imports().items()):
        if mod in sys.stdlib_module_names or mod == "mechdiff":
            continue
        # a module not installed here (an optional extra such as vllm) is taken to be its own distribution
        providers = {_norm(d) for d in dists.get(mod, [mod])}
        if not providers & declared:
            undeclared.append(f"{mod} (imported at {where}; provided by {', '.join(sorted(providers))})")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def test_the_check_sees_function_level_imports():
    # the scipy import that once went undeclared sits inside a function
    assert "scipy" in _imports()
