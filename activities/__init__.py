"""Activity functions: validate the input model, call one controller function, dump the result.

:func:`make_activities` maps each activity name to its function, bound to a process's
services; the Functions app registers them as activity triggers and the local driver calls
them directly: one set of functions for both.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from batchctl import controller
from batchctl.activity_names import Activity
from batchctl.contracts import (
    RUN_ID_PATTERN,
    FleetMoveTask,
    MergeSummary,
    NotRunReason,
    RunPhase,
    RunRequest,
    RunState,
    WaveTask,
)
from batchctl.logs import bound
from batchctl.services import Services


def _run_id(payload: Any) -> str:
    # Run ids become queue names; refuse anything else before it reaches an SDK call.
    if not isinstance(payload, str) or not re.fullmatch(RUN_ID_PATTERN, payload):
        raise ValueError(f"not a run id: {payload!r}")
    return payload


# Each activity: (services, payload) -> JSON-ready result. The services are bound per
# process by make_activities (the Functions app's composition root, or a local session's).
def validate_manifest(services: Services, payload: Any) -> Any:
    request = RunRequest.model_validate(payload)
    return controller.validate_manifest(services, request).model_dump(mode="json")


def create_run_queues(services: Services, payload: Any) -> None:
    controller.create_run_queues(services, _run_id(payload))


def enqueue_wave(services: Services, payload: Any) -> int:
    return controller.enqueue_wave(services, WaveTask.model_validate(payload))


def cancel_requested(services: Services, payload: Any) -> bool:
    return controller.cancel_requested(services, _run_id(payload))


def plan_run(services: Services, payload: Any) -> Any:
    state = RunState.model_validate(payload)
    return controller.plan_run(services, state).model_dump(mode="json")


def provision_compute(services: Services, payload: Any) -> None:
    controller.provision_compute(services, RunState.model_validate(payload))


def submit_jobs(services: Services, payload: Any) -> None:
    controller.submit_jobs(services, RunState.model_validate(payload))


def get_progress(services: Services, payload: Any) -> Any:
    # A run id; or, once a fallback replaced the fleet, the run id and its clusters.
    if isinstance(payload, dict):
        clusters = payload.get("clusters")
        if not isinstance(clusters, list) or not all(isinstance(c, str) for c in clusters):
            raise ValueError(f"get_progress: clusters must be a list of names, not {clusters!r}")
        snapshot = controller.get_progress(services, _run_id(payload.get("run_id")), clusters)
    else:
        snapshot = controller.get_progress(services, _run_id(payload))
    return snapshot.model_dump(mode="json")


def move_fleet(services: Services, payload: Any) -> Any:
    task = FleetMoveTask.model_validate(payload)
    return controller.move_fleet(services.backend, task).model_dump(mode="json")


def teardown(services: Services, payload: Any) -> None:
    controller.teardown(services, _run_id(payload))


def end_shard_groups(services: Services, payload: Any) -> list[list[int]]:
    return controller.end_shard_groups(services, _run_id(payload))


def _shards(payload: Any) -> list[int] | None:
    """The shard group an end-of-run activity works on (absent: the whole run)."""
    shards = payload.get("shards")
    if shards is None:
        return None
    if not isinstance(shards, list) or not all(
        isinstance(shard, int) and shard >= 0 for shard in shards
    ):
        raise ValueError(f"shards must be a list of shard numbers, not {shards!r}")
    return shards


def record_unfinished(services: Services, payload: Any) -> int:
    return controller.record_unfinished(
        services,
        RunState.model_validate(payload["state"]),
        NotRunReason(payload["reason"]),
        _shards(payload),
    )


def analyse_shards(services: Services, payload: Any) -> int:
    state = RunState.model_validate(payload["state"])
    shards = _shards(payload)
    return controller.analyse_shards(
        services,
        state,
        services.ledger.shards(state.run_id) if shards is None else shards,
        datetime.fromisoformat(payload["finished_at"]),
    )


def merge_outputs(services: Services, payload: Any) -> Any:
    return controller.merge_outputs(services, _run_id(payload)).model_dump(mode="json")


def register_output(services: Services, payload: Any) -> Any:
    registration = controller.register_output(
        services,
        RunState.model_validate(payload["state"]),
        MergeSummary.model_validate(payload["merged"]),
    )
    return registration.model_dump(mode="json")


def write_report(services: Services, payload: Any) -> Any:
    report = controller.write_report(
        services,
        RunState.model_validate(payload["state"]),
        RunPhase(payload["phase"]),
        str(payload["message"]),
        datetime.fromisoformat(payload["finished_at"]),
        marks=controller.EndMarks.model_validate(payload.get("marks") or {}),
    )
    return report.model_dump(mode="json")


def write_brief_report(services: Services, payload: Any) -> Any:
    report = controller.write_brief_report(
        services,
        RunState.model_validate(payload["state"]),
        RunPhase(payload["phase"]),
        str(payload["message"]),
        datetime.fromisoformat(payload["finished_at"]),
        problem=str(payload["problem"]),
    )
    return report.model_dump(mode="json")


def run_id_of(payload: Any) -> str | None:
    """The run an activity's input belongs to, wherever that input keeps it (or None)."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, dict):
        for holder in (payload, payload.get("state"), payload.get("request")):
            if isinstance(holder, dict) and isinstance(holder.get("run_id"), str):
                return str(holder["run_id"])
    return None


def with_run_context(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The activity, with its run named on every log line it writes (Azure and local alike)."""

    @functools.wraps(function)
    def activity(payload: Any) -> Any:
        with bound(run_id=run_id_of(payload)):
            return function(payload)

    return activity


ActivityFunction = Callable[[Services, Any], Any]
_ACTIVITY_FUNCTIONS: dict[str, ActivityFunction] = {
    Activity.VALIDATE_MANIFEST: validate_manifest,
    Activity.CREATE_RUN_QUEUES: create_run_queues,
    Activity.ENQUEUE_WAVE: enqueue_wave,
    Activity.CANCEL_REQUESTED: cancel_requested,
    Activity.PLAN_RUN: plan_run,
    Activity.PROVISION_COMPUTE: provision_compute,
    Activity.SUBMIT_JOBS: submit_jobs,
    Activity.GET_PROGRESS: get_progress,
    Activity.MOVE_FLEET: move_fleet,
    Activity.TEARDOWN: teardown,
    Activity.END_SHARD_GROUPS: end_shard_groups,
    Activity.RECORD_UNFINISHED: record_unfinished,
    Activity.ANALYSE_SHARDS: analyse_shards,
    Activity.MERGE_OUTPUTS: merge_outputs,
    Activity.REGISTER_OUTPUT: register_output,
    Activity.WRITE_REPORT: write_report,
    Activity.WRITE_BRIEF_REPORT: write_brief_report,
}
ACTIVITY_NAMES: tuple[str, ...] = tuple(_ACTIVITY_FUNCTIONS)


def make_activities(services: Callable[[], Services]) -> dict[str, Callable[[Any], Any]]:
    """Every activity by name, each calling the controller with ``services()``.

    ``services`` is asked at each call, not here: the Functions app builds its services at
    the first call (settings are never read at import), a local session passes its own.
    """

    def bind(function: ActivityFunction) -> Callable[[Any], Any]:
        def activity(payload: Any) -> Any:
            return function(services(), payload)

        return with_run_context(activity)

    return {name: bind(function) for name, function in _ACTIVITY_FUNCTIONS.items()}
