"""The local session's composition root: storage, settings, compute and services for local runs.

A session is either the storage that ``BATCHCTL_*`` points at (read once, here) or a private
Azurite started for it; its compute backend is worker processes on this machine. It builds
the services explicitly and hands them to whoever drives runs in it (``batchctl run``,
``trial``, ``watch``, ``serve``, the benchmarks, the tests): nothing is patched into
``os.environ`` and no cache is cleared, so a session never leaks into another.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ResourceNotFoundError

from batchctl.activity_names import CANCEL_EVENT
from batchctl.compute.local import LocalBackend, LocalFiles, StandbyWorkers
from batchctl.contracts import RunOptions, RunPhase, RunReport, RunRequest, RunState
from batchctl.local.runfolder import RunRecorder
from batchctl.logs import bound
from batchctl.settings import ENV_PREFIX, ControllerSettings, StorageSettings

# The controller imports the activities' world (only when copying out), and the storage
# clients (azure-storage-blob, aiohttp: 0.2 s of imports) load when the session starts,
# after a local run's standby workers have started building its model.
if TYPE_CHECKING:
    from batchctl.controller import CopyProgress
    from batchctl.services import Services

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_RUN_FAILED = 2


@dataclass
class LocalRunResult:
    report: RunReport
    report_path: Path
    output_dir: Path
    # Where the outputs are when they were left in storage (``copy_outputs=False``): the URL
    # of their prefix; ``output_dir`` is then not created.
    outputs_in_storage: str | None = None

    @property
    def exit_code(self) -> int:
        if self.report.phase is not RunPhase.COMPLETED:
            return EXIT_RUN_FAILED
        if self.report.failed or self.report.invalid or self.report.not_run:
            return EXIT_ITEMS_FAILED
        return EXIT_OK


def storage_from_environment() -> bool:
    """True when BATCHCTL_* variables point local runs at storage of their own."""
    return bool(os.environ.get(f"{ENV_PREFIX}BLOB_URL"))


@contextlib.contextmanager
def local_storage(
    persist_dir: Path | None = None,
    ports: tuple[int, int, int] | None = None,
    end: StorageEnd | None = None,
) -> Iterator[StorageSettings]:
    """The storage that BATCHCTL_* points at (read once, here), or a private Azurite
    (persisted under ``persist_dir`` when given, else in memory; on ``ports`` when given),
    stopped as ``end`` says when the block ends (saved, by default)."""
    if storage_from_environment():
        yield StorageSettings()  # fields from the environment
        return
    from batchctl.local.azurite import azurite

    with azurite(persist_dir=persist_dir, ports=ports) as instance:
        try:
            yield instance.storage_settings()
        finally:
            if end is not None and end.discard:
                instance.discard()


@dataclass
class StorageEnd:
    """How a session's private Azurite ends: saved for a later ``batchctl resume`` (the
    default), or discarded at once when the run is done with it (its results copied out,
    its storage about to be deleted): the save would be written only to be deleted."""

    discard: bool = False


def local_settings(
    storage: StorageSettings, *, media_root: Path, nodes: int, log_dir: Path
) -> ControllerSettings:
    """The controller's settings for a local session over ``storage``."""
    return ControllerSettings(
        **storage.model_dump(),
        compute_backend="local",
        local_media_root=str(media_root.resolve()),
        local_nodes=nodes,
        local_log_dir=str(log_dir.resolve()),
    )


@contextlib.contextmanager
def local_session(
    *,
    media_root: Path,
    nodes: int,
    log_dir: Path,
    storage: StorageSettings | None = None,
    persist_dir: Path | None = None,
    ports: tuple[int, int, int] | None = None,
    standby: StandbyWorkers | None = None,
    end: StorageEnd | None = None,
    outputs_dir: Path | None = None,
    index_outputs: bool = True,
) -> Iterator[Services]:
    """The services of a local session, for as long as the block lasts (then closed).

    ``storage`` reuses storage that is already running (``batchctl serve`` keeps one Azurite
    for many runs); by default the session gets :func:`local_storage` (``persist_dir``
    and ``ports``: see there). ``standby``: workers started ahead of the run, which the
    session's provisioning takes before it starts new ones (stopped when the block ends, if
    never taken). ``outputs_dir``: the one run's outputs folder, which its nodes write
    beside storage (``batchctl run``); ``index_outputs``: False for storage that no later
    run reads (see :class:`~batchctl.compute.local.LocalFiles`).
    """
    with contextlib.ExitStack() as stack:
        if standby is not None:
            stack.callback(standby.close)
        if storage is None:
            storage = stack.enter_context(local_storage(persist_dir, ports, end))
        settings = local_settings(storage, media_root=media_root, nodes=nodes, log_dir=log_dir)
        files = LocalFiles(
            media_root=settings.local_media_root,
            outputs_dir=outputs_dir,
            index_outputs=index_outputs,
        )
        backend = LocalBackend(settings, log_dir=log_dir, nodes=nodes, standby=standby, files=files)
        from batchctl.services import build_services

        services = build_services(settings, backend)
        stack.callback(services.close)
        yield services


def make_driver(
    services: Services,
    run_id: str,
    *,
    on_status: Callable[[Any], None] | None = None,
    on_generation: Callable[[Any], None] | None = None,
) -> Any:
    """A local driver for one run: the real orchestrator, the activities bound to ``services``."""
    from activities import make_activities
    from batchctl.local.driver import LocalDriver
    from orchestrators.run import run_orchestrator

    return LocalDriver(
        run_orchestrator,
        make_activities(lambda: services),
        on_status=on_status,
        instance_id=run_id,
        on_generation=on_generation,
    )


def drive_run(
    services: Services,
    run_id: str,
    manifest_blob: str,
    options: RunOptions,
    *,
    out_dir: Path,
    on_status: Callable[[Any], None] | None = None,
    manifest_label: str | None = None,
    parent_run_id: str | None = None,
) -> LocalRunResult:
    """Run the orchestrator in this thread for a manifest already in blob storage, then copy
    results out. For the commands that drive a run without the app (trial, watch, the
    benchmarks); ``batchctl run`` goes through the app (:func:`run_locally`).

    ``manifest_label`` is the manifest as the user named it (a local path), which the report
    shows instead of the manifest's staging blob."""
    from batchctl import controller

    controller.check_run_id_free(services, run_id)
    request = RunRequest(
        run_id=run_id,
        manifest=manifest_blob,
        options=options,
        manifest_label=manifest_label,
        parent_run_id=parent_run_id,
    )
    driver = make_driver(services, run_id, on_status=on_status)
    with cancel_on_interrupt(driver, services):
        output = driver.run(RunState(run_id=run_id, request=request).model_dump(mode="json"))
    report = RunReport.model_validate(output)
    return copy_out(services, report, out_dir / run_id, None)


def copy_out(
    services: Services,
    report: RunReport,
    run_dir: Path,
    recorder: RunRecorder | None,
    *,
    copy_outputs: bool = True,
    copy_progress: CopyProgress | None = None,
) -> LocalRunResult:
    """Copy a finished run's report and outputs into ``run_dir``; the record says finished.

    Without ``copy_outputs`` the outputs stay in storage (the result says where) and the
    rest is copied; ``copy_progress``: the copy-out's progress lines (default: stderr)."""
    from batchctl import controller

    report_path, output_dir = controller.copy_run_out(
        services,
        report.run_id,
        run_dir,
        copy_outputs=copy_outputs,
        progress=copy_progress,
    )
    if recorder is not None:
        recorder.finished(report.phase.value)
    left = None if copy_outputs else controller.outputs_location(services.settings, report.run_id)
    return LocalRunResult(
        report=report, report_path=report_path, output_dir=output_dir, outputs_in_storage=left
    )


# Why --no-copy needs storage of the user's own (batchctl run and resume say it, exit 3).
NO_COPY_NEEDS_OWN_STORAGE = (
    "--no-copy leaves the outputs in storage, but this run's storage is its private Azurite, "
    "which is removed once the run ends; point BATCHCTL_BLOB_URL, BATCHCTL_QUEUE_URL and "
    "BATCHCTL_TABLE_URL at storage of your own (an Azurite you run, or an account) to keep "
    "them there"
)


class LocalRunError(RuntimeError):
    """A local run's orchestration ended without a report (its reason is the message)."""


def follow_through_app(
    services: Services,
    run_id: str,
    run_dir: Path,
    *,
    recorder: RunRecorder,
    on_status: Callable[[Any], None] | None,
    start: Callable[[Any], None],
    copy_outputs: bool = True,
    copy_progress: CopyProgress | None = None,
) -> LocalRunResult:
    """Serve the app on a loopback port, ``start`` the run through it (given the app), follow
    it through ``GET /api/runs/{id}`` (Ctrl-C: ``POST .../cancel``), then copy it out.

    The app keeps each generation's input in the run's folder (``recorder``), and leaves the
    copy-out to this client, as a deployed app leaves it to ``report``."""
    from batchctl import controller
    from batchctl.local.app import follow_with_cancel, local_app, private_key

    # The outputs need no copying while the run goes on: its nodes write each one into the
    # run's folder as they upload it (local_session's outputs_dir), so the copy-out at the
    # end checks them and downloads none.
    with local_app(
        services,
        out_dir=run_dir.parent,
        key=private_key(),
        on_generation=recorder.generation,
        copy_out=False,
    ) as app:
        start(app)
        renderer = _RendererImport()

        def on_view(view: dict[str, Any]) -> None:
            if renderer_import_due(view):
                renderer.start()
            if on_status is not None:
                on_status(view)

        instance = app.durable.instance(run_id)
        status = follow_with_cancel(
            app.client(), run_id, on_view, ended=instance.ended if instance else None
        )
    try:
        with bound(run_id=run_id):
            report = RunReport.model_validate_json(
                services.store.download_bytes(
                    services.settings.runs_container, controller.report_blob_name(run_id)
                )
            )
    except (ResourceNotFoundError, ValueError) as error:  # no report, or not a report
        raise LocalRunError(
            f"run {run_id} ended {status.runtime_status} without a report: "
            f"{status.message or error}"
        ) from None
    recorder.report_written()
    return copy_out(
        services,
        report,
        run_dir,
        recorder,
        copy_outputs=copy_outputs,
        copy_progress=copy_progress,
    )


def renderer_import_due(view: Mapping[str, Any]) -> bool:
    """Whether to import the report's renderer now (pure): once the nodes have finished an
    item, so their model is built. Its 0.4 s of imports (matplotlib) then run while the
    nodes work rather than at the run's end, on the way to the report, and not while the
    nodes import TensorFlow and build their model, which a short run waits for."""
    done = sum(view.get(key) or 0 for key in ("succeeded", "failed"))
    return done > 0 or bool(view.get("finished"))


class _RendererImport:
    """The report's renderer imported once, on a thread of its own."""

    def __init__(self) -> None:
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            threading.Thread(target=self._run, name="import-report", daemon=True).start()

    @staticmethod
    def _run() -> None:
        with contextlib.suppress(ImportError):  # a core-only install writes report.json alone
            importlib.import_module("batchctl.reporting.html")


def run_locally(
    manifest: Path,
    options: RunOptions,
    *,
    run_id: str,
    nodes: int,
    out_dir: Path,
    on_status: Callable[[Any], None] | None = None,
    manifest_label: str | None = None,
    media_root: Path | None = None,
    parent_run_id: str | None = None,
    copy_outputs: bool = True,
    copy_progress: CopyProgress | None = None,
) -> LocalRunResult:
    """Run one manifest file end to end on this machine and copy the report and outputs out.

    The app runs in this process (:mod:`batchctl.local.app`) and the run goes through its
    HTTP API, as ``submit`` does against a deployed app. Rows name videos relative to
    ``media_root`` (default: the manifest's folder). The report names the manifest as
    ``manifest_label`` (default: its resolved path) and its parent run (``batchctl
    retry``). The run's folder keeps what ``batchctl resume`` needs should this process
    die (batchctl.local.runfolder).

    Without ``copy_outputs`` the outputs stay in storage, which must then be storage of the
    user's own (``BATCHCTL_*``): a private Azurite's is removed at the end (ValueError,
    :data:`NO_COPY_NEEDS_OWN_STORAGE`). ``copy_progress``: see :func:`copy_out`."""
    from batchctl.local.runfolder import PRIVATE_STORAGE, RecordTemplate, RunRecorder, storage_dir

    manifest = manifest.resolve()
    root = (media_root or manifest.parent).resolve()
    run_dir = out_dir / run_id
    private = not storage_from_environment()
    if private and not copy_outputs:
        raise ValueError(NO_COPY_NEEDS_OWN_STORAGE)
    claim_run_folder(out_dir, run_id)
    persist_dir = storage_dir(run_dir) if private else None
    log_dir = run_dir / "logs"
    # The workers import TensorFlow and build the model while this process imports the
    # storage clients and the controller and Azurite starts: the first
    # thing once the run's folder is its own (tests/test_start_order.py holds the order).
    standby = standby_workers(run_id, options, nodes, log_dir)
    try:
        from batchctl import controller
        from batchctl.artifacts import publish_own_work
        from batchctl.controller.names import OUTPUTS_DIR_NAME
        from batchctl.local.staging import stage_local_manifest
    except BaseException:
        if standby is not None:
            standby.close()
        raise
    end = StorageEnd()
    with (
        bound(run_id=run_id),  # every storage fault line of the client's part names the run
        local_session(
            media_root=root,
            nodes=nodes,
            log_dir=log_dir,
            persist_dir=persist_dir,
            standby=standby,
            end=end,
            # The nodes write the outputs into the run's folder themselves; a private
            # Azurite is removed at the end, so an index in it would go unread.
            outputs_dir=run_dir / OUTPUTS_DIR_NAME if copy_outputs else None,
            index_outputs=not private,
        ) as services,
    ):
        controller.check_run_id_free(services, run_id)
        # The client's part, as `submit` uploads a manifest: the manifest, and the user's
        # own model file and code package (the nodes read only these copies). The videos
        # stay where they are: local workers read them in place.
        manifest_blob = stage_local_manifest(services.settings, manifest, run_id)
        options = publish_own_work(options, services.store, services.settings.media_container)
        recorder = RunRecorder(
            run_dir,
            template=RecordTemplate(
                run_id=run_id,
                nodes=nodes,
                media_root=root,
                storage=PRIVATE_STORAGE if private else services.settings.blob_url,
                ports=storage_ports(services.settings) if private else None,
            ),
        )

        def start(app: Any) -> None:
            app.client().start_run(
                manifest_blob,
                options,
                run_id,
                parent_run_id=parent_run_id,
                manifest_label=manifest_label or str(manifest),
            )

        result = follow_through_app(
            services,
            run_id,
            run_dir,
            recorder=recorder,
            on_status=on_status,
            start=start,
            copy_outputs=copy_outputs,
            copy_progress=copy_progress,
        )
        # Copied out and about to be released: nothing will read this storage again.
        end.discard = copy_outputs
    if copy_outputs:  # outputs left in storage keep their storage (never private: see above)
        release_storage(persist_dir)
    return result


def standby_workers(
    run_id: str, options: RunOptions, nodes: int, log_dir: Path
) -> StandbyWorkers | None:
    """Workers for the nodes a run will most likely get, started now (None when its nodes
    run several processes each: they start as they always do)."""
    if options.processes_per_node != 1:
        return None
    return StandbyWorkers(run_id, options, max(1, min(nodes, options.max_nodes)), log_dir=log_dir)


def storage_ports(settings: StorageSettings) -> tuple[int, int, int]:
    """The (blob, queue, table) ports of local storage's endpoints."""
    from urllib.parse import urlsplit

    blob, queue, table = (
        urlsplit(url).port for url in (settings.blob_url, settings.queue_url, settings.table_url)
    )
    if blob is None or queue is None or table is None:
        raise ValueError(f"local storage without ports: {settings.blob_url}")
    return blob, queue, table


def claim_run_folder(out_dir: Path, run_id: str) -> None:
    """Say which runs under ``out_dir`` died unfinished, and refuse a run folder in use.

    A folder whose run has a controller record is that run's (running, finished, or
    waiting for ``batchctl resume``): RunFolderError. Storage left by a start that died
    before its first record holds nothing a resume could use: it is cleared.
    """
    from batchctl.local.runfolder import (
        RunFolderError,
        controller_alive,
        interrupted_note,
        interrupted_runs,
        read_record,
        storage_dir,
    )

    for folder, dead in interrupted_runs(out_dir):
        if dead.run_id != run_id:
            print(interrupted_note(folder, dead), file=sys.stderr)
    run_dir = out_dir / run_id
    record = read_record(run_dir)
    if record is not None:
        if record.finished_at is not None:
            state = f"finished ({record.outcome})"
            advice = "choose another --run-id or --out"
        elif controller_alive(record):
            state = f"is running (controller pid {record.pid})"
            advice = "wait for it, or choose another --run-id"
        else:
            state = "did not finish: its controller died"
            advice = f"`batchctl resume {run_dir}` continues it"
        raise RunFolderError(f"run {run_id} in {run_dir} {state}; {advice}")
    shutil.rmtree(storage_dir(run_dir), ignore_errors=True)


def release_storage(persist_dir: Path | None) -> None:
    """Remove a finished run's persisted storage: its results are copied out, and it holds a
    second copy of every output."""
    if persist_dir is not None:
        shutil.rmtree(persist_dir, ignore_errors=True)


@contextlib.contextmanager
def cancel_on_interrupt(driver: Any, services: Services) -> Iterator[None]:
    """First Ctrl-C cancels the run cleanly (teardown still runs); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = {"count": 0}

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        pressed["count"] += 1
        if pressed["count"] > 1:
            raise KeyboardInterrupt
        print("\ncancelling (Ctrl-C again to abort without teardown)", file=sys.stderr)
        driver.raise_event(CANCEL_EVENT)
        # The durable flag as well, as the app's cancel API writes it: an event raised while
        # the orchestration continues as new is discarded (here as in Azure); the flag is not.
        # In a thread: a signal handler must not block on storage.
        threading.Thread(
            target=_set_cancel_flag,
            args=(services, driver.instance_id),
            name="cancel-flag",
            daemon=True,
        ).start()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _set_cancel_flag(services: Services, run_id: str) -> None:
    from batchctl.controller import request_cancel

    try:
        request_cancel(services, run_id)
    except Exception as error:  # the event was raised too; say why the flag is missing
        print(f"could not write the cancel flag: {error}", file=sys.stderr)
