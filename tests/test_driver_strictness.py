"""The local driver is no kinder than Durable: the same small orchestrations, with events
raised at the same moments, end the same way under the local driver and under the real
Durable SDK (replayed with production's history shape)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from datetime import timedelta
from typing import Any

import pytest

from batchctl.local.driver import LocalDriver
from tests.durable_replay import PRODUCTION_SCHEMAS, ActivityOutcome, ReplayDriver

Orchestrator = Callable[[Any], Generator[Any, Any, Any]]


def stale_wait_orchestrator(context: Any) -> Generator[Any, Any, Any]:
    """The old monitor's pattern: a new wait each loop pass, the activity awaited alone."""
    for _ in range(2):
        yield context.call_activity("poll", None)
        timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=0.3))
        event = context.wait_for_external_event("cancel")
        winner = yield context.task_any([timer, event])
        if winner is event:
            timer.cancel()
            return "cancelled"
    return "not cancelled"


def one_wait_orchestrator(context: Any) -> Generator[Any, Any, Any]:
    """Ours: one wait per generation, awaited with every activity and every timer."""
    event = context.wait_for_external_event("cancel")
    for _ in range(2):
        winner = yield context.task_any([context.call_activity("poll", None), event])
        if winner is event:
            return "cancelled"
        timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=0.3))
        winner = yield context.task_any([timer, event])
        if winner is event:
            timer.cancel()
            return "cancelled"
    return "not cancelled"


def across_continue_as_new(context: Any) -> Generator[Any, Any, Any]:
    """An event raised while the first generation runs, before any wait for it exists."""
    generation = context.get_input() or 0
    if generation == 0:
        yield context.call_activity("poll", None)
        context.continue_as_new(1)
        return None
    timer = context.create_timer(context.current_utc_datetime + timedelta(seconds=0.3))
    event = context.wait_for_external_event("cancel")
    winner = yield context.task_any([timer, event])
    return "cancelled" if winner is event else "dropped"


def local_outcome(orchestrator: Orchestrator, raise_on_poll: int) -> Any:
    polls = {"n": 0}
    driver: LocalDriver

    def poll(_: Any) -> None:
        polls["n"] += 1
        if polls["n"] == raise_on_poll:
            driver.raise_event("cancel")  # while this activity runs

    driver = LocalDriver(orchestrator, {"poll": poll})
    return driver.run(0)


def durable_outcome(orchestrator: Orchestrator, raise_on_poll: int, schema: int) -> Any:
    seen = {"n": 0}

    def when(pending: list[str], generation: int) -> bool:
        if "poll" in pending:
            seen["n"] += 1
        return "poll" in pending and seen["n"] == raise_on_poll

    driver = ReplayDriver(
        orchestrator,
        lambda name, payload: ActivityOutcome(None),
        schema=schema,
        raise_event_when=(when, "cancel"),
        timer_step=timedelta(seconds=1),
    )
    return driver.run(0).output


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
@pytest.mark.parametrize(
    ("orchestrator", "raise_on_poll", "expected"),
    [
        # The stale wait of the first pass swallows an event raised during the second poll:
        # Durable loses the cancel, and so does the local driver (no kinder than Azure).
        (stale_wait_orchestrator, 2, "not cancelled"),
        (one_wait_orchestrator, 1, "cancelled"),
        (one_wait_orchestrator, 2, "cancelled"),
        # An event no wait took is discarded by continue_as_new, in both.
        (across_continue_as_new, 1, "dropped"),
    ],
    ids=["stale-wait-swallows", "one-wait-first-poll", "one-wait-second-poll", "continue-as-new"],
)
def test_local_driver_and_durable_agree(
    orchestrator: Orchestrator, raise_on_poll: int, expected: str, schema: int
) -> None:
    assert durable_outcome(orchestrator, raise_on_poll, schema) == expected
    assert local_outcome(orchestrator, raise_on_poll) == expected


def test_an_activity_awaited_again_after_losing_a_task_any_runs_once() -> None:
    calls: list[int] = []

    def orchestrator(context: Any) -> Generator[Any, Any, Any]:
        work = context.call_activity("work", None)
        timer = context.create_timer(context.current_utc_datetime)
        winner = yield context.task_any([work, timer])
        assert winner is timer
        return (yield work)

    def work(_: Any) -> int:
        import time

        time.sleep(0.2)
        calls.append(1)
        return 7

    assert LocalDriver(orchestrator, {"work": work}).run(None) == 7
    assert calls == [1]
