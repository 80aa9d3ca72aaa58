"""Faults in their real form: worker processes SIGKILLed at seeded random moments of a run.

A low-priority node vanishes without warning: its process dies with every message it holds
still hidden for the visibility timeout. These tests run the whole product locally (Azurite,
the real orchestrator through the local driver, worker processes as nodes) and SIGKILL
workers early, while one holds every message of the run, and near the end, with a short and
a long idle exit. Every valid item must end succeeded exactly once, the run must complete,
and the recovery (from the kill to the last item's record) must stay within the visibility
timeout plus a stated margin, never a wall-clock guess.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchctl.contracts import ErrorBudget, ItemStatus, RunOptions, RunPhase
from batchctl.local.azurite import Azurite
from batchctl.local.session import run_locally
from batchctl.settings import ENV_PREFIX, StorageSettings
from batchctl.storage import Ledger, RunQueues
from tests import worker_tasks

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

VISIBILITY_S = 10  # the smallest visibility timeout a run accepts
# What recovery may take beyond the visibility timeout: a poll (0.5 s) to see the fleet
# ended, a new worker process starting on a busy 2-core machine (a few seconds), the
# remaining items (under 2 s of work), and Azurite's latency. Generous, and stated.
RECOVERY_MARGIN_S = 20.0
ITEM_S = 0.4


def worker_pids(run_id: str) -> list[int]:
    """Live worker processes of the run (their environment names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            f"BATCHCTL_RUN_ID={run_id}".encode() in environ
            and b"worker" in cmdline
            and state != "Z"
        ):
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class Killer:
    """Kills workers of a run when ``moment`` says so, once, at a seeded random delay."""

    run_id: str
    moment: Callable[[], bool]
    victims: Callable[[list[int]], list[int]]
    rng: random.Random
    killed: list[int] = field(default_factory=list)
    killed_at: datetime | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._watch, name="killer", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.moment():
                time.sleep(self.rng.uniform(0.0, 0.15))
                pids = worker_pids(self.run_id)
                if not pids:
                    continue
                for pid in self.victims(pids):
                    try:
                        os.kill(pid, signal.SIGKILL)  # no handler runs, no message released
                    except ProcessLookupError:
                        continue
                    self.killed.append(pid)
                if self.killed:
                    self.killed_at = datetime.now(UTC)
                    return
            time.sleep(0.02)


def started_markers(marker_dir: Path) -> int:
    return len(list(marker_dir.glob("*.started.*")))


@pytest.mark.parametrize("idle_exit_s", [0.5, 30.0], ids=["short-idle-exit", "long-idle-exit"])
@pytest.mark.parametrize("moment", ["early", "holding-every-message", "near-the-end"])
def test_killed_workers_lose_nothing_and_the_run_recovers_in_bounded_time(
    moment: str,
    idle_exit_s: float,
    tmp_path: Path,
    azurite: Azurite,
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # crc32, not hash(): Python salts str hashes per process, so hash() gave each run of
    # the suite other moments, and a seed named by a failure could not be replayed.
    seed = zlib.crc32(f"{moment}/{idle_exit_s}".encode()) % 1000
    rng = random.Random(seed)
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    monkeypatch.setenv(worker_tasks.MARKER_DIR_ENV, str(marker_dir))
    # Three items at once a node, as on Azure: the moments below (one node holding every
    # message, a quarter of the run left) depend on it, and a local node's own default
    # follows the machine's cores (it took all 18 items at once on 2 cores).
    monkeypatch.setenv(f"{ENV_PREFIX}CONCURRENCY", "3")
    # One node holding every message: 4 items in 2 messages, within one worker's intake
    # (concurrency 3 + prefetch 1 items), slow enough (1 s each) to be caught holding them.
    # Otherwise 3 nodes share 18 items.
    holding = moment == "holding-every-message"
    items, nodes, mini_batch = (4, 1, 2) if holding else (18, 3, 1)
    # Near the end, 1 s items too: with the run's end noticed within a closing poll, 0.4 s
    # items left the last quarter finished and its workers stopped before the moment was
    # seen ("the near-the-end moment never came", once in a CI run).
    slow = holding or moment == "near-the-end"
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, str(1.0 if slow else ITEM_S))
    manifest = tmp_path / "manifest.csv"
    (tmp_path / "media").mkdir()
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(items):
            path = tmp_path / "media" / f"v{index}.mp4"
            path.write_bytes(f"video {index}".encode())
            writer.writerow([f"item-{index}", f"media/{path.name}"])
    run_id = f"fault-{moment.split('-')[0]}-{int(idle_exit_s)}-{seed}"
    ledger = Ledger(storage_settings)
    queues = RunQueues(storage_settings, run_id)

    def recorded() -> int:
        try:
            return ledger.counts(run_id).done
        except Exception:
            return 0

    def all_messages_held() -> bool:
        # Nothing visible in the queue, nothing recorded yet, and the worker has started:
        # every message of the run is hidden in the one worker's hands.
        try:
            return (
                started_markers(marker_dir) >= 1
                and not queues.peek_all("input")
                and recorded() == 0
            )
        except Exception:
            return False

    moments: dict[str, Callable[[], bool]] = {
        "early": lambda: started_markers(marker_dir) >= 1,
        "holding-every-message": all_messages_held,
        "near-the-end": lambda: recorded() >= int(items * 0.75),
    }
    killer = Killer(
        run_id,
        moments[moment],
        # Near the end, two of three nodes vanish; otherwise one node (of one or of three).
        lambda pids: rng.sample(pids, min(len(pids), 2 if moment == "near-the-end" else 1)),
        rng,
    )
    killer.start()
    options = RunOptions(
        task="tests.worker_tasks:QuickTask",
        poll_interval_s=0.5,
        idle_exit_s=idle_exit_s,
        visibility_timeout_s=VISIBILITY_S,
        mini_batch_size=mini_batch,
        max_attempts=3,
        error_budget=ErrorBudget(max_failed=0),
    )
    try:
        result = run_locally(
            manifest, options, run_id=run_id, nodes=nodes, out_dir=tmp_path / "out"
        )
    finally:
        killer.stop()

    assert killer.killed, f"the {moment} moment never came: nothing was killed"
    report = result.report
    assert report.phase is RunPhase.COMPLETED, report.message
    assert (report.total, report.succeeded, report.failed, report.not_run) == (items, items, 0, 0)
    # Exactly one terminal record per item, every one a success.
    results = list(ledger.iter_results(run_id))
    assert sorted(r.item_id for r in results) == sorted(f"item-{i}" for i in range(items))
    assert {r.status for r in results} == {ItemStatus.SUCCEEDED}
    # Recovery: from the kill to the last record, within the visibility timeout + margin.
    assert killer.killed_at is not None
    last = max(r.finished_at for r in results if r.finished_at is not None)
    recovery_s = (last - killer.killed_at).total_seconds()
    print(f"{moment}, idle exit {idle_exit_s}: {len(killer.killed)} killed, {recovery_s:.1f} s")
    assert recovery_s <= VISIBILITY_S + RECOVERY_MARGIN_S, recovery_s
    # Nothing left running.
    assert worker_pids(run_id) == []
