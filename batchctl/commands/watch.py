"""`batchctl watch`: the local twin of the blob trigger.

Watches the local manifests container and starts a run for each new CSV, one at a time,
with the same run id rule as the Event Grid trigger (blob name + ETag), so a manifest seen
twice is run once. Upload manifests with any Azure Storage tool pointed at the printed URL
(Azurite's published development account).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from batchctl.client import AppClient
from batchctl.commands.options import (
    add_run_option_arguments,
    check_local_work,
    run_options_from_args,
)
from batchctl.commands.run import ProgressPrinter, add_nodes_argument, report_outcome_text
from batchctl.commands.validate import (
    MAX_INTERVAL_S,
    BadInputError,
    existing_dir_argument,
    number_argument,
    path_argument,
)
from batchctl.contracts import RunReport
from batchctl.local.app import follow_with_cancel
from batchctl.local.session import LocalRunResult, local_session


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="start a local run for each new manifest in the manifests container",
        description=__doc__,
    )
    parser.add_argument(
        "--media-root",
        type=existing_dir_argument,
        default=Path.cwd(),
        help="the directory local paths in manifests are under",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("batchctl-output"),
        help="where each run's report and outputs are copied, under RUN_ID/",
    )
    parser.add_argument(
        "--interval",
        type=number_argument(whole=False, gt=0, le=MAX_INTERVAL_S),
        default=2.0,
        help="seconds between looks at the container",
    )
    parser.add_argument("--once", action="store_true", help="run what is there now, then exit")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout per run")
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        options = run_options_from_args(args)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    check_local_work(options)
    from batchctl.local.app import local_app, private_key
    from batchctl.local.server import ManifestTrigger
    from batchctl.local.staging import prepare_storage

    log_dir = args.out / "logs"
    with (
        local_session(media_root=args.media_root, nodes=args.nodes, log_dir=log_dir) as services,
        # The app's own blob trigger starts the runs (serve's), one at a time; this command
        # follows each through the app's HTTP API, as `status --follow` does.
        local_app(services, out_dir=args.out, key=private_key()) as app,
    ):
        settings = services.settings
        store = prepare_storage(settings)
        container = settings.manifests_container
        print(f"watching {store.url(container, '')} for manifests (*.csv)", file=sys.stderr)
        trigger = ManifestTrigger(
            app.durable, options, on_event=lambda line: print(line, file=sys.stderr)
        )
        client = app.client()
        worst = 0
        while True:
            for run_id in trigger.poll_once():
                worst = max(worst, _follow(client, run_id, args))
            if args.once:
                return worst
            time.sleep(args.interval)


def _follow(client: AppClient, run_id: str, args: argparse.Namespace) -> int:
    """Follow one triggered run to its end and say how it ended; its exit code."""
    # Here, not at the top: every command's module loads to build the parser, and the
    # controller (the storage clients with it) would delay every `batchctl run`'s start.
    from batchctl.controller import REPORT_NAME

    with ProgressPrinter(sys.stderr) as progress:
        follow_with_cancel(client, run_id, progress.update)
    report_path = args.out / run_id / REPORT_NAME
    report = RunReport.model_validate_json(report_path.read_text())
    code = LocalRunResult(report, report_path, args.out / run_id / "outputs").exit_code
    print(
        f"run {run_id}: {report_outcome_text(report)}, {report.succeeded} "
        f"succeeded, {report.failed} failed; report {report_path}",
        file=sys.stderr,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": run_id,
                    "manifest": report.manifest,
                    "phase": report.phase.value,
                    "outcome": report_outcome_text(report),
                    "succeeded": report.succeeded,
                    "failed": report.failed,
                    "invalid": report.invalid,
                    "report": str(report_path),
                    "exit_code": code,
                }
            ),
            flush=True,
        )
    return code
