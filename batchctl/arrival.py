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

No I/O and no clock: the orchestrator passes ``now`` from ``context.current_utc_datetime``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

__all__ = [
    "DEFAULT_FALLBACK",
    "Fallback",
    "advance_nodeless_since",
    "arrival_note",
    "check_fallback",
    "parse_fallback",
]

DEFAULT_FALLBACK: Final = "stop@30m"
"""What a run does when no node comes: stop after 30 minutes with the reason."""

FallbackAction = Literal["wait", "stop"]

_FALLBACK = re.compile(r"(?P<action>wait|stop)(?:@(?P<after>\S+))?")
_DEFAULT_STOP_AFTER_S: Final = 30 * 60.0
# Below a couple of polls the limit would stop runs whose nodes are merely slow to boot
# (AML allocates and pulls the image in minutes even when capacity is there).
MIN_WAIT_S: Final = 5 * 60.0


@dataclass(frozen=True)
class Fallback:
    """The parsed ``--fallback``: what to do once no node has run for ``after_s`` seconds."""

    action: FallbackAction
    after_s: float | None  # None: wait for ever

    def describe(self) -> str:
        if self.after_s is None:
            return self.action
        return f"{self.action}@{_minutes(self.after_s)}"


def parse_fallback(text: str) -> Fallback:
    """``wait``, ``stop`` or ``stop@DURATION`` (90s, 20m, 1h); ValueError saying what is wrong."""
    from batchctl.planning import parse_duration

    value = text.strip().lower()
    match = _FALLBACK.fullmatch(value)
    if match is None:
        raise ValueError(
            f"fallback {text!r} is neither 'wait' nor 'stop' with an optional wait like 'stop@30m'"
        )
    action: FallbackAction = "wait" if match.group("action") == "wait" else "stop"
    after = match.group("after")
    if action == "wait":
        if after is not None:
            raise ValueError(f"fallback {text!r}: 'wait' waits for ever and takes no '@'")
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
    return Fallback("stop", after_s)


def check_fallback(text: str) -> str:
    """``text`` if it parses (the option's validator), in its normal spelling."""
    return parse_fallback(text).describe()


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
