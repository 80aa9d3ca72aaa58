"""`batchctl serve`: the app on this machine, speaking HTTP like the deployed one.

One process: Azurite on fixed ports (Azurite's defaults, so `UseDevelopmentStorage=true`,
Azure Storage Explorer and azure-cli's default connection reach it), or the storage that
BATCHCTL_* points at; worker processes as nodes; and a server with

  the blob trigger      a CSV uploaded to the manifests container starts one run per
                        version of the blob (run id from name + ETag, as in Azure)
  POST /api/runs        the deployed app's start: 202, Location and Durable's links
  GET  /api/runs[/ID]   recent runs, one run (the run-status contract)
  POST /api/runs/ID/cancel
  /runtime/webhooks/durabletask/instances/ID   Durable's status URL, terminate, raiseEvent
  /runs/ID/report.html  the report's files (also report.json, manifest-errors.jsonl)
  /                     a live dashboard

Runs started by the trigger use the run options given here (the flags below); POST
/api/runs takes them from its body, as the deployed app does. No key is needed on a
loopback address; any other address needs BATCHCTL_FUNCTION_KEY, sent by clients in the
x-functions-key header, and is refused at start without one. Ctrl-C cancels every live run
(teardown included), waits for them to end, then stops; a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from batchctl.commands.options import (
    add_run_option_arguments,
    check_local_work,
    run_options_from_args,
)
from batchctl.commands.run import add_nodes_argument
from batchctl.commands.validate import (
    MAX_INTERVAL_S,
    BadInputError,
    existing_dir_argument,
    number_argument,
    path_argument,
)
from batchctl.settings import AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, ENV_PREFIX, StorageSettings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7071  # the Functions host's
DEFAULT_STORAGE_PORTS = (10000, 10001, 10002)  # Azurite's
FUNCTION_KEY_ENV = f"{ENV_PREFIX}FUNCTION_KEY"
MAX_CONCURRENT_RUNS = 8


def port_argument(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return port


def storage_ports_argument(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOB,QUEUE,TABLE (three ports)")
    blob, queue, table = (port_argument(part.strip()) for part in parts)
    if len({blob, queue, table}) < 3:
        raise argparse.ArgumentTypeError(f"{text!r}: the three ports must differ")
    return blob, queue, table


def host_argument(text: str) -> str:
    host = text.strip()
    if not host or any(c.isspace() or c in "/?#@" for c in host) or not host.isascii():
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or address")
    return host


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the app's HTTP API, Durable's status URL, the blob trigger and a dashboard",
        description=__doc__,
    )
    parser.add_argument(
        "--host",
        type=host_argument,
        default=DEFAULT_HOST,
        help="address to listen on; a non-loopback one needs BATCHCTL_FUNCTION_KEY",
    )
    parser.add_argument("--port", type=port_argument, default=DEFAULT_PORT, help="HTTP port")
    parser.add_argument(
        "--storage-ports",
        type=storage_ports_argument,
        default=DEFAULT_STORAGE_PORTS,
        metavar="BLOB,QUEUE,TABLE",
        help="Azurite's ports (unused when BATCHCTL_BLOB_URL points at storage)",
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
        "--max-runs",
        type=number_argument(whole=True, ge=1, le=MAX_CONCURRENT_RUNS),
        default=1,
        help="runs going at once (each with --nodes workers); later ones wait as Pending",
    )
    parser.add_argument(
        "--trigger-interval",
        type=number_argument(whole=False, gt=0, le=MAX_INTERVAL_S),
        default=1.0,
        help="seconds between looks at the manifests container",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON line on stdout when ready and when stopped"
    )
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=5.0)
    parser.set_defaults(handler=handle)


def connection_string(storage: StorageSettings) -> str | None:
    """A connection string for the storage, where it has one (Azurite's published account)."""
    if storage.storage_auth != "azurite":
        return None
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT_NAME};"
        f"AccountKey={AZURITE_ACCOUNT_KEY};BlobEndpoint={storage.blob_url};"
        f"QueueEndpoint={storage.queue_url};TableEndpoint={storage.table_url};"
    )


def _check_port_free(host: str, port: int) -> None:
    # Before Azurite starts: a port in use is the commonest start failure, say it first.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise BadInputError(
                f"cannot listen on {host}:{port}: {error.strerror or error}", "--port"
            ) from None


@contextlib.contextmanager
def _storage(args: argparse.Namespace) -> Iterator[StorageSettings]:
    """The storage BATCHCTL_* points at (read once, here), or Azurite on --storage-ports."""
    if os.environ.get(f"{ENV_PREFIX}BLOB_URL"):
        yield StorageSettings()
        return
    from batchctl.local.azurite import AzuriteError, start_azurite

    try:
        instance = start_azurite(workdir=args.out / "azurite", ports=args.storage_ports)
    except AzuriteError as error:
        raise BadInputError(str(error).splitlines()[0], "--storage-ports") from None
    try:
        yield instance.storage_settings()
    finally:
        instance.stop()


def handle(args: argparse.Namespace) -> int:
    from batchctl.local.server import is_loopback

    try:
        options = run_options_from_args(args)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    check_local_work(options)
    key = os.environ.get(FUNCTION_KEY_ENV) or None
    if not is_loopback(args.host) and key is None:
        raise BadInputError(
            f"--host {args.host} is reachable from other machines: set {FUNCTION_KEY_ENV} to "
            "a key that clients send in the x-functions-key header (no key only on loopback)",
            "--host",
        )
    _check_port_free(args.host, args.port)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(_storage(args))
        return _serve(args, options, storage, key, stack)


def _serve(
    args: argparse.Namespace,
    options: Any,
    storage: StorageSettings,
    key: str | None,
    stack: contextlib.ExitStack,
) -> int:
    from batchctl.local.app import local_app
    from batchctl.local.server import DURABLE_PREFIX, ManifestTrigger, phase_summary
    from batchctl.local.session import local_session

    services = stack.enter_context(
        local_session(
            media_root=args.media_root, nodes=args.nodes, log_dir=args.out / "logs", storage=storage
        )
    )
    # Azure's infra creates the containers and the ledger table; here we do, up front, so a
    # client can upload a manifest the moment the server says it is ready.
    services.store.ensure_containers()
    services.ledger.ensure_table()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # The same app `batchctl run` starts privately, here on the address asked for.
    app = stack.enter_context(
        local_app(
            services,
            out_dir=args.out,
            host=args.host,
            port=args.port,
            key=key,
            max_runs=args.max_runs,
            on_event=say,
        )
    )
    client = app.durable
    base_url = app.url
    trigger = ManifestTrigger(client, options, interval_s=args.trigger_interval, on_event=say)
    trigger.start()

    settings = services.settings
    ready = {
        "event": "ready",
        "app_url": base_url,
        "dashboard_url": f"{base_url}/",
        "start_url": f"{base_url}/api/runs",
        "status_url": f"{base_url}{DURABLE_PREFIX}/{{id}}",
        "connection_string": connection_string(storage),
        "development_storage": tuple(args.storage_ports) == DEFAULT_STORAGE_PORTS
        and storage.storage_auth == "azurite"
        and not os.environ.get(f"{ENV_PREFIX}BLOB_URL"),
        "blob_url": storage.blob_url,
        "queue_url": storage.queue_url,
        "table_url": storage.table_url,
        "manifests_container": settings.manifests_container,
        "key_required": key is not None,
    }
    _print_ready(ready)
    if args.json:
        print(json.dumps(ready), flush=True)

    stop: list[int] = []  # the signals that asked to stop (see _on_termination)
    previous = _on_termination(stop)
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    # From here a second Ctrl-C is a KeyboardInterrupt that aborts (workers and Azurite die
    # with this process: both are started with a parent-death signal).
    live = [i.instance_id for i in client.instances() if not i.ended.is_set()]
    say(
        f"\nstopping: cancelling {len(live)} live runs (teardown included); "
        "Ctrl-C again aborts without teardown"
        if live
        else "\nstopping"
    )
    trigger.stop()
    cancelled = client.shutdown()
    summary = phase_summary(client)
    say(f"stopped; runs by phase: {summary or 'none'}")
    if args.json:
        print(json.dumps({"event": "stopped", "cancelled": cancelled, "runs": summary}), flush=True)
    return 0


def _on_termination(stop: list[int]) -> Any:
    """SIGTERM stops the server like Ctrl-C (a service manager's stop must tear down too).

    The handler only appends: it runs in the main thread between two bytecodes, so it must
    take no lock that thread may hold (an Event's set() takes one)."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    return signal.signal(signal.SIGTERM, on_term)


def _print_ready(ready: dict[str, Any]) -> None:
    lines = [
        f"batchctl serve: ready at {ready['app_url']}",
        f"  dashboard       {ready['dashboard_url']}",
        f"  start a run     POST {ready['start_url']}   (or upload a CSV to the "
        f"'{ready['manifests_container']}' container)",
        f"  run status      {ready['app_url']}/api/runs/{{id}}   Durable's: {ready['status_url']}",
        f"  storage         {ready['blob_url']}",
    ]
    if ready["connection_string"]:
        lines.append(f"  connection      {ready['connection_string']}")
    if ready["development_storage"]:
        lines.append("                  (UseDevelopmentStorage=true reaches it too)")
    if ready["key_required"]:
        lines.append(f"  key             clients send {FUNCTION_KEY_ENV} as x-functions-key")
    lines.append("Ctrl-C stops (live runs are cancelled and torn down first)")
    print("\n".join(lines), file=sys.stderr, flush=True)
