"""The import graph of ``services``: no cycle among its modules, and no engine that pulls in grpc.

Imports are read with ``ast`` from every module under ``services/`` (those inside ``if TYPE_CHECKING:`` are
skipped: they never run), so the check follows the tree wherever its packages move. Whether an engine
imports grpc is checked for real: each engine module is imported in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "services"
# The model wrappers and the backends they load; STYLE.md: an engine imports no grpc.
ENGINES = (
    "services.vad.engine",
    "services.stt.engine",
    "services.stt.openai_backend",
    "services.translate.engine",
    "services.translate.ct2",
    "services.translate.llama",
    "services.translate.http_chat",
    "services.tts.engine",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: list[ast.AST], module: str, is_package: bool) -> set[str]:
    """Modules ``nodes`` import at run time, as absolute names (``from a import b``: both a and a.b)."""
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            found |= _imports(list(node.orelse), module, is_package)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        found |= _imports(list(ast.iter_child_nodes(node)), module, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Every module under ``services/`` -> the ``services`` modules it imports (packages included)."""
    paths = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        imported = _imports([tree], name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in paths and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_are_skipped():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import services.x\nelse:\n    import services.y\n"
    )
    assert _imports([tree], "services.m", False) == {"typing", "typing.TYPE_CHECKING", "services.y"}


def test_services_have_no_import_cycle():
    graph = import_graph()
    assert "services.common.deadlines" in graph
    assert cycles(graph) == []


@pytest.mark.parametrize("module", ENGINES)
def test_engine_imports_no_grpc(module):
    code = f"import sys, {module}; print('grpc' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    stderr = result.stderr
    missing_dependency = "ModuleNotFoundError" in stderr and "No module named 'services" not in stderr
    if result.returncode != 0 and missing_dependency:
        pytest.skip(f"{module} needs an optional dependency: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"{module} imports grpc"
