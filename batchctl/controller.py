"""What each activity does, on top of the storage and compute adapters.

The activity functions in ``activities/`` are thin: they validate their input model, call
one function here with the process's :class:`~batchctl.services.Services`, and dump the
result. Everything here is idempotent, because Durable retries activities and may run one
twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import itertools
import json
import logging
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

from batchctl.contracts import (
    ChunkTask,
    FailureClass,
    ItemError,
    ItemResult,
    ItemStatus,
    JobCounts,
    ManifestError,
    ManifestItem,
    ManifestSummary,
    MergeSummary,
    NotRunReason,
    ProgressSnapshot,
    RunPhase,
    RunPlan,
    RunReport,
    RunRequest,
    RunState,
    RunStats,
    WaveTask,
    WorkItem,
)
from batchctl.logs import bound
from batchctl.manifest import (
    SourcePolicy,
    chunk_blob_name,
    errors_blob_name,
    iter_lines,
    local_path_of,
    prefixes_from_accounts,
    read_chunk,
    read_errors,
    read_manifest,
    validate_manifest_to_blobs,
)
from batchctl.packing import MessageSizer, mini_batches
from batchctl.refusals import first_refusal
from batchctl.reporting.analysis import RunAnalysis, as_utc
from batchctl.reporting.artifacts import (
    FAILED_CSV_NAME,
    INDEX_CSV_NAME,
    MANIFEST_ERRORS_NAME,
    MAX_INVALID_ROWS_SHOWN,
    RowFiles,
    failed_csv_blob_name,
    index_csv_blob_name,
    localize_index,
    phase_markers,
    planned_nodes,
    read_header,
    write_row_files,
)
from batchctl.services import Services
from batchctl.settings import ControllerSettings
from batchctl.storage import BlobStore, Ledger
from batchctl.storage.blobs import atomic_file
from batchctl.storage.faults import describe as describe_storage_error
from batchctl.storage.retry import Package, is_retryable_status, retry_bounds

REPORT_NAME = "report.json"
CANCEL_FLAG_NAME = "cancel-requested"
REPORT_HTML_NAME = "report.html"
# Items whose metadata.json may name the weights; the first readable one answers.
WEIGHTS_CANDIDATES = 8

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------
def enqueued_marker(run_id: str, chunk: str) -> str:
    return f"{run_id}/enqueued/{Path(chunk).name}.done"


def local_media_blob_name(path: Path) -> str:
    """Where a local file named by a manifest is uploaded in local mode (deterministic)."""
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:16]
    return f"local/{digest}/{path.name}"


def cancel_flag_blob_name(run_id: str) -> str:
    """The run's durable cancel flag in the runs container (its presence is the flag)."""
    return f"{run_id}/{CANCEL_FLAG_NAME}"


def report_blob_name(run_id: str) -> str:
    return f"{run_id}/{REPORT_NAME}"


def report_html_blob_name(run_id: str) -> str:
    return f"{run_id}/{REPORT_HTML_NAME}"


# -- manifest ------------------------------------------------------------------------------
def source_policy(settings: ControllerSettings, store: BlobStore) -> SourcePolicy:
    """The run's allowlist: its own media container, the configured accounts, and local
    files in local mode (the rules are batchctl.sources', which every worker applies too)."""
    own_media = store.url(settings.media_container, "")
    return SourcePolicy(
        allowed_prefixes=(own_media, *prefixes_from_accounts(settings.allowed_sources)),
        local_root=Path(settings.local_media_root) if settings.local_media_root else None,
    )


def _local_sources_to_blobs(
    records: Iterable[ManifestItem | ManifestError], store: BlobStore, media_container: str
) -> Iterator[ManifestItem | ManifestError]:
    # Workers always read from blob storage; in local mode the CLI uploaded each local file
    # to the media container under local_media_blob_name, so the source is rewritten to match.
    for record in records:
        path = local_path_of(record.source) if isinstance(record, ManifestItem) else None
        if path is not None and isinstance(record, ManifestItem):
            url = store.url(media_container, local_media_blob_name(path))
            yield record.model_copy(update={"source": url})
        else:
            yield record


def manifest_location(manifest: str, settings: ControllerSettings) -> tuple[str, str]:
    """(container, blob name) of a manifest given as 'container/name', 'name' or a blob URL."""
    if manifest.startswith(("https://", "http://")):
        prefix = settings.blob_url + "/"
        if not manifest.startswith(prefix):
            raise ValueError(f"manifest URL {manifest!r} is not in this app's storage account")
        manifest = manifest[len(prefix) :]
    container, _, name = manifest.partition("/")
    if not name:
        return settings.manifests_container, container
    return container, name


CLAIM_NAME = "claim.json"


class RunIdTakenError(ValueError):
    """A run id that another run already holds in this storage (bad input: pick another)."""


def check_run_id_free(services: Services, run_id: str) -> None:
    """RunIdTakenError when ``run_id`` is claimed in this storage already.

    For starters that can refuse before any orchestration begins (the local session); the
    orchestrator's own claim (``claim_run_id``) is what protects a run wherever it starts.
    """
    if services.store.exists(services.settings.runs_container, f"{run_id}/{CLAIM_NAME}"):
        raise RunIdTakenError(
            f"run id {run_id} already belongs to another run in this storage "
            f"({services.settings.blob_url}); choose another --run-id"
        )


def claim_run_id(services: Services, request: RunRequest) -> bool:
    """Claim the run id in storage for this run; False when another run holds it.

    The claim is written only if absent, with what the orchestrator put in the request (the
    run's start): a retried activity finds its own claim and goes on, a second run under the
    same id finds another's and is refused before it writes a chunk, a message or a record.
    """
    if request.claim is None:
        return True
    runs, name = services.settings.runs_container, f"{request.run_id}/{CLAIM_NAME}"
    try:
        services.store.upload_bytes(runs, name, request.claim, overwrite=False)
    except ResourceExistsError:
        return services.store.download_bytes(runs, name).decode("utf-8") == request.claim
    return True


def validate_manifest(services: Services, request: RunRequest) -> ManifestSummary:
    settings = services.settings
    store = services.store
    if not claim_run_id(services, request):
        return ManifestSummary(
            run_id=request.run_id,
            manifest=request.manifest,
            rows=0,
            valid=0,
            invalid=0,
            chunk_count=0,
            run_id_taken=True,
            fatal=(
                f"run id {request.run_id} already belongs to another run in this storage; "
                "start this one with a new run id (nothing was changed)"
            ),
        )
    container, name = manifest_location(request.manifest, settings)
    summary = validate_manifest_to_blobs(
        store,
        run_id=request.run_id,
        manifest_name=name,
        container=container,
        policy=source_policy(settings, store),
        chunk_size=settings.chunk_size,
        transform=lambda records: _local_sources_to_blobs(records, store, settings.media_container),
        segment_s=request.options.segment_seconds,
    )
    if request.options.skip_existing and summary.valid and not summary.fatal:
        summary = summary.model_copy(update={"skipped": _skip_existing(services, request, summary)})
    return summary


def _skip_existing(services: Services, request: RunRequest, summary: ManifestSummary) -> int:
    """Record as skipped the items an earlier run did already and take them out of their
    chunks, so they are never enqueued. Idempotent: a retried validation writes the same
    chunks again and finds the same records."""
    from batchctl.outputs_index import fingerprint
    from batchctl.skipping import skipped_results

    task_fingerprint = fingerprint(request.options.task_settings(), request.options.image)
    skipped = 0
    for chunk in summary.chunks:
        items = read_chunk(services.store, chunk)
        done = list(skipped_results(services, request.run_id, items, task_fingerprint))
        if not done:
            continue
        services.ledger.record_absent(done)
        ids = {result.item_id for result in done}
        kept = "".join(item.model_dump_json() + "\n" for item in items if item.item_id not in ids)
        services.store.upload_bytes(services.settings.runs_container, chunk, kept)
        skipped += len(done)
    if skipped:
        log.info("%d items skipped: their outputs exist from earlier runs", skipped)
    return skipped


# -- queues ----------------------------------------------------------------------------------
def create_run_queues(services: Services, run_id: str) -> None:
    services.queues(run_id).create()


def enqueue_chunk(services: Services, task: ChunkTask) -> int:
    """Enqueue one chunk's items as mini-batch messages; a chunk already enqueued is skipped.

    A retry after a partial send re-sends the whole chunk: the duplicates are harmless
    because workers skip items that already have a terminal record (at-least-once delivery).
    """
    settings = services.settings
    store = services.store
    marker = enqueued_marker(task.run_id, task.chunk)
    if store.exists(settings.runs_container, marker):
        return 0
    items = read_chunk(store, task.chunk)
    sizer = MessageSizer.for_run(task.run_id)
    messages = (
        WorkItem(run_id=task.run_id, items=batch).model_dump_json()
        for batch in mini_batches(items, task.options.items_per_message, sizer)
    )
    stats = services.queues(task.run_id).enqueue_many(messages)
    store.upload_bytes(settings.runs_container, marker, str(stats.sent))
    return stats.sent


# -- compute -------------------------------------------------------------------------------
def enqueue_wave(services: Services, task: WaveTask) -> int:
    """Enqueue a wave of chunks, one after another (each skipped when already enqueued)."""
    return sum(
        enqueue_chunk(
            services,
            ChunkTask(
                run_id=task.run_id,
                chunk=chunk_blob_name(task.run_id, index),
                options=task.options,
            ),
        )
        for index in range(task.first, task.first + task.count)
    )


def plan_run(services: Services, state: RunState) -> RunPlan:
    assert state.summary is not None
    options = state.request.options
    messages = math.ceil(state.summary.valid / options.items_per_message)
    return services.backend.plan(state.run_id, messages, options, media=state.summary.media)


def provision_compute(services: Services, state: RunState) -> None:
    assert state.plan is not None
    backend = services.backend
    backend.ensure_clusters(state.run_id, state.plan)
    backend.submit_jobs(state.run_id, state.plan, state.request.options)


def submit_jobs(services: Services, state: RunState) -> None:
    assert state.plan is not None
    services.backend.submit_jobs(state.run_id, state.plan, state.request.options)


def get_progress(services: Services, run_id: str) -> ProgressSnapshot:
    counts = services.ledger.counts(run_id)
    return ProgressSnapshot(
        run_id=run_id,
        succeeded=counts.succeeded,
        failed=counts.failed,
        skipped=counts.skipped,
        queued_messages=services.queues(run_id).approximate_count(),
        jobs=JobCounts.model_validate(services.backend.job_states(run_id)),
        cancel_requested=cancel_requested(services, run_id),
        work_refused=first_refusal(services.store, services.settings.outputs_container, run_id),
    )


def request_cancel(services: Services, run_id: str) -> None:
    """Set the run's durable cancel flag. Idempotent.

    The cancel event can be lost (Durable discards events raised while an orchestration
    continues as new); the flag cannot, and every poll reads it.
    """
    services.store.upload_bytes(
        services.settings.runs_container,
        cancel_flag_blob_name(run_id),
        datetime.now(UTC).isoformat(),
        overwrite=True,
    )


def cancel_requested(services: Services, run_id: str) -> bool:
    return services.store.exists(services.settings.runs_container, cancel_flag_blob_name(run_id))


def record_unfinished(services: Services, state: RunState, reason: NotRunReason) -> int:
    """A not_run record, saying why, for every valid item of the run without a record.

    Runs after teardown, so no worker of the run is still meant to be writing; one that
    still is (a node slow to stop) loses to these records, because the first record wins.
    Idempotent: a retry finds the records it wrote and writes only what is still missing.
    Returns how many records were written.
    """
    summary = state.summary
    if summary is None or not summary.chunks:
        return 0
    ledger = services.ledger
    recorded = ledger.recorded_ids(state.run_id)
    finished_at = datetime.now(UTC)
    message = NOT_RUN_MESSAGES[reason]

    def missing() -> Iterator[ItemResult]:
        for chunk in summary.chunks:
            for item in read_chunk(services.store, chunk):
                if item.item_id in recorded:
                    continue
                recorded.add(item.item_id)  # a chunk never repeats an id, but be exact
                yield ItemResult(
                    run_id=state.run_id,
                    item_id=item.item_id,
                    status=ItemStatus.NOT_RUN,
                    source=item.source,
                    error=ItemError(
                        error_class=reason.value, message=message, permanent=False, attempts=1
                    ),
                    node="controller",
                    finished_at=finished_at,
                )

    written = ledger.record_absent(missing())
    if written:
        log.info("%d items recorded as not run (%s)", written, reason.value)
    return written


FINALIZED_NAME = "finalized"


def finalize_terminated(services: Services, run_id: str, last_input: Any) -> bool:
    """Close a run that Durable's terminate API ended without our teardown. Idempotent.

    Deletes the run's compute and queues, records its unfinished items as not run
    (``RunTerminated``) and writes its report, then leaves a marker so the next sweep skips
    it. ``last_input`` is the orchestration's input as Durable keeps it (the RunState of its
    last generation); without a readable one only the teardown is done. True when it acted.
    """
    settings = services.settings
    marker = f"{run_id}/{FINALIZED_NAME}"
    if services.store.exists(settings.runs_container, marker):
        return False
    teardown(services, run_id)
    try:
        payload = json.loads(last_input) if isinstance(last_input, str) else last_input
        state: RunState | None = RunState.model_validate(payload)
    except ValueError:
        state = None
    if state is not None:
        record_unfinished(services, state, NotRunReason.TERMINATED)
        write_report(
            services,
            state,
            RunPhase.CANCELLED,
            "terminated through Durable's terminate API; the sweeper tore the run down "
            "(use POST /api/runs/{id}/cancel or `batchctl cancel` to stop a run cleanly)",
            datetime.now(UTC),
        )
    services.store.upload_bytes(settings.runs_container, marker, datetime.now(UTC).isoformat())
    return True


NOT_RUN_MESSAGES: dict[NotRunReason, str] = {
    NotRunReason.CANCELLED: "the run was cancelled before this item had a result",
    NotRunReason.DEADLINE: "the run reached its deadline before this item had a result",
    NotRunReason.OVER_BUDGET: (
        "the run stopped over its error budget before this item had a result"
    ),
    NotRunReason.STALLED: "the run stalled (no progress) before this item had a result",
    NotRunReason.FAILED: "the run failed before this item had a result",
    NotRunReason.TERMINATED: (
        "the run's orchestration was terminated before this item had a result"
    ),
}


def teardown(services: Services, run_id: str) -> None:
    """Delete what this run created: its jobs, its clusters, its queue. Idempotent."""
    backend = services.backend
    backend.cancel_jobs(run_id)
    backend.delete_clusters(run_id)
    services.queues(run_id).delete()


# -- merged output --------------------------------------------------------------------------
def merge_outputs(services: Services, run_id: str) -> MergeSummary:
    """Merge the run's succeeded items' features into one Parquet dataset. Idempotent."""
    # Imported here: pyarrow and numpy come with the [app] extra, not the core library.
    from batchctl.merge import merge_run_outputs

    settings = services.settings
    return merge_run_outputs(
        services.store,
        services.ledger,
        run_id,
        container=settings.outputs_container,
        metadata_keys=manifest_metadata_keys(services, run_id),
    )


def manifest_metadata_keys(services: Services, run_id: str) -> tuple[str, ...] | None:
    """The manifest's metadata columns, from the first item of the run's first chunk.

    Every row of a CSV manifest has the same columns, so one item tells them all; the merged
    dataset's columns then do not depend on which item happens to be merged first (it may
    have lost its metadata.json). None when the run has no chunk to read.
    """
    try:
        items = read_chunk(services.store, chunk_blob_name(run_id, 0))
    except ResourceNotFoundError:
        return None
    return tuple(sorted(items[0].metadata)) if items else None


# -- report ---------------------------------------------------------------------------------
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


RECORDS_NAME = "records.jsonl"
OUTPUTS_DIR_NAME = "outputs"

# Threads that download a run's outputs at once. A download is a round trip or two plus
# about 2 ms of SDK work under the GIL, so threads help as far as the network makes the
# sequential copy wait: against Azure (a few to tens of ms a request) 16 in flight keep one
# core busy; against a local Azurite the process is CPU-bound already, and more threads
# only contend for the GIL (bench/copyout.py: 8, 16 and 32 within noise of each other on
# Azurite, 16 best with 10 ms a request). Each thread has a client of its own
# (_ThreadStores), so the bound is not tied to azure-core's connection pool.
COPY_THREADS = 16
# Downloads handed to the pool ahead of those finished, per thread: enough that no thread
# waits for the next name, few enough that a million-file run never holds a million futures.
IN_FLIGHT_PER_THREAD = 4
# A copy-out that lasts longer than this prints where it is, then again every PROGRESS_EVERY_S.
PROGRESS_AFTER_S = 5.0
PROGRESS_EVERY_S = 5.0


class RunCopyError(RuntimeError):
    """A finished run's results could not all be copied out: storage kept failing for
    longer than the copy-out's retry policy waits, or the local folder refused a file.

    The message is one line naming the run, what could not be copied and where the results
    still are; nothing already copied is partial (every file is written whole or not at all).
    """


class CopyProgress:
    """Progress lines of a long copy of a run's outputs, on ``stream`` (default stderr).

    Nothing is printed for a copy shorter than ``after_s``: most runs copy out in a moment
    and a line would only be noise. Past it, a line every ``every_s`` (``copying outputs of
    run R: 12,000 of 50,000 files (800/s)``), and a closing line once the copy ends, so a
    person watching a 6-minute copy knows it moves and when it will end. ``before_first``
    runs once before the first line (the commands stop their live panel there, which would
    otherwise redraw over the lines). The clock is injectable for tests.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        after_s: float = PROGRESS_AFTER_S,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        before_first: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self.after_s = after_s
        self.every_s = every_s
        self._clock = clock
        self._before_first = before_first
        self._run_id = ""
        self._total = 0
        self._started = 0.0
        self._last_line: float | None = None

    def start(self, run_id: str, total: int) -> None:
        self._run_id, self._total = run_id, total
        self._started = self._clock()
        self._last_line = None

    def advance(self, done: int) -> None:
        """``done`` files of the total are copied: print a line when one is due."""
        now = self._clock()
        if now - self._started < self.after_s:
            return
        if self._last_line is not None and now - self._last_line < self.every_s:
            return
        self._last_line = now
        self._say(
            f"copying outputs of run {self._run_id}: {done:,} of {self._total:,} files "
            f"({self._rate(done, now)})"
        )

    def end(self, done: int) -> None:
        """The copy ended with ``done`` files copied: a closing line if any line was shown."""
        if self._last_line is None:
            return
        now = self._clock()
        self._say(
            f"copied outputs of run {self._run_id}: {done:,} of {self._total:,} files in "
            f"{now - self._started:.0f} s ({self._rate(done, now)})"
        )

    def _rate(self, done: int, now: float) -> str:
        elapsed = now - self._started
        return f"{done / elapsed:,.0f}/s" if elapsed > 0 else "-/s"

    def _say(self, line: str) -> None:
        if self._before_first is not None:
            before, self._before_first = self._before_first, None
            before()
        # Looked up at each line, not at construction: a test or a caller may swap stderr.
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


def outputs_location(settings: ControllerSettings, run_id: str) -> str:
    """Where a run's outputs are in storage: the URL of their prefix (container/RUN_ID/)."""
    return f"{settings.blob_url}/{settings.outputs_container}/{run_id}/"


def copy_run_out(
    services: Services,
    run_id: str,
    run_dir: Path,
    *,
    copy_outputs: bool = True,
    progress: CopyProgress | None = None,
    threads: int = COPY_THREADS,
) -> tuple[Path, Path]:
    """Local mode: copy the report (report.json and report.html), the manifest errors and
    the outputs to a local folder (Azurite keeps everything in memory and forgets it when the
    run ends), with ``records.jsonl``: one terminal record per item, what ``batchctl retry``
    reads. Returns report.json's path and the outputs folder.

    The outputs are downloaded by ``threads`` threads at once, with a progress line on
    stderr when the copy is long (``progress``: see :class:`CopyProgress`). Without
    ``copy_outputs`` they stay in storage (:func:`outputs_location`) and the outputs folder
    returned is not created; everything else is copied, and index.csv names the outputs'
    folders in storage, not under ``run_dir``.

    The run is over and its results are only in storage, so this waits out storage trouble
    longer than other calls do (the ``copy_out`` role of :mod:`batchctl.storage.retry`).
    Every file appears whole or not at all (written beside its name, then renamed), so a copy
    cut short never leaves an empty records.jsonl or a truncated output. Storage errors that
    outlast the retries, and a folder that refuses a file, are :class:`RunCopyError`; the
    first output that fails stops the copy (the downloads under way end first).
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    settings = services.settings
    run_dir.mkdir(parents=True, exist_ok=True)
    # Clients of their own: a longer retry policy than the session's, for this copy only.
    store = BlobStore(settings, role="copy_out")
    ledger = Ledger(settings, role="copy_out")
    copier = _RunCopier(settings, run_id, run_dir)
    try:
        with bound(run_id=run_id):
            report_path = _copy_run_files(copier, store, ledger, localize=copy_outputs)
            output_dir = run_dir / OUTPUTS_DIR_NAME
            if copy_outputs:
                _copy_outputs(copier, store, output_dir, threads, progress or CopyProgress())
            return report_path, output_dir
    finally:
        store.close()
        ledger.close()


def _copy_run_files(
    copier: _RunCopier, store: BlobStore, ledger: Ledger, *, localize: bool
) -> Path:
    """Everything of a run but its outputs; returns report.json's path. ``localize``: the
    outputs are copied too, so index.csv names their folders under the copy."""
    settings, run_id, run_dir = copier.settings, copier.run_id, copier.run_dir
    runs = settings.runs_container
    with copier.copying(RECORDS_NAME, "table"), atomic_file(run_dir / RECORDS_NAME) as records:
        for result in ledger.iter_results(run_id):
            records.write((result.model_dump_json() + "\n").encode("utf-8"))
    report_path = run_dir / REPORT_NAME
    with copier.copying(REPORT_NAME, "blob"):
        store.download_to_file(runs, report_blob_name(run_id), report_path)
    # Beside report.json (so callers find it as report_path.with_name(REPORT_HTML_NAME));
    # absent only where matplotlib was not installed when the report was written.
    optional = (
        (report_html_blob_name(run_id), REPORT_HTML_NAME),
        (errors_blob_name(run_id), MANIFEST_ERRORS_NAME),
        # failed.csv as written (ready for a retry).
        (failed_csv_blob_name(run_id), FAILED_CSV_NAME),
    )
    for blob, local_name in optional:
        with copier.copying(local_name, "blob"):
            if store.exists(runs, blob):
                store.download_to_file(runs, blob, run_dir / local_name)
    # index.csv with its folders under this copy; as written (folders in storage) when the
    # outputs stay there.
    index = index_csv_blob_name(run_id)
    with copier.copying(INDEX_CSV_NAME, "blob"):
        if store.exists(runs, index):
            lines: Iterable[str] = io.StringIO(store.download_bytes(runs, index).decode("utf-8"))
            if localize:
                storage_prefix = f"{settings.outputs_container}/{run_id}/"
                lines = localize_index(lines, storage_prefix, f"{OUTPUTS_DIR_NAME}/")
            with atomic_file(run_dir / INDEX_CSV_NAME) as handle:
                for line in lines:
                    handle.write(line.encode("utf-8"))
    return report_path


def _copy_outputs(
    copier: _RunCopier, store: BlobStore, output_dir: Path, threads: int, progress: CopyProgress
) -> None:
    """Download every output of the run into ``output_dir``, ``threads`` at a time.

    The pool is fed from the list of names as downloads finish (at most ``threads`` x
    IN_FLIGHT_PER_THREAD handed over at once), so memory holds the names and a bounded
    window of futures, whatever the run's size. The first failure stops the feed: the files
    not started are dropped, those being written end whole or leave nothing (atomic_file).
    """
    settings, run_id = copier.settings, copier.run_id
    container = settings.outputs_container
    output_dir.mkdir(exist_ok=True)
    prefix = f"{run_id}/"
    with copier.copying("the list of outputs", "blob"):
        names = store.list_names(container, prefix)
    progress.start(run_id, len(names))
    stores = _ThreadStores(settings)

    def copy_one(name: str) -> None:
        relative = name[len(prefix) :]
        with copier.copying(f"output {relative}", "blob"):
            stores.get().download_to_file(container, name, output_dir / relative)

    window = threads * IN_FLIGHT_PER_THREAD
    pending: set[Future[None]] = set()
    done = 0
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"copy-out-{run_id}")
    try:
        for name in names:
            while len(pending) >= window:
                done += _settle(pending, progress, done)
            # Each download in a copy of this context: storage fault lines name the run
            # (batchctl.logs.bound), as the sequential copy's did.
            pending.add(pool.submit(contextvars.copy_context().run, copy_one, name))
        while pending:
            done += _settle(pending, progress, done)
    finally:
        # On a failure or Ctrl-C: drop what has not started, let what has end (whole).
        pool.shutdown(wait=True, cancel_futures=True)
        stores.close()
    progress.end(done)


def _settle(pending: set[Future[None]], progress: CopyProgress, done: int) -> int:
    """Wait for some of ``pending`` to end (or for the next progress line to be due), raise
    the first failure among them, remove them from ``pending``; returns how many ended."""
    # The timeout lets a line appear while nothing finishes (a throttling spell), so a
    # stalled copy says so instead of going quiet.
    finished, _ = wait(pending, timeout=progress.every_s, return_when=FIRST_COMPLETED)
    pending.difference_update(finished)
    for future in finished:
        future.result()  # a RunCopyError from copy_one
    progress.advance(done + len(finished))
    return len(finished)


class _ThreadStores:
    """A BlobStore of the copy-out's role for each thread that asks, closed together.

    One store per thread, not one shared: clients.py gives each client azure-core's
    RequestsTransport with a requests session of its own, whose HTTPAdapter pools 10
    connections a host (requests' DEFAULT_POOLSIZE, pool_block False). Sixteen threads on
    one client would open connections past the tenth and urllib3 would close each one after
    its request ("Connection pool is full, discarding connection" warnings, a new TCP
    handshake per download). A store per thread keeps one live connection each, through the
    one factory, and leaves no session shared between threads.
    """

    def __init__(self, settings: ControllerSettings) -> None:
        self._settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._stores: list[BlobStore] = []

    def get(self) -> BlobStore:
        store: BlobStore | None = getattr(self._local, "store", None)
        if store is None:
            store = BlobStore(self._settings, role="copy_out")
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()


class _RunCopier:
    """Turns what goes wrong while copying one piece of a run into a :class:`RunCopyError`."""

    def __init__(self, settings: ControllerSettings, run_id: str, run_dir: Path) -> None:
        self.settings = settings
        self.run_id = run_id
        self.run_dir = run_dir

    @contextlib.contextmanager
    def copying(self, what: str, package: Package) -> Iterator[None]:
        try:
            yield
        except AzureError as error:
            status = getattr(error, "status_code", None)
            retried = status is None or is_retryable_status(status)
            waited = retry_bounds(package, "copy_out").budget_s
            raise RunCopyError(
                self._line(
                    f"could not copy {what} out of storage: {describe_storage_error(error)}"
                    + (f" (still failing after {waited:g} s of retries)" if retried else "")
                )
            ) from error
        except OSError as error:
            raise RunCopyError(
                self._line(f"could not write {what} into {self.run_dir}: {error}")
            ) from error

    def _line(self, problem: str) -> str:
        account = self.settings.blob_url
        where = (
            f"{account}/{self.settings.runs_container}/{self.run_id}/ and "
            f"{account}/{self.settings.outputs_container}/{self.run_id}/"
        )
        line = f"run {self.run_id}: {problem}; the run's results stay in storage ({where})"
        return " ".join(line.split())
