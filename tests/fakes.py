"""Shared fakes, one of each, at the boundaries that cannot run here.

The Functions host (and with it the real Durable client) cannot be installed on this
machine, so the HTTP and trigger handlers are given :class:`FakeDurableClient`, shaped
like ``DurableOrchestrationClient`` where the handlers use it. Everything behind the
handlers (storage, the orchestrator, the activities) is real wherever a test needs it.
The sweeper's compute (Azure ML) is :class:`FakeSweptCompute`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func

from batchctl.compute.base import TaggedCompute

# The Durable extension's management routes, as the check-status answer names them.
DURABLE_PATH = "/runtime/webhooks/durabletask/instances/"
SYSTEM_KEY = "durable-system-key"

# A scripted instance's statuses, one per read: (runtime status, custom status).
Step = tuple[str, Any]


@dataclass
class FakeStatus:
    """What the handlers read of a ``DurableOrchestrationStatus``."""

    runtime_status: str | None
    custom_status: Any = None
    instance_id: str = ""
    input_: Any = None


@dataclass
class FakeInstance:
    """An instance whose status moves through ``steps``: whoever serves the status URL
    calls :meth:`advance` after each read (the handlers' own reads do not move it)."""

    steps: list[Step]
    reads: int = 0

    def current(self) -> Step:
        return self.steps[min(self.reads, len(self.steps) - 1)]

    def advance(self) -> None:
        self.reads += 1


@dataclass
class FakeDurableClient:
    """The Durable client the real handlers are given.

    ``instances`` are fixed statuses; ``scripted`` instances follow their steps; a run
    started through ``start_new`` follows ``script`` when one is given, else stays Pending.
    ``terminated`` is what ``get_status_by(runtime_status=[Terminated])`` lists.
    """

    base_url: str = "https://x"
    instances: dict[str, FakeStatus] = field(default_factory=dict)
    scripted: dict[str, FakeInstance] = field(default_factory=dict)
    script: list[Step] | None = None
    terminated: list[FakeStatus] = field(default_factory=list)
    started: list[tuple[str, str, Any]] = field(default_factory=list)
    events: list[tuple[str, str, Any]] = field(default_factory=list)
    status_query: str = ""

    async def get_status(self, instance_id: str, **_: Any) -> FakeStatus:
        instance = self.scripted.get(instance_id)
        if instance is not None:
            runtime, custom = instance.current()
            return FakeStatus(runtime, custom, instance_id)
        return self.instances.get(instance_id, FakeStatus(None, instance_id=instance_id))

    async def get_status_by(self, **filters: Any) -> list[FakeStatus]:
        wanted = [str(getattr(s, "value", s)) for s in filters.get("runtime_status") or []]
        if wanted == ["Terminated"]:
            return self.terminated
        listed = [*self.instances.values(), *self.terminated]
        return [s for s in listed if not wanted or s.runtime_status in wanted]

    async def start_new(self, name: str, instance_id: str, client_input: Any) -> str:
        self.started.append((name, instance_id, client_input))
        if self.script is not None:
            self.scripted[instance_id] = FakeInstance(list(self.script))
        else:
            self.instances[instance_id] = FakeStatus("Pending", instance_id=instance_id)
        return instance_id

    async def raise_event(self, instance_id: str, name: str, data: Any = None) -> None:
        self.events.append((instance_id, name, data))

    def create_check_status_response(
        self, req: func.HttpRequest, instance_id: str
    ) -> func.HttpResponse:
        # The shape the Durable extension returns: management URLs carrying the system key.
        query = f"taskHub=hub&connection=Storage&code={SYSTEM_KEY}{self.status_query}"
        status_url = f"{self.base_url}{DURABLE_PATH}{instance_id}?{query}"
        body = {
            "id": instance_id,
            "statusQueryGetUri": status_url,
            "sendEventPostUri": f"{self.base_url}{DURABLE_PATH}{instance_id}/raiseEvent/x",
            "terminatePostUri": f"{self.base_url}{DURABLE_PATH}{instance_id}/terminate",
        }
        return func.HttpResponse(
            json.dumps(body),
            status_code=202,
            headers={"Location": status_url},
            mimetype="application/json",
        )


@dataclass
class FakeSweptCompute:
    """The compute backend where the sweeper uses it (``list_tagged``, ``cancel_jobs``,
    ``delete_clusters``, with ComputeBackend's signatures): it lists ``tagged`` and records
    the runs whose jobs it cancelled and whose clusters it deleted, in order."""

    tagged: list[TaggedCompute] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def list_tagged(self) -> list[TaggedCompute]:
        return list(self.tagged)

    def cancel_jobs(self, run_id: str, clusters: Collection[str] | None = None) -> None:
        self.cancelled.append(run_id)

    def delete_clusters(self, run_id: str) -> list[str]:
        self.deleted.append(run_id)
        return [compute.name for compute in self.tagged if compute.run_id == run_id]
