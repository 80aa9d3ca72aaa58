"""Run options as command-line flags, derived from their one declaration.

Every flag comes from a field of ``RunOptions`` and its ``Flag`` (batchctl.contracts, where
``OptionGroup`` says why options are declared that way): the flag's name, its check (the
field's type and bounds, or the parser its Flag names), its default and its help. A new
option is a new field; it reaches every command that takes run options, ``run_options_from_args``
and a retry's carry-over without an edit here.

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
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from batchctl.commands.validate import (
    check_local_model,
    check_local_task,
    code_folder_argument,
    duration_argument,
    error_budget_argument,
    frame_size_argument,
    local_model_argument,
    model_argument,
    number_argument,
    task_argument,
    vm_size_argument,
)
from batchctl.contracts import ErrorBudget, Flag, FrameSize, RunOptions, flag_of
from batchctl.validation import describe

Where = Literal["local", "app", "either"]
# The options whose flag default depends on the command (a local run polls every second).
_PER_COMMAND_DEFAULTS = ("poll_interval_s", "idle_exit_s")


@dataclass(frozen=True)
class OptionFlag:
    """One run option's flag: the RunOptions field, its Flag, and its argparse dest."""

    field: str
    flag: Flag

    @property
    def dest(self) -> str:
        return self.flag.name.removeprefix("--").replace("-", "_")


def option_flags(*, fleet: bool) -> tuple[OptionFlag, ...]:
    """Every run option that has a flag, in RunOptions' field order; the fleet's with ``fleet``.

    RunOptions is looked up when called (not at import), so a test can swap in a declaration
    with one more option and see it reach every consumer.
    """
    found = []
    for name in RunOptions.model_fields:
        declared = flag_of(RunOptions, name)
        if isinstance(declared, Flag) and (fleet or not declared.fleet):
            found.append(OptionFlag(name, declared))
    return tuple(found)


def add_run_option_arguments(
    parser: argparse.ArgumentParser,
    *,
    poll_default: float | None,
    idle_exit_default: float | None,
    with_deadline: bool = True,
    where: Where = "local",
    timing_notes: tuple[str, str] | None = None,
    fleet: bool = False,
) -> list[argparse.Action]:
    """The RunOptions flags; returns the actions added (``batchctl retry`` changes their
    defaults). ``with_deadline=False`` where ``--deadline`` means the plan's; ``fleet`` adds
    the flags that size a deployed app's fleet, in their own group.

    ``timing_notes`` are the helps' defaults for --poll and --idle-exit where they depend on
    where the run goes (their default is then None, resolved by the handler).
    """
    defaults = dict(zip(_PER_COMMAND_DEFAULTS, (poll_default, idle_exit_default), strict=True))
    notes = dict(zip(_PER_COMMAND_DEFAULTS, timing_notes, strict=True)) if timing_notes else {}
    groups = {False: parser.add_argument_group("run options")}
    if fleet:
        groups[True] = parser.add_argument_group("fleet")
    actions = []
    for option in option_flags(fleet=fleet):
        if option.field == "deadline_s" and not with_deadline:
            continue
        default = defaults.get(option.field, _declared_default(option.field))
        settings = _argument_settings(option, where, default, notes.get(option.field))
        actions.append(groups[option.flag.fleet].add_argument(option.flag.name, **settings))
    return actions


def run_options_from_args(
    args: argparse.Namespace, base: RunOptions | None = None, *, fleet: bool = False
) -> RunOptions:
    """RunOptions from parsed flags; raises ValueError naming the flag that is wrong.

    With ``base``, only the flags present in ``args`` change it (a parser whose option
    defaults are ``argparse.SUPPRESS`` leaves out the flags not given: ``batchctl retry``).
    ``fleet``: read the fleet's flags too, as the parser was built with them (elsewhere a
    namespace may hold a same-named flag of another meaning: trial's plan sizing).
    """
    values: dict[str, Any] = base.model_dump() if base is not None else {}
    for option in option_flags(fleet=fleet):
        if hasattr(args, option.dest):
            value = getattr(args, option.dest)
            values[option.field] = not value if option.flag.negated else value
    model = type(base) if base is not None else RunOptions
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise ValueError(f"bad run option: {describe(error)}") from error


def retry_base(parent: RunOptions | None) -> RunOptions:
    """What a retry starts from: the parent run's options (defaults for a report without
    them), except those its run chose for itself (``Flag.on_retry``), chosen again."""
    base = parent if parent is not None else RunOptions()
    fields = type(base).model_fields
    again = {
        option.field: fields[option.field].get_default(call_default_factory=True)
        for option in option_flags(fleet=True)
        if option.flag.on_retry == "choose_again"
    }
    return base.model_copy(update=again)


def check_local_work(options: RunOptions) -> None:
    """BadInputError unless this machine can run the model and the task (files, imports,
    the task from its --code folder when it has one)."""
    check_local_model(options.model)
    check_local_task(options.task, options.code)


# -- one flag from its declaration ------------------------------------------------------------
def _declared_default(name: str) -> Any:
    return RunOptions.model_fields[name].get_default(call_default_factory=True)


def _value_type(annotation: Any) -> Any:
    """The type a field holds, None aside (``int | None`` holds an int)."""
    if get_origin(annotation) in (Union, types.UnionType):
        held = [arg for arg in get_args(annotation) if arg is not type(None)]
        return held[0] if len(held) == 1 else annotation
    return annotation


def _argument_settings(
    option: OptionFlag, where: Where, default: Any, default_note: str | None
) -> dict[str, Any]:
    """``add_argument``'s keywords for one option: its check, default and help."""
    flag, info = option.flag, RunOptions.model_fields[option.field]
    value_type = _value_type(info.annotation)
    rules: list[str] = []
    settings: dict[str, Any]
    if value_type is bool and flag.parse == "value":
        # A switch can only say one thing: the field's default must be what its absence means.
        if default is not flag.negated:
            raise TypeError(f"run option {option.field}: a switch needs the default {flag.negated}")
        settings = {"action": "store_true"}
    else:
        settings = {
            "type": _parser(option, info, value_type, where),
            "default": _flag_text(default),
        }
        if flag.parse == "value" and value_type in (int, float) and _bounds(info):
            rules.append(_bounds_text(_bounds(info)))
    note = default_note or flag.default_help
    if note:
        rules.append(f"default: {note}")
    text = flag.help or info.description or option.field
    if flag.parse == "task" and where == "local":
        text += " (imported here first)"
    if rules:
        text += f" ({'; '.join(rules)})"
    # argparse formats helps with %: a literal one ("2.5%") must be doubled.
    settings["help"] = text.replace("%", "%%")
    return settings


def _parser(
    option: OptionFlag, info: FieldInfo, value_type: Any, where: Where
) -> Callable[[str], Any]:
    local = where == "local"
    named: dict[str, Callable[[str], Any]] = {
        "duration": duration_argument(),
        # A task's import is checked by the handler (check_local_work), where --code is
        # known: the module may live in the code folder.
        "task": task_argument,
        "model": local_model_argument if local else model_argument,
        "vm_size": vm_size_argument,
        # The folder is packed and uploaded by the client, wherever the run happens.
        "code": code_folder_argument,
    }
    if option.flag.parse != "value":
        return named[option.flag.parse]
    # "value": the field's type says.
    if value_type is FrameSize:
        return frame_size_argument
    if value_type is ErrorBudget:
        return error_budget_argument
    if value_type in (int, float):
        return number_argument(whole=value_type is int, **_bounds(info))
    if value_type is str:
        return _text_argument(option.field)
    raise TypeError(
        f"run option {option.field}: no flag parser for {info.annotation}; "
        "name one with Flag(parse=...)"
    )


def _text_argument(field: str) -> Callable[[str], str]:
    """Text checked by its field's own rules (length, pattern) as it is parsed."""
    adapter = TypeAdapter(Annotated[str, *RunOptions.model_fields[field].metadata])

    def convert(text: str) -> str:
        try:
            return str(adapter.validate_python(text))
        except ValidationError as error:
            # The rule, without pydantic's location ("(body)"): the flag names the place.
            problem = error.errors()[0]["msg"]
            raise argparse.ArgumentTypeError(f"{text!r}: {problem}") from None

    return convert


def _flag_text(value: Any) -> Any:
    """A default as the flag spells it: argparse passes a text default through the flag's
    parser, as if it had been typed."""
    if isinstance(value, FrameSize):
        same = value.width == value.height
        return str(value.width) if same else f"{value.width}x{value.height}"
    if isinstance(value, ErrorBudget):
        return value.describe()
    return value


def _bounds(info: FieldInfo) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, key.capitalize())):
                bounds[key] = getattr(item, key)
    return bounds


def _bounds_text(bounds: dict[str, float]) -> str:
    """``1..64`` where both ends are included, else ``> 0, <= 60``."""
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']:g}..{bounds['le']:g}"
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return ", ".join(f"{signs[key]} {bounds[key]:g}" for key in signs if key in bounds)
