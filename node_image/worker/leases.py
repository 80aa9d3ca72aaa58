"""Leases on the run's input queue: receive, renew visibility, release, delete, count.

This is the worker's only queue I/O, and one thread owns it: the loop thread (as Dramatiq's
consumer owns the broker). Item threads never touch the queue; they report outcomes to the
loop, which then deletes or releases here. :class:`Leases` refuses a call from any other
thread, so a change that would break the rule fails loudly instead of racing a receipt
(every visibility update replaces the message's pop receipt; two threads updating one
message would lose one of the receipts).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from batchctl.storage import QueueMessage

from .policy import renew_interval

log = logging.getLogger(__name__)

# After a failed renewal (not a lost message), try again this soon.
RENEW_RETRY_S = 2.0


class WorkQueue(Protocol):
    """What the loop needs of a run's input queue (``RunQueues`` has exactly this)."""

    def receive(self, max_messages: int, *, visibility_timeout: int) -> list[QueueMessage]: ...

    def update_visibility(self, message: QueueMessage, visibility_timeout: int) -> QueueMessage: ...

    def delete_message(self, message: QueueMessage) -> None: ...

    def approximate_count(self) -> int:
        """Messages in the queue, hidden ones included (Azure's count is never lower)."""
        ...


@dataclass
class Lease:
    """A received message, hidden while this worker holds it (loop thread only)."""

    message: QueueMessage
    visibility_s: int
    renew_at: float
    # The receipt went stale (the message reappeared and another worker holds it): its
    # results still count (first record wins), but it can no longer be renewed or deleted.
    lost: bool = False

    @property
    def attempt(self) -> int:
        return max(1, self.message.dequeue_count)


class Leases:
    """The input queue as leases. Storage errors are logged and absorbed: each has a fallback
    (poll again, the message reappears at its timeout, a recorded item is skipped)."""

    def __init__(self, queue: WorkQueue) -> None:
        self._queue = queue
        self._owner: int | None = None

    def _check_thread(self) -> None:
        # Bound to the first thread that uses the queue: the loop thread.
        current = threading.get_ident()
        if self._owner is None:
            self._owner = current
        elif current != self._owner:
            raise RuntimeError(
                f"queue I/O from thread {threading.current_thread().name}: only the loop "
                "thread may touch the queue (see node_image/worker/leases.py)"
            )

    def receive(self, wanted: int, visibility_s: int) -> list[QueueMessage]:
        """Up to ``wanted`` messages hidden for ``visibility_s``; none on a storage hiccup."""
        self._check_thread()
        try:
            return self._queue.receive(wanted, visibility_timeout=visibility_s)
        except Exception as error:  # a storage hiccup: log it and poll again later
            log.warning("receive failed: %s", error)
            return []

    def renew(self, lease: Lease, now: float) -> None:
        """Extend the lease's visibility; a stale receipt marks it lost."""
        self._check_thread()
        try:
            lease.message = self._queue.update_visibility(lease.message, lease.visibility_s)
            lease.renew_at = now + renew_interval(lease.visibility_s)
        except Exception as error:  # decided from the status below
            if getattr(error, "status_code", None) in (400, 404):
                lease.lost = True
                log.warning("lost message %s (%s)", lease.message.id, error)
            else:
                lease.renew_at = now + RENEW_RETRY_S
                log.warning("renewing %s failed, retrying: %s", lease.message.id, error)

    def release(self, lease: Lease, delay_s: int) -> bool:
        """Make the message visible again after ``delay_s``; False if that failed."""
        self._check_thread()
        try:
            self._queue.update_visibility(lease.message, delay_s)
        except Exception as error:  # it reappears at its timeout anyway
            log.warning("releasing %s failed: %s", lease.message.id, error)
            return False
        return True

    def delete(self, message: QueueMessage) -> None:
        """Delete a message whose items are all recorded (or that can never be processed)."""
        self._check_thread()
        try:
            self._queue.delete_message(message)
        except Exception as error:  # it reappears, and its recorded items are skipped
            log.warning(
                "deleting %s failed (%s): it will reappear and be skipped", message.id, error
            )

    def count(self) -> int | None:
        """The queue's approximate count, hidden messages included; None when unknown."""
        self._check_thread()
        try:
            return self._queue.approximate_count()
        except Exception as error:  # unknown: the caller keeps polling
            log.warning("queue count failed (%s): staying", error)
            return None
