"""`batchctl watch`: the app's own blob trigger starts a run per new manifest, and the command
follows each through the app's HTTP API to its report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from batchctl import cli
from batchctl.local.azurite import Azurite
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore
from tests import worker_tasks

pytestmark = [pytest.mark.azurite, pytest.mark.slow]


def test_watch_once_runs_each_new_manifest_through_the_app(
    tmp_path: Path,
    azurite: Azurite,
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    # A container of this test's own: the session's Azurite holds other tests' manifests,
    # and the trigger starts a run for every manifest it finds.
    monkeypatch.setenv("BATCHCTL_MANIFESTS_CONTAINER", "manifests-watch")
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.05")
    caplog.set_level(logging.DEBUG, logger="batchctl.serve")
    media = tmp_path / "media"
    media.mkdir()
    for index in range(3):
        (media / f"w{index}.mp4").write_bytes(f"watched {index}".encode())
    settings = storage_settings.model_copy(update={"manifests_container": "manifests-watch"})
    store = BlobStore(settings)
    store.ensure_containers()
    rows = "id,video\n" + "".join(f"w-{i},w{i}.mp4\n" for i in range(3))
    store.upload_bytes(settings.manifests_container, "watched/batch.csv", rows)

    code = cli.main(
        [
            "watch", "--once", "--json", "--media-root", str(media), "--nodes", "1",
            "--out", str(tmp_path / "out"), "--task", "tests.worker_tasks:QuickTask",
            "--poll", "0.3", "--idle-exit", "0.5",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (line,) = [json.loads(text) for text in captured.out.splitlines() if text.startswith("{")]
    assert line["manifest"] == f"{settings.manifests_container}/watched/batch.csv"
    assert (line["phase"], line["succeeded"], line["failed"]) == ("completed", 3, 0)
    report = json.loads(Path(line["report"]).read_text())
    assert report["succeeded"] == 3
    # Started by the trigger inside the app, followed through the app's API.
    polled = [
        r.getMessage()
        for r in caplog.records
        if r.name == "batchctl.serve" and f"GET /api/runs/{line['run_id']} " in r.getMessage()
    ]
    assert polled
    # A second look finds nothing new: the same manifest version is not run twice.
    again = [
        "watch",
        "--once",
        "--json",
        "--media-root",
        str(media),
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main([*again, "--task", "tests.worker_tasks:QuickTask"]) == 0
    assert not [t for t in capsys.readouterr().out.splitlines() if t.startswith("{")]
