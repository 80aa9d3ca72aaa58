"""The monitor's pure policy: completion, cancel, budget (auto and exact), deadline, the
resubmit budget that resets with progress, and stalls judged by time while compute runs."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchctl.contracts import ErrorBudget, JobInfo, JobState, ProgressSnapshot, RunOptions
from batchctl.progress import (
    CLOSING_POLL_FRACTION,
    MAX_RESUBMITS,
    MAX_STATUS_MESSAGE,
    QUIET_INTERVALS,
    StallClock,
    Verdict,
    advance_stall_clock,
    cap_message,
    decide,
    poll_wait_s,
    stall_window_s,
)
from node_image.worker.loop import may_exit_idle

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snap(
    succeeded: int = 0,
    failed: int = 0,
    jobs: tuple[JobState, ...] = (JobState.RUNNING,),
    queued: int = 5,
    cancel: bool = False,
) -> ProgressSnapshot:
    return ProgressSnapshot(
        run_id="r1",
        succeeded=succeeded,
        failed=failed,
        queued_messages=queued,
        jobs=[JobInfo(name=f"j{i}", cluster="c", state=s) for i, s in enumerate(jobs)],
        cancel_requested=cancel,
    )


def verdict(
    snapshot: ProgressSnapshot,
    total: int = 100,
    options: RunOptions | None = None,
    now: datetime = T0,
    clock: StallClock | None = None,
) -> Verdict:
    return decide(
        snapshot,
        total=total,
        options=options or RunOptions(),
        started_at=T0,
        now=now,
        clock=clock or StallClock(0, None, 0),
    ).verdict


def test_complete_wins_even_over_cancel() -> None:
    assert verdict(snap(90, 10, cancel=True)) is Verdict.COMPLETE


def test_the_durable_cancel_flag_cancels() -> None:
    assert verdict(snap(5, 0, cancel=True)) is Verdict.CANCELLED


@pytest.mark.parametrize(
    ("total", "failures", "expected"), [(5, 4, 10), (19, 10, 10), (1000, 50, 50)]
)
def test_auto_budget_tolerates_a_few_broken_files_in_a_small_run(
    total: int, failures: int, expected: int
) -> None:
    # The larger of 10 items and 5%; ``failures`` (within it) leaves the run going.
    assert ErrorBudget(auto=True).allowed_failures(total) == expected
    assert verdict(snap(total - failures - 1, failures), total=total) is Verdict.CONTINUE


def test_a_small_run_with_one_broken_file_goes_on() -> None:
    # The old default (5%, floored) allowed 0 failures under 20 items.
    assert verdict(snap(3, 1), total=10) is Verdict.CONTINUE


def test_auto_budget_stops_a_systematic_failure_early() -> None:
    # 20,000 items would tolerate 1,000 failures; 19 of the first 20 failing means every
    # item will (a wrong model, a missing permission): stop now, not after 1,000.
    assert verdict(snap(1, 19), total=20_000) is Verdict.OVER_BUDGET
    assert verdict(snap(2, 18), total=20_000) is Verdict.OVER_BUDGET  # 90%
    assert verdict(snap(3, 17), total=20_000) is Verdict.CONTINUE  # 85%
    assert verdict(snap(0, 19), total=20_000) is Verdict.CONTINUE  # too few to judge


def test_an_explicit_budget_is_exact_control_without_early_stop() -> None:
    options = RunOptions(error_budget="1000")
    assert verdict(snap(1, 19), total=20_000, options=options) is Verdict.CONTINUE
    assert verdict(snap(0, 1001), total=20_000, options=options) is Verdict.OVER_BUDGET


def test_deadline() -> None:
    options = RunOptions(deadline_s=60)
    assert verdict(snap(1), options=options, now=T0 + timedelta(seconds=59)) is Verdict.CONTINUE
    assert verdict(snap(1), options=options, now=T0 + timedelta(seconds=60)) is Verdict.DEADLINE


def test_an_ended_fleet_is_resubmitted_until_resubmits_stop_helping() -> None:
    ended = snap(5, jobs=(JobState.COMPLETED, JobState.FAILED))
    for resubmits in range(MAX_RESUBMITS):
        assert verdict(ended, clock=StallClock(5, None, resubmits)) is Verdict.RESUBMIT
    assert verdict(ended, clock=StallClock(5, None, MAX_RESUBMITS)) is Verdict.STALLED


def test_a_lost_node_is_replaced_while_others_still_run() -> None:
    preempted = snap(5, jobs=(JobState.RUNNING, JobState.FAILED), queued=3)
    assert verdict(preempted) is Verdict.RESUBMIT
    # A node that ended normally (idle at the tail) while others run is not replaced.
    idle_tail = snap(5, jobs=(JobState.RUNNING, JobState.COMPLETED), queued=3)
    assert verdict(idle_tail) is Verdict.CONTINUE
    # Nor a lost node when the queue holds nothing more for it.
    assert verdict(snap(5, jobs=(JobState.RUNNING, JobState.FAILED), queued=0)) is Verdict.CONTINUE


def test_progress_resets_the_resubmit_budget() -> None:
    clock = StallClock(last_done=5, stall_since=None, resubmits=MAX_RESUBMITS)
    moved = advance_stall_clock(clock, snap(6, jobs=(JobState.COMPLETED,)), T0)
    assert moved.resubmits == 0
    assert verdict(snap(6, jobs=(JobState.COMPLETED,)), clock=moved) is Verdict.RESUBMIT
    still = advance_stall_clock(clock, snap(5, jobs=(JobState.COMPLETED,)), T0)
    assert still.resubmits == MAX_RESUBMITS


def test_a_stall_is_time_without_progress_while_compute_runs() -> None:
    options = RunOptions(item_timeout_s=60, visibility_timeout_s=30, max_attempts=2)
    window = stall_window_s(options)
    assert window > options.max_attempts * options.item_timeout_s + options.visibility_timeout_s
    clock = advance_stall_clock(StallClock(5, None, 0), snap(5), T0)
    assert clock.stall_since == T0
    later = T0 + timedelta(seconds=window - 1)
    clock = advance_stall_clock(clock, snap(5), later)
    assert verdict(snap(5), options=options, now=later, clock=clock) is Verdict.CONTINUE
    past = T0 + timedelta(seconds=window + 1)
    clock = advance_stall_clock(clock, snap(5), past)
    assert verdict(snap(5), options=options, now=past, clock=clock) is Verdict.STALLED


def test_time_waiting_for_nodes_is_not_a_stall() -> None:
    clock = advance_stall_clock(StallClock(5, T0, 0), snap(5, jobs=(JobState.QUEUED,)), T0)
    assert clock.stall_since is None


@settings(max_examples=300, deadline=None)
@given(
    polls=st.lists(
        st.tuples(
            st.integers(0, 3),  # items finished since the last poll
            st.sampled_from(list(JobState)),
            st.integers(0, 120),  # seconds since the last poll
        ),
        max_size=40,
    )
)
def test_a_run_that_keeps_progressing_never_stalls(
    polls: list[tuple[int, JobState, int]],
) -> None:
    # Seeded random poll sequences: as long as an item finishes at least every few polls
    # (and polls come within the window), the verdict is never STALLED.
    options = RunOptions()
    clock = StallClock(0, None, 0)
    now, done = T0, 0
    for index, (finished_now, state, gap) in enumerate(polls):
        finished = max(finished_now, 1 if index % 4 == 3 else 0)
        done, now = done + finished, now + timedelta(seconds=gap)
        snapshot = snap(done, jobs=(state,), queued=1)
        clock = advance_stall_clock(clock, snapshot, now)
        result = decide(
            snapshot, total=10_000, options=options, started_at=T0, now=now, clock=clock
        )
        assert result.verdict is not Verdict.STALLED
        if result.verdict is Verdict.RESUBMIT:
            clock = StallClock(clock.last_done, clock.stall_since, clock.resubmits + 1)


def test_messages_shown_in_the_custom_status_are_capped() -> None:
    assert len(cap_message("x" * 100_000)) == MAX_STATUS_MESSAGE
    assert cap_message("short") == "short"


@pytest.mark.parametrize(
    ("idle_for", "queued", "expected"),
    [
        (0.1, 0, False),  # not idle long enough
        (1.0, 0, True),  # idle and the queue is empty: leave
        (1.0, 3, False),  # hidden messages may come back: stay
        (10.9, 3, False),
        (11.0, 3, True),  # past idle exit + visibility: any dead node's messages are back
    ],
)
def test_a_worker_stays_while_hidden_messages_may_come_back(
    idle_for: float, queued: int, expected: bool
) -> None:
    assert may_exit_idle(idle_for, 1.0, queued, 10.0) is expected


def test_the_monitor_polls_sooner_only_when_the_items_left_fit_in_an_interval() -> None:
    interval = 30.0
    closing = interval * CLOSING_POLL_FRACTION

    def wait(remaining: int, finished: int, since: float = interval) -> float:
        return poll_wait_s(
            interval,
            remaining=remaining,
            finished_since_last_poll=finished,
            since_last_poll_s=since,
        )

    assert wait(10, 40) == closing
    assert wait(40, 40) == closing
    assert wait(41, 40) == interval
    # After a closing poll: 10 done in its 7.5 s is 40 an interval, so 30 left still closes.
    assert wait(30, 10, since=closing) == closing
    assert wait(41, 10, since=closing) == interval
    # Nothing finished (a stall, or nodes still starting): no reason to poll sooner.
    assert wait(1, 0) == interval
    # Done (the verdict ends the run before any wait), or more done than total (skipped).
    assert wait(0, 5) == interval


def test_the_runs_own_rate_closes_when_the_last_poll_saw_no_record() -> None:
    """Records land a message at a time: a closing poll just before the last message's
    transaction sees nothing finish, and the run's rate must keep the next wait short."""
    interval = 1.0
    closing = interval * CLOSING_POLL_FRACTION

    def wait(remaining: int, finished: int, done: int, elapsed: float) -> float:
        return poll_wait_s(
            interval,
            remaining=remaining,
            finished_since_last_poll=finished,
            since_last_poll_s=closing,
            done=done,
            elapsed_s=elapsed,
        )

    assert wait(8, 0, done=232, elapsed=24.0) == closing  # 8 left at ~10 a second
    assert wait(8, 0, done=232, elapsed=232 * 0.125) == closing  # exactly one interval left
    assert wait(8, 0, done=232, elapsed=233 * 0.125) == interval
    assert wait(8, 0, done=0, elapsed=600.0) == interval  # nodes still starting
    assert wait(1, 0, done=10, elapsed=100.0) == interval  # ten seconds an item: not yet


def test_the_last_wave_of_messages_closes_whatever_the_rates() -> None:
    """24 items 6 a message on one node: 18 done and 6 left is its last message, held by the
    node already, even when neither rate says it ends within the interval."""
    interval = 1.0
    closing = interval * CLOSING_POLL_FRACTION

    def wait(remaining: int, last_wave: int) -> float:
        return poll_wait_s(
            interval,
            remaining=remaining,
            finished_since_last_poll=0,
            since_last_poll_s=interval,
            done=18,
            elapsed_s=100.0,
            last_wave=last_wave,
        )

    assert wait(6, last_wave=6) == closing
    assert wait(7, last_wave=6) == interval
    assert wait(6, last_wave=0) == interval  # no plan yet


def test_a_tail_quiet_for_more_than_two_intervals_is_polled_at_the_full_interval() -> None:
    """A preempted node's last messages: neither the run's rate nor the last wave keep the
    polls sooner once nothing has finished for QUIET_INTERVALS intervals."""
    interval = 30.0

    def wait(quiet: float) -> float:
        return poll_wait_s(
            interval,
            remaining=6,
            finished_since_last_poll=0,
            since_last_poll_s=interval,
            done=1000,
            elapsed_s=100.0,
            last_wave=8,
            quiet_s=quiet,
        )

    assert wait(0.0) == interval * CLOSING_POLL_FRACTION
    assert wait(QUIET_INTERVALS * interval) == interval * CLOSING_POLL_FRACTION
    assert wait(QUIET_INTERVALS * interval + 1) == interval


@pytest.mark.parametrize("seed", range(3))
def test_fewer_items_left_or_a_faster_run_never_makes_the_wait_longer(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2000):
        interval = rng.choice([1.0, 5.0, 30.0])
        fields: dict[str, Any] = {
            "remaining": rng.randint(1, 500),
            "finished_since_last_poll": rng.randint(0, 100),
            "since_last_poll_s": rng.uniform(0.01, 2 * interval),
            "done": rng.randint(0, 5000),
            "elapsed_s": rng.uniform(0.01, 10_000),
            "last_wave": rng.randint(0, 100),
            "quiet_s": rng.uniform(0, 5 * interval),
        }
        wait = poll_wait_s(interval, **fields)
        assert wait in (interval, interval * CLOSING_POLL_FRACTION)
        for better in (
            {"remaining": max(1, fields["remaining"] - rng.randint(1, 50))},
            {"done": fields["done"] + rng.randint(1, 500)},
            {"elapsed_s": fields["elapsed_s"] * rng.uniform(0.1, 1.0)},
            {"finished_since_last_poll": fields["finished_since_last_poll"] + 1},
            {"last_wave": fields["last_wave"] + rng.randint(1, 50)},
            {"quiet_s": fields["quiet_s"] * rng.uniform(0, 1.0)},
        ):
            assert poll_wait_s(interval, **(fields | better)) <= wait, (fields, better)
