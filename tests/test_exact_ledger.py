"""Every run ends with an exact ledger, on every terminal path, with the real parts.

Over the error budget, at the deadline, and on a Ctrl-C delivered to the whole process
group of a `batchctl run` in a terminal: every valid row ends with exactly one terminal
record (succeeded, failed with its error class, or not_run with the reason), the report's
counts add up to the manifest's valid rows, and nothing is left running.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchctl.contracts import ErrorBudget, ItemStatus, NotRunReason, RunOptions, RunPhase
from batchctl.local.azurite import Azurite
from batchctl.local.session import run_locally
from batchctl.settings import ENV_PREFIX, StorageSettings
from batchctl.storage import Ledger
from tests import worker_tasks
from tests.test_faults import worker_pids

pytestmark = [pytest.mark.azurite, pytest.mark.slow]


def write_manifest(folder: Path, ids: list[str]) -> Path:
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for item_id in ids:
            (media / f"{item_id}.mp4").write_bytes(item_id.encode())
            writer.writerow([item_id, f"media/{item_id}.mp4"])
        writer.writerow(["outside", "../escape.mp4"])  # one invalid row: not in the ledger
    return manifest


@pytest.fixture
def local_env(azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {**azurite.environment(), worker_tasks.MARKER_DIR_ENV: str(tmp_path / "markers")}
    (tmp_path / "markers").mkdir()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def assert_exact(
    storage_settings: StorageSettings, run_id: str, ids: list[str]
) -> dict[ItemStatus, int]:
    results = list(Ledger(storage_settings).iter_results(run_id))
    assert sorted(r.item_id for r in results) == sorted(ids), "one record per valid item"
    tally = {status: sum(1 for r in results if r.status is status) for status in ItemStatus}
    for result in results:
        if result.status is not ItemStatus.SUCCEEDED:
            assert result.error is not None and result.error.error_class
    return tally


def test_over_budget_every_item_has_one_record_and_the_counts_add_up(
    tmp_path: Path,
    local_env: dict[str, str],
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.5")
    ids = [f"bad-{i}" for i in range(4)] + [f"good-{i}" for i in range(16)]
    options = RunOptions(
        task="tests.worker_tasks:QuickTaskFailingBad",
        poll_interval_s=0.3,
        idle_exit_s=0.5,
        error_budget=ErrorBudget(max_failed=1),
        visibility_timeout_s=10,
        # One item a message, as a run on many nodes packs 20 items: a local run packs them
        # 5 a message for its one node, and records land a message at a time, so the poll
        # saw the second failure only after every message was done and nothing was left to
        # stop. This test is about what the stop leaves, so it must come early.
        mini_batch_size=1,
    )
    run_id = "ledger-budget"
    result = run_locally(
        write_manifest(tmp_path, ids), options, run_id=run_id, nodes=1, out_dir=tmp_path / "out"
    )
    report = result.report
    assert report.phase is RunPhase.FAILED and "error budget" in report.message
    tally = assert_exact(storage_settings, run_id, ids)
    assert tally[ItemStatus.FAILED] >= 2 and tally[ItemStatus.NOT_RUN] >= 1
    assert (report.succeeded, report.failed, report.not_run) == (
        tally[ItemStatus.SUCCEEDED],
        tally[ItemStatus.FAILED],
        tally[ItemStatus.NOT_RUN],
    )
    assert report.succeeded + report.failed + report.not_run == report.total == len(ids)
    assert report.invalid == 1
    assert report.not_run_by_reason == {NotRunReason.OVER_BUDGET.value: report.not_run}
    assert worker_pids(run_id) == []


def test_at_the_deadline_the_rest_is_recorded_as_not_run(
    tmp_path: Path,
    local_env: dict[str, str],
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "1.0")
    # Three items at once, as on Azure: 30 items of 1 s are 10 s of work, past the 6 s
    # deadline (a local node's own default follows the cores: 8 here finished them in time).
    monkeypatch.setenv(f"{ENV_PREFIX}CONCURRENCY", "3")
    ids = [f"item-{i}" for i in range(30)]
    options = RunOptions(
        task="tests.worker_tasks:QuickTask",
        poll_interval_s=0.3,
        idle_exit_s=0.5,
        deadline_s=6,
        visibility_timeout_s=10,
    )
    run_id = "ledger-deadline"
    result = run_locally(
        write_manifest(tmp_path, ids), options, run_id=run_id, nodes=1, out_dir=tmp_path / "out"
    )
    report = result.report
    assert report.phase is RunPhase.FAILED and "deadline" in report.message
    tally = assert_exact(storage_settings, run_id, ids)
    assert tally[ItemStatus.FAILED] == 0 and tally[ItemStatus.NOT_RUN] >= 1
    assert report.succeeded + report.failed + report.not_run == report.total == len(ids)
    assert report.not_run_by_reason == {NotRunReason.DEADLINE.value: report.not_run}
    assert worker_pids(run_id) == []


def test_ctrl_c_to_the_whole_process_group_cancels_and_records_nothing_wrongly(
    tmp_path: Path,
    local_env: dict[str, str],
    storage_settings: StorageSettings,
    repo_root: Path,
) -> None:
    # A terminal's Ctrl-C is SIGINT to every process of the foreground group: the CLI, and
    # whatever shares its group. Workers and decoders must not die of it mid-item.
    ids = [f"item-{i}" for i in range(12)]
    manifest = write_manifest(tmp_path, ids)
    run_id = "ledger-sigint"
    env = {
        **os.environ,
        **local_env,
        worker_tasks.ITEM_SECONDS_ENV: "1.5",
        "PYTHONPATH": str(repo_root),
    }
    command = [
        sys.executable,
        "-m",
        "batchctl",
        "run",
        str(manifest),
        "--run-id",
        run_id,
        "--nodes",
        "2",
        "--task",
        "tests.worker_tasks:QuickTask",
        "--poll",
        "0.3",
        "--idle-exit",
        "0.5",
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    process = subprocess.Popen(
        command,
        cwd=repo_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group, as a shell gives a foreground job
    )
    markers = tmp_path / "markers"
    deadline = time.monotonic() + 120
    while not list(markers.glob("*.started.*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no item ever started"
        time.sleep(0.05)
    time.sleep(0.3)  # mid-item: every started item has about a second left
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert b"Traceback" not in stderr, stderr.decode()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["phase"] == "cancelled", stderr.decode()
    tally = assert_exact(storage_settings, run_id, ids)
    assert tally[ItemStatus.FAILED] == 0, "a Ctrl-C must never mark a good item as failed"
    assert tally[ItemStatus.NOT_RUN] >= 1
    assert worker_pids(run_id) == []
