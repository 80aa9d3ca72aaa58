"""Bulk enqueue under throttling, against a small HTTP server that answers like a busy account.

Azurite never throttles, so a real local HTTP server stands in for the storage endpoint here;
the request path, body and retry policy under test are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from xml.etree import ElementTree

import pytest
from aiohttp import web

from batchctl.settings import StorageSettings
from batchctl.storage.queues import EnqueueError, enqueue_many_async


@dataclass
class FakeQueueEndpoint:
    fail_every: int = 0  # answer 503 to every n-th request
    always_status: int | None = None
    received: list[str] = field(default_factory=list)
    requests: int = 0
    url: str = ""


@pytest.fixture
def endpoint() -> Iterator[FakeQueueEndpoint]:
    state = FakeQueueEndpoint()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def put_message(request: web.Request) -> web.Response:
        state.requests += 1
        assert "sig=" in request.query_string  # local mode authorizes with an add-only SAS
        if state.always_status is not None:
            return web.Response(status=state.always_status, text="refused")
        if state.fail_every and state.requests % state.fail_every == 0:
            return web.Response(status=503, text="ServerBusy")
        text = ElementTree.fromstring(await request.read()).findtext("MessageText")
        state.received.append(text or "")
        return web.Response(status=201)

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/devstoreaccount1/{queue}/messages", put_message)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state.url = f"http://127.0.0.1:{port}/devstoreaccount1"
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(serve())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    yield state
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _settings(url: str) -> StorageSettings:
    return StorageSettings(storage_auth="azurite", blob_url=url, queue_url=url, table_url=url)


def test_throttled_sends_back_off_and_all_arrive(endpoint: FakeQueueEndpoint) -> None:
    endpoint.fail_every = 3
    messages = [f"message <{i}> & more" for i in range(300)]
    stats = asyncio.run(
        enqueue_many_async(_settings(endpoint.url), "r-x-in", messages, concurrency=16)
    )
    assert stats.sent == 300
    assert stats.retries > 0
    assert sorted(endpoint.received) == sorted(messages)  # XML escaping round-trips


def test_permanent_errors_are_not_retried_and_are_reported(endpoint: FakeQueueEndpoint) -> None:
    endpoint.always_status = 403
    with pytest.raises(EnqueueError, match="HTTP 403") as caught:
        asyncio.run(enqueue_many_async(_settings(endpoint.url), "r-x-in", ["a", "b", "c"]))
    assert (caught.value.sent, caught.value.failed) == (0, 3)
    assert endpoint.requests == 3  # one attempt each


def test_persistent_throttling_gives_up_after_max_attempts(endpoint: FakeQueueEndpoint) -> None:
    endpoint.always_status = 503
    with pytest.raises(EnqueueError, match="HTTP 503"):
        asyncio.run(enqueue_many_async(_settings(endpoint.url), "r-x-in", ["a"], max_attempts=3))
    assert endpoint.requests == 3
