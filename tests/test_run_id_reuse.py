"""A run id already used in a storage account is refused, never mixed in.

The orchestrator claims its run id in storage when it starts (``runs/RUN_ID/claim.json``,
written only if absent, saying when the run started); a second run under the same id is
refused by its first activity, before it writes a chunk, a message or a record, and its
orchestration touches nothing the first run made: no teardown, no not_run records, no
report over the first run's. The local CLI refuses such an id before it starts anything.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from batchctl import cli, controller
from batchctl.activity_names import Activity
from batchctl.contracts import RunPhase, RunRequest
from batchctl.local.azurite import Azurite
from batchctl.services import Services
from batchctl.storage import BlobStore
from tests import worker_tasks
from tests.orchestration_harness import Script, run_script

pytestmark = pytest.mark.azurite


def test_a_claim_is_the_first_run_s_alone(
    services: Services, blob_store: BlobStore, run_id: str
) -> None:
    first = RunRequest(run_id=run_id, manifest="m.csv", claim=f"{run_id} started 1")
    second = first.model_copy(update={"claim": f"{run_id} started 2"})
    assert controller.claim_run_id(services, first)
    assert controller.claim_run_id(services, first)  # a retried activity: its own claim
    assert not controller.claim_run_id(services, second)
    summary = controller.validate_manifest(services, second)
    assert summary.run_id_taken and "already belongs to another run" in (summary.fatal or "")
    assert services.store.list_names(services.settings.runs_container, f"{run_id}/chunks/") == []
    with pytest.raises(controller.RunIdTakenError, match="choose another --run-id"):
        controller.check_run_id_free(services, run_id)


def test_a_refused_run_touches_nothing_of_the_first() -> None:
    script = Script(valid=0, fatal="run id run-1 already belongs to another run")
    script.run_id_taken = True
    report, _ = run_script(script)
    assert report.phase is RunPhase.FAILED
    assert "already belongs to another run" in report.message
    # No teardown (the compute and queue are the other run's), no records, no report write.
    assert script.calls == [Activity.VALIDATE_MANIFEST]


def test_the_orchestrator_claims_its_id_with_its_start() -> None:
    script = Script()
    run_script(script)
    assert script.requests[0].claim is not None
    assert script.requests[0].claim.startswith("run-1 started ")


def test_the_cli_refuses_a_run_id_used_in_this_storage(
    tmp_path: Path,
    azurite: Azurite,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.05")
    (tmp_path / "a.mp4").write_bytes(b"a")
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["video"], ["a.mp4"]])
    argv = [
        "run",
        str(manifest),
        "--run-id",
        "reused-id",
        "--nodes",
        "1",
        "--task",
        "tests.worker_tasks:QuickTask",
        "--poll",
        "0.3",
        "--idle-exit",
        "0.5",
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()
    # Into the same folder, the folder's record refuses it first (the run finished there).
    assert cli.main(argv) == 3
    assert "run reused-id in" in capsys.readouterr().err
    # Into another folder, the storage's claim on the id refuses it.
    out = argv.index("--out") + 1
    assert cli.main([*argv[:out], str(tmp_path / "elsewhere"), *argv[out + 1 :]]) == 3
    captured = capsys.readouterr()
    assert "reused-id already belongs to another run" in captured.err
    assert "Traceback" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["flag"] == "--run-id"
