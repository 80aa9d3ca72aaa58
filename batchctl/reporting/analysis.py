"""What a run's terminal records say: progress over time, stage durations, per-node
throughput, failures by class, GPU time billed vs busy, and cost. Pure: no I/O, no clock.

The ledger of a large run holds 100k records or more, so the analysis streams: feed each
``ItemResult`` to ``RunAnalysis.add`` once and call ``summarize`` at the end. Memory stays
bounded whatever the run's size:

- progress over time is a histogram of finish times whose bin width doubles whenever the
  span needs more than ``MAX_TIMELINE_BINS`` bins (exact counts, coarser times);
- stage durations keep exact count, sum, min and max plus a reservoir sample of at most
  ``DURATION_SAMPLE_SIZE`` values per stage (Vitter's algorithm R, seeded, so the same
  records give the same report); quantiles come from the sample;
- failures keep exact counts per error class but at most ``MAX_EXAMPLES_PER_CLASS`` examples
  (messages cut to ``MAX_EXAMPLE_MESSAGE_CHARS``) for at most ``MAX_FAILURE_CLASSES`` classes;
- per-node tallies are a few numbers a node, for at most ``MAX_NODES`` nodes (a fleet is
  capped at 10,000); any beyond are pooled under ``OTHER``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from batchctl.contracts import (
    CostStats,
    FailureClass,
    FailureExample,
    ItemResult,
    ItemStatus,
    NodeThroughput,
    RunPlan,
    RunStats,
    StageStats,
    TimelinePoint,
)

STAGES: Final = ("download", "decode", "inference", "upload", "total")
"""The StageTimings fields (``{stage}_s``) in pipeline order."""

DURATION_SAMPLE_SIZE: Final = 4096
MAX_TIMELINE_BINS: Final = 240
MAX_EXAMPLES_PER_CLASS: Final = 3
MAX_EXAMPLE_MESSAGE_CHARS: Final = 500
MAX_FAILURE_CLASSES: Final = 200
MAX_NODES: Final = 10_000
OTHER: Final = "(other)"
UNKNOWN_NODE: Final = "(unknown)"

# Worker processes name themselves "{node}:{pid}", or "{node}-p{rank}:{pid}" when a node
# runs several processes; the node is what is billed, so its processes are counted together.
_PROCESS_SUFFIX = re.compile(r"(?:-p\d+)?:\d+$")


class StagePart(BaseModel):
    """One stage's durations in a part of the analysis (exact figures and the sample)."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=0)
    total: float
    minimum: float | None
    maximum: float
    seen: int = Field(ge=0)
    sample: list[float]


class NodePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    busy_s: float
    first_start: datetime | None
    last_end: datetime | None


class AnalysisPart(BaseModel):
    """What :class:`RunAnalysis` gathered from some of a run's records (one shard's), in a
    form that crosses activities: parts gathered apart and merged (:meth:`RunAnalysis.absorb`)
    give the report that one pass over every record would have given, up to the duration
    samples (uniform either way, drawn otherwise)."""

    model_config = ConfigDict(extra="forbid")

    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    not_run: int = Field(ge=0)
    skipped: int = Field(ge=0)
    not_run_by_reason: dict[str, int]
    undated: int = Field(ge=0)
    busy_s: float
    media_s: float
    media_items: int = Field(ge=0)
    timeline_width_s: float = Field(gt=0)
    timeline_bins: list[tuple[int, int, int]]
    stages: dict[str, StagePart]
    nodes: list[NodePart]
    failures: list[FailureClass]
    first_start: datetime | None
    last_end: datetime | None
    not_run_at: datetime | None


def as_utc(moment: datetime) -> datetime:
    """An aware UTC datetime; naive ones are taken as UTC (the Durable SDK's clock is naive)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def node_of(worker_name: str) -> str:
    """The node a worker process ran on: 'host-p1:4242' -> 'host'; '' -> '(unknown)'."""
    return _PROCESS_SUFFIX.sub("", worker_name) or UNKNOWN_NODE


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default); 0 if empty."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * min(max(q, 0.0), 1.0)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def idle_fraction(busy_s: float, billed_s: float) -> float | None:
    """Share of billed node time no item was running; None when nothing was billed.

    Clamped to [0, 1]: several processes a node can be busy for more than the node's time.
    """
    if billed_s <= 0:
        return None
    return min(max(1.0 - busy_s / billed_s, 0.0), 1.0)


class Reservoir:
    """A uniform random sample of at most ``capacity`` values from a stream of any length."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.seen = 0
        self.values: list[float] = []
        # Statistics, not security: a seeded generator makes the report reproducible.
        self._rng = random.Random(seed)  # noqa: S311

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.capacity:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.values[slot] = value

    def absorb(self, seen: int, values: Sequence[float]) -> None:
        """Merge the sample of another stream (``seen`` values, ``values`` a uniform sample
        of them) into this one: the result is a uniform sample of both streams together.

        Each slot is drawn from one stream or the other in proportion to the values of each
        not drawn yet (sampling the union without replacement); a stream's share is then
        taken at random from its own sample, which is uniform over that stream.
        """
        if len(values) != min(seen, self.capacity):
            raise ValueError(f"a sample of {len(values)} from {seen} values cannot be merged")
        if self.seen + seen <= self.capacity:
            # Both streams are whole in their samples: the union is the sample.
            self.values = [*self.values, *values]
            self.seen += seen
            return
        if self.seen == 0:
            self.values, self.seen = list(values), seen
            return
        # How many of the merged sample come from each stream: the union drawn without
        # replacement, one slot at a time (a hypergeometric count).
        left_mine, left_theirs, from_mine = self.seen, seen, 0
        for _ in range(self.capacity):
            if self._rng.randrange(left_mine + left_theirs) < left_mine:
                left_mine -= 1
                from_mine += 1
            else:
                left_theirs -= 1
        self.values = [
            *self._rng.sample(self.values, from_mine),
            *self._rng.sample(list(values), self.capacity - from_mine),
        ]
        self.seen += seen


@dataclass
class _Durations:
    """Exact count/sum/min/max of one stage plus its reservoir sample."""

    sample: Reservoir
    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        self.sample.add(value)

    def part(self) -> StagePart:
        return StagePart(
            count=self.count,
            total=self.total,
            minimum=self.minimum if self.count else None,
            maximum=self.maximum,
            seen=self.sample.seen,
            sample=list(self.sample.values),
        )

    def absorb(self, part: StagePart) -> None:
        if part.count == 0:
            return
        self.count += part.count
        self.total += part.total
        self.minimum = min(self.minimum, part.minimum if part.minimum is not None else math.inf)
        self.maximum = max(self.maximum, part.maximum)
        self.sample.absorb(part.seen, part.sample)

    def stats(self, stage: str) -> StageStats:
        if self.count == 0:
            return StageStats(stage=stage, count=0, sample_size=0)
        ordered = sorted(self.sample.values)
        return StageStats(
            stage=stage,
            count=self.count,
            sample_size=len(ordered),
            mean_s=self.total / self.count,
            min_s=self.minimum,
            p25_s=quantile(ordered, 0.25),
            p50_s=quantile(ordered, 0.50),
            p75_s=quantile(ordered, 0.75),
            p90_s=quantile(ordered, 0.90),
            p99_s=quantile(ordered, 0.99),
            max_s=self.maximum,
        )


class Timeline:
    """Finish times as a histogram of at most ``max_bins`` bins, each ``width`` seconds wide.

    Bin ``i`` covers [i * width, (i + 1) * width) seconds after the origin (negative indices
    hold records stamped before the run started, e.g. a node's clock running behind).
    """

    def __init__(self, max_bins: int = MAX_TIMELINE_BINS, width_s: float = 1.0) -> None:
        if max_bins < 2 or width_s <= 0:
            raise ValueError("max_bins must be >= 2 and width_s > 0")
        self.max_bins = max_bins
        self.width = width_s
        self.bins: dict[int, list[int]] = {}  # index -> [succeeded, failed]
        # The span always includes bin 0 (the run's start), so the series starts at the start
        # and the bin count, not just the records' own spread, stays within max_bins.
        self._low = 0
        self._high = 0

    def add(self, offset_s: float, *, succeeded: bool) -> None:
        index = math.floor(offset_s / self.width)
        counts = self.bins.setdefault(index, [0, 0])
        counts[0 if succeeded else 1] += 1
        self._low, self._high = min(self._low, index), max(self._high, index)
        while self._high - self._low + 1 > self.max_bins:
            self._coarsen()

    def _coarsen(self) -> None:
        # Merging pairs keeps every count exact; floor division pairs negative bins too.
        self.width *= 2
        merged: dict[int, list[int]] = {}
        for index, (ok, bad) in self.bins.items():
            target = merged.setdefault(index // 2, [0, 0])
            target[0] += ok
            target[1] += bad
        self.bins = merged
        self._low //= 2
        self._high //= 2

    def bins_part(self) -> list[tuple[int, int, int]]:
        """The bins as (index, succeeded, failed), for a part of the analysis."""
        return [(index, ok, bad) for index, (ok, bad) in sorted(self.bins.items())]

    def absorb(self, width_s: float, bins: Iterable[tuple[int, int, int]]) -> None:
        """Add another timeline's bins (same origin; widths are 1 s doubled, so the finer
        one is coarsened to the other's width first, keeping every count exact)."""
        theirs = {index: [ok, bad] for index, ok, bad in bins}
        if not theirs:
            return
        while self.width < width_s:
            self._coarsen()
        their_width = width_s
        while their_width < self.width:
            coarser: dict[int, list[int]] = {}
            for index, (ok, bad) in theirs.items():
                target = coarser.setdefault(index // 2, [0, 0])
                target[0] += ok
                target[1] += bad
            theirs, their_width = coarser, their_width * 2
        for index, (ok, bad) in theirs.items():
            counts = self.bins.setdefault(index, [0, 0])
            counts[0] += ok
            counts[1] += bad
            self._low, self._high = min(self._low, index), max(self._high, index)
        while self._high - self._low + 1 > self.max_bins:
            self._coarsen()

    def series(self) -> list[TimelinePoint]:
        """Cumulative counts at the end of every bin, from the first bin's start."""
        if not self.bins:
            return []
        points = [TimelinePoint(t_s=self._low * self.width, succeeded=0, failed=0)]
        succeeded = failed = 0
        for index in range(self._low, self._high + 1):
            ok, bad = self.bins.get(index, (0, 0))
            succeeded += ok
            failed += bad
            end = (index + 1) * self.width
            points.append(TimelinePoint(t_s=end, succeeded=succeeded, failed=failed))
        return points


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class _NodeTally:
    succeeded: int = 0
    failed: int = 0
    busy_s: float = 0.0
    first_start: datetime | None = None
    last_end: datetime | None = None

    def add(self, result: ItemResult) -> None:
        if result.status is ItemStatus.SUCCEEDED:
            self.succeeded += 1
        else:
            self.failed += 1
        self.busy_s += result.timings.total_s
        if result.finished_at is not None:
            end = as_utc(result.finished_at)
            start = end - timedelta(seconds=result.timings.total_s)
            self.first_start = start if self.first_start is None else min(self.first_start, start)
            self.last_end = end if self.last_end is None else max(self.last_end, end)

    def absorb(self, other: _NodeTally) -> None:
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.busy_s += other.busy_s
        self.first_start = _earliest(self.first_start, other.first_start)
        self.last_end = _latest(self.last_end, other.last_end)

    def throughput(self, node: str) -> NodeThroughput:
        active = 0.0
        if self.first_start is not None and self.last_end is not None:
            active = (self.last_end - self.first_start).total_seconds()
        items = self.succeeded + self.failed
        return NodeThroughput(
            node=node,
            succeeded=self.succeeded,
            failed=self.failed,
            busy_s=self.busy_s,
            active_s=active,
            items_per_hour=items * 3600.0 / active if active > 0 else None,
        )


@dataclass
class _FailureTally:
    count: int = 0
    permanent: int = 0
    examples: list[FailureExample] = field(default_factory=list)


def _example(result: ItemResult) -> FailureExample:
    assert result.error is not None
    message = result.error.message
    if len(message) > MAX_EXAMPLE_MESSAGE_CHARS:
        message = message[:MAX_EXAMPLE_MESSAGE_CHARS] + " [...]"
    return FailureExample(
        item_id=result.item_id,
        source=result.source[:MAX_EXAMPLE_MESSAGE_CHARS],
        message=message,
        attempts=result.error.attempts,
    )


def billed_node_seconds(
    plan: RunPlan | None, wall_s: float, measured_s: float | None = None
) -> tuple[float, str]:
    """Billed GPU node-seconds and a sentence saying which estimate it is.

    ``measured_s`` (e.g. node time a compute backend reported) wins when given; otherwise the
    plan's node count times the run's wall time, an upper bound.
    """
    if measured_s is not None:
        return max(measured_s, 0.0), "measured node time reported by the compute backend"
    if plan is None or plan.total_nodes == 0:
        return 0.0, "no nodes were planned, so none were billed"
    return (
        plan.total_nodes * wall_s,
        f"estimate: the plan's {plan.total_nodes} nodes x the run's wall time "
        f"({wall_s:,.0f} s); an upper bound, since nodes are created after the manifest is "
        "validated and enqueued and deleted at teardown (preempted time is not subtracted)",
    )


def cost_stats(
    plan: RunPlan | None, wall_s: float, busy_s: float, measured_billed_s: float | None = None
) -> CostStats:
    """Billed vs busy node time, and the plan's estimate vs billed time x the plan's price."""
    billed, basis = billed_node_seconds(plan, wall_s, measured_billed_s)
    price = plan.price_per_hour if plan is not None else None
    if price is None:
        actual = None
        note = "actual cost unknown: the plan carries no price per node-hour"
    else:
        actual = billed / 3600.0 * price
        note = (
            f"actual = billed node-hours x ${price:g}/node-hour (the plan's price); the plan's "
            "estimate also counts the clusters' scale-down time"
        )
    return CostStats(
        node_seconds_billed=billed,
        node_seconds_busy=busy_s,
        idle_fraction=idle_fraction(busy_s, billed),
        billed_basis=basis,
        price_per_hour=price,
        est_cost=plan.est_cost if plan is not None else None,
        actual_cost=actual,
        cost_note=note,
    )


class RunAnalysis:
    """Streaming aggregation of a run's terminal records; see the module docstring."""

    def __init__(
        self,
        started_at: datetime,
        *,
        finished_at: datetime | None = None,
        sample_size: int = DURATION_SAMPLE_SIZE,
    ) -> None:
        self.started_at = as_utc(started_at)
        # Finish times further than the run's own length outside it (at least a minute) come
        # from a node whose clock is off; one of them would stretch the timeline's bins over
        # years. They are counted as undated instead.
        self.plausible_s: tuple[float, float] | None = None
        if finished_at is not None:
            wall = max((as_utc(finished_at) - self.started_at).total_seconds(), 60.0)
            self.plausible_s = (-wall, 2 * wall)
        self.sample_size = sample_size
        self.succeeded = 0
        self.failed = 0
        self.not_run = 0
        self.skipped = 0
        self.not_run_by_reason: dict[str, int] = {}
        self.undated = 0
        self.busy_s = 0.0
        # Seconds of video the succeeded items covered, over those whose record says: what
        # the trial turns into node-seconds per second of video.
        self.media_s = 0.0
        self.media_items = 0
        self.timeline = Timeline()
        self._stages = {
            stage: _Durations(Reservoir(sample_size, seed=index))
            for index, stage in enumerate(STAGES)
        }
        self._nodes: dict[str, _NodeTally] = {}
        self._failures: dict[str, _FailureTally] = {}
        # Moments for the report's phase markers: the first item a node started, the last
        # one it finished, and when the controller recorded the items the run ended without.
        self.first_start: datetime | None = None
        self.last_end: datetime | None = None
        self.not_run_at: datetime | None = None

    def add(self, result: ItemResult) -> None:
        if result.status is ItemStatus.SKIPPED:
            # Done by an earlier run (--skip-existing): no node worked on it in this run.
            self.skipped += 1
            return
        if result.status is ItemStatus.NOT_RUN:
            # Written by the controller when the run ended: no node did any work on it, so it
            # is counted (by reason) and stays out of the timeline, the nodes and the failures.
            self.not_run += 1
            reason = result.error.error_class if result.error else "unknown"
            self.not_run_by_reason[reason] = self.not_run_by_reason.get(reason, 0) + 1
            if result.finished_at is not None:
                at = as_utc(result.finished_at)
                self.not_run_at = at if self.not_run_at is None else min(self.not_run_at, at)
            return
        ok = result.status is ItemStatus.SUCCEEDED
        if ok:
            self.succeeded += 1
            # Failed items stop part-way (or before the first stage), so their timings would
            # drag every stage's distribution towards zero: only successes describe the work.
            for stage, durations in self._stages.items():
                durations.add(getattr(result.timings, f"{stage}_s"))
            if result.media_s is not None:
                self.media_s += result.media_s
                self.media_items += 1
        else:
            self.failed += 1
            self._add_failure(result)
        self.busy_s += result.timings.total_s
        offset = (
            None
            if result.finished_at is None
            else (as_utc(result.finished_at) - self.started_at).total_seconds()
        )
        if offset is None or (
            self.plausible_s is not None
            and not self.plausible_s[0] <= offset <= self.plausible_s[1]
        ):
            self.undated += 1
        else:
            self.timeline.add(offset, succeeded=ok)
            assert result.finished_at is not None  # a dated record
            end = as_utc(result.finished_at)
            start = end - timedelta(seconds=result.timings.total_s)
            self.first_start = start if self.first_start is None else min(self.first_start, start)
            self.last_end = end if self.last_end is None else max(self.last_end, end)
        node = node_of(result.node)
        if node not in self._nodes and len(self._nodes) >= MAX_NODES:
            node = OTHER
        self._nodes.setdefault(node, _NodeTally()).add(result)

    def part(self) -> AnalysisPart:
        """What this analysis gathered, to be merged into another with :meth:`absorb`."""
        return AnalysisPart(
            succeeded=self.succeeded,
            failed=self.failed,
            not_run=self.not_run,
            skipped=self.skipped,
            not_run_by_reason=dict(self.not_run_by_reason),
            undated=self.undated,
            busy_s=self.busy_s,
            media_s=self.media_s,
            media_items=self.media_items,
            timeline_width_s=self.timeline.width,
            timeline_bins=self.timeline.bins_part(),
            stages={stage: durations.part() for stage, durations in self._stages.items()},
            nodes=[
                NodePart(
                    node=name,
                    succeeded=tally.succeeded,
                    failed=tally.failed,
                    busy_s=tally.busy_s,
                    first_start=tally.first_start,
                    last_end=tally.last_end,
                )
                for name, tally in self._nodes.items()
            ],
            failures=self.failure_classes(),
            first_start=self.first_start,
            last_end=self.last_end,
            not_run_at=self.not_run_at,
        )

    def absorb(self, part: AnalysisPart) -> None:
        """Add another analysis's part (gathered from other records of the same run, with
        the same start): counts and sums add, extremes compare, timelines and samples merge,
        and the caps on nodes, error classes and examples hold as in one pass."""
        self.succeeded += part.succeeded
        self.failed += part.failed
        self.not_run += part.not_run
        self.skipped += part.skipped
        for reason, count in part.not_run_by_reason.items():
            self.not_run_by_reason[reason] = self.not_run_by_reason.get(reason, 0) + count
        self.undated += part.undated
        self.busy_s += part.busy_s
        self.media_s += part.media_s
        self.media_items += part.media_items
        self.timeline.absorb(part.timeline_width_s, part.timeline_bins)
        for stage, stage_part in part.stages.items():
            self._stages[stage].absorb(stage_part)
        for node in part.nodes:
            name = node.node
            if name not in self._nodes and len(self._nodes) >= MAX_NODES:
                name = OTHER
            tally = _NodeTally(
                node.succeeded, node.failed, node.busy_s, node.first_start, node.last_end
            )
            self._nodes.setdefault(name, _NodeTally()).absorb(tally)
        for failure in part.failures:
            name = failure.error_class
            if name not in self._failures and len(self._failures) >= MAX_FAILURE_CLASSES:
                name = OTHER
            mine = self._failures.setdefault(name, _FailureTally())
            mine.count += failure.count
            mine.permanent += failure.permanent
            room = MAX_EXAMPLES_PER_CLASS - len(mine.examples)
            mine.examples.extend(failure.examples[: max(room, 0)])
        self.first_start = _earliest(self.first_start, part.first_start)
        self.last_end = _latest(self.last_end, part.last_end)
        self.not_run_at = _earliest(self.not_run_at, part.not_run_at)

    def _add_failure(self, result: ItemResult) -> None:
        assert result.error is not None
        error_class = result.error.error_class
        if error_class not in self._failures and len(self._failures) >= MAX_FAILURE_CLASSES:
            error_class = OTHER
        tally = self._failures.setdefault(error_class, _FailureTally())
        tally.count += 1
        tally.permanent += int(result.error.permanent)
        if len(tally.examples) < MAX_EXAMPLES_PER_CLASS:
            tally.examples.append(_example(result))

    def failures_by_class(self) -> dict[str, int]:
        """Exact failed-item counts per error class, most frequent first."""
        return {failure.error_class: failure.count for failure in self.failure_classes()}

    def node_throughputs(self) -> list[NodeThroughput]:
        """Each node's tallies, by node name."""
        return sorted(
            (tally.throughput(name) for name, tally in self._nodes.items()),
            key=lambda node: node.node,
        )

    def failure_classes(self) -> list[FailureClass]:
        return sorted(
            (
                FailureClass(
                    error_class=name,
                    count=tally.count,
                    permanent=tally.permanent,
                    examples=list(tally.examples),
                )
                for name, tally in self._failures.items()
            ),
            key=lambda failure: (-failure.count, failure.error_class),
        )

    def summarize(
        self,
        finished_at: datetime,
        plan: RunPlan | None,
        *,
        measured_billed_s: float | None = None,
    ) -> RunStats:
        """The run's statistics; ``finished_at`` ends the wall time that nodes are billed for."""
        wall_s = max((as_utc(finished_at) - self.started_at).total_seconds(), 0.0)
        notes: list[str] = []
        stages = [durations.stats(stage) for stage, durations in self._stages.items()]
        if any(stage.sample_size < stage.count for stage in stages):
            notes.append(
                f"duration quantiles come from a uniform sample of {self.sample_size} "
                "items per stage; counts, means, minima and maxima are exact"
            )
        if OTHER in self._nodes:
            notes.append(f"more than {MAX_NODES} nodes: the rest are pooled as {OTHER!r}")
        if OTHER in self._failures:
            notes.append(
                f"more than {MAX_FAILURE_CLASSES} error classes: the rest are pooled as {OTHER!r}"
            )
        nodes = self.node_throughputs()
        return RunStats(
            wall_s=wall_s,
            timeline_bin_s=self.timeline.width,
            timeline=self.timeline.series(),
            undated=self.undated,
            stages=stages,
            nodes=nodes,
            failures=self.failure_classes(),
            cost=cost_stats(plan, wall_s, node_seconds_busy(nodes), measured_billed_s),
            notes=notes,
            media_s=self.media_s if self.media_items else None,
            media_items=self.media_items,
        )


def live_tables(results: Iterable[ItemResult], started_at: datetime) -> dict[str, list[Any]]:
    """The per-node and failure-class tables of a run's records so far, as JSON, exactly as
    the report's statistics will hold them: what a dashboard shows of a run whose report
    does not exist yet (``batchctl serve``'s from its own ledger, ``batchctl dashboard``'s
    from a deployed run's failed records)."""
    analysis = RunAnalysis(started_at)
    for result in results:
        analysis.add(result)
    return {
        "nodes": [node.model_dump(mode="json") for node in analysis.node_throughputs()],
        "failures": [failure.model_dump(mode="json") for failure in analysis.failure_classes()],
    }


def node_seconds_busy(nodes: Iterable[NodeThroughput]) -> float:
    """Node time spent working: each node's span from its first item's start to its last
    item's end, summed.

    Not the items' own durations: a node works on several items at once (downloads and
    decodes overlap inference), so their sum counts the same node-second up to concurrency
    times. Nodes pooled past MAX_NODES have no span of their own; their item-seconds stand
    in, which can only overstate their share.
    """
    return sum(node.busy_s if node.node == OTHER else node.active_s for node in nodes)


def analyze(
    results: Iterable[ItemResult],
    started_at: datetime,
    finished_at: datetime,
    plan: RunPlan | None,
    *,
    measured_billed_s: float | None = None,
    sample_size: int = DURATION_SAMPLE_SIZE,
) -> RunStats:
    """One pass over ``results`` (any iterable, e.g. the ledger's) to the run's statistics."""
    analysis = RunAnalysis(started_at, finished_at=finished_at, sample_size=sample_size)
    for result in results:
        analysis.add(result)
    return analysis.summarize(finished_at, plan, measured_billed_s=measured_billed_s)
