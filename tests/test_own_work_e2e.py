"""The user's own work, end to end, through the client path a deployed run uses.

`batchctl serve` (the app on this machine) and `batchctl submit --app http://127.0.0.1:PORT`
as two processes: a custom task from a code folder that imports a helper module of its own
and loads its own .keras model given by --model, over real encoded videos. The user's folder
and model are moved away once submit has uploaded them: the nodes never read them. Two runs
whose packages hold a module of the same name each import their own.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchctl.local.azurite import free_port
from batchctl.local.samples import encode_sample
from tests.test_serve import REPO, Served, clean_env, http, start_server, stop_server
from tests.worker_tasks import save_tiny_model

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

MODEL_SIZE = 32
TASK = "mywork.task:MyTask"
TASK_SOURCE = '''"""A user's task: the built-in features, plus a summary made by its own helper."""

from node_image.worker.tasks import ItemInput, ItemOutput
from node_image.worker.tasks.features import FeaturesTask

from mywork.helpers import summary


class MyTask(FeaturesTask):
    def process(self, item: ItemInput) -> ItemOutput:
        out = super().process(item)
        files = {**out.files, "summary.txt": summary(item.item.item_id).encode()}
        return ItemOutput(files=files, metadata=out.metadata)
'''


def _user_work(folder: Path, signature: str) -> Path:
    package = folder / "mywork"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(
        f"SIGNATURE = {signature!r}\n\n\ndef summary(item_id: str) -> str:\n"
        "    return f'{SIGNATURE}:{item_id}'\n"
    )
    (package / "task.py").write_text(TASK_SOURCE)
    (folder / "notes.log").write_text("not for the fleet")
    (folder / ".batchctlignore").write_text("*.log\n")
    save_tiny_model(folder / "tiny.keras", MODEL_SIZE)
    return folder


def _submit(
    served: Served, manifest: Path, work: Path, run_id: str
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "batchctl", "submit", str(manifest),
        "--app", served.url, "--blob-url", str(served.ready["blob_url"]),
        "--run-id", run_id, "--code", str(work), "--task", TASK,
        "--model", str(work / "tiny.keras"), "--frame-size", str(MODEL_SIZE),
        "--poll", "0.3", "--idle-exit", "0.5", "--no-follow", "--json",
    ]  # fmt: skip
    env = clean_env(BATCHCTL_STORAGE_AUTH="azurite")
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _wait_for(served: Served, run_id: str, timeout_s: float = 240) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _, body = http("GET", f"{served.url}/api/runs/{run_id}")
        if status == 200 and body["runtime_status"] not in ("Pending", "Running"):
            return dict(body)
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end:\n{served.log()}")


def test_a_users_code_and_model_run_on_the_app_and_never_read_the_users_disk(
    tmp_path: Path,
) -> None:
    served = start_server(tmp_path / "serve", free_port(), (free_port(), free_port(), free_port()))
    try:
        for index in range(2):
            encode_sample(served.media / "videos" / f"own{index}.mp4", "testsrc2", 2, "160x120")
        manifest = tmp_path / "manifest.csv"
        with manifest.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "video"])
            writer.writerows([["clip-0", "videos/own0.mp4"], ["clip-1", "videos/own1.mp4"]])
        first = _user_work(tmp_path / "user-one", "package-one")
        second = _user_work(tmp_path / "user-two", "package-two")

        started = {run: _submit(served, manifest, work, run)
                   for run, work in (("own-one", first), ("own-two", second))}  # fmt: skip
        for run, answer in started.items():
            assert answer.returncode == 0, f"{run}: {answer.stderr}"
            assert json.loads(answer.stdout.strip().splitlines()[-1])["run_id"] == run
        # Uploaded: the user's folders and models can go; the nodes read only the copies.
        for work in (first, second):
            work.rename(work.with_name(work.name + "-moved"))

        blobs = served.blobs()
        for run, signature in (("own-one", "package-one"), ("own-two", "package-two")):
            status = _wait_for(served, run)
            assert (status["phase"], status["succeeded"], status["failed"]) == (
                "completed", 2, 0,
            ), served.log()  # fmt: skip
            outputs = blobs.get_container_client("outputs")
            for item in ("clip-0", "clip-1"):
                prefix = f"{run}/items/{item}/"
                names = {blob.name.removeprefix(prefix) for blob in outputs.list_blobs(prefix)}
                assert {"features.npz", "summary.txt", "metadata.json"} <= names
                summary = outputs.download_blob(prefix + "summary.txt").readall().decode()
                assert summary == f"{signature}:{item}"  # this run's own helper module
                metadata = json.loads(outputs.download_blob(prefix + "metadata.json").readall())
                ran = metadata["ran"]
                assert ran["task"] == TASK
                assert ran["code"].startswith("sha256:") and ran["code"].endswith("/code.zip")
                assert ran["model"].startswith("sha256:") and ran["model"].endswith("/tiny.keras")
            # The run's options hold references, never the user's paths.
            report = json.loads(
                blobs.get_container_client("runs").download_blob(f"{run}/report.json").readall()
            )
            assert str(tmp_path) not in json.dumps(report["options"])
        # Two packages: two code references, and neither carries the ignored notes.
        first_ref = json.loads(
            outputs.download_blob("own-one/items/clip-0/metadata.json").readall()
        )["ran"]["code"]
        second_ref = json.loads(
            outputs.download_blob("own-two/items/clip-0/metadata.json").readall()
        )["ran"]["code"]
        assert first_ref != second_ref
    finally:
        stop_server(served)
