"""The fm_keras import graph, read with `ast`: no import circles, no private cross-imports.

A circle among top-level imports makes a module's names depend on which module of the circle
was imported first; a private name (``_x``) imported from another module is an internal detail
used as an API. Both are checked over the package, the tests and the benchmarks (a benchmark
once imported `fm_keras.synth`'s private catalog). Function-level imports may break a circle
(that is what they are for), so only the private-name rule applies to them.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fm_keras"


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``name`` from ``module``; ``name`` is None for ``import module``."""

    importer: str
    module: str
    name: str | None
    top_level: bool
    line: int


def module_name(path: str) -> str:
    """Dotted name of a file under ROOT ("fm_keras/pipeline/__init__.py" -> "fm_keras.pipeline",
    "tests/test_x.py" -> "tests.test_x")."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def python_files() -> list[str]:
    files = []
    for top in (PACKAGE, "tests", "benchmarks"):
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


PACKAGE_MODULES = {module_name(f) for f in python_files()
                   if module_name(f).split(".")[0] == PACKAGE}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, top_level: bool = True):
    """(node, top_level) for every import; inside a function body top_level is False, inside
    ``if TYPE_CHECKING:`` the import never runs and is skipped."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, top_level
        elif _is_type_checking(child):
            continue
        else:
            nested = top_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _imports(child, nested)


def edges_of(path: str) -> list[Edge]:
    """The fm_keras imports of one file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    importer = module_name(path)
    is_package = path.endswith("__init__.py")
    out = []
    for node, top in _imports(tree):
        if isinstance(node, ast.Import):
            out += [Edge(importer, a.name, None, top, node.lineno) for a in node.names
                    if a.name.split(".")[0] == PACKAGE]
            continue
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = importer.split(".")
            package = package[:len(package) - node.level + (1 if is_package else 0)]
            base = ".".join(package + ([base] if base else []))
        if base.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in PACKAGE_MODULES:  # `from fm_keras import fsutil`: the module
                out.append(Edge(importer, submodule, None, top, node.lineno))
            else:
                out.append(Edge(importer, base, alias.name, top, node.lineno))
    return out


ALL_EDGES = [e for f in python_files() for e in edges_of(f)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def top_level_graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.top_level and e.importer != e.module and e.module in PACKAGE_MODULES:
            graph.setdefault(e.importer, set()).add(e.module)
    return graph


def test_no_import_circle_among_top_level_imports():
    cycle = find_cycle(top_level_graph(ALL_EDGES))
    assert cycle is None, ("import circle: " + " -> ".join(cycle or [])
                           + "; make the shared helper public in the module that owns it, or "
                           "move it to a module both import")


def test_no_private_name_imported_across_modules():
    offenders = [f"{e.importer}:{e.line} imports {e.name} from {e.module}" for e in ALL_EDGES
                 if e.name and e.name.startswith("_") and not e.name.startswith("__")
                 and e.module != e.importer]
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


# The checker itself, on small known graphs and sources: it must be able to fail.

def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


@pytest.mark.parametrize("source, expected", [
    ("from fm_keras.data import load_split, _filter_mask\n",
     {("fm_keras.data", "load_split", True), ("fm_keras.data", "_filter_mask", True)}),
    ("def f():\n    from fm_keras.scoring import _header\n",
     {("fm_keras.scoring", "_header", False)}),
    ("class A:\n    import fm_keras.training\n", {("fm_keras.training", None, True)}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fm_keras import model\n",
     set()),
    ("from fm_keras import fsutil, __version__\n",
     {("fm_keras.fsutil", None, True), ("fm_keras", "__version__", True)}),
    ("import numpy\nfrom os import path\n", set()),
])
def test_edges_read_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    path = tmp_path / "fm_keras" / "probe.py"
    path.parent.mkdir()
    path.write_text(source)
    got = {(e.module, e.name, e.top_level) for e in edges_of(str(path))}
    assert got == expected


def test_relative_imports_resolve_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    path = tmp_path / "fm_keras" / "pipeline" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text("from .config import _build\nfrom .. import fsutil\n")
    got = {(e.module, e.name) for e in edges_of(str(path))}
    assert got == {("fm_keras.pipeline.config", "_build"), ("fm_keras.fsutil", None)}
