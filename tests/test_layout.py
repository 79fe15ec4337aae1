"""The package's folders and what each may do (docs/design.md, "Imports flow one way").

Which folder a module is in says what it may import: every top-level entry of
``babysit/`` has a level, and an import (at module level, inside a function or under
TYPE_CHECKING) goes only to a lower level or within its own folder. The torch-free folders
import no torch at module level, however deep; only ``babysit/storage/`` reads Optuna's
private attributes; only the schema spells a stage name or an attr key.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.test_imports import PACKAGE
from tests.test_imports import _modules
from tests.test_imports import _targets
from tests.test_imports import import_graphs

ROOT = PACKAGE.parent

# Each top-level entry of babysit/ and its level; higher levels use lower ones.
LEVELS = {
    "babysit.__main__": 10,
    "babysit.cli": 9,
    "babysit": 8,  # the lazy face: run, load_run, load_model, Spec
    "babysit.api": 7,
    "babysit.ablate": 7,
    "babysit.protocol": 6,
    "babysit.stages": 5,
    "babysit.training": 4,
    "babysit.parallel": 4,
    "babysit.report": 4,
    "babysit.data": 3,
    "babysit.record": 3,
    "babysit.spec": 2,
    "babysit.storage": 2,
    "babysit.refs": 2,
    "babysit.schema": 1,
    "babysit.errors": 1,
    "babysit.terminal": 1,
    "babysit.memory": 1,
}
# Folders whose modules import no torch (nor anything that does) when imported.
NO_TORCH = (
    "babysit.cli",
    "babysit.record",
    "babysit.storage",
    "babysit.spec",
    "babysit.report",
    "babysit.parallel",
    "babysit.schema",
    "babysit.refs",
    "babysit.errors",
    "babysit.terminal",
)
STAGE_NAMES = {"sanity", "overfit", "coarse", "fine", "final"}
ATTR_SETTERS = {
    # method: position of the key among its arguments
    "set_user_attr": 0,
    "set_system_attr": 0,
    "set_trial_user_attr": 1,
    "set_trial_system_attr": 1,
    "set_study_user_attr": 1,
    "set_study_system_attr": 1,
}
MAX_LONG_FUNCTIONS = 5  # functions over 80 lines, docstrings and nested functions included


def entry(module: str) -> str:
    """The top-level entry of babysit/ a module belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _all_imports() -> dict[str, set[str]]:
    """Every import of the package's own modules, TYPE_CHECKING ones included."""
    modules = _modules()
    known = set(modules)
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _targets(node, name, path.name == "__init__.py", known)
        out[name] = found - {name}
    return out


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def test_the_top_of_the_package_is_short_and_every_entry_has_a_level() -> None:
    entries = [p for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 20, sorted(p.name for p in entries)
    named = {
        "babysit" if p.name == "__init__.py" else f"babysit.{p.name.removesuffix('.py')}"
        for p in entries
        if p.is_dir() or p.suffix == ".py"
    }
    assert named == set(LEVELS), named ^ set(LEVELS)
    assert max(LEVELS.values()) <= 10


def test_imports_go_down_the_levels() -> None:
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in _all_imports().items()
        for b in targets
        if entry(a) != entry(b) and LEVELS[entry(a)] <= LEVELS[entry(b)]
    )
    assert upward == [], upward


def _imports_torch_at_load(path: Path) -> bool:
    """A module-level ``import torch`` (or torchvision), TYPE_CHECKING blocks excepted."""
    found: list[tuple[bool, ast.stmt]] = []
    from tests.test_imports import _walk

    _walk(ast.parse(path.read_text()).body, False, found)
    for in_function, node in found:
        if in_function:
            continue
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [getattr(node, "module", None) or ""]
        )
        if any(n.split(".")[0] in ("torch", "torchvision") for n in names):
            return True
    return False


def test_the_torch_free_folders_load_no_torch() -> None:
    # Module-level imports only, followed as deep as they go: a deferred import runs when
    # its function does, which a read verb never calls.
    top, _ = import_graphs()
    modules = _modules()
    heavy = {m for m, p in modules.items() if _imports_torch_at_load(p)}
    bad = []
    for m in modules:
        if not any(m == f or m.startswith(f + ".") for f in NO_TORCH):
            continue
        seen, todo = set(), [m]
        while todo:
            here = todo.pop()
            if here in seen:
                continue
            seen.add(here)
            # importing babysit.x.y runs babysit/x/__init__.py first
            parts = here.split(".")
            todo += [".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i])]
            todo += sorted(top.get(here, ()))
        if seen & heavy:
            bad.append(f"{m}: {sorted(seen & heavy)}")
    assert bad == [], bad


_PRIVATE = re.compile(
    r"\._(storage|study_id|trial_id|backend|get_stale_trial_ids)\b|"
    r"optuna\.storages\._|optuna\.study\._"
)


def test_only_storage_reads_optunas_internals() -> None:
    # babysit/storage/private.py reads them for everyone else; rdb.py and remote.py are
    # storage implementations and speak Optuna's internals by necessity.
    bad = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in _python_files()
        if not p.is_relative_to(PACKAGE / "storage")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if _PRIVATE.search(line) and not line.lstrip().startswith("#")
    ]
    assert bad == [], bad


def test_no_stage_name_or_attr_key_is_spelled_outside_the_schema() -> None:
    # A renamed key or stage is a one-line change in babysit/schema.py.
    bad = []
    for p in _python_files():
        if p.name == "schema.py" and p.parent == PACKAGE:
            continue
        tree = ast.parse(p.read_text())
        docs = _docstrings(tree)
        in_fstrings = {
            id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in STAGE_NAMES
                and id(node) not in docs
                and id(node) not in in_fstrings
            ):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: stage name {node.value!r}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ATTR_SETTERS
            ):
                at = ATTR_SETTERS[node.func.attr]
                key = node.args[at] if len(node.args) > at else None
                if isinstance(key, (ast.Constant, ast.JoinedStr)):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: attr key spelled")
    assert bad == [], bad


def test_few_long_functions() -> None:
    lengths = sorted(
        (node.end_lineno - node.lineno + 1, f"{p.relative_to(ROOT)}:{node.name}")
        for p in _python_files()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
    )
    long = [f"{name} ({n} lines)" for n, name in lengths if n > 80]
    assert len(long) <= MAX_LONG_FUNCTIONS, long


def test_design_md_matches_the_tree() -> None:
    # Every module docs/design.md names exists, and every package of babysit/ is described.
    text = (ROOT / "docs" / "design.md").read_text()
    named = set(re.findall(r"`(babysit/[\w/]+(?:\.py)?/?)`", text))
    missing = sorted(n for n in named if not (ROOT / n.rstrip("/")).exists())
    assert missing == [], missing
    packages = sorted(str(p.parent.relative_to(ROOT)) + "/" for p in PACKAGE.rglob("__init__.py"))
    undescribed = [p for p in packages if f"`{p}`" not in text]
    assert undescribed == [], undescribed
