"""Local mode's media upload: every local video a manifest names reaches the media container,
whole and once, uploaded side by side; a file that cannot be read stops the upload loudly."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from batchctl.controller import local_media_blob_name
from batchctl.local.session import local_settings
from batchctl.local.staging import UPLOAD_THREADS, prepare_storage, upload_local_media
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore

pytestmark = pytest.mark.azurite


def _lines(rows: list[str]) -> list[bytes]:
    return [f"{row}\n".encode() for row in ["video", *rows]]


def test_every_local_video_is_uploaded_once_and_whole_side_by_side(
    storage_settings: StorageSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(4)
    settings = local_settings(storage_settings, media_root=tmp_path, nodes=1, log_dir=tmp_path)
    store = prepare_storage(settings)
    files = {}
    for index in range(30):
        path = tmp_path / f"clip-{index:02d}.mp4"
        path.write_bytes(rng.randbytes(rng.randrange(1, 200_000)))
        files[path] = path.read_bytes()
    # Each file named twice (once by a relative path), and a row that is not a local file.
    rows = [p.name for p in files] + [str(p) for p in files] + ["https://example.com/x.mp4"]
    rng.shuffle(rows)
    in_flight, most = [0], [0]
    lock = threading.Lock()
    upload = BlobStore.upload_file

    def slow_upload(self: BlobStore, *args: object, **kwargs: object) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.01)  # a round trip
            upload(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(BlobStore, "upload_file", slow_upload)
    assert upload_local_media(store, settings, _lines(rows), tmp_path) == len(files)
    assert 1 < most[0] <= UPLOAD_THREADS
    for path, content in files.items():
        name = local_media_blob_name(path)
        assert store.download_bytes(settings.media_container, name) == content
        stat = path.stat()
        # The file's own version, what --skip-existing compares.
        assert store.version(settings.media_container, name) == (
            f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"
        )
    store.close()


def test_a_video_that_cannot_be_read_stops_the_upload_with_its_error(
    storage_settings: StorageSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = local_settings(storage_settings, media_root=tmp_path, nodes=1, log_dir=tmp_path)
    store = prepare_storage(settings)
    for index in range(6):
        (tmp_path / f"clip-{index}.mp4").write_bytes(b"x" * 100)
    upload = BlobStore.upload_file

    def failing(self: BlobStore, container: str, name: str, path: Path, **kwargs: object) -> None:
        if path.name == "clip-3.mp4":
            raise PermissionError(f"cannot read {path}")
        upload(self, container, name, path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BlobStore, "upload_file", failing)
    rows = [f"clip-{index}.mp4" for index in range(6)]
    with pytest.raises(PermissionError, match=r"clip-3\.mp4"):
        upload_local_media(store, settings, _lines(rows), tmp_path)
    store.close()
