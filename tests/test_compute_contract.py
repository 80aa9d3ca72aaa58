"""One contract for every ComputeBackend: the same tests, run against each backend.

Each backend comes with a *harness*: the backend under test plus a handle on whatever
stands in for the cloud (a fake MLClient, a fake v1 gateway, or real local processes), so a
test can put foreign compute in the workspace and move a job to a given state. To add a
backend, write a factory that returns a ``Harness`` and append it to ``HARNESSES``:

    def local_harness(tmp_path: Path) -> Harness: ...
    HARNESSES.append(pytest.param(local_harness, id="local"))

A harness that cannot stage something (local compute has no foreign clusters) raises
``pytest.skip`` from that method; the rest of the contract still runs.

The stand-ins for the cloud (a fake MLClient whose operations keep real SDK entities, fake
SDK v1 workspace calls, and the REST API's example quota payloads) live here too, and
tests/test_compute_aml.py uses them. They import the Azure ML SDKs only when used, so this
module collects without the ``aml`` / ``aml-v1`` extras and their harnesses skip instead.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from batchctl.compute.aml.settings import AmlSettings
from batchctl.compute.base import (
    TAG_RUN_ID,
    ComputeBackend,
    ForeignComputeError,
    JobInfo,
    JobState,
    job_granularity,
)
from batchctl.contracts import RunOptions, RunPlan
from batchctl.planning import PlanInputs, plan_run
from batchctl.settings import StorageSettings

# == stand-ins for the cloud (shared with tests/test_compute_aml.py) ==============================

RUN_ID = "run-a"
IMAGE = "batchctlacr.azurecr.io/batchctl-node:1"
IDENTITY_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/batchctl-nodes"
)
CLIENT_ID = "11111111-2222-3333-4444-555555555555"

STORAGE = StorageSettings(
    storage_auth="managed_identity",
    blob_url="https://acct.blob.core.windows.net",
    queue_url="https://acct.queue.core.windows.net",
    table_url="https://acct.table.core.windows.net",
)


def aml_settings(**overrides: Any) -> AmlSettings:
    values: dict[str, Any] = {
        "subscription_id": "00000000-0000-0000-0000-000000000000",
        "resource_group": "rg",
        "workspace_name": "ws",
        "node_image": IMAGE,
        "identity_resource_id": IDENTITY_ID,
        "identity_client_id": CLIENT_ID,
    }
    values.update(overrides)
    return AmlSettings(**values)


def make_plan(run_id: str = RUN_ID, nodes: int = 250, low_priority: bool = True) -> RunPlan:
    return plan_run(
        run_id,
        PlanInputs(items=100_000, sec_per_item=20, max_nodes=nodes, low_priority=low_priority),
    )


# -- REST example payloads (Azure REST API specs, Microsoft.MachineLearningServices) ----------


def usage_records() -> list[dict[str, Any]]:
    """Regional usages as the service returns them (camelCase), trimmed to what matters."""

    def usage(type_: str, name: str, current: int, limit: int, scope: str = "") -> dict[str, Any]:
        return {
            "id": f"/subscriptions/0/{scope}usages/{name.replace(' ', '_')}",
            "type": f"Microsoft.MachineLearningServices/{type_}/usages",
            "currentValue": current,
            "limit": limit,
            "name": {"value": name, "localizedValue": name},
            "unit": "Count",
        }

    return [
        usage("totalCores", "Clusters", 7, 100),
        usage("dedicatedCores", "Total Cluster Dedicated Regional vCPUs", 14, 100),
        usage("vmFamily", "Standard NCASv3_T4 Family Cluster Dedicated vCPUs", 8, 48),
        usage("vmFamily", "Standard NC Family Cluster Dedicated vCPUs", 0, 24),
        usage("lowPriorityCores", "Total Cluster LowPriority Regional vCPUs", 18, 50),
        usage("vmFamily", "Standard NCASv3_T4 Family Cluster LowPriority vCPUs", 0, -1),
        # Workspace-level records repeat subsets and must not count twice.
        usage(
            "workspaces",
            "Standard NCASv3_T4 Family Cluster Dedicated vCPUs",
            48,
            48,
            scope="resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/w/",
        ),
    ]


def size_records() -> list[dict[str, Any]]:
    def size(
        name: str, family: str, cores: int, gpus: int, dedicated: float, low: float
    ) -> dict[str, Any]:
        return {
            "name": name,
            "family": family,
            "vCPUs": cores,
            "gpus": gpus,
            "memoryGB": 28.0,
            "lowPriorityCapable": True,
            "estimatedVMPrices": {
                "billingCurrency": "USD",
                "unitOfMeasure": "OneHour",
                "values": [
                    {"retailPrice": dedicated, "osType": "Linux", "vmTier": "Standard"},
                    {"retailPrice": low, "osType": "Linux", "vmTier": "LowPriority"},
                    {"retailPrice": dedicated * 2, "osType": "Windows", "vmTier": "Standard"},
                ],
            },
            "supportedComputeTypes": ["AmlCompute", "ComputeInstance"],
        }

    return [
        size("Standard_NC4as_T4_v3", "standardNCASv3_T4Family", 4, 1, 0.53, 0.11),
        size("Standard_NC6", "standardNCFamily", 6, 1, 0.90, 0.18),
        size("Standard_DS3_v2", "standardDSv2Family", 4, 0, 0.29, 0.06),
    ]


def sdk_usages() -> list[Any]:
    """Real azure-ai-ml Usage entities, parsed the way ComputeOperations.list_usage does."""
    from azure.ai.ml._restclient.arm_ml_service.models import Usage as RestUsage
    from azure.ai.ml.entities import Usage

    return [Usage._from_rest_object(RestUsage(record)) for record in usage_records()]


def sdk_sizes() -> list[Any]:
    """Real azure-ai-ml VmSize entities, parsed the way ComputeOperations.list_sizes does."""
    from azure.ai.ml._restclient.arm_ml_service.models import VirtualMachineSize
    from azure.ai.ml.entities import VmSize

    return [VmSize._from_rest_object(VirtualMachineSize(record)) for record in size_records()]


# -- a fake MLClient ------------------------------------------------------------------------------


class FakePoller:
    def __init__(self, result: Any = None) -> None:
        self._result = result

    def result(self) -> Any:
        return self._result


class FakeComputeOperations:
    """Keeps real AmlCompute entities by name; records what was asked of it."""

    def __init__(self) -> None:
        self.computes: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.stale_listing: dict[str, Any] | None = None  # what list() shows, if set

    def get(self, name: str) -> Any:
        self.calls.append(("get", name))
        if name not in self.computes:
            raise ResourceNotFoundError(f"compute {name} not found")
        return copy.deepcopy(self.computes[name])

    def list(self, *, compute_type: str | None = None) -> Iterable[Any]:
        self.calls.append(("list", compute_type or ""))
        shown = self.stale_listing if self.stale_listing is not None else self.computes
        return [copy.deepcopy(compute) for compute in shown.values()]

    def begin_create_or_update(self, compute: Any) -> FakePoller:
        self.calls.append(("create_or_update", compute.name))
        stored = copy.deepcopy(compute)
        stored._provisioning_state = "Succeeded"  # what the service reports once created
        self.computes[compute.name] = stored
        return FakePoller(copy.deepcopy(stored))

    def begin_delete(self, name: str, *, action: str = "Delete") -> FakePoller:
        self.calls.append(("delete", name))
        if name not in self.computes:
            raise ResourceNotFoundError(f"compute {name} not found")
        del self.computes[name]
        return FakePoller()

    def list_usage(self, *, location: str | None = None) -> Iterable[Any]:
        return sdk_usages()

    def list_sizes(
        self, *, location: str | None = None, compute_type: str | None = None
    ) -> Iterable[Any]:
        return sdk_sizes()

    def add_foreign(self, name: str, tags: Mapping[str, str] | None = None) -> None:
        """Compute this controller did not create (someone's cluster in the workspace)."""
        from azure.ai.ml.entities import AmlCompute

        self.computes[name] = AmlCompute(name=name, size="Standard_DS3_v2", tags=dict(tags or {}))

    def names(self) -> set[str]:
        return set(self.computes)


@dataclass
class StoredJob:
    job: Any  # the azure.ai.ml Command the backend submitted
    status: str = "Starting"

    def view(self) -> Any:
        # What jobs.get returns, reduced to the fields the backend reads.
        return SimpleNamespace(
            name=self.job.name,
            status=self.status,
            tags=dict(self.job.tags or {}),
            compute=self.job.compute,
        )


class FakeJobOperations:
    """Keeps the real Command entities it is given; statuses are set by the test.

    ``list`` answers as ARM's Jobs_List does through the SDK: an ``ItemPaged`` of pages
    (``page_size`` jobs each, newest first) of the jobs carrying the ``tag`` key, with
    ``throttle`` failures (429, Retry-After) raised by the listing's first requests.
    ``create_or_update`` refuses a name that exists, as ARM does.
    """

    def __init__(self, page_size: int = 100) -> None:
        self.jobs: dict[str, StoredJob] = {}
        self.calls: list[tuple[str, str]] = []
        self.page_size = page_size
        self.throttle = 0  # how many listing requests to refuse next
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        self.calls.append(("get", name))
        if name not in self.jobs:
            raise ResourceNotFoundError(f"job {name} not found")
        return self.jobs[name].view()

    def list(self, *, tag: str | None = None, **kwargs: Any) -> Any:
        from azure.core.paging import ItemPaged

        def get_next(token: str | None) -> tuple[int, list[Any], int]:
            with self._lock:
                self.calls.append(("list", token or ""))
                if self.throttle > 0:
                    self.throttle -= 1
                    raise throttled_error()
                listed = [
                    stored.view()
                    for stored in reversed(self.jobs.values())
                    if tag is None or tag in (stored.job.tags or {})
                ]
            start = int(token or 0)
            return start, listed[start : start + self.page_size], len(listed)

        def extract(page: tuple[int, list[Any], int]) -> tuple[str | None, Iterator[Any]]:
            start, jobs, total = page
            end = start + self.page_size
            return (str(end) if end < total else None), iter(jobs)

        return ItemPaged(get_next, extract)

    def create_or_update(self, job: Any) -> Any:
        from azure.ai.ml.entities import Command
        from azure.core.exceptions import HttpResponseError

        assert isinstance(job, Command)
        name = str(job.name)
        self.calls.append(("create_or_update", name))
        job._to_job()._to_rest_object()  # must serialize exactly as a real submit would
        with self._lock:
            if name in self.jobs:
                raise HttpResponseError(
                    message=f"(UserError) A job with this name already exists: {name}"
                )
            self.jobs[name] = StoredJob(job)
            return self.jobs[name].view()

    def begin_cancel(self, name: str) -> FakePoller:
        self.calls.append(("cancel", name))
        if name not in self.jobs:
            raise ResourceNotFoundError(f"job {name} not found")
        self.jobs[name].status = "Canceled"
        return FakePoller()

    def list_calls(self) -> int:
        return sum(1 for call, _ in self.calls if call == "list")


def throttled_error(retry_after: str = "2") -> Exception:
    """An ``HttpResponseError`` as azure-core raises it for ARM's 429 (status, Retry-After)."""
    from azure.core.exceptions import HttpResponseError

    response = SimpleNamespace(
        status_code=429, reason="Too Many Requests", headers={"Retry-After": retry_after}
    )
    error = HttpResponseError(message="(TooManyRequests) throttled")
    error.status_code = 429
    error.response = response
    return error


@dataclass
class FakeMLClient:
    compute: FakeComputeOperations = field(default_factory=FakeComputeOperations)
    jobs: FakeJobOperations = field(default_factory=FakeJobOperations)


@dataclass
class FakeV1Workspace:
    """SDK v1's workspace calls in memory: compute records, and runs whose status the test
    sets. Long operations complete at once; what they hand back to wait on says so."""

    computes: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)
    display_names: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    usages: list[Any] = field(default_factory=usage_records)
    sizes: list[Any] = field(default_factory=list)
    throttle: int = 0  # how many listings of runs to refuse next (429 with Retry-After)
    # Submits fan out on threads, as the backend makes them: the service numbers each run
    # once, and so must this stand-in (numbering from len(runs) gave two submits one id).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def get_compute(self, name: str) -> Any:
        self.calls.append(("get", name))
        return self.computes.get(name)

    def list_computes(self) -> list[Any]:
        return list(self.computes.values())

    def create_compute(self, name: str, config: Any) -> Callable[[], Any]:
        from batchctl.compute.aml.gateway_v1 import V1Compute

        self.calls.append(("create", name))
        record = V1Compute(
            name=name,
            vm_size=config.vm_size,
            vm_priority=config.vm_priority,
            max_nodes=config.scale_settings.maximum_node_count,
            state="Succeeded",
            tags=dict(config.tags),
        )
        self.computes[name] = record
        return lambda: record

    def update_max_nodes(self, name: str, max_nodes: int) -> Callable[[], Any]:
        self.calls.append(("update", name))
        self.computes[name] = replace(self.computes[name], max_nodes=max_nodes)
        return lambda: self.computes[name]

    def delete_compute(self, name: str) -> Callable[[], None] | None:
        self.calls.append(("delete", name))
        if self.computes.pop(name, None) is None:
            return None
        return lambda: None

    def find_runs(self, experiment: str, tags: Mapping[str, str]) -> list[Any]:
        with self._lock:
            self.calls.append(("find_runs", experiment))
            if self.throttle > 0:
                self.throttle -= 1
                raise throttled_error()
        return [
            run
            for run in reversed(self.runs.values())  # newest first, as the SDK lists them
            if all(run.tags.get(key) == value for key, value in tags.items())
        ]

    def submit(
        self, experiment: str, config: Any, tags: Mapping[str, str], *, display_name: str
    ) -> Any:
        from batchctl.compute.aml.gateway_v1 import V1Run

        with self._lock:
            run_id = f"batchctl_{next(self._numbers):04d}"
            self.calls.append(("submit", run_id))
            self.configs[run_id] = config
            self.display_names[run_id] = display_name
            self.runs[run_id] = V1Run(
                id=run_id, status="Starting", target=config.run_config.target, tags=dict(tags)
            )
            return self.runs[run_id]

    def cancel_run(self, run_id: str) -> None:
        self.calls.append(("cancel", run_id))
        self.runs[run_id] = replace(self.runs[run_id], status="Canceled")

    def set_status(self, run_id: str, status: str) -> None:
        self.runs[run_id] = replace(self.runs[run_id], status=status)

    def list_usages(self) -> list[Any]:
        return self.usages

    def list_vm_sizes(self) -> list[Any]:
        return self.sizes

    def add_foreign(self, name: str, tags: Mapping[str, str] | None = None) -> None:
        from batchctl.compute.aml.gateway_v1 import V1Compute

        self.computes[name] = V1Compute(name=name, vm_size="Standard_DS3_v2", tags=dict(tags or {}))

    def names(self) -> set[str]:
        return set(self.computes)


# == the contract ==================================================================================

RUN = "run-contract"
OTHER_RUN = "run-other"


@dataclass
class Harness:
    """A backend under test and the levers on its stand-in for the cloud."""

    backend: ComputeBackend
    add_foreign: Callable[[str, dict[str, str]], None]  # compute this controller did not make
    compute_names: Callable[[], set[str]]  # every compute in the workspace
    set_job_state: Callable[[JobInfo, JobState], None]  # move a job to one of our states
    close: Callable[[], None] = lambda: None  # release what the harness started


def contract_plan(run_id: str) -> RunPlan:
    # 250 nodes: three clusters of 84 + 83 + 83.
    return plan_run(run_id, PlanInputs(items=100_000, sec_per_item=20, max_nodes=250))


# -- harnesses -----------------------------------------------------------------------------------

# A backend-native status word for each of our states.
AML_STATUS = {
    JobState.QUEUED: "Queued",
    JobState.RUNNING: "Running",
    JobState.COMPLETED: "Completed",
    JobState.FAILED: "Failed",
    JobState.CANCELLED: "Canceled",
}


def aml_harness(tmp_path: Path) -> Harness:
    pytest.importorskip("azure.ai.ml", reason="the aml extra (azure-ai-ml) is not installed")
    from batchctl.compute.aml.gateway_v2 import v2_backend

    client = FakeMLClient()

    def set_state(job: JobInfo, state: JobState) -> None:
        client.jobs.jobs[job.name].status = AML_STATUS[state]

    return Harness(
        backend=v2_backend(client, STORAGE, aml_settings()),
        add_foreign=client.compute.add_foreign,
        compute_names=client.compute.names,
        set_job_state=set_state,
    )


def aml_v1_harness(tmp_path: Path) -> Harness:
    pytest.importorskip("azureml.core", reason="the aml-v1 extra (azureml-core) is not installed")
    from batchctl.compute.aml.gateway_v1 import v1_backend

    workspace = FakeV1Workspace()

    def set_state(job: JobInfo, state: JobState) -> None:
        workspace.set_status(job.name, AML_STATUS[state])

    return Harness(
        backend=v1_backend(workspace, STORAGE, aml_settings(), source_directory=str(tmp_path)),
        add_foreign=workspace.add_foreign,
        compute_names=workspace.names,
        set_job_state=set_state,
    )


# A stand-in node for the local backend: a tiny process that, like the real worker, exits
# cleanly (code 0) when asked to stop with SIGTERM.
LOCAL_NODE = ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]


def local_harness(tmp_path: Path) -> Harness:
    import signal

    from batchctl.compute.local import LocalBackend

    backend = LocalBackend(STORAGE, worker_command=LOCAL_NODE)

    def no_foreign(name: str, tags: dict[str, str]) -> None:
        pytest.skip("local compute has no clusters it did not create")

    def names() -> set[str]:
        return {c.name for c in backend.list_tagged()}

    def set_state(job: JobInfo, state: JobState) -> None:
        local_job = next(j for j in backend._jobs[RUN] if j.name == job.name)
        if state is JobState.QUEUED:
            pytest.skip("local nodes start at once; they are never queued")
        if state is JobState.CANCELLED:
            local_job.cancelled = True
        for process in local_job.processes:
            if state is JobState.FAILED:
                process.send_signal(signal.SIGKILL)
            elif state in (JobState.COMPLETED, JobState.CANCELLED):
                process.terminate()
        for process in local_job.processes:
            if state is not JobState.RUNNING:
                process.wait(timeout=10)

    def close() -> None:
        for run_id in (RUN, OTHER_RUN):
            backend.delete_clusters(run_id)

    return Harness(backend, no_foreign, names, set_state, close)


HARNESSES: list[Any] = [
    pytest.param(aml_harness, id="aml"),
    pytest.param(aml_v1_harness, id="aml_v1"),
    pytest.param(local_harness, id="local"),
]


@pytest.fixture(params=HARNESSES)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    factory: Callable[[Path], Harness] = request.param
    built = factory(tmp_path)
    yield built
    built.close()


# -- the contract ------------------------------------------------------------------------------


def test_is_a_compute_backend(harness: Harness) -> None:
    assert isinstance(harness.backend, ComputeBackend)
    assert harness.backend.kind in {"aml", "aml_v1", "local"}


def test_ensure_is_idempotent_and_tags_every_cluster(harness: Harness) -> None:
    plan = contract_plan(RUN)
    first = harness.backend.ensure_clusters(RUN, plan)
    names = harness.compute_names()
    second = harness.backend.ensure_clusters(RUN, plan)
    assert harness.compute_names() == names  # nothing new the second time
    assert sorted(c.name for c in first) == sorted(c.name for c in second)
    assert {c.name for c in second} == {c.name for c in plan.clusters}
    for cluster in second:
        assert cluster.run_id == RUN
        assert cluster.tags[TAG_RUN_ID] == RUN


def test_ensure_refuses_a_name_held_by_foreign_compute(harness: Harness) -> None:
    plan = contract_plan(RUN)
    taken = plan.clusters[0].name
    harness.add_foreign(taken, {"owner": "data-science"})
    with pytest.raises(ForeignComputeError):
        harness.backend.ensure_clusters(RUN, plan)
    assert taken in harness.compute_names()


def test_list_tagged_finds_the_runs_compute_only(harness: Harness) -> None:
    harness.add_foreign("untagged", {})
    harness.backend.ensure_clusters(RUN, contract_plan(RUN))
    tagged = harness.backend.list_tagged()
    mine = {c.name for c in tagged if c.run_id == RUN}
    assert mine == {c.name for c in contract_plan(RUN).clusters}
    assert "untagged" not in {c.name for c in tagged}


def test_delete_removes_only_this_runs_tagged_clusters(harness: Harness) -> None:
    harness.add_foreign("untagged", {})
    harness.add_foreign("lookalike", {"owner": "someone", "batchctl-created-by": "batchctl"})
    harness.backend.ensure_clusters(RUN, contract_plan(RUN))
    harness.backend.ensure_clusters(OTHER_RUN, contract_plan(OTHER_RUN))
    deleted = harness.backend.delete_clusters(RUN)
    assert set(deleted) == {c.name for c in contract_plan(RUN).clusters}
    left = harness.compute_names()
    assert {"untagged", "lookalike"} <= left
    assert {c.name for c in contract_plan(OTHER_RUN).clusters} <= left
    assert not left & set(deleted)
    assert harness.backend.delete_clusters(RUN) == []  # idempotent
    assert {c.run_id for c in harness.backend.list_tagged()} == {OTHER_RUN}


def jobs_per_cluster(backend: ComputeBackend, plan: RunPlan) -> dict[str, int]:
    """How many active jobs each cluster should have: one per node, or one for all of them.

    The AML backends run one single-node job per node (docs/aml-topology.md); the local
    backend one job per cluster whose processes are its nodes. A backend declares which
    (``job_granularity``; undeclared means per cluster).
    """
    node = job_granularity(backend) == "node"
    return {cluster.name: cluster.nodes if node else 1 for cluster in plan.clusters}


def test_submit_gives_each_slot_one_active_job_and_is_idempotent(harness: Harness) -> None:
    plan = contract_plan(RUN)
    harness.backend.ensure_clusters(RUN, plan)
    jobs = harness.backend.submit_jobs(RUN, plan, RunOptions())
    assert Counter(job.cluster for job in jobs) == jobs_per_cluster(harness.backend, plan)
    assert len({job.name for job in jobs}) == len(jobs)
    assert all(job.state.active for job in jobs)
    again = harness.backend.submit_jobs(RUN, plan, RunOptions())  # a retry: nothing new
    assert sorted(job.name for job in again) == sorted(job.name for job in jobs)
    states = harness.backend.job_states(RUN)
    assert sorted(job.name for job in states) == sorted(job.name for job in jobs)
    assert Counter(job.cluster for job in states) == jobs_per_cluster(harness.backend, plan)


def test_submit_restarts_only_the_slot_whose_job_ended(harness: Harness) -> None:
    # A preempted low-priority node: its job ends Failed; every other slot keeps its job.
    plan = contract_plan(RUN)
    harness.backend.ensure_clusters(RUN, plan)
    jobs = harness.backend.submit_jobs(RUN, plan, RunOptions())
    lost = jobs[len(jobs) // 2]
    harness.set_job_state(lost, JobState.FAILED)
    again = harness.backend.submit_jobs(RUN, plan, RunOptions())
    new = {job.name for job in again} - {job.name for job in jobs}
    assert len(new) == 1  # exactly one fresh job, in the lost job's cluster
    (replacement,) = [job for job in again if job.name in new]
    assert replacement.cluster == lost.cluster and replacement.state.active
    assert {job.name for job in again} == {job.name for job in jobs} - {lost.name} | new
    states = harness.backend.job_states(RUN)
    assert len(states) == len(jobs)
    assert Counter(job.cluster for job in states) == jobs_per_cluster(harness.backend, plan)
    assert all(job.state.active for job in states)


@pytest.mark.parametrize("state", list(JobState))
def test_job_states_map_to_our_enum(harness: Harness, state: JobState) -> None:
    plan = contract_plan(RUN)
    harness.backend.ensure_clusters(RUN, plan)
    jobs = harness.backend.submit_jobs(RUN, plan, RunOptions())
    harness.set_job_state(jobs[0], state)
    states = {job.name: job.state for job in harness.backend.job_states(RUN)}
    assert states[jobs[0].name] is state
    assert all(isinstance(value, JobState) for value in states.values())


def test_cancel_stops_active_jobs_and_leaves_finished_ones(harness: Harness) -> None:
    plan = contract_plan(RUN)
    harness.backend.ensure_clusters(RUN, plan)
    jobs = harness.backend.submit_jobs(RUN, plan, RunOptions())
    harness.set_job_state(jobs[0], JobState.COMPLETED)
    harness.backend.cancel_jobs(RUN)
    states = {job.name: job.state for job in harness.backend.job_states(RUN)}
    assert states[jobs[0].name] is JobState.COMPLETED
    assert all(states[job.name] is JobState.CANCELLED for job in jobs[1:])
    harness.backend.cancel_jobs(RUN)  # nothing active left: still fine


def test_a_run_with_nothing_is_empty(harness: Harness) -> None:
    assert harness.backend.job_states("run-never") == []
    harness.backend.cancel_jobs("run-never")
    assert harness.backend.delete_clusters("run-never") == []


def test_the_local_plan_gives_segments_every_node_the_session_has() -> None:
    """One long video with --segment-seconds is work for several local nodes: its segments
    spread over them, so the plan does not cap the nodes at the one item."""
    from batchctl.compute.local import LocalBackend
    from batchctl.contracts import MediaSummary

    backend = LocalBackend(STORAGE, worker_command=LOCAL_NODE, nodes=4)
    assert backend.plan(RUN, 1, RunOptions()).total_nodes == 1
    segmented = RunOptions(segment_seconds=60)
    assert backend.plan(RUN, 1, segmented).total_nodes == 4
    three = MediaSummary(
        items=1, pieces=3, media_s=150, longest_piece_s=60, longest_item_s=150, segment_s=60
    )
    assert backend.plan(RUN, 1, segmented, media=three).total_nodes == 3
    assert backend.plan(RUN, 1, segmented.model_copy(update={"max_nodes": 2})).total_nodes == 2


def test_running_jobs_count_the_plans_nodes(harness: Harness) -> None:
    """What the status shows as nodes working: every node slot of a running job, whether a
    backend runs a job per node (AML) or one job of N processes per cluster (local)."""
    from batchctl.contracts import JobCounts

    plan = contract_plan(RUN)
    harness.backend.ensure_clusters(RUN, plan)
    jobs = harness.backend.submit_jobs(RUN, plan, RunOptions())
    for job in jobs:
        harness.set_job_state(job, JobState.RUNNING)
    states = harness.backend.job_states(RUN)
    assert JobCounts.model_validate(states).nodes_running == plan.total_nodes
    # A job that ends takes its nodes out of the count.
    lost = next(job for job in states if job.name == jobs[0].name)
    harness.set_job_state(jobs[0], JobState.FAILED)
    after = JobCounts.model_validate(harness.backend.job_states(RUN))
    assert after.nodes_running == plan.total_nodes - lost.nodes and lost.nodes >= 1
