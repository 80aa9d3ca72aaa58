"""The composition root: the services one process works with, built once, passed explicitly.

The Functions app builds one :class:`Services` from its settings at its first function call
(never at import: an import-time error hides every function); a local session builds
another from the storage it started and the local compute backend. Activities, commands and
the controller receive it. Nothing finds a service through the environment after start-up,
so two sessions in one process (tests, `batchctl serve`) cannot see each other's storage.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

from batchctl.compute.base import ComputeBackend
from batchctl.settings import ControllerSettings
from batchctl.storage import BlobStore, Ledger, RunQueues


@dataclass
class Services:
    """Settings, blob store, ledger, queues and compute backend of one controller process."""

    settings: ControllerSettings
    store: BlobStore
    ledger: Ledger
    backend: ComputeBackend
    _queues: dict[str, RunQueues] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def queues(self, run_id: str) -> RunQueues:
        """The run's queues (one client per run, reused: activities run many times)."""
        with self._lock:
            found = self._queues.get(run_id)
            if found is None:
                found = self._queues[run_id] = RunQueues(self.settings, run_id)
            return found

    def close(self) -> None:
        with self._lock:
            queues, self._queues = list(self._queues.values()), {}
        for closer in (*(q.close for q in queues), self.store.close, self.ledger.close):
            with contextlib.suppress(Exception):
                closer()


def build_services(settings: ControllerSettings, backend: ComputeBackend) -> Services:
    return Services(
        settings=settings, store=BlobStore(settings), ledger=Ledger(settings), backend=backend
    )


def backend_from_settings(settings: ControllerSettings) -> ComputeBackend:
    """The compute backend ``settings`` name (AML v2 or v1; local for ``func start`` against
    Azurite, where the "nodes" are processes on the machine running the host)."""
    if settings.compute_backend == "aml":
        from batchctl.compute.aml.gateway_v2 import backend_from_settings as v2

        return v2(settings)
    if settings.compute_backend == "aml_v1":
        from batchctl.compute.aml.gateway_v1 import backend_from_settings as v1

        return v1(settings)
    from pathlib import Path

    from batchctl.compute.local import LocalBackend, LocalFiles

    log_dir = Path(settings.local_log_dir) if settings.local_log_dir else None
    files = LocalFiles(media_root=settings.local_media_root)
    return LocalBackend(settings, log_dir=log_dir, nodes=settings.local_nodes, files=files)
