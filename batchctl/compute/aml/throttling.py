"""Waiting out a throttled (or briefly failing) AML listing, for a bounded time.

ARM gives each principal about 250 reads in a burst and 25 a second after that, shared by
every poll, submit and teardown of every run the controller drives; over it, ARM answers
429 with a Retry-After. The gateways read a run's jobs in one paged listing (a few pages
at most, whatever the fleet's size), and each listing goes through :func:`wait_out`:

- a transient answer (azure-core's own retry set: 408, 429, 500, 502, 503, 504) or a
  connection that failed is tried again, after the answer's Retry-After when it has one
  (ARM's throttling says how long its bucket needs) and after a full-jitter exponential
  backoff otherwise;
- the whole wait is bounded (``AmlSettings.arm_retry_budget_s``): when the next wait would
  end past the budget, the caller gets :class:`ThrottledError` at once instead of sleeping
  into it. Any other error (a 403, a 404 of the workspace) goes through unchanged.

What azure-core does on its own, and why this is on top of it (azure-core 1.41,
``RetryPolicy``, read in its source): MLClient builds each client's pipeline with the
default policy, which retries a 429 or 503 three times (``retry_status``), sleeping each
Retry-After in full however long it is and with no bound on the total, then raises
``HttpResponseError``; a paged listing that fails on its seventh page starts from its first
when its caller tries again. So the v2 gateway asks the pipeline not to retry statuses on
the listing (``retry_status=0`` per call; connection retries stay with the pipeline) and
resumes a failed listing from the page that failed (``ItemPaged.by_page`` with the page's
continuation), and this loop alone decides how long to wait.

Nothing here imports an Azure SDK: errors are read by duck typing, as ``quota`` reads them.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeVar

from batchctl.compute.base import ComputeError

__all__ = [
    "TRANSIENT_STATUS",
    "Patience",
    "ThrottledError",
    "retry_after_s",
    "sign_in_failed",
    "transient_status",
    "wait_out",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# azure-core's RetryPolicy retries these statuses (its _RETRY_CODES); ARM throttles with 429
# and an overloaded front end answers 503, both with Retry-After.
TRANSIENT_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})
# azure-core's transport errors: no answer came (refused, reset, timed out). The pipeline
# retried them already; past that they count as transient here too.
_NO_ANSWER: Final = frozenset({"ServiceRequestError", "ServiceResponseError"})


class ThrottledError(ComputeError):
    """An AML listing kept failing transiently (throttled, mostly) past its time budget."""

    def __init__(self, message: str, *, status: int | None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Patience:
    """How long a listing waits out transient failures, and how it spaces its tries."""

    budget_s: float
    initial_backoff_s: float = 1.0
    backoff_cap_s: float = 8.0
    # Only keeps a zero wait (Retry-After: 0) from spinning: the budget ends a long spell.
    max_tries: int = 30

    def backoff_s(self, retries_done: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, initial x 2^n)], so throttled callers spread."""
        ceiling = min(self.backoff_cap_s, self.initial_backoff_s * 2 ** min(retries_done, 32))
        return (rng or random).uniform(0.0, ceiling)


def transient_status(error: BaseException) -> int | None:
    """The HTTP status of a transient failure (0 when no answer came), else None.

    azure-core's ``HttpResponseError`` and azureml-core's ``ServiceException`` both carry
    ``status_code``; azure-core's transport errors carry none and are named by type.
    """
    status = getattr(error, "status_code", None)
    if status is None:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return status if status in TRANSIENT_STATUS else None
    if {kind.__name__ for kind in type(error).__mro__} & _NO_ANSWER:
        return 0
    return None


# azure-core's and azure-identity's sign-in errors: a token could not be had (the identity
# endpoint did not answer, a refresh was refused) or ARM refused the token (401).
_SIGN_IN: Final = frozenset({"ClientAuthenticationError", "CredentialUnavailableError"})


def sign_in_failed(error: BaseException) -> bool:
    """Whether ``error`` is a failed sign-in (a token refresh that failed, a 401)."""
    return bool({kind.__name__ for kind in type(error).__mro__} & _SIGN_IN)


def retry_after_s(error: BaseException, *, now: datetime | None = None) -> float | None:
    """Seconds the service asked the caller to wait (Retry-After, seconds or HTTP date)."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    text = str(value).strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def wait_out(
    read: Callable[[], _T],
    patience: Patience,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> _T:
    """``read()``, tried again on transient failures until ``patience.budget_s`` is spent.

    ``read`` is called again as it is: a caller that can resume (a listing at its failed
    page) keeps that state itself. Raises :class:`ThrottledError` (from the last failure)
    once the next wait would end past the budget; any other error at once.
    """
    deadline = clock() + patience.budget_s
    tries = 0
    while True:
        try:
            return read()
        except Exception as error:  # classified below; anything not transient is re-raised
            status = transient_status(error)
            if status is None:
                raise
            tries += 1
            asked = retry_after_s(error)
            wait = asked if asked is not None else patience.backoff_s(tries - 1, rng)
            spent = patience.budget_s - (deadline - clock())
            if tries >= patience.max_tries or clock() + wait > deadline:
                answer = f"HTTP {status}" if status else "no answer"
                raise ThrottledError(
                    f"{what}: still {answer} after {tries} tries in {spent:.0f} s "
                    f"(the next wait, {wait:.0f} s, would pass the {patience.budget_s:.0f} s "
                    "budget)",
                    status=status or None,
                ) from error
            log.warning(
                "%s: HTTP %s, trying again in %.1f s (%s)",
                what,
                status or "no answer",
                wait,
                "as Retry-After asks" if asked is not None else "backoff",
            )
            sleep(wait)
