"""The task API: every type a task sees, built-in or custom, and nothing of the worker's own.

A task (see :class:`Task`) gets a :class:`TaskSetup` once per process, an :class:`ItemInput`
per item (with its :class:`CancelToken`), and returns an :class:`ItemOutput`. A task that can
run on segments of a long video (:class:`SegmentableTask`, see :mod:`.segments` for why and
how) also assembles the item's output from its segments' :class:`SegmentPart` values, with an
:class:`AssemblyContext`.

This module is a leaf: it imports the standard library, pydantic, the library's contracts and
error hierarchy, and no module of the worker (``MediaLimits``, the limits a task's decodes
obey, lives here for that reason; :mod:`.media` imports it). So the worker's modules (jobs,
segments, execution, recording) and the tasks
themselves import these types from here without a cycle, the tasks package importing its
built-in tasks notwithstanding (tests/test_worker_imports.py holds both rules). Users keep
importing them from :mod:`.tasks`, which re-exports them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from batchctl.contracts import ManifestItem, StageTimings, TaskSettings
from batchctl.errors import CancelledError, ItemTimeoutError


@dataclass(frozen=True)
class MediaLimits:
    """Limits on untrusted media; over any of them an item fails permanently."""

    max_bytes: int = 8 * 1024**3
    max_duration_s: float = 4 * 3600.0
    max_width: int = 7680
    max_height: int = 7680
    max_pixels: int = 7680 * 4320
    decode_timeout_s: float = 900.0
    probe_timeout_s: float = 60.0


@dataclass(frozen=True)
class TaskSetup:
    """What a task gets once per process: the run's options and the node's configuration."""

    options: TaskSettings
    limits: MediaLimits = field(default_factory=MediaLimits)
    weights_dir: str | None = None
    mixed_precision: bool = False
    # Items the loop may run at once (a task may size its own buffers from it).
    concurrency: int = 1
    # Threads per ffmpeg decode (several decodes run at once, one per item in flight).
    decode_threads: int = 1
    work_dir: Path = field(default_factory=lambda: Path("."))


class CancelToken:
    """Tells a running item to stop: on the per-item timeout or when the worker shuts down.

    ``add_callback`` registers something to call at cancellation (such as killing ffmpeg);
    it runs at once if the token is already cancelled.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.reason: str | None = None
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def remaining(self) -> float | None:
        """Seconds left before the item's deadline (None without one)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def raise_if_cancelled(self) -> None:
        if not self.cancelled:
            return
        if self.reason == "timeout":
            raise ItemTimeoutError("the item ran past its timeout")
        raise CancelledError(f"the item was cancelled ({self.reason})")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if cancelled meanwhile (for tasks that poll)."""
        return self._event.wait(seconds)


@dataclass(frozen=True)
class ItemInput:
    """One item to process: its manifest row, the downloaded file, and how to run it."""

    run_id: str
    item: ManifestItem
    path: Path
    attempt: int
    options: TaskSettings
    cancel: CancelToken


@dataclass
class ItemOutput:
    """What a task returns: files under the item's output prefix, and metadata.

    ``files`` maps a relative name (``features.npz``, ``sub/part.bin``) to its bytes; the
    loop writes them, then ``metadata.json`` with ``metadata`` plus its own fields (source,
    timings, attempt). ``decode_s`` / ``inference_s`` go into the item's stage timings.
    ``file_paths`` maps names the same way to files the task wrote inside the item's folder
    (the one ``item.path`` is in); they are uploaded by streaming, so an output as large as a
    whole video is never held in memory, and they are deleted with that folder.
    """

    files: dict[str, bytes]
    metadata: dict[str, Any] = field(default_factory=dict)
    file_paths: dict[str, Path] = field(default_factory=dict)
    decode_s: float = 0.0
    inference_s: float = 0.0
    content_types: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """The interface every task implements (``features`` and custom ``module:Class``).

    A class attribute ``thread_safe = True`` lets ``process`` run on several threads at once;
    without it the loop serializes calls (downloads and uploads still overlap).
    """

    def setup(self, setup: TaskSetup) -> None:
        """Once per process, before the first item (load models, warm up)."""

    def process(self, item: ItemInput) -> ItemOutput:
        """One item; raise to fail it: an exception class with ``permanent = True`` fails
        it at once, anything else is retried up to the run's max attempts."""
        ...

    def close(self) -> None:
        """At exit: release what ``setup`` acquired."""


# -- segments: what a task sees of its item's parts -------------------------------------------
class SegmentResult(BaseModel):
    """A finished segment's row in the ledger (its payload): what the assembler needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    item_id: str
    index: int = Field(ge=0)
    count: int = Field(ge=2)
    # The segment's files: name as the task returned it -> blob name (outputs container).
    files: dict[str, str]
    metadata: dict[str, Any] = Field(default_factory=dict)
    timings: StageTimings = Field(default_factory=StageTimings)
    node: str = ""
    attempt: int = Field(default=1, ge=1)
    # The source version the segment downloaded (None where the reader cannot tell).
    source_version: str | None = None


@runtime_checkable
class OutputReader(Protocol):
    """Reads back an output the workers wrote (the assembler reads the segments' files)."""

    def read_output(self, name: str) -> bytes: ...

    def download_output(self, name: str, target: Path) -> int: ...


@dataclass(frozen=True)
class SegmentPart:
    """One segment for the assembly: its row, and its files on demand (a features part is
    read into memory, a transformed video's part is streamed to disk)."""

    result: SegmentResult
    reader: OutputReader

    def read(self, name: str) -> bytes:
        """The segment's file ``name`` (as the task returned it), whole in memory."""
        return self.reader.read_output(self.result.files[name])

    def save(self, name: str, target: Path) -> int:
        """The segment's file ``name`` streamed to ``target``; its size in bytes."""
        return self.reader.download_output(self.result.files[name], target)


@dataclass(frozen=True)
class AssemblyContext:
    """What an assembly may use besides the parts: a scratch folder of its own (files the
    task returns by path must be in it), the item's source (fetched on first call, once per
    node), and the item's cancel token."""

    directory: Path
    source: Callable[[], Path]
    cancel: CancelToken


@runtime_checkable
class SegmentableTask(Protocol):
    """A task that can run on one segment and assemble the segments' outputs.

    ``process`` gets the segment in ``item.item.segment`` and returns that range's output;
    ``assemble`` gets every segment's part, in index order, and returns the item's output,
    equal to what ``process`` returns for the whole video.
    """

    supports_segments: ClassVar[bool]

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput: ...


__all__ = [
    "AssemblyContext",
    "CancelToken",
    "ItemInput",
    "ItemOutput",
    "MediaLimits",
    "OutputReader",
    "SegmentPart",
    "SegmentResult",
    "SegmentableTask",
    "Task",
    "TaskSetup",
]
