"""The ledger: one terminal record per item, in a table (partition = run, row = item).

It is what makes completion exact. Queue counts are approximate and a message may be
delivered twice; a table row keyed by the item id exists at most once, so counting rows
counts items, never deliveries. The first terminal record written wins: a duplicate
delivery that finishes later finds the row and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient

from batchctl.contracts import ItemResult, ItemStatus
from batchctl.settings import StorageSettings
from batchctl.storage.clients import sync_credential
from batchctl.storage.retry import table_client_options

# Table properties hold at most 64 KiB of UTF-16 (32K characters); results are far smaller,
# but a pathological error message must not make the terminal record impossible to write.
MAX_PAYLOAD_CHARS = 30_000


@dataclass(frozen=True)
class LedgerCounts:
    succeeded: int
    failed: int

    @property
    def done(self) -> int:
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
        entity: dict[str, Any] = {
            "PartitionKey": result.run_id,
            "RowKey": result.item_id,
            "status": result.status.value,
            "error_class": result.error.error_class if result.error else "",
            "payload": _payload(result),
        }
        try:
            self._table.create_entity(entity)
        except ResourceExistsError:
            return False
        return True

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
        succeeded = failed = 0
        for entity in self._table.query_entities(
            f"PartitionKey eq {_odata_quote(run_id)}", select=["status"], results_per_page=1000
        ):
            if entity["status"] == ItemStatus.SUCCEEDED.value:
                succeeded += 1
            else:
                failed += 1
        return LedgerCounts(succeeded=succeeded, failed=failed)

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
