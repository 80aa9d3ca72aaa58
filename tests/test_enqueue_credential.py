"""Bulk enqueue with managed identity: a token refresh on a later event loop still works.

Each ``RunQueues.enqueue_many`` runs ``enqueue_many_async`` under its own ``asyncio.run``.
The credential here is a fake at azure-core's ``TokenCredential`` protocol (what
``DefaultAzureCredential`` is), on a test clock. In front of the messages stands a small gate
that does what storage does with a bearer token (401 ``InvalidAuthenticationInfo`` for an
unknown or expired one) and passes accepted requests on to the session's Azurite, which
cannot check tokens itself, with an add-only SAS. The messages land in Azurite and are read
back with the real client.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from azure.core.credentials import AccessToken
from azure.storage.queue import QueueSasPermissions, generate_queue_sas

from batchctl.settings import AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, StorageSettings
from batchctl.storage import clients, put_auth
from batchctl.storage.queues import RunQueues, enqueue_many_async

TOKEN_LIFETIME_S = 3600.0


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def time(self) -> float:
        return self.now


@dataclass
class FakeCredential:
    """azure-core's TokenCredential protocol: ``get_token(*scopes, **kwargs) -> AccessToken``."""

    clock: Clock
    issued: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    _serial: Iterator[int] = field(default_factory=itertools.count)

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.calls.append((scopes, threading.current_thread().name))
        token = f"token-{next(self._serial)}"
        expires_on = self.clock.now + TOKEN_LIFETIME_S
        self.issued[token] = expires_on
        return AccessToken(token, int(expires_on))


class _Gate(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    credential: FakeCredential
    azurite_queue_url: str
    accepted: int
    refused: int


class _GateHandler(BaseHTTPRequestHandler):
    server: _Gate

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        expires_on = self.server.credential.issued.get(token)
        if (
            scheme != "Bearer"
            or expires_on is None
            or self.server.credential.clock.now >= expires_on
        ):
            self.server.refused += 1
            self._answer(
                401,
                b'<?xml version="1.0" encoding="utf-8"?><Error><Code>'
                b"InvalidAuthenticationInfo</Code><Message>Lifetime validation "
                b"failed. The token is expired.</Message></Error>",
            )
            return
        # /<account>/<queue>/messages -> Azurite, signed with an add-only SAS.
        queue = urlsplit(self.path).path.rstrip("/").split("/")[-2]
        sas = generate_queue_sas(
            AZURITE_ACCOUNT_NAME,
            queue,
            AZURITE_ACCOUNT_KEY,
            permission=QueueSasPermissions(add=True),
            expiry=datetime.now(UTC) + timedelta(minutes=5),
        )
        request = urllib.request.Request(
            f"{self.server.azurite_queue_url}/{queue}/messages?{sas}",
            data=body,
            method="POST",
            headers={"x-ms-version": self.headers.get("x-ms-version") or ""},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, payload = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        self.server.accepted += status == 201
        self._answer(status, payload)

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # The authorizer's renewal decision reads this clock; monotonic stays real.
    fake_time = SimpleNamespace(time=clock.time, monotonic=time.monotonic)
    monkeypatch.setattr(put_auth, "time", fake_time)
    return clock


@pytest.fixture
def gate(storage_settings: StorageSettings, clock: Clock) -> Iterator[_Gate]:
    server = _Gate(("127.0.0.1", 0), _GateHandler)
    server.credential = FakeCredential(clock)
    server.azurite_queue_url = storage_settings.queue_url
    server.accepted = server.refused = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_refresh_on_a_second_event_loop_still_authorizes(
    storage_settings: StorageSettings,
    gate: _Gate,
    clock: Clock,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    credential = gate.credential
    monkeypatch.setattr(clients, "_default_credential", lambda: credential)
    port = gate.server_address[1]
    account = urlsplit(storage_settings.queue_url).path  # /devstoreaccount1
    identity = storage_settings.model_copy(
        update={
            "storage_auth": "managed_identity",
            "queue_url": f"http://127.0.0.1:{port}{account}",
        }
    )
    queues = RunQueues(storage_settings, run_id)
    queues.create()
    name = queues.names["input"]

    # As RunQueues.enqueue_many does (its service client refuses a token over plain HTTP):
    # one asyncio.run per enqueue.
    first = asyncio.run(
        enqueue_many_async(identity, name, [f"a-{n}" for n in range(40)], concurrency=16)
    )
    # The first token has expired before the second enqueue, which runs on a new loop.
    clock.now += TOKEN_LIFETIME_S + 1
    second = asyncio.run(
        enqueue_many_async(identity, name, [f"b-{n}" for n in range(40)], concurrency=16)
    )

    assert (first.sent, second.sent) == (40, 40)
    assert gate.refused == 0 and gate.accepted == 80
    # One refresh per enqueue, although 16 sends asked for a token at once; each in a
    # worker thread, never on the event loop's thread.
    assert len(credential.calls) == 2
    assert all(scopes == (put_auth.STORAGE_SCOPE,) for scopes, _ in credential.calls)
    assert all(thread != threading.main_thread().name for _, thread in credential.calls)
    assert queues.approximate_count() == 80


def test_an_expired_token_is_refused_by_the_gate(
    storage_settings: StorageSettings, gate: _Gate, clock: Clock, run_id: str
) -> None:
    # The gate is as strict as storage: without it the test above would show nothing.
    token = gate.credential.get_token(put_auth.STORAGE_SCOPE)
    clock.now += TOKEN_LIFETIME_S
    port = gate.server_address[1]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/devstoreaccount1/{run_id}/messages",
        data=b"<QueueMessage><MessageText>x</MessageText></QueueMessage>",
        method="POST",
        headers={"Authorization": f"Bearer {token.token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401 and gate.refused == 1
