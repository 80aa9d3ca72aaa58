"""ffmpeg in a subprocess: sampled frames of a local video file as numpy arrays, safely.

Safety. Every ffmpeg and ffprobe call, and the probe process (probeserver.py, which answers
for ffprobe without its start per item), reads one local file the worker downloaded itself,
in a process of its own, with ``-protocol_whitelist file,pipe`` (no network protocol can be
opened) and a *format*
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

A short video's keyframe samples come from the probe process instead, when it can give
exactly what ffmpeg would (:func:`served_samples_request`; probeserver.py says what it
declines): the same libavfilter filters after the same decoder, without ffmpeg's start,
which costs twice what decoding a 10-second clip's keyframes does. Anything it declines, or
cannot answer in time, ffmpeg decodes as before.

Limits. Size, duration and resolution are checked from ffprobe's answer before decoding (the
probe process decodes one keyframe, to read its display rotation, only of a frame size the
limits admit), and decoding is bounded in wall-clock time; a decode never reads past the
duration limit.

Held frames. A frame may be shown for hours (the last slide of a recording, a still with
audio). The ``fps`` filter repeats it once per sampling tick, and ffmpeg pushes every repeat
through the scaler into its output queue at once: a 56 KB MP4 whose last frame is held 3 h
took 4 GB. So the frames the decoder may hold are bounded by construction, whatever the
file's timestamps claim: before ``fps`` a hold is cut to :data:`HOLD_CAP_TICKS` ticks (by
whole ticks, so the filter picks the very frames it would have picked), ffmpeg prints how
many ticks it cut, and the reader repeats the held frame itself, one chunk at a time
(:func:`hold_cap_filters`). Samples are bounded by the work the run asked for: one past the
duration limit fails the item (``TooLongError``), even when the container claimed less.
The keyframe path cannot sample a held frame (it may not be a keyframe): a hold longer than
the sampling interval is a stretch without a keyframe, so such a video takes the full path,
and both paths give it the same samples.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
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
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from . import probeserver, taskapi
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
# What the hold cap's setpts expression prints (libavutil's ``print``, a bare number at info
# level) each time it cuts a hold: this marker, the tick it cut before, the ticks it cut.
# The marker is not a whole number, so neither value after it can be taken for it.
_HOLD_MARK = 7340031.5
_PRINTED = re.compile(r"^\[info\] (-?\d+(?:\.\d+)?)$")


# -- limits and probe results ---------------------------------------------------------------
# The limits are the task API's (a leaf module, so tasks see them without importing the
# decoder); the decoder's callers name them here too.
MediaLimits = taskapi.MediaLimits


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
    # The longest a single frame is shown among the packets read for the keyframe interval
    # (None when not measured): hours for a held last slide or a still with audio.
    longest_frame_s: float | None = None

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
# A frame shown longer than this many sampling ticks has the rest of its hold cut before the
# fps filter (the reader repeats it instead): ffmpeg then holds at most about this many
# copies of one frame. Two is the least that keeps every pick of the filter the same (the
# frame before a cut hold still covers at least one tick).
HOLD_CAP_TICKS = 2
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


def run_probe(
    command: Sequence[str], limits: MediaLimits
) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Run one ffprobe under the probe timeout: its result and its stderr as text.

    Raises what every probe raises alike: DecodeTimeoutError past the timeout, and
    DecoderInterruptedError when a signal ended it (the file was not judged, so the item is
    not failed for it). A non-zero exit is the caller's to read: a probe of the whole file
    and a seek near its end mean different things by it."""
    try:
        completed = run_tool(command, limits.probe_timeout_s)
    except subprocess.TimeoutExpired as error:
        raise DecodeTimeoutError(f"ffprobe ran past {limits.probe_timeout_s:.0f} s") from error
    stderr = completed.stderr.decode("utf-8", errors="replace")
    reason = interrupted(completed.returncode, stderr)
    if reason is not None:
        raise DecoderInterruptedError(f"ffprobe was {reason}: the file was not judged")
    return completed, stderr


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
    data = _probe_server_answer(path, limits, keyframe_window_s)
    if data is None:
        data = ffprobe_answer(path, limits, keyframe_window_s)
    info = parse_probe(data, size)
    check_limits(info, limits)
    return info


# The worker's probe processes (probeserver.py): ffprobe's answer without starting ffprobe,
# and a short video's keyframe samples without starting ffmpeg.
PROBE_SERVERS = probeserver.ProbeServers(probeserver.process_count(os.cpu_count()))
atexit.register(PROBE_SERVERS.close)


def _probe_server_answer(
    path: Path, limits: MediaLimits, keyframe_window_s: float | None
) -> dict[str, Any] | None:
    return PROBE_SERVERS.describe(
        probe_request(path, limits, keyframe_window_s), limits.probe_timeout_s
    )


def probe_request(
    path: Path, limits: MediaLimits, keyframe_window_s: float | None
) -> probeserver.ProbeRequest:
    """What the probe process is asked about ``path``: what ffprobe would be given."""
    return probeserver.ProbeRequest(
        url=_file_url(path),
        formats=FORMAT_WHITELIST,
        protocols=PROTOCOL_WHITELIST,
        window_s=None if keyframe_window_s is None else float(_interval_length(keyframe_window_s)),
        bounds=probeserver.FrameBounds(limits.max_width, limits.max_height, limits.max_pixels),
    )


def _interval_length(seconds: float) -> str:
    """The read interval's length as ffprobe is given it (so the probe process reads the very
    same packets: six significant digits)."""
    return f"{seconds:g}"


def ffprobe_answer(
    path: Path, limits: MediaLimits, keyframe_window_s: float | None
) -> dict[str, Any]:
    """ffprobe's own JSON answer for ``path``; raises the permanent error it reports."""
    packets: list[str] = []
    if keyframe_window_s is not None:
        packets = [
            "-read_intervals", f"%+{_interval_length(keyframe_window_s)}",
            "-show_entries", "packet=stream_index,pts_time,duration_time,flags",
        ]  # fmt: skip
    command = [
        ffprobe_binary(), "-hide_banner", "-v", "error", *_input_options(),
        "-show_format", "-show_streams", *packets, "-of", "json", _file_url(path),
    ]  # fmt: skip
    completed, stderr = run_probe(command, limits)
    if completed.returncode != 0:
        raise _probe_failure(stderr)
    try:
        data: dict[str, Any] = json.loads(completed.stdout or b"{}")
    except json.JSONDecodeError as error:
        raise NotAVideoError(f"not a video: ffprobe gave no readable answer ({error})") from error
    return data


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
        longest_frame_s=_longest_frame(packets),
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

    The stretch after the last keyframe counts too, up to where the last frame *ends* (its
    pts plus its duration, where the container gives one), so a long GOP shows even in a
    window that holds a single keyframe, and so does a frame held for hours after it: no
    keyframe comes while it is shown. A stream of one packet, a keyframe, with no duration
    is a one-frame video (a 0.04 s clip): its interval is 0.0, so the keyframe path (which
    decodes that one frame) is taken rather than a full decode for nothing.
    """
    ends: list[float] = []
    keys: list[float] = []
    for packet in packets:
        when = _number(packet.get("pts_time"))
        if when is None:
            continue
        ends.append(when + max(0.0, _number(packet.get("duration_time")) or 0.0))
        if "K" in str(packet.get("flags", "")):
            keys.append(when)
    if not ends or not keys:
        return None
    keys.sort()
    gaps = [later - earlier for earlier, later in itertools.pairwise(keys)]
    gaps.append(max(ends) - keys[-1])
    longest = max(gaps)
    if longest > 0:
        return longest
    # All timed packets at one instant: a one-frame stream only if it was the only packet
    # (packets without a time could hide a long GOP behind it).
    return 0.0 if len(packets) == 1 else None


def _longest_frame(packets: list[dict[str, Any]]) -> float | None:
    """The longest duration of one packet (one frame) among ``packets``; None without any."""
    lengths = [_number(packet.get("duration_time")) for packet in packets]
    known = [length for length in lengths if length is not None]
    return max(known) if known else None


def choose_sampling(
    fps: float,
    *,
    exact_timestamps: bool,
    keyframe_interval_s: float | None,
    longest_frame_s: float | None = None,
) -> SamplingPlan:
    """Pick the decode path for one video (pure: the policy, apart from any ffmpeg).

    The keyframe path decodes only keyframes, so it can give one frame per sampling interval
    only when keyframes come at least that often. When they do not (a 10 s GOP sampled every
    2 s), it would return fewer frames than asked, so every frame is decoded instead.
    Input seeking (one ``-ss`` per sample) is not used: it decodes from the keyframe before
    each sample, so it beats a full decode only when keyframes are already dense enough for
    the keyframe path, which is cheaper still.

    A frame held longer than the interval is such a stretch without keyframes (and the held
    frame itself may not be one): the full path samples its repeats, so a held-frame video
    gets the same samples whichever path was asked for.
    """
    interval = 1.0 / fps
    if exact_timestamps:
        return SamplingPlan("full", fps, "exact timestamps requested", keyframe_interval_s)
    if longest_frame_s is not None and longest_frame_s > interval * KEYFRAME_SLACK:
        return SamplingPlan(
            "full",
            fps,
            f"a frame is held for {longest_frame_s:.2f} s, longer than the sampling interval "
            f"{interval:.2f} s: decoding every frame (the keyframe path cannot repeat it)",
            keyframe_interval_s,
        )
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
    # The probe process gave the samples, not an ffmpeg of their own.
    served: bool = False


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
    completed, stderr = run_probe(command, limits)
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


def final_stretch(
    path: Path, info: VideoInfo, lookback_s: float, limits: MediaLimits
) -> tuple[float, float | None] | None:
    """How the video ends, from its packet index: how long after its last keyframe its last
    frame ends, and the longest frame among its last packets (demuxed by ffprobe from
    ``lookback_s`` before the end, never decoded). None when they cannot be read: no known
    duration, or a container ffprobe cannot seek in (raw H.264, Y4M).

    The probe measures keyframes over the first seconds only, and a frame held for hours at
    the end of a longer video (the last slide of a talk) lies past them: the keyframe path
    then stopped at the last keyframe and failed the video as truncated, which it is not.
    In a container with an index ffprobe's seek lands on the keyframe at or before the
    point, so the last keyframe is read too. In one without (MPEG-TS) the read may start
    after it; with no keyframe read at all, the stretch is measured from the first packet
    read, about ``lookback_s``: less than the truth, but already several sampling
    intervals, so the full path runs (exact, only slower).
    """
    if info.duration_s is None:
        return None
    begin = max(0.0, info.start_time_s) + max(0.0, info.duration_s - lookback_s)
    command = [
        ffprobe_binary(), "-hide_banner", "-v", "error", *_input_options(),
        "-select_streams", "v:0", "-read_intervals", f"{begin:.6f}%",
        "-show_entries", "packet=pts_time,duration_time,flags", "-of", "json", _file_url(path),
    ]  # fmt: skip
    completed, stderr = run_probe(command, limits)
    if completed.returncode != 0:
        # The whole probe read this file already: what failed is the seek to its end.
        log.info("end of %s unreadable by seeking (%s)", path, stderr.strip()[-200:])
        return None
    try:
        data = json.loads(completed.stdout or b"{}")
    except json.JSONDecodeError:
        return None
    packets = [p for p in data.get("packets") or [] if isinstance(p, dict)]
    stretch = _keyframe_interval(packets)
    if stretch is None:
        # No keyframe among the packets read: the stretch without one began before the
        # first of them, so measure it from there (as if that one were the keyframe).
        stretch = _keyframe_interval([{**p, "flags": "K"} for p in packets[:1]] + packets[1:])
    if stretch is None:
        return None
    return stretch, _longest_frame(packets)


def plan_sampling(
    path: Path, info: VideoInfo, fps: float, *, exact_timestamps: bool, limits: MediaLimits
) -> SamplingPlan:
    """:func:`choose_sampling` for a probed video, its end measured too when the probe's
    packet window did not reach it and the keyframe path would otherwise run (one more
    ffprobe, a seek and a GOP's packets: the same answer for every segment of a video)."""
    interval, longest = info.keyframe_interval_s, info.longest_frame_s
    plan = choose_sampling(
        fps,
        exact_timestamps=exact_timestamps,
        keyframe_interval_s=interval,
        longest_frame_s=longest,
    )
    if plan.path != "keyframes" or info.duration_s is None or info.duration_s <= _window(fps):
        return plan
    lookback = max(SEEK_LOOKBACK_S, 4.0 / fps, 2 * (interval or 0.0))
    end = final_stretch(path, info, lookback, limits)
    if end is None:
        return plan
    stretch, last_longest = end
    return choose_sampling(
        fps,
        exact_timestamps=exact_timestamps,
        keyframe_interval_s=max(interval or 0.0, stretch),
        longest_frame_s=max((x for x in (longest, last_longest) if x is not None), default=None),
    )


# Timestamps the hold cap's arithmetic must keep exact (doubles hold integers below 2^53):
# two days of them, past any start an MPEG-TS clock (26.5 h) can give.
_HOLD_CAP_SPAN_S = 2 * 86400


def hold_cap_filters(fps: float, time_base: Fraction | None) -> list[str]:
    """The filters before ``fps`` that cut each hold to :data:`HOLD_CAP_TICKS` ticks and
    print what they cut, so that ffmpeg never holds more than a few copies of one frame.

    The ``fps`` filter repeats a frame on every tick it covers, and ffmpeg pushes all of
    them through the scaler into its output queue before writing any (a frame held 3 h at
    1 fps: 10,800 scaled copies, 4 GB). ``setpts`` moves every frame after a long gap (and
    the end of the stream, which it sees too) earlier by whole ticks, so the gap covers
    :data:`HOLD_CAP_TICKS` ticks: whole ticks keep each frame's rounding to the tick grid,
    so the filter picks the same frames at the same ticks, less the ones cut. For each cut
    it prints :data:`_HOLD_MARK`, the (cut) tick it was made before and how many ticks it
    took out; :class:`FrameReader` puts the repeats back, one chunk at a time. A video with
    no frame held that long passes unchanged (``setpts`` returns every pts as it was).

    Whole ticks must be whole units of the timestamps: ``settb`` first divides the time
    base by the least integer that makes one tick a whole number of units (exact, as a
    multiplication of every pts). Registers: 0 the shift so far, 1 the latest (shifted)
    time, 2 started, 3 this time shifted, 4 the ticks to cut, 5 one tick in units.
    """
    rate = Fraction(_rate(fps))
    numerator = time_base.numerator if time_base else 1
    denominator = time_base.denominator if time_base else 1
    product = rate.numerator * numerator
    scale = product // math.gcd(product, rate.denominator * denominator)
    if time_base and _HOLD_CAP_SPAN_S / time_base * scale >= 2**52:
        # An absurd time base: whole ticks would lose exactness as doubles. The cut stays
        # (memory stays bounded) on ticks of about one unit off, and the picks after a cut
        # hold may then differ from an uncut decode's by a frame.
        scale = 1
    cap = HOLD_CAP_TICKS
    expression = (
        "if(isnan(PTS),PTS,if(ld(2),"
        "st(3,PTS-ld(0));"
        f"st(4,ceil((ld(3)-ld(1))/ld(5))-{cap});"
        "if(gt(ld(4),0),st(0,ld(0)+ld(4)*ld(5));st(3,ld(3)-ld(4)*ld(5));"
        f"print({_HOLD_MARK});print(round(ld(3)/ld(5)));print(ld(4)));"
        "st(1,max(ld(1),ld(3)));ld(3),"
        f"st(2,1);st(5,max(1,round({rate.denominator}/(TB*{rate.numerator}))));st(1,PTS);PTS))"
    )
    escaped = expression.replace(",", "\\,")
    return ([f"settb=expr=intb/{scale}"] if scale > 1 else []) + [f"setpts='{escaped}'"]


# The whole video's keyframe selection (``select``'s expression, escaped for its options):
# keyframes at least one sampling interval apart (``gap``, with 1 % slack for rounding).
_KEYFRAME_SELECT = "isnan(prev_selected_t)+gte(t-prev_selected_t\\,{gap})"
# The largest sampled frames' size the probe process decodes and hands over whole (one item's
# samples are held in memory at once that way, where ffmpeg's pipe streams them): at
# 224x224, 111 samples, a video of about two minutes at 1 fps.
MAX_SERVED_BYTES = 16 << 20
# How long a reader waits for the probe process's samples (a short clip's take milliseconds)
# before ffmpeg decodes: the wait cannot be cancelled, and declining costs nothing.
SERVED_TIMEOUT_S = 10.0


def fit_filters(width: int, height: int) -> list[tuple[str, str]]:
    """The filters that make a sampled frame the model's input (name, arguments): fill the
    frame and crop the centre, keeping the aspect ratio as CNN preprocessing does, in
    rgb24. Both decoders run them: ffmpeg (:func:`decode_command`) and the probe process."""
    return [
        ("scale", f"{width}:{height}:force_original_aspect_ratio=increase:flags=bilinear"),
        ("crop", f"{width}:{height}"),
        ("setsar", "1"),
        ("format", "rgb24"),
    ]


def served_samples_request(
    path: Path,
    info: VideoInfo,
    plan: SamplingPlan,
    *,
    width: int,
    height: int,
    limits: MediaLimits,
    window: SampleWindow | None = None,
) -> probeserver.SamplesRequest | None:
    """What the probe process is asked to sample of ``path`` in ffmpeg's place (pure), or
    None where ffmpeg decodes: only the whole video's keyframe path (a window seeks, the
    full path's ``fps`` filter and its hold cap are ffmpeg's), an upright video (ffmpeg
    turns a rotated one), of a codec the probe process decodes as ffmpeg does, and short
    enough that its samples fit :data:`MAX_SERVED_BYTES` by its duration (the probe process
    stops at that size too, whatever the duration claimed)."""
    if plan.path != "keyframes" or window is not None or info.rotation:
        return None
    if info.codec not in probeserver.SERVED_CODECS or info.duration_s is None:
        return None
    gap = keyframe_gap(plan.fps)
    samples_at_most = math.floor(max(info.duration_s, 0.0) / gap) + 1
    if samples_at_most * width * height * 3 > MAX_SERVED_BYTES:
        return None
    return probeserver.SamplesRequest(
        url=_file_url(path),
        formats=FORMAT_WHITELIST,
        protocols=PROTOCOL_WHITELIST,
        filters=(
            ("select", _KEYFRAME_SELECT.format(gap=f"{gap:.6f}")),
            *fit_filters(width, height),
        ),
        # ffmpeg's -t, as ffmpeg parses it from decode_command's text.
        read_s=float(f"{limits.max_duration_s:g}"),
        max_bytes=MAX_SERVED_BYTES,
        bounds=probeserver.FrameBounds(limits.max_width, limits.max_height, limits.max_pixels),
    )


def decode_command(
    path: Path,
    plan: SamplingPlan,
    width: int,
    height: int,
    limits: MediaLimits,
    *,
    threads: int = 1,
    window: SampleWindow | None = None,
    time_base: Fraction | None = None,
) -> list[str]:
    """The ffmpeg command line that writes sampled rgb24 frames of ``width`` x ``height``.

    ``threads`` caps ffmpeg's decoder and filter threads. The worker decodes several videos
    at once (one per item in flight), so single-threaded decoders use the cores with less
    switching than several multi-threaded ones: on 2 cores, 3 videos at once decode about
    20 % more frames per second with 1 thread each than with ffmpeg's automatic count.

    With ``window`` only that range is decoded and kept (see :class:`SampleWindow`): an
    input seek to a little before it, ``-copyts -start_at_zero`` so every timestamp is the
    one the whole decode sees (the video's own timeline from its start, not the seek
    point's), and on the keyframe path a ``select`` on the window's boundaries. The full
    path's samples are kept by :class:`FrameReader` instead, by their times before a held
    frame was cut (:func:`hold_cap_filters`; ``time_base``: the stream's, from the probe).
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
            sample = f"select='{_KEYFRAME_SELECT.format(gap=gap)}'"
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
        # 3 s that the keyframe path does return. No window select here: after a cut hold
        # the filters see earlier times than the samples', so the reader keeps the window.
        sample = ",".join(
            [*hold_cap_filters(plan.fps, time_base), f"fps={_rate(plan.fps)}:eof_action=pass"]
        )
        # A window's first ticks may show a frame from before its seek point (a slide held
        # past the lead): ffmpeg's accurate seek dropped every frame before that point, and
        # the window lost those ticks (all of them inside a held frame). Keep the frames
        # from the keyframe the seek lands on; the reader drops the ticks before the window.
        input_options = ["-noaccurate_seek"] if seek else []
    chain = ",".join(
        [
            sample,
            "showinfo=checksum=0",
            *(f"{name}={arguments}" for name, arguments in fit_filters(width, height)),
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


class _Samples(NamedTuple):
    """Samples at consecutive ticks that show one frame of the pipe: a frame ffmpeg printed
    (``showinfo``), or the repeats of a held frame that the hold cap cut out of ffmpeg."""

    source: int  # the frame's index on the pipe
    pts: int  # the first sample's pts, in the reader's time base
    copies: int
    # showinfo's pts_time of a frame printed at its own time; None: computed from ``pts``
    time_s: float | None


class FrameReader:
    """Sampled frames of one video, read from an ffmpeg pipe in chunks (a context manager).

    Memory is one chunk at a time, whatever the video's length: frames are read into a
    fresh array of ``chunk_frames`` frames and handed on. A held frame's repeats that the
    hold cap kept out of ffmpeg (:func:`hold_cap_filters`) are copied in here, as the chunks
    are filled, never ahead of them. ``close`` (or leaving the ``with``) kills ffmpeg if it
    is still running; ``cancel`` may be called from another thread.
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
        probe_process: bool = True,
    ) -> None:
        """``command`` replaces the sampling decode (the transform decodes every frame);
        ``window`` samples one range of the video only (see :class:`SampleWindow`);
        ``probe_process``: False has ffmpeg decode even what the probe process could."""
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
            else decode_command(
                path,
                plan,
                width,
                height,
                limits,
                threads=threads,
                window=window,
                time_base=info.time_base,
            )
        )
        self._served_request = (
            served_samples_request(
                path, info, plan, width=width, height=height, limits=limits, window=window
            )
            if probe_process and command is None
            else None
        )
        # The probe process's frames, read as ffmpeg's pipe would be, when it gave them.
        self._served_frames: BinaryIO | None = None
        # The full path's window is kept here, by the samples' own times (decode_command).
        self._keep = window if command is None and plan.path == "full" else None
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr_thread: threading.Thread | None = None
        # What the pipe's frames are, in order (from stderr), not yet taken by the iterator.
        self._samples: deque[_Samples] = deque()
        self._printed = 0  # frames showinfo printed: the pipe's frames so far
        self._shift = 0  # ticks cut before the latest printed frame
        self._cuts: deque[tuple[int, int]] = deque()  # (tick, ticks) printed, not yet placed
        self._cut_values: list[float] | None = None  # a cut's numbers while they come
        self._last_time_s: float | None = None  # the latest sample delivered, ffmpeg's time
        self._mismatch: str | None = None  # samples and the pipe's frames did not agree
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
        """The decoder's process id once started (its process group id too); None when the
        probe process gave the samples."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self._served_request is not None and self._take_served(self._served_request):
            return
        self._start_ffmpeg()

    def _take_served(self, request: probeserver.SamplesRequest) -> bool:
        """Ask the probe process for the samples; take them as ffmpeg's pipe and showinfo's
        lines would have given them (the same pts, the time showinfo prints for each)."""
        began = time.perf_counter()
        served = PROBE_SERVERS.samples(request, min(SERVED_TIMEOUT_S, self.limits.probe_timeout_s))
        self.stats.seconds += time.perf_counter() - began
        frame_bytes = self.width * self.height * 3
        if served is None or len(served.frames) != len(served.pts) * frame_bytes:
            return False
        self.time_base = served.time_base
        with self._condition:
            for pts in served.pts:
                self._add_printed(pts, self._time_of(pts))
            self._stderr_done = True
        self._served_frames = io.BytesIO(served.frames)
        self.stats.served = True
        return True

    def _start_ffmpeg(self) -> None:
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
        self._served_frames = None  # up to MAX_SERVED_BYTES, not kept past the reader's use
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
                        self._add_printed(int(match.group(1)), float(match.group(2)))
                        self._condition.notify_all()
                    continue
                printed = _PRINTED.match(line)
                if printed:
                    with self._condition:
                        self._add_cut_value(float(printed.group(1)))
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
                # A cut at the end of the stream comes after every frame: the last one's.
                self._place_cuts(None)
                self._stderr_done = True
                self._condition.notify_all()

    def _add_printed(self, pts: int, time_s: float) -> None:
        """A frame showinfo printed (the next one on the pipe), at its tick before any cut."""
        self._place_cuts(pts)
        shift = self._shift
        self._samples.append(_Samples(self._printed, pts + shift, 1, None if shift else time_s))
        self._printed += 1

    def _add_cut_value(self, value: float) -> None:
        # The hold cap prints its marker, the tick it cut before, then the ticks it cut.
        if value == _HOLD_MARK:
            self._cut_values = []
        elif self._cut_values is not None:
            self._cut_values.append(value)
            if len(self._cut_values) == 2:
                tick, ticks = self._cut_values
                self._cuts.append((round(tick), round(ticks)))
                self._cut_values = None

    def _place_cuts(self, before: int | None) -> None:
        """Put back the repeats cut at ticks up to ``before`` (None: all): setpts prints a
        cut when it sees the frame after the hold, before fps writes the held frame's last
        copy, so a cut at tick T goes after the frame printed at T - 1, the held one."""
        while self._cuts and (before is None or self._cuts[0][0] <= before):
            tick, ticks = self._cuts.popleft()
            if self._printed == 0:
                self._mismatch = "ffmpeg cut a held frame before it wrote any frame"
                continue
            self._samples.append(_Samples(self._printed - 1, tick + self._shift, ticks, None))
            self._shift += ticks

    def _groups(self) -> Iterator[_Samples]:
        """The pipe's samples in order, as stderr describes them; ends with stderr.

        showinfo prints a frame before ffmpeg writes it, so every frame on the pipe is
        described before the iterator needs it, and a wait here never holds ffmpeg up."""
        while True:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._samples) or self._stderr_done)
                batch = list(self._samples)
                self._samples.clear()
            if not batch:
                return
            yield from batch

    def _time_of(self, pts: int) -> float:
        """The time showinfo would print for ``pts`` (``%.6g`` of pts x time base, as
        libavutil's av_ts2timestr): a repeat's time reads as a printed frame's would."""
        base = self.time_base or 1 / Fraction(_rate(self.plan.fps))
        return float(f"{pts * (base.numerator / base.denominator):.6g}")

    def _kept(self, pts: int) -> bool:
        """Whether a sample at ``pts`` lies in the window the reader keeps (the ``select``
        of :func:`window_select`, on the same doubles: t = pts x the time base)."""
        window = self._keep
        if window is None:
            return True
        base = self.time_base or 1 / Fraction(_rate(self.plan.fps))
        when = pts * (base.numerator / base.denominator)
        if when < window.start_s - WINDOW_EPSILON_S:
            return False
        return window.end_s is None or when < window.end_s - WINDOW_EPSILON_S

    # -- frames -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[FrameChunk]:
        process = self._process
        frames = self._served_frames if process is None else process.stdout
        if frames is None:
            raise RuntimeError("FrameReader.start() was not called")
        started = time.perf_counter()
        delivered = 0
        for chunk in self._chunks(frames):
            if self._cancelled:
                break  # as a killed ffmpeg's pipe ends (the probe process's frames are here)
            delivered += len(chunk.frames)
            self.stats.frames = delivered
            self.stats.seconds += time.perf_counter() - started
            yield chunk
            started = time.perf_counter()
        self.stats.seconds += time.perf_counter() - started
        self._finish(delivered)

    def _chunks(self, stream: Any) -> Iterator[FrameChunk]:
        """The samples as stderr describes them, filled with the pipe's frames in order."""
        frame_bytes = self.width * self.height * 3
        builder = _ChunkBuilder(self.chunk_frames, self.height, self.width)
        read = 0
        for group in self._groups():
            while read <= group.source and builder.read(stream, frame_bytes):
                read += 1
            if read <= group.source:
                break  # the pipe ended first: ffmpeg failed or was stopped (see _finish)
            self._check_limit(group)
            for tick in range(group.pts, group.pts + group.copies):
                if not self._kept(tick):
                    continue
                when = group.time_s if group.time_s is not None else self._time_of(tick)
                if self._last_time_s is None or when > self._last_time_s:
                    self._last_time_s = when
                full = builder.add(max(when - self.info.video_offset_s, 0.0), tick)
                if full is not None:
                    yield full
        rest = builder.take()
        if rest is not None:
            yield rest
        extra = 0
        while builder.read(stream, frame_bytes):
            extra += 1
        if extra:
            self._mismatch = f"ffmpeg wrote {extra} frames it gave no time for"
        elif read < self._printed:
            self._mismatch = f"ffmpeg described {self._printed} frames but wrote {read}"

    def _check_limit(self, group: _Samples) -> None:
        """Refuse samples past the duration limit before delivering any of ``group``.

        The probe refuses a video whose container says it is too long; this holds for one
        whose frames say so (a last frame held for 10 h in a container claiming 1 min), so
        the samples are bounded by the work the run asked for: fps x the duration limit."""
        last = group.pts + group.copies - 1
        when = group.time_s if group.time_s is not None else self._time_of(last)
        sample_s = when - self.info.video_offset_s
        limit = self.limits.max_duration_s
        if sample_s >= limit:
            claimed = self.info.duration_s
            raise TooLongError(
                f"video is longer than the limit of {limit:.0f} s: its frames are shown until "
                f"{sample_s:.1f} s"
                + (f" (its container says {claimed:.1f} s)" if claimed is not None else "")
            )

    def _finish(self, delivered: int) -> None:
        process = self._process
        returncode = 0  # the probe process's samples: it gave them all, or ffmpeg decoded
        if process is not None:
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
        if self._mismatch is not None:
            raise UndecodableError(f"undecodable video: {self._mismatch} ({detail})")
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
        if self._last_time_s is None:
            return
        last = self._last_time_s - info.video_offset_s
        # On the keyframe path the last sample is the last keyframe, up to a GOP (or two, if
        # the GOP grows past the part ffprobe measured) before the end.
        gop = self.plan.keyframe_interval_s or 0.0
        step = max(1.0 / self.plan.fps, 2 * gop if self.plan.path == "keyframes" else 0.0)
        slack = max(2.0, 0.05 * info.duration_s)
        if last + step + slack < info.duration_s:
            raise UndecodableError(
                f"truncated video: frames end at {last:.1f} s of a {info.duration_s:.1f} s stream"
            )


class _ChunkBuilder:
    """Chunks of samples: each frame of the pipe is read straight into the next free slot,
    and a frame shown by several samples (a held one) is copied from where it was read."""

    def __init__(self, frames: int, height: int, width: int) -> None:
        self.shape = (frames, height, width, 3)
        self.chunk = np.empty(self.shape, np.uint8)
        self.times: list[float] = []
        self.pts: list[int] = []
        # The frame read last: ``chunk[slot]``, or ``kept`` (slot -1) once its chunk was
        # handed on (a consumer may write into the chunks it gets).
        self.slot = -1
        self.kept: npt.NDArray[np.uint8] | None = None

    def read(self, stream: Any, frame_bytes: int) -> bool:
        """The pipe's next frame into the next free slot; False at the pipe's end."""
        if not _read_frame(stream, self.chunk[len(self.times)], frame_bytes):
            return False
        self.slot = len(self.times)
        return True

    def add(self, time_s: float, pts: int) -> FrameChunk | None:
        """One sample of the frame read last; the chunk once it is full."""
        filled = len(self.times)
        if self.slot != filled:
            shown = self.chunk[self.slot] if self.slot >= 0 else self.kept
            assert shown is not None, "a sample comes after the frame it shows was read"
            self.chunk[filled] = shown
        self.times.append(time_s)
        self.pts.append(pts)
        return self.take() if len(self.times) == self.shape[0] else None

    def take(self) -> FrameChunk | None:
        """The samples so far as a chunk (None without any); a fresh chunk goes on."""
        filled = len(self.times)
        if not filled:
            return None
        if self.slot >= 0:
            self.kept = self.chunk[self.slot].copy()
            self.slot = -1
        chunk = FrameChunk(
            self.chunk[:filled], np.asarray(self.times), np.asarray(self.pts, np.int64)
        )
        self.chunk = np.empty(self.shape, np.uint8)
        self.times, self.pts = [], []
        return chunk


def _read_frame(stream: Any, slot: npt.NDArray[np.uint8], frame_bytes: int) -> bool:
    """Fill ``slot`` (one frame) from ``stream``; False at the end (or a partial frame)."""
    view = slot.reshape(-1).data
    got = 0
    while got < frame_bytes:
        count = stream.readinto(view[got:])
        if not count:
            return False
        got += count
    return True


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
    plan = plan_sampling(path, info, fps, exact_timestamps=exact_timestamps, limits=limits)
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
