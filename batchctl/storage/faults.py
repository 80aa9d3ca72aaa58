"""Storage faults in words: SDK log lines that name the run, item and request, and an error
in one line.

azure-core logs an answer cut off mid-body as a bare "Unable to stream download." or
"Incomplete download." (its requests and aiohttp transports, at WARNING; for a streamed
download and for any other answer alike). In a worker the root handler's filter names the
run and item (:mod:`batchctl.logs`), but a process whose logging nobody configured
(``batchctl run``: Python's last-resort handler prints the message alone) showed just those
words, once per cut, naming nothing. A filter on those loggers themselves (a logger's
filters see only what is logged to it, not what its children log, so each module's logger
is named) appends the run and item bound where the work started, and the request: the
client factory's transport names each request while it is sent (:func:`naming`), and the
blob adapter names a streamed download while its body is read (after the send returned).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from batchctl.logs import NO_ID, item_id_var, run_id_var

# The modules of azure-core that log storage faults as bare sentences (see the docstring).
SDK_FAULT_LOGGERS = (
    "azure.core.pipeline.transport._requests_basic",
    "azure.core.pipeline.transport._aiohttp",
    "azure.core.pipeline.transport._requests_asyncio",
    "azure.core.pipeline.transport._requests_trio",
)


# The storage request being sent or read on this thread ('' when none).
storage_call_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "batchctl_storage_call", default=""
)


@contextlib.contextmanager
def naming(call: str) -> Iterator[None]:
    """Name the storage request ``call`` on SDK fault lines logged inside the block."""
    token = storage_call_var.set(call)
    try:
        yield
    finally:
        storage_call_var.reset(token)


def request_named(method: str, url: str) -> str:
    """'GET /account/container/blob' (with a table query's filter: it names the partition,
    which names the run)."""
    parts = urlsplit(url)
    named = f"{method} {unquote(parts.path)}"
    where = parse_qs(parts.query).get("$filter")
    return f"{named} where {where[0]}" if where else named


def work_named() -> str:
    """'run R, item I' (or 'run R') for the work bound on this thread; '' when none is."""
    parts = [
        f"{what} {value}"
        for what, value in (("run", run_id_var.get()), ("item", item_id_var.get()))
        if value != NO_ID
    ]
    return ", ".join(parts)


class NameTheWork(logging.Filter):
    """Appends the bound run and item, and the request, to an SDK warning naming neither."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not getattr(record, "work_named", False):
            named = ": ".join(part for part in (work_named(), storage_call_var.get()) if part)
            if named:
                record.msg = f"{record.getMessage()} (storage fault in {named})"
                record.args = None
            record.work_named = True
        return True


@functools.cache
def name_the_work_in_sdk_logs() -> None:
    """Install :class:`NameTheWork` once per process (the client factory calls this)."""
    for name in SDK_FAULT_LOGGERS:
        logging.getLogger(name).addFilter(NameTheWork())


def describe(error: BaseException) -> str:
    """One line for a storage error: its status and code, or its kind and first line.

    The SDKs' messages run to several lines (request id, time, the whole XML body).
    """
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        # error_code is set by the storage SDKs' error handling (not azure-core's class);
        # the tables SDK's is an enum (TableErrorCode.SERVER_BUSY), whose value is the code.
        code = getattr(error, "error_code", None) or getattr(error.response, "reason", None)
        code = str(getattr(code, "value", code) or "")
        return " ".join(f"HTTP {error.status_code} {code}".split())
    if isinstance(error, ServiceRequestError):
        kind = "no connection"
    elif isinstance(error, ServiceResponseError):
        kind = "connection lost"
    elif isinstance(error, AzureError):
        kind = "transfer failed"
    else:
        kind = type(error).__name__
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{kind}: {first}" if first else kind
