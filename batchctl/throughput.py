"""Items per second and the ETA from it: the one computation every view of a run uses.

The live view of `run`/`status --follow`, the follow loop's final rate, and the local app's
dashboard all observe (time, items done) pairs and ask for a rate; an ETA is the run's own
(the orchestrator's, from the run's average since it started: ``progress.eta_seconds``)
when it has one, else the remaining items at the observed rate. Pure, so it is easy to test.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

Sample = tuple[float, int]  # (seconds on a monotonic clock, items done)


def rate_over(samples: Sequence[Sample], window_s: float | None = None) -> float | None:
    """Items per second between the first sample inside the last ``window_s`` seconds (or
    the first sample at all) and the last one; None while nothing measurable happened."""
    if len(samples) < 2:
        return None
    last = samples[-1]
    first = samples[0]
    if window_s is not None:
        first = next((s for s in samples if s[0] >= last[0] - window_s), samples[0])
        if first is last:
            first = samples[-2]
    elapsed = last[0] - first[0]
    finished = last[1] - first[1]
    return finished / elapsed if elapsed > 0 and finished > 0 else None


def eta_s(
    own_eta_s: float | None, remaining: int, rate: float | None, *, finished: bool = False
) -> float | None:
    """The run's own ETA when it has one, else the remaining items at ``rate``."""
    if finished:
        return None
    if own_eta_s is not None:
        return own_eta_s
    if rate and remaining:
        return remaining / rate
    return None


class Throughput:
    """Observations of one run's progress and the rate they show.

    Kept: the first observation and those within ``window_s`` of the last (all of them
    when it is None: the rate since the first). A count that goes down is another run's (or
    a restart's): the observations start again from it.
    """

    def __init__(self, window_s: float | None = None) -> None:
        self._window_s = window_s
        self._samples: deque[Sample] = deque()

    def observe(self, now: float, done: int) -> None:
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((now, done))
        if self._window_s is None:
            if len(self._samples) > 2:
                # Only the first and the last matter for the rate since the first.
                first = self._samples[0]
                self._samples = deque([first, (now, done)])
        else:
            while len(self._samples) > 2 and self._samples[1][0] < now - self._window_s:
                self._samples.popleft()

    @property
    def rate(self) -> float | None:
        return rate_over(list(self._samples), self._window_s)
