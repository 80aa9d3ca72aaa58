"""``batchctl plan``: size the fleet for a batch before running it.

    batchctl plan (--manifest FILE | --items N) --sec-per-item S [--deadline 2h]
                  [--startup 5m] [--vm-size SIZE] [--low-priority | --dedicated]
                  [--quota-cores N] [--max-nodes N] [--price USD] [--simulate RUNS]
                  [--allow-late] [--json]
    batchctl plan --manifest FILE --sec-per-video-second X [--sec-per-item S]
                  [--segment-seconds S] [...]

Prints the plan as a table, or with ``--json`` one JSON line (clusters, nodes_per_cluster,
total_nodes, est_makespan_s, est_cost, binding_limit, and the inputs and notes behind them).

A plan that misses ``--deadline`` (the caps: ``--max-nodes``, ``--max-clusters``,
``--quota-cores``, allow too few nodes, or no fleet size can) is still printed, then refused:
one line on stderr says what meeting the deadline takes (nodes, vCPUs of which quota family,
low-priority or dedicated, the cost; the quota given, if any) and what to change, and the
exit code is 3, the request not fitting its caps. ``--allow-late`` accepts the plan: exit 0,
the line printed as a warning. ``--json`` carries the same (meets_deadline,
nodes_to_meet_deadline, vcpus_to_meet_deadline, quota_family, quota_cores,
cost_to_meet_deadline_usd, allow_late, deadline_warning).

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
    EXIT_BAD_INPUT,
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
    MAX_NODES_PER_CLUSTER,
    FleetSize,
    MediaTally,
    MediaWork,
    PlanError,
    PlanInputs,
    VmSize,
    find_vm_size,
    fleet_cost_usd,
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
        "--allow-late",
        action="store_true",
        help="accept a plan that misses --deadline: print why as a warning instead of "
        f"exiting {EXIT_BAD_INPUT}",
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


def _field_le(name: str) -> int:
    """RunOptions' upper bound on a field: the most its flag accepts."""
    for item in RunOptions.model_fields[name].metadata:
        bound = getattr(item, "le", None)
        if bound is not None:
            return int(bound)
    raise AssertionError(f"RunOptions.{name} has no upper bound")


# The most nodes one run may ask for (--max-nodes' bound): past it the advice is to split.
MAX_RUN_NODES = _field_le("max_nodes")

# How the plan's binding limit reads in the missed deadline's line: the flag that capped it.
_CAPPED_BY = {
    "max_nodes": "capped by --max-nodes",
    "max_clusters": "capped by --max-clusters",
    "quota": "capped by --quota-cores",
    "items": "a node for every piece of work",
}


def _family_label(size: VmSize | None, vm_size: str) -> str:
    """The quota family as its usage line in the portal names it, less the boilerplate:
    'standardNCASv3_T4Family' -> 'NCASv3_T4' (or the size itself when it is not known)."""
    if size is None:
        return vm_size
    return size.family.removeprefix("standard").removesuffix("Family") or size.family


def _deadline_fields(
    args: argparse.Namespace, inputs: PlanInputs, fleet: FleetSize, meets: bool | None
) -> dict[str, Any]:
    """What meeting the deadline takes (the fewest nodes the plan's own policy sizes for it,
    headroom held back; their vCPUs, quota family and cost) and, when the plan misses it, the
    one line that says so (``deadline_warning``). All None without a deadline."""
    known = find_vm_size(inputs.vm_size)
    needed = fleet.needed_nodes if inputs.deadline_s is not None else None
    # Without a known size or --cores-per-vm the plan counts 1 core a VM only to split nodes:
    # a vCPU figure from it would understate the quota by the real cores per VM.
    cores_known = args.cores_per_vm is not None or known is not None
    vcpus = needed * inputs.cores_per_vm if needed is not None and cores_known else None
    priced = args.price is not None or known is not None
    cost = round(fleet_cost_usd(inputs, needed), 2) if needed is not None and priced else None
    fields: dict[str, Any] = {
        "nodes_to_meet_deadline": needed,
        "vcpus_to_meet_deadline": vcpus,
        "quota_family": known.family if known is not None else None,
        "quota_cores": inputs.quota_cores,
        "cost_to_meet_deadline_usd": cost,
        "allow_late": bool(args.allow_late),
        "deadline_warning": None,
    }
    if meets is False:
        fields["deadline_warning"] = _deadline_line(
            args, inputs, fleet, needed=needed, vcpus=vcpus, cost=cost, family=known
        )
    return fields


def _deadline_line(
    args: argparse.Namespace,
    inputs: PlanInputs,
    fleet: FleetSize,
    *,
    needed: int | None,
    vcpus: int | None,
    cost: float | None,
    family: VmSize | None,
) -> str:
    """One line: the deadline missed, what meeting it takes, and what to change."""
    assert inputs.deadline_s is not None
    capped = _CAPPED_BY.get(fleet.binding_limit)
    head = (
        f"deadline {format_duration(inputs.deadline_s)} not met: the plan's "
        f"{fleet.total_nodes:,} nodes{f' ({capped})' if capped else ''} take "
        f"{format_duration(fleet.est_makespan_s)}"
    )
    if needed is None:
        # Start-up plus the longest piece already overruns: no number of nodes helps.
        split = " or split long videos with --segment-seconds" if inputs.media else ""
        need = (
            f"no fleet size meets it (start-up plus the longest piece of work exceed the "
            f"deadline less its {inputs.headroom:.0%} headroom)"
        )
        advice = f"to meet it give a later --deadline{split}"
    else:
        need = _what_meeting_takes(inputs, needed, vcpus, cost, family)
        changes = _changes_to_meet(args, inputs, needed, vcpus)
        advice = f"to meet it {' and '.join(changes)}, or give a later --deadline"
        if not changes:  # not reached while the caps are these: a cap stopped the plan
            advice = "to meet it give a later --deadline"
    if args.allow_late:
        return f"warning: {head}; {need}; {advice}; accepted as it is with --allow-late"
    return f"{head}; {need}; {advice}, or accept this plan with --allow-late"


def _what_meeting_takes(
    inputs: PlanInputs, needed: int, vcpus: int | None, cost: float | None, family: VmSize | None
) -> str:
    """'meeting it takes 3,237 nodes: 12,948 low-priority NCASv3_T4 vCPUs, est. $628.65'."""
    tier = "low-priority" if inputs.low_priority else "dedicated"
    if vcpus is not None:
        quota = ""
        if inputs.quota_cores is not None:
            quota = f" (your quota is {inputs.quota_cores:,})"
        label = _family_label(family, inputs.vm_size)
        text = f"meeting it takes {needed:,} nodes: {vcpus:,} {tier} {label} vCPUs{quota}"
    else:
        text = (
            f"meeting it takes {needed:,} {tier} {inputs.vm_size} nodes (vCPUs unknown: "
            "pass --cores-per-vm)"
        )
    return text + (f", est. ${cost:,.2f}" if cost is not None else ", cost unknown (pass --price)")


def _changes_to_meet(
    args: argparse.Namespace, inputs: PlanInputs, needed: int, vcpus: int | None
) -> list[str]:
    """What to change so that ``needed`` nodes are allowed: the quota, then the flags."""
    # AML counts dedicated cores per VM family (and in a regional total), low-priority cores
    # only in one regional total shared by all families (compute/aml/quota.py): the request
    # to make names the family only where the quota has one.
    kind = "low-priority"
    if not inputs.low_priority:
        kind = f"dedicated {_family_label(find_vm_size(inputs.vm_size), inputs.vm_size)}"
    changes: list[str] = []
    if vcpus is not None and inputs.quota_cores is not None and vcpus > inputs.quota_cores:
        changes.append(f"get quota for {vcpus:,} {kind} vCPUs")
    if needed > MAX_RUN_NODES:
        # No flag allows it: one run's nodes are bounded (RunOptions.max_nodes).
        changes.append(f"split the work into runs of at most {MAX_RUN_NODES:,} nodes")
        return changes
    flags = []
    if needed > args.max_nodes:
        flags.append(f"--max-nodes {needed}")
    clusters = -(-needed // MAX_NODES_PER_CLUSTER)
    if clusters > args.max_clusters:
        flags.append(f"--max-clusters {clusters}")
    if flags:
        changes.append(f"pass {' '.join(flags)}")
    return changes


def report_deadline(command: str, summary: dict[str, Any]) -> int:
    """Print the line of a plan that misses its deadline (stderr), if it does; the exit code
    ``deadline_exit_code`` gives."""
    warning = summary.get("deadline_warning")
    if warning:
        print(f"batchctl {command}: {warning}", file=sys.stderr)
    return deadline_exit_code(summary)


def deadline_exit_code(summary: dict[str, Any]) -> int:
    """EXIT_BAD_INPUT for a plan that misses its deadline unless ``--allow-late`` accepted
    it; 0 otherwise.

    A late plan is the request not fitting, not a failure: the plan was made and printed,
    and what makes it unacceptable is the deadline set against the caps the user gave (max
    nodes, clusters, quota). The fix is a change to the command (those caps, the deadline,
    or --allow-late), which is what exit 3 tells a script; 2 says a run (or, for ``plan``,
    any plan at all) failed. Non-zero so that ``plan ... && submit ...`` stops here.
    """
    if summary.get("deadline_warning") is None or summary["allow_late"]:
        return 0
    return EXIT_BAD_INPUT


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
        **_deadline_fields(args, inputs, fleet, meets),
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
    input (an unreadable manifest included) and for a plan that misses its deadline unless
    ``--allow-late`` (the plan is printed, and one line on stderr says what meeting it takes:
    ``report_deadline``)."""
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
    return report_deadline("plan", summary)
