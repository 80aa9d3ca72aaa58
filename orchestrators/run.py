"""The run, as the business process reads: validate, enqueue, plan, provision, monitor, teardown.

Replay rules (Durable Functions re-runs this generator from the top on every wake-up):
time only from ``context.current_utc_datetime``, no I/O, no settings, no randomness, and only
small things in history (chunk names, counts), never items. The monitor loop restarts itself
with ``continue_as_new`` every :data:`POLLS_PER_GENERATION` polls so history stays bounded
however long the run is. Teardown runs on every terminal path, exceptions included; the
optional merge of the outputs follows a completed run's teardown and never fails the run.
"""

from __future__ import annotations

from collections.abc import Generator
from datetime import timedelta
from typing import Any

import azure.durable_functions as df

from batchctl.activity_names import CANCEL_EVENT, Activity
from batchctl.contracts import (
    ChunkTask,
    ManifestSummary,
    MergeSummary,
    ProgressSnapshot,
    RunPhase,
    RunPlan,
    RunReport,
    RunState,
)
from batchctl.progress import Verdict, decide, progress_view

POLLS_PER_GENERATION = 50

# Idempotent activities are retried; these figures are the Durable RetryOptions' fields.
RETRY_FIRST_INTERVAL_MS = 5_000
RETRY_MAX_ATTEMPTS = 4

Orchestration = Generator[Any, Any, Any]
Counts = tuple[int, int]  # (succeeded, failed) as last seen by the monitor


def retry_options() -> df.RetryOptions:
    return df.RetryOptions(RETRY_FIRST_INTERVAL_MS, RETRY_MAX_ATTEMPTS)


def run_orchestrator(context: Any) -> Orchestration:
    """Entry point: one run from manifest to report, across ``continue_as_new`` generations."""
    state = RunState.model_validate(context.get_input())
    if state.started_at is None:
        state = state.model_copy(update={"started_at": context.current_utc_datetime})
    phase, message = RunPhase.FAILED, ""
    counts: Counts = (0, 0)
    try:
        if state.stage == "start":
            outcome = yield from _prepare(context, state)
            if isinstance(outcome, RunState):
                context.continue_as_new(outcome.model_dump(mode="json"))
                return None
            phase, message = outcome
        else:
            outcome = yield from _monitor(context, state)
            if isinstance(outcome, RunState):
                context.continue_as_new(outcome.model_dump(mode="json"))
                return None
            phase, message, counts = outcome
    except Exception as error:
        phase, message = RunPhase.FAILED, f"{type(error).__name__}: {error}"[:2000]
    report = yield from _finish(context, state, phase, message, counts)
    return report


def _prepare(context: Any, state: RunState) -> Orchestration:
    """Validate the manifest, fill the queue, plan and provision. Returns the monitor state,
    or (phase, message) when the run ends here."""
    retry = retry_options()
    _show(context, state, RunPhase.VALIDATING, "validating the manifest")
    summary = ManifestSummary.model_validate(
        (
            yield context.call_activity_with_retry(
                Activity.VALIDATE_MANIFEST, retry, state.request.model_dump(mode="json")
            )
        )
    )
    state = state.model_copy(update={"summary": summary})
    if summary.fatal:
        return RunPhase.FAILED, f"manifest unusable: {summary.fatal}"
    if summary.invalid and state.request.options.strict_manifest:
        return RunPhase.FAILED, (
            f"{summary.invalid} invalid manifest rows and strict mode is on; "
            f"see {summary.errors_blob}"
        )
    if summary.valid == 0:
        return RunPhase.FAILED, "the manifest has no valid rows"

    _show(context, state, RunPhase.ENQUEUING, f"enqueuing {summary.valid} items")
    yield context.call_activity_with_retry(Activity.CREATE_RUN_QUEUES, retry, state.run_id)
    yield context.task_all(
        [
            context.call_activity_with_retry(
                Activity.ENQUEUE_CHUNK,
                retry,
                ChunkTask(
                    run_id=state.run_id, chunk=chunk, options=state.request.options
                ).model_dump(mode="json"),
            )
            for chunk in summary.chunks
        ]
    )

    _show(context, state, RunPhase.PLANNING, "planning the fleet")
    plan = RunPlan.model_validate(
        (yield context.call_activity(Activity.PLAN_RUN, state.model_dump(mode="json")))
    )
    state = state.model_copy(update={"plan": plan})

    _show(context, state, RunPhase.PROVISIONING, f"starting {plan.total_nodes} nodes")
    yield context.call_activity_with_retry(
        Activity.PROVISION_COMPUTE, retry, state.model_dump(mode="json")
    )
    return state.model_copy(update={"stage": "monitor"})


def _monitor(context: Any, state: RunState) -> Orchestration:
    """Poll until a terminal verdict; returns (phase, message, last counts), or the state to
    continue as new."""
    assert state.summary is not None and state.started_at is not None
    retry = retry_options()
    total, invalid, started_at = state.summary.valid, state.summary.invalid, state.started_at
    for _ in range(POLLS_PER_GENERATION):
        snapshot = ProgressSnapshot.model_validate(
            (yield context.call_activity_with_retry(Activity.GET_PROGRESS, retry, state.run_id))
        )
        now = context.current_utc_datetime
        decision = decide(
            snapshot,
            total=total,
            options=state.request.options,
            started_at=started_at,
            now=now,
            resubmits=state.resubmits,
        )
        context.set_custom_status(
            progress_view(
                snapshot,
                phase=RunPhase.RUNNING,
                total=total,
                invalid=invalid,
                started_at=started_at,
                now=now,
                message=decision.message,
            ).model_dump(mode="json")
        )
        counts = (snapshot.succeeded, snapshot.failed)
        if decision.terminal:
            return decision.phase, decision.message, counts
        if decision.verdict is Verdict.RESUBMIT:
            yield context.call_activity_with_retry(
                Activity.SUBMIT_JOBS, retry, state.model_dump(mode="json")
            )
            state = state.model_copy(update={"resubmits": state.resubmits + 1})

        wake_at = now + timedelta(seconds=state.request.options.poll_interval_s)
        if state.request.options.deadline_s is not None:
            # Wake at the deadline rather than a whole poll interval after it.
            deadline = started_at + timedelta(seconds=state.request.options.deadline_s)
            wake_at = min(wake_at, max(deadline, now))
        timer = context.create_timer(wake_at)
        cancel = context.wait_for_external_event(CANCEL_EVENT)
        winner = yield context.task_any([timer, cancel])
        if winner == cancel:
            timer.cancel()
            return RunPhase.CANCELLED, "cancelled on request", counts
        state = state.model_copy(update={"polls": state.polls + 1})
    return state


def _finish(
    context: Any, state: RunState, phase: RunPhase, message: str, counts: Counts
) -> Orchestration:
    """Teardown (always, exactly once), the merged output if asked for, then the report."""
    retry = retry_options()
    _show(context, state, RunPhase.TEARING_DOWN, message, counts)
    try:
        yield context.call_activity_with_retry(Activity.TEARDOWN, retry, state.run_id)
    except Exception as error:
        phase = RunPhase.FAILED
        message = f"{message}; teardown failed ({error}); the sweeper will delete leftovers"
    if phase is RunPhase.COMPLETED and state.request.options.merge_outputs:
        message = yield from _merge(context, state, message, counts)
    report = RunReport.model_validate(
        (
            yield context.call_activity_with_retry(
                Activity.WRITE_REPORT,
                retry,
                {
                    "state": state.model_dump(mode="json"),
                    "phase": phase.value,
                    "message": message,
                    "finished_at": context.current_utc_datetime.isoformat(),
                },
            )
        )
    )
    context.set_custom_status(
        {
            "run_id": report.run_id,
            "phase": report.phase.value,
            "total": report.total,
            "succeeded": report.succeeded,
            "failed": report.failed,
            "invalid": report.invalid,
            "message": report.message,
        }
    )
    return report.model_dump(mode="json")


def _merge(context: Any, state: RunState, message: str, counts: Counts) -> Orchestration:
    """The merged output, after the compute is gone; returns the report's message.

    Optional and after the fact: a failed merge leaves the run completed (the per-item
    outputs are all there) and is only noted in the report.
    """
    _show(context, state, RunPhase.MERGING, "merging the outputs into one Parquet dataset", counts)
    try:
        merged = MergeSummary.model_validate(
            (
                yield context.call_activity_with_retry(
                    Activity.MERGE_OUTPUTS, retry_options(), state.run_id
                )
            )
        )
    except Exception as error:
        note = f"merging the outputs failed ({error}); the per-item outputs are complete"
    else:
        note = merge_note(merged)
    return f"{message}; {note}" if message else note


def merge_note(merged: MergeSummary) -> str:
    """One line on the merged output for the report's message."""
    note = (
        f"merged {merged.items} items ({merged.rows} rows) into {merged.prefix} "
        f"({len(merged.parts)} parts)"
    )
    if merged.skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(merged.skipped_by_reason.items()))
        note += f"; {merged.skipped} items skipped ({reasons})"
    return note


def _show(
    context: Any, state: RunState, phase: RunPhase, message: str, counts: Counts = (0, 0)
) -> None:
    """The custom status between polls; ``counts`` are the last seen (succeeded, failed), so
    a status read during teardown or the merge does not fall back to zero done."""
    summary = state.summary
    context.set_custom_status(
        {
            "run_id": state.run_id,
            "phase": phase.value,
            "total": summary.valid if summary else 0,
            "succeeded": counts[0],
            "failed": counts[1],
            "invalid": summary.invalid if summary else 0,
            "message": message,
        }
    )
