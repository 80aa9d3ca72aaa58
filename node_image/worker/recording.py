"""Recording an item: its outputs, then its terminal record in the ledger (first one wins).

Order matters (DESIGN.md, invariant 2): outputs first, under deterministic names (a retry
rewrites the same blobs), then the record, and only once a record exists may the loop delete
the message. The ledger's first record wins, so a duplicate delivery never double-counts.
No queue I/O here: item threads write outputs and build their records; the loop thread
records a message's items together (:meth:`Recorder.record_all`: one ledger transaction per
shard, instead of a counter read and a transaction per item) and then acknowledges.

A success record also says how much video the item was (``media_s``, ``frames``: what the
trial measures seconds per second of video on), read from the metadata the task returned.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    ManifestItem,
    StageTimings,
    WorkItem,
)
from batchctl.outputs_index import entry_for, index_blob_name
from batchctl.storage.ledger import PartiallyRecordedError

from .errors import ErrorInfo, OutputNameError
from .tasks import ItemOutput

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
_OUTPUT_NAME = re.compile(
    r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}){0,3}$"
)
# The most of a malformed message's validation error kept in its records.
MALFORMED_MESSAGE_CHARS = 2000
# Outputs index entries written at once, off the thread that records (the loop's).
INDEX_WRITERS = 4


class ResultLedger(Protocol):
    """What the worker needs of the ledger at the least (``Ledger`` has this and more)."""

    def has_record(self, run_id: str, item_id: str) -> bool: ...

    def record(self, result: ItemResult) -> bool: ...


@runtime_checkable
class BatchLedger(Protocol):
    """A ledger that records and looks up a message's items together (``Ledger`` does):
    the worker then pays per message, not per item. Without it, one item at a time."""

    def recorded_among(self, run_id: str, item_ids: Iterable[str]) -> set[str]: ...

    def record_many(self, results: Iterable[ItemResult]) -> set[tuple[str, str]]: ...


def recorded_among(ledger: ResultLedger, run_id: str, item_ids: Iterable[str]) -> set[str]:
    """Which of ``item_ids`` have a terminal record: one query on a batch ledger, else one
    lookup an item."""
    if isinstance(ledger, BatchLedger):
        return ledger.recorded_among(run_id, item_ids)
    return {item_id for item_id in item_ids if ledger.has_record(run_id, item_id)}


def record_results(ledger: ResultLedger, results: list[ItemResult]) -> set[tuple[str, str]]:
    """Write ``results``' records: together on a batch ledger, else one at a time; the
    (run id, item id) of those that were their item's first. When writing fails after
    some records went through, raises :class:`PartiallyRecordedError` naming them."""
    if isinstance(ledger, BatchLedger):
        return ledger.record_many(results)
    written: set[tuple[str, str]] = set()
    for result in results:
        try:
            first = ledger.record(result)
        except Exception as error:
            if not written:
                raise
            raise PartiallyRecordedError(written) from error
        if first:
            written.add((result.run_id, result.item_id))
    return written


class OutputWriter(Protocol):
    """Where outputs go (``BlobItemStorage`` writes them to the outputs container)."""

    def write_output(self, name: str, data: bytes, content_type: str) -> None: ...


@runtime_checkable
class FileOutputWriter(Protocol):
    """A writer that can also upload a file by streaming (``BlobItemStorage`` can)."""

    def write_output(self, name: str, data: bytes, content_type: str) -> None: ...

    def write_output_file(self, name: str, path: Path, content_type: str) -> None: ...


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


@dataclass(frozen=True)
class MediaFacts:
    """How much video an item was, as its success record says (None: not known)."""

    media_s: float | None = None
    frames: int | None = None


def media_facts(metadata: Mapping[str, Any]) -> MediaFacts:
    """``duration_s`` and ``frames`` of a task's output metadata, each None unless usable.

    Every built-in task (and the segment assembly) writes both: ``duration_s`` from the
    probe (``VideoInfo.describe``), ``frames`` as the frames it processed. A custom task's
    metadata is free-form, so anything missing, non-numeric, negative or not finite is
    None rather than an error: these figures inform a plan, they must never fail an item.
    """
    duration = metadata.get("duration_s")
    media_s: float | None = None
    # bool is an int to Python, but True is no duration.
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        value = float(duration)
        media_s = value if math.isfinite(value) and value >= 0 else None
    count = metadata.get("frames")
    frames: int | None = None
    if isinstance(count, int) and not isinstance(count, bool):
        frames = count if count >= 0 else None
    elif isinstance(count, float) and count.is_integer() and count >= 0:
        frames = int(count)
    return MediaFacts(media_s=media_s, frames=frames)


def stage_timings(timings: Mapping[str, float], total_s: float) -> StageTimings:
    """The record's timings from the stage durations measured so far."""
    return StageTimings(
        download_s=round(timings.get("download_s", 0.0), 4),
        decode_s=round(timings.get("decode_s", 0.0), 4),
        inference_s=round(timings.get("inference_s", 0.0), 4),
        upload_s=round(timings.get("upload_s", 0.0), 4),
        total_s=round(total_s, 4),
    )


class Recorder:
    """Writes outputs and terminal records; safe to call from several item threads."""

    def __init__(
        self,
        ledger: ResultLedger,
        outputs: OutputWriter,
        *,
        node_name: str,
        task_name: str,
        wall_clock: Callable[[], datetime],
        ran: Mapping[str, str | None] | None = None,
        index_fingerprint: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.outputs = outputs
        self.node_name = node_name
        self.task_name = task_name
        self.wall_clock = wall_clock
        # What ran, by reference (the model's and code package's hashes, the image), named in
        # every item's metadata.json.
        self.ran = dict(ran or {})
        # The work's fingerprint for --skip-existing's index (None: no index written).
        self.index_fingerprint = index_fingerprint
        # Index entries are written here, so a message's records never wait for them.
        self._index_writers: ThreadPoolExecutor | None = None
        self._index_lock = threading.Lock()

    def has_record(self, run_id: str, item_id: str) -> bool:
        """Whether the item is already terminal; a failed lookup says no (costs a rerun)."""
        try:
            return self.ledger.has_record(run_id, item_id)
        except Exception as error:  # a failed lookup only costs duplicate work
            log.warning("ledger lookup for %s failed (%s): processing it anyway", item_id, error)
            return False

    def recorded_among(self, run_id: str, item_ids: list[str]) -> set[str]:
        """Which of a message's items are already terminal: one query (a failed lookup says
        none: it costs duplicate work, never a result)."""
        if not item_ids:
            return set()
        try:
            return recorded_among(self.ledger, run_id, item_ids)
        except Exception as error:  # a failed lookup only costs duplicate work
            log.warning(
                "ledger lookup for %d item(s) failed (%s): processing them anyway",
                len(item_ids),
                error,
            )
            return set()

    def write_outputs(
        self,
        work: WorkItem,
        item: ManifestItem,
        output: ItemOutput,
        *,
        attempt: int,
        timings: Mapping[str, float],
    ) -> list[str]:
        """The task's files, then metadata.json naming them; the names written, in order.

        Every name is checked before anything is written, so a bad name writes nothing.
        Files the task left on disk (``file_paths``) are streamed when the writer can.
        """
        prefix = output_prefix(work.run_id, item.item_id)
        names: dict[str, bytes | Path] = {
            check_output_name(name): data for name, data in output.files.items()
        }
        for name, path in output.file_paths.items():
            if check_output_name(name) in names:
                raise OutputNameError(f"output name {name!r} is given twice")
            names[name] = path
        written: list[str] = []
        for name, data in sorted(names.items()):
            content_type = output.content_types.get(name, "application/octet-stream")
            if isinstance(data, bytes):
                self.outputs.write_output(prefix + name, data, content_type)
            elif isinstance(self.outputs, FileOutputWriter):
                self.outputs.write_output_file(prefix + name, data, content_type)
            else:  # a writer without streaming (test doubles): small files only
                self.outputs.write_output(prefix + name, data.read_bytes(), content_type)
            written.append(prefix + name)
        metadata: dict[str, Any] = {
            **output.metadata,
            "run_id": work.run_id,
            "item_id": item.item_id,
            "source": item.source,
            "row": item.row,
            "manifest_metadata": item.metadata,
            "task": self.task_name,
            "ran": self.ran,
            "attempt": attempt,
            "node": self.node_name,
            "outputs": written,
            "timings": {key: round(value, 4) for key, value in timings.items()},
        }
        self.outputs.write_output(
            prefix + METADATA_FILE,
            json.dumps(metadata, indent=2, sort_keys=True, default=str).encode("utf-8"),
            "application/json",
        )
        written.append(prefix + METADATA_FILE)
        return written

    def success(
        self,
        work: WorkItem,
        item: ManifestItem,
        outputs: list[str],
        timings: StageTimings,
        *,
        metadata: Mapping[str, Any],
        source_version: str | None = None,
    ) -> ItemResult:
        """The success record of an item whose outputs are written; its ``media_s`` and
        ``frames`` come from ``metadata`` (the task's output metadata, or the assembly's),
        ``source_version`` from the download."""
        facts = media_facts(metadata)
        return ItemResult(
            run_id=work.run_id,
            item_id=item.item_id,
            status=ItemStatus.SUCCEEDED,
            source=item.source,
            outputs=outputs,
            timings=timings,
            node=self.node_name,
            finished_at=self.wall_clock(),
            media_s=facts.media_s,
            frames=facts.frames,
            source_version=source_version,
        )

    def failure(
        self,
        run_id: str,
        item_id: str,
        source: str,
        info: ErrorInfo,
        *,
        attempts: int,
        timings: StageTimings,
    ) -> ItemResult:
        """The failure record of an item that will not be tried again."""
        return ItemResult(
            run_id=run_id,
            item_id=item_id,
            status=ItemStatus.FAILED,
            source=source,
            timings=timings,
            error=ItemError(
                error_class=info.error_class,
                message=info.message,
                permanent=info.permanent,
                attempts=attempts,
            ),
            node=self.node_name,
            finished_at=self.wall_clock(),
        )

    def record(self, result: ItemResult) -> bool:
        """Write the terminal record; True if it was the first for its item."""
        return bool(self.record_all([result]))

    def record_all(self, results: list[ItemResult]) -> set[tuple[str, str]]:
        """Write the terminal records (a message's items: one transaction per shard); the
        (run id, item id) of those that were their item's first. The first record of a
        success is noted in the outputs index at once (batchctl.outputs_index). Raises
        when the ledger cannot be written: PartiallyRecordedError when some records went
        through first (they are indexed all the same: their redelivery skips them)."""
        if not results:
            return set()
        try:
            first = record_results(self.ledger, results)
        except PartiallyRecordedError as partial:
            self._index_firsts(results, partial.written)
            raise
        self._index_firsts(results, first)
        return first

    def _index_firsts(self, results: list[ItemResult], first: set[tuple[str, str]]) -> None:
        if self.index_fingerprint is None:
            return
        for result in results:
            if (result.run_id, result.item_id) in first:
                self._index_later(result, self.index_fingerprint)

    def _index_later(self, result: ItemResult, task_fingerprint: str) -> None:
        with self._index_lock:
            if self._index_writers is None:
                self._index_writers = ThreadPoolExecutor(
                    INDEX_WRITERS, thread_name_prefix="outputs-index"
                )
            self._index_writers.submit(self._index, result, task_fingerprint)

    def close(self) -> None:
        """Wait for the index entries still being written (the worker's exit calls it)."""
        with self._index_lock:
            writers, self._index_writers = self._index_writers, None
        if writers is not None:
            writers.shutdown(wait=True)

    def _index(self, result: ItemResult, task_fingerprint: str) -> None:
        entry = entry_for(result, task_fingerprint)
        if entry is None:
            return
        try:
            self.outputs.write_output(
                index_blob_name(result.item_id),
                entry.model_dump_json().encode("utf-8"),
                "application/json",
            )
        except Exception as error:  # only a later run's chance to skip it is lost
            log.warning(
                "outputs index entry for item %s of run %s not written: %s",
                result.item_id,
                result.run_id,
                error,
            )

    def record_failure(
        self,
        run_id: str,
        item: ManifestItem,
        info: ErrorInfo,
        *,
        attempts: int,
        timings: StageTimings,
    ) -> bool:
        """Record a failure for good (and say so in the log); True if it was the first."""
        return self.record(
            self.final_failure(run_id, item, info, attempts=attempts, timings=timings)
        )

    def final_failure(
        self,
        run_id: str,
        item: ManifestItem,
        info: ErrorInfo,
        *,
        attempts: int,
        timings: StageTimings,
    ) -> ItemResult:
        """The failure record of an item that fails for good (said in the log), unrecorded."""
        log.warning(
            "item %s failed for good after %d attempt(s): %s: %s",
            item.item_id,
            attempts,
            info.error_class,
            info.message,
        )
        return self.failure(
            run_id, item.item_id, item.source, info, attempts=attempts, timings=timings
        )

    def record_malformed(
        self, message_id: str, content: str, problem: str, *, run_id: str, attempts: int
    ) -> None:
        """Failure records for whatever items a message that is no valid WorkItem names.

        The controller never writes such a message; the ids it carries are all that can be
        salvaged, so each gets a permanent failure. Nothing salvageable is logged, not raised.
        """
        try:
            data = json.loads(content)
            message_run_id = str(data.get("run_id", run_id))
            info = ErrorInfo(
                error_class="MalformedMessage",
                message=f"the queue message is not a valid WorkItem: {problem}"[
                    :MALFORMED_MESSAGE_CHARS
                ],
                permanent=True,
            )
            self.record_all(
                [
                    self.failure(
                        message_run_id,
                        str(raw.get("item_id", "")),
                        str(raw.get("source", "")),
                        info,
                        attempts=attempts,
                        timings=StageTimings(),
                    )
                    for raw in data.get("items", []) or []
                ]
            )
        except Exception as error:
            log.error("nothing salvageable in message %s: %s", message_id, error)
