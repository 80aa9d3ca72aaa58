"""What several benchmarks set up the same way: a local session on a fresh Azurite of its own.

A fresh one each time, never the storage BATCHCTL_* points at: Azurite's request costs grow
with everything stored in the account, so a benchmark on a used one measures its history.
"""

from __future__ import annotations

import contextlib
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
