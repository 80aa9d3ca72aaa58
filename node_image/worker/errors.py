"""The worker's error hierarchy (permanent or retryable): defined in :mod:`batchctl.errors`.

The storage adapter the worker reads sources with raises these too, and batchctl cannot import
the node image, so the classes live there; tasks keep importing them from here.
"""

from batchctl.errors import (
    MAX_MESSAGE_CHARS,
    CancelledError,
    DecoderInterruptedError,
    DecodeTimeoutError,
    DownloadError,
    ErrorInfo,
    ItemTimeoutError,
    NotAVideoError,
    OutputNameError,
    PermanentError,
    RefusedInputError,
    RetryableError,
    SourceChangedError,
    SourceError,
    TaskConfigError,
    TooLargeError,
    TooLongError,
    UndecodableError,
    WorkerError,
    classify,
)

__all__ = [
    "MAX_MESSAGE_CHARS",
    "CancelledError",
    "DecodeTimeoutError",
    "DecoderInterruptedError",
    "DownloadError",
    "ErrorInfo",
    "ItemTimeoutError",
    "NotAVideoError",
    "OutputNameError",
    "PermanentError",
    "RefusedInputError",
    "RetryableError",
    "SourceChangedError",
    "SourceError",
    "TaskConfigError",
    "TooLargeError",
    "TooLongError",
    "UndecodableError",
    "WorkerError",
    "classify",
]
