"""Streaming manifest reading: CSV rows in, validated items and row-numbered errors out.

A manifest is a CSV file with a header row. One column names the video (``video``, or its
aliases ``url`` and ``path``), an optional ``id`` column names the item, and every other
column travels with the item as metadata. The reader never holds the manifest whole: bytes
arrive in chunks (a blob download, a file read), are re-split into physical lines, parsed one
record at a time, and written out as JSONL chunks of a few thousand items. What it keeps for
the whole manifest is one compact table of 64-bit id hashes (about 24 bytes an item), so a
million-row manifest fits in well under 200 MB.

Sources are untrusted input (DESIGN.md, invariant 7): a URL must be https (or http to a
loopback host, which is where Azurite listens) under an allowed account/container prefix,
with no credentials, query, dot segments or encoded slashes; a local path is allowed only in
local mode and only under the configured root, with symlinks resolved. The rules live in
:mod:`batchctl.sources`, which the worker applies too; the names stay importable from here.

Row numbers count records: the header is row 1, the first data record row 2, a record that
spans several physical lines (a quoted newline) is one row, and blank lines (and rows whose
cells are all empty, as spreadsheets leave them) are skipped and do not count.
``ManifestError.line`` is the physical line where the record starts, for an editor.

Every row becomes part of a storage-queue message (a :class:`~batchctl.contracts.WorkItem`),
and a message holds at most 64 KiB. A row is therefore valid only if its work item, alone and
with default run options, fits a message with room to spare (``MAX_ROW_MESSAGE_BYTES``);
rows carry at most ``MAX_METADATA_COLUMNS`` metadata columns. A row over the first limit is
one invalid row; a header over the second makes the manifest unusable (every row would be).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import re
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from batchctl.contracts import (
    ITEM_ID_PATTERN,
    RUN_ID_MAX_LENGTH,
    ManifestError,
    ManifestItem,
    ManifestSummary,
    chunk_blob_name,
)
from batchctl.packing import (
    QUEUE_MESSAGE_MAX_BYTES,
    MessageSizer,
    item_message_bytes,
)
from batchctl.planning import ManifestMediaTally
from batchctl.sources import (
    LOOPBACK_HOSTS,
    SourcePolicy,
    SourceRejectedError,
    local_path_of,
    normalize_source,
    prefixes_from_accounts,
)

if TYPE_CHECKING:  # the storage adapter is only needed by the thin wiring at the bottom
    from batchctl.storage.blobs import BlobStore

ManifestRecord = ManifestItem | ManifestError

VIDEO_COLUMNS = ("video", "url", "path")
ID_COLUMN = "id"
DEFAULT_MAX_FIELD_CHARS = 4096
# A record (all its physical lines together) larger than this is rejected without parsing it
# further; it also bounds how much of one line is ever held in memory.
DEFAULT_MAX_ROW_BYTES = 1 << 20
DEFAULT_CHUNK_SIZE = 2000
# A row's work item must fit a message alone with this much to spare: room for run options
# longer than the defaults (a custom task, a model path) and the envelope's own growth.
ROW_MESSAGE_MARGIN_BYTES = 8 * 1024
MAX_ROW_MESSAGE_BYTES = QUEUE_MESSAGE_MAX_BYTES - ROW_MESSAGE_MARGIN_BYTES
# Metadata columns a manifest may carry: every row carries all of them into its message, its
# metadata.json and the merged dataset's columns; past a thousand a manifest is not a table
# of videos any more (and a few thousand empty ones alone outgrow a message).
MAX_METADATA_COLUMNS = 1000
READ_CHUNK_BYTES = 1 << 20
# Error files are small until a manifest is mostly wrong; keep them in memory up to this size.
ERRORS_SPOOL_BYTES = 1 << 20
JSONL_CONTENT_TYPE = "application/x-ndjson"

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_ITEM_ID = re.compile(ITEM_ID_PATTERN)
_USERINFO = re.compile(r"(?<=://)[^/?#]*@")
_QUERY = re.compile(r"\?.*", re.DOTALL)


@functools.cache
def _default_sizer() -> MessageSizer:
    # The longest run id a run can have: what validation assumes.
    return MessageSizer.for_run("r" * RUN_ID_MAX_LENGTH)


class ManifestFatalError(ValueError):
    """The manifest as a whole is unusable (empty, no header, no video column...)."""


# --------------------------------------------------------------------------------------------
# Bytes to lines


def iter_lines(chunks: Iterable[bytes], *, max_line_bytes: int | None = None) -> Iterator[bytes]:
    """Re-split arbitrary byte chunks into physical lines, each with its terminator.

    Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``, as with ``open(newline="")``, which is
    what the csv module expects. With ``max_line_bytes``, a longer line (terminator included)
    is cut: only its first ``max_line_bytes + 1`` bytes are yielded, so the consumer can tell
    by the length, and the rest is dropped as it streams by: one huge line cannot exhaust
    memory.
    """
    pending = bytearray()
    discarding = False  # inside the dropped tail of an over-long line
    for chunk in chunks:
        if not chunk:
            continue
        # Fast path: no terminator in sight, just accumulate (a "\r" held from the previous
        # chunk ends its line whatever comes next, so it needs the full path).
        if b"\n" not in chunk and b"\r" not in chunk and not pending.endswith(b"\r"):
            pending += chunk
        else:
            data = bytes(pending) + chunk
            pending.clear()
            lines = data.splitlines(keepends=True)
            # The last piece may be unfinished: no terminator yet, or a "\r" whose "\n" may
            # open the next chunk.
            if not lines[-1].endswith(b"\n"):
                pending += lines.pop()
            if discarding and lines:
                lines = lines[1:]  # the tail of the over-long line, already reported
                discarding = False
            if max_line_bytes is None:
                yield from lines
            else:
                for line in lines:
                    yield line if len(line) <= max_line_bytes else line[: max_line_bytes + 1]
        if max_line_bytes is not None and len(pending) > max_line_bytes:
            if not discarding:
                yield bytes(pending[: max_line_bytes + 1])
                discarding = True
            # Keep a trailing "\r": it may be the first half of the dropped line's "\r\n".
            del pending[: len(pending) - 1 if pending.endswith(b"\r") else len(pending)]
    if pending and not discarding:
        yield bytes(pending)


def read_file_chunks(path: Path, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """Read a local file in fixed-size chunks (flat memory, whatever its size)."""
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            yield chunk


# --------------------------------------------------------------------------------------------
# Sources: the allowlist (the rules live in batchctl.sources, shared with the worker)


def source_item_id(source: str) -> str:
    """A stable item id for a row without one: the same source always gets the same id."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# CSV records to items


class _RecordTooLongError(Exception):
    """Raised from inside csv.reader's input to abandon a record past the byte limit."""


class _LineFeed:
    """The csv reader's input: decodes lines and keeps the bookkeeping csv cannot.

    It counts physical lines (for ``ManifestError.line``), bounds a record's size by raising
    into the reader (the reader resets itself on the next call), and decodes invalid UTF-8
    with surrogateescape so the record still parses and is then rejected by row, not fatally.
    """

    def __init__(self, lines: Iterator[bytes], max_record_bytes: int) -> None:
        self._lines = lines
        self._max_record_bytes = max_record_bytes
        self.line_no = 0
        self.record_bytes = 0
        self.bad_utf8: str | None = None

    def start_record(self) -> int:
        """Reset the per-record state; returns the line the next record starts on."""
        self.record_bytes = 0
        self.bad_utf8 = None
        return self.line_no + 1

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        raw = next(self._lines)
        self.line_no += 1
        if self.line_no == 1:
            if raw.startswith(_UTF16_BOMS):
                raise ManifestFatalError("the manifest is UTF-16; save it as UTF-8")
            raw = raw.removeprefix(_UTF8_BOM)
        self.record_bytes += len(raw)
        if self.record_bytes > self._max_record_bytes:
            raise _RecordTooLongError
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.bad_utf8 is None:
                self.bad_utf8 = (
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02X} on line {self.line_no})"
                )
            return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class _Record:
    """One CSV record: its cells, or why it could not be parsed."""

    line: int
    cells: list[str]
    problem: str | None = None
    bad_utf8: str | None = None


@dataclass(frozen=True)
class _Header:
    names: tuple[str, ...]
    video: int
    id: int | None
    metadata: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class _Limits:
    max_field_chars: int
    max_row_bytes: int
    max_metadata_columns: int = MAX_METADATA_COLUMNS
    max_message_bytes: int = MAX_ROW_MESSAGE_BYTES


class _IdTable:
    """A set of 64-bit id hashes, with the row each was first seen on.

    Open addressing in two flat arrays: 12 bytes a slot at most half full, about 24 MB for a
    million ids, where a Python set of ints would take over 80 MB. Two different ids share a
    hash with odds of about n^2 / 2^65 (3e-8 for a million), an accepted false duplicate.
    """

    def __init__(self, capacity_log2: int = 12) -> None:
        self._keys = array("Q", bytes(8 << capacity_log2))
        self._rows = array("I", bytes(4 << capacity_log2))
        self._mask = (1 << capacity_log2) - 1
        self._used = 0

    def __len__(self) -> int:
        return self._used

    def add(self, item_id: str, row: int) -> int | None:
        """Record ``item_id`` on ``row``; returns the earlier row if it was already there."""
        digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
        key = int.from_bytes(digest, "little") or 1  # 0 marks an empty slot
        slot = self._find(self._keys, self._mask, key)
        if self._keys[slot] == key:
            return int(self._rows[slot])
        self._keys[slot] = key
        self._rows[slot] = min(row, 0xFFFFFFFF)
        self._used += 1
        if self._used * 2 > self._mask:
            self._grow()
        return None

    @staticmethod
    def _find(keys: array[int], mask: int, key: int) -> int:
        slot = key & mask
        while keys[slot] and keys[slot] != key:
            slot = (slot + 1) & mask  # linear probing; hashes are uniform, load stays <= 1/2
        return slot

    def _grow(self) -> None:
        old_keys, old_rows = self._keys, self._rows
        size = 2 * len(old_keys)
        self._keys = array("Q", bytes(8 * size))
        self._rows = array("I", bytes(4 * size))
        self._mask = size - 1
        for key, row in zip(old_keys, old_rows, strict=True):
            if key:
                slot = self._find(self._keys, self._mask, key)
                self._keys[slot] = key
                self._rows[slot] = row


def read_manifest(
    lines: Iterable[bytes],
    policy: SourcePolicy,
    *,
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    max_metadata_columns: int = MAX_METADATA_COLUMNS,
    max_message_bytes: int = MAX_ROW_MESSAGE_BYTES,
) -> Iterator[ManifestRecord]:
    """Validate a manifest's lines into items and row-numbered errors, one record at a time.

    The header is read at once, so a manifest that is unusable as a whole raises
    ManifestFatalError here, before anything is yielded; the rows are then produced lazily,
    in file order, exactly one ManifestItem or ManifestError per non-blank record.

    Header names and the video and id cells are trimmed of surrounding whitespace; metadata
    values are carried exactly as written. An error names the first rule a row breaks.
    """
    feed = _LineFeed(iter(lines), max_row_bytes)
    # strict: an unterminated quote at the end, or text after a closing quote, is an error
    # instead of being silently glued into a field.
    reader = csv.reader(feed, strict=True)
    limits = _Limits(
        max_field_chars=max_field_chars,
        max_row_bytes=max_row_bytes,
        max_metadata_columns=max_metadata_columns,
        max_message_bytes=max_message_bytes,
    )
    header = _read_header(reader, feed, limits)
    return _read_rows(reader, feed, header, policy, limits)


def _next_record(reader: Iterator[list[str]], feed: _LineFeed, limits: _Limits) -> _Record | None:
    """The next non-blank record, or None at the end of the input."""
    while True:
        line = feed.start_record()
        try:
            cells = next(reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            return _Record(line, [], problem=_csv_problem(str(exc)))
        except _RecordTooLongError:
            # Parsing resumes on the next physical line; for an over-long quoted record that
            # line may be mid-field, and whatever it holds is judged as a row of its own.
            return _Record(line, [], problem=f"row longer than {limits.max_row_bytes} bytes")
        if "".join(cells).strip():  # blank lines (and rows of empty cells) are skipped
            return _Record(line, cells, bad_utf8=feed.bad_utf8)


def _csv_problem(message: str) -> str:
    if "unexpected end of data" in message:
        return "malformed CSV: unterminated quoted field at the end of the file"
    if "expected after" in message:
        return "malformed CSV: a closing quote must be followed by a comma or the line's end"
    if "field larger than field limit" in message:
        return (
            f"malformed CSV: a field runs past {csv.field_size_limit()} characters "
            "(an unterminated quote?)"
        )
    return f"malformed CSV: {message}"


def _read_header(reader: Iterator[list[str]], feed: _LineFeed, limits: _Limits) -> _Header:
    record = _next_record(reader, feed, limits)
    if record is None:
        raise ManifestFatalError("the manifest is empty: it needs a header row")
    where = f"the header row (line {record.line})"
    if record.problem is not None:
        raise ManifestFatalError(f"{where} cannot be read: {record.problem}")
    if record.bad_utf8 is not None:
        raise ManifestFatalError(f"{where} is {record.bad_utf8}")
    names: list[str] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(record.cells, start=1):
        # Spreadsheets leave unnamed trailing columns; give them a name rather than refuse.
        name = raw.strip() or f"column_{index}"
        if len(name) > limits.max_field_chars or "\x00" in name:
            raise ManifestFatalError(f"{where}: column {index} is not a usable name")
        key = name.casefold()
        if key in seen:
            raise ManifestFatalError(f"{where}: duplicate column {name!r} (also {seen[key]!r})")
        seen[key] = name
        names.append(name)
    video = [index for index, name in enumerate(names) if name.casefold() in VIDEO_COLUMNS]
    if not video:
        found = ", ".join(repr(name) for name in names[:10])
        raise ManifestFatalError(
            f"{where} has no video column: name one 'video' (or 'url' or 'path'); found {found}"
        )
    if len(video) > 1:
        both = " and ".join(repr(names[index]) for index in video)
        raise ManifestFatalError(f"{where} has {both}: keep one video column")
    id_index = next((i for i, name in enumerate(names) if name.casefold() == ID_COLUMN), None)
    metadata = tuple(
        (index, name) for index, name in enumerate(names) if index not in {video[0], id_index}
    )
    if len(metadata) > limits.max_metadata_columns:
        # Every row carries every column (a short row's missing cells read as empty), so
        # every row would be over the limit: one reason for the manifest, not one per row.
        raise ManifestFatalError(
            f"{where} has {len(metadata)} metadata columns, over the limit of "
            f"{limits.max_metadata_columns}: keep the columns the results need"
        )
    return _Header(names=tuple(names), video=video[0], id=id_index, metadata=metadata)


def _read_rows(
    reader: Iterator[list[str]],
    feed: _LineFeed,
    header: _Header,
    policy: SourcePolicy,
    limits: _Limits,
) -> Iterator[ManifestRecord]:
    checker = _RowChecker(header, policy, limits)
    row = 1
    while (record := _next_record(reader, feed, limits)) is not None:
        row += 1
        if record.problem is not None:
            yield ManifestError(row=row, line=record.line, reason=record.problem)
        else:
            yield checker.check(record, row)


class _RowRejectedError(Exception):
    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


class _RowChecker:
    """Turns parsed records into items, or into the first reason each is rejected."""

    def __init__(self, header: _Header, policy: SourcePolicy, limits: _Limits) -> None:
        self._header = header
        self._policy = policy
        self._limits = limits
        self._ids = _IdTable()
        # Escaping makes one character at most 6 bytes ("\u001f"), so rows whose characters
        # times 6 (keys and JSON punctuation included) fit the limit skip serializing.
        self._fixed_bound = (
            _default_sizer().envelope_bytes
            + 64
            + sum(6 * len(name) + 6 for _, name in header.metadata)
        )

    def check(self, record: _Record, row: int) -> ManifestRecord:
        header = self._header
        try:
            self._check_cells(record)
            source = self._source(record.cells)
            item_id, derived = self._item_id(record.cells, source)
            metadata = {name: _cell(record.cells, index) for index, name in header.metadata}
            item = ManifestItem(item_id=item_id, source=source, row=row, metadata=metadata)
            self._check_message_size(item, record.cells)
            # Last: a row rejected for any reason does not claim its id.
            self._claim(item_id, derived, row)
        except _RowRejectedError as exc:
            index = exc.index
            field = header.names[index] if index is not None and index < len(header.names) else None
            return ManifestError(row=row, line=record.line, field=field, reason=exc.reason)
        return item

    def _check_message_size(self, item: ManifestItem, cells: list[str]) -> None:
        # A row under the byte limit of a record can still outgrow a queue message (many
        # columns, each under the cell limit): it would fail the enqueue of its whole chunk,
        # and so the run. Measured as the message it becomes, alone, with default options.
        limit = self._limits.max_message_bytes
        chars = len(item.source) + len(item.item_id) + sum(map(len, item.metadata.values()))
        if self._fixed_bound + 6 * chars <= limit:
            return
        size = _default_sizer().message_bytes([item_message_bytes(item)])
        if size <= limit:
            return
        largest = max(range(len(cells)), key=lambda index: len(cells[index]))
        raise _RowRejectedError(
            f"the row makes a queue message of {size} bytes, over the limit of {limit} for "
            f"one row (a message holds {QUEUE_MESSAGE_MAX_BYTES} bytes): {len(cells)} cells, "
            f"the largest of {len(cells[largest])} characters; shorten or drop metadata",
            largest,
        )

    def _check_cells(self, record: _Record) -> None:
        cells, width, max_chars = (
            record.cells,
            len(self._header.names),
            self._limits.max_field_chars,
        )
        if record.bad_utf8 is not None:
            raise _RowRejectedError(record.bad_utf8, _first_index(cells, _has_surrogate))
        if len(cells) > width and any(cells[width:]):
            # Trailing empty cells (a stray comma at the end) are harmless; values are not.
            raise _RowRejectedError(f"the row has {len(cells)} columns, the header {width}")
        if max(map(len, cells)) > max_chars:
            index = _first_index(cells, lambda cell: len(cell) > max_chars)
            raise _RowRejectedError(f"longer than {max_chars} characters", index)
        if "\x00" in "".join(cells):
            index = _first_index(cells, lambda cell: "\x00" in cell)
            raise _RowRejectedError("contains a NUL character", index)

    def _source(self, cells: list[str]) -> str:
        index = self._header.video
        video = _cell(cells, index).strip()
        if not video:
            raise _RowRejectedError(f"the {self._header.names[index]} cell is empty", index)
        try:
            return normalize_source(video, self._policy)
        except SourceRejectedError as exc:
            raise _RowRejectedError(f"{exc}: {_show(_redact(video))}", index) from None

    def _item_id(self, cells: list[str], source: str) -> tuple[str, bool]:
        """The row's item id, and whether it was derived from the source (no id cell)."""
        index = self._header.id
        item_id = _cell(cells, index).strip()
        if not item_id:
            return source_item_id(source), True
        if not _ITEM_ID.fullmatch(item_id):
            raise _RowRejectedError(
                f"invalid id {_show(item_id)}: use 1-128 letters, digits, '_', '.' or '-', "
                "starting with a letter, digit or '_'",
                index,
            )
        return item_id, False

    def _claim(self, item_id: str, derived: bool, row: int) -> None:
        first_row = self._ids.add(item_id, row)
        if first_row is not None:
            video = self._header.names[self._header.video]
            earlier = f"same {video} as row" if derived else "first on row"
            # A derived id repeats because the video does: point at the video cell then.
            at = self._header.video if derived else self._header.id
            raise _RowRejectedError(f"duplicate id '{item_id}' ({earlier} {first_row})", at)


def _cell(cells: list[str], index: int | None) -> str:
    # Rows shorter than the header are fine: the missing cells read as empty.
    return cells[index] if index is not None and index < len(cells) else ""


def _first_index(cells: list[str], test: Callable[[str], bool]) -> int | None:
    return next((index for index, cell in enumerate(cells) if test(cell)), None)


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


def _show(value: str, limit: int = 80) -> str:
    """A value quoted for an error message, cut short so a huge cell cannot bloat errors."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _redact(source: str) -> str:
    """A rejected source with its secrets blanked: errors travel into blobs and run status."""
    source = _USERINFO.sub("***@", source, count=1)  # user:password@
    return _QUERY.sub("?***", source, count=1)  # a SAS token's signature


# --------------------------------------------------------------------------------------------
# Items to chunks


def chunk_manifest(
    records: Iterable[ManifestRecord],
    *,
    write_chunk: Callable[[int, bytes], str],
    write_errors: Callable[[IO[bytes]], str | None],
    chunk_size: int,
    run_id: str,
    manifest: str,
    keep_first_errors: int = 20,
    segment_s: float | None = None,
) -> ManifestSummary:
    """Write valid items as JSONL chunks and errors as one JSONL file; summarize.

    ``write_chunk(index, data)`` stores chunk ``index`` (0, 1, ...) and returns its name.
    ``write_errors(stream)`` stores the errors (the stream is rewound) and returns a name;
    it is not called when there are none. At most one chunk is held in memory. A
    ``duration_s`` column is tallied into the summary's ``media`` (pieces at ``segment_s``,
    the run's segment length), which a plan by video length sizes.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    chunks: list[str] = []
    batch: list[bytes] = []
    first_errors: list[ManifestError] = []
    valid = invalid = 0
    errors_name: str | None = None
    media = ManifestMediaTally(segment_s)
    with tempfile.SpooledTemporaryFile(max_size=ERRORS_SPOOL_BYTES) as errors:
        for record in records:
            if isinstance(record, ManifestItem):
                valid += 1
                media.add(record.metadata, record.row)
                batch.append(record.model_dump_json().encode("utf-8"))
                if len(batch) >= chunk_size:
                    chunks.append(write_chunk(len(chunks), _jsonl(batch)))
                    batch = []
            else:
                invalid += 1
                errors.write(record.model_dump_json().encode("utf-8") + b"\n")
                if len(first_errors) < keep_first_errors:
                    first_errors.append(record)
        if batch:
            chunks.append(write_chunk(len(chunks), _jsonl(batch)))
        if invalid:
            errors.seek(0)
            errors_name = write_errors(errors)
    return ManifestSummary(
        run_id=run_id,
        manifest=manifest,
        rows=valid + invalid,
        valid=valid,
        invalid=invalid,
        chunk_count=len(chunks),
        errors_blob=errors_name,
        first_errors=first_errors,
        media=media.summary(),
    )


def _jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


# --------------------------------------------------------------------------------------------
# Storage wiring


def errors_blob_name(run_id: str) -> str:
    """Where a run's manifest errors live in the runs container."""
    return f"{run_id}/manifest-errors.jsonl"


def validate_manifest_to_blobs(
    store: BlobStore,
    *,
    run_id: str,
    manifest_name: str,
    policy: SourcePolicy,
    container: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    segment_s: float | None = None,
) -> ManifestSummary:
    """Validate a manifest blob (streamed) into chunk and error blobs under the run's prefix.

    The manifest is read from ``container`` (default: the manifests container); chunks and
    errors go to the runs container. A manifest that is missing or unusable as a whole gives
    a summary with ``fatal`` set, and nothing is written.
    """
    source_container = container or store.settings.manifests_container
    label = f"{source_container}/{manifest_name}"
    if not store.exists(source_container, manifest_name):
        return _fatal_summary(run_id, label, f"manifest {label} not found")
    chunks = store.download_chunks(source_container, manifest_name)
    return _validate_chunks(
        store,
        chunks,
        run_id=run_id,
        label=label,
        policy=policy,
        chunk_size=chunk_size,
        max_field_chars=max_field_chars,
        max_row_bytes=max_row_bytes,
        segment_s=segment_s,
    )


def validate_manifest_file(
    store: BlobStore,
    path: Path,
    *,
    run_id: str,
    policy: SourcePolicy,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    segment_s: float | None = None,
) -> ManifestSummary:
    """Like validate_manifest_to_blobs, for a manifest that is a local file (local mode)."""
    if not path.is_file():
        return _fatal_summary(run_id, str(path), f"manifest file {path} not found")
    return _validate_chunks(
        store,
        read_file_chunks(path),
        run_id=run_id,
        label=str(path),
        policy=policy,
        chunk_size=chunk_size,
        max_field_chars=max_field_chars,
        max_row_bytes=max_row_bytes,
        segment_s=segment_s,
    )


def read_chunk(store: BlobStore, name: str) -> list[ManifestItem]:
    """The items of one chunk written by the validation (``name`` as in the summary)."""
    chunks = store.download_chunks(store.settings.runs_container, name)
    return [ManifestItem.model_validate_json(line) for line in iter_lines(chunks) if line.strip()]


def read_errors(store: BlobStore, name: str) -> Iterator[ManifestError]:
    """The errors of a manifest's error file (``errors_blob`` of the summary), streamed."""
    chunks = store.download_chunks(store.settings.runs_container, name)
    for line in iter_lines(chunks):
        if line.strip():
            yield ManifestError.model_validate_json(line)


def _validate_chunks(
    store: BlobStore,
    chunks: Iterable[bytes],
    *,
    run_id: str,
    label: str,
    policy: SourcePolicy,
    chunk_size: int,
    max_field_chars: int,
    max_row_bytes: int,
    segment_s: float | None = None,
) -> ManifestSummary:
    runs = store.settings.runs_container
    try:
        records = read_manifest(
            iter_lines(chunks, max_line_bytes=max_row_bytes),
            policy,
            max_field_chars=max_field_chars,
            max_row_bytes=max_row_bytes,
        )
    except ManifestFatalError as exc:
        return _fatal_summary(run_id, label, str(exc))

    def write_chunk(index: int, data: bytes) -> str:
        name = chunk_blob_name(run_id, index)
        store.upload_bytes(runs, name, data, content_type=JSONL_CONTENT_TYPE)
        return name

    def write_errors(stream: IO[bytes]) -> str:
        name = errors_blob_name(run_id)
        length = stream.seek(0, 2)
        stream.seek(0)
        store.upload_stream(runs, name, stream, length=length, content_type=JSONL_CONTENT_TYPE)
        return name

    return chunk_manifest(
        records,
        write_chunk=write_chunk,
        write_errors=write_errors,
        chunk_size=chunk_size,
        run_id=run_id,
        manifest=label,
        segment_s=segment_s,
    )


def _fatal_summary(run_id: str, label: str, reason: str) -> ManifestSummary:
    return ManifestSummary(
        run_id=run_id, manifest=label, rows=0, valid=0, invalid=0, chunk_count=0, fatal=reason
    )


# The allowlist's names stay importable from here (they live in batchctl.sources).
__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_FIELD_CHARS",
    "DEFAULT_MAX_ROW_BYTES",
    "ERRORS_SPOOL_BYTES",
    "ID_COLUMN",
    "JSONL_CONTENT_TYPE",
    "LOOPBACK_HOSTS",
    "MAX_METADATA_COLUMNS",
    "MAX_ROW_MESSAGE_BYTES",
    "READ_CHUNK_BYTES",
    "ROW_MESSAGE_MARGIN_BYTES",
    "VIDEO_COLUMNS",
    "ManifestFatalError",
    "ManifestRecord",
    "SourcePolicy",
    "SourceRejectedError",
    "chunk_blob_name",
    "chunk_manifest",
    "errors_blob_name",
    "iter_lines",
    "local_path_of",
    "normalize_source",
    "prefixes_from_accounts",
    "read_chunk",
    "read_errors",
    "read_file_chunks",
    "read_manifest",
    "source_item_id",
    "validate_manifest_file",
    "validate_manifest_to_blobs",
]
