"""Pure policy of a running run: is it done, over budget, late, or stalled; what to show.

No I/O and no clock: the orchestrator passes ``now`` from ``context.current_utc_datetime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from batchctl.contracts import ProgressSnapshot, RunOptions, RunPhase, RunProgress

# How often jobs are resubmitted when every job ended with items left (preempted nodes)
# before the run gives up: beyond this, something other than preemption is wrong.
MAX_RESUBMITS = 5


class Verdict(StrEnum):
    CONTINUE = "continue"
    COMPLETE = "complete"
    OVER_BUDGET = "over_budget"
    DEADLINE = "deadline"
    RESUBMIT = "resubmit"
    STALLED = "stalled"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    message: str

    @property
    def terminal(self) -> bool:
        return self.verdict not in (Verdict.CONTINUE, Verdict.RESUBMIT)

    @property
    def phase(self) -> RunPhase:
        """The run's final phase when this decision ends it."""
        return RunPhase.COMPLETED if self.verdict is Verdict.COMPLETE else RunPhase.FAILED


def decide(
    snapshot: ProgressSnapshot,
    *,
    total: int,
    options: RunOptions,
    started_at: datetime,
    now: datetime,
    resubmits: int,
) -> Decision:
    """What the monitor does after a poll. Completion is exact: every item has a record."""
    done = snapshot.succeeded + snapshot.failed
    if done >= total:
        return Decision(Verdict.COMPLETE, f"all {total} items have a terminal record")
    allowed = options.error_budget.allowed_failures(total)
    if snapshot.failed > allowed:
        return Decision(
            Verdict.OVER_BUDGET,
            f"{snapshot.failed} items failed, more than the error budget of {allowed}",
        )
    if options.deadline_s is not None and now >= started_at + timedelta(seconds=options.deadline_s):
        return Decision(
            Verdict.DEADLINE,
            f"deadline of {options.deadline_s:.0f} s reached with {total - done} items left",
        )
    if snapshot.jobs and not any(job.state.active for job in snapshot.jobs):
        if resubmits >= MAX_RESUBMITS:
            return Decision(
                Verdict.STALLED,
                f"every job ended {resubmits + 1} times with {total - done} items left",
            )
        return Decision(
            Verdict.RESUBMIT, f"every job ended with {total - done} items left; resubmitting"
        )
    return Decision(Verdict.CONTINUE, f"{done} of {total} items done")


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
) -> RunProgress:
    done = snapshot.succeeded + snapshot.failed
    return RunProgress(
        run_id=snapshot.run_id,
        phase=phase,
        total=total,
        succeeded=snapshot.succeeded,
        failed=snapshot.failed,
        invalid=invalid,
        started_at=started_at,
        updated_at=now,
        eta_s=eta_seconds(done, total, started_at, now),
        message=message,
    )
