"""The seam between the one AML backend and an Azure ML SDK: a few primitive operations.

``AmlBackend`` (backend.py) owns every rule about what a run may touch: the run tag, the
refusal of foreign compute, idempotent ensure/submit/cancel/delete, one job per node slot
and its attempts, the fan-out. An ``AmlGateway`` only translates primitive operations to its
SDK (get, list, create, resize and delete a cluster; find, submit and cancel jobs; list the
region's usages and sizes) and hands back our plain records, so neither the rules nor their
tests depend on which SDK is underneath: ``gateway_v2`` speaks azure-ai-ml,
``gateway_v1`` azureml-core.

Nothing here imports an Azure SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar
from urllib.parse import quote

from batchctl.compute.aml.quota import refusal_status
from batchctl.compute.aml.settings import AmlSettings, NodeLaunch
from batchctl.compute.base import (
    BackendKind,
    ComputeError,
    DataAssetRequest,
    TaggedCompute,
    run_tags,
    tagged_run_id,
)
from batchctl.contracts import ClusterPlan, JobInfo, JobState
from batchctl.planning import MAX_NODES_PER_CLUSTER
from batchctl.settings import ENV_PREFIX

__all__ = [
    "TAG_ATTEMPT",
    "TAG_CLUSTER",
    "TAG_CLUSTER_NODES",
    "TAG_NODE",
    "TAG_RUN_KEY_PREFIX",
    "AccessDeniedError",
    "AmlGateway",
    "ClusterFacts",
    "DataAssetsUnsupportedError",
    "Finish",
    "JobRecord",
    "Slot",
    "check_cluster_size",
    "check_image",
    "check_launch",
    "cluster_facts",
    "done",
    "error_text",
    "is_start_failure",
    "job_display_name",
    "job_name",
    "job_tags",
    "latest_per_slot",
    "map_aml_status",
    "node_environment",
    "nodes_missing_reason",
    "refused_listing",
    "run_key_tag",
    "slot_record",
    "studio_job_url",
    "tag_int",
]

# Tags on every AML job besides the run tags: which node slot (cluster and node index) and
# which attempt on it the job is. Both gateways list a run's jobs by tag and read each job's
# slot and attempt from these (SDK v1's run ids are the service's, so names say nothing).
TAG_CLUSTER: Final = "batchctl-cluster"
TAG_NODE: Final = "batchctl-node"
TAG_ATTEMPT: Final = "batchctl-attempt"
TAG_CLUSTER_NODES: Final = "batchctl-cluster-nodes"
"""How many node slots the job's cluster had when the job was submitted."""
TAG_RUN_KEY_PREFIX: Final = "batchctl-run."
"""Prefix of a tag KEY that names the job's run (``run_key_tag``).

ARM's Jobs_List filters by tag key only ("Jobs returned will have this tag key"), so the
run tag (``batchctl-run-id=<run id>``) would list every batchctl job the workspace ever
ran. A key of the run's own lists that run's jobs alone, in a few pages whatever the
workspace's history. The dot cannot occur in a run id, so no run's key is another tag's.
"""

Slot = tuple[str, int]
"""One node slot of a run: (cluster name, node index)."""

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)


class Finish(Protocol[_T_co]):
    """Waits for a started long-running operation and returns its outcome.

    Gateways start every create, resize, delete or cancel first and hand this back, so the
    backend can start one per cluster (or job) before it waits on any of them.
    """

    def __call__(self) -> _T_co: ...


class AccessDeniedError(ComputeError):
    """The SDK was refused a read (HTTP 401/403): the caller lacks the role for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# AML job statuses (azure-ai-ml's JobStatus; SDK v1 run statuses are the same words) -> ours.
# CancelRequested and NotResponding are not final: the nodes are still held. Anything unknown
# counts as queued: still active, and doing no work that we know of.
_AML_STATUS: Final[dict[str, JobState]] = {
    "notstarted": JobState.QUEUED,
    "starting": JobState.QUEUED,
    "provisioning": JobState.QUEUED,
    "preparing": JobState.QUEUED,
    "queued": JobState.QUEUED,
    "paused": JobState.QUEUED,
    "unknown": JobState.QUEUED,
    "running": JobState.RUNNING,
    "finalizing": JobState.RUNNING,
    "cancelrequested": JobState.RUNNING,
    "notresponding": JobState.RUNNING,
    "completed": JobState.COMPLETED,
    "failed": JobState.FAILED,
    "canceled": JobState.CANCELLED,
    "cancelled": JobState.CANCELLED,
}


def map_aml_status(raw: str | None) -> JobState:
    """Our state for an AML job/run status word (case-insensitive; unknown -> queued)."""
    key = "".join(ch for ch in (raw or "").lower() if ch.isalpha())
    return _AML_STATUS.get(key, JobState.QUEUED)


@dataclass(frozen=True)
class JobRecord:
    """One AML job as a gateway reads it back: its name, node slot, attempt and status word.

    ``status`` is AML's own word ("Failed"), never an SDK enum's repr: read as a word that
    is no status (queued), an ended job would look active forever and never be restarted.
    """

    name: str
    cluster: str
    node: int
    attempt: int
    status: str

    @property
    def slot(self) -> Slot:
        return self.cluster, self.node

    @property
    def state(self) -> JobState:
        return map_aml_status(self.status)

    def info(self) -> JobInfo:
        """Our contract's view (``detail`` keeps AML's word)."""
        return JobInfo(name=self.name, cluster=self.cluster, state=self.state, detail=self.status)


def job_name(run_id: str, cluster: str, attempt: int, *, node: int) -> str:
    """The deterministic name of the ``attempt``-th job on node slot ``node`` of ``cluster``.

    Deterministic so that a retried submit finds the job an earlier attempt created (and a
    second PUT of the same name cannot start a second job); the attempt number lets a run
    start a fresh job on a slot whose last job has ended.
    """
    if node < 0:
        raise ValueError("node index must be >= 0")
    return f"{run_id}-{cluster}-n{node}-{attempt}"


def job_display_name(run_id: str, cluster: str, node: int, attempt: int) -> str:
    """What the AML studio lists a job as: the run, the node slot and the attempt (both SDKs)."""
    return f"batchctl {run_id} on {cluster} node {node} (attempt {attempt})"


def node_environment(launch: NodeLaunch, cluster: str, node: int, attempt: int) -> dict[str, str]:
    """The environment of the job on one node slot: the run's, and the worker's name.

    Each worker names itself after its job (``job_name``), so every record it writes says
    which slot and attempt did the item: the report finds the slot from it
    (batchctl/reporting/artifacts.py) and links the job's studio page.
    """
    name = job_name(launch.run_id, cluster, attempt, node=node)
    return {**launch.environment(), f"{ENV_PREFIX}NODE_NAME": name}


def studio_job_url(aml: AmlSettings, job: str) -> str:
    """The AML studio page of the job named ``job`` in the configured workspace."""
    workspace = (
        f"/subscriptions/{aml.subscription_id}/resourcegroups/{aml.resource_group}"
        f"/workspaces/{aml.workspace_name}"
    )
    return f"https://ml.azure.com/runs/{quote(job, safe='')}?wsid={quote(workspace, safe='/')}"


def run_key_tag(run_id: str) -> str:
    """The tag key that only ``run_id``'s jobs carry (what a listing by key asks for)."""
    return f"{TAG_RUN_KEY_PREFIX}{run_id}"


def job_tags(run_id: str, cluster: ClusterPlan, node: int, attempt: int) -> dict[str, str]:
    """The tags of the ``attempt``-th job on node slot ``node`` of ``cluster``."""
    return {
        **run_tags(run_id),
        run_key_tag(run_id): run_id,
        TAG_CLUSTER: cluster.name,
        TAG_NODE: str(node),
        TAG_ATTEMPT: str(attempt),
        TAG_CLUSTER_NODES: str(cluster.nodes),
    }


def tag_int(tags: Mapping[str, str], tag: str, *, default: int) -> int:
    """An integer tag, or ``default`` when it is missing or not a number."""
    value = tags.get(tag)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def slot_record(run_id: str, name: str, tags: Mapping[str, str], status: str) -> JobRecord | None:
    """Our record of a listed job of ``run_id``, its slot and attempt read from its tags.

    None for a job that is not one of the run's node-slot jobs (another run's, one without
    a cluster tag): a listing's filter is the service's, and ownership is checked here too.
    """
    cluster = tags.get(TAG_CLUSTER)
    if tagged_run_id(dict(tags)) != run_id or not cluster:
        return None
    return JobRecord(
        name=name,
        cluster=cluster,
        node=tag_int(tags, TAG_NODE, default=0),
        attempt=tag_int(tags, TAG_ATTEMPT, default=0),
        status=status,
    )


def latest_per_slot(
    records: Iterable[JobRecord], slots: Sequence[Slot] | None
) -> dict[Slot, JobRecord]:
    """The highest attempt of each slot among ``records`` (of ``slots`` only, when given).

    A listing may hold a job twice (pages read across a change); the highest attempt wins
    either way, so the answer does not depend on order or repeats.
    """
    latest: dict[Slot, JobRecord] = {}
    for record in records:
        known = latest.get(record.slot)
        if known is None or record.attempt > known.attempt:
            latest[record.slot] = record
    if slots is None:
        return latest
    return {slot: latest[slot] for slot in slots if slot in latest}


@dataclass(frozen=True)
class ClusterFacts:
    """What an AmlCompute cluster says about its nodes (ARM's AmlComputeProperties).

    ``errors`` are the cluster's own (code, message) pairs: AML reports there why a resize
    could not get nodes (no capacity for the size, quota reached).
    """

    name: str
    vm_size: str
    low_priority: bool | None
    location: str
    allocation_state: str
    current_nodes: int | None
    target_nodes: int | None
    errors: tuple[tuple[str, str], ...] = ()


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def error_text(error: object) -> tuple[str, str] | None:
    """(code, message) of an ARM ``ErrorResponse`` (``{"error": {...}}``) or ``ErrorDetail``.

    None when the value holds neither; a detail's inner details are left out (the first
    line of an AML error says what went wrong).
    """
    if not isinstance(error, Mapping):
        return None
    inner = error.get("error", error)
    if not isinstance(inner, Mapping):
        return None
    code, message = str(inner.get("code") or ""), str(inner.get("message") or "")
    return (code, message) if code or message else None


def cluster_facts(body: Mapping[str, object]) -> ClusterFacts:
    """Our facts from an ARM ``ComputeResource`` as JSON (``properties.properties`` holds
    AmlComputeProperties: allocationState, currentNodeCount, targetNodeCount, errors)."""
    outer = body.get("properties")
    outer = outer if isinstance(outer, Mapping) else {}
    inner = outer.get("properties")
    inner = inner if isinstance(inner, Mapping) else {}
    priority = str(inner.get("vmPriority") or "").replace("_", "").lower()
    raw_errors = inner.get("errors") or outer.get("provisioningErrors") or []
    errors = tuple(
        found
        for found in (
            error_text(item) for item in (raw_errors if isinstance(raw_errors, list) else [])
        )
        if found is not None
    )
    return ClusterFacts(
        name=str(body.get("name") or ""),
        vm_size=str(inner.get("vmSize") or ""),
        low_priority=(priority == "lowpriority") if priority else None,
        location=str(outer.get("computeLocation") or body.get("location") or ""),
        allocation_state=str(inner.get("allocationState") or ""),
        current_nodes=_as_int(inner.get("currentNodeCount")),
        target_nodes=_as_int(inner.get("targetNodeCount")),
        errors=errors,
    )


_MAX_ERROR_WORDS: Final = 300
_QUOTA_WORDS: Final = ("quota",)
_CAPACITY_WORDS: Final = ("capacity", "allocat", "skunotavailable", "overconstrained")


def _cut(text: str, limit: int = _MAX_ERROR_WORDS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cluster_reason(facts: ClusterFacts) -> str | None:
    """Why one cluster has no node, in words, from its own errors (None: it says nothing)."""
    if not facts.errors:
        return None
    code, message = facts.errors[0]
    words = f"{code} {message}".lower()
    tier = {True: "low-priority ", False: "dedicated ", None: ""}[facts.low_priority]
    where = f" in {facts.location}" if facts.location else ""
    said = _cut(f"{code}: {message}" if code else message)
    if any(word in words for word in _QUOTA_WORDS):
        return f"no {tier}quota left for {facts.vm_size}{where} ({said})"
    if any(word in words for word in _CAPACITY_WORDS):
        return f"no {tier}capacity for {facts.vm_size}{where} ({said})"
    return f"cluster {facts.name} cannot get nodes ({said})"


def nodes_missing_reason(clusters: Sequence[ClusterFacts]) -> str | None:
    """Why the run's clusters have no node, in words, from what they say (None: nothing).

    Clusters that say the same thing are said once; a cluster without errors that is still
    resizing says only that it allocates.
    """
    reasons: list[str] = []
    for facts in clusters:
        reason = _cluster_reason(facts)
        if reason is not None and reason not in reasons:
            reasons.append(reason)
    if reasons:
        return "; ".join(reasons)
    resizing = [facts.name for facts in clusters if facts.allocation_state.lower() == "resizing"]
    if resizing:
        return f"the clusters are allocating nodes ({len(resizing)} resizing, no error yet)"
    return None


# What a container runtime and AML say when a node cannot start the job's image: the image
# cannot be pulled (absent, no right to pull it), or its container will not start. A job that
# failed this way fails the same way on every node, so resubmitting it cannot help.
_START_FAILURE_WORDS: Final = (
    "imagepull",
    "image pull",
    "pull image",
    "pulling image",
    "failed to pull",
    "pull access denied",
    "manifest unknown",
    "not found: manifest",
    "errimagepull",
    "image not found",
    "unauthorized: authentication required",
    "failed to start container",
    "container failed to start",
    "oci runtime create failed",
    "exec format error",
    "executable file not found",
)


def is_start_failure(text: str) -> bool:
    """Whether an AML job's error text says the node could not start the image."""
    words = " ".join(text.lower().split())
    return any(word in words for word in _START_FAILURE_WORDS)


class AmlGateway(Protocol):
    """The primitive operations the AML backend needs of a workspace, in our records.

    Every method is one SDK operation or a few, and none decides anything about ownership:
    a gateway creates, resizes and deletes whatever the backend names, and the backend
    checks the run tag first. "Not found" is an answer (None, or a missing slot), never an
    error; anything else the SDK raises goes through, except a refused quota read, which is
    ``AccessDeniedError``.
    """

    kind: BackendKind

    def get_cluster(self, name: str) -> TaggedCompute | None:
        """The compute named ``name`` (whoever made it), or None."""
        ...

    def list_clusters(self) -> list[TaggedCompute]:
        """Every AmlCompute cluster in the workspace, tagged or not."""
        ...

    def begin_create_cluster(self, cluster: ClusterPlan, run_id: str) -> Finish[TaggedCompute]:
        """Start creating ``cluster`` tagged for ``run_id``."""
        ...

    def begin_resize_cluster(self, cluster: ClusterPlan, run_id: str) -> Finish[TaggedCompute]:
        """Start changing an existing cluster's node count to the plan's."""
        ...

    def begin_delete_cluster(self, name: str) -> Finish[None] | None:
        """Start deleting the compute ``name``; None when it is already gone."""
        ...

    def find_jobs(self, run_id: str, slots: Sequence[Slot] | None) -> dict[Slot, JobRecord]:
        """The latest job (highest attempt) of each node slot of the run that has one.

        With ``slots``, of those slots only; without, of every slot the run has used. One
        paged listing of the run's jobs, whatever the fleet's size; transient failures of
        it are waited out for a bounded time, then raise ``throttling.ThrottledError``.
        """
        ...

    def submit_job(
        self, cluster: ClusterPlan, node: int, attempt: int, launch: NodeLaunch
    ) -> JobRecord:
        """Submit the ``attempt``-th single-node job of node slot ``node`` of ``cluster``."""
        ...

    def begin_cancel_job(self, job: JobRecord) -> Finish[None] | None:
        """Start cancelling ``job``; None when it is already gone."""
        ...

    def list_cluster_facts(self, run_id: str) -> list[ClusterFacts]:
        """What each of the run's clusters says of its nodes: one listing of the workspace's
        computes (a page per hundred-odd clusters), not a read per cluster."""
        ...

    def job_error(self, job: JobRecord) -> str | None:
        """The error text AML gives for a failed job (None when it gives none)."""
        ...

    def list_sizes(self) -> Sequence[object]:
        """The region's vmSizes records (raises AccessDeniedError when refused)."""
        ...

    def list_usages(self) -> Sequence[object]:
        """The region's usages records (raises AccessDeniedError when refused)."""
        ...

    def register_data_asset(self, request: DataAssetRequest) -> str:
        """Register a new version of a data asset in the workspace; return the version.
        Raises ``DataAssetsUnsupportedError`` where the SDK cannot."""
        ...


class DataAssetsUnsupportedError(ComputeError):
    """This gateway's SDK cannot register a data asset (and says why)."""


def done(value: _T) -> Finish[_T]:
    """A Finish for an operation the SDK already completed when it returned."""
    return lambda: value


_L = TypeVar("_L")


def refused_listing(read: Callable[[], _L], sdk_errors: type[BaseException]) -> _L:
    """A subscription-scope listing; a refusal (401/403) among ``sdk_errors`` becomes
    AccessDeniedError, and anything else the SDK raises goes through as a real failure."""
    try:
        return read()
    except sdk_errors as error:
        status = refusal_status(error)
        if status is None:
            raise
        raise AccessDeniedError(status, str(error)) from error


# What both gateways' builders refuse before any SDK object is made (the same rule, whichever
# SDK is underneath, and before the network is touched).


def check_cluster_size(cluster: ClusterPlan) -> None:
    """An AML cluster holds at most MAX_NODES_PER_CLUSTER nodes."""
    if cluster.nodes > MAX_NODES_PER_CLUSTER:
        raise ValueError(f"a cluster holds at most {MAX_NODES_PER_CLUSTER} nodes")


def check_image(image: str) -> None:
    """Nodes run the prebuilt node image: without one there is nothing to run."""
    if not image:
        raise ValueError("the node image is required (e.g. myregistry.azurecr.io/batchctl-node:1)")


def check_launch(launch: NodeLaunch) -> None:
    """AML nodes reach storage with a managed identity; a key never leaves the controller."""
    if launch.storage_auth != "managed_identity":
        raise ComputeError("AML nodes reach storage with a managed identity, never with a key")
