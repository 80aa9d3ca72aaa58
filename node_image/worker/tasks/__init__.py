"""The work a node does per item, behind one small interface (no queue in sight).

A task is a class with a no-argument constructor and three methods (see :class:`Task`). The
worker creates it once per process (per distinct set of options that matter to it), calls
``setup`` once, then ``process`` for every item, possibly from several threads at once when
the class says it is ``thread_safe``, and ``close`` at exit. ``features`` is built in; a
custom task is named ``module:Class`` in ``TaskSettings.task`` and must be importable on the
node (baked into the image, or on ``PYTHONPATH``).

A task reads the downloaded file at ``item.path`` and returns the files to store and the
metadata to record. It never touches queues, the ledger or blob storage: the loop persists
what it returns, under the item's own output prefix, and decides retries from the exceptions
it raises (an exception class with ``permanent = True`` fails the item at once; anything else
is retried up to the run's max attempts). A long task should watch ``item.cancel``.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from batchctl.contracts import ManifestItem, TaskSettings

from ..errors import CancelledError, ItemTimeoutError, TaskConfigError
from ..media import MediaLimits


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
        """One item; raise to fail it (see the module docstring)."""
        ...

    def close(self) -> None:
        """At exit: release what ``setup`` acquired."""


def task_class(name: str) -> type[Any]:
    """The class named by ``TaskSettings.task``: ``features`` or ``module:Class``."""
    if name == "features":
        from .features import FeaturesTask

        return FeaturesTask
    if name == "transform":
        from .transform import TransformTask

        return TransformTask
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise TaskConfigError(
            f"task {name!r} is neither a built-in task (features, transform) nor 'module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskConfigError(f"task module {module_name!r} cannot be imported: {error}") from error
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise TaskConfigError(f"task {name!r}: {module_name} has no class {class_name}")
    return found


def create_task(setup: TaskSetup) -> Task:
    """Instantiate and set up the run's task (once per process and options)."""
    cls = task_class(setup.options.task)
    instance = cls()
    if not isinstance(instance, Task):
        raise TaskConfigError(f"task {setup.options.task!r} lacks setup, process or close")
    instance.setup(setup)
    return instance


def is_thread_safe(task: Task) -> bool:
    return getattr(task, "thread_safe", False) is True


__all__ = [
    "CancelToken",
    "ItemInput",
    "ItemOutput",
    "Task",
    "TaskSetup",
    "create_task",
    "is_thread_safe",
    "task_class",
]
