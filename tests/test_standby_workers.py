"""Workers started ahead of their run (issue 27): ``python -m worker --standby`` and
``batchctl.compute.local.StandbyWorkers``, with real processes.

A standby worker prepares (imports, the built-in task's model) before its storage exists,
then takes the rest of its environment on stdin; provisioning hands it the assignment
instead of starting a process. What must hold: the assignment reaches the process whole,
its log follows it to the node's name, workers never taken are stopped, a dead one is
passed over, a controller's death ends a waiting one, bad input is refused with the reason,
and the model a standby built is the one its task uses (built once).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from batchctl.compute.local import (
    LocalBackend,
    StandbyWorkers,
    assignment,
    base_environment,
    worker_environment,
)
from batchctl.contracts import ManifestItem, RunOptions
from batchctl.settings import ENV_PREFIX, StorageSettings, WorkerSettings, local_concurrency
from node_image.worker import model as model_module
from node_image.worker.__main__ import preload, standby_plan
from node_image.worker.taskapi import CancelToken, ItemInput, ItemOutput, TaskSetup
from node_image.worker.tasks.features import FeaturesTask
from tests.videos import VideoLibrary, video_library

REPO = Path(__file__).resolve().parents[1]
STORAGE = StorageSettings(
    storage_auth="azurite",
    blob_url="http://127.0.0.1:1/devstoreaccount1",
    queue_url="http://127.0.0.1:2/devstoreaccount1",
    table_url="http://127.0.0.1:3/devstoreaccount1",
)
# A stand-in worker: says it is ready, reads its assignment like `--standby` and writes the
# environment it then has (and its argv) as JSON to its log.
FAKE_WORKER = [
    sys.executable,
    "-c",
    "import json, os, sys\n"
    "print('ready', flush=True)\n"
    "line = sys.stdin.readline()\n"
    "if not line.strip(): sys.exit(0)\n"
    "os.environ.update(json.loads(line))\n"
    "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}), flush=True)\n",
]


def _wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _last_json(log: Path) -> dict[str, object]:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return dict(json.loads(lines[-1]))


def test_the_assignment_reaches_a_standby_worker_whole_and_its_log_follows(
    tmp_path: Path,
) -> None:
    options = RunOptions()
    standby = StandbyWorkers("run-a", options, 2, log_dir=tmp_path, worker_command=FAKE_WORKER)
    backend = LocalBackend(STORAGE, log_dir=tmp_path, nodes=2, standby=standby)
    plan = backend.plan("run-a", 10, options)
    try:
        backend.submit_jobs("run-a", plan, options)
        logs = sorted(tmp_path.glob("local-run-a-job0-n*.log"))
        assert [log.name for log in logs] == ["local-run-a-job0-n0.log", "local-run-a-job0-n1.log"]
        _wait_for(lambda: all("{" in log.read_text() for log in logs))
        for index, log in enumerate(logs):
            seen = _last_json(log)
            assert seen["argv"] == ["--standby"]
            env = seen["env"]
            assert isinstance(env, dict)
            expected = worker_environment(
                STORAGE, "run-a", f"local-run-a-job0-n{index}", options, nodes=2
            )
            # Every variable a freshly started worker would get, with the same value (the
            # controller pid too); the standby's own extra is only the node spec it built for.
            for name, value in expected.items():
                assert env.get(name) == value, name
        # Both were standby processes: no third one was started, none is left waiting.
        assert len(backend.live_processes("run-a")) <= 2
        assert standby.take({}, None) is None
        assert not list(tmp_path.glob("standby-*.log")), "each log moved to its node's name"
    finally:
        backend.delete_clusters("run-a")
        standby.close()


def test_workers_never_taken_are_stopped_and_a_dead_one_is_passed_over(tmp_path: Path) -> None:
    options = RunOptions()
    standby = StandbyWorkers("run-b", options, 3, log_dir=tmp_path, worker_command=FAKE_WORKER)
    waiting = list(standby._waiting)
    first = waiting[0].process
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    taken = standby.take(assignment(STORAGE, "run-b", "n0", options, nodes=1), tmp_path / "n0.log")
    try:
        assert taken is waiting[1].process, "the dead one is skipped for the next"
        _wait_for(lambda: "{" in (tmp_path / "n0.log").read_text())
    finally:
        standby.close(grace_s=5)
    # The one never taken is stopped and its log removed; the taken one is not ours to stop.
    assert waiting[2].process.poll() is not None
    assert not (waiting[2].log and waiting[2].log.exists())
    assert taken.wait(timeout=10) == 0


def test_a_backend_for_another_run_does_not_take_this_runs_workers(tmp_path: Path) -> None:
    options = RunOptions()
    standby = StandbyWorkers("run-c", options, 1, log_dir=tmp_path, worker_command=FAKE_WORKER)
    backend = LocalBackend(
        STORAGE,
        log_dir=tmp_path,
        nodes=1,
        standby=standby,
        worker_command=["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"],
    )
    try:
        backend.submit_jobs("other-run", backend.plan("other-run", 1, options), options)
        assert len(standby._waiting) == 1, "another run's provisioning started its own"
    finally:
        backend.delete_clusters("other-run")
        standby.close()


def _worker(*args: str, stdin: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "node_image.worker", *args],
        input=stdin,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def _plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "node_image"), str(REPO)])
    env.update(extra)
    return env


def test_a_standby_worker_without_an_assignment_exits_cleanly() -> None:
    # A custom task: nothing to build, so the test stays quick; the worker still imports.
    spec = RunOptions(task="tests.worker_tasks:QuickTask").node_spec().model_dump_json()
    done = _worker("--standby", stdin=b"", env=_plain_env(BATCHCTL_TASK_OPTIONS=spec))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"standby: no assignment" in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json\n", b"not a JSON object of strings"),
        (b'["a list"]\n', b"not an object of strings"),
        (b'{"BATCHCTL_RUN_ID": 7}\n', b"not an object of strings"),
    ],
)
def test_a_bad_assignment_is_refused_with_the_reason(line: bytes, reason: bytes) -> None:
    done = _worker("--standby", stdin=line, env=_plain_env())
    assert done.returncode == 2
    assert reason in done.stderr


def test_an_assignment_without_storage_names_what_is_missing() -> None:
    done = _worker("--standby", stdin=b'{"BATCHCTL_RUN_ID": "r"}\n', env=_plain_env())
    assert done.returncode == 2
    assert b"worker settings are incomplete" in done.stderr
    assert b"BATCHCTL_BLOB_URL" in done.stderr


def test_a_waiting_standby_worker_ends_with_its_controller(tmp_path: Path) -> None:
    """A controller SIGKILLed while its workers wait: they exit (parent-death signal, stdin
    closed), not wait for ever."""
    script = (
        "import sys, time\n"
        "from batchctl.compute.local import StandbyWorkers\n"
        "from pathlib import Path\n"
        "from batchctl.contracts import RunOptions\n"
        "options = RunOptions(task='tests.worker_tasks:QuickTask')\n"
        f"standby = StandbyWorkers('run-d', options, 2, log_dir=Path({str(tmp_path)!r}))\n"
        "print(' '.join(str(w.process.pid) for w in standby._waiting), flush=True)\n"
        "time.sleep(300)\n"
    )
    controller = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env=_plain_env(),
        cwd=REPO,
    )
    assert controller.stdout is not None
    pids = [int(pid) for pid in controller.stdout.readline().split()]
    assert len(pids) == 2
    _wait_for(
        lambda: all(
            "waiting for an assignment" in p.read_text() for p in tmp_path.glob("standby-*.log")
        ),
        60,
    )
    controller.kill()
    controller.wait()

    def gone() -> bool:
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                return False
        return True

    _wait_for(gone, 10)


def test_the_model_a_standby_built_is_the_one_its_task_gets_once() -> None:
    size = (32, 32)
    prepared = model_module.prepare_model("MobileNetV3Small", frame_size=size, batch_size=2)
    assert model_module.load_model("MobileNetV3Small", frame_size=size) is prepared
    # Taken once: the next build is a new model; other arguments never take it.
    again = model_module.prepare_model("MobileNetV3Small", frame_size=size, batch_size=2)
    other = model_module.load_model("MobileNetV3Small", frame_size=(48, 48))
    assert other is not again
    assert model_module.load_model("MobileNetV3Small", frame_size=size) is again
    assert model_module.load_model("MobileNetV3Small", frame_size=size) is not again
    features = again.predict(np.zeros((1, 32, 32, 3), np.uint8))
    assert features.shape == (1, again.feature_dim)


def test_base_and_assignment_make_the_whole_environment() -> None:
    options = RunOptions()
    whole = worker_environment(STORAGE, "run-e", "n0", options, nodes=1)
    assert whole == base_environment() | assignment(STORAGE, "run-e", "n0", options, nodes=1)
    assert whole[f"{ENV_PREFIX}CONTROLLER_PID"] == str(os.getpid())


def test_a_local_node_works_on_items_by_its_share_of_the_cores_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 4 items a core a node gets, at least the nodes' default of 3, at most 16.
    assert [local_concurrency(1, cores) for cores in (1, 2, 3, 4, 8)] == [4, 8, 12, 16, 16]
    assert [local_concurrency(nodes, 8) for nodes in (1, 2, 4, 8, 16)] == [16, 16, 8, 4, 4]
    monkeypatch.delenv(f"{ENV_PREFIX}CONCURRENCY", raising=False)
    given = assignment(STORAGE, "run-f", "n0", RunOptions(), nodes=2)
    assert given[f"{ENV_PREFIX}CONCURRENCY"] == str(local_concurrency(2))
    # The user's own setting wins, and reaches the worker's settings as they read it.
    monkeypatch.setenv(f"{ENV_PREFIX}CONCURRENCY", "5")
    given = assignment(STORAGE, "run-f", "n0", RunOptions(), nodes=2)
    assert given[f"{ENV_PREFIX}CONCURRENCY"] == "5"
    monkeypatch.setenv(f"{ENV_PREFIX}RUN_ID", "run-f")
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    assert WorkerSettings().concurrency == 5


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> VideoLibrary:
    return video_library(tmp_path_factory)


def test_a_task_set_up_while_its_standby_still_builds_the_model_takes_items_at_once(
    videos: VideoLibrary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The assignment came before the standby's model was ready: the features task is set up
    # at once (no second model), an item decodes meanwhile, and its features come once the
    # preparation ends, from the very model the standby built.
    options = RunOptions(frame_size="32x32", inference_batch_size=4)
    spec = options.node_spec()
    plan = standby_plan(spec.model_dump_json())
    assert plan[1] is not None  # the built-in model is announced before anything is built
    builds: list[object] = []
    original = model_module._build_model

    def counted(*args: object, **kwargs: object) -> model_module.LoadedModel:
        built = original(*args, **kwargs)  # type: ignore[arg-type]
        builds.append(built)
        return built

    monkeypatch.setattr(model_module, "_build_model", counted)
    task = FeaturesTask()
    began = time.monotonic()
    task.setup(TaskSetup(options=options.task_settings(), concurrency=2, work_dir=tmp_path))
    assert time.monotonic() - began < 2, "the task waited for the model to be built"
    assert task.batcher is not None
    item = ItemInput(
        run_id="run-s",
        item=ManifestItem(item_id="clip", source="local://clip", row=2),
        path=videos.path("h264"),
        attempt=1,
        options=options.task_settings(),
        cancel=CancelToken(),
    )
    outputs: list[ItemOutput] = []
    processing = threading.Thread(target=lambda: outputs.append(task.process(item)))
    processing.start()
    preload(*plan)  # the standby's own thread, here after the item started
    processing.join(120)
    assert outputs, "the item never finished"
    features = np.load(io.BytesIO(outputs[0].files["features.npz"]))["features"]
    assert len(features) > 0 and features.shape[1] == task.batcher.model.feature_dim
    assert builds == [task.batcher.model], "the task built a model of its own"
    task.close()
