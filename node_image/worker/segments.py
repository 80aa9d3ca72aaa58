"""Segments: a long video processed in parts on several nodes at once, ending as ONE item.

Why. One 4-hour video among 20-second ones keeps one node busy long after the others ran
dry (the straggler): the run's makespan is that one video's time. With ``segment_seconds``
(``--segment-seconds S``) a video longer than S is cut into parts of S seconds that any node
may take, and the item still ends with one terminal record and one output, equal to what an
unsplit run writes: ``features.npz`` + ``metadata.json`` (features: the same samples and
timestamps), or ``video.mp4`` + ``metadata.json`` (transform: every frame at its source
timestamp, joined without re-encoding, with the source's audio in one piece).

Where the split happens: in the worker that first opens the video. Only a worker knows the
duration (ffprobe, after the download); the controller would have to fetch and probe every
one of 20,000 remote videos before a run could start. That worker does not process the
item: the loop thread sends one message per segment (a WorkItem whose one ManifestItem
carries ``segment = {index, count, start_s, end_s}``), records nothing terminal, and deletes
the item's own message only after every segment message was sent. A crash before that
delivers the whole item again, which splits again into the same segments (the split is a
pure function of the duration and S): the duplicate segment messages are harmless, below.

Boundaries (:func:`plan_segments`): segment j covers ``[j*S, (j+1)*S)`` of the video's
timeline, the last one runs to the end (so a duration that ffprobe gets slightly wrong loses
nothing). The samples a segment keeps are exactly those the whole video's decode gives in its
range, with the same absolute timestamps (:class:`~.media.SampleWindow`: an input seek to a
keyframe the packet index names before the window, with the whole decode's timestamps, a
select on the boundaries, and on the keyframe path the selection state at the start replayed
from the packet index), so the segments' samples
partition the whole video's and their concatenation in index order is the unsplit run's.

Each segment is an item to the loop: its own message, attempts, visibility, timeout, dedupe
key (:func:`job_key`) and shutdown handling. A segment that fails for good records the ITEM's
terminal failure (first record wins, so it is recorded once, and the item's other segments
are then skipped as for any item with a record).

A segment that succeeds writes, in this order, each idempotent:
1. its partial output under the item's folder: ``segments/{index:05d}/features.npz``;
2. its segment row in the ledger (in the item's shard partition, row key
   ``{item_id}~seg~{index}``, never an item id; counts and reads of records ignore it), with
   the metadata and timings the assembly needs;
3. then it reads ALL the item's segment rows (one range query). Rows are written before they
   are read and the table is strongly consistent, so whichever segment's row completes the
   set, its worker sees the set complete. That worker assembles (:func:`is_complete`): the
   task's ``assemble`` joins the parts in index order (features: concatenated; transform:
   the video parts joined by stream copy, the source's audio added), then the item's
   outputs, ``metadata.json`` and terminal record are written. Two assemblers racing write
   the same names with the same content, and the ledger keeps the first record.
4. Only then does the loop delete the segment's message. A worker that dies between its row
   and the item's record leaves its message to reappear; the next delivery finds its row
   (so the task is not run again), sees the set complete and assembles. Completion is thus
   exact under duplicates and crashes, with no grace period.
   Every segment row names the source version its download read; segments that read
   different versions (the source was rewritten while they ran) fail the item for good
   with SourceChangedError instead of joining two videos into one.
5. The worker whose record was the item's first deletes the parts (best effort: a part
   left over costs storage, never a result). A second assembler racing it may find a part
   gone: its attempt fails, retryably, and its next one finds the record.

Downloads: every segment needs the source file (it seeks in it locally), so a node keeps a
long video it downloaded in its source cache (:mod:`.sourcecache`) and its other segments of
that video, and the assembly, link to the same file: one download per node per video.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from batchctl.contracts import ManifestItem, Segment, StageTimings, WorkItem
from batchctl.storage.items import BlobItemStorage
from batchctl.storage.ledger import segment_row_key

from .errors import SourceChangedError
from .jobs import Finished
from .leases import Leases

# The segment parts a task sees are the task API's (re-exported here, see __all__).
from .taskapi import (
    AssemblyContext,
    OutputReader,
    SegmentableTask,
    SegmentPart,
    SegmentResult,
)

SEGMENTS_DIR = "segments"
# The most segments one item is cut into (the contract's bound): a 4 h video at 2 s each.
MAX_SEGMENTS = 10_000


# -- policy (pure) ---------------------------------------------------------------------------
def plan_segments(duration_s: float | None, segment_s: float | None) -> list[Segment]:
    """The segments of a video ``duration_s`` long, or [] when it is not to be split.

    Not split: segments off, duration unknown, or the video no longer than one segment.
    Segment j starts at ``j * segment_s``; the last runs to the end of the video.
    """
    if segment_s is None or duration_s is None or duration_s <= segment_s:
        return []
    count = min(MAX_SEGMENTS, math.ceil(duration_s / segment_s))
    if count < 2:
        return []
    return [
        Segment(
            index=index,
            count=count,
            start_s=index * segment_s,
            end_s=None if index == count - 1 else (index + 1) * segment_s,
        )
        for index in range(count)
    ]


def is_complete(indices: Collection[int], count: int) -> bool:
    """Whether segment rows with these indices make the item's set complete."""
    return set(range(count)) <= set(indices)


def job_key(item: ManifestItem) -> str:
    """What the loop dedupes on: the item, or one segment of it (never an item id)."""
    return (
        item.item_id if item.segment is None else segment_row_key(item.item_id, item.segment.index)
    )


def whole(item: ManifestItem) -> ManifestItem:
    """The item a segment belongs to (as the manifest row gave it)."""
    return item.model_copy(update={"segment": None})


def segment_messages(run_id: str, item: ManifestItem, segments: Sequence[Segment]) -> list[str]:
    """One message per segment, each a WorkItem of one segment item (deterministic)."""
    return [
        WorkItem(
            run_id=run_id, items=[item.model_copy(update={"segment": segment})]
        ).model_dump_json()
        for segment in segments
    ]


def segment_output_name(index: int, name: str) -> str:
    """Where segment ``index`` keeps its file ``name``, relative to the item's folder."""
    return f"{SEGMENTS_DIR}/{index:05d}/{name}"


def add_timings(parts: Sequence[StageTimings]) -> StageTimings:
    """The item's timings: the sum of its segments' (node time spent on the item)."""
    return StageTimings(
        download_s=round(sum(p.download_s for p in parts), 4),
        decode_s=round(sum(p.decode_s for p in parts), 4),
        inference_s=round(sum(p.inference_s for p in parts), 4),
        upload_s=round(sum(p.upload_s for p in parts), 4),
        total_s=round(sum(p.total_s for p in parts), 4),
    )


# -- the segment rows (a row is a SegmentResult) -------------------------------------------
def one_version(rows: Sequence[SegmentResult]) -> str | None:
    """The one source version every segment read (None when none could tell); raises
    SourceChangedError when segments read different versions: joined, they would make one
    item of two videos. Permanent: the rows are written, so a retry would join them again."""
    versions = sorted({row.source_version for row in rows if row.source_version is not None})
    if len(versions) > 1:
        shown = ", ".join(versions[:3])
        raise SourceChangedError(
            f"the source changed while its segments ran (they read {len(versions)} versions: "
            f"{shown}): run the item again"
        )
    return versions[0] if versions else None


def parse_rows(payloads: Mapping[int, str]) -> dict[int, SegmentResult]:
    """Segment rows by index (a row that does not parse is left out: it is redone)."""
    rows: dict[int, SegmentResult] = {}
    for index, payload in payloads.items():
        try:
            rows[index] = SegmentResult.model_validate(json.loads(payload))
        except ValueError:
            continue
    return rows


# -- what storage and tasks must offer -----------------------------------------------------
@runtime_checkable
class SegmentLedger(Protocol):
    """Segment rows (``Ledger`` has exactly this)."""

    def record_segment(self, run_id: str, item_id: str, index: int, payload: str) -> bool: ...

    def segment_payloads(self, run_id: str, item_id: str) -> dict[int, str]: ...


def can_segment(task: object) -> bool:
    return isinstance(task, SegmentableTask) and getattr(task, "supports_segments", False) is True


@runtime_checkable
class OutputDeleter(Protocol):
    """Deletes an output (the parts, once their item is recorded)."""

    def delete_output(self, name: str) -> None: ...


def part_blobs(rows: Sequence[SegmentResult]) -> list[str]:
    """Every part file the segments wrote (what is deleted once the item is recorded)."""
    return sorted({blob for row in rows for blob in row.files.values()})


class BlobSegmentStorage(BlobItemStorage):
    """BlobItemStorage that also reads outputs back (segments' parts, for the assembly)
    and deletes them (once the item they make up is recorded)."""

    def delete_output(self, name: str) -> None:
        self.store.delete(self.settings.outputs_container, name)
        if self.local_outputs is not None:
            self.local_outputs.remove(name)

    def read_output(self, name: str) -> bytes:
        return self.store.download_bytes(self.settings.outputs_container, name)

    def download_output(self, name: str, target: Path) -> int:
        return self.store.download_to_file(self.settings.outputs_container, name, target)


# -- the loop's side ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SplitFinished(Finished):
    """An item thread's report that its video is long: the loop sends these segments'
    messages (queue I/O is the loop thread's), then deletes the item's message."""

    segments: tuple[Segment, ...] = ()


class MessageSender(Protocol):
    """Sends to the run's input queue (``RunQueues`` has exactly this)."""

    def send(self, role: Any, content: str, *, visibility_timeout: int | None = None) -> None: ...


class SegmentLeases(Leases):
    """The loop's leases, plus sending segment messages, under the same one-thread rule."""

    def __init__(self, queue: Any) -> None:
        super().__init__(queue)
        self._sender: MessageSender | None = (
            queue if callable(getattr(queue, "send", None)) else None
        )

    @property
    def can_send(self) -> bool:
        return self._sender is not None

    def send_all(self, contents: Sequence[str]) -> None:
        """Send every message, in order; raises on the first that fails (the caller retries
        the whole split: the messages already sent are harmless duplicates then)."""
        self._check_thread()
        if self._sender is None:
            raise RuntimeError("this queue cannot send: segments need RunQueues.send")
        for content in contents:
            self._sender.send("input", content)


__all__ = [
    "MAX_SEGMENTS",
    "SEGMENTS_DIR",
    "AssemblyContext",
    "BlobSegmentStorage",
    "MessageSender",
    "OutputDeleter",
    "OutputReader",
    "SegmentLeases",
    "SegmentLedger",
    "SegmentPart",
    "SegmentResult",
    "SegmentableTask",
    "SplitFinished",
    "add_timings",
    "can_segment",
    "is_complete",
    "job_key",
    "one_version",
    "parse_rows",
    "part_blobs",
    "plan_segments",
    "segment_messages",
    "segment_output_name",
    "whole",
]
