"""Every run option is declared once (batchctl.contracts' option groups), and every consumer
follows from that declaration: the flags of every command, ``run_options_from_args``, what a
task and a node see, and what a retry keeps of its parent run.

Nothing here starts a run: commands are parsed with the real CLI parser and stopped where a
run would start.
"""

from __future__ import annotations

import argparse
import math
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field, create_model

from batchctl import cli, contracts
from batchctl.commands import options as options_cmd
from batchctl.commands import retry as retry_cmd
from batchctl.commands import target as target_cmd
from batchctl.commands.options import option_flags, run_options_from_args
from batchctl.commands.validate import BadInputError
from batchctl.contracts import (
    NODE_FIELDS,
    TASK_FIELDS,
    Audience,
    ErrorBudget,
    Flag,
    ForController,
    ForNode,
    ForTask,
    FrameSize,
    NodeSpec,
    NoFlag,
    OptionGroup,
    RunOptions,
    RunReport,
    TaskSettings,
    audience_of,
    flag_of,
    option_names,
)
from tests.parent_runs import parent_report, write_parent_folder

# Values for the options whose type alone does not say what a valid other value is.
TEXT_SAMPLES = {
    "task": "tests.worker_tasks:EchoTask",
    "model": "ResNet50",
    "vm_size": "Standard_NC6s_v3",
    # A folder that exists (the flag checks it); a parent's value is whatever it held.
    "code": str(Path(__file__).resolve().parent),
    "image": "myregistry.azurecr.io/batchctl-node:2",
    "register_output": "video-features",
    "fallback": "wait",
}
ALL_OPTIONS = tuple(RunOptions.model_fields)
FLAGGED = tuple(option.field for option in option_flags(fleet=True))


def value_type(name: str, model: type[RunOptions] = RunOptions) -> Any:
    annotation = model.model_fields[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        (held,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return held
    return annotation


def bounds(name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for item in RunOptions.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, key.capitalize())):
                found[key] = getattr(item, key)
    return found


def default_of(name: str) -> Any:
    return RunOptions.model_fields[name].get_default(call_default_factory=True)


def other_value(name: str) -> Any:
    """A valid value of option ``name`` that is not its default, from its declaration."""
    kind, default = value_type(name), default_of(name)
    if kind is bool:
        return not default
    if kind is FrameSize:
        return FrameSize(width=320, height=240)
    if kind is ErrorBudget:
        return ErrorBudget(max_failed=7)
    if kind is str:
        if name not in TEXT_SAMPLES:
            pytest.fail(f"add a valid non-default sample of the text option {name} to TEXT_SAMPLES")
        return TEXT_SAMPLES[name]
    assert kind in (int, float), f"{name}: no sample for {kind}; extend other_value"
    rule = bounds(name)
    low = rule.get("ge", rule["gt"] + 1 if "gt" in rule else 0)
    high = rule.get("le", math.inf)
    return next(v for v in (low, low + 1, low + 2) if v != default and v <= high)


def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def retry_of(parent: RunOptions, *flags: str) -> RunOptions:
    """What ``batchctl retry RUN_FOLDER FLAGS`` would run with, for a parent run with these
    options: its report as report.json holds them, read back as retry reads it."""
    read_back = RunReport.model_validate_json(parent_report(parent).model_dump_json())
    args = parser().parse_args(["retry", "RUN_FOLDER", *flags])
    return retry_cmd.retry_options(read_back, args)


# -- the declaration itself -------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_every_option_has_exactly_one_flag_or_says_why_not(name: str) -> None:
    metadata = RunOptions.model_fields[name].metadata
    markers = [item for item in metadata if isinstance(item, Flag | NoFlag)]
    assert len(markers) == 1, f"{name}: {markers}"
    if isinstance(markers[0], NoFlag):
        assert markers[0].why.strip(), f"{name}: NoFlag without a reason"
    else:
        assert RunOptions.model_fields[name].description or markers[0].help, f"{name}: no help"


def test_flag_names_and_dests_are_unique() -> None:
    flags = option_flags(fleet=True)
    assert len({option.flag.name for option in flags}) == len(flags)
    assert len({option.dest for option in flags}) == len(flags)


def test_each_flag_is_on_the_commands_that_take_run_options_and_nothing_else_is() -> None:
    commands = {
        name: sub
        for name, sub in _subparsers().items()
        if name in ("run", "retry", "watch", "serve", "demo", "trial", "submit")
    }
    for name, sub in commands.items():
        given = set(sub._option_string_actions)
        for option in option_flags(fleet=True):
            # The fleet's flags are submit's; trial's --deadline is the plan's (its own).
            wanted = (not option.flag.fleet or name == "submit") and not (
                name == "trial" and option.field == "deadline_s"
            )
            if wanted:
                action = sub._option_string_actions.get(option.flag.name)
                assert action is not None, f"{name} lacks {option.flag.name}"
                assert action.dest == option.dest
        declared_no_flag = [n for n in ALL_OPTIONS if isinstance(flag_of(RunOptions, n), NoFlag)]
        for field in declared_no_flag:
            spelled = "--" + field.replace("_", "-")
            assert spelled not in given, f"{name} has {spelled}, declared NoFlag"


def test_no_flag_given_means_every_declared_default(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\n")
    submit = parser().parse_args(["submit", "--manifest-blob", "m.csv"])
    assert run_options_from_args(submit, fleet=True) == RunOptions()
    run = parser().parse_args(["run", str(manifest)])
    # A local run polls and exits idle sooner: its command's own defaults, nothing else.
    assert run_options_from_args(run) == RunOptions(poll_interval_s=1.0, idle_exit_s=5.0)


def test_the_audience_sets_and_models_follow_the_groups() -> None:
    # The wire formats: workers read these, and the task settings' fingerprint
    # (--skip-existing) hashes their JSON. The user's own code and image were added last
    # (None unless given).
    assert TASK_FIELDS == (
        "task",
        "fps",
        "frame_size",
        "exact_timestamps",
        "model",
        "inference_batch_size",
        "code",
    )
    node_only = ("item_timeout_s", "visibility_timeout_s", "max_attempts", "idle_exit_s", "image")
    assert NODE_FIELDS[: len(TASK_FIELDS)] == TASK_FIELDS
    assert NODE_FIELDS[len(TASK_FIELDS) :] == (*node_only, "mini_batch_size", "segment_seconds")
    assert tuple(TaskSettings.model_fields) == TASK_FIELDS
    assert tuple(NodeSpec.model_fields) == NODE_FIELDS
    assert set(RunOptions.model_fields) == {
        *ForTask.model_fields,
        *ForNode.model_fields,
        *ForController.model_fields,
    }
    for name in ALL_OPTIONS:
        assert audience_of(RunOptions, name) in ("task", "node", "controller")
    # Siblings, not a chain: a task's settings cannot be handed the whole options.
    assert not issubclass(RunOptions, NodeSpec) and not issubclass(NodeSpec, TaskSettings)


def test_the_json_a_node_and_a_task_read_is_as_before() -> None:
    options = RunOptions(
        fps=2,
        frame_size="320x240",
        mini_batch_size=4,
        segment_seconds=60,
        exact_timestamps=True,
        model="ResNet50",
        vm_size="Standard_NC6s_v3",
    )
    assert options.node_spec().model_dump_json() == (
        '{"task":"features","fps":2.0,"frame_size":{"width":320,"height":240},'
        '"exact_timestamps":true,"model":"ResNet50","inference_batch_size":32,"code":null,'
        '"item_timeout_s":900.0,"visibility_timeout_s":120,"max_attempts":3,'
        '"idle_exit_s":60.0,"image":null,"mini_batch_size":4,"segment_seconds":60.0}'
    )
    assert RunOptions().task_settings().model_dump_json() == (
        '{"task":"features","fps":1.0,"frame_size":{"width":224,"height":224},'
        '"exact_timestamps":false,"model":"MobileNetV3Small","inference_batch_size":32,'
        '"code":null}'
    )


def test_an_option_declared_outside_a_group_has_no_audience() -> None:
    stray = create_model("StrayOptions", __base__=RunOptions, stray=(int, 1))
    with pytest.raises(TypeError, match="not in an option group"):
        audience_of(stray, "stray")


# -- (1) a retry keeps every option of its parent ---------------------------------------------
@pytest.mark.parametrize("name", ALL_OPTIONS)
def test_a_retry_keeps_each_option_of_its_parent(name: str) -> None:
    value = other_value(name)
    parent = RunOptions.model_validate({name: value})
    assert getattr(parent, name) != default_of(name)

    retried = retry_of(parent)

    declared = flag_of(RunOptions, name)
    if isinstance(declared, Flag) and declared.on_retry == "choose_again":
        # The parent holds what its run chose (items per message): the retry chooses again.
        assert getattr(retried, name) == default_of(name)
    else:
        assert getattr(retried, name) == getattr(parent, name)


def _strategy(name: str, *, given_as_flag: bool) -> st.SearchStrategy[Any]:
    """Valid values of option ``name``, from its declaration (a flag cannot say None)."""
    kind = value_type(name)
    rule = bounds(name)
    values: st.SearchStrategy[Any]
    if kind is bool:
        values = st.booleans()
    elif kind is FrameSize:
        side = st.integers(16, 4096)
        values = st.builds(FrameSize, width=side, height=side)
    elif kind is ErrorBudget:
        values = st.sampled_from(["auto", "0", "10", "2.5%"]).map(ErrorBudget.model_validate)
    elif kind is str:
        values = st.sampled_from(
            [v for v in (default_of(name), TEXT_SAMPLES[name]) if v is not None]
        )
    elif getattr(flag_of(RunOptions, name), "parse", None) == "duration":
        values = st.integers(1, 30 * 24 * 3600).map(float)  # a flag takes whole seconds
    elif kind is int:
        values = st.integers(
            int(rule.get("ge", rule.get("gt", -1) + 1)), int(rule.get("le", 10**6))
        )
    else:
        values = st.floats(
            min_value=rule.get("ge", rule.get("gt")),
            max_value=rule.get("le", 1e6),
            exclude_min="gt" in rule,
            allow_nan=False,
            allow_infinity=False,
        )
    optional = default_of(name) is None
    return values if given_as_flag or not optional else st.none() | values


def _flag_text(name: str, value: Any) -> list[str]:
    declared = flag_of(RunOptions, name)
    assert isinstance(declared, Flag)
    if value_type(name) is bool:
        return [declared.name] if value != declared.negated else []
    if isinstance(value, FrameSize):
        text = f"{value.width}x{value.height}"
    elif isinstance(value, ErrorBudget):
        text = value.describe()
    elif declared.parse == "duration":
        text = f"{int(value)}s"
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return [declared.name, text]


RETRY_FLAGS = tuple(option.field for option in option_flags(fleet=False))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_retry_is_its_parent_changed_by_exactly_the_flags_given(data: st.DataObject) -> None:
    parent = RunOptions.model_validate(
        {name: data.draw(_strategy(name, given_as_flag=False), label=name) for name in ALL_OPTIONS}
    )
    chosen = data.draw(st.sets(st.sampled_from(RETRY_FLAGS)), label="flags given")
    given_values = {
        name: data.draw(_strategy(name, given_as_flag=True), label=f"--{name}")
        for name in sorted(chosen)
    }
    # A switch can only be turned on: given, it says True.
    given_values = {
        name: True if value_type(name) is bool else value for name, value in given_values.items()
    }
    argv = [part for name, value in given_values.items() for part in _flag_text(name, value)]

    retried = retry_of(parent, *argv)

    expected = parent.model_dump()
    expected["mini_batch_size"] = None  # chosen again unless given (Flag.on_retry)
    expected.update(given_values)
    assert retried == RunOptions.model_validate(expected)


def test_a_retry_of_a_segmented_run_is_segmented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real CLI end to end, stopped where the retry would start its run: a run
    made with --segment-seconds 60 retries with 60 (it once retried with segments off)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\nb.mp4\n")
    made = parser().parse_args(["run", str(manifest), "--segment-seconds", "60", "--fps", "2"])
    parent_options = run_options_from_args(made)
    folder = write_parent_folder(tmp_path / "parent", parent_options, manifest, "video\nb.mp4\n")

    started: list[RunOptions] = []

    class StartedError(Exception):
        """Raised where the retry would start its run."""

    def run_locally(_manifest: Path, options: RunOptions, **_: Any) -> None:
        started.append(options)
        raise StartedError

    monkeypatch.setattr(target_cmd, "run_locally", run_locally)
    for flags, seconds in (((), 60.0), (("--segment-seconds", "30"), 30.0)):
        args = parser().parse_args(["retry", str(folder), "--nodes", "1", *flags])
        with pytest.raises(StartedError):
            args.handler(args)
        assert (started[-1].segment_seconds, started[-1].fps) == (seconds, 2.0)


def test_retry_leaves_every_option_flag_out_unless_given() -> None:
    args = parser().parse_args(["retry", "RUN_FOLDER"])
    present = {option.dest for option in option_flags(fleet=True)} & set(vars(args))
    assert present == set(), f"retry would reset these to their defaults: {present}"


# -- (2) one more option reaches every consumer -----------------------------------------------
GROUPS: dict[Audience, type[OptionGroup]] = {
    "task": ForTask,
    "node": ForNode,
    "controller": ForController,
}


# create_model's stubs take one base type, not a tuple of unrelated ones (a group and a
# composition): typed here by what each call builds.
_compose: Any = create_model


@pytest.fixture(params=["task", "node", "controller"])
def with_knob(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[Audience, type[RunOptions]]:
    """The declaration with one more option, --knob, in the group of the param's audience,
    composed as contracts composes the real models, and put where the consumers look."""
    audience: Audience = request.param
    knob = _compose(
        "KnobGroup",
        __base__=GROUPS[audience],
        knob=(
            Annotated[int, Flag("--knob")],
            Field(default=3, ge=1, le=9, description="a knob added for this test"),
        ),
    )
    knob.audience = audience
    run_options: type[RunOptions] = _compose("RunOptions", __base__=(knob, RunOptions))
    monkeypatch.setattr(options_cmd, "RunOptions", run_options)
    if audience in ("task", "node"):
        node_spec: type[NodeSpec] = _compose("NodeSpec", __base__=(knob, NodeSpec))
        monkeypatch.setattr(contracts, "NodeSpec", node_spec)
    if audience == "task":
        task_settings: type[TaskSettings] = _compose("TaskSettings", __base__=(knob, TaskSettings))
        monkeypatch.setattr(contracts, "TaskSettings", task_settings)
    return audience, run_options


def test_a_new_option_reaches_every_consumer(
    with_knob: tuple[Audience, type[RunOptions]], tmp_path: Path
) -> None:
    audience, run_options = with_knob
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\n")
    assert "knob" in run_options.model_fields

    # The flag, on every command that takes run options, checked by the field's bounds.
    for argv in (["run", str(manifest)], ["submit", "--manifest-blob", "m.csv"]):
        args = parser().parse_args([*argv, "--knob", "5"])
        options = run_options_from_args(args, fleet=argv[0] == "submit")
        assert isinstance(options, run_options) and options.model_dump()["knob"] == 5
        unset = run_options_from_args(parser().parse_args(argv), fleet=argv[0] == "submit")
        assert unset.model_dump()["knob"] == 3
    with pytest.raises(BadInputError, match="--knob"):
        parser().parse_args(["run", str(manifest), "--knob", "10"])
    help_text = _subparsers()["run"].format_help()
    assert "a knob added for this test (1..9) (default: 3)" in " ".join(help_text.split())

    # The audience sets, and what a node and a task are sent.
    options = run_options.model_validate({"knob": 7})
    assert ("knob" in option_names(run_options, "task")) == (audience == "task")
    assert ("knob" in option_names(run_options, "task", "node")) == (audience != "controller")
    assert audience_of(run_options, "knob") == audience
    spec, task = options.node_spec(), options.task_settings()
    assert (spec.model_dump().get("knob"), task.model_dump().get("knob")) == {
        "task": (7, 7),
        "node": (7, None),
        "controller": (None, None),
    }[audience]
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec

    # A retry keeps the parent's value unless --knob is given.
    parent = parent_report(options)
    kept = retry_cmd.retry_options(parent, parser().parse_args(["retry", "RUN_FOLDER"]))
    assert kept.model_dump()["knob"] == 7
    changed = parser().parse_args(["retry", "RUN_FOLDER", "--knob", "2"])
    assert retry_cmd.retry_options(parent, changed).model_dump()["knob"] == 2


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    built = parser()
    action = next(a for a in built._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)
