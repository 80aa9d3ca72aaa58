"""Durable's terminate and the cancel API: what runs when our orchestrator code does not.

``terminatePostUri`` ends the orchestration without running any of our code, so the
sweeper closes such a run (compute, queues, not_run records, report); the cancel API
writes its durable flag before it raises the event. Storage is Azurite; only the Durable
client is a stand-in (the Functions host cannot run here).
"""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path
from typing import Any

import pytest

from batchctl import controller
from batchctl.activity_names import CANCEL_EVENT
from batchctl.contracts import ItemStatus, NotRunReason, RunRequest, RunState
from batchctl.functions import api
from batchctl.local.staging import stage_local_manifest
from batchctl.services import Services
from batchctl.settings import StorageSettings
from batchctl.storage import Ledger, RunQueues
from tests.fakes import FakeDurableClient, FakeStatus, FakeSweptCompute
from tests.test_function_app import _request

pytestmark = pytest.mark.azurite


def prepared_run(services: Services, tmp_path: Path, run_id: str, items: int) -> RunState:
    """A run validated and enqueued, as the orchestrator leaves it when it is terminated."""
    media = tmp_path / "media"
    media.mkdir(parents=True)
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(items):
            (media / f"v{index}.mp4").write_bytes(b"x")
            # Relative to the session's media root, as local mode resolves them.
            writer.writerow([f"item-{index}", f"{run_id}/media/v{index}.mp4"])
    settings = services.settings
    blob = stage_local_manifest(settings, manifest, run_id)
    request = RunRequest(run_id=run_id, manifest=blob)
    summary = controller.validate_manifest(services, request)
    controller.create_run_queues(services, run_id)
    return RunState(run_id=run_id, request=request, stage="monitor", summary=summary)


def test_the_sweeper_closes_a_run_that_durable_terminated(
    tmp_path: Path, services: Services, storage_settings: StorageSettings, run_id: str
) -> None:
    # Manifest rows name files under the session's media root, as in local mode.
    media_root = Path(services.settings.local_media_root or "")
    state = prepared_run(services, media_root / run_id, run_id, 5)
    ledger = Ledger(storage_settings)
    from batchctl.contracts import ItemResult

    ledger.record(ItemResult(run_id=run_id, item_id="item-0", status=ItemStatus.SUCCEEDED))
    client = FakeDurableClient(
        terminated=[FakeStatus("Terminated", instance_id=run_id, input_=state.model_dump_json())]
    )
    backend = FakeSweptCompute()

    def finalize(target: str, last_input: Any) -> bool:
        return controller.finalize_terminated(services, target, last_input)

    swept = asyncio.run(api.sweep(client, backend, finalize))

    assert swept == [run_id]
    results = {r.item_id: r for r in ledger.iter_results(run_id)}
    assert results["item-0"].status is ItemStatus.SUCCEEDED  # the first record still wins
    not_run = [r for r in results.values() if r.status is ItemStatus.NOT_RUN]
    assert len(not_run) == 4 and len(results) == 5
    assert {r.error.error_class for r in not_run if r.error} == {NotRunReason.TERMINATED.value}
    assert RunQueues(storage_settings, run_id).exists()["input"] is False
    report = services.store.download_bytes(
        services.settings.runs_container, controller.report_blob_name(run_id)
    )
    assert b'"phase": "cancelled"' in report and b'"not_run": 4' in report
    # The next sweep finds the marker and does nothing again.
    assert asyncio.run(api.sweep(client, backend, finalize)) == []


def test_cancel_writes_the_durable_flag_before_raising_the_event(
    services: Services, run_id: str
) -> None:
    controller.create_run_queues(services, run_id)
    order: list[str] = []
    client = FakeDurableClient(instances={run_id: FakeStatus("Running")})

    def set_flag(target: str) -> None:
        assert not client.events, "the flag must be written before the event is raised"
        controller.request_cancel(services, target)
        order.append("flag")

    request = _request("POST", f"/api/runs/{run_id}/cancel", route_params={"id": run_id})
    response = asyncio.run(api.cancel_run(request, client, set_flag))
    assert response.status_code == 202
    assert order == ["flag"] and client.events == [(run_id, CANCEL_EVENT, None)]
    assert controller.cancel_requested(services, run_id)
    assert controller.get_progress(services, run_id).cancel_requested
