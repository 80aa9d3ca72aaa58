"""The run report: the pure analysis, report.html (checked in a real headless Chromium), and
write_report against Azurite."""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchctl import controller
from batchctl.contracts import (
    ClusterPlan,
    ErrorBudget,
    ItemError,
    ItemResult,
    ItemStatus,
    ManifestSummary,
    PlannedNode,
    RunOptions,
    RunPhase,
    RunPlan,
    RunReport,
    RunRequest,
    RunState,
    StageTimings,
)
from batchctl.local.azurite import Azurite
from batchctl.local.session import run_locally
from batchctl.reporting.analysis import (
    MAX_EXAMPLES_PER_CLASS,
    MAX_TIMELINE_BINS,
    Reservoir,
    RunAnalysis,
    Timeline,
    analyze,
    idle_fraction,
    live_tables,
    node_of,
    quantile,
)
from batchctl.reporting.html import LOCAL_PLOT_COUNT, PLOT_COUNT, render_report_html
from batchctl.services import Services
from batchctl.storage import BlobStore, Ledger
from tests import worker_tasks

START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
IMG_PREFIX = '<img src="data:image/png;base64,'
NASTY = "<script>alert(\"x\")</script> & 'quoted' <b>bold</b>"


def _plan(nodes: int = 4, *, price: float | None = None, est_cost: float = 1.0) -> RunPlan:
    return RunPlan(
        run_id="r1",
        clusters=[
            ClusterPlan(name="c1", nodes=nodes, vm_size="Standard_NC4as_T4_v3", low_priority=True)
        ],
        total_nodes=nodes,
        est_makespan_s=600,
        est_cost=est_cost,
        binding_limit="items",
        price_per_hour=price,
    )


def _result(
    index: int,
    *,
    run_id: str = "r1",
    node: str = "n0:100",
    failed: str | None = None,
    message: str = "bad",
    at_s: float | None = 10.0,
    total_s: float = 2.0,
    permanent: bool = True,
) -> ItemResult:
    return ItemResult(
        run_id=run_id,
        item_id=f"item-{index:05d}",
        status=ItemStatus.FAILED if failed else ItemStatus.SUCCEEDED,
        source=f"https://acct.blob.core.windows.net/media/v{index}.mp4",
        outputs=[] if failed else [f"{run_id}/item-{index:05d}/features.npy"],
        timings=StageTimings(
            download_s=total_s * 0.1,
            decode_s=total_s * 0.3,
            inference_s=total_s * 0.5,
            upload_s=total_s * 0.1,
            total_s=total_s,
        ),
        error=ItemError(error_class=failed, message=message, permanent=permanent, attempts=2)
        if failed
        else None,
        node=node,
        finished_at=None if at_s is None else START + timedelta(seconds=at_s),
    )


# -- pure analysis ----------------------------------------------------------------------------
def test_counts_and_failures_are_grouped_by_class_with_capped_examples() -> None:
    results = [_result(i) for i in range(10)]
    results += [_result(100 + i, failed="DecodeError", message=f"m{i}") for i in range(5)]
    results += [_result(200, failed="Timeout", permanent=False)]
    analysis = RunAnalysis(START)
    for result in results:
        analysis.add(result)
    stats = analysis.summarize(START + timedelta(seconds=100), _plan())
    assert (analysis.succeeded, analysis.failed) == (10, 6)
    assert analysis.failures_by_class() == {"DecodeError": 5, "Timeout": 1}
    decode, timeout = stats.failures
    assert (decode.error_class, decode.count, decode.permanent) == ("DecodeError", 5, 5)
    assert len(decode.examples) == MAX_EXAMPLES_PER_CLASS
    assert [e.message for e in decode.examples] == ["m0", "m1", "m2"]
    assert decode.examples[0].item_id == "item-00100" and decode.examples[0].source.endswith(
        "v100.mp4"
    )
    assert (timeout.count, timeout.permanent) == (1, 0)


def test_long_messages_are_cut_in_examples() -> None:
    stats = analyze([_result(1, failed="E", message="x" * 10_000)], START, START, None)
    assert len(stats.failures[0].examples[0].message) < 600


def test_stage_durations_use_successes_only_and_a_bounded_sample() -> None:
    rng = np.random.default_rng(1)
    totals = rng.uniform(1.0, 3.0, size=10_000)
    results = [_result(i, total_s=float(t)) for i, t in enumerate(totals)]
    results.append(_result(99_999, failed="E", total_s=500.0))  # must not count as a duration
    stats = analyze(results, START, START + timedelta(hours=1), None, sample_size=256)
    total = next(s for s in stats.stages if s.stage == "total")
    assert total.count == 10_000 and total.sample_size == 256
    assert total.max_s == pytest.approx(totals.max()) and total.min_s == pytest.approx(totals.min())
    assert total.mean_s == pytest.approx(totals.mean())
    assert abs(total.p50_s - float(np.median(totals))) < 0.2  # sampled, so approximate
    assert total.p25_s <= total.p50_s <= total.p75_s <= total.p90_s <= total.p99_s <= total.max_s
    assert any("sample of 256" in note for note in stats.notes)


def test_reservoir_stays_bounded_and_uniform() -> None:
    reservoir = Reservoir(100, seed=3)
    for value in range(100_000):
        reservoir.add(float(value))
    assert reservoir.seen == 100_000 and len(reservoir.values) == 100
    # A uniform sample of 0..99,999 has its mean near 50,000 (a prefix-only one would be ~50).
    assert 35_000 < sum(reservoir.values) / 100 < 65_000


def test_small_runs_have_exact_quantiles() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    ordered = sorted(values)
    for q in (0.0, 0.25, 0.5, 0.9, 0.99, 1.0):
        assert quantile(ordered, q) == pytest.approx(float(np.quantile(values, q)))
    assert quantile([], 0.5) == 0.0


def test_timeline_is_cumulative_exact_and_bounded() -> None:
    # Ten hours of finishes one per 3 s, plus a record stamped before the run started.
    results = [_result(i, at_s=3.0 * i) for i in range(12_000)]
    results.append(_result(50_000, failed="E", at_s=-30))
    results.append(_result(50_001, at_s=None))
    stats = analyze(results, START, START + timedelta(hours=10), None)
    points = stats.timeline
    assert len(points) <= MAX_TIMELINE_BINS + 1
    assert points[0].t_s <= -30 and (points[0].succeeded, points[0].failed) == (0, 0)
    assert (points[-1].succeeded, points[-1].failed) == (12_000, 1)
    assert all(a.t_s < b.t_s for a, b in itertools.pairwise(points))
    assert all(a.succeeded <= b.succeeded for a, b in itertools.pairwise(points))
    assert stats.undated == 1
    assert points[-1].t_s >= 3.0 * 11_999


def test_a_record_from_a_clock_years_off_is_undated_not_a_stretched_timeline() -> None:
    # A 10-minute run; one node's clock is 31 years ahead.
    results = [_result(i, at_s=10.0 * i) for i in range(60)]
    results.append(_result(99, at_s=31 * 365 * 86400.0))
    stats = analyze(results, START, START + timedelta(minutes=10), None)
    assert stats.undated == 1
    assert stats.timeline_bin_s <= 4  # 600 s over at most MAX_TIMELINE_BINS bins, not years
    assert stats.timeline[-1].succeeded == 60


def test_timeline_coarsening_keeps_counts() -> None:
    timeline = Timeline(max_bins=4)
    for second in range(100):
        timeline.add(float(second), succeeded=second % 2 == 0)
    assert timeline.width >= 25
    assert sum(ok for ok, _ in timeline.bins.values()) == 50
    assert sum(bad for _, bad in timeline.bins.values()) == 50


def test_idle_fraction_and_billed_time_from_the_plan() -> None:
    # 4 nodes for 1,000 s = 4,000 node-seconds billed. One node did all 500 items of 2 s,
    # one finishing every second (two at a time): it worked from -2 s to 499 s, 501 node-
    # seconds, not the 1,000 item-seconds that would count each overlapped second twice.
    results = [_result(i, total_s=2.0, at_s=float(i)) for i in range(500)]
    stats = analyze(results, START, START + timedelta(seconds=1000), _plan(4, price=0.36))
    cost = stats.cost
    assert cost.node_seconds_billed == pytest.approx(4000)
    assert cost.node_seconds_busy == pytest.approx(501)
    assert stats.nodes[0].busy_s == pytest.approx(1000)  # item-seconds, per node
    assert cost.idle_fraction == pytest.approx(1 - 501 / 4000)
    assert "4 nodes x the run's wall time" in cost.billed_basis
    assert cost.actual_cost == pytest.approx(4000 / 3600 * 0.36)
    assert cost.est_cost == 1.0
    assert idle_fraction(0.0, 0.0) is None
    assert idle_fraction(10.0, 5.0) == 0.0  # several processes a node: clamped, not negative


def test_measured_billed_time_wins_over_the_estimate() -> None:
    stats = analyze(
        [_result(1)], START, START + timedelta(seconds=100), _plan(4), measured_billed_s=50.0
    )
    assert stats.cost.node_seconds_billed == 50.0
    assert "measured" in stats.cost.billed_basis


def test_cost_is_unknown_without_a_price() -> None:
    stats = analyze([_result(1)], START, START + timedelta(seconds=100), _plan(2, price=None))
    assert stats.cost.price_per_hour is None and stats.cost.actual_cost is None
    assert "unknown" in stats.cost.cost_note
    no_plan = analyze([], START, START, None)
    assert no_plan.cost.node_seconds_billed == 0 and no_plan.cost.idle_fraction is None
    assert no_plan.cost.est_cost is None and no_plan.cost.actual_cost is None


def test_throughput_is_per_node_with_its_processes_together() -> None:
    assert node_of("host-p1:4242") == "host"
    assert node_of("local-0:99") == "local-0"
    assert node_of("") == "(unknown)"
    results = [
        _result(i, node=f"gpu-a-p{i % 2}:{7 + i % 2}", at_s=60.0 + 60 * i, total_s=60.0)
        for i in range(10)
    ]
    results += [_result(100, node="gpu-b:5", failed="E", at_s=30.0, total_s=10.0)]
    stats = analyze(results, START, START + timedelta(seconds=700), None)
    node_a, node_b = stats.nodes
    assert (node_a.node, node_a.succeeded, node_a.failed) == ("gpu-a", 10, 0)
    assert node_a.busy_s == pytest.approx(600)
    assert node_a.active_s == pytest.approx(600)  # first item started at 0, last ended at 600
    assert node_a.items_per_hour == pytest.approx(60.0)
    assert (node_b.node, node_b.failed) == ("gpu-b", 1)


def test_naive_times_are_taken_as_utc() -> None:
    naive_start = START.replace(tzinfo=None)  # the Durable SDK's clock is naive
    stats = analyze([_result(1, at_s=10)], naive_start, naive_start + timedelta(seconds=20), None)
    assert stats.wall_s == 20 and stats.timeline[-1].succeeded == 1


# -- report.html ------------------------------------------------------------------------------
def _report(results: list[ItemResult], *, plan: RunPlan | None, wall_s: float = 900) -> RunReport:
    finished = START + timedelta(seconds=wall_s)
    analysis = RunAnalysis(START)
    for result in results:
        analysis.add(result)
    return RunReport(
        run_id="r1",
        phase=RunPhase.COMPLETED,
        manifest=f"manifests/{NASTY}.csv",
        total=len(results),
        succeeded=analysis.succeeded,
        failed=analysis.failed,
        invalid=2,
        started_at=START,
        finished_at=finished,
        plan=plan,
        failures_by_class=analysis.failures_by_class(),
        output_prefix="outputs/r1/",
        weights="MobileNetV3Small: random-init (offline)",
        message=f"done {NASTY}",
        stats=analysis.summarize(finished, plan),
    )


def _synthetic_results(count: int = 200) -> list[ItemResult]:
    rng = np.random.default_rng(7)
    results = []
    for index in range(count):
        node = f"gpu-{index % 5}-p{index % 2}:{100 + index % 2}"
        at = 60.0 + 4.0 * index + float(rng.uniform(0, 3))
        total = float(rng.lognormal(1.0, 0.4))
        if index % 17 == 0:
            kind = ("DecodeError", "Timeout", "Weird$Error$Class")[index % 3]
            results.append(
                _result(
                    index,
                    node=node,
                    failed=kind,
                    message=f"{NASTY} #{index}",
                    at_s=at,
                    total_s=total,
                )
            )
        else:
            results.append(_result(index, node=node, at_s=at, total_s=total))
    return results


def test_the_live_tables_are_the_reports_tables_of_the_same_records() -> None:
    # What a dashboard shows of a run before its report exists (`serve` from its ledger,
    # `dashboard` from a deployed run's failed records) is what the report will show.
    results = _synthetic_results()
    results.append(_result(999, failed="DecodeError", node="", at_s=None))  # no node, undated
    stats = analyze(results, START, START + timedelta(seconds=900), _plan())
    live = live_tables(results, START)
    assert live == {
        "nodes": [node.model_dump(mode="json") for node in stats.nodes],
        "failures": [failure.model_dump(mode="json") for failure in stats.failures],
    }
    assert len(live["nodes"]) == 6 and len(live["failures"]) == 3  # five nodes and "(unknown)"
    assert json.loads(json.dumps(live)) == live  # what the pages fetch as it is
    assert live_tables([], START) == {"nodes": [], "failures": []}


def _embedded_pngs(html: str) -> list[np.ndarray]:
    images = []
    for encoded in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


def _assert_self_contained(html: str) -> None:
    # No resource is fetched from anywhere: no scripts at all, no remote src/href/url()/@import.
    assert "<script" not in html.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"url\(|@import", html, re.IGNORECASE)
    assert not re.search(r"<(?:link|iframe|object|embed)\b", html, re.IGNORECASE)


def test_html_escapes_run_strings_and_embeds_every_plot() -> None:
    html = render_report_html(_report(_synthetic_results(), plan=_plan(10, price=0.5)))
    assert html.count(IMG_PREFIX) == PLOT_COUNT == 5
    _assert_self_contained(html)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quoted&#x27;" in html
    assert "<b>bold</b>" not in html
    assert "Weird$Error$Class" in html  # shown as text, not eaten by mathtext
    images = _embedded_pngs(html)
    assert len(images) == PLOT_COUNT
    assert all(image.std() > 0 for image in images)


@pytest.mark.parametrize(
    "results",
    [[], [_result(i, failed="E", message=NASTY, at_s=None, total_s=0.0) for i in range(5)]],
    ids=["empty", "all-failed-undated"],
)
def test_empty_and_all_failed_runs_render(results: list[ItemResult]) -> None:
    for plan in (None, _plan(1)):
        html = render_report_html(_report(results, plan=plan, wall_s=0))
        assert html.count(IMG_PREFIX) == PLOT_COUNT
        assert all(image.std() > 0 for image in _embedded_pngs(html))
    report = _report(results, plan=None).model_copy(update={"stats": None})  # an older report
    assert render_report_html(report).count(IMG_PREFIX) == PLOT_COUNT


def test_empty_plots_say_no_data() -> None:
    from matplotlib.figure import Figure

    from batchctl.reporting import html as report_html

    report = _report([], plan=None, wall_s=0)
    draws = (
        report_html._draw_timeline,
        report_html._draw_stages,
        report_html._draw_nodes,
        report_html._draw_failures,
        report_html._draw_cost,
    )
    assert len(draws) == PLOT_COUNT
    for draw in draws:
        figure = Figure()
        draw(report)(figure)
        texts = [text.get_text() for axes in figure.axes for text in axes.texts]
        assert texts and all(text in ("no data", "no failures") for text in texts), draw


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium: run `bash scripts/ensure-chromium.sh` (make test does)")


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    html = render_report_html(_report(_synthetic_results(200), plan=_plan(10, price=0.5)))
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    assert html.count(IMG_PREFIX) == PLOT_COUNT
    for image in _embedded_pngs(html):
        assert image.std() > 0
    _assert_self_contained(html)

    shot = tmp_path / "shot.png"
    started = time.monotonic()
    completed = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,4000",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert shot.exists(), completed.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as screenshot:
        pixels = np.asarray(screenshot.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (4000, 1280)
    assert (pixels != pixels[0, 0]).any()  # not one flat colour
    # The plots really drew in the browser: the throughput bars' blue (#1565c0), which only
    # the embedded PNGs use, covers a good area (a broken image would show none).
    blue = np.abs(pixels - np.array([0x15, 0x65, 0xC0])).sum(axis=2) < 40
    assert blue.sum() > 2000, f"only {blue.sum()} plot-blue pixels"
    print(f"chromium screenshot took {elapsed:.2f} s")


# -- through write_report, against Azurite ----------------------------------------------------
@pytest.mark.azurite
def test_write_report_puts_json_and_html_in_blob_storage(
    blob_store: BlobStore, ledger: Ledger, run_id: str, tmp_path: Path, services: Services
) -> None:
    ledger.ensure_table()
    results = [
        _result(i, run_id=run_id, node=f"local-{i % 2}:{i % 2}", at_s=5.0 + i) for i in range(24)
    ]
    results += [
        _result(
            100 + i, run_id=run_id, node="local-1:1", failed="DecodeError", message=NASTY, at_s=9.0
        )
        for i in range(3)
    ]
    # One item's outputs include the metadata.json that names the weights.
    metadata = f"{run_id}/items/item-00003/metadata.json"
    blob_store.upload_bytes("outputs", metadata, json.dumps({"model": "M", "weights": "w.h5"}))
    results[3] = results[3].model_copy(update={"outputs": [metadata]})
    for result in results:
        assert ledger.record(result)
    plan = _plan(2, price=1.0).model_copy(update={"run_id": run_id})
    state = RunState(
        run_id=run_id,
        request=RunRequest(run_id=run_id, manifest="manifests/m.csv"),
        started_at=START,
        summary=ManifestSummary(
            run_id=run_id, manifest="m.csv", rows=28, valid=27, invalid=1, chunk_count=0
        ),
        plan=plan,
    )

    returned = controller.write_report(
        services, state, RunPhase.COMPLETED, "all done", START.replace(minute=5)
    )

    # What goes back to the orchestrator stays small; the blobs hold the analysis.
    assert returned.stats is None
    assert (returned.succeeded, returned.failed) == (24, 3)
    assert returned.failures_by_class == {"DecodeError": 3}
    assert returned.weights == "M: w.h5"
    saved = RunReport.model_validate_json(
        blob_store.download_bytes("runs", controller.report_blob_name(run_id))
    )
    assert saved.stats is not None and saved.stats.cost.node_seconds_billed == pytest.approx(600)
    assert saved.stats.timeline[-1].succeeded == 24
    assert [n.node for n in saved.stats.nodes] == ["local-0", "local-1"]
    html_name = controller.report_html_blob_name(run_id)
    assert html_name == f"{run_id}/report.html"
    properties = blob_store._blob("runs", html_name).get_blob_properties()
    assert (properties.content_settings.content_type or "").startswith("text/html")
    html = blob_store.download_bytes("runs", html_name).decode("utf-8")
    # The session's backend is local: no GPU price panel (report.json keeps the numbers).
    assert saved.local and html.count(IMG_PREFIX) == LOCAL_PLOT_COUNT
    assert "GPU time and cost" not in html
    assert "&lt;script&gt;" in html and run_id in html

    report_path, _ = controller.copy_run_out(services, run_id, tmp_path / run_id)
    assert report_path.with_name("report.html").read_text(encoding="utf-8") == html


@pytest.mark.azurite
def test_a_report_html_that_cannot_be_drawn_does_not_fail_the_run(
    blob_store: BlobStore,
    ledger: Ledger,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    services: Services,
) -> None:
    from batchctl.reporting import html as report_html

    def broken(report: RunReport) -> str:
        raise RuntimeError("matplotlib could not draw")

    monkeypatch.setattr(report_html, "render_report_html", broken)
    ledger.ensure_table()
    assert ledger.record(_result(1, run_id=run_id, node="n:1", at_s=5.0))
    state = RunState(
        run_id=run_id,
        request=RunRequest(run_id=run_id, manifest="manifests/m.csv"),
        started_at=START,
    )
    returned = controller.write_report(
        services, state, RunPhase.COMPLETED, "done", START.replace(minute=1)
    )
    assert returned.phase is RunPhase.COMPLETED and returned.succeeded == 1
    assert blob_store.exists("runs", controller.report_blob_name(run_id))
    assert not blob_store.exists("runs", controller.report_html_blob_name(run_id))


# -- the report a person acts on, from a real local run ---------------------------------------
def _chromium_run(tmp_path: Path, page: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            *flags,
            page.as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )


@pytest.mark.azurite
@pytest.mark.slow
def test_a_local_run_leaves_a_report_to_act_on(
    tmp_path: Path, azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.2")
    folder = tmp_path / "project"
    (folder / "media").mkdir(parents=True)
    rows = [["id", "video", "label"]]
    for item_id in ("good-0", "good-1", "bad-0", "good-2"):
        (folder / "media" / f"{item_id}.mp4").write_bytes(item_id.encode())
        rows.append([item_id, f"media/{item_id}.mp4", f"label, {item_id}"])
    rows.append(["outside", "../escape.mp4", "x"])  # row 6: invalid, with its reason
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    options = RunOptions(
        task="tests.worker_tasks:QuickTaskFailingBad",
        poll_interval_s=0.3,
        idle_exit_s=0.5,
        error_budget=ErrorBudget(max_failed=5),
    )
    run_id = "report-act-on"
    result = run_locally(manifest, options, run_id=run_id, nodes=2, out_dir=tmp_path / "out")
    run_dir = result.report_path.parent
    report = RunReport.model_validate_json(result.report_path.read_bytes())
    assert (report.succeeded, report.failed, report.invalid) == (3, 1, 1)

    # The user's manifest and sources, not the staging blob.
    assert report.manifest_label == str(manifest.resolve())
    assert report.manifest == f"manifests/local/{run_id}/manifest.csv"
    assert report.options is not None and report.options.task == options.task
    assert report.local
    [example] = report.stats.failures[0].examples if report.stats else []
    assert example.source == "media/bad-0.mp4"
    [invalid] = report.invalid_rows
    assert invalid.row == 6 and invalid.field == "video" and "escape" in invalid.reason
    assert report.invalid_rows_file == f"{run_id}/manifest-errors.jsonl"
    assert (run_dir / "manifest-errors.jsonl").exists()
    # Every planned slot is listed and together they account for every item worked on.
    assert report.plan is not None
    assert len(report.planned_nodes) == report.plan.total_nodes
    assert sum(s.succeeded + s.failed for s in report.planned_nodes) == 4
    assert report.unplanned_workers == []
    for slot in report.planned_nodes:
        assert all(Path(log).exists() for log in slot.logs)
    names = [m.name for m in report.phases]
    assert names[0] == "started" and names[-1] == "report written"
    assert "first item started" in names and "last item finished" in names
    assert [m.t_s for m in report.phases] == sorted(m.t_s for m in report.phases)

    # failed.csv: the header and the rows to run again, cells as the manifest had them.
    with (run_dir / "failed.csv").open(newline="") as handle:
        assert list(csv.reader(handle)) == [rows[0], rows[3]]
    # index.csv: from row and source to the item's folder in this local copy.
    with (run_dir / "index.csv").open(newline="") as handle:
        index = list(csv.DictReader(handle))
    assert [(r["row"], r["item_id"], r["source"], r["status"]) for r in index] == [
        ("2", "good-0", "media/good-0.mp4", "succeeded"),
        ("3", "good-1", "media/good-1.mp4", "succeeded"),
        ("4", "bad-0", "media/bad-0.mp4", "failed"),
        ("5", "good-2", "media/good-2.mp4", "succeeded"),
    ]
    for entry in index:
        if entry["status"] == "succeeded":
            assert entry["folder"] == f"outputs/items/{entry['item_id']}/"
            assert (run_dir / entry["folder"] / "echo.txt").read_bytes() == entry[
                "item_id"
            ].encode()
        else:
            assert entry["folder"] == ""

    # report.html in a real browser: the new sections are there, filled, and drawn.
    page = run_dir / "report.html"
    html = page.read_text(encoding="utf-8")
    _assert_self_contained(html)
    assert html.count(IMG_PREFIX) == LOCAL_PLOT_COUNT
    dumped = _chromium_run(tmp_path, page, "--dump-dom")
    dom = dumped.stdout.decode("utf-8", errors="replace")
    assert "<body>" in dom.replace("<body >", "<body>"), dumped.stderr.decode()[-2000:]
    for section in ("files", "invalid-rows", "phases", "planned-nodes", "options"):
        assert f'id="{section}"' in dom, section
    assert str(manifest.resolve()) in dom
    assert 'href="failed.csv"' in dom and 'href="index.csv"' in dom
    assert 'href="manifest-errors.jsonl"' in dom and 'href="outputs/items/"' in dom
    assert "escape" in dom and "media/bad-0.mp4" in dom
    assert "tests.worker_tasks:QuickTaskFailingBad" in dom
    assert "first item started" in dom
    assert dom.count('<tr class="worked">') + dom.count('<tr class="idle">') == len(
        report.planned_nodes
    )
    assert 'href="logs/' in dom
    assert "GPU time and cost" not in dom and "expected cost" not in dom
    shot = tmp_path / "shot.png"
    _chromium_run(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,3000")
    with Image.open(shot) as screenshot:
        pixels = np.asarray(screenshot.convert("RGB")).astype(int)
    assert (pixels != pixels[0, 0]).any()  # not blank
    # The phase markers' purple drew on the timeline.
    purple = np.abs(pixels - np.array([0x6A, 0x1B, 0x9A])).sum(axis=2) < 60
    assert purple.sum() > 100, f"only {purple.sum()} phase-marker pixels"


def test_idle_planned_nodes_and_a_non_local_run_render(tmp_path: Path) -> None:
    report = _report(_synthetic_results(20), plan=_plan(3, price=0.5)).model_copy(
        update={
            "planned_nodes": [
                PlannedNode(cluster="c1", slot=0, vm_size="T4", workers=["w"], succeeded=20),
                PlannedNode(
                    cluster="c1", slot=1, vm_size="T4", logs=["Azure ML job r1-c1-n1-<attempt>"]
                ),
            ],
            "unplanned_workers": ["gpu-host-7"],
        }
    )
    html = render_report_html(report)
    assert html.count(IMG_PREFIX) == PLOT_COUNT  # a cloud run keeps its GPU cost panel
    assert "GPU time and cost" in html and "expected cost" in html
    assert '<tr class="idle">' in html and "idle: no item" in html
    assert "r1-c1-n1-&lt;attempt&gt;" in html and "gpu-host-7" in html
    assert "2 slots, 1 idle" in html


def test_index_folders_move_to_the_local_copy_and_prefixes_agree() -> None:
    from batchctl.merge import item_output_prefix
    from batchctl.reporting.artifacts import item_folder, localize_index

    assert item_folder("outputs", "r1", "a") == "outputs/" + item_output_prefix("r1", "a")
    lines = ["row,item_id,source,status,folder\n", '2,a,"x,y.mp4",succeeded,outputs/r1/items/a/\n']
    assert list(localize_index(lines, "outputs/r1/", "outputs/")) == [
        "row,item_id,source,status,folder\n",
        '2,a,"x,y.mp4",succeeded,outputs/items/a/\n',
    ]
