"""Merged output: every succeeded item's features as one Parquet dataset under the run's prefix.

The ledger drives the merge, not a listing of the outputs container: it holds exactly one
terminal record per item however often a duplicate delivery rewrote that item's outputs, so
each succeeded item contributes exactly one row set (ParallelRunStep's ``append_row``
appended once per delivery and could repeat rows). Items are deduplicated by id anyway.

Memory stays bounded whatever the run's size: items are streamed from the ledger, a few are
downloaded ahead on a small thread pool, rows are buffered only up to one row group, and each
part file is written to a temporary file and uploaded once it holds ``part_rows`` rows (an
item's rows never straddle two parts).

Layout in the outputs container::

    {run_id}/items/{item_id}/...             each item's outputs, written by the worker
    {run_id}/merged/part-00000.parquet ...   columns: item_id, source, row, frame_index,
                                             timestamp_s, vector, model, meta_<field>...
    {run_id}/merged/_manifest.json           parts, rows, items, dim, columns; written last

Items have a namespace of their own (``items/``), so an item's id never names a run-level
folder: an item called ``merged`` writes to ``{run_id}/items/merged/``, outside the dataset.

Re-running replaces the previous merge: ``_manifest.json`` is deleted first (a dataset without
one is incomplete), parts are overwritten by name, and parts left over from a larger earlier
merge are deleted before the new manifest is written.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from azure.core.exceptions import ResourceNotFoundError

from batchctl.contracts import (
    SCHEMA_VERSION,
    ItemResult,
    ItemStatus,
    MergeSkip,
    MergeSkipReason,
    MergeSummary,
)
from batchctl.storage import BlobStore, Ledger

# The worker's output names (node_image/worker/tasks/features.py FEATURES_FILE and
# node_image/worker/loop.py METADATA_FILE; batchctl cannot import the node image, and
# tests/test_merge.py checks that the two agree).
FEATURES_FILE = "features.npz"
METADATA_FILE = "metadata.json"

ITEMS_DIR = "items"
MERGED_DIR = "merged"
MANIFEST_NAME = "_manifest.json"
PART_PATTERN = re.compile(r"part-\d{5}\.parquet")
METADATA_COLUMN_PREFIX = "meta_"

# About 200 MB a part at 1,024 float32 dimensions: big enough for few files, small enough to
# write through a Functions instance's temporary disk.
DEFAULT_PART_ROWS = 50_000
DEFAULT_ROW_GROUP_ROWS = 8_192
# Items downloaded ahead of the writer: hides blob latency without holding many items.
DEFAULT_PREFETCH = 8
# Skipped items listed by id in the summary (all are counted): keeps Durable history small.
MAX_LISTED_SKIPS = 50

T = TypeVar("T")
R = TypeVar("R")


def item_output_prefix(run_id: str, item_id: str) -> str:
    """Where an item's outputs are in the outputs container (the worker's ``output_prefix``;
    tests/test_merge.py checks that the two agree)."""
    return f"{run_id}/{ITEMS_DIR}/{item_id}/"


def merged_prefix(run_id: str) -> str:
    """Where a run's merged dataset lives in the outputs container."""
    return f"{run_id}/{MERGED_DIR}/"


def part_name(run_id: str, index: int) -> str:
    return f"{merged_prefix(run_id)}part-{index:05d}.parquet"


def manifest_name(run_id: str) -> str:
    return merged_prefix(run_id) + MANIFEST_NAME


@dataclass(frozen=True)
class _Loaded:
    """One item's features and what the merged rows say about it."""

    item_id: str
    source: str
    row: int | None
    model: str | None
    metadata: dict[str, str]
    features: npt.NDArray[np.float32]
    timestamps: npt.NDArray[np.float64]
    metadata_missing: bool

    @property
    def frames(self) -> int:
        return int(self.timestamps.shape[0])


def merge_run_outputs(
    store: BlobStore,
    ledger: Ledger,
    run_id: str,
    *,
    container: str,
    part_rows: int = DEFAULT_PART_ROWS,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    prefetch: int = DEFAULT_PREFETCH,
    workdir: Path | None = None,
    metadata_keys: Sequence[str] | None = None,
) -> MergeSummary:
    """Merge the run's succeeded items into ``{run_id}/merged/`` of ``container``.

    Items whose features file is missing, unreadable or of another dimension than the first
    merged item's are skipped and counted in the summary; the merge itself fails only when
    storage does. ``metadata_keys`` are the manifest's metadata columns (the ``meta_*``
    columns); without them, the first merged item's metadata decides.
    """
    if part_rows < 1 or row_group_rows < 1 or prefetch < 1:
        raise ValueError("part_rows, row_group_rows and prefetch must be at least 1")
    # An incomplete dataset has no manifest: remove the old one before touching any part.
    store.delete(container, manifest_name(run_id))

    skips: list[MergeSkip] = []
    skipped_by_reason: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    items = 0

    def skip(item_id: str, reason: MergeSkipReason, detail: str) -> None:
        skipped_by_reason[reason] += 1
        if len(skips) < MAX_LISTED_SKIPS:
            skips.append(MergeSkip(item_id=item_id, reason=reason, detail=detail[:300]))

    shards = ledger.shards(run_id)
    records = _UniqueRecords(
        ledger.iter_results(run_id, ItemStatus.SUCCEEDED, shard=shard) for shard in shards
    )
    with (
        tempfile.TemporaryDirectory(prefix="batchctl-merge-", dir=workdir) as tmp,
        ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="merge") as pool,
    ):
        writer = _DatasetWriter(
            store,
            container,
            run_id,
            tmp=Path(tmp),
            part_rows=part_rows,
            row_group_rows=row_group_rows,
            metadata_keys=metadata_keys,
        )
        loaded_items = _ordered_map(
            pool, lambda result: _load(store, container, run_id, result), records.iter(), prefetch
        )
        for loaded in loaded_items:
            if isinstance(loaded, MergeSkip):
                skip(loaded.item_id, loaded.reason, loaded.detail)
                continue
            if loaded.metadata_missing:
                warnings["items without a readable metadata.json (metadata columns null)"] += 1
            if loaded.frames and writer.dim is not None and loaded.features.shape[1] != writer.dim:
                skip(
                    loaded.item_id,
                    "dim_mismatch",
                    f"{loaded.features.shape[1]} dimensions, the dataset has {writer.dim}",
                )
                continue
            extra = writer.add(loaded)
            if extra:
                warnings["items with manifest metadata fields outside the dataset's columns"] += 1
            items += 1
        writer.close()

    parts = [name for name, _, _ in writer.parts]
    stale = [
        name
        for name in store.list_names(container, merged_prefix(run_id))
        if PART_PATTERN.fullmatch(name[len(merged_prefix(run_id)) :]) and name not in parts
    ]
    for name in stale:
        store.delete(container, name)

    summary = MergeSummary(
        run_id=run_id,
        prefix=merged_prefix(run_id),
        manifest_blob=manifest_name(run_id),
        parts=parts,
        rows=writer.rows,
        items=items,
        dim=writer.dim,
        skipped=sum(skipped_by_reason.values()),
        skipped_by_reason=dict(skipped_by_reason),
        skipped_items=skips,
        duplicate_records=records.duplicates,
        stale_parts_deleted=len(stale),
        warnings=[f"{count} {text}" for text, count in sorted(warnings.items())],
    )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "format": "parquet",
        "parts": [{"name": n, "rows": rows, "items": count} for n, rows, count in writer.parts],
        "rows": summary.rows,
        "items": summary.items,
        "dim": summary.dim,
        "columns": writer.schema.names if writer.schema is not None else [],
        "metadata_columns": {
            METADATA_COLUMN_PREFIX + key: key for key in writer.metadata_keys or ()
        },
        "skipped": summary.skipped,
        "skipped_by_reason": summary.skipped_by_reason,
    }
    store.upload_bytes(
        container,
        manifest_name(run_id),
        json.dumps(manifest, indent=2),
        content_type="application/json",
    )
    return summary


# -- reading the ledger and the items ------------------------------------------------------
@dataclass
class _UniqueRecords:
    """Succeeded ledger records, each item id once; counts any repeat it drops.

    Read shard by shard: an item's records all live in its one shard, so the ids seen are
    kept for one shard at a time (a sixteenth of the run), not for the whole run.
    """

    shards: Iterable[Iterable[ItemResult]]
    duplicates: int = 0

    def iter(self) -> Iterator[ItemResult]:
        for results in self.shards:
            seen: set[str] = set()
            for result in results:
                # The ledger's query already filters by status; a record of another status
                # or a second record of an id already merged must never add rows.
                if result.status is not ItemStatus.SUCCEEDED:
                    continue
                if result.item_id in seen:
                    self.duplicates += 1
                    continue
                seen.add(result.item_id)
                yield result


def _ordered_map(
    pool: ThreadPoolExecutor, function: Callable[[T], R], values: Iterable[T], window: int
) -> Iterator[R]:
    """``map`` over a pool, in input order, with at most ``window`` calls in flight."""
    pending: deque[Future[R]] = deque()
    for value in values:
        pending.append(pool.submit(function, value))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _load(store: BlobStore, container: str, run_id: str, result: ItemResult) -> _Loaded | MergeSkip:
    item_id = result.item_id
    # Output names are deterministic; only the ledger's own names under the item's prefix are
    # read, never a name a record could point elsewhere.
    prefix = item_output_prefix(run_id, item_id)
    features_blob = prefix + FEATURES_FILE
    if features_blob not in result.outputs:
        return MergeSkip(
            item_id=item_id, reason="no_features_output", detail="the task wrote no features"
        )
    try:
        data = store.download_bytes(container, features_blob)
    except ResourceNotFoundError:
        return MergeSkip(item_id=item_id, reason="features_missing", detail=features_blob)
    try:
        features, timestamps = _read_npz(data)
    except Exception as error:
        # Any unreadable file is one item's problem, counted as a skip; the merge fails only
        # when storage does (EOFError from an empty file, TypeError from a plain .npy saved
        # under the name, and whatever else numpy raises).
        return MergeSkip(
            item_id=item_id, reason="unreadable", detail=f"{type(error).__name__}: {error}"
        )
    metadata = _read_metadata(store, container, prefix + METADATA_FILE, result.outputs)
    manifest_metadata = metadata.get("manifest_metadata") if metadata else None
    row = metadata.get("row") if metadata else None
    model = metadata.get("model") if metadata else None
    return _Loaded(
        item_id=item_id,
        source=result.source or str((metadata or {}).get("source", "")),
        row=row if isinstance(row, int) and not isinstance(row, bool) else None,
        model=str(model) if model is not None else None,
        metadata=(
            {str(k): str(v) for k, v in manifest_metadata.items()}
            if isinstance(manifest_metadata, dict)
            else {}
        ),
        features=features,
        timestamps=timestamps,
        metadata_missing=metadata is None,
    )


def _read_npz(data: bytes) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    # allow_pickle=False: an npz is data, never code.
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        features = np.asarray(npz["features"])
        timestamps = np.asarray(npz["timestamps"], dtype=np.float64)
    if timestamps.ndim != 1:
        raise ValueError(f"timestamps have shape {timestamps.shape}, not (frames,)")
    frames = timestamps.shape[0]
    if frames == 0 and features.size == 0:
        return np.zeros((0, 0), np.float32), timestamps
    if features.ndim != 2 or features.shape[0] != frames or features.shape[1] < 1:
        raise ValueError(f"features have shape {features.shape}, not ({frames}, dim)")
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"features have dtype {features.dtype}")
    return np.ascontiguousarray(features, dtype=np.float32), timestamps


def _read_metadata(
    store: BlobStore, container: str, name: str, outputs: list[str]
) -> dict[str, Any] | None:
    if name not in outputs:
        return None
    try:
        value = json.loads(store.download_bytes(container, name))
    except (ResourceNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- writing the dataset -------------------------------------------------------------------
class _DatasetWriter:
    """Writes row groups into part files and uploads each part once it is full.

    The schema is fixed by the first item that has frames: its dimension, and its metadata
    fields unless the manifest's columns were given.
    """

    def __init__(
        self,
        store: BlobStore,
        container: str,
        run_id: str,
        *,
        tmp: Path,
        part_rows: int,
        row_group_rows: int,
        metadata_keys: Sequence[str] | None = None,
    ) -> None:
        self._declared_keys = tuple(sorted(metadata_keys)) if metadata_keys is not None else None
        self._store = store
        self._container = container
        self._run_id = run_id
        self._tmp = tmp
        self._part_rows = part_rows
        self._row_group_rows = row_group_rows
        self.dim: int | None = None
        self.metadata_keys: tuple[str, ...] | None = None
        self.schema: pa.Schema | None = None
        self.rows = 0
        self.parts: list[tuple[str, int, int]] = []  # (blob name, rows, items)
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._part_rows_written = 0
        self._part_items = 0

    def add(self, item: _Loaded) -> bool:
        """Add one item's rows; True when it had metadata fields the columns do not hold."""
        if item.frames == 0:
            return False
        if self.schema is None:
            self.dim = int(item.features.shape[1])
            self.metadata_keys = (
                self._declared_keys
                if self._declared_keys is not None
                else tuple(sorted(item.metadata))
            )
            self.schema = _schema(self.dim, self.metadata_keys, self._run_id)
        assert self.metadata_keys is not None
        self._buffer.append(self._batch(item))
        self._buffered_rows += item.frames
        self._part_rows_written += item.frames
        self._part_items += 1
        self.rows += item.frames
        if self._buffered_rows >= self._row_group_rows:
            self._flush()
        if self._part_rows_written >= self._part_rows:
            self._close_part()
        return bool(set(item.metadata) - set(self.metadata_keys))

    def close(self) -> None:
        self._close_part()

    def _batch(self, item: _Loaded) -> pa.RecordBatch:
        assert self.schema is not None and self.dim is not None and self.metadata_keys is not None
        frames = item.frames
        vector = pa.FixedSizeListArray.from_arrays(
            pa.array(item.features.reshape(-1), type=pa.float32()), self.dim
        )
        columns: list[pa.Array] = [
            pa.repeat(pa.scalar(item.item_id, pa.string()), frames),
            pa.repeat(pa.scalar(item.source, pa.string()), frames),
            pa.repeat(pa.scalar(item.row, pa.int32()), frames),
            pa.array(np.arange(frames, dtype=np.int32), type=pa.int32()),
            pa.array(item.timestamps, type=pa.float64()),
            vector,
            pa.repeat(pa.scalar(item.model, pa.string()), frames),
        ]
        columns.extend(
            pa.repeat(pa.scalar(item.metadata.get(key), pa.string()), frames)
            for key in self.metadata_keys
        )
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _flush(self) -> None:
        if not self._buffer:
            return
        assert self.schema is not None
        if self._writer is None:
            self._path = self._tmp / f"part-{len(self.parts):05d}.parquet"
            self._writer = pq.ParquetWriter(self._path, self.schema, compression="zstd")
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._buffer = []
        self._buffered_rows = 0

    def _close_part(self) -> None:
        self._flush()
        if self._writer is None or self._path is None:
            return
        self._writer.close()
        name = part_name(self._run_id, len(self.parts))
        self._store.upload_file(self._container, name, self._path)
        self._path.unlink()
        self.parts.append((name, self._part_rows_written, self._part_items))
        self._writer, self._path = None, None
        self._part_rows_written = self._part_items = 0


def _schema(dim: int, metadata_keys: tuple[str, ...], run_id: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("row", pa.int32(), metadata={"about": "the item's manifest row number"}),
            pa.field("frame_index", pa.int32(), nullable=False),
            pa.field("timestamp_s", pa.float64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("model", pa.string()),
            *(pa.field(METADATA_COLUMN_PREFIX + key, pa.string()) for key in metadata_keys),
        ],
        metadata={"batchctl.run_id": run_id, "batchctl.dim": str(dim)},
    )
