"""A fleet that never arrives, a node that cannot start the image, a throttled listing and a
token refreshed mid-run: each ends the way the README's "When nodes do not come" says, with
the reason in the status and in the report.

Three layers, each with real parts where they can run here:

- the pure policy (``batchctl.arrival``, ``batchctl.progress``) over seeded random poll
  times;
- the AML backend through azure-ai-ml's own request pipeline (``MLClient`` on the
  recording HTTP adapter of tests/test_compute_aml_transport.py), answered with ARM's and
  run history's documented JSON: a ``ComputeResource`` whose ``AmlComputeProperties`` hold
  ``allocationState``, ``currentNodeCount`` and ``errors``; a run's ``RunDetails`` whose
  ``error`` is an ``ErrorResponse``;
- whole runs: the run orchestrator replayed by the real Durable SDK (both schema versions
  the extension sends), its compute activities calling that backend, its ledger scripted.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

pytest.importorskip("azure.ai.ml", reason="the aml extra (azure-ai-ml) is not installed")

from azure.ai.ml import MLClient
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import RequestsTransport

from batchctl.activity_names import CANCEL_EVENT, Activity
from batchctl.arrival import (
    DEFAULT_FALLBACK,
    Fallback,
    FleetMove,
    advance_nodeless_since,
    arrival_note,
    fallback_plan_note,
    parse_fallback,
)
from batchctl.compute.aml import AmlBackend
from batchctl.compute.aml.gateway import (
    ClusterFacts,
    cluster_facts,
    is_start_failure,
    nodes_missing_reason,
)
from batchctl.compute.aml.gateway_v2 import AmlV2Gateway
from batchctl.compute.base import TAG_RUN_ID, run_tags
from batchctl.contracts import (
    FleetMoveTask,
    JobCounts,
    ProgressSnapshot,
    RunOptions,
    RunPlan,
    RunRequest,
    RunState,
)
from batchctl.controller.compute import move_fleet, progress_snapshot
from batchctl.planning import plan_run
from batchctl.progress import MAX_RESUBMITS, StallClock, Verdict, advance_stall_clock, decide
from orchestrators.run import run_orchestrator
from tests.durable_replay import PRODUCTION_SCHEMAS, ActivityOutcome, ReplayDriver, ReplayRun
from tests.orchestration_harness import RUN_ID, ReplayActivities, finishing_after
from tests.test_compute_aml_transport import (
    ARM,
    SUBSCRIPTION,
    WORKSPACE_ID,
    FakeClock,
    JobService,
    RecordingAdapter,
    Reply,
    _sent,
    listing_requests,
    not_found,
)
from tests.test_compute_contract import STORAGE, aml_settings, size_records, usage_records

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VM_SIZE = "Standard_NC4as_T4_v3"
HISTORY = "https://eastus.api.azureml.ms"
DISCOVERY = "https://eastus.api.azureml.ms/discovery"
# Azure Compute's published AllocationFailed text, as AML reports it on the cluster.
NO_CAPACITY = (
    "AllocationFailed",
    "Allocation failed. We do not have sufficient capacity for the requested VM size in "
    "this region. Read more about improving likelihood of allocation success at "
    "http://aka.ms/allocation-guidance",
)
# What containerd and Docker say when a registry has no such image; AML's job error wraps
# the runtime's words (its exact preamble is not documented, so only the runtime's part is
# relied on).
PULL_FAILED = (
    "UserError",
    "Failed to pull Docker image myregistry.azurecr.io/batchctl-node:9: Error response from "
    "daemon: manifest for myregistry.azurecr.io/batchctl-node:9 not found: manifest unknown",
)


# == the pure policy ===============================================================================


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wait", Fallback("wait", None)),
        ("stop", Fallback("stop", 1800.0)),
        ("STOP@45m", Fallback("stop", 2700.0)),
        (" stop@1h ", Fallback("stop", 3600.0)),
        (DEFAULT_FALLBACK, Fallback("stop", 1800.0)),
        ("dedicated:50", Fallback("dedicated", 1800.0, (FleetMove(low_priority=False),), 50.0)),
        (
            "dedicated:12.5@20m",
            Fallback("dedicated", 1200.0, (FleetMove(low_priority=False),), 12.5),
        ),
        (
            "size:Standard_NC6s_v3,Standard_NC8as_T4_v3@10m",
            Fallback(
                "size",
                600.0,
                (FleetMove(vm_size="Standard_NC6s_v3"), FleetMove(vm_size="Standard_NC8as_T4_v3")),
            ),
        ),
    ],
)
def test_fallback_grammar(text: str, expected: Fallback) -> None:
    assert parse_fallback(text) == expected
    assert RunOptions(fallback=text).fallback == expected.describe()
    assert parse_fallback(expected.describe()) == expected  # the stored spelling reads back


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("later", "none of 'wait', 'stop"),
        ("stop@", "'' is not a duration"),
        ("stop@soon", "'soon' is not a duration"),
        ("stop@2m", "wait at least 5m"),
        ("stop:3", "'stop' takes only a wait"),
        ("wait@10m", "'wait' waits for ever"),
        ("dedicated", "say the most the dedicated fleet may cost"),
        ("dedicated:-5", "say the most the dedicated fleet may cost"),
        ("dedicated:inf", "say the most the dedicated fleet may cost"),
        ("size:", "name the VM sizes to try"),
        ("size:Standard NC6", "name the VM sizes to try"),
    ],
)
def test_a_bad_fallback_is_refused_saying_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        RunOptions(fallback=text)
    assert "fallback" in str(refused.value) and repr(text) in str(refused.value)


def test_the_plan_states_the_fallback_and_its_cap() -> None:
    assert fallback_plan_note(RunOptions(fallback="dedicated:40@20m")) == (
        f"if no node runs for 20m: move to dedicated {VM_SIZE} nodes if their plan costs at "
        "most $40, else stop (--fallback dedicated:40@20m)"
    )
    assert fallback_plan_note(RunOptions()) == (
        "if no node runs for 30m: stop the run (--fallback stop@30m)"
    )
    assert "wait as long as it takes" in fallback_plan_note(RunOptions(fallback="wait"))


def test_the_nodeless_clock_runs_exactly_while_jobs_wait_and_no_node_runs() -> None:
    rng = random.Random(24)
    since: datetime | None = None
    streak_start: datetime | None = None
    now = T0
    for _ in range(2000):
        now += timedelta(seconds=rng.uniform(5, 600))
        known = rng.random() > 0.1
        queued = rng.choice([0, 0, 3, 10])
        running = rng.choice([0, 0, 0, 1])
        since = advance_nodeless_since(
            since, queued=queued, nodes_running=running, known=known, now=now
        )
        if known:
            waiting = queued > 0 and running == 0
            streak_start = (streak_start or now) if waiting else None
        # An unknown poll changes nothing; otherwise the clock started with the streak.
        assert since == streak_start


def queued_snapshot(*, done: int = 0, note: str | None = None, nodes: int = 4) -> ProgressSnapshot:
    return ProgressSnapshot(
        run_id=RUN_ID,
        succeeded=done,
        failed=0,
        queued_messages=100,
        jobs=JobCounts(queued=nodes),
        fleet_note=note,
    )


def monitor(
    snapshots: Callable[[int], ProgressSnapshot],
    options: RunOptions,
    *,
    seed: int,
    total: int = 100,
    polls: int = 400,
) -> tuple[list[tuple[datetime, str]], Verdict, datetime]:
    """The monitor's policy over polls at seeded random intervals: (time, message) of each
    poll, the last verdict and its time."""
    rng = random.Random(seed)
    clock, now = StallClock(0, None, 0), T0
    seen: list[tuple[datetime, str]] = []
    for index in range(polls):
        snapshot = snapshots(index)
        clock = advance_stall_clock(clock, snapshot, now)
        decision = decide(
            snapshot,
            total=total,
            options=options,
            started_at=T0,
            now=now,
            clock=clock,
            nodes_planned=4,
        )
        seen.append((now, decision.message))
        if decision.terminal:
            return seen, decision.verdict, now
        now += timedelta(seconds=rng.uniform(10, 120))
    return seen, Verdict.CONTINUE, now


@pytest.mark.parametrize("seed", range(5))
def test_capacity_that_never_comes_stops_at_the_first_poll_past_the_fallback_wait(
    seed: int,
) -> None:
    why = "no low-priority capacity for Standard_NC4as_T4_v3 in eastus (AllocationFailed: x)"
    limit_min = random.Random(seed).randint(5, 90)
    options = RunOptions(fallback=f"stop@{limit_min}m")

    seen, verdict, ended = monitor(lambda _: queued_snapshot(note=why), options, seed=seed)

    assert verdict is Verdict.NO_NODES
    # The clock starts at the first poll; the run stops at the first poll at or past it.
    assert ended - T0 >= timedelta(minutes=limit_min)
    assert seen[-2][0] - T0 < timedelta(minutes=limit_min)
    final = seen[-1][1]
    assert final.startswith(f"0 of 4 nodes after {waited_words(ended)}: {why}")
    assert f"--fallback stop@{limit_min}m" in final and "100 items left" in final
    # Every status before it said why, in words, with the time waited.
    for when, message in seen[:-1]:
        assert f"0 items done; 0 of 4 nodes after {waited_words(when)}: {why}" == message


def waited_words(when: datetime) -> str:
    seconds = (when - T0).total_seconds()
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds // 60:.0f} min"


def test_wait_waits_with_the_reason_until_the_deadline() -> None:
    options = RunOptions(fallback="wait", deadline_s=6 * 3600)

    seen, verdict, ended = monitor(lambda _: queued_snapshot(), options, seed=7, polls=2000)

    assert verdict is Verdict.DEADLINE
    assert ended >= T0 + timedelta(hours=6)
    assert all("no node has been allocated yet" in message for _, message in seen[1:-1])


def test_a_node_that_comes_stops_the_wait_and_a_later_empty_fleet_starts_it_again() -> None:
    options = RunOptions(fallback="stop@10m")

    def snapshots(index: int) -> ProgressSnapshot:
        if 3 <= index < 20:  # nodes came within 6 min and worked; then all were preempted
            return ProgressSnapshot(
                run_id=RUN_ID,
                succeeded=index,
                failed=0,
                queued_messages=50,
                jobs=JobCounts(running=4, nodes_running=4),
            )
        return queued_snapshot(done=20 if index >= 20 else 0)

    seen, verdict, ended = monitor(snapshots, options, seed=3, polls=200)

    assert verdict is Verdict.NO_NODES
    # The clock restarted at the first poll without nodes, not at the run's start.
    left_at = seen[20][0]
    assert ended - left_at >= timedelta(minutes=10)
    assert seen[-2][0] - left_at < timedelta(minutes=10)
    minutes = (ended - left_at).total_seconds() // 60
    assert seen[-1][1].startswith(f"0 of 4 nodes after {minutes:.0f} min")
    assert all("nodes after" not in message for _, message in seen[3:20])


def test_each_move_gets_its_own_wait_and_the_run_stops_when_they_are_spent() -> None:
    options = RunOptions(fallback="size:Standard_NC6s_v3,Standard_NC8as_T4_v3@10m")
    rng = random.Random(11)
    clock, now = StallClock(0, None, 0), T0
    verdicts: list[tuple[Verdict, datetime]] = []
    while True:
        clock = advance_stall_clock(clock, queued_snapshot(), now)
        decision = decide(
            queued_snapshot(), total=100, options=options, started_at=T0, now=now, clock=clock
        )
        if decision.verdict is not Verdict.CONTINUE:
            verdicts.append((decision.verdict, now))
        if decision.verdict is Verdict.MOVE_FLEET:
            # What the orchestrator does with a move: a new fleet, its own clock.
            size = ("Standard_NC6s_v3", "Standard_NC8as_T4_v3")[clock.fallbacks]
            assert f"moving the fleet to {size}" in decision.message
            clock = StallClock(clock.last_done, None, 0, None, clock.fallbacks + 1)
        if decision.terminal:
            break
        now += timedelta(seconds=rng.uniform(10, 120))
    assert [verdict for verdict, _ in verdicts] == [
        Verdict.MOVE_FLEET,
        Verdict.MOVE_FLEET,
        Verdict.NO_NODES,
    ]
    times = [T0] + [when for _, when in verdicts]
    assert all(b - a >= timedelta(minutes=10) for a, b in itertools.pairwise(times))
    assert all(b - a < timedelta(minutes=13) for a, b in itertools.pairwise(times))


def test_a_pull_failure_stops_the_run_at_once_with_amls_words() -> None:
    error = f"job run-1-n0-0 failed: {PULL_FAILED[0]}: {PULL_FAILED[1]}"
    snapshot = ProgressSnapshot(
        run_id=RUN_ID,
        succeeded=0,
        failed=0,
        queued_messages=100,
        jobs=JobCounts(failed=1, queued=3),
        job_error=error,
        start_failure=True,
    )
    clock = advance_stall_clock(StallClock(0, None, 0), snapshot, T0)
    decision = decide(snapshot, total=100, options=RunOptions(), started_at=T0, now=T0, clock=clock)
    assert decision.verdict is Verdict.START_FAILED and decision.terminal
    assert decision.message == f"the nodes cannot start the run's image: {error}"


def test_one_nodes_pull_failure_amid_a_working_fleet_is_not_the_runs_end() -> None:
    # A thousand nodes pulling from a Basic registry: one throttled pull must not end a run
    # that has nodes at work or items done (seeded: any mix of either).
    rng = random.Random(24)
    error = f"job run-1-n7-0 failed: Failed to pull image: toomanyrequests: {PULL_FAILED[1]}"
    for _ in range(200):
        running = rng.choice([0, rng.randint(1, 999)])
        done = rng.choice([0, rng.randint(1, 5_000)]) if running else rng.randint(1, 5_000)
        snapshot = ProgressSnapshot(
            run_id=RUN_ID,
            succeeded=done,
            failed=0,
            queued_messages=10_000 - done,
            jobs=JobCounts(failed=1, running=running, nodes_running=running),
            job_error=error,
            start_failure=True,
        )
        clock = advance_stall_clock(StallClock(0, None, 0), snapshot, T0)
        decision = decide(
            snapshot, total=10_000, options=RunOptions(), started_at=T0, now=T0, clock=clock
        )
        assert decision.verdict is not Verdict.START_FAILED and not decision.terminal, (
            running,
            done,
        )
        assert error in decision.message  # still said, in the status


def test_a_fleet_that_crashes_at_start_stops_after_one_resubmit_not_five() -> None:
    crashed = ProgressSnapshot(
        run_id=RUN_ID,
        succeeded=0,
        failed=0,
        queued_messages=100,
        jobs=JobCounts(failed=4),
        job_error="job j failed: UserError: Execution failed with exit code 1",
    )
    verdicts = []
    clock = StallClock(0, None, 0)
    for _ in range(3):
        clock = advance_stall_clock(clock, crashed, T0)
        decision = decide(
            crashed, total=100, options=RunOptions(), started_at=T0, now=T0, clock=clock
        )
        verdicts.append(decision.verdict)
        if decision.verdict is Verdict.RESUBMIT:
            clock = StallClock(clock.last_done, clock.stall_since, clock.resubmits + 1)
        if decision.terminal:
            break
    assert verdicts == [Verdict.RESUBMIT, Verdict.START_FAILED]
    assert "exit code 1" in decision.message and "2 times in a row" in decision.message
    # A preempted fleet is not a broken image: it keeps its resubmits.
    preempted = crashed.model_copy(update={"job_error": "job j failed: Preempted: node lost"})
    clock = StallClock(0, None, 1)
    decision = decide(
        preempted, total=100, options=RunOptions(), started_at=T0, now=T0, clock=clock
    )
    assert decision.verdict is Verdict.RESUBMIT
    # Nor are workers killed from outside (the compute gives no error text): the resubmit
    # policy keeps its tries for them.
    killed = crashed.model_copy(update={"job_error": None})
    decision = decide(killed, total=100, options=RunOptions(), started_at=T0, now=T0, clock=clock)
    assert decision.verdict is Verdict.RESUBMIT
    assert MAX_RESUBMITS > 1


def capacity_facts(**overrides: Any) -> dict[str, Any]:
    """A ComputeResource as ARM's Compute_List returns it (AmlComputeProperties inside)."""
    body: dict[str, Any] = {
        "id": f"{WORKSPACE_ID}/computes/b1",
        "name": "b1",
        "location": "eastus",
        "tags": run_tags(RUN_ID),
        "properties": {
            "computeType": "AmlCompute",
            "computeLocation": "eastus",
            "provisioningState": "Succeeded",
            "properties": {
                "vmSize": VM_SIZE,
                "vmPriority": "LowPriority",
                "scaleSettings": {
                    "maxNodeCount": 4,
                    "minNodeCount": 0,
                    "nodeIdleTimeBeforeScaleDown": "PT2M",
                },
                "allocationState": "Steady",
                "currentNodeCount": 0,
                "targetNodeCount": 4,
                "nodeStateCounts": {"idleNodeCount": 0, "runningNodeCount": 0},
                "errors": [{"error": {"code": NO_CAPACITY[0], "message": NO_CAPACITY[1]}}],
            },
        },
    }
    body["properties"]["properties"].update(overrides)
    return body


def test_the_clusters_errors_in_words() -> None:
    facts = cluster_facts(capacity_facts())
    assert facts == ClusterFacts(
        name="b1",
        vm_size=VM_SIZE,
        low_priority=True,
        location="eastus",
        allocation_state="Steady",
        current_nodes=0,
        target_nodes=4,
        errors=(NO_CAPACITY,),
    )
    reason = nodes_missing_reason([facts, facts])
    assert reason is not None
    assert reason.startswith(f"no low-priority capacity for {VM_SIZE} in eastus (AllocationFailed:")
    assert reason.count("AllocationFailed") == 1  # said once for the clusters that agree
    quota = cluster_facts(
        capacity_facts(
            vmPriority="Dedicated",
            errors=[
                {
                    "error": {
                        "code": "ClusterCoreQuotaReached",
                        "message": "Operation results in exceeding quota limits of "
                        "Standard NCASv3_T4 Family Cores.",
                    }
                }
            ],
        )
    )
    assert nodes_missing_reason([quota]) == (
        f"no dedicated quota left for {VM_SIZE} in eastus (ClusterCoreQuotaReached: "
        "Operation results in exceeding quota limits of Standard NCASv3_T4 Family Cores.)"
    )
    resizing = cluster_facts(capacity_facts(errors=None, allocationState="Resizing"))
    assert nodes_missing_reason([resizing]) == (
        "the clusters are allocating nodes (1 resizing, no error yet)"
    )
    assert nodes_missing_reason([cluster_facts(capacity_facts(errors=[]))]) is None
    assert arrival_note(nodes_running=0, nodes_planned=65, waited=12 * 60, why=reason).startswith(
        f"0 of 65 nodes after 12 min: no low-priority capacity for {VM_SIZE} in eastus"
    )


@pytest.mark.parametrize(
    ("text", "start"),
    [
        (PULL_FAILED[1], True),
        ("ImagePullBackOff: Back-off pulling image", True),
        ("pull access denied for batchctl-node, repository does not exist", True),
        ("unauthorized: authentication required", True),
        ('OCI runtime create failed: exec: "python": executable file not found in $PATH', True),
        ("Execution failed. User process 'python' exited with status code 1.", False),
        ("The job was preempted: the low-priority node was taken back", False),
    ],
)
def test_which_job_errors_say_the_image_cannot_start(text: str, start: bool) -> None:
    assert is_start_failure(text) is start


# == the AML backend over the SDK's own pipeline =================================================


class AmlService(JobService):
    """JobService (ARM's jobs) plus what a poll reads when the jobs need explaining: ARM's
    Compute_List of the workspace, and run history's run details (found, as the SDK finds
    it, through the workspace's discoveryUrl)."""

    def __init__(self) -> None:
        super().__init__()
        self.computes: list[dict[str, Any]] = []
        self.errors: dict[str, tuple[str, str]] = {}
        self.authorizations: list[str] = []
        # Clusters created through the SDK (PUT bodies as sent), and what ARM says of their
        # allocation (AmlComputeProperties fields) when they are listed.
        self.created: dict[str, dict[str, Any]] = {}
        self.allocation: dict[str, dict[str, Any]] = {}

    def listed_computes(self) -> list[dict[str, Any]]:
        listed = []
        for name, sent in self.created.items():
            body = json.loads(json.dumps(sent))
            body["properties"]["provisioningState"] = "Succeeded"
            inner = body["properties"].setdefault("properties", {})
            inner.update(allocationState="Steady", currentNodeCount=0, targetNodeCount=0)
            inner.update(self.allocation.get(name, {}))
            listed.append(body)
        return [*self.computes, *listed]

    def _compute(self, request: requests.PreparedRequest, name: str) -> Reply:
        """ARM's compute create (201 + Azure-AsyncOperation, then Succeeded) and read."""
        if request.method == "PUT":
            body = json.loads(_sent(request))
            body.update(
                id=f"{WORKSPACE_ID}/computes/{name}",
                name=name,
                type="Microsoft.MachineLearningServices/workspaces/computes",
            )
            with self._lock:
                self.created[name] = body
            operation = f"{ARM}{WORKSPACE_ID}/computes/{name}/operationResults/op-{name}"
            return 201, body, {"Azure-AsyncOperation": operation, "Retry-After": "0"}
        with self._lock:
            found = next((b for b in self.listed_computes() if b["name"] == name), None)
        return (200, found, {}) if found is not None else not_found(request)

    def __call__(self, request: requests.PreparedRequest) -> Reply:
        url = str(request.url)
        path = urlsplit(url).path
        with self._lock:
            self.authorizations.append(str(request.headers.get("Authorization", "")))
        if request.method == "GET" and url.startswith(f"{ARM}{WORKSPACE_ID}?"):
            body = {
                "id": WORKSPACE_ID,
                "name": "ws",
                "location": "eastus",
                "properties": {"discoveryUrl": DISCOVERY},
            }
            return 200, body, {}
        if request.method == "GET" and url.startswith(DISCOVERY):
            return 200, {"api": HISTORY, "history": HISTORY}, {}
        if request.method == "GET" and path == f"{WORKSPACE_ID}/computes":
            with self._lock:
                return 200, {"value": self.listed_computes()}, {}
        if "/operationResults/op-" in path:
            return 200, {"status": "Succeeded"}, {"Retry-After": "0"}
        if path.startswith(f"{WORKSPACE_ID}/computes/"):
            return self._compute(request, path.rsplit("/", 1)[-1])
        if path.endswith("/locations/eastus/vmSizes"):
            return 200, {"value": size_records()}, {}
        if path.endswith("/locations/eastus/usages"):
            return 200, {"value": usage_records()}, {}
        if url.startswith(f"{HISTORY}/history/") and path.endswith("/details"):
            name = path.removesuffix("/details").rsplit("/", 1)[-1]
            if name not in self.errors:
                return not_found(request)
            code, message = self.errors[name]
            details = {
                "runId": name,
                "target": "b1",
                "status": "Failed",
                "error": {"error": {"code": code, "message": message}},
            }
            return 200, details, {}
        return super().__call__(request)


class RefreshingToken:
    """A TokenCredential whose tokens are near their end at once, so azure-core's bearer
    policy asks for a new one before every request (a long run's hourly refresh, sped
    up). ``fail_at`` lists which calls raise, as an identity endpoint that did not answer."""

    def __init__(self, fail_at: set[int] | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at or set()
        self._lock = threading.Lock()

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        with self._lock:
            self.calls += 1
            call = self.calls
        if call in self.fail_at:
            raise ClientAuthenticationError(
                "ManagedIdentityCredential authentication unavailable, no response from the "
                "IMDS endpoint."
            )
        return AccessToken(f"token-{call}", int(time.time()) + 60)


def aml_backend(
    service: AmlService, credential: Any | None = None, clock: FakeClock | None = None
) -> tuple[AmlBackend, RecordingAdapter]:
    adapter = RecordingAdapter(service)
    session = requests.Session()
    session.mount("https://", adapter)
    transport = RequestsTransport(session=session, session_owner=False)
    client = MLClient(
        credential or RefreshingToken(), SUBSCRIPTION, "rg", "ws", transport=transport
    )
    clock = clock or FakeClock()
    aml = aml_settings()
    gateway = AmlV2Gateway(client, aml, sleep=clock.sleep, clock=clock)
    return AmlBackend(gateway, STORAGE, aml), adapter


def the_plan(nodes: int = 4) -> RunPlan:
    from batchctl.planning import PlanInputs

    return plan_run(RUN_ID, PlanInputs(items=1000, sec_per_item=20, max_nodes=nodes))


def submitted(
    service: AmlService, status: str, nodes: int = 4
) -> tuple[AmlBackend, RecordingAdapter, RunPlan]:
    backend, adapter = aml_backend(service)
    plan = the_plan(nodes)
    jobs = backend.submit_jobs(RUN_ID, plan, RunOptions())
    for job in jobs:
        service.set_status(job.name, status)
    cluster = plan.clusters[0].name
    service.computes = [
        {**capacity_facts(), "name": cluster, "id": f"{WORKSPACE_ID}/computes/{cluster}"},
        # Someone else's cluster in the workspace with its own troubles: not the run's.
        {**capacity_facts(), "name": "other", "tags": {TAG_RUN_ID: "run-other"}},
    ]
    return backend, adapter, plan


def test_capacity_that_never_arrives_is_read_from_the_clusters_errors() -> None:
    service = AmlService()
    backend, adapter, _plan = submitted(service, "Queued")
    before = len(adapter.log)

    view = backend.observe(RUN_ID)

    assert {job.state.value for job in view.jobs} == {"queued"}
    assert view.note is not None
    assert view.note.startswith(f"no low-priority capacity for {VM_SIZE} in eastus")
    assert "sufficient capacity" in view.note and view.note.count("AllocationFailed") == 1
    # Flat: one page of jobs, one of computes (and not one more with a thousand nodes).
    sent = adapter.log[before:]
    assert len(listing_requests(sent)) == 1
    assert sum(urlsplit(url).path.endswith("/computes") for _, url in sent) == 1
    assert len(sent) == 2
    # Once a node runs, the clusters are not read at all.
    service.set_status(view.jobs[0].name, "Running")
    before = len(adapter.log)
    assert backend.observe(RUN_ID).note is None
    assert len(adapter.log) - before == 1


def test_an_image_pull_failure_reaches_the_poll_in_amls_words() -> None:
    service = AmlService()
    backend, adapter, _plan = submitted(service, "Failed")
    for name in list(service.jobs):
        service.errors[name] = PULL_FAILED

    view = backend.observe(RUN_ID)

    assert view.start_failure
    assert view.job_error is not None and PULL_FAILED[1] in view.job_error
    assert view.job_error.startswith(f"job {RUN_ID}-")
    # At most two run-details reads a poll, however many jobs failed.
    details = [url for _, url in adapter.log if urlsplit(url).path.endswith("/details")]
    assert all(url.startswith(f"{HISTORY}/history/v1.0/subscriptions/") for url in details)
    assert len(details) == 1  # the first said it all


def test_a_failed_job_without_run_details_is_still_a_failed_job() -> None:
    service = AmlService()
    backend, _, _ = submitted(service, "Failed")  # run history answers 404: no words

    view = backend.observe(RUN_ID)

    assert view.job_error is None and not view.start_failure
    assert {job.state.value for job in view.jobs} == {"failed"}


def test_a_failed_token_refresh_leaves_one_poll_unknown_and_says_so() -> None:
    service = AmlService()
    credential = RefreshingToken()
    backend, _adapter = aml_backend(service, credential)
    plan = the_plan()
    backend.submit_jobs(RUN_ID, plan, RunOptions())
    credential.fail_at = {credential.calls + 1}

    view = backend.observe(RUN_ID)

    assert view.jobs == []
    assert view.note is not None and "signing in to Azure failed" in view.note
    assert "IMDS" in view.note
    # The next poll signs in again, with a new token.
    assert len(backend.observe(RUN_ID).jobs) == 4
    tokens = {auth for auth in service.authorizations if auth}
    assert len(tokens) >= 3


# == whole runs: the orchestrator replayed by the Durable SDK, the backend over the wire ==========


class WholeRun:
    """Activities for a replayed run whose compute is the AML backend on ``service``:
    provisioning submits the plan's jobs, a poll observes them, teardown cancels them; the
    ledger's counts come from ``done(poll)``; the rest is the shared script."""

    def __init__(
        self,
        service: AmlService,
        *,
        done: Callable[[int], int],
        total: int = 100,
        on_poll: Callable[[int], None] | None = None,
        credential: Any | None = None,
    ) -> None:
        self.service = service
        self.backend, self.adapter = aml_backend(service, credential)
        self.total = total
        self.done = done
        self.on_poll = on_poll
        self.polls = 0
        self.script = ReplayActivities(finishing_after(1000, total))
        self.plan = the_plan()
        self.submits = 0
        self.moves: list[int] = []  # the poll after which each fallback move ran
        self.poll_inputs: list[Any] = []
        self.reported: RunState | None = None

    def __call__(self, name: str, payload: Any) -> ActivityOutcome:
        try:
            return ActivityOutcome(self._answer(name, payload))
        except Exception as error:
            return ActivityOutcome(error=f"{name} failed: {error}")

    def _answer(self, name: str, payload: Any) -> Any:
        if name == Activity.PLAN_RUN:
            return self.plan.model_dump(mode="json")
        if name in (Activity.PROVISION_COMPUTE, Activity.SUBMIT_JOBS):
            self.submits += 1
            state = RunState.model_validate(payload)
            assert state.plan is not None
            if name == Activity.PROVISION_COMPUTE:
                self.backend.ensure_clusters(RUN_ID, state.plan)
            self.backend.submit_jobs(RUN_ID, state.plan, state.request.options)
            return None
        if name == Activity.MOVE_FLEET:
            self.moves.append(self.polls)
            task = FleetMoveTask.model_validate(payload)
            return move_fleet(self.backend, task).model_dump(mode="json")
        if name == Activity.GET_PROGRESS:
            self.polls += 1
            self.poll_inputs.append(payload)
            if self.on_poll is not None:
                self.on_poll(self.polls)
            done = min(self.done(self.polls), self.total)
            clusters = payload["clusters"] if isinstance(payload, dict) else None
            return progress_snapshot(
                RUN_ID,
                succeeded=done,
                failed=0,
                skipped=0,
                queued_messages=self.total - done,
                fleet=self.backend.observe(RUN_ID, clusters),
            ).model_dump(mode="json")
        if name == Activity.WRITE_REPORT:
            self.reported = RunState.model_validate(payload["state"])
        if name == Activity.TEARDOWN:
            self.backend.cancel_jobs(RUN_ID)
            return None
        outcome = self.script(name, payload)
        if outcome.error is not None:
            raise RuntimeError(outcome.error)
        return outcome.result

    def statuses(self, run: ReplayRun) -> list[str]:
        return [s["message"] for s in run.statuses if s and s.get("phase") == "running"]


def replayed(
    schema: int, whole: WholeRun, minutes_per_poll: float = 2, **options: Any
) -> ReplayRun:
    driver = ReplayDriver(
        run_orchestrator,
        whole,
        schema=schema,
        timer_step=timedelta(minutes=minutes_per_poll),
        max_episodes=5000,
    )
    request = RunRequest(
        run_id=RUN_ID,
        manifest="manifests/m.csv",
        options=RunOptions(poll_interval_s=minutes_per_poll * 60, **options),
    )
    return driver.run(RunState(run_id=RUN_ID, request=request).model_dump(mode="json"))


def assert_ended_failed_with(run: ReplayRun, whole: WholeRun, reason: str) -> None:
    report = run.output
    assert report["phase"] == "failed", report
    assert reason in report["message"], report["message"]
    final = run.statuses[-1]
    assert final["phase"] == "failed" and reason in final["message"]
    # The run ended the usual way: teardown, the items recorded not run, the report.
    assert run.activity_calls.count(Activity.TEARDOWN) == 1
    assert Activity.RECORD_UNFINISHED in run.activity_calls
    assert run.activity_calls[-1] == Activity.WRITE_REPORT
    assert sorted(whole.service.cancels) == sorted(
        name
        for name, body in whole.service.jobs.items()
        if body["properties"]["status"] == "Canceled"
    )


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_run_whose_nodes_never_come_stops_after_the_default_wait_saying_why(
    schema: int,
) -> None:
    service = AmlService()
    whole = WholeRun(service, done=lambda _: 0)

    def no_capacity(poll: int) -> None:
        if poll == 1:
            cluster = whole.plan.clusters[0].name
            service.computes = [{**capacity_facts(), "name": cluster}]

    whole.on_poll = no_capacity

    run = replayed(schema, whole)

    reason = f"0 of 4 nodes after 30 min: no low-priority capacity for {VM_SIZE} in eastus"
    assert_ended_failed_with(run, whole, reason)
    assert "--fallback stop@30m" in run.output["message"]
    assert whole.submits == 1  # provisioned once; a queued fleet is never resubmitted
    assert sorted(service.cancels) == sorted(service.jobs)  # every queued job cancelled
    running = whole.statuses(run)
    assert any("0 of 4 nodes after 10 min: no low-priority capacity" in s for s in running)


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_run_on_an_image_that_cannot_be_pulled_stops_at_its_first_failure(
    schema: int,
) -> None:
    service = AmlService()
    whole = WholeRun(service, done=lambda _: 0)

    def pull_fails(poll: int) -> None:
        if poll == 2:  # the nodes came, and could not pull the image
            for name in service.jobs:
                service.set_status(name, "Failed")
                service.errors[name] = PULL_FAILED

    whole.on_poll = pull_fails

    run = replayed(schema, whole)

    assert_ended_failed_with(run, whole, "the nodes cannot start the run's image: job ")
    assert PULL_FAILED[1] in run.output["message"]
    assert whole.polls == 2 and whole.submits == 1  # no resubmit of a broken image


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_throttled_job_listing_is_said_in_the_status_and_the_run_completes(
    schema: int,
) -> None:
    service = AmlService()
    whole = WholeRun(service, done=lambda poll: 20 * poll)

    def throttle(poll: int) -> None:
        if poll == 1:
            for name in service.jobs:
                service.set_status(name, "Running")
        if poll == 2:  # ARM's read budget is spent for longer than a poll waits
            service.refuse_listings(1000, retry_after="10")
        if poll == 3:
            service.refuse_listings(0, retry_after="0")

    whole.on_poll = throttle

    run = replayed(schema, whole)

    assert run.output["phase"] == "completed", run.output
    unknown = [s for s in whole.statuses(run) if "job states unknown this poll" in s]
    assert unknown and all("429" in s for s in unknown)
    assert whole.submits == 1  # an unknown poll resubmits nothing


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_token_refreshed_mid_run_and_one_refresh_that_failed_end_in_a_completed_run(
    schema: int,
) -> None:
    service = AmlService()
    credential = RefreshingToken()
    whole = WholeRun(service, done=lambda poll: 25 * poll, credential=credential)

    def refresh(poll: int) -> None:
        if poll == 1:
            for name in service.jobs:
                service.set_status(name, "Running")
        if poll == 2:
            credential.fail_at = {credential.calls + 1}

    whole.on_poll = refresh

    run = replayed(schema, whole)

    assert run.output["phase"] == "completed", run.output
    assert any("signing in to Azure failed" in s for s in whole.statuses(run))
    # A new token before every request of every poll: refreshed mid-run, many times.
    assert credential.calls > whole.polls
    assert len({auth for auth in service.authorizations if auth}) > whole.polls
    assert json.dumps(run.output)  # the report is plain JSON


# == the same explanations on SDK v1 ==============================================================


def test_v1_reads_the_clusters_errors_and_a_failed_runs_error_from_its_listings() -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from azureml.core.compute.amlcompute import AmlComputeStatus

    from batchctl.compute.aml.gateway_v1 import _compute_status
    from tests.test_compute_aml import aml_v1_backend

    backend, workspace = aml_v1_backend()
    plan = the_plan()
    backend.ensure_clusters(RUN_ID, plan)
    backend.submit_jobs(RUN_ID, plan, RunOptions())
    name = plan.clusters[0].name
    # The status a listed v1 AmlCompute holds, deserialized by azureml-core from ARM's JSON.
    status = AmlComputeStatus.deserialize(capacity_facts()["properties"])
    record = workspace.computes[name]
    workspace.computes[name] = replace(
        record, location="eastus", status=_compute_status(SimpleNamespace(status=status))
    )

    view = backend.observe(RUN_ID)

    assert view.note is not None
    assert view.note.startswith(f"no low-priority capacity for {VM_SIZE} in eastus")
    # A run that failed: its RunDto's error, from the listing (no request of its own).
    first = next(iter(workspace.runs))
    workspace.runs[first] = replace(
        workspace.runs[first],
        status="Failed",
        error={"error": {"code": PULL_FAILED[0], "message": PULL_FAILED[1]}},
    )
    view = backend.observe(RUN_ID)
    assert view.start_failure and view.job_error == f"job {first} failed: {': '.join(PULL_FAILED)}"


# == a move to dedicated nodes, whole runs ========================================================


def no_low_priority_capacity(whole: WholeRun) -> Callable[[int], None]:
    """The first fleet's cluster says AllocationFailed; a moved fleet's nodes come at the
    next poll after the move, and its jobs run."""

    def on_poll(poll: int) -> None:
        first = whole.plan.clusters[0].name
        whole.service.allocation[first] = {
            "errors": [{"error": {"code": NO_CAPACITY[0], "message": NO_CAPACITY[1]}}]
        }
        if whole.moves:
            for name, body in whole.service.jobs.items():
                tags = body["properties"]["tags"]
                if (
                    tags.get("batchctl-cluster") != first
                    and body["properties"]["status"] != "Canceled"
                ):
                    whole.service.set_status(name, "Running")

    return on_poll


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_run_moves_to_dedicated_nodes_within_its_cap_and_completes(schema: int) -> None:
    service = AmlService()
    whole = WholeRun(
        service, done=lambda poll: 0 if not whole.moves else 40 * (poll - whole.moves[0])
    )
    whole.on_poll = no_low_priority_capacity(whole)

    run = replayed(schema, whole, fallback="dedicated:500")

    assert run.output["phase"] == "completed", run.output
    assert len(whole.moves) == 1
    # The move happened at the first poll 30 min after the first, with the reason said.
    statuses = whole.statuses(run)
    moving = [s for s in statuses if "moving the fleet to dedicated" in s]
    assert moving and moving[0].startswith(
        f"0 of 4 nodes after 30 min: no low-priority capacity for {VM_SIZE} in eastus"
    )
    # New clusters, dedicated, named after the first fleet's; the waiting jobs cancelled.
    first = whole.plan.clusters[0].name
    moved = [name for name in service.created if name != first]
    assert moved and all(
        service.created[name]["properties"]["properties"]["vmPriority"] == "Dedicated"
        for name in moved
    )
    first_jobs = [
        name
        for name, body in service.jobs.items()
        if body["properties"]["tags"]["batchctl-cluster"] == first
    ]
    assert sorted(service.cancels[: len(first_jobs)]) == sorted(first_jobs)
    # Polls after the move ask for the new fleet's clusters; the report's plan is it.
    assert whole.poll_inputs[0] == RUN_ID
    assert whole.poll_inputs[-1] == {"run_id": RUN_ID, "clusters": moved}
    assert whole.reported is not None and whole.reported.plan is not None
    assert [c.name for c in whole.reported.plan.clusters] == moved
    assert not any(c.low_priority for c in whole.reported.plan.clusters)
    assert any("whose nodes did not come" in note for note in whole.reported.plan.notes)


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
@pytest.mark.parametrize("when", ["during the move", "after the move"])
def test_a_cancel_after_a_move_tears_down_and_reports_the_fleet_that_ran(
    schema: int, when: str
) -> None:
    service = AmlService()
    whole = WholeRun(service, done=lambda _: 0)
    whole.on_poll = no_low_priority_capacity(whole)

    def cancel_now(pending: list[str], generation: int) -> bool:
        if when == "during the move":
            return Activity.MOVE_FLEET in pending
        return bool(whole.moves) and not pending  # waiting on the poll timer, moved

    driver = ReplayDriver(
        run_orchestrator,
        whole,
        schema=schema,
        timer_step=timedelta(minutes=2),
        max_episodes=5000,
        raise_event_when=(cancel_now, CANCEL_EVENT),
    )
    request = RunRequest(
        run_id=RUN_ID,
        manifest="manifests/m.csv",
        options=RunOptions(poll_interval_s=120, fallback="dedicated:500"),
    )
    run = driver.run(RunState(run_id=RUN_ID, request=request).model_dump(mode="json"))

    assert run.output["phase"] == "cancelled", run.output
    assert len(whole.moves) == 1
    first = whole.plan.clusters[0].name
    moved = [name for name in service.created if name != first]
    assert moved
    # The report names the fleet the run moved to, not the one it left.
    assert whole.reported is not None and whole.reported.plan is not None
    assert [c.name for c in whole.reported.plan.clusters] == moved
    assert whole.reported.fallbacks == 1


@pytest.mark.parametrize("schema", PRODUCTION_SCHEMAS)
def test_a_move_over_its_cost_cap_is_refused_and_the_run_stops_saying_so(schema: int) -> None:
    service = AmlService()
    whole = WholeRun(service, done=lambda _: 0)
    whole.on_poll = no_low_priority_capacity(whole)

    run = replayed(schema, whole, fallback="dedicated:0.01@10m")

    assert_ended_failed_with(run, whole, "over the --fallback cap of $0.01")
    assert f"not moving to dedicated {VM_SIZE}: its plan costs $" in run.output["message"]
    assert "no low-priority capacity" in run.output["message"]
    assert list(service.created) == [whole.plan.clusters[0].name]  # nothing new started


# == the call budget of a poll that explains ======================================================


@pytest.mark.parametrize("status", ["Queued", "Failed"])
def test_a_poll_that_explains_stays_flat_in_the_node_count(
    status: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per-poll requests, counted at the HTTP adapter, for a fleet of 10, 100 and 1,000
    nodes whose jobs all wait (the clusters' listing is read) or all failed with a pull
    error (run details are read): the pages of the job listing plus a constant."""
    from batchctl.compute.aml import NodeLaunch, job_name
    from batchctl.compute.aml.gateway import job_tags
    from tests.test_compute_aml_transport import JOBS_PAGE_SIZE
    from tests.test_compute_contract import CLIENT_ID, make_plan

    extra: dict[int, int] = {}
    for nodes in (10, 100, 1000):
        service = AmlService()
        backend, adapter = aml_backend(service)
        plan = make_plan(run_id=RUN_ID, nodes=nodes)
        launch = NodeLaunch.from_settings(
            STORAGE, RUN_ID, RunOptions(), identity_client_id=CLIENT_ID
        )
        AmlV2Gateway(ml_client_of(backend), aml_settings()).submit_job(
            plan.clusters[0], 0, 0, launch
        )
        template = service.put_bodies[0]
        for cluster in plan.clusters:
            service.computes.append(
                {**capacity_facts(), "name": cluster.name, "id": f"{WORKSPACE_ID}/c/{cluster.name}"}
            )
            for node in range(cluster.nodes):
                name = job_name(RUN_ID, cluster.name, 0, node=node)
                service.seed(template, name, job_tags(RUN_ID, cluster, node, 0), status)
                service.errors[name] = PULL_FAILED
        backend.observe(RUN_ID)  # the first poll also finds run history (workspace, discovery)
        before = len(adapter.log)

        view = backend.observe(RUN_ID)

        sent = adapter.log[before:]
        pages = len(listing_requests(sent))
        assert pages == -(-nodes // JOBS_PAGE_SIZE)
        extra[nodes] = len(sent) - pages
        assert len(view.jobs) == nodes
        if status == "Queued":
            assert view.note is not None and "no low-priority capacity" in view.note
        else:
            assert view.start_failure
    with capsys.disabled():
        print(f"\nrequests beyond the job pages, {status} fleet, by nodes: {extra}")
    assert extra == {10: 1, 100: 1, 1000: 1}


def ml_client_of(backend: AmlBackend) -> Any:
    return backend._gateway._ml  # type: ignore[attr-defined]


def test_submit_refuses_a_bad_fallback_in_one_line_with_the_rule(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchctl import cli
    from tests.test_cli_edges import assert_one_line_refusal, call

    for name in ("BATCHCTL_APP_URL", "BATCHCTL_FUNCTION_KEY", *cli.STORAGE_URL_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "m.csv").write_text("video\na.mp4\n")

    code, out, err = call(capsys, "submit", str(tmp_path / "m.csv"), "--fallback", "dedicated")

    assert_one_line_refusal(code, out, err, flag="--fallback", as_json=False)
    assert "say the most the dedicated fleet may cost, in USD, like 'dedicated:50'" in err
    assert "Value error" not in err


def test_an_aml_plan_states_its_fallback_and_a_local_one_does_not() -> None:
    from types import SimpleNamespace

    from batchctl.contracts import ManifestSummary
    from batchctl.controller.compute import plan_run as plan_for_run

    summary = ManifestSummary(
        run_id=RUN_ID, manifest="m.csv", rows=100, valid=100, invalid=0, chunk_count=1
    )
    request = RunRequest(
        run_id=RUN_ID, manifest="m.csv", options=RunOptions(fallback="dedicated:40@20m")
    )
    state = RunState(run_id=RUN_ID, request=request, summary=summary)
    backend, _ = aml_backend(AmlService())  # vmSizes and usages answered as ARM does

    plan = plan_for_run(SimpleNamespace(backend=backend), state)  # type: ignore[arg-type]

    assert plan.notes[-1] == fallback_plan_note(request.options)
    assert "at most $40" in plan.notes[-1]

    class Local:
        kind = "local"

        def plan(self, *args: Any, **kwargs: Any) -> RunPlan:
            return the_plan()

    local = plan_for_run(SimpleNamespace(backend=Local()), state)  # type: ignore[arg-type]
    assert local.notes == the_plan().notes
