"""`batchctl submit/status/cancel/report` against a real HTTP server speaking the app's API.

The server is a ThreadingHTTPServer in a thread. Its /api routes call the app's real
handlers (``batchctl.functions.api``); only the Durable client behind them is a stand-in,
whose instances move one scripted step per status read. It also serves the Durable status
URL in the shape the Durable extension uses (202 + Location while running, 200 when done,
500 for a failure when asked to), and checks the function key like the Functions host.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import azure.functions as func
import pytest

from batchctl import cli, client
from batchctl.activity_names import CANCEL_EVENT
from batchctl.client import RunStatus
from batchctl.commands import run as run_cmd
from batchctl.commands import status as status_cmd
from batchctl.commands import submit as submit_cmd
from batchctl.commands.run import ProgressPrinter
from batchctl.commands.validate import code_folder_argument
from batchctl.contracts import RunOptions, RunPhase, RunReport
from batchctl.functions import api
from batchctl.functions.api import ACTIVE_STATUSES
from batchctl.local.azurite import Azurite
from batchctl.runids import run_id_for_blob
from batchctl.storage import BlobStore
from tests.fakes import DURABLE_PATH, SYSTEM_KEY, FakeDurableClient, FakeInstance, Step

FUNCTION_KEY = "fn-key-4d1c9e"


def custom(
    phase: str, total: int, succeeded: int, failed: int, *, eta: float | None = None
) -> dict[str, Any]:
    """A custom status as the orchestrator sets it."""
    return {
        "phase": phase,
        "total": total,
        "succeeded": succeeded,
        "failed": failed,
        "invalid": 0,
        "eta_s": eta,
        "message": "",
    }


OK_SCRIPT: list[Step] = [
    ("Pending", None),
    ("Running", custom("validating", 0, 0, 0)),
    ("Running", custom("running", 4, 1, 0, eta=9)),
    ("Running", custom("running", 4, 3, 0, eta=3)),
    ("Completed", custom("completed", 4, 4, 0)),
]
ITEMS_FAILED_SCRIPT: list[Step] = [
    ("Running", custom("running", 4, 1, 0)),
    ("Completed", custom("completed", 4, 3, 1)),
]
# The orchestration crashed: its last custom status still says "running".
CRASHED_SCRIPT: list[Step] = [
    ("Running", custom("running", 4, 1, 0)),
    ("Failed", custom("running", 4, 1, 0)),
]
TERMINATED_SCRIPT: list[Step] = [
    ("Running", custom("running", 4, 1, 0)),
    ("Terminated", custom("running", 4, 1, 0)),
]
CANCELLED_SCRIPT: list[Step] = [
    ("Running", custom("running", 4, 1, 0)),
    ("Completed", custom("cancelled", 4, 1, 0)),
]
RUNNING_SCRIPT: list[Step] = [("Running", custom("running", 4, 2, 0, eta=20))]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeApp:
    durable: FakeDurableClient
    url: str = ""
    report_base: str = "https://acct.blob.core.windows.net"
    requests: list[Seen] = field(default_factory=list)
    fail_gets: int = 0  # answer this many GETs of /api/runs/... with 503
    fail_posts: int = 0
    friendly_route: bool = True
    before_status_read: Callable[[], None] | None = None

    def gets(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and r.path.startswith(path)]

    def posts(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "POST"]


class Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method: str) -> None:
        app: FakeApp = self.server.app
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        app.requests.append(Seen(method, self.path, headers, body))
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path.startswith(DURABLE_PATH):
            self._durable_status(app, parsed)
            return
        # Like the Functions host for auth_level=FUNCTION: a bare 401 without the key.
        if headers.get("x-functions-key") != FUNCTION_KEY:
            self._send(401)
            return
        if method == "GET" and app.fail_gets:
            app.fail_gets -= 1
            self._send(503, b"Service Unavailable")
            return
        if method == "POST" and app.fail_posts:
            app.fail_posts -= 1
            self._send(503)
            return
        parts = parsed.path.strip("/").split("/")
        request = func.HttpRequest(
            method=method,
            url=f"{app.url}{self.path}",
            body=body,
            route_params={"id": parts[2]} if len(parts) > 2 else {},
        )
        if method == "POST" and parts == ["api", "runs"]:
            response = asyncio.run(api.start_run(request, app.durable))
        elif method == "GET" and len(parts) == 3 and parts[:2] == ["api", "runs"]:
            if not app.friendly_route:
                self._send(404)
                return
            if app.before_status_read:
                app.before_status_read()
            report = f"{app.report_base}/runs/{parts[2]}/report.json"
            response = asyncio.run(api.get_run(request, app.durable, report))
            self._advance(app, parts[2])
        elif method == "POST" and len(parts) == 4 and parts[3] == "cancel":
            response = asyncio.run(api.cancel_run(request, app.durable))
        else:
            self._send(404)
            return
        self._send(
            response.status_code,
            response.get_body(),
            {**dict(response.headers), "Content-Type": response.mimetype or "text/plain"},
        )

    def _durable_status(self, app: FakeApp, parsed: urllib.parse.SplitResult) -> None:
        query = urllib.parse.parse_qs(parsed.query)
        if query.get("code") != [SYSTEM_KEY]:
            self._send(401)
            return
        instance_id = parsed.path[len(DURABLE_PATH) :]
        instance = app.durable.scripted.get(instance_id)
        if instance is None:
            self._send(404)
            return
        runtime, custom_status = instance.current()
        body = json.dumps(
            {
                "name": "run_orchestrator",
                "instanceId": instance_id,
                "runtimeStatus": runtime,
                "customStatus": custom_status,
                "output": None,
                "createdTime": "2025-01-01T00:00:00Z",
                "lastUpdatedTime": "2025-01-01T00:00:01Z",
            }
        ).encode()
        self._advance(app, instance_id)
        headers = {"Content-Type": "application/json"}
        if runtime in ACTIVE_STATUSES:
            headers["Location"] = f"{app.url}{self.path}"
            self._send(202, body, headers)
        elif runtime == "Failed" and query.get("returnInternalServerErrorOnFailure") == ["true"]:
            self._send(500, body, headers)
        else:
            self._send(200, body, headers)

    @staticmethod
    def _advance(app: FakeApp, instance_id: str) -> None:
        instance = app.durable.scripted.get(instance_id)
        if instance is not None:
            instance.advance()


@pytest.fixture
def app() -> Iterator[FakeApp]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    fake = FakeApp(durable=FakeDurableClient(base_url=url, script=list(OK_SCRIPT)), url=url)
    server.app = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", FUNCTION_KEY)
    monkeypatch.delenv("BATCHCTL_APP_URL", raising=False)
    monkeypatch.setattr(client, "DEFAULT_BACKOFF_S", 0.001)
    # A test that goes wrong fails in seconds instead of riding out an "outage" for minutes.
    monkeypatch.setattr(status_cmd, "DEFAULT_UNREACHABLE_LIMIT_S", 1.0)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict[str, Any]:
    value = json.loads(out.strip().splitlines()[-1])
    assert isinstance(value, dict)
    return value


def submit_blob(app: FakeApp, *extra: str) -> list[str]:
    return [
        "submit",
        "--manifest-blob",
        "manifests/videos.csv",
        "--app",
        app.url,
        "--interval",
        "0.01",
        *extra,
    ]


def start_instance(app: FakeApp, run_id: str, steps: list[Step]) -> None:
    app.durable.scripted[run_id] = FakeInstance(list(steps))


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- submit and follow ------------------------------------------------------------------------
def test_submit_starts_and_follows_to_completion(app: FakeApp, capsys) -> None:
    code, out, err = run_cli(capsys, *submit_blob(app, "--run-id", "run-ok-1", "--json"))

    assert code == 0
    (_, run_id, client_input) = app.durable.started[0]
    assert run_id == "run-ok-1"
    assert client_input["request"]["manifest"] == "manifests/videos.csv"
    final = last_json(out)
    assert final["run_id"] == "run-ok-1"
    assert final["phase"] == "completed"
    assert (final["succeeded"], final["failed"], final["finished"]) == (4, 0, True)
    assert final["exit_code"] == 0
    assert final["report"].endswith("/runs/run-ok-1/report.json")
    assert "run run-ok-1: completed; 4 succeeded, 0 failed" in err
    # It read the status until the end, and the script was walked to its last step.
    assert len(app.gets("/api/runs/run-ok-1")) == len(OK_SCRIPT)


def test_run_options_travel_to_the_run(app: FakeApp, capsys) -> None:
    code, _, _ = run_cli(
        capsys,
        *submit_blob(app, "--fps", "2", "--max-nodes", "7", "--dedicated", "--deadline", "2h"),
    )

    assert code == 0
    options = app.durable.started[0][2]["request"]["options"]
    assert options["fps"] == 2
    assert options["max_nodes"] == 7
    assert options["low_priority"] is False
    assert options["deadline_s"] == 7200


@pytest.mark.parametrize(
    ("script", "expected_code", "expected_phase"),
    [
        (ITEMS_FAILED_SCRIPT, 1, "completed"),
        (CRASHED_SCRIPT, 2, "failed"),
        (TERMINATED_SCRIPT, 2, "cancelled"),
        (CANCELLED_SCRIPT, 2, "cancelled"),
    ],
)
def test_exit_code_follows_how_the_run_ended(
    app: FakeApp, capsys, script: list[Step], expected_code: int, expected_phase: str
) -> None:
    app.durable.script = script

    code, out, _ = run_cli(capsys, *submit_blob(app, "--json"))

    assert code == expected_code
    final = last_json(out)
    assert final["phase"] == expected_phase
    assert final["exit_code"] == expected_code


def test_no_follow_returns_right_after_the_start(app: FakeApp, capsys) -> None:
    code, out, err = run_cli(capsys, *submit_blob(app, "--no-follow", "--json"))

    assert code == 0
    run_id = last_json(out)["run_id"]
    assert run_id in app.durable.scripted
    assert app.gets("/api/runs/") == []
    assert f"batchctl status {run_id} --follow" in err


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(
    app: FakeApp, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ProgressPrinter prints a running line at most every 5 s; its clock runs fast here.
    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr(run_cmd, "time", SimpleNamespace(monotonic=lambda: float(next(ticks))))

    code, _, err = run_cli(capsys, *submit_blob(app))

    assert code == 0
    assert "\r" not in err and "\033[K" not in err
    lines = err.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert progress == [
        "[starting] ",
        "[validating] ",
        f"[{'#' * 7}{'.' * 23}] 1/4 (1 ok, 0 failed, 3 left) eta 9s",
        # 2 more items 10 (fake) seconds after the first running line: 12 a minute.
        f"[{'#' * 22}{'.' * 8}] 3/4 (3 ok, 0 failed, 1 left) 12.0/min eta 3s",
        "[completed] ",
    ]


def test_progress_is_one_redrawn_line_on_a_terminal(
    app: FakeApp, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = TtyBuffer()
    monkeypatch.setattr("sys.stderr", terminal)

    code = cli.main(submit_blob(app))

    assert code == 0
    text = terminal.getvalue()
    # The live view (batchctl.progressview) redraws its panel in place: the cursor is hidden
    # while it draws and moved back up over the panel for the next frame.
    assert "\033[?25l" in text and "\033[1A" in text and "\033[2K" in text
    plain = re.sub(r"\033\[[0-9;?]*[A-Za-z]", "", text)
    assert re.search(r"3/4 \(3 ok, 0 failed, 1 left\) [\d.]+/(s|min) eta 3s", plain), plain


def test_ctrl_c_detaches_without_cancelling(
    app: FakeApp, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(status_cmd, "_sleep", interrupted)

    code, out, err = run_cli(capsys, *submit_blob(app, "--run-id", "run-detach", "--json"))

    assert code == status_cmd.EXIT_DETACHED == 130
    assert "batchctl status run-detach --follow" in err
    assert "keeps running" in err
    assert not [r for r in app.requests if r.path.endswith("/cancel")]
    assert app.durable.events == []
    assert last_json(out) == {"run_id": "run-detach", "detached": True, "exit_code": 130}


def test_follow_falls_back_to_the_durable_status_url(app: FakeApp, capsys) -> None:
    app.friendly_route = False  # e.g. an older app without GET /api/runs/{id}

    code, out, _ = run_cli(capsys, *submit_blob(app, "--json"))

    assert code == 0
    durable_reads = app.gets(DURABLE_PATH)
    assert len(durable_reads) == len(OK_SCRIPT)
    assert all(f"code={SYSTEM_KEY}" in r.path for r in durable_reads)
    final = last_json(out)
    assert (final["phase"], final["succeeded"], final["total"]) == ("completed", 4, 4)
    assert SYSTEM_KEY not in out


def test_a_failed_run_on_the_durable_url_is_an_answer_not_an_outage(app: FakeApp, capsys) -> None:
    app.friendly_route = False
    app.durable.script = CRASHED_SCRIPT
    app.durable.status_query = "&returnInternalServerErrorOnFailure=true"

    code, out, _ = run_cli(capsys, *submit_blob(app, "--json"))

    assert code == 2
    assert last_json(out)["phase"] == "failed"
    # The 500 carrying a runtimeStatus was read once, not retried as an outage.
    assert len(app.gets(DURABLE_PATH)) == len(CRASHED_SCRIPT)


def test_the_key_is_not_sent_to_another_origin(app: FakeApp, capsys) -> None:
    app.friendly_route = False
    # Same server, other origin: a status URL handed back must not receive the key.
    app.durable.base_url = app.url.replace("127.0.0.1", "localhost")

    code, _, _ = run_cli(capsys, *submit_blob(app))

    assert code == 0
    durable_reads = app.gets(DURABLE_PATH)
    assert durable_reads
    assert all("x-functions-key" not in r.headers for r in durable_reads)
    assert all(r.headers.get("x-functions-key") == FUNCTION_KEY for r in app.posts())


# -- errors -----------------------------------------------------------------------------------
def test_a_400_shows_the_servers_message_naming_the_field(app: FakeApp, capsys) -> None:
    # The CLI refuses such a name itself (below); the client still words the app's 400.
    with pytest.raises(client.BadRequestError, match="manifest: String should have at most 2048"):
        client.AppClient(app.url, FUNCTION_KEY).start_run("x" * 3000, RunOptions())

    code, _, err = run_cli(
        capsys, "submit", "--manifest-blob", "x" * 3000, "--app", app.url, "--json"
    )

    assert code == 3
    assert "--manifest-blob: must be 1 to 2048 characters" in err
    assert len(app.posts()) == 1  # only the direct start above reached the app
    assert app.gets("/api/runs/") == []


def test_a_wrong_key_names_the_variable(
    app: FakeApp, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", "not-the-key")

    code, out, err = run_cli(capsys, "status", "run-x", "--app", app.url, "--json")

    assert code == 3
    assert "HTTP 401" in err
    assert "the function key in BATCHCTL_FUNCTION_KEY is wrong" in err
    assert "not-the-key" not in err + out
    assert last_json(out)["exit_code"] == 3


def test_a_missing_key_names_the_variable(
    app: FakeApp, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHCTL_FUNCTION_KEY")

    code, _, err = run_cli(capsys, "cancel", "run-x", "--app", app.url)

    assert code == 3
    assert "BATCHCTL_FUNCTION_KEY is not set" in err
    assert "x-functions-key" not in app.requests[0].headers


def test_the_key_travels_as_a_header_and_never_as_an_argument(
    app: FakeApp, capsys, tmp_path: Path
) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)

    code, _, _ = run_cli(capsys, "status", "run-x", "--app", app.url)

    assert code == 0
    (seen,) = app.requests
    assert seen.headers["x-functions-key"] == FUNCTION_KEY
    assert FUNCTION_KEY not in seen.path and "code=" not in seen.path
    parser = cli.build_parser()
    commands: dict[str, argparse.ArgumentParser] = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr,assignment]
    for name in ("submit", "status", "cancel", "report"):
        # No flag takes a key; `--code` is the run's code folder (checked as a folder), not
        # Azure's `?code=` function key.
        keyish = [
            action.dest
            for action in commands[name]._actions
            if "key" in action.dest
            or (action.dest == "code" and action.type is not code_folder_argument)
        ]
        assert not keyish, name
        # submit's optional MANIFEST would take the stray key as a path: give it one.
        manifest = tmp_path / "m.csv"
        manifest.write_text("video\nhttps://acct.blob.core.windows.net/media/a.mp4\n")
        target = [str(manifest)] if name == "submit" else ["run-x"]
        code, out, err = run_cli(capsys, name, *target, "--function-key", FUNCTION_KEY, "--json")
        assert code == 3
        assert "unrecognized arguments: --function-key" in err
        assert FUNCTION_KEY not in err + out  # the refusal does not echo the secret either


def test_a_query_string_in_the_app_url_is_refused(app: FakeApp, capsys) -> None:
    code, _, err = run_cli(capsys, "status", "run-x", "--app", f"{app.url}/api?code=abc")

    assert code == 3
    assert "BATCHCTL_FUNCTION_KEY" in err
    assert app.requests == []


def test_plain_http_is_refused_beyond_this_machine(app: FakeApp, capsys) -> None:
    # The key would cross the network in clear text.
    code, _, err = run_cli(capsys, "status", "run-x", "--app", "http://func-x.azurewebsites.net")

    assert code == 3
    assert "must use https" in err
    assert app.requests == []


def test_an_unknown_run_is_a_clear_404(app: FakeApp, capsys) -> None:
    code, out, err = run_cli(capsys, "status", "run-nope", "--app", app.url, "--json")

    assert code == 3
    assert "no run 'run-nope'" in err
    assert "run-nope" in last_json(out)["error"]


def test_connection_refused_names_the_url(capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there

    code, _, err = run_cli(capsys, "status", "run-x", "--app", f"http://127.0.0.1:{port}")

    assert code == 3
    assert f"http://127.0.0.1:{port}/api/runs/run-x" in err
    assert "connection refused" in err


def test_gets_are_retried_on_503(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)
    app.fail_gets = 2

    code, out, _ = run_cli(capsys, "status", "run-x", "--app", app.url, "--json")

    assert code == 0
    assert len(app.gets("/api/runs/run-x")) == 3
    assert last_json(out)["succeeded"] == 2


def test_get_retries_are_bounded(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)
    app.fail_gets = 100

    code, _, err = run_cli(capsys, "status", "run-x", "--app", app.url)

    assert code == 3
    assert len(app.gets("/api/runs/run-x")) == client.DEFAULT_ATTEMPTS
    assert "HTTP 503" in err and "Service Unavailable" in err


def test_a_start_is_never_retried(app: FakeApp, capsys) -> None:
    app.fail_posts = 1

    code, _, err = run_cli(capsys, *submit_blob(app, "--run-id", "run-maybe-1"))

    assert code == 3
    assert len(app.posts()) == 1
    assert app.durable.started == []
    assert "HTTP 503" in err
    # The outcome is unknown to the client: it names the run so the user can look first.
    assert "`batchctl status run-maybe-1`" in err


def test_following_rides_out_an_unreachable_app(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", OK_SCRIPT)
    app.fail_gets = client.DEFAULT_ATTEMPTS + 1  # one whole status read fails, then it is back

    code, _, err = run_cli(
        capsys, "status", "run-x", "--follow", "--interval", "0.01", "--app", app.url
    )

    assert code == 0
    assert "still trying" in err


def test_the_app_url_comes_from_the_environment(
    app: FakeApp, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)
    code, _, err = run_cli(capsys, "status", "run-x")
    assert code == 3
    assert "BATCHCTL_APP_URL" in err

    monkeypatch.setenv("BATCHCTL_APP_URL", app.url + "/")
    code, _, _ = run_cli(capsys, "status", "run-x")
    assert code == 0


# -- status, cancel -----------------------------------------------------------------------------
def test_status_of_a_running_run(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)

    code, out, err = run_cli(capsys, "status", "run-x", "--app", app.url, "--json")

    assert code == 0
    final = last_json(out)
    assert (final["phase"], final["finished"], final["remaining"]) == ("running", False, 2)
    assert "2/4 done (2 ok, 0 failed, 2 left, 50%, eta 20s)" in err


def test_status_of_an_ended_run_gives_its_exit_code(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", ITEMS_FAILED_SCRIPT[-1:])

    code, out, _ = run_cli(capsys, "status", "run-x", "--app", app.url, "--json")

    assert code == 1
    assert last_json(out)["failed"] == 1


def test_a_bad_run_id_never_reaches_a_url(app: FakeApp, capsys) -> None:
    code, _, err = run_cli(capsys, "status", "../../admin", "--app", app.url)
    assert code == 3
    assert "RUN_ID: '../../admin' is not a run id" in err
    assert app.requests == []


def test_cancel_asks_the_app_and_reports(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)

    code, out, err = run_cli(capsys, "cancel", "run-x", "--app", app.url, "--json")

    assert code == 0
    assert app.durable.events == [("run-x", CANCEL_EVENT, None)]
    assert last_json(out)["cancel"] == "requested"
    assert "batchctl status run-x --follow" in err


def test_cancelling_an_ended_run_is_not_an_error(app: FakeApp, capsys) -> None:
    start_instance(app, "run-x", OK_SCRIPT[-1:])

    code, out, err = run_cli(capsys, "cancel", "run-x", "--app", app.url, "--json")

    assert code == 0
    assert app.durable.events == []
    assert last_json(out)["cancel"] == "already-ended"
    assert "already ended (Completed)" in err


def test_rate_and_eta_come_from_what_was_seen_when_the_app_has_none() -> None:
    """The live view is the one place a followed run's rate and ETA are computed: the plain
    line and the final rate come from what it was shown (batchctl.throughput)."""
    now = [100.0]
    shown = io.StringIO()
    view = ProgressPrinter(shown)
    view._clock = lambda: now[0]  # the view's clock, moved by hand
    first = RunStatus(run_id="r", runtime_status="Running", phase="running", total=40)
    view.update(first.view())
    assert view.rate is None
    now[0] = 105.0
    later = first.model_copy(update={"succeeded": 8, "failed": 2, "remaining": 30})

    view.update(later.view())

    assert view.rate == pytest.approx(2.0)
    snapshot = view.snapshot()
    assert snapshot is not None and snapshot.eta_s == pytest.approx(15.0)
    assert shown.getvalue().splitlines()[-1].endswith("2.0/s eta 15s")
    now[0] = 110.0
    view.update(later.model_copy(update={"eta_s": 99.0}).view())
    snapshot = view.snapshot()
    assert snapshot is not None and snapshot.eta_s == 99.0


def test_finished_runs_with_a_stale_phase_are_corrected() -> None:
    crashed = RunStatus(run_id="r", runtime_status="Failed", phase="running")
    assert crashed.outcome == RunPhase.FAILED
    assert status_cmd.exit_code_of(crashed) == 2
    done = RunStatus(run_id="r", runtime_status="Completed", phase="completed", total=2)
    assert status_cmd.exit_code_of(done) == 0
    still = RunStatus(run_id="r", runtime_status="Running", phase="running", failed=3)
    assert status_cmd.exit_code_of(still) == 0


# -- storage: upload, trigger, report (Azurite) -----------------------------------------------
@pytest.fixture
def storage_env(azurite: Azurite, blob_store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)


def write_manifest(path: Path) -> Path:
    path.write_text("id,video\na,https://acct.blob.core.windows.net/media/a.mp4\n")
    return path


@pytest.mark.azurite
def test_submit_uploads_outside_the_trigger_container(
    app: FakeApp, capsys, tmp_path: Path, blob_store: BlobStore, storage_env: None, run_id: str
) -> None:
    manifest = write_manifest(tmp_path / "my videos.csv")
    run = f"run-{run_id}"

    code, out, _ = run_cli(
        capsys,
        "submit",
        str(manifest),
        "--app",
        app.url,
        "--run-id",
        run,
        "--json",
        "--interval",
        "0.01",
    )

    assert code == 0
    expected = f"_manifests/{run}/my_videos.csv"
    assert app.durable.started[0][2]["request"]["manifest"] == f"media/{expected}"
    assert blob_store.download_bytes("media", expected) == manifest.read_bytes()
    assert not [n for n in blob_store.list_names("manifests") if run in n]
    assert last_json(out)["manifest"] == f"media/{expected}"


@pytest.mark.azurite
@pytest.mark.parametrize("quoted_etag", [True, False])
def test_via_trigger_follows_the_run_the_trigger_starts(
    app: FakeApp,
    capsys,
    tmp_path: Path,
    blob_store: BlobStore,
    storage_env: None,
    run_id: str,
    quoted_etag: bool,
) -> None:
    manifest = write_manifest(tmp_path / f"{run_id}.csv")
    seen: set[str] = set()

    def blob_trigger() -> None:
        # What Event Grid + the blob trigger do on upload: the real start_run_from_blob.
        for name, etag in blob_store.list_with_etags("manifests", run_id):
            if name not in seen:
                seen.add(name)
                delivered = etag if quoted_etag else etag.strip('"')
                asyncio.run(api.start_run_from_blob(f"manifests/{name}", delivered, app.durable))

    app.before_status_read = blob_trigger

    code, out, err = run_cli(
        capsys,
        "submit",
        str(manifest),
        "--via-trigger",
        "--app",
        app.url,
        "--json",
        "--interval",
        "0.01",
    )

    assert code == 0
    (name,) = seen
    etag = dict(blob_store.list_with_etags("manifests", run_id))[name]
    expected = run_id_for_blob(f"manifests/{name}", etag)
    assert f"the blob trigger starts run {expected}" in err
    started_id = app.durable.started[0][1]
    assert last_json(out)["run_id"] == started_id
    assert app.posts() == []  # started by the trigger, not over HTTP


@pytest.mark.azurite
def test_via_trigger_refuses_options_the_trigger_would_drop(
    app: FakeApp, capsys, tmp_path: Path, storage_env: None, run_id: str
) -> None:
    manifest = write_manifest(tmp_path / f"{run_id}.csv")

    code, _, err = run_cli(
        capsys, "submit", str(manifest), "--via-trigger", "--fps", "4", "--app", app.url
    )

    assert code == 3
    assert "fps" in err
    assert app.requests == []


@pytest.mark.azurite
def test_via_trigger_gives_up_when_no_run_appears(
    app: FakeApp, capsys, tmp_path: Path, storage_env: None, run_id: str
) -> None:
    manifest = write_manifest(tmp_path / f"{run_id}.csv")

    code, _, err = run_cli(
        capsys,
        "submit",
        str(manifest),
        "--via-trigger",
        "--app",
        app.url,
        "--start-timeout",
        "0.05",
        "--interval",
        "0.01",
    )

    assert code == 3
    assert "Event Grid" in err


def test_trigger_run_ids_cover_both_etag_spellings() -> None:
    ids = submit_cmd.trigger_run_ids("manifests/a.csv", '"0x8DC"')
    assert ids == [
        run_id_for_blob("manifests/a.csv", '"0x8DC"'),
        run_id_for_blob("manifests/a.csv", "0x8DC"),
    ]


@pytest.mark.azurite
def test_report_downloads_json_and_html(
    app: FakeApp,
    capsys,
    tmp_path: Path,
    azurite: Azurite,
    blob_store: BlobStore,
    storage_env: None,
    run_id: str,
) -> None:
    run = f"run-{run_id}"
    now = datetime.now(UTC)
    report = RunReport(
        run_id=run,
        phase=RunPhase.COMPLETED,
        manifest="manifests/videos.csv",
        total=4,
        succeeded=4,
        failed=0,
        invalid=0,
        started_at=now,
        finished_at=now,
        output_prefix=f"outputs/{run}/",
    )
    blob_store.upload_bytes("runs", f"{run}/report.json", report.model_dump_json())
    blob_store.upload_bytes("runs", f"{run}/report.html", "<html>plots</html>")
    start_instance(app, run, OK_SCRIPT[-1:])
    app.report_base = azurite.blob_url

    code, out, err = run_cli(
        capsys, "report", run, "--app", app.url, "--out", str(tmp_path), "--json"
    )

    assert code == 0
    assert RunReport.model_validate_json((tmp_path / run / "report.json").read_text()) == report
    assert (tmp_path / run / "report.html").read_text() == "<html>plots</html>"
    final = last_json(out)
    assert final["report"] == str(tmp_path / run / "report.json")
    assert final["html"] == str(tmp_path / run / "report.html")
    assert "4 succeeded" in err


def test_report_of_a_running_run_says_so(app: FakeApp, capsys, tmp_path: Path) -> None:
    start_instance(app, "run-x", RUNNING_SCRIPT)

    code, _, err = run_cli(capsys, "report", "run-x", "--app", app.url, "--out", str(tmp_path))

    assert code == 3
    assert "still running" in err
    assert not (tmp_path / "run-x").exists()
