"""The straggler case: one long video among short ones, with and without segments, side by side.

    python -m bench.segments [--task transform|features] [--short 20] [--short-s S]
                             [--long-factor 10] [--segments 6] [--segment-seconds S]
                             [--nodes 4] [--model-ms-per-frame 4] [--exact-timestamps] [--json]

On the same videos (``--short`` clips of ``--short-s`` seconds and one ``--long-factor`` times
longer, encoded here: 160x90, 10 fps, H.264 ultrafast, a keyframe every second) and the same
model saved here, two real local runs (Azurite, the run orchestrator through the local
driver, ``--nodes`` worker processes) one after the other in one session: ``whole`` without
segments, ``split`` with ``--segment-seconds`` (RunOptions.segment_seconds; by default 1% over
long / ``--segments``), which cuts the long video into parts.

The task (``--task``):

- ``transform`` (the default; short clips of 60 s): every frame decoded, through a 1x1
  convolution (any input size) and encoded, with the node's accelerator emulated: each batch
  takes ``--model-ms-per-frame`` ms per frame more, a sleep on the node alone. The local
  nodes are processes sharing this machine's cores: a video that ends its run alone gets
  every core and speeds up, so in CPU terms no node is ever idle and there is no straggler
  to remove. On a fleet each node's GPU is its own, and that is the time the sleep stands
  for (``--model-ms-per-frame 0`` measures the shared-CPU case instead);
- ``features`` (short clips of 300 s): a tiny Keras CNN at 1 fps on the keyframe path.

For each run it prints:

- ``makespan_s``: from the first task start (the earliest ``task_started`` the task stamps
  into an item's or a segment's metadata) to the last terminal record (the latest record's
  ``finished_at``). Start-up (manifest, enqueue, TensorFlow loading in every worker) is left
  out: it is the same in both runs and not what segments change. ``run_makespan_s`` is the
  same end from the run's start, start-up included;
- ``work_s``: the sum of every terminal record's ``timings.total_s``: each item's own node
  time (download, decode, inference, upload) as its worker measured it. A segmented item's
  record carries the sum of its segments' totals, so the same formula counts every segment's
  own time. The split itself (the first worker's download and probe before it queues the
  segments) and the assembly are in no record, so ``split``'s work leaves them out;
- ``ideal_s``: ``work_s / nodes``, a perfect spread of that work; ``over_ideal``:
  ``makespan_s / ideal_s``.

And ``makespan_ratio``: whole's makespan over split's; ``split_over_whole_ideal``: split's
makespan over whole's ideal (goal <= 1.25), which charges segments all their own overhead
(the split, each segment's probe, seek and part, the assembly). ``output_equal`` checks that
the long video's output equals the unsplit run's: every video packet at the same pts
(transform), or the same features and timestamps (features).

Each node runs one item at a time (worker concurrency 1, ``--concurrency``), as bench.controller
models a GPU node: an item's ``total_s`` is then time its node spent on it alone, so summing
them counts no node-second twice (with several items in flight on a node, each one's total
includes the others' time).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from batchctl.contracts import ItemResult, ItemStatus, RunOptions
from node_image.worker.media import ffmpeg_binary
from node_image.worker.segments import parse_rows
from node_image.worker.tasks import ItemInput, ItemOutput, TaskSetup
from node_image.worker.tasks.features import FeaturesTask
from node_image.worker.tasks.transform import TransformTask

# The tiny model's fixed input (tests/worker_tasks.py save_tiny_model): frame_size must match.
MODEL_SIZE = 32
LONG_ID = "long"
# Worker processes inherit it: the emulated accelerator's time per frame (TimedTransform).
MODEL_MS_ENV = "BENCH_MODEL_MS_PER_FRAME"


def say(message: str) -> None:
    print(f"[bench.segments] {message}", file=sys.stderr, flush=True)


def _stamped(output: ItemOutput, started: float) -> ItemOutput:
    output.metadata["task_started"] = started
    output.metadata["task_ended"] = time.time()
    return output


class TimedTransform(TransformTask):
    """The built-in transform task, stamping its calls as :class:`TimedFeatures` does, with
    the node's accelerator emulated: each batch takes ``BENCH_MODEL_MS_PER_FRAME`` ms per
    frame more (a sleep, after the real model ran).

    Why: the local nodes are processes sharing this machine's cores, so a video that ends
    its run alone gets every core and speeds up, and no node is ever idle in CPU terms: on
    shared CPUs there is no straggler to remove. On a fleet, each node's GPU is its own; the
    sleep is that time, spent per node whatever the other nodes do.
    """

    def setup(self, setup: TaskSetup) -> None:
        super().setup(setup)
        per_frame_s = float(os.environ.get(MODEL_MS_ENV, "0")) / 1000
        model = self.model
        if model is None or per_frame_s <= 0:
            return
        real = model._run

        def accelerated(frames: Any) -> Any:
            out = real(frames)
            time.sleep(per_frame_s * len(frames))
            return out

        model._run = accelerated

    def process(self, item: ItemInput) -> ItemOutput:
        started = time.time()
        return _stamped(super().process(item), started)


class TimedFeatures(FeaturesTask):
    """The built-in features task, stamping when its node started and ended each call.

    Records only say when an item finished, and a segmented item's record sums its segments'
    times, so the stamps (in the item's metadata.json, or a segment's row) are what locate
    the first task's start in both runs alike. Everything else is FeaturesTask's.
    """

    def process(self, item: ItemInput) -> ItemOutput:
        started = time.time()
        return _stamped(super().process(item), started)


def encode_clip(path: Path, seconds: float) -> None:
    # Small and fast to decode, a keyframe every second so the 1 fps sampling takes the
    # keyframe path; testsrc2 moves, so every frame differs.
    subprocess.run(
        [
            ffmpeg_binary(), "-hide_banner", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size=160x90:rate=10:duration={seconds:g}",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "10",
            str(path),
        ],
        check=True, stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip


def write_inputs(root: Path, short: int, short_s: float, long_s: float, position: str) -> Path:
    """The clips, the model and a manifest naming the clips (the long one at ``position``)."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    # All short rows share one file: the run uploads and processes each row on its own anyway.
    encode_clip(videos / "short.mp4", short_s)
    encode_clip(videos / "long.mp4", long_s)
    rows = [(f"short-{index:03d}", "videos/short.mp4") for index in range(short)]
    at = {"first": 0, "middle": short // 2, "last": short}[position]
    rows.insert(at, (LONG_ID, "videos/long.mp4"))
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        writer.writerows(rows)
    return manifest


def save_model(path: Path, task: str) -> Path:
    if task == "transform":
        return save_invert_model(path)
    from tests.worker_tasks import save_tiny_model

    return save_tiny_model(path, MODEL_SIZE)


def save_invert_model(path: Path) -> Path:
    """A frames-to-frames model of any input size: a 1x1 convolution, out = 1 - in (the
    cheapest real model: the transform's cost is then decode and encode, as it is on a GPU
    node whose model runs far faster than its CPUs code video)."""
    import keras

    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(3, 1)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([-np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.ones(3, np.float32)])
    model.save(path)
    return path


def video_pts(path: Path) -> list[int]:
    """Every video packet's pts in presentation order (ffprobe)."""
    out = subprocess.run(
        [ffmpeg_binary().replace("ffmpeg", "ffprobe") if ffmpeg_binary().endswith("ffmpeg")
         else "ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "packet=pts", "-of", "json", str(path)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return sorted(int(packet["pts"]) for packet in json.loads(out.stdout).get("packets", []))


def _stamp(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), UTC)


def run_once(
    services: Any, root: Path, manifest: Path, run_id: str, options: RunOptions, *, nodes: int
) -> dict[str, Any]:
    """One local run; its figures, and the long item's features for the comparison."""
    from batchctl.local.session import drive_run
    from batchctl.local.staging import stage_local_manifest

    settings, store, ledger = services.settings, services.store, services.ledger
    manifest_blob = stage_local_manifest(settings, manifest, run_id)
    outcome = drive_run(services, run_id, manifest_blob, options, out_dir=root / "out")
    report = outcome.report
    results: list[ItemResult] = list(ledger.iter_results(run_id))
    failed = [r.item_id for r in results if r.status is not ItemStatus.SUCCEEDED]
    if failed or len(results) != report.total:
        raise SystemExit(
            f"{run_id}: {len(results)} records for {report.total} items, not succeeded: "
            f"{failed} ({report.message})"
        )

    def read(name: str) -> bytes:
        return bytes(store.download_bytes(settings.outputs_container, name))

    # Every task call's (node, start, end): the items' metadata, and for a segmented item
    # its segments' rows (the assembled metadata keeps only the first segment's stamps).
    spans: list[tuple[str, datetime, datetime]] = []
    long_features: dict[str, Any] = {}
    segments = 0
    for result in results:
        metadata_name = next(n for n in result.outputs if n.endswith("/metadata.json"))
        metadata = json.loads(read(metadata_name))
        rows = parse_rows(ledger.segment_payloads(run_id, result.item_id))
        if rows:
            segments += len(rows) if result.item_id == LONG_ID else 0
            for row in rows.values():
                spans.append(
                    (
                        row.node,
                        _stamp(row.metadata["task_started"]),
                        _stamp(row.metadata["task_ended"]),
                    )
                )
        else:
            spans.append(
                (
                    str(metadata["node"]),
                    _stamp(metadata["task_started"]),
                    _stamp(metadata["task_ended"]),
                )
            )
        if result.item_id == LONG_ID:
            long_features = {"frames": metadata.get("frames")}
            features_name = next((n for n in result.outputs if n.endswith("/features.npz")), "")
            video_name = next((n for n in result.outputs if n.endswith("/video.mp4")), "")
            if features_name:
                with np.load(io.BytesIO(read(features_name))) as data:
                    long_features.update({key: np.asarray(data[key]) for key in data.files})
            if video_name:
                video = root / f"{run_id}-long.mp4"
                store.download_to_file(settings.outputs_container, video_name, video)
                long_features["video_pts"] = np.asarray(video_pts(video), np.int64)
    first_start = min(start for _, start, _ in spans)
    last_record = max(r.finished_at or report.finished_at for r in results)
    makespan = (last_record - first_start).total_seconds()
    work = sum(r.timings.total_s for r in results)
    ideal = work / nodes
    long_record = next(r for r in results if r.item_id == LONG_ID)
    return {
        "figures": {
            "makespan_s": round(makespan, 2),
            "run_makespan_s": round((last_record - report.started_at).total_seconds(), 2),
            "work_s": round(work, 2),
            "ideal_s": round(ideal, 2),
            "over_ideal": round(makespan / ideal, 3),
            # Where the work went (a segmented item's stages are its segments' sums).
            "work_by_stage_s": {
                stage: round(sum(getattr(r.timings, f"{stage}_s") for r in results), 2)
                for stage in ("download", "decode", "inference", "upload")
            },
            "long_item_work_s": round(long_record.timings.total_s, 2),
            "long_item_by_stage_s": {
                stage: round(getattr(long_record.timings, f"{stage}_s"), 2)
                for stage in ("download", "decode", "inference", "upload")
            },
            "long_segments": segments,
            "task_calls": len(spans),
            "nodes_used": len({node for node, _, _ in spans}),
        },
        "long": long_features,
    }


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The long item's output is the unsplit run's: features and timestamps equal, or every
    video packet at the same pts."""
    keys = {"video_pts"} if "video_pts" in a else {"features", "timestamps"}
    if not keys <= a.keys() or not keys <= b.keys():
        return False
    return all(np.array_equal(a[key], b[key]) for key in keys)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.segments", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--short", type=int, default=20, help="short videos")
    # 5-minute clips, not seconds-long ones: at 1 fps on the keyframe path a clip costs a
    # fixed ~0.3 s (download, probe, ffmpeg start, upload, record) plus a few ms per second
    # of video, and only the duration-bound part makes the long video a straggler.
    parser.add_argument(
        "--short-s",
        type=float,
        help="seconds of a short video (default: 60 for transform, 300 for features)",
    )
    parser.add_argument("--long-factor", type=float, default=10.0, help="long = factor x short")
    parser.add_argument(
        "--long-position",
        choices=["first", "middle", "last"],
        default="middle",
        help="where the long video's row is in the manifest",
    )
    parser.add_argument("--segments", type=int, default=6, help="segments of the long video")
    parser.add_argument(
        "--segment-seconds", type=float, help="overrides --segments (default: long / segments)"
    )
    parser.add_argument(
        "--task",
        choices=["transform", "features"],
        default="transform",
        help="transform: every frame decoded, run through a model and encoded (the work "
        "scales with frames); features: 1 fps samples",
    )
    parser.add_argument(
        "--model-ms-per-frame",
        type=float,
        default=4.0,
        help="transform: the emulated accelerator's milliseconds per frame, on each node "
        "alone (0: the model's CPU time only, shared by every node)",
    )
    parser.add_argument("--exact-timestamps", action="store_true", help="decode every frame")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="items at once per node")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both runs and their figures (what ``main`` prints)."""
    from batchctl.local.session import local_session

    # Worker processes inherit this environment (WorkerSettings reads BATCHCTL_*).
    os.environ["BATCHCTL_CONCURRENCY"] = str(args.concurrency)
    os.environ[MODEL_MS_ENV] = str(args.model_ms_per_frame if args.task == "transform" else 0)
    if args.short_s is None:
        args.short_s = 60.0 if args.task == "transform" else 300.0
    long_s = args.short_s * args.long_factor
    # 1% over long / segments: a duration that ffprobe reads a frame longer than encoded must
    # not add a sliver of a seventh segment.
    segment_s = args.segment_seconds or round(long_s / args.segments * 1.01, 2)
    timed = "TimedTransform" if args.task == "transform" else "TimedFeatures"
    task = f"{__name__.replace('__main__', 'bench.segments')}:{timed}"
    # A suffix keeps the ids fresh when BATCHCTL_* points at a shared storage account
    # (a reused run id is refused).
    suffix = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-segments-") as scratch:
        root = Path(scratch)
        say(f"encoding {args.short} x {args.short_s:g} s and 1 x {long_s:g} s, saving the model")
        manifest = write_inputs(root, args.short, args.short_s, long_s, args.long_position)
        model = save_model(root / "model.keras", args.task)
        base = RunOptions(
            task=task,
            model=str(model),
            frame_size=MODEL_SIZE,
            fps=1,
            exact_timestamps=args.exact_timestamps,
            # One item a message, in both runs: the packing must not differ between them.
            mini_batch_size=1,
            max_nodes=args.nodes,
            poll_interval_s=1,
            idle_exit_s=10,
        )
        runs: dict[str, dict[str, Any]] = {}
        with local_session(media_root=root, nodes=args.nodes, log_dir=root / "logs") as services:
            for name, seconds in (("whole", None), ("split", segment_s)):
                say(f"run {name} (segment_seconds {seconds})")
                options = base.model_copy(update={"segment_seconds": seconds})
                run_id = f"bench-seg-{name}-{suffix}"
                runs[name] = run_once(services, root, manifest, run_id, options, nodes=args.nodes)
    whole, split = runs["whole"]["figures"], runs["split"]["figures"]
    report = {
        "nodes": args.nodes,
        "concurrency": args.concurrency,
        "short_videos": args.short,
        "short_s": args.short_s,
        "long_s": long_s,
        "long_position": args.long_position,
        "segment_seconds": segment_s,
        "task": args.task,
        "model_ms_per_frame": args.model_ms_per_frame if args.task == "transform" else 0,
        "exact_timestamps": args.exact_timestamps,
        "fps": 1,
        "makespan_from": "first task start to last terminal record",
        "ideal_from": "sum of records' timings.total_s / nodes",
        "whole": whole,
        "split": split,
        "makespan_ratio": round(whole["makespan_s"] / split["makespan_s"], 3),
        # Split's makespan against the work the videos need unsplit: what segments' own
        # overhead (every segment downloads and probes the whole source) costs on top.
        "split_over_whole_ideal": round(split["makespan_s"] / whole["ideal_s"], 3),
        "goal_split_over_ideal": 1.25,
        "output_equal": same_output(runs["whole"]["long"], runs["split"]["long"]),
        "bench_s": round(time.perf_counter() - started, 1),
    }
    return report


if __name__ == "__main__":
    raise SystemExit(main())
