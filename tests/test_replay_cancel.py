"""A cancel is never lost: replayed through the real Durable SDK, at every moment it can land.

Each test raises the cancel event at one moment of a run (while each kind of activity is
scheduled and not yet completed, while the monitor waits on its timer, during preparation)
in each schema version the extension sends, and checks what production needs: teardown is
scheduled exactly once, the unfinished items get their not_run records, nothing is
provisioned after the cancel, and the run ends cancelled. A cancel whose event Durable
drops (raised while the orchestration continues as new) still wins through the durable
flag that the cancel API writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from batchctl.activity_names import CANCEL_EVENT, Activity
from orchestrators.run import run_orchestrator
from tests.durable_replay import PRODUCTION_SCHEMAS, ActivityOutcome, ReplayDriver, ReplayRun
from tests.orchestration_harness import ReplayActivities
from tests.test_replay import scripted_activities, start_input

PREPARATION: list[str] = [
    Activity.VALIDATE_MANIFEST,
    Activity.CREATE_RUN_QUEUES,
    Activity.ENQUEUE_WAVE,
    Activity.PLAN_RUN,
    Activity.PROVISION_COMPUTE,
]


def nth_time(activity: str | None, n: int) -> Callable[[list[str], int], bool]:
    """A predicate true the ``n``-th time ``activity`` is pending (None: only a timer is)."""
    seen = {"count": 0}

    def predicate(pending: list[str], generation: int) -> bool:
        hit = (not pending) if activity is None else activity in pending
        if hit:
            seen["count"] += 1
        return hit and seen["count"] == n

    return predicate


def cancelled_run(
    schema: int, activity: str | None, n: int = 1, fake: ReplayActivities | None = None
) -> tuple[ReplayRun, ReplayActivities]:
    fake = fake or scripted_activities(polls_to_finish=100)
    driver = ReplayDriver(
        run_orchestrator,
        fake,
        schema=schema,
        raise_event_when=(nth_time(activity, n), CANCEL_EVENT),
    )
    return driver.run(start_input()), fake


def assert_cancelled_with_teardown(run: ReplayRun, fake: ReplayActivities) -> None:
    assert run.output["phase"] == "cancelled", run.output
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert run.activity_calls[-1] == Activity.WRITE_REPORT
    assert Activity.MERGE_OUTPUTS not in run.activity_calls
    final = run.statuses[-1]
    assert final["phase"] == "cancelled"


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
@pytest.mark.parametrize("activity", PREPARATION)
def test_cancel_while_a_preparation_activity_runs(schema: int, activity: str) -> None:
    run, fake = cancelled_run(schema, activity)
    assert_cancelled_with_teardown(run, fake)
    after = run.calls_after(activity)
    # The activity in flight ends; nothing further of preparation or monitoring starts.
    for later in (*PREPARATION[PREPARATION.index(activity) + 1 :], Activity.GET_PROGRESS):
        assert later not in after, (later, after)
    # Even a cancel during validation keeps the summary that validation returned, so the
    # valid items get their not_run records.
    assert fake.script.not_run_reasons == ["RunCancelled"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
@pytest.mark.parametrize("poll", [1, 2, 3])
def test_cancel_while_get_progress_runs(schema: int, poll: int) -> None:
    # The second poll is where a wait left over from the first loop pass used to swallow
    # the event: the API answered 202 and no teardown was ever scheduled.
    run, fake = cancelled_run(schema, Activity.GET_PROGRESS, poll)
    assert_cancelled_with_teardown(run, fake)
    assert run.activity_calls.count(Activity.GET_PROGRESS) == poll
    assert fake.script.not_run_reasons == ["RunCancelled"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
@pytest.mark.parametrize("wait", [1, 2])
def test_cancel_while_the_monitor_waits_on_its_timer(schema: int, wait: int) -> None:
    run, fake = cancelled_run(schema, None, wait)
    assert_cancelled_with_teardown(run, fake)
    assert run.activity_calls.count(Activity.GET_PROGRESS) == wait
    assert fake.script.not_run_reasons == ["RunCancelled"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_cancel_while_jobs_are_resubmitted(schema: int) -> None:
    fake = scripted_activities(polls_to_finish=100, jobs_state="completed")
    run, fake = cancelled_run(schema, Activity.SUBMIT_JOBS, 1, fake)
    assert_cancelled_with_teardown(run, fake)
    assert run.activity_calls.count(Activity.SUBMIT_JOBS) == 1
    assert Activity.GET_PROGRESS not in run.calls_after(Activity.SUBMIT_JOBS)


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_cancel_in_a_later_monitor_generation(schema: int) -> None:
    # After continue_as_new the new generation creates its own wait, and a cancel lands.
    from orchestrators.run import POLLS_PER_GENERATION

    run, fake = cancelled_run(schema, Activity.GET_PROGRESS, POLLS_PER_GENERATION + 3)
    assert len(run.generations) == 3
    assert_cancelled_with_teardown(run, fake)


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_cancel_dropped_by_continue_as_new_still_wins_through_the_flag(schema: int) -> None:
    # The event was raised while the start generation continued as new, so Durable dropped
    # it; the cancel API wrote the durable flag first, and it is read before the fleet is
    # planned: no node is ever created.
    fake = scripted_activities(polls_to_finish=100)
    fake.script.cancel_flag = True
    run = ReplayDriver(run_orchestrator, fake, schema=schema).run(start_input())
    assert_cancelled_with_teardown(run, fake)
    assert Activity.PLAN_RUN not in run.activity_calls
    assert Activity.PROVISION_COMPUTE not in run.activity_calls
    assert Activity.GET_PROGRESS not in run.activity_calls
    assert fake.script.not_run_reasons == ["RunCancelled"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
@pytest.mark.parametrize("after_waves", [1, 10, 11, 25])
def test_a_flag_set_between_enqueue_generations_stops_the_run_before_its_fleet(
    schema: int, after_waves: int
) -> None:
    # 250 chunks: three enqueue generations of up to ten waves. The cancel's event is lost
    # to continue_as_new; its flag is set once `after_waves` waves were enqueued. The next
    # generation's start (or planning, in the last one) reads it: no more waves than the
    # generation had begun, no plan, no nodes.
    from orchestrators.run import WAVES_PER_GENERATION

    fake = scripted_activities(polls_to_finish=100)
    fake.script.chunks = 250
    waves = {"n": 0}

    def flagging(name: str, payload: object) -> ActivityOutcome:
        outcome = fake(name, payload)
        if name == Activity.ENQUEUE_WAVE:
            waves["n"] += 1
            if waves["n"] == after_waves:
                fake.script.cancel_flag = True
        return outcome

    run = ReplayDriver(run_orchestrator, flagging, schema=schema).run(start_input())
    assert run.output["phase"] == "cancelled", run.output
    generation_end = -(-after_waves // WAVES_PER_GENERATION) * WAVES_PER_GENERATION
    assert run.activity_calls.count(Activity.ENQUEUE_WAVE) == min(generation_end, 25)
    for never in (Activity.PLAN_RUN, Activity.PROVISION_COMPUTE, Activity.GET_PROGRESS):
        assert never not in run.activity_calls
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert fake.script.not_run_reasons == ["RunCancelled"]


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_custom_status_stays_small_whatever_an_activity_says(schema: int) -> None:
    fake = scripted_activities(fail=Activity.PROVISION_COMPUTE)
    fake_error = "x" * 100_000

    def huge_error(name: str, payload: object) -> ActivityOutcome:
        outcome = fake(name, payload)
        if outcome.error is not None:
            outcome.error = fake_error
        return outcome

    run = ReplayDriver(run_orchestrator, huge_error, schema=schema).run(start_input())
    assert run.output["phase"] == "failed"
    assert max(len(json.dumps(s)) for s in run.statuses if s) < 16 * 1024
