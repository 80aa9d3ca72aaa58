"""The local session's composition root: storage, settings, compute and services for local runs.

A session is either the storage that ``BATCHCTL_*`` points at (read once, here) or a private
Azurite started for it; its compute backend is worker processes on this machine. It builds
the services explicitly and hands them to whoever drives runs in it (``batchctl run``,
``trial``, ``watch``, ``serve``, the benchmarks, the tests): nothing is patched into
``os.environ`` and no cache is cleared, so a session never leaks into another.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from batchctl.activity_names import CANCEL_EVENT
from batchctl.compute.local import LocalBackend
from batchctl.contracts import RunOptions, RunPhase, RunReport, RunRequest, RunState
from batchctl.services import Services, build_services
from batchctl.settings import ENV_PREFIX, ControllerSettings, StorageSettings

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_RUN_FAILED = 2


@dataclass
class LocalRunResult:
    report: RunReport
    report_path: Path
    output_dir: Path

    @property
    def exit_code(self) -> int:
        if self.report.phase is not RunPhase.COMPLETED:
            return EXIT_RUN_FAILED
        if self.report.failed or self.report.invalid or self.report.not_run:
            return EXIT_ITEMS_FAILED
        return EXIT_OK


@contextlib.contextmanager
def local_storage() -> Iterator[StorageSettings]:
    """The storage that BATCHCTL_* points at (read once, here), or a private Azurite."""
    if os.environ.get(f"{ENV_PREFIX}BLOB_URL"):
        yield StorageSettings()  # fields from the environment
        return
    from batchctl.local.azurite import azurite

    with azurite() as instance:
        yield StorageSettings(
            storage_auth="azurite",
            blob_url=instance.blob_url,
            queue_url=instance.queue_url,
            table_url=instance.table_url,
        )


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
    *, media_root: Path, nodes: int, log_dir: Path, storage: StorageSettings | None = None
) -> Iterator[Services]:
    """The services of a local session, for as long as the block lasts (then closed).

    ``storage`` reuses storage that is already running (``batchctl serve`` keeps one Azurite
    for many runs); by default the session gets :func:`local_storage`.
    """
    with contextlib.ExitStack() as stack:
        if storage is None:
            storage = stack.enter_context(local_storage())
        settings = local_settings(storage, media_root=media_root, nodes=nodes, log_dir=log_dir)
        backend = LocalBackend(settings, log_dir=log_dir, nodes=nodes)
        services = build_services(settings, backend)
        stack.callback(services.close)
        yield services


def make_driver(
    services: Services, run_id: str, *, on_status: Callable[[Any], None] | None = None
) -> Any:
    """A local driver for one run: the real orchestrator, the activities bound to ``services``."""
    from activities import make_activities
    from batchctl.local.driver import LocalDriver
    from orchestrators.run import run_orchestrator

    return LocalDriver(
        run_orchestrator, make_activities(lambda: services), on_status=on_status, instance_id=run_id
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
    """Run the orchestrator for a manifest already in blob storage, then copy results out.

    ``manifest_label`` is the manifest as the user named it (a local path), which the report
    shows instead of the staging blob."""
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
    report_path, output_dir = controller.copy_run_out(services, run_id, out_dir / run_id)
    return LocalRunResult(report=report, report_path=report_path, output_dir=output_dir)


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
) -> LocalRunResult:
    """Run one manifest file end to end on this machine and copy the report and outputs out.

    Rows name videos relative to ``media_root`` (default: the manifest's folder). The report
    names the manifest as ``manifest_label`` (default: its resolved path) and its parent run
    (``batchctl retry``)."""
    from batchctl.local.staging import stage_local_manifest

    manifest = manifest.resolve()
    root = (media_root or manifest.parent).resolve()
    log_dir = out_dir / run_id / "logs"
    with local_session(media_root=root, nodes=nodes, log_dir=log_dir) as services:
        manifest_blob = stage_local_manifest(services.settings, manifest, run_id, media_root=root)
        return drive_run(
            services,
            run_id,
            manifest_blob,
            options,
            out_dir=out_dir,
            on_status=on_status,
            manifest_label=manifest_label or str(manifest),
            parent_run_id=parent_run_id,
        )


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
