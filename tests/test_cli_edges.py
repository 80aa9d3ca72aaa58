"""Bad input at the CLI's edges: every bad value is one line and exit 3, never a traceback.

Everything here runs in-process through ``batchctl.cli.main`` and stops before any storage or
worker is touched (the values are refused while the arguments are parsed), except the
unreachable-storage test, which points at a closed port on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchctl import cli, workspec
from batchctl.client import AppClient, RunStatus, _Response
from batchctl.commands import run as run_cmd
from batchctl.commands import status as status_cmd
from batchctl.commands import target as target_cmd
from batchctl.commands.validate import HelpFormatter
from batchctl.contracts import RunPhase, RunReport
from batchctl.functions import api
from batchctl.settings import default_local_nodes
from batchctl.storage import retry
from tests.fakes import FakeDurableClient

TASKS_MODULE = "tests.worker_tasks"


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_refusal(
    code: int, out: str, err: str, *, flag: str | None, as_json: bool
) -> dict[str, Any] | None:
    """Exit 3, no traceback, one line on stderr; with --json one JSON line on stdout."""
    assert code == 3, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    if flag is not None:
        assert flag in err
    if not as_json:
        assert out == ""
        return None
    (line,) = out.strip().splitlines()
    answer: dict[str, Any] = json.loads(line)
    assert answer["exit_code"] == 3
    assert answer["error"]
    if flag is not None:
        assert answer["flag"] == flag
    return answer


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    (tmp_path / "a.mp4").write_bytes(b"")
    path = tmp_path / "m.csv"
    path.write_text("video\na.mp4\n")
    return path


@pytest.fixture(autouse=True)
def _no_app_or_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's environment must not send these tests to a real app or account.
    for name in ("BATCHCTL_APP_URL", "BATCHCTL_FUNCTION_KEY", *cli.STORAGE_URL_VARIABLES):
        monkeypatch.delenv(name, raising=False)


# -- every bad flag -------------------------------------------------------------------------
LOCAL_RUN_BAD_FLAGS = [
    (["--nodes", "0"], "--nodes"),
    (["--nodes", "500"], "--nodes"),
    (["--nodes", "two"], "--nodes"),
    (["--run-id", "Run-UPPER"], "--run-id"),
    (["--run-id", "run--double-hyphen"], "--run-id"),
    (["--run-id", "../escape"], "--run-id"),
    (["--run-id", "r" * 41], "--run-id"),
    (["--model", "NoSuchNet"], "--model"),
    (["--model", "weights.h5"], "--model"),
    (["--model", "NoSuchNet@w.weights.h5"], "--model"),
    (["--model", "/nowhere/model.keras"], "--model"),
    (["--model", "ResNet50@/nowhere/ResNet50.weights.h5"], "--model"),
    (["--task", "no.such:Class"], "--task"),
    (["--task", f"{TASKS_MODULE}:NoSuchTask"], "--task"),
    (["--task", "not a task"], "--task"),
    (["--fps", "0"], "--fps"),
    (["--fps", "nan"], "--fps"),
    (["--fps", "1e400"], "--fps"),
    (["--frame-size", "8"], "--frame-size"),
    (["--frame-size", "big"], "--frame-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--mini-batch", "65"], "--mini-batch"),
    (["--error-budget", "lots"], "--error-budget"),
    (["--error-budget", "101%"], "--error-budget"),
    (["--max-attempts", "0"], "--max-attempts"),
    (["--deadline", "soon"], "--deadline"),
    (["--deadline", "0s"], "--deadline"),
    (["--deadline", "99999h"], "--deadline"),
    (["--item-timeout", "-1"], "--item-timeout"),
    (["--poll", "0"], "--poll"),
    (["--idle-exit", "-5"], "--idle-exit"),
    (["--out", ""], "--out"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--nodes"], "--nodes"),  # a flag without its value
]


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(("extra", "flag"), LOCAL_RUN_BAD_FLAGS)
def test_run_refuses_each_bad_flag_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    manifest: Path,
    extra: list[str],
    flag: str,
    as_json: bool,
) -> None:
    started: list[Any] = []
    monkeypatch.setattr(target_cmd, "run_locally", lambda *a, **k: started.append(a))

    argv = ["run", str(manifest), *extra, *(["--json"] if as_json else [])]
    code, out, err = call(capsys, *argv)

    assert_one_line_refusal(code, out, err, flag=flag, as_json=as_json)
    assert started == []  # nothing staged, no worker started


OTHER_BAD_FLAGS = [
    (["trial", "{m}", "--rows", "0"], "--rows"),
    (["trial", "{m}", "--speedup", "0"], "--speedup"),
    (["trial", "{m}", "--trial-nodes", "0"], "--trial-nodes"),
    (["trial", "{m}", "--app", "ftp://nowhere"], "--app"),
    (["trial", "{m}", "--headroom", "1"], "--headroom"),
    (["trial", "{m}", "--model", "NoSuchNet"], "--model"),
    (["trial", "{m}", "--nodes", "65"], "--nodes"),
    (["trial", "/nonexistent/m.csv"], "manifest"),
    (["watch", "--nodes", "0"], "--nodes"),
    (["watch", "--interval", "0"], "--interval"),
    (["watch", "--media-root", "/nonexistent/dir"], "--media-root"),
    (["watch", "--task", "no.such:Class"], "--task"),
    (["run", "{m}", "--code", "/nonexistent/folder"], "--code"),
    (["submit", "{m}", "--image", "Not An Image"], "--image"),
    (["submit", "{m}", "--fallback", "dedicated"], "--fallback"),
    (["submit", "{m}", "--fallback", "size:Standard NC6"], "--fallback"),
    (["demo", "--nodes", "0"], "--nodes"),
    (["demo", "--manifest", "/nonexistent/m.csv"], "--manifest"),
    (["demo", "--model", "NoSuchNet"], "--model"),
    (["plan", "--items", "-1", "--sec-per-item", "20"], "--items"),
    (["plan", "--items", "10", "--sec-per-item", "0"], "--sec-per-item"),
    (["plan", "--items", "10", "--sec-per-item", "inf"], "--sec-per-item"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--deadline", "soon"], "--deadline"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--startup", "-5m"], "--startup"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--simulate", "-1"], "--simulate"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--max-clusters", "1000"], "--max-clusters"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--sigma", "100"], "--sigma"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--vm-size", "no size"], "--vm-size"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--price", "-1"], "--price"),
    (["plan", "--items", "10", "--sec-per-item", "20", "--low-priority", "--dedicated"], None),
    (["plan", "--items", "10"], "--sec-per-item"),
    (["plan", "--manifest", "/nonexistent/m.csv", "--sec-per-item", "20"], "--manifest"),
    # The simulation plays every item: a billion of them would not finish today.
    (["plan", "--items", "100000000", "--sec-per-item", "2", "--simulate", "100"], "--simulate"),
    (["submit", "--manifest-blob", "m.csv", "--max-nodes", "0"], "--max-nodes"),
    (["submit", "--manifest-blob", "m.csv", "--vm-size", ""], "--vm-size"),
    (["submit", "--manifest-blob", "m.csv", "--run-id", "Nope"], "--run-id"),
    (["submit", "--manifest-blob", "m.csv", "--blob-url", "nope"], "--blob-url"),
    (["submit", "--manifest-blob", "m.csv", "--start-timeout", "0"], "--start-timeout"),
    (["submit", "--manifest-blob", "m.csv", "--model", "NoSuchNet"], "--model"),
    (["submit", "--manifest-blob", "m.csv", "--task", "x y"], "--task"),
    (["submit", "--manifest-blob", ""], "--manifest-blob"),
    (["submit", "/nonexistent/m.csv"], "manifest"),
    (["status", "Run_Upper"], "RUN_ID"),
    (["status", "run-x", "--interval", "0"], "--interval"),
    (["status", "run-x", "--interval", "1e300"], "--interval"),
    (["status", "run-x", "--app", "ftp://x"], "--app"),
    (["cancel", "../../admin"], "RUN_ID"),
    (["report", "run-x", "--out", ""], "--out"),
    (["report", "x" * 41], "RUN_ID"),
    (["no-such-command"], "COMMAND"),
]


@pytest.mark.parametrize(("argv", "flag"), OTHER_BAD_FLAGS)
def test_every_command_refuses_bad_values_in_one_line_and_json(
    capsys: pytest.CaptureFixture[str], manifest: Path, argv: list[str], flag: str | None
) -> None:
    argv = [part.replace("{m}", str(manifest)) for part in argv]

    code, out, err = call(capsys, *argv, "--json")

    assert_one_line_refusal(code, out, err, flag=flag, as_json=True)


def test_a_manifest_without_a_video_column_exits_3_with_the_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[Any] = []
    monkeypatch.setattr(target_cmd, "run_locally", lambda *a, **k: started.append(a))
    bad = tmp_path / "bad.csv"
    bad.write_text("name,size\nclip,3\n")

    code, out, err = call(capsys, "run", str(bad), "--json")

    answer = assert_one_line_refusal(code, out, err, flag="manifest", as_json=True)
    assert answer is not None and "no video column" in answer["error"]
    assert started == []


def test_a_custom_task_that_imports_is_accepted_for_a_local_run(manifest: Path) -> None:
    args = cli.build_parser().parse_args(
        ["run", str(manifest), "--task", f"{TASKS_MODULE}:EchoTask", "--nodes", "64"]
    )
    assert (args.task, args.nodes) == (f"{TASKS_MODULE}:EchoTask", 64)


def test_a_local_trial_checks_the_model_file_before_any_worker_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, manifest: Path
) -> None:
    # trial decides local vs app after parsing, so the file check is the handler's.
    started: list[Any] = []
    monkeypatch.setattr(target_cmd, "run_locally", lambda *a, **k: started.append(a))

    code, out, err = call(
        capsys, "trial", str(manifest), "--model", "/nowhere/m.keras", "--local", "--json"
    )

    answer = assert_one_line_refusal(code, out, err, flag="--model", as_json=True)
    assert answer is not None and "/nowhere/m.keras does not exist" in answer["error"]
    assert started == []


# -- version and help -----------------------------------------------------------------------
def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, "--version")

    assert code == 0
    assert out.strip() == f"batchctl {importlib.metadata.version('batchctl')}"
    assert err == ""


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_that_shows_its_default() -> None:
    for name, sub in _subparsers().items():
        assert isinstance(sub.formatter_class, type) and issubclass(
            sub.formatter_class, HelpFormatter
        ), name
        formatter = sub._get_formatter()
        for action in sub._actions:
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label} has no help"
            shown = formatter._expand_help(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, f"{label}: {shown!r} hides its default"
        sub.format_help()  # every help string formats (a stray % would raise here)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "run", "--help")
    assert code == 0
    # --nodes: its default is this machine's (one node per 4 cores), and says so.
    assert f"at least one: {default_local_nodes()} here" in " ".join(out.split())


# -- storage that cannot be reached ---------------------------------------------------------
def test_unreachable_storage_is_one_line_with_the_url_and_the_cause(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, manifest: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    url = f"http://127.0.0.1:{port}/devstoreaccount1"
    for name in cli.STORAGE_URL_VARIABLES:
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("BATCHCTL_STORAGE_AUTH", "azurite")
    # The SDK's own retries would make a refused connection take seconds to report.
    for package in retry.SDK_RETRY_TOTAL:
        monkeypatch.setitem(retry.SDK_RETRY_TOTAL, package, 0)

    code, out, err = call(capsys, "run", str(manifest), "--json")

    answer = assert_one_line_refusal(code, out, err, flag=None, as_json=True)
    assert answer is not None
    assert f"cannot reach storage at {url}" in err
    assert "refused" in answer["error"].lower()


# -- the model and task names ---------------------------------------------------------------
def test_the_known_models_are_the_ones_the_worker_can_build() -> None:
    from node_image.worker.errors import TaskConfigError
    from node_image.worker.model import application_names, parse_model_spec

    assert set(workspec.KERAS_APPLICATIONS) == set(application_names())
    for text in ("MobileNetV3Small", "ResNet50@w.weights.h5", "models/m.keras"):
        ours = workspec.parse_model(text)
        theirs = parse_model_spec(text)
        assert (ours.kind, ours.name, ours.weights) == (
            theirs.kind,
            theirs.name,
            theirs.weights_path,
        )
    for text in ("not a model", "weights.h5", "a/b.h5"):
        with pytest.raises(ValueError):
            workspec.parse_model(text)
        with pytest.raises(TaskConfigError):
            parse_model_spec(text)


def test_the_builtin_tasks_are_the_workers() -> None:
    from node_image.worker.tasks import task_class

    for name in workspec.BUILTIN_TASKS:
        assert workspec.parse_task(name) is None
        assert isinstance(task_class(name), type)
    assert workspec.parse_task("pkg.mod:Task") == ("pkg.mod", "Task")
    with pytest.raises(ValueError, match="neither"):
        workspec.parse_task("pkg.mod")


def _start(options: dict[str, Any]) -> tuple[func.HttpResponse, FakeDurableClient]:
    durable = FakeDurableClient()
    body = json.dumps({"manifest": "manifests/m.csv", "options": options}).encode()
    request = func.HttpRequest(method="POST", url="/api/runs", body=body)
    return asyncio.run(api.start_run(request, durable)), durable


@pytest.mark.parametrize("model", ["NoSuchNet", "resnet50", "weights.h5", "NoSuchNet@w.h5"])
def test_the_app_refuses_an_unknown_model_with_400_naming_the_field(model: str) -> None:
    response, durable = _start({"model": model})

    assert response.status_code == 400
    problems = json.loads(response.get_body())["problems"]
    assert [p["field"] for p in problems] == ["options.model"]
    assert durable.started == []


@pytest.mark.parametrize(
    "options",
    [
        {"model": "ResNet50"},
        # Files on the node's disk and custom tasks in its image: the app checks names only.
        {"model": "/models/net.keras"},
        {"model": "ResNet50@/weights/ResNet50.weights.h5"},
        {"task": "custom.tasks:Embed"},
    ],
)
def test_the_app_starts_known_models_and_well_formed_tasks(options: dict[str, Any]) -> None:
    response, durable = _start(options)

    assert response.status_code == 202, response.get_body()
    assert len(durable.started) == 1


# -- a run where nothing succeeded is not a clean "completed" -------------------------------
def _report(succeeded: int, failed: int, invalid: int = 0) -> RunReport:
    now = datetime.now(UTC)
    return RunReport(
        run_id="run-x",
        phase=RunPhase.COMPLETED,
        manifest="manifests/m.csv",
        total=succeeded + failed,
        succeeded=succeeded,
        failed=failed,
        invalid=invalid,
        started_at=now,
        finished_at=now,
        output_prefix="outputs/run-x",
    )


@pytest.mark.parametrize(
    ("succeeded", "failed", "invalid", "shown", "exit_code"),
    [
        (0, 3, 0, "completed, but no item succeeded", 1),
        (0, 0, 2, "completed, but no item succeeded", 1),
        (2, 1, 0, "completed with failures", 1),
        (3, 0, 1, "completed with failures", 1),
        (3, 0, 0, "completed", 0),
    ],
)
def test_the_run_summary_says_when_items_failed(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    manifest: Path,
    tmp_path: Path,
    succeeded: int,
    failed: int,
    invalid: int,
    shown: str,
    exit_code: int,
) -> None:
    # The local run itself is replaced at its boundary: this is about what the summary says.
    result = target_cmd.LocalRunResult(
        report=_report(succeeded, failed, invalid),
        report_path=tmp_path / "report.json",
        output_dir=tmp_path / "outputs",
    )
    monkeypatch.setattr(target_cmd, "run_locally", lambda *a, **k: result)

    code, out, err = call(capsys, "run", str(manifest), "--json")

    assert code == exit_code
    assert f"run run-x: {shown};" in err
    assert json.loads(out.strip().splitlines()[-1])["outcome"] == shown


def test_the_status_display_says_when_no_item_succeeded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = RunStatus(
        run_id="run-x", runtime_status="Completed", phase="completed", total=4, failed=4
    )

    code = status_cmd.report_outcome(status, as_json=True)
    captured = capsys.readouterr()

    assert code == 1
    assert "run run-x: completed, but no item succeeded;" in captured.err
    assert json.loads(captured.out)["outcome"] == "completed, but no item succeeded"
    final = {"phase": "completed", "total": 4, "succeeded": 0, "failed": 4}
    assert run_cmd.format_status(final).startswith("[completed, but no item succeeded]")
    partial = {**final, "succeeded": 3, "failed": 1}
    assert run_cmd.format_status(partial).startswith("[completed with failures]")


# -- fuzzing the whole argument space -------------------------------------------------------
INTERESTING_VALUES = [
    "0", "1", "-1", "2", "64", "65", "1e309", "nan", "inf", "-inf", "", " ", "1.5", "10%",
    "2.5%", "101%", "224", "320x240", "8", "2h", "90s", "0s", "1h30m", "soon", "features",
    "no.such:Class", "MobileNetV3Small", "NoSuchNet", "x.keras", "run-ok-1", "Run_Bad",
    "http://127.0.0.1:9", "https://example.invalid", "ftp://x", "Standard_NC4as_T4_v3",
    "--json", "-", "\x00", "é", "9" * 400,
]  # fmt: skip
NONEXISTENT = "/nonexistent/batchctl-fuzz/m.csv"
# Flags whose valid values would start real work: the fuzz pins them to a path that is not
# there, so every example ends before anything is staged.
PINNED = {"demo": {"--manifest": NONEXISTENT}}

values = st.one_of(
    st.sampled_from(INTERESTING_VALUES),
    st.text(max_size=12),
    st.integers(min_value=-(10**6), max_value=10**30).map(str),
    st.floats().map(repr),
)


@st.composite
def cli_argv(draw: st.DrawFn) -> list[str]:
    commands = _subparsers()
    name = draw(st.sampled_from(sorted(commands)))
    sub = commands[name]
    pinned = PINNED.get(name, {})
    options = [a for a in sub._actions if a.option_strings and a.option_strings[0] not in pinned]
    argv = [name]
    for action in draw(st.lists(st.sampled_from(options), max_size=6)):
        argv.append(draw(st.sampled_from(action.option_strings)))
        if action.nargs != 0:
            argv.append(draw(values))
    for flag, value in pinned.items():
        argv += [flag, value]
    for action in sub._actions:
        if action.option_strings:
            continue
        if action.dest == "manifest":
            argv.append(NONEXISTENT)
        elif action.dest == "run_id":
            argv.append(draw(st.one_of(st.sampled_from(["run-ok-1", "m-abc"]), values)))
    if draw(st.booleans()):
        argv.append("--json")
    return argv


def _app_that_knows_no_run(self: AppClient, method: str, url: str, body: Any) -> _Response:
    # The HTTP boundary: a status, cancel or report with valid flags would ask the app.
    return _Response(404, {}, b'{"error": "no run"}', url)


def test_fuzzed_arguments_never_crash_and_exit_0_to_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AppClient, "_send_once", _app_that_knows_no_run)
    # `watch` with valid flags reaches for storage: a closed port, refused at once.
    for name in cli.STORAGE_URL_VARIABLES:
        monkeypatch.setenv(name, "http://127.0.0.1:9/devstoreaccount1")
    monkeypatch.setenv("BATCHCTL_STORAGE_AUTH", "azurite")
    for package in retry.SDK_RETRY_TOTAL:
        monkeypatch.setitem(retry.SDK_RETRY_TOTAL, package, 0)

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(argv=cli_argv())
    def check(argv: list[str]) -> None:
        code = cli.main(argv)
        captured = capsys.readouterr()
        assert code in (0, 1, 2, 3), (argv, code, captured.err)
        assert "Traceback" not in captured.err, argv
        if code == 3:
            assert len(captured.err.strip().splitlines()) == 1, (argv, captured.err)
            if cli._wants_json(argv):
                assert json.loads(captured.out.strip().splitlines()[-1])["exit_code"] == 3

    check()


def test_a_run_whose_results_cannot_be_copied_out_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from batchctl.controller import RunCopyError
    from batchctl.local.session import EXIT_RUN_FAILED, LocalRunError

    for error in (
        RunCopyError("run r: could not copy records.jsonl out of storage: HTTP 503 ServerBusy"),
        LocalRunError("run r ended Failed without a report: boom"),
    ):
        assert cli.report_failure("batchctl run", error, as_json=True) == EXIT_RUN_FAILED
        out, err = capsys.readouterr()
        assert err.strip() == f"batchctl run: {error}"
        assert json.loads(out) == {"error": str(error)}
        assert "Traceback" not in err
    with pytest.raises(KeyError):  # anything else is a bug: raised again, with its traceback
        cli.report_failure("batchctl run", KeyError("x"), as_json=False)
