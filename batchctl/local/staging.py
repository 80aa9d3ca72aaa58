"""Local mode: put the manifest and the local files it names where a run expects them.

Workers always read from blob storage, so every local video the manifest names is uploaded
to the media container under a deterministic name (see ``local_media_blob_name``); the
validate activity later rewrites those rows' sources to the same names. Rows that are
invalid are left alone here: validation reports them with their row numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from batchctl.contracts import ManifestItem
from batchctl.controller import local_media_blob_name
from batchctl.manifest import (
    ManifestFatalError,
    SourcePolicy,
    iter_lines,
    local_path_of,
    read_file_chunks,
    read_manifest,
)
from batchctl.settings import ControllerSettings
from batchctl.storage import BlobStore, Ledger
from batchctl.storage.blobs import SOURCE_VERSION_KEY, ThreadStores

# Local videos uploaded at once when a run starts (see upload_local_media).
UPLOAD_THREADS = 8


def prepare_storage(settings: ControllerSettings) -> BlobStore:
    """Containers and the ledger table (Azure's infra/ creates them; locally we do)."""
    store = BlobStore(settings)
    store.ensure_containers()
    Ledger(settings).ensure_table()
    return store


def upload_local_media(
    store: BlobStore, settings: ControllerSettings, lines: Iterable[bytes], root: Path
) -> int:
    """Upload every local video a manifest names (under ``root``), :data:`UPLOAD_THREADS`
    at a time; returns how many. (One after another, 240 clips kept a run from starting for
    3 s: each upload waits for its round trip and Azurite's write.) The first upload that
    fails stops the rest and raises."""
    paths: dict[Path, None] = {}  # in manifest order, once each
    try:
        for record in read_manifest(lines, SourcePolicy(local_root=root)):
            path = local_path_of(record.source) if isinstance(record, ManifestItem) else None
            if path is not None:
                paths.setdefault(path)
    except ManifestFatalError:
        pass  # the run's own validation reports it, the same way Azure would
    if len(paths) <= 1:
        for path in paths:
            _upload_one(store, settings, path)
        return len(paths)
    stores = ThreadStores(settings)
    try:
        with ThreadPoolExecutor(
            max_workers=min(UPLOAD_THREADS, len(paths)), thread_name_prefix="upload-media"
        ) as pool:
            # list(): every upload's result, so the first failure raises here.
            list(pool.map(lambda path: _upload_one(stores.get(), settings, path), paths))
    finally:
        stores.close()
    return len(paths)


def _upload_one(store: BlobStore, settings: ControllerSettings, path: Path) -> None:
    # The file's own version (an upload gets a new ETag each run): what --skip-existing
    # compares.
    stat = path.stat()
    version = {SOURCE_VERSION_KEY: f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"}
    store.upload_file(settings.media_container, local_media_blob_name(path), path, metadata=version)


def stage_local_manifest(
    settings: ControllerSettings, manifest: Path, run_id: str, media_root: Path | None = None
) -> str:
    """Upload a local manifest's videos and the manifest itself; returns its blob path.

    Relative video paths resolve against ``media_root`` (default: the manifest's folder).
    """
    store = prepare_storage(settings)
    root = media_root or manifest.parent
    upload_local_media(store, settings, iter_lines(read_file_chunks(manifest)), root)
    name = f"local/{run_id}/{manifest.name}"
    store.upload_file(settings.manifests_container, name, manifest)
    return f"{settings.manifests_container}/{name}"
