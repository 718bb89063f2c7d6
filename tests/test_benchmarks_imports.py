"""The benchmark scripts import only names attntrace still has (they run outside CI, so a moved name
would otherwise break them silently: `bench.py` once imported the demo's data folder from a module
that no longer held it)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _attntrace_imports() -> list[tuple[str, str, str]]:
    found = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attntrace":
                found += [(script.name, node.module, alias.name) for alias in node.names]
    return found


def test_benchmarks_import_attntrace() -> None:
    assert len({s for s, _, _ in _attntrace_imports()}) >= 5  # the scan sees the scripts


@pytest.mark.parametrize(("script", "module", "name"), _attntrace_imports())
def test_benchmark_import_resolves(script: str, module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), f"{script}: {module} has no {name}"
