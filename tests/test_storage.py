"""Storage adapters against a real Azurite."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError

from batchctl.contracts import ItemError, ItemResult, ItemStatus, StageTimings
from batchctl.local.azurite import start_azurite
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger, RunQueues, queue_names
from batchctl.storage.queues import MAX_MESSAGE_BYTES

pytestmark = pytest.mark.azurite


def test_queue_names_are_valid_azure_names(run_id: str) -> None:
    for name in queue_names(run_id).values():
        assert 3 <= len(name) <= 63
        assert name == name.lower()
        assert "--" not in name


def test_queue_round_trip(storage_settings: StorageSettings, run_id: str) -> None:
    queues = RunQueues(storage_settings, run_id)
    queues.create()
    queues.create()  # idempotent
    assert queues.exists() == {"input": True}  # results go to the ledger, never a queue

    queues.send("input", json.dumps({"n": 1}))
    queues.send("input", "ünïcode <xml> & stuff")
    received = queues.receive(10, visibility_timeout=30)
    assert sorted(m.content for m in received) == sorted(['{"n": 1}', "ünïcode <xml> & stuff"])
    assert all(m.dequeue_count == 1 for m in received)
    # Hidden while in flight.
    assert queues.receive(10, visibility_timeout=30) == []

    # Releasing one (visibility 0) makes it receivable again with a higher dequeue count.
    released = queues.update_visibility(received[0], 0)
    again = queues.receive(10, visibility_timeout=30)
    assert [m.id for m in again] == [released.id]
    assert again[0].dequeue_count == 2

    queues.delete_message(again[0])
    queues.delete_message(again[0])  # deleting twice is harmless (a duplicate worker)
    queues.delete_message(received[1])
    assert queues.approximate_count() == 0

    queues.delete()
    queues.delete()  # idempotent
    assert queues.exists() == {"input": False}


def test_oversized_message_is_refused_before_sending(
    storage_settings: StorageSettings, run_id: str
) -> None:
    queues = RunQueues(storage_settings, run_id)
    with pytest.raises(ValueError, match="exceeds"):
        queues.send("input", "x" * (MAX_MESSAGE_BYTES + 1))


@pytest.fixture
def private_storage(tmp_path: Path) -> Iterator[StorageSettings]:
    """An Azurite of its own: after thousands of deleted messages, Azurite's periodic cleanup
    can stall every request for many seconds, which must not land on the session's tests."""
    instance = start_azurite(workdir=tmp_path)
    try:
        yield instance.storage_settings()
    finally:
        instance.stop()


@pytest.mark.slow
def test_bulk_enqueue_10000_none_lost_or_duplicated(
    private_storage: StorageSettings, run_id: str
) -> None:
    queues = RunQueues(private_storage, run_id)
    queues.create()
    total = 10_000
    stats = queues.enqueue_many((json.dumps({"i": i}) for i in range(total)), concurrency=128)
    assert stats.sent == total
    assert queues.approximate_count() == total

    seen: list[int] = []
    while True:
        batch = queues.receive(32, visibility_timeout=300)
        if not batch:
            break
        seen.extend(json.loads(m.content)["i"] for m in batch)
    assert len(seen) == total
    assert sorted(seen) == list(range(total))
    queues.delete()


def _result(run_id: str, item_id: str, status: ItemStatus, error_class: str = "") -> ItemResult:
    error = (
        ItemError(error_class=error_class, message="bad", permanent=True, attempts=1)
        if status is ItemStatus.FAILED
        else None
    )
    return ItemResult(
        run_id=run_id,
        item_id=item_id,
        status=status,
        outputs=[f"{item_id}.npz"] if error is None else [],
        timings=StageTimings(total_s=1.5),
        error=error,
    )


def test_ledger_same_record_twice_counts_once(ledger: Ledger, run_id: str) -> None:
    first = _result(run_id, "a", ItemStatus.SUCCEEDED)
    assert ledger.record(first) is True
    assert ledger.record(first) is False
    # A later, different terminal record for the same item (a duplicate delivery that
    # failed) does not replace the first one.
    assert ledger.record(_result(run_id, "a", ItemStatus.FAILED, "Timeout")) is False
    assert ledger.record(_result(run_id, "b", ItemStatus.FAILED, "NotAVideo")) is True
    assert ledger.record(_result(run_id, "c", ItemStatus.SUCCEEDED)) is True

    counts = ledger.counts(run_id)
    assert (counts.succeeded, counts.failed, counts.done) == (2, 1, 3)
    assert ledger.get(run_id, "a") == first
    assert ledger.get(run_id, "zzz") is None
    assert ledger.has_record(run_id, "b") and not ledger.has_record(run_id, "zzz")
    failures = ledger.failures(run_id)
    assert [f.item_id for f in failures] == ["b"]
    assert failures[0].error is not None and failures[0].error.error_class == "NotAVideo"
    # Other runs' records never leak into this run's counts.
    assert ledger.counts(run_id + "x").done == 0


def test_ledger_truncates_huge_error_messages(ledger: Ledger, run_id: str) -> None:
    huge = ItemResult(
        run_id=run_id,
        item_id="big",
        status=ItemStatus.FAILED,
        error=ItemError(error_class="X", message="e" * 100_000, permanent=True, attempts=1),
    )
    assert ledger.record(huge)
    stored = ledger.get(run_id, "big")
    assert stored is not None and stored.error is not None
    assert stored.error.message.endswith("[truncated]")


def test_blob_round_trip(blob_store: BlobStore, run_id: str) -> None:
    container = blob_store.settings.runs_container
    blob_store.upload_bytes(container, f"{run_id}/a.txt", "hello")
    payload = bytes(range(256)) * 40_000  # ~10 MB: streams in several chunks
    blob_store.upload_stream(container, f"{run_id}/b.bin", io.BytesIO(payload), length=len(payload))
    assert blob_store.exists(container, f"{run_id}/a.txt")
    assert not blob_store.exists(container, f"{run_id}/nope")
    assert blob_store.download_bytes(container, f"{run_id}/a.txt") == b"hello"
    chunks = list(blob_store.download_chunks(container, f"{run_id}/b.bin"))
    assert len(chunks) > 1
    assert b"".join(chunks) == payload
    assert blob_store.list_names(container, f"{run_id}/") == [f"{run_id}/a.txt", f"{run_id}/b.bin"]
    assert blob_store.size(container, f"{run_id}/b.bin") == len(payload)
    blob_store.delete(container, f"{run_id}/a.txt")
    blob_store.delete(container, f"{run_id}/a.txt")
    assert blob_store.list_names(container, f"{run_id}/") == [f"{run_id}/b.bin"]


def test_download_to_file_leaves_a_whole_file_or_none(
    blob_store: BlobStore, run_id: str, tmp_path: Path
) -> None:
    container = blob_store.settings.runs_container
    blob_store.upload_bytes(container, f"{run_id}/c.bin", b"new")
    target = tmp_path / "c.bin"
    target.write_bytes(b"old")
    with pytest.raises(ResourceNotFoundError):
        blob_store.download_to_file(container, f"{run_id}/missing", target)
    assert target.read_bytes() == b"old"  # a failed download leaves an older copy as it was
    with pytest.raises(ResourceNotFoundError):
        blob_store.download_to_file(container, f"{run_id}/missing", tmp_path / "fresh.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]  # no empty file, no temp file
    assert blob_store.download_to_file(container, f"{run_id}/c.bin", target) == 3
    assert target.read_bytes() == b"new"
