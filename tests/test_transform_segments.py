"""A transformed video made of segments is the unsplit run's video, frame for frame.

Videos ffmpeg encodes here (a 10-minute one with AAC audio, variable frame rate, rotated,
VP9 + Opus in Matroska, an MPEG-4 AVI with MP3, MPEG-TS with no index to seek by, one of
them with a single keyframe) and the colour-inverting Keras model of
tests/test_transform.py. Each is transformed whole, and as segments assembled by the task:
the assembled video has the unsplit video's every packet timestamp (no frame dropped,
doubled or re-timed at any join), the same audio packets, and frames that match. Then
through the real worker loop over the in-memory stubs: one record, one download, a segment
failing once retried alone, and outputs inside the item's folder whatever the source is named.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from batchctl.contracts import ItemStatus, ManifestItem, RunOptions, Segment, WorkItem
from batchctl.outputs_index import index_blob_name
from node_image.worker.loop import EXIT_IDLE, Worker, WorkerConfig
from node_image.worker.media import MediaLimits, SampleWindow, probe, window_seek_s
from node_image.worker.segments import (
    AssemblyContext,
    SegmentPart,
    SegmentResult,
    plan_segments,
)
from node_image.worker.tasks import CancelToken, ItemInput, ItemOutput, TaskSetup
from node_image.worker.tasks.transform import OUTPUT_DIR, PART_FILE, VIDEO_FILE, TransformTask
from tests.test_segments import ReadingStubStorage, SegmentStubLedger, SendingStubQueue
from tests.test_transform import _item, _settings, models, task, videos
from tests.videos import FFMPEG, VideoLibrary

FFPROBE = FFMPEG.replace("ffmpeg", "ffprobe") if FFMPEG.endswith("ffmpeg") else "ffprobe"
__all__ = ["models", "task", "videos"]  # fixtures used here, from the transform tests


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 minutes of 64x48 at 5 fps with a 440 Hz tone (AAC): small, quick to encode."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=5:duration=600",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=600",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "23", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-b:a", "64k", "-shortest", str(path)],
        check=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def ts_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MPEG-TS (no index: a seek lands mid-GOP), starting at 1.4 s as TS files do, with AAC:
    one with a keyframe every 2 s, one whose only keyframe is its first frame."""
    folder = tmp_path_factory.mktemp("ts")
    made: dict[str, Path] = {}
    for name, seconds, gop in (("ts_gop2s", 20, 60), ("ts_one_keyframe", 6, 1000)):
        path = folder / f"{name}.ts"
        subprocess.run(
            [FFMPEG, "-hide_banner", "-v", "error", "-y",
             "-f", "lavfi", "-i", f"testsrc2=size=96x64:rate=30000/1001:duration={seconds}",
             "-f", "lavfi", "-i", f"sine=frequency=300:duration={seconds}",
             "-c:v", "libx264", "-preset", "fast", "-g", str(gop), "-keyint_min", str(gop),
             "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
             "-f", "mpegts", str(path)],
            check=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        made[name] = path
    return made


# -- ffprobe helpers ------------------------------------------------------------------------
def _packets(path: Path, stream: str) -> list[tuple[int, int]]:
    """(pts, size) of every packet of ``stream`` in presentation order."""
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", stream, "-show_entries",
         "packet=pts,size", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    packets = json.loads(out.stdout).get("packets", [])
    return sorted((int(packet["pts"]), int(packet["size"])) for packet in packets)


def _video_pts(path: Path) -> list[int]:
    return [pts for pts, _ in _packets(path, "v:0")]


def _time_base(path: Path, stream: str = "v:0") -> str:
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", stream, "-show_entries",
         "stream=time_base", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _frames(path: Path, size: tuple[int, int] = (16, 12)) -> np.ndarray:
    """Every frame as displayed, shrunk so codec noise averages out."""
    width, height = size
    out = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-vf", f"scale={width}:{height}:flags=area",
         "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    return np.frombuffer(out.stdout, np.uint8).reshape(-1, height, width, 3).astype(np.float64)


def _assert_same_audio(got: Path, want: Path) -> None:
    """The unsplit run's audio packets, in one piece: the same packets in the same order,
    each at most 1 ms from its place in the unsplit video (copied audio lands exactly; AAC
    re-encoded from a millisecond-timed Matroska source jitters by a fraction of one)."""
    got_packets, want_packets = _packets(got, "a:0"), _packets(want, "a:0")
    assert [size for _, size in got_packets] == [size for _, size in want_packets]
    if not want_packets:
        return  # a silent source: no audio in either
    shifts = {g - w for (g, _), (w, _) in zip(got_packets, want_packets, strict=True)}
    tick = Fraction(_time_base(got, "a:0"))
    assert max(abs(float(tick * shift)) for shift in shifts) <= 0.001


# -- segments run and assembled by the task, without a loop ---------------------------------
class LocalParts:
    """Parts' files read from where the segments wrote them (blob name = local path)."""

    def read_output(self, name: str) -> bytes:
        return Path(name).read_bytes()

    def download_output(self, name: str, target: Path) -> int:
        shutil.copyfile(name, target)
        return target.stat().st_size


def _segmented(
    task: TransformTask, source: Path, folder: Path, model: Path, seconds: float
) -> tuple[ItemOutput, list[Segment], Path]:
    segments = plan_segments(probe(source, MediaLimits()).duration_s, seconds)
    assert len(segments) >= 2
    parts: list[SegmentPart] = []
    for segment in segments:
        item = _item(source, folder / f"seg{segment.index}", _settings(model))
        item = dataclasses.replace(item, item=item.item.model_copy(update={"segment": segment}))
        output = task.process(item)
        assert set(output.file_paths) <= {PART_FILE}
        result = SegmentResult(
            run_id="run-1",
            item_id="item",
            index=segment.index,
            count=segment.count,
            files={name: str(path) for name, path in output.file_paths.items()},
            metadata=output.metadata,
        )
        parts.append(SegmentPart(result, LocalParts()))
    scratch = folder / "assembly"
    scratch.mkdir()
    assembled = task.assemble(parts, AssemblyContext(scratch, lambda: source, CancelToken()))
    return assembled, segments, scratch


CASES = [("long", 120.0), ("vfr", 1.0), ("rotated", 1.0), ("vp9_opus_mkv", 1.0)]
CASES += [("mpeg4_mp3_avi", 1.0), ("h264_audio", 1.0), ("ts_gop2s", 3.0)]
CASES += [("ts_one_keyframe", 1.0)]


@pytest.mark.parametrize(("name", "seconds"), CASES)
def test_segments_assemble_into_the_unsplit_video(
    name: str,
    seconds: float,
    videos: VideoLibrary,
    long_video: Path,
    ts_videos: dict[str, Path],
    task: TransformTask,
    models: dict[str, Path],
    tmp_path: Path,
) -> None:
    source = {"long": long_video, **ts_videos}.get(name) or videos.path(name)
    whole = task.process(_item(source, tmp_path / "whole", _settings(models["invert"])))
    assembled, segments, scratch = _segmented(
        task, source, tmp_path / "split", models["invert"], seconds
    )
    want, got = whole.file_paths[VIDEO_FILE], assembled.file_paths[VIDEO_FILE]
    assert got == scratch / OUTPUT_DIR / VIDEO_FILE  # in the assembly's own folder

    # Every frame at the unsplit run's timestamp, in the same time base: at no join is a
    # frame dropped, doubled or re-timed.
    assert _time_base(got) == _time_base(want)
    want_pts, got_pts = _video_pts(want), _video_pts(got)
    assert got_pts == want_pts and len(got_pts) == whole.metadata["frames"]
    assert assembled.metadata["frames"] == whole.metadata["frames"]
    assert sum(assembled.metadata["segments"]["frames"]) == len(got_pts)
    assert assembled.metadata["segments"]["count"] == len(segments)
    _assert_same_audio(got, want)
    assert assembled.metadata["output"]["audio"] == whole.metadata["output"]["audio"]
    # The frames match the unsplit run's (both H.264 of the same model outputs).
    want_frames, got_frames = _frames(want), _frames(got)
    assert want_frames.shape == got_frames.shape
    assert np.abs(want_frames - got_frames).mean(axis=(1, 2, 3)).max() < 3.0
    for key in ("duration_s", "source_fps", "display_size", "model", "frame_size"):
        assert assembled.metadata[key] == whole.metadata[key]


def test_the_long_video_keeps_its_tone_across_every_join(
    long_video: Path, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    assembled, segments, _ = _segmented(
        task, long_video, tmp_path / "split", models["invert"], 120.0
    )
    path = assembled.file_paths[VIDEO_FILE]
    # The audio decodes to a continuous 440 Hz tone: no gap or click at 120, 240, ... s.
    out = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", "8000",
         "-f", "f32le", "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    samples = np.frombuffer(out.stdout, np.float32)
    assert len(samples) == pytest.approx(600 * 8000, rel=0.002)
    for segment in segments[1:]:
        around = samples[int(segment.start_s * 8000) - 400 : int(segment.start_s * 8000) + 400]
        assert np.sqrt(np.mean(around**2)) == pytest.approx(np.sqrt(np.mean(samples**2)), rel=0.1)


# -- through the worker loop -----------------------------------------------------------------
class SharedTransform:
    """One set-up TransformTask for every worker here; ``fail`` maps a segment index to the
    number of attempts that fail with a retryable error."""

    thread_safe: ClassVar[bool] = True
    supports_segments: ClassVar[bool] = True

    def __init__(self, inner: TransformTask) -> None:
        self.inner = inner
        self.fail: dict[int, int] = {}
        self.calls: list[tuple[int | None, int]] = []
        self.assemblies = 0
        self._lock = threading.Lock()

    def setup(self, setup: TaskSetup) -> None:
        pass

    def process(self, item: ItemInput) -> ItemOutput:
        index = item.item.segment.index if item.item.segment else None
        with self._lock:
            self.calls.append((index, item.attempt))
        if index is not None and item.attempt <= self.fail.get(index, 0):
            raise ConnectionError("network blip")
        return self.inner.process(item)

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput:
        with self._lock:
            self.assemblies += 1
        return self.inner.assemble(parts, context)

    def close(self) -> None:
        pass


def _run_loop(
    task: SharedTransform, video: bytes, model: Path, source: str, **options: Any
) -> tuple[Worker, ReadingStubStorage, SegmentStubLedger, SendingStubQueue]:
    events: list[tuple[str, str]] = []
    queue, ledger, storage = (
        SendingStubQueue(events),
        SegmentStubLedger(events),
        ReadingStubStorage(events),
    )
    storage.sources[source] = video
    item = ManifestItem(item_id="long", source=source, row=2)
    queue.put(WorkItem(run_id="txrun", items=[item]).model_dump_json())
    spec = RunOptions(
        task="transform", model=str(model), idle_exit_s=0.3, inference_batch_size=8, **options
    ).node_spec()
    worker = Worker(
        WorkerConfig(run_id="txrun", poll_interval_s=0.05, retry_delay_s=0, spec=spec),
        queue,
        ledger,
        storage,
        task_factory=lambda setup: task,
    )
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(worker.run()), daemon=True)
    thread.start()
    thread.join(300)
    assert done == [EXIT_IDLE], "worker did not exit"
    return worker, storage, ledger, queue


def test_the_loop_runs_a_transform_as_segments_and_records_one_item(
    long_video: Path, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    video = long_video.read_bytes()
    whole_task, split_task = SharedTransform(task), SharedTransform(task)
    # The source's name is hostile: nothing it says reaches a path on the node.
    source = "stub://../../../../tmp/evil name;rm -rf.mp4"
    _, whole_storage, _, _ = _run_loop(whole_task, video, models["invert"], source)
    split_task.fail[2] = 1
    worker, storage, ledger, queue = _run_loop(
        split_task, video, models["invert"], source, segment_seconds=120.0, max_attempts=3
    )
    assert worker.stats["split"] == 1 and split_task.assemblies == 1
    # The split itself runs no task; segment 2 fails once and runs again alone.
    assert sorted(split_task.calls) == [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert storage.downloads == {source: 1}  # the item, 5 segments and the assembly
    record = ledger.records[("txrun", "long")]
    assert record.status is ItemStatus.SUCCEEDED
    assert record.outputs == ["txrun/items/long/video.mp4", "txrun/items/long/metadata.json"]
    assert ledger.events.count(("record", "long")) == 1 and not queue.messages
    # Every blob it wrote was under the item's folder, and once the item was recorded its
    # parts (as large as the video) went: the video and its metadata are what is left.
    # (and the outputs index's entry, written as the item was recorded).
    assert storage.outputs.keys() == {*record.outputs, index_blob_name("long")}
    parts = [name for kind, name in storage.events if kind == "delete" and "/segments/" in name]
    assert len(parts) == 5 and all(n.startswith("txrun/items/long/segments/") for n in parts)
    got, want = tmp_path / "got.mp4", tmp_path / "want.mp4"
    got.write_bytes(storage.outputs["txrun/items/long/video.mp4"])
    want.write_bytes(whole_storage.outputs["txrun/items/long/video.mp4"])
    assert _video_pts(got) == _video_pts(want) and len(_video_pts(got)) == 3000
    _assert_same_audio(got, want)
    metadata = json.loads(storage.outputs["txrun/items/long/metadata.json"])
    assert metadata["frames"] == 3000 and metadata["segments"]["count"] == 5


def test_only_a_container_without_an_index_seeks_by_the_packet_index(
    ts_videos: dict[str, Path], long_video: Path
) -> None:
    """MP4's own seek lands on the keyframe before the lead (seeking before that keyframe's
    time there decoded a GOP more); a TS seek lands mid-GOP, so it goes to a keyframe the
    packet index names: the one before the lead, by its decode time."""
    window = SampleWindow(10.0, 13.0)
    mp4 = probe(long_video, MediaLimits())
    assert window_seek_s(long_video, window, 5.0, MediaLimits(), container=mp4.container) is None
    ts_path = ts_videos["ts_gop2s"]
    ts = probe(ts_path, MediaLimits())
    seek = window_seek_s(
        ts_path, window, ts.fps, MediaLimits(), container=ts.container,
        start_time_s=ts.start_time_s,
    )  # fmt: skip
    # Keyframes every 2.002 s; the window needs frames from 10 - (1/29.97 + 1) = 8.97 s on.
    assert seek is not None and 7.8 < seek < 8.008
    # A window that needs the video's start seeks nowhere.
    early = SampleWindow(0.5, 3.0)
    assert window_seek_s(ts_path, early, ts.fps, MediaLimits(), container=ts.container) == 0.0
