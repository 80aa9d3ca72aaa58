"""One check's outcome, printed as one line: ``ok``, ``FAIL`` (with what to do) or ``skip``."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Status(enum.StrEnum):
    OK = "ok"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """What was checked (``what``) and, for FAIL and skip, what to do or why (``detail``)."""

    status: Status
    what: str
    detail: str = ""

    def line(self) -> str:
        # One line whatever an SDK message held: a FAIL is read at a glance, then acted on.
        text = f"{self.status.value:<4} {' '.join(self.what.split())}"
        detail = " ".join(self.detail.split())
        return f"{text}: {detail}" if detail else text

    def as_json(self) -> dict[str, str]:
        return {"status": self.status.value, "what": self.what, "detail": self.detail}


def ok(what: str) -> CheckResult:
    return CheckResult(Status.OK, what)


def fail(what: str, todo: str) -> CheckResult:
    return CheckResult(Status.FAIL, what, todo)


def skip(what: str, why: str) -> CheckResult:
    return CheckResult(Status.SKIP, what, why)


def exit_code(results: Iterable[CheckResult]) -> int:
    """0 when nothing failed (skips do not fail a doctor run), else 1."""
    return 1 if any(result.status is Status.FAIL for result in results) else 0
