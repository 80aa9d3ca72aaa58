"""HTTP and trigger handlers, written against a Durable client so they are testable.

Every handler takes the Durable client as an argument (the Functions host injects the real
one; tests pass a stand-in at that boundary) and returns a plain ``func.HttpResponse``.

Each answer's shape is a pydantic model here (or the run-status contract), and the handlers
build their answers from those models: :func:`openapi_document` describes the API from the
same models, so the document cannot drift from what the handlers send.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import azure.durable_functions as df
import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import core_schema

from batchctl.activity_names import CANCEL_EVENT, ORCHESTRATOR_NAME
from batchctl.artifacts import parse_ref
from batchctl.contracts import (
    RUN_ID_MAX_LENGTH,
    RUN_ID_PATTERN,
    SCHEMA_VERSION,
    RunOptions,
    RunRequest,
    RunState,
)
from batchctl.functions.instances import query_instances
from batchctl.runids import new_run_id, run_id_for_blob
from batchctl.runstatus import ACTIVE_STATUSES, RunStatus, run_status_of, runtime_name
from batchctl.validation import problems
from batchctl.workspec import parse_model

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from pydantic.json_schema import JsonSchemaMode

    from batchctl.settings import ControllerSettings

# ACTIVE_STATUSES is re-exported: the runtime statuses in which an instance still owns compute.
__all__ = ["ACTIVE_STATUSES", "new_run_id", "run_id_for_blob"]

# GET /api/runs: how far back it looks by default, and the most runs one answer lists.
LIST_DEFAULT_DAYS = 7
LIST_MAX_DAYS = 90
LIST_DEFAULT_LIMIT = 50
LIST_MAX_LIMIT = 500
# The header that carries a function key (the Functions host reads it; so does the local
# server). Spelled here, not imported from batchctl.client: the app does not import its client.
KEY_HEADER = "x-functions-key"
_RUN_ID = re.compile(RUN_ID_PATTERN)


class StartRunBody(BaseModel):
    """The body of POST /api/runs."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(min_length=1, max_length=2048, description="container/name or blob URL")
    options: RunOptions = Field(default_factory=RunOptions)
    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN, max_length=RUN_ID_MAX_LENGTH)
    parent_run_id: str | None = Field(
        default=None,
        pattern=RUN_ID_PATTERN,
        max_length=RUN_ID_MAX_LENGTH,
        description="the run this one retries (batchctl retry --app)",
    )
    manifest_label: str | None = Field(
        default=None,
        max_length=4096,
        description="the manifest as the user named it (a local path), shown by the report",
    )


# -- the answers (what the handlers send; the OpenAPI document shows these models) -------------
class Problem(BaseModel):
    """One thing wrong with a request, in words (``batchctl.validation.problems``)."""

    field: str = Field(description='the dotted path of the field, the query parameter or "(body)"')
    error: str = Field(description="what is wrong with it")


class ErrorAnswer(BaseModel):
    """A refusal: 404 (no such run, or no such route), 409 (a run id in use, a run that
    already ended)."""

    error: str


class InvalidRequestAnswer(BaseModel):
    """400: the request names fields that are missing or wrong, each in ``problems``."""

    error: Literal["invalid request"] = "invalid request"
    problems: list[Problem]


class RunList(BaseModel):
    """GET /api/runs: the runs, newest first, each in the run-status contract."""

    runs: list[RunStatus]
    count: int = Field(ge=0, description="how many runs this answer lists")


class CancelAnswer(BaseModel):
    """202 to POST /api/runs/{id}/cancel: the durable flag is set and the event raised."""

    run_id: str
    cancel: Literal["requested"] = "requested"


class CheckStatusLinks(BaseModel):
    """202 to POST /api/runs: Durable's check-status links (``create_check_status_response``).

    Durable builds this answer, not this app: the keys are the Durable extension's management
    URLs in camelCase (extension bundle 4: all nine; the local server sends the same nine),
    and a newer extension may add others.
    """

    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    id: str = Field(description="the run id (the orchestration's instance id)")
    status_query_get_uri: str = Field(description="Durable's status of the run (GET)")
    send_event_post_uri: str
    terminate_post_uri: str
    rewind_post_uri: str
    purge_history_delete_uri: str
    restart_post_uri: str
    suspend_post_uri: str
    resume_post_uri: str


def _json(body: Any, status: int) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json"
    )


def _answer(model: BaseModel, status: int) -> func.HttpResponse:
    return _json(model.model_dump(mode="json"), status)


def _error(message: str, status: int) -> func.HttpResponse:
    return _answer(ErrorAnswer(error=message), status)


def _invalid(found: list[dict[str, str]]) -> func.HttpResponse:
    return _answer(InvalidRequestAnswer(problems=[Problem(**p) for p in found]), 400)


def _bad_request(error: ValidationError | ValueError) -> func.HttpResponse:
    if isinstance(error, ValidationError):
        return _invalid(problems(error))
    return _invalid([{"field": "(body)", "error": str(error)}])


def _is_run_id(value: str) -> bool:
    """Whether ``value`` can name a run at all: every run's id is a ``RunId``.

    Anything else is answered 404 without asking Durable: the SDK puts the instance id into
    the management URL as it is, so an id with '/', '?' or '#' in it would ask Durable
    about another URL (and its 400 would surface as our 500).
    """
    return len(value) <= RUN_ID_MAX_LENGTH and _RUN_ID.fullmatch(value) is not None


def _status_name(status: Any) -> str | None:
    return runtime_name(getattr(status, "runtime_status", None))


def work_problems(options: RunOptions) -> list[dict[str, str]]:
    """Why the nodes could not run this work, found before any compute is paid for.

    The model is checked against the keras.applications names the node image knows
    (``batchctl.workspec``): an unknown name would fail every item on every node. A
    ``.keras`` path or a weights file is only checked for its shape, because it names a file
    on the node, not here. The task is checked for its syntax only ('features' or
    'module:Class', which RunOptions already holds): this app does not ship the node image's
    task modules and must not import user code, so whether a custom class imports is the
    node's to find out (the CLI checks it for local runs).
    """
    try:
        parse_model(options.model)
    except ValueError as error:
        return [{"field": "options.model", "error": str(error)}]
    if options.code is not None and parse_ref(options.code) is None:
        # A folder on the caller's machine means nothing here; batchctl uploads a --code
        # folder and sends its reference.
        return [
            {
                "field": "options.code",
                "error": "a code package reference sha256:HEX/NAME (batchctl submit --code DIR "
                "uploads the folder and sends it), not a path",
            }
        ]
    return []


def manifest_problems(manifest: str, settings: ControllerSettings) -> list[dict[str, str]]:
    """Why a run may not read this manifest: it must be a blob of this app's account, in the
    manifests container (the trigger's) or the media container (where ``batchctl submit``
    puts it). Every other container holds what runs wrote (reports, outputs) or what this
    app was never meant to read, so naming one is refused before a run starts.
    """
    from batchctl.controller import manifest_location

    allowed = (settings.manifests_container, settings.media_container)
    try:
        container, name = manifest_location(manifest, settings)
    except ValueError as error:
        return [{"field": "manifest", "error": str(error)}]
    if container not in allowed or not name:
        return [
            {
                "field": "manifest",
                "error": f"a manifest must be a blob in the {' or '.join(allowed)} container "
                f"of this app's storage account (got container {container!r})",
            }
        ]
    return []


async def start_run(
    req: func.HttpRequest, client: Any, settings: ControllerSettings | None = None
) -> func.HttpResponse:
    """POST /api/runs: validate the body (400 naming the field), refuse a run id already
    used (409), start the run orchestrator and answer with Durable's check-status links.

    With ``settings``, a manifest outside the allowed containers is refused as well (400).
    """
    try:
        payload = req.get_json()
    except (ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's stack ("[[[[...", well under
        # the 1 MiB a body may have) was a 500; it is no body this API takes.
        return _bad_request(ValueError("the body is not JSON"))
    try:
        body = StartRunBody.model_validate(payload)
        run_id = body.run_id or new_run_id()
        request = RunRequest(
            run_id=run_id,
            manifest=body.manifest,
            options=body.options,
            parent_run_id=body.parent_run_id,
            manifest_label=body.manifest_label,
        )
    except ValidationError as error:
        return _bad_request(error)
    problems = work_problems(body.options)
    if settings is not None:
        problems += manifest_problems(body.manifest, settings)
    if problems:
        return _invalid(problems)
    existing = await client.get_status(run_id)
    if _status_name(existing) is not None:
        return _error(f"run {run_id} already exists", 409)
    await client.start_new(
        ORCHESTRATOR_NAME,
        instance_id=run_id,
        client_input=RunState(run_id=run_id, request=request).model_dump(mode="json"),
    )
    response: func.HttpResponse = client.create_check_status_response(req, run_id)
    return response


BLOB_CREATED = "Microsoft.Storage.BlobCreated"
# A blob event's subject: /blobServices/default/containers/<container>/blobs/<name>.
_BLOB_SUBJECT = re.compile(
    r"^/blobServices/default/containers/(?P<container>[^/]+)/blobs/(?P<blob>.+)$"
)


def manifest_of_event(
    event_type: str, subject: str, data: Any, manifests_container: str
) -> tuple[str, str] | None:
    """The manifest blob (``container/name``) and its ETag that a BlobCreated event names.

    None for an event that is not about a manifest (another type, another container): the
    subscription filters those out, so one arriving is logged and dropped. A BlobCreated in
    the manifests container that lacks what a run needs raises, naming what is missing.
    """
    if event_type != BLOB_CREATED:
        return None
    found = _BLOB_SUBJECT.match(subject or "")
    if found is None:
        raise ValueError(
            f"BlobCreated event subject {subject!r} is not "
            "/blobServices/default/containers/<container>/blobs/<name>"
        )
    if found["container"] != manifests_container:
        return None
    etag = data.get("eTag") if isinstance(data, dict) else None
    if not isinstance(etag, str) or not etag:
        raise ValueError(f"BlobCreated event for {subject!r} has no data.eTag: {str(data)[:200]}")
    return f"{found['container']}/{found['blob']}", etag


async def start_run_from_blob(
    name: str, etag: str, client: Any, options: RunOptions | None = None
) -> str | None:
    """Start a run for a manifest blob; None when this blob version already has one."""
    run_id = run_id_for_blob(name, etag)
    if _status_name(await client.get_status(run_id)) is not None:
        return None
    request = RunRequest(run_id=run_id, manifest=name, options=options or RunOptions())
    await client.start_new(
        ORCHESTRATOR_NAME,
        instance_id=run_id,
        client_input=RunState(run_id=run_id, request=request).model_dump(mode="json"),
    )
    return run_id


def run_status_view(run_id: str, status: Any, report_url: str | None) -> dict[str, Any]:
    """What GET /api/runs/{id} shows: the run-status contract (``batchctl.runstatus``)."""
    return run_status_of(status, run_id, report_url).model_dump(mode="json")


async def get_run(req: func.HttpRequest, client: Any, report_url: str) -> func.HttpResponse:
    run_id = req.route_params.get("id", "")
    status = await client.get_status(run_id) if _is_run_id(run_id) else None
    if _status_name(status) is None:
        return _error(f"no run {run_id!r}", 404)
    return _json(run_status_view(run_id, status, report_url), 200)


def _query_int(req: func.HttpRequest, name: str, default: int, top: int) -> int:
    raw = req.params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"must be a whole number, got {raw!r}") from None
    if not 1 <= value <= top:
        raise ValueError(f"must be between 1 and {top}, got {value}")
    return value


async def list_runs(
    req: func.HttpRequest,
    client: Any,
    report_url: Callable[[str], str] | None = None,
    now: datetime | None = None,
) -> func.HttpResponse:
    """GET /api/runs[?days=N&limit=N]: the runs created in the last ``days`` (default 7),
    newest first, at most ``limit`` (default 50), each in the run-status contract."""
    problems: list[dict[str, str]] = []
    bounds: dict[str, int] = {}
    for name, default, top in (
        ("days", LIST_DEFAULT_DAYS, LIST_MAX_DAYS),
        ("limit", LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT),
    ):
        try:
            bounds[name] = _query_int(req, name, default, top)
        except ValueError as error:
            problems.append({"field": name, "error": str(error)})
    if problems:
        return _invalid(problems)
    since = (now or datetime.now(UTC)) - timedelta(days=bounds["days"])
    runs: list[RunStatus] = []
    for status in await query_instances(client, created_time_from=since):
        run_id = str(getattr(status, "instance_id", "") or "")
        if run_id and _status_name(status) is not None:
            runs.append(run_status_of(status, run_id, report_url(run_id) if report_url else None))
    oldest = datetime.min.replace(tzinfo=UTC)
    runs.sort(key=lambda run: run.created_at or oldest, reverse=True)
    shown = runs[: bounds["limit"]]
    return _answer(RunList(runs=shown, count=len(shown)), 200)


async def cancel_run(
    req: func.HttpRequest, client: Any, set_cancel_flag: Callable[[str], None] | None = None
) -> func.HttpResponse:
    """Cancel a live run: the durable flag first (it cannot be lost), then the event (fast).

    Durable discards an event raised while the orchestration continues as new; the flag in
    storage, read at every poll, makes such a cancel win at the next poll instead.
    """
    run_id = req.route_params.get("id", "")
    runtime = _status_name(await client.get_status(run_id)) if _is_run_id(run_id) else None
    if runtime is None:
        return _error(f"no run {run_id!r}", 404)
    if runtime not in ACTIVE_STATUSES:
        return _error(f"run {run_id} already ended ({runtime})", 409)
    if set_cancel_flag is not None:
        await asyncio.to_thread(set_cancel_flag, run_id)
    await client.raise_event(run_id, CANCEL_EVENT, None)
    return _answer(CancelAnswer(run_id=run_id), 202)


# -- the OpenAPI document ------------------------------------------------------------------------
OPENAPI_VERSION = "3.1.0"
OPENAPI_PATH = "/api/openapi.json"
# The API's version is the contracts' schema version: both change when an answer's shape does.
API_VERSION = str(SCHEMA_VERSION)
SECURITY_SCHEME = "functionKey"
_SCHEMA_REF = "#/components/schemas/{model}"
# What a client sends (validated as the handlers validate it) and what it gets back (as the
# handlers dump it): pydantic's two JSON Schema modes.
_REQUEST_MODELS: tuple[type[BaseModel], ...] = (StartRunBody,)
_ANSWER_MODELS: tuple[type[BaseModel], ...] = (
    RunStatus,
    RunList,
    CancelAnswer,
    CheckStatusLinks,
    ErrorAnswer,
    InvalidRequestAnswer,
)
_DESCRIPTION = f"""\
The HTTP API of a batchctl app: start a run over a manifest of videos, follow it, list runs,
cancel one. The deployed Functions app and the local server (`batchctl serve`, and the app
that `batchctl run` starts) serve the same routes from the same handlers.

**Key.** In Azure every route needs a function key of the app in the `{KEY_HEADER}` header
(401 without it). The local server needs one only when it was started with a key
(`BATCHCTL_FUNCTION_KEY`; required when it listens beyond loopback); on loopback without a
key the header is optional and ignored.

**Following a run.** `POST /api/runs` answers with Durable's check-status links; the run's
status in this app's contract is `GET /api/runs/{{id}}` (`statusQueryGetUri` is Durable's own).

The local server may also refuse a request before any route answers, each time with an
`{{"error": ...}}` body: 400 (ambiguous framing: a Transfer-Encoding, conflicting lengths,
malformed header lines), 403 (a cross-origin or non-loopback Host request), 405 (a method the
path does not serve; Allow names those it does), 408 (a body that did not arrive in time),
413 (a body over 1 MiB), 503 (too many connections).
"""


class _ContractSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, with every field of an answer marked required.

    The handlers dump their answers whole (no ``exclude_none`` or ``exclude_defaults``), so a
    field with a default is in every answer all the same; pydantic marks such fields optional
    in serialization mode unless a model's own config says otherwise, and the run-status
    contract keeps its defaults for old clients reading new answers.
    """

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization":
            return field.get("serialization_exclude_if") is None
        return super().field_is_required(field, total)


def _component_schemas() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({model name: its $ref}, the components' schemas), from the models above."""
    inputs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in _REQUEST_MODELS),
        *((model, "serialization") for model in _ANSWER_MODELS),
    ]
    refs, top = models_json_schema(
        inputs, ref_template=_SCHEMA_REF, schema_generator=_ContractSchema
    )
    named = {model.__name__: dict(refs[(model, mode)]) for model, mode in inputs}
    return named, dict(top.get("$defs", {}))


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _response(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": _json_content(schema), **extra}


def _shared_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _query_bound(name: str, default: int, top: int, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "integer", "minimum": 1, "maximum": top, "default": default},
    }


def _paths(refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    run_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "the run id (any other string names no run: 404)",
        "schema": {"type": "string", "pattern": RUN_ID_PATTERN, "maxLength": RUN_ID_MAX_LENGTH},
    }
    # From the start's answer to the run's own routes: the run id is the links' `id`.
    to_run = {"id": "$response.body#/id"}
    return {
        "/api/runs": {
            "post": {
                "operationId": "startRun",
                "summary": "Start a run over a manifest",
                "description": "Validates the body (400 naming each field), refuses a run id "
                "already used (409), then starts the run's orchestration and answers with "
                "Durable's check-status links.",
                "requestBody": {"required": True, "content": _json_content(refs["StartRunBody"])},
                "responses": {
                    "202": _response(
                        "the run started; Durable's check-status links",
                        refs["CheckStatusLinks"],
                        headers={
                            "Location": {
                                "description": "Durable's status URL (statusQueryGetUri)",
                                "schema": {"type": "string"},
                            },
                            "Retry-After": {
                                "description": "seconds to wait before asking",
                                "schema": {"type": "integer", "minimum": 0},
                            },
                        },
                        links={
                            "GetRun": {"operationId": "getRun", "parameters": to_run},
                            "CancelRun": {"operationId": "cancelRun", "parameters": to_run},
                        },
                    ),
                    "400": _shared_ref("InvalidRequest"),
                    "401": _shared_ref("Unauthorized"),
                    "409": _response("a run with this run id exists already", refs["ErrorAnswer"]),
                    "503": _response(
                        "the local server is stopping and starts no new runs",
                        refs["ErrorAnswer"],
                    ),
                },
            },
            "get": {
                "operationId": "listRuns",
                "summary": "The runs created lately, newest first",
                "parameters": [
                    _query_bound(
                        "days", LIST_DEFAULT_DAYS, LIST_MAX_DAYS, "runs created in the last N days"
                    ),
                    _query_bound("limit", LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT, "N runs at most"),
                ],
                "responses": {
                    "200": _response("the runs, each in the run-status contract", refs["RunList"]),
                    "400": _shared_ref("InvalidRequest"),
                    "401": _shared_ref("Unauthorized"),
                },
            },
        },
        "/api/runs/{id}": {
            "parameters": [run_id],
            "get": {
                "operationId": "getRun",
                "summary": "Where a run stands (the run-status contract)",
                "responses": {
                    "200": _response("the run's status", refs["RunStatus"]),
                    "401": _shared_ref("Unauthorized"),
                    "404": _shared_ref("NotFound"),
                },
            },
        },
        "/api/runs/{id}/cancel": {
            "parameters": [run_id],
            "post": {
                "operationId": "cancelRun",
                "summary": "Cancel a live run (its compute is torn down, its report written)",
                "description": "Sets the run's durable cancel flag, then raises the cancel "
                "event; the request's body, if any, is ignored.",
                "responses": {
                    "202": _response("the cancel is requested", refs["CancelAnswer"]),
                    "401": _shared_ref("Unauthorized"),
                    "404": _shared_ref("NotFound"),
                    "409": _response("the run already ended", refs["ErrorAnswer"]),
                },
            },
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApiDocument",
                "summary": "This document",
                "responses": {
                    "200": _response("the OpenAPI 3.1 document", {"type": "object"}),
                    "401": _shared_ref("Unauthorized"),
                },
            },
        },
    }


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of this HTTP API, from the models the handlers answer with.

    ``server_url`` is the origin the API is reached at (the paths start with ``/api``); the
    document names no server without it.
    """
    refs, schemas = _component_schemas()
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "batchctl", "version": API_VERSION, "description": _DESCRIPTION},
        "paths": _paths(refs),
        "components": {
            "schemas": schemas,
            "responses": {
                "InvalidRequest": _response(
                    "the request is invalid; each problem names its field",
                    refs["InvalidRequestAnswer"],
                ),
                "NotFound": _response("no run with this id", refs["ErrorAnswer"]),
                # As the Functions host answers a missing or wrong key: no body at all.
                "Unauthorized": {"description": f"no key, or a wrong one, in {KEY_HEADER}"},
            },
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "apiKey",
                    "in": "header",
                    "name": KEY_HEADER,
                    "description": "a function key of the app; optional on a local server "
                    "started without a key (see the description above)",
                },
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }
    if server_url:
        document["servers"] = [{"url": server_url.rstrip("/")}]
    return document


def _origin(url: str) -> str | None:
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.scheme}://{parsed.netloc}" if parsed.scheme and parsed.netloc else None


def get_openapi(req: func.HttpRequest) -> func.HttpResponse:
    """GET /api/openapi.json: the document, its server the origin this request came to."""
    return _json(openapi_document(_origin(req.url)), 200)


def orphaned_runs(tagged_run_ids: set[str], runtime_by_run: dict[str, str | None]) -> set[str]:
    """Runs whose compute still exists although their orchestration no longer runs."""
    return {
        run_id for run_id in tagged_run_ids if runtime_by_run.get(run_id) not in ACTIVE_STATUSES
    }


TERMINATED = "Terminated"
# How far back the sweeper looks for terminated runs whose ledger it still has to close.
TERMINATED_LOOKBACK = timedelta(days=7)


async def sweep(
    client: Any,
    backend: Any,
    finalize_terminated: Callable[[str, Any], bool] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Delete compute tagged by runs that are no longer running; returns the runs swept.

    Durable's own terminate (``terminatePostUri``) runs none of our code, so a terminated
    run's compute, queues and ledger are left as they were: ``finalize_terminated`` (given
    the run id and the orchestration's last input) tears such a run down and records its
    unfinished items as not run; it is idempotent and says whether it did anything. The
    backend's calls block (AML pollers), so they run in threads, never on the event loop.
    """
    tagged = {c.run_id for c in await asyncio.to_thread(backend.list_tagged) if c.run_id}
    runtime = {run_id: _status_name(await client.get_status(run_id)) for run_id in tagged}
    swept: list[str] = []
    # Each run on its own: one whose cleanup keeps failing must not stop the pass, or every
    # run after it would never be swept (it is logged, and tried again at the next pass).
    for run_id in sorted(orphaned_runs(tagged, runtime)):
        try:
            await asyncio.to_thread(backend.cancel_jobs, run_id)
            await asyncio.to_thread(backend.delete_clusters, run_id)
        except Exception:
            log.exception("sweeping run %s's compute failed; the next pass tries again", run_id)
            continue
        swept.append(run_id)
    if finalize_terminated is not None:
        since = (now or datetime.now(UTC)) - TERMINATED_LOOKBACK
        terminated = [df.OrchestrationRuntimeStatus.Terminated]
        for status in await query_instances(
            client, created_time_from=since, runtime_status=terminated
        ):
            run_id = str(getattr(status, "instance_id", "") or "")
            if not run_id:
                continue
            try:
                acted: bool = await asyncio.to_thread(
                    finalize_terminated, run_id, getattr(status, "input_", None)
                )
            except Exception:
                log.exception("closing terminated run %s failed; the next pass goes on", run_id)
                continue
            if acted:
                swept = sorted({*swept, run_id})
    return swept
