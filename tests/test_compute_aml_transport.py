"""The AML backend through each gateway's SDK request pipeline, answered at the HTTP adapter.

Nothing above the wire is faked: azure-ai-ml's ``MLClient`` and azureml-core's
``Workspace`` build, sign, send and parse every request, raise their own exceptions and run
their own long-running-operation pollers. Only the HTTP exchange is replaced, by a
``requests`` adapter mounted on the session that the SDK's transport uses; it records every
request and answers with the documented ARM shapes (an ``ErrorResponse`` for a refusal, a
``ComputeResource`` plus an ``Azure-AsyncOperation`` status for a cluster create).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
import urllib3
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

pytest.importorskip("azure.ai.ml", reason="the aml extra (azure-ai-ml) is not installed")

from azure.ai.ml import MLClient
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport

from batchctl.compute.aml import AmlBackend, NodeLaunch, job_name, plan_with_quota
from batchctl.compute.aml.gateway import job_tags, run_key_tag
from batchctl.compute.aml.gateway_v2 import AmlV2Gateway, v2_backend
from batchctl.compute.aml.throttling import ThrottledError
from batchctl.contracts import JobState, ProgressSnapshot, RunOptions, RunPlan
from batchctl.progress import StallClock, Verdict, advance_stall_clock, decide
from tests.test_compute_contract import CLIENT_ID, STORAGE, aml_settings, make_plan

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
ARM = "https://management.azure.com"
WORKSPACE_ID = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/"
    "Microsoft.MachineLearningServices/workspaces/ws"
)

# ARM does not document Jobs_List's page size; the fake pages at ARM's customary 100, and
# the call-budget test counts in pages, so another size changes its numbers, not its shape.
JOBS_PAGE_SIZE: Final = 100

Reply = tuple[int, Any, dict[str, str]]
Handler = Callable[[requests.PreparedRequest], Reply]


class RecordingAdapter(BaseAdapter):
    """Answers every HTTP request with ``handler`` and records (method, url) in order."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self._handler = handler
        self._lock = threading.Lock()
        self.log: list[tuple[str, str]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        with self._lock:
            self.log.append((str(request.method), str(request.url)))
        status, body, headers = self._handler(request)
        content = b"" if body is None else json.dumps(body).encode()
        all_headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(content)),
            "x-ms-request-id": "00000000-0000-0000-0000-000000000001",
            **headers,
        }
        response = requests.Response()
        response.status_code = status
        response.reason = "answered by RecordingAdapter"
        response.headers = CaseInsensitiveDict(all_headers)
        response.url = str(request.url)
        response.request = request
        # azure-core's RequestsTransport streams the body from ``raw``, as from a socket.
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(content), headers=all_headers, status=status, preload_content=False
        )
        return response

    def close(self) -> None:
        pass

    def count(self, method: str, fragment: str) -> int:
        with self._lock:
            return sum(1 for verb, url in self.log if verb == method and fragment in url)


class StaticToken:
    """A TokenCredential that never signs in (the pipeline only needs a bearer token)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("token", int(time.time()) + 3600)


def ml_client(adapter: RecordingAdapter) -> MLClient:
    session = requests.Session()
    session.mount("https://", adapter)
    transport = RequestsTransport(session=session, session_owner=False)
    return MLClient(StaticToken(), SUBSCRIPTION, "rg", "ws", transport=transport)


def workspace_body() -> dict[str, Any]:
    return {"id": WORKSPACE_ID, "name": "ws", "location": "eastus", "properties": {}}


def authorization_failed(action: str) -> Reply:
    """ARM's answer to a caller without the action at that scope (ErrorResponse shape)."""
    return (
        403,
        {
            "error": {
                "code": "AuthorizationFailed",
                "message": (
                    "The client 'c' with object id 'o' does not have authorization to perform "
                    f"action '{action}' over scope '/subscriptions/{SUBSCRIPTION}' or the "
                    "scope is invalid."
                ),
            }
        },
        {},
    )


def not_found(request: requests.PreparedRequest) -> Reply:
    return 404, {"error": {"code": "ResourceNotFound", "message": str(request.url)}}, {}


def is_workspace_get(request: requests.PreparedRequest) -> bool:
    return request.method == "GET" and str(request.url).startswith(f"{ARM}{WORKSPACE_ID}?")


# == 403 on the subscription-scope quota reads ====================================================


def quota_refused(request: requests.PreparedRequest) -> Reply:
    url = str(request.url)
    if is_workspace_get(request):
        return 200, workspace_body(), {}
    if "/locations/eastus/usages" in url:
        return authorization_failed("Microsoft.MachineLearningServices/locations/usages/read")
    if "/locations/eastus/vmSizes" in url:
        return authorization_failed("Microsoft.MachineLearningServices/locations/vmsizes/read")
    return not_found(request)


def test_v2_quota_refused_by_arm_plans_with_quota_unknown() -> None:
    adapter = RecordingAdapter(quota_refused)
    backend = v2_backend(ml_client(adapter), STORAGE, aml_settings())
    options = RunOptions(deadline_s=7200)

    quota = backend.read_quota(options.vm_size, low_priority=options.low_priority)

    # The SDK did send the subscription-scope read and got the 403 back.
    assert adapter.count("GET", f"/subscriptions/{SUBSCRIPTION}/providers/") >= 1
    assert quota.limit_cores is None and quota.nodes_allowed is None
    assert quota.cores_per_vm == 4  # from the known-size table
    assert any("quota unknown" in note and "403" in note for note in quota.notes)
    # The activity's next step, as controller.plan_run takes it: a plan, not an error.
    plan = plan_with_quota("run-403", 20_000, options, quota, aml_settings())
    assert plan.total_nodes > 0 and plan.clusters
    assert plan.binding_limit != "quota"
    assert any("quota unknown" in note for note in plan.notes)


def test_v2_other_http_errors_still_fail_the_read() -> None:
    def server_error(request: requests.PreparedRequest) -> Reply:
        if is_workspace_get(request):
            return 200, workspace_body(), {}
        return 400, {"error": {"code": "BadRequest", "message": "bad location"}}, {}

    from azure.core.exceptions import HttpResponseError

    backend = v2_backend(ml_client(RecordingAdapter(server_error)), STORAGE, aml_settings())
    with pytest.raises(HttpResponseError):
        backend.read_quota("Standard_NC4as_T4_v3", low_priority=True)


# == the fan-out: every create is started before any wait completes ===============================


# Poll again at once: ARM polling otherwise waits its default 30 s between polls. Only on
# LRO answers: azure-core's retry policy retries any response that carries Retry-After.
POLL_AT_ONCE: dict[str, str] = {"Retry-After": "0"}


class ClusterService:
    """ARM for compute create: PUT -> 201 + Azure-AsyncOperation, then GET of the resource.

    The operation status is answered only once every expected PUT has arrived; after a
    timeout it says Failed, so a backend that waits on one create before starting the next
    fails here instead of passing slowly.
    """

    def __init__(self, expected_puts: int, timeout_s: float = 5.0) -> None:
        self.expected = expected_puts
        self.timeout_s = timeout_s
        self.all_started = threading.Event()
        self.computes: dict[str, dict[str, Any]] = {}
        self.puts = 0
        self.first_status_at_puts: int | None = None
        self._lock = threading.Lock()

    def __call__(self, request: requests.PreparedRequest) -> Reply:
        url = str(request.url)
        path = url.split("?", 1)[0]
        if is_workspace_get(request):
            return 200, workspace_body(), {}
        if "/operationResults/" in path:
            # The poller's first status read: only answered once every create was started.
            released = self.all_started.wait(self.timeout_s)
            with self._lock:
                if self.first_status_at_puts is None:
                    self.first_status_at_puts = self.puts
            return 200, {"status": "Succeeded" if released else "Failed"}, POLL_AT_ONCE
        if "/computes/" in path:
            name = path.rsplit("/", 1)[-1]
            if request.method == "PUT":
                sent = request.body
                body = json.loads(sent if isinstance(sent, str | bytes) else b"{}")
                body.update(
                    id=f"{WORKSPACE_ID}/computes/{name}",
                    name=name,
                    type="Microsoft.MachineLearningServices/workspaces/computes",
                )
                body["properties"]["provisioningState"] = "Creating"
                with self._lock:
                    self.computes[name] = body
                    self.puts += 1
                    if self.puts >= self.expected:
                        self.all_started.set()
                operation = f"{ARM}{WORKSPACE_ID}/computes/{name}/operationResults/op-{name}"
                return (
                    201,
                    body,
                    {
                        "Azure-AsyncOperation": f"{operation}?api-version=2024-10-01",
                        **POLL_AT_ONCE,
                    },
                )
            if request.method == "GET" and name in self.computes:
                done = json.loads(json.dumps(self.computes[name]))
                done["properties"]["provisioningState"] = "Succeeded"
                return 200, done, {}
        return not_found(request)


@pytest.fixture
def three_clusters() -> Iterator[tuple[Any, ClusterService, RecordingAdapter]]:
    plan = make_plan(nodes=250)  # 84 + 83 + 83 nodes in three clusters
    service = ClusterService(expected_puts=len(plan.clusters))
    yield plan, service, RecordingAdapter(service)
    service.all_started.set()  # never leave a poller thread waiting


def test_v2_ensure_starts_every_create_before_any_wait_completes(
    three_clusters: tuple[Any, ClusterService, RecordingAdapter],
) -> None:
    plan, service, adapter = three_clusters
    backend = v2_backend(ml_client(adapter), STORAGE, aml_settings())

    ensured = backend.ensure_clusters(plan.run_id, plan)

    assert sorted(c.name for c in ensured) == sorted(c.name for c in plan.clusters)
    assert all(c.state == "Succeeded" and c.run_id == plan.run_id for c in ensured), ensured
    assert service.puts == 3
    # No operation status was answered before all three PUTs had been sent.
    assert service.first_status_at_puts == 3
    puts = [i for i, (verb, url) in enumerate(adapter.log) if verb == "PUT"]
    polls = [i for i, (_, url) in enumerate(adapter.log) if "/operationResults/" in url]
    assert len(puts) == 3 and polls
    # Each PUT carried what build_cluster built, over the SDK's own serialization.
    sent = service.computes[plan.clusters[0].name]["properties"]["properties"]
    assert sent["scaleSettings"]["maxNodeCount"] == plan.clusters[0].nodes
    assert sent["vmPriority"] == "LowPriority"


def test_v2_ensure_is_idempotent_over_the_wire(
    three_clusters: tuple[Any, ClusterService, RecordingAdapter],
) -> None:
    plan, _, adapter = three_clusters
    backend = v2_backend(ml_client(adapter), STORAGE, aml_settings())
    backend.ensure_clusters(plan.run_id, plan)
    puts = adapter.count("PUT", "/computes/")
    again = backend.ensure_clusters(plan.run_id, plan)  # a retried activity
    assert adapter.count("PUT", "/computes/") == puts
    assert sorted(c.name for c in again) == sorted(c.name for c in plan.clusters)


# == SDK v1 (azureml-core): the same 403 through its own requests session =========================


def test_v1_quota_refused_by_arm_plans_with_quota_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("azureml.core", reason="the aml-v1 extra (azureml-core) is not installed")
    import azureml.core.compute.amlcompute as amlcompute
    from azureml.core import Workspace
    from azureml.core.authentication import TokenAuthentication

    from batchctl.compute.aml.gateway_v1 import WorkspaceCalls, v1_backend

    adapter = RecordingAdapter(quota_refused)

    def session_with_adapter() -> requests.Session:
        # azureml-core makes a fresh requests.Session per call; ours carries the adapter.
        session = requests.Session()
        session.mount("https://", adapter)
        return session

    monkeypatch.setattr(amlcompute, "get_requests_session", session_with_adapter)
    workspace = Workspace(
        SUBSCRIPTION,
        "rg",
        "ws",
        auth=TokenAuthentication(lambda audience: "token"),
        _location="eastus",
        _disable_service_check=True,
    )
    backend = v1_backend(WorkspaceCalls(workspace), STORAGE, aml_settings())

    quota = backend.read_quota("Standard_NC4as_T4_v3", low_priority=True)

    assert adapter.count("GET", "/locations/eastus/") >= 1
    assert quota.nodes_allowed is None
    assert any("quota unknown" in note for note in quota.notes)
    plan = plan_with_quota("run-403-v1", 20_000, RunOptions(), quota, aml_settings())
    assert plan.total_nodes > 0
    assert any("quota unknown" in note for note in plan.notes)


# == one single-node job per node: submitted, kept, and restarted alone over the wire =============


class JobService:
    """ARM for jobs and the anonymous environment a command job registers.

    ``PUT .../jobs/{name}`` stores the JobBase body as sent (it answers 201 with it, status
    Starting); ``GET`` returns it or 404; the test moves a job with ``set_status``, as AML
    does when a node is allocated or preempted. ``POST .../jobs/{name}/cancel`` answers 202
    with a Location that reads done (204), and the job reads Canceled. Every job PUT body is
    kept in order.

    ``GET .../jobs`` lists as ARM's Jobs_List does: newest first, only jobs that carry the
    ``tag`` parameter as a tag KEY (the REST spec: "Jobs returned will have this tag key"),
    ``page_size`` jobs a page, and a ``nextLink`` that carries an opaque ``$skip`` token while
    more remain. ``refuse_listings`` answers the next listing requests 429 with Retry-After
    (ARM's throttling answer), as a read budget spent by other callers would.
    """

    def __init__(self, page_size: int = JOBS_PAGE_SIZE) -> None:
        self.page_size = page_size
        self.jobs: dict[str, dict[str, Any]] = {}
        self.put_bodies: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.refusals_left = 0
        self.listings_before_refusing = 0
        self.retry_after = "0"
        self.unlisted: set[str] = set()  # created, not listed yet (the listing lags)
        self._lock = threading.Lock()

    def set_status(self, name: str, status: str) -> None:
        with self._lock:
            self.jobs[name]["properties"]["status"] = status

    def refuse_listings(self, times: int, *, retry_after: str, after: int = 0) -> None:
        """Answer 429 to ``times`` listing requests, once ``after`` more were answered."""
        with self._lock:
            self.refusals_left, self.retry_after = times, retry_after
            self.listings_before_refusing = after

    def seed(self, template: dict[str, Any], name: str, tags: dict[str, str], status: str) -> None:
        """A job as if PUT earlier: ``template`` (a stored body) with its name and tags."""
        body = json.loads(json.dumps(template))
        body.update(id=f"{WORKSPACE_ID}/jobs/{name}", name=name)
        body["properties"].update(tags=tags, status=status, displayName=name)
        with self._lock:
            self.jobs[name] = body

    def __call__(self, request: requests.PreparedRequest) -> Reply:
        url = str(request.url)
        path = url.split("?", 1)[0]
        if is_workspace_get(request):
            return 200, workspace_body(), {}
        if "/environments/" in path and request.method == "PUT":
            body = json.loads(_sent(request))
            body.update(id=path.removeprefix(ARM), name=path.rsplit("/", 1)[-1])
            return 200, body, {}
        if "/operationResults/c-" in path and request.method == "GET":
            return 204, None, {}  # the cancel's Location: done
        if path == f"{ARM}{WORKSPACE_ID}/jobs" and request.method == "GET":
            return self._list(request)
        if "/jobs/" not in path:
            return not_found(request)
        tail = path.split("/jobs/", 1)[1]
        if request.method == "POST" and tail.endswith("/cancel"):
            name = tail.removesuffix("/cancel")
            with self._lock:
                if name not in self.jobs:
                    return not_found(request)
                self.cancels.append(name)
                self.jobs[name]["properties"]["status"] = "Canceled"
            return 202, None, {"Location": f"{ARM}{WORKSPACE_ID}/operationResults/c-{name}"}
        name = tail
        if request.method == "PUT":
            with self._lock:
                taken = name in self.jobs
            if taken:
                return name_taken()
            body = json.loads(_sent(request))
            body.update(
                id=f"{WORKSPACE_ID}/jobs/{name}",
                name=name,
                type="Microsoft.MachineLearningServices/workspaces/jobs",
            )
            body["properties"]["status"] = "Starting"
            with self._lock:
                self.put_bodies.append(json.loads(json.dumps(body)))
                self.jobs[name] = body
            return 201, body, {}
        if request.method == "GET":
            with self._lock:
                stored = self.jobs.get(name)
                found = json.loads(json.dumps(stored)) if stored is not None else None
            return (200, found, {}) if found is not None else not_found(request)
        return not_found(request)

    def _list(self, request: requests.PreparedRequest) -> Reply:
        query = parse_qs(urlsplit(str(request.url)).query)
        with self._lock:
            if self.listings_before_refusing > 0:
                self.listings_before_refusing -= 1
            elif self.refusals_left > 0:
                self.refusals_left -= 1
                return too_many_requests(self.retry_after)
            key = query.get("tag", [None])[0]
            listed = [
                json.loads(json.dumps(body))
                for name, body in reversed(self.jobs.items())  # newest first
                if name not in self.unlisted
                and (key is None or key in (body["properties"].get("tags") or {}))
            ]
        token = query.get("$skip", [None])[0]
        start = int(base64.urlsafe_b64decode(token).decode()) if token else 0
        end = start + self.page_size
        page: dict[str, Any] = {"value": listed[start:end]}
        if end < len(listed):
            # An opaque continuation, as ARM's: the client follows the link, never builds it.
            following = {key: values[0] for key, values in query.items() if key != "$skip"}
            following["$skip"] = base64.urlsafe_b64encode(str(end).encode()).decode()
            page["nextLink"] = f"{ARM}{WORKSPACE_ID}/jobs?{urlencode(following)}"
        return 200, page, {}


def name_taken() -> Reply:
    """ARM's answer to a PUT of a job name that exists with other settings."""
    return (
        400,
        {
            "error": {
                "code": "UserError",
                "message": "A job with this name already exists. If you are trying to create a "
                "new job, use a different name.",
            }
        },
        {},
    )


def too_many_requests(retry_after: str) -> Reply:
    """ARM's throttling answer to a read over the principal's budget."""
    return (
        429,
        {
            "error": {
                "code": "TooManyRequests",
                "message": "The request is being throttled as the limit has been reached "
                "for operation type - Read_ObservationWindow_00:05:00.",
            }
        },
        {"Retry-After": retry_after},
    )


def _sent(request: requests.PreparedRequest) -> str | bytes:
    body = request.body
    return body if isinstance(body, str | bytes) else b"{}"


def test_v2_one_single_node_job_per_node_and_only_an_ended_slot_is_resubmitted() -> None:
    from batchctl.compute.aml import job_name
    from batchctl.contracts import JobState
    from batchctl.planning import PlanInputs, plan_run

    service = JobService()
    adapter = RecordingAdapter(service)
    backend = v2_backend(ml_client(adapter), STORAGE, aml_settings())
    plan = plan_run("run-nodes", PlanInputs(items=100, sec_per_item=20, max_nodes=4))
    (cluster,) = plan.clusters
    assert cluster.nodes == 4
    names = [job_name(plan.run_id, cluster.name, 0, node=node) for node in range(4)]

    jobs = backend.submit_jobs(plan.run_id, plan, RunOptions(processes_per_node=2))

    # Four jobs for a cluster of four nodes, each asking AML for one node, as sent.
    assert sorted(body["name"] for body in service.put_bodies) == sorted(names)
    for body in service.put_bodies:
        properties = body["properties"]
        assert properties["resources"]["instanceCount"] == 1
        assert properties["distribution"]["processCountPerInstance"] == 2
        assert properties["computeId"].endswith(f"/computes/{cluster.name}")
        assert properties["tags"]["batchctl-run-id"] == plan.run_id
    assert [job.name for job in jobs] == names
    assert all(job.state is JobState.QUEUED and job.detail == "Starting" for job in jobs)

    # The nodes come up; a retried submit while they run sends no job PUT at all.
    for name in names:
        service.set_status(name, "Running")
    puts = adapter.count("PUT", "/jobs/")
    again = backend.submit_jobs(plan.run_id, plan, RunOptions(processes_per_node=2))
    assert adapter.count("PUT", "/jobs/") == puts
    assert [job.name for job in again] == names
    assert {job.state for job in again} == {JobState.RUNNING}

    # Node 2 is preempted: AML reports its job Failed (the enum it parses reads as failed,
    # not as an unknown word), and the other three keep running.
    service.set_status(names[2], "Failed")
    states = {job.name: job.state for job in backend.job_states(plan.run_id)}
    assert states == {
        name: JobState.FAILED if name == names[2] else JobState.RUNNING for name in names
    }

    restarted = backend.submit_jobs(plan.run_id, plan, RunOptions(processes_per_node=2))

    replacement = job_name(plan.run_id, cluster.name, 1, node=2)
    assert adapter.count("PUT", "/jobs/") == puts + 1  # that slot alone
    assert service.put_bodies[-1]["name"] == replacement
    assert service.put_bodies[-1]["properties"]["resources"]["instanceCount"] == 1
    assert service.put_bodies[-1]["properties"]["tags"]["batchctl-attempt"] == "1"
    assert [job.name for job in restarted] == [*names[:2], replacement, names[3]]
    latest = {job.name: job.state for job in backend.job_states(plan.run_id)}
    assert latest == {
        names[0]: JobState.RUNNING,
        names[1]: JobState.RUNNING,
        replacement: JobState.QUEUED,
        names[3]: JobState.RUNNING,
    }

    # Teardown: every active job of the run is asked to stop, the failed one is not.
    backend.cancel_jobs(plan.run_id)
    assert sorted(service.cancels) == sorted([*names[:2], replacement, names[3]])
    assert {job.state for job in backend.job_states(plan.run_id)} == {JobState.CANCELLED}


# == the per-poll cost: pages of the run's jobs, not a request per job ============================


class FakeClock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def timed_backend(adapter: RecordingAdapter, clock: FakeClock, **overrides: Any) -> AmlBackend:
    aml = aml_settings(**overrides)
    gateway = AmlV2Gateway(ml_client(adapter), aml, sleep=clock.sleep, clock=clock)
    return AmlBackend(gateway, STORAGE, aml)


def seeded_fleet(
    run_id: str, nodes: int, *, retried_every: int = 0
) -> tuple[RunPlan, JobService, RecordingAdapter]:
    """A run of ``nodes`` node slots whose jobs ARM already holds, all Running.

    One job goes through the SDK's real submit (its PUT body is the template); the rest are
    stored as if submitted earlier. Every ``retried_every``-th slot was preempted once: its
    attempt 0 Failed and attempt 1 runs, so the latest attempt must win over the listing.
    """
    plan = make_plan(run_id=run_id, nodes=nodes)
    service = JobService()
    adapter = RecordingAdapter(service)
    gateway = AmlV2Gateway(ml_client(adapter), aml_settings())
    launch = NodeLaunch.from_settings(STORAGE, run_id, RunOptions(), identity_client_id=CLIENT_ID)
    gateway.submit_job(plan.clusters[0], 0, 0, launch)
    template = service.put_bodies[0]
    slot = 0
    for cluster in plan.clusters:
        for node in range(cluster.nodes):
            retried = retried_every and slot % retried_every == 0
            for attempt in range(2 if retried else 1):
                service.seed(
                    template,
                    job_name(run_id, cluster.name, attempt, node=node),
                    job_tags(run_id, cluster, node, attempt),
                    "Failed" if retried and attempt == 0 else "Running",
                )
            slot += 1
    return plan, service, adapter


def listing_requests(log: list[tuple[str, str]]) -> list[str]:
    return [url for verb, url in log if verb == "GET" and urlsplit(url).path.endswith("/jobs")]


def poll(run_id: str, adapter: RecordingAdapter) -> tuple[list[Any], list[tuple[str, str]]]:
    """One poll's job states and the requests it sent."""
    backend = v2_backend(ml_client(adapter), STORAGE, aml_settings())
    before = len(adapter.log)
    states = backend.job_states(run_id)
    return states, adapter.log[before:]


def test_v2_poll_costs_pages_of_the_runs_jobs_flat_in_the_node_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The call budget of one poll (job_states), counted at the HTTP adapter.

    Before this listing, a poll walked job names with one GET each: 23, 202 and 2,011 GETs
    at 10, 100 and 1,000 nodes. Now it is one listing by the run's tag key, paged as ARM
    pages it: ceil(jobs / page size) GETs, 1, 1 and 10 at 100 a page. Bounded by pages, not
    constant (a thousand-node fleet is ten pages), and never a request per job.
    """
    counts: dict[int, int] = {}
    for nodes in (10, 100, 1000):
        run_id = f"run-budget-{nodes}"
        plan, service, adapter = seeded_fleet(run_id, nodes)
        # Another run's job in the same workspace: the tag key keeps it out of the pages.
        service.seed(
            service.put_bodies[0],
            "run-other-job",
            job_tags("run-other", plan.clusters[0], 0, 0),
            "Running",
        )

        states, requests_sent = poll(run_id, adapter)

        counts[nodes] = len(requests_sent)
        assert len(states) == plan.total_nodes == nodes
        assert "run-other-job" not in {job.name for job in states}
        # Every request of the poll is a page of the run's listing, by its own tag key.
        pages = listing_requests(requests_sent)
        assert len(pages) == len(requests_sent) == -(-nodes // JOBS_PAGE_SIZE)
        assert all(parse_qs(urlsplit(url).query)["tag"] == [run_key_tag(run_id)] for url in pages)
    with capsys.disabled():
        print(f"\nARM requests per poll by nodes (pages of {JOBS_PAGE_SIZE}): {counts}")
    assert counts == {10: 1, 100: 1, 1000: 10}


def test_v2_poll_reports_each_slots_latest_attempt_from_the_listing() -> None:
    # A thousand nodes, every 7th preempted once: its attempt 0 Failed, attempt 1 Running.
    # Both attempts are listed (1,143 jobs, 12 pages); the latest attempt is the slot's.
    plan, _, adapter = seeded_fleet("run-retried", 1000, retried_every=7)

    states, requests_sent = poll(plan.run_id, adapter)

    assert len(states) == 1000
    assert all(job.state is JobState.RUNNING for job in states)
    assert sum(job.name.endswith("-1") for job in states) == len(range(0, 1000, 7))
    assert len(requests_sent) == -(-(1000 + 143) // JOBS_PAGE_SIZE)


def test_v2_a_429_on_the_listing_waits_as_retry_after_says_and_resumes_at_its_page() -> None:
    plan, service, adapter = seeded_fleet("run-throttled", 250)  # three pages
    clock = FakeClock()
    backend = timed_backend(adapter, clock)
    # ARM answers the first page, then throttles the second twice (Retry-After: 7).
    service.refuse_listings(2, retry_after="7", after=1)
    started = time.monotonic()

    states = backend.job_states(plan.run_id)

    assert len(states) == 250
    assert clock.slept == [7.0, 7.0]  # the service's own wait, each time
    assert time.monotonic() - started < 7  # the pipeline did not sleep 7 s on its own
    pages = [
        parse_qs(urlsplit(url).query).get("$skip", [""])[0] for url in listing_requests(adapter.log)
    ]
    # First page once; the second asked three times at its own token, never from the start.
    assert pages[0] == "" and pages.count("") == 1
    assert pages[1] == pages[2] == pages[3] != "" and len(pages) == 5


def test_v2_throttling_past_the_budget_leaves_the_poll_unknown_and_the_run_going() -> None:
    plan, service, adapter = seeded_fleet("run-spent", 100)
    clock = FakeClock()
    backend = timed_backend(adapter, clock, arm_retry_budget_s=30)
    service.refuse_listings(1000, retry_after="10")

    states = backend.job_states(plan.run_id)

    # Three waits of 10 s fill the 30 s budget; a fourth would pass it, so the poll stops.
    assert clock.slept == [10.0, 10.0, 10.0]
    assert states == []  # the jobs' states are unknown this poll, not an error
    # What the monitor makes of that poll: no resubmit, no lost fleet, no failure, and the
    # stall clock that ran before the poll keeps running from where it was.
    snapshot = ProgressSnapshot(
        run_id=plan.run_id, succeeded=40, failed=0, queued_messages=60, jobs=states
    )
    stalled_since = datetime(2026, 1, 1, tzinfo=UTC)
    now = stalled_since + timedelta(minutes=5)
    clock_after = advance_stall_clock(StallClock(40, stalled_since, 0), snapshot, now)
    assert clock_after.stall_since == stalled_since
    decision = decide(
        snapshot,
        total=100,
        options=RunOptions(),
        started_at=stalled_since,
        now=now,
        clock=clock_after,
    )
    assert decision.verdict is Verdict.CONTINUE
    # The next poll, once ARM answers again, sees the fleet.
    service.refuse_listings(0, retry_after="0")
    assert len(backend.job_states(plan.run_id)) == 100
    # Cancel and submit are activities whose retries fit the case: they get the error.
    service.refuse_listings(1000, retry_after="10")
    with pytest.raises(ThrottledError, match="429"):
        backend.cancel_jobs(plan.run_id)


def test_v2_a_retried_submit_adopts_a_job_the_listing_does_not_show_yet() -> None:
    service = JobService()
    adapter = RecordingAdapter(service)
    backend = v2_backend(ml_client(adapter), STORAGE, aml_settings())
    plan = make_plan(run_id="run-lag", nodes=3)
    first = backend.submit_jobs(plan.run_id, plan, RunOptions())
    service.unlisted.add(first[1].name)  # ARM's listing has not caught up with it yet
    puts = adapter.count("PUT", "/jobs/")

    again = backend.submit_jobs(plan.run_id, plan, RunOptions())

    # The one PUT for that name was refused as taken (400); the job was read and kept.
    assert adapter.count("PUT", "/jobs/") == puts + 1
    assert adapter.count("GET", f"/jobs/{first[1].name}") == 1
    assert [job.name for job in again] == [job.name for job in first]
    assert len(service.jobs) == 3
