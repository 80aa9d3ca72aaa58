"""Adapters over Azure Storage: the only modules that import the storage SDKs.

Plain data in and out: callers see our contracts, names and small dataclasses, never SDK types.
"""

from batchctl.storage.blobs import BlobStore
from batchctl.storage.items import BlobItemStorage
from batchctl.storage.ledger import Ledger, LedgerCounts
from batchctl.storage.queues import QueueMessage, RunQueues, queue_names

__all__ = [
    "BlobItemStorage",
    "BlobStore",
    "Ledger",
    "LedgerCounts",
    "QueueMessage",
    "RunQueues",
    "queue_names",
]
