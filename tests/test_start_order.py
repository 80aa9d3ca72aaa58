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
        import batchctl.cli, batchctl.commands.run, batchctl.commands.trial
        print(json.dumps({{name: name in sys.modules for name in {LATE_MODULES!r}}}))
        """
    )
    assert not any(loaded.values()), loaded


def test_standby_workers_start_before_the_storage_clients_and_the_controller_load(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video\nclip.mp4\n")
    loaded = _fresh(
        f"""
        import json, sys
        from pathlib import Path
        from batchctl.contracts import RunOptions
        from batchctl.local import session

        class Started(Exception):
            pass

        def standby_workers(*args, **kwargs):
            seen = {{name: name in sys.modules for name in {LATE_MODULES!r}}}
            print(json.dumps(seen))
            raise Started

        session.standby_workers = standby_workers
        try:
            session.run_locally(
                Path({str(manifest)!r}), RunOptions(), run_id="order", nodes=1,
                out_dir=Path({str(tmp_path / "out")!r}),
            )
        except Started:
            pass
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
