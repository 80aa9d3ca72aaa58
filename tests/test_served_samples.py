"""A short video's keyframe samples from the probe process: exactly what ffmpeg gives, or ffmpeg.

Every video of the test corpus, and files made to be declined, is sampled by
``media.FrameReader`` twice, once as the worker does (the probe process first) and once by
ffmpeg alone, at several rates and frame sizes: the frames (byte for byte), the timestamps,
the decode warnings, or the error, must be equal; and the probe process must really have
given the samples of the files it is meant to take, so the comparison is not ffmpeg's twice.
Each reason to decline has a file or frames of its own. The faults are real: a probe process
SIGKILLed mid-request, one stuck on a FIFO past the timeout, one busy with another item, and
one that announces more bytes than it was asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

from node_image.worker import media, probeserver
from node_image.worker.errors import CancelledError
from tests.videos import (
    CASES,
    EXTRA_CASES,
    FFMPEG,
    VideoLibrary,
    frame_held_midway,
    slideshow,
    video_library,
)

LIMITS = media.MediaLimits()
# (width, height): the bench's and a model's square input, and an odd, wide one.
SIZES = ((224, 224), (97, 41))
RATES = (1.0, 2.0, 0.5)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


@pytest.fixture(scope="module")
def odd_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the corpus lacks: each one a reason to decline, or a timing that lies."""
    folder = tmp_path_factory.mktemp("served-odd")

    def ffmpeg(*args: str) -> None:
        subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)

    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "2",
           "-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-g", "10",
           str(folder / "ten_bit.mp4"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=1", "-frames:v", "1",
           str(folder / "picture.png"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "2",
           "-i", str(folder / "picture.png"), "-map", "0", "-map", "1",
           "-c:v:0", "libx264", "-c:v:1", "png", "-disposition:v:1", "attached_pic",
           "-t", "2", str(folder / "cover.mp4"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "3",
           "-c:v", "libx264", "-g", "25", "-f", "mpegts", str(folder / "clip.ts"))  # fmt: skip
    # A display orientation SEI in the H.264 stream, no matrix in the container: the frames
    # PyAV decodes show a rotation that ffmpeg does not apply.
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=160x120:d=1", "-c:v", "libx264",
           "-bsf:v", "h264_metadata=display_orientation=insert:rotate=90",
           str(folder / "sei.mp4"))  # fmt: skip
    # H.264 in AVI: decode times only, from which libavformat versions make up different pts.
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=4",
           "-c:v", "libx264", "-g", "25", str(folder / "h264.avi"))  # fmt: skip
    # An MPEG-TS from 0 whose clock jumps 15 s: ffmpeg closes the jump, PyAV does not.
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=6",
           "-c:v", "libx264", "-g", "25", "-vf", "setpts='if(gte(N,75),PTS+15/TB,PTS)'",
           "-fps_mode", "passthrough", "-muxdelay", "0", "-muxpreload", "0",
           "-f", "mpegts", str(folder / "jump.ts"))  # fmt: skip
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=3",
           "-c:v", "libx264", "-g", "25", str(folder / "upright.mp4"))  # fmt: skip
    # Display matrices PyAV reads as a rotation of 0: a mirror, and a tilt of 0.9 degrees.
    _with_matrix(folder / "upright.mp4", folder / "vflip.mp4", (65536, 0, 0, 0, -65536, 0))
    _with_matrix(folder / "upright.mp4", folder / "tilt.mp4", (65528, -1029, 0, 1029, 65528, 0))
    return {
        "h264_avi": folder / "h264.avi",
        "jump_ts": folder / "jump.ts",
        "vflip": folder / "vflip.mp4",
        "tilt": folder / "tilt.mp4",
        "ten_bit": folder / "ten_bit.mp4",
        "cover": folder / "cover.mp4",
        "mpegts": folder / "clip.ts",
        "sei_rotated": folder / "sei.mp4",
        "upright": folder / "upright.mp4",
        "held_midway": frame_held_midway(folder / "held_mid.mp4", 600.0, after_frame=10),
        "slideshow": slideshow(folder / "slides.mp4"),
    }


def _with_matrix(source: Path, target: Path, top: tuple[int, ...]) -> None:
    """``source`` with its video track's display matrix (tkhd, 16.16 fixed point) set to
    ``top`` (a, b, u, c, d, v) and the translation row (0, 0, 1)."""
    data = bytearray(source.read_bytes())
    at = data.find(b"tkhd") - 4  # the box's start; its matrix is 48 bytes in
    struct.pack_into(">9i", data, at + 48, *top, 0, 0, 1 << 30)
    target.write_bytes(bytes(data))


def _corpus(videos: VideoLibrary, odd_videos: dict[str, Path]) -> dict[str, Path]:
    return {**videos.all([*CASES, *EXTRA_CASES]), **odd_videos}


# The files the probe process samples at every rate and size; held_midway (610 s) too, at the
# small size only (at 224x224 its samples could pass MAX_SERVED_BYTES by its duration). Every
# other good file is declined (codec, rotation, start, pixel format, streams): ffmpeg's.
SERVED = {
    "h264", "h264_audio", "hevc", "vp9", "hd", "long_gop", "vfr", "one_frame",
    "short_clip", "odd_size", "slideshow", "upright",
}  # fmt: skip
SERVED_SMALL_ONLY = {"held_midway"}


def _sampled(reader: media.FrameReader) -> tuple[Any, ...]:
    """What a reader gives: frames, timestamps and warnings, or its error."""
    try:
        chunk = media.read_all(reader)
    except Exception as error:
        return (type(error).__name__, str(error))
    return ("ok", chunk.frames.tobytes(), chunk.timestamps.tolist(), reader.stats.warnings)


def _reader(
    path: Path,
    info: media.VideoInfo,
    fps: float,
    size: tuple[int, int],
    *,
    probe_process: bool,
    plan: media.SamplingPlan | None = None,
) -> media.FrameReader:
    return media.FrameReader(
        path,
        info,
        plan or media.SamplingPlan("keyframes", fps, "test"),
        width=size[0],
        height=size[1],
        limits=LIMITS,
        chunk_frames=3,  # several chunks, from either source
        probe_process=probe_process,
    )


def test_every_file_is_sampled_as_ffmpeg_samples_it(
    videos: VideoLibrary, odd_videos: dict[str, Path]
) -> None:
    """Every good file of the corpus on the keyframe path (forced, so that files sample_video
    would decode whole are compared too), every rate and size: the probe process's samples
    are ffmpeg's, or it declined and ffmpeg's are given; and it gave those of SERVED."""
    differences: list[str] = []
    served: dict[str, int] = {}
    compared = 0
    for name, path in _corpus(videos, odd_videos).items():
        try:
            info = media.probe(path, LIMITS)
        except Exception:
            continue  # refused before any decode, whichever decoder
        for fps in RATES:
            for size in SIZES:
                ours = _reader(path, info, fps, size, probe_process=True)
                mine = _sampled(ours)
                theirs = _sampled(_reader(path, info, fps, size, probe_process=False))
                compared += 1
                if mine != theirs:
                    differences.append(f"{name} at {fps} fps, {size}: {mine[:1]} != {theirs}")
                served[name] = served.get(name, 0) + ours.stats.served
    assert not differences, "\n".join(differences)
    assert compared >= 3 * 2 * 20
    combinations = len(RATES) * len(SIZES)
    assert {name for name, count in served.items() if count == combinations} == SERVED
    assert {name for name, count in served.items() if 0 < count < combinations} == (
        SERVED_SMALL_ONLY
    )


def test_the_worker_s_own_plan_samples_as_ffmpeg_does(videos: VideoLibrary) -> None:
    """Through sample_video, as the features task calls it: the plan it picks, served."""
    for name in ("h264", "vp9", "hevc"):
        info, plan, reader = media.sample_video(
            videos.path(name), fps=1.0, width=224, height=224, limits=LIMITS
        )
        assert plan.path == "keyframes", (name, plan)
        mine = _sampled(reader)
        assert reader.stats.served and reader.pid is None
        theirs = _sampled(_reader(videos.path(name), info, 1.0, (224, 224), probe_process=False))
        assert mine == theirs, name


# -- what the probe process declines, and why --------------------------------------------------
def _request(path: Path, **changes: Any) -> probeserver.SamplesRequest:
    info = media.probe(path, LIMITS)
    plan = media.SamplingPlan("keyframes", 1.0, "test")
    request = media.served_samples_request(
        path,
        dataclasses.replace(info, codec="h264", rotation=0),  # past the worker's own checks
        plan,
        width=64,
        height=64,
        limits=LIMITS,
    )
    assert request is not None
    return dataclasses.replace(request, **changes)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("mpeg4_avi", "container avi"),
        ("mjpeg_mkv", "codec mjpeg"),
        ("vp9_opus_mkv", "starts at"),
        ("mpegts", "container mpegts"),
        ("jump_ts", "container mpegts"),
        ("h264_avi", "container avi"),
        ("ten_bit", "pixel format yuv420p10le"),
        ("cover", "2 video streams"),
        ("sei_rotated", "a display matrix"),
        ("rotated", "a display matrix"),
        ("vflip", "a display matrix"),
        ("tilt", "a display matrix"),
        ("truncated", "Invalid data|libav said"),
    ],
)
def test_a_file_ffmpeg_could_sample_otherwise_is_declined(
    videos: VideoLibrary, odd_videos: dict[str, Path], name: str, reason: str
) -> None:
    path = odd_videos.get(name) or videos.path(name)
    with pytest.raises((probeserver.DeclinedError, av.error.FFmpegError), match=reason):
        probeserver.keyframe_samples(_request(path))


def test_samples_past_the_byte_cap_or_the_input_s_duration_or_the_bounds_are_declined(
    videos: VideoLibrary,
) -> None:
    path = videos.path("h264")  # 4 s, a keyframe a second
    _, pts, frames = probeserver.keyframe_samples(_request(path))
    assert len(pts) == 4 and len(frames) == 4 * 64 * 64 * 3
    with pytest.raises(probeserver.DeclinedError, match="over"):
        probeserver.keyframe_samples(_request(path, max_bytes=3 * 64 * 64 * 3))
    with pytest.raises(probeserver.DeclinedError, match="past the input's -t 2"):
        probeserver.keyframe_samples(_request(path, read_s=2.0))
    small = probeserver.FrameBounds(max_width=100, max_height=100, max_pixels=100 * 100)
    with pytest.raises(probeserver.DeclinedError, match="not admitted"):
        probeserver.keyframe_samples(_request(videos.path("hd"), bounds=small))


def _frame(width: int, height: int, pts: int) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    frame.pts = pts
    return frame


def test_a_frame_size_that_changes_mid_stream_is_declined(videos: VideoLibrary) -> None:
    """ffmpeg rebuilds its filters for it; the probe process does not imitate that."""
    request = _request(videos.path("h264"))
    graph = probeserver._SampleGraph(_frame(160, 120, 0), Fraction(1, 10), None, request)
    graph.push(_frame(160, 120, 0))
    with pytest.raises(probeserver.DeclinedError, match="change"):
        graph.push(_frame(192, 108, 10))


# -- the worker's rule (pure) ----------------------------------------------------------------------
def _info(**changes: Any) -> media.VideoInfo:
    info = media.parse_probe(
        {
            "format": {"format_name": "mov,mp4", "duration": "10.0", "start_time": "0.0"},
            "streams": [
                {"codec_type": "video", "codec_name": "h264", "width": 640, "height": 360,
                 "time_base": "1/15360", "start_time": "0.0", "duration": "10.0",
                 "r_frame_rate": "30/1", "avg_frame_rate": "30/1"},
            ],
        },
        1000,
    )  # fmt: skip
    return dataclasses.replace(info, **changes)


def test_only_a_short_upright_video_s_whole_keyframe_path_is_asked_for() -> None:
    keyframes = media.SamplingPlan("keyframes", 1.0, "test")
    path = Path("/videos/a.mp4")

    def asked(info: media.VideoInfo, plan: media.SamplingPlan = keyframes, **kw: Any) -> bool:
        kw.setdefault("width", 224)
        kw.setdefault("height", 224)
        request = media.served_samples_request(path, info, plan, limits=LIMITS, **kw)
        return request is not None

    assert asked(_info())
    assert not asked(_info(), media.SamplingPlan("full", 1.0, "test"))
    assert not asked(_info(), window=media.SampleWindow(0.0, 5.0))
    assert not asked(_info(rotation=90))
    assert not asked(_info(codec="mpeg4"))
    assert not asked(_info(duration_s=None))
    # 111 samples of 224x224 fit the cap; at 1 fps keyframes 0.99 s apart may be sampled, so
    # 108 s (at most 110 samples) is asked for, 110 s (112) is not.
    frame = 224 * 224 * 3
    assert media.MAX_SERVED_BYTES // frame == 111
    assert asked(_info(duration_s=108.0))
    assert not asked(_info(duration_s=110.0))
    assert asked(_info(duration_s=110.0), width=112, height=112)  # smaller frames, more fit


def test_the_probe_process_runs_the_filters_of_the_ffmpeg_command() -> None:
    """One fact, one place: the filters after the decoder are the ffmpeg command's own
    (less showinfo, ffmpeg's way of saying the times), so a filter added there reaches the
    probe process, or this fails."""
    info = _info()
    for fps in (1.0, 0.25, 30.0):
        plan = media.SamplingPlan("keyframes", fps, "test")
        request = media.served_samples_request(
            Path("/v/a.mp4"), info, plan, width=97, height=41, limits=LIMITS
        )
        assert request is not None
        command = media.decode_command(Path("/v/a.mp4"), plan, 97, 41, LIMITS)
        chain = re.split(r"(?<!\\),", command[command.index("-vf") + 1])
        assert chain[1] == "showinfo=checksum=0"
        ffmpeg_filters = [chain[0], *chain[2:]]
        (select_name, select_arguments), *rest = request.filters
        served_filters = [
            f"{select_name}='{select_arguments}'",
            *(f"{name}={arguments}" for name, arguments in rest),
        ]
        assert served_filters == ffmpeg_filters
        assert request.read_s == float(command[command.index("-t") + 1])
        assert request.url == command[command.index("-i") + 1]


# -- faults: each leaves ffmpeg to sample ----------------------------------------------------------
def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "never-written.mp4"
    os.mkfifo(fifo)
    return fifo


def _release(fifo: Path) -> None:
    """Let a process still opening the FIFO go on (an empty file); none may be left."""
    # ENXIO: nothing has it open for reading any more.
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_probe_process_killed_mid_samples_leaves_ffmpeg_to_sample(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    server = probeserver.ProbeServer()
    fifo = _fifo(tmp_path)
    good = _request(videos.path("h264"))
    answers: list[Any] = []
    try:
        assert server.samples(good, 30) is not None
        pid = server.pid
        assert pid is not None
        asking = threading.Thread(
            target=lambda: answers.append(server.samples(_request_for(fifo, good), 60))
        )
        asking.start()
        _wait_until_opening_a_fifo(pid)  # the request is in
        os.kill(pid, signal.SIGKILL)
        asking.join(timeout=30)
        assert answers == [None]
        again = server.samples(good, 30)
        assert again is not None and server.pid not in (None, pid)
    finally:
        _release(fifo)
        server.close()


def _wait_until_opening_a_fifo(pid: int, timeout_s: float = 30) -> None:
    """Until process ``pid`` is blocked opening a FIFO (the kernel's wait for the writer)."""
    deadline = time.monotonic() + timeout_s
    wchan = Path(f"/proc/{pid}/wchan")
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if wchan.read_text() == "wait_for_partner":
                return
        time.sleep(0.02)
    pytest.fail(f"process {pid} never blocked opening the FIFO")


def _request_for(path: Path, like: probeserver.SamplesRequest) -> probeserver.SamplesRequest:
    return dataclasses.replace(like, url=media._file_url(path))


def test_samples_past_the_timeout_kill_the_probe_process(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    server = probeserver.ProbeServer()
    fifo = _fifo(tmp_path)
    good = _request(videos.path("h264"))
    try:
        started = time.monotonic()
        assert server.samples(_request_for(fifo, good), 1.0) is None
        assert 1.0 <= time.monotonic() - started < 10
        assert server.samples(good, 30) is not None  # a fresh process
    finally:
        _release(fifo)
        server.close()


def test_a_busy_probe_process_leaves_the_samples_to_ffmpeg_at_once(
    tmp_path: Path, videos: VideoLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process, held by another item's file: the reader waits BUSY_WAIT_S, then ffmpeg
    samples, and gives what the probe process would have."""
    servers = probeserver.ProbeServers(1)
    monkeypatch.setattr(media, "PROBE_SERVERS", servers)
    fifo = _fifo(tmp_path)
    path = videos.path("h264")
    info = media.probe(path, LIMITS)
    holding = threading.Thread(
        target=servers.samples, args=(_request_for(fifo, _request(path)), 30), daemon=True
    )
    try:
        holding.start()
        time.sleep(0.5)
        started = time.monotonic()
        reader = _reader(path, info, 1.0, (64, 64), probe_process=True)
        busy = _sampled(reader)
        assert time.monotonic() - started < probeserver.BUSY_WAIT_S + 5
        assert not reader.stats.served
    finally:
        _release(fifo)
        holding.join(30)
    free = _reader(path, info, 1.0, (64, 64), probe_process=True)
    assert _sampled(free) == busy and free.stats.served
    servers.close()


def test_a_second_probe_process_answers_while_the_first_is_held(
    tmp_path: Path, videos: VideoLibrary
) -> None:
    servers = probeserver.ProbeServers(2)
    fifo = _fifo(tmp_path)
    good = _request(videos.path("h264"))
    try:
        assert servers.samples(good, 30) is not None
        assert len(servers.pids()) == 1  # the second is started only when needed
        holding = threading.Thread(
            target=servers.samples, args=(_request_for(fifo, good), 30), daemon=True
        )
        holding.start()
        time.sleep(0.5)
        # The first is held for 30 s: only the second, started now, can answer.
        started = time.monotonic()
        assert servers.samples(good, 30) is not None
        assert time.monotonic() - started < 15
        assert len(servers.pids()) == 2
    finally:
        _release(fifo)
        servers.close()


def test_probe_processes_per_worker_follow_its_cores() -> None:
    assert [probeserver.process_count(n) for n in (None, 1, 2, 3, 4, 16)] == [1, 1, 2, 3, 4, 4]


def test_a_process_that_announces_more_than_it_was_asked_is_restarted(
    monkeypatch: pytest.MonkeyPatch, videos: VideoLibrary
) -> None:
    """An answer that would make the worker read more than the request's cap is garbled,
    never read: the process is stopped and the next request starts a real one."""
    server = probeserver.ProbeServer()
    real_popen = subprocess.Popen
    liar = (
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    ask = json.loads(line)\n"
        "    print(json.dumps({'id': ask['id'], 'ok': {'time_base': '1/10', 'pts': [0]},"
        " 'bytes': 1 << 40}), flush=True)\n"
    )
    good = _request(videos.path("h264"))
    with monkeypatch.context() as patched:
        patched.setattr(
            subprocess, "Popen", lambda *a, **k: real_popen([sys.executable, "-c", liar], **k)
        )
        assert server.samples(good, 30) is None
    assert server.pid is None
    assert server.samples(good, 30) is not None
    server.close()


def test_samples_that_do_not_fill_their_frames_leave_ffmpeg_to_sample(
    monkeypatch: pytest.MonkeyPatch, videos: VideoLibrary
) -> None:
    path = videos.path("h264")
    info = media.probe(path, LIMITS)
    short = probeserver.ServedSamples(Fraction(1, 10), [0, 10], b"\0" * 100)
    monkeypatch.setattr(media.PROBE_SERVERS, "samples", lambda request, timeout_s: short)
    reader = _reader(path, info, 1.0, (64, 64), probe_process=True)
    given = _sampled(reader)
    assert not reader.stats.served and reader.pid is not None
    assert given == _sampled(_reader(path, info, 1.0, (64, 64), probe_process=False))


def test_a_cancel_stops_served_samples_as_it_stops_ffmpeg(videos: VideoLibrary) -> None:
    path = videos.path("h264")
    info = media.probe(path, LIMITS)
    reader = _reader(path, info, 1.0, (64, 64), probe_process=True)
    given: list[media.FrameChunk] = []
    with pytest.raises(CancelledError), reader:
        assert reader.stats.served
        reader.cancel()
        given.extend(reader)
    assert given == []  # no frame after the cancel, as from a killed ffmpeg


def test_a_process_that_failed_too_often_is_passed_over_for_the_next(
    videos: VideoLibrary,
) -> None:
    servers = probeserver.ProbeServers(2)
    first, second = servers.servers
    first._crashes_in_a_row = probeserver.ProbeServer.CRASHES_BEFORE_GIVING_UP
    try:
        assert first.given_up
        assert servers.samples(_request(videos.path("h264")), 30) is not None
        assert first.pid is None and second.pid is not None
    finally:
        servers.close()


def test_a_process_gives_so_many_samples_then_a_fresh_one_takes_over(
    videos: VideoLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probeserver, "SAMPLES_PER_PROCESS", 2)
    server = probeserver.ProbeServer()
    good = _request(videos.path("h264"))
    try:
        pids = []
        for _ in range(5):
            assert server.samples(good, 30) is not None
            pids.append(server.pid)
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    finally:
        server.close()


@pytest.mark.parametrize(
    "given",
    [
        {"time_base": "0/0", "pts": [0]},
        {"time_base": "1/0", "pts": [0]},
        {"time_base": "-1/10", "pts": [0]},
        {"pts": [0]},
        {"time_base": "1/10", "pts": ["x"]},
        {"time_base": "1/10", "pts": None},
    ],
)
def test_a_garbled_samples_answer_leaves_ffmpeg_to_sample(
    videos: VideoLibrary, given: dict[str, Any]
) -> None:
    request = _request(videos.path("h264"))
    assert probeserver._served(request, ({"id": 1, "ok": given}, b"")) is None
