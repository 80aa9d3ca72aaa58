"""Running one item on its own thread: download, task, outputs. No queue I/O.

An item thread knows nothing about queues (as in Dramatiq, the work never sees the broker):
it downloads the source, runs the task, writes the outputs (:mod:`.recording`), and reports
what became of the item as a :class:`~.jobs.Finished` to the loop, which alone decides what
happens to the message and writes the job's outcome. An item's terminal record travels in
its report: the loop writes the records of a message's items together (one ledger
transaction per shard). A segment's item is the exception: the thread that completes its
set of segments assembles and records it at once (its parts are deleted only after).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from batchctl.contracts import ItemStatus, ManifestItem, NodeSpec, WorkItem
from batchctl.logs import bound
from batchctl.storage.faults import describe as describe_storage_error
from batchctl.storage.items import Downloaded

from .errors import ItemTimeoutError, SourceChangedError, classify
from .jobs import Finished, ItemJob
from .media import MediaLimits, probe, timestamps_jump
from .policy import after_failure
from .recording import (
    FileOutputWriter,
    Recorder,
    check_output_name,
    output_prefix,
    stage_timings,
)
from .segments import (
    AssemblyContext,
    OutputDeleter,
    OutputReader,
    SegmentLedger,
    SegmentPart,
    SegmentResult,
    SplitFinished,
    add_timings,
    can_segment,
    is_complete,
    one_version,
    parse_rows,
    part_blobs,
    plan_segments,
    segment_output_name,
    whole,
)
from .sourcecache import SourceCache
from .tasks import CancelToken, ItemInput, ItemOutput, Task, TaskSetup, is_thread_safe

log = logging.getLogger(__name__)


class SourceReader(Protocol):
    """Where sources come from (``BlobItemStorage`` reads them from blob storage)."""

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded: ...


def task_deadline(timeout_s: float) -> float:
    """The item's deadline on its cancel token, in ``time.monotonic`` seconds.

    Not the loop's injected clock: ``CancelToken.remaining()`` reads ``time.monotonic``
    itself, and tasks use what it returns for real blocking timeouts (waiting on a decoder),
    which a driven test clock must not shorten or stretch. The loop enforces the timeout
    with its own (injected) clock.
    """
    return time.monotonic() + timeout_s


def _elapsed(since: float) -> float:
    # Stage durations for the record: perf_counter is the finest clock there is, and a
    # reported duration is never compared with a deadline, so no injected clock is needed.
    return time.perf_counter() - since


class TaskCache:
    """The job's task, set up once per process (a setup error is kept: every item reports it).

    One job runs one task: its NodeSpec is fixed when the node starts, so there is exactly
    one task to set up, by whichever thread asks first.
    """

    def __init__(
        self, factory: Callable[[TaskSetup], Task], setup: Callable[[], TaskSetup]
    ) -> None:
        self._factory = factory
        self._setup = setup
        self._task: Task | BaseException | None = None
        self._setup_lock = threading.Lock()
        # Runs a task that is not thread-safe one item at a time.
        self.lock = threading.Lock()

    def get(self) -> Task | BaseException:
        """The task, set up on first use."""
        with self._setup_lock:
            if self._task is None:
                setup = self._setup()
                try:
                    self._task = self._factory(setup)
                except Exception as error:  # kept: every item reports it
                    log.error("task %s cannot be set up: %s", setup.options.task, error)
                    self._task = error
            return self._task

    def peek(self) -> Task | BaseException | None:
        """The task if it is set up already, without setting it up."""
        return self._task

    def close(self) -> None:
        if self._task is not None and not isinstance(self._task, BaseException):
            with contextlib.suppress(Exception):
                self._task.close()


class ItemExecutor:
    """Starts item threads; each reports exactly one :class:`Finished` through ``report``."""

    def __init__(
        self,
        *,
        sources: SourceReader,
        recorder: Recorder,
        tasks: TaskCache,
        spec: Callable[[], NodeSpec],
        max_bytes: int,
        work_root: Path,
        stopping: Callable[[], bool],
        report: Callable[[Finished], None],
        limits: MediaLimits | None = None,
        segment_ledger: SegmentLedger | None = None,
        outputs_reader: OutputReader | None = None,
        source_cache: SourceCache | None = None,
    ) -> None:
        self.spec = spec
        self.limits = limits or MediaLimits(max_bytes=max_bytes)
        # Segments need both (node_image/worker/segments.py); without them nothing splits.
        self.segment_ledger = segment_ledger
        self.outputs_reader = outputs_reader
        # A long video's segments on this node share one download (sourcecache.py).
        self.source_cache = source_cache
        self.sources = sources
        self.recorder = recorder
        self.tasks = tasks
        self.max_bytes = max_bytes
        self.work_root = work_root
        self.stopping = stopping
        self.report = report

    def start(self, job: ItemJob) -> None:
        thread = threading.Thread(
            target=self._execute, args=(job,), name=f"item-{job.item.item_id}", daemon=True
        )
        thread.start()

    def _execute(self, job: ItemJob) -> None:
        """Runs on the item's own thread: download, task, record. Never raises."""
        started = time.perf_counter()  # for the reported total (see _elapsed)
        timings: dict[str, float] = {}
        # A new thread starts with empty context: name the run and item on its log lines.
        with bound(run_id=job.delivery.work.run_id, item_id=job.item.item_id):
            try:
                finished = self._process(job, started, timings)
            except BaseException as error:  # every failure becomes an outcome
                try:
                    finished = self._failed(job, error, started, timings)
                except Exception as record_error:  # the ledger is down: try again later
                    # One line naming the run and item: the SDK's error runs to several
                    # lines (request id, time, the whole error body) and names neither.
                    log.warning(
                        "could not record item %s of run %s (%s): its message will reappear",
                        job.item.item_id,
                        job.delivery.work.run_id,
                        describe_storage_error(record_error),
                    )
                    finished = Finished(job, "retry")
        self.report(finished)

    def _process(self, job: ItemJob, started: float, timings: dict[str, float]) -> Finished:
        work, item, token = job.delivery.work, job.item, job.token
        task = self.tasks.get()
        if isinstance(task, BaseException):
            raise task
        if item.segment is not None:
            if self.recorder.has_record(work.run_id, item.item_id):
                # Assembled or failed already (the loop lets segments through to here): what
                # is left is the parts a worker killed before deleting them left behind.
                self._cleanup_parts(work.run_id, item.item_id)
                return Finished(job, "terminal")
            rows = parse_rows(self._segments().segment_payloads(work.run_id, item.item_id))
            if item.segment.index in rows:
                # Done before (a duplicate, or its worker died before the item was
                # complete or assembled): only the completion check is left to do.
                return self._complete_segments(job, task, rows)
        directory = Path(tempfile.mkdtemp(prefix=f"{item.item_id[:40]}-", dir=self.work_root))
        try:
            token.raise_if_cancelled()
            mark = time.perf_counter()
            path = directory / "source"
            cached = self._may_segment(item, task)
            if cached and self.source_cache is not None:
                fetched = self.source_cache.fetch(
                    item.source, path, self.max_bytes, cancelled=token.raise_if_cancelled
                )
            else:
                fetched = self.sources.download(item.source, path, self.max_bytes)
            timings["download_s"] = _elapsed(mark)
            token.raise_if_cancelled()
            split = self._split(job, task, path)
            if split is not None:
                return split
            if cached and item.segment is None and self.source_cache is not None:
                self.source_cache.discard(item.source)  # runs whole: no segment will come
            output = self._run_task(task, work, item, path, job)
            timings["decode_s"] = output.decode_s
            timings["inference_s"] = output.inference_s
            token.raise_if_cancelled()
            if item.segment is not None:
                return self._segment_succeeded(
                    job, task, output, started, timings, source_version=fetched.version
                )
            # Inside the try: outputs a task wrote as files (ItemOutput.file_paths, a whole
            # transformed video) live in this folder until they are uploaded.
            return self._succeeded(job, output, started, timings, fetched.version)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # -- segments (node_image/worker/segments.py) ----------------------------------------
    def _segments(self) -> SegmentLedger:
        if self.segment_ledger is None or self.outputs_reader is None:
            # Retryable: a worker built without segment storage leaves it to another.
            raise RuntimeError("a segment message reached a worker without segment storage")
        return self.segment_ledger

    def _may_segment(self, item: ManifestItem, task: Task) -> bool:
        """Whether this item's source may serve segments on this node (so it is cached)."""
        if item.segment is not None:
            return True
        return (
            self.spec().segment_seconds is not None
            and can_segment(task)
            and self.segment_ledger is not None
            and self.outputs_reader is not None
        )

    def _split(self, job: ItemJob, task: Task, path: Path) -> SplitFinished | None:
        """The segments a long video becomes (the loop sends them), or None to run it whole."""
        seconds = self.spec().segment_seconds
        if job.item.segment is not None or seconds is None or not can_segment(task):
            return None
        if self.segment_ledger is None or self.outputs_reader is None:
            return None
        # The probe's errors are the item's, as they would be in the task's own probe.
        info = probe(path, self.limits)
        segments = plan_segments(info.duration_s, seconds)
        if not segments:
            return None
        if timestamps_jump(path, info, self.limits):
            log.warning(
                "item %s: its timestamps jump (a TS of several recordings?): it runs whole",
                job.item.item_id,
            )
            return None
        log.info(
            "item %s is longer than %g s: split into %d segments",
            job.item.item_id,
            seconds,
            len(segments),
        )
        return SplitFinished(job, "terminal", segments=tuple(segments))

    def _segment_succeeded(
        self,
        job: ItemJob,
        task: Task,
        output: ItemOutput,
        started: float,
        timings: dict[str, float],
        *,
        source_version: str | None,
    ) -> Finished:
        """The segment's files, then its row, then the completion check (in that order)."""
        work, item, ledger = job.delivery.work, job.item, self._segments()
        segment = item.segment
        assert segment is not None
        prefix = output_prefix(work.run_id, item.item_id)
        mark = time.perf_counter()
        files: dict[str, str] = {}
        for name, data in sorted(output.files.items()):
            blob = prefix + segment_output_name(segment.index, check_output_name(name))
            content_type = output.content_types.get(name, "application/octet-stream")
            self.recorder.outputs.write_output(blob, data, content_type)
            files[name] = blob
        outputs = self.recorder.outputs
        for name, file_path in sorted(output.file_paths.items()):
            blob = prefix + segment_output_name(segment.index, check_output_name(name))
            content_type = output.content_types.get(name, "application/octet-stream")
            if isinstance(outputs, FileOutputWriter):  # a part of a video: streamed
                outputs.write_output_file(blob, file_path, content_type)
            else:  # a writer without streaming (test doubles): small files only
                outputs.write_output(blob, file_path.read_bytes(), content_type)
            files[name] = blob
        timings["upload_s"] = _elapsed(mark)
        result = SegmentResult(
            run_id=work.run_id,
            item_id=item.item_id,
            index=segment.index,
            count=segment.count,
            files=files,
            metadata=output.metadata,
            timings=stage_timings(timings, _elapsed(started)),
            node=self.recorder.node_name,
            attempt=job.delivery.attempt,
            source_version=source_version,
        )
        if job.abandoned.is_set():
            return Finished(job, "released")
        ledger.record_segment(work.run_id, item.item_id, segment.index, result.model_dump_json())
        # Read after writing: whichever row completes the set, its writer sees it complete.
        rows = parse_rows(ledger.segment_payloads(work.run_id, item.item_id))
        rows.setdefault(segment.index, result)
        return self._complete_segments(job, task, rows)

    def _complete_segments(
        self, job: ItemJob, task: Task, rows: dict[int, SegmentResult]
    ) -> Finished:
        """Assemble the item when its set of segment rows is complete (else nothing to do)."""
        work, item = job.delivery.work, job.item
        segment = item.segment
        assert segment is not None and self.outputs_reader is not None
        if not is_complete(rows, segment.count):
            if self.recorder.has_record(work.run_id, item.item_id):
                # The item failed while this segment ran: its part will never be joined.
                self._delete_parts(list(rows.values()))
                return Finished(job, "terminal")
            log.info(
                "segment %d of %d of item %s done (%d of %d)",
                segment.index + 1,
                segment.count,
                item.item_id,
                len(rows),
                segment.count,
            )
            return Finished(job, "terminal")
        if self.recorder.has_record(work.run_id, item.item_id):
            self._delete_parts(list(rows.values()))  # a late duplicate's part included
            return Finished(job, "terminal")  # assembled (or failed) already
        mark = time.perf_counter()
        ordered = [rows[index] for index in range(segment.count)]
        # Every segment must have read the same video: a source rewritten while they ran
        # would join two videos into one.
        version = one_version(ordered)
        parts = [SegmentPart(row, self.outputs_reader) for row in ordered]
        if not can_segment(task):
            raise RuntimeError(f"task {type(task).__name__} cannot assemble segments")
        directory = Path(tempfile.mkdtemp(prefix=f"{item.item_id[:40]}-", dir=self.work_root))
        try:
            context = AssemblyContext(
                directory=directory,
                source=self._source_once(item, directory / "source", version, job.token),
                cancel=job.token,
            )
            output = task.assemble(parts, context)  # type: ignore[attr-defined]
            item_whole = whole(item)
            # Inside the try: an assembled video lives in this folder until it is uploaded.
            written = self.recorder.write_outputs(
                work,
                item_whole,
                output,
                attempt=job.delivery.attempt,
                timings={"assemble_s": _elapsed(mark)},
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        result = self.recorder.success(
            work,
            item_whole,
            written,
            add_timings([row.timings for row in ordered]),
            metadata=output.metadata,
            source_version=version,
        )
        if job.abandoned.is_set():
            return Finished(job, "released")
        if self.source_cache is not None:
            self.source_cache.discard(item.source)  # assembled: no segment of it is left
        if not self.recorder.record(result):
            log.info("item %s assembled, but another worker recorded it first", item.item_id)
            return Finished(job, "terminal")
        self._delete_parts(ordered)
        log.info(
            "item %s succeeded: %d segments assembled, %s frames",
            item.item_id,
            segment.count,
            output.metadata.get("frames", "?"),
        )
        return Finished(job, "terminal", ItemStatus.SUCCEEDED)

    def _cleanup_parts(self, run_id: str, item_id: str) -> None:
        """Delete the parts of an item that has its record (best effort, as _delete_parts)."""
        if self.segment_ledger is None:
            return
        try:
            rows = parse_rows(self.segment_ledger.segment_payloads(run_id, item_id))
        except Exception as error:  # a part left over costs storage, never a result
            log.warning("could not list the segments of %s to clean up: %s", item_id, error)
            return
        self._delete_parts(list(rows.values()))

    def _delete_parts(self, rows: list[SegmentResult]) -> None:
        """The segments' parts, once their item is recorded: the item's output is whole, and
        a transform's parts are as large as its video (kept, they doubled its storage)."""
        outputs = self.recorder.outputs
        if not isinstance(outputs, OutputDeleter):
            return
        for blob in part_blobs(rows):
            try:
                outputs.delete_output(blob)
            except Exception as error:  # a part left over costs storage, never a result
                log.warning("could not delete segment part %s: %s", blob, error)

    def _source_once(
        self, item: ManifestItem, target: Path, version: str | None, token: CancelToken
    ) -> Callable[[], Path]:
        """The item's source at ``target``, fetched on the first call only (through the
        node's cache: the assembler most often ran a segment of it here already), and the
        version the segments read (SourceChangedError otherwise)."""
        fetched: list[Path] = []

        def source() -> Path:
            if not fetched:
                if self.source_cache is not None:
                    got = self.source_cache.fetch(
                        item.source, target, self.max_bytes, cancelled=token.raise_if_cancelled
                    )
                else:
                    got = self.sources.download(item.source, target, self.max_bytes)
                if version is not None and got.version is not None and got.version != version:
                    raise SourceChangedError(
                        f"the source changed while its item ran (segments read version "
                        f"{version}, the assembly {got.version}): run the item again"
                    )
                fetched.append(target)
            return fetched[0]

        return source

    def _run_task(
        self, task: Task, work: WorkItem, item: ManifestItem, path: Path, job: ItemJob
    ) -> ItemOutput:
        item_input = ItemInput(
            run_id=work.run_id,
            item=item,
            path=path,
            attempt=job.delivery.attempt,
            options=self.spec().task_settings(),
            cancel=job.token,
        )
        if is_thread_safe(task):
            return task.process(item_input)
        with self.tasks.lock:
            return task.process(item_input)

    def _succeeded(
        self,
        job: ItemJob,
        output: ItemOutput,
        started: float,
        timings: dict[str, float],
        source_version: str | None,
    ) -> Finished:
        """Outputs, then the terminal record (the loop deletes the message once it has one)."""
        work, item = job.delivery.work, job.item
        mark = time.perf_counter()
        written = self.recorder.write_outputs(
            work, item, output, attempt=job.delivery.attempt, timings=timings
        )
        timings["upload_s"] = _elapsed(mark)
        result = self.recorder.success(
            work,
            item,
            written,
            stage_timings(timings, _elapsed(started)),
            metadata=output.metadata,
            source_version=source_version,
        )
        if job.abandoned.is_set():
            return Finished(job, "released")  # its message went back to the queue long ago
        log.info(
            "item %s succeeded: %s frames in %.2f s (%s)",
            item.item_id,
            output.metadata.get("frames", "?"),
            result.timings.total_s,
            ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
        )
        # The loop records it with the rest of its message (jobs.py).
        return Finished(job, "terminal", pending=result)

    def _failed(
        self, job: ItemJob, error: BaseException, started: float, timings: dict[str, float]
    ) -> Finished:
        token, delivery = job.token, job.delivery
        options = self.spec()
        if token.reason == "timeout":
            error = ItemTimeoutError(
                f"the item ran past its timeout of {options.item_timeout_s:g} s"
            )
        info = classify(error)
        segment = job.item.segment
        if segment is not None:
            # The item's record says which part of the video failed.
            end = "the end" if segment.end_s is None else f"{segment.end_s:g} s"
            info = dataclasses.replace(
                info,
                message=f"segment {segment.index + 1} of {segment.count} "
                f"({segment.start_s:g} s to {end}): {info.message}",
            )
        abandoned = job.abandoned.is_set()
        decision = after_failure(
            info,
            cancel_reason=token.reason,
            abandoned=abandoned,
            stopping=self.stopping(),
            attempt=delivery.attempt,
            max_attempts=options.max_attempts,
        )
        if decision == "release":
            why = token.reason or ("abandoned" if abandoned else f"stopping: {error}")
            log.info("item %s released (%s)", job.item.item_id, why)
            return Finished(job, "released")
        if not info.permanent:
            log.warning(
                "item %s failed (attempt %d of %d): %s: %s",
                job.item.item_id,
                delivery.attempt,
                options.max_attempts,
                info.error_class,
                info.message,
                exc_info=not isinstance(error, Exception) or _unexpected(error),
            )
        if decision == "retry":
            return Finished(job, "retry")
        if segment is None:  # the loop records it with the rest of its message (jobs.py)
            failure = self.recorder.final_failure(
                delivery.work.run_id,
                job.item,
                info,
                attempts=delivery.attempt,
                timings=stage_timings(timings, _elapsed(started)),
            )
            return Finished(job, "terminal", pending=failure)
        first = self.recorder.record_failure(
            delivery.work.run_id,
            whole(job.item),
            info,
            attempts=delivery.attempt,
            timings=stage_timings(timings, _elapsed(started)),
        )
        if first:
            # The item failed: the parts its other segments wrote will never be joined.
            self._cleanup_parts(delivery.work.run_id, job.item.item_id)
        return Finished(job, "terminal", ItemStatus.FAILED if first else None)


def _unexpected(error: BaseException) -> bool:
    # Our own errors explain themselves; anything else gets its traceback in the log.
    return getattr(type(error), "permanent", None) is None
