"""End to end on one machine: Azurite, real ffmpeg-encoded videos, a small real Keras model,
worker processes as nodes, and the very orchestrator Azure runs (through the local driver)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from batchctl.contracts import ErrorBudget, RunOptions, RunPhase
from batchctl.local.azurite import Azurite
from batchctl.local.samples import encode_sample
from batchctl.local.session import EXIT_ITEMS_FAILED, run_locally
from batchctl.outputs_index import IndexEntry
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore, Ledger, RunQueues

pytestmark = [pytest.mark.azurite, pytest.mark.slow]


def _tiny_model(path: Path) -> Path:
    """A small real CNN saved as .keras: the worker loads it like any model file."""
    import keras

    inputs = keras.Input(shape=(64, 64, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(16)(x)
    keras.Model(inputs, outputs).save(path)
    return path


def _processes_of(run_id: str) -> list[int]:
    """Live processes started for this run (their environment names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if f"BATCHCTL_RUN_ID={run_id}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def test_a_manifest_runs_end_to_end(
    tmp_path: Path,
    azurite: Azurite,
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    videos = tmp_path / "videos"
    clips = [
        ("a.mp4", "testsrc2", 3, "320x240"),
        ("b.mp4", "smptebars", 2, "160x120"),
        ("c.mp4", "mandelbrot", 4, "256x144"),
        ("d.mp4", "testsrc", 2, "320x240"),
    ]
    for name, source, seconds, size in clips:
        encode_sample(videos / name, source, seconds, size)
    (videos / "broken.mp4").write_text("this is not a video")
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "label"])
        for name, *_ in clips:
            writer.writerow([f"videos/{name}", name[0]])
        writer.writerow(["videos/broken.mp4", "x"])
        writer.writerow(["../outside.mp4", "escape"])  # invalid: outside the manifest folder
    model = _tiny_model(tmp_path / "tiny.keras")
    run_id = "e2e-1"
    options = RunOptions(
        model=str(model),
        frame_size=64,
        fps=1,
        poll_interval_s=1,
        idle_exit_s=3,
        max_attempts=2,
        error_budget=ErrorBudget(max_failed=1),  # the broken video is expected to fail
    )
    downloads: list[str] = []
    download = BlobStore.download_to_file

    def counted(self: BlobStore, container: str, name: str, path: Path) -> int:
        downloads.append(f"{container}/{name}")
        return download(self, container, name, path)

    monkeypatch.setattr(BlobStore, "download_to_file", counted)
    result = run_locally(manifest, options, run_id=run_id, nodes=2, out_dir=tmp_path / "out")

    report = result.report
    assert report.phase is RunPhase.COMPLETED, report.message
    assert (report.total, report.succeeded, report.failed, report.invalid) == (5, 4, 1, 1)
    assert result.exit_code == EXIT_ITEMS_FAILED
    # The report names the weights the features came from, by content: the nodes loaded
    # the uploaded copy of the user's file (batchctl.artifacts), never the file itself.
    assert hashlib.sha256(model.read_bytes()).hexdigest()[:16] in report.weights
    assert str(model) not in report.weights
    # Exactly one terminal record per valid row.
    counts = Ledger(storage_settings).counts(run_id)
    assert (counts.succeeded, counts.failed) == (4, 1)
    failures = Ledger(storage_settings).failures(run_id)
    assert failures[0].error is not None and failures[0].error.permanent
    # Outputs for every succeeded item, copied out with the report.
    saved = json.loads(result.report_path.read_text())
    assert saved["run_id"] == run_id and saved["succeeded"] == 4
    # Items in a folder of their own (items/), beside the run-level merged/ when merged.
    item_dirs = [p for p in (result.output_dir / "items").iterdir() if p.is_dir()]
    assert len(item_dirs) == 4
    # The nodes wrote them there as they uploaded them: the copy-out downloaded none (only
    # the run's own files); and the videos were read where they are, never uploaded.
    assert downloads and not [d for d in downloads if d.startswith(f"outputs/{run_id}/")]
    store = BlobStore(storage_settings)
    clip_names = {name for name, *_ in clips} | {"broken.mp4"}
    media = store.list_names(storage_settings.media_container, "")
    assert not [name for name in media if name.rsplit("/", 1)[-1] in clip_names], media
    # Storage of the user's own: later runs read the --skip-existing index, so it is there.
    index = [
        IndexEntry.model_validate_json(store.download_bytes(storage_settings.outputs_container, n))
        for n in store.list_names(storage_settings.outputs_container, "_index/")
    ]
    assert sum(entry.run_id == run_id for entry in index) == 4
    store.close()
    # Teardown: every worker process gone, run queues deleted.
    assert _processes_of(run_id) == []
    assert RunQueues(storage_settings, run_id).exists() == {"input": False}
    # Every worker log line names the run; every line about an item names the item.
    log_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    lines = [
        line
        for path in (tmp_path / "out" / run_id / "logs").glob("*.log")
        for line in path.read_text().splitlines()
        if log_line.match(line)
    ]
    assert lines and all(f"run={run_id} " in line for line in lines)
    done = [line for line in lines if " succeeded: " in line]
    assert len(done) == 4 and all("item=-" not in line for line in done)
    errors = (tmp_path / "out" / run_id / "manifest-errors.jsonl").read_text()
    assert '"row":7' in errors.replace(" ", "")
    assert os.environ["BATCHCTL_BLOB_URL"] == azurite.blob_url


def test_a_transform_run_with_segments_gives_one_video_per_item(
    tmp_path: Path,
    azurite: Azurite,
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``batchctl run --task transform --segment-seconds``: the long video is cut into
    segments on two worker processes and comes back as one video with every frame and its
    audio; the short one runs whole."""
    import subprocess

    import keras
    import numpy as np

    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    videos = tmp_path / "videos"
    videos.mkdir()
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=60",
         "-f", "lavfi", "-i", "sine=frequency=440:duration=60",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "17", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-shortest", str(videos / "long.mp4")],
        check=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    encode_sample(videos / "short.mp4", "testsrc", 2, "64x48")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,video\nlong,videos/long.mp4\nshort,videos/short.mp4\n")
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(3, 1)
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([-np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.ones(3, np.float32)])
    model.save(tmp_path / "invert.keras")
    options = RunOptions(
        task="transform",
        model=str(tmp_path / "invert.keras"),
        segment_seconds=20,
        poll_interval_s=1,
        idle_exit_s=3,
    )
    result = run_locally(manifest, options, run_id="e2e-tx", nodes=2, out_dir=tmp_path / "out")
    report = result.report
    assert report.phase is RunPhase.COMPLETED, report.message
    assert (report.total, report.succeeded, report.failed) == (2, 2, 0)
    ledger = Ledger(storage_settings)
    assert ledger.counts("e2e-tx").succeeded == 2  # segment rows are no records
    assert sorted(ledger.segment_payloads("e2e-tx", "long")) == [0, 1, 2]
    assert ledger.segment_payloads("e2e-tx", "short") == {}
    video = result.output_dir / "items" / "long" / "video.mp4"
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries",
         "stream=codec_type,nb_read_packets,duration", "-of", "json", str(video)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    streams = {s["codec_type"]: s for s in json.loads(probe.stdout)["streams"]}
    assert int(streams["video"]["nb_read_packets"]) == 600
    assert float(streams["audio"]["duration"]) == pytest.approx(60, abs=0.1)
    metadata = json.loads((video.parent / "metadata.json").read_text())
    assert metadata["frames"] == 600 and metadata["segments"]["frames"] == [200, 200, 200]
    assert _processes_of("e2e-tx") == []
