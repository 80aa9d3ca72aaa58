"""The dependency rule for the node image: it never imports the controller side.

Dependencies point one way (DESIGN.md): the node image uses the shared library (contracts,
settings, storage adapters, the source policy) and nothing of the Functions app, the
orchestrators, the activities, the CLI or the controller. A node would otherwise need their
dependencies, and a change on the controller side could break every node.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = (
    "function_app",
    "orchestrators",
    "activities",
    "batchctl.commands",
    "batchctl.cli",
    "batchctl.client",
    "batchctl.functions",
    "batchctl.controller",
)


def _forbidden(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in FORBIDDEN)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, ``from batchctl import cli`` too."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from batchctl import controller` names the module in the alias.
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def test_node_image_imports_nothing_of_the_controller_side(repo_root: Path) -> None:
    files = sorted((repo_root / "node_image").rglob("*.py"))
    assert len(files) > 5
    offending = [
        f"{path.relative_to(repo_root)}:{line}: {module}"
        for path in files
        for line, module in _imports(path)
        if _forbidden(module)
    ]
    assert offending == []


def test_the_rule_catches_every_import_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import batchctl.cli\n"
        "from batchctl import controller\n"
        "from batchctl.functions.blueprint import bp\n"
        "from batchctl.contracts import WorkItem\n"
        "def late():\n    import orchestrators.run\n"
    )
    caught = sorted({m for _, m in _imports(sample) if _forbidden(m)})
    assert caught == [
        "batchctl.cli",
        "batchctl.controller",
        "batchctl.functions.blueprint",
        "batchctl.functions.blueprint.bp",
        "orchestrators.run",
    ]


def test_the_worker_loads_nothing_of_the_controller_side(repo_root: Path) -> None:
    # Transitively too: what the worker's modules import must not pull the controller in.
    code = (
        "import json, sys\n"
        "import node_image.worker.__main__, node_image.worker.loop\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    ).stdout
    loaded = [module for module in json.loads(out) if _forbidden(module)]
    assert loaded == []
