"""A run's report (the write_report activity)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError

from batchctl.contracts import (
    FailureClass,
    ItemResult,
    ItemStatus,
    ManifestItem,
    RunPhase,
    RunReport,
    RunState,
    RunStats,
)
from batchctl.controller.names import report_blob_name, report_html_blob_name
from batchctl.controller.validation import manifest_location, source_policy
from batchctl.data_assets import read_registration
from batchctl.manifest import (
    errors_blob_name,
    iter_lines,
    read_errors,
    read_manifest,
)
from batchctl.reporting.analysis import RunAnalysis, as_utc
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


def write_report(
    services: Services, state: RunState, phase: RunPhase, message: str, finished_at: datetime
) -> RunReport:
    """Analyse the run's terminal records and write report.json and report.html.

    One pass over the ledger feeds the streaming analysis (bounded memory at any run size)
    and finds the weights. Both blobs are overwritten, so a retried activity is harmless.
    The report returned leaves ``stats`` out: with a large fleet they run to megabytes and
    would land in Durable history and the run's output; report.json keeps them.
    """
    settings = services.settings
    analysis = RunAnalysis(state.started_at or finished_at, finished_at=finished_at)
    metadata_blobs: list[str] = []
    # Each item's status, for failed.csv and index.csv (a dict of ids: the size of what
    # record_unfinished already holds for the same run).
    statuses: dict[str, str] = {}

    def analysed() -> Iterator[ItemResult]:
        for result in services.ledger.iter_results(state.run_id):
            analysis.add(result)
            statuses[result.item_id] = result.status.value
            if result.status is ItemStatus.SUCCEEDED and len(metadata_blobs) < WEIGHTS_CANDIDATES:
                metadata_blobs.extend(n for n in result.outputs if n.endswith("/metadata.json"))
            yield result

    # One read of the ledger feeds the analysis (the outputs index is the nodes' to write,
    # as items succeed: batchctl.outputs_index).
    for _ in analysed():
        pass
    summary = state.summary
    stats = analysis.summarize(finished_at, state.plan)
    wanted = {example.item_id for failure in stats.failures for example in failure.examples}
    row_files, example_sources = _write_row_files(services, state, statuses, wanted)
    if example_sources:
        # The failure examples name the user's video, not the staging blob it was copied to.
        stats = stats.model_copy(update={"failures": _with_sources(stats, example_sources)})
    local = settings.compute_backend == "local"
    slots, unplanned = planned_nodes(
        state.plan,
        stats.nodes,
        state.run_id,
        log_dir=Path(settings.local_log_dir) if local and settings.local_log_dir else None,
    )
    started = as_utc(state.started_at or finished_at)
    errors_name = errors_blob_name(state.run_id)
    has_errors = bool(summary and summary.invalid) and services.store.exists(
        settings.runs_container, errors_name
    )
    merged = f"{state.run_id}/merged/"
    has_merged = services.store.exists(settings.outputs_container, f"{merged}_manifest.json")
    report = RunReport(
        run_id=state.run_id,
        phase=phase,
        manifest=state.request.manifest,
        total=summary.valid if summary else 0,
        succeeded=analysis.succeeded,
        failed=analysis.failed,
        not_run=analysis.not_run,
        skipped=analysis.skipped,
        invalid=summary.invalid if summary else 0,
        started_at=state.started_at or finished_at,
        finished_at=finished_at,
        plan=state.plan,
        failures_by_class=analysis.failures_by_class(),
        not_run_by_reason=dict(sorted(analysis.not_run_by_reason.items())),
        output_prefix=f"{settings.outputs_container}/{state.run_id}/",
        weights=_weights_from_metadata(services, metadata_blobs),
        message=message,
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
        phases=phase_markers(
            started,
            as_utc(finished_at),
            first_start=analysis.first_start,
            last_end=analysis.last_end,
            not_run_at=analysis.not_run_at,
        ),
        failed_csv=failed_csv_blob_name(state.run_id) if row_files else None,
        index_csv=index_csv_blob_name(state.run_id) if row_files else None,
        merged_dataset=f"{settings.outputs_container}/{merged}" if has_merged else None,
        data_asset=(
            read_registration(services.store, settings.outputs_container, state.run_id)
            if state.request.options.register_output is not None
            else None
        ),
    )
    store = services.store
    store.upload_bytes(
        settings.runs_container,
        report_blob_name(state.run_id),
        report.model_dump_json(indent=2),
        content_type="application/json",
    )
    html = _render_report_html(report)
    if html is not None:
        store.upload_bytes(
            settings.runs_container,
            report_html_blob_name(state.run_id),
            html.encode("utf-8"),
            content_type="text/html; charset=utf-8",
        )
    return report.model_copy(update={"stats": None})


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
