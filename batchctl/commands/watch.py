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

from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.run import ProgressPrinter, add_nodes_argument, report_outcome_text
from batchctl.commands.validate import (
    MAX_INTERVAL_S,
    BadInputError,
    existing_dir_argument,
    number_argument,
    path_argument,
)
from batchctl.local.session import drive_run, local_session
from batchctl.runids import run_id_for_blob


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
    log_dir = args.out / "logs"
    with local_session(media_root=args.media_root, nodes=args.nodes, log_dir=log_dir) as services:
        from batchctl.local.staging import prepare_storage, upload_local_media
        from batchctl.manifest import iter_lines

        settings = services.settings
        store = prepare_storage(settings)
        container = settings.manifests_container
        print(f"watching {store.url(container, '')} for manifests (*.csv)", file=sys.stderr)
        seen: set[str] = set()
        worst = 0
        while True:
            for name, etag in store.list_with_etags(container):
                run_id = run_id_for_blob(f"{container}/{name}", etag)
                if not name.lower().endswith(".csv") or run_id in seen:
                    continue
                seen.add(run_id)
                print(f"new manifest {name}: run {run_id}", file=sys.stderr)
                upload_local_media(
                    store,
                    settings,
                    iter_lines(store.download_chunks(container, name)),
                    args.media_root,
                )
                progress = ProgressPrinter(sys.stderr)
                result = drive_run(
                    services,
                    run_id,
                    f"{container}/{name}",
                    options,
                    out_dir=args.out,
                    on_status=progress.update,
                )
                progress.finish()
                report = result.report
                print(
                    f"run {run_id}: {report_outcome_text(report)}, {report.succeeded} "
                    f"succeeded, {report.failed} failed; report {result.report_path}",
                    file=sys.stderr,
                )
                if args.json:
                    print(
                        json.dumps(
                            {
                                "run_id": run_id,
                                "manifest": f"{container}/{name}",
                                "phase": report.phase.value,
                                "outcome": report_outcome_text(report),
                                "succeeded": report.succeeded,
                                "failed": report.failed,
                                "invalid": report.invalid,
                                "report": str(result.report_path),
                                "exit_code": result.exit_code,
                            }
                        ),
                        flush=True,
                    )
                worst = max(worst, result.exit_code)
            if args.once:
                return worst
            time.sleep(args.interval)
