"""What a run costs as it grows: the poll, the enqueue's history, the messages, side by side.

    python -m bench.scale [--large 100000] [--small 1000] [--items-1m 1000000] [--json]

On one fresh Azurite, with the project's own code paths:

- ``poll_growth``: seconds per poll (``controller.get_progress``) with ``--large`` terminal
  records divided by seconds with ``--small`` (goal <= 2.0); ``naive_poll_growth`` is the
  same ratio for a poll that scans every record (the old way), measured in the same run;
- ``requests_per_poll_large``: storage requests one poll makes at ``--large`` records,
  counted at the HTTP transport (goal <= 20);
- ``enqueue_replay_events_1m``: history events the real Durable SDK replays while the run
  orchestrator enqueues a ``--items-1m`` run with its completions arriving one at a time
  (goal <= 50,000), beside ``naive_enqueue_replay_events_1m``, one activity per chunk fanned
  out in one generation (the old way), replayed the same way;
- ``largest_generation_events`` / ``largest_generation_bytes``: the longest history of
  one generation of that run;
- ``messages_per_item``: queue messages per item with the default packing of a
  ``--items-1m`` run, counted on Azurite after enqueueing one real chunk (goal <= 0.125).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from azure.core.pipeline.transport import RequestsTransport

from batchctl import controller
from batchctl.activity_names import Activity
from batchctl.contracts import (
    ChunkTask,
    ClusterPlan,
    ItemResult,
    ItemStatus,
    ManifestItem,
    ManifestSummary,
    ProgressSnapshot,
    RunOptions,
    RunPlan,
    RunReport,
    RunRequest,
    RunState,
    chunk_blob_name,
)
from batchctl.services import Services
from bench.common import fresh_local_session
from orchestrators.run import _with_packing, run_orchestrator
from tests.durable_replay import ActivityOutcome, ReplayDriver, ReplayRun

CHUNK_SIZE = 2000  # the controller's default chunk size


# -- the poll ------------------------------------------------------------------------------
def fill_ledger(services: Services, run_id: str, records: int) -> None:
    """``records`` terminal records through the ledger's own batched, counted writes."""

    def results() -> Iterator[ItemResult]:
        for index in range(records):
            yield ItemResult(
                run_id=run_id, item_id=f"item-{index:07d}", status=ItemStatus.SUCCEEDED
            )

    written = services.ledger.record_absent(results())
    assert written == records, (written, records)


@contextmanager
def counted_requests() -> Iterator[list[int]]:
    """Counts every HTTP request the synchronous Azure SDK clients send meanwhile."""
    count = [0]
    original = RequestsTransport.send

    def send(self: RequestsTransport, request: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(self, request, **kwargs)

    RequestsTransport.send = send
    try:
        yield count
    finally:
        RequestsTransport.send = original


def seconds_per_call(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_polls(services: Services, small: int, large: int) -> dict[str, Any]:
    runs = {"small": ("scale-small", small), "large": ("scale-large", large)}
    for run_id, records in runs.values():
        controller.create_run_queues(services, run_id)
        started = time.perf_counter()
        fill_ledger(services, run_id, records)
        print(f"  {records} records written in {time.perf_counter() - started:.1f} s", flush=True)
    ours: dict[str, float] = {}
    naive: dict[str, float] = {}
    for name, (run_id, _) in runs.items():
        ours[name] = seconds_per_call(partial(controller.get_progress, services, run_id), 7)
        naive[name] = seconds_per_call(partial(services.ledger.counted_rows, run_id), 3)
    large_id = runs["large"][0]
    snapshot = controller.get_progress(services, large_id)
    assert snapshot.succeeded == large, snapshot
    with counted_requests() as count:
        controller.get_progress(services, large_id)
    return {
        "poll_s_small": round(ours["small"], 4),
        "poll_s_large": round(ours["large"], 4),
        "poll_growth": round(ours["large"] / ours["small"], 2),
        "naive_poll_s_large": round(naive["large"], 3),
        "naive_poll_growth": round(naive["large"] / naive["small"], 1),
        "requests_per_poll_large": count[0],
    }


# -- the enqueue's history -----------------------------------------------------------------
def scripted_activities(items: int) -> Callable[[str, Any], ActivityOutcome]:
    """Answers as the real activities would for a run of ``items`` that completes at once."""
    chunks = -(-items // CHUNK_SIZE)

    def answer(name: str, payload: Any) -> ActivityOutcome:
        if name == Activity.VALIDATE_MANIFEST:
            request = RunRequest.model_validate(payload)
            summary = ManifestSummary(
                run_id=request.run_id,
                manifest=request.manifest,
                rows=items,
                valid=items,
                invalid=0,
                chunk_count=chunks,
            )
            return ActivityOutcome(summary.model_dump(mode="json"))
        if name == Activity.PLAN_RUN:
            state = RunState.model_validate(payload)
            plan = RunPlan(
                run_id=state.run_id,
                clusters=[ClusterPlan(name="c1", nodes=100, vm_size="v", low_priority=True)],
                total_nodes=100,
                est_makespan_s=1,
                est_cost=1,
                binding_limit="none",
            )
            return ActivityOutcome(plan.model_dump(mode="json"))
        if name == Activity.GET_PROGRESS:
            snapshot = ProgressSnapshot(
                run_id=payload, succeeded=items, failed=0, queued_messages=0
            )
            return ActivityOutcome(snapshot.model_dump(mode="json"))
        if name == Activity.WRITE_REPORT:
            state = RunState.model_validate(payload["state"])
            report = RunReport(
                run_id=state.run_id,
                phase=payload["phase"],
                manifest=state.request.manifest,
                total=items,
                succeeded=items,
                failed=0,
                invalid=0,
                started_at=state.started_at,
                finished_at=payload["finished_at"],
                output_prefix="o",
            )
            return ActivityOutcome(report.model_dump(mode="json"))
        if name == "enqueue_chunk":
            return ActivityOutcome(CHUNK_SIZE // 8)
        return ActivityOutcome(None)

    return answer


def naive_enqueue_orchestrator(context: Any) -> Generator[Any, Any, Any]:
    """The old way: one activity per chunk, all fanned out in one generation."""
    state = RunState.model_validate(context.get_input())
    summary = ManifestSummary.model_validate(
        (yield context.call_activity(Activity.VALIDATE_MANIFEST, state.request.model_dump()))
    )
    yield context.task_all(
        [
            context.call_activity("enqueue_chunk", chunk_blob_name(state.run_id, index))
            for index in range(summary.chunk_count)
        ]
    )
    return None


def measure_enqueue_history(items: int) -> dict[str, Any]:
    request = RunRequest(run_id="scale-1m", manifest="manifests/m.csv")
    start = RunState(run_id="scale-1m", request=request).model_dump(mode="json")

    def replay(orchestrator: Callable[[Any], Generator[Any, Any, Any]]) -> ReplayRun:
        driver = ReplayDriver(
            orchestrator,
            scripted_activities(items),
            one_completion_per_episode=True,
            max_episodes=100_000,
        )
        return driver.run(start)

    ours = replay(run_orchestrator)
    assert ours.output["phase"] == "completed", ours.output
    naive = replay(naive_enqueue_orchestrator)
    largest = max(ours.generations, key=lambda generation: len(generation.history))
    return {
        "enqueue_replay_events_1m": ours.replayed_events,
        "naive_enqueue_replay_events_1m": naive.replayed_events,
        "enqueue_generations": len(ours.generations),
        "largest_generation_events": len(largest.history),
        "largest_generation_bytes": len(json.dumps(largest.history)),
    }


# -- messages per item ---------------------------------------------------------------------
def measure_messages_per_item(services: Services, items_in_run: int) -> dict[str, Any]:
    run_id = "scale-packing"
    state = RunState(run_id=run_id, request=RunRequest(run_id=run_id, manifest="m.csv"))
    # Validated as a deployed run's would be: packed for its max_nodes (no fleet_nodes).
    summary = ManifestSummary(
        run_id=run_id, manifest="m.csv", rows=items_in_run, valid=items_in_run, invalid=0,
        chunk_count=1,
    )  # fmt: skip
    options: RunOptions = _with_packing(state, summary).request.options
    chunk = [
        ManifestItem(
            item_id=f"v{index:05d}",
            source=f"{services.store.url(services.settings.media_container, '')}v{index}.mp4",
            row=index + 2,
        )
        for index in range(CHUNK_SIZE)
    ]
    name = chunk_blob_name(run_id, 0)
    services.store.upload_bytes(
        services.settings.runs_container,
        name,
        "".join(item.model_dump_json() + "\n" for item in chunk),
    )
    controller.create_run_queues(services, run_id)
    sent = controller.enqueue_chunk(services, ChunkTask(run_id=run_id, chunk=name, options=options))
    counted = services.queues(run_id).approximate_count()
    return {
        "items_per_message_default_1m": options.mini_batch_size,
        "messages_per_item": round(counted / CHUNK_SIZE, 4),
        "messages_sent_for_one_chunk": sent,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--items-1m", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    figures: dict[str, Any] = {"large": args.large, "small": args.small}
    with fresh_local_session("bench-scale-") as services:
        figures.update(measure_polls(services, args.small, args.large))
        figures.update(measure_messages_per_item(services, args.items_1m))
    figures.update(measure_enqueue_history(args.items_1m))
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
