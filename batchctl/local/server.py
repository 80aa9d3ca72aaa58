"""`batchctl serve`'s server: the app's HTTP API, Durable's status API, the blob trigger and a
live dashboard, on one machine, on the same code paths as the Functions app.

Three parts:

- :class:`LocalDurableClient` stands in for the Durable client that the Functions host
  injects. The app's own handlers (``batchctl.functions.api``: start, status, list, cancel,
  the blob trigger's start) are called with it unchanged, and each instance is the real run
  orchestrator driven by :class:`~batchctl.local.driver.LocalDriver` over the real
  activities, in a thread of this process. Statuses are the Durable SDK's own
  ``DurableOrchestrationStatus``.
- :class:`ServeHandler` maps HTTP to those handlers (``func.HttpRequest`` in,
  ``func.HttpResponse`` out) and serves Durable's instance routes
  (``/runtime/webhooks/durabletask/instances/{id}``: status, terminate, raise event, purge),
  the report's files and the dashboard. :class:`ServeHTTPServer` under it refuses ambiguous
  framing, closes a connection after any answer that left a body unread, times out idle
  and slow connections and bounds how many it serves (see "-- HTTP" below).
- :class:`ManifestTrigger` polls the manifests container: a CSV uploaded by any client
  starts one run per blob version, with the trigger's own run id (name + ETag).

Where the stand-in differs from Durable, on purpose:

- **Terminate** ends the instance at once, as Durable does: from then on no code of the
  orchestrator runs (every further activity call is refused with
  :class:`InstanceTerminated`, which neither the driver's retries nor the orchestrator's
  ``except Exception`` catch, and the cancel event wakes a generator waiting on its timer).
  Durable leaves the teardown to the sweeper (every 15 minutes); here the server plays the
  sweeper at once: when the activity that was running has ended, it calls
  ``controller.finalize_terminated`` (compute and queues deleted, unfinished items
  recorded as ``RunTerminated``, report written).
- **Runs at once**: at most ``max_runs`` instances run together (default 1); the others
  wait as ``Pending``, in the order they were started. Several runs in one process are
  safe (each has its own driver; the local backend keys processes by run; the adapters
  are shared, as activities already share them), but each run starts its own worker
  processes, so on a small machine one run at a time finishes each sooner.
- **History** lives in this process only: a restarted server knows no earlier instance.
  A manifest whose run already wrote its report is not started again by the trigger.

Ctrl-C (:meth:`LocalDurableClient.shutdown`): every live run is cancelled the way
``POST /api/runs/{id}/cancel`` does it (durable flag, then event), so each tears its compute
down and writes its report; queued runs never start; the server waits for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import errors as email_errors
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import azure.functions as func
from azure.core.exceptions import ResourceNotFoundError
from azure.durable_functions.models.DurableOrchestrationStatus import DurableOrchestrationStatus

from batchctl import controller, dashboard
from batchctl.activity_names import CANCEL_EVENT, ORCHESTRATOR_NAME, Activity
from batchctl.client import KEY_HEADER
from batchctl.compute.local import worker_concurrency
from batchctl.contracts import ManifestSummary, RunOptions, RunProgress, RunState
from batchctl.functions import api
from batchctl.local.driver import LocalDriver
from batchctl.packing import MAX_ITEMS_PER_MESSAGE
from batchctl.reporting.analysis import live_tables
from batchctl.runids import run_id_for_blob
from batchctl.runstatus import ACTIVE_STATUSES, RuntimeStatus, run_status_of
from batchctl.services import Services
from batchctl.settings import WorkerSettings
from batchctl.throughput import eta_s, rate_over

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger("batchctl.serve")

DURABLE_PREFIX = "/runtime/webhooks/durabletask/instances"
TASK_HUB = "batchctl-local"
MAX_BODY_BYTES = 1024 * 1024
# A live run's ledger is read again for the dashboard's node and failure tables at most
# this often: a full read of a large ledger is not free, even on Azurite.
LEDGER_REFRESH_S = 3.0
# The rate shown is over the last this-many seconds of samples.
RATE_WINDOW_S = 30.0
# The report's files the server hands out, and their content types.
REPORT_FILES = {
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
    "manifest-errors.jsonl": "application/x-ndjson",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# The HTTP server's limits (ServeHTTPServer takes others, for tests). Connections served at
# once: each holds a thread, so over this many a connection is answered 503 and closed.
MAX_CONNECTIONS = 64
# A connection that sends nothing for this long is closed (between keep-alive requests too:
# the dashboard asks every second, so a live page's connection never idles this long).
IDLE_TIMEOUT_S = 15.0
# One request's line, headers and body must all arrive within this long of its first byte,
# however steadily they trickle in (a client sending a byte every few seconds never idles).
REQUEST_TIMEOUT_S = 30.0
# After the server closes its side, what the client still sends (a refused request's body)
# is read and dropped for at most this long (see ServeHTTPServer.shutdown_request).
LINGER_S = 2.0
# A response is sent in pieces of this size, each within the idle timeout.
WRITE_CHUNK_BYTES = 64 * 1024
# Connections refused over the bound are logged at most this often.
BUSY_LOG_EVERY_S = 10.0
# A Content-Length is digits only (no sign, no list, no spaces inside), and few enough of
# them that int() is cheap; anything else is ambiguous framing and refused.
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
# RFC 9110's token: a header name with anything else (a space before the colon...) is refused.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The email parser's defects that are about the header lines themselves. The others it
# records are about a MIME body's structure (a multipart type without its parts, say): the
# stdlib parses the request's head as a whole message, so any multipart Content-Type
# reported those, although a request's head holds no body to be malformed.
HEADER_LINE_DEFECTS = (
    email_errors.MissingHeaderBodySeparatorDefect,
    email_errors.FirstHeaderLineIsContinuationDefect,
    email_errors.MisplacedEnvelopeHeaderDefect,
)


class InstanceTerminated(BaseException):
    """Raised into an activity call of a terminated instance.

    A BaseException on purpose: the driver retries an activity's ``Exception`` and the
    orchestrator turns one into its failure path (teardown, report); after a terminate no
    code of the orchestrator may run, as in Durable, so this must pass both untouched.
    """


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _stamped(payload: Any) -> Any:
    """The orchestrator's first input with its start and claim set, once, when it starts.

    Durable keeps the first execution's clock in history, so every replay claims the run id
    with the same words; this runtime keeps no history, so the input carries them: a run
    resumed from its first generation's input then holds its own claim, not a second one.
    """
    from orchestrators.run import stamp_start

    try:
        state = RunState.model_validate(payload)
    except ValueError:
        return payload  # not a run's state: the orchestrator refuses it itself
    if state.started_at is not None:
        return payload
    return stamp_start(state, datetime.now(UTC)).model_dump(mode="json")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Instance:
    """One orchestration instance: its Durable-visible state and this server's handles."""

    instance_id: str
    name: str
    input: Any
    created: datetime
    runtime: str = RuntimeStatus.PENDING.value
    custom_status: Any = None
    output: Any = None
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))
    driver: LocalDriver | None = None
    # Events raised before the driver existed (a queued run), delivered when it starts.
    early_events: list[tuple[str, Any]] = field(default_factory=list)
    terminated: bool = False
    # The latest RunState an activity was given (or the manifest's summary added to the
    # input): what finalize_terminated needs to record the items the run left undone.
    known_state: Any = None
    started_monotonic: float | None = None
    # What the dashboard saw of the run: progress samples and phase changes.
    history: dashboard.RunHistory = field(default_factory=dashboard.RunHistory)
    ended: threading.Event = field(default_factory=threading.Event)
    # The dashboard's cached ledger view: (monotonic time read, done count, view).
    ledger_view: tuple[float, int, dict[str, Any]] | None = None
    # The early end of a monitor's wait (LocalDurableClient._all_recorded): the custom
    # status it last judged, and how many times in a row it has judged it.
    wake_status: Any = None
    wake_checks: int = 0

    def status(self, show_input: bool = True) -> DurableOrchestrationStatus:
        return DurableOrchestrationStatus(
            name=self.name,
            instanceId=self.instance_id,
            createdTime=_iso(self.created),
            lastUpdatedTime=_iso(self.updated),
            input=self.input if show_input else None,
            output=self.output,
            runtimeStatus=self.runtime,
            customStatus=self.custom_status,
        )

    def durable_json(self, show_input: bool = True) -> dict[str, Any]:
        """The body of Durable's status URL for this instance."""
        return {
            "name": self.name,
            "instanceId": self.instance_id,
            "runtimeStatus": self.runtime,
            "input": self.input if show_input else None,
            "customStatus": self.custom_status,
            "output": self.output,
            "createdTime": _iso(self.created),
            "lastUpdatedTime": _iso(self.updated),
        }


class LocalDurableClient:
    """The Durable client's surface that the app's handlers use, over local drivers.

    ``base_url`` is where this server answers (the management links point there);
    ``out_dir`` receives each run's report and outputs, as ``batchctl run`` copies them.
    """

    def __init__(
        self,
        services: Services,
        *,
        base_url: str,
        out_dir: Path,
        max_runs: int = 1,
        on_event: Callable[[str], None] | None = None,
        on_generation: Callable[[str, Any], None] | None = None,
        copy_out: bool = True,
    ) -> None:
        self.services = services
        self.base_url = base_url.rstrip("/")
        self.out_dir = out_dir
        # ``batchctl run`` and ``resume`` keep each generation's input in the run's folder
        # and copy the results out themselves (as a client of this app); ``serve`` copies
        # them out here, for any client. (A manifest's local videos need no staging: local
        # workers read them in place, batchctl/storage/items.py.)
        self._on_generation = on_generation
        self._copy_out_results = copy_out
        self._slots = threading.Semaphore(max_runs)
        self._lock = threading.RLock()
        self._instances: dict[str, Instance] = {}
        self._threads: list[threading.Thread] = []
        self.closing = False
        self._say = on_event or (lambda line: None)

    # -- the Durable client's methods (async, as the SDK's are) -------------------------------
    async def get_status(
        self, instance_id: str, show_history: bool = False, show_input: bool = True, **_: Any
    ) -> DurableOrchestrationStatus:
        instance = self.instance(instance_id)
        # Durable answers an unknown id with an empty status (no runtime status), not an error.
        return instance.status(show_input) if instance else DurableOrchestrationStatus()

    async def get_status_by(
        self,
        created_time_from: datetime | None = None,
        created_time_to: datetime | None = None,
        runtime_status: Iterable[Any] | None = None,
        **_: Any,
    ) -> list[DurableOrchestrationStatus]:
        wanted = {str(getattr(s, "value", s)) for s in runtime_status} if runtime_status else None
        return [
            instance.status(show_input=False)
            for instance in self.instances()
            if (created_time_from is None or instance.created >= created_time_from)
            and (created_time_to is None or instance.created <= created_time_to)
            and (wanted is None or instance.runtime in wanted)
        ]

    async def start_new(
        self,
        orchestration_function_name: str,
        instance_id: str | None = None,
        client_input: Any = None,
    ) -> str:
        if orchestration_function_name != ORCHESTRATOR_NAME:
            raise ValueError(f"no orchestrator named {orchestration_function_name!r}")
        if not instance_id:
            raise ValueError("the local server needs an instance id (the run id)")
        return self._begin(instance_id, client_input)

    def resume(self, instance_id: str, generation_input: Any) -> str:
        """Run an instance again from a generation's input kept outside this process, as the
        Durable host does after a restart (``batchctl resume``: the last controller died)."""
        return self._begin(instance_id, generation_input, resumed=True)

    def _begin(self, instance_id: str, client_input: Any, *, resumed: bool = False) -> str:
        payload = json.loads(json.dumps(client_input))  # through JSON, as Durable stores it
        with self._lock:
            if self.closing:
                raise RuntimeError("the server is stopping; no new runs")
            existing = self._instances.get(instance_id)
            if existing is not None and existing.runtime in ACTIVE_STATUSES:
                raise ValueError(f"instance {instance_id} is already running")
            instance = Instance(
                instance_id=instance_id,
                name=ORCHESTRATOR_NAME,
                input=payload,
                created=datetime.now(UTC),
                known_state=payload,
            )
            self._instances[instance_id] = instance
            thread = threading.Thread(
                target=self._run, args=(instance,), name=f"run-{instance_id}", daemon=True
            )
            self._threads.append(thread)
        thread.start()
        self._say(f"run {instance_id} {'resumed' if resumed else 'started'}")
        return instance_id

    async def raise_event(
        self, instance_id: str, event_name: str, event_data: Any = None, **_: Any
    ) -> None:
        self.raise_event_now(instance_id, event_name, event_data)

    async def terminate(self, instance_id: str, reason: str) -> None:
        self.terminate_now(instance_id, reason)

    def create_check_status_response(
        self, request: func.HttpRequest, instance_id: str
    ) -> func.HttpResponse:
        links = self.get_client_response_links(request, instance_id)
        return func.HttpResponse(
            json.dumps(links),
            status_code=202,
            headers={"Location": links["statusQueryGetUri"], "Retry-After": "10"},
            mimetype="application/json",
        )

    def get_client_response_links(
        self, request: func.HttpRequest | None, instance_id: str
    ) -> dict[str, str]:
        """Durable's management links, pointing at this server (same keys as the SDK's), at
        the origin the request came to, as the SDK does (a client that reached the server as
        localhost gets localhost links)."""
        origin = self.base_url
        if request is not None and request.url:
            parsed = urllib.parse.urlsplit(request.url)
            if parsed.scheme and parsed.netloc:
                origin = f"{parsed.scheme}://{parsed.netloc}"
        base = f"{origin}{DURABLE_PREFIX}/{urllib.parse.quote(instance_id, safe='')}"
        query = f"taskHub={TASK_HUB}&connection=Storage"
        return {
            "id": instance_id,
            "statusQueryGetUri": f"{base}?{query}",
            "sendEventPostUri": f"{base}/raiseEvent/{{eventName}}?{query}",
            "terminatePostUri": f"{base}/terminate?reason={{text}}&{query}",
            "rewindPostUri": f"{base}/rewind?reason={{text}}&{query}",
            "purgeHistoryDeleteUri": f"{base}?{query}",
            "restartPostUri": f"{base}/restart?{query}",
            "suspendPostUri": f"{base}/suspend?reason={{text}}&{query}",
            "resumePostUri": f"{base}/resume?reason={{text}}&{query}",
        }

    # -- what the server calls directly ----------------------------------------------------------
    def instance(self, instance_id: str) -> Instance | None:
        with self._lock:
            return self._instances.get(instance_id)

    def instances(self) -> list[Instance]:
        with self._lock:
            return sorted(self._instances.values(), key=lambda i: i.created, reverse=True)

    def raise_event_now(self, instance_id: str, name: str, data: Any = None) -> bool:
        """Deliver an event; False when the instance is unknown or no longer running."""
        with self._lock:
            instance = self._instances.get(instance_id)
            if instance is None or instance.runtime not in ACTIVE_STATUSES:
                return False
            if instance.driver is None:
                instance.early_events.append((name, data))
                return True
            driver = instance.driver
        driver.raise_event(name, data)
        return True

    def terminate_now(self, instance_id: str, reason: str = "") -> bool:
        """Durable's terminate: the instance ends now and runs none of its code again; the
        server then closes the run as the sweeper would (see the module docstring)."""
        with self._lock:
            instance = self._instances.get(instance_id)
            if instance is None or instance.runtime not in ACTIVE_STATUSES:
                return False
            instance.terminated = True
            instance.runtime = RuntimeStatus.TERMINATED.value
            instance.output = reason or "terminated"
            instance.updated = datetime.now(UTC)
            driver = instance.driver
        if driver is not None:
            # Wakes a generator waiting on its poll timer; its next activity is refused.
            driver.raise_event(CANCEL_EVENT, None)
        self._say(f"run {instance_id} terminated{': ' + reason if reason else ''}")
        return True

    def purge(self, instance_id: str) -> bool | None:
        """Forget an ended instance: True when purged, None when unknown, False when live."""
        with self._lock:
            instance = self._instances.get(instance_id)
            if instance is None:
                return None
            if instance.runtime in ACTIVE_STATUSES:
                return False
            del self._instances[instance_id]
            return True

    def shutdown(self, timeout_s: float | None = None) -> list[str]:
        """Stop taking runs, cancel every live one (flag + event) and wait for their
        teardown; returns the runs that were cancelled."""
        with self._lock:
            self.closing = True
            live = [i for i in self._instances.values() if i.runtime in ACTIVE_STATUSES]
            threads = list(self._threads)
        cancelled = []
        for instance in live:
            if instance.driver is None and instance.started_monotonic is None:
                continue  # queued: it sees `closing` when its turn comes and never starts
            with contextlib.suppress(Exception):
                controller.request_cancel(self.services, instance.instance_id)
            self.raise_event_now(instance.instance_id, CANCEL_EVENT)
            cancelled.append(instance.instance_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in threads:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            thread.join(remaining)
        return cancelled

    # -- one instance's life -----------------------------------------------------------------------
    def _run(self, instance: Instance) -> None:
        with self._slots:
            try:
                self._run_in_slot(instance)
            finally:
                instance.ended.set()

    def _run_in_slot(self, instance: Instance) -> None:
        run_id = instance.instance_id
        with self._lock:
            if instance.terminated:
                return  # terminated while queued: nothing was created
            if self.closing:
                instance.runtime = RuntimeStatus.TERMINATED.value
                instance.output = "the server stopped before the run started"
                instance.updated = datetime.now(UTC)
                return
            instance.runtime = RuntimeStatus.RUNNING.value
            instance.updated = datetime.now(UTC)
            instance.started_monotonic = time.monotonic()
            instance.input = _stamped(instance.input)
        driver = self._driver(instance)
        with self._lock:
            instance.driver = driver
            early, instance.early_events = instance.early_events, []
        for name, data in early:
            driver.raise_event(name, data)
        try:
            output = driver.run(instance.input)
        except InstanceTerminated:
            self._close_terminated(instance)
            return
        except Exception as error:
            if instance.terminated:
                self._close_terminated(instance)
                return
            log.exception("run %s failed", run_id)
            with self._lock:
                instance.runtime = RuntimeStatus.FAILED.value
                instance.output = f"{type(error).__name__}: {error}"
                instance.updated = datetime.now(UTC)
            self._say(f"run {run_id} failed: {type(error).__name__}: {error}")
            return
        self._complete(instance, output)

    def _complete(self, instance: Instance, output: Any) -> None:
        """The orchestrator returned ``output``: copy the results out, then say Completed."""
        if not instance.terminated and self._copy_out_results:
            # Before the instance says Completed: a client that sees it ended finds the
            # report and outputs in the out folder.
            self._copy_out(instance.instance_id)
        with self._lock:
            if not instance.terminated:
                instance.output = output
                instance.runtime = RuntimeStatus.COMPLETED.value
                instance.updated = datetime.now(UTC)
        if instance.terminated:
            self._close_terminated(instance)
            return
        phase = output.get("phase") if isinstance(output, dict) else None
        self._say(f"run {instance.instance_id} ended: {phase}")

    def _driver(self, instance: Instance) -> LocalDriver:
        """The real orchestrator over the real activities, each refused once terminated."""
        from activities import make_activities
        from orchestrators.run import run_orchestrator

        services = self.services
        activities = {
            name: self._gated(instance, name, function)
            for name, function in make_activities(lambda: services).items()
        }
        on_generation = self._on_generation
        return LocalDriver(
            run_orchestrator,
            activities,
            on_status=lambda status: self._on_status(instance, status),
            instance_id=instance.instance_id,
            on_generation=(
                None
                if on_generation is None
                else lambda state: on_generation(instance.instance_id, state)
            ),
            wait_over=lambda: self._all_recorded(instance),
        )

    def _all_recorded(self, instance: Instance) -> bool:
        """Whether every item of the run has its record now, read from the ledger's counters
        only once the run's last poll left no more items than its nodes hold (the monitor's
        wait then ends when the last record lands, not at the poll it planned: locally the
        next poll after the run's end was up to a whole interval away)."""
        status = instance.custom_status
        progress = _progress_counts(status)
        if progress is None:
            return False
        total, done = progress
        if total <= 0 or done >= total:
            return False
        if total - done > local_items_held(
            instance.known_state, self.services.settings.local_nodes
        ):
            return False
        # A tail that stalls (a node died holding messages) is read less often the longer
        # the same poll's status stands: every check for 3 s, then once a second.
        checks = instance.wake_checks + 1 if status is instance.wake_status else 1
        instance.wake_status, instance.wake_checks = status, checks
        if not wake_read_due(checks):
            return False
        counts = self.services.ledger.counts(instance.instance_id)
        return counts.settled >= total

    def _gated(
        self, instance: Instance, name: str, function: Callable[[Any], Any]
    ) -> Callable[[Any], Any]:
        def activity(payload: Any) -> Any:
            if instance.terminated:
                raise InstanceTerminated(instance.instance_id)
            if isinstance(payload, dict) and "request" in payload and "run_id" in payload:
                instance.known_state = payload  # a RunState: the latest one the run holds
            result = function(payload)
            if name == Activity.VALIDATE_MANIFEST and isinstance(instance.known_state, dict):
                summary = ManifestSummary.model_validate(result)
                state = RunState.model_validate(instance.known_state)
                instance.known_state = state.model_copy(update={"summary": summary}).model_dump(
                    mode="json"
                )
            return result

        return activity

    def _on_status(self, instance: Instance, status: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if instance.terminated:
                return  # Durable keeps the custom status the instance had when terminated
            instance.custom_status = status
            instance.updated = datetime.now(UTC)
            if isinstance(status, dict) and instance.started_monotonic is not None:
                instance.history.observe(now - instance.started_monotonic, status)

    def _close_terminated(self, instance: Instance) -> None:
        """The sweeper's work for a terminated run, done now that no activity is running."""
        run_id = instance.instance_id
        try:
            # Every step in this one call: no timer limit here, and the user waits for it.
            controller.finalize_terminated(
                self.services, run_id, instance.known_state, budget_s=None
            )
        except Exception:
            log.exception("closing terminated run %s failed; its compute may be left", run_id)
            return
        self._copy_out(run_id)
        self._say(f"run {run_id} closed after terminate (compute deleted, report written)")

    def _copy_out(self, run_id: str) -> None:
        try:
            controller.copy_run_out(self.services, run_id, self.out_dir / run_id)
        except Exception as error:  # the run is done either way; say why the copy is missing
            log.warning("run %s: copying the report and outputs out failed: %s", run_id, error)

    # -- the dashboard's view -----------------------------------------------------------------
    def dashboard_view(self, instance: Instance) -> dict[str, Any]:
        status = run_status_of(instance.status(show_input=False), instance.instance_id)
        samples = instance.history.samples
        with self._lock:
            started = instance.started_monotonic
        elapsed = None if started is None else time.monotonic() - started
        if elapsed is not None and instance.runtime not in ACTIVE_STATUSES and samples:
            elapsed = samples[-1][0]
        rate = rate_over([(s[0], s[1] + s[2]) for s in samples], RATE_WINDOW_S)
        eta = eta_s(status.eta_s, status.remaining, rate, finished=status.finished)
        files = f"/runs/{urllib.parse.quote(instance.instance_id, safe='')}"
        finished = status.finished
        ledger = self._ledger_view(instance, status.done, finished)
        return {
            "status": status.view(),
            "samples": samples,
            "phases": instance.history.phases,
            "failures_note": "their classes show once the ledger is read",
            "rate_per_s": rate,
            "eta_s": eta,
            "elapsed_s": elapsed,
            "nodes": ledger["nodes"],
            "failures": ledger["failures"],
            "report_html": f"{files}/report.html" if finished else None,
            "report_json": f"{files}/report.json" if finished else None,
        }

    def _ledger_view(self, instance: Instance, done: int, finished: bool) -> dict[str, Any]:
        cached = instance.ledger_view
        now = time.monotonic()
        if cached is not None:
            read_at, done_then, view = cached
            # An ended run's ledger changes no more once its counts are in; a live one is
            # read again after LEDGER_REFRESH_S.
            if (finished and done_then == done) or (
                not finished and now - read_at < LEDGER_REFRESH_S
            ):
                return view
        try:
            read: dict[str, Any] = dict(
                live_tables(
                    self.services.ledger.iter_results(instance.instance_id), instance.created
                )
            )
        except Exception as error:  # a dashboard must not fail on a slow or missing table
            log.info("dashboard: ledger of %s not read: %s", instance.instance_id, error)
            return {"nodes": [], "failures": []}
        instance.ledger_view = (now, done, read)
        return read


def _progress_counts(status: Any) -> tuple[int, int] | None:
    """(total, done) of a run's custom status (a RunProgress), or None before it has one."""
    if not isinstance(status, dict):
        return None
    try:
        progress = RunProgress.model_validate(status)
    except ValueError:
        return None
    return progress.total, progress.done


# Checks of one poll's status after which the ledger is read only every WAKE_SLOW_EVERY-th.
WAKE_FAST_CHECKS = 30
WAKE_SLOW_EVERY = 10


def wake_read_due(checks: int) -> bool:
    """Whether the ``checks``-th check against the same poll's status reads the ledger."""
    return checks <= WAKE_FAST_CHECKS or checks % WAKE_SLOW_EVERY == 0


def local_items_held(state: Any, nodes: int) -> int:
    """The most items ``nodes`` local nodes hold at once: each one's items at once and their
    prefetch, and a whole message past them, as a node takes whole messages."""
    prefetch = int(WorkerSettings.model_fields["prefetch"].default)
    try:
        per_message = RunState.model_validate(state).request.options.items_per_message
    except ValueError:
        per_message = MAX_ITEMS_PER_MESSAGE
    return max(1, nodes) * (worker_concurrency(nodes) + prefetch + per_message)


class ManifestTrigger:
    """The blob trigger: a new CSV (or a new version of one) in the manifests container
    starts a run with the trigger's run id, through the app's own ``start_run_from_blob``.

    Blobs under ``local/`` are skipped: ``batchctl run`` stages its manifests there, and
    they are runs of their own. A version whose run already wrote its report (a previous
    server on the same storage) is not started again.
    """

    def __init__(
        self,
        client: LocalDurableClient,
        options: RunOptions,
        *,
        interval_s: float = 1.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._options = options
        self._interval_s = interval_s
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._say = on_event or (lambda line: None)
        self._thread = threading.Thread(target=self._loop, name="manifest-trigger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def poll_once(self) -> list[str]:
        """Start a run for every manifest version not seen yet; the runs started."""
        services = self._client.services
        settings = services.settings
        container = settings.manifests_container
        started: list[str] = []
        for name, etag in services.store.list_with_etags(container):
            if not name.lower().endswith(".csv") or name.startswith("local/"):
                continue
            blob = f"{container}/{name}"
            run_id = run_id_for_blob(blob, etag)
            if run_id in self._seen:
                continue
            self._seen.add(run_id)
            if services.store.exists(settings.runs_container, controller.report_blob_name(run_id)):
                continue
            if self._client.closing:
                return started
            started_id = asyncio.run(
                api.start_run_from_blob(blob, etag, self._client, self._options)
            )
            if started_id:
                self._say(f"manifest {blob} started run {started_id}")
                started.append(started_id)
        return started

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as error:  # storage hiccups: try again at the next look
                log.warning("blob trigger: listing the manifests failed: %s", error)
            self._stop.wait(self._interval_s)


# -- HTTP ------------------------------------------------------------------------------------
# Why the standard library's server, hardened here, and not waitress, cheroot or h11 (issue
# 21): the server is small and local (loopback by default, a key required on any other
# bind), and everything that was missing is a few dozen lines over socketserver: framing
# checks, closing after any answer that left a body unread, a per-read idle timeout plus a
# whole-request deadline, and a bound on connections. None of the libraries gives all of
# that by itself: waitress's channel_timeout and cheroot's timeout count inactivity only, so
# a client that sends a byte every few seconds keeps its request open for ever (and
# waitress then stops accepting once its connection_limit of such clients is reached);
# the whole-request deadline would have to be built around either of them anyway. h11
# parses and frames (well) but owns no socket, thread or timeout: it would replace only
# the checks in ``ServeHandler.parse_request`` and leave the rest to write. Moving to a WSGI
# server would also rewrite every route's plumbing and add a dependency to the app and its
# pins, for no behaviour a user of this server would see. Keep the stdlib server unless it
# grows beyond a local API (TLS, HTTP/2, chunked uploads): then take a real server whole.
class ServeHTTPServer(ThreadingHTTPServer):
    """The API's HTTP/1.1 server: a thread per connection, at most ``max_connections``.

    Limits (module constants by default): a connection idle for ``idle_timeout_s`` is
    closed (a read that waits, or a piece of a response that cannot be sent, that long);
    one request must arrive whole within ``request_timeout_s`` of its first byte; a
    connection over ``max_connections`` is answered 503 and closed at once, in the
    accepting thread, so no thread is started for it; a closing connection lingers at most
    ``linger_s`` (see :meth:`shutdown_request`).
    """

    daemon_threads = True
    # Without this a restart right after a stop fails for a minute (TIME_WAIT).
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        client: LocalDurableClient,
        *,
        key: str | None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        linger_s: float = LINGER_S,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if min(idle_timeout_s, request_timeout_s) <= 0 or linger_s < 0:
            raise ValueError("the timeouts must be positive (linger_s at least 0)")
        self.client = client
        self.key = key or None
        self.loopback_only = is_loopback(address[0])
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.linger_s = linger_s
        self._connection_slots = threading.BoundedSemaphore(max_connections)
        # Connections refused since the last warning (the accepting thread's own state).
        self._busy_refused = 0
        self._busy_logged_at: float | None = None
        super().__init__(address, ServeHandler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if not self._connection_slots.acquire(blocking=False):
            self._refuse_busy(_stream(request), client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_slots.release()  # its thread never started
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        """Close a connection gracefully: our FIN first, then read and drop what the client
        still sends until it closes too or ``linger_s`` passes (nginx's lingering close).

        A socket closed with unread data in it sends a reset, and a reset can destroy the
        response in the client's buffers before it reads it: a client that POSTs a large
        body and is refused (413, 401, 403) is still sending it. What is read here is
        discarded, never parsed: once a connection closes, nothing more is a request.
        """
        sock = _stream(request)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger_s
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                if not sock.recv(65536):
                    break
        self.close_request(request)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            # The client reset or vanished mid-request: its connection is closed, nothing else.
            log.debug("connection from %s ended: %r", client_address, error)
            return
        log.exception("serving a connection from %s failed", client_address)

    def _refuse_busy(self, sock: socket.socket, client_address: Any) -> None:
        """503 and close, from the accepting thread: a fresh socket takes these few bytes
        without blocking, and no thread is started for a connection over the bound."""
        # Logged once in a while, with a count: a flood of connections must not flood the log.
        self._busy_refused += 1
        now = time.monotonic()
        if self._busy_logged_at is None or now - self._busy_logged_at >= BUSY_LOG_EVERY_S:
            log.warning(
                "refused %d connections (the latest from %s): %d are open already",
                self._busy_refused,
                client_address,
                self.max_connections,
            )
            self._busy_refused, self._busy_logged_at = 0, now
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(BUSY_RESPONSE)
            sock.shutdown(socket.SHUT_WR)
            # What the client already sent is dropped (without waiting for more), so that
            # the close below does not reset the connection before the 503 is read.
            sock.setblocking(False)
            for _ in range(16):
                if not sock.recv(65536):
                    break
        sock.close()


_BUSY_BODY = b'{"error": "too many connections; retry shortly"}'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _BUSY_BODY
)


def _stream(request: socket.socket | tuple[bytes, socket.socket]) -> socket.socket:
    # socketserver's request is a socket for TCP servers (a tuple only for UDP ones).
    assert isinstance(request, socket.socket)
    return request


class _DeadlineReader(io.RawIOBase):
    """A connection's reading side, on two clocks.

    Every read waits at most ``idle_timeout_s``; once a request's first bytes have come,
    every read also ends by that request's deadline (``request_timeout_s`` later), so a
    request that trickles in is cut off however steadily it trickles. The handler sets
    :attr:`deadline` back to None before each request. Writes share the socket, so its
    timeout is put back to the idle one after each read (a response's send may take that
    long, not whatever was left of the request's deadline).
    """

    def __init__(
        self, sock: socket.socket, idle_timeout_s: float, request_timeout_s: float
    ) -> None:
        super().__init__()
        self._sock = sock
        self._idle_timeout_s = idle_timeout_s
        self._request_timeout_s = request_timeout_s
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        timeout = self._idle_timeout_s
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the request did not arrive whole in time")
            timeout = min(timeout, remaining)
        self._sock.settimeout(timeout)
        try:
            count = self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._idle_timeout_s)
        if self.deadline is None and count:
            self.deadline = time.monotonic() + self._request_timeout_s
        return count


class ServeHandler(BaseHTTPRequestHandler):
    """One connection's requests: framing, checks (origin, host, key), then the route.

    A request's body is part of the request only once it has been read whole: any answer
    sent before that (a refusal, a 404, the page) closes the connection, so the unread
    bytes are never taken for the next request (request smuggling). Framing that two
    parsers could read two ways is refused outright (400, closed): see
    :meth:`_framing_problem`.
    """

    server: ServeHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "batchctl-serve"
    # The current request's declared body length and whether it has been read whole.
    _content_length = 0
    _body_read = True

    def setup(self) -> None:
        super().setup()
        # The stdlib's reader waits for ever; this one times out (see _DeadlineReader).
        self.rfile.close()
        self._reader = _DeadlineReader(
            self.connection, self.server.idle_timeout_s, self.server.request_timeout_s
        )
        self.rfile = io.BufferedReader(self._reader)
        self.connection.settimeout(self.server.idle_timeout_s)

    def handle_one_request(self) -> None:
        self._reader.deadline = None  # the next request's clock starts with its first byte
        self._content_length = 0
        self._body_read = True
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        problem = self._framing_problem()
        if problem is not None:
            self._error(400, problem, close=True)
            return False
        self._body_read = self._content_length == 0
        return True

    def handle_expect_100(self) -> bool:
        # "100 Continue" asks the client for the body: not for a request that is refused
        # whatever it holds. Its final answer comes first instead and the connection
        # closes (as RFC 9110 allows), so the body is never sent.
        if (
            self._framing_problem() is None
            and self._content_length <= MAX_BODY_BYTES
            and self._refused() is None
            and self._authorized()
        ):
            return super().handle_expect_100()
        return True

    def _framing_problem(self) -> str | None:
        """Why this request's framing is ambiguous, or None; sets ``_content_length``.

        Refused: a Transfer-Encoding (this server reads no chunked bodies, and beside a
        Content-Length it is the classic CL.TE smuggling vector), a Content-Length that is
        not plain digits or several that disagree, and what :meth:`_header_problem` finds.
        Identical repeated Content-Lengths are one length (RFC 9110 allows that reading).
        """
        headers = self.headers
        lengths = {value.strip(" \t") for value in headers.get_all("Content-Length") or []}
        length = next(iter(lengths), "0")
        checks = [
            ("Transfer-Encoding" in headers, "Transfer-Encoding is not accepted; send a length"),
            (len(lengths) > 1, "several Content-Length headers that disagree"),
            (not CONTENT_LENGTH.fullmatch(length), f"Content-Length {length!r} is not a length"),
        ]
        problem = self._header_problem() or next((why for failed, why in checks if failed), None)
        if problem is None:
            self._content_length = int(length)
        return problem

    def _header_problem(self) -> str | None:
        """Headers the stdlib parsed loosely: a line without a colon ends its headers early
        and hides those that follow (a Transfer-Encoding, say), folded lines join two
        headers, a name with a space is another header to another parser; and several
        Host headers (the loopback check reads one of them)."""
        headers = self.headers
        defects = [d for d in headers.defects if isinstance(d, HEADER_LINE_DEFECTS)]
        if defects or _left_over(headers):
            # Any multipart Content-Type was refused here before (seen in the API tester's
            # requests): only the header-line defects count now (see HEADER_LINE_DEFECTS).
            return "malformed header lines"
        for name, value in headers.items():
            if not HEADER_NAME.fullmatch(name):
                return f"malformed header name {name!r}"
            if "\r" in value or "\n" in value:
                return f"folded header {name!r} (obsolete line folding is not accepted)"
        if len(headers.get_all("Host") or []) > 1:
            return "several Host headers"
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # The other methods a client may send (RFC 9110's, PATCH, and the QUERY draft) are
    # routed too, so that a route answers them 405 (or a path 404) in JSON like every other
    # answer; without these the stdlib answers a 5xx (501) page in HTML. (Found by the API
    # tester, schemathesis, which sends unexpected methods to every documented path.)
    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def do_TRACE(self) -> None:
        self._handle("TRACE")

    def do_QUERY(self) -> None:
        self._handle("QUERY")

    # -- plumbing --------------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        """One response; ``close`` (or a body left unread) closes the connection after it."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close or not self._body_read:
            # Sets close_connection too: the unread rest of this connection is dropped.
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            # In pieces: a send's timeout (the idle one) bounds the whole of one sendall, so
            # a large report to a slow but steady client must not be one send.
            view = memoryview(body)
            for start in range(0, len(view), WRITE_CHUNK_BYTES):
                self.wfile.write(view[start : start + WRITE_CHUNK_BYTES])

    def _send_json(
        self,
        status: int,
        body: Any,
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        self._send(status, json.dumps(body, default=str).encode(), headers=headers, close=close)

    def _error(self, status: int, message: str, *, close: bool = False) -> None:
        self._send_json(status, {"error": message}, close=close)

    def _send_response(self, response: func.HttpResponse) -> None:
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-type"}
        self._send(
            response.status_code,
            response.get_body(),
            response.mimetype or "application/json",
            headers,
        )

    def _origin(self) -> str:
        """Where the client reached this server (its Host header), for links back here."""
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.client.base_url

    def _refused(self) -> str | None:
        """Why this request is refused before routing, or None.

        The key: required on every route but the page itself when the server has one.
        Host and Origin: a web page open in this machine's browser may send requests here
        (and, through DNS rebinding, under another name); a script client sends no Origin.
        """
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.server.loopback_only and host and not is_loopback(host):
            return f"host {host!r} is not this machine"
        origin = self.headers.get("Origin")
        if origin is not None:
            parsed = urllib.parse.urlsplit(origin)
            if parsed.netloc != (self.headers.get("Host") or ""):
                return "cross-origin requests are not accepted"
        return None

    def _authorized(self) -> bool:
        key = self.server.key
        if key is None:
            return True
        given = self.headers.get(KEY_HEADER) or ""
        return hmac.compare_digest(given.encode(), key.encode())

    def _body(self) -> bytes | None:
        """The declared body, read whole; None when it could not be and an answer (413,
        408) was sent instead, the connection then closing."""
        length = self._content_length
        if length > MAX_BODY_BYTES:
            self._error(413, f"the body is over {MAX_BODY_BYTES} bytes")
            return None
        try:
            body = self.rfile.read(length) if length else b""
        except TimeoutError:
            self._error(408, "the request's body did not arrive in time")
            return None
        if len(body) < length:
            self.close_connection = True  # the client closed mid-body: no one to answer
            return None
        self._body_read = True
        return body

    def _call(self, handler: Any) -> None:
        self._send_response(asyncio.run(handler))

    def _request(
        self, method: str, path: str, query: dict[str, str], body: bytes, route: dict[str, str]
    ) -> func.HttpRequest:
        return func.HttpRequest(
            method=method,
            url=f"{self._origin()}{self.path}",
            headers={k.lower(): v for k, v in self.headers.items()},
            params=query,
            route_params=route,
            body=body,
        )

    # -- routes ----------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        try:
            self._route(method)
        except ConnectionError as error:
            # The client went away while being answered: nothing to log beyond that.
            log.debug("%s %s: the client went away (%r)", method, self.path, error)
            self.close_connection = True
        except Exception:
            log.exception("%s %s failed", method, self.path)
            with contextlib.suppress(Exception):
                # Closed after: a failure may have left the body or the response half done.
                self._error(500, "internal error; see the server's log", close=True)
            self.close_connection = True

    def _route(self, method: str) -> None:
        refused = self._refused()
        if refused:
            self._error(403, refused)
            return
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path.rstrip("/") or "/"
        if method == "GET" and path in ("/", "/favicon.ico"):
            self._page(path)
            return
        if not self._authorized():
            # As the Functions host answers a missing or wrong key: 401, no details.
            self._send(401)
            return
        body = self._body()
        if body is None:
            return
        query = dict(urllib.parse.parse_qsl(parsed.query))
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
        if method == "GET" and path == dashboard.DATA_PATH:
            client = self.server.client
            runs = [client.dashboard_view(i) for i in client.instances()]
            self._send_json(200, dashboard.page_data(runs, source="batchctl serve"))
        elif path == api.OPENAPI_PATH:
            if method == "GET":
                request = self._request(method, path, query, body, {})
                self._send_response(api.get_openapi(request))
            else:
                self._not_allowed(method, path, ("GET",))
        elif parts[:2] == ["api", "runs"]:
            self._api(method, parts[2:], query, body)
        elif parts[:1] == ["runs"] and len(parts) == 3 and method == "GET":
            self._report_file(parts[1], parts[2])
        elif path.startswith(DURABLE_PREFIX):
            self._durable(method, parts[4:], query, body)
        else:
            self._error(404, f"no route {method} {path}")

    def _page(self, path: str) -> None:
        if path == "/favicon.ico":
            self._send(204)
            return
        self._send(
            200,
            dashboard.PAGE.encode(),
            "text/html; charset=utf-8",
            {"Content-Security-Policy": dashboard.CONTENT_SECURITY_POLICY},
        )

    def _api(self, method: str, rest: list[str], query: dict[str, str], body: bytes) -> None:
        client = self.server.client
        services = client.services
        path = "/api/runs" + "".join(f"/{p}" for p in rest)
        route = {"id": rest[0]} if rest else {}
        allowed = _api_methods(rest)
        if not allowed:
            self._error(404, f"no route {method} {path}")
            return
        if method not in allowed:
            self._not_allowed(method, path, allowed)
            return
        request = self._request(method, path, query, body, route)
        if method == "POST" and not rest:
            if client.closing:
                self._error(503, "the server is stopping; no new runs")
                return
            self._call(api.start_run(request, client, services.settings))
        elif method == "GET" and not rest:
            self._call(api.list_runs(request, client, self._report_url))
        elif method == "GET" and len(rest) == 1:
            self._call(api.get_run(request, client, self._report_url(rest[0])))
        elif method == "POST" and len(rest) == 2 and rest[1] == "cancel":
            self._call(
                api.cancel_run(
                    request, client, lambda run_id: controller.request_cancel(services, run_id)
                )
            )

    def _not_allowed(self, method: str, path: str, allowed: Iterable[str]) -> None:
        """405: the path is a route, but not for this method (RFC 9110: with Allow)."""
        allow = ", ".join(allowed)
        self._send_json(405, {"error": f"{method} {path}: only {allow}"}, {"Allow": allow})

    def _report_url(self, run_id: str) -> str:
        # The blob URL, as the deployed app gives it: `batchctl report` downloads from it.
        settings = self.server.client.services.settings
        return (
            f"{settings.blob_url}/{settings.runs_container}/{controller.report_blob_name(run_id)}"
        )

    def _report_file(self, run_id: str, name: str) -> None:
        content_type = REPORT_FILES.get(name)
        if content_type is None or self.server.client.instance(run_id) is None:
            self._error(404, f"no file {name!r} for run {run_id!r}")
            return
        services = self.server.client.services
        try:
            data = services.store.download_bytes(
                services.settings.runs_container, f"{run_id}/{name}"
            )
        except ResourceNotFoundError:
            self._error(404, f"run {run_id} has no {name} (yet)")
            return
        headers = {}
        if name == "report.html":
            # The report is self-contained (inline plots); it may load nothing else.
            headers["Content-Security-Policy"] = (
                "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
            )
        self._send(200, data, content_type, headers)

    def _durable(self, method: str, rest: list[str], query: dict[str, str], body: bytes) -> None:
        """Durable's instance management API, as the Functions host serves it."""
        client = self.server.client
        if not rest:
            if method != "GET":
                self._error(405, "only GET lists instances")
                return
            self._send_json(200, [i.durable_json(show_input=False) for i in client.instances()])
            return
        instance = client.instance(rest[0])
        if instance is None:
            self._error(404, f"no instance {rest[0]!r}")
            return
        action = rest[1] if len(rest) > 1 else None
        if action is None and method in ("GET", "DELETE"):
            if method == "GET":
                self._durable_status(instance, query)
            else:
                self._purge(instance)
        elif method == "POST" and action in ("terminate", "raiseEvent"):
            self._durable_action(instance, action, rest[2:], query, body)
        elif method == "POST" and action in ("rewind", "restart", "suspend", "resume"):
            self._error(
                501,
                f"{action} is not available in the local server; "
                "cancel with POST /api/runs/{id}/cancel and start a new run",
            )
        else:
            self._error(404, f"no route {method} {self.path}")

    def _purge(self, instance: Instance) -> None:
        if self.server.client.purge(instance.instance_id):
            self._send_json(200, {"instancesDeleted": 1})
        else:
            self._error(409, f"instance {instance.instance_id} is still {instance.runtime}")

    def _durable_action(
        self,
        instance: Instance,
        action: str,
        rest: list[str],
        query: dict[str, str],
        body: bytes,
    ) -> None:
        client = self.server.client
        if action == "terminate":
            done = client.terminate_now(instance.instance_id, query.get("reason", ""))
        else:
            if len(rest) != 1:
                self._error(404, "raise an event at .../raiseEvent/{eventName}")
                return
            try:
                data = json.loads(body) if body else None
            except ValueError:
                self._error(400, "the event data is not JSON")
                return
            done = client.raise_event_now(instance.instance_id, rest[0], data)
        if done:
            self._send(202)
        else:
            # As Durable: the instance exists but is no longer running.
            self._error(410, f"instance {instance.instance_id} already ended ({instance.runtime})")

    def _durable_status(self, instance: Instance, query: dict[str, str]) -> None:
        show_input = query.get("showInput", "true").lower() != "false"
        body = instance.durable_json(show_input=show_input)
        # As the Durable extension: 202 + Location while the instance runs, 200 when it has
        # ended, 500 for a failed one when the caller asks for it.
        if instance.runtime in ACTIVE_STATUSES:
            self._send_json(202, body, {"Location": f"{self._origin()}{self.path}"})
        elif (
            instance.runtime == RuntimeStatus.FAILED.value
            and query.get("returnInternalServerErrorOnFailure", "").lower() == "true"
        ):
            self._send_json(500, body)
        else:
            self._send_json(200, body)


def _left_over(message: Message) -> bool:
    """Whether lines followed the line that ended a request's headers early.

    The head is parsed up to its blank line, so a message's payload (a string, or the parts
    a message/* Content-Type makes of it) is empty unless a line that is no header ended
    the headers and the rest was taken for a body.
    """
    payload = message.get_payload()
    if isinstance(payload, list):
        return any(
            len(part) or part.get_unixfrom() or _left_over(part)
            for part in payload
            if isinstance(part, Message)
        )
    return bool(payload)


def _api_methods(rest: list[str]) -> tuple[str, ...]:
    """The methods served at /api/runs/{rest} (the routes of ``batchctl.functions.blueprint``);
    none for a path that is no route."""
    if not rest:
        return ("GET", "POST")
    if len(rest) == 1:
        return ("GET",)
    if len(rest) == 2 and rest[1] == "cancel":
        return ("POST",)
    return ()


def phase_summary(client: LocalDurableClient) -> dict[str, int]:
    """How many instances are in each phase (what the server prints when it stops)."""
    counts: dict[str, int] = {}
    for instance in client.instances():
        phase = run_status_of(instance.status(False), instance.instance_id).phase
        counts[phase] = counts.get(phase, 0) + 1
    return counts


__all__ = [
    "InstanceTerminated",
    "LocalDurableClient",
    "ManifestTrigger",
    "ServeHTTPServer",
    "is_loopback",
    "phase_summary",
]
