"""Run an orchestrator generator on one machine: the local stand-in for the Durable runtime.

Not a second orchestration: it drives the very generator that Azure runs, offering the
subset of ``DurableOrchestrationContext`` that it uses (activities with and without retry,
``task_all``, ``task_any``, timers, external events, ``continue_as_new``, custom status,
``current_utc_datetime``, ``new_uuid``). Activity inputs and results go through JSON exactly
as they would through Durable history, so a payload that would not serialize in Azure fails
here too. There is no replay: each generation runs once, start to end.

External events behave as Durable's do, not more kindly: an event completes the LAST wait
for its name that the generator has yielded and that is still open (a stale wait from an
earlier loop pass swallows it, as in the Durable Python SDK); an event raised before any
wait for it was yielded is kept for the first one yielded in the same generation; and
``continue_as_new`` discards every event not yet taken, as Durable does by default.

A task yielded a second time (for example an activity that lost a ``task_any`` and is then
awaited to its end) is not started again: every task starts once and keeps its future.
"""

from __future__ import annotations

import json
import logging
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
log = logging.getLogger(__name__)


class LocalTask:
    """A task the generator yields; ``result`` is set once the driver resolves it."""

    def __init__(self) -> None:
        self.result: Any = None
        self.is_completed = False
        self.future: Future[Any] | None = None  # set when the driver first starts it


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
        self.timer: threading.Timer | None = None
        self.stopped = threading.Event()  # a watched timer's thread ends at once on cancel

    def cancel(self) -> None:
        self.cancelled = True
        self.stopped.set()
        if self.timer is not None:
            self.timer.cancel()


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

    ``wait_over``: asked every ``wait_check_s`` while a timer longer than that is pending;
    True fires the timer at once (a local run whose last record is in: the monitor polls
    then, not when it planned to). Durable never fires a timer early; the orchestrator must
    not care when one fires, only that it did (a poll reads the time it runs at). One
    outcome can differ from Azure's: a cancel that comes between the last record and the
    poll Azure would have made finds the run completed, not cancelled.
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
        on_generation: Callable[[Any], None] | None = None,
        wait_over: Callable[[], bool] | None = None,
        wait_check_s: float = 0.1,
    ) -> None:
        if wait_check_s <= 0:
            raise ValueError(f"wait_check_s must be positive, not {wait_check_s}")
        self._orchestrator = orchestrator
        self._wait_over = wait_over
        self._wait_check_s = wait_check_s
        # Called with each generation's input before it runs: Durable keeps that input in
        # storage, and a local run keeps it in its folder (batchctl resume starts from it).
        self._on_generation = on_generation
        self._activities = dict(activities)
        self._on_status = on_status
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="activity")
        self._retry_scale = retry_interval_scale
        # Events raised before any wait for them was yielded, and the waits yielded and
        # still open, per event name (see the module docstring for the Durable rules).
        self._buffered: dict[str, deque[Any]] = {}
        self._waiters: dict[str, list[EventTask]] = {}
        self._lock = threading.RLock()
        self.instance_id = instance_id or uuid.uuid4().hex
        self.custom_status: Any = None
        self.generations = 0
        self.activity_calls: list[str] = []

    # -- what the outside world calls -----------------------------------------------------------
    def raise_event(self, name: str, data: Any = None) -> None:
        """Deliver an external event (thread-safe), like ``client.raise_event``."""
        with self._lock:
            waiters = self._waiters.get(name)
            if waiters:
                waiter = waiters.pop()  # the last one yielded, as in the Durable SDK
                self._resolve_future(waiter, data)
            else:
                self._buffered.setdefault(name, deque()).append(data)

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
                if self._on_generation is not None:
                    self._on_generation(current)
                context = LocalContext(self, current, self.instance_id)
                output = self._drive(self._orchestrator(context))
                if not context.continued:
                    return json.loads(json.dumps(output))
                current = context.continued_with
                with self._lock:
                    # Durable discards events not yet taken when an orchestration continues
                    # as new; so does this driver, so local runs are not kinder than Azure.
                    self._buffered.clear()
                    self._waiters.clear()
        finally:
            self._pool.shutdown(wait=True)

    # -- the engine ---------------------------------------------------------------------------
    def _drive(self, generator: Generator[Any, Any, Any]) -> Any:
        try:
            task = next(generator)
            while True:
                try:
                    value = self._start(task).result()
                except Exception as error:
                    task = generator.throw(error)
                else:
                    task = generator.send(value)
        except StopIteration as stop:
            return stop.value

    def _start(self, task: Any) -> Future[Any]:
        """The task's future, starting the task the first time it is yielded."""
        if not isinstance(task, LocalTask):
            raise TypeError(f"the orchestrator yielded {task!r}, which is not a task")
        with self._lock:
            if task.future is not None:
                return task.future
            task.future = Future()
        if isinstance(task, ActivityTask):
            self._pool.submit(self._run_activity_into, task)
        elif isinstance(task, TimerTask):
            delay = (task.fire_at - datetime.now(UTC)).total_seconds()
            if self._wait_over is not None and delay > self._wait_check_s:
                threading.Thread(
                    target=self._watch_timer, args=(task, delay), name="timer", daemon=True
                ).start()
            else:
                task.timer = threading.Timer(max(0.0, delay), self._resolve_future, (task, None))
                task.timer.daemon = True
                task.timer.start()
        elif isinstance(task, EventTask):
            with self._lock:
                buffered = self._buffered.get(task.name)
                if buffered:
                    self._resolve_future(task, buffered.popleft())
                else:
                    self._waiters.setdefault(task.name, []).append(task)
        elif isinstance(task, WhenAll):
            self._start_when_all(task)
        elif isinstance(task, WhenAny):
            self._start_when_any(task)
        return task.future

    def _watch_timer(self, task: TimerTask, delay_s: float) -> None:
        """Fire ``task`` after ``delay_s``, or as soon as ``wait_over`` says so."""
        assert self._wait_over is not None
        deadline = time.monotonic() + delay_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or task.stopped.wait(min(self._wait_check_s, left)):
                break
            try:
                if self._wait_over():
                    break
            except Exception:  # a check that fails leaves the timer to its own time
                log.debug("the early end of a timer could not be checked", exc_info=True)
        if not task.cancelled:
            self._resolve_future(task, None)

    def _start_when_all(self, task: WhenAll) -> None:
        children = [self._start(child) for child in task.tasks]
        if not children:
            self._resolve_future(task, [])
            return
        remaining = {"count": len(children)}

        def on_child(future: Future[Any]) -> None:
            with self._lock:
                if task.is_completed:
                    return
                error = future.exception()
                if error is not None:
                    self._fail_future(task, error)
                    return
                remaining["count"] -= 1
                done = remaining["count"] == 0
            if done:
                self._resolve_future(task, [child.result for child in task.tasks])

        for child in children:
            child.add_done_callback(on_child)

    def _start_when_any(self, task: WhenAny) -> None:
        def on_child(child: LocalTask) -> Callable[[Future[Any]], None]:
            def done(_: Future[Any]) -> None:
                # A failed child also wins a task_any (Durable's WhenAny does the same);
                # the generator sees the failure when it yields that child.
                self._resolve_future(task, child)

            return done

        for child in task.tasks:
            self._start(child).add_done_callback(on_child(child))

    def _resolve_future(self, task: LocalTask, value: Any) -> None:
        with self._lock:
            if task.future is None or task.future.done():
                return
            task.result = value
            task.is_completed = True
            future = task.future
        future.set_result(value)

    def _fail_future(self, task: LocalTask, error: BaseException) -> None:
        with self._lock:
            if task.future is None or task.future.done():
                return
            task.is_completed = True
            future = task.future
        future.set_exception(error)

    def _run_activity_into(self, task: ActivityTask) -> None:
        try:
            value = self._run_activity(task)
        except BaseException as error:
            self._fail_future(task, error)
        else:
            self._resolve_future(task, value)

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
