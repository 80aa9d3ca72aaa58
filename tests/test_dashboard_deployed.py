"""`batchctl dashboard` against a running app, in headless Chromium.

The app is the local one (`batchctl serve`) with a function key configured, standing in for a
deployed app: it answers only requests that carry the key. The dashboard command holds the
key (from BATCHCTL_FUNCTION_KEY, as every client command does) and serves the page on
loopback; the browser talks only to the dashboard, never to the app. The run's items sleep
a little (the fast ``QuickTask``), some fail, so the page has progress to show move and
failures to count.
"""

from __future__ import annotations

import csv
import io
import json
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from batchctl.local.azurite import free_port
from batchctl.runstatus import RunStatus
from tests.test_azdenv import make_project
from tests.test_serve import (
    REPO,
    Served,
    chromium,
    clean_env,
    http,
    not_blank,
    run_card,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

# Made up for the test: long and distinctive, so finding it anywhere is not an accident.
KEY = "dash-test-key-7f3c9a51e2b84d06a1c5f0e9d8b7a6c5"
ITEMS = 160  # about a minute at 0.3 s an item: room for slow browsers on a busy machine
BAD = 6  # items whose id starts with "bad": QuickTaskFailingBad fails them permanently


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ports = (free_port(), free_port(), free_port())
    served = start_server(
        tmp_path_factory.mktemp("app"), free_port(), ports, BATCHCTL_FUNCTION_KEY=KEY
    )
    try:
        yield served
    finally:
        stop_server(served)


def keyed(url: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, str], Any]:
    return http(method, url, body, headers={"x-functions-key": KEY})


def start_run(app: Served, run_id: str) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "video"])
    for index in range(ITEMS):
        item = f"bad-{index}" if index < BAD else f"ok-{index}"
        video = app.media / "videos" / f"{run_id}-{index}.mp4"
        video.write_bytes(f"{run_id} {index}".encode())
        writer.writerow([item, f"videos/{video.name}"])
    blob = f"_manifests/{run_id}.csv"
    app.blobs().get_blob_client("media", blob).upload_blob(out.getvalue(), overwrite=True)
    body = {
        "manifest": f"media/{blob}",
        "run_id": run_id,
        "options": {
            "task": "tests.worker_tasks:QuickTaskFailingBad",
            "poll_interval_s": 0.3,
            "idle_exit_s": 0.5,
        },
    }
    status, _, answer = keyed(f"{app.url}/api/runs", "POST", body)
    assert status == 202, answer


def app_status(app: Served, run_id: str) -> dict[str, Any]:
    status, _, body = keyed(f"{app.url}/api/runs/{run_id}")
    assert status == 200, body
    return dict(body)


@dataclass
class Dashboard:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


def dashboard_command(app: Served | None, *args: str) -> list[str]:
    where = ["--app", app.url] if app is not None else []
    return [sys.executable, "-m", "batchctl", "dashboard", *where, *args]


def dashboard_env(key: str = KEY, app: Served | None = None, **extra: str) -> dict[str, str]:
    # The report is downloaded, and the ledger read, from the app's storage with the user's
    # own access, as `batchctl report` does; the stand-in app's storage is Azurite, whose
    # table endpoint (a path on another port) is named, not derived. This checkout's code
    # wherever the command starts.
    storage = (
        {"BATCHCTL_BLOB_URL": app.ready["blob_url"], "BATCHCTL_TABLE_URL": app.ready["table_url"]}
        if app is not None
        else {}
    )
    return clean_env(
        BATCHCTL_FUNCTION_KEY=key,
        BATCHCTL_STORAGE_AUTH="azurite",
        PYTHONPATH=str(REPO),
        **storage,
        **extra,
    )


def start_dashboard(
    app: Served,
    folder: Path,
    *args: str,
    flag: bool = True,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
) -> Dashboard:
    log = folder / "dashboard.log"
    command = dashboard_command(
        app if flag else None, "--port", "0", "--interval", "0.3", "--json", *args
    )
    with log.open("wb") as errors:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=env or dashboard_env(app=app),
        )
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline() if readable else b""
    if not line:
        process.kill()
        raise AssertionError(f"the dashboard did not start:\n{log.read_text(errors='replace')}")
    ready = json.loads(line)
    assert ready["app"] == app.url
    return Dashboard(process, ready["url"], log)


def stop_dashboard(board: Dashboard) -> None:
    board.process.send_signal(signal.SIGINT)
    try:
        assert board.process.wait(20) == 0
    finally:
        if board.process.poll() is None:
            board.process.kill()


def pixels(png: Path) -> np.ndarray:
    with Image.open(png) as shot:
        return np.asarray(shot.convert("RGB")).astype(int)


def test_the_dashboard_of_an_app_shows_a_run_live_without_its_key(
    app: Served, tmp_path: Path
) -> None:
    run_id = "dash-deployed"
    start_run(app, run_id)
    wait_for(
        lambda: (s := app_status(app, run_id))["phase"] == "running" and s["succeeded"] >= 3,
        "the run to be running with items done",
    )
    board = start_dashboard(app, tmp_path)
    try:
        first_shot, second_shot = tmp_path / "first.png", tmp_path / "second.png"
        first = run_card(chromium(board.url, tmp_path / "p1", "--dump-dom"), run_id)
        chromium(
            board.url, tmp_path / "p2", f"--screenshot={first_shot}", "--window-size=1000,1100"
        )
        wait_for(
            lambda: (
                (s := app_status(app, run_id))["succeeded"] + s["failed"]
                >= int(first["data-done"]) + 10
            ),
            "ten more items done",
        )
        chromium(
            board.url, tmp_path / "p3", f"--screenshot={second_shot}", "--window-size=1000,1100"
        )
        dom = chromium(board.url, tmp_path / "p4", "--dump-dom")
        second = run_card(dom, run_id)

        # Live, and moving: two looks a few seconds apart show more items done, and the
        # two screenshots differ (the bar and the chart grew).
        assert first["data-phase"] == "running" and first["data-total"] == str(ITEMS)
        assert int(second["data-done"]) > int(first["data-done"]), (first, second)
        assert f"/{ITEMS} done" in second["text"] and "rate" in second["text"]
        not_blank(first_shot)
        assert (pixels(first_shot) != pixels(second_shot)).any(), "the page did not change"
        # The chart has its axes' labels, the phases their timeline, failures their panel.
        assert "time since the run started" in second["text"] and "items" in second["text"]
        assert "Phases" in second["text"] and "running" in second["text"]
        # Failures by class, live: read from the run's ledger with the user's access.
        assert "Failures by class" in second["text"] and "is not a video" in second["text"]
        assert run_id in dom and "batchctl dashboard: http://" in dom

        # The key is held here, not in the page: not in what the browser got or built.
        assert KEY not in dom
        status, headers, page = http("GET", board.url)
        assert status == 200 and KEY.encode() not in page
        assert headers["content-security-policy"].startswith("default-src 'none'")
        status, _, data = http("GET", f"{board.url}dashboard/data")
        assert status == 200 and KEY not in json.dumps(data)

        # The run ends: the page says so with one word and offers the report, read from the
        # run's storage; per-node and failures-by-class tables come from it.
        wait_for(
            lambda: RunStatus.model_validate(app_status(app, run_id)).finished,
            "the run to end",
            timeout=90,
        )

        def ended() -> dict[str, str] | None:
            card = run_card(chromium(board.url, tmp_path / "p5", "--dump-dom"), run_id)
            return card if "Per node" in card["text"] else None

        after = wait_for(ended, "the report's tables on the page", timeout=30)
        assert after["data-phase"] == "completed" and after["data-done"] == str(ITEMS)
        assert "completed with failures" in after["text"] and "Completed" not in after["text"]
        assert f"{ITEMS}/{ITEMS} done (100%)" in after["text"]
        assert "bad-0 is not a video" in after["text"] or "is not a video" in after["text"]
        status, headers, report = http("GET", f"{board.url}runs/{run_id}/report.html")
        assert status == 200 and b"<html" in report and KEY.encode() not in report
        assert headers["content-security-policy"].startswith("default-src 'none'")
    finally:
        stop_dashboard(board)


def test_the_dashboard_is_read_only_and_answers_only_this_machine(
    app: Served, tmp_path: Path
) -> None:
    board = start_dashboard(app, tmp_path)
    try:
        assert http("POST", f"{board.url}dashboard/data", b"{}")[0] == 405
        assert http("GET", board.url, headers={"Host": "attacker.example"})[0] == 403
        refused = http("GET", f"{board.url}dashboard/data", headers={"Origin": "http://evil"})
        assert refused[0] == 403
        assert http("GET", f"{board.url}runs/x/../../etc/passwd")[0] == 404
    finally:
        stop_dashboard(board)


def test_a_wrong_key_or_app_fails_at_start_in_one_line(app: Served) -> None:
    wrong = subprocess.run(
        dashboard_command(app, "--port", "0"),
        cwd=REPO,
        capture_output=True,
        env=dashboard_env("not-the-key"),
        check=False,
        timeout=60,
    )
    assert wrong.returncode == 3, wrong.stderr
    said = wrong.stderr.decode()
    assert "BATCHCTL_FUNCTION_KEY is wrong" in said and "not-the-key" not in said
    assert len(said.strip().splitlines()) == 1


def test_the_dashboard_finds_the_app_by_variable_and_in_azds_environment(
    app: Served, tmp_path: Path
) -> None:
    # As every app command: BATCHCTL_APP_URL, else the azd environment of the folder it runs
    # in (tests/test_azdenv.py covers the order; here the command really uses them).
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    by_variable = start_dashboard(
        app, tmp_path, flag=False, cwd=outside, env=dashboard_env(BATCHCTL_APP_URL=app.url)
    )
    stop_dashboard(by_variable)
    (tmp_path / "project").mkdir()
    project = make_project(tmp_path / "project", lines=f'BATCHCTL_APP_URL="{app.url}"\n')
    by_azd = start_dashboard(app, tmp_path, flag=False, cwd=project)
    try:
        status, _, data = http("GET", f"{by_azd.url}dashboard/data")
        assert status == 200 and data["source"] == app.url
    finally:
        stop_dashboard(by_azd)


def test_no_app_or_a_busy_port_fails_at_start_in_one_line(app: Served, tmp_path: Path) -> None:
    nowhere = subprocess.run(
        dashboard_command(None),
        cwd=tmp_path,
        capture_output=True,
        env=dashboard_env(),
        timeout=60,
        check=False,
    )
    assert nowhere.returncode == 3 and b"no app URL" in nowhere.stderr, nowhere.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = subprocess.run(
            dashboard_command(app, "--port", port),
            cwd=REPO,
            capture_output=True,
            env=dashboard_env(),
            timeout=60,
            check=False,
        )
    assert busy.returncode == 3, busy.stderr
    assert f"cannot serve on 127.0.0.1:{port}".encode() in busy.stderr
    assert len(busy.stderr.decode().strip().splitlines()) == 1


def test_a_run_that_failed_before_any_item_reads_as_such(app: Served, tmp_path: Path) -> None:
    # The manifest is missing: the run fails in validation, before it counted any item.
    run_id = "dash-no-manifest"
    body = {"manifest": "media/_manifests/missing.csv", "run_id": run_id}
    status, _, answer = keyed(f"{app.url}/api/runs", "POST", body)
    assert status == 202, answer
    ended = wait_for(
        lambda: (s := RunStatus.model_validate(app_status(app, run_id))).finished and s,
        "the run to fail",
    )
    assert ended.outcome == "failed" and ended.total == 0
    board = start_dashboard(app, tmp_path, run_id)
    try:
        dom = chromium(board.url, tmp_path / "profile", "--dump-dom")
    finally:
        stop_dashboard(board)
    card = run_card(dom, run_id)
    assert card["data-phase"] == "failed" and card["data-done"] == "0"
    text = card["text"]
    assert "failed before any item ran" in text and "0/0" not in text and "100%" not in text
    # One word: ours. Durable's runtime status shows only if the orchestration itself failed.
    assert "Completed" not in text
    assert ended.runtime_status == "Completed" or "(Durable: Failed)" in text
    assert 'class="bar bar-empty"' in dom and 'class="bar-fill' not in dom
