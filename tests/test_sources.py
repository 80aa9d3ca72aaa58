"""One source policy for both sides: what a manifest may name and what a worker may read.

The manifest side (normalize_source with an allowlist) is held in detail by test_manifest.py
and test_manifest_fuzz.py; here, the worker's side of the same rules (worker_policy and
locate_blob), and the storage adapter that refuses before it fetches anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchctl import manifest, sources
from batchctl.errors import SourceError
from batchctl.settings import StorageAuth, StorageSettings
from batchctl.sources import (
    BlobLocation,
    SourcePolicy,
    SourceRejectedError,
    locate_blob,
    normalize_source,
    prefixes_from_accounts,
    worker_policy,
)
from batchctl.storage.items import BlobItemStorage

AZURITE = "http://127.0.0.1:10000/devstoreaccount1"
OWN = "https://mine.blob.core.windows.net"


def test_the_manifest_uses_the_one_policy() -> None:
    assert manifest.SourcePolicy is sources.SourcePolicy
    assert manifest.normalize_source is sources.normalize_source
    assert manifest.SourceRejectedError is sources.SourceRejectedError


def test_a_worker_reads_any_container_of_its_own_account() -> None:
    policy = worker_policy(AZURITE, managed_identity=False)
    assert locate_blob(f"{AZURITE}/media/run/a%20b.mp4", policy) == BlobLocation(
        account_url=AZURITE, container="media", name="run/a b.mp4"
    )
    assert locate_blob(f"{OWN}/other/v.mp4", worker_policy(OWN, managed_identity=False)) == (
        BlobLocation(account_url=OWN, container="other", name="v.mp4")
    )


def test_other_azure_accounts_only_with_managed_identity() -> None:
    source = "https://theirs.blob.core.windows.net/media/v.mp4"
    with pytest.raises(SourceRejectedError, match="not under an allowed"):
        locate_blob(source, worker_policy(OWN, managed_identity=False))
    assert locate_blob(source, worker_policy(OWN, managed_identity=True)) == BlobLocation(
        account_url="https://theirs.blob.core.windows.net", container="media", name="v.mp4"
    )
    # The default port is the same endpoint (canonical form); any other is not Azure's.
    assert locate_blob(
        "https://theirs.blob.core.windows.net:443/media/v.mp4",
        worker_policy(OWN, managed_identity=True),
    ).account_url == ("https://theirs.blob.core.windows.net")


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("http://example.com/v.mp4", "http is only allowed to a loopback host"),
        ("https://example.com/v.mp4", "not under an allowed"),
        ("https://theirs.blob.core.windows.net:8443/media/v.mp4", "not under an allowed"),
        ("https://theirs.blob.core.windows.net/media/v.mp4?sig=x", "query strings"),
        ("https://user@theirs.blob.core.windows.net/media/v.mp4", "credentials"),
        ("https://theirs.blob.core.windows.net/media/../x.mp4", "path segments"),
        ("https://theirs.blob.core.windows.net/media", "names a container, not a blob"),
        ("https://theirs.blob.core.windows.net.evil.com/media/v.mp4", "not under an allowed"),
        ("ftp://theirs.blob.core.windows.net/media/v.mp4", "scheme 'ftp:'"),
        ("/etc/passwd", "local paths are only allowed in local mode"),
        (f"{AZURITE}/media", "names no blob"),
    ],
)
def test_a_worker_refuses_what_no_allowlist_could_allow(source: str, rule: str) -> None:
    with pytest.raises(SourceRejectedError, match=rule):
        locate_blob(source, worker_policy(AZURITE, managed_identity=True))


def test_the_manifest_and_the_worker_agree_on_allowed_sources() -> None:
    # Whatever the controller's allowlist lets through for an account, a worker of that
    # account reads as the same blob.
    controller = SourcePolicy(prefixes_from_accounts(["mine/media"]))
    accepted = normalize_source("https://MINE.blob.core.windows.net/media/x%41 y.mp4", controller)
    assert locate_blob(accepted, worker_policy(OWN, managed_identity=False)) == BlobLocation(
        account_url=OWN, container="media", name="xA y.mp4"
    )


def _settings(auth: StorageAuth, blob_url: str) -> StorageSettings:
    return StorageSettings(
        storage_auth=auth,
        blob_url=blob_url,
        queue_url=blob_url.replace("blob", "queue"),
        table_url=blob_url.replace("blob", "table"),
    )


def test_the_adapter_refuses_before_fetching(tmp_path: Path) -> None:
    storage = BlobItemStorage(_settings("azurite", AZURITE))
    try:
        with pytest.raises(SourceError, match="not a blob URL this worker may read"):
            storage.download("http://example.com/v.mp4", tmp_path / "v", 100)
        assert not (tmp_path / "v").exists()
        store, container, name = storage.locate(f"{AZURITE}/media/v.mp4")
        assert (store, container, name) == (storage.store, "media", "v.mp4")
    finally:
        storage.close()


def test_the_adapter_keeps_one_client_per_other_account() -> None:
    storage = BlobItemStorage(_settings("managed_identity", OWN))
    try:
        first, _, _ = storage.locate("https://theirs.blob.core.windows.net/a/v.mp4")
        again, _, _ = storage.locate("https://theirs.blob.core.windows.net/b/w.mp4")
        own, _, _ = storage.locate(f"{OWN}/media/v.mp4")
        assert first is again and first is not storage.store and own is storage.store
        assert first.settings.blob_url == "https://theirs.blob.core.windows.net"
    finally:
        storage.close()
