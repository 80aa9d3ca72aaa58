"""The transform task on videos ffmpeg encodes here, through a real Keras model saved here.

The model is a 1x1 convolution that inverts colours (out = 1 - in), so its effect is checked
pixel by pixel: the output's frames are the source's frames inverted, at the source's size,
orientation, frame count, timestamps and duration, with its audio.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchctl.contracts import FrameSize, ManifestItem, TaskSettings, WorkItem
from batchctl.workspec import BUILTIN_TASKS, parse_task
from node_image.worker.errors import (
    CancelledError,
    DecodeTimeoutError,
    TaskConfigError,
    TooLargeError,
    TooLongError,
)
from node_image.worker.media import MediaLimits
from node_image.worker.recording import Recorder
from node_image.worker.tasks import (
    CancelToken,
    ItemInput,
    ItemOutput,
    TaskSetup,
    create_task,
    task_class,
)
from node_image.worker.tasks.transform import (
    OUTPUT_DIR,
    VIDEO_FILE,
    TransformBatcher,
    TransformTask,
    load_frame_model,
)
from tests.videos import FFMPEG, VideoLibrary, video_library

FFPROBE = FFMPEG.replace("ffmpeg", "ffprobe") if FFMPEG.endswith("ffmpeg") else "ffprobe"
CASES = ["h264", "h264_audio", "vp9", "mpeg4_avi", "rotated", "vfr", "vp9_opus_mkv"]
CASES += ["mpeg4_mp3_avi", "odd_size"]


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


def _invert_model(path: Path, input_size: tuple[int, int] | None = None) -> Path:
    import keras

    height, width = input_size or (None, None)
    inputs = keras.Input((height, width, 3))
    conv = keras.layers.Conv2D(3, 1)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([-np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.ones(3, np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    import keras

    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, pooled).save(directory / "pool.keras")
    return {
        "invert": _invert_model(directory / "invert.keras"),
        "invert64": _invert_model(directory / "invert64.keras", (64, 48)),
        "pool": directory / "pool.keras",
    }


def _settings(model: Path, batch: int = 8) -> TaskSettings:
    return TaskSettings(
        task="transform",
        fps=1.0,
        frame_size=FrameSize(width=224, height=224),
        exact_timestamps=False,
        model=str(model),
        inference_batch_size=batch,
    )


@pytest.fixture(scope="module")
def task(models: dict[str, Path]) -> Any:
    made = create_task(TaskSetup(options=_settings(models["invert"]), concurrency=3))
    yield made
    made.close()


def _item(
    source: Path, folder: Path, settings: TaskSettings, token: CancelToken | None = None
) -> ItemInput:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "source"
    path.write_bytes(source.read_bytes())
    return ItemInput(
        run_id="run-1",
        item=ManifestItem(item_id=folder.name, source=str(source), row=2),
        path=path,
        attempt=1,
        options=settings,
        cancel=token or CancelToken(),
    )


# -- ffprobe helpers ------------------------------------------------------------------------
def _probe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _stream(data: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((s for s in data["streams"] if s["codec_type"] == kind), None)


def _frame_times(path: Path) -> list[float]:
    out = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries",
         "frame=pts_time", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [float(line.split(",")[0]) for line in out.stdout.split() if line.strip(",")]


def _first_frame(
    path: Path, size: tuple[int, int] = (32, 32), crop: tuple[int, int] | None = None
) -> np.ndarray:
    # As displayed (ffmpeg rotates by the display matrix), shrunk so codec noise averages out;
    # ``crop`` cuts an output back to the source's size (odd sides were padded by one).
    width, height = size
    chain = f"crop={crop[0]}:{crop[1]}:0:0," if crop else ""
    chain += f"scale={width}:{height}:flags=area"
    out = subprocess.run(
        [FFMPEG, "-v", "error", "-i", str(path), "-frames:v", "1",
         "-vf", chain, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    return np.frombuffer(out.stdout, np.uint8).reshape(height, width, 3).astype(np.float64)


def _display(stream: dict[str, Any]) -> tuple[int, int]:
    rotation = 0
    for side in stream.get("side_data_list") or []:
        rotation = int(float(side.get("rotation", 0)))
    rotation = rotation or int(stream.get("tags", {}).get("rotate", 0))
    width, height = int(stream["width"]), int(stream["height"])
    return (height, width) if rotation % 180 else (width, height)


def _duration(data: dict[str, Any], stream: dict[str, Any]) -> float:
    return float(stream.get("duration") or data["format"]["duration"])


# -- the task on each kind of video ---------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_transform_keeps_the_video_and_applies_the_model(
    name: str, videos: VideoLibrary, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    source = videos.path(name)
    item = _item(source, tmp_path / "item", _settings(models["invert"]))
    output = task.process(item)
    path = output.file_paths[VIDEO_FILE]
    assert output.files == {}
    assert path == tmp_path / "item" / OUTPUT_DIR / VIDEO_FILE

    src, out = _probe(source), _probe(path)
    src_video, out_video = _stream(src, "video"), _stream(out, "video")
    assert src_video is not None and out_video is not None
    assert out["format"]["format_name"].startswith("mov,mp4")
    assert (out_video["codec_name"], out_video["pix_fmt"]) == ("h264", "yuv420p")
    # Size as displayed (a rotated source comes out upright), odd sides padded to even.
    width, height = _display(src_video)
    assert (int(out_video["width"]), int(out_video["height"])) == (
        width + width % 2,
        height + height % 2,
    )
    assert not out_video.get("side_data_list")
    # Every frame, at its own time: the same timestamps, so the same count and frame rate.
    src_times, out_times = _frame_times(source), _frame_times(path)
    assert len(out_times) == len(src_times) == output.metadata["frames"]
    start = src_times[0]
    assert np.allclose(np.array(out_times) - out_times[0], np.array(src_times) - start, atol=1e-3)
    frame = 1.0 / float(Fraction(src_video["avg_frame_rate"]))
    assert _duration(out, out_video) == pytest.approx(_duration(src, src_video), abs=frame)
    # The frame rate as ffprobe reads it from the timestamps (an AVI's header may count a
    # frame its stream never decodes, so the average is compared as frames over time above).
    assert out_video["r_frame_rate"] == src_video["r_frame_rate"]
    # Audio: there exactly when the source has it, as long, copied when MP4 can hold it.
    src_audio, out_audio = _stream(src, "audio"), _stream(out, "audio")
    assert (out_audio is None) == (src_audio is None)
    if src_audio is not None and out_audio is not None:
        copied = src_audio["codec_name"] in {"aac", "mp3"}
        assert out_audio["codec_name"] == (src_audio["codec_name"] if copied else "aac")
        assert output.metadata["output"]["audio"]["mode"] == ("copy" if copied else "aac")
        assert _duration(out, out_audio) == pytest.approx(_duration(src, src_audio), abs=0.1)
    # The model's effect, pixel by pixel on the displayed picture: colours inverted.
    before, after = _first_frame(source), _first_frame(path, crop=(width, height))
    assert np.abs(after - (255.0 - before)).mean() < 8.0
    assert after.mean() == pytest.approx(255.0 - before.mean(), abs=4.0)


def test_variable_frame_rate_timestamps_pass_through_exactly(
    videos: VideoLibrary, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    source = videos.path("vfr")
    output = task.process(_item(source, tmp_path / "vfr", _settings(models["invert"])))
    src_times = _frame_times(source)
    gaps = np.diff(src_times)
    assert gaps.max() > 3 * gaps.min()  # the source really is irregular
    assert _frame_times(output.file_paths[VIDEO_FILE]) == src_times


def test_a_fixed_size_model_sees_its_size_and_the_output_keeps_the_source_size(
    videos: VideoLibrary, models: dict[str, Path], tmp_path: Path
) -> None:
    settings = _settings(models["invert64"])
    fixed = create_task(TaskSetup(options=settings))
    try:
        output = fixed.process(_item(videos.path("h264_audio"), tmp_path / "fixed", settings))
    finally:
        fixed.close()
    assert output.metadata["frame_size"] == [48, 64]
    assert output.metadata["resized_for_model"] is True
    out_video = _stream(_probe(output.file_paths[VIDEO_FILE]), "video")
    assert out_video is not None
    assert (out_video["width"], out_video["height"]) == (320, 240)
    before = _first_frame(videos.path("h264_audio"), (8, 8))
    after = _first_frame(output.file_paths[VIDEO_FILE], (8, 8))
    assert np.abs(after - (255.0 - before)).mean() < 20.0  # through 48x64 and back


def test_items_in_flight_together_share_batches_and_keep_their_own_frames(
    videos: VideoLibrary, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    names = ["h264", "h264_audio", "vfr"]
    results: dict[str, ItemOutput] = {}
    batches_before = task.batcher.batches if task.batcher else 0

    def run(name: str) -> None:
        item = _item(videos.path(name), tmp_path / name, _settings(models["invert"]))
        results[name] = task.process(item)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(results) == set(names)
    for name in names:
        before = _first_frame(videos.path(name))
        after = _first_frame(results[name].file_paths[VIDEO_FILE])
        assert np.abs(after - (255.0 - before)).mean() < 8.0
        assert len(_frame_times(results[name].file_paths[VIDEO_FILE])) == len(
            _frame_times(videos.path(name))
        )
    assert task.batcher is not None
    assert task.batcher.batches > batches_before


def test_memory_is_bounded_by_credit_not_by_the_video(models: dict[str, Path]) -> None:
    # A producer whose frames are never taken by an encoder stops at two batches' worth.
    batcher = TransformBatcher(load_frame_model(str(models["invert"])), 4).start()
    try:
        stream = batcher.open_stream((16, 16))
        stop = threading.Event()
        sent: list[int] = []

        def produce() -> None:
            for _ in range(50):
                stream.put(np.zeros((2, 16, 16, 3), np.uint8), stop=stop)
                if stop.is_set():
                    return
                sent.append(2)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        producer.join(2.0)
        assert producer.is_alive()
        assert sum(sent) == stream.max_in_flight == 8
        got = 0
        while got < 8:
            frames = stream.get(5.0)
            assert frames is not None
            assert int(frames.min()) == 255  # inverted black
            got += len(frames)
        stream.release(got)
        producer.join(1.0)
        assert sum(sent) > 8  # credit returned, the producer went on
        stop.set()
        producer.join(5.0)
    finally:
        batcher.stop()


# -- containment, limits, cancellation ------------------------------------------------------
def test_the_output_stays_in_the_item_folder_whatever_the_source_is_called(
    videos: VideoLibrary, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "items" / "x"
    folder.mkdir(parents=True)
    source = folder / VIDEO_FILE  # the source named like the output must not be overwritten
    source.write_bytes(videos.path("h264").read_bytes())
    original = source.read_bytes()
    before = set((tmp_path).rglob("*"))
    item = ItemInput(
        run_id="run-1",
        item=ManifestItem(item_id="x", source="s", row=2),
        path=source,
        attempt=1,
        options=_settings(models["invert"]),
        cancel=CancelToken(),
    )
    output = task.process(item)
    created = set(tmp_path.rglob("*")) - before
    assert created == {folder / OUTPUT_DIR, folder / OUTPUT_DIR / VIDEO_FILE}
    assert source.read_bytes() == original
    # The recorder streams the file under the item's own prefix, next to metadata.json.
    writer = _FileWriter()
    recorder = Recorder(_Ledger(), writer, node_name="n", task_name="transform", wall_clock=_now)
    work = WorkItem(run_id="run-1", items=[item.item])
    written = recorder.write_outputs(work, item.item, output, attempt=1, timings={})
    assert written == ["run-1/items/x/video.mp4", "run-1/items/x/metadata.json"]
    assert writer.files["run-1/items/x/video.mp4"] == output.file_paths[VIDEO_FILE].read_bytes()
    assert writer.streamed == ["run-1/items/x/video.mp4"]
    metadata = json.loads(writer.files["run-1/items/x/metadata.json"])
    assert metadata["output"]["file"] == VIDEO_FILE


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        (MediaLimits(max_duration_s=1.0), TooLongError),
        (MediaLimits(max_width=200), TooLargeError),
        (MediaLimits(decode_timeout_s=0.0), DecodeTimeoutError),
    ],
)
def test_the_features_limits_apply(
    limits: MediaLimits,
    error: type[Exception],
    videos: VideoLibrary,
    models: dict[str, Path],
    tmp_path: Path,
) -> None:
    settings = _settings(models["invert"])
    limited = TransformTask()
    limited.setup(TaskSetup(options=settings, limits=limits))
    try:
        with pytest.raises(error):
            limited.process(_item(videos.path("h264"), tmp_path / "limited", settings))
    finally:
        limited.close()
    assert not _children()


def test_cancel_stops_decoder_and_encoder_with_their_groups(
    videos: VideoLibrary, task: TransformTask, models: dict[str, Path], tmp_path: Path
) -> None:
    token = CancelToken()
    item = _item(videos.path("hd"), tmp_path / "cancel", _settings(models["invert"]), token)
    timer = threading.Timer(0.5, token.cancel, args=("shutdown",))
    timer.start()
    with pytest.raises(CancelledError):
        task.process(item)
    timer.cancel()
    assert not _children()


def test_the_task_is_registered_and_checks_its_model(models: dict[str, Path]) -> None:
    assert task_class("transform") is TransformTask
    assert "transform" in BUILTIN_TASKS
    assert parse_task("transform") is None
    with pytest.raises(TaskConfigError, match=r"\.keras file"):
        load_frame_model("MobileNetV3Small")
    with pytest.raises(TaskConfigError, match="same shape"):
        load_frame_model(str(models["pool"]))


# -- small doubles for the recorder (the storage adapter streams the same way) ---------------
class _FileWriter:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.streamed: list[str] = []

    def write_output(self, name: str, data: bytes, content_type: str) -> None:
        self.files[name] = data

    def write_output_file(self, name: str, path: Path, content_type: str) -> None:
        with path.open("rb") as handle:
            self.files[name] = b"".join(iter(lambda: handle.read(1 << 16), b""))
        self.streamed.append(name)


class _Ledger:
    def has_record(self, run_id: str, item_id: str) -> bool:
        return False

    def record(self, result: Any) -> bool:
        return True


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _children() -> list[str]:
    # ffmpeg processes this test process started and that are still alive.
    listed = subprocess.run(
        ["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True, check=False
    )
    return [line for line in listed.stdout.splitlines() if "ffmpeg" in line]
