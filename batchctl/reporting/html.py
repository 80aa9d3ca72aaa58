"""report.html: one self-contained page that shows a RunReport to a person.

Self-contained means it opens anywhere, offline, from a blob download or an e-mail
attachment: plots are PNGs drawn with matplotlib's Agg backend and embedded as base64 data
URIs, the CSS is inline, and there are no scripts and no external resources. Everything the
page shows comes from the RunReport (``report.stats`` holds the analysis), so report.json is
its machine-readable twin. Every string from a run (error messages, sources, node names) is
HTML-escaped, and matplotlib's mathtext is off so a '$' in a name cannot break a plot.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

import matplotlib
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, MaxNLocator

from batchctl.contracts import RunReport, RunStats
from batchctl.planning import format_duration
from batchctl.reporting.artifacts import FAILED_CSV_NAME, INDEX_CSV_NAME, MANIFEST_ERRORS_NAME

PLOT_COUNT: Final = 5
"""Every report has these many plots, whatever the run (empty ones say "no data")."""

LOCAL_PLOT_COUNT: Final = 4
"""A local run's report leaves out the GPU time and cost plot: worker processes on this
machine have no GPU price, and an idle-GPU figure for them would mislead."""

MAX_NODE_LABELS: Final = 40
"""Above this many nodes the bars lose their names (they would overlap) and are sorted."""

MAX_NODE_ROWS: Final = 50
"""The node table lists the slowest nodes first, at most this many; report.json has all."""

_OK = "#2e7d32"
_BAD = "#c62828"
_BLUE = "#1565c0"
_GREY = "#9e9e9e"
_PHASE = "#6a1b9a"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1000px; color: #212121; background: #fff; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; word-break: break-all; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #e0e0e0; }
tr.idle td { color: #757575; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #e0e0e0; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.msg { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word;
         max-width: 40em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.phase { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; color: #fff;
         font-weight: 600; }
.phase-completed { background: #2e7d32; } .phase-failed { background: #c62828; }
.phase-cancelled { background: #6d4c41; } .phase-other { background: #546e7a; }
.note { color: #616161; font-size: 0.9em; }
"""


# -- plots ------------------------------------------------------------------------------------
def _figure(draw: Callable[[Figure], None], height: float = 3.6, *, fixed: bool = False) -> Figure:
    """A fresh Agg figure, drawn on by ``draw``.

    Figure + FigureCanvasAgg rather than pyplot: no global figure registry to leak from and
    no backend selection, so this is safe in a long-lived Functions worker. ``fixed``: the
    drawing places its axes itself (:func:`_place`); otherwise constrained layout does.
    """
    figure = Figure(figsize=(9.5, height), dpi=100, layout=None if fixed else "constrained")
    FigureCanvasAgg(figure)
    draw(figure)
    return figure


def _png(draw: Callable[[Figure], None], height: float = 3.6, *, fixed: bool = False) -> str:
    """The figure :func:`_figure` draws, as a PNG data URI."""
    figure = _figure(draw, height, fixed=fixed)
    buffer = io.BytesIO()
    # No "Software" stamp: the same report renders to the same bytes. The fastest zlib
    # level: 15% more bytes, 14% less of the render (which a run's end waits for).
    figure.savefig(
        buffer, format="png", metadata={"Software": None}, pil_kwargs={"compress_level": 1}
    )
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- fixed layouts ----------------------------------------------------------------------------
# The three plots every report has (progress, stages, nodes) place their axes from the
# sizes of the few texts around them, each measured once, rather than through matplotlib's
# constrained layout: that solver measures every tick label of every axis and the draw then
# measures them all again, 40% of the render that a run's end waits for (0.42 -> 0.27-0.30 s for
# a 24-item run's plots). The failures plot keeps constrained layout: its labels are the
# run's own error classes, and it is cheap. tests/test_report_layout.py draws hostile runs
# (long node names, millions of items, one node, hundreds) and checks that no text leaves
# its figure or runs into the next plot.
_POINT_IN: Final = 1 / 72
_EDGE_IN: Final = 0.1  # between the figure's edge and its outermost text
_GAP_IN: Final = 0.25  # between two plots side by side (beyond the right one's labels)
_SETTLED_IN: Final = 0.01  # a margin this close to what its texts need is theirs
_FONT_PT: Final = 9.0
_NODE_LABEL_PT: Final = 7.0
_NODE_LABEL_DEGREES: Final = 60.0

PLOT_RC: Final[dict[Any, Any]] = {
    # A '$' in an error class or node name must print as itself, not start mathtext.
    "text.parse_math": False,
    "text.usetex": False,
    "font.size": _FONT_PT,
    # What the fixed layouts make room for, read back from rcParams as they measure (so a
    # user's matplotlibrc changes how the plots look, never what they clip).
    "axes.titlesize": "large",
    "axes.labelsize": "medium",
    "xtick.labelsize": "medium",
    "ytick.labelsize": "medium",
    "xtick.major.size": 3.5,
    "ytick.major.size": 3.5,
    "xtick.major.pad": 3.5,
    "ytick.major.pad": 3.5,
    "axes.labelpad": 4.0,
    "axes.titlepad": 6.0,
}
"""The settings every plot is drawn under (:func:`plot_style`)."""

MAX_NODE_LABEL_CHARS: Final = 32
"""Node names longer than this are shortened on the plot (with an ellipsis); the node table
and report.json have them whole."""


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    """Draw under :data:`PLOT_RC`."""
    with matplotlib.rc_context(PLOT_RC):
        yield


_FontSetting = Literal["axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize"]


def _points(key: _FontSetting) -> float:
    """A font size setting of rcParams ("large", 9.0, ...) in points."""
    return float(FontProperties(size=matplotlib.rcParams[key]).get_size_in_points())


def _labelpad_in() -> float:
    return float(matplotlib.rcParams["axes.labelpad"]) * _POINT_IN


def _tick_in() -> float:
    """A tick's length and the pad to its label (inches), the larger of the two axes'."""
    rc = matplotlib.rcParams
    x = float(rc["xtick.major.size"]) + float(rc["xtick.major.pad"])
    y = float(rc["ytick.major.size"]) + float(rc["ytick.major.pad"])
    return _POINT_IN * max(x, y)


def _text_in(
    figure: Figure, text: str, points: float, rotation: float = 0.0
) -> tuple[float, float]:
    """Width and height in inches of ``text`` at ``points`` (turned ``rotation`` degrees)
    as this figure draws it: a Text laid out by matplotlib itself, so its line spacing and
    the font's ascent and descent are the draw's own."""
    canvas = figure.canvas
    if not isinstance(canvas, FigureCanvasAgg):  # a bare Figure: its texts as Agg draws them
        canvas = FigureCanvasAgg(figure)
    renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]  # untyped in the stubs
    artist = Text(0, 0, text, fontsize=points, rotation=rotation)
    artist.set_figure(figure)
    box = artist.get_window_extent(renderer)
    return box.width / figure.dpi, box.height / figure.dpi


def _place(
    figure: Figure,
    *,
    left: float,
    right: float,
    bottom: float,
    top: float,
    gap: float = 0.0,
    columns: int = 1,
) -> float:
    """Put the figure's axes ``left``/``right``/``bottom``/``top`` inches from its edges
    (and ``gap`` inches apart, for ``columns`` plots side by side); returns a plot's width
    in inches."""
    width, height = (float(size) for size in figure.get_size_inches())
    plot_width = (width - left - right - gap * (columns - 1)) / columns
    figure.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=gap / plot_width if columns > 1 else None,
    )
    return plot_width


def _count_axis(axis: Axis) -> None:
    """Whole numbers with thousands separators, never an offset or an exponent (those
    would be drawn where the fixed layouts keep no room)."""
    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))


def _plain_axis(axis: Axis) -> None:
    """Numbers as ``:,g`` prints them, never an offset (see :func:`_count_axis`)."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,g}"))


def _place_empty(figure: Figure, title: str, columns: int = 1) -> None:
    """Place a plot that says "no data" (no ticks, no axis labels)."""
    _place(
        figure,
        left=_EDGE_IN,
        right=_EDGE_IN,
        bottom=_EDGE_IN,
        top=_top_for(figure, title),
        gap=_GAP_IN,
        columns=columns,
    )


def _widest_tick(figure: Figure, top_value: float, *, whole: bool) -> float:
    """The widest y tick label (inches) an axis up to about ``top_value`` can draw: the
    value past its auto-scaled limit, and a many-digit fraction, as the formatters print them."""
    beyond = abs(top_value) * 1.25 + 1
    candidates = [f"{beyond:,.0f}"] if whole else [f"{beyond:,g}", f"{beyond:,.0f}", "0.00005"]
    points = _points("ytick.labelsize")
    return max(_text_in(figure, "-" + text, points)[0] for text in candidates)


def _left_for(figure: Figure, ylabel: str, tick_width: float) -> float:
    """Room left of a plot for its y label and tick labels (inches)."""
    label = _text_in(figure, ylabel, _points("axes.labelsize"))[1]
    return label + _labelpad_in() + tick_width + _tick_in()


def _top_for(figure: Figure, title: str) -> float:
    title_pad = float(matplotlib.rcParams["axes.titlepad"]) * _POINT_IN
    return _EDGE_IN + _text_in(figure, title, _points("axes.titlesize"))[1] + title_pad


def _bottom_for(figure: Figure, tick_labels: str, xlabel: str | None) -> float:
    """Room below a plot for its x tick labels (one text, its lines the most any has) and label."""
    room = _EDGE_IN + _text_in(figure, tick_labels, _points("xtick.labelsize"))[1] + _tick_in()
    if xlabel:
        room += _text_in(figure, xlabel, _points("axes.labelsize"))[1] + _labelpad_in()
    return room


def _short_node(name: str) -> str:
    if len(name) <= MAX_NODE_LABEL_CHARS:
        return name
    return name[: MAX_NODE_LABEL_CHARS - 1] + "\u2026"


def _no_data(axes: Axes, title: str, text: str = "no data") -> None:
    axes.set_title(title)
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, color=_GREY)
    axes.set_xticks([])
    axes.set_yticks([])


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds > 2 * 3600:
        return 3600.0, "hours"
    if seconds > 600:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _draw_timeline(report: RunReport) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        axes = figure.add_subplot()
        title = "Items completed over time"
        stats = report.stats
        if stats is None or not stats.timeline:
            _no_data(axes, title)
            _place_empty(figure, title)
            return
        scale, unit = _time_unit(max(stats.wall_s, stats.timeline[-1].t_s))
        times = [point.t_s / scale for point in stats.timeline]
        done = [point.succeeded + point.failed for point in stats.timeline]
        xlabel = f"{unit} since the run started (bins of {stats.timeline_bin_s:g} s)"
        ylabel = "items (cumulative)"
        _count_axis(axes.yaxis)
        _plain_axis(axes.xaxis)
        widest = _widest_tick(figure, max([report.total, *done]), whole=True)
        _place(
            figure,
            left=_EDGE_IN + _left_for(figure, ylabel, widest),
            # Half the last x tick label may stand past the plot's right edge.
            right=_EDGE_IN + _widest_tick(figure, max(times), whole=False) / 2,
            bottom=_bottom_for(figure, "0", xlabel),
            top=_top_for(figure, title),
        )
        axes.step(times, done, where="post", color=_BLUE, label="done")
        axes.step(
            times, [p.succeeded for p in stats.timeline], where="post", color=_OK, label="succeeded"
        )
        axes.step(
            times, [p.failed for p in stats.timeline], where="post", color=_BAD, label="failed"
        )
        if report.total:
            axes.axhline(report.total, color=_GREY, linestyle="--", label=f"total {report.total}")
        markers = [m for m in report.phases if m.name != "report written"]
        for marker in markers:
            # Phase markers: where the time went before, during and after the items.
            axes.axvline(marker.t_s / scale, color=_PHASE, linestyle="-.", linewidth=0.8)
            axes.annotate(
                marker.name,
                (marker.t_s / scale, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=_PHASE,
            )
        if stats.wall_s > 0:
            axes.axvline(stats.wall_s / scale, color=_GREY, linestyle=":", label="run end")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.set_ylim(bottom=0)
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(alpha=0.3)

    return draw


def _draw_stages(report: RunReport) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        axes = figure.add_subplot()
        title = "Per-item duration by stage (succeeded items)"
        stages = [s for s in (report.stats.stages if report.stats else []) if s.count]
        if not stages:
            _no_data(axes, title)
            _place_empty(figure, title)
            return
        title = f"{title}: box p25-p75, line median, triangle mean, whiskers min-max"
        ylabel = "seconds"
        _plain_axis(axes.yaxis)
        widest = _widest_tick(figure, max(s.max_s for s in stages), whole=False)
        _place(
            figure,
            left=_EDGE_IN + _left_for(figure, ylabel, widest),
            right=_EDGE_IN,
            bottom=_bottom_for(figure, "stage\n(n=1)", None),  # each box's two-line label
            top=_top_for(figure, title),
        )
        boxes = [
            {
                "label": f"{s.stage}\n(n={s.count:,})",
                "whislo": s.min_s,
                "q1": s.p25_s,
                "med": s.p50_s,
                "q3": s.p75_s,
                "whishi": s.max_s,
                "mean": s.mean_s,
                "fliers": [],
            }
            for s in stages
        ]
        # Vertical boxes: bxp's orientation keyword only exists from matplotlib 3.10.
        axes.bxp(boxes, showmeans=True)
        positions = range(1, len(stages) + 1)
        axes.plot(positions, [s.p90_s for s in stages], "x", color=_BAD, label="p90")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(axis="y", alpha=0.3)

    return draw


def _draw_nodes(report: RunReport) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        left, right = figure.subplots(1, 2)
        nodes = report.stats.nodes if report.stats else []
        titles = ("Items per node", "Throughput per node (per active hour)")
        if not nodes:
            _no_data(left, titles[0])
            _no_data(right, titles[1])
            _place_empty(figure, titles[0], columns=2)
            return
        labelled = len(nodes) <= MAX_NODE_LABELS
        ordered = nodes if labelled else sorted(nodes, key=lambda n: n.succeeded + n.failed)
        positions = list(range(len(ordered)))
        names = [_short_node(n.node) for n in ordered]
        rates = [n.items_per_hour or 0.0 for n in ordered]
        ylabels = ("items", "items / hour")
        xlabel = None if labelled else f"{len(ordered):,} nodes, sorted by items"
        _place_nodes(
            figure,
            names=names if labelled else [],
            most_items=max(n.succeeded + n.failed for n in ordered),
            rates=rates,
            ylabels=ylabels,
            xlabel=xlabel,
            title=titles[0],
        )
        left.bar(positions, [n.succeeded for n in ordered], color=_OK, label="succeeded")
        left.bar(
            positions,
            [n.failed for n in ordered],
            bottom=[n.succeeded for n in ordered],
            color=_BAD,
            label="failed",
        )
        left.legend(fontsize=8)
        right.bar(positions, rates, color=_BLUE)
        _count_axis(left.yaxis)
        _plain_axis(right.yaxis)
        for axes, title, ylabel in zip((left, right), titles, ylabels, strict=True):
            axes.set_title(title)
            axes.set_ylabel(ylabel)
            axes.grid(axis="y", alpha=0.3)
            if labelled:
                axes.set_xticks(
                    positions,
                    names,
                    rotation=_NODE_LABEL_DEGREES,
                    ha="right",
                    fontsize=_NODE_LABEL_PT,
                )
            else:
                axes.set_xticks([])
                axes.set_xlabel(xlabel or "")

    return draw


def _nodes_height(report: RunReport) -> float:
    """The node plots' figure height (inches): taller where the slanted names take more of
    it, so the bars keep about as much as with short names."""
    nodes = report.stats.nodes if report.stats else []
    if len(nodes) > MAX_NODE_LABELS:
        return 3.6
    longest = max((len(_short_node(n.node)) for n in nodes), default=0)
    return 3.6 + 0.04 * max(0, longest - 8)


def _place_nodes(
    figure: Figure,
    *,
    names: list[str],
    most_items: int,
    rates: list[float],
    ylabels: tuple[str, str],
    xlabel: str | None,
    title: str,
) -> None:
    """The two node plots' places: room for each one's y labels, and for the node names
    slanted below them, which reach down and to the left of their bars (the first one past
    the plot's left edge where it is long)."""
    left_room = _left_for(figure, ylabels[0], _widest_tick(figure, most_items, whole=True))
    right_room = _left_for(figure, ylabels[1], _widest_tick(figure, max(rates), whole=False))
    # Each name, slanted and right-aligned at its bar's tick, reaches down and to the left
    # by its slanted box's height and width.
    sizes = [_text_in(figure, name, _NODE_LABEL_PT, _NODE_LABEL_DEGREES) for name in names]
    drop = max((height for _, height in sizes), default=0.0)
    reaches = [width for width, _ in sizes]
    bottom = _EDGE_IN + drop + _tick_in() if names else _bottom_for(figure, "", xlabel)
    # Where each bar's tick is, from its plot's left edge, as a share of the plot's width:
    # bars are 0.8 wide at 0 .. n-1, with matplotlib's 5% margins on either side.
    span = len(names) - 1 + 0.8
    ticks = [(0.4 + 0.05 * span + index) / (1.1 * span) for index in range(len(names))]
    least_left, least_gap = _EDGE_IN + left_room, _GAP_IN + right_room
    top = _top_for(figure, title)

    def place(left: float, gap: float) -> float:
        return _place(figure, left=left, right=_EDGE_IN, bottom=bottom, top=top, gap=gap, columns=2)

    left_margin, gap = least_left, least_gap
    # A wider margin narrows the plots, which moves their ticks left: widen until the names
    # fit (a few rounds; each one needs less than the one before).
    for _ in range(6):
        plot_width = place(left_margin, gap)
        overhang = max(
            (reach - tick * plot_width for reach, tick in zip(reaches, ticks, strict=True)),
            default=0.0,
        )
        wanted = (max(least_left, _EDGE_IN + overhang), max(least_gap, _GAP_IN + overhang))
        if wanted[0] <= left_margin + _SETTLED_IN and wanted[1] <= gap + _SETTLED_IN:
            return
        left_margin, gap = wanted[0] + _SETTLED_IN, wanted[1] + _SETTLED_IN
    # Not settled in those rounds (it always has so far): the widest margins asked for.
    place(left_margin, gap)


def _draw_failures(report: RunReport) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        axes = figure.add_subplot()
        title = "Failures by error class"
        failures = report.stats.failures if report.stats else []
        if not failures:
            _no_data(axes, title, "no failures")
            return
        shown = failures[:20]  # the most frequent; the table and report.json list every class
        positions = list(range(len(shown)))
        axes.barh(positions, [f.count for f in shown], color=_BAD)
        axes.set_yticks(positions, [f.error_class for f in shown], fontsize=8)
        axes.invert_yaxis()
        axes.set_xlabel("failed items")
        axes.set_title(title if len(shown) == len(failures) else f"{title} (top {len(shown)})")
        axes.grid(axis="x", alpha=0.3)

    return draw


def _draw_cost(report: RunReport) -> Callable[[Figure], None]:
    def draw(figure: Figure) -> None:
        left, right = figure.subplots(1, 2)
        cost = report.stats.cost if report.stats else None
        if cost is None or (cost.node_seconds_billed == 0 and cost.node_seconds_busy == 0):
            _no_data(left, "GPU node-hours")
        else:
            hours = [cost.node_seconds_billed / 3600, cost.node_seconds_busy / 3600]
            left.bar(["billed (estimate)", "busy (items)"], hours, color=[_GREY, _BLUE])
            idle = "unknown" if cost.idle_fraction is None else f"{cost.idle_fraction:.0%}"
            left.set_title(f"GPU node-hours (idle {idle})")
            left.set_ylabel("node-hours")
            left.grid(axis="y", alpha=0.3)
        if cost is None or (cost.est_cost is None and cost.actual_cost is None):
            _no_data(right, "Cost (USD)")
            return
        labels = ["plan estimate", "actual estimate"]
        values = [cost.est_cost or 0.0, cost.actual_cost or 0.0]
        bars = right.bar(labels, values, color=[_GREY, _BLUE])
        for bar, value in zip(bars, (cost.est_cost, cost.actual_cost), strict=True):
            text = "unknown" if value is None else f"${value:,.2f}"
            right.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=10,
            )
        right.set_title("Cost (USD)")
        right.set_ylim(0, max(values) * 1.25 or 1.0)
        right.grid(axis="y", alpha=0.3)

    return draw


# -- page -------------------------------------------------------------------------------------
def _text(value: object) -> str:
    return escape(str(value), quote=True)


def _when(moment: datetime) -> str:
    return _text(moment.isoformat(timespec="seconds"))


def _rows(rows: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{_text(k)}</th><td>{v}</td></tr>" for k, v in rows)


def _header(report: RunReport) -> str:
    phase = report.phase.value
    css = phase if phase in ("completed", "failed", "cancelled") else "other"
    wall = report.stats.wall_s if report.stats else 0.0
    rows = [
        ("Phase", f'<span class="phase phase-{css}">{_text(phase)}</span>'),
        ("Message", _text(report.message or "-")),
        ("Manifest", _manifest_text(report)),
        (
            "Items",
            (
                f"{report.total:,} valid: {report.succeeded:,} succeeded, "
                f"{report.failed:,} failed, "
                f"{max(report.total - report.succeeded - report.failed, 0):,} without a record; "
                f"{report.invalid:,} invalid manifest rows"
            ),
        ),
        ("Weights", _text(report.weights or "not recorded")),
        ("Started", _when(report.started_at)),
        ("Finished", f"{_when(report.finished_at)} (wall time {format_duration(wall)})"),
        ("Outputs", _text(report.output_prefix)),
    ]
    plan = report.plan
    if plan is not None:
        sizes = sorted({c.vm_size for c in plan.clusters})
        expected = (
            ""
            if report.local
            else (
                f", expected makespan {format_duration(plan.est_makespan_s)}, "
                f"expected cost ${plan.est_cost:,.2f}"
            )
        )
        rows.append(
            (
                "Plan",
                _text(
                    f"{plan.total_nodes} nodes in {len(plan.clusters)} cluster(s) "
                    f"({', '.join(sizes) or '-'}), binding limit {plan.binding_limit}"
                    f"{expected}"
                ),
            )
        )
    return f"<h1>Run {_text(report.run_id)}</h1><table>{_rows(rows)}</table>"


def _manifest_text(report: RunReport) -> str:
    if report.manifest_label and report.manifest_label != report.manifest:
        return (
            f'<span id="manifest-label">{_text(report.manifest_label)}</span> '
            f'<span class="note">(staged as {_text(report.manifest)})</span>'
        )
    return f'<span id="manifest-label">{_text(report.manifest)}</span>'


def _link(href: str, label: str) -> str:
    return f'<a href="{_text(href)}">{_text(label)}</a>'


def _files_section(report: RunReport) -> str:
    """What to open next: the rows to retry, the index, the invalid rows, the outputs."""
    rows: list[tuple[str, str]] = []
    to_retry = max(report.total - report.succeeded, 0)
    if report.failed_csv:
        rows.append(
            (
                "Rows to retry",
                f"{_link(FAILED_CSV_NAME, FAILED_CSV_NAME)}: {to_retry:,} rows (failed "
                f"{report.failed:,}, not run {report.not_run:,}), the manifest's header and "
                "cells, ready to run again",
            )
        )
    if report.index_csv:
        rows.append(
            (
                "Item index",
                f"{_link(INDEX_CSV_NAME, INDEX_CSV_NAME)}: row, item_id, source, status and "
                "output folder of every valid row",
            )
        )
    if report.invalid_rows_file:
        rows.append(
            (
                "Invalid rows",
                f"{_link(MANIFEST_ERRORS_NAME, MANIFEST_ERRORS_NAME)}: {report.invalid:,} rows "
                "with the reason each was rejected",
            )
        )
    outputs = "outputs/" if report.local else report.output_prefix
    rows.append(
        (
            "Item outputs",
            (_link(f"{outputs}items/", f"{outputs}items/") if report.local else _text(outputs))
            + " (one folder per item id)",
        )
    )
    if report.merged_dataset:
        merged = "outputs/merged/" if report.local else report.merged_dataset
        shown = _link(merged, merged) if report.local else _text(merged)
        rows.append(("Merged dataset", f"{shown} (Parquet, one row per frame)"))
    if report.data_asset is not None:
        asset = report.data_asset
        rows.append(
            (
                "Data asset",
                _text(asset.reference) + " (an AML job's input)"
                if asset.reference is not None
                else _text(f"{asset.name}: {asset.note}"),
            )
        )
    return f'<section id="files"><h2>Files</h2><table>{_rows(rows)}</table></section>'


def _options_section(report: RunReport) -> str:
    if report.options is None:
        return ""
    values = report.options.model_dump(mode="json")
    cells = [(name, _text(json.dumps(value))) for name, value in values.items()]
    return f'<section id="options"><h2>Run options</h2><table>{_rows(cells)}</table></section>'


def _invalid_section(report: RunReport) -> str:
    if not report.invalid:
        return ""
    rows = "".join(
        f"<tr><td class=num>{e.row}</td><td class=num>{e.line}</td>"
        f"<td>{_text(e.field or '-')}</td><td class=msg>{_text(e.reason)}</td></tr>"
        for e in report.invalid_rows
    )
    more = (
        f'<p class="note">The first {len(report.invalid_rows):,} of {report.invalid:,}; '
        f"{_text(MANIFEST_ERRORS_NAME)} has every one.</p>"
        if len(report.invalid_rows) < report.invalid
        else ""
    )
    head = "<tr><th>row</th><th>line</th><th>column</th><th>reason</th></tr>"
    return (
        f'<section id="invalid-rows"><h2>Invalid rows ({report.invalid:,})</h2>'
        f"<table>{head}{rows}</table>{more}</section>"
    )


def _phase_table(report: RunReport) -> str:
    if not report.phases:
        return ""
    rows = "".join(
        f"<tr><td>{_text(m.name)}</td><td class=num>{m.t_s:,.1f}</td><td>{_text(m.note)}</td></tr>"
        for m in report.phases
    )
    return (
        '<table id="phases"><tr><th>phase marker</th><th>s after start</th><th>what</th></tr>'
        f"{rows}</table>"
    )


def _log_href(path: str, run_id: str) -> str:
    """A local log as a link from report.html: relative when the log sits in the run's
    folder (where report.html is copied), else an absolute file URI."""
    log = Path(path)
    if log.parent.name == "logs" and log.parent.parent.name == run_id:
        return f"logs/{log.name}"
    return log.as_uri() if log.is_absolute() else path


def _page_label(url: str) -> str:
    """A job page's label: the job's name, the last segment of its path."""
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]) or url


def _planned_nodes_section(report: RunReport) -> str:
    if not report.planned_nodes:
        return ""
    rows = []
    for slot in report.planned_nodes:
        idle = not (slot.succeeded or slot.failed)
        if report.local:
            logs = ", ".join(
                _link(_log_href(log, report.run_id), Path(log).name) for log in slot.logs
            )
        else:
            # An AML job's studio page is a link; a job not known by name stays text.
            logs = ", ".join(
                _link(log, _page_label(log)) if log.startswith("https://") else _text(log)
                for log in slot.logs
            )
        rows.append(
            f'<tr class="{"idle" if idle else "worked"}"><td>{_text(slot.cluster)}</td>'
            f"<td class=num>{slot.slot}</td><td>{_text(slot.vm_size)}</td>"
            f"<td>{_text(', '.join(slot.workers) or '-')}</td>"
            f"<td class=num>{slot.succeeded:,}</td><td class=num>{slot.failed:,}</td>"
            f"<td>{'idle: no item' if idle else 'worked'}</td><td>{logs or '-'}</td></tr>"
        )
    idle_count = sum(1 for s in report.planned_nodes if not (s.succeeded or s.failed))
    head = "".join(
        f"<th>{h}</th>"
        for h in ("cluster", "slot", "size", "workers", "succeeded", "failed", "state", "logs")
    )
    extra = (
        f'<p class="note">Workers that match no planned slot (e.g. named by host): '
        f"{_text(', '.join(report.unplanned_workers))}</p>"
        if report.unplanned_workers
        else ""
    )
    return (
        f'<div id="planned-nodes"><p class="note">Every planned node: '
        f"{len(report.planned_nodes):,} slots, {idle_count:,} idle.</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>{extra}</div>"
    )


def _stage_table(stats: RunStats) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("stage", "items", "mean", "p50", "p90", "p99", "max"))
    body = "".join(
        f"<tr><td>{_text(s.stage)}</td><td class=num>{s.count:,}</td>"
        + "".join(
            f"<td class=num>{v:.3f}</td>" for v in (s.mean_s, s.p50_s, s.p90_s, s.p99_s, s.max_s)
        )
        + "</tr>"
        for s in stats.stages
        if s.count
    )
    return f"<table><tr>{head}</tr>{body}</table>" if body else ""


def _node_table(stats: RunStats) -> str:
    if not stats.nodes:
        return ""
    slowest = sorted(stats.nodes, key=lambda n: (n.items_per_hour or 0.0, n.node))
    rows = "".join(
        f"<tr><td>{_text(n.node)}</td><td class=num>{n.succeeded:,}</td>"
        f"<td class=num>{n.failed:,}</td><td class=num>{n.busy_s:,.1f}</td>"
        f"<td class=num>{n.active_s:,.1f}</td><td class=num>"
        f"{'-' if n.items_per_hour is None else f'{n.items_per_hour:,.1f}'}</td></tr>"
        for n in slowest[:MAX_NODE_ROWS]
    )
    more = (
        f'<p class="note">{len(slowest) - MAX_NODE_ROWS:,} more nodes in report.json.</p>'
        if len(slowest) > MAX_NODE_ROWS
        else ""
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("node", "succeeded", "failed", "item-seconds", "active s", "items / hour")
    )
    return f'<p class="note">Slowest first.</p><table><tr>{head}</tr>{rows}</table>{more}'


def _failure_table(stats: RunStats) -> str:
    if not stats.failures:
        return '<p class="note">No item failed.</p>'
    rows = []
    for failure in stats.failures:
        examples = failure.examples or []
        span = max(len(examples), 1)
        lead = (
            f'<td rowspan="{span}">{_text(failure.error_class)}</td>'
            f'<td rowspan="{span}" class=num>{failure.count:,}</td>'
            f'<td rowspan="{span}" class=num>{failure.permanent:,}</td>'
        )
        if not examples:
            rows.append(f"<tr>{lead}<td></td><td></td><td></td></tr>")
        for index, example in enumerate(examples):
            cells = (
                f"<td>{_text(example.item_id)}</td><td class=msg>{_text(example.source)}</td>"
                f"<td class=msg>{_text(example.message)} (attempts: {example.attempts})</td>"
            )
            rows.append(f"<tr>{lead if index == 0 else ''}{cells}</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("error class", "items", "permanent", "example item", "source", "message")
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _cost_text(stats: RunStats) -> str:
    cost = stats.cost
    idle = "unknown" if cost.idle_fraction is None else f"{cost.idle_fraction:.1%}"
    rows = [
        ("Billed node-seconds", f"{cost.node_seconds_billed:,.0f} ({_text(cost.billed_basis)})"),
        (
            "Busy node-seconds",
            f"{cost.node_seconds_busy:,.0f} (each node's first item start to last item end)",
        ),
        ("Idle fraction", idle),
        ("Plan estimate", "unknown" if cost.est_cost is None else f"${cost.est_cost:,.2f}"),
        (
            "Actual estimate",
            ("unknown" if cost.actual_cost is None else f"${cost.actual_cost:,.2f}")
            + f" ({_text(cost.cost_note)})",
        ),
    ]
    return f"<table>{_rows(rows)}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_text(alt)}">'


def render_report_html(report: RunReport) -> str:
    """The whole report as one HTML document (str); raises nothing for empty or failed runs."""
    stats = report.stats
    with plot_style():
        timeline = _png(_draw_timeline(report), fixed=True)
        stages = _png(_draw_stages(report), fixed=True)
        nodes = _png(_draw_nodes(report), height=_nodes_height(report), fixed=True)
        failures = _png(_draw_failures(report), height=max(2.5, 0.9 + 0.3 * _classes(stats)))
        cost = None if report.local else _png(_draw_cost(report), height=3.2)
    notes = "".join(f'<p class="note">{_text(n)}</p>' for n in (stats.notes if stats else []))
    if stats is not None and stats.undated:
        notes += (
            f'<p class="note">{stats.undated:,} records have no usable finish time '
            "(missing, or far outside the run: a node's clock is off).</p>"
        )
    sections = [
        _header(report),
        notes,
        _files_section(report),
        _invalid_section(report),
        "<h2>Progress</h2>",
        _img(timeline, "items completed over time"),
        _phase_table(report),
        "<h2>Stage durations</h2>",
        _img(stages, "per-item duration by stage"),
        _stage_table(stats) if stats else "",
        "<h2>Nodes</h2>",
        _planned_nodes_section(report),
        _img(nodes, "items and throughput per node"),
        _node_table(stats) if stats else "",
        "<h2>Failures</h2>",
        _img(failures, "failures by error class"),
        _failure_table(stats) if stats else "",
    ]
    if cost is not None:
        sections += [
            "<h2>GPU time and cost</h2>",
            _img(cost, "billed vs busy node time and cost"),
            _cost_text(stats) if stats else "",
        ]
    sections.append(_options_section(report))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>batchctl run {_text(report.run_id)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(sections)}</body></html>\n"
    )


def _classes(stats: RunStats | None) -> int:
    return min(len(stats.failures), 20) if stats else 0
