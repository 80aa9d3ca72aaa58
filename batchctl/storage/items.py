"""An item's storage as a worker sees it: its source blob in, its outputs out.

Which blobs a worker may read is :mod:`batchctl.sources`' decision (one set of rules for the
manifest and the worker); this adapter only fetches what those rules allowed, and says what
went wrong in the item error hierarchy (:mod:`batchctl.errors`), so the worker can tell a
missing blob (permanent) from a network blip (retryable).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from batchctl.errors import DownloadError, SourceError, TooLargeError
from batchctl.settings import StorageSettings
from batchctl.sources import BlobLocation, SourceRejectedError, locate_blob, worker_policy
from batchctl.storage.blobs import BlobStore
from batchctl.storage.faults import describe, work_named


@dataclass(frozen=True)
class Downloaded:
    """A fetched source: its size, and its version (None where the reader cannot tell)."""

    size: int
    version: str | None = None


class BlobItemStorage:
    """ItemStorage over blob storage: sources are blob URLs, outputs go to the outputs container.

    A source must be a blob in this worker's own account (any container), or, with managed
    identity, in another Azure storage account (the controller's allowlist decided which).
    Nothing else is fetched: the worker never follows an arbitrary URL.
    """

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.store = BlobStore(settings)
        self._policy = worker_policy(
            settings.blob_url, managed_identity=settings.storage_auth == "managed_identity"
        )
        self._own_account = self._policy.allowed_prefixes[0].rstrip("/")
        self._others: dict[str, BlobStore] = {}
        # Item threads download concurrently: one client per other account, made once.
        self._lock = threading.Lock()

    def locate(self, source: str) -> tuple[BlobStore, str, str]:
        """(store, container, blob name) of a source URL; SourceError when not allowed."""
        try:
            location = locate_blob(source, self._policy)
        except SourceRejectedError as error:
            raise SourceError(
                f"source {source!r} is not a blob URL this worker may read: {error} "
                f"(its account is {self.settings.blob_url})"
            ) from None
        return self._store_of(location), location.container, location.name

    def _store_of(self, location: BlobLocation) -> BlobStore:
        if location.account_url == self._own_account:
            return self.store
        with self._lock:
            store = self._others.get(location.account_url)
            if store is None:
                store = BlobStore(
                    self.settings.model_copy(update={"blob_url": location.account_url})
                )
                self._others[location.account_url] = store
            return store

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded:
        """Stream the blob to ``target``; stops (permanently) past ``max_bytes``. Its size
        and the version downloaded (what --skip-existing indexes, and what a long video's
        segments must all have read).

        One request, not two: the size is checked while streaming rather than asked first.
        """
        store, container, name = self.locate(source)
        size = 0
        try:
            version, chunks = store.open_download(container, name)
            with target.open("wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeError(
                            f"source is over the limit of {max_bytes} bytes; download stopped"
                        )
                    handle.write(chunk)
        except Exception as error:
            status = getattr(error, "status_code", None)
            if status == 404:
                raise SourceError(f"source blob {container}/{name} does not exist") from error
            if getattr(type(error), "permanent", None) is not None:
                raise
            # Network trouble, throttling (429/503) or a role assignment still propagating
            # (403): another attempt may succeed. Named in one line, with the work it was
            # for: the SDK's own words ("Connection broken: ...") name neither.
            work = work_named()
            raise DownloadError(
                f"download of {container}/{name}{f' for {work}' if work else ''} failed "
                f"after the storage retries: {describe(error)}"
            ) from error
        return Downloaded(size, version)

    def write_output(self, name: str, data: bytes, content_type: str) -> None:
        """Write one output blob (overwritten: names are deterministic, retries rewrite)."""
        self.store.upload_bytes(
            self.settings.outputs_container, name, data, content_type=content_type, overwrite=True
        )

    def write_output_file(self, name: str, path: Path, content_type: str) -> None:
        """Upload a file the task wrote (a whole video) by streaming, never whole in memory."""
        with path.open("rb") as handle:
            self.store.upload_stream(
                self.settings.outputs_container,
                name,
                handle,
                length=path.stat().st_size,
                content_type=content_type,
            )

    def close(self) -> None:
        self.store.close()
        for store in self._others.values():
            store.close()
