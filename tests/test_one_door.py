"""One door: `batchctl run` reaches its run through the app's HTTP API, as `submit` does.

The local app (batchctl.local.app) serves the same handlers and the same HTTP server as
`batchctl serve` on a loopback port; the run is started with `POST /api/runs`, followed with
`GET /api/runs/{id}` and cancelled (first Ctrl-C) with `POST /api/runs/{id}/cancel`. The
server's own request log is the witness.

The commands that start or look at runs get their target from one factory
(batchctl.commands.target) and have no local/app fork of their own: the code's own imports
say so. A retry keeps every option of its parent on either target: the start request's
orchestration input, as the app's real handler hands it to the Durable client, is the witness.
"""

from __future__ import annotations

import _thread
import ast
import csv
import io
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batchctl import cli
from batchctl.artifacts import parse_ref
from batchctl.commands.run import ProgressPrinter
from batchctl.commands.target import RunSpec, open_local, runs_here
from batchctl.commands.validate import BadInputError
from batchctl.contracts import Flag, RunOptions, RunPhase, flag_of
from batchctl.local.azurite import Azurite
from batchctl.local.server import LocalDurableClient
from batchctl.local.session import run_locally
from batchctl.storage import BlobStore
from tests import test_client, worker_tasks
from tests.parent_runs import write_parent_folder
from tests.test_client import FakeApp
from tests.test_option_declaration import ALL_OPTIONS, default_of, other_value

# test_client's fake app (an HTTP server whose /api routes are the app's real handlers), as
# a fixture of this module too.
fake_app = test_client.app

REPO = Path(__file__).resolve().parent.parent
COMMANDS = REPO / "batchctl" / "commands"
# The commands that start, follow or look at runs: each gets its app from the factory.
ONE_DOOR_COMMANDS = ("run", "submit", "trial", "retry", "status", "cancel", "report")
FACTORY = "batchctl.commands.target"

REQUEST_LINE = re.compile(r'"(GET|POST|DELETE) (\S+) HTTP/1\.1" (\d{3})')


def _manifest(folder: Path, count: int) -> Path:
    (folder / "media").mkdir()
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(count):
            (folder / "media" / f"v{index}.mp4").write_bytes(f"video {index}".encode())
            writer.writerow([f"item-{index}", f"media/v{index}.mp4"])
    return manifest


def _requests(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int]]:
    found = []
    for record in caplog.records:
        if record.name == "batchctl.serve":
            match = REQUEST_LINE.search(record.getMessage())
            if match:
                found.append((match[1], match[2].split("?")[0], int(match[3])))
    return found


@pytest.mark.azurite
@pytest.mark.slow
def test_a_local_run_is_started_followed_and_reported_through_the_http_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchctl.serve")
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "0.05")
    manifest = _manifest(tmp_path, 3)
    seen: list[dict[str, object]] = []
    result = run_locally(
        manifest,
        RunOptions(task="tests.worker_tasks:QuickTask", poll_interval_s=0.3, idle_exit_s=0.5),
        run_id="one-door",
        nodes=1,
        out_dir=tmp_path / "out",
        on_status=seen.append,
    )
    assert result.report.phase is RunPhase.COMPLETED
    assert result.report.succeeded == 3
    requests = _requests(caplog)
    assert requests[0] == ("POST", "/api/runs", 202), requests[:3]
    polls = [r for r in requests if r[:2] == ("GET", "/api/runs/one-door")]
    assert polls and all(status == 200 for _, _, status in polls)
    # What the live view saw is the app's run-status view, ending with the run's end.
    assert seen and seen[-1]["runtime_status"] == "Completed"
    assert seen[-1]["succeeded"] == 3
    # The report names the manifest as the user gave it (it travelled in the start body).
    assert result.report.manifest_label == str(manifest.resolve())


@pytest.mark.azurite
@pytest.mark.slow
def test_the_first_ctrl_c_cancels_through_the_cancel_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="batchctl.serve")
    monkeypatch.setenv(worker_tasks.ITEM_SECONDS_ENV, "2")
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    monkeypatch.setenv(worker_tasks.MARKER_DIR_ENV, str(marker_dir))
    manifest = _manifest(tmp_path, 12)

    def interrupt_once_working() -> None:
        deadline = time.monotonic() + 60
        while not list(marker_dir.glob("*.started.*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()  # as Ctrl-C: KeyboardInterrupt in the main thread

    threading.Thread(target=interrupt_once_working, daemon=True).start()
    result = run_locally(
        manifest,
        RunOptions(task="tests.worker_tasks:QuickTask", poll_interval_s=0.3, idle_exit_s=0.5),
        run_id="ctrl-c",
        nodes=1,
        out_dir=tmp_path / "out",
    )
    assert result.report.phase is RunPhase.CANCELLED
    assert result.report.succeeded + result.report.not_run == 12
    assert result.report.not_run > 0
    assert ("POST", "/api/runs/ctrl-c/cancel", 202) in _requests(caplog)


# -- no local/app fork in the commands --------------------------------------------------------
def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as written."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def local_imports(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "batchctl.local" or m.startswith("batchctl.local.")}


@pytest.mark.parametrize("name", ONE_DOOR_COMMANDS)
def test_the_commands_reach_the_local_app_only_through_the_target_factory(name: str) -> None:
    imported = imported_modules(COMMANDS / f"{name}.py")
    assert local_imports(imported) == set(), (
        f"batchctl/commands/{name}.py imports the local app's parts itself: go through "
        f"{FACTORY} (open_target, open_local, open_app, connect)"
    )
    # Nor do they build an app client their own way: the factory's connect() is the one.
    assert "batchctl.client.AppClient.from_environment" not in imported
    source = (COMMANDS / f"{name}.py").read_text()
    assert "AppClient(" not in source and ".from_environment(" not in source


def test_the_factory_is_the_one_command_module_that_reaches_the_local_app() -> None:
    reaching = {
        path.stem for path in COMMANDS.glob("*.py") if local_imports(imported_modules(path))
    }
    # serve, watch and resume are the local app's own commands (this machine's only), and
    # demo writes its sample videos with batchctl.local.samples; none starts a run of its own
    # way: they are not among the commands a deployed app also answers.
    assert "target" in reaching
    assert reaching.isdisjoint(ONE_DOOR_COMMANDS)


def test_the_detector_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    forked = tmp_path / "forked.py"
    forked.write_text(
        "def handle(args):\n"
        "    if args.app:\n"
        "        return 1\n"
        "    from batchctl.local.session import run_locally\n"
        "    return run_locally\n"
    )
    assert local_imports(imported_modules(forked)) == {
        "batchctl.local.session",
        "batchctl.local.session.run_locally",
    }


def test_the_commands_are_the_top_layer() -> None:
    """Only the CLI and the commands import the commands: the local app follows a run with
    the client's own ``follow`` (it once borrowed batchctl.commands.status's)."""
    below = {
        str(path.relative_to(REPO))
        for path in (REPO / "batchctl").rglob("*.py")
        if path.parent != COMMANDS
        and path.name != "cli.py"
        and any(m.startswith("batchctl.commands") for m in imported_modules(path))
    }
    assert below == set()


def test_the_live_view_is_the_one_rate_and_eta_computation() -> None:
    """A followed run's rate and ETA are the live view's (batchctl.progressview): no command
    that follows a run, nor the target factory, keeps a tracker of its own beside the view
    it feeds (status.py once did), and no other module keeps a Throughput. The dashboards
    compute theirs from their own samples with the same functions (batchctl.throughput)."""
    for name in (*ONE_DOOR_COMMANDS, "target"):
        imported = imported_modules(COMMANDS / f"{name}.py")
        assert not {m for m in imported if m.startswith("batchctl.throughput")}, name
    keeping = {
        str(path.relative_to(REPO))
        for path in (REPO / "batchctl").rglob("*.py")
        if "batchctl.throughput.Throughput" in imported_modules(path)
    }
    assert keeping == {"batchctl/progressview.py"}


# -- a retry keeps every option, here and on the app --------------------------------------------
class StartedError(Exception):
    """Raised by the Durable client where the retry's run would begin."""


def parent_options(code_folder: Path, names: tuple[str, ...] = ALL_OPTIONS) -> RunOptions:
    """A parent run with a non-default value of each option of ``names`` (default: every
    declared option at once; a new option is in it without an edit here: other_value derives
    a value from its declaration)."""
    values = {name: other_value(name) for name in names}
    if "code" in values:
        values["code"] = str(code_folder)
    return RunOptions.model_validate(values)


# Parents with every option changed at once, and with each alone.
PARENTS = [ALL_OPTIONS, *((name,) for name in ALL_OPTIONS)]


def parent_id(names: tuple[str, ...]) -> str:
    return "every-option" if names == ALL_OPTIONS else names[0]


def parent_folder(root: Path, options: RunOptions) -> Path:
    """A finished parent run's folder as `batchctl run` leaves it: report.json with its
    options, failed.csv with the one row that failed (its video beside the manifest)."""
    media = root / "media"
    media.mkdir(parents=True)
    (media / "b.mp4").write_bytes(b"video b")
    manifest = root / "manifest.csv"
    manifest.write_text("id,video\na,media/a.mp4\nb,media/b.mp4\n")
    return write_parent_folder(
        root / "out" / "parent", options, manifest, "id,video\nb,media/b.mp4\n"
    )


def assert_runs_with_the_parents_options(
    started: RunOptions, parent: RunOptions, store: BlobStore
) -> None:
    for name in ALL_OPTIONS:
        declared = flag_of(RunOptions, name)
        if isinstance(declared, Flag) and declared.on_retry == "choose_again":
            # What the parent's run chose for itself (items per message) is chosen again.
            assert getattr(started, name) == default_of(name), name
        elif name == "code" and parent.code is not None:
            # The code folder travels by content: the run names the package uploaded.
            ref = parse_ref(started.code or "")
            assert ref is not None, started.code
            assert store.exists("media", ref.blob_name)
        else:
            assert getattr(started, name) == getattr(parent, name), name


@pytest.fixture
def storage_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)


@pytest.mark.azurite
@pytest.mark.parametrize("names", PARENTS, ids=parent_id)
def test_a_local_retry_runs_with_every_option_of_its_parent(
    names: tuple[str, ...],
    tmp_path: Path,
    storage_env: None,
    blob_store: BlobStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The local app on this machine: its real handler validates the start body and hands
    the orchestration input to its Durable client, stopped there (no worker starts); every
    option changed at once, and each alone."""
    parent = parent_options(Path(worker_tasks.__file__).parent, names)
    folder = parent_folder(tmp_path, parent)
    inputs: list[Any] = []

    async def start_new(
        self: LocalDurableClient,
        name: str,
        instance_id: str | None = None,
        client_input: Any = None,
    ) -> str:
        inputs.append(json.loads(json.dumps(client_input)))
        raise StartedError

    monkeypatch.setattr(LocalDurableClient, "start_new", start_new)

    code = cli.main(["retry", str(folder), "--nodes", "1", "--json"])

    assert code == 3  # the app answered the stopped start with 500
    (client_input,) = inputs
    request = client_input["request"]
    assert request["parent_run_id"] == "parent"
    assert_runs_with_the_parents_options(
        RunOptions.model_validate(request["options"]), parent, blob_store
    )
    assert "HTTP 500" in capsys.readouterr().err


@pytest.mark.azurite
@pytest.mark.parametrize("names", PARENTS, ids=parent_id)
def test_a_retry_through_the_app_runs_with_every_option_of_its_parent(
    names: tuple[str, ...],
    tmp_path: Path,
    storage_env: None,
    blob_store: BlobStore,
    fake_app: FakeApp,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same parent folder retried on an app (its real handlers, a Durable client that
    records): the start request carries every option of the parent, all of them changed at
    once and each alone."""
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", test_client.FUNCTION_KEY)
    parent = parent_options(Path(worker_tasks.__file__).parent, names)
    folder = parent_folder(tmp_path, parent)

    code = cli.main(["retry", str(folder), "--app", fake_app.url, "--no-follow", "--json"])

    out = capsys.readouterr().out
    assert code == 0, out
    ((_, run_id, client_input),) = fake_app.durable.started
    request = client_input["request"]
    assert request["parent_run_id"] == "parent"
    assert request["manifest"] == f"media/_manifests/{run_id}/failed.csv"
    assert_runs_with_the_parents_options(
        RunOptions.model_validate(request["options"]), parent, blob_store
    )
    assert json.loads(out.strip().splitlines()[-1])["parent_run_id"] == "parent"


# -- what each target refuses ---------------------------------------------------------------------
def test_a_run_id_without_an_app_is_not_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHCTL_APP_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no azd environment file names an app here

    code = cli.main(["retry", "run-20261206-abc", "--json"])

    err = capsys.readouterr().err
    assert code == 3
    assert "run-20261206-abc is not a run folder" in err and "--app" in err


def test_a_path_that_is_neither_folder_nor_run_id_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHCTL_APP_URL", raising=False)

    code = cli.main(["retry", str(tmp_path / "Gone Folder"), "--json"])

    err = capsys.readouterr().err
    assert code == 3
    assert "RUN is a run folder or a run id" in err and "Gone Folder" in err


def test_a_run_here_starts_from_a_file_here_not_a_blob(tmp_path: Path) -> None:
    target = open_local(nodes=1, out_dir=tmp_path)
    spec = RunSpec("media/_manifests/r/m.csv", RunOptions(), "r")

    with pytest.raises(BadInputError, match="a run on this machine starts from a CSV file here"):
        target.execute(spec, progress=ProgressPrinter(io.StringIO()))


def test_the_target_is_this_machine_unless_an_app_is_named() -> None:
    named = {"BATCHCTL_APP_URL": "https://app.example"}
    assert runs_here(None, local=False, environment={})
    assert not runs_here(None, local=False, environment=named)
    assert not runs_here("https://other.example", local=False, environment={})
    assert runs_here("https://other.example", local=True, environment=named)
