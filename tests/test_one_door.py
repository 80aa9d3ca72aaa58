"""One door: `batchctl run` reaches its run through the app's HTTP API, as `submit` does.

The local app (batchctl.local.app) serves the same handlers and the same HTTP server as
`batchctl serve` on a loopback port; the run is started with `POST /api/runs`, followed with
`GET /api/runs/{id}` and cancelled (first Ctrl-C) with `POST /api/runs/{id}/cancel`. The
server's own request log is the witness.
"""

from __future__ import annotations

import _thread
import csv
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from batchctl.contracts import RunOptions, RunPhase
from batchctl.local.session import run_locally
from tests import worker_tasks

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

REQUEST_LINE = re.compile(r'"(GET|POST|DELETE) (\S+) HTTP/1\.1" (\d{3})')


def _manifest(folder: Path, count: int) -> Path:
    (folder / "media").mkdir()
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(count):
            (folder / "media" / f"v{index}.mp4").write_bytes(f"video {index}".encode())
            writer.writerow([f"item-{index}", f"media/v{index}.mp4"])
    return manifest


def _requests(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int]]:
    found = []
    for record in caplog.records:
        if record.name == "batchctl.serve":
            match = REQUEST_LINE.search(record.getMessage())
            if match:
                found.append((match[1], match[2].split("?")[0], int(match[3])))
    return found


def test_a_local_run_is_started_followed_and_reported_through_the_http_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchctl.serve")
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.05")
    manifest = _manifest(tmp_path, 3)
    seen: list[dict[str, object]] = []
    result = run_locally(
        manifest,
        RunOptions(task="tests.worker_tasks:QuickTask", poll_interval_s=0.3, idle_exit_s=0.5),
        run_id="one-door",
        nodes=1,
        out_dir=tmp_path / "out",
        on_status=seen.append,
    )
    assert result.report.phase is RunPhase.COMPLETED
    assert result.report.succeeded == 3
    requests = _requests(caplog)
    assert requests[0] == ("POST", "/api/runs", 202), requests[:3]
    polls = [r for r in requests if r[:2] == ("GET", "/api/runs/one-door")]
    assert polls and all(status == 200 for _, _, status in polls)
    # What the live view saw is the app's run-status view, ending with the run's end.
    assert seen and seen[-1]["runtime_status"] == "Completed"
    assert seen[-1]["succeeded"] == 3
    # The report names the manifest as the user gave it (it travelled in the start body).
    assert result.report.manifest_label == str(manifest.resolve())


def test_the_first_ctrl_c_cancels_through_the_cancel_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchctl.serve")
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "2")
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    monkeypatch.setenv(worker_tasks.MARKER_DIR_ENV, str(marker_dir))
    manifest = _manifest(tmp_path, 12)

    def interrupt_once_working() -> None:
        deadline = time.monotonic() + 60
        while not list(marker_dir.glob("*.started.*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()  # as Ctrl-C: KeyboardInterrupt in the main thread

    threading.Thread(target=interrupt_once_working, daemon=True).start()
    result = run_locally(
        manifest,
        RunOptions(task="tests.worker_tasks:QuickTask", poll_interval_s=0.3, idle_exit_s=0.5),
        run_id="ctrl-c",
        nodes=1,
        out_dir=tmp_path / "out",
    )
    assert result.report.phase is RunPhase.CANCELLED
    assert result.report.succeeded + result.report.not_run == 12
    assert result.report.not_run > 0
    assert ("POST", "/api/runs/ctrl-c/cancel", 202) in _requests(caplog)
