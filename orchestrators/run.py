"""The run, as the business process reads: validate, enqueue, plan, provision, monitor, teardown.

Replay rules (Durable Functions re-runs this generator from the top on every wake-up):
time only from ``context.current_utc_datetime``, no I/O, no settings, no randomness, and only
small things in history (chunk names, counts), never items. The monitor loop restarts itself
with ``continue_as_new`` every :data:`POLLS_PER_GENERATION` polls so history stays bounded
however long the run is. Teardown runs on every terminal path, exceptions included; the
optional merge of the outputs follows a completed run's teardown and never fails the run.

Cancel is never lost. Each generation creates exactly one ``wait_for_external_event`` task,
first thing, and every activity is awaited together with it (``task_any``), so an event
raised at any moment of the generation (while an activity runs, during the timer) is seen
after that activity ends. One wait per generation matters: the Durable SDK completes the
LAST wait created for an event name, so a wait left over from an earlier loop pass would
swallow the event. An event raised between generations is discarded by ``continue_as_new``;
the cancel API also writes a durable flag in storage, read at the start of every enqueue
generation, before planning, before provisioning and at every poll (``get_progress``), so
such a cancel still wins before the fleet is created. A cancelled activity is still awaited
to its end before teardown (teardown must see the clusters that provisioning was creating).

A fleet whose nodes do not come is moved as ``--fallback`` says (``move_fleet``: dedicated
VMs within a cost cap, or other VM sizes); the next generation starts from the new plan, and
its polls ask for the new fleet's clusters only.

Every run ends with an exact ledger: when the run ends with items left (cancel, deadline,
error budget, stall, failure), ``record_unfinished`` writes a ``not_run`` record, with the
reason, for every valid item that has none, after teardown. The end of a run is bounded per
group of ledger shards, not per item: the not-run records and the report's statistics are
gathered by one activity per group, side by side, and the report step merges the groups'
parts; a run never ends without a report (see ``_finish``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from datetime import datetime, timedelta
from typing import Any

import azure.durable_functions as df

from batchctl.activity_names import CANCEL_EVENT, Activity
from batchctl.contracts import (
    DataAssetRegistration,
    FleetMoveOutcome,
    FleetMoveTask,
    ManifestSummary,
    MergeSummary,
    NotRunReason,
    ProgressSnapshot,
    RunPhase,
    RunPlan,
    RunProgress,
    RunReport,
    RunState,
    WaveTask,
)
from batchctl.packing import items_per_message
from batchctl.progress import (
    StallClock,
    Verdict,
    advance_stall_clock,
    cap_message,
    decide,
    poll_wait_s,
    progress_view,
)

POLLS_PER_GENERATION = 50
# Enqueueing: one activity per wave of chunks, at most this many waves per generation, then
# continue_as_new. A 1M-item run (500 chunks of 2,000) is 5 generations of 10 waves, and
# each replay reads one short history instead of 500 completions in one.
CHUNKS_PER_WAVE = 10
WAVES_PER_GENERATION = 10

# Idempotent activities are retried; these figures are the Durable RetryOptions' fields.
RETRY_FIRST_INTERVAL_MS = 5_000
RETRY_MAX_ATTEMPTS = 4

Orchestration = Generator[Any, Any, Any]
Counts = tuple[int, int]  # (succeeded, failed) as last seen by the monitor
CANCELLED_MESSAGE = "cancelled on request"


class CancelRequestedError(Exception):
    """Raised inside the generator when the generation's cancel wait has completed.

    Its arguments are the run's state as teardown and the report must see it (the fleet a
    fallback moved to included) and, from the monitor, the last counts it saw."""


def retry_options() -> df.RetryOptions:
    return df.RetryOptions(RETRY_FIRST_INTERVAL_MS, RETRY_MAX_ATTEMPTS)


def stamp_start(state: RunState, started: datetime) -> RunState:
    """The run's start and its claim on its id in storage (the same in every replay).

    A starter that keeps the run's state outside Durable (a local run's folder) stamps the
    input itself, so that a resumed run holds the very claim its first start wrote."""
    claim = f"{state.run_id} started {started.isoformat()}"
    request = state.request.model_copy(update={"claim": claim})
    return state.model_copy(update={"started_at": started, "request": request})


def run_orchestrator(context: Any) -> Orchestration:
    """Entry point: one run from manifest to report, across ``continue_as_new`` generations."""
    state = RunState.model_validate(context.get_input())
    if state.started_at is None:
        state = stamp_start(state, context.current_utc_datetime)
    # The one cancel wait of this generation (see the module docstring).
    cancel = context.wait_for_external_event(CANCEL_EVENT)
    phase, message = RunPhase.FAILED, ""
    reason = NotRunReason.FAILED
    counts: Counts = (0, 0)
    try:
        if state.stage in ("start", "enqueue"):
            outcome = yield from _prepare(context, cancel, state)
            if isinstance(outcome, RunState):
                context.continue_as_new(outcome.model_dump(mode="json"))
                return None
            phase, message, state = outcome
            if state.summary is not None and state.summary.run_id_taken:
                # Another run's id: its compute, queue, ledger and report are not ours to
                # tear down, record or overwrite. The refusal is this run's only output.
                return _refused(context, state, message)
        else:
            outcome = yield from _monitor(context, cancel, state)
            if isinstance(outcome, RunState):
                context.continue_as_new(outcome.model_dump(mode="json"))
                return None
            phase, message, counts, reason = outcome
    except CancelRequestedError as cancelled:
        phase, message, reason = RunPhase.CANCELLED, CANCELLED_MESSAGE, NotRunReason.CANCELLED
        if cancelled.args and isinstance(cancelled.args[0], RunState):
            state = cancelled.args[0]
        if len(cancelled.args) > 1:
            counts = cancelled.args[1]
    except Exception as error:
        phase, message = RunPhase.FAILED, cap_message(f"{type(error).__name__}: {error}")
    report = yield from _finish(
        context, state, phase=phase, message=message, counts=counts, reason=reason
    )
    return report


def _await(
    context: Any,
    cancel: Any,
    task: Any,
    state: RunState,
    keep: Callable[[Any], RunState] | None = None,
) -> Orchestration:
    """``task``'s result, awaited together with the generation's cancel wait.

    A cancel that arrived before or while ``task`` ran raises :class:`CancelRequestedError`
    once ``task`` has ended (its error, if any, no longer matters: the run is being
    cancelled). The exception carries the state teardown and the ledger need: ``state``, or
    ``keep(result)`` when the task succeeded and its result must not be lost (the manifest's
    summary, which names the items to record as not run).
    """
    winner = yield context.task_any([task, cancel])
    if winner is task and not cancel.is_completed:
        # Yielded again (already complete, so no new action): its result, or its error raised.
        return (yield task)
    result, succeeded = None, False
    # The run is being cancelled: the task's own error no longer matters.
    with contextlib.suppress(Exception):
        result = yield task
        succeeded = True
    raise CancelRequestedError(keep(result) if keep is not None and succeeded else state)


def _prepare(context: Any, cancel: Any, state: RunState) -> Orchestration:
    """Validate the manifest, fill the queue in waves, plan and provision. Returns the next
    generation's state (more waves to enqueue, or the monitor's), or (phase, message, state)
    when the run ends here."""
    if state.stage == "start":
        outcome = yield from _validate(context, cancel, state)
        if not isinstance(outcome, RunState):
            return outcome
        state = outcome
    else:
        # A generation after continue_as_new: a cancel raised between generations was
        # discarded with its event; its flag was not.
        yield from _honour_cancel_flag(context, cancel, state)
    assert state.summary is not None
    retry = retry_options()
    chunks = state.summary.chunk_count
    _show(context, state, RunPhase.ENQUEUING, f"enqueuing {state.summary.valid} items")
    for _ in range(WAVES_PER_GENERATION):
        if state.next_chunk >= chunks:
            break
        count = min(CHUNKS_PER_WAVE, chunks - state.next_chunk)
        wave = WaveTask(
            run_id=state.run_id,
            first=state.next_chunk,
            count=count,
            options=state.request.options,
        )
        yield from _await(
            context,
            cancel,
            context.call_activity_with_retry(
                Activity.ENQUEUE_WAVE, retry, wave.model_dump(mode="json")
            ),
            state,
        )
        state = state.model_copy(update={"next_chunk": state.next_chunk + count})
    if state.next_chunk < chunks:
        return state.model_copy(update={"stage": "enqueue"})

    # Planning and provisioning start the fleet: the costliest step to take for a run
    # that is being cancelled, so the flag is read before each.
    yield from _honour_cancel_flag(context, cancel, state)
    _show(context, state, RunPhase.PLANNING, "planning the fleet")
    plan = RunPlan.model_validate(
        (
            yield from _await(
                context,
                cancel,
                context.call_activity(Activity.PLAN_RUN, state.model_dump(mode="json")),
                state,
            )
        )
    )
    state = state.model_copy(update={"plan": plan})

    yield from _honour_cancel_flag(context, cancel, state)
    _show(context, state, RunPhase.PROVISIONING, f"starting {plan.total_nodes} nodes")
    yield from _await(
        context,
        cancel,
        context.call_activity_with_retry(
            Activity.PROVISION_COMPUTE, retry, state.model_dump(mode="json")
        ),
        state,
    )
    return state.model_copy(update={"stage": "monitor"})


def _honour_cancel_flag(context: Any, cancel: Any, state: RunState) -> Orchestration:
    """Raise :class:`CancelRequestedError` when the run's durable cancel flag is set."""
    requested = yield from _await(
        context,
        cancel,
        context.call_activity_with_retry(Activity.CANCEL_REQUESTED, retry_options(), state.run_id),
        state,
    )
    if requested:
        raise CancelRequestedError(state)


def _refused(context: Any, state: RunState, message: str) -> Any:
    """The report of a run refused at its start, built here: no activity may touch what
    the run id's owner made."""
    now = context.current_utc_datetime
    report = RunReport(
        run_id=state.run_id,
        phase=RunPhase.FAILED,
        manifest=state.request.manifest,
        total=0,
        succeeded=0,
        failed=0,
        invalid=0,
        started_at=state.started_at or now,
        finished_at=now,
        output_prefix="",
        message=message,
    )
    context.set_custom_status(
        RunProgress(
            run_id=state.run_id,
            phase=RunPhase.FAILED,
            total=0,
            succeeded=0,
            failed=0,
            started_at=report.started_at,
            updated_at=now,
            message=message,
        ).model_dump(mode="json")
    )
    return report.model_dump(mode="json")


def _validate(context: Any, cancel: Any, state: RunState) -> Orchestration:
    """Validate the manifest and create the run's queue; returns the state to enqueue with
    (items per message decided), or (phase, message, state) when the run ends here."""
    retry = retry_options()
    _show(context, state, RunPhase.VALIDATING, "validating the manifest")
    summary = ManifestSummary.model_validate(
        (
            yield from _await(
                context,
                cancel,
                context.call_activity_with_retry(
                    Activity.VALIDATE_MANIFEST, retry, state.request.model_dump(mode="json")
                ),
                state,
                keep=lambda result: state.model_copy(
                    update={"summary": ManifestSummary.model_validate(result)}
                ),
            )
        )
    )
    state = state.model_copy(update={"summary": summary})
    if summary.fatal:
        return RunPhase.FAILED, cap_message(f"manifest unusable: {summary.fatal}"), state
    if summary.invalid and state.request.options.strict_manifest:
        message = (
            f"{summary.invalid} invalid manifest rows and strict mode is on; "
            f"see {summary.errors_blob}"
        )
        return RunPhase.FAILED, message, state
    if summary.valid == 0:
        return RunPhase.FAILED, "the manifest has no valid rows", state
    state = _with_packing(state, summary)
    yield from _await(
        context,
        cancel,
        context.call_activity_with_retry(Activity.CREATE_RUN_QUEUES, retry, state.run_id),
        state,
    )
    return state


def _with_packing(state: RunState, summary: ManifestSummary) -> RunState:
    """The run's items per message, decided once (pure, so replays decide the same) and
    kept in its options: every message, the plan and the nodes then agree. Packed for the
    nodes the run can really get (a local session's count), which validation recorded."""
    options = state.request.options
    if options.mini_batch_size is not None:
        return state
    size = items_per_message(summary.valid, summary.fleet_nodes or options.max_nodes)
    request = state.request.model_copy(
        update={"options": options.model_copy(update={"mini_batch_size": size})}
    )
    return state.model_copy(update={"request": request})


def _monitor(context: Any, cancel: Any, state: RunState) -> Orchestration:
    """Poll until a terminal verdict; returns (phase, message, last counts, not-run reason),
    or the state to continue as new."""
    assert state.summary is not None and state.started_at is not None
    retry = retry_options()
    total, invalid, started_at = state.summary.valid, state.summary.invalid, state.started_at
    options = state.request.options
    counts: Counts = (0, 0)
    # The last poll's time (this generation's: a new one assumes a whole interval before).
    polled_at: datetime | None = None
    for _ in range(POLLS_PER_GENERATION):
        done_before = state.last_done
        snapshot = ProgressSnapshot.model_validate(
            (
                yield from _await(
                    context,
                    cancel,
                    context.call_activity_with_retry(
                        Activity.GET_PROGRESS, retry, _poll_input(state)
                    ),
                    state,
                )
            )
        )
        now = context.current_utc_datetime
        clock = advance_stall_clock(
            StallClock(
                state.last_done,
                state.stall_since,
                state.resubmits,
                state.nodeless_since,
                state.fallbacks,
            ),
            snapshot,
            now,
        )
        state = state.model_copy(
            update={
                "last_done": clock.last_done,
                "stall_since": clock.stall_since,
                "resubmits": clock.resubmits,
                "nodeless_since": clock.nodeless_since,
            }
        )
        nodes_planned = state.plan.total_nodes if state.plan is not None else None
        decision = decide(
            snapshot,
            total=total,
            options=options,
            started_at=started_at,
            now=now,
            clock=clock,
            nodes_planned=nodes_planned,
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
                nodes_planned=nodes_planned,
            ).model_dump(mode="json")
        )
        counts = (snapshot.succeeded, snapshot.failed)
        if decision.terminal:
            return decision.phase, decision.message, counts, decision.not_run_reason
        if decision.verdict is Verdict.MOVE_FLEET:
            moved = yield from _move_fleet(context, cancel, state)
            if moved.plan is None:  # refused (over its cost cap): the run stops here
                message = cap_message(f"{decision.message}; {moved.message}")
                return RunPhase.FAILED, message, counts, NotRunReason.FAILED
            state = _moved(state, moved)
        if decision.verdict is Verdict.RESUBMIT:
            yield from _await(
                context,
                cancel,
                context.call_activity_with_retry(
                    Activity.SUBMIT_JOBS, retry, state.model_dump(mode="json")
                ),
                state,
            )
            state = state.model_copy(update={"resubmits": state.resubmits + 1})

        done = snapshot.done
        wait_s = poll_wait_s(
            options.poll_interval_s,
            remaining=total - done,
            finished_since_last_poll=done - done_before,
            since_last_poll_s=(
                options.poll_interval_s
                if polled_at is None
                else max(0.0, (now - polled_at).total_seconds())
            ),
            # The run's own rate, once this generation has waited at least once (before, the
            # clock since the start may not have moved: a replay's, or a resumed run's).
            done=0 if polled_at is None else done,
            elapsed_s=max(0.0, (now - started_at).total_seconds()),
            last_wave=(nodes_planned or 0) * options.items_per_message,
            quiet_s=(
                0.0
                if state.stall_since is None
                else max(0.0, (now - state.stall_since).total_seconds())
            ),
        )
        polled_at = now
        wake_at = now + timedelta(seconds=wait_s)
        if options.deadline_s is not None:
            # Wake at the deadline rather than a whole poll interval after it.
            deadline = started_at + timedelta(seconds=options.deadline_s)
            wake_at = min(wake_at, max(deadline, now))
        timer = context.create_timer(wake_at)
        winner = yield context.task_any([timer, cancel])
        if winner is not timer:
            timer.cancel()
            # With this generation's state: a fleet moved in this generation is the one
            # that teardown and the report must see.
            raise CancelRequestedError(state, counts)
        state = state.model_copy(update={"polls": state.polls + 1})
        if decision.verdict is Verdict.MOVE_FLEET:
            # The next generation starts from the new fleet's plan, so whatever reads the
            # run's state from here on (teardown, the report) sees the fleet that ran.
            return state
    return state


def _poll_input(state: RunState) -> Any:
    """What a poll is asked: the run id; once a fallback replaced the fleet, its clusters
    too (the first fleet's cancelled jobs are no longer the run's compute)."""
    if not state.fallbacks or state.plan is None:
        return state.run_id
    return {"run_id": state.run_id, "clusters": [c.name for c in state.plan.clusters]}


def _move_fleet(context: Any, cancel: Any, state: RunState) -> Orchestration:
    """``--fallback``'s next move: the new fleet's plan, or why there is none."""
    task = FleetMoveTask(run_id=state.run_id, state=state, move=state.fallbacks)
    return FleetMoveOutcome.model_validate(
        (
            yield from _await(
                context,
                cancel,
                context.call_activity_with_retry(
                    Activity.MOVE_FLEET, retry_options(), task.model_dump(mode="json")
                ),
                state,
                # A cancel during a move that succeeded: the new fleet is what ran.
                keep=lambda result: _moved(state, FleetMoveOutcome.model_validate(result)),
            )
        )
    )


def _moved(state: RunState, moved: FleetMoveOutcome) -> RunState:
    """The run's state once its fleet moved to ``moved``'s plan (as it was, when refused)."""
    if moved.plan is None:
        return state
    return state.model_copy(
        update={
            "plan": moved.plan,
            "fallbacks": state.fallbacks + 1,
            "nodeless_since": None,
            "resubmits": 0,
        }
    )


def _finish(
    context: Any,
    state: RunState,
    *,
    phase: RunPhase,
    message: str,
    counts: Counts,
    reason: NotRunReason,
) -> Orchestration:
    """Teardown (always, exactly once), not_run records for what the run left undone, the
    report's part of every group of ledger shards, the merged output if asked for, then the
    report. Each step is bounded by a group of shards, not by the run's items, and the
    groups' activities run side by side. Each step's end is stamped as it happens (the
    report's phase markers). A run never ends without a report: when the report step
    fails, a brief one with the ledger's counts says what is missing, and when even that
    fails, the run's output is a report built here."""
    retry = retry_options()
    _show(context, state, RunPhase.TEARING_DOWN, message, counts)
    try:
        yield context.call_activity_with_retry(Activity.TEARDOWN, retry, state.run_id)
    except Exception as error:
        phase = RunPhase.FAILED
        message = cap_message(
            f"{message}; teardown failed ({error}); the sweeper will delete leftovers"
        )
    marks: dict[str, str] = {"torn_down_at": context.current_utc_datetime.isoformat()}
    groups: list[list[int]] | None = None
    try:
        groups = yield context.call_activity_with_retry(
            Activity.END_SHARD_GROUPS, retry, state.run_id
        )
    except Exception as error:
        # write_report gathers every shard itself when no part was gathered before it.
        message = cap_message(f"{message}; the ledger's shards could not be listed ({error})")
    state_json = state.model_dump(mode="json")
    # Without the groups, one activity over the whole run (its shards: None).
    record_groups: list[list[int] | None] = list(groups) if groups is not None else [None]
    if phase is not RunPhase.COMPLETED and state.summary is not None and state.summary.valid:
        try:
            yield context.task_all(
                [
                    context.call_activity_with_retry(
                        Activity.RECORD_UNFINISHED,
                        retry,
                        {"state": state_json, "reason": reason.value, "shards": group},
                    )
                    for group in record_groups
                ]
            )
            marks["not_run_recorded_at"] = context.current_utc_datetime.isoformat()
        except Exception as error:
            message = cap_message(f"{message}; recording the items not run failed ({error})")
    finished_at = context.current_utc_datetime.isoformat()
    if groups:
        _show(context, state, RunPhase.TEARING_DOWN, "gathering the report", counts)
        # A group that fails leaves its shards to write_report, which gathers what is missing
        # (and says what it could not): nothing to note here.
        with contextlib.suppress(Exception):
            yield context.task_all(
                [
                    context.call_activity_with_retry(
                        Activity.ANALYSE_SHARDS,
                        retry,
                        {"state": state_json, "shards": group, "finished_at": finished_at},
                    )
                    for group in groups
                ]
            )
    if phase is RunPhase.COMPLETED and state.request.options.merges_outputs:
        message = yield from _merge(context, state, message, counts)
    ending = {"state": state_json, "phase": phase.value, "finished_at": finished_at}
    try:
        report_json = yield context.call_activity_with_retry(
            Activity.WRITE_REPORT, retry, {**ending, "message": message, "marks": marks}
        )
    except Exception as error:
        report_json = yield from _brief_report(
            context, state, ending, message=message, counts=counts, error=error
        )
    report = RunReport.model_validate(report_json)
    final = RunProgress(
        run_id=report.run_id,
        phase=report.phase,
        total=report.total,
        succeeded=report.succeeded,
        failed=report.failed,
        not_run=report.not_run,
        invalid=report.invalid,
        started_at=report.started_at,
        updated_at=report.finished_at,
        message=cap_message(report.message),
    )
    context.set_custom_status(final.model_dump(mode="json"))
    return report.model_dump(mode="json")


def _brief_report(
    context: Any,
    state: RunState,
    ending: dict[str, Any],
    *,
    message: str,
    counts: Counts,
    error: Exception,
) -> Orchestration:
    """The report when the report step failed: the brief one (the ledger's counts, written
    beside the run), or, when that fails too, one built here from the last counts seen."""
    problem = cap_message(str(error))
    try:
        return (
            yield context.call_activity_with_retry(
                Activity.WRITE_BRIEF_REPORT,
                retry_options(),
                {**ending, "message": message, "problem": problem},
            )
        )
    except Exception as second:
        summary = state.summary
        now = context.current_utc_datetime
        note = (
            f"no report could be written (the report step: {problem}; the brief report: "
            f"{second}); the counts are the last the run saw"
        )
        return RunReport(
            run_id=state.run_id,
            phase=RunPhase(ending["phase"]),
            manifest=state.request.manifest,
            total=summary.valid if summary else 0,
            succeeded=counts[0],
            failed=counts[1],
            invalid=summary.invalid if summary else 0,
            started_at=state.started_at or now,
            finished_at=now,
            plan=state.plan,
            output_prefix="",
            message=cap_message(f"{message}; {note}" if message else note),
        ).model_dump(mode="json")


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
        note = cap_message(
            f"merging the outputs failed ({error}); the per-item outputs are complete"
        )
    else:
        note = merge_note(merged)
        if state.request.options.register_output is not None:
            note = f"{note}; {(yield from _register(context, state, merged))}"
    return f"{message}; {note}" if message else note


def _register(context: Any, state: RunState, merged: MergeSummary) -> Orchestration:
    """The merged output as a data asset (``--register-output``); returns its note. Like the
    merge, optional and after the fact: a failure is noted, the run stays completed."""
    payload = {"state": state.model_dump(mode="json"), "merged": merged.model_dump(mode="json")}
    try:
        registration = DataAssetRegistration.model_validate(
            (
                yield context.call_activity_with_retry(
                    Activity.REGISTER_OUTPUT, retry_options(), payload
                )
            )
        )
    except Exception as error:
        return cap_message(f"registering the merged output as a data asset failed ({error})")
    return registration.note


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
    """The custom status between polls, in the one status shape (RunProgress); ``counts``
    are the last seen (succeeded, failed), so a status read during teardown or the merge
    does not fall back to zero done."""
    summary = state.summary
    progress = RunProgress(
        run_id=state.run_id,
        phase=phase,
        total=summary.valid if summary else 0,
        succeeded=counts[0],
        failed=counts[1],
        invalid=summary.invalid if summary else 0,
        started_at=state.started_at,
        updated_at=context.current_utc_datetime,
        message=cap_message(message),
    )
    context.set_custom_status(progress.model_dump(mode="json"))
