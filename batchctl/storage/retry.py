"""Backoff policy for storage calls we retry ourselves (pure, so it is easy to test)."""

from __future__ import annotations

import random
from typing import Any

# The SDKs' own retries for every storage call, kept short. Their defaults (an exponential
# backoff from 15 s, three times) can hold a caller for a minute or more; a worker's loop
# thread stuck that long cannot renew the visibility of its in-flight messages, which then
# reappear and are worked twice. Callers that can wait longer retry at their own level.
# Queue and table calls are small: (2 retries + 1) x 15 s read + ~4 s of backoff stays well
# inside the 80 s between a message's last renewal (a third into 120 s) and its reappearance.
# Blob reads stream media, so a read may stall longer before it is given up.
SDK_RETRY_TOTAL = {"blob": 3, "queue": 2, "table": 2}
SDK_READ_TIMEOUT_S = {"blob": 60, "queue": 15, "table": 15}
SDK_INITIAL_BACKOFF_S = 1
SDK_BACKOFF_BASE = 2
SDK_CONNECTION_TIMEOUT_S = 10

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


def storage_client_options(package: str) -> dict[str, Any]:
    """Constructor options for a blob or queue client: short retries, bounded timeouts.

    ``package`` is ``"blob"`` or ``"queue"``: each SDK package has its own retry policy class.
    """
    if package == "blob":
        from azure.storage.blob import ExponentialRetry as BlobRetry

        policy: Any = BlobRetry(
            initial_backoff=SDK_INITIAL_BACKOFF_S,
            increment_base=SDK_BACKOFF_BASE,
            retry_total=SDK_RETRY_TOTAL["blob"],
            random_jitter_range=1,
        )
    elif package == "queue":
        from azure.storage.queue import ExponentialRetry as QueueRetry

        policy = QueueRetry(
            initial_backoff=SDK_INITIAL_BACKOFF_S,
            increment_base=SDK_BACKOFF_BASE,
            retry_total=SDK_RETRY_TOTAL["queue"],
            random_jitter_range=1,
        )
    else:
        raise ValueError(f"no storage package {package!r}")
    return {
        "retry_policy": policy,
        "connection_timeout": SDK_CONNECTION_TIMEOUT_S,
        "read_timeout": SDK_READ_TIMEOUT_S[package],
    }


def table_client_options() -> dict[str, Any]:
    """Constructor options for a table client (azure-core's retry policy): the same bounds."""
    return {
        "retry_total": SDK_RETRY_TOTAL["table"],
        "retry_backoff_factor": SDK_INITIAL_BACKOFF_S,
        "retry_backoff_max": 8,
        "connection_timeout": SDK_CONNECTION_TIMEOUT_S,
        "read_timeout": SDK_READ_TIMEOUT_S["table"],
    }
