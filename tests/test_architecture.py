"""The package's shape: layers import downward only, no import cycle, no private name across modules.

The import graph is built from the source with `ast`, counting every import: at module level, inside
functions and under `TYPE_CHECKING`. An edge goes to the module a statement imports (`from .core import
call` is an edge to `attntrace.core.call`; `from .adapters import Adapter` one to the `adapters`
package). Implicit imports of parent packages are not edges (every module is below `attntrace`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "attntrace"

# Layers, lowest first: a module may import its own layer and the ones below it, never one above.
LAYERS = [
    ("core", lambda m: m.startswith("attntrace.core")),
    ("tracing", lambda m: m.startswith("attntrace.tracing")),
    ("adapters", lambda m: m.startswith("attntrace.adapters")),
]
# The most lines a module may have without its docstring saying why (it must mention "lines").
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(target module, names imported from it, line) for every import statement in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(name, path)
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "attntrace":
                    out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attntrace":
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            for sub in subs:
                out.append((sub, [], node.lineno))
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    """attntrace module -> the attntrace modules it imports (anywhere in its source)."""
    modules = _modules()
    return {name: {t for t, _, _ in _imports(name, path, modules)} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_every_kind_of_import() -> None:
    # The graph builder itself: an import inside a function and one under TYPE_CHECKING are edges.
    graph = import_graph()
    assert "attntrace.tracer" in graph["attntrace.experiment.item"]  # imported inside a function
    assert "attntrace.core.call" in graph["attntrace.core.observer"]  # under TYPE_CHECKING
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]


def test_no_import_cycle() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles inside attntrace: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_internal_import_resolves() -> None:
    # attntrace's own code uses the modules' real paths (the old flat paths are aliases for users only).
    modules = _modules()
    bad = [
        f"{name}:{line} imports {target}"
        for name, path in modules.items()
        for target, _, line in _imports(name, path, modules)
        if target not in modules
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_layers_import_downward_only(layer: str) -> None:
    rank = {name: i for i, (name, _) in enumerate(LAYERS)}

    def layer_of(module: str) -> int:
        for name, inside in LAYERS:
            if inside(module):
                return rank[name]
        return len(LAYERS)  # the facade and everything on top of it

    graph = import_graph()
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if layer_of(m) == rank[layer]
        for t in targets
        if layer_of(t) > rank[layer]
    ]
    assert not bad, f"{layer} imports from a layer above it:\n" + "\n".join(bad)


def test_no_private_name_crosses_modules() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        module_aliases: set[str] = set()
        for target, names, line in _imports(name, path, modules):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{name}:{line} imports {target}.{n}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    target = _imports_target(name, path, node, a.name, modules)
                    if target in modules:
                        module_aliases.add(a.asname or a.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _imports_target(name: str, path: Path, node: ast.ImportFrom, imported: str, modules: dict[str, Path]) -> str:
    package = _package_of(name, path).split(".")
    base = package[: len(package) - (node.level - 1)] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    return f"{target}.{imported}"


def test_module_size() -> None:
    long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and not re.search(r"\blines\b", doc):
            long.append(f"{name}: {n} lines, and its docstring does not say why")
    assert not long, "\n".join(long)
