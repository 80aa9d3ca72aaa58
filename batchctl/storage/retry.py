"""The one retry policy for every storage call: declared here, built into the SDKs' own
retry policies by :mod:`batchctl.storage.clients` (the only place that builds a client).

Every call, local and deployed, worker and controller, retries throttling (408, 429, 500,
502, 503, 504), connection resets and timeouts with a full-jitter exponential backoff, and
gives up once its time budget is spent: the bound in total time is the point, not a count.

Why the budgets are short. A worker's loop thread does the queue I/O (receive, renew a
message's visibility, delete) and must renew each in-flight message a third into its
visibility timeout (120 s by default): if one call held that thread for longer than the
80 s between a renewal and the message's reappearance, the message would be worked twice.
So the worst case of one queue or table call, its budget plus one last attempt's connect
and read timeouts (:attr:`RetryBounds.worst_case_s`), stays well inside those 80 s
(tests/test_storage_faults.py holds that). Blob reads stream media and run on item threads,
so they may wait longer. The SDKs' defaults (an exponential backoff from 15 s, or azure-core's
ten retries with backoffs up to 120 s) could hold a caller for minutes.

Roles. A caller with nothing better to do than wait, and much to lose by giving up, is
more patient: copying a finished run's results out (``copy_out``) waits ``ROLE_PATIENCE``
times as long as the ``ordinary`` calls of every other caller. Both come from the one
declaration below; nothing else sets a retry count, a backoff or a timeout.

What the SDKs' retry code really does (azure-core 1.41, azure-storage-blob 12.31,
azure-storage-queue 12.18, azure-data-tables 12.7; read in their sources):

- Blob and queue (``_shared/policies.py`` ``StorageRetryPolicy``): retries 408 and every 5xx
  but 501 and 505, NOT 429 (a module function decides, which no subclass can change; the
  blob and queue services throttle with 503 ServerBusy and 500 OperationTimedOut, never
  429, so nothing is lost), and any ``AzureError`` raised inside
  the pipeline whatever the method (a POST or a PUT too): ``ServiceRequestError`` (no
  connection: refused, reset before the request went out), ``ServiceResponseError`` (reset
  or timeout after it went out, ``ServiceResponseTimeoutError`` included) and the
  ``HttpResponseError`` the requests transport raises for a body cut off mid-way in a call
  that reads its body inside the pipeline. Besides ``retry_total`` it keeps separate
  ``retry_connect``/``retry_read``/``retry_status`` counts, 3 each by default, and stops at
  the first one spent, so all are set here. Its backoff ignores Retry-After, and it has no
  bound in time.
- A streaming blob download reads its body after the pipeline returned, so a reset
  mid-body never reaches the retry policy: ``_download.py`` has its own loop around reading
  the body (3 tries, 1 s apart, numbers no option changes), catching ``IncompleteReadError``,
  ``DecodeError``, ``ServiceResponseError`` and ``HttpResponseError``; each new try is a new
  request through the pipeline (and this policy). Past those 3 the blob adapter asks again
  for the rest, from the byte it got to, under this policy's backoff and bound
  (``BlobStore._resumed``): under the fault proxy, three cuts in a row of one small output
  failed a whole run's copy-out. azure-core's requests transport logs each cut as the bare
  "Unable to stream download." (a reset: requests' ``ChunkedEncodingError``; also for
  answers that are not streamed, read inside its send) or "Incomplete download." (a clean
  close short of Content-Length), naming nothing (:mod:`batchctl.storage.faults` adds the
  run, the item and the request to those lines).
- Tables (``TablesRetryPolicy``, azure-core's ``RetryPolicy``): retries 408, 429, 500, 502,
  503 and 504 (and any status with Retry-After, which it honours) for GET, PUT, DELETE and
  HEAD; for POST and PATCH (create table, an entity insert, a batch transaction, a merge)
  only 500, 503 and 504, and no transport error at all (a reset, a timeout, a body cut off):
  a POST whose connection broke may have been applied. Under the fault proxy that turned one
  reset of ``create_table`` at a session's start into a failed ``batchctl run``. Every table
  write of ours is create-only (first write wins) or conditional on an ETag, so a repeat of
  one already applied fails as a conflict the ledger reads as "recorded already" (its
  counts stay exact: the applied transaction was atomic); :class:`TableRetryPolicy` retries
  every method, as the blob and queue policies do. azure-core's backoff has no jitter (0,
  then factor x 2^n), and its ``timeout`` (the bound in total time it offers) is not
  honoured well by the tables subclass: once spent, every further try fails at once with
  "Response timeout" and is retried through the remaining counts, hiding the real error (a
  503). So the bound here is checked before each backoff instead, and the last real answer
  is what the caller sees.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from azure.core.pipeline import PipelineResponse
from azure.data.tables._policies import TablesRetryPolicy
from azure.storage.blob import ExponentialRetry as BlobExponentialRetry
from azure.storage.queue import ExponentialRetry as QueueExponentialRetry

Package = Literal["blob", "queue", "table"]
Role = Literal["ordinary", "copy_out"]

# -- the one declaration ----------------------------------------------------------------
# Seconds after a call's first attempt in which a retry may still start, per package.
SDK_RETRY_BUDGET_S: dict[Package, float] = {"blob": 45.0, "queue": 20.0, "table": 20.0}
# Seconds one attempt may wait for a connection, and for each read of its answer.
SDK_CONNECTION_TIMEOUT_S = 10
SDK_READ_TIMEOUT_S: dict[Package, int] = {"blob": 60, "queue": 15, "table": 15}
# The backoff before retry n (from 0) is uniform in [0, min(cap, initial x base^n)].
SDK_INITIAL_BACKOFF_S = 0.5
SDK_BACKOFF_BASE = 2
SDK_BACKOFF_CAP_S = 8.0
# How many times longer a role waits than an ordinary call.
ROLE_PATIENCE: dict[Role, int] = {"ordinary": 1, "copy_out": 3}

# Azure Storage answers 503 "server busy" and 500 "operation timed out" when throttling; both
# mean "slow down and try again". Anything else is a real error and is raised at once.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _retries_to_fill(budget_s: float) -> int:
    """Enough retries that backoffs averaging a quarter of their ceilings (full jitter
    averages half) still fill the budget: the time bound, not the count, ends a long spell.
    The count only keeps a zero backoff (a test's) from spinning."""
    spent, retries = 0.0, 0
    while spent < budget_s:
        spent += min(SDK_BACKOFF_CAP_S, SDK_INITIAL_BACKOFF_S * SDK_BACKOFF_BASE**retries) / 4
        retries += 1
    return retries


# Retries at most per ordinary call (a role multiplies it by its patience). Derived from
# the budgets; a test may set one to 0 to make a refused connection fail at once.
SDK_RETRY_TOTAL: dict[Package, int] = {
    package: _retries_to_fill(budget) for package, budget in SDK_RETRY_BUDGET_S.items()
}


@dataclass(frozen=True)
class RetryBounds:
    """The retry policy of one package's calls in one role, as the declaration makes it."""

    package: Package
    role: Role
    budget_s: float
    retries: int
    initial_backoff_s: float
    backoff_base: float
    backoff_cap_s: float
    connection_timeout_s: float
    read_timeout_s: float

    @property
    def worst_case_s(self) -> float:
        """How long one call may take: a last retry may start just inside the budget and
        then wait its full connect and read timeouts."""
        return self.budget_s + self.connection_timeout_s + self.read_timeout_s

    def backoff_s(self, retries_done: int, rng: random.Random | None = None) -> float:
        return backoff_delay(
            retries_done,
            base_s=self.initial_backoff_s,
            cap_s=self.backoff_cap_s,
            growth=self.backoff_base,
            rng=rng,
        )


def retry_bounds(package: Package, role: Role = "ordinary") -> RetryBounds:
    """The bounds of ``package``'s calls in ``role``, read from the declaration now (so a
    test that changes the declaration changes every client built after)."""
    patience = ROLE_PATIENCE[role]
    return RetryBounds(
        package=package,
        role=role,
        budget_s=SDK_RETRY_BUDGET_S[package] * patience,
        retries=SDK_RETRY_TOTAL[package] * patience,
        initial_backoff_s=SDK_INITIAL_BACKOFF_S,
        backoff_base=SDK_BACKOFF_BASE,
        backoff_cap_s=SDK_BACKOFF_CAP_S,
        connection_timeout_s=SDK_CONNECTION_TIMEOUT_S,
        read_timeout_s=SDK_READ_TIMEOUT_S[package],
    )


def is_retryable_status(status: int | None) -> bool:
    return status is not None and status in RETRYABLE_STATUS


def backoff_delay(
    attempt: int,
    *,
    base_s: float = 0.2,
    cap_s: float = 10.0,
    growth: float = 2.0,
    rng: random.Random | None = None,
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * growth**attempt)].

    Full jitter spreads a burst of throttled senders so they do not retry in lockstep.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # The exponent is capped so a long spell's count cannot overflow a float.
    ceiling = min(cap_s, base_s * (growth ** min(attempt, 64)))
    return (rng or random).uniform(0.0, ceiling)


# -- the bound in time, added to the SDKs' own policies ---------------------------------
# Keys this module adds to an SDK policy's per-call settings dict.
_DEADLINE = "batchctl_deadline"
_RETRIES_DONE = "batchctl_retries_done"
_PLANNED_S = "batchctl_backoff_s"


def _start(settings: dict[str, Any], bounds: RetryBounds) -> dict[str, Any]:
    settings[_DEADLINE] = time.monotonic() + bounds.budget_s
    settings[_RETRIES_DONE] = 0
    return settings


def _plan(settings: dict[str, Any], bounds: RetryBounds, at_least_s: float = 0.0) -> bool:
    """Choose the next backoff; False (no retry: the caller gets the last real answer)
    when the retry would start after the call's budget is spent."""
    delay = max(at_least_s, bounds.backoff_s(settings[_RETRIES_DONE]))
    if time.monotonic() + delay > settings[_DEADLINE]:
        return False
    settings[_RETRIES_DONE] += 1
    settings[_PLANNED_S] = delay
    return True


class _BoundedStorageRetry:
    """What the blob and queue policies add to their package's own ``ExponentialRetry``:
    full jitter and the bound in time. The two packages ship copies of one policy class, so
    one mixin serves both; it sits before the package's class in the bases, and its
    ``super()`` is that class."""

    def __init__(self, bounds: RetryBounds) -> None:
        # The package's own backoff is replaced by get_backoff_time below. Every count it
        # keeps is set, not only the total: each one stops the retries when spent.
        _package_policy(self).__init__(
            initial_backoff=0,
            increment_base=0,
            random_jitter_range=0,
            retry_total=bounds.retries,
            retry_connect=bounds.retries,
            retry_read=bounds.retries,
            retry_status=bounds.retries,
        )
        self.bounds = bounds

    def configure_retries(self, request: Any) -> dict[str, Any]:
        return _start(_package_policy(self).configure_retries(request), self.bounds)

    def increment(
        self, settings: dict[str, Any], request: Any, response: Any = None, error: Any = None
    ) -> bool:
        return bool(_package_policy(self).increment(settings, request, response, error)) and _plan(
            settings, self.bounds
        )

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return float(settings.get(_PLANNED_S, 0.0))


def _package_policy(policy: _BoundedStorageRetry) -> Any:
    """The package's own policy methods of ``policy``: the class after the mixin in its MRO
    (``super()`` cannot name it from a helper, and mypy cannot type a mixin's ``super()``)."""
    return super(_BoundedStorageRetry, policy)


class BlobRetryPolicy(_BoundedStorageRetry, BlobExponentialRetry):
    """azure-storage-blob's own retry policy, with full jitter and the bound in time."""


class QueueRetryPolicy(_BoundedStorageRetry, QueueExponentialRetry):
    """azure-storage-queue's own retry policy, with full jitter and the bound in time."""


class TableRetryPolicy(TablesRetryPolicy):
    """azure-data-tables' retry policy (azure-core's ``RetryPolicy``), with full jitter and
    the bound in time; a Retry-After the service sends is honoured within the bound."""

    def __init__(self, bounds: RetryBounds) -> None:
        # azure-data-tables' policy has no type hints; the keywords are azure-core's.
        super().__init__(  # type: ignore[no-untyped-call]
            retry_total=bounds.retries,
            retry_connect=bounds.retries,
            retry_read=bounds.retries,
            retry_status=bounds.retries,
            retry_backoff_max=bounds.backoff_cap_s,
        )
        # Every method, POST and PATCH too (see the module docstring for why that is safe).
        self._method_whitelist = frozenset(
            {"HEAD", "GET", "PUT", "DELETE", "OPTIONS", "TRACE", "POST", "PATCH", "MERGE"}
        )
        self.bounds = bounds

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)  # type: ignore[no-untyped-call]
        return _start(settings, self.bounds)

    def increment(self, settings: dict[str, Any], response: Any = None, error: Any = None) -> bool:
        if not super().increment(settings, response=response, error=error):
            return False
        # A response (not a request: a transport error) may carry Retry-After; azure-core
        # sleeps that long, so the bound must count it.
        retry_after = None
        if isinstance(response, PipelineResponse):
            retry_after = self.get_retry_after(response)
        return _plan(settings, self.bounds, retry_after or 0.0)

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return float(settings.get(_PLANNED_S, 0.0))
