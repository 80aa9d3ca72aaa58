"""`batchctl report RUN_ID [--out DIR]`: download a finished run's report.

Asks the app for the run's report link (``GET /api/runs/RUN_ID``), then downloads
``report.json`` (and ``report.html`` when the run wrote one) from that storage account into
``DIR/RUN_ID/``. Storage access is BATCHCTL_STORAGE_AUTH (default ``managed_identity``:
DefaultAzureCredential, i.e. ``az login``); the identity needs read access to the runs
container. Exit 0 when downloaded; 3 when the run is still going, unknown or unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from batchctl.client import AppError, client_storage_settings, display_url, storage_problem
from batchctl.commands.run import EXIT_OK, report_outcome_text
from batchctl.commands.status import add_app_arguments, fail, make_client
from batchctl.commands.validate import path_argument, run_id_argument
from batchctl.contracts import RunReport


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="download a finished run's report from a deployed app",
        description=__doc__,
    )
    parser.add_argument("run_id", type=run_id_argument, metavar="RUN_ID", help="the run's id")
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("batchctl-output"),
        help="where to put it, under RUN_ID/",
    )
    add_app_arguments(parser)
    parser.set_defaults(handler=handle)


def split_report_link(link: str, run_id: str) -> tuple[str, str, str]:
    """(account blob URL, container, blob name) of the app's report link for ``run_id``."""
    # Here, not at the top: every command's module loads to build the parser, and the
    # controller (the storage clients with it) would delay every `batchctl run`'s start.
    from batchctl.controller import report_blob_name

    name = report_blob_name(run_id)
    base = display_url(link)
    if not base.endswith(f"/{name}"):
        raise AppError(f"the app's report link {base} does not name {name}")
    account_and_container = base[: -len(name) - 1]
    account, _, container = account_and_container.rpartition("/")
    if not container or "://" not in account:
        raise AppError(f"the app's report link {base} has no container")
    return account, container, name


def download_report(link: str, run_id: str, target: Path) -> tuple[Path, Path | None]:
    """Download a run's report.json, and its report.html when there is one, into ``target``.

    ``link`` is the report link the app gives; returns the two paths (html None when absent).
    """
    account, container, name = split_report_link(link, run_id)
    settings = client_storage_settings(account)
    from batchctl.controller import REPORT_HTML_NAME, REPORT_NAME
    from batchctl.storage import BlobStore

    store = BlobStore(settings)
    json_path = target / REPORT_NAME
    # Rendered beside report.json by apps with the [app] extra; older runs have none.
    html_name = name.removesuffix(REPORT_NAME) + REPORT_HTML_NAME
    html_path: Path | None = None
    try:
        store.download_to_file(container, name, json_path)
        if store.exists(container, html_name):
            html_path = target / REPORT_HTML_NAME
            store.download_to_file(container, html_name, html_path)
    except Exception as error:  # the SDK's many error types, one clear line
        raise storage_problem(error, f"downloading {store.url(container, name)}") from None
    finally:
        store.close()
    return json_path, html_path


def handle(args: argparse.Namespace) -> int:
    run_id: str = args.run_id
    try:
        status = make_client(args).get_status(run_id)
        if not status.finished:
            raise AppError(
                f"run {run_id} is still {status.outcome}; the report is written when it ends "
                f"(batchctl status {run_id} --follow)"
            )
        if not status.report:
            raise AppError(f"the app gave no report link for run {run_id}")
        json_path, html_path = download_report(status.report, run_id, args.out / run_id)
    except AppError as error:
        return fail("report", error, as_json=args.json)
    print(f"report: {json_path}", file=sys.stderr)
    if html_path:
        print(f"html:   {html_path}", file=sys.stderr)
    try:
        report = RunReport.model_validate_json(json_path.read_bytes())
        print(
            f"run {report.run_id}: {report_outcome_text(report)}; {report.succeeded} succeeded, "
            f"{report.failed} failed, {report.invalid} invalid rows; "
            f"outputs {report.output_prefix}",
            file=sys.stderr,
        )
    except ValidationError as error:
        # Kept as downloaded: a newer app may write fields this client does not know yet.
        print(
            f"note: report.json is not a report this version reads ({error.error_count()} "
            "problems)",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": run_id,
                    "phase": status.outcome,
                    "report": str(json_path),
                    "html": str(html_path) if html_path else None,
                    "exit_code": EXIT_OK,
                }
            )
        )
    return EXIT_OK
