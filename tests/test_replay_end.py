"""Replay tests of a run's end under the real Durable SDK (both history schema versions):
the fan-out over groups of ledger shards, the steps' times, and a report whatever fails."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from azure.durable_functions.models.history import HistoryEventType

from batchctl.activity_names import CANCEL_EVENT, Activity
from batchctl.progress import CLOSING_POLL_FRACTION
from orchestrators.run import RETRY_MAX_ATTEMPTS, run_orchestrator
from tests.durable_replay import PRODUCTION_SCHEMAS, ReplayDriver, ReplayRun
from tests.orchestration_harness import ReplayActivities, Script
from tests.test_replay import scripted_activities, start_input
from tests.test_replay_cancel import nth_time


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_end_of_run_fans_out_by_shard_group_and_stamps_its_steps(schema: int) -> None:
    """A cancelled run's end, replayed: the not-run records and the report's parts are one
    activity a group of shards each (side by side), and the report gets each step's time."""
    activities = scripted_activities(total=6, polls_to_finish=1_000)
    script = activities.script
    run = ReplayDriver(
        run_orchestrator,
        activities,
        schema=schema,
        raise_event_when=(nth_time(Activity.GET_PROGRESS, 2), CANCEL_EVENT),
    ).run(start_input())
    assert run.output["phase"] == "cancelled"
    end = run.activity_calls[run.activity_calls.index(Activity.TEARDOWN) :]
    assert end == [
        Activity.TEARDOWN,
        Activity.END_SHARD_GROUPS,
        Activity.RECORD_UNFINISHED,
        Activity.RECORD_UNFINISHED,
        Activity.ANALYSE_SHARDS,
        Activity.ANALYSE_SHARDS,
        Activity.WRITE_REPORT,
    ]
    assert script.not_run_groups == script.shard_groups
    assert script.analysed_groups == script.shard_groups
    [report_call] = [p for n, p in activities.payloads if n == Activity.WRITE_REPORT]
    marks = report_call["marks"]
    assert set(marks) == {"torn_down_at", "not_run_recorded_at"}
    assert marks["torn_down_at"] <= marks["not_run_recorded_at"] <= report_call["finished_at"]
    [analyse_call, _] = [p for n, p in activities.payloads if n == Activity.ANALYSE_SHARDS]
    assert analyse_call["finished_at"] == report_call["finished_at"]  # one end for every part


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_failed_report_step_still_ends_with_a_brief_report(schema: int) -> None:
    run = ReplayDriver(
        run_orchestrator,
        scripted_activities(fail=Activity.WRITE_REPORT),
        schema=schema,
        timer_step=timedelta(seconds=5),
    ).run(start_input())
    assert run.output["phase"] == "completed"
    assert run.activity_calls.count(Activity.WRITE_REPORT) == RETRY_MAX_ATTEMPTS
    assert run.activity_calls[-1] == Activity.WRITE_BRIEF_REPORT
    assert "brief: write_report failed: write_report exploded" in run.output["message"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_run_whose_every_report_step_fails_still_returns_a_report(schema: int) -> None:
    activities = scripted_activities()
    for name in (Activity.WRITE_REPORT, Activity.WRITE_BRIEF_REPORT):
        activities.script.fail[name] = 1_000_000
    run = ReplayDriver(
        run_orchestrator, activities, schema=schema, timer_step=timedelta(seconds=5)
    ).run(start_input())
    assert run.output["phase"] == "completed"
    assert run.output["succeeded"] == 6  # the last counts the monitor saw
    assert "no report could be written" in run.output["message"]
    assert "write_report exploded" in run.output["message"]
    assert "write_brief_report exploded" in run.output["message"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_shards_that_cannot_be_listed_leave_the_whole_run_to_one_step(schema: int) -> None:
    activities = scripted_activities(total=6, polls_to_finish=1_000)
    activities.script.fail[Activity.END_SHARD_GROUPS] = 1_000_000
    run = ReplayDriver(
        run_orchestrator,
        activities,
        schema=schema,
        timer_step=timedelta(seconds=5),
        raise_event_when=(nth_time(Activity.GET_PROGRESS, 1), CANCEL_EVENT),
    ).run(start_input())
    assert run.output["phase"] == "cancelled"
    assert activities.script.not_run_groups == [None]  # every shard, in one activity
    assert Activity.ANALYSE_SHARDS not in run.activity_calls  # write_report gathers them
    assert run.activity_calls[-1] == Activity.WRITE_REPORT
    assert "the ledger's shards could not be listed" in run.output["message"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_the_monitor_polls_sooner_once_the_items_left_fit_in_an_interval_at_the_last_rate(
    schema: int,
) -> None:
    # 100 items: 10, 50, 80, 92 and then 100 done. After the third poll the 20 left would take
    # less than an interval at the last one's rate, so the next poll comes a quarter interval
    # later, and so does the one after: the run's end is noticed within 7.5 s, not 30. (This
    # driver's clock moves a fixed step at every timer; tests/test_progress_policy.py holds
    # the rate after a short wait.)
    script = Script(valid=100, progress=[(10, 0), (50, 0), (80, 0), (92, 0), (100, 0)])
    run = ReplayDriver(run_orchestrator, ReplayActivities(script), schema=schema).run(start_input())
    assert run.output["phase"] == "completed"
    waits = _timer_waits(run)
    closing = 30.0 * CLOSING_POLL_FRACTION
    assert waits == [30.0, 30.0, closing, closing]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_closing_poll_that_sees_no_record_keeps_the_next_one_close(schema: int) -> None:
    # Records land a message at a time: 40, 80 and 92 done, then a closing poll that finds
    # the last message's 8 items still unrecorded (92 again), then 100. The run's own rate
    # (92 items in its time so far) keeps the wait after that empty poll a quarter interval.
    script = Script(valid=100, progress=[(40, 0), (80, 0), (92, 0), (92, 0), (100, 0)])
    run = ReplayDriver(run_orchestrator, ReplayActivities(script), schema=schema).run(start_input())
    assert run.output["phase"] == "completed"
    waits = _timer_waits(run)
    closing = 30.0 * CLOSING_POLL_FRACTION
    assert waits == [30.0, closing, closing, closing]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_the_last_wave_of_messages_keeps_the_polls_close(schema: int) -> None:
    # 24 items on one local node, 6 a message, planned on 2 nodes: the last 12 are a message
    # for each. Nothing for two minutes (the model builds), then 12, 18, 18 again (a poll just
    # before the last message lands), 24. After the empty poll neither rate closes (18 in
    # 150 s), but the 6 left are within the last wave: the next poll still comes soon.
    script = Script(
        valid=24,
        fleet_nodes=1,
        progress=[(0, 0), (0, 0), (0, 0), (0, 0), (12, 0), (18, 0), (18, 0), (24, 0)],
    )
    run = ReplayDriver(run_orchestrator, ReplayActivities(script), schema=schema).run(start_input())
    assert run.output["phase"] == "completed"
    waits = _timer_waits(run)
    closing = 30.0 * CLOSING_POLL_FRACTION
    assert waits == [30.0, 30.0, 30.0, 30.0, closing, closing, closing]


def _timer_waits(run: ReplayRun) -> list[float]:
    """The last generation's timers: each one's fire time less the orchestrator's time when
    it was created, in seconds."""
    return [
        (
            datetime.fromisoformat(event["FireAt"]) - datetime.fromisoformat(event["Timestamp"])
        ).total_seconds()
        for event in run.generations[-1].history
        if event["EventType"] == HistoryEventType.TIMER_CREATED
    ]
