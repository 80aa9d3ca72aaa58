"""One shared way to drive the run orchestrator in tests: the real generator, scripted activities.

One script of activities serves both drivers: the local driver (the same one `batchctl run`
uses) through :func:`run_script`, and the real Durable SDK's replay (tests/durable_replay.py)
through :class:`ReplayActivities`. Activities are small functions that record their calls
and answer from the script, so each failure path can be staged precisely without storage
or compute.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchctl.activity_names import Activity
from batchctl.contracts import (
    ClusterPlan,
    ManifestSummary,
    MergeSummary,
    ProgressSnapshot,
    RunOptions,
    RunPlan,
    RunReport,
    RunRequest,
    RunState,
    WaveTask,
)
from batchctl.local.driver import LocalDriver
from orchestrators.run import run_orchestrator
from tests.durable_replay import ActivityOutcome

RUN_ID = "run-1"


@dataclass
class Script:
    """What the fake activities answer. ``progress`` is consumed one snapshot per poll."""

    valid: int = 10
    chunks: int = 3
    invalid: int = 0
    fatal: str | None = None
    run_id_taken: bool = False
    fleet_nodes: int | None = None  # validation's answer (None: as a history from before it)
    requests: list[RunRequest] = field(default_factory=list)  # what validate was given
    progress: list[tuple[int, int]] = field(default_factory=lambda: [(4, 0), (10, 0)])
    jobs_state: str = "running"
    cancel_flag: bool = False  # the durable cancel flag, as get_progress reads it
    merge_skipped: int = 0  # items the merge reports skipped (features missing)
    fail: dict[str, int] = field(default_factory=dict)  # activity -> failures before success
    on_poll: Callable[[int], None] | None = None
    calls: list[str] = field(default_factory=list)
    not_run_reasons: list[str] = field(default_factory=list)  # record_unfinished's reasons
    # The ledger's shards as the end of a run groups them (end_shard_groups' answer), and
    # the groups that record_unfinished and analyse_shards were given, in call order.
    shard_groups: list[list[int]] = field(default_factory=lambda: [[0, 2], [1, 3]])
    not_run_groups: list[list[int] | None] = field(default_factory=list)
    analysed_groups: list[list[int]] = field(default_factory=list)
    driver: LocalDriver | None = None  # set while the script runs, for raising events
    lock: threading.Lock = field(default_factory=threading.Lock)


def _activities(
    script: Script,
    waves: list[tuple[int, int]] | None = None,
    wave_options: list[int | None] | None = None,
) -> dict[str, Callable[[Any], Any]]:
    polls = {"n": 0}

    def recorded(name: str, answer: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def call(payload: Any) -> Any:
            with script.lock:
                script.calls.append(name)
                remaining = script.fail.get(name, 0)
                if remaining:
                    script.fail[name] = remaining - 1
                    raise RuntimeError(f"{name} exploded")
            return answer(payload)

        return call

    def validate(payload: Any) -> Any:
        request = RunRequest.model_validate(payload)
        script.requests.append(request)
        return ManifestSummary(
            run_id=request.run_id,
            manifest=request.manifest,
            rows=script.valid + script.invalid,
            valid=script.valid,
            invalid=script.invalid,
            chunk_count=script.chunks,
            errors_blob="errors.jsonl" if script.invalid else None,
            fatal=script.fatal,
            run_id_taken=script.run_id_taken,
            fleet_nodes=script.fleet_nodes,
        ).model_dump(mode="json")

    def plan(payload: Any) -> Any:
        state = RunState.model_validate(payload)
        return RunPlan(
            run_id=state.run_id,
            clusters=[ClusterPlan(name="c1", nodes=2, vm_size="v", low_priority=True)],
            total_nodes=2,
            est_makespan_s=1,
            est_cost=0,
            binding_limit="none",
        ).model_dump(mode="json")

    def progress(payload: Any) -> Any:
        index = min(polls["n"], len(script.progress) - 1)
        polls["n"] += 1
        if script.on_poll:
            script.on_poll(polls["n"])
        succeeded, failed = script.progress[index]
        return ProgressSnapshot(
            run_id=payload,
            succeeded=succeeded,
            failed=failed,
            queued_messages=0,
            jobs=[{"name": "j", "cluster": "c1", "state": script.jobs_state}],
            cancel_requested=script.cancel_flag,
        ).model_dump(mode="json")

    def report(payload: Any) -> Any:
        state = RunState.model_validate(payload["state"])
        succeeded, failed = (
            script.progress[min(polls["n"], len(script.progress)) - 1] if polls["n"] else (0, 0)
        )
        return RunReport(
            run_id=state.run_id,
            phase=payload["phase"],
            manifest=state.request.manifest,
            total=state.summary.valid if state.summary else 0,
            succeeded=succeeded,
            failed=failed,
            invalid=state.summary.invalid if state.summary else 0,
            started_at=state.started_at or datetime.now(UTC),
            finished_at=datetime.fromisoformat(payload["finished_at"]),
            output_prefix="outputs/run-1/",
            message=payload["message"],
        ).model_dump(mode="json")

    def merge(payload: Any) -> Any:
        return MergeSummary(
            run_id=payload,
            prefix=f"{payload}/merged/",
            manifest_blob=f"{payload}/merged/_manifest.json",
            parts=[f"{payload}/merged/part-00000.parquet"],
            rows=120,
            items=10 - script.merge_skipped,
            dim=8,
            skipped=script.merge_skipped,
            skipped_by_reason={"features_missing": script.merge_skipped}
            if script.merge_skipped
            else {},
        ).model_dump(mode="json")

    def enqueue_wave(payload: Any) -> Any:
        wave = WaveTask.model_validate(payload)
        if waves is not None:
            waves.append((wave.first, wave.count))
        if wave_options is not None:
            wave_options.append(wave.options.mini_batch_size)
        return wave.count * 4

    def record_unfinished(payload: Any) -> Any:
        state = RunState.model_validate(payload["state"])
        shards = payload.get("shards")
        with script.lock:
            script.not_run_groups.append(shards)
            # One reason per end of a run, however many groups it fans out over.
            if shards is None or shards == script.shard_groups[0]:
                script.not_run_reasons.append(str(payload["reason"]))
        done = sum(script.progress[min(polls["n"], len(script.progress)) - 1]) if polls["n"] else 0
        return max(0, (state.summary.valid if state.summary else 0) - done)

    def analyse_shards(payload: Any) -> Any:
        with script.lock:
            script.analysed_groups.append(list(payload["shards"]))
        return 0

    def brief_report(payload: Any) -> Any:
        return report({**payload, "message": f"{payload['message']}; brief: {payload['problem']}"})

    nothing: Callable[[Any], Any] = lambda payload: None  # noqa: E731
    answers: dict[str, Callable[[Any], Any]] = {
        Activity.VALIDATE_MANIFEST: validate,
        Activity.CREATE_RUN_QUEUES: nothing,
        Activity.ENQUEUE_WAVE: enqueue_wave,
        # The durable flag, as the orchestrator reads it before planning and provisioning.
        Activity.CANCEL_REQUESTED: lambda payload: script.cancel_flag,
        Activity.PLAN_RUN: plan,
        Activity.PROVISION_COMPUTE: nothing,
        Activity.SUBMIT_JOBS: nothing,
        Activity.GET_PROGRESS: progress,
        Activity.TEARDOWN: nothing,
        Activity.END_SHARD_GROUPS: lambda payload: script.shard_groups,
        Activity.RECORD_UNFINISHED: record_unfinished,
        Activity.ANALYSE_SHARDS: analyse_shards,
        Activity.MERGE_OUTPUTS: merge,
        Activity.WRITE_REPORT: report,
        Activity.WRITE_BRIEF_REPORT: brief_report,
    }
    return {name: recorded(name, answer) for name, answer in answers.items()}


def run_script(
    script: Script,
    options: RunOptions | None = None,
    on_status: Callable[[Any], None] | None = None,
    *,
    waves: list[tuple[int, int]] | None = None,
    wave_options: list[int | None] | None = None,
) -> tuple[RunReport, LocalDriver]:
    request = RunRequest(
        run_id=RUN_ID,
        manifest="manifests/m.csv",
        options=options or RunOptions(poll_interval_s=0.05),
    )
    driver = LocalDriver(
        run_orchestrator,
        _activities(script, waves, wave_options),
        retry_interval_scale=0.0,
        on_status=on_status,
    )
    script.driver = driver
    output = driver.run(RunState(run_id=RUN_ID, request=request).model_dump(mode="json"))
    return RunReport.model_validate(output), driver


def finishing_after(polls: int, total: int = 6, **fields: Any) -> Script:
    """A script whose run finishes at its ``polls``-th poll (one item done before that)."""
    progress = [(1, 0)] * (polls - 1) + [(total, 0)]
    return Script(valid=total, progress=progress, **fields)


class ReplayActivities:
    """The script's activities as the replay driver calls them: (name, payload) -> outcome.

    An activity that raises answers as a failed task, with the error's text, as the Durable
    extension reports a failed activity.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self._activities = _activities(script)
        self.payloads: list[tuple[str, Any]] = []  # every call's (name, input), in order

    def __call__(self, name: str, payload: Any) -> ActivityOutcome:
        self.payloads.append((name, payload))
        function = self._activities.get(name)
        if function is None:
            return ActivityOutcome(None)
        try:
            return ActivityOutcome(function(payload))
        except Exception as error:
            return ActivityOutcome(error=f"{name} failed: {error}")
