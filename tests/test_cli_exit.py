"""``batchctl``'s quick exit (cli.entry): exit hooks and output kept, running threads awaited."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _entry(prelude: str, *argv: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(prelude) + textwrap.dedent(
        f"""
        from batchctl import cli
        sys.argv = ["batchctl", *{list(argv)!r}]
        cli.entry()
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def test_exit_hooks_run_and_buffered_output_is_flushed() -> None:
    done = _entry(
        """
        import atexit, sys
        atexit.register(lambda: print("hook ran", flush=True))
        sys.stdout.write("buffered, never flushed by hand\\n")
        """,
        "--version",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "buffered, never flushed by hand"
    assert lines[-1] == "hook ran"


def test_the_exit_code_is_the_commands() -> None:
    done = _entry("import sys\n", "validate", "/nonexistent/manifest.csv")
    assert done.returncode not in (0, None)
    assert done.returncode == _plain_main_code("validate", "/nonexistent/manifest.csv")


def _plain_main_code(*argv: str) -> int:
    script = f"import sys\nfrom batchctl import cli\nsys.exit(cli.main({list(argv)!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=REPO, timeout=120, check=False
    ).returncode


def test_a_thread_still_running_is_waited_for() -> None:
    done = _entry(
        """
        import sys, threading, time
        def late() -> None:
            time.sleep(0.5)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        """,
        "--version",
    )
    assert done.returncode == 0, done.stderr
    assert "thread finished" in done.stdout
