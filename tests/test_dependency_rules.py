"""The dependency rules the architecture rests on, read from the code's own imports (ast).

- Azure's storage, identity and ML SDKs are imported only by the adapters (batchctl/storage,
  batchctl/compute) and by telemetry (batchctl/logs.py, its credential).
- The Functions SDKs are imported only by the Functions app's own modules (function_app.py,
  orchestrators/, activities/blueprint.py, batchctl/functions/) and the local stand-in of
  the Functions host (batchctl/local/server.py).
- The CLI (batchctl/cli.py, batchctl/client.py, batchctl/commands/) never imports the server's
  handlers (batchctl.functions).
(The node image's own rule, that it imports nothing of the app, is tests/test_dependencies.py.)
(The worker's own rules, no import cycle and the task API as a leaf, are
tests/test_worker_imports.py.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_SDKS = (
    "azure.storage",
    "azure.data",
    "azure.ai",
    "azureml",
    "azure.identity",
    "azure.mgmt",
)
FUNCTIONS_SDKS = ("azure.functions", "azure.durable_functions")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def python_files(*patterns: str) -> list[Path]:
    return sorted({path for pattern in patterns for path in ROOT.glob(pattern)})


ALL_CODE = python_files(
    "batchctl/**/*.py", "node_image/**/*.py", "orchestrators/*.py", "activities/*.py", "*.py"
)


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def violations(
    files: list[Path], forbidden: tuple[str, ...], allowed: tuple[str, ...]
) -> list[str]:
    return [
        f"{relative(path)} imports {name}"
        for path in files
        if not relative(path).startswith(allowed)
        for name in sorted(imports_of(path))
        if name.startswith(forbidden)
    ]


def test_the_code_base_is_found() -> None:
    names = {relative(path) for path in ALL_CODE}
    assert {"function_app.py", "orchestrators/run.py", "node_image/worker/loop.py"} <= names


def test_only_adapters_import_azure_storage_identity_and_ml_sdks() -> None:
    allowed = ("batchctl/storage/", "batchctl/compute/", "batchctl/logs.py")
    assert violations(ALL_CODE, ADAPTER_SDKS, allowed) == []


def test_only_the_functions_app_imports_the_functions_sdks() -> None:
    allowed = (
        "function_app.py",
        "orchestrators/",
        "activities/blueprint.py",
        "batchctl/functions/",
        "batchctl/local/server.py",
    )
    assert violations(ALL_CODE, FUNCTIONS_SDKS, allowed) == []


@pytest.mark.parametrize(
    "pattern", ["batchctl/cli.py", "batchctl/client.py", "batchctl/commands/*.py"]
)
def test_the_cli_never_imports_server_handlers(pattern: str) -> None:
    files = python_files(pattern)
    assert files
    assert violations(files, ("batchctl.functions",), ()) == []
