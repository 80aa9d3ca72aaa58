"""Names shared by the orchestrator (which calls activities) and the activity registry."""

from __future__ import annotations

from enum import StrEnum

ORCHESTRATOR_NAME = "run_orchestrator"
CANCEL_EVENT = "cancel"


class Activity(StrEnum):
    VALIDATE_MANIFEST = "validate_manifest"
    CREATE_RUN_QUEUES = "create_run_queues"
    ENQUEUE_WAVE = "enqueue_wave"
    CANCEL_REQUESTED = "cancel_requested"
    PLAN_RUN = "plan_run"
    PROVISION_COMPUTE = "provision_compute"
    SUBMIT_JOBS = "submit_jobs"
    GET_PROGRESS = "get_progress"
    MOVE_FLEET = "move_fleet"
    TEARDOWN = "teardown"
    END_SHARD_GROUPS = "end_shard_groups"
    RECORD_UNFINISHED = "record_unfinished"
    ANALYSE_SHARDS = "analyse_shards"
    MERGE_OUTPUTS = "merge_outputs"
    REGISTER_OUTPUT = "register_output"
    WRITE_REPORT = "write_report"
    WRITE_BRIEF_REPORT = "write_brief_report"
