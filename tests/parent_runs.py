"""A finished parent run as `batchctl retry` reads it: its report (with its options) and,
on disk, its run folder. Shared by the tests of what a retry keeps of its parent."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from batchctl.contracts import RunOptions, RunPhase, RunReport

PARENT_RUN_ID = "parent"


def parent_report(
    options: RunOptions, *, manifest: str = "m.csv", total: int = 1, succeeded: int = 0
) -> RunReport:
    """The report of a completed parent run with these ``options`` whose other items failed."""
    now = datetime.now(UTC)
    return RunReport(
        run_id=PARENT_RUN_ID,
        phase=RunPhase.COMPLETED,
        manifest=manifest,
        manifest_label=manifest,
        total=total,
        succeeded=succeeded,
        failed=total - succeeded,
        invalid=0,
        started_at=now,
        finished_at=now,
        output_prefix=f"outputs/{PARENT_RUN_ID}/",
        options=options,
    )


def write_parent_folder(folder: Path, options: RunOptions, manifest: Path, failed_csv: str) -> Path:
    """``folder`` as `batchctl run` leaves a parent run of two rows of ``manifest``, one of
    them failed: report.json with its ``options``, and failed.csv (``failed_csv``: the
    manifest's header and the failed row)."""
    folder.mkdir(parents=True)
    report = parent_report(options, manifest=str(manifest), total=2, succeeded=1)
    (folder / "report.json").write_text(report.model_dump_json())
    (folder / "failed.csv").write_text(failed_csv)
    return folder
