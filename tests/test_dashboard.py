"""The dashboard page's pure parts (status -> view model), and the page itself drawing
hostile run data in headless Chromium.

The view model is what the page shows: one word for where a run stands, the progress line
and bar, the chart's axes, the phase timeline, the failures panel, the report links. The
randomized tests draw statuses the way the four doors produce them (``run_status`` over every
runtime status and phase) from a fixed seed.
"""

from __future__ import annotations

import http.server
import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batchctl import dashboard
from batchctl.commands import dashboard as dashboard_command
from batchctl.commands.dashboard import DeployedRuns, report_tables, seconds_since_start
from batchctl.contracts import ItemError, ItemResult, ItemStatus, RunPhase
from batchctl.dashboard import (
    CHART_TICKS,
    RunHistory,
    chart,
    failures_view,
    headline,
    nice_step,
    page_title,
    progress,
    run_card,
    time_step,
    timeline,
)
from batchctl.runstatus import RunStatus, RuntimeStatus, run_status
from tests.test_serve import chromium
from tests.test_serve import run_card as dom_card

PHASES = [p.value for p in RunPhase]
RUNTIMES = [r.value for r in RuntimeStatus]


def status(runtime: str, **custom: Any) -> RunStatus:
    return run_status("r", runtime, custom)


# -- the one word --------------------------------------------------------------------------------
def test_a_failed_run_shows_failed_and_not_durables_completed() -> None:
    shown = headline(status("Completed", phase="failed", total=10, failed=10))
    assert (shown.word, shown.style, shown.runtime_note) == ("failed", "failed", None)


def test_durables_word_shows_only_where_it_adds_something() -> None:
    crashed = headline(status("Failed", phase="running", total=5, succeeded=2))
    assert crashed.word == "failed"
    assert crashed.runtime_note is not None and "crashed" in crashed.runtime_note
    assert "(Durable: Failed)" in crashed.runtime_note
    terminated = headline(status("Terminated", phase="running", total=5))
    assert terminated.word == "cancelled" and "terminated" in str(terminated.runtime_note)
    assert headline(status("Pending")).runtime_note is not None
    for quiet in ("Running", "Completed", "ContinuedAsNew"):
        assert headline(status(quiet, phase="running", total=3)).runtime_note is None


def test_a_completed_run_with_failures_is_not_green() -> None:
    shown = headline(status("Completed", phase="completed", total=4, succeeded=3, failed=1))
    assert (shown.word, shown.style) == ("completed with failures", "partial")
    clean = headline(status("Completed", phase="completed", total=4, succeeded=4))
    assert (clean.word, clean.style) == ("completed", "completed")


def test_a_running_run_with_nothing_done_is_starting_nodes() -> None:
    assert headline(status("Running", phase="running", total=9)).word == "starting nodes"
    working = status("Running", phase="running", total=9, nodes_active=2)
    assert headline(working).word == "running"


# -- progress ------------------------------------------------------------------------------------
def test_a_run_that_failed_before_any_item_is_not_100_percent_done() -> None:
    shown = progress(status("Completed", phase="failed", total=0, message="no manifest"))
    assert shown.text == "failed before any item ran"
    assert (shown.percent, shown.segments) == (None, ())
    card = run_card({"status": status("Completed", phase="failed").view()})
    assert "0/0" not in card["progress"] and card["bar"] == [] and card["percent"] is None


def test_runs_without_items_say_why() -> None:
    assert progress(status("Completed", phase="completed", invalid=3)).text == (
        "no valid items; 3 invalid rows (not run)"
    )
    assert progress(status("Completed", phase="completed")).text == "the manifest had no items"
    assert progress(status("Terminated")).text == "cancelled before any item ran"
    assert progress(status("Running", phase="validating")).text == "counting items"


def random_status(rng: random.Random) -> RunStatus:
    total = rng.choice([0, 0, 1, 7, 100, 12345])
    succeeded = rng.randint(0, total)
    failed = rng.randint(0, total - succeeded)
    not_run = rng.randint(0, total - succeeded - failed)
    return run_status(
        rng.choice(["a", "run-1", "x" * 60]),
        rng.choice([*RUNTIMES, "SomethingNew"]),
        {
            "phase": rng.choice([*PHASES, "starting", None]),
            "total": total,
            "succeeded": succeeded,
            "failed": failed,
            "not_run": not_run,
            "invalid": rng.choice([0, 0, 2]),
            "nodes_active": rng.choice([None, 0, 3]),
        },
    )


def test_progress_over_random_statuses() -> None:
    rng = random.Random(26)
    for _ in range(2000):
        shown = status_ = random_status(rng)
        view = progress(status_)
        assert "0/0" not in view.text
        assert (view.percent is None) == (shown.total == 0)
        widths = [width for _, width in view.segments]
        assert sum(widths) <= 100.0 + 1e-6 and all(width > 0 for width in widths)
        # Every nonzero count has its segment, however small its share (one failure shows).
        expected = [n for n in (shown.succeeded, shown.failed, shown.not_run) if n]
        assert len(view.segments) == (len(expected) if shown.total else 0)
        word = headline(status_).word
        assert word and "Completed" not in word and "Failed" not in word
        json.dumps(run_card({"status": status_.view()}))  # the page's data is plain JSON


def test_the_nodes_working_show_live_from_the_status() -> None:
    working = status("Running", phase="running", total=9, nodes_active=3, nodes_planned=5)
    assert run_card({"status": working.view()})["nodes_working"] == "3 of 5 planned nodes working"
    one = status("Running", phase="running", total=9, nodes_active=1)
    assert run_card({"status": one.view()})["nodes_working"] == "1 node working"
    ended = status("Completed", phase="completed", total=9, succeeded=9, nodes_active=3)
    assert run_card({"status": ended.view()})["nodes_working"] is None


# -- the chart's axes ----------------------------------------------------------------------------
def test_tick_steps_give_at_most_the_promised_ticks() -> None:
    rng = random.Random(7)
    for _ in range(1000):
        span = rng.choice([rng.uniform(0.5, 100), rng.uniform(100, 1e6), rng.uniform(1, 4e5)])
        assert 1 <= span / nice_step(span) <= CHART_TICKS + 1e-9 or span < 1
        assert span / time_step(span) <= CHART_TICKS + 1e-9
    assert nice_step(80) == 20.0 and nice_step(10) == 5.0 and time_step(600) == 300.0


def test_the_chart_has_axes_with_labels_and_stays_inside_its_plot() -> None:
    rng = random.Random(11)
    for _ in range(200):
        total = rng.choice([1, 60, 5000, 250_000])
        t, done, samples = 0.0, 0, []
        for _ in range(rng.randint(1, 300)):
            t += rng.uniform(0.1, 120)
            done = min(total, done + rng.randint(0, max(total // 50, 1)))
            failed = rng.randint(0, done)
            samples.append((round(t, 2), done - failed, failed, 0))
        model = chart(samples, total)
        assert model is not None
        plot = model["plot"]
        assert model["x_title"] and model["y_title"]
        assert 2 <= len(model["y_ticks"]) <= CHART_TICKS + 1
        assert 1 <= len(model["x_ticks"]) <= CHART_TICKS + 1
        assert model["y_ticks"][0]["label"] == "0" and model["x_ticks"][0]["label"] == "0"
        for tick in model["y_ticks"]:
            assert plot["top"] <= tick["at"] <= plot["bottom"]
        for tick in model["x_ticks"]:
            assert plot["left"] <= tick["at"] <= plot["right"]
        for line in model["lines"]:
            for point in line["points"].split():
                x, y = map(float, point.split(","))
                assert plot["left"] <= x <= plot["right"] and plot["top"] <= y <= plot["bottom"]
    assert chart([], 10) is None


# -- the phase timeline --------------------------------------------------------------------------
def test_the_timeline_shows_each_phase_live_and_ends_at_the_outcome() -> None:
    phases = [("validating", 0.0), ("enqueuing", 2.0), ("running", 5.0)]
    live = timeline(phases, 15.0, finished=False)
    assert [s["label"] for s in live] == ["validating", "enqueuing", "running"]
    assert [s["duration"] for s in live] == ["2s", "3s", "10s"]
    assert sum(s["percent"] for s in live) == pytest.approx(100.0, abs=0.05)
    assert [s["current"] for s in live] == [False, False, True]
    ended = timeline([*phases, ("merging", 20.0), ("failed", 21.0)], 40.0, finished=True)
    assert ended[-1]["label"] == "merging" and ended[-1]["duration"] == "1s"
    assert not any(s["current"] for s in ended)


def test_a_page_opened_mid_run_says_it_did_not_see_the_start() -> None:
    segments = timeline([("running", 300.0)], 360.0, finished=False)
    assert [s["label"] for s in segments] == ["before this page", "running"]
    assert segments[1]["duration"] == "1m"
    assert timeline([("completed", 9.0)], 9.0, finished=True) == []


# -- the history a viewer keeps ------------------------------------------------------------------
def test_history_stretches_flat_runs_thins_when_full_and_keeps_the_latest() -> None:
    history = RunHistory(max_samples=50)
    rng = random.Random(3)
    done = 0
    for step in range(1000):
        done += rng.choice([0, 0, 1, 5])
        history.observe(step * 1.5, {"phase": "running", "succeeded": done})
    samples = history.samples
    assert len(samples) <= 50
    assert samples[-1] == (999 * 1.5, done, 0, 0)  # the chart reaches "now"
    assert [s[0] for s in samples] == sorted(s[0] for s in samples)
    history.observe(10.0, {"phase": "merging", "succeeded": 1})  # older than what was seen
    assert history.samples[-1][1] == done and history.phases == [("running", 0.0)]


def test_history_records_a_phase_once_when_it_changes() -> None:
    history = RunHistory()
    for t, phase in enumerate(["validating", "validating", "running", "running", "merging"]):
        history.observe(float(t), {"phase": phase})
    assert history.phases == [("validating", 0.0), ("running", 2.0), ("merging", 4.0)]


# -- failures, links, title ----------------------------------------------------------------------
def test_failures_show_live_as_a_count_until_their_classes_are_known() -> None:
    rows, note = failures_view([], 3, "classes come later")
    assert rows == [] and note == "3 items failed; classes come later"
    rows, note = failures_view(
        [
            {
                "error_class": "Undecodable",
                "count": 3,
                "examples": [{"item_id": "a", "message": "m"}],
            }
        ],
        3,
        "unused",
    )
    assert note is None and rows[0]["examples"] == [{"item_id": "a", "message": "m"}]
    assert failures_view([], 0, None) == ([], None)
    stale = [{"error_class": "Timeout", "count": 2, "examples": []}]
    assert failures_view(stale, 5, "later")[1] == "3 more failed since these were read; later"


def test_report_links_are_only_paths_on_the_serving_origin() -> None:
    base = {"status": status("Completed", phase="completed", total=1, succeeded=1).view()}
    for href in ("javascript:alert(1)", "//evil.example/x", "https://evil.example/r.html", 3):
        card = run_card({**base, "report_html": href, "report_note": "not here"})
        assert card["report"] is None and card["report_note"] == "not here"
    card = run_card({**base, "report_html": "/runs/r/report.html", "report_json": "/runs/r/j"})
    assert card["report"] == {"html": "/runs/r/report.html", "json": "/runs/r/j"}


def test_the_tab_title_names_the_newest_live_run() -> None:
    live = run_card({"status": status("Running", phase="running", total=4, succeeded=1).view()})
    done = run_card({"status": status("Completed", phase="completed", total=1, succeeded=1).view()})
    assert page_title([live, done]) == "25% running: r"
    assert page_title([done]) == "batchctl: 1 run, none live"
    assert page_title([]) == "batchctl: no runs"


# -- the deployed dashboard's bookkeeping (its HTTP side: tests/test_dashboard_deployed.py) ------
class FakeClient:
    """The AppClient surface DeployedRuns uses (the real one is exercised end to end)."""

    app_url = "https://app.example.net"

    def __init__(self) -> None:
        self.statuses: list[RunStatus] = []

    def list_runs(self, days: int, limit: int) -> list[RunStatus]:
        return self.statuses[:limit]

    def get_status(self, run_id: str) -> RunStatus:
        return next(s for s in self.statuses if s.run_id == run_id)


def test_deployed_runs_draw_from_the_runs_own_start_and_read_the_report_once(
    tmp_path: Path,
) -> None:
    started = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    now = [started + timedelta(minutes=10)]
    downloads: list[str] = []

    def download(link: str, run_id: str, target: Path) -> tuple[Path, Path | None]:
        downloads.append(link)
        if len(downloads) == 1:
            from batchctl.client import AppError

            raise AppError("no role on the container")
        example = {"item_id": "b", "message": "<b>x"}
        failure = {"error_class": "Undecodable", "count": 1, "examples": [example]}
        node = {"node": "n1", "succeeded": 3, "failed": 1}
        report = {"stats": {"nodes": [node], "failures": [failure]}}
        (target / "report.json").write_text(json.dumps(report))
        return target / "report.json", None

    client = FakeClient()
    clock = [0.0]
    runs = DeployedRuns(
        client,  # type: ignore[arg-type]
        [],
        days=1,
        limit=5,
        reports_dir=tmp_path,
        download=download,
        ledger_failures=None,
        clock=lambda: clock[0],
        wall_clock=lambda: now[0],
    )
    custom = {"phase": "running", "total": 4, "succeeded": 2, "started_at": started.isoformat()}
    client.statuses = [run_status("r", "Running", custom)]
    runs.look()
    card = runs.page_data()["runs"][0]
    assert card["timeline"][0]["label"] == "before this page"  # opened 10 min into the run
    assert card["chart"]["x_ticks"][-1]["label"] in {"10m", "7m30s", "5m"}
    assert card["failures_note"] is None and card["report"] is None

    ended = {**custom, "phase": "completed", "succeeded": 3, "failed": 1,
             "updated_at": (started + timedelta(minutes=11)).isoformat()}  # fmt: skip
    client.statuses = [run_status("r", "Completed", ended, report="https://acct/runs/r/x")]
    now[0] += timedelta(minutes=5)
    runs.look()
    card = runs.page_data()["runs"][0]
    assert "could not be read from here: no role on the container" in card["report_note"]
    runs.look()  # too soon to try again
    assert len(downloads) == 1
    clock[0] += 61
    runs.look()
    card = runs.page_data()["runs"][0]
    assert len(downloads) == 2 and card["nodes"] == [["n1", 3, 1, "-"]]
    assert card["failures"][0]["examples"] == [{"item_id": "b", "message": "<b>x"}]
    assert card["report"] == {"html": None, "json": "/runs/r/report.json"}
    assert card["timing"].startswith("took 11m")
    runs.look()
    assert len(downloads) == 2  # read once


def test_the_apps_failure_is_shown_and_the_last_data_stays() -> None:
    from batchctl.client import UnavailableError

    class Down(FakeClient):
        def list_runs(self, days: int, limit: int) -> list[RunStatus]:
            raise UnavailableError("cannot reach the app at https://app.example.net: refused")

    client = Down()
    runs = DeployedRuns(
        client,  # type: ignore[arg-type]
        [],
        days=1,
        limit=5,
        reports_dir=Path("/nonexistent"),
        ledger_failures=None,
    )
    runs.record([run_status("r", "Running", {"phase": "running", "total": 2})])
    runs.look()
    data = runs.page_data()
    assert [c["run_id"] for c in data["runs"]] == ["r"] and "refused" in data["problem"]
    runs.record([])
    assert runs.page_data()["empty"].startswith("No runs created in the last 1 day (--days)")


def failed(item_id: str, error_class: str, message: str) -> ItemResult:
    error = ItemError(error_class=error_class, message=message, permanent=True, attempts=1)
    return ItemResult(run_id="r", item_id=item_id, status=ItemStatus.FAILED, error=error)


def test_live_failure_classes_come_from_the_ledger_when_it_may_be_read(tmp_path: Path) -> None:
    records = [failed("a", "Undecodable", "a is not a video")]
    reads: list[int] = []
    refuse = [False]

    def ledger_failures(run_id: str, limit: int) -> list[ItemResult]:
        reads.append(limit)
        if refuse[0]:
            raise PermissionError("403 This request is not authorized\nmore lines")
        return list(records)

    clock = [0.0]
    client = FakeClient()
    runs = DeployedRuns(
        client,  # type: ignore[arg-type]
        [],
        days=1,
        limit=5,
        reports_dir=tmp_path,
        ledger_failures=ledger_failures,
        clock=lambda: clock[0],
    )

    def look(failed_count: int) -> dict[str, Any]:
        custom = {"phase": "running", "total": 50, "succeeded": 5, "failed": failed_count}
        client.statuses = [run_status("r", "Running", custom)]
        runs.look()
        return dict(runs.page_data()["runs"][0])

    assert look(0)["failures"] == [] and reads == []  # nothing failed: nothing read
    card = look(1)
    assert card["failures"][0]["error_class"] == "Undecodable" and card["failures_note"] is None
    assert card["failures"][0]["examples"] == [{"item_id": "a", "message": "a is not a video"}]
    records.extend(failed(f"t{i}", "Timeout", "took too long") for i in range(3))
    clock[0] += 1
    assert len(look(4)["failures"]) == 1 and len(reads) == 1  # not before LEDGER_REFRESH_S
    clock[0] += dashboard_command.LEDGER_REFRESH_S
    counts = {f["error_class"]: f["count"] for f in look(4)["failures"]}
    assert counts == {"Undecodable": 1, "Timeout": 3} and len(reads) == 2
    clock[0] += dashboard_command.LEDGER_REFRESH_S
    look(4)
    assert len(reads) == 2  # the failed count did not move: no read

    refuse[0] = True
    clock[0] += dashboard_command.LEDGER_REFRESH_S
    card = look(5)
    assert card["failures_note"].startswith("1 more failed since these were read; ")
    assert "403 This request is not authorized" in card["failures_note"]
    assert "Storage Table Data Reader" in card["failures_note"] and "more lines" not in str(card)
    clock[0] += dashboard_command.LEDGER_REFRESH_S
    look(6)
    assert len(reads) == 3  # after a refusal, not again before LEDGER_RETRY_S


def test_the_table_endpoint_follows_the_blob_endpoints_account() -> None:
    table_url_for = dashboard_command.table_url_for
    assert table_url_for("https://acct.blob.core.windows.net") == (
        "https://acct.table.core.windows.net"
    )
    assert table_url_for("https://acct.blob.core.chinacloudapi.cn/") == (
        "https://acct.table.core.chinacloudapi.cn"
    )
    assert table_url_for("http://127.0.0.1:10000/devstoreaccount1") is None


def test_seconds_since_start_and_report_tables() -> None:
    started = datetime(2026, 1, 1, tzinfo=UTC)
    live = run_status("r", "Running", {"started_at": started.isoformat()})
    assert seconds_since_start(live, started + timedelta(seconds=90), 5.0) == 90.0
    assert seconds_since_start(run_status("r", "Running", {}), started, 5.0) == 5.0
    assert report_tables({"stats": None}) == ([], [])
    assert report_tables([]) == ([], [])


# -- hostile run data in a real browser ----------------------------------------------------------
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"></script><b id=injected>bold</b>"


def hostile_data() -> dict[str, Any]:
    run = {
        "status": run_status(
            "hostile",
            "Running",
            {
                "phase": "running",
                "total": 9,
                "succeeded": 3,
                "failed": 2,
                "message": HOSTILE,
            },
        ).view(),
        "samples": [(0.0, 0, 0, 0), (5.0, 3, 2, 0)],
        "phases": [(HOSTILE, 0.0), ("running", 1.0)],
        "nodes": [{"node": HOSTILE, "succeeded": 3, "failed": 2, "items_per_hour": 40.0}],
        "failures": [
            {
                "error_class": HOSTILE,
                "count": 2,
                "examples": [{"item_id": HOSTILE, "message": HOSTILE}],
            }
        ],
        "report_html": "javascript:document.title='pwned'",
        "report_note": HOSTILE,
    }
    return dashboard.page_data([run], source=HOSTILE)


@pytest.fixture
def page_server() -> Iterator[str]:
    body = json.dumps(hostile_data()).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == dashboard.DATA_PATH:
                payload, kind, extra = body, "application/json", {}
            else:
                payload, kind = dashboard.page(HOSTILE).encode(), "text/html"
                extra = {"Content-Security-Policy": dashboard.CONTENT_SECURITY_POLICY}
            self.send_response(200)
            self.send_header("Content-Type", kind)
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_hostile_run_data_is_drawn_as_text_in_chromium(page_server: str, tmp_path: Path) -> None:
    dom = chromium(page_server, tmp_path / "profile", "--dump-dom")
    card = dom_card(dom, "hostile")
    # Drawn: the text arrived (the page did run and draw the card) ...
    assert card["text"].count("onerror=") >= 5, card["text"]
    assert "5/9 done" in card["text"]
    assert "<title>55.6% running: hostile</title>" in dom  # set by the script, as text
    # ... and none of it became markup: no element it names exists, no handler ran.
    assert "<img" not in dom and 'id="injected"' not in dom and "<b id" not in dom
    assert "javascript:" not in dom
