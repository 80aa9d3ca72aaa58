"""A node's progress as metrics of its AML job, seen live in the AML studio (issue 26).

On an AML job the worker logs, every ``every_items`` terminal records or every ``every_s``
seconds (whichever comes first), one MLflow ``log_batch`` holding: the items it succeeded
and failed so far, its items per minute over the last interval, the mean seconds per item
of each stage (download, decode, inference, upload, total) over that interval, and, where
``nvidia-smi`` answers, the GPU utilisation of the GPUs this process sees. Never a call per
item: a record only bumps counters under a lock.

How it knows it runs on AML: an AML job's environment names the job's MLflow run
(``MLFLOW_RUN_ID``), its tracking URI (``MLFLOW_TRACKING_URI``, ``azureml://HOST/mlflow/
v1.0/subscriptions/...``) and a token for it (``MLFLOW_TRACKING_TOKEN``). Without the run id
and the URI (a local run, a test) nothing is built and nothing is logged. The azureml://
URI is spoken in its https form (``https://HOST/mlflow/v2.0/subscriptions/...``, with the
job's token as the bearer): exactly what azureml-mlflow's store does, without installing
azureml-mlflow, whose releases pin azure-storage-blob below the node image's.

Cheap and harmless by construction: records are counted on the item threads; building a
batch is a few additions; the send (and the ``nvidia-smi`` sample) happens on one daemon
thread of its own, so a slow or failing tracking server delays no item, and any error of
it is logged and dropped: a metrics failure never fails an item. Batches that pile up while
a send is slow are sent together; at most :data:`MAX_PENDING_BATCHES` wait, oldest dropped.

The hook is one point: :meth:`NodeMetrics.observing` wraps the ledger the worker records
into (``loop.build_worker``), so the worker loop itself is unchanged.
"""

from __future__ import annotations

import collections
import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from batchctl.contracts import ItemResult, ItemStatus
from batchctl.storage.ledger import PartiallyRecordedError

from .recording import ResultLedger, record_results, recorded_among
from .segments import SegmentLedger

log = logging.getLogger(__name__)

DEFAULT_EVERY_ITEMS: Final = 50
DEFAULT_EVERY_S: Final = 30.0
MAX_PENDING_BATCHES: Final = 20
STAGES: Final = ("download", "decode", "inference", "upload", "total")
NVIDIA_SMI_TIMEOUT_S: Final = 5.0
# How long closing waits for the last batch to go: a node that is done must not hang on a
# tracking server that does not answer.
CLOSE_TIMEOUT_S: Final = 10.0

# The metric names, one place (docs/aml-topology.md lists them).
SUCCEEDED: Final = "items_succeeded"
FAILED: Final = "items_failed"
PER_MINUTE: Final = "items_per_minute"
GPU_UTILISATION: Final = "gpu_utilization_percent"


def stage_metric(stage: str) -> str:
    """The metric of one stage's mean seconds per item (``sec_per_item_inference``)."""
    return f"sec_per_item_{stage}"


MetricPoint = tuple[str, float, int, int]
"""(key, value, timestamp in ms, step): the fields of ``mlflow.entities.Metric``."""


# -- where to log: pure functions of the environment ----------------------------------------


@dataclass(frozen=True)
class MlflowTarget:
    """The MLflow run this process logs into, and where its tracking server is."""

    tracking_uri: str
    run_id: str


_AZUREML_URI = re.compile(r"^azureml://(?P<host>[^/]+)/mlflow/v[0-9.]+(?P<scope>/.*)?$")


def https_tracking_uri(uri: str) -> str:
    """``uri`` in a form plain MLflow speaks: an azureml:// URI as its https endpoint.

    azureml-mlflow's store turns ``azureml://HOST/mlflow/v1.0/SCOPE`` into
    ``https://HOST/mlflow/v2.0/SCOPE`` for MLflow 2 and 3 (``AzureMLRestStore.
    get_host_credentials``); anything else is returned as it is.
    """
    match = _AZUREML_URI.match(uri)
    if match is None:
        return uri
    return f"https://{match['host']}/mlflow/v2.0{match['scope'] or ''}"


def aml_target(environ: Mapping[str, str]) -> MlflowTarget | None:
    """The job's MLflow run when this process runs in an AML job, else None."""
    run_id = environ.get("MLFLOW_RUN_ID", "").strip()
    uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not run_id or not uri:
        return None
    return MlflowTarget(tracking_uri=https_tracking_uri(uri), run_id=run_id)


def metric_prefix(environ: Mapping[str, str]) -> str:
    """``p{rank}/`` for one of several worker processes of a job (their metrics would
    overwrite each other in the job's one run), empty for the only one."""
    rank, world = environ.get("LOCAL_RANK", ""), environ.get("WORLD_SIZE", "")
    if rank.isdigit() and world.isdigit() and int(world) > 1:
        return f"p{rank}/"
    return ""


# -- what an interval adds up to: pure ------------------------------------------------------


@dataclass
class Tally:
    """Counts since the worker started, and what the current interval saw."""

    succeeded: int = 0
    failed: int = 0
    interval_items: int = 0
    interval_started: float = 0.0
    stage_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    stage_items: int = 0

    def add(self, result: ItemResult) -> None:
        if result.status is ItemStatus.SUCCEEDED:
            self.succeeded += 1
            self.stage_items += 1
            for stage in STAGES:
                self.stage_sums[stage] += float(getattr(result.timings, f"{stage}_s"))
        else:
            self.failed += 1
        self.interval_items += 1

    def close_interval(self, now: float) -> list[tuple[str, float]]:
        """The interval's metrics, and a new interval from ``now``."""
        elapsed = max(now - self.interval_started, 1e-9)
        values = [
            (SUCCEEDED, float(self.succeeded)),
            (FAILED, float(self.failed)),
            (PER_MINUTE, round(self.interval_items * 60.0 / elapsed, 4)),
        ]
        if self.stage_items:
            values.extend(
                (stage_metric(stage), round(self.stage_sums[stage] / self.stage_items, 4))
                for stage in STAGES
            )
        self.interval_items, self.interval_started, self.stage_items = 0, now, 0
        self.stage_sums = dict.fromkeys(STAGES, 0.0)
        return values


def is_due(items: int, elapsed_s: float, *, every_items: int, every_s: float) -> bool:
    """A batch is due after ``every_items`` records or ``every_s`` seconds, whichever comes
    first: while one long item runs, the studio still sees the node alive (and its GPU)."""
    return items >= every_items or elapsed_s >= every_s


# -- the GPU ----------------------------------------------------------------------------------


def parse_utilisation(text: str) -> list[float]:
    """``nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits`` lines."""
    values = []
    for line in text.splitlines():
        cell = line.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", cell):
            values.append(float(cell))
    return values


def gpu_utilisation(environ: Mapping[str, str]) -> float | None:
    """Mean utilisation (%) of the GPUs this process sees, or None (no GPU, no nvidia-smi).

    ``CUDA_VISIBLE_DEVICES`` pins a process to its GPU (``__main__.pin_launcher_rank``), so
    only those indexes are asked for; nvidia-smi itself ignores that variable.
    """
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    command = [tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if re.fullmatch(r"\d+(?:,\d+)*", visible):
        command.append(f"--id={visible}")
    try:
        completed = subprocess.run(  # a fixed command: no user input reaches it
            command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    values = parse_utilisation(completed.stdout) if completed.returncode == 0 else []
    return round(sum(values) / len(values), 2) if values else None


# -- sending ----------------------------------------------------------------------------------


class MetricSink(Protocol):
    """Where a batch of metric points goes (:class:`MlflowSink` on AML)."""

    def send(self, points: Sequence[MetricPoint]) -> None: ...


class MlflowSink:
    """``MlflowClient.log_batch`` into the job's run: one request per batch."""

    def __init__(self, target: MlflowTarget) -> None:
        # Imported here: only a process on AML needs MLflow at all.
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=target.tracking_uri)
        self._run_id = target.run_id

    def send(self, points: Sequence[MetricPoint]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key=key, value=value, timestamp=timestamp, step=step)
            for key, value, timestamp, step in points
        ]
        self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)


def _wall_ms() -> int:
    return int(time.time() * 1000)


class NodeMetrics:
    """Counts a worker's terminal records and sends them as metrics at a fixed cadence."""

    def __init__(
        self,
        sink: MetricSink,
        *,
        every_items: int = DEFAULT_EVERY_ITEMS,
        every_s: float = DEFAULT_EVERY_S,
        prefix: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
        gpu: Callable[[], float | None] = lambda: None,
        max_pending: int = MAX_PENDING_BATCHES,
        heartbeat: bool = True,
    ) -> None:
        """``heartbeat``: the sending thread also makes a batch when ``every_s`` passed with
        no record (a long item); a test of the record cadence alone turns it off."""
        if every_items < 1 or every_s <= 0 or max_pending < 1:
            raise ValueError("metrics need every_items >= 1, every_s > 0 and max_pending >= 1")
        self._sink = sink
        self.every_items = every_items
        self.every_s = every_s
        self._prefix = prefix
        self._clock = clock
        self._wall_ms = wall_ms
        self._gpu = gpu
        self._heartbeat = heartbeat
        self._lock = threading.Lock()
        self._tally = Tally(interval_started=clock())
        self._step = 0
        self._pending: collections.deque[list[MetricPoint]] = collections.deque(maxlen=max_pending)
        self._wake = threading.Condition()
        self._closed = False
        self.batches = 0  # built
        self.sends = 0  # log_batch calls made (several batches may share one)
        self.send_failures = 0
        self.dropped = 0  # batches dropped while the server was behind
        self._thread = threading.Thread(target=self._send_loop, name="node-metrics", daemon=True)
        self._thread.start()

    # -- the hook ------------------------------------------------------------------------------
    def observing(self, ledger: ResultLedger) -> ResultLedger:
        """``ledger``, whose first record of each item is also counted here."""
        if isinstance(ledger, SegmentLedger):
            return _ObservedSegmentLedger(ledger, self)
        return _ObservedLedger(ledger, self)

    def observe(self, result: ItemResult) -> None:
        """One item's terminal record (its first): counted; a batch built when due."""
        try:
            with self._lock:
                self._tally.add(result)
                now = self._clock()
                if not is_due(
                    self._tally.interval_items,
                    now - self._tally.interval_started,
                    every_items=self.every_items,
                    every_s=self.every_s,
                ):
                    return
                batch = self._build(now)
            self._queue(batch)
        except Exception as error:  # never the item's problem
            log.warning("node metrics: could not count a record: %s", error)

    def flush_if_due(self) -> bool:
        """Build a batch when the interval is due by time (an item may run for minutes)."""
        with self._lock:
            now = self._clock()
            if not is_due(
                self._tally.interval_items,
                now - self._tally.interval_started,
                every_items=self.every_items,
                every_s=self.every_s,
            ):
                return False
            batch = self._build(now)
        self._queue(batch)
        return True

    def close(self) -> None:
        """Send what the last interval saw, then stop (waiting at most CLOSE_TIMEOUT_S)."""
        with self._lock:
            batch = self._build(self._clock()) if self._tally.interval_items else None
        if batch is not None:
            self._queue(batch)
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)

    # -- inside ----------------------------------------------------------------------------------
    def _build(self, now: float) -> list[MetricPoint]:
        step, wall = self._step, self._wall_ms()
        self._step += 1
        self.batches += 1
        return [
            (f"{self._prefix}{key}", value, wall, step)
            for key, value in self._tally.close_interval(now)
        ]

    def _queue(self, batch: list[MetricPoint]) -> None:
        with self._wake:
            if len(self._pending) == self._pending.maxlen:
                # Logged once and then every hundredth: a server that stays behind would
                # otherwise log with every batch (seen in bench/node_metrics.py).
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning(
                        "node metrics: the tracking server is behind; %d batches dropped, "
                        "oldest first (the newest carries the totals)",
                        self.dropped,
                    )
            self._pending.append(batch)
            self._wake.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._pending) or self._closed, self.every_s)
                closing = self._closed
            if not closing and self._heartbeat:
                try:
                    self.flush_if_due()
                except Exception as error:
                    log.warning("node metrics: %s", error)
            with self._wake:
                batches = list(self._pending)
                self._pending.clear()
            if batches:
                self._send(batches)
            if closing:
                return

    def _send(self, batches: list[list[MetricPoint]]) -> None:
        points = [point for batch in batches for point in batch]
        try:
            utilisation = self._gpu()
            if utilisation is not None:
                _, _, wall, step = points[-1]
                points.append((f"{self._prefix}{GPU_UTILISATION}", utilisation, wall, step))
            self._sink.send(points)
            self.sends += 1
        except Exception as error:  # logged, dropped: the next batch carries the totals
            self.send_failures += 1
            if self.send_failures == 1 or self.send_failures % 20 == 0:
                log.warning(
                    "node metrics: sending to the tracking server failed (%d so far): %s",
                    self.send_failures,
                    error,
                )


class _ObservedLedger:
    """A ResultLedger whose first record of each item is also counted by NodeMetrics."""

    def __init__(self, ledger: ResultLedger, metrics: NodeMetrics) -> None:
        self._ledger = ledger
        self._metrics = metrics

    def has_record(self, run_id: str, item_id: str) -> bool:
        return self._ledger.has_record(run_id, item_id)

    def record(self, result: ItemResult) -> bool:
        first = self._ledger.record(result)
        if first:
            self._metrics.observe(result)
        return first

    # A message's items, looked up and recorded together (recording.BatchLedger): the
    # observed ledger keeps the node's bookkeeping per message, not per item.
    def recorded_among(self, run_id: str, item_ids: Iterable[str]) -> set[str]:
        return recorded_among(self._ledger, run_id, item_ids)

    def record_many(self, results: Iterable[ItemResult]) -> set[tuple[str, str]]:
        batch = list(results)
        try:
            first = record_results(self._ledger, batch)
        except PartiallyRecordedError as partial:
            self._observe(batch, partial.written)  # written all the same: count them
            raise
        self._observe(batch, first)
        return first

    def _observe(self, batch: list[ItemResult], first: set[tuple[str, str]]) -> None:
        for result in batch:
            if (result.run_id, result.item_id) in first:
                self._metrics.observe(result)


class _ObservedSegmentLedger(_ObservedLedger):
    """The same over a ledger that also holds segment rows (the real ``Ledger``)."""

    def __init__(self, ledger: Any, metrics: NodeMetrics) -> None:
        super().__init__(ledger, metrics)
        self._segments: SegmentLedger = ledger

    def record_segment(self, run_id: str, item_id: str, index: int, payload: str) -> bool:
        return self._segments.record_segment(run_id, item_id, index, payload)

    def segment_payloads(self, run_id: str, item_id: str) -> dict[int, str]:
        return self._segments.segment_payloads(run_id, item_id)


def node_metrics(environ: Mapping[str, str]) -> NodeMetrics | None:
    """The job's metrics when this process runs in an AML job; None elsewhere (no-op).

    A failure to set MLflow up is logged and yields None: the node works without metrics.
    """
    target = aml_target(environ)
    if target is None:
        return None
    try:
        sink = MlflowSink(target)
    except Exception as error:
        log.warning("node metrics off: MLflow could not be set up: %s", error)
        return None
    log.info(
        "node metrics to MLflow run %s every %d items or %.0f s",
        target.run_id,
        DEFAULT_EVERY_ITEMS,
        DEFAULT_EVERY_S,
    )
    return NodeMetrics(sink, prefix=metric_prefix(environ), gpu=lambda: gpu_utilisation(environ))
