"""``batchctl trial MANIFEST.csv``: try the first rows before the big run, then plan it.

    batchctl trial MANIFEST.csv [--rows 15] [--nodes 2] [run options] [sizing flags] [--json]
    batchctl trial MANIFEST.csv --app URL [--trial-nodes 1] [--rows 15] [...]

Runs the first ``--rows`` data rows of the manifest end to end on this machine (Azurite,
worker processes, the real orchestrator: the same path as ``batchctl run``), measures the
seconds each item takes per stage and what a node spends per item with the pipeline's
overlap, reports the failures, and prints the plan the full manifest would need at that
rate: the same plan ``batchctl plan --manifest MANIFEST.csv --sec-per-item S`` prints.

Where the task's cost scales with the video's length (a transform, features at a fixed fps),
seconds per item mislead: the trial also measures node-seconds per second of video (node
active time over the seconds of video its succeeded items covered, from the records'
``media_s``). When the manifest has a ``duration_s`` column the plan for all rows is by video
length at that rate (``batchctl plan --sec-per-video-second X``; with ``--segment-seconds``
as the run would split), else per item as before; the plan's notes say which it used.

A trial here measures this machine. Where nodes differ (a GPU against these CPUs), run the
trial on one node of the target size, or scale the figure with ``--speedup`` (how many times
faster a node is than this machine); the printed plan says which figure it used.

With ``--app URL`` (or BATCHCTL_APP_URL; ``--local`` still runs here) the trial runs on the
deployed app instead, on one small cluster of at most ``--trial-nodes`` nodes of
``--vm-size``: the first rows are uploaded where ``batchctl submit`` puts manifests, the run
is followed like ``batchctl status --follow`` (Ctrl-C stops following and leaves it going),
and the figures come from the run's report.json (downloaded into ``--out``). The key comes
from BATCHCTL_FUNCTION_KEY, storage from ``--blob-url`` or BATCHCTL_BLOB_URL, as for
``submit``. ``--poll`` and ``--idle-exit`` default to 1 s and 3 s here, and to the run's
own defaults on the app.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchctl.client import APP_URL_ENV, AppError
from batchctl.commands.options import add_run_option_arguments, run_options_from_args
from batchctl.commands.plan import (
    add_sizing_arguments,
    check_simulation_size,
    count_manifest_rows,
    deadline_exit_code,
    plan_summary,
    positive_float,
    print_plan,
    read_manifest_durations,
    report_deadline,
)
from batchctl.commands.run import (
    EXIT_ITEMS_FAILED,
    EXIT_RUN_FAILED,
    ProgressPrinter,
    add_nodes_argument,
    new_run_id,
    report_outcome_text,
)
from batchctl.commands.status import add_follow_arguments, fail
from batchctl.commands.target import (
    APP_TRIAL_TIMING,
    LOCAL_TRIAL_TIMING,
    RunSpec,
    Target,
    open_target,
)
from batchctl.commands.validate import (
    BadInputError,
    app_url_argument,
    field_argument,
    http_url_argument,
    manifest_argument,
    number_argument,
    path_argument,
)
from batchctl.contracts import ItemResult, RunOptions, RunPhase, RunReport, RunStats
from batchctl.planning import DURATION_COLUMN, MediaWork, PlanError
from batchctl.reporting.analysis import RunAnalysis
from batchctl.workspec import BUILTIN_TASKS

STAGES = ("download_s", "decode_s", "inference_s", "upload_s", "total_s")
EXAMPLES_PER_ERROR_CLASS = 3
# A trial is a sample: more rows than this belong in a real run.
MAX_TRIAL_ROWS = 10_000


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trial",
        help="run the first rows (here or on the app), measure seconds per item, plan it all",
        description=__doc__,
    )
    parser.add_argument(
        "manifest",
        type=manifest_argument,
        help="the full CSV manifest (a header row naming a 'video' column)",
    )
    parser.add_argument(
        "--rows",
        type=number_argument(whole=True, ge=1, le=MAX_TRIAL_ROWS),
        default=15,
        help=f"data rows to try (1..{MAX_TRIAL_ROWS})",
    )
    add_nodes_argument(parser)
    parser.add_argument(
        "--speedup",
        type=positive_float,
        default=1.0,
        help="how many times faster a target node is than this machine (> 0)",
    )
    parser.add_argument(
        "--out",
        type=path_argument,
        default=Path("batchctl-output"),
        help="where the trial's report and outputs are copied",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    on_app = parser.add_argument_group("on a deployed app")
    # No option for the key, on purpose (as for submit): argv is visible to every user.
    on_app.add_argument(
        "--app",
        type=app_url_argument,
        help=f"run the trial on this Function App (default: ${APP_URL_ENV})",
    )
    on_app.add_argument(
        "--local", action="store_true", help=f"run here even when {APP_URL_ENV} is set"
    )
    on_app.add_argument(
        "--trial-nodes",
        type=field_argument(RunOptions, "max_nodes"),
        default=1,
        help="nodes of the trial's one cluster on the app (1..10000)",
    )
    on_app.add_argument(
        "--blob-url",
        type=http_url_argument,
        help="the app's storage blob endpoint (default: $BATCHCTL_BLOB_URL)",
    )
    add_follow_arguments(on_app)
    # None until handle() knows where the trial runs: the local defaults would poll a
    # deployed app every second.
    add_run_option_arguments(
        parser,
        poll_default=None,
        idle_exit_default=None,
        with_deadline=False,
        where="either",
        timing_notes=(
            f"{LOCAL_TRIAL_TIMING[0]:g} here, {APP_TRIAL_TIMING[0]:g} on the app",
            f"{LOCAL_TRIAL_TIMING[1]:g} here, {APP_TRIAL_TIMING[1]:g} on the app",
        ),
    )
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
    # Node-seconds per second of video: node_s_per_item over the mean seconds of video of
    # the succeeded items whose record says (media_s). None when no record says.
    node_s_per_video_s: float | None = None
    media_s_per_item: float | None = None


def measure(results: list[ItemResult]) -> TrialMeasurement:
    """The trial's figures from its terminal records: the run report's own analysis of them.

    One definition for both places a trial runs: locally from the ledger, and on the app from
    the report it writes (``measure_report``).
    """
    dated = [result.finished_at for result in results if result.finished_at is not None]
    origin = min(dated, default=datetime.now(UTC))
    analysis = RunAnalysis(origin)
    for result in results:
        analysis.add(result)
    stats = analysis.summarize(max(dated, default=origin), None)
    return measure_stats(stats, succeeded=analysis.succeeded, failed=analysis.failed)


def measure_report(report: RunReport) -> TrialMeasurement:
    """The trial's figures from a run's report (its ``stats``). ValueError without stats."""
    if report.stats is None:
        raise ValueError(
            f"the report of run {report.run_id} has no stats to measure (written by an older "
            "app? deploy this version)"
        )
    return measure_stats(report.stats, succeeded=report.succeeded, failed=report.failed)


def measure_stats(stats: RunStats, *, succeeded: int, failed: int) -> TrialMeasurement:
    """Stage means and p90s over succeeded items; node-seconds per item: each node's active
    time (its first item's start to its last item's end) summed over the nodes that finished
    an item, over their succeeded items; failures by class with a few examples."""
    stage_mean: dict[str, float] = {}
    stage_p90: dict[str, float] = {}
    for stage in stats.stages:
        name = f"{stage.stage}_s"
        if name in STAGES and stage.count:
            stage_mean[name] = round(stage.mean_s, 3)
            stage_p90[name] = round(stage.p90_s, 3)
    working = [node for node in stats.nodes if node.succeeded]
    counted = sum(node.succeeded for node in working)
    per_item = sum(node.active_s for node in working) / counted if counted else 0.0
    media_per_item = per_video = None
    if stats.media_s is not None and stats.media_items:
        media_per_item = stats.media_s / stats.media_items
        # Over the mean, not the total: when only some records say how long their video
        # was, the others still cost node time, at the per-item rate.
        per_video = per_item / media_per_item if media_per_item > 0 and counted else None
    return TrialMeasurement(
        succeeded=succeeded,
        failed=failed,
        stage_mean_s=stage_mean,
        stage_p90_s=stage_p90,
        node_s_per_item=round(per_item, 3),
        failures={
            failure.error_class: [
                {"item_id": example.item_id, "source": example.source, "message": example.message}
                for example in failure.examples[:EXAMPLES_PER_ERROR_CLASS]
            ]
            for failure in stats.failures
        },
        failure_counts={failure.error_class: failure.count for failure in stats.failures},
        node_s_per_video_s=None if per_video is None else round(per_video, 6),
        media_s_per_item=None if media_per_item is None else round(media_per_item, 3),
    )


def trial_segment_seconds(options: RunOptions) -> float | None:
    """The segment length the full run would split long videos at, as far as the plan goes.

    Both built-in tasks run segments (node_image/worker/segments.py). A custom task may not
    (the worker then runs its items whole), and this machine cannot tell without importing
    it, so its plan keeps videos whole: the safe side of a deadline.
    """
    return options.segment_seconds if options.task in BUILTIN_TASKS else None


# -- the command ------------------------------------------------------------------------------
def handle(args: argparse.Namespace) -> int:
    manifest: Path = args.manifest
    try:
        target = open_target(
            args.app,
            local=args.local,
            nodes=args.nodes,
            out_dir=args.out,
            interval=args.interval,
            blob_url=args.blob_url,
        )
    except AppError as error:
        return fail("trial", error, as_json=args.json)
    poll_s, idle_exit_s = target.trial_timing
    args.poll = poll_s if args.poll is None else args.poll
    args.idle_exit = idle_exit_s if args.idle_exit is None else args.idle_exit
    try:
        options = run_options_from_args(args)
        total_items = count_manifest_rows(manifest)
        # Read before the trial runs: a bad duration_s fails now, not after the trial.
        media = read_manifest_durations(manifest, trial_segment_seconds(options))
    except (ValueError, OSError, csv.Error) as error:
        raise BadInputError(str(error)) from None
    check_simulation_size(args, total_items)
    run_id = f"trial-{new_run_id().removeprefix('run-')}"
    try:
        return _trial(args, target, options, total_items, run_id=run_id, media=media)
    except AppError as error:
        return fail("trial", error, as_json=args.json)


def _trial(
    args: argparse.Namespace,
    target: Target,
    options: RunOptions,
    total_items: int,
    *,
    run_id: str,
    media: MediaWork | None,
) -> int:
    """The first rows as a run on ``target`` (one small cluster of --trial-nodes on an app),
    measured from its report; AppError on trouble."""
    manifest: Path = args.manifest
    options = target.fleet(
        options, nodes=args.trial_nodes, vm_size=args.vm_size, low_priority=args.low_priority
    )
    target.check(options)
    with tempfile.TemporaryDirectory(prefix="batchctl-trial-") as scratch:
        trial_manifest = Path(scratch) / manifest.name
        rows = write_first_rows(manifest, args.rows, trial_manifest)
        if rows == 0:
            raise BadInputError(f"{manifest} has no data rows", "manifest")
        print(f"trial: {rows} of {total_items} rows on {target.describe(options)}", file=sys.stderr)
        spec = RunSpec(
            trial_manifest,
            options,
            run_id,
            manifest_label=f"{manifest.resolve()} (the first rows)",
            # The rows name videos as the manifest does: relative to its folder.
            media_root=manifest.parent,
        )
        with ProgressPrinter(sys.stderr) as progress:
            outcome = target.execute(spec, progress=progress)
    if outcome.detached:
        return target.summarize(outcome, as_json=args.json)
    try:
        report = target.fetch_report(outcome, args.out)
    except AppError as error:
        if outcome.ended_well:
            raise
        # A run that crashed may have written no report: its outcome is the answer.
        print(f"batchctl trial: no report to measure: {error}", file=sys.stderr)
        return target.summarize(outcome, as_json=args.json)
    try:
        trial = measure_report(report)
    except ValueError as error:
        print(f"batchctl trial: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    where = target.measured_on(options)
    return _conclude(args, report, rows, trial, total_items, media=media, where=where)


def _conclude(
    args: argparse.Namespace,
    report: RunReport,
    rows: int,
    trial: TrialMeasurement,
    total_items: int,
    *,
    media: MediaWork | None,
    where: str,
) -> int:
    """Print the trial and the plan for the whole manifest; the exit code.

    The trial's own outcome comes first (2 the run failed or gave no plan, 1 items failed
    or rows were invalid): a trial that failed makes its rate, and so the plan, suspect.
    A clean trial whose plan misses ``--deadline`` exits as ``batchctl plan`` does, 3
    unless ``--allow-late`` (``report_deadline``); the line is printed either way.
    """
    _print_trial(report, rows, trial)
    summary = _plan_for_all(args, total_items, report.run_id, trial, where, media=media)
    if args.json:
        print(json.dumps({"trial": _trial_json(report, rows, trial), "plan": summary}))
    if summary is None or report.phase is not RunPhase.COMPLETED:
        return EXIT_RUN_FAILED
    if trial.failed or report.invalid:
        return EXIT_ITEMS_FAILED
    return deadline_exit_code(summary)


def _plan_for_all(
    args: argparse.Namespace,
    total_items: int,
    run_id: str,
    trial: TrialMeasurement,
    where: str = "on this machine",
    *,
    media: MediaWork | None = None,
) -> dict[str, Any] | None:
    """The plan ``batchctl plan`` gives at the measured rate (printed unless --json): by
    video length when the manifest gives durations and the trial measured a rate per video
    second, else per item."""
    if trial.succeeded == 0:
        print("batchctl trial: no item succeeded, so there is nothing to plan", file=sys.stderr)
        return None
    speedup = f", divided by --speedup {args.speedup:g}" if args.speedup != 1 else ""
    try:
        if media is not None and trial.node_s_per_video_s is not None:
            per_video = round(trial.node_s_per_video_s / args.speedup, 6)
            summary = plan_summary(args, total_items, 0.0, media=media, sec_per_video_s=per_video)
            basis = (
                f"planned by video length: sec_per_video_s {per_video:g} measured by trial "
                f"{run_id} {where}{speedup}, over the manifest's {DURATION_COLUMN}"
            )
        else:
            sec_per_item = round(trial.node_s_per_item / args.speedup, 3)
            summary = plan_summary(args, total_items, sec_per_item)
            basis = f"planned per item: sec_per_item {sec_per_item:g} s measured by trial "
            basis += f"{run_id} {where}{speedup}"
            if media is None:
                basis += f" (the manifest has no {DURATION_COLUMN} column to plan by length)"
            else:
                basis += " (the trial's records say no video length: a custom task?)"
    except PlanError as error:
        print(f"batchctl trial: no plan: {error}", file=sys.stderr)
        return None
    summary["notes"].append(basis)
    print(f"plan for all {total_items} rows:", file=sys.stderr)
    if not args.json:
        print_plan(summary, as_json=False)
    # The missed deadline's one line, as `batchctl plan` prints it; _conclude decides the
    # exit code, since the trial's own outcome comes first.
    report_deadline("trial", summary)
    return summary


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
        "node_s_per_video_s": trial.node_s_per_video_s,
        "media_s_per_item": trial.media_s_per_item,
        "stage_mean_s": trial.stage_mean_s,
        "stage_p90_s": trial.stage_p90_s,
        "failures": trial.failure_counts,
        "failure_examples": trial.failures,
    }


def _print_trial(report: RunReport, rows: int, trial: TrialMeasurement) -> None:
    out = sys.stderr
    print(
        f"trial {report.run_id}: {report_outcome_text(report)}; {trial.succeeded} succeeded, "
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
        if trial.node_s_per_video_s is not None and trial.media_s_per_item is not None:
            print(
                f"node-seconds per second of video: {trial.node_s_per_video_s:g} "
                f"(the mean item is {trial.media_s_per_item:g} s of video)",
                file=out,
            )
    for error_class, count in sorted(trial.failure_counts.items(), key=lambda kv: -kv[1]):
        print(f"failed: {count} x {error_class}", file=out)
        for example in trial.failures.get(error_class, []):
            print(f"  {example['item_id']} ({example['source']}): {example['message']}", file=out)
