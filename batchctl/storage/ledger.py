"""The ledger: one terminal record per item, in shards that each keep their own exact count.

It is what makes completion exact. Queue counts are approximate and a message may be
delivered twice; a table row keyed by the item id exists at most once, so counting rows
counts items, never deliveries. The first terminal record written wins: a duplicate
delivery that finishes later finds the row and changes nothing.

A run's records are spread over :data:`SHARDS` partitions (``{run_id}~{shard}``, the shard
from a hash of the item id), so no single partition carries a run (Azure serves about 2,000
entities/s per partition). Each shard also holds one counter row, and recording an item
and incrementing its shard's counter is ONE entity-group transaction (same partition,
atomic): either both happen or neither does. So a poll reads :data:`SHARDS` counter rows,
whatever the number of items done, and the counts stay exact under duplicate deliveries
(the item's create fails, so the transaction writes nothing), retried activities (the same)
and a worker killed mid-record (there is no "between": the transaction is one request).
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
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, UpdateMode

from batchctl.contracts import ItemResult, ItemStatus
from batchctl.settings import StorageSettings
from batchctl.storage.clients import table_client
from batchctl.storage.retry import Role

# Table properties hold at most 64 KiB of UTF-16 (32K characters); results are far smaller,
# but a pathological error message must not make the terminal record impossible to write.
MAX_PAYLOAD_CHARS = 30_000
# Entity-group transactions hold at most 100 operations, all in one partition; one of them
# is the shard's counter.
TRANSACTION_LIMIT = 100
# Partitions per run: 16 x 2,000 entities/s covers the account's 20,000/s, and a poll reads
# 16 rows.
SHARDS = 16
# The counter's row key: item ids cannot contain '~' (contracts.ITEM_ID_PATTERN), so it can
# never be an item's.
COUNTER_ROW = "~counts"
# A counter update that keeps losing its ETag race gives up after this many tries (each a
# read and a transaction); with 16 shards even a 1,000-node fleet rarely needs a second.
MAX_COUNTER_TRIES = 50
_STATUS_FIELDS = {status: status.value for status in ItemStatus}
# Marks a segment row's key (see the module docstring); '~' is outside ITEM_ID_PATTERN.
SEGMENT_MARK = "~seg~"
SEGMENT_INDEX_DIGITS = 5


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


def shard_of(item_id: str) -> int:
    """The item's shard: stable across processes and releases (not Python's hash())."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:4], "big") % SHARDS


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


def _entity(result: ItemResult) -> dict[str, Any]:
    return {
        "PartitionKey": partition_key(result.run_id, shard_of(result.item_id)),
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

    def ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._table.create_table()

    # -- writing ---------------------------------------------------------------------------
    def record(self, result: ItemResult) -> bool:
        """Write the item's terminal record; False when one already existed (nothing changes)."""
        return self._record_in_shard([result]) == 1

    def record_absent(self, results: Iterable[ItemResult]) -> int:
        """Write each record whose item has none yet (first record wins); how many were new.

        Grouped by shard, up to 99 records and the shard's counter per transaction.
        """
        by_shard: dict[tuple[str, int], list[ItemResult]] = defaultdict(list)
        written = 0
        for result in results:
            key = (result.run_id, shard_of(result.item_id))
            batch = by_shard[key]
            batch.append(result)
            if len(batch) == TRANSACTION_LIMIT - 1:
                written += self._record_in_shard(batch)
                by_shard[key] = []
        for batch in by_shard.values():
            if batch:
                written += self._record_in_shard(batch)
        return written

    def _record_in_shard(self, batch: list[ItemResult]) -> int:
        """Create ``batch`` (one shard, distinct ids) and add them to its counter, atomically.

        A transaction fails as a whole. When it fails because an item already has a record,
        that item is dropped from the batch (it was recorded first by someone else) and the
        rest is tried again; when it fails on the counter's ETag, the counter is read again.
        Returns how many records this call wrote.
        """
        pending = {result.item_id: result for result in batch}
        run_id = batch[0].run_id
        key = partition_key(run_id, shard_of(batch[0].item_id))
        for _ in range(MAX_COUNTER_TRIES):
            if not pending:
                return 0
            counter, etag = self._read_counter(key)
            for result in pending.values():
                counter[result.status.value] = int(counter.get(result.status.value, 0)) + 1
            operations: list[Any] = [("create", _entity(r)) for r in pending.values()]
            row = {"PartitionKey": key, "RowKey": COUNTER_ROW, **counter}
            if etag is None:
                operations.append(("create", row))
            else:
                options = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
                operations.append(("update", row, {"mode": UpdateMode.REPLACE, **options}))
            try:
                self.requests += 1
                self._table.submit_transaction(operations)
            except TableTransactionError:
                # Which operation failed? Ask the table, not the error's index (Azurite and
                # Azure word it differently): items that exist now were recorded by others.
                taken = [item_id for item_id in pending if self._exists(key, item_id)]
                for item_id in taken:
                    del pending[item_id]
                continue  # the counter moved, or items were taken: read and try again
            return len(pending)
        raise RuntimeError(
            f"could not update the ledger counter of {key} after {MAX_COUNTER_TRIES} tries"
        )

    def _read_counter(self, key: str) -> tuple[dict[str, int], str | None]:
        try:
            self.requests += 1
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
            "PartitionKey": partition_key(run_id, shard_of(item_id)),
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
            f"PartitionKey eq {_odata_quote(partition_key(run_id, shard_of(item_id)))} "
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
                partition_key=partition_key(run_id, shard_of(item_id)), row_key=item_id
            )
        except ResourceNotFoundError:
            return None
        return ItemResult.model_validate(json.loads(entity["payload"]))

    def has_record(self, run_id: str, item_id: str) -> bool:
        return self._exists(partition_key(run_id, shard_of(item_id)), item_id)

    def shards(self, run_id: str) -> range:
        """The run's shards: every reader of a whole run goes through this, so a run whose
        shard count is its own (kept with the run) is read whole. Today every run has
        :data:`SHARDS`."""
        del run_id  # one count for every run, for now
        return range(SHARDS)

    def item_shard(self, run_id: str, item_id: str) -> int:
        """The shard of ``run_id`` that holds ``item_id``'s record (one of :meth:`shards`)."""
        del run_id
        return shard_of(item_id)

    def counts(self, run_id: str) -> LedgerCounts:
        """Exact counts by status from the shards' counters: one read a shard at any size."""
        tally = dict.fromkeys(_STATUS_FIELDS.values(), 0)
        for shard in self.shards(run_id):
            counter, _ = self._read_counter(partition_key(run_id, shard))
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
