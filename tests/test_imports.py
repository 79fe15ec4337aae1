"""The package's import graph, read from the source with ``ast``: no module may import, at
module level, a module that imports it back (directly or round a longer circle).

A circle of module-level imports works only while every module in it happens to be imported
in one order, and each of its modules can see the others half-built. Imports inside
functions run later and do not fail that way, but a circle through them still ties two
modules together; those are printed (``pytest -s``) for whoever untangles them next.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "babysit"
Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(
    node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set[str]
) -> set[str]:
    """The package's modules an import statement loads (a name imported from a package
    that is itself a module counts as that module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out: set[str] = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif source in known:
            out.add(source)
    return out


def _walk(body: list[ast.stmt], in_function: bool, found: list[tuple[bool, ast.stmt]]) -> None:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((in_function, node))
        elif isinstance(node, ast.If) and _is_type_checking(node):
            continue  # never runs: annotations only
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _walk(node.body, True, found)
        elif isinstance(node, ast.Lambda):
            continue
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    _walk([child], in_function, found)
                elif isinstance(child, (ast.excepthandler, ast.match_case)):
                    _walk(child.body, in_function, found)


def import_graphs() -> tuple[Graph, Graph]:
    """(module-level imports, all imports including those inside functions)."""
    modules = _modules()
    known = set(modules)
    top: Graph = {m: set() for m in modules}
    every: Graph = {m: set() for m in modules}
    for name, path in modules.items():
        found: list[tuple[bool, ast.stmt]] = []
        _walk(ast.parse(path.read_text(), str(path)).body, False, found)
        for in_function, node in found:
            assert isinstance(node, (ast.Import, ast.ImportFrom))
            targets = _targets(node, name, path.name == "__init__.py", known) - {name}
            every[name] |= targets
            if not in_function:
                top[name] |= targets
    return top, every


def cycles(graph: Graph) -> list[list[str]]:
    """The graph's circles: each strongly connected component of more than one module
    (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_sees_the_imports_it_should() -> None:
    # The reader must find imports of every kind it claims to: a module-level import, one
    # inside a function, one from a package's submodule. Were it blind, no circle would
    # ever show.
    top, every = import_graphs()
    assert "babysit.errors" in top["babysit.spec.fields"]
    assert "babysit.storage" in top["babysit.record.stored"]
    assert "babysit.training.user_model" in every["babysit.training.models"]
    assert "babysit.training.user_model" not in top["babysit.training.models"]
    assert "babysit.data.download" in top["babysit.data.fddb.download"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    # Imports inside functions count too: a deferred import hides a circle from Python, not
    # from a reader, and the layering (cli -> protocol -> stages -> train/record/storage ->
    # data/models, docs/design.md) holds for both.
    top, every = import_graphs()
    assert cycles(top) == []
    assert cycles(every) == []


def test_data_and_plugins_do_not_import_each_other() -> None:
    _, every = import_graphs()
    circles = cycles(every)
    assert not any("babysit.refs" in c and "babysit.data" in c for c in circles), circles
