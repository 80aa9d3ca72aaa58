"""Planning, provisioning and polling a run's compute (plan, provision, submit, progress)."""

from __future__ import annotations

import logging
import math

from batchctl.compute.base import FleetView
from batchctl.contracts import (
    JobCounts,
    ProgressSnapshot,
    RunPlan,
    RunState,
)
from batchctl.controller.cancel import cancel_requested
from batchctl.progress import cap_message
from batchctl.refusals import first_refusal
from batchctl.services import Services

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


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
    return progress_snapshot(
        run_id,
        succeeded=counts.succeeded,
        failed=counts.failed,
        skipped=counts.skipped,
        queued_messages=services.queues(run_id).approximate_count(),
        fleet=services.backend.observe(run_id),
        cancel_requested=cancel_requested(services, run_id),
        work_refused=first_refusal(services.store, services.settings.outputs_container, run_id),
    )


def progress_snapshot(
    run_id: str,
    *,
    succeeded: int,
    failed: int,
    skipped: int,
    queued_messages: int,
    fleet: FleetView,
    cancel_requested: bool = False,
    work_refused: str | None = None,
) -> ProgressSnapshot:
    """One poll's snapshot from what storage and the compute said (the words capped to
    what the custom status may hold)."""
    return ProgressSnapshot(
        run_id=run_id,
        succeeded=succeeded,
        failed=failed,
        skipped=skipped,
        queued_messages=queued_messages,
        jobs=JobCounts.model_validate(fleet.jobs),
        cancel_requested=cancel_requested,
        work_refused=work_refused,
        fleet_note=cap_message(fleet.note) if fleet.note else None,
        job_error=cap_message(fleet.job_error) if fleet.job_error else None,
        start_failure=fleet.start_failure,
    )
