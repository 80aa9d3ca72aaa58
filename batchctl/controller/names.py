"""Names of a run's blobs: one place decides them."""

from __future__ import annotations

import logging
from pathlib import Path

REPORT_NAME = "report.json"
CANCEL_FLAG_NAME = "cancel-requested"
REPORT_HTML_NAME = "report.html"

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


def enqueued_marker(run_id: str, chunk: str) -> str:
    return f"{run_id}/enqueued/{Path(chunk).name}.done"


def cancel_flag_blob_name(run_id: str) -> str:
    """The run's durable cancel flag in the runs container (its presence is the flag)."""
    return f"{run_id}/{CANCEL_FLAG_NAME}"


def report_blob_name(run_id: str) -> str:
    return f"{run_id}/{REPORT_NAME}"


def report_html_blob_name(run_id: str) -> str:
    return f"{run_id}/{REPORT_HTML_NAME}"


CLAIM_NAME = "claim.json"


FINALIZED_NAME = "finalized"


RECORDS_NAME = "records.jsonl"


OUTPUTS_DIR_NAME = "outputs"


REPORT_PARTS_DIR = "report-parts"
CLOSE_PROGRESS_NAME = "close-progress.json"


def report_part_blob_name(run_id: str, shard: int) -> str:
    """One shard's part of the report (its statistics and its items' statuses)."""
    return f"{run_id}/{REPORT_PARTS_DIR}/{shard:04d}.json"


def close_progress_blob_name(run_id: str) -> str:
    """How far the sweeper's close of a terminated run has got (resumed by the next pass)."""
    return f"{run_id}/{CLOSE_PROGRESS_NAME}"
