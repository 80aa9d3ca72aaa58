"""``batchctl plan``: size the fleet for a batch before running it.

    batchctl plan (--manifest FILE | --items N) --sec-per-item S [--deadline 2h]
                  [--startup 5m] [--vm-size SIZE] [--low-priority | --dedicated]
                  [--quota-cores N] [--max-nodes N] [--price USD] [--simulate RUNS] [--json]
    batchctl plan --manifest FILE --sec-per-video-second X [--sec-per-item S]
                  [--segment-seconds S] [...]

Prints the plan as a table, or with ``--json`` one JSON line (clusters, nodes_per_cluster,
total_nodes, est_makespan_s, est_cost, binding_limit, and the inputs and notes behind them).

Work whose cost scales with the video's length (``--task transform``, features at a fixed
fps) is planned by video length with ``--sec-per-video-second X`` (node-seconds per second
of video, as ``batchctl trial`` measures it) over a manifest with a ``duration_s`` column
(seconds, or like 5m12s; an empty cell counts as the mean of the others, anything else that
is no duration is refused with its row). ``--sec-per-item`` then adds a fixed overhead to
every piece of work. ``--segment-seconds S`` plans long videos split as the run splits them.
The plan says when its longest piece of work, not the total, sets the makespan (the
straggler) and suggests ``--segment-seconds`` (see ``batchctl.planning``).
Nothing here touches Azure: the quota is what ``--quota-cores`` says, and prices are the
indicative table's unless ``--price`` is given. The sizing itself is ``batchctl.planning``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from batchctl.commands.validate import (
    BadInputError,
    duration_argument,
    existing_file_argument,
    field_argument,
    number_argument,
    vm_size_argument,
)
from batchctl.contracts import RunOptions
from batchctl.planning import (
    DEFAULT_HEADROOM,
    DEFAULT_MAX_CLUSTERS,
    DEFAULT_STARTUP_S,
    DURATION_COLUMN,
    FleetSize,
    MediaTally,
    MediaWork,
    PlanError,
    PlanInputs,
    find_vm_size,
    format_duration,
    parse_media_duration,
    size_fleet,
)
from batchctl.simulation import SimulationInputs, simulate

# An assumption, not a measurement: about one eviction per node every ten hours.
DEFAULT_LOW_PRIORITY_PREEMPTIONS_PER_NODE_HOUR = 0.1

_DEFAULTS = RunOptions()


def count_manifest_rows(path: Path) -> int:
    """Data records in a CSV manifest (header excluded, blank rows skipped), streaming.

    A plan only needs the size of the work; the full validation (allowlist, ids, row
    errors) happens when the run starts.
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return 0
        return sum(1 for row in reader if any(cell.strip() for cell in row))


def read_manifest_durations(path: Path, segment_s: float | None) -> MediaWork | None:
    """The manifest's work in seconds of video from its ``duration_s`` column, streaming;
    None when it has no such column.

    Rows count as the run's reader counts them (header row 1, blank rows skipped). An empty
    cell counts as the mean of the others; a cell that is no duration is a BadInputError
    naming the file, row, line and field (a typo must not change the plan silently).
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return None
        names = [name.strip().casefold() for name in header]
        if DURATION_COLUMN not in names:
            return None
        column = names.index(DURATION_COLUMN)
        tally = MediaTally(segment_s)
        row, line = 1, reader.line_num + 1  # the physical line the next record starts on
        for record in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            row += 1
            cell = record[column] if column < len(record) else ""
            try:
                seconds = parse_media_duration(cell)
            except ValueError as error:
                raise BadInputError(
                    f"{path}: row {row} (line {start}), field {DURATION_COLUMN!r}: {error}",
                    "--manifest",
                ) from None
            if seconds is None:
                tally.add_unknown()
            else:
                tally.add(seconds)
    try:
        return tally.work()
    except ValueError as error:
        raise BadInputError(
            f"{path}: no {DURATION_COLUMN} to plan by: {error}", "--manifest"
        ) from None


# Bounds on the work a plan can describe: beyond them the numbers stop meaning anything, and
# the simulation (which plays every item) would run for hours.
MAX_ITEMS = 1_000_000_000
MAX_SIMULATED_ITEMS = 5_000_000  # items x --simulate runs: a few seconds of simulation
MAX_SIMULATION_RUNS = 10_000
MAX_SIGMA = 5.0  # lognormal shape; past this one item's duration overflows a float

positive_float = number_argument(whole=False, gt=0)
positive_int = number_argument(whole=True, ge=1)
non_negative_int = number_argument(whole=True, ge=0)


def register(subparsers: Any) -> None:
    """Add ``plan`` to the ``batchctl`` command line."""
    parser = subparsers.add_parser(
        "plan",
        help="size the fleet: clusters x nodes, expected makespan and cost",
        description=__doc__,
    )
    work = parser.add_mutually_exclusive_group(required=True)
    work.add_argument(
        "--manifest", type=existing_file_argument, help="CSV manifest whose data rows are counted"
    )
    work.add_argument(
        "--items",
        type=number_argument(whole=True, ge=0, le=MAX_ITEMS),
        help=f"number of items (videos), 0..{MAX_ITEMS:,}",
    )
    cost = parser.add_argument_group("cost of the work (at least one)")
    cost.add_argument(
        "--sec-per-item",
        type=number_argument(whole=False, ge=0),
        help="seconds one node spends on one item, > 0 (measure with a trial run); with "
        "--sec-per-video-second a fixed overhead per piece of work, >= 0",
    )
    cost.add_argument(
        "--sec-per-video-second",
        type=positive_float,
        help="node-seconds per second of video, > 0 (a trial measures it): plans by the "
        f"manifest's {DURATION_COLUMN} column",
    )
    parser.add_argument(
        "--segment-seconds",
        type=field_argument(RunOptions, "segment_seconds"),
        default=_DEFAULTS.segment_seconds,
        help="plan videos longer than this many seconds as the segments a run with "
        "--segment-seconds splits them into (1..86400; default: never split)",
    )
    add_sizing_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.set_defaults(handler=run)


def add_sizing_arguments(parser: argparse.ArgumentParser) -> None:
    """The fleet-sizing flags, shared with ``batchctl trial`` so both plan the same way."""
    group = parser.add_argument_group("fleet sizing")
    group.add_argument(
        "--deadline",
        dest="plan_deadline",
        type=duration_argument(),
        help="wall-clock budget for the whole batch: 90m, 2h, 1h30m (default: none)",
    )
    group.add_argument(
        "--startup",
        type=duration_argument(allow_zero=True),
        default=DEFAULT_STARTUP_S,
        help="node start-up in seconds or like 5m: allocation, image pull, model load",
    )
    group.add_argument(
        "--headroom",
        type=number_argument(whole=False, ge=0, lt=1),
        default=DEFAULT_HEADROOM,
        help="share of the deadline held back for preemption and stragglers, in [0, 1)",
    )
    group.add_argument(
        "--vm-size",
        type=vm_size_argument,
        default=_DEFAULTS.vm_size,
        help="Azure VM size of a node",
    )
    tier = group.add_mutually_exclusive_group()
    tier.add_argument(
        "--low-priority",
        dest="low_priority",
        action="store_true",
        default=_DEFAULTS.low_priority,
        help="low-priority (preemptible) nodes (the default)",
    )
    tier.add_argument(
        "--dedicated", dest="low_priority", action="store_false", help="dedicated nodes"
    )
    group.add_argument(
        "--quota-cores",
        type=non_negative_int,
        help="free regional quota, cores (default: no quota limit)",
    )
    group.add_argument(
        "--cores-per-vm",
        type=number_argument(whole=True, ge=1, le=1024),
        help="cores of one VM, 1..1024 (default: known sizes' own)",
    )
    group.add_argument(
        "--max-nodes",
        type=field_argument(RunOptions, "max_nodes"),
        default=_DEFAULTS.max_nodes,
        help="nodes at most, over all clusters (1..10000)",
    )
    group.add_argument(
        "--max-clusters",
        type=number_argument(whole=True, ge=1, le=999),
        default=DEFAULT_MAX_CLUSTERS,
        help="clusters at most (1..999)",
    )
    group.add_argument(
        "--price",
        type=number_argument(whole=False, ge=0),
        help="USD per node-hour, >= 0 (default: the indicative table's)",
    )
    group.add_argument(
        "--simulate",
        type=number_argument(whole=True, ge=0, le=MAX_SIMULATION_RUNS),
        default=0,
        metavar="RUNS",
        help="also simulate RUNS seeded runs with heavy-tailed durations and preemption "
        f"(0..{MAX_SIMULATION_RUNS:,}; RUNS x items at most {MAX_SIMULATED_ITEMS:,})",
    )
    group.add_argument(
        "--preemption-rate",
        type=number_argument(whole=False, ge=0),
        help=(
            "preemptions per node-hour in the simulation, >= 0 (default "
            f"{DEFAULT_LOW_PRIORITY_PREEMPTIONS_PER_NODE_HOUR} for low priority, an "
            "assumption; 0 for dedicated)"
        ),
    )
    group.add_argument(
        "--sigma",
        type=number_argument(whole=False, ge=0, le=MAX_SIGMA),
        default=0.5,
        help=f"lognormal shape of item durations in the simulation (0..{MAX_SIGMA:g})",
    )
    group.add_argument(
        "--seed",
        type=number_argument(whole=True, ge=0, le=2**63 - 1),
        default=0,
        help="first seed of the simulation (>= 0)",
    )


def _simulated(
    args: argparse.Namespace, items: int, sec_per_item: float, nodes: int
) -> dict[str, float]:
    rate = args.preemption_rate
    if rate is None:
        rate = DEFAULT_LOW_PRIORITY_PREEMPTIONS_PER_NODE_HOUR if args.low_priority else 0.0
    makespans = [
        simulate(
            SimulationInputs(
                items=items,
                nodes=nodes,
                sec_per_item=sec_per_item,
                startup_s=args.startup,
                sigma=args.sigma,
                preemptions_per_node_hour=rate,
                seed=args.seed + run,
            )
        ).makespan_s
        for run in range(args.simulate)
    ]
    ordered = sorted(makespans)
    return {
        "sim_runs": float(len(ordered)),
        "sim_preemptions_per_node_hour": rate,
        "sim_makespan_p50_s": round(statistics.median(ordered), 1),
        "sim_makespan_p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        "sim_makespan_max_s": round(ordered[-1], 1),
    }


def _summary(args: argparse.Namespace, inputs: PlanInputs, fleet: FleetSize) -> dict[str, Any]:
    meets = None
    if inputs.deadline_s is not None:
        meets = fleet.est_makespan_s <= inputs.deadline_s
    media = inputs.media
    by_video: dict[str, Any] = {"model": "per_item"}
    if media is not None:
        by_video = {
            "model": "per_video_second",
            "sec_per_video_s": inputs.sec_per_video_s,
            "media_s": round(media.media_s, 3),
            "segment_s": media.segment_s,
            "pieces": media.pieces,
            "longest_piece_s": fleet.longest_piece_s,
            "estimated_durations": media.estimated,
            "straggler": fleet.straggler,
        }
    return {
        **by_video,
        "items": inputs.items,
        "sec_per_item": inputs.sec_per_item,
        "startup_s": inputs.startup_s,
        "deadline_s": inputs.deadline_s,
        "vm_size": inputs.vm_size,
        "low_priority": inputs.low_priority,
        "price_per_hour": inputs.price_per_hour,
        "price_source": "given" if args.price is not None else "indicative",
        "clusters": len(fleet.nodes_per_cluster),
        "nodes_per_cluster": list(fleet.nodes_per_cluster),
        "total_nodes": fleet.total_nodes,
        "est_makespan_s": fleet.est_makespan_s,
        "est_cost": round(fleet.est_cost, 2),
        "binding_limit": fleet.binding_limit,
        "meets_deadline": meets,
        "notes": list(fleet.notes),
    }


def _print_table(summary: dict[str, Any]) -> None:
    tier = "low priority" if summary["low_priority"] else "dedicated"
    deadline = summary["deadline_s"]
    work = f"{summary['items']:,} x {summary['sec_per_item']:g} s"
    if summary["model"] == "per_video_second":
        work = (
            f"{summary['items']:,} items, {format_duration(summary['media_s'])} of video x "
            f"{summary['sec_per_video_s']:g} s per video second"
        )
        if summary["pieces"] != summary["items"]:
            work += f" ({summary['pieces']:,} pieces)"
    rows = [
        ("items", work),
        ("vm size", f"{summary['vm_size']} ({tier})"),
        ("deadline", format_duration(deadline) if deadline is not None else "none"),
        ("clusters", str(summary["clusters"])),
        ("nodes per cluster", ", ".join(str(n) for n in summary["nodes_per_cluster"]) or "-"),
        ("total nodes", str(summary["total_nodes"])),
        (
            "est. makespan",
            f"{format_duration(summary['est_makespan_s'])} ({summary['est_makespan_s']:g} s)",
        ),
        (
            "est. cost",
            f"${summary['est_cost']:,.2f} at ${summary['price_per_hour']:g}/node-hour "
            f"({summary['price_source']})",
        ),
        ("binding limit", summary["binding_limit"]),
    ]
    if "sim_makespan_p50_s" in summary:
        rows.append(
            (
                "simulated makespan",
                f"p50 {format_duration(summary['sim_makespan_p50_s'])}, "
                f"p90 {format_duration(summary['sim_makespan_p90_s'])} "
                f"({int(summary['sim_runs'])} runs)",
            )
        )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if summary["notes"]:
        print("notes:")
        for note in summary["notes"]:
            print(f"  - {note}")


def plan_summary(
    args: argparse.Namespace,
    items: int,
    sec_per_item: float,
    *,
    media: MediaWork | None = None,
    sec_per_video_s: float | None = None,
) -> dict[str, Any]:
    """The plan for ``items`` at ``sec_per_item`` under the sizing flags; PlanError if none.

    With ``media`` and ``sec_per_video_s``, by video length (``sec_per_item`` is then the
    overhead per piece, 0 for none).
    """
    known = find_vm_size(args.vm_size)
    cores = args.cores_per_vm or (known.cores if known is not None else None)
    if cores is None and args.quota_cores is not None:
        raise PlanError(
            f"unknown VM size {args.vm_size!r}: pass --cores-per-vm to apply --quota-cores"
        )
    price = args.price
    if price is None:
        price = known.price_per_hour(low_priority=args.low_priority) if known else 0.0
    try:
        inputs = PlanInputs(
            items=items,
            sec_per_item=sec_per_item,
            startup_s=args.startup,
            deadline_s=args.plan_deadline,
            headroom=args.headroom,
            vm_size=args.vm_size,
            cores_per_vm=cores or 1,
            low_priority=args.low_priority,
            price_per_hour=price,
            quota_cores=args.quota_cores,
            max_nodes=args.max_nodes,
            max_clusters=args.max_clusters,
            sec_per_video_s=sec_per_video_s,
            media=media,
        )
        fleet = size_fleet(inputs)
    except ValueError as error:  # PlanError is a ValueError too
        raise PlanError(str(error)) from error
    summary = _summary(args, inputs, fleet)
    if known is None and args.price is None:
        summary["notes"].append(f"no indicative price for {args.vm_size}: pass --price")
    if args.simulate and fleet.total_nodes:
        if media is not None:
            # The simulation draws items of one mean length: it would hide the straggler
            # the per-video-second plan is there to show.
            summary["notes"].append(
                "--simulate is not run for a plan by video length: it plays items of one "
                "mean duration, not the manifest's"
            )
        else:
            summary.update(_simulated(args, items, sec_per_item, fleet.total_nodes))
    return summary


def print_plan(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
    else:
        _print_table(summary)


def check_simulation_size(args: argparse.Namespace, items: int) -> None:
    """BadInputError when --simulate would play more items than a plan should wait for."""
    if args.simulate and items * args.simulate > MAX_SIMULATED_ITEMS:
        raise BadInputError(
            f"--simulate {args.simulate} x {items:,} items is more than "
            f"{MAX_SIMULATED_ITEMS:,} simulated items: simulate fewer runs",
            "--simulate",
        )


def run(args: argparse.Namespace) -> int:
    """Handle ``batchctl plan``; 0 on success, 2 when the inputs allow no plan, 3 for bad
    input (an unreadable manifest included)."""
    if args.sec_per_item is None and args.sec_per_video_second is None:
        raise BadInputError(
            "give --sec-per-item or --sec-per-video-second (or both)", "--sec-per-item"
        )
    if args.sec_per_video_second is None and args.sec_per_item == 0:
        raise BadInputError("must be > 0 (it is the whole cost of an item)", "--sec-per-item")
    if args.sec_per_video_second is not None and args.manifest is None:
        raise BadInputError(
            f"needs --manifest with a {DURATION_COLUMN} column (--items gives no lengths)",
            "--sec-per-video-second",
        )
    media: MediaWork | None = None
    try:
        items = args.items if args.manifest is None else count_manifest_rows(args.manifest)
        if args.sec_per_video_second is not None:
            media = read_manifest_durations(args.manifest, args.segment_seconds)
    except (OSError, csv.Error, UnicodeError) as error:
        raise BadInputError(f"cannot read the manifest: {error}", "--manifest") from None
    if args.sec_per_video_second is not None and media is None:
        raise BadInputError(
            f"{args.manifest} has no {DURATION_COLUMN} column to plan by video length",
            "--sec-per-video-second",
        )
    check_simulation_size(args, items)
    try:
        if media is not None:
            summary = plan_summary(
                args,
                items,
                args.sec_per_item or 0.0,
                media=media,
                sec_per_video_s=args.sec_per_video_second,
            )
        else:
            summary = plan_summary(args, items, args.sec_per_item)
    except PlanError as error:
        print(f"batchctl plan: {error}", file=sys.stderr)
        return 2
    print_plan(summary, as_json=args.json)
    return 0
