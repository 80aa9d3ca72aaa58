"""`batchctl status RUN_ID [--follow]`: where a run on a deployed app stands.

Asks the app's ``GET /api/runs/RUN_ID`` (phase, counts, percent, ETA, report link). With
``--follow`` it keeps asking until the run ends, with a live progress line on a terminal and
plain lines (at most every few seconds) otherwise. Ctrl-C stops following; the run goes on.

The app comes from ``--app`` or BATCHCTL_APP_URL, its function key from BATCHCTL_FUNCTION_KEY.
Exit codes: while the run is going 0; once it ended 0 (every item ok), 1 (items failed or
rows invalid), 2 (the run failed or was cancelled); 3 bad input or the app unreachable;
130 when Ctrl-C stopped following.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from batchctl.client import (
    DEFAULT_UNREACHABLE_LIMIT_S,
    AppClient,
    AppError,
    display_url,
)
from batchctl.commands.run import (
    EXIT_BAD_INPUT,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    ProgressPrinter,
    outcome_text,
)
from batchctl.commands.target import connect
from batchctl.commands.validate import (
    MAX_INTERVAL_S,
    app_url_argument,
    number_argument,
    report_bad_input,
    run_id_argument,
)
from batchctl.runstatus import RunStatus

# Ctrl-C while following: the shell's convention for SIGINT (128 + 2), as in batchctl.cli.
EXIT_DETACHED = 130
DEFAULT_INTERVAL_S = 5.0

# The pause between polls; a module attribute so tests can make it raise KeyboardInterrupt.
_sleep: Callable[[float], None] = time.sleep


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show (or --follow) a run on a deployed app",
        description=__doc__,
    )
    parser.add_argument("run_id", type=run_id_argument, metavar="RUN_ID", help="the run's id")
    parser.add_argument("--follow", action="store_true", help="keep watching until it ends")
    add_follow_arguments(parser)
    add_app_arguments(parser)
    parser.set_defaults(handler=handle)


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    # No option for the key, on purpose: argv is visible to every user of the machine.
    parser.add_argument(
        "--app",
        type=app_url_argument,
        help="the Function App URL, https (default: $BATCHCTL_APP_URL)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")


def add_follow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        type=number_argument(whole=False, gt=0, le=MAX_INTERVAL_S),
        default=DEFAULT_INTERVAL_S,
        help=f"seconds between status checks while following (> 0, <= {MAX_INTERVAL_S:g})",
    )


def make_client(args: argparse.Namespace) -> AppClient:
    """The client of the app ``--app`` names (or BATCHCTL_APP_URL): the one factory's."""
    return connect(args.app)


def exit_code_of(status: RunStatus) -> int:
    """The `batchctl run` exit codes, from what the app says about a run."""
    if not status.finished or status.succeeded_fully:
        return EXIT_OK
    return EXIT_ITEMS_FAILED if status.ended_well else EXIT_RUN_FAILED


def fail(command: str, error: AppError | str, *, as_json: bool, code: int = EXIT_BAD_INPUT) -> int:
    """Say what went wrong on stderr (and as the JSON line), return the exit code."""
    return report_bad_input(
        f"batchctl {command}", str(error), flag=None, as_json=as_json, code=code
    )


def follow_run(
    client: AppClient,
    run_id: str,
    *,
    interval: float,
    on_status: Callable[[dict[str, Any]], None],
    status_url: str | None = None,
    wait_for_start_s: float = 0.0,
) -> RunStatus:
    """The client's ``follow``, pausing through this module's ``_sleep`` and riding out an
    unreachable app for this module's DEFAULT_UNREACHABLE_LIMIT_S (both read at each call,
    so a test can change them)."""
    return client.follow(
        run_id,
        interval=interval,
        on_status=on_status,
        status_url=status_url,
        wait_for_start_s=wait_for_start_s,
        unreachable_limit_s=DEFAULT_UNREACHABLE_LIMIT_S,
        pause=lambda seconds: _sleep(seconds),  # noqa: PLW0108 (late-bound for tests)
    )


def report_outcome(
    status: RunStatus,
    *,
    as_json: bool,
    rate: float | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """The summary on stderr, the JSON line on stdout; returns the exit code."""
    code = exit_code_of(status)
    if status.finished:
        rows = status.total + status.invalid
        print(
            f"run {status.run_id}: {status_outcome_text(status)}; {status.succeeded} succeeded, "
            f"{status.failed} failed, {status.invalid} invalid rows of {rows}"
            f"{'; ' + status.message if status.message else ''}",
            file=sys.stderr,
        )
        if rate:
            print(f"rate: {rate * 60:.1f} items/min while followed", file=sys.stderr)
        if status.report:
            print(
                f"report: {display_url(status.report)} (download: batchctl report {status.run_id})",
                file=sys.stderr,
            )
    else:
        eta = f", eta {status.eta_s:.0f}s" if status.eta_s is not None else ""
        print(
            f"run {status.run_id}: {status.outcome}; {status.succeeded + status.failed}/"
            f"{status.total} done ({status.succeeded} ok, {status.failed} failed, "
            f"{status.remaining} left, {status.percent:g}%{eta})"
            f"{'; ' + status.message if status.message else ''}",
            file=sys.stderr,
        )
    if as_json:
        outcome = {"outcome": status_outcome_text(status)} if status.finished else {}
        print(json.dumps({**status.view(), **outcome, **(extra or {}), "exit_code": code}))
    return code


def status_outcome_text(status: RunStatus) -> str:
    """The app's phase as a person should read it (see ``outcome_text``)."""
    return outcome_text(
        status.outcome,
        total=status.total,
        succeeded=status.succeeded,
        failed=status.failed,
        invalid=status.invalid,
    )


def detach(run_id: str, progress: ProgressPrinter | None, *, as_json: bool) -> int:
    """Ctrl-C while following: stop watching, never cancel, say how to come back."""
    if progress is not None:
        progress.finish()
    print(
        f"\nstopped following; run {run_id} keeps running.\n"
        f"  reattach: batchctl status {run_id} --follow\n"
        f"  cancel:   batchctl cancel {run_id}",
        file=sys.stderr,
    )
    if as_json:
        print(json.dumps({"run_id": run_id, "detached": True, "exit_code": EXIT_DETACHED}))
    return EXIT_DETACHED


def follow_and_report(
    client: AppClient,
    run_id: str,
    *,
    interval: float,
    as_json: bool,
    status_url: str | None = None,
    wait_for_start_s: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> int:
    """Follow with a progress line until the end (or Ctrl-C), then report; the exit code."""
    progress = ProgressPrinter(sys.stderr)
    try:
        status = follow_run(
            client,
            run_id,
            interval=interval,
            on_status=progress.update,
            status_url=status_url,
            wait_for_start_s=wait_for_start_s,
        )
    except KeyboardInterrupt:
        return detach(run_id, progress, as_json=as_json)
    progress.finish()
    return report_outcome(status, as_json=as_json, rate=progress.rate, extra=extra)


def handle(args: argparse.Namespace) -> int:
    try:
        client = make_client(args)
        if args.follow:
            return follow_and_report(client, args.run_id, interval=args.interval, as_json=args.json)
        return report_outcome(client.get_status(args.run_id), as_json=args.json)
    except AppError as error:
        return fail("status", error, as_json=args.json)
