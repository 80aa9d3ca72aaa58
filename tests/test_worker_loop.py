"""The consumer loop: its policy over an in-memory stub, and the real thing over Azurite.

The stub tests drive the real :class:`Worker` with scripted tasks to pin down each rule
(order of effects, retries, poison, timeouts, shutdown, duplicates). The Azurite tests run
real ``python -m node_image.worker`` subprocesses on videos encoded by the tests: every video
ends as the right success or permanent failure, and a worker killed mid-item, a duplicated
message, a poison item and a SIGTERM all end with exactly one terminal record per item.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from azure.storage.queue import QueueServiceClient

from batchctl.contracts import ItemResult, ItemStatus, ManifestItem, RunOptions, WorkItem
from batchctl.local.azurite import Azurite
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger, QueueMessage, RunQueues, queue_names
from batchctl.storage.clients import sync_credential
from batchctl.storage.items import Downloaded
from node_image.worker.errors import ErrorInfo, ItemTimeoutError, PermanentError, classify
from node_image.worker.jobs import ItemJob
from node_image.worker.leases import Leases
from node_image.worker.loop import (
    EXIT_IDLE,
    EXIT_STOPPED,
    Worker,
    WorkerConfig,
    check_output_name,
    decide,
    retry_delay,
    utc_now,
)
from node_image.worker.metrics import NodeMetrics
from node_image.worker.policy import (
    ABANDON_AFTER_S,
    after_failure,
    empty_poll_delay,
    intake_limit,
    messages_wanted,
    overdue,
    settle,
)
from node_image.worker.recording import BatchLedger
from node_image.worker.tasks import ItemInput, ItemOutput, Task, TaskSetup, create_task
from tests import worker_tasks
from tests.videos import BAD, CASES, GOOD, VideoLibrary, video_library

# Keras's own TensorFlow backend trips NumPy 2's copy-keyword notice when saving models.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RUN = "stubrun"


# =================================================================================================
# In-memory stubs
# =================================================================================================
class StubNotFoundError(Exception):
    status_code = 404


@dataclass
class _Stored:
    id: str
    content: str
    visible_at: float
    dequeue_count: int = 0
    receipt: str = ""


class StubQueue:
    """Azure-queue semantics in memory: visibility, receipts, dequeue counts."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        self.events = events
        self.messages: dict[str, _Stored] = {}
        self.visibility_updates: list[int] = []
        # The thread of every call the worker made: the loop thread alone may use the queue.
        self.threads: set[str] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def put(self, content: str, *, dequeue_count: int = 0) -> str:
        with self._lock:
            message_id = f"m{next(self._ids)}"
            self.messages[message_id] = _Stored(message_id, content, 0.0, dequeue_count)
            return message_id

    def visible(self) -> list[_Stored]:
        now = time.monotonic()
        return [m for m in self.messages.values() if m.visible_at <= now]

    def _called(self) -> None:
        self.threads.add(threading.current_thread().name)

    def receive(self, max_messages: int, *, visibility_timeout: int) -> list[QueueMessage]:
        self._called()
        with self._lock:
            out = []
            for stored in self.visible()[:max_messages]:
                stored.dequeue_count += 1
                stored.receipt = f"r{next(self._ids)}"
                stored.visible_at = time.monotonic() + visibility_timeout
                out.append(
                    QueueMessage(stored.id, stored.receipt, stored.dequeue_count, stored.content)
                )
            return out

    def _check(self, message: QueueMessage) -> _Stored:
        stored = self.messages.get(message.id)
        if stored is None or stored.receipt != message.pop_receipt:
            raise StubNotFoundError(
                f"message {message.id} / receipt {message.pop_receipt} not found"
            )
        return stored

    def update_visibility(self, message: QueueMessage, visibility_timeout: int) -> QueueMessage:
        self._called()
        with self._lock:
            stored = self._check(message)
            stored.receipt = f"r{next(self._ids)}"
            stored.visible_at = time.monotonic() + visibility_timeout
            self.visibility_updates.append(visibility_timeout)
            self.events.append(("visibility", f"{message.id}:{visibility_timeout}"))
            return QueueMessage(message.id, stored.receipt, message.dequeue_count, message.content)

    def delete_message(self, message: QueueMessage) -> None:
        self._called()
        with self._lock:
            self._check(message)
            del self.messages[message.id]
            self.events.append(("delete", message.id))

    def approximate_count(self) -> int:
        self._called()
        with self._lock:
            return len(self.messages)  # hidden messages included, as in Azure


class StubLedger:
    def __init__(self, events: list[tuple[str, str]]) -> None:
        self.events = events
        self.records: dict[tuple[str, str], ItemResult] = {}
        self._lock = threading.Lock()

    def has_record(self, run_id: str, item_id: str) -> bool:
        return (run_id, item_id) in self.records

    def record(self, result: ItemResult) -> bool:
        with self._lock:
            key = (result.run_id, result.item_id)
            if key in self.records:
                return False
            self.records[key] = result
            self.events.append(("record", result.item_id))
            return True


class StubStorage:
    def __init__(self, events: list[tuple[str, str]]) -> None:
        self.events = events
        self.sources: dict[str, bytes] = {}
        self.outputs: dict[str, bytes] = {}

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded:
        data = self.sources[source]
        target.write_bytes(data)
        # A version as blob storage gives one: what the bytes are (a changed source differs).
        return Downloaded(len(data), f"v-{hashlib.sha256(data).hexdigest()[:12]}")

    def write_output(self, name: str, data: bytes, content_type: str) -> None:
        self.outputs[name] = data
        self.events.append(("output", name))


class ScriptedTask:
    """Does what the item's manifest metadata says: ok, permanent, retryable, hang, badname."""

    thread_safe: ClassVar[bool] = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.started = threading.Event()

    def setup(self, setup: TaskSetup) -> None:
        pass

    def process(self, item: ItemInput) -> ItemOutput:
        self.calls.append((item.item.item_id, item.attempt))
        self.started.set()
        behaviour = item.item.metadata.get("do", "ok")
        if behaviour == "permanent":
            raise PermanentError("this video is hopeless")
        if behaviour == "retryable":
            raise ConnectionError("network blip")
        if behaviour == "hang":
            item.cancel.wait(30)
            item.cancel.raise_if_cancelled()
        if behaviour == "sleep":
            time.sleep(float(item.item.metadata.get("seconds", "0.3")))
        if behaviour == "badname":
            return ItemOutput(files={"../escape.bin": b"x"})
        return ItemOutput(files={"out.bin": item.path.read_bytes()}, metadata={"frames": 1})

    def close(self) -> None:
        pass


@dataclass
class Harness:
    worker: Worker
    queue: StubQueue
    ledger: StubLedger
    storage: StubStorage
    task: ScriptedTask
    events: list[tuple[str, str]]

    spec_options: dict[str, Any] = field(default_factory=dict)

    def send(self, *items: ManifestItem, dequeue_count: int = 0, **options: Any) -> str:
        """Queue a message of ``items``; ``options`` are the job's (its NodeSpec), as a
        backend would have set them when it started the node: messages carry items only."""
        if options:
            self.spec_options.update(options)
            spec = RunOptions(**self.spec_options).node_spec()
            self.worker.config = dataclasses.replace(self.worker.config, spec=spec)
        work = WorkItem(run_id=RUN, items=list(items))
        return self.queue.put(work.model_dump_json(), dequeue_count=dequeue_count)

    def run(self, timeout: float = 20) -> int:
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(self.worker.run()), daemon=True)
        thread.start()
        thread.join(timeout)
        assert result, "worker did not exit"
        return result[0]


def item(item_id: str, **metadata: str) -> ManifestItem:
    return ManifestItem(item_id=item_id, source=f"stub://{item_id}", row=2, metadata=metadata)


def stop_when_started(harness: Harness) -> None:
    """SIGTERM's effect (request_stop) once the first item is running."""

    def stop() -> None:
        harness.task.started.wait(10)
        harness.worker.request_stop()

    threading.Thread(target=stop, daemon=True).start()


def make_harness(
    *,
    task: Task | None = None,
    task_factory: Callable[[TaskSetup], Task] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = utc_now,
    **config: Any,
) -> Harness:
    events: list[tuple[str, str]] = []
    queue, ledger, storage = StubQueue(events), StubLedger(events), StubStorage(events)
    scripted = ScriptedTask()
    # The job's node spec: idle exit and any other RunOptions field given here.
    spec_options: dict[str, Any] = {"idle_exit_s": config.pop("idle_exit_s", 0.3)}
    spec_options.update(config.pop("spec_options", {}))
    settings: dict[str, Any] = {
        "run_id": RUN,
        "poll_interval_s": 0.05,
        "retry_delay_s": 0,
        "shutdown_grace_s": 0.3,
        **config,
    }
    chosen = task or scripted
    worker = Worker(
        WorkerConfig(**settings, spec=RunOptions(**spec_options).node_spec()),
        queue,
        ledger,
        storage,
        task_factory=task_factory or (lambda setup: chosen),
        clock=clock,
        wall_clock=wall_clock,
    )
    harness = Harness(worker, queue, ledger, storage, scripted, events, spec_options)
    for letter in "abcdefgh":
        storage.sources[f"stub://{letter}"] = f"video {letter}".encode()
    return harness


# =================================================================================================
# Policy (pure functions)
# =================================================================================================
def test_decide_and_retry_delay() -> None:
    permanent = classify(PermanentError("bad"))
    transient = classify(ConnectionError("blip"))
    assert decide(permanent, attempt=1, max_attempts=3) == "fail"
    assert decide(transient, attempt=1, max_attempts=3) == "retry"
    assert decide(transient, attempt=3, max_attempts=3) == "fail"
    assert [retry_delay(n, 5) for n in (1, 2, 3, 9)] == [5, 10, 20, 900]
    assert retry_delay(4, 0) == 0


def test_failure_outcome_policy() -> None:
    transient = classify(ConnectionError("blip"))
    timeout = classify(ItemTimeoutError("too slow"))

    def outcome(error: ErrorInfo = transient, **overrides: Any) -> str:
        given: dict[str, Any] = {
            "cancel_reason": None,
            "abandoned": False,
            "stopping": False,
            "attempt": 1,
            "max_attempts": 3,
        }
        return after_failure(error, **{**given, **overrides})

    assert outcome() == "retry"
    assert outcome(attempt=3) == "fail"
    # A timeout is the item's own failure; any other cancellation says nothing about it.
    assert outcome(timeout, cancel_reason="timeout", attempt=3) == "fail"
    assert outcome(cancel_reason="shutdown") == "release"
    assert outcome(abandoned=True) == "release"
    assert outcome(stopping=True, attempt=3) == "release"


def test_settle_overdue_and_intake_policy() -> None:
    assert settle(["terminal", "terminal"]) == "delete"
    assert settle(["terminal", "retry", "released"]) == "retry"
    assert settle(["terminal", "released"]) == "release"
    assert overdue(5, 10) == "on_time"
    assert overdue(10.5, 10) == "cancel"
    assert overdue(10 + ABANDON_AFTER_S + 0.1, 10) == "abandon"
    assert intake_limit(3, 1, serial_task=False) == 4
    assert intake_limit(3, 1, serial_task=True) == 2
    assert [messages_wanted(free, 2) for free in (0, 1, 4, 5)] == [1, 1, 2, 2]
    assert [empty_poll_delay(n, 1.0) for n in (1, 2, 3, 9)] == [0.4, 0.8, 1.0, 1.0]


def test_output_names_cannot_leave_the_item_prefix() -> None:
    assert check_output_name("features.npz") == "features.npz"
    assert check_output_name("frames/part-1.bin") == "frames/part-1.bin"
    for bad in ("../x", "/etc/passwd", "a/../../b", ".hidden", "metadata.json", "a\\b", ""):
        with pytest.raises(PermanentError):
            check_output_name(bad)


# =================================================================================================
# The loop over the stub
# =================================================================================================
def test_success_persists_outputs_then_record_then_deletes() -> None:
    harness = make_harness()
    message = harness.send(item("a"), item("b"))
    assert harness.run() == EXIT_IDLE
    assert not harness.queue.messages
    for item_id in "ab":
        order = [
            harness.events.index(("output", f"{RUN}/items/{item_id}/out.bin")),
            harness.events.index(("output", f"{RUN}/items/{item_id}/metadata.json")),
            harness.events.index(("record", item_id)),
            harness.events.index(("delete", message)),
        ]
        assert order == sorted(order), harness.events
        result = harness.ledger.records[(RUN, item_id)]
        assert result.status is ItemStatus.SUCCEEDED
        assert result.outputs == [
            f"{RUN}/items/{item_id}/out.bin",
            f"{RUN}/items/{item_id}/metadata.json",
        ]
        assert result.timings.total_s >= result.timings.download_s >= 0
    metadata = json.loads(harness.storage.outputs[f"{RUN}/items/a/metadata.json"])
    assert metadata["source"] == "stub://a" and metadata["attempt"] == 1
    assert "download_s" in metadata["timings"]


def test_items_with_a_terminal_record_are_skipped() -> None:
    harness = make_harness()
    harness.ledger.records[(RUN, "a")] = ItemResult(
        run_id=RUN, item_id="a", status=ItemStatus.SUCCEEDED
    )
    harness.send(item("a"))
    assert harness.run() == EXIT_IDLE
    assert harness.task.calls == []
    assert not harness.queue.messages and harness.worker.stats["skipped"] == 1


def test_permanent_failure_is_terminal_at_once() -> None:
    harness = make_harness()
    harness.send(item("a", do="permanent"), max_attempts=5)
    harness.run()
    result = harness.ledger.records[(RUN, "a")]
    assert result.status is ItemStatus.FAILED and result.error is not None
    assert result.error.error_class == "PermanentError" and result.error.permanent
    assert result.error.attempts == 1 and harness.task.calls == [("a", 1)]
    assert harness.events.count(("record", "a")) == 1 and not harness.queue.messages


def test_retryable_failure_reappears_until_max_attempts_then_fails() -> None:
    harness = make_harness()
    harness.send(item("a", do="retryable"), max_attempts=3)
    harness.run()
    assert harness.task.calls == [("a", 1), ("a", 2), ("a", 3)]
    result = harness.ledger.records[(RUN, "a")]
    assert result.error is not None
    assert (result.error.error_class, result.error.permanent, result.error.attempts) == (
        "ConnectionError",
        False,
        3,
    )
    assert "network blip" in result.error.message
    assert harness.events.count(("record", "a")) == 1 and not harness.queue.messages


def test_retry_delay_grows_per_attempt() -> None:
    harness = make_harness(retry_delay_s=2, idle_exit_s=0.2)
    harness.send(item("a", do="retryable"), max_attempts=3)
    harness.run()
    # The worker stays while its released message is hidden (it may come back, and does),
    # so it sees every attempt: released for 2 s, then 4 s, then failed for good.
    assert harness.task.calls == [("a", 1), ("a", 2), ("a", 3)]
    assert harness.queue.visibility_updates == [2, 4]
    record = harness.ledger.records[(RUN, "a")]
    assert record.error is not None and record.error.attempts == 3


def test_an_idle_worker_stays_while_hidden_messages_may_return() -> None:
    # Another node holds the only message (hidden): this worker must not leave at its idle
    # exit, but at most the visibility timeout later, when any dead node's message is back.
    harness = make_harness(idle_exit_s=0.2)
    harness.send(item("a"), visibility_timeout_s=10)
    harness.queue.receive(1, visibility_timeout=10)  # a node takes it, then dies
    started = time.monotonic()
    harness.run()
    waited = time.monotonic() - started
    assert harness.task.calls == [("a", 2)]  # picked up when it reappeared
    assert 9.5 <= waited < 20


def test_a_mini_batch_retries_only_what_is_not_recorded() -> None:
    harness = make_harness()
    harness.storage.sources["stub://c"] = b"c"
    calls = harness.task.calls
    harness.send(item("a"), item("b", do="retryable"), max_attempts=2)
    harness.run()
    assert calls.count(("a", 1)) == 1 and ("a", 2) not in calls  # recorded once, then skipped
    assert ("b", 1) in calls and ("b", 2) in calls
    assert harness.ledger.records[(RUN, "a")].status is ItemStatus.SUCCEEDED
    assert harness.ledger.records[(RUN, "b")].status is ItemStatus.FAILED


def test_duplicate_messages_in_flight_run_the_item_once() -> None:
    harness = make_harness(concurrency=2)
    harness.send(item("a", do="sleep"))
    harness.send(item("a", do="sleep"))
    harness.run()
    assert harness.task.calls == [("a", 1)]
    assert harness.events.count(("record", "a")) == 1 and not harness.queue.messages
    assert harness.worker.stats["duplicates"] == 1


class BatchStubLedger(StubLedger):
    """The stub with the real ledger's batch calls (``BatchLedger``), counted; ``fail_next``
    makes that many ``record_many`` calls raise, as a ledger that cannot be reached."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        super().__init__(events)
        self.batches: list[list[str]] = []
        self.lookups: list[list[str]] = []
        self.fail_next = 0

    def recorded_among(self, run_id: str, item_ids: Iterable[str]) -> set[str]:
        ids = list(item_ids)
        self.lookups.append(ids)
        return {item_id for item_id in ids if (run_id, item_id) in self.records}

    def record_many(self, results: Iterable[ItemResult]) -> set[tuple[str, str]]:
        batch = list(results)
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("the ledger cannot be reached")
        self.batches.append([result.item_id for result in batch])
        return {(r.run_id, r.item_id) for r in batch if self.record(r)}


def batch_harness(**config: Any) -> tuple[Harness, BatchStubLedger]:
    harness = make_harness(**config)
    ledger = BatchStubLedger(harness.events)
    harness.worker.recorder.ledger = ledger
    harness.ledger = ledger
    return harness, ledger


def test_a_messages_items_are_recorded_together_and_then_its_message_deleted() -> None:
    # Items finishing at different times: each record waits for the rest of its message,
    # then one ledger call writes them all, before the delete. One lookup per message.
    harness, ledger = batch_harness(concurrency=4)
    message = harness.send(
        item("a"), item("b", do="sleep", seconds="0.3"), item("c", do="permanent"), item("d")
    )
    assert harness.run() == EXIT_IDLE
    assert ledger.lookups == [["a", "b", "c", "d"]]
    assert [sorted(batch) for batch in ledger.batches] == [["a", "b", "c", "d"]]
    records = [index for index, event in enumerate(harness.events) if event[0] == "record"]
    assert max(records) < harness.events.index(("delete", message))
    assert ledger.records[(RUN, "c")].status is ItemStatus.FAILED
    assert (harness.worker.stats["succeeded"], harness.worker.stats["failed"]) == (3, 1)


def test_a_ledger_that_cannot_be_written_leaves_the_message_for_another_try() -> None:
    harness, ledger = batch_harness(concurrency=2)
    ledger.fail_next = 1
    harness.send(item("a"), item("b"), max_attempts=3)
    assert harness.run() == EXIT_IDLE
    # Run again after the failed write, then recorded once each; nothing counted twice.
    assert sorted(harness.task.calls) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert [sorted(batch) for batch in ledger.batches] == [["a", "b"]]
    assert harness.worker.stats["retried"] == 2 and harness.worker.stats["succeeded"] == 2
    assert not harness.queue.messages


def test_messages_sharing_an_item_settle_with_one_record_of_it() -> None:
    # The second message's copy of "a" follows the first's; "b" of the second message is
    # its own: both messages end deleted, "a" run and recorded once.
    harness, ledger = batch_harness(concurrency=4)
    harness.send(item("a", do="sleep", seconds="0.3"), item("c"))
    harness.send(item("a", do="sleep", seconds="0.3"), item("b"))
    assert harness.run() == EXIT_IDLE
    assert harness.task.calls.count(("a", 1)) == 1
    assert harness.events.count(("record", "a")) == 1
    assert sorted(item_id for batch in ledger.batches for item_id in batch) == ["a", "b", "c"]
    assert not harness.queue.messages and harness.worker.stats["duplicates"] == 1


def test_at_the_end_of_a_stop_the_finished_items_of_a_message_are_recorded() -> None:
    # "a" finished, "h" hangs past the grace period: "a" is recorded, "h" is not, and the
    # message goes back to the queue at once for "h" (where "a" will then be skipped).
    harness, ledger = batch_harness(concurrency=2, shutdown_grace_s=0.3, idle_exit_s=30)
    harness.storage.sources["stub://h"] = b"h"
    message = harness.send(item("a"), item("h", do="hang"))
    stop_when_started(harness)
    assert harness.run() == EXIT_STOPPED
    assert list(ledger.records) == [(RUN, "a")]
    assert {stored.id for stored in harness.queue.visible()} == {message}


def test_a_ledger_observed_by_the_node_metrics_still_records_a_message_together() -> None:
    # On AML the worker's ledger is wrapped by the node metrics (metrics.py): the wrapper
    # passes the batch calls through, and counts each first record once.
    ledger = BatchStubLedger([])

    class Sink:  # a tracking server that takes every batch
        def send(self, points: Any) -> None:
            pass

    meter = NodeMetrics(Sink(), every_items=1, every_s=1e9, clock=lambda: 0.0)
    observed = meter.observing(ledger)
    assert isinstance(observed, BatchLedger)
    results = [ItemResult(run_id=RUN, item_id=x, status=ItemStatus.SUCCEEDED) for x in "ab"]
    assert observed.record_many(results) == {(RUN, "a"), (RUN, "b")}
    assert observed.record_many(results) == set()  # a duplicate delivery: nothing new
    assert ledger.batches == [["a", "b"], ["a", "b"]]
    assert observed.recorded_among(RUN, ["a", "c"]) == {"a"}
    meter.close()
    assert meter.batches == 2


def test_a_message_delivered_past_max_attempts_fails_without_running() -> None:
    # Its earlier workers all died (e.g. the video killed them): do not hand it to another.
    harness = make_harness()
    harness.send(item("a"), dequeue_count=3, max_attempts=3)
    harness.run()
    assert harness.task.calls == []
    result = harness.ledger.records[(RUN, "a")]
    assert result.error is not None and result.error.error_class == "AttemptsExhausted"
    assert not harness.queue.messages


def test_item_timeout_cancels_the_item_and_counts_as_retryable() -> None:
    harness = make_harness()
    harness.send(item("a", do="hang"), item_timeout_s=0.3, max_attempts=1)
    started = time.monotonic()
    harness.run()
    assert time.monotonic() - started < 5
    result = harness.ledger.records[(RUN, "a")]
    assert result.error is not None and result.error.error_class == "ItemTimeoutError"
    assert not result.error.permanent


def test_bad_output_name_fails_the_item_permanently() -> None:
    harness = make_harness()
    harness.send(item("a", do="badname"))
    harness.run()
    result = harness.ledger.records[(RUN, "a")]
    assert result.error is not None and result.error.error_class == "OutputNameError"
    assert not harness.storage.outputs


def test_malformed_messages_are_dropped() -> None:
    harness = make_harness()
    harness.queue.put("this is not json")
    harness.queue.put(json.dumps({"run_id": RUN, "items": [{"item_id": "x", "source": "s"}]}))
    harness.run()
    assert not harness.queue.messages
    result = harness.ledger.records[(RUN, "x")]
    assert result.error is not None and result.error.error_class == "MalformedMessage"


def test_stop_releases_in_flight_and_prefetched_messages() -> None:
    harness = make_harness(concurrency=1, prefetch=1, shutdown_grace_s=0.3, idle_exit_s=30)
    first = harness.send(item("a", do="hang"))
    second = harness.send(item("b"))
    stop_when_started(harness)
    started = time.monotonic()
    assert harness.run() == EXIT_STOPPED
    assert time.monotonic() - started < 5
    assert harness.ledger.records == {}
    # Both messages are visible again right away, without waiting for their timeouts.
    visible = {stored.id for stored in harness.queue.visible()}
    assert visible == {first, second}
    assert harness.task.calls == [("a", 1)]


def test_stop_lets_items_finish_within_the_grace_period() -> None:
    harness = make_harness(concurrency=1, shutdown_grace_s=5, idle_exit_s=30)
    harness.send(item("a", do="sleep", seconds="0.5"))
    stop_when_started(harness)
    assert harness.run() == EXIT_STOPPED
    assert harness.ledger.records[(RUN, "a")].status is ItemStatus.SUCCEEDED
    assert not harness.queue.messages


class HoldProbeTask:
    """Records how many messages the worker holds (received, not yet done) at each call."""

    def __init__(self, queue_of: Callable[[], StubQueue], thread_safe: bool) -> None:
        self.queue_of = queue_of
        self.thread_safe = thread_safe
        self.held: list[int] = []

    def setup(self, setup: TaskSetup) -> None:
        pass

    def process(self, item: ItemInput) -> ItemOutput:
        now = time.monotonic()
        self.held.append(sum(1 for m in self.queue_of().messages.values() if m.visible_at > now))
        time.sleep(0.1)
        return ItemOutput(files={})

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("thread_safe", "most_held"), [(False, 2), (True, 4)])
def test_a_node_holds_no_more_items_than_its_task_can_use(
    thread_safe: bool, most_held: int
) -> None:
    # One at a time: the running item and the next, so the last items of a run are not
    # stuck behind a backlog on one node while the others idle. Thread-safe tasks (which
    # batch frames across videos) get concurrency + prefetch.
    holder: list[Harness] = []
    probe = HoldProbeTask(lambda: holder[0].queue, thread_safe)
    harness = make_harness(task=probe, concurrency=3, prefetch=1)
    holder.append(harness)
    harness.worker.prepare()
    for letter in "abcdefgh":
        harness.send(item(letter))
    assert harness.run() == EXIT_IDLE
    assert len(harness.ledger.records) == 8
    assert max(probe.held) == most_held


def test_slots_count_items_when_messages_carry_mini_batches() -> None:
    # Room for four items (concurrency 3 + prefetch 1) and two items a message: a node asks
    # for two messages, then one as slots free up; counting slots as messages, it would take
    # all four messages (eight items) at once and leave other nodes nothing.
    holder: list[Harness] = []
    probe = HoldProbeTask(lambda: holder[0].queue, thread_safe=True)
    # The job's node spec, as the backends pass it (BATCHCTL_TASK_OPTIONS).
    harness = make_harness(
        task=probe, concurrency=3, prefetch=1, spec_options={"mini_batch_size": 2}
    )
    holder.append(harness)
    harness.worker.prepare()
    for first, second in (("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")):
        harness.send(item(first), item(second))
    assert harness.run() == EXIT_IDLE
    assert len(harness.ledger.records) == 8
    assert max(probe.held) <= 3  # 2 or 3 with timing; counting slots as messages: 4


def test_visibility_is_renewed_while_an_item_is_in_flight() -> None:
    # A clock running 20x fast: the 30 s visibility is renewed every 10 "s" = 0.5 s real.
    base = time.monotonic()
    harness = make_harness(clock=lambda: base + (time.monotonic() - base) * 20)
    harness.send(item("a", do="sleep", seconds="1.6"), visibility_timeout_s=30)
    harness.run()
    assert harness.queue.visibility_updates.count(30) >= 2
    assert harness.ledger.records[(RUN, "a")].status is ItemStatus.SUCCEEDED


def test_custom_task_is_set_up_once_per_process() -> None:
    worker_tasks.EchoTask.setups = 0
    harness = make_harness(task_factory=create_task)
    for letter in "abc":
        harness.send(item(letter), task="tests.worker_tasks:EchoTask")
    harness.run()
    assert worker_tasks.EchoTask.setups == 1
    assert harness.storage.outputs[f"{RUN}/items/c/echo.txt"] == b"video c"


def test_a_task_that_cannot_be_set_up_fails_every_item_permanently() -> None:
    harness = make_harness(task_factory=create_task)
    harness.send(item("a"), item("b"), task="tests.worker_tasks:NoSuchTask")
    harness.run()
    for item_id in "ab":
        error = harness.ledger.records[(RUN, item_id)].error
        assert error is not None and error.error_class == "TaskConfigError" and error.permanent


def test_only_the_loop_thread_touches_the_queue_and_writes_outcomes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every outcome assignment, with the thread that made it.
    writers: list[str] = []
    original = ItemJob.__setattr__

    def spy(job: ItemJob, name: str, value: Any) -> None:
        if name == "outcome" and value is not None:
            writers.append(threading.current_thread().name)
        original(job, name, value)

    monkeypatch.setattr(ItemJob, "__setattr__", spy)
    harness = make_harness(concurrency=3, retry_delay_s=0)
    harness.send(item("a"), item("b", do="retryable"), max_attempts=2)
    harness.send(item("c", do="permanent"), item("d", do="sleep", seconds="0.2"))
    harness.send(item("a"))  # a duplicate: its outcome is shared, not run again
    loop_threads: list[str] = []
    real_run = harness.worker.run

    def run() -> int:
        loop_threads.append(threading.current_thread().name)
        return real_run()

    harness.worker.run = run  # type: ignore[method-assign]
    assert harness.run() == EXIT_IDLE
    assert len(harness.ledger.records) == 4
    assert harness.queue.threads == set(loop_threads)
    assert writers and set(writers) == set(loop_threads)


def test_leases_refuse_queue_io_from_a_second_thread() -> None:
    stub = StubQueue([])
    leases = Leases(stub)
    assert leases.count() == 0  # the first caller owns the queue from now on
    failures: list[BaseException] = []

    def other() -> None:
        try:
            leases.receive(1, 30)
        except RuntimeError as error:
            failures.append(error)

    thread = threading.Thread(target=other, name="item-x")
    thread.start()
    thread.join(5)
    assert failures and "only the loop thread" in str(failures[0])


def test_item_timeouts_and_record_times_come_from_the_injected_clocks() -> None:
    # The item's timeout is an hour of the loop's clock; the clock jumps past it (not as far
    # as abandoning) once the item runs, so it times out at once in real time. Records
    # carry the injected wall time.
    offset = [0.0]
    stamp = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    harness = make_harness(clock=lambda: time.monotonic() + offset[0], wall_clock=lambda: stamp)

    def jump() -> None:
        harness.task.started.wait(10)
        offset[0] = 3600.0 + ABANDON_AFTER_S / 2

    threading.Thread(target=jump, daemon=True).start()
    harness.send(item("a", do="hang"), item_timeout_s=3600, max_attempts=1)
    started = time.monotonic()
    harness.run()
    assert time.monotonic() - started < 10
    result = harness.ledger.records[(RUN, "a")]
    assert result.error is not None and result.error.error_class == "ItemTimeoutError"
    assert result.finished_at == stamp


def test_idle_exit_when_the_queue_stays_empty() -> None:
    harness = make_harness(idle_exit_s=0.2)
    started = time.monotonic()
    assert harness.run() == EXIT_IDLE
    assert time.monotonic() - started < 2


# =================================================================================================
# Real worker processes over Azurite
# =================================================================================================
@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return worker_tasks.save_tiny_model(tmp_path_factory.mktemp("models") / "tiny.keras")


@dataclass
class Fleet:
    """Starts worker processes for one run and reads back what they did."""

    azurite: Azurite
    settings: StorageSettings
    store: BlobStore
    ledger: Ledger
    run_id: str
    repo_root: Path
    directory: Path
    model: Path

    def __post_init__(self) -> None:
        self.queues = RunQueues(self.settings, self.run_id)
        self.queues.create()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.markers = self.directory / "markers"
        self.markers.mkdir()

    def options(self, **overrides: Any) -> RunOptions:
        values: dict[str, Any] = {"model": str(self.model), "fps": 1.0, "inference_batch_size": 8}
        return RunOptions(**{**values, **overrides})

    def upload(self, name: str, path: Path) -> str:
        blob = f"{self.run_id}/{name}"
        self.store.upload_file(self.settings.media_container, blob, path)
        return self.store.url(self.settings.media_container, blob)

    def send(self, items: list[ManifestItem], options: RunOptions) -> WorkItem:
        """Queue a message of ``items``; ``options`` reach the workers as their node spec
        when they start (``start``), never with the message."""
        work = WorkItem(run_id=self.run_id, items=items)
        self.queues.send("input", work.model_dump_json())
        return work

    def start(
        self, name: str, options: RunOptions | None = None, *, idle_exit_s: float = 3, **env: str
    ) -> subprocess.Popen[bytes]:
        """A worker process, configured as the compute backends do (environment only): the
        job's node spec from ``options`` (default: :meth:`options`) with ``idle_exit_s``."""
        spec = (options or self.options()).model_copy(update={"idle_exit_s": idle_exit_s})
        environment = {
            **os.environ,
            **self.azurite.environment(),
            "BATCHCTL_RUN_ID": self.run_id,
            "BATCHCTL_NODE_NAME": name,
            "BATCHCTL_POLL_INTERVAL_S": "0.3",
            "BATCHCTL_RETRY_DELAY_S": "0",
            "BATCHCTL_CONCURRENCY": "2",
            "BATCHCTL_TASK_OPTIONS": spec.node_spec().model_dump_json(),
            worker_tasks.MARKER_DIR_ENV: str(self.markers),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            **env,
        }
        log = (self.directory / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "node_image.worker"],
            cwd=self.repo_root,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.processes.append(process)
        return process

    def wait(self, process: subprocess.Popen[bytes], timeout: float = 120) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"worker did not exit in {timeout} s\n{self.logs()}")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.directory.glob("*.log"))
        )

    def results(self) -> dict[str, ItemResult]:
        return {result.item_id: result for result in self.ledger.iter_results(self.run_id)}

    def outputs(self, item_id: str) -> list[str]:
        prefix = f"{self.run_id}/items/{item_id}/"
        return sorted(self.store.list_names(self.settings.outputs_container, prefix))

    def run_queues(self) -> list[str]:
        """Every queue of the run in the account: the worker writes results to none."""
        service = QueueServiceClient(
            self.settings.queue_url, credential=sync_credential(self.settings)
        )
        with service:
            return sorted(q.name for q in service.list_queues(name_starts_with=f"r-{self.run_id}-"))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.queues.delete()
        self.queues.close()


@pytest.fixture
def fleet(
    azurite: Azurite,
    storage_settings: StorageSettings,
    blob_store: BlobStore,
    ledger: Ledger,
    run_id: str,
    repo_root: Path,
    tmp_path: Path,
    tiny_model_path: Path,
) -> Iterator[Fleet]:
    fleet = Fleet(
        azurite, storage_settings, blob_store, ledger, run_id, repo_root, tmp_path, tiny_model_path
    )
    try:
        yield fleet
    finally:
        fleet.stop_all()


def _marker(fleet: Fleet, item_id: str, attempt: int) -> Path:
    return fleet.markers / f"{item_id}.started.{attempt}"


@pytest.mark.azurite
@pytest.mark.slow
def test_every_video_ends_as_the_right_success_or_permanent_failure(
    fleet: Fleet, videos: VideoLibrary
) -> None:
    sources = {name: fleet.upload(CASES[name].filename, videos.path(name)) for name in CASES}
    items = [
        ManifestItem(item_id=name, source=source, row=row)
        for row, (name, source) in enumerate(sources.items(), start=2)
    ]
    items.append(ManifestItem(item_id="foreign", source="http://example.com/v.mp4", row=90))
    items.append(ManifestItem(item_id="missing", source=sources["h264"] + ".gone", row=91))
    options = fleet.options()
    for start in range(0, len(items), 3):  # mini-batches of three items per message
        fleet.send(items[start : start + 3], options)
    assert fleet.wait(fleet.start("node-a", options)) == EXIT_IDLE, fleet.logs()

    results = fleet.results()
    assert set(results) == {i.item_id for i in items}, fleet.logs()
    for name in GOOD:
        result = results[name]
        assert result.status is ItemStatus.SUCCEEDED, (name, result.error, fleet.logs())
        assert fleet.outputs(name) == [
            f"{fleet.run_id}/items/{name}/features.npz",
            f"{fleet.run_id}/items/{name}/metadata.json",
        ]
        container = fleet.settings.outputs_container
        with np.load(io.BytesIO(fleet.store.download_bytes(container, result.outputs[0]))) as npz:
            features, timestamps = npz["features"], npz["timestamps"]
        metadata = json.loads(fleet.store.download_bytes(container, result.outputs[1]))
        assert features.shape == (len(timestamps), 8) and features.dtype == np.float32
        assert abs(len(timestamps) - CASES[name].duration_s) <= 1
        assert metadata["frames"] == len(timestamps)
        assert metadata["source"] == sources[name]
        assert metadata["duration_s"] == pytest.approx(CASES[name].duration_s, abs=0.2)
        assert metadata["model"] == "tiny.keras" and "sha256" in metadata["weights"]
        assert metadata["sampling"]["path"] in ("keyframes", "full")
        assert {"download_s", "decode_s", "inference_s"} <= set(metadata["timings"])
        assert result.timings.total_s > 0 and result.timings.upload_s > 0
    assert results["rotated"].status is ItemStatus.SUCCEEDED
    expected_failures = {name: CASES[name] for name in BAD}
    for name, case in expected_failures.items():
        error = results[name].error
        assert error is not None, name
        assert (error.error_class, error.permanent, error.attempts) == (case.error_class, True, 1)
        assert case.message.lower() in error.message.lower(), (name, error.message)
        assert fleet.outputs(name) == []
    assert results["foreign"].error is not None
    assert results["foreign"].error.error_class == "SourceError"
    assert results["missing"].error is not None
    assert "does not exist" in results["missing"].error.message
    statuses = [result.status for result in results.values()]
    assert statuses.count(ItemStatus.SUCCEEDED) == len(GOOD)
    assert statuses.count(ItemStatus.FAILED) == len(BAD) + 2
    assert fleet.run_queues() == [queue_names(fleet.run_id)["input"]]
    assert fleet.queues.approximate_count("input") == 0


@pytest.mark.azurite
@pytest.mark.slow
def test_a_worker_killed_mid_item_leaves_it_to_another_worker(
    fleet: Fleet, videos: VideoLibrary
) -> None:
    source = fleet.upload("clip.mp4", videos.path("h264"))
    options = fleet.options(
        task="tests.worker_tasks:SlowFirstAttemptFeatures", visibility_timeout_s=10
    )
    fleet.send([ManifestItem(item_id="clip", source=source, row=2)], options)
    # The job's 10 s visibility: the kill hides the message for 10 s, not the default 120.
    first = fleet.start("node-a", options)
    fleet.wait_for(lambda: _marker(fleet, "clip", 1).exists(), 60, "the first attempt to start")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert fleet.results() == {}  # killed in the middle: nothing recorded

    second = fleet.start("node-b", options, idle_exit_s=60)
    fleet.wait_for(lambda: "clip" in fleet.results(), 60, "the second worker to finish it")
    fleet.wait_for(lambda: fleet.queues.approximate_count("input") == 0, 20, "the delete")
    second.send_signal(signal.SIGTERM)
    assert fleet.wait(second, 30) == EXIT_STOPPED

    results = fleet.results()
    assert list(results) == ["clip"] and results["clip"].status is ItemStatus.SUCCEEDED
    assert fleet.outputs("clip") == [
        f"{fleet.run_id}/items/clip/features.npz",
        f"{fleet.run_id}/items/clip/metadata.json",
    ]
    metadata = json.loads(
        fleet.store.download_bytes(fleet.settings.outputs_container, results["clip"].outputs[1])
    )
    assert metadata["attempt"] == 2 and metadata["node"].startswith("node-b")


@pytest.mark.azurite
@pytest.mark.slow
def test_a_duplicated_message_yields_one_output_and_one_record(
    fleet: Fleet, videos: VideoLibrary
) -> None:
    source = fleet.upload("clip.mp4", videos.path("vp9"))
    work_items = [ManifestItem(item_id="dup", source=source, row=2)]
    first = fleet.send(work_items, fleet.options())
    fleet.queues.send("input", first.model_dump_json())  # the same message, twice
    assert fleet.wait(fleet.start("node-a", fleet.options())) == EXIT_IDLE, fleet.logs()
    results = fleet.results()
    assert list(results) == ["dup"] and results["dup"].status is ItemStatus.SUCCEEDED
    assert len(fleet.outputs("dup")) == 2
    assert fleet.queues.approximate_count("input") == 0


@pytest.mark.azurite
@pytest.mark.slow
def test_a_poison_item_fails_after_max_attempts(fleet: Fleet, videos: VideoLibrary) -> None:
    source = fleet.upload("clip.mp4", videos.path("h264"))
    options = fleet.options(task="tests.worker_tasks:FailingTask", max_attempts=3)
    fleet.send([ManifestItem(item_id="poison", source=source, row=2)], options)
    assert fleet.wait(fleet.start("node-a", options)) == EXIT_IDLE, fleet.logs()
    result = fleet.results()["poison"]
    assert result.status is ItemStatus.FAILED and result.error is not None
    assert (result.error.error_class, result.error.attempts) == ("ConnectionError", 3)
    assert "attempt 3" in result.error.message and not result.error.permanent
    assert [_marker(fleet, "poison", n).exists() for n in (1, 2, 3, 4)] == [True] * 3 + [False]
    failed = [r.item_id for r in fleet.results().values() if r.status is ItemStatus.FAILED]
    assert failed == ["poison"]
    assert fleet.queues.approximate_count("input") == 0


@pytest.mark.azurite
@pytest.mark.slow
def test_sigterm_releases_in_flight_messages(fleet: Fleet, videos: VideoLibrary) -> None:
    source = fleet.upload("clip.mp4", videos.path("h264"))
    options = fleet.options(
        task="tests.worker_tasks:SlowFirstAttemptFeatures", visibility_timeout_s=300
    )
    for item_id in ("one", "two"):
        fleet.send([ManifestItem(item_id=item_id, source=source, row=2)], options)
    worker = fleet.start(
        "node-a",
        options,
        BATCHCTL_CONCURRENCY="1",
        BATCHCTL_PREFETCH="1",
        BATCHCTL_SHUTDOWN_GRACE_S="1",
        idle_exit_s=60,
    )
    fleet.wait_for(
        lambda: any(_marker(fleet, i, 1).exists() for i in ("one", "two")), 60, "an item to start"
    )
    worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert fleet.wait(worker, 30) == EXIT_STOPPED
    assert time.monotonic() - started < 15
    assert fleet.results() == {}
    # Both messages (the one in flight and the prefetched one) are visible again at once,
    # although they were received with a 300 s visibility timeout.
    again = fleet.queues.receive(32, visibility_timeout=30)
    assert sorted(WorkItem.model_validate_json(m.content).items[0].item_id for m in again) == [
        "one",
        "two",
    ]
    assert [m.dequeue_count for m in again] == [2, 2]  # both had been received by the worker


def test_a_signal_wakes_an_idle_loop_at_once_not_at_its_next_poll() -> None:
    # A run's teardown waits for every worker to exit: a loop that noticed SIGTERM only at its
    # next poll kept the whole run's end waiting for up to a poll interval.
    harness = make_harness(poll_interval_s=30.0, idle_exit_s=120.0)
    worker = harness.worker
    outcome: list[int] = []
    runner = threading.Thread(target=lambda: outcome.append(harness.run()), daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while not harness.queue.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the loop is now asleep until its next receive, 30 s away
    # The handler's own work, from another thread: it must neither block nor be lost.
    woke = time.monotonic()
    worker._on_signal(signal.SIGTERM, None)
    runner.join(10)
    assert outcome == [EXIT_STOPPED]
    assert time.monotonic() - woke < 5, "the stop waited for the loop's next poll"


def test_a_signal_handler_never_waits_for_a_lock_the_interrupted_thread_may_hold() -> None:
    # A handler runs in the main thread between two bytecodes, possibly inside a lock's
    # critical section (a Queue's put from the handler once froze a worker for ever). The
    # reports queue is a SimpleQueue, whose put is reentrant: safe from a handler.
    harness = make_harness()
    assert type(harness.worker._reports) is queue.SimpleQueue
    done = threading.Event()

    def handler_while_the_loop_waits_on_the_queue() -> None:
        harness.worker._on_signal(signal.SIGTERM, None)
        done.set()

    getter = threading.Thread(target=lambda: harness.worker._reports.get(timeout=5), daemon=True)
    getter.start()
    threading.Thread(target=handler_while_the_loop_waits_on_the_queue, daemon=True).start()
    assert done.wait(5), "the signal handler blocked"
    getter.join(5)
    harness.send(item("a"))
    assert harness.run() == EXIT_STOPPED  # the stop is not lost


def test_items_received_into_the_last_free_slots_start_at_once() -> None:
    # A receive that fills every slot leaves nothing in flight to wake the loop's wait: the
    # items it brought waited a whole poll interval before starting (a run's first second).
    harness = make_harness(poll_interval_s=30.0, concurrency=2, prefetch=0)
    harness.send(item("a", do="sleep", seconds="0.2"), item("b", do="sleep", seconds="0.2"))
    runner = threading.Thread(target=harness.run, daemon=True)
    began = time.monotonic()
    runner.start()
    assert harness.task.started.wait(10), "the received items never started"
    assert time.monotonic() - began < 5, "the items waited for the loop's next poll"
    harness.worker.request_stop()
    runner.join(10)
