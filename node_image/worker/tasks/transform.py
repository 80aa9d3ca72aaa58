"""The built-in video-to-video task: a Keras model applied to every frame, the video rebuilt.

``task = "transform"`` with ``model`` a ``.keras`` file whose model maps frames to frames:
float32 RGB in [0, 1] of shape (batch, H, W, 3) in, the same shape out. A model with a fixed
input size gets every frame stretched to it by the decoder and its output stretched back to
the source's size by the encoder (both in ffmpeg, not in Python); a model without one sees
frames at the source's displayed size.

Per item, three stages overlap: a decoder thread reads every frame out of ffmpeg
(``encode.open_full_decode``), the process-wide :class:`TransformBatcher` runs the model on
fixed-size batches mixing frames of every item in flight (as the features path does), and
the item's own thread writes the results into ffmpeg's H.264 encoder
(``encode.VideoEncoder``), each frame at its source timestamp, with the source's audio.
Memory is bounded whatever the video's length: a stream may have at most
``2 x batch`` frames between decoder and encoder (decoded, in a batch, or waiting to be
encoded), and a batch holds at most ``BATCH_PIXEL_BUDGET`` pixels, however large the frames.

Output: ``video.mp4`` (returned as a file path: recording uploads it by streaming) and the
metadata the loop writes as ``metadata.json``. The file is written in a folder of its own
inside the item's folder (the one the source was downloaded to), under a fixed name: nothing
in the item can steer where it goes.

Limits are the features path's: ``probe`` checks size, duration and resolution first, ``-t``
bounds the decode, and the decode time limit counts the decoder's own work: the time the
decoder thread waits for ffmpeg's frames, not the time it waits for the model and the encoder
to take them (that is back-pressure, and the item's timeout bounds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from ..encode import (
    PART_NAME,
    VideoEncoder,
    VideoPart,
    audio_plan,
    join_parts,
    open_full_decode,
    output_size,
)
from ..errors import DecodeTimeoutError, RetryableError, TaskConfigError, UndecodableError
from ..media import (
    FrameReader,
    MediaLimits,
    SampleWindow,
    VideoInfo,
    probe,
    window_seek_s,
)
from ..model import _keras, devices, file_digest, parse_model_spec
from ..taskapi import AssemblyContext, ItemInput, ItemOutput, SegmentPart, TaskSetup

log = logging.getLogger(__name__)

VIDEO_FILE = "video.mp4"
# A segment's part of the video (video only; joined by ``assemble``).
PART_FILE = "part.mp4"
# The folder inside the item's folder that the output is written to: never the source's own
# name, whatever the source was called.
OUTPUT_DIR = "transform-output"
# Pixels in one batch (8 Mpx: 32 frames of 512x512, 9 of 720p, 4 of 1080p): the model's
# float32 input and output buffers stay near 100 MB each whatever the frame size.
BATCH_PIXEL_BUDGET = 8 * 1024 * 1024
# Frames per decoded chunk (a chunk is what the decoder hands the batcher at once).
MAX_CHUNK_FRAMES = 8
# How often the item thread wakes to check cancellation and the decode time limit.
POLL_S = 0.2

Frames = npt.NDArray[np.uint8]


# -- the model ------------------------------------------------------------------------------
@dataclass
class FrameModel:
    """An image-to-image Keras model ready to run on uint8 RGB frames."""

    name: str
    weights: str
    # (height, width) the model requires, or None when it takes any size.
    fixed_size: tuple[int, int] | None
    backend: str
    devices: list[str]
    _run: Callable[[Frames], Frames] = field(repr=False)

    def transform(self, frames: Frames) -> Frames:
        """Frames (n, H, W, 3) uint8 through the model, back as uint8 of the same shape."""
        return self._run(frames)


def load_frame_model(model: str) -> FrameModel:
    """Load a ``.keras`` file and check that it maps (H, W, 3) frames to (H, W, 3) frames."""
    spec = parse_model_spec(model)
    if spec.kind != "file":
        raise TaskConfigError(
            f"the transform task needs an image-to-image model saved as a .keras file, not "
            f"{model!r} (keras.applications models output features, not frames)"
        )
    path = Path(spec.name)
    if not path.is_file():
        raise TaskConfigError(f"model file {path} does not exist")
    keras = _keras()  # the worker's one lazy Keras import (seconds; only when a task needs it)
    try:
        network = keras.saving.load_model(str(path), compile=False)
    except (ValueError, OSError, TypeError) as error:
        raise TaskConfigError(f"cannot load model file {path}: {error}") from error
    shape = tuple(network.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise TaskConfigError(
            f"model file {path} takes input {shape}; frames are (batch, height, width, 3)"
        )
    fixed = (int(shape[1]), int(shape[2])) if shape[1] and shape[2] else None
    if (shape[1] is None) != (shape[2] is None):
        raise TaskConfigError(f"model file {path} fixes one side of its input only: {shape}")
    height, width = fixed or (32, 32)
    out = np.asarray(network.predict_on_batch(np.zeros((1, height, width, 3), np.float32)))
    if out.shape != (1, height, width, 3):
        raise TaskConfigError(
            f"model file {path} maps frames of {(height, width, 3)} to {out.shape[1:]}: the "
            "transform task needs frames out of the same shape as the frames in"
        )
    # One float32 input buffer per batch shape, reused: a fresh one per batch would let the
    # allocator, not the video, decide the worker's memory.
    inputs: dict[tuple[int, ...], npt.NDArray[np.float32]] = {}
    scale = np.float32(1.0 / 255.0)

    def run(frames: Frames) -> Frames:
        buffer = inputs.get(frames.shape)
        if buffer is None:
            buffer = inputs.setdefault(frames.shape, np.empty(frames.shape, np.float32))
        np.multiply(frames, scale, out=buffer)
        result = np.asarray(network.predict_on_batch(buffer), dtype=np.float32)
        if result.shape != frames.shape:
            raise ValueError(f"the model returned {result.shape} for frames {frames.shape}")
        np.clip(result, 0.0, 1.0, out=result)
        result *= 255.0
        result += 0.5
        return result.astype(np.uint8)

    return FrameModel(
        name=path.name,
        weights=f"{path} (sha256 {file_digest(path)})",
        fixed_size=fixed,
        backend=str(keras.backend.backend()),
        devices=devices(),
        _run=run,
    )


def batch_size_for(requested: int, height: int, width: int) -> int:
    """Frames per batch at this size: the run's batch size, capped by the pixel budget."""
    return max(1, min(requested, BATCH_PIXEL_BUDGET // max(1, height * width)))


# -- batching across videos -----------------------------------------------------------------
class TransformError(RetryableError):
    """The model failed on a batch (out of memory, a backend error)."""


class TransformStream:
    """One video's frames going to the model and its transformed frames coming back.

    ``put`` blocks while ``max_in_flight`` frames are between it and ``release`` (the
    encoder's side): that, not a queue length, bounds the memory one video can take.
    Outputs come back in the order the frames went in (one queue, one buffer per size).
    """

    def __init__(
        self, batcher: TransformBatcher, size: tuple[int, int], max_in_flight: int
    ) -> None:
        self._batcher = batcher
        self.size = size
        self.max_in_flight = max(1, max_in_flight)
        self._in_flight = 0
        self._credit = threading.Condition()
        self._out: queue.SimpleQueue[Frames | BaseException] = queue.SimpleQueue()
        self.closed = False
        self.inference_s = 0.0
        self.wait_s = 0.0

    def put(self, frames: Frames, *, stop: threading.Event) -> None:
        """Hand frames to the model; blocks for credit (returns early once ``stop`` is set)."""
        if not len(frames):
            return
        started = time.perf_counter()
        with self._credit:
            # A chunk larger than the credit still goes when nothing else is in flight.
            while self._in_flight and self._in_flight + len(frames) > self.max_in_flight:
                if stop.is_set():
                    return
                self._credit.wait(POLL_S)
            self._in_flight += len(frames)
        self._batcher.submit(("frames", self, frames), stop)
        self.wait_s += time.perf_counter() - started

    def close(self, stop: threading.Event) -> None:
        """No more frames: the batcher runs this stream's last partial batch soon."""
        self._batcher.submit(("close", self, None), stop)

    def get(self, timeout: float) -> Frames | None:
        """The next transformed frames (None when none came within ``timeout``)."""
        try:
            item = self._out.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise TransformError(f"the model failed: {item}") from item
        return item

    def release(self, count: int) -> None:
        """``count`` frames have left the pipeline (encoded): the decoder may send more."""
        with self._credit:
            self._in_flight -= count
            self._credit.notify_all()

    # Called on the batcher thread only.
    def _deliver(self, frames: Frames, seconds: float) -> None:
        self.inference_s += seconds
        self._out.put(frames)

    def _fail(self, error: BaseException) -> None:
        self._out.put(error)


_Message = tuple[str, TransformStream | None, Frames | None]


@dataclass
class _Pending:
    """A batch being filled with frames of one size."""

    buffer: Frames
    filled: int = 0
    owners: list[tuple[TransformStream, int]] = field(default_factory=list)
    first_at: float = 0.0
    # A stream in it has closed: its last frames must not wait for others to fill the batch.
    urgent: bool = False


class TransformBatcher:
    """One thread that runs the model on fixed-size batches mixing frames of many videos.

    As :class:`worker.model.InferenceBatcher` does for features, with frames out instead of
    vectors and one batch buffer per frame size (a model that takes any size sees each
    video's own; every batch of a size has the same shape, so the model is traced once per
    size). A batch runs when full, when a closed stream waits on it, when nothing arrived
    for ``linger_s`` (its producers are waiting for credit), or once it is ``max_age_s`` old.
    """

    def __init__(
        self,
        model: FrameModel,
        batch_size: int,
        *,
        queue_chunks: int = 8,
        linger_s: float = 0.02,
        max_age_s: float = 0.5,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.max_age_s = max_age_s
        self._queue: queue.Queue[_Message] = queue.Queue(maxsize=queue_chunks)
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.padded_frames = 0
        self.busy_s = 0.0

    def start(self) -> TransformBatcher:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="transform", daemon=True)
                self._thread.start()
        return self

    def batch_for(self, size: tuple[int, int]) -> int:
        return batch_size_for(self.batch_size, *size)

    def open_stream(self, size: tuple[int, int]) -> TransformStream:
        """A stream of frames of ``size`` (height, width); credit for two batches of them."""
        self.start()
        return TransformStream(self, size, 2 * self.batch_for(size))

    def submit(self, message: _Message, stop: threading.Event | None = None) -> None:
        while True:
            try:
                self._queue.put(message, timeout=POLL_S)
                return
            except queue.Full:
                if stop is not None and stop.is_set():
                    return

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(("stop", None, None), timeout=timeout)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            wait = self.linger_s if any(p.filled for p in self._pending.values()) else None
            try:
                kind, stream, frames = self._queue.get(timeout=wait)
            except queue.Empty:
                self._flush(lambda pending: True)  # quiet: every producer waits on us
                continue
            if kind == "stop":
                self._flush(lambda pending: True)
                return
            assert stream is not None
            if kind == "close":
                stream.closed = True
                pending = self._pending.get(stream.size)
                if pending is not None and any(owner is stream for owner, _ in pending.owners):
                    pending.urgent = True
            else:
                assert frames is not None
                self._add(stream, frames)
            self._flush(self._due)

    def _due(self, pending: _Pending) -> bool:
        return pending.urgent or time.perf_counter() - pending.first_at > self.max_age_s

    def _add(self, stream: TransformStream, frames: Frames) -> None:
        size = (int(frames.shape[1]), int(frames.shape[2]))
        if size != stream.size:
            stream._fail(ValueError(f"frames of {size} in a stream of {stream.size}"))
            return
        pending = self._pending.get(size)
        if pending is None:
            batch = self.batch_for(size)
            pending = _Pending(np.zeros((batch, *size, 3), np.uint8))
            self._pending[size] = pending
        capacity = len(pending.buffer)
        offset = 0
        while offset < len(frames):
            if not pending.filled:
                pending.first_at = time.perf_counter()
            take = min(capacity - pending.filled, len(frames) - offset)
            pending.buffer[pending.filled : pending.filled + take] = frames[offset : offset + take]
            pending.filled += take
            pending.owners.append((stream, take))
            offset += take
            if pending.filled == capacity:
                self._run_batch(pending)

    def _flush(self, due: Callable[[_Pending], bool]) -> None:
        for pending in self._pending.values():
            if pending.filled and due(pending):
                self._run_batch(pending)

    def _run_batch(self, pending: _Pending) -> None:
        owners, filled = pending.owners, pending.filled
        pending.owners, pending.filled, pending.urgent = [], 0, False
        started = time.perf_counter()
        try:
            # Always the full buffer: rows past ``filled`` are stale padding whose outputs
            # are dropped, and the model sees one shape per size only.
            result = self.model.transform(pending.buffer)
        except Exception as error:  # handed to every stream in the batch
            log.exception("the transform model failed on a batch of %d frames", filled)
            for stream, _ in owners:
                stream._fail(error)
            return
        seconds = time.perf_counter() - started
        self.busy_s += seconds
        self.batches += 1
        self.padded_frames += len(pending.buffer) - filled
        offset = 0
        for stream, count in owners:
            stream._deliver(result[offset : offset + count], seconds * count / filled)
            offset += count


# -- one item -------------------------------------------------------------------------------
class _Timestamps:
    """The pts of frames sent to the model, taken off in order as their outputs return."""

    def __init__(self) -> None:
        self._parts: deque[npt.NDArray[np.int64]] = deque()
        self._lock = threading.Lock()

    def add(self, pts: npt.NDArray[np.int64]) -> None:
        with self._lock:
            self._parts.append(pts)

    def take(self, count: int) -> npt.NDArray[np.int64]:
        taken: list[npt.NDArray[np.int64]] = []
        with self._lock:
            while count > 0:
                if not self._parts:
                    raise UndecodableError("a transformed frame came back without a timestamp")
                head = self._parts.popleft()
                if len(head) > count:
                    self._parts.appendleft(head[count:])
                    head = head[:count]
                taken.append(head)
                count -= len(head)
        return np.concatenate(taken) if len(taken) > 1 else taken[0]


class _Decoder:
    """The decoder thread of one item: frames from ffmpeg into the stream, pts aside."""

    def __init__(self, reader: FrameReader, stream: TransformStream, stamps: _Timestamps) -> None:
        self.reader = reader
        self.stream = stream
        self.stamps = stamps
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.frames = 0
        # Time spent waiting for ffmpeg's frames: the decode time the limit counts.
        self._busy_s = 0.0
        self._reading_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="transform-decode", daemon=True)

    def busy_s(self) -> float:
        since = self._reading_since
        return self._busy_s + (time.perf_counter() - since if since is not None else 0.0)

    def _chunks(self) -> Iterator[Any]:
        iterator = iter(self.reader)
        while True:
            self._reading_since = time.perf_counter()
            try:
                chunk = next(iterator, None)
            finally:
                self._busy_s += time.perf_counter() - self._reading_since
                self._reading_since = None
            if chunk is None:
                return
            yield chunk

    def _run(self) -> None:
        try:
            with self.reader:
                for chunk in self._chunks():
                    if self.stop.is_set():
                        break
                    if len(chunk.pts) != len(chunk.frames):
                        raise UndecodableError(
                            f"ffmpeg reported {len(chunk.pts)} timestamps for "
                            f"{len(chunk.frames)} frames (frames without a pts)"
                        )
                    self.stamps.add(chunk.pts)
                    self.frames += len(chunk.frames)
                    self.stream.put(chunk.frames, stop=self.stop)
        except BaseException as error:  # reported to the item thread
            self.error = error
        finally:
            self.stream.close(self.stop)
            self.done.set()


class TransformTask:
    """``task = "transform"``: every frame through an image-to-image model, audio kept."""

    thread_safe: ClassVar[bool] = True
    # A long video may run as segments (node_image/worker/segments.py): ``process`` encodes
    # the frames of an item's segment only (video alone, as a part), ``assemble`` joins the
    # parts without re-encoding and adds the source's audio in one piece.
    supports_segments: ClassVar[bool] = True

    def __init__(self) -> None:
        self.model: FrameModel | None = None
        self.batcher: TransformBatcher | None = None
        self._setup: TaskSetup | None = None

    def setup(self, setup: TaskSetup) -> None:
        options = setup.options
        self._setup = setup
        self.model = load_frame_model(options.model)
        self.batcher = TransformBatcher(
            self.model,
            options.inference_batch_size,
            queue_chunks=max(4, 2 * setup.concurrency),
        ).start()
        if self.model.fixed_size is not None:
            # One batch now, so the first item does not pay for tracing (a model that takes
            # any size is traced at each video's size, when it first comes).
            height, width = self.model.fixed_size
            batch = batch_size_for(options.inference_batch_size, height, width)
            self.model.transform(np.zeros((batch, height, width, 3), np.uint8))
        log.info(
            "transform task ready: model %s (input %s), backend %s, devices %s",
            self.model.name,
            self.model.fixed_size or "any size",
            self.model.backend,
            self.model.devices or ["cpu"],
        )

    def process(self, item: ItemInput) -> ItemOutput:
        model, batcher, setup = self.model, self.batcher, self._setup
        if model is None or batcher is None or setup is None:
            raise RuntimeError("TransformTask.process called before setup")
        limits = setup.limits
        info = probe(item.path, limits)
        item.cancel.raise_if_cancelled()
        if info.time_base is None:
            raise UndecodableError("the video stream declares no time base")
        segment = item.item.segment
        window = None
        if segment is not None:
            window = SampleWindow(segment.start_s, segment.end_s)
            # The decode seeks to a keyframe the packet index names (MPEG-TS has no index
            # of its own: a plain seek lands mid-GOP and loses the frames up to the next).
            window = dataclasses.replace(
                window,
                seek_s=window_seek_s(
                    item.path, window, info.fps or 1.0, limits, container=info.container,
                    start_time_s=max(0.0, info.start_time_s),
                ),
            )  # fmt: skip
        out_dir = item.path.parent / OUTPUT_DIR
        out_dir.mkdir(exist_ok=True)
        output = out_dir / (VIDEO_FILE if segment is None else PART_FILE)
        height, width = model.fixed_size or (info.display_height, info.display_width)
        started = time.perf_counter()
        reader = open_full_decode(
            item.path,
            info,
            width=width,
            height=height,
            limits=_wall_limits(limits, item.cancel.remaining()),
            chunk_frames=max(1, min(MAX_CHUNK_FRAMES, batcher.batch_for((height, width)))),
            threads=setup.decode_threads,
            window=window,
        )
        stream = batcher.open_stream((height, width))
        decoder = _Decoder(reader, stream, _Timestamps())
        encoder = VideoEncoder(
            source=item.path,
            output=output,
            info=info,
            frame_size=(width, height),
            time_base=info.time_base,
            limits=limits,
            threads=setup.decode_threads,
            segment_part=segment is not None,
        )
        item.cancel.add_callback(decoder.stop.set)
        item.cancel.add_callback(reader.cancel)
        item.cancel.add_callback(encoder.kill)
        with encoder:
            decoder.thread.start()
            try:
                encoded, encode_s = _pump(decoder, encoder, item, limits)
            except BaseException:
                decoder.stop.set()
                reader.cancel()
                encoder.kill()
                decoder.thread.join(timeout=30)
                item.cancel.raise_if_cancelled()  # a kill by the token reads as its reason
                raise
        model_facts: dict[str, Any] = {
            "frame_size": [width, height],
            "resized_for_model": model.fixed_size is not None,
            "model": model.name,
            "weights": model.weights,
            "backend": model.backend,
        }
        if segment is not None:
            return _part_output(
                info, encoder, encoded, output, reader, decoder, stream,
                {**model_facts, "segment": segment.model_dump(mode="json"),
                 "encode_s": round(encode_s, 4)},
            )  # fmt: skip
        out_width, out_height = output_size(info)
        metadata: dict[str, Any] = {
            **info.describe(),
            "frames": encoded,
            "output": {
                "file": VIDEO_FILE,
                "codec": "h264",
                "pix_fmt": "yuv420p",
                "size": [out_width, out_height],
                "size_bytes": output.stat().st_size,
                "time_base": str(info.time_base),
                "audio": encoder.audio.describe,
            },
            **model_facts,
            "encode_s": round(encode_s, 4),
            "pipeline_s": round(time.perf_counter() - started, 4),
            "decode_warnings": reader.stats.warnings[-5:],
        }
        return ItemOutput(
            files={},
            file_paths={VIDEO_FILE: output},
            metadata=metadata,
            decode_s=decoder.busy_s(),
            inference_s=stream.inference_s,
            content_types={VIDEO_FILE: "video/mp4"},
        )

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput:
        """The item's video from its segments' parts (in index order): every part's frames
        at their source timestamps, joined by stream copy (no frame decoded or encoded
        again), with the source's audio added in one piece, as the unsplit encoder adds it.

        A part with no frame (a window past the last frame, or inside a long VFR gap) is
        left out; the metadata is the unsplit run's, with the segments' frame counts.
        """
        setup = self._setup
        if setup is None:
            raise RuntimeError("TransformTask.assemble called before setup")
        if not parts:
            raise ValueError("assemble needs at least one segment")
        frames = [int(part.result.metadata.get("frames", 0)) for part in parts]
        if not sum(frames):
            raise UndecodableError("undecodable video: no frame could be decoded in any segment")
        out_dir = context.directory / OUTPUT_DIR
        out_dir.mkdir(exist_ok=True)
        pieces: list[VideoPart] = []
        for part, count in zip(parts, frames, strict=True):
            if not count:
                continue
            context.cancel.raise_if_cancelled()
            target = out_dir / PART_NAME.format(index=part.result.index)
            part.save(PART_FILE, target)
            pieces.append(VideoPart(target, int(part.result.metadata["first_pts"]), count))
        source = context.source()
        context.cancel.raise_if_cancelled()
        # The source's own description (the parts carry the probe of the same file).
        info = probe(source, setup.limits)
        output = out_dir / VIDEO_FILE
        started = time.perf_counter()
        join_parts(pieces, source=source, output=output, info=info, limits=setup.limits)
        first = parts[0].result.metadata
        out_width, out_height = output_size(info)
        warnings = [w for part in parts for w in part.result.metadata.get("decode_warnings", [])]
        metadata: dict[str, Any] = {
            **info.describe(),
            "frames": sum(frames),
            "output": {
                "file": VIDEO_FILE,
                "codec": "h264",
                "pix_fmt": "yuv420p",
                "size": [out_width, out_height],
                "size_bytes": output.stat().st_size,
                "time_base": str(info.time_base),
                "audio": audio_plan(info).describe,
            },
            **{key: first[key] for key in PART_MODEL_KEYS if key in first},
            "encode_s": round(sum(p.result.metadata.get("encode_s", 0.0) for p in parts), 4),
            "join_s": round(time.perf_counter() - started, 4),
            "decode_warnings": warnings[-5:],
            "segments": {
                "count": len(parts),
                "bounds_s": [
                    [p.result.metadata.get("segment", {}).get("start_s"),
                     p.result.metadata.get("segment", {}).get("end_s")]
                    for p in parts
                ],
                "frames": frames,
            },
        }  # fmt: skip
        for piece in pieces:
            piece.path.unlink(missing_ok=True)  # joined: only the video is uploaded
        return ItemOutput(
            files={},
            file_paths={VIDEO_FILE: output},
            metadata=metadata,
            decode_s=sum(p.result.timings.decode_s for p in parts),
            inference_s=sum(p.result.timings.inference_s for p in parts),
            content_types={VIDEO_FILE: "video/mp4"},
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()


# What a part's metadata says of the model, carried into the assembled item's.
PART_MODEL_KEYS = ("frame_size", "resized_for_model", "model", "weights", "backend")


def _part_output(  # noqa: PLR0917 (one call site, in process: the pipeline's pieces)
    info: VideoInfo,
    encoder: VideoEncoder,
    encoded: int,
    output: Path,
    reader: FrameReader,
    decoder: _Decoder,
    stream: TransformStream,
    facts: dict[str, Any],
) -> ItemOutput:
    """A segment's output: its part (no file when the window held no frame) and what the
    assembly needs to place it: the first frame's source pts and the frame count."""
    metadata: dict[str, Any] = {
        **info.describe(),
        **facts,
        "frames": encoded,
        "first_pts": encoder.first_pts,
        "last_pts": encoder.last_pts,
        "decode_warnings": reader.stats.warnings[-5:],
    }
    return ItemOutput(
        files={},
        file_paths={PART_FILE: output} if encoded else {},
        metadata=metadata,
        decode_s=decoder.busy_s(),
        inference_s=stream.inference_s,
        content_types={PART_FILE: "video/mp4"},
    )


def _pump(
    decoder: _Decoder, encoder: VideoEncoder, item: ItemInput, limits: MediaLimits
) -> tuple[int, float]:
    """On the item's thread: transformed frames into the encoder until the last one, then
    the file finished; (frames encoded, seconds spent encoding)."""
    stream = decoder.stream
    encoded, encode_s = 0, 0.0
    while True:
        frames = stream.get(POLL_S)
        item.cancel.raise_if_cancelled()
        if frames is None:
            if decoder.done.is_set() and decoder.error is not None:
                break  # raised below: no use encoding the frames still coming
            if decoder.busy_s() > limits.decode_timeout_s:
                decoder.stop.set()
                decoder.reader.cancel()
                raise DecodeTimeoutError(
                    f"decoding ran past the limit of {limits.decode_timeout_s:.0f} s "
                    f"({decoder.frames} frames so far)"
                )
            if decoder.done.is_set() and encoded >= decoder.frames:
                break
            continue
        mark = time.perf_counter()
        encoder.write(frames, decoder.stamps.take(len(frames)).tolist())
        encode_s += time.perf_counter() - mark
        encoded += len(frames)
        stream.release(len(frames))
    decoder.thread.join()
    if decoder.error is not None:
        raise decoder.error
    mark = time.perf_counter()
    encoder.finish()
    return encoded, encode_s + time.perf_counter() - mark


def _wall_limits(limits: MediaLimits, remaining_s: float | None) -> MediaLimits:
    """The reader's own wall-clock bound: back-pressure makes a transform's decoder wait far
    longer than it decodes, so the decode limit is enforced on its busy time (``_Decoder``)
    and the wall clock is only held to the item's remaining time."""
    wall = max(limits.decode_timeout_s, remaining_s or 0.0)
    return dataclasses.replace(limits, decode_timeout_s=wall)


__all__ = ["TransformBatcher", "TransformTask", "load_frame_model"]
