"""Blob operations: upload, streaming download, list, exists, delete."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContentSettings, StorageStreamDownloader

from batchctl.settings import StorageSettings
from batchctl.storage.clients import blob_service_client
from batchctl.storage.faults import describe, naming
from batchctl.storage.retry import RetryBounds, Role, retry_bounds

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only once the block ends without an error.

    Written beside ``path`` (a rename within one folder is atomic) under a hidden name; on
    any error the partial file is removed and ``path`` is left as it was.
    """
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed on every path below
        mode="wb", dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False
    )
    try:
        with handle:
            yield handle
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


class ListedBlob(NamedTuple):
    """A blob as a listing gives it (BlobStore.list_with_digests)."""

    name: str
    size: int
    # The service's MD5 of the bytes: set by Put Blob (Azure and Azurite compute it for a
    # blob uploaded in one request); None for one committed from blocks without it.
    md5: bytes | None


class BlobStore:
    """The blob side of a storage account. Names are ``container`` + ``name`` pairs.

    ``role`` picks how long its calls retry (:mod:`batchctl.storage.retry`).
    """

    def __init__(self, settings: StorageSettings, *, role: Role = "ordinary") -> None:
        self.settings = settings
        self._bounds = retry_bounds("blob", role)
        self._service = blob_service_client(settings, role=role)

    def ensure_containers(self, *containers: str) -> None:
        """Create containers that are missing (local mode; in Azure, infra/ creates them)."""
        names = containers or (
            self.settings.manifests_container,
            self.settings.media_container,
            self.settings.runs_container,
            self.settings.outputs_container,
        )
        for name in names:
            with contextlib.suppress(ResourceExistsError):
                self._service.create_container(name)

    def url(self, container: str, name: str) -> str:
        return f"{self.settings.blob_url}/{container}/{name}"

    def upload_bytes(
        self,
        container: str,
        name: str,
        data: bytes | str,
        *,
        content_type: str | None = None,
        overwrite: bool = True,
    ) -> None:
        payload = data.encode("utf-8") if isinstance(data, str) else data
        self._blob(container, name).upload_blob(
            payload,
            overwrite=overwrite,
            content_settings=ContentSettings(content_type=content_type) if content_type else None,
        )

    def upload_stream(
        self,
        container: str,
        name: str,
        stream: IO[bytes] | Iterable[bytes],
        *,
        length: int | None = None,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Upload from a file object or chunk iterator without holding it all in memory."""
        self._blob(container, name).upload_blob(
            stream,
            length=length,
            overwrite=True,
            max_concurrency=2,
            content_settings=ContentSettings(content_type=content_type) if content_type else None,
            metadata=metadata,
        )

    def upload_file(
        self, container: str, name: str, path: Path, metadata: dict[str, str] | None = None
    ) -> None:
        with path.open("rb") as handle:
            self.upload_stream(
                container, name, handle, length=path.stat().st_size, metadata=metadata
            )

    def version(self, container: str, name: str) -> str | None:
        """What tells this version of a blob from others: its ETag; None when there is no
        such blob. (A local video's version is its size and modification time:
        batchctl.sources.local_file_version.)"""
        try:
            properties = self._blob(container, name).get_blob_properties()
        except ResourceNotFoundError:
            return None
        return str(properties.etag)

    def download_bytes(self, container: str, name: str) -> bytes:
        return b"".join(self.download_chunks(container, name))

    def download_chunks(self, container: str, name: str) -> Iterator[bytes]:
        """Stream a blob in chunks of a few MB: memory is flat in the blob's size.

        A download cut off mid-body resumes where it stopped (see :meth:`_resumed`).
        """
        yield from self._resumed(container, name, None, _Cuts(self._bounds, container, name))

    def open_download(self, container: str, name: str) -> tuple[str, Iterator[bytes]]:
        """The blob's version (as :meth:`version` says it) and its chunks, of that version.

        The version comes with the first response, and the SDK reads every later chunk on
        the condition that the ETag is still the same, so the bytes are the version's (a
        resumed download asks for the same ETag too).
        """
        cuts = _Cuts(self._bounds, container, name)
        downloader = self._request(container, name, cuts)
        version = str(downloader.properties.etag)
        return version, self._resumed(container, name, downloader, cuts)

    def _request(
        self, container: str, name: str, cuts: _Cuts, offset: int = 0, etag: str | None = None
    ) -> StorageStreamDownloader[bytes]:
        """The download's first response (from ``offset``, of version ``etag``)."""
        while True:
            try:
                # Named: the SDK reads the first answer's body after the send returned.
                with naming(f"download of {container}/{name}"):
                    if etag is None:
                        return self._blob(container, name).download_blob()
                    return self._blob(container, name).download_blob(
                        offset=offset, etag=etag, match_condition=MatchConditions.IfNotModified
                    )
            except HttpResponseError as error:
                if not cuts.retry(error, offset):
                    raise

    def _resumed(
        self,
        container: str,
        name: str,
        downloader: StorageStreamDownloader[bytes] | None,
        cuts: _Cuts,
    ) -> Iterator[bytes]:
        """The blob's chunks, the download resumed at the byte it stopped at when the body
        is cut off mid-way more often than the SDK's own loop tries.

        The SDK reads a streamed body after its pipeline returned, so the retry policy never
        sees such a cut; its download code tries each read 3 times, 1 s apart, a number no
        option changes. Past that, this asks again for the rest (of the same ETag: bytes of
        two versions are never joined), with the blob policy's backoff and bound in time.
        """
        if downloader is None:
            downloader = self._request(container, name, cuts)
        etag = str(downloader.properties.etag)
        total = int(downloader.size)
        received = 0
        while True:
            try:
                for chunk in _named(downloader.chunks(), f"download of {container}/{name}"):
                    received += len(chunk)
                    yield chunk
                return
            except HttpResponseError as error:
                if not cuts.retry(error, received):
                    raise
            if received >= total:
                return
            downloader = self._request(container, name, cuts, offset=received, etag=etag)

    def download_to_file(self, container: str, name: str, path: Path) -> int:
        """Stream a blob to a local file; returns its size in bytes.

        Written to a temporary file beside ``path`` and renamed over it once whole, so a
        download that fails part way leaves no truncated or empty file under the name (and
        an older copy there stays as it was).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with atomic_file(path) as handle:
            for chunk in self.download_chunks(container, name):
                handle.write(chunk)
                size += len(chunk)
        return size

    def size(self, container: str, name: str) -> int:
        return int(self._blob(container, name).get_blob_properties().size)

    def exists(self, container: str, name: str) -> bool:
        return bool(self._blob(container, name).exists())

    def list_names(self, container: str, prefix: str = "") -> list[str]:
        client = self._service.get_container_client(container)
        return [blob.name for blob in client.list_blobs(name_starts_with=prefix or None)]

    def list_with_etags(self, container: str, prefix: str = "") -> list[tuple[str, str]]:
        """(name, ETag) pairs: the ETag tells a new version of a blob from one already seen."""
        client = self._service.get_container_client(container)
        return [
            (blob.name, str(blob.etag))
            for blob in client.list_blobs(name_starts_with=prefix or None)
        ]

    def list_with_digests(self, container: str, prefix: str = "") -> list[ListedBlob]:
        """Every blob under ``prefix`` with its size and Content-MD5: what tells whether a
        local file already holds a blob's bytes, without downloading it."""
        client = self._service.get_container_client(container)
        return [
            ListedBlob(
                name=blob.name,
                size=int(blob.size),
                md5=bytes(blob.content_settings.content_md5)
                if blob.content_settings.content_md5
                else None,
            )
            for blob in client.list_blobs(name_starts_with=prefix or None)
        ]

    def delete(self, container: str, name: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self._blob(container, name).delete_blob()

    def close(self) -> None:
        self._service.close()

    def _blob(self, container: str, name: str) -> BlobClient:
        return self._service.get_blob_client(container, name)


def _named(chunks: Iterator[bytes], call: str) -> Iterator[bytes]:
    """``chunks``, each read with the download named (see faults.naming); the name is set
    only while a chunk is read, never while the caller holds one (a generator shares its
    caller's context)."""
    while True:
        with naming(call):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


class _Cuts:
    """Retries of one download whose body was cut off mid-way, within the blob calls' bound
    in time (counted from the first cut): what the SDK raises once its own three tries are
    spent is an ``HttpResponseError`` with no response (a status means storage answered,
    and the retry policy has had its say about that already)."""

    def __init__(self, bounds: RetryBounds, container: str, name: str) -> None:
        self._bounds = bounds
        self._what = f"{container}/{name}"
        self._deadline: float | None = None
        self._retries = 0

    def retry(self, error: HttpResponseError, offset: int) -> bool:
        """Whether to ask again (after the backoff, slept here) or give ``error`` up."""
        if error.response is not None:
            return False
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._bounds.budget_s
        delay = self._bounds.backoff_s(self._retries)
        if now + delay > self._deadline:
            return False
        self._retries += 1
        log.info(
            "download of %s cut off mid-body (%s): asking again from byte %d",
            self._what,
            describe(error),
            offset,
        )
        time.sleep(delay)
        return True


class ThreadStores:
    """A BlobStore (of ``role``) for each thread that asks, closed together: for pools of
    threads that each upload or download (the copy-out, the local media upload).

    One store per thread, not one shared: clients.py gives each client azure-core's
    RequestsTransport with a requests session of its own, whose HTTPAdapter pools 10
    connections a host (requests' DEFAULT_POOLSIZE, pool_block False). Sixteen threads on
    one client would open connections past the tenth and urllib3 would close each one after
    its request ("Connection pool is full, discarding connection" warnings, a new TCP
    handshake per download). A store per thread keeps one live connection each, through the
    one factory, and leaves no session shared between threads.
    """

    def __init__(self, settings: StorageSettings, *, role: Role = "ordinary") -> None:
        self._settings = settings
        self._role: Role = role
        self._local = threading.local()
        self._lock = threading.Lock()
        self._stores: list[BlobStore] = []

    def get(self) -> BlobStore:
        store: BlobStore | None = getattr(self._local, "store", None)
        if store is None:
            store = BlobStore(self._settings, role=self._role)
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()
