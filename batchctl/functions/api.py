"""HTTP and trigger handlers, written against a Durable client so they are testable.

Every handler takes the Durable client as an argument (the Functions host injects the real
one; tests pass a stand-in at that boundary) and returns a plain ``func.HttpResponse``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.durable_functions as df
import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batchctl.activity_names import CANCEL_EVENT, ORCHESTRATOR_NAME
from batchctl.contracts import (
    RUN_ID_MAX_LENGTH,
    RUN_ID_PATTERN,
    RunOptions,
    RunPhase,
    RunRequest,
    RunState,
)
from batchctl.workspec import parse_model

# Durable runtime statuses in which an instance still owns compute.
ACTIVE_STATUSES = frozenset({"Running", "Pending", "ContinuedAsNew", "Suspended"})


class StartRunBody(BaseModel):
    """The body of POST /api/runs."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(min_length=1, max_length=2048, description="container/name or blob URL")
    options: RunOptions = Field(default_factory=RunOptions)
    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN, max_length=RUN_ID_MAX_LENGTH)


def _json(body: Any, status: int) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json"
    )


def _bad_request(error: ValidationError | ValueError) -> func.HttpResponse:
    if isinstance(error, ValidationError):
        problems = [
            {"field": ".".join(str(part) for part in e["loc"]) or "(body)", "error": e["msg"]}
            for e in error.errors()
        ]
    else:
        problems = [{"field": "(body)", "error": str(error)}]
    return _json({"error": "invalid request", "problems": problems}, 400)


def new_run_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def run_id_for_blob(name: str, etag: str) -> str:
    """One run per manifest version: the same blob event delivered twice maps to one id."""
    digest = hashlib.sha256(f"{name}\n{etag}".encode()).hexdigest()[:20]
    return f"m-{digest}"


def _status_name(status: Any) -> str | None:
    runtime = getattr(status, "runtime_status", None)
    if runtime is None:
        return None
    return str(getattr(runtime, "value", runtime))


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


async def start_run(req: func.HttpRequest, client: Any) -> func.HttpResponse:
    """POST /api/runs: validate the body (400 naming the field), refuse a run id already
    used (409), start the run orchestrator and answer with Durable's check-status links."""
    try:
        payload = req.get_json()
    except ValueError:
        return _bad_request(ValueError("the body is not JSON"))
    try:
        body = StartRunBody.model_validate(payload)
        run_id = body.run_id or new_run_id()
        request = RunRequest(run_id=run_id, manifest=body.manifest, options=body.options)
    except ValidationError as error:
        return _bad_request(error)
    problems = work_problems(body.options)
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


def friendly_status(run_id: str, status: Any, report_url: str | None) -> dict[str, Any]:
    """What GET /api/runs/{id} shows: phase, counts, percent, ETA and the report link."""
    custom = status.custom_status if isinstance(status.custom_status, dict) else {}
    runtime = _status_name(status) or "Unknown"
    ended_abnormally = {
        "Failed": RunPhase.FAILED.value,
        "Terminated": RunPhase.CANCELLED.value,
        "Canceled": RunPhase.CANCELLED.value,
    }
    if runtime in ended_abnormally:
        # The orchestration crashed or was killed: its last custom status ("running") is stale.
        phase = ended_abnormally[runtime]
    else:
        phase = custom.get("phase") or (
            RunPhase.COMPLETED.value if runtime == "Completed" else "starting"
        )
    total = int(custom.get("total") or 0)
    succeeded = int(custom.get("succeeded") or 0)
    failed = int(custom.get("failed") or 0)
    done = succeeded + failed
    finished = runtime not in ACTIVE_STATUSES
    return {
        "run_id": run_id,
        "runtime_status": runtime,
        "phase": phase,
        "total": total,
        "succeeded": succeeded,
        "failed": failed,
        "invalid": int(custom.get("invalid") or 0),
        "remaining": max(total - done, 0),
        "percent": round(100.0 * done / total, 2) if total else (100.0 if finished else 0.0),
        "eta_s": custom.get("eta_s"),
        "message": custom.get("message", ""),
        "report": report_url if finished else None,
    }


async def get_run(req: func.HttpRequest, client: Any, report_url: str) -> func.HttpResponse:
    run_id = req.route_params.get("id", "")
    status = await client.get_status(run_id)
    if _status_name(status) is None:
        return _json({"error": f"no run {run_id!r}"}, 404)
    return _json(friendly_status(run_id, status, report_url), 200)


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
