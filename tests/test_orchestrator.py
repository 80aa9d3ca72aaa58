"""The run orchestrator's process and every failure path, through the shared harness."""

from __future__ import annotations

import threading
import time

import pytest

from batchctl.activity_names import CANCEL_EVENT, Activity
from batchctl.contracts import ErrorBudget, RunOptions, RunPhase
from batchctl.settings import ControllerSettings
from orchestrators.run import POLLS_PER_GENERATION, RETRY_MAX_ATTEMPTS
from tests.orchestration_harness import Script, run_script

FAST = {"poll_interval_s": 0.02}


def test_happy_path_calls_activities_in_process_order() -> None:
    script = Script()
    report, _ = run_script(script)
    assert report.phase is RunPhase.COMPLETED
    assert script.calls == [
        Activity.VALIDATE_MANIFEST,
        Activity.CREATE_RUN_QUEUES,
        Activity.ENQUEUE_WAVE,  # 3 chunks: one wave
        Activity.CANCEL_REQUESTED,  # the durable flag, before the fleet is planned
        Activity.PLAN_RUN,
        Activity.CANCEL_REQUESTED,  # and before it is created
        Activity.PROVISION_COMPUTE,
        Activity.GET_PROGRESS,
        Activity.GET_PROGRESS,
        Activity.TEARDOWN,
        # The report's part of each group of the ledger's shards, side by side, then the
        # report that merges them.
        Activity.END_SHARD_GROUPS,
        Activity.ANALYSE_SHARDS,
        Activity.ANALYSE_SHARDS,
        Activity.WRITE_REPORT,
    ]
    assert sorted(script.analysed_groups) == sorted(script.shard_groups)


def test_the_status_keeps_the_last_counts_while_tearing_down_and_merging() -> None:
    # A status read during a long teardown or merge must not show "0 done".
    statuses: list[dict[str, object]] = []
    script = Script(progress=[(3, 1), (9, 1)])
    report, _ = run_script(
        script,
        RunOptions(
            poll_interval_s=0.02, merge_outputs=True, error_budget=ErrorBudget(max_failed=1)
        ),
        statuses.append,
    )
    assert report.phase is RunPhase.COMPLETED
    after = [s for s in statuses if s["phase"] in ("tearing_down", "merging")]
    # Tearing down, then gathering the report's parts (still the end's first phase), merging.
    assert [s["phase"] for s in after] == ["tearing_down", "tearing_down", "merging"]
    assert after[1]["message"] == "gathering the report"
    assert all((s["succeeded"], s["failed"]) == (9, 1) for s in after)


def test_activity_error_still_tears_down_once() -> None:
    script = Script(fail={Activity.PROVISION_COMPUTE: 99})
    report, _ = run_script(script)
    assert report.phase is RunPhase.FAILED
    assert "provision_compute" in report.message
    assert script.calls.count(Activity.TEARDOWN) == 1
    assert Activity.GET_PROGRESS not in script.calls


def test_transient_activity_error_is_retried() -> None:
    script = Script(fail={Activity.ENQUEUE_WAVE: 2})
    report, _ = run_script(script)
    assert report.phase is RunPhase.COMPLETED
    assert script.calls.count(Activity.ENQUEUE_WAVE) == 3  # 1 wave + 2 retries


def test_a_large_manifest_enqueues_in_waves_across_generations() -> None:
    from orchestrators.run import CHUNKS_PER_WAVE, WAVES_PER_GENERATION

    chunks = CHUNKS_PER_WAVE * WAVES_PER_GENERATION * 2 + 3
    script = Script(valid=chunks * 2000, chunks=chunks, progress=[(chunks * 2000, 0)])
    waves: list[tuple[int, int]] = []
    report, driver = run_script(script, RunOptions(**FAST), waves=waves)
    assert report.phase is RunPhase.COMPLETED
    # Every chunk exactly once, in order, in waves of CHUNKS_PER_WAVE.
    covered = [index for first, count in waves for index in range(first, first + count)]
    assert covered == list(range(chunks))
    assert max(count for _, count in waves) == CHUNKS_PER_WAVE
    # Start (10 waves), enqueue (10 waves), enqueue (the last wave, plan, provision), monitor.
    assert driver.generations == 4


def test_items_per_message_is_decided_once_from_the_run_size() -> None:
    script = Script(valid=1_000_000, chunks=1, progress=[(1_000_000, 0)])
    options: list[int | None] = []
    run_script(script, RunOptions(**FAST), wave_options=options)
    assert options == [8]  # 1M items on up to 100 nodes: 8 a message, 125,000 messages


@pytest.mark.parametrize(
    ("fleet_nodes", "expected"),
    [
        (1, 8),  # one local node: 240 items 8 a message (30 messages, 30 for its one node)
        (2, 8),
        (10, 6),  # at least 4 messages a node: 240 // 40
        (None, 1),  # a history from before validation recorded it: packed for max_nodes 100
    ],
)
def test_messages_are_packed_for_the_nodes_the_run_can_really_get(
    fleet_nodes: int | None, expected: int
) -> None:
    script = Script(valid=240, chunks=1, progress=[(240, 0)], fleet_nodes=fleet_nodes)
    options: list[int | None] = []
    run_script(script, RunOptions(**FAST), wave_options=options)
    assert options == [expected]


def test_the_fleet_is_the_local_sessions_node_count_and_max_nodes_elsewhere() -> None:
    from batchctl.controller.validation import fleet_nodes

    local = ControllerSettings.model_construct(compute_backend="local", local_nodes=2)
    azure = ControllerSettings.model_construct(compute_backend="aml", local_nodes=2)
    assert fleet_nodes(local, 100) == 2
    assert fleet_nodes(local, 1) == 1  # --max-nodes still caps a local run
    assert fleet_nodes(azure, 100) == 100


def test_a_local_sessions_run_gets_fewer_shards() -> None:
    from batchctl.controller.validation import run_shards
    from batchctl.storage.ledger import LOCAL_SHARDS, SHARDS

    local = ControllerSettings.model_construct(compute_backend="local", local_nodes=1)
    azure = ControllerSettings.model_construct(compute_backend="aml", local_nodes=1)
    assert run_shards(local, 1) == LOCAL_SHARDS
    assert run_shards(local, 16) == LOCAL_SHARDS  # 8 nodes a shard
    assert run_shards(local, 17) == 2 * LOCAL_SHARDS
    assert run_shards(azure, 1) == SHARDS
    assert run_shards(azure, 1000) == 128


def test_cancel_event_ends_the_run_with_teardown() -> None:
    script = Script(progress=[(1, 0)])

    def cancel_while_waiting(poll: int) -> None:
        # Raised from another thread while the monitor sleeps on its timer, as a user would.
        if poll == 2:
            assert script.driver is not None
            threading.Timer(0.2, script.driver.raise_event, [CANCEL_EVENT]).start()

    script.on_poll = cancel_while_waiting
    # A long poll interval: only the cancel event can end the wait in time.
    started = time.monotonic()
    report, _ = run_script(script, RunOptions(poll_interval_s=1))
    assert time.monotonic() - started < 10
    assert report.phase is RunPhase.CANCELLED
    assert script.calls.count(Activity.TEARDOWN) == 1
    assert script.calls.count(Activity.GET_PROGRESS) == 2


def test_deadline_stops_the_run() -> None:
    script = Script(progress=[(1, 0)])
    report, _ = run_script(script, RunOptions(poll_interval_s=0.02, deadline_s=0.3))
    assert report.phase is RunPhase.FAILED
    assert "deadline" in report.message
    assert script.calls.count(Activity.TEARDOWN) == 1


def test_error_budget_stops_the_run() -> None:
    script = Script(valid=100, progress=[(10, 2), (20, 6)])
    report, _ = run_script(script, RunOptions(poll_interval_s=0.02, error_budget="5%"))
    assert report.phase is RunPhase.FAILED
    assert "error budget of 5" in report.message
    assert script.calls.count(Activity.TEARDOWN) == 1


def test_invalid_manifest_in_strict_mode_creates_nothing() -> None:
    script = Script(invalid=3)
    report, _ = run_script(script, RunOptions(strict_manifest=True, **FAST))
    assert report.phase is RunPhase.FAILED
    assert "3 invalid manifest rows" in report.message
    # Nothing was created; the valid rows still get their not_run records (an exact ledger).
    assert script.calls == [
        Activity.VALIDATE_MANIFEST,
        Activity.TEARDOWN,
        Activity.END_SHARD_GROUPS,
        Activity.RECORD_UNFINISHED,  # one a group of shards, side by side
        Activity.RECORD_UNFINISHED,
        Activity.ANALYSE_SHARDS,
        Activity.ANALYSE_SHARDS,
        Activity.WRITE_REPORT,
    ]
    assert script.not_run_reasons == ["RunFailed"]
    assert sorted(script.not_run_groups) == sorted(script.shard_groups)  # type: ignore[type-var]


def test_unusable_manifest_fails_before_anything_is_created() -> None:
    script = Script(fatal="no 'video' column")
    report, _ = run_script(script)
    assert report.phase is RunPhase.FAILED
    assert "no 'video' column" in report.message
    assert Activity.CREATE_RUN_QUEUES not in script.calls


def test_lenient_mode_runs_the_valid_rows() -> None:
    script = Script(invalid=3)
    report, _ = run_script(script)
    assert report.phase is RunPhase.COMPLETED
    assert report.invalid == 3


def test_jobs_that_all_ended_early_are_resubmitted() -> None:
    script = Script(progress=[(2, 0), (5, 0), (10, 0)], jobs_state="completed")
    report, _ = run_script(script)
    assert report.phase is RunPhase.COMPLETED
    assert script.calls.count(Activity.SUBMIT_JOBS) == 2


def test_long_runs_continue_as_new_and_stay_correct() -> None:
    polls = POLLS_PER_GENERATION * 2 + 5
    script = Script(progress=[(1, 0)] * (polls - 1) + [(10, 0)])
    report, driver = run_script(script, RunOptions(poll_interval_s=0.001))
    assert report.phase is RunPhase.COMPLETED
    assert driver.generations == 4  # start, then three monitor generations
    assert script.calls.count(Activity.GET_PROGRESS) == polls
    assert script.calls.count(Activity.TEARDOWN) == 1


def test_merge_runs_once_after_teardown_and_before_the_report() -> None:
    script = Script()
    report, _ = run_script(script, RunOptions(merge_outputs=True, **FAST))
    assert report.phase is RunPhase.COMPLETED
    assert script.calls[-3:] == [
        Activity.ANALYSE_SHARDS,
        Activity.MERGE_OUTPUTS,
        Activity.WRITE_REPORT,
    ]
    assert script.calls.count(Activity.MERGE_OUTPUTS) == 1
    assert "merged 10 items (120 rows) into run-1/merged/ (1 parts)" in report.message


def test_merge_is_not_called_when_off() -> None:
    script = Script()
    report, _ = run_script(script, RunOptions(**FAST))
    assert report.phase is RunPhase.COMPLETED
    assert Activity.MERGE_OUTPUTS not in script.calls
    assert "merged" not in report.message


def test_merge_is_not_called_when_the_run_did_not_complete() -> None:
    script = Script(valid=100, progress=[(10, 2), (20, 6)])
    report, _ = run_script(
        script, RunOptions(merge_outputs=True, error_budget="5%", poll_interval_s=0.02)
    )
    assert report.phase is RunPhase.FAILED
    assert Activity.MERGE_OUTPUTS not in script.calls
    assert script.calls.count(Activity.TEARDOWN) == 1


def test_failed_merge_still_completes_and_reports() -> None:
    script = Script(fail={Activity.MERGE_OUTPUTS: 99})
    report, _ = run_script(script, RunOptions(merge_outputs=True, **FAST))
    assert report.phase is RunPhase.COMPLETED
    assert "merging the outputs failed" in report.message
    assert "merge_outputs exploded" in report.message
    assert script.calls.count(Activity.TEARDOWN) == 1
    assert script.calls.index(Activity.TEARDOWN) < script.calls.index(Activity.MERGE_OUTPUTS)
    assert script.calls.count(Activity.MERGE_OUTPUTS) == RETRY_MAX_ATTEMPTS  # idempotent: retried
    assert script.calls[-1] == Activity.WRITE_REPORT


def test_transient_merge_failure_is_retried() -> None:
    script = Script(fail={Activity.MERGE_OUTPUTS: 1})
    report, _ = run_script(script, RunOptions(merge_outputs=True, **FAST))
    assert report.phase is RunPhase.COMPLETED
    assert script.calls.count(Activity.MERGE_OUTPUTS) == 2
    assert "merged 10 items" in report.message
