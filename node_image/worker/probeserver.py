"""ffprobe's answer, and a short video's keyframe samples, without ffprobe's or ffmpeg's start.

Why. Debian's and Ubuntu's ffprobe link about 215 shared libraries; resolving their symbols
costs ~47 ms of CPU on every start, where probing a clip costs ~3 ms. A worker probes every
item, so that start was a quarter of the CPU a 10-second clip's whole item took. Here one
process imports PyAV (libavformat in a wheel) once, and probes file after file.

Isolation is kept. The probe still parses the file in a process of its own, never in the
worker: a demuxer that crashes or hangs on a hostile file takes down only the probe process
(the worker kills a probe past its timeout, and starts a fresh process for the next file).

Same answer as ffprobe. :func:`describe` writes what ``ffprobe -show_format -show_streams
-show_entries packet=... -read_intervals %+W -of json`` would print for the fields that
``media.parse_probe`` reads, with ffprobe's own formatting (``%f`` of ``ts * av_q2d(tb)``,
"N/A" fields left out, and a packet's zero duration too) and ffprobe's read-interval rule (the
interval starts at the first packet's time, counted over every stream, and ends at the first
packet at or past its end). ``media.parse_probe`` then reads either answer the same way, and
tests/test_probe_server.py holds the two equal over every video of the test corpus.

Anything this process cannot answer (an error opening the file, a stream without a codec, a
crash) is answered by ffprobe itself, so every refusal and error message stays ffprobe's.

Where libavformat's versions disagree. PyAV's libavformat is not the one the ffmpeg binary
decodes with (Debian 12: 5.1, the node image: 6.1, PyAV 18.1: 8.1). The one field the corpus
found them to disagree on is the start time of a file whose streams start at different
times: Opus's pre-skip put a Matroska's audio, and so the container, at -0.007 s under 5.1
and at 0 under 8.1, and the decode's timestamps are shifted by that start. So an answer is
used only when every stream and the container start at the same time
(:func:`one_start_time`); any other file is probed by ffprobe, from the same libavformat as
its decode.

Keyframe samples. A short video's keyframe samples (the whole video's keyframe path, up to
``media.MAX_SERVED_BYTES`` of frames) are asked of this process too: it decodes the keyframes
with PyAV and runs the ffmpeg command's own filters after them in libavfilter
(:func:`keyframe_samples`), and writes the rgb24 frames after its answer's line. ffmpeg's
start costs ~50 ms of CPU, where a 10-second clip's keyframes decode and scale in ~20 ms. What
ffmpeg would do differently is declined, never imitated (``keyframe_samples`` lists it: the
codecs and pixel formats whose decoding is not fixed bit for bit, containers without stored
presentation times or with timestamp jumps ffmpeg corrects, a start other than 0, a display
matrix, a frame past ``-t``, anything libav warns of), and ffmpeg decodes it;
tests/test_served_samples.py holds the frames, byte for byte, the timestamps, the warnings and
the errors equal to ffmpeg's over the test corpus. A worker has one probe process per core, up
to 4 (:class:`ProbeServers`), each started when those before it are busy.

This file is also the probe process itself (``python -I probeserver.py``): it needs only the
standard library and PyAV, and it reads one JSON request a line on stdin and writes one JSON
answer a line on stdout until its stdin closes, which it does when the worker dies, however
it dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# AV_TIME_BASE: libavformat's container-level times are in microseconds.
AV_TIME_BASE = 1_000_000
# A stream with no keyframe among its first packets is ffprobe's to describe (the probe
# process reads no further: a file of 8 GB without a keyframe flag would be read whole).
KEYFRAME_SCAN_PACKETS = 600
# How long a probe waits for the probe process while it answers another item: past it,
# ffprobe answers (a file that hangs the probe process holds up no other item).
BUSY_WAIT_S = 0.25


# -- ffprobe's formatting (pure) ------------------------------------------------------------
def ffprobe_time(ts: int | None, time_base: Fraction) -> str | None:
    """``print_time``: ``%f`` of ``ts * av_q2d(tb)``; None (left out) for no timestamp."""
    if ts is None:
        return None
    return f"{ts * (time_base.numerator / time_base.denominator):f}"


def ffprobe_duration(ts: int | None, time_base: Fraction) -> str | None:
    """``print_duration_time``: as :func:`ffprobe_time`, and a zero duration is "N/A" too."""
    return None if not ts else ffprobe_time(ts, time_base)


def ffprobe_ratio(value: Fraction | None) -> str:
    """``print_q``: ``num/den``; an unknown rate is ``0/0`` (libavformat's {0, 1} too)."""
    if value is None:
        return "0/0"
    return f"{value.numerator}/{value.denominator}"


def one_start_time(answer: dict[str, Any]) -> bool:
    """Whether every stream and the container start at the same, known time (pure): the
    files whose start no libavformat version computes differently (see the module's note)."""
    starts = {stream.get("start_time") for stream in answer.get("streams") or []}
    starts.add((answer.get("format") or {}).get("start_time"))
    return len(starts) == 1 and None not in starts


def rescale_to_microseconds(ts: int, time_base: Fraction) -> int:
    """``av_rescale_q(ts, tb, AV_TIME_BASE_Q)``: rounded to nearest, halves away from zero."""
    numerator = abs(ts) * time_base.numerator * AV_TIME_BASE
    denominator = time_base.denominator
    magnitude = (numerator + denominator // 2) // denominator
    return -magnitude if ts < 0 else magnitude


class IntervalRule:
    """ffprobe's ``read_interval_packets`` for ``%+W`` (pure): which packets it shows.

    The current time is the last packet's pts (or dts) in microseconds, over every stream;
    the interval starts at the first packet's (the container's start when the first packet
    has none) and the first packet at or past start + W ends the reading, unshown."""

    def __init__(self, window_s: float, container_start_us: int | None) -> None:
        self._window_us = round(window_s * AV_TIME_BASE)
        self._current_us = container_start_us
        self._end_us: int | None = None

    def shows(self, timestamp: int | None, time_base: Fraction) -> bool:
        if timestamp is not None:
            self._current_us = rescale_to_microseconds(timestamp, time_base)
        if self._end_us is None and self._current_us is not None:
            self._end_us = self._current_us + self._window_us
        return not (
            self._end_us is not None
            and self._current_us is not None
            and self._current_us >= self._end_us
        )


# -- the probe process's side ---------------------------------------------------------------
@dataclass(frozen=True)
class FrameBounds:
    """The frame sizes the worker accepts (its MediaLimits'): a larger frame is never decoded
    here, not even its first keyframe; ffprobe answers, and the limits refuse the file."""

    max_width: int
    max_height: int
    max_pixels: int

    def admit(self, width: int, height: int) -> bool:
        return (
            0 < width <= self.max_width
            and 0 < height <= self.max_height
            and width * height <= self.max_pixels
        )


@dataclass(frozen=True)
class ProbeRequest:
    """What the worker asks about one file: its ``file:`` URL, the whitelists every ffmpeg
    and ffprobe input gets, the packets' window (None: no packets) and the frame bounds."""

    url: str
    formats: str
    protocols: str
    window_s: float | None
    bounds: FrameBounds


def describe(
    path: str,
    formats: str,
    protocols: str,
    window_s: float | None,
    bounds: FrameBounds,
) -> dict[str, Any]:
    """What ffprobe would print for ``path`` (the fields ``parse_probe`` reads).

    Raises on anything it cannot describe; the worker then asks ffprobe itself."""
    import av

    options = {"format_whitelist": formats, "protocol_whitelist": protocols}
    with av.open(path, options=options) as container:
        streams = [_describe_stream(stream) for stream in container.streams]
        answer: dict[str, Any] = {
            "format": _without_missing(
                {
                    "format_name": container.format.name,
                    "start_time": ffprobe_time(container.start_time, Fraction(1, AV_TIME_BASE)),
                    "duration": ffprobe_time(container.duration, Fraction(1, AV_TIME_BASE)),
                }
            ),
            "streams": streams,
        }
        video = next(
            (s for s in container.streams.video if not _attached_picture(s)),
            None,
        )
        if video is not None:
            context = video.codec_context
            if not bounds.admit(context.width, context.height):
                raise ValueError(f"frame {context.width}x{context.height} is not admitted")
            if _first_keyframe_rotation(path, options, video.index):
                # ffprobe reads the container's display matrix; PyAV shows a matrix only on
                # decoded frames, where an H.264/HEVC orientation SEI may put one that the
                # container lacks and the ffmpeg binary does not apply. Rotated files are
                # rare: ffprobe answers them.
                raise ValueError("rotated: ffprobe reads the container's display matrix")
        if window_s is not None:
            answer["packets"] = _interval_packets(container, window_s)
    return answer


def _describe_stream(stream: Any) -> dict[str, Any]:
    context = stream.codec_context
    described: dict[str, Any] = {
        "index": stream.index,
        "codec_type": stream.type,
        "disposition": {"attached_pic": int(_attached_picture(stream))},
        "tags": dict(stream.metadata),
    }
    if context is None:
        # A data or subtitle stream this build has no decoder for: parse_probe reads only
        # its type. A video or audio stream must be described whole, or ffprobe answers.
        if stream.type in ("video", "audio"):
            raise ValueError(f"{stream.type} stream {stream.index} has no codec in this build")
        return described
    described["codec_name"] = context.codec.canonical_name
    time_base: Fraction = stream.time_base or Fraction(0, 1)
    if stream.type == "video":
        described |= {
            "width": context.width,
            "height": context.height,
            "r_frame_rate": ffprobe_ratio(stream.base_rate),
            "avg_frame_rate": ffprobe_ratio(stream.average_rate),
        }
    if time_base:
        described |= {
            "time_base": ffprobe_ratio(time_base),
            "start_time": ffprobe_time(stream.start_time, time_base),
            "duration": ffprobe_time(stream.duration, time_base),
        }
    if stream.frames:
        described["nb_frames"] = str(stream.frames)
    return _without_missing(described)


def _attached_picture(stream: Any) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _first_keyframe_rotation(path: str, options: dict[str, str], index: int) -> int:
    """The display rotation of the first keyframe (``av_display_rotation_get``, truncated
    to an integer, as ffprobe prints it): PyAV gives a stream's display matrix only on its
    frames, the container's preferred to the bitstream's. Its own open, so the packet
    reading starts at the start; at most :data:`KEYFRAME_SCAN_PACKETS` packets are read."""
    import av

    with av.open(path, options=options) as container:
        stream = container.streams[index]
        context: Any = stream.codec_context  # a video stream's: it decodes
        context.options = {"side_data_prefer_packet": "displaymatrix"}
        context.skip_frame = "NONKEY"
        context.thread_count = 1
        for number, packet in enumerate(container.demux(stream)):
            if number >= KEYFRAME_SCAN_PACKETS:
                break
            if not packet.is_keyframe and packet.size:
                continue
            # The keyframe alone, then a flush: a decoder that reorders frames holds its
            # first output back until later packets come, and those may be minutes away.
            frames = context.decode(packet if packet.size else None) or context.decode(None)
            if frames:
                return int(frames[0].rotation)
            if not packet.size:
                break
    raise ValueError("no keyframe to read the display rotation from")


def _interval_packets(container: Any, window_s: float) -> list[dict[str, Any]]:
    rule = IntervalRule(window_s, container.start_time)
    packets: list[dict[str, Any]] = []
    for packet in container.demux():
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue  # the demuxer's end-of-stream marker, not a packet ffprobe sees
        time_base: Fraction = packet.time_base
        timestamp = packet.pts if packet.pts is not None else packet.dts
        if not rule.shows(timestamp, time_base):
            break
        packets.append(
            _without_missing(
                {
                    "stream_index": packet.stream_index,
                    "pts_time": ffprobe_time(packet.pts, time_base),
                    "duration_time": ffprobe_duration(packet.duration, time_base),
                    "flags": "K_" if packet.is_keyframe else "__",
                }
            )
        )
    return packets


def _without_missing(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


# -- keyframe samples: ffmpeg's decode without ffmpeg's start --------------------------------
# Decoders whose output the codec's specification fixes bit for bit, so that PyAV's
# libavcodec gives the frames Debian's or Ubuntu's ffmpeg gives. MPEG-4 Part 2, MPEG-2 and
# MJPEG leave the inverse DCT to the implementation (and libavcodec picks one per CPU): those
# are ffmpeg's to decode.
SERVED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})
# Decoded pixel formats taken here: 8-bit YUV. The full-range ``yuvj`` ones make swscale warn
# ("deprecated pixel format") once per process, which ffmpeg prints on every decode.
SERVED_PIXEL_FORMATS = frozenset({"yuv420p", "yuv422p", "yuv444p"})
# Containers that store every frame's presentation time, in which ffmpeg corrects no timestamp
# jump: libavformat versions differ in the pts they make up for AVI (decode times only), and
# ffmpeg closes MPEG-TS/PS and Ogg jumps that PyAV leaves.
SERVED_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "ivf"})
# A probe process gives at most this many samples answers, then a fresh one takes over: it
# runs decoders on untrusted files, and a file that corrupted its memory must not stay with it
# for the worker's whole life (a fresh process costs ~0.15 s of CPU, about once a minute).
SAMPLES_PER_PROCESS = 500
# The longest answer line read (a probe's packet list of 30 s is well under 1 MiB); longer is
# garbled, never buffered whole.
MAX_ANSWER_LINE = 8 << 20


@dataclass(frozen=True)
class SamplesRequest:
    """Keyframe samples of one whole file, as ``media.decode_command`` would have ffmpeg
    write them: the same whitelists, the same filters after the decoder (``filters``:
    name and arguments, in order), at most ``max_bytes`` of frames, and the input's ``-t``
    (``read_s``); ``bounds`` as the probe's."""

    url: str
    formats: str
    protocols: str
    filters: tuple[tuple[str, str], ...]
    read_s: float
    max_bytes: int
    bounds: FrameBounds


class ServedSamples(NamedTuple):
    """Keyframe samples given by the probe process: the time base of ``pts``, one pts per
    frame, and the frames' rgb24 bytes one after another."""

    time_base: Fraction
    pts: list[int]
    frames: bytes


class DeclinedError(Exception):
    """A file whose samples this process does not give: ffmpeg decodes it."""


def keyframe_samples(request: SamplesRequest) -> tuple[Fraction, list[int], bytes]:
    """The time base, the pts and the rgb24 bytes of every frame the filters pass, decoding
    keyframes only (``-skip_frame nokey``) as the ffmpeg command does.

    What ffmpeg would do differently is declined rather than imitated, so that what is
    given here is always what ffmpeg gives: a container outside SERVED_CONTAINERS, a file
    whose streams do not all start at 0 (ffmpeg shifts by the container's start), more than
    one video stream (``-map 0:v:0`` could pick a cover picture), a codec or pixel format
    outside the lists above, a frame without a timestamp or out of order (ffmpeg would
    guess one), a display matrix (ffmpeg turns or flips the frame), a change of size or
    format mid-stream (ffmpeg rebuilds its filters), a frame past ``read_s`` (ffmpeg's
    trim), anything libav logs as a warning or worse (the worker keeps ffmpeg's warnings
    and judges its errors), a decoding error, no frame at all, or more than ``max_bytes``
    of frames."""
    import av

    options = {"format_whitelist": request.formats, "protocol_whitelist": request.protocols}
    av.logging.set_level(av.logging.WARNING)
    try:
        with av.logging.Capture(True) as logged, av.open(request.url, options=options) as box:
            answer = _samples(box, request)
    finally:
        av.logging.set_level(None)
    if logged:
        _level, name, message = logged[0]
        raise DeclinedError(f"libav said: [{name}] {message.strip()}")
    return answer


def _samples(container: Any, request: SamplesRequest) -> tuple[Fraction, list[int], bytes]:
    import av.sidedata.sidedata

    if container.format.name not in SERVED_CONTAINERS:
        raise DeclinedError(f"container {container.format.name}")
    videos = list(container.streams.video)
    if len(videos) != 1:
        raise DeclinedError(f"{len(videos)} video streams")
    stream = videos[0]
    starts = {container.start_time, stream.start_time}
    if starts != {0}:
        raise DeclinedError(f"starts at {starts}, not 0")
    context = stream.codec_context
    if context.codec.canonical_name not in SERVED_CODECS:
        raise DeclinedError(f"codec {context.codec.canonical_name}")
    context.thread_count = 1
    context.skip_frame = "NONKEY"
    time_base: Fraction = stream.time_base
    graph: _SampleGraph | None = None
    last_pts: int | None = None
    for frame in container.decode(stream):
        if frame.pts is None or (last_pts is not None and frame.pts <= last_pts):
            raise DeclinedError(f"frame pts {frame.pts} after {last_pts}")
        if any(data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX for data in frame.side_data):
            # Any display matrix, not only a rotation: ffmpeg flips a mirrored frame and turns
            # one tilted by a degree, where PyAV's rotation reads 0 for both.
            raise DeclinedError("a display matrix on a frame")
        if graph is None:
            graph = _SampleGraph(frame, time_base, context.sample_aspect_ratio, request)
        graph.push(frame)
        last_pts = frame.pts
    if graph is None:
        raise DeclinedError("no frame")
    pts, data = graph.finish()
    if not pts:
        raise DeclinedError("no sample")
    return time_base, pts, data


class _SampleGraph:
    """The filters of the ffmpeg command after its decoder, as libavfilter runs them there:
    a buffer source with the first frame's properties (as ffmpeg configures it), the
    request's filters, a sink; the frames they pass, collected."""

    def __init__(
        self,
        first: Any,
        time_base: Fraction,
        aspect: Fraction | None,
        request: SamplesRequest,
    ) -> None:
        import av

        self._request = request
        self._time_base = time_base
        self._first_pts: int = first.pts
        self._properties = _properties(first)
        width, height, pixel_format = first.width, first.height, first.format.name
        if pixel_format not in SERVED_PIXEL_FORMATS:
            raise DeclinedError(f"pixel format {pixel_format}")
        if not request.bounds.admit(width, height):
            raise DeclinedError(f"frame {width}x{height} is not admitted")
        # The decoder's sample aspect ratio (PyAV shows it on the codec context, not on the
        # frame). No filter here reads it before setsar sets it to 1.
        aspect = aspect or Fraction(0, 1)
        self._graph = av.filter.Graph()
        # One thread, as ffmpeg's -filter_threads 1: libavfilter would start one per core
        # (4 processes on 16 cores: 64 threads), and a warning from another thread would
        # escape the capture, which is per thread.
        self._graph.threads = 1
        self._source = self._graph.add(
            "buffer",
            video_size=f"{width}x{height}",
            pix_fmt=pixel_format,
            time_base=f"{time_base.numerator}/{time_base.denominator}",
            pixel_aspect=f"{aspect.numerator}/{aspect.denominator}",
            colorspace=str(int(first.colorspace)),
            range=str(int(first.color_range)),
        )
        last = self._source
        for name, arguments in request.filters:
            node = self._graph.add(name, arguments)
            last.link_to(node)
            last = node
        self._sink = self._graph.add("buffersink")
        last.link_to(self._sink)
        self._graph.configure()
        self.pts: list[int] = []
        self._parts: list[bytes] = []
        self._bytes = 0

    def push(self, frame: Any) -> None:
        if _properties(frame) != self._properties:
            raise DeclinedError("frame properties change mid-stream")
        if (frame.pts - self._first_pts) * self._time_base >= Fraction(self._request.read_s):
            raise DeclinedError(f"a frame past the input's -t {self._request.read_s:g} s")
        self._source.push(frame)
        self._drain()

    def finish(self) -> tuple[list[int], bytes]:
        self._source.push(None)
        self._drain()
        return self.pts, b"".join(self._parts)

    def _drain(self) -> None:
        import av

        while True:
            try:
                frame: Any = self._sink.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            data = frame.to_ndarray().tobytes()
            self._bytes += len(data)
            if self._bytes > self._request.max_bytes:
                raise DeclinedError(f"samples over {self._request.max_bytes} bytes")
            self.pts.append(frame.pts)
            self._parts.append(data)


def _properties(frame: Any) -> tuple[int, int, str, int, int]:
    return (
        frame.width,
        frame.height,
        frame.format.name,
        int(frame.colorspace),
        int(frame.color_range),
    )


def serve() -> None:
    """The probe process: one request a line in, one answer a line out (with the request's
    id), until EOF, or until its worker is gone (:func:`_exit_when_orphaned`). A samples
    answer's line is followed by its frames' bytes, as many as the line says."""
    import av

    av.logging.set_level(None)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    out = sys.stdout.buffer
    for line in sys.stdin:
        request = json.loads(line)
        answer: dict[str, Any] = {"id": request["id"]}
        payload = b""
        try:
            if "samples" in request:
                time_base, pts, payload = keyframe_samples(_samples_request(request["samples"]))
                answer["ok"] = {"time_base": ffprobe_ratio(time_base), "pts": pts}
            else:
                answer["ok"] = describe(
                    request["url"],
                    request["formats"],
                    request["protocols"],
                    request["window_s"],
                    FrameBounds(**request["bounds"]),
                )
        except Exception as error:  # every failure is ffprobe's (or ffmpeg's) to judge
            answer["error"] = f"{type(error).__name__}: {error}"
            payload = b""
        answer["bytes"] = len(payload)
        out.write(json.dumps(answer).encode() + b"\n" + payload)
        out.flush()


def _samples_request(wire: dict[str, Any]) -> SamplesRequest:
    fields = dict(wire)
    fields["filters"] = tuple((str(name), str(arguments)) for name, arguments in wire["filters"])
    fields["bounds"] = FrameBounds(**wire["bounds"])
    return SamplesRequest(**fields)


def _exit_when_orphaned(worker: int, every_s: float = 0.5) -> None:
    """End this process once its worker has died, even while a demuxer is stuck on a file
    (PyAV releases the GIL while it demuxes, so this thread runs): stdin's end is noticed
    only between requests."""
    while os.getppid() == worker:
        time.sleep(every_s)
    os._exit(0)


# -- the worker's side ----------------------------------------------------------------------
class ProbeTimeoutError(Exception):
    """The probe process ran past the probe timeout on one file (it has been killed)."""


class _GarbledError(Exception):
    """An answer that is not the one asked for: the process is restarted."""


class ProbeServer:
    """The worker's handle on its probe process: started on first use, one request at a
    time (a probe takes milliseconds), restarted after a crash or a timeout."""

    # A probe process that dies this many times in a row without answering is not started
    # again: ffprobe answers every later file (PyAV broken in this image, say).
    CRASHES_BEFORE_GIVING_UP = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._pending = bytearray()
        self._crashes_in_a_row = 0
        self._requests = 0
        self._samples_given = 0  # by the process running now
        self._warned = False

    def describe(self, request: ProbeRequest, timeout_s: float) -> dict[str, Any] | None:
        """ffprobe's answer to ``request``, or None where ffprobe itself must answer: the file
        could not be described here, its streams start at different times, the probe
        process is busy with another item past :data:`BUSY_WAIT_S`, ran past ``timeout_s``
        (then it is killed, as ffprobe would be), died, or PyAV is not installed."""
        return _described(self._exchange(*_describe_wire(request), timeout_s))

    def samples(self, request: SamplesRequest, timeout_s: float) -> ServedSamples | None:
        """The keyframe samples ``request`` asks for (:func:`keyframe_samples`), or None where
        ffmpeg must decode the file: declined here, or, as for a probe, the process busy
        past :data:`BUSY_WAIT_S`, past ``timeout_s`` (then killed), dead, or no PyAV."""
        return _served(request, self._exchange(*_samples_wire(request), timeout_s))

    def _exchange(
        self, fields: dict[str, Any], max_payload: int, timeout_s: float
    ) -> tuple[dict[str, Any], bytes] | None:
        if not self._lock.acquire(timeout=BUSY_WAIT_S):
            return None
        try:
            return self._ask(fields, timeout_s, max_payload)
        finally:
            self._lock.release()

    def claim(self, wait_s: float) -> bool:
        """Take this process for one request (:meth:`ask_claimed`), waiting up to ``wait_s``
        while another request has it."""
        return self._lock.acquire(timeout=wait_s) if wait_s > 0 else self._lock.acquire(False)

    def ask_claimed(
        self, fields: dict[str, Any], max_payload: int, timeout_s: float
    ) -> tuple[dict[str, Any], bytes] | None:
        """One request on a process :meth:`claim` took; the claim ends with it."""
        try:
            return self._ask(fields, timeout_s, max_payload)
        finally:
            self._lock.release()

    @property
    def pid(self) -> int | None:
        """The probe process's id while one runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def _ask(
        self, fields: dict[str, Any], timeout_s: float, max_payload: int
    ) -> tuple[dict[str, Any], bytes] | None:
        """One request, its answer and the bytes that follow it, under the lock; None when
        there is none."""
        if "samples" in fields and self._samples_given >= SAMPLES_PER_PROCESS:
            self._stop()  # a fresh process from here on (SAMPLES_PER_PROCESS)
        process = self._running()
        if process is None:
            return None
        self._requests += 1
        wire = {"id": self._requests} | fields
        deadline = time.monotonic() + timeout_s
        try:
            assert process.stdin is not None
            process.stdin.write(json.dumps(wire).encode() + b"\n")
            process.stdin.flush()
            line = self._read_until(process, deadline, self._line_length)
            answer = json.loads(line)
            if not isinstance(answer, dict) or answer.get("id") != self._requests:
                raise _GarbledError(f"an answer to another request: {line[:80]!r}")
            announced = answer.get("bytes", 0)
            if type(announced) is not int or not 0 <= announced <= max_payload:
                raise _GarbledError(f"{announced!r} bytes announced, {max_payload} at most")
            size: int = announced
            payload = self._read_until(process, deadline, lambda: size)
        except (BrokenPipeError, ConnectionError, EOFError, ValueError, _GarbledError) as error:
            self._stop()
            self._crashes_in_a_row += 1
            if self._crashes_in_a_row >= self.CRASHES_BEFORE_GIVING_UP:
                self._warn(f"the probe process failed {self._crashes_in_a_row} times ({error})")
            return None
        except ProbeTimeoutError:
            self._stop()
            return None
        self._crashes_in_a_row = 0
        if "samples" in fields:
            self._samples_given += 1
        return answer, payload

    @property
    def given_up(self) -> bool:
        """Whether this process failed too often to be started again (ffprobe and ffmpeg
        answer in its place)."""
        return self._crashes_in_a_row >= self.CRASHES_BEFORE_GIVING_UP

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s: ffprobe answers every probe from now on", why)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _running(self) -> subprocess.Popen[bytes] | None:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        if self.given_up:
            return None
        if not available():
            self._warn("PyAV is not installed")
            return None
        # Its own session, like every decoder: a Ctrl-C at the worker's terminal is the
        # worker's to handle. It ends when its stdin closes, which the kernel does when the
        # worker dies in any way, or when it sees itself orphaned (a demuxer stuck on a file
        # reads no stdin). No parent-death signal: that follows the spawning thread.
        self._process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._pending = bytearray()
        self._samples_given = 0
        return self._process

    def _read_until(
        self, process: subprocess.Popen[bytes], deadline: float, wanted: Callable[[], int | None]
    ) -> bytes:
        """The first ``wanted()`` bytes the process writes, by ``deadline`` (``wanted`` is
        asked again as bytes come: None while it cannot tell yet). Bytes past them stay."""
        assert process.stdout is not None
        descriptor = process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(descriptor, selectors.EVENT_READ)
            while (size := wanted()) is None or len(self._pending) < size:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise ProbeTimeoutError("the probe process ran past its timeout")
                chunk = os.read(descriptor, 1 << 20)
                if not chunk:
                    raise EOFError("the probe process ended")
                self._pending += chunk
        taken = bytes(self._pending[:size])
        del self._pending[:size]
        return taken

    def _line_length(self) -> int | None:
        """The length of the answer's line with its newline, once it has all come."""
        end = self._pending.find(b"\n")
        if end < 0 and len(self._pending) > MAX_ANSWER_LINE:
            raise _GarbledError(f"an answer line over {MAX_ANSWER_LINE} bytes")
        return None if end < 0 else end + 1

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class ProbeServers:
    """Several probe processes for one worker, each started the first time every process
    started before it is busy: a worker with many items in flight on many cores probes and
    decodes them side by side, where one process would make each wait for the others."""

    def __init__(self, count: int) -> None:
        self.servers = [ProbeServer() for _ in range(max(1, count))]
        self._turn = itertools.count()

    def describe(self, request: ProbeRequest, timeout_s: float) -> dict[str, Any] | None:
        """:meth:`ProbeServer.describe` on the first process free."""
        return _described(self._exchange(*_describe_wire(request), timeout_s))

    def samples(self, request: SamplesRequest, timeout_s: float) -> ServedSamples | None:
        """:meth:`ProbeServer.samples` on the first process free."""
        return _served(request, self._exchange(*_samples_wire(request), timeout_s))

    def _exchange(
        self, fields: dict[str, Any], max_payload: int, timeout_s: float
    ) -> tuple[dict[str, Any], bytes] | None:
        # A free process, the ones already started first; when every one is busy, wait
        # BUSY_WAIT_S for one of them, taken in turn, as a single process is waited for.
        # One that failed too often answers nothing at once: never take it.
        usable = [each for each in self.servers if not each.given_up]
        if not usable:
            return None
        server = next((each for each in usable if each.claim(0)), None)
        if server is None:
            server = usable[next(self._turn) % len(usable)]
            if not server.claim(BUSY_WAIT_S):
                return None
        return server.ask_claimed(fields, max_payload, timeout_s)

    def pids(self) -> list[int]:
        return [pid for server in self.servers if (pid := server.pid) is not None]

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _describe_wire(request: ProbeRequest) -> tuple[dict[str, Any], int]:
    return dataclasses.asdict(request), 0


def _described(answer: tuple[dict[str, Any], bytes] | None) -> dict[str, Any] | None:
    described: dict[str, Any] | None = None if answer is None else answer[0].get("ok")
    if described is None or not one_start_time(described):
        return None
    return described


def _samples_wire(request: SamplesRequest) -> tuple[dict[str, Any], int]:
    return {"samples": dataclasses.asdict(request)}, request.max_bytes


def _served(
    request: SamplesRequest, answer: tuple[dict[str, Any], bytes] | None
) -> ServedSamples | None:
    if answer is None:
        return None
    fields, payload = answer
    given = fields.get("ok")
    if not isinstance(given, dict):
        log.debug("ffmpeg decodes %s: %s", request.url, fields.get("error"))
        return None
    try:
        time_base = Fraction(given["time_base"])
        pts = [int(each) for each in given["pts"]]
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        log.warning("ffmpeg decodes %s: a garbled samples answer (%r)", request.url, error)
        return None
    if time_base <= 0:
        return None
    return ServedSamples(time_base, pts, payload)


def process_count(cores: int | None) -> int:
    """Probe processes for a worker on ``cores`` cores (pure): one per core, up to 4 (a probe
    or a short video's samples take milliseconds; more would mostly sit idle)."""
    return max(1, min(4, cores or 1))


def available() -> bool:
    """Whether PyAV is installed (a user's own image may lack it: then ffprobe answers)."""
    import importlib.util

    return importlib.util.find_spec("av") is not None


def process_versions(timeout_s: float = 60.0) -> dict[str, str]:
    """PyAV's and its libavformat's versions, as a probe process started the worker's way
    reports them (``python -m worker --check``); raises when that process cannot start."""
    completed = subprocess.run(
        [sys.executable, "-I", str(Path(__file__).resolve()), "--versions"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    versions: dict[str, str] = json.loads(completed.stdout)
    return versions


def _print_versions() -> None:
    import av

    libavformat = av.library_versions["libavformat"]
    print(json.dumps({"pyav": av.__version__, "libavformat": ".".join(map(str, libavformat))}))


if __name__ == "__main__":
    if sys.argv[1:] == ["--versions"]:
        _print_versions()
    else:
        serve()
