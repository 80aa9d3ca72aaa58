"""Local mode: put the manifest and the local files it names where a run expects them.

Workers always read from blob storage, so every local video the manifest names is uploaded
to the media container under a deterministic name (see ``local_media_blob_name``); the
validate activity later rewrites those rows' sources to the same names. Rows that are
invalid are left alone here: validation reports them with their row numbers.
"""

from __future__ import annotations

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


def stage_local_manifest(settings: ControllerSettings, manifest: Path, run_id: str) -> str:
    """Create containers and the ledger, upload local videos and the manifest; returns the
    manifest's blob path ("container/name")."""
    store = BlobStore(settings)
    store.ensure_containers()
    Ledger(settings).ensure_table()
    policy = SourcePolicy(local_root=manifest.parent)
    uploaded: set[Path] = set()
    try:
        for record in read_manifest(iter_lines(read_file_chunks(manifest)), policy):
            path = local_path_of(record.source) if isinstance(record, ManifestItem) else None
            if path is not None and path not in uploaded:
                store.upload_file(settings.media_container, local_media_blob_name(path), path)
                uploaded.add(path)
    except ManifestFatalError:
        pass  # the run's own validation reports it, the same way Azure would
    name = f"local/{run_id}/{manifest.name}"
    store.upload_file(settings.manifests_container, name, manifest)
    return f"{settings.manifests_container}/{name}"
