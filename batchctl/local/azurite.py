"""Start and stop a private Azurite (blobs, queues, tables) on loopback ports.

Every test session and every local run gets its own instance on free ports: Azurite's
request costs grow with everything stored in the account, so sharing one across runs makes
them slow and flaky. ``batchctl serve`` asks for fixed ports instead (Azurite's defaults,
10000-10002), so ``UseDevelopmentStorage=true`` and other tools' defaults reach it.
The child is killed when we exit, and also when we die without exiting (PR_SET_PDEATHSIG),
so no orphaned Node process keeps ports and memory after a crash.

Storage is in memory by default. With a ``persist_dir`` it persists there instead (Azurite's own
persistence: a LokiJS file per service, saved every 5 s and when Azurite stops, and blob and
message contents in extent files), and Azurite runs under a keeper process
(:mod:`batchctl.local.azurite_keeper`) that gives it exactly one SIGTERM however the
controller ends: on it Azurite saves and exits at once (measured: 15 ms), so a controller
that is killed leaves its run's ledger, queue and outputs on disk for ``batchctl resume``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from batchctl.local.azurite_keeper import SAVE_TIMEOUT_S
from batchctl.settings import (
    AZURITE_ACCOUNT_KEY,
    AZURITE_ACCOUNT_NAME,
    StorageSettings,
    azurite_environment,
)

# Azurite's own defaults, which UseDevelopmentStorage=true and Azure tools assume.
DEFAULT_PORTS = (10000, 10001, 10002)

# --disableTelemetry: without it Azurite tries to reach a telemetry host and logs errors.
COMMON_FLAGS = ("--skipApiVersionCheck", "--loose", "--disableTelemetry")
AZURITE_FLAGS = ("--inMemoryPersistence", *COMMON_FLAGS)
# Azurite closes idle keep-alive connections after 5 s, Azure Storage's front end after about
# four minutes. A worker busy on one item for longer than 5 s then reuses a closed pooled
# connection and its next write fails with "connection reset", which Azure never does (and
# which the SDKs do not retry for POSTs). Keep-alive like Azure's makes local runs honest.
KEEP_ALIVE_S = "240"
KEEP_ALIVE_FLAGS = tuple(
    part
    for service in ("blob", "queue", "table")
    for part in (f"--{service}KeepAliveTimeout", KEEP_ALIVE_S)
)
PR_SET_PDEATHSIG = 1
# After its controller died, how long a persisted Azurite keeps serving: the run's workers
# stop within a second or two and release their messages meanwhile.
KEEPER_GRACE_S = 3.0
# How long a discarded Azurite may take to die after its keeper (its ports closing).
DISCARD_WAIT_S = 5.0
# A keeper's own wait for Azurite to save (azurite_keeper.SAVE_TIMEOUT_S), and a margin.
PERSISTED_STOP_TIMEOUT_S = SAVE_TIMEOUT_S + 5.0


class AzuriteError(RuntimeError):
    """Azurite could not be found or did not come up."""


def find_azurite(start: Path | None = None) -> Path:
    """The azurite launcher: node_modules/.bin of this checkout first, then PATH."""
    here = (start or Path(__file__)).resolve()
    for parent in [here, *here.parents]:
        candidate = parent / "node_modules" / ".bin" / "azurite"
        if candidate.exists():
            return candidate
    on_path = shutil.which("azurite")
    if on_path:
        return Path(on_path)
    raise AzuriteError(
        "azurite not found: run `npm ci` in the project root (make does this) "
        "or install it with `npm install -g azurite`"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def keeper_prefix(persist_dir: Path | None) -> tuple[str, ...]:
    """A persisted Azurite runs under its keeper (azurite_keeper.py: one SIGTERM, so it
    saves, however its controller ends); an in-memory one needs none."""
    if persist_dir is None:
        return ()
    keeper = Path(__file__).with_name("azurite_keeper.py")
    return (sys.executable, str(keeper), str(KEEPER_GRACE_S), "--")


def azurite_flags(location: Path | None) -> tuple[str, ...]:
    """In memory, or persisted under ``location``."""
    if location is None:
        return AZURITE_FLAGS
    # Absolute: Azurite runs in its own working directory.
    return (*COMMON_FLAGS, "--location", str(location.resolve()))


def port_in_use(port: int) -> bool:
    """True when something accepts connections on loopback ``port``."""
    return _port_open(port)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclass
class Azurite:
    """A running Azurite. Use :func:`start_azurite` or the context manager :func:`azurite`."""

    process: subprocess.Popen[bytes]
    blob_port: int
    queue_port: int
    table_port: int
    log_path: Path
    persisted: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.blob_port}/devstoreaccount1"

    @property
    def queue_url(self) -> str:
        return f"http://127.0.0.1:{self.queue_port}/devstoreaccount1"

    @property
    def table_url(self) -> str:
        return f"http://127.0.0.1:{self.table_port}/devstoreaccount1"

    @property
    def connection_string(self) -> str:
        """The connection string any Azure Storage client or tool accepts for this instance
        (the published development account; its key is public by design)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT_NAME};"
            f"AccountKey={AZURITE_ACCOUNT_KEY};BlobEndpoint={self.blob_url};"
            f"QueueEndpoint={self.queue_url};TableEndpoint={self.table_url};"
        )

    def environment(self) -> dict[str, str]:
        """Variables that point batchctl settings (and child processes) at this instance."""
        return azurite_environment(self.blob_url, self.queue_url, self.table_url)

    def storage_settings(self) -> StorageSettings:
        """The storage settings of this instance (Azurite's published account and key): what
        :meth:`environment` says to a child process, handed to code in this one."""
        return StorageSettings(
            storage_auth="azurite",
            blob_url=self.blob_url,
            queue_url=self.queue_url,
            table_url=self.table_url,
        )

    def discard(self) -> None:
        """Stop at once, unsaved: for storage about to be deleted (a finished run's, whose
        results are copied out). A persisted one's keeper dies by SIGKILL and takes Azurite
        with it (its parent-death signal), skipping the save that :meth:`stop` waits for."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        # Azurite itself dies a moment after its keeper: its storage is deleted next, and a
        # folder removed under a live process would leave what it writes meanwhile.
        deadline = time.monotonic() + DISCARD_WAIT_S
        ports = (self.blob_port, self.queue_port, self.table_port)
        while any(_port_open(port) for port in ports) and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, timeout: float | None = None) -> None:
        """Stop politely, then by force: a busy Azurite has been seen to ignore SIGTERM.

        A persisted one's keeper waits for Azurite to save first, so it gets longer."""
        if timeout is None:
            timeout = PERSISTED_STOP_TIMEOUT_S if self.persisted else 5.0
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


def start_azurite(
    *,
    workdir: Path | None = None,
    startup_timeout: float = 30.0,
    attempts: int = 3,
    ports: tuple[int, int, int] | None = None,
    persist_dir: Path | None = None,
) -> Azurite:
    """Start Azurite and wait until all three services accept connections.

    On free ports by default (retried on others if one was taken meanwhile); on exactly
    ``ports`` (blob, queue, table) when given, refused at once when one is already in use.
    With ``persist_dir``, storage persists in that folder (a later start there finds it all).
    """
    launcher = find_azurite()
    base = workdir or Path(tempfile.gettempdir())
    last_error = "never started"
    if ports is not None:
        if len(set(ports)) < 3:
            raise AzuriteError(f"the blob, queue and table ports must differ, got {ports}")
        busy = [port for port in ports if _port_open(port)]
        if busy:
            raise AzuriteError(
                f"port {busy[0]} is already in use (another Azurite or `batchctl serve`?); "
                "stop it, or choose other ports"
            )
        attempts = 1  # fixed ports: trying again would only meet the same ports
    for _ in range(attempts):
        if ports is None:
            candidate = free_port(), free_port(), free_port()
            if len(set(candidate)) < 3:
                continue
        else:
            candidate = ports
        location = Path(os.path.join(base, f"azurite-{os.getpid()}-{candidate[0]}"))
        location.mkdir(parents=True, exist_ok=True)
        log_path = location / "azurite.log"
        command = [
            *keeper_prefix(persist_dir),
            str(launcher),
            *azurite_flags(persist_dir),
            *KEEP_ALIVE_FLAGS,
            "--blobHost", "127.0.0.1", "--blobPort", str(candidate[0]),
            "--queueHost", "127.0.0.1", "--queuePort", str(candidate[1]),
            "--tableHost", "127.0.0.1", "--tablePort", str(candidate[2]),
        ]  # fmt: skip
        # A keeper sets its own parent-death signal (SIGHUP), which it handles once.
        die_with_parent = _die_with_parent if persist_dir is None else None
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=location,  # in-memory mode writes nothing, but keep any stray file here
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, safe before exec
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
            )
        instance = Azurite(
            process, *candidate, log_path=log_path, persisted=persist_dir is not None
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and process.poll() is None:
            if all(_port_open(port) for port in candidate):
                atexit.register(instance.stop)
                return instance
            time.sleep(0.1)
        instance.stop()
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise AzuriteError(f"Azurite did not start after {attempts} attempts; last log:\n{last_error}")


@contextlib.contextmanager
def azurite(
    workdir: Path | None = None,
    ports: tuple[int, int, int] | None = None,
    persist_dir: Path | None = None,
) -> Iterator[Azurite]:
    instance = start_azurite(workdir=workdir, ports=ports, persist_dir=persist_dir)
    try:
        yield instance
    finally:
        instance.stop()
