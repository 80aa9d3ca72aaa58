"""``batchctl trial``: the first rows run for real, and the plan matches ``batchctl plan``."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchctl.cli import main
from batchctl.commands.trial import measure, write_first_rows
from batchctl.contracts import ItemError, ItemResult, ItemStatus, StageTimings
from batchctl.local.azurite import Azurite
from batchctl.local.samples import write_demo_manifest
from tests.worker_tasks import save_tiny_model

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _ok(item_id: str, node: str, end_s: float, total_s: float) -> ItemResult:
    return ItemResult(
        run_id="t",
        item_id=item_id,
        status=ItemStatus.SUCCEEDED,
        timings=StageTimings(download_s=0.5, decode_s=1.0, inference_s=2.0, total_s=total_s),
        node=node,
        finished_at=T0 + timedelta(seconds=end_s),
    )


def _failed(item_id: str, error_class: str) -> ItemResult:
    return ItemResult(
        run_id="t",
        item_id=item_id,
        status=ItemStatus.FAILED,
        source=f"media/{item_id}.mp4",
        error=ItemError(
            error_class=error_class, message=f"{item_id} broke", permanent=True, attempts=1
        ),
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


def test_measure_counts_overlap_per_node_and_groups_failures() -> None:
    # Node a: three items overlapping in 0..9 s (pipelined); node b: one item 2..6 s.
    results = [
        _ok("1", "a", end_s=4, total_s=4),
        _ok("2", "a", end_s=7, total_s=4),
        _ok("3", "a", end_s=9, total_s=3),
        _ok("4", "b", end_s=6, total_s=4),
        _failed("5", "UndecodableError"),
        _failed("6", "UndecodableError"),
        _failed("7", "ItemTimeoutError"),
    ]
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
    assert "measured by trial" in trial_note
    assert plan == direct
