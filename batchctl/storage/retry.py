"""Backoff policy for storage calls we retry ourselves (pure, so it is easy to test)."""

from __future__ import annotations

import random

# Azure Storage answers 503 "server busy" and 500 "operation timed out" when throttling; both
# mean "slow down and try again". Anything else is a real error and is raised at once.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable_status(status: int | None) -> bool:
    return status is not None and status in RETRYABLE_STATUS


def backoff_delay(
    attempt: int, *, base_s: float = 0.2, cap_s: float = 10.0, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads a burst of throttled senders so they do not retry in lockstep.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap_s, base_s * (2**attempt))
    return (rng or random).uniform(0.0, ceiling)
