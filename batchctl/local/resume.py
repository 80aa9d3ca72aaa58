"""`batchctl resume RUN_FOLDER`: continue a local run whose controller died.

The run folder holds the run's storage (its own Azurite, persisted in ``storage/``) and the
controller record with the input of the orchestrator's latest generation
(:mod:`batchctl.local.runfolder`). Resuming is what Durable does after a host restart, plus
what a dead fleet needs:

- **Before compute started** (stages ``start`` and ``enqueue``), the latest generation runs
  again from its input: validation is idempotent (the claim in the input is the run's own),
  and a chunk already enqueued is skipped by its marker.
- **Once compute had started** (stage ``monitor``), the worker processes died with their
  controller, holding messages hidden for the visibility timeout, and a crash may have kept
  a deleted message but not its record (each Azurite service saves its own file). So the
  queue is cleared and refilled with exactly the valid items that have no terminal record,
  and the run continues from planning: new nodes, the same ledger. Nothing recorded runs
  again; the items in flight at the kill (their records were never written) run again.
- **Once the report was written**, only the copy-out is left to do.

The run keeps its id, its folder, its options and every record; its report is the one run's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchctl.contracts import RunReport, RunState, WorkItem
from batchctl.local.azurite import port_in_use
from batchctl.local.runfolder import (
    PRIVATE_STORAGE,
    ControllerRecord,
    RunFolderError,
    RunRecorder,
    controller_alive,
    read_record,
    storage_dir,
    taken_over,
)
from batchctl.local.session import (
    LocalRunResult,
    copy_out,
    follow_through_app,
    local_session,
    release_storage,
    storage_from_environment,
)
from batchctl.manifest import chunk_blob_name, read_chunk
from batchctl.packing import MessageSizer, mini_batches
from batchctl.services import Services
from batchctl.settings import StorageSettings
from batchctl.storage.ledger import in_shard_order

if TYPE_CHECKING:
    from batchctl.controller import CopyProgress

log = logging.getLogger(__name__)


def check_resumable(run_dir: Path) -> ControllerRecord:
    """The folder's record when its run can be resumed here; RunFolderError saying why not."""
    record = read_record(run_dir)
    if record is None:
        raise RunFolderError(
            f"{run_dir} has no controller.json: not the folder of a local run "
            "(batchctl run --out DIR puts each run in DIR/RUN_ID)"
        )
    if record.finished_at is not None:
        raise RunFolderError(
            f"run {record.run_id} finished ({record.outcome}); its report is in {run_dir}"
        )
    if controller_alive(record):
        raise RunFolderError(
            f"run {record.run_id} is still running (controller pid {record.pid} on "
            f"{record.host}); stop it first or wait for it"
        )
    if record.storage == PRIVATE_STORAGE:
        if storage_from_environment():
            raise RunFolderError(
                f"run {record.run_id} kept its storage in {storage_dir(run_dir)}; "
                "unset the BATCHCTL_BLOB_URL/QUEUE_URL/TABLE_URL variables to resume it"
            )
        busy = [port for port in record.ports or () if port_in_use(port)]
        if busy:
            raise RunFolderError(
                f"run {record.run_id}'s storage listened on port {busy[0]}, which another "
                "program uses now (its chunks and records name that port); stop it and resume"
            )
        if not storage_dir(run_dir).is_dir():
            raise RunFolderError(
                f"run {record.run_id} has no storage left in {storage_dir(run_dir)}: "
                "nothing to resume from; `batchctl retry` needs a finished run, so start "
                "the manifest again"
            )
    elif not storage_from_environment() or StorageSettings().blob_url != record.storage:
        raise RunFolderError(
            f"run {record.run_id} ran on the storage at {record.storage}: point "
            "BATCHCTL_BLOB_URL/QUEUE_URL/TABLE_URL at it to resume the run"
        )
    return record


def no_copy_refusal(record: ControllerRecord, run_dir: Path) -> str:
    """Why a run on its private Azurite cannot be resumed with its outputs left in storage."""
    return (
        f"--no-copy leaves the outputs in storage, but run {record.run_id} keeps its storage "
        f"in its private Azurite ({storage_dir(run_dir)}), which is removed once the run "
        "ends; resume it without --no-copy"
    )


def refill_queue(services: Services, state: RunState) -> int:
    """Clear the run's queue and enqueue every valid item without a terminal record;
    returns the items enqueued. Their messages are packed as the run packed them."""
    assert state.summary is not None
    run_id = state.run_id
    queues = services.queues(run_id)
    queues.create()
    # Every message goes, the hidden ones of dead nodes included: otherwise they reappear
    # after their visibility timeout as duplicates of the messages sent below.
    queues.client("input").clear_messages()
    recorded = services.ledger.recorded_ids(run_id)
    per_message = state.request.options.items_per_message
    sizer = MessageSizer.for_run(run_id)
    enqueued = 0
    for index in range(state.summary.chunk_count):
        items = [
            item
            for item in read_chunk(services.store, chunk_blob_name(run_id, index))
            if item.item_id not in recorded
        ]
        # Packed shard by shard, as the enqueue packs them (batchctl.controller.enqueue).
        items = in_shard_order(items, services.ledger.shard_count(run_id))
        messages = (
            WorkItem(run_id=run_id, items=batch).model_dump_json()
            for batch in mini_batches(items, per_message, sizer)
        )
        queues.enqueue_many(messages)
        enqueued += len(items)
    return enqueued


def resume_state(services: Services, state: RunState) -> RunState:
    """The input to continue a run from, given its latest generation's input (see the
    module docstring)."""
    if state.stage != "monitor":
        return state
    left = refill_queue(services, state)
    log.info("run %s resumes with %d items to run", state.run_id, left)
    assert state.summary is not None
    return state.model_copy(
        update={
            "stage": "enqueue",
            "next_chunk": state.summary.chunk_count,  # all enqueued: plan and provision next
            "plan": None,
            "polls": 0,
            "resubmits": 0,
            "last_done": 0,
            "stall_since": None,
        }
    )


def resume_locally(
    run_dir: Path,
    *,
    nodes: int | None = None,
    on_status: Callable[[Any], None] | None = None,
    copy_outputs: bool = True,
    copy_progress: CopyProgress | None = None,
) -> LocalRunResult:
    """Continue the run in ``run_dir`` whose controller died, to its report and copy-out.

    ``copy_outputs`` and ``copy_progress`` as for :func:`~batchctl.local.session.run_locally`
    (outputs left in storage need a run on storage of the user's own: ValueError)."""
    from batchctl.controller.names import OUTPUTS_DIR_NAME

    record = check_resumable(run_dir)
    private = record.storage == PRIVATE_STORAGE
    if private and not copy_outputs:
        raise ValueError(no_copy_refusal(record, run_dir))
    persist_dir = storage_dir(run_dir) if private else None
    recorder = RunRecorder(run_dir, taken_over(record))
    with local_session(
        media_root=Path(record.media_root),
        nodes=nodes or record.nodes,
        log_dir=run_dir / "logs",
        persist_dir=persist_dir,
        ports=record.ports if private else None,
        outputs_dir=run_dir / OUTPUTS_DIR_NAME if copy_outputs else None,
        index_outputs=not private,
    ) as services:
        state = RunState.model_validate(record.state)
        if record.report_written:
            from batchctl.controller import report_blob_name

            report = RunReport.model_validate_json(
                services.store.download_bytes(
                    services.settings.runs_container, report_blob_name(state.run_id)
                )
            )
            result = copy_out(
                services,
                report,
                run_dir,
                recorder,
                copy_outputs=copy_outputs,
                copy_progress=copy_progress,
            )
        else:
            payload = resume_state(services, state).model_dump(mode="json")
            result = follow_through_app(
                services,
                state.run_id,
                run_dir,
                recorder=recorder,
                on_status=on_status,
                # The local runtime restarting the instance from its last generation, as
                # the Durable host does after a restart; then the client follows it.
                start=lambda app: app.durable.resume(state.run_id, payload),
                copy_outputs=copy_outputs,
                copy_progress=copy_progress,
            )
    if copy_outputs:  # outputs left in storage keep their storage (never private: see above)
        release_storage(persist_dir)
    return result
