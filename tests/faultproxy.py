"""A fault-injecting HTTP proxy in front of Azurite's blob, queue and table endpoints.

Storage misbehaves in a few ways a client must survive, and a test can only show that it
does by making storage misbehave. Each proxy reads one HTTP/1.1 request at a time from its
client and, as a seeded :class:`random.Random` decides (:class:`Weather`), either passes it
to Azurite untouched or:

- ``busy``: answers 503 ServerBusy itself, with the body storage sends (the XML ``<Error>``
  of blob and queue, the JSON ``odata.error`` of tables; the shapes the SDKs parse in
  ``azure/storage/*/_shared/response_handlers.py`` and ``azure/data/tables/_error.py``);
- ``reset_before``: resets the connection before the request reaches Azurite;
- ``reset_during``: passes it on, then sends the response's head and part of its body and
  resets the connection (a download cut off mid-body);
- ``reset_after``: passes it on (Azurite did the work) and resets the connection instead of
  answering;

(or a test forces the next outcomes, :meth:`Weather.force`)

and it may add latency to any request. :meth:`Weather.spell` answers every request with 503
for N seconds (a throttling spell), and :meth:`Weather.spell_when` starts one at the first
request a predicate picks (say, the copy-out's first download).

Requests go to Azurite on a fresh connection each (``Connection: close``), while the client
keeps its own connection alive, as it would with real storage. A reset is a TCP RST
(SO_LINGER 0), which clients see as ``ConnectionResetError``, not a clean end of stream.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import json
import random
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Literal
from urllib.parse import urlsplit

from batchctl.settings import StorageSettings, azurite_environment

Service = Literal["blob", "queue", "table"]
Outcome = Literal["pass", "busy", "reset_before", "reset_during", "reset_after"]
SERVICES: tuple[Service, ...] = ("blob", "queue", "table")

# Storage's own words for ServerBusy (the REST API's common error codes).
BUSY_MESSAGE = "The server is currently unable to receive requests. Please retry your request."
_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it (the path without its query)."""

    service: Service
    method: str
    path: str
    query: str
    headers: dict[str, str]


def _never(request: Request) -> bool:
    return False


def _always(request: Request) -> bool:
    return True


@dataclass(frozen=True)
class Faults:
    """The share of requests each fault hits (drawn per request), and the added latency."""

    busy: float = 0.0
    reset_before: float = 0.0
    reset_during: float = 0.0
    reset_after: float = 0.0
    latency_s: tuple[float, float] = (0.0, 0.0)
    # Requests never faulted at random (a spell still answers them 503).
    spare: Callable[[Request], bool] = _never
    # Each kind with a share above 0 hits at least once among the first ``each_within``
    # requests not spared, at places drawn from the weather's seed: which requests a run
    # makes, and in what order, depends on its threads, so a share alone leaves a rare
    # kind out of some runs, and a test that demands every kind fails by chance.
    each_within: int = 0

    def __post_init__(self) -> None:
        shares = (self.busy, self.reset_before, self.reset_during, self.reset_after)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(f"fault shares must be >= 0 and sum to at most 1: {shares}")
        if 0 < self.each_within < sum(share > 0 for share in shares):
            raise ValueError(f"each_within={self.each_within} has no room for every kind")

    def kinds(self) -> list[Outcome]:
        """The fault kinds this weather draws: those with a share above 0."""
        drawn: list[tuple[Outcome, float]] = [
            ("busy", self.busy),
            ("reset_before", self.reset_before),
            ("reset_during", self.reset_during),
            ("reset_after", self.reset_after),
        ]
        return [name for name, share in drawn if share > 0]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    latency_s: float = 0.0
    cut: float = 0.5  # reset_during: the share of the body sent before the reset


@dataclass
class Weather:
    """What happens to each request, for all three services together: seeded, counted."""

    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    log: list[tuple[Request, Outcome]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._spell_until = 0.0
        self._triggers: list[tuple[Callable[[Request], bool], float]] = []
        self._forced: list[tuple[Callable[[Request], bool], Outcome]] = []
        # Faults.each_within: the sure places for the faults now set (they may be replaced).
        self._sure_for: Faults | None = None
        self._sure: dict[int, Outcome] = {}
        self._unspared = 0

    def force(
        self, outcome: Outcome, times: int, when: Callable[[Request], bool] = _always
    ) -> None:
        """The next ``times`` requests that ``when`` picks get ``outcome``, not a draw."""
        with self._lock:
            self._forced.extend([(when, outcome)] * times)

    def spell(self, seconds: float) -> None:
        """Answer every request 503 ServerBusy for the next ``seconds``."""
        with self._lock:
            self._spell_until = max(self._spell_until, time.monotonic() + seconds)

    def spell_when(self, predicate: Callable[[Request], bool], seconds: float) -> None:
        """Start a spell of ``seconds`` at the first request ``predicate`` picks (once)."""
        with self._lock:
            self._triggers.append((predicate, seconds))

    def in_spell(self) -> bool:
        return time.monotonic() < self._spell_until

    def wait_out_spell(self) -> None:
        """Sleep until the spell now running (if any) is over."""
        time.sleep(max(0.0, self._spell_until - time.monotonic()) + 0.05)

    def decide(self, request: Request) -> Decision:
        with self._lock:
            now = time.monotonic()
            for trigger in list(self._triggers):
                predicate, seconds = trigger
                if predicate(request):
                    self._triggers.remove(trigger)
                    self._spell_until = max(self._spell_until, now + seconds)
                    self.counts["spells"] += 1
            forced = next((f for f in self._forced if f[0](request)), None)
            if now < self._spell_until:
                decision = Decision("busy")
            elif forced is not None:
                self._forced.remove(forced)
                decision = Decision(forced[1])
            else:
                decision = self._draw(request)
            self.counts[decision.outcome] += 1
            self.log.append((request, decision.outcome))
            return decision

    def _draw(self, request: Request) -> Decision:
        # Always three draws, so one request's outcome never shifts the next one's.
        roll, latency, cut = self._rng.random(), self._rng.random(), self._rng.random()
        faults = self.faults
        low, high = faults.latency_s
        latency_s = low + (high - low) * latency
        outcome: Outcome = "pass"
        if not faults.spare(request):
            sure = self._sure_place(faults)
            if sure is not None:
                outcome = sure
            else:
                edge = 0.0
                for name in faults.kinds():
                    edge += getattr(faults, name)
                    if roll < edge:
                        outcome = name
                        break
        return Decision(outcome, latency_s, 0.1 + 0.8 * cut)

    def _sure_place(self, faults: Faults) -> Outcome | None:
        """The kind this request (the next one not spared) must get, if it is a sure place."""
        if self._sure_for is not faults:
            # A random of its own: the sure places never shift the main draws.
            kinds = faults.kinds() if faults.each_within else []
            places = random.Random(f"{self.seed}-sure").sample(
                range(faults.each_within), len(kinds)
            )
            self._sure_for, self._sure = faults, dict(zip(places, kinds, strict=True))
            self._unspared = 0
        place, self._unspared = self._unspared, self._unspared + 1
        return self._sure.pop(place, None)


def busy_response(service: Service, method: str, version: str | None) -> bytes:
    """A 503 ServerBusy as storage sends it: XML for blob and queue, JSON for tables."""
    request_id = str(uuid.uuid4())
    now = email.utils.formatdate(usegmt=True)
    detail = f"{BUSY_MESSAGE}\nRequestId:{request_id}\nTime:{now}"
    if service == "table":
        content_type = "application/json;odata=minimalmetadata;streaming=true;charset=utf-8"
        error = {
            "odata.error": {"code": "ServerBusy", "message": {"lang": "en-US", "value": detail}}
        }
        body = json.dumps(error).encode("utf-8")
    else:
        content_type = "application/xml"
        body = (
            '<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
            f"<Message>{detail}</Message></Error>"
        ).encode()
    headers = [
        ("Content-Type", content_type),
        ("x-ms-error-code", "ServerBusy"),
        ("x-ms-request-id", request_id),
        ("Date", now),
    ]
    if version:
        headers.append(("x-ms-version", version))
    if method == "HEAD":  # a HEAD answer has headers only
        body = b""
    headers.append(("Content-Length", str(len(body))))
    head = "HTTP/1.1 503 Server Busy\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (head + "\r\n").encode("latin-1") + body


# -- HTTP/1.1 framing ---------------------------------------------------------------------
def _read_head(reader: IO[bytes]) -> list[bytes] | None:
    """The start line and header lines of a message; None at a clean end of stream."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = reader.readline(_MAX_HEAD_BYTES)
        if not line:
            if lines:
                raise ConnectionError("stream ended inside a message head")
            return None
        size += len(line)
        if size > _MAX_HEAD_BYTES:
            raise ConnectionError("message head too large")
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # a stray blank line between messages
            return lines
        lines.append(line.rstrip(b"\r\n"))


def _headers(lines: list[bytes]) -> list[tuple[str, str]]:
    pairs = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _lookup(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _read_body(reader: IO[bytes], headers: list[tuple[str, str]], *, to_eof: bool) -> bytes:
    """The body's bytes as sent (chunked framing kept), by the message's own framing."""
    if (_lookup(headers, "transfer-encoding") or "").lower().endswith("chunked"):
        raw = bytearray()
        while True:
            size_line = reader.readline(_MAX_HEAD_BYTES)
            if not size_line:
                raise ConnectionError("stream ended inside a chunked body")
            raw += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    trailer = reader.readline(_MAX_HEAD_BYTES)
                    raw += trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            raw += _read_exactly(reader, size + 2)
    length = _lookup(headers, "content-length")
    if length is not None:
        return _read_exactly(reader, int(length))
    return reader.read() if to_eof else b""


def _read_exactly(reader: IO[bytes], size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError(f"stream ended {size - len(data)} bytes short")
    return data


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN: the peer sees a connection reset."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    proxy: FaultProxy


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        proxy = self.server.proxy
        client: socket.socket = self.request
        proxy.track(client)
        reader = client.makefile("rb")
        try:
            while proxy.serve_one(client, reader):
                pass
        except (OSError, ValueError):
            pass  # the client went away, or sent what is not HTTP: drop the connection
        finally:
            reader.close()
            proxy.untrack(client)


class FaultProxy:
    """One service's proxy: listens on a free loopback port, forwards to ``upstream``."""

    def __init__(self, service: Service, upstream_url: str, weather: Weather) -> None:
        parts = urlsplit(upstream_url)
        self.service = service
        self.weather = weather
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.account_path = parts.path  # /devstoreaccount1
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so close() returns at once
            name=f"faultproxy-{service}",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.account_path}"

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._clients.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._clients.discard(sock)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for sock in clients:
            _reset(sock)

    def serve_one(self, client: socket.socket, reader: IO[bytes]) -> bool:
        """Read one request and deal with it; False when the connection is done."""
        lines = _read_head(reader)
        if lines is None:
            return False
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        headers = _headers(lines)
        body = _read_body(reader, headers, to_eof=False)
        path, _, query = target.partition("?")
        request = Request(
            service=self.service,
            method=method.upper(),
            path=path,
            query=query,
            headers={k.lower(): v for k, v in headers},
        )
        decision = self.weather.decide(request)
        if decision.latency_s:
            time.sleep(decision.latency_s)
        if decision.outcome == "reset_before":
            _reset(client)
            return False
        if decision.outcome == "busy":
            version = request.headers.get("x-ms-version")
            client.sendall(busy_response(self.service, request.method, version))
            return True
        head, response_body = self._forward(lines, headers, body, request.method)
        if decision.outcome == "reset_after" or (
            decision.outcome == "reset_during" and not response_body
        ):
            _reset(client)
            return False
        if decision.outcome == "reset_during":
            cut = min(len(response_body) - 1, max(1, int(len(response_body) * decision.cut)))
            client.sendall(head + response_body[:cut])
            _reset(client)
            return False
        client.sendall(head + response_body)
        return True

    def _forward(
        self, lines: list[bytes], headers: list[tuple[str, str]], body: bytes, method: str
    ) -> tuple[bytes, bytes]:
        """Azurite's answer to the request: its head (framed for a kept-alive client
        connection) and its body."""
        kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
        request_head = [lines[0].decode("latin-1")] + [f"{k}: {v}" for k, v in kept]
        request_head.append("Connection: close")
        with socket.create_connection(self.upstream, timeout=120) as upstream:
            upstream.sendall(("\r\n".join(request_head) + "\r\n\r\n").encode("latin-1") + body)
            with upstream.makefile("rb") as answer:
                response_lines = _read_head(answer)
                if response_lines is None:
                    raise ConnectionError("Azurite closed the connection without answering")
                status = int(response_lines[0].split()[1])
                response_headers = _headers(response_lines)
                bodiless = method == "HEAD" or status in (204, 304) or status < 200
                response_body = (
                    b"" if bodiless else _read_body(answer, response_headers, to_eof=True)
                )
        out = [(k, v) for k, v in response_headers if k.lower() not in ("connection", "keep-alive")]
        framed = (
            _lookup(out, "content-length") is not None
            or _lookup(out, "transfer-encoding") is not None
        )
        if not framed and not bodiless:
            out.append(("Content-Length", str(len(response_body))))
        head = [response_lines[0].decode("latin-1")] + [f"{k}: {v}" for k, v in out]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), response_body


class StorageProxies:
    """A proxy for each of Azurite's three services, sharing one :class:`Weather`."""

    def __init__(self, blob_url: str, queue_url: str, table_url: str, weather: Weather) -> None:
        self.weather = weather
        self.blob = FaultProxy("blob", blob_url, weather)
        self.queue = FaultProxy("queue", queue_url, weather)
        self.table = FaultProxy("table", table_url, weather)

    @classmethod
    @contextlib.contextmanager
    def around(cls, storage: StorageSettings, weather: Weather) -> Iterator[StorageProxies]:
        proxies = cls(storage.blob_url, storage.queue_url, storage.table_url, weather)
        try:
            yield proxies
        finally:
            proxies.close()

    def settings(self) -> StorageSettings:
        """Settings that reach Azurite through the proxies (Azurite's account and key)."""
        return StorageSettings(
            storage_auth="azurite",
            blob_url=self.blob.url,
            queue_url=self.queue.url,
            table_url=self.table.url,
        )

    def environment(self) -> dict[str, str]:
        """BATCHCTL_* variables that point a process at the proxies."""
        return azurite_environment(self.blob.url, self.queue.url, self.table.url)

    def close(self) -> None:
        for proxy in (self.blob, self.queue, self.table):
            proxy.close()
