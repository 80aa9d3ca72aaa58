"""--skip-existing: what an earlier run already did is not done again.

Every run's report step notes, for each item it succeeded, an index entry in the outputs
container (``_index/ITEM_ID.json``: ``_`` can begin no run id, so no run's folder can clash)
with the item's source, the source's version, the task fingerprint and where its outputs
are. A run with ``skip_existing`` looks each valid item up at validation: when the entry has
the same source, the same source version (the blob's ETag; in local mode the file's size and
modification time, noted at upload) and the same task fingerprint, the item is recorded as
``skipped`` (its record names the earlier outputs) and left out of the queue. Anything else
(no entry, a changed file, other settings, another model file) runs.

The fingerprint is the task settings (task, model, fps, frame size, timestamps, batch) with
a model file's contents hashed in: the same model path with new weights is another model.
The source version in an entry is the one the worker downloaded (the record's
``source_version``: the ETag the download read, every chunk of it under that ETag), so a
source rewritten after its item ran is run again next time. Records of an older worker have
none; their version is read when the report is written.
Sources in other storage accounts have no version the controller can read (it holds no
credential for them): they always run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError
from pydantic import BaseModel, ConfigDict

from batchctl.contracts import ItemResult, ItemStatus, ManifestItem, TaskSettings
from batchctl.services import Services

log = logging.getLogger(__name__)

INDEX_PREFIX = "_index/"
# Lookups and index writes in flight at once (each one small request).
PARALLEL_REQUESTS = 16


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


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings: TaskSettings) -> str:
    """The task settings that decide an item's outputs, a model file's contents included."""
    model = settings.model
    weights = model.split("@", 1)[1] if "@" in model else None
    parts = [settings.model_dump_json()]
    for name in (model, weights):
        path = Path(name) if name else None
        if path is not None and path.is_file():
            stat = path.stat()
            parts.append(_file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def source_version(services: Services, source: str) -> str | None:
    """The version of a source blob in this app's account; None when not readable here."""
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


def write_index(services: Services, results: Iterable[ItemResult], task_fingerprint: str) -> int:
    """Index entries for the succeeded ``results``; how many were written."""

    def write(result: ItemResult) -> bool:
        try:
            return _write(result)
        except Exception as error:  # only a later skip is lost, never this run's report
            log.warning("outputs index entry for %s not written: %s", result.item_id, error)
            return False

    def _write(result: ItemResult) -> bool:
        # The version the worker downloaded; read now only for records without it (older
        # workers), which leaves a source rewritten after its item ran taken for it.
        version = result.source_version or source_version(services, result.source)
        if version is None:
            return False
        entry = IndexEntry(
            item_id=result.item_id,
            source=result.source,
            source_version=version,
            fingerprint=task_fingerprint,
            run_id=result.run_id,
            outputs=result.outputs,
            finished_at=result.finished_at,
        )
        services.store.upload_bytes(
            services.settings.outputs_container,
            index_blob_name(result.item_id),
            json.dumps(entry.model_dump(mode="json")),
            content_type="application/json",
        )
        return True

    written = 0
    batch: list[ItemResult] = []
    with ThreadPoolExecutor(PARALLEL_REQUESTS, thread_name_prefix="index") as pool:
        # In batches: map() would hold a future for every item of a million-item run.
        for result in results:
            if result.status is ItemStatus.SUCCEEDED:
                batch.append(result)
            if len(batch) >= 1000:
                written += sum(pool.map(write, batch))
                batch = []
        written += sum(pool.map(write, batch))
    return written
