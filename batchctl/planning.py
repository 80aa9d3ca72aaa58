"""Sizing the fleet for a run: how many clusters of how many nodes, and what it will cost.

Pure functions, no I/O: the orchestrator calls them with numbers an activity read (items in
the manifest, quota from the compute backend), and ``batchctl plan`` calls them from the
command line.

The model (every estimate here follows from it):

- One item takes ``sec_per_item`` seconds of one node (whatever parallelism the node uses
  inside; measure it with a trial run). Nodes pull items from one shared queue, so ``n``
  nodes finish ``items`` items in ``ceil(items / n)`` rounds.
- Every node first spends ``startup_s`` being allocated, pulling the image and loading the
  model. Start-up is always counted: **makespan = startup_s + ceil(items / n) * sec_per_item**.
- Every node runs its own single-node job (docs/aml-topology.md), so each node is billed for
  its own time: from its allocation until its worker exits, plus the cluster's
  ``idle_time_before_scale_down`` (120 s here) before the node is released. A worker that
  finds the queue empty exits ``idle_exit_s`` later, but stays (at most ``visibility_timeout_s``
  more) while messages are hidden in flight elsewhere, since a dead node's messages come back
  then. So a node with ``r`` items, idle from ``t = startup_s + r * sec_per_item``, leaves at
  ``max(t + idle_exit_s, min(makespan, t + idle_exit_s + visibility_timeout_s))``, and
  **cost = sum over nodes of (leave + scale_down_s) / 3600 * price_per_hour**; the old
  multi-node-job figure ``n * (makespan + idle_exit_s + scale_down_s)`` is its upper bound.
- A deadline is planned with ``headroom`` (10 % by default) held back for preemption,
  stragglers and queue latency: the plan aims to finish within ``deadline * (1 - headroom)``.

When the cost scales with the video's length (a transform decodes, runs and encodes every
frame; features at a fixed fps sample in proportion to the length) and the manifest gives
each video's ``duration_s``, the plan can count seconds of video instead of items
(``PlanInputs.media``, a ``MediaWork``; ``batchctl plan --sec-per-video-second X``):

- The work comes in *pieces*: a video, or with ``segment_seconds`` S each of the segments a
  video longer than S becomes (the worker's ``plan_segments`` rule: ceil(d / S) pieces, the
  last one to the end). A piece of ``m`` seconds of video takes ``sec_per_item + m * X``
  seconds of a node (``sec_per_item`` is then a fixed overhead per piece, 0 by default).
- A piece runs on one node, so the run cannot end before its longest piece ``L``; and a
  shared queue is list scheduling, whose classic bound (Graham, 1966) holds for ANY order
  the queue hands pieces out in: the last piece to finish started by the time the others'
  work, spread over ``n`` nodes, was done. So with ``W`` the total work,
  **makespan = startup_s + (W - L) / n + L** (= W/n + L(1 - 1/n)), or ``startup_s + L``
  once every piece has a node of its own. That is an upper bound, tight when the longest
  piece comes last (segments are queued behind the rest, and manifests are often sorted):
  a plan that promises a deadline should not rely on a lucky order. With pieces of one
  length it overstates the item model by less than one piece. The simulation was the other
  candidate, but sizing evaluates the makespan for every fleet size it considers, and one
  simulation plays every piece: the bound is O(1).
- The straggler *binds* when the longest piece makes the plan more than
  ``STRAGGLER_SLACK`` longer than pieces of even length would (the same total work): more
  nodes cannot fix that, splitting the long videos (``--segment-seconds``) can, and a note
  says so (``FleetSize.straggler``).
- Billing follows the same schedule: all nodes share ``W - L`` (with a node per piece, each
  runs one), then one node runs the longest piece while the others leave as in the item
  model.

Sizing: the fewest nodes whose makespan meets the (headroom-reduced) deadline, then the
cheapest fleet size between that and the largest allowed one (a larger fleet can cost about
the same and finish sooner, because fewer nodes linger idle through the last round). Caps: the
number of items (never more nodes than items), the regional quota in cores, the user's
``max_nodes``, and ``max_clusters`` clusters of at most 100 nodes. When a cap stops the plan
from meeting the deadline, that cap is the ``binding_limit`` and a note says by how much.
Nodes are spread over clusters as evenly as possible without dropping any (250 nodes become
84 + 83 + 83, never 3 x 83 = 249).

``batchctl.simulation`` (only ``plan --simulate`` uses it) plays what the closed form
ignores: heavy-tailed item durations and low-priority preemption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from batchctl.contracts import BindingLimit, ClusterPlan, MediaSummary, RunOptions, RunPlan

MAX_NODES_PER_CLUSTER: Final = 100
"""AML's practical ceiling for one cluster, and ``ClusterPlan.nodes``' upper bound."""

DEFAULT_STARTUP_S: Final = 300.0
"""Allocation + image pull + model load of a GPU node: minutes, not seconds."""

DEFAULT_SCALE_DOWN_S: Final = 120.0
"""The clusters' ``idle_time_before_scale_down`` (SDK v1 defaulted to 1,800 s)."""

DEFAULT_IDLE_EXIT_S: Final = 60.0
"""How long a node's worker waits with nothing to do before it exits (RunOptions' default)."""

DEFAULT_VISIBILITY_TIMEOUT_S: Final = 120.0
"""How long a received message stays hidden (RunOptions' default): the most an idle worker
stays on for messages in flight elsewhere."""

DEFAULT_HEADROOM: Final = 0.1
DEFAULT_MAX_CLUSTERS: Final = 20

MAX_SEGMENTS_PER_ITEM: Final = 10_000
"""The most segments the worker cuts one video into (``Segment.count``'s bound)."""

STRAGGLER_SLACK: Final = 0.1
"""How much longer than even pieces would take the longest piece may make a plan before the
plan says the straggler binds: the default headroom's share, the slack a deadline keeps."""

# Floating-point slack when comparing times that are sums of the same numbers.
_EPS = 1e-9


class PlanError(ValueError):
    """No fleet can run the work at all (for example, the quota allows no node)."""


# --------------------------------------------------------------------------------------------
# Known VM sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmSize:
    """One GPU VM size: its shape, its quota family and an *indicative* hourly price.

    Prices are rounded US-dollar list prices for Linux in a US region, as seen in 2024-25,
    for a first estimate only; low-priority prices are taken as about 20 % of dedicated.
    Real prices vary by region and over time: pass an explicit price (``--price``) or use
    the ``estimatedVMPrices`` that the AML sizes operation returns for the workspace region.
    """

    name: str
    cores: int
    gpus: int
    gpu: str
    family: str
    dedicated_usd_per_hour: float
    low_priority_usd_per_hour: float

    def price_per_hour(self, *, low_priority: bool) -> float:
        """The indicative price of one node of this size for the given tier."""
        return self.low_priority_usd_per_hour if low_priority else self.dedicated_usd_per_hour


_KNOWN: Final = (
    VmSize("Standard_NC4as_T4_v3", 4, 1, "T4", "standardNCASv3_T4Family", 0.526, 0.105),
    VmSize("Standard_NC8as_T4_v3", 8, 1, "T4", "standardNCASv3_T4Family", 0.752, 0.150),
    VmSize("Standard_NC16as_T4_v3", 16, 1, "T4", "standardNCASv3_T4Family", 1.204, 0.241),
    VmSize("Standard_NC64as_T4_v3", 64, 4, "T4", "standardNCASv3_T4Family", 4.352, 0.870),
    VmSize("Standard_NC6s_v3", 6, 1, "V100", "standardNCSv3Family", 3.06, 0.612),
    VmSize("Standard_NC12s_v3", 12, 2, "V100", "standardNCSv3Family", 6.12, 1.224),
    VmSize("Standard_NC24s_v3", 24, 4, "V100", "standardNCSv3Family", 12.24, 2.448),
    VmSize("Standard_NC24ads_A100_v4", 24, 1, "A100", "standardNCADSA100v4Family", 3.673, 0.735),
    VmSize("Standard_NC48ads_A100_v4", 48, 2, "A100", "standardNCADSA100v4Family", 7.346, 1.469),
    VmSize("Standard_NC96ads_A100_v4", 96, 4, "A100", "standardNCADSA100v4Family", 14.692, 2.938),
    VmSize("Standard_NV36ads_A10_v5", 36, 1, "A10", "standardNVADSA10v5Family", 3.20, 0.640),
    VmSize("Standard_ND96asr_v4", 96, 8, "A100", "standardNDASv4_A100Family", 27.197, 5.439),
)

KNOWN_VM_SIZES: Final[Mapping[str, VmSize]] = {size.name: size for size in _KNOWN}
"""Indicative facts about common GPU sizes, keyed by the exact Azure size name."""


def find_vm_size(name: str) -> VmSize | None:
    """Look a size up by name, ignoring case (Azure treats size names case-insensitively)."""
    wanted = name.strip().lower()
    for size in _KNOWN:
        if size.name.lower() == wanted:
            return size
    return None


# --------------------------------------------------------------------------------------------
# Closed-form estimates
# --------------------------------------------------------------------------------------------


def rounds(items: int, nodes: int) -> int:
    """How many items the busiest node processes: ``ceil(items / nodes)``, in integers."""
    if nodes <= 0:
        raise ValueError("nodes must be positive")
    return -(-items // nodes)


def makespan_s(items: int, nodes: int, sec_per_item: float, startup_s: float) -> float:
    """Expected wall-clock time of the run: start-up plus the busiest node's items."""
    if items == 0:
        return 0.0
    return startup_s + rounds(items, nodes) * sec_per_item


def node_leaves_at(
    idle_at: float, makespan: float, idle_exit_s: float, visibility_timeout_s: float
) -> float:
    """When a node idle since ``idle_at`` ends its job (the worker's may_exit_idle rule).

    It waits ``idle_exit_s``; then it leaves once the queue holds nothing, hidden messages
    included (that is the end of the run: until then the last items are in flight), or at
    the latest ``visibility_timeout_s`` later.
    """
    linger_until = min(makespan, idle_at + idle_exit_s + visibility_timeout_s)
    return max(idle_at + idle_exit_s, linger_until)


def billed_node_seconds(
    items: int,
    nodes: int,
    sec_per_item: float,
    startup_s: float,
    scale_down_s: float,
    *,
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S,
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
) -> float:
    """Node-seconds billed when each node runs its own job and is released after it.

    ``items % nodes`` nodes process one item more than the others (one shared queue); each
    node is billed from allocation until it leaves (``node_leaves_at``) plus the scale-down.
    """
    if nodes == 0 or items == 0:
        return 0.0
    few, busier = divmod(items, nodes)
    makespan = makespan_s(items, nodes, sec_per_item, startup_s)

    def billed(rounds_done: int) -> float:
        idle_at = startup_s + rounds_done * sec_per_item
        return node_leaves_at(idle_at, makespan, idle_exit_s, visibility_timeout_s) + scale_down_s

    return busier * billed(few + 1) + (nodes - busier) * billed(few)


def cost_usd(
    items: int,
    nodes: int,
    sec_per_item: float,
    startup_s: float,
    *,
    price_per_hour: float,
    scale_down_s: float,
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S,
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
) -> float:
    """Expected cost: each node billed for its own time (``billed_node_seconds``)."""
    seconds = billed_node_seconds(
        items,
        nodes,
        sec_per_item,
        startup_s,
        scale_down_s,
        idle_exit_s=idle_exit_s,
        visibility_timeout_s=visibility_timeout_s,
    )
    return seconds / 3600.0 * price_per_hour


def items_per_node_within(target_s: float, sec_per_item: float, startup_s: float) -> int:
    """The most items one node can finish, start-up included, within ``target_s``."""
    window = target_s - startup_s
    if window < 0:
        return 0
    per_node = int(window // sec_per_item)
    # Nudge past float rounding so the result agrees exactly with makespan_s().
    while per_node > 0 and startup_s + per_node * sec_per_item > target_s:
        per_node -= 1
    while startup_s + (per_node + 1) * sec_per_item <= target_s:
        per_node += 1
    return per_node


def nodes_needed(items: int, sec_per_item: float, startup_s: float, target_s: float) -> int | None:
    """The fewest nodes that finish within ``target_s``; None when no fleet size can."""
    if items == 0:
        return 0
    per_node = items_per_node_within(target_s, sec_per_item, startup_s)
    if per_node == 0:
        return None
    # ceil(items / n) <= per_node  <=>  n >= items / per_node.
    return rounds(items, per_node)


def split_nodes(total: int, max_per_cluster: int = MAX_NODES_PER_CLUSTER) -> list[int]:
    """Spread ``total`` nodes over the fewest clusters, as evenly as possible, dropping none.

    500 -> [100, 100, 100, 100, 100]; 250 -> [84, 83, 83]; the sum is always ``total``.
    """
    if total < 0 or max_per_cluster < 1:
        raise ValueError("total must be >= 0 and max_per_cluster >= 1")
    if total == 0:
        return []
    clusters = rounds(total, max_per_cluster)
    base, extra = divmod(total, clusters)
    return [base + 1] * extra + [base] * (clusters - extra)


def cluster_name(run_id: str, index: int) -> str:
    """A valid, deterministic AML compute name for the run's ``index``-th cluster.

    AML compute names are 2-16 letters, digits and dashes, start with a letter and must be
    unique in the region, so the run id (up to 40 characters) cannot be used as is: a short
    hash of it is. Ownership never rests on the name: every cluster carries the run's tag,
    and deletion checks the tag.
    """
    if not 0 <= index < 1000:
        raise ValueError("cluster index must be in 0..999")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
    return f"b{digest}-{index:02d}"


def cluster_index(run_id: str, name: str) -> int | None:
    """The index ``cluster_name`` gave ``name`` for ``run_id`` (None: not one of its names)."""
    return next((index for index in range(1000) if cluster_name(run_id, index) == name), None)


def renumbered(plan: RunPlan, first: int) -> RunPlan:
    """``plan`` with its clusters named from index ``first`` on: a fleet that replaces
    another (a fallback) lives on new clusters, never on the names the first one used."""
    clusters = [
        cluster.model_copy(update={"name": cluster_name(plan.run_id, first + offset)})
        for offset, cluster in enumerate(plan.clusters)
    ]
    return plan.model_copy(update={"clusters": clusters})


def next_cluster_index(plan: RunPlan) -> int:
    """The first cluster index after every cluster of ``plan``."""
    indexes = [cluster_index(plan.run_id, cluster.name) for cluster in plan.clusters]
    return 1 + max((index for index in indexes if index is not None), default=-1)


# --------------------------------------------------------------------------------------------
# Work measured in seconds of video
# --------------------------------------------------------------------------------------------


def segment_pieces(duration_s: float, segment_s: float | None) -> tuple[int, float]:
    """How many pieces a video of ``duration_s`` becomes, and the longest piece's seconds.

    The worker's rule (node_image/worker/segments.py ``plan_segments``): not split when
    segments are off or the video is no longer than one segment; else ceil(d / S) pieces of S
    seconds (at most MAX_SEGMENTS_PER_ITEM), the last one running to the end.
    """
    if segment_s is None or duration_s <= segment_s:
        return 1, duration_s
    count = min(MAX_SEGMENTS_PER_ITEM, math.ceil(duration_s / segment_s))
    if count < 2:
        return 1, duration_s
    return count, max(segment_s, duration_s - (count - 1) * segment_s)


@dataclass(frozen=True)
class MediaWork:
    """A manifest's work in seconds of video: what the per-video-second plan sizes.

    ``pieces`` counts the units a node takes from the queue (an item, or each segment of a
    split one; after :func:`packed`, a message of several items); ``media_s`` is the seconds
    of video of all items; ``longest_piece_s`` the seconds of video in the longest piece,
    ``longest_item_s`` in the longest video; ``split_items`` the items cut into segments.
    ``estimated`` items had no duration of their own and count as the mean of the others.
    """

    items: int
    pieces: int
    media_s: float
    longest_piece_s: float
    longest_item_s: float
    segment_s: float | None = None
    estimated: int = 0
    split_items: int = 0

    def __post_init__(self) -> None:
        if self.items < 0 or self.pieces < 0 or (self.items == 0) != (self.pieces == 0):
            raise ValueError("items and pieces must be >= 0, and 0 only together")
        if not 0 <= self.longest_piece_s <= self.media_s + _EPS:
            raise ValueError("need 0 <= longest_piece_s <= media_s")
        if not 0 <= self.longest_item_s <= self.media_s + _EPS:
            raise ValueError("need 0 <= longest_item_s <= media_s")
        if not math.isfinite(self.media_s) or not 0 <= self.estimated <= self.items:
            raise ValueError("media_s must be finite and estimated in 0..items")
        if not 0 <= self.split_items <= self.items:
            raise ValueError("split_items must be in 0..items")

    @property
    def mean_item_s(self) -> float:
        return self.media_s / self.items if self.items else 0.0


def packed(media: MediaWork, items_per_message: int) -> MediaWork:
    """The work as nodes take it when a queue message holds ``items_per_message`` items.

    A node takes a whole message: the unsplit items travel ``k`` to a message, so they are
    ``ceil(unsplit / k)`` pieces, the longest of which may hold the longest piece and
    ``k - 1`` videos of mean length beside it (a bound: which videos share a message is the
    manifest's order, unknown here). Segments travel one to a message (the worker sends them
    so), and stay pieces of their own.
    """
    k = items_per_message
    if k <= 1 or media.items == 0:
        return media
    unsplit = media.items - media.split_items
    if unsplit <= 0:
        return media
    segments = media.pieces - unsplit
    longest = media.longest_piece_s + (min(k, unsplit) - 1) * media.mean_item_s
    return dataclasses.replace(
        media,
        pieces=segments + math.ceil(unsplit / k),
        longest_piece_s=min(longest, media.media_s),
    )


class MediaTally:
    """Streams a manifest's video durations into a MediaWork (a manifest is never held whole).

    ``add`` each row's duration, ``add_unknown`` for a row without one; ``work`` gives unknown
    rows the mean of the known ones (a guess the plan's notes name).
    """

    def __init__(self, segment_s: float | None = None) -> None:
        if segment_s is not None and not segment_s > 0:
            raise ValueError("segment_s must be positive")
        self.segment_s = segment_s
        self.known = 0
        self.unknown = 0
        self.pieces = 0
        self.media_s = 0.0
        self.longest_piece_s = 0.0
        self.longest_item_s = 0.0
        self.split_items = 0

    def add(self, duration_s: float) -> None:
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"a duration must be a finite number of seconds >= 0: {duration_s}")
        count, longest = segment_pieces(duration_s, self.segment_s)
        self.known += 1
        self.pieces += count
        self.split_items += count > 1
        self.media_s += duration_s
        self.longest_piece_s = max(self.longest_piece_s, longest)
        self.longest_item_s = max(self.longest_item_s, duration_s)

    def add_unknown(self) -> None:
        self.unknown += 1

    def work(self) -> MediaWork:
        """The tally so far; ValueError when rows have no duration and none has one."""
        if self.unknown and not self.known:
            raise ValueError(f"none of {self.unknown} rows gives a duration")
        pieces, media = self.pieces, self.media_s
        longest_piece, longest_item = self.longest_piece_s, self.longest_item_s
        split = self.split_items
        if self.unknown:
            mean = self.media_s / self.known
            count, longest = segment_pieces(mean, self.segment_s)
            pieces += self.unknown * count
            media += self.unknown * mean
            longest_piece = max(longest_piece, longest)
            split += self.unknown if count > 1 else 0
        return MediaWork(
            items=self.known + self.unknown,
            pieces=pieces,
            media_s=media,
            longest_piece_s=longest_piece,
            longest_item_s=longest_item,
            segment_s=self.segment_s,
            estimated=self.unknown,
            split_items=split,
        )


DURATION_COLUMN: Final = "duration_s"
"""The optional manifest column giving each video's length, for plans by video length."""


def parse_media_duration(text: str) -> float | None:
    """A duration_s cell in seconds: ``312.5``, or like ``5m12s``; None when it is empty.

    ValueError with the rule for anything else (negative, not finite, not a duration).
    """
    value = text.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = parse_duration(value)  # ValueError with its own rule
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{text!r} is not a number of seconds >= 0")
    return seconds


class ManifestMediaTally:
    """The ``duration_s`` cells of a run's valid items, tallied as validation streams them
    (a MediaTally that also counts the cells that are no duration: their videos still run,
    the column only plans, so such a cell is counted as the mean and named in a note)."""

    def __init__(self, segment_s: float | None) -> None:
        self.tally = MediaTally(segment_s)
        self.seen_column = False
        self.unreadable = 0
        self.unreadable_rows: list[int] = []
        # The column's name as the header spells it (matched as the CLI's reader matches it,
        # ignoring case); every row has the header's columns, so it is found once.
        self._key: str | None = None

    def add(self, metadata: Mapping[str, str], row: int) -> None:
        if self._key is None:
            self._key = next((k for k in metadata if k.casefold() == DURATION_COLUMN), "")
        cell = metadata.get(self._key) if self._key else None
        if cell is None:
            self.tally.add_unknown()
            return
        self.seen_column = True
        try:
            seconds = parse_media_duration(cell)
        except ValueError:
            seconds = None
            self.unreadable += 1
            if len(self.unreadable_rows) < UNREADABLE_ROWS_KEPT:
                self.unreadable_rows.append(row)
        if seconds is None:
            self.tally.add_unknown()
        else:
            self.tally.add(seconds)

    def summary(self) -> MediaSummary | None:
        """The tally, or None when no valid row gave a duration (nothing to plan by)."""
        if not self.seen_column or not self.tally.known:
            return None
        work = self.tally.work()
        return MediaSummary(
            items=work.items,
            pieces=work.pieces,
            media_s=work.media_s,
            longest_piece_s=work.longest_piece_s,
            longest_item_s=work.longest_item_s,
            segment_s=work.segment_s,
            estimated=work.estimated,
            split_items=work.split_items,
            unreadable=self.unreadable,
            unreadable_rows=self.unreadable_rows,
        )


UNREADABLE_ROWS_KEPT: Final = 5


def media_work_of(summary: MediaSummary) -> MediaWork:
    """The planner's view of a manifest's media summary."""
    return MediaWork(
        items=summary.items,
        pieces=summary.pieces,
        media_s=summary.media_s,
        longest_piece_s=summary.longest_piece_s,
        longest_item_s=summary.longest_item_s,
        segment_s=summary.segment_s,
        estimated=summary.estimated,
        split_items=summary.split_items,
    )


def media_notes(summary: MediaSummary) -> list[str]:
    """What a plan by video length says about the manifest's durations."""
    notes: list[str] = []
    if summary.unreadable:
        rows = ", ".join(str(row) for row in summary.unreadable_rows)
        more = " and more" if summary.unreadable > len(summary.unreadable_rows) else ""
        notes.append(
            f"{summary.unreadable} {DURATION_COLUMN} cells are no duration (rows {rows}{more}): "
            "those videos still run, planned as the mean length"
        )
    return notes


def media_work(durations: Iterable[float | None], segment_s: float | None = None) -> MediaWork:
    """MediaWork of videos of these durations (None: unknown, counted as the mean)."""
    tally = MediaTally(segment_s)
    for duration in durations:
        if duration is None:
            tally.add_unknown()
        else:
            tally.add(duration)
    return tally.work()


def list_schedule_window_s(work_s: float, longest_s: float, pieces: int, nodes: int) -> float:
    """Seconds the busiest node works: the list-scheduling bound (see the module docstring).

    ``(work_s - longest_s) / nodes + longest_s``, or just ``longest_s`` once every piece
    has a node of its own.
    """
    if nodes <= 0:
        raise ValueError("nodes must be positive")
    if pieces == 0:
        return 0.0
    if nodes >= pieces:
        return longest_s
    return max(work_s - longest_s, 0.0) / nodes + longest_s


def straggler_excess_s(work_s: float, longest_s: float, pieces: int, nodes: int) -> float:
    """How much longer the longest piece makes the window than pieces of even length would."""
    if pieces == 0:
        return 0.0
    even = list_schedule_window_s(work_s, work_s / pieces, pieces, nodes)
    return max(list_schedule_window_s(work_s, longest_s, pieces, nodes) - even, 0.0)


@dataclass(frozen=True)
class _MediaLoad:
    """The node-seconds of a MediaWork at a cost per video second (and per piece)."""

    pieces: int
    work_s: float
    longest_s: float

    @classmethod
    def of(cls, media: MediaWork, sec_per_video_s: float, sec_per_piece: float) -> _MediaLoad:
        return cls(
            pieces=media.pieces,
            work_s=media.pieces * sec_per_piece + media.media_s * sec_per_video_s,
            longest_s=(sec_per_piece + media.longest_piece_s * sec_per_video_s)
            if media.pieces
            else 0.0,
        )

    def makespan(self, nodes: int, startup_s: float) -> float:
        if self.pieces == 0:
            return 0.0
        return startup_s + list_schedule_window_s(self.work_s, self.longest_s, self.pieces, nodes)

    def nodes_needed(self, startup_s: float, target_s: float) -> int | None:
        """The fewest nodes whose makespan is within ``target_s``; None when none is."""
        if self.pieces == 0:
            return 0
        room = target_s - startup_s - self.longest_s
        if room < -_EPS:
            return None
        rest = max(self.work_s - self.longest_s, 0.0)
        nodes = self.pieces if room <= _EPS else max(1, min(self.pieces, math.ceil(rest / room)))
        # Nudge past float rounding so the result agrees exactly with makespan().
        while nodes > 1 and self.makespan(nodes - 1, startup_s) <= target_s:
            nodes -= 1
        while nodes < self.pieces and self.makespan(nodes, startup_s) > target_s:
            nodes += 1
        return nodes if self.makespan(nodes, startup_s) <= target_s else None

    def billed_node_seconds(self, nodes: int, inputs: PlanInputs) -> float:
        """Each node billed until it leaves, on the schedule the makespan bound describes."""
        if nodes == 0 or self.pieces == 0:
            return 0.0
        startup = inputs.startup_s
        makespan = self.makespan(nodes, startup)
        rest = max(self.work_s - self.longest_s, 0.0)
        if nodes >= self.pieces:
            # One piece a node: the others' pieces share the rest, spare nodes get nothing.
            others = [(self.pieces - 1, rest / (self.pieces - 1) if self.pieces > 1 else 0.0)]
            others.append((nodes - self.pieces, 0.0))
        else:
            others = [(nodes - 1, rest / nodes)]

        def billed(idle_at: float) -> float:
            leaves = node_leaves_at(
                idle_at, makespan, inputs.idle_exit_s, inputs.visibility_timeout_s
            )
            return leaves + inputs.scale_down_s

        total = billed(makespan)  # the node with the longest piece
        for count, busy in others:
            total += count * billed(startup + busy)
        return total


# --------------------------------------------------------------------------------------------
# Sizing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    """Everything the sizing depends on. Times in seconds, prices in USD per node-hour."""

    items: int
    sec_per_item: float
    startup_s: float = DEFAULT_STARTUP_S
    deadline_s: float | None = None
    headroom: float = DEFAULT_HEADROOM
    vm_size: str = "Standard_NC4as_T4_v3"
    cores_per_vm: int = 4
    low_priority: bool = True
    price_per_hour: float = 0.0
    quota_cores: int | None = None
    max_nodes: int = 100
    max_nodes_per_cluster: int = MAX_NODES_PER_CLUSTER
    max_clusters: int = DEFAULT_MAX_CLUSTERS
    scale_down_s: float = DEFAULT_SCALE_DOWN_S
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    # The per-video-second model (module docstring): both or neither. With them,
    # ``sec_per_item`` is a fixed overhead per piece of work and may be 0.
    sec_per_video_s: float | None = None
    media: MediaWork | None = None

    def __post_init__(self) -> None:
        per_video = self.media is not None
        checks = [
            (self.items >= 0, "items must be >= 0"),
            (
                (self.sec_per_item >= 0 if per_video else self.sec_per_item > 0)
                and math.isfinite(self.sec_per_item),
                "sec_per_item must be >= 0" if per_video else "sec_per_item must be > 0",
            ),
            (
                (self.media is None) == (self.sec_per_video_s is None),
                "sec_per_video_s and media go together",
            ),
            (
                self.sec_per_video_s is None
                or (self.sec_per_video_s > 0 and math.isfinite(self.sec_per_video_s)),
                "sec_per_video_s must be > 0",
            ),
            (self.media is None or self.media.items == self.items, "media.items must be items"),
            (self.startup_s >= 0, "startup_s must be >= 0"),
            (self.deadline_s is None or self.deadline_s > 0, "deadline_s must be positive"),
            (0 <= self.headroom < 1, "headroom must be in [0, 1)"),
            (self.cores_per_vm >= 1, "cores_per_vm must be >= 1"),
            (self.price_per_hour >= 0, "price_per_hour must be >= 0"),
            (self.quota_cores is None or self.quota_cores >= 0, "quota_cores must be >= 0"),
            (self.max_nodes >= 1, "max_nodes must be >= 1"),
            (
                1 <= self.max_nodes_per_cluster <= MAX_NODES_PER_CLUSTER,
                f"max_nodes_per_cluster must be in 1..{MAX_NODES_PER_CLUSTER}",
            ),
            (1 <= self.max_clusters <= 999, "max_clusters must be in 1..999"),
            (self.scale_down_s >= 0, "scale_down_s must be >= 0"),
            (self.idle_exit_s >= 0, "idle_exit_s must be >= 0"),
            (self.visibility_timeout_s >= 0, "visibility_timeout_s must be >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def target_s(self) -> float | None:
        """The time the plan aims for: the deadline less its headroom."""
        return None if self.deadline_s is None else self.deadline_s * (1.0 - self.headroom)

    @property
    def quota_nodes(self) -> int | None:
        """Nodes the quota allows (whole VMs only), or None when the quota is not known."""
        return None if self.quota_cores is None else self.quota_cores // self.cores_per_vm

    @property
    def pieces(self) -> int:
        """Units of work a node takes from the queue: items, or items' segments."""
        return self.items if self.media is None else self.media.pieces


@dataclass(frozen=True)
class FleetSize:
    """The outcome of sizing, before clusters get names."""

    nodes_per_cluster: tuple[int, ...]
    est_makespan_s: float
    est_cost: float
    binding_limit: BindingLimit
    needed_nodes: int | None
    notes: tuple[str, ...] = field(default=())
    # The per-video-second model only: the longest piece's node-seconds, and whether it
    # (not the total work) sets the makespan (module docstring).
    longest_piece_s: float | None = None
    straggler: bool = False

    @property
    def total_nodes(self) -> int:
        return sum(self.nodes_per_cluster)


def _caps(inputs: PlanInputs) -> list[tuple[int, BindingLimit]]:
    # Listed in tie-break order: when two caps allow the same number of nodes, the first
    # one named is reported (too few items is the most natural explanation, then quota).
    caps: list[tuple[int, BindingLimit]] = [(inputs.pieces, "items")]
    if inputs.quota_nodes is not None:
        caps.append((inputs.quota_nodes, "quota"))
    caps.append((inputs.max_clusters * inputs.max_nodes_per_cluster, "max_clusters"))
    caps.append((inputs.max_nodes, "max_nodes"))
    return caps


def _cap_note(limit: BindingLimit, inputs: PlanInputs, allowed: int) -> str:
    if limit == "quota":
        return (
            f"{inputs.quota_cores} cores of {inputs.vm_size} quota "
            f"({inputs.cores_per_vm} cores per VM) allow {allowed} nodes"
        )
    if limit == "max_clusters":
        return (
            f"{inputs.max_clusters} clusters of at most {inputs.max_nodes_per_cluster} nodes "
            f"allow {allowed} nodes"
        )
    if limit == "max_nodes":
        return f"at most {allowed} nodes (max_nodes)"
    if inputs.media is not None and inputs.media.pieces != inputs.items:
        return (
            f"{inputs.media.pieces} pieces of work ({inputs.items} items, their segments "
            f"counted) keep at most {allowed} nodes busy (one piece per node)"
        )
    return f"{inputs.items} items keep at most {allowed} nodes busy (one item per node)"


def format_duration(seconds: float) -> str:
    """A short human form of a duration: 6460 -> '1h47m40s'."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)


def fleet_cost_usd(inputs: PlanInputs, nodes: int) -> float:
    """Expected cost of running the work on ``nodes`` nodes, caps ignored: the one cost model
    ``size_fleet`` sizes with (per item, or by video length when ``inputs.media`` is set).

    Also what a fleet the caps do not allow would cost, e.g. the one a missed deadline needs.
    """
    if nodes <= 0 or inputs.pieces == 0:
        return 0.0
    if inputs.media is not None:
        assert inputs.sec_per_video_s is not None
        load = _MediaLoad.of(inputs.media, inputs.sec_per_video_s, inputs.sec_per_item)
        return load.billed_node_seconds(nodes, inputs) / 3600.0 * inputs.price_per_hour
    return cost_usd(
        inputs.items,
        nodes,
        inputs.sec_per_item,
        inputs.startup_s,
        price_per_hour=inputs.price_per_hour,
        scale_down_s=inputs.scale_down_s,
        idle_exit_s=inputs.idle_exit_s,
        visibility_timeout_s=inputs.visibility_timeout_s,
    )


def size_fleet(inputs: PlanInputs) -> FleetSize:
    """Work out how many nodes, in which clusters, and what that is expected to take and cost.

    Raises PlanError when the caps allow no node at all (the quota is below one VM).
    """
    items, spi, startup = inputs.items, inputs.sec_per_item, inputs.startup_s
    if items == 0:
        return FleetSize((), 0.0, 0.0, "none", 0, ("no items: nothing to run",))
    if inputs.media is not None:
        return _size_media_fleet(inputs, inputs.media)

    cap, cap_limit = min(_caps(inputs), key=lambda pair: pair[0])
    if cap == 0:
        raise PlanError(f"{cap_limit} is the binding limit: {_cap_note(cap_limit, inputs, 0)}")

    notes: list[str] = []
    target = inputs.target_s
    needed: int | None = None
    if target is not None:
        assert inputs.deadline_s is not None
        needed = nodes_needed(items, spi, startup, target)
        notes.append(_deadline_note(inputs))

    def cost_of(nodes: int) -> float:
        return fleet_cost_usd(inputs, nodes)

    if needed is not None and needed <= cap:
        # Cheapest size that still meets the target; ties go to the faster (larger) fleet.
        # A few more nodes than strictly needed can cost less when they even out the rounds.
        nodes = min(
            range(needed, cap + 1),
            key=lambda n: (cost_of(n), makespan_s(items, n, spi, startup)),
        )
        binding: BindingLimit = "deadline"
        notes.append(f"the deadline needs {needed} nodes; planned {nodes}")
    else:
        # As fast as the caps allow, without nodes that would not shorten the run:
        # the fewest nodes with the same number of rounds as the cap.
        nodes = rounds(items, rounds(items, cap))
        binding = cap_limit
        if target is not None and needed is None:
            notes.append(
                f"the deadline cannot be met at any fleet size: start-up "
                f"{format_duration(startup)} + one item {spi:g} s exceeds "
                f"{format_duration(target)}"
            )
        if target is not None and needed is not None:
            notes.append(
                f"{cap_limit} is the binding limit: {_cap_note(cap_limit, inputs, cap)}; "
                f"the deadline needs {needed}"
            )
        else:
            notes.append(f"{cap_limit} is the binding limit: {_cap_note(cap_limit, inputs, cap)}")
        if nodes < cap:
            notes.append(
                f"{nodes} nodes finish in the same {rounds(items, nodes)} rounds as {cap}: "
                f"planned {nodes}"
            )

    makespan = makespan_s(items, nodes, spi, startup)
    busiest = (
        f"expected makespan {format_duration(makespan)}: start-up {format_duration(startup)} "
        f"+ {rounds(items, nodes)} items x {spi:g} s on the busiest node"
    )
    notes.extend(_closing_notes(inputs, nodes, makespan, cost_of(nodes), busiest))
    split = tuple(split_nodes(nodes, inputs.max_nodes_per_cluster))
    return FleetSize(split, makespan, cost_of(nodes), binding, needed, tuple(notes))


def _deadline_note(inputs: PlanInputs) -> str:
    assert inputs.deadline_s is not None and inputs.target_s is not None
    return (
        f"deadline {format_duration(inputs.deadline_s)} less {inputs.headroom:.0%} headroom: "
        f"aim to finish within {format_duration(inputs.target_s)}, start-up "
        f"({format_duration(inputs.startup_s)}) counted"
    )


def _closing_notes(
    inputs: PlanInputs, nodes: int, makespan: float, cost: float, busiest: str
) -> list[str]:
    """The notes every plan ends with: the deadline's verdict, the makespan, the cost."""
    notes: list[str] = []
    target = inputs.target_s
    tier = "low-priority" if inputs.low_priority else "dedicated"
    if inputs.deadline_s is not None and makespan > inputs.deadline_s:
        notes.append(
            f"expected makespan {format_duration(makespan)} misses the deadline "
            f"{format_duration(inputs.deadline_s)}"
        )
    elif target is not None and makespan > target + _EPS:
        notes.append(
            f"expected makespan {format_duration(makespan)} meets the deadline but not its "
            f"headroom (target {format_duration(target)})"
        )
    notes.append(busiest)
    notes.append(
        f"expected cost ${cost:,.2f}: {nodes} {tier} nodes at ${inputs.price_per_hour:g}/h, "
        f"each billed for its own job (start-up, its items, idle exit) + "
        f"{format_duration(inputs.scale_down_s)} scale-down"
    )
    if inputs.low_priority:
        notes.append(
            "low-priority nodes can be preempted: this estimate assumes none "
            "(batchctl plan --simulate estimates the effect)"
        )
    return notes


def _size_media_fleet(inputs: PlanInputs, media: MediaWork) -> FleetSize:
    """size_fleet for the per-video-second model: the same policy, the list-scheduling bound
    for the makespan (module docstring) instead of rounds of equal items."""
    assert inputs.sec_per_video_s is not None
    load = _MediaLoad.of(media, inputs.sec_per_video_s, inputs.sec_per_item)
    startup, target = inputs.startup_s, inputs.target_s
    cap, cap_limit = min(_caps(inputs), key=lambda pair: pair[0])
    if cap == 0:
        raise PlanError(f"{cap_limit} is the binding limit: {_cap_note(cap_limit, inputs, 0)}")

    def cost_of(nodes: int) -> float:
        return fleet_cost_usd(inputs, nodes)

    notes = [_media_note(inputs, media)]
    needed: int | None = None
    if target is not None:
        needed = load.nodes_needed(startup, target)
        notes.append(_deadline_note(inputs))
    if needed is not None and needed <= cap:
        nodes = min(range(needed, cap + 1), key=lambda n: (cost_of(n), load.makespan(n, startup)))
        binding: BindingLimit = "deadline"
        notes.append(f"the deadline needs {needed} nodes; planned {nodes}")
    else:
        # Every node more shortens the bound until each piece has its own: as fast as the
        # caps allow (the cap is never more than the pieces).
        nodes = cap
        binding = cap_limit
        if target is not None and needed is None:
            notes.append(
                f"the deadline cannot be met at any fleet size: start-up "
                f"{format_duration(startup)} + the longest piece {load.longest_s:g} s "
                f"exceeds {format_duration(target)}"
            )
        suffix = f"; the deadline needs {needed}" if needed is not None else ""
        notes.append(
            f"{cap_limit} is the binding limit: {_cap_note(cap_limit, inputs, cap)}{suffix}"
        )
    makespan = load.makespan(nodes, startup)
    excess = straggler_excess_s(load.work_s, load.longest_s, load.pieces, nodes)
    straggler = excess > STRAGGLER_SLACK * (makespan - startup)
    if straggler:
        notes.append(_straggler_note(media, load, excess))
    window = makespan - startup
    busiest = (
        f"expected makespan {format_duration(makespan)}: start-up {format_duration(startup)} "
        f"+ {format_duration(window)} on the busiest node (list-scheduling bound: "
        f"{load.work_s:,.0f} node-s of work over {nodes} nodes, the longest piece "
        f"{load.longest_s:,.0f} s last)"
    )
    notes.extend(_closing_notes(inputs, nodes, makespan, cost_of(nodes), busiest))
    split = tuple(split_nodes(nodes, inputs.max_nodes_per_cluster))
    return FleetSize(
        split,
        makespan,
        cost_of(nodes),
        binding,
        needed,
        tuple(notes),
        longest_piece_s=load.longest_s,
        straggler=straggler,
    )


def _media_note(inputs: PlanInputs, media: MediaWork) -> str:
    assert inputs.sec_per_video_s is not None
    overhead = f" + {inputs.sec_per_item:g} s a piece" if inputs.sec_per_item else ""
    split = (
        f", split into {media.pieces} pieces of at most {media.segment_s:g} s"
        if media.segment_s is not None and media.pieces > media.items
        else ""
    )
    note = (
        f"planned by video length: {format_duration(media.media_s)} of video in "
        f"{media.items} items at {inputs.sec_per_video_s:g} node-s per video second"
        f"{overhead}{split}"
    )
    if media.estimated:
        # MediaTally gives unknown rows the known ones' mean, so the overall mean is it too.
        note += (
            f"; {media.estimated} rows without a duration_s count as the mean of the others "
            f"({media.mean_item_s:g} s)"
        )
    return note


def _straggler_note(media: MediaWork, load: _MediaLoad, excess: float) -> str:
    """Why the plan is long, and what shortens it."""
    advice = (
        "split long videos with --segment-seconds, e.g. "
        f"--segment-seconds {max(1, round(media.mean_item_s))} (the mean video's length)"
    )
    if media.segment_s is not None:
        advice = f"a shorter --segment-seconds than {media.segment_s:g} splits it further"
    return (
        f"the longest piece is the straggler bound: {load.longest_s:,.0f} node-s "
        f"(a {format_duration(media.longest_piece_s)} piece of video) on one node makes the "
        f"run {format_duration(excess)} longer than pieces of even length would, and more "
        f"nodes do not remove that: {advice}"
    )


def plan_run(run_id: str, inputs: PlanInputs) -> RunPlan:
    """Size the fleet and name its clusters: the RunPlan the controller provisions."""
    fleet = size_fleet(inputs)
    clusters = [
        ClusterPlan(
            name=cluster_name(run_id, index),
            nodes=nodes,
            vm_size=inputs.vm_size,
            low_priority=inputs.low_priority,
        )
        for index, nodes in enumerate(fleet.nodes_per_cluster)
    ]
    return RunPlan(
        run_id=run_id,
        clusters=clusters,
        total_nodes=fleet.total_nodes,
        est_makespan_s=fleet.est_makespan_s,
        est_cost=round(fleet.est_cost, 4),
        binding_limit=fleet.binding_limit,
        notes=list(fleet.notes),
        # The report prices the node time actually billed at the rate the estimate used.
        price_per_hour=inputs.price_per_hour if inputs.price_per_hour > 0 else None,
    )


def inputs_from_options(
    items: int,
    sec_per_item: float,
    options: RunOptions,
    *,
    startup_s: float = DEFAULT_STARTUP_S,
    quota_cores: int | None = None,
    cores_per_vm: int | None = None,
    price_per_hour: float | None = None,
    headroom: float = DEFAULT_HEADROOM,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
    media: MediaWork | None = None,
    sec_per_video_s: float | None = None,
) -> PlanInputs:
    """PlanInputs for a run's options; cores and price default to the known-size table.
    With ``media`` and ``sec_per_video_s`` the plan is by video length (``sec_per_item``
    is then the overhead per piece, 0 for none).

    Raises ValueError when the VM size is unknown and its cores are needed (a quota is
    given) but not passed.
    """
    known = find_vm_size(options.vm_size)
    if cores_per_vm is None:
        if known is None and quota_cores is not None:
            raise ValueError(
                f"unknown VM size {options.vm_size!r}: pass its cores per VM to apply a quota"
            )
        cores_per_vm = known.cores if known is not None else 1
    if price_per_hour is None:
        price_per_hour = known.price_per_hour(low_priority=options.low_priority) if known else 0.0
    return PlanInputs(
        items=items,
        sec_per_item=sec_per_item,
        startup_s=startup_s,
        deadline_s=options.deadline_s,
        headroom=headroom,
        vm_size=options.vm_size,
        cores_per_vm=cores_per_vm,
        low_priority=options.low_priority,
        price_per_hour=price_per_hour,
        quota_cores=quota_cores,
        max_nodes=options.max_nodes,
        max_clusters=max_clusters,
        idle_exit_s=options.idle_exit_s,
        visibility_timeout_s=float(options.visibility_timeout_s),
        media=media,
        sec_per_video_s=sec_per_video_s,
    )


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNIT_SECONDS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``90``, ``90s``, ``5m``, ``2h``, ``1h30m`` or ``1.5h``.

    A bare number is seconds. Units must go from hours down, each at most once.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    position, total, seen = 0, 0.0, ""
    for match in _DURATION_PART.finditer(value):
        unit = match.group(2)
        if match.start() != position or (seen and "hms".index(unit) <= "hms".index(seen[-1])):
            break
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        seen += unit
        position = match.end()
    if not seen or position != len(value):
        raise ValueError(f"{text!r} is not a duration like 90s, 5m, 2h or 1h30m")
    return total
