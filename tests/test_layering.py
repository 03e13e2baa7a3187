"""The package's import graph: no cycle at runtime, and the core never imports an adapter."""

from __future__ import annotations

import ast
from pathlib import Path

import reqscope

SOURCE = Path(reqscope.__file__).parent
ADAPTERS = ("reqscope.fastapi", "reqscope.starlette", "reqscope.brokers", "reqscope.testing")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = ("reqscope", *path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The reqscope modules ``path`` imports when it runs: top-level or inside functions,
    but not under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit(branch)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in modules else child.module)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & set(modules)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _runtime_imports(path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for imported in sorted(graph[name]):
            if imported == name:
                continue
            cycle = walk(imported, [*path, name])
            if cycle:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = walk(name, [])
        if cycle:
            return cycle
    return None


def test_the_runtime_import_graph_has_no_cycle() -> None:
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_an_adapter() -> None:
    for name, imported in _graph().items():
        if name.startswith(ADAPTERS) or name == "reqscope.__main__":
            continue
        assert not {i for i in imported if i.startswith(ADAPTERS)}, name


def test_nothing_a_scope_uses_reaches_back_up_to_the_factory() -> None:
    graph = _graph()
    below = ("_scope", "_keeper", "_cleanup", "_enforcement", "_registry", "_leaks")
    for name in below:
        assert "reqscope._sessions" not in graph[f"reqscope.{name}"], name
