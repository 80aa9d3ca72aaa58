"""Hypothesis fuzz of the manifest reader.

- Arbitrary bytes and mutated valid CSVs never raise anything but ManifestFatalError, and
  every record gets exactly one result, numbered 2, 3, ... with a reason when rejected.
- Valid CSVs written by csv.writer (any quoting, CRLF or LF, BOM, blank lines, commas, quotes
  and newlines in values, any chunking of the bytes) come back exactly, row for row.
- No input makes normalize_source accept a URL outside the allowlist.
"""

from __future__ import annotations

import csv
import io
import string
from dataclasses import dataclass
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchctl.contracts import ITEM_ID_PATTERN, ManifestError, ManifestItem
from batchctl.manifest import (
    ManifestFatalError,
    ManifestRecord,
    SourcePolicy,
    SourceRejectedError,
    chunk_manifest,
    iter_lines,
    normalize_source,
    prefixes_from_accounts,
    read_manifest,
    source_item_id,
)

PREFIX = "https://acct.blob.core.windows.net/media/"
POLICY = SourcePolicy(prefixes_from_accounts(["acct/media"]))
MAX_FIELD_CHARS = 128
MAX_ROW_BYTES = 1024

FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Pieces that make the reader's corners likely: quotes, separators, terminators, NUL, bad
# UTF-8, a BOM, header names, URL fragments that break rules.
CSV_PIECES = [
    b",",
    b'"',
    b'""',
    b"\n",
    b"\r",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    b" ",
    b"a",
    b"id",
    b"video",
    b"url",
    PREFIX.encode(),
    b"x.mp4",
    b"../",
    b"%2e%2E/",
    b"%2f",
    b"\\",
    b"ftp://",
    b"http://127.0.0.1/",
    b"user@",
    b"?sig=1",
    b"caf\xc3\xa9",
]
csv_soup = st.lists(st.sampled_from(CSV_PIECES), max_size=60).map(b"".join)


def split_into_chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, start, index = [], 0, 0
    while start < len(data):
        size = sizes[index % len(sizes)]
        chunks.append(data[start : start + size])
        start += size
        index += 1
    return chunks


def read_all(chunks: list[bytes]) -> list[ManifestRecord] | None:
    """Read the way the storage wiring does; None when the manifest is fatally unusable."""
    try:
        records = read_manifest(
            iter_lines(chunks, max_line_bytes=MAX_ROW_BYTES),
            POLICY,
            max_field_chars=MAX_FIELD_CHARS,
            max_row_bytes=MAX_ROW_BYTES,
        )
        return list(records)
    except ManifestFatalError as exc:
        assert str(exc)
        return None


def check_invariants(records: list[ManifestRecord]) -> None:
    """One result per record, numbered in order; rejections say where and why."""
    assert [record.row for record in records] == list(range(2, 2 + len(records)))
    error_lines = [record.line for record in records if isinstance(record, ManifestError)]
    assert error_lines == sorted(set(error_lines))  # each record starts on a later line
    for record in records:
        if isinstance(record, ManifestError):
            assert record.reason.strip()
            assert record.line >= 2
    ids = [record.item_id for record in records if isinstance(record, ManifestItem)]
    assert len(ids) == len(set(ids))
    # Whatever was accepted serializes and round-trips through chunks and the errors file.
    written: list[bytes] = []
    error_files: list[bytes] = []

    def write_errors(stream: IO[bytes]) -> str:
        error_files.append(stream.read())
        return "errors"

    def write_chunk(index: int, data: bytes) -> str:
        written.append(data)
        return f"c{index}"

    summary = chunk_manifest(
        records,
        write_chunk=write_chunk,
        write_errors=write_errors,
        chunk_size=3,
        run_id="fuzz",
        manifest="m.csv",
    )
    assert summary.rows == len(records)
    back = [
        ManifestItem.model_validate_json(line)
        for data in written
        for line in data.split(b"\n")
        if line
    ]
    assert back == [record for record in records if isinstance(record, ManifestItem)]
    errors_back = [
        ManifestError.model_validate_json(line)
        for data in error_files
        for line in data.split(b"\n")
        if line
    ]
    assert errors_back == [record for record in records if isinstance(record, ManifestError)]


chunk_sizes = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=5)


line_soup = st.lists(st.sampled_from([b"a", b"bc", b"\r", b"\n", b"\r\n", b'"']), max_size=40)


@FUZZ
@given(pieces=line_soup, sizes=chunk_sizes, limit=st.none() | st.integers(1, 8))
def test_iter_lines_matches_splitlines(
    pieces: list[bytes], sizes: list[int], limit: int | None
) -> None:
    data = b"".join(pieces)
    expected = data.splitlines(keepends=True)
    if limit is not None:
        expected = [line if len(line) <= limit else line[: limit + 1] for line in expected]
    assert list(iter_lines(split_into_chunks(data, sizes), max_line_bytes=limit)) == expected


@FUZZ
@given(data=st.binary(max_size=600), sizes=chunk_sizes)
def test_arbitrary_bytes(data: bytes, sizes: list[int]) -> None:
    records = read_all(split_into_chunks(data, sizes))
    if records is not None:
        check_invariants(records)


@FUZZ
@given(
    body=csv_soup,
    header=st.sampled_from([b"id,video,label\n", b"video\r\n", b"url,id\n"]),
    sizes=chunk_sizes,
)
def test_csv_soup_after_a_valid_header(body: bytes, header: bytes, sizes: list[int]) -> None:
    records = read_all(split_into_chunks(header + body, sizes))
    assert records is not None  # a valid header is never fatal, whatever follows
    check_invariants(records)


@FUZZ
@given(data=csv_soup, sizes=chunk_sizes)
def test_csv_soup(data: bytes, sizes: list[int]) -> None:
    records = read_all(split_into_chunks(data, sizes))
    if records is not None:
        check_invariants(records)


# ---------------------------------------------------------------------------- valid CSVs


@dataclass(frozen=True)
class Manifest:
    header: list[str]
    rows: list[list[str]]
    video: int
    id: int | None
    data: bytes
    row_spans: list[tuple[int, int]]  # byte span of each data row (not counting blank lines)

    def expected(self) -> list[ManifestItem]:
        items = []
        for number, cells in enumerate(self.rows, start=2):
            source = cells[self.video]
            item_id = cells[self.id] if self.id is not None else source_item_id(source)
            metadata = {
                name: cells[index]
                for index, name in enumerate(self.header)
                if index not in {self.video, self.id}
            }
            items.append(
                ManifestItem(item_id=item_id, source=source, row=number, metadata=metadata)
            )
        return items


segment = st.text(
    alphabet=string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=8
).filter(lambda text: text not in {".", ".."})
blob_url = st.lists(segment, min_size=1, max_size=3).map(
    lambda parts: PREFIX + "/".join(parts) + ".mp4"
)
item_ids = st.from_regex(ITEM_ID_PATTERN, fullmatch=True).filter(lambda text: len(text) <= 40)
meta_value = st.text(
    alphabet=st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=12
)
meta_name = (
    st.text(alphabet=string.ascii_letters + string.digits + "_ -", min_size=1, max_size=8)
    .map(str.strip)
    .filter(lambda name: name and name.casefold() not in {"video", "url", "path", "id"})
    .filter(lambda name: not name.startswith("column_"))
)


@st.composite
def valid_manifests(draw: st.DrawFn) -> Manifest:
    video_name = draw(st.sampled_from(["video", "url", "path", "Video", "URL"]))
    with_id = draw(st.booleans())
    names = draw(st.lists(meta_name, max_size=3, unique_by=str.casefold))
    header = draw(st.permutations([video_name, *(["id"] if with_id else []), *names]))
    video = header.index(video_name)
    id_index = header.index("id") if with_id else None
    count = draw(st.integers(min_value=0, max_value=8))
    sources = draw(st.lists(blob_url, min_size=count, max_size=count, unique=True))
    ids = draw(st.lists(item_ids, min_size=count, max_size=count, unique=True))
    rows = []
    for number in range(count):
        cells = [draw(meta_value) for _ in header]
        cells[video] = sources[number]
        if id_index is not None:
            cells[id_index] = ids[number]
        rows.append(cells)

    terminator = draw(st.sampled_from(["\r\n", "\n"]))
    # csv.writer leaves a lone "\r" unquoted when the terminator is "\n": quote all then.
    quote_all = terminator == "\n" or draw(st.booleans())
    blank_after = draw(st.sets(st.integers(min_value=-1, max_value=count)))
    out = bytearray("\ufeff".encode() if draw(st.booleans()) else b"")
    spans = []
    for number, cells in enumerate([header, *rows], start=-1):
        buffer = io.StringIO()
        csv.writer(
            buffer,
            lineterminator=terminator,
            quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
        ).writerow(cells)
        start = len(out)
        out += buffer.getvalue().encode("utf-8")
        if number >= 0:
            spans.append((start, len(out)))
        if number in blank_after:
            out += terminator.encode()
    return Manifest(header, rows, video, id_index, bytes(out), spans)


@FUZZ
@given(manifest=valid_manifests(), sizes=chunk_sizes)
def test_valid_rows_survive_unchanged(manifest: Manifest, sizes: list[int]) -> None:
    records = read_all(split_into_chunks(manifest.data, sizes))
    assert records == manifest.expected()


MUTATION_BYTES = st.sampled_from(
    [b'"', b",", b"\n", b"\r", b"\x00", b"\xff", b"\\", b"%", b"x", b"", b".."]
)


@FUZZ
@given(manifest=valid_manifests(), data=st.data(), sizes=chunk_sizes)
def test_mutated_rows_never_crash_and_earlier_rows_survive(
    manifest: Manifest, data: st.DataObject, sizes: list[int]
) -> None:
    if not manifest.rows:
        target = -1
        start, end = 0, len(manifest.data)
    else:
        target = data.draw(st.integers(min_value=0, max_value=len(manifest.rows) - 1))
        start, end = manifest.row_spans[target]
    mutated = bytearray(manifest.data)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        position = data.draw(st.integers(min_value=start, max_value=max(start, end - 1)))
        replacement = data.draw(MUTATION_BYTES)
        width = data.draw(st.integers(min_value=0, max_value=2))  # 0: insert
        mutated[position : position + width] = replacement
        end = max(start, end + len(replacement) - width)
    records = read_all(split_into_chunks(bytes(mutated), sizes))
    if target < 0:  # a mutated header may well be fatal (read_all checked it is the only way)
        if records is not None:
            check_invariants(records)
        return
    assert records is not None  # the header is intact, so the manifest is usable
    check_invariants(records)
    # Everything before the mutated row is untouched by it.
    assert records[:target] == manifest.expected()[:target]


# ---------------------------------------------------------------------------- the allowlist

URL_PIECES = [
    "https://",
    "http://",
    "HTTPS://",
    "acct.blob.core.windows.net",
    "ACCT.blob.core.windows.net",
    "evil.com",
    "127.0.0.1",
    ":443",
    ":10000",
    "@",
    "/",
    "//",
    "media",
    "other",
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%5c",
    "%00",
    "%",
    "\\",
    "?",
    "#",
    "x.mp4",
    " ",
    "é",
    "[",
    "]",
    ";",
]


@FUZZ
@given(value=st.lists(st.sampled_from(URL_PIECES), max_size=12).map("".join))
def test_no_url_escapes_the_allowlist(value: str) -> None:
    try:
        source = normalize_source(value, POLICY)
    except SourceRejectedError as exc:
        assert str(exc)
        return
    assert source.startswith(PREFIX)
    rest = source[len(PREFIX) :]
    assert rest and not rest.endswith("/")
    assert all(part not in {"", ".", ".."} for part in rest.split("/"))
    assert "\\" not in source and "?" not in source and "#" not in source
    assert "%2F" not in source.upper() and "%5C" not in source.upper()
    assert normalize_source(source, POLICY) == source  # normalizing twice changes nothing


PATH_PIECES = ["a", "b.mp4", "/", "..", ".", "~", " ", "é", "x" * 120, "%2e", "\x00", "\\", "\n"]


@FUZZ
@given(value=st.lists(st.sampled_from(PATH_PIECES), max_size=10).map("".join))
def test_local_paths_never_escape_the_root(
    value: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.getbasetemp() / "fuzz-media"
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "b.mp4").write_bytes(b"x")
    try:
        source = normalize_source(value, SourcePolicy(local_root=root))
    except SourceRejectedError as exc:
        assert str(exc)
        return
    assert source == f"file://{(root / 'a' / 'b.mp4').resolve()}"


@pytest.mark.parametrize("value", ["https://acct.blob.core.windows.net/media/%2e%2E/x.mp4"])
def test_known_traversal_is_refused(value: str) -> None:
    with pytest.raises(SourceRejectedError):
        normalize_source(value, POLICY)
