"""Shared fixtures. One private Azurite per test session (started on free ports)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchctl.compute.local import LocalBackend
from batchctl.local.azurite import Azurite, start_azurite
from batchctl.local.session import local_settings
from batchctl.services import Services, build_services
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    instance = start_azurite(workdir=tmp_path_factory.mktemp("azurite"))
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def storage_settings(azurite: Azurite) -> StorageSettings:
    return azurite.storage_settings()


@pytest.fixture(scope="session")
def blob_store(storage_settings: StorageSettings) -> Iterator[BlobStore]:
    store = BlobStore(storage_settings)
    store.ensure_containers()
    yield store
    store.close()


@pytest.fixture(scope="session")
def ledger(storage_settings: StorageSettings) -> Iterator[Ledger]:
    ledger = Ledger(storage_settings)
    ledger.ensure_table()
    yield ledger
    ledger.close()


@pytest.fixture
def run_id() -> str:
    """A fresh run id per test, so tests sharing the session's Azurite never collide."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services(
    storage_settings: StorageSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    """The controller's services over the session's Azurite with the local backend, built
    explicitly (the composition root a local session uses): no environment is patched."""
    media_root = tmp_path_factory.mktemp("media")
    settings = local_settings(
        storage_settings, media_root=media_root, nodes=2, log_dir=tmp_path_factory.mktemp("logs")
    )
    built = build_services(settings, LocalBackend(settings, nodes=2))
    yield built
    built.close()
