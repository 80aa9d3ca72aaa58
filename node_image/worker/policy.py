"""The worker's policy, as small pure functions: no clock, no queue, no threads.

Every decision the loop and the item threads make about retries, delays, time limits, intake
and leaving is here, so each can be tested with plain numbers (tests/test_worker_loop.py).
"""

from __future__ import annotations

import signal
from collections.abc import Collection
from typing import Literal

from .errors import ErrorInfo

# Exit codes: 0 when the queue stayed empty (the job is done); 128 + SIGTERM when the worker
# was stopped (by a signal, or because its controller died): the job was stopped, not done.
EXIT_IDLE = 0
EXIT_STOPPED = 128 + signal.SIGTERM

# Longest delay before a retried message reappears (Azure allows up to 7 days).
MAX_RETRY_DELAY_S = 900
# Items a node holds for a task that runs one at a time: the running one and the next.
SERIAL_TASK_INTAKE = 2
# A task that ignores its cancellation is abandoned this long after its deadline.
ABANDON_AFTER_S = 30.0
# Receives on an empty queue back off from this, doubling, up to the poll interval.
EMPTY_POLL_BASE_S = 0.2

Decision = Literal["fail", "retry"]
Outcome = Literal["terminal", "retry", "released"]
Overdue = Literal["on_time", "cancel", "abandon"]
Settlement = Literal["delete", "retry", "release"]


def decide(error: ErrorInfo, attempt: int, max_attempts: int) -> Decision:
    """Permanent errors fail at once; retryable ones retry until the last allowed attempt."""
    if error.permanent or attempt >= max_attempts:
        return "fail"
    return "retry"


def after_failure(
    error: ErrorInfo,
    *,
    cancel_reason: str | None,
    abandoned: bool,
    stopping: bool,
    attempt: int,
    max_attempts: int,
) -> Decision | Literal["release"]:
    """What a failed item becomes: released (another try elsewhere), retried or failed.

    A timeout is the item's own failure (``error`` says so) and is decided like any other.
    Any other cancellation, an abandoned item, or a failure while the worker stops (a Ctrl-C
    that reached a decoder, storage gone with the node) says nothing about the item.
    """
    if cancel_reason != "timeout" and (cancel_reason is not None or abandoned or stopping):
        return "release"
    return decide(error, attempt, max_attempts)


def retry_delay(attempt: int, base_s: float, cap_s: int = MAX_RETRY_DELAY_S) -> int:
    """Seconds a retried message stays hidden: base, doubled per attempt, capped."""
    if base_s <= 0:
        return 0
    return int(min(cap_s, base_s * 2 ** max(0, attempt - 1)))


def settle(outcomes: Collection[Outcome]) -> Settlement:
    """What becomes of a message once every item it carries has an outcome.

    Deleted only when every item is terminal (its record is persisted); hidden for the retry
    delay when any item is to be retried; otherwise given back at once.
    """
    if set(outcomes) == {"terminal"}:
        return "delete"
    return "retry" if "retry" in outcomes else "release"


def overdue(elapsed_s: float, timeout_s: float) -> Overdue:
    """Past its timeout an item is cancelled; past that by ``ABANDON_AFTER_S``, abandoned."""
    if elapsed_s > timeout_s + ABANDON_AFTER_S:
        return "abandon"
    return "cancel" if elapsed_s > timeout_s else "on_time"


def may_exit_idle(
    idle_for_s: float, idle_exit_s: float, queued_messages: int, visibility_timeout_s: float
) -> bool:
    """Whether a worker idle for ``idle_for_s`` leaves, given the queue's approximate count.

    An empty queue (nothing visible, nothing hidden) ends the job at once. Hidden messages
    keep the worker for up to the visibility timeout more, so a dead node's messages are
    picked up here when they reappear (see node_image/worker/loop.py, point 7).
    """
    if idle_for_s < idle_exit_s:
        return False
    return queued_messages == 0 or idle_for_s >= idle_exit_s + visibility_timeout_s


def renew_interval(visibility_timeout_s: int) -> float:
    """Renew a third of the way in: two renewals may fail before the message reappears."""
    return max(1.0, visibility_timeout_s / 3.0)


def empty_poll_delay(empty_polls: int, poll_interval_s: float) -> float:
    """Seconds to the next receive after ``empty_polls`` empty ones: 0.2, 0.4 ... the interval."""
    return min(poll_interval_s, EMPTY_POLL_BASE_S * 2.0 ** min(empty_polls, 8))


def intake_limit(concurrency: int, prefetch: int, *, serial_task: bool) -> int:
    """How many items a node holds at once (running, downloading or waiting).

    A task that is not thread-safe runs one item at a time (a GPU node's usual case), so one
    item waiting, already downloaded, keeps it busy; more would only sit here while other
    nodes run out of work at the end of the run, stretching its tail.
    """
    limit = concurrency + prefetch
    return min(limit, SERIAL_TASK_INTAKE) if serial_task else limit


def messages_wanted(free_slots: int, mini_batch_size: int) -> int:
    """Messages to ask for: slots count items and a message carries a mini-batch of them."""
    return max(1, free_slots // mini_batch_size)
