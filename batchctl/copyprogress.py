"""A long copy-out's progress lines: pure printing, light to import.

Its own module, not the copy-out's: `batchctl run` builds one before the run starts, and the
copy-out's module loads the controller and the storage clients, which a run loads only once
its standby workers have started (tests/test_start_order.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

# A copy-out that lasts longer than this prints where it is, then again every PROGRESS_EVERY_S.
PROGRESS_AFTER_S = 5.0


PROGRESS_EVERY_S = 5.0


class CopyProgress:
    """Progress lines of a long copy of a run's outputs, on ``stream`` (default stderr).

    Nothing is printed for a copy shorter than ``after_s``: most runs copy out in a moment
    and a line would only be noise. Past it, a line every ``every_s`` (``copying outputs of
    run R: 12,000 of 50,000 files (800/s)``), and a closing line once the copy ends, so a
    person watching a 6-minute copy knows it moves and when it will end. ``before_first``
    runs once before the first line (the commands stop their live panel there, which would
    otherwise redraw over the lines). The clock is injectable for tests.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        after_s: float = PROGRESS_AFTER_S,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        before_first: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self.after_s = after_s
        self.every_s = every_s
        self._clock = clock
        self._before_first = before_first
        self._run_id = ""
        self._total = 0
        self._started = 0.0
        self._last_line: float | None = None

    def start(self, run_id: str, total: int) -> None:
        self._run_id, self._total = run_id, total
        self._started = self._clock()
        self._last_line = None

    def advance(self, done: int) -> None:
        """``done`` files of the total are copied: print a line when one is due."""
        now = self._clock()
        if now - self._started < self.after_s:
            return
        if self._last_line is not None and now - self._last_line < self.every_s:
            return
        self._last_line = now
        self._say(
            f"copying outputs of run {self._run_id}: {done:,} of {self._total:,} files "
            f"({self._rate(done, now)})"
        )

    def end(self, done: int) -> None:
        """The copy ended with ``done`` files copied: a closing line if any line was shown."""
        if self._last_line is None:
            return
        now = self._clock()
        self._say(
            f"copied outputs of run {self._run_id}: {done:,} of {self._total:,} files in "
            f"{now - self._started:.0f} s ({self._rate(done, now)})"
        )

    def _rate(self, done: int, now: float) -> str:
        elapsed = now - self._started
        return f"{done / elapsed:,.0f}/s" if elapsed > 0 else "-/s"

    def _say(self, line: str) -> None:
        if self._before_first is not None:
            before, self._before_first = self._before_first, None
            before()
        # Looked up at each line, not at construction: a test or a caller may swap stderr.
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()
