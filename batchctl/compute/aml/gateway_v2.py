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

Jobs are named ``{run id}-{cluster}-n{node}-{attempt}`` (deterministic, so a retried submit
cannot start a second job for the same attempt) and tagged with their slot, their attempt
and a tag key of their run's own (``gateway.run_key_tag``). ARM lists jobs by tag key, so
a run's jobs come back from one paged listing: a poll costs a page per ARM page size of
jobs (one page up to a hundred-odd nodes), never a request per job. Listing is not
reading: a job created a moment ago may not be listed yet, so a submit whose name is
already taken adopts the job of that name instead of failing (``submit_job``).

The pure builders (``build_cluster``, ``build_environment``, ``build_job``) return real SDK
entities and touch no network, so tests assert their fields offline. ``AmlV2Gateway`` takes
an ``MLClient`` (or anything with the same ``compute`` and ``jobs`` operations);
``create_aml_backend`` / ``backend_from_settings`` are the one place that builds a client,
from ``DefaultAzureCredential``.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from azure.ai.ml import MLClient, PyTorchDistribution, command
from azure.ai.ml.constants import AssetTypes, ListViewType
from azure.ai.ml.entities import (
    AmlCompute,
    Command,
    Data,
    Environment,
    IdentityConfiguration,
    ManagedIdentityConfiguration,
)
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.paging import ItemPaged

from batchctl.compute.aml.backend import AmlBackend
from batchctl.compute.aml.gateway import (
    ClusterFacts,
    Finish,
    JobRecord,
    Slot,
    check_cluster_size,
    check_image,
    check_launch,
    cluster_facts,
    error_text,
    job_display_name,
    job_name,
    job_tags,
    latest_per_slot,
    node_environment,
    refused_listing,
    run_key_tag,
    slot_record,
)
from batchctl.compute.aml.settings import AmlSettings, NodeLaunch, get_aml_settings
from batchctl.compute.aml.throttling import Patience, wait_out
from batchctl.compute.base import (
    BackendKind,
    DataAssetRequest,
    TaggedCompute,
    run_tags,
    tagged_run_id,
)
from batchctl.contracts import ClusterPlan
from batchctl.settings import StorageSettings

__all__ = [
    "AmlV2Gateway",
    "backend_from_settings",
    "build_cluster",
    "build_data_asset",
    "build_environment",
    "build_job",
    "create_aml_backend",
    "v2_backend",
]

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
        display_name=job_display_name(launch.run_id, cluster.name, node, attempt),
        experiment_name=experiment_name,
        command=shlex.join(launch.command),
        environment=build_environment(image),
        environment_variables=node_environment(launch, cluster.name, node, attempt),
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


def build_data_asset(request: DataAssetRequest) -> Data:
    """The data asset entity of a run's merged output: a uri_folder on its storage URL.

    No version: azure-ai-ml then asks the asset's container for its next version and PUTs
    that one (``_create_or_update_autoincrement``), so every registration is a new version
    and an earlier one is never overwritten. The path is the folder's https URL, which AML
    reads with the identity of whoever uses it (no datastore is needed, none is created).
    """
    return Data(
        name=request.name,
        path=request.path,
        type=AssetTypes.URI_FOLDER,
        description=request.description,
        tags=dict(request.tags),
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


def _status_word(job: Any) -> str:
    # After a round trip the SDK hands back its JobStatus enum, whose str() is
    # "JobStatus.FAILED": keep the word.
    status = getattr(job, "status", "")
    return str(getattr(status, "value", status) or "")


def _job_tags(job: Any) -> dict[str, str]:
    return {str(key): str(value) for key, value in (getattr(job, "tags", None) or {}).items()}


def describe_job(job: Any, *, name: str, cluster: str, node: int, attempt: int) -> JobRecord:
    """Our record of an SDK job entity read back for a known slot, attempt and name."""
    return JobRecord(
        name=str(getattr(job, "name", None) or name),
        cluster=cluster,
        node=node,
        attempt=attempt,
        status=_status_word(job),
    )


def _listed(run_id: str, jobs: Iterable[Any]) -> list[JobRecord]:
    """Records of the run's node-slot jobs among listed SDK job entities.

    The SDK lists a job it cannot parse as None; such a job is no job of ours (ours are
    the command jobs ``build_job`` makes), and a job without our tags is skipped too.
    """
    records = []
    for job in jobs:
        if job is None or not getattr(job, "name", None):
            continue
        record = slot_record(run_id, str(job.name), _job_tags(job), _status_word(job))
        if record is not None:
            records.append(record)
    return records


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
    def list(self, **kwargs: Any) -> Iterable[Any]: ...
    def create_or_update(self, job: Any) -> Any: ...
    def begin_cancel(self, name: str) -> Any: ...


class DataOperationsLike(Protocol):
    """The part of ``MLClient.data`` this gateway uses."""

    def create_or_update(self, data: Any) -> Any: ...


@runtime_checkable
class DataClientLike(Protocol):
    """An MLClient's data asset operations (a stand-in for compute and jobs may lack them)."""

    @property
    def data(self) -> DataOperationsLike: ...


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
    """AmlGateway over an MLClient: clusters, and single-node command jobs listed by tag."""

    kind: BackendKind = "aml"

    def __init__(
        self,
        ml_client: MLClientLike,
        aml: AmlSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sleep`` and ``clock`` time the waits on a throttled listing (tests pass fakes)."""
        self._ml = ml_client
        self._aml = aml
        self._patience = Patience(budget_s=aml.arm_retry_budget_s)
        self._sleep = sleep
        self._clock = clock

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

    def _list_run_jobs(self, run_id: str) -> list[JobRecord]:
        """Every job of the run, from one paged listing by the run's own tag key.

        ARM answers a page of jobs per request (a handful of pages for a thousand nodes)
        instead of one GET per job name. A page that fails transiently is read again from
        that page, not from the first (throttling.py waits, within its budget).
        """
        records: list[JobRecord] = []
        resume: list[str | None] = [None]  # the continuation of the first page not read yet

        def read_rest() -> list[JobRecord]:
            listing = self._ml.jobs.list(
                tag=run_key_tag(run_id),
                # Archived jobs still hold their names: a slot's latest attempt must be
                # seen even if someone archived it, or the next attempt's name is taken.
                list_view_type=ListViewType.ALL,
                # Status retries are throttling.wait_out's (bounded, resuming the page);
                # connection retries stay the pipeline's.
                retry_status=0,
            )
            if not isinstance(listing, ItemPaged):
                records.extend(_listed(run_id, listing))  # a stand-in's plain list
                return records
            pages = listing.by_page(continuation_token=resume[0])
            for page in pages:
                records.extend(_listed(run_id, page))
                resume[0] = pages.continuation_token  # type: ignore[attr-defined]
                if resume[0] is None:
                    break
            return records

        return wait_out(
            read_rest,
            self._patience,
            what=f"listing the jobs of run {run_id}",
            sleep=self._sleep,
            clock=self._clock,
        )

    def find_jobs(self, run_id: str, slots: Sequence[Slot] | None) -> dict[Slot, JobRecord]:
        return latest_per_slot(self._list_run_jobs(run_id), slots)

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
        try:
            created = self._ml.jobs.create_or_update(job)
        except HttpResponseError:
            # ARM refuses a PUT of a name that exists ("A job with this name already
            # exists"), and a listing may not show a job created moments ago: a submit that
            # listed the slot without it asks for a name it made itself. That job is this
            # attempt (names are deterministic), so it is adopted; anything else is raised.
            created = self._get_job(str(job.name))
            if created is None or tagged_run_id(_job_tags(created)) != launch.run_id:
                raise
        return describe_job(
            created, name=str(job.name), cluster=cluster.name, node=node, attempt=attempt
        )

    def begin_cancel_job(self, job: JobRecord) -> Finish[None] | None:
        try:
            return _completion(self._ml.jobs.begin_cancel(job.name))
        except ResourceNotFoundError:
            return None  # gone already: nothing to cancel

    # -- data assets ---------------------------------------------------------------------------
    def register_data_asset(self, request: DataAssetRequest) -> str:
        if not isinstance(self._ml, DataClientLike):
            raise TypeError("this ML client has no data asset operations (MLClient.data)")
        created = self._ml.data.create_or_update(build_data_asset(request))
        version = getattr(created, "version", None)
        if not version:
            raise ValueError(f"AML registered data asset {request.name!r} without a version")
        return str(version)

    # -- what the compute says of a run's missing nodes ------------------------------------------
    def list_cluster_facts(self, run_id: str) -> list[ClusterFacts]:
        """The run's clusters as ARM lists them, allocation state and errors included.

        azure-ai-ml's ``AmlCompute`` entity keeps neither (its ``_load_from_rest`` drops
        allocationState, currentNodeCount and errors), so the REST operations under
        ``MLClient.compute`` list the ComputeResources themselves: the same Compute_List
        request the public ``list()`` sends, read as ARM's JSON. One paged listing; its
        status retries are off (an explanation is not worth a throttled minute).
        """
        rest = getattr(self._ml.compute, "_operation", None)
        if rest is None:  # a stand-in without the REST layer: the entities are all there is
            return []
        listing = rest.list(
            self._aml.resource_group,
            self._aml.workspace_name,
            cls=lambda resources: [resource.as_dict() for resource in resources],
            retry_status=0,
        )
        facts = []
        for body in listing:
            tags = body.get("tags") or {}
            if tagged_run_id(tags) == run_id:
                facts.append(cluster_facts(body))
        return facts

    def job_error(self, job: JobRecord) -> str | None:
        """AML's error for a failed job, from run history's run details (ARM's job resource
        has no error field; ``az ml job stream`` reads it from the same place)."""
        runs = getattr(self._ml.jobs, "_runs_operations", None)
        if runs is None:  # a stand-in without the run history client
            return None
        details = runs.get_run_details(job.name)
        error: Any = getattr(details, "error", None)
        # run history's models are msrest's: as_dict() gives {"error": {"code", "message"}}.
        found = error_text(error.as_dict() if hasattr(error, "as_dict") else error)
        if found is None:
            return None
        code, message = found
        return f"{code}: {message}" if code and message else code or message

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
