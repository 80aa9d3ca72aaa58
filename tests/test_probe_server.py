"""The probe process (node_image/worker/probeserver.py) answers as ffprobe does, on real files.

Every video of the test corpus (codecs, containers, rotation, variable frame rate, held
frames, MPEG-TS, cover art, the broken and refused ones) is probed both ways: through the
probe process, then by ffprobe alone. The two VideoInfos, or the two errors, must be equal.
The faults are real: a probe that hangs on a FIFO is killed at the timeout, a probe process
SIGKILLed mid-request leaves ffprobe to answer, and a worker SIGKILLed leaves no probe
process behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from node_image.worker import media, probeserver
from node_image.worker.errors import DecodeTimeoutError, RefusedInputError
from tests.videos import (
    CASES,
    EXTRA_CASES,
    FFMPEG,
    GOOD,
    VideoLibrary,
    frame_held_midway,
    last_frame_held,
    slideshow,
    video_library,
)

LIMITS = media.MediaLimits()
# None: no packets read; then a sampling interval's window and ffprobe's 30 s.
WINDOWS = (None, 0.5, 2.0, media.KEYFRAME_PROBE_WINDOW_S)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


@pytest.fixture(scope="module")
def odd_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the corpus lacks that stress the probe's fields: held frames (hours-long packet
    durations), a slide show, an MPEG-TS (a start time of 1.4 s), an MP4 with cover art and
    a picture that is not a video (a format not on the whitelist)."""
    folder = tmp_path_factory.mktemp("probe-odd")

    def ffmpeg(*args: str) -> None:
        subprocess.run([FFMPEG, "-hide_banner", "-v", "error", "-y", *args], check=True)

    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "3",
           "-c:v", "libx264", "-g", "25", "-f", "mpegts", str(folder / "clip.ts"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=1", "-frames:v", "1",
           str(folder / "picture.png"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "sine=d=2", "-i", str(folder / "picture.png"),
           "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "png",
           "-disposition:v", "attached_pic", str(folder / "cover_art.m4a"))  # fmt: skip
    return {
        "held_last": last_frame_held(folder / "held_last.mp4", 3 * 3600.0),
        "held_midway": frame_held_midway(folder / "held_mid.mp4", 600.0, after_frame=10),
        "slideshow": slideshow(folder / "slides.mp4"),
        "mpegts": folder / "clip.ts",
        "cover_art": folder / "cover_art.m4a",
        "picture": folder / "picture.png",
    }


def _ask(
    server: probeserver.ProbeServer, path: Path, window_s: float | None, timeout_s: float
) -> dict[str, Any] | None:
    """``server``'s answer for ``path``, asked as media.probe asks it."""
    return server.describe(
        media._file_url(path),
        media.FORMAT_WHITELIST,
        media.PROTOCOL_WHITELIST,
        window_s,
        timeout_s,
    )


def _outcome(probe: Callable[[], media.VideoInfo]) -> tuple[str, Any]:
    try:
        return ("ok", probe())
    except Exception as error:
        return (type(error).__name__, str(error))


def _by_ffprobe(path: Path, window_s: float | None) -> media.VideoInfo:
    media.sniff(path)
    info = media.parse_probe(media.ffprobe_answer(path, LIMITS, window_s), path.stat().st_size)
    media.check_limits(info, LIMITS)
    return info


def _corpus(videos: VideoLibrary, odd_videos: dict[str, Path]) -> dict[str, Path]:
    return {**videos.all([*CASES, *EXTRA_CASES]), **odd_videos}


def test_every_corpus_file_is_judged_as_ffprobe_judges_it(
    videos: VideoLibrary, odd_videos: dict[str, Path]
) -> None:
    differences = []
    for name, path in _corpus(videos, odd_videos).items():
        for window in WINDOWS:
            ours = _outcome(lambda: media.probe(path, LIMITS, window))  # noqa: B023
            theirs = _outcome(lambda: _by_ffprobe(path, window))  # noqa: B023
            if ours != theirs:
                differences.append(f"{name} (window {window}): {ours} != {theirs}")
    assert not differences, "\n".join(differences)


# Good files whose streams start at different times: ffprobe answers them (one_start_time).
PROBED_BY_FFPROBE = {"vp9_opus_mkv"}


def test_the_probe_process_itself_answers_every_other_good_file(
    videos: VideoLibrary, odd_videos: dict[str, Path]
) -> None:
    """Not ffprobe behind its back: the comparison above is between two real answers."""
    server = probeserver.ProbeServer()
    good = {
        **videos.all([*GOOD, *EXTRA_CASES]),
        **{name: path for name, path in odd_videos.items() if name != "picture"},
    }
    try:
        unanswered = [
            name
            for name, path in good.items()
            if _ask(server, path, media.KEYFRAME_PROBE_WINDOW_S, 30) is None
        ]
    finally:
        server.close()
    assert set(unanswered) == PROBED_BY_FFPROBE


def test_only_answers_with_one_start_time_are_used() -> None:
    def answer(format_start: str | None, *stream_starts: str | None) -> dict[str, Any]:
        streams = [{"start_time": start} if start else {} for start in stream_starts]
        return {"format": {"start_time": format_start} if format_start else {}, "streams": streams}

    assert probeserver.one_start_time(answer("1.480000", "1.480000"))
    assert probeserver.one_start_time(answer("0.000000", "0.000000", "0.000000"))
    assert not probeserver.one_start_time(answer("-0.007000", "0.007000", "-0.007000"))
    assert not probeserver.one_start_time(answer("0.000000", "0.000000", "0.021000"))
    assert not probeserver.one_start_time(answer(None, None))
    assert not probeserver.one_start_time(answer("0.000000", None))


def test_a_format_off_the_whitelist_is_refused_by_the_probe_process_too(
    odd_videos: dict[str, Path],
) -> None:
    server = probeserver.ProbeServer()
    try:
        answer = _ask(server, odd_videos["picture"], None, 30)
    finally:
        server.close()
    assert answer is None
    with pytest.raises(RefusedInputError, match="not allowed"):
        media.probe(odd_videos["picture"], LIMITS)


# -- faults ---------------------------------------------------------------------------------
def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "never-written.mp4"
    os.mkfifo(fifo)
    return fifo


def test_a_probe_that_hangs_is_killed_at_the_timeout_and_the_next_file_is_probed(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    server = probeserver.ProbeServer()
    try:
        started = time.monotonic()
        with pytest.raises(probeserver.ProbeTimeoutError):
            _ask(server, _fifo(tmp_path), None, 1.0)
        assert 1.0 <= time.monotonic() - started < 10
        answer = _ask(server, videos.path("h264"), None, 30)
        assert answer is not None and answer["streams"][0]["codec_name"] == "h264"
    finally:
        server.close()


def test_media_probe_reports_the_hang_as_a_decode_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through media.probe: the worker's retryable timeout, not a fall back to ffprobe (which
    would hang as long again). The sniff is passed over: it would block on the FIFO first."""
    fifo = _fifo(tmp_path)
    monkeypatch.setattr(media, "sniff", lambda path: None)
    monkeypatch.setattr(Path, "stat", lambda self: os.stat_result((0,) * 10))
    with pytest.raises(DecodeTimeoutError, match="ran past 1 s"):
        media.probe(fifo, media.MediaLimits(probe_timeout_s=1.0))


def _server_pid(server: probeserver.ProbeServer) -> int:
    process = server._process
    assert process is not None
    return process.pid


def test_a_probe_process_killed_mid_request_leaves_ffprobe_to_answer(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    server = probeserver.ProbeServer()
    fifo = _fifo(tmp_path)
    answers: list[dict[str, Any] | None] = []
    try:
        _ask(server, videos.path("h264"), None, 30)
        pid = _server_pid(server)
        asking = threading.Thread(target=lambda: answers.append(_ask(server, fifo, None, 60)))
        asking.start()
        time.sleep(0.5)  # the request is in, blocked on the FIFO
        os.kill(pid, signal.SIGKILL)
        asking.join(timeout=30)
        assert answers == [None]  # the caller asks ffprobe
        again = _ask(server, videos.path("vp9"), None, 30)
        assert again is not None and _server_pid(server) != pid
    finally:
        server.close()


def test_a_probe_process_that_keeps_dying_is_given_up_for_ffprobe(
    monkeypatch: pytest.MonkeyPatch, videos: VideoLibrary
) -> None:
    """PyAV broken in an image: three deaths in a row, then no more starts (each would cost a
    Python start per item), and media.probe still answers through ffprobe."""
    server = probeserver.ProbeServer()
    starts = []
    real_popen = subprocess.Popen

    def dying_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        starts.append(1)
        return real_popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], **kwargs)

    with monkeypatch.context() as patched:
        # Only while the probe process starts: ffprobe itself runs through Popen too.
        patched.setattr(subprocess, "Popen", dying_popen)
        for _ in range(5):
            assert _ask(server, videos.path("h264"), None, 30) is None
    assert len(starts) == probeserver.ProbeServer.CRASHES_BEFORE_GIVING_UP
    monkeypatch.setattr(media, "PROBE_SERVER", server)
    assert media.probe(videos.path("h264"), LIMITS).codec == "h264"


def test_a_worker_killed_by_sigkill_leaves_no_probe_process(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from node_image.worker import media
        media.probe(Path({str(videos.path("h264"))!r}), media.MediaLimits())
        print(media.PROBE_SERVER._process.pid, flush=True)
        time.sleep(600)
        """
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert worker.stdout is not None
    probe_pid = int(worker.stdout.readline())
    assert _alive(probe_pid)  # alive while its worker is
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _alive(probe_pid):
            return
        time.sleep(0.05)
    pytest.fail(f"probe process {probe_pid} outlived its SIGKILLed worker")


def _alive(pid: int) -> bool:
    """Running, not a zombie: an orphan's exit is reaped by whatever adopted it, which in a
    container may be a PID 1 that never reaps."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


# -- ffprobe's formatting and reading rule (pure) -------------------------------------------
def test_rescaling_to_microseconds_rounds_as_av_rescale_q_does() -> None:
    rng = random.Random(20261206)
    for _ in range(5000):
        time_base = Fraction(rng.randint(1, 1001), rng.choice([1, 24, 25, 90000, 15360, 30000]))
        ts = rng.randint(-(10**12), 10**12)
        exact = Fraction(ts) * time_base * probeserver.AV_TIME_BASE
        # AV_ROUND_NEAR_INF: to nearest, halves away from zero.
        magnitude = abs(exact)
        expected = int(magnitude) + (1 if magnitude - int(magnitude) >= Fraction(1, 2) else 0)
        expected = -expected if exact < 0 else expected
        assert probeserver.rescale_to_microseconds(ts, time_base) == expected, (ts, time_base)


def test_times_are_printed_as_ffprobe_prints_them() -> None:
    assert probeserver.ffprobe_time(None, Fraction(1, 90000)) is None
    assert probeserver.ffprobe_time(126000, Fraction(1, 90000)) == "1.400000"
    assert probeserver.ffprobe_time(1, Fraction(1, 3)) == "0.333333"
    assert probeserver.ffprobe_duration(0, Fraction(1, 25)) is None
    assert probeserver.ffprobe_duration(1, Fraction(1, 25)) == "0.040000"
    assert probeserver.ffprobe_ratio(None) == "0/0"
    assert probeserver.ffprobe_ratio(Fraction(30000, 1001)) == "30000/1001"


def test_the_read_interval_starts_at_the_first_timed_packet_over_every_stream() -> None:
    rule = probeserver.IntervalRule(2.0, container_start_us=1_400_000)
    audio, video = Fraction(1, 48000), Fraction(1, 90000)
    assert rule.shows(None, video)  # untimed: the container's start is the interval's
    assert rule.shows(48000 * 3, audio)  # 3.0 s < 1.4 + 2 s
    assert not rule.shows(90000 * 3 + 36000, video)  # 3.4 s: the end, not shown
    fresh = probeserver.IntervalRule(2.0, container_start_us=None)
    assert fresh.shows(None, video) and fresh.shows(90000 * 10, video)
    assert fresh.shows(90000 * 11, video) and not fresh.shows(90000 * 12, video)
