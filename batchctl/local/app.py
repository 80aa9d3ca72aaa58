"""The app on this machine: the Functions app's HTTP API served from this process.

``batchctl serve`` and ``batchctl run`` (and ``resume``) both start it: the local Durable
client (:class:`~batchctl.local.server.LocalDurableClient`) behind the same handlers and the
same HTTP server, on a loopback port. ``run`` then does what ``submit`` does against a
deployed app, through the same :class:`~batchctl.client.AppClient`: ``POST /api/runs``,
``GET /api/runs/{id}`` until the run ends, ``POST /api/runs/{id}/cancel`` on Ctrl-C. So the
API users script against in Azure is the one every local run exercises (as Ray's CLI is "a
client for an address", local or remote). The commands reach it only through their target
factory (batchctl.commands.target's local target).
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchctl.client import AppClient, RunStatus

# Types only: `batchctl watch` imports this module to build the parser, and the services
# load the storage clients, which every `batchctl run` loads after its workers have started.
if TYPE_CHECKING:
    from batchctl.services import Services

# How often `run` asks the local app for its run's status: a request to this process
# costs about a millisecond, and the run's end is seen this much sooner (its copy-out and
# the command's end wait for it).
FOLLOW_INTERVAL_S = 0.1
# How often the app's HTTP server checks for its shutdown (a select() timeout: costs nothing).
SERVE_POLL_S = 0.05
LOOPBACK = "127.0.0.1"


@dataclass
class LocalApp:
    """A started local app: where it answers, the key it wants, its Durable client."""

    url: str
    key: str | None
    durable: Any  # LocalDurableClient (imported lazily: it imports the Functions handlers)
    services: Services

    def client(self) -> AppClient:
        """A client of this app, as `submit` has of a deployed one (key in a header)."""
        return AppClient(self.url, self.key)


@contextlib.contextmanager
def local_app(
    services: Services,
    *,
    out_dir: Path,
    host: str = LOOPBACK,
    port: int = 0,
    key: str | None = None,
    max_runs: int = 1,
    on_event: Callable[[str], None] | None = None,
    on_generation: Callable[[str, Any], None] | None = None,
    copy_out: bool = True,
) -> Iterator[LocalApp]:
    """Serve the app over ``services`` on ``host:port`` (0: a free port) while the block
    lasts; at its end every live run is cancelled (flag, then event) and torn down."""
    from batchctl.local.server import LocalDurableClient, ServeHTTPServer

    durable = LocalDurableClient(
        services,
        base_url=f"http://{host}:{port}",
        out_dir=out_dir,
        max_runs=max_runs,
        on_event=on_event,
        on_generation=on_generation,
        copy_out=copy_out,
    )
    httpd = ServeHTTPServer((host, port), durable, key=key)
    bound_port = int(httpd.server_address[1])
    url = f"http://{_url_host(host)}:{bound_port}"
    durable.base_url = url
    # Its poll interval is how long the shutdown at the end of every `batchctl run` waits.
    thread = threading.Thread(
        target=httpd.serve_forever, args=(SERVE_POLL_S,), name="http", daemon=True
    )
    thread.start()
    try:
        yield LocalApp(url=url, key=key, durable=durable, services=services)
    except KeyboardInterrupt:
        # The second Ctrl-C: abort without waiting for teardown (the run's folder keeps
        # what `batchctl resume` needs; its workers stop with this process).
        durable.shutdown(timeout_s=0)
        raise
    else:
        durable.shutdown()
    finally:
        httpd.shutdown()
        thread.join(5)
        httpd.server_close()


def pause_until(ended: threading.Event | None) -> Callable[[float], None]:
    """A follow's pause: ``seconds``, or until ``ended`` is set, whichever comes first. Once
    set, every pause is whole again: a status that still reads as active, or an app that does
    not answer, is asked every interval rather than in a loop with no pause."""

    def pause(seconds: float) -> None:
        if ended is None or ended.is_set():
            time.sleep(seconds)
        else:
            ended.wait(seconds)

    return pause


def private_key() -> str:
    """A key for an app only this process talks to: other local users' processes cannot
    reach its runs through the loopback port."""
    return secrets.token_urlsafe(24)


def _url_host(host: str) -> str:
    # Where a client on this machine reaches a server bound to every address.
    if host in ("0.0.0.0", "", "::"):  # noqa: S104 - a bind address being translated, not bound
        return LOOPBACK
    return f"[{host}]" if ":" in host else host


def follow_with_cancel(
    client: AppClient,
    run_id: str,
    on_status: Callable[[dict[str, Any]], None] | None,
    *,
    interval: float = FOLLOW_INTERVAL_S,
    ended: threading.Event | None = None,
) -> RunStatus:
    """Follow the run to its end. The first Ctrl-C cancels it through the cancel endpoint
    (the run tears its compute down and writes its report, and is followed to that end);
    a second one aborts (KeyboardInterrupt).

    ``ended``: set when the run's orchestration has ended in this process (the local app's
    instance): the wait between two status requests stops at once, so the end is seen
    when it happens rather than up to ``interval`` later. The status request still says it
    (the client reads the API as it would a deployed app's)."""
    cancelled = False
    pause = pause_until(ended)
    while True:
        try:
            return client.follow(
                run_id,
                interval=interval,
                on_status=on_status or (lambda status: None),
                pause=pause,
            )
        except KeyboardInterrupt:
            if cancelled:
                raise
            cancelled = True
            print("\ncancelling (Ctrl-C again to abort without teardown)", file=sys.stderr)
            try:
                client.cancel(run_id)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # the follow goes on; say why no cancel was sent
                print(f"could not cancel run {run_id}: {error}", file=sys.stderr)
