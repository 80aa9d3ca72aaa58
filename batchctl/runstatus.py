"""One run-status contract, and the one mapping from Durable's status to it.

A run's status reaches people through four doors: the Durable status URL (runtime status +
the orchestrator's custom status), the app's ``GET /api/runs/{id}``, the ``batchctl``
client, and the local server (``batchctl serve``). All four speak :class:`RunStatus`, built by
:func:`run_status` from Durable's runtime status and the orchestrator's custom status, so the
question "what does a Terminated orchestration whose last custom status said running mean"
has one answer, here.

This module imports neither the Functions SDK nor the Durable SDK nor any server handler: the
CLI client depends on it, and a command must not pull the server into a terminal session.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from batchctl.contracts import SCHEMA_VERSION, RunPhase


class RuntimeStatus(StrEnum):
    """Durable's ``runtimeStatus`` values (``OrchestrationRuntimeStatus`` in the SDK)."""

    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    CONTINUED_AS_NEW = "ContinuedAsNew"
    FAILED = "Failed"
    TERMINATED = "Terminated"
    CANCELED = "Canceled"
    SUSPENDED = "Suspended"


UNKNOWN_RUNTIME = "Unknown"

# Runtime statuses in which an instance is still alive (and may own compute).
ACTIVE_STATUSES = frozenset(
    {
        RuntimeStatus.PENDING.value,
        RuntimeStatus.RUNNING.value,
        RuntimeStatus.CONTINUED_AS_NEW.value,
        RuntimeStatus.SUSPENDED.value,
    }
)

# The phase an ended orchestration stands for when its own last word is not a terminal phase:
# it crashed (Failed) or was killed (Terminated, Canceled) before it could say so, or it
# completed without a custom status.
PHASE_OF_ENDED_RUNTIME: dict[str, str] = {
    RuntimeStatus.COMPLETED.value: RunPhase.COMPLETED.value,
    RuntimeStatus.FAILED.value: RunPhase.FAILED.value,
    RuntimeStatus.TERMINATED.value: RunPhase.CANCELLED.value,
    RuntimeStatus.CANCELED.value: RunPhase.CANCELLED.value,
}
# Runtime statuses that override whatever the custom status says: the orchestration did not
# end through our code, so its last custom status ("running") is stale.
_ENDED_ABNORMALLY = frozenset(
    {RuntimeStatus.FAILED.value, RuntimeStatus.TERMINATED.value, RuntimeStatus.CANCELED.value}
)
TERMINAL_PHASES = frozenset(
    {RunPhase.COMPLETED.value, RunPhase.FAILED.value, RunPhase.CANCELLED.value}
)
# Before the orchestrator has said anything (a queued or just-started instance); the
# runtime status (Pending or Running) tells the two apart.
STARTING_PHASE = "starting"


def runtime_name(value: Any) -> str | None:
    """A runtime status as its Durable name: from the SDK's enum, a string or None."""
    if value is None:
        return None
    name = getattr(value, "value", value)
    return str(name) if name else None


def phase_for(runtime: str, custom_phase: str | None) -> str:
    """The run's phase from the runtime status and the orchestrator's own phase (the one
    mapping; see the module docstring)."""
    if runtime in _ENDED_ABNORMALLY:
        return PHASE_OF_ENDED_RUNTIME[runtime]
    if runtime not in ACTIVE_STATUSES and runtime != UNKNOWN_RUNTIME:
        # Completed (or a status newer than this code): the orchestrator's last phase when
        # it is a terminal one, else what the runtime status stands for.
        if custom_phase in TERMINAL_PHASES:
            return custom_phase
        return PHASE_OF_ENDED_RUNTIME.get(runtime, RunPhase.FAILED.value)
    return custom_phase or STARTING_PHASE


class RunStatus(BaseModel):
    """Where a run stands, as every door shows it (see the module docstring).

    Counts: ``total`` valid items, of which ``succeeded``, ``failed`` and ``not_run`` (the
    run ended without them) are done and ``remaining`` are not; ``invalid`` manifest rows
    are outside ``total``. ``report`` is the report.json link once the run has ended.
    """

    # Extra fields are ignored and fields have defaults, so a newer app never breaks an
    # older client (and the other way round).
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str
    runtime_status: str = UNKNOWN_RUNTIME
    phase: str = STARTING_PHASE
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    not_run: int = 0
    invalid: int = 0
    remaining: int = 0
    percent: float = 0.0
    eta_s: float | None = None
    message: str = ""
    report: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    nodes_active: int | None = None
    nodes_planned: int | None = None

    @property
    def finished(self) -> bool:
        return self.runtime_status not in ACTIVE_STATUSES

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.not_run

    @property
    def outcome(self) -> str:
        """The phase, corrected for runs whose orchestration ended without saying so."""
        return phase_for(self.runtime_status, self.phase) if self.finished else self.phase

    @property
    def succeeded_fully(self) -> bool | None:
        """None while running; True when every valid item succeeded and no row was invalid."""
        if not self.finished:
            return None
        return self.ended_well and not self.failed and not self.not_run and not self.invalid

    @property
    def ended_well(self) -> bool:
        """The orchestration completed and the run itself did not fail or get cancelled."""
        return (
            self.runtime_status == RuntimeStatus.COMPLETED.value
            and self.outcome == RunPhase.COMPLETED.value
        )

    def view(self) -> dict[str, Any]:
        """The JSON shape: the fields, the corrected phase and ``finished``."""
        return {**self.model_dump(mode="json"), "phase": self.outcome, "finished": self.finished}


def _custom_mapping(custom_status: Any) -> dict[str, Any]:
    # Some Durable SDK versions (and the raw HTTP API) hand the custom status back as a JSON
    # string; anything that is not an object carries no counts.
    if isinstance(custom_status, str | bytes):
        try:
            custom_status = json.loads(custom_status)
        except ValueError:
            return {}
    return dict(custom_status) if isinstance(custom_status, Mapping) else {}


def _optional_count(custom: Mapping[str, Any], key: str) -> int | None:
    value = custom.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return None


def _count(custom: Mapping[str, Any], key: str) -> int:
    try:
        return max(int(custom.get(key) or 0), 0)
    except (TypeError, ValueError):
        return 0


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def run_status(
    run_id: str,
    runtime_status: Any,
    custom_status: Any,
    *,
    report: str | None = None,
    created_at: Any = None,
    updated_at: Any = None,
) -> RunStatus:
    """THE mapping: Durable's runtime status and the orchestrator's custom status (the
    ``RunProgress`` shape, or the orchestrator's own dicts with the same keys; a JSON string
    of either) to a :class:`RunStatus`. ``report`` is shown only once the run has ended."""
    runtime = runtime_name(runtime_status) or UNKNOWN_RUNTIME
    custom = _custom_mapping(custom_status)
    total = _count(custom, "total")
    succeeded, failed = _count(custom, "succeeded"), _count(custom, "failed")
    not_run = _count(custom, "not_run")
    done = succeeded + failed + not_run
    finished = runtime not in ACTIVE_STATUSES
    custom_phase = custom.get("phase")
    # An empty run that ended is wholly done; one that has not counted its items yet is not.
    empty_percent = 100.0 if finished else 0.0
    percent = round(min(100.0 * done / total, 100.0), 2) if total else empty_percent
    return RunStatus(
        run_id=run_id,
        runtime_status=runtime,
        phase=phase_for(runtime, str(custom_phase) if custom_phase else None),
        total=total,
        succeeded=succeeded,
        failed=failed,
        not_run=not_run,
        invalid=_count(custom, "invalid"),
        remaining=max(total - done, 0),
        percent=percent,
        eta_s=None if finished else _number(custom.get("eta_s")),
        message=str(custom.get("message") or ""),
        report=report if finished else None,
        created_at=_moment(created_at),
        started_at=_moment(custom.get("started_at")),
        updated_at=_moment(custom.get("updated_at")) or _moment(updated_at),
        # Nodes are a running run's: an ended one has none working.
        nodes_active=None if finished else _optional_count(custom, "nodes_active"),
        nodes_planned=_optional_count(custom, "nodes_planned"),
    )


def run_status_of(status: Any, run_id: str, report: str | None = None) -> RunStatus:
    """From a Durable client's ``DurableOrchestrationStatus`` (or anything with its
    attributes: ``runtime_status``, ``custom_status``, ``created_time``, ...)."""
    return run_status(
        run_id,
        getattr(status, "runtime_status", None),
        getattr(status, "custom_status", None),
        report=report,
        created_at=getattr(status, "created_time", None),
        updated_at=getattr(status, "last_updated_time", None),
    )


class NotADurableStatusError(ValueError):
    """The body is not a Durable status (no ``runtimeStatus``)."""


def run_status_from_json(body: Any, run_id: str | None = None) -> RunStatus:
    """From the Durable status URL's JSON body (``runtimeStatus``, ``customStatus``, ...)."""
    if not isinstance(body, Mapping) or "runtimeStatus" not in body:
        raise NotADurableStatusError("the body has no runtimeStatus")
    instance = run_id or str(body.get("instanceId") or "")
    return run_status(
        instance,
        body.get("runtimeStatus"),
        body.get("customStatus"),
        created_at=body.get("createdTime"),
        updated_at=body.get("lastUpdatedTime"),
    )
