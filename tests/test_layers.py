"""The package's layers: the engine (top of `streamchat/`, `policies/`, `fastpath/`) never imports a front end, a
measuring tool or the command line, and no modules import each other in a cycle. Imports under `if TYPE_CHECKING:`
are annotations only and do not count; imports inside functions do."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "streamchat"
UPPER = ("streamchat.frontends", "streamchat.evaluate", "streamchat.cli", "streamchat.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The streamchat modules `path` imports at run time (resolved to modules that exist, not names in them)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the list of modules around it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "streamchat.cache" in graph and "streamchat.policies.h2o" in graph
    assert cycles(graph) == []


def test_engine_never_imports_upper_layers():
    graph = import_graph()
    wrong = {
        module: sorted(i for i in imported if i.startswith(UPPER))
        for module, imported in graph.items()
        if not module.startswith(UPPER)
    }
    assert {m: i for m, i in wrong.items() if i} == {}


def test_tools_and_front_ends_stay_apart():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("streamchat.evaluate"):
            assert not any(i.startswith("streamchat.frontends") for i in imported), module


def test_every_module_imports():
    """Each module imports (one fresh interpreter for all: a broken path after a move fails here)."""
    names = sorted(n for n in import_graph() if n != "streamchat.__main__")  # __main__ runs the CLI
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
