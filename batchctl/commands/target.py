"""Where a run runs: one factory, two targets, one way to drive a run through either.

Local or remote, a command gets a target for an address and calls the app's HTTP API through
it, as Ray's job CLI is "a client for an address" whether the cluster is local or remote:

- :class:`AppTarget`: a deployed app (``--app``, BATCHCTL_APP_URL or azd's environment file;
  its key from BATCHCTL_FUNCTION_KEY). The manifest and the run's own work are uploaded to
  the app's storage, then the run is started, followed and its report read through the app.
- :class:`LocalTarget`: the app on this machine (batchctl.local.app), started in-process for
  the run over its own storage with worker processes as nodes; the run is started, followed
  and cancelled through the same HTTP API with the same client, and its report and outputs
  are copied into the run's folder (batchctl.local.session.run_locally).

Both are driven alike: ``execute(RunSpec)`` then ``summarize(Outcome)``. What differs is only
what must: where the manifest's media go, what Ctrl-C means while following (a local app
ends with this process, so the first Ctrl-C cancels the run; a deployed run goes on, so
following detaches), and where the results land. This is the one command module that
imports batchctl.local (tests/test_one_door.py holds that), so the commands built on it
(run, submit, trial, retry, status, cancel, report) have no local/app fork of their own.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from batchctl.client import (
    APP_URL_ENV,
    AppClient,
    AppError,
    UnavailableError,
    client_storage_settings,
    storage_problem,
)
from batchctl.commands.options import check_local_work
from batchctl.commands.validate import BadInputError
from batchctl.contracts import RunOptions, RunPhase, RunReport
from batchctl.local.session import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    NO_COPY_NEEDS_OWN_STORAGE,
    LocalRunResult,
    run_locally,
    storage_from_environment,
)
from batchctl.progressview import LiveProgress
from batchctl.reporting.artifacts import FAILED_CSV_NAME
from batchctl.runstatus import RunStatus
from batchctl.settings import StorageSettings

if TYPE_CHECKING:  # the controller imports the activities' world: only when copying out
    from batchctl.controller import CopyProgress

__all__ = [
    "EXIT_ITEMS_FAILED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "STAGING_PREFIX",
    "AppTarget",
    "LocalRunResult",
    "LocalTarget",
    "Outcome",
    "RunSpec",
    "Target",
    "connect",
    "open_app",
    "open_local",
    "open_target",
    "runs_here",
]

# Under the media container: the manifests container is the blob trigger's, and a manifest
# put there would start a second run (with default options) beside the one started here.
STAGING_PREFIX = "_manifests"
REPORT_NAME = "report.json"
# A trial's --poll and --idle-exit on each target: a local trial is a few rows, ended soon;
# on the app the run's own defaults apply (polling a deployed app every second costs).
LOCAL_TRIAL_TIMING = (1.0, 3.0)
APP_TRIAL_TIMING = (RunOptions().poll_interval_s, RunOptions().idle_exit_s)


@dataclass(frozen=True)
class RunSpec:
    """What to run, the same whatever the target."""

    # A CSV on this machine (staged where the app reads manifests), or a blob already in the
    # app's storage (``container/name``; only a deployed app has storage to name it in).
    manifest: Path | str
    options: RunOptions
    run_id: str
    # The manifest as the user named it, shown by the report (default: the file's path).
    manifest_label: str | None = None
    # Where the rows' relative video paths lead (default: the manifest's folder).
    media_root: Path | None = None
    parent_run_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How a run left the command that drove it."""

    run_id: str
    # Where a deployed app read the manifest (a blob path); empty for a run here, whose
    # staged copy lives and goes with its storage.
    manifest: str = ""
    # The app's last status of the run; None when not followed (``follow=False``) or detached.
    status: RunStatus | None = None
    detached: bool = False
    # Items per second while followed, from the live view (batchctl.throughput).
    rate: float | None = None
    # A local run's report and where its results were copied.
    local: LocalRunResult | None = None

    @property
    def ended_well(self) -> bool:
        """The run reached its end with a report (whatever its items did)."""
        if self.local is not None:
            return self.local.report.phase is RunPhase.COMPLETED
        return self.status is not None and self.status.ended_well


class Target(Protocol):
    """A place runs go: the local app on this machine, or a deployed app."""

    # For messages: "this machine", or the app's URL.
    where: str
    # A trial's (--poll, --idle-exit) when not given.
    trial_timing: tuple[float, float]

    def check(self, options: RunOptions) -> None:
        """BadInputError when a run of ``options`` cannot work here, before anything is
        staged (``execute`` checks too)."""
        ...

    def execute(self, spec: RunSpec, *, progress: LiveProgress, follow: bool = True) -> Outcome:
        """Stage the manifest, start the run through the app's API and (``follow``) follow it
        to its end on ``progress``."""
        ...

    def fleet(
        self, options: RunOptions, *, nodes: int, vm_size: str, low_priority: bool
    ) -> RunOptions:
        """``options`` for a small run of ``nodes`` nodes of ``vm_size`` (a trial's)."""
        ...

    def describe(self, options: RunOptions) -> str:
        """Where a run of ``options`` runs, for a person."""
        ...

    def measured_on(self, options: RunOptions) -> str:
        """What a trial's figures measured, for the plan's note ("on this machine")."""
        ...

    def fetch_report(self, outcome: Outcome, out_dir: Path) -> RunReport:
        """The report of a run that ended; AppError when it has none."""
        ...

    def fetch_parent(self, run_id: str, scratch: Path) -> tuple[RunReport, Path]:
        """A finished run's report and its failed.csv (downloaded into ``scratch``)."""
        ...

    def summarize(
        self, outcome: Outcome, *, as_json: bool, extra: Mapping[str, Any] | None = None
    ) -> int:
        """Say how the run ended (stderr, and one JSON line with ``as_json``); the exit code."""
        ...


# -- the factory ------------------------------------------------------------------------------
def runs_here(app: str | None, *, local: bool, environment: Mapping[str, str]) -> bool:
    """Whether a command that can run either way runs on this machine: ``--local``, or no
    app named by ``--app`` or BATCHCTL_APP_URL. Pure."""
    return local or not (app or environment.get(APP_URL_ENV))


def open_target(
    app: str | None,
    *,
    local: bool,
    nodes: int,
    out_dir: Path,
    interval: float,
    blob_url: str | None = None,
    environment: Mapping[str, str] | None = None,
) -> Target:
    """The target of a command that runs either way (``trial``, ``retry``): this machine's
    app when :func:`runs_here`, else the deployed app."""
    if runs_here(app, local=local, environment=os.environ if environment is None else environment):
        return open_local(nodes=nodes, out_dir=out_dir)
    return open_app(app, interval=interval, blob_url=blob_url)


def open_local(
    *,
    nodes: int,
    out_dir: Path,
    copy_outputs: bool = True,
) -> LocalTarget:
    """The app on this machine, with ``nodes`` worker processes; runs' folders under
    ``out_dir``. BadInputError for --no-copy on a private Azurite (removed at the run's end)."""
    if not copy_outputs and not storage_from_environment():
        raise BadInputError(NO_COPY_NEEDS_OWN_STORAGE, "--no-copy")
    return LocalTarget(nodes=nodes, out_dir=out_dir, copy_outputs=copy_outputs)


def open_app(app: str | None, *, interval: float, blob_url: str | None = None) -> AppTarget:
    """The deployed app at ``app`` (or BATCHCTL_APP_URL, or azd's file); AppError without one.
    Its storage (for uploads and reports) is resolved when first needed."""
    return AppTarget(connect(app), interval=interval, blob_url=blob_url)


def connect(app: str | None) -> AppClient:
    """The typed client of the app at ``app`` (or BATCHCTL_APP_URL, or azd's file): a deployed
    app, or ``batchctl serve`` on this machine. AppError when no app is named."""
    return AppClient.from_environment(app)


# -- a deployed app -----------------------------------------------------------------------------
class AppTarget:
    """A deployed app: storage for uploads and reports, its HTTP API for the rest."""

    trial_timing = APP_TRIAL_TIMING

    def __init__(self, client: AppClient, *, interval: float, blob_url: str | None) -> None:
        self.client = client
        self.where = client.app_url
        self._interval = interval
        self._blob_url = blob_url
        self._settings: StorageSettings | None = None

    def storage(self) -> StorageSettings:
        if self._settings is None:
            self._settings = client_storage_settings(self._blob_url)
        return self._settings

    def fleet(
        self, options: RunOptions, *, nodes: int, vm_size: str, low_priority: bool
    ) -> RunOptions:
        return _with_fleet(options, max_nodes=nodes, vm_size=vm_size, low_priority=low_priority)

    def describe(self, options: RunOptions) -> str:
        nodes = f"{options.max_nodes} node{'s' if options.max_nodes > 1 else ''}"
        return f"one cluster of at most {nodes} ({options.vm_size}) at {self.where}"

    def measured_on(self, options: RunOptions) -> str:
        return f"on the app's {options.vm_size} nodes"

    def check(self, options: RunOptions) -> None:
        # The files and task modules live in the node image or travel by content; what can
        # be checked from here is checked as they are published (publish_work).
        return

    def execute(self, spec: RunSpec, *, progress: LiveProgress, follow: bool = True) -> Outcome:
        from batchctl.artifacts import has_local_work

        options = spec.options
        if has_local_work(options):
            # The run's own model file and code folder travel by content, named by reference.
            options = publish_work(options, self.storage())
        if isinstance(spec.manifest, Path):
            container = self.storage().media_container
            name = f"{STAGING_PREFIX}/{spec.run_id}/{safe_blob_name(spec.manifest.name)}"
            upload_manifest(spec.manifest, container, name, self._blob_url)
            manifest = f"{container}/{name}"
            print(f"uploaded {spec.manifest} to {manifest}", file=sys.stderr)
        else:
            manifest = spec.manifest
        try:
            started = self.client.start_run(
                manifest,
                options,
                spec.run_id,
                parent_run_id=spec.parent_run_id,
                manifest_label=spec.manifest_label,
            )
        except UnavailableError as error:
            # No answer is not "not started": the app may have started it. The id was chosen
            # here, so the user can look, and a second start with the same id is refused (409).
            raise UnavailableError(
                f"{error}; run {spec.run_id} may have started anyway: check with "
                f"`batchctl status {spec.run_id}` before submitting again"
            ) from error
        print(f"started run {started.run_id} on {self.where}", file=sys.stderr)
        if not follow:
            return Outcome(started.run_id, manifest)
        from batchctl.commands.status import follow_run

        try:
            status = follow_run(
                self.client,
                started.run_id,
                interval=self._interval,
                on_status=progress.update,
                status_url=started.status_url,
            )
        except KeyboardInterrupt:
            # The run goes on without this command: stop following, never cancel.
            return Outcome(started.run_id, manifest, detached=True)
        return Outcome(started.run_id, manifest, status, rate=progress.rate)

    def fetch_report(self, outcome: Outcome, out_dir: Path) -> RunReport:
        """Downloads report.json (and report.html) into ``out_dir/RUN_ID``, as a local run's
        folder holds them."""
        from batchctl.commands.report import download_report

        status = outcome.status
        if status is None or not status.report:
            raise AppError(f"the app gave no report link for run {outcome.run_id}")
        json_path, _ = download_report(status.report, outcome.run_id, out_dir / outcome.run_id)
        try:
            return RunReport.model_validate_json(json_path.read_bytes())
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise AppError(f"{json_path}: {error}") from None

    def fetch_parent(self, run_id: str, scratch: Path) -> tuple[RunReport, Path]:
        from batchctl.commands.report import download_report, split_report_link

        status = self.client.get_status(run_id)
        if not status.finished:
            raise AppError(f"run {run_id} is still going: retry it once it has ended")
        if not status.report:
            raise AppError(f"run {run_id} has no report to retry from")
        account, container, report_name = split_report_link(status.report, run_id)
        report_path, _ = download_report(status.report, run_id, scratch)
        try:
            parent = RunReport.model_validate_json(report_path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise AppError(f"the report of run {run_id} is not a run report: {error}") from None
        failed = scratch / FAILED_CSV_NAME
        _download(
            account, container, report_name.removesuffix(REPORT_NAME) + FAILED_CSV_NAME, failed
        )
        return parent, failed

    def summarize(
        self, outcome: Outcome, *, as_json: bool, extra: Mapping[str, Any] | None = None
    ) -> int:
        from batchctl.commands.status import detach, report_outcome

        more = {"manifest": outcome.manifest, **(extra or {})}
        if outcome.detached:
            return detach(outcome.run_id, None, as_json=as_json)
        if outcome.status is None:
            print(f"follow it: batchctl status {outcome.run_id} --follow", file=sys.stderr)
            if as_json:
                print(json.dumps({"run_id": outcome.run_id, **more, "exit_code": EXIT_OK}))
            return EXIT_OK
        return report_outcome(outcome.status, as_json=as_json, rate=outcome.rate, extra=more)


# -- the app on this machine --------------------------------------------------------------------
class LocalTarget:
    """The app started on this machine for each run (batchctl.local.session.run_locally):
    private storage unless BATCHCTL_* points at some, worker processes as nodes."""

    where = "this machine"
    trial_timing = LOCAL_TRIAL_TIMING

    def __init__(self, *, nodes: int, out_dir: Path, copy_outputs: bool) -> None:
        self.nodes = nodes
        self.out_dir = out_dir
        self.copy_outputs = copy_outputs

    def fleet(
        self, options: RunOptions, *, nodes: int, vm_size: str, low_priority: bool
    ) -> RunOptions:
        # Its nodes are this machine's worker processes (``nodes`` at construction): the
        # options' fleet sizes nothing here.
        return options

    def describe(self, options: RunOptions) -> str:
        return f"{self.nodes} local nodes"

    def check(self, options: RunOptions) -> None:
        # Before any worker starts: a model file or a task that does not import here (from
        # --code, when given) would fail every item instead.
        check_local_work(options)

    def measured_on(self, options: RunOptions) -> str:
        return f"on {self.where}"

    def execute(self, spec: RunSpec, *, progress: LiveProgress, follow: bool = True) -> Outcome:
        """Always followed: the app lives only as long as this command. The first Ctrl-C
        cancels the run through the cancel endpoint (its report is still written), a second
        one aborts (the run's folder keeps what ``batchctl resume`` needs)."""
        if not isinstance(spec.manifest, Path):
            raise BadInputError(
                f"{spec.manifest}: a run on this machine starts from a CSV file here", "manifest"
            )
        self.check(spec.options)
        result = run_locally(
            spec.manifest,
            spec.options,
            run_id=spec.run_id,
            nodes=self.nodes,
            out_dir=self.out_dir,
            on_status=progress.update,
            manifest_label=spec.manifest_label,
            media_root=spec.media_root,
            parent_run_id=spec.parent_run_id,
            copy_outputs=self.copy_outputs,
            copy_progress=copy_progress(progress),
        )
        return Outcome(result.report.run_id, local=result, rate=progress.rate)

    def fetch_report(self, outcome: Outcome, out_dir: Path) -> RunReport:
        # Copied into the run's folder already (a run without one raised LocalRunError).
        if outcome.local is None:
            raise AppError(f"run {outcome.run_id} has no report here")
        return outcome.local.report

    def fetch_parent(self, run_id: str, scratch: Path) -> tuple[RunReport, Path]:
        raise BadInputError(
            f"{run_id} is not a run folder: a run on this machine is named by its folder "
            "(batchctl-output/RUN_ID); a run id names a run of a deployed app (--app)",
            "RUN",
        )

    def summarize(
        self, outcome: Outcome, *, as_json: bool, extra: Mapping[str, Any] | None = None
    ) -> int:
        if outcome.local is None:
            raise AppError(f"run {outcome.run_id} was not followed to its end")
        return print_summary(outcome.local, as_json=as_json, extra=extra)


def copy_progress(progress: LiveProgress) -> CopyProgress:
    """The copy-out's progress lines for a command showing ``progress``: the live panel
    stops (its last frame stays) before the first line, or it would redraw over them."""
    from batchctl.copyprogress import CopyProgress

    return CopyProgress(sys.stderr, before_first=progress.finish)


# -- the local summary --------------------------------------------------------------------------
def print_summary(
    result: LocalRunResult, *, as_json: bool, extra: Mapping[str, Any] | None = None
) -> int:
    """The end of a local run for a person (stderr) and, with ``as_json``, one JSON line;
    returns the run's exit code (``batchctl run``, ``retry`` and ``resume`` alike)."""
    from batchctl.controller import REPORT_HTML_NAME
    from batchctl.progressview import outcome_text
    from batchctl.reporting.artifacts import MANIFEST_ERRORS_NAME

    report = result.report
    outcome = outcome_text(
        report.phase.value,
        total=report.total,
        succeeded=report.succeeded,
        failed=report.failed,
        invalid=report.invalid,
    )
    print(
        f"run {report.run_id}: {outcome}; {report.succeeded} succeeded, "
        f"{report.failed} failed, "
        + (f"{report.skipped} skipped (done before), " if report.skipped else "")
        + f"{report.invalid} invalid rows of {report.total + report.invalid}"
        f"{'; ' + report.message if report.message else ''}",
        file=sys.stderr,
    )
    html = result.report_path.with_name(REPORT_HTML_NAME)
    print(
        f"report: {result.report_path}" + (f" and {html.name} beside it" if html.exists() else ""),
        file=sys.stderr,
    )
    print(f"outputs: {outputs_text(result)}", file=sys.stderr)
    errors_file = result.report_path.with_name(MANIFEST_ERRORS_NAME)
    if report.invalid:
        # Point at the reasons: a count of invalid rows alone leaves the user to go looking.
        where = errors_file if errors_file.exists() else "the run's manifest-errors.jsonl"
        print(f"invalid rows: {report.invalid}, by row and reason in {where}", file=sys.stderr)
    retry_file = result.report_path.with_name(FAILED_CSV_NAME)
    if report.total > report.succeeded and retry_file.exists():
        left = report.total - report.succeeded
        print(f"to retry: {retry_file} ({left} rows that did not succeed)", file=sys.stderr)
    if report.weights:
        # Offline runs fall back to random weights: say so where nobody can miss it.
        print(f"weights: {report.weights}", file=sys.stderr)
    if as_json:
        print(
            json.dumps(
                {
                    **(extra or {}),
                    "run_id": report.run_id,
                    "phase": report.phase.value,
                    "outcome": outcome,
                    "total": report.total,
                    "succeeded": report.succeeded,
                    "failed": report.failed,
                    "invalid": report.invalid,
                    "not_run": report.not_run,
                    "skipped": report.skipped,
                    "parent_run_id": report.parent_run_id,
                    "report": str(result.report_path),
                    "output_prefix": result.outputs_in_storage or str(result.output_dir),
                    "outputs_copied": result.outputs_in_storage is None,
                }
            )
        )
    return result.exit_code


def outputs_text(result: LocalRunResult) -> str:
    """Where the run's outputs are: the local copy, or (--no-copy) their place in storage
    and how to fetch them from there."""
    where = result.outputs_in_storage
    if where is None:
        return str(result.output_dir)
    # The location is BLOB_URL/CONTAINER/RUN_ID/ (batchctl.controller.outputs_location).
    container, run_id = where.rstrip("/").split("/")[-2:]
    return (
        f"left in storage (--no-copy): {where} (container {container}, prefix {run_id}/; "
        f"index.csv lists each item's folder there); fetch them with Azure Storage Explorer "
        f"or `az storage blob download-batch --source {container} --pattern '{run_id}/*' "
        f"--destination DIR` against that account"
    )


def read_run_folder(run_folder: Path) -> tuple[RunReport, Path]:
    """A finished run's report and its failed.csv from its folder (a local run's, as `batchctl
    run` left it); BadInputError when the folder is not a finished run's."""
    report_path = run_folder / REPORT_NAME
    failed = run_folder / FAILED_CSV_NAME
    if not report_path.is_file():
        from batchctl.local.runfolder import RunFolderError, read_record

        try:
            record = read_record(run_folder)
        except RunFolderError:
            record = None
        if record is not None and record.finished_at is None:
            # A run whose controller died (or still runs) has no report yet: resume it.
            raise BadInputError(
                f"run {record.run_id} in {run_folder} has not finished: "
                f"`batchctl resume {run_folder}` continues it (retry takes a finished run)",
                "RUN_FOLDER",
            )
        raise BadInputError(f"{run_folder} holds no {REPORT_NAME}: not a run folder", "RUN_FOLDER")
    try:
        report = RunReport.model_validate(json.loads(report_path.read_text(encoding="utf-8")))
    except ValueError as error:
        raise BadInputError(f"{report_path} is not a run report: {error}", "RUN_FOLDER") from None
    if not failed.is_file():
        raise BadInputError(
            f"{run_folder} holds no {FAILED_CSV_NAME} (its report predates retries, or its "
            "manifest could not be read again)",
            "RUN_FOLDER",
        )
    return report, failed


# -- a deployed app's storage, from this machine ------------------------------------------------
def _with_fleet(
    options: RunOptions, *, max_nodes: int, vm_size: str, low_priority: bool
) -> RunOptions:
    from pydantic import ValidationError

    from batchctl.validation import describe

    values = options.model_dump()
    values.update(max_nodes=max_nodes, vm_size=vm_size, low_priority=low_priority)
    try:
        return RunOptions.model_validate(values)
    except ValidationError as error:
        raise AppError(f"bad run option: {describe(error)}") from None


def publish_work(options: RunOptions, settings: StorageSettings) -> RunOptions:
    """Upload the run's own model file and code folder to the app's storage (by content)
    and name them by reference; AppError for what cannot travel. A custom task with a code
    folder is imported here first, as a local run's is."""
    from batchctl.artifacts import ArtifactError, publish_own_work
    from batchctl.commands.validate import check_local_task
    from batchctl.storage import BlobStore

    try:
        if options.code is not None:
            check_local_task(options.task, options.code)
        store = BlobStore(settings)
        try:
            return publish_own_work(options, store, settings.media_container)
        finally:
            store.close()
    except (ArtifactError, BadInputError) as error:
        raise AppError(str(error)) from None
    except Exception as error:
        raise storage_problem(error, "upload the run's model or code") from None


def safe_blob_name(name: str) -> str:
    """A file name as a blob name segment: no slashes, no characters that need quoting."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "manifest.csv"


def upload_manifest(path: Path, container: str, name: str, blob_url: str | None) -> str:
    """Upload the manifest file; returns the new blob's ETag."""
    if not path.is_file():
        raise AppError(f"manifest {path} not found")
    from batchctl.storage import BlobStore

    store = BlobStore(client_storage_settings(blob_url))
    try:
        store.upload_file(container, name, path)
        return next(
            (etag for blob, etag in store.list_with_etags(container, name) if blob == name), ""
        )
    except Exception as error:  # the SDK's many error types, as one clear line
        raise storage_problem(error, f"uploading {path} to {store.url(container, name)}") from None
    finally:
        store.close()


def _download(account: str, container: str, name: str, target: Path) -> None:
    from batchctl.storage import BlobStore

    store = BlobStore(client_storage_settings(account))
    try:
        store.download_to_file(container, name, target)
    except Exception as error:  # the SDK's many error types, one clear line
        raise storage_problem(error, f"downloading {store.url(container, name)}") from None
    finally:
        store.close()
