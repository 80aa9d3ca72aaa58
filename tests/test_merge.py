"""The merged Parquet output on a real Azurite: ledger-driven, deduplicated, idempotent.

Item outputs are written the way the worker writes them (its own ``_npz`` and output names),
with the awkward cases a real run produces: an item whose outputs were written twice by a
duplicate delivery (and whose success record was attempted twice), a failed item that left
a features file behind, outputs with no ledger record at all, a success record whose
features file is missing, and an item of another dimension.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from activities import make_activities
from batchctl.activity_names import Activity
from batchctl.contracts import ItemError, ItemResult, ItemStatus, MergeSummary
from batchctl.merge import (
    FEATURES_FILE,
    METADATA_FILE,
    item_output_prefix,
    manifest_name,
    merge_run_outputs,
    merged_prefix,
    part_name,
)
from batchctl.services import Services
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger
from node_image.worker import loop as worker_loop
from node_image.worker.tasks import features as worker_features

pytestmark = pytest.mark.azurite

DIM = 16
MODEL = "TinyNet"
ITEMS = 30


@dataclass(frozen=True)
class FakeItem:
    item_id: str
    features: npt.NDArray[np.float32]
    timestamps: npt.NDArray[np.float64]
    row: int
    metadata: dict[str, str]

    @property
    def frames(self) -> int:
        return len(self.timestamps)


def _item(index: int, frames: int, dim: int = DIM, prefix: str = "v") -> FakeItem:
    rng = np.random.default_rng(index)
    return FakeItem(
        item_id=f"{prefix}{index:03d}",
        features=rng.standard_normal((frames, dim)).astype(np.float32),
        timestamps=np.arange(frames, dtype=np.float64) * 0.5 + index / 1000,
        row=index + 2,
        metadata={"category": f"cat{index % 3}", "title": f"video {index}, 'quoted'"},
    )


def _source(store: BlobStore, item_id: str) -> str:
    return store.url("media", f"{item_id}.mp4")


def _write_outputs(
    store: BlobStore, container: str, run_id: str, item: FakeItem, *, features: bool = True
) -> list[str]:
    """Writes an item's outputs as the worker does; returns their names (the ledger's list)."""
    prefix = worker_loop.output_prefix(run_id, item.item_id)
    written = []
    if features:
        store.upload_bytes(
            container,
            prefix + worker_features.FEATURES_FILE,
            worker_features._npz(item.features, item.timestamps),
        )
    written.append(prefix + worker_features.FEATURES_FILE)
    metadata = {
        "run_id": run_id,
        "item_id": item.item_id,
        "source": _source(store, item.item_id),
        "row": item.row,
        "manifest_metadata": item.metadata,
        "model": MODEL,
        "feature_dim": item.features.shape[1] if item.features.ndim == 2 else DIM,
        "frames": item.frames,
        "outputs": list(written),
    }
    store.upload_bytes(container, prefix + worker_loop.METADATA_FILE, json.dumps(metadata))
    written.append(prefix + worker_loop.METADATA_FILE)
    return written


def _succeeded(store: BlobStore, run_id: str, item_id: str, outputs: list[str]) -> ItemResult:
    return ItemResult(
        run_id=run_id,
        item_id=item_id,
        status=ItemStatus.SUCCEEDED,
        source=_source(store, item_id),
        outputs=outputs,
        finished_at=datetime.now(UTC),
    )


@dataclass
class FakeRun:
    run_id: str
    container: str
    merged: dict[str, FakeItem]  # what must appear, by item id
    excluded: set[str]  # ids that must not appear


@pytest.fixture
def fake_run(blob_store: BlobStore, ledger: Ledger, run_id: str) -> FakeRun:
    container = blob_store.settings.outputs_container
    merged: dict[str, FakeItem] = {}
    # ~30 items with varying frame counts (1..13), one of them with no frames at all.
    for index in range(ITEMS):
        frames = 0 if index == 7 else (index * 7) % 13 + 1
        item = _item(index, frames)
        outputs = _write_outputs(blob_store, container, run_id, item)
        assert ledger.record(_succeeded(blob_store, run_id, item.item_id, outputs))
        merged[item.item_id] = item

    # A duplicate delivery: outputs written again (same names) and a second success record
    # attempted, which the first-write-wins ledger refuses.
    twice = merged["v005"]
    outputs = _write_outputs(blob_store, container, run_id, twice)
    assert not ledger.record(_succeeded(blob_store, run_id, twice.item_id, outputs))

    # A failed item whose features file was written before it failed: never merged.
    failed = _item(900, 5, prefix="failed")
    _write_outputs(blob_store, container, run_id, failed)
    assert ledger.record(
        ItemResult(
            run_id=run_id,
            item_id=failed.item_id,
            status=ItemStatus.FAILED,
            error=ItemError(error_class="X", message="boom", permanent=True, attempts=3),
        )
    )
    # Outputs with no ledger record at all (a worker died before recording): never merged.
    orphan = _item(901, 4, prefix="orphan")
    _write_outputs(blob_store, container, run_id, orphan)
    # A success record whose features file is missing: counted as skipped.
    gone = _item(902, 3, prefix="gone")
    outputs = _write_outputs(blob_store, container, run_id, gone, features=False)
    assert ledger.record(_succeeded(blob_store, run_id, gone.item_id, outputs))
    # An item of another dimension (sorts after the v* items that fix the dataset's dim).
    wide = _item(903, 6, dim=DIM * 2, prefix="wide")
    outputs = _write_outputs(blob_store, container, run_id, wide)
    assert ledger.record(_succeeded(blob_store, run_id, wide.item_id, outputs))

    return FakeRun(
        run_id=run_id,
        container=container,
        merged=merged,
        excluded={failed.item_id, orphan.item_id, gone.item_id, wide.item_id},
    )


def _read_dataset(store: BlobStore, container: str, summary: MergeSummary) -> pa.Table:
    tables = [
        pq.read_table(io.BytesIO(store.download_bytes(container, name))) for name in summary.parts
    ]
    return pa.concat_tables(tables)


def _merged_names(store: BlobStore, fake: FakeRun) -> set[str]:
    return set(store.list_names(fake.container, merged_prefix(fake.run_id)))


def _check_dataset(store: BlobStore, ledger: Ledger, fake: FakeRun, summary: MergeSummary) -> None:
    expected_rows = sum(item.frames for item in fake.merged.values())
    assert summary.items == len(fake.merged)
    assert summary.rows == expected_rows
    assert summary.dim == DIM
    assert summary.skipped == 2
    assert summary.skipped_by_reason == {"features_missing": 1, "dim_mismatch": 1}
    assert {(s.item_id, s.reason) for s in summary.skipped_items} == {
        ("gone902", "features_missing"),
        ("wide903", "dim_mismatch"),
    }
    assert summary.duplicate_records == 0
    # Nothing dropped silently: every succeeded ledger record is merged or skipped.
    succeeded = ledger.counts(fake.run_id).succeeded
    assert summary.items + summary.skipped == succeeded

    # Exactly the listed parts and the manifest are under the prefix.
    assert _merged_names(store, fake) == {*summary.parts, manifest_name(fake.run_id)}

    table = _read_dataset(store, fake.container, summary)
    assert table.num_rows == expected_rows
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert table.schema.field("item_id").type == pa.string()
    assert table.schema.field("frame_index").type == pa.int32()
    assert table.schema.field("timestamp_s").type == pa.float64()
    assert {"meta_category", "meta_title", "model", "source", "row"} <= set(table.column_names)

    rows = table.to_pydict()
    by_item: dict[str, list[int]] = {}
    for index, item_id in enumerate(rows["item_id"]):
        by_item.setdefault(item_id, []).append(index)
    assert not set(by_item) & fake.excluded
    # One row set per succeeded item: its row count equals its frame count (none for the
    # item without frames), however often its outputs were written.
    assert {k: len(v) for k, v in by_item.items()} == {
        item_id: item.frames for item_id, item in fake.merged.items() if item.frames
    }
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    for item_id, indices in by_item.items():
        item = fake.merged[item_id]
        order = sorted(indices, key=lambda i: rows["frame_index"][i])
        assert [rows["frame_index"][i] for i in order] == list(range(item.frames))
        np.testing.assert_array_equal(vectors[order], item.features)
        np.testing.assert_array_equal(
            np.array([rows["timestamp_s"][i] for i in order]), item.timestamps
        )
        first = indices[0]
        assert rows["meta_category"][first] == item.metadata["category"]
        assert rows["meta_title"][first] == item.metadata["title"]
        assert rows["model"][first] == MODEL
        assert rows["row"][first] == item.row
        assert rows["source"][first] == _source(store, item_id)
        # An item's rows never straddle two parts: they are contiguous in the dataset.
        assert indices == list(range(indices[0], indices[0] + len(indices)))

    manifest = json.loads(store.download_bytes(fake.container, manifest_name(fake.run_id)))
    assert [part["name"] for part in manifest["parts"]] == summary.parts
    assert sum(part["rows"] for part in manifest["parts"]) == expected_rows
    assert manifest["rows"] == expected_rows
    assert manifest["items"] == summary.items
    assert manifest["dim"] == DIM
    assert manifest["metadata_columns"] == {"meta_category": "category", "meta_title": "title"}


def test_merge_is_one_row_set_per_succeeded_item(
    blob_store: BlobStore, ledger: Ledger, fake_run: FakeRun
) -> None:
    summary = merge_run_outputs(
        blob_store,
        ledger,
        fake_run.run_id,
        container=fake_run.container,
        part_rows=40,
        row_group_rows=16,
        prefetch=4,
    )
    assert len(summary.parts) >= 4  # a small part size: several parts
    assert summary.parts == [part_name(fake_run.run_id, i) for i in range(len(summary.parts))]
    _check_dataset(blob_store, ledger, fake_run, summary)
    # Each part holds whole items and at most one item beyond the part size.
    for name in summary.parts:
        metadata = pq.read_metadata(io.BytesIO(blob_store.download_bytes(fake_run.container, name)))
        assert metadata.num_rows < 40 + 13
        assert metadata.num_row_groups >= 1


def test_rerun_replaces_the_merge_and_deletes_stale_parts(
    blob_store: BlobStore, ledger: Ledger, fake_run: FakeRun
) -> None:
    first = merge_run_outputs(
        blob_store, ledger, fake_run.run_id, container=fake_run.container, part_rows=20
    )
    again = merge_run_outputs(
        blob_store, ledger, fake_run.run_id, container=fake_run.container, part_rows=20
    )
    assert again == first
    _check_dataset(blob_store, ledger, fake_run, again)

    # A leftover part from some older merge, and a bigger part size: fewer parts now, and
    # every part of the earlier merge that is no longer listed is gone.
    blob_store.upload_bytes(fake_run.container, part_name(fake_run.run_id, 99), b"stale")
    fewer = merge_run_outputs(
        blob_store, ledger, fake_run.run_id, container=fake_run.container, part_rows=1000
    )
    assert len(fewer.parts) == 1 < len(first.parts)
    assert fewer.stale_parts_deleted == len(first.parts)  # parts 1.. of the last merge, and 99
    _check_dataset(blob_store, ledger, fake_run, fewer)


def test_run_with_no_features_writes_an_empty_manifest(
    blob_store: BlobStore, ledger: Ledger, run_id: str
) -> None:
    container = blob_store.settings.outputs_container
    item = _item(1, 3)
    outputs = _write_outputs(blob_store, container, run_id, item, features=False)
    # A custom task that writes no features file: the record lists only metadata.json.
    ledger.record(_succeeded(blob_store, run_id, item.item_id, outputs[1:]))
    summary = merge_run_outputs(blob_store, ledger, run_id, container=container)
    assert summary.parts == []
    assert summary.items == 0
    assert summary.skipped_by_reason == {"no_features_output": 1}
    manifest = json.loads(blob_store.download_bytes(container, manifest_name(run_id)))
    assert manifest["parts"] == []
    assert manifest["dim"] is None


def _plain_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 4), np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload",
    [b"not an npz", b"", _plain_npy()],
    ids=["garbage", "empty", "plain-npy"],
)
def test_unreadable_features_are_skipped_not_fatal(
    blob_store: BlobStore, ledger: Ledger, run_id: str, payload: bytes
) -> None:
    container = blob_store.settings.outputs_container
    good, bad = _item(1, 3), _item(2, 3)
    ledger.record(
        _succeeded(
            blob_store, run_id, good.item_id, _write_outputs(blob_store, container, run_id, good)
        )
    )
    outputs = _write_outputs(blob_store, container, run_id, bad)
    blob_store.upload_bytes(container, outputs[0], payload)
    ledger.record(_succeeded(blob_store, run_id, bad.item_id, outputs))
    summary = merge_run_outputs(blob_store, ledger, run_id, container=container)
    assert summary.items == 1
    assert summary.rows == 3
    assert summary.skipped_by_reason == {"unreadable": 1}
    assert summary.skipped_items[0].item_id == bad.item_id


class RepeatingLedger(Ledger):
    """A ledger read that yields every record twice: what a merge driven by messages (one
    append per delivery, like ParallelRunStep's append_row) would see with duplicates."""

    def iter_results(
        self, run_id: str, status: ItemStatus | None = None, shard: int | None = None
    ) -> Iterator[ItemResult]:
        for result in super().iter_results(run_id, status, shard):
            yield result
            yield result


def test_repeated_records_never_repeat_rows(
    blob_store: BlobStore, storage_settings: StorageSettings, fake_run: FakeRun
) -> None:
    repeating = RepeatingLedger(storage_settings)
    try:
        summary = merge_run_outputs(
            blob_store, repeating, fake_run.run_id, container=fake_run.container, part_rows=40
        )
        assert summary.duplicate_records == len(fake_run.merged) + 2  # + gone, wide
        _check_dataset(
            blob_store, repeating, fake_run, summary.model_copy(update={"duplicate_records": 0})
        )
    finally:
        repeating.close()


def test_missing_metadata_still_merges_with_a_warning(
    blob_store: BlobStore, ledger: Ledger, run_id: str
) -> None:
    container = blob_store.settings.outputs_container
    item = _item(3, 4)
    outputs = _write_outputs(blob_store, container, run_id, item)
    blob_store.delete(container, outputs[1])
    ledger.record(_succeeded(blob_store, run_id, item.item_id, outputs))
    summary = merge_run_outputs(blob_store, ledger, run_id, container=container)
    assert summary.items == 1
    assert summary.rows == 4
    assert summary.warnings == ["1 items without a readable metadata.json (metadata columns null)"]
    table = _read_dataset(blob_store, container, summary)
    assert table.column("model").to_pylist() == [None] * 4
    assert table.column("source").to_pylist() == [_source(blob_store, item.item_id)] * 4


def test_output_names_match_the_worker() -> None:
    assert worker_features.FEATURES_FILE == FEATURES_FILE
    assert worker_loop.METADATA_FILE == METADATA_FILE


def test_activity_merges_through_the_controller(
    blob_store: BlobStore, ledger: Ledger, fake_run: FakeRun, services: Services
) -> None:
    result = make_activities(lambda: services)[Activity.MERGE_OUTPUTS](fake_run.run_id)
    summary = MergeSummary.model_validate(result)
    assert summary.prefix == f"{fake_run.run_id}/merged/"
    _check_dataset(blob_store, ledger, fake_run, summary)
    with pytest.raises(ValueError, match="not a run id"):
        make_activities(lambda: services)[Activity.MERGE_OUTPUTS]("../escape")


def test_the_manifest_columns_decide_the_metadata_columns(
    blob_store: BlobStore, ledger: Ledger, run_id: str
) -> None:
    # The first item merged lost its metadata.json: without the manifest's columns, its
    # (empty) metadata would decide the schema and every item's metadata would be dropped.
    container = blob_store.settings.outputs_container
    first, second = _item(1, 2), _item(2, 3)
    outputs = _write_outputs(blob_store, container, run_id, first)
    blob_store.delete(container, outputs[1])
    ledger.record(_succeeded(blob_store, run_id, first.item_id, outputs))
    outputs = _write_outputs(blob_store, container, run_id, second)
    ledger.record(_succeeded(blob_store, run_id, second.item_id, outputs))
    summary = merge_run_outputs(
        blob_store, ledger, run_id, container=container, metadata_keys=["title", "category"]
    )
    table = _read_dataset(blob_store, container, summary)
    # Rows by item (the ledger is read shard by shard, so the items' order is the shards').
    rows = list(
        zip(
            table.column("item_id").to_pylist(),
            table.column("meta_category").to_pylist(),
            table.column("meta_title").to_pylist(),
            strict=True,
        )
    )
    assert sorted(r for r in rows if r[0] == first.item_id) == [(first.item_id, None, None)] * 2
    assert [r for r in rows if r[0] == second.item_id] == [
        (second.item_id, "cat2", "video 2, 'quoted'")
    ] * 3


def test_the_controller_reads_the_manifest_columns_from_the_first_chunk(
    blob_store: BlobStore, run_id: str, services: Services
) -> None:
    from batchctl import controller
    from batchctl.contracts import ManifestItem
    from batchctl.manifest import chunk_blob_name

    assert (
        controller.manifest_metadata_keys(services, run_id) is None
    )  # no chunk: the first item decides
    item = ManifestItem(item_id="a", source="media/a.mp4", row=2, metadata={"b": "1", "a": "2"})
    blob_store.upload_bytes("runs", chunk_blob_name(run_id, 0), item.model_dump_json() + "\n")
    assert controller.manifest_metadata_keys(services, run_id) == ("a", "b")


def test_item_outputs_and_run_artifacts_have_separate_namespaces() -> None:
    # The merge reads items where the worker writes them, and no item id reaches the
    # dataset's folder: items live under items/, the dataset under merged/.
    for item_id in ("v001", "merged", "items", "_manifest.json"):
        prefix = item_output_prefix("r1", item_id)
        assert prefix == worker_loop.output_prefix("r1", item_id)
        assert prefix == f"r1/items/{item_id}/"
        assert not prefix.startswith(merged_prefix("r1"))


def test_an_item_named_merged_is_merged_and_the_dataset_still_reads(
    blob_store: BlobStore, ledger: Ledger, run_id: str, tmp_path: Path
) -> None:
    container = blob_store.settings.outputs_container
    items = [
        dataclasses.replace(_item(1, 5), item_id="merged"),
        _item(2, 3),
        dataclasses.replace(_item(3, 2), item_id="items"),
    ]
    for item in items:
        outputs = _write_outputs(blob_store, container, run_id, item)
        assert all(name.startswith(f"{run_id}/items/{item.item_id}/") for name in outputs)
        assert ledger.record(_succeeded(blob_store, run_id, item.item_id, outputs))

    summary = merge_run_outputs(
        blob_store, ledger, run_id, container=container, metadata_keys=["category", "title"]
    )
    assert (summary.items, summary.skipped, summary.warnings) == (3, 0, [])
    assert set(blob_store.list_names(container, merged_prefix(run_id))) == {
        *summary.parts,
        manifest_name(run_id),
    }

    # Read as users do: the dataset's folder copied out (as `batchctl run` does), opened
    # with pyarrow.dataset, which reads every file of the folder as Parquet.
    folder = tmp_path / "merged"
    folder.mkdir()
    for name in blob_store.list_names(container, merged_prefix(run_id)):
        target = folder / name[len(merged_prefix(run_id)) :]
        target.write_bytes(blob_store.download_bytes(container, name))
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.num_rows == sum(item.frames for item in items)
    rows = table.to_pydict()
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    for item in items:
        mine = [index for index, item_id in enumerate(rows["item_id"]) if item_id == item.item_id]
        order = sorted(mine, key=lambda index: rows["frame_index"][index])
        np.testing.assert_array_equal(vectors[order], item.features)
        assert {rows["meta_category"][index] for index in mine} == {item.metadata["category"]}
