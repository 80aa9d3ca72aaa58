"""`batchctl serve` end to end, driven by clients nobody here wrote.

One server process (its own Azurite on free ports, one worker process as the node, the fast
``tests.worker_tasks:QuickTask``) serves the module's tests; they talk to it with urllib
(httpx is not installed), the azure-storage-blob SDK from the printed connection string,
the Durable SDK's own status model, azure-cli (installed into a venv of its own when it can
be), headless Chromium, and the project's own CLI client. A second server on Azurite's and
the Functions host's default ports shows ``UseDevelopmentStorage=true`` reaching it.

The last test stops the module's server with Ctrl-C (SIGINT) while a run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from azure.durable_functions.models.DurableOrchestrationStatus import DurableOrchestrationStatus
from azure.durable_functions.models.OrchestrationRuntimeStatus import OrchestrationRuntimeStatus
from azure.storage.blob import BlobServiceClient
from PIL import Image

from batchctl.client import AppClient
from batchctl.local.azurite import _port_open, free_port
from batchctl.runids import run_id_for_blob
from batchctl.runstatus import RunStatus
from tests.test_faults import worker_pids
from tests.worker_tasks import ITEM_SECONDS_ENV

pytestmark = [pytest.mark.azurite, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DURABLE_KEYS = {
    "id",
    "statusQueryGetUri",
    "sendEventPostUri",
    "terminatePostUri",
    "rewindPostUri",
    "purgeHistoryDeleteUri",
    "restartPostUri",
    "suspendPostUri",
    "resumePostUri",
}
ITEM_SECONDS = "0.3"
AZ_VENV = REPO / ".venv" / "azure-cli"
AZ_STAMP = AZ_VENV / ".installed"


# -- the server ----------------------------------------------------------------------------------
@dataclass
class Served:
    process: subprocess.Popen[bytes]
    ready: dict[str, Any]
    media: Path
    out: Path
    stderr: Path

    @property
    def url(self) -> str:
        return str(self.ready["app_url"])

    def blobs(self) -> BlobServiceClient:
        return BlobServiceClient.from_connection_string(self.ready["connection_string"])

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchctl", "serve", *args]


def clean_env(**extra: str) -> dict[str, str]:
    # No BATCHCTL_* from the test session: the server starts its own Azurite.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCTL_")}
    env.update({ITEM_SECONDS_ENV: ITEM_SECONDS, "PYTHONUNBUFFERED": "1", **extra})
    return env


def start_server(
    folder: Path, port: int, storage_ports: tuple[int, int, int], **env: str
) -> Served:
    media = folder / "media-root"
    (media / "videos").mkdir(parents=True, exist_ok=True)
    stderr = folder / "serve.log"
    command = serve_command(
        "--port", str(port),
        "--storage-ports", ",".join(map(str, storage_ports)),
        "--media-root", str(media),
        "--nodes", "1",
        "--out", str(folder / "out"),
        "--max-runs", "3",
        "--trigger-interval", "0.5",
        "--task", "tests.worker_tasks:QuickTask",
        "--poll", "0.3",
        "--idle-exit", "0.5",
        "--json",
    )  # fmt: skip
    with stderr.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, env=clean_env(**env)
        )
    assert process.stdout is not None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.5)
        if readable:
            line = process.stdout.readline()
            if line:
                return Served(process, json.loads(line), media, folder / "out", stderr)
        if process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"serve did not get ready:\n{stderr.read_text(errors='replace')}")


def stop_server(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGINT)
        try:
            served.process.wait(60)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ports = (free_port(), free_port(), free_port())
    served = start_server(tmp_path_factory.mktemp("serve"), free_port(), ports)
    try:
        yield served
    finally:
        stop_server(served)


# -- clients ------------------------------------------------------------------------------
def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request with urllib; (status, lower-cased headers, JSON body or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, raw, got = answer.status, answer.read(), answer.headers
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), error.headers
    lowered = {k.lower(): v for k, v in got.items()}
    if "json" in lowered.get("content-type", "") and raw:
        return status, lowered, json.loads(raw)
    return status, lowered, raw


def write_manifest(served: Served, name: str, count: int) -> bytes:
    """A manifest of ``count`` local videos under the server's --media-root."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "video"])
    for index in range(count):
        video = served.media / "videos" / f"{name}-{index}.mp4"
        video.write_bytes(f"{name} {index}".encode())
        writer.writerow([f"{name}-{index}", f"videos/{video.name}"])
    return out.getvalue().encode()


def post_run(served: Served, run_id: str, count: int, **options: Any) -> dict[str, Any]:
    """Upload a manifest (storage SDK) outside the trigger's container and POST the run."""
    blob = f"_manifests/{run_id}.csv"
    served.blobs().get_blob_client("media", blob).upload_blob(
        write_manifest(served, run_id, count), overwrite=True
    )
    body = {
        "manifest": f"media/{blob}",
        "run_id": run_id,
        "options": {
            "task": "tests.worker_tasks:QuickTask",
            "poll_interval_s": 0.3,
            "idle_exit_s": 0.5,
            **options,
        },
    }
    status, headers, answer = http("POST", f"{served.url}/api/runs", body)
    assert status == 202, answer
    assert headers["location"] == answer["statusQueryGetUri"]
    return dict(answer)


def follow(url: str, *, until: float = 60.0) -> tuple[int, dict[str, Any]]:
    """Follow a Durable status URL as its clients do: 202 while running, then 200."""
    deadline = time.monotonic() + until
    while True:
        status, headers, body = http("GET", url)
        assert status in (200, 202), body
        if status == 200:
            return status, body
        assert headers["location"], "202 without a Location to poll"
        assert time.monotonic() < deadline, f"still {body['runtimeStatus']}: {body}"
        url = headers["location"]
        time.sleep(0.3)


def run_status(served: Served, run_id: str) -> RunStatus:
    status, _, body = http("GET", f"{served.url}/api/runs/{run_id}")
    assert status == 200, body
    return RunStatus.model_validate(body)


def trigger_run_id(blob: str, etag: str) -> str:
    # The server's trigger reads ETags from the container listing, which spells them without
    # the quotes that an upload's answer has (as `batchctl watch` does).
    return run_id_for_blob(blob, etag.strip('"'))


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# -- POST /api/runs and the status URL ---------------------------------------------------------
def test_post_then_follow_the_status_url_to_completed(server: Served) -> None:
    started = post_run(server, "serve-post", 6)

    assert set(started) >= DURABLE_KEYS
    assert started["id"] == "serve-post"
    assert all(str(started[k]).startswith(server.url) for k in DURABLE_KEYS - {"id"})
    _, body = follow(started["statusQueryGetUri"])

    assert body["runtimeStatus"] == "Completed"
    assert {"name", "instanceId", "input", "customStatus", "output", "createdTime"} <= set(body)
    assert body["lastUpdatedTime"]
    custom = body["customStatus"]
    assert (custom["total"], custom["succeeded"], custom["failed"]) == (6, 6, 0)
    assert body["output"]["succeeded"] == 6  # the run's report, as the orchestrator returned it
    # The Durable SDK's own status model reads the body as it reads the real extension's.
    parsed = DurableOrchestrationStatus.from_json(body)
    assert parsed.runtime_status is OrchestrationRuntimeStatus.Completed
    assert parsed.instance_id == "serve-post" and parsed.name == "run_orchestrator"
    assert parsed.custom_status["succeeded"] == 6
    assert parsed.created_time is not None and parsed.input_["run_id"] == "serve-post"

    # The project's run-status contract: this server's GET /api/runs/{id} and the CLI client.
    friendly = run_status(server, "serve-post")
    assert (friendly.phase, friendly.succeeded, friendly.percent) == ("completed", 6, 100.0)
    assert friendly.report and friendly.report.endswith("/runs/serve-post/report.json")
    assert AppClient(server.url, None).get_status("serve-post") == friendly
    _, _, listed = http("GET", f"{server.url}/api/runs")
    assert "serve-post" in [run["run_id"] for run in listed["runs"]]
    # The report's files.
    code, headers, report = http("GET", f"{server.url}/runs/serve-post/report.json")
    assert code == 200 and report["succeeded"] == 6
    code, headers, html = http("GET", f"{server.url}/runs/serve-post/report.html")
    assert code == 200 and headers["content-type"].startswith("text/html") and b"<html" in html


# -- the dashboard, in a browser ---------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium: run `bash scripts/ensure-chromium.sh` (make test does)")


def chromium(url: str, profile: Path, *args: str) -> str:
    completed = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            # Lets the page's script fetch and draw (virtual time waits for the network).
            "--virtual-time-budget=1500",
            *args,
            url,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return completed.stdout.decode(errors="replace")


def run_card(dom: str, run_id: str) -> dict[str, str]:
    """The run's section of the dumped DOM: its data attributes and text."""
    from html.parser import HTMLParser

    found: dict[str, str] = {}

    class Parser(HTMLParser):
        depth = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            values = dict(attrs)
            if tag == "section" and values.get("data-run-id") == run_id:
                found.update({k: v or "" for k, v in values.items()})
                found["text"] = ""
                self.depth = 1
            elif self.depth and tag == "section":
                self.depth += 1

        def handle_endtag(self, tag: str) -> None:
            if self.depth and tag == "section":
                self.depth -= 1

        def handle_data(self, data: str) -> None:
            if self.depth:
                found["text"] += data

    Parser().feed(dom)
    assert found, f"no card for {run_id} in the page"
    return found


def not_blank(png: Path) -> None:
    with Image.open(png) as shot:
        pixels = np.asarray(shot.convert("RGB")).astype(int)
    assert (pixels != pixels[0, 0]).any(), "the screenshot is one flat colour"
    # The progress bar's blue (#2f80ed) is drawn: the run's card really rendered.
    blue = np.abs(pixels - np.array([0x2F, 0x80, 0xED])).sum(axis=2) < 30
    assert blue.sum() > 200, f"only {blue.sum()} progress-bar pixels"


def test_the_dashboard_shows_a_run_live_and_after_it(server: Served, tmp_path: Path) -> None:
    run_id = "serve-dash"
    post_run(server, run_id, 60)
    wait_for(
        lambda: (s := run_status(server, run_id)).phase == "running" and s.succeeded >= 1,
        "the run to be running with items done",
    )
    page = f"{server.url}/"

    first = run_card(chromium(page, tmp_path / "p1", "--dump-dom"), run_id)
    shot = tmp_path / "during.png"
    chromium(page, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1000,900")
    second = run_card(chromium(page, tmp_path / "p3", "--dump-dom"), run_id)

    assert first["data-phase"] == "running"
    assert first["data-total"] == "60" and run_id in first["text"]
    assert "running" in first["text"] and "/60 done" in first["text"]
    assert int(second["data-done"]) > int(first["data-done"]), (first, second)
    not_blank(shot)

    follow(f"{server.url}/runtime/webhooks/durabletask/instances/{run_id}")
    after = run_card(chromium(page, tmp_path / "p4", "--dump-dom"), run_id)
    assert (after["data-phase"], after["data-done"]) == ("completed", "60")
    assert "60/60 done (100%)" in after["text"] and "report" in after["text"]
    assert "Per node" in after["text"]
    shot_after = tmp_path / "after.png"
    chromium(page, tmp_path / "p5", f"--screenshot={shot_after}", "--window-size=1000,900")
    not_blank(shot_after)

    # Self-contained: the page names no other origin, and its policy lets it load nothing.
    status, headers, html = http("GET", page)
    assert status == 200
    named = html.replace(b"http://www.w3.org/2000/svg", b"")  # SVG's namespace, not a load
    assert b"http://" not in named and b"https://" not in named
    assert "default-src 'none'" in headers["content-security-policy"]


# -- the blob trigger ----------------------------------------------------------------------------
def test_a_manifest_uploaded_with_the_storage_sdk_starts_one_run(server: Served) -> None:
    blobs = server.blobs()  # from the printed connection string, as any tool would
    account = server.ready["blob_url"]
    rows = ["id,video"]
    for index in range(4):
        name = f"trigger/v{index}.mp4"
        blobs.get_blob_client("media", name).upload_blob(b"v%d" % index, overwrite=True)
        rows.append(f"t{index},{account}/media/{name}")
    uploaded = blobs.get_blob_client("manifests", "sdk-upload.csv").upload_blob(
        ("\n".join(rows) + "\n").encode(), overwrite=True
    )
    expected = trigger_run_id("manifests/sdk-upload.csv", str(uploaded["etag"]))

    _, body = follow(
        wait_for(
            lambda: (
                http("GET", f"{server.url}/api/runs/{expected}")[0] == 200
                and f"{server.url}/runtime/webhooks/durabletask/instances/{expected}"
            ),
            "the trigger to start the run",
            timeout=30,
        )
    )

    assert body["customStatus"]["succeeded"] == 4
    time.sleep(1.2)  # two more looks at the container: the same version starts nothing new
    _, _, listed = http("GET", f"{server.url}/api/runs")
    from_trigger = [r for r in listed["runs"] if r["run_id"].startswith("m-")]
    assert [r["run_id"] for r in from_trigger] == [expected]


def _azure_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """azure-cli: from PATH, or installed once into .venv/azure-cli (about a minute)."""
    found = shutil.which("az")
    if found:
        return Path(found)
    az = AZ_VENV / "bin" / "az"
    if AZ_STAMP.exists() and az.exists():
        return az
    shutil.rmtree(AZ_VENV, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(AZ_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(AZ_VENV / "bin" / "pip"), "install", "--quiet", "azure-cli>=2.60,<3"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        output = getattr(error, "stderr", b"") or b""
        pytest.skip(f"azure-cli could not be installed here: {output.decode()[-500:]}")
    AZ_STAMP.write_text("azure-cli\n")
    return az


@pytest.fixture(scope="module")
def az(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _azure_cli(tmp_path_factory)


def az_upload(az: Path, tmp: Path, data: bytes, name: str, *connection: str) -> None:
    source = tmp / name
    source.write_bytes(data)
    env = {
        **clean_env(),
        "AZURE_CONFIG_DIR": str(tmp / "az-config"),
        "AZURE_CORE_COLLECT_TELEMETRY": "false",
        "AZURE_CORE_NO_COLOR": "true",
    }
    completed = subprocess.run(
        [str(az), "storage", "blob", "upload", "--only-show-errors", "--overwrite",
         "--container-name", "manifests", "--name", name, "--file", str(source), *connection],
        capture_output=True,
        timeout=120,
        env=env,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-2000:]


def test_az_storage_blob_upload_with_the_printed_connection_string_starts_a_run(
    server: Served, az: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(server, "az", 3)

    az_upload(
        az, tmp_path, manifest, "az-upload.csv", "--connection-string",
        server.ready["connection_string"],
    )  # fmt: skip

    properties = server.blobs().get_blob_client("manifests", "az-upload.csv").get_blob_properties()
    expected = trigger_run_id("manifests/az-upload.csv", str(properties.etag))
    url = f"{server.url}/runtime/webhooks/durabletask/instances/{expected}"
    wait_for(lambda: http("GET", url)[0] in (200, 202), "the trigger to start the run", 30)
    _, body = follow(url)
    assert (body["runtimeStatus"], body["customStatus"]["succeeded"]) == ("Completed", 3)


# -- terminate and cancel ----------------------------------------------------------------------
def test_terminate_ends_the_instance_and_the_run_is_torn_down(server: Served) -> None:
    run_id = "serve-terminate"
    started = post_run(server, run_id, 40)
    wait_for(lambda: run_status(server, run_id).succeeded >= 2, "items to finish")

    status, _, _ = http("POST", started["terminatePostUri"].replace("{text}", "test"), b"")
    assert status == 202
    # Terminated at once, as Durable answers; then the server closes the run as the sweeper
    # would in Azure: compute gone, unfinished items recorded, report written.
    _, body = follow(started["statusQueryGetUri"], until=5)
    assert body["runtimeStatus"] == "Terminated"
    report = wait_for(
        lambda: (
            (got := http("GET", f"{server.url}/runs/{run_id}/report.json"))[0] == 200 and got[2]
        ),
        "the terminated run's report",
        timeout=60,
    )
    assert report["phase"] == "cancelled" and report["not_run"] > 0
    assert report["succeeded"] + report["failed"] + report["not_run"] == 40
    assert report["not_run_by_reason"] == {"RunTerminated": report["not_run"]}
    assert wait_for(lambda: worker_pids(run_id) == [], "the run's workers to stop", 20)
    assert run_status(server, run_id).phase == "cancelled"
    again, _, _ = http("POST", started["terminatePostUri"].replace("{text}", "x"), b"")
    assert again == 410


def test_cancel_sets_the_durable_flag_and_the_run_tears_down(server: Served) -> None:
    run_id = "serve-cancel"
    post_run(server, run_id, 40)
    wait_for(lambda: run_status(server, run_id).succeeded >= 2, "items to finish")

    status, _, body = http("POST", f"{server.url}/api/runs/{run_id}/cancel", b"")

    assert status == 202 and body["cancel"] == "requested"
    flag = server.blobs().get_blob_client("runs", f"{run_id}/cancel-requested")
    assert flag.exists()  # the durable flag, written before the event
    _, final = follow(f"{server.url}/runtime/webhooks/durabletask/instances/{run_id}")
    assert final["runtimeStatus"] == "Completed" and final["output"]["phase"] == "cancelled"
    assert final["output"]["not_run_by_reason"] == {"RunCancelled": final["output"]["not_run"]}
    assert worker_pids(run_id) == []
    again, _, body = http("POST", f"{server.url}/api/runs/{run_id}/cancel", b"")
    assert again == 409 and "already ended" in body["error"]


# -- bad requests --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "(body)"),
        ({"options": {}}, "manifest"),
        ({"manifest": "media/m.csv", "options": {"fps": -1}}, "options.fps"),
        ({"manifest": "media/m.csv", "run_id": "Bad_Id"}, "run_id"),
        ({"manifest": "media/m.csv", "surprise": 1}, "surprise"),
        ({"manifest": "runs/other-run/report.json"}, "manifest"),
        ({"manifest": "outputs/x.csv"}, "manifest"),
        ({"manifest": "https://elsewhere.blob.core.windows.net/media/m.csv"}, "manifest"),
    ],
)
def test_a_bad_start_is_400_naming_the_field(server: Served, body: Any, field: str) -> None:
    status, _, answer = http("POST", f"{server.url}/api/runs", body)
    assert status == 400, answer
    assert field in [problem["field"] for problem in answer["problems"]], answer


def test_unknown_runs_are_404_everywhere(server: Served) -> None:
    durable = f"{server.url}/runtime/webhooks/durabletask/instances/no-such-run"
    for method, url in [
        ("GET", f"{server.url}/api/runs/no-such-run"),
        ("POST", f"{server.url}/api/runs/no-such-run/cancel"),
        ("GET", durable),
        ("POST", f"{durable}/terminate"),
        ("GET", f"{server.url}/runs/no-such-run/report.json"),
    ]:
        status, _, body = http(method, url, b"" if method == "POST" else None)
        assert status == 404, (method, url, body)


def test_listing_checks_its_query_and_cross_origin_writes_are_refused(server: Served) -> None:
    status, _, body = http("GET", f"{server.url}/api/runs?limit=0")
    assert status == 400 and body["problems"][0]["field"] == "limit"
    # A web page in this machine's browser must not start runs on the loopback server.
    status, _, body = http(
        "POST", f"{server.url}/api/runs", {"manifest": "media/m.csv"},
        {"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )  # fmt: skip
    assert status == 403
    status, _, _ = http("GET", f"{server.url}/api/runs", None, {"Host": "evil.example"})
    assert status == 403


def test_a_non_loopback_bind_without_a_key_is_refused_at_start(tmp_path: Path) -> None:
    started = time.monotonic()
    completed = subprocess.run(
        serve_command("--host", "0.0.0.0", "--port", str(free_port()), "--json"),
        cwd=REPO,
        capture_output=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert completed.returncode == 3
    err = completed.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    assert "--host" in err and "BATCHCTL_FUNCTION_KEY" in err
    assert json.loads(completed.stdout.decode().splitlines()[-1])["exit_code"] == 3
    assert time.monotonic() - started < 30  # refused before any storage was started


# -- default ports: UseDevelopmentStorage=true -------------------------------------------------
def test_use_development_storage_reaches_the_server_on_the_default_ports(
    tmp_path: Path, az: Path
) -> None:
    ports = (10000, 10001, 10002)
    busy = [port for port in (*ports, 7071) if _port_open(port)]
    if busy:
        pytest.skip(f"default port {busy[0]} is in use on this machine (another Azurite?)")
    served = start_server(tmp_path, 7071, ports)
    try:
        assert served.ready["development_storage"] is True
        assert served.url == "http://127.0.0.1:7071"
        sdk = BlobServiceClient.from_connection_string("UseDevelopmentStorage=true")
        sdk.get_blob_client("manifests", "devstore-sdk.csv").upload_blob(
            write_manifest(served, "dev-sdk", 2), overwrite=True
        )
        az_upload(
            az, tmp_path, write_manifest(served, "dev-az", 2), "devstore-az.csv",
            "--connection-string", "UseDevelopmentStorage=true",
        )  # fmt: skip
        for name in ("devstore-sdk.csv", "devstore-az.csv"):
            etag = sdk.get_blob_client("manifests", name).get_blob_properties().etag
            run_id = trigger_run_id(f"manifests/{name}", str(etag))
            url = f"{served.url}/runtime/webhooks/durabletask/instances/{run_id}"
            wait_for(lambda u=url: http("GET", u)[0] in (200, 202), f"a run for {name}", 30)
            _, body = follow(url)
            assert body["customStatus"]["succeeded"] == 2, body
    finally:
        stop_server(served)
    assert served.process.returncode == 0, served.log()


# -- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_cancels_live_runs_with_teardown_and_stops(server: Served) -> None:
    run_id = "serve-ctrl-c"
    post_run(server, run_id, 60)
    wait_for(lambda: run_status(server, run_id).succeeded >= 1, "items to finish")

    server.process.send_signal(signal.SIGINT)
    code = server.process.wait(60)

    assert code == 0, server.log()
    assert server.process.stdout is not None
    stopped = json.loads(server.process.stdout.read().decode().strip().splitlines()[-1])
    assert stopped["event"] == "stopped" and run_id in stopped["cancelled"], stopped
    assert worker_pids(run_id) == []
    blob_port = int(server.ready["blob_url"].rsplit(":", 1)[1].split("/")[0])
    assert not _port_open(blob_port), "Azurite still answers"
    assert f"run {run_id} ended: cancelled" in server.log()
    # Torn down and reported like any cancel: every item has its record.
    report = json.loads((server.out / run_id / "report.json").read_text())
    assert report["phase"] == "cancelled"
    assert report["succeeded"] + report["failed"] + report["not_run"] == 60


# -- a key ---------------------------------------------------------------------------------------
def test_with_a_key_every_route_but_the_page_needs_it(
    storage_settings: Any, tmp_path: Path
) -> None:
    """In-process on the session's Azurite, bound to every address as a shared machine
    would be: the key travels in x-functions-key, as to the deployed app."""
    import threading

    from batchctl.client import RunNotFoundError
    from batchctl.local.server import LocalDurableClient, ServeHTTPServer
    from batchctl.local.session import local_session

    with local_session(
        media_root=tmp_path, nodes=1, log_dir=tmp_path / "logs", storage=storage_settings
    ) as services:
        client = LocalDurableClient(services, base_url="http://127.0.0.1", out_dir=tmp_path)
        httpd = ServeHTTPServer(("0.0.0.0", 0), client, key="s3cret")
        thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
            durable = f"{url}/runtime/webhooks/durabletask/instances/x"
            for path in ("/api/runs", "/api/runs/x", "/dashboard/data", durable[len(url) :]):
                assert http("GET", url + path)[0] == 401, path
                assert http("GET", url + path, None, {"x-functions-key": "wrong"})[0] == 401
            assert http("GET", f"{url}/api/runs", None, {"x-functions-key": "s3cret"})[0] == 200
            assert http("GET", f"{url}/")[0] == 200  # the page asks for the key itself
            with pytest.raises(RunNotFoundError):  # the CLI client sends the key: a real 404
                AppClient(url, "s3cret").get_status("no-such-run")
        finally:
            httpd.shutdown()
            httpd.server_close()
