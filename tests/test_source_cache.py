"""The node's source cache (node_image/worker/sourcecache.py): one download per source.

Real files on disk and real threads: concurrent fetches share one download, a failed
download is the caller's error and the next fetch tries again, eviction keeps the budget and
never takes data from an item that holds a link, and no source can name a path.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from batchctl.errors import DownloadError
from batchctl.storage.items import Downloaded
from node_image.worker.sourcecache import SourceCache, cache_file_name


class SlowSources:
    """A downloader over in-memory bytes that takes its time and counts its calls."""

    def __init__(self, data: dict[str, bytes], delay_s: float = 0.2) -> None:
        self.data = data
        self.delay_s = delay_s
        self.calls: list[str] = []
        self.fail_next: dict[str, int] = {}
        self._lock = threading.Lock()

    def download(self, source: str, target: Path, max_bytes: int) -> Downloaded:
        with self._lock:
            self.calls.append(source)
            failing = self.fail_next.get(source, 0)
            if failing:
                self.fail_next[source] = failing - 1
        time.sleep(self.delay_s)
        target.write_bytes(self.data[source][: len(self.data[source]) // 2])  # a partial write
        if failing:
            raise DownloadError(f"download of {source} failed: connection reset")
        target.write_bytes(self.data[source])
        return Downloaded(len(self.data[source]), f"etag-{len(self.calls)}")


def test_concurrent_fetches_of_one_source_share_one_download(tmp_path: Path) -> None:
    sources = SlowSources({"blob://long": b"v" * 1000})
    cache = SourceCache(sources, tmp_path / "cache")
    targets = [tmp_path / f"item{i}" / "source" for i in range(6)]
    for target in targets:
        target.parent.mkdir()
    threads = [
        threading.Thread(target=cache.fetch, args=("blob://long", target, 10_000))
        for target in targets
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sources.calls == ["blob://long"]
    assert all(target.read_bytes() == b"v" * 1000 for target in targets)
    # Every fetch of the one copy says the version that copy is.
    assert cache.fetch("blob://long", tmp_path / "again", 10_000) == Downloaded(1000, "etag-1")
    stats = cache.stats()
    assert (stats.downloads, stats.hits, stats.bytes_held) == (1, 6, 1000)


def test_a_failed_download_is_the_callers_error_and_the_next_fetch_tries_again(
    tmp_path: Path,
) -> None:
    sources = SlowSources({"blob://v": b"data" * 10}, delay_s=0.0)
    sources.fail_next["blob://v"] = 1
    cache = SourceCache(sources, tmp_path / "cache")
    with pytest.raises(DownloadError, match="connection reset"):
        cache.fetch("blob://v", tmp_path / "a", 1000)
    assert not list((tmp_path / "cache").iterdir())  # no partial file is kept
    assert cache.fetch("blob://v", tmp_path / "b", 1000) == Downloaded(40, "etag-2")
    assert (tmp_path / "b").read_bytes() == b"data" * 10 and len(sources.calls) == 2


def test_waiters_on_a_failed_download_try_themselves(tmp_path: Path) -> None:
    sources = SlowSources({"blob://v": b"x" * 64}, delay_s=0.3)
    sources.fail_next["blob://v"] = 1
    cache = SourceCache(sources, tmp_path / "cache")
    errors: list[BaseException] = []

    def first() -> None:
        try:
            cache.fetch("blob://v", tmp_path / "first", 1000)
        except DownloadError as error:
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(0.1)  # the second arrives while the first download is under way
    assert cache.fetch("blob://v", tmp_path / "second", 1000).size == 64
    thread.join(5)
    assert len(errors) == 1 and (tmp_path / "second").read_bytes() == b"x" * 64


def test_eviction_keeps_the_budget_and_links_keep_their_data(tmp_path: Path) -> None:
    data = {f"blob://{name}": name.encode() * 100 for name in "abc"}
    sources = SlowSources(data, delay_s=0.0)
    cache = SourceCache(sources, tmp_path / "cache", budget_bytes=250)
    held = tmp_path / "held-a"
    cache.fetch("blob://a", held, 1000)
    cache.fetch("blob://b", tmp_path / "b", 1000)
    cache.fetch("blob://a", tmp_path / "a-again", 1000)  # a is now the most recently used
    cache.fetch("blob://c", tmp_path / "c", 1000)  # over 250 bytes: b goes, not a
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir()) == sorted(
        cache_file_name(f"blob://{name}") for name in "ac"
    )
    assert cache.stats().bytes_held == 200 and cache.stats().evictions == 1
    cache.fetch("blob://b", tmp_path / "b2", 1000)  # evicted: downloaded again
    assert sources.calls.count("blob://b") == 2
    # An item's link outlives the cache's copy.
    cache.discard("blob://a")
    assert held.read_bytes() == b"a" * 100


def test_a_source_larger_than_the_budget_is_served_but_not_kept(tmp_path: Path) -> None:
    sources = SlowSources({"blob://huge": b"h" * 500}, delay_s=0.0)
    cache = SourceCache(sources, tmp_path / "cache", budget_bytes=100)
    cache.fetch("blob://huge", tmp_path / "one", 1000)
    assert (tmp_path / "one").read_bytes() == b"h" * 500
    assert not list((tmp_path / "cache").iterdir())
    cache.fetch("blob://huge", tmp_path / "two", 1000)
    assert len(sources.calls) == 2


def test_no_source_names_a_path_in_the_cache(tmp_path: Path) -> None:
    hostile = "blob://x/../../../../etc/passwd"
    sources = SlowSources({hostile: b"p"}, delay_s=0.0)
    cache = SourceCache(sources, tmp_path / "cache")
    cache.fetch(hostile, tmp_path / "item", 10)
    (name,) = [p.name for p in (tmp_path / "cache").iterdir()]
    digest, serial = name.rsplit("-", 1)
    assert digest == cache_file_name(hostile) and len(digest) == 32 and digest.isalnum()
    assert serial.isdigit()
    cache.close()
    assert not (tmp_path / "cache").exists()


def test_a_copy_deleted_outside_the_lock_is_never_a_newer_copys_file(tmp_path: Path) -> None:
    """A discard deletes its file after it let go of the lock; a fetch of the same source in
    between makes a new copy, which must not be the file the discard then deletes."""
    sources = SlowSources({"blob://v": b"v" * 10}, delay_s=0.0)
    cache = SourceCache(sources, tmp_path / "cache")
    cache.fetch("blob://v", tmp_path / "one", 100)
    old_files = set((tmp_path / "cache").iterdir())
    real_unlink = Path.unlink
    fetched: list[object] = []

    def slow_unlink(self: Path, missing_ok: bool = False) -> None:
        if self in old_files and not fetched:  # the discard's delete, held back ...
            fetched.append(cache.fetch("blob://v", tmp_path / "two", 100))  # ... a new copy
        real_unlink(self, missing_ok=missing_ok)

    Path.unlink = slow_unlink  # type: ignore[method-assign]
    try:
        cache.discard("blob://v")
    finally:
        Path.unlink = real_unlink  # type: ignore[method-assign]
    assert fetched and cache.stats().bytes_held == 10
    # The new copy's file is still there: the next fetch links it, with no download.
    cache.fetch("blob://v", tmp_path / "three", 100)
    assert (tmp_path / "three").read_bytes() == b"v" * 10 and len(sources.calls) == 2


def test_a_wait_for_another_items_download_ends_with_the_items_cancel(tmp_path: Path) -> None:
    sources = SlowSources({"blob://v": b"v"}, delay_s=2.0)
    cache = SourceCache(sources, tmp_path / "cache")
    thread = threading.Thread(target=cache.fetch, args=("blob://v", tmp_path / "first", 10))
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()

    def cancelled() -> None:
        if time.monotonic() - started > 0.6:
            raise TimeoutError("the item ran past its timeout")

    with pytest.raises(TimeoutError):
        cache.fetch("blob://v", tmp_path / "second", 10, cancelled=cancelled)
    assert time.monotonic() - started < 1.8  # did not wait for the 2 s download
    thread.join(5)
