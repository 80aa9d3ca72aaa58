"""One run-status contract: the mapping from Durable's status, and who may import what.

The orchestrator's custom status comes in two shapes today (``RunProgress`` while it polls,
plain dicts with the same keys between polls and at the end); both map through
:func:`batchctl.runstatus.run_status`, and the API, the client and the local server all
answer with :class:`RunStatus`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from azure.durable_functions.models.DurableOrchestrationStatus import DurableOrchestrationStatus

from batchctl.contracts import RunPhase, RunProgress
from batchctl.functions import api
from batchctl.runstatus import (
    ACTIVE_STATUSES,
    RunStatus,
    RuntimeStatus,
    phase_for,
    run_status,
    run_status_from_json,
    run_status_of,
)

REPO = Path(__file__).resolve().parent.parent


def test_every_runtime_status_has_one_meaning() -> None:
    stale = "running"
    expected = {
        RuntimeStatus.PENDING: "running",
        RuntimeStatus.RUNNING: "running",
        RuntimeStatus.CONTINUED_AS_NEW: "running",
        RuntimeStatus.SUSPENDED: "running",
        # Ended without saying so: the last custom status is stale.
        RuntimeStatus.COMPLETED: "completed",
        RuntimeStatus.FAILED: "failed",
        RuntimeStatus.TERMINATED: "cancelled",
        RuntimeStatus.CANCELED: "cancelled",
    }
    for runtime, phase in expected.items():
        assert phase_for(runtime.value, stale) == phase, runtime
    assert {s.value for s in RuntimeStatus} - ACTIVE_STATUSES == {
        "Completed",
        "Failed",
        "Terminated",
        "Canceled",
    }
    # A completed orchestration keeps the run's own verdict (a run can complete as failed).
    assert phase_for("Completed", "failed") == "failed"
    assert phase_for("Failed", "completed") == "failed"
    # Before the orchestrator said anything.
    assert phase_for("Pending", None) == phase_for("Running", None) == "starting"
    assert phase_for("Completed", None) == "completed"


def test_both_custom_status_shapes_of_the_orchestrator_map_alike() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    progress = RunProgress(
        run_id="r1", phase=RunPhase.RUNNING, total=40, succeeded=10, failed=2,
        invalid=1, started_at=now, updated_at=now, eta_s=30.0, message="12 of 40",
    ).model_dump(mode="json")  # fmt: skip
    between_polls = {
        "run_id": "r1", "phase": "running", "total": 40, "succeeded": 10, "failed": 2,
        "invalid": 1, "message": "12 of 40",
    }  # fmt: skip

    from_progress = run_status("r1", "Running", progress)
    from_dict = run_status("r1", "Running", between_polls)

    for status in (from_progress, from_dict):
        assert (status.phase, status.total, status.succeeded, status.failed) == (
            "running", 40, 10, 2,
        )  # fmt: skip
        assert (status.remaining, status.percent, status.invalid) == (28, 30.0, 1)
        assert not status.finished and status.report is None
    assert from_progress.eta_s == 30.0 and from_progress.started_at == now
    # The same, as a JSON string (some SDK versions hand the custom status back so).
    assert run_status("r1", "Running", json.dumps(progress)) == from_progress


def test_the_end_counts_not_run_items_as_done_and_links_the_report() -> None:
    final = {
        "run_id": "r1", "phase": "cancelled", "total": 10, "succeeded": 4, "failed": 1,
        "not_run": 5, "invalid": 0, "message": "cancelled on request",
    }  # fmt: skip
    status = run_status("r1", "Completed", final, report="https://a/runs/r1/report.json")
    assert (status.phase, status.done, status.remaining, status.percent) == (
        "cancelled", 10, 0, 100.0,
    )  # fmt: skip
    assert status.finished and status.report == "https://a/runs/r1/report.json"
    assert status.succeeded_fully is False and not status.ended_well
    assert status.view()["phase"] == "cancelled" and status.view()["finished"] is True


def test_the_sdk_status_and_the_status_url_body_map_alike() -> None:
    body = {
        "name": "run_orchestrator",
        "instanceId": "r1",
        "runtimeStatus": "Terminated",
        "input": None,
        "customStatus": {"phase": "running", "total": 5, "succeeded": 2, "failed": 0},
        "output": "stopped",
        "createdTime": "2025-01-02T03:04:05Z",
        "lastUpdatedTime": "2025-01-02T03:05:05Z",
    }
    from_sdk = run_status_of(DurableOrchestrationStatus.from_json(body), "r1")
    from_body = run_status_from_json(body)
    assert from_sdk == from_body
    assert (from_body.phase, from_body.runtime_status, from_body.succeeded) == (
        "cancelled", "Terminated", 2,
    )  # fmt: skip
    assert from_body.created_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(ValueError, match="runtimeStatus"):
        run_status_from_json({"error": "no run"})


def test_a_newer_app_does_not_break_an_older_client() -> None:
    parsed = RunStatus.model_validate({"run_id": "r", "phase": "running", "new_field": [1]})
    assert parsed.phase == "running" and parsed.runtime_status == "Unknown"


class _Client:
    """The Durable client surface list_runs uses, with the SDK's own status objects."""

    def __init__(self, statuses: list[DurableOrchestrationStatus]) -> None:
        self.statuses = statuses
        self.asked: dict[str, Any] = {}

    async def get_status_by(self, **query: Any) -> list[DurableOrchestrationStatus]:
        self.asked = query
        return self.statuses


def _instance(run_id: str, runtime: str, created: str) -> DurableOrchestrationStatus:
    return DurableOrchestrationStatus.from_json(
        {
            "instanceId": run_id,
            "runtimeStatus": runtime,
            "createdTime": created,
            "customStatus": {"phase": "running", "total": 4, "succeeded": 1, "failed": 0},
        }
    )


def test_listing_runs_is_newest_first_in_the_contract() -> None:
    client = _Client(
        [
            _instance("old", "Completed", "2025-01-01T00:00:00Z"),
            _instance("new", "Running", "2025-01-03T00:00:00Z"),
            _instance("mid", "Failed", "2025-01-02T00:00:00Z"),
        ]
    )
    request = func.HttpRequest("GET", "/api/runs", body=b"", params={"limit": "2"})
    now = datetime(2025, 1, 4, tzinfo=UTC)

    response = asyncio.run(api.list_runs(request, client, lambda r: f"https://a/{r}", now=now))

    body = json.loads(response.get_body())
    assert response.status_code == 200
    assert [(r["run_id"], r["phase"]) for r in body["runs"]] == [
        ("new", "running"),
        ("mid", "failed"),
    ]
    assert body["runs"][0]["report"] is None and body["runs"][1]["report"] == "https://a/mid"
    assert client.asked["created_time_from"] == datetime(2024, 12, 28, tzinfo=UTC)


@pytest.mark.parametrize(("query", "field"), [({"days": "0"}, "days"), ({"limit": "x"}, "limit")])
def test_listing_runs_names_a_bad_query_field(query: dict[str, str], field: str) -> None:
    request = func.HttpRequest("GET", "/api/runs", body=b"", params=query)
    response = asyncio.run(api.list_runs(request, _Client([])))
    assert response.status_code == 400
    assert json.loads(response.get_body())["problems"][0]["field"] == field


def test_the_deployed_app_lists_runs() -> None:
    from tests.test_function_app import _binding, _functions

    trigger = _binding(_functions()["list_runs"], "httpTrigger")
    assert (trigger.route, [str(getattr(m, "value", m)) for m in trigger.methods]) == (
        "runs",
        ["GET"],
    )
    assert str(getattr(trigger.auth_level, "value", trigger.auth_level)) == "function"


def test_the_cli_client_imports_no_server_handler() -> None:
    # In a fresh interpreter: what `batchctl status` pulls in, and nothing of the server.
    code = (
        "import sys, batchctl.client, batchctl.commands.status, batchctl.runstatus\n"
        "bad = sorted(m for m in sys.modules if m.startswith("
        "('batchctl.functions', 'azure.functions', 'batchctl.local.server')))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out


def test_nodes_working_reach_the_status_while_the_run_runs() -> None:
    """The monitor's custom status says how many nodes work (their jobs run) of how many the
    plan has: the live view shows it, and an ended run shows no node working."""
    from tests.orchestration_harness import Script, run_script

    statuses: list[dict[str, Any]] = []
    script = Script(progress=[(2, 0), (4, 0), (10, 0)])
    run_script(script, on_status=lambda status: statuses.append(dict(status)))
    monitored = [s for s in statuses if s.get("phase") == "running" and "nodes_planned" in s]
    assert monitored, statuses
    # The scripted job is one running AML-style job: one node, of the plan's two.
    assert all((s["nodes_active"], s["nodes_planned"]) == (1, 2) for s in monitored)
    live = run_status("r", "Running", monitored[-1])
    assert (live.nodes_active, live.nodes_planned) == (1, 2)
    assert run_status("r", "Completed", monitored[-1]).nodes_active is None
    # A status from an app without the fields, or with junk in them, has no node count.
    assert run_status("r", "Running", {"phase": "running"}).nodes_active is None
    assert run_status("r", "Running", {"nodes_active": "many"}).nodes_active is None


def test_job_counts_count_the_nodes_of_running_jobs() -> None:
    from batchctl.contracts import JobCounts, JobInfo, JobState

    counts = JobCounts.model_validate(
        [
            JobInfo(name="a", cluster="c", state=JobState.RUNNING, nodes=3),
            {"name": "b", "cluster": "c", "state": "running"},
            JobInfo(name="c", cluster="c", state=JobState.QUEUED, nodes=5),
            JobInfo(name="d", cluster="c", state=JobState.COMPLETED),
        ]
    )
    assert (counts.running, counts.queued, counts.completed, counts.nodes_running) == (2, 1, 1, 4)
