"""The one AML ComputeBackend: every ownership rule, written once, over an ``AmlGateway``.

What a run gets, per planned cluster: an AmlCompute cluster of the planned VM size and tier,
0 to N nodes, tagged with the run id; and one single-node job per node of it (N jobs for a
cluster of N nodes; docs/aml-topology.md says why), each running the prebuilt node image.
The gateway (``gateway_v2`` on azure-ai-ml, ``gateway_v1`` on azureml-core) builds the SDK's
objects and makes the calls; this class decides what to call:

- **Ownership by tag.** Every planned cluster is read before anything is created; a name
  held by compute without this run's tag stops the call (``ForeignComputeError``) and is
  never used, resized or deleted. A delete reads the tag again right before deleting.
- **Idempotence.** A retried ensure finds the clusters (resizing one whose node count
  changed); a retried submit finds every slot's job and submits nothing for an active one;
  cancel and delete succeed on what is gone.
- **Slots and attempts.** A node slot whose latest job ended (completed, failed, cancelled:
  a preempted node's job among them) gets attempt + 1, and no other slot is touched.
- **Fan-out.** Every lookup, create, resize, submit, cancel and delete runs for all clusters
  (or jobs) at once in a bounded pool: long operations are all started, then all awaited,
  so an activity takes about as long as the slowest cluster, not their sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from batchctl.compute.aml.gateway import (
    AccessDeniedError,
    AmlGateway,
    Finish,
    JobRecord,
    Slot,
    check_image,
    is_start_failure,
    nodes_missing_reason,
    studio_job_url,
)
from batchctl.compute.aml.quota import plan_with_quota, quota_from_listings, unknown_quota
from batchctl.compute.aml.settings import AmlSettings, NodeLaunch
from batchctl.compute.aml.throttling import ThrottledError, sign_in_failed
from batchctl.compute.base import (
    TAG_RUN_ID,
    BackendKind,
    DataAssetRequest,
    FleetView,
    ForeignComputeError,
    JobGranularity,
    JobInfo,
    Quota,
    TaggedCompute,
)
from batchctl.contracts import ClusterPlan, JobState, MediaSummary, RunOptions, RunPlan
from batchctl.planning import cluster_index, cluster_name
from batchctl.settings import StorageSettings

__all__ = ["AmlBackend", "check_cluster_names", "fan_out", "node_slots"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

# planning.cluster_name numbers a run's clusters 0..999.
_CLUSTER_INDEXES: Final = 1000


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


def node_slots(plan: RunPlan) -> list[tuple[ClusterPlan, int]]:
    """Every node slot of the plan, (cluster, node index), cluster by cluster."""
    return [(cluster, node) for cluster in plan.clusters for node in range(cluster.nodes)]


def check_cluster_names(plan: RunPlan) -> None:
    """Refuse a plan whose clusters are not named by ``planning.cluster_name``.

    The run's jobs are reported in plan order from the run id alone (``_slot_order``
    recovers each cluster's index from its name), which holds only for plans that
    ``planning.plan_run`` named.
    """
    # From index 0, or from a later index for a fleet that replaced another (a fallback).
    first = cluster_index(plan.run_id, plan.clusters[0].name) if plan.clusters else 0
    expected = [cluster_name(plan.run_id, (first or 0) + n) for n in range(len(plan.clusters))]
    if first is None or [cluster.name for cluster in plan.clusters] != expected:
        raise ValueError("AML plans must name their clusters with planning.cluster_name")


def _slot_order(run_id: str, slots: Iterable[Slot]) -> list[Slot]:
    """The slots in plan order: cluster index (not name: '-100' sorts before '-11'), node."""
    wanted = {cluster for cluster, _ in slots}
    index: dict[str, int] = {}
    for position in range(_CLUSTER_INDEXES):
        if len(index) == len(wanted):
            break
        name = cluster_name(run_id, position)
        if name in wanted:
            index[name] = position
    # A cluster that no plan of this run names (not ours to order) goes last, by name.
    return sorted(slots, key=lambda slot: (index.get(slot[0], _CLUSTER_INDEXES), slot))


_QUOTA_REFUSED: Final = "no right to read the region's AML usages and sizes"

# A poll reads the error text of at most this many failed jobs: the first that says the
# image cannot start decides, and a fleet preempted all at once costs no GET per node.
ERRORS_READ_PER_POLL: Final = 2


class AmlBackend:
    """ComputeBackend on Azure ML clusters, one single-node job per node, over a gateway."""

    job_granularity: JobGranularity = "node"

    def __init__(self, gateway: AmlGateway, storage: StorageSettings, aml: AmlSettings) -> None:
        """``storage`` says where the nodes' queues and blobs are; ``aml`` the rest."""
        check_image(aml.node_image)  # fail at construction, not at the first submit
        self._gateway = gateway
        self._storage = storage
        self._aml = aml
        # The backend is named after the SDK underneath: ``aml`` (v2) or ``aml_v1``.
        self.kind: BackendKind = gateway.kind

    def _fan_out(self, work: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        return fan_out(work, items, limit=self._aml.parallel_operations)

    def _await(self, started: Iterable[Finish[_T]]) -> list[_T] | None:
        """Every started operation's outcome, or None when configured not to wait."""
        return self._fan_out(lambda finish: finish(), started) if self._aml.wait else None

    @staticmethod
    def _check_plan(run_id: str, plan: RunPlan) -> None:
        if plan.run_id != run_id:
            raise ValueError("the plan is for a different run")
        check_cluster_names(plan)

    # -- planning ------------------------------------------------------------------------------
    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota:
        """Cores, price and free quota for ``vm_size`` in the workspace region.

        Both listings are subscription-scope reads; without the role infra/ grants for them
        (a 401/403), the quota is unknown and the plan says so instead of failing the run.
        """
        try:
            sizes = self._gateway.list_sizes()
            usages = self._gateway.list_usages()
        except AccessDeniedError as refused:
            reason = f"{_QUOTA_REFUSED} ({refused.status})"
            return unknown_quota(vm_size, low_priority=low_priority, reason=reason)
        return quota_from_listings(vm_size, low_priority=low_priority, sizes=sizes, usages=usages)

    def plan(
        self,
        run_id: str,
        work_units: int,
        options: RunOptions,
        *,
        media: MediaSummary | None = None,
    ) -> RunPlan:
        """Size the run's fleet under the region's quota (see quota.plan_with_quota)."""
        quota = self.read_quota(options.vm_size, low_priority=options.low_priority)
        return plan_with_quota(run_id, work_units, options, quota, self._aml, media=media)

    # -- clusters ------------------------------------------------------------------------------
    def ensure_clusters(self, run_id: str, plan: RunPlan) -> list[TaggedCompute]:
        """Create the plan's missing clusters; keep (or resize) the ones this run made.

        Every cluster is read first, and a foreign name stops the call before anything is
        created; then every create/resize is started, then all are awaited (creating a GPU
        cluster takes a minute or more, 20 of them in turn could outlast the activity).
        """
        self._check_plan(run_id, plan)
        found = self._fan_out(
            lambda cluster: self._gateway.get_cluster(cluster.name), plan.clusters
        )
        for cluster, existing in zip(plan.clusters, found, strict=True):
            if existing is not None and existing.run_id != run_id:
                raise ForeignComputeError(
                    f"compute {cluster.name!r} exists and is not tagged "
                    f"{TAG_RUN_ID}={run_id}: refusing to use or change it"
                )
        ensured: list[TaggedCompute | None] = [
            existing if existing is not None and existing.max_nodes == cluster.nodes else None
            for cluster, existing in zip(plan.clusters, found, strict=True)
        ]
        todo = [index for index, compute in enumerate(ensured) if compute is None]

        def begin(index: int) -> Finish[TaggedCompute]:
            cluster = plan.clusters[index]
            if found[index] is None:
                return self._gateway.begin_create_cluster(cluster, run_id)
            return self._gateway.begin_resize_cluster(cluster, run_id)

        outcomes = self._await(self._fan_out(begin, todo))
        for position, index in enumerate(todo):
            # Not waiting: what was asked for is all there is to say yet.
            ensured[index] = (
                outcomes[position]
                if outcomes is not None
                else TaggedCompute.planned(plan.clusters[index], run_id)
            )
        return [compute for compute in ensured if compute is not None]

    def delete_clusters(self, run_id: str) -> list[str]:
        """Delete the clusters whose tag names ``run_id``; never anything else.

        The tag is read again right before deleting (the listing may be stale, and a wrong
        delete of someone else's cluster cannot be undone); then every delete is started,
        then all are awaited.
        """
        listed = [c.name for c in self._gateway.list_clusters() if c.run_id == run_id]

        def still_ours(name: str) -> bool:
            fresh = self._gateway.get_cluster(name)
            return fresh is not None and fresh.run_id == run_id

        ours = [
            name
            for name, mine in zip(listed, self._fan_out(still_ours, listed), strict=True)
            if mine
        ]
        started = [
            (name, finish)
            for name, finish in zip(
                ours, self._fan_out(self._gateway.begin_delete_cluster, ours), strict=True
            )
            if finish is not None  # None: deleted meanwhile (a retried teardown)
        ]
        self._await(finish for _, finish in started)
        return [name for name, _ in started]

    def list_tagged(self) -> list[TaggedCompute]:
        """Every AML cluster carrying the run tag (the sweeper decides which are orphans)."""
        return [c for c in self._gateway.list_clusters() if c.run_id is not None]

    # -- jobs ----------------------------------------------------------------------------------
    def submit_jobs(self, run_id: str, plan: RunPlan, options: RunOptions) -> list[JobInfo]:
        """Give every node slot an active job; an active one from an earlier call is kept.

        Only slots with no job, or whose latest job has ended, get a new attempt, so a
        retried call submits nothing and a call after one node was preempted restarts that
        node alone. Returns every slot's job, slot by slot.
        """
        self._check_plan(run_id, plan)
        launch = NodeLaunch.from_settings(
            self._storage, run_id, options, identity_client_id=self._aml.identity_client_id
        )
        slots = node_slots(plan)
        latest = self._gateway.find_jobs(run_id, [(c.name, node) for c, node in slots])
        jobs: list[JobRecord | None] = [None] * len(slots)
        todo: list[tuple[int, int]] = []  # (slot index, attempt to submit)
        for index, (cluster, node) in enumerate(slots):
            current = latest.get((cluster.name, node))
            if current is not None and current.state.active:
                jobs[index] = current
                continue
            todo.append((index, current.attempt + 1 if current is not None else 0))

        def submit(entry: tuple[int, int]) -> JobRecord:
            index, attempt = entry
            cluster, node = slots[index]
            return self._gateway.submit_job(cluster, node, attempt, launch)

        for entry, record in zip(todo, self._fan_out(submit, todo), strict=True):
            jobs[entry[0]] = record
        return [record.info() for record in jobs if record is not None]

    def _run_jobs(self, run_id: str) -> list[JobRecord]:
        latest = self._gateway.find_jobs(run_id, None)
        return [latest[slot] for slot in _slot_order(run_id, latest)]

    def job_states(self, run_id: str) -> list[JobInfo]:
        """The latest job of each of the run's node slots, in slot order (clusters or not).

        A poll must not fail a run because ARM is busy. The listing waits out throttling
        within ``arm_retry_budget_s`` (throttling.py); if ARM still refuses, the jobs are
        reported unknown: no jobs at all, rather than an error. Decision, and why it is
        enough: ``get_progress`` raising would fail the run once Durable's retries of the
        activity are spent (four tries, all against the same spent budget), while a poll
        with no jobs is one the monitor already reads as "nothing known about compute":
        ``progress._fleet_lost`` resubmits nothing and declares nothing lost when it sees
        no jobs, and the stall clock neither starts nor resets on it (``progress.
        advance_stall_clock``); completion, cancel, budget and deadline come from storage
        and are decided as usual. The next poll lists again. Submit and cancel let the
        error through instead: their activities' retries are the right response there.
        """
        try:
            return [record.info() for record in self._run_jobs(run_id)]
        except ThrottledError as throttled:
            log.warning("job states of run %s unknown this poll: %s", run_id, throttled)
            return []

    def observe(self, run_id: str, clusters: Collection[str] | None = None) -> FleetView:
        """One poll: the jobs (one paged listing), and, only when they need explaining,
        the clusters' allocation errors (one listing of the computes, while jobs wait and
        no node runs) and the error text of up to ``ERRORS_READ_PER_POLL`` failed jobs.

        The cost stays flat in the node count: a few requests more, never one per node.
        A throttled listing leaves the jobs unknown, as ``job_states`` does, and says so.
        """
        try:
            records = self._run_jobs(run_id)
        except ThrottledError as throttled:
            log.warning("job states of run %s unknown this poll: %s", run_id, throttled)
            return FleetView(note=f"job states unknown this poll: {throttled}")
        except Exception as error:
            # A token refresh that failed (the identity endpoint did not answer) is, like
            # throttling, a poll that learnt nothing: the next poll signs in again.
            if not sign_in_failed(error):
                raise
            log.warning("job states of run %s unknown this poll: %s", run_id, error)
            said = " ".join(str(error).split())[:300]
            return FleetView(
                note=f"job states unknown this poll: signing in to Azure failed "
                f"({type(error).__name__}: {said})"
            )
        if clusters is not None:  # the fleet that replaced another: its own clusters only
            records = [record for record in records if record.cluster in clusters]
        jobs = [record.info() for record in records]
        note = None
        waiting = any(record.state is JobState.QUEUED for record in records)
        running = any(record.state is JobState.RUNNING for record in records)
        if waiting and not running:
            note = self._why_no_nodes(run_id, clusters)
        job_error, start_failure = self._failed_job_error(records)
        return FleetView(jobs=jobs, note=note, job_error=job_error, start_failure=start_failure)

    def _why_no_nodes(self, run_id: str, clusters: Collection[str] | None) -> str | None:
        """What the run's clusters say of their missing nodes; a failed read says nothing
        (the poll goes on: this is an explanation, not a fact the run depends on)."""
        try:
            facts = self._gateway.list_cluster_facts(run_id)
            if clusters is not None:
                facts = [found for found in facts if found.name in clusters]
            return nodes_missing_reason(facts)
        except Exception as error:  # an explanation must not fail the poll
            log.warning("cluster states of run %s unread this poll: %s", run_id, error)
            return None

    def _failed_job_error(self, records: list[JobRecord]) -> tuple[str | None, bool]:
        """The first failed job's error text that says something, preferring one that says
        the image cannot start; (None, False) when no failed job's text could be read."""
        first: str | None = None
        failed = [record for record in records if record.state is JobState.FAILED]
        for record in failed[:ERRORS_READ_PER_POLL]:
            try:
                text = self._gateway.job_error(record)
            except Exception as error:  # an explanation must not fail the poll
                log.warning("error of job %s unread this poll: %s", record.name, error)
                continue
            if not text:
                continue
            said = f"job {record.name} failed: {text}"
            if is_start_failure(text):
                return said, True
            first = first or said
        return first, False

    def job_page(self, job: str) -> str | None:
        """The studio page of the run's job ``job`` (as a worker of it names itself), or
        None where the name is no job's: SDK v1's jobs are named by the service."""
        if self.kind != "aml":
            return None
        return studio_job_url(self._aml, job)

    def cancel_jobs(self, run_id: str, clusters: Collection[str] | None = None) -> None:
        """Cancel the run's active jobs (on ``clusters`` only, when given); finished or
        vanished ones are left alone.

        Every cancel is requested first (up to one per node), then all are awaited together.
        """
        active = [
            record
            for record in self._run_jobs(run_id)
            if record.state.active and (clusters is None or record.cluster in clusters)
        ]
        started = self._fan_out(self._gateway.begin_cancel_job, active)
        self._await(finish for finish in started if finish is not None)

    # -- data assets -----------------------------------------------------------------------
    def register_data_asset(self, request: DataAssetRequest) -> str:
        """Register a run's merged output as a new version of a data asset (data_assets.py)."""
        return self._gateway.register_data_asset(request)
