"""HTTP and trigger handlers, written against a Durable client so they are testable.

Every handler takes the Durable client as an argument (the Functions host injects the real
one; tests pass a stand-in at that boundary) and returns a plain ``func.HttpResponse``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import azure.durable_functions as df
import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batchctl.activity_names import CANCEL_EVENT, ORCHESTRATOR_NAME
from batchctl.contracts import (
    RUN_ID_MAX_LENGTH,
    RUN_ID_PATTERN,
    RunOptions,
    RunRequest,
    RunState,
)
from batchctl.runids import new_run_id, run_id_for_blob
from batchctl.runstatus import ACTIVE_STATUSES, RunStatus, run_status_of, runtime_name
from batchctl.validation import problems
from batchctl.workspec import parse_model

if TYPE_CHECKING:
    from batchctl.settings import ControllerSettings

# ACTIVE_STATUSES is re-exported: the runtime statuses in which an instance still owns compute.
__all__ = ["ACTIVE_STATUSES", "new_run_id", "run_id_for_blob"]

# GET /api/runs: how far back it looks by default, and the most runs one answer lists.
LIST_DEFAULT_DAYS = 7
LIST_MAX_DAYS = 90
LIST_DEFAULT_LIMIT = 50
LIST_MAX_LIMIT = 500


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


def _json(body: Any, status: int) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json"
    )


def _bad_request(error: ValidationError | ValueError) -> func.HttpResponse:
    if isinstance(error, ValidationError):
        found = problems(error)
    else:
        found = [{"field": "(body)", "error": str(error)}]
    return _json({"error": "invalid request", "problems": found}, 400)


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
    except ValueError:
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
        return _json({"error": "invalid request", "problems": problems}, 400)
    existing = await client.get_status(run_id)
    if _status_name(existing) is not None:
        return _json({"error": f"run {run_id} already exists"}, 409)
    await client.start_new(
        ORCHESTRATOR_NAME,
        instance_id=run_id,
        client_input=RunState(run_id=run_id, request=request).model_dump(mode="json"),
    )
    response: func.HttpResponse = client.create_check_status_response(req, run_id)
    return response


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
    status = await client.get_status(run_id)
    if _status_name(status) is None:
        return _json({"error": f"no run {run_id!r}"}, 404)
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
        return _json({"error": "invalid request", "problems": problems}, 400)
    since = (now or datetime.now(UTC)) - timedelta(days=bounds["days"])
    runs: list[RunStatus] = []
    for status in await client.get_status_by(created_time_from=since):
        run_id = str(getattr(status, "instance_id", "") or "")
        if run_id and _status_name(status) is not None:
            runs.append(run_status_of(status, run_id, report_url(run_id) if report_url else None))
    oldest = datetime.min.replace(tzinfo=UTC)
    runs.sort(key=lambda run: run.created_at or oldest, reverse=True)
    shown = runs[: bounds["limit"]]
    return _json({"runs": [run.model_dump(mode="json") for run in shown], "count": len(shown)}, 200)


async def cancel_run(
    req: func.HttpRequest, client: Any, set_cancel_flag: Callable[[str], None] | None = None
) -> func.HttpResponse:
    """Cancel a live run: the durable flag first (it cannot be lost), then the event (fast).

    Durable discards an event raised while the orchestration continues as new; the flag in
    storage, read at every poll, makes such a cancel win at the next poll instead.
    """
    run_id = req.route_params.get("id", "")
    runtime = _status_name(await client.get_status(run_id))
    if runtime is None:
        return _json({"error": f"no run {run_id!r}"}, 404)
    if runtime not in ACTIVE_STATUSES:
        return _json({"error": f"run {run_id} already ended ({runtime})"}, 409)
    if set_cancel_flag is not None:
        await asyncio.to_thread(set_cancel_flag, run_id)
    await client.raise_event(run_id, CANCEL_EVENT, None)
    return _json({"run_id": run_id, "cancel": "requested"}, 202)


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
    swept = sorted(orphaned_runs(tagged, runtime))
    for run_id in swept:
        await asyncio.to_thread(backend.cancel_jobs, run_id)
        await asyncio.to_thread(backend.delete_clusters, run_id)
    if finalize_terminated is not None:
        since = (now or datetime.now(UTC)) - TERMINATED_LOOKBACK
        for status in await client.get_status_by(
            created_time_from=since, runtime_status=[df.OrchestrationRuntimeStatus.Terminated]
        ):
            run_id = str(getattr(status, "instance_id", "") or "")
            if not run_id:
                continue
            acted: bool = await asyncio.to_thread(
                finalize_terminated, run_id, getattr(status, "input_", None)
            )
            if acted:
                swept = sorted({*swept, run_id})
    return swept
