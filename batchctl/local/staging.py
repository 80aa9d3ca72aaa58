"""Local mode: put a manifest where a run expects it.

A manifest's local videos are not staged: local workers read them in place, under the run's
media root (batchctl/storage/items.py), and the run's validation keeps their ``file://``
sources. Only the manifest travels, as ``submit`` uploads one to a deployed app.
"""

from __future__ import annotations

from pathlib import Path

from batchctl.settings import ControllerSettings
from batchctl.storage import BlobStore, Ledger


def prepare_storage(settings: ControllerSettings) -> BlobStore:
    """Containers and the ledger table (Azure's infra/ creates them; locally we do)."""
    store = BlobStore(settings)
    store.ensure_containers()
    Ledger(settings).ensure_table()
    return store


def stage_local_manifest(settings: ControllerSettings, manifest: Path, run_id: str) -> str:
    """Upload a local manifest; returns its blob path (``container/name``)."""
    store = prepare_storage(settings)
    name = f"local/{run_id}/{manifest.name}"
    store.upload_file(settings.manifests_container, name, manifest)
    return f"{settings.manifests_container}/{name}"
