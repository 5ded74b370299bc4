"""The layering of docs/architecture.md, checked over the import graph of the source.

Every ``import`` of a project module (at any depth, ``if TYPE_CHECKING:`` blocks aside) is
an edge; the test asserts that the graph has no cycle, that each layer imports only from
the layers below it (and its own package), that the three model/loss packages do not
import each other, and that project modules are imported at module level (only the
command line defers them, so that ``ecg-distill --help`` starts without loading torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "teachers", "students")

# lowest first; a module may import from its own layer's package and from lower layers
LAYERS: tuple[tuple[str, ...], ...] = (
    ("distill.core",),
    ("distill.data",),
    ("distill.models",),  # model code teachers and students share
    ("teachers", "students", "distill.losses"),  # independent of one another
    ("distill.recipe",),
    ("distill.metrics",),
    ("distill.engine",),
    ("distill.compress",),
    ("distill.hub",),
    ("distill.run",),
    ("distill.cli", "distill"),
)
DEFERRED_IMPORTS_ALLOWED = ("distill.cli",)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _edges(modules: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported, at module level, line) for every project import."""
    edges = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:  # `from pkg import sub` imports the module pkg.sub
                    targets.append(f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src)
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges.append((mod, t, id(node) in top, node.lineno))
    return edges


def _layer(mod: str) -> tuple[int, str]:
    best = (-1, "")
    for i, names in enumerate(LAYERS):
        for name in names:
            if (mod == name or mod.startswith(name + ".")) and len(name) > len(best[1]):
                best = (i, name)
    assert best[0] >= 0, f"{mod} is in no layer of LAYERS"
    return best


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, _edges(modules)


def test_no_import_cycle(graph):
    modules, edges = graph
    succ: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _, _ in edges:
        succ[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_layers(graph):
    _, edges = graph
    bad = []
    for a, b, _, line in edges:
        (la, pa), (lb, pb) = _layer(a), _layer(b)
        if lb > la or (lb == la and pa != pb and la != len(LAYERS) - 1):
            bad.append(f"{a}:{line} imports {b} ({pa} may not import {pb})")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_project_imports_at_module_level(graph):
    _, edges = graph
    deferred = [f"{a}:{line} imports {b} inside a function" for a, b, top, line in edges
                if not top and not a.startswith(DEFERRED_IMPORTS_ALLOWED)]
    assert not deferred, "\n".join(deferred)


def test_no_teacher_kind_branches_outside_teachers():
    """The engine asks the adapters (``input_names``, ``batch_inputs``); only teachers/ and
    the recipe schema name a kind."""
    hits = []
    for path in (ROOT / "distill").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("distill/recipe/"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(q + k + q in code for k in ("vlm", "signal") for q in "\"'") and (
                    "==" in code or "!=" in code or " in (" in code):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
