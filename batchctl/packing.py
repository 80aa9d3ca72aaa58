"""How many items one queue message carries: pure policy, decided once when a run starts.

More items per message means fewer messages to send (a queue takes about 2,000 messages/s;
1M items one per message is 500 s of sending) and fewer receives and deletes; fewer items
per message means a finer grain at the end of the run, where a node holding a big message
keeps the others waiting. Up to 8 items a message, while keeping at least 4 messages for
every node the run may have: 1,000,000 items on 100 nodes pack 8 a message (125,000
messages); 20 items on 2 nodes pack 2 a message; a small run packs one a message.
"""

from __future__ import annotations

MAX_ITEMS_PER_MESSAGE = 8
MIN_MESSAGES_PER_NODE = 4


def items_per_message(total_items: int, max_nodes: int) -> int:
    """The default number of items per message for a run of ``total_items``."""
    per_node_floor = max(1, max_nodes) * MIN_MESSAGES_PER_NODE
    return max(1, min(MAX_ITEMS_PER_MESSAGE, total_items // per_node_floor))
