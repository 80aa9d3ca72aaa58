"""The Functions app: bindings read from the app object, handlers called with real requests.

The Durable client is the one thing replaced (it talks to the Functions host); a small
in-memory stand-in at that boundary records what the handlers ask of it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from types import SimpleNamespace
from typing import Any

import azure.functions as func
import pytest

import function_app
from activities import ACTIVITY_NAMES
from batchctl.activity_names import CANCEL_EVENT, ORCHESTRATOR_NAME, Activity
from batchctl.compute.base import TaggedCompute
from batchctl.contracts import RunState
from batchctl.functions import api
from tests.fakes import FakeDurableClient, FakeStatus, FakeSweptCompute


@functools.cache
def _functions() -> dict[str, Any]:
    # get_functions() indexes the app, as the host does once at start; twice is an error.
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


def _binding(function: Any, kind: str) -> Any:
    return next(b for b in function.get_bindings() if b.type == kind)


def test_every_activity_and_the_orchestrator_are_registered() -> None:
    functions = _functions()
    for name in ACTIVITY_NAMES:
        assert _binding(functions[name], "activityTrigger").name == "payload"
    assert set(ACTIVITY_NAMES) == {a.value for a in Activity}
    assert _binding(functions[ORCHESTRATOR_NAME], "orchestrationTrigger")


@pytest.mark.parametrize(
    ("name", "route", "methods"),
    [
        ("start_run", "runs", ["POST"]),
        ("list_runs", "runs", ["GET"]),
        ("get_run", "runs/{id}", ["GET"]),
        ("cancel_run", "runs/{id}/cancel", ["POST"]),
        ("openapi_document", "openapi.json", ["GET"]),
    ],
)
def test_http_routes_need_a_function_key(name: str, route: str, methods: list[str]) -> None:
    trigger = _binding(_functions()[name], "httpTrigger")
    assert trigger.route == route
    assert [str(getattr(m, "value", m)) for m in trigger.methods] == methods
    assert str(getattr(trigger.auth_level, "value", trigger.auth_level)) == "function"


def test_no_http_function_is_anonymous() -> None:
    for function in _functions().values():
        for binding in function.get_bindings():
            if binding.type == "httpTrigger":
                assert str(getattr(binding.auth_level, "value", binding.auth_level)) != "anonymous"


def test_manifest_uploads_arrive_as_event_grid_events_not_blob_contents() -> None:
    # A blob trigger binds the blob's content: the whole manifest in the host's memory.
    kinds = {b.type for f in _functions().values() for b in f.get_bindings()}
    assert "blobTrigger" not in kinds and "blob" not in kinds
    trigger = _binding(_functions()["start_run_from_blob"], "eventGridTrigger")
    assert trigger.name == "event"


# A BlobCreated event as Event Grid delivers it (EventGridSchema; learn.microsoft.com/azure/
# event-grid/event-schema-blob-storage), for a blob in the manifests container.
def _blob_created(subject: str, **data: Any) -> tuple[str, str, dict[str, Any]]:
    payload = {
        "api": "PutBlob",
        "clientRequestId": "6d79dbfb-0e37-4fc4-981f-442c9ca89e1f",
        "requestId": "831e1650-001e-001b-66ab-eeb76e000000",
        "eTag": "0x8D4BCC2E4835CD0",
        "contentType": "text/csv",
        "contentLength": 104_857_600,
        "blobType": "BlockBlob",
        "url": "https://st.blob.core.windows.net/" + subject.split("/containers/", 1)[-1],
        "sequencer": "00000000000004420000000000028963",
        "storageDiagnostics": {"batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0"},
    }
    payload.update(data)
    return "Microsoft.Storage.BlobCreated", subject, payload


def test_a_blob_created_event_names_the_manifest_and_its_etag() -> None:
    event = _blob_created("/blobServices/default/containers/manifests/blobs/2026/run 1.csv")
    assert api.manifest_of_event(*event, "manifests") == (
        "manifests/2026/run 1.csv",
        "0x8D4BCC2E4835CD0",
    )


def test_events_about_other_things_are_ignored() -> None:
    other_container = _blob_created("/blobServices/default/containers/media/blobs/a.mp4")
    assert api.manifest_of_event(*other_container, "manifests") is None
    _, subject, data = _blob_created("/blobServices/default/containers/manifests/blobs/a.csv")
    assert (
        api.manifest_of_event("Microsoft.Storage.BlobDeleted", subject, data, "manifests") is None
    )


@pytest.mark.parametrize(
    ("subject", "data", "message"),
    [
        ("/blobServices/default/containers/manifests/blobs/a.csv", {"eTag": ""}, "no data.eTag"),
        ("/blobServices/default/containers/manifests/blobs/a.csv", {}, "no data.eTag"),
        ("/blobServices/default/containers/manifests", {"eTag": "0x1"}, "is not /blobServices"),
    ],
)
def test_a_malformed_blob_created_event_fails_saying_what_is_missing(
    subject: str, data: dict[str, Any], message: str
) -> None:
    # Raising answers Event Grid with an error: it retries, then dead-letters the event.
    with pytest.raises(ValueError, match=message):
        api.manifest_of_event("Microsoft.Storage.BlobCreated", subject, data, "manifests")


def test_the_trigger_starts_one_run_per_blob_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchctl.functions import app_services

    settings = SimpleNamespace(manifests_container="manifests")
    monkeypatch.setattr(app_services, "app_services", lambda: SimpleNamespace(settings=settings))
    client = FakeDurableClient()
    # The user's function under the Durable SDK's client middleware (which would build a
    # real client from the host's binding JSON).
    handler = inspect.unwrap(_functions()["start_run_from_blob"].get_user_function())

    def deliver(etag: str) -> None:
        event_type, subject, data = _blob_created(
            "/blobServices/default/containers/manifests/blobs/big.csv", eTag=etag
        )
        event = func.EventGridEvent(
            id="e1",
            data=data,
            topic="/subscriptions/s/resourceGroups/g/providers/"
            "Microsoft.Storage/storageAccounts/st",
            subject=subject,
            event_type=event_type,
            event_time=None,
            data_version="",
        )
        asyncio.run(handler(event=event, client=client))

    deliver("0x1")
    deliver("0x1")  # Event Grid delivers at least once
    deliver("0x2")  # a new version of the same blob
    assert [(name, input_["request"]["manifest"]) for name, _, input_ in client.started] == [
        (ORCHESTRATOR_NAME, "manifests/big.csv"),
        (ORCHESTRATOR_NAME, "manifests/big.csv"),
    ]
    assert len({run_id for _, run_id, _ in client.started}) == 2


def test_sweeper_is_a_timer() -> None:
    assert _binding(_functions()["sweep_orphaned_compute"], "timerTrigger").schedule


def _request(
    method: str, url: str, body: Any = None, route_params: dict[str, str] | None = None
) -> func.HttpRequest:
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return func.HttpRequest(method=method, url=url, body=data, route_params=route_params or {})


def test_start_run_returns_the_check_status_response() -> None:
    client = FakeDurableClient()
    req = _request("POST", "/api/runs", {"manifest": "manifests/a.csv", "run_id": "my-run"})
    response = asyncio.run(api.start_run(req, client))
    assert response.status_code == 202
    assert response.headers["Location"].split("?")[0].endswith("/my-run")
    name, instance_id, payload = client.started[0]
    assert (name, instance_id) == (ORCHESTRATOR_NAME, "my-run")
    assert RunState.model_validate(payload).request.manifest == "manifests/a.csv"


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"options": {}}, "manifest"),
        ({"manifest": "m.csv", "options": {"fps": -1}}, "options.fps"),
        ({"manifest": "m.csv", "options": {"error_budget": "lots"}}, "options.error_budget"),
        ({"manifest": "m.csv", "run_id": "Bad Id"}, "run_id"),
        ({"manifest": "m.csv", "surprise": 1}, "surprise"),
        (b"not json", "(body)"),
    ],
)
def test_bad_bodies_get_a_400_naming_the_field(body: Any, field_name: str) -> None:
    client = FakeDurableClient()
    response = asyncio.run(api.start_run(_request("POST", "/api/runs", body), client))
    assert response.status_code == 400
    problems = json.loads(response.get_body())["problems"]
    assert any(p["field"] == field_name for p in problems), problems
    assert client.started == []


def test_starting_an_existing_run_is_a_conflict() -> None:
    client = FakeDurableClient(instances={"my-run": FakeStatus("Running")})
    req = _request("POST", "/api/runs", {"manifest": "m.csv", "run_id": "my-run"})
    assert asyncio.run(api.start_run(req, client)).status_code == 409
    assert client.started == []


def test_duplicate_blob_event_starts_no_second_run() -> None:
    client = FakeDurableClient()
    first = asyncio.run(api.start_run_from_blob("manifests/a.csv", '"0x8DC1"', client))
    again = asyncio.run(api.start_run_from_blob("manifests/a.csv", '"0x8DC1"', client))
    assert first is not None and again is None
    assert len(client.started) == 1
    # A new version of the same blob (new ETag) is a new run.
    newer = asyncio.run(api.start_run_from_blob("manifests/a.csv", '"0x8DC2"', client))
    assert newer not in (None, first)
    assert len(client.started) == 2


def test_status_is_friendly_and_links_the_report_when_done() -> None:
    custom = {"phase": "running", "total": 200, "succeeded": 50, "failed": 10, "eta_s": 90.0}
    client = FakeDurableClient(instances={"r1": FakeStatus("Running", custom)})
    req = _request("GET", "/api/runs/r1", route_params={"id": "r1"})
    body = json.loads(
        asyncio.run(api.get_run(req, client, "https://acct/runs/r1/report.json")).get_body()
    )
    assert body["phase"] == "running"
    assert (body["percent"], body["remaining"], body["eta_s"]) == (30.0, 140, 90.0)
    assert body["report"] is None
    client.instances["r1"] = FakeStatus(
        "Completed", {**custom, "phase": "completed", "succeeded": 190}
    )
    body = json.loads(
        asyncio.run(api.get_run(req, client, "https://acct/runs/r1/report.json")).get_body()
    )
    assert body["report"] == "https://acct/runs/r1/report.json"
    assert body["percent"] == 100.0


@pytest.mark.parametrize(("runtime", "phase"), [("Failed", "failed"), ("Terminated", "cancelled")])
def test_a_crashed_orchestration_does_not_look_running(runtime: str, phase: str) -> None:
    stale = {"phase": "running", "total": 10, "succeeded": 3, "failed": 0}
    client = FakeDurableClient(instances={"r1": FakeStatus(runtime, stale)})
    req = _request("GET", "/api/runs/r1", route_params={"id": "r1"})
    body = json.loads(asyncio.run(api.get_run(req, client, "u")).get_body())
    assert (body["phase"], body["runtime_status"], body["succeeded"]) == (phase, runtime, 3)


def test_status_of_unknown_run_is_404() -> None:
    req = _request("GET", "/api/runs/nope", route_params={"id": "nope"})
    assert asyncio.run(api.get_run(req, FakeDurableClient(), "u")).status_code == 404


def test_cancel_raises_the_cancel_event_only_for_live_runs() -> None:
    client = FakeDurableClient(
        instances={"live": FakeStatus("Running"), "old": FakeStatus("Completed")}
    )
    live = _request("POST", "/api/runs/live/cancel", route_params={"id": "live"})
    assert asyncio.run(api.cancel_run(live, client)).status_code == 202
    assert client.events == [("live", CANCEL_EVENT, None)]
    old = _request("POST", "/api/runs/old/cancel", route_params={"id": "old"})
    assert asyncio.run(api.cancel_run(old, client)).status_code == 409
    missing = _request("POST", "/api/runs/x/cancel", route_params={"id": "x"})
    assert asyncio.run(api.cancel_run(missing, client)).status_code == 404
    assert len(client.events) == 1


def test_sweeper_deletes_only_compute_of_runs_that_stopped() -> None:
    backend = FakeSweptCompute(
        [
            TaggedCompute(name="a", run_id="running-run"),
            TaggedCompute(name="b", run_id="finished-run"),
            TaggedCompute(name="c", run_id="vanished-run"),
        ]
    )
    client = FakeDurableClient(
        instances={"running-run": FakeStatus("Running"), "finished-run": FakeStatus("Failed")}
    )
    swept = asyncio.run(api.sweep(client, backend))
    assert swept == ["finished-run", "vanished-run"]
    assert backend.deleted == ["finished-run", "vanished-run"]
    assert backend.cancelled == ["finished-run", "vanished-run"]  # and their jobs cancelled
