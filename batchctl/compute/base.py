"""The ComputeBackend protocol: what the controller asks of a fleet, in plain data.

A backend creates the clusters a RunPlan names, starts the jobs whose nodes run the node
worker (one job per node for the AML backend, see ``JobGranularity``), reports and cancels a
run's jobs, deletes the clusters a run created, lists compute that runs created (for the
sweeper) and reads the quota that bounds a plan. Every argument and result is one of our
contracts (``RunPlan``, ``RunOptions``, ``JobInfo``, ``JobState``) or a small frozen model
defined here, so the orchestrator and its activities never see an SDK type, and a backend
can be swapped (``aml`` on either SDK, ``local``) without touching them. Every method is
keyed by the run id and safe to retry: a Durable activity may run twice.

Ownership is by tag, never by name: every cluster a backend creates carries
``TAG_RUN_ID = <run id>`` (and ``TAG_CREATED_BY``), and a backend deletes a cluster only
after reading that tag back. A name clash with compute that lacks the run's tag is an error,
never a reason to reuse or delete it.

Only what every backend shares lives here; Azure ML's own parts (settings, job statuses,
quota listings, the gateways) are in ``batchctl.compute.aml``. Nothing here imports an Azure
SDK.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from batchctl.contracts import ClusterPlan, JobInfo, JobState, MediaSummary, RunOptions, RunPlan
from batchctl.settings import ENV_PREFIX

__all__ = [
    "CREATED_BY",
    "TAG_CREATED_BY",
    "TAG_RUN_ID",
    "TASK_OPTIONS_ENV",
    "BackendKind",
    "ComputeBackend",
    "ComputeError",
    "DataAssetRegistrar",
    "DataAssetRequest",
    "FleetView",
    "ForeignComputeError",
    "JobGranularity",
    "JobInfo",
    "JobPages",
    "JobState",
    "Quota",
    "TaggedCompute",
    "job_granularity",
    "run_tags",
    "tagged_run_id",
]

TAG_RUN_ID: Final = "batchctl-run-id"
"""The tag every cluster (and job) created for a run carries; its value is the run id."""

TAG_CREATED_BY: Final = "batchctl-created-by"
CREATED_BY: Final = "batchctl"

TASK_OPTIONS_ENV: Final = f"{ENV_PREFIX}TASK_OPTIONS"
"""The environment variable holding the run's RunOptions as JSON on every node."""

BackendKind = Literal["aml", "aml_v1", "local"]

JobGranularity = Literal["cluster", "node"]
"""What one job of a backend covers: every node of a cluster, or one node.

The AML backend runs one single-node job per node (docs/aml-topology.md: a multi-node job
waits for all its nodes, and one preemption stops all of them); the local backend runs one
job per cluster whose processes are its nodes. A backend says which with a
``job_granularity`` attribute; one without it is read as ``"cluster"``.
"""


def job_granularity(backend: object) -> JobGranularity:
    """The backend's ``job_granularity`` (``"cluster"`` when it declares none)."""
    return "node" if getattr(backend, "job_granularity", "cluster") == "node" else "cluster"


class ComputeError(RuntimeError):
    """A compute operation failed in a way the caller should see (not a transient blip)."""


class ForeignComputeError(ComputeError):
    """A compute name the plan wants is taken by compute this run did not create."""


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

    @classmethod
    def planned(cls, cluster: ClusterPlan, run_id: str) -> TaggedCompute:
        """A planned cluster as created for ``run_id``, before the service says more."""
        return cls(
            name=cluster.name,
            run_id=run_id,
            vm_size=cluster.vm_size,
            low_priority=cluster.low_priority,
            max_nodes=cluster.nodes,
            tags=run_tags(run_id),
        )


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


class FleetView(_Frozen):
    """One poll's view of a run's compute: its jobs, and what the compute says besides.

    ``note``: why nodes are not coming, in the compute's own words (the clusters' allocation
    errors), or why the jobs are unknown this poll (no jobs then). ``job_error``: the error
    text of a failed job, the first one read; ``start_failure``: that text says the node
    could not start the image, which no resubmit can mend.
    """

    jobs: list[JobInfo] = Field(default_factory=list)
    note: str | None = None
    job_error: str | None = None
    start_failure: bool = False


def run_tags(run_id: str) -> dict[str, str]:
    """The tags every cluster (and job) created for ``run_id`` carries."""
    return {TAG_RUN_ID: run_id, TAG_CREATED_BY: CREATED_BY}


def tagged_run_id(tags: object) -> str | None:
    """The run id in a tag mapping, or None when it is missing (or tags are not a mapping)."""
    if not isinstance(tags, Mapping):
        return None
    value = tags.get(TAG_RUN_ID)
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class DataAssetRequest:
    """What a workspace is asked to register: one new version of the data asset ``name``."""

    name: str
    path: str
    description: str
    tags: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class DataAssetRegistrar(Protocol):
    """A backend that can register a data asset in its workspace (the AML backend)."""

    def register_data_asset(self, request: DataAssetRequest) -> str:
        """Register ``request`` as a new version of its asset; return that version."""
        ...


@runtime_checkable
class JobPages(Protocol):
    """A backend whose jobs have a page a person can open (the AML studio's)."""

    def job_page(self, job: str) -> str | None:
        """The page of job ``job`` (as its worker names itself), or None when there is none."""
        ...


@runtime_checkable
class ComputeBackend(Protocol):
    """What the controller needs from a fleet. Every method is keyed by run and retry-safe.

    ``ensure_clusters`` and ``submit_jobs`` find what an earlier attempt created instead of
    creating it again; ``cancel_jobs`` and ``delete_clusters`` succeed on what is gone.
    """

    kind: BackendKind

    def plan(
        self,
        run_id: str,
        work_units: int,
        options: RunOptions,
        *,
        media: MediaSummary | None = None,
    ) -> RunPlan:
        """The run's fleet for ``work_units`` queue messages under this backend's limits
        (``media``: the manifest's durations, for a plan by video length)."""
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

    def observe(self, run_id: str, clusters: Collection[str] | None = None) -> FleetView:
        """What one poll sees of the run's compute (``job_states`` and what the compute
        says besides), of the named clusters only when given (a fleet that replaced
        another). Never raises for a busy service: the jobs are then unknown, said in
        ``note``."""
        ...

    def cancel_jobs(self, run_id: str, clusters: Collection[str] | None = None) -> None:
        """Ask each of the run's jobs that is still active to stop: only those on
        ``clusters`` when given (a fleet's move cancels the fleet it leaves, never the one
        it may already have started on a retried attempt)."""
        ...

    def delete_clusters(self, run_id: str) -> list[str]:
        """Delete every cluster tagged with ``run_id`` (and nothing else); return their names."""
        ...

    def list_tagged(self) -> list[TaggedCompute]:
        """All compute carrying the run tag, for whichever run (the sweeper's view)."""
        ...
