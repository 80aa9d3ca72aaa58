"""What several benchmarks set up the same way: a local session on a fresh Azurite of its own,
and a manifest of tiny sources for tasks that never decode them.

A fresh Azurite each time, never the storage BATCHCTL_* points at: Azurite's request costs
grow with everything stored in the account, so a benchmark on a used one measures its history.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
from collections.abc import Iterator
from pathlib import Path

from batchctl.local.azurite import azurite
from batchctl.local.session import local_session
from batchctl.local.staging import prepare_storage
from batchctl.services import Services


@contextlib.contextmanager
def fresh_local_session(prefix: str) -> Iterator[Services]:
    """A one-node local session's services on a fresh Azurite, its containers and ledger
    table made, in a scratch folder (named from ``prefix``) removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch, azurite() as instance:
        root = Path(scratch)
        with local_session(
            media_root=root, nodes=1, log_dir=root / "logs", storage=instance.storage_settings()
        ) as services:
            prepare_storage(services.settings)
            yield services


def write_tiny_manifest(folder: Path, items: int) -> Path:
    """``folder``/manifest.csv of ``items`` rows (ids ``item-000000`` on), each naming a
    one-byte source of its own under ``folder``/media by a path relative to the manifest:
    the items of a benchmark whose task never reads its source as a video."""
    sources = folder / "media"
    sources.mkdir(parents=True)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(items):
            item_id = f"item-{index:06d}"
            (sources / f"{item_id}.mp4").write_bytes(b"x")
            writer.writerow([item_id, f"media/{item_id}.mp4"])
    return manifest
