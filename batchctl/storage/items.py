"""An item's storage as a worker sees it: its source blob in, its outputs out.

Which blobs a worker may read is :mod:`batchctl.sources`' decision (one set of rules for the
manifest and the worker); this adapter only fetches what those rules allowed, and says what
went wrong in the item error hierarchy (:mod:`batchctl.errors`), so the worker can tell a
missing blob (permanent) from a network blip (retryable).

A local worker (local mode: the manifest's folder is on this machine) also reads the local
videos a manifest names, in place of a download: a kernel copy of the file under the run's
media root, checked against that root again on the worker's side (a queue message is only as
trustworthy as whoever could write to the queue). Uploading every video into local storage
first and downloading it again cost a 240-clip run 1.5 s before its first item and 3.7 s of
CPU, and a local run over 50 GB of videos the same 50 GB again on disk.

And a node of ``batchctl run`` writes each output it uploads into the run's own outputs
folder as well (:class:`LocalOutputCopies`), so the copy-out finds them there rather than
downloading every one again (a 240-clip run's CLI spent 1.7 s of CPU, and Azurite more,
copying them out as they appeared).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from batchctl.errors import DownloadError, SourceError, TooLargeError
from batchctl.settings import StorageSettings
from batchctl.sources import (
    BlobLocation,
    SourcePolicy,
    SourceRejectedError,
    local_file_version,
    local_path_of,
    locate_blob,
    normalize_source,
    worker_policy,
)
from batchctl.storage.blobs import BlobStore, atomic_file
from batchctl.storage.faults import describe, work_named

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        settings: StorageSettings,
        *,
        local_root: Path | None = None,
        local_outputs: LocalOutputCopies | None = None,
    ) -> None:
        self.settings = settings
        # batchctl run: the run's outputs folder on this machine, written beside storage.
        self.local_outputs = local_outputs
        # Local mode: the folder whose files a manifest may name (None: blobs only).
        self._local = None if local_root is None else SourcePolicy(local_root=local_root)
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
        A local worker copies a local source instead (:func:`copy_local_source`).
        """
        if source.startswith("file://"):
            if self._local is None:
                raise SourceError(
                    f"source {source!r} is a local file, which only a local worker reads "
                    "(this worker reads blobs)"
                )
            return copy_local_source(source, target, max_bytes, self._local)
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
        if self.local_outputs is not None:  # after the upload: storage is the record
            self.local_outputs.write(name, data)

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
        if self.local_outputs is not None:
            self.local_outputs.copy(name, path)

    def close(self) -> None:
        self.store.close()
        for store in self._others.values():
            store.close()


class LocalOutputCopies:
    """``batchctl run``'s outputs folder, as a local node writes it: the outputs container's
    ``RUN_ID/`` prefix on this machine. Each output is written there once it is in storage,
    whole or not at all (beside its name, then renamed), so the copy-out, which compares
    every output's size and MD5 with the file in its place, downloads none of them again.

    Best effort: storage holds the run's outputs and the copy-out makes the folder exact,
    so a copy that fails (a full disk) is logged and left to it; the item does not fail.
    """

    def __init__(self, folder: Path, run_id: str) -> None:
        self.folder = folder
        self.prefix = f"{run_id}/"

    def path_of(self, name: str) -> Path | None:
        """Where blob ``name`` goes (None: not one of the run's outputs, such as an index
        entry). The worker checked the name already; checked again, no name leaves."""
        if not name.startswith(self.prefix):
            return None
        relative = name[len(self.prefix) :]
        parts = relative.split("/")
        if not relative or any(part in ("", ".", "..") for part in parts):
            return None
        return self.folder.joinpath(*parts)

    def write(self, name: str, data: bytes) -> None:
        path = self.path_of(name)
        if path is not None:
            self._placed(name, path, lambda handle: handle.write(data))

    def copy(self, name: str, source: Path) -> None:
        path = self.path_of(name)
        if path is not None:
            self._placed(name, path, lambda handle: _send_file(source, handle))

    def remove(self, name: str) -> None:
        """The output was deleted from storage (a segment's part, once its item is whole)."""
        path = self.path_of(name)
        if path is None:
            return
        try:
            path.unlink(missing_ok=True)
            folder = path.parent
            while folder != self.folder and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        except OSError as error:
            log.info("output %s: its copy in %s stays for the copy-out: %s", name, path, error)

    def _placed(self, name: str, path: Path, fill: Callable[[IO[bytes]], object]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as handle:
                fill(handle)
        except OSError as error:
            log.warning(
                "output %s is in storage, but not written to %s (the copy-out will): %s",
                name,
                path,
                error,
            )


# Bytes handed to one sendfile call: large enough that a 1 GB video is a few hundred calls,
# small enough that a file growing while it is copied is stopped near its limit.
_COPY_STEP = 8 * 1024**2


def copy_local_source(
    source: str, target: Path, max_bytes: int, policy: SourcePolicy
) -> Downloaded:
    """Copy the local video ``source`` (``file://`` + path) to ``target``, as a download
    would: permanently refused when it is not a regular file under ``policy``'s root or is
    over ``max_bytes``; retryable on an I/O error. Its version is the one :func:`stat` of
    the open file gives (what the ledger and --skip-existing record).

    The path is resolved and checked under the root (symlinks followed, as the manifest's
    validation does), opened without following a link or blocking on a FIFO, and checked
    again by what the open file really is: a folder on the path swapped for a link between
    the check and the open cannot lead out of the root.
    """
    named = local_path_of(source)
    try:
        # The path as a manifest would name it (absolute), through the manifest's own rules.
        if named is None or not named.is_absolute():
            raise SourceRejectedError("a local source is file:// and an absolute path")
        resolved = local_path_of(normalize_source(str(named), policy))
    except SourceRejectedError as error:
        raise SourceError(
            f"source {source!r} is not a file this worker may read: {error}"
        ) from None
    assert resolved is not None and policy.local_root is not None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(resolved, flags)
    except OSError as error:
        raise _local_error(source, error) from None
    try:
        opened = os.fstat(fd)
        really = _opened_path(fd, resolved, opened)
        regular = stat.S_ISREG(opened.st_mode)
        if not regular or really is None or not really.is_relative_to(policy.local_root):
            became = "a file outside the root" if regular else "no regular file"
            raise SourceError(
                f"source {source!r} is not a file this worker may read: it changed into "
                f"{became} while it was opened"
            )
        if opened.st_size > max_bytes:
            raise TooLargeError(
                f"source is over the limit of {max_bytes} bytes ({opened.st_size}); not copied"
            )
        size = _copy_capped(fd, target, max_bytes)
    except OSError as error:
        raise _local_error(source, error) from None
    finally:
        os.close(fd)
    return Downloaded(size, local_file_version(opened))


def _opened_path(fd: int, resolved: Path, opened: os.stat_result) -> Path | None:
    """The path of the file open at ``fd``: Linux's /proc says which file it really is.
    Elsewhere (macOS has no /proc) the path is resolved again and must still be the open
    file (same device and inode), or None: a swap that is undone between the two looks is
    the one case only /proc catches."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
    again = Path(os.path.realpath(resolved))
    try:
        now = os.stat(again)
    except OSError:
        return None
    return again if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino) else None


def _send_file(source: Path, handle: IO[bytes]) -> None:
    with source.open("rb") as opened:
        _send(opened.fileno(), handle.fileno())


# Errors of the copy's own side (the worker's work folder), never the source's: another
# attempt, maybe on another node, may have the room.
_TARGET_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _copy_capped(fd: int, target: Path, max_bytes: int) -> int:
    """Copy from ``fd`` to a new ``target``; TooLargeError past ``max_bytes`` (a file that
    grows while it is copied). The target's own failures are retryable DownloadErrors that
    name it, not the source."""
    try:
        handle = target.open("wb")
    except OSError as error:
        raise _target_error(target, error) from None
    with handle:
        try:
            return _send(fd, handle.fileno(), max_bytes)
        except OSError as error:
            if error.errno in _TARGET_ERRORS:
                raise _target_error(target, error) from None
            raise


def _target_error(target: Path, error: OSError) -> DownloadError:
    work = work_named()
    return DownloadError(
        f"writing the copy of a local video to {target}{f' for {work}' if work else ''} "
        f"failed: {error.strerror or error}"
    )


def _send(fd: int, out: int, max_bytes: int | None = None) -> int:
    """Copy all of ``fd`` to ``out`` in the kernel (no bytes through Python); returns the
    size. Past ``max_bytes`` (when given): TooLargeError, the copy stopped there."""
    size = 0
    while True:
        try:
            sent = os.sendfile(out, fd, size, _COPY_STEP)
        except OSError as error:
            if size or error.errno not in _NO_SENDFILE:
                raise
            return _read_write(fd, out, max_bytes)
        if not sent:
            return size
        size += sent
        if max_bytes is not None and size > max_bytes:
            raise TooLargeError(f"source is over the limit of {max_bytes} bytes; copy stopped")


# sendfile refused for these files (a file system without it, a platform where its target
# must be a socket): the copy goes through this process's memory instead.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP})


def _read_write(fd: int, out: int, max_bytes: int | None) -> int:
    """:func:`_send`'s copy without sendfile, from the start of ``fd``."""
    size = 0
    while chunk := os.pread(fd, _READ_STEP, size):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise TooLargeError(f"source is over the limit of {max_bytes} bytes; copy stopped")
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
    return size


_READ_STEP = 1024**2


def _local_error(source: str, error: OSError) -> Exception:
    """A local read's error in the item hierarchy: what a retry cannot mend is permanent."""
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return SourceError(f"source file {source!r} does not exist")
    if error.errno == errno.ELOOP:
        return SourceError(f"source {source!r} became a symbolic link; not followed")
    if error.errno in (errno.EACCES, errno.EPERM):
        return SourceError(f"source file {source!r} may not be read: {error.strerror}")
    work = work_named()
    return DownloadError(
        f"reading the local file {source!r}{f' for {work}' if work else ''} failed: "
        f"{error.strerror or error}"
    )
