"""ffmpeg sampling: every kind of input ends as frames or as a clear permanent error, safely."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from node_image.worker import media
from node_image.worker.errors import (
    CancelledError,
    DecoderInterruptedError,
    DecodeTimeoutError,
    NotAVideoError,
    RefusedInputError,
    TooLargeError,
    TooLongError,
    classify,
)
from tests.videos import BAD, CASES, GOOD, VideoLibrary, video_library

LIMITS = media.MediaLimits()


@pytest.fixture(scope="session")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


def _sample(path: Path, *, fps: float = 1.0, exact: bool = False, size: int = 64, **limits):
    info, plan, reader = media.sample_video(
        path,
        fps=fps,
        width=size,
        height=size,
        limits=media.MediaLimits(**limits),
        exact_timestamps=exact,
        chunk_frames=4,
    )
    return info, plan, reader, media.read_all(reader)


# -- every good video samples, every bad one fails with its own clear message --------------------
@pytest.mark.parametrize("name", GOOD)
def test_good_videos_give_frames_at_the_requested_rate(videos: VideoLibrary, name: str) -> None:
    case = CASES[name]
    info, plan, reader, out = _sample(videos.path(name))
    assert out.frames.dtype == np.uint8
    assert out.frames.shape[1:] == (64, 64, 3)
    # One frame per second of video (the last second may or may not have its own sample).
    assert case.duration_s - 1 <= len(out.frames) <= case.duration_s + 1, out.timestamps
    assert np.all(np.diff(out.timestamps) > 0.5)
    assert out.timestamps[0] == pytest.approx(0.0, abs=0.05)
    assert out.timestamps[-1] < case.duration_s
    assert reader.stats.frames == len(out.frames)
    assert info.duration_s == pytest.approx(case.duration_s, abs=0.2)
    assert plan.path in {"keyframes", "full"} and plan.reason
    assert out.frames.std() > 1.0, "frames are not blank"


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_fail_permanently_with_a_clear_message(videos: VideoLibrary, name: str) -> None:
    case = CASES[name]
    with pytest.raises(Exception) as caught:
        _sample(videos.path(name))
    info = classify(caught.value)
    assert info.error_class == case.error_class, info
    assert info.permanent, info
    assert case.message.lower() in info.message.lower(), info.message


def test_codecs_and_containers_are_reported(videos: VideoLibrary) -> None:
    seen = {name: _sample(videos.path(name))[0] for name in ("hevc", "vp9", "mpeg4_avi", "hd")}
    assert seen["hevc"].codec == "hevc"
    assert seen["vp9"].codec == "vp9" and "webm" in seen["vp9"].container
    assert seen["mpeg4_avi"].codec == "mpeg4" and seen["mpeg4_avi"].container == "avi"
    assert (seen["hd"].width, seen["hd"].height) == (1280, 720)


def test_keyframe_path_runs_when_keyframes_are_dense_enough(videos: VideoLibrary) -> None:
    _, plan, _, fast = _sample(videos.path("h264"))
    assert plan.path == "keyframes"
    assert plan.keyframe_interval_s == pytest.approx(1.0, abs=0.05)
    _, exact_plan, _, exact = _sample(videos.path("h264"), exact=True)
    assert exact_plan.path == "full" and "exact" in exact_plan.reason
    # Keyframes sit on whole seconds here, so both paths agree on the times.
    np.testing.assert_allclose(fast.timestamps, exact.timestamps, atol=0.05)


def test_sparse_keyframes_fall_back_to_full_decode(videos: VideoLibrary) -> None:
    _, plan, _, out = _sample(videos.path("long_gop"))
    assert plan.path == "full"
    assert "sparser" in plan.reason
    assert len(out.frames) == 6  # the requested rate, not one frame per keyframe


def test_rotation_is_applied(videos: VideoLibrary) -> None:
    info, _, _, out = _sample(videos.path("rotated"))
    assert info.rotation in (90, 270)
    assert (info.display_width, info.display_height) == (240, 320)
    frame = out.frames[0].astype(float)
    top, bottom = frame[:24].mean(axis=(0, 1)), frame[-24:].mean(axis=(0, 1))
    left, right = frame[:, :24].mean(axis=(0, 1)), frame[:, -24:].mean(axis=(0, 1))
    # Stored left red / right blue; displayed rotated, the colours are top and bottom.
    assert {int(np.argmax(top)), int(np.argmax(bottom))} == {0, 2}
    assert np.argmax(left) == np.argmax(right)


def test_variable_frame_rate_is_sampled_on_its_timestamps(videos: VideoLibrary) -> None:
    info, _, _, out = _sample(videos.path("vfr"))
    assert info.variable_frame_rate
    np.testing.assert_allclose(out.timestamps, [0.0, 1.0, 2.0, 3.0], atol=0.05)


def test_frames_come_in_chunks_of_bounded_size(videos: VideoLibrary) -> None:
    _, _, reader = media.sample_video(
        videos.path("long_gop"), fps=2, width=32, height=32, limits=LIMITS, chunk_frames=3
    )
    with reader:
        sizes = [len(chunk.frames) for chunk in reader]
    assert sizes and max(sizes) <= 3 and sum(sizes) == 12


# -- limits -------------------------------------------------------------------------------------
def test_duration_limit(videos: VideoLibrary) -> None:
    with pytest.raises(TooLongError, match=r"4\.0 s long, over the limit of 2 s"):
        _sample(videos.path("h264"), max_duration_s=2)


def test_resolution_limit(videos: VideoLibrary) -> None:
    with pytest.raises(TooLargeError, match="1280x720"):
        _sample(videos.path("hd"), max_width=1024)


def test_size_limit(videos: VideoLibrary) -> None:
    with pytest.raises(TooLargeError, match="bytes, over the limit"):
        _sample(videos.path("h264"), max_bytes=1000)


def test_decode_time_limit_is_retryable(videos: VideoLibrary) -> None:
    with pytest.raises(DecodeTimeoutError) as caught:
        _sample(videos.path("hd"), fps=30, exact=True, size=320, decode_timeout_s=0.05)
    assert not classify(caught.value).permanent


# -- playlists and scripts never make ffmpeg fetch anything -------------------------------------
class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012 - one list per server class, reset by the fixture

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        self.wfile.write(b"\x47" + b"\x00" * 187)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.hits
    finally:
        server.shutdown()
        server.server_close()


def _playlist(url: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{url}/seg0.ts\n#EXT-X-ENDLIST\n"


def test_the_http_recorder_sees_what_a_plain_ffprobe_fetches(
    tmp_path: Path, http_server: tuple[str, list[str]]
) -> None:
    # Control: without our whitelists ffprobe does fetch the segment, so a zero below means
    # the worker refused, not that the recorder is deaf.
    url, hits = http_server
    playlist = tmp_path / "playlist.m3u8"
    playlist.write_text(_playlist(url))
    subprocess.run(
        [
            media.ffprobe_binary(),
            "-v",
            "quiet",
            "-protocol_whitelist",
            "file,http,tcp",
            str(playlist),
        ],
        timeout=30,
        check=False,
    )
    assert hits


@pytest.mark.parametrize("suffix", [".m3u8", ".mp4"])
def test_hls_playlist_pointing_at_http_is_refused_and_nothing_fetched(
    tmp_path: Path, http_server: tuple[str, list[str]], suffix: str
) -> None:
    url, hits = http_server
    playlist = tmp_path / f"video{suffix}"
    playlist.write_text(_playlist(url))
    with pytest.raises(RefusedInputError, match="HLS playlist"):
        _sample(playlist)
    assert hits == []


def test_ffmpeg_itself_refuses_playlists_past_the_sniff(
    tmp_path: Path, http_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The format whitelist is the second wall: with the byte sniff disabled, ffprobe refuses
    # the hls demuxer before reading its header, and still nothing is fetched.
    url, hits = http_server
    monkeypatch.setattr(media, "sniff", lambda path: None)
    playlist = tmp_path / "video.mp4"
    playlist.write_text(_playlist(url))
    with pytest.raises(RefusedInputError, match="'hls' is not allowed"):
        _sample(playlist)
    concat = tmp_path / "concat.mp4"
    concat.write_text(f"ffconcat version 1.0\nfile '{url}/part.mp4'\nfile '/etc/passwd'\n")
    with pytest.raises(RefusedInputError, match="'concat' is not allowed"):
        _sample(concat)
    assert hits == []


def test_concat_script_naming_a_local_file_never_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The named "file" is a FIFO: opening it for reading would release the writer below.
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # blocks until someone opens the FIFO to read
        opened.set()
        os.close(fd)

    threading.Thread(target=writer, daemon=True).start()
    script = tmp_path / "clip.mp4"
    script.write_text(f"ffconcat version 1.0\nfile '{fifo}'\nfile '/etc/passwd'\n")
    with pytest.raises(RefusedInputError, match="concat script"):
        _sample(script)
    monkeypatch.setattr(media, "sniff", lambda path: None)
    with pytest.raises(RefusedInputError, match="'concat' is not allowed"):
        _sample(script)
    assert not opened.wait(0.5), "ffmpeg opened the file the script named"
    # Control: a plain ffmpeg would follow the script (and so open the FIFO).
    subprocess.run(
        [media.ffmpeg_binary(), "-v", "quiet", "-f", "concat", "-safe", "0", "-i", str(script),
         "-f", "null", "-"],
        timeout=30, check=False,
    )  # fmt: skip
    assert opened.wait(5)


def test_every_ffmpeg_command_carries_both_whitelists(tmp_path: Path) -> None:
    info = media.VideoInfo("mov", "h264", 320, 240, 0, 4.0, 25.0, 100, 0.0, 1, False, False, True)
    for plan in (
        media.SamplingPlan("keyframes", 1.0, "test", 1.0),
        media.SamplingPlan("full", 1.0, "test"),
    ):
        command = media.decode_command(tmp_path / "v", plan, 64, 64, LIMITS)
        joined = " ".join(command)
        assert f"-protocol_whitelist {media.PROTOCOL_WHITELIST}" in joined
        assert f"-format_whitelist {media.FORMAT_WHITELIST}" in joined
        assert command[command.index("-i") + 1].startswith("file:/")
        assert "pipe:1" in command and "rawvideo" in command
    assert info.display_width == 320
    for banned in ("hls", "concat", "dash", "image2", "tty", "sdp", "rtp"):
        assert banned not in media.ALLOWED_FORMATS


# -- pure policy -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fps", "exact", "interval", "expected"),
    [
        (1.0, False, 1.0, "keyframes"),
        (0.5, False, 2.0, "keyframes"),
        (0.5, False, 1.0, "keyframes"),
        (1.0, False, 2.0, "full"),
        (0.5, False, 10.0, "full"),
        (1.0, True, 1.0, "full"),
        (1.0, False, None, "full"),
        (1.0, False, 0.0, "keyframes"),  # a one-frame video
        (1.0, True, 0.0, "full"),
    ],
)
def test_choose_sampling(fps: float, exact: bool, interval: float | None, expected: str) -> None:
    plan = media.choose_sampling(fps, exact_timestamps=exact, keyframe_interval_s=interval)
    assert plan.path == expected
    assert plan.reason


def test_cover_art_is_not_a_video_stream() -> None:
    data = {
        "format": {"format_name": "mp3", "duration": "3.0"},
        "streams": [
            {"codec_type": "audio", "codec_name": "mp3"},
            {"codec_type": "video", "codec_name": "png", "width": 500, "height": 500,
             "disposition": {"attached_pic": 1}},
        ],
    }  # fmt: skip
    with pytest.raises(NotAVideoError, match="audio only"):
        media.parse_probe(data, 1000)


def test_probe_reads_rotation_from_either_source() -> None:
    base = {"codec_type": "video", "codec_name": "h264", "width": 4, "height": 2}
    side = {**base, "side_data_list": [{"rotation": -90}]}
    tag = {**base, "tags": {"rotate": "180"}}
    assert media.parse_probe({"streams": [side]}, 1).rotation == 270
    assert media.parse_probe({"streams": [tag]}, 1).rotation == 180
    assert media.parse_probe({"streams": [base]}, 1).rotation == 0


def test_ffmpeg_dies_with_a_killed_worker(videos: VideoLibrary, tmp_path: Path) -> None:
    # A worker SIGKILLed mid-decode (preemption, OOM) must not leave ffmpeg running.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from node_image.worker import media\n"
        "info, plan, reader = media.sample_video(Path(sys.argv[1]), fps=30, width=320,\n"
        "    height=320, limits=media.MediaLimits(), exact_timestamps=True)\n"
        "reader.start()\n"
        "print(reader._process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(videos.path("hd"))],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    ffmpeg_pid = int(child.stdout.readline())
    os.kill(ffmpeg_pid, 0)  # running (blocked on the pipe nobody reads)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(ffmpeg_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("ffmpeg outlived the worker that started it")


# -- videos shorter than the sampling interval ----------------------------------------------------
@pytest.mark.parametrize("name", ["one_frame", "short_clip"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("fps", [1.0, 0.1])
def test_a_video_shorter_than_the_sampling_interval_gives_its_first_frame(
    videos: VideoLibrary, name: str, exact: bool, fps: float
) -> None:
    info, plan, reader, out = _sample(videos.path(name), fps=fps, exact=exact)
    assert info.duration_s == pytest.approx(0.04, abs=0.01)
    # The keyframe fast path when allowed, the full decode (fps filter) when exact.
    assert plan.path == ("full" if exact else "keyframes"), plan
    assert len(out.frames) == 1 and reader.stats.frames == 1
    assert out.timestamps.tolist() == pytest.approx([0.0], abs=0.01)
    assert out.frames.std() > 1.0, "the frame is not blank"


def test_a_single_keyframe_is_a_measured_interval_only_when_it_is_the_only_packet() -> None:
    key = {"stream_index": 0, "pts_time": "0.000000", "flags": "K__"}
    untimed = {"stream_index": 0, "pts_time": "N/A", "flags": "___"}
    assert media._keyframe_interval([key]) == 0.0
    # Packets without times after the keyframe could be a long GOP: unknown, full decode.
    assert media._keyframe_interval([key, untimed]) is None


# -- signals: a Ctrl-C is the worker's to handle, a killed decoder is retried --------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _hd_reader(videos: VideoLibrary) -> media.FrameReader:
    # Exact timestamps at 30 fps: 60 frames of 1280x720 to decode, and with chunks of 2 the
    # pipe fills, so ffmpeg is still mid-decode when the test acts.
    _, _, reader = media.sample_video(
        videos.path("hd"), fps=30, width=64, height=64, limits=LIMITS,
        exact_timestamps=True, chunk_frames=2,
    )  # fmt: skip
    return reader


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_decoder_stopped_by_a_signal_mid_decode_is_retryable(
    videos: VideoLibrary, signum: signal.Signals
) -> None:
    reader = _hd_reader(videos)
    with pytest.raises(DecoderInterruptedError) as caught, reader:
        chunks = iter(reader)
        assert len(next(chunks).frames) == 2
        assert reader.pid is not None and _alive(reader.pid)
        os.kill(reader.pid, signum)
        for _ in chunks:
            pass
    info = classify(caught.value)
    assert info.error_class == "DecoderInterruptedError" and not info.permanent, info
    assert "not judged" in info.message


def test_the_decoder_runs_in_a_process_group_of_its_own(videos: VideoLibrary) -> None:
    with _hd_reader(videos) as reader:
        pid = reader.pid
        assert pid is not None
        assert os.getpgid(pid) != os.getpgid(os.getpid())
        assert os.getsid(pid) == pid  # its own session: no controlling terminal to hear ^C


def test_cancel_still_kills_the_decoder_and_leaves_nothing_running(videos: VideoLibrary) -> None:
    reader = _hd_reader(videos)
    pid = -1
    with pytest.raises(CancelledError), reader:
        chunks = iter(reader)
        next(chunks)
        pid = reader.pid or -1
        assert pid > 0 and _alive(pid)
        reader.cancel()
        for _ in chunks:
            pass
    assert not _alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in the decoder's group either


_CTRL_C_CHILD = """
import json, signal, sys
from pathlib import Path
from node_image.worker import media

received = []
signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
_, _, reader = media.sample_video(Path(sys.argv[1]), fps=30, width=64, height=64,
    limits=media.MediaLimits(), exact_timestamps=True, chunk_frames=2)
frames, error = 0, None
try:
    with reader:
        chunks = iter(reader)
        frames += len(next(chunks).frames)
        print(reader.pid, flush=True)
        sys.stdin.readline()  # the test has signalled our group: decode the rest
        frames += sum(len(chunk.frames) for chunk in chunks)
except Exception as caught:
    error = f"{type(caught).__name__}: {caught}"
print(json.dumps({"frames": frames, "error": error, "received": received}), flush=True)
"""


def test_ctrl_c_to_the_workers_process_group_does_not_reach_the_decoder(
    videos: VideoLibrary,
) -> None:
    # The child plays the worker, in a session of its own so that the SIGINT sent to its
    # group (what a terminal does on Ctrl-C) cannot hit pytest. It handles the signal, as the
    # worker loop does, and then finishes the decode it had started.
    expected = len(_sample(videos.path("hd"), fps=30, exact=True)[3].frames)
    repo = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_CHILD, str(videos.path("hd"))],
        cwd=repo,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        ffmpeg_pid = int(child.stdout.readline())
        worker_group = os.getpgid(child.pid)
        assert os.getpgid(ffmpeg_pid) != worker_group
        os.killpg(worker_group, signal.SIGINT)
        time.sleep(0.5)  # time for a signalled ffmpeg to act on it (it exits 255 if it was)
        assert _alive(ffmpeg_pid), "the decoder died of the worker's Ctrl-C"
        child.stdin.write("\n")
        child.stdin.flush()
        result = json.loads(child.stdout.readline())
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert result == {"frames": expected, "error": None, "received": [signal.SIGINT]}
    assert not _alive(ffmpeg_pid)


@pytest.mark.parametrize(
    ("returncode", "stderr", "expected"),
    [
        (-9, "", "killed by SIGKILL"),
        (-2, "", "killed by SIGINT"),
        (255, "[info] Exiting normally, received signal 2.", "stopped by a signal (exit 255)"),
        (255, "[info] Received > 3 system signals, hard exiting.", "stopped by a signal"),
        (255, "[error] Invalid data found when processing input", None),
        (1, "received signal", None),
        (0, "", None),
    ],
)
def test_interrupted_tells_a_signal_from_a_broken_file(
    returncode: int, stderr: str, expected: str | None
) -> None:
    reason = media.interrupted(returncode, stderr)
    assert reason == expected if expected is None else reason is not None and expected in reason
