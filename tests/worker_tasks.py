"""Helpers for the worker tests: a tiny Keras model, and custom tasks a worker can load.

The tasks are named ``tests.worker_tasks:Class`` in a run's options, which also shows the
pluggable-task path: a worker subprocess started from the repository root imports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from node_image.worker.tasks import ItemInput, ItemOutput, TaskSetup
from node_image.worker.tasks.features import FeaturesTask

MARKER_DIR_ENV = "BATCHCTL_TEST_MARKER_DIR"


def save_tiny_model(path: Path, size: int = 32) -> Path:
    """A small CNN (fixed ``size`` x ``size`` input, 8 features) saved as a .keras file."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(8)(x)
    keras.Model(inputs, outputs).save(path)
    return path


def _mark(item: ItemInput, what: str) -> None:
    directory = os.environ.get(MARKER_DIR_ENV)
    if directory:
        marker = Path(directory) / f"{item.item.item_id}.{what}.{item.attempt}"
        marker.write_text(str(os.getpid()))


class SlowFirstAttemptFeatures(FeaturesTask):
    """The built-in features task, but the first attempt of an item stalls (cancellably).

    Lets a test kill or stop a worker while it is certainly in the middle of an item: it
    writes ``<marker dir>/<item id>.started.1`` and then waits up to a minute.
    """

    def process(self, item: ItemInput) -> ItemOutput:
        _mark(item, "started")
        if item.attempt == 1:
            item.cancel.wait(60)
            item.cancel.raise_if_cancelled()
        return super().process(item)


class FailingTask:
    """Fails every item with a retryable error that names the attempt (the poison path)."""

    thread_safe: ClassVar[bool] = True

    def setup(self, setup: TaskSetup) -> None:
        self.options = setup.options

    def process(self, item: ItemInput) -> ItemOutput:
        _mark(item, "started")
        raise ConnectionError(f"simulated network failure on attempt {item.attempt}")

    def close(self) -> None:
        pass


class EchoTask:
    """Writes a small text output; used to show that custom tasks are set up once."""

    thread_safe: ClassVar[bool] = False
    setups: ClassVar[int] = 0

    def setup(self, setup: TaskSetup) -> None:
        type(self).setups += 1

    def process(self, item: ItemInput) -> ItemOutput:
        data = item.path.read_bytes()
        metadata: dict[str, Any] = {"bytes": len(data), "setups": type(self).setups}
        return ItemOutput(files={"echo.txt": data[:16]}, metadata=metadata)

    def close(self) -> None:
        pass


ITEM_SECONDS_ENV = "BATCHCTL_TEST_ITEM_S"


class QuickTask:
    """A light task for fault tests: marks its start (with its pid), works a short while
    (``BATCHCTL_TEST_ITEM_S`` seconds, cancellably) and writes a small output. No model, no
    decoder: a worker process running it starts in about a second, so a test can kill
    workers and watch the run recover without paying for TensorFlow."""

    thread_safe: ClassVar[bool] = True

    def setup(self, setup: TaskSetup) -> None:
        self.seconds = float(os.environ.get(ITEM_SECONDS_ENV, "0.2"))

    def process(self, item: ItemInput) -> ItemOutput:
        _mark(item, "started")
        item.cancel.wait(self.seconds)
        item.cancel.raise_if_cancelled()
        data = item.path.read_bytes()
        return ItemOutput(files={"echo.txt": data[:16]}, metadata={"pid": os.getpid()})

    def close(self) -> None:
        pass


class QuickTaskFailingBad(QuickTask):
    """QuickTask, but an item whose id starts with 'bad' fails permanently (a broken file)."""

    def process(self, item: ItemInput) -> ItemOutput:
        if item.item.item_id.startswith("bad"):
            from node_image.worker.errors import UndecodableError

            _mark(item, "started")
            raise UndecodableError(f"{item.item.item_id} is not a video")
        return super().process(item)


class QuickTaskFailingBroken(QuickTask):
    """QuickTask, but a source whose bytes are ``broken`` fails permanently: fixing the file
    (rewriting it) fixes the item, as a user fixes a bad upload."""

    def process(self, item: ItemInput) -> ItemOutput:
        if item.path.read_bytes() == b"broken":
            from node_image.worker.errors import UndecodableError

            raise UndecodableError(f"{item.item.item_id} is not a video")
        return super().process(item)


class QuickTaskCountingStarts(QuickTask):
    """QuickTask that leaves one marker per processing start (``<item>.run.<uuid>``): a
    resumed run's new messages begin at attempt 1 again, so the attempt-named markers of
    ``_mark`` would be overwritten where a test counts items processed twice."""

    def process(self, item: ItemInput) -> ItemOutput:
        directory = os.environ.get(MARKER_DIR_ENV)
        if directory:
            import uuid

            (Path(directory) / f"{item.item.item_id}.run.{uuid.uuid4().hex}").write_text(
                str(os.getpid())
            )
        return super().process(item)
