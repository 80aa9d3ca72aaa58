"""The ledger: one terminal record per item, in a table (partition = run, row = item).

It is what makes completion exact. Queue counts are approximate and a message may be
delivered twice; a table row keyed by the item id exists at most once, so counting rows
counts items, never deliveries. The first terminal record written wins: a duplicate
delivery that finishes later finds the row and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, TableTransactionError

from batchctl.contracts import ItemResult, ItemStatus
from batchctl.settings import StorageSettings
from batchctl.storage.clients import sync_credential
from batchctl.storage.retry import table_client_options

# Table properties hold at most 64 KiB of UTF-16 (32K characters); results are far smaller,
# but a pathological error message must not make the terminal record impossible to write.
MAX_PAYLOAD_CHARS = 30_000


# Entity-group transactions hold at most 100 operations, all in one partition.
TRANSACTION_LIMIT = 100


@dataclass(frozen=True)
class LedgerCounts:
    succeeded: int
    failed: int
    not_run: int = 0

    @property
    def done(self) -> int:
        """Items the workers finished (not_run records are the controller's, at the end)."""
        return self.succeeded + self.failed


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
        "PartitionKey": result.run_id,
        "RowKey": result.item_id,
        "status": result.status.value,
        "error_class": result.error.error_class if result.error else "",
        "payload": _payload(result),
    }


class Ledger:
    def __init__(self, settings: StorageSettings) -> None:
        # Built directly: a client from TableServiceClient.get_table_client would not carry
        # the retry options (it gets the service's transport, not its configuration).
        self._table = TableClient(
            endpoint=settings.table_url,
            table_name=settings.ledger_table,
            credential=sync_credential(settings),
            **table_client_options(),
        )

    def ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._table.create_table()

    def record(self, result: ItemResult) -> bool:
        """Write the item's terminal record; False when one already existed (nothing changes)."""
        try:
            self._table.create_entity(_entity(result))
        except ResourceExistsError:
            return False
        return True

    def record_absent(self, results: Iterable[ItemResult]) -> int:
        """Write each record whose item has none yet (first record wins); how many were new.

        One entity-group transaction per 100 records of a partition. A transaction fails as a
        whole when any of its items got a record meanwhile (a late worker), so such a batch is
        written again one record at a time.
        """
        written = 0
        batch: list[ItemResult] = []
        for result in results:
            batch.append(result)
            if len(batch) == TRANSACTION_LIMIT:
                written += self._record_batch(batch)
                batch = []
        if batch:
            written += self._record_batch(batch)
        return written

    def _record_batch(self, batch: list[ItemResult]) -> int:
        partitions = {result.run_id for result in batch}
        if len(partitions) == 1 and len({result.item_id for result in batch}) == len(batch):
            try:
                self._table.submit_transaction([("create", _entity(r)) for r in batch])
            except TableTransactionError:
                pass  # one of them exists now: fall back to one at a time
            else:
                return len(batch)
        return sum(1 for result in batch if self.record(result))

    def get(self, run_id: str, item_id: str) -> ItemResult | None:
        try:
            entity = self._table.get_entity(partition_key=run_id, row_key=item_id)
        except ResourceNotFoundError:
            return None
        return ItemResult.model_validate(json.loads(entity["payload"]))

    def has_record(self, run_id: str, item_id: str) -> bool:
        try:
            self._table.get_entity(partition_key=run_id, row_key=item_id, select=["status"])
        except ResourceNotFoundError:
            return False
        return True

    def counts(self, run_id: str) -> LedgerCounts:
        """Exact counts by status (reads only the status column of the run's partition)."""
        tally = dict.fromkeys(ItemStatus, 0)
        for entity in self._table.query_entities(
            f"PartitionKey eq {_odata_quote(run_id)}", select=["status"], results_per_page=1000
        ):
            tally[ItemStatus(entity["status"])] += 1
        return LedgerCounts(
            succeeded=tally[ItemStatus.SUCCEEDED],
            failed=tally[ItemStatus.FAILED],
            not_run=tally[ItemStatus.NOT_RUN],
        )

    def recorded_ids(self, run_id: str) -> set[str]:
        """The ids of the run's items that have a terminal record (row keys only)."""
        return {
            str(entity["RowKey"])
            for entity in self._table.query_entities(
                f"PartitionKey eq {_odata_quote(run_id)}",
                select=["RowKey"],
                results_per_page=1000,
            )
        }

    def iter_results(self, run_id: str, status: ItemStatus | None = None) -> Iterator[ItemResult]:
        query = f"PartitionKey eq {_odata_quote(run_id)}"
        if status is not None:
            query += f" and status eq {_odata_quote(status.value)}"
        for entity in self._table.query_entities(query, results_per_page=1000):
            yield ItemResult.model_validate(json.loads(entity["payload"]))

    def failures(self, run_id: str, limit: int | None = None) -> list[ItemResult]:
        found: list[ItemResult] = []
        for result in self.iter_results(run_id, ItemStatus.FAILED):
            found.append(result)
            if limit is not None and len(found) >= limit:
                break
        return found

    def close(self) -> None:
        self._table.close()
