"""A small typed client for a deployed batchctl Function App (its ``/api/runs`` routes).

The function key comes only from the environment (``BATCHCTL_FUNCTION_KEY``) and travels
only as the ``x-functions-key`` header, never in a URL: URLs end up in shell history, logs
and error messages. Reads (GET) are retried with backoff on 5xx and connection errors;
writes are sent once, because a retried start or cancel could act twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from batchctl.azdenv import APP_URL_KEYS, BLOB_URL_KEYS, Resolved, resolve
from batchctl.contracts import RunOptions
from batchctl.runstatus import NotADurableStatusError, RunStatus, run_status_from_json
from batchctl.settings import ENV_PREFIX, StorageSettings
from batchctl.validation import describe

APP_URL_ENV = f"{ENV_PREFIX}APP_URL"
FUNCTION_KEY_ENV = f"{ENV_PREFIX}FUNCTION_KEY"
KEY_HEADER = "x-functions-key"

DEFAULT_TIMEOUT_S = 30.0
# How long following rides out an app that cannot be reached (a deployment, a restart)
# before it gives up; the run itself is not affected either way.
DEFAULT_UNREACHABLE_LIMIT_S = 300.0
DEFAULT_ATTEMPTS = 4
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 15.0

# The run-status contract is batchctl.runstatus's; this client and the app share it, and
# the client never imports the app's handlers (nor azure.functions with them).
__all__ = ["RunStatus"]


class AppError(Exception):
    """A failure talking to the app, worded for the person at the terminal."""


class BadRequestError(AppError):
    """400: the app refused the request; the message names the field."""


class AuthError(AppError):
    """401/403: the function key is missing or wrong."""


class RunNotFoundError(AppError):
    """404 from a batchctl route: there is no run with that id."""


class ConflictError(AppError):
    """409: the run already exists (start) or already ended (cancel)."""


class UnavailableError(AppError):
    """The app could not be reached, or kept answering 5xx after the retries."""


@dataclass(frozen=True)
class StartedRun:
    run_id: str
    # The Durable status URL (statusQueryGetUri): a fallback when /api/runs/{id} is not there.
    status_url: str | None


@dataclass(frozen=True)
class CancelResult:
    run_id: str
    requested: bool
    message: str


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def normalize_app_url(url: str) -> str:
    """``https://app.azurewebsites.net`` from that, with a trailing slash or ``/api``."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise AppError(f"app URL {url!r} is not an http(s) URL like https://NAME.azurewebsites.net")
    if parsed.query:
        # A `?code=` here would put the key in shell history; the key has its own variable.
        raise AppError(
            f"the app URL must not carry a query string; put the key in {FUNCTION_KEY_ENV}"
        )
    if parsed.scheme == "http" and (parsed.hostname or "") not in LOOPBACK_HOSTS:
        # The function key travels in a header: never in clear text across a network.
        raise AppError(f"app URL {url!r} must use https (plain http only for localhost)")
    path = parsed.path.rstrip("/")
    path = path.removesuffix("/api")
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def display_url(url: str) -> str:
    """A URL safe to print: Durable status URLs carry the system key as ``?code=``."""
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))


def _origin(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlsplit(url)
    return parsed.scheme, parsed.netloc.lower()


def _server_message(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    problems = body.get("problems")
    if isinstance(problems, list) and problems:
        return "; ".join(
            f"{p.get('field', '?')}: {p.get('error', '?')}" if isinstance(p, dict) else str(p)
            for p in problems
        )
    return str(body.get("error") or body.get("message") or "")


class AppClient:
    """Start, list, look at, follow and cancel runs through the app's HTTP API (a retry is a
    start that names its parent run)."""

    def __init__(
        self,
        app_url: str,
        key: str | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.app_url = normalize_app_url(app_url)
        self._key = key or None
        self._timeout_s = timeout_s
        self._attempts = max(1, attempts)
        # Read at construction so tests can shorten the module default.
        self._backoff_s = DEFAULT_BACKOFF_S if backoff_s is None else backoff_s
        self._sleep = sleep
        # urllib follows redirects; the key is added as an "unredirected" header (below) so a
        # redirect to another host never receives it.
        self._opener = urllib.request.build_opener()

    @classmethod
    def from_environment(cls, app_url: str | None = None, **kwargs: Any) -> AppClient:
        """The app URL from ``--app``, BATCHCTL_APP_URL or the azd environment file (in that
        order, batchctl.azdenv); the key only from BATCHCTL_FUNCTION_KEY."""
        url = resolve_app_url(app_url).value
        if not url:
            raise AppError(
                f"no app URL: pass --app URL or set {APP_URL_ENV} (or run from the folder "
                "where `azd up` ran: its .azure/<env>/.env names the app)"
            )
        return cls(url, os.environ.get(FUNCTION_KEY_ENV), **kwargs)

    # -- the API ----------------------------------------------------------------------------
    def start_run(
        self,
        manifest: str,
        options: RunOptions,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        manifest_label: str | None = None,
    ) -> StartedRun:
        """POST /api/runs; sent once (a retry after a lost answer could start a second run)."""
        body: dict[str, Any] = {"manifest": manifest, "options": options.model_dump(mode="json")}
        if run_id:
            body["run_id"] = run_id
        if parent_run_id:
            body["parent_run_id"] = parent_run_id
        if manifest_label:
            body["manifest_label"] = manifest_label
        response = self._request("POST", self._api("runs"), body, retry=False)
        if response.status not in (200, 201, 202):
            self._raise_for(response, run_id)
        answer = response.json()
        if not isinstance(answer, dict) or not answer.get("id"):
            raise AppError(f"the app's start answer has no run id (HTTP {response.status})")
        status_url = answer.get("statusQueryGetUri") or response.headers.get("location")
        return StartedRun(run_id=str(answer["id"]), status_url=status_url or None)

    def get_status(self, run_id: str, status_url: str | None = None) -> RunStatus:
        """The friendly status; the Durable status URL (if known) when that route fails."""
        try:
            response = self._request("GET", self._api(f"runs/{_quote(run_id)}"), retry=True)
        except UnavailableError:
            if status_url:
                return self.durable_status(status_url, run_id)
            raise
        if response.status == 200:
            try:
                return RunStatus.model_validate(response.json())
            except ValidationError as error:
                raise AppError(f"the app's status of {run_id} is not understood: {error}") from None
        route_missing = response.status == 404 and not _server_message(response.json())
        if status_url and route_missing:
            return self.durable_status(status_url, run_id)
        self._raise_for(response, run_id)
        raise AssertionError("unreachable")  # _raise_for always raises

    def list_runs(self, days: int, limit: int) -> list[RunStatus]:
        """GET /api/runs?days=&limit=: the runs created in the last ``days``, newest first."""
        query = urllib.parse.urlencode({"days": days, "limit": limit})
        response = self._request("GET", self._api(f"runs?{query}"), retry=True)
        if response.status != 200:
            self._raise_for(response, None)
        answer = response.json()
        runs = answer.get("runs") if isinstance(answer, dict) else None
        if not isinstance(runs, list):
            raise AppError(f"the app's run list is not understood (HTTP {response.status})")
        try:
            return [RunStatus.model_validate(run) for run in runs]
        except ValidationError as error:
            raise AppError(f"the app's run list is not understood: {error}") from None

    def follow(
        self,
        run_id: str,
        *,
        interval: float,
        on_status: Callable[[dict[str, Any]], None],
        status_url: str | None = None,
        wait_for_start_s: float = 0.0,
        unreachable_limit_s: float = DEFAULT_UNREACHABLE_LIMIT_S,
        pause: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> RunStatus:
        """Ask for the run's status every ``interval`` seconds until it ends; its last status.

        Each status goes to ``on_status`` as its view (``RunStatus.view``): the live view
        computes the rate and the ETA from what it is shown. A run not found yet is waited
        for up to ``wait_for_start_s`` (a blob trigger may not have fired); an app that cannot
        be reached is ridden out for ``unreachable_limit_s`` (a deployment, a restart), saying
        so on stderr. Ctrl-C (KeyboardInterrupt, usually from ``pause``) propagates: the
        caller decides whether that detaches or cancels.
        """
        started = clock()
        unreachable_since: float | None = None
        while True:
            try:
                status = self.get_status(run_id, status_url=status_url)
            except RunNotFoundError:
                if clock() - started >= wait_for_start_s:
                    raise
            except UnavailableError as error:
                unreachable_since = unreachable_since or clock()
                if clock() - unreachable_since >= unreachable_limit_s:
                    raise
                print(f"\n{error}; still trying", file=sys.stderr)
            else:
                unreachable_since = None
                on_status(status.view())
                if status.finished:
                    return status
            pause(interval)

    def durable_status(self, status_url: str, run_id: str) -> RunStatus:
        """Read the raw Durable status URL: 202 (+Location) while running, 200 when done."""
        response = self._request("GET", status_url, retry=True)
        try:
            return run_status_from_json(response.json(), run_id)
        except NotADurableStatusError:
            self._raise_for(response, run_id)
            raise AssertionError("unreachable") from None  # _raise_for always raises

    def cancel(self, run_id: str) -> CancelResult:
        """POST /api/runs/{id}/cancel; a run that already ended is not an error."""
        response = self._request("POST", self._api(f"runs/{_quote(run_id)}/cancel"), retry=False)
        if response.status in (200, 202):
            return CancelResult(run_id, True, "cancel requested")
        if response.status == 409:
            return CancelResult(run_id, False, _server_message(response.json()) or "already ended")
        self._raise_for(response, run_id)
        raise AssertionError("unreachable")

    # -- HTTP -------------------------------------------------------------------------------
    def _api(self, path: str) -> str:
        return f"{self.app_url}/api/{path}"

    def _request(self, method: str, url: str, body: Any = None, *, retry: bool) -> _Response:
        attempts = self._attempts if retry else 1
        last_error = ""
        server_said = "(no body)"
        for attempt in range(attempts):
            if attempt:
                self._sleep(min(self._backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                response = self._send_once(method, url, body)
            except OSError as error:
                last_error = _connection_problem(error)
                continue
            retryable = response.status >= 500 and not _is_durable_status(response)
            if not retryable:
                return response
            last_error = f"HTTP {response.status}"
            server_said = (
                _server_message(response.json())
                or response.body[:200].decode("utf-8", "replace")
                or "(no body)"
            )
            if attempt + 1 == attempts:
                break
        tries = f" after {attempts} tries" if attempts > 1 else ""
        if last_error.startswith("HTTP"):
            raise UnavailableError(
                f"the app at {display_url(url)} answered {last_error}{tries}: {server_said}"
            )
        raise UnavailableError(
            f"cannot reach the app at {display_url(url)}: {last_error}{tries} "
            f"(is the app URL right? --app or {APP_URL_ENV})"
        )

    def _send_once(self, method: str, url: str, body: Any) -> _Response:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._key and _origin(url) == _origin(self.app_url):
            # Only to the app itself: a status URL the server hands back could point elsewhere.
            request.add_unredirected_header(KEY_HEADER, self._key)
        try:
            with self._opener.open(request, timeout=self._timeout_s) as answer:
                return _Response(
                    answer.status, _lower(answer.headers), answer.read(), answer.geturl()
                )
        except urllib.error.HTTPError as error:
            with error:
                return _Response(error.code, _lower(error.headers), error.read(), url)

    def _raise_for(self, response: _Response, run_id: str | None) -> None:
        message = _server_message(response.json())
        status = response.status
        where = display_url(response.url)
        if status == 400:
            raise BadRequestError(f"the app refused the request: {message or 'HTTP 400'}")
        if status in (401, 403):
            if self._key is None:
                raise AuthError(
                    f"the app refused the request (HTTP {status}): {FUNCTION_KEY_ENV} is not "
                    "set; set it to the app's function key (az functionapp keys list)"
                )
            raise AuthError(
                f"the app refused the request (HTTP {status}): the function key in "
                f"{FUNCTION_KEY_ENV} is wrong or not valid for {self.app_url}"
            )
        if status == 404:
            if message:
                raise RunNotFoundError(f"no run {run_id!r} at {self.app_url}")
            raise RunNotFoundError(
                f"{where} answered 404 without a batchctl error: is {self.app_url} a batchctl "
                "app, and is it deployed?"
            )
        if status == 409:
            raise ConflictError(message or f"conflict (HTTP 409) at {where}")
        raise AppError(f"unexpected answer HTTP {status} from {where}: {message or '(no body)'}")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _lower(headers: Any) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in (headers or {}).items()}


def _is_durable_status(response: _Response) -> bool:
    # The Durable status URL answers 500 for a failed instance when asked to
    # (returnInternalServerErrorOnFailure): that is an answer, not an outage.
    body = response.json()
    return isinstance(body, dict) and "runtimeStatus" in body


def _connection_problem(error: OSError) -> str:
    reason: Any = getattr(error, "reason", error)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason) or type(reason).__name__


# -- where the deployment is: flag, then BATCHCTL_* variable, then azd's environment file ----
def resolve_app_url(app_url: str | None = None) -> Resolved:
    """The app URL and where it came from (``--app``, BATCHCTL_APP_URL, the azd file)."""
    return resolve(app_url, "--app", APP_URL_ENV, APP_URL_KEYS)


def resolve_blob_url(blob_url: str | None = None) -> Resolved:
    """The blob endpoint and where it came from (``--blob-url``, BATCHCTL_BLOB_URL, azd)."""
    return resolve(blob_url, "--blob-url", f"{ENV_PREFIX}BLOB_URL", BLOB_URL_KEYS)


# -- storage on the client side -------------------------------------------------------------
def client_storage_settings(blob_url: str | None = None) -> StorageSettings:
    """Blob access for uploads and report downloads from this machine.

    Only the blob endpoint is needed: ``--blob-url``, the report link's account,
    BATCHCTL_BLOB_URL, or the azd environment file's blob endpoint. Auth is
    BATCHCTL_STORAGE_AUTH (default ``managed_identity``, i.e.
    DefaultAzureCredential: ``az login`` on a workstation).
    """
    url = resolve_blob_url(blob_url).value
    if not url:
        raise AppError(
            f"no storage account: pass --blob-url or set {ENV_PREFIX}BLOB_URL "
            "(e.g. https://ACCOUNT.blob.core.windows.net; or run from the folder where "
            "`azd up` ran)"
        )
    values: dict[str, Any] = {"blob_url": url}
    if not os.environ.get(f"{ENV_PREFIX}STORAGE_AUTH"):
        values["storage_auth"] = "managed_identity"
    # Queues are never touched from here; the blob URL fills the required fields. A caller
    # that reads the ledger (`batchctl dashboard`) replaces table_url with the real one.
    for name in ("queue_url", "table_url"):
        if not os.environ.get(f"{ENV_PREFIX}{name.upper()}"):
            values[name] = url
    try:
        return StorageSettings(**values)
    except ValidationError as error:
        raise AppError(f"storage settings: {describe(error, first_only=True)}") from None


def storage_problem(error: Exception, what: str) -> AppError:
    """A storage SDK error as one line, with the fix for the usual causes."""
    status = getattr(error, "status_code", None)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = ""
    if status in (401, 403):
        hint = " (your identity needs a Storage Blob Data role on that container)"
    elif "credential" in type(error).__name__.lower() or "DefaultAzureCredential" in str(error):
        hint = " (sign in with `az login`, or set BATCHCTL_STORAGE_AUTH)"
    return AppError(f"{what} failed: {first_line}{hint}")
