"""The manifest reader: every error kind by row, field and reason; chunks; Azurite round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from batchctl.contracts import ManifestError, ManifestItem, ManifestSummary, WorkItem
from batchctl.manifest import (
    MAX_METADATA_COLUMNS,
    MAX_ROW_MESSAGE_BYTES,
    ManifestFatalError,
    ManifestRecord,
    SourcePolicy,
    SourceRejectedError,
    chunk_blob_name,
    chunk_manifest,
    errors_blob_name,
    iter_lines,
    local_path_of,
    normalize_source,
    prefixes_from_accounts,
    read_chunk,
    read_errors,
    read_manifest,
    source_item_id,
    validate_manifest_file,
    validate_manifest_to_blobs,
)
from batchctl.packing import QUEUE_MESSAGE_MAX_BYTES, queue_message_bytes
from batchctl.storage import BlobStore

PREFIX = "https://acct.blob.core.windows.net/media/"
POLICY = SourcePolicy(prefixes_from_accounts(["acct/media"]))


def read(data: str | bytes, policy: SourcePolicy = POLICY, **limits: int) -> list[ManifestRecord]:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return list(read_manifest(iter_lines([raw]), policy, **limits))


def items(records: list[ManifestRecord]) -> list[ManifestItem]:
    return [record for record in records if isinstance(record, ManifestItem)]


def errors(records: list[ManifestRecord]) -> list[ManifestError]:
    return [record for record in records if isinstance(record, ManifestError)]


def only_error(data: str | bytes, policy: SourcePolicy = POLICY, **limits: int) -> ManifestError:
    records = read(data, policy, **limits)
    assert len(records) == 1, records
    assert isinstance(records[0], ManifestError), records[0]
    return records[0]


# ---------------------------------------------------------------------------- iter_lines


LINES_SAMPLE = b'id,video\r\na,"b\r\nc"\n\nlast\rx\r\r\nno-terminator'


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_iter_lines_any_chunk_size(size: int) -> None:
    chunks = [LINES_SAMPLE[i : i + size] for i in range(0, len(LINES_SAMPLE), size)]
    assert list(iter_lines(chunks)) == LINES_SAMPLE.splitlines(keepends=True)


def test_iter_lines_every_two_way_split() -> None:
    expected = LINES_SAMPLE.splitlines(keepends=True)
    for cut in range(len(LINES_SAMPLE) + 1):
        assert list(iter_lines([LINES_SAMPLE[:cut], b"", LINES_SAMPLE[cut:]])) == expected


def test_iter_lines_cr_at_a_chunk_end() -> None:
    assert list(iter_lines([b"a\r", b"\nb"])) == [b"a\r\n", b"b"]
    assert list(iter_lines([b"a\r", b"b"])) == [b"a\r", b"b"]
    assert list(iter_lines([b"a\r"])) == [b"a\r"]
    assert list(iter_lines([])) == []


@pytest.mark.parametrize("size", [1, 3, 100])
def test_iter_lines_cuts_over_long_lines(size: int) -> None:
    data = b"abcdefghij\r\nxy\nklmnopqrstuvwxyz\rok\n"
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    # A cut line keeps max_line_bytes + 1 bytes and no terminator; the rest is dropped.
    assert list(iter_lines(chunks, max_line_bytes=5)) == [b"abcdef", b"xy\n", b"klmnop", b"ok\n"]


def test_over_long_line_is_one_row_error_and_reading_goes_on() -> None:
    data = f"video\n{PREFIX}{'a' * 200}.mp4\n{PREFIX}ok.mp4\n".encode()
    lines = iter_lines([data], max_line_bytes=100)
    records = list(read_manifest(lines, POLICY, max_row_bytes=100))
    assert records[0] == ManifestError(row=2, line=2, reason="row longer than 100 bytes")
    assert isinstance(records[1], ManifestItem)
    assert (records[1].row, records[1].source) == (3, f"{PREFIX}ok.mp4")


# ---------------------------------------------------------------------------- good manifests


def test_header_aliases_bom_crlf_quotes_and_metadata() -> None:
    data = (
        "\ufeff Id ,  URL ,label,notes\r\n"
        f'v1,{PREFIX}a.mp4,cat,"one, two"\r\n'
        f'v2,{PREFIX}b.mp4,dog,"line one\r\nline two, ""quoted"""\r\n'
        "\r\n"
        f"v3,{PREFIX}c.mp4,,\r\n"
    )
    records = read(data)
    assert records == [
        ManifestItem(
            item_id="v1",
            source=f"{PREFIX}a.mp4",
            row=2,
            metadata={"label": "cat", "notes": "one, two"},
        ),
        ManifestItem(
            item_id="v2",
            source=f"{PREFIX}b.mp4",
            row=3,
            metadata={"label": "dog", "notes": 'line one\r\nline two, "quoted"'},
        ),
        # The quoted record spans lines 3-4 and a blank line follows; rows count records.
        ManifestItem(
            item_id="v3", source=f"{PREFIX}c.mp4", row=4, metadata={"label": "", "notes": ""}
        ),
    ]


@pytest.mark.parametrize("column", ["video", "url", "path", "VIDEO", " Url "])
def test_video_column_aliases(column: str) -> None:
    (item,) = items(read(f"{column}\n{PREFIX}a.mp4\n"))
    assert item.source == f"{PREFIX}a.mp4"


def test_fewer_cells_read_as_empty_metadata_and_trailing_empty_cells_are_fine() -> None:
    records = read(f"video,a,b\n{PREFIX}x.mp4\n{PREFIX}y.mp4,1,2,,\n")
    assert [item.metadata for item in items(records)] == [{"a": "", "b": ""}, {"a": "1", "b": "2"}]


def test_old_mac_line_endings() -> None:
    records = read(f"video,label\r{PREFIX}a.mp4,x\r{PREFIX}b.mp4,y\r")
    assert [(item.row, item.metadata["label"]) for item in items(records)] == [(2, "x"), (3, "y")]


def test_hashed_ids_are_stable_and_follow_the_normalized_source() -> None:
    first = items(read(f"video\n{PREFIX}a.mp4\n"))[0]
    assert first.item_id == source_item_id(f"{PREFIX}a.mp4")
    assert len(first.item_id) == 16
    # Another manifest, another spelling of the same blob: the same id.
    spelled = "HTTPS://ACCT.Blob.Core.Windows.Net:443/media/%61.mp4"
    again = items(read(f"id,video,x\n,{spelled},1\n"))[0]
    assert again.item_id == first.item_id
    assert again.source == first.source


def test_unnamed_header_columns_get_a_name() -> None:
    (item,) = items(read(f"video,,label,\n{PREFIX}a.mp4,x,y,z\n"))
    assert item.metadata == {"column_2": "x", "label": "y", "column_4": "z"}


def test_urls_are_normalized() -> None:
    cases = {
        f"{PREFIX}a b.mp4": f"{PREFIX}a%20b.mp4",
        f"{PREFIX}caf%c3%a9.mp4": f"{PREFIX}caf%C3%A9.mp4",
        f"{PREFIX}café.mp4": f"{PREFIX}caf%C3%A9.mp4",
        f"{PREFIX}dir/x%41.mp4": f"{PREFIX}dir/xA.mp4",
        f"{PREFIX}a%3Fb.mp4": f"{PREFIX}a%3Fb.mp4",
    }
    for raw, expected in cases.items():
        assert normalize_source(raw, POLICY) == expected


def test_http_to_loopback_is_allowed_for_azurite() -> None:
    azurite = "http://127.0.0.1:10000/devstoreaccount1/media/"
    policy = SourcePolicy(prefixes_from_accounts([azurite]))
    assert normalize_source(f"{azurite}v.mp4", policy) == f"{azurite}v.mp4"
    assert normalize_source(
        "HTTP://LOCALHOST:10000/x/y.mp4", SourcePolicy(("http://localhost:10000/x/",))
    )


def test_prefixes_from_accounts() -> None:
    assert prefixes_from_accounts(["acct/media", "other/*"]) == (
        "https://acct.blob.core.windows.net/media/",
        "https://other.blob.core.windows.net/",
    )
    wildcard = SourcePolicy(prefixes_from_accounts(["other/*"]))
    assert normalize_source("https://other.blob.core.windows.net/any/v.mp4", wildcard)
    with pytest.raises(SourceRejectedError, match="names a container, not a blob"):
        normalize_source("https://other.blob.core.windows.net/any", wildcard)
    for bad in ["acct", "Acct/media", "acct/Media", "a/media", "acct/me--dia", "ftp://x/y"]:
        with pytest.raises(ValueError, match="allowed"):
            prefixes_from_accounts([bad])
    with pytest.raises(ValueError, match="loopback"):
        SourcePolicy(("http://acct.blob.core.windows.net/media/",))


# ---------------------------------------------------------------------------- fatal


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xef\xbb\xbf", "empty"),
        (b"\r\n\n  \n,,\n", "empty"),
        (b"id,label\nx,y\n", "no video column"),
        (b"video,label,Label\n", "duplicate column 'Label'"),
        (b"video,url\n", "keep one video column"),
        (b"vid\xffeo\n", "not valid UTF-8"),
        (b'"video\n', "unterminated quoted field"),
        ("video\n".encode("utf-16"), "UTF-16"),
    ],
)
def test_fatal_manifests(data: bytes, message: str) -> None:
    with pytest.raises(ManifestFatalError, match=message):
        read(data)


def test_fatal_error_is_raised_before_anything_is_read_lazily() -> None:
    # read_manifest checks the header when called, not on the first next().
    with pytest.raises(ManifestFatalError):
        read_manifest(iter_lines([b"nothing,here\n"]), POLICY)


# ---------------------------------------------------------------------------- row errors


def test_non_utf8_row_is_reported_and_reading_goes_on() -> None:
    data = b"id,video,label\nv1,https://acct.blob.core.windows.net/media/a.mp4,caf\xe9\n"
    data += f"v2,{PREFIX}b.mp4,ok\n".encode()
    records = read(data)
    assert records[0] == ManifestError(
        row=2, line=2, field="label", reason="not valid UTF-8 (byte 0xE9 on line 2)"
    )
    assert isinstance(records[1], ManifestItem)
    assert records[1].item_id == "v2"


def test_empty_video_cell() -> None:
    error = only_error("id,Video\nv1,   \n")
    assert (error.row, error.line, error.field) == (2, 2, "Video")
    assert error.reason == "the Video cell is empty"


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("file:///etc/passwd", "scheme 'file:' is not allowed"),
        ("ftp://acct.blob.core.windows.net/media/a.mp4", "scheme 'ftp:' is not allowed"),
        ("data:video/mp4;base64,AAAA", "scheme 'data:' is not allowed"),
        ("gopher://127.0.0.1/x", "scheme 'gopher:' is not allowed"),
        ("http://acct.blob.core.windows.net/media/a.mp4", "http is only allowed to a loopback"),
        ("http://169.254.169.254/metadata/x", "http is only allowed to a loopback"),
        ("https://evil.blob.core.windows.net/media/a.mp4", "not under an allowed account"),
        ("https://acct.blob.core.windows.net/other/a.mp4", "not under an allowed account"),
        ("https://acct.blob.core.windows.net.evil.com/media/a.mp4", "not under an allowed"),
        ("https://acct.blob.core.windows.net:8443/media/a.mp4", "not under an allowed"),
        ("https://user:pw@acct.blob.core.windows.net/media/a.mp4", "credentials in a URL"),
        ("https://evil.com@acct.blob.core.windows.net/media/a.mp4", "credentials in a URL"),
        (f"{PREFIX}../other/a.mp4", "'.' and '..' path segments"),
        (f"{PREFIX}./a.mp4", "'.' and '..' path segments"),
        (f"{PREFIX}%2e%2e/other/a.mp4", "'.' and '..' path segments"),
        (f"{PREFIX}.%2E/other/a.mp4", "'.' and '..' path segments"),
        (f"{PREFIX}..%2fother%2Fa.mp4", "encoded slashes"),
        (f"{PREFIX}a%5cb.mp4", "encoded slashes"),
        (f"{PREFIX}a\\b.mp4", "backslashes are not allowed"),
        (f"{PREFIX}a%00.mp4", "encoded control characters"),
        (f"{PREFIX}a%zz.mp4", "malformed percent-escape"),
        (f"{PREFIX}a%ff.mp4", "not UTF-8"),
        (f"{PREFIX}a.mp4?sv=2024&sig=secret", "query strings (such as SAS tokens)"),
        (f"{PREFIX}a.mp4#frag", "fragments"),
        (f"{PREFIX}dir/", "names a folder, not a blob"),
        (f"{PREFIX}dir//a.mp4", "empty path segments"),
        ("https://acct.blob.core.windows.net", "no blob path"),
        ("https://[::1/media/a.mp4", "malformed URL"),
        ("https://acct.blob.core.windows.net:99999/media/a.mp4", "malformed URL"),
        ("https:///media/a.mp4", "no host"),
        ("//acct.blob.core.windows.net/media/a.mp4", "scheme-relative"),
        ("videos/a.mp4", "local paths are only allowed in local mode"),
        ("/etc/passwd", "local paths are only allowed in local mode"),
    ],
)
def test_disallowed_sources(source: str, reason: str) -> None:
    error = only_error(f'id,video\nv1,"{source}"\n')
    assert (error.row, error.line, error.field) == (2, 2, "video")
    assert reason in error.reason
    if "@" not in source and "?" not in source:
        assert error.reason.endswith(repr(source))


def test_secrets_in_rejected_urls_are_not_echoed() -> None:
    error = only_error("video\nhttps://me:hunter2@x.example/m/a.mp4\n")
    assert "hunter2" not in error.reason
    assert error.reason.endswith("'https://***@x.example/m/a.mp4'")
    error = only_error(f"video\n{PREFIX}b.mp4?sv=1&sig=TOPSECRET\n")
    assert "TOPSECRET" not in error.reason
    assert error.reason.endswith(f"'{PREFIX}b.mp4?***'")


def test_disallowed_url_with_no_allowlist() -> None:
    error = only_error(f"video\n{PREFIX}a.mp4\n", SourcePolicy())
    assert error.reason.startswith("no storage account or container is allowed")


def test_local_paths(tmp_path: Path) -> None:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (root / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    (root / "inside.mp4").symlink_to(root / "sub" / "a.mp4")
    policy = SourcePolicy(local_root=root)
    resolved = (root / "sub" / "a.mp4").resolve()

    data = "\n".join(
        [
            "path",
            str(root / "sub" / "a.mp4"),  # row 2: absolute, fine
            "sub/a.mp4",  # row 3: relative to the root: the same file, a duplicate
            "inside.mp4",  # row 4: a symlink inside the root, resolved: a duplicate too
            str(tmp_path / "secret.mp4"),  # row 5: outside
            "../secret.mp4",  # row 6: outside through ..
            "escape.mp4",  # row 7: outside through a symlink
            "sub/missing.mp4",  # row 8: missing
            "sub",  # row 9: a directory
            f"{PREFIX}a.mp4",  # row 10: URLs still need the allowlist
        ]
    )
    records = read(data, policy)
    first = records[0]
    assert isinstance(first, ManifestItem)
    assert first == ManifestItem(
        item_id=source_item_id(f"file://{resolved}"), source=f"file://{resolved}", row=2
    )
    assert local_path_of(first.source) == resolved
    assert local_path_of(f"{PREFIX}a.mp4") is None
    reasons = {error.row: error.reason for error in errors(records)}
    assert all(error.field == "path" for error in errors(records))
    assert reasons[3].startswith(f"duplicate id '{first.item_id}' (same path as row 2)")
    assert reasons[4].startswith("duplicate id")
    for row in (5, 6, 7):
        assert reasons[row].startswith(f"the path is outside the allowed root {root.resolve()}")
    assert reasons[8].startswith("no such file")
    assert reasons[9].startswith("no such file")
    assert reasons[10].startswith("no storage account or container is allowed")


def test_unreadable_local_paths_are_row_errors(tmp_path: Path) -> None:
    policy = SourcePolicy(local_root=tmp_path)
    error = only_error(f"path\n{'a' * 300}.mp4\n", policy)
    assert (error.row, error.field) == (2, "path")
    assert error.reason.startswith("cannot read the path: File name too long")


def test_duplicate_ids_keep_the_first() -> None:
    data = f"id,video\nv1,{PREFIX}a.mp4\nv2,{PREFIX}b.mp4\nv1,{PREFIX}c.mp4\nv1,{PREFIX}d.mp4\n"
    records = read(data)
    assert [item.source for item in items(records)] == [f"{PREFIX}a.mp4", f"{PREFIX}b.mp4"]
    assert errors(records) == [
        ManifestError(row=4, line=4, field="id", reason="duplicate id 'v1' (first on row 2)"),
        ManifestError(row=5, line=5, field="id", reason="duplicate id 'v1' (first on row 2)"),
    ]


def test_rejected_rows_do_not_claim_their_id() -> None:
    records = read(f"id,video\nv1,ftp://x/y\nv1,{PREFIX}a.mp4\n")
    assert isinstance(records[0], ManifestError)
    assert isinstance(records[1], ManifestItem)


@pytest.mark.parametrize("bad_id", ["-x", ".hidden", "a/b", "a b", "ä", "x" * 129, "a..b/../c"])
def test_invalid_id(bad_id: str) -> None:
    error = only_error(f'id,video\n"{bad_id}",{PREFIX}a.mp4\n')
    assert (error.row, error.field) == (2, "id")
    assert error.reason.startswith(f"invalid id '{bad_id[:80]}")
    assert "use 1-128 letters, digits" in error.reason


def test_over_long_field() -> None:
    error = only_error(f"video,notes\n{PREFIX}a.mp4,{'n' * 101}\n", max_field_chars=100)
    assert (error.row, error.field, error.reason) == (2, "notes", "longer than 100 characters")


def _wide_row_manifest(prefix: str, cell: str = "x" * 4000, columns: int = 20) -> str:
    # Every cell under the field limit and the row far under the record limit (1 MiB), yet
    # together over a queue message (64 KiB): the row a queue would refuse at enqueue time.
    names = ",".join(f"m{index}" for index in range(columns))
    small = ",".join("s" for _ in range(columns))
    wide = ",".join(cell for _ in range(columns))
    return (
        f"id,video,{names}\n"
        f"a,{prefix}a.mp4,{small}\n"
        f"b,{prefix}b.mp4,{wide}\n"
        f"c,{prefix}c.mp4,{small}\n"
    )


def _message_bytes_alone(item: ManifestItem) -> int:
    work = WorkItem(run_id="r" * 40, items=[item])
    return queue_message_bytes(work.model_dump_json())


def test_a_row_too_large_for_a_queue_message_is_one_invalid_row() -> None:
    records = read(_wide_row_manifest(PREFIX))
    assert [type(record).__name__ for record in records] == [
        "ManifestItem", "ManifestError", "ManifestItem",
    ]  # fmt: skip
    error = errors(records)[0]
    assert (error.row, error.line, error.field) == (3, 3, "m0")
    assert "queue message of" in error.reason and f"holds {QUEUE_MESSAGE_MAX_BYTES}" in error.reason
    assert [item.item_id for item in items(records)] == ["a", "c"]
    assert all(_message_bytes_alone(item) <= MAX_ROW_MESSAGE_BYTES for item in items(records))


def test_the_message_size_of_a_row_counts_xml_escaping() -> None:
    # 13 x 4,000 characters: 52 KB as text, fits; as '&' each is '&amp;' on the wire: 260 KB.
    plain = read(_wide_row_manifest(PREFIX, "x" * 4000, columns=13))
    assert not errors(plain)
    assert max(_message_bytes_alone(item) for item in items(plain)) > 52_000
    escaped = errors(read(_wide_row_manifest(PREFIX, "&" * 4000, columns=13)))
    assert [(error.row, error.field) for error in escaped] == [(3, "m0")]


def test_a_rejected_oversized_row_does_not_claim_its_id() -> None:
    data = _wide_row_manifest(PREFIX) + f"b,{PREFIX}b2.mp4,s\n"
    records = read(data)
    assert [record.row for record in errors(records)] == [3]
    assert [item.item_id for item in items(records)] == ["a", "c", "b"]


def test_more_metadata_columns_than_the_limit_is_fatal() -> None:
    # Every row carries every column of the header: with 100,000 of them every row would be
    # over a queue message, so the manifest is refused as a whole, with the limit named.
    names = ",".join(f"c{index}" for index in range(100_000))
    with pytest.raises(ManifestFatalError, match=r"100000 metadata columns, over the limit"):
        read(f"id,video,{names}\na,{PREFIX}a.mp4\n")
    at_limit = ",".join(f"c{index}" for index in range(MAX_METADATA_COLUMNS))
    (item,) = items(read(f"id,video,{at_limit}\na,{PREFIX}a.mp4\n"))
    assert len(item.metadata) == MAX_METADATA_COLUMNS


def test_more_columns_than_the_header() -> None:
    error = only_error(f"id,video\nv1,{PREFIX}a.mp4,extra\n")
    assert (error.row, error.line, error.field) == (2, 2, None)
    assert error.reason == "the row has 3 columns, the header 2"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (f'"v1,{PREFIX}a.mp4\n', "unterminated quoted field at the end of the file"),
        (f'"v1"x,{PREFIX}a.mp4\n', "a closing quote must be followed by a comma"),
    ],
)
def test_csv_parse_errors(row: str, reason: str) -> None:
    error = only_error(f"id,video\n{row}")
    assert (error.row, error.line, error.field) == (2, 2, None)
    assert error.reason.startswith(f"malformed CSV: {reason}")


def test_nul_character() -> None:
    error = only_error(f"id,video,label\nv1,{PREFIX}a.mp4,a\x00b\n")
    assert (error.row, error.field, error.reason) == (2, "label", "contains a NUL character")


def test_over_long_record_spanning_lines() -> None:
    data = f'id,video,notes\nv1,{PREFIX}a.mp4,"{"x" * 60}\n{"y" * 60}"\nv2,{PREFIX}b.mp4,\n'
    records = read(data, max_row_bytes=100)
    assert records[0] == ManifestError(row=2, line=2, reason="row longer than 100 bytes")
    # Reading resumes on the next physical line (inside the abandoned quoted field here),
    # which is judged on its own: still one result per record, numbered in order.
    assert [record.row for record in records] == list(range(2, 2 + len(records)))
    assert isinstance(records[-1], ManifestItem)
    assert records[-1].item_id == "v2"


def test_rows_count_records_and_lines_count_lines() -> None:
    data = f'video,notes\n\n{PREFIX}a.mp4,"a\nb\nc"\n\n\nftp://x/y,\n{PREFIX}b.mp4,z\n'
    records = read(data)
    assert [(record.row, type(record).__name__) for record in records] == [
        (2, "ManifestItem"),
        (3, "ManifestError"),
        (4, "ManifestItem"),
    ]
    error = errors(records)[0]
    assert error.line == 8


# ---------------------------------------------------------------------------- chunks


def _records(valid: int, invalid_every: int = 0) -> list[ManifestRecord]:
    lines = ["id,video,label"]
    for index in range(valid):
        lines.append(f"v{index},{PREFIX}{index}.mp4,l{index}")
        if invalid_every and index % invalid_every == 0:
            lines.append(f"bad{index},ftp://x/{index},")
    return read("\n".join(lines) + "\n")


def test_chunk_manifest_writes_chunks_and_errors() -> None:
    records = _records(5, invalid_every=2)
    written: dict[int, bytes] = {}
    error_files: list[bytes] = []

    def write_chunk(index: int, data: bytes) -> str:
        written[index] = data
        return f"chunk-{index}"

    def write_errors(stream: IO[bytes]) -> str:
        error_files.append(stream.read())
        return "errors"

    summary = chunk_manifest(
        records,
        write_chunk=write_chunk,
        write_errors=write_errors,
        chunk_size=2,
        run_id="r1",
        manifest="m.csv",
        keep_first_errors=2,
    )
    assert (summary.rows, summary.valid, summary.invalid) == (8, 5, 3)
    assert summary.chunk_count == 3
    assert summary.errors_blob == "errors"
    assert summary.first_errors == errors(records)[:2]
    assert summary.fatal is None
    chunk_items = [
        ManifestItem.model_validate_json(line)
        for index in sorted(written)
        for line in written[index].splitlines()
    ]
    assert chunk_items == items(records)
    assert [len(written[index].splitlines()) for index in sorted(written)] == [2, 2, 1]
    assert all(data.endswith(b"\n") for data in written.values())
    (error_bytes,) = error_files
    assert [ManifestError.model_validate_json(line) for line in error_bytes.splitlines()] == errors(
        records
    )


def test_chunk_manifest_without_errors_does_not_write_an_errors_file() -> None:
    def no_errors(stream: IO[bytes]) -> str:
        raise AssertionError("write_errors must not be called")

    summary = chunk_manifest(
        _records(4),
        write_chunk=lambda index, data: f"c{index}",
        write_errors=no_errors,
        chunk_size=2,
        run_id="r1",
        manifest="m.csv",
    )
    assert (summary.chunk_count, summary.errors_blob, summary.invalid) == (2, None, 0)


def test_chunk_manifest_of_nothing_valid() -> None:
    summary = chunk_manifest(
        read("video\nftp://x/y\n"),
        write_chunk=lambda index, data: f"c{index}",
        write_errors=lambda stream: "e",
        chunk_size=2,
        run_id="r1",
        manifest="m.csv",
    )
    assert (summary.rows, summary.valid, summary.chunk_count, summary.errors_blob) == (1, 0, 0, "e")


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_manifest(
            [], write_chunk=lambda i, d: "", write_errors=lambda s: None, chunk_size=0,
            run_id="r1", manifest="m",
        )  # fmt: skip


# ---------------------------------------------------------------------------- Azurite


@pytest.mark.azurite
def test_chunks_round_trip_through_azurite(blob_store: BlobStore, run_id: str) -> None:
    settings = blob_store.settings
    prefix = blob_store.url(settings.media_container, "")
    policy = SourcePolicy(prefixes_from_accounts([prefix]))
    rows = ["id,video,label"]
    expected: list[tuple[str, str, str]] = []
    for index in range(4500):
        source = f"{prefix}videos/{index:05d}.mp4"
        rows.append(f"v{index:05d},{source},label {index}")
        expected.append((f"v{index:05d}", source, f"label {index}"))
        if index % 1000 == 0:
            rows.append(f"v{index:05d},{source},duplicate")
    rows.append("bad,https://evil.example.com/x.mp4,x")
    manifest_name = f"{run_id}/manifest.csv"
    blob_store.upload_bytes(settings.manifests_container, manifest_name, "\r\n".join(rows))

    summary = validate_manifest_to_blobs(
        blob_store, run_id=run_id, manifest_name=manifest_name, policy=policy, chunk_size=2000
    )

    assert summary.fatal is None
    assert summary.manifest == f"{settings.manifests_container}/{manifest_name}"
    assert (summary.rows, summary.valid, summary.invalid) == (4506, 4500, 6)
    assert summary.chunks == [chunk_blob_name(run_id, index) for index in range(3)]
    assert blob_store.list_names(settings.runs_container, f"{run_id}/") == sorted(
        [*summary.chunks, errors_blob_name(run_id)]
    )
    got = [item for name in summary.chunks for item in read_chunk(blob_store, name)]
    assert [(item.item_id, item.source, item.metadata["label"]) for item in got] == expected
    assert [len(read_chunk(blob_store, name)) for name in summary.chunks] == [2000, 2000, 500]

    assert summary.errors_blob == errors_blob_name(run_id)
    error_list = list(read_errors(blob_store, summary.errors_blob))
    assert len(error_list) == 6
    assert error_list[0] == ManifestError(
        row=3, line=3, field="id", reason="duplicate id 'v00000' (first on row 2)"
    )
    assert error_list[-1].row == 4507
    assert error_list[-1].reason.startswith("not under an allowed account/container")
    assert summary.first_errors == error_list


@pytest.mark.azurite
def test_fatal_or_missing_manifest_writes_nothing(blob_store: BlobStore, run_id: str) -> None:
    settings = blob_store.settings
    missing = validate_manifest_to_blobs(
        blob_store, run_id=run_id, manifest_name=f"{run_id}/nope.csv", policy=POLICY
    )
    assert missing.fatal == f"manifest {settings.manifests_container}/{run_id}/nope.csv not found"

    blob_store.upload_bytes(settings.manifests_container, f"{run_id}/m.csv", b"name,size\na,1\n")
    fatal = validate_manifest_to_blobs(
        blob_store, run_id=run_id, manifest_name=f"{run_id}/m.csv", policy=POLICY
    )
    assert fatal.fatal is not None
    assert "no video column" in fatal.fatal
    assert (fatal.rows, fatal.chunk_count, fatal.errors_blob) == (0, 0, None)

    blob_store.upload_bytes(settings.manifests_container, f"{run_id}/empty.csv", b"")
    empty = validate_manifest_to_blobs(
        blob_store, run_id=run_id, manifest_name=f"{run_id}/empty.csv", policy=POLICY
    )
    assert empty.fatal is not None
    assert "empty" in empty.fatal
    assert blob_store.list_names(settings.runs_container, f"{run_id}/") == []


@pytest.mark.azurite
def test_validate_local_manifest_file(blob_store: BlobStore, run_id: str, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.mp4").write_bytes(b"x")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\na.mp4,x\nmissing.mp4,y\n")
    summary = validate_manifest_file(
        blob_store, manifest, run_id=run_id, policy=SourcePolicy(local_root=media)
    )
    assert (summary.valid, summary.invalid, summary.manifest) == (1, 1, str(manifest))
    (item,) = read_chunk(blob_store, summary.chunks[0])
    assert item.source == f"file://{(media / 'a.mp4').resolve()}"
    assert item.metadata == {"label": "x"}

    missing = validate_manifest_file(
        blob_store, tmp_path / "nope.csv", run_id=run_id, policy=POLICY
    )
    assert missing.fatal is not None
    assert "not found" in missing.fatal


# ---------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_memory_stays_flat_on_a_large_manifest(tmp_path: Path, repo_root: Path) -> None:
    rows = 200_000
    result = subprocess.run(
        [sys.executable, "-m", "bench.manifest_memory", "--rows", str(rows), "--json"],
        cwd=repo_root,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == rows
    assert report["valid"] + report["invalid"] == rows
    assert report["invalid"] > 0
    assert report["peak_rss_mb"] < 200, report


def test_error_file_stream_is_rewound() -> None:
    seen: list[int] = []

    def write_errors(stream: IO[bytes]) -> str:
        seen.append(stream.tell())
        return "e"

    chunk_manifest(
        read("video\nftp://x/y\n"),
        write_chunk=lambda index, data: "c",
        write_errors=write_errors,
        chunk_size=1,
        run_id="r1",
        manifest="m",
    )
    assert seen == [0]


@pytest.mark.azurite
def test_a_hundred_thousand_column_row_is_one_invalid_row_on_azurite(
    blob_store: BlobStore, run_id: str
) -> None:
    settings = blob_store.settings
    prefix = blob_store.url(settings.media_container, "")
    policy = SourcePolicy(prefixes_from_accounts([prefix]))
    # Row 3: 20 cells of 4,000 characters, over a queue message; row 5: 100,000 columns
    # under a 22-column header (200 KB, under the 1 MiB record limit). The rest are good.
    hundred_thousand = ",".join("x" for _ in range(100_000))
    data = _wide_row_manifest(prefix) + f"d,{prefix}d.mp4,{hundred_thousand}\n"
    manifest_name = f"{run_id}/wide.csv"
    blob_store.upload_bytes(settings.manifests_container, manifest_name, data)

    summary = validate_manifest_to_blobs(
        blob_store, run_id=run_id, manifest_name=manifest_name, policy=policy
    )

    assert summary.fatal is None
    assert (summary.rows, summary.valid, summary.invalid) == (4, 2, 2)
    assert summary.errors_blob is not None
    wide, long = list(read_errors(blob_store, summary.errors_blob))
    assert (wide.row, wide.field) == (3, "m0") and "queue message" in wide.reason
    assert (long.row, long.field) == (5, None)
    assert long.reason == "the row has 100002 columns, the header 22"
    valid = [item for name in summary.chunks for item in read_chunk(blob_store, name)]
    assert [item.item_id for item in valid] == ["a", "c"]

    # A header of 100,000 columns: refused as a whole, nothing written.
    names = ",".join(f"c{index}" for index in range(100_000))
    blob_store.upload_bytes(
        settings.manifests_container, manifest_name, f"id,video,{names}\na,{prefix}a.mp4\n"
    )
    fatal = validate_manifest_to_blobs(
        blob_store, run_id=f"{run_id}x", manifest_name=manifest_name, policy=policy
    )
    assert fatal.fatal is not None and "100000 metadata columns" in fatal.fatal
    assert blob_store.list_names(settings.runs_container, f"{run_id}x/") == []


# -- the duration_s column: the work in seconds of video, for a plan by video length ---------
def _summarize(csv_text: str, segment_s: float | None = None) -> ManifestSummary:
    return chunk_manifest(
        read(csv_text),
        write_chunk=lambda index, data: f"c{index}",
        write_errors=lambda stream: "errors",
        chunk_size=100,
        run_id="r1",
        manifest="m.csv",
        segment_s=segment_s,
    )


def test_validation_tallies_the_duration_column_and_names_cells_that_are_no_duration() -> None:
    summary = _summarize(
        "id,video,Duration_S\n"
        f"a,{PREFIX}a.mp4,600\n"
        f"b,{PREFIX}b.mp4,1m30s\n"
        f"c,{PREFIX}c.mp4,\n"  # unknown: the mean of the known ones
        f"d,{PREFIX}d.mp4,soon\n"  # no duration: its video still runs
        "e,ftp://elsewhere/e.mp4,60\n",  # an invalid row counts for nothing
        segment_s=200,
    )
    assert (summary.valid, summary.invalid) == (4, 1)
    media = summary.media
    assert media is not None
    assert (media.items, media.estimated, media.unreadable, media.unreadable_rows) == (4, 2, 1, [5])
    # 600 + 90 s known; the two others at their mean, 345 s each.
    assert media.media_s == pytest.approx(690 + 2 * 345)
    # 600 s in 200 s segments is 3 pieces, 345 s is 2, 90 s is 1.
    assert (media.pieces, media.longest_piece_s, media.longest_item_s) == (3 + 1 + 2 + 2, 200, 600)
    assert media.segment_s == 200


def test_without_a_duration_column_there_is_no_media_summary() -> None:
    assert _summarize(f"id,video,label\na,{PREFIX}a.mp4,x\n").media is None
    assert _summarize(f"id,video,duration_s\na,{PREFIX}a.mp4,\n").media is None  # all empty
