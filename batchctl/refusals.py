"""A node that cannot set the run's task up says so once, and the run stops with its reason.

A run's own work can be broken before any item runs: a task module that does not import, a
``requirements.txt`` that does not install, a model or package whose hash is not the one the
run names, a task whose ``setup`` raises a permanent error. Every item would then fail the
same way, one by one. Instead the first node to meet it writes one small blob,
``RUN_ID/_refused/NODE.json`` in the outputs container (the nodes' own place to write), and
exits without taking a message; every poll of the monitor reads the first such blob
(``first_refusal``) and the run ends failed with its reason, its items recorded as not run.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchctl.storage import BlobStore

REFUSED_FOLDER = "_refused"
MAX_REASON_CHARS = 2000


def refusal_prefix(run_id: str) -> str:
    return f"{run_id}/{REFUSED_FOLDER}/"


def report_refusal(
    store: BlobStore, container: str, run_id: str, *, node: str, error_class: str, reason: str
) -> str:
    """Write the node's refusal; the blob's name."""
    name = refusal_prefix(run_id) + re.sub(r"[^A-Za-z0-9._-]", "_", node)[:100] + ".json"
    body = {"node": node, "error_class": error_class, "reason": reason[:MAX_REASON_CHARS]}
    store.upload_bytes(container, name, json.dumps(body), overwrite=True)
    return name


def first_refusal(store: BlobStore, container: str, run_id: str) -> str | None:
    """'NODE: ErrorClass: reason' of the first refusal written for the run, or None."""
    names = sorted(store.list_names(container, refusal_prefix(run_id)))
    if not names:
        return None
    try:
        body = json.loads(store.download_bytes(container, names[0]))
        return f"{body['node']}: {body['error_class']}: {body['reason']}"
    except (ValueError, KeyError, TypeError):
        return f"{names[0]}: the node's refusal is unreadable"
