"""The local ComputeBackend: each "node" is a worker process on this machine.

The processes run the same node_image worker code that a GPU node runs, against the same
storage (Azurite in local mode). Deleting a run's compute kills its processes; workers are
also killed when the controller process dies (PR_SET_PDEATHSIG), so nothing outlives it.

A worker spends seconds importing TensorFlow and building its model before it takes a
message. ``batchctl run`` knows its run's options before its storage exists, so it starts
:class:`StandbyWorkers` first: processes that do that part while Azurite starts and the clips
upload, then wait on their stdin for the rest of their environment (storage, run, node name),
which provisioning hands them instead of starting new processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from batchctl.compute.base import (
    TASK_OPTIONS_ENV,
    BackendKind,
    FleetView,
    Quota,
    TaggedCompute,
    run_tags,
)
from batchctl.contracts import ClusterPlan, JobInfo, JobState, MediaSummary, RunOptions, RunPlan
from batchctl.planning import media_work_of, packed
from batchctl.settings import ENV_PREFIX, StorageSettings, local_concurrency

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_PACKAGE_DIR = REPO_ROOT / "node_image"
PR_SET_PDEATHSIG = 1
LOCAL_CLUSTER_PREFIX = "local"


def _die_with_parent() -> None:  # pragma: no cover - runs between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class LocalFiles:
    """What a session's local workers do on this machine beyond storage."""

    # The folder whose videos the manifests may name: read in place (the session's root).
    media_root: str | None = None
    # `batchctl run`: the run's outputs folder, which the nodes write beside storage.
    outputs_dir: Path | None = None
    # False: storage that no later run reads (`batchctl run`'s private Azurite), so the
    # nodes note no --skip-existing index entries in it.
    index_outputs: bool = True

    def environment(self) -> dict[str, str]:
        """These, as a worker's WorkerSettings reads them: every one, "" for none, so a
        variable this process inherits never reaches a worker it was not meant for."""
        return {
            f"{ENV_PREFIX}INDEX_OUTPUTS": str(self.index_outputs).lower(),
            f"{ENV_PREFIX}LOCAL_MEDIA_ROOT": self.media_root or "",
            f"{ENV_PREFIX}LOCAL_OUTPUTS_DIR": str(self.outputs_dir.resolve())
            if self.outputs_dir is not None
            else "",
        }


def worker_environment(
    storage: StorageSettings,
    run_id: str,
    node_name: str,
    options: RunOptions,
    *,
    nodes: int,
    files: LocalFiles = LocalFiles(),
) -> dict[str, str]:
    """Everything a worker process needs, as environment variables (never a key: local mode
    authenticates with Azurite's published development account)."""
    return base_environment() | assignment(
        storage, run_id, node_name, options, nodes=nodes, files=files
    )


def base_environment() -> dict[str, str]:
    """What every worker process of this controller gets, whatever its run."""
    env = dict(os.environ)
    # This process: a worker whose controller died stops within seconds.
    env[f"{ENV_PREFIX}CONTROLLER_PID"] = str(os.getpid())
    # The worker package lives in node_image/ (as it does in the image's working directory).
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(WORKER_PACKAGE_DIR), str(REPO_ROOT), env.get("PYTHONPATH")) if part
    )
    return env


def worker_concurrency(nodes: int) -> int:
    """Items each of ``nodes`` local workers works on at once: ``BATCHCTL_CONCURRENCY`` when
    set, else this machine's share (settings.local_concurrency)."""
    configured = os.environ.get(f"{ENV_PREFIX}CONCURRENCY")
    return int(configured) if configured else local_concurrency(nodes)


def assignment(
    storage: StorageSettings,
    run_id: str,
    node_name: str,
    options: RunOptions,
    *,
    nodes: int,
    files: LocalFiles = LocalFiles(),
) -> dict[str, str]:
    """The variables that make a worker one node of ``nodes`` of one run: what a standby
    worker receives on its stdin (``python -m worker --standby``). Its items at once follow
    this machine's cores (settings.local_concurrency) unless ``BATCHCTL_CONCURRENCY`` says.
    ``files``: what it reads and writes on this machine besides storage."""
    return {
        **files.environment(),
        f"{ENV_PREFIX}CONCURRENCY": str(worker_concurrency(nodes)),
        f"{ENV_PREFIX}STORAGE_AUTH": storage.storage_auth,
        f"{ENV_PREFIX}BLOB_URL": storage.blob_url,
        f"{ENV_PREFIX}QUEUE_URL": storage.queue_url,
        f"{ENV_PREFIX}TABLE_URL": storage.table_url,
        f"{ENV_PREFIX}RUN_ID": run_id,
        f"{ENV_PREFIX}NODE_NAME": node_name,
        # The job's node spec, once: the messages carry items only.
        TASK_OPTIONS_ENV: options.node_spec().model_dump_json(),
    }


@dataclass
class _Waiting:
    process: subprocess.Popen[bytes]
    log: Path | None


class StandbyWorkers:
    """Worker processes started ahead of their run (``python -m worker --standby``).

    Each imports the worker and, for the built-in task, TensorFlow, and builds and warms the
    model ``options`` name, then waits for its assignment. :meth:`take` hands one to
    provisioning; :meth:`close` stops those never taken (a run refused before provisioning,
    or planned with fewer nodes). A standby worker whose controller dies sees its stdin
    close (and gets the parent-death signal) and exits.
    """

    def __init__(
        self,
        run_id: str,
        options: RunOptions,
        count: int,
        *,
        log_dir: Path | None = None,
        worker_command: list[str] | None = None,
    ) -> None:
        self.run_id = run_id
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        command = [*(worker_command or [sys.executable, "-m", "worker"]), "--standby"]
        env = base_environment()
        # The run it is for, from its start: whoever looks for the run's processes by their
        # environment (/proc/PID/environ) finds these too.
        env[f"{ENV_PREFIX}RUN_ID"] = run_id
        # What to build while waiting: the run's node spec as it stands now (a model file
        # published later changes the spec; the worker then builds what its assignment says).
        env[TASK_OPTIONS_ENV] = options.node_spec().model_dump_json()
        for index in range(count):
            log = None if log_dir is None else log_dir / f"standby-{os.getpid()}-{index}.log"
            self._waiting.append(_Waiting(_start_worker(command, env, log, stdin=True), log))

    def take(self, env: dict[str, str], log: Path | None) -> subprocess.Popen[bytes] | None:
        """A waiting worker given ``env`` (its log moved to ``log``), or None when none is left."""
        while True:
            with self._lock:
                if not self._waiting:
                    return None
                waiting = self._waiting.pop(0)
            process = waiting.process
            if process.poll() is not None or process.stdin is None:
                continue  # it died waiting: the next one, or a new process
            try:
                process.stdin.write(json.dumps(env).encode() + b"\n")
                process.stdin.close()
            except OSError:  # it died just now
                _stop(process)
                continue
            if waiting.log is not None and log is not None:
                with contextlib.suppress(OSError):  # the name only; the worker keeps writing
                    waiting.log.rename(log)
            return process

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the workers never taken."""
        with self._lock:
            left, self._waiting = self._waiting, []
        for waiting in left:
            _stop(waiting.process, grace_s)
            if waiting.log is not None:
                waiting.log.unlink(missing_ok=True)


def _start_worker(
    command: list[str], env: dict[str, str], log: Path | None, *, stdin: bool = False
) -> subprocess.Popen[bytes]:
    output = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        output = log.open("ab")  # type: ignore[assignment]
    return subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, safe before exec
        # Its own session: a Ctrl-C in the terminal goes to the controller alone, which
        # cancels the run and stops the workers itself (SIGTERM: release, never fail).
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class _Job:
    name: str
    cluster: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cancelled: bool = False

    def state(self) -> JobState:
        codes = [process.poll() for process in self.processes]
        if any(code is None for code in codes):
            return JobState.RUNNING
        if self.cancelled:
            return JobState.CANCELLED
        return JobState.COMPLETED if all(code == 0 for code in codes) else JobState.FAILED


class LocalBackend:
    """Worker processes as nodes. One instance per controller process keeps the handles."""

    kind: BackendKind = "local"

    def __init__(
        self,
        storage: StorageSettings,
        *,
        log_dir: Path | None = None,
        worker_command: list[str] | None = None,
        nodes: int = 2,
        standby: StandbyWorkers | None = None,
        files: LocalFiles = LocalFiles(),
    ) -> None:
        self._storage = storage
        # What the workers read and write on this machine besides storage.
        self._files = files
        # Workers started ahead of the run (batchctl run): provisioning takes these first.
        self._standby = standby
        self._nodes = nodes
        self._log_dir = log_dir
        self._command = worker_command or [sys.executable, "-m", "worker"]
        self._clusters: dict[str, set[str]] = {}  # run id -> cluster names
        self._jobs: dict[str, list[_Job]] = {}
        self._lock = threading.Lock()

    def plan(
        self,
        run_id: str,
        work_units: int,
        options: RunOptions,
        *,
        media: MediaSummary | None = None,
    ) -> RunPlan:
        """As many worker processes as the session allows, the run asks and there is work.

        With segments, one long video is work for several nodes: the pieces the manifest's
        durations say, or, without durations, every node the session allows (segments may
        come from any video)."""
        if options.segment_seconds is None:
            units = work_units
        else:
            units = (
                packed(media_work_of(media), options.items_per_message).pieces
                if media is not None
                else self._nodes
            )
        node_count = max(1, min(self._nodes, options.max_nodes, units))
        return RunPlan(
            run_id=run_id,
            clusters=[
                ClusterPlan(
                    name=f"{LOCAL_CLUSTER_PREFIX}-{run_id}"[:32],
                    nodes=node_count,
                    vm_size="local-process",
                    low_priority=False,
                )
            ],
            total_nodes=node_count,
            est_makespan_s=0.0,
            est_cost=0.0,
            binding_limit="max_nodes" if node_count < units else "items",
            notes=["local mode: each node is a worker process on this machine"],
        )

    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota:
        return Quota(
            vm_size=vm_size,
            low_priority=low_priority,
            cores_per_vm=1,
            notes=["local mode: no quota; nodes are processes on this machine"],
        )

    def ensure_clusters(self, run_id: str, plan: RunPlan) -> list[TaggedCompute]:
        with self._lock:
            self._clusters.setdefault(run_id, set()).update(c.name for c in plan.clusters)
        return [_tagged(run_id, cluster) for cluster in plan.clusters]

    def submit_jobs(self, run_id: str, plan: RunPlan, options: RunOptions) -> list[JobInfo]:
        """Start a job on every cluster whose latest job has ended (or that has none)."""
        with self._lock:
            jobs = self._jobs.setdefault(run_id, [])
            for cluster in plan.clusters:
                history = [job for job in jobs if job.cluster == cluster.name]
                if history and history[-1].state().active:
                    continue  # a retried submit must not double the fleet
                job = _Job(name=f"{cluster.name}-job{len(history)}", cluster=cluster.name)
                for node in range(cluster.nodes * options.processes_per_node):
                    job.processes.append(self._spawn(run_id, f"{job.name}-n{node}", options))
                jobs.append(job)
        return self.job_states(run_id)

    def _spawn(self, run_id: str, node_name: str, options: RunOptions) -> subprocess.Popen[bytes]:
        log = None if self._log_dir is None else self._log_dir / f"{node_name}.log"
        assigned = assignment(
            self._storage, run_id, node_name, options, nodes=self._nodes, files=self._files
        )
        standby = self._standby
        if standby is not None and standby.run_id == run_id and options.processes_per_node == 1:
            started = standby.take(assigned, log)
            if started is not None:
                return started
        return _start_worker(self._command, base_environment() | assigned, log)

    def job_states(self, run_id: str) -> list[JobInfo]:
        """The latest job of each of the run's clusters."""
        with self._lock:
            latest = {job.cluster: job for job in self._jobs.get(run_id, [])}
            return [
                JobInfo(
                    name=job.name,
                    cluster=job.cluster,
                    state=job.state(),
                    # Each worker process is a node; the ones that exited work no more.
                    nodes=sum(process.poll() is None for process in job.processes),
                )
                for job in latest.values()
            ]

    def observe(self, run_id: str, clusters: Collection[str] | None = None) -> FleetView:
        """The jobs, and nothing besides: this machine's nodes always come."""
        jobs = self.job_states(run_id)
        return FleetView(jobs=[job for job in jobs if clusters is None or job.cluster in clusters])

    def cancel_jobs(
        self, run_id: str, clusters: Collection[str] | None = None, grace_s: float = 10.0
    ) -> None:
        with self._lock:
            jobs = [
                job
                for job in self._jobs.get(run_id, [])
                if clusters is None or job.cluster in clusters
            ]
        for job in jobs:
            if not job.state().active:
                continue  # a finished job keeps its own outcome
            job.cancelled = True
            for process in job.processes:
                if process.poll() is None:
                    process.terminate()  # SIGTERM: the worker releases in-flight messages
        for job in jobs:
            for process in job.processes:
                try:
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def delete_clusters(self, run_id: str) -> list[str]:
        self.cancel_jobs(run_id)
        with self._lock:
            return sorted(self._clusters.pop(run_id, set()))

    def list_tagged(self) -> list[TaggedCompute]:
        """Every cluster a run created and that still exists (the sweeper's view)."""
        with self._lock:
            return [
                TaggedCompute(
                    name=name, run_id=run_id, vm_size="local-process", tags=run_tags(run_id)
                )
                for run_id, names in sorted(self._clusters.items())
                for name in sorted(names)
            ]

    def live_processes(self, run_id: str) -> list[int]:
        with self._lock:
            return [
                process.pid
                for job in self._jobs.get(run_id, [])
                for process in job.processes
                if process.poll() is None
            ]


def _tagged(run_id: str, cluster: ClusterPlan) -> TaggedCompute:
    return TaggedCompute(
        name=cluster.name,
        run_id=run_id,
        vm_size=cluster.vm_size,
        low_priority=cluster.low_priority,
        max_nodes=cluster.nodes,
        tags=run_tags(run_id),
    )
