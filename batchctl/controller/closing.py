"""The sweeper's close of a run that Durable's terminate API ended: resumable, step by step.

A terminated run ran none of its own end (Durable's ``terminatePostUri`` runs no code of
ours), so the sweeper does it: teardown, the not-run records and the report, the same
bounded steps the orchestrator takes (one group of ledger shards each). A timer call has
the Functions timeout, and a large run's end may not fit one pass; so the close keeps how
far it got in storage (``close-progress.json`` beside the run's report), each pass does steps
until its time budget is spent, and the next pass goes on from there. Every step is
idempotent (first record wins; parts and the report are overwritten), so a pass killed in the
middle of a step costs that step again, never a second record or a wrong count. The
``finalized`` marker, written after the last step, ends it: later passes skip the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from pydantic import BaseModel, ConfigDict, Field

from batchctl.contracts import NotRunReason, RunPhase, RunState
from batchctl.controller.names import FINALIZED_NAME, close_progress_blob_name
from batchctl.controller.records import end_shard_groups, record_unfinished, teardown
from batchctl.controller.report import EndMarks, analyse_shards, write_report
from batchctl.services import Services

log = logging.getLogger(__name__)

# One pass of the sweeper stops starting steps after this long (the timer's own limit is the
# Functions timeout, 30 min in host.json; a step is one group of shards, minutes at 1M items).
CLOSE_PASS_BUDGET_S = 600.0
TERMINATED_MESSAGE = (
    "terminated through Durable's terminate API; the sweeper tore the run down "
    "(use POST /api/runs/{id}/cancel or `batchctl cancel` to stop a run cleanly)"
)


class CloseProgress(BaseModel):
    """How far the close of a terminated run got: what the next pass goes on from."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    finished_at: datetime = Field(description="the end the report is written for (first pass)")
    groups: list[list[int]] = Field(default_factory=list)
    done: list[str] = Field(default_factory=list, description="the steps finished, in order")
    passes: int = Field(default=0, ge=0)
    torn_down_at: datetime | None = None
    not_run_recorded_at: datetime | None = None


def close_steps(groups: list[list[int]], *, has_state: bool) -> list[str]:
    """The close's steps in order: teardown, then (with the run's state) the not-run
    records and the report's part of each group of shards, then the report."""
    if not has_state:
        return ["teardown"]
    return [
        "teardown",
        *(f"record:{index}" for index in range(len(groups))),
        *(f"analyse:{index}" for index in range(len(groups))),
        "report",
    ]


def finalize_terminated(
    services: Services,
    run_id: str,
    last_input: Any,
    *,
    budget_s: float | None = CLOSE_PASS_BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """One pass of the close of a run that Durable's terminate API ended; True when it did
    a step (False: closed already). Idempotent and resumable (see the module docstring).

    Deletes the run's compute and queues, records its unfinished items as not run
    (``RunTerminated``) and writes its report, then leaves a marker so the next sweep skips
    it. ``last_input`` is the orchestration's input as Durable keeps it (the RunState of its
    last generation); without a readable one only the teardown is done. A pass starts steps
    until ``budget_s`` has passed (at least one step a pass; None: every step).
    """
    settings = services.settings
    store = services.store
    marker = f"{run_id}/{FINALIZED_NAME}"
    if store.exists(settings.runs_container, marker):
        return False
    started = clock()
    state = _last_state(last_input)
    progress = _load_progress(services, run_id)
    if progress is None:
        groups = end_shard_groups(services, run_id) if state is not None else []
        progress = CloseProgress(run_id=run_id, finished_at=datetime.now(UTC), groups=groups)
    progress.passes += 1
    steps = close_steps(progress.groups, has_state=state is not None)
    stepped = False
    for step in steps:
        if step in progress.done:
            continue
        if stepped and budget_s is not None and clock() - started >= budget_s:
            log.info("close of run %s goes on at the next pass (%s next)", run_id, step)
            return True
        _run_step(services, state, progress, step)
        stepped = True
        progress.done.append(step)
        _save_progress(services, progress)
    store.upload_bytes(settings.runs_container, marker, datetime.now(UTC).isoformat())
    return True


def _run_step(
    services: Services, state: RunState | None, progress: CloseProgress, step: str
) -> None:
    kind, _, index = step.partition(":")
    if kind == "teardown":
        teardown(services, progress.run_id)
        progress.torn_down_at = datetime.now(UTC)
        return
    assert state is not None  # close_steps gives these steps only with a state
    if kind == "record":
        record_unfinished(services, state, NotRunReason.TERMINATED, progress.groups[int(index)])
        progress.not_run_recorded_at = datetime.now(UTC)
    elif kind == "analyse":
        analyse_shards(services, state, progress.groups[int(index)], progress.finished_at)
    elif kind == "report":
        write_report(
            services,
            state,
            RunPhase.CANCELLED,
            TERMINATED_MESSAGE,
            progress.finished_at,
            marks=EndMarks(
                torn_down_at=progress.torn_down_at,
                not_run_recorded_at=progress.not_run_recorded_at,
            ),
        )
    else:
        raise ValueError(f"unknown step {step!r} in the close of run {progress.run_id}")


def _last_state(last_input: Any) -> RunState | None:
    try:
        payload = json.loads(last_input) if isinstance(last_input, str) else last_input
        return RunState.model_validate(payload)
    except ValueError:
        return None


def _load_progress(services: Services, run_id: str) -> CloseProgress | None:
    name = close_progress_blob_name(run_id)
    try:
        data = services.store.download_bytes(services.settings.runs_container, name)
    except ResourceNotFoundError:
        return None
    try:
        return CloseProgress.model_validate_json(data)
    except ValueError:
        # Written whole by each pass, so unreadable means tampered with: start over (every
        # step is idempotent), and say so.
        log.warning("close progress %s unreadable; the close starts again", name)
        return None


def _save_progress(services: Services, progress: CloseProgress) -> None:
    services.store.upload_bytes(
        services.settings.runs_container,
        close_progress_blob_name(progress.run_id),
        progress.model_dump_json(),
        content_type="application/json",
    )
