"""A local node's watch on the controller process that started it.

In local mode the "nodes" are worker processes of the controller (``batchctl run`` or
``serve``). If the controller dies (SIGKILL, a crash, the machine going down), its storage
goes with it or is about to: nothing a worker finishes now can be recorded where the run
will look, and ``batchctl resume`` runs again every item without a record. So a worker that
sees its controller gone stops at once (no grace period: in-flight items are cancelled and
their messages released while storage still answers) and, whatever it is blocked on, exits
within :data:`EXIT_AFTER_S`. The kernel's parent-death signal (SIGTERM) arrives first for a
direct child, but it cannot tell a preemption (which deserves the grace period) from the
controller's death, and a process a level further down (one per GPU) gets none: hence an
explicit watch on the controller's pid.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .policy import EXIT_STOPPED

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
# From noticing the controller's death to the process's exit, at most: enough for the
# releases that storage still answers, short of the SDK retries against storage that is gone.
EXIT_AFTER_S = 4.0
# The worker exits as a stopped one (as after SIGTERM): the job was stopped, not done.
EXIT_CONTROLLER_GONE = EXIT_STOPPED


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process by that pid: it exists
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: the signal check is all there is
    return state != "Z"


def watch_controller(
    pid: int,
    on_gone: Callable[[], None],
    *,
    interval_s: float = CHECK_INTERVAL_S,
    exit_after_s: float = EXIT_AFTER_S,
    alive: Callable[[int], bool] = process_alive,
    exit_process: Callable[[int], None] = os._exit,
) -> threading.Thread:
    """Start a daemon thread: once ``pid`` is gone, call ``on_gone`` (stop the worker), then
    end the process after ``exit_after_s`` if it has not ended by itself."""

    # A worker started by the controller itself (local mode) is its child: once the
    # controller dies the kernel gives the worker another parent, which tells its death even
    # when its pid has already gone to another process. A worker one level down (one per GPU)
    # has the supervisor for a parent and watches the pid alone.
    child = os.getppid() == pid

    def controller_runs() -> bool:
        return alive(pid) and (not child or os.getppid() == pid)

    def watch() -> None:
        while controller_runs():
            time.sleep(interval_s)
        # The exit is armed first: whatever on_gone or a log handler may block on (a lock a
        # signal handler left held), the process ends on time.
        deadline = threading.Timer(exit_after_s, exit_process, args=(EXIT_CONTROLLER_GONE,))
        deadline.daemon = True
        deadline.start()
        log.warning("controller (pid %d) is gone: stopping now; its run resumes elsewhere", pid)
        on_gone()

    thread = threading.Thread(target=watch, name="controller-watch", daemon=True)
    thread.start()
    return thread
