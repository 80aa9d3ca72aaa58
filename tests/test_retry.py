from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchctl.storage.retry import backoff_delay, is_retryable_status


@given(st.integers(min_value=0, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_bounded_and_non_negative(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, base_s=0.2, cap_s=10.0, rng=random.Random(seed))
    assert 0.0 <= delay <= min(10.0, 0.2 * 2**attempt)


def test_backoff_ceiling_grows_then_caps() -> None:
    rng = random.Random(1)
    ceilings = [max(backoff_delay(a, rng=rng) for _ in range(400)) for a in range(8)]
    assert ceilings[0] <= 0.2 < ceilings[3]
    assert all(c <= 10.0 for c in ceilings)
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1)


def test_only_throttling_and_server_errors_retry() -> None:
    assert is_retryable_status(503) and is_retryable_status(500)
    assert not is_retryable_status(400) and not is_retryable_status(404)
    assert not is_retryable_status(None)
