"""`batchctl submit MANIFEST.csv`: run a manifest on a deployed app and follow it to the end.

Three ways to start:
- ``submit MANIFEST.csv`` (default): upload the manifest under the media container
  (``_manifests/RUN_ID/``, which no trigger watches) and start the run over HTTP with the
  run options given here.
- ``submit --manifest-blob NAME``: start from a blob already in the app's storage account
  (``container/name``, ``name`` in the manifests container, or a blob URL).
- ``submit MANIFEST.csv --via-trigger``: upload into the manifests container and let the
  blob trigger start the run (default options; its id, ``m-...``, follows from the blob's
  name and ETag and is printed). No function key is needed to start this way.

Then it follows the run with a live progress line (plain lines when stderr is not a
terminal) until it ends. Ctrl-C stops following and leaves the run going; ``--no-follow``
returns right after the start. The app comes from ``--app`` or BATCHCTL_APP_URL, its key
from BATCHCTL_FUNCTION_KEY; storage from ``--blob-url`` or BATCHCTL_BLOB_URL, signed in as
BATCHCTL_STORAGE_AUTH (default ``managed_identity``: DefaultAzureCredential, ``az login``).
Exit codes as ``batchctl run``: 0 every item ok, 1 items failed or rows invalid, 2 the run
failed or was cancelled, 3 bad input or the app/storage unreachable, 130 detached (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchctl.client import AppClient, AppError, RunNotFoundError, client_storage_settings
from batchctl.commands import status as status_cmd
from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.run import EXIT_OK, ProgressPrinter
from batchctl.commands.status import (
    add_app_arguments,
    add_follow_arguments,
    detach,
    fail,
    follow_and_report,
    make_client,
)
from batchctl.commands.target import RunSpec, open_app, safe_blob_name, upload_manifest
from batchctl.commands.validate import (
    MAX_DURATION_S,
    blob_name_argument,
    http_url_argument,
    manifest_argument,
    number_argument,
    run_id_argument,
)
from batchctl.contracts import RunOptions
from batchctl.runids import new_run_id, run_id_for_blob

_DEFAULTS = RunOptions()
DEFAULT_START_TIMEOUT_S = 300.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run a manifest on a deployed app and follow it",
        description=__doc__,
    )
    parser.add_argument(
        "manifest",
        nargs="?",
        type=manifest_argument,
        help="CSV with a 'video' column (blob URLs), uploaded (default: --manifest-blob)",
    )
    source = parser.add_argument_group("where the manifest comes from")
    source.add_argument(
        "--manifest-blob",
        metavar="NAME",
        type=blob_name_argument,
        help="start from a blob already uploaded, no upload",
    )
    source.add_argument(
        "--via-trigger",
        action="store_true",
        help="upload into the manifests container and let the blob trigger start the run",
    )
    source.add_argument(
        "--blob-url",
        type=http_url_argument,
        help="the storage account's blob endpoint (default: $BATCHCTL_BLOB_URL)",
    )
    parser.add_argument(
        "--run-id",
        type=run_id_argument,
        help="run id: lower-case letters, digits, single hyphens (default: generated)",
    )
    parser.add_argument("--no-follow", action="store_true", help="return right after the start")
    parser.add_argument(
        "--start-timeout",
        type=number_argument(whole=False, gt=0, le=MAX_DURATION_S),
        default=DEFAULT_START_TIMEOUT_S,
        help="--via-trigger: seconds to wait for the trigger to start the run",
    )
    add_follow_arguments(parser)
    add_app_arguments(parser)
    # The fleet's flags (--max-nodes, --vm-size, --dedicated, --sec-per-video-second) too:
    # only a deployed app has a fleet to size.
    add_run_option_arguments(
        parser,
        poll_default=_DEFAULTS.poll_interval_s,
        idle_exit_default=_DEFAULTS.idle_exit_s,
        where="app",
        fleet=True,
    )
    parser.set_defaults(handler=handle)


def submit_options(args: argparse.Namespace) -> RunOptions:
    """RunOptions from the shared run flags plus the fleet flags only a deployed app uses."""
    try:
        return run_options_from_args(args, fleet=True)
    except ValueError as error:
        raise AppError(str(error)) from None


def handle(args: argparse.Namespace) -> int:
    try:
        options = submit_options(args)
        if args.via_trigger:
            return _submit_via_trigger(args, options)
        return _submit_over_http(args, options)
    except AppError as error:
        return fail("submit", error, as_json=args.json)


def _submit_over_http(args: argparse.Namespace, options: RunOptions) -> int:
    if (args.manifest is None) == (args.manifest_blob is None):
        raise AppError("give either MANIFEST.csv (uploaded) or --manifest-blob NAME")
    # Made before uploading: a missing app URL should fail before anything is written.
    target = open_app(args.app, interval=args.interval, blob_url=args.blob_url)
    spec = RunSpec(args.manifest or args.manifest_blob, options, args.run_id or new_run_id())
    with ProgressPrinter(sys.stderr) as progress:
        outcome = target.execute(spec, progress=progress, follow=not args.no_follow)
    return target.summarize(outcome, as_json=args.json)


def _submit_via_trigger(args: argparse.Namespace, options: RunOptions) -> int:
    if args.manifest is None or args.manifest_blob is not None:
        raise AppError("--via-trigger uploads MANIFEST.csv; it cannot start from --manifest-blob")
    if args.run_id:
        raise AppError("--via-trigger: the trigger names the run (m-...); drop --run-id")
    changed = [
        name
        for name in RunOptions.model_fields
        if getattr(options, name) != getattr(_DEFAULTS, name)
    ]
    if changed:
        # The trigger starts every run with the default options; dropping them silently
        # would run something other than what was asked for.
        raise AppError(
            f"the blob trigger runs with default options, so {', '.join(changed)} would be "
            "ignored: drop them, or submit without --via-trigger"
        )
    client = None if args.no_follow else make_client(args)
    settings = client_storage_settings(args.blob_url)
    container = settings.manifests_container
    name = trigger_blob_name(args.manifest)
    etag = upload_manifest(args.manifest, container, name, args.blob_url)
    candidates = trigger_run_ids(f"{container}/{name}", etag)
    run_id = candidates[0]
    print(
        f"uploaded {args.manifest} to {container}/{name}; the blob trigger starts run {run_id}",
        file=sys.stderr,
    )
    if client is None:
        return _started_only(run_id, f"{container}/{name}", as_json=args.json)
    try:
        run_id = wait_for_trigger(
            client, candidates, timeout_s=args.start_timeout, interval=args.interval
        )
    except KeyboardInterrupt:
        return detach(run_id, None, as_json=args.json)
    return follow_and_report(
        client,
        run_id,
        interval=args.interval,
        as_json=args.json,
        extra={"manifest": f"{container}/{name}"},
    )


def _started_only(run_id: str, manifest: str, *, as_json: bool) -> int:
    print(f"follow it: batchctl status {run_id} --follow", file=sys.stderr)
    if as_json:
        print(json.dumps({"run_id": run_id, "manifest": manifest, "exit_code": EXIT_OK}))
    return EXIT_OK


def trigger_blob_name(path: Path, now: datetime | None = None) -> str:
    """``NAME-YYYYmmdd-HHMMSS.csv``: a fresh name, so no earlier manifest is overwritten."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    stem = safe_blob_name(path.stem) if path.stem else "manifest"
    return f"{stem}-{stamp}{path.suffix.lower() or '.csv'}"


def trigger_run_ids(blob_path: str, etag: str) -> list[str]:
    """The run id the blob trigger derives (``run_id_for_blob``), and its one alternative.

    The trigger reads the ETag from the host's blob properties; whether it arrives with the
    HTTP quotes the storage SDK keeps is not documented, so both spellings are watched.
    """
    spellings = [etag, etag.strip('"')] if etag else [""]
    return list(dict.fromkeys(run_id_for_blob(blob_path, value) for value in spellings))


def wait_for_trigger(
    client: AppClient, candidates: list[str], *, timeout_s: float, interval: float
) -> str:
    """The first candidate run id the app knows; AppError when none appears in time."""
    started = time.monotonic()
    while True:
        for run_id in candidates:
            try:
                client.get_status(run_id)
            except RunNotFoundError:
                continue
            return run_id
        if time.monotonic() - started >= timeout_s:
            raise AppError(
                f"no run {candidates[0]} after {timeout_s:g}s: is the Event Grid subscription "
                "to the manifests container in place? (infra/hooks/postdeploy.sh)"
            )
        status_cmd._sleep(interval)
