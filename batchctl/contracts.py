"""The messages and records that cross a boundary (queue, blob, table, HTTP, Durable history).

Every model carries ``schema_version`` and ``run_id``. Crossing a boundary is always
``model_dump(mode="json")`` on the way out and ``model_validate`` on the way in, so a bad
value fails loudly with the field named instead of travelling on.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

# The one grammar of --fallback (batchctl.arrival imports nothing of ours).
from batchctl.arrival import DEFAULT_FALLBACK, check_fallback

SCHEMA_VERSION: Literal[1] = 1

# Run and item ids end up in queue names, blob names and table keys, so they are restricted
# to characters that are safe in all three and can never climb out of a prefix ("..", "/").
# Queue names forbid consecutive hyphens and cap at 63 characters; "r-{run_id}-fail" must fit.
RUN_ID_PATTERN = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
RUN_ID_MAX_LENGTH = 40
ITEM_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"

RunId = Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN, max_length=RUN_ID_MAX_LENGTH)]
ItemId = Annotated[str, StringConstraints(pattern=ITEM_ID_PATTERN)]


class Contract(BaseModel):
    """Base of every boundary model: strict about unknown fields, immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class ItemStatus(StrEnum):
    """How an item ended. ``not_run`` is written by the controller, never by a worker: the
    run ended (cancelled, deadline, over budget, stalled, failed) before the item got a
    result of its own, and ``error.error_class`` says why (see :class:`NotRunReason`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_RUN = "not_run"
    # Not run again: its outputs exist from an earlier run, for the same source version and
    # task settings (--skip-existing); the record names those outputs.
    SKIPPED = "skipped"


class NotRunReason(StrEnum):
    """Why the run ended before an item had a result: the ``error_class`` of a not_run record."""

    CANCELLED = "RunCancelled"
    DEADLINE = "RunDeadline"
    OVER_BUDGET = "RunOverErrorBudget"
    STALLED = "RunStalled"
    FAILED = "RunFailed"
    TERMINATED = "RunTerminated"


class RunPhase(StrEnum):
    VALIDATING = "validating"
    ENQUEUING = "enqueuing"
    PLANNING = "planning"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    TEARING_DOWN = "tearing_down"
    MERGING = "merging"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The default budget ("auto"): a few broken files never abort a small run, a systematic
# failure (a wrong model, a missing permission) stops a large one early. See ErrorBudget.
AUTO_BUDGET_MIN_FAILURES = 10
AUTO_BUDGET_PERCENT = 5.0
AUTO_EARLY_STOP_SAMPLE = 20
AUTO_EARLY_STOP_FAILED_FRACTION = 0.9


class ErrorBudget(BaseModel):
    """How many failed items a run tolerates before it stops: auto, a count or a percentage.

    Mirrors ParallelRunStep's ``error_threshold`` (count) and ``allowed_failed_percent``.
    Accepts ``"auto"``, ``10`` / ``"10"`` (items) or ``"2.5%"`` (percent of valid items).

    ``auto`` (the default) tolerates the larger of 10 items and 5% of the valid items, and
    also stops early when nearly everything fails: once 20 items have a terminal record and
    at least 90% of them failed. An explicit count or percentage is exact control: exactly
    that many failures are tolerated and there is no early stop.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    auto: bool = False
    max_failed: int | None = Field(default=None, ge=0)
    max_failed_percent: float | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _parse_shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(
                "error budget must be 'auto', a count like 10 or a percentage like '2.5%'"
            )
        if isinstance(value, int):
            return {"max_failed": value}
        if isinstance(value, str):
            text = value.strip()
            if text.lower() == "auto":
                return {"auto": True}
            if text.endswith("%"):
                return {"max_failed_percent": text[:-1].strip()}
            if re.fullmatch(r"\d+", text):
                return {"max_failed": int(text)}
            raise ValueError(
                f"error budget {value!r} is neither 'auto', a count like 10 "
                "nor a percentage like '2.5%'"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> ErrorBudget:
        chosen = [self.auto, self.max_failed is not None, self.max_failed_percent is not None]
        if sum(chosen) != 1:
            raise ValueError(
                "error budget needs exactly one of auto, max_failed or max_failed_percent"
            )
        return self

    def allowed_failures(self, total_items: int) -> int:
        """The largest number of failed items that is still within budget."""
        if self.auto:
            return max(AUTO_BUDGET_MIN_FAILURES, int(total_items * AUTO_BUDGET_PERCENT / 100))
        if self.max_failed is not None:
            return self.max_failed
        assert self.max_failed_percent is not None
        # Floor: "1%" of 150 items tolerates 1 failure, not 2.
        return int(total_items * self.max_failed_percent / 100)

    def stops_early(self, succeeded: int, failed: int) -> bool:
        """Auto only: nearly everything fails, so the rest will too (a systematic failure)."""
        done = succeeded + failed
        return (
            self.auto
            and done >= AUTO_EARLY_STOP_SAMPLE
            and failed >= AUTO_EARLY_STOP_FAILED_FRACTION * done
        )

    def describe(self) -> str:
        if self.auto:
            return "auto"
        if self.max_failed is not None:
            return str(self.max_failed)
        return f"{self.max_failed_percent:g}%"


class FrameSize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(ge=16, le=4096)
    height: int = Field(ge=16, le=4096)

    @model_validator(mode="before")
    @classmethod
    def _parse_shorthand(cls, value: Any) -> Any:
        # "224" or 224 -> square; "320x240" -> width x height.
        if isinstance(value, int) and not isinstance(value, bool):
            return {"width": value, "height": value}
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", value)
            if not match:
                raise ValueError(f"frame size {value!r} is not like 224 or 320x240")
            width = int(match.group(1))
            return {"width": width, "height": int(match.group(2) or width)}
        return value


# An Azure ML data asset's name: letters, digits, '-', '_' and '.', starting with a letter or
# digit (azure-ai-ml's asset name rule), at most 255 characters.
DATA_ASSET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
DATA_ASSET_NAME_MAX_LENGTH = 255


# -- run options: each declared once ----------------------------------------------------------
# RunOptions is what a user gives (CLI flags, the HTTP body): one flat set of knobs. Each part
# of the system then receives only what it reads: a task its TaskSettings, a node its
# NodeSpec (once per job, in its environment; queue messages carry items only), the planner
# the fleet fields and the monitor the run's policy, both read from RunOptions on the
# controller side, which is the only place that holds all of them.
Audience = Literal["task", "node", "controller"]
FlagParse = Literal["value", "duration", "task", "model", "vm_size", "code"]


@dataclass(frozen=True)
class Flag:
    """How a run option is given on the command line: ``Annotated`` metadata of its field.

    batchctl.commands.options builds the flag from this and the field: the field's type and
    bounds check the value, its description is the help, its default the flag's default.

    ``name``: the flag; its argparse dest follows from it (``--batch-size``: ``batch_size``).
    ``parse``: how its text becomes a value where the field's type does not say: ``value`` (by
    the type: a number within the field's bounds, a switch for a bool, the shorthands of
    FrameSize and ErrorBudget), ``duration`` (90s, 5m, 2h), ``task`` and ``model`` (checked as
    far as where the run happens allows), ``vm_size``.
    ``negated``: a switch that sets its bool field to False (``--dedicated``: low_priority).
    ``fleet``: only commands that size a deployed app's fleet take it (``batchctl submit``);
    elsewhere the fleet is this machine, or the plan's own flags size it (``batchctl trial``).
    ``help``: the flag's help where it must read otherwise than the field's description (a
    negated switch; a duration typed as text, stored in seconds).
    ``default_help``: what the default means, where its value says little (None).
    ``on_retry``: ``keep`` (a retry runs with the parent run's value unless the flag is given)
    or ``choose_again`` (a run stores the value it chose for itself, not what was asked: a
    retry starts again from the default).
    """

    name: str
    parse: FlagParse = "value"
    negated: bool = False
    fleet: bool = False
    help: str | None = None
    default_help: str | None = None
    on_retry: Literal["keep", "choose_again"] = "keep"


@dataclass(frozen=True)
class NoFlag:
    """A run option without a command-line flag, on purpose; ``why`` tells the reader.

    Every option carries exactly one Flag or NoFlag (tests/test_option_declaration.py), so a
    new option cannot be left without a decision.
    """

    why: str


class OptionGroup(BaseModel):
    """The run options of one audience: those a task, a node or only the controller reads.

    Every run option is declared once, as a field of the group of its audience (ForTask,
    ForNode, ForController): its name, type, default, bounds and description (the help) are
    the pydantic field's; how a user gives it on the command line is its ``Flag`` (or
    ``NoFlag``) in ``Annotated`` metadata. The models are compositions of the groups:
    RunOptions all three (what a user gives), NodeSpec task + node (what a node is sent),
    TaskSettings task (what a task sees). The CLI flags, ``run_options_from_args`` and a
    retry's carry-over (batchctl.commands.options) and the audience sets (``option_names``)
    are derived from the fields; the HTTP schema is RunOptions' own.

    Why groups and inheritance rather than ``pydantic.create_model`` over RunOptions' fields
    tagged with an audience: for mypy a generated class is a value, not a type, and the
    worker and users' tasks read ``TaskSettings`` and ``NodeSpec`` field by field under
    ``mypy --strict``; with groups the declaration is still one, every field stays statically
    typed, and there is no second copy to check against it. The groups are siblings, not a
    chain (NodeSpec is not a TaskSettings, RunOptions not a NodeSpec), so a function that
    takes a task's settings cannot be handed a node's spec or the whole options: a task never
    sees the fleet, and the fingerprint of the task settings hashes exactly them. The CLI
    metadata is a typed marker rather than ``json_schema_extra``: code reads it (mypy checks
    that), and the HTTP schema stays about the body, not about flags.

    A group states its audience in its own body; the compositions do not, so an option
    declared on one of them instead of in a group is refused by ``audience_of``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    audience: ClassVar[Audience]


def audience_of(model: type[BaseModel], name: str) -> Audience:
    """Who reads option ``name`` of ``model``: the audience of the group that declares it."""
    for cls in model.__mro__:
        if name in inspect.get_annotations(cls):  # declared in this class's own body
            if issubclass(cls, OptionGroup) and "audience" in vars(cls):
                return cls.audience
            raise TypeError(
                f"run option {name!r} is declared on {cls.__name__}, not in an option group "
                "(ForTask, ForNode, ForController)"
            )
    raise KeyError(f"{model.__name__} has no run option {name!r}")


def option_names(model: type[BaseModel], *audiences: Audience) -> tuple[str, ...]:
    """The options of ``model`` whose audience is one of ``audiences``, in field order."""
    return tuple(name for name in model.model_fields if audience_of(model, name) in audiences)


def flag_of(model: type[BaseModel], name: str) -> Flag | NoFlag:
    """The command-line declaration of option ``name``; TypeError unless it has exactly one."""
    markers = [
        item for item in model.model_fields[name].metadata if isinstance(item, Flag | NoFlag)
    ]
    if len(markers) != 1:
        raise TypeError(
            f"run option {name!r} needs exactly one Flag(...) or NoFlag(why) in its "
            f"Annotated metadata, has {len(markers)}"
        )
    return markers[0]


class ForTask(OptionGroup):
    """The options a task reads (built in or custom): the work, never the fleet or policy."""

    audience: ClassVar[Audience] = "task"

    task: Annotated[str, Flag("--task", parse="task")] = Field(
        default="features",
        min_length=1,
        description="'features' (built in) or a custom task class as 'module:Class'",
    )
    fps: Annotated[float, Flag("--fps")] = Field(
        default=1.0, gt=0, le=60, description="frames sampled per second"
    )
    frame_size: Annotated[FrameSize, Flag("--frame-size")] = Field(
        default_factory=lambda: FrameSize(width=224, height=224),
        description="frame size fed to the model: 224 or WIDTHxHEIGHT, 16..4096 a side",
    )
    exact_timestamps: Annotated[bool, Flag("--exact-timestamps")] = Field(
        default=False,
        description="decode every frame for exact timestamps (default: the fast keyframe path)",
    )
    model: Annotated[str, Flag("--model", parse="model")] = Field(
        default="MobileNetV3Small",
        min_length=1,
        description="a keras.applications name (MobileNetV3Small, ResNet50...), "
        "Name@FILE.weights.h5, or a .keras file",
    )
    inference_batch_size: Annotated[int, Flag("--batch-size")] = Field(
        default=32, ge=1, le=4096, description="inference batch size"
    )
    code: Annotated[str | None, Flag("--code", parse="code")] = Field(
        default=None,
        max_length=4096,
        description="a folder holding your task's code (and an optional requirements.txt): "
        "packed, uploaded by content, and first on sys.path on every node; the run carries "
        "its reference (sha256:HEX/code.zip), never the folder's path",
    )


class ForNode(OptionGroup):
    """The options a node reads besides its task's: timeouts, attempts, how work is packed."""

    audience: ClassVar[Audience] = "node"

    item_timeout_s: Annotated[float, Flag("--item-timeout")] = Field(
        default=900, gt=0, description="seconds one item may take"
    )
    visibility_timeout_s: Annotated[
        int,
        NoFlag(
            "a property of the queue protocol, not of the work: the default fits items of "
            "any length (a node extends it while an item runs); the HTTP body can set it"
        ),
    ] = Field(
        default=120,
        ge=10,
        le=7 * 24 * 3600,
        description="seconds a received message stays hidden before it is delivered again",
    )
    max_attempts: Annotated[int, Flag("--max-attempts")] = Field(
        default=3, ge=1, le=100, description="attempts per item before it fails"
    )
    idle_exit_s: Annotated[float, Flag("--idle-exit")] = Field(
        default=60, ge=0, description="seconds a worker waits on an empty queue before it exits"
    )
    # The node's own business (it names it in every item's metadata.json); the controller
    # starts the run's jobs on it.
    image: Annotated[str | None, Flag("--image", fleet=True, default_help="the deployment's")] = (
        Field(
            default=None,
            min_length=1,
            max_length=512,
            pattern=r"^[a-z0-9][a-z0-9._/:@-]*$",
            description="the image the run's nodes start (REGISTRY/NAME:TAG or @sha256:...): "
            "FROM the project's node image plus your packages (docs/own-work.md); nodes on "
            "this machine are its own processes and use none",
        )
    )
    # None until the run starts, which chooses it (up to 8, keeping at least 4 messages per
    # node: batchctl.packing) and stores it, so every message, the plan and the nodes agree.
    # A retry's parent therefore holds its run's choice, not the user's: chosen again.
    mini_batch_size: Annotated[
        int | None,
        Flag("--mini-batch", default_help="chosen when the run starts", on_retry="choose_again"),
    ] = Field(default=None, ge=1, le=64, description="items per queue message")
    # Both built-in tasks split (node_image/worker/segments.py).
    segment_seconds: Annotated[
        float | None, Flag("--segment-seconds", default_help="never split")
    ] = Field(
        default=None,
        ge=1,
        le=24 * 3600,
        description="split videos longer than this many seconds into segments run on "
        "several nodes at once, assembled into one item with the unsplit run's output "
        "(features, or the transformed video)",
    )

    @property
    def items_per_message(self) -> int:
        """Items per queue message. The orchestrator sets ``mini_batch_size`` when a run
        starts, so every message, the plan and the nodes agree; 1 until then."""
        return self.mini_batch_size or 1


class ForController(OptionGroup):
    """The options only the controller reads: the fleet, the run's policy, what comes after."""

    audience: ClassVar[Audience] = "controller"

    # The fleet.
    processes_per_node: Annotated[
        int,
        NoFlag(
            "follows from the VM size (one worker process per GPU), which only a deployed "
            "app's fleet has; the HTTP body can set it"
        ),
    ] = Field(default=1, ge=1, le=16, description="worker processes per node")
    vm_size: Annotated[str, Flag("--vm-size", parse="vm_size", fleet=True)] = Field(
        default="Standard_NC4as_T4_v3", min_length=1, description="Azure VM size of a node"
    )
    low_priority: Annotated[
        bool, Flag("--dedicated", negated=True, fleet=True, help="dedicated, not low-priority, VMs")
    ] = Field(default=True, description="low-priority (preemptible) VMs, not dedicated ones")
    max_nodes: Annotated[int, Flag("--max-nodes", fleet=True)] = Field(
        default=100, ge=1, le=10_000, description="nodes at most, over all clusters"
    )
    deadline_s: Annotated[
        float | None,
        Flag(
            "--deadline",
            parse="duration",
            help="stop the run after this long: 90s, 5m, 2h",
            default_help="no deadline",
        ),
    ] = Field(default=None, gt=0, description="wall-clock budget of the run, in seconds")
    sec_per_video_s: Annotated[
        float | None,
        Flag("--sec-per-video-second", fleet=True, default_help="per item at the app's rate"),
    ] = Field(
        default=None,
        gt=0,
        le=3600,
        description="node-seconds per second of video (batchctl trial prints it as "
        "node_s_per_video_s): with a duration_s column in the manifest the fleet is sized by "
        "video length, the longest video (or segment) included",
    )
    # Failure handling.
    error_budget: Annotated[ErrorBudget, Flag("--error-budget")] = Field(
        default_factory=lambda: ErrorBudget(auto=True),
        description="failures tolerated before the run stops: auto (the larger of 10 items "
        "and 5%, and an early stop when nearly all fail), a count like 10 or a share like 2.5%",
    )
    strict_manifest: Annotated[bool, Flag("--strict")] = Field(
        default=False, description="refuse the whole run on any bad manifest row"
    )
    fallback: Annotated[str, Flag("--fallback", fleet=True), AfterValidator(check_fallback)] = (
        Field(
            default=DEFAULT_FALLBACK,
            min_length=1,
            max_length=64,
            description="what the run does when no node comes (no low-priority capacity, "
            "quota used elsewhere): 'stop@30m' ends it, failed, once no node has run for "
            "that long (any duration of 5m or more), with the reason; 'wait' waits as long "
            "as it takes (the deadline still applies); 'dedicated:USD[@30m]' moves the fleet "
            "to dedicated VMs if their plan costs at most USD; 'size:VM[,VM...][@30m]' to "
            "each VM size in turn; then stop. The status says why all along",
        )
    )
    # Timing.
    poll_interval_s: Annotated[float, Flag("--poll")] = Field(
        default=30, gt=0, le=3600, description="seconds between progress polls"
    )
    # After the run.
    skip_existing: Annotated[bool, Flag("--skip-existing")] = Field(
        default=False,
        description="do not run items an earlier run already did for the same source version "
        "and task settings (they are counted as skipped)",
    )
    merge_outputs: Annotated[bool, Flag("--merge-outputs")] = Field(
        default=False,
        description="after a completed run, merge every succeeded item's features into one "
        "Parquet dataset under the run's outputs prefix (merged/)",
    )
    register_output: Annotated[
        str | None, Flag("--register-output", default_help="not registered")
    ] = Field(
        default=None,
        min_length=1,
        max_length=DATA_ASSET_NAME_MAX_LENGTH,
        pattern=DATA_ASSET_NAME_PATTERN,
        description="after a completed run, merge its outputs (as --merge-outputs) and "
        "register the merged dataset as a new version of the Azure ML data asset NAME "
        "(uri_folder), which a later AML job takes as azureml:NAME:VERSION; a run on this "
        "machine writes what would be registered beside the merged output instead",
    )

    @property
    def merges_outputs(self) -> bool:
        """Whether a completed run merges its outputs: asked for, or needed to register them."""
        return self.merge_outputs or self.register_output is not None


# The compositions. Bases are listed last group first: pydantic orders fields from the last
# base, and the task's fields lead, as the JSON a node reads (and the fingerprint of the task
# settings) always had them.
class TaskSettings(ForTask):
    """What a task sees (built in or custom): the work, never the fleet or the run's policy."""


class NodeSpec(ForNode, ForTask):
    """What a node needs, sent once per job in its environment (never in every message)."""

    def task_settings(self) -> TaskSettings:
        return TaskSettings.model_validate(
            self.model_dump(include=set(option_names(type(self), "task")))
        )


class RunOptions(ForController, ForNode, ForTask):
    """How to run: every knob of a run, with defaults a first-time user can live with."""

    def node_spec(self) -> NodeSpec:
        """What the run's nodes need (see NodeSpec)."""
        return NodeSpec.model_validate(
            self.model_dump(include=set(option_names(type(self), "task", "node")))
        )

    def task_settings(self) -> TaskSettings:
        return self.node_spec().task_settings()

    @field_validator("task")
    @classmethod
    def _task_is_known_or_importable(cls, value: str) -> str:
        # Imported here: workspec is the one list of built-in tasks (the CLI and the worker
        # read it too), and it imports nothing of the contracts. Checked where a user gives
        # the task; a node takes what the controller checked.
        from batchctl.workspec import BUILTIN_TASKS

        if value in BUILTIN_TASKS or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            return value
        raise ValueError(
            f"task {value!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
            "nor 'module:Class'"
        )


# What each audience sees, by the declaration.
TASK_FIELDS = option_names(RunOptions, "task")
NODE_FIELDS = option_names(RunOptions, "task", "node")


class RunRequest(Contract):
    """What to run: a manifest (blob path or URL, or a local file in local mode) and how."""

    run_id: RunId
    manifest: str = Field(min_length=1, max_length=2048)
    options: RunOptions = Field(default_factory=RunOptions)
    parent_run_id: RunId | None = Field(
        default=None, description="the run this one retries (batchctl retry), if any"
    )
    claim: str | None = Field(
        default=None,
        max_length=200,
        description=(
            "set by the orchestrator when the run starts: what the run's claim on its id in "
            "storage says, so a second run under the same id is refused, never mixed in"
        ),
    )
    manifest_label: str | None = Field(
        default=None,
        max_length=4096,
        description="the manifest as the user named it (a local path), shown by the report",
    )


class Segment(BaseModel):
    """One time range of a long video, processed on its own (node_image/worker/segments.py).

    Segment ``index`` of ``count`` covers ``[start_s, end_s)`` of the video's timeline
    (``end_s`` None: to the end), and gets exactly the samples of the whole video in it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    count: int = Field(ge=2, le=10_000)
    start_s: float = Field(ge=0)
    end_s: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Segment:
        if self.index >= self.count:
            raise ValueError(f"segment index {self.index} is not below its count {self.count}")
        if (self.end_s is None) != (self.index == self.count - 1):
            raise ValueError("only the last segment is open-ended, and it always is")
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError("a segment ends after it starts")
        return self


class ManifestItem(BaseModel):
    """One valid manifest row, normalized; what a chunk line and a work item hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: ItemId
    source: str = Field(min_length=1)
    row: int = Field(ge=2, description="the row's number in the manifest (the header is row 1)")
    metadata: dict[str, str] = Field(default_factory=dict)
    # Set only on the messages a worker sends when it splits a long video: the item is
    # still the row's, and this says which part of it the message asks for.
    segment: Segment | None = None

    @model_serializer(mode="wrap")
    def _without_absent_segment(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A whole item serializes exactly as before the field existed: chunk lines and
        # messages keep their size, and a worker without segments reads them unchanged.
        data = handler(self)
        if isinstance(data, dict) and data.get("segment") is None:
            data.pop("segment", None)
        return data


class WorkItem(Contract):
    """One queue message: a mini-batch of one or a few items of a run, and nothing else
    (how to process them reaches each node once, as its NodeSpec)."""

    run_id: RunId
    items: list[ManifestItem] = Field(min_length=1, max_length=64)


class StageTimings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    download_s: float = Field(default=0.0, ge=0)
    decode_s: float = Field(default=0.0, ge=0)
    inference_s: float = Field(default=0.0, ge=0)
    upload_s: float = Field(default=0.0, ge=0)
    total_s: float = Field(default=0.0, ge=0)


class ItemError(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    error_class: str = Field(min_length=1)
    message: str
    permanent: bool
    attempts: int = Field(ge=1)


class ItemResult(Contract):
    """The terminal record of one item: success with outputs and timings, or failure."""

    run_id: RunId
    item_id: ItemId
    status: ItemStatus
    source: str = ""
    outputs: list[str] = Field(default_factory=list)
    timings: StageTimings = Field(default_factory=StageTimings)
    error: ItemError | None = None
    node: str = ""
    finished_at: datetime | None = None
    # How much video the item was: what the trial's seconds per second of video and the
    # plan's per-video-second cost are measured on. None in older records and where the task
    # does not say (a custom task without duration_s / frames in its metadata).
    media_s: float | None = Field(
        default=None, ge=0, description="seconds of source video the item covered"
    )
    frames: int | None = Field(default=None, ge=0, description="frames the task processed")
    source_version: str | None = Field(
        default=None,
        max_length=256,
        description="the version of the source the worker read (a blob's ETag, or a local "
        "video's size and modification time): what --skip-existing indexes; None where not "
        "known",
    )

    @model_validator(mode="after")
    def _error_matches_status(self) -> ItemResult:
        ended_well = self.status in (ItemStatus.SUCCEEDED, ItemStatus.SKIPPED)
        if not ended_well and self.error is None:
            raise ValueError(f"a {self.status.value} item result needs an error saying why")
        if self.status is ItemStatus.SUCCEEDED and self.error is not None:
            raise ValueError("a succeeded item result cannot carry an error")
        return self


class ManifestError(BaseModel):
    """One rejected manifest row: where it is and why it was rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row: int = Field(ge=1, description="record number, header = 1")
    line: int = Field(ge=1, description="physical line where the record starts")
    field: str | None = None
    reason: str


def chunk_blob_name(run_id: str, index: int) -> str:
    """Where chunk ``index`` of a run lives in the runs container (derived, never carried:
    the orchestrator's state holds a count, not a name per chunk)."""
    return f"{run_id}/chunks/chunk-{index:05d}.jsonl"


class MediaSummary(BaseModel):
    """A manifest's ``duration_s`` column, tallied while it was validated: the work in
    seconds of video that a plan by video length sizes (batchctl.planning.MediaWork).

    ``pieces`` are the units nodes take (an item, or each segment of a split one, at the
    run's ``segment_seconds``); ``estimated`` items had no usable duration and count as the
    mean of the others; ``unreadable_rows`` names the first rows whose cell was no duration
    (their videos still run: the column only plans).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: int = Field(ge=0)
    pieces: int = Field(ge=0)
    media_s: float = Field(ge=0)
    longest_piece_s: float = Field(ge=0)
    longest_item_s: float = Field(ge=0)
    segment_s: float | None = None
    estimated: int = Field(default=0, ge=0)
    split_items: int = Field(default=0, ge=0, description="items cut into segments")
    unreadable: int = Field(default=0, ge=0)
    unreadable_rows: list[int] = Field(default_factory=list, max_length=5)


class ManifestSummary(Contract):
    """What validating a manifest produced: chunk names, counts, and where the errors are."""

    run_id: RunId
    manifest: str
    rows: int = Field(ge=0)
    valid: int = Field(ge=0)
    invalid: int = Field(ge=0)
    chunk_count: int = Field(ge=0, description="chunks written, named by chunk_blob_name")
    skipped: int = Field(
        default=0, ge=0, description="valid items recorded as skipped (--skip-existing)"
    )
    run_id_taken: bool = Field(
        default=False,
        description="another run holds this run id in this storage: nothing may be touched",
    )
    errors_blob: str | None = None
    first_errors: list[ManifestError] = Field(default_factory=list)
    fatal: str | None = Field(
        default=None, description="set when the manifest as a whole is unusable (no header...)"
    )
    media: MediaSummary | None = Field(
        default=None, description="the duration_s column's tally, when the manifest has one"
    )
    fleet_nodes: int | None = Field(
        default=None,
        ge=1,
        description="the most nodes the run can get from its compute (a local session's node "
        "count, or the run's max_nodes): what its messages are packed for; None in a history "
        "from before it was recorded (then max_nodes)",
    )

    @property
    def chunks(self) -> list[str]:
        return [chunk_blob_name(self.run_id, index) for index in range(self.chunk_count)]


class ClusterPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=2, max_length=32)
    nodes: int = Field(ge=1, le=100)
    vm_size: str
    low_priority: bool


BindingLimit = Literal["deadline", "quota", "max_nodes", "items", "max_clusters", "none"]


class RunPlan(Contract):
    run_id: RunId
    clusters: list[ClusterPlan]
    total_nodes: int = Field(ge=0)
    est_makespan_s: float = Field(ge=0)
    est_cost: float = Field(ge=0)
    binding_limit: BindingLimit
    notes: list[str] = Field(default_factory=list)
    # The report prices the nodes actually billed with the same rate the estimate used; a
    # plan without one (local mode, older plans) gets an "unknown" actual cost, never a guess.
    price_per_hour: float | None = Field(
        default=None, ge=0, description="USD per node-hour that est_cost was computed with"
    )

    @model_validator(mode="after")
    def _total_matches_clusters(self) -> RunPlan:
        if sum(cluster.nodes for cluster in self.clusters) != self.total_nodes:
            raise ValueError("total_nodes must equal the sum of the clusters' nodes")
        return self


class RunProgress(Contract):
    """Where a run stands; what the Durable custom status and GET /api/runs/{id} show."""

    run_id: RunId
    phase: RunPhase
    total: int = Field(ge=0)
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    invalid: int = Field(default=0, ge=0)
    not_run: int = Field(default=0, ge=0, description="items the run ended without running")
    skipped: int = Field(default=0, ge=0, description="items whose outputs existed already")
    started_at: datetime | None = None
    updated_at: datetime | None = None
    eta_s: float | None = None
    message: str = Field(default="", max_length=2000)
    nodes_active: int | None = Field(
        default=None, ge=0, description="nodes working now (their jobs run); None: not known"
    )
    nodes_planned: int | None = Field(default=None, ge=0, description="the plan's node count")

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.not_run + self.skipped

    @property
    def remaining(self) -> int:
        return max(self.total - self.done, 0)

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else round(100.0 * self.done / self.total, 2)


class StageStats(BaseModel):
    """One stage's per-item durations over the run's succeeded items, in seconds.

    count, mean, min and max are exact; the quantiles come from a bounded reservoir sample
    of ``sample_size`` durations (exact whenever ``sample_size == count``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    count: int = Field(ge=0)
    sample_size: int = Field(ge=0)
    mean_s: float = 0.0
    min_s: float = 0.0
    p25_s: float = 0.0
    p50_s: float = 0.0
    p75_s: float = 0.0
    p90_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0


class TimelinePoint(BaseModel):
    """Items with a terminal record by ``t_s`` seconds after the run started (cumulative)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t_s: float
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)


class NodeThroughput(BaseModel):
    """What one node (as the worker named itself) finished, and how fast."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    busy_s: float = Field(
        ge=0, description="sum of its items' total_s (items overlap: can exceed active_s)"
    )
    active_s: float = Field(ge=0, description="its first item's start to its last item's end")
    items_per_hour: float | None = Field(default=None, description="items / active time")


class FailureExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str
    source: str
    message: str
    attempts: int = Field(ge=1)


class FailureClass(BaseModel):
    """Failed items of one error class: the exact count and the first few examples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error_class: str
    count: int = Field(ge=0)
    permanent: int = Field(ge=0, description="how many were permanent (not retried)")
    examples: list[FailureExample] = Field(default_factory=list)


class CostStats(BaseModel):
    """GPU node time billed vs busy, and the plan's cost estimate vs the actual estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node_seconds_billed: float = Field(ge=0)
    node_seconds_busy: float = Field(ge=0)
    idle_fraction: float | None = Field(default=None, ge=0, le=1)
    billed_basis: str = Field(description="which estimate of billed time was used, and why")
    price_per_hour: float | None = Field(default=None, ge=0)
    est_cost: float | None = Field(default=None, ge=0)
    actual_cost: float | None = Field(default=None, ge=0)
    cost_note: str = ""


class RunStats(BaseModel):
    """The analysis behind report.html, so report.json holds every number the HTML shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wall_s: float = Field(ge=0)
    timeline_bin_s: float = Field(gt=0)
    timeline: list[TimelinePoint] = Field(default_factory=list)
    undated: int = Field(
        default=0,
        ge=0,
        description="terminal records without a usable finished_at (missing or far off)",
    )
    stages: list[StageStats] = Field(default_factory=list)
    nodes: list[NodeThroughput] = Field(default_factory=list)
    failures: list[FailureClass] = Field(default_factory=list)
    cost: CostStats
    notes: list[str] = Field(default_factory=list)
    media_s: float | None = Field(
        default=None,
        ge=0,
        description="seconds of source video the succeeded items covered, over media_items "
        "of them (those whose record says); None when no record says",
    )
    media_items: int = Field(default=0, ge=0, description="succeeded items with a media_s")


class PlannedNode(BaseModel):
    """One node slot of the plan and what it did: every slot is listed, idle ones too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str
    slot: int = Field(ge=0)
    vm_size: str
    workers: list[str] = Field(
        default_factory=list, description="worker nodes (as they named themselves) of this slot"
    )
    succeeded: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    logs: list[str] = Field(
        default_factory=list, description="where the slot's logs are (files, or AML job names)"
    )


class PhaseMarker(BaseModel):
    """A moment of the run on the report's timeline, in seconds after it started."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    t_s: float
    note: str = ""


class RunReport(Contract):
    """The final word on a run, written under the run's prefix as report.json."""

    run_id: RunId
    phase: RunPhase
    manifest: str
    total: int = Field(ge=0)
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    invalid: int = Field(ge=0)
    started_at: datetime
    finished_at: datetime
    plan: RunPlan | None = None
    not_run: int = Field(
        default=0, ge=0, description="items with a not_run record: the run ended before them"
    )
    skipped: int = Field(
        default=0, ge=0, description="items not run again: their outputs existed already"
    )
    failures_by_class: dict[str, int] = Field(default_factory=dict)
    not_run_by_reason: dict[str, int] = Field(default_factory=dict)
    output_prefix: str
    weights: str = ""
    message: str = ""
    stats: RunStats | None = Field(
        default=None, description="the analysis report.html plots (None in older reports)"
    )
    # What a person acts on (all optional: older reports have none of it).
    manifest_label: str | None = Field(
        default=None, description="the manifest as the user named it"
    )
    parent_run_id: str | None = Field(default=None, description="the run this one retried")
    options: RunOptions | None = None
    local: bool = Field(default=False, description="a local run: worker processes, no GPU prices")
    invalid_rows: list[ManifestError] = Field(
        default_factory=list, description="the first invalid rows (all in invalid_rows_file)"
    )
    invalid_rows_file: str | None = Field(default=None, description="runs-container blob name")
    planned_nodes: list[PlannedNode] = Field(default_factory=list)
    unplanned_workers: list[str] = Field(
        default_factory=list, description="worker nodes that matched no planned slot"
    )
    phases: list[PhaseMarker] = Field(default_factory=list)
    failed_csv: str | None = Field(
        default=None, description="runs-container blob: the failed and not-run manifest rows"
    )
    index_csv: str | None = Field(
        default=None, description="runs-container blob: row, item_id, source, status, folder"
    )
    merged_dataset: str | None = Field(
        default=None, description="outputs-container prefix of the merged Parquet dataset"
    )
    data_asset: DataAssetRegistration | None = Field(
        default=None,
        description="the merged dataset as an AML data asset (--register-output), or what "
        "would have been registered (a local run)",
    )


class DataAssetRegistration(Contract):
    """A completed run's merged dataset as an Azure ML data asset (``--register-output``).

    ``registered`` is False for a run on this machine: nothing was sent, and this record,
    written beside the merged output, is what an AML workspace would have been asked for.
    """

    run_id: RunId
    name: str = Field(pattern=DATA_ASSET_NAME_PATTERN, max_length=DATA_ASSET_NAME_MAX_LENGTH)
    version: str | None = Field(
        default=None, description="the version AML gave it; None when nothing was registered"
    )
    type: Literal["uri_folder"] = "uri_folder"
    path: str = Field(description="where the data is: the merged dataset's folder URL")
    description: str
    tags: dict[str, str] = Field(default_factory=dict)
    registered: bool
    backend: str = Field(description="who registered it (aml), or local: nobody")
    record_blob: str = Field(description="outputs-container blob holding this record")

    @property
    def reference(self) -> str | None:
        """What a downstream AML job names as its input: ``azureml:NAME:VERSION``."""
        return f"azureml:{self.name}:{self.version}" if self.version is not None else None

    @property
    def note(self) -> str:
        """One line on the asset for the run's message (its status and its report)."""
        if self.registered and self.reference is not None:
            return f"registered the merged output as data asset {self.reference}"
        return (
            f"data asset {self.name!r} not registered (a run on this machine registers "
            f"nothing): what would be registered is in {self.record_blob}"
        )


class JobState(StrEnum):
    """Our own view of a compute job, whatever the backend calls it."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    cluster: str
    state: JobState
    detail: str = ""
    # Nodes the job runs on while it runs (an AML job is one node slot; a local job is N
    # worker processes, of which some may have exited).
    nodes: int = Field(default=1, ge=0)


class JobCounts(BaseModel):
    """How many of a run's jobs are in each state: what a poll carries into Durable history.

    Counts, not the jobs: with one job per node a fleet has up to thousands of jobs, and a
    list of them in every poll would grow each generation's history by megabytes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queued: int = Field(default=0, ge=0)
    running: int = Field(default=0, ge=0)
    completed: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    cancelled: int = Field(default=0, ge=0)
    nodes_running: int = Field(default=0, ge=0, description="nodes of the running jobs")

    @model_validator(mode="before")
    @classmethod
    def _from_job_list(cls, value: Any) -> Any:
        # A list of jobs (JobInfo or their dicts) is counted: the backends report jobs.
        if isinstance(value, list):
            counts = dict.fromkeys(JobState, 0)
            nodes = 0
            for raw in value:
                job = raw if isinstance(raw, JobInfo) else JobInfo.model_validate(raw)
                counts[job.state] += 1
                nodes += job.nodes if job.state is JobState.RUNNING else 0
            return {
                **{state.value: count for state, count in counts.items()},
                "nodes_running": nodes,
            }
        return value

    @property
    def total(self) -> int:
        return self.queued + self.running + self.completed + self.failed + self.cancelled

    @property
    def active(self) -> int:
        return self.queued + self.running

    @property
    def lost(self) -> int:
        """Jobs that ended abnormally: failed, or cancelled by someone else (preempted)."""
        return self.failed + self.cancelled


class ChunkTask(Contract):
    """One chunk of a run's validated manifest to enqueue."""

    run_id: RunId
    chunk: str
    options: RunOptions


class WaveTask(Contract):
    """Input of the enqueue activity: chunks ``first`` to ``first + count - 1`` of a run.

    One activity per wave of chunks, not one per chunk: the orchestrator's history then
    grows by one activity per wave, and the queue (about 2,000 messages/s) is the limit
    either way.
    """

    run_id: RunId
    first: int = Field(ge=0)
    count: int = Field(ge=1)
    options: RunOptions


class ProgressSnapshot(Contract):
    """What one poll of a running run sees: exact ledger counts plus the jobs' states."""

    run_id: RunId
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    queued_messages: int = Field(ge=0)
    skipped: int = Field(default=0, ge=0, description="items skipped at validation")
    jobs: JobCounts = Field(default_factory=JobCounts)
    cancel_requested: bool = Field(
        default=False,
        description="the run's durable cancel flag is set (written by the cancel API)",
    )
    work_refused: str | None = Field(
        default=None,
        max_length=4000,
        description="why a node could not set the run's task up (its code, model or "
        "requirements), as the first node to meet it reported it (batchctl.refusals)",
    )
    fleet_note: str | None = Field(
        default=None,
        max_length=2000,
        description="what the compute says about nodes that do not come (the clusters' "
        "allocation errors), or why the jobs' states are unknown this poll",
    )
    job_error: str | None = Field(
        default=None,
        max_length=2000,
        description="the error text of a failed job (AML's own words), the first one read",
    )
    start_failure: bool = Field(
        default=False,
        description="job_error says the node could not start the image (a pull that "
        "failed, a container that would not start): resubmitting cannot help",
    )

    @property
    def done(self) -> int:
        """Items with a terminal record, or skipped at validation, as of this poll."""
        return self.succeeded + self.failed + self.skipped


class RunState(Contract):
    """The orchestrator's own input, carried across ``continue_as_new``.

    Only small things live here (chunk names, not items) so history stays bounded.
    """

    run_id: RunId
    request: RunRequest
    stage: Literal["start", "enqueue", "monitor"] = "start"
    next_chunk: int = Field(default=0, ge=0, description="the first chunk not yet enqueued")
    started_at: datetime | None = None
    summary: ManifestSummary | None = None
    plan: RunPlan | None = None
    polls: int = Field(default=0, ge=0)
    resubmits: int = Field(
        default=0, ge=0, description="resubmits since an item last reached a terminal record"
    )
    last_done: int = Field(default=0, ge=0, description="terminal records at the last poll")
    stall_since: datetime | None = Field(
        default=None,
        description=(
            "since when no item reached a terminal record while a job was running (None: "
            "progress at the last poll, or no job running)"
        ),
    )
    nodeless_since: datetime | None = Field(
        default=None,
        description="since when jobs have waited for nodes with no node running (None: a "
        "node runs, or no job waits)",
    )
    fallbacks: int = Field(
        default=0, ge=0, description="moves of --fallback taken (the fleet was replaced)"
    )


class FleetMoveTask(Contract):
    """Input of the fallback activity: replace the run's waiting fleet by move ``move``."""

    run_id: RunId
    state: RunState
    move: int = Field(ge=0, description="which of --fallback's moves (0: the first)")


class FleetMoveOutcome(Contract):
    """What a fallback did: the new fleet's plan, or why it was not started (None)."""

    run_id: RunId
    plan: RunPlan | None = None
    message: str = Field(default="", max_length=2000)


MergeSkipReason = Literal["no_features_output", "features_missing", "unreadable", "dim_mismatch"]


class MergeSkip(BaseModel):
    """One succeeded item whose features could not join the merged dataset, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: ItemId
    reason: MergeSkipReason
    detail: str = ""


class MergeSummary(Contract):
    """What merging a run's per-item features into one Parquet dataset produced.

    Every succeeded item in the ledger is either merged (``items``) or skipped (``skipped``,
    counted by reason); none is dropped silently. ``skipped_items`` lists the first few only,
    so the summary stays small in Durable history.
    """

    run_id: RunId
    prefix: str = Field(description="outputs-container prefix of the dataset: {run_id}/merged/")
    manifest_blob: str = Field(description="the dataset's _manifest.json (written last)")
    parts: list[str] = Field(default_factory=list)
    rows: int = Field(ge=0)
    items: int = Field(ge=0, description="succeeded items merged (one row set each)")
    dim: int | None = Field(default=None, ge=1)
    skipped: int = Field(default=0, ge=0)
    skipped_by_reason: dict[str, int] = Field(default_factory=dict)
    skipped_items: list[MergeSkip] = Field(default_factory=list)
    duplicate_records: int = Field(
        default=0, ge=0, description="ledger records repeating an item id (ignored; expected 0)"
    )
    stale_parts_deleted: int = Field(default=0, ge=0)
    warnings: list[str] = Field(default_factory=list)
