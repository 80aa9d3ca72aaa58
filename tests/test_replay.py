"""Replay tests: the run orchestrator under the real azure-functions-durable SDK.

Each test drives the orchestrator episode by episode through ``Orchestrator.handle`` with
histories built as the Durable extension builds them, and the driver asserts at every
episode that replay emits the same actions (see tests/durable_replay.py).
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from batchctl.activity_names import CANCEL_EVENT, Activity
from batchctl.contracts import (
    RunOptions,
    RunRequest,
    RunState,
)
from orchestrators.run import POLLS_PER_GENERATION, RETRY_MAX_ATTEMPTS, run_orchestrator
from tests.durable_replay import ReplayDriver
from tests.orchestration_harness import ReplayActivities, finishing_after

RUN_ID = "run-1"


def scripted_activities(
    total: int = 6,
    polls_to_finish: int = 3,
    fail: str | None = None,
    jobs_state: str = "running",
    merge_skipped: int = 0,
) -> ReplayActivities:
    """The shared activity script (tests/orchestration_harness.py) for the replay driver:
    ``fail`` names an activity that fails every time."""
    script = finishing_after(
        polls_to_finish,
        total,
        jobs_state=jobs_state,
        fail={fail: 1_000_000} if fail else {},
        merge_skipped=merge_skipped,
    )
    return ReplayActivities(script)


def start_input(**options: Any) -> Any:
    request = RunRequest(
        run_id=RUN_ID, manifest="manifests/m.csv", options=RunOptions(poll_interval_s=30, **options)
    )
    return RunState(run_id=RUN_ID, request=request).model_dump(mode="json")


def test_happy_path_replays_deterministically() -> None:
    run = ReplayDriver(run_orchestrator, scripted_activities()).run(start_input())
    assert run.output["phase"] == "completed"
    assert [c for c in run.activity_calls if c != Activity.ENQUEUE_WAVE][:6] == [
        Activity.VALIDATE_MANIFEST,
        Activity.CREATE_RUN_QUEUES,
        Activity.CANCEL_REQUESTED,
        Activity.PLAN_RUN,
        Activity.CANCEL_REQUESTED,
        Activity.PROVISION_COMPUTE,
    ]
    assert run.activity_calls.count(Activity.ENQUEUE_WAVE) == 1  # 2 chunks: one wave
    assert run.activity_calls[-5:] == [
        Activity.TEARDOWN,
        Activity.END_SHARD_GROUPS,
        Activity.ANALYSE_SHARDS,  # one a group of the ledger's shards, fanned out
        Activity.ANALYSE_SHARDS,
        Activity.WRITE_REPORT,
    ]
    # The start phase hands over to the monitor with continue_as_new: history stays small.
    assert len(run.generations) == 2
    assert any(s and s.get("phase") == "running" for s in run.statuses)


def test_long_monitor_continues_as_new_and_replays_each_generation() -> None:
    polls = POLLS_PER_GENERATION + 10
    run = ReplayDriver(run_orchestrator, scripted_activities(polls_to_finish=polls)).run(
        start_input()
    )
    assert run.output["phase"] == "completed"
    assert len(run.generations) == 3  # start, a full monitor generation, the rest
    assert run.activity_calls.count(Activity.GET_PROGRESS) == polls
    # Each monitor generation's history stays bounded by the polls it holds: a poll is 8
    # events in production's shape (scheduled + completed activity, created + fired timer,
    # and each episode's OrchestratorStarted/Completed pair).
    assert max(len(g.history) for g in run.generations) <= POLLS_PER_GENERATION * 8 + 10
    assert run.activity_calls.count(Activity.TEARDOWN) == 1


def test_cancel_event_replays_and_tears_down() -> None:
    # Episodes: the start generation, then the monitor's first poll; raise cancel while the
    # monitor waits on its timer.
    driver = ReplayDriver(
        run_orchestrator,
        scripted_activities(polls_to_finish=100),
        raise_event_at={12: CANCEL_EVENT},
    )
    run = driver.run(start_input())
    assert run.output["phase"] == "cancelled"
    assert Counter(run.activity_calls)[Activity.TEARDOWN] == 1


def test_failed_activity_is_retried_then_torn_down() -> None:
    run = ReplayDriver(
        run_orchestrator,
        scripted_activities(fail=Activity.PROVISION_COMPUTE),
        timer_step=timedelta(seconds=5),
    ).run(start_input())
    assert run.output["phase"] == "failed"
    assert "provision_compute exploded" in run.output["message"]
    assert run.activity_calls.count(Activity.PROVISION_COMPUTE) == RETRY_MAX_ATTEMPTS
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert Activity.GET_PROGRESS not in run.activity_calls


def test_merge_replays_after_teardown_and_before_the_report() -> None:
    activities = scripted_activities(merge_skipped=1)
    run = ReplayDriver(run_orchestrator, activities).run(start_input(merge_outputs=True))
    assert run.output["phase"] == "completed"
    assert run.activity_calls[-3:] == [
        Activity.ANALYSE_SHARDS,
        Activity.MERGE_OUTPUTS,
        Activity.WRITE_REPORT,
    ]
    assert run.activity_calls.count(Activity.MERGE_OUTPUTS) == 1
    assert "merged 9 items (120 rows) into run-1/merged/ (1 parts)" in run.output["message"]
    assert "1 items skipped (features_missing 1)" in run.output["message"]
    assert any(s and s.get("phase") == "merging" for s in run.statuses)


def test_merge_off_is_never_scheduled() -> None:
    run = ReplayDriver(run_orchestrator, scripted_activities()).run(start_input())
    assert run.output["phase"] == "completed"
    assert Activity.MERGE_OUTPUTS not in run.activity_calls


def test_failed_merge_replays_and_the_run_still_reports() -> None:
    run = ReplayDriver(
        run_orchestrator,
        scripted_activities(fail=Activity.MERGE_OUTPUTS),
        timer_step=timedelta(seconds=5),
    ).run(start_input(merge_outputs=True))
    assert run.output["phase"] == "completed"
    assert "merging the outputs failed" in run.output["message"]
    assert "merge_outputs exploded" in run.output["message"]
    assert run.activity_calls.count(Activity.MERGE_OUTPUTS) == RETRY_MAX_ATTEMPTS
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert run.activity_calls[-1] == Activity.WRITE_REPORT
