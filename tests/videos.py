"""Test videos encoded with ffmpeg on demand, once per test session.

Every case the worker must handle is made here from ffmpeg's own test sources: several codecs
and containers, resolutions and durations, a rotated clip, a variable-frame-rate clip, audio
only, and the broken ones (zero bytes, truncated, text named .mp4, a header that claims a
huge resolution). ``video_library`` returns one shared library per session, so test modules
that each declare a ``videos`` fixture still encode every file once.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"


@dataclass(frozen=True)
class VideoCase:
    """A named test file and what the worker should make of it."""

    name: str
    filename: str
    # None: succeeds; else the error class name the item must fail with.
    error_class: str | None = None
    message: str = ""  # a fragment the failure message must contain
    duration_s: float = 0.0


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        [FFMPEG, "-hide_banner", "-v", "error", "-y", *args],
        check=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _x264(gop: int, preset: str = "ultrafast") -> list[str]:
    return ["-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p", "-g", str(gop)]


def _testsrc(size: str, rate: int, seconds: float, source: str = "testsrc2") -> list[str]:
    return ["-f", "lavfi", "-i", f"{source}=size={size}:rate={rate}:duration={seconds}"]


# -- encoders: one function per case, each writing ``path`` -----------------------------------
def _h264(path: Path) -> None:
    _ffmpeg(*_testsrc("320x240", 25, 4), *_x264(25), "-movflags", "+faststart", str(path))


def _h264_audio(path: Path) -> None:
    _ffmpeg(
        *_testsrc("320x240", 30, 3),
        "-f", "lavfi", "-i", "sine=frequency=440:duration=3",
        *_x264(30), "-c:a", "aac", "-shortest", str(path),
    )  # fmt: skip


def _hevc(path: Path) -> None:
    _ffmpeg(
        *_testsrc("256x144", 24, 3),
        "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:keyint=24",
        "-pix_fmt", "yuv420p", "-tag:v", "hvc1", str(path),
    )  # fmt: skip


def _vp9(path: Path) -> None:
    _ffmpeg(
        *_testsrc("320x180", 25, 3),
        "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25", str(path),
    )  # fmt: skip


def _mpeg4_avi(path: Path) -> None:
    _ffmpeg(*_testsrc("176x144", 25, 3), "-c:v", "mpeg4", "-g", "25", str(path))


def _mjpeg_mkv(path: Path) -> None:
    _ffmpeg(*_testsrc("160x120", 10, 3), "-c:v", "mjpeg", "-pix_fmt", "yuvj420p", str(path))


def _hd(path: Path) -> None:
    _ffmpeg(*_testsrc("1280x720", 30, 2), *_x264(30), str(path))


def _long_gop(path: Path) -> None:
    # One keyframe for the whole clip: the keyframe path would under-sample, so full decode.
    _ffmpeg(*_testsrc("320x240", 25, 6), *_x264(250), "-sc_threshold", "0", str(path))


def _rotated(path: Path) -> None:
    # Left half red, right half blue, stored landscape, displayed rotated by 90 degrees.
    staging = path.with_suffix(".staging.mp4")
    _ffmpeg(
        "-f", "lavfi", "-i", "color=c=red:s=160x240:d=2:r=10",
        "-f", "lavfi", "-i", "color=c=blue:s=160x240:d=2:r=10",
        "-filter_complex", "[0:v][1:v]hstack", *_x264(10), str(staging),
    )  # fmt: skip
    _ffmpeg("-i", str(staging), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    staging.unlink()


def _vfr(path: Path) -> None:
    # 30 fps for two seconds, then one frame in six (5 fps): timestamps are irregular.
    _ffmpeg(
        *_testsrc("320x240", 30, 4),
        "-vf", "select='if(lt(t,2),1,not(mod(n,6)))'", "-fps_mode", "vfr",
        *_x264(30), str(path),
    )  # fmt: skip


def _vp9_opus_mkv(path: Path) -> None:
    # VP9 with Opus audio in Matroska: MP4 gets AAC instead of a copy of the Opus stream.
    _ffmpeg(
        *_testsrc("320x180", 25, 2),
        "-f", "lavfi", "-i", "sine=frequency=660:duration=2",
        "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25",
        "-c:a", "libopus", "-b:a", "64k", "-shortest", str(path),
    )  # fmt: skip


def _mpeg4_mp3_avi(path: Path) -> None:
    # MPEG-4 part 2 with MP3 audio in AVI: MP4 takes the MP3 stream as it is.
    _ffmpeg(
        *_testsrc("176x144", 25, 2),
        "-f", "lavfi", "-i", "sine=frequency=330:duration=2",
        "-c:v", "mpeg4", "-g", "25", "-c:a", "libmp3lame", "-b:a", "96k", "-shortest", str(path),
    )  # fmt: skip


def _odd_size(path: Path) -> None:
    # 175x143 (VP9 takes odd sides): yuv420p needs even ones, so the transform pads by one.
    _ffmpeg(
        *_testsrc("176x144", 25, 1), "-vf", "format=yuv444p,crop=175:143:0:0,format=yuv420p",
        "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", str(path),
    )  # fmt: skip


def _one_frame(path: Path) -> None:
    # A single frame (0.04 s at 25 fps): shorter than any sampling interval.
    source = ["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"]
    _ffmpeg(*source, "-frames:v", "1", *_x264(25), str(path))


def _short_clip(path: Path) -> None:
    # 0.04 s at 50 fps: two frames, one keyframe, both before the first sampling interval ends.
    _ffmpeg(*_testsrc("320x240", 50, 0.04, "testsrc"), *_x264(50), str(path))


def _audio_only(path: Path) -> None:
    _ffmpeg(
        "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", "-f", "mp4", str(path)
    )


def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("id,video\nthis is a CSV file, not a video\n" * 20, encoding="utf-8")


def _truncated(path: Path) -> None:
    # A streaming-style MP4 (index first) cut at 40 %: the index promises frames that are gone.
    staging = path.with_suffix(".full.mp4")
    _ffmpeg(*_testsrc("320x240", 25, 6), *_x264(25), "-movflags", "+faststart", str(staging))
    data = staging.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.4)])
    staging.unlink()


def _truncated_index_last(path: Path) -> None:
    # A default MP4 (index at the end) cut short: the index never arrived.
    staging = path.with_suffix(".full.mp4")
    _ffmpeg(*_testsrc("320x240", 25, 4), *_x264(25), str(staging))
    data = staging.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    staging.unlink()


def _huge_resolution(path: Path) -> None:
    # A tiny raw-video MOV whose sample description is patched to claim 16000x12000 pixels.
    staging = path.with_suffix(".small.mov")
    _ffmpeg(*_testsrc("32x32", 5, 1), "-c:v", "rawvideo", "-pix_fmt", "rgb24", str(staging))
    data = bytearray(staging.read_bytes())
    stsd = data.find(b"stsd")
    # stsd: version/flags(4) count(4) | entry: size(4) format(4) reserved(6) dref(2)
    # version(2) revision(2) vendor(4) temporal(4) spatial(4) | width(2) height(2)
    width_at = stsd + 4 + 8 + 4 + 4 + 6 + 2 + 2 + 2 + 12
    data[width_at : width_at + 4] = (16000).to_bytes(2, "big") + (12000).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    staging.unlink()


def _hls_local(path: Path) -> None:
    path.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        encoding="utf-8",
    )


CASES: dict[str, VideoCase] = {
    case.name: case
    for case in (
        VideoCase("h264", "h264.mp4", duration_s=4),
        VideoCase("h264_audio", "h264_audio.mp4", duration_s=3),
        VideoCase("hevc", "hevc.mp4", duration_s=3),
        VideoCase("vp9", "vp9.webm", duration_s=3),
        VideoCase("mpeg4_avi", "mpeg4.avi", duration_s=3),
        VideoCase("mjpeg_mkv", "mjpeg.mkv", duration_s=3),
        VideoCase("hd", "hd.mp4", duration_s=2),
        VideoCase("long_gop", "long_gop.mp4", duration_s=6),
        VideoCase("rotated", "rotated.mp4", duration_s=2),
        VideoCase("vfr", "vfr.mp4", duration_s=4),
        VideoCase("one_frame", "one_frame.mp4", duration_s=0.04),
        VideoCase("short_clip", "short_clip.mp4", duration_s=0.04),
        VideoCase("audio_only", "audio_only.mp4", "NotAVideoError", "audio only"),
        VideoCase("zero_byte", "zero_byte.mp4", "NotAVideoError", "empty"),
        VideoCase("text", "text.mp4", "NotAVideoError", "text"),
        VideoCase("truncated", "truncated.mp4", "UndecodableError", "truncated"),
        VideoCase(
            "truncated_index_last", "truncated_index_last.mp4", "UndecodableError", "moov atom"
        ),
        VideoCase("huge_resolution", "huge.mov", "TooLargeError", "16000x12000"),
        VideoCase("hls_local", "playlist.mp4", "RefusedInputError", "HLS playlist"),
    )
}
ENCODERS: dict[str, Callable[[Path], None]] = {
    "h264": _h264,
    "h264_audio": _h264_audio,
    "hevc": _hevc,
    "vp9": _vp9,
    "mpeg4_avi": _mpeg4_avi,
    "mjpeg_mkv": _mjpeg_mkv,
    "hd": _hd,
    "long_gop": _long_gop,
    "rotated": _rotated,
    "vfr": _vfr,
    "one_frame": _one_frame,
    "short_clip": _short_clip,
    "audio_only": _audio_only,
    "zero_byte": _zero_byte,
    "text": _text,
    "truncated": _truncated,
    "truncated_index_last": _truncated_index_last,
    "huge_resolution": _huge_resolution,
    "hls_local": _hls_local,
}
# Cases only the transform tests use (kept out of CASES, which other suites run in full).
EXTRA_CASES: dict[str, VideoCase] = {
    case.name: case
    for case in (
        VideoCase("vp9_opus_mkv", "vp9_opus.mkv", duration_s=2),
        VideoCase("mpeg4_mp3_avi", "mpeg4_mp3.avi", duration_s=2),
        VideoCase("odd_size", "odd_size.webm", duration_s=1),
    )
}
ENCODERS.update(
    {"vp9_opus_mkv": _vp9_opus_mkv, "mpeg4_mp3_avi": _mpeg4_mp3_avi, "odd_size": _odd_size}
)
GOOD = [name for name, case in CASES.items() if case.error_class is None]
BAD = [name for name, case in CASES.items() if case.error_class is not None]


class VideoLibrary:
    """Encodes each case the first time it is asked for; thread-safe, one per session."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        case = CASES.get(name) or EXTRA_CASES[name]
        target = self.directory / case.filename
        with self._lock:
            if not target.exists():
                ENCODERS[name](target)
        return target

    def all(self, names: list[str] | None = None) -> dict[str, Path]:
        return {name: self.path(name) for name in names or list(CASES)}


_LIBRARY: VideoLibrary | None = None


def video_library(factory: pytest.TempPathFactory) -> VideoLibrary:
    """The session's library (shared by every module's ``videos`` fixture)."""
    global _LIBRARY  # noqa: PLW0603 - one library per test session, by design
    if _LIBRARY is None:
        _LIBRARY = VideoLibrary(factory.mktemp("videos"))
    return _LIBRARY


# -- held frames: a few real frames, one of them then shown for hours ------------------------
def last_frame_held(
    path: Path,
    hold_s: float,
    *,
    seconds: float = 2.0,
    rate: int = 25,
    size: str = "160x120",
    gop: int | None = None,
) -> Path:
    """``seconds`` of real frames whose last one is then shown for ``hold_s`` seconds (the
    last slide of a recording left on screen): an MP4 of a few dozen KB that plays for hours.

    Encoded without B-frames (decode order is display order), then remuxed with the setts
    bitstream filter giving the last packet that duration, which the MP4 keeps as its last
    sample's: ffprobe reports the stream as ``seconds - 1/rate + hold_s`` long.
    """
    staging = path.with_suffix(".frames.mp4")
    last = round(seconds * rate) - 1
    _ffmpeg(*_testsrc(size, rate, seconds), *_x264(gop or rate), "-bf", "0", str(staging))
    _ffmpeg(
        "-i", str(staging), "-c", "copy",
        "-bsf:v", f"setts=duration='if(eq(N\\,{last})\\,{hold_s}/TB\\,DURATION)'", str(path),
    )  # fmt: skip
    staging.unlink()
    return path


def frame_held_midway(
    path: Path,
    hold_s: float,
    *,
    after_frame: int,
    seconds: float = 2.0,
    rate: int = 25,
    size: str = "160x120",
) -> Path:
    """``seconds`` of real frames with a gap of ``hold_s`` seconds after frame
    ``after_frame``: that frame is shown for the gap, then the video goes on (a slide
    video). The setts filter moves every later packet's pts and dts by the gap."""
    staging = path.with_suffix(".frames.mp4")
    _ffmpeg(*_testsrc(size, rate, seconds), *_x264(rate), "-bf", "0", str(staging))
    later = f"gte(N\\,{after_frame + 1})"
    _ffmpeg(
        "-i", str(staging), "-c", "copy",
        "-bsf:v",
        f"setts=pts='if({later}\\,PTS+{hold_s}/TB\\,PTS)':dts='if({later}\\,DTS+{hold_s}/TB\\,DTS)'",
        str(path),
    )  # fmt: skip
    staging.unlink()
    return path


def slideshow(path: Path, *, seconds: float = 20.0, every_s: float = 2.0) -> Path:
    """A frame every ``every_s`` seconds, each a keyframe (a slide video at its own rate)."""
    _ffmpeg(*_testsrc("160x120", 1, seconds), "-vf", f"fps=1/{every_s:g}", *_x264(1), str(path))
    return path
