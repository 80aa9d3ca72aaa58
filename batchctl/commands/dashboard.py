"""`batchctl dashboard [RUN_ID ...]`: the live dashboard of a deployed app's runs, on this machine.

Serves the page ``batchctl serve`` draws (phase, phase timeline, progress over time, rate,
ETA, per-node throughput, failures by class, the report) at http://127.0.0.1:PORT/, for the
runs of a deployed app: every RUN_ID named, else the runs created in the last --days.
It asks the app (``GET /api/runs``, ``GET /api/runs/RUN_ID``) every --interval seconds
through the same client `status` uses, and once a run has ended downloads its report
(as `batchctl report` does) for the per-node and failures-by-class tables and the links.
While a run goes, its failures by class are read from the run's ledger with your own
identity when it may (Storage Table Data Reader on the ledger table; the table endpoint from
BATCHCTL_TABLE_URL or the blob endpoint's account), else they show once the report exists.

The app comes from --app, BATCHCTL_APP_URL or azd's environment (.azure/<env>/.env), its
function key only from BATCHCTL_FUNCTION_KEY. The key stays in this process: the page and
everything it fetches are served on loopback without it, and none of it contains it
(docs/dashboard.md says why this, and not a page served by the app itself). The first look
at the app happens before anything is served, so a wrong URL or key fails at once.
Exit codes: 0 after Ctrl-C; 3 bad input, or the app refused or could not be reached.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

from batchctl import dashboard
from batchctl.client import AppClient, AppError, display_url
from batchctl.commands.status import add_app_arguments, fail
from batchctl.commands.validate import MAX_INTERVAL_S, number_argument, run_id_argument
from batchctl.runstatus import RunStatus
from batchctl.settings import ENV_PREFIX, StorageSettings
from batchctl.throughput import eta_s, rate_over

DEFAULT_PORT: Final = 8765
DEFAULT_INTERVAL_S: Final = 5.0
DEFAULT_DAYS: Final = 2
DEFAULT_LIMIT: Final = 20
HOST: Final = "127.0.0.1"
# The rate shown is over the last this-many seconds of samples (as `serve`'s page).
RATE_WINDOW_S: Final = 60.0
# A report that could not be read is tried again after this long (a role just granted).
REPORT_RETRY_S: Final = 60.0
# The report's files this server hands out (downloaded from the run's storage), by name.
REPORT_FILES: Final = {
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}
# The report's own page is self-contained (inline plots); it may load nothing else.
REPORT_POLICY: Final = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
LIVE_FAILURES_NOTE: Final = (
    "their classes show once the run's report is written (the app's API gives counts only)"
)
# Live failure classes: at most this many failed records read per look, a look at most this
# often (and only when the failed count moved), and after a refusal not again for a while.
MAX_LIVE_FAILURES: Final = 2000
LEDGER_REFRESH_S: Final = 15.0
LEDGER_RETRY_S: Final = 300.0
TABLE_URL_ENV: Final = f"{ENV_PREFIX}TABLE_URL"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="a live dashboard of a deployed app's runs, served on this machine",
        description=__doc__,
    )
    parser.add_argument(
        "run_ids",
        nargs="*",
        type=run_id_argument,
        metavar="RUN_ID",
        help="the runs to show (default: the runs created in the last --days)",
    )
    parser.add_argument(
        "--port",
        type=number_argument(whole=True, ge=0, le=65535),
        default=DEFAULT_PORT,
        help=f"the loopback port to serve on (0: any free one; default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--interval",
        type=number_argument(whole=False, gt=0, le=MAX_INTERVAL_S),
        default=DEFAULT_INTERVAL_S,
        help=f"seconds between looks at the app (> 0, <= {MAX_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--days",
        type=number_argument(whole=True, ge=1),
        default=DEFAULT_DAYS,
        help=f"without RUN_IDs: runs created in the last N days (default {DEFAULT_DAYS})",
    )
    parser.add_argument(
        "--limit",
        type=number_argument(whole=True, ge=1),
        default=DEFAULT_LIMIT,
        help=f"without RUN_IDs: at most N runs, newest first (default {DEFAULT_LIMIT})",
    )
    add_app_arguments(parser)
    parser.set_defaults(handler=handle)


# -- what the dashboard knows of each run ---------------------------------------------------------
@dataclass
class TrackedRun:
    """One run as this dashboard has seen it: its last status, its history and its report."""

    status: RunStatus
    first_seen: float
    history: dashboard.RunHistory = field(default_factory=dashboard.RunHistory)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    report_dir: Path | None = None
    report_note: str | None = None
    report_tried_at: float | None = None
    # The live ledger read: when it last ran, at what failed count, and why it could not.
    ledger_read_at: float | None = None
    ledger_failed_seen: int = 0
    ledger_note: str | None = None


def seconds_since_start(status: RunStatus, now: datetime, seen_for_s: float) -> float:
    """Where "now" sits on the run's own clock: since its ``started_at`` when the app says
    (so a dashboard opened late draws the run from its start), else since first seen; an
    ended run's clock stops at its last update."""
    if status.started_at is None:
        return seen_for_s
    started = (
        status.started_at if status.started_at.tzinfo else status.started_at.replace(tzinfo=UTC)
    )
    end = status.updated_at if status.finished and status.updated_at is not None else now
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    return max((end - started).total_seconds(), 0.0)


def report_tables(report: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nodes, failures) from a report.json body; empty for a report without statistics."""
    stats = report.get("stats") if isinstance(report, dict) else None
    if not isinstance(stats, dict):
        return [], []
    nodes = [n for n in stats.get("nodes") or [] if isinstance(n, dict)]
    failures = [f for f in stats.get("failures") or [] if isinstance(f, dict)]
    return nodes, failures


def table_url_for(blob_url: str) -> str | None:
    """The table endpoint of the account a blob endpoint names (Azure's naming: the service
    is the host's second label), or None where the URL does not say (an emulator's path)."""
    parsed = urllib.parse.urlsplit(blob_url)
    labels = (parsed.hostname or "").split(".")
    if len(labels) < 3 or labels[1] != "blob":
        return None
    host = ".".join([labels[0], "table", *labels[2:]])
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}"


def ledger_settings() -> StorageSettings:
    """Storage settings for reading the ledger from here: the blob endpoint as `batchctl
    report` finds it, the table endpoint from BATCHCTL_TABLE_URL or derived from it."""
    from batchctl.client import client_storage_settings

    settings = client_storage_settings()
    table_url = os.environ.get(TABLE_URL_ENV) or table_url_for(settings.blob_url)
    if not table_url:
        raise AppError(f"no table endpoint for {settings.blob_url}: set {TABLE_URL_ENV}")
    return settings.model_copy(update={"table_url": table_url.rstrip("/")})


LedgerFailures = Callable[[str, int], list[Any]]


def _read_ledger_failures(run_id: str, limit: int) -> list[Any]:
    from batchctl.storage.ledger import Ledger

    ledger = Ledger(ledger_settings())
    try:
        return ledger.failures(run_id, limit=limit)
    finally:
        ledger.close()


def _report_path(run_id: str, name: str) -> str:
    return f"/runs/{urllib.parse.quote(run_id, safe='')}/{name}"


DownloadReport = Callable[[str, str, Path], tuple[Path, Path | None]]


def _download_report(link: str, run_id: str, target: Path) -> tuple[Path, Path | None]:
    from batchctl.commands.report import download_report

    return download_report(link, run_id, target)


class DeployedRuns:
    """Looks at a deployed app's runs through :class:`AppClient` and keeps what the page
    shows of them. ``look`` is one look (called by the poller thread); ``page_data`` what the
    page fetches. The function key lives in the client only, never in anything kept here."""

    def __init__(
        self,
        client: AppClient,
        run_ids: Sequence[str],
        *,
        days: int,
        limit: int,
        reports_dir: Path,
        download: DownloadReport = _download_report,
        ledger_failures: LedgerFailures | None = _read_ledger_failures,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.client = client
        self.run_ids = list(run_ids)
        self.days = days
        self.limit = limit
        self.reports_dir = reports_dir
        self._download = download
        self._ledger_failures = ledger_failures
        self._clock = clock
        self._wall_clock = wall_clock
        self._runs: dict[str, TrackedRun] = {}
        self._order: list[str] = []
        self._problem: str | None = None
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        return display_url(self.client.app_url)

    def fetch(self) -> list[RunStatus]:
        """The runs' statuses from the app (raises AppError)."""
        if self.run_ids:
            return [self.client.get_status(run_id) for run_id in self.run_ids]
        return self.client.list_runs(self.days, self.limit)

    def look(self) -> None:
        """One look at the app; a failure is kept (and shown) and the last data stays."""
        try:
            statuses = self.fetch()
        except AppError as error:
            with self._lock:
                self._problem = str(error)
            return
        self.record(statuses)

    def record(self, statuses: Sequence[RunStatus]) -> None:
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            self._problem = None
            self._order = [status.run_id for status in statuses]
            for status in statuses:
                tracked = self._runs.get(status.run_id)
                if tracked is None:
                    tracked = self._runs[status.run_id] = TrackedRun(status, now)
                tracked.status = status
                t_s = seconds_since_start(status, wall, now - tracked.first_seen)
                tracked.history.observe(t_s, status.view())
        for status in statuses:
            tracked = self._runs[status.run_id]
            if status.finished and status.report:
                self._fetch_report(tracked, status.report)
            if tracked.report_dir is None and status.failed:
                self._read_failures(tracked)

    def _read_failures(self, tracked: TrackedRun) -> None:
        """The failure classes so far, from the ledger, with this user's identity."""
        status = tracked.status
        now = self._clock()
        if self._ledger_failures is None or status.failed <= tracked.ledger_failed_seen:
            return
        wait = LEDGER_RETRY_S if tracked.ledger_note else LEDGER_REFRESH_S
        if tracked.ledger_read_at is not None and now - tracked.ledger_read_at < wait:
            return
        tracked.ledger_read_at = now
        started = status.started_at or status.created_at or self._wall_clock()
        try:
            from batchctl.reporting.analysis import live_tables

            results = self._ledger_failures(status.run_id, MAX_LIVE_FAILURES)
            # Grouped as the report and `serve` group them.
            failures = live_tables(results, started)["failures"]
        except Exception as error:  # the storage SDK's many errors: one line on the page
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            tracked.ledger_note = (
                f"{LIVE_FAILURES_NOTE}; reading them live from the ledger failed: "
                f"{reason or type(error).__name__} (that needs Storage Table Data Reader "
                "on the ledger table)"
            )
            return
        read = sum(f["count"] for f in failures)
        with self._lock:
            tracked.failures = failures
            tracked.ledger_failed_seen = status.failed
            tracked.ledger_note = (
                f"the first {read} failures read so far" if read >= MAX_LIVE_FAILURES else None
            )

    def _fetch_report(self, tracked: TrackedRun, link: str) -> None:
        if tracked.report_dir is not None:
            return
        now = self._clock()
        if tracked.report_tried_at is not None and now - tracked.report_tried_at < REPORT_RETRY_S:
            return
        tracked.report_tried_at = now
        run_id = tracked.status.run_id
        target = self.reports_dir / urllib.parse.quote(run_id, safe="")
        target.mkdir(parents=True, exist_ok=True)
        try:
            json_path, _ = self._download(link, run_id, target)
            nodes, failures = report_tables(json.loads(json_path.read_text(encoding="utf-8")))
        except (AppError, OSError, ValueError) as error:
            tracked.report_note = (
                f"the report is at {display_url(link)}, but it could not be read from here: {error}"
            )
            return
        with self._lock:
            tracked.nodes, tracked.failures = nodes, failures
            tracked.report_dir, tracked.report_note = target, None

    def report_file(self, run_id: str, name: str) -> Path | None:
        with self._lock:
            tracked = self._runs.get(run_id)
            folder = tracked.report_dir if tracked is not None else None
        if folder is None or name not in REPORT_FILES:
            return None
        path = folder / name
        return path if path.is_file() else None

    def runs(self) -> list[dict[str, Any]]:
        """Each run's data as ``dashboard.run_card`` takes it, in the app's order."""
        now, wall = self._clock(), self._wall_clock()
        shown: list[dict[str, Any]] = []
        with self._lock:
            tracked_runs = [self._runs[run_id] for run_id in self._order if run_id in self._runs]
        for tracked in tracked_runs:
            status = tracked.status
            samples = tracked.history.samples
            elapsed = seconds_since_start(status, wall, now - tracked.first_seen)
            rate = rate_over([(s[0], s[1] + s[2]) for s in samples], RATE_WINDOW_S)
            folder = tracked.report_dir
            has_report = folder is not None
            html = folder is not None and (folder / "report.html").is_file()
            shown.append(
                {
                    "status": status.view(),
                    "samples": samples,
                    "phases": tracked.history.phases,
                    "elapsed_s": elapsed,
                    "rate_per_s": rate,
                    "eta_s": eta_s(status.eta_s, status.remaining, rate, finished=status.finished),
                    "nodes": tracked.nodes,
                    "failures": tracked.failures,
                    "failures_note": tracked.ledger_note or LIVE_FAILURES_NOTE,
                    "report_html": _report_path(status.run_id, "report.html") if html else None,
                    "report_json": (
                        _report_path(status.run_id, "report.json") if has_report else None
                    ),
                    "report_note": tracked.report_note,
                }
            )
        return shown

    def page_data(self) -> dict[str, Any]:
        with self._lock:
            problem = self._problem
        if self.run_ids:
            empty = "None of the runs named is known to the app."
        else:
            empty = (
                f"No runs created in the last {self.days} day{'s' * (self.days != 1)} "
                "(--days): start one with "
                "batchctl submit, or upload a manifest to the manifests container."
            )
        return dashboard.page_data(self.runs(), source=self.source, problem=problem, empty=empty)


# -- the loopback server ---------------------------------------------------------------------------
class DashboardServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, runs: DeployedRuns) -> None:
        self.runs = runs
        self.page = dashboard.page(f"batchctl dashboard: {runs.source}").encode()
        super().__init__((HOST, port), DashboardHandler)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


class DashboardHandler(http.server.BaseHTTPRequestHandler):
    """GET only: the page, its data and the reports' files. Anything else is refused."""

    server: DashboardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a page polling every second would fill the terminal

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _refused(self) -> str | None:
        # A page open in this machine's browser may send requests here, and through DNS
        # rebinding under another name: only this machine's names, and no other origin.
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host and host not in LOOPBACK_NAMES:
            return f"host {host!r} is not this machine"
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host"):
            return "cross-origin requests are not accepted"
        return None

    def do_GET(self) -> None:
        refused = self._refused()
        if refused:
            self._error(403, refused)
            return
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        if path == "/":
            policy = {"Content-Security-Policy": dashboard.CONTENT_SECURITY_POLICY}
            self._send(200, self.server.page, "text/html; charset=utf-8", policy)
        elif path == "/favicon.ico":
            self._send(204, b"", "text/plain")
        elif path == dashboard.DATA_PATH:
            body = json.dumps(self.server.runs.page_data()).encode()
            self._send(200, body, "application/json")
        else:
            parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
            found = (
                self.server.runs.report_file(parts[1], parts[2])
                if len(parts) == 3 and parts[0] == "runs"
                else None
            )
            if found is None:
                self._error(404, f"nothing at {path}")
                return
            name = parts[2]
            headers = {"Content-Security-Policy": REPORT_POLICY} if name == "report.html" else {}
            self._send(200, found.read_bytes(), REPORT_FILES[name], headers)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _read_only(self) -> None:
        # Read-only on purpose: the key's other powers (start, cancel) are not lent to a page.
        self.close_connection = True  # its body, if any, is not read
        self._error(405, "this dashboard only reads; use batchctl submit / cancel")

    def do_POST(self) -> None:
        self._read_only()

    def do_PUT(self) -> None:
        self._read_only()

    def do_DELETE(self) -> None:
        self._read_only()

    def do_PATCH(self) -> None:
        self._read_only()


# -- the command ---------------------------------------------------------------------------------
def poll_forever(runs: DeployedRuns, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        runs.look()


def handle(args: argparse.Namespace) -> int:
    as_json: bool = args.json
    try:
        client = AppClient.from_environment(args.app)
    except AppError as error:
        return fail("dashboard", error, as_json=as_json)
    reports = Path(tempfile.mkdtemp(prefix="batchctl-dashboard-"))
    try:
        runs = DeployedRuns(
            client, args.run_ids, days=args.days, limit=args.limit, reports_dir=reports
        )
        try:
            runs.record(runs.fetch())  # the first look: a wrong URL or key fails here
        except AppError as error:
            return fail("dashboard", error, as_json=as_json)
        try:
            server = DashboardServer(args.port, runs)
        except OSError as error:
            return fail(
                "dashboard", f"cannot serve on {HOST}:{args.port}: {error}", as_json=as_json
            )
        return _serve(server, runs, args.interval, as_json=as_json)
    finally:
        shutil.rmtree(reports, ignore_errors=True)


def _serve(server: DashboardServer, runs: DeployedRuns, interval: float, *, as_json: bool) -> int:
    stop = threading.Event()
    poller = threading.Thread(target=poll_forever, args=(runs, interval, stop), daemon=True)
    # Daemons: whatever ends this process (a second Ctrl-C included) must not wait on them.
    serving = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
    )
    stopping: list[int] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)  # no lock here: the main loop below looks at the list

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        poller.start()
        serving.start()
        if as_json:
            print(json.dumps({"url": server.url, "app": runs.source}), flush=True)
        else:
            print(f"dashboard of {runs.source} at {server.url} (Ctrl-C stops)", flush=True)
        while not stopping:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
        if serving.is_alive():
            server.shutdown()  # waits for serve_forever: only when it runs
        server.server_close()
        serving.join(5)
    print("dashboard stopped", file=sys.stderr)
    return 0
