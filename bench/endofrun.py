"""The end of a run, every activity timed alone, on a ledger of ``--items`` records.

    python -m bench.endofrun [--items 100000] [--not-run 0.1] [--json]

On one fresh Azurite: a manifest of ``--items`` rows is validated into chunks by the
controller's own validation; the ledger gets a terminal record for all but ``--not-run`` of
them (succeeded, some failed, as nodes write them: through the ledger's batched, counted
transactions), so the run ends as a cancelled run does, with items left. Then each activity
of the end of a run is called as the orchestrator calls it (its JSON payload, through the
same activity functions the Functions app registers), one at a time:

- ``teardown``; ``end_shard_groups``;
- ``record_unfinished`` and ``analyse_shards``, once per group of shards (each group's call
  timed: the orchestrator runs the groups side by side, so the slowest group is the step's
  length there, and the sum is what one core spends);
- ``write_report`` (merging the groups' parts) and, for comparison, ``write_brief_report``;
- ``one_pass_report``, measured side by side: the report gathered the old way, every record
  read in the one report activity (write_report with no part to merge).

The same is measured at a tenth of the size (``--small``) in the same run, so that each
activity's fixed cost (the report's plots, a few blob reads) is told from its cost per item.
Printed per activity: seconds, seconds per 1,000 items, and the extrapolation to 1M items
(the fixed part plus the part per item, fitted through both sizes; the number of groups is
at most 8 at any size, so a group's call grows with the run), with an upper bound (every
second at ``--items`` taken as a cost per item: a busy machine's noisy small size cannot
pull it down), the timeout (host.json's ``functionTimeout``, read from the file) held to
the upper bound. ``end_s_per_1000``
is the whole end on one core (every group one after another; goal <= 0.2 s per 1,000 items),
``end_critical_path_s_per_1000`` with the groups side by side. Not timed: the merge (it
needs real feature outputs: bench/transform.py) and the sweeper's close, which runs these
same functions a step per pass.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from batchctl import controller
from batchctl.activity_names import Activity
from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    NotRunReason,
    RunPhase,
    RunRequest,
    RunState,
    StageTimings,
)
from batchctl.services import Services
from batchctl.storage.ledger import shards_for_fleet

RUN_ID = "bench-end"
ONE_MILLION = 1_000_000
HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"


def function_timeout_s(host_json: Path = HOST_JSON) -> float:
    """host.json's functionTimeout ("hh:mm:ss") in seconds: the limit each activity has."""
    value = json.loads(host_json.read_text())["functionTimeout"]
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d)", value)
    if match is None:
        raise ValueError(f"{host_json}: functionTimeout {value!r} is not hh:mm:ss")
    hours, minutes, seconds = (int(part) for part in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def prepare_run(
    services: Services, run_id: str, items: int, not_run: float, seed: int = 0
) -> RunState:
    """A validated run of ``items`` rows, all but ``not_run`` of them with a record."""
    settings = services.settings
    media = services.store.url(settings.media_container, "")
    rows = "".join(f"v{index:07d},{media}v{index}.mp4\n" for index in range(items))
    services.store.ensure_containers(settings.manifests_container)
    services.store.upload_bytes(
        settings.manifests_container, f"{run_id}.csv", ("id,video\n" + rows).encode()
    )
    request = RunRequest(run_id=run_id, manifest=f"{settings.manifests_container}/{run_id}.csv")
    # The shards of a run in Azure (a local session's run gets fewer): fixed first, so the
    # validation keeps them, and the end's groups are those a deployed run's end has.
    services.ledger.fix_shard_count(run_id, shards_for_fleet(request.options.max_nodes))
    summary = controller.validate_manifest(services, request)
    assert summary.valid == items, summary
    controller.create_run_queues(services, run_id)
    started = datetime.now(UTC) - timedelta(hours=1)
    rng = random.Random(seed)
    recorded = sorted(rng.sample(range(items), items - round(items * not_run)))
    services.ledger.record_absent(_records(run_id, recorded, started, media, rng))
    return RunState(
        run_id=run_id, request=request, stage="monitor", summary=summary, started_at=started
    )


def _records(
    run_id: str, indices: list[int], started: datetime, media: str, rng: random.Random
) -> Iterator[ItemResult]:
    """Records shaped as nodes write them: outputs, timings, a node, a finish time."""
    for index in indices:
        item_id = f"v{index:07d}"
        prefix = f"{run_id}/items/{item_id}"
        failed = rng.random() < 0.02
        yield ItemResult(
            run_id=run_id,
            item_id=item_id,
            status=ItemStatus.FAILED if failed else ItemStatus.SUCCEEDED,
            source=f"{media}v{index}.mp4",
            outputs=[] if failed else [f"{prefix}/features.npz", f"{prefix}/metadata.json"],
            error=ItemError(error_class="DecodeError", message="bad", permanent=True, attempts=1)
            if failed
            else None,
            timings=StageTimings(
                download_s=0.4, decode_s=1.1, inference_s=2.0, upload_s=0.1, total_s=3.6
            ),
            node=f"node-{index % 100}:{1000 + index % 7}",
            finished_at=started + timedelta(seconds=60 + index * 3000 / max(len(indices), 1)),
            media_s=20.0,
        )


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def measure(services: Services, state: RunState) -> dict[str, Any]:
    """Each end-of-run activity, called as the orchestrator calls it, timed alone."""
    from activities import make_activities

    activities = make_activities(lambda: services)
    run_id = state.run_id
    state_json = state.model_dump(mode="json")
    reason = NotRunReason.CANCELLED.value
    seconds: dict[str, float] = {}
    groups_s: dict[str, list[float]] = {}

    seconds["teardown"], _ = _timed(lambda: activities[Activity.TEARDOWN](run_id))
    seconds["end_shard_groups"], groups = _timed(
        lambda: activities[Activity.END_SHARD_GROUPS](run_id)
    )
    written = 0
    groups_s["record_unfinished"] = []
    for group in groups:
        payload = {"state": state_json, "reason": reason, "shards": group}
        took, count = _timed(partial(activities[Activity.RECORD_UNFINISHED], payload))
        groups_s["record_unfinished"].append(took)
        written += count
    finished_at = datetime.now(UTC).isoformat()
    groups_s["analyse_shards"] = []
    for group in groups:
        payload = {"state": state_json, "shards": group, "finished_at": finished_at}
        took, _ = _timed(partial(activities[Activity.ANALYSE_SHARDS], payload))
        groups_s["analyse_shards"].append(took)
    ending = {"state": state_json, "phase": RunPhase.CANCELLED.value, "finished_at": finished_at}
    seconds["write_report"], report = _timed(
        lambda: activities[Activity.WRITE_REPORT]({**ending, "message": "bench", "marks": {}})
    )
    seconds["write_brief_report"], _ = _timed(
        lambda: activities[Activity.WRITE_BRIEF_REPORT](
            {**ending, "message": "bench", "problem": "timed for comparison"}
        )
    )
    # The old way, side by side: one report activity reading every record itself (no part
    # to merge: a part is trusted only for the end it was gathered for).
    other_end = datetime.now(UTC)
    seconds["one_pass_report"], _ = _timed(
        lambda: controller.write_report(services, state, RunPhase.CANCELLED, "bench", other_end)
    )
    return {
        "seconds": seconds,
        "groups_s": groups_s,
        "groups": len(groups),
        "not_run_written": written,
        "report_counts": [report["succeeded"], report["failed"], report["not_run"]],
    }


def _step_seconds(measured: dict[str, Any]) -> dict[str, float]:
    """Every activity's seconds, a group activity as its largest group's call and as all
    its groups' calls together."""
    steps = dict(measured["seconds"])
    for name, times in measured["groups_s"].items():
        steps[f"{name}_per_group"] = max(times)
        steps[f"{name}_all_groups"] = sum(times)
    return steps


def _fit(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """(fixed seconds, seconds per item) through two sizes; the slope never below 0 (a
    fixed cost measured a little slower at the small size is still fixed)."""
    (n_small, t_small), (n_large, t_large) = small, large
    slope = max((t_large - t_small) / (n_large - n_small), 0.0)
    return max(t_large - slope * n_large, 0.0), slope


SINGLE_STEPS = ("teardown", "end_shard_groups", "write_report")


def _end_seconds(steps: dict[str, float], *, side_by_side: bool) -> float:
    groups = "per_group" if side_by_side else "all_groups"
    return sum(steps[name] for name in SINGLE_STEPS) + sum(
        steps[f"{name}_{groups}"] for name in ("record_unfinished", "analyse_shards")
    )


def figures(
    small: tuple[int, dict[str, Any]], large: tuple[int, dict[str, Any]], timeout_s: float
) -> dict[str, Any]:
    """Seconds and seconds per 1,000 items of every activity at the large size, and its
    extrapolation to 1M items through both sizes (a fixed part and a part per item)."""
    (n_small, measured_small), (items, measured) = small, large
    steps_small, steps = _step_seconds(measured_small), _step_seconds(measured)
    per_activity: dict[str, dict[str, float]] = {}
    for name, took in steps.items():
        fixed, per_item = _fit((n_small, steps_small[name]), (items, took))
        at_1m = fixed + per_item * ONE_MILLION
        # Every second of the large size taken as a cost per item (or the fit, where a small
        # size measured proportionally faster makes that larger): a bound that a noisy
        # small size (a busy machine) cannot pull down. The timeout is held to it.
        bound_1m = max(took * ONE_MILLION / items, at_1m)
        row = {
            "s": round(took, 3),
            "s_per_1000": round(took / items * 1000, 4),
            "s_small": round(steps_small[name], 3),
            "fixed_s": round(fixed, 3),
            "extrapolated_1m_s": round(at_1m, 1),
            "upper_bound_1m_s": round(bound_1m, 1),
        }
        if not name.endswith("_all_groups"):  # one activity: the timeout applies to it
            row["share_of_timeout_1m"] = round(bound_1m / timeout_s, 4)
        per_activity[name] = row
    one_core = _end_seconds(steps, side_by_side=False)
    critical = _end_seconds(steps, side_by_side=True)
    end_fixed, end_per_item = _fit(
        (n_small, _end_seconds(steps_small, side_by_side=False)), (items, one_core)
    )
    end_steps = [*SINGLE_STEPS, "record_unfinished_per_group", "analyse_shards_per_group"]
    largest = max(
        (per_activity[name] for name in end_steps), key=lambda row: row["upper_bound_1m_s"]
    )
    return {
        "items": items,
        "items_small": n_small,
        "groups": measured["groups"],
        "not_run_written": measured["not_run_written"],
        "report_counts": measured["report_counts"],
        "function_timeout_s": timeout_s,
        "activities": per_activity,
        "end_s": round(one_core, 3),
        "end_s_per_1000": round(one_core / items * 1000, 4),
        "end_critical_path_s_per_1000": round(critical / items * 1000, 4),
        "end_extrapolated_1m_s": round(end_fixed + end_per_item * ONE_MILLION, 1),
        "end_upper_bound_1m_s": round(one_core * ONE_MILLION / items, 1),
        "largest_activity_upper_bound_1m_s": largest["upper_bound_1m_s"],
        "largest_activity_share_of_timeout_1m": largest["share_of_timeout_1m"],
        "one_pass_report_over_write_report": round(
            steps["one_pass_report"] / steps["write_report"], 2
        ),
        "goal_end_s_per_1000": 0.2,
    }


def run(items: int, not_run: float, small: int | None = None) -> dict[str, Any]:
    """Both sizes (``small``: a tenth of ``items`` unless given) on one fresh Azurite."""
    small = small if small is not None else max(items // 10, 1)
    if not 0 < small < items:
        raise ValueError(f"the small size must lie between 0 and {items}, not {small}")
    from bench.common import fresh_local_session

    with fresh_local_session("bench-end-") as services:
        sizes = []
        for run_id, count in ((f"{RUN_ID}-small", small), (RUN_ID, items)):
            took, state = _timed(partial(prepare_run, services, run_id, count, not_run))
            print(f"  {count} rows validated, ledger filled in {took:.1f} s", flush=True)
            sizes.append((count, measure(services, state)))
    return figures(sizes[0], sizes[1], function_timeout_s())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument(
        "--not-run", type=float, default=0.1, help="share of the items left without a record"
    )
    parser.add_argument(
        "--small", type=int, default=None, help="the second size, for the fixed costs (items/10)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.items < 2 or not 0 <= args.not_run < 1:
        parser.error("--items must be at least 2 and --not-run in [0, 1)")
    result = run(args.items, args.not_run, args.small)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, row in result.pop("activities").items():
        share = row.get("share_of_timeout_1m")
        print(
            f"{name:>32}: {row['s']:8.3f} s  {row['s_per_1000']:.4f} s/1000  "
            f"1M: {row['extrapolated_1m_s']:7.1f} s, at most {row['upper_bound_1m_s']:7.1f} s"
            + (f" ({share:.1%} of the timeout)" if share is not None else "")
        )
    for key, value in result.items():
        print(f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
