"""Run ids: generated for a new run, or derived from a manifest blob's version.

One definition for the Functions app, the CLI and the local server: a client that predicts
the id the blob trigger will use (``submit --via-trigger``) must compute it exactly as the
trigger does, without importing the server's handlers.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime


def new_run_id(now: datetime | None = None) -> str:
    """A fresh, sortable run id: ``run-YYYYMMDD-HHMMSS-xxxxxx``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def run_id_for_blob(name: str, etag: str) -> str:
    """One run per manifest version: the same blob event delivered twice maps to one id."""
    digest = hashlib.sha256(f"{name}\n{etag}".encode()).hexdigest()[:20]
    return f"m-{digest}"
