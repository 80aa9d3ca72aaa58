"""The transform task's throughput against its ceiling, in one run on the same videos.

    python -m bench.transform [--videos 6] [--seconds 6] [--size 640x360] [--concurrency 3]
                              [--batch 8] [--no-straggler] [--json]

On the same videos (H.264 with AAC audio, 30 fps) and the same model (a small two-layer
convolutional image-to-image network saved as .keras, random weights: speed does not depend
on them), each measured alone with the pipeline's concurrency:

- decode-only fps: every frame out of ffmpeg into numpy (the task's own decoder);
- inference-only fps: the model alone on the task's fixed-size batches (uint8 in and out,
  the conversions included, as the task runs it);
- encode-only fps: the task's encoder alone (Matroska pipe, x264, audio copied) on frames
  decoded beforehand and held in memory;
- ceiling: when the three stages share the same cores (this CPU-only machine) the shared-CPU
  bound 1 / (1/decode + 1/inference + 1/encode); with an accelerator, inference runs beside
  the CPU stages: min(inference, 1 / (1/decode + 1/encode));
- e2e fps: ``TransformTask.process`` over every video, ``--concurrency`` items at once (as
  the worker runs them), from the first start to the last finished file. Downloads, uploads
  and the queue are not in it (bench.worker measures those for the features path).

Goal: e2e >= 0.8 of the ceiling. Videos and the model are made once into
``.cache/bench-transform`` (git-ignored) and reused.

Then the straggler case (``straggler``; ``--no-straggler`` skips it), bench.segments with the
transform task: 20 videos of 60 s and one of 600 s on 4 local nodes, run without and with
``--segment-seconds``; ``split_over_whole_ideal`` is the segmented run's makespan over the
unsplit work spread perfectly over the nodes (goal <= 1.25), ``makespan_ratio`` the unsplit
makespan over the segmented one. See bench/segments.py for how each figure is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchctl.contracts import FrameSize, ManifestItem, TaskSettings
from node_image.worker.encode import VideoEncoder, open_full_decode
from node_image.worker.media import MediaLimits, VideoInfo, ffmpeg_binary, probe
from node_image.worker.tasks import CancelToken, ItemInput, TaskSetup
from node_image.worker.tasks.transform import (
    MAX_CHUNK_FRAMES,
    FrameModel,
    TransformTask,
    batch_size_for,
    load_frame_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache" / "bench-transform"
LIMITS = MediaLimits()


def say(message: str) -> None:
    print(f"[bench.transform] {message}", file=sys.stderr, flush=True)


def encode_video(path: Path, seconds: float, size: str) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            ffmpeg_binary(), "-hide_banner", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "30",
            "-c:a", "aac", "-shortest", str(path),
        ],
        check=True, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    return path


def make_model(path: Path) -> Path:
    if path.exists():
        return path
    import keras

    inputs = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid")(hidden)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(path)
    return path


def concurrently(jobs: list[Callable[[], int]], concurrency: int) -> tuple[int, float]:
    """Run ``jobs`` (each returns its frame count) ``concurrency`` at a time: frames, seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        frames = sum(pool.map(lambda job: job(), jobs))
    return frames, time.perf_counter() - started


def decode_all(path: Path, info: VideoInfo, keep: bool = False) -> list[npt.NDArray[np.uint8]]:
    height, width = info.display_height, info.display_width
    chunks: list[npt.NDArray[np.uint8]] = []
    reader = open_full_decode(
        path, info, width=width, height=height, limits=LIMITS, chunk_frames=MAX_CHUNK_FRAMES
    )
    with reader:
        for chunk in reader:
            if keep:
                chunks.append(chunk.frames)
            else:
                chunks.append(chunk.frames[:0])
    return chunks


def decode_only(videos: list[Path], concurrency: int) -> float:
    def job(path: Path) -> Callable[[], int]:
        return lambda: sum(len(c) for c in decode_all(path, probe(path, LIMITS), keep=True))

    frames, seconds = concurrently([job(path) for path in videos], concurrency)
    return frames / seconds


def inference_only(model: FrameModel, height: int, width: int, batch: int, frames: int) -> float:
    size = batch_size_for(batch, height, width)
    data = np.random.default_rng(0).integers(0, 255, (size, height, width, 3), dtype=np.uint8)
    model.transform(data)  # traced once, as the task's first batch is
    runs = max(2, frames // size)
    started = time.perf_counter()
    for _ in range(runs):
        model.transform(data)
    return runs * size / (time.perf_counter() - started)


def encode_only(
    videos: list[Path], frames: list[npt.NDArray[np.uint8]], concurrency: int, work: Path
) -> float:
    info = probe(videos[0], LIMITS)
    assert info.time_base is not None
    step = round(1 / (30 * info.time_base))  # pts of a 30 fps clip in its time base

    def job(index: int) -> Callable[[], int]:
        def run() -> int:
            encoder = VideoEncoder(
                source=videos[index],
                output=work / f"encode-{index}.mp4",
                info=info,
                frame_size=(info.display_width, info.display_height),
                time_base=info.time_base or Fraction(1, 30),
                limits=LIMITS,
            )
            count = 0
            with encoder:
                for chunk in frames:
                    encoder.write(chunk, [step * (count + i) for i in range(len(chunk))])
                    count += len(chunk)
                encoder.finish()
            return count

        return run

    total, seconds = concurrently([job(i) for i in range(len(videos))], concurrency)
    return total / seconds


def end_to_end(
    videos: list[Path], model_path: Path, batch: int, concurrency: int, work: Path
) -> tuple[float, dict[str, Any]]:
    settings = TaskSettings(
        task="transform",
        fps=1.0,
        frame_size=FrameSize(width=224, height=224),
        exact_timestamps=False,
        model=str(model_path),
        inference_batch_size=batch,
    )
    task = TransformTask()
    task.setup(TaskSetup(options=settings, concurrency=concurrency))
    # The first item traces the model at the videos' size; the bench's ceiling excludes
    # tracing too (inference_only warms up first).
    warm = work / "warm"
    warm.mkdir()
    shutil.copy(videos[0], warm / "source")
    task.process(_item(warm / "source", settings))

    def job(index: int) -> Callable[[], int]:
        def run() -> int:
            folder = work / f"item-{index}"
            folder.mkdir()
            shutil.copy(videos[index], folder / "source")
            output = task.process(_item(folder / "source", settings))
            return int(output.metadata["frames"])

        return run

    try:
        frames, seconds = concurrently([job(i) for i in range(len(videos))], concurrency)
        batcher = task.batcher
        assert batcher is not None
        stats = {
            "batches": batcher.batches,
            "padded_frames": batcher.padded_frames,
            "model_busy_s": round(batcher.busy_s, 2),
            "e2e_seconds": round(seconds, 2),
        }
    finally:
        task.close()
    return frames / seconds, stats


def _item(path: Path, settings: TaskSettings) -> ItemInput:
    return ItemInput(
        run_id="benchtransform",
        item=ManifestItem(item_id=path.parent.name, source=str(path), row=2),
        path=path,
        attempt=1,
        options=settings,
        cancel=CancelToken(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transform", description=__doc__)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--no-straggler",
        action="store_true",
        help="skip the straggler case (bench.segments' two local runs, about 2 minutes)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    clip = encode_video(CACHE / f"clip-{args.size}-{args.seconds:g}s.mp4", args.seconds, args.size)
    videos = [clip] * args.videos
    model_path = make_model(CACHE / "conv2.keras")
    model = load_frame_model(str(model_path))
    info = probe(clip, LIMITS)
    height, width = info.display_height, info.display_width
    with tempfile.TemporaryDirectory(prefix="bench-transform-") as scratch:
        work = Path(scratch)
        say(f"decode only ({args.videos} videos of {args.size}, concurrency {args.concurrency})")
        decode_fps = decode_only(videos, args.concurrency)
        say("inference only")
        infer_fps = inference_only(model, height, width, args.batch, 240)
        say("encode only")
        frames = decode_all(clip, info, keep=True)
        encode_fps = encode_only(videos, frames, args.concurrency, work)
        del frames
        say("end to end (TransformTask.process)")
        e2e_fps, stats = end_to_end(videos, model_path, args.batch, args.concurrency, work)
    if model.devices:
        cpu = 1.0 / (1.0 / decode_fps + 1.0 / encode_fps)
        ceiling, kind = min(infer_fps, cpu), "accelerator: min(inference, 1/(1/decode + 1/encode))"
    else:
        ceiling = 1.0 / (1.0 / decode_fps + 1.0 / infer_fps + 1.0 / encode_fps)
        kind = "shared-cpu: 1/(1/decode + 1/inference + 1/encode)"
    report = {
        "videos": args.videos,
        "frames_per_video": info.frames,
        "size": args.size,
        "concurrency": args.concurrency,
        "batch": batch_size_for(args.batch, height, width),
        "model": model.name,
        "devices": model.devices or ["cpu"],
        "decode_only_fps": round(decode_fps, 1),
        "inference_only_fps": round(infer_fps, 1),
        "encode_only_fps": round(encode_fps, 1),
        "ceiling_fps": round(ceiling, 1),
        "ceiling_kind": kind,
        "e2e_fps": round(e2e_fps, 1),
        "efficiency": round(e2e_fps / ceiling, 3),
        "goal": 0.8,
        **stats,
    }
    if not args.no_straggler:
        say("the straggler case: 20 short videos and one 10x longer on 4 nodes (bench.segments)")
        from bench import segments

        straggler = segments.measure(segments.parse_args(["--task", "transform"]))
        report["straggler"] = {
            key: straggler[key]
            for key in ("nodes", "short_videos", "short_s", "long_s", "segment_seconds",
                        "model_ms_per_frame", "makespan_ratio", "split_over_whole_ideal",
                        "goal_split_over_ideal", "output_equal")
        }  # fmt: skip
        for run in ("whole", "split"):
            report["straggler"][run] = {
                key: straggler[run][key]
                for key in ("makespan_s", "work_s", "ideal_s", "over_ideal")
            }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
