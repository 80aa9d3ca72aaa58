from __future__ import annotations

import http.server
import random
import threading
import time
from typing import Literal

import pytest
from azure.core.exceptions import HttpResponseError
from hypothesis import given
from hypothesis import strategies as st

from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger, RunQueues, retry
from batchctl.storage.retry import backoff_delay, is_retryable_status


@given(st.integers(min_value=0, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_bounded_and_non_negative(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, base_s=0.2, cap_s=10.0, rng=random.Random(seed))
    assert 0.0 <= delay <= min(10.0, 0.2 * 2**attempt)


def test_backoff_ceiling_grows_then_caps() -> None:
    rng = random.Random(1)
    ceilings = [max(backoff_delay(a, rng=rng) for _ in range(400)) for a in range(8)]
    assert ceilings[0] <= 0.2 < ceilings[3]
    assert all(c <= 10.0 for c in ceilings)
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1)


def test_only_throttling_and_server_errors_retry() -> None:
    assert is_retryable_status(503) and is_retryable_status(500)
    assert not is_retryable_status(400) and not is_retryable_status(404)
    assert not is_retryable_status(None)


class _Busy(http.server.BaseHTTPRequestHandler):
    """Answers every request 503 (server busy) and counts them."""

    requests = 0

    def _busy(self) -> None:
        type(self).requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _busy  # noqa: N815 - http.server names

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("adapter", ["queue", "blob", "table"])
def test_storage_sdks_give_up_after_a_few_quick_retries(
    adapter: Literal["queue", "blob", "table"], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK defaults (15 s backoff, growing) would hold a worker's loop for a minute and
    # let its in-flight messages reappear; ours give up after SDK_RETRY_TOTAL quick retries.
    monkeypatch.setattr(retry, "SDK_INITIAL_BACKOFF_S", 0)
    monkeypatch.setattr(retry, "SDK_BACKOFF_BASE", 1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Busy.requests = 0
    url = f"http://127.0.0.1:{server.server_address[1]}/devstoreaccount1"
    settings = StorageSettings(storage_auth="azurite", blob_url=url, queue_url=url, table_url=url)
    started = time.monotonic()
    try:
        with pytest.raises(HttpResponseError):
            if adapter == "queue":
                RunQueues(settings, "abc").receive(1, visibility_timeout=30)
            elif adapter == "blob":
                BlobStore(settings).download_bytes("media", "a.mp4")
            else:
                Ledger(settings).counts("abc")
    finally:
        server.shutdown()
    assert _Busy.requests == retry.SDK_RETRY_TOTAL[adapter] + 1
    # With the SDK's default backoff (15 s and up) this takes the better part of a minute.
    assert time.monotonic() - started < 12
