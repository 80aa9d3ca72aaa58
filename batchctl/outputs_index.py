"""The outputs index (``--skip-existing``): one entry per succeeded item, written by the node
that recorded it, the moment it recorded it.

An entry (``_index/ITEM_ID.json`` in the outputs container: ``_`` can begin no run id, so no
run's folder can clash) says which source version the item's worker downloaded, with which
work (the fingerprint), and where its outputs are. Written as items succeed, the index holds
every success of a run whose controller died, and a run's end writes nothing per item.
Pure: shared by the node (which writes) and the controller (which reads, batchctl.skipping).

Why one blob per item, even though a node now records a message's items together: a lookup
(``--skip-existing``) goes by item id, and a later run's manifest maps to no earlier run's
messages. One blob per message would leave a lookup two bad ways, reading every index blob
ever written (a number that grows with every run) or keeping a second index from item to
blob (a write per item again). Per item, an item's newest success overwrites its entry, so
the index stays one blob per item over all runs and a lookup stays one read, done 16 at a
time. On the node it costs one small write per success, after the message's records: about
1 of the fewer than 2 bookkeeping requests per item that bench/bookkeeping.py counts.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from batchctl.contracts import ItemResult, ItemStatus, TaskSettings

INDEX_PREFIX = "_index/"


class IndexEntry(BaseModel):
    """What an earlier run left for one item: enough to decide whether to run it again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str
    source: str
    source_version: str
    fingerprint: str
    run_id: str
    outputs: list[str]
    finished_at: datetime | None = None


def index_blob_name(item_id: str) -> str:
    return f"{INDEX_PREFIX}{item_id}.json"


def fingerprint(settings: TaskSettings, image: str | None = None) -> str:
    """The work that decides an item's outputs: the task settings and the node image.

    A model file or code package of the user's is in the settings by its content reference
    (``sha256:HEX/NAME``, batchctl.artifacts), so new weights are another fingerprint; a
    model named by a path on the node's own disk is named, not hashed (it comes with the
    image, which is part of the fingerprint).
    """
    text = settings.model_dump_json() + "\n" + (image or "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def entry_for(result: ItemResult, task_fingerprint: str) -> IndexEntry | None:
    """The index entry of a success record, or None (not a success, or no source version:
    a source in another account, which the controller cannot version either)."""
    if result.status is not ItemStatus.SUCCEEDED or not result.source_version:
        return None
    return IndexEntry(
        item_id=result.item_id,
        source=result.source,
        source_version=result.source_version,
        fingerprint=task_fingerprint,
        run_id=result.run_id,
        outputs=result.outputs,
        finished_at=result.finished_at,
    )
