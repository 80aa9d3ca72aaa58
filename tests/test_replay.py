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
    ClusterPlan,
    ManifestSummary,
    MergeSummary,
    ProgressSnapshot,
    RunOptions,
    RunPlan,
    RunReport,
    RunRequest,
    RunState,
)
from orchestrators.run import POLLS_PER_GENERATION, RETRY_MAX_ATTEMPTS, run_orchestrator
from tests.durable_replay import ActivityOutcome, ReplayDriver

RUN_ID = "run-1"


class FakeActivities:
    """Answers activities like the real ones would, from a small script."""

    def __init__(
        self,
        total: int = 6,
        polls_to_finish: int = 3,
        fail: str | None = None,
        jobs_state: str = "running",
    ) -> None:
        self.total = total
        self.polls_to_finish = polls_to_finish
        self.fail = fail
        self.jobs_state = jobs_state
        self.polls = 0
        self.cancel_flag = False  # the durable flag the cancel API writes
        self.not_run_reasons: list[str] = []

    def __call__(self, name: str, payload: Any) -> ActivityOutcome:
        if name == self.fail:
            return ActivityOutcome(error=f"{name} failed: boom")
        if name == Activity.VALIDATE_MANIFEST:
            request = RunRequest.model_validate(payload)
            summary = ManifestSummary(
                run_id=request.run_id,
                manifest=request.manifest,
                rows=self.total,
                valid=self.total,
                invalid=0,
                chunk_count=2,
            )
            return ActivityOutcome(summary.model_dump(mode="json"))
        if name == Activity.PLAN_RUN:
            plan = RunPlan(
                run_id=RUN_ID,
                clusters=[ClusterPlan(name="c1", nodes=2, vm_size="v", low_priority=True)],
                total_nodes=2,
                est_makespan_s=10,
                est_cost=1,
                binding_limit="none",
            )
            return ActivityOutcome(plan.model_dump(mode="json"))
        if name == Activity.GET_PROGRESS:
            self.polls += 1
            done = self.total if self.polls >= self.polls_to_finish else 1
            snapshot = ProgressSnapshot(
                run_id=RUN_ID,
                succeeded=done,
                failed=0,
                queued_messages=0,
                jobs=[{"name": "j", "cluster": "c1", "state": self.jobs_state}],
                cancel_requested=self.cancel_flag,
            )
            return ActivityOutcome(snapshot.model_dump(mode="json"))
        if name == Activity.RECORD_UNFINISHED:
            self.not_run_reasons.append(payload["reason"])
            return ActivityOutcome(self.total - 1)
        if name == Activity.MERGE_OUTPUTS:
            merged = MergeSummary(
                run_id=payload,
                prefix=f"{payload}/merged/",
                manifest_blob=f"{payload}/merged/_manifest.json",
                parts=[
                    f"{payload}/merged/part-00000.parquet",
                    f"{payload}/merged/part-00001.parquet",
                ],
                rows=60,
                items=self.total - 1,
                dim=8,
                skipped=1,
                skipped_by_reason={"features_missing": 1},
            )
            return ActivityOutcome(merged.model_dump(mode="json"))
        if name == Activity.WRITE_REPORT:
            state = RunState.model_validate(payload["state"])
            report = RunReport(
                run_id=RUN_ID,
                phase=payload["phase"],
                manifest=state.request.manifest,
                total=self.total,
                succeeded=self.total if payload["phase"] == "completed" else 1,
                failed=0,
                invalid=0,
                started_at=state.started_at,
                finished_at=payload["finished_at"],
                output_prefix="outputs/run-1/",
                message=payload["message"],
            )
            return ActivityOutcome(report.model_dump(mode="json"))
        return ActivityOutcome(None)


def start_input(**options: Any) -> Any:
    request = RunRequest(
        run_id=RUN_ID, manifest="manifests/m.csv", options=RunOptions(poll_interval_s=30, **options)
    )
    return RunState(run_id=RUN_ID, request=request).model_dump(mode="json")


def test_happy_path_replays_deterministically() -> None:
    run = ReplayDriver(run_orchestrator, FakeActivities()).run(start_input())
    assert run.output["phase"] == "completed"
    assert [c for c in run.activity_calls if c != Activity.ENQUEUE_WAVE][:4] == [
        Activity.VALIDATE_MANIFEST,
        Activity.CREATE_RUN_QUEUES,
        Activity.PLAN_RUN,
        Activity.PROVISION_COMPUTE,
    ]
    assert run.activity_calls.count(Activity.ENQUEUE_WAVE) == 1  # 2 chunks: one wave
    assert run.activity_calls[-2:] == [Activity.TEARDOWN, Activity.WRITE_REPORT]
    # The start phase hands over to the monitor with continue_as_new: history stays small.
    assert len(run.generations) == 2
    assert any(s and s.get("phase") == "running" for s in run.statuses)


def test_long_monitor_continues_as_new_and_replays_each_generation() -> None:
    polls = POLLS_PER_GENERATION + 10
    run = ReplayDriver(run_orchestrator, FakeActivities(polls_to_finish=polls)).run(start_input())
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
        run_orchestrator, FakeActivities(polls_to_finish=100), raise_event_at={12: CANCEL_EVENT}
    )
    run = driver.run(start_input())
    assert run.output["phase"] == "cancelled"
    assert Counter(run.activity_calls)[Activity.TEARDOWN] == 1


def test_failed_activity_is_retried_then_torn_down() -> None:
    run = ReplayDriver(
        run_orchestrator,
        FakeActivities(fail=Activity.PROVISION_COMPUTE),
        timer_step=timedelta(seconds=5),
    ).run(start_input())
    assert run.output["phase"] == "failed"
    assert "provision_compute failed: boom" in run.output["message"]
    assert run.activity_calls.count(Activity.PROVISION_COMPUTE) == RETRY_MAX_ATTEMPTS
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert Activity.GET_PROGRESS not in run.activity_calls


def test_merge_replays_after_teardown_and_before_the_report() -> None:
    run = ReplayDriver(run_orchestrator, FakeActivities()).run(start_input(merge_outputs=True))
    assert run.output["phase"] == "completed"
    assert run.activity_calls[-3:] == [
        Activity.TEARDOWN,
        Activity.MERGE_OUTPUTS,
        Activity.WRITE_REPORT,
    ]
    assert run.activity_calls.count(Activity.MERGE_OUTPUTS) == 1
    assert "merged 5 items (60 rows) into run-1/merged/ (2 parts)" in run.output["message"]
    assert "1 items skipped (features_missing 1)" in run.output["message"]
    assert any(s and s.get("phase") == "merging" for s in run.statuses)


def test_merge_off_is_never_scheduled() -> None:
    run = ReplayDriver(run_orchestrator, FakeActivities()).run(start_input())
    assert run.output["phase"] == "completed"
    assert Activity.MERGE_OUTPUTS not in run.activity_calls


def test_failed_merge_replays_and_the_run_still_reports() -> None:
    run = ReplayDriver(
        run_orchestrator,
        FakeActivities(fail=Activity.MERGE_OUTPUTS),
        timer_step=timedelta(seconds=5),
    ).run(start_input(merge_outputs=True))
    assert run.output["phase"] == "completed"
    assert "merging the outputs failed" in run.output["message"]
    assert "merge_outputs failed: boom" in run.output["message"]
    assert run.activity_calls.count(Activity.MERGE_OUTPUTS) == RETRY_MAX_ATTEMPTS
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert run.activity_calls[-1] == Activity.WRITE_REPORT
