"""A run's report: each shard's part gathered apart (analyse_shards), merged and written
(write_report), or the counts alone when that fails (write_brief_report)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError
from pydantic import BaseModel, ConfigDict, Field

from batchctl.compute.base import JobPages
from batchctl.contracts import (
    FailureClass,
    ItemStatus,
    ManifestItem,
    RunPhase,
    RunReport,
    RunState,
    RunStats,
)
from batchctl.controller.names import (
    report_blob_name,
    report_html_blob_name,
    report_part_blob_name,
)
from batchctl.controller.validation import manifest_location, source_policy
from batchctl.data_assets import read_registration
from batchctl.manifest import (
    errors_blob_name,
    iter_lines,
    read_errors,
    read_manifest,
)
from batchctl.reporting.analysis import AnalysisPart, RunAnalysis, as_utc
from batchctl.reporting.artifacts import (
    MAX_INVALID_ROWS_SHOWN,
    RowFiles,
    failed_csv_blob_name,
    index_csv_blob_name,
    phase_markers,
    planned_nodes,
    read_header,
    write_row_files,
)
from batchctl.services import Services

# Items whose metadata.json may name the weights; the first readable one answers.
WEIGHTS_CANDIDATES = 8

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


class ShardPart(BaseModel):
    """One shard's part of the report, kept beside it (``report-parts/``): the statistics of
    the shard's records, each record's status (for failed.csv and index.csv) and a few item
    metadata files (for the weights). Written by :func:`analyse_shards`, merged by
    :func:`write_report`; ``finished_at`` names the end it was gathered for, so a part left
    by an earlier attempt at another end is gathered again rather than trusted."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    shard: int = Field(ge=0)
    finished_at: datetime
    records: int = Field(ge=0)
    analysis: AnalysisPart
    statuses: dict[str, list[str]]
    metadata_blobs: list[str]


class EndMarks(BaseModel):
    """Moments of a run's end, stamped as each step ended (the report's phase markers)."""

    model_config = ConfigDict(extra="forbid")

    torn_down_at: datetime | None = None
    not_run_recorded_at: datetime | None = None


def analyse_shards(
    services: Services, state: RunState, shards: Iterable[int], finished_at: datetime
) -> int:
    """Gather the report's part of each of ``shards`` and keep it beside the report (the
    analyse_shards activity: one read of those shards, bounded by their size, not the run's).
    Idempotent: a part is overwritten. Returns how many records were read."""
    return sum(_analyse_shard(services, state, shard, finished_at).records for shard in shards)


def _analyse_shard(
    services: Services, state: RunState, shard: int, finished_at: datetime
) -> ShardPart:
    analysis = RunAnalysis(state.started_at or finished_at, finished_at=finished_at)
    statuses: dict[str, list[str]] = {}
    metadata_blobs: list[str] = []
    records = 0
    for result in services.ledger.iter_results(state.run_id, shard=shard):
        records += 1
        analysis.add(result)
        statuses.setdefault(result.status.value, []).append(result.item_id)
        if result.status is ItemStatus.SUCCEEDED and len(metadata_blobs) < WEIGHTS_CANDIDATES:
            metadata_blobs.extend(n for n in result.outputs if n.endswith("/metadata.json"))
    part = ShardPart(
        run_id=state.run_id,
        shard=shard,
        finished_at=finished_at,
        records=records,
        analysis=analysis.part(),
        statuses=statuses,
        metadata_blobs=metadata_blobs,
    )
    services.store.upload_bytes(
        services.settings.runs_container,
        report_part_blob_name(state.run_id, shard),
        part.model_dump_json(),
        content_type="application/json",
    )
    return part


def _read_part(
    services: Services, state: RunState, shard: int, finished_at: datetime
) -> ShardPart | None:
    """The shard's part as :func:`analyse_shards` left it for this end; None when there is
    none, or it was gathered for another end or cannot be read (it is gathered again)."""
    name = report_part_blob_name(state.run_id, shard)
    try:
        part = ShardPart.model_validate_json(
            services.store.download_bytes(services.settings.runs_container, name)
        )
    except ResourceNotFoundError:
        return None
    except ValueError:
        log.warning("report part %s unreadable; gathering it again", name)
        return None
    same_end = as_utc(part.finished_at) == as_utc(finished_at)
    return part if same_end and part.run_id == state.run_id and part.shard == shard else None


def write_report(
    services: Services,
    state: RunState,
    phase: RunPhase,
    message: str,
    finished_at: datetime,
    *,
    marks: EndMarks | None = None,
) -> RunReport:
    """Merge the shards' parts into the run's report; write report.json and report.html.

    Its cost is per shard (one part each) plus one streaming pass over the manifest for
    failed.csv and index.csv. A shard whose part is missing (its analyse_shards activity
    failed) is gathered here; one that cannot be gathered at all does not stop the report:
    it is written with the ledger's exact counters and says which statistics are missing,
    as it says when failed.csv or index.csv cannot be written. ``marks`` date the end's
    steps; "report written" is stamped here, as it happens. Both blobs are overwritten, so
    a retried activity is harmless. The report returned leaves ``stats`` out: with a large
    fleet they run to megabytes and would land in Durable history and the run's output;
    report.json keeps them.
    """
    settings = services.settings
    analysis = RunAnalysis(state.started_at or finished_at, finished_at=finished_at)
    metadata_blobs: list[str] = []
    # Each item's status, for failed.csv and index.csv (a dict of ids: the size of what
    # record_unfinished already holds for the same run).
    statuses: dict[str, str] = {}
    missing: dict[int, str] = {}
    for shard in services.ledger.shards(state.run_id):
        part = _read_part(services, state, shard, finished_at)
        if part is None:
            try:
                part = _analyse_shard(services, state, shard, finished_at)
            except Exception as error:
                log.exception("shard %d of run %s could not be analysed", shard, state.run_id)
                missing[shard] = f"{type(error).__name__}: {error}"
                continue
        analysis.absorb(part.analysis)
        for status, ids in part.statuses.items():
            statuses.update(dict.fromkeys(ids, status))
        if len(metadata_blobs) < WEIGHTS_CANDIDATES:
            metadata_blobs.extend(part.metadata_blobs)
    notes: list[str] = []
    counts = (analysis.succeeded, analysis.failed, analysis.not_run, analysis.skipped)
    if missing:
        exact = services.ledger.counts(state.run_id)
        counts = (exact.succeeded, exact.failed, exact.not_run, exact.skipped)
        first_shard, first_error = next(iter(missing.items()))
        notes.append(
            f"the statistics of {len(missing)} of {len(services.ledger.shards(state.run_id))} "
            f"ledger shards could not be gathered (shard {first_shard}: {first_error}); the "
            "counts are the ledger's exact counters, the plots leave those items out and "
            "failed.csv and index.csv were not written"
        )
    summary = state.summary
    stats = analysis.summarize(finished_at, state.plan)
    wanted = {example.item_id for failure in stats.failures for example in failure.examples}
    row_files: RowFiles | None = None
    example_sources: dict[str, str] = {}
    if not missing:
        try:
            row_files, example_sources = _write_row_files(services, state, statuses, wanted)
        except Exception as error:
            log.exception("failed.csv and index.csv of run %s not written", state.run_id)
            notes.append(f"failed.csv and index.csv could not be written ({error})")
    del statuses  # the largest thing held: not needed past the row files
    if example_sources:
        # The failure examples name the user's video as they named it, not its file:// source.
        stats = stats.model_copy(update={"failures": _with_sources(stats, example_sources)})
    local = settings.compute_backend == "local"
    slots, unplanned = planned_nodes(
        state.plan,
        stats.nodes,
        state.run_id,
        log_dir=Path(settings.local_log_dir) if local and settings.local_log_dir else None,
        job_page=services.backend.job_page if isinstance(services.backend, JobPages) else None,
    )
    started = as_utc(state.started_at or finished_at)
    errors_name = errors_blob_name(state.run_id)
    has_errors = bool(summary and summary.invalid) and services.store.exists(
        settings.runs_container, errors_name
    )
    merged = f"{state.run_id}/merged/"
    has_merged = services.store.exists(settings.outputs_container, f"{merged}_manifest.json")
    marks = marks or EndMarks()
    report = RunReport(
        run_id=state.run_id,
        phase=phase,
        manifest=state.request.manifest,
        total=summary.valid if summary else 0,
        succeeded=counts[0],
        failed=counts[1],
        not_run=counts[2],
        skipped=counts[3],
        invalid=summary.invalid if summary else 0,
        started_at=state.started_at or finished_at,
        finished_at=finished_at,
        plan=state.plan,
        failures_by_class=analysis.failures_by_class(),
        not_run_by_reason=dict(sorted(analysis.not_run_by_reason.items())),
        output_prefix=f"{settings.outputs_container}/{state.run_id}/",
        weights=_weights_from_metadata(services, metadata_blobs),
        message="; ".join([message, *notes]) if message else "; ".join(notes),
        stats=stats,
        manifest_label=state.request.manifest_label,
        parent_run_id=state.request.parent_run_id,
        options=state.request.options,
        local=local,
        invalid_rows=(
            list(itertools.islice(read_errors(services.store, errors_name), MAX_INVALID_ROWS_SHOWN))
            if has_errors
            else []
        ),
        invalid_rows_file=errors_name if has_errors else None,
        planned_nodes=slots,
        unplanned_workers=unplanned,
        failed_csv=failed_csv_blob_name(state.run_id) if row_files else None,
        index_csv=index_csv_blob_name(state.run_id) if row_files else None,
        merged_dataset=f"{settings.outputs_container}/{merged}" if has_merged else None,
        data_asset=(
            read_registration(services.store, settings.outputs_container, state.run_id)
            if state.request.options.register_output is not None
            else None
        ),
    )
    # Stamped last, as the report is written: not when the orchestrator asked for it.
    report = report.model_copy(
        update={
            "phases": phase_markers(
                started,
                as_utc(datetime.now(UTC)),
                first_start=analysis.first_start,
                last_end=analysis.last_end,
                torn_down_at=marks.torn_down_at and as_utc(marks.torn_down_at),
                not_run_recorded_at=(
                    marks.not_run_recorded_at and as_utc(marks.not_run_recorded_at)
                ),
            )
        }
    )
    _upload_report(services, report)
    return report.model_copy(update={"stats": None})


def write_brief_report(
    services: Services,
    state: RunState,
    phase: RunPhase,
    message: str,
    finished_at: datetime,
    *,
    problem: str,
) -> RunReport:
    """The report when :func:`write_report` failed: the ledger's exact counts (one read a
    shard), the run's plan and options, and what is missing and why. A run never ends
    without a report.json."""
    settings = services.settings
    summary = state.summary
    counts = services.ledger.counts(state.run_id)
    note = (
        f"the full report could not be written ({problem}); this one holds the ledger's "
        "exact counts only: no statistics, plots, failed.csv or index.csv"
    )
    report = RunReport(
        run_id=state.run_id,
        phase=phase,
        manifest=state.request.manifest,
        total=summary.valid if summary else 0,
        succeeded=counts.succeeded,
        failed=counts.failed,
        not_run=counts.not_run,
        skipped=counts.skipped,
        invalid=summary.invalid if summary else 0,
        started_at=state.started_at or finished_at,
        finished_at=finished_at,
        plan=state.plan,
        output_prefix=f"{settings.outputs_container}/{state.run_id}/",
        message=f"{message}; {note}" if message else note,
        manifest_label=state.request.manifest_label,
        parent_run_id=state.request.parent_run_id,
        options=state.request.options,
        local=settings.compute_backend == "local",
    )
    _upload_report(services, report, html=False)
    return report


def _upload_report(services: Services, report: RunReport, *, html: bool = True) -> None:
    settings = services.settings
    store = services.store
    store.upload_bytes(
        settings.runs_container,
        report_blob_name(report.run_id),
        report.model_dump_json(indent=2),
        content_type="application/json",
    )
    text = _render_report_html(report) if html else None
    if text is not None:
        store.upload_bytes(
            settings.runs_container,
            report_html_blob_name(report.run_id),
            text.encode("utf-8"),
            content_type="text/html; charset=utf-8",
        )


def _write_row_files(
    services: Services, state: RunState, statuses: dict[str, str], wanted: set[str]
) -> tuple[RowFiles | None, dict[str, str]]:
    """failed.csv and index.csv beside report.json, from a second read of the manifest
    (validated as the run did, so rows and ids are the run's); None when it is unreadable."""
    settings = services.settings
    store = services.store
    container, name = manifest_location(state.request.manifest, settings)
    if not state.summary or state.summary.fatal or not store.exists(container, name):
        return None, {}
    header = read_header(itertools.islice(iter_lines(store.download_chunks(container, name)), 50))
    if header is None:
        return None, {}
    policy = source_policy(settings, store)
    items = (
        record
        for record in read_manifest(iter_lines(store.download_chunks(container, name)), policy)
        if isinstance(record, ManifestItem)
    )
    # Spooled: small runs stay in memory, a million rows go to a temporary file.
    with (
        tempfile.SpooledTemporaryFile(8 << 20, mode="w+b") as failed,
        tempfile.SpooledTemporaryFile(8 << 20, mode="w+b") as index,
    ):
        failed_text = io.TextIOWrapper(failed, encoding="utf-8", newline="")
        index_text = io.TextIOWrapper(index, encoding="utf-8", newline="")
        counts, sources = write_row_files(
            items,
            header,
            statuses,
            outputs_container=settings.outputs_container,
            run_id=state.run_id,
            local_root=policy.local_root,
            failed=failed_text,
            index=index_text,
            sources_wanted=wanted,
        )
        for text, blob in (
            (failed_text, failed_csv_blob_name(state.run_id)),
            (index_text, index_csv_blob_name(state.run_id)),
        ):
            text.flush()
            length = text.buffer.tell()
            text.buffer.seek(0)
            store.upload_stream(
                settings.runs_container,
                blob,
                text.buffer,
                length=length,
                content_type="text/csv; charset=utf-8",
            )
            text.detach()  # the spooled file is closed by its own with, not twice
    return counts, sources


def _with_sources(stats: RunStats, sources: dict[str, str]) -> list[FailureClass]:
    return [
        failure.model_copy(
            update={
                "examples": [
                    example.model_copy(
                        update={"source": sources.get(example.item_id, example.source)}
                    )
                    for example in failure.examples
                ]
            }
        )
        for failure in stats.failures
    ]


def _render_report_html(report: RunReport) -> str | None:
    """report.html's text, or None where matplotlib is not installed.

    Imported here, not at the top: matplotlib comes with the [app] extra and costs start-up
    time in every Functions worker. A core-only install still gets report.json, not a failed run.
    """
    try:
        from batchctl.reporting.html import render_report_html
    except ImportError as error:
        log.warning("report.html not written: %s (install batchctl[app] for the plots)", error)
        return None
    try:
        return render_report_html(report)
    except Exception:
        # The plots are a view of report.json, which is already written: a drawing failure
        # must not turn a run whose items all succeeded into a failed run.
        log.exception("report.html not written: rendering failed (report.json is complete)")
        return None


def _weights_from_metadata(services: Services, metadata_blobs: Iterable[str]) -> str:
    """The weights named by the first readable item metadata.json among ``metadata_blobs``.

    Offline nodes fall back to random initialization; the report must say so plainly rather
    than leave a reader to assume ImageNet features. One item's metadata is enough: every
    node of a run loads the same model from the same image. A custom task may write no
    metadata file, and a blob may be gone; those are skipped.
    """
    container = services.settings.outputs_container
    for metadata_blob in metadata_blobs:
        try:
            metadata = json.loads(services.store.download_bytes(container, metadata_blob))
        except (ResourceNotFoundError, ValueError):
            continue
        if isinstance(metadata, dict) and metadata.get("weights"):
            return f"{metadata.get('model', '?')}: {metadata['weights']}"
        return ""
    return ""
