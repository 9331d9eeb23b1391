"""The package's layers only point down: data -> model -> engine -> protocols -> CLI / app / analysis.

Every module under ``pmpo/`` is parsed with :mod:`ast` (no import-linter dependency) and its
pmpo-internal imports become edges of a graph. Function-local imports count as much as top-level
ones -- they are deferred, not absent -- except those under ``if TYPE_CHECKING:``, which never run.
``importlib.import_module("pmpo....")`` with a literal name counts too, so a circle cannot hide
behind it. The graph must be acyclic (with the ``TYPE_CHECKING`` imports too), nothing but the CLI
may import the CLI, and the library core may import none of the layers above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pmpo"
# Folders beside the library that install inside it (pyproject.toml's package-dir mapping).
MAPPED = {"app": "pmpo.app", "analysis": "pmpo.analysis", "checkpoints": "pmpo.checkpoints"}

CLI = ("pmpo.cli", "pmpo.commands")
UPPER = ("pmpo.app", "pmpo.analysis", "pmpo.commands")
NOT_CORE = (*UPPER, "pmpo.cli", "pmpo.__main__")


def module_names(root: Path = PACKAGE, mapped: dict[str, str] | None = None) -> dict[str, Path]:
    """Dotted name -> file for every module of the package (``pkg/__init__.py`` is ``pkg``), the
    folders ``mapped`` beside it (``app/`` is ``pmpo.app``) included."""
    mapped = MAPPED if mapped is None and root == PACKAGE else (mapped or {})
    trees = [(root, root.name)] + [(root.parent / folder, dotted) for folder, dotted in mapped.items()]
    names = {}
    for tree, prefix in trees:
        for path in sorted(tree.rglob("*.py")):
            parts = (*prefix.split("."), *path.relative_to(tree).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``dotted`` (a module or a name inside one) lies in."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def imports_of(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path], type_hints: bool = False) -> set[str]:
    """The package modules ``tree`` imports anywhere, skipping ``if TYPE_CHECKING:`` bodies unless
    ``type_hints``.

    ``from pkg import sub`` means the submodule when there is one, else a name of ``pkg``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str | None] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_hints:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                found.add(sub if sub in modules else _resolve(stem, modules))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(_resolve(node.args[0].value, modules))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m is not None and m != module}


def import_graph(root: Path = PACKAGE, type_hints: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (with ``type_hints``, for annotations too)."""
    modules = module_names(root)
    return {
        name: imports_of(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)),
                         name, path.name == "__init__.py", modules, type_hints)
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: one path per strongly connected component with more than
    one module (or a module importing itself), listed from its alphabetically first member.

    Tarjan's algorithm, iterative so a deep package cannot hit the recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        components.append(sorted(component))
    return [_circle(sorted(c), graph) for c in sorted(components)]


def _circle(members: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete circle through ``members[0]`` inside the component (for a readable failure)."""
    inside = set(members)
    start = members[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in inside:
                    continue
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return members


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# --- the helper can fail --------------------------------------------------------------------------

def test_find_cycles_catches_an_injected_circle():
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert find_cycles(acyclic) == []
    assert find_cycles({**acyclic, "c": {"d"}}) == [["a", "c", "d", "a"]]  # the shortest circle through a
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b", "a"], ["c", "d", "c"]]


def test_import_graph_sees_function_local_and_importlib_imports_but_not_type_checking(tmp_path):
    pkg = tmp_path / "pmpo"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from pmpo.data.a import A\n")
    (pkg / "data" / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .b import B\n"
        "def f():\n    from . import b\n    return b\n")
    (pkg / "data" / "b.py").write_text(
        "import importlib\n"
        "def g():\n    return importlib.import_module('pmpo.data.a')\n")
    (pkg / "model.py").write_text("from .data import A\nimport pmpo.data.b as b\n")
    graph = import_graph(pkg)
    assert graph == {"pmpo": set(), "pmpo.data": {"pmpo.data.a"}, "pmpo.data.a": {"pmpo.data.b"},
                     "pmpo.data.b": {"pmpo.data.a"}, "pmpo.model": {"pmpo.data", "pmpo.data.b"}}
    assert find_cycles(graph) == [["pmpo.data.a", "pmpo.data.b", "pmpo.data.a"]]
    (pkg / "data" / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycles(import_graph(pkg)) == []
    (pkg / "data" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "data" / "b.py").write_text("from .a import A\n")
    assert find_cycles(import_graph(pkg)) == []  # a's import of b is for type hints only
    assert find_cycles(import_graph(pkg, type_hints=True)) == [["pmpo.data.a", "pmpo.data.b", "pmpo.data.a"]]


# --- the package ----------------------------------------------------------------------------------

GRAPH = import_graph()


def test_the_graph_covers_the_package():
    assert {"pmpo", "pmpo.model", "pmpo.data.datasets", "pmpo.cli", "pmpo.app.main"} <= set(GRAPH)
    assert "pmpo.model" in GRAPH["pmpo.engine"]


def test_no_import_cycles():
    assert find_cycles(GRAPH) == []


def test_no_import_cycles_even_through_type_hints():
    """A circle that only annotations close still ties two modules into one unit for a reader (and
    for a type checker); a shared record belongs in a module below both."""
    assert find_cycles(import_graph(type_hints=True)) == []


def test_only_the_cli_imports_the_cli():
    offenders = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if not _in(m, CLI)
                       for t in ts if _in(t, ("pmpo.commands",)))
    assert offenders == []


def test_the_library_core_imports_no_upper_layer():
    offenders = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if not _in(m, NOT_CORE)
                       for t in ts if _in(t, UPPER))
    assert offenders == []


# One job per module: past this many lines a module has usually grown a second one. The library, the
# app, the analyses, the tools and the benchmarks all count; tests do not.
MAX_MODULE_LINES = 600
ROOT = PACKAGE.parent


def test_no_module_is_over_the_size_limit():
    files = [p for folder in ("pmpo", "app", "analysis", "tools", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    files.append(ROOT / "app.py")
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    assert len(sizes) > 100 and "pmpo/model.py" in sizes
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
