"""The consumer loop: the only part of the worker that touches the queue.

Protocol, per message (a :class:`~batchctl.contracts.WorkItem`, one or a few items):

1. Receive it (with a small prefetch) hidden for the run's visibility timeout; renew that
   visibility every third of it while any of its items is in flight.
2. Skip items that already have a terminal record (a duplicate delivery, or an earlier
   worker that died after recording). An item already running here from another copy of the
   message shares that run's outcome instead of running twice.
3. Run each remaining item on its own thread (download, task, persist): write its outputs,
   then its terminal record (the ledger's first record wins), then, only if this record was
   the first, the success or failure message. Only when every item of the message is
   terminal is the input message deleted.
4. Failures are classified (:mod:`.errors`). Permanent ones are terminal at once. Retryable
   ones leave the message to reappear after a growing delay, until the message's delivery
   count reaches the run's ``max_attempts``: then the failure is terminal (the poison path).
   A message delivered more often than that without any outcome (its worker died each time,
   e.g. killed by the video it was decoding) fails its items on arrival.
5. Each item has a timeout (``item_timeout_s``); past it the item is cancelled and counts as
   a retryable failure.
6. SIGTERM (preemption) stops intake at once; messages not started are released (visibility
   0) for other nodes, in-flight items may finish within ``shutdown_grace_s``, and whatever
   is still running then is cancelled and its message released.
7. The worker exits by itself once it has had nothing to do for ``idle_exit_s`` and the
   queue holds no message at all, so the job ends and the cluster scales to zero. The
   queue's approximate count includes hidden messages: those in flight on other nodes, in
   a retry delay, or held by a node that died (preempted, SIGKILLed) until their visibility
   timeout runs out. While such messages exist the worker stays, so a dead node's items
   are picked up the moment they reappear instead of waiting for a new job, but for at most
   the visibility timeout (plus ``idle_exit_s``): by then every message hidden by a node
   that was already dead has come back, and the rest belong to live nodes.
8. A failure while the worker is stopping (SIGTERM, SIGINT) releases the message: what
   fails while a node is going away says nothing about the item.

Storage is reached through three small protocols, so tests can drive the real loop over an
in-memory stub (policy) as well as over Azurite (the real thing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import tempfile
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    ManifestItem,
    RunOptions,
    StageTimings,
    WorkItem,
)
from batchctl.logs import bound
from batchctl.settings import StorageSettings, WorkerSettings
from batchctl.storage import BlobStore, Ledger, QueueMessage, RunQueues

from .errors import (
    DownloadError,
    ErrorInfo,
    ItemTimeoutError,
    OutputNameError,
    SourceError,
    TooLargeError,
    classify,
)
from .media import MediaLimits
from .tasks import CancelToken, ItemInput, ItemOutput, Task, TaskSetup, create_task, is_thread_safe

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
# Longest delay before a retried message reappears (Azure allows up to 7 days).
MAX_RETRY_DELAY_S = 900
# Items a node holds for a task that runs one at a time: the running one and the next.
SERIAL_TASK_INTAKE = 2
# Exit codes: 0 when the queue stayed empty (the job is done); 128 + SIGTERM after a stop.
EXIT_IDLE = 0
EXIT_STOPPED = 128 + signal.SIGTERM
# A task that ignores its cancellation is abandoned this long after its deadline.
ABANDON_AFTER_S = 30.0
_OUTPUT_NAME = re.compile(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}){0,3}$"
)
_AZURE_BLOB_HOST = re.compile(r"^[a-z0-9]{3,24}\.blob\.core\.windows\.net$")


# -- storage protocols ----------------------------------------------------------------------
QueueRole = Literal["input", "success", "failure"]


class WorkQueue(Protocol):
    """What the loop needs of a run's queues (``RunQueues`` has exactly this)."""

    def receive(
        self, max_messages: int, *, visibility_timeout: int, role: QueueRole = "input"
    ) -> list[QueueMessage]: ...

    def update_visibility(
        self, message: QueueMessage, visibility_timeout: int, role: QueueRole = "input"
    ) -> QueueMessage: ...

    def delete_message(self, message: QueueMessage, role: QueueRole = "input") -> None: ...

    def send(
        self, role: QueueRole, content: str, *, visibility_timeout: int | None = None
    ) -> None: ...

    def approximate_count(self, role: QueueRole = "input") -> int:
        """Messages in the queue, hidden ones included (Azure's count is never lower)."""
        ...


class ResultLedger(Protocol):
    """What the loop needs of the ledger (``Ledger`` has exactly this)."""

    def has_record(self, run_id: str, item_id: str) -> bool: ...

    def record(self, result: ItemResult) -> bool: ...


class ItemStorage(Protocol):
    """Downloads of sources and writes of outputs."""

    def download(self, source: str, target: Path, max_bytes: int) -> int: ...

    def write_output(self, name: str, data: bytes, content_type: str) -> None: ...


class BlobItemStorage:
    """ItemStorage over blob storage: sources are blob URLs, outputs go to the outputs container.

    A source must be a blob in this worker's own account (any container), or, with managed
    identity, in another Azure storage account (the controller's allowlist decided which).
    Nothing else is fetched: the worker never follows an arbitrary URL.
    """

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.store = BlobStore(settings)
        self._others: dict[str, BlobStore] = {}
        self._lock = threading.Lock()

    def locate(self, source: str) -> tuple[BlobStore, str, str]:
        """(store, container, blob name) of a source URL; SourceError when not allowed."""
        own = self.settings.blob_url + "/"
        if source.startswith(own):
            store, rest = self.store, source[len(own) :]
        else:
            parts = urlsplit(source)
            if (
                parts.scheme != "https"
                or self.settings.storage_auth != "managed_identity"
                or not _AZURE_BLOB_HOST.match(parts.hostname or "")
                or parts.query
                or parts.port
            ):
                raise SourceError(
                    f"source {source!r} is not a blob URL this worker may read "
                    f"(its account is {self.settings.blob_url})"
                )
            account_url = f"https://{parts.hostname}"
            with self._lock:
                if account_url not in self._others:
                    self._others[account_url] = BlobStore(
                        self.settings.model_copy(update={"blob_url": account_url})
                    )
                store = self._others[account_url]
            rest = parts.path.lstrip("/")
        container, _, name = rest.partition("/")
        name = unquote(name.split("?", 1)[0])
        if not container or not name:
            raise SourceError(f"source {source!r} names no blob (container/name)")
        return store, container, name

    def download(self, source: str, target: Path, max_bytes: int) -> int:
        """Stream the blob to ``target``; stops (permanently) past ``max_bytes``.

        One request, not two: the size is checked while streaming rather than asked first.
        """
        store, container, name = self.locate(source)
        size = 0
        try:
            with target.open("wb") as handle:
                for chunk in store.download_chunks(container, name):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeError(
                            f"source is over the limit of {max_bytes} bytes; download stopped"
                        )
                    handle.write(chunk)
        except Exception as error:
            status = getattr(error, "status_code", None)
            if status == 404:
                raise SourceError(f"source blob {container}/{name} does not exist") from error
            if getattr(type(error), "permanent", None) is not None:
                raise
            # Network trouble, throttling (429/503) or a role assignment still propagating
            # (403): another attempt may succeed.
            raise DownloadError(f"download of {container}/{name} failed: {error}") from error
        return size

    def write_output(self, name: str, data: bytes, content_type: str) -> None:
        self.store.upload_bytes(
            self.settings.outputs_container, name, data, content_type=content_type, overwrite=True
        )

    def close(self) -> None:
        self.store.close()
        for store in self._others.values():
            store.close()


# -- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerConfig:
    """The loop's knobs (from WorkerSettings; tests build it directly)."""

    run_id: str
    node_name: str = "node"
    concurrency: int = 3
    prefetch: int = 1
    shutdown_grace_s: float = 20.0
    poll_interval_s: float = 1.0
    retry_delay_s: float = 5.0
    idle_exit_s: float | None = None
    limits: MediaLimits = field(default_factory=MediaLimits)
    weights_dir: str | None = None
    mixed_precision: bool = False
    decode_threads: int = 1
    work_dir: Path | None = None
    default_options: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> WorkerConfig:
        options = (
            RunOptions.model_validate_json(settings.task_options)
            if settings.task_options
            else RunOptions()
        )
        return cls(
            run_id=settings.run_id,
            node_name=f"{settings.node_name}:{os.getpid()}",
            concurrency=settings.concurrency,
            prefetch=settings.prefetch,
            shutdown_grace_s=settings.shutdown_grace_s,
            poll_interval_s=settings.poll_interval_s,
            retry_delay_s=settings.retry_delay_s,
            idle_exit_s=settings.idle_exit_s,
            limits=MediaLimits(
                max_bytes=settings.max_video_bytes,
                max_duration_s=settings.max_duration_s,
                max_width=settings.max_width,
                max_height=settings.max_height,
                max_pixels=settings.max_pixels,
                decode_timeout_s=settings.decode_timeout_s,
            ),
            weights_dir=settings.weights_dir,
            mixed_precision=settings.mixed_precision,
            decode_threads=settings.decode_threads,
            work_dir=Path(settings.work_dir) if settings.work_dir else None,
            default_options=options,
        )


# -- pure policy ----------------------------------------------------------------------------
Decision = Literal["fail", "retry"]


def decide(error: ErrorInfo, attempt: int, max_attempts: int) -> Decision:
    """Permanent errors fail at once; retryable ones retry until the last allowed attempt."""
    if error.permanent or attempt >= max_attempts:
        return "fail"
    return "retry"


def retry_delay(attempt: int, base_s: float, cap_s: int = MAX_RETRY_DELAY_S) -> int:
    """Seconds a retried message stays hidden: base, doubled per attempt, capped."""
    if base_s <= 0:
        return 0
    return int(min(cap_s, base_s * 2 ** max(0, attempt - 1)))


def may_exit_idle(
    idle_for_s: float, idle_exit_s: float, queued_messages: int, visibility_timeout_s: float
) -> bool:
    """Whether a worker idle for ``idle_for_s`` leaves, given the queue's approximate count.

    An empty queue (nothing visible, nothing hidden) ends the job at once. Hidden messages
    keep the worker for up to the visibility timeout more, so a dead node's messages are
    picked up here when they reappear (see the module docstring, point 7).
    """
    if idle_for_s < idle_exit_s:
        return False
    return queued_messages == 0 or idle_for_s >= idle_exit_s + visibility_timeout_s


def renew_interval(visibility_timeout_s: int) -> float:
    """Renew a third of the way in: two renewals may fail before the message reappears."""
    return max(1.0, visibility_timeout_s / 3.0)


def output_prefix(run_id: str, item_id: str) -> str:
    """Where an item's outputs go in the outputs container (ids cannot contain '/' or '..').

    Under ``{run_id}/items/``, a namespace of their own: run-level artifacts (the merged
    dataset in ``{run_id}/merged/``) sit beside it, so no item id (not even ``merged``) can
    write into them. batchctl.merge.item_output_prefix reads the same names.
    """
    return f"{run_id}/items/{item_id}/"


def check_output_name(name: str) -> str:
    """A task's output name, refused when it could leave the item's prefix or clash."""
    if not _OUTPUT_NAME.match(name) or name == METADATA_FILE:
        raise OutputNameError(
            f"output name {name!r} is not allowed (relative names of letters, digits, '._-', "
            f"at most 4 levels, not {METADATA_FILE!r})"
        )
    return name


# -- in-flight state ------------------------------------------------------------------------
Outcome = Literal["terminal", "retry", "released"]


@dataclass
class Delivery:
    """One received message and the items it carries."""

    message: QueueMessage
    work: WorkItem
    visibility_s: int
    renew_at: float
    jobs: list[ItemJob] = field(default_factory=list)
    lost: bool = False
    finished: bool = False

    @property
    def attempt(self) -> int:
        return max(1, self.message.dequeue_count)

    def resolved(self) -> bool:
        return all(job.outcome is not None for job in self.jobs)


@dataclass
class ItemJob:
    """One item of one delivery."""

    delivery: Delivery
    item: ManifestItem
    token: CancelToken = field(default_factory=CancelToken)
    outcome: Outcome | None = None
    started_at: float | None = None
    followers: list[ItemJob] = field(default_factory=list)
    abandoned: bool = False
    error: str | None = None


# -- the worker -----------------------------------------------------------------------------
class Worker:
    """The consumer loop over one run's input queue (see the module docstring)."""

    def __init__(
        self,
        config: WorkerConfig,
        queues: WorkQueue,
        ledger: ResultLedger,
        storage: ItemStorage,
        *,
        task_factory: Callable[[TaskSetup], Task] = create_task,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.queues = queues
        self.ledger = ledger
        self.storage = storage
        self.task_factory = task_factory
        self.clock = clock
        self._deliveries: list[Delivery] = []
        self._pending: deque[ItemJob] = deque()
        self._running: dict[str, ItemJob] = {}  # item id -> its job running (or queued) here
        self._events: queue.Queue[ItemJob | None] = queue.Queue()
        self._stop_reason: str | None = None
        self._stop_deadline: float | None = None
        self._next_count_check = float("-inf")
        self._lingering = False
        self._options = config.default_options
        self._options_key = (self._options, self._task_key(self._options))
        self._tasks: dict[str, Task | BaseException] = {}
        self._task_locks: dict[str, threading.Lock] = {}
        self._setup_lock = threading.Lock()
        self._work_root = Path(
            tempfile.mkdtemp(prefix="batchctl-worker-", dir=config.work_dir or None)
        )
        self.stats: dict[str, int] = {
            "received": 0,
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
            "skipped": 0,
            "released": 0,
            "duplicates": 0,
        }

    # -- public -------------------------------------------------------------------------
    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Stop intake now; in-flight items get the grace period (safe from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._events.put(None)  # wake the loop

    def prepare(self, options: RunOptions | None = None) -> Task | BaseException:
        """Set up the task for ``options`` ahead of the first message (errors are kept)."""
        return self._task(options or self._options)

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the loop gracefully while inside this block."""
        previous = {
            number: signal.signal(number, self._on_signal)
            for number in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _on_signal(self, number: int, frame: types.FrameType | None) -> None:
        self.request_stop(signal.Signals(number).name)

    def run(self) -> int:
        """Consume until idle (returns 0) or stopped (returns 143 after the grace period)."""
        with bound(run_id=self.config.run_id):
            return self._consume()

    def _consume(self) -> int:
        log.info(
            "worker %s consuming run %s (concurrency %d, prefetch %d)",
            self.config.node_name,
            self.config.run_id,
            self.config.concurrency,
            self.config.prefetch,
        )
        idle_since: float | None = None
        next_receive = self.clock()
        empty_polls = 0
        try:
            while True:
                now = self.clock()
                self._renew_due(now)
                self._enforce_timeouts(now)
                if self._stop_reason is not None:
                    if self._shutdown_step(now):
                        return EXIT_STOPPED
                else:
                    self._start_pending()
                    if now >= next_receive and self._free_slots() > 0:
                        got = self._receive()
                        if got:
                            empty_polls, idle_since = 0, None
                            next_receive = now
                        else:
                            empty_polls += 1
                            # Back off while empty: 0.2 s, 0.4 s ... up to the poll interval.
                            next_receive = now + min(
                                self.config.poll_interval_s, 0.2 * 2 ** min(empty_polls, 8)
                            )
                            if not self._deliveries and idle_since is None:
                                idle_since = now
                    if self._deliveries:
                        idle_since = None
                    elif idle_since is not None and self._may_exit_idle(now, now - idle_since):
                        log.info("nothing to do for %.1f s: exiting", now - idle_since)
                        return EXIT_IDLE
                receiving = self._stop_reason is None and self._free_slots() > 0
                self._wait(next_receive if receiving else None)
        finally:
            self._close()

    # -- receiving ----------------------------------------------------------------------
    def _may_exit_idle(self, now: float, idle_for_s: float) -> bool:
        """:func:`may_exit_idle` with the queue's count, asked at most once per poll interval."""
        idle_exit_s = self._idle_exit_s()
        if idle_for_s < idle_exit_s or now < self._next_count_check:
            return False
        self._next_count_check = now + self.config.poll_interval_s
        try:
            queued = self.queues.approximate_count()
        except Exception as error:  # unknown: keep polling; the visibility cap still bounds it
            log.warning("queue count failed (%s): staying", error)
            queued = -1
        visibility = self._options.visibility_timeout_s
        if queued != 0 and not self._lingering:
            self._lingering = True
            log.info(
                "queue empty of visible work but holds %s hidden message(s): staying up to "
                "%.0f s for messages of nodes that died",
                queued if queued > 0 else "unknown",
                visibility,
            )
        return may_exit_idle(
            idle_for_s, idle_exit_s, max(queued, 1) if queued < 0 else queued, visibility
        )

    def _idle_exit_s(self) -> float:
        if self.config.idle_exit_s is not None:
            return self.config.idle_exit_s
        return self._options.idle_exit_s

    def _active_items(self) -> int:
        # Queued and running items alike (``_running`` holds both); abandoned ones no more.
        return sum(1 for job in self._running.values() if job.outcome is None and not job.abandoned)

    def _free_slots(self) -> int:
        return self._intake_limit() - self._active_items()

    def _intake_limit(self) -> int:
        """How many items this node holds at once (running, downloading or waiting).

        A task that is not thread-safe runs one item at a time (a GPU node's usual case), so
        one item waiting, already downloaded, keeps it busy; more would only sit here while
        other nodes run out of work at the end of the run, stretching its tail.
        """
        limit = self.config.concurrency + self.config.prefetch
        task = self._tasks.get(self._current_task_key())
        if task is not None and not isinstance(task, BaseException) and not is_thread_safe(task):
            return min(limit, SERIAL_TASK_INTAKE)
        return limit

    def _current_task_key(self) -> str:
        # Asked on every pass of the loop; the options change only when a message arrives.
        if self._options_key[0] is not self._options:
            self._options_key = (self._options, self._task_key(self._options))
        return self._options_key[1]

    def _receive(self) -> bool:
        # Hidden for the visibility of the options seen last (each message's own options
        # take over at its first renewal, which comes early enough for either).
        visibility = self._options.visibility_timeout_s
        try:
            # Slots count items and a message carries a mini-batch of them.
            wanted = max(1, self._free_slots() // self._options.mini_batch_size)
            messages = self.queues.receive(wanted, visibility_timeout=visibility)
        except Exception as error:  # a storage hiccup: log it and poll again later
            log.warning("receive failed: %s", error)
            return False
        for message in messages:
            self.stats["received"] += 1
            self._accept(message, visibility)
        return bool(messages)

    def _accept(self, message: QueueMessage, received_visibility: int) -> None:
        try:
            work = WorkItem.model_validate_json(message.content)
        except ValidationError as error:
            self._reject_malformed(message, error)
            return
        self._options = work.options
        visibility = work.options.visibility_timeout_s
        now = self.clock()
        delivery = Delivery(
            message=message,
            work=work,
            visibility_s=visibility,
            # Received with another run's (or the default) timeout: switch to this message's
            # own at once, so a crash now does not hide it for longer than its options say.
            renew_at=now if received_visibility != visibility else now + renew_interval(visibility),
        )
        self._deliveries.append(delivery)
        if delivery.renew_at <= now:
            # Switch to the message's own visibility before its item can start: a node killed
            # during the first moments of an item must not hide it for the receive's timeout.
            self._renew_due(now)
        exhausted = delivery.attempt > work.options.max_attempts
        for item in work.items:
            job = ItemJob(delivery=delivery, item=item)
            delivery.jobs.append(job)
            if self._has_record(work.run_id, item.item_id):
                job.outcome = "terminal"
                self.stats["skipped"] += 1
                log.info("item %s already has a terminal record: skipped", item.item_id)
            elif exhausted:
                # Delivered more often than allowed without an outcome: every earlier worker
                # died or timed out on it. Fail it now instead of letting it kill another.
                self._fail_exhausted(job)
            elif item.item_id in self._running:
                self._running[item.item_id].followers.append(job)
                self.stats["duplicates"] += 1
                log.info("item %s is already running here: sharing its outcome", item.item_id)
            else:
                self._running[item.item_id] = job
                self._pending.append(job)
        self._finish_if_resolved(delivery)

    def _has_record(self, run_id: str, item_id: str) -> bool:
        try:
            return self.ledger.has_record(run_id, item_id)
        except Exception as error:  # a failed lookup only costs duplicate work
            log.warning("ledger lookup for %s failed (%s): processing it anyway", item_id, error)
            return False

    def _reject_malformed(self, message: QueueMessage, error: ValidationError) -> None:
        # No valid WorkItem, so no item id to record against; the controller never writes
        # such a message. Record what can be salvaged, then drop it so it cannot loop.
        log.error("malformed message %s dropped: %s", message.id, str(error)[:500])
        try:
            data = json.loads(message.content)
            run_id = str(data.get("run_id", self.config.run_id))
            for raw in data.get("items", []) or []:
                item_id = str(raw.get("item_id", ""))
                result = ItemResult(
                    run_id=run_id,
                    item_id=item_id,
                    status=ItemStatus.FAILED,
                    source=str(raw.get("source", "")),
                    error=ItemError(
                        error_class="MalformedMessage",
                        message=f"the queue message is not a valid WorkItem: {error}"[:2000],
                        permanent=True,
                        attempts=max(1, message.dequeue_count),
                    ),
                    node=self.config.node_name,
                    finished_at=datetime.now(UTC),
                )
                if self.ledger.record(result):
                    self.queues.send("failure", result.model_dump_json())
        except Exception as salvage_error:
            log.error("nothing salvageable in message %s: %s", message.id, salvage_error)
        self._delete(message)

    # -- running items ------------------------------------------------------------------
    def _start_pending(self) -> None:
        running = sum(
            1
            for job in self._running.values()
            if job.started_at is not None and job.outcome is None and not job.abandoned
        )
        while self._pending and running < self.config.concurrency:
            job = self._pending.popleft()
            if job.outcome is not None:
                continue
            job.started_at = self.clock()
            timeout = job.delivery.work.options.item_timeout_s
            job.token.deadline = time.monotonic() + timeout
            thread = threading.Thread(
                target=self._execute, args=(job,), name=f"item-{job.item.item_id}", daemon=True
            )
            thread.start()
            running += 1

    def _execute(self, job: ItemJob) -> None:
        """Runs on the item's own thread: download, task, persist. Never raises."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        outcome: Outcome
        # A new thread starts with empty context: name the run and item on its log lines.
        with bound(run_id=job.delivery.work.run_id, item_id=job.item.item_id):
            try:
                outcome = self._process(job, started, timings)
            except BaseException as error:  # every failure becomes an outcome
                outcome = self._handle_failure(job, error, started, timings)
        job.outcome = outcome
        for follower in job.followers:
            follower.outcome = outcome
        self._events.put(job)

    def _process(self, job: ItemJob, started: float, timings: dict[str, float]) -> Outcome:
        work, item, token = job.delivery.work, job.item, job.token
        task = self._task(work.options)
        if isinstance(task, BaseException):
            raise task
        directory = Path(tempfile.mkdtemp(prefix=f"{item.item_id[:40]}-", dir=self._work_root))
        try:
            token.raise_if_cancelled()
            mark = time.perf_counter()
            path = directory / "source"
            self.storage.download(item.source, path, self.config.limits.max_bytes)
            timings["download_s"] = time.perf_counter() - mark
            token.raise_if_cancelled()
            output = self._run_task(task, work, item, path, job)
            timings["decode_s"] = output.decode_s
            timings["inference_s"] = output.inference_s
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        token.raise_if_cancelled()
        return self._persist_success(job, output, started, timings)

    def _run_task(
        self, task: Task, work: WorkItem, item: ManifestItem, path: Path, job: ItemJob
    ) -> ItemOutput:
        item_input = ItemInput(
            run_id=work.run_id,
            item=item,
            path=path,
            attempt=job.delivery.attempt,
            options=work.options,
            cancel=job.token,
        )
        if is_thread_safe(task):
            return task.process(item_input)
        with self._task_locks[self._task_key(work.options)]:
            return task.process(item_input)

    def _persist_success(
        self, job: ItemJob, output: ItemOutput, started: float, timings: dict[str, float]
    ) -> Outcome:
        """Outputs, then the terminal record, then (if ours was first) the success message."""
        work, item = job.delivery.work, job.item
        prefix = output_prefix(work.run_id, item.item_id)
        names = {check_output_name(name): data for name, data in output.files.items()}
        mark = time.perf_counter()
        written: list[str] = []
        for name, data in sorted(names.items()):
            content_type = output.content_types.get(name, "application/octet-stream")
            self.storage.write_output(prefix + name, data, content_type)
            written.append(prefix + name)
        metadata = {
            **output.metadata,
            "run_id": work.run_id,
            "item_id": item.item_id,
            "source": item.source,
            "row": item.row,
            "manifest_metadata": item.metadata,
            "task": work.options.task,
            "attempt": job.delivery.attempt,
            "node": self.config.node_name,
            "outputs": written,
            "timings": {key: round(value, 4) for key, value in timings.items()},
        }
        self.storage.write_output(
            prefix + METADATA_FILE,
            json.dumps(metadata, indent=2, sort_keys=True, default=str).encode("utf-8"),
            "application/json",
        )
        written.append(prefix + METADATA_FILE)
        timings["upload_s"] = time.perf_counter() - mark
        result = ItemResult(
            run_id=work.run_id,
            item_id=item.item_id,
            status=ItemStatus.SUCCEEDED,
            source=item.source,
            outputs=written,
            timings=_timings(timings, started),
            node=self.config.node_name,
            finished_at=datetime.now(UTC),
        )
        if job.abandoned:
            return "released"  # its message went back to the queue long ago
        if self.ledger.record(result):
            self.queues.send("success", result.model_dump_json())
            self.stats["succeeded"] += 1
            log.info(
                "item %s succeeded: %s frames in %.2f s (%s)",
                item.item_id,
                output.metadata.get("frames", "?"),
                result.timings.total_s,
                ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
            )
        else:
            log.info("item %s finished, but another worker recorded it first", item.item_id)
        return "terminal"

    def _handle_failure(
        self, job: ItemJob, error: BaseException, started: float, timings: dict[str, float]
    ) -> Outcome:
        token = job.token
        if token.reason == "timeout":
            error = ItemTimeoutError(
                f"the item ran past its timeout of {job.delivery.work.options.item_timeout_s:g} s"
            )
        elif token.reason is not None or job.abandoned or self._stop_reason is not None:
            # Cancelled, abandoned, or failing while the worker stops (a Ctrl-C that reached
            # a decoder, storage gone with the node): the item gets another try elsewhere.
            why = token.reason or ("abandoned" if job.abandoned else f"stopping: {error}")
            log.info("item %s released (%s)", job.item.item_id, why)
            return "released"
        info = classify(error)
        job.error = f"{info.error_class}: {info.message}"
        options = job.delivery.work.options
        if not info.permanent:
            log.warning(
                "item %s failed (attempt %d of %d): %s",
                job.item.item_id,
                job.delivery.attempt,
                options.max_attempts,
                job.error,
                exc_info=not isinstance(error, Exception) or _unexpected(error),
            )
        if decide(info, job.delivery.attempt, options.max_attempts) == "retry":
            self.stats["retried"] += 1
            return "retry"
        self._record_failure(job, info, _timings(timings, started))
        return "terminal"

    def _fail_exhausted(self, job: ItemJob) -> None:
        options = job.delivery.work.options
        info = ErrorInfo(
            error_class="AttemptsExhausted",
            message=(
                f"delivered {job.delivery.attempt} times (max_attempts {options.max_attempts}) "
                "without an outcome: the workers processing it died or lost it each time"
            ),
            permanent=False,
        )
        try:
            self._record_failure(job, info, StageTimings())
            job.outcome = "terminal"
        except Exception as error:  # leave the message for another try
            log.warning("could not record exhausted item %s: %s", job.item.item_id, error)
            job.outcome = "retry"

    def _record_failure(self, job: ItemJob, info: ErrorInfo, timings: StageTimings) -> None:
        work = job.delivery.work
        result = ItemResult(
            run_id=work.run_id,
            item_id=job.item.item_id,
            status=ItemStatus.FAILED,
            source=job.item.source,
            timings=timings,
            error=ItemError(
                error_class=info.error_class,
                message=info.message,
                permanent=info.permanent,
                attempts=job.delivery.attempt,
            ),
            node=self.config.node_name,
            finished_at=datetime.now(UTC),
        )
        if self.ledger.record(result):
            self.queues.send("failure", result.model_dump_json())
            self.stats["failed"] += 1
        log.warning(
            "item %s failed for good after %d attempt(s): %s: %s",
            job.item.item_id,
            job.delivery.attempt,
            info.error_class,
            info.message,
        )

    # -- tasks --------------------------------------------------------------------------
    @staticmethod
    def _task_key(options: RunOptions) -> str:
        return options.model_dump_json(
            include={"task", "model", "frame_size", "inference_batch_size"}
        )

    def _task(self, options: RunOptions) -> Task | BaseException:
        """The task for ``options``, set up once per process (a setup error is kept too)."""
        key = self._task_key(options)
        with self._setup_lock:
            found = self._tasks.get(key)
            if found is None:
                setup = TaskSetup(
                    options=options,
                    limits=self.config.limits,
                    weights_dir=self.config.weights_dir,
                    mixed_precision=self.config.mixed_precision,
                    concurrency=self.config.concurrency,
                    decode_threads=self.config.decode_threads,
                    work_dir=self._work_root,
                )
                try:
                    found = self.task_factory(setup)
                except Exception as error:  # kept: every item reports it
                    log.error("task %s cannot be set up: %s", options.task, error)
                    found = error
                self._tasks[key] = found
                self._task_locks[key] = threading.Lock()
            return found

    # -- visibility, timeouts, completion -----------------------------------------------
    def _renew_due(self, now: float) -> None:
        for delivery in self._deliveries:
            if delivery.finished or delivery.lost or now < delivery.renew_at:
                continue
            try:
                delivery.message = self.queues.update_visibility(
                    delivery.message, delivery.visibility_s
                )
                delivery.renew_at = now + renew_interval(delivery.visibility_s)
            except Exception as error:  # decided from the status below
                if getattr(error, "status_code", None) in (400, 404):
                    # The receipt is stale: the message reappeared and another worker holds
                    # it. Our results still count (first record wins); we cannot delete it.
                    delivery.lost = True
                    log.warning("lost message %s (%s)", delivery.message.id, error)
                else:
                    delivery.renew_at = now + 2.0
                    log.warning("renewing %s failed, retrying: %s", delivery.message.id, error)

    def _enforce_timeouts(self, now: float) -> None:
        for job in list(self._running.values()):
            if job.started_at is None or job.outcome is not None or job.abandoned:
                continue
            timeout = job.delivery.work.options.item_timeout_s
            if now - job.started_at > timeout and not job.token.cancelled:
                log.warning("item %s ran past %g s: cancelling", job.item.item_id, timeout)
                job.token.cancel("timeout")
            if now - job.started_at > timeout + ABANDON_AFTER_S:
                # The task ignores cancellation: give its message back and free the slot;
                # whatever the thread writes later is harmless (names and ledger are keyed).
                log.error("item %s ignores its cancellation: abandoned", job.item.item_id)
                job.abandoned = True
                job.outcome = "retry"
                job.error = "ItemTimeoutError: the task did not stop after its timeout"
                for follower in job.followers:
                    follower.outcome = "retry"
                self._events.put(job)

    def _wait(self, next_receive: float | None) -> None:
        """Sleep until an item finishes or the next receive, renewal, timeout or deadline."""
        now = self.clock()
        deadlines = [now + self.config.poll_interval_s]
        if next_receive is not None:
            deadlines.append(next_receive)
        deadlines.extend(d.renew_at for d in self._deliveries if not d.finished and not d.lost)
        deadlines.extend(
            job.started_at + job.delivery.work.options.item_timeout_s
            for job in self._running.values()
            if job.started_at is not None and job.outcome is None and not job.token.cancelled
        )
        if self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        timeout = max(0.01, min(deadlines) - now)
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        self._complete(event)
        while True:  # drain whatever else finished meanwhile
            try:
                self._complete(self._events.get_nowait())
            except queue.Empty:
                return

    def _complete(self, job: ItemJob | None) -> None:
        if job is None:
            return
        if self._running.get(job.item.item_id) is job:
            del self._running[job.item.item_id]
        for delivery in {id(j.delivery): j.delivery for j in [job, *job.followers]}.values():
            self._finish_if_resolved(delivery)

    def _finish_if_resolved(self, delivery: Delivery) -> None:
        if delivery.finished or not delivery.resolved():
            return
        delivery.finished = True
        self._deliveries.remove(delivery)
        outcomes = {job.outcome for job in delivery.jobs}
        if delivery.lost:
            return
        if outcomes == {"terminal"}:
            self._delete(delivery.message)
        elif "retry" in outcomes:
            delay = retry_delay(delivery.attempt, self.config.retry_delay_s)
            self._release(delivery, delay)
        else:
            self._release(delivery, 0)

    def _delete(self, message: QueueMessage) -> None:
        try:
            self.queues.delete_message(message)
        except Exception as error:  # it reappears, and its recorded items are skipped
            log.warning(
                "deleting %s failed (%s): it will reappear and be skipped", message.id, error
            )

    def _release(self, delivery: Delivery, delay_s: int) -> None:
        try:
            self.queues.update_visibility(delivery.message, delay_s)
            self.stats["released"] += 1
        except Exception as error:  # it reappears at its timeout anyway
            log.warning("releasing %s failed: %s", delivery.message.id, error)

    # -- shutdown -----------------------------------------------------------------------
    def _shutdown_step(self, now: float) -> bool:
        """One step of a graceful stop; True once everything is finished or released."""
        if self._stop_deadline is None:
            self._stop_deadline = now + self.config.shutdown_grace_s
            log.info(
                "%s: intake stopped; %d item(s) in flight get %.0f s to finish",
                self._stop_reason,
                self._active_items() - len(self._pending),
                self.config.shutdown_grace_s,
            )
            # Items not started yet go straight back to the queue.
            while self._pending:
                job = self._pending.popleft()
                job.outcome = "released"
                for follower in job.followers:
                    follower.outcome = "released"
                self._complete(job)
        if not self._deliveries:
            return True
        if now < self._stop_deadline:
            return False
        for delivery in list(self._deliveries):
            for job in delivery.jobs:
                if job.outcome is None:
                    job.token.cancel("shutdown")
                    job.abandoned = True
                    job.outcome = "released"
            self._finish_if_resolved(delivery)
        log.info("grace period over: in-flight messages released")
        return True

    def _close(self) -> None:
        for task in self._tasks.values():
            if not isinstance(task, BaseException):
                with contextlib.suppress(Exception):
                    task.close()
        shutil.rmtree(self._work_root, ignore_errors=True)


def _timings(timings: dict[str, float], started: float) -> StageTimings:
    return StageTimings(
        download_s=round(timings.get("download_s", 0.0), 4),
        decode_s=round(timings.get("decode_s", 0.0), 4),
        inference_s=round(timings.get("inference_s", 0.0), 4),
        upload_s=round(timings.get("upload_s", 0.0), 4),
        total_s=round(time.perf_counter() - started, 4),
    )


def _unexpected(error: BaseException) -> bool:
    # Our own errors explain themselves; anything else gets its traceback in the log.
    return getattr(type(error), "permanent", None) is None


def build_worker(settings: WorkerSettings) -> tuple[Worker, Callable[[], None]]:
    """A Worker over the real storage adapters, and a function that closes them."""
    queues = RunQueues(settings, settings.run_id)
    ledger = Ledger(settings)
    storage = BlobItemStorage(settings)
    worker = Worker(WorkerConfig.from_settings(settings), queues, ledger, storage)

    def close() -> None:
        for closer in (queues.close, ledger.close, storage.close):
            with contextlib.suppress(Exception):
                closer()

    return worker, close
