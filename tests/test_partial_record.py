"""A message's records written in several shard transactions, when the ledger fails part way.

Storage is Azurite; the failure is a connection reset on the second shard's transaction,
after the first shard's records were really committed. Nothing a first record brings must be
lost for the records that went through: their outputs-index entries and the node's count.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.exceptions import ServiceResponseError

from batchctl.contracts import ItemError, ItemResult, ItemStatus
from batchctl.outputs_index import INDEX_PREFIX
from batchctl.settings import StorageSettings
from batchctl.storage import Ledger
from batchctl.storage.ledger import PartiallyRecordedError
from node_image.worker.recording import Recorder

pytestmark = pytest.mark.azurite


class ResetOnTransaction(Ledger):
    """The real ledger, whose ``fail_at``-th shard transaction is reset by the network."""

    def __init__(self, settings: StorageSettings, fail_at: int) -> None:
        super().__init__(settings)
        self.fail_at = fail_at
        self.transactions = 0

    def _record_in_shard(self, key: str, batch: list[ItemResult]) -> set[tuple[str, str]]:
        self.transactions += 1
        if self.transactions == self.fail_at:
            raise ServiceResponseError("Connection reset by peer")
        return super()._record_in_shard(key, batch)


class Outputs:
    def __init__(self) -> None:
        self.written: dict[str, bytes] = {}

    def write_output(self, name: str, data: bytes, content_type: str) -> None:
        self.written[name] = data


def _results(run_id: str, rng: random.Random, count: int) -> list[ItemResult]:
    results = []
    for n in range(count):
        item_id = f"item-{n:04d}"
        if rng.random() < 0.3:
            error = ItemError(
                error_class="UndecodableError", message="x", permanent=True, attempts=1
            )
            results.append(
                ItemResult(
                    run_id=run_id,
                    item_id=item_id,
                    status=ItemStatus.FAILED,
                    source=f"http://acct/media/{item_id}.mp4",
                    error=error,
                )
            )
            continue
        results.append(
            ItemResult(
                run_id=run_id,
                item_id=item_id,
                status=ItemStatus.SUCCEEDED,
                source=f"http://acct/media/{item_id}.mp4",
                source_version=f"v{n}",
                outputs=[f"{run_id}/items/{item_id}/metadata.json"],
            )
        )
    return results


def _recorder(ledger: Any, outputs: Outputs) -> Recorder:
    return Recorder(
        ledger,
        outputs,
        node_name="n",
        task_name="features",
        wall_clock=lambda: datetime.now(UTC),
        index_fingerprint="f1",
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_records_that_went_through_before_a_reset_keep_their_index_entries(
    storage_settings: StorageSettings, ledger: Ledger, run_id: str, seed: int
) -> None:
    rng = random.Random(seed)
    results = _results(run_id, rng, 80)  # spread over every shard of the run
    shards = {ledger.shard_key(run_id, r.item_id) for r in results}
    failing = ResetOnTransaction(storage_settings, fail_at=rng.randint(2, len(shards)))
    outputs = Outputs()
    recorder = _recorder(failing, outputs)

    with pytest.raises(PartiallyRecordedError) as caught:
        recorder.record_all(results)
    recorder.close()

    written = caught.value.written
    assert isinstance(caught.value.__cause__, ServiceResponseError)
    # What the error says went through is what the ledger holds.
    in_ledger = ledger.recorded_among(run_id, [r.item_id for r in results])
    assert written and {item for _, item in written} == in_ledger
    assert len(in_ledger) < len(results)
    succeeded = {r.item_id for r in results if r.status is ItemStatus.SUCCEEDED}
    indexed = {name.removeprefix(INDEX_PREFIX).removesuffix(".json") for name in outputs.written}
    assert indexed == in_ledger & succeeded

    # The message comes back: the rest are recorded and indexed, nothing twice.
    again = _recorder(ledger, outputs)
    first = again.record_all(results)
    again.close()
    assert {item for _, item in first} == {r.item_id for r in results} - in_ledger
    indexed = {name.removeprefix(INDEX_PREFIX).removesuffix(".json") for name in outputs.written}
    assert indexed == succeeded
    counts = ledger.counts(run_id)
    assert counts.succeeded == len(succeeded) == len(ledger.recorded_ids(run_id) & succeeded)
    assert counts.done == len(results) == len(ledger.recorded_ids(run_id))
