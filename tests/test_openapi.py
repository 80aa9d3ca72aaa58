"""The HTTP API's OpenAPI document (``GET /api/openapi.json``) against what the app really does.

One local server (the real :class:`ServeHTTPServer` and handlers over the session's Azurite,
with a key) serves the document and the API. Its Durable client records started runs
instead of driving them (:class:`RecordingClient`), so a start costs nothing; status, list
and cancel answer for real (cancel writes the durable flag to Azurite). Three views:

- the document is valid OpenAPI 3.1, and it names every route that the local server and
  the Functions app serve under /api, and no other;
- a table of sample requests, one or more for every documented (route, status): each
  answer's status, content type, headers and body hold to the document's response;
- schemathesis, from the document the server serves: generated requests (valid and
  invalid) never get a 5xx, and every answer conforms to what the document says of it.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from batchctl.contracts import RunRequest, RunState
from batchctl.functions import api
from batchctl.local.server import Instance, LocalDurableClient, ServeHTTPServer
from batchctl.services import Services
from tests.test_function_app import _functions

pytestmark = pytest.mark.azurite

KEY = "openapi-key"
DOC_URI = "urn:batchctl:openapi"
# Seeded runs, one per runtime status the answers differ by.
COMPLETED, RUNNING = "seed-completed", "seed-running"
FAILED, PENDING = "seed-failed", "seed-pending"
# Methods probed on every /api path shape.
METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "QUERY")


class RecordingClient(LocalDurableClient):
    """The server's Durable client, whose instances are kept but never driven."""

    def _run(self, instance: Instance) -> None:
        instance.ended.set()


@dataclass
class Live:
    client: RecordingClient
    url: str

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        key: str | None = KEY,
        content_type: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if key is not None:
            headers[api.KEY_HEADER] = key
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


def _seed(client: RecordingClient, run_id: str, runtime: str, custom: Any, output: Any) -> None:
    request = RunRequest(run_id=run_id, manifest="manifests/seed.csv")
    payload = RunState(run_id=run_id, request=request).model_dump(mode="json")
    # Recorded as a start is, then given the state its orchestration would have reached.
    client.resume(run_id, payload)
    instance = client.instance(run_id)
    assert instance is not None
    instance.runtime, instance.custom_status, instance.output = runtime, custom, output
    instance.created = datetime.now(UTC) - timedelta(minutes=len(client.instances()))


@pytest.fixture(scope="module")
def live(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    services.store.ensure_containers()  # cancel writes its flag to the runs container
    folder = tmp_path_factory.mktemp("openapi")
    client = RecordingClient(
        services,
        base_url="http://127.0.0.1",
        out_dir=folder,
        # Every recorded start holds a slot only for a moment, but none must wait for one.
        max_runs=1000,
    )
    now = datetime.now(UTC).isoformat()
    progress = {
        "phase": "running",
        "total": 10,
        "succeeded": 3,
        "failed": 1,
        "not_run": 0,
        "invalid": 2,
        "eta_s": 42.5,
        "message": "3 of 10 done",
        "started_at": now,
        "updated_at": now,
        "nodes_active": 2,
        "nodes_planned": 3,
    }
    _seed(client, COMPLETED, "Completed", {**progress, "phase": "completed"}, {"phase": "done"})
    _seed(client, RUNNING, "Running", progress, None)
    _seed(client, FAILED, "Failed", "not an object", "ValueError: boom")
    _seed(client, PENDING, "Pending", None, None)
    httpd = ServeHTTPServer(("127.0.0.1", 0), client, key=KEY)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Live(client, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def document(live: Live) -> dict[str, Any]:
    status, headers, body = live.call("GET", api.OPENAPI_PATH)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def _operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation the document describes."""
    verbs = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in verbs
    }


# -- (1) the document itself -------------------------------------------------------------------
def test_the_served_document_is_valid_openapi_3_1(live: Live, document: dict[str, Any]) -> None:
    validate_openapi(document)  # OpenAPI 3.1's own schema, and every $ref resolves
    assert document["openapi"] == "3.1.0"
    # The local server serves the pure builder's document, its server the origin asked.
    assert document == api.openapi_document(live.url)
    assert document["servers"] == [{"url": live.url}]
    scheme = document["components"]["securitySchemes"][api.SECURITY_SCHEME]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "x-functions-key"}
    assert "optional" in document["info"]["description"]
    assert "servers" not in api.openapi_document(None)


def test_schemas_come_from_the_contracts_in_the_right_mode(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    # The request body as validated: defaults are optional, unknown fields refused.
    body = schemas["StartRunBody"]
    assert body["required"] == ["manifest"]
    assert body["additionalProperties"] is False
    assert body["properties"]["options"]["$ref"] == "#/components/schemas/RunOptions"
    # An answer as dumped: every field is always there, so every field is required.
    status = schemas["RunStatus"]
    assert set(status["required"]) == set(status["properties"]) >= {"run_id", "phase", "eta_s"}
    # No JSON Schema $defs were left behind: every reference points into the components.
    text = json.dumps(document)
    assert "$defs" not in text
    refs = {part.split('"', 1)[0] for part in text.split('"$ref": "')[1:]}
    assert refs and all(ref.startswith("#/components/") for ref in refs)


def test_every_api_route_of_the_local_server_is_documented(
    live: Live, document: dict[str, Any]
) -> None:
    # The server has no route table to read: each /api path shape is probed with each
    # method. A route is there unless the answer is the server's "no route" 404 or a 405,
    # and a 405 names (in Allow) exactly the methods the document has for that path.
    shapes = {
        "/api/runs": "/api/runs",
        f"/api/runs/{COMPLETED}": "/api/runs/{id}",
        f"/api/runs/{COMPLETED}/cancel": "/api/runs/{id}/cancel",
        f"/api/runs/{COMPLETED}/other": "/api/runs/{id}/other",
        f"/api/runs/{COMPLETED}/cancel/more": "/api/runs/{id}/cancel/more",
        api.OPENAPI_PATH: api.OPENAPI_PATH,
        "/api": "/api",
        "/api/other": "/api/other",
    }
    documented = _operations(document)
    served = set()
    for path, template in shapes.items():
        methods = {method for method, documented_path in documented if documented_path == template}
        for method in METHODS:
            # A body that start refuses (400), so probing starts no run.
            body = b"{}" if method == "POST" else None
            status, headers, answer = live.call(method, path, body)
            assert status < 500, (method, path, answer)
            assert headers["Content-Type"] == "application/json", (method, path)
            if status == 405:
                assert set(headers["Allow"].split(", ")) == methods, (method, path)
            elif not (status == 404 and json.loads(answer)["error"].startswith("no route")):
                served.add((method, template))
    assert served == documented


def test_every_http_route_of_the_functions_app_is_documented(document: dict[str, Any]) -> None:
    # The Functions host serves each HTTP trigger's route under its route prefix, /api.
    routes = set()
    for function in _functions().values():
        for binding in function.get_bindings():
            if binding.type == "httpTrigger":
                for method in binding.methods:
                    routes.add((str(getattr(method, "value", method)), f"/api/{binding.route}"))
                auth = str(getattr(binding.auth_level, "value", binding.auth_level))
                assert auth == "function", binding.route
    assert routes == _operations(document)


# -- (1) every documented answer against what the handlers send --------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    method: str
    path: str
    template: str
    status: int
    body: bytes | None = None
    key: str | None = KEY
    content_type: str | None = None


def _start_body(run_id: str, **extra: Any) -> bytes:
    return json.dumps({"manifest": "manifests/sample.csv", "run_id": run_id, **extra}).encode()


RUN = "/api/runs/{id}"
CANCEL = "/api/runs/{id}/cancel"
SAMPLES = [
    Sample("start", "POST", "/api/runs", "/api/runs", 202, _start_body("sample-start")),
    Sample("start-minimal", "POST", "/api/runs", "/api/runs", 202, b'{"manifest": "m.csv"}'),
    Sample("start-taken", "POST", "/api/runs", "/api/runs", 409, _start_body(COMPLETED)),
    Sample("start-no-manifest", "POST", "/api/runs", "/api/runs", 400, b"{}"),
    Sample("start-not-json", "POST", "/api/runs", "/api/runs", 400, b"{nope"),
    Sample("start-not-utf8", "POST", "/api/runs", "/api/runs", 400, b'{"manifest": "\xff"}'),
    Sample("start-no-body", "POST", "/api/runs", "/api/runs", 400, b""),
    # Nesting deeper than the JSON parser's stack was a 500 (RecursionError).
    Sample("start-deep", "POST", "/api/runs", "/api/runs", 400, b"[" * 100_000),
    Sample(
        "start-bad-options",
        "POST",
        "/api/runs",
        "/api/runs",
        400,
        _start_body("sample-bad", options={"fps": 0, "model": "NoSuchNet"}),
    ),
    Sample(
        "start-foreign-container",
        "POST",
        "/api/runs",
        "/api/runs",
        400,
        json.dumps({"manifest": "runs/x.csv"}).encode(),
    ),
    Sample("start-no-key", "POST", "/api/runs", "/api/runs", 401, b"{}", key=None),
    Sample("list", "GET", "/api/runs", "/api/runs", 200),
    Sample("list-bounded", "GET", "/api/runs?days=1&limit=2", "/api/runs", 200),
    Sample("list-bad-days", "GET", "/api/runs?days=0&limit=x", "/api/runs", 400),
    Sample("list-wrong-key", "GET", "/api/runs", "/api/runs", 401, key="wrong"),
    Sample("get-completed", "GET", f"/api/runs/{COMPLETED}", RUN, 200),
    Sample("get-running", "GET", f"/api/runs/{RUNNING}", RUN, 200),
    Sample("get-failed", "GET", f"/api/runs/{FAILED}", RUN, 200),
    Sample("get-pending", "GET", f"/api/runs/{PENDING}", RUN, 200),
    Sample("get-unknown", "GET", "/api/runs/no-such-run", RUN, 404),
    Sample("get-not-a-run-id", "GET", "/api/runs/a%2F..%3Fb", RUN, 404),
    Sample("get-no-key", "GET", f"/api/runs/{COMPLETED}", RUN, 401, key=None),
    # Seen in the API tester's requests: any multipart Content-Type was refused (400).
    Sample(
        "get-multipart-type",
        "GET",
        f"/api/runs/{COMPLETED}",
        RUN,
        200,
        content_type="multipart/form-data; boundary=x",
    ),
    Sample(
        "start-multipart",
        "POST",
        "/api/runs",
        "/api/runs",
        400,
        b"--x--\r\n",
        content_type="multipart/form-data; boundary=x",
    ),
    Sample("cancel-pending", "POST", f"/api/runs/{PENDING}/cancel", CANCEL, 202),
    Sample("cancel-ended", "POST", f"/api/runs/{COMPLETED}/cancel", CANCEL, 409),
    Sample("cancel-unknown", "POST", "/api/runs/no-such-run/cancel", CANCEL, 404),
    Sample("cancel-no-key", "POST", f"/api/runs/{RUNNING}/cancel", CANCEL, 401, key=None),
    Sample("document", "GET", api.OPENAPI_PATH, api.OPENAPI_PATH, 200),
    Sample("document-no-key", "GET", api.OPENAPI_PATH, api.OPENAPI_PATH, 401, key=None),
]


def _resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A response object, through its $ref into components.responses if it has one."""
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = document
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    resolved: dict[str, Any] = target
    return resolved


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    # The document is the resource its "#/components/..." references resolve in.
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    rooted = {"$ref": DOC_URI + schema["$ref"]} if "$ref" in schema else schema
    return jsonschema.Draft202012Validator(
        rooted, registry=registry, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_every_documented_answer_has_a_sample(document: dict[str, Any]) -> None:
    documented = {
        (method.upper(), path, int(status))
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
        for status in operation["responses"]
    }
    # 503 is the local server's while it stops: its own test below.
    sampled = {(s.method, s.template, s.status) for s in SAMPLES} | {("POST", "/api/runs", 503)}
    assert sampled == documented


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_each_answer_holds_to_the_document(
    live: Live, document: dict[str, Any], sample: Sample
) -> None:
    status, headers, body = live.call(
        sample.method, sample.path, sample.body, key=sample.key, content_type=sample.content_type
    )
    assert status == sample.status, body
    operation = document["paths"][sample.template][sample.method.lower()]
    response = _resolve(document, operation["responses"][str(status)])
    if "content" not in response:
        assert body == b""  # as the Functions host answers 401: nothing to read
        return
    assert headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    _validator(document, response["content"]["application/json"]["schema"]).validate(answer)
    for name, header in response.get("headers", {}).items():
        value: Any = headers[name]
        if header["schema"]["type"] == "integer":
            value = int(value)
        _validator(document, header["schema"]).validate(value)
    if status == 202 and sample.template == "/api/runs":
        # The links the document promises lead to the run's own routes.
        assert headers["Location"] == answer["statusQueryGetUri"]
        run_id = answer["id"]
        assert live.call("GET", f"/api/runs/{run_id}")[0] == 200
        assert live.client.instance(run_id) is not None


def test_a_running_runs_answer_carries_its_progress(live: Live) -> None:
    # The schemas above would pass an answer that lost its counts to defaults; this pins the
    # seeded running run's answer to its custom status, so the samples are meaningful.
    status, _, body = live.call("GET", f"/api/runs/{RUNNING}")
    answer = json.loads(body)
    assert status == 200
    counts = (answer["total"], answer["succeeded"], answer["failed"], answer["invalid"])
    assert counts == (10, 3, 1, 2)
    assert (answer["remaining"], answer["nodes_active"], answer["eta_s"]) == (6, 2, 42.5)
    listed = json.loads(live.call("GET", "/api/runs?limit=500")[2])
    assert listed["count"] == len(listed["runs"]) >= 4


def test_a_stopping_server_answers_a_start_as_documented(
    live: Live, document: dict[str, Any]
) -> None:
    live.client.closing = True
    try:
        status, _, body = live.call("POST", "/api/runs", _start_body("sample-closing"))
    finally:
        live.client.closing = False
    assert status == 503
    schema = document["paths"]["/api/runs"]["post"]["responses"]["503"]["content"]
    _validator(document, schema["application/json"]["schema"]).validate(json.loads(body))


def test_the_functions_app_route_serves_the_document_for_its_origin() -> None:
    import azure.functions as func

    request = func.HttpRequest(
        "GET", "https://app.example.net/api/openapi.json?code=k", headers={}, body=b""
    )
    response = api.get_openapi(request)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert json.loads(response.get_body()) == api.openapi_document("https://app.example.net")


# -- (2) schemathesis against the live server ----------------------------------------------------
# Checks: the two the issue names, and that every status, content type and header the server
# answers with is documented for the operation.
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]


# The pure builder's document: the one the live server serves (asserted above). Loaded at
# import because schemathesis's fixture-backed loader (from_fixture) reads a private
# attribute that pytest 9.2 no longer has.
schema = schemathesis.openapi.from_dict(api.openapi_document())
SEEDED = (COMPLETED, RUNNING, FAILED, PENDING)


@schema.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any]
) -> st.SearchStrategy[dict[str, Any]]:
    # A generated run id names no run (404): as often as not, one of the seeded runs
    # instead, so that the answers of a run that exists (200; cancel's 202 and 409) are
    # generated and checked too.
    if not path_parameters or "id" not in path_parameters:
        return st.just(path_parameters)
    seeded = [{**path_parameters, "id": run_id} for run_id in SEEDED]
    return st.one_of(st.just(path_parameters), st.sampled_from(seeded))


@schema.parametrize()
@settings(
    max_examples=100,
    derandomize=True,  # the same requests every run: a failure here is reproducible
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_generated_requests_get_documented_answers_and_no_5xx(
    case: schemathesis.Case[Any], live: Live
) -> None:
    case.call_and_validate(base_url=live.url, headers={api.KEY_HEADER: KEY}, checks=CHECKS)


def test_a_string_that_is_no_run_id_never_reaches_durable() -> None:
    import asyncio

    import azure.functions as func

    class RefusingClient:
        """Durable puts the instance id into its URL as it is: these must not get there."""

        async def get_status(self, instance_id: str, **_: Any) -> Any:
            raise AssertionError(f"asked Durable about {instance_id!r}")

    for run_id in ("a/b", "x?y#z", "Upper", "-dash", "a" * 41, ""):
        route = {"id": run_id}
        request = func.HttpRequest("GET", "http://h/api/runs/x", route_params=route, body=b"")
        assert asyncio.run(api.get_run(request, RefusingClient(), "u")).status_code == 404
        cancel = func.HttpRequest("POST", "http://h/api/runs/x", route_params=route, body=b"")
        assert asyncio.run(api.cancel_run(cancel, RefusingClient())).status_code == 404
