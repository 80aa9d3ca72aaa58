"""The user's own work travels as data (batchctl.artifacts, node_image/worker/ownwork.py):
packing, every refusal, and a node that checks what it receives."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from batchctl.artifacts import (
    CODE_PACKAGE_NAME,
    ArtifactError,
    ArtifactMismatchError,
    ArtifactStore,
    model_file_of,
    pack_code,
    parse_ref,
    publish_own_work,
    unpack_code,
    with_model_ref,
)
from batchctl.commands.validate import BadInputError, check_local_task
from batchctl.contracts import RunOptions
from batchctl.settings import StorageSettings
from batchctl.storage import BlobStore
from node_image.worker.errors import TaskConfigError
from node_image.worker.ownwork import install_code, own_work_factory
from node_image.worker.tasks import Task, TaskSetup

TASK_SOURCE = """
from mypkg.helpers import SIGNATURE


class Task:
    signature = SIGNATURE

    def setup(self, setup):
        self.model = setup.options.model

    def process(self, item):
        raise NotImplementedError

    def close(self):
        pass
"""


def _package(root: Path, signature: str = "one") -> Path:
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "helpers.py").write_text(f"SIGNATURE = {signature!r}\n")
    (root / "mypkg" / "task.py").write_text(TASK_SOURCE)
    return root


@pytest.fixture
def store(storage_settings: StorageSettings) -> BlobStore:
    blobs = BlobStore(storage_settings)
    blobs.ensure_containers()
    return blobs


# -- packing ---------------------------------------------------------------------------------
def test_a_package_depends_on_content_only(tmp_path: Path) -> None:
    root = _package(tmp_path / "code")
    first = pack_code(root)
    os.utime(root / "mypkg" / "helpers.py", (1, 1))
    (root / "mypkg" / "__pycache__").mkdir()
    (root / "mypkg" / "__pycache__" / "helpers.cpython-311.pyc").write_bytes(b"cache")
    assert pack_code(root) == first
    (root / "mypkg" / "helpers.py").write_text("SIGNATURE = 'two'\n")
    assert pack_code(root) != first


def test_ignore_files_are_honoured(tmp_path: Path) -> None:
    root = _package(tmp_path / "code")
    (root / ".gitignore").write_text("*.log\ndata/\n")
    (root / ".batchctlignore").write_text("notes.txt\n")
    (root / "run.log").write_text("x")
    (root / "notes.txt").write_text("x")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"x")
    names = set(zipfile.ZipFile(io.BytesIO(pack_code(root))).namelist())
    assert names == {
        ".batchctlignore",
        ".gitignore",
        "mypkg/__init__.py",
        "mypkg/helpers.py",
        "mypkg/task.py",
    }


def test_a_symlink_out_of_the_folder_is_refused_naming_it(tmp_path: Path) -> None:
    root = _package(tmp_path / "code")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the fleet")
    (root / "mypkg" / "leak.txt").symlink_to(secret)
    with pytest.raises(ArtifactError, match=r"leak\.txt: a symlink leading out of"):
        pack_code(root)


def test_a_symlink_inside_the_folder_packs_its_target(tmp_path: Path) -> None:
    root = _package(tmp_path / "code")
    (root / "mypkg" / "alias.py").symlink_to(root / "mypkg" / "helpers.py")
    archive = zipfile.ZipFile(io.BytesIO(pack_code(root)))
    assert archive.read("mypkg/alias.py") == archive.read("mypkg/helpers.py")


def test_files_and_packages_over_their_limits_are_refused_naming_the_file(tmp_path: Path) -> None:
    root = _package(tmp_path / "code")
    (root / "weights.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(ArtifactError, match=r"weights\.bin: 2048 bytes, over the 1024-byte"):
        pack_code(root, max_file_bytes=1024)
    with pytest.raises(ArtifactError, match="over the 1500-byte limit for a code package"):
        pack_code(root, max_package_bytes=1500)


@pytest.mark.parametrize(
    "entry", ["../evil.py", "/etc/evil.py", "mypkg/../../evil.py", "C:/evil.py", "a\\..\\evil.py"]
)
def test_a_tampered_package_cannot_write_outside_its_folder(tmp_path: Path, entry: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mypkg/ok.py", "x = 1\n")
        archive.writestr(entry, "import os\n")
    destination = tmp_path / "unpacked"
    with pytest.raises(ArtifactError, match="would land outside its folder"):
        unpack_code(buffer.getvalue(), destination)
    assert not (tmp_path / "evil.py").exists()


def test_a_symlink_entry_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("mypkg/link")
        info.external_attr = (0o120777) << 16  # a symlink's mode
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ArtifactError, match="is a symlink"):
        unpack_code(buffer.getvalue(), tmp_path / "unpacked")


# -- references ------------------------------------------------------------------------------
def test_model_values_and_their_references(tmp_path: Path) -> None:
    model = tmp_path / "m.keras"
    model.write_bytes(b"model")
    assert model_file_of(str(model)) == model
    assert model_file_of("MobileNetV3Small") is None
    assert model_file_of("/not/here.keras") is None  # a path on the node's disk, kept
    ref = parse_ref("sha256:" + "a" * 64 + "/w.weights.h5")
    assert ref is not None
    assert with_model_ref(f"ResNet50@{model}", ref) == f"ResNet50@{ref}"
    assert parse_ref("sha256:" + "a" * 63 + "/x") is None
    assert parse_ref("sha256:" + "a" * 64 + "/../x") is None


@pytest.mark.azurite
def test_publishing_uploads_once_by_content_and_names_references(
    tmp_path: Path, store: BlobStore, storage_settings: StorageSettings
) -> None:
    model = tmp_path / "tiny.keras"
    model.write_bytes(b"a model's bytes")
    code = _package(tmp_path / "code")
    options = RunOptions(task="mypkg.task:Task", model=str(model), code=str(code))
    published = publish_own_work(options, store, storage_settings.media_container)
    model_ref, code_ref = parse_ref(published.model), parse_ref(published.code or "")
    assert model_ref is not None and model_ref.name == "tiny.keras"
    assert code_ref is not None and code_ref.name == CODE_PACKAGE_NAME
    assert str(tmp_path) not in published.model_dump_json()
    # The same work again: the same references (content-addressed).
    assert publish_own_work(options, store, storage_settings.media_container) == published


# -- the node: fetch, check, unpack, import ---------------------------------------------------
@pytest.mark.azurite
def test_a_node_refuses_a_model_or_package_whose_content_changed(
    tmp_path: Path, store: BlobStore, storage_settings: StorageSettings
) -> None:
    container = storage_settings.media_container
    artifacts = ArtifactStore(store, container)
    model = tmp_path / "m.keras"
    model.write_bytes(b"the user's model")
    ref = artifacts.put_file(model)
    store.upload_bytes(container, ref.blob_name, b"someone else's model", overwrite=True)
    with pytest.raises(ArtifactMismatchError, match="not what the run names"):
        artifacts.fetch(ref, tmp_path / "cache")

    code_ref = artifacts.put_bytes(pack_code(_package(tmp_path / "code")), CODE_PACKAGE_NAME)
    store.upload_bytes(container, code_ref.blob_name, b"PK tampered", overwrite=True)

    def never(setup: TaskSetup) -> Task:
        raise AssertionError("a refused package must not reach the task")

    factory = own_work_factory(store, container, tmp_path / "node-cache", never)
    options = RunOptions(task="mypkg.task:Task", code=str(code_ref))
    with pytest.raises(TaskConfigError, match="not what the run names"):
        factory(TaskSetup(options=options.task_settings()))


@pytest.mark.azurite
def test_a_requirements_file_that_fails_to_install_refuses_the_task(
    tmp_path: Path, store: BlobStore, storage_settings: StorageSettings
) -> None:
    code = _package(tmp_path / "code")
    (code / "requirements.txt").write_text("this is not a requirement ==!\n")
    artifacts = ArtifactStore(store, storage_settings.media_container)
    ref = artifacts.put_bytes(pack_code(code), CODE_PACKAGE_NAME)
    with pytest.raises(TaskConfigError, match=r"requirements\.txt failed to install"):
        install_code(str(ref), artifacts, tmp_path / "node-cache")


def test_a_task_that_does_not_import_from_its_code_folder_is_refused_here(tmp_path: Path) -> None:
    code = _package(tmp_path / "code")
    (code / "mypkg" / "task.py").write_text("import no_such_module_anywhere\n")
    with pytest.raises(BadInputError, match="cannot be imported: No module named"):
        check_local_task("mypkg.task:Task", str(code))
    # A good package imports, from its folder only, and leaves nothing imported behind.
    good = _package(tmp_path / "good", "good")
    check_local_task("mypkg.task:Task", str(good))
    import sys

    assert "mypkg.task" not in sys.modules


@pytest.mark.azurite
@pytest.mark.slow
@pytest.mark.parametrize("broken", ["import", "requirements"])
def test_a_task_that_cannot_start_stops_the_run_with_its_reason_before_any_item_fails(
    tmp_path: Path, broken: str
) -> None:
    from batchctl.contracts import RunPhase
    from batchctl.local.session import run_locally

    code = _package(tmp_path / "code")
    if broken == "import":
        (code / "mypkg" / "task.py").write_text("import no_such_module_anywhere\n")
        reason = "No module named 'no_such_module_anywhere'"
    else:
        (code / "requirements.txt").write_text("this is not a requirement ==!\n")
        reason = "requirements.txt failed to install"
    (tmp_path / "media").mkdir()
    rows = "".join(f"v{i},media/v{i}.mp4\n" for i in range(4))
    for index in range(4):
        (tmp_path / "media" / f"v{index}.mp4").write_bytes(b"never read")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,video\n" + rows)
    result = run_locally(
        manifest,
        RunOptions(task="mypkg.task:Task", code=str(code), poll_interval_s=0.3, idle_exit_s=0.5),
        run_id=f"refused-{broken}",
        nodes=1,
        out_dir=tmp_path / "out",
    )
    report = result.report
    assert report.phase is RunPhase.FAILED
    assert "could not start" in report.message and reason in report.message, report.message
    # No item was failed one by one: each is recorded as not run, with the run's reason.
    assert (report.succeeded, report.failed, report.not_run) == (0, 0, 4)


@pytest.mark.azurite
def test_a_reference_this_storage_does_not_hold_is_refused_with_what_to_do(
    tmp_path: Path, store: BlobStore, storage_settings: StorageSettings
) -> None:
    # A local retry names its parent's uploads, which went with the parent's storage.
    gone = "sha256:" + "b" * 64 + "/tiny.keras"
    with pytest.raises(ArtifactError, match="give --model FILE and --code DIR again"):
        publish_own_work(RunOptions(model=gone), store, storage_settings.media_container)


@pytest.mark.azurite
def test_a_packages_requirements_come_after_the_images_own_packages(
    tmp_path: Path,
    store: BlobStore,
    storage_settings: StorageSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    import node_image.worker.ownwork as ownwork

    code = _package(tmp_path / "code")
    (code / "requirements.txt").write_text("somepackage\n")

    def fake_install(requirements: Path, target: Path) -> None:
        # pip at its boundary: what it leaves is a folder of packages.
        (target / "somepackage.py").write_text("VALUE = 1\n")

    monkeypatch.setattr(ownwork, "_pip_install", fake_install)
    monkeypatch.setattr(sys, "path", list(sys.path))
    artifacts = ArtifactStore(store, storage_settings.media_container)
    ref = artifacts.put_bytes(pack_code(code), CODE_PACKAGE_NAME)
    seen: list[str] = []

    def create(setup: TaskSetup) -> Task:
        seen.extend(sys.path)
        raise AssertionError("stop here")

    factory = own_work_factory(store, storage_settings.media_container, tmp_path / "c", create)
    with pytest.raises(AssertionError, match="stop here"):
        factory(
            TaskSetup(options=RunOptions(task="mypkg.task:Task", code=str(ref)).task_settings())
        )
    folders = [p for p in seen if "batchctl-" in p or p.startswith(str(tmp_path / "c"))]
    assert folders[0].endswith("-code") and seen.index(folders[0]) == 0
    assert folders[-1].endswith("-site") and seen[-1] == folders[-1]
