"""The straggler case: one long video among short ones, with and without segments, side by side.

    python -m bench.segments [--short 20] [--short-s 300] [--long-factor 10] [--segments 6]
                             [--segment-seconds S] [--nodes 4] [--exact-timestamps] [--json]

On the same videos (``--short`` clips of ``--short-s`` seconds and one ``--long-factor`` times
longer, encoded here: 160x90, 10 fps, H.264 ultrafast, a keyframe every second), the same
tiny Keras model (32x32 input, saved here) and the features task at 1 fps, two real local
runs (Azurite, the run orchestrator through the local driver, ``--nodes`` worker processes)
one after the other in one session: ``whole`` without segments, ``split`` with
``--segment-seconds`` (RunOptions.segment_seconds; by default 1% over long / ``--segments``),
which cuts the long video into parts.
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
  ``makespan_s / ideal_s`` (goal <= 1.25 with segments).

And ``makespan_ratio``: whole's makespan over split's; ``split_over_whole_ideal``: split's
makespan over whole's ideal, which charges segments their own overhead (each segment
downloads and probes the whole source). ``features_equal`` checks that the
long video's assembled features and timestamps equal the unsplit run's.

Each node runs one item at a time (worker concurrency 1, ``--concurrency``), as bench.controller
models a GPU node: an item's ``total_s`` is then time its node spent on it alone, so summing
them counts no node-second twice (with several items in flight on a node, each one's total
includes the others' time). All nodes share this machine's cores, so an item runs faster
when fewer nodes are busy: without segments the long video ends its run alone and runs a
little faster than it would beside three busy nodes, which flatters ``whole``.
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
from node_image.worker.tasks import ItemInput, ItemOutput
from node_image.worker.tasks.features import FeaturesTask

# The tiny model's fixed input (tests/worker_tasks.py save_tiny_model): frame_size must match.
MODEL_SIZE = 32
LONG_ID = "long"


def say(message: str) -> None:
    print(f"[bench.segments] {message}", file=sys.stderr, flush=True)


class TimedFeatures(FeaturesTask):
    """The built-in features task, stamping when its node started and ended each call.

    Records only say when an item finished, and a segmented item's record sums its segments'
    times, so the stamps (in the item's metadata.json, or a segment's row) are what locate
    the first task's start in both runs alike. Everything else is FeaturesTask's.
    """

    def process(self, item: ItemInput) -> ItemOutput:
        started = time.time()
        output = super().process(item)
        output.metadata["task_started"] = started
        output.metadata["task_ended"] = time.time()
        return output


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


def save_model(path: Path) -> Path:
    from tests.worker_tasks import save_tiny_model

    return save_tiny_model(path, MODEL_SIZE)


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
            features_name = next(n for n in result.outputs if n.endswith("/features.npz"))
            with np.load(io.BytesIO(read(features_name))) as data:
                long_features = {key: np.asarray(data[key]) for key in data.files}
            long_features["frames"] = metadata.get("frames")
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


def same_features(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = {"features", "timestamps"}
    if not keys <= a.keys() or not keys <= b.keys():
        return False
    return all(np.array_equal(a[key], b[key]) for key in keys)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.segments", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--short", type=int, default=20, help="short videos")
    # 5-minute clips, not seconds-long ones: at 1 fps on the keyframe path a clip costs a
    # fixed ~0.3 s (download, probe, ffmpeg start, upload, record) plus a few ms per second
    # of video, and only the duration-bound part makes the long video a straggler.
    parser.add_argument("--short-s", type=float, default=300.0, help="seconds of a short video")
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
    parser.add_argument("--exact-timestamps", action="store_true", help="decode every frame")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="items at once per node")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    from batchctl.local.session import local_session

    # Worker processes inherit this environment (WorkerSettings reads BATCHCTL_*).
    os.environ["BATCHCTL_CONCURRENCY"] = str(args.concurrency)
    long_s = args.short_s * args.long_factor
    # 1% over long / segments: a duration that ffprobe reads a frame longer than encoded must
    # not add a sliver of a seventh segment.
    segment_s = args.segment_seconds or round(long_s / args.segments * 1.01, 2)
    task = f"{__name__.replace('__main__', 'bench.segments')}:TimedFeatures"
    # A suffix keeps the ids fresh when BATCHCTL_* points at a shared storage account
    # (a reused run id is refused).
    suffix = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-segments-") as scratch:
        root = Path(scratch)
        say(f"encoding {args.short} x {args.short_s:g} s and 1 x {long_s:g} s, saving the model")
        manifest = write_inputs(root, args.short, args.short_s, long_s, args.long_position)
        model = save_model(root / "tiny.keras")
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
        "features_equal": same_features(runs["whole"]["long"], runs["split"]["long"]),
        "bench_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
