"""Segments of long videos (node_image/worker/segments.py): one item, the unsplit features.

On a 10-minute video the tests encode (64x64 at 5 fps, so it encodes in well under a second)
and a tiny Keras model: the real worker loop over the in-memory stubs of
tests/test_worker_loop.py, split into segments, gives features and timestamps equal to the
unsplit run's (keyframe path and exact timestamps); a segment failing once is retried alone;
one failing for good fails the item once; duplicated messages double nothing; and the state a
worker killed between the last segment row and the assembly leaves is finished by another.
Over Azurite, two real worker processes share the segments, and one of them is SIGKILLed in
its assembly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest

from batchctl.contracts import ItemStatus, ManifestItem, RunOptions, Segment, WorkItem
from batchctl.outputs_index import index_blob_name
from batchctl.storage.items import Downloaded
from batchctl.storage.ledger import is_record_key, segment_row_key
from node_image.worker.errors import PermanentError
from node_image.worker.loop import EXIT_IDLE, Worker, WorkerConfig
from node_image.worker.media import MediaLimits, probe, timestamps_jump
from node_image.worker.segments import (
    AssemblyContext,
    SegmentPart,
    is_complete,
    job_key,
    plan_segments,
    segment_messages,
)
from node_image.worker.tasks import ItemInput, ItemOutput, TaskSetup
from node_image.worker.tasks.features import FeaturesTask
from tests import worker_tasks
from tests.test_worker_loop import (  # the stubs and the Azurite fleet, shared
    Fleet,
    StubLedger,
    StubQueue,
    StubStorage,
    fleet,
    tiny_model_path,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

RUN = "segrun"
FPS = 1.0
SEGMENT_S = 120.0  # 5 segments of the 10-minute video
__all__ = ["fleet", "tiny_model_path"]  # fixtures used here, imported from the loop's tests


# -- pure policy ----------------------------------------------------------------------------
def test_segments_cover_the_video_from_zero_to_the_end() -> None:
    assert plan_segments(600, None) == [] and plan_segments(None, 60) == []
    assert plan_segments(120, 120) == []  # not longer than one segment: run whole
    segments = plan_segments(600.2, 120)
    assert [(s.index, s.count, s.start_s, s.end_s) for s in segments] == [
        (0, 6, 0.0, 120.0),
        (1, 6, 120.0, 240.0),
        (2, 6, 240.0, 360.0),
        (3, 6, 360.0, 480.0),
        (4, 6, 480.0, 600.0),
        (5, 6, 600.0, None),  # the last runs to the end, whatever ffprobe got wrong
    ]
    assert plan_segments(600.2, 120) == segments  # deterministic: a re-split is identical
    assert is_complete({0, 1, 2}, 3) and not is_complete({0, 2}, 3)
    item = ManifestItem(item_id="v", source="s", row=2)
    keys = {job_key(item.model_copy(update={"segment": s})) for s in segments}
    assert len(keys) == 6 and job_key(item) == "v" and not any(is_record_key(k) for k in keys)
    assert segment_row_key("v", 3) == "v~seg~00003"
    # A whole item serializes as before the field existed; a segment item round-trips.
    assert "segment" not in item.model_dump_json()
    message = segment_messages(RUN, item, segments[:1])[0]
    assert WorkItem.model_validate_json(message).items[0].segment == segments[0]
    with pytest.raises(ValueError):
        Segment(index=1, count=2, start_s=0, end_s=10)  # the last is open-ended


# -- fixtures --------------------------------------------------------------------------------
def _encode(path: Path, gop: int) -> Path:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-v", "error", "-y", "-f", "lavfi",
         "-i", "testsrc2=size=64x64:rate=5:duration=600",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(gop),
         str(path)],
        check=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """10 minutes, a keyframe every 1.4 s: at 0.5 fps the keyframe path selects every other
    keyframe, a chain a segment can only follow with the state at its start."""
    return _encode(tmp_path_factory.mktemp("segvideos") / "long.mp4", 7).read_bytes()


class SharedFeatures:
    """One set-up FeaturesTask for every worker of this module (TensorFlow loads once);
    ``close`` does nothing, since each Worker closes its task when it exits. Scripted
    failures: ``fail`` maps a segment index to how many attempts fail, and how."""

    thread_safe: ClassVar[bool] = True
    supports_segments: ClassVar[bool] = True

    def __init__(self, inner: FeaturesTask) -> None:
        self.inner = inner
        self.fail: dict[int, tuple[int, BaseException]] = {}
        self.calls: list[tuple[int | None, int]] = []
        self.assemblies = 0
        self._lock = threading.Lock()

    def setup(self, setup: TaskSetup) -> None:
        pass

    def process(self, item: ItemInput) -> ItemOutput:
        index = item.item.segment.index if item.item.segment else None
        with self._lock:
            self.calls.append((index, item.attempt))
        if index in self.fail and item.attempt <= self.fail[index][0]:
            raise self.fail[index][1]
        return self.inner.process(item)

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput:
        with self._lock:
            self.assemblies += 1
        return self.inner.assemble(parts, context)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def features_task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeaturesTask]:
    model = worker_tasks.save_tiny_model(tmp_path_factory.mktemp("segmodel") / "tiny.keras")
    task = FeaturesTask()
    options = RunOptions(model=str(model), fps=FPS, inference_batch_size=8).task_settings()
    task.setup(TaskSetup(options=options, limits=MediaLimits(), concurrency=3))
    yield task
    task.close()


class SegmentStubLedger(StubLedger):
    """The stub ledger with segment rows (first one wins, as on the table)."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        super().__init__(events)
        self.segments: dict[tuple[str, str, int], str] = {}

    def record_segment(self, run_id: str, item_id: str, index: int, payload: str) -> bool:
        with self._lock:
            if (run_id, item_id, index) in self.segments:
                return False
            self.segments[(run_id, item_id, index)] = payload
            self.events.append(("segment", f"{item_id}:{index}"))
            return True

    def segment_payloads(self, run_id: str, item_id: str) -> dict[int, str]:
        with self._lock:
            return {i: p for (r, t, i), p in self.segments.items() if (r, t) == (run_id, item_id)}


class SendingStubQueue(StubQueue):
    def send(self, role: str, content: str, *, visibility_timeout: int | None = None) -> None:
        self._called()
        self.put(content)
        self.events.append(("send", content))


class ReadingStubStorage(StubStorage):
    """The stub storage that reads outputs back, and counts the downloads of each source."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        super().__init__(events)
        self.downloads: dict[str, int] = {}
        self.deleted: dict[str, bytes] = {}  # what delete_output took away

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded:
        self.downloads[source] = self.downloads.get(source, 0) + 1
        return super().download(source, target, max_bytes)

    def read_output(self, name: str) -> bytes:
        return self.outputs[name]

    def download_output(self, name: str, target: Path) -> int:
        target.write_bytes(self.outputs[name])
        return len(self.outputs[name])

    def delete_output(self, name: str) -> None:
        if name in self.outputs:
            self.deleted[name] = self.outputs.pop(name)
        self.events.append(("delete", name))


@dataclasses.dataclass
class Stage:
    """One queue, ledger and storage; workers are run over it one after another."""

    video: bytes
    task: SharedFeatures
    fps: float = FPS
    events: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue = SendingStubQueue(self.events)
        self.ledger = SegmentStubLedger(self.events)
        self.storage = ReadingStubStorage(self.events)
        self.storage.sources["stub://long"] = self.video
        self.item = ManifestItem(item_id="long", source="stub://long", row=2)

    def run_worker(self, cache_bytes: int | None = None, **options: Any) -> Worker:
        spec = RunOptions(
            model="unused", fps=self.fps, idle_exit_s=0.3, inference_batch_size=8, **options
        ).node_spec()
        config = WorkerConfig(run_id=RUN, poll_interval_s=0.05, retry_delay_s=0, spec=spec)
        if cache_bytes is not None:
            config = dataclasses.replace(config, source_cache_bytes=cache_bytes)
        worker = Worker(
            config,
            self.queue,
            self.ledger,
            self.storage,
            task_factory=lambda setup: self.task,
        )
        done: list[int] = []
        thread = threading.Thread(target=lambda: done.append(worker.run()), daemon=True)
        thread.start()
        thread.join(180)
        assert done == [EXIT_IDLE], "worker did not exit"
        return worker

    def send_item(self) -> None:
        self.queue.put(WorkItem(run_id=RUN, items=[self.item]).model_dump_json())

    def features(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        with np.load(io.BytesIO(self.storage.outputs[f"{RUN}/items/long/features.npz"])) as npz:
            return npz["features"], npz["timestamps"]

    def metadata(self) -> dict[str, Any]:
        return dict(json.loads(self.storage.outputs[f"{RUN}/items/long/metadata.json"]))


def _stage(long_video: bytes, features_task: FeaturesTask, fps: float = FPS) -> Stage:
    return Stage(long_video, SharedFeatures(features_task), fps)


# -- the real loop over the stubs ---------------------------------------------------------
@pytest.mark.parametrize(("exact", "fps"), [(False, 0.5), (False, FPS), (True, FPS)])
def test_a_segmented_run_gives_the_unsplit_features(
    long_video: bytes, features_task: FeaturesTask, exact: bool, fps: float
) -> None:
    whole = _stage(long_video, features_task, fps)
    whole.send_item()
    whole.run_worker(exact_timestamps=exact)
    split = _stage(long_video, features_task, fps)
    split.send_item()
    worker = split.run_worker(exact_timestamps=exact, segment_seconds=SEGMENT_S)
    expected_path = "full" if exact or fps == FPS else "keyframes"
    assert whole.metadata()["sampling"]["path"] == expected_path
    features, timestamps = split.features()
    want_features, want_timestamps = whole.features()
    assert np.array_equal(timestamps, want_timestamps) and np.array_equal(features, want_features)
    assert len(timestamps) == whole.metadata()["frames"] >= 200  # every sample, once
    # One item: one record, one output; five segments ran, each once, and one assembly.
    assert worker.stats["split"] == 1 and split.task.assemblies == 1
    assert sorted(split.task.calls) == [(i, 1) for i in range(5)]
    # One download on this node for the whole item, its five segments and the assembly.
    assert split.storage.downloads == {"stub://long": 1}
    assert split.events.count(("record", "long")) == 1
    assert split.ledger.records[(RUN, "long")].status is ItemStatus.SUCCEEDED
    assert split.ledger.records[(RUN, "long")].outputs == [
        f"{RUN}/items/long/features.npz",
        f"{RUN}/items/long/metadata.json",
    ]
    metadata = split.metadata()
    assert metadata["frames"] == len(timestamps) and metadata["segments"]["count"] == 5
    assert sum(metadata["segments"]["frames"]) == len(timestamps)
    assert metadata["sampling"] == whole.metadata()["sampling"]
    assert "segment" not in metadata and not split.queue.messages
    # The parts went once the item was recorded: its folder holds the item's output only.
    # (and the outputs index's entry, written as the item was recorded).
    assert sorted(split.storage.outputs) == sorted(
        [*split.ledger.records[(RUN, "long")].outputs, index_blob_name("long")]
    )
    deleted = [name for kind, name in split.events if kind == "delete" and "/segments/" in name]
    assert len(deleted) == 5


@pytest.fixture(scope="module")
def ts_video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Two minutes of MPEG-TS (no index: a plain seek lands mid-GOP), a keyframe every
    10 s, starting at 1.4 s as TS files do."""
    path = tmp_path_factory.mktemp("segts") / "long.ts"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-v", "error", "-y", "-f", "lavfi",
         "-i", "testsrc2=size=64x64:rate=5:duration=120",
         "-c:v", "libx264", "-preset", "fast", "-pix_fmt", "yuv420p", "-g", "50",
         "-keyint_min", "50", "-sc_threshold", "0", "-f", "mpegts", str(path)],
        check=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return path.read_bytes()


@pytest.mark.parametrize(("fps", "path"), [(1.0, "full"), (0.1, "keyframes")])
def test_segments_of_a_video_without_an_index_give_the_unsplit_features(
    ts_video: bytes, features_task: FeaturesTask, fps: float, path: str
) -> None:
    whole = _stage(ts_video, features_task, fps)
    whole.send_item()
    whole.run_worker()
    split = _stage(ts_video, features_task, fps)
    split.send_item()
    worker = split.run_worker(segment_seconds=25.0)
    assert whole.metadata()["sampling"]["path"] == path
    features, timestamps = split.features()
    want_features, want_timestamps = whole.features()
    assert worker.stats["split"] == 1 and split.metadata()["segments"]["count"] == 5
    assert np.array_equal(timestamps, want_timestamps) and np.array_equal(features, want_features)
    assert len(timestamps) == whole.metadata()["frames"] >= 12
    # Seconds from the video's start: the TS's own start (1.4 s) is not taken off twice
    # (it was: the first two samples both read 0).
    assert want_timestamps[0] == 0 and np.all(np.diff(want_timestamps) > 0)


@pytest.fixture(scope="module")
def jumping_ts(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Two TS recordings back to back (as `cat a.ts b.ts` makes): the second one's
    timestamps start over, which a whole decode corrects and a segment's cannot."""
    folder = tmp_path_factory.mktemp("jump")
    halves = []
    for index, source in enumerate(("testsrc2", "testsrc")):
        path = folder / f"half{index}.ts"
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-v", "error", "-y", "-f", "lavfi",
             "-i", f"{source}=size=64x64:rate=5:duration=90",
             "-c:v", "libx264", "-preset", "fast", "-pix_fmt", "yuv420p", "-g", "10",
             "-f", "mpegts", str(path)],
            check=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        halves.append(path.read_bytes())
    return b"".join(halves)


def test_a_video_whose_timestamps_jump_runs_whole(
    jumping_ts: bytes, ts_video: bytes, features_task: FeaturesTask, tmp_path: Path
) -> None:
    jumping, steady = tmp_path / "jump.ts", tmp_path / "steady.ts"
    jumping.write_bytes(jumping_ts)
    steady.write_bytes(ts_video)
    limits = MediaLimits()
    assert timestamps_jump(jumping, probe(jumping, limits), limits)
    assert not timestamps_jump(steady, probe(steady, limits), limits)
    whole = _stage(jumping_ts, features_task)
    whole.send_item()
    whole.run_worker()
    split = _stage(jumping_ts, features_task)
    split.send_item()
    worker = split.run_worker(segment_seconds=25.0)
    assert worker.stats["split"] == 0 and "segments" not in split.metadata()
    assert np.array_equal(split.features()[1], whole.features()[1])
    assert len(whole.features()[1]) >= 170  # both halves, on ffmpeg's corrected timeline


class ChangingStorage(ReadingStubStorage):
    """A source rewritten while its segments run: every download reads a new version."""

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded:
        fetched = super().download(source, target, max_bytes)
        return Downloaded(fetched.size, f"v{self.downloads[source]}")


def test_segments_that_read_different_versions_fail_the_item_once(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    """Nodes that each download the source while it is being rewritten read different
    versions: joined, they would make one item of two videos, so the item fails (once,
    for good: its rows are written) and says why."""
    stage = _stage(long_video, features_task)
    stage.storage = ChangingStorage(stage.events)
    stage.storage.sources["stub://long"] = long_video
    stage.send_item()
    stage.run_worker(cache_bytes=0, segment_seconds=SEGMENT_S)  # no cache: one download each
    record = stage.ledger.records[(RUN, "long")]
    assert record.status is ItemStatus.FAILED and record.error is not None
    assert record.error.error_class == "SourceChangedError" and record.error.permanent
    assert "source changed while its segments ran" in record.error.message
    assert stage.events.count(("record", "long")) == 1 and not stage.queue.messages
    assert f"{RUN}/items/long/features.npz" not in stage.storage.outputs


def test_a_record_names_the_version_its_worker_downloaded(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    whole, split = _stage(long_video, features_task), _stage(long_video, features_task)
    whole.send_item()
    whole.run_worker()
    split.send_item()
    split.run_worker(segment_seconds=SEGMENT_S)
    want = whole.ledger.records[(RUN, "long")].source_version
    assert want is not None and want.startswith("v-")
    assert split.ledger.records[(RUN, "long")].source_version == want


def test_a_segment_that_fails_once_is_retried_alone(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    stage = _stage(long_video, features_task)
    stage.task.fail[2] = (1, ConnectionError("network blip"))
    stage.send_item()
    stage.run_worker(segment_seconds=SEGMENT_S, max_attempts=3)
    assert sorted(stage.task.calls) == [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1)]
    record = stage.ledger.records[(RUN, "long")]
    assert record.status is ItemStatus.SUCCEEDED and stage.events.count(("record", "long")) == 1
    assert len(stage.features()[1]) == 600 and not stage.queue.messages


def test_a_segment_that_fails_for_good_fails_the_item_once(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    stage = _stage(long_video, features_task)
    stage.task.fail[1] = (99, PermanentError("this part is hopeless"))
    stage.task.fail[3] = (99, ConnectionError("never comes back"))
    stage.send_item()
    stage.run_worker(segment_seconds=SEGMENT_S, max_attempts=2)
    record = stage.ledger.records[(RUN, "long")]
    assert record.status is ItemStatus.FAILED and record.error is not None
    assert stage.events.count(("record", "long")) == 1  # once, whichever segment came first
    assert record.error.message.startswith("segment ")
    assert record.error.error_class in ("PermanentError", "ConnectionError")
    assert stage.task.assemblies == 0 and not stage.queue.messages
    assert f"{RUN}/items/long/features.npz" not in stage.storage.outputs
    # The parts the other segments wrote will never be joined: none is left.
    assert not [name for name in stage.storage.outputs if "/segments/" in name]


def test_parts_a_worker_killed_after_the_record_left_are_deleted_by_the_next(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    """Killed between the item's record and the end of its deletes: the record is there,
    parts are left, and the killed worker's segment message comes back. The worker that
    gets it runs no task and writes no record; it deletes the parts."""
    stage = _stage(long_video, features_task)
    stage.send_item()
    stage.run_worker(segment_seconds=SEGMENT_S)
    stage.storage.outputs.update(stage.storage.deleted)  # the parts, back as a kill left them
    assert len([name for name in stage.storage.outputs if "/segments/" in name]) == 5
    last = segment_messages(RUN, stage.item, plan_segments(600.0, SEGMENT_S))[-1]
    stage.queue.put(last, dequeue_count=1)
    stage.task.calls.clear()
    stage.run_worker(segment_seconds=SEGMENT_S)
    assert stage.task.calls == [] and stage.task.assemblies == 1
    assert stage.events.count(("record", "long")) == 1 and not stage.queue.messages
    assert not [name for name in stage.storage.outputs if "/segments/" in name]


def test_duplicated_item_and_segment_messages_double_nothing(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    stage = _stage(long_video, features_task)
    stage.send_item()
    stage.send_item()  # the whole item twice: it splits twice, into the same segments
    segments = plan_segments(600.0, SEGMENT_S)
    for message in segment_messages(RUN, stage.item, segments[1:3]):
        stage.queue.put(message)  # and some segments' messages once more
    worker = stage.run_worker(segment_seconds=SEGMENT_S)
    assert stage.events.count(("record", "long")) == 1
    assert sorted(stage.ledger.segments) == [(RUN, "long", i) for i in range(5)]
    assert worker.stats["split"] + worker.stats["duplicates"] >= 2
    # Each segment's task ran at most as often as its messages arrived (7 + 2 splits at
    # most), and the features are the ones of one clean pass.
    assert len(stage.task.calls) <= 9
    features, timestamps = stage.features()
    clean = _stage(long_video, features_task)
    clean.send_item()
    clean.run_worker(segment_seconds=SEGMENT_S)
    assert np.array_equal(timestamps, clean.features()[1])
    assert np.array_equal(features, clean.features()[0])
    assert not stage.queue.messages


def test_a_worker_killed_before_assembling_leaves_it_to_the_next(
    long_video: bytes, features_task: FeaturesTask
) -> None:
    stage = _stage(long_video, features_task)
    stage.send_item()
    stage.run_worker(segment_seconds=SEGMENT_S)
    expected = stage.features()
    # The state a worker killed between the last segment row and the item's record leaves:
    # every segment row and part written (parts go only after the record), no item record,
    # no item output, and its segment message back in the queue (never deleted) once its
    # visibility ran out.
    del stage.ledger.records[(RUN, "long")]
    for name in ("features.npz", "metadata.json"):
        del stage.storage.outputs[f"{RUN}/items/long/{name}"]
    stage.storage.outputs.update(stage.storage.deleted)
    last = segment_messages(RUN, stage.item, plan_segments(600.0, SEGMENT_S))[-1]
    stage.queue.put(last, dequeue_count=1)
    stage.task.calls.clear()
    stage.run_worker(segment_seconds=SEGMENT_S)
    assert stage.task.calls == []  # its row was there: no segment ran again
    assert stage.task.assemblies == 2 and stage.events.count(("record", "long")) == 2
    assert stage.ledger.records[(RUN, "long")].status is ItemStatus.SUCCEEDED
    features, timestamps = stage.features()
    assert np.array_equal(features, expected[0]) and np.array_equal(timestamps, expected[1])


# -- over Azurite, two worker processes -----------------------------------------------------
class DyingAssemblyFeatures(FeaturesTask):
    """The features task, but the first assembly of the run kills its worker process
    (SIGKILL, as a preempted node dies): after the last segment row, before the record."""

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput:
        marker = Path(os.environ[worker_tasks.MARKER_DIR_ENV]) / "assembly.died"
        try:
            marker.open("x").close()  # only the first assembler, whichever worker it is
        except FileExistsError:
            return super().assemble(parts, context)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


@pytest.mark.azurite
@pytest.mark.slow
def test_two_workers_share_the_segments_and_survive_a_kill_before_assembly(
    fleet: Fleet, tmp_path: Path
) -> None:
    video = _encode(tmp_path / "long.mp4", 5)
    source = fleet.upload("long.mp4", video)
    item = ManifestItem(item_id="long", source=source, row=2)
    whole_options = fleet.options(visibility_timeout_s=10)
    fleet.send([item], whole_options)
    assert fleet.wait(fleet.start("node-whole", whole_options)) == EXIT_IDLE, fleet.logs()
    container = fleet.settings.outputs_container
    blob = f"{fleet.run_id}/items/long/features.npz"
    with np.load(io.BytesIO(fleet.store.download_bytes(container, blob))) as npz:
        want_features, want_timestamps = npz["features"], npz["timestamps"]
    fleet.store.delete(container, blob)

    # The same item again under another id, split, on two workers at once.
    split = item.model_copy(update={"item_id": "long2"})
    options = whole_options.model_copy(
        update={"segment_seconds": SEGMENT_S, "task": "tests.test_segments:DyingAssemblyFeatures"}
    )
    fleet.send([split], options)
    first = fleet.start("node-a", options, idle_exit_s=30)
    second = fleet.start("node-b", options, idle_exit_s=30)
    fleet.wait_for(lambda: "long2" in fleet.results(), 150, "the item to be assembled")
    assert (fleet.markers / "assembly.died").exists()
    codes = sorted(fleet.wait(p, 90) for p in (first, second))
    assert codes == sorted([-signal.SIGKILL, EXIT_IDLE]), fleet.logs()

    results = fleet.results()
    assert results["long2"].status is ItemStatus.SUCCEEDED, fleet.logs()
    assert set(results) == {"long", "long2"}  # segment rows are no records
    assert fleet.ledger.counts(fleet.run_id).succeeded == 2
    assert fleet.ledger.counted_rows(fleet.run_id).succeeded == 2
    assert fleet.ledger.recorded_ids(fleet.run_id) == {"long", "long2"}
    with np.load(
        io.BytesIO(fleet.store.download_bytes(container, results["long2"].outputs[0]))
    ) as npz:
        assert np.array_equal(npz["timestamps"], want_timestamps)
        assert np.array_equal(npz["features"], want_features)
    rows = fleet.ledger.segment_payloads(fleet.run_id, "long2")
    nodes = {json.loads(payload)["node"].split(":")[0] for payload in rows.values()}
    assert sorted(rows) == list(range(5)) and nodes == {"node-a", "node-b"}, fleet.logs()
    assert fleet.queues.approximate_count("input") == 0
    # The parts went with the record (the killed assembler's attempt left them all there).
    assert fleet.store.list_names(container, f"{fleet.run_id}/items/long2/segments/") == []
