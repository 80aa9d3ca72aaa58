"""The ffmpeg ends of a video-to-video transform: every frame out, transformed frames back in.

Decoding. :func:`open_full_decode` gives a :class:`~worker.media.FrameReader` (the features
path's reader: its session, its kill-the-group cancel, its error classification) over a
command that decodes *every* frame (``-fps_mode passthrough``: no frame dropped or doubled)
and reports each frame's integer pts through ``showinfo``. The same whitelists and limits
apply as for sampling: only the local file is read, duration and resolution are checked by
``probe`` before any decode, and ``-t`` stops a decode at the duration limit.

Encoding. Raw frames carry no timestamps, and ffmpeg 5.1 has no way to read a list of them
(no timestamp-file input; ``setpts`` cannot look one up). So :class:`VideoEncoder` hands its
ffmpeg a tiny Matroska stream written here (rawvideo ``V_UNCOMPRESSED`` rgb24, one cluster
per frame, nanosecond ticks), in which every frame carries its source pts. The encoder keeps
them (``-fps_mode passthrough``), counts them in the source's own time base
(``-enc_time_base``, ``-video_track_timescale`` a multiple of it), so a variable frame rate,
the frame count and the duration come out as they went in. The audio comes from the source
file itself, stream-copied when MP4 can hold its codec, otherwise re-encoded to AAC.

Timelines. Without ``-copyts`` ffmpeg shifts each input by its own start time. The decoder's
pts are on the source's shifted timeline, and so is the audio the encoder reads from the
source; the Matroska input starts at its first frame, so ``-itsoffset`` gives that frame's
time back and the two stay in sync (a video that starts after its audio still does).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import struct
import subprocess
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from .errors import CancelledError, DecoderInterruptedError, RetryableError
from .media import (
    ERROR_LINES_KEPT,
    FORMAT_WHITELIST,
    PROTOCOL_WHITELIST,
    FrameReader,
    MediaLimits,
    SampleWindow,
    SamplingPlan,
    VideoInfo,
    ffmpeg_binary,
    guarded,
    interrupted,
    run_tool,
    window_read_range,
    window_select,
)

# Audio codecs the MP4 muxer takes as they are; anything else (Opus from WebM, Vorbis, PCM,
# FLAC) is re-encoded to AAC rather than risk a file some players refuse.
MP4_AUDIO_CODECS: frozenset[str] = frozenset({"aac", "mp3", "ac3", "eac3", "alac"})
AAC_BITRATE = "192k"
# x264 quality: CRF 18 is visually lossless for most content, "veryfast" keeps the encoder
# from becoming the stage that limits a GPU node (it runs on the node's CPUs).
X264_PRESET = "veryfast"
X264_CRF = 18
# MP4 track timescales under this make some players round timestamps; a multiple of the
# source's time base keeps every pts exact.
MIN_TIMESCALE = 10_000
MAX_TIMESCALE = 2**31 - 1
NANOSECONDS = 1_000_000_000


class EncodeError(RetryableError):
    """ffmpeg could not encode the transformed frames (disk full, a resource limit)."""


# -- decoding every frame -------------------------------------------------------------------
def full_decode_command(
    path: Path,
    width: int,
    height: int,
    limits: MediaLimits,
    *,
    threads: int = 1,
    window: SampleWindow | None = None,
    fps: float = 1.0,
) -> list[str]:
    """Every frame of ``path`` as rgb24 ``width`` x ``height`` on stdout, pts on stderr.

    ``showinfo`` sits before the scaler so it logs the source's own pts; the frame is
    stretched (not cropped) to the model's size, so the encoder can stretch it back.

    With ``window`` (one segment), only the frames whose time lies in it: the features
    path's windowing (``media.decode_command``), an input seek to the keyframe before the
    window (``window.seek_s``, from ``media.window_seek_s``) with ``-copyts -start_at_zero``
    (every pts the whole decode's) and a ``select`` on the boundaries, so the windows'
    frames partition the whole video's.
    """
    chain = ["showinfo=checksum=0"]
    seek: list[str] = []
    read_s: float = limits.max_duration_s
    if window is not None:
        seek_s, span_s = window_read_range(window, fps)
        # Every window of an item on one timeline, the first one too: -copyts turns off
        # ffmpeg's correction of timestamp jumps (broadcast MPEG-TS), so a first window
        # decoded without it would select by other times than the windows after it.
        seek = (["-ss", f"{seek_s:.6f}"] if seek_s > 0 else []) + ["-copyts", "-start_at_zero"]
        read_s = max(0.0, read_s - seek_s) if span_s is None else min(span_s, read_s)
        chain.insert(0, f"select='{window_select(window)}'")
    chain += [f"scale={width}:{height}:flags=bicubic", "setsar=1", "format=rgb24"]
    return [
        ffmpeg_binary(), "-hide_banner", "-nostdin", "-nostats",
        "-loglevel", "repeat+level+info", "-filter_threads", str(threads),
        "-protocol_whitelist", PROTOCOL_WHITELIST, "-format_whitelist", FORMAT_WHITELIST,
        "-threads", str(threads), *seek, "-t", f"{read_s:.6f}",
        "-i", f"file:{path.resolve()}",
        "-map", "0:v:0", "-an", "-sn", "-dn",
        "-vf", ",".join(chain), "-fps_mode", "passthrough",
        "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip


def open_full_decode(
    path: Path,
    info: VideoInfo,
    *,
    width: int,
    height: int,
    limits: MediaLimits,
    chunk_frames: int,
    threads: int = 1,
    window: SampleWindow | None = None,
) -> FrameReader:
    """A not-yet-started reader of every frame (``info`` from ``media.probe``), or of every
    frame in ``window`` (one segment)."""
    plan = SamplingPlan("full", info.fps or 1.0, "every frame (transform)")
    command = full_decode_command(
        path, width, height, limits, threads=threads, window=window, fps=info.fps or 1.0
    )
    return FrameReader(
        path,
        info,
        plan,
        width=width,
        height=height,
        limits=limits,
        chunk_frames=chunk_frames,
        threads=threads,
        command=command,
        window=window,
    )


# -- a minimal Matroska stream of raw frames with their timestamps --------------------------
def _vint(size: int) -> bytes:
    """An EBML variable-length size (the all-ones value of each length is reserved)."""
    for length in range(1, 9):
        if size < (1 << (7 * length)) - 1:
            return (size | (1 << (7 * length))).to_bytes(length, "big")
    raise ValueError(f"EBML size {size} is too large")


def _element(element_id: bytes, payload: bytes) -> bytes:
    return element_id + _vint(len(payload)) + payload


def _uint(element_id: bytes, value: int) -> bytes:
    return _element(element_id, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def matroska_header(width: int, height: int, frame_duration_ns: int | None) -> bytes:
    """EBML header, a live (unknown-size) Segment, Info and one rgb24 video track."""
    ebml = _element(
        b"\x1a\x45\xdf\xa3",
        _uint(b"\x42\x86", 1)  # EBMLVersion
        + _uint(b"\x42\xf7", 1)  # EBMLReadVersion
        + _uint(b"\x42\xf2", 4)  # EBMLMaxIDLength
        + _uint(b"\x42\xf3", 8)  # EBMLMaxSizeLength
        + _element(b"\x42\x82", b"matroska")  # DocType
        + _uint(b"\x42\x87", 4)  # DocTypeVersion
        + _uint(b"\x42\x85", 2),  # DocTypeReadVersion
    )
    segment = b"\x18\x53\x80\x67" + b"\x01\xff\xff\xff\xff\xff\xff\xff"  # unknown size
    info = _element(
        b"\x15\x49\xa9\x66",
        _uint(b"\x2a\xd7\xb1", 1)  # TimestampScale: 1 ns ticks, so no pts is rounded
        + _element(b"\x4d\x80", b"batchctl")  # MuxingApp
        + _element(b"\x57\x41", b"batchctl"),  # WritingApp
    )
    # ColourSpace is the raw pixel format's FourCC: "RGB" + 24 bits is rgb24 to ffmpeg.
    video = _element(
        b"\xe0",
        _uint(b"\xb0", width)  # PixelWidth
        + _uint(b"\xba", height)  # PixelHeight
        + _element(b"\x2e\xb5\x24", b"RGB\x18"),  # ColourSpace
    )
    # DefaultDuration gives the encoder the nominal frame rate (for its rate control only;
    # every frame still carries its own timestamp).
    duration = _uint(b"\x23\xe3\x83", frame_duration_ns) if frame_duration_ns else b""
    track = _element(
        b"\xae",
        _uint(b"\xd7", 1)  # TrackNumber
        + _uint(b"\x73\xc5", 1)  # TrackUID
        + _uint(b"\x83", 1)  # TrackType: video
        + _element(b"\x86", b"V_UNCOMPRESSED")
        + duration
        + video,
    )
    return ebml + segment + info + _element(b"\x16\x54\xae\x6b", track)


def matroska_frame_prefix(timestamp_ns: int, frame_bytes: int) -> bytes:
    """The bytes before one frame's pixels: a Cluster at ``timestamp_ns`` with its block.

    One cluster per frame: the block's own offset is then 0, and cluster timestamps are 64
    bits, so no video is too long. The pixels follow as they are (written separately, so a
    frame is never copied to be framed).
    """
    if timestamp_ns < 0:
        raise ValueError(f"Matroska timestamps are unsigned: {timestamp_ns}")
    timestamp = _uint(b"\xe7", timestamp_ns)
    block_head = b"\x81" + struct.pack(">h", 0) + b"\x80"  # track 1, offset 0, keyframe
    block = b"\xa3" + _vint(len(block_head) + frame_bytes) + block_head
    cluster_size = len(timestamp) + len(block) + frame_bytes
    return b"\x1f\x43\xb6\x75" + _vint(cluster_size) + timestamp + block


# -- encoding -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioPlan:
    """What happens to the source's first audio stream: ``copy``, ``aac`` or ``none``."""

    mode: str
    codec: str | None

    @property
    def describe(self) -> dict[str, str | None]:
        return {"mode": self.mode, "source_codec": self.codec}


def audio_plan(info: VideoInfo) -> AudioPlan:
    if not info.has_audio:
        return AudioPlan("none", None)
    codec = info.audio_codec
    return AudioPlan("copy" if codec in MP4_AUDIO_CODECS else "aac", codec)


def output_size(info: VideoInfo) -> tuple[int, int]:
    """(width, height) of the output: the source as displayed, rounded up to even (yuv420p
    halves chroma in both directions, and x264 refuses odd sizes)."""
    return (
        info.display_width + info.display_width % 2,
        info.display_height + info.display_height % 2,
    )


def track_timescale(time_base: Fraction | None) -> tuple[Fraction, int] | None:
    """The encoder's time base and the MP4 timescale that keep ``time_base``'s pts exact."""
    if time_base is None or time_base <= 0:
        return None
    denominator = time_base.denominator
    scale = denominator * max(1, math.ceil(MIN_TIMESCALE / denominator))
    if scale > MAX_TIMESCALE:
        return None
    return time_base, scale


def source_audio_input(source: Path, audio: AudioPlan, limits: MediaLimits) -> list[str]:
    """The source as the second input (for its first audio stream) and the maps: video from
    input 0, audio from input 1 (none without audio). The encoder and the join both use it."""
    if audio.mode == "none":
        return ["-map", "0:v:0"]
    return [
        "-protocol_whitelist", PROTOCOL_WHITELIST, "-format_whitelist", FORMAT_WHITELIST,
        "-t", f"{limits.max_duration_s:g}", "-i", f"file:{source.resolve()}",
        "-map", "0:v:0", "-map", "1:a:0",
    ]  # fmt: skip


def audio_codec(audio: AudioPlan) -> list[str]:
    """The audio codec options: stream copy, AAC, or none."""
    if audio.mode == "copy":
        return ["-c:a", "copy"]
    if audio.mode == "aac":
        return ["-c:a", "aac", "-b:a", AAC_BITRATE]
    return []


def encode_command(
    *,
    source: Path,
    output: Path,
    frame_size: tuple[int, int],
    out_size: tuple[int, int],
    offset_s: float,
    time_base: Fraction | None,
    audio: AudioPlan,
    limits: MediaLimits,
    threads: int = 1,
    b_frames: bool = True,
) -> list[str]:
    """ffmpeg reading our Matroska stream on stdin (and the source for its audio).

    ``b_frames=False`` for a variable frame rate: with B-frames the MP4 muxer sizes the track
    from decode times, which lag the presentation times by the reorder delay, and after an
    irregular stretch that cut seconds off the track's duration (a 3.83 s clip came out as
    3.52 s). Without them decode and presentation times are the same.
    """
    width, height = frame_size
    out_width, out_height = out_size
    chain: list[str] = []
    if frame_size != out_size:
        if out_width - width in (0, 1) and out_height - height in (0, 1):
            chain.append(f"pad={out_width}:{out_height}")  # an odd size made even: no blur
        else:
            chain.append(f"scale={out_width}:{out_height}:flags=bicubic")  # model size back
    chain += ["setsar=1", "format=yuv420p"]
    command = [
        ffmpeg_binary(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+warning",
        "-y", "-protocol_whitelist", "pipe", "-format_whitelist", "matroska",
        "-f", "matroska", "-itsoffset", f"{offset_s:.9f}", "-i", "pipe:0",
    ]  # fmt: skip
    command += source_audio_input(source, audio, limits)
    command += [
        "-vf", ",".join(chain), "-c:v", "libx264", "-preset", X264_PRESET,
        "-crf", str(X264_CRF), "-pix_fmt", "yuv420p", "-threads", str(threads),
        "-fps_mode", "passthrough",
    ]  # fmt: skip
    if not b_frames:
        command += ["-bf", "0"]
    timing = track_timescale(time_base)
    if timing is not None:
        base, scale = timing
        command += ["-enc_time_base", f"{base.numerator}/{base.denominator}"]
        command += ["-video_track_timescale", str(scale)]
    command += audio_codec(audio)
    # faststart: the index first, so the output plays while it downloads.
    command += ["-map_metadata", "-1", "-movflags", "+faststart", "-f", "mp4"]
    return [*command, f"file:{output}"]


class VideoEncoder:
    """Frames in, ``output`` (H.264 MP4) out; started on the first frame (a context manager).

    The first frame's pts anchors the timeline (see the module docstring), so ffmpeg starts
    only when it arrives. ``write`` blocks while ffmpeg is busy: that is the back-pressure
    that bounds the frames waiting for it. ``kill`` may be called from another thread.
    """

    def __init__(
        self,
        *,
        source: Path,
        output: Path,
        info: VideoInfo,
        frame_size: tuple[int, int],
        time_base: Fraction,
        limits: MediaLimits,
        threads: int = 1,
        segment_part: bool = False,
    ) -> None:
        self.source = source
        self.output = output
        self.info = info
        self.frame_size = frame_size
        self.out_size = output_size(info)
        self.time_base = time_base
        self.limits = limits
        self.threads = threads
        # A segment's part (see assemble_parts): video only, its timeline starting at its
        # first frame; the assembly puts the parts back on the source's timeline, with the
        # source's audio in one piece.
        self.segment_part = segment_part
        self.audio = AudioPlan("none", None) if segment_part else audio_plan(info)
        self.frames = 0
        self.command: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._stdin: IO[bytes] | None = None
        self._stderr_thread: threading.Thread | None = None
        self._errors: deque[str] = deque(maxlen=ERROR_LINES_KEPT)
        self._base_pts: int | None = None
        self._last_pts: int | None = None
        self._last_ns = -1
        self._killed = False
        self._lock = threading.Lock()

    def __enter__(self) -> VideoEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _ns(self, pts: int) -> int:
        return round(Fraction(pts) * self.time_base * NANOSECONDS)

    @property
    def first_pts(self) -> int | None:
        """The first frame's source pts (None before any frame)."""
        return self._base_pts

    @property
    def last_pts(self) -> int | None:
        """The last frame's pts as encoded (None before any frame)."""
        return self._last_pts

    def _start(self, first_pts: int) -> None:
        self._base_pts = first_pts
        offset = 0.0 if self.segment_part else float(Fraction(first_pts) * self.time_base)
        self.command = encode_command(
            source=self.source,
            output=self.output,
            frame_size=self.frame_size,
            out_size=self.out_size,
            offset_s=offset,
            time_base=self.time_base,
            audio=self.audio,
            limits=self.limits,
            threads=self.threads,
            b_frames=not self.info.variable_frame_rate,
        )
        fps = self.info.fps
        with self._lock:
            if self._killed:
                raise CancelledError("encoding was cancelled before it started")
            # Its own session, like every decoder: a Ctrl-C at the terminal must not kill
            # it mid-file; the task decides when it stops (``kill``).
            self._process = subprocess.Popen(
                guarded(self.command),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        self._stdin = self._process.stdin
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name="ffmpeg-encode-stderr", daemon=True
        )
        self._stderr_thread.start()
        width, height = self.frame_size
        self._send(matroska_header(width, height, round(NANOSECONDS / fps) if fps > 0 else None))

    def write(self, frames: npt.NDArray[np.uint8], pts: Sequence[int]) -> None:
        """Encode ``frames`` (n, H, W, 3) uint8 at their source ``pts`` (time-base units)."""
        if len(frames) != len(pts):
            raise ValueError(f"{len(frames)} frames but {len(pts)} timestamps")
        if not len(frames):
            return
        if self._base_pts is None:
            self._start(int(pts[0]))
        assert self._base_pts is not None
        frame_bytes = int(np.prod(frames.shape[1:]))
        for frame, stamp in zip(frames, pts, strict=True):
            # Relative to the first frame (Matroska times are unsigned); a pts that goes
            # back is kept just after the previous one, as the MP4 muxer needs increasing
            # times and a broken source must not fail an encode of our own frames.
            ns = max(self._ns(int(stamp) - self._base_pts), self._last_ns + 1)
            self._last_ns = ns
            self._last_pts = int(stamp)
            self._send(matroska_frame_prefix(ns, frame_bytes))
            self._send(np.ascontiguousarray(frame).data)
            self.frames += 1

    def _send(self, data: bytes | memoryview) -> None:
        stdin = self._stdin
        assert stdin is not None
        try:
            stdin.write(data)
        except (BrokenPipeError, ValueError, OSError) as error:
            raise self._failure(f"ffmpeg stopped taking frames ({error})") from error

    def finish(self) -> None:
        """All frames written: let ffmpeg finish the file; raises if it failed."""
        process = self._process
        if process is None:
            if self.segment_part:
                return  # a window with no frame: its segment has no part (assemble knows)
            raise EncodeError("no frame was given to the encoder")
        stdin = self._stdin
        if stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                stdin.close()
        try:
            returncode = process.wait(timeout=self.limits.decode_timeout_s)
        except subprocess.TimeoutExpired as error:
            self.kill()
            raise EncodeError(
                f"ffmpeg did not finish the file within {self.limits.decode_timeout_s:.0f} s"
            ) from error
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=10)
        if returncode != 0:
            raise self._failure(f"ffmpeg exited with {returncode}")

    def _failure(self, what: str) -> Exception:
        process = self._process
        if self._killed:
            return CancelledError("encoding was cancelled")
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if self._stderr_thread is not None:
                self._stderr_thread.join(timeout=10)
            returncode = process.returncode
            detail = " | ".join(list(self._errors)[-3:])
            if returncode is not None:
                reason = interrupted(returncode, detail)
                if reason is not None:
                    return DecoderInterruptedError(
                        f"the encoder was {reason} after {self.frames} frames"
                    )
            return EncodeError(f"encoding failed: {what}: {detail or 'no message'}")
        return EncodeError(f"encoding failed: {what}")

    def kill(self) -> None:
        """Stop now (another thread may call this): the group goes, as for decoders."""
        with self._lock:
            self._killed = True
            process = self._process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    def close(self) -> None:
        """Kill ffmpeg if it still runs (after ``finish`` it does not) and reap it."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if self._stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stdin.close()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=10)

    def _read_stderr(self) -> None:
        process = self._process
        assert process is not None and process.stderr is not None
        try:
            for raw in process.stderr:
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    self._errors.append(line[:300])
        finally:
            process.stderr.close()


# -- joining segments' parts ----------------------------------------------------------------
@dataclass(frozen=True)
class VideoPart:
    """One segment's encoded part: its file (video only, its timeline from its first frame)
    and where that first frame sits on the source's timeline."""

    path: Path
    first_pts: int
    frames: int


PART_NAME = "part-{index:05d}.mp4"
# The concat demuxer reads our own script and our own parts, nothing else.
CONCAT_FORMATS = "concat,mov"
MICROSECONDS = 1_000_000


def concat_script(parts: Sequence[VideoPart], time_base: Fraction) -> str:
    """The concat demuxer's script: every part, each lasting exactly until the next part's
    first frame.

    The demuxer shifts part i by the sum of the durations before it, parsed in microseconds.
    Each duration is the difference of two positions rounded once (``round(T[i+1]) -
    round(T[i])``), so the sums telescope: part i starts at ``round(T[i])`` microseconds,
    never further off than half a microsecond however many parts there are, and that rounds
    back to the exact tick for any time base down to 1/1,000,000 s. Part names are relative
    and plain (the demuxer's safe mode allows nothing else).
    """
    if not parts:
        raise ValueError("no part to join")
    origin = parts[0].first_pts

    def position_us(pts: int) -> int:
        return round(Fraction(pts - origin) * time_base * MICROSECONDS)

    lines = ["ffconcat version 1.0"]
    for index, part in enumerate(parts):
        lines.append(f"file '{part.path.name}'")
        if index + 1 < len(parts):
            duration = position_us(parts[index + 1].first_pts) - position_us(part.first_pts)
            if duration <= 0:
                raise ValueError(f"part {index + 1} does not start after part {index}")
            seconds, micros = divmod(duration, MICROSECONDS)
            lines.append(f"duration {seconds}.{micros:06d}")
    return "\n".join(lines) + "\n"


def join_command(
    *,
    script: Path,
    source: Path,
    output: Path,
    offset_s: float,
    time_base: Fraction | None,
    audio: AudioPlan,
    limits: MediaLimits,
) -> list[str]:
    """ffmpeg joining the parts (stream copy: no frame re-encoded) with the source's audio,
    in one piece, as the unsplit encoder adds it (``encode_command``)."""
    command = [
        ffmpeg_binary(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+warning",
        "-y", "-protocol_whitelist", "file", "-format_whitelist", CONCAT_FORMATS,
        "-f", "concat", "-safe", "1", "-itsoffset", f"{offset_s:.9f}",
        "-i", f"file:{script.resolve()}",
    ]  # fmt: skip
    command += source_audio_input(source, audio, limits)
    command += ["-c:v", "copy"]
    timing = track_timescale(time_base)
    if timing is not None:
        command += ["-video_track_timescale", str(timing[1])]
    command += audio_codec(audio)
    command += ["-map_metadata", "-1", "-movflags", "+faststart", "-f", "mp4"]
    return [*command, f"file:{output}"]


def join_parts(
    parts: Sequence[VideoPart],
    *,
    source: Path,
    output: Path,
    info: VideoInfo,
    limits: MediaLimits,
) -> None:
    """Write ``output``: the parts (in ``output``'s folder, in order) joined on the source's
    timeline, with the source's audio. Raises EncodeError when ffmpeg fails."""
    if info.time_base is None:
        raise EncodeError("the source declares no time base: its parts cannot be placed")
    script = output.with_name("parts.ffconcat")
    for part in parts:
        if part.path.parent != output.parent:
            raise ValueError(f"part {part.path} is not in {output.parent}")
    script.write_text(concat_script(parts, info.time_base), encoding="utf-8")
    command = join_command(
        script=script,
        source=source,
        output=output,
        offset_s=float(Fraction(parts[0].first_pts) * info.time_base),
        time_base=info.time_base,
        audio=audio_plan(info),
        limits=limits,
    )
    try:
        completed = run_tool(command, limits.decode_timeout_s)
    except subprocess.TimeoutExpired as error:
        raise EncodeError(
            f"joining {len(parts)} parts ran past {limits.decode_timeout_s:.0f} s"
        ) from error
    if completed.returncode != 0:
        detail = completed.stderr.decode("utf-8", errors="replace").strip()[-600:]
        reason = interrupted(completed.returncode, detail)
        if reason is not None:
            raise DecoderInterruptedError(f"joining the parts was {reason}")
        raise EncodeError(f"joining {len(parts)} parts failed: {detail or 'no message'}")
