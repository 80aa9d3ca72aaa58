"""Authorization for the lean Put Message path of bulk enqueue.

The SDK remains the authority on credentials: in Azure a bearer token from
``DefaultAzureCredential`` (managed identity), in local mode a short-lived, add-only queue
SAS signed by the SDK with Azurite's published development key. Nothing here signs requests.

The bearer token comes from the process's synchronous credential, asked in a worker thread.
Each bulk enqueue runs under its own ``asyncio.run``, and an ``azure.identity.aio`` credential
belongs to the event loop that first used it (its transport's aiohttp session): one cached
per process would refresh its token on a loop that is already closed. The sync credential
belongs to no loop and caches its token across enqueues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Protocol

from azure.core.credentials import TokenCredential
from azure.storage.queue import QueueSasPermissions, generate_queue_sas

from batchctl.settings import AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, StorageSettings
from batchctl.storage.clients import sync_credential

# Bearer tokens need 2017-11-09 or later; this is a version Azurite and Azure both serve.
STORAGE_API_VERSION = "2021-02-12"
STORAGE_SCOPE = "https://storage.azure.com/.default"
# Renew credentials this long before they expire, so no request carries a stale one.
RENEW_MARGIN_S = 300.0


class PutAuthorizer(Protocol):
    async def authorize(self) -> tuple[dict[str, str], str]:
        """Headers and a query string (without '?') for one Put Message request."""
        ...


class _SasAuthorizer:
    def __init__(self, queue_name: str, lifetime: timedelta = timedelta(hours=1)) -> None:
        self._queue_name = queue_name
        self._lifetime = lifetime
        self._query = ""
        self._renew_at = 0.0

    async def authorize(self) -> tuple[dict[str, str], str]:
        if time.monotonic() >= self._renew_at:
            self._query = generate_queue_sas(
                AZURITE_ACCOUNT_NAME,
                self._queue_name,
                AZURITE_ACCOUNT_KEY,
                permission=QueueSasPermissions(add=True),
                expiry=datetime.now(UTC) + self._lifetime,
            )
            self._renew_at = time.monotonic() + self._lifetime.total_seconds() - RENEW_MARGIN_S
        return {"x-ms-version": STORAGE_API_VERSION}, self._query


class _BearerAuthorizer:
    """Bearer headers from an azure-core ``TokenCredential`` (the synchronous protocol)."""

    def __init__(self, credential: TokenCredential) -> None:
        self._credential = credential
        self._headers: dict[str, str] = {}
        self._renew_at = 0.0
        # Hundreds of sends ask at once when the token is due: one of them renews it.
        self._renewing = asyncio.Lock()

    async def authorize(self) -> tuple[dict[str, str], str]:
        if time.time() >= self._renew_at:
            async with self._renewing:
                if time.time() >= self._renew_at:
                    # A refresh may block on the identity endpoint: never on the loop.
                    token = await asyncio.to_thread(self._credential.get_token, STORAGE_SCOPE)
                    self._headers = {
                        "Authorization": f"Bearer {token.token}",
                        "x-ms-version": STORAGE_API_VERSION,
                    }
                    self._renew_at = float(token.expires_on) - RENEW_MARGIN_S
        return self._headers, ""


@contextlib.asynccontextmanager
async def put_message_authorizer(
    settings: StorageSettings, queue_name: str
) -> AsyncIterator[PutAuthorizer]:
    if settings.storage_auth == "azurite":
        yield _SasAuthorizer(queue_name)
    else:
        yield _BearerAuthorizer(sync_credential(settings))
