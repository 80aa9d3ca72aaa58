"""`batchctl run MANIFEST.csv`: the whole job on this machine.

Azurite (started here unless BATCHCTL_* variables point at storage) stands in for Azure
Storage, worker processes stand in for GPU nodes, and the local driver runs the very
orchestrator that Azure runs. Local files named by the manifest are uploaded to the media
container first, because workers always read from blob storage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchctl.commands import validate
from batchctl.commands.options import (
    add_run_option_arguments,
    check_local_work,
    run_options_from_args,
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
from batchctl.local.session import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    NO_COPY_NEEDS_OWN_STORAGE,
    LocalRunResult,
    drive_run,
    local_session,
    run_locally,
    storage_from_environment,
)
from batchctl.progressview import (
    LiveProgress,
    format_rate,
    format_status,
    outcome_text,
)
from batchctl.runids import new_run_id
from batchctl.settings import ControllerSettings

if TYPE_CHECKING:
    from batchctl.controller import CopyProgress

EXIT_BAD_INPUT = validate.EXIT_BAD_INPUT
# The local session's pieces, importable from the command that uses them.
__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ITEMS_FAILED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "LocalRunResult",
    "ProgressPrinter",
    "drive_run",
    "format_rate",
    "format_status",
    "handle",
    "local_session",
    "new_run_id",
    "outcome_text",
    "print_summary",
    "register",
    "run_locally",
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


def copy_progress(progress: LiveProgress) -> CopyProgress:
    """The copy-out's progress lines for a command showing ``progress``: the live panel
    stops (its last frame stays) before the first line, or it would redraw over them."""
    from batchctl.controller import CopyProgress

    return CopyProgress(sys.stderr, before_first=progress.finish)


def add_nodes_argument(parser: argparse.ArgumentParser) -> None:
    """--nodes: worker processes on this machine, within the local backend's own bound."""
    parser.add_argument(
        "--nodes",
        type=field_argument(ControllerSettings, "local_nodes"),
        default=ControllerSettings.model_fields["local_nodes"].default,
        help="worker processes on this machine (1..64)",
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
    # Before any worker starts: a task that does not import here (from --code, when given)
    # would fail every item instead.
    check_local_work(options)
    # `demo` hands over its own arguments, which have no --no-copy.
    copy_outputs = not getattr(args, "no_copy", False)
    if not copy_outputs and not storage_from_environment():
        raise BadInputError(NO_COPY_NEEDS_OWN_STORAGE, "--no-copy")
    run_id = args.run_id or new_run_id()
    # The view is stopped on every way out, or a live panel would keep the cursor hidden.
    with ProgressPrinter(sys.stderr) as progress:
        result = run_locally(
            manifest,
            options,
            run_id=run_id,
            nodes=args.nodes,
            out_dir=args.out,
            on_status=progress.update,
            copy_outputs=copy_outputs,
            copy_progress=copy_progress(progress),
        )
    return print_summary(result, as_json=args.json)


def print_summary(result: LocalRunResult, *, as_json: bool) -> int:
    """The end of a local run for a person (stderr) and, with ``as_json``, one JSON line;
    returns the run's exit code (``batchctl run`` and ``batchctl retry`` alike)."""
    report = result.report
    print(
        f"run {report.run_id}: {report_outcome_text(report)}; {report.succeeded} succeeded, "
        f"{report.failed} failed, "
        + (f"{report.skipped} skipped (done before), " if report.skipped else "")
        + f"{report.invalid} invalid rows of {report.total + report.invalid}"
        f"{'; ' + report.message if report.message else ''}",
        file=sys.stderr,
    )
    from batchctl.controller import REPORT_HTML_NAME
    from batchctl.reporting.artifacts import FAILED_CSV_NAME, MANIFEST_ERRORS_NAME

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
                    "run_id": report.run_id,
                    "phase": report.phase.value,
                    "outcome": report_outcome_text(report),
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


class ProgressPrinter(LiveProgress):
    """The live progress view (batchctl.progressview) as the commands use it.

    Its clock is read through this module's ``time`` at every call, so a test that speeds
    this module's clock up speeds the view's rate up too.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream, clock=lambda: time.monotonic())  # noqa: PLW0108 (late-bound)
