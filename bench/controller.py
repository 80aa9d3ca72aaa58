"""How well the controller keeps a fleet busy, measured on a local run of sleeping items.

    python -m bench.controller [--nodes 16] [--items-per-node 16] [--sleep-s 6] [--json]

A real local run as ``batchctl run`` makes it (the local app in this process, reached through
its HTTP API; Azurite, the run orchestrator through the local driver, the local compute
backend, ``--nodes`` worker processes running the node_image loop) over items whose task only
sleeps ``--sleep-s``. Each node runs one item's task at a time, like a GPU node, so the only
losses are the controller's and the loop's: start-up, queue round trips, load imbalance at
the tail, and the wait between the last record and teardown. It prints:

- ``makespan_s``: from the start of the run (manifest validation included) to the last
  item's terminal record;
- ``ideal_s``: items x sleep / nodes, what a perfect controller with instant nodes would take;
- ``efficiency``: ideal_s / makespan_s (goal >= 0.9);
- ``startup_s``: from the start of the run to the first item starting (validation, enqueue,
  plan, worker processes starting up: here 16 Python processes share this machine's cores,
  where real nodes each have their own, so it is longer than a node's own start-up);
- ``steady_efficiency``: ideal_s over the time from the first item's start to the last
  item's end: the controller's and the loop's losses without the one-off start-up;
- ``drain_to_teardown_s``: from the last terminal record to the end of teardown (goal <= the
  poll interval + 5 s);
- ``idle_node_fraction``: node-seconds in which a node's task was not running, between the
  first task's start and the last task's end, over all node-seconds in that window (goal
  <= 0.05).

Then a second, smaller run measures recovery from a lost node (``--no-recovery`` skips it):
one worker process is SIGKILLed once a quarter of the items are done, holding its messages.

- ``recovery_s``: from the kill to the last record of the items it held (those delivered
  again), finished on the other nodes;
- ``recovery_visibility_timeout_s``: that run's visibility timeout, the floor of
  ``recovery_s`` (the held messages stay hidden that long); ``recovery_over_visibility``:
  their ratio (goal: recovery within the visibility timeout + 20 s).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from batchctl.contracts import ItemStatus, RunOptions
from batchctl.local.session import LocalRunResult
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger
from bench.common import write_tiny_manifest
from node_image.worker.tasks import ItemInput, ItemOutput, TaskSetup

SLEEP_ENV = "BATCHCTL_BENCH_SLEEP_S"
RUN_ID = "bench-controller"


class SleepTask:
    """A task that holds its node for a fixed time and writes nothing but its metadata.

    Not thread-safe, so the loop runs one ``process`` at a time per node, as a GPU node does,
    while the next item's download and the last item's upload overlap it.
    """

    thread_safe: ClassVar[bool] = False

    def setup(self, setup: TaskSetup) -> None:
        self.seconds = float(os.environ.get(SLEEP_ENV, "4"))

    def process(self, item: ItemInput) -> ItemOutput:
        started = time.time()
        item.cancel.wait(self.seconds)
        item.cancel.raise_if_cancelled()
        # When the node was busy, for the idle-node figure (the record's timings also count
        # the wait for the node and the upload, which overlap other items).
        busy = {"task_started": started, "task_ended": time.time()}
        return ItemOutput(files={}, metadata=busy, inference_s=self.seconds)

    def close(self) -> None:
        pass


def busy_intervals(metadata: list[dict[str, Any]]) -> dict[str, list[tuple[datetime, datetime]]]:
    """Each node's (start, end) of every task call, from the items' metadata."""
    by_node: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for record in metadata:
        by_node[str(record["node"])].append(
            (
                datetime.fromtimestamp(float(record["task_started"]), UTC),
                datetime.fromtimestamp(float(record["task_ended"]), UTC),
            )
        )
    return by_node


def idle_fraction(
    intervals: dict[str, list[tuple[datetime, datetime]]], nodes: int
) -> tuple[float, datetime, datetime]:
    """Idle share of node-seconds in [first start, last end]; a node with no items is all idle."""
    spans = [span for node_spans in intervals.values() for span in node_spans]
    first = min(start for start, _ in spans)
    last = max(end for _, end in spans)
    window = (last - first).total_seconds()
    busy = sum((end - start).total_seconds() for start, end in spans)
    return max(0.0, 1.0 - busy / (nodes * window)) if window > 0 else 0.0, first, last


def median_gap(intervals: dict[str, list[tuple[datetime, datetime]]]) -> float:
    """The typical time a node waits between the end of one task and the start of the next."""
    gaps = [
        (following[0] - previous[1]).total_seconds()
        for spans in intervals.values()
        for previous, following in itertools.pairwise(sorted(spans))
    ]
    return statistics.median(gaps) if gaps else 0.0


@contextlib.contextmanager
def shared_storage() -> Iterator[tuple[StorageSettings, BlobStore, Ledger]]:
    """An Azurite this benchmark reads after the run: the run's own (``batchctl run``'s
    private one) stops with it. BATCHCTL_* point the run at it, as a user's own would."""
    from batchctl.local.azurite import azurite

    with azurite() as instance:
        previous = {name: os.environ.get(name) for name in instance.environment()}
        os.environ.update(instance.environment())
        settings = instance.storage_settings()
        ledger = Ledger(settings)
        try:
            yield settings, BlobStore(settings), ledger
        finally:
            ledger.close()
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run_through_app(
    manifest: Path, options: RunOptions, run_id: str, nodes: int, root: Path
) -> LocalRunResult:
    """The run as `batchctl run` makes it: the local app, reached through its HTTP API."""
    from batchctl.local.session import run_locally

    return run_locally(manifest, options, run_id=run_id, nodes=nodes, out_dir=root / "out")


def worker_pids(run_id: str) -> list[int]:
    """Live worker processes of the run (their environment names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"BATCHCTL_RUN_ID={run_id}".encode() in environ and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def measure_recovery(
    nodes: int = 4, items_per_node: int = 8, sleep_s: float = 1.0
) -> dict[str, Any]:
    """A local run in which one worker is SIGKILLed once a quarter of the items are done."""
    run_id = f"{RUN_ID}-recovery"
    items = nodes * items_per_node
    visibility_s = 10
    os.environ[SLEEP_ENV] = str(sleep_s)
    options = RunOptions(
        task=f"{__name__.replace('__main__', 'bench.controller')}:SleepTask",
        poll_interval_s=1,
        idle_exit_s=2,
        visibility_timeout_s=visibility_s,
        max_nodes=nodes,
    )
    killed: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-recovery-") as root_name,
        shared_storage() as (settings, store, ledger),
    ):
        root = Path(root_name)
        # The sleep task never reads its sources.
        manifest = write_tiny_manifest(root, items)
        stop = threading.Event()

        def kill_one_at_a_quarter() -> None:
            while not stop.is_set():
                try:
                    done = ledger.counts(run_id).done
                except Exception:  # the table or run does not exist yet
                    done = 0
                pids = worker_pids(run_id)
                if done >= items // 4 and pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed["at"] = datetime.now(UTC)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one_at_a_quarter, daemon=True)
        killer.start()
        run_through_app(manifest, options, run_id, nodes, root)
        stop.set()
        results = list(ledger.iter_results(run_id))
        attempts = {
            result.item_id: json.loads(store.download_bytes(settings.outputs_container, name)).get(
                "attempt", 1
            )
            for result in results
            for name in result.outputs
            if name.endswith("/metadata.json")
        }
    succeeded = sum(1 for result in results if result.status is ItemStatus.SUCCEEDED)
    if succeeded != items or "at" not in killed:
        raise SystemExit(f"recovery run incomplete: {succeeded}/{items} items, kill {killed}")
    again = [r for r in results if attempts.get(r.item_id, 1) > 1 and r.finished_at]
    last = max((r.finished_at for r in again if r.finished_at), default=killed["at"])
    recovery = (last - killed["at"]).total_seconds()
    return {
        "recovery_s": round(recovery, 2),
        "recovery_visibility_timeout_s": visibility_s,
        "recovery_over_visibility": round(recovery / visibility_s, 2),
        "recovery_items_redelivered": len(again),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--items-per-node", type=int, default=16)
    parser.add_argument("--sleep-s", type=float, default=6.0)
    parser.add_argument("--poll-interval-s", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--keep", type=Path, help="work here and keep the logs (a new folder)")
    parser.add_argument(
        "--timeline", type=Path, help="also write each node's task spans (s from the run start)"
    )
    parser.add_argument(
        "--no-recovery", action="store_true", help="skip the run that kills a node midway"
    )
    args = parser.parse_args()

    items = args.nodes * args.items_per_node
    # Worker processes inherit this process's environment.
    os.environ[SLEEP_ENV] = str(args.sleep_s)
    options = RunOptions(
        task=f"{__name__.replace('__main__', 'bench.controller')}:SleepTask",
        poll_interval_s=args.poll_interval_s,
        idle_exit_s=10,
        max_nodes=args.nodes,
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-controller-") as scratch,
        shared_storage() as (settings, store, ledger),
    ):
        root = args.keep or Path(scratch)
        # The sleep task never reads its sources.
        manifest = write_tiny_manifest(root, items)
        outcome = run_through_app(manifest, options, RUN_ID, args.nodes, root)
        results = list(ledger.iter_results(RUN_ID))
        metadata = [
            json.loads(store.download_bytes(settings.outputs_container, name))
            for result in results
            for name in result.outputs
            if name.endswith("/metadata.json")
        ]
    report = outcome.report
    succeeded = sum(1 for result in results if result.status is ItemStatus.SUCCEEDED)
    if succeeded != items:
        raise SystemExit(f"bench run incomplete: {succeeded}/{items} items ({report.message})")
    intervals = busy_intervals(metadata)
    idle, first_start, _ = idle_fraction(intervals, args.nodes)
    last_end = max(result.finished_at or report.started_at for result in results)
    makespan = (last_end - report.started_at).total_seconds()
    ideal = items * args.sleep_s / args.nodes
    figures = {
        "nodes": args.nodes,
        "items": items,
        "sleep_s": args.sleep_s,
        "poll_interval_s": args.poll_interval_s,
        "makespan_s": round(makespan, 2),
        "ideal_s": round(ideal, 2),
        "efficiency": round(ideal / makespan, 3),
        "startup_s": round((first_start - report.started_at).total_seconds(), 2),
        "steady_efficiency": round(ideal / (last_end - first_start).total_seconds(), 3),
        "drain_to_teardown_s": round((report.finished_at - last_end).total_seconds(), 2),
        "idle_node_fraction": round(idle, 3),
        "nodes_used": len(intervals),
        "items_per_node_min_max": [
            min(len(spans) for spans in intervals.values()),
            max(len(spans) for spans in intervals.values()),
        ],
        "median_gap_between_tasks_s": round(median_gap(intervals), 3),
    }
    if args.timeline:
        args.timeline.write_text(
            json.dumps(
                {
                    node: [
                        [
                            round((start - report.started_at).total_seconds(), 2),
                            round((end - report.started_at).total_seconds(), 2),
                        ]
                        for start, end in sorted(spans)
                    ]
                    for node, spans in sorted(intervals.items())
                },
                indent=1,
            )
        )
    if not args.no_recovery:
        figures.update(measure_recovery())
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
