"""HTTP and trigger handlers, written against a Durable client so they are testable.

Every handler takes the Durable client as an argument (the Functions host injects the real
one; tests pass a stand-in at that boundary) and returns a plain ``func.HttpResponse``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

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


async def start_run(req: func.HttpRequest, client: Any) -> func.HttpResponse:
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


async def cancel_run(req: func.HttpRequest, client: Any) -> func.HttpResponse:
    run_id = req.route_params.get("id", "")
    runtime = _status_name(await client.get_status(run_id))
    if runtime is None:
        return _json({"error": f"no run {run_id!r}"}, 404)
    if runtime not in ACTIVE_STATUSES:
        return _json({"error": f"run {run_id} already ended ({runtime})"}, 409)
    await client.raise_event(run_id, CANCEL_EVENT, None)
    return _json({"run_id": run_id, "cancel": "requested"}, 202)


def orphaned_runs(tagged_run_ids: set[str], runtime_by_run: dict[str, str | None]) -> set[str]:
    """Runs whose compute still exists although their orchestration no longer runs."""
    return {
        run_id for run_id in tagged_run_ids if runtime_by_run.get(run_id) not in ACTIVE_STATUSES
    }


async def sweep(client: Any, backend: Any) -> list[str]:
    """Delete compute tagged by runs that are no longer running; returns the runs swept."""
    tagged = {c.run_id for c in backend.list_tagged() if c.run_id}
    runtime = {run_id: _status_name(await client.get_status(run_id)) for run_id in tagged}
    swept = sorted(orphaned_runs(tagged, runtime))
    for run_id in swept:
        backend.cancel_jobs(run_id)
        backend.delete_clusters(run_id)
    return swept
