"""Run options as command-line flags, shared by the commands that start runs.

Every value is checked as it is parsed, by the rule of the ``RunOptions`` field it fills
(batchctl.commands.validate), so a bad flag is one line and exit 3 before anything is staged.
Where the run happens decides how far the model and the task are checked: ``local`` (this
machine) imports the task and looks for the model's files here; ``app`` (a deployed app)
checks names only, since the files and task modules live in the node image; ``either``
(``trial``, which decides later) checks names now and leaves the rest to the handler
(``check_local_work``).
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from pydantic import ValidationError

from batchctl.commands.validate import (
    check_local_model,
    check_local_task,
    duration_argument,
    error_budget_argument,
    field_argument,
    frame_size_argument,
    local_model_argument,
    local_task_argument,
    model_argument,
    task_argument,
)
from batchctl.contracts import ErrorBudget, RunOptions
from batchctl.validation import describe

Where = Literal["local", "app", "either"]
_DEFAULTS = RunOptions()


def add_run_option_arguments(
    parser: argparse.ArgumentParser,
    *,
    poll_default: float | None,
    idle_exit_default: float | None,
    with_deadline: bool = True,
    where: Where = "local",
    timing_notes: tuple[str, str] | None = None,
) -> None:
    """The RunOptions flags; ``with_deadline=False`` where ``--deadline`` means the plan's.

    ``timing_notes`` are the helps' defaults for --poll and --idle-exit where they depend on
    where the run goes (their default is then None, resolved by the handler).
    """
    local = where == "local"
    group = parser.add_argument_group("run options")
    group.add_argument(
        "--task",
        type=local_task_argument if local else task_argument,
        default=_DEFAULTS.task,
        help="'features' (built in) or a custom task class as 'module:Class'"
        + (" (imported here first)" if local else ""),
    )
    group.add_argument(
        "--fps",
        type=field_argument(RunOptions, "fps"),
        default=_DEFAULTS.fps,
        help="frames sampled per second (> 0, <= 60)",
    )
    group.add_argument(
        "--frame-size",
        type=frame_size_argument,
        default="224",
        help="frame size fed to the model: 224 or WIDTHxHEIGHT, 16..4096 a side",
    )
    group.add_argument(
        "--model",
        type=local_model_argument if local else model_argument,
        default=_DEFAULTS.model,
        help="a keras.applications name (MobileNetV3Small, ResNet50...), "
        "Name@FILE.weights.h5, or a .keras file",
    )
    group.add_argument(
        "--batch-size",
        type=field_argument(RunOptions, "inference_batch_size"),
        default=_DEFAULTS.inference_batch_size,
        help="inference batch size (1..4096)",
    )
    group.add_argument(
        "--mini-batch",
        type=field_argument(RunOptions, "mini_batch_size"),
        default=_DEFAULTS.mini_batch_size,
        help="items per queue message (1..64)",
    )
    group.add_argument(
        "--exact-timestamps",
        action="store_true",
        help="decode every frame for exact timestamps (default: the fast keyframe path)",
    )
    group.add_argument(
        "--segment-seconds",
        type=field_argument(RunOptions, "segment_seconds"),
        default=_DEFAULTS.segment_seconds,
        help="split videos longer than this many seconds into segments run on several nodes "
        "at once, assembled into one item with the unsplit run's output (features, or the "
        "transformed video; 1..86400; default: never split)",
    )
    group.add_argument(
        "--error-budget",
        type=error_budget_argument,
        default=budget_text(_DEFAULTS.error_budget),
        help="failures tolerated before the run stops: auto (the larger of 10 items and 5%%, "
        "and an early stop when nearly all fail), a count like 10 or a share like 2.5%%",
    )
    group.add_argument(
        "--max-attempts",
        type=field_argument(RunOptions, "max_attempts"),
        default=_DEFAULTS.max_attempts,
        help="attempts per item before it fails (1..100)",
    )
    if with_deadline:
        group.add_argument(
            "--deadline",
            type=duration_argument(),
            help="stop the run after this long: 90s, 5m, 2h (default: no deadline)",
        )
    group.add_argument(
        "--strict", action="store_true", help="refuse the whole run on any bad manifest row"
    )
    group.add_argument(
        "--merge-outputs",
        action="store_true",
        help="after a completed run, merge all features into one Parquet dataset (merged/)",
    )
    group.add_argument(
        "--skip-existing",
        action="store_true",
        help=(
            "do not run items an earlier run already did for the same source version and "
            "task settings (they are counted as skipped)"
        ),
    )
    group.add_argument(
        "--item-timeout",
        type=field_argument(RunOptions, "item_timeout_s"),
        default=_DEFAULTS.item_timeout_s,
        help="seconds one item may take (> 0)",
    )
    poll_note = f" (default: {timing_notes[0]})" if timing_notes else ""
    idle_note = f" (default: {timing_notes[1]})" if timing_notes else ""
    group.add_argument(
        "--poll",
        type=field_argument(RunOptions, "poll_interval_s"),
        default=poll_default,
        help=f"seconds between progress polls (> 0, <= 3600){poll_note}",
    )
    group.add_argument(
        "--idle-exit",
        type=field_argument(RunOptions, "idle_exit_s"),
        default=idle_exit_default,
        help=f"seconds a worker waits on an empty queue before it exits (>= 0){idle_note}",
    )


def budget_text(budget: ErrorBudget) -> str:
    """An error budget as the flag spells it (the inverse of ErrorBudget's shorthand)."""
    if budget.auto:
        return "auto"
    if budget.max_failed is not None:
        return str(budget.max_failed)
    return f"{budget.max_failed_percent:g}%"


def check_local_work(options: RunOptions) -> None:
    """BadInputError unless this machine can run the model and the task (files, imports)."""
    check_local_model(options.model)
    check_local_task(options.task)


# Each run-option flag's name in the parsed namespace, and the RunOptions field it fills.
FLAG_FIELDS: dict[str, str] = {
    "task": "task",
    "fps": "fps",
    "frame_size": "frame_size",
    "model": "model",
    "batch_size": "inference_batch_size",
    "mini_batch": "mini_batch_size",
    "exact_timestamps": "exact_timestamps",
    "segment_seconds": "segment_seconds",
    "error_budget": "error_budget",
    "max_attempts": "max_attempts",
    "strict": "strict_manifest",
    "merge_outputs": "merge_outputs",
    "skip_existing": "skip_existing",
    "item_timeout": "item_timeout_s",
    "poll": "poll_interval_s",
    "idle_exit": "idle_exit_s",
}


def run_options_from_args(args: argparse.Namespace, base: RunOptions | None = None) -> RunOptions:
    """RunOptions from parsed flags; raises ValueError naming the flag that is wrong.

    With ``base``, only the flags present in ``args`` change it (a parser whose option
    defaults are ``argparse.SUPPRESS`` leaves out the flags not given: ``batchctl retry``).
    """
    values: dict[str, Any] = base.model_dump() if base is not None else {}
    values.update(
        {field: getattr(args, dest) for dest, field in FLAG_FIELDS.items() if hasattr(args, dest)}
    )
    deadline = getattr(args, "deadline", None)
    if deadline is not None:
        # Parsed to seconds by its type=; a string here is a caller that built the namespace.
        values["deadline_s"] = deadline
    try:
        return RunOptions.model_validate(values)
    except ValidationError as error:
        raise ValueError(f"bad run option: {describe(error)}") from error
