"""Durable instance queries follow the extension's continuation token to the last page.

The fake is the extension's HTTP endpoint (the one the SDK's ``rpcBaseUrl`` names), shaped
like ``HttpApiHandler`` in Azure/azure-functions-durable-extension: ``GET instances/`` filters
on ``createdTimeFrom`` / ``runtimeStatus``, answers at most ``top`` (default 100) instances as
``StatusResponsePayload`` objects, puts the next page's token in ``x-ms-continuation-token``
and sends that header empty on the last page; ``GET instances/{id}`` answers one instance or
404. The client is the real SDK's ``DurableOrchestrationClient`` built from a binding context.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import azure.durable_functions as df
import azure.functions as func
import pytest
from aiohttp import web
from azure.durable_functions.models.utils import http_utils

from batchctl.compute.base import TaggedCompute
from batchctl.functions import api
from batchctl.functions.instances import (
    CONTINUATION_HEADER,
    InstanceQueryError,
    next_token,
    query_instances,
)
from tests.fakes import FakeSweptCompute

PAGE_SIZE = 100  # OrchestrationStatusQueryCondition.PageSize's default in the extension
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
STATUSES = ("Running", "Completed", "Failed", "Terminated", "Pending")


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeExtension:
    """The Durable extension's instance-query endpoint, over a fixed set of instances."""

    instances: list[dict[str, Any]]
    page_size: int = PAGE_SIZE
    requests: list[dict[str, str]] = field(default_factory=list)
    # Test hooks for the failure paths: a fixed answer, or a token that never changes.
    fail_page: int | None = None
    fail_html: bool = False  # the failing page is a gateway's HTML, not the host's JSON
    stuck_token: str | None = None

    def _matching(self, query: Any) -> list[dict[str, Any]]:
        since = query.get("createdTimeFrom")
        wanted = set(query["runtimeStatus"].split(",")) if query.get("runtimeStatus") else None
        found = []
        for instance in self.instances:
            created = datetime.fromisoformat(instance["createdTime"].replace("Z", "+00:00"))
            if since and created < datetime.fromisoformat(since.replace("Z", "+00:00")):
                continue
            if wanted and instance["runtimeStatus"] not in wanted:
                continue
            found.append(instance)
        return found

    async def list_instances(self, request: web.Request) -> web.Response:
        token = request.headers.get(CONTINUATION_HEADER)
        self.requests.append({"query": request.query_string, "token": token or ""})
        if self.fail_page is not None and len(self.requests) == self.fail_page:
            if self.fail_html:
                return web.Response(
                    text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                    status=502,
                    content_type="text/html",
                )
            return web.json_response({"Message": "An error has occurred."}, status=500)
        matching = self._matching(request.query)
        top = int(request.query.get("top", self.page_size))
        # A stuck token (a broken store) names the first page again.
        fresh = token is not None and token != self.stuck_token
        start = int(json.loads(base64.b64decode(token))["offset"]) if fresh and token else 0
        page = matching[start : start + top]
        rest = start + top < len(matching)
        following = base64.b64encode(json.dumps({"offset": start + top}).encode()).decode()
        next_header = (self.stuck_token or following) if rest else ""
        return web.json_response(page, headers={CONTINUATION_HEADER: next_header})

    async def get_instance(self, request: web.Request) -> web.Response:
        wanted = request.match_info["instance_id"]
        for instance in self.instances:
            if instance["instanceId"] == wanted:
                return web.json_response(instance)
        return web.json_response(None, status=404)


def _instances(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``count`` runs created over the last 10 days, in the extension's order (by id, not
    by time), so the newest runs are spread over every page."""
    instances = []
    for n in range(count):
        created = NOW - timedelta(minutes=rng.randrange(0, 10 * 24 * 60))
        instances.append(
            {
                "name": "run_orchestrator",
                "instanceId": f"run-{n:04d}",
                "runtimeStatus": rng.choice(STATUSES),
                "input": None,
                "customStatus": {"phase": "processing", "done": n},
                "output": None,
                "createdTime": _stamp(created),
                "lastUpdatedTime": _stamp(created + timedelta(minutes=5)),
            }
        )
    return sorted(instances, key=lambda i: str(i["instanceId"]))


def _client(rpc_base_url: str) -> df.DurableOrchestrationClient:
    """The real SDK client, from the binding context the host gives a client function."""
    context = {
        "taskHubName": "batchctl",
        "creationUrls": {},
        "managementUrls": {},
        "rpcBaseUrl": rpc_base_url,
        "baseUrl": "https://app.example/runtime/webhooks/durabletask",
        "requiredQueryStringParameters": "code=x",
    }
    return df.DurableOrchestrationClient(json.dumps(context))


def _with_extension(
    fake: FakeExtension, work: Callable[[df.DurableOrchestrationClient], Any]
) -> Any:
    """Serve ``fake`` on a free local port while ``work(client)`` runs, as the host does."""

    async def main() -> Any:
        app = web.Application()
        app.router.add_get("/durabletask/instances/", fake.list_instances)
        app.router.add_get("/durabletask/instances/{instance_id}", fake.get_instance)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            return await work(_client(f"http://127.0.0.1:{port}/durabletask/"))
        finally:
            # The SDK keeps one aiohttp session per process (fine in the host's one loop);
            # each test runs its own loop, so the session goes with it.
            await http_utils._close_session()
            await runner.cleanup()

    return asyncio.run(main())


def test_the_sdk_alone_reads_only_the_first_page() -> None:
    # The defect this module exists for, shown on the installed SDK (1.7.0).
    fake = FakeExtension(_instances(random.Random(1), 180))
    listed = _with_extension(fake, lambda client: client.get_status_by())
    assert len(listed) == PAGE_SIZE and len(fake.requests) == 1


@pytest.mark.parametrize("seed", [3, 17, 2026])
def test_query_reads_every_page_with_the_filters_on_each(seed: int) -> None:
    rng = random.Random(seed)
    instances = _instances(rng, rng.randrange(150, 420))
    fake = FakeExtension(instances)
    since = NOW - timedelta(days=7)
    wanted = [df.OrchestrationRuntimeStatus.Terminated, df.OrchestrationRuntimeStatus.Failed]

    listed = _with_extension(
        fake, lambda client: query_instances(client, created_time_from=since, runtime_status=wanted)
    )

    expected = fake._matching(
        {"createdTimeFrom": _stamp(since), "runtimeStatus": "Terminated,Failed"}
    )
    assert [s.instance_id for s in listed] == [i["instanceId"] for i in expected]
    assert len(fake.requests) == -(-len(expected) // PAGE_SIZE) >= 1
    # Every page carries the same filters; only the first goes without a token.
    assert len({r["query"] for r in fake.requests}) == 1
    assert "runtimeStatus=Terminated,Failed" in fake.requests[0]["query"]
    assert fake.requests[0]["token"] == "" and all(r["token"] for r in fake.requests[1:])


def test_list_runs_finds_the_newest_runs_on_any_page() -> None:
    rng = random.Random(7)
    instances = _instances(rng, 260)
    fake = FakeExtension(instances)
    request = func.HttpRequest(
        method="GET", url="https://app/api/runs", body=b"", params={"days": "10", "limit": "500"}
    )

    response = _with_extension(fake, lambda client: api.list_runs(request, client, now=NOW))

    assert response.status_code == 200
    runs = json.loads(response.get_body())["runs"]
    assert len(runs) == 260 > PAGE_SIZE
    newest = max(instances, key=lambda i: str(i["createdTime"]))
    assert runs[0]["run_id"] == newest["instanceId"]
    assert len(fake.requests) == 3


def test_the_sweeper_closes_terminated_runs_past_the_first_page() -> None:
    rng = random.Random(11)
    instances = _instances(rng, 240)
    for instance in instances:
        instance["createdTime"] = _stamp(NOW - timedelta(hours=rng.randrange(1, 100)))
        instance["runtimeStatus"] = rng.choice(("Terminated", "Completed"))
    terminated = {i["instanceId"] for i in instances if i["runtimeStatus"] == "Terminated"}
    assert len(terminated) > PAGE_SIZE  # so one page cannot hold them
    fake = FakeExtension(instances)
    finalized: list[str] = []

    def finalize(run_id: str, last_input: Any) -> bool:
        finalized.append(run_id)
        return True

    # One terminated run still has tagged compute: the per-run status read works too.
    compute_run = sorted(terminated)[-1]
    backend = FakeSweptCompute([TaggedCompute(name="c", run_id=compute_run)])
    swept = _with_extension(fake, lambda client: api.sweep(client, backend, finalize, now=NOW))

    assert set(finalized) == terminated
    assert set(swept) == terminated and backend.deleted == [compute_run]


def test_one_run_whose_close_keeps_failing_does_not_stop_the_sweep_of_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(13)
    instances = _instances(rng, 130)
    for instance in instances:
        instance["createdTime"] = _stamp(NOW - timedelta(hours=rng.randrange(1, 100)))
        instance["runtimeStatus"] = "Terminated"
    terminated = sorted(i["instanceId"] for i in instances)
    broken = set(rng.sample(terminated, 5))  # a missing chunk, a malformed last input...
    finalized: list[str] = []

    def finalize(run_id: str, last_input: Any) -> bool:
        if run_id in broken:
            raise ValueError(f"chunk 3 of {run_id} is missing")
        finalized.append(run_id)
        return True

    # Compute of two runs: the first's delete fails, the second's must still go.
    doomed, fine = sorted(set(terminated) - broken)[:2]

    class FailingDelete(FakeSweptCompute):
        def delete_clusters(self, run_id: str) -> list[str]:
            if run_id == doomed:
                raise RuntimeError("ARM answered 500")
            return super().delete_clusters(run_id)

    backend = FailingDelete([TaggedCompute(name="c", run_id=r) for r in (doomed, fine)])
    fake = FakeExtension(instances)
    swept = _with_extension(fake, lambda client: api.sweep(client, backend, finalize, now=NOW))

    assert set(finalized) == set(terminated) - broken
    assert set(swept) == set(terminated) - broken
    assert backend.deleted == [fine]
    logged = caplog.text
    assert all(run_id in logged for run_id in broken) and doomed in logged


def test_an_error_page_fails_the_query_naming_the_page() -> None:
    fake = FakeExtension(_instances(random.Random(5), 250), fail_page=2)
    with pytest.raises(InstanceQueryError, match=r"page 2\) answered 500"):
        _with_extension(fake, query_instances)


def test_an_html_error_page_is_named_by_its_status_not_a_json_error() -> None:
    fake = FakeExtension(_instances(random.Random(5), 250), fail_page=2, fail_html=True)
    with pytest.raises(InstanceQueryError, match=r"page 2\) answered 502: <html>.*Bad Gateway"):
        _with_extension(fake, query_instances)


def test_a_token_that_repeats_stops_the_query_instead_of_looping() -> None:
    fake = FakeExtension(_instances(random.Random(5), 250), stuck_token="c2FtZQ==")
    with pytest.raises(InstanceQueryError, match="repeated continuation token"):
        _with_extension(fake, query_instances)
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("  ", None), ("null", None), ("bnVsbA==", None), ("abc", "abc")],
)
def test_last_page_markers(header: str | None, expected: str | None) -> None:
    assert next_token(header) == expected


def test_local_clients_keep_their_one_shot_query() -> None:
    calls: list[dict[str, Any]] = []

    class LocalClient:
        async def get_status_by(self, **query: Any) -> list[str]:
            calls.append(query)
            return ["a", "b"]

    since = NOW - timedelta(days=1)
    assert asyncio.run(query_instances(LocalClient(), created_time_from=since)) == ["a", "b"]
    assert calls == [{"created_time_from": since, "runtime_status": None}]
