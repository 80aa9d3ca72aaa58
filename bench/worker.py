"""The node worker's throughput against its ceiling, and against the naive way, in one run.

    python -m bench.worker [--videos 36] [--seconds 30] [--concurrency 3] [--json]

On the same videos (720p30 H.264, a keyframe every second, sampled at 1 fps to 224x224) and
the same model (MobileNetV3Small, random weights: speed does not depend on them):

- decode-only fps: the decode stage alone (probe, path choice, ffmpeg into numpy), with the
  pipeline's concurrency;
- inference-only fps: the model alone on fixed-size batches;
- ceiling: min(decode, inference) when inference runs on an accelerator; when both stages
  share the same cores (this CPU-only machine) the shared-CPU bound
  1 / (1/decode + 1/inference);
- e2e fps: the real worker loop over a fresh Azurite (queue, download, decode, batched
  inference, upload, ledger, result messages), timed from its start to the last record;
  Azurite's own CPU use in that window is measured too (``emulator_cpu_share``): on a node
  storage is remote, so the efficiency against the ceiling left after it is printed beside;
- naive: per video, sequentially: download, decode every sampled frame to JPEG files with a
  full decode, read them back, ``model.predict`` on that video alone, upload;
- sampling_speedup: the keyframe path against a full decode with an fps filter on a 720p
  H.264 video with a 2-second keyframe interval, one frame every 2 s; plus what happens when
  keyframes are sparser than the sampling interval (10-second GOP);
- peak memory of one worker process on a 10-minute and on a 10-second video.

Videos are encoded once into ``.cache/bench-worker`` (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from batchctl.contracts import ItemResult, ManifestItem, RunOptions, WorkItem
from batchctl.local.azurite import Azurite, azurite
from batchctl.settings import WorkerSettings
from batchctl.storage import BlobStore, Ledger, RunQueues
from node_image.worker import media
from node_image.worker.loop import BlobItemStorage, Worker, WorkerConfig
from node_image.worker.model import LoadedModel, load_model
from node_image.worker.tasks import CancelToken, ItemInput, TaskSetup
from node_image.worker.tasks.features import FeaturesTask

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache" / "bench-worker"
RUN_ID = "benchworker"


# -- videos ---------------------------------------------------------------------------------
def encode(path: Path, seconds: float, gop: int, preset: str = "veryfast") -> Path:
    """A 720p30 H.264 clip with a keyframe every ``gop`` frames (cached by file name)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".part.mp4")
    subprocess.run(
        [
            media.ffmpeg_binary(), "-hide_banner", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
            "-c:v", "libx264", "-preset", preset, "-crf", "23", "-pix_fmt", "yuv420p",
            "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
            "-movflags", "+faststart", str(staging),
        ],
        check=True,
        timeout=1800,
    )  # fmt: skip
    staging.rename(path)
    return path


# -- stages alone ---------------------------------------------------------------------------
def infer_only(model: LoadedModel, batch: int, min_seconds: float = 3.0) -> float:
    """Frames/s of the model alone on fixed-size batches (after warm-up)."""
    frames = np.random.default_rng(0).integers(
        0, 255, (batch, model.input_height, model.input_width, 3), dtype=np.uint8
    )
    for _ in range(3):
        model.predict(frames)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        model.predict(frames)
        done += batch
    return done / (time.perf_counter() - started)


def decode_only(
    paths: list[Path], fps: float, size: int, concurrency: int, batch: int
) -> tuple[float, int, str]:
    """Frames/s of the decode stage alone, ``concurrency`` videos at a time."""
    limits = media.MediaLimits()
    pending = list(paths)
    lock = threading.Lock()
    totals = {"frames": 0}
    chosen: set[str] = set()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                path = pending.pop()
            _, plan, reader = media.sample_video(
                path, fps=fps, width=size, height=size, limits=limits, chunk_frames=batch
            )
            with reader:
                count = sum(len(chunk.frames) for chunk in reader)
            with lock:
                totals["frames"] += count
                chosen.add(plan.path)

    started = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return totals["frames"] / seconds, totals["frames"], ",".join(sorted(chosen))


# -- the project's pipeline, end to end -----------------------------------------------------
class _TimedLedger:
    """The real ledger, noting when the last terminal record was written."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.last = 0.0
        self.results: list[ItemResult] = []

    def has_record(self, run_id: str, item_id: str) -> bool:
        return self.ledger.has_record(run_id, item_id)

    def record(self, result: ItemResult) -> bool:
        written = self.ledger.record(result)
        self.last = time.perf_counter()
        self.results.append(result)
        return written


def end_to_end(
    settings: WorkerSettings, store: BlobStore, video: Path, count: int, options: RunOptions
) -> tuple[float, list[ItemResult], Worker]:
    """Seconds from the worker loop's start to its last terminal record, for ``count`` items."""
    store.ensure_containers()
    ledger = Ledger(settings)
    ledger.ensure_table()
    queues = RunQueues(settings, settings.run_id)
    queues.create()
    items = []
    for index in range(count):
        name = f"bench/video-{index:03d}.mp4"
        store.upload_file(settings.media_container, name, video)
        items.append(
            ManifestItem(
                item_id=f"video-{index:03d}",
                source=store.url(settings.media_container, name),
                row=index + 2,
            )
        )
    for item in items:
        work = WorkItem(run_id=settings.run_id, items=[item])
        queues.send("input", work.model_dump_json())
    timed = _TimedLedger(ledger)
    config = dataclasses.replace(WorkerConfig.from_settings(settings), spec=options.node_spec())
    worker = Worker(config, queues, timed, BlobItemStorage(settings))
    worker.prepare()  # model loaded and warmed before the clock starts, as on a node
    started = time.perf_counter()
    worker.run()
    seconds = timed.last - started
    queues.delete()
    return seconds, timed.results, worker


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the naive way --------------------------------------------------------------------------
def naive(
    store: BlobStore, settings: WorkerSettings, count: int, model: LoadedModel, fps: float
) -> tuple[float, int]:
    """Sequential per video: download, full decode to JPEGs, read back, predict, upload."""
    import tensorflow as tf

    network_predict = model.predict
    frames_total = 0
    started = time.perf_counter()
    for index in range(count):
        with tempfile.TemporaryDirectory() as directory:
            work = Path(directory)
            local = work / "video.mp4"
            store.download_to_file(settings.media_container, f"bench/video-{index:03d}.mp4", local)
            subprocess.run(
                [
                    media.ffmpeg_binary(), "-hide_banner", "-v", "error", "-i", str(local),
                    "-vf", f"fps={fps},scale={model.input_width}:{model.input_height}",
                    "-q:v", "2", str(work / "frame-%05d.jpg"),
                ],
                check=True,
            )  # fmt: skip
            frames = np.stack(
                [
                    tf.io.decode_jpeg(tf.io.read_file(str(path))).numpy()
                    for path in sorted(work.glob("frame-*.jpg"))
                ]
            )
            # One video at a time, batches of 32 and whatever is left over.
            features = np.concatenate(
                [network_predict(frames[i : i + 32]) for i in range(0, len(frames), 32)]
            )
            target = work / "features.npy"
            np.save(target, features)
            store.upload_file(settings.outputs_container, f"naive/{index:03d}.npy", target)
            frames_total += len(frames)
    return frames_total / (time.perf_counter() - started), frames_total


# -- sampling paths -------------------------------------------------------------------------
def timed_decode(
    path: Path, path_kind: media.SamplingPath, fps: float, size: int
) -> tuple[float, int]:
    """Best of three: seconds to decode ``path`` along ``path_kind``, and its frame count."""
    limits = media.MediaLimits()
    info = media.probe(path, limits, keyframe_window_s=30)
    plan = media.SamplingPlan(path_kind, fps, "bench", info.keyframe_interval_s)
    best, frames = float("inf"), 0
    for _ in range(3):
        reader = media.FrameReader(path, info, plan, width=size, height=size, limits=limits)
        started = time.perf_counter()
        frames = len(media.read_all(reader).frames)
        best = min(best, time.perf_counter() - started)
    return best, frames


def sampling(gop2: Path, gop10: Path, size: int) -> dict[str, Any]:
    """Keyframe path vs full decode + fps filter, one frame every 2 s (see the docstring)."""
    fps = 0.5
    fast_s, fast_frames = timed_decode(gop2, "keyframes", fps, size)
    full_s, full_frames = timed_decode(gop2, "full", fps, size)
    long_info = media.probe(gop10, media.MediaLimits(), keyframe_window_s=30)
    chosen = media.choose_sampling(
        fps, exact_timestamps=False, keyframe_interval_s=long_info.keyframe_interval_s
    )
    sparse_fast_s, sparse_fast_frames = timed_decode(gop10, "keyframes", fps, size)
    sparse_full_s, sparse_full_frames = timed_decode(gop10, "full", fps, size)
    chosen_speedup = 1.0 if chosen.path == "full" else sparse_full_s / sparse_fast_s
    return {
        "speedup": full_s / fast_s,
        "gop2": {
            "keyframe_path_s": round(fast_s, 3),
            "full_decode_s": round(full_s, 3),
            "frames_keyframe_path": fast_frames,
            "frames_full_decode": full_frames,
        },
        "gop10": {
            "keyframe_interval_s": long_info.keyframe_interval_s,
            "path_chosen": chosen.path,
            "reason": chosen.reason,
            "keyframe_path_would_give_frames": sparse_fast_frames,
            "frames_wanted": sparse_full_frames,
            "keyframe_path_s": round(sparse_fast_s, 3),
            "full_decode_s": round(sparse_full_s, 3),
            "speedup_of_path_chosen": round(chosen_speedup, 2),
        },
    }


# -- peak memory ----------------------------------------------------------------------------
def _tree_rss_mb() -> float:
    """Resident memory of this process plus its children (ffmpeg), from /proc, in MiB."""
    pids = {"self"}
    for task in Path("/proc/self/task").iterdir():
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        pids.update(children)
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue  # the child just ended
    return total / 1024


def peak_memory_child(path: Path, model: str, size: int, fps: float, batch: int) -> dict[str, Any]:
    """Runs in a fresh process: one item through the features task, memory sampled meanwhile."""
    options = RunOptions(model=model, frame_size=size, fps=fps, inference_batch_size=batch)
    task = FeaturesTask()
    task.setup(TaskSetup(options=options.task_settings(), concurrency=1))
    after_setup = _tree_rss_mb()
    peak = [after_setup]
    timeline: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            rss = _tree_rss_mb()
            peak[0] = max(peak[0], rss)
            timeline.append(rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    item = ManifestItem(item_id="memory", source=str(path), row=2)
    cancel = CancelToken()
    output = task.process(
        ItemInput(
            run_id=RUN_ID,
            item=item,
            path=path,
            attempt=1,
            options=options.task_settings(),
            cancel=cancel,
        )
    )
    done.set()
    sampler.join()
    task.close()
    return {
        "frames": output.metadata["frames"],
        "rss_after_setup_mb": round(after_setup, 1),
        "peak_rss_with_ffmpeg_mb": round(peak[0], 1),
        "growth_during_item_mb": round(peak[0] - after_setup, 1),
        # RSS at eight evenly spaced moments of the item: flat once the pipeline is warm.
        "rss_timeline_mb": [round(timeline[i * len(timeline) // 8]) for i in range(8)]
        if len(timeline) >= 8
        else [round(v) for v in timeline],
    }


def peak_memory(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench.worker", "--peak-memory", str(path),
            "--model", args.model, "--size", str(args.size), "--fps", str(args.fps),
            "--batch", str(args.batch),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=1800,
    )  # fmt: skip
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


# -- main -----------------------------------------------------------------------------------
def _settings(instance: Azurite, concurrency: int) -> WorkerSettings:
    return WorkerSettings(
        **instance.storage_settings().model_dump(),
        run_id=RUN_ID,
        node_name="bench",
        concurrency=concurrency,
        prefetch=1,
        idle_exit_s=0.5,
        poll_interval_s=0.2,
    )


def _step(label: str, verbose: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if verbose:
            print(f"[{label}] {text}", file=sys.stderr, flush=True)

    return say


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--videos",
        type=int,
        default=36,
        help="videos in the throughput runs (a longer run amortizes the start-up ramp)",
    )
    parser.add_argument(
        "--naive-videos", type=int, default=6, help="videos for the naive way (its rate is steady)"
    )
    parser.add_argument("--seconds", type=float, default=30, help="length of each video")
    parser.add_argument("--fps", type=float, default=1.0, help="sampled frames per second")
    parser.add_argument("--size", type=int, default=224, help="frame size fed to the model")
    parser.add_argument("--batch", type=int, default=32, help="inference batch size")
    parser.add_argument("--model", default="MobileNetV3Small")
    parser.add_argument("--concurrency", type=int, default=3, help="items in flight (worker)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--peak-memory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.peak_memory:
        print(
            json.dumps(
                peak_memory_child(args.peak_memory, args.model, args.size, args.fps, args.batch)
            )
        )
        return 0

    say = _step("bench.worker", verbose=True)
    say("encoding videos (cached in .cache/bench-worker)")
    clip = encode(CACHE / f"clip-{args.seconds:g}s-gop1.mp4", args.seconds, gop=30)
    gop2 = encode(CACHE / "clip-60s-gop2.mp4", 60, gop=60)
    gop10 = encode(CACHE / "clip-60s-gop10.mp4", 60, gop=300)

    model = load_model(args.model, frame_size=(args.size, args.size))
    say(f"inference only ({model.name}, {model.weights.split(':')[0]})")
    infer_fps = infer_only(model, args.batch)
    say(f"decode only ({args.videos} videos, concurrency {args.concurrency})")
    decode_fps, frames, decode_paths = decode_only(
        [clip] * args.videos, args.fps, args.size, args.concurrency, args.batch
    )
    accelerated = bool(model.devices)
    if accelerated:
        ceiling, kind = min(decode_fps, infer_fps), "accelerator: min(decode, inference)"
    else:
        ceiling = 1.0 / (1.0 / decode_fps + 1.0 / infer_fps)
        kind = "shared-cpu: 1/(1/decode + 1/inference)"

    options = RunOptions(
        model=args.model,
        frame_size=args.size,
        fps=args.fps,
        inference_batch_size=args.batch,
        idle_exit_s=0.5,
    )
    with azurite() as instance:
        settings = _settings(instance, args.concurrency)
        store = BlobStore(settings)
        say("end to end: the worker loop over Azurite")
        emulator_before = _cpu_seconds(instance.process.pid)
        e2e_s, results, worker = end_to_end(settings, store, clip, args.videos, options)
        emulator_cpu_s = _cpu_seconds(instance.process.pid) - emulator_before
        failed = [r.item_id for r in results if r.error is not None]
        e2e_fps = frames / e2e_s
        say("naive sequential baseline")
        naive_fps, naive_frames = naive(
            store, settings, min(args.naive_videos, args.videos), model, args.fps
        )
        store.close()

    say("sampling paths")
    sampled = sampling(gop2, gop10, args.size)
    memory: dict[str, Any] = {}
    if not args.skip_memory:
        say("peak memory (10-minute and 10-second videos, fresh processes)")
        long_video = encode(CACHE / "clip-600s.mp4", 600, gop=30, preset="ultrafast")
        short_video = encode(CACHE / "clip-10s.mp4", 10, gop=30, preset="ultrafast")
        memory = {
            "peak_memory_10min_mb": peak_memory(long_video, args),
            "peak_memory_10s_mb": peak_memory(short_video, args),
            "frames_10min_if_held_mb": round(600 * args.fps * args.size**2 * 3 / 2**20, 1),
        }

    emulator_share = min(0.99, emulator_cpu_s / ((os.cpu_count() or 1) * e2e_s))
    report: dict[str, Any] = {
        "decode_fps": round(decode_fps, 1),
        "infer_fps": round(infer_fps, 1),
        "ceiling_fps": round(ceiling, 1),
        "ceiling_kind": kind,
        "e2e_fps": round(e2e_fps, 1),
        "efficiency": round(e2e_fps / ceiling, 3),
        # Azurite serves every queue, blob and table call on this machine's cores; on a node
        # Azure Storage runs elsewhere. Its measured share of the cores during the run, and
        # the efficiency against the ceiling left after it (reported beside, not instead).
        "emulator_cpu_share": round(emulator_share, 3),
        "efficiency_excluding_emulator": round(e2e_fps / (ceiling * (1 - emulator_share)), 3),
        "naive_fps": round(naive_fps, 1),
        "naive_efficiency": round(naive_fps / ceiling, 3),
        "sampling_speedup": round(sampled["speedup"], 2),
        "sampling": {**sampled["gop2"], "long_gop": sampled["gop10"]},
        **memory,
        "setup": {
            "videos": args.videos,
            "video": f"720p30 H.264, {args.seconds:g} s, keyframe every 1 s",
            "fps": args.fps,
            "frames": frames,
            "naive_frames": naive_frames,
            "decode_path": decode_paths,
            "model": model.name,
            "weights": model.weights.split(":")[0],
            "frame_size": args.size,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "device": ",".join(model.devices) or "cpu",
            "e2e_seconds": round(e2e_s, 2),
            "e2e_failed": failed,
            "worker_stats": worker.stats,
        },
    }
    if not args.json:
        print(json.dumps(report, indent=2))
    else:
        print(json.dumps(report))
    shutil.rmtree(CACHE / "tmp", ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
