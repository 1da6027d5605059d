"""The import graph of the project's modules has no cycle, and every module imports by one name.

Every module under chorus/, gateway/, ingest/ and native/ is parsed (never imported) and
every ``chorus.*`` import it makes is an edge: at the top, inside functions, and under
``if TYPE_CHECKING:`` too, since a cycle that only the type checker walks still ties the
two modules together (neither can be read, tested or replaced without the other). A cycle
fails the test with its modules in order. So does an import of the folders' own names
(``gateway``, ``ingest``, ``native``): they are installed as ``chorus.gateway`` and so on
(setup.py's package-dir), and a second name would load a second copy of each module.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package name it is installed as (pyproject.toml / setup.py package-dir).
PACKAGES = {"chorus": "chorus", "gateway": "chorus.gateway", "ingest": "chorus.ingest", "native": "chorus.native"}
FOLDER_NAMES = frozenset({"gateway", "ingest", "native"})  # importable only under chorus.


def module_files() -> dict[str, Path]:
    """Every project module by its import name."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every absolute name ``tree`` imports (with ``from x import y``: both x and x.y), and its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding this module
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph(files: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {project module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, int] = {}
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            if name in files and name != module and not module.startswith(name + "."):
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    steps = [f"  {a} ({files[a].relative_to(ROOT)}:{graph[a][b]}) imports {b}" for a, b in itertools.pairwise(cycle)]
    return "import cycle:\n" + "\n".join(steps)


def test_the_project_has_no_import_cycle() -> None:
    files = module_files()
    graph = import_graph(files)
    assert len(files) > 40 and sum(map(len, graph.values())) > 100  # the walk saw the project
    cycle = find_cycle(graph)
    assert cycle is None, describe(cycle, graph, files)


def test_no_module_imports_a_folder_by_its_own_name() -> None:
    wrong = []
    for folder in (*PACKAGES, "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[0] in FOLDER_NAMES]
    assert not wrong, "import these as chorus.gateway, chorus.ingest, chorus.native:\n" + "\n".join(wrong)


# -- the checker itself, on small graphs --

def test_a_cycle_is_found_and_printed_in_order() -> None:
    graph = {"chorus.a": {"chorus.b": 3}, "chorus.b": {"chorus.c": 5}, "chorus.c": {"chorus.a": 7}, "chorus.d": {}}
    cycle = find_cycle(graph)
    assert cycle == ["chorus.a", "chorus.b", "chorus.c", "chorus.a"]
    files = {name: ROOT / "chorus" / f"{name[7:]}.py" for name in graph}
    assert describe(cycle, graph, files).splitlines()[1:] == [
        "  chorus.a (chorus/a.py:3) imports chorus.b", "  chorus.b (chorus/b.py:5) imports chorus.c",
        "  chorus.c (chorus/c.py:7) imports chorus.a"]
    assert find_cycle({"chorus.a": {"chorus.b": 1}, "chorus.b": {}}) is None


@pytest.mark.parametrize("source", [
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from chorus.b import B\n",
    "def f():\n    import chorus.b\n",
    "from chorus import b\n",
    "from . import b\n",
    "from .b import B\n",
])
def test_every_kind_of_import_is_an_edge(source: str) -> None:
    names = {name for name, _ in imported_names(ast.parse(source), "chorus.a", False)}
    assert "chorus.b" in names
