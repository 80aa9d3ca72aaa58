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

import av
import pytest

from node_image.worker import media, probeserver
from node_image.worker.errors import DecodeTimeoutError, RefusedInputError, TooLargeError
from tests.videos import (
    CASES,
    EXTRA_CASES,
    FFMPEG,
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
    # A display orientation SEI in the H.264 stream, no matrix in the container: ffprobe
    # shows no rotation and the ffmpeg binary applies none; PyAV's decoder would show one.
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=160x120:d=1", "-c:v", "libx264",
           "-bsf:v", "h264_metadata=display_orientation=insert:rotate=90",
           str(folder / "sei.mp4"))  # fmt: skip
    return {
        "sei_rotated": folder / "sei.mp4",
        "held_last": last_frame_held(folder / "held_last.mp4", 3 * 3600.0),
        "held_midway": frame_held_midway(folder / "held_mid.mp4", 600.0, after_frame=10),
        "slideshow": slideshow(folder / "slides.mp4"),
        "mpegts": folder / "clip.ts",
        "cover_art": folder / "cover_art.m4a",
        "picture": folder / "picture.png",
    }


def _ask(
    server: probeserver.ProbeServer,
    path: Path,
    window_s: float | None,
    timeout_s: float,
    limits: media.MediaLimits = LIMITS,
) -> dict[str, Any] | None:
    """``server``'s answer for ``path``, asked as media.probe asks it."""
    return server.describe(media.probe_request(path, limits, window_s), timeout_s)


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


# Good files ffprobe answers by design: streams that start at different times
# (one_start_time), and a display rotation (from the container's matrix or an orientation SEI).
PROBED_BY_FFPROBE = {"vp9_opus_mkv", "rotated", "sei_rotated"}


def test_every_corpus_file_is_judged_as_ffprobe_judges_it(
    videos: VideoLibrary, odd_videos: dict[str, Path]
) -> None:
    """Both ways, every file and window: media.probe (the probe process first) and ffprobe
    alone give the same VideoInfo or the same error; and the probe process itself answered
    every good file but those ffprobe answers by design, so the two answers compared are
    really two (not ffprobe's twice, behind the probe process's back)."""
    differences, unanswered = [], []
    server = probeserver.ProbeServer()
    try:
        for name, path in _corpus(videos, odd_videos).items():
            for window in WINDOWS:
                ours = _outcome(lambda: media.probe(path, LIMITS, window))  # noqa: B023
                theirs = _outcome(lambda: _by_ffprobe(path, window))  # noqa: B023
                if ours != theirs:
                    differences.append(f"{name} (window {window}): {ours} != {theirs}")
                good = theirs[0] == "ok" and name not in PROBED_BY_FFPROBE
                if good and _ask(server, path, window, 30) is None:
                    unanswered.append(f"{name} (window {window})")
    finally:
        server.close()
    assert not differences, "\n".join(differences)
    assert not unanswered, unanswered


def test_the_files_ffprobe_answers_by_design_are_not_answered_here(
    videos: VideoLibrary, odd_videos: dict[str, Path]
) -> None:
    corpus = _corpus(videos, odd_videos)
    server = probeserver.ProbeServer()
    try:
        answered = [name for name in PROBED_BY_FFPROBE if _ask(server, corpus[name], 2.0, 30)]
    finally:
        server.close()
    assert answered == []


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


def _describe_here(path: Path, formats: str) -> dict[str, Any]:
    """probeserver.describe in this process (PyAV), as the probe process runs it."""
    return probeserver.describe(
        media._file_url(path), formats, media.PROTOCOL_WHITELIST, None, BOUNDS
    )


BOUNDS = media.probe_request(Path("x"), LIMITS, None).bounds


def test_the_format_whitelist_reaches_the_probe_processes_demuxer(
    odd_videos: dict[str, Path], videos: VideoLibrary
) -> None:
    """The whitelist is the boundary for untrusted files: PyAV's open must refuse a picture
    (image2/png_pipe is no allowed format), and an MP4 once mov is taken off the list."""
    # libavformat answers a format off the whitelist with EINVAL ("Format not on whitelist").
    with pytest.raises(av.error.ArgumentError):
        _describe_here(odd_videos["picture"], media.FORMAT_WHITELIST)
    h264 = videos.path("h264")
    assert _describe_here(h264, media.FORMAT_WHITELIST)["streams"][0]["codec_name"] == "h264"
    without_mov = ",".join(f for f in media.ALLOWED_FORMATS if f not in ("mov", "mp4", "m4v"))
    with pytest.raises(av.error.ArgumentError):
        _describe_here(h264, without_mov)
    with pytest.raises(RefusedInputError, match="not allowed"):
        media.probe(odd_videos["picture"], LIMITS)


def test_a_frame_over_the_limits_is_never_decoded_by_the_probe_process(
    videos: VideoLibrary,
) -> None:
    small = media.MediaLimits(max_width=100, max_height=100, max_pixels=100 * 100)
    with pytest.raises(ValueError, match="not admitted"):
        probeserver.describe(
            media._file_url(videos.path("h264")),
            media.FORMAT_WHITELIST,
            media.PROTOCOL_WHITELIST,
            None,
            media.probe_request(Path("x"), small, None).bounds,
        )
    with pytest.raises(TooLargeError, match="over the limit"):
        media.probe(videos.path("h264"), small)  # ffprobe answered; the limits refused it


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
        assert _ask(server, _fifo(tmp_path), None, 1.0) is None  # ffprobe's to judge
        assert 1.0 <= time.monotonic() - started < 10
        answer = _ask(server, videos.path("h264"), None, 30)
        assert answer is not None and answer["streams"][0]["codec_name"] == "h264"
    finally:
        server.close()


def test_media_probe_reports_the_hang_as_a_decode_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through media.probe: the probe process is killed at the timeout, ffprobe is asked and
    hangs too, and its timeout is the worker's retryable one. The sniff is passed over: it
    would block on the FIFO first."""
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
    given_up = probeserver.ProbeServers(1)
    given_up.servers = [server]
    monkeypatch.setattr(media, "PROBE_SERVERS", given_up)
    assert media.probe(videos.path("h264"), LIMITS).codec == "h264"


def test_a_file_that_holds_the_probe_process_holds_up_no_other_item(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    """One item's probe hangs (a FIFO nothing writes); another item's probe waits at most
    BUSY_WAIT_S for the probe process and is then ffprobe's."""
    server = probeserver.ProbeServer()
    fifo = _fifo(tmp_path)
    try:
        _ask(server, videos.path("h264"), None, 30)  # started
        hanging = threading.Thread(target=_ask, args=(server, fifo, None, 20), daemon=True)
        hanging.start()
        time.sleep(0.3)  # it holds the probe process
        started = time.monotonic()
        assert _ask(server, videos.path("vp9"), None, 30) is None
        assert time.monotonic() - started < probeserver.BUSY_WAIT_S + 2
        with pytest.raises(TooLargeError):  # and media.probe answers through ffprobe
            media.probe(videos.path("huge_resolution"), LIMITS)
    finally:
        with fifo.open("wb"):  # release the hanging probe: an empty file, refused
            pass
        server.close()


def test_an_answer_to_another_request_restarts_the_probe_process(
    monkeypatch: pytest.MonkeyPatch, videos: VideoLibrary
) -> None:
    """Stray output on the probe process's stdout must never pass for a file's answer."""
    server = probeserver.ProbeServer()
    real_popen = subprocess.Popen
    liar = (
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    print(json.dumps({'id': -1, 'ok': {'streams': [], 'format': {}}}), flush=True)\n"
    )
    with monkeypatch.context() as patched:
        patched.setattr(
            subprocess, "Popen", lambda *a, **k: real_popen([sys.executable, "-c", liar], **k)
        )
        assert _ask(server, videos.path("h264"), None, 30) is None
    assert server._process is None  # stopped: the next probe starts a real one
    answer = _ask(server, videos.path("h264"), None, 30)
    server.close()
    assert answer is not None and answer["streams"][0]["codec_name"] == "h264"


@pytest.mark.parametrize("stuck", [False, True])
def test_a_worker_killed_by_sigkill_leaves_no_probe_process(
    tmp_path: Path, videos: VideoLibrary, stuck: bool
) -> None:
    """Idle, the probe process sees its stdin close; stuck on a file (a FIFO nothing
    writes), it reads no stdin, and sees itself orphaned."""
    fifo = _fifo(tmp_path)
    hold = (
        f"threading.Thread(target=media.probe, args=(Path({str(fifo)!r}), "
        "media.MediaLimits(probe_timeout_s=600)), daemon=True).start(); time.sleep(1)"
        if stuck
        else ""
    )
    script = textwrap.dedent(
        f"""
        import sys, threading, time
        from pathlib import Path
        from node_image.worker import media
        media.sniff = lambda path: None  # a FIFO would block the sniff, not the probe
        media.probe(Path({str(videos.path("h264"))!r}), media.MediaLimits())
        {hold}
        print(*media.PROBE_SERVERS.pids(), flush=True)
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
    probe_pids = [int(pid) for pid in worker.stdout.readline().split()]
    assert probe_pids and all(map(_alive, probe_pids))  # alive while their worker is
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(map(_alive, probe_pids)):
            return
        time.sleep(0.05)
    pytest.fail(f"probe processes {probe_pids} outlived their SIGKILLed worker")


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
