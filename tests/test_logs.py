"""Structured logs: the run and item ids reach every line, in text and JSON, across threads."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from batchctl import logs


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("batchctl.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_text_lines_name_the_run_and_item_bound_on_each_thread(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.formatter_for("text"))
    with logs.bound(run_id="run-7"):
        logger.info("starting")

        def item(item_id: str) -> None:
            with logs.bound(run_id="run-7", item_id=item_id):
                logger.info("working")

        threads = [threading.Thread(target=item, args=(f"clip-{n}",)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    logger.info("after")
    lines = stream.getvalue().splitlines()
    assert "run=run-7 item=- starting" in lines[0]
    assert sorted(line.split("item=")[1] for line in lines[1:4]) == [
        "clip-0 working",
        "clip-1 working",
        "clip-2 working",
    ]
    assert all("run=run-7" in line for line in lines[:4])
    assert "run=- item=- after" in lines[4]  # unbound again outside the block


def test_json_lines_carry_ids_message_and_the_error(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.formatter_for("json"))
    with logs.bound(run_id="r1", item_id="v1"):
        try:
            raise ValueError("bad frame")
        except ValueError:
            logger.exception("item %s failed", "v1")
    record = json.loads(stream.getvalue())
    assert (record["run_id"], record["item_id"], record["level"]) == ("r1", "v1", "ERROR")
    assert record["message"] == "item v1 failed"
    assert "ValueError: bad frame" in record["error"]


def test_ids_passed_explicitly_are_kept(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.formatter_for("json"))
    with logs.bound(run_id="outer"):
        logger.info("x", extra={"run_id": "explicit"})
    assert json.loads(stream.getvalue())["run_id"] == "explicit"


def test_no_telemetry_without_a_connection_string() -> None:
    assert logs.configure_telemetry({}) is False


def test_telemetry_uses_the_managed_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # The exporter cannot reach Azure from here: record what it would be configured with.
    import azure.monitor.opentelemetry as distro

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kw: calls.append(kw))
    env = {logs.CONNECTION_STRING_ENV: "InstrumentationKey=00000000-0000-0000-0000-000000000000"}
    assert logs.configure_telemetry({**env, "AZURE_CLIENT_ID": "11111111-2222"}) is True
    (call,) = calls
    assert call["connection_string"] == env[logs.CONNECTION_STRING_ENV]
    assert type(call["credential"]).__name__ == "ManagedIdentityCredential"
    assert call["logger_name"] == "batchctl"


def test_every_activity_input_names_its_run(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    from activities import run_id_of, with_run_context
    from batchctl.contracts import ChunkTask, RunOptions, RunRequest, RunState

    request = RunRequest(run_id="r-42", manifest="manifests/m.csv", options=RunOptions())
    state = RunState(run_id="r-42", request=request).model_dump(mode="json")
    chunk = ChunkTask(run_id="r-42", chunk="c0", options=RunOptions()).model_dump(mode="json")
    for payload in ("r-42", request.model_dump(mode="json"), state, chunk, {"state": state}):
        assert run_id_of(payload) == "r-42", payload
    assert run_id_of({"unrelated": 1}) is None

    logger, stream, handler = captured
    handler.setFormatter(logs.formatter_for("json"))
    with_run_context(lambda payload: logger.info("working on %s", payload))("r-42")
    assert json.loads(stream.getvalue())["run_id"] == "r-42"
