"""Run options as command-line flags, shared by the commands that start runs."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from batchctl.contracts import RunOptions
from batchctl.planning import parse_duration


def add_run_option_arguments(
    parser: argparse.ArgumentParser,
    *,
    poll_default: float,
    idle_exit_default: float,
    with_deadline: bool = True,
) -> None:
    """The RunOptions flags; ``with_deadline=False`` where ``--deadline`` means the plan's."""
    group = parser.add_argument_group("run options")
    group.add_argument("--task", default="features", help="'features' or 'module:Class'")
    group.add_argument("--fps", type=float, default=1.0, help="frames sampled per second")
    group.add_argument("--frame-size", default="224", help="224 or WIDTHxHEIGHT")
    group.add_argument(
        "--model", default="MobileNetV3Small", help="keras.applications name or .keras file"
    )
    group.add_argument("--batch-size", type=int, default=32, help="inference batch size")
    group.add_argument("--mini-batch", type=int, default=1, help="items per queue message")
    group.add_argument("--exact-timestamps", action="store_true", help="decode every frame")
    group.add_argument("--error-budget", default="5%", help="failures tolerated: 10 or 2.5%%")
    group.add_argument("--max-attempts", type=int, default=3)
    if with_deadline:
        group.add_argument("--deadline", help="stop the run after this long (90s, 5m, 2h)")
    group.add_argument("--strict", action="store_true", help="refuse the run on any bad row")
    group.add_argument(
        "--merge-outputs",
        action="store_true",
        help="after a completed run, merge all features into one Parquet dataset (merged/)",
    )
    group.add_argument("--item-timeout", type=float, default=900.0, help="seconds per item")
    group.add_argument("--poll", type=float, default=poll_default, help="seconds between polls")
    group.add_argument(
        "--idle-exit", type=float, default=idle_exit_default, help="worker idle exit (s)"
    )


def run_options_from_args(args: argparse.Namespace) -> RunOptions:
    """RunOptions from parsed flags; raises ValueError naming the flag that is wrong."""
    values: dict[str, Any] = {
        "task": args.task,
        "fps": args.fps,
        "frame_size": args.frame_size,
        "model": args.model,
        "inference_batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch,
        "exact_timestamps": args.exact_timestamps,
        "error_budget": args.error_budget,
        "max_attempts": args.max_attempts,
        "strict_manifest": args.strict,
        "merge_outputs": args.merge_outputs,
        "item_timeout_s": args.item_timeout,
        "poll_interval_s": args.poll,
        "idle_exit_s": args.idle_exit,
    }
    deadline = getattr(args, "deadline", None)
    if deadline:
        values["deadline_s"] = parse_duration(deadline)
    try:
        return RunOptions.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        )
        raise ValueError(f"bad run option: {problems}") from error
