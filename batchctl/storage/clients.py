"""Credentials and SDK clients built from settings: the one place that builds a storage client.

Every client gets the one retry policy (:mod:`batchctl.storage.retry`) and its timeouts, and
authenticates as the settings say. tests/test_storage_faults.py fails if a storage client
is constructed anywhere else.
"""

from __future__ import annotations

import functools
from typing import Any

from azure.core.credentials import AzureNamedKeyCredential
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableClient
from azure.data.tables._policies import TablesRetryPolicy
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from batchctl.settings import AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, StorageSettings
from batchctl.storage.faults import name_the_work_in_sdk_logs, naming, request_named
from batchctl.storage.retry import (
    BlobRetryPolicy,
    QueueRetryPolicy,
    RetryBounds,
    Role,
    TableRetryPolicy,
    retry_bounds,
)


@functools.cache
def _default_credential() -> Any:
    # Imported lazily: azure-identity is slow to import and local mode never needs it.
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def sync_credential(settings: StorageSettings) -> Any:
    """Managed identity in Azure; Azurite's published development key in local mode.

    One per process, and no ``azure.identity.aio`` twin: an async credential belongs to the
    event loop that first used it, and the async paths here (bulk enqueue) run each under
    a fresh ``asyncio.run``; they ask this one in a thread (batchctl.storage.put_auth)."""
    if settings.storage_auth == "azurite":
        return AzureNamedKeyCredential(AZURITE_ACCOUNT_NAME, AZURITE_ACCOUNT_KEY)
    return _default_credential()


# azure-core exports the transports lazily (a module __getattr__): mypy sees Any.
class _NamingTransport(RequestsTransport):  # type: ignore[misc]
    """azure-core's requests transport (the SDKs' default), naming each request while it is
    sent, so an answer cut off mid-body is logged with what it was the answer to."""

    def send(self, request: Any, **kwargs: Any) -> Any:
        with naming(request_named(request.method, request.url)):
            return super().send(request, **kwargs)


def _transport(bounds: RetryBounds) -> _NamingTransport:
    # The timeouts, and the block size the storage SDKs give the transport they build
    # themselves (256 KiB: the size of the pieces a streamed body is read in).
    return _NamingTransport(
        connection_timeout=bounds.connection_timeout_s,
        read_timeout=bounds.read_timeout_s,
        connection_data_block_size=256 * 1024,
    )


def blob_service_client(
    settings: StorageSettings, *, account_url: str | None = None, role: Role = "ordinary"
) -> BlobServiceClient:
    """The blob service of ``settings`` (or of another account, ``account_url``)."""
    name_the_work_in_sdk_logs()
    bounds = retry_bounds("blob", role)
    return BlobServiceClient(
        account_url or settings.blob_url,
        credential=sync_credential(settings),
        retry_policy=BlobRetryPolicy(bounds),
        transport=_transport(bounds),
        connection_timeout=bounds.connection_timeout_s,
        read_timeout=bounds.read_timeout_s,
    )


def queue_service_client(
    settings: StorageSettings, *, role: Role = "ordinary"
) -> QueueServiceClient:
    name_the_work_in_sdk_logs()
    bounds = retry_bounds("queue", role)
    return QueueServiceClient(
        settings.queue_url,
        credential=sync_credential(settings),
        retry_policy=QueueRetryPolicy(bounds),
        transport=_transport(bounds),
        connection_timeout=bounds.connection_timeout_s,
        read_timeout=bounds.read_timeout_s,
    )


class _TableClient(TableClient):
    """A TableClient whose pipeline holds :class:`TableRetryPolicy`.

    azure-data-tables takes no retry policy object (only azure-core's retry keywords, which
    give no jitter and no usable bound in time: see retry.py), and builds its pipeline in
    ``_configure_policies``; this swaps its retry policy for ours there. Should a release of
    the SDK stop building one, construction fails rather than run without ours.
    """

    def __init__(self, *args: Any, retry_policy: TableRetryPolicy, **kwargs: Any) -> None:
        self._bounded_retry = retry_policy
        super().__init__(*args, **kwargs)

    def _configure_policies(self, **kwargs: Any) -> list[Any]:
        policies = super()._configure_policies(**kwargs)
        found = [index for index, p in enumerate(policies) if isinstance(p, TablesRetryPolicy)]
        if len(found) != 1:
            raise RuntimeError(
                "azure-data-tables built no single retry policy to replace; "
                "batchctl.storage.clients needs updating for this SDK release"
            )
        policies[found[0]] = self._bounded_retry
        return policies


def table_client(
    settings: StorageSettings, table_name: str, *, role: Role = "ordinary"
) -> TableClient:
    """The client of one table. Built directly: a client from
    TableServiceClient.get_table_client would share the service's pipeline, not this one."""
    name_the_work_in_sdk_logs()
    bounds = retry_bounds("table", role)
    return _TableClient(
        endpoint=settings.table_url,
        table_name=table_name,
        credential=sync_credential(settings),
        retry_policy=TableRetryPolicy(bounds),
        transport=_transport(bounds),
        connection_timeout=bounds.connection_timeout_s,
        read_timeout=bounds.read_timeout_s,
    )
