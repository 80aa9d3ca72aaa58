"""Replay an orchestrator through the real azure-functions-durable SDK, episode by episode.

The Durable extension calls the Python orchestrator with the whole history so far and the
schema version it speaks (``upperSchemaVersion``: V2 and V3 change the actions the SDK
emits); the SDK replays the generator against the history and answers with the actions it
wants next. Each episode here is built the way the extension builds it:

- the episode that emitted an action records it at once (``TaskScheduled`` for an
  activity, ``TimerCreated`` for a timer), so a timer that later loses a ``task_any`` is in
  history too, as in production;
- a later episode brings the completions (``TaskCompleted`` / ``TaskFailed``,
  ``TimerFired``), or an ``EventRaised``. Events may be raised at any episode, including
  while activities are scheduled and not yet completed (between ``TaskScheduled`` and
  ``TaskCompleted``), which is when a user's cancel usually lands.

At every episode the actions emitted so far must be a prefix of the actions emitted with
the longer history: that is the determinism the host checks ("non-deterministic workflow
detected"). ``continue_as_new`` starts a new history with the new input; events not yet
taken are dropped, as the extension drops them by default.
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
# upperSchemaVersion values the extension sends; the SDK maps them to ReplaySchema V2, V3.
SCHEMA_V2 = 1
SCHEMA_V3 = 2
PRODUCTION_SCHEMAS = (SCHEMA_V2, SCHEMA_V3)
CONTINUE_AS_NEW_ACTION = 4


@dataclass
class ActivityOutcome:
    result: Any = None
    error: str | None = None


@dataclass
class Generation:
    """One execution (until it completes or continues as new)."""

    input: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    scheduled: dict[Any, ActivityOutcome | None] = field(default_factory=dict)


@dataclass
class ReplayRun:
    generations: list[Generation] = field(default_factory=list)
    activity_calls: list[str] = field(default_factory=list)
    statuses: list[Any] = field(default_factory=list)
    episodes: int = 0
    replayed_events: int = 0  # history events handed to the SDK, summed over every episode

    @property
    def output(self) -> Any:
        return self.generations[-1].state.get("output")

    @property
    def final_state(self) -> dict[str, Any]:
        return self.generations[-1].state

    def calls_after(self, name: str) -> list[str]:
        """Activity calls scheduled after the first call of ``name``."""
        index = self.activity_calls.index(name)
        return self.activity_calls[index + 1 :]


class ReplayDriver:
    """Runs ``orchestrator`` to completion through ``Orchestrator.handle``.

    ``activity`` answers each scheduled activity (called when the activity is scheduled;
    its completion lands in a later episode). ``raise_event_at`` maps an episode number
    (counted over the whole run) to an event name raised in that episode, before anything
    else completes; ``raise_event_when`` raises an event in the first episode where the
    predicate over (activity names pending, generation index) holds.
    """

    def __init__(
        self,
        orchestrator: Callable[[Any], Generator[Any, Any, Any]],
        activity: Callable[[str, Any], ActivityOutcome],
        *,
        schema: int = SCHEMA_V3,
        raise_event_at: dict[int, str] | None = None,
        raise_event_when: tuple[Callable[[list[str], int], bool], str] | None = None,
        timer_step: timedelta = timedelta(seconds=30),
        max_episodes: int = 2000,
        one_completion_per_episode: bool = False,
    ) -> None:
        self._orchestrator = orchestrator
        self._activity = activity
        self._schema = schema
        self._events = dict(raise_event_at or {})
        self._event_when = raise_event_when
        self._timer_step = timer_step
        self._max_episodes = max_episodes
        self._one_at_a_time = one_completion_per_episode
        self._clock = START
        self._episode = 0
        self._event_id = 0
        self._generation_index = 0

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
                run.episodes = self._episode
                if self._episode > self._max_episodes:
                    raise AssertionError("the orchestration did not finish")
                run.replayed_events += len(generation.history)
                state, context = self._handle(generation)
                actions = _flat(state.get("actions") or [])
                # Determinism: what was emitted before is emitted again, in the same order.
                previous = generation.actions
                assert _comparable(actions[: len(previous)]) == _comparable(previous), (
                    "replay emitted different actions for the same history"
                )
                generation.actions = actions
                generation.state = state
                run.statuses.append(state.get("customStatus"))
                continue_as_new = [
                    a for a in actions if a.get("actionType") == CONTINUE_AS_NEW_ACTION
                ]
                if state.get("isDone") or continue_as_new:
                    break
                self._schedule(generation, context, run)
                self._generation_index = len(run.generations) - 1
                self._wake(generation, context)
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
                "upperSchemaVersion": self._schema,
            }
        )
        context = DurableOrchestrationContext.from_json(body)
        state = json.loads(Orchestrator(self._orchestrator).handle(context))
        return state, context

    def _pending(self, context: DurableOrchestrationContext) -> list[tuple[Any, Any]]:
        pending: list[tuple[Any, Any]] = []
        for key, value in list(context.open_tasks.items()):
            for task in value if isinstance(value, list) else [value]:
                pending.append((key, task))
        return pending

    def _schedule(
        self, generation: Generation, context: DurableOrchestrationContext, run: ReplayRun
    ) -> None:
        """Record the actions this episode emitted, as the extension does before it ends."""
        for key, task in self._pending(context):
            if key in generation.scheduled or isinstance(key, str):
                continue  # already recorded, or an external event wait (nothing to record)
            if _is_activity(task):
                name, payload = _activity_call(task)
                run.activity_calls.append(name)
                generation.scheduled[key] = self._activity(name, payload)
                generation.history.append(
                    self._event(HistoryEventType.TASK_SCHEDULED, EventId=key, Name=name)
                )
            else:
                generation.scheduled[key] = None
                generation.history.append(
                    self._event(HistoryEventType.TIMER_CREATED, EventId=key, FireAt=_fire_at(task))
                )
        generation.history.append(self._event(HistoryEventType.ORCHESTRATOR_COMPLETED))

    def _wake(self, generation: Generation, context: DurableOrchestrationContext) -> None:
        """The next episode's new events: an event, the activities' results, or a timer."""
        pending = self._pending(context)
        assert pending, "the orchestrator waits on nothing"
        history = generation.history
        history.append(self._event(HistoryEventType.ORCHESTRATOR_STARTED))
        activities = [(k, t) for k, t in pending if not isinstance(k, str) and _is_activity(t)]
        event_name = self._events.pop(self._episode, None)
        if event_name is None and self._event_when is not None:
            predicate, name = self._event_when
            names = [_activity_call(t)[0] for _, t in activities]
            if predicate(names, self._generation_index):
                event_name, self._event_when = name, None
        if event_name is not None:
            history.append(
                self._event(HistoryEventType.EVENT_RAISED, Name=event_name, Input="null")
            )
            return
        retry_timers = [(k, t) for k, t in pending if _is_retry_timer(t)]
        if self._one_at_a_time:
            # Completions arriving one per episode, as a fan-out's results trickle in.
            activities, retry_timers = activities[:1], retry_timers[: 0 if activities else 1]
        if activities or retry_timers:
            for key, _ in activities:
                outcome = generation.scheduled[key]
                assert outcome is not None
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
            for key, task in retry_timers:
                history.append(
                    self._event(HistoryEventType.TIMER_FIRED, TimerId=key, FireAt=_fire_at(task))
                )
            return
        timers = [(k, t) for k, t in pending if type(t).__name__ == "TimerTask"]
        assert timers, f"nothing to complete among {pending}"
        self._clock += self._timer_step
        for key, task in timers:
            history.append(
                self._event(HistoryEventType.TIMER_FIRED, TimerId=key, FireAt=_fire_at(task))
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


def _flat(actions: list[Any]) -> list[dict[str, Any]]:
    # V1 answers a list of lists of actions, V2/V3 one list: the order is what matters.
    flat: list[dict[str, Any]] = []
    for entry in actions:
        if isinstance(entry, list):
            flat.extend(entry)
        else:
            flat.append(entry)
    return flat


def _comparable(value: Any) -> Any:
    # Cancelling a timer that lost a task_any flips its action's isCanceled flag afterwards;
    # the extension does not compare that flag, so neither do we (nested actions included).
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k != "isCanceled"}
    return value


def _fire_at(task: Any) -> str:
    action = _action(task)
    fire_at = getattr(action, "fire_at", None)
    return str(fire_at) if fire_at is not None else START.isoformat()


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


def _activity_call(task: Any) -> tuple[str, Any]:
    action = _action(task)
    if getattr(task, "_api_name", "") == "NoOpAction":
        # A retry re-schedules the parent's activity: find it through the retry wrapper.
        action = task.parent.actions
        if isinstance(action, list):
            action = action[0]
    payload = action.input_
    return str(action.function_name), json.loads(payload) if isinstance(payload, str) else payload
