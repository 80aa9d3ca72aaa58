"""`batchctl cancel RUN_ID`: ask a deployed app to stop a run.

The run stops at its next poll and deletes its compute on the way out, as on every ending;
follow that with ``batchctl status RUN_ID --follow``. Exit 0 when the cancel was requested
or the run had already ended (nothing is left to stop); 3 when there is no such run or the
app cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from batchctl.client import AppError
from batchctl.commands.run import EXIT_OK
from batchctl.commands.status import add_app_arguments, fail, make_client
from batchctl.commands.validate import run_id_argument


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cancel",
        help="cancel a run on a deployed app (its compute is deleted)",
        description=__doc__,
    )
    parser.add_argument("run_id", type=run_id_argument, metavar="RUN_ID", help="the run's id")
    add_app_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        result = make_client(args).cancel(args.run_id)
    except AppError as error:
        return fail("cancel", error, as_json=args.json)
    if result.requested:
        print(
            f"cancel requested for run {result.run_id}; it stops at its next poll and deletes "
            f"its compute. Watch it: batchctl status {result.run_id} --follow",
            file=sys.stderr,
        )
    else:
        print(f"run {result.run_id}: nothing to cancel ({result.message})", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": result.run_id,
                    "cancel": "requested" if result.requested else "already-ended",
                    "message": result.message,
                    "exit_code": EXIT_OK,
                }
            )
        )
    return EXIT_OK
