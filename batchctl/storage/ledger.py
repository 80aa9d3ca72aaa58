"""The ledger: one terminal record per item, in shards that each keep their own exact count.

It is what makes completion exact. Queue counts are approximate and a message may be
delivered twice; a table row keyed by the item id exists at most once, so counting rows
counts items, never deliveries. The first terminal record written wins: a duplicate
delivery that finishes later finds the row and changes nothing.

A run's records are spread over its shards, partitions ``{run_id}~{shard}`` (the shard from
a hash of the item id), so no single partition carries a run (Azure serves about 2,000
entities/s per partition). How many shards a run has is chosen once, when the run starts,
from the size of its fleet (:func:`shards_for_fleet`: more nodes, more shards, so the
counters' ETag races stay rare), and kept in the run's own row of the ledger
(:meth:`Ledger.fix_shard_count`, first write wins); a run that never fixed one (a run from
before, a test) has :data:`SHARDS`. Every reader takes a run's shards from
:meth:`Ledger.shards`. Each shard also holds one counter row, and recording items and
adding them to their shard's counter is ONE entity-group transaction (same partition,
atomic): either all happen or none does. A node records the items of one queue message
together (:meth:`Ledger.record_many`: one transaction per shard the message touches, and
the controller packs a message's items from one shard), so the cost is per message, not
per item. So a poll reads one counter row per shard, whatever the number of items done,
and the counts stay exact under duplicate deliveries (an item's create fails, so the
transaction writes nothing; the items without a record are tried again without it),
retried activities (the same) and a worker killed mid-record (there is no "between": the
transaction is one request).
Two writers in one shard race on the counter's ETag; the loser reads it again and retries.

Segment rows. A long video split into segments (node_image/worker/segments.py) keeps one
row per finished segment in its item's partition, keyed ``{item_id}~seg~{index}``: item ids
cannot contain '~', so such a row is never an item's record. They are not terminal records:
no counter counts them, and every read of records (counts, recorded ids, results) skips them.
A segment row is created once (first one wins, like a record) and read back, all of one
item's at once, by the worker that decides whether the item is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, UpdateMode
from requests.adapters import DEFAULT_POOLSIZE

from batchctl.contracts import ItemResult, ItemStatus, ManifestItem
from batchctl.settings import StorageSettings
from batchctl.storage.clients import table_client
from batchctl.storage.retry import Role

# Table properties hold at most 64 KiB of UTF-16 (32K characters); results are far smaller,
# but a pathological error message must not make the terminal record impossible to write.
MAX_PAYLOAD_CHARS = 30_000
# Entity-group transactions hold at most 100 operations, all in one partition; one of them
# is the shard's counter.
TRANSACTION_LIMIT = 100
# Partitions of a run that fixed no shard count (and the fewest an Azure fleet gets): 16 x 2,000
# entities/s covers the account's 20,000/s, and a poll reads 16 rows. Readers of this
# constant get what a run without a fixed count has; a run's own count is Ledger.shards().
SHARDS = 16
# The fewest shards a local session's run gets: its few worker processes write a few
# messages a second, far below one partition's 2,000 entities/s, and each shard costs a
# counter read per poll and a transaction per message that straddles two of them.
LOCAL_SHARDS = 2
# More nodes, more shards: one shard per this many nodes (rounded up to a power of two), so
# the counter of a shard is written by few nodes at once and its ETag races stay rare.
NODES_PER_SHARD = 8
# The most shards a run gets: a poll reads one counter row per shard.
MAX_SHARDS = 256
# The run's own row: its shard count, in a partition no shard uses ('~meta' is no number).
META_PARTITION_SUFFIX = "~meta"
META_ROW = "shards"
# A run with no fixed count yet is asked again after this long (it may fix one: a status
# read before the run's validation must not pin the default for good).
UNFIXED_RECHECK_S = 5.0
# The counter's row key: item ids cannot contain '~' (contracts.ITEM_ID_PATTERN), so it can
# never be an item's.
COUNTER_ROW = "~counts"
# Azure Tables takes at most 15 comparisons in a query's filter: a lookup of ids in one
# partition spends 3 on the partition and the ids' range, 12 on the ids.
FILTER_COMPARISONS = 15
IDS_PER_LOOKUP = FILTER_COMPARISONS - 3
# A counter update that keeps losing its ETag race gives up after this many tries (each a
# read and a transaction); with 16 shards even a 1,000-node fleet rarely needs a second.
MAX_COUNTER_TRIES = 50
# Counter reads a poll makes side by side (see Ledger.counts): they share the ledger's
# client, whose requests session pools DEFAULT_POOLSIZE (10) connections a host; more
# threads than that would open a connection each time and discard it after ("Connection
# pool is full"). Half of it leaves room for the client's other users.
COUNTER_READERS = DEFAULT_POOLSIZE // 2
_STATUS_FIELDS = {status: status.value for status in ItemStatus}
# Marks a segment row's key (see the module docstring); '~' is outside ITEM_ID_PATTERN.
SEGMENT_MARK = "~seg~"
SEGMENT_INDEX_DIGITS = 5


class PartiallyRecordedError(Exception):
    """Writing a batch of records failed part way: the transactions of some shards went
    through before one failed. ``written`` names the records that were written (each its
    item's first), so what follows a first record (the outputs index, the node's metrics)
    still happens for them: a redelivery finds them recorded and will not do it again.
    The failure itself is the ``__cause__``."""

    def __init__(self, written: set[tuple[str, str]]) -> None:
        super().__init__(f"{len(written)} record(s) were written before the ledger failed")
        self.written = written


@dataclass(frozen=True)
class LedgerCounts:
    succeeded: int
    failed: int
    not_run: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        """Items the workers finished (not_run records are the controller's, at the end)."""
        return self.succeeded + self.failed

    @property
    def settled(self) -> int:
        """Items that need nothing more: finished by a worker, or skipped at validation."""
        return self.succeeded + self.failed + self.skipped


def shards_for_fleet(max_nodes: int, fewest: int = SHARDS) -> int:
    """How many shards a run of at most ``max_nodes`` nodes gets: ``fewest`` (for Azure
    :data:`SHARDS`, for a local session :data:`LOCAL_SHARDS`) up to ``fewest *
    NODES_PER_SHARD`` nodes, then doubled as the fleet doubles, at most :data:`MAX_SHARDS`
    (pure)."""
    wanted = -(-max(1, max_nodes) // NODES_PER_SHARD)
    count = fewest
    while count < wanted and count < MAX_SHARDS:
        count *= 2
    return count


def shard_of(item_id: str, shards: int = SHARDS) -> int:
    """The item's shard of ``shards``: stable across processes and releases (not hash())."""
    digest = hashlib.sha256(item_id.encode("utf-8")).digest()[:4]
    return int.from_bytes(digest, "big") % shards


def in_shard_order(items: list[ManifestItem], shards: int) -> list[ManifestItem]:
    """``items`` grouped by shard (stable within a shard). Packed into messages in this
    order, a message's items fall in one shard or two when the chunk holds more items of a
    shard than a message takes (2,000-item chunks, 256 shards at most, 8 items a message),
    so a node records a message with one or two transactions instead of one per item."""
    return sorted(items, key=lambda item: shard_of(item.item_id, shards))


def existence_filters(key: str, item_ids: Iterable[str]) -> list[str]:
    """The OData filters that find which of ``item_ids`` have a row in partition ``key``.

    Azure Tables allows at most 15 comparisons in one filter (Azurite has no such limit),
    so the ids go :data:`IDS_PER_LOOKUP` a filter, each also bounded to its ids' key range
    (the service seeks to it instead of scanning the partition).
    """
    ids = sorted(set(item_ids))
    filters = []
    for start in range(0, len(ids), IDS_PER_LOOKUP):
        part = ids[start : start + IDS_PER_LOOKUP]
        either = " or ".join(f"RowKey eq {_odata_quote(item_id)}" for item_id in part)
        filters.append(
            f"PartitionKey eq {_odata_quote(key)} and RowKey ge {_odata_quote(part[0])} "
            f"and RowKey le {_odata_quote(part[-1])} and ({either})"
        )
    return filters


def partition_key(run_id: str, shard: int) -> str:
    return f"{run_id}~{shard:02d}"


def segment_row_key(item_id: str, index: int) -> str:
    """The row of segment ``index`` of ``item_id`` (zero-padded: rows sort by index)."""
    return f"{item_id}{SEGMENT_MARK}{index:0{SEGMENT_INDEX_DIGITS}d}"


def is_record_key(row_key: str) -> bool:
    """Whether a row is an item's terminal record (not the counter, not a segment row)."""
    return "~" not in row_key


def _odata_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _payload(result: ItemResult) -> str:
    text = result.model_dump_json()
    if len(text) <= MAX_PAYLOAD_CHARS or result.error is None:
        return text
    # Shorten the error message (the only unbounded field) until the record fits.
    overflow = len(text) - MAX_PAYLOAD_CHARS + 50
    message = result.error.message[: max(0, len(result.error.message) - overflow)] + " [truncated]"
    shortened = result.model_copy(
        update={"error": result.error.model_copy(update={"message": message})}
    )
    return shortened.model_dump_json()


def _entity(result: ItemResult, key: str) -> dict[str, Any]:
    return {
        "PartitionKey": key,
        "RowKey": result.item_id,
        "status": result.status.value,
        "error_class": result.error.error_class if result.error else "",
        "payload": _payload(result),
    }


class Ledger:
    def __init__(self, settings: StorageSettings, *, role: Role = "ordinary") -> None:
        # ``role`` picks how long its calls retry (batchctl.storage.retry).
        self._table = table_client(settings, settings.ledger_table, role=role)
        self.requests = 0  # storage requests made (the scale benchmark counts them)
        # Shard counts of runs, once read: a run's count never changes once fixed.
        self._shard_counts: dict[str, int] = {}
        # Runs found without a fixed count, and when (time.monotonic) to ask again.
        self._unfixed_until: dict[str, float] = {}
        self._shard_lock = threading.Lock()

    def ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._table.create_table()

    # -- a run's shards ----------------------------------------------------------------------
    def fix_shard_count(self, run_id: str, shards: int) -> int:
        """Keep ``shards`` as the run's shard count unless it has one already; the count the
        run has. Call it before the run's first record (the controller does, when the run
        starts): a count is chosen once, and every later writer and reader follows it."""
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"a run has 1 to {MAX_SHARDS} shards, not {shards}")
        entity = {
            "PartitionKey": f"{run_id}{META_PARTITION_SUFFIX}",
            "RowKey": META_ROW,
            "shards": shards,
        }
        try:
            self._create_meta(entity)
        except ResourceExistsError:
            with self._shard_lock:
                self._shard_counts.pop(run_id, None)
            return self.shard_count(run_id)  # fixed before (a retried activity): kept
        with self._shard_lock:
            self._shard_counts[run_id] = shards
            self._unfixed_until.pop(run_id, None)
        return shards

    def _create_meta(self, entity: dict[str, Any]) -> None:
        try:
            self.requests += 1
            self._table.create_entity(entity)
        except ResourceNotFoundError:
            # No table yet (a fresh local storage): this is the run's first write.
            self.ensure_table()
            self.requests += 1
            self._table.create_entity(entity)

    def shard_count(self, run_id: str) -> int:
        """The run's shard count: the one it fixed, else :data:`SHARDS` (runs from before)."""
        with self._shard_lock:
            known = self._shard_counts.get(run_id)
            unfixed = time.monotonic() < self._unfixed_until.get(run_id, float("-inf"))
        if known is not None:
            return known
        if unfixed:
            return SHARDS
        try:
            self.requests += 1
            entity = self._table.get_entity(
                partition_key=f"{run_id}{META_PARTITION_SUFFIX}", row_key=META_ROW
            )
        except ResourceNotFoundError:
            # Remembered briefly only: the run may fix its count later.
            with self._shard_lock:
                self._unfixed_until[run_id] = time.monotonic() + UNFIXED_RECHECK_S
            return SHARDS
        count = int(entity["shards"])
        with self._shard_lock:
            self._shard_counts[run_id] = count
        return count

    def shards(self, run_id: str) -> range:
        """The run's shards, for readers that go shard by shard (``shard=`` arguments)."""
        return range(self.shard_count(run_id))

    def item_shard(self, run_id: str, item_id: str) -> int:
        """The shard of ``run_id`` that holds ``item_id``'s record (one of :meth:`shards`)."""
        return shard_of(item_id, self.shard_count(run_id))

    def shard_key(self, run_id: str, item_id: str) -> str:
        """The partition holding ``item_id``'s record in its run."""
        return partition_key(run_id, self.item_shard(run_id, item_id))

    # -- writing ---------------------------------------------------------------------------
    def record(self, result: ItemResult) -> bool:
        """Write the item's terminal record; False when one already existed (nothing changes)."""
        return bool(self.record_many([result]))

    def record_absent(self, results: Iterable[ItemResult]) -> int:
        """Write each record whose item has none yet (first record wins); how many were new.

        Grouped by shard, up to 99 records and the shard's counter per transaction.
        """
        return len(self.record_many(results))

    def record_many(self, results: Iterable[ItemResult]) -> set[tuple[str, str]]:
        """Write the records whose items have none yet; the (run id, item id) of those new.

        One entity-group transaction per shard the results touch (99 records and the
        shard's counter at most per transaction): a node records a message's items with
        one request per shard, not one per item. A result repeated within ``results``
        counts once (its first copy is the one written).
        """
        by_shard: dict[str, list[ItemResult]] = defaultdict(list)
        written: set[tuple[str, str]] = set()
        seen: set[tuple[str, str]] = set()
        for result in results:
            if (result.run_id, result.item_id) in seen:
                continue
            seen.add((result.run_id, result.item_id))
            key = self.shard_key(result.run_id, result.item_id)
            batch = by_shard[key]
            batch.append(result)
            if len(batch) == TRANSACTION_LIMIT - 1:
                written |= self._record_in_shard_of_many(key, batch, written)
                by_shard[key] = []
        for key, batch in by_shard.items():
            if batch:
                written |= self._record_in_shard_of_many(key, batch, written)
        return written

    def _record_in_shard_of_many(
        self, key: str, batch: list[ItemResult], written: set[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """One shard's transaction of :meth:`record_many`; when it fails after others went
        through, the failure says which those were (:class:`PartiallyRecordedError`)."""
        try:
            return self._record_in_shard(key, batch)
        except Exception as error:
            if not written:
                raise
            raise PartiallyRecordedError(set(written)) from error

    def _record_in_shard(self, key: str, batch: list[ItemResult]) -> set[tuple[str, str]]:
        """Create ``batch`` (one shard, distinct ids) and add them to its counter, atomically.

        A transaction fails as a whole. When it fails on the counter's ETag (412: another
        writer moved it), the counter is read again and the same batch retried. When it
        fails for any other reason (409: an item has a record already), one query asks the
        table which of the items exist now; those were recorded by someone else first and
        leave the batch. Returns the (run id, item id) of the records this call wrote.
        """
        pending = {result.item_id: result for result in batch}
        run_id = batch[0].run_id
        for _ in range(MAX_COUNTER_TRIES):
            if not pending:
                return set()
            counter, etag = self._read_counter(key)
            for result in pending.values():
                counter[result.status.value] = int(counter.get(result.status.value, 0)) + 1
            operations: list[Any] = [("create", _entity(r, key)) for r in pending.values()]
            row = {"PartitionKey": key, "RowKey": COUNTER_ROW, **counter}
            if etag is None:
                operations.append(("create", row))
            else:
                options = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
                operations.append(("update", row, {"mode": UpdateMode.REPLACE, **options}))
            try:
                self.requests += 1
                self._table.submit_transaction(operations)
            except TableTransactionError as error:
                if error.status_code == 412:
                    continue  # only the counter moved: read it and try again
                # Which operation failed? Ask the table, not the error's index (Azurite and
                # Azure word it differently): items that exist now were recorded by others.
                # (A counter created meanwhile by another writer fails the same way; then
                # no item is taken and the next pass reads the counter.)
                for item_id in self._existing(key, list(pending)):
                    del pending[item_id]
                continue
            return {(run_id, item_id) for item_id in pending}
        raise RuntimeError(
            f"could not update the ledger counter of {key} after {MAX_COUNTER_TRIES} tries"
        )

    def _existing(self, key: str, item_ids: list[str]) -> set[str]:
        """Which of ``item_ids`` have a row in partition ``key``: one query per
        :data:`IDS_PER_LOOKUP` ids (a message of up to 12 items in one shard: one query)."""
        found: set[str] = set()
        for query in existence_filters(key, item_ids):
            pages = self._table.query_entities(query, select=["RowKey"]).by_page()
            for page in pages:
                self.requests += 1
                found.update(str(entity["RowKey"]) for entity in page)
        return found

    def recorded_among(self, run_id: str, item_ids: Iterable[str]) -> set[str]:
        """Which of ``item_ids`` (a message's items) have a terminal record: one query per
        shard they fall in (one, for a message packed from one shard) and 12 ids."""
        by_key: dict[str, list[str]] = defaultdict(list)
        for item_id in item_ids:
            by_key[self.shard_key(run_id, item_id)].append(item_id)
        found: set[str] = set()
        for key, ids in by_key.items():
            found |= self._existing(key, ids)
        return {item_id for item_id in found if is_record_key(item_id)}

    def _read_counters(self, keys: list[str]) -> list[dict[str, int]]:
        """The counters of the partitions ``keys`` (in that order), read side by side."""
        self.requests += len(keys)
        if len(keys) <= 1:
            return [self._fetch_counter(key)[0] for key in keys]
        with ThreadPoolExecutor(
            max_workers=min(COUNTER_READERS, len(keys)), thread_name_prefix="ledger-counts"
        ) as pool:
            return [counter for counter, _ in pool.map(self._fetch_counter, keys)]

    def _read_counter(self, key: str) -> tuple[dict[str, int], str | None]:
        self.requests += 1
        return self._fetch_counter(key)

    def _fetch_counter(self, key: str) -> tuple[dict[str, int], str | None]:
        """One partition's counter and its ETag (zeros and None where it does not exist)."""
        try:
            entity = self._table.get_entity(partition_key=key, row_key=COUNTER_ROW)
        except ResourceNotFoundError:
            return dict.fromkeys(_STATUS_FIELDS.values(), 0), None
        counts = {field: int(entity.get(field, 0) or 0) for field in _STATUS_FIELDS.values()}
        return counts, str(entity.metadata["etag"])

    def _exists(self, key: str, item_id: str) -> bool:
        try:
            self.requests += 1
            self._table.get_entity(partition_key=key, row_key=item_id, select=["status"])
        except ResourceNotFoundError:
            return False
        return True

    # -- segment rows (not records: see the module docstring) -----------------------------
    def record_segment(self, run_id: str, item_id: str, index: int, payload: str) -> bool:
        """Create segment ``index``'s row of ``item_id``; False when it existed already."""
        if len(payload) > MAX_PAYLOAD_CHARS:
            raise ValueError(f"segment payload of {len(payload)} characters is too large")
        entity = {
            "PartitionKey": self.shard_key(run_id, item_id),
            "RowKey": segment_row_key(item_id, index),
            "payload": payload,
        }
        try:
            self.requests += 1
            self._table.create_entity(entity)
        except ResourceExistsError:
            return False
        return True

    def segment_payloads(self, run_id: str, item_id: str) -> dict[int, str]:
        """Every segment row of ``item_id`` (index -> payload): one range query."""
        low = f"{item_id}{SEGMENT_MARK}"
        # '~' sorts after every digit, so this bounds exactly the zero-padded indices.
        query = (
            f"PartitionKey eq {_odata_quote(self.shard_key(run_id, item_id))} "
            f"and RowKey ge {_odata_quote(low)} and RowKey lt {_odata_quote(low + '~')}"
        )
        found: dict[int, str] = {}
        pages = self._table.query_entities(query, select=["RowKey", "payload"]).by_page()
        for page in pages:
            self.requests += 1
            for entity in page:
                suffix = str(entity["RowKey"])[len(low) :]
                if suffix.isdigit():
                    found[int(suffix)] = str(entity["payload"])
        return found

    # -- reading ---------------------------------------------------------------------------
    def get(self, run_id: str, item_id: str) -> ItemResult | None:
        try:
            self.requests += 1
            entity = self._table.get_entity(
                partition_key=self.shard_key(run_id, item_id), row_key=item_id
            )
        except ResourceNotFoundError:
            return None
        return ItemResult.model_validate(json.loads(entity["payload"]))

    def has_record(self, run_id: str, item_id: str) -> bool:
        return self._exists(self.shard_key(run_id, item_id), item_id)

    def counts(self, run_id: str) -> LedgerCounts:
        """Exact counts by status from the shards' counters: one read per shard at any size,
        :data:`COUNTER_READERS` at a time (a poll waits for one round trip per that many
        shards, not one per shard: 16 shards read one after another were most of a local
        poll, and 256 would be seconds of an Azure one)."""
        tally = dict.fromkeys(_STATUS_FIELDS.values(), 0)
        keys = [partition_key(run_id, shard) for shard in self.shards(run_id)]
        for counter in self._read_counters(keys):
            for field, value in counter.items():
                tally[field] += value
        return LedgerCounts(
            succeeded=tally[ItemStatus.SUCCEEDED.value],
            failed=tally[ItemStatus.FAILED.value],
            not_run=tally[ItemStatus.NOT_RUN.value],
            skipped=tally[ItemStatus.SKIPPED.value],
        )

    def counted_rows(self, run_id: str) -> LedgerCounts:
        """Counts by reading every record (a full scan): what the counters must equal."""
        tally = dict.fromkeys(_STATUS_FIELDS.values(), 0)
        for shard in self.shards(run_id):
            for entity in self._query(run_id, shard, select=["status"]):
                tally[str(entity["status"])] += 1
        return LedgerCounts(
            succeeded=tally[ItemStatus.SUCCEEDED.value],
            failed=tally[ItemStatus.FAILED.value],
            not_run=tally[ItemStatus.NOT_RUN.value],
            skipped=tally[ItemStatus.SKIPPED.value],
        )

    def recorded_ids(self, run_id: str, shard: int | None = None) -> set[str]:
        """The ids of the run's items that have a terminal record (row keys only)."""
        shards = self.shards(run_id) if shard is None else [shard]
        return {
            str(entity["RowKey"])
            for index in shards
            for entity in self._query(run_id, index, select=["RowKey"])
        }

    def iter_results(
        self, run_id: str, status: ItemStatus | None = None, shard: int | None = None
    ) -> Iterator[ItemResult]:
        """The run's records, shard by shard (or one shard's)."""
        shards = self.shards(run_id) if shard is None else [shard]
        for index in shards:
            # The payload alone (and the key, to skip segment rows), parsed by pydantic's own
            # JSON parser: a run's end reads every record once.
            for entity in self._query(run_id, index, status=status, select=["payload"]):
                yield ItemResult.model_validate_json(entity["payload"])

    def _query(
        self,
        run_id: str,
        shard: int,
        *,
        status: ItemStatus | None = None,
        select: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        query = (
            f"PartitionKey eq {_odata_quote(partition_key(run_id, shard))} "
            f"and RowKey ne {_odata_quote(COUNTER_ROW)}"
        )
        if status is not None:
            query += f" and status eq {_odata_quote(status.value)}"
        # The row key is always read: segment rows share the partition and are skipped here,
        # by key (OData has no "contains"; they are few, one per segment of a long video).
        if select is not None and "RowKey" not in select:
            select = [*select, "RowKey"]
        pages = self._table.query_entities(query, select=select, results_per_page=1000).by_page()
        for page in pages:
            self.requests += 1
            yield from (entity for entity in page if is_record_key(str(entity["RowKey"])))

    def failures(self, run_id: str, limit: int | None = None) -> list[ItemResult]:
        found: list[ItemResult] = []
        for result in self.iter_results(run_id, ItemStatus.FAILED):
            found.append(result)
            if limit is not None and len(found) >= limit:
                break
        return found

    def close(self) -> None:
        self._table.close()
