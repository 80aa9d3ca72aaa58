"""Pure policy for a fleet that does not arrive: how long a run waits for nodes, and what
it says meanwhile.

A low-priority fleet can stay queued for ever: no capacity in the region, quota spent by
something else, a cluster that cannot scale. Its jobs are active, so the resubmit policy
sees nothing to do, and no job runs, so the stall clock never starts. This module keeps a
second clock for that case, ``nodeless_since``: it starts at the first poll that sees jobs
waiting for nodes while none runs, and stops as soon as a node runs. What the run does
once the wait passes a limit is the user's choice, ``RunOptions.fallback``:

- ``stop@DURATION`` (the default, ``stop@30m``): end the run, failed, with the reason in
  the status and the report; the compute is torn down and the items are recorded not run.
  It never spends more than the user asked for; a retry can then choose ``--dedicated`` or
  another ``--vm-size``.
- ``wait``: wait as long as it takes (the deadline, if any, still ends the run); the status
  says all along why no node has come.
- ``dedicated:USD[@DURATION]``: move the fleet to dedicated VMs of the same size, if the
  plan for them costs at most USD (the plan states the cap; a price it cannot know refuses
  the move); then stop as ``stop`` does if those do not come either.
- ``size:VM[,VM...][@DURATION]``: move the fleet to each VM size in turn (same tier), each
  given the same wait; then stop.

A move cancels the waiting jobs and starts a fleet on new clusters (the old ones, empty,
are deleted with the rest at teardown).

No I/O and no clock: the orchestrator passes ``now`` from ``context.current_utc_datetime``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final, Literal

from pydantic_core import PydanticCustomError

if TYPE_CHECKING:  # contracts imports this module: only the type checker goes the other way
    from batchctl.contracts import RunOptions

__all__ = [
    "DEFAULT_FALLBACK",
    "Fallback",
    "FleetMove",
    "advance_nodeless_since",
    "arrival_note",
    "check_fallback",
    "fallback_plan_note",
    "moved_options",
    "parse_fallback",
]

DEFAULT_FALLBACK: Final = "stop@30m"
"""What a run does when no node comes: stop after 30 minutes with the reason."""

FallbackAction = Literal["wait", "stop", "dedicated", "size"]

_FALLBACK = re.compile(
    r"(?P<action>(?i:wait|stop|dedicated|size))(?::(?P<arguments>[^@]*))?(?:@(?P<after>.*))?"
)
_VM_SIZE = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,63}")
_DEFAULT_STOP_AFTER_S: Final = 30 * 60.0
# Below a couple of polls the limit would stop runs whose nodes are merely slow to boot
# (AML allocates and pulls the image in minutes even when capacity is there).
MIN_WAIT_S: Final = 5 * 60.0
_USAGE: Final = (
    "'wait', 'stop[@30m]', 'dedicated:USD[@30m]' (at most USD for dedicated VMs) or "
    "'size:VM[,VM...][@30m]'"
)


@dataclass(frozen=True)
class FleetMove:
    """One step of a fallback: the fleet's VM size and tier after it (None: unchanged)."""

    vm_size: str | None = None
    low_priority: bool | None = None

    def describe(self, current_vm_size: str) -> str:
        size = self.vm_size or current_vm_size
        return f"dedicated {size}" if self.low_priority is False else size


@dataclass(frozen=True)
class Fallback:
    """The parsed ``--fallback``: what to do once no node has run for ``after_s`` seconds.

    ``moves`` are tried in order, each after its own wait; once they are spent the run
    stops (``wait``: never). ``max_cost_usd`` caps what a moved fleet's plan may cost.
    """

    action: FallbackAction
    after_s: float | None  # None: wait for ever
    moves: tuple[FleetMove, ...] = ()
    max_cost_usd: float | None = None

    def describe(self) -> str:
        if self.after_s is None:
            return self.action
        after = f"@{_minutes(self.after_s)}"
        if self.action == "dedicated":
            return f"dedicated:{self.max_cost_usd:g}{after}"
        if self.action == "size":
            return f"size:{','.join(move.vm_size or '' for move in self.moves)}{after}"
        return f"stop{after}"


def parse_fallback(text: str) -> Fallback:
    """One of :data:`_USAGE`; ValueError saying what is wrong and how it is written."""
    from batchctl.planning import parse_duration

    match = _FALLBACK.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"fallback {text!r} is none of {_USAGE}")
    action = match.group("action").lower()
    arguments, after = match.group("arguments"), match.group("after")
    if action == "wait":
        if arguments is not None or after is not None:
            raise ValueError(f"fallback {text!r}: 'wait' waits for ever and takes nothing more")
        return Fallback("wait", None)
    try:
        after_s = parse_duration(after) if after is not None else _DEFAULT_STOP_AFTER_S
    except ValueError as error:
        raise ValueError(f"fallback {text!r}: {error}") from None
    if after_s < MIN_WAIT_S:
        raise ValueError(
            f"fallback {text!r}: wait at least {_minutes(MIN_WAIT_S)} for nodes "
            "(AML takes minutes to allocate a node and pull the image)"
        )
    if action == "stop":
        if arguments is not None:
            raise ValueError(f"fallback {text!r}: 'stop' takes only a wait, like 'stop@30m'")
        return Fallback("stop", after_s)
    if action == "dedicated":
        return Fallback(
            "dedicated", after_s, (FleetMove(low_priority=False),), _cost_cap(text, arguments)
        )
    sizes = [size.strip() for size in (arguments or "").split(",")]
    bad = [size for size in sizes if not _VM_SIZE.fullmatch(size)]
    if not sizes or bad:
        raise ValueError(
            f"fallback {text!r}: name the VM sizes to try, like "
            f"'size:Standard_NC6s_v3,Standard_NC8as_T4_v3' (not {', '.join(map(repr, bad))})"
        )
    return Fallback("size", after_s, tuple(FleetMove(vm_size=size) for size in sizes))


def _cost_cap(text: str, arguments: str | None) -> float:
    try:
        cap = float(arguments) if arguments else None
    except ValueError:
        cap = None
    if cap is None or not math.isfinite(cap) or cap <= 0:
        raise ValueError(
            f"fallback {text!r}: say the most the dedicated fleet may cost, in USD, "
            "like 'dedicated:50'"
        )
    return cap


def check_fallback(text: str) -> str:
    """``text`` if it parses (the option's validator), in its normal spelling.

    A refusal is pydantic's own error type, so the flag and the HTTP answer say the rule
    alone (a ValueError would read "Value error, fallback ...")."""
    try:
        return parse_fallback(text).describe()
    except ValueError as error:
        raise PydanticCustomError("fallback", str(error)) from None


def advance_nodeless_since(
    previous: datetime | None, *, queued: int, nodes_running: int, known: bool, now: datetime
) -> datetime | None:
    """Since when jobs have waited for nodes while no node runs, after this poll.

    A poll that knows nothing of compute (``known`` False: the job listing was throttled)
    leaves the clock as it was; a node running stops it; jobs queued with no node start it.
    Jobs that all ended are the resubmit policy's business, not a wait for capacity.
    """
    if not known:
        return previous
    if nodes_running > 0 or queued == 0:
        return None
    return previous or now


def waited_s(nodeless_since: datetime | None, now: datetime) -> float:
    """Seconds the run has waited for a node (0 when it is not waiting)."""
    return 0.0 if nodeless_since is None else max((now - nodeless_since).total_seconds(), 0.0)


def arrival_note(
    *, nodes_running: int, nodes_planned: int | None, waited: float, why: str | None
) -> str:
    """``0 of 65 nodes after 12 min: <why>``: what the status says while nodes do not come.

    ``why`` is what the compute itself says (the clusters' allocation errors, in words);
    without it the note says only that the jobs wait.
    """
    planned = f" of {nodes_planned}" if nodes_planned is not None else ""
    reason = why or "the jobs are queued and no node has been allocated yet"
    after = f"{waited:.0f} s" if waited < 60 else f"{waited // 60:.0f} min"
    return f"{nodes_running}{planned} nodes after {after}: {reason}"


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600 or seconds % 3600:
        return f"{seconds / 60:.0f}m" if seconds % 60 == 0 else f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.0f}h"


def moved_options(options: RunOptions, move: FleetMove) -> RunOptions:
    """The run's options for the fleet after ``move`` (its VM size or tier changed)."""
    update: dict[str, object] = {}
    if move.vm_size is not None:
        update["vm_size"] = move.vm_size
    if move.low_priority is not None:
        update["low_priority"] = move.low_priority
    return options.model_copy(update=update)


def fallback_plan_note(options: RunOptions) -> str:
    """What the plan says the run does when no node comes (the cap it states included)."""
    fallback = parse_fallback(options.fallback)
    if fallback.after_s is None:
        return "if no node comes: wait as long as it takes (--fallback wait)"
    after = f"if no node runs for {_minutes(fallback.after_s)}"
    if fallback.action == "dedicated":
        return (
            f"{after}: move to dedicated {options.vm_size} nodes if their plan costs at "
            f"most ${fallback.max_cost_usd:g}, else stop (--fallback {fallback.describe()})"
        )
    if fallback.action == "size":
        sizes = ", then ".join(move.vm_size or "" for move in fallback.moves)
        return f"{after}: move to {sizes}, each given as long; then stop"
    return f"{after}: stop the run (--fallback {fallback.describe()})"
