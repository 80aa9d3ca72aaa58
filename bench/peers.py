"""``batchctl run`` side by side with what a user would write instead, on the same clips.

    python -m bench.peers [--sizes 24,240] [--impls ours,loop,pool,ray] [--skip-ray]
                          [--rounds 1] [--nodes N] [--json]

The same work in every implementation: real H.264 clips (640x360, 30 fps, 8 to 12 s, a
keyframe every second, made once with ffmpeg into ``.cache/peers/clips``), sampled at 1 fps to
224x224 by ffmpeg's keyframe path, MobileNetV3Small's pooled features per frame, and one
``.npz`` (``features``, ``timestamps``) per clip:

- ``ours``: ``batchctl run MANIFEST`` as a user types it (its nodes: batchctl's default for
  this machine, or ``--nodes N``; its own Azurite, the upload, the ledger, the
  report and the copy-out of the outputs included);
- ``loop``: a plain script in one process: ffmpeg, ``predict_on_batch``, ``np.savez``;
- ``pool``: the same per-clip function in a ``multiprocessing`` pool of two processes, each
  building the model once;
- ``ray``: Ray Data as its batch-inference docs write it: the clips as a dataset, frames
  decoded by a ``flat_map``, features by ``map_batches`` over a pool of model actors (one per
  core left after decoding: the decode tasks need a CPU too) whose ``__init__`` builds the
  model and whose ``__call__`` runs the compiled predict function. Ray 2.60.0 is installed for
  the benchmark alone (``pip install --target .cache/peers/ray-2.60.0``), never into the
  project's environment.

Each implementation runs as its own command, timed from its start to its exit (Python start
and imports included, as a user sees it). CPU-seconds count every process the command started,
Ray's background processes and our Azurite and workers included: this process is a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so every orphan becomes its child, it reaps them all,
and the kernel's ``RUSAGE_CHILDREN`` sums them. With ``--rounds`` > 1 the implementations
run interleaved and the medians are printed. Every implementation's rows (frames per clip) and
timestamps are checked equal to the plain loop's, and the load average is printed with every
figure (other people's work on the machine slows every implementation, not evenly).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache" / "peers"
CLIPS = CACHE / "clips"
RAY_VERSION = "2.60.0"
RAY_TARGET = CACHE / f"ray-{RAY_VERSION}"

IMPLEMENTATIONS = ("ours", "loop", "pool", "ray")
DEFAULT_SIZES = (24, 240)
FPS = 1.0
FRAME = 224
MODEL = "MobileNetV3Small"
POOL_PROCESSES = 2
# The goals: our wall time over each peer's, per manifest size (at most this).
GOALS: dict[int, dict[str, float]] = {
    24: {"loop": 1.0, "ray": 0.8},
    240: {"loop": 0.8, "ray": 0.8, "pool": 1.05},
}
PR_SET_CHILD_SUBREAPER = 36
FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
# How long processes left by a finished command may take to end by themselves (then SIGKILL).
LEFTOVER_GRACE_S = 10.0


# -- the clips ------------------------------------------------------------------------------
def clip_seconds(index: int) -> int:
    """Clip durations vary (8 to 12 s), so rows differ between clips."""
    return 8 + index % 5


def encode_clip(path: Path, index: int) -> None:
    """One real H.264 clip: ffmpeg's testsrc2, a hue of its own (distinct bytes per clip).
    Written beside its name under one of this process's own, then renamed: two benchmarks
    filling the cache at once never write into one file (seen: a clip both wrote was broken)."""
    staging = path.with_suffix(f".part-{os.getpid()}-{threading.get_ident()}.mp4")
    subprocess.run(
        [
            FFMPEG, "-hide_banner", "-v", "error", "-y", "-nostdin",
            "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=30:duration={clip_seconds(index)}",
            "-vf", f"hue=h={index * 7 % 360}",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
            "-g", "30", "-keyint_min", "30", "-sc_threshold", "0",
            "-movflags", "+faststart", str(staging),
        ],
        check=True,
        timeout=300,
    )  # fmt: skip
    staging.rename(path)


def ensure_clips(count: int) -> list[Path]:
    """``count`` clips in the cache (encoded once, two at a time)."""
    CLIPS.mkdir(parents=True, exist_ok=True)
    paths = [CLIPS / f"clip-{index:04d}.mp4" for index in range(count)]
    missing = [(index, path) for index, path in enumerate(paths) if not path.exists()]
    if missing:
        print(f"encoding {len(missing)} clips into {CLIPS}", file=sys.stderr)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda job: encode_clip(job[1], job[0]), missing))
    return paths


def write_manifest(paths: Sequence[Path]) -> Path:
    """A manifest beside the clips naming them relative to itself (a local run's videos
    live under the manifest's folder)."""
    manifest = CLIPS / f"manifest-{len(paths)}.csv"
    manifest.write_text("video\n" + "".join(f"{path.relative_to(CLIPS)}\n" for path in paths))
    return manifest


def read_manifest(manifest: Path) -> list[Path]:
    lines = manifest.read_text().splitlines()
    if not lines or lines[0].strip() != "video":
        raise ValueError(f"{manifest}: the first line must be the header 'video'")
    return [manifest.parent / line.strip() for line in lines[1:] if line.strip()]


# -- the peers' shared pieces (what a user's own script holds) -------------------------------
_PTS_TIME = re.compile(r"\bn:\s*\d+\s+pts:\s*-?\d+\s+pts_time:(-?[0-9.eE+-]+)")


def decode_frames(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Frames at 1 fps from keyframes (one a second in these clips), centre-cropped to
    224x224, and their timestamps as ffmpeg's ``showinfo`` prints them."""
    gap = f"{0.99 / FPS:.6f}"
    chain = ",".join(
        [
            f"select='isnan(prev_selected_t)+gte(t-prev_selected_t\\,{gap})'",
            "showinfo=checksum=0",
            f"scale={FRAME}:{FRAME}:force_original_aspect_ratio=increase:flags=bilinear",
            f"crop={FRAME}:{FRAME}",
            "format=rgb24",
        ]
    )
    done = subprocess.run(
        [
            FFMPEG, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info",
            "-skip_frame", "nokey", "-i", str(path), "-map", "0:v:0", "-an",
            "-vf", chain, "-fps_mode", "passthrough",
            "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1",
        ],
        capture_output=True,
        check=True,
        timeout=300,
    )  # fmt: skip
    times = np.array(
        [float(m.group(1)) for m in _PTS_TIME.finditer(done.stderr.decode(errors="replace"))],
        np.float64,
    )
    frames = np.frombuffer(done.stdout, np.uint8).reshape(-1, FRAME, FRAME, 3)
    if len(frames) != len(times):
        raise RuntimeError(f"{path}: {len(frames)} frames but {len(times)} timestamps")
    return frames, times


def build_model() -> Any:
    """MobileNetV3Small without its head, average-pooled, as ``batchctl run`` builds it."""
    import keras

    return keras.applications.MobileNetV3Small(
        include_top=False, weights=None, pooling="avg", input_shape=(FRAME, FRAME, 3)
    )


def save_features(
    out: Path, clip: Path, features: npt.NDArray[np.float32], times: npt.NDArray[np.float64]
) -> None:
    np.savez(out / f"{clip.stem}.npz", features=features.astype(np.float32), timestamps=times)


# -- the plain loop and the pool ------------------------------------------------------------
# The process's model (built once per process, by the pool's initializer in a pool).
_MODEL: dict[str, Any] = {}


def _pool_init() -> None:
    _MODEL["network"] = build_model()


def _one_clip(job: tuple[Path, Path]) -> int:
    clip, out = job
    frames, times = decode_frames(clip)
    features = np.asarray(_MODEL["network"].predict_on_batch(frames.astype(np.float32)), np.float32)
    save_features(out, clip, features, times)
    return len(times)


def run_loop(clips: Sequence[Path], out: Path) -> None:
    _pool_init()
    for clip in clips:
        _one_clip((clip, out))


def run_pool(clips: Sequence[Path], out: Path) -> None:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(POOL_PROCESSES, initializer=_pool_init) as pool:
        for _ in pool.imap_unordered(_one_clip, [(clip, out) for clip in clips]):
            pass


# -- Ray Data ------------------------------------------------------------------------------
def run_ray(clips: Sequence[Path], out: Path) -> None:
    """Ray Data as its batch-inference examples write it (see the module docstring)."""
    import ray  # type: ignore[import-not-found]  # installed for the benchmark alone

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores)

    def decode(row: dict[str, Any]) -> list[dict[str, Any]]:
        frames, times = decode_frames(Path(row["path"]))
        return [
            {"clip": row["path"], "timestamp": float(time_s), "frame": frame}
            for frame, time_s in zip(frames, times, strict=True)
        ]

    class FeatureExtractor:
        def __init__(self) -> None:
            self.model = build_model()

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            frames = np.asarray(batch["frame"], np.float32)
            return {
                "clip": batch["clip"],
                "timestamp": batch["timestamp"],
                "features": np.asarray(self.model.predict_on_batch(frames), np.float32),
            }

    dataset = ray.data.from_items([{"path": str(clip)} for clip in clips])
    features = dataset.flat_map(decode).map_batches(
        FeatureExtractor,
        batch_size=32,
        concurrency=max(1, cores - 1),  # the decode tasks need a core too
        num_cpus=1,
    )
    by_clip: dict[str, list[tuple[float, npt.NDArray[np.float32]]]] = {}
    for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
        for clip, time_s, vector in zip(
            batch["clip"], batch["timestamp"], batch["features"], strict=True
        ):
            by_clip.setdefault(str(clip), []).append((float(time_s), vector))
    for clip, rows in by_clip.items():
        rows.sort(key=lambda row: row[0])
        save_features(
            out,
            Path(clip),
            np.stack([vector for _, vector in rows]),
            np.array([time_s for time_s, _ in rows], np.float64),
        )
    ray.shutdown()


PEERS: dict[str, Callable[[Sequence[Path], Path], None]] = {
    "loop": run_loop,
    "pool": run_pool,
    "ray": run_ray,
}


def ensure_ray() -> Path:
    """Ray Data for the benchmark alone, in a folder of its own (installed once)."""
    marker = RAY_TARGET / ".complete"
    if not marker.exists():
        print(f"installing ray[data]=={RAY_VERSION} into {RAY_TARGET}", file=sys.stderr)
        subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--target", str(RAY_TARGET), f"ray[data]=={RAY_VERSION}",
            ],
            check=True,
        )  # fmt: skip
        marker.write_text(RAY_VERSION)
    return RAY_TARGET


# -- measuring a command ----------------------------------------------------------------------
@dataclass
class Measured:
    impl: str
    size: int
    round: int
    wall_s: float
    cpu_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    leftover_processes: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    began_unix: float = 0.0

    @property
    def cpu_s_per_video(self) -> float:
        return self.cpu_s / self.size


def become_subreaper() -> None:
    """Orphans of the commands we start become our children: their CPU time is then ours to
    reap (Ray's daemons, a worker whose parent exited)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def our_children() -> list[int]:
    """Live (or zombie) processes whose parent is this process."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            found.append(int(entry.name))
    return found


def reap_leftovers(grace_s: float) -> int:
    """Wait for the processes a finished command left behind (SIGKILL after ``grace_s``),
    reaping each so its CPU time is counted. Returns how many there were."""
    leftovers = set(our_children())
    deadline = time.monotonic() + grace_s
    while leftovers:
        for pid in list(leftovers):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                leftovers.discard(pid)
        if time.monotonic() > deadline:
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        leftovers |= set(our_children())
        time.sleep(0.05)
    return len(leftovers)


def measure(
    command: Sequence[str],
    env: dict[str, str],
    log: Path,
    *,
    leftover_grace_s: float = LEFTOVER_GRACE_S,
) -> tuple[float, float, int]:
    """Wall seconds to the command's exit, CPU seconds of everything it started, and how
    many of its processes outlived it (given ``leftover_grace_s`` to end, then killed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
        code = process.wait()
    wall = time.perf_counter() - started
    left = len(set(our_children()))
    reap_leftovers(leftover_grace_s)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{tail}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, left


# -- reading what each implementation wrote ---------------------------------------------------
def peer_results(out: Path) -> dict[str, npt.NDArray[np.float64]]:
    """Timestamps per clip (by file name) of a peer's ``.npz`` files."""
    results = {}
    for path in sorted(out.glob("*.npz")):
        with np.load(path) as data:
            results[f"{path.stem}.mp4"] = np.asarray(data["timestamps"], np.float64)
            if len(data["features"]) != len(data["timestamps"]):
                raise AssertionError(f"{path}: features and timestamps differ in length")
    return results


def our_results(run_dir: Path) -> dict[str, npt.NDArray[np.float64]]:
    """Timestamps per clip of a ``batchctl run``'s copied-out outputs (through index.csv)."""
    import csv

    results = {}
    with (run_dir / "index.csv").open() as index:
        for row in csv.DictReader(index):
            if row["status"] != "succeeded":
                raise AssertionError(f"{row['source']} {row['status']} in {run_dir}")
            with np.load(run_dir / row["folder"] / "features.npz") as data:
                results[Path(row["source"]).name] = np.asarray(data["timestamps"], np.float64)
    return results


def compare(
    reference: dict[str, npt.NDArray[np.float64]], other: dict[str, npt.NDArray[np.float64]]
) -> list[str]:
    """Where ``other`` differs from ``reference``: missing clips, rows, timestamps."""
    problems = []
    for clip in sorted(set(reference) | set(other)):
        if clip not in other:
            problems.append(f"{clip}: missing")
        elif clip not in reference:
            problems.append(f"{clip}: not in the reference")
        elif len(reference[clip]) != len(other[clip]):
            problems.append(f"{clip}: {len(other[clip])} rows, expected {len(reference[clip])}")
        elif not np.allclose(reference[clip], other[clip], rtol=0, atol=1e-6):
            problems.append(f"{clip}: timestamps {other[clip]} != {reference[clip]}")
    return problems


# -- one implementation on one manifest -------------------------------------------------------
def child_env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(REPO_ROOT)]
    if impl == "ray":
        # Ray's own dependencies (the same versions as the project's where both have one)
        # after the project's path entries; Ray's workers inherit the variable.
        path.append(str(ensure_ray()))
        env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_one(
    impl: str, manifest: Path, *, size: int, round_: int, nodes: int | None, work: Path
) -> tuple[Measured, dict[str, npt.NDArray[np.float64]]]:
    out = work / f"{impl}-{size}-{round_}"
    out.mkdir()
    env = child_env(impl)
    if impl == "ours":
        run_id = f"peers-{size}-{round_}"
        command = [
            sys.executable, "-m", "batchctl", "run", str(manifest),
            *(["--nodes", str(nodes)] if nodes is not None else []),
            "--out", str(out), "--run-id", run_id, "--json",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "bench.peers", "--impl", impl,
            "--manifest", str(manifest), "--out", str(out),
        ]  # fmt: skip
    load_before = os.getloadavg()
    began = time.time()
    wall, cpu, left = measure(command, env, work / f"{impl}-{size}-{round_}.log")
    load_after = os.getloadavg()
    results = our_results(out / run_id) if impl == "ours" else peer_results(out)
    measured = Measured(
        impl=impl,
        size=size,
        round=round_,
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        load_before=load_before,
        load_after=load_after,
        leftover_processes=left,
        rows={clip: len(times) for clip, times in results.items()},
        began_unix=began,
    )
    return measured, results


def phases_of_ours(work: Path, measured: Measured) -> dict[str, float]:
    """The run's own markers (report.json) and, from the command's start and end, what
    comes before and after them: the fixed cost at a run's start and at its end."""
    run_dir = (
        work / f"ours-{measured.size}-{measured.round}" / f"peers-{measured.size}-{measured.round}"
    )
    report = json.loads((run_dir / "report.json").read_text())
    marks = {marker["name"]: float(marker["t_s"]) for marker in report.get("phases", [])}
    started = datetime.fromisoformat(report["started_at"]).timestamp()
    ended = measured.began_unix + measured.wall_s
    derived = {"command start to run start": started - measured.began_unix}
    if "first item started" in marks:
        derived["run start to first item started"] = marks["first item started"]
    if "last item finished" in marks:
        derived["last item finished to command end"] = ended - (
            started + marks["last item finished"]
        )
    return {name: round(value, 2) for name, value in (marks | derived).items()}


def summarize(
    measured: list[Measured], impls: Sequence[str], sizes: Iterable[int]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for size in sizes:
        rows = [m for m in measured if m.size == size]
        per_impl: dict[str, Any] = {}
        for impl in impls:
            mine = [m for m in rows if m.impl == impl]
            if not mine:
                continue
            per_impl[impl] = {
                "wall_s": round(statistics.median(m.wall_s for m in mine), 2),
                "cpu_s_per_video": round(statistics.median(m.cpu_s_per_video for m in mine), 3),
                "walls": [m.wall_s for m in mine],
                "load_1min": [round(m.load_before[0], 2) for m in mine],
            }
        if "ours" in per_impl:
            ours = per_impl["ours"]["wall_s"]
            for impl, figures in per_impl.items():
                figures["ours_over_this"] = round(ours / figures["wall_s"], 3)
                goal = GOALS.get(size, {}).get(impl)
                if goal is not None:
                    figures["goal_ours_over_this"] = goal
                    figures["goal_met"] = figures["ours_over_this"] <= goal
        summary[str(size)] = per_impl
    return summary


def parse_choices(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[int], list[str]]:
    """The sizes and implementations asked for (a clear error for anything else)."""
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size]
    except ValueError:
        parser.error(f"--sizes: whole numbers separated by commas, not {args.sizes!r}")
    impls = [impl for impl in args.impls.split(",") if impl]
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown or not impls:
        parser.error(f"--impls: {', '.join(unknown) or 'none'}; choose from {IMPLEMENTATIONS}")
    if args.skip_ray:
        impls = [impl for impl in impls if impl != "ray"]
    if not sizes or any(size < 1 for size in sizes) or args.rounds < 1 or not impls:
        parser.error("--sizes, --rounds and the implementations left must be at least 1")
    return sizes, impls


@dataclass
class Outcome:
    measured: list[Measured] = field(default_factory=list)
    phases: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)


def run_all(sizes: Sequence[int], impls: Sequence[str], rounds: int, nodes: int | None) -> Outcome:
    """Every implementation on every size, ``rounds`` times interleaved."""
    become_subreaper()
    clips = ensure_clips(max(sizes))
    if "ray" in impls:
        ensure_ray()
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:
        work = Path(scratch)
        for size in sizes:
            manifest = write_manifest(clips[:size])
            for round_ in range(1, rounds + 1):
                # Each round in another order: drift in the machine's other load does not
                # always fall on the same implementation.
                order = [*impls[round_ - 1 :], *impls[: round_ - 1]]
                reference: dict[str, npt.NDArray[np.float64]] | None = None
                for impl in order:
                    result, rows = run_one(
                        impl, manifest, size=size, round_=round_, nodes=nodes, work=work
                    )
                    outcome.measured.append(result)
                    print(
                        f"{size:>4} clips  {impl:<5} wall {result.wall_s:7.2f} s  "
                        f"cpu/video {result.cpu_s_per_video:6.3f} s  load "
                        f"{result.load_before[0]:.2f}->{result.load_after[0]:.2f}",
                        file=sys.stderr,
                    )
                    if impl == "ours":
                        marks = phases_of_ours(work, result)
                        outcome.phases.setdefault(str(size), []).append(marks)
                    if reference is None:
                        reference = rows
                    else:
                        outcome.mismatches += [
                            f"{size}/{impl}: {problem}" for problem in compare(reference, rows)
                        ]
    return outcome


def print_summary(summary: dict[str, Any], outcome: Outcome, rounds: int) -> None:
    for size, per_impl in summary.items():
        print(f"\n{size} clips (median of {rounds}):")
        for impl, figures in per_impl.items():
            ratio = figures.get("ours_over_this", "-")
            goal = figures.get("goal_ours_over_this")
            verdict = "" if goal is None else f"  goal <= {goal}: {figures['goal_met']}"
            print(
                f"  {impl:<5} wall {figures['wall_s']:7.2f} s  "
                f"cpu/video {figures['cpu_s_per_video']:6.3f} s  ours/this {ratio}{verdict}"
            )
        for marks in outcome.phases.get(size, []):
            print(f"  ours' phases: {marks}")
    print(f"rows and timestamps equal: {not outcome.mismatches}")
    for problem in outcome.mismatches[:20]:
        print(f"  {problem}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--skip-ray", action="store_true", help="leave Ray Data out")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="batchctl run --nodes (default: none given, batchctl's own for this machine)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    # One implementation over a manifest, as its own process (what the benchmark times).
    parser.add_argument("--impl", choices=sorted(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.impl:
        if args.manifest is None or args.out is None:
            parser.error("--impl needs --manifest and --out")
        PEERS[args.impl](read_manifest(args.manifest), args.out)
        return 0

    sizes, impls = parse_choices(parser, args)
    outcome = run_all(sizes, impls, args.rounds, args.nodes)
    summary = summarize(outcome.measured, impls, sizes)
    print_summary(summary, outcome, args.rounds)
    if args.json:
        print(
            json.dumps(
                {
                    "summary": summary,
                    "ours_phases": outcome.phases,
                    "rows_equal": not outcome.mismatches,
                    "mismatches": outcome.mismatches[:20],
                    "cores": os.cpu_count(),
                    "runs": [asdict(m) | {"rows": len(m.rows)} for m in outcome.measured],
                }
            )
        )
    return 0 if not outcome.mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
