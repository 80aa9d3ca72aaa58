"""A node's progress as metrics of its AML job (node_image/worker/metrics.py, issue 26).

The MLflow client is real: it is pointed at a small HTTP server here that plays the AML
tracking endpoint, so what is checked is the request MLflow itself builds (``POST
.../api/2.0/mlflow/runs/log-batch`` with ``run_id`` and ``metrics`` of key, value, timestamp
and step, the job's token as bearer). The worker is the real loop over the in-memory stubs of
test_worker_loop, with its ledger observed through the one hook ``build_worker`` uses.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from batchctl.contracts import ItemError, ItemResult, ItemStatus, StageTimings, WorkItem
from node_image.worker import metrics as node_metrics_module
from node_image.worker.config import WorkerConfig
from node_image.worker.loop import Worker
from node_image.worker.metrics import (
    FAILED,
    GPU_UTILISATION,
    PER_MINUTE,
    STAGES,
    SUCCEEDED,
    MlflowSink,
    MlflowTarget,
    NodeMetrics,
    aml_target,
    https_tracking_uri,
    is_due,
    metric_prefix,
    node_metrics,
    parse_utilisation,
    stage_metric,
)
from node_image.worker.segments import SegmentLedger
from tests.test_worker_loop import RUN, ScriptedTask, StubLedger, StubQueue, StubStorage, item

SCOPE = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws"
)
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


@dataclass
class Received:
    path: str
    authorization: str
    body: dict[str, Any]


@dataclass
class TrackingServer:
    """Plays AML's MLflow endpoint: records every request, answers ``status``."""

    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200

    def batches(self) -> list[list[tuple[str, float, int]]]:
        """Each log-batch's metrics as (key, value, step)."""
        return [
            [(m["key"], float(m["value"]), int(m.get("step", 0))) for m in r.body["metrics"]]
            for r in self.requests
            if r.path.endswith(LOG_BATCH)
        ]


@pytest.fixture
def tracking() -> Iterator[TrackingServer]:
    server_state: list[TrackingServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            state = server_state[0]
            state.requests.append(Received(self.path, self.headers.get("Authorization", ""), body))
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = TrackingServer(url=f"http://127.0.0.1:{server.server_address[1]}/mlflow/v2.0{SCOPE}")
    server_state.append(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_mlflow_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # A refused send is retried by MLflow for minutes by default; these tests want its answer.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def result(item_id: str, *, ok: bool, seconds: float = 1.0) -> ItemResult:
    if ok:
        return ItemResult(
            run_id=RUN,
            item_id=item_id,
            status=ItemStatus.SUCCEEDED,
            timings=StageTimings(
                download_s=seconds / 4,
                decode_s=seconds / 4,
                inference_s=seconds / 2,
                total_s=seconds,
            ),
        )
    return ItemResult(
        run_id=RUN,
        item_id=item_id,
        status=ItemStatus.FAILED,
        error=ItemError(error_class="X", message="bad", permanent=True, attempts=1),
    )


# == where to log ==================================================================================


def test_an_aml_job_environment_names_the_run_and_its_https_endpoint() -> None:
    environ = {
        "MLFLOW_RUN_ID": "r1-c0-n3-0",
        "MLFLOW_TRACKING_URI": f"azureml://westeurope.api.azureml.ms/mlflow/v1.0{SCOPE}",
        "MLFLOW_TRACKING_TOKEN": "job-token",
    }
    assert aml_target(environ) == MlflowTarget(
        tracking_uri=f"https://westeurope.api.azureml.ms/mlflow/v2.0{SCOPE}", run_id="r1-c0-n3-0"
    )
    # A plain MLflow server (or a test's) is used as it is.
    assert https_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    # No run, no URI: not on AML, nothing to log (a local run).
    assert aml_target({}) is None
    assert aml_target({"MLFLOW_TRACKING_URI": "azureml://h/mlflow/v1.0/x"}) is None
    assert aml_target({"MLFLOW_RUN_ID": "r"}) is None
    assert node_metrics({"PATH": "/usr/bin"}) is None


def test_several_processes_of_one_job_keep_their_metrics_apart() -> None:
    assert metric_prefix({}) == ""
    assert metric_prefix({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}) == ""
    assert metric_prefix({"LOCAL_RANK": "2", "WORLD_SIZE": "4"}) == "p2/"


def test_gpu_utilisation_is_read_from_nvidia_smi_lines() -> None:
    assert parse_utilisation("87\n13\n") == [87.0, 13.0]
    assert parse_utilisation("[N/A]\n") == []
    assert parse_utilisation("") == []


def test_cadence_is_every_n_items_or_every_t_seconds() -> None:
    assert not is_due(4, 29.9, every_items=5, every_s=30)
    assert is_due(5, 0.0, every_items=5, every_s=30)
    assert is_due(1, 30.0, every_items=5, every_s=30)
    # No item for a whole interval still shows the node alive (counts, rate 0, GPU).
    assert is_due(0, 30.0, every_items=5, every_s=30)


# == the cadence, against a reference ============================================================


@dataclass
class ListSink:
    sent: list[list[tuple[str, float, int, int]]] = field(default_factory=list)

    def send(self, points: Any) -> None:
        self.sent.append(list(points))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_batches_follow_the_cadence_and_carry_exact_totals(seed: int) -> None:
    rng = random.Random(seed)
    every_items, every_s = rng.randint(3, 12), rng.choice([5.0, 30.0, 60.0])
    now = [0.0]
    sink = ListSink()
    # Batches are built here faster than any server takes them: none may be dropped here.
    # The clock moves between records, so the sending thread's own time check would race
    # the reference: it is tested apart (test_a_long_item_still_shows_the_node_alive...).
    meter = NodeMetrics(
        sink,
        every_items=every_items,
        every_s=every_s,
        clock=lambda: now[0],
        wall_ms=lambda: 7,
        max_pending=1000,
        heartbeat=False,
    )
    # The reference: when a batch is due, and what the totals then are.
    expected: list[tuple[int, int, float]] = []  # (succeeded, failed, items per minute)
    succeeded = failed = in_interval = 0
    started = 0.0
    records = rng.randint(40, 120)
    for index in range(records):
        now[0] += rng.expovariate(1 / 4.0)  # seconds between records, mean 4
        ok = rng.random() > 0.2
        succeeded, failed, in_interval = succeeded + ok, failed + (not ok), in_interval + 1
        meter.observe(result(f"i{index}", ok=ok, seconds=rng.uniform(0.5, 3)))
        if in_interval >= every_items or now[0] - started >= every_s:
            expected.append((succeeded, failed, round(in_interval * 60 / (now[0] - started), 4)))
            in_interval, started = 0, now[0]
    if in_interval:
        expected.append((succeeded, failed, round(in_interval * 60 / (now[0] - started), 4)))
    meter.close()

    points = [point for batch in sink.sent for point in batch]
    steps = sorted({step for _, _, _, step in points})
    assert steps == list(range(len(expected)))
    for step, (want_ok, want_failed, want_rate) in enumerate(expected):
        at = {key: value for key, value, _, s in points if s == step}
        assert at[SUCCEEDED] == want_ok and at[FAILED] == want_failed
        assert at[PER_MINUTE] == pytest.approx(want_rate)
    # Not per item: at most one batch per every_items records, plus the time-cadence ones.
    assert meter.batches == len(expected) < records
    assert sink.sent and len(sink.sent) <= meter.batches


def test_a_server_that_falls_behind_loses_the_oldest_batches_not_the_totals() -> None:
    release = threading.Event()

    class SlowSink(ListSink):
        def send(self, points: Any) -> None:
            release.wait(10)
            super().send(points)

    sink = SlowSink()
    meter = NodeMetrics(sink, every_items=1, every_s=1e9, clock=lambda: 0.0, max_pending=3)
    for index in range(30):
        meter.observe(result(f"i{index}", ok=True))
    release.set()
    meter.close()
    sent = [point for batch in sink.sent for point in batch]
    # The send in flight took what was pending then (at most three batches); of the rest,
    # only the newest three remain, and the last one holds the exact totals.
    assert len({step for *_, step in sent}) <= 6 < 30
    assert meter.dropped >= 30 - 6
    assert max(value for key, value, _, _ in sent if key == SUCCEEDED) == 30


def test_a_long_item_still_shows_the_node_alive_every_interval() -> None:
    now = [0.0]
    sink = ListSink()
    meter = NodeMetrics(sink, every_items=50, every_s=30, clock=lambda: now[0], gpu=lambda: 91.5)
    assert not meter.flush_if_due()
    now[0] = 31.0
    assert meter.flush_if_due()
    meter.close()
    (batch,) = sink.sent
    values = {key: value for key, value, _, _ in batch}
    assert values[SUCCEEDED] == 0 and values[PER_MINUTE] == 0 and values[GPU_UTILISATION] == 91.5
    assert not any(key.startswith("sec_per_item_") for key in values)  # no item: no means


def test_stage_means_cover_the_interval_s_succeeded_items_only() -> None:
    sink = ListSink()
    meter = NodeMetrics(sink, every_items=3, every_s=1e9, clock=lambda: 60.0)
    meter.observe(result("a", ok=True, seconds=1.0))
    meter.observe(result("b", ok=False))
    meter.observe(result("c", ok=True, seconds=3.0))
    meter.close()
    values = {key: value for key, value, _, _ in sink.sent[0]}
    assert values[stage_metric("total")] == 2.0
    assert values[stage_metric("inference")] == 1.0
    assert values[stage_metric("upload")] == 0.0
    assert {stage_metric(stage) for stage in STAGES} <= set(values)


# == the real MLflow client, the real worker loop ==============================================


def build_worker(ledger: Any, tmp_path: Any, **spec: Any) -> tuple[Worker, StubQueue]:
    from batchctl.contracts import RunOptions

    events: list[tuple[str, str]] = []
    queue, storage = StubQueue(events), StubStorage(events)
    task = ScriptedTask()
    for index in range(100):
        storage.sources[f"stub://v{index}"] = f"video {index}".encode()
    worker = Worker(
        WorkerConfig(
            run_id=RUN,
            poll_interval_s=0.05,
            retry_delay_s=0,
            shutdown_grace_s=0.3,
            concurrency=4,
            spec=RunOptions(idle_exit_s=0.3, max_attempts=1, **spec).node_spec(),
        ),
        queue,
        ledger,
        storage,
        task_factory=lambda setup: task,
    )
    return worker, queue


def run_worker(worker: Worker, timeout: float = 30) -> int:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, "worker did not exit"
    return result[0]


@pytest.mark.parametrize("seed", [11, 12])
def test_the_worker_logs_its_progress_to_the_job_s_run_at_the_cadence_not_per_item(
    seed: int, tracking: TrackingServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    items = rng.randint(25, 60)
    every = rng.randint(4, 9)
    environ = {
        "MLFLOW_RUN_ID": "r1-c0-n0-0",
        "MLFLOW_TRACKING_URI": tracking.url,
        "MLFLOW_TRACKING_TOKEN": "the-job-token",
    }
    for name, setting in environ.items():
        monkeypatch.setenv(name, setting)
    target = aml_target(environ)
    assert target is not None
    # Time never moves for the meter: only the item cadence can make a batch.
    meter = NodeMetrics(MlflowSink(target), every_items=every, every_s=1e9, clock=lambda: 0.0)
    ledger = StubLedger([])
    observed = meter.observing(ledger)
    assert not isinstance(observed, SegmentLedger)  # the stub has no segment rows
    worker, queue = build_worker(observed, tmp_path, mini_batch_size=3)
    failing = set(rng.sample(range(items), k=items // 5))
    ids = list(range(items))
    while ids:
        chunk, ids = ids[:3], ids[3:]
        work = [
            item(f"v{i}", **({"do": "permanent"} if i in failing else {})).model_copy(
                update={"source": f"stub://v{i}"}
            )
            for i in chunk
        ]
        queue.put(WorkItem(run_id=RUN, items=work).model_dump_json())
    assert run_worker(worker) == 0
    meter.close()

    assert len(ledger.records) == items
    batches = tracking.batches()
    assert all(r.authorization == "Bearer the-job-token" for r in tracking.requests)
    assert all(r.body["run_id"] == "r1-c0-n0-0" for r in tracking.requests)
    assert {r.path for r in tracking.requests} == {f"/mlflow/v2.0{SCOPE}{LOG_BATCH}"}
    # Not per item: one batch per `every` records (the last one partial), some sent together.
    want_batches = -(-items // every)
    assert meter.batches == want_batches
    assert 1 <= len(batches) <= want_batches < items
    points = [point for batch in batches for point in batch]
    by_step: dict[int, dict[str, float]] = {}
    for key, value, step in points:
        by_step.setdefault(step, {})[key] = value
    assert sorted(by_step) == list(range(want_batches))
    for step, values in by_step.items():
        done = values[SUCCEEDED] + values[FAILED]
        assert done == min((step + 1) * every, items)
    last = by_step[want_batches - 1]
    assert last[SUCCEEDED] == items - len(failing)
    assert last[FAILED] == len(failing)


def test_a_failing_tracking_server_fails_no_item(
    tracking: TrackingServer, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tracking.status = 500
    target = MlflowTarget(tracking_uri=tracking.url, run_id="r1")
    meter = NodeMetrics(MlflowSink(target), every_items=2, every_s=1e9, clock=lambda: 0.0)
    ledger = StubLedger([])
    worker, queue = build_worker(meter.observing(ledger), tmp_path)
    for index in range(8):
        queue.put(
            WorkItem(
                run_id=RUN,
                items=[item(f"v{index}").model_copy(update={"source": f"stub://v{index}"})],
            ).model_dump_json()
        )
    assert run_worker(worker) == 0
    meter.close()
    assert len(ledger.records) == 8
    assert all(r.status is ItemStatus.SUCCEEDED for r in ledger.records.values())
    assert tracking.requests and meter.send_failures == len(tracking.batches())
    assert "sending to the tracking server failed" in caplog.text


def test_an_unreachable_tracking_server_fails_no_item_either(tmp_path: Any) -> None:
    meter = NodeMetrics(
        MlflowSink(MlflowTarget(tracking_uri="http://127.0.0.1:9", run_id="r1")),
        every_items=1,
        every_s=1e9,
        clock=lambda: 0.0,
    )
    ledger = StubLedger([])
    worker, queue = build_worker(meter.observing(ledger), tmp_path)
    for index in range(4):
        queue.put(
            WorkItem(
                run_id=RUN,
                items=[item(f"v{index}").model_copy(update={"source": f"stub://v{index}"})],
            ).model_dump_json()
        )
    assert run_worker(worker) == 0
    meter.close()
    assert len(ledger.records) == 4 and meter.send_failures >= 1


def test_the_real_ledger_keeps_its_segment_rows_when_observed() -> None:
    class SegmentStub(StubLedger):
        def record_segment(self, run_id: str, item_id: str, index: int, payload: str) -> bool:
            return True

        def segment_payloads(self, run_id: str, item_id: str) -> dict[int, str]:
            return {0: "p"}

    meter = NodeMetrics(ListSink(), clock=lambda: 0.0)
    observed = meter.observing(SegmentStub([]))
    assert isinstance(observed, SegmentLedger)
    assert observed.segment_payloads(RUN, "a") == {0: "p"}
    meter.close()


def test_a_local_worker_builds_no_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    import os

    assert node_metrics_module.node_metrics(os.environ) is None
