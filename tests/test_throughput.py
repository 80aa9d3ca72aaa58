"""The one rate and ETA computation (batchctl.throughput), against its definition."""

from __future__ import annotations

import random

import pytest

from batchctl.throughput import Throughput, eta_s, rate_over


def _definition(samples: list[tuple[float, int]], window_s: float | None) -> float | None:
    """Items per second from the first sample in the window (or the first) to the last."""
    if len(samples) < 2:
        return None
    last = samples[-1]
    inside = [s for s in samples if window_s is None or s[0] >= last[0] - window_s]
    first = inside[0] if inside[0] is not last else samples[-2]
    elapsed, finished = last[0] - first[0], last[1] - first[1]
    return finished / elapsed if elapsed > 0 and finished > 0 else None


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("window_s", [None, 5.0, 30.0])
def test_the_tracker_agrees_with_the_definition_on_random_progress(
    seed: int, window_s: float | None
) -> None:
    rng = random.Random(seed)
    tracker = Throughput(window_s)
    seen: list[tuple[float, int]] = []
    now, done = rng.uniform(0, 100), 0
    for _ in range(rng.randint(1, 80)):
        now += rng.choice([0.0, rng.uniform(0.01, 4.0)])
        done += rng.choice([0, 0, rng.randint(1, 7)])
        tracker.observe(now, done)
        seen.append((now, done))
        assert tracker.rate == pytest.approx(_definition(seen, window_s))
        assert rate_over(seen, window_s) == pytest.approx(_definition(seen, window_s))


def test_a_count_that_goes_down_starts_the_observations_again() -> None:
    tracker = Throughput()
    for now, done in [(0.0, 0), (10.0, 50)]:
        tracker.observe(now, done)
    assert tracker.rate == pytest.approx(5.0)
    tracker.observe(11.0, 2)  # another run's counts
    assert tracker.rate is None
    tracker.observe(13.0, 6)
    assert tracker.rate == pytest.approx(2.0)


def test_the_eta_is_the_runs_own_else_the_remaining_at_the_rate() -> None:
    assert eta_s(120.0, 10, 2.0) == 120.0
    assert eta_s(None, 10, 2.0) == pytest.approx(5.0)
    assert eta_s(None, 10, None) is None
    assert eta_s(None, 0, 2.0) is None
    assert eta_s(120.0, 10, 2.0, finished=True) is None
