"""Filling a run's queue, chunk by chunk (the enqueue activities)."""

from __future__ import annotations

import logging

from batchctl.contracts import (
    ChunkTask,
    WaveTask,
    WorkItem,
)
from batchctl.controller.names import enqueued_marker
from batchctl.manifest import (
    chunk_blob_name,
    read_chunk,
)
from batchctl.packing import MessageSizer, mini_batches
from batchctl.services import Services
from batchctl.storage.ledger import in_shard_order

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


def create_run_queues(services: Services, run_id: str) -> None:
    services.queues(run_id).create()


def enqueue_chunk(services: Services, task: ChunkTask) -> int:
    """Enqueue one chunk's items as mini-batch messages; a chunk already enqueued is skipped.

    A retry after a partial send re-sends the whole chunk: the duplicates are harmless
    because workers skip items that already have a terminal record (at-least-once delivery).
    """
    settings = services.settings
    store = services.store
    marker = enqueued_marker(task.run_id, task.chunk)
    if store.exists(settings.runs_container, marker):
        return 0
    # Packed shard by shard: a node records a message with a transaction per shard.
    items = in_shard_order(read_chunk(store, task.chunk), services.ledger.shard_count(task.run_id))
    sizer = MessageSizer.for_run(task.run_id)
    messages = (
        WorkItem(run_id=task.run_id, items=batch).model_dump_json()
        for batch in mini_batches(items, task.options.items_per_message, sizer)
    )
    stats = services.queues(task.run_id).enqueue_many(messages)
    store.upload_bytes(settings.runs_container, marker, str(stats.sent))
    return stats.sent


def enqueue_wave(services: Services, task: WaveTask) -> int:
    """Enqueue a wave of chunks, one after another (each skipped when already enqueued)."""
    return sum(
        enqueue_chunk(
            services,
            ChunkTask(
                run_id=task.run_id,
                chunk=chunk_blob_name(task.run_id, index),
                options=task.options,
            ),
        )
        for index in range(task.first, task.first + task.count)
    )
