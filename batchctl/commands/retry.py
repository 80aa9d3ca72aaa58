"""`batchctl retry RUN`: a new run of exactly what a run did not finish.

RUN is a local run folder, as `batchctl run` printed it (``batchctl-output/RUN_ID``), or,
with ``--app`` (or BATCHCTL_APP_URL), a run id of the deployed app: its ``failed.csv`` and
``report.json`` are read from the app's storage, the rows are uploaded as the new run's
manifest (under ``media/_manifests/NEW_ID/``) and the new run is started and followed as
``batchctl submit`` does.

A local RUN_FOLDER is what `batchctl run` printed. Its ``failed.csv``
holds the manifest's header and every row whose item did not succeed (failed, not run, or
without a record), written by the run's report; ``report.json`` holds the run's options and
where its manifest was. The retry runs those rows with the same options, except the flags
given here, resolving the rows' video paths against the original manifest's folder, as the
first run did; its report names the run it retries (``parent_run_id``). Exit codes as for
``batchctl run``; 0 with "nothing to retry" when every item succeeded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from batchctl.client import AppError, client_storage_settings, storage_problem
from batchctl.commands.options import (
    add_run_option_arguments,
    check_local_work,
    retry_base,
    run_options_from_args,
)
from batchctl.commands.report import download_report, split_report_link
from batchctl.commands.run import (
    EXIT_OK,
    ProgressPrinter,
    add_nodes_argument,
    print_summary,
)
from batchctl.commands.status import (
    add_app_arguments,
    add_follow_arguments,
    fail,
    follow_and_report,
    make_client,
)
from batchctl.commands.submit import STAGING_PREFIX, upload_manifest
from batchctl.commands.validate import (
    BadInputError,
    existing_dir_argument,
    path_argument,
    run_id_argument,
)
from batchctl.contracts import RunOptions, RunReport
from batchctl.local.session import run_locally
from batchctl.reporting.artifacts import FAILED_CSV_NAME
from batchctl.runids import new_run_id

REPORT_NAME = "report.json"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "retry",
        help="run again, locally, exactly the items of a run that did not succeed",
        description=__doc__,
    )
    parser.add_argument(
        "run",
        metavar="RUN",
        help="a local run folder (batchctl-output/RUN_ID), or with --app a run id",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--out",
        type=path_argument,
        default=None,
        help="where a local retry's run folder goes (default: beside RUN)",
    )
    parser.add_argument(
        "--no-follow", action="store_true", help="--app: return once the retry has started"
    )
    add_app_arguments(parser)
    add_follow_arguments(parser)
    # A run-option flag not given keeps the parent's value: leave it out of the namespace.
    # Every option flag, as declared (a hand-kept list of them once lacked --segment-seconds,
    # and retries ran unsegmented).
    for action in add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0):
        action.default = argparse.SUPPRESS
    parser.set_defaults(handler=handle)


def parent_of(run_folder: Path) -> tuple[RunReport, Path]:
    """The run's report and its failed.csv; BadInputError when the folder is not a run's."""
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


def rows_to_retry(failed_csv: Path) -> int:
    with failed_csv.open(newline="", encoding="utf-8") as handle:
        return max(0, sum(1 for _ in csv.reader(handle)) - 1)  # the header is not a row


def retry_options(parent: RunReport, args: argparse.Namespace) -> RunOptions:
    """The retry's options: the parent run's (from its report), changed only by the flags
    given in ``args`` (retry's parser leaves the others out), except those the parent's run
    chose for itself, chosen again for the retry unless given (items per message: the
    retry is smaller). Pure: the same report and flags give the same options."""
    return run_options_from_args(args, base=retry_base(parent.options))


def handle(args: argparse.Namespace) -> int:
    if args.app or (os.environ.get("BATCHCTL_APP_URL") and not Path(args.run).is_dir()):
        try:
            return _retry_on_app(args)
        except AppError as error:
            return fail("retry", error, as_json=args.json)
    try:
        run_folder = existing_dir_argument(args.run).resolve()
    except argparse.ArgumentTypeError as error:
        raise BadInputError(str(error), "RUN") from None
    parent, failed = parent_of(run_folder)
    try:
        options = retry_options(parent, args)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    check_local_work(options)
    count = rows_to_retry(failed)
    if count == 0:
        print(f"run {parent.run_id}: nothing to retry (every item succeeded)", file=sys.stderr)
        if args.json:
            print(json.dumps({"parent_run_id": parent.run_id, "retried": 0}))
        return EXIT_OK
    # The rows name videos as the original manifest did: relative to its folder.
    label = parent.manifest_label
    media_root = Path(label).parent if label and Path(label).is_absolute() else None
    run_id = new_run_id()
    print(f"retrying {count} rows of run {parent.run_id} as run {run_id}", file=sys.stderr)
    progress = ProgressPrinter(sys.stderr)
    try:
        result = run_locally(
            failed,
            options,
            run_id=run_id,
            nodes=args.nodes,
            out_dir=args.out or run_folder.parent,
            on_status=progress.update,
            # The original manifest: its folder is where the rows' paths lead (for a retry of
            # a retry too); the report names the parent run beside it.
            manifest_label=label,
            media_root=media_root,
            parent_run_id=parent.run_id,
        )
    finally:
        progress.finish()
    return print_summary(result, as_json=args.json)


def _retry_on_app(args: argparse.Namespace) -> int:
    """The retry of a run of the deployed app: its failed rows become a new run there."""
    try:
        parent_id = run_id_argument(args.run)
    except argparse.ArgumentTypeError as error:
        raise BadInputError(f"with --app, RUN is a run id: {error}", "RUN") from None
    client = make_client(args)
    status = client.get_status(parent_id)
    if not status.finished:
        raise AppError(f"run {parent_id} is still going: retry it once it has ended")
    if not status.report:
        raise AppError(f"run {parent_id} has no report to retry from")
    account, container, report_name = split_report_link(status.report, parent_id)
    with tempfile.TemporaryDirectory(prefix="batchctl-retry-") as scratch:
        folder = Path(scratch)
        report_path, _ = download_report(status.report, parent_id, folder)
        parent = RunReport.model_validate_json(report_path.read_text(encoding="utf-8"))
        failed_name = report_name.removesuffix(REPORT_NAME) + FAILED_CSV_NAME
        failed = folder / FAILED_CSV_NAME
        _download(account, container, failed_name, failed)
        try:
            options = retry_options(parent, args)
        except ValueError as error:
            raise BadInputError(str(error)) from None
        count = rows_to_retry(failed)
        if count == 0:
            print(f"run {parent_id}: nothing to retry (every item succeeded)", file=sys.stderr)
            if args.json:
                print(json.dumps({"parent_run_id": parent_id, "retried": 0}))
            return EXIT_OK
        run_id = new_run_id()
        media = client_storage_settings(account).media_container
        name = f"{STAGING_PREFIX}/{run_id}/{FAILED_CSV_NAME}"
        upload_manifest(failed, media, name, account)
    manifest = f"{media}/{name}"
    print(f"retrying {count} rows of run {parent_id} as run {run_id}", file=sys.stderr)
    started = client.start_run(manifest, options, run_id, parent_run_id=parent_id)
    if args.no_follow:
        print(f"follow it: batchctl status {started.run_id} --follow", file=sys.stderr)
        if args.json:
            print(json.dumps({"run_id": started.run_id, "parent_run_id": parent_id}))
        return EXIT_OK
    return follow_and_report(
        client,
        started.run_id,
        interval=args.interval,
        as_json=args.json,
        status_url=started.status_url,
        extra={"manifest": manifest, "parent_run_id": parent_id},
    )


def _download(account: str, container: str, name: str, target: Path) -> None:
    from batchctl.storage import BlobStore

    store = BlobStore(client_storage_settings(account))
    try:
        store.download_to_file(container, name, target)
    except Exception as error:  # the SDK's many error types, one clear line
        raise storage_problem(error, f"downloading {store.url(container, name)}") from None
    finally:
        store.close()
