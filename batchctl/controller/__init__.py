"""What each activity does, on top of the storage and compute adapters, one module per
activity family.

The activity functions in ``activities/`` are thin: they validate their input model, call
one function here with the process's :class:`~batchctl.services.Services`, and dump the
result. Everything here is idempotent, because Durable retries activities and may run one
twice. The families: the run's blob ``names``; manifest ``validation`` and the run id's
claim; filling the queue (``enqueue``); planning, provisioning and polling (``compute``);
the durable ``cancel`` flag; the end of a run (``records``: teardown and not-run records
by groups of ledger shards; ``closing``: a terminated run's resumable close); the merged
output (``merging``); the ``report``; and local mode's ``copyout``. Callers use the names
re-exported here.
"""

from __future__ import annotations

from batchctl.controller.cancel import (
    cancel_requested,
    request_cancel,
)
from batchctl.controller.closing import (
    CLOSE_PASS_BUDGET_S,
    finalize_terminated,
)
from batchctl.controller.compute import (
    get_progress,
    move_fleet,
    plan_run,
    provision_compute,
    submit_jobs,
)
from batchctl.controller.copyout import (
    COPY_THREADS,
    IN_FLIGHT_PER_THREAD,
    RunCopyError,
    copy_run_out,
    outputs_location,
)
from batchctl.controller.enqueue import (
    create_run_queues,
    enqueue_chunk,
    enqueue_wave,
)
from batchctl.controller.merging import (
    manifest_metadata_keys,
    merge_outputs,
    register_output,
)
from batchctl.controller.names import (
    CANCEL_FLAG_NAME,
    CLAIM_NAME,
    FINALIZED_NAME,
    OUTPUTS_DIR_NAME,
    RECORDS_NAME,
    REPORT_HTML_NAME,
    REPORT_NAME,
    cancel_flag_blob_name,
    enqueued_marker,
    report_blob_name,
    report_html_blob_name,
)
from batchctl.controller.records import (
    END_GROUPS,
    NOT_RUN_MESSAGES,
    end_shard_groups,
    record_unfinished,
    teardown,
)
from batchctl.controller.report import (
    WEIGHTS_CANDIDATES,
    EndMarks,
    analyse_shards,
    write_brief_report,
    write_report,
)
from batchctl.controller.validation import (
    RunIdTakenError,
    check_run_id_free,
    claim_run_id,
    manifest_location,
    source_policy,
    validate_manifest,
)
from batchctl.copyprogress import PROGRESS_AFTER_S, PROGRESS_EVERY_S, CopyProgress

__all__ = [
    "CANCEL_FLAG_NAME",
    "CLAIM_NAME",
    "CLOSE_PASS_BUDGET_S",
    "COPY_THREADS",
    "END_GROUPS",
    "FINALIZED_NAME",
    "IN_FLIGHT_PER_THREAD",
    "NOT_RUN_MESSAGES",
    "OUTPUTS_DIR_NAME",
    "PROGRESS_AFTER_S",
    "PROGRESS_EVERY_S",
    "RECORDS_NAME",
    "REPORT_HTML_NAME",
    "REPORT_NAME",
    "WEIGHTS_CANDIDATES",
    "CopyProgress",
    "EndMarks",
    "RunCopyError",
    "RunIdTakenError",
    "analyse_shards",
    "cancel_flag_blob_name",
    "cancel_requested",
    "check_run_id_free",
    "claim_run_id",
    "copy_run_out",
    "create_run_queues",
    "end_shard_groups",
    "enqueue_chunk",
    "enqueue_wave",
    "enqueued_marker",
    "finalize_terminated",
    "get_progress",
    "manifest_location",
    "manifest_metadata_keys",
    "merge_outputs",
    "move_fleet",
    "outputs_location",
    "plan_run",
    "provision_compute",
    "record_unfinished",
    "register_output",
    "report_blob_name",
    "report_html_blob_name",
    "request_cancel",
    "source_policy",
    "submit_jobs",
    "teardown",
    "validate_manifest",
    "write_brief_report",
    "write_report",
]
