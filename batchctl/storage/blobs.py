"""Blob operations: upload, streaming download, list, exists, delete."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient, ContentSettings

from batchctl.settings import StorageSettings
from batchctl.storage.clients import sync_credential
from batchctl.storage.retry import storage_client_options

# Blob metadata key: the local file's version, noted when local mode uploads a source.
SOURCE_VERSION_KEY = "source_version"


class BlobStore:
    """The blob side of a storage account. Names are ``container`` + ``name`` pairs."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self._service = BlobServiceClient(
            settings.blob_url,
            credential=sync_credential(settings),
            **storage_client_options("blob"),
        )

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
        """What tells this version of a blob from others: the ``source_version`` a local
        upload noted (the file's size and modification time: every upload gets a new ETag),
        else the ETag; None when there is no such blob."""
        try:
            properties = self._blob(container, name).get_blob_properties()
        except ResourceNotFoundError:
            return None
        noted = (properties.metadata or {}).get(SOURCE_VERSION_KEY)
        return str(noted) if noted else str(properties.etag)

    def download_bytes(self, container: str, name: str) -> bytes:
        return bytes(self._blob(container, name).download_blob().readall())

    def download_chunks(self, container: str, name: str) -> Iterator[bytes]:
        """Stream a blob in chunks of a few MB: memory is flat in the blob's size."""
        downloader = self._blob(container, name).download_blob()
        yield from downloader.chunks()

    def open_download(self, container: str, name: str) -> tuple[str, Iterator[bytes]]:
        """The blob's version (as :meth:`version` says it) and its chunks, of that version.

        The version comes with the first response, and the SDK reads every later chunk on
        the condition that the ETag is still the same, so the bytes are the version's.
        """
        downloader = self._blob(container, name).download_blob()
        properties = downloader.properties
        noted = (properties.metadata or {}).get(SOURCE_VERSION_KEY)
        return (str(noted) if noted else str(properties.etag)), downloader.chunks()

    def download_to_file(self, container: str, name: str, path: Path) -> int:
        """Stream a blob to a local file; returns its size in bytes."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with path.open("wb") as handle:
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

    def delete(self, container: str, name: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self._blob(container, name).delete_blob()

    def close(self) -> None:
        self._service.close()

    def _blob(self, container: str, name: str) -> BlobClient:
        return self._service.get_blob_client(container, name)
