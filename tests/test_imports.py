"""The fm_keras import graph, read with `ast`: no import circles, no private cross-imports.

A circle among top-level imports makes a module's names depend on which module of the circle
was imported first; a circle closed by an import inside a function only hides that: the two
modules still need each other (issue 13: data -> tfrecord, training <-> distributed /
retrieval, evaluation <-> training / calibration were such). So every import counts, at any
level, except under ``if TYPE_CHECKING:`` (never run). A function-level import is still the
way to keep a heavy dependency (TensorFlow, ScaNN, matplotlib) off a light import path.
A private name (``_x``) imported from another module is an internal detail used as an API.
Both are checked over the package, the tests and the benchmarks (a benchmark once imported
`fm_keras.synth`'s private catalog).
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


def import_graph(edges: list[Edge]) -> dict[str, set[str]]:
    """importer -> the package modules it imports, at any level (top or inside a function)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.importer != e.module and e.module in PACKAGE_MODULES:
            graph.setdefault(e.importer, set()).add(e.module)
    return graph


def test_no_import_circle_at_any_level():
    cycle = find_cycle(import_graph(ALL_EDGES))
    where = [next(f"{e.importer}:{e.line}" for e in ALL_EDGES if (e.importer, e.module) == pair)
             for pair in zip(cycle or [], (cycle or [])[1:])]
    assert cycle is None, ("import circle: " + " -> ".join(cycle) + f" (at {', '.join(where)})"
                           "; a function-level import does not break it: move the shared "
                           "helper to a module both import")


def test_a_circle_closed_inside_a_function_is_found(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    (tmp_path / "fm_keras").mkdir()
    (tmp_path / "fm_keras" / "a.py").write_text("from fm_keras.b import g\n")
    (tmp_path / "fm_keras" / "b.py").write_text("def g():\n    from fm_keras.a import f\n")
    monkeypatch.setitem(globals(), "PACKAGE_MODULES", {"fm_keras.a", "fm_keras.b"})
    edges = [e for name in "ab" for e in edges_of(str(tmp_path / "fm_keras" / f"{name}.py"))]
    assert find_cycle(import_graph(edges)) == ["fm_keras.a", "fm_keras.b", "fm_keras.a"]


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
