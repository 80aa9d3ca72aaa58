"""The node worker's own import rules, read from the code's own imports (ast).

- node_image/worker has no import cycle.
- The task API a user's task imports (``node_image/worker/taskapi.py``: ItemInput,
  ItemOutput, CancelToken, TaskSetup, the segment parts) is a leaf: it imports nothing of the
  worker but ``MediaLimits`` (below), only the standard library, numpy, pydantic and the
  library's contracts and errors. A task, built-in or custom, and every worker module can then
  import it without closing a loop.

What counts as an edge: EVERY import statement in a module, wherever it stands: at module
level, inside a function (a lazy import), and under ``if TYPE_CHECKING:``. A lazy or
type-only import does not fail at import time, which is exactly why it hides a cycle rather
than removing it: the modules still cannot be understood, tested or moved apart, and the
day someone hoists the import (or a type checker or a tool evaluates the annotations) the
cycle fails at import. The cycle issue 22 names (jobs -> tasks -> features/transform ->
segments -> jobs) ran through one of each: the tasks registry imports its built-in tasks
lazily, and those imported the segment parts under TYPE_CHECKING.
What does not count: the implicit import of a package's ``__init__`` that Python performs
before one of its submodules (``tasks.features`` runs ``tasks/__init__`` first). That is how
packages work, not a dependency the code chose; an explicit ``from . import X`` in a
submodule, resolved to the package, does count.
(The library's own rules are tests/test_dependency_rules.py; the node image's rule that it
imports nothing of the app is tests/test_dependencies.py.)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = "node_image.worker"
TASK_API = f"{WORKER}.taskapi"
# What the task API may import besides the standard library: numpy, pydantic (the segment
# row a part carries is a pydantic model, as every contract is), and from the library only
# its contracts and its error hierarchy (what a cancelled item raises; no I/O in either).
TASK_API_ALLOWED = ("numpy", "pydantic", "batchctl.contracts", "batchctl.errors")
# The one worker module the task API still imports: TaskSetup.limits is a MediaLimits, and
# MediaLimits is defined in media.py. Moving its definition into taskapi.py (media.py then
# importing it from there) leaves the task API importing nothing of the worker; this set is
# then empty, and the test below says so.
TASK_API_WORKER_IMPORTS: set[str] = set()


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(package_dir: Path, root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(package_dir.rglob("*.py"))}


def imported_names(name: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """Every module ``name`` (at ``path``) imports, anywhere in it, relative imports resolved.

    ``from X import y`` names the module ``X.y`` when that is a module here, else ``X``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def import_graph(package_dir: Path, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the same package tree it imports (every import counts)."""
    known = modules_under(package_dir, root)
    return {
        name: {target for target in imported_names(name, path, known) if target in known}
        for name, path in known.items()
    }


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle as a closed path ``[a, b, ..., a]``, or None (depth-first, colours)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def reach(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def top_level(name: str) -> str:
    return name.partition(".")[0]


def allowed_for_task_api(name: str) -> bool:
    return top_level(name) in sys.stdlib_module_names or any(
        name == allowed or name.startswith(f"{allowed}.") for allowed in TASK_API_ALLOWED
    )


GRAPH = import_graph(ROOT / "node_image" / "worker")


def show(cycle: list[str]) -> str:
    return " -> ".join(name.removeprefix(f"{WORKER}.") for name in cycle)


# -- the graph builder sees what it must ------------------------------------------------------
def test_the_worker_is_found() -> None:
    assert {WORKER, f"{WORKER}.loop", f"{WORKER}.tasks", f"{WORKER}.tasks.features"} <= set(GRAPH)
    assert TASK_API in GRAPH


def test_module_level_and_lazy_imports_are_edges() -> None:
    assert f"{WORKER}.execution" in GRAPH[f"{WORKER}.loop"]  # from .execution import ...
    # task_class() imports the built-in tasks inside the function: still an edge.
    assert {f"{WORKER}.tasks.features", f"{WORKER}.tasks.transform"} <= GRAPH[f"{WORKER}.tasks"]


def test_imports_resolve_relative_lazy_and_type_only(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n    from .sub.c import Thing\n"
    )
    (package / "b.py").write_text("def later():\n    from .sub import c\n")
    (package / "sub" / "__init__.py").write_text("from .. import b\nfrom ..a import name\n")
    (package / "sub" / "c.py").write_text("import pkg.b\nimport os\nfrom . import Name\n")
    graph = import_graph(package, tmp_path)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg.sub.c"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": {"pkg.b", "pkg.a"},
        "pkg.sub.c": {"pkg.b", "pkg.sub"},
    }
    assert find_cycle(graph) == ["pkg.b", "pkg.sub.c", "pkg.b"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


# -- the rules --------------------------------------------------------------------------------
def test_the_worker_has_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle in {WORKER}: {show(cycle)}"


def test_the_task_api_imports_nothing_of_the_worker() -> None:
    assert GRAPH[TASK_API] == TASK_API_WORKER_IMPORTS, "the task API must be a leaf"
    assert reach(GRAPH, TASK_API) == set()


def test_the_task_api_imports_only_the_standard_library_numpy_and_contracts() -> None:
    known = modules_under(ROOT / "node_image" / "worker")
    names = imported_names(TASK_API, known[TASK_API], known)
    outside = sorted(name for name in names if name not in known and not allowed_for_task_api(name))
    assert outside == []


def test_tasks_and_worker_modules_take_the_task_api_from_the_leaf() -> None:
    """The in-flight state (jobs), the segments and the built-in tasks import the API's types
    from taskapi, not from the tasks package: that package imports its built-in tasks, which
    import the model and the decoder (and the built-in tasks are inside it: a cycle)."""
    for name in ("jobs", "segments", "tasks.features", "tasks.transform"):
        imports = GRAPH[f"{WORKER}.{name}"]
        assert TASK_API in imports, name
        assert f"{WORKER}.tasks" not in imports, name
