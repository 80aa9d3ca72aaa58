"""Run an orchestrator generator on one machine: the local stand-in for the Durable runtime.

Not a second orchestration: it drives the very generator that Azure runs, offering the
subset of ``DurableOrchestrationContext`` that it uses (activities with and without retry,
``task_all``, ``task_any``, timers, external events, ``continue_as_new``, custom status,
``current_utc_datetime``, ``new_uuid``). Activity inputs and results go through JSON exactly
as they would through Durable history, so a payload that would not serialize in Azure fails
here too. There is no replay: each generation runs once, start to end.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

ActivityFunction = Callable[[Any], Any]
OrchestratorFunction = Callable[[Any], Generator[Any, Any, Any]]


class LocalTask:
    """A task the generator yields; ``result`` is set once the driver resolves it."""

    def __init__(self) -> None:
        self.result: Any = None
        self.is_completed = False


class ActivityTask(LocalTask):
    def __init__(self, name: str, payload: Any, retry: Any | None) -> None:
        super().__init__()
        self.name = name
        self.payload = payload
        self.retry = retry


class TimerTask(LocalTask):
    def __init__(self, fire_at: datetime) -> None:
        super().__init__()
        self.fire_at = fire_at
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventTask(LocalTask):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class WhenAll(LocalTask):
    def __init__(self, tasks: Sequence[LocalTask]) -> None:
        super().__init__()
        self.tasks = list(tasks)


class WhenAny(LocalTask):
    def __init__(self, tasks: Sequence[LocalTask]) -> None:
        super().__init__()
        self.tasks = list(tasks)


class ActivityError(Exception):
    """An activity failed after its retries; shaped like the Durable SDK's task failure."""


class LocalContext:
    """The orchestration context the generator sees."""

    def __init__(self, driver: LocalDriver, payload: Any, instance_id: str) -> None:
        self._driver = driver
        self._input = payload
        self.instance_id = instance_id
        self.continued_with: Any = None
        self.continued = False

    def get_input(self) -> Any:
        return self._input

    @property
    def current_utc_datetime(self) -> datetime:
        return datetime.now(UTC)

    def new_uuid(self) -> str:
        return str(uuid.uuid4())

    def call_activity(self, name: str, input_: Any = None) -> ActivityTask:
        return ActivityTask(str(name), input_, None)

    def call_activity_with_retry(
        self, name: str, retry_options: Any, input_: Any = None
    ) -> ActivityTask:
        return ActivityTask(str(name), input_, retry_options)

    def task_all(self, tasks: Sequence[LocalTask]) -> WhenAll:
        return WhenAll(tasks)

    def task_any(self, tasks: Sequence[LocalTask]) -> WhenAny:
        return WhenAny(tasks)

    def create_timer(self, fire_at: datetime) -> TimerTask:
        return TimerTask(fire_at)

    def wait_for_external_event(self, name: str) -> EventTask:
        return EventTask(name)

    def continue_as_new(self, input_: Any) -> None:
        self.continued = True
        self.continued_with = json.loads(json.dumps(input_))

    def set_custom_status(self, status: Any) -> None:
        self._driver.set_custom_status(json.loads(json.dumps(status)))


class LocalDriver:
    """Drives an orchestrator generator to completion, with activities run in this process.

    ``retry_interval_scale`` shrinks retry waits (tests use 0); ``max_parallel`` bounds how
    many activities of one ``task_all`` run at once.
    """

    def __init__(
        self,
        orchestrator: OrchestratorFunction,
        activities: Mapping[str, ActivityFunction],
        *,
        on_status: Callable[[Any], None] | None = None,
        max_parallel: int = 8,
        retry_interval_scale: float = 1.0,
        instance_id: str | None = None,
    ) -> None:
        self._orchestrator = orchestrator
        self._activities = dict(activities)
        self._on_status = on_status
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="activity")
        self._retry_scale = retry_interval_scale
        self._events: dict[str, deque[Any]] = {}
        self._wakeup = threading.Condition()
        self.instance_id = instance_id or uuid.uuid4().hex
        self.custom_status: Any = None
        self.generations = 0
        self.activity_calls: list[str] = []

    # -- what the outside world calls -----------------------------------------------------------
    def raise_event(self, name: str, data: Any = None) -> None:
        """Deliver an external event (thread-safe), like ``client.raise_event``."""
        with self._wakeup:
            self._events.setdefault(name, deque()).append(data)
            self._wakeup.notify_all()

    def set_custom_status(self, status: Any) -> None:
        self.custom_status = status
        if self._on_status is not None:
            self._on_status(status)

    def run(self, payload: Any) -> Any:
        """Run generations until one returns without ``continue_as_new``; its output."""
        current = json.loads(json.dumps(payload))
        try:
            while True:
                self.generations += 1
                context = LocalContext(self, current, self.instance_id)
                output = self._drive(self._orchestrator(context))
                if not context.continued:
                    return json.loads(json.dumps(output))
                current = context.continued_with
        finally:
            self._pool.shutdown(wait=True)

    # -- the engine ---------------------------------------------------------------------------
    def _drive(self, generator: Generator[Any, Any, Any]) -> Any:
        try:
            task = next(generator)
            while True:
                try:
                    value = self._resolve(task)
                except Exception as error:
                    task = generator.throw(error)
                else:
                    task = generator.send(value)
        except StopIteration as stop:
            return stop.value

    def _resolve(self, task: Any) -> Any:
        if isinstance(task, ActivityTask):
            return self._complete(task, self._run_activity(task))
        if isinstance(task, WhenAll):
            futures = [self._start(child) for child in task.tasks]
            results = [
                self._complete(child, future.result())
                for child, future in zip(task.tasks, futures, strict=True)
            ]
            return self._complete(task, results)
        if isinstance(task, WhenAny):
            return self._complete(task, self._first_of(task.tasks))
        if isinstance(task, TimerTask):
            self._wait_until(lambda: _timer_due(task))
            return self._complete(task, None)
        if isinstance(task, EventTask):
            self._wait_until(lambda: self._event_ready(task.name))
            return self._complete(task, self._take_event(task.name))
        raise TypeError(f"the orchestrator yielded {task!r}, which is not a task")

    @staticmethod
    def _complete(task: LocalTask, value: Any) -> Any:
        task.result = value
        task.is_completed = True
        return value

    def _start(self, task: LocalTask) -> Future[Any]:
        if isinstance(task, ActivityTask):
            return self._pool.submit(self._run_activity, task)
        done: Future[Any] = Future()
        done.set_result(self._resolve(task))
        return done

    def _run_activity(self, task: ActivityTask) -> Any:
        function = self._activities.get(task.name)
        if function is None:
            raise ActivityError(f"no activity named {task.name!r} is registered")
        attempts = int(getattr(task.retry, "max_number_of_attempts", 1)) if task.retry else 1
        interval_s = (
            float(getattr(task.retry, "first_retry_interval_in_milliseconds", 0)) / 1000
            if task.retry
            else 0.0
        )
        payload = json.loads(json.dumps(task.payload))
        for attempt in range(1, attempts + 1):
            self.activity_calls.append(task.name)
            try:
                return json.loads(json.dumps(function(payload)))
            except Exception as error:
                if attempt == attempts:
                    raise ActivityError(
                        f"Activity function '{task.name}' failed: {type(error).__name__}: {error}"
                    ) from error
                time.sleep(interval_s * self._retry_scale)
        raise AssertionError("unreachable")

    def _first_of(self, tasks: list[LocalTask]) -> LocalTask:
        started = {
            id(task): self._pool.submit(self._run_activity, task)
            for task in tasks
            if isinstance(task, ActivityTask)
        }

        def winner() -> LocalTask | None:
            for task in tasks:
                if isinstance(task, TimerTask) and _timer_due(task):
                    self._complete(task, None)
                    return task
                if isinstance(task, EventTask) and self._event_ready(task.name):
                    self._complete(task, self._take_event(task.name))
                    return task
                if isinstance(task, ActivityTask) and started[id(task)].done():
                    self._complete(task, started[id(task)].result())
                    return task
            return None

        found: list[LocalTask] = []

        def ready() -> bool:
            chosen = winner()
            if chosen is not None:
                found.append(chosen)
            return chosen is not None

        self._wait_until(ready)
        return found[0]

    def _event_ready(self, name: str) -> bool:
        return bool(self._events.get(name))

    def _take_event(self, name: str) -> Any:
        with self._wakeup:
            return self._events[name].popleft()

    def _wait_until(self, condition: Callable[[], bool], tick_s: float = 0.05) -> None:
        # Timers are checked on a short tick; events wake us at once through the condition.
        with self._wakeup:
            while not condition():
                self._wakeup.wait(timeout=tick_s)


def _timer_due(task: TimerTask) -> bool:
    return datetime.now(UTC) >= task.fire_at
