"""The live progress view: what it shows for each status (pure), plain lines off a terminal,
and a real `batchctl run` in a real terminal (tmux), read back from the screen while it runs."""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchctl.local.azurite import Azurite
from batchctl.progressview import STARTING_NODES, LiveProgress, Snapshot
from tests import worker_tasks

START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _status(phase: str, **counts: object) -> dict[str, object]:
    return {"run_id": "run-1", "phase": phase, "started_at": START.isoformat(), **counts}


def _view(stream: io.StringIO, clock: FakeClock, *, terminal: bool) -> LiveProgress:
    return LiveProgress(
        stream,
        clock=clock,
        wall_clock=lambda: START + timedelta(seconds=90 + clock.now),
        terminal=terminal,
    )


def _snapshot(view: LiveProgress) -> Snapshot:
    snapshot = view.snapshot()
    assert snapshot is not None
    return snapshot


def test_phases_read_as_words_and_running_before_any_item_is_starting_nodes() -> None:
    clock = FakeClock()
    view = _view(io.StringIO(), clock, terminal=False)
    shown = []
    for phase in ("validating", "enqueuing", "planning", "provisioning", "running"):
        view.update(_status(phase, total=10))
        shown.append(_snapshot(view).phase)
    view.update(_status("running", total=10, succeeded=1))
    shown.append(_snapshot(view).phase)
    for phase in ("tearing_down", "merging"):
        view.update(_status(phase, total=10, succeeded=10))
        shown.append(_snapshot(view).phase)
    assert shown == [
        "validating",
        "enqueuing",
        "planning",
        "provisioning",
        STARTING_NODES,
        "running",
        "tearing down",
        "merging",
    ]


def test_elapsed_rate_eta_and_nodes_come_from_the_status() -> None:
    clock = FakeClock()
    view = _view(io.StringIO(), clock, terminal=False)
    view.update(_status("running", total=20, succeeded=2, nodes_active=3, nodes_planned=4))
    clock.now = 10.0
    view.update(_status("running", total=20, succeeded=6, failed=1, nodes_active=3))
    snapshot = _snapshot(view)
    # Elapsed counts from the run's own start (90 s before the view's first look).
    assert snapshot.elapsed_s == pytest.approx(100.0)
    assert snapshot.rate_per_s == pytest.approx(0.5)  # 5 items in 10 s seen here
    assert snapshot.eta_s == pytest.approx(13 / 0.5)  # no eta_s in the status: from the rate
    assert (snapshot.nodes_active, snapshot.left) == (3, 13)
    view.update(_status("running", total=20, succeeded=6, failed=1, eta_s=42.0))
    assert _snapshot(view).eta_s == 42.0  # the orchestrator's own ETA wins
    assert _snapshot(view).nodes_active is None  # absent from the status: not shown


def test_off_a_terminal_it_prints_the_plain_lines_scripts_parse() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    view = _view(stream, clock, terminal=False)
    view.update(_status("validating"))
    clock.now = 5.0
    view.update(_status("running", total=4, succeeded=1, eta_s=9))
    clock.now = 6.0  # within 5 s of the last line: a running line waits
    view.update(_status("running", total=4, succeeded=2, eta_s=4))
    clock.now = 15.0
    view.update(_status("running", total=4, succeeded=3, eta_s=3))
    view.update(_status("completed", total=4, succeeded=4))
    view.finish()
    assert stream.getvalue().splitlines() == [
        "[validating] ",
        f"[{'#' * 7}{'.' * 23}] 1/4 (1 ok, 0 failed, 3 left) eta 9s",
        f"[{'#' * 22}{'.' * 8}] 3/4 (3 ok, 0 failed, 1 left) 12.0/min eta 3s",
        "[completed] ",
    ]


def test_on_a_terminal_it_draws_the_phase_the_bar_and_the_eta() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    view = _view(stream, clock, terminal=True)
    view.update(_status("running", total=8, succeeded=3, failed=1, not_run=0, eta_s=65))
    view.update(_status("completed", total=8, succeeded=7, failed=1, invalid=2))
    view.finish()
    screen = re.sub(r"\033\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "phase running" in screen and "eta 1m5s" in screen
    assert "4/8 (3 ok, 1 failed, 4 left)" in screen and "━" in screen
    assert "phase completed with failures" in screen
    assert "2 invalid manifest rows" in screen
    view.finish()  # twice is harmless


# -- a real terminal ------------------------------------------------------------------------
def _tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tmux", "-L", socket, "-f", "/dev/null", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.azurite
@pytest.mark.slow
def test_the_live_view_on_a_real_terminal(
    tmp_path: Path, azurite: Azurite, repo_root: Path
) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("no tmux: run `bash scripts/ensure-tmux.sh` (make test does)")
    media = tmp_path / "media"
    media.mkdir()
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video"])
        for index in range(16):
            (media / f"v{index}.mp4").write_bytes(b"x" * (index + 1))
            writer.writerow([f"item-{index}", f"media/v{index}.mp4"])
    env = {
        **azurite.environment(),
        # Long enough that the polled status shows the run working for a few seconds, on
        # a loaded machine too (the screen is captured every 0.15 s).
        worker_tasks.ITEM_SECONDS_ENV: "1.5",
        "PYTHONPATH": str(repo_root),
        "TERM": "xterm-256color",
    }
    done_file = tmp_path / "exit-code"
    command = [
        sys.executable, "-m", "batchctl", "run", str(manifest),
        "--run-id", "live-view-tmux", "--nodes", "2",
        "--task", "tests.worker_tasks:QuickTask",
        "--poll", "0.3", "--idle-exit", "0.5", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    # The session runs a script: it gets exactly this environment whatever the tmux server's.
    script = tmp_path / "run.sh"
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    script.write_text(
        f"{exports}cd {shlex.quote(str(repo_root))}\n{shlex.join(command)}\n"
        f"echo $? > {shlex.quote(str(done_file))}\nsleep 600\n"
    )
    socket = f"batchctl-test-{os.getpid()}"
    started = _tmux(socket, "new-session", "-d", "-s", "live", "-x", "120", "-y", "30",
                    f"bash {shlex.quote(str(script))}")  # fmt: skip
    assert started.returncode == 0, started.stderr
    screens: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not done_file.exists():
            assert time.monotonic() < deadline, "\n---\n".join(screens[-3:])
            shot = _tmux(socket, "capture-pane", "-p", "-t", "live")
            if shot.stdout.strip() and (not screens or shot.stdout != screens[-1]):
                screens.append(shot.stdout)
            time.sleep(0.15)
        final = _tmux(socket, "capture-pane", "-p", "-t", "live").stdout
    finally:
        _tmux(socket, "kill-server")
    assert done_file.read_text().strip() == "0", final
    # While the run went on, a screen showed the phase, the bar and the ETA together.
    working = [
        screen
        for screen in screens
        if "phase running" in screen and "━" in screen and re.search(r"eta \d+(m\d+)?s", screen)
    ]
    assert working, "\n---\n".join(screens)
    assert re.search(r"\d+/16 \(\d+ ok, 0 failed, \d+ left\)", working[0]), working[0]
    assert re.search(r"elapsed \d+", working[0]), working[0]
    phases = {
        phase
        for screen in screens
        for phase in re.findall(r"phase ([a-z][a-z ]*?)(?:  |$)", screen, re.MULTILINE)
    }
    # A phase before the work: the run goes through the app's API, whose status is polled,
    # so a preparation that takes less than a poll shows as the run's "starting".
    assert phases & {
        "starting", "validating", "enqueuing", "planning", "provisioning", STARTING_NODES
    }  # fmt: skip
    # The panel is redrawn in place, not scrolled: one title line on the final screen.
    assert final.count("run live-view-tmux  elapsed") == 1, final
    assert "phase completed" in final and "16/16 (16 ok, 0 failed, 0 left)" in final
    assert "run live-view-tmux: completed; 16 succeeded" in final
