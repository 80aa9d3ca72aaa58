"""`batchctl run MANIFEST.csv`: the whole job on this machine.

The app is started on this machine (batchctl.commands.target's local target): Azurite
(started here unless BATCHCTL_* variables point at storage) stands in for Azure Storage,
worker processes stand in for GPU nodes, and the very orchestrator that Azure runs is driven
behind the app's HTTP API, which this command uses as ``submit`` uses a deployed app's.
Local files named by the manifest are uploaded to the media container first, because
workers always read from blob storage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from batchctl.commands import validate
from batchctl.commands.options import (
    add_run_option_arguments,
    run_options_from_args,
)
from batchctl.commands.target import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    RunSpec,
    open_local,
)
from batchctl.commands.validate import (
    BadInputError,
    field_argument,
    manifest_argument,
    manifest_header_problem,
    path_argument,
    run_id_argument,
)
from batchctl.contracts import RunReport
from batchctl.progressview import (
    LiveProgress,
    format_rate,
    format_status,
    outcome_text,
)
from batchctl.runids import new_run_id
from batchctl.settings import CORES_PER_LOCAL_NODE, ControllerSettings, default_local_nodes

EXIT_BAD_INPUT = validate.EXIT_BAD_INPUT
# The exit codes and views the other commands take from here.
__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ITEMS_FAILED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "ProgressPrinter",
    "format_rate",
    "format_status",
    "handle",
    "new_run_id",
    "outcome_text",
    "register",
]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a manifest locally (Azurite + worker processes)",
        description=__doc__,
    )
    parser.add_argument(
        "manifest",
        type=manifest_argument,
        help="CSV with a header row naming a 'video' column (paths or URLs)",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("batchctl-output"),
        help="where the report and outputs are copied, under RUN_ID/",
    )
    parser.add_argument(
        "--run-id",
        type=run_id_argument,
        help="run id: lower-case letters, digits, single hyphens (default: generated)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    add_no_copy_argument(parser)
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def add_no_copy_argument(parser: argparse.ArgumentParser) -> None:
    """--no-copy: outputs stay in storage (``batchctl run`` and ``resume``)."""
    parser.add_argument(
        "--no-copy",
        action="store_true",
        help="leave the outputs in storage (container 'outputs', prefix RUN_ID/) instead of "
        "copying them into the run's folder (OUT/RUN_ID/outputs/); the report, records.jsonl, "
        "failed.csv and index.csv are "
        "still copied, and the summary says where the outputs are. Only with "
        "BATCHCTL_BLOB_URL/QUEUE_URL/TABLE_URL pointing at storage of your own, where you "
        "read them later with your own tools (Azure Storage Explorer, az storage blob "
        "download-batch); refused on a run's private Azurite, which is removed when the run "
        "ends",
    )


def add_nodes_argument(parser: argparse.ArgumentParser) -> None:
    """--nodes: worker processes on this machine, within the local backend's own bound."""
    parser.add_argument(
        "--nodes",
        type=field_argument(ControllerSettings, "local_nodes"),
        default=default_local_nodes(),
        help="worker processes on this machine (1..64; default: one per "
        f"{CORES_PER_LOCAL_NODE} cores, at least one: {default_local_nodes()} here)",
    )


def report_outcome_text(report: RunReport) -> str:
    return outcome_text(
        report.phase.value,
        total=report.total,
        succeeded=report.succeeded,
        failed=report.failed,
        invalid=report.invalid,
    )


def handle(args: argparse.Namespace) -> int:
    manifest: Path = args.manifest
    # demo hands over a manifest it did not parse: check it as the argument would have been.
    if not manifest.is_file():
        raise BadInputError(f"manifest {manifest} not found", "manifest")
    problem = manifest_header_problem(manifest)
    if problem:
        raise BadInputError(f"{manifest}: {problem}", "manifest")
    try:
        options = run_options_from_args(args)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    # `demo` hands over its own arguments, which have no --no-copy.
    target = open_local(
        nodes=args.nodes, out_dir=args.out, copy_outputs=not getattr(args, "no_copy", False)
    )
    spec = RunSpec(manifest, options, args.run_id or new_run_id())
    # The view is stopped on every way out, or a live panel would keep the cursor hidden.
    with ProgressPrinter(sys.stderr) as progress:
        outcome = target.execute(spec, progress=progress)
    return target.summarize(outcome, as_json=args.json)


class ProgressPrinter(LiveProgress):
    """The live progress view (batchctl.progressview) as the commands use it.

    Its clock is read through this module's ``time`` at every call, so a test that speeds
    this module's clock up speeds the view's rate up too.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream, clock=lambda: time.monotonic())  # noqa: PLW0108 (late-bound)
