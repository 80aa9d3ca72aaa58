"""Keeps a persisted Azurite for a controller: stops it exactly once, saving, however the
controller ends.

``python -m batchctl.local.azurite_keeper GRACE_S -- AZURITE_COMMAND...`` runs Azurite as its
child and stands between it and the controller, because Azurite saves its data on its first
SIGTERM or SIGINT and dies, unsaved, on the second one (it handles each signal once), and a
parent-death signal is no single signal: Linux sends it each time the thread that is the
child's parent exits, and a controller killed with all its threads sends several within
milliseconds (seen with strace: two SIGTERMs 5 ms apart, the run's data lost).

- SIGTERM or SIGINT (the controller stopping its storage on purpose): Azurite gets one
  SIGTERM now.
- SIGHUP (this process's parent-death signal: the controller died): the run's worker
  processes are stopping too and still release their messages and write what they can, so
  Azurite gets its one SIGTERM after ``GRACE_S`` seconds.

Either way the keeper waits for Azurite to save and exit (:data:`SAVE_TIMEOUT_S`, then
SIGKILL) and exits with its code. Further signals only hasten a pending stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
SAVE_TIMEOUT_S = 15.0


def _set_death_signal(number: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, number)


def _die_with_keeper() -> None:  # pragma: no cover - runs between fork and exec
    # The last resort only: a keeper killed outright takes Azurite with it.
    _set_death_signal(signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: azurite_keeper GRACE_S -- COMMAND...", file=sys.stderr)
        return 2
    grace_s = float(argv[0])
    command = argv[2:]
    parent = os.getppid()
    _set_death_signal(signal.SIGHUP)
    stop_at: list[float] = []  # when Azurite gets its SIGTERM (the earliest asked for)

    def on_signal(number: int, _frame: object) -> None:
        # Only an append: a handler must take no lock its own thread may hold (an Event's
        # set() does); the loop below looks every 0.1 s.
        delay = grace_s if number == signal.SIGHUP else 0.0
        stop_at.append(time.monotonic() + delay)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, on_signal)
    if os.getppid() != parent:  # the controller died before the death signal was set
        on_signal(signal.SIGHUP, None)
    child = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_keeper,  # noqa: PLW1509 - only prctl, safe before exec
    )
    signalled = False
    while True:
        code = child.poll()
        if code is not None:
            return code
        if stop_at and not signalled and time.monotonic() >= min(stop_at):
            child.send_signal(signal.SIGTERM)  # once: a second one would kill it unsaved
            signalled = True
            try:
                return child.wait(timeout=SAVE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                return child.wait()
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
