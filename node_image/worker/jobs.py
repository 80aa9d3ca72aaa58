"""In-flight state: deliveries (received messages), their items, and what item threads report.

Who writes what: the loop thread alone writes every field here (outcomes included). An item
thread reads its job's delivery and item, watches two thread-safe signals the loop raises
(the cancel token and ``abandoned``), and reports its outcome as a :class:`Finished` on the
loop's queue; it never assigns to a job.

A finished item's terminal record waits on its job (``pending``) until every item of its
message has one or an outcome: then the loop records them together, one ledger transaction
per shard, and only then are they terminal (their message may be deleted).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from batchctl.contracts import ItemResult, ItemStatus, ManifestItem, WorkItem

from .leases import Lease
from .policy import Outcome
from .taskapi import CancelToken


# eq=False: identity is what matters (a job is looked up with `is`, a delivery removed from a
# list), and field-wise comparison would walk the jobs, which point back at their delivery.
@dataclass(eq=False)
class Delivery:
    """One received message and the items it carries."""

    lease: Lease
    work: WorkItem
    jobs: list[ItemJob] = field(default_factory=list)
    finished: bool = False

    @property
    def attempt(self) -> int:
        return self.lease.attempt

    def resolved(self) -> bool:
        return all(job.outcome is not None for job in self.jobs)

    def ready(self) -> bool:
        """Every item is done with its work: it has an outcome, a record waiting to be
        written, or it follows a job whose record waits (that job's message writes it)."""
        return all(job.done_working() for job in self.jobs)

    def unrecorded(self) -> list[ItemJob]:
        """The jobs whose records wait for this message's write."""
        return [job for job in self.jobs if job.outcome is None and job.pending is not None]


@dataclass(eq=False)
class ItemJob:
    """One item of one delivery."""

    delivery: Delivery
    item: ManifestItem
    token: CancelToken = field(default_factory=CancelToken)
    # Set by the loop when it gave the item's message back without waiting for its thread
    # (a task ignoring its timeout, the end of the shutdown grace): the thread then records
    # nothing, since the item will run again elsewhere.
    abandoned: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    started_at: float | None = None
    # Jobs of other deliveries for the same item, waiting on this one's outcome.
    followers: list[ItemJob] = field(default_factory=list)
    # The job this one follows, if it is a follower.
    leader: ItemJob | None = None
    # The item's terminal record, finished but not written yet (see the module docstring).
    pending: ItemResult | None = None

    def done_working(self) -> bool:
        """No thread works on it any more: an outcome, or a record waiting to be written."""
        if self.outcome is not None or self.pending is not None:
            return True
        return self.leader is not None and self.leader.pending is not None

    def in_flight(self) -> bool:
        """Queued or running here: no outcome, no record waiting, not given up."""
        return self.outcome is None and self.pending is None and not self.abandoned.is_set()


@dataclass(frozen=True, eq=False)
class Finished:
    """An item thread's report to the loop: the only way its outcome reaches the job."""

    job: ItemJob
    outcome: Outcome
    # The status of the terminal record this worker wrote, when it was the item's first.
    recorded: ItemStatus | None = None
    # A terminal record for the loop to write with the rest of the message's (outcome
    # "terminal" once written; "retry" when it cannot be).
    pending: ItemResult | None = None
