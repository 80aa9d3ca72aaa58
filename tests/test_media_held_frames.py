"""A frame held for hours: the decoder's memory stays bounded, and both paths agree.

Real ffmpeg on real encoded files (tests/videos.py): 2 s of frames whose last one is then
shown for 3 h, or for 10 h, in an MP4 of about 70 KB. Before the hold cap, ffmpeg's ``fps``
filter pushed every repeat of the held frame through the scaler into its output queue at
once (2.3 GB of decoder memory for the 3 h hold at 1 fps, growing with duration x fps), and
the keyframe path failed the same file as "truncated video".

The decision, from the run's limits: the work a run asks for is ``fps`` samples a second
(``RunOptions.fps``, at most 60) over at most ``max_duration_s`` of video (the worker's
``MediaLimits``, 4 h by default). A 3 h hold sampled at 1 fps is 10,802 samples (2 s of
frames, then 10,800 ticks of the held one), within 4 h x 1 fps: a valid request, sampled
in full on both paths, the repeats made by the reader one chunk at a time. The 10 h hold is
over the duration limit: its container says 36,002 s, so the probe refuses it (TooLongError,
before any decode) on both paths. A container that claims less than its frames last is
refused by the sample bound instead, at the first sample past the limit (TooLongError too).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from node_image.worker import media
from node_image.worker.errors import TooLongError
from tests.videos import VideoLibrary, frame_held_midway, last_frame_held, slideshow, video_library

# Peak resident memory of the decoder (ffmpeg, and the ffprobe runs before it) for any of
# these files. Measured here: 58 MB with the hold cap; without it 2,280 MB for the 3 h
# hold at 1 fps and 4,506 MB at 2 fps (the same child, on the code before the cap).
MAX_DECODER_RSS_MB = 200
# Peak resident memory of the Python process that reads every sample (numpy and the worker
# imported, a chunk of 32 frames at 224 x 224): the repeats are never all in memory at once.
MAX_READER_RSS_MB = 300
SIZE = 224
HOLD_3H_S = 3 * 3600.0
HOLD_10H_S = 10 * 3600.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("held")
    return {
        "3h": last_frame_held(folder / "held_3h.mp4", HOLD_3H_S),
        "10h": last_frame_held(folder / "held_10h.mp4", HOLD_10H_S),
        # 40 s of frames (a keyframe a second), then 3 h: the hold is past the probe's
        # 30 s packet window, so only the read of the video's end can see it.
        "late_3h": last_frame_held(
            folder / "late_3h.mp4", HOLD_3H_S, seconds=40, rate=5, size="64x48"
        ),
        "late_none": last_frame_held(
            folder / "late_none.mp4", 0.2, seconds=40, rate=5, size="64x48"
        ),
        "midway": frame_held_midway(folder / "midway.mp4", 60.0, after_frame=24),
        "last_2m": last_frame_held(folder / "last_2m.mp4", 120.0),
        "slides": slideshow(folder / "slides.mp4"),
        "slides_5s": slideshow(folder / "slides_5s.mp4", seconds=40, every_s=5.0),
    }


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


def _packets(path: Path) -> list[dict[str, str]]:
    completed = subprocess.run(
        [media.ffprobe_binary(), "-v", "error", "-select_streams", "v:0",
         "-show_entries", "packet=pts_time,duration_time,flags", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    packets: list[dict[str, str]] = json.loads(completed.stdout)["packets"]
    return packets


@pytest.mark.parametrize(("name", "hold_s"), [("3h", HOLD_3H_S), ("10h", HOLD_10H_S)])
def test_the_held_frame_files_are_what_they_claim(
    held: dict[str, Path], name: str, hold_s: float
) -> None:
    packets = _packets(held[name])
    assert len(packets) == 50  # 2 s at 25 fps: the frames are real, and few
    assert float(packets[-1]["duration_time"]) == hold_s
    assert all(float(p["duration_time"]) == pytest.approx(0.04) for p in packets[:-1])
    info = media.probe(held[name], media.MediaLimits(max_duration_s=HOLD_10H_S + 60))
    assert info.duration_s == pytest.approx(1.96 + hold_s)
    assert held[name].stat().st_size < 100_000


# -- the decode, in a process of its own: its children's peak RSS is the decoder's ---------
_DECODE_CHILD = """
import hashlib, json, resource, sys
from pathlib import Path
import numpy as np
from node_image.worker import media

path, fps, exact, size = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
out = {"error": None, "path": None, "reason": None, "samples": 0}
times, runs, previous = [], [], None
try:
    _, plan, reader = media.sample_video(path, fps=fps, width=size, height=size,
        limits=media.MediaLimits(), exact_timestamps=exact)
    out["path"], out["reason"] = plan.path, plan.reason
    with reader:
        for chunk in reader:
            times.extend(chunk.timestamps.tolist())
            for frame in chunk.frames:  # runs of equal frames: (digest, length)
                if previous is not None and np.array_equal(frame, previous):
                    runs[-1][1] += 1
                else:
                    runs.append([hashlib.sha256(frame.tobytes()).hexdigest()[:16], 1])
                    previous = frame.copy()
    out["samples"] = len(times)
except Exception as error:
    out["error"] = f"{type(error).__name__}: {error}"
out["times"] = times
out["runs"] = runs
# The decoders' peak (ffmpeg, ffprobe); it holds at most this small process's own size at
# the fork that started them (ru_maxrss survives exec), well under the bound.
out["decoder_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
# VmHWM, not RUSAGE_SELF: Linux keeps a process's ru_maxrss across exec, so a child forked
# from a big test process would report the parent's size (seen: 895 MB in the full suite).
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
out["reader_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def _decode_in_child(path: Path, fps: float, exact: bool) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", _DECODE_CHILD, str(path), str(fps), "1" if exact else "0",
         str(SIZE)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_a_3_hour_hold_is_sampled_in_full_with_bounded_memory_on_both_paths(
    held: dict[str, Path], fps: float
) -> None:
    keyframes = _decode_in_child(held["3h"], fps, exact=False)
    exact = _decode_in_child(held["3h"], fps, exact=True)
    for outcome in (keyframes, exact):
        assert outcome["error"] is None, outcome["error"]
        assert isinstance(outcome["decoder_rss_mb"], float)
        assert outcome["decoder_rss_mb"] < MAX_DECODER_RSS_MB, outcome["decoder_rss_mb"]
        assert isinstance(outcome["reader_rss_mb"], float)
        assert outcome["reader_rss_mb"] < MAX_READER_RSS_MB, outcome["reader_rss_mb"]
        # A tick every 1/fps from 0 to the end of the hold (1.96 + 10,800 s).
        expected = int(np.ceil((1.96 + HOLD_3H_S) * fps))
        assert outcome["samples"] == expected
        times = np.asarray(outcome["times"])
        np.testing.assert_array_equal(times, np.arange(expected) / fps)
        # The held frame is the last run, over every tick from its own (1.96 s) on.
        runs = outcome["runs"]
        assert isinstance(runs, list)
        assert runs[-1][1] == expected - round(1.96 * fps)
    # The keyframe path is not taken for a held frame: both are the same decode.
    assert keyframes["path"] == exact["path"] == "full"
    assert isinstance(keyframes["reason"], str) and "held for 10800.00 s" in keyframes["reason"]
    assert keyframes["times"] == exact["times"]
    assert keyframes["runs"] == exact["runs"]


@pytest.mark.parametrize("fps", [1.0, 2.0])
def test_a_10_hour_hold_is_refused_by_the_duration_limit_on_both_paths(
    held: dict[str, Path], fps: float
) -> None:
    outcomes = [_decode_in_child(held["10h"], fps, exact=flag) for flag in (False, True)]
    for outcome in outcomes:
        assert outcome["error"] == (
            "TooLongError: video is 36002.0 s long, over the limit of 14400 s"
        )
        assert outcome["samples"] == 0
        assert isinstance(outcome["decoder_rss_mb"], float)
        assert outcome["decoder_rss_mb"] < MAX_DECODER_RSS_MB, outcome["decoder_rss_mb"]


def test_a_container_that_claims_less_than_its_frames_last_is_refused_by_the_sample_bound(
    held: dict[str, Path],
) -> None:
    # The probe's word is what a lying container says; the decode must not trust it.
    limits = media.MediaLimits(max_duration_s=600.0)
    info = media.probe(held["3h"], media.MediaLimits())
    claimed = dataclasses.replace(info, duration_s=60.0)
    plan = media.SamplingPlan("full", 2.0, "test")
    reader = media.FrameReader(held["3h"], claimed, plan, width=32, height=32, limits=limits)
    delivered = 0
    with pytest.raises(TooLongError) as caught, reader:
        for chunk in reader:
            delivered += len(chunk.frames)
    assert "limit of 600 s" in str(caught.value)
    assert "container says 60.0 s" in str(caught.value)
    assert delivered <= 600 * 2


# -- exact: cutting a hold before fps changes no frame and no time -------------------------
def _uncapped(path: Path, fps: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The full path's decode without the hold cap (fps alone): the reference."""
    info = media.probe(path, media.MediaLimits())
    plan = media.SamplingPlan("full", fps, "reference")
    command = media.decode_command(
        path, plan, size, size, media.MediaLimits(), time_base=info.time_base
    )
    cap = ",".join(media.hold_cap_filters(fps, info.time_base)) + ","
    chain = command.index("-vf") + 1
    assert cap in command[chain]
    command[chain] = command[chain].replace(cap, "")
    completed = subprocess.run(command, capture_output=True, timeout=120, check=True)
    frames = np.frombuffer(completed.stdout, np.uint8).reshape(-1, size, size, 3)
    stderr = completed.stderr.decode()
    times = [float(t) for t in re.findall(r"\bn:\s*\d+\s+pts:\s*-?\d+\s+pts_time:(\S+)", stderr)]
    return frames, np.maximum(np.asarray(times) - info.video_offset_s, 0.0)


@pytest.mark.parametrize(
    ("name", "fps"),
    [
        ("last_2m", 1.0),  # the last frame held 2 min: cut at the end of the stream
        ("midway", 2.0),  # a frame held 60 s between others: cut between two frames
        ("midway", 30000 / 1001),  # 29.97 fps on 1/12800 units: a settb of 1/75 first
        ("slides", 2.0),  # a frame every 2 s, 4 ticks each: a cut after every slide
        ("slides", 1.234),  # a rate whose tick is no whole number of the file's units
    ],
)
def test_cutting_holds_keeps_every_frame_and_time_of_the_fps_filter(
    held: dict[str, Path], name: str, fps: float
) -> None:
    path = held[name]
    _, plan, reader = media.sample_video(
        path, fps=fps, width=48, height=48, limits=media.MediaLimits(), exact_timestamps=True
    )
    assert plan.path == "full"
    got = media.read_all(reader)
    frames, times = _uncapped(path, fps, 48)
    assert len(got.frames) == len(frames) > 0
    np.testing.assert_array_equal(got.timestamps, times)
    np.testing.assert_array_equal(got.frames, frames)


def test_a_video_without_holds_is_decoded_as_before(videos: VideoLibrary) -> None:
    # No frame is held past the cap here: the filters pass every pts through unchanged.
    path = videos.path("vfr")
    _, _, reader = media.sample_video(
        path, fps=3.0, width=48, height=48, limits=media.MediaLimits(), exact_timestamps=True
    )
    got = media.read_all(reader)
    frames, times = _uncapped(path, 3.0, 48)
    np.testing.assert_array_equal(got.timestamps, times)
    np.testing.assert_array_equal(got.frames, frames)


@pytest.mark.parametrize(
    ("name", "fps", "bounds"),
    [
        ("3h", 2.0, [0.0, 3600.0, 7200.0]),  # windows that start inside the held frame
        ("slides_5s", 1.0, [0.0, 13.5, 27.5]),  # 5 s slides across the windows' starts
    ],
)
def test_windows_inside_a_hold_partition_the_whole_decode(
    held: dict[str, Path], name: str, fps: float, bounds: list[float]
) -> None:
    # A segment's decode seeks to a little (the lead) before its window, and ffmpeg's
    # accurate seek dropped every frame before that point: a frame shown across the
    # window's start since before the lead lost its ticks there (all of them in a hold).
    def decode(window: media.SampleWindow | None) -> media.FrameChunk:
        _, _, reader = media.sample_video(
            held[name], fps=fps, width=16, height=16, limits=media.MediaLimits(),
            exact_timestamps=True, window=window,
        )  # fmt: skip
        return media.read_all(reader)

    whole = decode(None)
    ends: list[float | None] = [*bounds[1:], None]
    parts = [decode(media.SampleWindow(a, b)) for a, b in zip(bounds, ends, strict=True)]
    assert all(len(part.timestamps) for part in parts)
    np.testing.assert_array_equal(
        np.concatenate([part.timestamps for part in parts]), whole.timestamps
    )
    np.testing.assert_array_equal(np.concatenate([part.frames for part in parts]), whole.frames)


# -- the keyframe path and a hold past the probe's packet window ----------------------------
def test_a_hold_past_the_probe_window_takes_the_full_path_too(held: dict[str, Path]) -> None:
    plans = {}
    results = {}
    for exact in (False, True):
        _, plans[exact], reader = media.sample_video(
            held["late_3h"], fps=1.0, width=16, height=16, limits=media.MediaLimits(),
            exact_timestamps=exact,
        )  # fmt: skip
        results[exact] = media.read_all(reader)
    assert plans[False].path == "full" and "held for 10800.00 s" in plans[False].reason
    # 40 s of frames, the last shown from 39.8 s for 3 h: a tick a second to the end.
    assert len(results[False].timestamps) == int(np.ceil(39.8 + HOLD_3H_S))
    np.testing.assert_array_equal(results[False].timestamps, results[True].timestamps)
    np.testing.assert_array_equal(results[False].frames, results[True].frames)


def test_a_long_video_without_a_hold_keeps_the_keyframe_path(held: dict[str, Path]) -> None:
    info = media.probe(held["late_none"], media.MediaLimits(), keyframe_window_s=30.0)
    plan = media.plan_sampling(
        held["late_none"], info, 1.0, exact_timestamps=False, limits=media.MediaLimits()
    )
    assert plan.path == "keyframes", plan


# -- pure pieces ---------------------------------------------------------------------------
def test_a_held_frame_makes_the_plan_full_with_its_reason() -> None:
    plan = media.choose_sampling(
        1.0, exact_timestamps=False, keyframe_interval_s=1.0, longest_frame_s=HOLD_3H_S
    )
    assert plan.path == "full" and "a frame is held for 10800.00 s" in plan.reason
    exact = media.choose_sampling(
        1.0, exact_timestamps=True, keyframe_interval_s=1.0, longest_frame_s=HOLD_3H_S
    )
    assert exact.reason == "exact timestamps requested"
    short = media.choose_sampling(
        1.0, exact_timestamps=False, keyframe_interval_s=1.0, longest_frame_s=0.04
    )
    assert short.path == "keyframes"


def test_the_stretch_after_the_last_keyframe_lasts_until_its_last_frame_ends() -> None:
    key = {"stream_index": 0, "pts_time": "1.000000", "duration_time": "0.040000", "flags": "K_"}
    held_frame = {"stream_index": 0, "pts_time": "1.960000", "duration_time": "10800.000000"}
    assert media._keyframe_interval([key, held_frame]) == pytest.approx(10800.96)
    assert media._longest_frame([key, held_frame]) == 10800.0


@pytest.mark.parametrize(
    ("fps", "time_base", "scale"),
    [
        (1.0, Fraction(1, 12800), None),  # 12,800 units a tick already
        (30000 / 1001, Fraction(1, 90000), None),  # 3,003 units a tick
        (3.0, Fraction(1, 1000), 3),  # Matroska's milliseconds: 1/3 s is no whole number
        (1.234, Fraction(1, 12800), 617),  # 617/500 fps
        (1.0, Fraction(1001, 30000), 1001),  # an AVI time base of 1001/30000
    ],
)
def test_the_hold_cap_counts_in_whole_ticks(
    fps: float, time_base: Fraction, scale: int | None
) -> None:
    filters = media.hold_cap_filters(fps, time_base)
    settb = [f for f in filters if f.startswith("settb=")]
    assert settb == ([] if scale is None else [f"settb=expr=intb/{scale}"])
    tick = 1 / (Fraction(media._rate(fps)) * time_base / (scale or 1))
    assert tick.denominator == 1, tick
    assert filters[-1].startswith("setpts='") and str(media.HOLD_CAP_TICKS) in filters[-1]
