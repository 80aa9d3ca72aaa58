"""The ComputeBackend protocol: what the controller asks of a fleet, in plain data.

A backend creates the clusters a RunPlan names, starts the jobs whose nodes run the node
worker (one job per node for the AML backends, see ``JobGranularity``), reports and cancels a
run's jobs, deletes the clusters a run created, lists
compute that runs created (for the sweeper) and reads the quota that bounds a plan. Every
argument and result is one of our contracts (``RunPlan``, ``RunOptions``, ``JobInfo``,
``JobState``) or a small frozen model defined here, so the orchestrator and its activities
never see an SDK type, and a backend can be swapped (aml, aml_v1, local) without touching
them. Every method is keyed by the run id and safe to retry: a Durable activity may run
twice.

Ownership is by tag, never by name: every cluster a backend creates carries
``TAG_RUN_ID = <run id>`` (and ``TAG_CREATED_BY``), and a backend deletes a cluster only
after reading that tag back. A name clash with compute that lacks the run's tag is an error,
never a reason to reuse or delete it.

The AML backends (``aml`` on azure-ai-ml, ``aml_v1`` on azureml-core) share their settings
(``AmlSettings``), the node launch environment (``NodeLaunch``) and the reading of quota
listings (``quota_from_listings``) from here; nothing in this module imports an Azure SDK.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchctl.contracts import ClusterPlan, JobInfo, JobState, RunOptions, RunPlan
from batchctl.planning import (
    DEFAULT_HEADROOM,
    DEFAULT_MAX_CLUSTERS,
    DEFAULT_SCALE_DOWN_S,
    DEFAULT_STARTUP_S,
    cluster_name,
    find_vm_size,
    inputs_from_options,
    plan_run,
)
from batchctl.settings import ENV_PREFIX, StorageAuth, StorageSettings

__all__ = [
    "TAG_ATTEMPT",
    "TAG_CLUSTER",
    "TAG_CLUSTER_NODES",
    "TAG_CREATED_BY",
    "TAG_NODE",
    "TAG_RUN_ID",
    "TASK_OPTIONS_ENV",
    "AmlSettings",
    "BackendKind",
    "ComputeBackend",
    "ComputeError",
    "ForeignComputeError",
    "JobGranularity",
    "JobInfo",
    "JobState",
    "NodeLaunch",
    "Quota",
    "TaggedCompute",
    "check_cluster_names",
    "fan_out",
    "get_aml_settings",
    "is_authorization_error",
    "job_granularity",
    "job_name",
    "map_aml_status",
    "node_slots",
    "plan_with_quota",
    "quota_from_listings",
    "run_tags",
    "tagged_run_id",
    "unknown_quota",
]

TAG_RUN_ID: Final = "batchctl-run-id"
"""The tag every cluster (and job) created for a run carries; its value is the run id."""

TAG_CREATED_BY: Final = "batchctl-created-by"
CREATED_BY: Final = "batchctl"

# Tags on every AML job besides the run tags: which node slot (cluster and node index) and
# which attempt on it the job is. SDK v1 finds a run's jobs by these tags alone (its run ids
# are the service's), and both backends report a job's cluster from them.
TAG_CLUSTER: Final = "batchctl-cluster"
TAG_NODE: Final = "batchctl-node"
TAG_ATTEMPT: Final = "batchctl-attempt"
TAG_CLUSTER_NODES: Final = "batchctl-cluster-nodes"
"""How many node slots the job's cluster had when the job was submitted."""

TASK_OPTIONS_ENV: Final = f"{ENV_PREFIX}TASK_OPTIONS"
"""The environment variable holding the run's RunOptions as JSON on every node."""

BackendKind = Literal["aml", "aml_v1", "local"]

JobGranularity = Literal["cluster", "node"]
"""What one job of a backend covers: every node of a cluster, or one node.

The AML backends run one single-node job per node (docs/aml-topology.md: a multi-node job
waits for all its nodes, and one preemption stops all of them); the local backend runs one
job per cluster whose processes are its nodes. A backend says which with a
``job_granularity`` attribute; one without it is read as ``"cluster"``.
"""


def job_granularity(backend: object) -> JobGranularity:
    """The backend's ``job_granularity`` (``"cluster"`` when it declares none)."""
    return "node" if getattr(backend, "job_granularity", "cluster") == "node" else "cluster"


def node_slots(plan: RunPlan) -> list[tuple[ClusterPlan, int]]:
    """Every node slot of the plan, (cluster, node index), cluster by cluster."""
    return [(cluster, node) for cluster in plan.clusters for node in range(cluster.nodes)]


_T = TypeVar("_T")
_R = TypeVar("_R")


def fan_out(work: Callable[[_T], _R], items: Iterable[_T], *, limit: int) -> list[_R]:
    """``work`` on every item at once (at most ``limit`` threads), results in item order.

    The first error is raised once every item has been tried, so one failed cluster does not
    leave the others' operations unstarted; a retried activity finds what did complete.
    """
    todo = list(items)
    if len(todo) <= 1:
        return [work(item) for item in todo]
    with ThreadPoolExecutor(max_workers=min(limit, len(todo))) as pool:
        futures = [pool.submit(work, item) for item in todo]
    errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]


class ComputeError(RuntimeError):
    """A compute operation failed in a way the caller should see (not a transient blip)."""


class ForeignComputeError(ComputeError):
    """A compute name the plan wants is taken by compute this run did not create."""


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


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaggedCompute(_Frozen):
    """Compute in the workspace that carries the run tag (or that ensure_clusters made)."""

    name: str = Field(min_length=1)
    run_id: str | None
    vm_size: str = ""
    low_priority: bool | None = None
    max_nodes: int | None = Field(default=None, ge=0)
    state: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


class Quota(_Frozen):
    """The regional quota that bounds a plan for one VM size and tier, in cores.

    ``limit_cores`` / ``used_cores`` are None when the backend could not find them; the
    planner then treats the quota as unknown (no cap) and says so in ``notes``.
    """

    vm_size: str
    low_priority: bool
    cores_per_vm: int = Field(ge=1)
    gpus_per_vm: int | None = None
    family: str = ""
    limit_cores: int | None = None
    used_cores: int | None = None
    price_per_hour: float | None = Field(default=None, ge=0)
    notes: list[str] = Field(default_factory=list)

    @property
    def available_cores(self) -> int | None:
        """Cores still free under the limit (never negative), or None when unknown."""
        if self.limit_cores is None:
            return None
        return max(self.limit_cores - (self.used_cores or 0), 0)

    @property
    def nodes_allowed(self) -> int | None:
        """Whole VMs that fit in the free cores, or None when unknown."""
        available = self.available_cores
        return None if available is None else available // self.cores_per_vm


class AmlSettings(BaseSettings):
    """Where the AML backends create compute and how they size it (``BATCHCTL_AML_*``).

    Required fields have no defaults, so a missing one fails when the backend is first
    built, naming the variable. No secret: the controller signs in with its managed identity
    (``DefaultAzureCredential``), and the nodes reach storage with the user-assigned identity
    named here.
    """

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}AML_", extra="ignore", frozen=True)

    subscription_id: str
    resource_group: str
    workspace_name: str
    node_image: str = Field(min_length=1, description="e.g. myacr.azurecr.io/batchctl-node:1")
    identity_resource_id: str | None = Field(
        default=None, description="ARM id of the user-assigned identity the clusters carry"
    )
    identity_client_id: str | None = Field(
        default=None, description="its client id, for DefaultAzureCredential on the nodes"
    )
    idle_time_before_scale_down_s: int = Field(default=int(DEFAULT_SCALE_DOWN_S), ge=0)
    experiment_name: str = "batchctl"
    wait: bool = Field(default=True, description="block until create/cancel/delete finish")
    # Long operations (cluster create/resize/delete, job cancel) run for every cluster at
    # once: all are started, then all are awaited, at most this many at a time, so an
    # activity takes about as long as the slowest cluster, not the sum of all of them.
    parallel_operations: int = Field(default=16, ge=1, le=64)
    # Sizing: what planning needs beyond the run's options.
    sec_per_item: float = Field(default=20.0, gt=0, description="one item on one node, measured")
    startup_s: float = Field(default=DEFAULT_STARTUP_S, ge=0)
    headroom: float = Field(default=DEFAULT_HEADROOM, ge=0, lt=1)
    max_clusters: int = Field(default=DEFAULT_MAX_CLUSTERS, ge=1, le=999)
    price_per_hour: float | None = Field(default=None, ge=0)


@functools.cache
def get_aml_settings() -> AmlSettings:
    """The AML settings from the environment (loaded on first use, never at import)."""
    return AmlSettings()  # fields come from the environment (BATCHCTL_AML_*)


class NodeLaunch(_Frozen):
    """What every node of a run is started with: where storage is, which run, how to work.

    Only locations and options: never a key. In Azure the nodes reach storage with the
    compute's managed identity (``identity_client_id`` selects a user-assigned one).
    """

    run_id: str
    storage_auth: StorageAuth = "managed_identity"
    blob_url: str
    queue_url: str
    table_url: str
    manifests_container: str = "manifests"
    media_container: str = "media"
    runs_container: str = "runs"
    outputs_container: str = "outputs"
    ledger_table: str = "ledger"
    options: RunOptions = Field(default_factory=RunOptions)
    identity_client_id: str | None = None
    command: tuple[str, ...] = ("python", "-m", "worker")
    timeout_s: int | None = Field(default=None, gt=0, description="hard limit on one job")

    @classmethod
    def from_settings(
        cls,
        settings: StorageSettings,
        run_id: str,
        options: RunOptions,
        *,
        identity_client_id: str | None = None,
        timeout_s: int | None = None,
    ) -> NodeLaunch:
        """The launch for a run from the controller's own storage settings."""
        return cls(
            run_id=run_id,
            storage_auth=settings.storage_auth,
            blob_url=settings.blob_url,
            queue_url=settings.queue_url,
            table_url=settings.table_url,
            manifests_container=settings.manifests_container,
            media_container=settings.media_container,
            runs_container=settings.runs_container,
            outputs_container=settings.outputs_container,
            ledger_table=settings.ledger_table,
            options=options,
            identity_client_id=identity_client_id,
            timeout_s=timeout_s,
        )

    def environment(self) -> dict[str, str]:
        """The environment variables a node's worker reads (WorkerSettings + options)."""
        env = {
            f"{ENV_PREFIX}STORAGE_AUTH": self.storage_auth,
            f"{ENV_PREFIX}BLOB_URL": self.blob_url,
            f"{ENV_PREFIX}QUEUE_URL": self.queue_url,
            f"{ENV_PREFIX}TABLE_URL": self.table_url,
            f"{ENV_PREFIX}MANIFESTS_CONTAINER": self.manifests_container,
            f"{ENV_PREFIX}MEDIA_CONTAINER": self.media_container,
            f"{ENV_PREFIX}RUNS_CONTAINER": self.runs_container,
            f"{ENV_PREFIX}OUTPUTS_CONTAINER": self.outputs_container,
            f"{ENV_PREFIX}LEDGER_TABLE": self.ledger_table,
            f"{ENV_PREFIX}RUN_ID": self.run_id,
            f"{ENV_PREFIX}IDLE_EXIT_S": str(self.options.idle_exit_s),
            TASK_OPTIONS_ENV: self.options.model_dump_json(),
        }
        if self.identity_client_id:
            # DefaultAzureCredential's ManagedIdentityCredential reads AZURE_CLIENT_ID to pick
            # the user-assigned identity when a node has more than one.
            env["AZURE_CLIENT_ID"] = self.identity_client_id
        return env


def run_tags(run_id: str) -> dict[str, str]:
    """The tags every cluster (and job) created for ``run_id`` carries."""
    return {TAG_RUN_ID: run_id, TAG_CREATED_BY: CREATED_BY}


def tagged_run_id(tags: object) -> str | None:
    """The run id in a tag mapping, or None when it is missing (or tags are not a mapping)."""
    if not isinstance(tags, Mapping):
        return None
    value = tags.get(TAG_RUN_ID)
    return value if isinstance(value, str) and value else None


def job_name(run_id: str, cluster: str, attempt: int = 0, *, node: int | None = None) -> str:
    """The deterministic name of a run's ``attempt``-th job on one cluster (or node slot).

    Deterministic so that a retried submit finds the job an earlier attempt created (and a
    second PUT of the same name cannot start a second job); the attempt number lets a run
    start a fresh job on a slot whose last job has ended. With ``node``, the name is that
    node slot's: ``{run}-{cluster}-n{node}-{attempt}``, which no cluster-wide name
    (``{run}-{cluster}-{attempt}``, digits only after the cluster) can equal.
    """
    if node is None:
        return f"{run_id}-{cluster}-{attempt}"
    if node < 0:
        raise ValueError("node index must be >= 0")
    return f"{run_id}-{cluster}-n{node}-{attempt}"


def check_cluster_names(plan: RunPlan) -> None:
    """Refuse a plan whose clusters are not named by ``planning.cluster_name``.

    The AML backends find a run's jobs from the run id alone (cluster 0, 1, ... until one
    has no job), which holds only for plans that ``planning.plan_run`` named.
    """
    expected = [cluster_name(plan.run_id, index) for index in range(len(plan.clusters))]
    if [cluster.name for cluster in plan.clusters] != expected:
        raise ValueError("AML plans must name their clusters with planning.cluster_name")


def plan_with_quota(
    run_id: str, work_units: int, options: RunOptions, quota: Quota | None, aml: AmlSettings
) -> RunPlan:
    """The plan for ``work_units`` queue messages under ``quota``, sized by planning.

    Each message holds ``options.mini_batch_size`` items, so it takes that many times
    ``aml.sec_per_item`` on one node. The price is the setting's, else the one AML lists for
    the region, else the indicative table's.
    """
    known = find_vm_size(options.vm_size)
    price = aml.price_per_hour
    if price is None and quota is not None:
        price = quota.price_per_hour
    inputs = inputs_from_options(
        work_units,
        aml.sec_per_item * options.mini_batch_size,
        options,
        startup_s=aml.startup_s,
        quota_cores=quota.available_cores if quota is not None else None,
        cores_per_vm=quota.cores_per_vm if quota is not None else (known.cores if known else 1),
        price_per_hour=price,
        headroom=aml.headroom,
        max_clusters=aml.max_clusters,
    )
    plan = plan_run(run_id, inputs)
    if quota is not None and quota.notes:
        plan = plan.model_copy(update={"notes": [*plan.notes, *quota.notes]})
    return plan


@runtime_checkable
class ComputeBackend(Protocol):
    """What the controller needs from a fleet. Every method is keyed by run and retry-safe.

    ``ensure_clusters`` and ``submit_jobs`` find what an earlier attempt created instead of
    creating it again; ``cancel_jobs`` and ``delete_clusters`` succeed on what is gone.
    """

    kind: BackendKind

    def plan(self, run_id: str, work_units: int, options: RunOptions) -> RunPlan:
        """The run's fleet for ``work_units`` queue messages under this backend's limits."""
        ...

    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota:
        """The quota for ``vm_size`` in the workspace's region for the given tier."""
        ...

    def ensure_clusters(self, run_id: str, plan: RunPlan) -> list[TaggedCompute]:
        """Create the plan's clusters that do not exist yet; return all of them.

        Raises ForeignComputeError when a planned name belongs to compute without this
        run's tag.
        """
        ...

    def submit_jobs(self, run_id: str, plan: RunPlan, options: RunOptions) -> list[JobInfo]:
        """Make sure every node of the plan is covered by an active job; return the jobs.

        A job covers one node or one cluster (``job_granularity``). A slot whose latest job
        is queued or running keeps it (a retried call submits nothing); a slot with no job,
        or whose latest job has ended, gets a new one, and no other slot is touched.
        """
        ...

    def job_states(self, run_id: str) -> list[JobInfo]:
        """The state of the latest job of each of the run's slots (nodes or clusters)."""
        ...

    def cancel_jobs(self, run_id: str) -> None:
        """Ask each of the run's jobs that is still active to stop."""
        ...

    def delete_clusters(self, run_id: str) -> list[str]:
        """Delete every cluster tagged with ``run_id`` (and nothing else); return their names."""
        ...

    def list_tagged(self) -> list[TaggedCompute]:
        """All compute carrying the run tag, for whichever run (the sweeper's view)."""
        ...


# --------------------------------------------------------------------------------------------
# When the quota cannot be read
# --------------------------------------------------------------------------------------------
#
# The usages and vmSizes listings are subscription-scope operations
# (Microsoft.MachineLearningServices/locations/usages/read and .../locations/vmsizes/read);
# every other role the controller holds is scoped to the workspace. infra/ grants the two
# read actions at subscription scope, but a deployment that skipped that role, or one whose
# role assignment has not propagated yet, gets 403 here. That must cost the plan its quota
# cap, not the run: the plan goes ahead uncapped and says so, and AML itself still refuses
# nodes beyond the quota (they stay queued).

_AUTHORIZATION_CODES: Final = frozenset(
    {"authorizationfailed", "linkedauthorizationfailed", "forbidden", "unauthorized"}
)
_V1_STATUS_WORDS: Final = ("response code: 401", "response code: 403")


def is_authorization_error(error: BaseException) -> bool:
    """Whether ``error`` says the caller may not read something (401/403), in either SDK.

    Duck-typed, so this module imports no SDK: azure-core's ``HttpResponseError`` carries
    ``status_code`` and ``error.code``; ``ClientAuthenticationError`` is a 401 by type name;
    azureml-core's ``ComputeTargetException`` only has its message ("Response Code: 403").
    """
    if type(error).__name__ == "ClientAuthenticationError":
        return True
    status = getattr(error, "status_code", None)
    if status is None:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return True
    code = getattr(getattr(error, "error", None), "code", None)
    if isinstance(code, str) and code.lower() in _AUTHORIZATION_CODES:
        return True
    return any(word in str(error).lower() for word in _V1_STATUS_WORDS)


def unknown_quota(vm_size: str, *, low_priority: bool, reason: str) -> Quota:
    """A Quota with no limit (the planner then applies none) that says why in its notes.

    Cores come from the known-size table so that the plan can still be priced and split;
    an unknown size counts as one core a VM, which only matters once a limit is known.
    """
    known = find_vm_size(vm_size)
    tier = "low-priority" if low_priority else "dedicated"
    notes = [
        f"quota unknown: {reason}; the plan is not capped by the {tier} quota "
        "(nodes beyond the real quota stay queued in AML)"
    ]
    if known is None:
        notes.append(f"cores of {vm_size} unknown: counted as 1 per VM")
    return Quota(
        vm_size=vm_size,
        low_priority=low_priority,
        cores_per_vm=known.cores if known else 1,
        gpus_per_vm=known.gpus if known else None,
        family=known.family if known else "",
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Reading AML quota listings (shared by the aml and aml_v1 backends; no SDK import)
# --------------------------------------------------------------------------------------------
#
# Both SDKs hand back the records of the same REST operations: ".../locations/{loc}/usages"
# and ".../locations/{loc}/vmSizes". Depending on the SDK and its version a record is a dict
# with the wire's camelCase keys, an object with snake_case attributes, or (azure-ai-ml 1.35:
# its Usage and VmSize entities copy ``as_dict()`` into ``__dict__``) an object with both, the
# snake_case ones left None. ``_field`` reads whichever is there.
#
# Usage records that matter (subscription level, per region), by ``type``:
#   .../vmFamily/usages          "Standard NCASv3_T4 Family Cluster Dedicated vCPUs" (limit)
#                                "Standard NCASv3_T4 Family Cluster LowPriority vCPUs" (-1:
#                                no per-family low-priority limit)
#   .../dedicatedCores/usages    "Total Cluster Dedicated Regional vCPUs"
#   .../lowPriorityCores/usages  "Total Cluster LowPriority Regional vCPUs"
# Workspace- and compute-level records (types with "/workspaces/") repeat subsets of these and
# are ignored.

_SUBSCRIPTION_USAGE_TYPES: Final = (
    "/vmfamily/usages",
    "/dedicatedcores/usages",
    "/lowprioritycores/usages",
)


def _field(record: object, *names: str) -> object:
    for name in names:
        if isinstance(record, Mapping):
            value = record.get(name)
        else:
            value = getattr(record, name, None)
            if value is None:
                value = getattr(record, "__dict__", {}).get(name)
        if value is not None:
            return value
    return None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _squash(text: str) -> str:
    """Lower-case letters and digits only: 'standardNCASv3_T4Family' ~ 'Standard NCASv3_T4 ...'."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _usage_name(record: object) -> str:
    name = _field(record, "name")
    if isinstance(name, str):
        return name
    value = _field(name, "value", "localized_value", "localizedValue") if name is not None else None
    return value if isinstance(value, str) else ""


def _vm_prices(record: object) -> tuple[float | None, float | None]:
    """Linux (dedicated, low-priority) USD prices per hour from a vmSizes record."""
    prices = _field(record, "estimated_vm_prices", "estimatedVMPrices")
    values = _field(prices, "values") if prices is not None else None
    dedicated = low_priority = None
    for entry in values if isinstance(values, list) else []:
        if str(_field(entry, "os_type", "osType") or "").lower() != "linux":
            continue
        price = _field(entry, "retail_price", "retailPrice")
        if not isinstance(price, int | float):
            continue
        tier = _squash(str(_field(entry, "vm_tier", "vmTier") or ""))
        if tier == "standard":
            dedicated = float(price)
        elif tier in {"lowpriority", "spot"}:
            low_priority = float(price)
    return dedicated, low_priority


def quota_from_listings(
    vm_size: str,
    *,
    low_priority: bool,
    sizes: Sequence[object],
    usages: Sequence[object],
) -> Quota:
    """The Quota for ``vm_size`` from the region's vmSizes and usages records.

    The size's cores, GPUs, family and price come from ``sizes``; when the region lists
    sizes but not this one, it is not offered there and ComputeError says so. With no size
    records at all (SDK v1 lists no family), the known-size table stands in. The free cores
    are the smallest headroom of the limits that apply: the family's limit and the regional
    dedicated total for dedicated nodes; the regional low-priority total (and a family limit
    if one is set) for low-priority nodes.
    """
    notes: list[str] = []
    wanted = vm_size.lower()
    record = next(
        (s for s in sizes if str(_field(s, "name") or "").lower() == wanted),
        None,
    )
    known = find_vm_size(vm_size)
    if record is not None:
        cores = _as_int(_field(record, "v_cp_us", "vCPUs", "vcpus"))
        gpus = _as_int(_field(record, "gpus"))
        family = str(_field(record, "family") or "") or (known.family if known else "")
        dedicated_price, low_priority_price = _vm_prices(record)
        capable = _field(record, "low_priority_capable", "lowPriorityCapable")
        if low_priority and capable is False:
            raise ComputeError(f"{vm_size} cannot run as low priority in this region")
    elif sizes and any(_field(s, "name") for s in sizes):
        raise ComputeError(f"{vm_size} is not offered for AML compute in this region")
    else:
        cores = gpus = None
        family = known.family if known else ""
        dedicated_price = low_priority_price = None
    if cores is None or cores < 1:
        if known is None:
            raise ComputeError(f"cannot tell how many cores {vm_size} has")
        cores, gpus = known.cores, gpus if gpus is not None else known.gpus
        notes.append(f"cores of {vm_size} taken from the known-size table")
    price = low_priority_price if low_priority else dedicated_price

    tier_word = "lowpriority" if low_priority else "dedicated"
    total_type = "/lowprioritycores/usages" if low_priority else "/dedicatedcores/usages"
    family_key = _squash(family)
    limits: list[tuple[int, int, str]] = []  # (limit, used, what)
    for usage in usages:
        usage_type = str(_field(usage, "type") or "").lower()
        if not usage_type.endswith(_SUBSCRIPTION_USAGE_TYPES):
            continue
        name = _usage_name(usage)
        limit = _as_int(_field(usage, "limit"))
        used = _as_int(_field(usage, "current_value", "currentValue")) or 0
        if limit is None or limit < 0:
            continue  # -1: no limit of its own at this level
        squashed = _squash(name)
        is_total = usage_type.endswith(total_type)
        is_family = (
            usage_type.endswith("/vmfamily/usages")
            and bool(family_key)
            and squashed.startswith(family_key)
            and tier_word in squashed
        )
        if is_total or is_family:
            limits.append((limit, used, name or usage_type))
    # The tightest record binds (least headroom); without any, the quota is unknown.
    binding = min(limits, key=lambda entry: entry[0] - entry[1]) if limits else None
    if binding is not None:
        notes.append(f"{binding[2]}: {binding[1]} of {binding[0]} cores in use")
    else:
        notes.append(f"no {tier_word} quota record found for {vm_size}: quota not applied")
    return Quota(
        vm_size=vm_size,
        low_priority=low_priority,
        cores_per_vm=cores,
        gpus_per_vm=gpus,
        family=family,
        limit_cores=binding[0] if binding else None,
        used_cores=binding[1] if binding else None,
        price_per_hour=price,
        notes=notes,
    )
