"""The parts of a run's report a person acts on: the rows to retry, where each item's outputs
are, the invalid rows, every planned node (idle ones too) and the run's phases in time.

- ``failed.csv``: the manifest's header and its rows whose item failed, was not run or has no
  terminal record, cells as the manifest had them (a local video as its path relative to the
  manifest's folder), ready to be run again.
- ``index.csv``: ``row, item_id, source, status, folder`` for every valid row, so an item's
  outputs are found from its row or its video without an id column. ``folder`` is where the
  item's outputs are (``outputs-container/RUN/items/ITEM/`` in storage; a local copy names
  the folder under the run's local folder) and is empty for an item that did not succeed.

Both are streamed (a row at a time, the manifest read once more), so a million-row run costs
no more memory than the ledger's statuses. Everything here but :func:`read_header` and the
writers is pure.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Final

from batchctl.contracts import (
    ItemStatus,
    ManifestItem,
    NodeThroughput,
    PhaseMarker,
    PlannedNode,
    RunPlan,
)
from batchctl.manifest import ID_COLUMN, VIDEO_COLUMNS
from batchctl.sources import local_path_of

FAILED_CSV_NAME: Final = "failed.csv"
INDEX_CSV_NAME: Final = "index.csv"
MANIFEST_ERRORS_NAME: Final = "manifest-errors.jsonl"
INDEX_COLUMNS: Final = ("row", "item_id", "source", "status", "folder")
NO_RECORD: Final = "no_record"
MAX_INVALID_ROWS_SHOWN: Final = 100
"""The report lists this many invalid rows; manifest-errors.jsonl has every one."""

# Statuses whose rows go to failed.csv: everything but a success is worth another try.
RETRY_STATUSES: Final = frozenset({ItemStatus.FAILED.value, ItemStatus.NOT_RUN.value, NO_RECORD})

# Where a worker writes an item's outputs: batchctl.merge.item_output_prefix (not imported:
# merge pulls pyarrow, which the report must not need; tests hold the two equal).
ITEMS_DIR: Final = "items"


def failed_csv_blob_name(run_id: str) -> str:
    return f"{run_id}/{FAILED_CSV_NAME}"


def index_csv_blob_name(run_id: str) -> str:
    return f"{run_id}/{INDEX_CSV_NAME}"


def item_folder(outputs_container: str, run_id: str, item_id: str) -> str:
    """An item's outputs folder as storage names it: container/run/items/item/."""
    return f"{outputs_container}/{run_id}/{ITEMS_DIR}/{item_id}/"


# -- the manifest's rows ------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestHeader:
    """The header as validation names its columns (trimmed; blank ones named column_N)."""

    names: tuple[str, ...]
    video: int
    id: int | None


def read_header(lines: Iterable[bytes]) -> ManifestHeader | None:
    """The manifest's header from its first non-blank record; None when it has no usable one
    (validation has said why: the run then has no valid rows to list)."""
    decoded = (line.decode("utf-8", "replace") for line in lines)
    for cells in csv.reader(decoded):
        if not "".join(cells).strip():
            continue
        names = [cell.strip().lstrip("\ufeff").strip() for cell in cells]
        names = [name or f"column_{index}" for index, name in enumerate(names, start=1)]
        video = [i for i, name in enumerate(names) if name.casefold() in VIDEO_COLUMNS]
        if len(video) != 1:
            return None
        id_index = next((i for i, n in enumerate(names) if n.casefold() == ID_COLUMN), None)
        return ManifestHeader(names=tuple(names), video=video[0], id=id_index)
    return None


def display_source(source: str, local_root: Path | None) -> str:
    """A source as the user wrote it: a URL as is, a local video as its path relative to the
    manifest's folder (absolute when it lies elsewhere), never its ``file://`` source."""
    path = local_path_of(source)
    if path is None:
        return source
    if local_root is not None:
        try:
            return path.relative_to(local_root).as_posix()
        except ValueError:
            pass
    return str(path)


def manifest_cells(
    item: ManifestItem, header: ManifestHeader, local_root: Path | None
) -> list[str]:
    """The item's row as manifest cells, in the header's order."""
    cells: list[str] = []
    for index, name in enumerate(header.names):
        if index == header.video:
            cells.append(display_source(item.source, local_root))
        elif index == header.id:
            cells.append(item.item_id)
        else:
            cells.append(item.metadata.get(name, ""))
    return cells


@dataclass
class RowFiles:
    """What writing failed.csv and index.csv found."""

    indexed: int = 0
    to_retry: int = 0


def write_row_files(
    items: Iterable[ManifestItem],
    header: ManifestHeader,
    statuses: Mapping[str, str],
    *,
    outputs_container: str,
    run_id: str,
    local_root: Path | None,
    failed: IO[str],
    index: IO[str],
    sources_wanted: set[str] | None = None,
) -> tuple[RowFiles, dict[str, str]]:
    """Write failed.csv and index.csv for the manifest's valid ``items`` (in row order).

    ``statuses`` maps item id to its terminal status (absent: no record). Returns the counts
    and the display sources of the items in ``sources_wanted`` (the report's failure examples
    show the user's video as they named it, not its ``file://`` source).
    """
    failed_writer = csv.writer(failed, lineterminator="\n")
    index_writer = csv.writer(index, lineterminator="\n")
    failed_writer.writerow(header.names)
    index_writer.writerow(INDEX_COLUMNS)
    counts = RowFiles()
    found: dict[str, str] = {}
    for item in items:
        status = statuses.get(item.item_id, NO_RECORD)
        source = display_source(item.source, local_root)
        folder = (
            item_folder(outputs_container, run_id, item.item_id)
            if status == ItemStatus.SUCCEEDED.value
            else ""
        )
        index_writer.writerow([item.row, item.item_id, source, status, folder])
        counts.indexed += 1
        if status in RETRY_STATUSES:
            failed_writer.writerow(manifest_cells(item, header, local_root))
            counts.to_retry += 1
        if sources_wanted and item.item_id in sources_wanted:
            found[item.item_id] = source
    return counts, found


def localize_index(lines: Iterable[str], storage_prefix: str, local_prefix: str) -> Iterator[str]:
    """index.csv with its folders moved from storage (``outputs/RUN/``) to a local copy's
    folder (``outputs/``), for the copy a local run leaves beside its report."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    column = header.index("folder") if "folder" in header else None
    buffer = _LineBuffer()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    yield buffer.take()
    for row in reader:
        if column is not None and column < len(row) and row[column].startswith(storage_prefix):
            row[column] = local_prefix + row[column][len(storage_prefix) :]
        writer.writerow(row)
        yield buffer.take()


class _LineBuffer:
    """A write target for csv.writer that hands back what was written since the last take."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def take(self) -> str:
        text = "".join(self._parts)
        self._parts.clear()
        return text


# -- nodes ----------------------------------------------------------------------------------
def _slot_patterns(run_id: str, cluster: str) -> tuple[re.Pattern[str], ...]:
    # Local workers name themselves after their job ("{cluster}-job{J}-n{slot}"); AML jobs
    # are named "{run}-{cluster}-n{slot}-{attempt}" (a worker there may use its hostname,
    # which names no slot: it is listed apart).
    return (
        re.compile(rf"^{re.escape(cluster)}-job\d+-n(\d+)$"),
        re.compile(rf"^{re.escape(run_id)}-{re.escape(cluster)}-n(\d+)-\d+$"),
    )


def planned_nodes(
    plan: RunPlan | None,
    nodes: Iterable[NodeThroughput],
    run_id: str,
    *,
    log_dir: Path | None = None,
    job_page: Callable[[str], str | None] | None = None,
) -> tuple[list[PlannedNode], list[str]]:
    """Every slot of the plan with the workers that ran in it, and the workers that match no
    slot. ``log_dir`` (local runs) is where each worker's log file is; without it the logs
    are named as Azure ML jobs, and ``job_page`` (the AML backend's) turns each job that
    worked in the slot into its studio page."""
    seen = list(nodes)
    claimed: set[str] = set()
    slots: list[PlannedNode] = []
    for cluster in plan.clusters if plan else []:
        patterns = _slot_patterns(run_id, cluster.name)
        by_slot: dict[int, list[NodeThroughput]] = {}
        for node in seen:
            for pattern in patterns:
                match = pattern.match(node.node)
                if match and int(match.group(1)) < cluster.nodes:
                    by_slot.setdefault(int(match.group(1)), []).append(node)
                    claimed.add(node.node)
                    break
        logs_by_slot = _local_logs(log_dir, patterns[0]) if log_dir is not None else {}
        for slot in range(cluster.nodes):
            workers = by_slot.get(slot, [])
            if log_dir is not None:
                logs = logs_by_slot.get(slot, [])
            else:
                pages = [job_page(w.node) for w in workers] if job_page is not None else []
                logs = sorted(page for page in pages if page) or [
                    f"Azure ML job {run_id}-{cluster.name}-n{slot}-<attempt>"
                ]
            slots.append(
                PlannedNode(
                    cluster=cluster.name,
                    slot=slot,
                    vm_size=cluster.vm_size,
                    workers=sorted(w.node for w in workers),
                    succeeded=sum(w.succeeded for w in workers),
                    failed=sum(w.failed for w in workers),
                    logs=logs,
                )
            )
    unplanned = sorted(node.node for node in seen if node.node not in claimed)
    return slots, unplanned


def _local_logs(log_dir: Path, pattern: re.Pattern[str]) -> dict[int, list[str]]:
    """Each slot's log files (one per job that ran in it), from the run's log folder."""
    found: dict[int, list[str]] = {}
    if not log_dir.is_dir():
        return found
    for path in sorted(log_dir.glob("*.log")):
        match = pattern.match(path.stem)
        if match:
            found.setdefault(int(match.group(1)), []).append(str(path))
    return found


# -- phases ---------------------------------------------------------------------------------
def phase_markers(
    started_at: datetime,
    report_written_at: datetime,
    *,
    first_start: datetime | None,
    last_end: datetime | None,
    torn_down_at: datetime | None,
    not_run_recorded_at: datetime | None = None,
) -> list[PhaseMarker]:
    """The run's phases, each stamped when it happened: validating, enqueuing, planning,
    provisioning and starting nodes lie between the start and the first item a node started
    (dated by the records); running ends with the last item finished; "torn down" is when
    the teardown step ended, "not run recorded" when the items left were recorded, and
    "report written" when the report was written (all three stamped by the controller as
    they ended). In time order."""

    def at(moment: datetime) -> float:
        return round((moment - started_at).total_seconds(), 3)

    markers = [
        PhaseMarker(
            name="started",
            t_s=0.0,
            note="validating, enqueuing, planning, provisioning, starting nodes",
        )
    ]
    if first_start is not None:
        markers.append(
            PhaseMarker(name="first item started", t_s=at(first_start), note="nodes working")
        )
    if last_end is not None:
        markers.append(PhaseMarker(name="last item finished", t_s=at(last_end)))
    if torn_down_at is not None:
        markers.append(
            PhaseMarker(name="torn down", t_s=at(torn_down_at), note="compute and queue deleted")
        )
    if not_run_recorded_at is not None:
        markers.append(
            PhaseMarker(
                name="not run recorded",
                t_s=at(not_run_recorded_at),
                note="the items left without a result were recorded as not run",
            )
        )
    markers.append(PhaseMarker(name="report written", t_s=at(report_written_at), note="run end"))
    # Stable: equal times keep the order above (the start first, the report last).
    return sorted(markers, key=lambda marker: marker.t_s)
