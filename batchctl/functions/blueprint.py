"""The client-side functions (HTTP API, the Event Grid upload trigger, sweeper) as a blueprint."""

from __future__ import annotations

import logging
import time
from typing import Any

import azure.durable_functions as df
import azure.functions as func

from batchctl.functions import api

bp = df.Blueprint()
log = logging.getLogger("batchctl.functions")

SWEEP_SCHEDULE = "0 */15 * * * *"  # every 15 minutes


def _report_url(run_id: str) -> str:
    from batchctl.controller import report_blob_name
    from batchctl.functions.app_services import app_services

    settings = app_services().settings
    return f"{settings.blob_url}/{settings.runs_container}/{report_blob_name(run_id)}"


@bp.route(route="runs", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def start_run(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    from batchctl.functions.app_services import app_services

    return await api.start_run(req, client, app_services().settings)


@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def list_runs(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    return await api.list_runs(req, client, _report_url)


@bp.route(route="runs/{id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def get_run(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    return await api.get_run(req, client, _report_url(req.route_params.get("id", "")))


@bp.route(route="runs/{id}/cancel", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def cancel_run(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    from batchctl.controller import request_cancel
    from batchctl.functions.app_services import app_services

    return await api.cancel_run(req, client, lambda run_id: request_cancel(app_services(), run_id))


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The API's OpenAPI 3.1 document (``api.openapi_document``), served at this origin."""
    return api.get_openapi(req)


# BlobCreated in the manifests container, delivered by the storage account's Event Grid
# subscription (infra/modules/blob-event-subscription.bicep). An Event Grid trigger, not a
# blob trigger: a blob trigger binds the blob's content (the whole manifest, read into the
# host's memory) just to learn its name and ETag, which the event carries; the orchestrator's
# validation streams the manifest itself. A failure here answers Event Grid with an error,
# so it retries and then dead-letters the event.
@bp.event_grid_trigger(arg_name="event")
@bp.durable_client_input(client_name="client")
async def start_run_from_blob(
    event: func.EventGridEvent, client: df.DurableOrchestrationClient
) -> None:
    from batchctl.functions.app_services import app_services

    container = app_services().settings.manifests_container
    manifest = api.manifest_of_event(event.event_type, event.subject, event.get_json(), container)
    if manifest is None:
        log.info(
            "event %s (%s, %s) names no manifest; ignored",
            event.id,
            event.event_type,
            event.subject,
        )
        return
    name, etag = manifest
    run_id = await api.start_run_from_blob(name, etag, client)
    if run_id is None:
        log.info("manifest %s (etag %s) already has a run; event ignored", name, etag)
    else:
        log.info("manifest %s started run %s", name, run_id)


@bp.timer_trigger(arg_name="timer", schedule=SWEEP_SCHEDULE, run_on_startup=False)
@bp.durable_client_input(client_name="client")
async def sweep_orphaned_compute(
    timer: func.TimerRequest, client: df.DurableOrchestrationClient
) -> None:
    from batchctl.controller import CLOSE_PASS_BUDGET_S, finalize_terminated
    from batchctl.functions.app_services import app_services

    services = app_services()
    # One budget for the whole pass, shared by every terminated run it closes (each still
    # takes at least one step a pass): what is left goes on at the next pass.
    pass_ends = time.monotonic() + CLOSE_PASS_BUDGET_S

    def close(run_id: str, last_input: Any) -> bool:
        budget = max(pass_ends - time.monotonic(), 0.0)
        return finalize_terminated(services, run_id, last_input, budget_s=budget)

    swept = await api.sweep(client, services.backend, close)
    if swept:
        log.warning("deleted compute left behind by runs %s", ", ".join(swept))
