"""An item's small error hierarchy: permanent (fail the item now) or retryable (try again).

Raised by the worker (node_image/worker) and by the storage adapter it reads sources with
(:mod:`batchctl.storage.items`), so it lives in the library both sides share; the worker
re-exports every name from ``worker.errors``, where tasks import them.

Classification is by a class attribute, ``permanent``, rather than by ``isinstance`` against
this module alone: a custom task (``module:Class``) may raise its own exceptions, and may even
import this package under another name (``worker`` in the image, ``node_image.worker`` from a
checkout), so any exception that carries ``permanent = True`` or ``False`` is understood.
Anything else is classified by :func:`classify` from what it is (network errors and timeouts
are retryable; everything unknown is retryable too, so a bug shows up as a poison item after
the configured attempts instead of silently failing a whole run at the first hiccup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# Error text that goes into records and queue messages is capped: it is for people to read,
# and a table property holds at most 32K characters.
MAX_MESSAGE_CHARS = 2000


class WorkerError(Exception):
    """Base of the worker's own errors. ``permanent`` says whether a retry could help."""

    permanent: ClassVar[bool] = False


class PermanentError(WorkerError):
    """Retrying cannot help: the input itself is bad or over a configured limit."""

    permanent = True


class RetryableError(WorkerError):
    """A transient condition (network, throttling, a timeout): another attempt may succeed."""

    permanent = False


# -- permanent ------------------------------------------------------------------------------
class NotAVideoError(PermanentError):
    """The file is not a video we can read: empty, text, audio only, unknown container."""


class RefusedInputError(PermanentError):
    """The file would make ffmpeg read something else (a playlist, a concat script...)."""


class UndecodableError(PermanentError):
    """The container opened but the frames could not be decoded (truncated, corrupt)."""


class TooLongError(PermanentError):
    """The video is longer than the configured limit."""


class TooLargeError(PermanentError):
    """The file or its frames are larger than the configured limits."""


class SourceError(PermanentError):
    """The item's source cannot be fetched by this worker (not an allowed blob URL, missing)."""


class SourceChangedError(PermanentError):
    """The source was rewritten while the item's segments ran: they read different versions
    of it, and joined they would make one item of two videos (run the item again)."""


class TaskConfigError(PermanentError):
    """The run's task or model cannot be set up (bad name, missing file): no item can pass."""


class OutputNameError(PermanentError):
    """A task produced an output name that could escape the item's output prefix."""


# -- retryable ------------------------------------------------------------------------------
class ItemTimeoutError(RetryableError):
    """The item ran past its per-item timeout."""


class DecodeTimeoutError(RetryableError):
    """ffmpeg ran past the decode time limit (a busy node or a pathological file)."""


class DecoderInterruptedError(RetryableError):
    """ffmpeg or ffprobe was stopped by a signal (a Ctrl-C, SIGKILL, the OOM killer).

    Its exit (255 or a negative code) looks like a broken file, but the video was never
    judged: failing it permanently would record a valid video as failed forever.
    """


class DownloadError(RetryableError):
    """The source could not be downloaded this time (network, throttling, auth propagation)."""


class CancelledError(RetryableError):
    """The item was cancelled because the worker is shutting down; another node will retry."""


@dataclass(frozen=True)
class ErrorInfo:
    """What a failure was, in the words that go into the terminal record."""

    error_class: str
    message: str
    permanent: bool


def classify(error: BaseException) -> ErrorInfo:
    """Name an exception and say whether it is permanent (see the module docstring)."""
    flag = getattr(type(error), "permanent", None)
    # Unknown errors (network, SDK, a bug in a custom task) are retryable: they end as a
    # terminal failure after max attempts, with their class and text, never silently.
    permanent = flag if isinstance(flag, bool) else False
    message = str(error) or type(error).__name__
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 12] + " [truncated]"
    return ErrorInfo(error_class=type(error).__name__, message=message, permanent=permanent)
