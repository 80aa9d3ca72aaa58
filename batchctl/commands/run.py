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
from typing import Any

from batchctl.commands import validate
from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.validate import (
    BadInputError,
    field_argument,
    manifest_argument,
    manifest_header_problem,
    path_argument,
    run_id_argument,
)
from batchctl.contracts import RunPhase, RunReport
from batchctl.local.session import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    LocalRunResult,
    drive_run,
    local_session,
    run_locally,
)
from batchctl.runids import new_run_id
from batchctl.settings import ControllerSettings

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
    "handle",
    "local_session",
    "new_run_id",
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
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def add_nodes_argument(parser: argparse.ArgumentParser) -> None:
    """--nodes: worker processes on this machine, within the local backend's own bound."""
    parser.add_argument(
        "--nodes",
        type=field_argument(ControllerSettings, "local_nodes"),
        default=ControllerSettings.model_fields["local_nodes"].default,
        help="worker processes on this machine (1..64)",
    )


def outcome_text(phase: str, *, total: int, succeeded: int, failed: int, invalid: int) -> str:
    """The phase as a person should read it: a completed run in which nothing (or not
    everything) succeeded must not look like a clean "completed"."""
    if phase != RunPhase.COMPLETED.value:
        return phase
    if total == 0 and invalid == 0:
        return "completed, but the manifest had no items"
    if succeeded == 0:
        return "completed, but no item succeeded"
    if failed or invalid:
        return "completed with failures"
    return phase


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
    run_id = args.run_id or new_run_id()
    progress = ProgressPrinter(sys.stderr)
    result = run_locally(
        manifest,
        options,
        run_id=run_id,
        nodes=args.nodes,
        out_dir=args.out,
        on_status=progress.update,
    )
    progress.finish()
    report = result.report
    print(
        f"run {report.run_id}: {report_outcome_text(report)}; {report.succeeded} succeeded, "
        f"{report.failed} failed, {report.invalid} invalid rows of {report.total + report.invalid}"
        f"{'; ' + report.message if report.message else ''}",
        file=sys.stderr,
    )
    from batchctl.controller import REPORT_HTML_NAME

    html = result.report_path.with_name(REPORT_HTML_NAME)
    print(
        f"report: {result.report_path}" + (f" and {html.name} beside it" if html.exists() else ""),
        file=sys.stderr,
    )
    print(f"outputs: {result.output_dir}", file=sys.stderr)
    if report.weights:
        # Offline runs fall back to random weights: say so where nobody can miss it.
        print(f"weights: {report.weights}", file=sys.stderr)
    if args.json:
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
                    "report": str(result.report_path),
                    "output_prefix": str(result.output_dir),
                }
            )
        )
    return result.exit_code


class ProgressPrinter:
    """A one-line live progress bar on a terminal; plain lines (at most every 5 s) otherwise.

    The rate shown is what this printer has seen items finish at since it first saw the run
    working, so it is right after a reattach too (the app's ETA is its own).
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_line = ""
        self._last_print = float("-inf")
        self._first_seen: tuple[float, int] | None = None

    def update(self, status: Any) -> None:
        if not isinstance(status, dict):
            return
        now = time.monotonic()
        running = status.get("phase") == RunPhase.RUNNING.value
        done = int(status.get("succeeded") or 0) + int(status.get("failed") or 0)
        rate = None
        if running and self._first_seen is None:
            self._first_seen = (now, done)
        elif running and self._first_seen is not None:
            rate = items_per_second(self._first_seen, (now, done))
        line = format_status(status, rate_per_s=rate)
        if self._tty:
            self._stream.write("\r\033[K" + line)
            self._stream.flush()
        elif line != self._last_line and (not running or now - self._last_print >= 5):
            self._stream.write(line + "\n")
            self._last_print = now
        self._last_line = line

    def finish(self) -> None:
        if self._tty and self._last_line:
            self._stream.write("\n")


def items_per_second(first: tuple[float, int], latest: tuple[float, int]) -> float | None:
    """Items finished per second between two (time, done) observations; None without time."""
    elapsed = latest[0] - first[0]
    return (latest[1] - first[1]) / elapsed if elapsed > 0 else None


def format_rate(rate_per_s: float) -> str:
    return f"{rate_per_s:.1f}/s" if rate_per_s >= 1 else f"{rate_per_s * 60:.1f}/min"


def format_status(status: dict[str, Any], width: int = 30, rate_per_s: float | None = None) -> str:
    total = int(status.get("total") or 0)
    succeeded = int(status.get("succeeded") or 0)
    failed = int(status.get("failed") or 0)
    done = succeeded + failed
    phase = str(status.get("phase", "?"))
    if phase != RunPhase.RUNNING.value or total == 0:
        shown = outcome_text(
            phase,
            total=total,
            succeeded=succeeded,
            failed=failed,
            invalid=int(status.get("invalid") or 0),
        )
        return f"[{shown}] {status.get('message', '')}"
    filled = int(width * done / total)
    eta = status.get("eta_s")
    eta_text = f" eta {float(eta):.0f}s" if eta is not None else ""
    rate_text = f" {format_rate(rate_per_s)}" if rate_per_s is not None else ""
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
        f"({succeeded} ok, {failed} failed, {total - done} left){rate_text}{eta_text}"
    )
