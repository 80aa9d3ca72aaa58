"""Replay an orchestrator through the real azure-functions-durable SDK, episode by episode.

The Durable extension calls the Python orchestrator with the whole history so far; the SDK
replays the generator against it and answers with the actions it wants next. Here each
episode is built the same way: the pending tasks the SDK opened (by its own ids) are
completed by appending the history events the extension would append (TaskScheduled +
TaskCompleted/TaskFailed, TimerCreated + TimerFired, EventRaised), then the generator is run
again from the top. At every episode the actions emitted so far must be a prefix of the
actions emitted with the longer history: that is the determinism the host checks when it
says "non-deterministic workflow detected".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.durable_functions import DurableOrchestrationContext, Orchestrator
from azure.durable_functions.models.history import HistoryEventType

START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class ActivityOutcome:
    result: Any = None
    error: str | None = None


@dataclass
class Generation:
    """One execution (until it completes or continues as new)."""

    input: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    actions: list[list[dict[str, Any]]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplayRun:
    generations: list[Generation] = field(default_factory=list)
    activity_calls: list[str] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)

    @property
    def output(self) -> Any:
        return self.generations[-1].state.get("output")

    @property
    def final_state(self) -> dict[str, Any]:
        return self.generations[-1].state


class ReplayDriver:
    """Runs ``orchestrator`` to completion through ``Orchestrator.handle``.

    ``activity`` answers each scheduled activity; ``raise_event_at`` maps an episode number
    (counted over the whole run) to an event name raised instead of firing pending timers.
    """

    def __init__(
        self,
        orchestrator: Callable[[Any], Generator[Any, Any, Any]],
        activity: Callable[[str, Any], ActivityOutcome],
        *,
        raise_event_at: dict[int, str] | None = None,
        timer_step: timedelta = timedelta(seconds=30),
        max_episodes: int = 2000,
    ) -> None:
        self._orchestrator = orchestrator
        self._activity = activity
        self._events = dict(raise_event_at or {})
        self._timer_step = timer_step
        self._max_episodes = max_episodes
        self._clock = START
        self._episode = 0
        self._event_id = 0

    def run(self, first_input: Any) -> ReplayRun:
        run = ReplayRun()
        payload = first_input
        while True:
            generation = Generation(input=payload)
            run.generations.append(generation)
            generation.history = [
                self._event(HistoryEventType.ORCHESTRATOR_STARTED),
                self._event(
                    HistoryEventType.EXECUTION_STARTED,
                    Name="run_orchestrator",
                    Input=json.dumps(payload),
                    Version="",
                ),
            ]
            while True:
                self._episode += 1
                if self._episode > self._max_episodes:
                    raise AssertionError("the orchestration did not finish")
                state, context = self._handle(generation)
                # Determinism: what was emitted before is emitted again, in the same order.
                previous = generation.actions
                actions = state.get("actions") or []
                assert _comparable(actions[: len(previous)]) == _comparable(previous), (
                    "replay emitted different actions for the same history"
                )
                generation.actions = actions
                generation.state = state
                run.statuses.append(state.get("customStatus"))
                continue_as_new = [
                    a for group in actions for a in group if a.get("actionType") == 4
                ]
                if state.get("isDone") or continue_as_new:
                    break
                self._advance(generation, context, run)
            if continue_as_new:
                payload = json.loads(continue_as_new[-1]["input"])
                continue
            return run

    # -- episodes ---------------------------------------------------------------------------
    def _handle(self, generation: Generation) -> tuple[dict[str, Any], DurableOrchestrationContext]:
        body = json.dumps(
            {
                "history": generation.history,
                "instanceId": "run-1",
                "isReplaying": False,
                "parentInstanceId": None,
                "input": json.dumps(generation.input),
            }
        )
        context = DurableOrchestrationContext.from_json(body)
        state = json.loads(Orchestrator(self._orchestrator).handle(context))
        return state, context

    def _advance(
        self, generation: Generation, context: DurableOrchestrationContext, run: ReplayRun
    ) -> None:
        pending: list[tuple[Any, Any]] = []
        for key, value in list(context.open_tasks.items()):
            for task in value if isinstance(value, list) else [value]:
                pending.append((key, task))
        assert pending, "the orchestrator waits on nothing"
        history = generation.history
        history.append(self._event(HistoryEventType.ORCHESTRATOR_STARTED))
        activities = [(k, t) for k, t in pending if _is_activity(t)]
        retry_timers = [(k, t) for k, t in pending if _is_retry_timer(t)]
        if activities or retry_timers:
            for key, task in activities:
                name, payload = _activity_call(task, generation)
                run.activity_calls.append(name)
                outcome = self._activity(name, payload)
                history.append(self._event(HistoryEventType.TASK_SCHEDULED, EventId=key, Name=name))
                if outcome.error is None:
                    history.append(
                        self._event(
                            HistoryEventType.TASK_COMPLETED,
                            TaskScheduledId=key,
                            Result=json.dumps(outcome.result),
                        )
                    )
                else:
                    history.append(
                        self._event(
                            HistoryEventType.TASK_FAILED,
                            TaskScheduledId=key,
                            Reason=outcome.error,
                            Details="",
                        )
                    )
            for key, _ in retry_timers:
                fire_at = self._clock.isoformat()
                history.append(
                    self._event(HistoryEventType.TIMER_CREATED, EventId=key, FireAt=fire_at)
                )
                history.append(
                    self._event(HistoryEventType.TIMER_FIRED, TimerId=key, FireAt=fire_at)
                )
            return
        event_name = self._events.pop(self._episode, None)
        if event_name is not None:
            history.append(
                self._event(HistoryEventType.EVENT_RAISED, Name=event_name, Input="null")
            )
            return
        timers = [(k, t) for k, t in pending if type(t).__name__ == "TimerTask"]
        assert timers, f"nothing to complete among {pending}"
        self._clock += self._timer_step
        for key, task in timers:
            fire_at = task.action_repr.fire_at if hasattr(task.action_repr, "fire_at") else ""
            history.append(
                self._event(HistoryEventType.TIMER_CREATED, EventId=key, FireAt=str(fire_at))
            )
            history.append(
                self._event(HistoryEventType.TIMER_FIRED, TimerId=key, FireAt=str(fire_at))
            )

    def _event(self, event_type: HistoryEventType, **fields: Any) -> dict[str, Any]:
        self._event_id += 1
        if event_type == HistoryEventType.ORCHESTRATOR_STARTED:
            self._clock += timedelta(milliseconds=10)
        return {
            "EventType": int(event_type),
            "EventId": fields.pop("EventId", -1),
            "IsPlayed": False,
            "Timestamp": self._clock.isoformat(),
            **fields,
        }


def _comparable(actions: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    # Cancelling a timer that lost a task_any flips its action's isCanceled flag afterwards;
    # the extension does not compare that flag, so neither do we.
    return [[{k: v for k, v in a.items() if k != "isCanceled"} for a in group] for group in actions]


def _is_activity(task: Any) -> bool:
    name = getattr(task, "_api_name", "")
    if name in ("CallActivityAction", "CallActivityWithRetryAction"):
        return True
    return name == "NoOpAction" and "rescheduled" in str(getattr(_action(task), "metadata", ""))


def _is_retry_timer(task: Any) -> bool:
    return getattr(task, "_api_name", "") == "NoOpAction" and not _is_activity(task)


def _action(task: Any) -> Any:
    action = task.action_repr
    return action[0] if isinstance(action, list) else action


def _activity_call(task: Any, generation: Generation) -> tuple[str, Any]:
    action = _action(task)
    if getattr(task, "_api_name", "") == "NoOpAction":
        # A retry re-schedules the parent's activity: find it through the retry wrapper.
        action = task.parent.actions
        if isinstance(action, list):
            action = action[0]
    payload = action.input_
    return str(action.function_name), json.loads(payload) if isinstance(payload, str) else payload
