"""Local videos are read in place: a local worker copies the file a manifest names (under
the run's media root, checked again on the worker's side) where a download would put it,
with the version --skip-existing compares; nothing is uploaded into local storage first."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest

from batchctl.controller.validation import source_policy
from batchctl.errors import DownloadError, SourceError, TooLargeError
from batchctl.local.session import local_settings
from batchctl.settings import StorageSettings
from batchctl.sources import SourcePolicy, SourceRejectedError, local_file_version, normalize_source
from batchctl.storage import BlobStore
from batchctl.storage import items as items_module
from batchctl.storage.items import BlobItemStorage, copy_local_source

AZURITE = StorageSettings(
    storage_auth="azurite",
    blob_url="http://127.0.0.1:1/devstoreaccount1",
    queue_url="http://127.0.0.1:2/devstoreaccount1",
    table_url="http://127.0.0.1:3/devstoreaccount1",
)


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "clips").mkdir(parents=True)
    return root


def _source(path: Path) -> str:
    return f"file://{path.resolve()}"


def test_a_local_video_is_copied_whole_with_its_version(tmp_path: Path) -> None:
    root = _root(tmp_path)
    rng = random.Random(7)
    # Empty, one byte, and larger than one sendfile step.
    for size in (0, 1, 8 * 1024**2 + 12_345):
        video = root / "clips" / f"v{size}.mp4"
        video.write_bytes(rng.randbytes(size))
        target = tmp_path / f"copy-{size}"
        got = copy_local_source(_source(video), target, 10 * 1024**2, SourcePolicy(local_root=root))
        assert target.read_bytes() == video.read_bytes()
        assert got.size == size
        assert got.version == local_file_version(video.stat())
        assert got.version == f"size={size};mtime_ns={video.stat().st_mtime_ns}"
    # Through the worker's storage adapter, with a link inside the root (allowed, as the
    # manifest's validation allows it): the file it leads to is read.
    (root / "alias.mp4").symlink_to(root / "clips" / "v1.mp4")
    storage = BlobItemStorage(AZURITE, local_root=root)
    got = storage.download(f"file://{root / 'alias.mp4'}", tmp_path / "alias", 100)
    assert (
        got.size == 1 and (tmp_path / "alias").read_bytes() == (root / "clips/v1.mp4").read_bytes()
    )


def test_a_worker_without_a_media_root_reads_no_local_file(tmp_path: Path) -> None:
    video = _root(tmp_path) / "clips" / "v.mp4"
    video.write_bytes(b"x")
    with pytest.raises(SourceError, match="only a local worker reads"):
        BlobItemStorage(AZURITE).download(_source(video), tmp_path / "t", 100)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "case",
    ["outside", "link-out", "dotdot", "missing", "folder", "fifo", "proc"],
)
def test_a_source_outside_the_root_or_not_a_file_is_refused_by_the_worker(
    tmp_path: Path, case: str
) -> None:
    """A queue message is only as trustworthy as whoever could write to the queue: the
    worker checks the root again, whatever the controller allowed."""
    root = _root(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the run")
    sources = {
        "outside": _source(secret),
        "link-out": f"file://{root / 'clips' / 'link.mp4'}",
        "dotdot": f"file://{root}/clips/../../secret.txt",
        "missing": f"file://{root / 'clips' / 'gone.mp4'}",
        "folder": f"file://{root / 'clips'}",
        "fifo": f"file://{root / 'clips' / 'pipe.mp4'}",
        "proc": "file:///proc/self/environ",
    }
    (root / "clips" / "link.mp4").symlink_to(secret)
    os.mkfifo(root / "clips" / "pipe.mp4")
    target = tmp_path / "target"
    started = time.monotonic()
    with pytest.raises(SourceError, match="not a file this worker may read") as caught:
        copy_local_source(sources[case], target, 100, SourcePolicy(local_root=root))
    assert time.monotonic() - started < 2  # a FIFO never blocks the worker
    assert "outside the allowed root" in str(caught.value) or case in ("missing", "folder", "fifo")
    assert not target.exists() or target.read_bytes() == b""
    assert "not for the run" not in str(caught.value)


def test_a_folder_swapped_for_a_link_after_the_check_is_caught_by_what_was_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check resolves the path; a folder on it replaced by a link before the open would
    lead the open out of the root (O_NOFOLLOW guards the last name only): the open file's
    real path is checked again."""
    root = _root(tmp_path)
    (root / "clips" / "v.mp4").write_bytes(b"inside")
    _swap_clips_after_the_check(root, tmp_path, monkeypatch)
    target = tmp_path / "target"
    with pytest.raises(SourceError, match="changed into a file outside the root"):
        copy_local_source(
            _source(root / "clips" / "v.mp4"), target, 100, SourcePolicy(local_root=root)
        )
    assert not target.exists()


def test_a_file_over_the_limit_or_growing_past_it_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _root(tmp_path)
    video = root / "clips" / "v.mp4"
    video.write_bytes(b"x" * 1000)
    policy = SourcePolicy(local_root=root)
    with pytest.raises(TooLargeError, match="over the limit of 999 bytes"):
        copy_local_source(_source(video), tmp_path / "t1", 999, policy)
    assert not (tmp_path / "t1").exists()
    # A file still being written: under the limit when opened, over it once copied (its
    # size at the open said 10 bytes; it had grown to 3 MB by the copy).
    video.write_bytes(b"y" * 3 * 1024**2)
    with pytest.raises(TooLargeError, match="over the limit of 2097152 bytes; copy stopped"):
        copy_local_source(_source(video), tmp_path / "t2", 2 * 1024**2, _grown(policy, monkeypatch))


@pytest.mark.parametrize(
    ("number", "kind", "words"),
    [
        (errno.ENOENT, SourceError, "does not exist"),
        (errno.ENOTDIR, SourceError, "does not exist"),
        (errno.ELOOP, SourceError, "symbolic link"),
        (errno.EACCES, SourceError, "may not be read: Permission denied"),
        (errno.EIO, DownloadError, "failed: Input/output error"),
    ],
)
def test_a_local_read_error_is_permanent_unless_a_retry_could_mend_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, number: int, kind: type, words: str
) -> None:
    root = _root(tmp_path)
    video = root / "clips" / "v.mp4"
    video.write_bytes(b"x")

    def failing_open(path: object, flags: int) -> int:
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(kind, match=words) as caught:
        copy_local_source(_source(video), tmp_path / "t", 100, SourcePolicy(local_root=root))
    assert getattr(caught.value, "permanent", None) is (kind is SourceError)
    assert str(video) in str(caught.value)


@pytest.mark.azurite
def test_validation_keeps_local_sources_for_local_compute_only(
    storage_settings: StorageSettings, tmp_path: Path
) -> None:
    root = _root(tmp_path)
    (root / "clips" / "v.mp4").write_bytes(b"x")
    settings = local_settings(storage_settings, media_root=root, nodes=1, log_dir=tmp_path)
    store = BlobStore(settings)
    try:
        local = source_policy(settings, store)
        assert normalize_source("clips/v.mp4", local) == _source(root / "clips" / "v.mp4")
        # A media root configured for an app whose nodes are not on this machine: refused
        # at validation, by row, rather than failing on the nodes.
        remote = source_policy(settings.model_copy(update={"compute_backend": "aml"}), store)
        with pytest.raises(SourceRejectedError, match="only allowed in local mode"):
            normalize_source("clips/v.mp4", remote)
    finally:
        store.close()


def test_without_sendfile_or_proc_the_copy_is_the_same_and_as_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without sendfile, or a platform without /proc (macOS): the copy goes
    through memory, and the open file's path is resolved again and compared by inode."""
    root = _root(tmp_path)
    video = root / "clips" / "v.mp4"
    video.write_bytes(random.Random(3).randbytes(3 * 1024**2 + 7))
    real_readlink = os.readlink

    def no_sendfile(*args: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    def no_proc(path: str | Path, *args: object, **kwargs: object) -> str:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_readlink(path)

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    monkeypatch.setattr(os, "readlink", no_proc)
    policy = SourcePolicy(local_root=root)
    got = copy_local_source(_source(video), tmp_path / "copy", 10 * 1024**2, policy)
    assert (
        tmp_path / "copy"
    ).read_bytes() == video.read_bytes() and got.size == video.stat().st_size
    with pytest.raises(TooLargeError, match="copy stopped"):
        copy_local_source(_source(video), tmp_path / "copy2", 1024**2, _grown(policy, monkeypatch))
    # The folder swapped for a link between the check and the open is still caught.
    _swap_clips_after_the_check(root, tmp_path, monkeypatch)
    with pytest.raises(SourceError, match="changed into a file outside the root"):
        copy_local_source(_source(video), tmp_path / "copy3", 100, policy)


def _swap_clips_after_the_check(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the source is checked, ``root/clips`` becomes a link to a folder outside the
    root holding a ``v.mp4`` of its own (what a local attacker would race)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "v.mp4").write_bytes(b"outside secret")
    checked = normalize_source

    def check_then_swap(value: str, policy: SourcePolicy) -> str:
        answer = checked(value, policy)
        (root / "clips").rename(tmp_path / "old-clips")
        (root / "clips").symlink_to(elsewhere)
        return answer

    monkeypatch.setattr(items_module, "normalize_source", check_then_swap)


def _grown(policy: SourcePolicy, monkeypatch: pytest.MonkeyPatch) -> SourcePolicy:
    """The policy, with fstat saying the file was small when it was opened."""
    real_fstat = os.fstat

    def fstat_at_open(fd: int) -> os.stat_result:
        fields = list(real_fstat(fd))
        fields[6] = 10  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat_at_open)
    return policy


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_work_folder_is_the_copy_s_retryable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, number: int
) -> None:
    """The worker's own folder failing is not the source's fault: retryable (another node
    may have room), and the message names the copy, not the video."""
    root = _root(tmp_path)
    video = root / "clips" / "v.mp4"
    video.write_bytes(b"x" * 1000)

    def failing(*args: object) -> int:
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(os, "sendfile", failing)
    policy = SourcePolicy(local_root=root)
    (tmp_path / "work").mkdir()
    with pytest.raises(DownloadError, match="writing the copy of a local video to") as caught:
        copy_local_source(_source(video), tmp_path / "work" / "copy", 2000, policy)
    assert os.strerror(number) in str(caught.value)
    # A work folder that is gone: the same, retryable, naming the copy.
    monkeypatch.undo()
    with pytest.raises(DownloadError, match="writing the copy") as caught:
        copy_local_source(_source(video), tmp_path / "no-such-folder" / "copy", 2000, policy)
    assert str(tmp_path / "no-such-folder") in str(caught.value)
