"""Azure ML compute through azure-ai-ml (SDK v2): the default ComputeBackend.

What it creates for a run, one per planned cluster:

- an ``AmlCompute`` cluster of the planned VM size and tier (``low_priority`` or
  ``dedicated``), 0 to N nodes, ``idle_time_before_scale_down`` 120 s (SDK v1's 1,800 s
  default bills idle GPUs for half an hour), tagged with the run id, and carrying the
  user-assigned managed identity that the nodes use to reach storage;
- one single-node ``command`` job per node of it (``instance_count=1``; N jobs for a cluster
  of N nodes, see docs/aml-topology.md). A multi-node job starts only once all its nodes are
  allocated and one preempted node stops all of them; single-node jobs start as their own
  node comes and end alone. The job runs the prebuilt node image (an ``Environment`` on the
  registry image: nothing is built when the job starts) and ``python -m worker``; every
  setting arrives as an environment variable (storage URLs, run id, the run's options as
  JSON), never a key.

AML's ``pytorch`` distribution is used only as a launcher: it starts
``processes_per_node`` copies of the command on the job's node. The workers never talk to
each other; they share the run's queue.

Jobs are named ``{run id}-{cluster}-n{node}-{attempt}`` so that a retried submit finds the
job an earlier attempt created (a second PUT of a name cannot start a second job), and the
run's jobs can be found from the run id alone: node 0 of clusters 0, 1, ... (each carries its
cluster's node count in a tag), then that many node slots per cluster, then each slot's
attempts. Every lookup and submission is one GET or PUT per job, fanned out in a bounded pool.

The pure builders (``build_cluster``, ``build_environment``, ``build_job``) return real SDK
entities and touch no network, so tests assert their fields offline. ``AmlBackend`` takes
an ``MLClient`` (or anything with the same ``compute`` and ``jobs`` operations);
``create_aml_backend`` / ``backend_from_settings`` are the one place that builds a client,
from ``DefaultAzureCredential``.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Iterable
from typing import Any, Final, Protocol

from azure.ai.ml import MLClient, PyTorchDistribution, command
from azure.ai.ml.entities import (
    AmlCompute,
    Command,
    Environment,
    IdentityConfiguration,
    ManagedIdentityConfiguration,
)
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from batchctl.compute.base import (
    TAG_ATTEMPT,
    TAG_CLUSTER,
    TAG_CLUSTER_NODES,
    TAG_NODE,
    TAG_RUN_ID,
    AmlSettings,
    BackendKind,
    ComputeError,
    ForeignComputeError,
    JobGranularity,
    JobInfo,
    JobState,
    NodeLaunch,
    Quota,
    TaggedCompute,
    check_cluster_names,
    fan_out,
    get_aml_settings,
    is_authorization_error,
    job_name,
    map_aml_status,
    node_slots,
    plan_with_quota,
    quota_from_listings,
    run_tags,
    tagged_run_id,
    unknown_quota,
)
from batchctl.contracts import ClusterPlan, RunOptions, RunPlan
from batchctl.planning import MAX_NODES_PER_CLUSTER, cluster_name
from batchctl.settings import StorageSettings

# How far to look for a run's clusters and attempts; far beyond any real plan.
_MAX_CLUSTERS_PROBED: Final = 999
_MAX_ATTEMPTS_PROBED: Final = 100


def map_job_status(raw: str | None) -> JobState:
    """Our state for an AML job status (see base.map_aml_status)."""
    return map_aml_status(raw)


# --------------------------------------------------------------------------------------------
# Pure builders
# --------------------------------------------------------------------------------------------


def build_cluster(
    cluster: ClusterPlan,
    run_id: str,
    *,
    idle_time_before_scale_down_s: int = 120,
    identity_resource_id: str | None = None,
) -> AmlCompute:
    """The AmlCompute entity for one planned cluster (no network)."""
    if cluster.nodes > MAX_NODES_PER_CLUSTER:
        raise ValueError(f"a cluster holds at most {MAX_NODES_PER_CLUSTER} nodes")
    identity = None
    if identity_resource_id:
        # A user-assigned identity: its storage role assignments exist before any run, which
        # a per-cluster system-assigned identity could not have.
        identity = IdentityConfiguration(
            type="user_assigned",
            user_assigned_identities=[
                ManagedIdentityConfiguration(resource_id=identity_resource_id)
            ],
        )
    return AmlCompute(
        name=cluster.name,
        description=f"batchctl run {run_id}",
        size=cluster.vm_size,
        tier="low_priority" if cluster.low_priority else "dedicated",
        min_instances=0,
        max_instances=cluster.nodes,
        idle_time_before_scale_down=idle_time_before_scale_down_s,
        tags=run_tags(run_id),
        identity=identity,
    )


def build_environment(image: str) -> Environment:
    """An anonymous Environment on the prebuilt node image (no conda file, no build)."""
    if not image:
        raise ValueError("the node image is required (e.g. myregistry.azurecr.io/batchctl-node:1)")
    return Environment(image=image, description="batchctl node image")


def build_job(
    cluster: ClusterPlan,
    launch: NodeLaunch,
    *,
    image: str,
    node: int = 0,
    attempt: int = 0,
    experiment_name: str = "batchctl",
) -> Command:
    """The single-node command job for node slot ``node`` of ``cluster`` (no network)."""
    if launch.storage_auth != "managed_identity":
        raise ComputeError("AML nodes reach storage with a managed identity, never with a key")
    if not 0 <= node < cluster.nodes:
        raise ValueError(f"node {node} is not a slot of {cluster.name} ({cluster.nodes} nodes)")
    return command(
        name=job_name(launch.run_id, cluster.name, attempt, node=node),
        display_name=(
            f"batchctl {launch.run_id} on {cluster.name} node {node} (attempt {attempt})"
        ),
        experiment_name=experiment_name,
        command=shlex.join(launch.command),
        environment=build_environment(image),
        environment_variables=launch.environment(),
        compute=cluster.name,
        # One node: it starts when its own node is allocated and a preemption ends only it.
        instance_count=1,
        distribution=PyTorchDistribution(
            process_count_per_instance=launch.options.processes_per_node
        ),
        identity=(
            ManagedIdentityConfiguration(client_id=launch.identity_client_id)
            if launch.identity_client_id
            else None
        ),
        timeout=launch.timeout_s,
        tags={
            **run_tags(launch.run_id),
            TAG_CLUSTER: cluster.name,
            TAG_NODE: str(node),
            TAG_ATTEMPT: str(attempt),
            TAG_CLUSTER_NODES: str(cluster.nodes),
        },
    )


def describe_compute(compute: Any) -> TaggedCompute:
    """Our view of an SDK compute entity."""
    tier = str(getattr(compute, "tier", "") or "").replace("_", "").lower()
    tags = dict(getattr(compute, "tags", None) or {})
    max_nodes = getattr(compute, "max_instances", None)
    state = getattr(compute, "provisioning_state", "")
    return TaggedCompute(
        name=str(compute.name),
        run_id=tagged_run_id(tags),
        vm_size=str(getattr(compute, "size", "") or ""),
        low_priority=(tier == "lowpriority") if tier else None,
        max_nodes=max_nodes if isinstance(max_nodes, int) else None,
        # The SDK hands back its ProvisioningState enum after a round trip: keep the word.
        state=str(getattr(state, "value", state) or ""),
        tags={str(key): str(value) for key, value in tags.items()},
    )


def _tag_int(job: Any, tag: str, *, default: int) -> int:
    """An integer tag of an SDK job entity, or ``default`` when missing or not a number."""
    value = dict(getattr(job, "tags", None) or {}).get(tag)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def describe_job(job: Any, *, fallback_name: str = "") -> JobInfo:
    """Our view of an SDK job entity (``detail`` keeps AML's own status word)."""
    tags = dict(getattr(job, "tags", None) or {})
    compute = str(getattr(job, "compute", "") or "")
    status = getattr(job, "status", "")
    # After a round trip the SDK hands back its JobStatus enum, whose str() is
    # "JobStatus.FAILED": read as a word that is no status (queued), a failed job would look
    # active forever. Keep the word.
    raw = str(getattr(status, "value", status) or "")
    return JobInfo(
        name=str(getattr(job, "name", None) or fallback_name),
        # After a round trip the compute may be an ARM id; its last segment is the name.
        cluster=str(tags.get(TAG_CLUSTER) or compute.rsplit("/", 1)[-1]),
        state=map_job_status(raw),
        detail=raw,
    )


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class ComputeOperationsLike(Protocol):
    """The part of ``MLClient.compute`` this backend uses."""

    def get(self, name: str) -> Any: ...
    def list(self, *, compute_type: str | None = None) -> Iterable[Any]: ...
    def begin_create_or_update(self, compute: Any) -> Any: ...
    def begin_delete(self, name: str, *, action: str = "Delete") -> Any: ...
    def list_usage(self, *, location: str | None = None) -> Iterable[Any]: ...
    def list_sizes(
        self, *, location: str | None = None, compute_type: str | None = None
    ) -> Iterable[Any]: ...


class JobOperationsLike(Protocol):
    """The part of ``MLClient.jobs`` this backend uses."""

    def get(self, name: str) -> Any: ...
    def create_or_update(self, job: Any) -> Any: ...
    def begin_cancel(self, name: str) -> Any: ...


class MLClientLike(Protocol):
    """What AmlBackend needs of an MLClient: its compute and job operations."""

    @property
    def compute(self) -> ComputeOperationsLike: ...
    @property
    def jobs(self) -> JobOperationsLike: ...


class AmlBackend:
    """ComputeBackend on Azure ML clusters through azure-ai-ml (SDK v2): a job per node."""

    kind: BackendKind = "aml"
    job_granularity: JobGranularity = "node"

    def __init__(self, ml_client: MLClientLike, storage: StorageSettings, aml: AmlSettings) -> None:
        """``storage`` says where the nodes' queues and blobs are; ``aml`` the rest."""
        build_environment(aml.node_image)  # fail at construction, not at the first submit
        self._ml = ml_client
        self._storage = storage
        self._aml = aml
        # The highest attempt seen per node slot (keyed by its attempt-0 job name). Only a
        # head start for the next probe: jobs are never deleted, so an attempt once seen
        # still exists, and probing from it skips the GETs of the attempts before it. A
        # fresh process (or another host) without it probes from attempt 0, same answer.
        self._attempt_seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------------
    def _finish(self, poller: Any) -> Any:
        """Wait for a long-running operation when configured to (the default)."""
        return poller.result() if self._aml.wait and poller is not None else None

    def _get_compute(self, name: str) -> Any | None:
        try:
            return self._ml.compute.get(name)
        except ResourceNotFoundError:
            return None

    def _get_job(self, name: str) -> Any | None:
        try:
            return self._ml.jobs.get(name)
        except ResourceNotFoundError:
            return None

    def _latest_job(self, run_id: str, cluster: str, node: int) -> tuple[int, Any | None]:
        """A node slot's latest attempt number and job (-1, None when it has none).

        Attempts are made one after the other (a new one only once the last has ended), so
        the latest is the last one found before the first missing name.
        """
        slot = job_name(run_id, cluster, 0, node=node)
        with self._seen_lock:
            start = self._attempt_seen.get(slot, 0)
        latest: tuple[int, Any | None] = (-1, None)
        for attempt in range(start, _MAX_ATTEMPTS_PROBED):
            job = self._get_job(job_name(run_id, cluster, attempt, node=node))
            if job is None:
                break
            latest = (attempt, job)
        if latest[1] is None and start > 0:
            with self._seen_lock:
                self._attempt_seen.pop(slot, None)
            return self._latest_job(run_id, cluster, node)  # the hint was wrong: from 0
        self._remember(run_id, cluster, node, latest[0])
        return latest

    def _remember(self, run_id: str, cluster: str, node: int, attempt: int) -> None:
        if attempt > 0:
            slot = job_name(run_id, cluster, 0, node=node)
            with self._seen_lock:
                self._attempt_seen[slot] = max(attempt, self._attempt_seen.get(slot, 0))

    def _run_slots(self, run_id: str) -> list[tuple[str, int]]:
        """Every node slot of the run that has a job, (cluster, node), from the run id alone.

        submit_jobs creates node 0 of each cluster before anything of a later cluster, so
        the clusters are those whose node-0 job exists, up to the first that has none. Node
        0 carries its cluster's node count; slots past it (a plan that grew) are probed on
        until one has no job. Slots inside the count that never got a job (a submit that
        failed half-way) read as missing and are left out.
        """
        clusters: list[tuple[str, int]] = []
        for index in range(_MAX_CLUSTERS_PROBED):
            cluster = cluster_name(run_id, index)
            anchor = self._get_job(job_name(run_id, cluster, 0, node=0))
            if anchor is None:
                break
            nodes = _tag_int(anchor, TAG_CLUSTER_NODES, default=1)
            while nodes < MAX_NODES_PER_CLUSTER and self._get_job(
                job_name(run_id, cluster, 0, node=nodes)
            ):
                nodes += 1
            clusters.append((cluster, nodes))
        return [(cluster, node) for cluster, nodes in clusters for node in range(nodes)]

    def _aml_computes(self) -> list[Any]:
        return [
            compute
            for compute in self._ml.compute.list(compute_type="AmlCompute")
            if str(getattr(compute, "type", "amlcompute")).lower() == "amlcompute"
        ]

    # -- the protocol ------------------------------------------------------------------------
    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota:
        """Cores, price and free quota for ``vm_size`` in the workspace region.

        Both listings are subscription-scope reads; without the role infra/ grants for them
        (a 401/403), the quota is unknown and the plan says so instead of failing the run.
        """
        try:
            sizes = list(self._ml.compute.list_sizes(compute_type="AmlCompute"))
            usages = list(self._ml.compute.list_usage())
        except HttpResponseError as error:
            if not is_authorization_error(error):
                raise
            reason = f"no right to read the region's AML usages and sizes ({error.status_code})"
            return unknown_quota(vm_size, low_priority=low_priority, reason=reason)
        return quota_from_listings(vm_size, low_priority=low_priority, sizes=sizes, usages=usages)

    def plan(self, run_id: str, work_units: int, options: RunOptions) -> RunPlan:
        """Size the run's fleet under the region's quota (see base.plan_with_quota)."""
        quota = self.read_quota(options.vm_size, low_priority=options.low_priority)
        return plan_with_quota(run_id, work_units, options, quota, self._aml)

    def _fan_out(self, work: Any, items: Iterable[Any]) -> list[Any]:
        return fan_out(work, items, limit=self._aml.parallel_operations)

    def ensure_clusters(self, run_id: str, plan: RunPlan) -> list[TaggedCompute]:
        """Create the plan's missing clusters; keep (or resize) the ones this run made.

        Every cluster is read first, and a foreign name stops the call before anything is
        created; then every create/resize is started, then all are awaited (creating a GPU
        cluster takes a minute or more, 20 of them in turn could outlast the activity).
        """
        if plan.run_id != run_id:
            raise ValueError("the plan is for a different run")
        check_cluster_names(plan)
        found = self._fan_out(lambda cluster: self._get_compute(cluster.name), plan.clusters)
        for cluster, existing in zip(plan.clusters, found, strict=True):
            if existing is not None and tagged_run_id(getattr(existing, "tags", None)) != run_id:
                raise ForeignComputeError(
                    f"compute {cluster.name!r} exists and is not tagged "
                    f"{TAG_RUN_ID}={run_id}: refusing to use or change it"
                )
        ensured: list[TaggedCompute | None] = [
            current
            if existing is not None
            and (current := describe_compute(existing)).max_nodes == cluster.nodes
            else None
            for cluster, existing in zip(plan.clusters, found, strict=True)
        ]
        entities = {
            index: build_cluster(
                cluster,
                run_id,
                idle_time_before_scale_down_s=self._aml.idle_time_before_scale_down_s,
                identity_resource_id=self._aml.identity_resource_id,
            )
            for index, cluster in enumerate(plan.clusters)
            if ensured[index] is None
        }
        pollers = self._fan_out(self._ml.compute.begin_create_or_update, entities.values())
        created = self._fan_out(self._finish, pollers)
        for (index, entity), result in zip(entities.items(), created, strict=True):
            ensured[index] = describe_compute(result if result is not None else entity)
        return [compute for compute in ensured if compute is not None]

    def submit_jobs(self, run_id: str, plan: RunPlan, options: RunOptions) -> list[JobInfo]:
        """Give every node slot an active job; an active one from an earlier call is kept.

        Only slots with no job, or whose latest job has ended (completed, failed, or
        cancelled: a preempted node's job), get a new attempt, so a retried call submits
        nothing and a call after one node was preempted restarts that node alone. Returns
        every slot's job, slot by slot.
        """
        if plan.run_id != run_id:
            raise ValueError("the plan is for a different run")
        check_cluster_names(plan)
        launch = NodeLaunch.from_settings(
            self._storage, run_id, options, identity_client_id=self._aml.identity_client_id
        )
        slots = node_slots(plan)
        found = self._fan_out(lambda slot: self._latest_job(run_id, slot[0].name, slot[1]), slots)
        jobs: list[JobInfo | None] = [None] * len(slots)
        todo: list[tuple[int, int]] = []  # (slot index, attempt to submit)
        for index, ((cluster, node), (attempt, latest)) in enumerate(
            zip(slots, found, strict=True)
        ):
            if latest is not None:
                name = job_name(run_id, cluster.name, attempt, node=node)
                info = describe_job(latest, fallback_name=name)
                if info.state.active:
                    jobs[index] = info
                    continue
            todo.append((index, attempt + 1))

        def submit(entry: tuple[int, int]) -> JobInfo:
            index, attempt = entry
            cluster, node = slots[index]
            job = build_job(
                cluster,
                launch,
                image=self._aml.node_image,
                node=node,
                attempt=attempt,
                experiment_name=self._aml.experiment_name,
            )
            created = self._ml.jobs.create_or_update(job)
            self._remember(run_id, cluster.name, node, attempt)
            return describe_job(created, fallback_name=str(job.name))

        # Node 0 of each cluster first, one cluster after the other, and only then the rest
        # (fanned out): _run_slots finds the run's jobs by walking node 0 of cluster 0, 1,
        # ..., which a half-failed submit must not break by leaving a gap before a cluster
        # that has jobs.
        anchors = [entry for entry in todo if entry[1] == 0 and slots[entry[0]][1] == 0]
        for entry in anchors:
            jobs[entry[0]] = submit(entry)
        rest = [entry for entry in todo if entry not in anchors]
        for entry, info in zip(rest, self._fan_out(submit, rest), strict=True):
            jobs[entry[0]] = info
        return [info for info in jobs if info is not None]

    def job_states(self, run_id: str) -> list[JobInfo]:
        """The latest job of each of the run's node slots (found by name, clusters or not)."""
        slots = self._run_slots(run_id)
        found = self._fan_out(lambda slot: self._latest_job(run_id, *slot), slots)
        return [
            describe_job(latest, fallback_name=job_name(run_id, cluster, attempt, node=node))
            for (cluster, node), (attempt, latest) in zip(slots, found, strict=True)
            if latest is not None
        ]

    def _begin_cancel(self, name: str) -> Any:
        try:
            return self._ml.jobs.begin_cancel(name)
        except ResourceNotFoundError:
            return None  # gone already: nothing to cancel

    def cancel_jobs(self, run_id: str) -> None:
        """Cancel the run's active jobs; finished or vanished ones are left alone.

        Every cancel is requested first (up to one per node), then all are awaited together.
        """
        active = [info.name for info in self.job_states(run_id) if info.state.active]
        pollers = self._fan_out(self._begin_cancel, active)
        self._fan_out(self._finish, pollers)

    def _still_ours(self, name: str, run_id: str) -> bool:
        fresh = self._get_compute(name)
        return fresh is not None and tagged_run_id(getattr(fresh, "tags", None)) == run_id

    def _begin_delete(self, name: str) -> tuple[str, Any] | None:
        try:
            return name, self._ml.compute.begin_delete(name)
        except ResourceNotFoundError:
            return None  # deleted meanwhile (a retried teardown)

    def delete_clusters(self, run_id: str) -> list[str]:
        """Delete the clusters whose tag names ``run_id``; never anything else.

        The tag is read again right before deleting (the listing may be stale, and a wrong
        delete of someone else's cluster cannot be undone); then every delete is started,
        then all are awaited.
        """
        listed = [
            str(compute.name)
            for compute in self._aml_computes()
            if tagged_run_id(getattr(compute, "tags", None)) == run_id
        ]
        ours = [
            name
            for name, mine in zip(
                listed,
                self._fan_out(lambda name: self._still_ours(name, run_id), listed),
                strict=True,
            )
            if mine
        ]
        started = [entry for entry in self._fan_out(self._begin_delete, ours) if entry is not None]
        self._fan_out(lambda entry: self._finish(entry[1]), started)
        return [name for name, _ in started]

    def list_tagged(self) -> list[TaggedCompute]:
        """Every AML cluster carrying the run tag (the sweeper decides which are orphans)."""
        return [
            describe_compute(compute)
            for compute in self._aml_computes()
            if tagged_run_id(getattr(compute, "tags", None)) is not None
        ]


def create_aml_backend(
    storage: StorageSettings, aml: AmlSettings, *, credential: Any | None = None
) -> AmlBackend:
    """An AmlBackend on a real workspace, signed in with DefaultAzureCredential.

    In Azure the Functions app's managed identity signs in; on a workstation, ``az login``.
    """
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    client = MLClient(credential, aml.subscription_id, aml.resource_group, aml.workspace_name)
    return AmlBackend(client, storage, aml)


def backend_from_settings(storage: StorageSettings) -> AmlBackend:
    """The controller's AmlBackend: storage from its settings, the rest from BATCHCTL_AML_*."""
    return create_aml_backend(storage, get_aml_settings())


__all__ = [
    "AmlBackend",
    "backend_from_settings",
    "build_cluster",
    "build_environment",
    "build_job",
    "create_aml_backend",
    "map_job_status",
]
