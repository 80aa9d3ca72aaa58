"""--skip-existing: what an earlier run already did is not done again.

The node that records an item's success notes an index entry for it in the outputs
container (``_index/ITEM_ID.json``: ``_`` can begin no run id, so no run's folder can clash;
batchctl.outputs_index) with the item's source, the source's version, the work's
fingerprint and where its outputs are. A run with ``skip_existing`` looks each valid item up
at validation: when the entry has the same source, the same source version (the blob's ETag;
in local mode the file's size and modification time, as the worker read it) and the same
fingerprint, the item is recorded as
``skipped`` (its record names the earlier outputs) and left out of the queue. Anything else
(no entry, a changed file, other settings, another model file) runs.

The fingerprint is the task settings (task, model, fps, frame size, timestamps, batch, code)
and the node image: a model file or code package travels by its content reference, so new
weights are another fingerprint. The source version in an entry is the one the worker
downloaded (the record's ``source_version``: the ETag the download read, every chunk of it
under that ETag), so a source rewritten after its item ran is run again next time.
Sources in other storage accounts have no version the controller can read (it holds no
credential for them): they always run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from azure.core.exceptions import ResourceNotFoundError

from batchctl.contracts import ItemResult, ItemStatus, ManifestItem
from batchctl.outputs_index import IndexEntry, index_blob_name
from batchctl.services import Services
from batchctl.sources import local_file_version, local_path_of

log = logging.getLogger(__name__)

# Lookups in flight at once (each one small request).
PARALLEL_REQUESTS = 16


def source_version(services: Services, source: str) -> str | None:
    """The version of a source blob in this app's account, or of a local video (the one a
    local worker notes as it reads it); None when not readable here."""
    path = local_path_of(source)
    if path is not None:
        try:
            return local_file_version(os.stat(path))
        except OSError:
            return None  # gone or unreadable: the item runs, and says why
    prefix = services.store.url(services.settings.media_container, "").rsplit("/", 2)[0] + "/"
    if not source.startswith(prefix):
        return None
    container, _, name = source[len(prefix) :].partition("/")
    if not container or not name:
        return None
    return services.store.version(container, name)


def _entry(services: Services, item_id: str) -> IndexEntry | None:
    try:
        data = services.store.download_bytes(
            services.settings.outputs_container, index_blob_name(item_id)
        )
    except ResourceNotFoundError:
        return None
    try:
        return IndexEntry.model_validate_json(data)
    except ValueError:
        return None  # an unreadable entry skips nothing


def skip_decision(
    entry: IndexEntry | None, item: ManifestItem, version: str | None, task_fingerprint: str
) -> bool:
    """Pure: is ``item`` done already, by ``entry``?"""
    return (
        entry is not None
        and version is not None
        and entry.source == item.source
        and entry.source_version == version
        and entry.fingerprint == task_fingerprint
    )


def skipped_results(
    services: Services, run_id: str, items: list[ManifestItem], task_fingerprint: str
) -> Iterator[ItemResult]:
    """The skipped records of the items an earlier run did already (lookups in parallel)."""

    def check(item: ManifestItem) -> ItemResult | None:
        entry = _entry(services, item.item_id)
        if entry is None:
            return None
        version = source_version(services, item.source)
        if not skip_decision(entry, item, version, task_fingerprint):
            return None
        return ItemResult(
            run_id=run_id,
            item_id=item.item_id,
            status=ItemStatus.SKIPPED,
            source=item.source,
            outputs=entry.outputs,
            node=f"skipped: outputs of run {entry.run_id}",
            finished_at=datetime.now(UTC),
        )

    with ThreadPoolExecutor(PARALLEL_REQUESTS, thread_name_prefix="skip") as pool:
        for result in pool.map(check, items):
            if result is not None:
                yield result
