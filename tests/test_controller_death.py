"""A local run survives its controller: `batchctl run` SIGKILLed at seeded random moments.

The controller is a real `batchctl run` process (its private Azurite persisted in the run's
folder, worker processes as nodes) killed with SIGKILL, which runs no handler of ours. Then:
every process it started is gone within 10 s; `batchctl resume RUN_FOLDER` completes the run
with exactly one record per item, all succeeded; and the work done before the kill is kept:
an item is processed a second time only if it was in flight at the kill (at most the nodes'
concurrency), counted with one marker file per processing start.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchctl.local import runfolder
from batchctl.local.session import claim_run_folder
from batchctl.packing import items_per_message
from node_image.worker.config import WorkerConfig
from tests import worker_tasks

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ITEMS = 24
NODES = 2
CONCURRENCY = 3  # items at once, pinned (BATCHCTL_CONCURRENCY): a local node's own is 4 a core
PREFETCH = WorkerConfig(run_id="-").prefetch
# Items a message: a local run packs them for its nodes, and a node records a message's items
# together, so a kill redoes every item of the messages a node holds.
MINI_BATCH = items_per_message(ITEMS, NODES)
# The most items nodes hold at the kill (received, not yet recorded): their slots and
# prefetch, filled a whole message at a time.
HELD = NODES * (CONCURRENCY + PREFETCH + MINI_BATCH - 1)
ITEM_S = 1.0
GONE_WITHIN_S = 10.0
TASK = "tests.worker_tasks:QuickTaskCountingStarts"


def _environment(marker_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCTL_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            worker_tasks.MARKER_DIR_ENV: str(marker_dir),
            worker_tasks.ITEM_SECONDS_ENV: str(ITEM_S),
            "BATCHCTL_CONCURRENCY": str(CONCURRENCY),
        }
    )
    return env


def _batchctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchctl", *args]


def _processes_of(run_dir: Path, run_id: str) -> list[int]:
    """Live processes the run's controller started: workers (their environment names the
    run) and its Azurite (its command line names the run's storage folder)."""
    storage = str(runfolder.storage_dir(run_dir).resolve()).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if f"BATCHCTL_RUN_ID={run_id}".encode() in environ or storage in cmdline:
            found.append(int(entry.name))
    return found


def _describe(pids: list[int]) -> list[str]:
    """Each pid's state and command line, for a failure message."""
    described = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
            described.append(f"{pid} {state} {cmdline.decode(errors='replace')}")
        except OSError:
            described.append(f"{pid} (gone)")
    return described


def _starts(marker_dir: Path) -> Counter[str]:
    """Processing starts per item (one marker each)."""
    return Counter(path.name.split(".run.")[0] for path in marker_dir.glob("*.run.*"))


def _write_manifest(folder: Path) -> Path:
    (folder / "media").mkdir()
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(ITEMS):
            (folder / "media" / f"v{index}.mp4").write_bytes(f"video {index}".encode())
            writer.writerow([f"item-{index}", f"media/v{index}.mp4"])
    return manifest


@pytest.mark.parametrize("seed", [11, 23, 37])
def test_a_killed_controller_leaves_nothing_running_and_resume_completes_the_run(
    seed: int, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    manifest = _write_manifest(tmp_path)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    out = tmp_path / "out"
    run_id = f"killed-{seed}"
    run_dir = out / run_id
    env = _environment(marker_dir)
    # The moment: before any item (starting up, validating, enqueueing) or while items run.
    before_items = rng.random() < 0.3
    wait_starts = 0 if before_items else rng.randint(1, ITEMS - 2 * NODES * CONCURRENCY)
    wait_s = rng.uniform(1.0, 3.0) if before_items else rng.uniform(0.0, 1.0)
    controller = subprocess.Popen(
        _batchctl(
            "run", str(manifest), "--nodes", str(NODES), "--task", TASK,
            "--out", str(out), "--run-id", run_id, "--poll", "0.5", "--idle-exit", "2",
        ),
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while sum(_starts(marker_dir).values()) < wait_starts and time.monotonic() < deadline:
        assert controller.poll() is None, "the run ended before the kill"
        time.sleep(0.05)
    time.sleep(wait_s)
    assert controller.poll() is None, "the run ended before the kill"
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    killed_at = time.monotonic()
    started_before_kill = set(_starts(marker_dir))

    while _processes_of(run_dir, run_id) and time.monotonic() - killed_at < GONE_WITHIN_S + 5:
        time.sleep(0.2)
    gone_after_s = time.monotonic() - killed_at
    left = _processes_of(run_dir, run_id)
    assert left == [], f"processes outlived their controller: {_describe(left)}"
    assert gone_after_s <= GONE_WITHIN_S, f"processes took {gone_after_s:.1f} s to stop"

    if runfolder.read_record(run_dir) is None:
        # Killed before the run's first record (Azurite starting, the media uploading):
        # nothing was run, and the same run id starts afresh in the same folder.
        assert started_before_kill == set()
        command = _batchctl(
            "run", str(manifest), "--nodes", str(NODES), "--task", TASK, "--out", str(out),
            "--run-id", run_id, "--poll", "0.5", "--idle-exit", "2", "--json",
        )  # fmt: skip
    else:
        # A new run in the same folder under the dead run's id is refused, pointing at resume.
        refused = subprocess.run(
            _batchctl("run", str(manifest), "--out", str(out), "--run-id", run_id, "--task", TASK),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 3, refused.stderr
        assert f"batchctl resume {run_dir}" in refused.stderr
        command = _batchctl("resume", str(run_dir), "--json")
    resumed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    print(f"seed {seed}: killed after {sum(_starts(marker_dir).values())} starts? "
          f"gone after {gone_after_s:.1f} s", resumed.stderr[-600:])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (summary["run_id"], summary["phase"]) == (run_id, "completed")
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (ITEMS, ITEMS, 0)

    records = [
        json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines() if line
    ]
    assert sorted(r["item_id"] for r in records) == sorted(f"item-{i}" for i in range(ITEMS))
    assert {r["status"] for r in records} == {"succeeded"}
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["total"], report["succeeded"], report["not_run"]) == (ITEMS, ITEMS, 0)

    # The work before the kill is kept: only items in flight at the kill ran twice.
    starts = _starts(marker_dir)
    assert set(starts) == {f"item-{i}" for i in range(ITEMS)}
    twice = {item for item, count in starts.items() if count > 1}
    assert twice <= started_before_kill
    assert len(twice) <= HELD, twice
    assert max(starts.values()) <= 2
    # Finished: the record says so and the run's storage copy is gone.
    record = runfolder.read_record(run_dir)
    assert record is not None and record.finished_at is not None
    assert not runfolder.storage_dir(run_dir).exists()


def _dead_record(run_id: str, started: datetime) -> runfolder.ControllerRecord:
    """A record whose controller is certainly gone: a pid that ended, on this machine."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    record = runfolder.new_record(
        run_id=run_id,
        nodes=1,
        media_root=Path("/"),
        storage=runfolder.PRIVATE_STORAGE,
        ports=None,
        state={},
        now=started,
    )
    return record.model_copy(update={"pid": ended.pid})


def test_a_new_run_names_the_runs_that_died_in_its_folder_and_refuses_their_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    runfolder.write_record(tmp_path / "dead-one", _dead_record("dead-one", started))
    finished = _dead_record("done-one", started + timedelta(hours=1))
    runfolder.write_record(
        tmp_path / "done-one", finished.model_copy(update={"finished_at": started})
    )
    alive = runfolder.new_record(
        run_id="alive-one",
        nodes=1,
        media_root=Path("/"),
        storage=runfolder.PRIVATE_STORAGE,
        ports=None,
        state={},
    )
    runfolder.write_record(tmp_path / "alive-one", alive)

    claim_run_folder(tmp_path, "fresh-one")
    said = capsys.readouterr().err
    assert "run dead-one did not finish" in said
    assert f"batchctl resume {tmp_path / 'dead-one'}" in said
    assert "done-one" not in said and "alive-one" not in said

    with pytest.raises(runfolder.RunFolderError, match="batchctl resume"):
        claim_run_folder(tmp_path, "dead-one")
    with pytest.raises(runfolder.RunFolderError, match="finished"):
        claim_run_folder(tmp_path, "done-one")
    with pytest.raises(runfolder.RunFolderError, match="is running"):
        claim_run_folder(tmp_path, "alive-one")


def test_a_reused_pid_is_not_taken_for_the_controller(tmp_path: Path) -> None:
    record = runfolder.new_record(
        run_id="r",
        nodes=1,
        media_root=Path("/"),
        storage=runfolder.PRIVATE_STORAGE,
        ports=None,
        state={},
    )
    assert runfolder.controller_alive(record)
    assert record.pid_start is not None
    # Same pid, another start time: another process that got the dead controller's pid.
    assert not runfolder.controller_alive(record.model_copy(update={"pid_start": 1}))
    assert not runfolder.controller_alive(record.model_copy(update={"boot_id": "another-boot"}))


def test_resume_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    from batchctl.local.resume import check_resumable

    with pytest.raises(runfolder.RunFolderError, match=r"no controller\.json"):
        check_resumable(tmp_path)
    dead = _dead_record("gone", datetime.now(UTC))
    runfolder.write_record(tmp_path, dead)
    with pytest.raises(runfolder.RunFolderError, match="no storage left"):
        check_resumable(tmp_path)
    runfolder.write_record(tmp_path, dead.model_copy(update={"finished_at": datetime.now(UTC)}))
    with pytest.raises(runfolder.RunFolderError, match="finished"):
        check_resumable(tmp_path)
    (tmp_path / runfolder.RECORD_NAME).write_text("{not json")
    with pytest.raises(runfolder.RunFolderError, match="not a controller record"):
        check_resumable(tmp_path)
