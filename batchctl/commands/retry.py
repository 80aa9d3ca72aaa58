"""`batchctl retry RUN_FOLDER`: a new local run of exactly what a run did not finish.

RUN_FOLDER is what `batchctl run` printed (``batchctl-output/RUN_ID``). Its ``failed.csv``
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
from pathlib import Path
from typing import Any

from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.run import (
    EXIT_OK,
    ProgressPrinter,
    add_nodes_argument,
    print_summary,
)
from batchctl.commands.validate import BadInputError, existing_dir_argument, path_argument
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
        "run_folder",
        type=existing_dir_argument,
        metavar="RUN_FOLDER",
        help="the run's folder, as `batchctl run` printed it (batchctl-output/RUN_ID)",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--out",
        type=path_argument,
        default=None,
        help="where the new run's folder goes (default: beside RUN_FOLDER)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    # A run-option flag not given keeps the parent's value: leave it out of the namespace.
    for action in parser._actions:
        if action.dest in _OPTION_DESTS:
            action.default = argparse.SUPPRESS
    parser.set_defaults(handler=handle)


_OPTION_DESTS = frozenset(
    {
        "task",
        "fps",
        "frame_size",
        "model",
        "batch_size",
        "mini_batch",
        "exact_timestamps",
        "error_budget",
        "max_attempts",
        "strict",
        "merge_outputs",
        "skip_existing",
        "item_timeout",
        "poll",
        "idle_exit",
        "deadline",
    }
)


def parent_of(run_folder: Path) -> tuple[RunReport, Path]:
    """The run's report and its failed.csv; BadInputError when the folder is not a run's."""
    report_path = run_folder / REPORT_NAME
    failed = run_folder / FAILED_CSV_NAME
    if not report_path.is_file():
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
    """The parent's options, changed only by the flags given; items per message are chosen
    again for the (smaller) retry unless given."""
    base = parent.options or RunOptions()
    base = base.model_copy(update={"mini_batch_size": None})
    return run_options_from_args(args, base=base)


def handle(args: argparse.Namespace) -> int:
    run_folder: Path = args.run_folder.resolve()
    parent, failed = parent_of(run_folder)
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
