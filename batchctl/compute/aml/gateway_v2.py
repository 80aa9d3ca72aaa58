"""The AML gateway on azure-ai-ml (SDK v2), the default; and the factory of its backend.

What it asks AML for, per planned cluster:

- an ``AmlCompute`` cluster of the planned VM size and tier (``low_priority`` or
  ``dedicated``), 0 to N nodes, ``idle_time_before_scale_down`` 120 s (SDK v1's 1,800 s
  default bills idle GPUs for half an hour), tagged with the run id, and carrying the
  user-assigned managed identity that the nodes use to reach storage;
- one single-node ``command`` job per node of it (``instance_count=1``). The job runs the
  prebuilt node image (an ``Environment`` on the registry image: nothing is built when the
  job starts) and ``python -m worker``; every setting arrives as an environment variable
  (storage URLs, run id, the run's options as JSON), never a key. AML's ``pytorch``
  distribution is used only as a launcher of ``processes_per_node`` copies of the command
  on the job's node; the workers never talk to each other.

Jobs are named ``{run id}-{cluster}-n{node}-{attempt}``, and SDK v2 cannot list jobs by a
tag's value, so a run's jobs are found by name from the run id alone: node 0 of clusters 0,
1, ... (each carries its cluster's node count in a tag), then that many node slots per
cluster, then each slot's attempts; one GET per job, fanned out in a bounded pool. That
walk is why this gateway asks for ``ordered_anchors``.

The pure builders (``build_cluster``, ``build_environment``, ``build_job``) return real SDK
entities and touch no network, so tests assert their fields offline. ``AmlV2Gateway`` takes
an ``MLClient`` (or anything with the same ``compute`` and ``jobs`` operations);
``create_aml_backend`` / ``backend_from_settings`` are the one place that builds a client,
from ``DefaultAzureCredential``.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Iterable, Sequence
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

from batchctl.compute.aml.backend import AmlBackend, fan_out
from batchctl.compute.aml.gateway import (
    TAG_CLUSTER_NODES,
    Finish,
    JobRecord,
    Slot,
    check_cluster_size,
    check_image,
    check_launch,
    job_name,
    job_tags,
    refused_listing,
    tag_int,
)
from batchctl.compute.aml.settings import AmlSettings, NodeLaunch, get_aml_settings
from batchctl.compute.base import BackendKind, TaggedCompute, run_tags, tagged_run_id
from batchctl.contracts import ClusterPlan
from batchctl.planning import MAX_NODES_PER_CLUSTER, cluster_name
from batchctl.settings import StorageSettings

__all__ = [
    "AmlV2Gateway",
    "backend_from_settings",
    "build_cluster",
    "build_environment",
    "build_job",
    "create_aml_backend",
    "v2_backend",
]

# How far to look for a run's clusters and attempts; far beyond any real plan.
_MAX_CLUSTERS_PROBED: Final = 999
_MAX_ATTEMPTS_PROBED: Final = 100


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
    check_cluster_size(cluster)
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
    check_image(image)
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
    check_launch(launch)
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
        tags=job_tags(launch.run_id, cluster, node, attempt),
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


def describe_job(job: Any, *, name: str, cluster: str, node: int, attempt: int) -> JobRecord:
    """Our record of an SDK job entity read back for a known slot, attempt and name."""
    status = getattr(job, "status", "")
    return JobRecord(
        name=str(getattr(job, "name", None) or name),
        cluster=cluster,
        node=node,
        attempt=attempt,
        # After a round trip the SDK hands back its JobStatus enum, whose str() is
        # "JobStatus.FAILED": keep the word.
        status=str(getattr(status, "value", status) or ""),
    )


# --------------------------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------------------------


class ComputeOperationsLike(Protocol):
    """The part of ``MLClient.compute`` this gateway uses."""

    def get(self, name: str) -> Any: ...
    def list(self, *, compute_type: str | None = None) -> Iterable[Any]: ...
    def begin_create_or_update(self, compute: Any) -> Any: ...
    def begin_delete(self, name: str, *, action: str = "Delete") -> Any: ...
    def list_usage(self, *, location: str | None = None) -> Iterable[Any]: ...
    def list_sizes(
        self, *, location: str | None = None, compute_type: str | None = None
    ) -> Iterable[Any]: ...


class JobOperationsLike(Protocol):
    """The part of ``MLClient.jobs`` this gateway uses."""

    def get(self, name: str) -> Any: ...
    def create_or_update(self, job: Any) -> Any: ...
    def begin_cancel(self, name: str) -> Any: ...


class MLClientLike(Protocol):
    """What AmlV2Gateway needs of an MLClient: its compute and job operations."""

    @property
    def compute(self) -> ComputeOperationsLike: ...
    @property
    def jobs(self) -> JobOperationsLike: ...


def _completion(poller: Any) -> Finish[None]:
    """Waits for a poller whose result carries nothing we read (a delete, a cancel)."""

    def finish() -> None:
        if poller is not None:  # an operation that completed at once may hand back none
            poller.result()

    return finish


class AmlV2Gateway:
    """AmlGateway over an MLClient: clusters and single-node command jobs, by name."""

    kind: BackendKind = "aml"
    ordered_anchors = True

    def __init__(self, ml_client: MLClientLike, aml: AmlSettings) -> None:
        self._ml = ml_client
        self._aml = aml
        # The highest attempt seen per node slot (keyed by its attempt-0 job name). Only a
        # head start for the next probe: jobs are never deleted, so an attempt once seen
        # still exists, and probing from it skips the GETs of the attempts before it. A
        # fresh process (or another host) without it probes from attempt 0, same answer.
        self._attempt_seen: dict[str, int] = {}
        self._seen_lock = threading.Lock()

    # -- clusters ------------------------------------------------------------------------------
    def get_cluster(self, name: str) -> TaggedCompute | None:
        try:
            return describe_compute(self._ml.compute.get(name))
        except ResourceNotFoundError:
            return None

    def list_clusters(self) -> list[TaggedCompute]:
        return [
            describe_compute(compute)
            for compute in self._ml.compute.list(compute_type="AmlCompute")
            if str(getattr(compute, "type", "amlcompute")).lower() == "amlcompute"
        ]

    def begin_create_cluster(self, cluster: ClusterPlan, run_id: str) -> Finish[TaggedCompute]:
        entity = build_cluster(
            cluster,
            run_id,
            idle_time_before_scale_down_s=self._aml.idle_time_before_scale_down_s,
            identity_resource_id=self._aml.identity_resource_id,
        )
        poller = self._ml.compute.begin_create_or_update(entity)

        def finish() -> TaggedCompute:
            result = poller.result() if poller is not None else None
            return describe_compute(result if result is not None else entity)

        return finish

    def begin_resize_cluster(self, cluster: ClusterPlan, run_id: str) -> Finish[TaggedCompute]:
        # v2 updates a cluster by PUTting the whole entity again; the new max_instances is
        # the change (min stays 0, so nothing running is touched).
        return self.begin_create_cluster(cluster, run_id)

    def begin_delete_cluster(self, name: str) -> Finish[None] | None:
        try:
            return _completion(self._ml.compute.begin_delete(name))
        except ResourceNotFoundError:
            return None  # deleted meanwhile

    # -- jobs ----------------------------------------------------------------------------------
    def _get_job(self, name: str) -> Any | None:
        try:
            return self._ml.jobs.get(name)
        except ResourceNotFoundError:
            return None

    def _latest_job(self, run_id: str, slot: Slot) -> JobRecord | None:
        """A node slot's latest job (None when it has none).

        Attempts are made one after the other (a new one only once the last has ended), so
        the latest is the last one found before the first missing name.
        """
        cluster, node = slot
        key = job_name(run_id, cluster, 0, node=node)
        with self._seen_lock:
            start = self._attempt_seen.get(key, 0)
        latest: JobRecord | None = None
        for attempt in range(start, _MAX_ATTEMPTS_PROBED):
            name = job_name(run_id, cluster, attempt, node=node)
            job = self._get_job(name)
            if job is None:
                break
            latest = describe_job(job, name=name, cluster=cluster, node=node, attempt=attempt)
        if latest is None and start > 0:
            with self._seen_lock:
                self._attempt_seen.pop(key, None)
            return self._latest_job(run_id, slot)  # the hint was wrong: from 0
        if latest is not None:
            self._remember(run_id, slot, latest.attempt)
        return latest

    def _remember(self, run_id: str, slot: Slot, attempt: int) -> None:
        if attempt > 0:
            key = job_name(run_id, slot[0], 0, node=slot[1])
            with self._seen_lock:
                self._attempt_seen[key] = max(attempt, self._attempt_seen.get(key, 0))

    def _run_slots(self, run_id: str) -> list[Slot]:
        """Every node slot of the run that has a job, from the run id alone.

        The backend submits node 0 of each cluster before anything of a later cluster
        (``ordered_anchors``), so the clusters are those whose node-0 job exists, up to the
        first that has none. Node 0 carries its cluster's node count; slots past it (a plan
        that grew) are probed on until one has no job. Slots inside the count that never got
        a job (a submit that failed half-way) read as missing and are left out.
        """
        clusters: list[tuple[str, int]] = []
        for index in range(_MAX_CLUSTERS_PROBED):
            cluster = cluster_name(run_id, index)
            anchor = self._get_job(job_name(run_id, cluster, 0, node=0))
            if anchor is None:
                break
            tags = {str(k): str(v) for k, v in (getattr(anchor, "tags", None) or {}).items()}
            nodes = tag_int(tags, TAG_CLUSTER_NODES, default=1)
            while nodes < MAX_NODES_PER_CLUSTER and self._get_job(
                job_name(run_id, cluster, 0, node=nodes)
            ):
                nodes += 1
            clusters.append((cluster, nodes))
        return [(cluster, node) for cluster, nodes in clusters for node in range(nodes)]

    def find_jobs(self, run_id: str, slots: Sequence[Slot] | None) -> dict[Slot, JobRecord]:
        wanted = list(slots) if slots is not None else self._run_slots(run_id)
        found = fan_out(
            lambda slot: self._latest_job(run_id, slot),
            wanted,
            limit=self._aml.parallel_operations,
        )
        return {record.slot: record for record in found if record is not None}

    def submit_job(
        self, cluster: ClusterPlan, node: int, attempt: int, launch: NodeLaunch
    ) -> JobRecord:
        job = build_job(
            cluster,
            launch,
            # The run's own image (--image) or the deployment's node image.
            image=launch.options.image or self._aml.node_image,
            node=node,
            attempt=attempt,
            experiment_name=self._aml.experiment_name,
        )
        created = self._ml.jobs.create_or_update(job)
        self._remember(launch.run_id, (cluster.name, node), attempt)
        return describe_job(
            created, name=str(job.name), cluster=cluster.name, node=node, attempt=attempt
        )

    def begin_cancel_job(self, job: JobRecord) -> Finish[None] | None:
        try:
            return _completion(self._ml.jobs.begin_cancel(job.name))
        except ResourceNotFoundError:
            return None  # gone already: nothing to cancel

    # -- quota ---------------------------------------------------------------------------------
    def list_sizes(self) -> list[Any]:
        return refused_listing(
            lambda: list(self._ml.compute.list_sizes(compute_type="AmlCompute")),
            HttpResponseError,
        )

    def list_usages(self) -> list[Any]:
        return refused_listing(lambda: list(self._ml.compute.list_usage()), HttpResponseError)


def v2_backend(ml_client: MLClientLike, storage: StorageSettings, aml: AmlSettings) -> AmlBackend:
    """The AML backend over ``ml_client`` (a real MLClient, or one on a test transport)."""
    return AmlBackend(AmlV2Gateway(ml_client, aml), storage, aml)


def create_aml_backend(
    storage: StorageSettings, aml: AmlSettings, *, credential: Any | None = None
) -> AmlBackend:
    """The AML backend on a real workspace, signed in with DefaultAzureCredential.

    In Azure the Functions app's managed identity signs in; on a workstation, ``az login``.
    """
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    client = MLClient(credential, aml.subscription_id, aml.resource_group, aml.workspace_name)
    return v2_backend(client, storage, aml)


def backend_from_settings(storage: StorageSettings) -> AmlBackend:
    """The controller's AML backend: storage from its settings, the rest from BATCHCTL_AML_*."""
    return create_aml_backend(storage, get_aml_settings())
