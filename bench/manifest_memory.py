"""Read and chunk a large manifest and show that memory stays flat in its size.

    python -m bench.manifest_memory --rows 1000000 [--chunk-size 2000] [--tracemalloc] [--json]

Generates a manifest on disk (streamed, never held in memory) with one invalid row in a
hundred (a disallowed URL, a duplicate id, a bad id, an empty video cell, in turn), then reads
it through the real path, ``read_file_chunks`` -> ``iter_lines`` -> ``read_manifest`` ->
``chunk_manifest``, writing the JSONL chunks and the errors file to local files. Reports the
process's peak RSS (``ru_maxrss``: it covers everything the process ever held, including the
interpreter and pydantic), the time taken and the rate, and ends with one JSON line. The goal
is a peak under 200 MB for 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import IO

from batchctl.manifest import (
    DEFAULT_MAX_ROW_BYTES,
    SourcePolicy,
    chunk_manifest,
    iter_lines,
    prefixes_from_accounts,
    read_file_chunks,
    read_manifest,
)

ACCOUNT = "benchacct/media"
PREFIX = "https://benchacct.blob.core.windows.net/media/"
INVALID_EVERY = 100


def peak_rss_mb() -> float:
    """The process's peak resident set so far.

    On Linux this is VmHWM from /proc: ``ru_maxrss`` survives exec, so a process started by
    a big parent (pytest with TensorFlow loaded) would report the parent's size as its own.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def row_text(index: int) -> tuple[str, bool]:
    """One manifest row and whether it is valid; every hundredth row breaks a rule."""
    item_id = f"video-{index:07d}"
    source = f"{PREFIX}videos/{index // 1000:04d}/{index:07d}.mp4"
    label = f'"cat, {index % 7}"' if index % 3 else "dog"
    if index % INVALID_EVERY != INVALID_EVERY - 1:
        return f"{item_id},{source},{label},{index % 600}\n", True
    kind = (index // INVALID_EVERY) % 4
    if kind == 0:
        return f"{item_id},https://evil.example.com/{index}.mp4,{label},1\n", False
    if kind == 1:
        return f"video-{index - 1:07d},{source},{label},1\n", False  # the previous row's id
    if kind == 2:
        return f"bad id {index},{source},{label},1\n", False
    return f"{item_id},,{label},1\n", False


def write_manifest(path: Path, rows: int) -> int:
    """Write the manifest a batch of lines at a time; returns how many rows are valid."""
    valid = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("id,video,label,duration_s\n")
        batch: list[str] = []
        for index in range(rows):
            text, ok = row_text(index)
            batch.append(text)
            valid += ok
            if len(batch) == 10_000:
                handle.write("".join(batch))
                batch.clear()
        handle.write("".join(batch))
    return valid


def validate(manifest: Path, out_dir: Path, chunk_size: int) -> dict[str, int]:
    """Read and chunk the manifest through the project's streaming path into ``out_dir``."""
    chunk_dir = out_dir / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)

    def write_chunk(index: int, data: bytes) -> str:
        path = chunk_dir / f"chunk-{index:05d}.jsonl"
        path.write_bytes(data)
        return path.name

    def write_errors(stream: IO[bytes]) -> str:
        path = out_dir / "manifest-errors.jsonl"
        with path.open("wb") as handle:
            shutil.copyfileobj(stream, handle)
        return path.name

    policy = SourcePolicy(prefixes_from_accounts([ACCOUNT]))
    lines = iter_lines(read_file_chunks(manifest), max_line_bytes=DEFAULT_MAX_ROW_BYTES)
    summary = chunk_manifest(
        read_manifest(lines, policy),
        write_chunk=write_chunk,
        write_errors=write_errors,
        chunk_size=chunk_size,
        run_id="bench",
        manifest=str(manifest),
    )
    return {
        "rows": summary.rows,
        "valid": summary.valid,
        "invalid": summary.invalid,
        "chunks": len(summary.chunks),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also report the Python heap's peak (slower)"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="manifest-bench-") as tmp:
        work = Path(tmp)
        manifest = work / "manifest.csv"
        started = time.perf_counter()
        expected_valid = write_manifest(manifest, args.rows)
        manifest_mb = manifest.stat().st_size / 2**20
        print(
            f"generated {args.rows:,} rows ({manifest_mb:.1f} MB) "
            f"in {time.perf_counter() - started:.1f} s"
        )
        baseline_mb = peak_rss_mb()

        if args.tracemalloc:
            tracemalloc.start()
        started = time.perf_counter()
        counts = validate(manifest, work / "out", args.chunk_size)
        seconds = time.perf_counter() - started
        heap_peak_mb = None
        if args.tracemalloc:
            heap_peak_mb = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            tracemalloc.stop()

    peak_mb = peak_rss_mb()
    ok = counts["rows"] == args.rows and counts["valid"] == expected_valid
    report: dict[str, object] = {
        **counts,
        "expected_valid": expected_valid,
        "manifest_mb": round(manifest_mb, 1),
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": peak_mb,
        "seconds": round(seconds, 2),
        "rows_per_s": round(args.rows / seconds),
    }
    if heap_peak_mb is not None:
        report["tracemalloc_peak_mb"] = heap_peak_mb
    print(
        f"read and chunked {counts['rows']:,} rows ({counts['valid']:,} valid, "
        f"{counts['invalid']:,} invalid, {counts['chunks']} chunks) in {seconds:.1f} s: "
        f"{report['rows_per_s']:,} rows/s; peak RSS {peak_mb} MB (before reading {baseline_mb})"
    )
    if not ok:
        print(f"MISMATCH: expected {args.rows} rows, {expected_valid} valid", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
