"""Planning, provisioning and polling a run's compute (plan, provision, submit, progress),
and moving a fleet whose nodes do not come (``move_fleet``, as ``--fallback`` says)."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection

from batchctl.arrival import fallback_plan_note, moved_options, parse_fallback
from batchctl.compute.base import ComputeBackend, FleetView
from batchctl.contracts import (
    FleetMoveOutcome,
    FleetMoveTask,
    JobCounts,
    ProgressSnapshot,
    RunPlan,
    RunState,
)
from batchctl.controller.cancel import cancel_requested
from batchctl.planning import next_cluster_index, renumbered
from batchctl.progress import cap_message
from batchctl.refusals import first_refusal
from batchctl.services import Services

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


def plan_run(services: Services, state: RunState) -> RunPlan:
    assert state.summary is not None
    options = state.request.options
    messages = math.ceil(state.summary.valid / options.items_per_message)
    plan = services.backend.plan(state.run_id, messages, options, media=state.summary.media)
    if services.backend.kind == "local":  # this machine's nodes always come
        return plan
    # The plan states what the run does if its nodes do not come (and the cap of a move).
    return plan.model_copy(update={"notes": [*plan.notes, fallback_plan_note(options)]})


def move_fleet(backend: ComputeBackend, task: FleetMoveTask) -> FleetMoveOutcome:
    """Replace a fleet whose nodes do not come by ``--fallback``'s move ``task.move``.

    The new fleet is planned for the run's work with the moved VM size or tier and named
    after the old fleet's clusters; a move capped in cost is refused (no plan) when its
    plan costs more than the cap, or when the price it would be judged by is unknown.
    Otherwise the waiting jobs are cancelled and the new clusters and jobs started; the
    old clusters, empty, go at teardown with the rest of the run's tagged compute.
    """
    state = task.state
    assert state.plan is not None and state.summary is not None
    options = state.request.options
    fallback = parse_fallback(options.fallback)
    move = fallback.moves[task.move]
    moved = moved_options(options, move)
    what = move.describe(options.vm_size)
    messages = math.ceil(state.summary.valid / options.items_per_message)
    plan = backend.plan(state.run_id, messages, moved, media=state.summary.media)
    plan = renumbered(plan, next_cluster_index(state.plan))
    cap = fallback.max_cost_usd
    if cap is not None and plan.price_per_hour is None:
        return FleetMoveOutcome(
            run_id=state.run_id,
            message=f"not moving to {what}: its price is unknown here, so the --fallback cap "
            f"of ${cap:g} cannot be held",
        )
    if cap is not None and plan.est_cost > cap:
        return FleetMoveOutcome(
            run_id=state.run_id,
            message=f"not moving to {what}: its plan costs ${plan.est_cost:.2f}, over the "
            f"--fallback cap of ${cap:g}",
        )
    note = f"a fallback from {_fleet_words(state.plan)} whose nodes did not come"
    plan = plan.model_copy(update={"notes": [*plan.notes, note]})
    # The fleet it leaves, by name: a retried attempt must not cancel the jobs an attempt
    # before it may already have started on the new clusters.
    left = [cluster.name for cluster in state.plan.clusters] if state.plan is not None else None
    backend.cancel_jobs(state.run_id, left)
    backend.ensure_clusters(state.run_id, plan)
    backend.submit_jobs(state.run_id, plan, moved)
    cost = f", ${plan.est_cost:.2f} by its plan" if plan.price_per_hour is not None else ""
    return FleetMoveOutcome(
        run_id=state.run_id,
        plan=plan,
        message=f"moved the fleet to {what}: {plan.total_nodes} nodes{cost}",
    )


def _fleet_words(plan: RunPlan) -> str:
    kinds = sorted(
        {
            f"{'low-priority' if cluster.low_priority else 'dedicated'} {cluster.vm_size}"
            for cluster in plan.clusters
        }
    )
    return f"{plan.total_nodes} {' and '.join(kinds)} nodes"


def provision_compute(services: Services, state: RunState) -> None:
    assert state.plan is not None
    backend = services.backend
    backend.ensure_clusters(state.run_id, state.plan)
    backend.submit_jobs(state.run_id, state.plan, state.request.options)


def submit_jobs(services: Services, state: RunState) -> None:
    assert state.plan is not None
    services.backend.submit_jobs(state.run_id, state.plan, state.request.options)


def get_progress(
    services: Services, run_id: str, clusters: Collection[str] | None = None
) -> ProgressSnapshot:
    """One poll. ``clusters``: the current fleet's, once a fallback replaced the first
    (the jobs the run cancelled on the old clusters are no longer its fleet)."""
    counts = services.ledger.counts(run_id)
    return progress_snapshot(
        run_id,
        succeeded=counts.succeeded,
        failed=counts.failed,
        skipped=counts.skipped,
        queued_messages=services.queues(run_id).approximate_count(),
        fleet=services.backend.observe(run_id, clusters),
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
