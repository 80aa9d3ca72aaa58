"""`batchctl retry RUN_FOLDER`: exactly the items of a run that did not succeed, run again.

Real local runs on the session's Azurite with a fast task: a source fixed after a failure,
and a run stopped at its deadline midway. The retry's records name exactly the parent's
unfinished items, its report names the parent, and its options are the parent's.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchctl import cli
from batchctl.contracts import (
    ErrorBudget,
    ItemResult,
    ItemStatus,
    RunOptions,
    RunPhase,
    RunReport,
)
from batchctl.local.azurite import Azurite
from batchctl.local.session import run_locally
from batchctl.settings import ENV_PREFIX
from batchctl.storage import BlobStore
from tests import worker_tasks
from tests.test_client import FUNCTION_KEY, OK_SCRIPT, FakeApp, app, start_instance

__all__ = ["app"]  # the fake app fixture, shared with the client tests

pytestmark = [pytest.mark.azurite, pytest.mark.slow]


def manifest_of(folder: Path, contents: dict[str, bytes]) -> Path:
    media = folder / "media"
    media.mkdir(parents=True)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video", "label"])
        for item_id, data in contents.items():
            (media / f"{item_id}.mp4").write_bytes(data)
            writer.writerow([item_id, f"media/{item_id}.mp4", f"label of {item_id}"])
    return manifest


def records(run_folder: Path) -> dict[str, ItemResult]:
    lines = (run_folder / "records.jsonl").read_text().splitlines()
    found = [ItemResult.model_validate_json(line) for line in lines]
    return {result.item_id: result for result in found}


def retry(run_folder: Path, *flags: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    code = cli.main(["retry", str(run_folder), "--nodes", "1", "--json", *flags])
    summary: dict[str, object] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary["exit_code"] = code
    return summary


@pytest.fixture
def local_env(azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(worker_tasks.MARKER_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.2")


@pytest.mark.usefixtures("local_env")
def test_retry_after_a_source_is_fixed_runs_exactly_the_failed_items(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contents = {f"good-{i}": f"video {i}".encode() for i in range(4)}
    contents["fixme"] = b"broken"
    manifest = manifest_of(tmp_path / "project", contents)
    options = RunOptions(
        task="tests.worker_tasks:QuickTaskFailingBroken",
        poll_interval_s=0.3,
        idle_exit_s=0.5,
        error_budget=ErrorBudget(max_failed=1),
        fps=2,
    )
    out = tmp_path / "out"
    first = run_locally(manifest, options, run_id="retry-parent", nodes=2, out_dir=out)
    assert (first.report.succeeded, first.report.failed) == (4, 1)
    parent_folder = out / "retry-parent"
    assert records(parent_folder)["fixme"].status is ItemStatus.FAILED
    with (parent_folder / "failed.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "video", "label"] and [row[0] for row in rows[1:]] == ["fixme"]

    (tmp_path / "project" / "media" / "fixme.mp4").write_bytes(b"a real video now")
    summary = retry(parent_folder, capsys=capsys)

    assert summary["exit_code"] == 0, summary
    assert (summary["total"], summary["succeeded"], summary["parent_run_id"]) == (
        1,
        1,
        "retry-parent",
    )
    child_folder = Path(str(summary["report"])).parent
    assert set(records(child_folder)) == {"fixme"}
    report = RunReport.model_validate_json((child_folder / "report.json").read_text())
    assert report.parent_run_id == "retry-parent"
    assert report.options is not None and report.options.fps == 2  # the parent's options
    assert report.options.task == options.task


@pytest.mark.usefixtures("local_env")
def test_retry_of_a_run_stopped_midway_runs_exactly_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 32 items of 0.8 s on one node of 3 slots: about 8.5 s of work, far past the 5 s deadline
    # however quickly the node starts (16 once finished all but one by then). Three at once,
    # as on Azure: a local node's own default follows the machine's cores.
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.8")
    monkeypatch.setenv(f"{ENV_PREFIX}CONCURRENCY", "3")
    contents = {f"item-{i:02d}": f"video {i}".encode() for i in range(32)}
    manifest = manifest_of(tmp_path / "project", contents)
    options = RunOptions(
        task="tests.worker_tasks:QuickTask", poll_interval_s=0.3, idle_exit_s=0.5, deadline_s=5
    )
    out = tmp_path / "out"
    first = run_locally(manifest, options, run_id="retry-stopped", nodes=1, out_dir=out)
    parent = records(out / "retry-stopped")
    left = {item for item, result in parent.items() if result.status is not ItemStatus.SUCCEEDED}
    assert left and len(parent) == 32, first.report.message
    assert {parent[item].status for item in left} == {ItemStatus.NOT_RUN}

    # The deadline is the parent's too; the retry lifts it with a flag, keeping the rest.
    summary = retry(out / "retry-stopped", "--deadline", "10m", capsys=capsys)

    assert summary["exit_code"] == 0, summary
    child = records(Path(str(summary["report"])).parent)
    assert set(child) == left
    assert {result.status for result in child.values()} == {ItemStatus.SUCCEEDED}


@pytest.mark.usefixtures("local_env")
def test_a_folder_that_is_not_a_run_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["retry", str(tmp_path), "--json"]) == 3
    captured = capsys.readouterr()
    assert "not a run folder" in captured.err and "Traceback" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["exit_code"] == 3


def test_retry_on_the_app_submits_exactly_the_failed_rows_with_the_parent_named(
    app: FakeApp,
    azurite: Azurite,
    blob_store: BlobStore,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The deployed app's side, as its controller leaves a finished run: report.json and
    # failed.csv in the runs container; the Durable instance completed.
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", FUNCTION_KEY)
    parent_id = "app-parent"
    now = datetime.now(UTC)
    parent = RunReport(
        run_id=parent_id,
        phase=RunPhase.COMPLETED,
        manifest="media/_manifests/app-parent/m.csv",
        total=3,
        succeeded=1,
        failed=2,
        invalid=0,
        started_at=now,
        finished_at=now,
        output_prefix=f"outputs/{parent_id}/",
        options=RunOptions(fps=2, max_nodes=7),
    )
    failed_csv = "id,video\nv2,https://acct.blob.core.windows.net/media/v2.mp4\n"
    failed_csv += "v3,https://acct.blob.core.windows.net/media/v3.mp4\n"
    blob_store.upload_bytes("runs", f"{parent_id}/report.json", parent.model_dump_json())
    blob_store.upload_bytes("runs", f"{parent_id}/failed.csv", failed_csv)
    start_instance(app, parent_id, OK_SCRIPT[-1:])
    app.report_base = azurite.blob_url

    code = cli.main(["retry", parent_id, "--app", app.url, "--no-follow", "--json"])

    out = capsys.readouterr().out
    assert code == 0, out
    ((_, run_id, client_input),) = app.durable.started
    request = client_input["request"]
    assert request["parent_run_id"] == parent_id
    assert request["manifest"] == f"media/_manifests/{run_id}/failed.csv"
    assert (request["options"]["fps"], request["options"]["max_nodes"]) == (2, 7)
    uploaded = blob_store.download_bytes("media", f"_manifests/{run_id}/failed.csv")
    assert uploaded.decode() == failed_csv
    assert json.loads(out.strip().splitlines()[-1])["parent_run_id"] == parent_id
