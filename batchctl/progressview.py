"""The live progress view of a run, for `batchctl run`, `trial`, `watch` and `status --follow`.

On a terminal it is a small live panel drawn with rich: the run, the time since it started,
the phase in words (validating, enqueuing, planning, provisioning, starting nodes, running,
tearing down, merging), a bar split into succeeded / failed / left, the rate and the ETA, and
the nodes working when the status says. Elsewhere (a pipe, a CI log) it prints plain lines,
one per change and at most one every :data:`PLAIN_INTERVAL_S` while the run works, in the
format scripts have parsed since the first release.

The view reads the orchestrator's custom status (the ``RunProgress`` keys: run_id, phase,
total, succeeded, failed, not_run, invalid, message, eta_s, started_at, updated_at) or a
``RunStatus.view()`` dict from the app; both go through :func:`batchctl.runstatus.run_status`,
the one mapping, so a phase means the same here as everywhere else. ``nodes_active`` (nodes
whose jobs run now) and ``nodes_planned`` come while the run is monitored; an older app's
status without them shows no node count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Final

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from batchctl.contracts import RunPhase
from batchctl.planning import format_duration
from batchctl.runstatus import RunStatus, RuntimeStatus, run_status
from batchctl.throughput import Throughput, eta_s

PLAIN_INTERVAL_S: Final = 5.0
"""Plain lines while a run works come at most this often (a log is not a terminal)."""

BAR_WIDTH: Final = 40
REFRESH_PER_SECOND: Final = 4

STARTING_NODES: Final = "starting nodes"

# The phase as a person reads it. "starting nodes" is not an orchestrator phase: it is the
# stretch of "running" before any item has finished (see phase_label).
PHASE_LABELS: Final[dict[str, str]] = {
    "starting": "starting",
    RunPhase.VALIDATING.value: "validating",
    RunPhase.ENQUEUING.value: "enqueuing",
    RunPhase.PLANNING.value: "planning",
    RunPhase.PROVISIONING.value: "provisioning",
    RunPhase.RUNNING.value: "running",
    RunPhase.TEARING_DOWN.value: "tearing down",
    RunPhase.MERGING.value: "merging",
    RunPhase.COMPLETED.value: "completed",
    RunPhase.FAILED.value: "failed",
    RunPhase.CANCELLED.value: "cancelled",
}

_PHASE_STYLE: Final[dict[str, str]] = {
    RunPhase.COMPLETED.value: "bold green",
    RunPhase.FAILED.value: "bold red",
    RunPhase.CANCELLED.value: "bold yellow",
}


def outcome_text(phase: str, *, total: int, succeeded: int, failed: int, invalid: int) -> str:
    """The phase as a person should read it: a completed run in which nothing (or not
    everything) succeeded must not look like a clean "completed"."""
    if phase != RunPhase.COMPLETED.value:
        return phase
    if total == 0 and invalid == 0:
        return "completed, but the manifest had no items"
    if succeeded == 0:
        return "completed, but no item succeeded"
    if failed or invalid:
        return "completed with failures"
    return phase


def format_rate(rate_per_s: float) -> str:
    return f"{rate_per_s:.1f}/s" if rate_per_s >= 1 else f"{rate_per_s * 60:.1f}/min"


def format_status(status: dict[str, Any], width: int = 30, rate_per_s: float | None = None) -> str:
    """One plain line for a status dict (the not-a-terminal format; scripts parse it)."""
    total = int(status.get("total") or 0)
    succeeded = int(status.get("succeeded") or 0)
    failed = int(status.get("failed") or 0)
    done = succeeded + failed
    phase = str(status.get("phase", "?"))
    if phase != RunPhase.RUNNING.value or total == 0:
        shown = outcome_text(
            phase,
            total=total,
            succeeded=succeeded,
            failed=failed,
            invalid=int(status.get("invalid") or 0),
        )
        return f"[{shown}] {status.get('message', '')}"
    filled = int(width * done / total)
    eta = status.get("eta_s")
    eta_text = f" eta {float(eta):.0f}s" if eta is not None else ""
    rate_text = f" {format_rate(rate_per_s)}" if rate_per_s is not None else ""
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
        f"({succeeded} ok, {failed} failed, {total - done} left){rate_text}{eta_text}"
    )


def status_of(raw: dict[str, Any]) -> RunStatus:
    """A status dict (custom status or ``RunStatus.view()``) as a :class:`RunStatus`.

    A custom status comes from a live orchestration, so it is read as Running unless the dict
    names its runtime status (the app's view does).
    """
    runtime = raw.get("runtime_status") or RuntimeStatus.RUNNING.value
    return run_status(str(raw.get("run_id") or ""), runtime, raw)


def _ended(status: RunStatus) -> bool:
    """The run is over: its orchestration ended, or its own last word is a terminal phase
    (the local driver's final custom status arrives while the orchestration still runs)."""
    return status.finished or status.outcome in _PHASE_STYLE


def phase_label(status: RunStatus, nodes_active: int | None = None) -> str:
    """The phase in words; "starting nodes" while running before any node finished an item
    (and no node is known to be working), since that wait is what a person is looking at."""
    phase = status.outcome
    if phase == RunPhase.RUNNING.value and status.done == 0 and not nodes_active:
        return STARTING_NODES
    return PHASE_LABELS.get(phase, phase)


@dataclass(frozen=True)
class Snapshot:
    """What the view shows at one moment (everything a test needs to check, no rendering)."""

    run_id: str
    phase: str
    total: int
    succeeded: int
    failed: int
    not_run: int
    invalid: int
    message: str
    elapsed_s: float | None
    rate_per_s: float | None
    eta_s: float | None
    nodes_active: int | None
    nodes_planned: int | None
    finished: bool

    @property
    def left(self) -> int:
        return max(self.total - self.succeeded - self.failed - self.not_run, 0)


def _bar(snapshot: Snapshot, width: int = BAR_WIDTH) -> Text:
    """Succeeded (green), failed (red), not run (yellow), then what is left (dim)."""
    bar = Text()
    total = snapshot.total
    if total <= 0:
        return bar.append("━" * width, style="grey35")
    used = 0
    for count, style in (
        (snapshot.succeeded, "green"),
        (snapshot.failed, "red"),
        (snapshot.not_run, "yellow"),
    ):
        cells = min(round(width * count / total), width - used)
        if count and cells == 0 and used < width:
            cells = 1  # a single failure among thousands must still show
        bar.append("━" * cells, style=style)
        used += cells
    return bar.append("━" * (width - used), style="grey35")


def render(snapshot: Snapshot) -> RenderableType:
    """The terminal panel for a snapshot: a title line, the bar with counts, the message."""
    title = Text()
    title.append("run ", style="dim").append(snapshot.run_id or "?", style="bold")
    if snapshot.elapsed_s is not None:
        title.append("  elapsed ", style="dim").append(format_duration(snapshot.elapsed_s))
    shown = (
        outcome_text(
            snapshot.phase,
            total=snapshot.total,
            succeeded=snapshot.succeeded,
            failed=snapshot.failed,
            invalid=snapshot.invalid,
        )
        if snapshot.finished
        else snapshot.phase
    )
    title.append("  phase ", style="dim").append(
        shown, style=_PHASE_STYLE.get(snapshot.phase, "bold cyan")
    )
    if snapshot.nodes_active is not None:
        planned = f"/{snapshot.nodes_planned}" if snapshot.nodes_planned else ""
        title.append("  nodes ", style="dim").append(f"{snapshot.nodes_active}{planned} active")
    counts = Text()
    done = snapshot.succeeded + snapshot.failed
    percent = 100.0 * (done + snapshot.not_run) / snapshot.total if snapshot.total else 0.0
    bar = Text.assemble(_bar(snapshot), f" {percent:.0f}%")
    # The same words as the plain line, so what a person learns from one reads in the other;
    # a line of their own, so a narrow terminal does not wrap them into the bar.
    counts.append(
        f"{done}/{snapshot.total} ({snapshot.succeeded} ok, {snapshot.failed} failed, "
        f"{snapshot.left} left)"
    )
    if snapshot.not_run:
        counts.append(f" {snapshot.not_run} not run", style="yellow")
    if snapshot.rate_per_s is not None:
        counts.append(f" {format_rate(snapshot.rate_per_s)}")
    if snapshot.eta_s is not None and not snapshot.finished:
        counts.append(f" eta {format_duration(snapshot.eta_s)}")
    lines: list[RenderableType] = [title, bar, counts]
    if snapshot.invalid:
        lines.append(Text(f"{snapshot.invalid} invalid manifest rows (not run)", style="yellow"))
    if snapshot.message:
        lines.append(Text(snapshot.message, style="dim"))
    return Group(*lines)


class LiveProgress:
    """Takes statuses (``update``) and shows them: live on a terminal, plain lines otherwise.

    The rate is what this view has seen items finish at since it first saw the run working,
    so it is right after a reattach too; the ETA is the status's own when it has one (the
    orchestrator's, from the run's average), else the remaining items at that rate. Elapsed
    time counts from the run's ``started_at`` when the status has it (so a reattached view
    shows the run's age, not the viewer's), else from the first status seen.
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        terminal: bool | None = None,
        refresh_per_second: float = REFRESH_PER_SECOND,
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._wall_clock = wall_clock
        is_tty = getattr(stream, "isatty", None)
        self.terminal = bool(is_tty and is_tty()) if terminal is None else terminal
        self._refresh = refresh_per_second
        self._live: Live | None = None
        self._raw: dict[str, Any] | None = None
        self._status: RunStatus | None = None
        self._first_seen_at: float | None = None
        # The rate since the run was first seen working (batchctl.throughput).
        self._throughput = Throughput()
        self._last_line = ""
        self._last_print = float("-inf")

    # -- what is shown ------------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """The current view, computed now (elapsed time moves between statuses)."""
        if self._status is None or self._raw is None:
            return None
        status = self._status
        nodes_active = status.nodes_active
        eta = eta_s(status.eta_s, status.remaining, self._rate, finished=status.finished)
        return Snapshot(
            run_id=status.run_id,
            phase=phase_label(status, nodes_active),
            total=status.total,
            succeeded=status.succeeded,
            failed=status.failed,
            not_run=status.not_run,
            invalid=status.invalid,
            message=status.message,
            elapsed_s=self._elapsed_s(status),
            rate_per_s=self._rate,
            eta_s=eta,
            nodes_active=nodes_active,
            nodes_planned=status.nodes_planned,
            finished=_ended(status),
        )

    def _elapsed_s(self, status: RunStatus) -> float | None:
        if status.started_at is not None:
            started = status.started_at
            if started.tzinfo is None:
                started = started.replace(tzinfo=UTC)
            # An ended run's clock stops at its last update instead of running on.
            end = status.updated_at if _ended(status) else None
            now = end if end is not None else self._wall_clock()
            if now.tzinfo is None:
                now = now.replace(tzinfo=UTC)
            return max((now - started).total_seconds(), 0.0)
        if self._first_seen_at is None:
            return None
        return max(self._clock() - self._first_seen_at, 0.0)

    def __rich__(self) -> RenderableType:
        # rich calls this at every refresh, so the elapsed time ticks between statuses.
        snapshot = self.snapshot()
        return render(snapshot) if snapshot is not None else Text("")

    @property
    def _rate(self) -> float | None:
        return self._throughput.rate

    @property
    def rate(self) -> float | None:
        """Items per second since the run was first seen working; None before that."""
        return self._throughput.rate

    # -- input --------------------------------------------------------------------------
    def update(self, status: Any) -> None:
        if not isinstance(status, dict):
            return
        now = self._clock()
        self._raw = dict(status)
        self._status = status_of(self._raw)
        if self._first_seen_at is None:
            self._first_seen_at = now
        running = status.get("phase") == RunPhase.RUNNING.value
        done = int(status.get("succeeded") or 0) + int(status.get("failed") or 0)
        if running:
            self._throughput.observe(now, done)
        if self.terminal:
            self._draw()
        else:
            self._print_plain(status, running, now)

    def _draw(self) -> None:
        if self._live is None:
            console = Console(file=self._stream, force_terminal=True, highlight=False)
            # stdout and stderr stay as they are: --json's last line must reach stdout
            # untouched, and log handlers hold the real stderr anyway.
            self._live = Live(
                self,
                console=console,
                refresh_per_second=self._refresh,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        self._live.refresh()

    def _print_plain(self, status: dict[str, Any], running: bool, now: float) -> None:
        seen = self._status
        if seen is not None:
            # The app's own ETA, else the remaining items at the rate seen here: the one
            # computation the panel's snapshot makes too.
            status = {**status, "eta_s": eta_s(seen.eta_s, seen.remaining, self._rate)}
        line = format_status(status, rate_per_s=self._rate)
        if line != self._last_line and (not running or now - self._last_print >= PLAIN_INTERVAL_S):
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last_print = now
        self._last_line = line

    def finish(self) -> None:
        """Stop drawing (the last panel stays on screen); safe to call more than once."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> LiveProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()
