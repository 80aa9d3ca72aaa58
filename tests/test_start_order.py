"""A local run's standby workers start before the controller and the storage clients load.

Their TensorFlow import and model build are the longest thing a short run waits for, so they
start as soon as the run's folder is claimed: before ``batchctl run`` imports the storage
clients (azure-storage-blob and aiohttp) and the controller, about 0.3 s of imports on this
machine. Each check runs in a fresh interpreter, whose ``sys.modules`` is the evidence. The
report's renderer (matplotlib) waits, likewise, until the nodes have finished an item.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LATE_MODULES = ("azure.storage.blob", "aiohttp", "batchctl.controller", "batchctl.services")


def _fresh(script: str) -> dict[str, bool]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: dict[str, bool] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_the_run_command_loads_without_the_storage_clients_or_the_controller() -> None:
    loaded = _fresh(
        f"""
        import json, sys
        import batchctl.cli
        # Every command's module, as `batchctl run` loads them to parse its arguments: a
        # controller import at the top of any of them (watch's and report's were) delayed
        # the standby workers' start by half a second.
        batchctl.cli.build_parser()
        print(json.dumps({{name: name in sys.modules for name in {LATE_MODULES!r}}}))
        """
    )
    assert not any(loaded.values()), loaded


def test_standby_workers_start_before_the_storage_clients_and_the_controller_load(
    tmp_path: Path,
) -> None:
    """Through the command itself (its parser, its target, run_locally), as a user starts a
    run: the copy-out's progress printer the target builds loaded the controller first."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video\nclip.mp4\n")
    loaded = _fresh(
        f"""
        import json, os, sys
        from batchctl import cli
        from batchctl.local import session

        def standby_workers(*args, **kwargs):
            seen = {{name: name in sys.modules for name in {LATE_MODULES!r}}}
            print(json.dumps(seen), flush=True)
            os._exit(0)

        session.standby_workers = standby_workers
        cli.main(["run", {str(manifest)!r}, "--out", {str(tmp_path / "out")!r}])
        """
    )
    assert not any(loaded.values()), loaded


def test_the_report_renderer_is_imported_once_the_nodes_have_finished_an_item() -> None:
    from batchctl.local.session import renderer_import_due

    assert not renderer_import_due({"phase": "running", "succeeded": 0, "failed": 0})
    assert not renderer_import_due({"phase": "validating"})  # no counts yet
    assert not renderer_import_due({"succeeded": None, "failed": None})
    assert renderer_import_due({"succeeded": 1, "failed": 0})
    assert renderer_import_due({"succeeded": 0, "failed": 1})
    assert renderer_import_due({"succeeded": 0, "failed": 0, "finished": True})
