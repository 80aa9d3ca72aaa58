"""A local worker's watch on its controller (node_image/worker/controller_watch.py), with real
processes: a controller killed with SIGKILL, and one whose pid lives on in another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_image.worker.controller_watch import EXIT_CONTROLLER_GONE, process_alive

REPO = Path(__file__).resolve().parents[1]

# The worker: watches its parent with a pid check that always says "alive" (as when the
# controller's pid went to another process at once), marks the moment it saw the death.
WORKER = """
import os, sys, time
from pathlib import Path
from node_image.worker.controller_watch import watch_controller
flag = Path(sys.argv[1])
watch_controller(os.getppid(), lambda: flag.write_text("gone"), interval_s=0.05,
                 exit_after_s=0.5, alive=lambda pid: True)
time.sleep(60)
"""
# The controller: starts the worker, says its pid, then waits to be killed.
CONTROLLER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(worker.pid, flush=True)
time.sleep(60)
"""


def test_a_worker_sees_its_controller_die_even_when_the_pid_seems_alive(tmp_path: Path) -> None:
    flag = tmp_path / "gone"
    controller = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, WORKER, str(flag)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert controller.stdout is not None
    worker_pid = int(controller.stdout.readline())
    time.sleep(0.5)  # the worker's watch is running
    assert not flag.exists()
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    deadline = time.monotonic() + 10
    while process_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.read_text() == "gone"  # it stopped its work on seeing the death
    assert not process_alive(worker_pid), "the worker outlived its controller"


def test_a_reaped_or_missing_pid_is_gone_and_this_one_is_alive() -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    assert not process_alive(ended.pid)
    assert process_alive(os.getpid())
    assert EXIT_CONTROLLER_GONE == 143


@pytest.mark.parametrize("exit_after_s", [0.2])
def test_the_exit_comes_even_when_stopping_blocks(tmp_path: Path, exit_after_s: float) -> None:
    # on_gone never returns (a lock held for ever): the armed exit ends the process anyway.
    code = f"""
import os, sys, threading, time
from node_image.worker.controller_watch import watch_controller
blocked = threading.Event()
watch_controller(os.getpid(), lambda: blocked.wait(), interval_s=0.05,
                 exit_after_s={exit_after_s}, alive=lambda pid: False)
time.sleep(30)
"""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=20,
        check=False,
    )
    assert done.returncode == EXIT_CONTROLLER_GONE
    assert time.monotonic() - started < 10
