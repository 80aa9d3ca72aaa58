"""``batchctl trial MANIFEST.csv``: try the first rows before the big run, then plan it.

    batchctl trial MANIFEST.csv [--rows 15] [--nodes 2] [run options] [sizing flags] [--json]

Runs the first ``--rows`` data rows of the manifest end to end on this machine (Azurite,
worker processes, the real orchestrator: the same path as ``batchctl run``), measures the
seconds each item takes per stage and what a node spends per item with the pipeline's
overlap, reports the failures, and prints the plan the full manifest would need at that
rate: the same plan ``batchctl plan --manifest MANIFEST.csv --sec-per-item S`` prints.

A trial here measures this machine. Where nodes differ (a GPU against these CPUs), run the
trial on one node of the target size, or scale the figure with ``--speedup`` (how many times
faster a node is than this machine); the printed plan says which figure it used.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.plan import (
    add_sizing_arguments,
    count_manifest_rows,
    plan_summary,
    positive_float,
    positive_int,
    print_plan,
)
from batchctl.commands.run import (
    EXIT_BAD_INPUT,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    new_run_id,
)
from batchctl.contracts import ItemResult, ItemStatus, RunOptions, RunPhase, RunReport
from batchctl.planning import PlanError

STAGES = ("download_s", "decode_s", "inference_s", "upload_s", "total_s")
EXAMPLES_PER_ERROR_CLASS = 3


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trial",
        help="run the first rows locally, measure seconds per item, plan the full manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", type=Path, help="the full CSV manifest")
    parser.add_argument(
        "--rows", type=positive_int, default=15, help="data rows to try (default 15)"
    )
    parser.add_argument(
        "--nodes", type=positive_int, default=2, help="worker processes (default 2)"
    )
    parser.add_argument(
        "--speedup",
        type=positive_float,
        default=1.0,
        help="how many times faster a target node is than this machine (default 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("batchctl-output"),
        help="where the trial's report and outputs are copied (default ./batchctl-output)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    add_run_option_arguments(parser, poll_default=1.0, idle_exit_default=3.0, with_deadline=False)
    add_sizing_arguments(parser)
    parser.set_defaults(handler=handle)


# -- policy (pure) ----------------------------------------------------------------------------
def write_first_rows(manifest: Path, rows: int, target: Path) -> int:
    """Copy the header and the first ``rows`` non-blank records; returns how many were copied.

    CSV-aware, so a quoted field spanning lines stays one record.
    """
    copied = 0
    with (
        manifest.open(newline="", encoding="utf-8-sig") as source,
        target.open("w", newline="", encoding="utf-8") as sink,
    ):
        reader, writer = csv.reader(source), csv.writer(sink)
        header = next(reader, None)
        if header is None:
            return 0
        writer.writerow(header)
        for record in reader:
            if copied >= rows:
                break
            if any(cell.strip() for cell in record):
                writer.writerow(record)
                copied += 1
    return copied


@dataclass(frozen=True)
class TrialMeasurement:
    """What the trial's terminal records say about speed and failures."""

    succeeded: int
    failed: int
    stage_mean_s: dict[str, float]
    stage_p90_s: dict[str, float]
    # Node-seconds per item: each node's span from its first item's start to its last item's
    # end, summed, over the items. Counts the pipeline's overlap and excludes start-up.
    node_s_per_item: float
    failures: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    failure_counts: dict[str, int] = field(default_factory=dict)


def measure(results: list[ItemResult]) -> TrialMeasurement:
    succeeded = [r for r in results if r.status is ItemStatus.SUCCEEDED]
    failed = [r for r in results if r.status is ItemStatus.FAILED]
    stage_mean: dict[str, float] = {}
    stage_p90: dict[str, float] = {}
    for stage in STAGES:
        values = sorted(getattr(r.timings, stage) for r in succeeded)
        if values:
            stage_mean[stage] = round(statistics.fmean(values), 3)
            stage_p90[stage] = round(values[min(len(values) - 1, int(0.9 * len(values)))], 3)
    spans: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for result in succeeded:
        if result.finished_at is not None:
            started = result.finished_at - timedelta(seconds=result.timings.total_s)
            spans[result.node].append((started, result.finished_at))
    node_seconds = sum(
        (max(end for _, end in node) - min(start for start, _ in node)).total_seconds()
        for node in spans.values()
    )
    counted = sum(len(node) for node in spans.values())
    per_item = node_seconds / counted if counted else 0.0
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for result in failed:
        error_class = result.error.error_class if result.error else "unknown"
        counts[error_class] += 1
        if len(examples[error_class]) < EXAMPLES_PER_ERROR_CLASS:
            examples[error_class].append(
                {
                    "item_id": result.item_id,
                    "source": result.source,
                    "message": result.error.message if result.error else "",
                }
            )
    return TrialMeasurement(
        succeeded=len(succeeded),
        failed=len(failed),
        stage_mean_s=stage_mean,
        stage_p90_s=stage_p90,
        node_s_per_item=round(per_item, 3),
        failures=dict(examples),
        failure_counts=dict(counts),
    )


# -- the command ------------------------------------------------------------------------------
def handle(args: argparse.Namespace) -> int:
    manifest: Path = args.manifest
    if not manifest.is_file():
        print(f"batchctl trial: manifest {manifest} not found", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        options = run_options_from_args(args)
        total_items = count_manifest_rows(manifest)
    except (ValueError, OSError, csv.Error) as error:
        print(f"batchctl trial: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_id = f"trial-{new_run_id().removeprefix('run-')}"
    with tempfile.TemporaryDirectory(prefix="batchctl-trial-") as scratch:
        trial_manifest = Path(scratch) / manifest.name
        rows = write_first_rows(manifest, args.rows, trial_manifest)
        if rows == 0:
            print(f"batchctl trial: {manifest} has no data rows", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"trial: {rows} of {total_items} rows on {args.nodes} local nodes", file=sys.stderr)
        report, results = _run_trial(args, options, trial_manifest, manifest.parent, run_id)
    trial = measure(results)
    _print_trial(report, rows, trial)
    summary = _plan_for_all(args, total_items, run_id, trial)
    if args.json:
        print(json.dumps({"trial": _trial_json(report, rows, trial), "plan": summary}))
    if summary is None or report.phase is not RunPhase.COMPLETED:
        return EXIT_RUN_FAILED
    return EXIT_ITEMS_FAILED if trial.failed or report.invalid else EXIT_OK


def _plan_for_all(
    args: argparse.Namespace, total_items: int, run_id: str, trial: TrialMeasurement
) -> dict[str, Any] | None:
    """The plan ``batchctl plan`` gives at the measured rate (printed unless --json)."""
    if trial.succeeded == 0:
        print("batchctl trial: no item succeeded, so there is nothing to plan", file=sys.stderr)
        return None
    sec_per_item = round(trial.node_s_per_item / args.speedup, 3)
    try:
        summary = plan_summary(args, total_items, sec_per_item)
    except PlanError as error:
        print(f"batchctl trial: no plan: {error}", file=sys.stderr)
        return None
    summary["notes"].append(
        f"sec_per_item {sec_per_item:g} s measured by trial {run_id} on this machine"
        + (f", divided by --speedup {args.speedup:g}" if args.speedup != 1 else "")
    )
    print(f"plan for all {total_items} rows:", file=sys.stderr)
    if not args.json:
        print_plan(summary, as_json=False)
    return summary


def _run_trial(
    args: argparse.Namespace,
    options: RunOptions,
    trial_manifest: Path,
    media_root: Path,
    run_id: str,
) -> tuple[RunReport, list[ItemResult]]:
    """The same local run as ``batchctl run``; the ledger is read before storage goes away."""
    from batchctl.commands.run import ProgressPrinter, drive_run, local_session
    from batchctl.local.staging import stage_local_manifest
    from batchctl.settings import get_controller_settings
    from batchctl.storage import Ledger

    progress = ProgressPrinter(sys.stderr)
    with local_session(media_root=media_root, nodes=args.nodes, log_dir=args.out / run_id / "logs"):
        settings = get_controller_settings()
        blob = stage_local_manifest(settings, trial_manifest, run_id, media_root=media_root)
        outcome = drive_run(run_id, blob, options, out_dir=args.out, on_status=progress.update)
        results = list(Ledger(settings).iter_results(run_id))
    progress.finish()
    return outcome.report, results


def _trial_json(report: RunReport, rows: int, trial: TrialMeasurement) -> dict[str, Any]:
    return {
        "run_id": report.run_id,
        "rows": rows,
        "phase": report.phase.value,
        "invalid": report.invalid,
        "weights": report.weights,
        "succeeded": trial.succeeded,
        "failed": trial.failed,
        "node_s_per_item": trial.node_s_per_item,
        "stage_mean_s": trial.stage_mean_s,
        "stage_p90_s": trial.stage_p90_s,
        "failures": trial.failure_counts,
        "failure_examples": trial.failures,
    }


def _print_trial(report: RunReport, rows: int, trial: TrialMeasurement) -> None:
    out = sys.stderr
    print(
        f"trial {report.run_id}: {report.phase.value}; {trial.succeeded} succeeded, "
        f"{trial.failed} failed, {report.invalid} invalid of {rows} rows"
        f"{'; ' + report.message if report.message else ''}",
        file=out,
    )
    if report.weights:
        print(f"weights: {report.weights}", file=out)
    if trial.stage_mean_s:
        print("seconds per item (mean / p90):", file=out)
        for stage in STAGES:
            if stage in trial.stage_mean_s:
                label = stage.removesuffix("_s")
                print(
                    f"  {label:<10} {trial.stage_mean_s[stage]:>8.3f} / "
                    f"{trial.stage_p90_s[stage]:.3f}",
                    file=out,
                )
        print(f"node-seconds per item (with overlap): {trial.node_s_per_item:g}", file=out)
    for error_class, count in sorted(trial.failure_counts.items(), key=lambda kv: -kv[1]):
        print(f"failed: {count} x {error_class}", file=out)
        for example in trial.failures.get(error_class, []):
            print(f"  {example['item_id']} ({example['source']}): {example['message']}", file=out)
