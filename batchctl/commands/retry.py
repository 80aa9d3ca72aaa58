"""`batchctl retry RUN`: a new run of exactly what a run did not finish.

RUN is a run folder, as `batchctl run` printed it (``batchctl-output/RUN_ID``), or a run id
of a deployed app (its ``failed.csv`` and ``report.json`` are read from the app's storage).
The new run goes where every command's runs go (batchctl.commands.target): this machine's
app for a folder, the deployed app for a run id or with ``--app`` (a folder's rows are then
uploaded as the new run's manifest under ``media/_manifests/NEW_ID/``, so they must name
what the app's nodes can read); started, followed and summarized the same way on either.

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
import sys
import tempfile
from pathlib import Path
from typing import Any

from batchctl.client import AppError
from batchctl.commands.options import (
    add_run_option_arguments,
    retry_base,
    run_options_from_args,
)
from batchctl.commands.run import EXIT_OK, ProgressPrinter, add_nodes_argument
from batchctl.commands.status import add_app_arguments, add_follow_arguments, fail
from batchctl.commands.target import RunSpec, Target, open_target, read_run_folder
from batchctl.commands.validate import BadInputError, path_argument, run_id_argument
from batchctl.contracts import RunOptions, RunReport
from batchctl.runids import new_run_id


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "retry",
        help="run again (here or on the app) exactly the items of a run that did not succeed",
        description=__doc__,
    )
    parser.add_argument(
        "run",
        metavar="RUN",
        help="a run folder (batchctl-output/RUN_ID), or a run id of a deployed app",
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
    run = Path(args.run)
    is_folder = run.is_dir()
    # A folder is a run of this machine's unless --app says otherwise; a run id names a run
    # of the app that BATCHCTL_APP_URL names when --app does not.
    try:
        target = open_target(
            args.app,
            local=is_folder and not args.app,
            nodes=args.nodes,
            out_dir=args.out or run.resolve().parent,
            interval=args.interval,
        )
        with tempfile.TemporaryDirectory(prefix="batchctl-retry-") as scratch:
            if is_folder:
                parent, failed = read_run_folder(run.resolve())
            else:
                parent, failed = target.fetch_parent(_run_id(args.run), Path(scratch))
            return _retry(args, target, parent, failed)
    except AppError as error:
        return fail("retry", error, as_json=args.json)


def _run_id(run: str) -> str:
    try:
        return run_id_argument(run)
    except argparse.ArgumentTypeError as error:
        raise BadInputError(
            f"RUN is a run folder or a run id: {run!r} is neither ({error})", "RUN"
        ) from None


def _retry(args: argparse.Namespace, target: Target, parent: RunReport, failed: Path) -> int:
    """The parent's rows that did not succeed, as a new run on ``target`` with its options."""
    try:
        options = retry_options(parent, args)
    except ValueError as error:
        raise BadInputError(str(error)) from None
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
    spec = RunSpec(
        failed,
        options,
        run_id,
        # The original manifest: its folder is where the rows' paths lead (for a retry of a
        # retry too); the report names the parent run beside it.
        manifest_label=label,
        media_root=media_root,
        parent_run_id=parent.run_id,
    )
    with ProgressPrinter(sys.stderr) as progress:
        outcome = target.execute(spec, progress=progress, follow=not args.no_follow)
    return target.summarize(outcome, as_json=args.json, extra={"parent_run_id": parent.run_id})
