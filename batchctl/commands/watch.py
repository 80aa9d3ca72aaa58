"""`batchctl watch`: the local twin of the blob trigger.

Watches the local manifests container and starts a run for each new CSV, one at a time,
with the same run id rule as the Event Grid trigger (blob name + ETag), so a manifest seen
twice is run once. Upload manifests with any Azure Storage tool pointed at the printed URL
(Azurite's published development account).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.run import EXIT_BAD_INPUT, ProgressPrinter, drive_run, local_session
from batchctl.settings import get_controller_settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch", help="start a local run for each new manifest in the manifests container"
    )
    parser.add_argument("--media-root", type=Path, default=Path.cwd(), help="local files root")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("batchctl-output"))
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    parser.add_argument("--once", action="store_true", help="run what is there now, then exit")
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        options = run_options_from_args(args)
    except ValueError as error:
        print(f"batchctl watch: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with local_session(media_root=args.media_root, nodes=args.nodes, log_dir=args.out / "logs"):
        from batchctl.functions.api import run_id_for_blob
        from batchctl.local.staging import prepare_storage, upload_local_media
        from batchctl.manifest import iter_lines

        settings = get_controller_settings()
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
                    run_id,
                    f"{container}/{name}",
                    options,
                    out_dir=args.out,
                    on_status=progress.update,
                )
                progress.finish()
                print(
                    f"run {run_id}: {result.report.phase.value}, {result.report.succeeded} "
                    f"succeeded, {result.report.failed} failed; report {result.report_path}",
                    file=sys.stderr,
                )
                worst = max(worst, result.exit_code)
            if args.once:
                return worst
            time.sleep(args.interval)
