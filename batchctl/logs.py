"""Structured logs: every line names its run and, where there is one, its item.

A run is tens of thousands of items over many nodes; a log line without the run and item it
belongs to is noise. The ids live in context variables, bound where the work starts
(:func:`bound`): a worker binds its run once and each item's thread binds its item; an
activity binds the run of its input. A filter on the handlers copies them onto every record,
whichever library logged it, so a formatter can print them and a query can group by them.

``text`` lines are for people (``... run=r1 item=clip-7 ...``); ``json`` lines, one object
per line, are for log pipelines (AML job logs, Log Analytics). When the process runs in
Azure with ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set, :func:`configure_telemetry` also
exports logs and traces with OpenTelemetry to Application Insights, authenticating with the
managed identity (the component has local auth disabled, so there is no key to use).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]

NO_ID = "-"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s run=%(run_id)s item=%(item_id)s %(message)s"
CONNECTION_STRING_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"

run_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("batchctl_run_id", default=NO_ID)
item_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("batchctl_item_id", default=NO_ID)


@contextlib.contextmanager
def bound(*, run_id: str | None = None, item_id: str | None = None) -> Iterator[None]:
    """Name the run (and item) on every log line written inside the block, on this thread."""
    tokens = []
    if run_id is not None:
        tokens.append((run_id_var, run_id_var.set(run_id)))
    if item_id is not None:
        tokens.append((item_id_var, item_id_var.set(item_id)))
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


class ContextFilter(logging.Filter):
    """Copies the bound run and item ids onto each record (keeping ids a caller passed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) in (None, NO_ID):
            record.run_id = run_id_var.get()
        if getattr(record, "item_id", None) in (None, NO_ID):
            record.item_id = item_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, run, item, message (and the error)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "run_id": getattr(record, "run_id", NO_ID),
            "item_id": getattr(record, "item_id", NO_ID),
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str = "INFO", log_format: LogFormat = "text") -> None:
    """Root logging for a batchctl process: one stderr handler that names run and item."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(log_format))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The Azure SDKs log every request and response at INFO: keep them to warnings.
    logging.getLogger("azure").setLevel(logging.WARNING)


def add_context_to_existing_handlers(*logger_names: str) -> None:
    """Where a host owns the handlers (the Functions worker), add the ids to theirs.

    Without names: the root logger's. The OpenTelemetry handler sits on ``batchctl``'s.
    """
    for name in logger_names or ("",):
        for handler in logging.getLogger(name or None).handlers:
            if not any(isinstance(f, ContextFilter) for f in handler.filters):
                handler.addFilter(ContextFilter())


def configure_telemetry(environ: Mapping[str, str] | None = None) -> bool:
    """OpenTelemetry to Application Insights when deployed; False (and nothing) otherwise.

    Uses the managed identity named by ``AZURE_CLIENT_ID`` (the Function App's user-assigned
    identity), never an instrumentation key on its own.
    """
    env = os.environ if environ is None else environ
    if not env.get(CONNECTION_STRING_ENV):
        return False
    from azure.identity import ManagedIdentityCredential
    from azure.monitor.opentelemetry import configure_azure_monitor

    client_id = env.get("AZURE_CLIENT_ID")
    credential = ManagedIdentityCredential(client_id=client_id) if client_id else None
    configure_azure_monitor(
        connection_string=env[CONNECTION_STRING_ENV],
        credential=credential,
        logger_name="batchctl",
    )
    return True
