"""--skip-existing: a growing manifest costs only its new rows; a changed source or changed
task settings run again. Real local runs on the session's Azurite, with a fast task that
marks every item it processes."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest

from batchctl.contracts import ItemStatus, RunOptions
from batchctl.local.azurite import Azurite
from batchctl.local.session import run_locally
from batchctl.outputs_index import IndexEntry, index_blob_name
from batchctl.settings import StorageSettings
from batchctl.skipping import skip_decision
from batchctl.storage import BlobStore, Ledger
from tests import worker_tasks

pytestmark = [pytest.mark.azurite, pytest.mark.slow]


def write_manifest(project: Path, ids: list[str]) -> Path:
    media = project / "media"
    media.mkdir(parents=True, exist_ok=True)
    manifest = project / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for item_id in ids:
            video = media / f"{item_id}.mp4"
            if not video.exists():
                video.write_bytes(f"video {item_id}".encode())
            writer.writerow([item_id, f"media/{item_id}.mp4"])
    return manifest


def test_only_new_changed_or_differently_processed_items_run_again(
    tmp_path: Path,
    azurite: Azurite,
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.1")
    project, out = tmp_path / "project", tmp_path / "out"
    base = RunOptions(task="tests.worker_tasks:QuickTask", poll_interval_s=0.3, idle_exit_s=0.5)
    ledger = Ledger(storage_settings)

    def run(run_id: str, ids: list[str], options: RunOptions) -> dict[str, ItemStatus]:
        markers = tmp_path / f"markers-{run_id}"
        markers.mkdir()
        monkeypatch.setenv(worker_tasks.MARKER_DIR_ENV, str(markers))
        result = run_locally(
            write_manifest(project, ids), options, run_id=run_id, nodes=2, out_dir=out
        )
        statuses = {r.item_id: r.status for r in ledger.iter_results(run_id)}
        processed = {marker.name.split(".")[0] for marker in markers.iterdir()}
        ran = {item for item, status in statuses.items() if status is ItemStatus.SUCCEEDED}
        assert processed == ran, (processed, ran)  # skipped items never reached a worker
        report = result.report
        assert report.succeeded + report.skipped == report.total == len(ids), report.message
        return statuses

    first = run("skip-1", ["a", "b", "c"], base)
    assert set(first.values()) == {ItemStatus.SUCCEEDED}
    # Each entry holds the version its worker downloaded (the record's), not one read later:
    # a source rewritten between the item and the report is not taken for the processed one.
    store = BlobStore(storage_settings)
    for record in ledger.iter_results("skip-1"):
        assert record.source_version, record
        name = index_blob_name(record.item_id)
        entry = IndexEntry.model_validate_json(
            store.download_bytes(storage_settings.outputs_container, name)
        )
        assert entry.source_version == record.source_version

    # The manifest grew by two rows: only those run.
    grown = run(
        "skip-2", ["a", "b", "c", "d", "e"], base.model_copy(update={"skip_existing": True})
    )
    assert {i for i, s in grown.items() if s is ItemStatus.SKIPPED} == {"a", "b", "c"}
    assert {i for i, s in grown.items() if s is ItemStatus.SUCCEEDED} == {"d", "e"}
    skipped = next(r for r in ledger.iter_results("skip-2") if r.item_id == "a")
    assert skipped.outputs and all(name.startswith("skip-1/") for name in skipped.outputs)

    # A source fixed (rewritten) runs again; the rest is still done.
    video = project / "media" / "c.mp4"
    video.write_bytes(b"a better video c")
    os.utime(video, ns=(time.time_ns(), time.time_ns()))
    changed = run(
        "skip-3", ["a", "b", "c", "d", "e"], base.model_copy(update={"skip_existing": True})
    )
    assert {i for i, s in changed.items() if s is ItemStatus.SUCCEEDED} == {"c"}

    # Other task settings: every item runs again.
    other = base.model_copy(update={"skip_existing": True, "fps": 2.0})
    refit = run("skip-4", ["a", "b", "c", "d", "e"], other)
    assert set(refit.values()) == {ItemStatus.SUCCEEDED}


def test_the_decision_needs_the_same_source_version_and_fingerprint() -> None:
    from batchctl.contracts import ManifestItem

    item = ManifestItem(item_id="a", source="http://acct/media/a.mp4", row=2)
    entry = IndexEntry(
        item_id="a",
        source=item.source,
        source_version="v1",
        fingerprint="f1",
        run_id="r1",
        outputs=["r1/items/a/metadata.json"],
    )
    assert skip_decision(entry, item, "v1", "f1")
    assert not skip_decision(entry, item, "v2", "f1")  # the source changed
    assert not skip_decision(entry, item, "v1", "f2")  # other settings or model
    assert not skip_decision(entry, item, None, "f1")  # a version we cannot read
    assert not skip_decision(None, item, "v1", "f1")  # never done
    moved = item.model_copy(update={"source": "http://acct/media/b.mp4"})
    assert not skip_decision(entry, moved, "v1", "f1")  # another video under the same id


def test_a_success_is_indexed_by_the_node_that_records_it_and_only_then() -> None:
    # Written as items succeed (not at the report): a run whose controller dies keeps the
    # index of everything it finished, and a run's end writes nothing per item.
    from datetime import UTC, datetime

    from batchctl.contracts import ItemResult, ItemStatus
    from batchctl.errors import ErrorInfo
    from node_image.worker.recording import Recorder

    class Ledger:
        def __init__(self) -> None:
            self.seen: set[str] = set()

        def record(self, result: ItemResult) -> bool:
            first = result.item_id not in self.seen
            self.seen.add(result.item_id)
            return first

    class Outputs:
        def __init__(self) -> None:
            self.written: list[tuple[str, bytes]] = []

        def write_output(self, name: str, data: bytes, content_type: str) -> None:
            self.written.append((name, data))

    outputs = Outputs()
    recorder = Recorder(
        Ledger(),  # type: ignore[arg-type]
        outputs,
        node_name="n",
        task_name="features",
        wall_clock=lambda: datetime.now(UTC),
        index_fingerprint="f1",
    )

    def success(item_id: str, version: str | None) -> ItemResult:
        return ItemResult(
            run_id="r1",
            item_id=item_id,
            status=ItemStatus.SUCCEEDED,
            source=f"http://acct/media/{item_id}.mp4",
            outputs=[f"r1/items/{item_id}/metadata.json"],
            source_version=version,
        )

    assert recorder.record(success("a", "v1"))
    recorder.close()  # entries are written off the recording thread: wait for them
    ((name, data),) = outputs.written
    entry = IndexEntry.model_validate_json(data)
    assert name == index_blob_name("a")
    assert (entry.fingerprint, entry.source_version, entry.run_id) == ("f1", "v1", "r1")
    assert not recorder.record(success("a", "v1"))  # a duplicate: no second entry
    assert recorder.record(success("b", None))  # no version to compare: no entry
    failure = recorder.failure(
        "r1", "c", "http://acct/media/c.mp4", ErrorInfo("UndecodableError", "x", True),
        attempts=1, timings=success("c", None).timings,
    )  # fmt: skip
    assert recorder.record(failure)
    recorder.close()
    assert len(outputs.written) == 1
