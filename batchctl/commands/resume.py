"""`batchctl resume RUN_FOLDER`: continue a local run whose controller died.

RUN_FOLDER is the run's folder as `batchctl run` named it (``batchctl-output/RUN_ID``). A run
whose `batchctl run` was killed, crashed, or whose machine rebooted keeps its storage and
its controller's record there; `resume` starts the run's storage again, keeps every record
and runs only the items that have none (those in flight at the kill run again), then writes
the report and copies the results out as `run` does. Exit codes as for ``batchctl run``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from batchctl.commands.run import ProgressPrinter, add_no_copy_argument
from batchctl.commands.target import copy_progress, print_summary
from batchctl.commands.validate import BadInputError, existing_dir_argument, field_argument
from batchctl.settings import ControllerSettings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "resume",
        help="continue a local run whose controller died (keeps every record)",
        description=__doc__,
    )
    parser.add_argument(
        "run_folder",
        type=existing_dir_argument,
        metavar="RUN_FOLDER",
        help="the run's folder, as `batchctl run` printed it (OUT/RUN_ID)",
    )
    parser.add_argument(
        "--nodes",
        type=field_argument(ControllerSettings, "local_nodes"),
        default=None,
        help="worker processes on this machine (default: as the run had)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    add_no_copy_argument(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from batchctl.local.resume import check_resumable, no_copy_refusal, resume_locally
    from batchctl.local.runfolder import PRIVATE_STORAGE

    run_folder: Path = args.run_folder
    record = check_resumable(run_folder)
    if args.no_copy and record.storage == PRIVATE_STORAGE:
        raise BadInputError(no_copy_refusal(record, run_folder), "--no-copy")
    print(
        f"resuming run {record.run_id} (started {record.started_at:%Y-%m-%d %H:%M:%S} UTC)",
        file=sys.stderr,
    )
    with ProgressPrinter(sys.stderr) as progress:
        result = resume_locally(
            run_folder,
            nodes=args.nodes,
            on_status=progress.update,
            copy_outputs=not args.no_copy,
            copy_progress=copy_progress(progress),
        )
    return print_summary(result, as_json=args.json)
