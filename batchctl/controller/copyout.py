"""Local mode: a finished run's report and outputs copied into its folder."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import io
import logging
import os
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from azure.core.exceptions import AzureError, ResourceNotFoundError

from batchctl.controller.names import (
    OUTPUTS_DIR_NAME,
    RECORDS_NAME,
    REPORT_HTML_NAME,
    REPORT_NAME,
    report_blob_name,
    report_html_blob_name,
)
from batchctl.copyprogress import CopyProgress
from batchctl.logs import bound
from batchctl.manifest import (
    errors_blob_name,
)
from batchctl.reporting.artifacts import (
    FAILED_CSV_NAME,
    INDEX_CSV_NAME,
    MANIFEST_ERRORS_NAME,
    failed_csv_blob_name,
    index_csv_blob_name,
    localize_index,
)
from batchctl.services import Services
from batchctl.settings import ControllerSettings
from batchctl.storage import BlobStore, Ledger
from batchctl.storage.blobs import ListedBlob, ThreadStores, atomic_file
from batchctl.storage.faults import describe as describe_storage_error
from batchctl.storage.items import LocalOutputCopies
from batchctl.storage.retry import Package, is_retryable_status, retry_bounds

log = logging.getLogger(__name__)

# Threads that download a run's outputs at once. A download is a round trip or two plus
# about 2 ms of SDK work under the GIL, so threads help as far as the network makes the
# sequential copy wait: against Azure (a few to tens of ms a request) 16 in flight keep one
# core busy; against a local Azurite the process is CPU-bound already, and more threads
# only contend for the GIL (bench/copyout.py: 8, 16 and 32 within noise of each other on
# Azurite, 16 best with 10 ms a request). Each thread has a client of its own
# (batchctl.storage.blobs.ThreadStores), so the bound is not tied to azure-core's connection pool.
COPY_THREADS = 16


# Outputs up to this size are checked against their file on the feeding thread (an MD5 of
# a few KB is cheaper than a future); larger ones on the pool, where the hashing overlaps.
CHECK_HERE_BYTES = 1024**2


# Downloads handed to the pool ahead of those finished, per thread: enough that no thread
# waits for the next name, few enough that a million-file run never holds a million futures.
IN_FLIGHT_PER_THREAD = 4


# -- names ----------------------------------------------------------------------------------


class RunCopyError(RuntimeError):
    """A finished run's results could not all be copied out: storage kept failing for
    longer than the copy-out's retry policy waits, or the local folder refused a file.

    The message is one line naming the run, what could not be copied and where the results
    still are; nothing already copied is partial (every file is written whole or not at all).
    """


def outputs_location(settings: ControllerSettings, run_id: str) -> str:
    """Where a run's outputs are in storage: the URL of their prefix (container/RUN_ID/)."""
    return f"{settings.blob_url}/{settings.outputs_container}/{run_id}/"


def copy_run_out(
    services: Services,
    run_id: str,
    run_dir: Path,
    *,
    copy_outputs: bool = True,
    progress: CopyProgress | None = None,
    threads: int = COPY_THREADS,
) -> tuple[Path, Path]:
    """Local mode: copy the report (report.json and report.html), the manifest errors and
    the outputs to a local folder (Azurite keeps everything in memory and forgets it when the
    run ends), with ``records.jsonl``: one terminal record per item, what ``batchctl retry``
    reads. Returns report.json's path and the outputs folder.

    The outputs are downloaded by ``threads`` threads at once, with a progress line on
    stderr when the copy is long (``progress``: see :class:`CopyProgress`). Without
    ``copy_outputs`` they stay in storage (:func:`outputs_location`) and the outputs folder
    returned is not created; everything else is copied, and index.csv names the outputs'
    folders in storage, not under ``run_dir``.

    The run is over and its results are only in storage, so this waits out storage trouble
    longer than other calls do (the ``copy_out`` role of :mod:`batchctl.storage.retry`).
    Every file appears whole or not at all (written beside its name, then renamed), so a copy
    cut short never leaves an empty records.jsonl or a truncated output. Storage errors that
    outlast the retries, and a folder that refuses a file, are :class:`RunCopyError`; the
    first output that fails stops the copy (the downloads under way end first).

    The outputs folder ends as a whole copy would, however much of it is there already:
    an output whose file is in its place with its size and MD5 (the nodes of ``batchctl
    run`` write them there themselves, and a resumed run finds its earlier ones) is not
    downloaded again, and a file no output has (a segment's part deleted since, a partial
    file a killed node left) is removed.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    settings = services.settings
    run_dir.mkdir(parents=True, exist_ok=True)
    # Clients of their own: a longer retry policy than the session's, for this copy only.
    store = BlobStore(settings, role="copy_out")
    ledger = Ledger(settings, role="copy_out")
    copier = _RunCopier(settings, run_id, run_dir)
    output_dir = run_dir / OUTPUTS_DIR_NAME
    # The outputs and the run's own files are independent, so they are copied at once: the
    # copy-out lasts as long as the longer of the two, not their sum (the end of every local
    # run waits for it). The outputs on a thread of their own, the run's files here, so a
    # Ctrl-C stops the feed of outputs at once (those being written end whole).
    stop = threading.Event()
    outputs: Future[None] | None = None
    outputs_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"copy-outputs-{run_id}")
    try:
        with bound(run_id=run_id):
            outputs = (
                outputs_thread.submit(
                    contextvars.copy_context().run,
                    _copy_outputs,
                    copier,
                    output_dir,
                    threads,
                    progress or CopyProgress(),
                    stop=stop,
                )
                if copy_outputs
                else None
            )
            try:
                report_path = _copy_run_files(copier, store, ledger, localize=copy_outputs)
                if outputs is not None:
                    outputs.result()
            except BaseException:
                # A failure of the run's files, or Ctrl-C while the outputs are copied: no
                # more downloads start (those under way end whole).
                stop.set()
                raise
            return report_path, output_dir
    finally:
        outputs_thread.shutdown(wait=True)
        _log_lost_failure(outputs)
        store.close()
        ledger.close()


def _log_lost_failure(outputs: Future[None] | None) -> None:
    """The outputs' own failure, when another one (the run's files', or Ctrl-C) is the one
    raised: said in the log rather than lost."""
    if outputs is None or not outputs.done() or outputs.cancelled():
        return
    error = outputs.exception()
    if error is not None and sys.exc_info()[1] is not error:
        log.warning("copying the outputs failed too: %s", error)


def _copy_run_files(
    copier: _RunCopier, store: BlobStore, ledger: Ledger, *, localize: bool
) -> Path:
    """Everything of a run but its outputs; returns report.json's path. ``localize``: the
    outputs are copied too, so index.csv names their folders under the copy."""
    settings, run_id, run_dir = copier.settings, copier.run_id, copier.run_dir
    runs = settings.runs_container
    with copier.copying(RECORDS_NAME, "table"), atomic_file(run_dir / RECORDS_NAME) as records:
        for result in ledger.iter_results(run_id):
            records.write((result.model_dump_json() + "\n").encode("utf-8"))
    report_path = run_dir / REPORT_NAME
    with copier.copying(REPORT_NAME, "blob"):
        store.download_to_file(runs, report_blob_name(run_id), report_path)
    # Beside report.json (so callers find it as report_path.with_name(REPORT_HTML_NAME));
    # absent only where matplotlib was not installed when the report was written.
    optional = (
        (report_html_blob_name(run_id), REPORT_HTML_NAME),
        (errors_blob_name(run_id), MANIFEST_ERRORS_NAME),
        # failed.csv as written (ready for a retry).
        (failed_csv_blob_name(run_id), FAILED_CSV_NAME),
    )
    for blob, local_name in optional:
        with copier.copying(local_name, "blob"), contextlib.suppress(ResourceNotFoundError):
            # One request: absent is the download's 404 (no partial file is left).
            store.download_to_file(runs, blob, run_dir / local_name)
    # index.csv with its folders under this copy; as written (folders in storage) when the
    # outputs stay there.
    index = index_csv_blob_name(run_id)
    with copier.copying(INDEX_CSV_NAME, "blob"):
        try:
            index_bytes = store.download_bytes(runs, index)
        except ResourceNotFoundError:
            index_bytes = None
        if index_bytes is not None:
            lines: Iterable[str] = io.StringIO(index_bytes.decode("utf-8"))
            if localize:
                storage_prefix = f"{settings.outputs_container}/{run_id}/"
                lines = localize_index(lines, storage_prefix, f"{OUTPUTS_DIR_NAME}/")
            with atomic_file(run_dir / INDEX_CSV_NAME) as handle:
                for line in lines:
                    handle.write(line.encode("utf-8"))
    return report_path


def _left_by_nodes(relative: str) -> bool:
    """Whether an unlisted file at ``relative`` (under the outputs folder) is one a node of
    the run can have left there and the copy-out may remove (pure): a partial file of a
    write cut short (``atomic_file``'s hidden ``.NAME.XXXX.part``), or a segment's part under
    a ``segments`` folder, deleted in storage once its item was assembled. Nothing else is
    removed, whatever the listing says: a listing of an emptied container, or a folder that
    held another session's run of the same id, must not cost a file storage never had."""
    parts = relative.split("/")
    name = parts[-1]
    partial = name.startswith(".") and name.endswith(".part")
    return partial or "segments" in parts[:-1]


def _remove_unlisted(output_dir: Path, listed: set[str]) -> None:
    """Remove the files under ``output_dir`` that no listed output has and that a node can
    have left (:func:`_left_by_nodes`), and the folders that leaves empty. Links are never
    followed (a linked folder is left as it is). Best effort: a file that cannot be
    removed is logged, not a failed copy."""
    for folder, _subfolders, files in os.walk(output_dir, topdown=False):
        here = Path(folder)
        for name in files:
            path = here / name
            relative = path.relative_to(output_dir).as_posix()
            if relative in listed or not _left_by_nodes(relative):
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                log.warning("left %s in the outputs folder: %s", path, error)
        if here != output_dir and not here.is_symlink():
            with contextlib.suppress(OSError):  # not empty: a kept file, or another output
                here.rmdir()


def _holds(path: Path, blob: ListedBlob) -> bool:
    """Whether ``path`` is a regular file with ``blob``'s bytes (its size, then its MD5;
    a blob with no MD5 is never taken as held)."""
    if blob.md5 is None:
        return False
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size != blob.size:
            return False
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "md5").digest() == blob.md5
    except OSError:
        return False


def _copy_outputs(
    copier: _RunCopier,
    output_dir: Path,
    threads: int,
    progress: CopyProgress,
    *,
    stop: threading.Event,
) -> None:
    """Copy every output of the run into ``output_dir``, ``threads`` at a time, but those
    whose file is in place already (see :func:`copy_run_out`); ``stop``: the rest of the
    run's copy failed, so no more downloads start.

    The pool is fed from the listing as downloads finish (at most ``threads`` x
    IN_FLIGHT_PER_THREAD handed over at once), so memory holds the names and a bounded
    window of futures, whatever the run's size. The first failure stops the feed: the files
    not started are dropped, those being written end whole or leave nothing (atomic_file).
    """
    output_dir.mkdir(exist_ok=True)
    # A client per thread, the listing's included (the run's files are being copied on
    # the caller's thread with the caller's client).
    with contextlib.closing(ThreadStores(copier.settings, role="copy_out")) as stores:
        settings, run_id = copier.settings, copier.run_id
        container = settings.outputs_container
        prefix = f"{run_id}/"
        with copier.copying("the list of outputs", "blob"):
            listing = stores.get().list_with_digests(container, prefix)
        # Where each output goes, by the rule the nodes write by: a name that would leave
        # the folder (written into storage by anyone but a node) is left there, and said.
        places = LocalOutputCopies(output_dir, run_id)
        located = []
        for blob in listing:
            path = places.path_of(blob.name)
            if path is None:
                log.warning("output %s is not copied out: its name leaves the folder", blob.name)
            else:
                located.append((blob, path))
        _remove_unlisted(output_dir, {blob.name[len(prefix) :] for blob, _ in located})
        progress.start(run_id, len(located))

        def copy_one(blob: ListedBlob, path: Path, *, checked: bool) -> None:
            with copier.copying(f"output {blob.name[len(prefix) :]}", "blob"):
                if checked or not _holds(path, blob):
                    stores.get().download_to_file(container, blob.name, path)

        window = threads * IN_FLIGHT_PER_THREAD
        pending: set[Future[None]] = set()
        done = 0
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"copy-out-{run_id}")
        try:
            for blob, path in located:
                if stop.is_set():
                    return
                # A small output is checked here: a future per file the nodes already wrote
                # cost more than its check (480 of them: 0.2 s at the end of every run).
                checked = blob.size <= CHECK_HERE_BYTES
                if checked and _holds(path, blob):
                    done += 1
                    progress.advance(done)
                    continue
                while len(pending) >= window:
                    done += _settle(pending, progress, done)
                # Each download in a copy of this context: storage fault lines name the run
                # (batchctl.logs.bound), as the sequential copy's did.
                task = functools.partial(copy_one, blob, path, checked=checked)
                pending.add(pool.submit(contextvars.copy_context().run, task))
            while pending:
                done += _settle(pending, progress, done)
        finally:
            # On a failure or Ctrl-C: drop what has not started, let what has end (whole).
            pool.shutdown(wait=True, cancel_futures=True)
        progress.end(done)


def _settle(pending: set[Future[None]], progress: CopyProgress, done: int) -> int:
    """Wait for some of ``pending`` to end (or for the next progress line to be due), raise
    the first failure among them, remove them from ``pending``; returns how many ended."""
    # The timeout lets a line appear while nothing finishes (a throttling spell), so a
    # stalled copy says so instead of going quiet.
    finished, _ = wait(pending, timeout=progress.every_s, return_when=FIRST_COMPLETED)
    pending.difference_update(finished)
    for future in finished:
        future.result()  # a RunCopyError from copy_one
    progress.advance(done + len(finished))
    return len(finished)


class _RunCopier:
    """Turns what goes wrong while copying one piece of a run into a :class:`RunCopyError`."""

    def __init__(self, settings: ControllerSettings, run_id: str, run_dir: Path) -> None:
        self.settings = settings
        self.run_id = run_id
        self.run_dir = run_dir

    @contextlib.contextmanager
    def copying(self, what: str, package: Package) -> Iterator[None]:
        try:
            yield
        except AzureError as error:
            status = getattr(error, "status_code", None)
            retried = status is None or is_retryable_status(status)
            waited = retry_bounds(package, "copy_out").budget_s
            raise RunCopyError(
                self._line(
                    f"could not copy {what} out of storage: {describe_storage_error(error)}"
                    + (f" (still failing after {waited:g} s of retries)" if retried else "")
                )
            ) from error
        except OSError as error:
            raise RunCopyError(
                self._line(f"could not write {what} into {self.run_dir}: {error}")
            ) from error

    def _line(self, problem: str) -> str:
        account = self.settings.blob_url
        where = (
            f"{account}/{self.settings.runs_container}/{self.run_id}/ and "
            f"{account}/{self.settings.outputs_container}/{self.run_id}/"
        )
        line = f"run {self.run_id}: {problem}; the run's results stay in storage ({where})"
        return " ".join(line.split())
