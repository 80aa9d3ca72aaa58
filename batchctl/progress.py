"""Pure policy of a running run: is it done, over budget, late, or stalled; what to show.

No I/O and no clock: the orchestrator passes ``now`` from ``context.current_utc_datetime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from batchctl.arrival import advance_nodeless_since, arrival_note, parse_fallback, waited_s
from batchctl.contracts import (
    NotRunReason,
    ProgressSnapshot,
    RunOptions,
    RunPhase,
    RunProgress,
)

# Resubmits in a row, with no item reaching a terminal record in between, before the run
# gives up: a preempted fleet comes back each time, so this many empty comebacks mean
# something other than preemption is wrong (the image crashes at start, say). The count
# resets whenever items complete, so a long run on a fleet preempted again and again never
# runs out of resubmits while it makes progress.
MAX_RESUBMITS = 5
# Added to the stall window: polls are this coarse and queue counts this approximate.
STALL_MARGIN_S = 60.0
# The worker's retry delays (5 s doubling, see node_image/worker/loop.py) stay under this
# for the attempts a run allows by default; it is an allowance, not the worker's policy.
RETRY_DELAY_ALLOWANCE_S = 30.0
# A fleet whose every job failed before any item of the run finished is resubmitted this
# many times before the run stops: a node that crashes at start crashes again.
MAX_START_RESUBMITS = 1
# Durable's custom status must stay under 16 KB or the orchestration fails; every message
# shown there is cut to this many characters (activity errors can be long).
MAX_STATUS_MESSAGE = 1000


class Verdict(StrEnum):
    CONTINUE = "continue"
    COMPLETE = "complete"
    CANCELLED = "cancelled"
    OVER_BUDGET = "over_budget"
    DEADLINE = "deadline"
    RESUBMIT = "resubmit"
    STALLED = "stalled"
    WORK_REFUSED = "work_refused"
    NO_NODES = "no_nodes"
    MOVE_FLEET = "move_fleet"
    START_FAILED = "start_failed"


# What a not_run record says when a verdict ends the run with items left.
NOT_RUN_REASONS: dict[Verdict, NotRunReason] = {
    Verdict.CANCELLED: NotRunReason.CANCELLED,
    Verdict.OVER_BUDGET: NotRunReason.OVER_BUDGET,
    Verdict.DEADLINE: NotRunReason.DEADLINE,
    Verdict.STALLED: NotRunReason.STALLED,
}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    message: str

    @property
    def terminal(self) -> bool:
        return self.verdict not in (Verdict.CONTINUE, Verdict.RESUBMIT, Verdict.MOVE_FLEET)

    @property
    def phase(self) -> RunPhase:
        """The run's final phase when this decision ends it."""
        if self.verdict is Verdict.COMPLETE:
            return RunPhase.COMPLETED
        if self.verdict is Verdict.CANCELLED:
            return RunPhase.CANCELLED
        return RunPhase.FAILED

    @property
    def not_run_reason(self) -> NotRunReason:
        return NOT_RUN_REASONS.get(self.verdict, NotRunReason.FAILED)


def stall_window_s(options: RunOptions) -> float:
    """How long no item may reach a terminal record, while a job runs, before the run stalls.

    Long enough that slow work is never mistaken for a stall: an item that hangs on every
    attempt reaches its terminal record only after ``max_attempts`` item timeouts and the
    retry delays between them, and a message whose node died comes back only after its
    visibility timeout.
    """
    per_attempt = options.item_timeout_s + RETRY_DELAY_ALLOWANCE_S
    return options.max_attempts * per_attempt + options.visibility_timeout_s + STALL_MARGIN_S


@dataclass(frozen=True)
class StallClock:
    """What the monitor carries between polls to judge stalls: progress and its time."""

    last_done: int
    stall_since: datetime | None
    resubmits: int
    # Since when jobs have waited for nodes with no node running (batchctl.arrival).
    nodeless_since: datetime | None = None
    # Moves of --fallback already taken (the next one is this index).
    fallbacks: int = 0


# Once the items left would finish within a poll interval, the run may end before the next
# full interval: the monitor polls this much sooner, so a run's end (and its teardown,
# report and the nodes' release) waits a fraction of an interval.
CLOSING_POLL_FRACTION = 0.25
# How many intervals without a finished item a closing run may stay quiet and still be
# polled sooner by its overall rate or its last wave.
QUIET_INTERVALS = 2


def poll_wait_s(
    interval_s: float,
    *,
    remaining: int,
    finished_since_last_poll: int,
    since_last_poll_s: float,
    done: int = 0,
    elapsed_s: float = 0.0,
    last_wave: int = 0,
    quiet_s: float = 0.0,
) -> float:
    """How long the monitor waits for its next poll (pure).

    Sooner once the run's end is near: the items left fit in an interval at either rate,
    the last poll's (``finished_since_last_poll`` items in ``since_last_poll_s``, whatever
    the last wait was: a closing poll finds fewer items done than a full interval would) or
    the run's (``done`` items in ``elapsed_s`` since it started); or they are no more than
    the ``last_wave``, a message for each planned node, which the nodes hold already.

    Records land a message at a time (its items in one transaction), so a poll may see
    nothing finish right before the last messages land: the run's rate, and the last wave,
    keep the next wait short then, for as long as the run has been ``quiet_s`` (nothing
    finished) no more than :data:`QUIET_INTERVALS` intervals: a tail that stalls (a node
    preempted) is the stall verdict's, polled at the full interval."""
    if remaining <= 0:
        return interval_s
    recently = (
        finished_since_last_poll > 0
        and remaining * since_last_poll_s <= finished_since_last_poll * interval_s
    )
    moving = quiet_s <= QUIET_INTERVALS * interval_s
    overall = moving and done > 0 and remaining * elapsed_s <= done * interval_s
    closing = recently or overall or (moving and remaining <= last_wave)
    return interval_s * CLOSING_POLL_FRACTION if closing else interval_s


def advance_stall_clock(
    previous: StallClock, snapshot: ProgressSnapshot, now: datetime
) -> StallClock:
    """The stall clock after a poll: reset by progress; it runs only while a job runs.

    Time counts towards a stall only while compute is available: a job that waits for nodes
    (queued) or a fleet that has ended is the resubmit policy's business, not a stall. A
    poll that saw no job at all knows nothing of compute (the AML backend reports none when
    ARM throttled its listing: AmlBackend.job_states), so it neither starts nor resets it.
    """
    done = snapshot.done
    progressed = done > previous.last_done
    running = snapshot.jobs.running > 0
    if not progressed and not snapshot.jobs.total:
        since = previous.stall_since
    else:
        since = None if progressed or not running else previous.stall_since or now
    return StallClock(
        last_done=max(done, previous.last_done),
        stall_since=since,
        resubmits=0 if progressed else previous.resubmits,
        nodeless_since=advance_nodeless_since(
            previous.nodeless_since,
            queued=snapshot.jobs.queued,
            nodes_running=snapshot.jobs.nodes_running,
            known=snapshot.jobs.total > 0,
            now=now,
        ),
        fallbacks=previous.fallbacks,
    )


def decide(
    snapshot: ProgressSnapshot,
    *,
    total: int,
    options: RunOptions,
    started_at: datetime,
    now: datetime,
    clock: StallClock,
    nodes_planned: int | None = None,
) -> Decision:
    """What the monitor does after a poll. Completion is exact: every item has a record.

    ``clock`` is the stall clock already advanced with this snapshot; ``nodes_planned`` the
    plan's node count (for the words of a wait for nodes). The checks run in order; the
    first that has something to say decides.
    """
    done = snapshot.done
    if done >= total:
        return Decision(Verdict.COMPLETE, f"all {total} items have a terminal record")
    left = total - done
    if snapshot.cancel_requested:
        return Decision(Verdict.CANCELLED, f"cancelled on request with {left} items left")
    if snapshot.work_refused:
        # Every item would fail the same way: stop now, with the node's reason.
        return Decision(
            Verdict.WORK_REFUSED,
            cap_message(f"the run's task could not start on {snapshot.work_refused}"),
        )
    return (
        _start_failed(snapshot, clock)
        or _over_budget(snapshot, options, total)
        or _past_deadline(options, started_at, now, left)
        or _fleet_lost(snapshot, clock, left)
        or _stalled(options, clock, now, left)
        or _no_nodes(
            snapshot, options, clock=clock, now=now, nodes_planned=nodes_planned, left=left
        )
        or Decision(Verdict.CONTINUE, _going(f"{done} of {total} items done", snapshot))
    )


def _going(message: str, snapshot: ProgressSnapshot) -> str:
    """A running run's message, with what the compute said this poll (why the jobs are
    unknown, a failed job's error) when it said something."""
    said = [text for text in (snapshot.fleet_note, snapshot.job_error) if text]
    return cap_message("; ".join([message, *said]))


def _start_failed(snapshot: ProgressSnapshot, clock: StallClock) -> Decision | None:
    """The nodes cannot start the run's image: stop now, with AML's words.

    A job whose error says the image cannot be pulled or its container cannot start, while
    no node runs and no item has finished, fails the same way on every node: resubmitting
    it five times would only spend the minutes that it takes. A fleet whose every job
    failed before the run finished any item, after ``MAX_START_RESUBMITS`` resubmits, is
    taken to crash at start as well.
    """
    jobs = snapshot.jobs
    # Only while nothing has started: one throttled pull among a thousand nodes at work (a
    # Basic registry's "toomanyrequests") is a node's trouble, left to the resubmit policy,
    # not a reason to end a healthy run.
    nothing_started = jobs.nodes_running == 0 and clock.last_done == 0
    if snapshot.start_failure and snapshot.job_error and nothing_started:
        return Decision(
            Verdict.START_FAILED,
            cap_message(f"the nodes cannot start the run's image: {snapshot.job_error}"),
        )
    crashed = jobs.total > 0 and jobs.failed == jobs.total and clock.last_done == 0
    # Only on the compute's own words: a job the compute says failed with an error (not a
    # worker killed from outside, which says nothing), and not a low-priority fleet
    # preempted before its first item.
    said = snapshot.job_error
    if not said or "preempt" in said.lower():
        return None
    if crashed and clock.resubmits >= MAX_START_RESUBMITS:
        return Decision(
            Verdict.START_FAILED,
            cap_message(
                f"every job failed before any item finished, {clock.resubmits + 1} times "
                f"in a row: {said}"
            ),
        )
    return None


def _no_nodes(
    snapshot: ProgressSnapshot,
    options: RunOptions,
    *,
    clock: StallClock,
    now: datetime,
    nodes_planned: int | None,
    left: int,
) -> Decision | None:
    """Jobs wait for nodes and none runs: say why, and stop once ``--fallback`` says so."""
    if clock.nodeless_since is None:
        return None
    waited = waited_s(clock.nodeless_since, now)
    note = arrival_note(
        nodes_running=snapshot.jobs.nodes_running,
        nodes_planned=nodes_planned,
        waited=waited,
        why=snapshot.fleet_note,
    )
    fallback = parse_fallback(options.fallback)
    if (
        fallback.after_s is not None
        and waited >= fallback.after_s
        and clock.fallbacks < len(fallback.moves)
    ):
        move = fallback.moves[clock.fallbacks]
        return Decision(
            Verdict.MOVE_FLEET,
            cap_message(
                f"{note}; moving the fleet to {move.describe(options.vm_size)} "
                f"(--fallback {fallback.describe()})"
            ),
        )
    if fallback.after_s is not None and waited >= fallback.after_s:
        return Decision(
            Verdict.NO_NODES,
            cap_message(
                f"{note}; stopped with {left} items left (--fallback {fallback.describe()}: "
                "retry with --dedicated, another --vm-size or --fallback wait)"
            ),
        )
    done = snapshot.done
    return Decision(Verdict.CONTINUE, cap_message(f"{done} items done; {note}"))


def _over_budget(snapshot: ProgressSnapshot, options: RunOptions, total: int) -> Decision | None:
    budget = options.error_budget
    allowed = budget.allowed_failures(total)
    if snapshot.failed > allowed:
        return Decision(
            Verdict.OVER_BUDGET,
            f"{snapshot.failed} items failed, more than the error budget of {allowed}",
        )
    if budget.stops_early(snapshot.succeeded, snapshot.failed):
        done = snapshot.succeeded + snapshot.failed
        return Decision(
            Verdict.OVER_BUDGET,
            f"{snapshot.failed} of the first {done} items failed: stopping early "
            "(a systematic failure; set --error-budget for exact control)",
        )
    return None


def _past_deadline(
    options: RunOptions, started_at: datetime, now: datetime, left: int
) -> Decision | None:
    if options.deadline_s is None or now < started_at + timedelta(seconds=options.deadline_s):
        return None
    return Decision(
        Verdict.DEADLINE, f"deadline of {options.deadline_s:.0f} s reached with {left} items left"
    )


def _fleet_lost(snapshot: ProgressSnapshot, clock: StallClock, left: int) -> Decision | None:
    """Compute was lost with items left: bring it back, unless that keeps not helping.

    Every job ended (whatever the queue count says: a count can lag, and an empty fleet
    finishes nothing), or a job ended abnormally (failed, or cancelled by someone else: a
    preempted node) while the queue still holds work. A job that ended normally, its
    worker idle, while others still run is not replaced: the tail of a run needs no new
    nodes.
    """
    jobs = snapshot.jobs
    if not jobs.total:
        return None
    all_ended = jobs.active == 0
    if not all_ended and not (jobs.lost and snapshot.queued_messages > 0):
        return None
    what = "every job ended" if all_ended else f"{jobs.lost} job(s) ended abnormally"
    if clock.resubmits >= MAX_RESUBMITS:
        return Decision(
            Verdict.STALLED,
            _going(
                f"{what} {clock.resubmits + 1} times in a row with no item finishing in "
                f"between ({left} items left, {snapshot.queued_messages} messages queued)",
                snapshot,
            ),
        )
    return Decision(
        Verdict.RESUBMIT,
        _going(
            f"{what} with {left} items left ({snapshot.queued_messages} messages queued); "
            "resubmitting",
            snapshot,
        ),
    )


def _stalled(options: RunOptions, clock: StallClock, now: datetime, left: int) -> Decision | None:
    window = stall_window_s(options)
    if clock.stall_since is None or (now - clock.stall_since).total_seconds() <= window:
        return None
    return Decision(
        Verdict.STALLED,
        f"no item finished for {window:.0f} s while compute was running ({left} items left)",
    )


def cap_message(text: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying so, for the custom status and the report."""
    if len(text) <= limit:
        return text
    marker = " [...]"
    return text[: limit - len(marker)] + marker


def eta_seconds(done: int, total: int, started_at: datetime, now: datetime) -> float | None:
    """Remaining time at the average rate so far; None until there is a rate."""
    elapsed = (now - started_at).total_seconds()
    if done <= 0 or elapsed <= 0:
        return None
    return round((total - done) * elapsed / done, 1)


def progress_view(
    snapshot: ProgressSnapshot,
    *,
    phase: RunPhase,
    total: int,
    invalid: int,
    started_at: datetime,
    now: datetime,
    message: str = "",
    nodes_planned: int | None = None,
) -> RunProgress:
    done = snapshot.done
    return RunProgress(
        run_id=snapshot.run_id,
        phase=phase,
        total=total,
        succeeded=snapshot.succeeded,
        failed=snapshot.failed,
        skipped=snapshot.skipped,
        invalid=invalid,
        started_at=started_at,
        updated_at=now,
        eta_s=eta_seconds(done, total, started_at, now),
        message=cap_message(message),
        nodes_active=snapshot.jobs.nodes_running,
        nodes_planned=nodes_planned,
    )
