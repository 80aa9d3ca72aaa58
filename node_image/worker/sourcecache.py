"""One download of a long video per node, however many of its segments the node runs.

Why. Segments (node_image/worker/segments.py) let several nodes share one long video; each
segment decodes only its own seconds, but every one of them needs the file. Downloading the
whole source once per segment made the straggler case slower with segments than without
(bench.segments: 4.62 s of download against 0.67 s), so a node keeps a long video it
downloaded for as long as it may still run segments of it.

How. The cache keeps files under its own folder, keyed by the source's URL. ``fetch`` gives
an item its own hard link to the cached file (a copy where the file system has no links):
the item's folder is deleted with the item as before, and an eviction never pulls a file out
from under a decoder that still reads it (the link keeps the data). Concurrent fetches of one
source share one download (the first caller downloads; the others wait for it, and try
themselves if it failed). The cache holds at most ``budget_bytes``; the least recently used
files go first, and a file larger than the whole budget is never kept.

A source that changes during a run is not re-read by a node that holds it: segments of one
item must see one version of the video anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from batchctl.storage.items import Downloaded

log = logging.getLogger(__name__)

# A node's cache: a few long videos (a 4-hour 1080p H.264 file is 5-10 GB; GPU VMs' local
# disks hold hundreds of GB, and the worker's own item folders need room beside it).
DEFAULT_BUDGET_BYTES = 32 * 1024**3
# How often a wait for another item's download of the same source checks its own cancel.
WAIT_POLL_S = 0.5


class Downloader(Protocol):
    """Fetches a source to a file (``BlobItemStorage.download`` has exactly this)."""

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded: ...


@dataclass
class _Entry:
    path: Path
    ready: threading.Event = field(default_factory=threading.Event)
    size: int = 0
    version: str | None = None
    failed: bool = False


@dataclass(frozen=True)
class CacheStats:
    downloads: int
    hits: int
    evictions: int
    bytes_held: int


def cache_file_name(source: str) -> str:
    """The cached file's name before its entry's serial: a digest of the URL, so no source
    can name a path here."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:32]


def link_or_copy(cached: Path, target: Path) -> None:
    """``target`` becomes the cached file's data: a hard link, or a copy where none can be."""
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    try:
        os.link(cached, target)
    except OSError:
        shutil.copyfile(cached, target)


class SourceCache:
    """Downloaded sources kept on this node's disk for the segments that still need them."""

    def __init__(
        self, downloader: Downloader, root: Path, *, budget_bytes: int = DEFAULT_BUDGET_BYTES
    ) -> None:
        self.downloader = downloader
        self.root = root
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._downloads = 0
        self._hits = 0
        self._evictions = 0
        self._serial = 0
        root.mkdir(parents=True, exist_ok=True)

    def stats(self) -> CacheStats:
        with self._lock:
            held = sum(entry.size for entry in self._entries.values() if entry.ready.is_set())
            return CacheStats(self._downloads, self._hits, self._evictions, held)

    def fetch(
        self,
        source: str,
        target: Path,
        max_bytes: int,
        *,
        cancelled: Callable[[], None] | None = None,
    ) -> Downloaded:
        """``source`` at ``target`` (downloaded only if this node does not hold it); its size
        and the version the download read (the same for every fetch of one cached copy).

        Raises what the download raises (the item's error: permanent or retryable). A wait
        for another item's download of the same source calls ``cancelled`` every
        :data:`WAIT_POLL_S`, which raises to end the wait (the item's cancel token).
        """
        while True:
            with self._lock:
                entry = self._entries.get(source)
                mine = entry is None
                if entry is None:
                    # A file of its own per entry: a copy being deleted (evicted, discarded)
                    # outside the lock must never be a newer entry's file for the same URL.
                    self._serial += 1
                    entry = _Entry(self.root / f"{cache_file_name(source)}-{self._serial}")
                    self._entries[source] = entry
                else:
                    self._entries.move_to_end(source)
            if mine:
                return self._download(source, entry, target, max_bytes)
            while not entry.ready.wait(WAIT_POLL_S):
                if cancelled is not None:
                    cancelled()  # raises: the item's timeout or shutdown ends the wait
            if entry.failed:
                continue  # the download that was under way failed: try ourselves
            try:
                link_or_copy(entry.path, target)
            except FileNotFoundError:
                # Evicted between the wait and the link: fetch it again.
                self._forget(source, entry)
                continue
            with self._lock:
                self._hits += 1
            return Downloaded(entry.size, entry.version)

    def discard(self, source: str) -> None:
        """Drop ``source`` from the cache (a whole item that was not split: no segment of it
        will come). Links already given out keep their data."""
        with self._lock:
            entry = self._entries.get(source)
            if entry is None or not entry.ready.is_set():
                return
            del self._entries[source]
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------
    def _download(self, source: str, entry: _Entry, target: Path, max_bytes: int) -> Downloaded:
        partial = entry.path.with_suffix(".partial")
        try:
            fetched = self.downloader.download(source, partial, max_bytes)
            partial.replace(entry.path)
            link_or_copy(entry.path, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            entry.failed = True
            self._forget(source, entry)
            entry.ready.set()
            raise
        entry.size, entry.version = fetched.size, fetched.version
        with self._lock:
            self._downloads += 1
        entry.ready.set()
        self._evict(keep=source)
        return fetched

    def _forget(self, source: str, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(source) is entry:
                del self._entries[source]

    def _evict(self, *, keep: str) -> None:
        """Least recently used first, down to the budget; ``keep`` (just fetched) only if it
        alone is over the budget."""
        doomed: list[_Entry] = []
        with self._lock:
            held = sum(e.size for e in self._entries.values() if e.ready.is_set())
            for source in list(self._entries):
                if held <= self.budget_bytes:
                    break
                entry = self._entries[source]
                if not entry.ready.is_set() or (source == keep and len(self._entries) > 1):
                    continue
                del self._entries[source]
                held -= entry.size
                doomed.append(entry)
                self._evictions += 1
            if held > self.budget_bytes and keep in self._entries:
                entry = self._entries.pop(keep)
                doomed.append(entry)
                self._evictions += 1
        for entry in doomed:
            log.info("source cache: evicted %s (%d bytes)", entry.path.name, entry.size)
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()


__all__ = ["DEFAULT_BUDGET_BYTES", "CacheStats", "Downloader", "SourceCache", "cache_file_name"]
