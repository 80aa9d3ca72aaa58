"""The mini-batch packer: messages by item count and by their real size on the queue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchctl import controller
from batchctl.contracts import ChunkTask, ManifestItem, ManifestSummary, RunOptions, WorkItem
from batchctl.manifest import (
    MAX_ROW_MESSAGE_BYTES,
    SourcePolicy,
    prefixes_from_accounts,
    read_chunk,
    validate_manifest_to_blobs,
)
from batchctl.packing import (
    QUEUE_MESSAGE_MAX_BYTES,
    MessageSizer,
    item_message_bytes,
    mini_batches,
    queue_message_bytes,
)
from batchctl.services import Services
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, RunQueues
from batchctl.storage.ledger import shard_of
from batchctl.storage.queues import MAX_MESSAGE_BYTES, put_message_body

RUN = "r-packing"
OPTIONS = RunOptions(mini_batch_size=8)


def _item(index: int, metadata_chars: int, char: str = "x") -> ManifestItem:
    return ManifestItem(
        item_id=f"v{index:04d}",
        source=f"https://acct.blob.core.windows.net/media/v{index:04d}.mp4",
        row=index + 2,
        metadata={"notes": char * metadata_chars, "label": "é<&>"},
    )


def _size(batch: list[ManifestItem], run_id: str = RUN) -> int:
    work = WorkItem(run_id=run_id, items=batch)
    return queue_message_bytes(work.model_dump_json())


def _pack(items: list[ManifestItem], size: int = 8) -> list[list[ManifestItem]]:
    return list(mini_batches(items, size, MessageSizer.for_run(RUN)))


def test_the_limits_agree_with_the_storage_adapter_and_its_encoding() -> None:
    assert QUEUE_MESSAGE_MAX_BYTES == MAX_MESSAGE_BYTES
    for text in ('{"a": "b"}', "é & <x> 'q' \"", "&" * 100):
        # What the adapter puts inside <MessageText>, escaped, is what the service counts.
        wire = len(put_message_body(text)) - len(put_message_body(""))
        assert queue_message_bytes(text) == wire


def test_the_sizer_is_exact_for_any_batch() -> None:
    items = [_item(index, 37 * index, "&<é"[index % 3]) for index in range(9)]
    sizer = MessageSizer.for_run(RUN)
    for end in range(1, len(items) + 1):
        batch = items[:end]
        assert sizer.message_bytes(map(item_message_bytes, batch)) == _size(batch)


def test_small_items_are_packed_by_count() -> None:
    items = [_item(index, 10) for index in range(20)]
    assert [len(batch) for batch in _pack(items, size=8)] == [8, 8, 4]


def test_items_with_big_metadata_are_packed_by_bytes() -> None:
    # 20,000 characters of metadata each: eight to a message by count would be 160 KB.
    items = [_item(index, 20_000) for index in range(20)]
    batches = _pack(items, size=8)
    assert [item for batch in batches for item in batch] == items  # all, once, in order
    assert all(_size(batch) <= QUEUE_MESSAGE_MAX_BYTES for batch in batches)
    assert [len(batch) for batch in batches] == [3] * 6 + [2]  # as full as the limit allows


def test_an_item_that_fits_only_alone_gets_a_message_of_its_own() -> None:
    # No two of the first four fit one message; each fits alone (under the row limit).
    big = [_item(index, 40_000) for index in range(3)]
    escaped = _item(9, 10_000, "&")  # 10 KB as text, 50 KB as '&amp;' on the wire
    small = _item(10, 10)
    items = [big[0], big[1], escaped, big[2], small]
    assert all(_size([item]) <= MAX_ROW_MESSAGE_BYTES for item in items)
    batches = _pack(items)
    assert [[item.item_id for item in batch] for batch in batches] == [
        ["v0000"], ["v0001"], ["v0009"], ["v0002", "v0010"],
    ]  # fmt: skip
    assert all(_size(batch) <= QUEUE_MESSAGE_MAX_BYTES for batch in batches)


def test_an_item_too_large_even_alone_is_still_not_dropped() -> None:
    # Validation keeps such rows out; should one get here, it goes alone and the queue
    # adapter refuses it loudly rather than the packer losing it.
    huge = _item(0, 70_000)
    batches = _pack([_item(1, 10), huge, _item(2, 10)])
    assert [[item.item_id for item in batch] for batch in batches] == [
        ["v0001"], ["v0000"], ["v0002"],
    ]  # fmt: skip


@pytest.fixture
def queues(storage_settings: StorageSettings, run_id: str) -> Iterator[RunQueues]:
    run_queues = RunQueues(storage_settings, run_id)
    run_queues.create()
    try:
        yield run_queues
    finally:
        run_queues.delete()
        run_queues.close()


def _media_prefix(blob_store: BlobStore) -> str:
    return blob_store.url(blob_store.settings.media_container, "")


def _validated(blob_store: BlobStore, run_id: str, name: str, rows: list[str]) -> ManifestSummary:
    """The manifest ``rows`` uploaded as ``name`` and validated for real into chunks."""
    manifest_name = f"{run_id}/{name}"
    blob_store.upload_bytes(blob_store.settings.manifests_container, manifest_name, "\n".join(rows))
    return validate_manifest_to_blobs(
        blob_store,
        run_id=run_id,
        manifest_name=manifest_name,
        policy=SourcePolicy(prefixes_from_accounts([_media_prefix(blob_store)])),
    )


@pytest.mark.azurite
def test_a_chunk_of_heavy_rows_enqueues_within_the_message_limit(
    blob_store: BlobStore, queues: RunQueues, run_id: str, services: Services
) -> None:
    # A manifest validated for real, its first rows each 10 KB of metadata: packed by count
    # alone (16 a message) they made messages of 160 KB, refused, and the run failed.
    prefix = _media_prefix(blob_store)
    heavy = ",".join(["n" * 3400] * 3)  # each cell under the 4,096-character limit
    rows = ["id,video,notes,more,extra"]
    rows += [f"v{index},{prefix}v{index}.mp4,{heavy}" for index in range(12)]
    rows += [f"w{index},{prefix}w{index}.mp4,short,row,x" for index in range(12)]
    summary = _validated(blob_store, run_id, "heavy.csv", rows)
    assert (summary.valid, summary.invalid) == (24, 0)
    options = RunOptions(mini_batch_size=16)
    chunk = read_chunk(blob_store, summary.chunks[0])
    assert _size(chunk[:16], run_id) > QUEUE_MESSAGE_MAX_BYTES  # the test has teeth

    task = ChunkTask(run_id=run_id, chunk=summary.chunks[0], options=options)
    sent = controller.enqueue_chunk(services, task)

    contents = queues.peek_all("input", limit=32)
    assert sent == len(contents)
    assert all(queue_message_bytes(content) <= QUEUE_MESSAGE_MAX_BYTES for content in contents)
    works = [WorkItem.model_validate_json(content) for content in contents]
    delivered = [item.item_id for work in works for item in work.items]
    assert sorted(delivered) == sorted(item.item_id for item in chunk)  # each once
    # Packed in the ledger's shard order (so a node records a message per shard): heavy
    # rows six to a message at most, any message up to the count.
    heavy_ids = {f"v{i}" for i in range(12)}
    assert all(sum(item.item_id in heavy_ids for item in work.items) <= 6 for work in works)
    assert all(len(work.items) <= 16 for work in works)
    for work in works:
        shards = [shard_of(item.item_id) for item in work.items]
        assert shards == sorted(shards)


@pytest.mark.azurite
def test_a_chunk_is_packed_shard_by_shard(
    blob_store: BlobStore, queues: RunQueues, run_id: str, services: Services
) -> None:
    # 400 items over the run's 32 shards, 8 a message: each message's items fall in one
    # shard or two (a node records it with a transaction per shard), none is lost.
    prefix = _media_prefix(blob_store)
    rows = ["id,video"] + [f"v{index},{prefix}v{index}.mp4" for index in range(400)]
    summary = _validated(blob_store, run_id, "many.csv", rows)
    services.ledger.fix_shard_count(run_id, 32)
    task = ChunkTask(run_id=run_id, chunk=summary.chunks[0], options=RunOptions(mini_batch_size=8))
    sent = controller.enqueue_chunk(services, task)
    received = queues.client("input").receive_messages(messages_per_page=32, visibility_timeout=300)
    works = [WorkItem.model_validate_json(str(message.content)) for message in received]
    assert sent == len(works) == 50
    assert sorted(item.item_id for work in works for item in work.items) == sorted(
        f"v{index}" for index in range(400)
    )
    spans = [len({shard_of(item.item_id, 32) for item in work.items}) for work in works]
    assert max(spans) <= 2
    assert sum(spans) / len(spans) < 1.5
