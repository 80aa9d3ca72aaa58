"""The built-in task: per-frame CNN feature vectors of sampled frames.

Per item: ffprobe and limits, choice of the sampling path, ffmpeg decoding straight into numpy
chunks, and the chunks handed to the process-wide :class:`InferenceBatcher`, which runs the
model on fixed-size batches mixing frames of every item in flight. Several items run this at
once (one thread each), so while the model works on one batch the next videos are being
downloaded and decoded; the batcher's bounded queue is the back-pressure that keeps memory
flat. Output: ``features.npz`` (``features`` float32 (frames, dim), ``timestamps`` float64
seconds from the start of the video) and metadata describing how they were made.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from ..errors import UndecodableError
from ..media import SampleWindow, sample_video
from ..model import InferenceBatcher, LoadedModel, being_prepared, load_model
from ..taskapi import AssemblyContext, ItemInput, ItemOutput, SegmentPart, TaskSetup

log = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
MAX_CHUNK_FRAMES = 32


class FeaturesTask:
    """``task = "features"``: the model's pooled feature vector for every sampled frame."""

    thread_safe: ClassVar[bool] = True
    # A long video may run as segments (node_image/worker/segments.py): ``process`` samples
    # an item's segment only, and ``assemble`` joins the segments' outputs into the item's.
    supports_segments: ClassVar[bool] = True

    def __init__(self) -> None:
        self.batcher: InferenceBatcher | None = None
        self._setup: TaskSetup | None = None
        self._input_size: tuple[int, int] | None = None  # (height, width) frames are cut to

    @property
    def model(self) -> LoadedModel | None:
        """The model (waited for while a standby worker still builds it); None before setup."""
        return None if self.batcher is None else self.batcher.model

    def setup(self, setup: TaskSetup) -> None:
        options = setup.options
        self._setup = setup
        frame_size = (options.frame_size.height, options.frame_size.width)
        arguments: dict[str, Any] = {
            "frame_size": frame_size,
            "weights_dir": setup.weights_dir,
            "mixed_precision": setup.mixed_precision,
        }
        # Room for a couple of chunks per item in flight: enough to keep the model fed while
        # decoders stall, small enough that memory does not depend on the queue's depth.
        queue_chunks = max(4, 2 * setup.concurrency)
        if being_prepared(options.model, **arguments):
            # A standby worker builds (and warms) this model on another thread: take items
            # now, and let them download and decode while it is built; the first batch waits
            # for it. Only a keras.applications model is prepared, and its input is the
            # frame size.
            built: Future[LoadedModel] = Future()

            def take_prepared() -> None:
                try:
                    built.set_result(load_model(options.model, **arguments))
                except BaseException as error:  # every batch fails with it, naming it
                    built.set_exception(error)

            threading.Thread(target=take_prepared, name="model-prepared", daemon=True).start()
            self._input_size = frame_size
            self.batcher = InferenceBatcher(
                built,
                options.inference_batch_size,
                input_size=frame_size,
                queue_chunks=queue_chunks,
            ).start()
            log.info("features task taking items while model %s is being built", options.model)
            return
        model = load_model(options.model, **arguments)
        self._input_size = (model.input_height, model.input_width)
        self.batcher = InferenceBatcher(
            model, options.inference_batch_size, queue_chunks=queue_chunks
        ).start()
        # One batch now, so the first item does not pay for tracing/compilation.
        warmup = np.zeros((options.inference_batch_size, *self._input_size, 3), np.uint8)
        model.predict(warmup)
        log.info(
            "features task ready: model %s, weights %s, backend %s, devices %s",
            model.name,
            model.weights,
            model.backend,
            model.devices or ["cpu"],
        )

    def process(self, item: ItemInput) -> ItemOutput:
        batcher, setup, input_size = self.batcher, self._setup, self._input_size
        if batcher is None or setup is None or input_size is None:
            raise RuntimeError("FeaturesTask.process called before setup")
        options = item.options
        segment = item.item.segment
        window = None if segment is None else SampleWindow(segment.start_s, segment.end_s)
        info, plan, reader = sample_video(
            item.path,
            fps=options.fps,
            width=input_size[1],
            height=input_size[0],
            limits=setup.limits,
            exact_timestamps=options.exact_timestamps,
            # Chunks of at most 32 frames: the batcher's queue holds a few of them, so memory
            # stays small even with a batch size of hundreds.
            chunk_frames=min(options.inference_batch_size, MAX_CHUNK_FRAMES),
            threads=setup.decode_threads,
            window=window,
        )
        item.cancel.raise_if_cancelled()
        stream = batcher.open_stream()
        times: list[npt.NDArray[np.float64]] = []
        with reader:
            item.cancel.add_callback(reader.cancel)
            try:
                for chunk in reader:
                    item.cancel.raise_if_cancelled()
                    stream.put(chunk.frames, timeout=item.cancel.remaining())
                    times.append(chunk.timestamps)
            except Exception:
                item.cancel.raise_if_cancelled()  # a kill by the token reads as its reason
                raise
        features = stream.finish(timeout=item.cancel.remaining())
        model = batcher.model
        timestamps = np.concatenate(times) if times else np.empty(0, np.float64)
        if len(features) != len(timestamps):
            raise UndecodableError(
                f"{len(timestamps)} frames decoded but {len(features)} feature rows returned"
            )
        metadata: dict[str, Any] = {
            **info.describe(),
            "sampling": {
                "requested_fps": options.fps,
                "path": plan.path,
                "reason": plan.reason,
                "keyframe_interval_s": plan.keyframe_interval_s,
                "exact_timestamps": plan.path == "full",
            },
            "frames": len(features),
            "frame_size": [model.input_width, model.input_height],
            "feature_dim": model.feature_dim,
            "model": model.name,
            "weights": model.weights,
            "pretrained": model.pretrained,
            "backend": model.backend,
            "decode_warnings": reader.stats.warnings[-5:],
        }
        if segment is not None:
            metadata["segment"] = segment.model_dump(mode="json")
        return ItemOutput(
            files={FEATURES_FILE: _npz(features, timestamps)},
            metadata=metadata,
            decode_s=reader.stats.seconds,
            inference_s=stream.inference_s,
            content_types={FEATURES_FILE: "application/octet-stream"},
        )

    def assemble(self, parts: Sequence[SegmentPart], context: AssemblyContext) -> ItemOutput:
        """The item's output from its segments' (in index order): the unsplit run's.

        Features and timestamps are concatenated (the segments' samples partition the whole
        video's, each with its absolute time); the metadata is the first segment's (the probe
        and the sampling path are the whole video's in every segment) with the totals.
        """
        if not parts:
            raise ValueError("assemble needs at least one segment")
        features: list[npt.NDArray[np.float32]] = []
        times: list[npt.NDArray[np.float64]] = []
        for part in parts:
            with np.load(io.BytesIO(part.read(FEATURES_FILE))) as data:
                features.append(np.asarray(data["features"], np.float32))
                times.append(np.asarray(data["timestamps"], np.float64))
        all_features = np.concatenate(features)
        timestamps = np.concatenate(times)
        if len(timestamps) == 0:
            raise UndecodableError("undecodable video: no frame could be decoded in any segment")
        metadata = dict(parts[0].result.metadata)
        metadata.pop("segment", None)
        warnings = [w for part in parts for w in part.result.metadata.get("decode_warnings", [])]
        metadata.update(
            frames=len(timestamps),
            decode_warnings=warnings[-5:],
            segments={
                "count": len(parts),
                "bounds_s": [
                    [
                        p.result.metadata.get("segment", {}).get("start_s"),
                        p.result.metadata.get("segment", {}).get("end_s"),
                    ]
                    for p in parts
                ],
                "frames": [len(t) for t in times],
            },
        )
        return ItemOutput(
            files={FEATURES_FILE: _npz(all_features, timestamps)},
            metadata=metadata,
            decode_s=sum(p.result.timings.decode_s for p in parts),
            inference_s=sum(p.result.timings.inference_s for p in parts),
            content_types={FEATURES_FILE: "application/octet-stream"},
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()


def _npz(features: npt.NDArray[np.float32], timestamps: npt.NDArray[np.float64]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, features=features.astype(np.float32), timestamps=timestamps)
    return buffer.getvalue()
