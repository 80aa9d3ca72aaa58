"""Shared fixtures. One private Azurite per test session (started on free ports)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchctl.local.azurite import Azurite, start_azurite
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
    return StorageSettings(
        storage_auth="azurite",
        blob_url=azurite.blob_url,
        queue_url=azurite.queue_url,
        table_url=azurite.table_url,
    )


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


@pytest.fixture
def controller_env(
    storage_settings: StorageSettings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The controller's settings point at the session's Azurite and the local backend; its
    cached adapters are rebuilt before and after, so no other test sees this environment."""
    from batchctl import controller
    from batchctl.settings import get_controller_settings

    monkeypatch.setenv("BATCHCTL_STORAGE_AUTH", "azurite")
    monkeypatch.setenv("BATCHCTL_BLOB_URL", storage_settings.blob_url)
    monkeypatch.setenv("BATCHCTL_QUEUE_URL", storage_settings.queue_url)
    monkeypatch.setenv("BATCHCTL_TABLE_URL", storage_settings.table_url)
    monkeypatch.setenv("BATCHCTL_COMPUTE_BACKEND", "local")
    caches = (get_controller_settings, controller._store, controller._ledger)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()
