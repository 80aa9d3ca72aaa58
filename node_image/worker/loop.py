"""The consumer loop: intake, dedupe, timeouts, acknowledgement and shutdown, on one thread.

Protocol, per message (a :class:`~batchctl.contracts.WorkItem`, one or a few items):

1. Receive it (with a small prefetch) hidden for the run's visibility timeout; renew that
   visibility every third of it while any of its items is in flight.
2. Skip items that already have a terminal record (a duplicate delivery, or an earlier
   worker that died after recording). An item already running here from another copy of the
   message shares that run's outcome instead of running twice.
3. Run each remaining item on its own thread (download, task, outputs): write its outputs
   and report its terminal record. Once every item of the message has a record or an
   outcome, the loop writes the message's records together (one ledger transaction per
   shard; the ledger's first record wins). Only when every item of the message is terminal
   is the input message deleted.
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
9. Segments (``segment_seconds``, :mod:`.segments`): an item thread that finds its video
   longer than a segment reports a split instead of an outcome; the loop sends one message
   per segment and only then counts the item's job as terminal (its message is deleted once
   its mini-batch settles). A send that fails retries the whole item, which splits again
   into the same segments. Each segment is then a job like an item's, keyed by its own id
   for dedupe, with its own message, attempts, timeout and shutdown handling.

The parts, split as Dramatiq splits its consumer and worker threads:

- :mod:`.leases`: the queue (receive, renew, release, delete, count), owned by this loop's
  thread alone;
- :mod:`.execution`: an item on its own thread (download, task, record), reporting back
  through a queue, so every job's outcome is written here, on the loop thread, only;
- :mod:`.recording`: outputs and terminal records;
- :mod:`.policy`: every decision as a small pure function.

Storage is reached through small protocols, so tests drive the real loop over an in-memory
stub as well as over Azurite. Every time the loop reads comes from its injected clocks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import signal
import tempfile
import time
import types
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from batchctl.contracts import ItemStatus, NodeSpec, StageTimings, WorkItem
from batchctl.logs import bound
from batchctl.outputs_index import fingerprint
from batchctl.settings import WorkerSettings
from batchctl.storage import BlobStore, Ledger, QueueMessage, RunQueues
from batchctl.storage.faults import describe as describe_storage_error
from batchctl.storage.items import BlobItemStorage, LocalOutputCopies
from batchctl.storage.ledger import PartiallyRecordedError

from .config import WorkerConfig
from .errors import ErrorInfo
from .execution import ItemExecutor, SourceReader, TaskCache, task_deadline
from .jobs import Delivery, Finished, ItemJob
from .leases import Lease, WorkQueue
from .metrics import node_metrics
from .ownwork import cache_root, own_work_factory
from .policy import (
    ABANDON_AFTER_S,
    EXIT_IDLE,
    EXIT_STOPPED,
    MAX_RETRY_DELAY_S,
    SERIAL_TASK_INTAKE,
    Decision,
    Outcome,
    decide,
    empty_poll_delay,
    intake_limit,
    may_exit_idle,
    messages_wanted,
    overdue,
    renew_interval,
    retry_delay,
    settle,
)
from .recording import (
    METADATA_FILE,
    OutputWriter,
    Recorder,
    ResultLedger,
    check_output_name,
    output_prefix,
)
from .segments import (
    BlobSegmentStorage,
    OutputReader,
    SegmentLeases,
    SegmentLedger,
    SplitFinished,
    job_key,
    segment_messages,
)
from .sourcecache import SourceCache
from .tasks import Task, TaskSetup, create_task, is_thread_safe

log = logging.getLogger(__name__)


class ItemStorage(SourceReader, OutputWriter, Protocol):
    """Downloads of sources and writes of outputs (``BlobItemStorage`` has exactly this)."""


def utc_now() -> datetime:
    """The wall clock records are stamped with (``finished_at``)."""
    return datetime.now(UTC)


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
        wall_clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        # Monotonic seconds for every deadline the loop keeps (renewals, timeouts, idle
        # exit, shutdown grace); a test may drive it.
        self.clock = clock
        self.leases = SegmentLeases(queues)
        self.recorder = Recorder(
            ledger,
            storage,
            node_name=config.node_name,
            task_name=config.spec.task,
            wall_clock=wall_clock,
            ran={
                "task": config.spec.task,
                "model": config.spec.model,
                "code": config.spec.code,
                "image": config.spec.image,
            },
            # None: no index (storage that no later run reads).
            index_fingerprint=fingerprint(config.spec.task_settings(), config.spec.image)
            if config.index_outputs
            else None,
        )
        self._work_root = Path(
            tempfile.mkdtemp(prefix="batchctl-worker-", dir=config.work_dir or None)
        )
        self.tasks = TaskCache(task_factory, self._task_setup)
        # Item threads report here; None only wakes the loop (a stop request).
        # A SimpleQueue: its put is reentrant, so a signal handler may wake the loop with it
        # (a Queue's put takes a lock the interrupted main thread may be holding).
        self._reports: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()
        self.executor = ItemExecutor(
            sources=storage,
            recorder=self.recorder,
            tasks=self.tasks,
            spec=lambda: self.spec,
            max_bytes=config.limits.max_bytes,
            work_root=self._work_root,
            stopping=lambda: self._stop_reason is not None,
            report=self._reports.put,
            limits=config.limits,
            segment_ledger=ledger if isinstance(ledger, SegmentLedger) else None,
            outputs_reader=storage if isinstance(storage, OutputReader) else None,
            source_cache=SourceCache(
                storage, self._work_root / "source-cache", budget_bytes=config.source_cache_bytes
            )
            if config.spec.segment_seconds is not None and config.source_cache_bytes > 0
            else None,
        )
        if config.spec.segment_seconds is not None and not (
            self.leases.can_send
            and self.executor.segment_ledger is not None
            and self.executor.outputs_reader is not None
        ):
            log.warning(
                "segment_seconds is set, but this worker's queue, ledger or storage cannot "
                "hold segments: long videos run whole here"
            )
        self._deliveries: list[Delivery] = []
        self._pending: deque[ItemJob] = deque()
        # Job key (the item id, or a segment's) -> its job running (or queued) here.
        self._running: dict[str, ItemJob] = {}
        self._stop_reason: str | None = None
        self._stop_deadline: float | None = None
        self._no_grace = False
        self._next_count_check = float("-inf")
        self._lingering = False
        self.stats: dict[str, int] = {
            "received": 0,
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
            "skipped": 0,
            "released": 0,
            "duplicates": 0,
            "split": 0,
        }

    # -- public -------------------------------------------------------------------------
    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Stop intake now; in-flight items get the grace period (safe from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._reports.put(None)  # wake the loop

    def stop_now(self, reason: str) -> None:
        """Stop with no grace period: in-flight items are cancelled and their messages released
        at once (safe from any thread). For a node whose controller has died: nobody will use
        what it finishes now, and ``batchctl resume`` runs whatever has no record."""
        self._no_grace = True
        self.request_stop(reason)

    @property
    def spec(self) -> NodeSpec:
        """The job's node spec: how every item of this job is processed (fixed per job)."""
        return self.config.spec

    def prepare(self) -> Task | BaseException:
        """Set up the task ahead of the first message (errors are kept)."""
        return self.tasks.get()

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
        # A handler runs in the main thread between two bytecodes, possibly while that thread
        # holds a lock (a Queue's put here once froze a worker on SIGTERM from a controller's
        # death): only the reentrant SimpleQueue.put, which wakes the loop at once rather than
        # at its next poll (a run's teardown waits for every worker to exit).
        if self._stop_reason is None:
            self._stop_reason = signal.Signals(number).name
        self._reports.put(None)

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
                        if self._receive():
                            empty_polls, idle_since = 0, None
                            next_receive = now
                            # Start what came in now: a receive that filled every slot
                            # left nothing to wake the wait below, and the items it brought
                            # sat idle for a whole poll interval (a run's first second).
                            self._start_pending()
                        else:
                            empty_polls += 1
                            next_receive = now + empty_poll_delay(
                                empty_polls, self.config.poll_interval_s
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

    # -- intake -------------------------------------------------------------------------
    def _may_exit_idle(self, now: float, idle_for_s: float) -> bool:
        """:func:`may_exit_idle` with the queue's count, asked at most once per poll interval."""
        idle_exit_s = self._idle_exit_s()
        if idle_for_s < idle_exit_s or now < self._next_count_check:
            return False
        self._next_count_check = now + self.config.poll_interval_s
        queued = self.leases.count()
        visibility = self.spec.visibility_timeout_s
        if queued != 0 and not self._lingering:
            self._lingering = True
            log.info(
                "queue empty of visible work but holds %s hidden message(s): staying up to "
                "%.0f s for messages of nodes that died",
                queued if queued is not None else "unknown",
                visibility,
            )
        # Unknown counts as not empty: keep polling; the visibility cap still bounds the stay.
        return may_exit_idle(idle_for_s, idle_exit_s, 1 if queued is None else queued, visibility)

    def _idle_exit_s(self) -> float:
        return float(self.spec.idle_exit_s)

    def _active_items(self) -> int:
        # Queued and running items alike (``_running`` holds both); abandoned ones no more,
        # nor those whose record only waits for the rest of their message.
        return sum(1 for job in self._running.values() if job.in_flight())

    def _free_slots(self) -> int:
        return self._intake_limit() - self._active_items()

    def _intake_limit(self) -> int:
        task = self.tasks.peek()
        serial = (
            task is not None and not isinstance(task, BaseException) and not is_thread_safe(task)
        )
        return intake_limit(self.config.concurrency, self.config.prefetch, serial_task=serial)

    def _receive(self) -> bool:
        visibility = self.spec.visibility_timeout_s
        wanted = messages_wanted(self._free_slots(), self.spec.items_per_message)
        messages = self.leases.receive(wanted, visibility)
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
        now = self.clock()
        lease = Lease(
            message=message,
            visibility_s=received_visibility,
            renew_at=now + renew_interval(received_visibility),
        )
        delivery = Delivery(lease=lease, work=work)
        self._deliveries.append(delivery)
        exhausted = delivery.attempt > self.spec.max_attempts
        # One lookup for the whole message. A segment of an item with its record still goes
        # to an item thread: there it deletes the parts a worker killed after the record may
        # have left.
        recorded = self.recorder.recorded_among(
            work.run_id, [item.item_id for item in work.items if item.segment is None]
        )
        for item in work.items:
            job = ItemJob(delivery=delivery, item=item)
            delivery.jobs.append(job)
            if item.segment is None and item.item_id in recorded:
                job.outcome = "terminal"
                self.stats["skipped"] += 1
                log.info("item %s already has a terminal record: skipped", item.item_id)
            elif exhausted:
                # Delivered more often than allowed without an outcome: every earlier worker
                # died or timed out on it. Fail it now instead of letting it kill another.
                self._fail_exhausted(job)
            elif job_key(item) in self._running:
                job.leader = self._running[job_key(item)]
                job.leader.followers.append(job)
                self.stats["duplicates"] += 1
                log.info("%s is already running here: sharing its outcome", job_key(item))
            else:
                self._running[job_key(item)] = job
                self._pending.append(job)
        self._finish_if_resolved(delivery)

    def _reject_malformed(self, message: QueueMessage, error: ValidationError) -> None:
        # No valid WorkItem, so no item id to record against; the controller never writes
        # such a message. Record what can be salvaged, then drop it so it cannot loop.
        log.error("malformed message %s dropped: %s", message.id, str(error)[:500])
        self.recorder.record_malformed(
            message.id,
            message.content,
            str(error),
            run_id=self.config.run_id,
            attempts=max(1, message.dequeue_count),
        )
        self.leases.delete(message)

    def _fail_exhausted(self, job: ItemJob) -> None:
        options = self.spec
        info = ErrorInfo(
            error_class="AttemptsExhausted",
            message=(
                f"delivered {job.delivery.attempt} times (max_attempts {options.max_attempts}) "
                "without an outcome: the workers processing it died or lost it each time"
            ),
            permanent=False,
        )
        try:
            first = self.recorder.record_failure(
                job.delivery.work.run_id,
                job.item,
                info,
                attempts=job.delivery.attempt,
                timings=StageTimings(),
            )
        except Exception as error:  # leave the message for another try
            log.warning("could not record exhausted item %s: %s", job.item.item_id, error)
            job.outcome = "retry"
            return
        if first:
            self.stats["failed"] += 1
        job.outcome = "terminal"

    # -- running items ------------------------------------------------------------------
    def _task_setup(self) -> TaskSetup:
        return TaskSetup(
            options=self.spec.task_settings(),
            limits=self.config.limits,
            weights_dir=self.config.weights_dir,
            mixed_precision=self.config.mixed_precision,
            concurrency=self.config.concurrency,
            decode_threads=self.config.decode_threads,
            work_dir=self._work_root,
        )

    def _start_pending(self) -> None:
        running = sum(
            1 for job in self._running.values() if job.started_at is not None and job.in_flight()
        )
        while self._pending and running < self.config.concurrency:
            job = self._pending.popleft()
            if job.outcome is not None:
                continue
            job.started_at = self.clock()
            job.token.deadline = task_deadline(self.spec.item_timeout_s)
            self.executor.start(job)
            running += 1

    def _set_outcome(self, job: ItemJob, outcome: Outcome) -> None:
        job.outcome = outcome
        for follower in job.followers:
            follower.outcome = outcome

    def _on_finished(self, report: Finished) -> None:
        """An item thread's report: count its record, settle its job (unless given up)."""
        job = report.job
        if report.recorded is not None:
            self._count_recorded(report.recorded)
        if job.outcome is None and report.pending is not None:
            # Its record waits for the rest of its message (and the messages of jobs that
            # follow it may now have all their own items done).
            job.pending = report.pending
            for delivery in {id(j.delivery): j.delivery for j in [job, *job.followers]}.values():
                self._finish_if_resolved(delivery)
            return
        if job.outcome is None:  # not abandoned or released by the loop meanwhile
            outcome = report.outcome
            if isinstance(report, SplitFinished):
                outcome = self._send_segments(job, report)
            if outcome == "retry":
                self.stats["retried"] += 1
            self._set_outcome(job, outcome)
        self._complete(job)

    def _count_recorded(self, status: ItemStatus) -> None:
        self.stats["succeeded" if status is ItemStatus.SUCCEEDED else "failed"] += 1

    def _record_pending(self, delivery: Delivery) -> None:
        """Write the records waiting on ``delivery``'s jobs together (one ledger transaction
        per shard), then settle those jobs: terminal once written, retried when the ledger
        cannot be written (their message comes back; the first record still wins)."""
        jobs = delivery.unrecorded()
        results = [job.pending for job in jobs if job.pending is not None]
        outcome: Outcome = "terminal"
        try:
            first = self.recorder.record_all(results)
        except Exception as error:  # the ledger is down: the message will reappear
            # Some shards' records may have gone through first: those items are done.
            first = error.written if isinstance(error, PartiallyRecordedError) else set()
            cause = error.__cause__ if isinstance(error, PartiallyRecordedError) else error
            log.warning(
                "could not record %d item(s) of run %s (%s): their message will reappear",
                len(results) - len(first),
                delivery.work.run_id,
                describe_storage_error(cause or error),
            )
            outcome = "retry"
        for job in jobs:
            result = job.pending
            job.pending = None
            assert result is not None
            if (result.run_id, result.item_id) in first:
                self._count_recorded(result.status)
                self._set_outcome(job, "terminal")
                continue
            if outcome == "terminal":
                log.info("item %s finished, but another worker recorded it first", result.item_id)
            else:
                self.stats["retried"] += 1
            self._set_outcome(job, outcome)
        for job in jobs:
            self._complete(job)

    def _send_segments(self, job: ItemJob, report: SplitFinished) -> Outcome:
        """Send a split item's segment messages; terminal for its message once all went."""
        messages = segment_messages(job.delivery.work.run_id, job.item, report.segments)
        try:
            self.leases.send_all(messages)
        except Exception as error:  # the item comes back and splits again, identically
            log.warning("could not send the segments of %s (%s): retrying", job.item.item_id, error)
            return "retry"
        self.stats["split"] += 1
        log.info("item %s: %d segment messages sent", job.item.item_id, len(messages))
        return "terminal"

    # -- visibility, timeouts, completion -----------------------------------------------
    def _renew_due(self, now: float) -> None:
        for delivery in self._deliveries:
            lease = delivery.lease
            if delivery.finished or lease.lost or now < lease.renew_at:
                continue
            self.leases.renew(lease, now)

    def _enforce_timeouts(self, now: float) -> None:
        for job in list(self._running.values()):
            if job.started_at is None or not job.in_flight():
                continue
            timeout = self.spec.item_timeout_s
            stage = overdue(now - job.started_at, timeout)
            if stage == "on_time":
                continue
            if not job.token.cancelled:
                log.warning("item %s ran past %g s: cancelling", job.item.item_id, timeout)
                job.token.cancel("timeout")
            if stage == "abandon":
                # The task ignores cancellation: give its message back and free the slot;
                # whatever the thread writes later is harmless (names and ledger are keyed).
                log.error(
                    "item %s ignores its cancellation: abandoned "
                    "(ItemTimeoutError: the task did not stop after its timeout)",
                    job.item.item_id,
                )
                job.abandoned.set()
                self._set_outcome(job, "retry")
                self._complete(job)

    def _wait(self, next_receive: float | None) -> None:
        """Sleep until an item finishes or the next receive, renewal, timeout or deadline."""
        now = self.clock()
        deadlines = [now + self.config.poll_interval_s]
        if next_receive is not None:
            deadlines.append(next_receive)
        deadlines.extend(
            d.lease.renew_at for d in self._deliveries if not d.finished and not d.lease.lost
        )
        deadlines.extend(
            job.started_at + self.spec.item_timeout_s
            for job in self._running.values()
            if job.started_at is not None and job.in_flight() and not job.token.cancelled
        )
        if self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        timeout = max(0.01, min(deadlines) - now)
        try:
            report = self._reports.get(timeout=timeout)
        except queue.Empty:
            return
        while True:  # this one, then whatever else finished meanwhile
            if report is not None:
                self._on_finished(report)
            try:
                report = self._reports.get_nowait()
            except queue.Empty:
                return

    def _complete(self, job: ItemJob) -> None:
        if self._running.get(job_key(job.item)) is job:
            del self._running[job_key(job.item)]
        for delivery in {id(j.delivery): j.delivery for j in [job, *job.followers]}.values():
            self._finish_if_resolved(delivery)

    def _finish_if_resolved(self, delivery: Delivery) -> None:
        if delivery.finished:
            return
        if delivery.ready() and delivery.unrecorded():
            self._record_pending(delivery)  # settles this delivery too, once resolved
            return
        if not delivery.resolved():
            return
        delivery.finished = True
        self._deliveries.remove(delivery)
        if delivery.lease.lost:
            return
        action = settle([job.outcome for job in delivery.jobs if job.outcome is not None])
        if action == "delete":
            self.leases.delete(delivery.lease.message)
        elif action == "retry":
            self._release(delivery, retry_delay(delivery.attempt, self.config.retry_delay_s))
        else:
            self._release(delivery, 0)

    def _release(self, delivery: Delivery, delay_s: int) -> None:
        if self.leases.release(delivery.lease, delay_s):
            self.stats["released"] += 1

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
                self._set_outcome(job, "released")
                self._complete(job)
        if self._no_grace:
            # stop_now may come after a SIGTERM's grace period has begun: it ends that period.
            self._stop_deadline = min(self._stop_deadline, now)
        if not self._deliveries:
            return True
        if now < self._stop_deadline:
            return False
        for delivery in list(self._deliveries):
            for job in delivery.jobs:
                if job.outcome is None and job.pending is None:  # a finished one is recorded
                    job.token.cancel("shutdown")
                    job.abandoned.set()
                    job.outcome = "released"
            self._finish_if_resolved(delivery)
        log.info("grace period over: in-flight messages released")
        return True

    def _close(self) -> None:
        self.recorder.close()
        self.tasks.close()
        shutil.rmtree(self._work_root, ignore_errors=True)


def build_worker(settings: WorkerSettings) -> tuple[Worker, Callable[[], None]]:
    """A Worker over the real storage adapters, and a function that closes them."""
    queues = RunQueues(settings, settings.run_id)
    ledger = Ledger(settings)
    # The node's progress in the AML studio (metrics.py); None off AML: nothing is logged.
    metrics = node_metrics(os.environ)
    # Reads outputs back too: an assembler reads the segments' parts.
    # A local worker reads the manifest's local videos in place (local mode's media root),
    # and a node of `batchctl run` writes the outputs into the run's folder too.
    local_root = Path(settings.local_media_root) if settings.local_media_root else None
    local_outputs = (
        LocalOutputCopies(Path(settings.local_outputs_dir), settings.run_id)
        if settings.local_outputs_dir
        else None
    )
    storage = BlobSegmentStorage(settings, local_root=local_root, local_outputs=local_outputs)
    config = WorkerConfig.from_settings(settings)
    # The run's own model file and code package come from its storage (ownwork.py).
    artifacts = BlobStore(settings)
    factory = own_work_factory(
        artifacts, settings.media_container, cache_root(config.work_dir), create_task
    )
    observed = metrics.observing(ledger) if metrics is not None else ledger
    worker = Worker(config, queues, observed, storage, task_factory=factory)

    def close() -> None:
        closers = (queues.close, ledger.close, storage.close, artifacts.close)
        for closer in (*((metrics.close,) if metrics is not None else ()), *closers):
            with contextlib.suppress(Exception):
                closer()

    return worker, close


# The names tests, the bench and __main__ import from here, wherever they now live.
__all__ = [
    "ABANDON_AFTER_S",
    "EXIT_IDLE",
    "EXIT_STOPPED",
    "MAX_RETRY_DELAY_S",
    "METADATA_FILE",
    "SERIAL_TASK_INTAKE",
    "BlobItemStorage",
    "Decision",
    "Delivery",
    "ItemJob",
    "ItemStorage",
    "Outcome",
    "ResultLedger",
    "WorkQueue",
    "Worker",
    "WorkerConfig",
    "build_worker",
    "check_output_name",
    "decide",
    "may_exit_idle",
    "output_prefix",
    "renew_interval",
    "retry_delay",
    "utc_now",
]
