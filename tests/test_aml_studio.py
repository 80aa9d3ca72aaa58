"""A run's node jobs as the AML studio shows them (issue 26): each job's display name says
the run and the slot, each worker names itself after its job, and the run report links
every slot's job to its studio page. Both SDKs' real entities are checked; v1's display
name goes through azureml-core's own ``Run`` setter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("azure.ai.ml", reason="the aml extra (azure-ai-ml) is not installed")

from batchctl.compute.aml import NodeLaunch, job_name
from batchctl.compute.aml.gateway import job_display_name, node_environment, studio_job_url
from batchctl.compute.aml.gateway_v2 import build_job, v2_backend
from batchctl.compute.base import JobPages
from batchctl.contracts import NodeThroughput, RunOptions, RunPhase, RunPlan, RunReport
from batchctl.reporting.analysis import node_of
from batchctl.reporting.artifacts import planned_nodes
from batchctl.reporting.html import render_report_html
from tests.test_compute_aml import aml_v1_backend
from tests.test_compute_contract import (
    CLIENT_ID,
    IMAGE,
    RUN_ID,
    STORAGE,
    FakeMLClient,
    aml_settings,
    make_plan,
)


def launch() -> NodeLaunch:
    return NodeLaunch.from_settings(
        STORAGE, RUN_ID, RunOptions(processes_per_node=2), identity_client_id=CLIENT_ID
    )


def test_the_display_name_says_the_run_the_slot_and_the_attempt() -> None:
    assert job_display_name("run-a", "c-1", 3, 2) == "batchctl run-a on c-1 node 3 (attempt 2)"


def test_v2_jobs_show_their_slot_and_name_their_workers_after_the_job() -> None:
    cluster = make_plan(nodes=8).clusters[0]
    job = build_job(cluster, launch(), image=IMAGE, node=5, attempt=1)
    assert job.display_name == job_display_name(RUN_ID, cluster.name, 5, 1)
    assert job.environment_variables is not None
    assert job.environment_variables["BATCHCTL_NODE_NAME"] == job.name
    # As the SDK sends it.
    rest: Any = job._to_job()._to_rest_object().properties
    assert rest.display_name == job.display_name
    assert rest.environment_variables["BATCHCTL_NODE_NAME"] == job_name(
        RUN_ID, cluster.name, 1, node=5
    )
    # Everything else of the run's environment is unchanged.
    env = node_environment(launch(), cluster.name, 5, 1)
    assert {k: v for k, v in env.items() if k != "BATCHCTL_NODE_NAME"} == launch().environment()


def test_v1_runs_get_the_same_display_name_and_worker_names(tmp_path: Any) -> None:
    pytest.importorskip("azureml.core", reason="the aml-v1 extra (azureml-core) is not installed")
    backend, workspace = aml_v1_backend(tmp_path)
    plan = make_plan(nodes=3)
    backend.submit_jobs(RUN_ID, plan, RunOptions())
    slots = {
        (config.run_config.target, env["BATCHCTL_NODE_NAME"])
        for config in workspace.configs.values()
        for env in [config.run_config.environment_variables]
    }
    cluster = plan.clusters[0].name
    assert slots == {(cluster, job_name(RUN_ID, cluster, 0, node=n)) for n in range(3)}
    assert sorted(workspace.display_names.values()) == [
        job_display_name(RUN_ID, cluster, n, 0) for n in range(3)
    ]


def test_v1_sets_the_display_name_through_azureml_core_and_survives_its_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = pytest.importorskip("azureml.core")
    from azureml.core.run import Run

    from batchctl.compute.aml.gateway_v1 import WorkspaceCalls

    named: list[str] = []

    class Client:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def set_display_name(self, name: str) -> None:  # what Run.display_name's setter calls
            if self.fail:
                raise RuntimeError("PATCH refused")
            named.append(name)

    class Submitted(Run):  # type: ignore[misc]
        def __init__(self, fail: bool) -> None:  # the real setter, none of the network
            self._client = Client(fail)
            self._run_id = "svc_0001"

        @property
        def id(self) -> str:
            return self._run_id

        def get_details(self) -> dict[str, Any]:
            return {"target": "c"}

        def get_status(self) -> str:
            return "Starting"

        def get_tags(self) -> dict[str, str]:
            return {"batchctl-run-id": RUN_ID}

    for fail in (False, True):

        class Experiment:
            def __init__(self, workspace: Any, name: str) -> None:
                pass

            def submit(self, config: Any, tags: Any = None, _fail: bool = fail) -> Any:
                return Submitted(_fail)

        monkeypatch.setattr(core, "Experiment", Experiment)
        run = WorkspaceCalls(object()).submit("batchctl", None, {}, display_name="shown")
        assert run.id == "svc_0001" and run.status == "Starting"
    assert named == ["shown"]  # set once; the refused one still returned its run


def test_studio_pages_name_the_job_and_the_workspace() -> None:
    aml = aml_settings()
    url = studio_job_url(aml, "run-a-c000-n1-0")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "ml.azure.com",
        "/runs/run-a-c000-n1-0",
    )
    (wsid,) = parse_qs(parts.query)["wsid"]
    assert wsid == (
        f"/subscriptions/{aml.subscription_id}/resourcegroups/{aml.resource_group}"
        f"/workspaces/{aml.workspace_name}"
    )
    v2 = v2_backend(FakeMLClient(), STORAGE, aml)
    assert isinstance(v2, JobPages) and v2.job_page("x") == studio_job_url(aml, "x")
    v1, _ = aml_v1_backend()
    assert v1.job_page("x") is None  # v1 jobs are named by the service: no page by name


def test_the_report_links_each_slot_s_jobs_to_the_studio() -> None:
    plan: RunPlan = make_plan(nodes=3)
    cluster = plan.clusters[0].name
    # Workers as the nodes named themselves (their job, a process suffix) and as the
    # analysis counts them (by node).
    workers = [
        f"{job_name(RUN_ID, cluster, 0, node=0)}:41",
        f"{job_name(RUN_ID, cluster, 0, node=1)}-p1:42",
        f"{job_name(RUN_ID, cluster, 1, node=1)}:43",  # slot 1's second attempt
    ]
    nodes = [
        NodeThroughput(node=node_of(w), succeeded=2, failed=0, busy_s=1, active_s=1)
        for w in workers
    ]
    backend = v2_backend(FakeMLClient(), STORAGE, aml_settings())
    slots, unplanned = planned_nodes(plan, nodes, RUN_ID, job_page=backend.job_page)
    assert unplanned == []
    by_slot = {slot.slot: slot.logs for slot in slots}
    assert by_slot[0] == [backend.job_page(job_name(RUN_ID, cluster, 0, node=0))]
    assert len(by_slot[1]) == 2 and all(
        log.startswith("https://ml.azure.com/runs/") for log in by_slot[1]
    )
    assert by_slot[2] == [f"Azure ML job {RUN_ID}-{cluster}-n2-<attempt>"]  # idle: no job known
    now = datetime(2026, 12, 6, tzinfo=UTC)
    report = RunReport(
        run_id=RUN_ID,
        phase=RunPhase.COMPLETED,
        manifest="m.csv",
        total=6,
        succeeded=6,
        failed=0,
        invalid=0,
        started_at=now,
        finished_at=now,
        plan=plan,
        output_prefix=f"outputs/{RUN_ID}/",
        planned_nodes=slots,
    )
    html = render_report_html(report)
    page = by_slot[0][0].replace("&", "&amp;")
    assert f'<a href="{page}">{job_name(RUN_ID, cluster, 0, node=0)}</a>' in html
