"""The live dashboard page (``GET /``) of ``batchctl serve`` and ``batchctl dashboard``.

One self-contained HTML file: it loads nothing from anywhere (no CDN, no font, no image);
its style and script are inline, and whoever serves it sends
:data:`CONTENT_SECURITY_POLICY`, which allows exactly this script and style (by their
hashes) and requests to the serving origin only, so the page works offline and cannot be
made to load anything else. The script polls :data:`DATA_PATH` and redraws in place.

What the page shows is decided here, in Python, by small pure functions from a run's status
and what a viewer saw of it over time (:class:`RunHistory`) to a card's view model
(:func:`run_card`): the one word for where the run stands, the progress line and bar, the
chart's geometry with its axes, the phase timeline, the failures by class and the report
links. The script only draws that model, and it draws every value that comes from a run
(ids, messages, error examples: from manifests and videos nobody here wrote) as text,
never as HTML.

Two servers send it. ``batchctl serve`` (batchctl/local/server.py) with a key asks for the
key in the page and keeps it in the tab's sessionStorage. ``batchctl dashboard``
(batchctl/commands/dashboard.py) holds a deployed app's key on the user's side and serves
the page on loopback without any key: the page never sees one.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from batchctl.contracts import RunPhase
from batchctl.planning import format_duration
from batchctl.progressview import PHASE_LABELS, STARTING_NODES, outcome_text
from batchctl.runstatus import TERMINAL_PHASES, RunStatus, RuntimeStatus

DATA_PATH: Final = "/dashboard/data"
REFRESH_MS: Final = 1000

# Progress samples kept per run for the chart: halved (every other one) when full, so a
# page kept open beside a day-long run holds a bounded, evenly thinned history.
MAX_SAMPLES: Final = 2000
# Phase changes kept per run (a run has about ten; a bound all the same).
MAX_PHASES: Final = 64

# The chart's geometry in SVG user units: the plot area sits inside these margins, which
# hold the axes' labels.
CHART_WIDTH: Final = 560
CHART_HEIGHT: Final = 170
CHART_MARGIN_LEFT: Final = 48
CHART_MARGIN_RIGHT: Final = 12
CHART_MARGIN_TOP: Final = 8
CHART_MARGIN_BOTTOM: Final = 30
CHART_TICKS: Final = 4

# Time ticks fall on these steps (seconds), the first one that gives at most CHART_TICKS.
_TIME_STEPS: Final = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
)  # fmt: skip

# Durable's runtime status, shown beside our phase only where it says something the phase
# does not: Running and Completed say nothing more (a failed run's orchestration completes
# normally, and "failed" beside "Completed" would only contradict itself).
_RUNTIME_NOTES: Final[dict[str, str]] = {
    RuntimeStatus.PENDING.value: "queued: the orchestration has not started yet",
    RuntimeStatus.SUSPENDED.value: "suspended",
    RuntimeStatus.FAILED.value: "the orchestration crashed before it could finish the run",
    RuntimeStatus.TERMINATED.value: "terminated from outside the run",
    RuntimeStatus.CANCELED.value: "cancelled from outside the run",
}

# The timeline of a run first seen this many seconds after it started begins with a stretch
# "before this page", unless what was first seen is a run's first phase.
UNSEEN_MIN_S: Final = 1.0
UNSEEN: Final = "unseen"
UNSEEN_LABEL: Final = "before this page"
_FIRST_PHASES: Final = frozenset({"starting", RunPhase.VALIDATING.value})

Sample = tuple[float, int, int, int]
"""(seconds since the run started, succeeded, failed, not run)."""


def _count(status: Mapping[str, Any], key: str) -> int:
    try:
        return max(int(status.get(key) or 0), 0)
    except (TypeError, ValueError):
        return 0


class RunHistory:
    """What one viewer saw of a run: progress samples and when each phase was first seen.

    ``observe`` takes a status dict (the orchestrator's custom status or a
    ``RunStatus.view()``) at ``t_s`` seconds since the run started. Thread-safe: a server
    observes on one thread and draws on others.
    """

    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        self._max_samples = max_samples
        self._samples: list[Sample] = []
        self._phases: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def observe(self, t_s: float, status: Mapping[str, Any]) -> None:
        sample = (
            round(t_s, 2),
            _count(status, "succeeded"),
            _count(status, "failed"),
            _count(status, "not_run"),
        )
        phase = str(status.get("phase") or "")
        with self._lock:
            samples = self._samples
            if samples and sample[0] < samples[-1][0]:
                return  # an answer older than one already seen (out-of-order polls)
            if len(samples) >= 2 and samples[-1][1:] == samples[-2][1:] == sample[1:]:
                # No change: stretch the flat stretch to now instead of adding points.
                samples[-1] = sample
            else:
                samples.append(sample)
            if len(samples) > self._max_samples:
                # Every other one, but always the latest: the chart must reach "now".
                self._samples = [*samples[:-1:2], samples[-1]]
            if phase and (not self._phases or self._phases[-1][0] != phase):
                self._phases.append((phase, sample[0]))
                if len(self._phases) > MAX_PHASES:
                    del self._phases[1]  # keep the first: the timeline starts there

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    @property
    def phases(self) -> list[tuple[str, float]]:
        with self._lock:
            return list(self._phases)


# -- the view model: pure functions of a run's data ---------------------------------------------
@dataclass(frozen=True)
class Headline:
    """The one word for where a run stands, its style, and Durable's word where it adds one."""

    word: str
    style: str
    runtime_note: str | None


def headline(status: RunStatus) -> Headline:
    outcome = status.outcome
    finished = status.finished
    if finished:
        word = outcome_text(
            outcome,
            total=status.total,
            succeeded=status.succeeded,
            failed=status.failed,
            invalid=status.invalid,
        )
    elif outcome == RunPhase.RUNNING.value and status.done == 0 and not status.nodes_active:
        word = STARTING_NODES
    else:
        word = PHASE_LABELS.get(outcome, outcome)
    style = outcome if outcome in TERMINAL_PHASES else "active"
    if finished and outcome == RunPhase.COMPLETED.value and word != outcome:
        style = "partial"  # completed with failures, or with nothing done: not green
    note = _RUNTIME_NOTES.get(status.runtime_status)
    if status.runtime_status not in {r.value for r in RuntimeStatus}:
        note = f"Durable reports {status.runtime_status!r}"
    return Headline(word, style, f"{note} (Durable: {status.runtime_status})" if note else None)


@dataclass(frozen=True)
class Progress:
    """The progress line, the percent shown (None: no percent makes sense) and the bar's
    segments as (style, percent of the bar) pairs."""

    text: str
    percent: float | None
    segments: tuple[tuple[str, float], ...]


# A segment of one item among very many still shows (a single failure must be seen).
_MIN_SEGMENT_PERCENT: Final = 0.6


def progress(status: RunStatus) -> Progress:
    total = status.total
    invalid = f"; {status.invalid} invalid rows (not run)" if status.invalid else ""
    if total == 0:
        # Nothing to count against: "0/0 done (100%)" with a full bar would say the run did
        # its work. Say what happened instead, with an empty bar.
        if not status.finished:
            return Progress(f"counting items{invalid}", None, ())
        outcome = status.outcome
        if outcome == RunPhase.FAILED.value:
            text = "failed before any item ran"
        elif outcome == RunPhase.CANCELLED.value:
            text = "cancelled before any item ran"
        elif status.invalid:
            text = "no valid items"
        else:
            text = "the manifest had no items"
        return Progress(text + invalid, None, ())
    done = status.done
    percent = round(min(100.0 * done / total, 100.0), 1)
    parts = [f"{status.succeeded} succeeded", f"{status.failed} failed"]
    if status.not_run:
        parts.append(f"{status.not_run} not run")
    if status.remaining and not status.finished:
        parts.append(f"{status.remaining} left")
    text = f"{done}/{total} done ({percent:g}%): {', '.join(parts)}{invalid}"
    segments: list[tuple[str, float]] = []
    used = 0.0
    for style, count in (
        ("ok", status.succeeded),
        ("failed", status.failed),
        ("not-run", status.not_run),
    ):
        if count:
            width = min(max(100.0 * count / total, _MIN_SEGMENT_PERCENT), 100.0 - used)
            # Rounded down, so the segments never add up to more than the bar.
            segments.append((style, math.floor(width * 100) / 100))
            used += width
    return Progress(text, percent, tuple(segments))


def format_rate(per_second: float | None) -> str:
    if not per_second:
        return "-"
    if per_second >= 1:
        return f"{per_second:.1f} items/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:.1f} items/min"
    return f"{per_second * 3600:.1f} items/h"


def timing_text(
    rate_per_s: float | None, eta: float | None, elapsed_s: float | None, *, finished: bool
) -> str:
    elapsed = "-" if elapsed_s is None else format_duration(elapsed_s)
    if finished:
        return f"took {elapsed}" + (f"; last rate {format_rate(rate_per_s)}" if rate_per_s else "")
    remaining = "-" if eta is None else format_duration(eta)
    return f"rate {format_rate(rate_per_s)}, ETA {remaining}, elapsed {elapsed}"


def nodes_text(status: RunStatus) -> str | None:
    """The nodes working now, from the status (live for any app, before any ledger or
    report says more); None when the status does not say (an ended run has none working)."""
    if status.nodes_active is None:
        return None
    planned = f" of {status.nodes_planned} planned" if status.nodes_planned else ""
    working = "node" if status.nodes_active == 1 and not planned else "nodes"
    return f"{status.nodes_active}{planned} {working} working"


def nice_step(span: float, ticks: int = CHART_TICKS) -> float:
    """A step of 1, 2 or 5 times a power of ten giving at most ``ticks`` steps over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * magnitude >= raw:
            return float(multiple * magnitude)
    return float(10 * magnitude)  # pragma: no cover - the loop always returns


def time_step(span_s: float, ticks: int = CHART_TICKS) -> float:
    """A step of whole seconds, minutes or hours giving at most ``ticks`` steps over ``span_s``."""
    for step in _TIME_STEPS:
        if span_s / step <= ticks:
            return float(step)
    return float(math.ceil(span_s / ticks / 86400) * 86400)


def _ticks(top: float, step: float) -> list[float]:
    count = math.floor(top / step + 1e-9)
    return [round(i * step, 9) for i in range(count + 1)]


def _count_label(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def chart(samples: Sequence[Sample], total: int) -> dict[str, Any] | None:
    """The progress chart's geometry: items done (succeeded, failed) against seconds since
    the run started, with both axes' ticks and labels. None before the first sample."""
    if not samples:
        return None
    left, top = CHART_MARGIN_LEFT, CHART_MARGIN_TOP
    right = CHART_WIDTH - CHART_MARGIN_RIGHT
    bottom = CHART_HEIGHT - CHART_MARGIN_BOTTOM
    most_done = max(s[1] + s[2] + s[3] for s in samples)
    y_step = nice_step(max(total, most_done, 1))
    y_top = max(total, most_done, 1)
    t_last = max(samples[-1][0], 1.0)
    x_step = time_step(t_last)

    def x(t: float) -> float:
        return round(left + (right - left) * t / t_last, 1)

    def y(n: float) -> float:
        return round(bottom - (bottom - top) * n / y_top, 1)

    def points(values: Sequence[tuple[float, int]]) -> str:
        return " ".join(f"{x(t)},{y(n)}" for t, n in values)

    lines = [
        {"style": "ok", "label": "succeeded", "points": points([(s[0], s[1]) for s in samples])}
    ]
    if any(s[2] for s in samples):
        lines.append(
            {
                "style": "failed",
                "label": "failed",
                "points": points([(s[0], s[2]) for s in samples]),
            }
        )
    if any(s[3] for s in samples):
        lines.append(
            {
                "style": "not-run",
                "label": "not run",
                "points": points([(s[0], s[3]) for s in samples]),
            }
        )
    y_ticks = [{"at": y(v), "label": _count_label(v)} for v in _ticks(y_top, y_step)]
    x_ticks = [
        {"at": x(v), "label": "0" if v == 0 else format_duration(v)} for v in _ticks(t_last, x_step)
    ]
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "plot": {"left": left, "top": top, "right": right, "bottom": bottom},
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "x_title": "time since the run started",
        "y_title": "items",
        "total_at": y(total) if total else None,
        "lines": lines,
    }


def timeline(
    phases: Sequence[tuple[str, float]], now_s: float | None, *, finished: bool
) -> list[dict[str, Any]]:
    """The phases the run went through, each with its start, duration and share of the
    time shown. A terminal phase ends the timeline instead of being a stretch of it."""
    if not phases:
        return []
    stretches = [(p, t) for p, t in phases if p not in TERMINAL_PHASES]
    if not stretches:
        return []
    end_candidates = [t for p, t in phases if p in TERMINAL_PHASES]
    first_end = min(end_candidates) if finished and end_candidates else None
    end = first_end if first_end is not None else max(now_s or 0.0, phases[-1][1])
    start = stretches[0][1]
    segments: list[dict[str, Any]] = []
    if start >= UNSEEN_MIN_S and stretches[0][0] not in _FIRST_PHASES:
        # Opened after the run began: what came before is shown as such, not as its first
        # phase seen (a dashboard opened mid-run would otherwise say it only ever ran).
        stretches.insert(0, (UNSEEN, 0.0))
        start = 0.0
    span = max(end - start, 1e-9)
    for index, (phase, at) in enumerate(stretches):
        following = stretches[index + 1][1] if index + 1 < len(stretches) else end
        duration = max(min(following, end) - at, 0.0)
        segments.append(
            {
                "phase": phase,
                "label": UNSEEN_LABEL if phase == UNSEEN else PHASE_LABELS.get(phase, phase),
                "start_s": round(at, 2),
                "duration": format_duration(duration),
                "percent": round(100.0 * duration / span, 2),
                "current": not finished and index == len(stretches) - 1,
            }
        )
    return segments


def failures_view(
    failures: Sequence[Mapping[str, Any]], failed: int, pending_note: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """The failures-by-class rows and, while failed items have no classes to show yet (or
    more failed since the classes were read), a note saying how many and where their classes
    will come from."""
    rows = [
        {
            "error_class": str(f.get("error_class") or "?"),
            "count": _count(f, "count"),
            "examples": [
                {"item_id": str(e.get("item_id") or ""), "message": str(e.get("message") or "")}
                for e in (f.get("examples") or [])
                if isinstance(e, Mapping)
            ],
        }
        for f in failures
        if isinstance(f, Mapping)
    ]
    pending = pending_note or "their classes are not known here"
    counted = sum(_count(f, "count") for f in failures if isinstance(f, Mapping))
    if counted >= failed:
        return rows, None
    if rows:
        # The classes were read a while ago (a ledger is read now and then): say so.
        return rows, f"{failed - counted} more failed since these were read; {pending}"
    return rows, f"{_plural(failed, 'item')} failed; {pending}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _per_hour(node: Mapping[str, Any]) -> str:
    value = node.get("items_per_hour")
    return "-" if value is None else f"{float(value):.0f}"


def _local_link(href: Any) -> str | None:
    """A link the page may show: a path on the serving origin only (never a `javascript:`
    or another site's URL, whatever the data says)."""
    if isinstance(href, str) and href.startswith("/") and not href.startswith("//"):
        return href
    return None


def run_card(data: Mapping[str, Any]) -> dict[str, Any]:
    """A run's card as the page draws it, from its data: ``status`` (a ``RunStatus.view()``),
    ``samples`` and ``phases`` (a :class:`RunHistory`'s), ``elapsed_s``, ``rate_per_s``,
    ``eta_s``, ``nodes`` and ``failures`` (``NodeThroughput`` / ``FailureClass`` dumps),
    ``failures_note`` (where failure classes come from while there are none), and the
    report's ``report_html`` / ``report_json`` links or a ``report_note``."""
    status = RunStatus.model_validate(data["status"])
    samples: list[Sample] = [
        (float(s[0]), int(s[1]), int(s[2]), int(s[3])) for s in data.get("samples") or []
    ]
    phases = [(str(p), float(t)) for p, t in data.get("phases") or []]
    finished = status.finished
    head = headline(status)
    shown = progress(status)
    failures, failures_note = failures_view(
        data.get("failures") or [], status.failed, data.get("failures_note")
    )
    report_html = _local_link(data.get("report_html"))
    report_json = _local_link(data.get("report_json"))
    has_report = bool(report_html or report_json)
    elapsed = data.get("elapsed_s")
    return {
        "run_id": status.run_id,
        "phase": status.outcome,
        "finished": finished,
        "done": status.done,
        "total": status.total,
        "headline": head.word,
        "headline_style": head.style,
        "runtime_note": head.runtime_note,
        "progress": shown.text,
        "percent": shown.percent,
        "bar": [{"style": style, "percent": width} for style, width in shown.segments],
        "timing": timing_text(
            data.get("rate_per_s"), data.get("eta_s"), elapsed, finished=finished
        ),
        "nodes_working": nodes_text(status),
        "message": status.message,
        "chart": chart(samples, status.total),
        "timeline": timeline(phases, elapsed, finished=finished),
        "nodes": [
            [str(n.get("node") or "?"), _count(n, "succeeded"), _count(n, "failed"), _per_hour(n)]
            for n in data.get("nodes") or []
            if isinstance(n, Mapping)
        ],
        "failures": failures,
        "failures_note": failures_note,
        "report": {"html": report_html, "json": report_json} if has_report else None,
        "report_note": None if has_report else data.get("report_note"),
    }


def page_title(cards: Sequence[Mapping[str, Any]]) -> str:
    """The tab's title, so a page kept open in a background tab still says how far along
    the newest live run is."""
    live = [c for c in cards if not c["finished"]]
    if not live:
        if not cards:
            return "batchctl: no runs"
        return f"batchctl: {_plural(len(cards), 'run')}, none live"
    first = live[0]
    percent = "" if first["percent"] is None else f"{first['percent']:g}% "
    more = f" (+{len(live) - 1} live)" if len(live) > 1 else ""
    return f"{percent}{first['headline']}: {first['run_id']}{more}"


NO_RUNS: Final = "No runs yet: upload a manifest to the manifests container, or POST /api/runs."


def page_data(
    runs: Sequence[Mapping[str, Any]],
    *,
    source: str,
    problem: str | None = None,
    empty: str = NO_RUNS,
) -> dict[str, Any]:
    """The body of :data:`DATA_PATH`: every run's card, the tab title, where the data comes
    from, when the last look failed why, and what to say when there is no run."""
    cards = [run_card(run) for run in runs]
    return {
        "runs": cards,
        "title": page_title(cards),
        "source": source,
        "problem": problem,
        "empty": empty,
    }


_SCRIPT = r"""
"use strict";
const DATA_PATH = "__DATA_PATH__";
const REFRESH_MS = __REFRESH_MS__;
const KEY_NAME = "batchctl-function-key";
const SVG_NS = "http://www.w3.org/2000/svg";

// Every value from a run becomes a text node or an attribute value, never markup.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function chart(model) {
  const p = model.plot;
  const svg = svgEl("svg", {class: "chart", viewBox: `0 0 ${model.width} ${model.height}`,
                            width: model.width, height: model.height, role: "img",
                            "aria-label": "items done over time"});
  svg.append(svgEl("rect", {x: p.left, y: p.top, width: p.right - p.left,
                            height: p.bottom - p.top, class: "chart-bg"}));
  for (const tick of model.y_ticks) {
    svg.append(svgEl("line", {x1: p.left, x2: p.right, y1: tick.at, y2: tick.at, class: "grid"}));
    svg.append(svgEl("text", {x: p.left - 6, y: tick.at + 4, class: "tick y-tick"}, tick.label));
  }
  for (const tick of model.x_ticks) {
    svg.append(svgEl("line", {x1: tick.at, x2: tick.at, y1: p.bottom, y2: p.bottom + 4,
                              class: "axis"}));
    svg.append(svgEl("text", {x: tick.at, y: p.bottom + 15, class: "tick x-tick"}, tick.label));
  }
  svg.append(svgEl("line", {x1: p.left, x2: p.right, y1: p.bottom, y2: p.bottom, class: "axis"}));
  svg.append(svgEl("line", {x1: p.left, x2: p.left, y1: p.top, y2: p.bottom, class: "axis"}));
  if (model.total_at !== null) {
    svg.append(svgEl("line", {x1: p.left, x2: p.right, y1: model.total_at, y2: model.total_at,
                              class: "total-line"}));
  }
  svg.append(svgEl("text", {x: (p.left + p.right) / 2, y: model.height - 2,
                            class: "axis-title"}, model.x_title));
  svg.append(svgEl("text", {x: 10, y: (p.top + p.bottom) / 2, class: "axis-title",
                            transform: `rotate(-90 10 ${(p.top + p.bottom) / 2})`}, model.y_title));
  model.lines.forEach((line, index) => {
    const poly = svgEl("polyline", {points: line.points, class: "line-" + line.style});
    poly.append(svgEl("title", {}, line.label));
    svg.append(poly);
    const y = p.top + 12 + 13 * index;
    svg.append(svgEl("line", {x1: p.left + 8, x2: p.left + 22, y1: y - 4, y2: y - 4,
                              class: "line-" + line.style}));
    svg.append(svgEl("text", {x: p.left + 26, y, class: "legend"}, line.label));
  });
  return svg;
}

function table(headers, rows, cls) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
  const body = rows.map((row) => el("tr", {}, ...row.map((cell) => el("td", {}, cell))));
  return el("table", {class: cls}, el("thead", {}, head), el("tbody", {}, ...body));
}

function timeline(segments) {
  const row = el("div", {class: "timeline", role: "list"});
  for (const s of segments) {
    const part = el("div", {class: "stage stage-" + s.phase + (s.current ? " current" : ""),
                            role: "listitem", title: `${s.label}: ${s.duration}`},
                    el("span", {}, `${s.label} ${s.duration}`));
    part.style.flexGrow = String(Math.max(s.percent, 0.01));
    row.append(part);
  }
  return row;
}

function runCard(run) {
  const card = el("section", {class: "run", "data-run-id": run.run_id, "data-phase": run.phase,
                              "data-done": run.done, "data-total": run.total});
  card.append(el("h2", {}, el("span", {class: "run-id"}, run.run_id), " ",
                 el("span", {class: "phase phase-" + run.headline_style}, run.headline)));
  if (run.runtime_note) card.append(el("p", {class: "runtime"}, run.runtime_note));
  const bar = el("div", {class: "bar" + (run.percent === null ? " bar-empty" : "")});
  for (const segment of run.bar) {
    const fill = el("div", {class: "bar-fill bar-" + segment.style});
    fill.style.width = segment.percent + "%";
    bar.append(fill);
  }
  card.append(bar);
  card.append(el("p", {class: "progress"}, run.progress));
  card.append(el("p", {class: "rate"}, run.timing));
  if (run.nodes_working) card.append(el("p", {class: "nodes-working"}, run.nodes_working));
  if (run.message) card.append(el("p", {class: "message"}, run.message));
  if (run.timeline.length) {
    card.append(el("h3", {}, "Phases"));
    card.append(timeline(run.timeline));
  }
  if (run.chart) {
    card.append(el("h3", {}, "Items done over time"));
    card.append(chart(run.chart));
  }
  if (run.nodes.length) {
    card.append(el("h3", {}, "Per node"));
    card.append(table(["node", "succeeded", "failed", "items/hour"], run.nodes, "nodes"));
  }
  if (run.failures.length || run.failures_note) {
    card.append(el("h3", {}, "Failures by class"));
    if (run.failures_note) card.append(el("p", {class: "message"}, run.failures_note));
    const list = el("ul", {class: "failures"});
    for (const f of run.failures) {
      const examples = el("ul", {});
      for (const e of f.examples) {
        examples.append(el("li", {}, el("code", {}, e.item_id), ": ", e.message));
      }
      list.append(el("li", {}, el("strong", {}, f.error_class), ` ${f.count} items`, examples));
    }
    card.append(list);
  }
  if (run.report) {
    const links = el("p", {});
    if (run.report.html) links.append(el("a", {href: run.report.html, class: "report"}, "report"));
    if (run.report.html && run.report.json) links.append(" ");
    if (run.report.json) links.append(el("a", {href: run.report.json}, "report.json"));
    card.append(links);
  } else if (run.report_note) {
    card.append(el("p", {class: "message"}, run.report_note));
  }
  return card;
}

let lastAnswer = null;

async function refresh() {
  const headers = {"Accept": "application/json"};
  const key = sessionStorage.getItem(KEY_NAME);
  if (key) headers["x-functions-key"] = key;
  const state = document.getElementById("state");
  try {
    const answer = await fetch(DATA_PATH, {headers, cache: "no-store"});
    if (answer.status === 401 || answer.status === 403) {
      document.getElementById("key-form").hidden = false;
      state.textContent = "this server needs its function key";
      return;
    }
    const data = await answer.json();
    const runs = document.getElementById("runs");
    runs.replaceChildren(...data.runs.map(runCard));
    if (!data.runs.length) runs.append(el("p", {class: "empty"}, data.empty));
    document.title = data.title;
    lastAnswer = new Date();
    const problem = data.problem ? `; last look failed: ${data.problem}` : "";
    const count = data.runs.length === 1 ? "1 run" : `${data.runs.length} runs`;
    state.textContent = `${data.source}: ${count}; `
      + `updated ${lastAnswer.toLocaleTimeString()}${problem}`;
    state.className = data.problem ? "stale" : "";
    const updates = Number(document.body.dataset.updates || 0) + 1;
    document.body.setAttribute("data-updates", String(updates));
  } catch (error) {
    const since = lastAnswer ? ` (last answer ${lastAnswer.toLocaleTimeString()})` : "";
    state.textContent = `dashboard server unreachable${since}: ${error}`;
    state.className = "stale";
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_NAME, document.getElementById("key").value);
  document.getElementById("key-form").hidden = true;
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
"""

SCRIPT = _SCRIPT.replace("__DATA_PATH__", DATA_PATH).replace("__REFRESH_MS__", str(REFRESH_MS))

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; background: #fafbfc; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
#state { color: #5b6575; margin: 0 0 1em; } #state.stale { color: #a4262c; }
.run { background: #fff; border: 1px solid #d8dde5; border-radius: 6px; padding: .8em 1em;
       margin: 0 0 1em; max-width: 52em; }
.run h2 { font-size: 1.1em; margin: 0 0 .4em; } .run h3 { font-size: .95em; margin: .8em 0 .3em; }
.run-id { font-family: ui-monospace, monospace; }
.phase { padding: .1em .5em; border-radius: 4px; background: #d8e8fb; margin-left: .3em; }
.phase-completed { background: #d6f2dc; } .phase-failed { background: #f8d7da; }
.phase-cancelled, .phase-partial { background: #fbe8c8; }
.runtime { color: #5b6575; margin: 0 0 .4em; font-size: .9em; }
.bar { height: 12px; background: #e7ecf3; border-radius: 6px; overflow: hidden; display: flex; }
.bar-empty { background: repeating-linear-gradient(45deg, #eef1f5 0 6px, #e2e6ec 6px 12px); }
.bar-fill { height: 100%; } .bar-ok { background: #2f80ed; } .bar-failed { background: #d0343f; }
.bar-not-run { background: #e0a526; }
.timeline { display: flex; gap: 2px; max-width: 560px; }
.stage { min-width: 4.5em; background: #e7ecf3; border-radius: 3px; padding: .15em .4em;
         font-size: .85em; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.stage-running { background: #d8e8fb; } .stage-unseen { background: none; color: #8a94a3; }
.stage.current { outline: 2px solid #2f80ed; }
.chart-bg { fill: #f6f8fa; } .chart { display: block; margin: .3em 0; }
.grid { stroke: #e1e5eb; stroke-width: 1; } .axis { stroke: #8a94a3; stroke-width: 1; }
.total-line { stroke: #8a94a3; stroke-dasharray: 4 3; }
.tick { font-size: 10px; fill: #5b6575; } .y-tick { text-anchor: end; }
.x-tick { text-anchor: middle; }
.legend { font-size: 10px; fill: #1d2430; }
.axis-title { font-size: 10px; fill: #5b6575; text-anchor: middle; }
.line-ok { fill: none; stroke: #1e9e4a; stroke-width: 2; }
.line-failed { fill: none; stroke: #d0343f; stroke-width: 2; }
.line-not-run { fill: none; stroke: #e0a526; stroke-width: 2; }
table { border-collapse: collapse; } th, td { padding: .15em .8em .15em 0; text-align: left; }
.message { color: #5b6575; } .failures li { margin: .2em 0; } code { font-size: .95em; }
"""


def page(title: str = "batchctl runs") -> str:
    """The page, headed ``title`` (escaped: it may name an app's host)."""
    heading = html_text(title)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading}</title>
<style>{_STYLE}</style>
</head>
<body data-updates="0">
<h1>{heading}</h1>
<p id="state">loading</p>
<form id="key-form" hidden>
<label>function key <input id="key" type="password" autocomplete="off"></label>
<button type="submit">use</button>
</form>
<div id="runs"></div>
<script>{SCRIPT}</script>
</body>
</html>
"""


def html_text(text: str) -> str:
    """``text`` safe between HTML tags."""
    return html.escape(text, quote=True)


PAGE = page()


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


# Only this page's own script and style run, and it may talk only to the server that sent it.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self' data:; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
