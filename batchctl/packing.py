"""How many items one queue message carries, and what a message weighs on the wire: pure.

More items per message means fewer messages to send (a queue takes about 2,000 messages/s;
1M items one per message is 500 s of sending) and fewer receives and deletes; fewer items
per message means a finer grain at the end of the run, where a node holding a big message
keeps the others waiting. Up to 8 items a message, while keeping at least 4 messages for
every node the run may have: 1,000,000 items on 100 nodes pack 8 a message (125,000
messages); 20 items on 2 nodes pack 2 a message; a small run packs one a message.

The wire rules live here too (the service's 64 KiB as it counts it, a work item's exact size
from its items' sizes, and the packing of a chunk's items into messages that fit), so the
manifest's validation, the enqueue and a resumed run's refill weigh messages one way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from batchctl.contracts import ManifestItem, WorkItem

MAX_ITEMS_PER_MESSAGE = 8
MIN_MESSAGES_PER_NODE = 4


def items_per_message(total_items: int, max_nodes: int) -> int:
    """The default number of items per message for a run of ``total_items``."""
    per_node_floor = max(1, max_nodes) * MIN_MESSAGES_PER_NODE
    return max(1, min(MAX_ITEMS_PER_MESSAGE, total_items // per_node_floor))


# -- the wire size of a message -------------------------------------------------------------
# Azure Storage's limit on one queue message, as the service counts it (see
# queue_message_bytes). The same figure as batchctl.storage.queues.MAX_MESSAGE_BYTES, not
# imported from there: this module stays free of the Azure SDK (a test holds them equal).
QUEUE_MESSAGE_MAX_BYTES = 64 * 1024


def queue_message_bytes(content: str) -> int:
    """The bytes a queue message's text counts for: its UTF-8 after XML escaping.

    The storage adapter sends the text as is (no base64), XML-escaped inside the Put Message
    body, and the service's 64 KiB limit applies to that escaped text: ``&`` counts five
    bytes, ``<`` and ``>`` four.
    """
    return (
        len(content.encode("utf-8"))
        + 4 * content.count("&")
        + 3 * (content.count("<") + content.count(">"))
    )


def item_message_bytes(item: ManifestItem) -> int:
    """What ``item`` adds to a work item's message (its JSON, escaped as on the wire)."""
    return queue_message_bytes(item.model_dump_json())


@dataclass(frozen=True)
class MessageSizer:
    """The exact message size of a run's work items from the sizes of their items.

    A WorkItem's JSON is its envelope (schema version, run id) around its items' JSON joined by
    commas, and escaping is per character, so sizes add up: a packer can weigh each item
    once instead of serializing every candidate batch.
    """

    envelope_bytes: int

    @classmethod
    def for_run(cls, run_id: str) -> MessageSizer:
        sample = ManifestItem(item_id="x", source="x", row=2)
        whole = WorkItem(run_id=run_id, items=[sample]).model_dump_json()
        return cls(queue_message_bytes(whole) - item_message_bytes(sample))

    def message_bytes(self, item_bytes: Iterable[int]) -> int:
        """The size of a message holding items of these sizes."""
        sizes = list(item_bytes)
        return self.envelope_bytes + sum(sizes) + max(len(sizes) - 1, 0)


def mini_batches(
    items: list[ManifestItem],
    size: int,
    sizer: MessageSizer,
    max_bytes: int = QUEUE_MESSAGE_MAX_BYTES,
) -> Iterator[list[ManifestItem]]:
    """Consecutive items packed into messages of at most ``size`` items and ``max_bytes``.

    A count alone would let a few rows with large metadata outgrow a queue message, and the
    whole chunk (so the run) would fail at the enqueue. A batch closes when the next item
    would not fit; an item always gets a message, alone if need be (validation keeps every
    row well inside a message on its own, so the queue never refuses one that got this far).
    """
    batch: list[ManifestItem] = []
    weights: list[int] = []
    for item in items:
        weight = item_message_bytes(item)
        if batch and (len(batch) >= size or sizer.message_bytes([*weights, weight]) > max_bytes):
            yield batch
            batch, weights = [], []
        batch.append(item)
        weights.append(weight)
    if batch:
        yield batch
