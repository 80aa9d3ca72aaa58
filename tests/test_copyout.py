"""The concurrent copy-out (issue 25): every output exactly, through faults, with progress,
and ``--no-copy`` leaving the outputs in storage of the user's own.

The copy-out downloads a run's outputs on a bounded pool of threads
(:func:`batchctl.controller.copy_run_out`); these tests hold that it copies every file
whole (names and bytes), that storage faults under the pool leave no partial file, that a
long copy says where it is, and what ``batchctl run --no-copy`` leaves where.
"""

from __future__ import annotations

import csv
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
from batchctl.compute.local import LocalBackend
from batchctl.contracts import ItemResult, ItemStatus, StageTimings
from batchctl.local.runfolder import PRIVATE_STORAGE, new_record, storage_dir, write_record
from batchctl.local.session import local_settings
from batchctl.services import Services, build_services
from batchctl.settings import StorageSettings, azurite_environment
from batchctl.storage import BlobStore, Ledger, retry
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


# -- outputs copied while the run goes on ------------------------------------------------
def test_outputs_mirrored_while_the_run_went_on_end_as_a_whole_copy_with_fewer_downloads(
    services: Services,
    blob_store: BlobStore,
    ledger: Ledger,
    tmp_path: Path,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seeded: outputs appear, some are written again (a duplicate delivery), some vanish,
    # between the mirror's passes and after its last one. The folder must end as a whole
    # copy of what storage holds at the end, and the copy-out downloads only what the mirror
    # did not copy as it is now.
    rng = random.Random(2027)
    expected = _finished_run(run_id, blob_store, ledger, outputs=40)
    downloads: list[str] = []
    original = BlobStore.download_to_file

    def counted(self: BlobStore, container: str, name: str, path: Path) -> int:
        downloads.append(name)
        return original(self, container, name, path)

    monkeypatch.setattr(BlobStore, "download_to_file", counted)
    run_dir = tmp_path / run_id
    mirror = controller.copyout.OutputMirror(services.settings, run_id, run_dir / "outputs")
    for _ in range(4):  # passes while the run goes on, storage changing between them
        for name in rng.sample(sorted(expected), 5):
            expected[name] = rng.randbytes(rng.randrange(1, 3_000))  # written again
            blob_store.upload_bytes("outputs", f"{run_id}/{name}", expected[name])
        new = f"items/late-{rng.randrange(10**6):06d}/echo.txt"
        expected[new] = rng.randbytes(100)
        blob_store.upload_bytes("outputs", f"{run_id}/{new}", expected[new])
        mirror.copy_new(blob_store)
    # A segment's parts, mirrored, then deleted once its item is assembled: their folder
    # must go with them. One more is deleted between the mirror's listing and its download
    # (the pass goes on without it, and leaves no folder for it).
    parts = [f"items/long/segments/{index:05d}/part.npz" for index in range(3)]
    for part in parts:
        blob_store.upload_bytes("outputs", f"{run_id}/{part}", b"a part")
    mirror.copy_new(blob_store)
    raced = f"{run_id}/items/raced/segments/00000/part.npz"
    blob_store.upload_bytes("outputs", raced, b"a part")

    def deleted_before_download(self: BlobStore, container: str, name: str, path: Path) -> int:
        if name == raced:
            blob_store.delete("outputs", raced)
        return counted(self, container, name, path)

    monkeypatch.setattr(BlobStore, "download_to_file", deleted_before_download)
    mirror.copy_new(blob_store)
    assert not (run_dir / "outputs" / "items" / "raced").exists()
    monkeypatch.setattr(BlobStore, "download_to_file", counted)
    for part in parts:
        blob_store.delete("outputs", f"{run_id}/{part}")
    expected["items/long/scores.npz"] = b"assembled"
    blob_store.upload_bytes("outputs", f"{run_id}/items/long/scores.npz", b"assembled")
    # After the mirror's last pass: one rewritten, one new, one deleted.
    rewritten, deleted = rng.sample(sorted(expected), 2)
    expected[rewritten] = b"the last version"
    blob_store.upload_bytes("outputs", f"{run_id}/{rewritten}", expected[rewritten])
    expected["items/last/echo.txt"] = b"finished last"
    blob_store.upload_bytes("outputs", f"{run_id}/items/last/echo.txt", b"finished last")
    del expected[deleted]
    blob_store.delete("outputs", f"{run_id}/{deleted}")
    downloads.clear()
    controller.copy_run_out(
        services,
        run_id,
        run_dir,
        threads=4,
        progress=controller.CopyProgress(io.StringIO()),
        mirrored=mirror.copied,
    )
    assert _files(run_dir / "outputs") == expected
    folders = {
        p.relative_to(run_dir / "outputs").as_posix() for p in (run_dir / "outputs").rglob("*")
    }
    assert not any("segments" in folder for folder in folders), sorted(folders)
    copied_at_end = sorted(name for name in downloads if name.startswith(f"{run_id}/items/"))
    changed = (rewritten, "items/last/echo.txt", "items/long/scores.npz")
    expected_at_end = {f"{run_id}/{name}" for name in changed if name in expected}
    assert copied_at_end == sorted(expected_at_end), (
        "the copy-out downloaded outputs the mirror had already copied as they are"
    )


def test_the_mirror_runs_on_its_own_thread_until_the_run_ends(
    services: Services, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    expected = _finished_run(run_id, blob_store, ledger, outputs=10)
    output_dir = tmp_path / run_id / "outputs"
    with controller.copyout.OutputMirror(
        services.settings, run_id, output_dir, every_s=0.05
    ) as mirror:
        deadline = time.monotonic() + 20
        while len(mirror.copied) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _files(output_dir) == expected
    assert set(mirror.copied) == {f"{run_id}/{name}" for name in expected}


def test_the_last_pass_starts_at_once_and_only_once(
    services: Services, blob_store: BlobStore, ledger: Ledger, tmp_path: Path, run_id: str
) -> None:
    """Once every item is done, the mirror copies the last outputs now, not after its rest
    (here an hour long): the copy-out at the run's end then finds them copied."""
    expected = _finished_run(run_id, blob_store, ledger, outputs=6)
    output_dir = tmp_path / run_id / "outputs"
    passes: list[float] = []
    mirror = controller.copyout.OutputMirror(services.settings, run_id, output_dir, every_s=3600)
    counted = mirror.copy_new

    def copy_new(store: BlobStore) -> int:
        passes.append(time.monotonic())
        return counted(store)

    mirror.copy_new = copy_new  # type: ignore[method-assign]
    with mirror:
        time.sleep(0.3)
        assert passes == []  # resting
        began = time.monotonic()
        mirror.last_pass()
        mirror.last_pass()  # the status says so at every look: one pass, not one a look
        deadline = began + 20
        while len(mirror.copied) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(passes) == 1 and passes[0] - began < 5, passes
        time.sleep(0.3)
        assert len(passes) == 1, "a second pass came before the rest was over"
    assert _files(output_dir) == expected


def test_the_last_pass_is_due_once_no_item_remains() -> None:
    from batchctl.local.session import outputs_all_in

    assert outputs_all_in({"total": 24, "remaining": 0, "phase": "running"})
    assert not outputs_all_in({"total": 24, "remaining": 3, "phase": "running"})
    assert not outputs_all_in({"total": 0, "remaining": 0, "phase": "validating"})
    assert not outputs_all_in({"phase": "starting"})  # no counts yet


def test_the_mirror_rests_longer_after_longer_passes() -> None:
    # A pass lists every output so far: on a large run the mirror must not list without rest.
    rest = controller.copyout.mirror_rest_s
    assert rest(1.0, 0.01) == 1.0  # a small run: once a second
    assert rest(1.0, 30.0) == 30.0 * controller.copyout.MIRROR_REST_FACTOR
    share = [p / (p + rest(1.0, p)) for p in (0.5, 5.0, 60.0, 600.0)]
    assert max(share) <= 1 / (1 + controller.copyout.MIRROR_REST_FACTOR) + 1e-9
