"""Storage that misbehaves: throttling spells, resets and latency, through a fault proxy.

The retry policy (batchctl/storage/retry.py) is declared once and built into every client
(batchctl/storage/clients.py); these tests hold that, drive the SDKs' real retry code
through tests/faultproxy.py in front of the session's Azurite, and show a finished run's
copy-out and a whole `batchctl run` surviving what the proxy does to them.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError, ServiceResponseError

from batchctl import controller
from batchctl.compute.local import LocalBackend
from batchctl.contracts import ItemResult, ItemStatus, RunOptions, StageTimings
from batchctl.local.azurite import Azurite
from batchctl.local.session import local_settings
from batchctl.logs import bound
from batchctl.services import Services, build_services
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger, RunQueues, retry
from batchctl.storage.faults import SDK_FAULT_LOGGERS
from node_image.worker.policy import renew_interval
from tests import worker_tasks
from tests.faultproxy import (
    BUSY_MESSAGE,
    Faults,
    Request,
    StorageProxies,
    Weather,
    busy_response,
)

pytestmark = pytest.mark.azurite

ROOT = Path(__file__).resolve().parent.parent
FACTORY = "batchctl/storage/clients.py"


# -- the one policy ---------------------------------------------------------------------
def test_one_declaration_gives_every_package_and_role_a_bound_in_time() -> None:
    packages: tuple[retry.Package, ...] = ("blob", "queue", "table")
    for package in packages:
        ordinary = retry.retry_bounds(package)
        patient = retry.retry_bounds(package, "copy_out")
        assert ordinary.budget_s == retry.SDK_RETRY_BUDGET_S[package]
        assert patient.budget_s == ordinary.budget_s * retry.ROLE_PATIENCE["copy_out"]
        assert patient.retries == ordinary.retries * retry.ROLE_PATIENCE["copy_out"]
        # Enough retries that the budget, not the count, ends a spell (backoffs at a
        # quarter of their ceilings, half of what full jitter averages, still fill it).
        quarter = sum(
            min(ordinary.backoff_cap_s, ordinary.initial_backoff_s * 2**n) / 4
            for n in range(ordinary.retries)
        )
        assert quarter >= ordinary.budget_s
    # A worker's loop thread must renew each message's visibility before it reappears: one
    # queue or table call, at its worst, ends inside that margin (default visibility).
    visibility = RunOptions().visibility_timeout_s
    margin = visibility - renew_interval(visibility)
    assert retry.retry_bounds("queue").worst_case_s < margin
    assert retry.retry_bounds("table").worst_case_s < margin


# Constructors and factory methods of the storage SDKs' clients, sync and aio alike.
CLIENT_NAMES = {
    "BlobServiceClient",
    "ContainerClient",
    "BlobClient",
    "QueueServiceClient",
    "QueueClient",
    "TableServiceClient",
    "TableClient",
    "DataLakeServiceClient",
    "ShareServiceClient",
}
FACTORY_METHODS = {
    "from_connection_string",
    "from_blob_url",
    "from_container_url",
    "from_queue_url",
    "from_table_url",
    "from_share_url",
    "from_file_url",
}


def client_constructions(source: str, label: str) -> list[str]:
    """Where ``source`` builds a storage client: a call of a client class (also aliased on
    import, as the aio clients usually are, or subclassed) or of their factory methods."""
    tree = ast.parse(source)
    aliases = set(CLIENT_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("azure.storage", "azure.data")
        ):
            aliases.update(a.asname for a in node.names if a.name in CLIENT_NAMES and a.asname)
    # A subclass of a client is a client too.
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            }
            if bases & aliases:
                aliases.add(node.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name in aliases or (isinstance(func, ast.Attribute) and name in FACTORY_METHODS):
            found.append(f"{label}:{node.lineno} {name}(...)")
    return found


def test_no_storage_client_is_built_outside_the_factory() -> None:
    # Production code only: tests build raw clients on purpose to look at Azurite directly.
    patterns = (
        "batchctl/**/*.py",
        "node_image/**/*.py",
        "orchestrators/*.py",
        "activities/*.py",
        "bench/**/*.py",
        "*.py",
    )
    files = sorted({p for pattern in patterns for p in ROOT.glob(pattern)})
    assert ROOT / FACTORY in files
    outside = [
        where
        for path in files
        if path.relative_to(ROOT).as_posix() != FACTORY
        for where in client_constructions(
            path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()
        )
    ]
    assert outside == []
    # The check sees constructions at all: the factory's own are found.
    factory = (ROOT / FACTORY).read_text(encoding="utf-8")
    assert len(client_constructions(factory, FACTORY)) >= 3


def test_the_scan_finds_aliased_aio_clients_and_factory_methods() -> None:
    sample = (
        "from azure.storage.blob.aio import BlobServiceClient as Aio\n"
        "from azure.data.tables import TableServiceClient\n"
        "a = Aio('http://x')\n"
        "b = TableServiceClient.from_connection_string('x')\n"
        "c = TableServiceClient(endpoint='x')\n"
        "class Mine(TableServiceClient): pass\n"
        "d = Mine(endpoint='x')\n"
    )
    found = client_constructions(sample, "sample.py")
    assert found == [
        "sample.py:3 Aio(...)",
        "sample.py:4 from_connection_string(...)",
        "sample.py:5 TableServiceClient(...)",
        "sample.py:7 Mine(...)",
    ]


# -- the proxy itself ---------------------------------------------------------------------
def _request(method: str = "GET", path: str = "/devstoreaccount1/c/b") -> Request:
    return Request(service="blob", method=method, path=path, query="", headers={})


def test_the_weather_is_seeded_and_draws_the_shares_it_was_given() -> None:
    faults = Faults(busy=0.2, reset_before=0.1, reset_during=0.1, reset_after=0.05)
    runs = []
    for seed in (7, 7, 8):
        weather = Weather(faults, seed=seed)
        runs.append([weather.decide(_request()).outcome for _ in range(4000)])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    shares: dict[str, float] = {name: runs[0].count(name) / 4000 for name in set(runs[0])}
    for name, share in (("busy", 0.2), ("reset_before", 0.1), ("reset_after", 0.05)):
        assert abs(shares[name] - share) < 0.03, shares
    with pytest.raises(ValueError, match="sum"):
        Faults(busy=0.7, reset_after=0.5)


def test_each_kind_hits_within_its_first_requests_however_rare_its_share() -> None:
    """Faults.each_within: a test that demands every kind gets every kind, whatever order
    its threads send their requests in; the places are seeded, and spared requests don't
    count."""
    faults = Faults(
        busy=0.001,
        reset_before=0.001,
        reset_during=0.001,
        reset_after=0.001,
        each_within=12,
        spare=lambda r: r.method == "GET",
    )
    for seed in range(40):
        weather = Weather(faults, seed=seed)
        spared = [weather.decide(_request("GET")).outcome for _ in range(5)]
        first = [weather.decide(_request("PUT")).outcome for _ in range(12)]
        assert spared == ["pass"] * 5
        assert set(first) - {"pass"} == set(faults.kinds()), first
        again = Weather(faults, seed=seed)
        assert [again.decide(_request(m)).outcome for m in ["GET"] * 5 + ["PUT"] * 12] == (
            spared + first
        )
    # A new set of faults gets sure places of its own, counted from its first request.
    weather.faults = Faults(reset_after=0.001, each_within=3)
    assert "reset_after" in [weather.decide(_request("PUT")).outcome for _ in range(3)]
    with pytest.raises(ValueError, match="no room"):
        Faults(busy=0.1, reset_after=0.1, each_within=1)


def test_spared_requests_are_never_faulted_at_random_but_spells_take_everything() -> None:
    weather = Weather(Faults(busy=1.0, spare=lambda r: r.method == "GET"), seed=1)
    assert weather.decide(_request("GET")).outcome == "pass"
    assert weather.decide(_request("PUT")).outcome == "busy"
    weather.spell(0.3)
    assert weather.decide(_request("GET")).outcome == "busy"
    time.sleep(0.35)
    assert weather.decide(_request("GET")).outcome == "pass"
    # A spell that starts at the first request a predicate picks, and only once.
    weather.spell_when(lambda r: r.path.endswith("/report.json"), 0.3)
    assert weather.decide(_request("GET")).outcome == "pass"
    assert weather.decide(_request("GET", "/a/runs/r/report.json")).outcome == "busy"
    assert weather.decide(_request("GET")).outcome == "busy"
    time.sleep(0.35)
    assert weather.decide(_request("GET", "/a/runs/r/report.json")).outcome == "pass"
    assert weather.counts["spells"] == 1


def test_busy_answers_have_storage_s_own_shapes() -> None:
    for service in ("blob", "queue"):
        raw = busy_response(service, "GET", "2021-02-12")
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"x-ms-error-code: ServerBusy" in head and b"x-ms-version: 2021-02-12" in head
        assert body.startswith(b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy')
    head, body = busy_response("table", "POST", None).split(b"\r\n\r\n", 1)
    error = json.loads(body)["odata.error"]
    assert error["code"] == "ServerBusy" and error["message"]["value"].startswith(BUSY_MESSAGE)
    assert busy_response("blob", "HEAD", None).endswith(b"Content-Length: 0\r\n\r\n")


@pytest.fixture
def proxies(storage_settings: StorageSettings) -> Iterator[StorageProxies]:
    with StorageProxies.around(storage_settings, Weather(Faults(), seed=1)) as running:
        yield running


def _no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for package in retry.SDK_RETRY_TOTAL:
        monkeypatch.setitem(retry.SDK_RETRY_TOTAL, package, 0)


def test_without_faults_the_proxy_passes_everything_exactly(
    proxies: StorageProxies, blob_store: BlobStore, ledger: Ledger, run_id: str
) -> None:
    settings = proxies.settings()
    store = BlobStore(settings)
    data = random.Random(3).randbytes(300_000)
    store.upload_bytes("runs", f"{run_id}/data.bin", data)
    assert store.download_bytes("runs", f"{run_id}/data.bin") == data
    assert blob_store.download_bytes("runs", f"{run_id}/data.bin") == data  # Azurite has it
    assert store.exists("runs", f"{run_id}/data.bin") and not store.exists("runs", "nothing")
    queues = RunQueues(settings, run_id)
    queues.create()
    queues.send("input", "ünïcode <xml> & stuff")
    assert [m.content for m in queues.receive(5, visibility_timeout=30)] == [
        "ünïcode <xml> & stuff"
    ]
    queues.delete()
    assert Ledger(settings).counts(run_id).succeeded == 0
    assert set(proxies.weather.counts) == {"pass"}


def test_each_sdk_reads_the_busy_answers_as_server_busy(
    proxies: StorageProxies, monkeypatch: pytest.MonkeyPatch, run_id: str
) -> None:
    _no_retries(monkeypatch)
    settings = proxies.settings()
    proxies.weather.spell(60)
    calls = {
        "blob": lambda: BlobStore(settings).download_bytes("runs", "x"),
        "queue": lambda: RunQueues(settings, run_id).approximate_count(),
        "table": lambda: Ledger(settings).counts(run_id),
    }
    for package, call in calls.items():
        with pytest.raises(HttpResponseError) as caught:
            call()
        assert caught.value.status_code == 503, package
        assert getattr(caught.value, "error_code", None) == "ServerBusy", package


def test_resets_before_and_after_a_request_differ_in_what_storage_did(
    proxies: StorageProxies, blob_store: BlobStore, monkeypatch: pytest.MonkeyPatch, run_id: str
) -> None:
    _no_retries(monkeypatch)
    store = BlobStore(proxies.settings())
    proxies.weather.faults = Faults(reset_before=1.0)
    with pytest.raises(ServiceResponseError):
        store.upload_bytes("runs", f"{run_id}/before", b"x")
    assert not blob_store.exists("runs", f"{run_id}/before")  # it never reached Azurite
    proxies.weather.faults = Faults(reset_after=1.0)
    with pytest.raises(ServiceResponseError):
        store.upload_bytes("runs", f"{run_id}/after", b"x")
    assert blob_store.exists("runs", f"{run_id}/after")  # Azurite did it; the answer was lost


def test_a_reset_during_the_answer_cuts_its_body_mid_way(proxies: StorageProxies) -> None:
    proxies.weather.faults = Faults(reset_during=1.0)
    # An unsigned request: Azurite answers with an error body, which is all this needs.
    with socket.create_connection(("127.0.0.1", proxies.blob.port), timeout=10) as raw:
        raw.sendall(b"GET /devstoreaccount1/runs/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):  # read until the reset
            while chunk := raw.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 ") and body  # the head and some of the body came
    lines = [line.lower() for line in head.split(b"\r\n")]
    if b"transfer-encoding: chunked" in lines:
        assert not body.endswith(b"0\r\n\r\n")  # the last chunk never came
    else:
        length = next(int(line.split(b":")[1]) for line in lines if b"content-length:" in line)
        assert len(body) < length
    assert proxies.weather.counts["reset_during"] == 1


def _is_blob_get(request: Request) -> bool:
    return request.service == "blob" and request.method == "GET"


def test_a_download_cut_off_more_often_than_the_sdk_tries_is_asked_again(
    proxies: StorageProxies, blob_store: BlobStore, run_id: str
) -> None:
    data = random.Random(5).randbytes(200_000)
    blob_store.upload_bytes("runs", f"{run_id}/small", data)
    store = BlobStore(proxies.settings())
    # The SDK's download code reads a cut body 3 times; a 4th cut is ours to retry.
    proxies.weather.force("reset_during", 4, when=_is_blob_get)
    assert store.download_bytes("runs", f"{run_id}/small") == data
    assert proxies.weather.counts["reset_during"] == 4


def test_a_long_download_cut_off_mid_way_resumes_where_it_stopped_of_the_same_version(
    proxies: StorageProxies, blob_store: BlobStore, tmp_path: Path, run_id: str
) -> None:
    # Over the SDK's 32 MiB first request: the rest comes in 4 MiB ranges.
    data = random.Random(6).randbytes(40 * 1024 * 1024)
    blob_store.upload_bytes("runs", f"{run_id}/large", data)
    store = BlobStore(proxies.settings())

    def later_range(request: Request) -> bool:
        return _is_blob_get(request) and not request.headers.get("x-ms-range", "").startswith(
            "bytes=0-"
        )

    proxies.weather.force("reset_during", 4, when=later_range)
    assert store.download_to_file("runs", f"{run_id}/large", tmp_path / "large") == len(data)
    assert (tmp_path / "large").read_bytes() == data
    asked = [(r.headers, outcome) for r, outcome in proxies.weather.log if later_range(r)]
    mib = 1024 * 1024
    # The SDK asks for the 4 MiB range after the first 32 MiB three times, all cut off.
    assert [(h["x-ms-range"], o) for h, o in asked[:3]] == [
        (f"bytes={32 * mib}-{36 * mib - 1}", "reset_during")
    ] * 3
    # Then ours: a new download from the byte the cut stopped at (its first request is up
    # to 32 MiB long), on the condition that the ETag is the one the first bytes came with.
    ours, outcome = asked[3]
    assert ours["x-ms-range"] == f"bytes={32 * mib}-{64 * mib - 1}" and outcome == "reset_during"
    etag = next(h["if-match"] for h, _ in asked[:3])
    assert ours["if-match"] == etag


def test_latency_is_added_to_each_request(proxies: StorageProxies, run_id: str) -> None:
    proxies.weather.faults = Faults(latency_s=(0.3, 0.3))
    store = BlobStore(proxies.settings())
    started = time.monotonic()
    assert not store.exists("runs", f"{run_id}/nothing")
    assert time.monotonic() - started >= 0.3


# -- the policy in the SDKs' own retry code -------------------------------------------------
def _short_budgets(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    for package in retry.SDK_RETRY_BUDGET_S:
        monkeypatch.setitem(retry.SDK_RETRY_BUDGET_S, package, seconds)
    monkeypatch.setattr(retry, "SDK_INITIAL_BACKOFF_S", 0.05)
    monkeypatch.setattr(retry, "SDK_BACKOFF_CAP_S", 0.4)


def test_every_client_retries_a_spell_until_its_budget_and_no_longer(
    proxies: StorageProxies, monkeypatch: pytest.MonkeyPatch, run_id: str
) -> None:
    _short_budgets(monkeypatch, 1.5)
    settings = proxies.settings()
    calls = {
        "blob": lambda: BlobStore(settings).download_bytes("runs", "x"),
        "queue": lambda: RunQueues(settings, run_id).approximate_count(),
        "table": lambda: Ledger(settings).counts(run_id),
    }
    for package, call in calls.items():
        proxies.weather.spell(60)
        before = proxies.weather.counts["busy"]
        started = time.monotonic()
        with pytest.raises(HttpResponseError) as caught:
            call()
        elapsed = time.monotonic() - started
        # The last real answer reaches the caller (not azure-core's "Response timeout").
        assert getattr(caught.value, "error_code", None) == "ServerBusy", package
        # Ended by the bound in time: past the SDK's own 3 status retries, within budget.
        assert proxies.weather.counts["busy"] - before > 4, package
        assert 1.0 <= elapsed < 1.5 + 1.0, (package, elapsed)


def test_every_client_comes_through_a_short_spell(
    proxies: StorageProxies, blob_store: BlobStore, run_id: str
) -> None:
    blob_store.upload_bytes("runs", f"{run_id}/x", b"payload")
    settings = proxies.settings()
    for call in (
        lambda: BlobStore(settings).download_bytes("runs", f"{run_id}/x") == b"payload",
        lambda: RunQueues(settings, run_id).exists() == {"input": False},
        lambda: Ledger(settings).counts(run_id).succeeded == 0,
    ):
        proxies.weather.spell(1.0)
        assert call()
    assert proxies.weather.counts["busy"] >= 3


def test_sdk_fault_lines_name_the_run_and_the_item(
    proxies: StorageProxies,
    blob_store: BlobStore,
    caplog: pytest.LogCaptureFixture,
    run_id: str,
) -> None:
    blob_store.upload_bytes("runs", f"{run_id}/clip", random.Random(1).randbytes(50_000))
    store = BlobStore(proxies.settings())
    proxies.weather.force("reset_during", 2, when=_is_blob_get)
    with caplog.at_level(logging.WARNING), bound(run_id=run_id, item_id="clip-7"):
        assert len(store.download_bytes("runs", f"{run_id}/clip")) == 50_000
    lines = [r.getMessage() for r in caplog.records if r.name in SDK_FAULT_LOGGERS]
    assert (
        lines
        == [
            "Unable to stream download. (storage fault in run "
            f"{run_id}, item clip-7: download of runs/{run_id}/clip)"
        ]
        * 2
    ), caplog.text


def test_sdk_fault_lines_name_the_request_where_no_work_is_bound(
    proxies: StorageProxies, ledger: Ledger, caplog: pytest.LogCaptureFixture, run_id: str
) -> None:
    # An answer that is not streamed (a table read) is read inside the transport's send.
    proxies.weather.force("reset_during", 1, when=lambda r: r.service == "table")
    with caplog.at_level(logging.WARNING):
        assert Ledger(proxies.settings()).counts(run_id).succeeded == 0
    lines = [r.getMessage() for r in caplog.records if r.name in SDK_FAULT_LOGGERS]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith("Unable to stream download. (storage fault in GET /devstore")
    # The first table read of a poll: the run's shard count (batchctl.storage.ledger).
    assert f"(PartitionKey='{run_id}~meta',RowKey='shards')" in lines[0]


# -- the copy-out ---------------------------------------------------------------------------
def _result(run_id: str, item_id: str) -> ItemResult:
    return ItemResult(
        run_id=run_id,
        item_id=item_id,
        status=ItemStatus.SUCCEEDED,
        source=f"http://127.0.0.1/devstoreaccount1/media/{item_id}.mp4",
        outputs=[f"{run_id}/items/{item_id}/echo.txt"],
        timings=StageTimings(total_s=0.1),
    )


def _finished_run(run_id: str, blob_store: BlobStore, ledger: Ledger) -> dict[str, bytes]:
    """A finished run's results in storage; returns the files a copy-out must produce."""
    rng = random.Random(run_id)
    results = [_result(run_id, f"item-{index}") for index in range(5)]
    ledger.record_absent(results)
    report = json.dumps({"run_id": run_id, "succeeded": 5}).encode()
    blob_store.upload_bytes("runs", controller.report_blob_name(run_id), report)
    expected = {"report.json": report}
    for result in results:
        data = rng.randbytes(40_000)
        blob_store.upload_bytes("outputs", f"{run_id}/items/{result.item_id}/echo.txt", data)
        expected[f"outputs/items/{result.item_id}/echo.txt"] = data
    expected["records.jsonl"] = b"".join((r.model_dump_json() + "\n").encode() for r in results)
    return expected


def _copied(run_dir: Path) -> dict[str, bytes]:
    return {
        path.relative_to(run_dir).as_posix(): path.read_bytes()
        for path in run_dir.rglob("*")
        if path.is_file()
    }


def _services(settings: StorageSettings, tmp_path: Path) -> Services:
    controller_settings = local_settings(
        settings, media_root=tmp_path, nodes=1, log_dir=tmp_path / "logs"
    )
    return build_services(controller_settings, LocalBackend(controller_settings, nodes=1))


def _records(data: bytes) -> set[str]:
    return set(data.decode().splitlines())


def test_the_copy_out_comes_through_a_three_second_spell_with_exact_files(
    proxies: StorageProxies, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    expected = _finished_run(run_id, blob_store, ledger)
    services = _services(proxies.settings(), tmp_path)
    run_dir = tmp_path / "out" / run_id
    proxies.weather.faults = Faults(reset_during=0.1, latency_s=(0.0, 0.02))
    proxies.weather.spell(3.0)
    started = time.monotonic()
    try:
        report_path, output_dir = controller.copy_run_out(services, run_id, run_dir)
    finally:
        services.close()
    assert time.monotonic() - started >= 3.0  # it did wait the spell out
    assert proxies.weather.counts["busy"] > 3
    copied = _copied(run_dir)
    assert _records(copied.pop("records.jsonl")) == _records(expected.pop("records.jsonl"))
    assert copied == expected  # every file whole, nothing else (no .part left behind)
    assert report_path == run_dir / "report.json" and output_dir == run_dir / "outputs"


def test_a_copy_out_that_outlasts_its_policy_says_so_in_one_line_and_leaves_no_part_files(
    proxies: StorageProxies,
    blob_store: BlobStore,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    run_id: str,
) -> None:
    expected = _finished_run(run_id, blob_store, ledger)
    _short_budgets(monkeypatch, 0.4)  # the copy-out's: 1.2 s
    services = _services(proxies.settings(), tmp_path)
    run_dir = tmp_path / "out" / run_id
    try:
        # Storage fails from the first call: no records.jsonl at all, not an empty one.
        proxies.weather.spell(4.0)
        with pytest.raises(controller.RunCopyError) as caught:
            controller.copy_run_out(services, run_id, run_dir)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"run {run_id}: could not copy records.jsonl out of storage")
        assert "HTTP 503 ServerBusy (still failing after 1.2 s of retries)" in message
        assert message.endswith(f"/runs/{run_id}/ and {proxies.blob.url}/outputs/{run_id}/)")
        assert _copied(run_dir) == {}
        # A spell that starts at the report: the records are whole, the report absent.
        proxies.weather.wait_out_spell()
        proxies.weather.spell_when(lambda r: r.path.endswith("/report.json"), 4.0)
        with pytest.raises(controller.RunCopyError, match=r"could not copy report\.json"):
            controller.copy_run_out(services, run_id, run_dir)
        # The outputs are copied beside the run's files, so some may be there too: whole.
        copied = _copied(run_dir)
        assert _records(copied.pop("records.jsonl")) == _records(expected["records.jsonl"])
        assert all(
            name.startswith("outputs/") and data == expected[name] for name, data in copied.items()
        ), sorted(copied)
        # The results stayed in storage: once it answers again, the copy completes.
        proxies.weather.wait_out_spell()
        controller.copy_run_out(services, run_id, run_dir)
    finally:
        services.close()
    copied = _copied(run_dir)
    assert _records(copied.pop("records.jsonl")) == _records(expected.pop("records.jsonl"))
    assert copied == expected


# -- a whole local run ---------------------------------------------------------------------
ITEMS = 8


def _queue_receive_or_renew(request: Request) -> bool:
    """A receive or a visibility update that storage did but whose answer is lost hides the
    message for its visibility timeout (120 s): at-least-once delivery recovers it (see
    tests/test_faults.py), but here it would only make the run wait two minutes."""
    if request.service != "queue" or "/messages" not in request.path:
        return False
    receive = request.method == "GET" and "peekonly=true" not in request.query
    return receive or request.method == "PUT"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_whole_run_survives_random_faults_and_a_spell_at_its_copy_out(
    seed: int, azurite: Azurite, storage_settings: StorageSettings, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    media = tmp_path / "media"
    media.mkdir()
    sources: dict[str, bytes] = {}
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(ITEMS):
            item_id = f"item-{index}"
            sources[item_id] = rng.randbytes(rng.randrange(20_000, 200_000))
            (media / f"{item_id}.mp4").write_bytes(sources[item_id])
            writer.writerow([item_id, f"media/{item_id}.mp4"])
    run_id = f"faults-{seed}-{os.getpid()}"
    faults = Faults(
        busy=0.05,
        reset_before=0.02,
        reset_during=0.04,
        reset_after=0.02,
        latency_s=(0.0, 0.03),
        spare=_queue_receive_or_renew,
        each_within=60,
    )
    weather = Weather(faults, seed=seed)
    # The case: throttling for 3 s just as the copy-out starts reading the report.
    weather.spell_when(
        lambda r: (
            r.service == "blob"
            and r.method == "GET"
            and r.path.endswith(f"/runs/{run_id}/report.json")
        ),
        3.0,
    )
    out = tmp_path / "out"
    with StorageProxies.around(storage_settings, weather) as proxies:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCTL_")}
        env.update(proxies.environment())
        env.update({"PYTHONPATH": str(ROOT), worker_tasks.ITEM_SECONDS_ENV: "0.1"})
        command = [
            sys.executable, "-m", "batchctl", "run", str(manifest), "--json",
            "--run-id", run_id, "--nodes", "2", "--task", "tests.worker_tasks:QuickTask",
            "--poll", "0.5", "--idle-exit", "1", "--out", str(out),
        ]  # fmt: skip
        done = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # The proxy did what it was asked: random faults of every kind, and the spell.
    for outcome in ("busy", "reset_before", "reset_during", "reset_after"):
        assert weather.counts[outcome] > 0, weather.counts
    assert weather.counts["spells"] == 1
    # azure-core's lines about answers cut off mid-body name the run (bound to the thread,
    # or in the request they name) once the run has begun, from its first progress line
    # ("[phase] ..."); the staging before it asks for blobs and tables of no run yet.
    lines = done.stderr.splitlines()
    began = next(i for i, line in enumerate(lines) if line.startswith("["))
    cut = ("Unable to stream download", "Incomplete download")
    cut_lines = [line for line in lines[began:] if line.startswith(cut)]
    assert all("(storage fault in " in line and run_id in line for line in cut_lines), cut_lines
    # A worker's name the run, and the item where the call was an item's (on the loop
    # thread, receiving or deleting messages, there is none: item=-).
    for log in (out / run_id / "logs").glob("*.log"):
        for line in log.read_text().splitlines():
            if any(words in line for words in cut):
                item = line.split(" item=", 1)[1].split(" ", 1)[0]
                named = f"run {run_id}" + (f", item {item}" if item != "-" else "")
                assert f"(storage fault in {named}: " in line, line
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["run_id"] == run_id and summary["phase"] == "completed"
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (ITEMS, ITEMS, 0)
    assert (summary["invalid"], summary["not_run"]) == (0, 0)
    run_dir = out / run_id
    records = [
        ItemResult.model_validate_json(line)
        for line in (run_dir / "records.jsonl").read_text().splitlines()
    ]
    assert sorted(r.item_id for r in records) == sorted(sources)  # one record per item
    assert all(r.status is ItemStatus.SUCCEEDED for r in records)
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["run_id"], report["total"], report["succeeded"]) == (run_id, ITEMS, ITEMS)
    assert (report["failed"], report["not_run"]) == (0, 0)
    # QuickTask writes each source's first 16 bytes: every output copied out, whole.
    for item_id, data in sources.items():
        assert (run_dir / "outputs" / "items" / item_id / "echo.txt").read_bytes() == data[:16]
    assert not list(run_dir.rglob("*.part"))
    # The ledger, read from Azurite directly, agrees exactly.
    direct = Ledger(storage_settings)
    counts = direct.counts(run_id)
    assert (counts.succeeded, counts.failed, counts.not_run) == (ITEMS, 0, 0)
    assert sorted(r.item_id for r in direct.iter_results(run_id)) == sorted(sources)
