"""A local run's folder knows its controller: enough to tell a live run from a dead one and to
resume the dead one.

``batchctl run`` writes ``controller.json`` in the run's folder (``--out``/RUN_ID) before the
orchestrator starts and again at every ``continue_as_new`` generation: which process drives
the run, where its storage is, and the generation's input (the orchestrator's whole state
between generations, as Durable keeps it). The run's private Azurite persists in
``storage/`` beside it. A controller killed at any moment therefore leaves a folder from
which ``batchctl resume`` continues the run: the ledger, the outputs and the last
generation's state are on disk, and the controller's pid (with its start time, so a reused
pid is not taken for it) says it is gone.

Once the run's results are copied out the record says so and ``storage/`` is removed (it
holds a second copy of every output).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

RECORD_NAME = "controller.json"
STORAGE_DIR_NAME = "storage"
# Where the run's storage lives when it is not the run's own Azurite (BATCHCTL_* variables).
PRIVATE_STORAGE = "private"


class RunFolderError(ValueError):
    """A run folder that cannot be resumed or reused, and why (bad input: exit 3)."""


class ControllerRecord(BaseModel):
    """What a run's folder remembers of the process that drives the run."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = 1
    run_id: str
    pid: int
    # The process's start, in clock ticks since boot (/proc/PID/stat field 22): with the pid
    # and the boot it identifies one process, where a pid alone may have been reused.
    pid_start: int | None
    boot_id: str | None
    host: str
    started_at: datetime
    updated_at: datetime
    nodes: int = Field(ge=1)
    media_root: str
    # PRIVATE_STORAGE (the run's own Azurite under storage/), or the blob URL it used.
    storage: str
    # The private Azurite's (blob, queue, table) ports: the run's chunks and records hold
    # blob URLs with them, so a resumed run's Azurite listens on the same ones.
    ports: tuple[int, int, int] | None = None
    # The input of the orchestrator's latest generation (a RunState as JSON).
    state: dict[str, Any]
    # True once the orchestrator returned its report: a resume only copies the results out.
    report_written: bool = False
    finished_at: datetime | None = None
    outcome: str | None = None
    resumes: int = 0


def record_path(run_dir: Path) -> Path:
    return run_dir / RECORD_NAME


def storage_dir(run_dir: Path) -> Path:
    return run_dir / STORAGE_DIR_NAME


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _start_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Field 22 of stat is the start time; after the ")" the list begins at field 3.
    return int(fields[19])


def new_record(
    *,
    run_id: str,
    nodes: int,
    media_root: Path,
    storage: str,
    ports: tuple[int, int, int] | None,
    state: dict[str, Any],
    now: datetime | None = None,
) -> ControllerRecord:
    """The record of a run this process starts driving now."""
    moment = now or datetime.now(UTC)
    pid = os.getpid()
    return ControllerRecord(
        run_id=run_id,
        pid=pid,
        pid_start=_start_ticks(pid),
        boot_id=_boot_id(),
        host=socket.gethostname(),
        started_at=moment,
        updated_at=moment,
        nodes=nodes,
        media_root=str(media_root),
        storage=storage,
        ports=ports,
        state=state,
    )


def taken_over(record: ControllerRecord) -> ControllerRecord:
    """The record once this process drives the run (``batchctl resume``)."""
    pid = os.getpid()
    return record.model_copy(
        update={
            "pid": pid,
            "pid_start": _start_ticks(pid),
            "boot_id": _boot_id(),
            "host": socket.gethostname(),
            "updated_at": datetime.now(UTC),
            "resumes": record.resumes + 1,
        }
    )


def write_record(run_dir: Path, record: ControllerRecord) -> None:
    """Write the record atomically: a kill mid-write leaves the previous one whole."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=run_dir, prefix=".controller-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(record.model_dump_json(indent=1))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, record_path(run_dir))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_record(run_dir: Path) -> ControllerRecord | None:
    """The folder's record; None when it has none; RunFolderError when it is unreadable."""
    path = record_path(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ControllerRecord.model_validate_json(text)
    except ValidationError as error:
        raise RunFolderError(
            f"{path}: not a controller record ({error.error_count()} problems)"
        ) from None


def controller_alive(record: ControllerRecord) -> bool:
    """True while the process the record names still runs on this machine.

    After a reboot (another boot id) or once its pid is gone or belongs to a process that
    started at another moment, the controller is dead. A record from another machine is
    taken as alive: this machine cannot tell, and two controllers must never drive one run.
    """
    if record.host != socket.gethostname():
        return True
    if record.boot_id is not None and record.boot_id != _boot_id():
        return False
    start = _start_ticks(record.pid)
    if start is None:
        return False
    if record.pid_start is not None and start != record.pid_start:
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{record.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def interrupted_runs(out_dir: Path) -> list[tuple[Path, ControllerRecord]]:
    """Runs under ``out_dir`` whose controller died before they finished, oldest first."""
    found: list[tuple[Path, ControllerRecord]] = []
    if not out_dir.is_dir():
        return found
    for run_dir in out_dir.iterdir():
        try:
            record = read_record(run_dir) if run_dir.is_dir() else None
        except RunFolderError:
            continue
        if record is not None and record.finished_at is None and not controller_alive(record):
            found.append((run_dir, record))
    return sorted(found, key=lambda pair: pair[1].started_at)


def interrupted_note(run_dir: Path, record: ControllerRecord) -> str:
    """One line for a person: this run's controller died; how to continue it."""
    when = record.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"run {record.run_id} did not finish: its controller (pid {record.pid}) stopped "
        f"after {when}; `batchctl resume {run_dir}` continues it, keeping every record"
    )


@dataclass(frozen=True)
class RecordTemplate:
    """What a new run's record holds beside its state (known before its first generation)."""

    run_id: str
    nodes: int
    media_root: Path
    storage: str
    ports: tuple[int, int, int] | None


class RunRecorder:
    """Keeps a run folder's record current while this process drives the run.

    Given a record (a resumed run's, taken over), it writes it at once; given a template
    (a new run), it writes the first record when the first generation starts, since the
    state the record must hold is the one the run starts with."""

    def __init__(
        self,
        run_dir: Path,
        record: ControllerRecord | None = None,
        template: RecordTemplate | None = None,
    ) -> None:
        if (record is None) == (template is None):
            raise ValueError("a recorder needs a record or a template, not both")
        self.run_dir = run_dir
        self.record = record
        self._template = template
        if record is not None:
            write_record(run_dir, record)

    def _update(self, **fields: Any) -> None:
        if self.record is None:
            raise RuntimeError("the run's record is written at its first generation")
        self.record = self.record.model_copy(update={**fields, "updated_at": datetime.now(UTC)})
        write_record(self.run_dir, self.record)

    def generation(self, run_id: str, state: Any) -> None:
        """Run ``run_id``'s generation starts with ``state`` (the app's hook)."""
        if self.record is None:
            assert self._template is not None
            template = self._template
            if run_id != template.run_id:
                return  # not this folder's run
            self.record = new_record(
                run_id=run_id,
                nodes=template.nodes,
                media_root=template.media_root,
                storage=template.storage,
                ports=template.ports,
                state=state,
            )
            write_record(self.run_dir, self.record)
        elif run_id == self.record.run_id:
            self._update(state=state)

    def report_written(self) -> None:
        self._update(report_written=True)

    def finished(self, outcome: str) -> None:
        self._update(finished_at=datetime.now(UTC), outcome=outcome)
