"""The report's plots that place their axes themselves (batchctl.reporting.html's fixed
layouts) keep every text inside the figure and clear of the next plot, for runs as odd as
they come: one node or hundreds, names of a character or of eighty wide ones, a handful of
items or millions, stages of milliseconds or of days. Seeded: each case is drawn from a
random generator whose seed the test names, so a failure reproduces."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox, BboxBase

from batchctl.contracts import (
    NodeThroughput,
    RunPhase,
    RunReport,
    StageStats,
    TimelinePoint,
)
from batchctl.reporting import html
from batchctl.reporting.analysis import RunAnalysis

START = datetime(2026, 1, 1, tzinfo=UTC)
TOLERANCE_PX = 1.0
FIXED: dict[str, Callable[[RunReport], Callable[[Figure], None]]] = {
    "progress": html._draw_timeline,
    "stages": html._draw_stages,
    "nodes": html._draw_nodes,
}


def _name(rng: random.Random) -> str:
    length = rng.choice([1, 5, 12, 30, 31, 32, 33, 45, 80])
    alphabet = rng.choice([string.ascii_lowercase + "-0123456789", "WM@", "il.", "$_%<>&"])
    return "".join(rng.choice(alphabet) for _ in range(length))


def _hostile_report(seed: int) -> RunReport:
    rng = random.Random(seed)
    total = rng.choice([0, 1, 7, 24, 999, 12_345, 1_000_000, 48_000_000])
    wall_s = rng.choice([0.5, 9.0, 700.0, 40_000.0, 9 * 86_400.0])
    bins = rng.choice([1, 2, 60, 600])
    done = [round(total * (index + 1) / bins) for index in range(bins)]
    failed = [value // rng.choice([2, 10, 10**9]) for value in done]
    timeline = [
        TimelinePoint(t_s=wall_s * (index + 1) / bins, succeeded=d - f, failed=f)
        for index, (d, f) in enumerate(zip(done, failed, strict=True))
    ]
    node_count = rng.choice([1, 2, 7, 40, 41, 300])
    nodes = [
        NodeThroughput(
            node=_name(rng) if rng.random() < 0.7 else f"node-{index}",
            succeeded=rng.choice([0, 3, total]),
            failed=rng.choice([0, 1, total // 3]),
            busy_s=wall_s,
            active_s=wall_s,
            items_per_hour=rng.choice([None, 0.25, 17.0, 3_600.0, 2_500_000.0]),
        )
        for index in range(node_count)
    ]
    longest = rng.choice([0.002, 1.5, 600.0, 86_400.0 * 3])
    stages = [
        StageStats(
            stage=stage,
            count=max(total, 1),
            sample_size=1,
            mean_s=longest / 3,
            min_s=0.0,
            p25_s=longest / 10,
            p50_s=longest / 5,
            p75_s=longest / 2,
            p90_s=longest * 0.8,
            max_s=longest,
        )
        for stage in ("download", "decode", "inference", "upload", "total")
    ]
    finished = START + timedelta(seconds=wall_s)
    stats = RunAnalysis(START).summarize(finished, None)
    stats = stats.model_copy(
        update={
            "wall_s": wall_s,
            "timeline_bin_s": wall_s / bins,
            "timeline": timeline,
            "nodes": nodes,
            "stages": stages,
        }
    )
    return RunReport(
        run_id="r1",
        phase=RunPhase.COMPLETED,
        manifest="manifests/m.csv",
        total=total,
        succeeded=total,
        failed=0,
        invalid=0,
        started_at=START,
        finished_at=finished,
        output_prefix="outputs/r1/",
        weights="none",
        stats=stats,
        local=True,
    )


def _drawn_ticks(axes: Axes) -> list[Text]:
    """The tick labels a draw shows: those of the ticks inside the view (an axis keeps
    Text objects for ticks past its limits too, never drawn)."""
    drawn = []
    for axis in (axes.xaxis, axes.yaxis):
        low, high = sorted(axis.get_view_interval())
        slack = (high - low) * 1e-9
        drawn += [
            label
            for tick in axis.get_major_ticks()
            if low - slack <= tick.get_loc() <= high + slack
            for label in (tick.label1, tick.label2)
            if label.get_visible() and label.get_text().strip()
        ]
    return drawn


def _texts(figure: Figure) -> list[Text]:
    """Every text the figure draws."""
    ticks = {
        id(label)
        for axes in figure.get_axes()
        for axis in (axes.xaxis, axes.yaxis)
        for tick in axis.get_major_ticks() + axis.get_minor_ticks()
        for label in (tick.label1, tick.label2)
    }
    others = [
        text
        for text in figure.findobj(Text)
        if isinstance(text, Text)
        and id(text) not in ticks
        and text.get_visible()
        and text.get_text().strip()
    ]
    return others + [label for axes in figure.get_axes() for label in _drawn_ticks(axes)]


def _inside(inner: BboxBase, outer: BboxBase) -> bool:
    return bool(
        inner.x0 >= outer.x0 - TOLERANCE_PX
        and inner.y0 >= outer.y0 - TOLERANCE_PX
        and inner.x1 <= outer.x1 + TOLERANCE_PX
        and inner.y1 <= outer.y1 + TOLERANCE_PX
    )


def _overlap(a: BboxBase, b: BboxBase) -> bool:
    return bool(
        min(a.x1, b.x1) - max(a.x0, b.x0) > TOLERANCE_PX
        and min(a.y1, b.y1) - max(a.y0, b.y0) > TOLERANCE_PX
    )


def _axis_texts(axes: Axes) -> list[Text]:
    """The texts around a plot: its tick labels, axis labels and title."""
    texts = [*_drawn_ticks(axes), axes.xaxis.label, axes.yaxis.label, axes.title]
    return [text for text in texts if text.get_visible() and text.get_text().strip()]


def _problems(figure: Figure) -> list[str]:
    figure.draw_without_rendering()
    canvas = figure.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    renderer = canvas.get_renderer()
    problems = []
    # Every text keeps at least half the layouts' edge margin from the figure's edge: a
    # layout that measured a text short shows here, before it clips.
    clearance = html._EDGE_IN * figure.dpi / 2
    inner = Bbox.from_extents(
        figure.bbox.x0 + clearance,
        figure.bbox.y0 + clearance,
        figure.bbox.x1 - clearance,
        figure.bbox.y1 - clearance,
    )
    for text in _texts(figure):
        box = text.get_window_extent(renderer)
        if not _inside(box, inner):
            problems.append(f"{text.get_text()[:40]!r} at {box.bounds} leaves {inner.bounds}")
    plots = figure.get_axes()
    for axes in plots:
        texts = _axis_texts(axes)
        for other in plots:
            if other is axes:
                continue
            # Neither into the other plot's frame nor into the texts around it.
            others = [other.get_window_extent(renderer)] + [
                text.get_window_extent(renderer) for text in _axis_texts(other)
            ]
            problems += [
                f"{text.get_text()[:40]!r} runs into the next plot"
                for text in texts
                if any(_overlap(text.get_window_extent(renderer), box) for box in others)
            ]
        labels = [axes.xaxis.label, axes.yaxis.label, axes.title]
        problems += [
            f"{label.get_text()[:40]!r} covers the tick label {tick.get_text()[:20]!r}"
            for label in labels
            if label.get_text().strip()
            for tick in _drawn_ticks(axes)
            if _overlap(label.get_window_extent(renderer), tick.get_window_extent(renderer))
        ]
    return problems


@pytest.mark.parametrize("seed", range(24))
def test_fixed_layouts_keep_every_text_in_its_figure_and_off_the_next_plot(seed: int) -> None:
    report = _hostile_report(seed)
    with html.plot_style():
        for name, drawing in FIXED.items():
            height = html._nodes_height(report) if name == "nodes" else 3.6
            figure = html._figure(drawing(report), height, fixed=True)
            problems = _problems(figure)
            assert not problems, f"seed {seed}, {name} plot: {problems[:5]}"


def test_plots_with_no_data_keep_their_texts_in_too() -> None:
    report = _hostile_report(0).model_copy(update={"stats": None})
    with html.plot_style():
        for name, drawing in FIXED.items():
            figure = html._figure(drawing(report), fixed=True)
            texts = [text.get_text() for axes in figure.axes for text in axes.texts]
            assert texts and set(texts) <= {"no data"}, (name, texts)
            problems = _problems(figure)
            assert not problems, f"{name} plot without data: {problems[:5]}"


def test_the_check_sees_a_clipped_text() -> None:
    """The check above can fail: a plot placed with no room for its labels is caught."""

    def cramped(figure: Figure) -> None:
        axes = figure.add_subplot()
        axes.plot([0, 1_000_000], [0, 1_000_000])
        axes.set_ylabel("items")
        axes.set_title("a title")
        figure.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=1.0)

    with html.plot_style():
        assert _problems(html._figure(cramped, fixed=True))


def test_long_node_names_are_shortened_on_the_plot_only() -> None:
    long = "n" * (html.MAX_NODE_LABEL_CHARS + 10)
    assert html._short_node(long) == "n" * (html.MAX_NODE_LABEL_CHARS - 1) + "\u2026"
    assert len(html._short_node(long)) == html.MAX_NODE_LABEL_CHARS
    exact = "x" * html.MAX_NODE_LABEL_CHARS
    assert html._short_node(exact) == exact
