"""A local run's monitor wait ends when its last record lands (LocalDriver's ``wait_over``,
asked by LocalDurableClient): not at the poll the monitor planned, up to an interval later."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batchctl.compute.local import assignment, worker_concurrency
from batchctl.contracts import (
    ItemResult,
    ItemStatus,
    RunOptions,
    RunPhase,
    RunProgress,
    RunRequest,
    RunState,
    StageTimings,
)
from batchctl.local.app import pause_until
from batchctl.local.driver import LocalDriver
from batchctl.local.server import (
    WAKE_FAST_CHECKS,
    Instance,
    LocalDurableClient,
    _progress_counts,
    local_items_held,
    wake_read_due,
)
from batchctl.packing import MAX_ITEMS_PER_MESSAGE
from batchctl.services import Services
from batchctl.settings import ENV_PREFIX, StorageSettings, WorkerSettings
from batchctl.storage import Ledger

WAIT_S = 3.0


def _one_wait(context: Any) -> Generator[Any, Any, Any]:
    began = time.monotonic()
    cancel = context.wait_for_external_event("cancel")
    timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=WAIT_S))
    winner = yield context.task_any([timer, cancel])
    if winner is not timer:
        timer.cancel()
        return {"winner": "cancel", "waited_s": time.monotonic() - began}
    return {"winner": "timer", "waited_s": time.monotonic() - began}


def test_a_timer_ends_once_the_wait_is_over() -> None:
    checks: list[float] = []
    over_at = time.monotonic() + 0.4

    def wait_over() -> bool:
        checks.append(time.monotonic())
        return time.monotonic() >= over_at

    output = LocalDriver(_one_wait, {}, wait_over=wait_over, wait_check_s=0.05).run(None)
    assert output["winner"] == "timer"
    assert 0.35 <= output["waited_s"] < 1.5, output  # not the 3 s it was set for
    assert len(checks) >= 5  # asked along the way, every wait_check_s


def test_a_timer_not_over_waits_its_time_and_a_failing_check_changes_nothing() -> None:
    def never() -> bool:
        return False

    def broken() -> bool:
        raise ConnectionError("storage went away")

    for check in (never, broken):
        output = LocalDriver(_one_wait, {}, wait_over=check, wait_check_s=0.05).run(None)
        assert output["winner"] == "timer"
        assert output["waited_s"] >= WAIT_S - 0.05, output


def test_a_cancelled_watched_timer_never_fires() -> None:
    asked_after_cancel: list[float] = []
    cancelled_at: list[float] = []

    def wait_over() -> bool:
        if cancelled_at:
            asked_after_cancel.append(time.monotonic())
        return False

    driver = LocalDriver(_one_wait, {}, wait_over=wait_over, wait_check_s=0.05)

    def cancel() -> None:
        cancelled_at.append(time.monotonic())
        driver.raise_event("cancel")

    threading.Timer(0.2, cancel).start()
    output = driver.run(None)
    assert output["winner"] == "cancel" and output["waited_s"] < 1.5, output
    time.sleep(0.3)
    # Its thread ended with the cancel: at most the check under way when it came.
    assert len(asked_after_cancel) <= 1, asked_after_cancel
    assert not [thread for thread in threading.enumerate() if thread.name == "timer"]


def test_the_held_items_and_the_status_the_check_rests_on() -> None:
    prefetch = int(WorkerSettings.model_fields["prefetch"].default)
    state = RunState(
        run_id="r1",
        request=RunRequest(run_id="r1", manifest="m.csv", options=RunOptions(mini_batch_size=6)),
    )
    assert local_items_held(state.model_dump(mode="json"), 2) == 2 * (
        worker_concurrency(2) + prefetch + 6
    )
    # Not a RunState: the widest message is assumed.
    assert local_items_held({"request": {}}, 2) == 2 * (
        worker_concurrency(2) + prefetch + MAX_ITEMS_PER_MESSAGE
    )
    progress = RunProgress(
        run_id="r1", phase=RunPhase.RUNNING, total=24, succeeded=20, failed=1, skipped=1
    )
    assert _progress_counts(progress.model_dump(mode="json")) == (24, 22)
    assert _progress_counts(None) is None
    assert _progress_counts({"phase": "nonsense"}) is None


def test_the_workers_own_concurrency_reaches_the_held_count(
    monkeypatch: pytest.MonkeyPatch, storage_settings: StorageSettings
) -> None:
    """BATCHCTL_CONCURRENCY sets what the local workers take at once (their assignment) and
    so what the early wake counts them as holding: one fact, both consumers."""
    monkeypatch.setenv(f"{ENV_PREFIX}CONCURRENCY", "13")
    given = assignment(storage_settings, "r1", "n0", RunOptions(), nodes=2)
    assert given[f"{ENV_PREFIX}CONCURRENCY"] == "13"
    prefetch = int(WorkerSettings.model_fields["prefetch"].default)
    assert local_items_held({"request": {}}, 2) == 2 * (13 + prefetch + MAX_ITEMS_PER_MESSAGE)


def test_a_stalled_tail_is_read_less_often() -> None:
    reads = [checks for checks in range(1, 61) if wake_read_due(checks)]
    assert reads == [*range(1, WAKE_FAST_CHECKS + 1), 40, 50, 60]


def test_the_follow_wakes_at_the_end_once_then_paces_itself() -> None:
    ended = threading.Event()
    pause = pause_until(ended)
    threading.Timer(0.1, ended.set).start()
    began = time.monotonic()
    pause(5.0)
    assert time.monotonic() - began < 2.0  # woken by the end, not the 5 s
    began = time.monotonic()
    pause(0.2)
    assert time.monotonic() - began >= 0.19  # a whole pause again: no busy loop
    began = time.monotonic()
    pause_until(None)(0.1)
    assert time.monotonic() - began >= 0.09


def test_a_driver_refuses_a_check_interval_that_would_spin() -> None:
    with pytest.raises(ValueError, match="wait_check_s"):
        LocalDriver(_one_wait, {}, wait_over=lambda: False, wait_check_s=0)


def test_the_wait_is_over_when_the_ledger_has_every_record(
    services: Services,
    ledger: Ledger,
    run_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against Azurite's ledger: not over while a record is missing, over once it lands, and
    the ledger not even read once the poll saw the end or while it is far off."""
    client = LocalDurableClient(services, base_url="http://127.0.0.1:0", out_dir=tmp_path)
    state = RunState(
        run_id=run_id,
        request=RunRequest(run_id=run_id, manifest="m.csv", options=RunOptions(mini_batch_size=2)),
    )
    instance = Instance(instance_id=run_id, name="run", input=None, created=datetime.now(UTC))
    instance.known_state = state.model_dump(mode="json")
    reads: list[str] = []
    counts = services.ledger.counts

    def counted(run: str) -> Any:
        reads.append(run)
        return counts(run)

    monkeypatch.setattr(services.ledger, "counts", counted)
    total = 5
    results = [
        ItemResult(
            run_id=run_id,
            item_id=f"item-{index}",
            status=ItemStatus.SUCCEEDED,
            source=f"media/{index}.mp4",
            timings=StageTimings(total_s=0.1),
        )
        for index in range(total)
    ]
    ledger.record_absent(results[:-1])

    def status(total: int, done: int) -> dict[str, Any]:
        return RunProgress(
            run_id=run_id, phase=RunPhase.RUNNING, total=total, succeeded=done, failed=0
        ).model_dump(mode="json")

    instance.custom_status = status(total, 3)
    assert not client._all_recorded(instance)  # one record short
    ledger.record_absent(results[-1:])
    assert client._all_recorded(instance)
    assert reads == [run_id, run_id]
    instance.custom_status = status(total, total)
    assert not client._all_recorded(instance)  # the poll saw the end itself: nothing to wake
    far = total + local_items_held(instance.known_state, services.settings.local_nodes)
    instance.custom_status = status(far, 0)
    assert not client._all_recorded(instance)  # far from the end
    assert reads == [run_id, run_id], "the ledger was read where it cannot be over"
