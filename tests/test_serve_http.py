"""`batchctl serve`'s HTTP server on the wire: framing, smuggling, timeouts, connection bound.

Raw sockets against a real :class:`ServeHTTPServer` in this process, with small limits so
the file runs in seconds. The Durable client is the real one except that its runs are
recorded instead of driven (:class:`RecordingClient`): an instance in ``instances()`` means
the server started a run. No route used here touches storage, so the services point at an
address where nothing listens. Responses are parsed from the bytes the server sent, by
their Content-Length, so a second response on the wire is counted, never missed.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batchctl.compute.local import LocalBackend
from batchctl.local import server as server_module
from batchctl.local.server import Instance, LocalDurableClient, ServeHTTPServer
from batchctl.services import build_services
from batchctl.settings import ControllerSettings

KEY = "s3cret"
# Nothing listens on the discard port: a route that reached storage would fail loudly.
NOWHERE = "http://127.0.0.1:9/devstoreaccount1"


class RecordingClient(LocalDurableClient):
    """The server's Durable client, whose instances are kept but never driven."""

    def _run(self, instance: Instance) -> None:
        instance.ended.set()


@dataclass
class Served:
    httpd: ServeHTTPServer
    client: RecordingClient

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def run_ids(self) -> list[str]:
        return [instance.instance_id for instance in self.client.instances()]


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start servers (keyword arguments go to ServeHTTPServer); all stopped at the end."""
    settings = ControllerSettings(
        storage_auth="azurite",
        blob_url=NOWHERE,
        queue_url=NOWHERE,
        table_url=NOWHERE,
        compute_backend="local",
    )
    services = build_services(settings, LocalBackend(settings, nodes=1))
    started: list[ServeHTTPServer] = []

    def start(**limits: Any) -> Served:
        client = RecordingClient(services, base_url="http://127.0.0.1", out_dir=tmp_path)
        limits.setdefault("key", None)
        httpd = ServeHTTPServer(("127.0.0.1", 0), client, **limits)
        started.append(httpd)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        return Served(httpd, client)

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()
    services.close()


# -- the wire ----------------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """One HTTP/1.1 request's bytes; a Content-Length is added for a body unless given."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    fields = dict(headers or {})
    if body and not any(name.lower() == "content-length" for name in fields):
        fields["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def start_run(run_id: str, key: str | None = None) -> bytes:
    """A complete, valid POST /api/runs: sent on its own it starts a run."""
    body = json.dumps({"manifest": "manifests/m.csv", "run_id": run_id}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["x-functions-key"] = key
    return request("POST", "/api/runs", body, headers)


def parse(data: bytes) -> tuple[list[Response], bytes]:
    """The complete responses at the start of ``data``, and what is left after them."""
    found: list[Response] = []
    while True:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            return found, data
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), f"not a status line: {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return found, data
        found.append(Response(int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]


def until_closed(sock: socket.socket, timeout: float = 5.0) -> list[Response]:
    """Every response the server sends before it closes the connection (which it must
    within ``timeout``, cleanly: a reset could have destroyed a response)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            statuses = [answer.status for answer in parse(data)[0]]
            raise AssertionError(f"still open after {timeout} s; answered {statuses}") from None
        if not chunk:
            break
        data += chunk
    responses, rest = parse(data)
    assert rest == b"", f"bytes after the last whole response: {rest!r}"
    return responses


def responses(
    sock: socket.socket, count: int, timeout: float = 5.0, quiet_s: float = 0.3
) -> list[Response]:
    """Exactly ``count`` responses, then nothing more for ``quiet_s``, the connection open."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(parse(data)[0]) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"fewer than {count} responses: {data!r}"
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    readable, _, _ = select.select([sock], [], [], quiet_s)
    assert not readable, "more on the wire than the responses asked for (or a close)"
    found, rest = parse(data)
    assert rest == b""
    return found


def assert_refused_alone(served: Served, sent: bytes, status: int) -> None:
    """``sent`` gets one response, ``status``, and the connection closes; no run started."""
    with served.connect() as sock:
        sock.sendall(sent)
        answers = until_closed(sock)
    assert [answer.status for answer in answers] == [status], answers
    assert answers[0].headers.get("connection") == "close"
    assert served.run_ids() == []


def assert_starts_a_run(served: Served, inner: bytes, run_id: str) -> None:
    """The control: the smuggled request, sent as a request, does start a run."""
    with served.connect() as sock:
        sock.sendall(inner)
        (answer,) = responses(sock, 1)
    assert answer.status == 202, answer
    assert served.run_ids() == [run_id]


# -- request smuggling -------------------------------------------------------------------------
def test_a_cross_origin_post_refused_403_never_runs_the_request_in_its_body(
    serve: Serve,
) -> None:
    served = serve()
    inner = start_run("smuggled")
    outer = request(
        "POST", "/api/runs", inner, {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    )

    assert_refused_alone(served, outer, 403)
    assert_starts_a_run(served, inner, "smuggled")


def test_a_keyless_request_refused_401_never_runs_the_keyed_request_in_its_body(
    serve: Serve,
) -> None:
    served = serve(key=KEY)
    inner = start_run("smuggled-keyed", key=KEY)
    outer = request("POST", "/api/runs", inner, {"Content-Type": "text/plain"})

    assert_refused_alone(served, outer, 401)
    assert_starts_a_run(served, inner, "smuggled-keyed")


def test_an_oversized_body_refused_413_is_never_read_as_requests(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "MAX_BODY_BYTES", 4096)
    served = serve()
    inner = start_run("smuggled-big")
    # The request first, then padding past the limit: a server that went on reading after
    # its 413 would meet the request first.
    outer = request("POST", "/api/runs", inner + b"x" * 8192, {"Content-Type": "text/plain"})

    assert_refused_alone(served, outer, 413)
    assert_starts_a_run(served, inner, "smuggled-big")


def test_a_refused_request_with_expect_100_continue_gets_its_answer_not_a_continue(
    serve: Serve,
) -> None:
    served = serve()
    inner = start_run("never-sent")
    head = request(
        "POST",
        "/api/runs",
        headers={
            "Origin": "https://evil.example",
            "Content-Length": str(len(inner)),
            "Expect": "100-continue",
        },
    )
    with served.connect() as sock:
        sock.sendall(head)  # and waits for 100 Continue before sending the body
        answers = until_closed(sock)

    assert [answer.status for answer in answers] == [403]
    assert served.run_ids() == []


SMUGGLED = start_run("smuggled-framing")
FRAMINGS = {
    # CL.TE: a front end that reads the Content-Length passes it all on; a back end that
    # reads the chunks sees an empty body and then the request behind it.
    "content-length-and-chunked": (
        {"Content-Length": str(5 + len(SMUGGLED)), "Transfer-Encoding": "chunked"},
        b"0\r\n\r\n" + SMUGGLED,
    ),
    "chunked-alone": ({"Transfer-Encoding": "chunked"}, b"0\r\n\r\n" + SMUGGLED),
    "chunked-in-a-list": (
        {"Content-Length": str(len(SMUGGLED)), "Transfer-Encoding": "gzip, chunked"},
        SMUGGLED,
    ),
    "two-content-lengths-that-disagree": (
        {"Content-Length": "0", "content-length": str(len(SMUGGLED))},
        SMUGGLED,
    ),
    "a-content-length-list": ({"Content-Length": f"0, {len(SMUGGLED)}"}, SMUGGLED),
    "a-signed-content-length": ({"Content-Length": f"+{len(SMUGGLED)}"}, SMUGGLED),
    "a-negative-content-length": ({"Content-Length": "-1"}, SMUGGLED),
    "a-hex-content-length": ({"Content-Length": hex(len(SMUGGLED))}, SMUGGLED),
    # The stdlib's parser drops these headers silently (no length, so a body of 0 bytes).
    "a-space-before-the-colon": ({"Content-Length ": str(len(SMUGGLED))}, SMUGGLED),
    "a-transfer-encoding-folded-into-another-header": (
        {"X-Note": "a\r\n Transfer-Encoding: chunked"},
        b"0\r\n\r\n" + SMUGGLED,
    ),
    "two-host-headers": ({"host": "evil.example"}, b""),
}


@pytest.mark.parametrize("case", list(FRAMINGS))
def test_ambiguous_framing_is_refused_400_and_closed(serve: Serve, case: str) -> None:
    served = serve()
    headers, body = FRAMINGS[case]
    sent = request("POST", "/api/runs", headers=headers) + body

    assert_refused_alone(served, sent, 400)


def test_identical_repeated_content_lengths_are_one_length(serve: Serve) -> None:
    """RFC 9110 lets a recipient read repeated equal lengths as one: not ambiguous."""
    served = serve()
    body = json.dumps({"manifest": "manifests/m.csv", "run_id": "repeated-length"}).encode()
    length = str(len(body))
    sent = request("POST", "/api/runs", body, {"Content-Length": length, "content-length": length})
    with served.connect() as sock:
        sock.sendall(sent)
        (answer,) = responses(sock, 1)
    assert answer.status == 202, answer
    assert served.run_ids() == ["repeated-length"]


# -- keep-alive ----------------------------------------------------------------------------------
def test_two_pipelined_gets_get_two_responses_in_order(serve: Serve) -> None:
    served = serve()
    with served.connect() as sock:
        sock.sendall(request("GET", "/dashboard/data") + request("GET", "/favicon.ico"))
        first, second = responses(sock, 2)
    assert (first.status, second.status) == (200, 204)
    assert first.json()["runs"] == [] and first.json()["title"] == "batchctl: no runs"
    assert "connection" not in first.headers  # kept alive: both were read whole


def test_a_body_read_whole_keeps_the_connection_for_the_next_pipelined_request(
    serve: Serve,
) -> None:
    served = serve()
    status = "/runtime/webhooks/durabletask/instances/pipelined"
    with served.connect() as sock:
        sock.sendall(start_run("pipelined") + request("GET", status))
        started, followed = responses(sock, 2)
    assert started.status == 202, started
    assert followed.status == 202 and followed.json()["instanceId"] == "pipelined"
    assert served.run_ids() == ["pipelined"]


# -- timeouts ----------------------------------------------------------------------------------
def trickle(sock: socket.socket, data: bytes, every_s: float) -> tuple[float, list[Response]]:
    """Send ``data`` a byte every ``every_s`` until the server closes the connection: the
    seconds that took and what it answered first."""
    started = time.monotonic()
    for byte in data:
        sock.send(bytes([byte]))
        readable, _, _ = select.select([sock], [], [], every_s)
        if readable:
            return time.monotonic() - started, until_closed(sock)
    raise AssertionError("the whole request was sent slowly and nothing cut it off")


def test_a_request_line_and_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline(
    serve: Serve,
) -> None:
    # Every byte comes well within the idle timeout: only the request's deadline ends it.
    served = serve(idle_timeout_s=2.0, request_timeout_s=1.0)
    slow = request("GET", "/api/runs", headers={"X-Padding": "p" * 40})  # 4+ s at this pace
    with served.connect() as sock:
        elapsed, answers = trickle(sock, slow, every_s=0.05)
    assert 0.8 <= elapsed <= 2.0, elapsed
    assert answers == []  # the request never arrived: closed without an answer


def test_a_body_sent_a_byte_at_a_time_is_cut_off_at_the_deadline_with_408(serve: Serve) -> None:
    served = serve(idle_timeout_s=2.0, request_timeout_s=1.0)
    inner = start_run("slow-body")
    head, body = inner.split(b"\r\n\r\n", 1)
    with served.connect() as sock:
        sock.sendall(head + b"\r\n\r\n")  # the request's first bytes: its clock starts
        elapsed, answers = trickle(sock, body, every_s=0.05)
    assert 0.8 <= elapsed <= 2.0, elapsed
    assert [answer.status for answer in answers] == [408]
    assert served.run_ids() == []


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(serve: Serve) -> None:
    served = serve(idle_timeout_s=0.5)
    with served.connect() as sock:
        sock.sendall(request("GET", "/favicon.ico"))
        (answer,) = responses(sock, 1, quiet_s=0)
        answered = time.monotonic()
        assert answer.status == 204 and "connection" not in answer.headers  # kept alive
        assert until_closed(sock) == []
        idle = time.monotonic() - answered
    assert 0.4 <= idle <= 2.0, idle


# -- the connection bound ------------------------------------------------------------------------
def test_connections_over_the_bound_are_refused_503_and_start_no_thread(serve: Serve) -> None:
    bound = 3
    served = serve(max_connections=bound, idle_timeout_s=10.0)
    threads_before = threading.active_count()
    kept = [served.connect() for _ in range(bound)]
    try:
        for sock in kept:  # each is served, and its thread waits for its next request
            sock.sendall(request("GET", "/favicon.ico"))
            assert [a.status for a in responses(sock, 1, quiet_s=0)] == [204]
        assert threading.active_count() <= threads_before + bound

        for _ in range(10):  # a burst over the bound: each is answered at once, and closed
            started = time.monotonic()
            with served.connect() as sock:
                answers = until_closed(sock, timeout=1.0)
            assert time.monotonic() - started < 1.0
            assert [a.status for a in answers] == [503], answers
            assert answers[0].headers["connection"] == "close"
            assert answers[0].headers["retry-after"] == "1"
        assert threading.active_count() <= threads_before + bound

        # A connection that ends frees its place for the next one.
        kept.pop().close()
        deadline = time.monotonic() + 3.0
        while True:
            with served.connect() as sock:
                sock.sendall(request("GET", "/favicon.ico", headers={"Connection": "close"}))
                statuses = [a.status for a in until_closed(sock)]
            if statuses == [204] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert statuses == [204]
    finally:
        for sock in kept:
            sock.close()


def test_the_limits_must_be_usable(serve: Serve) -> None:
    for limits in ({"max_connections": 0}, {"idle_timeout_s": 0}, {"request_timeout_s": -1}):
        with pytest.raises(ValueError):
            serve(**limits)
