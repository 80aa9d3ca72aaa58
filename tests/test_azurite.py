"""The Azurite launcher: free ports, readiness, and no orphan when the parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from batchctl.local.azurite import _port_open, azurite
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore

pytestmark = pytest.mark.azurite


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split()[2] != "Z"


def test_start_answers_and_stop_frees_the_ports(tmp_path) -> None:
    with azurite(tmp_path) as instance:
        ports = (instance.blob_port, instance.queue_port, instance.table_port)
        assert len(set(ports)) == 3
        assert all(_port_open(port) for port in ports)
        assert instance.environment()["BATCHCTL_QUEUE_URL"] == instance.queue_url
        pid = instance.process.pid
    assert instance.process.poll() is not None
    assert not _alive(pid)


def test_the_settings_and_the_environment_of_an_instance_name_the_same_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Code in this process takes storage_settings(), a child process environment(): a run's
    # controller and its workers must meet in the same account.
    with azurite(tmp_path) as instance:
        for name in list(os.environ):
            if name.startswith("BATCHCTL_"):
                monkeypatch.delenv(name)
        for name, value in instance.environment().items():
            monkeypatch.setenv(name, value)
        settings = instance.storage_settings()
        assert StorageSettings() == settings
        store = BlobStore(settings)
        store.ensure_containers()
        store.upload_bytes(settings.media_container, "reached.txt", b"here")
        assert store.download_bytes(settings.media_container, "reached.txt") == b"here"


def test_azurite_dies_with_a_killed_parent(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from batchctl.local.azurite import start_azurite
        instance = start_azurite(workdir=Path({str(tmp_path)!r}))
        print(instance.process.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)  # no atexit, no finally: only PDEATHSIG can help
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid)


def _azurite_pids(persist_dir: Path) -> list[int]:
    """The keeper's and Azurite's processes: their command lines name the persist folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(persist_dir.resolve()) in command and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("discard", [False, True])
def test_a_persisted_azurite_is_saved_unless_its_storage_is_discarded(
    tmp_path: Path, discard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's end saves its storage for a resume (the keeper's SIGTERM, exit 0), or, when
    the run is done with it, kills it at once (SIGKILL: no save written only to be deleted)."""
    from batchctl.local import azurite as azurite_module
    from batchctl.local.session import StorageEnd, local_storage

    monkeypatch.delenv("BATCHCTL_BLOB_URL", raising=False)
    started: list[azurite_module.Azurite] = []
    real_start = azurite_module.start_azurite

    def start(**kwargs: Any) -> azurite_module.Azurite:
        started.append(real_start(**kwargs))
        return started[-1]

    monkeypatch.setattr(azurite_module, "start_azurite", start)
    persist = tmp_path / "storage"
    end = StorageEnd()
    with local_storage(persist, end=end) as settings:
        ports = [started[0].blob_port, started[0].queue_port, started[0].table_port]
        store = BlobStore(settings)
        store.ensure_containers("runs")
        store.upload_bytes("runs", "kept.txt", b"x")
        store.close()
        assert len(_azurite_pids(persist)) == 2  # the keeper and Azurite
        end.discard = discard
    keeper = started[0].process
    assert keeper.returncode == (-signal.SIGKILL if discard else 0)
    # Azurite went with its keeper either way; its ports are closed once the session's block
    # ends (a discarded one's folder is deleted next: nothing may still write there).
    assert not any(_port_open(port) for port in ports)
    deadline = time.monotonic() + 10
    while _azurite_pids(persist) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _azurite_pids(persist) == []
