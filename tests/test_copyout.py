"""The concurrent copy-out (issue 25): every output exactly, through faults, with progress,
and ``--no-copy`` leaving the outputs in storage of the user's own.

The copy-out downloads a run's outputs on a bounded pool of threads
(:func:`batchctl.controller.copy_run_out`); these tests hold that it copies every file
whole (names and bytes), that storage faults under the pool leave no partial file, that a
long copy says where it is, and what ``batchctl run --no-copy`` leaves where.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchctl import cli, controller
from batchctl.compute.local import LocalBackend, LocalFiles
from batchctl.contracts import ItemResult, ItemStatus, RunOptions, StageTimings
from batchctl.local.runfolder import PRIVATE_STORAGE, new_record, storage_dir, write_record
from batchctl.local.session import local_settings
from batchctl.services import Services, build_services
from batchctl.settings import StorageSettings, WorkerSettings, azurite_environment
from batchctl.storage import BlobStore, Ledger, retry
from batchctl.storage.blobs import ListedBlob
from batchctl.storage.items import LocalOutputCopies
from node_image.worker.config import WorkerConfig
from tests import worker_tasks
from tests.faultproxy import Faults, StorageProxies, Weather

pytestmark = pytest.mark.azurite

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = 300  # a few hundred: many times the pool's window of downloads in flight


# -- a finished run in storage -----------------------------------------------------------
def _finished_run(
    run_id: str, blob_store: BlobStore, ledger: Ledger, outputs: int = OUTPUTS
) -> dict[str, bytes]:
    """A finished run with ``outputs`` outputs in storage (sizes from empty to past the
    transport's 256 KiB read block, two per item folder); returns the outputs a copy-out
    must produce, by their path under the outputs folder."""
    rng = random.Random(run_id)
    items = (outputs + 1) // 2
    results = [
        ItemResult(
            run_id=run_id,
            item_id=f"item-{index:04d}",
            status=ItemStatus.SUCCEEDED,
            source=f"http://127.0.0.1/devstoreaccount1/media/item-{index}.mp4",
            outputs=[f"{run_id}/items/item-{index:04d}/echo.txt"],
            timings=StageTimings(total_s=0.1),
        )
        for index in range(items)
    ]
    ledger.record_absent(results)
    blob_store.upload_bytes(
        "runs", controller.report_blob_name(run_id), json.dumps({"run_id": run_id})
    )
    sizes = [0, 1, 300_000, *(rng.randrange(1, 5_000) for _ in range(outputs - 3))]
    expected: dict[str, bytes] = {}
    for index, size in enumerate(sizes):
        item, kind = divmod(index, 2)
        name = f"items/item-{item:04d}/{'echo.txt' if kind == 0 else 'metadata.json'}"
        expected[name] = rng.randbytes(size)
        blob_store.upload_bytes("outputs", f"{run_id}/{name}", expected[name])
    return expected


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too: a leftover ``.NAME.part`` shows)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def _services(settings: StorageSettings, tmp_path: Path) -> Services:
    controller_settings = local_settings(
        settings, media_root=tmp_path, nodes=1, log_dir=tmp_path / "logs"
    )
    return build_services(controller_settings, LocalBackend(controller_settings, nodes=1))


@pytest.fixture
def proxies(storage_settings: StorageSettings) -> Iterator[StorageProxies]:
    with StorageProxies.around(storage_settings, Weather(Faults(), seed=25)) as running:
        yield running


# -- every file, exactly -----------------------------------------------------------------
def test_the_concurrent_copy_out_copies_every_output_exactly(
    services: Services, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    expected = _finished_run(run_id, blob_store, ledger)
    run_dir = tmp_path / run_id
    quiet = io.StringIO()
    report_path, output_dir = controller.copy_run_out(
        services, run_id, run_dir, threads=8, progress=controller.CopyProgress(quiet)
    )
    assert output_dir == run_dir / "outputs" and report_path == run_dir / "report.json"
    assert _files(output_dir) == expected  # names and bytes; no .part file beside them
    assert {p.name for p in run_dir.iterdir()} == {"outputs", "records.jsonl", "report.json"}
    assert quiet.getvalue() == ""  # a copy of a second or two says nothing


def test_the_copy_out_comes_through_random_faults_on_its_pool_with_exact_files(
    proxies: StorageProxies, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    expected = _finished_run(run_id, blob_store, ledger)
    # Throttling, resets before, during (a body cut off mid-way) and after the answer, on
    # the blob downloads of eight threads at once.
    proxies.weather.faults = Faults(
        busy=0.06,
        reset_before=0.03,
        reset_during=0.06,
        reset_after=0.03,
        latency_s=(0, 0.01),
        each_within=100,
    )
    services = _services(proxies.settings(), tmp_path)
    run_dir = tmp_path / "out" / run_id
    try:
        controller.copy_run_out(services, run_id, run_dir, threads=8)
    finally:
        services.close()
    for outcome in ("busy", "reset_before", "reset_during", "reset_after"):
        assert proxies.weather.counts[outcome] > 0, proxies.weather.counts
    assert _files(run_dir / "outputs") == expected


def test_ctrl_c_while_the_outputs_copy_stops_their_feed_at_once(
    proxies: StorageProxies, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    """The run's files are copied in a moment; the outputs (slow here: 0.15 s a request, one
    thread) are still coming when Ctrl-C lands. The copy stops within a few downloads, not
    after all of them, and what it left is whole."""
    expected = _finished_run(run_id, blob_store, ledger, outputs=80)
    proxies.weather.faults = Faults(latency_s=(0.15, 0.15))
    services = _services(proxies.settings(), tmp_path)
    run_dir = tmp_path / "out" / run_id
    began = time.monotonic()
    controller.copy_run_out(services, run_id, tmp_path / "files", copy_outputs=False)
    files_s = time.monotonic() - began  # the run's own files alone, at this latency
    # Ctrl-C once the run's files are surely copied, while the outputs are (12 s for all).
    # A real SIGINT (interrupt_main would not end a wait in a lock, as Ctrl-C does).
    interrupt = threading.Timer(files_s + 1.0, os.kill, (os.getpid(), signal.SIGINT))
    began = time.monotonic()
    try:
        interrupt.start()
        with pytest.raises(KeyboardInterrupt):
            controller.copy_run_out(services, run_id, run_dir, threads=1)
        stopped_after = time.monotonic() - began
    finally:
        interrupt.cancel()
        services.close()
    copied = _files(run_dir / "outputs")
    # All 80 one after another take 12 s or more; the feed stopped at the interrupt.
    assert stopped_after < files_s + 3.0, (stopped_after, files_s)
    assert len(copied) < len(expected) // 2, len(copied)
    assert all(expected.get(name) == data for name, data in copied.items())
    assert (run_dir / "records.jsonl").exists()  # the run's own files came first


def _short_budgets(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    for package in retry.SDK_RETRY_BUDGET_S:
        monkeypatch.setitem(retry.SDK_RETRY_BUDGET_S, package, seconds)
    monkeypatch.setattr(retry, "SDK_INITIAL_BACKOFF_S", 0.05)
    monkeypatch.setattr(retry, "SDK_BACKOFF_CAP_S", 0.4)


def test_a_spell_mid_copy_stops_the_pool_in_one_line_and_leaves_only_whole_files(
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
    # Throttling that outlasts the policy, from the download of the 100th output on: the
    # downloads then in flight on every thread fail together.
    hundredth = sorted(expected)[99]
    proxies.weather.spell_when(lambda r: r.path.endswith(f"/outputs/{run_id}/{hundredth}"), 5.0)
    try:
        with pytest.raises(controller.RunCopyError) as caught:
            controller.copy_run_out(services, run_id, run_dir, threads=8)
        message = str(caught.value)
        assert "\n" not in message
        # The run's own files are copied beside the outputs, so the spell may reach one of
        # them first: either way one line that names what failed.
        assert re.match(
            rf"run {run_id}: could not copy (output items/item-\S+|[\w.-]+) out of storage: ",
            message,
        ), message
        assert "HTTP 503 ServerBusy (still failing after 1.2 s of retries)" in message
        assert message.endswith(f"{proxies.blob.url}/outputs/{run_id}/)"), message
        copied = _files(run_dir / "outputs")
        # Stopped part way (the files well before the 100th were done before the spell;
        # those in flight on other threads then may have failed too), and what is there is
        # whole: no partial file, no .part left.
        assert 50 <= len(copied) < len(expected), len(copied)
        assert all(expected.get(name) == data for name, data in copied.items())
        # The outputs stayed in storage: once it answers again, the copy completes.
        proxies.weather.wait_out_spell()
        controller.copy_run_out(services, run_id, run_dir, threads=8)
    finally:
        services.close()
    assert _files(run_dir / "outputs") == expected


# -- progress ------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_start_after_the_threshold_and_come_every_interval() -> None:
    out, clock, stops = io.StringIO(), _Clock(), []
    progress = controller.CopyProgress(
        out, after_s=5.0, every_s=2.0, clock=clock, before_first=lambda: stops.append(1)
    )
    progress.start("r1", 50_000)
    for now, done in ((1.0, 4_000), (4.9, 12_000), (5.0, 12_000), (6.0, 14_000), (7.0, 16_000)):
        clock.now = 100.0 + now
        progress.advance(done)
    clock.now = 162.5
    progress.end(50_000)
    assert out.getvalue().splitlines() == [
        "copying outputs of run r1: 12,000 of 50,000 files (2,400/s)",
        "copying outputs of run r1: 16,000 of 50,000 files (2,286/s)",
        "copied outputs of run r1: 50,000 of 50,000 files in 62 s (800/s)",
    ]
    assert stops == [1]  # the live panel is stopped once, before the first line
    # A copy that ends inside the threshold says nothing at all, not even its end.
    quiet = io.StringIO()
    short = controller.CopyProgress(quiet, after_s=5.0, clock=clock)
    short.start("r2", 10)
    short.advance(10)
    short.end(10)
    assert quiet.getvalue() == ""


def test_a_long_copy_out_prints_progress_lines(
    services: Services, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    expected = _finished_run(run_id, blob_store, ledger, outputs=120)
    out = io.StringIO()
    # Every copy counts as long here: lines from the first download on.
    progress = controller.CopyProgress(out, after_s=0.0, every_s=0.0)
    controller.copy_run_out(services, run_id, tmp_path / run_id, threads=4, progress=progress)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines
    counts = []
    for line in lines[:-1]:
        head, _, rate = line.partition(" files (")
        assert head.startswith(f"copying outputs of run {run_id}: ") and rate.endswith("/s)")
        done, of = head.rsplit(": ", 1)[1].split(" of ")
        assert of == "120"
        counts.append(int(done.replace(",", "")))
    assert counts == sorted(counts) and counts[-1] == 120
    assert lines[-1].startswith(f"copied outputs of run {run_id}: 120 of 120 files in ")
    assert _files(tmp_path / run_id / "outputs") == expected


# -- --no-copy -----------------------------------------------------------------------------
def _manifest(tmp_path: Path, items: int) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(items):
            (media / f"clip-{index}.mp4").write_bytes(f"video {index} ".encode() * 8)
            writer.writerow([f"clip-{index}", f"media/clip-{index}.mp4"])
    return manifest


def test_run_no_copy_leaves_the_outputs_in_storage_and_says_where(
    storage_settings: StorageSettings, blob_store: BlobStore, tmp_path: Path, run_id: str
) -> None:
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCTL_")}
    env.update(
        azurite_environment(
            storage_settings.blob_url, storage_settings.queue_url, storage_settings.table_url
        )
    )
    env.update({"PYTHONPATH": str(ROOT), worker_tasks.ITEM_SECONDS_ENV: "0.05"})
    command = [
        sys.executable, "-m", "batchctl", "run", str(manifest), "--json", "--no-copy",
        "--run-id", run_id, "--nodes", "1", "--task", "tests.worker_tasks:QuickTask",
        "--poll", "0.5", "--idle-exit", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    where = f"{storage_settings.blob_url}/outputs/{run_id}/"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["outputs_copied"] is False and summary["output_prefix"] == where
    outputs_line = next(line for line in done.stderr.splitlines() if line.startswith("outputs:"))
    assert outputs_line.startswith(f"outputs: left in storage (--no-copy): {where} ")
    assert f"--source outputs --pattern '{run_id}/*'" in outputs_line
    # Everything but the outputs was copied; the outputs are not in the run's folder.
    run_dir = out / run_id
    present = {path.name for path in run_dir.iterdir()}
    assert {"report.json", "records.jsonl", "index.csv", "controller.json"} <= present
    assert "outputs" not in present and "storage" not in present
    # They are in storage, each item's, and index.csv names their folders there.
    stored = set(blob_store.list_names("outputs", f"{run_id}/"))
    for index in range(3):
        assert f"{run_id}/items/clip-{index}/echo.txt" in stored, stored
    with (run_dir / "index.csv").open(newline="") as handle:
        folders = sorted(row["folder"] for row in csv.DictReader(handle))
    assert folders == [f"outputs/{run_id}/items/clip-{index}/" for index in range(3)]
    records = (run_dir / "records.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["item_id"] for line in records) == [
        f"clip-{index}" for index in range(3)
    ]


def test_no_copy_on_the_private_azurite_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("BATCHCTL_"):
            monkeypatch.delenv(name)
    manifest = _manifest(tmp_path, 1)
    out = tmp_path / "out"
    code = cli.main(["run", str(manifest), "--no-copy", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--no-copy" in err and "BATCHCTL_BLOB_URL" in err and "private Azurite" in err
    assert not out.exists()  # no Azurite, no run folder


def test_resume_no_copy_of_a_run_on_its_private_azurite_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("BATCHCTL_"):
            monkeypatch.delenv(name)
    # A run whose controller died: its record names a process that has exited.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    run_dir = tmp_path / "out" / "dead-run"
    storage_dir(run_dir).mkdir(parents=True)
    record = new_record(
        run_id="dead-run",
        nodes=1,
        media_root=tmp_path,
        storage=PRIVATE_STORAGE,
        ports=None,
        state={},
    )
    write_record(run_dir, record.model_copy(update={"pid": int(gone.stdout), "pid_start": 1}))
    code = cli.main(["resume", str(run_dir), "--no-copy"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--no-copy" in err and "run dead-run keeps its storage" in err
    assert storage_dir(run_dir).is_dir()  # nothing was started, nothing removed


# -- outputs the nodes wrote into the run's folder -----------------------------------------
def test_outputs_already_in_the_folder_are_not_downloaded_and_the_folder_ends_exact(
    services: Services,
    blob_store: BlobStore,
    ledger: Ledger,
    tmp_path: Path,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The nodes of `batchctl run` write each output into the run's folder as they upload
    it (LocalOutputCopies): the copy-out downloads none of those that are there as storage
    holds them. Seeded: some were written there, some not (a node that could not), some
    rewritten in storage since (a duplicate delivery), some written locally and gone from
    storage (a segment's parts), a partial file of a killed node, a file of the right size
    and other bytes, and a link where a file should be. The folder must end as a whole copy
    of storage, and only what was not in place as storage holds it is downloaded."""
    rng = random.Random(2027)
    expected = _finished_run(run_id, blob_store, ledger, outputs=40)
    # Two whole videos past the size checked on the feeding thread (checked on the pool).
    for index in range(2):
        big = f"items/video-{index}/video.mp4"
        expected[big] = rng.randbytes(controller.copyout.CHECK_HERE_BYTES + 1000)
        blob_store.upload_bytes("outputs", f"{run_id}/{big}", expected[big])
    run_dir = tmp_path / run_id
    copies = LocalOutputCopies(run_dir / "outputs", run_id)
    names = sorted(expected)
    rng.shuffle(names)
    written, not_written = names[:30], names[30:]
    # One whole video written by its node, one not: both sides of the pool's check.
    videos = ["items/video-0/video.mp4", "items/video-1/video.mp4"]
    written = [n for n in written if n not in videos] + videos[:1]
    not_written = [n for n in not_written if n not in videos] + videos[1:]
    for name in written:
        copies.write(f"{run_id}/{name}", expected[name])
    must_download = set(not_written)
    for name in rng.sample(written, 5):  # rewritten in storage after the node's copy
        expected[name] = rng.randbytes(rng.randrange(1, 3_000))
        blob_store.upload_bytes("outputs", f"{run_id}/{name}", expected[name])
        must_download.add(name)
    same_size = next(n for n in written if n not in must_download and len(expected[n]) > 1)
    (run_dir / "outputs" / same_size).write_bytes(bytes(reversed(expected[same_size])))
    must_download.add(same_size)
    linked = next(n for n in written if n not in must_download)
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(expected[linked])
    (run_dir / "outputs" / linked).unlink()
    (run_dir / "outputs" / linked).symlink_to(target)
    must_download.add(linked)
    # A segment's parts, written by the node and deleted in storage since its item was
    # assembled, without the node removing its copies (killed in between).
    for index in range(3):
        copies.write(f"{run_id}/items/long/segments/{index:05d}/part.npz", b"a part")
    # A partial file a node killed mid-write left.
    (run_dir / "outputs" / "items" / ".echo.txt.abc.part").write_bytes(b"half")
    downloads: list[str] = []
    original = BlobStore.download_to_file

    def counted(self: BlobStore, container: str, name: str, path: Path) -> int:
        downloads.append(name)
        return original(self, container, name, path)

    monkeypatch.setattr(BlobStore, "download_to_file", counted)
    controller.copy_run_out(
        services, run_id, run_dir, threads=4, progress=controller.CopyProgress(io.StringIO())
    )
    assert _files(run_dir / "outputs") == expected
    assert not (run_dir / "outputs" / linked).is_symlink()
    folders = {
        p.relative_to(run_dir / "outputs").as_posix() for p in (run_dir / "outputs").rglob("*")
    }
    assert not any("segments" in folder or "long" in folder for folder in folders), sorted(folders)
    outputs_downloaded = sorted(name for name in downloads if name.startswith(f"{run_id}/items/"))
    assert outputs_downloaded == sorted(f"{run_id}/{name}" for name in must_download)


def test_a_blob_without_an_md5_is_never_taken_as_held(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    digest = hashlib.md5(b"abc").digest()
    assert controller.copyout._holds(path, ListedBlob("r/f", 3, digest))
    assert not controller.copyout._holds(path, ListedBlob("r/f", 3, None))  # block upload
    assert not controller.copyout._holds(path, ListedBlob("r/f", 4, digest))
    assert not controller.copyout._holds(tmp_path / "absent", ListedBlob("r/f", 3, digest))


def test_a_node_s_copies_stay_in_the_run_s_folder_and_never_fail_its_item(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "out" / "r1" / "outputs"
    copies = LocalOutputCopies(folder, "r1")
    copies.write("r1/items/a/features.npz", b"features")
    source = tmp_path / "video.mp4"
    source.write_bytes(b"v" * 100_000)
    copies.copy("r1/items/a/video.mp4", source)
    assert (folder / "items/a/features.npz").read_bytes() == b"features"
    assert (folder / "items/a/video.mp4").read_bytes() == source.read_bytes()
    # Not the run's outputs (an index entry, another run's), or a name that would leave.
    for name in ("_index/a.json", "r2/items/a/x", "r1/../r2/x", "r1/items/../../x", "r1/", "r1//x"):
        assert copies.path_of(name) is None, name
        copies.write(name, b"no")
    assert sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    ) == [
        "out/r1/outputs/items/a/features.npz",
        "out/r1/outputs/items/a/video.mp4",
        "video.mp4",
    ]
    # A part deleted in storage goes from the folder too, with the folders it leaves empty.
    copies.write("r1/items/b/segments/00000/part.npz", b"p")
    copies.remove("r1/items/b/segments/00000/part.npz")
    assert not (folder / "items" / "b").exists() and (folder / "items" / "a").is_dir()
    # A folder that cannot take the file (a file is in its way): logged, not raised.
    (folder / "items" / "c").write_bytes(b"in the way")
    with caplog.at_level("WARNING"):
        copies.write("r1/items/c/features.npz", b"x")
    assert "not written to" in caplog.text and "the copy-out will" in caplog.text


def _worker_settings() -> WorkerSettings:
    """A worker's settings as the environment gives them (storage named, never reached)."""
    return WorkerSettings(
        run_id="r1",
        storage_auth="azurite",
        blob_url="http://127.0.0.1:1/devstoreaccount1",
        queue_url="http://127.0.0.1:2/devstoreaccount1",
        table_url="http://127.0.0.1:3/devstoreaccount1",
    )


def test_every_local_file_setting_reaches_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One fact, one place: what LocalFiles hands a worker is read by WorkerSettings under
    the same names, and the worker's loop uses each (a new field must reach it too)."""
    files = LocalFiles(media_root=str(tmp_path), outputs_dir=tmp_path / "o", index_outputs=False)
    environment = files.environment()
    for name in environment:
        assert name.removeprefix("BATCHCTL_").lower() in WorkerSettings.model_fields, name
    assert {f.name for f in dataclasses.fields(LocalFiles)} == {
        "media_root",
        "outputs_dir",
        "index_outputs",
    }, "a new LocalFiles field: hand it to the worker and extend this test"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = _worker_settings()
    assert settings.local_media_root == str(tmp_path)
    assert settings.local_outputs_dir == str((tmp_path / "o").resolve())
    assert settings.index_outputs is False
    assert WorkerConfig.from_settings(settings).index_outputs is False
    # None is said too, so an exported variable of this process never reaches a worker.
    assert LocalFiles().environment() == {
        "BATCHCTL_INDEX_OUTPUTS": "true",
        "BATCHCTL_LOCAL_MEDIA_ROOT": "",
        "BATCHCTL_LOCAL_OUTPUTS_DIR": "",
    }
    for name, value in LocalFiles().environment().items():
        monkeypatch.setenv(name, value)
    unset = _worker_settings()
    assert not unset.local_media_root and not unset.local_outputs_dir and unset.index_outputs


@pytest.mark.parametrize("own_storage", [False, True])
def test_a_run_s_nodes_write_its_folder_and_index_only_storage_a_later_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_storage: bool
) -> None:
    """`batchctl run` hands its session the run's outputs folder (the nodes write it) and
    notes the --skip-existing index only where a later run can read it: not in its private
    Azurite, which is removed at the run's end; `--no-copy` writes no folder."""
    from batchctl.local import session

    seen: list[dict[str, object]] = []

    class SeenError(Exception):
        pass

    @contextlib.contextmanager
    def spy(**kwargs: object) -> Iterator[None]:
        seen.append(kwargs)
        raise SeenError
        yield

    for name in ("BLOB_URL", "QUEUE_URL", "TABLE_URL", "STORAGE_AUTH"):
        monkeypatch.delenv(f"BATCHCTL_{name}", raising=False)
    if own_storage:
        for name, value in azurite_environment(
            "http://127.0.0.1:1/devstoreaccount1",
            "http://127.0.0.1:2/devstoreaccount1",
            "http://127.0.0.1:3/devstoreaccount1",
        ).items():
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(session, "standby_workers", lambda *args, **kwargs: None)
    monkeypatch.setattr(session, "local_session", spy)
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\n")
    for copy_outputs in [True, False] if own_storage else [True]:
        out = tmp_path / f"out-{copy_outputs}"
        with pytest.raises(SeenError):
            session.run_locally(
                manifest, RunOptions(), run_id="r1", nodes=1, out_dir=out, copy_outputs=copy_outputs
            )
        assert seen[-1]["index_outputs"] is own_storage
        assert seen[-1]["outputs_dir"] == (out / "r1" / "outputs" if copy_outputs else None)


def test_the_copy_out_removes_only_what_a_node_can_leave(
    services: Services,
    blob_store: BlobStore,
    ledger: Ledger,
    tmp_path: Path,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listing that lacks a file is no licence to delete it: storage emptied by a rule, or
    a folder that held another session's run of this id. Only a node's partial file and a
    segment's part go; a linked folder is not entered; a file that cannot go is logged."""
    expected = _finished_run(run_id, blob_store, ledger, outputs=4)
    outputs = tmp_path / run_id / "outputs"
    kept = {"items/other-session/echo.txt": b"not in this storage", "notes.txt": b"mine"}
    for name, data in kept.items():
        (outputs / name).parent.mkdir(parents=True, exist_ok=True)
        (outputs / name).write_bytes(data)
    gone = ["items/x/.echo.txt.k2j3.part", "items/long/segments/00001/part.npz"]
    for name in gone:
        (outputs / name).parent.mkdir(parents=True, exist_ok=True)
        (outputs / name).write_bytes(b"left by a node")
    elsewhere = tmp_path / "elsewhere" / "segments"
    elsewhere.mkdir(parents=True)
    (elsewhere / "precious.npz").write_bytes(b"not the run's")
    (outputs / "items" / "linked").symlink_to(elsewhere.parent)
    stuck = "items/y/segments/00000/part.npz"
    (outputs / stuck).parent.mkdir(parents=True)
    (outputs / stuck).write_bytes(b"cannot go")
    unlink = Path.unlink

    def refusing(self: Path, missing_ok: bool = False) -> None:
        if self.name == "part.npz" and "y" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refusing)
    with caplog.at_level("WARNING"):
        controller.copy_run_out(
            services, run_id, tmp_path / run_id, progress=controller.CopyProgress(io.StringIO())
        )
    files = _files(outputs)
    for name, data in {**expected, **kept}.items():
        assert files.pop(name) == data, name
    assert files == {stuck: b"cannot go"}
    assert (elsewhere / "precious.npz").read_bytes() == b"not the run's"
    assert "left" in caplog.text and "Permission denied" in caplog.text
