"""Ending a run: its compute torn down, its unfinished items recorded as not run, shard
group by shard group."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    ManifestItem,
    NotRunReason,
    RunState,
)
from batchctl.manifest import iter_lines
from batchctl.services import Services

log = logging.getLogger(__name__)

NOT_RUN_MESSAGES: dict[NotRunReason, str] = {
    NotRunReason.CANCELLED: "the run was cancelled before this item had a result",
    NotRunReason.DEADLINE: "the run reached its deadline before this item had a result",
    NotRunReason.OVER_BUDGET: (
        "the run stopped over its error budget before this item had a result"
    ),
    NotRunReason.STALLED: "the run stalled (no progress) before this item had a result",
    NotRunReason.FAILED: "the run failed before this item had a result",
    NotRunReason.TERMINATED: (
        "the run's orchestration was terminated before this item had a result"
    ),
}


# The end of a run fans out over groups of the ledger's shards: at most this many activities
# at once (host.json's maxConcurrentActivityFunctions), each reading its shards' records
# and the manifest's chunks once.
END_GROUPS = 8


def shard_groups(shards: Sequence[int], groups: int = END_GROUPS) -> list[list[int]]:
    """``shards`` dealt into at most ``groups`` groups of nearly equal size, in order."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    count = min(groups, len(shards))
    return [list(shards[index::count]) for index in range(count)] if count else []


def end_shard_groups(services: Services, run_id: str) -> list[list[int]]:
    """The run's ledger shards in the groups that the end of a run works on (an activity:
    the shard count is the ledger's to say, not the orchestrator's)."""
    return shard_groups(list(services.ledger.shards(run_id)))


def record_unfinished(
    services: Services,
    state: RunState,
    reason: NotRunReason,
    shards: Iterable[int] | None = None,
) -> int:
    """A not_run record, saying why, for every valid item of the run in ``shards`` (all of
    the run's when None) without a record.

    Its cost is the records of those shards (their ids) and one read of the manifest's
    chunks, keeping only the items of those shards: the end of a run runs one call per group
    of shards, side by side, each bounded by its group's share of the run.

    Runs after teardown, so no worker of the run is still meant to be writing; one that
    still is (a node slow to stop) loses to these records, because the first record wins.
    Idempotent: a retry finds the records it wrote and writes only what is still missing.
    Returns how many records were written.
    """
    summary = state.summary
    if summary is None or not summary.chunks:
        return 0
    ledger = services.ledger
    wanted = set(ledger.shards(state.run_id) if shards is None else shards)
    recorded: set[str] = set()
    for shard in sorted(wanted):
        recorded |= ledger.recorded_ids(state.run_id, shard)
    finished_at = datetime.now(UTC)
    message = NOT_RUN_MESSAGES[reason]

    def missing() -> Iterator[ItemResult]:
        for chunk in summary.chunks:
            for item in _chunk_items_without_record(
                services, state.run_id, chunk, wanted, recorded
            ):
                recorded.add(item.item_id)  # a chunk never repeats an id, but be exact
                yield ItemResult(
                    run_id=state.run_id,
                    item_id=item.item_id,
                    status=ItemStatus.NOT_RUN,
                    source=item.source,
                    error=ItemError(
                        error_class=reason.value, message=message, permanent=False, attempts=1
                    ),
                    node="controller",
                    finished_at=finished_at,
                )

    written = ledger.record_absent(missing())
    if written:
        log.info("%d items recorded as not run (%s)", written, reason.value)
    return written


def _chunk_items_without_record(
    services: Services, run_id: str, chunk: str, shards: set[int], recorded: set[str]
) -> Iterator[ManifestItem]:
    """The chunk's items of ``shards`` that have no record (not in ``recorded``).

    Every group of shards reads every chunk, so a line is looked at as little as it can be:
    its id alone (one JSON parse, the shard from the id), and a whole item is validated only
    for the few that will be recorded. The chunk was written by the run's own validation.
    """
    ledger = services.ledger
    lines = iter_lines(
        services.store.download_chunks(services.store.settings.runs_container, chunk)
    )
    for line in lines:
        if not line.strip():
            continue
        fields = json.loads(line)
        item_id = fields["item_id"]
        if item_id in recorded or ledger.item_shard(run_id, item_id) not in shards:
            continue
        yield ManifestItem.model_validate(fields)


def teardown(services: Services, run_id: str) -> None:
    """Delete what this run created: its jobs, its clusters, its queue. Idempotent."""
    backend = services.backend
    backend.cancel_jobs(run_id)
    backend.delete_clusters(run_id)
    services.queues(run_id).delete()
