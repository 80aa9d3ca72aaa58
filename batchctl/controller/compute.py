"""Planning, provisioning and polling a run's compute (plan, provision, submit, progress)."""

from __future__ import annotations

import logging
import math

from batchctl.contracts import (
    JobCounts,
    ProgressSnapshot,
    RunPlan,
    RunState,
)
from batchctl.controller.cancel import cancel_requested
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
