"""ffmpeg in a subprocess: sampled frames of a local video file as numpy arrays, safely.

Safety. Every ffmpeg and ffprobe call reads one local file the worker downloaded itself, with
``-protocol_whitelist file,pipe`` (no network protocol can be opened) and a *format*
whitelist of self-contained containers. The protocol whitelist alone is not enough: an HLS
playlist or a concat script may name another local file (``/etc/passwd``) through the
allowed ``file`` protocol. With the format whitelist ffmpeg refuses such a demuxer right after
probing and before its header is read, so nothing the file names is ever opened. A short
sniff of the first bytes refuses playlists and scripts even earlier, with a clear message.

Speed. Frames come out of ffmpeg as raw ``rgb24`` through a pipe straight into numpy arrays
(no JPEG files, no re-encoding), already sampled and resized by ffmpeg's own filters. When
exact timestamps are not required and the video has a keyframe at least once per sampling
interval, only keyframes are decoded (``-skip_frame nokey``), which skips most of the decode
work; otherwise every frame is decoded and an ``fps`` filter samples them. The path that ran
is reported with its reason. Timestamps always come from ffmpeg (``showinfo``), never from
arithmetic that could disagree with the frames.

Limits. Size, duration and resolution are checked from ffprobe's answer before decoding, and
decoding is bounded in wall-clock time; a decode never reads past the duration limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import (
    CancelledError,
    DecoderInterruptedError,
    DecodeTimeoutError,
    NotAVideoError,
    RefusedInputError,
    TooLargeError,
    TooLongError,
    UndecodableError,
)

log = logging.getLogger(__name__)

# Demuxers of self-contained media files. Deliberately absent: hls, dash, concat, image2,
# tty, sdp/rtp, webm_dash_manifest and anything else that opens further files or URLs.
# Audio containers are listed so an audio-only file fails as "audio only", not "refused".
ALLOWED_FORMATS: tuple[str, ...] = (
    "mov", "mp4", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "asf", "ogg",
    "m4v", "h264", "hevc", "ivf", "mxf", "gif", "yuv4mpegpipe",
    "mp3", "wav", "aac", "flac",
)  # fmt: skip
PROTOCOL_WHITELIST = "file,pipe"
FORMAT_WHITELIST = ",".join(ALLOWED_FORMATS)

SamplingPath = Literal["keyframes", "full"]

# How far into a video ffprobe reads packet flags to measure the keyframe interval (cheap:
# packets are demuxed, never decoded).
KEYFRAME_PROBE_WINDOW_S = 30.0
# Keyframes count as "one per sampling interval" with this much slack (encoders jitter).
KEYFRAME_SLACK = 1.05
# Lines of ffmpeg's error output kept for messages.
ERROR_LINES_KEPT = 12

# Messages ffmpeg prints when a file ends before its index says it should.
_TRUNCATION_MARKERS = (
    "partial file",
    "ended prematurely",
    "truncating packet",
)
# What ffmpeg prints when a signal made it stop ("Exiting normally, received signal 2.", or
# "Received > 3 system signals, hard exiting."): it then exits 255, like a real decode error.
_SIGNAL_MARKERS = ("received signal", "system signals")
_SHOWINFO = re.compile(r"\bn:\s*\d+\s+pts:\s*(-?\d+)\s+pts_time:(-?[0-9.eE+-]+)")
# showinfo's first line: the time base its integer pts are counted in.
_TIME_BASE = re.compile(r"config in time_base:\s*(\d+)/(\d+)")
_TEXT_SNIFF_BYTES = 4096


# -- limits and probe results ---------------------------------------------------------------
@dataclass(frozen=True)
class MediaLimits:
    """Limits on untrusted media; over any of them an item fails permanently."""

    max_bytes: int = 8 * 1024**3
    max_duration_s: float = 4 * 3600.0
    max_width: int = 7680
    max_height: int = 7680
    max_pixels: int = 7680 * 4320
    decode_timeout_s: float = 900.0
    probe_timeout_s: float = 60.0


@dataclass(frozen=True)
class VideoInfo:
    """What ffprobe says about a file's first video stream (the one we sample)."""

    container: str
    codec: str
    width: int
    height: int
    rotation: int
    duration_s: float | None
    fps: float
    frames: int | None
    start_time_s: float
    size_bytes: int
    has_audio: bool
    variable_frame_rate: bool
    stream_duration_known: bool
    # Longest gap between keyframes in the first packets read (None when not measured).
    keyframe_interval_s: float | None = None
    # The first audio stream's codec (the transform copies it or re-encodes it to AAC).
    audio_codec: str | None = None
    # The first video stream's time base: the unit of its timestamps.
    time_base: Fraction | None = None
    # The container's start time (the earliest stream's): ffmpeg shifts every timestamp by
    # it, so a decode's times start at 0 there, not at the video's own start.
    container_start_s: float = 0.0

    @property
    def video_offset_s(self) -> float:
        """How long after the container's start the video stream starts: what a decode's
        times (ffmpeg's, shifted by the container's start) exceed the video's own by.

        Not ``start_time_s`` itself: an MPEG-TS file starts at 1.4 s or so, and its decode
        times already start at 0; subtracting its start again put the first seconds' samples
        at 0, twice."""
        return max(0.0, self.start_time_s - self.container_start_s)

    @property
    def display_width(self) -> int:
        """Width as displayed, after the rotation ffmpeg applies while decoding."""
        return self.height if self.rotation % 180 == 90 else self.width

    @property
    def display_height(self) -> int:
        return self.width if self.rotation % 180 == 90 else self.height

    def describe(self) -> dict[str, Any]:
        """The source as an item's metadata.json describes it (every task the same way)."""
        return {
            "duration_s": self.duration_s,
            "source_fps": round(self.fps, 4),
            "variable_frame_rate": self.variable_frame_rate,
            "width": self.width,
            "height": self.height,
            "rotation": self.rotation,
            "display_size": [self.display_width, self.display_height],
            "container": self.container,
            "codec": self.codec,
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True)
class SamplingPlan:
    """Which decode path to take for one video, and why (it goes into the item metadata)."""

    path: SamplingPath
    fps: float
    reason: str
    keyframe_interval_s: float | None = None


@dataclass(frozen=True)
class SampleWindow:
    """A time range of a video to sample on its own (one segment of a long video).

    The samples kept are exactly those the whole video's decode would give in
    ``[start_s, end_s)`` (``end_s`` None: to the end), with the same absolute timestamps,
    so the samples of consecutive windows partition the whole video's (see
    node_image/worker/segments.py). ``prev_sample_s`` is the keyframe path's state at
    ``start_s``: the time of the last keyframe the whole decode selects before it (None when
    it selects none), which :func:`keyframe_seed` computes from the packet index.
    """

    start_s: float
    end_s: float | None
    prev_sample_s: float | None = None
    # Where the decode seeks to (:func:`window_seek_s`: a keyframe at or before the frames
    # the window needs); None: the lead before ``start_s`` alone (containers with an index).
    seek_s: float | None = None

    @property
    def last(self) -> bool:
        return self.end_s is None


# A sample this close below a window's boundary belongs to the later window: absorbs the
# rounding of k / fps in doubles (a tick exactly on j * S may come out 1 ulp below it), and
# every window compares the same doubles against the same boundary, so the partition stays
# exact whichever side a sample falls.
WINDOW_EPSILON_S = 1e-6
# Decoding of a window starts this much (plus one sampling interval) before it and reads as
# far past its end: the fps filter picks, for each tick, the latest frame that rounds to it,
# so the frames around a boundary must be decoded on both sides of it.
WINDOW_LEAD_S = 1.0


# -- binaries and subprocesses --------------------------------------------------------------
def ffmpeg_binary() -> str:
    return _binary("ffmpeg")


def ffprobe_binary() -> str:
    return _binary("ffprobe")


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH: the worker needs ffmpeg and ffprobe")
    return found


def tool_versions() -> dict[str, str]:
    """First line of ``-version`` of ffmpeg and ffprobe (for ``python -m worker --check``)."""
    versions: dict[str, str] = {}
    for name, binary in (("ffmpeg", ffmpeg_binary()), ("ffprobe", ffprobe_binary())):
        completed = subprocess.run(
            [binary, "-hide_banner", "-version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        versions[name] = completed.stdout.splitlines()[0] if completed.stdout else "unknown"
    return versions


@functools.cache
def _die_with_worker() -> tuple[str, ...]:
    """A command prefix that kills the child when the worker dies (even by SIGKILL).

    ``setpriv --pdeathsig KILL`` (util-linux) sets the parent-death signal and then execs
    ffmpeg. Doing the same with ``preexec_fn`` would force a full fork of the worker, whose
    memory map (TensorFlow) makes each spawn cost ~13 ms of CPU instead of ~0.3 ms (posix
    spawn), twice per item. Without setpriv, children are still killed on every orderly
    path; only a SIGKILLed worker could leave one behind until it finishes on its own.
    """
    found = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if found is None:
        return ()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        usage = subprocess.run(
            [found, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
        if "--pdeathsig" in usage.stdout:
            return (found, "--pdeathsig", "KILL", "--")
    return ()


def guarded(command: Sequence[str]) -> list[str]:
    """``command`` wrapped so that it dies with the worker (see ``_die_with_worker``)."""
    return [*_die_with_worker(), *command]


def run_tool(command: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """Run ffprobe (or a short ffmpeg) with a timeout; stdin closed, dies with the worker.

    In a session of its own, like every decoder (see ``FrameReader.start``): a Ctrl-C at the
    worker's terminal never reaches it. ``subprocess.run`` kills it on the timeout and on
    any exception in the worker (a KeyboardInterrupt included), so none is left behind.
    """
    return subprocess.run(
        guarded(command),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout_s,
        check=False,
        start_new_session=True,
    )


def interrupted(returncode: int, stderr: str) -> str | None:
    """Why a decoder stopped because of a signal, or None when it ended on its own.

    A negative return code is a death by signal (SIGKILL, or a signal it does not handle);
    ffmpeg catches SIGINT and SIGTERM itself and exits 255, which only its message tells
    apart from a broken file. Neither says anything about the video: the item is retried.
    """
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    if returncode == 255:
        lowered = stderr.lower()
        if any(marker in lowered for marker in _SIGNAL_MARKERS):
            return "stopped by a signal (exit 255)"
    return None


# -- sniffing and probing -------------------------------------------------------------------
def sniff(path: Path) -> None:
    """Refuse empty files, playlists, scripts and text before any ffmpeg sees them."""
    size = path.stat().st_size
    if size == 0:
        raise NotAVideoError("not a video: the file is empty (0 bytes)")
    with path.open("rb") as handle:
        head = handle.read(_TEXT_SNIFF_BYTES)
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:7].upper() == b"#EXTM3U":
        raise RefusedInputError(
            "refused: the file is an HLS playlist; the worker reads only self-contained media "
            "files and never fetches what a playlist names"
        )
    if stripped[:8].lower() == b"ffconcat":
        raise RefusedInputError(
            "refused: the file is an ffmpeg concat script; the worker never opens the files "
            "or URLs a script names"
        )
    if _looks_like_text(head):
        preview = head[:40].decode("utf-8", errors="replace").splitlines()[0:1]
        raise NotAVideoError(
            f"not a video: the file is text ({size} bytes, starts with {preview[0]!r})"
            if preview
            else f"not a video: the file is text ({size} bytes)"
        )


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sniff window is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(1 for char in text if char.isprintable() or char in "\r\n\t")
    return printable >= 0.95 * max(len(text), 1)


def _input_options() -> list[str]:
    """The options every ffmpeg/ffprobe input gets: the two whitelists."""
    return ["-protocol_whitelist", PROTOCOL_WHITELIST, "-format_whitelist", FORMAT_WHITELIST]


def _file_url(path: Path) -> str:
    # "file:" makes ffmpeg read the name as a path even if it contained a colon.
    return f"file:{path.resolve()}"


def probe(path: Path, limits: MediaLimits, keyframe_window_s: float | None = None) -> VideoInfo:
    """ffprobe a local file and check it against ``limits``; raises a permanent error if bad.

    With ``keyframe_window_s`` the same ffprobe run also lists the packet flags of that many
    seconds (demuxed, never decoded) to measure the keyframe interval: one process instead
    of two, as starting ffprobe costs more than the probing itself.
    """
    sniff(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise TooLargeError(f"file is {size} bytes, over the limit of {limits.max_bytes} bytes")
    packets: list[str] = []
    if keyframe_window_s is not None:
        packets = [
            "-read_intervals", f"%+{keyframe_window_s:g}",
            "-show_entries", "packet=stream_index,pts_time,flags",
        ]  # fmt: skip
    command = [
        ffprobe_binary(), "-hide_banner", "-v", "error", *_input_options(),
        "-show_format", "-show_streams", *packets, "-of", "json", _file_url(path),
    ]  # fmt: skip
    try:
        completed = run_tool(command, limits.probe_timeout_s)
    except subprocess.TimeoutExpired as error:
        raise DecodeTimeoutError(f"ffprobe ran past {limits.probe_timeout_s:.0f} s") from error
    stderr = completed.stderr.decode("utf-8", errors="replace")
    reason = interrupted(completed.returncode, stderr)
    if reason is not None:
        raise DecoderInterruptedError(f"ffprobe was {reason}: the file was not judged")
    if completed.returncode != 0:
        raise _probe_failure(stderr)
    try:
        data = json.loads(completed.stdout or b"{}")
    except json.JSONDecodeError as error:
        raise NotAVideoError(f"not a video: ffprobe gave no readable answer ({error})") from error
    info = parse_probe(data, size)
    check_limits(info, limits)
    return info


def _probe_failure(stderr: str) -> Exception:
    lines = [
        re.sub(r" @ 0x[0-9a-f]+\]", "]", line.strip())
        for line in stderr.splitlines()
        if line.strip()
    ]
    text = " | ".join(lines[-3:]) or "no message"
    refused = re.search(r"\[([\w,]+) @ [^\]]*\] Format not on whitelist", stderr)
    if refused:
        return RefusedInputError(
            f"refused: container format '{refused.group(1)}' is not allowed (it can open other "
            f"files or URLs); allowed: {FORMAT_WHITELIST}"
        )
    if "not on whitelist" in stderr:
        return RefusedInputError(f"refused: the file asks ffmpeg to open something else: {text}")
    if "moov atom not found" in stderr:
        return UndecodableError(
            "truncated or corrupt video: the MP4 index (moov atom) is missing, as in an "
            f"upload cut short ({text})"
        )
    return NotAVideoError(f"not a video: ffprobe cannot read it ({text})")


def _ratio(text: object) -> float:
    if not isinstance(text, str) or "/" not in text:
        return _number(text) or 0.0
    numerator, _, denominator = text.partition("/")
    try:
        den = float(denominator)
        return float(numerator) / den if den else 0.0
    except ValueError:
        return 0.0


def _number(value: object) -> float | None:
    if value is None or value == "N/A":
        return None
    try:
        return float(str(value))
    except ValueError:
        return None


def _rotation(stream: dict[str, Any]) -> int:
    # Display-matrix side data (ffmpeg >= 5) or the older "rotate" tag; normalized to 0..270.
    for side in stream.get("side_data_list") or []:
        if isinstance(side, dict) and "rotation" in side:
            value = _number(side["rotation"])
            if value is not None:
                return round(value) % 360
    tag = _number((stream.get("tags") or {}).get("rotate"))
    return round(tag) % 360 if tag is not None else 0


def parse_probe(data: dict[str, Any], size_bytes: int) -> VideoInfo:
    """Turn ffprobe's JSON into a VideoInfo; raises NotAVideoError without a video stream."""
    streams = [s for s in data.get("streams") or [] if isinstance(s, dict)]
    fmt = data.get("format") or {}
    video = [
        s
        for s in streams
        if s.get("codec_type") == "video"
        # Cover art in an audio file is a one-picture "video" stream: not a video.
        and not (s.get("disposition") or {}).get("attached_pic")
    ]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not video:
        if audio:
            codec = audio[0].get("codec_name", "unknown")
            raise NotAVideoError(f"not a video: the file is audio only ({codec}, no video stream)")
        raise NotAVideoError(
            f"not a video: no video stream in the {fmt.get('format_name', 'unknown')} container"
        )
    stream = video[0]
    width = int(stream.get("width") or 0)
    height = int(stream.get("height") or 0)
    if width <= 0 or height <= 0:
        raise NotAVideoError("not a video: the video stream declares no frame size")
    stream_duration = _number(stream.get("duration"))
    duration = stream_duration if stream_duration else _number(fmt.get("duration"))
    average = _ratio(stream.get("avg_frame_rate"))
    real = _ratio(stream.get("r_frame_rate"))
    fps = average or real
    frames = stream.get("nb_frames")
    index = stream.get("index")
    packets = [
        p
        for p in data.get("packets") or []
        if isinstance(p, dict) and p.get("stream_index") == index
    ]
    return VideoInfo(
        container=str(fmt.get("format_name", "unknown")),
        codec=str(stream.get("codec_name", "unknown")),
        width=width,
        height=height,
        rotation=_rotation(stream),
        duration_s=duration if duration and duration > 0 else None,
        fps=fps,
        frames=int(frames) if isinstance(frames, str) and frames.isdigit() else None,
        start_time_s=_number(stream.get("start_time")) or _number(fmt.get("start_time")) or 0.0,
        size_bytes=size_bytes,
        has_audio=bool(audio),
        # r_frame_rate is the lowest rate that represents every timestamp; when it differs
        # from the average the stream's frame durations vary.
        variable_frame_rate=bool(average and real and abs(average - real) > 0.01 * real),
        stream_duration_known=bool(stream_duration),
        keyframe_interval_s=_keyframe_interval(packets),
        audio_codec=str(audio[0].get("codec_name", "unknown")) if audio else None,
        time_base=_time_base(stream.get("time_base")),
        container_start_s=_number(fmt.get("start_time")) or 0.0,
    )


def _time_base(text: object) -> Fraction | None:
    if not isinstance(text, str) or "/" not in text:
        return None
    numerator, _, denominator = text.partition("/")
    if not (numerator.isdigit() and denominator.isdigit()) or not int(denominator):
        return None
    return Fraction(int(numerator), int(denominator)) or None


def check_limits(info: VideoInfo, limits: MediaLimits) -> None:
    """Raise TooLargeError / TooLongError when ``info`` is over a limit."""
    if (
        info.width > limits.max_width
        or info.height > limits.max_height
        or info.width * info.height > limits.max_pixels
    ):
        raise TooLargeError(
            f"frame size {info.width}x{info.height} is over the limit "
            f"({limits.max_width}x{limits.max_height}, {limits.max_pixels} pixels)"
        )
    if info.duration_s is not None and info.duration_s > limits.max_duration_s:
        raise TooLongError(
            f"video is {info.duration_s:.1f} s long, over the limit of "
            f"{limits.max_duration_s:.0f} s"
        )


def _keyframe_interval(packets: list[dict[str, Any]]) -> float | None:
    """The longest gap between keyframes among ``packets`` (None when there are none).

    The stretch after the last keyframe counts too, so a long GOP shows even in a window
    that holds a single keyframe. A stream of one packet, a keyframe, is a one-frame video
    (a still, a 0.04 s clip): its interval is 0.0, so the keyframe path (which decodes that
    one frame) is taken rather than a full decode for nothing.
    """
    times: list[float] = []
    keys: list[float] = []
    for packet in packets:
        when = _number(packet.get("pts_time"))
        if when is None:
            continue
        times.append(when)
        if "K" in str(packet.get("flags", "")):
            keys.append(when)
    if not times or not keys:
        return None
    keys.sort()
    gaps = [later - earlier for earlier, later in itertools.pairwise(keys)]
    gaps.append(max(times) - keys[-1])
    longest = max(gaps)
    if longest > 0:
        return longest
    # All timed packets at one instant: a one-frame stream only if it was the only packet
    # (packets without a time could hide a long GOP behind it).
    return 0.0 if len(packets) == 1 else None


def choose_sampling(
    fps: float, *, exact_timestamps: bool, keyframe_interval_s: float | None
) -> SamplingPlan:
    """Pick the decode path for one video (pure: the policy, apart from any ffmpeg).

    The keyframe path decodes only keyframes, so it can give one frame per sampling interval
    only when keyframes come at least that often. When they do not (a 10 s GOP sampled every
    2 s), it would return fewer frames than asked, so every frame is decoded instead.
    Input seeking (one ``-ss`` per sample) is not used: it decodes from the keyframe before
    each sample, so it beats a full decode only when keyframes are already dense enough for
    the keyframe path, which is cheaper still.
    """
    interval = 1.0 / fps
    if exact_timestamps:
        return SamplingPlan("full", fps, "exact timestamps requested", keyframe_interval_s)
    if keyframe_interval_s is None:
        return SamplingPlan("full", fps, "keyframe interval unknown", None)
    if keyframe_interval_s == 0.0:
        return SamplingPlan("keyframes", fps, "a single frame, a keyframe", 0.0)
    if keyframe_interval_s <= interval * KEYFRAME_SLACK:
        return SamplingPlan(
            "keyframes",
            fps,
            f"a keyframe at least every {keyframe_interval_s:.2f} s (sampling every "
            f"{interval:.2f} s)",
            keyframe_interval_s,
        )
    return SamplingPlan(
        "full",
        fps,
        f"keyframes every {keyframe_interval_s:.2f} s are sparser than the sampling interval "
        f"{interval:.2f} s: decoding every frame",
        keyframe_interval_s,
    )


# -- decoding -------------------------------------------------------------------------------
@dataclass
class FrameChunk:
    """Consecutive sampled frames: ``frames`` (n, H, W, 3) uint8 and their times in seconds."""

    frames: npt.NDArray[np.uint8]
    timestamps: npt.NDArray[np.float64]
    # The same frames' pts as integers in FrameReader.time_base: exact, where pts_time is
    # printed to six significant digits only (10 ms steps past 1,000 s). The transform task
    # hands them to its encoder.
    pts: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))


@dataclass
class DecodeStats:
    """What one decode did (goes into the item metadata)."""

    path: SamplingPath
    frames: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _rate(fps: float) -> str:
    fraction = Fraction(fps).limit_denominator(1001)
    return f"{fraction.numerator}/{fraction.denominator}"


def keyframe_gap(fps: float) -> float:
    """The keyframe path's least gap between two samples: one interval, less 1 % for
    timestamp rounding (as printed into the ``select`` expression)."""
    return float(f"{0.99 / fps:.6f}")


def window_read_range(window: SampleWindow, fps: float) -> tuple[float, float | None]:
    """Where a window's decode seeks to, and how many seconds it reads (None: to the end).

    One sampling interval and :data:`WINDOW_LEAD_S` on each side: the fps filter's tick at a
    boundary takes the latest frame rounding to it, which may lie half an interval before
    it, and it needs the frame after a tick to know that tick's frame.
    """
    lead = window_lead_s(fps)
    seek = max(0.0, window.start_s - lead) if window.seek_s is None else max(0.0, window.seek_s)
    if window.end_s is None:
        return seek, None
    return seek, window.end_s + lead - seek


def window_lead_s(fps: float) -> float:
    """How far before a window its decode must begin (see :func:`window_read_range`)."""
    return 1.0 / fps + WINDOW_LEAD_S


def window_select(window: SampleWindow) -> str:
    """The ``select`` expression true for frames whose time lies in ``window`` (every
    window compares the same doubles with the same boundaries: an exact partition)."""
    return f"gte(t\\,{window.start_s - WINDOW_EPSILON_S!r})" + (
        "" if window.end_s is None else f"*lt(t\\,{window.end_s - WINDOW_EPSILON_S!r})"
    )


def select_keyframes(times: Sequence[float], gap: float) -> list[float]:
    """The keyframe path's choice, replayed: each keyframe at least ``gap`` after the last
    one chosen (the ``select`` expression's rule, on the same doubles)."""
    chosen: list[float] = []
    for when in times:
        if not chosen or when - chosen[-1] >= gap:
            chosen.append(when)
    return chosen


def keyframe_times(
    path: Path,
    until_s: float,
    limits: MediaLimits,
    *,
    start_time_s: float = 0.0,
    from_s: float = 0.0,
) -> list[float]:
    """Keyframe times (on the decode's timeline, as ``t`` in a filter) from the packet index,
    demuxed by ffprobe without decoding, from ``from_s`` (ffprobe seeks there, and may land
    earlier) to ``until_s`` plus :data:`WINDOW_LEAD_S`.

    Keyframe packets' integer pts, shifted by the container's start time as ffmpeg shifts
    them (``-start_at_zero``), times the time base: the same doubles the filter computes.
    ffprobe's read interval is on the file's own timeline, so it reaches ``start_time_s``
    (the probed start) further.
    """
    packets = keyframe_packets(path, until_s, limits, start_time_s=start_time_s, from_s=from_s)
    return sorted(pts for pts, _ in packets)


def keyframe_packets(
    path: Path,
    until_s: float,
    limits: MediaLimits,
    *,
    start_time_s: float = 0.0,
    from_s: float = 0.0,
    in_file_order: bool = False,
) -> list[tuple[float, float]]:
    """(pts, dts) of the keyframe packets :func:`keyframe_times` reads, in seconds on the
    decode's timeline (dts is the pts where a packet gives none), sorted, or as the file
    holds them."""
    until = until_s + start_time_s + WINDOW_LEAD_S
    begin = f"{from_s + start_time_s:.6f}" if from_s > 0 else ""
    command = [
        ffprobe_binary(), "-hide_banner", "-v", "error", *_input_options(),
        "-select_streams", "v:0", "-read_intervals", f"{begin}%{until:.6f}",
        "-show_entries", "format=start_time:stream=time_base:packet=pts,dts,flags",
        "-of", "json", _file_url(path),
    ]  # fmt: skip
    try:
        completed = run_tool(command, limits.probe_timeout_s)
    except subprocess.TimeoutExpired as error:
        raise DecodeTimeoutError(f"ffprobe ran past {limits.probe_timeout_s:.0f} s") from error
    stderr = completed.stderr.decode("utf-8", errors="replace")
    reason = interrupted(completed.returncode, stderr)
    if reason is not None:
        raise DecoderInterruptedError(f"ffprobe was {reason}: the file was not judged")
    if completed.returncode != 0:
        raise _probe_failure(stderr)
    data = json.loads(completed.stdout or b"{}")
    streams = data.get("streams") or [{}]
    base = _time_base(streams[0].get("time_base"))
    if base is None:
        raise UndecodableError("the video stream declares no time base: cannot seek a segment")
    start = _number((data.get("format") or {}).get("start_time")) or 0.0
    # ffmpeg's input offset: the start time in microseconds, rescaled to the stream's time
    # base with rounding to nearest (av_rescale_q).
    shift = Fraction(round(start * 1_000_000), 1_000_000) / base
    offset = int(abs(shift) + Fraction(1, 2)) * (1 if shift >= 0 else -1)  # ties away from 0
    unit = base.numerator / base.denominator
    found: list[tuple[float, float]] = []
    for packet in data.get("packets") or []:
        if not isinstance(packet, dict) or "K" not in str(packet.get("flags", "")):
            continue
        pts = str(packet.get("pts", ""))
        if not pts.lstrip("-").isdigit():
            continue
        dts = str(packet.get("dts", ""))
        decode = int(dts) if dts.lstrip("-").isdigit() else int(pts)
        found.append((float(int(pts) - offset) * unit, float(decode - offset) * unit))
    return found if in_file_order else sorted(found)


# How far before a window's needs the packet index is first read for a keyframe; each try
# that finds none looks this many times further back (a long GOP costs a few reads, and a
# video whose one keyframe is its first ends up decoded from the start: slow, but right).
SEEK_LOOKBACK_S = 4.0
SEEK_LOOKBACK_GROWTH = 4.0
# Seek this far before the keyframe: a demuxer without an index (MPEG-TS) finds the packet
# at or before a time, and the keyframe's own time may round above its packet's.
SEEK_MARGIN_S = 0.001


def seeks_by_index(container: str) -> bool:
    """Whether ffmpeg's input seek in this container lands on a keyframe by itself (the
    container has an index: MP4 and its kin, Matroska/WebM, AVI with idx1, ...)."""
    names = set(container.split(","))
    return not names & UNINDEXED_CONTAINERS


# Containers a seek lands mid-GOP in: ffmpeg finds the packet nearest a time by searching
# the stream itself (there is no index to name the keyframe before it).
UNINDEXED_CONTAINERS: frozenset[str] = frozenset({"mpegts", "mpeg", "mpegvideo"})


# A forward gap between keyframes this long is a timestamp jump, not a long GOP (ffmpeg's
# own threshold for correcting a jump in MPEG-TS is 10 s).
TIMESTAMP_JUMP_S = 60.0


def timestamps_jump(path: Path, info: VideoInfo, limits: MediaLimits) -> bool:
    """Whether the video's timestamps jump (back, or far ahead) in a container that has
    them corrected by ffmpeg on a whole decode (MPEG-TS/PS: concatenated or broadcast
    files): such a video must run whole.

    A segment's decode has to keep the file's own timestamps (``-copyts``, every window on
    one timeline), which turns that correction off: a TS of two files back to back then
    had two frames at every time, and its segments would interleave the halves. The
    check reads the keyframes of the packet index, demuxed without decoding.
    """
    if seeks_by_index(info.container):
        return False
    packets = keyframe_packets(
        path,
        limits.max_duration_s,
        limits,
        start_time_s=max(0.0, info.start_time_s),
        in_file_order=True,
    )
    times = [pts for pts, _ in packets]
    return any(
        later <= earlier or later - earlier > TIMESTAMP_JUMP_S
        for earlier, later in itertools.pairwise(times)
    )


def window_seek_s(
    path: Path,
    window: SampleWindow,
    fps: float,
    limits: MediaLimits,
    *,
    container: str,
    start_time_s: float = 0.0,
) -> float | None:
    """Where a window's decode seeks to in a container without an index: just before the
    last keyframe at or before the first frame the window needs (``start_s`` less the lead),
    0 for a window that needs the start. None for a container with an index, where the
    lead alone is right (its seek lands on the keyframe before any time by itself; seeking
    before that keyframe's own time there landed on the keyframe before it, a GOP early).

    A decoder can only start at a keyframe. In MPEG-TS or MPEG-PS a seek lands at the
    packet nearest the time, mid-GOP, and the decoder drops every frame up to the next
    keyframe: a segment of a TS with one keyframe a minute lost its first minute (all of
    it, in a test with a single keyframe). There the keyframe comes from the packet index,
    and a packet index that cannot be read costs only speed: the decode starts at 0.
    """
    if seeks_by_index(container):
        return None
    target = window.start_s - window_lead_s(fps)
    if target <= 0:
        return 0.0
    lookback = SEEK_LOOKBACK_S
    while True:
        begin = max(0.0, target - lookback)
        try:
            packets = keyframe_packets(
                path, target, limits, start_time_s=start_time_s, from_s=begin
            )
        except (NotAVideoError, UndecodableError) as error:
            log.warning("packet index of %s unreadable (%s): decoding from its start", path, error)
            return 0.0
        before = [(pts, dts) for pts, dts in packets if pts <= target + WINDOW_EPSILON_S]
        if before:
            # By its decode time: a demuxer without an index seeks by dts, and with B-frames
            # a keyframe's dts is frames before its pts (seeking to its pts landed on the
            # frame after it, and the decode began a whole GOP later).
            pts, dts = before[-1]
            return max(0.0, min(pts, dts) - SEEK_MARGIN_S)
        if begin <= 0:
            return 0.0
        lookback *= SEEK_LOOKBACK_GROWTH


def keyframe_seed(
    path: Path, fps: float, before_s: float, limits: MediaLimits, *, start_time_s: float = 0.0
) -> float | None:
    """The last keyframe time the whole video's keyframe decode selects before ``before_s``.

    The ``select`` rule carries state (the last time selected), so a window that starts
    mid-video needs it to choose the same keyframes: the whole decode's choice, replayed on
    the packet index from the start (:func:`keyframe_times`).
    """
    if before_s <= 0:
        return None
    times = keyframe_times(path, before_s, limits, start_time_s=start_time_s)
    chosen = select_keyframes(
        [when for when in times if when < before_s - WINDOW_EPSILON_S], keyframe_gap(fps)
    )
    return chosen[-1] if chosen else None


def decode_command(
    path: Path,
    plan: SamplingPlan,
    width: int,
    height: int,
    limits: MediaLimits,
    *,
    threads: int = 1,
    window: SampleWindow | None = None,
) -> list[str]:
    """The ffmpeg command line that writes sampled rgb24 frames of ``width`` x ``height``.

    ``threads`` caps ffmpeg's decoder and filter threads. The worker decodes several videos
    at once (one per item in flight), so single-threaded decoders use the cores with less
    switching than several multi-threaded ones: on 2 cores, 3 videos at once decode about
    20 % more frames per second with 1 thread each than with ffmpeg's automatic count.

    With ``window`` only that range is decoded and kept (see :class:`SampleWindow`): an
    input seek to a little before it, ``-copyts -start_at_zero`` so every timestamp is the
    one the whole decode sees (the video's own timeline from its start, not the seek
    point's), and a ``select`` on the window's boundaries right after the sampling filter.
    """
    gap = f"{keyframe_gap(plan.fps):.6f}"
    seek: list[str] = []
    read_s = limits.max_duration_s
    keep = ""
    if window is not None:
        seek_s, span_s = window_read_range(window, plan.fps)
        # No seek for a window from the start (its decode is the whole video's, up to -t).
        # Every window of an item on one timeline, the first one too: -copyts turns off
        # ffmpeg's correction of timestamp jumps (broadcast MPEG-TS), so a first window
        # decoded without it would select by other times than the windows after it.
        seek = (["-ss", f"{seek_s:.6f}"] if seek_s > 0 else []) + ["-copyts", "-start_at_zero"]
        read_s = max(0.0, read_s - seek_s) if span_s is None else min(span_s, read_s)
        keep = window_select(window)
    if plan.path == "keyframes":
        # Keep keyframes at least one interval apart (1 % slack for timestamp rounding).
        if window is None:
            sample = f"select='isnan(prev_selected_t)+gte(t-prev_selected_t\\,{gap})'"
        else:
            # The selection chain's state at the window's start comes from the packet
            # index (``prev_sample_s``): the same keyframes as the whole decode selects.
            prev = (
                "isnan(prev_selected_t)"
                if window.prev_sample_s is None
                else f"if(isnan(prev_selected_t)\\,gte(t-{window.prev_sample_s!r}\\,{gap}))"
            )
            sample = f"select='{keep}*({prev}+gte(t-prev_selected_t\\,{gap}))'"
        input_options = ["-skip_frame", "nokey"]
    else:
        # eof_action=pass: a video that ends before the next sampling point still gives the
        # frame it has there. With the default (round) a clip shorter than the interval (one
        # frame, 0.04 s) gave no frame at all, and a 3.4 s clip at 1 fps lost its frame at
        # 3 s that the keyframe path does return.
        sample = f"fps={_rate(plan.fps)}:eof_action=pass"
        if window is not None:
            sample += f",select='{keep}'"
        input_options = []
    # Fill the frame and crop the centre: keeps the aspect ratio, as CNN preprocessing does.
    chain = ",".join(
        [
            sample,
            "showinfo=checksum=0",
            f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=bilinear",
            f"crop={width}:{height}",
            "setsar=1",
            "format=rgb24",
        ]
    )
    return [
        ffmpeg_binary(), "-hide_banner", "-nostdin", "-nostats",
        "-loglevel", "repeat+level+info",
        "-filter_threads", str(threads),
        *_input_options(), *input_options, "-threads", str(threads),
        *seek, "-t", f"{read_s:g}" if window is None else f"{read_s:.6f}",
        "-i", _file_url(path),
        "-map", "0:v:0", "-an", "-sn", "-dn",
        "-vf", chain, "-fps_mode", "passthrough",
        "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip


class FrameReader:
    """Sampled frames of one video, read from an ffmpeg pipe in chunks (a context manager).

    Memory is one chunk at a time, whatever the video's length: frames are read into a
    fresh array of ``chunk_frames`` frames and handed on. ``close`` (or leaving the ``with``)
    kills ffmpeg if it is still running; ``cancel`` may be called from another thread.
    """

    def __init__(
        self,
        path: Path,
        info: VideoInfo,
        plan: SamplingPlan,
        *,
        width: int,
        height: int,
        limits: MediaLimits,
        chunk_frames: int = 32,
        threads: int = 1,
        command: Sequence[str] | None = None,
        window: SampleWindow | None = None,
    ) -> None:
        """``command`` replaces the sampling decode (the transform decodes every frame);
        ``window`` samples one range of the video only (see :class:`SampleWindow`)."""
        self.path = path
        self.info = info
        self.plan = plan
        self.window = window
        self.width = width
        self.height = height
        self.limits = limits
        self.chunk_frames = max(1, chunk_frames)
        self.stats = DecodeStats(path=plan.path)
        self._command = (
            list(command)
            if command is not None
            else decode_command(path, plan, width, height, limits, threads=threads, window=window)
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr_thread: threading.Thread | None = None
        self._timestamps: list[float] = []
        self._pts: list[int] = []
        # The time base of showinfo's integer pts (its "config in" line), once seen.
        self.time_base: Fraction | None = None
        self._errors: deque[str] = deque(maxlen=ERROR_LINES_KEPT)
        self._markers: set[str] = set()
        # ffmpeg's own words when a signal stopped it (printed at info level).
        self._signal_lines: list[str] = []
        self._condition = threading.Condition()
        self._stderr_done = False
        self._timed_out = False
        self._cancelled = False
        self._timer: threading.Timer | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> FrameReader:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The decoder's process id once started (its process group id too)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        # A session (and process group) of its own: a Ctrl-C at the terminal signals the
        # whole foreground group, and ffmpeg would die of it mid-decode, looking exactly like
        # a broken file. The worker decides how its decoders stop (``cancel``, the timeout,
        # ``close``); if the worker itself dies, the parent-death signal still kills ffmpeg.
        self._process = subprocess.Popen(
            guarded(self._command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name="ffmpeg-stderr", daemon=True
        )
        self._stderr_thread.start()
        self._timer = threading.Timer(self.limits.decode_timeout_s, self._time_out)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        """Stop decoding now (another thread may call this); iteration then ends."""
        self._cancelled = True
        self._kill()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._kill()
        process = self._process
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=10)

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            # The decoder leads its own group (``start``): kill the group, so nothing it may
            # have started is left running. poll() above means the pid is not yet reaped,
            # so the group id cannot have been reused.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    def _time_out(self) -> None:
        self._timed_out = True
        self._kill()

    # -- stderr: timestamps and errors ------------------------------------------------------
    def _read_stderr(self) -> None:
        process = self._process
        assert process is not None and process.stderr is not None
        try:
            for raw in process.stderr:
                line = raw.decode("utf-8", errors="replace").rstrip()
                match = _SHOWINFO.search(line)
                if match and "[info]" in line:
                    with self._condition:
                        self._pts.append(int(match.group(1)))
                        self._timestamps.append(float(match.group(2)))
                        self._condition.notify_all()
                    continue
                base = _TIME_BASE.search(line)
                if base and self.time_base is None and int(base.group(2)):
                    self.time_base = Fraction(int(base.group(1)), int(base.group(2)))
                    continue
                lowered = line.lower()
                if any(marker in lowered for marker in _SIGNAL_MARKERS):
                    self._signal_lines.append(re.sub(r"\s+", " ", line)[:300])
                    continue
                if "[error]" in line or "[fatal]" in line or "[warning]" in line:
                    # "[h264 @ 0x55d...]" -> "[h264]": addresses mean nothing to a reader.
                    text = re.sub(r" @ 0x[0-9a-f]+\]", "]", line)
                    self._errors.append(re.sub(r"\s+", " ", text)[:300])
                    self._markers.update(m for m in _TRUNCATION_MARKERS if m in lowered)
        finally:
            process.stderr.close()
            with self._condition:
                self._stderr_done = True
                self._condition.notify_all()

    def _timestamps_for(self, start: int, end: int) -> tuple[list[float], list[int]]:
        """Times and pts of frames [start, end): showinfo logs a frame before it reaches the
        pipe, but our stderr reader may lag behind; wait for it (or for stderr to end).
        Only the slice is copied: a transform reads every frame of a long video."""
        with self._condition:
            self._condition.wait_for(
                lambda: len(self._timestamps) >= end or self._stderr_done, timeout=30
            )
            return self._timestamps[start:end], self._pts[start:end]

    # -- frames -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[FrameChunk]:
        process = self._process
        if process is None:
            raise RuntimeError("FrameReader.start() was not called")
        assert process.stdout is not None
        frame_bytes = self.width * self.height * 3
        started = time.perf_counter()
        delivered = 0
        while True:
            chunk = np.empty((self.chunk_frames, self.height, self.width, 3), dtype=np.uint8)
            filled = _read_frames(process.stdout, chunk, frame_bytes)
            if filled:
                stamps, pts_list = self._timestamps_for(delivered, delivered + filled)
                times = np.asarray(stamps, dtype=np.float64)
                pts = np.asarray(pts_list, dtype=np.int64)
                if times.shape[0] < filled:
                    # Should not happen; pad rather than misalign features and times.
                    missing = filled - times.shape[0]
                    times = np.concatenate([times, np.full(missing, np.nan)])
                times = np.maximum(times - self.info.video_offset_s, 0.0)
                delivered += filled
                self.stats.frames = delivered
                self.stats.seconds += time.perf_counter() - started
                yield FrameChunk(chunk[:filled], times, pts)
                started = time.perf_counter()
            if filled < self.chunk_frames:
                break
        self.stats.seconds += time.perf_counter() - started
        self._finish(delivered)

    def _finish(self, delivered: int) -> None:
        process = self._process
        assert process is not None
        try:
            returncode = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        if self._timer is not None:
            self._timer.cancel()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=10)
        self.stats.warnings = list(self._errors)
        if self._cancelled:
            raise CancelledError("decoding was cancelled (the worker is shutting down)")
        if self._timed_out:
            raise DecodeTimeoutError(
                f"decoding ran past the limit of {self.limits.decode_timeout_s:.0f} s "
                f"({delivered} frames so far)"
            )
        detail = " | ".join(list(self._errors)[-3:]) or "no message"
        reason = interrupted(returncode, " ".join(self._signal_lines))
        if reason is not None:
            # Not the worker's doing (that was handled above): someone signalled ffmpeg, or
            # the kernel killed it (OOM). The video was never judged: retry it.
            raise DecoderInterruptedError(
                f"ffmpeg was {reason} after {delivered} frames: the video was not judged"
            )
        if returncode != 0:
            raise UndecodableError(f"undecodable video: ffmpeg exited with {returncode}: {detail}")
        if self._markers:
            raise UndecodableError(
                f"truncated or corrupt video ({', '.join(sorted(self._markers))}): {detail}"
            )
        if self.window is not None and not self.window.last:
            # A window may hold no sample at all (sparse keyframes), and a stream ending
            # inside it is the last window's to notice: the whole video was probed already,
            # and the assembly fails a video with no frame at all, as the whole decode does.
            return
        if delivered == 0 and self.window is None:
            raise UndecodableError(f"undecodable video: no frame could be decoded ({detail})")
        self._check_coverage()

    def _check_coverage(self) -> None:
        # A file cut short in a container without an index to betray it still ends early:
        # compare the last sampled time with the stream's duration.
        info = self.info
        if info.duration_s is None or not (info.stream_duration_known or not info.has_audio):
            return
        if not self._timestamps:
            return
        last = max(self._timestamps) - info.video_offset_s
        # On the keyframe path the last sample is the last keyframe, up to a GOP (or two, if
        # the GOP grows past the part ffprobe measured) before the end.
        gop = self.plan.keyframe_interval_s or 0.0
        step = max(1.0 / self.plan.fps, 2 * gop if self.plan.path == "keyframes" else 0.0)
        slack = max(2.0, 0.05 * info.duration_s)
        if last + step + slack < info.duration_s:
            raise UndecodableError(
                f"truncated video: frames end at {last:.1f} s of a {info.duration_s:.1f} s stream"
            )


def _read_frames(stream: Any, chunk: npt.NDArray[np.uint8], frame_bytes: int) -> int:
    """Fill ``chunk`` with whole frames from ``stream``; returns how many (0 at the end)."""
    view = chunk.reshape(-1).data
    total = len(view)
    got = 0
    while got < total:
        count = stream.readinto(view[got:])
        if not count:
            break
        got += count
    return got // frame_bytes


def sample_video(
    path: Path,
    *,
    fps: float,
    width: int,
    height: int,
    limits: MediaLimits,
    exact_timestamps: bool = False,
    chunk_frames: int = 32,
    threads: int = 1,
    window: SampleWindow | None = None,
) -> tuple[VideoInfo, SamplingPlan, FrameReader]:
    """Probe ``path``, choose the sampling path and return a not-yet-started FrameReader.

    With ``window`` the reader gives that range's samples only (one segment): the probe
    and the path chosen are the whole video's (the keyframe interval is measured from the
    start either way), and on the keyframe path the selection state at the window's start
    is read from the packet index first.
    """
    info = probe(path, limits, keyframe_window_s=None if exact_timestamps else _window(fps))
    plan = choose_sampling(
        fps, exact_timestamps=exact_timestamps, keyframe_interval_s=info.keyframe_interval_s
    )
    if window is not None:
        start_time_s = max(0.0, info.start_time_s)
        window = dataclasses.replace(
            window,
            prev_sample_s=keyframe_seed(
                path, fps, window.start_s, limits, start_time_s=start_time_s
            )
            if plan.path == "keyframes"
            else None,
            seek_s=window_seek_s(
                path,
                window,
                plan.fps,
                limits,
                container=info.container,
                start_time_s=start_time_s,
            ),
        )
    reader = FrameReader(
        path,
        info,
        plan,
        width=width,
        height=height,
        limits=limits,
        chunk_frames=chunk_frames,
        threads=threads,
        window=window,
    )
    return info, plan, reader


def _window(fps: float) -> float:
    # Read packets over several sampling intervals so a long GOP cannot hide in the window.
    return max(KEYFRAME_PROBE_WINDOW_S, 4.0 / fps)


def read_all(reader: FrameReader) -> FrameChunk:
    """Every sampled frame of a reader as one chunk (tests and tools; the pipeline streams)."""
    frames: list[npt.NDArray[np.uint8]] = []
    times: list[npt.NDArray[np.float64]] = []
    with reader:
        for chunk in reader:
            frames.append(chunk.frames)
            times.append(chunk.timestamps)
    if not frames:
        return FrameChunk(
            np.empty((0, reader.height, reader.width, 3), np.uint8), np.empty(0, np.float64)
        )
    return FrameChunk(np.concatenate(frames), np.concatenate(times))
