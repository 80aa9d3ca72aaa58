"""`batchctl task new NAME`: the package it writes imports, travels as it should and runs end
to end (whole and in segments); the guide's worked example is that very package; names and
folders it must not take are refused in one line.

The guide (docs/own-work.md) and the scaffold share one template (batchctl/scaffold.py): the
guide shows each file in a fenced block whose info string names it (``python
title=mywork/mywork/task.py``), and the first test holds those blocks equal to the template,
so the slow test's run of the written package is a run of the guide's example too.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import runpy
import zipfile
from pathlib import Path

import numpy as np
import pytest

from batchctl import cli, scaffold
from batchctl.artifacts import pack_code
from batchctl.commands.validate import check_local_task
from batchctl.contracts import RunOptions, RunPhase
from batchctl.local.azurite import Azurite
from batchctl.local.samples import encode_sample
from batchctl.local.session import run_locally

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "own-work.md"
# The guide's example is the template under its own name.
NAME = scaffold.PLACEHOLDER
EXAMPLE_BLOCK = re.compile(r"^```[\w-]* title=(\S+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
OUTPUT_FILES = ["metadata.json", "scores.npz", "summary.json"]


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def guide_files() -> dict[str, str]:
    """The files the guide shows, by the path its blocks' info strings name."""
    found: dict[str, str] = {}
    for path, text in EXAMPLE_BLOCK.findall(GUIDE.read_text(encoding="utf-8")):
        assert path not in found, f"{GUIDE.name} shows {path} twice"
        found[path] = text
    return found


# -- the guide and the template ----------------------------------------------------------------
def test_the_guides_worked_example_is_the_scaffolds_template() -> None:
    shown = guide_files()
    # Every file of the package but its README (the guide says the same in its own words).
    expected = {
        path: text for path, text in scaffold.render(NAME).items() if path != scaffold.README_FILE
    }
    assert sorted(shown) == sorted(expected)
    for path, text in expected.items():
        assert shown[path] == text, (
            f"{GUIDE.name}'s {path} is not batchctl/scaffold.py's: copy the template's text "
            f"(scaffold.render({NAME!r})[{path!r}]) into the guide's block"
        )
    guide = GUIDE.read_text(encoding="utf-8")
    for command in (*scaffold.TRY_COMMANDS, scaffold.AZURE_COMMAND):
        assert command in guide, f"the guide lacks the scaffold's command {command!r}"


# -- the written package ---------------------------------------------------------------------
def test_task_new_writes_a_package_that_imports_and_packs_as_the_guide_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, "task", "new", "clips", "--dir", str(tmp_path), "--json")

    assert code == 0, err
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["task"] == "clips.task:MyTask"
    folder = tmp_path / "clips"
    written = sorted(p.relative_to(tmp_path).as_posix() for p in folder.rglob("*") if p.is_file())
    assert written == sorted(scaffold.render("clips")) == answer["files"]
    assert all(NAME not in (tmp_path / path).read_text() for path in written)
    assert "clips.task:MyTask" in err  # the commands to try it are printed
    # Imports from its code folder as a local run's check does (no Keras at import time).
    check_local_task("clips.task:MyTask", str(folder))
    # No requirement yet: nothing for a node to install.
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert [line for line in requirements if line.strip() and not line.startswith("#")] == []
    # What travels: the package and its root files; .batchctlignore keeps the model script,
    # a model and videos put in the folder here.
    (folder / "tiny.keras").write_bytes(b"a model")
    (folder / "clip.mp4").write_bytes(b"a video")
    packed = set(zipfile.ZipFile(io.BytesIO(pack_code(folder))).namelist())
    assert packed == {
        ".batchctlignore",
        "README.md",
        "requirements.txt",
        "clips/__init__.py",
        "clips/helpers.py",
        "clips/task.py",
    }


@pytest.mark.azurite
@pytest.mark.slow
def test_the_written_package_runs_end_to_end_whole_and_in_segments(
    tmp_path: Path,
    azurite: Azurite,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for variable, value in azurite.environment().items():
        monkeypatch.setenv(variable, value)
    code, _, err = call(capsys, "task", "new", NAME, "--dir", str(tmp_path))
    assert code == 0, err
    folder = tmp_path / NAME
    task = scaffold.task_reference(NAME)
    check_local_task(task, str(folder))
    # The package's own script makes the model, at a small input size for speed.
    model = tmp_path / "tiny.keras"
    runpy.run_path(str(folder / "make_model.py"))["main"]([str(model), "--size", "32"])
    for clip in ("a", "b"):
        encode_sample(tmp_path / "videos" / f"{clip}.mp4", "testsrc2", 2, "160x120")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,video\na,videos/a.mp4\nb,videos/b.mp4\n")
    options = RunOptions(
        task=task,
        code=str(folder),
        model=str(model),
        frame_size=32,
        fps=2,
        poll_interval_s=1,
        idle_exit_s=3,
        max_attempts=1,  # a broken task shows at once, not after retries
    )
    out = tmp_path / "out"

    whole = run_locally(manifest, options, run_id="scaffold-whole", nodes=1, out_dir=out)
    # 2 s videos in 1 s segments: each item is two segments, joined by the task's assemble.
    split_options = options.model_copy(update={"segment_seconds": 1.0})
    split = run_locally(manifest, split_options, run_id="scaffold-split", nodes=1, out_dir=out)

    for result in (whole, split):
        report = result.report
        assert report.phase is RunPhase.COMPLETED, report.message
        assert (report.succeeded, report.failed, report.not_run) == (2, 0, 0)
    package_digest = hashlib.sha256(pack_code(folder)).hexdigest()
    model_digest = hashlib.sha256(model.read_bytes()).hexdigest()
    for clip in ("a", "b"):
        one, two = (result.output_dir / "items" / clip for result in (whole, split))
        assert sorted(p.name for p in one.iterdir()) == OUTPUT_FILES
        assert sorted(p.name for p in two.iterdir()) == OUTPUT_FILES
        metadata = json.loads((one / "metadata.json").read_text())
        # What ran, by reference: the uploaded package and model, never a local path.
        assert metadata["task"] == task
        assert metadata["ran"]["code"] == f"sha256:{package_digest}/code.zip"
        assert metadata["ran"]["model"] == f"sha256:{model_digest}/tiny.keras"
        assert metadata["duration_s"] == pytest.approx(2.0, abs=0.1)
        with np.load(one / "scores.npz") as rows:
            scores, light, times = rows["scores"], rows["brightness"], rows["timestamps"]
        # 2 s at 2 frames a second; 4 numbers a frame from make_model's model.
        assert np.allclose(times, [0.0, 0.5, 1.0, 1.5])
        assert scores.shape == (4, 4) and scores.dtype == np.float32
        assert np.all((light > 0) & (light < 1))
        summary = json.loads((one / "summary.json").read_text())
        assert summary["frames"] == metadata["frames"] == 4
        assert summary["mean_brightness"] == pytest.approx(float(light.mean()), abs=1e-5)
        # The assembled item is the whole run's item, sample for sample.
        assert json.loads((two / "metadata.json").read_text())["segments"] == 2
        with np.load(two / "scores.npz") as joined:
            assert np.array_equal(joined["timestamps"], times)
            assert np.allclose(joined["scores"], scores, atol=1e-5)
            assert np.allclose(joined["brightness"], light)
        assert json.loads((two / "summary.json").read_text()) == summary


# -- refusals ----------------------------------------------------------------------------------
def test_an_existing_folder_is_never_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / NAME / "mine.py"
    mine.parent.mkdir()
    mine.write_text("my own work\n")
    (tmp_path / "clips").write_text("a file, not a folder\n")

    for name in (NAME, "clips"):
        code, out, err = call(capsys, "task", "new", name, "--dir", str(tmp_path))

        assert code == 3
        assert out == "" and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert f"{tmp_path / name} exists already" in err
    assert [p.name for p in mine.parent.iterdir()] == ["mine.py"]
    assert mine.read_text() == "my own work\n"
    assert (tmp_path / "clips").read_text() == "a file, not a folder\n"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("my-work", "not a valid Python identifier"),
        ("2fast", "not a valid Python identifier"),
        ("class", "not a valid Python identifier"),
        ("", "not a valid Python identifier"),
        ("my work", "not a valid Python identifier"),
        ("json", "a Python standard module's name"),
        ("numpy", "an installed module's name"),
        ("worker", "batchctl's own name"),
    ],
)
def test_a_name_that_cannot_name_a_package_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, why: str
) -> None:
    code, out, err = call(capsys, "task", "new", name, "--dir", str(tmp_path), "--json")

    assert code == 3
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("batchctl task: NAME: ") and why in err
    answer = json.loads(out.strip())
    assert (answer["flag"], answer["exit_code"]) == ("NAME", 3)
    assert list(tmp_path.iterdir()) == []  # nothing written
