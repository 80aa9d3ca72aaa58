"""Copy a finished run's outputs out of Azurite the old sequential way and the new way, side
by side in one run.

    python -m bench.copyout [--files 5000] [--size 2048] [--threads 16 ...]
                            [--latency-ms 0] [--json]

One fresh Azurite holds one finished run: ``--files`` small outputs of ``--size`` random
bytes (two a "item", as a run's ``features.npz`` and ``metadata.json``) and a report.

- sequential: one :class:`~batchctl.storage.BlobStore` of the copy-out's role downloading
  each output after the other (``download_to_file``, the copy-out before issue 25);
- concurrent: :func:`batchctl.controller.copy_run_out` itself, with each ``--threads``
  count (records, report and index included, so its figure is if anything low).

Each copy is checked file by file (names and bytes) against what was uploaded. It prints
files/s for each and the ratio of the best concurrent rate to the sequential one. On a
machine of 2 shared cores Azurite and this process compete for the CPU, so the ratio here
is a floor: against Azure the sequential way waits a network round trip per file.
``--latency-ms`` puts that round trip in: both copies then reach Azurite through a proxy
here that holds each request that long before passing it on (a storage account in the
same region answers in a few ms, one across the internet in tens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from batchctl import controller
from batchctl.compute.local import LocalBackend
from batchctl.local.azurite import azurite
from batchctl.local.session import local_settings
from batchctl.services import Services, build_services
from batchctl.settings import ControllerSettings, StorageSettings
from batchctl.storage import BlobStore

RUN_ID = "bench-copyout"


class _LatencyProxy(socketserver.ThreadingTCPServer):
    """A TCP proxy that holds each chunk a client sends for ``latency_s`` (a request's round
    trip, as a distant storage account adds it); answers pass straight back."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: tuple[str, int], latency_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _Relay)
        self.target = target
        self.latency_s = latency_s


class _Relay(socketserver.BaseRequestHandler):
    server: _LatencyProxy

    def handle(self) -> None:
        upstream = socket.create_connection(self.server.target)
        back = threading.Thread(target=_pump, args=(upstream, self.request, 0.0), daemon=True)
        back.start()
        _pump(self.request, upstream, self.server.latency_s)
        back.join()
        upstream.close()


def _pump(source: socket.socket, target: socket.socket, delay_s: float) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            if delay_s:
                time.sleep(delay_s)
            target.sendall(chunk)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def latency(storage: StorageSettings, latency_ms: float) -> Iterator[StorageSettings]:
    """``storage`` with its blob endpoint behind a :class:`_LatencyProxy` (none for 0)."""
    if latency_ms <= 0:
        yield storage
        return
    url = urlsplit(storage.blob_url)
    proxy = _LatencyProxy((url.hostname or "127.0.0.1", url.port or 80), latency_ms / 1000)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        port = proxy.server_address[1]
        blob_url = urlunsplit(url._replace(netloc=f"127.0.0.1:{port}"))
        yield storage.model_copy(update={"blob_url": blob_url})
    finally:
        proxy.shutdown()
        proxy.server_close()


def output_names(files: int) -> Iterator[str]:
    """Names as a run writes them: two outputs per item, under the item's folder."""
    for index in range(files):
        item, kind = divmod(index, 2)
        yield f"items/video-{item:06d}/{'features.npz' if kind == 0 else 'metadata.json'}"


def fill_run(settings: ControllerSettings, files: int, size: int) -> dict[str, bytes]:
    """Store a finished run with ``files`` outputs; returns what a copy must produce."""
    rng = random.Random(files)
    expected = {name: rng.randbytes(size) for name in output_names(files)}
    store = BlobStore(settings)
    store.ensure_containers()
    store.upload_bytes(
        settings.runs_container,
        controller.report_blob_name(RUN_ID),
        json.dumps({"run_id": RUN_ID}),
    )
    store.close()
    # Uploaded by threads with a store each: the fill is set-up, not what is measured.
    local = threading.local()
    stores: list[BlobStore] = []
    lock = threading.Lock()

    def upload(name: str) -> None:
        if not hasattr(local, "store"):
            local.store = BlobStore(settings)
            with lock:
                stores.append(local.store)
        local.store.upload_bytes(settings.outputs_container, f"{RUN_ID}/{name}", expected[name])

    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in pool.map(upload, expected):
            pass
    for store in stores:
        store.close()
    return expected


def sequential_copy(settings: ControllerSettings, output_dir: Path) -> float:
    """The copy-out's outputs loop as it was: one download after another; seconds taken."""
    store = BlobStore(settings, role="copy_out")
    prefix = f"{RUN_ID}/"
    started = time.perf_counter()
    for name in store.list_names(settings.outputs_container, prefix):
        store.download_to_file(settings.outputs_container, name, output_dir / name[len(prefix) :])
    seconds = time.perf_counter() - started
    store.close()
    return seconds


def concurrent_copy(services: Services, run_dir: Path, threads: int) -> float:
    started = time.perf_counter()
    controller.copy_run_out(services, RUN_ID, run_dir, threads=threads)
    return time.perf_counter() - started


def check_copy(output_dir: Path, expected: dict[str, bytes]) -> None:
    copied = {
        path.relative_to(output_dir).as_posix(): path
        for path in output_dir.rglob("*")
        if path.is_file()
    }
    if set(copied) != set(expected):
        missing, extra = set(expected) - set(copied), set(copied) - set(expected)
        raise SystemExit(f"copy differs: {len(missing)} missing, {len(extra)} extra files")
    for name, data in expected.items():
        if copied[name].read_bytes() != data:
            raise SystemExit(f"copy differs: {name} has other bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--files", type=int, default=5_000, help="outputs in the run")
    parser.add_argument("--size", type=int, default=2_048, help="bytes per output")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[controller.COPY_THREADS],
        help="thread counts of the concurrent copy, each measured",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="round trip added to every request"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        instance = stack.enter_context(azurite())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-copyout-"))
        storage = instance.storage_settings()
        root = Path(tmp)
        direct = local_settings(storage, media_root=root, nodes=1, log_dir=root / "logs")
        # Filled directly: the fill is set-up, not what is measured.
        expected = fill_run(direct, args.files, args.size)
        far = stack.enter_context(latency(storage, args.latency_ms))
        settings = local_settings(far, media_root=root, nodes=1, log_dir=root / "logs")
        services = build_services(settings, LocalBackend(settings, nodes=1))
        try:
            services.ledger.ensure_table()
            sequential_dir = root / "sequential"
            sequential_s = sequential_copy(settings, sequential_dir)
            check_copy(sequential_dir, expected)
            concurrent_s: dict[int, float] = {}
            for threads in args.threads:
                run_dir = root / f"threads-{threads}"
                concurrent_s[threads] = concurrent_copy(services, run_dir, threads)
                check_copy(run_dir / controller.OUTPUTS_DIR_NAME, expected)
        finally:
            services.close()

    sequential_rate = args.files / sequential_s
    rates = {threads: args.files / seconds for threads, seconds in concurrent_s.items()}
    best = max(rates, key=lambda threads: rates[threads])
    result = {
        "files": args.files,
        "bytes_per_file": args.size,
        "cpus": os.cpu_count(),
        "latency_ms": args.latency_ms,
        "sequential_files_per_s": round(sequential_rate, 1),
        "concurrent_files_per_s": {str(t): round(rate, 1) for t, rate in rates.items()},
        "best_threads": best,
        "ratio": round(rates[best] / sequential_rate, 2),
    }
    for threads, rate in rates.items():
        print(
            f"copy-out of {args.files:,} files of {args.size:,} B"
            + (f", {args.latency_ms:g} ms a request" if args.latency_ms else "")
            + f": sequential "
            f"{sequential_rate:,.0f} files/s, {threads} threads {rate:,.0f} files/s, "
            f"ratio {rate / sequential_rate:.2f}"
        )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
