"""``batchctl trial``: the first rows run for real, and the plan matches ``batchctl plan``.

Here (Azurite and worker processes) and on a deployed app: the fake app of test_client.py,
whose routes are the app's real handlers, with a stand-in for what the run does.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batchctl.cli import build_parser, main
from batchctl.commands import status as status_cmd
from batchctl.commands.plan import read_manifest_durations
from batchctl.commands.trial import (
    _conclude,
    _plan_for_all,
    measure,
    measure_report,
    trial_segment_seconds,
    write_first_rows,
)
from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    RunOptions,
    RunPhase,
    RunReport,
    StageTimings,
    WorkItem,
)
from batchctl.local.azurite import Azurite
from batchctl.local.samples import write_demo_manifest
from batchctl.reporting import analyze
from batchctl.storage import BlobStore
from node_image.worker.loop import EXIT_IDLE
from node_image.worker.recording import Recorder
from node_image.worker.tasks import ItemInput, ItemOutput
from tests import test_client
from tests.test_client import (
    FUNCTION_KEY,
    RUNNING_SCRIPT,
    FakeApp,
    custom,
    last_json,
    run_cli,
)
from tests.test_worker_loop import RUN as STUB_RUN
from tests.test_worker_loop import ScriptedTask, StubLedger, StubStorage, make_harness
from tests.test_worker_loop import item as stub_item
from tests.worker_tasks import save_tiny_model

# test_client's fake app (an HTTP server whose /api routes are the app's real handlers), as a
# fixture of this module too: pytest registers it under the name it is bound to here.
fake_app = test_client.app

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _ok(
    item_id: str,
    node: str,
    end_s: float,
    total_s: float,
    run_id: str = "t",
    media_s: float | None = None,
) -> ItemResult:
    return ItemResult(
        run_id=run_id,
        item_id=item_id,
        status=ItemStatus.SUCCEEDED,
        timings=StageTimings(download_s=0.5, decode_s=1.0, inference_s=2.0, total_s=total_s),
        node=node,
        finished_at=T0 + timedelta(seconds=end_s),
        media_s=media_s,
    )


def _failed(
    item_id: str,
    error_class: str,
    *,
    node: str = "",
    end_s: float | None = None,
    total_s: float = 0.0,
    run_id: str = "t",
) -> ItemResult:
    return ItemResult(
        run_id=run_id,
        item_id=item_id,
        status=ItemStatus.FAILED,
        source=f"media/{item_id}.mp4",
        timings=StageTimings(total_s=total_s),
        node=node,
        finished_at=None if end_s is None else T0 + timedelta(seconds=end_s),
        error=ItemError(
            error_class=error_class, message=f"{item_id} broke", permanent=True, attempts=1
        ),
    )


def _report(
    run_id: str, results: list[ItemResult], *, manifest: str = "m.csv", with_stats: bool = True
) -> RunReport:
    """The report a run over ``results`` writes, its stats from the real analysis."""
    finished = T0 + timedelta(seconds=60)
    stats = analyze(results, T0, finished, None)
    return RunReport(
        run_id=run_id,
        phase=RunPhase.COMPLETED,
        manifest=manifest,
        total=len(results),
        succeeded=sum(r.status is ItemStatus.SUCCEEDED for r in results),
        failed=sum(r.status is ItemStatus.FAILED for r in results),
        invalid=0,
        started_at=T0,
        finished_at=finished,
        failures_by_class={f.error_class: f.count for f in stats.failures},
        output_prefix=f"outputs/{run_id}/",
        stats=stats if with_stats else None,
    )


def test_first_rows_keep_the_header_skip_blank_lines_and_keep_quoted_newlines(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text('video,note\na.mp4,"two\nlines"\n\n,\nb.mp4,x\nc.mp4,y\n')
    target = tmp_path / "first.csv"
    assert write_first_rows(manifest, 2, target) == 2
    with target.open(newline="") as handle:
        assert list(csv.reader(handle)) == [
            ["video", "note"],
            ["a.mp4", "two\nlines"],
            ["b.mp4", "x"],
        ]
    assert write_first_rows(manifest, 10, target) == 3


def _two_nodes_and_failures() -> list[ItemResult]:
    """Node a: three items overlapping in 0..9 s (pipelined); node b: one item 2..6 s."""
    return [
        _ok("1", "a", end_s=4, total_s=4),
        _ok("2", "a", end_s=7, total_s=4),
        _ok("3", "a", end_s=9, total_s=3),
        _ok("4", "b", end_s=6, total_s=4),
        _failed("5", "UndecodableError"),
        _failed("6", "UndecodableError"),
        _failed("7", "ItemTimeoutError"),
    ]


def test_measure_counts_overlap_per_node_and_groups_failures() -> None:
    results = _two_nodes_and_failures()
    trial = measure(results)
    assert (trial.succeeded, trial.failed) == (4, 3)
    # (9 s on node a + 4 s on node b) / 4 items, not the mean item time of 3.75 s.
    assert trial.node_s_per_item == pytest.approx(13 / 4)
    assert trial.stage_mean_s["inference_s"] == 2.0
    assert trial.stage_mean_s["total_s"] == pytest.approx(3.75)
    assert trial.failure_counts == {"UndecodableError": 2, "ItemTimeoutError": 1}
    assert [e["item_id"] for e in trial.failures["UndecodableError"]] == ["5", "6"]


def test_measure_with_nothing_succeeded_has_no_rate() -> None:
    trial = measure([_failed("1", "UndecodableError")])
    assert trial.succeeded == 0 and trial.node_s_per_item == 0.0 and not trial.stage_mean_s


def test_measure_report_gives_what_measure_gives_from_the_same_records() -> None:
    results = [
        *_two_nodes_and_failures(),
        # A node that only failed: busy for 5 s, but like measure() it adds no rate.
        _failed("8", "UndecodableError", node="c", end_s=5, total_s=5),
    ]
    local = measure(results)

    trial = measure_report(_report("t", results))

    assert trial.node_s_per_item == local.node_s_per_item == pytest.approx(13 / 4)
    assert (trial.succeeded, trial.failed) == (local.succeeded, local.failed) == (4, 4)
    assert trial.stage_mean_s == local.stage_mean_s
    assert trial.stage_p90_s["inference_s"] == 2.0
    assert trial.stage_p90_s["total_s"] == 4.0
    assert "upload_s" in trial.stage_mean_s  # every stage a success has, 0 s included
    assert trial.failure_counts == local.failure_counts
    assert trial.failure_counts == {"UndecodableError": 3, "ItemTimeoutError": 1}
    assert trial.failures == local.failures
    assert [e["item_id"] for e in trial.failures["UndecodableError"]] == ["5", "6", "8"]


def test_measure_report_counts_a_node_once_whatever_its_processes() -> None:
    # Two worker processes of one node: the node's wall time is what a node costs.
    results = [
        _ok("1", "node-0-p0:11", end_s=4, total_s=4),
        _ok("2", "node-0-p1:12", end_s=4, total_s=4),
        _ok("3", "node-0-p0:11", end_s=8, total_s=4),
        _ok("4", "node-0-p1:12", end_s=8, total_s=4),
    ]
    assert measure_report(_report("t", results)).node_s_per_item == pytest.approx(8 / 4)


def test_the_trial_measures_node_seconds_per_second_of_video() -> None:
    # Node a: 9 s for three videos of 10 + 20 + 30 s; node b: 4 s for one of 40 s.
    results = [
        _ok("1", "a", end_s=4, total_s=4, media_s=10),
        _ok("2", "a", end_s=7, total_s=4, media_s=20),
        _ok("3", "a", end_s=9, total_s=3, media_s=30),
        _ok("4", "b", end_s=6, total_s=4, media_s=40),
        _failed("5", "UndecodableError"),
    ]
    for trial in (measure(results), measure_report(_report("t", results))):
        assert trial.node_s_per_item == pytest.approx(13 / 4)
        assert trial.media_s_per_item == pytest.approx(25)
        # 13 node-seconds over 100 s of video.
        assert trial.node_s_per_video_s == pytest.approx(13 / 100)


def test_without_video_lengths_the_trial_has_no_per_video_rate() -> None:
    trial = measure(_two_nodes_and_failures())  # records without media_s (older, custom)
    assert trial.node_s_per_video_s is None and trial.media_s_per_item is None
    # Only some say: the rate is per item over the mean length of those that do.
    some = [_ok("1", "a", 4, 4, media_s=8.0), _ok("2", "a", 8, 4)]
    partial = measure(some)
    assert partial.media_s_per_item == 8.0
    assert partial.node_s_per_video_s == pytest.approx((8 / 2) / 8)


def _sizing_args(manifest: Path, *flags: str) -> argparse.Namespace:
    args = build_parser().parse_args(["trial", str(manifest), *flags])
    assert isinstance(args, argparse.Namespace)
    return args


def test_the_trials_plan_is_by_video_length_when_the_manifest_gives_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "video,duration_s\n" + "".join(f"v{i}.mp4,300\n" for i in range(20)) + "long.mp4,3000\n"
    )
    trial = measure(
        [_ok("1", "a", 4, 4, media_s=10), _ok("2", "a", 8, 4, media_s=30)]
    )  # 8 node-s / 40 s of video
    args = _sizing_args(manifest, "--json", "--speedup", "2")
    media = read_manifest_durations(manifest, None)
    plan = _plan_for_all(args, 21, "trial-x", trial, media=media)
    assert plan is not None and plan["model"] == "per_video_second"
    assert plan["sec_per_video_s"] == pytest.approx(0.2 / 2)
    assert plan["straggler"] is True
    assert "planned by video length" in plan["notes"][-1]
    assert "--speedup 2" in plan["notes"][-1]
    # The same plan batchctl plan gives at that rate.
    assert (
        main(["plan", "--manifest", str(manifest), "--sec-per-video-second", "0.1", "--json"]) == 0
    )
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plan["notes"].pop()
    assert plan == direct

    # No duration_s column, or records without lengths: per item, and the note says why.
    per_item = _plan_for_all(args, 21, "trial-x", trial, media=None)
    assert per_item is not None and per_item["model"] == "per_item"
    assert "no duration_s column" in per_item["notes"][-1]
    lengthless = measure([_ok("1", "a", 4, 4)])
    per_item = _plan_for_all(args, 21, "trial-x", lengthless, media=media)
    assert per_item is not None and per_item["model"] == "per_item"
    assert "say no video length" in per_item["notes"][-1]


def _deadline_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"batchctl {command}: ")]


def test_the_trials_plan_for_all_rows_refuses_a_deadline_as_plan_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clean trial at 4 node-s an item, 1,000,000 rows in 2h on at most 100 nodes: the plan
    misses, the line is plan's own (its command name aside), and the exit is plan's 3."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\nb.mp4\n")
    report = _report("trial-x", [_ok("1", "a", 4, 4), _ok("2", "a", 8, 4)])
    trial = measure_report(report)
    assert trial.node_s_per_item == 4.0
    args = _sizing_args(manifest, "--deadline", "2h", "--json")
    assert _conclude(args, report, 2, trial, 1_000_000, media=None, where="here") == 3
    captured = capsys.readouterr()
    [line] = _deadline_lines(captured.err, "trial")
    plan = json.loads(captured.out.strip().splitlines()[-1])["plan"]
    assert plan["meets_deadline"] is False and plan["allow_late"] is False
    assert plan["nodes_to_meet_deadline"] == 648  # 1,545 items a node in 1h48m less 5m
    assert plan["vcpus_to_meet_deadline"] == 2592
    assert line == "batchctl trial: " + plan["deadline_warning"]

    assert main(["plan", "--items", "1000000", "--sec-per-item", "4", "--deadline", "2h"]) == 3
    [direct] = _deadline_lines(capsys.readouterr().err, "plan")
    assert direct.removeprefix("batchctl plan: ") == line.removeprefix("batchctl trial: ")
    assert "meeting it takes 648 nodes: 2,592 low-priority NCASv3_T4 vCPUs, est. $" in line

    # --allow-late: exit 0, the line as a warning.
    args = _sizing_args(manifest, "--deadline", "2h", "--allow-late")
    assert _conclude(args, report, 2, trial, 1_000_000, media=None, where="here") == 0
    [line] = _deadline_lines(capsys.readouterr().err, "trial")
    assert line.startswith("batchctl trial: warning: deadline 2h not met: ")
    assert line.endswith("; accepted as it is with --allow-late")


def test_the_trials_own_outcome_comes_before_the_deadline_in_its_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\nb.mp4\n")
    args = _sizing_args(manifest, "--deadline", "2h")
    # An item failed: 1, as without a deadline; the late plan's line is still printed.
    failed = _report("trial-x", [_ok("1", "a", 4, 4), _failed("2", "DecodeError", node="a")])
    code = _conclude(args, failed, 2, measure_report(failed), 1_000_000, media=None, where="here")
    assert code == 1
    assert len(_deadline_lines(capsys.readouterr().err, "trial")) == 1
    # A deadline the plan meets: 0 and no line.
    clean = _report("trial-x", [_ok("1", "a", 4, 4), _ok("2", "a", 8, 4)])
    code = _conclude(args, clean, 2, measure_report(clean), 1000, media=None, where="here")
    assert code == 0
    assert _deadline_lines(capsys.readouterr().err, "trial") == []


def test_a_bad_duration_fails_the_trial_before_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,duration_s\na.mp4,12\nb.mp4,soon\n")
    assert main(["trial", str(manifest), "--local"]) == 3
    assert "row 3 (line 3), field 'duration_s'" in capsys.readouterr().err


def test_built_in_tasks_plan_segments_and_a_custom_task_keeps_videos_whole() -> None:
    assert trial_segment_seconds(RunOptions(segment_seconds=60)) == 60
    transform = RunOptions.model_construct(task="transform", segment_seconds=60)
    assert trial_segment_seconds(transform) == 60
    custom = RunOptions.model_construct(task="mytasks:Blur", segment_seconds=60)
    assert trial_segment_seconds(custom) is None


# -- the records say how much video they were (node_image/worker/recording.py) ------------------
class _VideoTask(ScriptedTask):
    """The stub task, with the metadata keys every built-in task writes."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__()
        self.metadata = metadata

    def process(self, item: ItemInput) -> ItemOutput:
        return ItemOutput(files={"out.bin": b"x"}, metadata=dict(self.metadata))


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"duration_s": 12.5, "frames": 13}, (12.5, 13)),
        ({"duration_s": None, "frames": 4.0}, (None, 4)),  # a probe without a duration
        ({"duration_s": "12", "frames": True}, (None, None)),  # not numbers
        ({"duration_s": float("nan"), "frames": -1}, (None, None)),
        ({}, (None, None)),  # a custom task that says nothing
    ],
)
def test_the_worker_records_the_videos_length_and_frames(
    metadata: dict[str, Any], expected: tuple[float | None, int | None]
) -> None:
    harness = make_harness(task=_VideoTask(metadata))
    harness.send(stub_item("a"), stub_item("b"))
    assert harness.run() == EXIT_IDLE
    for item_id in "ab":
        result = harness.ledger.records[(STUB_RUN, item_id)]
        assert result.status is ItemStatus.SUCCEEDED
        assert (result.media_s, result.frames) == expected


def test_the_success_record_takes_its_video_length_from_the_metadata_given() -> None:
    events: list[tuple[str, str]] = []
    recorder = Recorder(
        StubLedger(events),
        StubStorage(events),
        node_name="n",
        task_name="features",
        wall_clock=lambda: T0,
    )
    entry = stub_item("a")
    work = WorkItem(run_id=STUB_RUN, items=[entry])
    output = ItemOutput(files={}, metadata={"duration_s": 30.0, "frames": 30})
    written = recorder.write_outputs(work, entry, output, attempt=1, timings={})
    result = recorder.success(work, entry, written, StageTimings(), metadata=output.metadata)
    assert (result.media_s, result.frames) == (30.0, 30)
    bad = recorder.success(
        work, entry, written, StageTimings(), metadata={"duration_s": "long", "frames": -1}
    )
    assert (bad.media_s, bad.frames) == (None, None)


def test_old_records_without_video_lengths_still_parse() -> None:
    old = _ok("1", "a", 4, 4).model_dump(mode="json")
    del old["media_s"], old["frames"]
    assert ItemResult.model_validate(old).media_s is None


def test_measure_report_without_stats_says_so() -> None:
    with pytest.raises(ValueError, match="no stats"):
        measure_report(_report("t", [_ok("1", "a", 4, 4)], with_stats=False))


def test_a_missing_manifest_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["trial", str(tmp_path / "nope.csv")]) == 3


@pytest.mark.azurite
@pytest.mark.slow
def test_trial_on_the_demo_videos_prints_the_plan_batchctl_plan_prints(
    tmp_path: Path,
    azurite: Azurite,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    manifest = write_demo_manifest(tmp_path / "demo")
    # A broken video first, so the trial's rows include a failure to report.
    (tmp_path / "demo" / "videos" / "broken.mp4").write_text("not a video")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], "broken,videos/broken.mp4,none", *lines[1:]]) + "\n")
    model = save_tiny_model(tmp_path / "tiny.keras", size=64)
    common = ["--deadline", "1h", "--vm-size", "Standard_NC4as_T4_v3", "--json"]

    code = main(
        [
            "trial",
            str(manifest),
            "--rows",
            "4",
            "--model",
            str(model),
            "--frame-size",
            "64",
            "--error-budget",
            "1",
            "--out",
            str(tmp_path / "out"),
            *common,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1, captured.err  # one item failed
    result = json.loads(captured.out.strip().splitlines()[-1])
    trial, plan = result["trial"], result["plan"]
    assert (trial["rows"], trial["succeeded"], trial["failed"]) == (4, 3, 1)
    assert trial["failures"] == {"NotAVideoError": 1}
    assert trial["node_s_per_item"] > 0
    assert set(trial["stage_mean_s"]) >= {"download_s", "decode_s", "inference_s", "total_s"}
    assert "NotAVideoError" in captured.err and "broken" in captured.err
    assert plan["items"] == 7  # the whole manifest, not the trial's rows

    assert (
        main(
            [
                "plan",
                "--manifest",
                str(manifest),
                "--sec-per-item",
                str(trial["node_s_per_item"]),
                *common,
            ]
        )
        == 0
    )
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trial_note = plan["notes"].pop()
    assert "measured by trial" in trial_note and "planned per item" in trial_note
    assert plan == direct
    # The records say how long each video was (the demo videos are a few seconds each).
    assert trial["media_s_per_item"] > 0
    assert trial["node_s_per_video_s"] == pytest.approx(
        trial["node_s_per_item"] / trial["media_s_per_item"], rel=2e-2
    )  # node_s_per_item is rounded to milliseconds


# -- on a deployed app (the fake app of test_client.py, storage on Azurite) ---------------------
VIDEO_URL = "https://acct.blob.core.windows.net/media/{}.mp4"
TRIAL_SCRIPT = [
    ("Pending", None),
    ("Running", custom("running", 4, 1, 0)),
    ("Completed", custom("completed", 4, 3, 1)),
]


@pytest.fixture
def app_env(azurite: Azurite, blob_store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    """Storage on Azurite, the function key set, and a client that gives up fast."""
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", FUNCTION_KEY)
    monkeypatch.delenv("BATCHCTL_APP_URL", raising=False)
    monkeypatch.setattr(status_cmd, "DEFAULT_UNREACHABLE_LIMIT_S", 1.0)
    return blob_store


def _manifest(path: Path, rows: int) -> Path:
    lines = ["id,video"] + [f"v{i},{VIDEO_URL.format(f'v{i}')}" for i in range(1, rows + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_like_the_app(app: FakeApp, blob_store: BlobStore, azurite: Azurite) -> Callable[[], None]:
    """Stand in for the app's run of each run started: read the uploaded manifest, "process"
    its rows on one node (4 s an item, one after another; row v4 is no video and fails after
    1 s) and write report.json, stats included, where the controller writes it.
    """
    app.report_base = azurite.blob_url
    app.durable.script = list(TRIAL_SCRIPT)
    done: set[str] = set()

    def run_started() -> None:
        for _, run_id, client_input in app.durable.started:
            if run_id in done:
                continue
            done.add(run_id)
            container, _, name = client_input["request"]["manifest"].partition("/")
            text = blob_store.download_bytes(container, name).decode()
            results: list[ItemResult] = []
            for index, row in enumerate(csv.DictReader(io.StringIO(text)), start=1):
                if row["id"] == "v4":
                    results.append(
                        _failed(
                            row["id"],
                            "NotAVideoError",
                            node="node-0:7",
                            end_s=4 * index - 3,
                            total_s=1,
                            run_id=run_id,
                        )
                    )
                else:
                    results.append(_ok(row["id"], "node-0:7", 4 * index, 4, run_id=run_id))
            report = _report(run_id, results, manifest=f"{container}/{name}")
            blob_store.upload_bytes("runs", f"{run_id}/report.json", report.model_dump_json())

    return run_started


@pytest.mark.azurite
def test_trial_on_the_app_runs_the_first_rows_on_one_small_cluster_and_plans_all(
    fake_app: FakeApp,
    app_env: BlobStore,
    azurite: Azurite,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _manifest(tmp_path / "videos.csv", rows=10)
    fake_app.before_status_read = _run_like_the_app(fake_app, app_env, azurite)
    common = ["--deadline", "1h", "--vm-size", "Standard_NC6s_v3", "--max-nodes", "50", "--json"]

    code, out, err = run_cli(
        capsys,
        "trial",
        str(manifest),
        "--app",
        fake_app.url,
        "--rows",
        "4",
        "--trial-nodes",
        "2",
        "--interval",
        "0.01",
        "--out",
        str(tmp_path / "out"),
        *common,
    )

    assert code == 1, err  # one item failed
    ((_, run_id, client_input),) = fake_app.durable.started
    assert run_id.startswith("trial-")
    options = RunOptions.model_validate(client_input["request"]["options"])
    # One small cluster of --trial-nodes; the plan's --max-nodes sizes only the full run.
    assert options.max_nodes == 2
    assert options.vm_size == "Standard_NC6s_v3"
    # The app's own poll and idle defaults, not the 1 s / 3 s of a local trial.
    assert (options.poll_interval_s, options.idle_exit_s) == (
        RunOptions().poll_interval_s,
        RunOptions().idle_exit_s,
    )
    uploaded = client_input["request"]["manifest"]
    assert uploaded == f"media/_manifests/{run_id}/videos.csv"
    container, _, name = uploaded.partition("/")
    first_rows = app_env.download_bytes(container, name).decode().splitlines()
    assert first_rows == manifest.read_text().splitlines()[:5]  # the header and 4 rows
    # Followed to the end, then the report downloaded beside where a local trial puts it.
    assert len(fake_app.gets(f"/api/runs/{run_id}")) == len(TRIAL_SCRIPT)
    assert (tmp_path / "out" / run_id / "report.json").is_file()

    result = last_json(out)
    trial, plan = result["trial"], result["plan"]
    assert (trial["run_id"], trial["rows"], trial["phase"]) == (run_id, 4, "completed")
    assert (trial["succeeded"], trial["failed"]) == (3, 1)
    # One node busy 0..13 s (v4's failure in 12..13 s included, as a report's node time
    # counts it) over its 3 succeeded items.
    assert trial["node_s_per_item"] == round(13 / 3, 3)
    assert trial["stage_mean_s"]["inference_s"] == 2.0
    assert trial["failures"] == {"NotAVideoError": 1}
    assert [e["item_id"] for e in trial["failure_examples"]["NotAVideoError"]] == ["v4"]
    assert "NotAVideoError" in err and "v4 broke" in err
    assert plan["items"] == 10  # the whole manifest

    assert (
        main(
            ["plan", "--manifest", str(manifest), "--sec-per-item", str(round(13 / 3, 3)), *common]
        )
        == 0
    )
    direct = last_json(capsys.readouterr().out)
    trial_note = plan["notes"].pop()
    assert f"measured by trial {run_id} on the app's Standard_NC6s_v3 nodes" in trial_note
    assert plan == direct


@pytest.mark.azurite
def test_ctrl_c_while_following_a_trial_detaches_without_cancelling(
    fake_app: FakeApp,
    app_env: BlobStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_app.durable.script = list(RUNNING_SCRIPT)
    monkeypatch.setenv("BATCHCTL_APP_URL", fake_app.url)  # the app from the environment

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(status_cmd, "_sleep", interrupt)

    code, out, err = run_cli(capsys, "trial", str(_manifest(tmp_path / "m.csv", rows=3)), "--json")

    assert code == 130
    ((_, run_id, _),) = fake_app.durable.started
    assert f"reattach: batchctl status {run_id} --follow" in err
    assert fake_app.durable.events == []  # nothing cancelled
    assert [seen.path for seen in fake_app.posts()] == ["/api/runs"]
    assert last_json(out) == {"run_id": run_id, "detached": True, "exit_code": 130}


@pytest.mark.azurite
def test_a_trial_with_a_wrong_key_says_which_variable(
    fake_app: FakeApp,
    app_env: BlobStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", "not-the-key")

    code, out, err = run_cli(
        capsys, "trial", str(_manifest(tmp_path / "m.csv", rows=3)), "--app", fake_app.url, "--json"
    )

    assert code == 3
    assert "the function key in BATCHCTL_FUNCTION_KEY is wrong" in err
    assert "not-the-key" not in err + out
    assert last_json(out)["exit_code"] == 3
    assert fake_app.durable.started == []


def test_a_bad_app_url_fails_before_anything_is_uploaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", FUNCTION_KEY)
    monkeypatch.delenv("BATCHCTL_BLOB_URL", raising=False)

    code, _, err = run_cli(
        capsys, "trial", str(_manifest(tmp_path / "m.csv", rows=3)), "--app", "ftp://nowhere"
    )

    assert code == 3
    assert "not an http(s) URL" in err


def test_the_app_from_the_environment_is_used_unless_local(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHCTL_APP_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("BATCHCTL_BLOB_URL", raising=False)
    header_only = _manifest(tmp_path / "m.csv", rows=0)

    code, _, err = run_cli(capsys, "trial", str(_manifest(tmp_path / "rows.csv", rows=2)))
    assert code == 3
    assert "no storage account" in err  # on the app: it needs the storage to upload to

    code, _, err = run_cli(capsys, "trial", str(header_only), "--local")
    assert code == 3
    assert "has no data rows" in err and "storage" not in err
