"""Ending a run: its compute torn down, its unfinished items recorded as not run."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    NotRunReason,
    RunPhase,
    RunState,
)
from batchctl.controller.names import FINALIZED_NAME
from batchctl.controller.report import write_report
from batchctl.manifest import (
    read_chunk,
)
from batchctl.services import Services

log = logging.getLogger(__name__)

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


# -- names ----------------------------------------------------------------------------------


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


def teardown(services: Services, run_id: str) -> None:
    """Delete what this run created: its jobs, its clusters, its queue. Idempotent."""
    backend = services.backend
    backend.cancel_jobs(run_id)
    backend.delete_clusters(run_id)
    services.queues(run_id).delete()
